//! The uploader: an actor of its own that uploads committed saves to the
//! remote tier, newest first, never holding up the saver or the trainer.
//!
//! The saver pins each save to upload (hard links to the committed archive
//! and state file, which never change) and offers it here. One upload runs
//! at a time and one waits: an offer replaces the waiting one, whose pins
//! are dropped and which is counted as skipped. So when the network is
//! slower than saves, the newest committed save is what goes up next, and
//! memory and disk hold at most two pinned saves.
//!
//! A failed upload is retried with exponential backoff (up to
//! `remote.retry_max_secs` between tries), or replaced by a newer save that
//! arrived meanwhile. Failures are counted, logged, and written with the
//! other counters to `<dir>/<name>_remote.json` (what `modelio remote status`
//! shows); they are not errors of the trainer's calls, since training and
//! local saves go on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use actix::{Handler, Message, SyncContext};

use super::status::{status_path, RemoteStats};
use super::{Reason, Remote};
use crate::actors::Rider;
use crate::background::{guarded, lock, worker, Newest, Priority, Step};
use crate::config::{RemoteConfig, UploadPolicy};
use crate::error::{Error, Result, Work};
use crate::folder::durable;
use crate::folder::snapshot::Pinned;
use crate::folder::ModelPaths;

/// A committed save to upload: its pinned archive and state file.
pub(crate) struct Upload {
    pub pinned: Vec<Pinned>,
    pub iterations: u64,
    pub reason: Reason,
}

impl Step for Upload {
    fn step(&self) -> u64 {
        self.iterations
    }
}

/// The remote tier of one handle, shared by the saver, the uploader and the handle.
pub(crate) struct Tier {
    pub remote: Remote,
    pub config: RemoteConfig,
    paths: ModelPaths,
    queue: Mutex<Newest<Upload>>,
    idle: Condvar,
    stats: Mutex<RemoteStats>,
    /// Set when the handle stops waiting for uploads: the one in progress is
    /// abandoned between parts, and nothing more starts.
    stop: AtomicBool,
    /// The uploader's address, set once the actors are started.
    addr: std::sync::OnceLock<actix::Addr<Uploader>>,
    /// A `Wake` is in the uploader's mailbox (or it is looking at the queue).
    woken: AtomicBool,
    /// Test hook: an artificial delay before each upload (ms).
    delay_ms: AtomicU64,
}

impl Tier {
    pub fn new(remote: Remote, config: RemoteConfig, paths: ModelPaths) -> Tier {
        let stats = RemoteStats { location: remote.location().to_string(), ..RemoteStats::default() };
        Tier {
            remote,
            config,
            paths,
            queue: Mutex::new(Newest::default()),
            idle: Condvar::new(),
            stats: Mutex::new(stats),
            stop: AtomicBool::new(false),
            addr: std::sync::OnceLock::new(),
            woken: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
        }
    }

    /// Whether a save with these properties is uploaded.
    fn wants(&self, backup: bool, exit: bool) -> bool {
        match self.config.upload {
            UploadPolicy::Every => true,
            UploadPolicy::Milestones => backup || exit,
        }
    }

    /// Whether snapshotted saves are uploaded separately (they are already
    /// uploaded when every save is).
    fn wants_snapshots(&self) -> bool {
        self.config.upload == UploadPolicy::Milestones
    }

    /// Queue `upload`, replacing (and counting as skipped) one still
    /// waiting. A save already waiting or uploading (the same iteration
    /// offered again, e.g. backed up and snapshotted) is not queued twice.
    pub fn offer(&self, upload: Upload) {
        let iterations = upload.iterations;
        let replaced = {
            let mut q = lock(&self.queue);
            if q.holds(iterations) {
                return;
            }
            q.offer(upload)
        };
        if let Some(old) = replaced {
            tracing::info!(target: "modelio", "remote: upload of iteration {} skipped, iteration {iterations} is newer", old.iterations);
            lock(&self.stats).skipped += 1;
        }
        // One wake in the mailbox at a time: the uploader takes the newest
        // save when it gets to it, however many offers came meanwhile.
        if !self.woken.swap(true, Ordering::AcqRel) {
            if let Some(addr) = self.addr.get() {
                addr.do_send(Wake);
            }
        }
    }

