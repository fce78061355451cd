//! The stager: copies a save's tensors into host buffers off the trainer's
//! thread, releases the fence, checksums the copy and passes the save on to
//! the saver (as a `Write`, or a `Lost` when it failed: the saver counts them).

use std::sync::Arc;

use actix::{Addr, Handler, SyncContext};

use super::messages::{Flush, Lost, Stage, Write};
use super::saver::Saver;
use super::{guarded, Shared};
use crate::error::Work;

pub(crate) struct Stager {
    pub shared: Arc<Shared>,
    pub saver: Addr<Saver>,
}

impl actix::Actor for Stager {
    type Context = SyncContext<Self>;
}

impl Handler<Stage> for Stager {
    type Result = ();
    fn handle(&mut self, msg: Stage, _: &mut Self::Context) {
        let Stage { job, copies } = msg;
        // A panic drops the guard while unwinding: the fence is released.
        match guarded(Work::Save, || copies.land()) {
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
