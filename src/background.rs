//! What every background worker shares: a lock that survives a panicked
//! holder, work whose panic becomes an error, and the inbox where failures
//! wait for the caller's next call.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

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
pub(crate) fn guarded<T>(what: &'static str, work: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|payload| {
        let message = match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
            (Some(s), _) => (*s).to_string(),
            (_, Some(s)) => s.clone(),
            _ => "a panic without a message".to_string(),
        };
        Err(Error::Internal { what, message })
    })
}

/// Lower the calling thread's scheduling priority (nice 10), so background
/// checksumming, writing and uploading run in the time training leaves idle.
pub(crate) fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread's own id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
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
        Error::Overloaded { what: "test", capacity: n }
    }

    fn number(e: Option<Error>) -> Option<usize> {
        match e {
            Some(Error::Overloaded { capacity, .. }) => Some(capacity),
            _ => None,
        }
    }

    #[test]
    fn a_panic_becomes_an_internal_error_naming_it() {
        let e = guarded::<()>("save", || panic!("disk on fire: {}", 7)).unwrap_err();
        assert!(matches!(&e, Error::Internal { what: "save", message } if message == "disk on fire: 7"), "{e:?}");
        let e = guarded::<()>("save", || std::panic::panic_any(7u8)).unwrap_err();
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
}
