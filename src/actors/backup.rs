//! The backup actor: turns files pinned at a save into `<file>.bk`, atomically.

use std::sync::Arc;

use actix::{Handler, SyncContext};

use super::messages::{Backup, Flush};
use super::{guarded, Shared};
use crate::error::{Result, Work};
use crate::folder::durable::{commit, Source};
use crate::folder::snapshot::Pinned;
use crate::folder::ModelPaths;

pub(crate) struct BackupActor {
    pub shared: Arc<Shared>,
}

impl actix::Actor for BackupActor {
    type Context = SyncContext<Self>;
}

/// Replace each `<target>.bk` by a copy of the pinned file (a reflink where
/// the filesystem offers one), or a hard link of it with `hard_links`; the
/// old `.bk` stays until the new one is in place. The pins are removed afterwards.
pub(crate) fn make_backups(pinned: Vec<Pinned>, hard_links: bool) -> Result<()> {
    pinned.iter().try_for_each(|Pinned { pin, target }| {
        let source = if hard_links { Source::Link(pin) } else { Source::Copy(pin) };
        commit(&ModelPaths::backup_of(target), source)
    })
}

impl Handler<Backup> for BackupActor {
    type Result = ();
    fn handle(&mut self, msg: Backup, _: &mut Self::Context) {
        let Backup { pinned, mut committed, reply } = msg;
        match guarded(Work::Backup, || make_backups(pinned, self.shared.settings.hard_links)) {
            Ok(()) => committed.backed_up = true,
            // The save itself is committed: its ticket says so, without a
            // backup; the failure goes to the trainer's next call.
            Err(e) => self.shared.fail(Work::Backup, e, None),
        }
        let _ = reply.send(Ok(committed));
    }
}

impl Handler<Flush> for BackupActor {
    type Result = ();
    fn handle(&mut self, msg: Flush, _: &mut Self::Context) {
        msg.done.handled();
    }
}
