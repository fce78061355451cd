//! What a sharded step is made of, as stored: each rank's done-record (its
//! shard's key, size, CRC-32C and the pieces in it) and the global manifest
//! that commits a step; and the check that a step's pieces fit together.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::boxes::Region;
use crate::archive::format::DType;

/// Format of done-records and global manifests: 2 describes each piece as
/// a box (`offset` in every dimension); 1, read as well, as rows of the
/// first dimension (`row_offset`).
pub const SHARDED_FORMAT: u32 = 2;

/// One stored tensor of a shard: a box of a global tensor (all of it, rows
/// of it, columns of it, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// The tensor's global name.
    pub name: String,
    pub dtype: String,
    /// The whole tensor's shape.
    pub global_shape: Vec<usize>,
    /// Where the box starts in every dimension (format 2). Empty in a
    /// format 1 record, whose box is rows from `row_offset`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offset: Vec<usize>,
    /// The box's start in the first dimension (`offset[0]`, 0 for a scalar):
    /// all that format 1 recorded, still written for its readers.
    pub row_offset: usize,
    /// The piece's own shape (the box's size in every dimension).
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

impl Piece {
    /// The box of the global tensor this piece holds.
    pub fn region(&self) -> Region {
        let offset = match (self.offset.is_empty(), self.global_shape.is_empty()) {
            (false, _) | (true, true) => self.offset.clone(),
            (true, false) => {
                let mut o = vec![0; self.global_shape.len()];
                o[0] = self.row_offset;
                o
            }
        };
        Region { offset, shape: self.shape.clone() }
    }
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

/// What makes the pieces of a step unusable, if anything: records of a
/// newer format; for each tensor, one dtype and global shape; each piece a
/// box inside the global shape (a format 1 piece: rows, whole past the
/// first dimension) with as many bytes as its shape needs.
pub(super) fn inconsistency(shards: &[DoneRecord]) -> Option<String> {
    let mut seen: BTreeMap<&str, (&str, &[usize])> = BTreeMap::new();
    for d in shards {
        if d.format > SHARDED_FORMAT {
            return Some(format!(
                "rank {}'s record is of format {}, newer than this modelio reads ({SHARDED_FORMAT}): upgrade modelio",
                d.rank, d.format
            ));
        }
        for p in &d.pieces {
            let (dtype, global) = *seen.entry(&p.name).or_insert((&p.dtype, &p.global_shape));
            let what = |detail: String| Some(format!("tensor `{}` (rank {}): {detail}", p.name, d.rank));
            if p.dtype != dtype || p.global_shape != global {
                return what(format!("{} {:?} here, {dtype} {global:?} elsewhere", p.dtype, p.global_shape));
            }
            let Some(size) = DType::from_name(&p.dtype).map(DType::size) else { return what(format!("unknown dtype {}", p.dtype)) };
            if global.iter().try_fold(size as u64, |n, &d| n.checked_mul(d as u64)).is_none() {
                return what(format!("a global shape {global:?} of more bytes than a file can hold"));
            }
            let region = p.region();
            let rows_only = p.offset.is_empty() && !global.is_empty() && p.shape.get(1..) != global.get(1..);
            let agrees = p.offset.is_empty() || p.offset.first().copied().unwrap_or(0) == p.row_offset;
            let expected = (region.fits(global) && !rows_only && agrees)
                .then(|| p.shape.iter().try_fold(size as u64, |n, &d| n.checked_mul(d as u64)))
                .flatten();
            match expected {
                Some(len) if len == p.data_len => {}
                _ => {
                    return what(format!("shape {:?} at {:?} of {global:?} with {} bytes does not fit", p.shape, region.offset, p.data_len))
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
                offset: vec![],
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

    #[test]
    fn boxes_are_checked_in_every_dimension_and_rows_of_format_1_still_read() {
        let piece = |offset: Vec<usize>, row_offset: usize, shape: Vec<usize>| Piece {
            name: "w".into(),
            dtype: "F32".into(),
            global_shape: vec![4, 6],
            offset,
            row_offset,
            data_len: 4 * shape.iter().product::<usize>() as u64,
            shape,
            data_offset: 0,
            crc32c: 0,
        };
        let record = |format: u32, pieces: Vec<Piece>| DoneRecord {
            format,
            run: String::new(),
            rank: 0,
            world_size: 1,
            iterations: 1,
            key: "k".into(),
            size: 0,
            crc32c: 0,
            pieces,
        };
        // Columns 2..5 of all rows: a box.
        let cols = piece(vec![0, 2], 0, vec![4, 3]);
        assert_eq!(cols.region(), Region { offset: vec![0, 2], shape: vec![4, 3] });
        assert_eq!(inconsistency(&[record(2, vec![cols.clone()])]), None);
        let past = piece(vec![0, 4], 0, vec![4, 3]);
        assert!(inconsistency(&[record(2, vec![past])]).unwrap().contains("does not fit"), "columns past the global shape");
        let disagree = piece(vec![1, 0], 0, vec![2, 6]);
        assert!(inconsistency(&[record(2, vec![disagree])]).is_some(), "row_offset must be offset[0]");
        // Format 1: rows from row_offset, whole past the first dimension.
        let rows = piece(vec![], 2, vec![2, 6]);
        assert_eq!(rows.region(), Region { offset: vec![2, 0], shape: vec![2, 6] });
        assert_eq!(inconsistency(&[record(1, vec![rows])]), None);
        let narrow = piece(vec![], 0, vec![4, 3]);
        assert!(inconsistency(&[record(1, vec![narrow])]).is_some(), "a format 1 piece holds whole rows");
        let newer = inconsistency(&[record(SHARDED_FORMAT + 1, vec![cols])]).unwrap();
        assert!(newer.contains("newer") && newer.contains("upgrade modelio"), "{newer}");
        // A scalar's box has no dimensions.
        let scalar = Piece { global_shape: vec![], shape: vec![], data_len: 4, ..piece(vec![], 0, vec![]) };
        assert_eq!(inconsistency(&[record(2, vec![scalar])]), None);
    }
}
