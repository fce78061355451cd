//! Putting backups back (the reference's restore tool).

use std::fs;
use std::path::{Path, PathBuf};

use crate::durable::{self, commit, is_temp, Source};
use crate::error::{Error, IoContext, Result};
use crate::folder::ModelPaths;
use crate::state::State;

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Where the replaced files went.
    pub archived: PathBuf,
    /// The files put back from their `.bk`.
    pub restored: Vec<PathBuf>,
}

/// Move the model's current files into `<dir>/<name>_archived_<timestamp>/`
/// and put every `<file>.bk` back as `<file>` (the `.bk` stays). Session log
/// folders under `<name>_logs/` that the restored state file does not know
/// are moved to the archived folder too; the others stay.
///
/// # Errors
/// [`Error::NoBackup`] (nothing changed) when there is no `.bk`;
/// [`Error::Io`] naming the file otherwise.
pub fn restore(paths: &ModelPaths) -> Result<Restored> {
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
    if backups.is_empty() {
        return Err(Error::NoBackup { dir: dir.clone(), name: paths.name.clone() });
    }
    // Check the backups before touching anything.
    let state_bk = ModelPaths::backup_of(&paths.state());
    let known_sessions: Option<Vec<String>> = if state_bk.exists() {
        Some(State::read(&state_bk)?.sessions.into_iter().map(|s| s.id).collect())
    } else {
        None
    };
    let archive_bk = ModelPaths::backup_of(&paths.archive());
    if archive_bk.exists() {
        crate::archive::ArchiveReader::open(&archive_bk)?;
    }

    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let archived = dir.join(format!("{archived_prefix}{stamp}"));
    fs::create_dir(&archived).at("create", &archived)?;
    for file in &current {
        if let Some(name) = file.file_name() {
            fs::rename(file, archived.join(name)).at("move aside", file)?;
        }
    }
    if let Some(known) = known_sessions {
        move_unknown_session_logs(&paths.logs(), &archived, &known)?;
    }
    durable::sync_dir(&archived)?;
    durable::sync_dir(dir)?;
    let mut restored = Vec::new();
    for (bk, original) in backups {
        commit(&original, Source::Link(&bk))?;
        restored.push(original);
    }
    restored.sort();
    Ok(Restored { archived, restored })
}

fn move_unknown_session_logs(logs: &Path, archived: &Path, known: &[String]) -> Result<()> {
    let Ok(entries) = fs::read_dir(logs) else { return Ok(()) };
    let target = archived.join(logs.file_name().unwrap_or_default());
    for entry in entries {
        let entry = entry.at("list", logs)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir && !known.contains(&name) {
            fs::create_dir_all(&target).at("create", &target)?;
            fs::rename(entry.path(), target.join(&name)).at("move aside", &entry.path())?;
        }
    }
    Ok(())
}
