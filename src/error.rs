//! The one error type of the crate.
//!
//! Every variant a user can hit says what happened, to which file, and what to
//! do next. An error that wraps another returns it from `source()` and does not
//! repeat it in its own message: print the whole chain with [`Error::report`]
//! (or any reporter that walks `source()`, such as anyhow's). Background
//! failures are shared (`Arc`) because one failure may reach both a ticket and
//! a later call.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in modelio.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem operation failed.
    #[error("could not {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The disk is full: nothing was committed and the previous files are intact.
    #[error(
        "no space left to write {}{}; the previous files are intact: free some space and save again",
        path.display(), space(*needed, *free)
    )]
    NoSpace {
        /// The file being written.
        path: PathBuf,
        /// Its size, when known.
        needed: Option<u64>,
        /// Free bytes on its filesystem, when known.
        free: Option<u64>,
    },

    /// The TOML file could not be parsed (syntax or unknown key).
    #[error("config {}: {message}", path.display())]
    ConfigParse { path: PathBuf, message: String },

    /// A config value is out of range.
    #[error("config key `{key}` has value {value}, allowed: {allowed}")]
    ConfigValue { key: String, value: String, allowed: String },

    /// Predict mode (or an explicit load) found no model archive.
    #[error(
        "no model `{name}` found: searched {} for {file}; train a model first or point `model.dir` at the folder that holds it",
        dir.display()
    )]
    ModelNotFound { dir: PathBuf, name: String, file: String },

    /// The archive is missing but the folder holds the model's history (state
    /// file, backups or snapshots): starting afresh would overwrite it.
    #[error(
        "model `{name}` in {} has no archive ({file} is missing) but the folder holds {found}; \
         refusing to start from scratch over that history: run `modelio restore {} --name {name}` \
         to put the backup back, set `load.fallback = true` to load the newest backup or snapshot, \
         or move those files aside to start a new model",
        dir.display(), dir.display()
    )]
    ArchiveMissing { dir: PathBuf, name: String, file: String, found: String },

    /// An archive is damaged: a checksum failed or its structure is broken.
    #[error(
        "archive {} is damaged ({what}: {detail}); restore the backup with `modelio restore {} --name {name}` \
         or set `load.fallback = true`",
        path.display(), folder_of(path).display()
    )]
    Damaged { path: PathBuf, name: String, what: String, detail: String },

    /// A state file is not valid JSON of the expected shape.
    #[error(
        "state file {} is damaged ({detail}); `modelio restore {} --name {name}` puts its backup back \
         if there is one, otherwise move it aside (the archive holds a copy of the state as of its save)",
        path.display(), folder_of(path).display()
    )]
    DamagedState { path: PathBuf, name: String, detail: String },

    /// The archive does not match the model it is loaded into.
    #[error("archive {} does not fit the model: tensor `{tensor}`: expected {expected}, found {found}", path.display())]
    Mismatch { path: PathBuf, tensor: String, expected: String, found: String },

    /// A tensor of a dtype the archive format does not store.
    #[error(
        "tensor `{tensor}` has dtype {dtype}, which modelio cannot store (supported: f64, f32, f16, bf16, i64, i32, i16, i8, u8, bool)"
    )]
    UnsupportedDtype { tensor: String, dtype: String },

    /// Two tensors of one save have the same name.
    #[error("tensor name `{tensor}` appears twice in one save; names must be unique")]
    DuplicateTensor { tensor: String },

    /// A staged buffer does not hold as many bytes as its tensor's dtype and
    /// shape need: an internal error, refused rather than written.
    #[error("tensor `{tensor}`: {found} bytes staged, {expected} expected for its dtype and shape; nothing was written")]
    StagedLength { tensor: String, expected: usize, found: usize },

    /// The archive holds another kind of optimizer than the one it is loaded into.
    #[error("the archive holds a `{stored}` optimizer's state, and this optimizer is `{expected}`; build the same optimizer to resume it")]
    OptimizerKind { stored: String, expected: String },

    /// A state tensor is missing or does not fit its parameter.
    #[error("optimizer state tensor `{tensor}`: expected {expected}, found {found}; the model changed since the save")]
    OptimizerTensor { tensor: String, expected: String, found: String },

    /// The optimizer's stored JSON lacks a field it needs.
    #[error("optimizer state: `{field}` is missing from optimizer.json")]
    OptimizerJson { field: &'static str },

    /// A libtorch call failed.
    #[cfg(feature = "torch")]
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// A save, backup or snapshot failed in the background.
    #[error("background {what} failed")]
    Background {
        what: Work,
        #[source]
        source: Arc<Error>,
    },

    /// A snapshot was requested after a save that was not committed, so there
    /// is no save of that iteration to snapshot.
    #[error(
        "snapshot of iteration {iterations} not taken: the save of iteration {iterations} was {why}; \
         the next committed save can be snapshotted"
    )]
    SnapshotWithoutSave { iterations: u64, why: &'static str },

    /// Requests arrive faster than the actors take them: more than
    /// `capacity` of them are already waiting. Nothing was queued; earlier
    /// requests are unaffected.
    #[error(
        "{what}s requested faster than they can be handed over: {capacity} are already waiting; \
         nothing was queued: wait for earlier ones (`flush`, or the tickets) or request them less often"
    )]
    Overloaded { what: Work, capacity: usize },

    /// A background actor or task panicked while handling a request: a bug
    /// in modelio. That request was not done; later ones go on.
    #[error("internal error: the {what} panicked ({message}); it was not done, later ones go on; please report this as a bug")]
    Internal { what: Work, message: String },

    /// The background copy of a save's write-protected CPU tensors
    /// (`staging.cpu_copy = "protect"`) failed in the kernel's userfaultfd:
    /// that save was not written; every protection was lifted, training
    /// and later saves go on.
    #[error(
        "the write-protected copy of a save's CPU tensors failed, so that save was not written; \
         later saves go on: set `staging.cpu_copy = \"immediate\"` if this repeats"
    )]
    Protect {
        #[source]
        source: std::io::Error,
    },

    /// The actors are gone (shut down or crashed): nothing more can be saved.
    #[error("modelio's actors have stopped; no further saves are possible (was `shutdown` already called?)")]
    Stopped,

    /// A save was asked of a handle opened in predict mode.
    #[error("model `{name}` in {} was opened in predict mode, which never saves; set `model.predict = false` to train", dir.display())]
    PredictMode { dir: PathBuf, name: String },

    /// Restore found no backup to put back.
    #[error("no backup of model `{name}` in {}: nothing was changed", dir.display())]
    NoBackup { dir: PathBuf, name: String },

    /// Another process trains into the same model folder.
    #[error("model folder {} is in use by process {pid}; stop it or use another folder", dir.display())]
    Locked { dir: PathBuf, pid: String },

    /// Signal handlers for the exit save could not be installed.
    #[error("cannot watch for SIGINT/SIGTERM: {detail}")]
    Signals { detail: String },

    /// A file modelio reads or writes is not a regular file (a FIFO, a
    /// device, a folder or a symlink where a file belongs).
    #[error("{} is {kind}, not a regular file; remove or rename it", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },

    /// An object-store request failed (after the client's own retries).
    /// The store's own error is the source.
    #[cfg(feature = "remote")]
    #[error("could not {op} {target} on the remote tier")]
    Remote {
        op: &'static str,
        target: String,
        #[source]
        source: StoreError,
    },

    /// An object that must be created only once is already there, and it
    /// is not the one this request wrote.
    #[error("could not {op} {target} on the remote tier: {detail}")]
    RemoteExists { op: &'static str, target: String, detail: &'static str },

    /// A conditional update (of `LATEST`) kept losing to other writers.
    #[error("could not update {target} on the remote tier: still contended after {tries} tries")]
    RemoteContended { target: String, tries: usize },

    /// The store cannot do what a commit needs (create an object only if it
    /// is absent): refused rather than done unsafely.
    #[error(
        "could not {op} {target} on the remote tier: the store cannot create an object only if it is absent \
         (for S3, leave conditional puts on)"
    )]
    RemoteUnsupported { op: &'static str, target: String },

    /// An upload was stopped (the handle shut down) before it was done.
    #[error("could not upload {target} on the remote tier: abandoned: the upload was stopped")]
    UploadAbandoned { target: String },

    /// A record could not be written as JSON: a bug in modelio; nothing was written.
    #[error("could not write {target} as JSON ({detail}); nothing was written; please report this as a bug")]
    Encode { target: String, detail: String },

    /// An argument of a call is out of range; nothing was done.
    #[error("{arg}: {value}, allowed: {allowed}; nothing was done")]
    Argument { arg: String, value: String, allowed: String },

    /// The remote tier's credentials are not in the environment.
    #[error(
        "remote.url is {url}, but {missing} is not set; set it (and its partner variables) in the environment, \
         set remote.instance_credentials = true to use the machine's own, or leave remote.url empty"
    )]
    RemoteCredentials { url: String, missing: String },

    /// `finish`/`shutdown` stopped waiting for an upload.
    #[error(
        "the upload of iteration {iterations} to {location} did not finish within remote.drain_secs ({waited_secs} s; \
         last failure: {last_error}); the save is on local disk and the next run uploads it"
    )]
    RemoteBehind { location: String, iterations: u64, waited_secs: u64, last_error: String },

    /// A sharded step cannot be committed: a rank's shard is not durable yet.
    #[error("sharded step {iterations}: rank {rank}'s shard is not there yet ({key})")]
    ShardMissing { iterations: u64, rank: usize, key: String },

    /// A sharded step's pieces do not fit together (dtypes, shapes, sizes).
    #[error("sharded step {iterations} cannot be committed or read: {detail}")]
    ShardInconsistent { iterations: u64, detail: String },

    /// A sharded step was already committed by another run.
    #[error(
        "sharded step {iterations} was already committed by another run ({key}); this run's shards of it are not \
         committed: resume from the newest step, or save under iterations past it"
    )]
    StepCommitted { iterations: u64, key: String },

    /// A rank's exit save was stored, but its step's manifest did not
    /// appear within the commit deadline.
    #[error(
        "sharded step {iterations} was not committed: its manifest {key} did not appear within {secs} s \
         (shard.commit_deadline_secs) of this rank's exit save; the coordinator's (rank 0's) log says why, \
         and the newest committed step is what the next launch resumes"
    )]
    StepNotCommitted { iterations: u64, key: String, secs: u64 },

    /// A remote object differs from its manifest.
    #[error("remote checkpoint {checkpoint} at {location} is damaged ({object}: {detail}); pull or resume from another one (`modelio remote list`)")]
    RemoteDamaged { location: String, checkpoint: String, object: String, detail: String },

    /// No remote checkpoint matches.
    #[error("no remote checkpoint `{which}` at {location}; `modelio remote list` shows what there is")]
    RemoteNotFound { location: String, which: String },

    /// The model folder holds no model and the remote tier could not be read
    /// to restore one.
    #[error(
        "model folder {} holds no model and the remote tier at {location} could not be read to restore one; \
         fix the connection and open again, or set remote.restore = false to start from scratch",
        dir.display()
    )]
    RemoteRestore {
        dir: PathBuf,
        location: String,
        #[source]
        source: Box<Error>,
    },

    /// A tensor has more dimensions than an archive may hold (see
    /// [`crate::archive::format::MAX_RANK`]); nothing was written.
    #[error(
        "cannot save tensor `{tensor}` to {}: it has {rank} dimensions, more than the {max} an archive may hold \
         (readers such as NumPy accept no more); nothing was written: reshape it to fewer dimensions",
        path.display()
    )]
    TooManyDims { path: PathBuf, tensor: String, rank: usize, max: usize },

    /// The archive is missing, the folder holds the model's history (a state
    /// file, damaged backups or snapshots), and `load.fallback` found no copy
    /// that loads.
    #[error(
        "model `{name}` in {}: the archive {file} is missing, though the folder holds {found}, and load.fallback \
         found no backup or snapshot that loads; put {file} back from a backup or snapshot (`modelio restore {} --name {name}` \
         restores the .bk; `modelio snapshots {} --name {name}` lists the snapshots to copy it from), or move those files \
         aside to start a new model",
        dir.display(), dir.display(), dir.display()
    )]
    ArchiveLost { dir: PathBuf, name: String, file: String, found: String },

    /// The object store refused the remote tier's credentials (HTTP 401 or 403).
    #[error(
        "the remote tier at {location} refused the credentials (HTTP {status}{code_note}) on {endpoint}: check {variables} \
         and that they may list, read and write there; or leave remote.url empty to train without the remote tier",
        code_note = code_suffix(code)
    )]
    RemoteDenied {
        location: String,
        endpoint: String,
        status: u16,
        /// The store's error code (`InvalidAccessKeyId`, `AccessDenied`), when it sent one.
        code: String,
        /// The environment variables that hold the credentials.
        variables: &'static str,
        /// The store's whole message.
        detail: Box<str>,
    },

    /// The bucket (container) of the remote tier does not exist (HTTP 404).
    #[error(
        "the bucket `{bucket}` of the remote tier at {location} does not exist on {endpoint} (HTTP 404{code_note}): \
         create it, or fix remote.url and remote.endpoint; or leave remote.url empty to train without the remote tier",
        code_note = code_suffix(code)
    )]
    RemoteNoBucket {
        location: String,
        endpoint: String,
        bucket: String,
        code: String,
        /// The store's whole message.
        detail: Box<str>,
    },

    /// A sharded job of several ranks has no run id.
    #[error(
        "a sharded job of {world_size} ranks needs a run id, the same on every rank and new at each launch, so that a \
         step never mixes shards of two runs: set `shard.run_id`, or MODELIO_RUN_ID in every rank's environment \
         (e.g. `export MODELIO_RUN_ID=$(date +%s)` once before starting the ranks); torchrun and Slurm jobs get one \
         from TORCHELASTIC_RUN_ID or SLURM_JOB_ID"
    )]
    RunIdMissing { world_size: usize },

    /// A sharded job's coordinator opened with the run id of an earlier launch.
    #[error(
        "run id `{run_id}` was used by an earlier launch of this sharded job ({key}): its leftover shards could be \
         committed with this run's; give every launch a new id (`shard.run_id` or MODELIO_RUN_ID, the same on every rank)"
    )]
    RunIdReused { run_id: String, key: String },

    /// The folder's lock file is a hard link shared with other folders (a
    /// `cp -al` copy), and a process holds it.
    #[error(
        "model folder {}'s lock file is a hard link shared by {links} folders (a `cp -al` copy?), and process {pid} \
         holds it, training in one of them; stop that process, or delete {}/.modelio.lock (this folder's link only) \
         and open again",
        dir.display(), dir.display()
    )]
    LockShared { dir: PathBuf, pid: String, links: u64 },

    /// A snapshot requested of a sharded step was not made.
    #[error("no snapshot of sharded step {iterations}: {reason}; the snapshots already made are kept, and the next request may succeed")]
    ShardSnapshot { iterations: u64, reason: String },

    /// Something other than a snapshot modelio made is where a snapshot
    /// goes: it is left as it is and the snapshot is not taken.
    #[error(
        "{} is {kind}, not a snapshot modelio made; modelio never replaces it: move or rename it, \
         then take the snapshot again",
        path.display()
    )]
    NotASnapshot { path: PathBuf, kind: &'static str },
}

