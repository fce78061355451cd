//! Reading committed steps: listing, the newest, and any piece of a tensor
//! reassembled from the pieces stored, each checked.

use super::records::inconsistency;
use super::{GlobalManifest, Piece, Shared, Want};
use crate::archive::format::DType;
use crate::archive::ArchiveReader;
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

    /// The dtype, shape and bytes of `want` in step `m`.
    pub(super) async fn read_want(&self, m: &GlobalManifest, want: &Want) -> Result<(DType, Vec<usize>, Vec<u8>)> {
        let pieces = m.pieces(&want.name);
        let missing = |found: String| Error::Mismatch {
            path: std::path::PathBuf::from(self.layout.manifest(m.iterations).as_ref()),
            tensor: want.name.clone(),
            expected: match want.rows {
                Some((a, b)) => format!("rows {a}..{b}"),
                None => "the whole tensor".into(),
            },
            found,
        };
        let Some((_, first)) = pieces.first() else { return Err(missing("no such tensor".into())) };
        if let Some(problem) = inconsistency(&m.shards) {
            return Err(Error::ShardInconsistent { iterations: m.iterations, detail: problem });
        }
        let dtype = DType::from_name(&first.dtype).ok_or_else(|| missing(format!("dtype {}", first.dtype)))?;
        let global = first.global_shape.clone();
        let global_rows = global.first().copied().unwrap_or(1);
        let (start, end) = match want.rows {
            None => (0, global_rows),
            Some((a, b)) if a <= b && b <= global_rows && !global.is_empty() => (a, b),
            Some(_) => return Err(missing(format!("{global_rows} rows"))),
        };
        let row_bytes = global.iter().skip(1).product::<usize>() * dtype.size();
        let mut out_shape = global.clone();
        if let Some(r) = out_shape.first_mut() {
            *r = end - start;
        }
        let mut out = vec![0u8; if global.is_empty() { dtype.size() } else { (end - start) * row_bytes }];
        let mut covered = vec![false; end - start];
        for (key, p) in pieces {
            if p.global_shape != global {
                return Err(missing(format!("pieces with global shapes {:?} and {:?}", p.global_shape, global)));
            }
            let rows = p.shape.first().copied().unwrap_or(1);
            let (lo, hi) = (p.row_offset.max(start), (p.row_offset + rows).min(end));
            if global.is_empty() {
                out = self.read_piece(m, key, p).await?;
                covered.iter_mut().for_each(|c| *c = true);
                break;
            }
            // Rows another piece already gave (a tensor several ranks hold
            // whole) are not read again.
            if lo >= hi || covered[lo - start..hi - start].iter().all(|&c| c) {
                continue;
            }
            let data = self.read_piece(m, key, p).await?;
            let src = (lo - p.row_offset) * row_bytes..(hi - p.row_offset) * row_bytes;
            let dst = (lo - start) * row_bytes..(hi - start) * row_bytes;
            match (data.get(src), out.get_mut(dst)) {
                (Some(s), Some(d)) => d.copy_from_slice(s),
                _ => return Err(missing("a piece shorter than its shape".into())),
            }
            covered[lo - start..hi - start].iter_mut().for_each(|c| *c = true);
        }
        if let Some(row) = covered.iter().position(|c| !c) {
            return Err(missing(format!("no piece holds row {}", start + row)));
        }
        Ok((dtype, out_shape, out))
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

    pub(super) async fn verify(&self, m: &GlobalManifest) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for d in &m.shards {
            let k = self.objects.stored_key(&d.key)?;
            let Some((bytes, _)) = self.objects.get_raw(&k).await? else {
                problems.push(format!("rank {}: shard {} is missing", d.rank, d.key));
                continue;
            };
            if bytes.len() as u64 != d.size || crc32c::crc32c(&bytes) != d.crc32c {
                problems.push(format!("rank {}: shard {} differs from its done-record (size or CRC-32C)", d.rank, d.key));
                continue;
            }
            match ArchiveReader::from_bytes(std::path::Path::new(&d.key), bytes) {
                Ok(r) => problems.extend(r.verify().into_iter().map(|p| format!("rank {}: {p}", d.rank))),
                Err(e) => problems.push(format!("rank {}: {}", d.rank, e.report())),
            }
        }
        if let Some(problem) = inconsistency(&m.shards) {
            problems.push(problem);
            return Ok(problems);
        }
        // Every tensor is whole: its pieces cover every row.
        for name in m.tensor_names() {
            let pieces = m.pieces(&name);
            let rows = pieces.first().and_then(|(_, p)| p.global_shape.first().copied()).unwrap_or(1);
            let mut count = vec![0usize; rows];
            for (_, p) in &pieces {
                let n = p.shape.first().copied().unwrap_or(1);
                for c in count.iter_mut().skip(p.row_offset).take(n) {
                    *c += 1;
                }
            }
            if count.contains(&0) {
                problems.push(format!("tensor `{name}`: some rows are in no shard"));
            }
        }
        Ok(problems)
    }
}
