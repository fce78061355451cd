//! The writer thread of every rank: a save's shard, then its done-record.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ticket::{deliver, Reply};
use super::{lock, Commit, DoneRecord, Job, Piece, ShardSaved, Shared, Staged, Wake, SHARDED_FORMAT};
use crate::archive::format::TensorRef;
use crate::archive::{write_archive_located, Span};
use crate::background::guarded;
use crate::error::{Error, Result, Work};
use crate::remote::objects::to_json;
use object_store::path::Path as Key;
use object_store::{ObjectStoreExt, WriteMultipart};

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
        while let Some(mut job) = s.next_job() {
            // The job is over however this ends, a panic included: a drop
            // of the handle waits for it.
            let _over = JobOver(s);
            let (iterations, loss, stall, reply) = (job.iterations, job.loss, job.stall, job.reply.take());
            let written = guarded(Work::ShardedSave, || s.write_shard(job));
            let saved =
                written.map(|(bytes, copy, write)| ShardSaved { iterations, bytes, stall, copy, write, skipped: false, committed: false });
            s.shard_written(iterations, loss, saved, reply);
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
    /// coordinator commits the step (and then tells its ticket), another
    /// rank tells its ticket now; a failure nobody holds a ticket for waits
    /// for `flush`.
    fn shard_written(&self, iterations: u64, loss: Option<f64>, written: Result<ShardSaved>, reply: Option<Reply>) {
        match written {
            Ok(saved) => {
                self.stats.written.fetch_add(1, Ordering::Relaxed);
                if self.rank.rank == 0 {
                    let deadline = Instant::now().checked_add(self.deadline).unwrap_or_else(Instant::now);
                    lock(&self.queue).commits.push(Commit { iterations, deadline, loss, saved: Some((saved, reply)) });
                    self.wake_coordinator();
                } else {
                    deliver(reply, Ok(saved), |_| {});
                }
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(target: "modelio", "rank {}: shard of iteration {iterations} not written: {}", self.rank.rank, e.report());
                deliver(reply, Err(e), |e| self.report_later(e));
                if lock(&self.queue).snapshots.remove(&iterations) {
                    self.snapshot_not_made(iterations, "this rank's shard of it was not written");
                }
            }
        }
    }

    /// Write a save's shard, then its done-record. A shard smaller than a
    /// part goes up in one put; a larger one streams to the store in parts
    /// as the archive is written (multipart on object storage), so memory is
    /// the staged copy plus `parts_in_flight` parts, and no single request
    /// carries the whole shard (S3 refuses one over 5 GiB).
    /// Returns the shard's size, how long landing the copies took and how
    /// long the writes took.
    pub(super) fn write_shard(&self, job: Job) -> Result<(u64, Duration, Duration)> {
        let Job { iterations, tensors, copies, .. } = job;
        // The device copies waited for, deferred copies made (the fence
        // released), checksums computed on the staged bytes.
        let (lease, crcs, copy) = copies.land()?;
        let started = Instant::now();
        let buffers = lease.buffers();
        let mut refs: Vec<TensorRef<'_>> = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            let data = buffers.get(i).copied().unwrap_or_default();
            let want = usize::try_from(t.region.volume()).unwrap_or(usize::MAX).saturating_mul(t.dtype.size());
            let &(crc32c, crc32) = crcs.get(i).unwrap_or(&(0, 0));
            if data.len() != want {
                return Err(Error::Internal {
                    what: Work::ShardedSave,
                    message: format!("the staged copy of `{}` holds {} bytes, not {want}", t.name, data.len()),
                });
            }
            refs.push(TensorRef { name: &t.name, dtype: t.dtype, shape: &t.region.shape, data, crc32c: Some(crc32c), crc32: Some(crc32) });
        }
        let (key, size, crc, spans) = self.retrying("write shard", || self.store_shard(iterations, &refs))?;
        drop(refs);
        drop(lease);
        let pieces = tensors
            .iter()
            .zip(spans)
            .map(|(Staged { name, dtype, region, global }, span)| Piece {
                name: name.clone(),
                dtype: dtype.name().into(),
                global_shape: global.clone(),
                offset: region.offset.clone(),
                row_offset: region.offset.first().copied().unwrap_or(0),
                shape: region.shape.clone(),
                data_offset: span.offset,
                data_len: span.len,
                crc32c: span.crc32c,
            })
            .collect();
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
        self.retrying("write done-record", || {
            self.run(self.objects.put("write done-record", &done_key, to_json(&done_key, &done, false)?))
        })?;
        Ok((size, copy, started.elapsed()))
    }

    /// Store one shard under a key of its own: its key, size, CRC-32C and
    /// where each tensor landed. A shard smaller than a part goes up in one
    /// put; a larger one streams to the store in parts as the archive is
    /// written (multipart on object storage), so memory is the staged copy
    /// plus `parts_in_flight` parts, and no single request carries the whole
    /// shard (S3 refuses one over 5 GiB).
    fn store_shard(&self, iterations: u64, refs: &[TensorRef<'_>]) -> Result<(Key, u64, u32, Vec<Span>)> {
        let upload = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
        let key = self.layout.shard(iterations, self.rank.rank, &upload);
        let path = std::path::PathBuf::from(key.as_ref());
        let name = format!("{}-rank-{}", self.model, self.rank.rank);
        let total: usize = refs.iter().map(|r| r.data.len()).sum();
        let (size, crc, spans) = if total < self.part_size {
            let (bytes, spans) = write_archive_located(Vec::new(), &path, &name, iterations, refs, None, None)?;
            let (size, crc) = (bytes.len() as u64, crate::crc::crc32c(&bytes));
            self.run(self.objects.put("write shard", &key, bytes))?;
            (size, crc, spans)
        } else {
            let mut parts = Parts::start(self, &key)?;
            match write_archive_located(&mut parts, &path, &name, iterations, refs, None, None) {
                Ok((_, spans)) => {
                    let (size, crc) = parts.finish()?;
                    (size, crc, spans)
                }
                Err(e) => return Err(parts.abort().unwrap_or(e)),
            }
        };
        Ok((key, size, crc, spans))
    }
}

