//! The one way modelio commits a file: write a temporary file in the same
//! folder, fsync it, rename it over the target, fsync the folder.
//!
//! A reader therefore sees either the previous file or the new one, never a
//! torn one, even after a crash or SIGKILL. A temporary file or folder is
//! named `.modelio-tmp-<pid>.<start>-<random id>-<target's name>`, after the
//! process that writes it and when that process started: readers skip such
//! names ([`is_temp`]), and a training handle opening its folder removes
//! those of its model left behind by processes that are no longer running
//! (a pid reused by another process has another start time). Because a committed file is never
//! modified in place, a backup or snapshot of it may be a hard link to it.
//!
//! Written bytes stream to disk while the file is being written: writeback
//! starts behind the writer and written pages leave the page cache once on
//! disk, so the final fsync has little left to do and a large commit neither
//! fills memory with dirty pages nor allocates a fresh page cache as large as
//! the file.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

pub use crate::disk::free_bytes;
pub(crate) use crate::disk::parent_of;

/// Every temporary file or folder modelio creates starts with this.
pub(crate) const TEMP_PREFIX: &str = ".modelio-tmp-";

/// Where the bytes of a commit come from.
pub(crate) enum Source<'a> {
    /// Bytes written by a closure into the temporary file. `size_hint` is the
    /// expected size, reported when the disk is full.
    Write { size_hint: u64, write: &'a mut dyn FnMut(&mut BufWriter<StreamingFile>) -> Result<()> },
    /// A hard link to an already committed file (copied when linking fails,
    /// e.g. across filesystems).
    Link(&'a Path),
    /// A copy of an existing file.
    Copy(&'a Path),
}

/// Atomically make `target` hold the bytes of `source`.
///
/// # Errors
/// [`Error::Io`] naming the file on any filesystem failure, [`Error::NoSpace`]
/// when the disk is full. On error the temporary file is removed, and
/// `target` is unchanged unless only the final folder fsync failed (then the
/// rename happened, but is not yet known to be durable).
pub(crate) fn commit(target: &Path, source: Source<'_>) -> Result<()> {
    let dir = parent_of(target);
    let tmp = temp_path(&dir, target);
    let result = stage(&tmp, target, source).and_then(|()| {
        fs::rename(&tmp, target).at("rename into place", target)?;
        sync_dir(&dir)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `commit` of bytes already in memory (state files).
///
/// # Errors
/// As `commit`.
pub fn commit_bytes(target: &Path, bytes: &[u8]) -> Result<()> {
    let mut write = |out: &mut BufWriter<StreamingFile>| out.write_all(bytes).map_err(|e| Error::io("write", target, e));
    commit(target, Source::Write { size_hint: bytes.len() as u64, write: &mut write })
}

fn stage(tmp: &Path, target: &Path, source: Source<'_>) -> Result<()> {
    match source {
        Source::Write { size_hint, write } => {
            let file = create_new(tmp)?;
            let mut out = BufWriter::with_capacity(1 << 20, StreamingFile::new(file));
            let no_space = |e: Error| e.no_space(target, size_hint);
            write(&mut out).map_err(no_space)?;
            let file = out.into_inner().map_err(|e| Error::io("write", tmp, e.into_error())).map_err(no_space)?.file;
            file.sync_all().at("fsync", tmp).map_err(no_space)
        }
        Source::Link(src) => match fs::hard_link(src, tmp) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Name what is missing: the source, or the folder being written into.
                let missing = if src.exists() { parent_of(tmp) } else { src.to_path_buf() };
                Err(Error::io("link into", missing, e))
            }
            Err(_) => copy_synced(src, tmp, target),
        },
        Source::Copy(src) => copy_synced(src, tmp, target),
    }
}

/// Create a new file for writing: never follows a symlink and never opens an
/// existing file (`O_EXCL | O_NOFOLLOW`).
pub(crate) fn create_new(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path).at("create", path)
}

/// Open a file for reading only if it is a regular file. A FIFO, device or
/// socket is refused without blocking (`O_NONBLOCK`, then `fstat`), so a
/// stray FIFO named like an archive cannot hang a reader.
///
/// # Errors
/// [`Error::NotRegular`] naming the file and what it is; [`Error::Io`].
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = File::options().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).at("open", path)?;
    let meta = file.metadata().at("inspect", path)?;
    if !meta.is_file() {
        return Err(Error::NotRegular { path: path.to_path_buf(), kind: kind_of(&meta) });
    }
    // SAFETY: fcntl on a descriptor we own; clears O_NONBLOCK for ordinary reads.
    unsafe {
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Read a small regular file whole (state files, configs), refusing
/// non-regular files as [`open_regular`] does.
///
/// # Errors
/// As [`open_regular`], and [`Error::Io`] when reading fails.
pub(crate) fn read_regular(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    open_regular(path)?.read_to_end(&mut out).at("read", path)?;
    Ok(out)
}

/// The temporary file of a commit, written front to back. Every
/// [`STREAM_CHUNK`] written starts that chunk's writeback (without waiting);
/// chunks more than [`STREAM_WINDOW`] behind the writer are waited for and
/// dropped from the page cache. Durability still comes from the fsync at the
/// end of the commit; this only spreads the disk's work over the write and
/// keeps the page cache small and hot (freed pages are reused by the next
/// chunks instead of allocating fresh memory for the whole file).
pub(crate) struct StreamingFile {
    file: File,
    /// Bytes written so far.
    written: u64,
    /// Bytes whose writeback has been started.
    started: u64,
    /// Bytes known on disk and dropped from the page cache.
    dropped: u64,
    /// Cleared when the filesystem does not support `sync_file_range`.
    streaming: bool,
}

/// Writeback is started for every this many bytes written.
pub(crate) const STREAM_CHUNK: u64 = 8 << 20;
/// How far behind the writer written bytes may stay in the page cache.
pub(crate) const STREAM_WINDOW: u64 = 64 << 20;

impl StreamingFile {
    fn new(file: File) -> StreamingFile {
        StreamingFile { file, written: 0, started: 0, dropped: 0, streaming: true }
    }

    /// `sync_file_range` on `len` bytes at `offset`; `false` when the
    /// filesystem does not support it (then streaming stops for this file).
    fn sync_range(&mut self, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<bool> {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(false);
        };
        // SAFETY: plain syscall on a descriptor we own; no memory is passed.
        if unsafe { libc::sync_file_range(self.file.as_raw_fd(), offset, len, flags) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL | libc::ESPIPE | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
            _ => Err(e),
        }
    }

    fn stream(&mut self) -> io::Result<()> {
        while self.streaming && self.written - self.started >= STREAM_CHUNK {
            self.streaming = self.sync_range(self.started, STREAM_CHUNK, libc::SYNC_FILE_RANGE_WRITE)?;
            self.started += STREAM_CHUNK;
        }
        while self.streaming && self.started - self.dropped > STREAM_WINDOW {
            let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            self.streaming = self.sync_range(self.dropped, STREAM_CHUNK, all)?;
            if self.streaming {
                // SAFETY: advisory call on a descriptor we own. The range is on
                // disk (waited for above), so dropping it loses nothing.
                unsafe { libc::posix_fadvise(self.file.as_raw_fd(), self.dropped as i64, STREAM_CHUNK as i64, libc::POSIX_FADV_DONTNEED) };
            }
            self.dropped += STREAM_CHUNK;
        }
        Ok(())
    }
}

impl Write for StreamingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Stop at the next chunk boundary so writeback starts on time.
        let to_boundary = STREAM_CHUNK - self.written % STREAM_CHUNK;
        let n = buf.len().min(usize::try_from(to_boundary).unwrap_or(usize::MAX));
        let n = self.file.write(&buf[..n])?;
        self.written += n as u64;
        match self.stream() {
            // The bytes are written: reporting EINTR now would make
            // `write_all` write them again. Streaming resumes on the next call.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Writeback errors (EIO, ENOSPC) must not be lost: once
            // `sync_file_range` has reported one, the final fsync would not.
            other => other?,
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Copy `src` into the new file `tmp` (for `target`) and fsync it: a reflink
/// where the filesystem offers one (the copy shares no writable blocks with
/// `src`), otherwise `copy_file_range` through `std::io::copy`.
fn copy_synced(src: &Path, tmp: &Path, target: &Path) -> Result<()> {
    let mut from = open_regular(src)?;
    let len = from.metadata().at("inspect", src)?.len();
    let mut to = create_new(tmp)?;
    // FICLONE: the whole file as a copy-on-write clone (btrfs, XFS, bcachefs).
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: ioctl on two descriptors we own; no memory is passed.
    let cloned = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE as _, from.as_raw_fd()) } == 0;
    if !cloned {
        io::copy(&mut from, &mut to).map_err(|e| Error::io("copy", target, e).no_space(target, len))?;
    }
    to.sync_all().map_err(|e| Error::io("fsync", tmp, e).no_space(target, len))
}

/// A fresh temporary path in `dir` for building `target`:
/// `.modelio-tmp-<pid>.<start>-<uuid>-<target>`, where `<start>` is when this
/// process started (see [`start_time`]), so that a later run tells a
/// temporary of a live writer from one of a dead process whose pid was
/// reused. Where the start time cannot be read, the name has only the pid.
pub(crate) fn temp_path(dir: &Path, target: &Path) -> PathBuf {
    let base = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let me = std::process::id();
    let owner = match own_start_time() {
        Some(start) => format!("{me}.{start}"),
        None => me.to_string(),
    };
    dir.join(format!("{TEMP_PREFIX}{owner}-{}-{base}", uuid::Uuid::new_v4().simple()))
}

/// When process `pid` started, in clock ticks after boot (field 22 of
/// `/proc/<pid>/stat`); `None` where there is no such process or no `/proc`.
/// A pid and its start time name one process for the life of the machine: a
/// reused pid comes with a later start time.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/<pid>/stat` line. The second field (the command
/// name, in parentheses) may hold spaces and parentheses, so fields are
/// counted from the last `)`: the field after it is field 3.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// This process's start time, read once.
fn own_start_time() -> Option<u64> {
    static START: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *START.get_or_init(|| start_time(std::process::id()))
}

/// Whether `name` is one of modelio's temporary files (readers skip these).
pub fn is_temp(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// fsync a folder so a rename inside it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at("fsync folder", dir)
}

/// Atomically put the folder `built` at `target`, replacing an existing
/// folder only once the new one is complete (Linux `RENAME_EXCHANGE`).
/// Only a folder is ever replaced: anything else at `target` (a file, a
/// symlink, a FIFO) is refused and left where it is, even when it appears
/// between the check and the exchange (it is then swapped back).
///
/// # Errors
/// [`Error::NotASnapshot`] when `target` is not a folder; [`Error::Io`] naming the folder.
pub(crate) fn commit_dir(built: &Path, target: &Path) -> Result<()> {
    let dir = parent_of(target);
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            exchange(built, target)?;
            // `built` now holds what was at `target`: a folder, unless it
            // was replaced since the check. Never delete anything else.
            let replaced = fs::symlink_metadata(built).at("inspect", built)?;
            if !replaced.is_dir() {
                exchange(built, target)?;
                return Err(Error::NotASnapshot { path: target.to_path_buf(), kind: kind_of(&replaced) });
            }
            fs::remove_dir_all(built).at("remove the replaced folder", built)?;
        }
        Ok(meta) => return Err(Error::NotASnapshot { path: target.to_path_buf(), kind: kind_of(&meta) }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(built, target).at("rename into place", target)?,
        Err(e) => return Err(Error::io("inspect", target, e)),
    }
    sync_dir(&dir)
}

