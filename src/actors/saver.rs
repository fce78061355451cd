//! The saver: writes archives and state files, then pins what was committed
//! for the backup and snapshot actors (so they never see a later save by
//! mistake). Snapshot requests come straight from the handle and wait here
//! for the save they follow (see [`super::order`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Addr, Handler, SyncContext};

use super::backup::BackupActor;
use super::messages::{Backup, BuildSnapshot, Desc, Flush, Lost, Snapshot, Write};
use super::order::{Due, SnapshotOrder};
use super::snapshot::SnapshotActor;
use super::{guarded, Shared};
use crate::archive::format::{OptimizerRef, TensorRef};
use crate::error::{Error, IoContext, Result, Work};
use crate::folder::durable;
use crate::folder::snapshot::Pinned;
use crate::handle::outcome::Committed;

pub(crate) struct Saver {
    pub shared: Arc<Shared>,
    pub backup: Addr<BackupActor>,
    pub snapshot: Addr<SnapshotActor>,
    /// Snapshot requests and the saves they follow. Updated only outside the
    /// guarded (panic-catching) parts of the handlers, so a panic never
    /// leaves it half-updated.
    pub order: SnapshotOrder,
}

impl actix::Actor for Saver {
    type Context = SyncContext<Self>;
}

/// Write one save: archive first, then the state file that describes it.
pub(crate) fn write_save(shared: &Shared, w: &Write) -> Result<u64> {
    let delay = shared.write_delay();
    if delay > Duration::ZERO {
        std::thread::sleep(delay);
    }
    if shared.take_injected_panic() {
        panic!("injected by the test hook `inject_panic_in_next_write`");
    }
    let job = &w.job;
    let bufs = w.lease.buffers();
    // Model tensors then optimizer tensors: buffer `i` of the lease holds
    // the `i`-th of them, with its checksums at `w.crcs[i]`.
    let opt_descs = job.optimizer.iter().flat_map(|(_, _, descs)| descs.iter());
    let mut refs: Vec<TensorRef> = job
        .model
        .iter()
        .chain(opt_descs)
        .enumerate()
        .map(|(i, d)| {
            Ok(TensorRef {
                name: &d.name,
                dtype: d.dtype,
                shape: &d.shape,
                data: staged(d, bufs.get(i).copied())?,
                crc32c: w.crcs.get(i).map(|c| c.0),
                crc32: w.crcs.get(i).map(|c| c.1),
            })
        })
        .collect::<Result<_>>()?;
    let opt_tensors = refs.split_off(job.model.len());
    let model = refs;
    let optimizer = job.optimizer.as_ref().map(|(kind, json, _)| OptimizerRef { kind, json, tensors: &opt_tensors });
    let paths = &shared.paths;
    let bytes = crate::archive::commit_archive(&paths.archive(), &paths.name, job.iterations, &model, optimizer, Some(&job.state_json))?;
    durable::commit_bytes(&paths.state(), &job.state_json)?;
    Ok(bytes)
}

/// The staged bytes of tensor `d`, refused unless they are exactly as many as
/// its dtype and shape need (a short or unreadable buffer is never written).
pub(crate) fn staged<'a>(d: &Desc, buf: Option<&'a [u8]>) -> Result<&'a [u8]> {
    let data = buf.unwrap_or_default();
    let expected = d.shape.iter().try_fold(d.dtype.size(), |n, &dim| n.checked_mul(dim));
    match expected {
        Some(len) if len == data.len() => Ok(data),
        _ => Err(Error::StagedLength { tensor: d.name.clone(), expected: expected.unwrap_or(usize::MAX), found: data.len() }),
    }
}

/// Copy `from` into the new file `to` (never through a symlink, never over
/// an existing file): a pin where hard links are not possible.
fn copy_new(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    let mut src = durable::open_regular(from)?;
    let mut dst = durable::create_new(to)?;
    std::io::copy(&mut src, &mut dst).map(drop).at("pin", from)
}

/// Hard-link (or copy) the committed archive and state file to temporary
/// names, fixing the bytes of this save for a later backup or snapshot.
/// On failure no pin is left behind.
pub(crate) fn pin(shared: &Shared) -> Result<Vec<Pinned>> {
    let paths = &shared.paths;
    let mut pins: Vec<Pinned> = Vec::with_capacity(2);
    for target in [paths.archive(), paths.state()] {
        let pin = durable::temp_path(&paths.dir, &target);
        let pinned = std::fs::hard_link(&target, &pin).at("pin", &target).or_else(|_| copy_new(&target, &pin));
        // On failure, the pins made so far are removed as `pins` is dropped.
        pinned?;
        pins.push(Pinned { pin, target });
    }
    Ok(pins)
}

