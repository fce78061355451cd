//! Every message the actors exchange. Callers never build these: they use
//! [`crate::ModelIo`], which owns the addresses.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Message;
use tokio::sync::oneshot;

use crate::archive::format::DType;
use crate::error::Error;
use crate::folder::snapshot::Pinned;
use crate::handle::outcome::Committed;
use crate::staging::Lease;

/// Answers a save's ticket: the commit, or the failure as
/// [`Error::Background`] (sent to the handle's next call instead when the
/// ticket is gone).
pub(crate) type Reply = oneshot::Sender<Result<Committed, Error>>;

/// A tensor's description; its bytes are in the lease at the same index.
#[derive(Debug, Clone)]
pub(crate) struct Desc {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl crate::archive::Laid for Desc {
    fn name(&self) -> &str {
        &self.name
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn byte_len(&self) -> usize {
        self.shape.iter().fold(self.dtype.size(), |n, &d| n.saturating_mul(d))
    }
}

/// Everything a save needs besides the tensor bytes.
pub(crate) struct SaveJob {
    pub iterations: u64,
    pub state_json: Vec<u8>,
    pub average_loss: f64,
    pub backup: bool,
    pub model: Vec<Desc>,
    /// Kind, JSON and tensor descriptions (bytes follow the model's in the lease).
    pub optimizer: Option<(String, serde_json::Value, Vec<Desc>)>,
    pub stall: Duration,
    /// Whether the save had to wait for a free staging buffer.
    pub waited: bool,
    /// The exit save (uploaded under every `remote.upload` policy).
    pub exit: bool,
    pub reply: Reply,
}

/// Copy tensors into the lease, then hand the save to the saver.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Stage {
    pub job: SaveJob,
    /// Its copies, started by `save`: the stager lands them.
    pub copies: crate::staging::Copies,
}

/// Write the staged bytes as archive + state file.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Write {
    pub job: SaveJob,
    pub lease: Lease,
    /// (CRC-32C, zip CRC-32) of each buffer, computed by the stager on the staged copy.
    pub crcs: Vec<(u32, u32)>,
    pub copy: Duration,
}

/// The stager could not hand a save over (its ticket has the failure). Sent
/// in place of its [`Write`], so that the saver counts every save the handle
/// queued, in order (see [`Snapshot::after`]).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Lost;

/// Snapshot the save the handle queued last before this request: sent by the
/// handle straight to the saver, which holds it until that save was handed
/// over (committed or failed).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Snapshot {
    /// Iterations of that save, `None` when no save was queued in this run
    /// (then the archive on disk is snapshotted under its own count).
    pub of: Option<u64>,
    /// How many saves the handle had queued when it asked: the snapshot is
    /// due once the saver has had that many `Write`s and `Lost`s.
    pub after: u64,
    /// Held until the snapshot is built or refused.
    pub permit: Permit,
}

/// Build a snapshot from files pinned at save `iterations`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct BuildSnapshot {
    pub iterations: u64,
    pub pinned: Vec<Pinned>,
    /// The request's permit, released once the snapshot is built.
    pub permit: Permit,
}

/// Make `.bk` files from files pinned at a save; then answer
/// the save's ticket, so a committed ticket with `backed_up` means the
/// `.bk` files exist.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Backup {
    pub pinned: Vec<Pinned>,
    pub committed: Committed,
    pub reply: Reply,
}

/// Passed along the actors in mailbox order (stager -> saver -> backup and
/// snapshot); answered once every copy of it was handled, that is once the
/// last actor has handled everything sent before it. No actor waits for it.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Flush {
    pub done: Done,
}

/// One flush's completion, shared by the copies of it passed downstream.
///
/// The answer goes out when the last copy is dropped: an actor hands a copy
/// on ([`Done::fork`]) before it marks its own handled, so the count never
/// reaches zero while some actor still has the flush ahead of it. A copy
/// dropped unhandled (its mailbox went away when the actors stopped) turns
/// the answer into "stopped" instead of a false "done".
pub(crate) struct Done {
    shared: Arc<DoneShared>,
    handled: bool,
}

struct DoneShared {
    /// Taken once, by the last copy's drop.
    reply: Option<oneshot::Sender<()>>,
    /// Set by a copy dropped without [`Done::handled`].
    abandoned: AtomicBool,
}

impl Done {
    /// A flush's first copy, and where its answer arrives (`Ok(())` when
    /// done, an error when a copy was abandoned).
    pub fn new() -> (Done, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (Done { shared: Arc::new(DoneShared { reply: Some(tx), abandoned: AtomicBool::new(false) }), handled: false }, rx)
    }

    /// Another copy, for an actor further down.
    pub fn fork(&self) -> Done {
        Done { shared: self.shared.clone(), handled: false }
    }

    /// This actor has handled everything sent to it before the flush.
    pub fn handled(mut self) {
        self.handled = true;
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if !self.handled {
            self.shared.abandoned.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for DoneShared {
    fn drop(&mut self) {
        // The last copy is gone: every `Relaxed` store above happened before
        // this drop (the `Arc`'s release/acquire count orders them).
        if !self.abandoned.load(Ordering::Relaxed) {
            if let Some(tx) = self.reply.take() {
                let _ = tx.send(());
            }
        }
    }
}

/// One of a bounded number of requests in flight; dropping it frees the place.
pub(crate) struct Permit {
    in_flight: Arc<AtomicUsize>,
}

impl Permit {
    /// A place among `capacity`, or `None` when all are taken.
    pub fn try_acquire(in_flight: &Arc<AtomicUsize>, capacity: usize) -> Option<Permit> {
        in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < capacity).then_some(n + 1))
            .ok()
            .map(|_| Permit { in_flight: in_flight.clone() })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
impl SaveJob {
    /// A save of one f32 tensor `w` of `shape`, for the actors' unit tests.
    pub(crate) fn test(iterations: u64, shape: Vec<usize>, reply: Reply) -> SaveJob {
        SaveJob {
            iterations,
            state_json: {
                let mut state = crate::policy::state::State::new("m");
                state.total_iterations = iterations;
                state.to_json()
            },
            average_loss: 1.0,
            backup: false,
            model: vec![Desc { name: "w".into(), dtype: crate::archive::format::DType::F32, shape }],
            optimizer: None,
            stall: Duration::ZERO,
            waited: false,
            exit: false,
            reply,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_is_answered_when_the_last_copy_is_handled() {
        let (done, mut rx) = Done::new();
        let (a, b) = (done.fork(), done.fork());
        done.handled();
        a.handled();
        assert!(rx.try_recv().is_err(), "one copy is still ahead of an actor");
        b.handled();
        assert_eq!(rx.try_recv(), Ok(()));
    }

    #[test]
    fn an_abandoned_copy_answers_stopped_not_done() {
        let (done, mut rx) = Done::new();
        let lost = done.fork();
        done.handled();
        drop(lost);
        assert_eq!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }

    #[test]
    fn permits_are_bounded_and_freed_on_drop() {
        let n = Arc::new(AtomicUsize::new(0));
        let a = Permit::try_acquire(&n, 2).unwrap();
        let _b = Permit::try_acquire(&n, 2).unwrap();
        assert!(Permit::try_acquire(&n, 2).is_none());
        drop(a);
        assert!(Permit::try_acquire(&n, 2).is_some());
    }
}
