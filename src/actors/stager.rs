//! The stager: copies a save's tensors into host buffers off the trainer's
//! thread, releases the fence, checksums the copy and passes the save on to
//! the saver (as a `Write`, or a `Lost` when it failed: the saver counts them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Addr, Handler, SyncContext};

use super::messages::{Flush, Lost, Stage, Write};
use super::saver::Saver;
use super::{guarded, Shared};
use crate::error::{Result, Work};
use crate::staging::{FenceGuard, Lease};

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

/// A staged save: its lease, the checksums of each buffer, the time staging took.
type Staged = (Lease, Vec<(u32, u32)>, Duration);

/// Wait for a save's device-to-host copies, copy its CPU tensors, release
/// the fence, checksum the staged bytes.
fn stage(
    tensors: Vec<(usize, tch::Tensor)>,
    mut lease: Lease,
    guard: Option<FenceGuard>,
    events: Vec<crate::staging::cuda::Event>,
) -> Result<Staged> {
    let start = Instant::now();
    // The trainer queued the device-to-host copies in stream order and
    // recorded an event after them; wait for exactly those copies here,
    // off the trainer's thread.
    let landed = events.iter().try_for_each(crate::staging::cuda::Event::wait);
    drop(events);
    let copied = landed.and_then(|()| copy_all(&tensors, &mut lease));
    // The bytes are in the lease: parameters may change again. The
    // checksums are computed on the staged copy, after the fence.
    drop(tensors);
    drop(guard);
    copied?;
    let crcs = checksum_all(&lease);
    Ok((lease, crcs, start.elapsed()))
}

impl Handler<Stage> for Stager {
    type Result = ();
    fn handle(&mut self, msg: Stage, _: &mut Self::Context) {
        let Stage { job, tensors, lease, guard, events } = msg;
        // A panic drops the guard while unwinding: the fence is released.
        match guarded(Work::Save, || stage(tensors, lease, guard, events)) {
            Ok((lease, crcs, copy)) => self.saver.do_send(Write { job, lease, crcs, copy }),
            Err(e) => {
                self.saver.do_send(Lost);
                self.shared.fail(Work::Save, e, Some(job.reply));
            }
        }
    }
}

impl Handler<Flush> for Stager {
    type Result = ();
    /// Behind every save this actor handed over: the saver sees it after them.
    fn handle(&mut self, msg: Flush, _: &mut Self::Context) {
        self.saver.do_send(msg);
    }
}
