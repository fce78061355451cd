//! Sharded checkpoints (`modelio::sharded`) in the commands: `verify`,
//! `inspect` and `snapshots` of a model folder, and `remote list --sharded`
//! and `remote verify --sharded`.
//!
//! In a model folder `DIR` (a store of its own, `file://DIR`), the sharded
//! checkpoints of model `m` are under `DIR/m/sharded/`: the committed steps'
//! global manifests in `manifests/<iterations:020>.json`, the global backup
//! in `BACKUP`, the snapshots in `snapshots/<iterations:020>.json`, and the
//! shards under `steps/`. Here the manifests of a folder are read as files,
//! so one that is unreadable is named while the others are still checked;
//! the shards are read through [`ShardedIo`], opened as rank 0 of 1 whatever
//! `RANK` and `WORLD_SIZE` say, and only on a folder that exists (opening a
//! folder store creates a missing one, and the command never creates folders).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use modelio::config::RemoteConfig;
use modelio::sharded::{GlobalManifest, Layout, ShardedIo};
use modelio::{Config, Error};

use crate::show::{mib, short_time};
use crate::{CliError, Out};

/// Whether `path` is a model's `sharded/` folder.
pub fn is_sharded_folder(path: &Path) -> bool {
    path.is_dir() && Layout::MARKS.iter().any(|m| path.join(m).exists())
}

/// Where model `name`'s sharded checkpoints are in model folder `dir`.
pub fn folder_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(name).join(Layout::FOLDER)
}

/// The models of `dir` with sharded checkpoints (`DIR/<name>/sharded/`), sorted.
///
/// # Errors
/// [`Error::Io`] when `dir` cannot be listed.
pub fn models(dir: &Path) -> Result<Vec<String>, Error> {
    let listed = std::fs::read_dir(dir).map_err(|e| Error::Io { op: "list", path: dir.to_path_buf(), source: e })?;
    let mut names: Vec<String> = listed
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let usable = !name.starts_with('.') && !modelio::folder::durable::is_temp(&name);
            (usable && is_sharded_folder(&e.path().join(Layout::FOLDER))).then_some(name)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// The sharded folder a path names: `.../<name>/sharded` itself, or the
/// model's `.../<name>` folder that holds one.
pub fn folder_named(path: &Path) -> Option<PathBuf> {
    // Resolved, so that `.` or `..` has its folder's name.
    let path = std::fs::canonicalize(path).ok()?;
    if path.file_name().is_some_and(|n| n == Layout::FOLDER) && is_sharded_folder(&path) {
        return Some(path);
    }
    let inner = path.join(Layout::FOLDER);
    is_sharded_folder(&inner).then_some(inner)
}

/// The model folder and the model's name of a sharded folder `DIR/<name>/sharded`.
fn split(folder: &Path) -> Result<(PathBuf, String), CliError> {
    let folder = std::path::absolute(folder).map_err(|e| Error::Io { op: "resolve", path: folder.to_path_buf(), source: e })?;
    let model = folder.parent();
    let name = model.and_then(Path::file_name).and_then(|n| n.to_str());
    match (model.and_then(Path::parent), name) {
        (Some(dir), Some(name)) => Ok((dir.to_path_buf(), name.to_string())),
        _ => Err(CliError::ShardsNotFound {
            file: folder.clone(),
            detail: "it is not a model's `<dir>/<name>/sharded` folder (a name that is valid UTF-8)".into(),
        }),
    }
}

/// A reader's view: rank 0 of 1, so the environment's `RANK` and
/// `WORLD_SIZE` cannot refuse it, that writes nothing and commits nothing.
fn reader(config: Config) -> Result<ShardedIo, CliError> {
    Ok(ShardedIo::open_reader(&config)?)
}

/// The sharded checkpoints of model `name` in the model folder `dir`, which
/// must exist.
fn open_folder(dir: &Path, name: &str) -> Result<ShardedIo, CliError> {
    if !dir.is_dir() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder");
        return Err(Error::Io { op: "open", path: dir.to_path_buf(), source }.into());
    }
    let mut config = Config::default();
    config.model.dir = dir.to_path_buf();
    config.model.name = name.to_string();
    config.remote = RemoteConfig::default();
    reader(config)
}

