//! The checksums modelio computes: the CRC-32C of every tensor, object and
//! manifest, and the zip CRC-32 of every archive entry. Both run on the
//! carry-less multiply instructions of the CPU (`crc-fast`), which on the
//! machines measured here checksum about twice as fast as the `crc32c` and
//! `crc32fast` crates: every GiB saved passes through them at least once.

use crc_fast::{CrcAlgorithm, Digest};

/// Both checksums run over pieces of this size, one after the other, so
/// the second reads each piece from the CPU's cache.
const PIECE: usize = 256 << 10;

/// CRC-32C (Castagnoli) of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c_append(0, bytes)
}

/// The CRC-32C of the bytes whose CRC-32C is `crc`, followed by `bytes`.
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    // The digest's state is the CRC before its final inversion.
    let mut d = Digest::new_with_init_state(CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    d.update(bytes);
    d.finalize() as u32
}

/// The CRC-32C and the zip CRC-32 of `bytes`, both computed chunk by chunk
/// while each chunk is in cache (one pass over memory instead of two).
pub fn both(bytes: &[u8]) -> (u32, u32) {
    let mut sums = Both::new();
    sums.update(bytes);
    sums.finalize()
}

/// Both checksums of a stream of bytes, fed piece by piece (each piece
/// passes through both while it is in cache).
pub struct Both {
    crc32c: Digest,
    zip: Digest,
}

impl Both {
    pub fn new() -> Both {
        Both { crc32c: Digest::new(CrcAlgorithm::Crc32Iscsi), zip: Digest::new(CrcAlgorithm::Crc32IsoHdlc) }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(PIECE) {
            self.crc32c.update(chunk);
            self.zip.update(chunk);
        }
    }

    /// (CRC-32C, zip CRC-32) of everything fed.
    pub fn finalize(&self) -> (u32, u32) {
        (self.crc32c.finalize() as u32, self.zip.finalize() as u32)
    }
}

impl Default for Both {
    fn default() -> Both {
        Both::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksums_are_the_standard_ones() {
        let data: Vec<u8> = (0..600_000u32).map(|i| (i * 31 % 251) as u8).collect();
        for len in [0, 1, 7, 64, 4095, 262_144, 262_145, data.len()] {
            let d = &data[..len];
            assert_eq!(crc32c(d), crc32c::crc32c(d), "{len}");
            assert_eq!(both(d), (crc32c::crc32c(d), crc32fast::hash(d)), "{len}");
            let (a, b) = d.split_at(len / 3);
            assert_eq!(crc32c_append(crc32c(a), b), crc32c::crc32c(d), "{len}");
            let mut fed = Both::new();
            fed.update(a);
            fed.update(b);
            assert_eq!(fed.finalize(), both(d), "{len}, fed in two pieces");
        }
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }
}
