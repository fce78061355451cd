//! Reading a committed file part by part for its upload: around the page
//! cache where the filesystem allows (`O_DIRECT`), into block-aligned
//! buffers that the upload reuses part after part.
//!
//! Measured here, a buffered read of a file the page cache no longer holds
//! (a commit writes around it) cost about 2 s of system CPU per GiB, and a
//! fresh buffer per part a page fault per 4 KiB; a direct read into a
//! reused buffer costs a tenth of that.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::background::lock;
use crate::error::{Error, IoContext, Result, Work};
use crate::folder::direct::{set_direct, Aligned, BLOCK};

/// A file being read for its upload, with the buffers of its parts.
pub(crate) struct PartReader {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    /// Reads go around the page cache (until the filesystem refuses one).
    direct: Arc<AtomicBool>,
    free: FreeBuffers,
}

/// Buffers of parts uploaded and dropped, to read the next parts into.
pub(crate) type FreeBuffers = Arc<Mutex<Vec<Aligned>>>;

impl PartReader {
    /// Open the regular file at `path`, reading its parts into buffers
    /// taken from `free`, where they go back once uploaded.
    ///
    /// # Errors
    /// As [`crate::folder::durable::open_regular`].
    pub fn open(path: &Path, free: &FreeBuffers) -> Result<PartReader> {
        let file = crate::folder::durable::open_regular(path)?;
        let size = file.metadata().at("inspect", path)?.len();
        let direct = set_direct(&file, true).is_ok();
        Ok(PartReader {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            direct: Arc::new(AtomicBool::new(direct)),
            free: free.clone(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The `len` bytes at `offset`, read on a blocking thread.
    ///
    /// # Errors
    /// [`Error::Io`] when the read fails or the file is shorter.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let (file, path, direct, free) = (self.file.clone(), self.path.clone(), self.direct.clone(), self.free.clone());
        tokio::task::spawn_blocking(move || {
            let reused = {
                let mut free = lock(&free);
                free.iter().position(|b| b.bytes().len() >= len).map(|i| free.swap_remove(i))
            };
            let buf = reused.or_else(|| Aligned::new(len));
            let Some(mut buf) = buf else {
                // No aligned memory: an ordinary buffer and read.
                let mut v = vec![0u8; len];
                return file.read_exact_at(&mut v, offset).at("read", &path).map(|()| Bytes::from(v));
            };
            read_into(&file, &direct, offset, &mut buf.bytes_mut()[..len.next_multiple_of(BLOCK)], len).at("read", &path)?;
            Ok(Bytes::from_owner(Part { buf: Some(buf), len, free }))
        })
        .await
        .map_err(|e| Error::Internal { what: Work::Upload, message: e.to_string() })?
    }
}

/// Read `len` bytes at `offset` into `buf` (whole blocks long, at least
/// `len`): directly while `direct` holds, buffered once the filesystem has
/// refused a direct read (or after a short one left the next read unaligned).
fn read_into(file: &File, direct: &AtomicBool, offset: u64, buf: &mut [u8], len: usize) -> std::io::Result<()> {
    let mut got = 0usize;
    while got < len {
        let aligned = got.is_multiple_of(BLOCK) && offset.is_multiple_of(BLOCK as u64);
        if direct.load(Ordering::Relaxed) && !aligned {
            // A direct read needs a block-aligned offset: go on buffered.
            set_direct(file, false)?;
            direct.store(false, Ordering::Relaxed);
        }
        // A direct read asks for whole blocks; the file may end before them.
        let want = if direct.load(Ordering::Relaxed) { &mut buf[got..] } else { &mut buf[got..len] };
        match file.read_at(want, offset + got as u64) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && direct.load(Ordering::Relaxed) => {
                set_direct(file, false)?;
                direct.store(false, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A part's bytes, whose buffer goes back to its reader once the upload
/// has dropped them.
struct Part {
    buf: Option<Aligned>,
    len: usize,
    free: FreeBuffers,
}

impl AsRef<[u8]> for Part {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b.bytes()[..self.len])
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            lock(&self.free).push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parts_read_back_exactly_and_their_buffers_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(3 << 20) + 123).map(|i: u32| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let r = PartReader::open(&path, &FreeBuffers::default()).unwrap();
        assert_eq!(r.size(), data.len() as u64);
        let part = 1 << 20;
        for round in 0..2 {
            let mut offset = 0;
            while offset < data.len() {
                let len = part.min(data.len() - offset);
                let bytes = r.read(offset as u64, len).await.unwrap();
                assert!(bytes[..] == data[offset..offset + len], "round {round} at {offset}");
                offset += len;
            }
        }
        assert_eq!(lock(&r.free).len(), 1, "one buffer, reused by every part");
        // Unaligned reads go on buffered, and still read right.
        let bytes = r.read(5, 1000).await.unwrap();
        assert!(bytes[..] == data[5..1005]);
        assert!(r.read(data.len() as u64 - 10, 20).await.is_err(), "past the end");
    }
}