/// The work an error is about: the background work that failed
/// ([`Error::Background`]), the requests refused ([`Error::Overloaded`]),
/// the worker that panicked ([`Error::Internal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Work {
    Save,
    Backup,
    Snapshot,
    Load,
    Open,
    Upload,
    /// A rank's shard and its done-record.
    ShardedSave,
    /// The coordinator's commit of a sharded step.
    ShardedCommit,
}

impl fmt::Display for Work {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Work::Save => "save",
            Work::Backup => "backup",
            Work::Snapshot => "snapshot",
            Work::Load => "load",
            Work::Open => "open",
            Work::Upload => "upload",
            Work::ShardedSave => "sharded save",
            Work::ShardedCommit => "sharded commit",
        })
    }
}

/// What kind of outcome an [`Error`] is, for callers that decide what to do
/// next without matching every variant (as `object_store::Error` sorts its
/// own): see [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A filesystem operation failed.
    Io,
    /// The disk is full; the previous files are intact.
    NoSpace,
    /// A config value, the environment or an argument must change first.
    Config,
    /// What was asked for is not there.
    NotFound,
    /// Something is already where this would go (a name held by something
    /// else, a step committed by another run).
    AlreadyExists,
    /// A conditional update kept losing to other writers.
    Precondition,
    /// Stored data is damaged (a checksum, the structure, a missing part).
    Damaged,
    /// The data does not fit what it is loaded into, or cannot be stored.
    Mismatch,
    /// Another process holds the model folder.
    Locked,
    /// Too many requests at once, or nothing to act on yet; a later one may succeed.
    Busy,
    /// The object store refused the credentials or has no such bucket.
    Denied,
    /// An object-store request failed, or an upload did not finish.
    Remote,
    /// The workers are gone, or the work was stopped.
    Stopped,
    /// A bug in modelio (a panic, a record that cannot be encoded).
    Internal,
    /// libtorch reported an error.
    Torch,
}