/// What a filesystem entry is, for error messages ("a file").
pub(crate) fn kind_of(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    if kind.is_symlink() {
        "a symlink"
    } else if kind.is_dir() {
        "a folder"
    } else if kind.is_file() {
        "a file"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

fn exchange(a: &Path, b: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(|e| Error::io("exchange", a, io::Error::other(e)))?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(|e| Error::io("exchange", b, io::Error::other(e)))?;
    // SAFETY: both are valid NUL-terminated paths; renameat2 only reads them.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::io("atomically replace", b, io::Error::last_os_error()))
    }
}

#[cfg(feature = "torch")] // used when a training handle opens its folder
/// Who made a temporary file: a process id, and that process's start time
/// when the name records it (names written before it was recorded have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TempOwner {
    pub pid: u32,
    pub start: Option<u64>,
}

#[cfg(feature = "torch")] // used when a training handle opens its folder
/// The maker and target name of a temporary file
/// (`.modelio-tmp-<pid>[.<start>]-<uuid>-<target>`), or `None` when `name`
/// is not one.
pub(crate) fn parse_temp(name: &str) -> Option<(TempOwner, &str)> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    let (owner, rest) = rest.split_once('-')?;
    let (_uuid, base) = rest.split_once('-')?;
    let owner = match owner.split_once('.') {
        Some((pid, start)) => TempOwner { pid: pid.parse().ok()?, start: Some(start.parse().ok()?) },
        None => TempOwner { pid: owner.parse().ok()?, start: None },
    };
    Some((owner, base))
}

