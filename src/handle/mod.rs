//! [`ModelIo`]: the handle a training loop holds.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::nn::VarStore;
use tokio::sync::oneshot;

use crate::actors::messages::{Desc, SaveJob, Stage};
use crate::actors::{Actors, Settings, Shared};
use crate::archive::ArchiveReader;
use crate::config::{Config, OnBusy};
use crate::error::{Error, IoContext, Result, Work};
use crate::folder::{self, ModelPaths};
use crate::optim::{Optimizer, OptimizerState};
use crate::policy::state::{backup_rule, State};
use crate::staging::{Fence, Lease, Pool};
use crate::tensors::{checked_shape, dtype_of};

mod load;
pub(crate) mod outcome;
mod recover;
#[cfg_attr(not(feature = "remote"), path = "no_remote.rs")]
mod remote;
mod ticket;

use load::{missing_optimizer_reason, read_for_load, read_optimizer, Read};
use recover::{file_name, history_without_archive, reconcile_state, remove_stale_temps};
use remote::Seam;

pub use outcome::{Committed, Finished, Loaded, OptimizerResume, Resumed, SaveStats};
pub use ticket::Ticket;

/// The last save requested, for naming snapshots after it.
#[derive(Debug, Clone, Copy)]
enum LastSave {
    Queued(u64),
    Skipped(u64),
}

/// The model IO of one model: saves, backups, snapshots and loads.
///
/// Async methods (`open_async`, `resume_async`, `save_async`, `flush`,
/// `shutdown`, `finish`, awaiting a [`Ticket`]) do not wait on the disk or
/// on a free staging buffer on the runtime: file IO runs on blocking threads
/// and waits are awaited. What they still do on the calling thread is the
/// copy a save makes at the call (about one memcpy of the CPU state; the
/// first save of a GPU state also allocates its pinned buffers, about 0.4 s
/// per GiB), and joining the actors' thread once drained at shutdown. Their
/// plain counterparts block the calling thread on file IO or on a free
/// staging buffer, as each method's doc says. Dropping a handle without
/// `shutdown` or `finish` blocks the dropping thread until the actors drain.
///
/// ```no_run
/// # async fn run(vs: tch::nn::VarStore) -> modelio::Result<()> {
/// let mut io = modelio::ModelIo::open_async(modelio::Config::default()).await?;
/// io.resume_async(&vs, None).await?;
/// for _ in 0..100 {
///     // forward, backward, optimizer step ...
///     io.record(0.5);
///     if io.iterations() % 10 == 0 {
///         match io.save_async(&vs, None).await {
///             Ok(_ticket) => {} // committed in the background
///             Err(e) if e.is_retryable() => eprintln!("warning: {}", e.report()), // keep training
///             Err(e) => return Err(e),
///         }
///     }
/// }
/// let finished = io.finish(&vs, None).await?; // exit save, then drain
/// for e in &finished.unreported {
///     eprintln!("warning: {}", e.report()); // a backup or snapshot that failed near the end
/// }
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
    _lock: Option<crate::folder::lock::FolderLock>,
    pool: Pool,
    fence: Fence,
    /// The archive the last load read, kept so that `load_optimizer` reads
    /// the same one without opening and verifying it again.
    loaded: Option<ArchiveReader>,
    /// Set when the archive is missing but the folder holds its history and
    /// `load.fallback` is on: saving before a load would overwrite it.
    unloaded_history: Option<String>,
    last_save: Option<LastSave>,
    /// The remote tier, when `[remote]` is configured (it rides on the
    /// pipeline as `shared.rider`; the handle asks it for counters and waits
    /// on its uploads).
    remote: Seam,
}

