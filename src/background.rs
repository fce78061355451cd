//! What every background worker shares. Every worker is one kind of thing:
//! a single-threaded actix `SyncArbiter` started with [`worker`] on the
//! [`Workers`] system of its handle (the saver, backup, snapshot and stager
//! actors of a `ModelIo`; the uploader of its remote tier; a rank's shard
//! writer and coordinator). Around them: a lock that survives a panicked
//! holder, work whose panic becomes an error ([`guarded`]), the slot of a
//! worker whose policy is "the newest replaces the waiting job"
//! ([`Newest`]), and the inbox where failures wait for the caller's next
//! call ([`Inbox`]).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;

use actix::{Actor, Addr, SyncArbiter, SyncContext};

use crate::error::{Error, Result, Work};

/// Lock a mutex, recovering the data if a thread panicked while holding it
/// (every value guarded with it stays consistent between statements).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Run the work of a handler, turning a panic into [`Error::Internal`] so
/// that the worker answers the request it was handling and goes on serving
/// later ones (the actors' handlers and the uploader run their work in it).
///
/// Why `catch_unwind` rather than actix supervision: supervision restarts
/// only async (`Context`) actors; a `SyncArbiter` thread that panics is gone
/// for good, and with it the request in hand, whose ticket would read
/// "stopped" instead of what happened. Handlers keep their own state (the
/// saver's `SnapshotOrder`) outside the guarded work, so nothing
/// half-updated is seen afterwards (hence `AssertUnwindSafe`); what the work
/// owned is dropped while unwinding (a lease returns to the pool, a fence
/// guard releases the fence), and a temporary file it left is removed at the
/// next open. This needs `panic = "unwind"`, Rust's default.
#[cfg_attr(not(feature = "torch"), allow(dead_code))]
pub(crate) fn guarded<T>(what: Work, work: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|payload| {
        let message = match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
            (Some(s), _) => (*s).to_string(),
            (_, Some(s)) => s.clone(),
            _ => "a panic without a message".to_string(),
        };
        Err(Error::Internal { what, message })
    })
}

/// Lower the calling thread's scheduling priority, so backups, snapshots
/// and uploads run in the time training leaves idle:
/// nice 10, and the batch policy (`SCHED_BATCH`), under which a thread
/// woken (by a finished write, a network reply) does not preempt a training
/// thread that is running, but waits for its turn.
pub(crate) fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread's own id; the parameter
    // is a plain struct read by the kernel. A refusal changes nothing.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
    }
}

/// The actix system one handle's workers run on, on a thread of its own;
/// each worker started there with [`worker`] is a thread too.
pub(crate) struct Workers {
    system: actix::System,
    thread: Option<JoinHandle<()>>,
}

