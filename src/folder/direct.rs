//! Writing a large file around the page cache (`O_DIRECT`).
//!
//! A buffered write copies every byte into the page cache, which the kernel
//! then allocates, tracks, writes back and frees: measured here, most of the
//! CPU a save costs. A direct write hands the bytes to the disk from where
//! they are. The disk takes whole blocks from block-aligned memory at
//! block-aligned file offsets, so bytes reach the file two ways:
//! - a run of whole blocks that lies in memory at the same offset within a
//!   block as in the file (a staging buffer placed for its archive offset) is
//!   written from where it is;
//! - everything else (headers, the edges of a run, bytes placed otherwise)
//!   is gathered into an aligned bounce buffer, written once it holds whole
//!   blocks.
//!
//! The file's last, partial block is written whole and the file cut to its
//! length. Durability is unchanged: the commit still fsyncs the file and its
//! folder. A filesystem that refuses `O_DIRECT` (tmpfs, some network
//! filesystems), when the flag is set or at the first write, leaves the file
//! buffered.

use std::alloc::Layout;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Offsets, lengths and addresses of direct writes are multiples of this:
/// the largest logical block size of common disks, and the page size.
pub(crate) const BLOCK: usize = 4096;
/// A huge page: buffers this large or larger are aligned to it and ask
/// for huge pages.
const HUGE: usize = 2 << 20;
/// The bounce buffer, in bytes (a multiple of [`BLOCK`]).
const BOUNCE: usize = 4 << 20;
/// Runs shorter than this are gathered even when placed right: one write
/// of a full bounce buffer beats many small ones.
const DIRECT_RUN: usize = 256 << 10;

/// Block-aligned memory of a fixed size, for direct reads and writes.
pub(crate) struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: owned memory, reachable only through `&self` / `&mut self`.
unsafe impl Send for Aligned {}
// SAFETY: as above; `&self` only reads.
unsafe impl Sync for Aligned {}

impl Aligned {
    fn layout(len: usize) -> Option<Layout> {
        // Buffers of huge pages start on one.
        let align = if len >= HUGE { HUGE } else { BLOCK };
        Layout::from_size_align(len.max(1).next_multiple_of(BLOCK), align).ok()
    }

    /// `len` zeroed bytes (rounded up to whole blocks), or `None` when
    /// memory cannot be had. From [`HUGE`] bytes on, backed by huge pages
    /// where the kernel offers them: one page fault per 2 MiB instead of
    /// one per 4 KiB, which measured here costs about half a second per GiB.
    pub fn new(len: usize) -> Option<Aligned> {
        let layout = Aligned::layout(len)?;
        // SAFETY: a layout of non-zero size.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc(layout) })?;
        if layout.size() >= HUGE {
            // SAFETY: advice on memory we just allocated, `layout.size()`
            // bytes from a 2 MiB boundary; a refusal changes nothing.
            unsafe { libc::madvise(ptr.as_ptr().cast(), layout.size(), libc::MADV_HUGEPAGE) };
        }
        // SAFETY: `layout.size()` bytes we own, zeroed once before any read.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, layout.size()) };
        Some(Aligned { ptr, len: layout.size() })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialized (zeroed at first) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, borrowed mutably through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        if let Some(layout) = Aligned::layout(self.len) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// A file being written around the page cache. Bytes gathered and not yet
/// written wait in the bounce buffer.
pub(crate) struct Direct {
    bounce: Aligned,
    /// Bytes waiting in the bounce buffer...
    filled: usize,
    /// ... and where the file goes on.
    at: At,
    /// Bytes written from where they were placed, without a copy.
    pub in_place: u64,
}

/// Where a file goes on, and how.
struct At {
    /// The offset of the next write: a multiple of [`BLOCK`] until the
    /// filesystem refuses a direct write.
    pos: u64,
    /// The filesystem refused a direct write: the rest is written buffered.
    refused: bool,
}

impl At {
    /// Write `bytes` here, directly, or buffered once the filesystem has
    /// refused a direct write (this one included: its bytes are written
    /// again from their start, over whatever part of them landed).
    fn put(&mut self, file: &File, bytes: &[u8]) -> io::Result<()> {
        if !self.refused {
            match file.write_all_at(bytes, self.pos) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    set_direct(file, false)?;
                    self.refused = true;
                }
                other => other?,
            }
        }
        if self.refused {
            file.write_all_at(bytes, self.pos)?;
        }
        self.pos += bytes.len() as u64;
        Ok(())
    }
}

impl Direct {
    /// Turn `O_DIRECT` on for `file`, a new, empty file open for writing;
    /// `None` (the file stays buffered) when its filesystem refuses it.
    pub fn enable(file: &File) -> Option<Direct> {
        let bounce = Aligned::new(BOUNCE)?;
        set_direct(file, true).ok()?;
        Some(Direct { bounce, filled: 0, at: At { pos: 0, refused: false }, in_place: 0 })
    }

    /// Whether the filesystem refused a direct write (the rest of the file
    /// was then written buffered).
    pub fn refused(&self) -> bool {
        self.at.refused
    }

