//! Snapshots of a model folder: `<model_dir>_snapshot_<N>_iters`.
//!
//! Built under a temporary name beside the model folder and renamed into
//! place, so a snapshot is either complete or absent. The archive and state
//! file come from links pinned at the save they belong to (committed files
//! never change, so the pins hold that save), copied into the snapshot so
//! that damage to the live archive does not reach it; other files (logs,
//! which their writers modify in place) are copied. Symlinks are never followed.

use std::fs;
use std::path::{Path, PathBuf};

use crate::durable::{self, commit, commit_dir, is_temp, Source};
use crate::error::{IoContext, Result};
use crate::folder::ModelPaths;

/// The folder of snapshot `n`.
pub fn snapshot_dir(model_dir: &Path, n: u64) -> PathBuf {
    let mut s = model_dir.as_os_str().to_owned();
    s.push(format!("_snapshot_{n}_iters"));
    PathBuf::from(s)
}

/// Existing snapshots of a model folder as (iteration, folder), unsorted.
pub fn list(model_dir: &Path) -> Vec<(u64, PathBuf)> {
    let parent = durable::parent_of(model_dir);
    let Some(base) = model_dir.file_name().map(|b| b.to_string_lossy().into_owned()) else { return Vec::new() };
    let prefix = format!("{base}_snapshot_");
    fs::read_dir(&parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix(&prefix)?.strip_suffix("_iters")?.parse().ok()?;
            e.file_type().ok()?.is_dir().then(|| (n, e.path()))
        })
        .collect()
}

/// A file pinned at a save: `pin`, a temporary link (or copy) beside it,
/// holds what `target` held then, whatever later saves do to `target`.
/// Backups and snapshots are made from pins.
#[derive(Debug, Clone)]
pub struct Pinned {
    pub pin: PathBuf,
    pub target: PathBuf,
}

impl Pinned {
    /// The target's file name (its name inside a snapshot).
    pub fn name(&self) -> String {
        self.target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// Build snapshot `n` of the model from the pinned files and the other model
/// files and logs in the folder. The pinned archive and state file are
/// copied (a reflink where the filesystem offers one), or hard-linked with
/// `hard_links`. Returns the snapshot's folder.
///
/// # Errors
/// [`crate::Error::Io`] naming the file that failed; the snapshot is then absent
/// (or the previous snapshot `n` is intact).
pub fn build(paths: &ModelPaths, n: u64, pinned: &[Pinned], hard_links: bool) -> Result<PathBuf> {
    let target = snapshot_dir(&paths.dir, n);
    let parent = durable::parent_of(&target);
    let built = durable::temp_path(&parent, &target);
    fs::create_dir(&built).at("create snapshot folder", &built)?;
    let result = fill(paths, pinned, &built, hard_links).and_then(|()| commit_dir(&built, &target));
    if result.is_err() {
        let _ = fs::remove_dir_all(&built);
    }
    result.map(|()| target)
}

fn fill(paths: &ModelPaths, pinned: &[Pinned], built: &Path, hard_links: bool) -> Result<()> {
    for p in pinned {
        let source = if hard_links { Source::Link(&p.pin) } else { Source::Copy(&p.pin) };
        commit(&built.join(p.name()), source)?;
    }
    let logs = paths.logs();
    for entry in fs::read_dir(&paths.dir).at("list", &paths.dir)? {
        let entry = entry.at("list", &paths.dir)?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        let kind = entry.file_type().at("inspect", &entry.path())?;
        let wanted = name.starts_with(&paths.name) && !name.ends_with(".bk") && !is_temp(&name) && !pinned.iter().any(|p| p.name() == name);
        if !wanted || kind.is_symlink() {
            continue;
        }
        if kind.is_file() {
            commit(&built.join(&name), Source::Copy(&entry.path()))?;
        } else if kind.is_dir() && entry.path() == logs {
            copy_tree(&logs, &built.join(&name))?;
        }
    }
    Ok(())
}

/// Copy a folder's regular files and subfolders; symlinks are skipped.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir(to).at("create", to)?;
    for entry in fs::read_dir(from).at("list", from)? {
        let entry = entry.at("list", from)?;
        let kind = entry.file_type().at("inspect", &entry.path())?;
        let dst = to.join(entry.file_name());
        if kind.is_file() {
            copy_file(&entry.path(), &dst)?;
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &dst)?;
        }
    }
    durable::sync_dir(to)
}

/// Copy one file of a log tree: a new file (never through a symlink), named
/// in errors by its destination, with the source's size when the disk is full.
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let mut src = durable::open_regular(from)?;
    let len = src.metadata().at("inspect", from)?.len();
    let mut dst = durable::create_new(to)?;
    std::io::copy(&mut src, &mut dst).map_err(|e| crate::Error::io("copy", to, e).no_space(to, len))?;
    dst.sync_all().map_err(|e| crate::Error::io("fsync", to, e).no_space(to, len))
}

/// Remove the snapshots beyond the newest `keep`; returns the removed folders.
///
/// # Errors
/// [`crate::Error::Io`] naming the folder that could not be removed.
pub fn apply_retention(model_dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let remove = crate::retention::to_remove(&list(model_dir), keep);
    for dir in &remove {
        // Rename first so a crash mid-delete leaves a temp folder, not a partial snapshot.
        let doomed = durable::temp_path(&durable::parent_of(dir), dir);
        fs::rename(dir, &doomed).at("retire snapshot", dir)?;
        fs::remove_dir_all(&doomed).at("remove", &doomed)?;
    }
    Ok(remove)
}
