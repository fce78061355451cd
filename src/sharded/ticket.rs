//! What a rank's save becomes: a [`ShardTicket`] to await, resolving to a
//! [`ShardSaved`], and what [`ShardedIo::finish`](super::ShardedIo::finish) returns.
// Without libtorch there is nothing to save: only the types are used.
#![cfg_attr(not(feature = "torch"), allow(dead_code))]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::{Error, Result, Work};

/// The outcome of one rank's save.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSaved {
    pub iterations: u64,
    /// The shard's size in the store (0 when skipped).
    pub bytes: u64,
    /// How long the save held the caller: taking a staging buffer and,
    /// with the default immediate CPU copy, one memcpy of the rank's tensors.
    pub stall: Duration,
    /// Landing the copies off the caller's thread: the device-to-host
    /// copies waited for, deferred CPU copies, checksums.
    pub copy: Duration,
    /// Writing the shard (streamed in parts when large) and its done-record.
    pub write: Duration,
    /// Replaced by a newer save or skipped before it was written
    /// (`staging.on_busy = "skip"`): a step some rank skipped is never
    /// committed.
    pub skipped: bool,
    /// The step's global manifest exists: the coordinator (rank 0) waits
    /// for its step's commit before its ticket resolves; other ranks' tickets
    /// resolve once their shard and done-record are stored, so it is false
    /// there, except in [`ShardedIo::finish`](super::ShardedIo::finish)'s
    /// exit save, which every rank waits for.
    pub committed: bool,
}

impl ShardSaved {
    pub(crate) fn skipped(iterations: u64, stall: Duration) -> ShardSaved {
        ShardSaved { iterations, bytes: 0, stall, copy: Duration::ZERO, write: Duration::ZERO, skipped: true, committed: false }
    }
}

/// What [`ShardedIo::finish`](super::ShardedIo::finish) did: the exit save,
/// and the failures of the run not reported yet (an earlier shard not
/// written or step not committed whose ticket was dropped, a backup, a
/// snapshot), oldest first.
#[derive(Debug)]
pub struct ShardFinished {
    pub exit_save: ShardSaved,
    pub unreported: Vec<Error>,
}

/// Where a save's outcome is sent.
pub(crate) type Reply = oneshot::Sender<Result<ShardSaved>>;

/// A rank's save in the background: await it (or [`ShardTicket::wait_blocking`])
/// for its [`ShardSaved`] or its failure. Dropping it is fine: a failure
/// then goes to the next `flush` or `finish`.
#[must_use = "a dropped ticket sends a failure to the next flush instead"]
pub struct ShardTicket {
    state: State,
}

enum State {
    Ready(Option<Result<ShardSaved>>),
    Pending(oneshot::Receiver<Result<ShardSaved>>),
}

impl ShardTicket {
    pub(crate) fn ready(outcome: Result<ShardSaved>) -> ShardTicket {
        ShardTicket { state: State::Ready(Some(outcome)) }
    }

    pub(crate) fn pending() -> (ShardTicket, Reply) {
        let (tx, rx) = oneshot::channel();
        (ShardTicket { state: State::Pending(rx) }, tx)
    }

    /// Block the calling thread until the save is over. Not from a task of
    /// an async runtime (tokio refuses to block one): await the ticket there.
    ///
    /// # Errors
    /// The save's failure: the shard or done-record not written, on the
    /// coordinator the step not committed.
    pub fn wait_blocking(self) -> Result<ShardSaved> {
        match self.state {
            State::Ready(outcome) => outcome.unwrap_or_else(|| Err(gone())),
            State::Pending(rx) => rx.blocking_recv().unwrap_or_else(|_| Err(gone())),
        }
    }

    /// The outcome if the save is over, without waiting.
    pub fn try_result(&mut self) -> Option<Result<ShardSaved>> {
        match &mut self.state {
            State::Ready(outcome) => outcome.take(),
            State::Pending(rx) => match rx.try_recv() {
                Ok(outcome) => Some(outcome),
                Err(oneshot::error::TryRecvError::Empty) => None,
                Err(oneshot::error::TryRecvError::Closed) => Some(Err(gone())),
            },
        }
    }
}

/// The outcome of a save whose worker stopped without telling it.
fn gone() -> Error {
    Error::Internal { what: Work::ShardedSave, message: "the save's worker stopped before reporting its outcome".into() }
}

impl std::fmt::Debug for ShardTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Ready(_) => "ready",
            State::Pending(_) => "pending",
        };
        f.debug_struct("ShardTicket").field("state", &state).finish()
    }
}

impl Future for ShardTicket {
    type Output = Result<ShardSaved>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Ready(outcome) => Poll::Ready(outcome.take().unwrap_or_else(|| Err(gone()))),
            State::Pending(rx) => Pin::new(rx).poll(cx).map(|r| r.unwrap_or_else(|_| Err(gone()))),
        }
    }
}

/// Send `outcome` to the ticket; a failure nobody holds a ticket for is
/// kept for the next flush by `keep`.
pub(crate) fn deliver(reply: Option<Reply>, outcome: Result<ShardSaved>, keep: impl FnOnce(Error)) {
    let unsent = match reply {
        Some(tx) => tx.send(outcome).err(),
        None => Some(outcome),
    };
    if let Some(Err(e)) = unsent {
        keep(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_reaches_the_ticket_or_else_the_flush() {
        let (ticket, tx) = ShardTicket::pending();
        let mut kept = Vec::new();
        deliver(Some(tx), Err(Error::Internal { what: Work::ShardedSave, message: "x".into() }), |e| kept.push(e));
        assert!(kept.is_empty());
        assert!(ticket.wait_blocking().is_err());
        let (ticket, tx) = ShardTicket::pending();
        drop(ticket);
        deliver(Some(tx), Err(Error::Internal { what: Work::ShardedSave, message: "y".into() }), |e| kept.push(e));
        assert_eq!(kept.len(), 1);
        // A dropped reply is an error, never a hang.
        let (ticket, tx) = ShardTicket::pending();
        drop(tx);
        assert!(ticket.wait_blocking().is_err());
    }
}
