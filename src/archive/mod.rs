//! Writing and reading archives (format v2, see `docs/FORMAT.md`).
//!
//! Plain functions over bytes, free of actors and libtorch. The reader maps
//! the file and hands out tensor bytes in place; it treats the file as hostile:
//! every offset and size is checked, every allocation is bounded, and every
//! problem is an [`Error::Damaged`](crate::error::Error::Damaged) naming the file and the part. The zip
//! layer is read by [`crate::archive::zipread`], as strictly as Python's `zipfile`
//! reads it or more; every entry's zip CRC-32 is checked as its bytes are read.

pub mod format;
mod reader;
mod safetensors;
mod writer;
pub mod zipread;

#[cfg(feature = "remote")]
pub(crate) use reader::parse_manifest;
pub use reader::{ArchiveReader, Located};
#[cfg(feature = "torch")]
pub(crate) use safetensors::{block_offsets, Laid};
pub use writer::{commit_archive, write_archive, write_archive_located, Span};

/// What the tests of the archive's parts share.
#[cfg(test)]
mod test_support {
    use super::format::{DType, TensorRef};

    /// A tensor to write, its checksums left for the writer to compute.
    pub(super) fn t<'a>(name: &'a str, dtype: DType, shape: &'a [usize], data: &'a [u8]) -> TensorRef<'a> {
        TensorRef { name, dtype, shape, data, crc32c: None, crc32: None }
    }
}
