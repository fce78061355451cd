//! The actors: stager -> saver -> {backup, snapshot}, each a single-threaded
//! actix `SyncArbiter` on an actix `System` of its own thread. No handler
//! ever waits for another actor.
//!
//! Ordering: saves enter through the stager's mailbox and reach the saver in
//! order; snapshot requests go straight to the saver, which holds each until
//! the save it follows was handed over (see [`order`]), so a snapshot is
//! always built from the save before it. A flush follows the saves through
//! the stager and the saver and is answered once the backup and snapshot
//! actors have handled it too, that is after everything sent before it.
//!
//! Bounds: a save holds a staging buffer set until it is written, so at most
//! `staging.max_inflight` saves are in the mailboxes; snapshot requests hold
//! a [`messages::Permit`], at most [`MAX_SNAPSHOTS_IN_FLIGHT`] of them. actix
//! does not bound a `SyncArbiter`'s mailbox (its channel is unbounded), so
//! these bounds are the only ones; beyond them a request is refused with
//! [`Error::Overloaded`].

mod backup;
pub(crate) mod messages;
mod order;
mod saver;
mod snapshot;
mod stager;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::SendError;
use actix::Addr;
use tokio::sync::oneshot;

use crate::background::{worker, Inbox, Priority, Workers};
use crate::error::{Error, Result, Work};
use crate::folder::snapshot::Pinned;
use crate::folder::ModelPaths;
use messages::{Done, Flush, Permit, Reply, Snapshot, Stage};

pub(crate) use saver::pin;
pub(crate) use stager::Stager;

/// Snapshot requests in flight (requested, not yet built or refused). Each
/// pins the archive and state file (hard links, or full copies where links
/// fail) and then costs a copy of the model folder: more waiting than this
/// means snapshots are requested faster than the disk builds them.
pub(crate) const MAX_SNAPSHOTS_IN_FLIGHT: usize = 8;

/// Counters of a handle's saves.
#[derive(Debug, Default)]
pub struct Stats {
    pub requested: AtomicU64,
    pub skipped: AtomicU64,
    pub waited: AtomicU64,
    pub committed: AtomicU64,
    pub failed: AtomicU64,
    pub failed_other: AtomicU64,
}

/// What rides on the pipeline after it commits (the remote tier's
/// uploads): started and stopped with the actors, and told of each commit,
/// with a way to pin the committed files. The pipeline meets it only here;
/// what it does with a commit (whether to upload it, and why) is its own
/// policy.
pub(crate) trait Rider: Send + Sync {
    /// Start its own worker; called once, on the actors' system thread.
    fn start(self: Arc<Self>);
    /// Save `iterations` committed; `backup`: its loss was the lowest so far;
    /// `exit`: the exit save. `pin` pins the committed files.
    fn saved(&self, iterations: u64, backup: bool, exit: bool, pin: &dyn Fn() -> Result<Vec<Pinned>>);
    /// A snapshot was requested of save `iterations`, committed by this run.
    fn snapshotted(&self, iterations: u64, pin: &dyn Fn() -> Result<Vec<Pinned>>);
    /// The actors stop: work under way is abandoned.
    fn stop(&self);
}

/// Settings the actors act on, from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Snapshots to keep (0 = all).
    pub snapshot_keep: usize,
    /// Backups and snapshot archives as hard links instead of copies.
    pub hard_links: bool,
}

/// What the actors and the handle share.
pub(crate) struct Shared {
    pub paths: ModelPaths,
    pub settings: Settings,
    /// Background failures that no ticket took.
    failures: Inbox,
    pub stats: Stats,
    /// What rides on the pipeline (the remote tier, when `[remote]` is configured).
    pub rider: Option<Arc<dyn Rider>>,
    /// Test hook: an artificial delay before each write (ms).
    write_delay_ms: AtomicU64,
    /// Test hook: the next write panics. Set by the handle, taken (swapped
    /// back) by the one saver thread, so exactly one write panics.
    panic_next_write: AtomicBool,
}

impl Shared {
    pub fn new(paths: ModelPaths, settings: Settings) -> Shared {
        Shared {
            paths,
            settings,
            failures: Inbox::default(),
            stats: Stats::default(),
            rider: None,
            write_delay_ms: AtomicU64::new(0),
            panic_next_write: AtomicBool::new(false),
        }
    }

