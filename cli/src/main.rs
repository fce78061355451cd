//! The `modelio` command: inspect, verify, restore and list snapshots; list,
//! pull and verify the checkpoints of the remote tier (see [`remote`]);
//! inspect, verify and list sharded checkpoints (see [`sharded`]).
//!
//! Results go to standard output through [`Out`], which treats a reader that
//! went away (`modelio inspect FILE | head`) as the end of the output, not as
//! an error; errors go to standard error with their causes.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use modelio::archive::format::EXTENSION;
use modelio::archive::ArchiveReader;
use modelio::error::Report;
use modelio::folder::snapshot;
use modelio::folder::ModelPaths;
use modelio::Error;

#[derive(Parser)]
#[command(name = "modelio", version, about = "Inspect, verify and restore modelio archives, locally and on the remote tier")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what an archive holds and check its checksums (exit 1 when
    /// damaged); also a sharded checkpoint's global manifest (a file under
    /// `<name>/sharded/`, or that folder: its newest step) and its shards.
    Inspect {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every tensor checksum of an archive, or of every archive in a
    /// model folder (then also say what `load.fallback` would load instead of
    /// a damaged or missing archive, and check every sharded checkpoint:
    /// committed steps, backup and snapshots).
    Verify { path: PathBuf },
    /// Put a model's `.bk` backups back; the current files move to `<name>_archived_<timestamp>/`.
    Restore {
        dir: PathBuf,
        /// The model; needed only when the folder holds several.
        #[arg(long)]
        name: Option<String>,
    },
    /// List a model's snapshots with iterations, size and whether they verify;
    /// also its sharded snapshots and global backup.
    Snapshots {
        dir: PathBuf,
        /// The model; needed only when the folder holds several.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The remote tier (object storage): list, pull and verify its
    /// checkpoints, and show a model folder's upload status.
    Remote {
        #[command(subcommand)]
        command: remote::RemoteCommand,
    },
}

/// What the command line can fail with besides the library's errors.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Modelio(#[from] Error),

    #[error("folder {} holds several models ({}); choose one with --name NAME", dir.display(), names.join(", "))]
    SeveralModels { dir: PathBuf, names: Vec<String> },

    #[error(
        "no model found in {}: it holds no `<name>.{EXTENSION}`, `<name>.{EXTENSION}.bk` or `<name>_state.json`; \
         pass the folder that holds the model's files",
        dir.display()
    )]
    NoModel { dir: PathBuf },

    #[error("{} is not a global manifest of sharded checkpoints ({detail})", path.display())]
    NotAManifest { path: PathBuf, detail: String },

    #[error("cannot tell where the shards of {} are: {detail}", file.display())]
    ShardsNotFound { file: PathBuf, detail: String },

    #[error(
        "no sharded checkpoint of iteration `{which}` at {location} (a committed step, the backup or a snapshot); \
         `modelio remote list --sharded` lists them"
    )]
    NoShardedStep { which: String, location: String },

    #[error("could not write to standard output")]
    Stdout(#[source] std::io::Error),

    #[error("{}", no_remote(config.as_deref()))]
    NoRemote { config: Option<PathBuf> },

    #[error("remote.url {url} cannot be used here: {why}")]
    RemoteUnusable { url: String, why: String },

    #[error("no checkpoints at {location}")]
    NoCheckpoints { location: String },

    #[error(
        "folder {} already holds {}: a pull never replaces a model's files; pull into an empty folder \
         (--dir), or move the model's files aside first",
        dir.display(), file.display()
    )]
    PullWouldReplace { dir: PathBuf, file: PathBuf },

    #[error("could not read {} ({detail}): it is not a status file of modelio's uploader", path.display())]
    StatusFile { path: PathBuf, detail: String },
}

/// Where to say the remote tier is set.
fn no_remote(config: Option<&Path>) -> String {
    match config {
        Some(c) => {
            format!("config {} sets no remote tier (remote.url is empty): set url in its [remote] table, or pass --url URL", c.display())
        }
        None => "no remote tier given: pass --config FILE (a config with a [remote] url) or --url URL".into(),
    }
}

