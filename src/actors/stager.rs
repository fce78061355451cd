//! The stager: copies a save's tensors into host buffers off the trainer's
//! thread, releases the fence, checksums the copy and passes the save on to
//! the saver.

use std::time::Instant;

use actix::{Addr, Handler, SyncContext};

use super::messages::{Flush, Snapshot, Stage, Write};
use super::saver::Saver;
use super::Shared;
use crate::error::Result;
use crate::staging::Lease;
use std::sync::Arc;

pub(crate) struct Stager {
    pub shared: Arc<Shared>,
    pub saver: Addr<Saver>,
}

impl actix::Actor for Stager {
    type Context = SyncContext<Self>;
}

/// Copy CPU tensors into their buffers of the lease. Only this part needs
/// the parameters to hold still.
pub(crate) fn copy_all(tensors: &[(usize, tch::Tensor)], lease: &mut Lease) -> Result<()> {
    for (i, t) in tensors {
        crate::tensors::copy_bytes(t, lease.sized(*i, crate::tensors::byte_len(t)))?;
    }
    Ok(())
}

/// (CRC-32C, zip CRC-32) of every staged buffer.
pub(crate) fn checksum_all(lease: &Lease) -> Vec<(u32, u32)> {
    lease.buffers().iter().map(|b| crate::tensors::checksums(b)).collect()
}

impl Handler<Stage> for Stager {
    type Result = ();
    fn handle(&mut self, msg: Stage, _: &mut Self::Context) {
        let Stage { job, tensors, mut lease, guard, events } = msg;
        let start = Instant::now();
        // The trainer queued the device-to-host copies in stream order and
        // recorded an event after them; wait for exactly those copies here,
        // off the trainer's thread.
        let landed = events.iter().try_for_each(crate::cuda::Event::wait);
        drop(events);
        let copied = landed.and_then(|()| copy_all(&tensors, &mut lease));
        // The bytes are in the lease: parameters may change again. The
        // checksums are computed on the staged copy, after the fence.
        drop(tensors);
        drop(guard);
        match copied {
            Ok(()) => {
                let crcs = checksum_all(&lease);
                self.saver.do_send(Write { job, lease, crcs, copy: start.elapsed() });
            }
            Err(e) => self.shared.fail("save", e, Some(job.reply)),
        }
    }
}

impl Handler<Snapshot> for Stager {
    type Result = ();
    /// Passed on in mailbox order, so the saver sees it after the save it follows.
    fn handle(&mut self, msg: Snapshot, _: &mut Self::Context) {
        self.saver.do_send(msg);
    }
}

impl Handler<Flush> for Stager {
    type Result = ();
    fn handle(&mut self, _: Flush, _: &mut Self::Context) {
        let _ = futures::executor::block_on(self.saver.send(Flush));
    }
}