    /// Take bytes from `buf`: returns how many (at least one when `buf` is
    /// not empty).
    ///
    /// # Errors
    /// As the write.
    pub fn write(&mut self, file: &File, buf: &[u8]) -> io::Result<usize> {
        if self.at.refused {
            self.at.put(file, buf)?;
            return Ok(buf.len());
        }
        let at = self.filled % BLOCK;
        // Whether `buf` starts at the same offset within a block in memory
        // as in the file.
        let placed = (buf.as_ptr() as usize) % BLOCK == at;
        if placed && buf.len() >= DIRECT_RUN + BLOCK {
            // Complete the block under way from `buf`, write what waits, then
            // the whole blocks of `buf` from where they are.
            let head = (BLOCK - at) % BLOCK;
            self.gather(&buf[..head]);
            self.drain(file)?;
            let run = (buf.len() - head) / BLOCK * BLOCK;
            self.at.put(file, &buf[head..head + run])?;
            if !self.at.refused {
                self.in_place += run as u64;
            }
            return Ok(head + run);
        }
        let n = buf.len().min(BOUNCE - self.filled);
        self.gather(&buf[..n]);
        if self.filled == BOUNCE {
            self.drain(file)?;
        }
        Ok(n)
    }

    fn gather(&mut self, bytes: &[u8]) {
        let filled = self.filled;
        self.bounce.bytes_mut()[filled..filled + bytes.len()].copy_from_slice(bytes);
        self.filled += bytes.len();
    }

    /// Write the whole blocks waiting in the bounce buffer and keep the
    /// partial one, moved to the buffer's start; once the filesystem has
    /// refused a direct write, write them all.
    fn drain(&mut self, file: &File) -> io::Result<()> {
        let whole = self.filled / BLOCK * BLOCK;
        self.at.put(file, &self.bounce.bytes()[..whole])?;
        if self.at.refused {
            self.at.put(file, &self.bounce.bytes()[whole..self.filled])?;
            self.filled = 0;
            return Ok(());
        }
        self.bounce.bytes_mut().copy_within(whole..self.filled, 0);
        self.filled -= whole;
        Ok(())
    }

    /// The end of the file, `len` bytes long: its last, partial block
    /// written whole (zeros after the data), then the file cut to `len`.
    ///
    /// # Errors
    /// As the write and the truncation.
    pub fn finish(&mut self, file: &File, len: u64) -> io::Result<()> {
        self.drain(file)?;
        if self.filled > 0 {
            let (filled, padded) = (self.filled, self.filled.next_multiple_of(BLOCK));
            self.bounce.bytes_mut()[filled..padded].fill(0);
            self.filled = 0;
            self.at.put(file, &self.bounce.bytes()[..padded])?;
        }
        file.set_len(len)
    }
}

/// Set or clear `O_DIRECT` on an open file.
///
/// # Errors
/// `EINVAL` when its filesystem does not support it.
pub(crate) fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Bytes at a chosen offset within a block.
    fn placed(data: &[u8], at: usize) -> (Vec<u8>, usize) {
        let mut v = vec![0u8; data.len() + 2 * BLOCK];
        let start = (BLOCK + at - (v.as_ptr() as usize) % BLOCK) % BLOCK;
        v[start..start + data.len()].copy_from_slice(data);
        (v, start)
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn placed_runs_go_in_place_and_the_rest_through_the_bounce() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let Some(mut d) = Direct::enable(&file) else {
            eprintln!("skipped: {} refuses O_DIRECT", dir.path().display());
            return;
        };
        let header = pattern(1000, 1);
        let big = pattern(3 << 20, 2);
        let odd = pattern(1 << 20, 3);
        // `big` placed where it lands in the file (offset 1000), `odd` not.
        let (big_buf, b) = placed(&big, 1000);
        let (odd_buf, o) = placed(&odd, (1000 + big.len() + 17) % BLOCK);
        let mut expected = Vec::new();
        for part in [&header[..], &big_buf[b..b + big.len()], &odd_buf[o..o + odd.len()]] {
            let mut rest = part;
            while !rest.is_empty() {
                let n = d.write(&file, rest).unwrap();
                rest = &rest[n..];
            }
            expected.extend_from_slice(part);
        }
        d.finish(&file, expected.len() as u64).unwrap();
        drop(file);
        let mut got = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut got).unwrap();
        assert!(got == expected, "the file holds exactly the bytes written");
        assert_eq!(d.in_place, ((big.len() - (BLOCK - 1000)) / BLOCK * BLOCK) as u64, "big's whole blocks went in place");
    }

    #[test]
    fn a_file_shorter_than_a_block_and_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 1, BLOCK - 1, BLOCK, BLOCK + 1] {
            let path = dir.path().join(format!("f{len}"));
            let file = File::create(&path).unwrap();
            let Some(mut d) = Direct::enable(&file) else { return };
            let data = pattern(len, 9);
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = d.write(&file, rest).unwrap();
                rest = &rest[n..];
            }
            d.finish(&file, len as u64).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "{len}");
        }
    }

    #[test]
    fn after_a_refused_direct_write_the_rest_is_written_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let Some(mut d) = Direct::enable(&file) else { return };
        let (first, second) = (pattern(BOUNCE + 5000, 4), pattern(3 << 20, 5));
        let mut rest = &first[..];
        while !rest.is_empty() {
            let n = d.write(&file, rest).unwrap();
            rest = &rest[n..];
        }
        // As `put` does on EINVAL: the flag off, the rest buffered.
        set_direct(&file, false).unwrap();
        d.at.refused = true;
        d.drain(&file).unwrap();
        assert_eq!(d.write(&file, &second).unwrap(), second.len());
        d.finish(&file, (first.len() + second.len()) as u64).unwrap();
        assert!(d.refused());
        let want: Vec<u8> = first.iter().chain(&second).copied().collect();
        assert!(std::fs::read(&path).unwrap() == want);
    }
}