impl CliError {
    /// The error and its causes (see [`Error::report`]).
    fn report(&self) -> Report<'_> {
        Report::of(self)
    }

    /// 2 for a refusal to replace files (nothing was done), else 1.
    fn exit_code(&self) -> ExitCode {
        match self {
            CliError::PullWouldReplace { .. } => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

/// Print an error with its causes. A failing standard error is ignored: there
/// is nowhere left to say anything.
fn print_error(e: &CliError) {
    let _ = writeln!(std::io::stderr().lock(), "error: {}", e.report());
}

/// Print a note (progress, hints) to standard error; failures are ignored.
fn note(args: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// Standard output for results. When the reader goes away (a broken pipe)
/// the output ends there: later lines are dropped, and the command still
/// finishes and returns its usual exit code. Any other write error is kept
/// and reported once the command is done. Each line takes the stdout lock
/// only while it is written, so no other thread can be left waiting on it.
#[derive(Default)]
struct Out {
    closed: bool,
    failed: Option<std::io::Error>,
}

/// Write one line of results: `say!(out, "format", args...)`.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => { $out.line(format_args!($($arg)*)) };
}

// Declared after `say!`, which they use.
mod remote;
mod sharded;
mod show;

impl Out {
    fn line(&mut self, args: fmt::Arguments<'_>) {
        if self.closed {
            return;
        }
        if let Err(e) = writeln!(std::io::stdout().lock(), "{args}") {
            self.fail(e);
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        self.closed = true;
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            self.failed.get_or_insert(e);
        }
    }

    /// Flush what is buffered; the first write error other than a broken pipe.
    fn finish(mut self) -> Result<(), CliError> {
        if !self.closed {
            if let Err(e) = std::io::stdout().lock().flush() {
                self.fail(e);
            }
        }
        self.failed.map_or(Ok(()), |e| Err(CliError::Stdout(e)))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = Out::default();
    let result = run(cli.command, &mut out);
    let written = out.finish();
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            print_error(&e);
            e.exit_code()
        }
    };
    match written {
        Ok(()) => code,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, out: &mut Out) -> Result<ExitCode, CliError> {
    match command {
        Command::Inspect { file, json } => inspect(&file, json, out),
        Command::Verify { path } => verify(&path, out),
        Command::Restore { dir, name } => restore(&dir, name, out),
        Command::Snapshots { dir, name, json } => snapshots(&dir, name, json, out),
        Command::Remote { command } => remote::run(command, out),
    }
}

/// The model `--name` names, or the only model in `dir`.
fn model_name(dir: &Path, name: Option<String>) -> Result<String, CliError> {
    if let Some(name) = name {
        return Ok(name);
    }
    let mut names = modelio::folder::model_names(dir)?;
    match names.len() {
        0 => Err(CliError::NoModel { dir: dir.to_path_buf() }),
        1 => Ok(names.remove(0)),
        _ => Err(CliError::SeveralModels { dir: dir.to_path_buf(), names }),
    }
}

fn tensor_count(r: &ArchiveReader) -> usize {
    r.model.len() + r.optimizer.as_ref().map_or(0, |o| o.0.len())
}

/// The model of a live archive `<name>.mio`; `None` for backups and other
/// files (a restore hint for those would name the wrong model).
fn live_model(file: &Path) -> Option<String> {
    let file_name = file.file_name()?.to_str()?;
    file_name.strip_suffix(&format!(".{EXTENSION}")).filter(|n| !n.is_empty()).map(str::to_string)
}

/// The error a load of `file` would report for these damaged tensors.
fn checksum_error(file: &Path, damaged: &[String]) -> Error {
    let name = live_model(file).unwrap_or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    Error::Damaged { path: file.to_path_buf(), name, what: "checksum failed for tensors".into(), detail: damaged.join(", ") }
}

fn inspect(file: &Path, json: bool, out: &mut Out) -> Result<ExitCode, CliError> {
    // A global manifest (JSON) or a sharded folder; a shard is an archive.
    if (file.is_dir() && sharded::folder_named(file).is_some()) || (file.is_file() && sharded::is_json(file)) {
        return sharded::inspect(file, json, out);
    }
    let r = ArchiveReader::open(file)?;
    let damaged = r.verify();
    let m = &r.manifest;
    if json {
        let tensors: Vec<serde_json::Value> = r
            .model
            .iter()
            .map(|t| serde_json::json!({"name": t.meta.name, "dtype": t.meta.dtype, "shape": t.meta.shape, "bytes": t.len}))
            .collect();
        let optimizer = r.optimizer.as_ref().map(|(t, _)| t.len());
        let doc = serde_json::json!({
            "name": m.name,
            "iterations": m.iterations,
            "format_version": m.format_version,
            "created": m.created,
            "tensors": tensors,
            "optimizer": optimizer.is_some(),
            "optimizer_kind": m.optimizer.as_ref().map(|o| o.kind.clone()),
            "optimizer_tensors": optimizer.unwrap_or(0),
            "tensor_bytes": r.tensor_bytes(),
            "verified": damaged.is_empty(),
            "damaged": damaged,
        });
        say!(out, "{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        say!(
            out,
            "{}: model `{}`, {} iterations, format v{}, created {}",
            file.display(),
            m.name,
            m.iterations,
            m.format_version,
            m.created
        );
        for t in &r.model {
            say!(out, "  {:<40} {:<5} {:<20} {} bytes", t.meta.name, t.meta.dtype.name(), format!("{:?}", t.meta.shape), t.len);
        }
        match &m.optimizer {
            Some(o) => say!(out, "optimizer: {} ({} state tensors)", o.kind, o.tensors.len()),
            None => say!(out, "optimizer: none"),
        }
        if damaged.is_empty() {
            say!(out, "checksums: ok ({} tensors verified)", tensor_count(&r));
        } else {
            say!(out, "checksums: DAMAGED: {}", damaged.join(", "));
        }
    }
    if damaged.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    if live_model(file).is_some() {
        note(format_args!("error: {}", checksum_error(file, &damaged).report()));
    }
    Ok(ExitCode::FAILURE)
}

/// Open an archive and check every checksum; its iterations when intact.
fn check(file: &Path) -> Result<u64, Error> {
    let r = ArchiveReader::open(file)?;
    let damaged = r.verify();
    if damaged.is_empty() {
        Ok(r.manifest.iterations)
    } else {
        Err(checksum_error(file, &damaged))
    }
}

/// Verify one archive and print the outcome; a damaged live archive also
/// gets the library's error (with the restore hint) on standard error.
fn verify_one(file: &Path, out: &mut Out) -> Result<u64, Error> {
    let result = check(file);
    match &result {
        Ok(_) => {
            let tensors = ArchiveReader::open(file).map(|r| tensor_count(&r)).unwrap_or(0);
            say!(out, "ok      {} ({tensors} tensors)", file.display());
        }
        Err(e @ Error::Damaged { what, detail, .. }) => {
            say!(out, "DAMAGED {}: {what}: {detail}", file.display());
            if live_model(file).is_some() {
                note(format_args!("error: {}", e.report()));
            }
        }
        Err(e) => say!(out, "FAILED  {}: {}", file.display(), e.report()),
    }
    result
}

fn verify(path: &Path, out: &mut Out) -> Result<ExitCode, CliError> {
    if !path.is_dir() {
        let ok = if path.is_file() && sharded::is_json(path) { sharded::verify_file(path, out)? } else { verify_one(path, out).is_ok() };
        return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    let ext = format!(".{EXTENSION}");
    let bk = format!(".{EXTENSION}.bk");
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::Io { op: "list", path: path.to_path_buf(), source: e })?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !modelio::folder::durable::is_temp(n) && (n.ends_with(&ext) || n.ends_with(&bk)))
        .map(|n| path.join(n))
        .collect();
    files.sort();
    let models = modelio::folder::model_names(path)?;
    let sharded_models = sharded::models(path)?;
    if files.is_empty() && models.is_empty() && sharded_models.is_empty() {
        // A model's `<name>/sharded` folder (or `<name>` folder) itself.
        if let Some(ok) = sharded::verify_folder(path, out) {
            return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        return Err(Error::ModelNotFound { dir: path.to_path_buf(), name: "*".into(), file: format!("*.{EXTENSION}") }.into());
    }
    // Verify every file (no short circuit): the report names all damage.
    let results: BTreeMap<PathBuf, Result<u64, Error>> = files.iter().map(|f| (f.clone(), verify_one(f, out))).collect();
    let mut all_ok = results.values().all(Result::is_ok);
    for name in &models {
        let live = ModelPaths::new(path, name).archive();
        match results.get(&live) {
            Some(Ok(_)) => continue,
            Some(Err(_)) => {}
            None => {
                say!(out, "MISSING {}", live.display());
                all_ok = false;
            }
        }
        match fallback(path, name, &results) {
            Some((file, iterations)) => say!(out, "fallback: load.fallback would load {} (iteration {iterations})", file.display()),
            None => say!(out, "fallback: none: no backup or snapshot of `{name}` verifies, so load.fallback would fail"),
        }
    }
    for name in &sharded_models {
        all_ok &= sharded::verify_model(path, name, out);
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The archive a `load.fallback = true` load of model `name` in `dir` would
/// use instead of the live one, with its iterations: as the loader picks it,
/// the newest that verifies of `<name>.mio.bk`, then the snapshots by
/// iteration, newest first. Archives already checked are not read again.
fn fallback(dir: &Path, name: &str, checked: &BTreeMap<PathBuf, Result<u64, Error>>) -> Option<(PathBuf, u64)> {
    modelio::folder::restore::fallback_candidates(&ModelPaths::new(dir, name)).into_iter().find_map(|file| {
        let iterations = match checked.get(&file) {
            Some(result) => result.as_ref().ok().copied(),
            None => check(&file).ok(),
        };
        iterations.map(|n| (file, n))
    })
}

fn restore(dir: &Path, name: Option<String>, out: &mut Out) -> Result<ExitCode, CliError> {
    let name = model_name(dir, name)?;
    let r = modelio::folder::restore::restore(&ModelPaths::new(dir, &name))?;
    say!(out, "moved the current files of `{name}` to {}", r.archived.display());
    for f in &r.moved_logs {
        let session = f.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        say!(out, "moved the logs of session {session}, which the restored state file does not know, to {}", f.display());
    }
    for f in &r.restored {
        say!(out, "restored {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The model `--name` names, or the only model in `dir`, with archives or
/// sharded checkpoints.
fn any_model_name(dir: &Path, name: Option<String>) -> Result<String, CliError> {
    if let Some(name) = name {
        return Ok(name);
    }
    let mut names = modelio::folder::model_names(dir)?;
    names.extend(sharded::models(dir)?);
    only_name(dir, names)
}

/// The one name among `names` (duplicates aside), else an error naming `dir`
/// and what is there.
fn only_name(dir: &Path, mut names: Vec<String>) -> Result<String, CliError> {
    names.sort();
    names.dedup();
    match names.len() {
        0 => Err(CliError::NoModel { dir: dir.to_path_buf() }),
        1 => Ok(names.remove(0)),
        _ => Err(CliError::SeveralModels { dir: dir.to_path_buf(), names }),
    }
}

fn snapshots(dir: &Path, name: Option<String>, json: bool, out: &mut Out) -> Result<ExitCode, CliError> {
    let name = any_model_name(dir, name)?;
    let archive_name = ModelPaths::new(dir, &name).archive().file_name().map(|n| n.to_owned()).unwrap_or_default();
    // Snapshots a running trainer retires meanwhile are left out, not DAMAGED.
    let rows: Vec<serde_json::Value> = snapshot::survey(dir, &archive_name)
        .into_iter()
        .map(|s| serde_json::json!({"iterations": s.iterations, "path": s.path, "bytes": s.bytes, "verifies": s.verifies}))
        .collect();
    let sharded_rows = sharded::snapshot_rows(dir, &name);
    if json {
        let all: Vec<&serde_json::Value> = rows.iter().chain(sharded_rows.iter().flatten()).collect();
        say!(out, "{}", serde_json::to_string_pretty(&all).unwrap_or_default());
    } else {
        if rows.is_empty() && sharded_rows.is_none() {
            say!(out, "no snapshots of {}", dir.display());
        }
        for r in &rows {
            let status = if r["verifies"] == true { "ok     " } else { "DAMAGED" };
            say!(out, "{:>10} iterations  {:>12} bytes  {}  {}", r["iterations"], r["bytes"], status, r["path"].as_str().unwrap_or(""));
        }
        if let Some(sharded_rows) = &sharded_rows {
            sharded::print_snapshot_rows(dir, &name, sharded_rows, out);
        }
    }
    Ok(ExitCode::SUCCESS)
}
