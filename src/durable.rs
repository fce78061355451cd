//! The one way modelio commits a file: write a temporary file in the same
//! folder, fsync it, rename it over the target, fsync the folder.
//!
//! A reader therefore sees either the previous file or the new one, never a
//! torn one, even after a crash or SIGKILL. A temporary file or folder is
//! named `.modelio-tmp-<pid>-<random id>-<target's name>`, after the process
//! that writes it: readers skip such names ([`is_temp`]), and a training
//! handle opening its folder removes those of its model left behind by
//! processes that are no longer running. Because a committed file is never
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
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = File::options().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).at("open", path)?;
    let kind = file.metadata().at("inspect", path)?.file_type();
    let what = if kind.is_file() {
        // SAFETY: fcntl on a descriptor we own; clears O_NONBLOCK for ordinary reads.
        unsafe {
            let fd = file.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
        return Ok(file);
    } else if kind.is_dir() {
        "a folder"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(Error::NotRegular { path: path.to_path_buf(), kind: what })
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

/// A fresh temporary path in `dir` for building `target`.
pub(crate) fn temp_path(dir: &Path, target: &Path) -> PathBuf {
    let base = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!("{TEMP_PREFIX}{}-{}-{base}", std::process::id(), uuid::Uuid::new_v4().simple()))
}

/// Whether `name` is one of modelio's temporary files (readers skip these).
pub fn is_temp(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// The folder holding `path` ("." for a bare file name).
pub(crate) fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// fsync a folder so a rename inside it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at("fsync folder", dir)
}

/// Atomically put the folder `built` at `target`, replacing an existing
/// folder only once the new one is complete (Linux `RENAME_EXCHANGE`).
///
/// # Errors
/// [`Error::Io`] naming the folder.
pub(crate) fn commit_dir(built: &Path, target: &Path) -> Result<()> {
    let dir = parent_of(target);
    if target.exists() {
        exchange(built, target)?;
        // `built` now holds the old folder.
        fs::remove_dir_all(built).at("remove the replaced folder", built)?;
    } else {
        fs::rename(built, target).at("rename into place", target)?;
    }
    sync_dir(&dir)
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
/// The process id and target name a temporary file was made for
/// (`.modelio-tmp-<pid>-<uuid>-<target>`), or `None` when `name` is not one.
pub(crate) fn parse_temp(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    let (pid, rest) = rest.split_once('-')?;
    let (_uuid, base) = rest.split_once('-')?;
    Some((pid.parse().ok()?, base))
}

#[cfg(feature = "torch")] // used when a training handle opens its folder
/// Whether process `pid` is alive (or cannot be checked, which counts as alive).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(feature = "torch")] // used when a training handle opens its folder
/// Remove the temporary files and folders in `dir` that an interrupted run
/// left for a target `owned` accepts and that are provably stale: made by this
/// process or by one that no longer exists. Returns how many were removed.
///
/// # Errors
/// [`Error::Io`] when `dir` cannot be listed.
pub(crate) fn remove_stale_temps(dir: &Path, owned: impl Fn(&str) -> bool) -> Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    for entry in entries {
        let entry = entry.at("list", dir)?;
        let name = entry.file_name();
        let Some((pid, base)) = name.to_str().and_then(parse_temp) else { continue };
        if !owned(base) || (pid != std::process::id() && process_alive(pid)) {
            continue;
        }
        let path = entry.path();
        let ok = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path).is_ok(),
            _ => fs::remove_file(&path).is_ok(),
        };
        if ok {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Free bytes on the filesystem holding `path` (or its nearest existing parent).
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = path.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
        if p.as_os_str().is_empty() {
            p = PathBuf::from(".");
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid path and `st` is a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail * st.f_frsize)
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
        assert_eq!(remove_stale_temps(dir.path(), |_| true).unwrap(), 0);
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
        assert_eq!(remove_stale_temps(dir.path(), |base| base.starts_with("m")).unwrap(), 2);
        assert!(dir.path().join("m.mio").exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    }
}
