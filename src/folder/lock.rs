//! One writer per model folder: an advisory `flock` on `<dir>/.modelio.lock`.
//!
//! The lock is held for the life of a training handle and released by the
//! kernel when the process ends, however it ends, so a crash never leaves a
//! stale lock. The file holds the holder's pid, for the error message only.
//! Predict mode takes no lock: readers only see committed files.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// Name of the lock file in a model folder.
pub const LOCK_FILE: &str = ".modelio.lock";

/// A held folder lock; dropping it releases the lock.
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
}

/// Take the folder's lock or say who holds it.
///
/// A lock file with more than one link (a hard link, as `cp -al` makes when
/// it copies a model folder) is never written through: the link would carry
/// this folder's lock, and the pid written into it, to the other file. It is
/// first replaced by a file of this folder's own (by rename, through
/// [`crate::folder::durable`]), which leaves the other file as it was. While another
/// process holds the shared file's lock, that process is reported as the
/// holder and nothing is replaced: it may be a trainer in this very folder.
///
/// # Errors
/// [`Error::Locked`] naming the folder and the holder's pid;
/// [`Error::NotRegular`] when the lock file is a symlink or not a file; [`Error::Io`].
pub fn acquire(dir: &Path) -> Result<FolderLock> {
    let path = dir.join(LOCK_FILE);
    // Each round that does not end here saw the file replaced (by this
    // function, here or in another process) or linked meanwhile.
    for _ in 0..ROUNDS {
        let mut file = open(&path)?;
        let meta = file.metadata().at("inspect", &path)?;
        if !meta.is_file() {
            return Err(Error::NotRegular { path, kind: "not a regular file" });
        }
        if meta.nlink() > 1 {
            unshare(dir, &path, &mut file, &meta)?;
            continue;
        }
        try_flock(dir, &path, &mut file)?;
        // Held: keep it only if it is still the file at `path`, with no other
        // link. The checks come after `flock`, so a file replaced or linked
        // before it is seen here, and one replaced later was replaced by a
        // process that held its lock (`unshare`), which cannot happen while
        // this one holds it.
        let held = file.metadata().at("inspect", &path)?;
        if held.nlink() != 1 || !same_file(&path, &held) {
            continue;
        }
        file.set_len(0).at("write lock file", &path)?;
        file.rewind().at("write lock file", &path)?;
        write!(file, "{}", std::process::id()).at("write lock file", &path)?;
        return Ok(FolderLock { _file: file });
    }
    Err(Error::io("lock", &path, std::io::Error::other("the lock file kept being replaced or linked while it was taken")))
}

/// [`Error::Locked`] when another process holds the folder's lock; unlike
/// [`acquire`], creates, takes and writes nothing (for commands that find
/// nothing to do and must leave the folder as it was). A lock file that
/// cannot be opened counts as not held.
///
/// # Errors
/// [`Error::Locked`] naming the folder and the holder's pid.
pub fn check_free(dir: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let opened = File::options().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(&path);
    let Ok(mut file) = opened else { return Ok(()) };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    // A shared lock: it conflicts only with a holder's exclusive one, and is
    // released when `file` closes.
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    Err(locked(dir, &mut file))
}

/// Attempts at taking a lock whose file keeps changing before giving up.
const ROUNDS: usize = 8;

/// Open (or create) the lock file. Never follows a symlink: the file is
/// written, and a link could point anywhere (as root, at any file on the
/// machine).
fn open(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    match opened {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(Error::NotRegular { path: path.to_path_buf(), kind: "a symlink" }),
        other => other.at("open lock file", path),
    }
}

/// `flock` without waiting; [`Error::Locked`] with the pid the file holds
/// when another open file holds it.
fn try_flock(dir: &Path, path: &Path, file: &mut File) -> Result<()> {
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(locked(dir, file));
    }
    Err(Error::io("lock", path, err))
}

/// [`Error::Locked`] naming the pid the holder wrote into the lock file.
fn locked(dir: &Path, file: &mut File) -> Error {
    let mut pid = String::new();
    let _ = file.read_to_string(&mut pid);
    let pid = pid.trim();
    Error::Locked { dir: dir.to_path_buf(), pid: if pid.is_empty() { "unknown".into() } else { pid.into() } }
}

