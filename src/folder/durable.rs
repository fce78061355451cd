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
//! A large file is written around the page cache where the filesystem
//! allows (`direct.rs`): no copy into the cache, no writeback to manage.
//! Otherwise written bytes stream to disk while the file is being written:
//! writeback starts behind the writer and written pages leave the page cache
//! once on disk, so the final fsync has little left to do and a large commit
//! neither fills memory with dirty pages nor allocates a fresh page cache as
//! large as the file.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::error::{Error, IoContext, Result};
use crate::folder::direct::Direct;

pub use crate::folder::disk::free_bytes;
pub(crate) use crate::folder::disk::parent_of;

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
            let mut file = StreamingFile::new(create_new(tmp)?);
            if size_hint >= DIRECT_MIN {
                file.go_direct(tmp);
            }
            let mut out = BufWriter::with_capacity(1 << 20, file);
            let no_space = |e: Error| e.no_space(target, size_hint);
            write(&mut out).map_err(no_space)?;
            let file = out.into_inner().map_err(|e| e.into_error()).and_then(StreamingFile::finish);
            file.at("write", tmp).map_err(no_space)?.sync_all().at("fsync", tmp).map_err(no_space)
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
    /// Written around the page cache ([`go_direct`](StreamingFile::go_direct)).
    direct: Option<Direct>,
    /// Tests: the next `sync_file_range` fails with this errno.
    #[cfg(test)]
    fail_next_sync: Option<i32>,
    /// Tests: every `sync_file_range` asked for, as `(offset, len, flags)`.
    #[cfg(test)]
    syncs: Vec<(u64, u64, libc::c_uint)>,
}

/// Files expected to be at least this large are written around the page
/// cache where the filesystem allows; smaller ones (state files, records)
/// through it.
pub(crate) const DIRECT_MIN: u64 = 8 << 20;

/// Whether this process has said how it writes archives, and that a
/// filesystem refused a direct write.
static SAID_DIRECT: AtomicBool = AtomicBool::new(false);
static SAID_BUFFERED: AtomicBool = AtomicBool::new(false);
static SAID_REFUSED: AtomicBool = AtomicBool::new(false);

/// Writeback is started for every this many bytes written.
pub(crate) const STREAM_CHUNK: u64 = 8 << 20;
/// How far behind the writer written bytes may stay in the page cache.
pub(crate) const STREAM_WINDOW: u64 = 64 << 20;

impl StreamingFile {
    fn new(file: File) -> StreamingFile {
        StreamingFile {
            file,
            written: 0,
            started: 0,
            dropped: 0,
            streaming: true,
            direct: None,
            #[cfg(test)]
            fail_next_sync: None,
            #[cfg(test)]
            syncs: Vec::new(),
        }
    }

