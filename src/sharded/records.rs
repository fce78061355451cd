//! What a sharded step is made of, as stored: each rank's done-record (its
//! shard's key, size, CRC-32C and the pieces in it) and the global manifest
//! that commits a step; and the check that a step's pieces fit together.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::archive::format::DType;

/// Format of done-records and global manifests.
pub const SHARDED_FORMAT: u32 = 1;

/// One stored tensor of a shard: a whole tensor, or rows of one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// The tensor's global name.
    pub name: String,
    pub dtype: String,
    /// The whole tensor's shape.
    pub global_shape: Vec<usize>,
    /// First row (of the first dimension) this piece holds; 0 for a whole tensor.
    pub row_offset: usize,
    /// The piece's own shape (the global shape with fewer rows for a slice).
    pub shape: Vec<usize>,
    /// Where its bytes are in the shard archive, and their CRC-32C.
    pub data_offset: u64,
    pub data_len: u64,
    pub crc32c: u32,
}

/// A rank's record that its shard is durable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneRecord {
    pub format: u32,
    /// The run that wrote it (`shard.run_id`, or the launcher's job id):
    /// a coordinator commits only its own run's records.
    #[serde(default)]
    pub run: String,
    pub rank: usize,
    pub world_size: usize,
    pub iterations: u64,
    /// The shard archive's key, size and CRC-32C.
    pub key: String,
    pub size: u64,
    pub crc32c: u32,
    pub pieces: Vec<Piece>,
}

/// The global manifest of one step: every shard and which piece lives where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalManifest {
    pub format: u32,
    pub model: String,
    pub iterations: u64,
    pub world_size: usize,
    pub created: String,
    /// The done-records of every rank, by rank.
    pub shards: Vec<DoneRecord>,
    /// The loss the coordinator reported with this step, if any.
    #[serde(default)]
    pub loss: Option<f64>,
    /// The lowest reported loss up to this step (0 before the first): what
    /// the backup rule compares the next loss with.
    #[serde(default)]
    pub lowest: f64,
}

impl GlobalManifest {
    /// Every piece of tensor `name`, with its shard's key.
    pub(super) fn pieces(&self, name: &str) -> Vec<(&str, &Piece)> {
        self.shards.iter().flat_map(|s| s.pieces.iter().filter(|p| p.name == name).map(move |p| (s.key.as_str(), p))).collect()
    }

    /// The names of every tensor, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shards.iter().flat_map(|s| s.pieces.iter().map(|p| p.name.clone())).collect();
        names.sort();
        names.dedup();
        names
    }
}

/// What makes the pieces of a step unusable, if anything: for each tensor,
/// one dtype and global shape, each piece's shape the global one with its
/// own rows, inside the global rows, and as many bytes as its shape needs.
pub(super) fn inconsistency(shards: &[DoneRecord]) -> Option<String> {
    let mut seen: BTreeMap<&str, (&str, &[usize])> = BTreeMap::new();
    for d in shards {
        for p in &d.pieces {
            let (dtype, global) = *seen.entry(&p.name).or_insert((&p.dtype, &p.global_shape));
            let what = |detail: String| Some(format!("tensor `{}` (rank {}): {detail}", p.name, d.rank));
            if p.dtype != dtype || p.global_shape != global {
                return what(format!("{} {:?} here, {dtype} {global:?} elsewhere", p.dtype, p.global_shape));
            }
            let Some(size) = DType::from_name(&p.dtype).map(DType::size) else { return what(format!("unknown dtype {}", p.dtype)) };
            let expected = if global.is_empty() {
                (p.shape.is_empty() && p.row_offset == 0).then_some(size as u64)
            } else {
                let rows = p.shape.first().copied().unwrap_or(0);
                let fits = p.shape.len() == global.len()
                    && p.shape[1..] == global[1..]
                    && p.row_offset.checked_add(rows).is_some_and(|e| e <= global[0]);
                fits.then(|| p.shape.iter().try_fold(size as u64, |n, &d| n.checked_mul(d as u64))).flatten()
            };
            match expected {
                Some(len) if len == p.data_len => {}
                _ => {
                    return what(format!(
                        "shape {:?} at row {} of {global:?} with {} bytes does not fit",
                        p.shape, p.row_offset, p.data_len
                    ))
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_found_by_tensor_name_across_shards() {
        let piece = |rank: usize, row_offset: usize, rows: usize| DoneRecord {
            format: SHARDED_FORMAT,
            run: String::new(),
            rank,
            world_size: 2,
            iterations: 1,
            key: format!("k{rank}"),
            size: 0,
            crc32c: 0,
            pieces: vec![Piece {
                name: "w".into(),
                dtype: "F32".into(),
                global_shape: vec![4, 2],
                row_offset,
                shape: vec![rows, 2],
                data_offset: 0,
                data_len: 0,
                crc32c: 0,
            }],
        };
        let m = GlobalManifest {
            format: SHARDED_FORMAT,
            model: "m".into(),
            iterations: 1,
            world_size: 2,
            created: String::new(),
            shards: vec![piece(0, 0, 2), piece(1, 2, 2)],
            loss: None,
            lowest: 0.0,
        };
        assert_eq!(m.tensor_names(), vec!["w".to_string()]);
        assert_eq!(m.pieces("w").len(), 2);
        // Sizes: each piece of 2 rows x 2 F32 must hold 16 bytes.
        let mut shards = m.shards.clone();
        assert!(inconsistency(&shards).unwrap().contains("does not fit"));
        for d in &mut shards {
            d.pieces[0].data_len = 16;
        }
        assert_eq!(inconsistency(&shards), None);
        shards[1].pieces[0].row_offset = 3;
        assert!(inconsistency(&shards).unwrap().contains("rank 1"), "rows past the global shape");
        shards[1].pieces[0].row_offset = 2;
        shards[1].pieces[0].global_shape = vec![4, 3];
        assert!(inconsistency(&shards).unwrap().contains("elsewhere"));
    }
}