/// Replace the multiply linked lock file `file` (opened from `path`) with a
/// new file of one link. Done while holding the shared file's lock, and only
/// if `path` still names it, so two processes never both replace it and a
/// held lock is never replaced. The shared file itself is not written.
fn unshare(dir: &Path, path: &Path, file: &mut File, meta: &std::fs::Metadata) -> Result<()> {
    try_flock(dir, path, file).map_err(|e| match e {
        Error::Locked { dir, pid } => Error::LockShared { dir, pid, links: meta.nlink() },
        other => other,
    })?;
    if same_file(path, meta) {
        crate::folder::durable::commit_bytes(path, b"")?;
    }
    Ok(())
}

/// Whether `path` (not followed if a symlink) is the file `meta` describes.
fn same_file(path: &Path, meta: &std::fs::Metadata) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|now| now.dev() == meta.dev() && now.ino() == meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = acquire(dir.path()).unwrap();
        let err = acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&std::process::id().to_string()) && err.contains(&dir.path().display().to_string()), "{err}");
        drop(held);
        acquire(dir.path()).unwrap();
    }

    #[test]
    fn symlinked_lock_file_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let folder = dir.path().join("model");
        std::fs::create_dir(&folder).unwrap();
        std::os::unix::fs::symlink(&victim, folder.join(LOCK_FILE)).unwrap();
        let err = acquire(&folder).unwrap_err();
        assert!(matches!(err, Error::NotRegular { .. }) && err.to_string().contains("symlink"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    fn links(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().nlink()
    }

    #[test]
    fn hard_linked_lock_file_is_replaced_and_its_other_link_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let folder = dir.path().join("model");
        std::fs::create_dir(&folder).unwrap();
        std::fs::hard_link(&victim, folder.join(LOCK_FILE)).unwrap();
        let held = acquire(&folder).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(links(&victim), 1);
        assert_eq!(links(&folder.join(LOCK_FILE)), 1);
        assert_eq!(std::fs::read_to_string(folder.join(LOCK_FILE)).unwrap(), std::process::id().to_string());
        assert!(std::fs::read_dir(&folder).unwrap().count() == 1, "no temporary left behind");
        drop(held);
    }

    #[test]
    fn a_cp_al_copy_gets_a_lock_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (original, copy) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&original).unwrap();
        std::fs::create_dir(&copy).unwrap();
        // The original's lock file, as an earlier trainer (pid 12345) left it.
        std::fs::write(original.join(LOCK_FILE), b"12345").unwrap();
        std::fs::hard_link(original.join(LOCK_FILE), copy.join(LOCK_FILE)).unwrap();
        let copy_lock = acquire(&copy).unwrap();
        assert_eq!(std::fs::read(original.join(LOCK_FILE)).unwrap(), b"12345");
        // The two folders' locks are independent now.
        let original_lock = acquire(&original).unwrap();
        drop((copy_lock, original_lock));
    }

    #[test]
    fn a_held_shared_lock_file_is_reported_and_left_alone() {
        // A trainer holds the original's lock; the copy shares its file. The
        // holder may as well train in the folder asking, so nothing is replaced.
        let dir = tempfile::tempdir().unwrap();
        let (original, copy) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&original).unwrap();
        std::fs::create_dir(&copy).unwrap();
        let held = acquire(&original).unwrap();
        std::fs::hard_link(original.join(LOCK_FILE), copy.join(LOCK_FILE)).unwrap();
        for folder in [&copy, &original] {
            let err = acquire(folder).unwrap_err();
            assert!(matches!(&err, Error::LockShared { pid, links: 2, .. } if *pid == std::process::id().to_string()), "{err:?}");
            assert!(err.to_string().contains("hard link"), "{err}");
        }
        assert_eq!(links(&original.join(LOCK_FILE)), 2);
        drop(held);
        acquire(&copy).unwrap();
        assert_eq!(links(&original.join(LOCK_FILE)), 1);
    }

    #[test]
    fn check_free_reports_a_holder_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        check_free(dir.path()).unwrap();
        assert!(!dir.path().join(LOCK_FILE).exists(), "no lock file is created");
        let held = acquire(dir.path()).unwrap();
        let err = check_free(dir.path()).unwrap_err();
        assert!(matches!(&err, Error::Locked { pid, .. } if *pid == std::process::id().to_string()), "{err:?}");
        drop(held);
        check_free(dir.path()).unwrap();
        acquire(dir.path()).unwrap();
    }
}
