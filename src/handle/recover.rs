//! What a handle does to its model folder when it opens: remove what an
//! interrupted run left, tell a lost archive from a new model, and take
//! the state file as the last run left it.

use std::path::{Path, PathBuf};

use crate::archive::ArchiveReader;
use crate::error::{Error, Result};
use crate::folder::ModelPaths;
use crate::policy::state::State;

pub(super) fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Remove what an interrupted run left: every temporary file in the model
/// folder (the caller holds its lock), and beside it only this folder's own
/// snapshot temporaries (other folders' may be in use by their trainers),
/// which are always folders: a file there is not modelio's.
pub(super) fn remove_stale_temps(paths: &ModelPaths) -> Result<()> {
    let snapshots = crate::folder::snapshot::snapshot_dir(&paths.dir, 0);
    let prefix = snapshots.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix("0_iters")).unwrap_or("");
    let removed = crate::folder::durable::remove_stale_temps(&paths.dir, |_, _| true)?
        + crate::folder::durable::remove_stale_temps(&crate::folder::durable::parent_of(&paths.dir), |base, is_dir| {
            is_dir && !prefix.is_empty() && base.starts_with(prefix)
        })?;
    if removed > 0 {
        tracing::info!(target: "modelio", "removed {removed} temporary files left by an interrupted run");
    }
    Ok(())
}

/// When the archive is missing but the folder holds the model's history (a
/// state file that counted iterations, a backup, a snapshot), what is there.
pub(super) fn history_without_archive(paths: &ModelPaths) -> Result<Option<String>> {
    match std::fs::symlink_metadata(paths.archive()) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        _ => return Ok(None),
    }
    let mut found = Vec::new();
    let state = paths.state();
    let mut damaged_state = None;
    if state.exists() {
        match State::read(&state) {
            Ok(s) if s.total_iterations == 0 => {}
            Ok(s) => found.push(format!("{} ({} iterations)", file_name(&state), s.total_iterations)),
            Err(e) => {
                found.push(format!("{} (damaged)", file_name(&state)));
                damaged_state = Some(e);
            }
        }
    }
    let candidates = crate::folder::restore::fallback_candidates(paths);
    let (backup, snapshots) = candidates.split_at(1);
    found.extend(backup.iter().filter(|bk| bk.exists()).map(|bk| file_name(bk)));
    let snapshots: Vec<&PathBuf> = snapshots.iter().filter(|p| p.exists()).collect();
    if let Some(newest) = snapshots.first() {
        let dir = newest.parent().map(file_name).unwrap_or_default();
        found.push(format!("{} snapshot(s), the newest {dir}", snapshots.len()));
    }
    // A damaged state file alone: that is the problem to report (no
    // fallback can help it).
    if let (Some(e), 1) = (damaged_state, found.len()) {
        return Err(e);
    }
    Ok(if found.is_empty() { None } else { Some(found.join(", ")) })
}

/// The state to continue from. The archive carries a copy of the state file
/// as of its save, so when a crash fell between committing the archive and
/// the state file (or the state file is damaged), the archive's copy wins and,
/// in training mode, is written back.
pub(super) fn reconcile_state(paths: &ModelPaths, predict: bool) -> Result<State> {
    let state_path = paths.state();
    let from_file = if state_path.exists() { Some(State::read(&state_path)) } else { None };
    let from_archive: Option<State> = match ArchiveReader::open(&paths.archive()) {
        Ok(r) => r.state.and_then(|bytes| serde_json::from_slice(&bytes).ok()),
        // A FIFO or device under the archive's name: refuse, never block on it.
        Err(e @ Error::NotRegular { .. }) => return Err(e),
        // Missing or damaged: a load reports it.
        Err(_) => None,
    };
    match (from_file, from_archive) {
        (Some(Ok(f)), Some(a)) if f.total_iterations == a.total_iterations => Ok(f),
        (_, Some(a)) => {
            if !predict {
                tracing::warn!(target: "modelio", "state file {} did not match the archive; restored it from the archive", state_path.display());
                crate::folder::durable::commit_bytes(&state_path, &a.to_json())?;
            }
            Ok(a)
        }
        (Some(f), None) => f,
        (None, None) => Ok(State::new(&paths.name)),
    }
}