#[cfg(feature = "torch")] // used when a training handle opens its folder
/// Whether the process that made a temporary may still be writing it.
///
/// Pid 0 is never a writer (it names no process; `kill(0, 0)` would ask
/// about our own process group). When the name records the maker's start
/// time, the process is alive only if a process with that pid exists and
/// started then: a pid reused by an unrelated process starts later. Without
/// a recorded start time (or without `/proc`), any process with that pid
/// counts as alive, as does one that cannot be checked.
fn maker_alive(owner: TempOwner) -> bool {
    if owner.pid == 0 {
        return false;
    }
    if let Some(start) = owner.start {
        if let Some(now) = start_time(owner.pid) {
            return now == start;
        }
        if std::path::Path::new("/proc/self/stat").exists() {
            // `/proc` works and has no such process: it is gone.
            return false;
        }
    }
    pid_exists(owner.pid)
}

#[cfg(feature = "torch")] // used when a training handle opens its folder
/// Whether some process has id `pid` (or it cannot be checked, which counts as yes).
fn pid_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(feature = "torch")] // used when a training handle opens its folder
/// Remove the temporary files and folders in `dir` that an interrupted run
/// left for a target `owned` accepts and that are provably stale: made by
/// this process or by one that no longer exists. `owned` is given the
/// target's name and whether the temporary is a folder (a symlink counts as
/// neither and is never followed). Returns how many were removed.
///
/// # Errors
/// [`Error::Io`] when `dir` cannot be listed.
pub(crate) fn remove_stale_temps(dir: &Path, owned: impl Fn(&str, bool) -> bool) -> Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let me = TempOwner { pid: std::process::id(), start: own_start_time() };
    for entry in entries {
        let entry = entry.at("list", dir)?;
        let name = entry.file_name();
        let Some((owner, base)) = name.to_str().and_then(parse_temp) else { continue };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let mine = owner.pid == me.pid && (owner.start.is_none() || owner.start == me.start);
        if !owned(base, is_dir) || (!mine && maker_alive(owner)) {
            continue;
        }
        let path = entry.path();
        let ok = if is_dir { fs::remove_dir_all(&path).is_ok() } else { fs::remove_file(&path).is_ok() };
        if ok {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_bytes(target: &Path, bytes: &[u8]) -> Result<()> {
        commit_bytes(target, bytes)
    }

    #[test]
    fn commit_replaces_atomically_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.bin");
        write_bytes(&target, b"one").unwrap();
        write_bytes(&target, b"two").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_write_keeps_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.bin");
        write_bytes(&target, b"good").unwrap();
        let mut fail = |out: &mut BufWriter<StreamingFile>| {
            out.write_all(b"partial").map_err(|e| Error::io("write", "x", e))?;
            Err(Error::Stopped)
        };
        assert!(commit(&target, Source::Write { size_hint: 0, write: &mut fail }).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"good");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn link_and_dir_exchange() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        write_bytes(&a, b"x").unwrap();
        commit(&dir.path().join("a.bk"), Source::Link(&a)).unwrap();
        write_bytes(&a, b"y").unwrap();
        assert_eq!(fs::read(dir.path().join("a.bk")).unwrap(), b"x");

        let target = dir.path().join("snap");
        for content in ["first", "second"] {
            let built = temp_path(dir.path(), &target);
            fs::create_dir(&built).unwrap();
            fs::write(built.join("f"), content).unwrap();
            commit_dir(&built, &target).unwrap();
        }
        assert_eq!(fs::read_to_string(target.join("f")).unwrap(), "second");
        assert_eq!(remove_stale_temps(dir.path(), |_, _| true).unwrap(), 0);
    }

    #[test]
    fn streamed_commit_writes_every_byte() {
        // Past the window, in writes that straddle chunk boundaries.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("big.bin");
        let len = (STREAM_WINDOW + 3 * STREAM_CHUNK) as usize + 12_345;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut write = |out: &mut BufWriter<StreamingFile>| {
            for piece in data.chunks(3 * 1024 * 1024 + 17) {
                out.write_all(piece).map_err(|e| Error::io("write", "x", e))?;
            }
            Ok(())
        };
        commit(&target, Source::Write { size_hint: len as u64, write: &mut write }).unwrap();
        assert!(fs::read(&target).unwrap() == data);
    }

    #[cfg(feature = "torch")]
    #[test]
    fn stale_temps_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        fs::write(dir.path().join(format!("{TEMP_PREFIX}{me}-x-m.mio")), b"torn").unwrap();
        fs::create_dir(dir.path().join(format!("{TEMP_PREFIX}{me}-y-m_snapshot_3_iters"))).unwrap();
        // Another model's, and one of a live process (pid 1): not ours to remove.
        fs::write(dir.path().join(format!("{TEMP_PREFIX}{me}-z-other.mio")), b"busy").unwrap();
        fs::write(dir.path().join(format!("{TEMP_PREFIX}1-w-m.mio")), b"busy").unwrap();
        fs::write(dir.path().join("m.mio"), b"keep").unwrap();
        assert_eq!(remove_stale_temps(dir.path(), |base, _| base.starts_with("m")).unwrap(), 2);
        assert!(dir.path().join("m.mio").exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    }
    #[test]
    fn only_a_folder_is_replaced_by_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m_snapshot_3_iters");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"mine").unwrap();
        for (occupant, kind) in [("file", "a file"), ("symlink", "a symlink")] {
            match occupant {
                "file" => fs::write(&target, b"user data").unwrap(),
                _ => std::os::unix::fs::symlink(&victim, &target).unwrap(),
            }
            let built = temp_path(dir.path(), &target);
            fs::create_dir(&built).unwrap();
            let err = commit_dir(&built, &target).unwrap_err();
            assert!(matches!(&err, Error::NotASnapshot { path, kind: k } if *path == target && *k == kind), "{err:?}");
            assert!(err.to_string().contains(&target.display().to_string()) && err.to_string().contains("move or rename it"), "{err}");
            let meta = fs::symlink_metadata(&target).unwrap();
            assert_eq!(meta.file_type().is_symlink(), occupant == "symlink", "left where it was");
            assert!(built.is_dir(), "the built folder stays the caller's to remove");
            fs::remove_dir(&built).unwrap();
            fs::remove_file(&target).unwrap();
        }
        assert_eq!(fs::read(&victim).unwrap(), b"mine");
    }

    #[test]
    fn start_time_is_field_22_even_after_an_odd_command_name() {
        let fields: Vec<String> = (3..=30).map(|i| if i == 22 { "987654".into() } else { i.to_string() }).collect();
        let line = format!("42 (a) b (c)) {}\n", fields.join(" "));
        assert_eq!(parse_start_time(&line), Some(987654));
        assert_eq!(parse_start_time("42 (x) S 1"), None);
        if Path::new("/proc/self/stat").exists() {
            assert!(own_start_time().is_some());
            assert_eq!(start_time(std::process::id()), own_start_time());
        }
    }

    #[cfg(feature = "torch")]
    #[test]
    fn temp_names_record_their_maker_and_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = temp_path(dir.path(), &dir.path().join("m-1.mio"));
        let name = tmp.file_name().unwrap().to_str().unwrap().to_string();
        let (owner, base) = parse_temp(&name).unwrap();
        assert_eq!((owner.pid, owner.start, base), (std::process::id(), own_start_time(), "m-1.mio"));
        let (old, base) = parse_temp(".modelio-tmp-77-abc-m.mio").unwrap();
        assert_eq!((old, base), (TempOwner { pid: 77, start: None }, "m.mio"));
        assert!(parse_temp(".modelio-tmp-77.x-abc-m.mio").is_none());
    }

    #[cfg(feature = "torch")]
    #[test]
    fn temps_of_pid_0_or_of_a_reused_pid_are_stale() {
        if !Path::new("/proc/self/stat").exists() {
            return; // start times come from /proc
        }
        let dir = tempfile::tempdir().unwrap();
        // A live process that is not this one.
        let mut child = std::process::Command::new("sleep").arg("600").spawn().unwrap();
        let pid = child.id();
        let start = start_time(pid).unwrap();
        let temp = |owner: &str, base: &str| dir.path().join(format!("{TEMP_PREFIX}{owner}-0123abcd-{base}"));
        let stale = [temp("0", "a.mio"), temp(&format!("0.{start}"), "b.mio"), temp(&format!("{pid}.{}", start + 1), "c.mio")];
        let live = [temp(&format!("{pid}.{start}"), "d.mio"), temp(&pid.to_string(), "e.mio")];
        for path in stale.iter().chain(&live) {
            fs::write(path, b"x").unwrap();
        }
        let removed = remove_stale_temps(dir.path(), |_, _| true);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(removed.unwrap(), stale.len());
        for path in &stale {
            assert!(!path.exists(), "{} kept", path.display());
        }
        for path in &live {
            assert!(path.exists(), "{} removed while its maker runs", path.display());
        }
        // Its maker gone, the temporary is stale, with or without a start time.
        assert_eq!(remove_stale_temps(dir.path(), |_, _| true).unwrap(), live.len());
    }

    #[cfg(feature = "torch")]
    #[test]
    fn a_file_is_not_taken_for_a_folder_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(format!("{TEMP_PREFIX}0-0123abcd-m_snapshot_3_iters"));
        fs::write(&file, b"x").unwrap();
        assert_eq!(remove_stale_temps(dir.path(), |_, is_dir| is_dir).unwrap(), 0);
        assert!(file.exists());
    }
}
