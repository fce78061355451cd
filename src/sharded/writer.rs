//! The writer thread of every rank: a save's shard, then its done-record.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{lock, Commit, DoneRecord, Job, Piece, Shared, Staged, SHARDED_FORMAT};
use crate::archive::format::TensorRef;
use crate::archive::{write_archive, ArchiveReader};
use crate::error::{Error, Result};
use crate::remote::objects::to_json;

impl Shared {
    /// The writer thread: the newest waiting save, one at a time; drains before stopping.
    pub(super) fn write_loop(self: Arc<Self>) {
        loop {
            let job = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(job) = q.waiting.take() {
                        q.busy = true;
                        // A save waiting for this slot may go on.
                        self.wake.notify_all();
                        break job;
                    }
                    if q.stop {
                        return;
                    }
                    q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            let (iterations, loss) = (job.iterations, job.loss);
            let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(self.write_shard(job))))
                .unwrap_or_else(|_| Err(Error::Internal { what: "sharded save", message: "the shard writer panicked".into() }));
            match written {
                Ok(()) => {
                    self.stats.written.fetch_add(1, Ordering::Relaxed);
                    if self.rank.rank == 0 {
                        let deadline = Instant::now().checked_add(self.deadline).unwrap_or_else(Instant::now);
                        lock(&self.queue).commits.push(Commit { iterations, deadline, loss });
                    }
                }
                Err(e) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(target: "modelio", "rank {}: shard of iteration {iterations} not written: {}", self.rank.rank, e.report());
                    self.report_later(e);
                    if lock(&self.queue).snapshots.remove(&iterations) {
                        self.snapshot_not_made(iterations, "this rank's shard of it was not written");
                    }
                }
            }
            lock(&self.queue).busy = false;
            self.wake.notify_all();
        }
    }

    pub(super) async fn write_shard(&self, job: Job) -> Result<()> {
        let Job { iterations, tensors, .. } = job;
        let upload = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
        let key = self.layout.shard(iterations, self.rank.rank, &upload);
        let refs: Vec<TensorRef<'_>> = tensors
            .iter()
            .map(|t| TensorRef { name: &t.name, dtype: t.dtype, shape: &t.shape, data: &t.bytes, crc32c: None, crc32: None })
            .collect();
        let path = std::path::PathBuf::from(key.as_ref());
        let name = format!("{}-rank-{}", self.model, self.rank.rank);
        let bytes = write_archive(Vec::new(), &path, &name, iterations, &refs, None, None)?;
        let (size, crc) = (bytes.len() as u64, crc32c::crc32c(&bytes));
        let reader = ArchiveReader::from_bytes(&path, bytes)?;
        let mut pieces = Vec::with_capacity(tensors.len());
        for Staged { name, dtype, shape, global, row_offset, .. } in &tensors {
            let located = reader.model.iter().find(|l| &l.meta.name == name).ok_or_else(|| Error::Internal {
                what: "sharded save",
                message: format!("tensor `{name}` is not in the shard just written"),
            })?;
            pieces.push(Piece {
                name: name.clone(),
                dtype: dtype.name().into(),
                global_shape: global.clone(),
                row_offset: *row_offset,
                shape: shape.clone(),
                data_offset: located.offset as u64,
                data_len: located.len as u64,
                crc32c: located.meta.crc32c,
            });
        }
        let bytes = reader.into_bytes();
        self.objects.put("write shard", &key, bytes).await?;
        let done = DoneRecord {
            format: SHARDED_FORMAT,
            run: self.run_id.clone(),
            rank: self.rank.rank,
            world_size: self.rank.world_size,
            iterations,
            key: key.to_string(),
            size,
            crc32c: crc,
            pieces,
        };
        let done_key = self.layout.done(iterations, self.rank.rank);
        self.objects.put("write done-record", &done_key, to_json(&done_key, &done, false)?).await?;
        Ok(())
    }
}