impl ModelIo {
    /// Open the model folder of `config`. In training mode this creates the
    /// folder, takes its lock, removes temporary files an interrupted run
    /// left behind, reads the state file, starts a new session and starts
    /// the actors. Blocks on file IO (call it from `spawn_blocking` or before
    /// the runtime starts if that matters).
    ///
    /// # Errors
    /// [`Error::ConfigValue`] on a bad config; [`Error::Io`] when the folder
    /// cannot be created; [`Error::Locked`] when another process trains into
    /// it; [`Error::ArchiveMissing`] when the archive is gone but the folder
    /// holds its state file, backups or snapshots (and `load.fallback` is off);
    /// [`Error::DamagedState`] for an unreadable state file with no archive;
    /// [`Error::NotRegular`] when the archive's name is taken by a FIFO or device;
    /// when the folder holds no model and `remote.restore` fetches one,
    /// [`Error::RemoteDenied`] or [`Error::RemoteNoBucket`] when the store
    /// refuses the credentials or has no such bucket, [`Error::RemoteRestore`]
    /// when it cannot be read otherwise.
    pub fn open(config: Config) -> Result<ModelIo> {
        config.validate()?;
        let config_json = serde_json::to_value(&config).map_err(|e| Error::ConfigValue {
            key: "model".into(),
            value: e.to_string(),
            allowed: "values the state file can record as JSON".into(),
        })?;
        let paths = ModelPaths::new(&config.model.dir, &config.model.name);
        let settings = Settings { snapshot_keep: config.snapshot.keep, hard_links: config.save.hard_links };
        let mut shared = Shared::new(paths.clone(), settings);
        let mut remote = Seam::connect(&config)?;
        let lock = if config.model.predict {
            None
        } else {
            std::fs::create_dir_all(&paths.dir).at("create model folder", &paths.dir)?;
            // Under the lock no other writer of this folder exists, so every
            // temporary file in it is stale.
            let lock = crate::folder::lock::acquire(&paths.dir)?;
            remove_stale_temps(&paths)?;
            Some(lock)
        };
        // A fresh machine: the newest remote checkpoint becomes the local model.
        let fresh = || Ok(!paths.archive().exists() && history_without_archive(&paths)?.is_none());
        remote.restore_if_fresh(&config, &paths, lock.is_some(), fresh)?;
        shared.rider = remote.rider(&config, &paths);
        let shared = Arc::new(shared);
        let actors = match lock {
            Some(_) => Some(Actors::start(shared.clone())?),
            None => None,
        };
        let unloaded_history = match history_without_archive(&paths)? {
            Some(found) if !config.load.fallback => {
                return Err(Error::ArchiveMissing {
                    dir: paths.dir.clone(),
                    name: paths.name.clone(),
                    file: file_name(&paths.archive()),
                    found,
                })
            }
            other => other,
        };
        let mut state = match reconcile_state(&paths, config.model.predict) {
            // The fallback load replaces the state with the one it loads.
            Err(Error::DamagedState { .. }) if unloaded_history.is_some() => State::new(&paths.name),
            other => other?,
        };
        // A local save the remote tier does not have yet (the last run
        // stopped before uploading it) goes up first. One just restored from
        // the remote is there already: it is not offered (nor shown pending).
        if actors.is_some() && paths.archive().is_file() {
            remote.catch_up(state.total_iterations, || crate::actors::pin(&shared));
        }
        if !config.model.predict {
            state.start_session(None);
        }
        // What every save of this run records: modelio's config and the model's own.
        state.config = serde_json::json!({ "modelio": config_json, "model": serde_json::Value::Null });
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
            loaded: None,
            unloaded_history,
            last_save: None,
            remote,
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

    /// Whether there is a model to load: the archive exists, or it is missing
    /// and `load.fallback` will load the newest backup or snapshot instead.
    pub fn model_exists(&self) -> bool {
        self.paths.archive().is_file() || self.unloaded_history.is_some()
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

    /// The batch size of this training run, recorded with its session in the
    /// state file.
    pub fn set_batch_size(&mut self, batch_size: u64) {
        if let Some(session) = self.state.sessions.last_mut() {
            session.batch_size = Some(batch_size);
        }
    }

    /// The model's own configuration, stored in the state file with modelio's.
    pub fn set_model_config(&mut self, config: serde_json::Value) {
        self.state.config["model"] = config;
    }

    /// The fence that writers of saved tensors wait on in
    /// `staging.cpu_copy = "deferred"` mode (see [`Fence`]); with the default
    /// immediate copy it never holds anyone back.
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
            failed: s.failed.load(Ordering::Relaxed),
            failed_other: s.failed_other.load(Ordering::Relaxed),
            buffer_growths: self.pool.growths(),
        }
    }