/// An object store's own error, kept whole as the source of
/// [`Error::Remote`]: [`StoreError::get`] gives the `object_store::Error`
/// to match on (`NotFound`, `AlreadyExists`, `Precondition`, ...). Its
/// message already names its causes, so the chain [`Error::report`] prints
/// ends with it rather than repeating them.
#[cfg(feature = "remote")]
#[derive(Debug)]
pub struct StoreError(pub(crate) object_store::Error);

#[cfg(feature = "remote")]
impl StoreError {
    pub fn get(&self) -> &object_store::Error {
        &self.0
    }
}

#[cfg(feature = "remote")]
impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(feature = "remote")]
impl std::error::Error for StoreError {}

/// `, CODE` for a store's error code, nothing when there is none.
fn code_suffix(code: &str) -> String {
    if code.is_empty() {
        String::new()
    } else {
        format!(", {code}")
    }
}

/// The folder named in restore hints: the file's parent, "." for a bare name.
fn folder_of(path: &Path) -> PathBuf {
    crate::folder::disk::parent_of(path)
}

fn space(needed: Option<u64>, free: Option<u64>) -> String {
    match (needed, free) {
        (Some(n), Some(f)) => format!(" ({n} bytes needed, {f} bytes free)"),
        (Some(n), None) => format!(" ({n} bytes needed)"),
        (None, Some(f)) => format!(" ({f} bytes free)"),
        (None, None) => String::new(),
    }
}

