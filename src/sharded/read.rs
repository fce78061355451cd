//! Reading committed steps: listing, the newest, and any piece of a tensor
//! reassembled from the pieces stored, each checked.

use super::boxes::{copy_overlap, subtract, Region};
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
    pub(super) async fn read_want(&self, m: &GlobalManifest, want: &Want) -> Result<(DType, Vec<usize>, Vec<u8>)> {
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
        let mut out = vec![0u8; len];
        let mut left = vec![wanted.clone()];
        for (key, p) in pieces {
            let stored = p.region();
            if !left.iter().any(|l| l.intersect(&stored).is_some()) {
                continue;
            }
            let data = self.read_piece(m, key, p).await?;
            if !copy_overlap(dtype.size(), &stored, &data, &wanted, &mut out) {
                return Err(missing("a piece shorter than its shape".into()));
            }
            left = subtract(&left, &stored);
        }
        if let Some(gap) = left.iter().min_by_key(|l| l.offset.clone()) {
            let row_wide = gap.shape.get(1..) == wanted.shape.get(1..) && !gap.shape.is_empty();
            return Err(missing(match row_wide {
                true => format!("no piece holds row {}", gap.offset[0]),
                false => format!("no piece holds the box at {:?} of shape {:?}", gap.offset, gap.shape),
            }));
        }
        Ok((dtype, wanted.shape, out))
    }

    /// One piece's bytes, by a ranged read of its shard, checked.
    pub(super) async fn read_piece(&self, m: &GlobalManifest, key: &str, p: &Piece) -> Result<Vec<u8>> {
        let k = self.objects.stored_key(key)?;
        let bytes = if p.data_len == 0 {
            Vec::new()
        } else {
            self.objects.get_range(&k, p.data_offset..p.data_offset + p.data_len).await?.to_vec()
        };
        if bytes.len() as u64 != p.data_len || crc32c::crc32c(&bytes) != p.crc32c {
            let detail = format!("its bytes in {key} fail their CRC-32C");
            return Err(self.objects.damaged(format!("sharded step {}", m.iterations), &format!("tensor `{}`", p.name), detail));
        }
        Ok(bytes)
    }

    /// Every shard of step `m` streamed against its done-record's size and
    /// CRC-32C, its own manifest (by ranged reads) against the record's
    /// pieces, each piece read by a ranged read against its CRC-32C, then
    /// the pieces against each other: memory bounded by the largest piece,
    /// whatever a shard's size.
    pub(super) async fn verify(&self, m: &GlobalManifest) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for d in &m.shards {
            let k = self.objects.stored_key(&d.key)?;
            let Some((size, crc)) = self.objects.stream(&k, &mut |_| Ok(())).await? else {
                problems.push(format!("rank {}: shard {} is missing", d.rank, d.key));
                continue;
            };
            if size != d.size || crc != d.crc32c {
                problems.push(format!("rank {}: shard {} differs from its done-record (size or CRC-32C)", d.rank, d.key));
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
                continue;
            }
            for p in &d.pieces {
                match self.read_piece(m, &d.key, p).await {
                    Ok(_) => {}
                    Err(e @ Error::RemoteDamaged { .. }) => problems.push(format!("rank {}: {}", d.rank, e.report())),
                    Err(e) => return Err(e),
                }
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
            let mut left = vec![Region::whole(&first.global_shape)];
            for (_, p) in &pieces {
                left = subtract(&left, &p.region());
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
