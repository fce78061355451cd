//! Putting backups back (the reference's restore tool).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::folder::durable::{self, commit, is_temp, Source};
use crate::folder::ModelPaths;
use crate::policy::state::State;

/// The archives a `load.fallback = true` load tries, in order, when the live
/// one is missing or damaged: `<name>.mio.bk`, then the snapshots' copies by
/// iteration, newest first. The loader takes the first that verifies; the
/// commands that say what it would load ask here too.
pub fn fallback_candidates(paths: &ModelPaths) -> Vec<PathBuf> {
    let live = paths.archive();
    let mut candidates = vec![ModelPaths::backup_of(&live)];
    let mut snaps = crate::folder::snapshot::list(&paths.dir);
    snaps.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    if let Some(file) = live.file_name() {
        candidates.extend(snaps.into_iter().map(|(_, dir)| dir.join(file)));
    }
    candidates
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Where the replaced files went.
    pub archived: PathBuf,
    /// The files put back from their `.bk`.
    pub restored: Vec<PathBuf>,
    /// Session log folders moved aside, where they are now (under `archived`).
    pub moved_logs: Vec<PathBuf>,
}

/// Move the model's current files into `<dir>/<name>_archived_<timestamp>/`
/// and put every `<file>.bk` back as `<file>` (the `.bk` stays). Session log
/// folders under `<name>_logs/` (folders named by a session id, as
/// [`State::start_session`] creates them) that the restored state file does
/// not know are moved to the archived folder too. Everything else under
/// `<name>_logs/` stays: known sessions and any layout of the user's own.
///
/// The backups are put back as independent copies (a copy-on-write clone
/// where the filesystem offers one), never as hard links: damage to the
/// restored file must not reach its backup.
///
/// Takes the folder's lock once it has found a backup: a restore under a
/// running trainer would be overwritten by its next save. A folder without
/// backups is left exactly as it was (no lock file is created or written),
/// and a trainer at work in it is still reported.
///
/// # Errors
/// [`Error::Locked`] when a trainer holds the folder; [`Error::NoBackup`]
/// (nothing changed) when there is no `.bk`; [`Error::Io`] naming the file otherwise.
pub fn restore(paths: &ModelPaths) -> Result<Restored> {
    let dir = &paths.dir;
    let no_backup = || Error::NoBackup { dir: dir.clone(), name: paths.name.clone() };
    if scan(paths)?.backups.is_empty() {
        // Say first that a trainer is at work, as with backups, but without
        // creating or writing the lock file: nothing is changed.
        crate::folder::lock::check_free(dir)?;
        return Err(no_backup());
    }
    let _lock = crate::folder::lock::acquire(dir)?;
    // Listed again under the lock: a trainer may have changed the folder.
    let Found { backups, current } = scan(paths)?;
    if backups.is_empty() {
        return Err(no_backup());
    }
    // Check the backups before touching anything.
    let state_bk = ModelPaths::backup_of(&paths.state());
    let known_sessions: Option<Vec<String>> =
        if state_bk.exists() { Some(State::read(&state_bk)?.sessions.into_iter().map(|s| s.id).collect()) } else { None };
    let archive_bk = ModelPaths::backup_of(&paths.archive());
    if archive_bk.exists() {
        crate::archive::ArchiveReader::open(&archive_bk)?;
    }

    let archived_prefix = format!("{}_archived_", paths.name);
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let archived = dir.join(format!("{archived_prefix}{stamp}"));
    fs::create_dir(&archived).at("create", &archived)?;
    for file in &current {
        if let Some(name) = file.file_name() {
            fs::rename(file, archived.join(name)).at("move aside", file)?;
        }
    }
    let moved_logs = match known_sessions {
        Some(known) => move_unknown_session_logs(&paths.logs(), &archived, &known)?,
        None => Vec::new(),
    };
    durable::sync_dir(&archived)?;
    durable::sync_dir(dir)?;
    let mut restored = Vec::new();
    for (bk, original) in backups {
        commit(&original, Source::Copy(&bk))?;
        restored.push(original);
    }
    restored.sort();
    Ok(Restored { archived, restored, moved_logs })
}

/// A model's files as a restore sees them.
struct Found {
    /// Backups as (`<file>.bk`, `<file>`).
    backups: Vec<(PathBuf, PathBuf)>,
    /// The other current files, which a restore moves aside.
    current: Vec<PathBuf>,
}

