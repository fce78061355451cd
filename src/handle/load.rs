//! Reading an archive for a load: the live one, or with `load.fallback`
//! the newest backup or snapshot that reads whole and checks; and the
//! errors of a load that finds none.

use std::collections::BTreeMap;
use std::path::Path;

use super::recover::{file_name, history_without_archive};
use crate::archive::ArchiveReader;
use crate::config::OptimizerPolicy;
use crate::error::{Error, Result};
use crate::folder::ModelPaths;
use crate::optim::OptimizerState;
use crate::tensors::read_tensor;

/// An archive read whole: every model tensor (and the optimizer's state
/// when asked for), each checked against its checksum.
pub(super) struct Read {
    pub(super) reader: ArchiveReader,
    pub(super) model: BTreeMap<String, tch::Tensor>,
    pub(super) optimizer: Option<OptimizerState>,
}

pub(super) fn read_archive(path: &Path, with_optimizer: bool) -> Result<Read> {
    let reader = ArchiveReader::open(path)?;
    let mut model = BTreeMap::new();
    for t in &reader.model {
        model.insert(t.meta.name.clone(), read_tensor(&reader, t)?);
    }
    let optimizer = if with_optimizer { read_optimizer(&reader)? } else { None };
    Ok(Read { reader, model, optimizer })
}

pub(super) fn read_optimizer(reader: &ArchiveReader) -> Result<Option<OptimizerState>> {
    let Some((located, json)) = &reader.optimizer else { return Ok(None) };
    let kind = reader.manifest.optimizer.as_ref().map(|o| o.kind.clone()).unwrap_or_default();
    let mut tensors = BTreeMap::new();
    for t in located {
        tensors.insert(t.meta.name.clone(), read_tensor(reader, t)?);
    }
    Ok(Some(OptimizerState { kind, json: json.clone(), tensors }))
}

/// Read the live archive, or with `fallback` the newest that reads whole
/// and checks (`.bk`, then snapshots by iteration). Returns what was read
/// and, for a fallback, why the live archive was not used. Each archive is
/// read and checked once.
pub(super) fn read_for_load(paths: &ModelPaths, fallback: bool, with_optimizer: bool) -> Result<(Read, Option<String>)> {
    let live = paths.archive();
    let first = match read_archive(&live, with_optimizer) {
        Ok(read) => return Ok((read, None)),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(e),
    };
    if fallback {
        for candidate in crate::folder::restore::fallback_candidates(paths) {
            if let Ok(read) = read_archive(&candidate, with_optimizer) {
                let reason = match &first {
                    Some(e) => e.report().to_string(),
                    None => format!("archive {} is missing", live.display()),
                };
                tracing::warn!(target: "modelio", "{reason}; loading {} instead", candidate.display());
                return Ok((read, Some(reason)));
            }
        }
    }
    // Told only now, when no fallback loaded: whether history makes a
    // missing archive a lost one.
    Err(first.unwrap_or_else(|| missing_archive(paths, fallback)))
}

/// The error of a load that found no archive: a new model has none, but
/// beside the model's history (a state file, backups, snapshots) the archive
/// was lost, and "train a model first" would be wrong advice.
pub(super) fn missing_archive(paths: &ModelPaths, fallback: bool) -> Error {
    let (dir, name, file) = (paths.dir.clone(), paths.name.clone(), file_name(&paths.archive()));
    match history_without_archive(paths) {
        Ok(None) => Error::ModelNotFound { dir, name, file },
        Ok(Some(found)) if fallback => Error::ArchiveLost { dir, name, file, found },
        Ok(Some(found)) => Error::ArchiveMissing { dir, name, file, found },
        Err(e) => e,
    }
}

/// Why an archive holds no optimizer state, from the policy that wrote it.
pub(super) fn missing_optimizer_reason(policy: OptimizerPolicy) -> String {
    match policy {
        OptimizerPolicy::Never => "`save.optimizer = \"never\"` does not store it".into(),
        OptimizerPolicy::Exit => "`save.optimizer = \"exit\"` stores it only with the exit save, and the last run did not end with one \
             (killed, or stopped without an exit save); set `save.optimizer = \"always\"` to store it with every save"
            .into(),
        OptimizerPolicy::Always => "the archive was saved without it (by an earlier policy, or with no optimizer given)".into(),
    }
}
