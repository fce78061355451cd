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
//! A rank's save goes through the pipeline of a single save: a staging
//! buffer set from the pool, the copies started at the call (the immediate
//! CPU copy, the deferred one under the fence, device copies into pinned
//! buffers), then a worker of its own (an actix actor, as every modelio
//! worker) lands the copies, writes the shard, then the done-record. It
//! saves tensors described one by one ([`Part`]) or a `VarStore` and its
//! optimizer under a [`Plan`]. The coordinator (rank 0)
//! also commits: once every rank's done-record for the step exists (or a
//! deadline passes, a counted failure), it writes the global manifest with a
//! create-if-absent put, so two coordinators racing on one step (a restarted
//! job) make one manifest, and moves `LATEST`. Until the manifest exists the
//! step does not exist for readers; a rank that dies means no manifest, and
//! the previous step stays the latest. On a filesystem the create is a hard
//! link (atomic), through the same `object_store` code path as S3.
//!
//! A tensor is saved whole, as rows of its first dimension, or as any box of
//! its global shape (an offset and a size in every dimension). Loading takes
//! any partition: each box a rank wants is read with ranged reads of exactly
//! the stored boxes that overlap it (checked against their CRC-32C) and
//! reassembled. A step whose records a dead launch wrote whole is committed
//! when the next launch opens.
//!
//! Files: this one holds the rank's handle ([`ShardedIo`]) and the state its
//! workers share; `save.rs` a rank's save through the staging pipeline and
//! the end of training, `plan.rs` a `VarStore` and optimizer under a plan,
//! `ticket.rs` what a save becomes; `records.rs` what is stored,
//! `layout.rs` where, `run.rs` the run id, `writer.rs` each rank's shard
//! writer, `commit.rs` the coordinator (and recovery of steps a dead launch
//! left), `read.rs` listing and reading back, `boxes.rs` the box arithmetic
//! of pieces.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[cfg(feature = "torch")]
use tch::Tensor;

use crate::archive::format::DType;
use crate::background::{lock, worker, Inbox, Newest, Priority, Step, Workers};
use crate::config::{Config, RemoteConfig};
use crate::error::{Error, Result};
use crate::remote::objects::Objects;
#[cfg(feature = "torch")]
use crate::tensors::copy_bytes;

mod boxes;
mod commit;
mod layout;
#[cfg(feature = "torch")]
mod plan;
mod read;
mod records;
mod run;
#[cfg(feature = "torch")]
mod save;
mod ticket;
#[cfg(feature = "torch")]
mod writer;

pub use boxes::Region;
pub use layout::Layout;
#[cfg(feature = "torch")]
pub use plan::{Plan, ShardResumed};
pub use records::{DoneRecord, GlobalManifest, Piece, SHARDED_FORMAT};
use run::run_id;
use ticket::Reply;
pub use ticket::{ShardFinished, ShardSaved, ShardTicket};

/// What a rank saves of one tensor: all of it, or its box of a global
/// tensor.
#[cfg(feature = "torch")]
pub struct Part<'a> {
    pub name: &'a str,
    pub tensor: &'a Tensor,
    place: Place,
}

/// Where a part lies in its global tensor.
#[cfg(feature = "torch")]
#[derive(Debug, Clone)]
enum Place {
    Whole,
    /// Rows from `offset` of a tensor of `global_rows` rows, whole in every
    /// other dimension.
    Rows {
        offset: usize,
        global_rows: usize,
    },
    /// The box at `offset` (one per dimension) of a tensor of shape `global`.
    Box {
        offset: Vec<usize>,
        global: Vec<usize>,
    },
}

