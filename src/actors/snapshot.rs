//! The snapshot actor: builds snapshots from pinned files and applies retention.

use std::sync::Arc;

use actix::{Handler, SyncContext};

use super::messages::{BuildSnapshot, Flush};
use super::Shared;

pub(crate) struct SnapshotActor {
    pub shared: Arc<Shared>,
}

impl actix::Actor for SnapshotActor {
    type Context = SyncContext<Self>;
}

impl Handler<BuildSnapshot> for SnapshotActor {
    type Result = ();
    fn handle(&mut self, msg: BuildSnapshot, _: &mut Self::Context) {
        let paths = &self.shared.paths;
        let settings = self.shared.settings;
        let built = crate::snapshot::build(paths, msg.iterations, &msg.pinned, settings.hard_links)
            .and_then(|dir| crate::snapshot::apply_retention(&paths.dir, settings.snapshot_keep).map(|removed| (dir, removed)));
        for p in &msg.pinned {
            let _ = std::fs::remove_file(&p.pin);
        }
        match built {
            Ok((dir, removed)) => {
                tracing::info!(target: "modelio", iterations = msg.iterations, removed = removed.len(), "snapshot {}", dir.display())
            }
            Err(e) => self.shared.fail("snapshot", e, None),
        }
    }
}

impl Handler<Flush> for SnapshotActor {
    type Result = ();
    fn handle(&mut self, _: Flush, _: &mut Self::Context) {}
}