    /// Write this new, empty file around the page cache where its
    /// filesystem allows (`O_DIRECT`, [`crate::folder::direct`]); said once
    /// per process either way, naming the folder.
    fn go_direct(&mut self, path: &Path) {
        self.direct = Direct::enable(&self.file);
        let (said, how) = match self.direct {
            Some(_) => (&SAID_DIRECT, "archives are written around the page cache (O_DIRECT)"),
            None => (&SAID_BUFFERED, "the filesystem refuses O_DIRECT: archives are written through the page cache"),
        };
        if !said.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!(folder = %parent_of(path).display(), "{how}");
        }
    }

    /// Write what is still held back (a direct file's last block) and
    /// return the file, ready for its fsync.
    fn finish(mut self) -> io::Result<File> {
        if let Some(d) = &mut self.direct {
            d.finish(&self.file, self.written)?;
            if d.refused() && !SAID_REFUSED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!("a direct write was refused (EINVAL): the rest of that archive was written through the page cache");
            }
        }
        Ok(self.file)
    }

    /// `sync_file_range` on `len` bytes at `offset`; `false` when the
    /// filesystem does not support it (then streaming stops for this file).
    fn sync_range(&mut self, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<bool> {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(false);
        };
        // SAFETY: plain syscall on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::sync_file_range(self.file.as_raw_fd(), offset, len, flags) };
        let result = if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
        #[cfg(test)]
        self.syncs.push((offset as u64, len as u64, flags));
        #[cfg(test)]
        let result = match self.fail_next_sync.take() {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => result,
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINVAL | libc::ESPIPE | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
                _ => Err(e),
            },
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
        if let Some(d) = &mut self.direct {
            let n = d.write(&self.file, buf)?;
            self.written += n as u64;
            return Ok(n);
        }
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
        #[cfg(feature = "torch")]
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

    /// Bytes that differ at every offset a copy could get wrong (not all zeros).
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn same_file(a: &Path, b: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (fs::metadata(a).unwrap(), fs::metadata(b).unwrap());
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    }

    #[test]
    fn a_copy_has_the_sources_bytes_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.mio");
        let data = pattern(300_000);
        write_bytes(&src, &data).unwrap();
        let target = dir.path().join("m.mio.bk");
        commit(&target, Source::Copy(&src)).unwrap();
        assert!(!same_file(&src, &target), "a copy, not a link");
        assert_eq!(fs::metadata(&target).unwrap().len(), data.len() as u64);
        assert!(fs::read(&target).unwrap() == data, "the copy holds the source's bytes");
        // Replacing the source leaves the copy as it was.
        write_bytes(&src, b"new").unwrap();
        assert!(fs::read(&target).unwrap() == data);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary left");
    }

    #[test]
    fn a_link_that_fails_across_filesystems_falls_back_to_a_copy() {
        use std::os::unix::fs::MetadataExt;
        // /dev/shm is a tmpfs, the temporary folder usually a disk: a hard
        // link between them fails (EXDEV), and tmpfs has no reflinks, so the
        // copy goes through `io::copy`.
        let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("skipped: no /dev/shm");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        if fs::metadata(other.path()).unwrap().dev() == fs::metadata(dir.path()).unwrap().dev() {
            eprintln!("skipped: /dev/shm and {} are one filesystem", dir.path().display());
            return;
        }
        let src = other.path().join("m.mio");
        let data = pattern(200_000);
        write_bytes(&src, &data).unwrap();
        assert!(fs::hard_link(&src, dir.path().join("probe")).is_err(), "a link across filesystems fails");
        let target = dir.path().join("m.mio.bk");
        commit(&target, Source::Link(&src)).unwrap();
        assert_eq!(fs::metadata(&target).unwrap().len(), data.len() as u64);
        assert!(fs::read(&target).unwrap() == data, "the fall-back copy holds the source's bytes");
        // The other direction: a copy into the tmpfs.
        let back = other.path().join("back.mio");
        commit(&back, Source::Copy(&target)).unwrap();
        assert!(fs::read(&back).unwrap() == data);
    }

    #[test]
    fn a_link_that_cannot_be_made_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.mio");
        write_bytes(&src, b"x").unwrap();
        let missing_dir = dir.path().join("gone");
        match commit(&missing_dir.join("m.mio.bk"), Source::Link(&src)) {
            Err(Error::Io { path, .. }) => assert_eq!(path, missing_dir),
            other => panic!("{other:?}"),
        }
        let missing_src = dir.path().join("nothing.mio");
        match commit(&dir.path().join("x.bk"), Source::Link(&missing_src)) {
            Err(Error::Io { path, .. }) => assert_eq!(path, missing_src),
            other => panic!("{other:?}"),
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "nothing left behind");
    }

    #[test]
    fn temporaries_are_made_in_the_targets_folder() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        let target = sub.join("m.mio");
        let tmp = temp_path(&sub, &target);
        assert_eq!(tmp.parent(), Some(sub.as_path()));
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert!(is_temp(name) && name.ends_with("-m.mio"), "{name}");
        assert_ne!(temp_path(&sub, &target), tmp, "each temporary is new");
        assert_eq!(parent_of(&target), sub);
        assert_eq!(parent_of(Path::new("m.mio")), Path::new("."));
        // While a commit writes, its temporary sits beside the target (a
        // rename is atomic only within one folder and filesystem).
        let mut seen = Vec::new();
        let mut write = |out: &mut BufWriter<StreamingFile>| {
            seen = fs::read_dir(&sub).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            out.write_all(b"x").map_err(|e| Error::io("write", "x", e))
        };
        commit(&target, Source::Write { size_hint: 1, write: &mut write }).unwrap();
        assert!(matches!(&seen[..], [name] if is_temp(name) && name.ends_with("-m.mio")), "{seen:?}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "nothing outside the target's folder");
    }

    #[test]
    fn read_regular_reads_back_what_was_committed_and_refuses_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let data = pattern(70_000);
        write_bytes(&path, &data).unwrap();
        assert!(read_regular(&path).unwrap() == data);
        write_bytes(&path, b"").unwrap();
        assert!(read_regular(&path).unwrap().is_empty());
        let fifo = dir.path().join("fifo.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(read_regular(&fifo), Err(Error::NotRegular { kind: "a FIFO", .. })));
        assert!(matches!(read_regular(&dir.path().join("none")), Err(Error::Io { .. })));
    }

    #[test]
    fn syncing_a_missing_folder_fails() {
        let dir = tempfile::tempdir().unwrap();
        sync_dir(dir.path()).unwrap();
        let gone = dir.path().join("gone");
        assert!(matches!(sync_dir(&gone), Err(Error::Io { path, .. }) if path == gone));
    }

    /// A `StreamingFile` in `dir` whose next `sync_file_range` fails with `errno`.
    fn failing_sync(dir: &Path, errno: i32) -> (PathBuf, StreamingFile) {
        let path = dir.join("f");
        let mut file = StreamingFile::new(create_new(&path).unwrap());
        file.fail_next_sync = Some(errno);
        (path, file)
    }

    #[cfg(feature = "torch")]
    #[test]
    fn this_process_s_own_temporaries_are_stale_with_its_start_time_in_their_name() {
        // Made by an earlier handle of this process (a folder reopened).
        let dir = tempfile::tempdir().unwrap();
        let ours = temp_path(dir.path(), &dir.path().join("m.mio"));
        fs::write(&ours, b"torn").unwrap();
        assert_eq!(remove_stale_temps(dir.path(), |_, _| true).unwrap(), 1);
        assert!(!ours.exists());
    }

    #[cfg(feature = "torch")]
    #[test]
    fn a_folder_that_cannot_be_listed_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(remove_stale_temps(&file, |_, _| true), Err(Error::Io { op: "list", .. })));
    }

    #[cfg(feature = "torch")]
    #[test]
    fn a_live_process_is_found_after_a_dead_one() {
        // `kill(pid, 0)` succeeding leaves errno as the last failure set it.
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        assert!(!pid_exists(dead_pid));
        assert!(pid_exists(std::process::id()));
    }

    #[test]
    fn a_folder_commit_refuses_a_target_it_cannot_inspect() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let built = temp_path(dir.path(), &dir.path().join("t"));
        fs::create_dir(&built).unwrap();
        // Under a file: the target cannot exist, and is not created.
        let e = commit_dir(&built, &file.join("t")).unwrap_err();
        assert!(matches!(&e, Error::Io { op: "inspect", .. }), "{e:?}");
        assert!(built.is_dir(), "the built folder is left for cleanup");
    }

    #[test]
    fn devices_fifos_and_links_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("p");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink("p", dir.path().join("l")).unwrap();
        let kind = |p: &Path| kind_of(&fs::symlink_metadata(p).unwrap());
        assert_eq!(kind(Path::new("/dev/null")), "a device");
        assert_eq!(kind(&fifo), "a FIFO");
        assert_eq!(kind(&dir.path().join("l")), "a symlink");
        assert_eq!(kind(dir.path()), "a folder");
    }

    #[test]
    fn free_bytes_reads_the_filesystem_of_the_nearest_existing_folder() {
        let dir = tempfile::tempdir().unwrap();
        let here = free_bytes(dir.path()).unwrap();
        let below = free_bytes(&dir.path().join("not/yet/made.mio")).unwrap();
        // SAFETY: a valid path and out-pointer.
        let (available, total) = unsafe {
            let c = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
            let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
            assert_eq!(libc::statvfs(c.as_ptr(), st.as_mut_ptr()), 0);
            let st = st.assume_init();
            (st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)
        };
        // Other programs write meanwhile: the same figure within half of it.
        for free in [here, below] {
            assert!(free <= total && free.abs_diff(available) <= available / 2, "{free}, statvfs says {available} of {total}");
        }
    }

    #[test]
    fn open_regular_gives_a_blocking_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"x").unwrap();
        let file = open_regular(&path).unwrap();
        // SAFETY: fcntl on a descriptor the test owns.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert!(
            flags >= 0 && flags & libc::O_NONBLOCK == 0,
            "flags {flags:#x}: O_NONBLOCK is cleared once the file is known to be regular"
        );
    }

    #[test]
    fn large_commits_read_back_exactly_where_written_directly_and_where_not() {
        // A disk folder (direct where its filesystem allows) and a tmpfs one
        // (which refuses O_DIRECT: buffered).
        let disk = tempfile::tempdir().unwrap();
        let shm = Path::new("/dev/shm");
        let tmpfs = shm.is_dir().then(|| tempfile::tempdir_in(shm).unwrap());
        let data = pattern(DIRECT_MIN as usize + 12_345);
        for dir in std::iter::once(disk.path()).chain(tmpfs.as_ref().map(|t| t.path())) {
            let target = dir.join("big.mio");
            // Written in odd pieces, as an archive writer does.
            let mut write = |out: &mut BufWriter<StreamingFile>| {
                for piece in data.chunks(3 << 20 | 77) {
                    out.write_all(piece).map_err(|e| Error::io("write", &target, e))?;
                }
                Ok(())
            };
            commit(&target, Source::Write { size_hint: data.len() as u64, write: &mut write }).unwrap();
            assert!(fs::read(&target).unwrap() == data, "{}", dir.display());
            let leftovers: Vec<_> =
                fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).filter(|e| is_temp(&e.file_name().to_string_lossy())).collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
        }
    }

    #[test]
    fn writes_stop_at_chunk_boundaries() {
        // So that writeback of each chunk starts as soon as it is written.
        let dir = tempfile::tempdir().unwrap();
        let mut file = StreamingFile::new(create_new(&dir.path().join("f")).unwrap());
        let chunk = STREAM_CHUNK as usize;
        assert_eq!(file.write(&vec![1; 2 * chunk]).unwrap(), chunk);
        assert_eq!(file.write(&[2; 10]).unwrap(), 10);
        assert_eq!(file.write(&vec![3; chunk]).unwrap(), chunk - 10);
        assert_eq!(file.written, 2 * STREAM_CHUNK);
    }

    #[test]
    fn writeback_starts_per_chunk_and_pages_are_dropped_only_once_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = StreamingFile::new(create_new(&path).unwrap());
        let data = pattern((STREAM_WINDOW + 3 * STREAM_CHUNK) as usize);
        file.write_all(&data).unwrap();
        let (chunk, chunks) = (STREAM_CHUNK, (STREAM_WINDOW + 3 * STREAM_CHUNK) / STREAM_CHUNK);
        let waited = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let started: Vec<_> = file.syncs.iter().filter(|s| s.2 == libc::SYNC_FILE_RANGE_WRITE).copied().collect();
        let dropped: Vec<_> = file.syncs.iter().filter(|s| s.2 == waited).copied().collect();
        assert_eq!(started, (0..chunks).map(|k| (k * chunk, chunk, libc::SYNC_FILE_RANGE_WRITE)).collect::<Vec<_>>());
        // Only what lies more than the window behind the writer, each chunk
        // waited for (written and on disk) before its pages are dropped.
        assert_eq!(dropped, (0..3).map(|k| (k * chunk, chunk, waited)).collect::<Vec<_>>());
        assert_eq!(file.syncs.len(), started.len() + dropped.len());
        assert_eq!((file.started, file.dropped), (chunks * chunk, 3 * chunk));
        assert!(fs::read(&path).unwrap() == data);
    }

    #[test]
    fn a_writeback_error_fails_the_write() {
        // Once `sync_file_range` reported EIO, the final fsync would not.
        let dir = tempfile::tempdir().unwrap();
        let (_, mut file) = failing_sync(dir.path(), libc::EIO);
        let err = file.write_all(&vec![1; STREAM_CHUNK as usize]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn an_interrupted_writeback_writes_each_byte_once() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut file) = failing_sync(dir.path(), libc::EINTR);
        let data = pattern(STREAM_CHUNK as usize + 10);
        file.write_all(&data).unwrap();
        assert!(fs::read(&path).unwrap() == data, "the bytes before the EINTR were not written again");
    }

    #[test]
    fn a_filesystem_without_sync_file_range_still_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut file) = failing_sync(dir.path(), libc::EOPNOTSUPP);
        let data = pattern(2 * STREAM_CHUNK as usize + 10);
        file.write_all(&data).unwrap();
        assert!(!file.streaming, "streaming stops");
        assert!(fs::read(&path).unwrap() == data);
    }

    #[cfg(feature = "torch")]
    #[test]
    fn stale_temps_of_a_dead_maker_are_removed_and_of_a_live_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let mut live = std::process::Command::new("sleep").arg("600").spawn().unwrap();
        let temp = |owner: String, base: &str| dir.path().join(format!("{TEMP_PREFIX}{owner}-0123abcd-{base}"));
        let stale = temp(dead_pid.to_string(), "a.mio");
        let kept = temp(live.id().to_string(), "b.mio");
        fs::write(&stale, b"x").unwrap();
        fs::write(&kept, b"x").unwrap();
        let removed = remove_stale_temps(dir.path(), |_, _| true);
        let _ = live.kill();
        let _ = live.wait();
        assert_eq!(removed.unwrap(), 1);
        assert!(!stale.exists(), "its maker is gone");
        assert!(kept.exists(), "its maker was running");
    }

    #[cfg(feature = "torch")]
    #[test]
    fn cleaning_a_missing_folder_is_ok_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        assert_eq!(remove_stale_temps(&gone, |_, _| true).unwrap(), 0);
        assert!(!gone.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