/// The sharded checkpoints of `config`'s model on its remote store (checked
/// by the caller: an existing folder, not a memory store).
pub fn open_store(config: &Config) -> Result<ShardedIo, CliError> {
    reader(config.clone())
}

/// What a global manifest is to its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A committed step (`manifests/`).
    Step,
    /// The global backup (`BACKUP`).
    Backup,
    /// A snapshot (`snapshots/`).
    Snapshot,
}

impl Role {
    fn word(self) -> &'static str {
        match self {
            Role::Step => "step",
            Role::Backup => "backup",
            Role::Snapshot => "snapshot",
        }
    }
}

/// One global manifest found, or why it could not be read.
pub struct Entry {
    pub role: Role,
    /// Its file, or its place on a remote store.
    pub source: String,
    pub manifest: Result<GlobalManifest, String>,
}

/// "1 rank", "3 ranks".
fn ranks(n: usize) -> String {
    if n == 1 {
        "1 rank".into()
    } else {
        format!("{n} ranks")
    }
}

/// How a checkpoint is named in verify's lines.
fn label(role: Role, m: &GlobalManifest) -> String {
    match role {
        Role::Step => format!("sharded step {} ({})", m.iterations, ranks(m.world_size)),
        Role::Backup => format!("sharded backup, step {} ({})", m.iterations, ranks(m.world_size)),
        Role::Snapshot => format!("sharded snapshot, step {} ({})", m.iterations, ranks(m.world_size)),
    }
}

/// The files `<digits>.json` of `dir`, sorted (none when it is missing).
fn numbered(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let stem = name.to_str().and_then(|n| n.strip_suffix(".json"));
            stem.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// A manifest file's bytes as a global manifest.
fn parse(bytes: &[u8]) -> Result<GlobalManifest, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

fn read_entry(role: Role, path: &Path) -> Entry {
    let manifest = std::fs::read(path)
        .map_err(|e| format!("could not read it: {e}"))
        .and_then(|b| parse(&b).map_err(|e| format!("not a global manifest of sharded checkpoints: {e}")));
    Entry { role, source: path.display().to_string(), manifest }
}

/// The global manifests of a sharded folder: the committed steps oldest
/// first, the backup, then the snapshots oldest first.
pub fn folder_entries(folder: &Path) -> Vec<Entry> {
    let mut entries: Vec<Entry> = numbered(&folder.join(Layout::MANIFESTS)).iter().map(|p| read_entry(Role::Step, p)).collect();
    let backup = folder.join(Layout::BACKUP);
    if backup.exists() {
        entries.push(read_entry(Role::Backup, &backup));
    }
    entries.extend(numbered(&folder.join(Layout::SNAPSHOTS)).iter().map(|p| read_entry(Role::Snapshot, p)));
    entries
}

/// The global manifests of a remote store, in the order of [`folder_entries`].
fn store_entries(io: &ShardedIo) -> Result<Vec<Entry>, CliError> {
    let (location, keys) = (io.location(), Layout::relative());
    let entry = |role, key: String, m: GlobalManifest| Entry { role, source: format!("{location}/{key}"), manifest: Ok(m) };
    let mut entries: Vec<Entry> = io.list()?.into_iter().map(|m| entry(Role::Step, keys.manifest(m.iterations).to_string(), m)).collect();
    if let Some(m) = io.backup()? {
        entries.push(entry(Role::Backup, keys.backup().to_string(), m));
    }
    entries.extend(io.snapshots()?.into_iter().map(|m| entry(Role::Snapshot, keys.snapshot(m.iterations).to_string(), m)));
    Ok(entries)
}

/// Verifies manifests, reading each set of shards once: a backup and a
/// snapshot are copies of a step's manifest, naming the same shards.
pub struct Checker<'a> {
    io: &'a ShardedIo,
    seen: HashMap<(u64, Vec<String>), Result<Vec<String>, String>>,
}

