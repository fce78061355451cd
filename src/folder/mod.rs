//! Names and files of a model folder.

pub(crate) mod direct;
pub(crate) mod disk;
pub mod durable;
pub mod lock;
pub mod restore;
pub mod snapshot;

use std::path::{Path, PathBuf};

use crate::archive::format::EXTENSION;
use crate::error::{IoContext, Result};
use crate::folder::durable::is_temp;

/// The files of one model in its folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPaths {
    pub dir: PathBuf,
    pub name: String,
}

impl ModelPaths {
    pub fn new(dir: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        ModelPaths { dir: dir.into(), name: name.into() }
    }
    /// `<dir>/<name>.mio`
    pub fn archive(&self) -> PathBuf {
        self.dir.join(format!("{}.{EXTENSION}", self.name))
    }
    /// `<dir>/<name>_state.json`
    pub fn state(&self) -> PathBuf {
        self.dir.join(format!("{}_state.json", self.name))
    }
    /// `<dir>/<name>_logs`
    pub fn logs(&self) -> PathBuf {
        self.dir.join(format!("{}_logs", self.name))
    }
    /// The backup of a file: `<file>.bk`.
    pub fn backup_of(file: &Path) -> PathBuf {
        let mut s = file.as_os_str().to_owned();
        s.push(".bk");
        PathBuf::from(s)
    }
}

/// Model names of the archives in `dir` (temporary files skipped), sorted.
pub fn archive_names(dir: &Path) -> Vec<String> {
    let suffix = format!(".{EXTENSION}");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !is_temp(n))
        .filter_map(|n| n.strip_suffix(&suffix).map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names
}

/// Names of the models that have files in `dir`, sorted and unique: from
/// archives (`<name>.mio`), backups (`<name>.mio.bk`) and state files
/// (`<name>_state.json` and its `.bk`), so a model whose archive is missing
/// is still found. Folders and temporary files are skipped.
///
/// # Errors
/// [`crate::Error::Io`] when `dir` cannot be listed.
pub fn model_names(dir: &Path) -> Result<Vec<String>> {
    let suffixes = [format!(".{EXTENSION}"), format!(".{EXTENSION}.bk"), "_state.json".to_string(), "_state.json.bk".to_string()];
    let mut names = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir).at("list", dir)? {
        let entry = entry.at("list", dir)?;
        if entry.file_type().map_or(true, |t| t.is_dir()) {
            continue;
        }
        let Ok(file) = entry.file_name().into_string() else { continue };
        if is_temp(&file) {
            continue;
        }
        if let Some(name) = suffixes.iter().find_map(|s| file.strip_suffix(s.as_str())).filter(|n| !n.is_empty()) {
            names.insert(name.to_string());
        }
    }
    Ok(names.into_iter().collect())
}

/// The reference's `multiple_models_in_folder`: the archive names found when
/// the folder holds a model other than `name`, else `None`.
///
/// The reference takes the longest common prefix of the names found plus this
/// model's name, by path component (Python's `os.path.commonpath`): a model
/// name is one component, so the prefix is empty exactly when some name
/// differs. Empty folder: `None`; only `other` while this is `original`:
/// `Some(["other"])`.
pub fn multiple_models(found: &[String], name: &str) -> Option<Vec<String>> {
    let mut all: Vec<&str> = found.iter().map(String::as_str).collect();
    all.push(name);
    if common_component_prefix(&all).is_empty() {
        Some(found.to_vec())
    } else {
        None
    }
}

fn common_component_prefix<'a>(names: &[&'a str]) -> Vec<&'a str> {
    let mut parts = names.iter().map(|n| n.split('/').collect::<Vec<_>>());
    let Some(mut prefix) = parts.next() else { return Vec::new() };
    for p in parts {
        let common = prefix.iter().zip(&p).take_while(|(a, b)| a == b).count();
        prefix.truncate(common);
    }
    prefix
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn multiple_models_semantics() {
        assert_eq!(multiple_models(&[], "original"), None);
        assert_eq!(multiple_models(&s(&["other"]), "original"), Some(s(&["other"])));
        assert_eq!(multiple_models(&s(&["original"]), "original"), None);
        assert_eq!(multiple_models(&s(&["original", "other"]), "original"), Some(s(&["original", "other"])));
        assert_eq!(multiple_models(&s(&["model_v2"]), "model"), Some(s(&["model_v2"])));
    }

    #[test]
    fn archive_names_skip_temps_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["a.mio", "b.mio", "a.mio.bk", "a_state.json", ".modelio-tmp-1-x-c.mio"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        assert_eq!(archive_names(dir.path()), s(&["a", "b"]));
        assert!(archive_names(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn model_names_come_from_archives_backups_and_state_files() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "a.mio",
            "a_state.json",
            "a.mio.bk",
            "b.mio.bk",
            "c_state.json",
            "d_state.json.bk",
            ".mio",
            "notes.txt",
            ".modelio-tmp-1-x-e.mio",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        std::fs::create_dir(dir.path().join("f.mio")).unwrap();
        std::fs::create_dir(dir.path().join("a_logs")).unwrap();
        assert_eq!(model_names(dir.path()).unwrap(), s(&["a", "b", "c", "d"]));
        assert!(model_names(&dir.path().join("missing")).is_err());
    }
}
