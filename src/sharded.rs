//! Sharded checkpoints: several processes (ranks) each save the part of the
//! state they hold, and one global manifest commits the step once every
//! part is durable. The storage is the arbiter: no coordination service.
//!
//! Layout under `<prefix>/<model>/sharded/` of the store (the `[remote]` URL,
//! or the model folder itself, `file://<model.dir>`, a shared filesystem):
//!
//! ```text
//! steps/<iterations:020>/rank-<r>-<upload>.mio   rank r's shard: an ordinary archive
//! steps/<iterations:020>/done-<r>.json           rank r's done-record, written after its shard
//! manifests/<iterations:020>.json                the global manifest, create-if-absent
//! LATEST                                         names the newest global manifest
//! ```
//!
//! A rank's `save` copies its tensors at the call and returns; a thread of
//! its own writes the shard, then the done-record. The coordinator (rank 0)
//! also commits: once every rank's done-record for the step exists (or a
//! deadline passes, a counted failure), it writes the global manifest with a
//! create-if-absent put, so two coordinators racing on one step (a restarted
//! job) make one manifest, and moves `LATEST`. Until the manifest exists the
//! step does not exist for readers; a rank that dies means no manifest, and
//! the previous step stays the latest. On a filesystem the create is a hard
//! link (atomic), through the same `object_store` code path as S3.
//!
//! A tensor is saved whole or as rows `[offset, offset + rows)` of its first
//! dimension, with its global shape. Loading takes any partition: each piece
//! a rank wants is read with ranged reads of exactly the stored tensors that
//! overlap it (checked against their CRC-32C) and reassembled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use object_store::path::Path as Key;
use object_store::PutMode;
use serde::{Deserialize, Serialize};
#[cfg(feature = "torch")]
use tch::Tensor;

use crate::archive::{write_archive, ArchiveReader};
use crate::config::{Config, RemoteConfig};
use crate::error::{Error, Result};
use crate::format::{DType, TensorRef};
#[cfg(feature = "torch")]
use crate::tensors::{copy_bytes, dtype_of, shape_of, to_tensor};

/// Format of done-records and global manifests.
pub const SHARDED_FORMAT: u32 = 1;

/// One stored tensor of a shard: a whole tensor, or rows of one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// The tensor's global name.
    pub name: String,
    pub dtype: String,
    /// The whole tensor's shape.
    pub global_shape: Vec<usize>,
    /// First row (of the first dimension) this piece holds; 0 for a whole tensor.
    pub row_offset: usize,
    /// The piece's own shape (the global shape with fewer rows for a slice).
    pub shape: Vec<usize>,
    /// Where its bytes are in the shard archive, and their CRC-32C.
    pub data_offset: u64,
    pub data_len: u64,
    pub crc32c: u32,
}

/// A rank's record that its shard is durable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneRecord {
    pub format: u32,
    /// The run that wrote it (`shard.run_id`, or the launcher's job id):
    /// a coordinator commits only its own run's records.
    #[serde(default)]
    pub run: String,
    pub rank: usize,
    pub world_size: usize,
    pub iterations: u64,
    /// The shard archive's key, size and CRC-32C.
    pub key: String,
    pub size: u64,
    pub crc32c: u32,
    pub pieces: Vec<Piece>,
}

/// The global manifest of one step: every shard and which piece lives where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalManifest {
    pub format: u32,
    pub model: String,
    pub iterations: u64,
    pub world_size: usize,
    pub created: String,
    /// The done-records of every rank, by rank.
    pub shards: Vec<DoneRecord>,
    /// The loss the coordinator reported with this step, if any.
    #[serde(default)]
    pub loss: Option<f64>,
    /// The lowest reported loss up to this step (0 before the first): what
    /// the backup rule compares the next loss with.
    #[serde(default)]
    pub lowest: f64,
}

impl GlobalManifest {
    /// Every piece of tensor `name`, with its shard's key.
    fn pieces(&self, name: &str) -> Vec<(&str, &Piece)> {
        self.shards.iter().flat_map(|s| s.pieces.iter().filter(|p| p.name == name).map(move |p| (s.key.as_str(), p))).collect()
    }

    /// The names of every tensor, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shards.iter().flat_map(|s| s.pieces.iter().map(|p| p.name.clone())).collect();
        names.sort();
        names.dedup();
        names
    }
}

/// What a rank saves of one tensor.
#[cfg(feature = "torch")]
pub struct Part<'a> {
    pub name: &'a str,
    pub tensor: &'a Tensor,
    /// `Some((row_offset, global_rows))` for rows of a tensor split along its
    /// first dimension; `None` for a whole tensor.
    pub rows: Option<(usize, usize)>,
}

#[cfg(feature = "torch")]
impl<'a> Part<'a> {
    pub fn whole(name: &'a str, tensor: &'a Tensor) -> Part<'a> {
        Part { name, tensor, rows: None }
    }
    pub fn rows(name: &'a str, tensor: &'a Tensor, row_offset: usize, global_rows: usize) -> Part<'a> {
        Part { name, tensor, rows: Some((row_offset, global_rows)) }
    }
}

/// The tensor name under which [`optimizer_json`] is saved.
pub const OPTIMIZER_JSON: &str = "optimizer.json";

/// An optimizer's kind and JSON (hyper-parameters, step count) as a `u8`
/// tensor, to save whole (as [`OPTIMIZER_JSON`], by one rank) beside its
/// state tensors. Those are [`Optimizer::state_tensors`](crate::optim::Optimizer::state_tensors) under their own
/// names (`<param>.exp_avg`, ...), each saved with the rows of its parameter:
///
/// ```ignore
/// let state = opt.state_tensors();
/// let json = modelio::sharded::optimizer_json(&opt)?;
/// let mut parts = vec![Part::rows("w", &w, lo, rows)];
/// parts.extend(state.iter().map(|(name, t)| Part::rows(name, t, lo, rows)));
/// if io.rank().rank == 0 {
///     parts.push(Part::whole(modelio::sharded::OPTIMIZER_JSON, &json));
/// }
/// io.save(step, &parts)?;
/// ```
///
/// # Errors
/// [`Error::OptimizerJson`] when the JSON cannot be encoded.
#[cfg(feature = "torch")]
pub fn optimizer_json(opt: &dyn crate::optim::Optimizer) -> Result<Tensor> {
    let doc = serde_json::json!({ "kind": opt.kind(), "state": opt.state_json() });
    let bytes = serde_json::to_vec(&doc).map_err(|_| Error::OptimizerJson { field: "state" })?;
    Ok(Tensor::from_slice(&bytes))
}