impl Handler<Write> for Saver {
    type Result = ();
    fn handle(&mut self, w: Write, _: &mut Self::Context) {
        let start = Instant::now();
        let written = guarded(Work::Save, || write_save(&self.shared, &w));
        let Write { job, lease, copy, .. } = w;
        drop(lease);
        let bytes = match written {
            Ok(b) => b,
            Err(e) => {
                self.shared.fail(Work::Save, e, Some(job.reply));
                return self.handed_over(None);
            }
        };
        let write = start.elapsed();
        let secs = (copy + write).as_secs_f64();
        tracing::info!(
            target: "modelio",
            name = %self.shared.paths.name,
            iterations = job.iterations,
            bytes,
            stall_us = job.stall.as_micros() as u64,
            copy_ms = copy.as_secs_f64() * 1e3,
            write_ms = write.as_secs_f64() * 1e3,
            gbps = if secs > 0.0 { bytes as f64 / secs / 1e9 } else { 0.0 },
            optimizer = job.optimizer.is_some(),
            waited = job.waited,
            "saved {} at iteration {}, average loss since last save {:.6}, {}",
            self.shared.paths.archive().display(),
            job.iterations,
            job.average_loss,
            if job.backup { "backed up" } else { "not backed up" },
        );
        self.shared.stats.committed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let committed = Committed {
            iterations: job.iterations,
            path: self.shared.paths.archive(),
            bytes,
            average_loss: job.average_loss,
            backed_up: false,
            with_optimizer: job.optimizer.is_some(),
            skipped: false,
            stall: job.stall,
            copy,
            write,
        };
        if let Some(rider) = &self.shared.rider {
            rider.saved(job.iterations, job.backup, job.exit, &|| pin(&self.shared));
        }
        if job.backup {
            // The backup actor answers the ticket once the `.bk` files exist.
            match guarded(Work::Backup, || pin(&self.shared)) {
                Ok(pinned) => self.backup.do_send(Backup { pinned, committed, reply: job.reply }),
                Err(e) => {
                    self.shared.fail(Work::Backup, e, None);
                    let _ = job.reply.send(Ok(committed));
                }
            }
        } else {
            let _ = job.reply.send(Ok(committed));
        }
        // Snapshots after the backup's pins: both hold this save's files.
        self.handed_over(Some(job.iterations));
    }
}

impl Handler<Lost> for Saver {
    type Result = ();
    fn handle(&mut self, _: Lost, _: &mut Self::Context) {
        self.handed_over(None);
    }
}

impl Handler<Snapshot> for Saver {
    type Result = ();
    fn handle(&mut self, msg: Snapshot, _: &mut Self::Context) {
        if let Some((s, due)) = self.order.request(msg) {
            self.take_snapshot(s, due);
        }
    }
}

impl Saver {
    /// The next save was handed over (committed at `committed`, or not):
    /// take the snapshots that waited for it.
    fn handed_over(&mut self, committed: Option<u64>) {
        for (s, due) in self.order.handed_over(committed) {
            self.take_snapshot(s, due);
        }
    }

    /// Pin the files a due snapshot is built from and pass them on.
    fn take_snapshot(&self, s: Snapshot, due: Due) {
        let of_save = matches!(due, Due::Save(_));
        let iterations = match due {
            Due::Save(n) => n,
            Due::Refused(e) => return self.shared.fail(Work::Snapshot, e, None),
            // No save in this run yet: the archive on disk, under its own iteration count.
            Due::OnDisk => match crate::archive::ArchiveReader::open(&self.shared.paths.archive()) {
                Ok(r) => r.manifest.iterations,
                Err(e) => return self.shared.fail(Work::Snapshot, e, None),
            },
        };
        if let (true, Some(rider)) = (of_save, &self.shared.rider) {
            rider.snapshotted(iterations, &|| pin(&self.shared));
        }
        match guarded(Work::Snapshot, || pin(&self.shared)) {
            Ok(pinned) => {
                self.snapshot.do_send(BuildSnapshot { iterations, pinned, permit: s.permit });
            }
            Err(e) => self.shared.fail(Work::Snapshot, e, None),
        }
    }
}

impl Handler<Flush> for Saver {
    type Result = ();
    /// Everything this actor sent downstream went before these copies; no
    /// snapshot request sent before the flush is still pending (see
    /// [`super::order`]).
    fn handle(&mut self, msg: Flush, _: &mut Self::Context) {
        self.backup.do_send(Flush { done: msg.done.fork() });
        self.snapshot.do_send(Flush { done: msg.done.fork() });
        msg.done.handled();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::messages::SaveJob;
    use crate::actors::Settings;
    use crate::archive::format::DType;
    use crate::folder::ModelPaths;
    use crate::staging::Pool;

    #[test]
    fn a_buffer_is_written_only_with_the_length_of_its_tensor() {
        let d = Desc { name: "w".into(), dtype: DType::F32, shape: vec![2, 3] };
        assert_eq!(staged(&d, Some(&[0u8; 24][..])).unwrap().len(), 24);
        for buf in [None, Some(&[0u8; 23][..]), Some(&[0u8; 25][..])] {
            let e = staged(&d, buf).unwrap_err();
            assert!(matches!(&e, Error::StagedLength { tensor, expected: 24, .. } if tensor == "w"), "{e:?}");
        }
        let huge = Desc { name: "h".into(), dtype: DType::F64, shape: vec![usize::MAX, 2] };
        assert!(matches!(staged(&huge, Some(&[][..])), Err(Error::StagedLength { .. })));
        let empty = Desc { name: "e".into(), dtype: DType::F32, shape: vec![0, 5] };
        assert!(staged(&empty, None).unwrap().is_empty());
    }

    #[test]
    fn a_short_staged_buffer_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::new(ModelPaths::new(dir.path(), "m"), Settings { snapshot_keep: 0, hard_links: false });
        let pool = Pool::new(1);
        let mut lease = pool.try_lease().unwrap();
        lease.host(0, 16).fill(1); // 4 floats staged, 6 described
        let (reply, _answer) = tokio::sync::oneshot::channel();
        let job = SaveJob::test(1, vec![2, 3], reply);
        let w = Write { job, lease, crcs: Vec::new(), copy: Duration::ZERO };
        let e = write_save(&shared, &w).unwrap_err();
        assert!(matches!(e, Error::StagedLength { expected: 24, found: 16, .. }), "{e:?}");
        assert!(!shared.paths.archive().exists() && !shared.paths.state().exists());
    }
}
