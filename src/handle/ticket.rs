//! The ticket of one save: its outcome, as a future or polled.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use super::Committed;
use crate::actors::Shared;
use crate::error::{Error, Result};

/// The outcome of one save: await it (it is a `Future`), poll it with
/// [`Ticket::try_result`], or drop it.
///
/// A failure is reported once: to whoever reads the ticket, or, when the
/// ticket is dropped without being read, to the handle's next call.
#[must_use = "a ticket carries the save's outcome; dropped unread, a failure is reported by the next call instead"]
pub struct Ticket {
    inner: TicketInner,
    /// Where an unread failure goes when the ticket is dropped.
    shared: Option<Arc<Shared>>,
}

enum TicketInner {
    Pending(oneshot::Receiver<Result<Committed, Error>>),
    Ready(Committed),
    Taken,
}

impl Ticket {
    /// A save answered at the call (skipped, or nothing to write).
    pub(super) fn ready(c: Committed) -> Ticket {
        Ticket { inner: TicketInner::Ready(c), shared: None }
    }

    /// A save the workers will answer on `rx`; an unread failure goes to `shared`.
    pub(super) fn pending(rx: oneshot::Receiver<Result<Committed, Error>>, shared: Arc<Shared>) -> Ticket {
        Ticket { inner: TicketInner::Pending(rx), shared: Some(shared) }
    }

    /// Wait for the save to be committed (archive, state file and, when this
    /// save improved the loss, its `.bk` backups). Does not block the
    /// runtime: the same as `ticket.await`.
    ///
    /// # Errors
    /// [`Error::Background`] when the save failed, [`Error::Stopped`] when the
    /// actors died before answering.
    pub async fn wait(self) -> Result<Committed> {
        self.await
    }

    /// [`Ticket::wait`] for synchronous code. Blocks the calling thread (never
    /// panics, also not inside a tokio runtime; there it stalls that
    /// runtime's thread until the commit, so prefer `.await` in async code).
    ///
    /// # Errors
    /// As [`Ticket::wait`].
    pub fn wait_blocking(self) -> Result<Committed> {
        futures::executor::block_on(self)
    }

    /// The outcome if it is known, without waiting: `None` while the save
    /// is still in flight. Once it returned `Some`, the ticket is spent.
    pub fn try_result(&mut self) -> Option<Result<Committed>> {
        match std::mem::replace(&mut self.inner, TicketInner::Taken) {
            TicketInner::Ready(c) => Some(Ok(c)),
            TicketInner::Taken => Some(Err(Error::Stopped)),
            TicketInner::Pending(mut rx) => match rx.try_recv() {
                Ok(r) => Some(r),
                Err(oneshot::error::TryRecvError::Empty) => {
                    self.inner = TicketInner::Pending(rx);
                    None
                }
                Err(oneshot::error::TryRecvError::Closed) => Some(Err(Error::Stopped)),
            },
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.inner {
            TicketInner::Pending(_) => "pending",
            TicketInner::Ready(_) => "ready",
            TicketInner::Taken => "taken",
        };
        f.debug_struct("Ticket").field("state", &state).finish()
    }
}

impl Future for Ticket {
    type Output = Result<Committed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match &mut this.inner {
            TicketInner::Pending(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(r) => {
                    this.inner = TicketInner::Taken;
                    Poll::Ready(r.unwrap_or(Err(Error::Stopped)))
                }
            },
            TicketInner::Ready(_) => match std::mem::replace(&mut this.inner, TicketInner::Taken) {
                TicketInner::Ready(c) => Poll::Ready(Ok(c)),
                _ => Poll::Ready(Err(Error::Stopped)),
            },
            TicketInner::Taken => Poll::Ready(Err(Error::Stopped)),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A failure that already arrived and was never read goes to the next
        // call; one that arrives later finds the receiver gone and goes there too.
        if let (TicketInner::Pending(rx), Some(shared)) = (&mut self.inner, &self.shared) {
            // Close first: an answer sent after this fails to arrive and goes
            // to the next call; one that arrived before is taken here.
            rx.close();
            if let Ok(Err(e)) = rx.try_recv() {
                shared.report_later(e);
            }
        }
    }
}
