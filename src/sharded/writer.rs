//! The writer thread of every rank: a save's shard, then its done-record.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{lock, Commit, DoneRecord, Job, Piece, Shared, Staged, Wake, SHARDED_FORMAT};
use crate::archive::format::TensorRef;
use crate::archive::{write_archive, ArchiveReader};
use crate::background::guarded;
use crate::error::{Error, Result, Work};
use crate::remote::objects::to_json;

/// A rank's shard writer: the newest waiting save, one at a time.
pub(super) struct ShardWriter {
    pub shared: Arc<Shared>,
}

impl actix::Actor for ShardWriter {
    type Context = actix::SyncContext<Self>;
}

impl actix::Handler<Wake> for ShardWriter {
    type Result = ();
    fn handle(&mut self, _: Wake, _: &mut Self::Context) {
        let s = &self.shared;
        while let Some(job) = s.next_job() {
            // The job is over however this ends, a panic included: a drop
            // of the handle waits for it.
            let _over = JobOver(s);
            let iterations = job.iterations;
            let loss = job.loss;
            let written = guarded(Work::ShardedSave, || s.run(s.write_shard(job)));
            s.shard_written(iterations, loss, written);
        }
    }
}

/// Ends the job in progress when dropped.
struct JobOver<'a>(&'a Shared);

impl Drop for JobOver<'_> {
    fn drop(&mut self) {
        lock(&self.0.queue).job.finish();
        self.0.wake.notify_all();
    }
}

impl Shared {
    /// The waiting save, now the one being written; a save waiting for the
    /// slot may go on.
    fn next_job(&self) -> Option<Job> {
        let mut q = lock(&self.queue);
        q.job.finish();
        let job = q.job.start();
        drop(q);
        self.wake.notify_all();
        job
    }

    /// Count and hand on what became of the shard of `iterations`: the
    /// coordinator commits the step, or the failure waits for `flush`.
    fn shard_written(&self, iterations: u64, loss: Option<f64>, written: Result<()>) {
        match written {
            Ok(()) => {
                self.stats.written.fetch_add(1, Ordering::Relaxed);
                if self.rank.rank == 0 {
                    let deadline = Instant::now().checked_add(self.deadline).unwrap_or_else(Instant::now);
                    lock(&self.queue).commits.push(Commit { iterations, deadline, loss });
                    self.wake_coordinator();
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
    }

    pub(super) async fn write_shard(&self, job: Job) -> Result<()> {
        let Job { iterations, tensors, .. } = job;
        let upload = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
        let key = self.layout.shard(iterations, self.rank.rank, &upload);
        let refs: Vec<TensorRef<'_>> = tensors
            .iter()
            .map(|t| TensorRef { name: &t.name, dtype: t.dtype, shape: &t.region.shape, data: &t.bytes, crc32c: None, crc32: None })
            .collect();
        let path = std::path::PathBuf::from(key.as_ref());
        let name = format!("{}-rank-{}", self.model, self.rank.rank);
        let bytes = write_archive(Vec::new(), &path, &name, iterations, &refs, None, None)?;
        let (size, crc) = (bytes.len() as u64, crc32c::crc32c(&bytes));
        let reader = ArchiveReader::from_bytes(&path, bytes)?;
        let mut pieces = Vec::with_capacity(tensors.len());
        for Staged { name, dtype, region, global, .. } in &tensors {
            let located = reader.model.iter().find(|l| &l.meta.name == name).ok_or_else(|| Error::Internal {
                what: Work::ShardedSave,
                message: format!("tensor `{name}` is not in the shard just written"),
            })?;
            pieces.push(Piece {
                name: name.clone(),
                dtype: dtype.name().into(),
                global_shape: global.clone(),
                offset: region.offset.clone(),
                row_offset: region.offset.first().copied().unwrap_or(0),
                shape: region.shape.clone(),
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