#[cfg(feature = "torch")]
impl<'a> Part<'a> {
    /// The whole tensor (each rank that holds it may save it; a load reads it once).
    pub fn whole(name: &'a str, tensor: &'a Tensor) -> Part<'a> {
        Part { name, tensor, place: Place::Whole }
    }

    /// Rows `[row_offset, row_offset + rows)` of a tensor of `global_rows`
    /// rows split along its first dimension.
    pub fn rows(name: &'a str, tensor: &'a Tensor, row_offset: usize, global_rows: usize) -> Part<'a> {
        Part { name, tensor, place: Place::Rows { offset: row_offset, global_rows } }
    }

    /// The box of a tensor of shape `global` that starts at `offset` (one
    /// per dimension) and has `tensor`'s shape: columns of a row-parallel
    /// layer's weight (`offset = [0, c]`), a block of a 2-D split, ...
    pub fn boxed(name: &'a str, tensor: &'a Tensor, offset: &[usize], global: &[usize]) -> Part<'a> {
        Part { name, tensor, place: Place::Box { offset: offset.to_vec(), global: global.to_vec() } }
    }

    /// Its box and the global shape, checked against each other.
    fn region(&self, shape: &[usize]) -> Result<(Region, Vec<usize>)> {
        let (offset, global) = match &self.place {
            Place::Whole => (vec![0; shape.len()], shape.to_vec()),
            Place::Rows { offset, global_rows } => {
                let rows = shape.first().copied().unwrap_or(0);
                if shape.is_empty() || offset.checked_add(rows).is_none_or(|end| end > *global_rows) {
                    return Err(Error::Argument {
                        arg: format!("rows of `{}`", self.name),
                        value: format!("{offset}..{} of {global_rows}", offset.saturating_add(rows)),
                        allowed: "rows inside the global first dimension".into(),
                    });
                }
                let mut o = vec![0; shape.len()];
                o[0] = *offset;
                let mut g = shape.to_vec();
                g[0] = *global_rows;
                (o, g)
            }
            Place::Box { offset, global } => (offset.clone(), global.clone()),
        };
        let region = Region { offset, shape: shape.to_vec() };
        if !region.fits(&global) {
            return Err(Error::Argument {
                arg: format!("the box of `{}`", self.name),
                value: format!("offset {:?} and shape {:?} in a global shape {global:?}", region.offset, region.shape),
                allowed: "a box inside the global shape, with one offset per dimension of the tensor".into(),
            });
        }
        Ok((region, global))
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

/// What a rank loads of one tensor: all of it, rows `[start, end)`, or any
/// box, whatever boxes the step was saved in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub name: String,
    pub(crate) place: Wanted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wanted {
    Whole,
    Rows(usize, usize),
    Box(Region),
}

impl Want {
    pub fn whole(name: &str) -> Want {
        Want { name: name.into(), place: Wanted::Whole }
    }

    /// Rows `[start, end)` of the first dimension, whole in the others.
    pub fn rows(name: &str, start: usize, end: usize) -> Want {
        Want { name: name.into(), place: Wanted::Rows(start, end) }
    }

    /// The box at `offset` of size `shape` (one of each per dimension).
    pub fn boxed(name: &str, offset: &[usize], shape: &[usize]) -> Want {
        Want { name: name.into(), place: Wanted::Box(Region { offset: offset.to_vec(), shape: shape.to_vec() }) }
    }

    /// The box wanted of a tensor of shape `global`, if it lies inside it.
    pub(crate) fn region(&self, global: &[usize]) -> Option<Region> {
        let region = match &self.place {
            Wanted::Whole => Region::whole(global),
            Wanted::Rows(start, end) if start <= end && !global.is_empty() => {
                let mut r = Region::whole(global);
                r.offset[0] = *start;
                r.shape[0] = end - start;
                r
            }
            Wanted::Rows(..) => return None,
            Wanted::Box(r) => r.clone(),
        };
        region.fits(global).then_some(region)
    }

    /// What is wanted, in words.
    pub(crate) fn describe(&self) -> String {
        match &self.place {
            Wanted::Whole => "the whole tensor".into(),
            Wanted::Rows(a, b) => format!("rows {a}..{b}"),
            Wanted::Box(r) => format!("the box at {:?} of shape {:?}", r.offset, r.shape),
        }
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
    /// Steps a dead launch wrote whole but never committed, committed by
    /// this rank when it opened.
    pub recovered: AtomicU64,
}

/// One tensor of a save: where its bytes go in the shard. The bytes are in
/// the job's staging buffer of the same index.
#[cfg_attr(not(feature = "torch"), allow(dead_code))]
struct Staged {
    name: String,
    dtype: DType,
    /// The piece's box of the whole tensor, and the whole tensor's shape.
    region: Region,
    global: Vec<usize>,
}

/// A save whose copies are started, waiting for the writer.
#[cfg_attr(not(feature = "torch"), allow(dead_code))]
struct Job {
    iterations: u64,
    tensors: Vec<Staged>,
    /// Its copies into a staging buffer set, landed by the writer.
    #[cfg(feature = "torch")]
    copies: crate::staging::Copies,
    loss: Option<f64>,
    /// How long `save` held the caller.
    stall: Duration,
    reply: Option<Reply>,
}

impl Step for Job {
    fn step(&self) -> u64 {
        self.iterations
    }
}

/// A step the coordinator is to commit.
struct Commit {
    iterations: u64,
    /// `shard.commit_deadline_secs` after its own shard was written.
    deadline: Instant,
    loss: Option<f64>,
    /// The coordinator's own save of the step, told once the commit is over.
    saved: Option<(ShardSaved, Option<Reply>)>,
}

#[derive(Default)]
struct Queue {
    /// The save being written and the one waiting for the writer.
    job: Newest<Job>,
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
    /// `staging.on_busy = "wait"`: a save waits for a free staging buffer
    /// set (else it replaces the save waiting to be written, or is skipped).
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    wait_when_busy: bool,
    /// The staging buffer sets (`staging.max_inflight` of them, reused
    /// save after save), the CPU copy mode and its fence: the pipeline of a
    /// single process's saves.
    #[cfg(feature = "torch")]
    pool: crate::staging::Pool,
    #[cfg(feature = "torch")]
    cpu_copy: crate::config::CpuCopy,
    #[cfg(feature = "torch")]
    fence: crate::staging::Fence,
    /// Losses recorded since the last save.
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    history: Mutex<Vec<f64>>,
    /// Opened with [`ShardedIo::open_reader`]: saves are refused.
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    reader: bool,
    /// A shard at least this large streams to the store in parts of this
    /// size, at most `parts_in_flight` being sent at once (`[remote]`'s
    /// `part_size_mib` and `parts_in_flight`).
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    part_size: usize,
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    parts_in_flight: usize,
    /// The lowest reported loss, read from the newest manifest on first use.
    lowest: Mutex<Option<f64>>,
    queue: Mutex<Queue>,
    /// Told of every change of `queue` (a job taken or done, a commit over):
    /// `save` waiting for the slot, `flush` and the drop wait on it.
    wake: Condvar,
    /// The workers, set once they are started (no writer without libtorch:
    /// nothing to save).
    #[cfg(feature = "torch")]
    writer: OnceLock<actix::Addr<writer::ShardWriter>>,
    coordinator: OnceLock<actix::Addr<commit::Coordinator>>,
    stats: ShardStats,
    /// Background failures (shards not written, steps not committed,
    /// snapshots not made) not yet reported by `flush`.
    failures: Inbox,
    /// This run's id: a done-record of another run is never committed.
    run_id: String,
    rt: crate::remote::blocking::Blocking,
}

/// A loaded box, read straight into a new CPU tensor of its dtype and shape.
#[cfg(feature = "torch")]
struct Loaded(Tensor);

#[cfg(feature = "torch")]
impl read::Sink for Loaded {
    fn make(dtype: DType, shape: &[usize], _len: usize) -> Result<Self> {
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Ok(Loaded(Tensor::f_empty(&shape, (crate::tensors::kind_of(dtype), tch::Device::Cpu))?))
    }
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: a tensor just made here, shared with no one until the
        // load returns it.
        unsafe { crate::tensors::host_bytes_mut(&mut self.0) }.unwrap_or_default()
    }
}

/// How many wants a load reads at once.
#[cfg(feature = "torch")]
const LOADS_IN_FLIGHT: usize = 8;

/// How many times a rank tries a write of its own (a shard, a done-record)
/// or a request of its open before the store's failure is its failure.
pub const TRIES: u32 = 4;

/// One rank's sharded checkpoints of one model.
pub struct ShardedIo {
    shared: Arc<Shared>,
    workers: Workers,
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
        Self::open_as(config, false)
    }

    /// Open rank 0 of 1 of `config`'s model only to read it: it never
    /// writes, not even the step a dead launch left whole that [`open`]
    /// commits, so it works with read-only access and beside a live job
    /// (an evaluation job, the `modelio` command). It cannot save.
    ///
    /// [`open`]: ShardedIo::open
    ///
    /// # Errors
    /// As [`ShardedIo::open`].
    pub fn open_reader(config: &Config) -> Result<ShardedIo> {
        let mut c = config.clone();
        c.shard.rank = Some(0);
        c.shard.world_size = Some(1);
        Self::open_as(&c, true)
    }

    fn open_as(config: &Config, reader: bool) -> Result<ShardedIo> {
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
            #[cfg(feature = "torch")]
            pool: crate::staging::Pool::new(config.staging.max_inflight),
            #[cfg(feature = "torch")]
            cpu_copy: config.staging.cpu_copy,
            #[cfg(feature = "torch")]
            fence: crate::staging::Fence::default(),
            history: Mutex::new(Vec::new()),
            reader,
            part_size: rc.part_size_mib.saturating_mul(1 << 20),
            parts_in_flight: rc.parts_in_flight,
            lowest: Mutex::new(None),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            #[cfg(feature = "torch")]
            writer: OnceLock::new(),
            coordinator: OnceLock::new(),
            stats: ShardStats::default(),
            failures: Inbox::default(),
            run_id,
            rt,
        });
        // A coordinator claims its run id: a launch that reuses an earlier
        // launch's id could commit that run's leftover shards with its own.
        if rank.rank == 0 && rank.world_size > 1 {
            let claim = uuid::Uuid::new_v4().simple().to_string();
            shared.retrying("record the run id", || shared.run(shared.claim_run(&claim)))?;
        }
        // Steps a dead launch left whole but uncommitted are committed
        // before any rank reads which step is the newest. A single rank
        // that cannot do it still opens (it is no rank's newest step but
        // its own); a rank of several must not read another newest step
        // than the others.
        if !reader {
            match shared.retrying("recover uncommitted steps", || shared.run(shared.recover())) {
                Ok(_) => {}
                Err(e) if rank.world_size == 1 => tracing::warn!(target: "modelio", "steps left uncommitted not recovered: {}", e.report()),
                Err(e) => return Err(e),
            }
        }
        let s = shared.clone();
        let (workers, ()) = Workers::start("modelio-shard", move || {
            #[cfg(feature = "torch")]
            {
                let w = s.clone();
                let _ = s.writer.set(worker("modelio-shard-writer", Priority::Normal, move || writer::ShardWriter { shared: w.clone() }));
            }
            if s.rank.rank == 0 {
                let c = s.clone();
                let _ =
                    s.coordinator.set(worker("modelio-shard-commit", Priority::Normal, move || commit::Coordinator { shared: c.clone() }));
            }
        })?;
        Ok(ShardedIo { shared, workers })
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
        let done = self.shared.wait_idle(timeout);
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
    /// Read `wants` from step `m`: each a whole tensor, rows or a box of one,
    /// reassembled from the pieces that overlap it, every piece read checked
    /// against its CRC-32C. The checksums and copies run on the two threads
    /// of the rank's object-store runtime, beside its saves' uploads and
    /// commits if a save is in flight.
    ///
    /// # Errors
    /// [`Error::Mismatch`] when a tensor or rows are not in the step;
    /// [`Error::RemoteDamaged`] when a piece's checksum fails; [`Error::Remote`];
    /// [`Error::Internal`] naming the tensor when its read panicked.
    pub fn load(&self, m: &GlobalManifest, wants: &[Want]) -> Result<Vec<Tensor>> {
        use futures::StreamExt;
        // Wants are read in the order their first pieces lie in the shards
        // (sequential reads of each shard), a few at once, each a task of
        // the runtime: the store's reads overlap the copies and checksums of
        // those already read, which run on the runtime's threads side by side.
        let s = self.shared.clone();
        let mut order: Vec<usize> = (0..wants.len()).collect();
        let place = |w: &Want| m.pieces(&w.name).first().map(|(key, p)| (key.to_string(), p.data_offset));
        order.sort_by_cached_key(|&i| place(&wants[i]));
        let step = Arc::new(m.clone());
        let task = |w: &Want| {
            let (s, m, w) = (s.clone(), step.clone(), w.clone());
            let name = w.name.clone();
            async move {
                let read = tokio::spawn(async move { s.read_want::<Loaded>(&m, &w).await.map(|Loaded(t)| t) });
                read.await.unwrap_or_else(|e| {
                    let how = if e.is_panic() { "panicked" } else { "was cancelled" };
                    let message = format!("the read of tensor `{name}` {how}: {e}");
                    Err(Error::Internal { what: crate::error::Work::Load, message })
                })
            }
        };
        let read = futures::stream::iter(order.iter().map(|&i| &wants[i])).map(task).buffered(LOADS_IN_FLIGHT);
        let loaded = s.run(read.collect::<Vec<_>>());
        // Back in the order asked for.
        let mut loaded: Vec<(usize, Result<Tensor>)> = order.into_iter().zip(loaded).collect();
        loaded.sort_by_key(|(i, _)| *i);
        loaded.into_iter().map(|(_, t)| t).collect()
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
        s.run(s.commit_once(iterations, None, &mut commit::Seen::default())).map(|m| m.is_some())
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
            let pending = q.job.waiting().is_some_and(|j| j.iterations == n)
                || q.job.is_running()
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
    /// Waits until the save handed over last is written and (on the
    /// coordinator) every step is committed or failed, each within its
    /// deadline, then stops the workers.
    fn drop(&mut self) {
        let mut q = lock(&self.shared.queue);
        q.stop = true;
        self.shared.wake.notify_all();
        while !q.is_idle() {
            q = self.shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        drop(q);
        self.workers.stop();
    }
}

/// Look at the queue: a worker's only message.
#[derive(actix::Message)]
#[rtype(result = "()")]
struct Wake;

impl Queue {
    /// Nothing being written or committed, and nothing waiting to be.
    fn is_idle(&self) -> bool {
        self.job.is_idle() && self.commits.is_empty() && !self.committing
    }
}

impl Shared {
    fn run<F: std::future::Future + Send>(&self, fut: F) -> F::Output
    where
        F::Output: Send,
    {
        self.rt.run(fut)
    }

    /// Tell the writer a save waits.
    #[cfg(feature = "torch")]
    fn wake_writer(&self) {
        if let Some(w) = self.writer.get() {
            w.do_send(Wake);
        }
    }

    /// Tell the coordinator a step waits to be committed.
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    fn wake_coordinator(&self) {
        if let Some(c) = self.coordinator.get() {
            c.do_send(Wake);
        }
    }

    /// Wait until every save handed over so far is written and committed
    /// or failed, at most `timeout`: false when the time ran out.
    fn wait_idle(&self, timeout: Duration) -> bool {
        // No deadline when it lies past what an instant can hold (`Duration::MAX`).
        let deadline = Instant::now().checked_add(timeout);
        let mut q = lock(&self.queue);
        while !q.is_idle() {
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return false;
            }
            q = self.wake.wait_timeout(q, left.min(Duration::from_millis(50))).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        drop(q);
        self.settle_snapshots();
        true
    }

    /// Run `request` again while the store fails it (a throttled or dropped
    /// request, S3's SlowDown after its client's own retries): up to
    /// [`TRIES`] tries, pausing 4x longer each time from 100 ms, within
    /// `shard.commit_deadline_secs`. A rank's writes and its open outlast a
    /// burst of throttling instead of losing the step (or the launch); a
    /// store that keeps refusing still fails in about 2 s. Each request is
    /// idempotent.
    fn retrying<T>(&self, what: &str, mut request: impl FnMut() -> Result<T>) -> Result<T> {
        let until = Instant::now().checked_add(self.deadline).unwrap_or_else(Instant::now);
        let mut pause = Duration::from_millis(100);
        let mut tries = 1;
        loop {
            match request() {
                Err(e @ (Error::Remote { .. } | Error::RemoteContended { .. })) if tries < TRIES && Instant::now() + pause < until => {
                    tracing::warn!(target: "modelio", "rank {}: {what} failed, tried again in {} ms: {}", self.rank.rank, pause.as_millis(), e.report());
                    std::thread::sleep(pause);
                    pause *= 4;
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// Keep a background failure for the next `flush` (it was logged
    /// where it happened).
    fn report_later(&self, e: Error) {
        self.failures.keep(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
