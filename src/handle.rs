//! [`ModelIo`]: the handle a training loop holds.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::nn::VarStore;
use tokio::sync::oneshot;

use crate::actors::messages::{Committed, Desc, SaveJob, Snapshot, Stage};
use crate::actors::{Actors, Shared};
use crate::archive::ArchiveReader;
use crate::config::{Config, OnBusy};
use crate::error::{Error, IoContext, Result};
use crate::folder::{self, ModelPaths};
use crate::optim::{Optimizer, OptimizerState};
use crate::staging::{Fence, Pool};
use crate::state::{backup_rule, State};
use crate::tensors::{dtype_of, read_tensor, shape_of};

/// The durable commit of one save, to await or to ignore.
///
/// A failure reaches the ticket and, in any case, the handle's next call.
pub struct Ticket {
    inner: TicketInner,
}

enum TicketInner {
    Pending(oneshot::Receiver<Result<Committed, Arc<Error>>>),
    Ready(Committed),
}

impl Ticket {
    /// Wait for the save to be committed (archive and state file on disk).
    ///
    /// # Errors
    /// [`Error::Background`] when the save failed, [`Error::Stopped`] when the
    /// actors died before answering.
    pub async fn wait(self) -> Result<Committed> {
        match self.inner {
            TicketInner::Ready(c) => Ok(c),
            TicketInner::Pending(rx) => Self::settle(rx.await.map_err(|_| Error::Stopped)?),
        }
    }

    /// [`Ticket::wait`] for code outside an async runtime.
    ///
    /// # Errors
    /// As [`Ticket::wait`].
    pub fn wait_blocking(self) -> Result<Committed> {
        match self.inner {
            TicketInner::Ready(c) => Ok(c),
            TicketInner::Pending(rx) => Self::settle(rx.blocking_recv().map_err(|_| Error::Stopped)?),
        }
    }

    fn settle(r: Result<Committed, Arc<Error>>) -> Result<Committed> {
        r.map_err(|source| Error::Background { what: "save", source })
    }
}

/// Which archive a load used.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub iterations: u64,
    /// True when the live archive was damaged or missing and a backup or
    /// snapshot was loaded instead.
    pub fallback: bool,
}

/// Save counters of a handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveStats {
    pub requested: u64,
    pub skipped: u64,
    /// Saves that had to wait for a free staging buffer.
    pub waited: u64,
    pub committed: u64,
    /// Times a staging buffer had to grow (reallocate).
    pub buffer_growths: u64,
}

/// The model IO of one model: saves, backups, snapshots and loads.
///
/// ```no_run
/// # async fn run() -> modelio::Result<()> {
/// use modelio::{Config, ModelIo};
/// let config = Config::from_file("config/modelio.toml".as_ref())?;
/// let vs = tch::nn::VarStore::new(tch::Device::Cpu);
/// let mut io = ModelIo::open(config)?;
/// if io.model_exists() {
///     io.load(&vs)?;
/// }
/// for _ in 0..100 {
///     // ... forward, backward, optimizer step ...
///     io.record(0.5);
///     if io.iterations() % 10 == 0 {
///         io.save(&vs, None, false)?; // returns at once; await the ticket if you need the commit
///     }
/// }
/// io.save(&vs, None, true)?.wait().await?;
/// io.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct ModelIo {
    config: Config,
    paths: ModelPaths,
    state: State,
    history: Vec<f64>,
    shared: Arc<Shared>,
    /// `None` in predict mode, which never writes.
    actors: Option<Actors>,
    /// Held while training: one writer per model folder. Declared after
    /// `actors` so it is released only once they are drained.
    _lock: Option<crate::lock::FolderLock>,
    pool: Pool,
    fence: Fence,
    model_config: serde_json::Value,
}