impl Error {
    /// An [`Error::Io`] for `op` on `path`, or [`Error::NoSpace`] naming
    /// `path` when the disk is full (see [`Error::no_space`] for the size).
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if is_enospc(&source) {
            let free = crate::folder::disk::free_bytes(&path);
            return Error::NoSpace { path, needed: None, free };
        }
        Error::Io { op, path, source }
    }

    /// The same error, with a full disk attributed to `path` and `needed` bytes.
    pub(crate) fn no_space(self, path: &Path, needed: u64) -> Self {
        match self {
            Error::NoSpace { free, .. } => Error::NoSpace { path: path.to_path_buf(), needed: Some(needed), free },
            other => other,
        }
    }

    pub(crate) fn damaged(path: impl Into<PathBuf>, name: &str, what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Damaged { path: path.into(), name: name.to_string(), what: what.into(), detail: detail.into() }
    }

    /// What kind of outcome this is (a background failure's is its cause's).
    ///
    /// ```
    /// use modelio::error::{Error, ErrorKind};
    /// assert_eq!(Error::Stopped.kind(), ErrorKind::Stopped);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        use ErrorKind as K;
        match self {
            Error::Io { .. } | Error::NotRegular { .. } => K::Io,
            Error::NoSpace { .. } => K::NoSpace,
            Error::ConfigParse { .. }
            | Error::ConfigValue { .. }
            | Error::Argument { .. }
            | Error::PredictMode { .. }
            | Error::Signals { .. }
            | Error::RemoteCredentials { .. }
            | Error::RemoteUnsupported { .. }
            | Error::RunIdMissing { .. }
            | Error::RunIdReused { .. } => K::Config,
            Error::ModelNotFound { .. }
            | Error::NoBackup { .. }
            | Error::RemoteNotFound { .. }
            | Error::ShardMissing { .. }
            | Error::StepNotCommitted { .. } => K::NotFound,
            Error::StepCommitted { .. } | Error::RemoteExists { .. } | Error::NotASnapshot { .. } => K::AlreadyExists,
            Error::RemoteContended { .. } => K::Precondition,
            Error::ArchiveMissing { .. }
            | Error::ArchiveLost { .. }
            | Error::Damaged { .. }
            | Error::DamagedState { .. }
            | Error::RemoteDamaged { .. }
            | Error::ShardInconsistent { .. } => K::Damaged,
            Error::Mismatch { .. }
            | Error::UnsupportedDtype { .. }
            | Error::DuplicateTensor { .. }
            | Error::OptimizerKind { .. }
            | Error::OptimizerTensor { .. }
            | Error::OptimizerJson { .. }
            | Error::TooManyDims { .. } => K::Mismatch,
            Error::Locked { .. } | Error::LockShared { .. } => K::Locked,
            Error::Overloaded { .. } | Error::SnapshotWithoutSave { .. } | Error::ShardSnapshot { .. } => K::Busy,
            Error::RemoteDenied { .. } | Error::RemoteNoBucket { .. } => K::Denied,
            #[cfg(feature = "remote")]
            Error::Remote { .. } => K::Remote,
            Error::RemoteBehind { .. } | Error::RemoteRestore { .. } => K::Remote,
            Error::Stopped | Error::UploadAbandoned { .. } => K::Stopped,
            Error::Internal { .. } | Error::Encode { .. } | Error::StagedLength { .. } | Error::Protect { .. } => K::Internal,
            #[cfg(feature = "torch")]
            Error::Torch(_) => K::Torch,
            Error::Background { source, .. } => source.kind(),
        }
    }

    /// True when this error (or the background error it wraps) reports a damaged archive.
    pub fn is_damaged(&self) -> bool {
        match self {
            Error::Damaged { .. } | Error::DamagedState { .. } => true,
            Error::Background { source, .. } => source.is_damaged(),
            _ => false,
        }
    }

    /// True when this reports a failure that happened in the background (a
    /// save, backup or snapshot that was already under way), not a problem
    /// with the call that returned it: that call still did its own work.
    pub fn is_background(&self) -> bool {
        matches!(self, Error::Background { .. })
    }

    /// True when training can go on and a later save may succeed: a full
    /// disk, a filesystem error, a snapshot that had no save to hold or
    /// whose name something else holds (moved away, the next one works), too
    /// many requests at once, a panic in an actor (which goes on). False
    /// for errors that need a change first (config, damaged archive, a
    /// mismatched model, stopped actors, predict mode).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { .. }
            | Error::NoSpace { .. }
            | Error::SnapshotWithoutSave { .. }
            | Error::NotASnapshot { .. }
            | Error::Overloaded { .. }
            | Error::Internal { .. }
            | Error::Protect { .. }
            | Error::Encode { .. }
            | Error::RemoteExists { .. }
            | Error::RemoteContended { .. }
            | Error::UploadAbandoned { .. }
            | Error::RemoteDenied { .. }
            | Error::RemoteNoBucket { .. } => true,
            Error::Background { source, .. } => source.is_retryable(),
            #[cfg(feature = "remote")]
            Error::Remote { .. } => true,
            _ => false,
        }
    }

    /// The error and every cause under it, one after another
    /// (`could not fsync x: No space left on device`).
    ///
    /// ```
    /// let e = modelio::Error::Stopped;
    /// eprintln!("error: {}", e.report());
    /// ```
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }
}