/// The model's backups and current files. Folders, temporaries and earlier
/// archived folders are not listed.
fn scan(paths: &ModelPaths) -> Result<Found> {
    let dir = &paths.dir;
    let mut backups = Vec::new();
    let mut current = Vec::new();
    let archived_prefix = format!("{}_archived_", paths.name);
    for entry in fs::read_dir(dir).at("list", dir)? {
        let entry = entry.at("list", dir)?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        if !name.starts_with(&paths.name) || is_temp(&name) || name.starts_with(&archived_prefix) {
            continue;
        }
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !is_file {
            continue;
        }
        match name.strip_suffix(".bk") {
            Some(original) => backups.push((entry.path(), dir.join(original))),
            None => current.push(entry.path()),
        }
    }
    Ok(Found { backups, current })
}

/// Whether a folder name is a session id: a UUID in the form
/// [`State::start_session`] writes (lowercase, hyphenated).
fn is_session_id(name: &str) -> bool {
    uuid::Uuid::try_parse(name).is_ok_and(|id| id.hyphenated().to_string() == name)
}

/// Move the session folders under `logs` that are not in `known` to
/// `<archived>/<logs name>/`; returns where they went. Entries that are not
/// folders named by a session id are the user's and stay where they are.
fn move_unknown_session_logs(logs: &Path, archived: &Path, known: &[String]) -> Result<Vec<PathBuf>> {
    let Ok(entries) = fs::read_dir(logs) else { return Ok(Vec::new()) };
    let target = archived.join(logs.file_name().unwrap_or_default());
    let mut moved = Vec::new();
    for entry in entries {
        let entry = entry.at("list", logs)?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir && is_session_id(&name) && !known.contains(&name) {
            fs::create_dir_all(&target).at("create", &target)?;
            let to = target.join(&name);
            fs::rename(entry.path(), &to).at("move aside", &entry.path())?;
            moved.push(to);
        }
    }
    moved.sort();
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &str = "0b6a3c4e-7f1d-4a8e-9c2b-5d7e8f901234";
    const UNKNOWN: &str = "9f8e7d6c-5b4a-4392-8172-6a5b4c3d2e1f";

    #[test]
    fn fallback_tries_the_backup_then_snapshots_newest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = ModelPaths::new(tmp.path().join("model"), "m");
        for n in [20, 100, 3] {
            fs::create_dir_all(crate::folder::snapshot::snapshot_dir(&paths.dir, n)).unwrap();
        }
        // Another model folder's snapshots are not this one's.
        fs::create_dir_all(crate::folder::snapshot::snapshot_dir(&tmp.path().join("model2"), 500)).unwrap();
        let got = fallback_candidates(&paths);
        let snap = |n| crate::folder::snapshot::snapshot_dir(&paths.dir, n).join("m.mio");
        assert_eq!(got, vec![paths.dir.join("m.mio.bk"), snap(100), snap(20), snap(3)]);
    }

    #[test]
    fn session_ids_are_uuids_as_start_session_writes_them() {
        let mut state = State::new("m");
        state.start_session(Some(1));
        assert!(is_session_id(&state.sessions[0].id));
        assert!(is_session_id(KNOWN));
        for other in ["tensorboard", "some-later-session", "", "9F8E7D6C-5B4A-4392-8172-6A5B4C3D2E1F", "9f8e7d6c5b4a439281726a5b4c3d2e1f"] {
            assert!(!is_session_id(other), "{other}");
        }
    }

    #[test]
    fn only_unknown_session_folders_move() {
        let tmp = tempfile::tempdir().unwrap();
        let logs = tmp.path().join("m_logs");
        let archived = tmp.path().join("m_archived_x");
        for d in [KNOWN, UNKNOWN, "tensorboard", "some-later-session"] {
            fs::create_dir_all(logs.join(d)).unwrap();
        }
        fs::write(logs.join("run.txt"), b"x").unwrap();
        fs::create_dir(&archived).unwrap();
        let moved = move_unknown_session_logs(&logs, &archived, &[KNOWN.to_string()]).unwrap();
        assert_eq!(moved, [archived.join("m_logs").join(UNKNOWN)]);
        assert!(moved[0].is_dir());
        for stays in [KNOWN, "tensorboard", "some-later-session", "run.txt"] {
            assert!(logs.join(stays).exists(), "{stays}");
        }
        assert!(!logs.join(UNKNOWN).exists());
        // No logs folder: nothing to do.
        assert!(move_unknown_session_logs(&tmp.path().join("none"), &archived, &[]).unwrap().is_empty());
    }
}