impl ModelIo {
    /// Open the model folder of `config`. In training mode this creates the
    /// folder, removes temporary files a crash left behind, reads the state
    /// file, starts a new session and starts the actors.
    ///
    /// # Errors
    /// [`Error::ConfigValue`] on a bad config, [`Error::Io`] when the folder
    /// cannot be created, [`Error::Damaged`] for an unreadable state file.
    pub fn open(config: Config) -> Result<ModelIo> {
        config.validate()?;
        let paths = ModelPaths::new(&config.model.dir, &config.model.name);
        let shared = Arc::new(Shared::new(paths.clone()));
        let (lock, actors) = if config.model.predict {
            (None, None)
        } else {
            std::fs::create_dir_all(&paths.dir).at("create model folder", &paths.dir)?;
            // Under the lock no other writer exists, so every temp file is stale.
            let lock = crate::lock::acquire(&paths.dir)?;
            // Beside the folder, only this folder's own snapshot temporaries
            // are ours: other models' may be in use by their trainers.
            let snapshots = crate::snapshot::snapshot_dir(&paths.dir, 0);
            let snapshots = snapshots.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix("0_iters")).unwrap_or("");
            let removed = crate::durable::remove_stale_temps(&paths.dir, |_| true)?
                + crate::durable::remove_stale_temps(&crate::durable::parent_of(&paths.dir), |base| {
                    !snapshots.is_empty() && base.starts_with(snapshots)
                })?;
            if removed > 0 {
                tracing::info!(target: "modelio", "removed {removed} temporary files left by an interrupted run");
            }
            (Some(lock), Some(Actors::start(shared.clone(), config.snapshot.keep)?))
        };
        let mut state = reconcile_state(&paths, config.model.predict)?;
        if !config.model.predict {
            state.start_session(config.train.batch_size);
        }
        let pool = Pool::new(config.staging.max_inflight);
        Ok(ModelIo {
            config,
            paths,
            state,
            history: Vec::new(),
            shared,
            actors,
            _lock: lock,
            pool,
            fence: Fence::default(),
            model_config: serde_json::Value::Null,
        })
    }

    /// `<model_dir>/<name>.mio`
    pub fn filename(&self) -> PathBuf {
        self.paths.archive()
    }

    /// The model folder.
    pub fn model_dir(&self) -> &Path {
        &self.paths.dir
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.paths.name
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the archive exists.
    pub fn model_exists(&self) -> bool {
        self.paths.archive().is_file()
    }

    /// The archive names in the folder when it holds a model other than this
    /// one, else `None` (see [`folder::multiple_models`]).
    pub fn multiple_models_in_folder(&self) -> Option<Vec<String>> {
        folder::multiple_models(&folder::archive_names(&self.paths.dir), &self.paths.name)
    }

    /// Losses recorded since the last save.
    pub fn history(&self) -> &[f64] {
        &self.history
    }

    /// Record one training iteration and its total loss.
    pub fn record(&mut self, loss: f64) {
        self.history.push(loss);
        self.state.count_iteration();
    }

    /// Total iterations trained, over all sessions.
    pub fn iterations(&self) -> u64 {
        self.state.total_iterations
    }

    /// The state that the next save writes.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The model's own configuration, stored in the state file with modelio's.
    pub fn set_model_config(&mut self, config: serde_json::Value) {
        self.model_config = config;
    }

    /// The fence optimizer steps must wait on (see [`Fence`]).
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Save counters.
    pub fn stats(&self) -> SaveStats {
        let s = &self.shared.stats;
        SaveStats {
            requested: s.requested.load(Ordering::Relaxed),
            skipped: s.skipped.load(Ordering::Relaxed),
            waited: s.waited.load(Ordering::Relaxed),
            committed: s.committed.load(Ordering::Relaxed),
            buffer_growths: self.pool.growths(),
        }
    }

    /// Pick the archive to load: the live one, or with `load.fallback` the
    /// newest that verifies (`.bk`, then snapshots by iteration).
    fn open_for_load(&self) -> Result<(ArchiveReader, bool)> {
        let live = self.paths.archive();
        let first = match ArchiveReader::open(&live) {
            Ok(r) if !self.config.load.fallback || r.verify().is_empty() => return Ok((r, false)),
            Ok(r) => Error::damaged(&live, &self.paths.name, "tensors", r.verify().join(", ")),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Error::ModelNotFound {
                dir: self.paths.dir.clone(),
                name: self.paths.name.clone(),
                file: live.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            },
            Err(e) => e,
        };
        if !self.config.load.fallback {
            return Err(first);
        }
        let mut candidates = vec![ModelPaths::backup_of(&live)];
        let mut snaps = crate::snapshot::list(&self.paths.dir);
        snaps.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        candidates.extend(snaps.into_iter().map(|(_, dir)| dir.join(live.file_name().unwrap_or_default())));
        for candidate in candidates {
            if let Ok(r) = ArchiveReader::open(&candidate) {
                if r.verify().is_empty() {
                    tracing::warn!(target: "modelio", "{first}; loading {} instead", candidate.display());
                    return Ok((r, true));
                }
            }
        }
        Err(first)
    }

    /// Load the model's tensors into `vs` (names as the VarStore names them).
    ///
    /// # Errors
    /// [`Error::ModelNotFound`] naming the folder searched; [`Error::Damaged`]
    /// naming the file and tensor, with the restore hint; [`Error::Mismatch`]
    /// naming a missing, extra or differently shaped tensor.
    pub fn load(&self, vs: &VarStore) -> Result<Loaded> {
        let (reader, fallback) = self.open_for_load()?;
        crate::tensors::load_varstore(&reader, vs)?;
        Ok(Loaded { path: reader.path().to_path_buf(), iterations: reader.manifest.iterations, fallback })
    }

    /// The optimizer state stored in the archive, or `None` when it has none.
    ///
    /// # Errors
    /// As [`ModelIo::load`].
    pub fn load_optimizer(&self) -> Result<Option<OptimizerState>> {
        let (reader, _) = self.open_for_load()?;
        let Some((located, json)) = &reader.optimizer else { return Ok(None) };
        let kind = reader.manifest.optimizer.as_ref().map(|o| o.kind.clone()).unwrap_or_default();
        let mut tensors = std::collections::BTreeMap::new();
        for t in located {
            tensors.insert(t.meta.name.clone(), read_tensor(&reader, t)?);
        }
        Ok(Some(OptimizerState { kind, json: json.clone(), tensors }))
    }

    /// Save the model (and the optimizer, per `save.optimizer`) and the state
    /// file in the background; then the backup rule. Returns at once: the
    /// trainer-side cost is taking a staging buffer and queueing the copy.
    /// Parameters must not be modified until the copy lands: optimizers wait
    /// on [`ModelIo::fence`].
    ///
    /// When every staging buffer is busy the save waits, or with
    /// `staging.on_busy = "skip"` is skipped (its ticket says so); an exit
    /// save always waits.
    ///
    /// # Errors
    /// An earlier background failure ([`Error::Background`]), a dtype the
    /// format cannot hold, or [`Error::PredictMode`].
    pub fn save(&mut self, vs: &VarStore, optimizer: Option<&dyn Optimizer>, is_exit: bool) -> Result<Ticket> {
        let started = Instant::now();
        self.shared.take_failure()?;
        let Some(actors) = &self.actors else {
            return Err(Error::PredictMode { dir: self.paths.dir.clone(), name: self.paths.name.clone() });
        };
        let stats = &self.shared.stats;
        stats.requested.fetch_add(1, Ordering::Relaxed);

        let mut vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut model = Vec::with_capacity(vars.len());
        let mut tensors = Vec::with_capacity(vars.len());
        for (name, t) in vars {
            model.push(Desc { dtype: dtype_of(&name, t.kind())?, shape: shape_of(&t), name });
            tensors.push(t);
        }
        let optimizer = match optimizer {
            Some(o) if self.config.save.optimizer.stores(is_exit) => {
                let mut descs = Vec::new();
                for (name, t) in o.state_tensors() {
                    descs.push(Desc { dtype: dtype_of(&name, t.kind())?, shape: shape_of(&t), name });
                    tensors.push(t);
                }
                Some((o.kind().to_string(), o.state_json(), descs))
            }
            _ => None,
        };

        let (mut lease, waited) = match self.pool.try_lease() {
            Some(l) => (l, false),
            None if self.config.staging.on_busy == OnBusy::Skip && !is_exit => {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "modelio", iterations = self.state.total_iterations, skipped = true, "save skipped: every staging buffer is busy (staging.on_busy = \"skip\")");
                return Ok(Ticket { inner: TicketInner::Ready(self.skipped(started.elapsed())) });
            }
            None => {
                stats.waited.fetch_add(1, Ordering::Relaxed);
                (self.pool.lease(), true)
            }
        };
        // GPU tensors: queue non-blocking copies into pinned buffers now, in
        // stream order with training (later kernels that modify a parameter
        // run after its copy). CPU tensors: copied by the stager while the
        // fence holds optimizer steps back.
        let mut cpu = Vec::with_capacity(tensors.len());
        let mut gpus: Vec<usize> = Vec::new();
        for (i, t) in tensors.into_iter().enumerate() {
            match t.device() {
                tch::Device::Cuda(d) => {
                    enqueue_device_copy(&t, &mut lease, i)?;
                    if !gpus.contains(&d) {
                        gpus.push(d);
                    }
                }
                _ => cpu.push((i, t)),
            }
        }
        // One event per GPU marks the end of this save's copies on its stream.
        let events = gpus.into_iter().map(crate::cuda::Event::record).collect::<Result<Vec<_>>>()?;

        let decision = backup_rule(&self.history, self.state.lowest_average_loss);
        self.history.clear();
        self.state.lowest_average_loss = decision.lowest;
        self.state.config = serde_json::json!({ "modelio": self.config, "model": self.model_config });
        let (reply, rx) = oneshot::channel();
        let guard = if cpu.is_empty() { None } else { Some(self.fence.arm()) };
        let stall = started.elapsed();
        let job = SaveJob {
            iterations: self.state.total_iterations,
            state_json: self.state.to_json(),
            average_loss: decision.average,
            backup: decision.backup,
            model,
            optimizer,
            stall,
            waited,
            reply,
        };
        actors.stager.try_send(Stage { job, tensors: cpu, lease, guard, events }).map_err(|_| Error::Stopped)?;
        Ok(Ticket { inner: TicketInner::Pending(rx) })
    }

    fn skipped(&self, stall: Duration) -> Committed {
        Committed {
            iterations: self.state.total_iterations,
            path: self.paths.archive(),
            bytes: 0,
            average_loss: 0.0,
            backed_up: false,
            with_optimizer: false,
            skipped: true,
            stall,
            copy: Duration::ZERO,
            write: Duration::ZERO,
        }
    }

    /// Snapshot the model folder into `<model_dir>_snapshot_<N>_iters`, N being
    /// the iterations of the last save requested before this call (the
    /// snapshot waits for that save to be committed).
    ///
    /// # Errors
    /// An earlier background failure, or [`Error::PredictMode`].
    pub fn snapshot(&self) -> Result<()> {
        self.shared.take_failure()?;
        let Some(actors) = &self.actors else {
            return Err(Error::PredictMode { dir: self.paths.dir.clone(), name: self.paths.name.clone() });
        };
        actors.stager.try_send(Snapshot).map_err(|_| Error::Stopped)
    }

    /// Wait until every save, backup and snapshot requested so far is done.
    ///
    /// # Errors
    /// The first background failure not yet reported.
    pub async fn flush(&self) -> Result<()> {
        if let Some(a) = &self.actors {
            a.flush().await?;
        }
        self.shared.take_failure()
    }

    /// [`ModelIo::flush`] for code outside an async runtime.
    ///
    /// # Errors
    /// As [`ModelIo::flush`].
    pub fn flush_blocking(&self) -> Result<()> {
        if let Some(a) = &self.actors {
            a.flush_blocking()?;
        }
        self.shared.take_failure()
    }

    /// Drain every pending write, backup and snapshot, then stop the actors.
    ///
    /// # Errors
    /// The first background failure not yet reported.
    pub async fn shutdown(mut self) -> Result<()> {
        let result = self.flush().await;
        if let Some(mut a) = self.actors.take() {
            a.stop();
        }
        result
    }

    /// [`ModelIo::shutdown`] for code outside an async runtime.
    ///
    /// # Errors
    /// As [`ModelIo::shutdown`].
    pub fn shutdown_blocking(mut self) -> Result<()> {
        if let Some(mut a) = self.actors.take() {
            a.flush_blocking()?;
            a.stop();
        }
        self.shared.take_failure()
    }

    /// Test hook: make every background write sleep first.
    #[doc(hidden)]
    pub fn set_write_delay(&self, delay: Duration) {
        self.shared.set_write_delay(delay);
    }
}