    /// Load the model's tensors into `vs` (names as the VarStore names them).
    /// When `load.fallback` loaded a backup or snapshot, the handle continues
    /// from it: iterations, lowest loss and sessions follow what was loaded.
    /// Blocks on file IO (see [`ModelIo::resume_async`] for async loops).
    ///
    /// # Errors
    /// [`Error::ModelNotFound`] naming the folder searched; [`Error::ArchiveLost`]
    /// when the archive is missing beside the model's history and no
    /// backup or snapshot loads; [`Error::Damaged`] naming the file and tensor
    /// (or an embedded state that disagrees with the manifest), with the
    /// restore hint; [`Error::Mismatch`] naming a missing, extra or
    /// differently shaped tensor.
    pub fn load(&mut self, vs: &VarStore) -> Result<Loaded> {
        let (read, reason) = read_for_load(&self.paths, self.config.load.fallback, false)?;
        Ok(self.apply(read, reason, vs, None)?.0)
    }

    /// Copy what was read into `vs` (and the optimizer), and continue from it.
    fn apply(
        &mut self,
        read: Read,
        reason: Option<String>,
        vs: &VarStore,
        optimizer: Option<&mut dyn Optimizer>,
    ) -> Result<(Loaded, OptimizerResume)> {
        let Read { reader, model, optimizer: stored } = read;
        crate::tensors::apply_to_varstore(reader.path(), &model, vs)?;
        drop(model);
        let resumed = match (optimizer, stored) {
            (None, _) => OptimizerResume::NotApplicable,
            (Some(opt), Some(state)) => {
                opt.load_state(&state)?;
                OptimizerResume::Restored
            }
            (Some(_), None) => {
                let why = missing_optimizer_reason(self.config.save.optimizer);
                tracing::warn!(target: "modelio", "{} holds no optimizer state ({why}); the optimizer starts afresh", reader.path().display());
                OptimizerResume::Missing(why)
            }
        };
        if reason.is_some() {
            self.follow(&reader);
        }
        self.unloaded_history = None;
        let loaded = Loaded {
            path: reader.path().to_path_buf(),
            iterations: reader.manifest.iterations,
            fallback: reason.is_some(),
            reason,
            has_optimizer: reader.optimizer.is_some(),
        };
        self.loaded = Some(reader);
        Ok((loaded, resumed))
    }

    /// Continue from the state of an archive loaded instead of the live one:
    /// its iteration count, lowest loss and sessions, plus this run's session.
    fn follow(&mut self, reader: &ArchiveReader) {
        let stored: Option<State> = reader.state.as_deref().and_then(|b| serde_json::from_slice(b).ok());
        let current = self.state.sessions.last().cloned();
        match stored {
            Some(mut st) => {
                st.sessions.retain(|s| s.iterations > 0);
                st.sessions.extend(current);
                // This run's config, not the one the loaded save was made with.
                st.config = std::mem::take(&mut self.state.config);
                self.state = st;
            }
            None => self.state.total_iterations = reader.manifest.iterations,
        }
        self.history.clear();
    }

    /// The optimizer state stored in the archive the last [`ModelIo::load`]
    /// read (the live one when nothing was loaded yet), or `None` when it
    /// has none. Blocks on file IO.
    ///
    /// # Errors
    /// As [`ModelIo::load`].
    pub fn load_optimizer(&self) -> Result<Option<OptimizerState>> {
        match &self.loaded {
            Some(reader) => read_optimizer(reader),
            None => Ok(read_for_load(&self.paths, self.config.load.fallback, true)?.0.optimizer),
        }
    }

    /// Resume in one call: load the model (with `load.fallback` when the live
    /// archive is damaged or missing) and, when `optimizer` is given, its
    /// state, reading and verifying the archive once. Returns what happened;
    /// a new model (nothing to load) is not an error. Blocks on file IO (see
    /// [`ModelIo::resume_async`]).
    ///
    /// # Errors
    /// As [`ModelIo::load`], and [`Error::OptimizerKind`] or [`Error::OptimizerTensor`] when the stored state
    /// does not fit `optimizer`.
    pub fn resume(&mut self, vs: &VarStore, optimizer: Option<&mut dyn Optimizer>) -> Result<Resumed> {
        if !self.model_exists() {
            return Ok(Resumed { loaded: None, optimizer: OptimizerResume::NotApplicable });
        }
        let (read, reason) = read_for_load(&self.paths, self.config.load.fallback, optimizer.is_some())?;
        let (loaded, optimizer) = self.apply(read, reason, vs, optimizer)?;
        Ok(Resumed { loaded: Some(loaded), optimizer })
    }

