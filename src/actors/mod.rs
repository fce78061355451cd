//! The actors: stager -> saver -> {backup, snapshot}, each a single-threaded
//! actix `SyncArbiter` on an actix `System` of its own thread.
//!
//! Ordering: every request enters through the stager's mailbox and is passed
//! on in order, so a snapshot is always built after the save before it, and
//! a flush is answered only after everything sent before it is done.

mod backup;
pub mod messages;
mod saver;
mod snapshot;
mod stager;

use std::sync::atomic::{AtomicU64, Ordering};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Addr, SyncArbiter};

use crate::error::{Error, Result};
use crate::folder::ModelPaths;
use crate::staging::lock;
use messages::{Flush, Reply};

pub(crate) use stager::Stager;

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

/// Settings the actors act on, from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Snapshots to keep (0 = all).
    pub snapshot_keep: usize,
    /// Backups and snapshot archives as hard links instead of copies.
    pub hard_links: bool,
}

/// Failures waiting for the trainer's next call; beyond this many, the
/// oldest are dropped (they were logged when they happened).
const MAX_PENDING_FAILURES: usize = 16;

/// What the actors and the handle share.
pub(crate) struct Shared {
    pub paths: ModelPaths,
    pub settings: Settings,
    /// Background failures that no ticket took, oldest first: each is
    /// reported once, to one later call of the trainer.
    failures: Mutex<VecDeque<Error>>,
    pub stats: Stats,
    /// Test hook: an artificial delay before each write (ms).
    write_delay_ms: AtomicU64,
}

impl Shared {
    pub fn new(paths: ModelPaths, settings: Settings) -> Shared {
        Shared { paths, settings, failures: Mutex::new(VecDeque::new()), stats: Stats::default(), write_delay_ms: AtomicU64::new(0) }
    }

    /// Report a background failure once: on the save's ticket when there is
    /// one still held, otherwise to the trainer's next call.
    pub fn fail(&self, what: &'static str, e: Error, reply: Option<Reply>) {
        let counter = if what == "save" { &self.stats.failed } else { &self.stats.failed_other };
        counter.fetch_add(1, Ordering::Relaxed);
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
    }

    /// Keep a failure for the trainer's next call.
    pub fn report_later(&self, e: Error) {
        let mut q = lock(&self.failures);
        if q.len() == MAX_PENDING_FAILURES {
            q.pop_front();
        }
        q.push_back(e);
    }

    /// The oldest failure not yet reported, if any.
    pub fn take_failure(&self) -> Option<Error> {
        lock(&self.failures).pop_front()
    }

    pub fn write_delay(&self) -> Duration {
        Duration::from_millis(self.write_delay_ms.load(Ordering::Relaxed))
    }

    pub fn set_write_delay(&self, d: Duration) {
        self.write_delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }
}

/// Lower the calling thread's scheduling priority (nice 10), so background
/// checksumming and writing run in the time training leaves idle.
fn yield_cpu() {
    // SAFETY: plain syscalls on the calling thread's own id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// The running actor system.
pub(crate) struct Actors {
    pub stager: Addr<Stager>,
    system: actix::System,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Actors {
    /// Start the system thread and the four actors.
    pub fn start(shared: Arc<Shared>) -> Result<Actors> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("modelio-actors".into())
            .spawn(move || {
                let system = actix::System::new();
                system.block_on(async move {
                    // Factories run on the actor's own thread: the disk-bound
                    // actors yield the CPU to training; the stager does not,
                    // since optimizer steps wait for its copies.
                    let s = shared.clone();
                    let backup = SyncArbiter::start(1, move || {
                        yield_cpu();
                        backup::BackupActor { shared: s.clone() }
                    });
                    let s = shared.clone();
                    let snapshot = SyncArbiter::start(1, move || {
                        yield_cpu();
                        snapshot::SnapshotActor { shared: s.clone() }
                    });
                    let s = shared.clone();
                    let saver = SyncArbiter::start(1, move || {
                        yield_cpu();
                        saver::Saver {
                        shared: s.clone(),
                        backup: backup.clone(),
                        snapshot: snapshot.clone(),
                        last_committed: None,
                        }
                    });
                    let s = shared.clone();
                    let stager = SyncArbiter::start(1, move || Stager { shared: s.clone(), saver: saver.clone() });
                    let _ = tx.send((stager, actix::System::current()));
                });
                let _ = system.run();
            })
            .map_err(|e| Error::io("start actor thread for", ".", e))?;
        let (stager, system) = rx.recv().map_err(|_| Error::Stopped)?;
        Ok(Actors { stager, system, thread: Some(thread) })
    }

    /// Wait until everything sent so far is done.
    pub async fn flush(&self) -> Result<()> {
        self.stager.send(Flush).await.map_err(|_| Error::Stopped)
    }

    /// Flush, blocking the calling thread (for `Drop` and non-async callers).
    pub fn flush_blocking(&self) -> Result<()> {
        futures::executor::block_on(self.stager.send(Flush)).map_err(|_| Error::Stopped)
    }

    /// Stop the system and join its thread (call after a flush).
    pub fn stop(&mut self) {
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Actors {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.flush_blocking();
            self.stop();
        }
    }
}