/// A shard streamed to the store in parts as its archive is written: at
/// most `parts_in_flight` parts being sent while the next is filled.
struct Parts<'a> {
    shared: &'a Shared,
    key: &'a Key,
    upload: WriteMultipart,
    size: u64,
    crc: u32,
    /// The store's failure, kept for the error the archive writer returns.
    failure: Option<Error>,
}

impl<'a> Parts<'a> {
    fn start(shared: &'a Shared, key: &'a Key) -> Result<Parts<'a>> {
        let upload =
            shared.run(shared.objects.store().put_multipart(key)).map_err(|e| shared.objects.err("start multipart upload of", key, e))?;
        let upload = WriteMultipart::new_with_chunk_size(upload, shared.part_size);
        Ok(Parts { shared, key, upload, size: 0, crc: 0, failure: None })
    }

    /// Its size and CRC-32C, once every part is stored and the object is whole.
    fn finish(self) -> Result<(u64, u32)> {
        let (shared, key) = (self.shared, self.key);
        shared.run(self.upload.finish()).map_err(|e| shared.objects.err("complete multipart upload of", key, e))?;
        Ok((self.size, self.crc))
    }

    /// Give the upload up: the store's failure that ended it, if any.
    fn abort(self) -> Option<Error> {
        let _ = self.shared.run(self.upload.abort());
        self.failure
    }
}

impl std::io::Write for Parts<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (shared, key) = (self.shared, self.key);
        let upload = &mut self.upload;
        // Wait for a part to be stored before another is filled.
        if let Err(e) = shared.run(upload.wait_for_capacity(shared.parts_in_flight)) {
            let message = e.to_string();
            self.failure = Some(shared.objects.err("upload part of", key, e));
            return Err(std::io::Error::other(message));
        }
        // A filled part is sent from the store's runtime; taking at most a
        // part at a time fills at most one, so no more than
        // `parts_in_flight` are ever being sent.
        let buf = &buf[..buf.len().min(shared.part_size.max(1))];
        let _in_runtime = shared.rt.enter();
        upload.write(buf);
        self.crc = crate::crc::crc32c_append(self.crc, buf);
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