    /// [`ModelIo::resume`] for async loops: the archive is opened, read and
    /// verified on a blocking thread; only the copy into `vs` (a memcpy of
    /// the model) runs on the caller.
    ///
    /// # Errors
    /// As [`ModelIo::resume`].
    pub async fn resume_async(&mut self, vs: &VarStore, optimizer: Option<&mut dyn Optimizer>) -> Result<Resumed> {
        if !self.model_exists() {
            return Ok(Resumed { loaded: None, optimizer: OptimizerResume::NotApplicable });
        }
        let (paths, fallback, with_optimizer) = (self.paths.clone(), self.config.load.fallback, optimizer.is_some());
        let (read, reason) = tokio::task::spawn_blocking(move || read_for_load(&paths, fallback, with_optimizer))
            .await
            .map_err(|e| Error::Internal { what: Work::Load, message: e.to_string() })??;
        let (loaded, optimizer) = self.apply(read, reason, vs, optimizer)?;
        Ok(Resumed { loaded: Some(loaded), optimizer })
    }

    /// [`ModelIo::open`] for async code: the folder is opened on a blocking thread.
    ///
    /// # Errors
    /// As [`ModelIo::open`].
    pub async fn open_async(config: Config) -> Result<ModelIo> {
        tokio::task::spawn_blocking(move || ModelIo::open(config))
            .await
            .map_err(|e| Error::Internal { what: Work::Open, message: e.to_string() })?
    }

    /// Save the model (and the optimizer, per `save.optimizer`) and the state
    /// file in the background; then the backup rule. Returns at once with a
    /// [`Ticket`]: the trainer-side cost is taking a staging buffer and, with
    /// the default `staging.cpu_copy = "immediate"`, one memcpy of the CPU
    /// tensors split over the cores (GPU tensors: queueing non-blocking copies).
    /// The archive holds the values at the call whatever the caller does next
    /// (with `"deferred"`, only if every writer waits on [`ModelIo::fence`]).
    ///
    /// When every staging buffer is busy the save waits, blocking the calling
    /// thread, or with `staging.on_busy = "skip"` is skipped (its ticket says
    /// so); an exit save always waits.
    ///
    /// # Errors
    /// - An earlier failure that was not reported yet (a save whose ticket
    ///   was dropped, a backup, a snapshot): [`Error::is_background`] is true.
    ///   This save was still queued: its own outcome goes to the next call.
    ///   When [`Error::is_retryable`] is true, training can go on.
    /// - [`Error::ArchiveMissing`] when the folder's history was not loaded
    ///   yet, a dtype the format cannot hold, or [`Error::PredictMode`].
    pub fn save(&mut self, vs: &VarStore, optimizer: Option<&dyn Optimizer>) -> Result<Ticket> {
        self.save_as(vs, optimizer, false)
    }

    /// The exit save: as [`ModelIo::save`], but it stores the optimizer
    /// under `save.optimizer = "exit"` too, and it is never skipped (it waits
    /// for a staging buffer, blocking the calling thread). Async loops end
    /// with [`ModelIo::finish`], which makes it and drains.
    ///
    /// # Errors
    /// As [`ModelIo::save`].
    pub fn save_exit(&mut self, vs: &VarStore, optimizer: Option<&dyn Optimizer>) -> Result<Ticket> {
        self.save_as(vs, optimizer, true)
    }

    fn save_as(&mut self, vs: &VarStore, optimizer: Option<&dyn Optimizer>, is_exit: bool) -> Result<Ticket> {
        let started = Instant::now();
        let earlier = self.shared.take_failure();
        let result = self.queue_save(vs, optimizer, is_exit, started);
        self.after_earlier(earlier, result)
    }

