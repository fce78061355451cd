//! The keys of a model's sharded checkpoints in their store.

use object_store::path::Path as Key;

/// The keys of one model's sharded checkpoints, under
/// `<prefix>/<model>/sharded/` of their store (the model folder, or
/// `[remote]`'s URL): `steps/<n>/rank-<r>-<upload>.mio` and `done-<r>.json`
/// (a step's shards and their records), `manifests/<n>.json` (committed
/// steps), `snapshots/<n>.json`, `BACKUP`, `LATEST` and `runs/<id>.json`;
/// `<n>` is the iteration count, 20 digits wide so that keys sort by it.
/// The commands read a sharded folder through it too.
#[derive(Debug, Clone)]
pub struct Layout {
    root: Key,
}

impl Layout {
    /// The folder of a model's sharded checkpoints, inside the model's own.
    pub const FOLDER: &'static str = "sharded";
    pub const MANIFESTS: &'static str = "manifests";
    pub const STEPS: &'static str = "steps";
    pub const SNAPSHOTS: &'static str = "snapshots";
    pub const BACKUP: &'static str = "BACKUP";
    pub const LATEST: &'static str = "LATEST";
    /// What a sharded folder holds: any of these marks one.
    pub const MARKS: [&'static str; 5] = [Self::MANIFESTS, Self::STEPS, Self::SNAPSHOTS, Self::BACKUP, Self::LATEST];

    /// Model `model`'s sharded checkpoints under `prefix` (the store's root
    /// path; empty for a model folder).
    pub fn new(prefix: &Key, model: &str) -> Layout {
        Layout { root: prefix.clone().join(model).join(Self::FOLDER) }
    }

    /// Keys relative to the sharded folder itself, for reading one as files.
    pub fn relative() -> Layout {
        Layout { root: Key::default() }
    }

    /// `<prefix>/<model>/sharded`.
    pub fn root(&self) -> &Key {
        &self.root
    }

    pub fn steps(&self) -> Key {
        self.root.clone().join(Self::STEPS)
    }

    pub fn step(&self, iterations: u64) -> Key {
        self.steps().join(format!("{iterations:020}"))
    }

    /// A rank's shard of a step; `upload` makes each write's key its own.
    pub fn shard(&self, iterations: u64, rank: usize, upload: &str) -> Key {
        self.step(iterations).join(format!("rank-{rank}-{upload}.mio"))
    }

    /// A rank's done-record of a step, written after its shard.
    pub fn done(&self, iterations: u64, rank: usize) -> Key {
        self.step(iterations).join(format!("done-{rank}.json"))
    }

    pub fn manifests(&self) -> Key {
        self.root.clone().join(Self::MANIFESTS)
    }

    /// The global manifest that commits a step.
    pub fn manifest(&self, iterations: u64) -> Key {
        self.manifests().join(format!("{iterations:020}.json"))
    }

    pub fn latest(&self) -> Key {
        self.root.clone().join(Self::LATEST)
    }

    /// The record a coordinator makes of its run id when it opens.
    pub fn run(&self, run_id: &str) -> Key {
        self.root.clone().join("runs").join(format!("{run_id}.json"))
    }

    pub fn backup(&self) -> Key {
        self.root.clone().join(Self::BACKUP)
    }

    pub fn snapshots(&self) -> Key {
        self.root.clone().join(Self::SNAPSHOTS)
    }

    pub fn snapshot(&self, iterations: u64) -> Key {
        self.snapshots().join(format!("{iterations:020}.json"))
    }

    /// The sharded folder's part of shard key `key` (`<prefix>/<model>/sharded`
    /// of `<prefix>/<model>/sharded/steps/...`); `None` when it is not one.
    pub fn root_of_shard_key(key: &str) -> Option<&str> {
        let parts: Vec<&str> = key.split('/').collect();
        let at = parts.windows(2).position(|w| w == [Self::FOLDER, Self::STEPS])?;
        let len = parts.iter().take(at + 1).map(|p| p.len() + 1).sum::<usize>() - 1;
        key.get(..len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_step_and_name_their_sharded_folder() {
        let l = Layout::new(&Key::from("runs/a"), "m");
        assert_eq!(l.shard(7, 2, "u").as_ref(), "runs/a/m/sharded/steps/00000000000000000007/rank-2-u.mio");
        assert_eq!(l.done(7, 2).as_ref(), "runs/a/m/sharded/steps/00000000000000000007/done-2.json");
        assert_eq!(l.manifest(10).as_ref(), "runs/a/m/sharded/manifests/00000000000000000010.json");
        assert!(l.manifest(9).as_ref() < l.manifest(10).as_ref());
        assert_eq!(Layout::relative().snapshot(3).as_ref(), "snapshots/00000000000000000003.json");
        assert_eq!(Layout::relative().backup().as_ref(), "BACKUP");
        assert_eq!(Layout::root_of_shard_key(l.shard(7, 2, "u").as_ref()), Some("runs/a/m/sharded"));
        assert_eq!(Layout::root_of_shard_key("sharded/steps/1/x.mio"), Some("sharded"));
        assert_eq!(Layout::root_of_shard_key("a/sharded/x/steps/1"), None);
        assert_eq!(Layout::root_of_shard_key("a/notsharded/steps/1"), None);
    }
}