    fn take(&self) -> Option<Upload> {
        self.woken.store(false, Ordering::Release);
        let mut q = lock(&self.queue);
        q.finish();
        let next = q.start();
        if next.is_none() {
            self.idle.notify_all();
        }
        next
    }

    /// The upload in progress is done: idle unless a save waits.
    fn finished(&self) {
        let mut q = lock(&self.queue);
        q.finish();
        if q.is_idle() {
            self.idle.notify_all();
        }
    }

    /// A newer save that arrived while the current one kept failing.
    fn take_newer(&self) -> Option<Upload> {
        lock(&self.queue).start()
    }

    /// Wait until nothing is uploading or waiting, at most `timeout`.
    /// Returns whether it is idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = lock(&self.queue);
        while !q.is_idle() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self.idle.wait_timeout(q, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Stop uploading: the upload in progress is abandoned, the waiting one dropped.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = lock(&self.queue).cancel() {
            tracing::warn!(target: "modelio", "remote: upload of iteration {} not started before shutdown; the next run uploads it", w.iterations);
            lock(&self.stats).abandoned += 1;
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> RemoteStats {
        let pending = lock(&self.queue).pending();
        RemoteStats { pending, ..lock(&self.stats).clone() }
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Write the counters to `<dir>/<name>_remote.json` for `modelio remote status`.
    /// `done`: the upload in progress just finished (it is no longer pending).
    fn publish(&self, done: bool) {
        let mut stats = self.stats();
        if done {
            stats.pending = lock(&self.queue).waiting().map(Step::step);
        }
        let json = match serde_json::to_vec_pretty(&stats) {
            Ok(j) => j,
            Err(_) => return,
        };
        if let Err(e) = durable::commit_bytes(&status_path(&self.paths), &json) {
            tracing::warn!(target: "modelio", "remote: could not write the status file: {}", e.report());
        }
    }

    /// Upload `upload`, retrying with backoff until it is done, replaced by
    /// a newer save, or stopped.
    fn upload(&self, mut upload: Upload) {
        let mut attempt: u32 = 0;
        loop {
            if self.stopped() {
                lock(&self.stats).abandoned += 1;
                return;
            }
            let delay = Duration::from_millis(self.delay_ms.load(Ordering::Relaxed));
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            match self.attempt(&upload) {
                Ok(Some(id)) => {
                    tracing::info!(target: "modelio", "remote: uploaded iteration {} to {} ({id})", upload.iterations, self.remote.location());
                    if let Err(e) = self.remote.apply_retention(self.config.keep, Some(&id)) {
                        tracing::warn!(target: "modelio", "remote: retention: {}", e.report());
                    }
                    {
                        let mut s = lock(&self.stats);
                        s.uploaded += 1;
                        s.last_uploaded = Some(upload.iterations);
                        s.last_checkpoint = Some(id);
                    }
                    // Published before the tier reads as idle, so that whoever
                    // waited for the upload finds the status file up to date.
                    self.publish(true);
                    return self.finished();
                }
                Ok(None) => return,
                Err(_) if self.stopped() => {
                    lock(&self.stats).abandoned += 1;
                    return;
                }
                Err(e) => {
                    tracing::warn!(target: "modelio", "remote: upload of iteration {} failed (will retry): {}", upload.iterations, e.report());
                    {
                        let mut s = lock(&self.stats);
                        s.failed_attempts += 1;
                        s.last_error = Some(e.report().to_string());
                        s.last_error_at = Some(chrono::Utc::now().to_rfc3339());
                    }
                    self.publish(false);
                    if !e.is_retryable() && !matches!(e, Error::RemoteDamaged { .. }) {
                        // The local pinned files cannot be read: retrying cannot help.
                        return;
                    }
                }
            }
            // Back off, looking for a newer save and for a stop meanwhile.
            let wait =
                Duration::from_millis(250u64.saturating_mul(1 << attempt.min(16))).min(Duration::from_secs(self.config.retry_max_secs));
            attempt += 1;
            let until = Instant::now() + wait;
            while Instant::now() < until && !self.stopped() {
                if let Some(newer) = self.take_newer() {
                    tracing::info!(target: "modelio", "remote: upload of iteration {} skipped, iteration {} is newer", upload.iterations, newer.iterations);
                    lock(&self.stats).skipped += 1;
                    upload = newer;
                    attempt = 0;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// One try: `Ok(None)` when a catch-up finds the remote up to date.
    fn attempt(&self, upload: &Upload) -> Result<Option<String>> {
        if upload.reason == Reason::CatchUp && !self.remote.is_behind(upload.iterations)? {
            return Ok(None);
        }
        let [archive, state] = upload.pinned.as_slice() else {
            return Err(Error::Internal { what: Work::Upload, message: format!("{} pinned files, 2 expected", upload.pinned.len()) });
        };
        let stop = || self.stopped();
        let m = self.remote.upload(&archive.pin, &state.pin, upload.reason, &stop)?;
        Ok(Some(m.id()))
    }
}

/// The tier rides on the pipeline: it hears of each commit and decides
/// what goes up, and why (`remote.upload`).
impl Rider for Tier {
    fn start(self: Arc<Self>) {
        let tier = self.clone();
        let uploader = worker("modelio-uploader", Priority::Low, move || Uploader { tier: tier.clone() });
        uploader.do_send(Clean);
        let _ = self.addr.set(uploader);
    }

    fn saved(&self, iterations: u64, backup: bool, exit: bool, pin: &dyn Fn() -> Result<Vec<Pinned>>) {
        if !self.wants(backup, exit) {
            return;
        }
        let reason = if exit {
            Reason::Exit
        } else if backup {
            Reason::Backup
        } else {
            Reason::Save
        };
        self.offer_pinned(iterations, reason, pin);
    }

    fn snapshotted(&self, iterations: u64, pin: &dyn Fn() -> Result<Vec<Pinned>>) {
        if self.wants_snapshots() {
            self.offer_pinned(iterations, Reason::Snapshot, pin);
        }
    }

    fn stop(&self) {
        Tier::stop(self);
    }
}

impl Tier {
    /// Pin the committed save (`iterations`) and offer it for upload.
    fn offer_pinned(&self, iterations: u64, reason: Reason, pin: &dyn Fn() -> Result<Vec<Pinned>>) {
        match guarded(Work::Upload, pin) {
            Ok(pinned) => self.offer(Upload { pinned, iterations, reason }),
            Err(e) => tracing::warn!(target: "modelio", "remote: could not pin iteration {iterations} for upload: {}", e.report()),
        }
    }
}

/// The uploader actor: a thread of its own, since an upload may take minutes.
pub(crate) struct Uploader {
    pub tier: Arc<Tier>,
}

impl actix::Actor for Uploader {
    type Context = SyncContext<Self>;
}

/// Look at the queue.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Wake;

/// Clean up after interrupted runs (once, at start).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Clean;

impl Handler<Wake> for Uploader {
    type Result = ();
    fn handle(&mut self, _: Wake, _: &mut Self::Context) {
        while let Some(upload) = self.tier.take() {
            let tier = &self.tier;
            if let Err(e) = guarded(Work::Upload, || {
                tier.upload(upload);
                Ok(())
            }) {
                tracing::error!(target: "modelio", "remote: {}", e.report());
            }
        }
    }
}

impl Handler<Clean> for Uploader {
    type Result = ();
    fn handle(&mut self, _: Clean, _: &mut Self::Context) {
        let grace = Duration::from_secs(self.tier.config.orphan_grace_secs);
        match self.tier.remote.clean_orphans(grace) {
            Ok(0) => {}
            Ok(n) => tracing::info!(target: "modelio", "remote: removed {n} partial uploads of interrupted runs"),
            Err(e) => tracing::warn!(target: "modelio", "remote: cleanup of partial uploads: {}", e.report()),
        }
    }
}
