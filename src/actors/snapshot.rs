//! The snapshot actor: builds snapshots from pinned files and applies retention.

use std::sync::Arc;

use actix::{Handler, SyncContext};

use super::messages::{BuildSnapshot, Flush};
use super::{guarded, Shared};
use crate::error::Work;

pub(crate) struct SnapshotActor {
    pub shared: Arc<Shared>,
}

impl actix::Actor for SnapshotActor {
    type Context = SyncContext<Self>;
}

impl Handler<BuildSnapshot> for SnapshotActor {
    type Result = ();
    fn handle(&mut self, msg: BuildSnapshot, _: &mut Self::Context) {
        let BuildSnapshot { iterations, pinned, permit } = msg;
        let paths = &self.shared.paths;
        let settings = self.shared.settings;
        let built = guarded(Work::Snapshot, || {
            crate::folder::snapshot::build(paths, iterations, &pinned, settings.hard_links)
                .and_then(|dir| crate::folder::snapshot::apply_retention(paths, settings.snapshot_keep).map(|removed| (dir, removed)))
        });
        // Built (or failed) and its pins gone: the request is no longer in flight.
        drop(pinned);
        drop(permit);
        match built {
            Ok((dir, removed)) => {
                tracing::info!(target: "modelio", iterations, removed = removed.len(), "snapshot {}", dir.display())
            }
            Err(e) => self.shared.fail(Work::Snapshot, e, None),
        }
    }
}

impl Handler<Flush> for SnapshotActor {
    type Result = ();
    fn handle(&mut self, msg: Flush, _: &mut Self::Context) {
        msg.done.handled();
    }
}