    /// The outcome of a call that found an earlier failure to report: the
    /// call did its own work first; that earlier failure is returned (a
    /// ticket is then dropped unread, so its outcome goes to the next call).
    /// When the call itself failed, its own error wins and the earlier
    /// failure waits for the next call.
    fn after_earlier<T>(&self, earlier: Option<Error>, result: Result<T>) -> Result<T> {
        match (earlier, result) {
            (None, result) => result,
            (Some(e), Ok(_own)) => Err(e),
            (Some(e), Err(own)) => {
                self.shared.put_back(e);
                Err(own)
            }
        }
    }

    /// [`ModelIo::save`] for async loops: when every staging buffer is busy
    /// (and the save is not skipped), waits for one without blocking the
    /// runtime. The copy of CPU tensors itself (about one memcpy of the
    /// state) still runs on the calling thread, as in `save`.
    ///
    /// # Errors
    /// As [`ModelIo::save`].
    pub async fn save_async(&mut self, vs: &VarStore, optimizer: Option<&dyn Optimizer>) -> Result<Ticket> {
        self.save_async_as(vs, optimizer, false).await
    }

    /// [`ModelIo::save_exit`] for async loops: waits for a staging buffer
    /// without blocking the runtime.
    ///
    /// # Errors
    /// As [`ModelIo::save`].
    pub async fn save_exit_async(&mut self, vs: &VarStore, optimizer: Option<&dyn Optimizer>) -> Result<Ticket> {
        self.save_async_as(vs, optimizer, true).await
    }

    async fn save_async_as(&mut self, vs: &VarStore, optimizer: Option<&dyn Optimizer>, is_exit: bool) -> Result<Ticket> {
        let started = Instant::now();
        // As `take_lease`, awaiting instead of blocking; a save to skip is
        // left to it (`None`), which counts and logs the skip.
        let lease = match self.pool.try_lease() {
            Some(l) => Some((l, false)),
            None if self.skips_when_busy(is_exit) => None,
            None if self.actors.is_some() => {
                self.shared.stats.waited.fetch_add(1, Ordering::Relaxed);
                Some((self.pool.lease_async().await, true))
            }
            None => None,
        };
        let earlier = self.shared.take_failure();
        let result = self.queue_save_with(vs, optimizer, is_exit, started, lease);
        self.after_earlier(earlier, result)
    }

    fn queue_save(&mut self, vs: &VarStore, optimizer: Option<&dyn Optimizer>, is_exit: bool, started: Instant) -> Result<Ticket> {
        self.queue_save_with(vs, optimizer, is_exit, started, None)
    }

    /// Queue a save, with a lease already taken (`save_async`) or taken here.
    fn queue_save_with(
        &mut self,
        vs: &VarStore,
        optimizer: Option<&dyn Optimizer>,
        is_exit: bool,
        started: Instant,
        leased: Option<(Lease, bool)>,
    ) -> Result<Ticket> {
        let Some(actors) = &self.actors else {
            return Err(Error::PredictMode { dir: self.paths.dir.clone(), name: self.paths.name.clone() });
        };
        if let Some(found) = &self.unloaded_history {
            return Err(Error::ArchiveMissing {
                dir: self.paths.dir.clone(),
                name: self.paths.name.clone(),
                file: file_name(&self.paths.archive()),
                found: format!("{found} (load it first: `ModelIo::resume` or `ModelIo::load`)"),
            });
        }
        self.shared.stats.requested.fetch_add(1, Ordering::Relaxed);
        let (model, optimizer, tensors) =
            describe(&self.paths.archive(), vs, optimizer.filter(|_| self.config.save.optimizer.stores(is_exit)))?;
        let Some((mut lease, waited)) = leased.or_else(|| self.take_lease(is_exit)) else {
            self.last_save = Some(LastSave::Skipped(self.state.total_iterations));
            return Ok(Ticket::ready(self.skipped(started.elapsed())));
        };
        // Each tensor's bytes staged where the archive will hold them within
        // a block, so that the archive is written from the staging buffers.
        let opt_places = optimizer.as_ref().map(|(_, _, descs)| crate::archive::block_offsets(descs)).unwrap_or_default();
        lease.place(crate::archive::block_offsets(&model).into_iter().chain(opt_places).collect());
        let copies = crate::staging::start(tensors, lease, self.config.staging.cpu_copy, &self.fence)?;
        let decision = backup_rule(&self.history, self.state.lowest_average_loss);
        // The state this save writes; the handle takes it on once the save is queued.
        let mut state = self.state.clone();
        state.lowest_average_loss = decision.lowest;
        let (reply, rx) = oneshot::channel();
        let job = SaveJob {
            iterations: state.total_iterations,
            state_json: state.to_json(),
            average_loss: decision.average,
            backup: decision.backup,
            model,
            optimizer,
            stall: started.elapsed(),
            waited,
            exit: is_exit,
            reply,
        };
        actors.stage(Stage { job, copies })?;
        self.state = state;
        self.history.clear();
        self.loaded = None;
        self.last_save = Some(LastSave::Queued(self.state.total_iterations));
        Ok(Ticket::pending(rx, self.shared.clone()))
    }