/// The state to continue from. The archive carries a copy of the state file
/// as of its save, so when a crash fell between committing the archive and
/// the state file (or the state file is damaged), the archive's copy wins and,
/// in training mode, is written back.
fn reconcile_state(paths: &ModelPaths, predict: bool) -> Result<State> {
    let state_path = paths.state();
    let from_file = if state_path.exists() { Some(State::read(&state_path)) } else { None };
    let from_archive: Option<State> = ArchiveReader::open(&paths.archive())
        .ok()
        .and_then(|r| r.state)
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    match (from_file, from_archive) {
        (Some(Ok(f)), Some(a)) if f.total_iterations == a.total_iterations => Ok(f),
        (_, Some(a)) => {
            if !predict {
                tracing::warn!(target: "modelio", "state file {} did not match the archive; restored it from the archive", state_path.display());
                crate::durable::commit_bytes(&state_path, &a.to_json())?;
            }
            Ok(a)
        }
        (Some(f), None) => f,
        (None, None) => Ok(State::new(&paths.name)),
    }
}

/// Queue a non-blocking copy of a GPU tensor into pinned buffer `i` of the lease.
fn enqueue_device_copy(t: &tch::Tensor, lease: &mut crate::staging::Lease, i: usize) -> Result<()> {
    let len = crate::tensors::byte_len(t);
    let buf = lease.pinned(i, len, t.device())?;
    if len == 0 {
        return Ok(());
    }
    let src = t.f_contiguous()?;
    let mut dst = buf.f_view_dtype(src.kind())?.f_reshape(src.size())?;
    crate::cuda::copy_async(&mut dst, &src)
}
