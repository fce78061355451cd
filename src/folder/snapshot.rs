//! Snapshots of a model folder: `<model_dir>_snapshot_<N>_iters`.
//!
//! Built under a temporary name beside the model folder and renamed into
//! place, so a snapshot is either complete or absent. The archive and state
//! file come from links pinned at the save they belong to (committed files
//! never change, so the pins hold that save), copied into the snapshot so
//! that damage to the live archive does not reach it; other files (logs,
//! which their writers modify in place) are copied. Symlinks are never followed.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::folder::durable::{self, commit, commit_dir, is_temp, Source};
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

/// One snapshot as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The iteration it holds.
    pub iterations: u64,
    /// Its folder.
    pub path: PathBuf,
    /// The size of the files directly in it.
    pub bytes: u64,
    /// Whether its archive opens and every checksum holds.
    pub verifies: bool,
}

/// The snapshots of a model folder, oldest first, each with its size and
/// whether its archive (`archive`, the file name of the model's archive)
/// verifies. Snapshots that a trainer retires while they are listed are
/// left out (see [`examine`]), never reported as damaged.
pub fn survey(model_dir: &Path, archive: &OsStr) -> Vec<Listed> {
    let mut found = list(model_dir);
    found.sort_by_key(|(n, _)| *n);
    found.into_iter().filter_map(|(n, dir)| examine(n, &dir, archive)).collect()
}

/// Size and health of snapshot `n` in `dir`; `None` when the folder is gone.
///
/// A trainer's retention retires a snapshot by renaming its folder away and
/// then deleting it, so a snapshot listed a moment ago may vanish before or
/// while it is read: its archive is then missing, which is not damage. The
/// folder is looked for again after the checks; a snapshot whose folder is
/// gone is no longer one to report, whatever the checks found.
pub fn examine(n: u64, dir: &Path, archive: &OsStr) -> Option<Listed> {
    let bytes = fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    let verifies = crate::archive::ArchiveReader::open(&dir.join(archive)).is_ok_and(|r| r.verify().is_empty());
    let gone = matches!(fs::symlink_metadata(dir), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    (!gone).then(|| Listed { iterations: n, path: dir.to_path_buf(), bytes, verifies })
}

/// A file pinned at a save: `pin`, a temporary link (or copy) beside it,
/// holds what `target` held then, whatever later saves do to `target`.
/// Backups and snapshots are made from pins. A `Pinned` owns its pin: it is
/// removed when the `Pinned` is dropped (used, refused, or never delivered),
/// and a backup or snapshot made from it holds its own link or copy.
#[derive(Debug)]
pub struct Pinned {
    pub pin: PathBuf,
    pub target: PathBuf,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.pin);
    }
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
/// [`crate::Error::NotASnapshot`] when something other than a snapshot of
/// this model is at the snapshot's name (it is left as it is);
/// [`crate::Error::Io`] naming the file that failed; the snapshot is then absent
/// (or the previous snapshot `n` is intact).
pub fn build(paths: &ModelPaths, n: u64, pinned: &[Pinned], hard_links: bool) -> Result<PathBuf> {
    let target = snapshot_dir(&paths.dir, n);
    check_replaceable(&target, &paths.name)?;
    let parent = durable::parent_of(&target);
    let built = durable::temp_path(&parent, &target);
    fs::create_dir(&built).at("create snapshot folder", &built)?;
    let result = fill(paths, pinned, &built, hard_links).and_then(|()| commit_dir(&built, &target));
    if result.is_err() {
        let _ = fs::remove_dir_all(&built);
    }
    result.map(|()| target)
}

/// Whether a snapshot may be built at `target`: nothing is there, or a
/// folder that only holds files of model `name` (as every snapshot of it
/// does). A file, a symlink or a folder holding anything else was not made
/// by modelio and is never replaced.
fn check_replaceable(target: &Path, name: &str) -> Result<()> {
    let meta = match fs::symlink_metadata(target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("inspect", target, e)),
    };
    if !meta.is_dir() {
        return Err(Error::NotASnapshot { path: target.to_path_buf(), kind: durable::kind_of(&meta) });
    }
    for entry in fs::read_dir(target).at("list", target)? {
        let entry = entry.at("list", target)?;
        if !entry.file_name().to_string_lossy().starts_with(name) {
            return Err(Error::NotASnapshot { path: target.to_path_buf(), kind: "a folder holding other files" });
        }
    }
    Ok(())
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