    /// Whether a save finding every staging buffer busy is skipped
    /// (`staging.on_busy = "skip"`; an exit save never is).
    fn skips_when_busy(&self, is_exit: bool) -> bool {
        self.config.staging.on_busy == OnBusy::Skip && !is_exit
    }

    /// A free staging buffer set, and whether the save had to wait for it;
    /// `None` when the save is skipped (`staging.on_busy = "skip"`).
    fn take_lease(&self, is_exit: bool) -> Option<(Lease, bool)> {
        let stats = &self.shared.stats;
        match self.pool.try_lease() {
            Some(l) => Some((l, false)),
            None if self.skips_when_busy(is_exit) => {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "modelio", iterations = self.state.total_iterations, skipped = true, "save skipped: every staging buffer is busy (staging.on_busy = \"skip\")");
                None
            }
            None => {
                stats.waited.fetch_add(1, Ordering::Relaxed);
                Some((self.pool.lease(), true))
            }
        }
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
    /// the iterations of the last save requested before this call: the
    /// snapshot is built once that save is committed. When that save fails
    /// or was skipped, no snapshot is made and the failure
    /// ([`Error::SnapshotWithoutSave`]) is reported; a snapshot is never
    /// named after a save it does not hold. Before any save in this run, the
    /// archive on disk is snapshotted under its own iteration count.
    ///
    /// # Errors
    /// An earlier background failure (the snapshot is still requested),
    /// [`Error::SnapshotWithoutSave`] after a skipped save,
    /// [`Error::Overloaded`] when too many snapshots are still waiting to be
    /// built (this one is not requested), or [`Error::PredictMode`].
    pub fn snapshot(&mut self) -> Result<()> {
        let earlier = self.shared.take_failure();
        let result = self.queue_snapshot();
        self.after_earlier(earlier, result)
    }

    fn queue_snapshot(&self) -> Result<()> {
        let Some(actors) = &self.actors else {
            return Err(Error::PredictMode { dir: self.paths.dir.clone(), name: self.paths.name.clone() });
        };
        let of = match self.last_save {
            Some(LastSave::Skipped(n)) => {
                return Err(Error::SnapshotWithoutSave { iterations: n, why: "skipped (every staging buffer was busy)" })
            }
            Some(LastSave::Queued(n)) => Some(n),
            None => None,
        };
        actors.snapshot(of)
    }

    /// Wait until every save, backup and snapshot requested so far is done.
    /// Does not block the runtime.
    ///
    /// # Errors
    /// The first background failure not yet reported.
    pub async fn flush(&self) -> Result<()> {
        if let Some(a) = &self.actors {
            a.flush().await?;
        }
        self.shared.take_failure().map_or(Ok(()), Err)
    }

    /// [`ModelIo::flush`] for synchronous code: blocks the calling thread.
    ///
    /// # Errors
    /// As [`ModelIo::flush`].
    pub fn flush_blocking(&self) -> Result<()> {
        if let Some(a) = &self.actors {
            a.flush_blocking()?;
        }
        self.shared.take_failure().map_or(Ok(()), Err)
    }