/// Displays an error with its chain of causes, separated by `: `.
pub struct Report<'a>(&'a (dyn std::error::Error + 'static));

impl<'a> Report<'a> {
    /// The chain of any error.
    pub fn of(e: &'a (dyn std::error::Error + 'static)) -> Report<'a> {
        Report(e)
    }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

fn is_enospc(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Attach a path and operation to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, op: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_do_not_repeat_their_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "Permission denied");
        let e = Error::Background { what: Work::Save, source: Arc::new(Error::Io { op: "write", path: "m/a.mio".into(), source: io }) };
        let report = e.report().to_string();
        assert_eq!(report, "background save failed: could not write m/a.mio: Permission denied");
        assert_eq!(report.matches("Permission denied").count(), 1);
        assert!(e.is_background() && e.is_retryable());
        assert!(!Error::Stopped.is_retryable());
    }

    #[test]
    fn kinds_sort_outcomes_and_a_background_failure_has_its_cause_s() {
        let full = Error::NoSpace { path: "m/a.mio".into(), needed: None, free: None };
        assert_eq!(full.kind(), ErrorKind::NoSpace);
        assert_eq!(Error::Background { what: Work::Save, source: Arc::new(full) }.kind(), ErrorKind::NoSpace);
        assert_eq!(Error::damaged("m/a.mio", "a", "manifest", "checksum").kind(), ErrorKind::Damaged);
        assert_eq!(Error::StepCommitted { iterations: 5, key: "k".into() }.kind(), ErrorKind::AlreadyExists);
        assert_eq!(Error::RemoteContended { target: "LATEST".into(), tries: 16 }.kind(), ErrorKind::Precondition);
        assert_eq!(Error::ShardMissing { iterations: 5, rank: 1, key: "k".into() }.kind(), ErrorKind::NotFound);
        assert_eq!(Error::RemoteUnsupported { op: "commit", target: "k".into() }.kind(), ErrorKind::Config);
        assert_eq!(Error::Overloaded { what: Work::Snapshot, capacity: 4 }.kind(), ErrorKind::Busy);
        let e = Error::Overloaded { what: Work::Snapshot, capacity: 4 }.to_string();
        assert!(e.starts_with("snapshots requested faster"), "{e}");
        let e = Error::Internal { what: Work::ShardedCommit, message: "boom".into() }.to_string();
        assert!(e.contains("the sharded commit panicked (boom)"), "{e}");
    }

    #[test]
    fn restore_hint_names_a_folder_for_a_bare_file_name() {
        let e = Error::damaged("m.mio", "m", "tensor `w`", "checksum");
        assert!(e.to_string().contains("`modelio restore . --name m`"), "{e}");
    }

    #[test]
    fn a_snapshot_name_held_by_something_else_does_not_stop_training() {
        let e = Error::NotASnapshot { path: "m_snapshot_200_iters".into(), kind: "a folder of other files" };
        assert!(e.is_retryable());
        assert!(Error::Background { what: Work::Snapshot, source: std::sync::Arc::new(e) }.is_retryable());
    }

    #[test]
    fn no_space_reports_known_sizes() {
        let e = Error::NoSpace { path: "d/m.mio".into(), needed: Some(49093), free: Some(100) };
        assert!(e.to_string().contains("49093 bytes needed, 100 bytes free"), "{e}");
    }
}