impl Workers {
    /// Start the system on a thread named `name`, and `setup` on it: it
    /// starts the workers (with [`worker`]) and returns their addresses.
    ///
    /// # Errors
    /// [`Error::Io`] when the thread cannot be started; [`Error::Stopped`]
    /// when `setup` did not finish.
    pub fn start<R: Send + 'static>(name: &str, setup: impl FnOnce() -> R + Send + 'static) -> Result<(Workers, R)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let system = actix::System::new();
                let ok = system.block_on(async move {
                    // actix panics when it cannot start a worker's thread.
                    let started = std::panic::catch_unwind(AssertUnwindSafe(setup));
                    let ok = started.is_ok();
                    let _ = tx.send(started.map(|s| (s, actix::System::current())));
                    ok
                });
                if ok {
                    let _ = system.run();
                }
            })
            .map_err(|e| Error::io("start the worker thread", name, e))?;
        match rx.recv() {
            Ok(Ok((started, system))) => Ok((Workers { system, thread: Some(thread) }, started)),
            Ok(Err(_)) | Err(_) => {
                let _ = thread.join();
                let e = std::io::Error::other("a worker thread could not be started (too many threads, or out of memory)");
                Err(Error::io("start the worker threads", name, e))
            }
        }
    }

    /// Not stopped yet.
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    pub fn is_running(&self) -> bool {
        self.thread.is_some()
    }

    /// Stop the system and join its thread. A worker finishes the message
    /// in hand and gets no more; call it once they are idle.
    pub fn stop(&mut self) {
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How a worker's thread is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    /// As the trainer's threads: work training waits for (the stager's
    /// deferred copies; a rank's shard writer and coordinator, which the other
    /// ranks' steps wait for), and a save's short bursts of work between its
    /// writes (the stager, the saver), best done as soon as the disk is ready.
    Normal,
    /// Below them ([`lower_priority`]): backups, snapshots, uploads, which
    /// training does not wait for and which may take as long as they need.
    Low,
}

/// Start one worker named `name` on the running [`Workers`] system: a
/// single-threaded `SyncArbiter` (one message at a time, in order) whose
/// actor `make` builds on the worker's own thread.
pub(crate) fn worker<A>(name: &'static str, priority: Priority, make: impl Fn() -> A + Send + Sync + 'static) -> Addr<A>
where
    A: Actor<Context = SyncContext<A>>,
{
    let thread = move || std::thread::Builder::new().name(name.into());
    SyncArbiter::start_with_thread_builder(1, thread, move || {
        if priority == Priority::Low {
            lower_priority();
        }
        make()
    })
}

/// Work a [`Newest`] slot holds: known by the step (iterations) it is of.
#[cfg_attr(not(feature = "remote"), allow(dead_code))]
pub(crate) trait Step {
    fn step(&self) -> u64;
}

/// The slot of a worker whose policy is "the newest replaces the waiting
/// job" (the uploader, a rank's shard writer): one job runs, at most one
/// waits, and an offer replaces the waiting one, which its owner counts as
/// skipped. Memory and disk so hold at most two jobs however fast they come.
/// A plain value: its owner keeps it under the lock of its other state and
/// wakes its worker.
#[derive(Debug)]
#[cfg_attr(not(feature = "remote"), allow(dead_code))]
pub(crate) struct Newest<T> {
    waiting: Option<T>,
    /// The step of the job in progress.
    running: Option<u64>,
}

impl<T> Default for Newest<T> {
    fn default() -> Self {
        Newest { waiting: None, running: None }
    }
}

#[cfg_attr(not(all(feature = "torch", feature = "remote")), allow(dead_code))]
impl<T: Step> Newest<T> {
    /// Let `job` wait, returning the job it replaced.
    pub fn offer(&mut self, job: T) -> Option<T> {
        self.waiting.replace(job)
    }

    /// The worker takes the waiting job, which is now the one in progress
    /// (also while another is: a newer job replaces one that keeps failing).
    pub fn start(&mut self) -> Option<T> {
        let job = self.waiting.take()?;
        self.running = Some(job.step());
        Some(job)
    }

    /// The job in progress is over.
    pub fn finish(&mut self) {
        self.running = None;
    }

    /// Take the waiting job back (it will not run: a stop).
    pub fn cancel(&mut self) -> Option<T> {
        self.waiting.take()
    }

    pub fn waiting(&self) -> Option<&T> {
        self.waiting.as_ref()
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Nothing in progress and nothing waiting.
    pub fn is_idle(&self) -> bool {
        self.running.is_none() && self.waiting.is_none()
    }

    /// Whether a job of `step` waits or is in progress.
    pub fn holds(&self, step: u64) -> bool {
        self.running == Some(step) || self.waiting.as_ref().is_some_and(|w| w.step() == step)
    }

    /// The step to be done next: the waiting one, else the one in progress.
    pub fn pending(&self) -> Option<u64> {
        self.waiting.as_ref().map(Step::step).or(self.running)
    }
}

/// Failures of background work (a save, a backup, a snapshot, a shard, a
/// commit) that no caller has heard of yet, oldest first: each is reported
/// once, to one later call. Every failure is logged where it happens; past
/// [`Inbox::CAPACITY`] waiting ones, newer ones are only logged, so the next
/// call always hears of the oldest.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    waiting: Mutex<VecDeque<Error>>,
}

impl Inbox {
    pub const CAPACITY: usize = 16;

    /// Keep `e` for a later call; `false` when the inbox is full (then `e`
    /// is only logged).
    pub fn keep(&self, e: Error) -> bool {
        let mut q = lock(&self.waiting);
        if q.len() < Self::CAPACITY {
            q.push_back(e);
            return true;
        }
        drop(q);
        tracing::error!(target: "modelio", "not kept for a later call ({} older failures wait): {}", Self::CAPACITY, e.report());
        false
    }

    /// Give back a failure taken with [`Inbox::take`] that could not be
    /// reported after all: it is the oldest again.
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    pub fn put_back(&self, e: Error) {
        let mut q = lock(&self.waiting);
        q.push_front(e);
        q.truncate(Self::CAPACITY);
    }

    /// The oldest failure not yet reported, if any.
    pub fn take(&self) -> Option<Error> {
        lock(&self.waiting).pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(n: usize) -> Error {
        Error::Overloaded { what: Work::Save, capacity: n }
    }

    fn number(e: Option<Error>) -> Option<usize> {
        match e {
            Some(Error::Overloaded { capacity, .. }) => Some(capacity),
            _ => None,
        }
    }

    #[test]
    fn a_lowered_thread_is_niced_and_batch_scheduled() {
        let (nice, policy) = std::thread::spawn(|| {
            lower_priority();
            // SAFETY: plain queries of the calling thread.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                (libc::getpriority(libc::PRIO_PROCESS, tid), libc::sched_getscheduler(0))
            }
        })
        .join()
        .unwrap();
        // At least 10 (a test run started at a higher nice may not go back).
        assert!(nice >= 10 && policy == libc::SCHED_BATCH, "nice {nice}, policy {policy}");
    }

    #[test]
    fn a_panic_becomes_an_internal_error_naming_it() {
        let e = guarded::<()>(Work::Save, || panic!("disk on fire: {}", 7)).unwrap_err();
        assert!(matches!(&e, Error::Internal { what: Work::Save, message } if message == "disk on fire: 7"), "{e:?}");
        let e = guarded::<()>(Work::Save, || std::panic::panic_any(7u8)).unwrap_err();
        assert!(e.to_string().contains("a panic without a message"), "{e}");
    }

    #[test]
    fn the_oldest_failures_are_kept_and_reported_once_each() {
        let inbox = Inbox::default();
        for n in 0..Inbox::CAPACITY {
            assert!(inbox.keep(failure(n)));
        }
        assert!(!inbox.keep(failure(99)), "a full inbox keeps the older failures");
        assert_eq!(number(inbox.take()), Some(0));
        inbox.put_back(failure(0));
        assert_eq!(number(inbox.take()), Some(0), "given back: the oldest again");
        let rest: Vec<_> = std::iter::from_fn(|| number(inbox.take())).collect();
        assert_eq!(rest, (1..Inbox::CAPACITY).collect::<Vec<_>>());
        assert!(inbox.take().is_none());
    }

    #[test]
    fn a_failure_given_back_to_a_full_inbox_drops_the_newest() {
        let inbox = Inbox::default();
        for n in 0..Inbox::CAPACITY {
            inbox.keep(failure(n));
        }
        inbox.put_back(failure(100));
        let all: Vec<_> = std::iter::from_fn(|| number(inbox.take())).collect();
        assert_eq!(all.len(), Inbox::CAPACITY);
        assert_eq!((all.first(), all.last()), (Some(&100), Some(&(Inbox::CAPACITY - 2))));
    }

    struct Job(u64);
    impl Step for Job {
        fn step(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn the_newest_job_replaces_the_waiting_one_and_the_running_one_stays() {
        let mut slot = Newest::default();
        assert!(slot.is_idle() && slot.pending().is_none() && slot.start().is_none());
        assert!(slot.offer(Job(1)).is_none());
        assert_eq!(slot.start().map(|j| j.0), Some(1));
        assert!(slot.is_running() && !slot.is_idle() && slot.holds(1) && !slot.holds(2));
        assert!(slot.offer(Job(2)).is_none(), "one waits beside the one running");
        assert_eq!(slot.offer(Job(3)).map(|j| j.0), Some(2), "a newer one replaces the waiting one");
        assert_eq!((slot.pending(), slot.waiting().map(|j| j.0)), (Some(3), Some(3)));
        assert!(slot.holds(1) && slot.holds(3) && !slot.holds(2));
        slot.finish();
        assert_eq!(slot.pending(), Some(3));
        assert_eq!(slot.start().map(|j| j.0), Some(3));
        assert_eq!(slot.pending(), Some(3), "in progress");
        assert!(slot.offer(Job(4)).is_none());
        assert_eq!(slot.start().map(|j| j.0), Some(4), "taken while another runs: that one is given up");
        assert!(slot.holds(4) && !slot.holds(3));
        assert!(slot.offer(Job(5)).is_none());
        assert_eq!(slot.cancel().map(|j| j.0), Some(5));
        slot.finish();
        assert!(slot.is_idle() && slot.pending().is_none());
    }

    struct Echo;
    impl Actor for Echo {
        type Context = SyncContext<Self>;
    }
    #[derive(actix::Message)]
    #[rtype(result = "String")]
    struct Name;
    impl actix::Handler<Name> for Echo {
        type Result = String;
        fn handle(&mut self, _: Name, _: &mut SyncContext<Self>) -> String {
            std::thread::current().name().unwrap_or("").to_string()
        }
    }

    #[test]
    fn workers_run_on_a_system_of_their_own_and_stop_with_it() {
        let (mut workers, echo) = Workers::start("modelio-test-workers", || worker("modelio-test-echo", Priority::Low, || Echo)).unwrap();
        let answer = futures::executor::block_on(echo.send(Name)).unwrap();
        assert_eq!(answer, "modelio-test-echo", "a worker has a thread of its own, named");
        workers.stop();
        assert!(futures::executor::block_on(echo.send(Name)).is_err(), "stopped with the system");
    }
}