    /// Drain every pending write, backup and snapshot, then stop the actors.
    ///
    /// # Errors
    /// The first background failure not yet reported.
    pub async fn shutdown(mut self) -> Result<()> {
        let result = self.flush().await;
        let behind = self.remote.drain().await;
        if let Some(mut a) = self.actors.take() {
            a.stop();
        }
        match (result, behind) {
            (Ok(()), Some(e)) => Err(e),
            (result, _) => result,
        }
    }

    /// [`ModelIo::shutdown`] for synchronous code: blocks the calling thread.
    ///
    /// # Errors
    /// As [`ModelIo::shutdown`].
    pub fn shutdown_blocking(mut self) -> Result<()> {
        let result = self.flush_blocking();
        let behind = self.remote.drain_blocking();
        if let Some(mut a) = self.actors.take() {
            a.stop();
        }
        match (result, behind) {
            (Ok(()), Some(e)) => Err(e),
            (result, _) => result,
        }
    }

    /// End training: the exit save (optimizer included unless the policy is
    /// `never`), then drain every write, backup and snapshot and stop the
    /// actors. What a signal-driven stop ([`crate::signals::cancel_on_signals`])
    /// or the end of the loop calls. Does not block the runtime.
    ///
    /// Failures of earlier saves that were not reported yet are superseded by
    /// a committed exit save (they are logged); failed backups and snapshots
    /// are returned in [`Finished::unreported`].
    ///
    /// # Errors
    /// The exit save's failure.
    pub async fn finish(mut self, vs: &VarStore, optimizer: Option<&dyn Optimizer>) -> Result<Finished> {
        let drained = match &self.actors {
            Some(a) => a.flush().await,
            None => Ok(()),
        };
        // Earlier saves that failed are superseded by the exit save; failed
        // backups and snapshots are not, and are returned in `Finished`.
        let mut unreported = Vec::new();
        while let Some(earlier) = self.shared.take_failure() {
            match &earlier {
                Error::Background { what: Work::Save, .. } => {
                    tracing::warn!(target: "modelio", "{} (superseded by the exit save)", earlier.report())
                }
                _ => unreported.push(earlier),
            }
        }
        let saved = match drained {
            Ok(()) => match self.save_exit_async(vs, optimizer).await {
                Ok(ticket) => ticket.await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let drained = self.flush().await;
        if let Some(e) = self.remote.drain().await {
            unreported.push(e);
        }
        let stats = self.stats();
        if let Some(mut a) = self.actors.take() {
            a.stop();
        }
        let exit_save = saved?;
        if let Err(e) = drained {
            unreported.push(e);
        }
        while let Some(e) = self.shared.take_failure() {
            unreported.push(e);
        }
        Ok(Finished { exit_save, stats, unreported })
    }

    /// Test hook: make every background write sleep first.
    #[doc(hidden)]
    pub fn set_write_delay(&self, delay: Duration) {
        self.shared.set_write_delay(delay);
    }

    /// Test hook: make the next background write panic (as a bug would).
    #[doc(hidden)]
    pub fn inject_panic_in_next_write(&self) {
        self.shared.inject_panic_in_next_write();
    }
}

/// Descriptions of a save's tensors (model first, then the optimizer's
/// state), and the tensors in the same order.
#[allow(clippy::type_complexity)]
fn describe(
    archive: &Path,
    vs: &VarStore,
    optimizer: Option<&dyn Optimizer>,
) -> Result<(Vec<Desc>, Option<(String, serde_json::Value, Vec<Desc>)>, Vec<tch::Tensor>)> {
    let mut vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut model = Vec::with_capacity(vars.len());
    let mut tensors = Vec::with_capacity(vars.len());
    for (name, t) in vars {
        model.push(Desc { dtype: dtype_of(&name, t.kind())?, shape: checked_shape(archive, &name, &t)?, name });
        tensors.push(t);
    }
    let optimizer = match optimizer {
        Some(o) => {
            let mut descs = Vec::new();
            for (name, t) in o.state_tensors() {
                descs.push(Desc { dtype: dtype_of(&name, t.kind())?, shape: checked_shape(archive, &name, &t)?, name });
                tensors.push(t);
            }
            Some((o.kind().to_string(), o.state_json(), descs))
        }
        None => None,
    };
    Ok((model, optimizer, tensors))
}