/// An optimizer's state read back from a sharded step, for
/// [`Optimizer::load_state`](crate::optim::Optimizer::load_state): the [`OPTIMIZER_JSON`] tensor and the state
/// tensors this rank loaded (its rows of each), by name.
///
/// # Errors
/// [`Error::OptimizerJson`] when the JSON tensor is not what
/// [`optimizer_json`] wrote; [`Error::Torch`].
#[cfg(feature = "torch")]
pub fn optimizer_state(json: &Tensor, tensors: impl IntoIterator<Item = (String, Tensor)>) -> Result<crate::optim::OptimizerState> {
    let mut bytes = Vec::new();
    copy_bytes(json, &mut bytes)?;
    let doc: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| Error::OptimizerJson { field: "kind" })?;
    let kind = doc.get("kind").and_then(|k| k.as_str()).ok_or(Error::OptimizerJson { field: "kind" })?;
    let state = doc.get("state").cloned().ok_or(Error::OptimizerJson { field: "state" })?;
    Ok(crate::optim::OptimizerState { kind: kind.into(), json: state, tensors: tensors.into_iter().collect() })
}

/// What a rank loads of one tensor: all of it, or rows `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub name: String,
    pub rows: Option<(usize, usize)>,
}

impl Want {
    pub fn whole(name: &str) -> Want {
        Want { name: name.into(), rows: None }
    }
    pub fn rows(name: &str, start: usize, end: usize) -> Want {
        Want { name: name.into(), rows: Some((start, end)) }
    }
}

/// This process's place among the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub world_size: usize,
}

impl Rank {
    /// From `[shard]` in the config, else from `RANK` and `WORLD_SIZE`
    /// (as torchrun and other launchers set them), else rank 0 of 1.
    ///
    /// # Errors
    /// [`Error::ConfigValue`] when a value is not a number or the rank is
    /// not below the world size.
    pub fn from_config(config: &Config) -> Result<Rank> {
        let env = |name: &str| -> Result<Option<usize>> {
            match std::env::var(name) {
                Ok(v) => v.trim().parse().map(Some).map_err(|_| Error::ConfigValue {
                    key: name.into(),
                    value: format!("{v:?}"),
                    allowed: "a non-negative integer".into(),
                }),
                Err(_) => Ok(None),
            }
        };
        let rank = match config.shard.rank {
            Some(r) => r,
            None => env("RANK")?.unwrap_or(0),
        };
        let world_size = match config.shard.world_size {
            Some(w) => w,
            None => env("WORLD_SIZE")?.unwrap_or(1),
        };
        if world_size == 0 || rank >= world_size {
            return Err(Error::ConfigValue {
                key: "shard.rank".into(),
                value: format!("{rank} (world size {world_size})"),
                allowed: "a rank below a world size of at least 1".into(),
            });
        }
        Ok(Rank { rank, world_size })
    }
}

/// Counters of a rank's sharded saves.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Shards written (with their done-record).
    pub written: AtomicU64,
    /// Saves replaced by a newer one before they were written.
    pub skipped: AtomicU64,
    /// Shards that could not be written.
    pub failed: AtomicU64,
    /// Steps committed by this process (coordinator only).
    pub committed: AtomicU64,
    /// Steps whose commit found the manifest already there (another coordinator).
    pub already_committed: AtomicU64,
    /// Steps not committed: a done-record missing at the deadline, or a store failure.
    pub commit_failed: AtomicU64,
    /// Global backups made, and those that could not be written (coordinator only).
    pub backups: AtomicU64,
    pub backups_failed: AtomicU64,
    /// Global snapshots made, and those that failed (their step was not committed).
    pub snapshots: AtomicU64,
    pub snapshots_failed: AtomicU64,
}

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

/// One tensor of a save, copied at the call.
struct Staged {
    name: String,
    dtype: DType,
    /// The piece's own shape, and the whole tensor's.
    shape: Vec<usize>,
    global: Vec<usize>,
    row_offset: usize,
    bytes: Vec<u8>,
}

/// A save copied at the call, waiting for the writer thread.
struct Job {
    iterations: u64,
    tensors: Vec<Staged>,
    loss: Option<f64>,
}

/// A step the coordinator is to commit.
#[derive(Debug, Clone, Copy)]
struct Commit {
    iterations: u64,
    /// `shard.commit_deadline_secs` after its own shard was written.
    deadline: Instant,
    loss: Option<f64>,
}

#[derive(Default)]
struct Queue {
    waiting: Option<Job>,
    busy: bool,
    stop: bool,
    /// Steps the coordinator still has to commit, oldest first.
    commits: Vec<Commit>,
    committing: bool,
    /// The last step handed to `save`.
    last_saved: Option<u64>,
    /// Steps whose snapshot was requested before their commit was over:
    /// each is made once its step commits, or reported as not made.
    snapshots: BTreeSet<u64>,
}

struct Shared {
    objects: Objects,
    layout: Layout,
    rank: Rank,
    model: String,
    deadline: Duration,
    keep: usize,
    snapshot_keep: usize,
    /// `staging.on_busy = "wait"`: a save waits for the previous one to start writing.
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    wait_when_busy: bool,
    /// The lowest reported loss, read from the newest manifest on first use.
    lowest: Mutex<Option<f64>>,
    queue: Mutex<Queue>,
    wake: Condvar,
    stats: ShardStats,
    /// Background failures (shards not written, steps not committed,
    /// snapshots not made) not yet reported by `flush`.
    failures: Inbox,
    /// This run's id: a done-record of another run is never committed.
    run_id: String,
    rt: crate::remote::blocking::Blocking,
}

use crate::background::{lock, Inbox};
use crate::remote::objects::{to_json, unsupported, Objects, Put};

