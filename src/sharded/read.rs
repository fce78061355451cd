//! Reading committed steps: listing, the newest, and any piece of a tensor
//! reassembled from the pieces stored, each checked.

use super::boxes::{copy_overlap, subtract, Region, MAX_LEFT};
use super::records::inconsistency;
use super::{GlobalManifest, Piece, Shared, Want};
use crate::archive::format::DType;
use crate::error::{Error, Result};

impl Shared {
    pub(super) async fn list(&self) -> Result<Vec<GlobalManifest>> {
        let keys = self.objects.list_keys(&self.layout.manifests()).await?;
        let mut out = Vec::new();
        for key in keys {
            match self.objects.get_json::<GlobalManifest>(&key).await {
                Ok(Some((m, _))) => out.push(m),
                Ok(None) => {}
                // One unreadable manifest does not hide the others.
                Err(e @ Error::RemoteDamaged { .. }) => tracing::warn!(target: "modelio", "skipping {key}: {}", e.report()),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The newest manifest by its key (`LATEST` is for other readers; a
    /// listing of manifest keys is as cheap and never stale).
    pub(super) async fn latest(&self) -> Result<Option<GlobalManifest>> {
        match self.objects.list_keys(&self.layout.manifests()).await?.pop() {
            None => Ok(None),
            Some(key) => match self.objects.get_json::<GlobalManifest>(&key).await {
                Ok(Some((m, _))) => Ok(Some(m)),
                // Deleted since the listing, or unreadable: the newest readable one.
                Ok(None) | Err(Error::RemoteDamaged { .. }) => Ok(self.list().await?.pop()),
                Err(e) => Err(e),
            },
        }
    }

    /// The dtype, shape and bytes of `want` in step `m`: each stored box
    /// that holds some of it not yet read is read once (a tensor several
    /// ranks hold whole is read from one) and its overlap copied.
    pub(super) async fn read_want<S: Sink>(&self, m: &GlobalManifest, want: &Want) -> Result<S> {
        let pieces = m.pieces(&want.name);
        let missing = |found: String| Error::Mismatch {
            path: std::path::PathBuf::from(self.layout.manifest(m.iterations).as_ref()),
            tensor: want.name.clone(),
            expected: want.describe(),
            found,
        };
        let Some((_, first)) = pieces.first() else { return Err(missing("no such tensor".into())) };
        if let Some(problem) = inconsistency(&m.shards) {
            return Err(Error::ShardInconsistent { iterations: m.iterations, detail: problem });
        }
        let dtype = DType::from_name(&first.dtype).ok_or_else(|| missing(format!("dtype {}", first.dtype)))?;
        let global = first.global_shape.clone();
        let Some(wanted) = want.region(&global) else { return Err(missing(format!("a tensor of shape {global:?}"))) };
        let len = usize::try_from(wanted.volume()).ok().and_then(|n| n.checked_mul(dtype.size()));
        let Some(len) = len else { return Err(missing(format!("a tensor of shape {global:?}"))) };
        // A piece that is exactly the box wanted is the answer as read.
        if let Some((key, p)) = pieces.iter().find(|(_, p)| p.region() == wanted && p.data_len == len as u64) {
            let data = self.read_piece(m, key, p).await?;
            return S::of_piece(dtype, wanted.shape, data);
        }
        // Each overlap is copied straight into where it goes.
        let mut out = S::make(dtype, &wanted.shape, len)?;
        // An empty box is whole already.
        let mut left = if wanted.is_empty() { Vec::new() } else { vec![wanted.clone()] };
        for (key, p) in pieces {
            let stored = p.region();
            if !left.iter().any(|l| l.intersect(&stored).is_some()) {
                continue;
            }
            let data = self.read_piece(m, key, p).await?;
            if !copy_overlap(dtype.size(), &stored, &data, &wanted, out.bytes()) {
                return Err(missing("a piece shorter than its shape".into()));
            }
            left = subtract(&left, &stored);
            if left.len() > MAX_LEFT {
                return Err(missing(format!("pieces cut into more than {MAX_LEFT} boxes")));
            }
        }
        if let Some(gap) = left.iter().min_by_key(|l| l.offset.clone()) {
            let row_wide = gap.shape.get(1..) == wanted.shape.get(1..) && !gap.shape.is_empty();
            return Err(missing(match row_wide {
                true => format!("no piece holds row {}", gap.offset[0]),
                false => format!("no piece holds the box at {:?} of shape {:?}", gap.offset, gap.shape),
            }));
        }
        Ok(out)
    }

    /// One piece's bytes, by a ranged read of its shard, checked.
    pub(super) async fn read_piece(&self, m: &GlobalManifest, key: &str, p: &Piece) -> Result<bytes::Bytes> {
        let k = self.objects.stored_key(key)?;
        let bytes = match p.data_offset.checked_add(p.data_len) {
            _ if p.data_len == 0 => bytes::Bytes::new(),
            Some(end) => self.objects.get_range(&k, p.data_offset..end).await?,
            None => bytes::Bytes::new(),
        };
        if bytes.len() as u64 != p.data_len || crate::crc::crc32c(&bytes) != p.crc32c {
            let detail = format!("its bytes in {key} fail their CRC-32C");
            return Err(self.objects.damaged(format!("sharded step {}", m.iterations), &format!("tensor `{}`", p.name), detail));
        }
        Ok(bytes)
    }

    /// Every shard of step `m` streamed once (memory: one chunk, whatever
    /// its size) against its done-record's size and CRC-32C, each piece's
    /// bytes against its CRC-32C on the way; its own manifest (by ranged
    /// reads) against the record's pieces; then the pieces against each other.
    pub(super) async fn verify(&self, m: &GlobalManifest) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for d in &m.shards {
            let k = self.objects.stored_key(&d.key)?;
            let mut sums = PieceSums::new(&d.pieces);
            let Some((size, crc)) = self
                .objects
                .stream(&k, &mut |chunk| {
                    sums.feed(chunk);
                    Ok(())
                })
                .await?
            else {
                problems.push(format!("rank {}: shard {} is missing", d.rank, d.key));
                continue;
            };
            if size != d.size || crc != d.crc32c {
                problems.push(format!("rank {}: shard {} differs from its done-record (size or CRC-32C)", d.rank, d.key));
                continue;
            }
            if let Some(p) = sums.failed(&d.pieces) {
                problems.push(format!("rank {}: tensor `{}`: its bytes in {} fail their CRC-32C", d.rank, p.name, d.key));
                continue;
            }
            let own = match self.objects.archive_manifest(&k, size).await {
                Ok(own) => own,
                Err(e @ Error::RemoteDamaged { .. }) => {
                    problems.push(format!("rank {}: {}", d.rank, e.report()));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let listed = |p: &Piece| {
                own.model.iter().any(|t| t.name == p.name && t.dtype.name() == p.dtype && t.shape == p.shape && t.crc32c == p.crc32c)
            };
            if own.model.len() != d.pieces.len() || !d.pieces.iter().all(listed) {
                problems.push(format!("rank {}: shard {}'s own manifest differs from its done-record's pieces", d.rank, d.key));
            }
        }
        if let Some(problem) = inconsistency(&m.shards) {
            problems.push(problem);
            return Ok(problems);
        }
        // Every tensor is whole: its pieces cover every element.
        for name in m.tensor_names() {
            let pieces = m.pieces(&name);
            let Some((_, first)) = pieces.first() else { continue };
            let whole = Region::whole(&first.global_shape);
            let mut left = if whole.is_empty() { Vec::new() } else { vec![whole] };
            for (_, p) in &pieces {
                left = subtract(&left, &p.region());
                if left.len() > MAX_LEFT {
                    break;
                }
            }
            if left.len() > MAX_LEFT {
                problems.push(format!("tensor `{name}`: its pieces are cut into more than {MAX_LEFT} boxes"));
                continue;
            }
            if let Some(gap) = left.iter().min_by_key(|g| g.offset.clone()) {
                problems.push(match gap.shape.get(1..) == first.global_shape.get(1..) && !gap.shape.is_empty() {
                    true => format!("tensor `{name}`: some rows are in no shard, from row {}", gap.offset[0]),
                    false => format!("tensor `{name}`: the box at {:?} of shape {:?} is in no shard", gap.offset, gap.shape),
                });
            }
        }
        Ok(problems)
    }
}

/// The CRC-32C of each piece of a shard, computed as the shard streams by.
struct PieceSums {
    /// `(start, end, index into the pieces)`, by start.
    spans: Vec<(u64, u64, usize)>,
    sums: Vec<u32>,
    /// Where the next chunk starts in the shard.
    at: u64,
    /// The first span not yet over.
    from: usize,
}

impl PieceSums {
    fn new(pieces: &[Piece]) -> PieceSums {
        let mut spans: Vec<(u64, u64, usize)> =
            pieces.iter().enumerate().map(|(i, p)| (p.data_offset, p.data_offset.saturating_add(p.data_len), i)).collect();
        spans.sort_unstable();
        PieceSums { spans, sums: vec![0; pieces.len()], at: 0, from: 0 }
    }

    fn feed(&mut self, chunk: &[u8]) {
        let (lo, hi) = (self.at, self.at + chunk.len() as u64);
        // Spans at the front that ended before this chunk are done for good.
        while self.spans.get(self.from).is_some_and(|&(_, end, _)| end <= lo) {
            self.from += 1;
        }
        for &(start, end, i) in self.spans[self.from..].iter().take_while(|&&(start, _, _)| start < hi) {
            let (a, b) = (start.max(lo) - lo, end.min(hi).saturating_sub(lo));
            if a < b {
                self.sums[i] = crate::crc::crc32c_append(self.sums[i], &chunk[a as usize..b as usize]);
            }
        }
        self.at = hi;
    }

    /// The first piece whose bytes (all of them there) differ from its CRC-32C.
    fn failed<'p>(&self, pieces: &'p [Piece]) -> Option<&'p Piece> {
        pieces
            .iter()
            .zip(&self.sums)
            .find(|(p, &sum)| p.data_offset.saturating_add(p.data_len) > self.at || sum != p.crc32c)
            .map(|(p, _)| p)
    }
}

/// Where a wanted box's bytes go: made once its dtype and shape are known,
/// then filled in place by the overlaps of the pieces read.
pub(super) trait Sink: Sized + Send {
    /// An output of `len` bytes for a box of `dtype` and `shape`.
    fn make(dtype: DType, shape: &[usize], len: usize) -> Result<Self>;
    /// Its bytes, to fill.
    fn bytes(&mut self) -> &mut [u8];
    /// The output when one piece is exactly the box wanted.
    fn of_piece(dtype: DType, shape: Vec<usize>, data: bytes::Bytes) -> Result<Self> {
        let mut out = Self::make(dtype, &shape, data.len())?;
        let dst = out.bytes();
        if dst.len() == data.len() {
            dst.copy_from_slice(&data);
        }
        Ok(out)
    }
}

/// The dtype, shape and bytes of a box, for readers without libtorch.
impl Sink for (DType, Vec<usize>, Vec<u8>) {
    fn make(dtype: DType, shape: &[usize], len: usize) -> Result<Self> {
        Ok((dtype, shape.to_vec(), vec![0u8; len]))
    }
    fn bytes(&mut self) -> &mut [u8] {
        &mut self.2
    }
    fn of_piece(dtype: DType, shape: Vec<usize>, data: bytes::Bytes) -> Result<Self> {
        // The bytes as read, without a copy when nothing else holds them.
        Ok((dtype, shape, Vec::from(data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_sums_follow_the_pieces_across_chunks() {
        let shard: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let piece = |offset: u64, len: u64| Piece {
            name: format!("t{offset}"),
            dtype: "U8".into(),
            global_shape: vec![len as usize],
            offset: vec![0],
            row_offset: 0,
            shape: vec![len as usize],
            data_offset: offset,
            data_len: len,
            crc32c: crate::crc::crc32c(&shard[offset as usize..(offset + len) as usize]),
        };
        // Out of order, one empty, one spanning many chunks, one at the very end.
        let pieces = [piece(600, 400), piece(10, 5), piece(300, 0), piece(20, 333)];
        for chunk in [1, 7, 64, 1000] {
            let mut sums = PieceSums::new(&pieces);
            shard.chunks(chunk).for_each(|c| sums.feed(c));
            assert!(sums.failed(&pieces).is_none(), "chunks of {chunk}");
        }
        let mut bad = pieces.clone();
        bad[3].crc32c ^= 1;
        let mut sums = PieceSums::new(&bad);
        sums.feed(&shard);
        assert_eq!(sums.failed(&bad).map(|p| p.name.as_str()), Some("t20"));
        // A piece past the shard's end fails.
        let past = [piece(900, 100), Piece { data_offset: 950, ..piece(900, 100) }];
        let mut sums = PieceSums::new(&past);
        sums.feed(&shard);
        assert_eq!(sums.failed(&past).map(|p| p.data_offset), Some(950));
    }
}