/// Remove the snapshots of model `paths` beyond the newest `keep`; returns
/// the removed folders. A folder named like a snapshot that holds files of
/// another name was not made by modelio: it is neither counted nor removed.
///
/// # Errors
/// [`crate::Error::Io`] naming the folder that could not be removed.
pub fn apply_retention(paths: &ModelPaths, keep: usize) -> Result<Vec<PathBuf>> {
    let snapshots: Vec<(u64, PathBuf)> =
        list(&paths.dir).into_iter().filter(|(_, dir)| check_replaceable(dir, &paths.name).is_ok()).collect();
    let remove = crate::policy::retention::to_remove(&snapshots, keep);
    for dir in &remove {
        // Rename first so a crash mid-delete leaves a temp folder, not a partial snapshot.
        let doomed = durable::temp_path(&durable::parent_of(dir), dir);
        fs::rename(dir, &doomed).at("retire snapshot", dir)?;
        fs::remove_dir_all(&doomed).at("remove", &doomed)?;
    }
    Ok(remove)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_is_removed_with_its_pinned_and_what_was_made_from_it_stays() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m.mio");
        fs::write(&target, b"saved").unwrap();
        let pin = durable::temp_path(dir.path(), &target);
        fs::hard_link(&target, &pin).unwrap();
        let pinned = Pinned { pin: pin.clone(), target: target.clone() };
        let made = dir.path().join("m.mio.bk");
        fs::hard_link(&pinned.pin, &made).unwrap();
        drop(pinned);
        assert!(!pin.exists());
        assert_eq!(fs::read(&made).unwrap(), b"saved");
        assert_eq!(fs::read(&target).unwrap(), b"saved");
    }

    #[test]
    fn a_snapshot_retired_while_listed_is_left_out_not_damaged() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m");
        fs::create_dir(&model).unwrap();
        for n in [1, 2] {
            fs::create_dir(snapshot_dir(&model, n)).unwrap();
            fs::write(snapshot_dir(&model, n).join("m.mio"), b"not an archive").unwrap();
        }
        let mut found = list(&model);
        found.sort();
        assert_eq!(found.len(), 2);
        // A trainer's retention retires snapshot 2 between the listing and its check.
        let doomed = durable::temp_path(tmp.path(), &found[1].1);
        fs::rename(&found[1].1, &doomed).unwrap();
        fs::remove_dir_all(&doomed).unwrap();
        let archive = OsStr::new("m.mio");
        let damaged = examine(1, &found[0].1, archive).unwrap();
        assert_eq!((damaged.iterations, damaged.verifies, damaged.bytes), (1, false, 14));
        assert_eq!(examine(2, &found[1].1, archive), None);
        assert_eq!(survey(&model, archive), [damaged]);
    }

    #[test]
    fn only_a_snapshot_of_this_model_is_replaceable() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("m_snapshot_5_iters");
        check_replaceable(&target, "m").unwrap();
        fs::create_dir(&target).unwrap();
        check_replaceable(&target, "m").unwrap();
        fs::write(target.join("m.mio"), b"x").unwrap();
        fs::create_dir(target.join("m_logs")).unwrap();
        check_replaceable(&target, "m").unwrap();
        fs::write(target.join("notes.txt"), b"mine").unwrap();
        let err = check_replaceable(&target, "m").unwrap_err();
        assert!(matches!(&err, Error::NotASnapshot { path, .. } if *path == target), "{err:?}");
        fs::remove_dir_all(&target).unwrap();
        fs::write(&target, b"a file").unwrap();
        let err = check_replaceable(&target, "m").unwrap_err();
        assert!(matches!(&err, Error::NotASnapshot { kind: "a file", .. }), "{err:?}");
    }

    #[test]
    fn retention_never_removes_a_folder_modelio_did_not_make() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = ModelPaths::new(tmp.path().join("m"), "m");
        fs::create_dir(&paths.dir).unwrap();
        let foreign = snapshot_dir(&paths.dir, 1);
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("notes.txt"), b"mine").unwrap();
        for n in [2, 3] {
            fs::create_dir(snapshot_dir(&paths.dir, n)).unwrap();
            fs::write(snapshot_dir(&paths.dir, n).join("m.mio"), b"x").unwrap();
        }
        assert_eq!(apply_retention(&paths, 1).unwrap(), [snapshot_dir(&paths.dir, 2)]);
        assert_eq!(fs::read(foreign.join("notes.txt")).unwrap(), b"mine");
        assert!(snapshot_dir(&paths.dir, 3).is_dir());
    }
}
