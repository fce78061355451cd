//! The backup actor: turns pinned links into `<file>.bk`, atomically.

use std::sync::Arc;

use actix::{Handler, SyncContext};

use super::messages::{Backup, Flush};
use super::Shared;
use crate::durable::{commit, Source};
use crate::error::Result;
use crate::folder::ModelPaths;

pub(crate) struct BackupActor {
    pub shared: Arc<Shared>,
}

impl actix::Actor for BackupActor {
    type Context = SyncContext<Self>;
}

/// Replace each `<target>.bk` by the pinned file; the old `.bk` stays until
/// the new one is in place. The pins are removed afterwards.
pub(crate) fn make_backups(pinned: &[(std::path::PathBuf, std::path::PathBuf)]) -> Result<()> {
    let result = pinned.iter().try_for_each(|(pin, target)| commit(&ModelPaths::backup_of(target), Source::Link(pin)));
    for (pin, _) in pinned {
        let _ = std::fs::remove_file(pin);
    }
    result
}

impl Handler<Backup> for BackupActor {
    type Result = ();
    fn handle(&mut self, msg: Backup, _: &mut Self::Context) {
        if let Err(e) = make_backups(&msg.pinned) {
            self.shared.fail("backup", e, None);
        }
    }
}

impl Handler<Flush> for BackupActor {
    type Result = ();
    fn handle(&mut self, _: Flush, _: &mut Self::Context) {}
}
