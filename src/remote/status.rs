//! What the uploader tells the commands: its counters, published to
//! `<dir>/<name>_remote.json` after each upload or failure, which `modelio
//! remote status` reads. Without libtorch, so the command reads the same type.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::folder::ModelPaths;

/// What follows a model's name in its status file's name.
pub const STATUS_SUFFIX: &str = "_remote.json";

/// Where the uploader publishes its counters: `<dir>/<name>_remote.json`.
pub fn status_path(paths: &ModelPaths) -> PathBuf {
    paths.dir.join(format!("{}{STATUS_SUFFIX}", paths.name))
}

/// The remote tier's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoteStats {
    /// `<url>/<model>`.
    pub location: String,
    /// Checkpoints uploaded (manifest committed).
    pub uploaded: u64,
    /// Saves not uploaded because a newer one replaced them while waiting.
    pub skipped: u64,
    /// Upload attempts that failed (each is retried or replaced).
    pub failed_attempts: u64,
    /// Iterations of the newest checkpoint uploaded by this run.
    pub last_uploaded: Option<u64>,
    /// The id (`<iterations:020>-<upload>`) of the newest checkpoint uploaded by this run.
    pub last_checkpoint: Option<String>,
    /// The last failure, and when (RFC 3339).
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Iterations of the save being uploaded or waiting, if any.
    pub pending: Option<u64>,
    /// Uploads given up at shutdown (left for the next run's catch-up).
    pub abandoned: u64,
}
