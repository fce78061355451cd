//! The one error type of the crate.
//!
//! Every variant a user can hit says what happened, to which file, and what to
//! do next. Background failures are shared (`Arc`) because one failure reaches
//! both the save's ticket and the trainer's next call.

use std::path::PathBuf;
use std::sync::Arc;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in modelio.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem operation failed.
    #[error("could not {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The disk is full: nothing was committed and the previous files are intact.
    #[error(
        "no space left to write {} ({needed} bytes needed, {free} bytes free); \
         the previous files are intact: free some space and the next save will succeed",
        path.display()
    )]
    NoSpace { path: PathBuf, needed: u64, free: u64 },

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

    /// An archive is damaged: a checksum failed or its structure is broken.
    #[error(
        "archive {} is damaged ({what}: {detail}); restore the backup with `modelio restore {} --name {name}` \
         or set `load.fallback = true`",
        path.display(), path.parent().map(|p| p.display().to_string()).unwrap_or_else(|| ".".into())
    )]
    Damaged { path: PathBuf, name: String, what: String, detail: String },

    /// The archive does not match the model it is loaded into.
    #[error("archive {} does not fit the model: tensor `{tensor}`: expected {expected}, found {found}", path.display())]
    Mismatch { path: PathBuf, tensor: String, expected: String, found: String },

    /// A tensor of a dtype the archive format does not store.
    #[error("tensor `{tensor}` has dtype {dtype}, which modelio cannot store (supported: f64, f32, f16, bf16, i64, i32, i16, i8, u8, bool)")]
    UnsupportedDtype { tensor: String, dtype: String },

    /// Optimizer state could not be applied.
    #[error("optimizer state: {0}")]
    Optimizer(String),

    /// A libtorch call failed.
    #[cfg(feature = "torch")]
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// A save or snapshot failed in the background.
    #[error("background {what} failed: {source}")]
    Background { what: &'static str, source: Arc<Error> },

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
}

impl Error {
    /// An [`Error::Io`] for `op` on `path`, or [`Error::NoSpace`] when the disk is full.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            let free = crate::durable::free_bytes(&path).unwrap_or(0);
            return Error::NoSpace { path, needed: 0, free };
        }
        Error::Io { op, path, source }
    }

    pub(crate) fn damaged(path: impl Into<PathBuf>, name: &str, what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Damaged { path: path.into(), name: name.to_string(), what: what.into(), detail: detail.into() }
    }

    /// True when this error (or the background error it wraps) reports a damaged archive.
    pub fn is_damaged(&self) -> bool {
        match self {
            Error::Damaged { .. } => true,
            Error::Background { source, .. } => source.is_damaged(),
            _ => false,
        }
    }
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