    /// Report a background failure once: on the save's ticket when there is
    /// one still held, otherwise to the trainer's next call.
    pub fn fail(&self, what: Work, e: Error, reply: Option<Reply>) {
        let e = Error::Background { what, source: Arc::new(e) };
        tracing::error!(target: "modelio", "{}", e.report());
        match reply {
            Some(r) => {
                if let Err(Err(e)) = r.send(Err(e)) {
                    self.report_later(e);
                }
            }
            None => self.report_later(e),
        }
        // Counted once the failure can be found (on the ticket or for the
        // next call), so a caller that sees the count also sees the failure.
        let counter = if what == Work::Save { &self.stats.failed } else { &self.stats.failed_other };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Keep a failure for the trainer's next call.
    pub fn report_later(&self, e: Error) {
        self.failures.keep(e);
    }

    /// Give back a failure taken with [`Shared::take_failure`] that could not
    /// be reported after all: it stays the oldest.
    pub fn put_back(&self, e: Error) {
        self.failures.put_back(e);
    }

    /// The oldest failure not yet reported, if any.
    pub fn take_failure(&self) -> Option<Error> {
        self.failures.take()
    }

    pub fn write_delay(&self) -> Duration {
        Duration::from_millis(self.write_delay_ms.load(Ordering::Relaxed))
    }

    pub fn set_write_delay(&self, d: Duration) {
        self.write_delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn inject_panic_in_next_write(&self) {
        self.panic_next_write.store(true, Ordering::Relaxed);
    }

    /// Whether this write is to panic (test hook); clears the request.
    pub fn take_injected_panic(&self) -> bool {
        self.panic_next_write.swap(false, Ordering::Relaxed)
    }
}

pub(crate) use crate::background::guarded;

/// The running actor system.
pub(crate) struct Actors {
    stager: Addr<Stager>,
    saver: Addr<saver::Saver>,
    /// Saves handed to the stager so far. Only the handle's `save` and
    /// `snapshot` touch it, and both take the handle mutably, so a snapshot
    /// request reads the count of the saves queued before it.
    staged: AtomicU64,
    /// Snapshot requests in flight, each holding a [`Permit`].
    snapshots: Arc<AtomicUsize>,
    workers: Workers,
    /// Stopped with the actors (an upload still under way is abandoned;
    /// the next run's catch-up uploads the newest save).
    rider: Option<Arc<dyn Rider>>,
}

impl Actors {
    /// Start the system thread and the four actors.
    pub fn start(shared: Arc<Shared>) -> Result<Actors> {
        let rider = shared.rider.clone();
        let (workers, (stager, saver)) = Workers::start("modelio-actors", move || {
            // Backups and snapshots yield the CPU to training. The stager
            // and the saver run as the trainer's threads do: a save's
            // writes then finish within a few training steps, and a worker
            // left waiting in the run queue meanwhile would have the kernel
            // move training threads between cores, losing their caches
            // (measured here in paired runs saving every 25 steps: 0.967 of
            // the steps without saves with a low-priority saver, 0.985 with
            // one at the trainer's priority).
            let s = shared.clone();
            let backup = worker("modelio-backup", Priority::Low, move || backup::BackupActor { shared: s.clone() });
            let s = shared.clone();
            let snapshot = worker("modelio-snapshot", Priority::Low, move || snapshot::SnapshotActor { shared: s.clone() });
            if let Some(rider) = &shared.rider {
                rider.clone().start();
            }
            let s = shared.clone();
            let saver = worker("modelio-saver", Priority::Normal, move || saver::Saver {
                shared: s.clone(),
                backup: backup.clone(),
                snapshot: snapshot.clone(),
                order: order::SnapshotOrder::default(),
            });
            let s = shared.clone();
            let to_saver = saver.clone();
            let stager = worker("modelio-stager", Priority::Normal, move || Stager { shared: s.clone(), saver: to_saver.clone() });
            (stager, saver)
        })?;
        Ok(Actors { stager, saver, staged: AtomicU64::new(0), snapshots: Arc::new(AtomicUsize::new(0)), workers, rider })
    }

    /// Hand a save to the stager. Its lease bounds the saves in flight (the
    /// actix mailbox itself is unbounded, so it never reports full).
    ///
    /// # Errors
    /// [`Error::Stopped`] when the actors are gone.
    pub fn stage(&self, msg: Stage) -> Result<()> {
        let capacity = msg.copies.lease.pool_size();
        handed_over(self.stager.try_send(msg), Work::Save, capacity)?;
        self.staged.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Request a snapshot of the last save handed to [`Actors::stage`]
    /// (iterations `of`, `None` when there was none).
    ///
    /// # Errors
    /// [`Error::Overloaded`] when [`MAX_SNAPSHOTS_IN_FLIGHT`] requests are
    /// still waiting, [`Error::Stopped`] when the actors are gone.
    pub fn snapshot(&self, of: Option<u64>) -> Result<()> {
        let overloaded = Error::Overloaded { what: Work::Snapshot, capacity: MAX_SNAPSHOTS_IN_FLIGHT };
        let permit = Permit::try_acquire(&self.snapshots, MAX_SNAPSHOTS_IN_FLIGHT).ok_or(overloaded)?;
        let after = self.staged.load(Ordering::Relaxed);
        handed_over(self.saver.try_send(Snapshot { of, after, permit }), Work::Snapshot, MAX_SNAPSHOTS_IN_FLIGHT)
    }

    /// Send a flush down the actors; the receiver answers once it went through all of them.
    fn request_flush(&self) -> Result<oneshot::Receiver<()>> {
        let (done, answered) = Done::new();
        self.stager.try_send(Flush { done }).map_err(|_| Error::Stopped)?;
        Ok(answered)
    }

    /// Wait until everything sent so far is done. Does not block the runtime.
    pub async fn flush(&self) -> Result<()> {
        self.request_flush()?.await.map_err(|_| Error::Stopped)
    }

    /// Flush, blocking the calling thread (for `Drop` and non-async callers;
    /// never an actor's). Does not panic inside a tokio runtime.
    pub fn flush_blocking(&self) -> Result<()> {
        futures::executor::block_on(self.request_flush()?).map_err(|_| Error::Stopped)
    }

    /// Stop the system and join its thread (call after a flush).
    pub fn stop(&mut self) {
        if let Some(rider) = &self.rider {
            rider.stop();
        }
        self.workers.stop();
    }
}

/// A send's outcome: a full mailbox is [`Error::Overloaded`], a closed one
/// [`Error::Stopped`].
fn handed_over<M>(sent: std::result::Result<(), SendError<M>>, what: Work, capacity: usize) -> Result<()> {
    match sent {
        Ok(()) => Ok(()),
        Err(SendError::Full(_)) => Err(Error::Overloaded { what, capacity }),
        Err(SendError::Closed(_)) => Err(Error::Stopped),
    }
}

impl Drop for Actors {
    fn drop(&mut self) {
        if self.workers.is_running() {
            let _ = self.flush_blocking();
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use actix::{Actor, Handler, Message, SyncArbiter, SyncContext};
    use tch::{Device, Kind, Tensor};

    use super::messages::SaveJob;
    use super::*;
    use crate::handle::outcome::Committed;
    use crate::staging::{Fence, Pool};

    fn actors(dir: &std::path::Path) -> (Arc<Shared>, Actors) {
        let shared = Arc::new(Shared::new(ModelPaths::new(dir, "m"), Settings { snapshot_keep: 0, hard_links: false }));
        let actors = Actors::start(shared.clone()).unwrap();
        (shared, actors)
    }

    /// A save of one f32 tensor, copied by the stager ("deferred" mode) under the fence.
    fn save(pool: &Pool, fence: &Fence, iterations: u64, t: &Tensor) -> (Stage, oneshot::Receiver<Result<Committed>>) {
        let (reply, answer) = oneshot::channel();
        let job = SaveJob::test(iterations, vec![t.numel()], reply);
        let lease = pool.try_lease().unwrap();
        let copies = crate::staging::Copies {
            protected: None,
            lease,
            deferred: vec![(0, t.shallow_clone())],
            guard: Some(fence.arm()),
            events: Vec::new(),
        };
        (Stage { job, copies }, answer)
    }

    /// (nice, scheduling policy) of each of this process's threads named
    /// `name` (as `/proc` shows it: at most 15 bytes).
    fn scheduling_of(name: &str) -> Vec<(i64, i64)> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // After the command in parentheses: the state (field 3), ...,
            // the nice value (field 19), ..., the policy (field 41).
            let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
            if comm.trim_end() == name && fields.len() > 41 - 3 {
                found.push((fields[19 - 3].parse().unwrap(), fields[41 - 3].parse().unwrap()));
            }
        }
        found
    }

    #[test]
    fn the_stager_and_saver_run_as_the_trainer_does_and_backups_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_shared, actors) = actors(dir.path());
        // Through every worker: each has started (and set its priority).
        actors.flush_blocking().unwrap();
        // SAFETY: plain queries of the calling thread.
        let (own, own_policy) = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            (i64::from(libc::getpriority(libc::PRIO_PROCESS, tid)), i64::from(libc::sched_getscheduler(0)))
        };
        for name in ["modelio-stager", "modelio-saver"] {
            let threads = scheduling_of(name);
            assert!(!threads.is_empty(), "no {name} thread");
            // Threads of tests running beside this one included: none is lowered.
            assert!(threads.iter().all(|&(nice, policy)| nice <= own.max(0) && policy == own_policy), "{name}: {threads:?}");
        }
        // This one's backup worker is lowered (another test's may not be yet).
        let backups = scheduling_of("modelio-backup");
        assert!(backups.iter().any(|&(nice, policy)| nice >= 10 && policy == i64::from(libc::SCHED_BATCH)), "{backups:?}");
    }

