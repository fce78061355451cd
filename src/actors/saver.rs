//! The saver: writes archives and state files, then pins what was committed
//! for the backup and snapshot actors (so they never see a later save by mistake).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Addr, Handler, SyncContext};

use super::backup::BackupActor;
use super::messages::{Backup, BuildSnapshot, Flush, Snapshot, Write};
use super::snapshot::SnapshotActor;
use super::Shared;
use crate::durable;
use crate::error::{Error, IoContext, Result};
use crate::format::{OptimizerRef, TensorRef};
use crate::handle::Committed;
use crate::snapshot::Pinned;

pub(crate) struct Saver {
    pub shared: Arc<Shared>,
    pub backup: Addr<BackupActor>,
    pub snapshot: Addr<SnapshotActor>,
    /// Iterations of the last committed save (snapshots are built from it).
    pub last_committed: Option<u64>,
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
        .map(|(i, d)| TensorRef {
            name: &d.name,
            dtype: d.dtype,
            shape: &d.shape,
            data: bufs.get(i).copied().unwrap_or(&[]),
            crc32c: w.crcs.get(i).map(|c| c.0),
            crc32: w.crcs.get(i).map(|c| c.1),
        })
        .collect();
    let opt_tensors = refs.split_off(job.model.len());
    let model = refs;
    let optimizer = job.optimizer.as_ref().map(|(kind, json, _)| OptimizerRef { kind, json, tensors: &opt_tensors });
    let paths = &shared.paths;
    let bytes = crate::archive::commit_archive(&paths.archive(), &paths.name, job.iterations, &model, optimizer, Some(&job.state_json))?;
    durable::commit_bytes(&paths.state(), &job.state_json)?;
    Ok(bytes)
}

/// Hard-link (or copy) the committed archive and state file to temporary
/// names, fixing the bytes of this save for a later backup or snapshot.
pub(crate) fn pin(shared: &Shared) -> Result<Vec<(PathBuf, PathBuf)>> {
    let paths = &shared.paths;
    let mut pins = Vec::with_capacity(2);
    for file in [paths.archive(), paths.state()] {
        let pin = durable::temp_path(&paths.dir, &file);
        if std::fs::hard_link(&file, &pin).is_err() {
            std::fs::copy(&file, &pin).at("copy", &file)?;
        }
        pins.push((pin, file));
    }
    Ok(pins)
}

impl Handler<Write> for Saver {
    type Result = ();
    fn handle(&mut self, w: Write, _: &mut Self::Context) {
        let start = Instant::now();
        let written = write_save(&self.shared, &w);
        let Write { job, lease, copy, .. } = w;
        drop(lease);
        let bytes = match written {
            Ok(b) => b,
            Err(e) => return self.shared.fail("save", e, Some(job.reply)),
        };
        self.last_committed = Some(job.iterations);
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
        if !job.backup {
            let _ = job.reply.send(Ok(committed));
            return;
        }
        // The backup actor answers the ticket once the `.bk` files exist.
        match pin(&self.shared) {
            Ok(pinned) => self.backup.do_send(Backup { pinned, committed, reply: job.reply }),
            Err(e) => {
                self.shared.fail("backup", e, None);
                let _ = job.reply.send(Ok(committed));
            }
        }
    }
}

impl Handler<Snapshot> for Saver {
    type Result = ();
    fn handle(&mut self, msg: Snapshot, _: &mut Self::Context) {
        let iterations = match (msg.of, self.last_committed) {
            (Some(n), Some(c)) if n == c => n,
            // The save the snapshot was asked after did not commit: never
            // snapshot an older save under its name, nor silently.
            (Some(n), _) => {
                let e = Error::SnapshotWithoutSave { iterations: n, why: "not committed (it failed)" };
                return self.shared.fail("snapshot", e, None);
            }
            (None, Some(c)) => c,
            (None, None) => match committed_iterations(&self.shared) {
                Some(c) => c,
                None => {
                    tracing::warn!(target: "modelio", "snapshot requested before any save was committed; skipped");
                    return;
                }
            },
        };
        match pin(&self.shared) {
            Ok(pins) => {
                let pinned = pins
                    .into_iter()
                    .map(|(pin, file)| Pinned { pin, name: file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default() })
                    .collect();
                self.snapshot.do_send(BuildSnapshot { iterations, pinned });
            }
            Err(e) => self.shared.fail("snapshot", e, None),
        }
    }
}

/// The iterations of the archive on disk, for a snapshot before this run's first save.
fn committed_iterations(shared: &Shared) -> Option<u64> {
    crate::archive::ArchiveReader::open(&shared.paths.archive()).ok().map(|r| r.manifest.iterations)
}

impl Handler<Flush> for Saver {
    type Result = ();
    fn handle(&mut self, _: Flush, _: &mut Self::Context) {
        let _ = futures::executor::block_on(self.backup.send(Flush));
        let _ = futures::executor::block_on(self.snapshot.send(Flush));
    }
}
