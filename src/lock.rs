//! One writer per model folder: an advisory `flock` on `<dir>/.modelio.lock`.
//!
//! The lock is held for the life of a training handle and released by the
//! kernel when the process ends, however it ends, so a crash never leaves a
//! stale lock. The file holds the holder's pid, for the error message only.
//! Predict mode takes no lock: readers only see committed files.

use std::fs::File;
use std::io::{Read, Seek, Write};
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
/// # Errors
/// [`Error::Locked`] naming the folder and the holder's pid; [`Error::Io`].
pub fn acquire(dir: &Path) -> Result<FolderLock> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    // Never follow a symlink: the file is truncated and written below, and a
    // link could point anywhere (as root, at any file on the machine).
    let opened = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path);
    let mut file = match opened {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::NotRegular { path, kind: "a symlink" });
        }
        other => other.at("open lock file", &path)?,
    };
    if !file.metadata().at("inspect", &path)?.is_file() {
        return Err(Error::NotRegular { path, kind: "not a regular file" });
    }
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(Error::Locked { dir: dir.to_path_buf(), pid: if pid.is_empty() { "unknown".into() } else { pid.into() } });
        }
        return Err(Error::io("lock", &path, err));
    }
    file.set_len(0).at("write lock file", &path)?;
    file.rewind().at("write lock file", &path)?;
    write!(file, "{}", std::process::id()).at("write lock file", &path)?;
    Ok(FolderLock { _file: file })
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
}
