//! What the handle's calls report: a committed save, a load, a resume, the
//! end of a run, and the save counters. Plain data, shared with the workers
//! (a saver answers a ticket with a [`Committed`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::error::Error;

/// What a committed save reports on its ticket.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Iteration count stored in the archive.
    pub iterations: u64,
    /// The archive written.
    pub path: PathBuf,
    /// Tensor bytes written.
    pub bytes: u64,
    /// Mean loss since the previous save.
    pub average_loss: f64,
    /// Whether `.bk` copies of this save were made (they exist once the
    /// ticket answers).
    pub backed_up: bool,
    /// Whether the optimizer state went in.
    pub with_optimizer: bool,
    /// True when the save was skipped because every staging buffer was busy.
    pub skipped: bool,
    /// Time the trainer spent in `save`.
    pub stall: Duration,
    /// Time copying tensors into host buffers.
    pub copy: Duration,
    /// Time writing and committing the files.
    pub write: Duration,
}

/// Which archive a load used, and why.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    /// The iteration count of the save loaded; the handle continues from it.
    pub iterations: u64,
    /// True when the live archive was damaged or missing and a backup or
    /// snapshot was loaded instead.
    pub fallback: bool,
    /// Why the live archive was not used, when `fallback` is true.
    pub reason: Option<String>,
    /// Whether the archive loaded holds optimizer state.
    pub has_optimizer: bool,
}

/// What [`super::ModelIo::resume`] did.
#[derive(Debug, Clone)]
pub struct Resumed {
    /// The archive loaded, or `None` for a new model (nothing to resume).
    pub loaded: Option<Loaded>,
    /// What became of the optimizer.
    pub optimizer: OptimizerResume,
}

/// Whether the optimizer's state was restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptimizerResume {
    /// Its state was loaded from the archive.
    Restored,
    /// The archive holds none, for the reason given: the optimizer starts afresh.
    Missing(String),
    /// No optimizer was given, or the model is new.
    NotApplicable,
}

/// What [`super::ModelIo::finish`] did: the exit save, the handle's counters at
/// the end, and the background failures not reported before (failed backups
/// or snapshots) — each reported here, once.
///
/// A failed backup or snapshot at the end of a run reaches the caller only
/// here: report `unreported` (and, where it matters, fail the run).
#[derive(Debug)]
#[must_use = "failed backups and snapshots of the run's end are in `unreported`: report them"]
pub struct Finished {
    pub exit_save: Committed,
    pub stats: SaveStats,
    pub unreported: Vec<Error>,
}

/// Save counters of a handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveStats {
    pub requested: u64,
    pub skipped: u64,
    /// Saves that had to wait for a free staging buffer.
    pub waited: u64,
    pub committed: u64,
    /// Saves that failed in the background (each reported once).
    pub failed: u64,
    /// Backups and snapshots that failed in the background.
    pub failed_other: u64,
    /// Times a staging buffer had to grow (reallocate).
    pub buffer_growths: u64,
}