/// This run's id: the same on every rank of one launch, new at each launch,
/// so that a step never mixes shards of two runs (a dead run's shard of a
/// step past the newest committed one would otherwise complete a restarted
/// run's step). In order: `shard.run_id`; `MODELIO_RUN_ID`; torchrun's
/// `TORCHELASTIC_RUN_ID` with its restart count; Slurm's `SLURM_JOB_ID` with
/// its step and restart count; a single rank makes one up. A job of several
/// ranks with none of these is refused ([`Error::RunIdMissing`]): its ranks
/// could not tell this launch from the last one.
fn run_id(config: &Config, rank: Rank, env: impl Fn(&str) -> Option<String>) -> Result<String> {
    let env = |name: &str| env(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    if !config.shard.run_id.trim().is_empty() {
        return Ok(config.shard.run_id.trim().to_string());
    }
    if let Some(id) = env("MODELIO_RUN_ID") {
        return Ok(id);
    }
    // torchrun keeps its run id across the restarts of one job (and says
    // "none" when none was given); the restart count tells them apart.
    if let Some(id) = env("TORCHELASTIC_RUN_ID").filter(|id| id != "none") {
        return Ok(format!("torchelastic-{id}.{}", env("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into())));
    }
    // A Slurm job keeps its id when requeued and across the `srun` steps of
    // one batch script.
    if let Some(job) = env("SLURM_JOB_ID") {
        let step = env("SLURM_STEP_ID").unwrap_or_else(|| "-".into());
        let restart = env("SLURM_RESTART_COUNT").unwrap_or_else(|| "0".into());
        return Ok(format!("slurm-{job}.{step}.{restart}"));
    }
    if rank.world_size == 1 {
        return Ok(uuid::Uuid::new_v4().simple().to_string());
    }
    Err(Error::RunIdMissing { world_size: rank.world_size })
}

/// What makes the pieces of a step unusable, if anything: for each tensor,
/// one dtype and global shape, each piece's shape the global one with its
/// own rows, inside the global rows, and as many bytes as its shape needs.
fn inconsistency(shards: &[DoneRecord]) -> Option<String> {
    let mut seen: BTreeMap<&str, (&str, &[usize])> = BTreeMap::new();
    for d in shards {
        for p in &d.pieces {
            let (dtype, global) = *seen.entry(&p.name).or_insert((&p.dtype, &p.global_shape));
            let what = |detail: String| Some(format!("tensor `{}` (rank {}): {detail}", p.name, d.rank));
            if p.dtype != dtype || p.global_shape != global {
                return what(format!("{} {:?} here, {dtype} {global:?} elsewhere", p.dtype, p.global_shape));
            }
            let Some(size) = DType::from_name(&p.dtype).map(DType::size) else { return what(format!("unknown dtype {}", p.dtype)) };
            let expected = if global.is_empty() {
                (p.shape.is_empty() && p.row_offset == 0).then_some(size as u64)
            } else {
                let rows = p.shape.first().copied().unwrap_or(0);
                let fits = p.shape.len() == global.len()
                    && p.shape[1..] == global[1..]
                    && p.row_offset.checked_add(rows).is_some_and(|e| e <= global[0]);
                fits.then(|| p.shape.iter().try_fold(size as u64, |n, &d| n.checked_mul(d as u64))).flatten()
            };
            match expected {
                Some(len) if len == p.data_len => {}
                _ => {
                    return what(format!(
                        "shape {:?} at row {} of {global:?} with {} bytes does not fit",
                        p.shape, p.row_offset, p.data_len
                    ))
                }
            }
        }
    }
    None
}

/// One rank's sharded checkpoints of one model.
pub struct ShardedIo {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The store sharded checkpoints go to: `[remote]` when set, else the model
/// folder (which must then be on a filesystem every rank shares).
fn store_config(config: &Config) -> RemoteConfig {
    let mut r = config.remote.clone();
    if !r.enabled() {
        let dir = std::path::absolute(&config.model.dir).unwrap_or_else(|_| config.model.dir.clone());
        r.url = format!("file://{}", dir.display());
    }
    r
}

impl ShardedIo {
    /// Open this rank's view of the sharded checkpoints of `config`'s model.
    ///
    /// # Errors
    /// [`Error::ConfigValue`] for a bad rank or store; [`Error::RemoteCredentials`].
    pub fn open(config: &Config) -> Result<ShardedIo> {
        config.validate()?;
        let rank = Rank::from_config(config)?;
        let run_id = run_id(config, rank, |name| std::env::var(name).ok())?;
        let rc = store_config(config);
        let built = crate::remote::store::build(&rc)?;
        let rt = crate::remote::blocking::Blocking::new("modelio-shard", || {}, &rc.url)?;
        let location = format!("{}/{}/{}", rc.url.trim_end_matches('/'), config.model.name, Layout::FOLDER);
        let shared = Arc::new(Shared {
            objects: Objects::new(built.store, &rc, location),
            layout: Layout::new(&built.prefix, &config.model.name),
            rank,
            model: config.model.name.clone(),
            deadline: Duration::from_secs(config.shard.commit_deadline_secs),
            keep: config.shard.keep,
            snapshot_keep: config.snapshot.keep,
            wait_when_busy: config.staging.on_busy == crate::config::OnBusy::Wait,
            lowest: Mutex::new(None),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            stats: ShardStats::default(),
            failures: Inbox::default(),
            run_id,
            rt,
        });
        // A coordinator claims its run id: a launch that reuses an earlier
        // launch's id could commit that run's leftover shards with its own.
        if rank.rank == 0 && rank.world_size > 1 {
            shared.run(shared.claim_run())?;
        }
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("modelio-shard-writer".into())
                .spawn(move || s.write_loop())
                .map_err(|e| Error::io("start the shard writer for", ".", e))?,
        );
        if rank.rank == 0 {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("modelio-shard-commit".into())
                    .spawn(move || s.commit_loop())
                    .map_err(|e| Error::io("start the shard coordinator for", ".", e))?,
            );
        }
        Ok(ShardedIo { shared, threads })
    }

    pub fn rank(&self) -> Rank {
        self.shared.rank
    }

    /// Where these checkpoints are, in words: `<url>/<model>/sharded`.
    pub fn location(&self) -> &str {
        self.shared.objects.location()
    }

    /// Their keys in the store.
    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }

    pub fn stats(&self) -> &ShardStats {
        &self.shared.stats
    }

    #[cfg(feature = "torch")]
    /// Save this rank's `parts` as step `iterations`: the bytes are copied
    /// before it returns (about one memcpy of the parts), and written in the
    /// background. One save is written while the next waits; a third waits
    /// for the writer to take the second (`staging.on_busy = "wait"`, the
    /// default), or replaces it (`"skip"`, counted in `skipped`; a step that
    /// some rank skipped is never committed). Never waits on another rank.
    ///
    /// # Errors
    /// [`Error::UnsupportedDtype`], [`Error::DuplicateTensor`], [`Error::ConfigValue`]
    /// for rows outside the global shape, [`Error::Torch`].
    pub fn save(&self, iterations: u64, parts: &[Part<'_>]) -> Result<()> {
        self.save_inner(iterations, parts, None)
    }

    /// [`ShardedIo::save`] with the average loss since the last save. The
    /// coordinator's loss decides the global backup (the rule of local
    /// saves: the first loss sets the lowest, a strictly lower one makes
    /// that step the backup); other ranks' losses are not used.
    ///
    /// # Errors
    /// As [`ShardedIo::save`].
    #[cfg(feature = "torch")]
    pub fn save_with_loss(&self, iterations: u64, parts: &[Part<'_>], loss: f64) -> Result<()> {
        self.save_inner(iterations, parts, Some(loss))
    }

    #[cfg(feature = "torch")]
    fn save_inner(&self, iterations: u64, parts: &[Part<'_>], loss: Option<f64>) -> Result<()> {
        // A NaN or infinite loss cannot be compared with the lowest: it is not used.
        let loss = match loss {
            Some(l) if !l.is_finite() => {
                tracing::warn!(target: "modelio", "sharded step {iterations}: loss {l} ignored for the backup rule");
                None
            }
            other => other,
        };
        let mut tensors = Vec::with_capacity(parts.len());
        let mut names = std::collections::HashSet::new();
        for p in parts {
            if !names.insert(p.name) {
                return Err(Error::DuplicateTensor { tensor: p.name.into() });
            }
            let dtype = dtype_of(p.name, p.tensor.kind())?;
            let shape = shape_of(p.tensor);
            let (row_offset, global) = match p.rows {
                None => (0, shape.clone()),
                Some((offset, global_rows)) => {
                    let rows = shape.first().copied().unwrap_or(0);
                    if shape.is_empty() || offset.checked_add(rows).is_none_or(|end| end > global_rows) {
                        return Err(Error::ConfigValue {
                            key: format!("rows of `{}`", p.name),
                            value: format!("{offset}..{} of {global_rows}", offset.saturating_add(rows)),
                            allowed: "rows inside the global first dimension".into(),
                        });
                    }
                    let mut g = shape.clone();
                    g[0] = global_rows;
                    (offset, g)
                }
            };
            let mut bytes = Vec::new();
            copy_bytes(p.tensor, &mut bytes)?;
            tensors.push(Staged { name: p.name.to_string(), dtype, shape, global, row_offset, bytes });
        }
        let replaced = {
            let mut q = lock(&self.shared.queue);
            // With `staging.on_busy = "wait"` (the default) a save waits for
            // this rank's own previous one to start writing: ranks that each
            // skipped different steps would never complete a step together.
            while self.shared.wait_when_busy && q.waiting.is_some() && !q.stop {
                q = self.shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            q.last_saved = Some(iterations);
            let replaced = q.waiting.replace(Job { iterations, tensors, loss });
            replaced.map(|job| (job.iterations, q.snapshots.remove(&job.iterations)))
        };
        if let Some((skipped, snapshot_wanted)) = replaced {
            self.shared.stats.skipped.fetch_add(1, Ordering::Relaxed);
            if snapshot_wanted {
                self.shared
                    .snapshot_not_made(skipped, "its save was replaced by a newer one before it was written (staging.on_busy = \"skip\")");
            }
        }
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Wait until every save handed over so far is written and (on the
    /// coordinator) committed or failed, at most `timeout`: true when done,
    /// false when the time ran out. Call it before dropping the handle at
    /// the end of training (a drop also waits, up to each step's deadline).
    ///
    /// # Errors
    /// The oldest background failure not reported yet: a shard not written,
    /// a step not committed (a rank's shard missing at its deadline, the step
    /// committed by another run, inconsistent shards), a backup not written.
    pub fn flush(&self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now().checked_add(timeout).unwrap_or_else(Instant::now);
        let mut done = true;
        {
            let mut q = lock(&self.shared.queue);
            while q.waiting.is_some() || q.busy || !q.commits.is_empty() || q.committing {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    done = false;
                    break;
                }
                q = self
                    .shared
                    .wake
                    .wait_timeout(q, left.min(Duration::from_millis(50)))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        if done {
            self.shared.settle_snapshots();
        }
        match self.shared.failures.take() {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// The newest committed step's manifest, if any.
    ///
    /// # Errors
    /// [`Error::Remote`] when the store cannot be read.
    pub fn latest(&self) -> Result<Option<GlobalManifest>> {
        let s = self.shared.clone();
        s.run(s.latest())
    }

    /// Every committed step's manifest, oldest first.
    ///
    /// # Errors
    /// [`Error::Remote`] when the store cannot be read.
    pub fn list(&self) -> Result<Vec<GlobalManifest>> {
        let s = self.shared.clone();
        s.run(s.list())
    }

    #[cfg(feature = "torch")]
    /// Read `wants` from step `m`: each whole tensor or rows of one,
    /// reassembled from the pieces that overlap it, every piece read checked
    /// against its CRC-32C.
    ///
    /// # Errors
    /// [`Error::Mismatch`] when a tensor or rows are not in the step;
    /// [`Error::RemoteDamaged`] when a piece's checksum fails; [`Error::Remote`].
    pub fn load(&self, m: &GlobalManifest, wants: &[Want]) -> Result<Vec<Tensor>> {
        let s = self.shared.clone();
        wants.iter().map(|w| s.run(s.read_want(m, w)).and_then(|(dtype, shape, bytes)| to_tensor(dtype, &shape, &bytes))).collect()
    }

    /// Check every shard of step `m`: size and CRC-32C of each shard object,
    /// and each piece's bytes against its checksum. Returns the problems.
    ///
    /// # Errors
    /// [`Error::Remote`] when the store cannot be read.
    pub fn verify(&self, m: &GlobalManifest) -> Result<Vec<String>> {
        let s = self.shared.clone();
        s.run(s.verify(m))
    }

    /// Commit step `iterations` now from the done-records present (what a
    /// coordinator's background commit does; public for restarted jobs and
    /// tests). Returns true when this call created the manifest, false when
    /// it already existed.
    ///
    /// # Errors
    /// [`Error::ShardMissing`] when a rank's done-record is missing;
    /// [`Error::Remote`] on a store failure.
    pub fn commit(&self, iterations: u64) -> Result<bool> {
        let s = self.shared.clone();
        s.run(s.commit_once(iterations, None)).map(|m| m.is_some())
    }

    /// Snapshot the step of the last `save`, once it is committed (a copy
    /// of its global manifest under `snapshots/`; retention keeps its shards,
    /// `snapshot.keep` the newest snapshots). Every request is kept until its
    /// step's commit is over: the snapshot is made, or its failure (the step
    /// not committed, its save skipped, the store) is counted in
    /// `snapshots_failed` and reported by the next `flush`. Only the
    /// coordinator's request counts: returns false on other ranks, and when
    /// there was no save to snapshot or the snapshot failed at once.
    ///
    /// Blocks on the store only when the step's commit is already over.
    pub fn snapshot(&self) -> bool {
        if self.shared.rank.rank != 0 {
            return false;
        }
        let already = {
            let mut q = lock(&self.shared.queue);
            let Some(n) = q.last_saved else { return false };
            let pending = q.waiting.as_ref().is_some_and(|j| j.iterations == n)
                || q.busy
                || q.commits.iter().any(|c| c.iterations == n)
                || q.committing;
            if pending {
                q.snapshots.insert(n);
                return true;
            }
            n
        };
        // The step's commit is over: snapshot it now if it was committed.
        self.shared.snapshot_committed(already)
    }

    /// The global backup: the last committed step whose reported loss was
    /// the lowest so far.
    ///
    /// # Errors
    /// [`Error::Remote`] when the store cannot be read.
    pub fn backup(&self) -> Result<Option<GlobalManifest>> {
        let s = self.shared.clone();
        s.run(async { Ok(s.objects.get_json::<GlobalManifest>(&s.layout.backup()).await?.map(|(m, _)| m)) })
    }

    /// The global snapshots, oldest first.
    ///
    /// # Errors
    /// [`Error::Remote`] when the store cannot be read.
    pub fn snapshots(&self) -> Result<Vec<GlobalManifest>> {
        let s = self.shared.clone();
        s.run(async {
            let keys = s.objects.list_keys(&s.layout.snapshots()).await?;
            let mut out = Vec::new();
            for k in keys {
                if let Some((m, _)) = s.objects.get_json::<GlobalManifest>(&k).await? {
                    out.push(m);
                }
            }
            Ok(out)
        })
    }

    /// The dtype, shape and bytes of `want` in step `m` (what
    /// [`ShardedIo::load`] makes tensors of), for readers without libtorch.
    ///
    /// # Errors
    /// As [`ShardedIo::load`].
    pub fn read(&self, m: &GlobalManifest, want: &Want) -> Result<(DType, Vec<usize>, Vec<u8>)> {
        let s = self.shared.clone();
        s.run(s.read_want(m, want))
    }
}

impl Drop for ShardedIo {
    fn drop(&mut self) {
        lock(&self.shared.queue).stop = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn run<F: std::future::Future + Send>(&self, fut: F) -> F::Output
    where
        F::Output: Send,
    {
        self.rt.run(fut)
    }

    /// Record this run's id, create-if-absent: refused when an earlier
    /// launch's coordinator used it.
    async fn claim_run(&self) -> Result<()> {
        let key = self.layout.run(&self.run_id);
        let record = serde_json::json!({
            "run": self.run_id,
            "world_size": self.rank.world_size,
            "created": chrono::Utc::now().to_rfc3339(),
        });
        let json = to_json(&key, &record, true)?;
        match self.objects.put_if("record the run id", &key, json, PutMode::Create).await? {
            Put::Written => Ok(()),
            Put::Lost => Err(Error::RunIdReused { run_id: self.run_id.clone(), key: key.to_string() }),
            Put::Unsupported => Err(unsupported("record the run id", &key)),
        }
    }

    /// Keep a background failure for the next `flush` (it was logged
    /// where it happened).
    fn report_later(&self, e: Error) {
        self.failures.keep(e);
    }

    /// The snapshot requested of step `n` was not made: counted, logged, and
    /// reported by the next `flush`.
    fn snapshot_not_made(&self, n: u64, reason: &str) {
        self.stats.snapshots_failed.fetch_add(1, Ordering::Relaxed);
        let e = Error::ShardSnapshot { iterations: n, reason: reason.into() };
        tracing::error!(target: "modelio", "{e}");
        self.report_later(e);
    }

    /// Snapshot committed step `n` now, from its manifest; false when it was
    /// not committed or the snapshot could not be written (both reported).
    fn snapshot_committed(&self, n: u64) -> bool {
        let made = self.run(async {
            match self.objects.get_json::<GlobalManifest>(&self.layout.manifest(n)).await? {
                Some((m, _)) => self.write_snapshot(&m).await.map(|()| true),
                None => Ok(false),
            }
        });
        match made {
            Ok(true) => {
                self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(false) => {
                self.snapshot_not_made(n, "the step was not committed");
                false
            }
            Err(e) => {
                self.snapshot_not_made(n, &format!("{}", e.report()));
                false
            }
        }
    }

    /// Requests left once nothing is being written or committed belong to
    /// steps that will never commit: report them.
    fn settle_snapshots(&self) {
        let left = {
            let mut q = lock(&self.queue);
            if q.waiting.is_some() || q.busy || !q.commits.is_empty() || q.committing {
                return;
            }
            std::mem::take(&mut q.snapshots)
        };
        for n in left {
            self.snapshot_not_made(n, "the step was not committed");
        }
    }

    /// The writer thread: the newest waiting save, one at a time; drains before stopping.
    fn write_loop(self: Arc<Self>) {
        loop {
            let job = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(job) = q.waiting.take() {
                        q.busy = true;
                        // A save waiting for this slot may go on.
                        self.wake.notify_all();
                        break job;
                    }
                    if q.stop {
                        return;
                    }
                    q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            let (iterations, loss) = (job.iterations, job.loss);
            let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(self.write_shard(job))))
                .unwrap_or_else(|_| Err(Error::Internal { what: "sharded save", message: "the shard writer panicked".into() }));
            match written {
                Ok(()) => {
                    self.stats.written.fetch_add(1, Ordering::Relaxed);
                    if self.rank.rank == 0 {
                        let deadline = Instant::now().checked_add(self.deadline).unwrap_or_else(Instant::now);
                        lock(&self.queue).commits.push(Commit { iterations, deadline, loss });
                    }
                }
                Err(e) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(target: "modelio", "rank {}: shard of iteration {iterations} not written: {}", self.rank.rank, e.report());
                    self.report_later(e);
                    if lock(&self.queue).snapshots.remove(&iterations) {
                        self.snapshot_not_made(iterations, "this rank's shard of it was not written");
                    }
                }
            }
            lock(&self.queue).busy = false;
            self.wake.notify_all();
        }
    }

    /// The coordinator's commit thread: steps in order, each waiting for
    /// every done-record until its deadline (`shard.commit_deadline_secs`
    /// after its own shard was written), so a dead rank costs one deadline,
    /// not one per step queued behind it.
    fn commit_loop(self: Arc<Self>) {
        loop {
            let Commit { iterations, deadline: until, loss } = {
                let mut q = lock(&self.queue);
                loop {
                    if !q.commits.is_empty() {
                        q.committing = true;
                        break q.commits.remove(0);
                    }
                    if q.stop && q.waiting.is_none() && !q.busy {
                        return;
                    }
                    q = self.wake.wait_timeout(q, Duration::from_millis(100)).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
                }
            };
            let outcome = loop {
                // A missing done-record or a store failure is retried until
                // the step's deadline, also while the handle is being dropped.
                match self.run(self.commit_once(iterations, loss)) {
                    Err(Error::ShardMissing { .. } | Error::Remote { .. }) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    other => break other,
                }
            };
            match outcome {
                Ok(Some(manifest)) => {
                    self.stats.committed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(target: "modelio", "committed sharded step {iterations} ({} ranks)", self.rank.world_size);
                    self.after_commit(&manifest);
                }
                Ok(None) => {
                    self.stats.already_committed.fetch_add(1, Ordering::Relaxed);
                    // Committed by a racing coordinator of this run: its manifest is the step's.
                    if lock(&self.queue).snapshots.remove(&iterations) {
                        self.snapshot_committed(iterations);
                    }
                }
                Err(e) => {
                    self.stats.commit_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(target: "modelio", "sharded step {iterations} not committed: {}", e.report());
                    self.report_later(e);
                    if lock(&self.queue).snapshots.remove(&iterations) {
                        self.snapshot_not_made(iterations, "the step was not committed");
                    }
                }
            }
            lock(&self.queue).committing = false;
            self.settle_snapshots();
            self.wake.notify_all();
        }
    }

    async fn write_shard(&self, job: Job) -> Result<()> {
        let Job { iterations, tensors, .. } = job;
        let upload = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
        let key = self.layout.shard(iterations, self.rank.rank, &upload);
        let refs: Vec<TensorRef<'_>> = tensors
            .iter()
            .map(|t| TensorRef { name: &t.name, dtype: t.dtype, shape: &t.shape, data: &t.bytes, crc32c: None, crc32: None })
            .collect();
        let path = std::path::PathBuf::from(key.as_ref());
        let name = format!("{}-rank-{}", self.model, self.rank.rank);
        let bytes = write_archive(Vec::new(), &path, &name, iterations, &refs, None, None)?;
        let (size, crc) = (bytes.len() as u64, crc32c::crc32c(&bytes));
        let reader = ArchiveReader::from_bytes(&path, bytes)?;
        let mut pieces = Vec::with_capacity(tensors.len());
        for Staged { name, dtype, shape, global, row_offset, .. } in &tensors {
            let located = reader.model.iter().find(|l| &l.meta.name == name).ok_or_else(|| Error::Internal {
                what: "sharded save",
                message: format!("tensor `{name}` is not in the shard just written"),
            })?;
            pieces.push(Piece {
                name: name.clone(),
                dtype: dtype.name().into(),
                global_shape: global.clone(),
                row_offset: *row_offset,
                shape: shape.clone(),
                data_offset: located.offset as u64,
                data_len: located.len as u64,
                crc32c: located.meta.crc32c,
            });
        }
        let bytes = reader.into_bytes();
        self.objects.put("write shard", &key, bytes).await?;
        let done = DoneRecord {
            format: SHARDED_FORMAT,
            run: self.run_id.clone(),
            rank: self.rank.rank,
            world_size: self.rank.world_size,
            iterations,
            key: key.to_string(),
            size,
            crc32c: crc,
            pieces,
        };
        let done_key = self.layout.done(iterations, self.rank.rank);
        self.objects.put("write done-record", &done_key, to_json(&done_key, &done, false)?).await?;
        Ok(())
    }

    /// Commit `iterations` if every rank's done-record is there.
    /// Commit `iterations` if every rank's done-record is there: the new
    /// manifest, or `None` when it already existed.
    async fn commit_once(&self, iterations: u64, loss: Option<f64>) -> Result<Option<GlobalManifest>> {
        let mut shards = Vec::with_capacity(self.rank.world_size);
        for r in 0..self.rank.world_size {
            let key = self.layout.done(iterations, r);
            match self.objects.get_json::<DoneRecord>(&key).await? {
                Some((d, _))
                    if d.iterations == iterations && d.world_size == self.rank.world_size && d.rank == r && d.run == self.run_id =>
                {
                    shards.push(d)
                }
                // Another run's record (a dead launch's) is not this run's shard.
                Some((d, _)) if d.run != self.run_id => {
                    return Err(Error::ShardMissing { iterations, rank: r, key: format!("{key} is run `{}`'s, not this run's", d.run) })
                }
                _ => return Err(Error::ShardMissing { iterations, rank: r, key: key.to_string() }),
            }
        }
        // Each shard named must exist with its size: the done-record follows its shard.
        for d in &shards {
            let key = self.objects.stored_key(&d.key)?;
            if self.objects.head(&key).await?.is_none_or(|meta| meta.size != d.size) {
                return Err(Error::ShardMissing { iterations, rank: d.rank, key: d.key.clone() });
            }
        }
        if let Some(problem) = inconsistency(&shards) {
            return Err(Error::ShardInconsistent { iterations, detail: problem });
        }
        let lowest = self.lowest().await?;
        let decision = loss.map(|l| crate::state::backup_rule(&[l], lowest));
        let manifest = GlobalManifest {
            format: SHARDED_FORMAT,
            model: self.model.clone(),
            iterations,
            world_size: self.rank.world_size,
            created: chrono::Utc::now().to_rfc3339(),
            shards,
            loss,
            lowest: decision.map_or(lowest, |d| d.lowest),
        };
        let key = self.layout.manifest(iterations);
        let json = to_json(&key, &manifest, true)?;
        match self.objects.put_if("commit global manifest", &key, json, PutMode::Create).await? {
            Put::Written => {}
            // Committed already: by a racing coordinator of this run (the
            // same shards), or by another run (a job resumed from an older
            // step saving over a committed one), which must not pass silently.
            Put::Lost => {
                let existing = self.objects.get_json::<GlobalManifest>(&key).await?.map(|(m, _)| m);
                let ours = |e: &GlobalManifest| e.shards.iter().map(|d| &d.key).eq(manifest.shards.iter().map(|d| &d.key));
                return match existing {
                    Some(e) if ours(&e) => Ok(None),
                    _ => Err(Error::StepCommitted { iterations, key: key.to_string() }),
                };
            }
            Put::Unsupported => return Err(unsupported("commit global manifest", &key)),
        }
        *lock(&self.lowest) = Some(manifest.lowest);
        // The step exists now; `LATEST` is a hint (readers list manifests).
        if let Err(e) = self.objects.advance_latest(&self.layout.latest(), &self.layout.manifests(), &key, iterations).await {
            tracing::warn!(target: "modelio", "sharded step {iterations}: {}", e.report());
        }
        // The step is committed whatever happens to its backup.
        if decision.is_some_and(|d| d.backup) {
            let backup = self.layout.backup();
            let written = match to_json(&backup, &manifest, true) {
                Ok(json) => self.objects.put("write global backup", &backup, json).await,
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => self.stats.backups.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    tracing::error!(target: "modelio", "sharded step {iterations} is committed but not backed up: {}", e.report());
                    self.report_later(e);
                    self.stats.backups_failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        Ok(Some(manifest))
    }

    /// The lowest loss so far: from memory, else from the newest manifest.
    async fn lowest(&self) -> Result<f64> {
        if let Some(l) = *lock(&self.lowest) {
            return Ok(l);
        }
        let l = self.latest().await?.map_or(0.0, |m| m.lowest);
        *lock(&self.lowest) = Some(l);
        Ok(l)
    }

    /// After step `m` was committed: its snapshot when one was requested
    /// (requests of older steps are over: those steps were not committed),
    /// then retention.
    fn after_commit(&self, m: &GlobalManifest) {
        let (older, wanted) = {
            let mut q = lock(&self.queue);
            let later = m.iterations.checked_add(1).map(|k| q.snapshots.split_off(&k)).unwrap_or_default();
            let mut upto = std::mem::replace(&mut q.snapshots, later);
            let wanted = upto.remove(&m.iterations);
            (upto, wanted)
        };
        for n in older {
            self.snapshot_not_made(n, "the step was not committed");
        }
        if wanted {
            match self.run(self.write_snapshot(m)) {
                Ok(()) => {
                    self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.snapshot_not_made(m.iterations, &format!("{}", e.report())),
            }
        }
        if let Err(e) = self.run(self.retain()) {
            tracing::warn!(target: "modelio", "sharded retention: {}", e.report());
        }
    }

    async fn write_snapshot(&self, m: &GlobalManifest) -> Result<()> {
        let key = self.layout.snapshot(m.iterations);
        match self.objects.put_if("write global snapshot", &key, to_json(&key, m, true)?, PutMode::Create).await? {
            Put::Written | Put::Lost => {}
            Put::Unsupported => return Err(unsupported("write global snapshot", &key)),
        }
        if self.snapshot_keep > 0 {
            let keys = self.objects.list_keys(&self.layout.snapshots()).await?;
            let excess = keys.len().saturating_sub(self.snapshot_keep);
            for k in keys.into_iter().take(excess) {
                let _ = self.objects.delete(&k).await;
            }
        }
        Ok(())
    }

    /// Steps that a backup or snapshot holds (retention keeps their shards).
    async fn protected(&self) -> Result<Vec<u64>> {
        let mut steps: Vec<u64> = self
            .objects
            .list_keys(&self.layout.snapshots())
            .await?
            .iter()
            .filter_map(|k| k.filename().and_then(|f| f.strip_suffix(".json")).and_then(|n| n.parse().ok()))
            .collect();
        if let Some((b, _)) = self.objects.get_json::<GlobalManifest>(&self.layout.backup()).await? {
            steps.push(b.iterations);
        }
        Ok(steps)
    }

    async fn list(&self) -> Result<Vec<GlobalManifest>> {
        let keys = self.objects.list_keys(&self.layout.manifests()).await?;
        let mut out = Vec::new();
        for key in keys {
            match self.objects.get_json::<GlobalManifest>(&key).await {
                Ok(Some((m, _))) => out.push(m),
                Ok(None) => {}
                // One unreadable manifest does not hide the others.
                Err(e @ Error::RemoteDamaged { .. }) => tracing::warn!(target: "modelio", "skipping {key}: {}", e.report()),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The newest manifest by its key (`LATEST` is for other readers; a
    /// listing of manifest keys is as cheap and never stale).
    async fn latest(&self) -> Result<Option<GlobalManifest>> {
        match self.objects.list_keys(&self.layout.manifests()).await?.pop() {
            None => Ok(None),
            Some(key) => match self.objects.get_json::<GlobalManifest>(&key).await {
                Ok(Some((m, _))) => Ok(Some(m)),
                // Deleted since the listing, or unreadable: the newest readable one.
                Ok(None) | Err(Error::RemoteDamaged { .. }) => Ok(self.list().await?.pop()),
                Err(e) => Err(e),
            },
        }
    }

    /// The dtype, shape and bytes of `want` in step `m`.
    async fn read_want(&self, m: &GlobalManifest, want: &Want) -> Result<(DType, Vec<usize>, Vec<u8>)> {
        let pieces = m.pieces(&want.name);
        let missing = |found: String| Error::Mismatch {
            path: std::path::PathBuf::from(self.layout.manifest(m.iterations).as_ref()),
            tensor: want.name.clone(),
            expected: match want.rows {
                Some((a, b)) => format!("rows {a}..{b}"),
                None => "the whole tensor".into(),
            },
            found,
        };
        let Some((_, first)) = pieces.first() else { return Err(missing("no such tensor".into())) };
        if let Some(problem) = inconsistency(&m.shards) {
            return Err(Error::ShardInconsistent { iterations: m.iterations, detail: problem });
        }
        let dtype = DType::from_name(&first.dtype).ok_or_else(|| missing(format!("dtype {}", first.dtype)))?;
        let global = first.global_shape.clone();
        let global_rows = global.first().copied().unwrap_or(1);
        let (start, end) = match want.rows {
            None => (0, global_rows),
            Some((a, b)) if a <= b && b <= global_rows && !global.is_empty() => (a, b),
            Some(_) => return Err(missing(format!("{global_rows} rows"))),
        };
        let row_bytes = global.iter().skip(1).product::<usize>() * dtype.size();
        let mut out_shape = global.clone();
        if let Some(r) = out_shape.first_mut() {
            *r = end - start;
        }
        let mut out = vec![0u8; if global.is_empty() { dtype.size() } else { (end - start) * row_bytes }];
        let mut covered = vec![false; end - start];
        for (key, p) in pieces {
            if p.global_shape != global {
                return Err(missing(format!("pieces with global shapes {:?} and {:?}", p.global_shape, global)));
            }
            let rows = p.shape.first().copied().unwrap_or(1);
            let (lo, hi) = (p.row_offset.max(start), (p.row_offset + rows).min(end));
            if global.is_empty() {
                out = self.read_piece(m, key, p).await?;
                covered.iter_mut().for_each(|c| *c = true);
                break;
            }
            // Rows another piece already gave (a tensor several ranks hold
            // whole) are not read again.
            if lo >= hi || covered[lo - start..hi - start].iter().all(|&c| c) {
                continue;
            }
            let data = self.read_piece(m, key, p).await?;
            let src = (lo - p.row_offset) * row_bytes..(hi - p.row_offset) * row_bytes;
            let dst = (lo - start) * row_bytes..(hi - start) * row_bytes;
            match (data.get(src), out.get_mut(dst)) {
                (Some(s), Some(d)) => d.copy_from_slice(s),
                _ => return Err(missing("a piece shorter than its shape".into())),
            }
            covered[lo - start..hi - start].iter_mut().for_each(|c| *c = true);
        }
        if let Some(row) = covered.iter().position(|c| !c) {
            return Err(missing(format!("no piece holds row {}", start + row)));
        }
        Ok((dtype, out_shape, out))
    }

    /// One piece's bytes, by a ranged read of its shard, checked.
    async fn read_piece(&self, m: &GlobalManifest, key: &str, p: &Piece) -> Result<Vec<u8>> {
        let k = self.objects.stored_key(key)?;
        let bytes = if p.data_len == 0 {
            Vec::new()
        } else {
            self.objects.get_range(&k, p.data_offset..p.data_offset + p.data_len).await?.to_vec()
        };
        if bytes.len() as u64 != p.data_len || crc32c::crc32c(&bytes) != p.crc32c {
            let detail = format!("its bytes in {key} fail their CRC-32C");
            return Err(self.objects.damaged(format!("sharded step {}", m.iterations), &format!("tensor `{}`", p.name), detail));
        }
        Ok(bytes)
    }

    async fn verify(&self, m: &GlobalManifest) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for d in &m.shards {
            let k = self.objects.stored_key(&d.key)?;
            let Some((bytes, _)) = self.objects.get_raw(&k).await? else {
                problems.push(format!("rank {}: shard {} is missing", d.rank, d.key));
                continue;
            };
            if bytes.len() as u64 != d.size || crc32c::crc32c(&bytes) != d.crc32c {
                problems.push(format!("rank {}: shard {} differs from its done-record (size or CRC-32C)", d.rank, d.key));
                continue;
            }
            match ArchiveReader::from_bytes(std::path::Path::new(&d.key), bytes) {
                Ok(r) => problems.extend(r.verify().into_iter().map(|p| format!("rank {}: {p}", d.rank))),
                Err(e) => problems.push(format!("rank {}: {}", d.rank, e.report())),
            }
        }
        if let Some(problem) = inconsistency(&m.shards) {
            problems.push(problem);
            return Ok(problems);
        }
        // Every tensor is whole: its pieces cover every row.
        for name in m.tensor_names() {
            let pieces = m.pieces(&name);
            let rows = pieces.first().and_then(|(_, p)| p.global_shape.first().copied()).unwrap_or(1);
            let mut count = vec![0usize; rows];
            for (_, p) in &pieces {
                let n = p.shape.first().copied().unwrap_or(1);
                for c in count.iter_mut().skip(p.row_offset).take(n) {
                    *c += 1;
                }
            }
            if count.contains(&0) {
                problems.push(format!("tensor `{name}`: some rows are in no shard"));
            }
        }
        Ok(problems)
    }

    /// Keep the newest `keep` committed steps (0 = all); delete a manifest
    /// before its step's objects, and the objects of steps older than the
    /// newest committed one that never got a manifest.
    async fn retain(&self) -> Result<()> {
        let mut committed = BTreeMap::new();
        for key in self.objects.list_keys(&self.layout.manifests()).await? {
            if let Some(n) = key.filename().and_then(|f| f.strip_suffix(".json")).and_then(|n| n.parse::<u64>().ok()) {
                committed.insert(n, key);
            }
        }
        let Some(&newest) = committed.keys().next_back() else { return Ok(()) };
        let pending: Vec<u64> = lock(&self.queue).commits.iter().map(|c| c.iterations).collect();
        let protected = self.protected().await?;
        let excess = if self.keep == 0 { 0 } else { committed.len().saturating_sub(self.keep) };
        let doomed: Vec<u64> = committed.keys().take(excess).copied().collect();
        for n in &doomed {
            if let Some(key) = committed.get(n) {
                let _ = self.objects.delete(key).await;
            }
        }
        // Step folders: doomed ones, and uncommitted ones older than the newest.
        let steps = self.layout.steps();
        let mut stale = Vec::new();
        for meta in self.objects.list(&steps).await? {
            let Some(n) = meta.location.prefix_match(&steps).and_then(|mut p| p.next()).and_then(|p| p.as_ref().parse::<u64>().ok()) else {
                continue;
            };
            let uncommitted_old = n < newest && !committed.contains_key(&n) && !pending.contains(&n);
            if (doomed.contains(&n) || uncommitted_old) && !protected.contains(&n) {
                stale.push(meta.location);
            }
        }
        for key in stale {
            let _ = self.objects.delete(&key).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run_id` with an environment of `vars` only.
    fn id_with(configured: &str, world_size: usize, vars: &[(&str, &str)]) -> Result<String> {
        let mut c = Config::default();
        c.shard.run_id = configured.into();
        let env = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        run_id(&c, Rank { rank: 0, world_size }, env)
    }

    #[test]
    fn a_job_of_several_ranks_without_a_run_id_is_refused() {
        let e = id_with("", 3, &[]).unwrap_err();
        assert!(matches!(e, Error::RunIdMissing { world_size: 3 }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("shard.run_id") && text.contains("MODELIO_RUN_ID"), "{text}");
        // torchrun's placeholder is no id; blanks are none either.
        assert!(id_with(" ", 2, &[("TORCHELASTIC_RUN_ID", "none"), ("MODELIO_RUN_ID", "")]).is_err());
    }

    #[test]
    fn every_launch_gets_its_own_run_id() {
        assert_eq!(id_with("mine", 3, &[("MODELIO_RUN_ID", "env")]).unwrap(), "mine");
        assert_eq!(id_with("", 3, &[("MODELIO_RUN_ID", "env"), ("SLURM_JOB_ID", "7")]).unwrap(), "env");
        // torchrun keeps its run id when it restarts the workers; Slurm keeps
        // the job id when it requeues the job and across `srun` steps.
        let torch = |restart: &str| id_with("", 3, &[("TORCHELASTIC_RUN_ID", "j1"), ("TORCHELASTIC_RESTART_COUNT", restart)]).unwrap();
        assert_ne!(torch("0"), torch("1"));
        let slurm = |step: &str, restart: &str| {
            id_with("", 3, &[("SLURM_JOB_ID", "42"), ("SLURM_STEP_ID", step), ("SLURM_RESTART_COUNT", restart)]).unwrap()
        };
        assert_ne!(slurm("0", "0"), slurm("0", "1"));
        assert_ne!(slurm("0", "0"), slurm("1", "0"));
        // A single rank is its own run: a new id at each open.
        assert_ne!(id_with("", 1, &[]).unwrap(), id_with("", 1, &[]).unwrap());
    }

    #[test]
    fn rank_and_world_size_come_from_the_config_first() {
        let mut c = Config::default();
        c.shard.rank = Some(2);
        c.shard.world_size = Some(3);
        assert_eq!(Rank::from_config(&c).unwrap(), Rank { rank: 2, world_size: 3 });
        c.shard.rank = Some(3);
        let e = Rank::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("shard.rank") && e.contains("world size 3"), "{e}");
        c.shard.world_size = Some(0);
        c.shard.rank = Some(0);
        assert!(Rank::from_config(&c).is_err());
    }

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

    #[test]
    fn pieces_are_found_by_tensor_name_across_shards() {
        let piece = |rank: usize, row_offset: usize, rows: usize| DoneRecord {
            format: SHARDED_FORMAT,
            run: String::new(),
            rank,
            world_size: 2,
            iterations: 1,
            key: format!("k{rank}"),
            size: 0,
            crc32c: 0,
            pieces: vec![Piece {
                name: "w".into(),
                dtype: "F32".into(),
                global_shape: vec![4, 2],
                row_offset,
                shape: vec![rows, 2],
                data_offset: 0,
                data_len: 0,
                crc32c: 0,
            }],
        };
        let m = GlobalManifest {
            format: SHARDED_FORMAT,
            model: "m".into(),
            iterations: 1,
            world_size: 2,
            created: String::new(),
            shards: vec![piece(0, 0, 2), piece(1, 2, 2)],
            loss: None,
            lowest: 0.0,
        };
        assert_eq!(m.tensor_names(), vec!["w".to_string()]);
        assert_eq!(m.pieces("w").len(), 2);
        // Sizes: each piece of 2 rows x 2 F32 must hold 16 bytes.
        let mut shards = m.shards.clone();
        assert!(inconsistency(&shards).unwrap().contains("does not fit"));
        for d in &mut shards {
            d.pieces[0].data_len = 16;
        }
        assert_eq!(inconsistency(&shards), None);
        shards[1].pieces[0].row_offset = 3;
        assert!(inconsistency(&shards).unwrap().contains("rank 1"), "rows past the global shape");
        shards[1].pieces[0].row_offset = 2;
        shards[1].pieces[0].global_shape = vec![4, 3];
        assert!(inconsistency(&shards).unwrap().contains("elsewhere"));
    }
}