impl<'a> Checker<'a> {
    pub fn new(io: &'a ShardedIo) -> Checker<'a> {
        Checker { io, seen: HashMap::new() }
    }

    /// The problems of `m` (none: it verifies), or why it could not be checked.
    pub fn check(&mut self, m: &GlobalManifest) -> Result<Vec<String>, String> {
        let shards = m.shards.iter().map(|s| format!("{} {} {} {}", s.rank, s.key, s.size, s.crc32c)).collect();
        let io = self.io;
        self.seen.entry((m.iterations, shards)).or_insert_with(|| io.verify(m).map_err(|e| e.report().to_string())).clone()
    }
}

/// Check every entry, one line each (`<label>: ok`), or one line per
/// problem; when the newest committed step does not verify, say which
/// checkpoint is the newest that does. True when all verify.
fn verify_entries(name: &str, checker: &mut Checker<'_>, entries: &[Entry], out: &mut Out) -> bool {
    let mut all_ok = true;
    // (iterations, source) of the checkpoints that verify; the newest step and whether it does.
    let mut intact: Vec<(u64, &str)> = Vec::new();
    let mut newest_step: Option<(String, bool)> = None;
    for e in entries {
        let m = match &e.manifest {
            Ok(m) => m,
            Err(why) => {
                all_ok = false;
                say!(out, "sharded {} {}: FAILED: {why}", e.role.word(), e.source);
                if e.role == Role::Step {
                    newest_step = Some((format!("step manifest {}", e.source), false));
                }
                continue;
            }
        };
        let label = label(e.role, m);
        let ok = match checker.check(m) {
            Ok(problems) if problems.is_empty() => {
                say!(out, "{label}: ok");
                true
            }
            Ok(problems) => {
                for p in &problems {
                    say!(out, "{label}: DAMAGED: {p}");
                }
                false
            }
            Err(why) => {
                say!(out, "{label}: FAILED: {why}");
                false
            }
        };
        all_ok &= ok;
        if ok {
            intact.push((m.iterations, &e.source));
        }
        if e.role == Role::Step {
            newest_step = Some((format!("step {}", m.iterations), ok));
        }
    }
    if let Some((step, false)) = newest_step {
        // The newest; of equals, the first found (a committed step before its copies).
        match intact.iter().rev().max_by_key(|(n, _)| *n) {
            Some((n, source)) => {
                say!(out, "sharded `{name}`: the newest {step} does not verify; the newest that does is step {n} ({source})")
            }
            None => say!(out, "sharded `{name}`: the newest {step} does not verify, and no step, backup or snapshot does"),
        }
    }
    all_ok
}

/// `modelio verify DIR` for model `name`'s sharded checkpoints in `dir`:
/// every committed step, the backup and the snapshots. True when all verify.
pub fn verify_model(dir: &Path, name: &str, out: &mut Out) -> bool {
    let folder = folder_of(dir, name);
    say!(out, "sharded checkpoints of `{name}` in {}:", folder.display());
    let entries = folder_entries(&folder);
    let mut all_ok = true;
    if !entries.iter().any(|e| e.role == Role::Step) {
        say!(out, "MISSING sharded `{name}`: no committed step in {}", folder.join(Layout::MANIFESTS).display());
        all_ok = false;
    }
    if entries.is_empty() {
        return false;
    }
    let io = match open_folder(dir, name) {
        Ok(io) => io,
        Err(e) => {
            say!(out, "FAILED  sharded `{name}`: {}", e.report());
            return false;
        }
    };
    let mut checker = Checker::new(&io);
    verify_entries(name, &mut checker, &entries, out) && all_ok
}

/// `modelio verify DIR/<name>/sharded` (or `DIR/<name>`): that model's
/// sharded checkpoints; `None` when `path` is not such a folder.
pub fn verify_folder(path: &Path, out: &mut Out) -> Option<bool> {
    let (dir, name) = split(&folder_named(path)?).ok()?;
    Some(verify_model(&dir, &name, out))
}

/// `modelio verify FILE` for a global manifest file. True when it verifies.
pub fn verify_file(file: &Path, out: &mut Out) -> Result<bool, CliError> {
    let (file, m) = read_manifest_file(file)?;
    let (dir, name) = store_root(&file, &m)?;
    let io = open_folder(&dir, &name)?;
    let entry = Entry { role: role_of(&file), source: file.display().to_string(), manifest: Ok(m) };
    Ok(verify_entries(&name, &mut Checker::new(&io), &[entry], out))
}

/// Whether a file looks like JSON (a global manifest), not an archive.
pub fn is_json(file: &Path) -> bool {
    let mut head = [0u8; 64];
    let Ok(mut f) = std::fs::File::open(file) else { return false };
    let Ok(n) = f.read(&mut head) else { return false };
    head.get(..n).and_then(|h| h.iter().find(|b| !b.is_ascii_whitespace())) == Some(&b'{')
}

/// What the folders around a manifest file say it is.
fn role_of(file: &Path) -> Role {
    let parent = file.parent().and_then(Path::file_name);
    if file.file_name().is_some_and(|n| n == Layout::BACKUP) {
        Role::Backup
    } else if parent.is_some_and(|p| p == Layout::SNAPSHOTS) {
        Role::Snapshot
    } else {
        Role::Step
    }
}

/// A global manifest file (also `LATEST`, which names one), as an absolute
/// path and its manifest.
fn read_manifest_file(file: &Path) -> Result<(PathBuf, GlobalManifest), CliError> {
    let file = std::path::absolute(file).map_err(|e| Error::Io { op: "resolve", path: file.to_path_buf(), source: e })?;
    let bytes = std::fs::read(&file).map_err(|e| Error::Io { op: "read", path: file.clone(), source: e })?;
    match parse(&bytes) {
        Ok(m) => Ok((file, m)),
        Err(detail) => {
            // `LATEST` names the newest manifest when it was written.
            if let (Ok(latest), Some(folder)) = (serde_json::from_slice::<modelio::remote::Latest>(&bytes), file.parent()) {
                let named = folder.join(Layout::relative().manifest(latest.iterations).as_ref());
                let bytes = std::fs::read(&named).map_err(|e| Error::Io { op: "read", path: named.clone(), source: e })?;
                let m = parse(&bytes).map_err(|detail| CliError::NotAManifest { path: named.clone(), detail })?;
                return Ok((named, m));
            }
            Err(CliError::NotAManifest { path: file, detail })
        }
    }
}

/// The folder a manifest's shard keys are relative to, and the model's name
/// in them. A key is `<prefix>/<name>/sharded/steps/...`, relative to the
/// store; the manifest lies under that store's `<prefix>/<name>/sharded/`
/// folder, so the store is that folder less the key's leading part.
fn store_root(file: &Path, m: &GlobalManifest) -> Result<(PathBuf, String), CliError> {
    let not_found = |detail: String| CliError::ShardsNotFound { file: file.to_path_buf(), detail };
    let sharded = file
        .ancestors()
        .skip(1)
        .take(2)
        .find(|a| a.file_name().is_some_and(|n| n == Layout::FOLDER))
        .ok_or_else(|| not_found("it is not in a model's `<name>/sharded/` folder (or its manifests/ or snapshots/)".into()))?;
    let Some(first) = m.shards.first() else { return split(sharded) };
    let Some(leading) = Layout::root_of_shard_key(&first.key) else {
        return Err(not_found(format!("its shard key {} is not under `<name>/sharded/steps/`", first.key)));
    };
    let leading: Vec<&str> = leading.split('/').collect();
    let mut root = sharded.to_path_buf();
    for part in leading.iter().rev() {
        if root.file_name().is_none_or(|n| n != *part) || !root.pop() {
            return Err(not_found(format!(
                "its shards are under `{}/` of their store, but the manifest is not in a folder of that name",
                leading.join("/")
            )));
        }
    }
    let name = leading.len().checked_sub(2).and_then(|i| leading.get(i)).map_or_else(|| m.model.clone(), |n| n.to_string());
    Ok((root, name))
}

/// `modelio inspect` of a global manifest file, or of a sharded folder (its
/// newest committed step).
pub fn inspect(path: &Path, json: bool, out: &mut Out) -> Result<ExitCode, CliError> {
    let (file, m) = match folder_named(path) {
        Some(folder) if path.is_dir() => {
            let newest = numbered(&folder.join(Layout::MANIFESTS)).pop();
            let Some(file) = newest else {
                return Err(CliError::NoCheckpoints { location: folder.join(Layout::MANIFESTS).display().to_string() });
            };
            read_manifest_file(&file)?
        }
        _ => read_manifest_file(path)?,
    };
    let (dir, name) = store_root(&file, &m)?;
    let io = open_folder(&dir, &name)?;
    let checked = io.verify(&m);
    let damaged: Vec<String> = match &checked {
        Ok(problems) => problems.clone(),
        Err(e) => vec![format!("could not be checked: {}", e.report())],
    };
    let tensors = m.tensor_names();
    let tensor_bytes: u64 = m.shards.iter().flat_map(|s| &s.pieces).map(|p| p.data_len).sum();
    // Rows `[a, b)` of a piece whole past its first dimension (every
    // piece of a format 1 step), else `None`: a box of some other shape.
    let rows = |p: &modelio::sharded::Piece| {
        let r = p.region();
        let n = p.shape.first().copied().unwrap_or(1);
        let row_wide = !p.global_shape.is_empty() && p.shape.get(1..) == p.global_shape.get(1..);
        row_wide.then_some([r.offset[0], r.offset[0] + n])
    };
    if json {
        let shards: Vec<serde_json::Value> = m
            .shards
            .iter()
            .map(|s| serde_json::json!({"rank": s.rank, "key": s.key, "bytes": s.size, "crc32c": s.crc32c, "tensors": s.pieces.len()}))
            .collect();
        let tensors: Vec<serde_json::Value> = tensors
            .iter()
            .map(|t| {
                let pieces: Vec<serde_json::Value> = m
                    .shards
                    .iter()
                    .flat_map(|s| s.pieces.iter().filter(|p| &p.name == t).map(move |p| (s.rank, p)))
                    .map(|(rank, p)| {
                        serde_json::json!({"rank": rank, "rows": rows(p), "offset": p.region().offset, "shape": p.shape, "bytes": p.data_len})
                    })
                    .collect();
                let first = m.shards.iter().flat_map(|s| &s.pieces).find(|p| &p.name == t);
                serde_json::json!({
                    "name": t,
                    "dtype": first.map(|p| p.dtype.clone()),
                    "shape": first.map(|p| p.global_shape.clone()),
                    "pieces": pieces,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "sharded": true,
            "path": file,
            "name": m.model,
            "iterations": m.iterations,
            "world_size": m.world_size,
            "format": m.format,
            "created": m.created,
            "loss": m.loss,
            "lowest": m.lowest,
            "shards": shards,
            "tensors": tensors,
            "tensor_bytes": tensor_bytes,
            "verified": damaged.is_empty(),
            "damaged": damaged,
        });
        say!(out, "{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        let role = match role_of(&file) {
            Role::Step => "committed step",
            Role::Backup => "global backup",
            Role::Snapshot => "snapshot",
        };
        say!(
            out,
            "{}: sharded {role} of model `{}`, {} iterations, {}, format v{}, created {}",
            file.display(),
            m.model,
            m.iterations,
            ranks(m.world_size),
            m.format,
            m.created
        );
        match m.loss {
            Some(loss) => say!(out, "loss: {loss} (lowest so far {})", m.lowest),
            None => say!(out, "loss: none reported"),
        }
        say!(out, "shards:");
        for s in &m.shards {
            say!(out, "  rank {:<4} {:>12} bytes  {}", s.rank, s.size, s.key);
        }
        say!(out, "tensors:");
        for t in &tensors {
            let mut first = None;
            let mut pieces = Vec::new();
            for s in &m.shards {
                for p in s.pieces.iter().filter(|p| &p.name == t) {
                    first.get_or_insert(p);
                    pieces.push(match rows(p) {
                        _ if p.shape == p.global_shape => format!("rank {} whole", s.rank),
                        Some([a, b]) => format!("rank {} rows {a}..{b}", s.rank),
                        None => format!("rank {} box at {:?} of shape {:?}", s.rank, p.region().offset, p.shape),
                    });
                }
            }
            let (dtype, shape) = first.map_or((String::new(), String::new()), |p| (p.dtype.clone(), format!("{:?}", p.global_shape)));
            say!(out, "  {t:<40} {dtype:<5} {shape:<20} {}", pieces.join(", "));
        }
        if damaged.is_empty() {
            say!(out, "checksums: ok ({} shards, {} tensors verified)", m.shards.len(), tensors.len());
        } else {
            say!(out, "checksums: DAMAGED: {}", damaged.join("; "));
        }
    }
    Ok(if damaged.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `modelio snapshots DIR`: model `name`'s sharded snapshots and backup, as
/// rows (`"sharded": true`, `"kind"`: `snapshot` or `backup`); `None` when
/// the model has no sharded checkpoints in `dir`.
pub fn snapshot_rows(dir: &Path, name: &str) -> Option<Vec<serde_json::Value>> {
    let folder = folder_of(dir, name);
    if !is_sharded_folder(&folder) {
        return None;
    }
    let mut entries: Vec<Entry> = folder_entries(&folder).into_iter().filter(|e| e.role != Role::Step).collect();
    // Snapshots first, oldest first, then the backup.
    entries.sort_by_key(|e| e.role == Role::Backup);
    let io = open_folder(dir, name);
    let mut checker = io.as_ref().map(Checker::new).map_err(|e| e.report().to_string());
    let rows = entries
        .iter()
        .map(|e| {
            let mut row = serde_json::json!({"sharded": true, "kind": e.role.word(), "path": e.source});
            match &e.manifest {
                Ok(m) => {
                    let checked = match &mut checker {
                        Ok(c) => c.check(m),
                        Err(why) => Err(why.clone()),
                    };
                    row["iterations"] = m.iterations.into();
                    row["world_size"] = m.world_size.into();
                    row["created"] = m.created.clone().into();
                    row["loss"] = serde_json::json!(m.loss);
                    row["bytes"] = m.shards.iter().map(|s| s.size).sum::<u64>().into();
                    match checked {
                        Ok(problems) => {
                            row["verifies"] = problems.is_empty().into();
                            row["problems"] = problems.into();
                        }
                        Err(why) => {
                            row["verifies"] = false.into();
                            row["error"] = why.into();
                        }
                    }
                }
                Err(why) => {
                    row["verifies"] = false.into();
                    row["error"] = why.clone().into();
                }
            }
            row
        })
        .collect();
    Some(rows)
}

/// Print the rows of [`snapshot_rows`] under a line naming the folder.
pub fn print_snapshot_rows(dir: &Path, name: &str, rows: &[serde_json::Value], out: &mut Out) {
    let folder = folder_of(dir, name);
    if rows.is_empty() {
        say!(out, "no sharded snapshots or backup of `{name}` in {}", folder.display());
        return;
    }
    say!(out, "sharded snapshots and backup of `{name}` in {}:", folder.display());
    for r in rows {
        let path = r["path"].as_str().unwrap_or("");
        if let Some(error) = r["error"].as_str().filter(|_| r["iterations"].is_null()) {
            say!(out, "  {:<8} FAILED  {path}: {error}", r["kind"].as_str().unwrap_or(""));
            continue;
        }
        let status = if r["verifies"] == true { "ok     " } else { "DAMAGED" };
        say!(
            out,
            "  {:<8} {:>10} iterations  {:<8}  created {}  {:>12} bytes  {status}  {path}",
            r["kind"].as_str().unwrap_or(""),
            r["iterations"],
            ranks(r["world_size"].as_u64().unwrap_or(0) as usize),
            short_time(r["created"].as_str().unwrap_or("")),
            r["bytes"],
        );
    }
}

/// `modelio remote list --sharded`.
pub fn remote_list(config: &Config, json: bool, out: &mut Out) -> Result<ExitCode, CliError> {
    let io = open_store(config)?;
    let location = io.location();
    let entries = store_entries(&io)?;
    let latest = entries.iter().filter(|e| e.role == Role::Step).filter_map(|e| e.manifest.as_ref().ok()).map(|m| m.iterations).max();
    if json {
        let rows: Vec<serde_json::Value> = entries
            .iter()
            .filter_map(|e| {
                let m = e.manifest.as_ref().ok()?;
                Some(serde_json::json!({
                    "kind": e.role.word(),
                    "iterations": m.iterations,
                    "world_size": m.world_size,
                    "created": m.created,
                    "bytes": m.shards.iter().map(|s| s.size).sum::<u64>(),
                    "loss": m.loss,
                    "latest": e.role == Role::Step && Some(m.iterations) == latest,
                }))
            })
            .collect();
        say!(out, "{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        say!(out, "no sharded checkpoints at {location}");
        return Ok(ExitCode::SUCCESS);
    }
    let steps = entries.iter().filter(|e| e.role == Role::Step).count();
    say!(out, "{steps} sharded steps at {location}, oldest first (* = latest), then the backup and the snapshots:");
    for e in &entries {
        let Ok(m) = &e.manifest else { continue };
        let mark = if e.role == Role::Step && Some(m.iterations) == latest { '*' } else { ' ' };
        let loss = m.loss.map(|l| format!("  loss {l}")).unwrap_or_default();
        say!(
            out,
            "{mark} {:<8} {:>10} iterations  {:<8}  {}  {:>10.2} MiB{loss}",
            e.role.word(),
            m.iterations,
            ranks(m.world_size),
            short_time(&m.created),
            mib(m.shards.iter().map(|s| s.size).sum()),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `modelio remote verify --sharded [ITERATIONS | --all]`: the newest
/// committed step by default; a step, the backup or a snapshot by its
/// iterations; or every one.
pub fn remote_verify(config: &Config, which: Option<&str>, all: bool, out: &mut Out) -> Result<ExitCode, CliError> {
    let io = open_store(config)?;
    let location = io.location().to_string();
    let mut entries = store_entries(&io)?;
    if entries.is_empty() {
        return Err(CliError::NoCheckpoints { location });
    }
    if !all {
        let iterations = match which {
            Some(w) => {
                Some(w.trim().parse::<u64>().map_err(|_| CliError::NoShardedStep { which: w.to_string(), location: location.clone() })?)
            }
            None => None,
        };
        let wanted = |e: &Entry| e.manifest.as_ref().is_ok_and(|m| iterations.is_none_or(|n| m.iterations == n));
        // A step first (the newest when none is named), else the backup, else a snapshot.
        let at = match iterations {
            Some(_) => entries.iter().position(wanted),
            None => entries.iter().rposition(|e| e.role == Role::Step && wanted(e)),
        };
        let Some(at) = at else {
            return Err(match which {
                Some(w) => CliError::NoShardedStep { which: w.to_string(), location },
                None => CliError::NoCheckpoints { location: format!("{location}/manifests") },
            });
        };
        entries = vec![entries.swap_remove(at)];
    }
    let mut checker = Checker::new(&io);
    let ok = verify_entries(&config.model.name, &mut checker, &entries, out);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