    #[test]
    fn a_flush_never_holds_up_the_stager() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, actors) = actors(dir.path());
        let (pool, fence) = (Pool::new(2), Fence::default());
        let t = Tensor::ones([1024], (Kind::Float, Device::Cpu));
        shared.set_write_delay(Duration::from_millis(600));
        let (first, first_answer) = save(&pool, &fence, 1, &t);
        actors.stage(first).unwrap();
        let flushed = actors.request_flush().unwrap();
        // The flush waits for the slow write of save 1; meanwhile the stager
        // copies save 2 and releases the fence.
        let (second, second_answer) = save(&pool, &fence, 2, &t);
        actors.stage(second).unwrap();
        fence.wait();
        // Released while save 1 (and so the flush behind it) is still being written.
        let mut first_answer = first_answer;
        assert!(
            matches!(first_answer.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "the fence was held until the write that the flush waits for was done"
        );
        futures::executor::block_on(flushed).expect("answered");
        assert_eq!(first_answer.try_recv().expect("save 1 answered before the flush").unwrap().iterations, 1);
        assert_eq!(futures::executor::block_on(second_answer).unwrap().unwrap().iterations, 2);
    }

    #[test]
    fn dropping_the_actors_in_a_runtime_drains_them_without_panicking() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (shared, actors) = actors(dir.path());
            let (pool, fence) = (Pool::new(1), Fence::default());
            shared.set_write_delay(Duration::from_millis(100));
            let (msg, mut answer) = save(&pool, &fence, 1, &Tensor::ones([8], (Kind::Float, Device::Cpu)));
            actors.stage(msg).unwrap();
            drop(actors);
            assert_eq!(answer.try_recv().expect("drained before the drop returned").unwrap().iterations, 1);
        });
    }

    /// Why the actors count their own requests: actix gives a `SyncArbiter`
    /// an unbounded mailbox, so `try_send` never reports it full.
    #[test]
    fn actix_does_not_bound_a_sync_arbiter_mailbox() {
        struct Slow;
        impl Actor for Slow {
            type Context = SyncContext<Self>;
        }
        #[derive(Message)]
        #[rtype(result = "()")]
        struct Nap;
        impl Handler<Nap> for Slow {
            type Result = ();
            fn handle(&mut self, _: Nap, _: &mut Self::Context) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let system = actix::System::new();
        let accepted = system.block_on(async {
            let addr = SyncArbiter::start(1, || Slow);
            (0..200).filter(|_| addr.try_send(Nap).is_ok()).count()
        });
        assert_eq!(accepted, 200);
    }

    #[test]
    fn a_full_mailbox_is_overloaded_and_a_closed_one_stopped() {
        let full: std::result::Result<(), SendError<()>> = Err(SendError::Full(()));
        assert!(matches!(handed_over(full, Work::Save, 2), Err(Error::Overloaded { what: Work::Save, capacity: 2 })));
        let closed: std::result::Result<(), SendError<()>> = Err(SendError::Closed(()));
        assert!(matches!(handed_over(closed, Work::Save, 2), Err(Error::Stopped)));
    }
}
