//! `modelio remote ...`: the checkpoints a trainer uploaded to its remote
//! tier (object storage), and the uploader's counters in a model folder.
//!
//! Where the remote is comes from a config file (`--config`, its `[remote]`
//! table and `model.name`) or from flags (`--url`, `--endpoint`, ...), which
//! override the file's values. Credentials come from the environment, as
//! for the trainer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Subcommand};
use modelio::folder::ModelPaths;
use modelio::remote::status::{RemoteStats, STATUS_SUFFIX};
use modelio::remote::{Remote, RemoteManifest};
use modelio::{Config, Error};

use crate::show::{mib, short_time};
use crate::{CliError, Out};

#[derive(Subcommand)]
pub enum RemoteCommand {
    /// List the checkpoints on the remote tier, oldest first (`*` marks the latest).
    List {
        /// List the sharded checkpoints (`<model>/sharded/`): the committed
        /// steps, the global backup and the snapshots.
        #[arg(long)]
        sharded: bool,
        /// Print JSON instead of text: an array, oldest first (`[]` when empty).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Where,
    },
    /// Download a checkpoint (default: the latest) into a model folder that
    /// does not hold the model yet; every object's size and CRC-32C are checked.
    Pull {
        /// A checkpoint id, upload id or iteration count (see `list`).
        checkpoint: Option<String>,
        /// The model folder to pull into (created if missing); it must not
        /// hold the model's archive or state file yet.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        at: Where,
    },
    /// Check a checkpoint (default: the latest) where it is: every object's
    /// size and CRC-32C, and the archive's tensors (exit 1 when damaged).
    Verify {
        /// A checkpoint id, upload id or iteration count (see `list`); with
        /// --sharded, the iteration count of a step, the backup or a snapshot.
        checkpoint: Option<String>,
        /// Verify every checkpoint (with --sharded: every committed step,
        /// the backup and the snapshots).
        #[arg(long, conflicts_with = "checkpoint")]
        all: bool,
        /// Verify sharded checkpoints (`<model>/sharded/`): every shard's size
        /// and CRC-32C, its tensors, and that the pieces cover every tensor.
        #[arg(long)]
        sharded: bool,
        #[command(flatten)]
        at: Where,
    },
    /// Show the uploader's counters a trainer wrote to `<dir>/<name>_remote.json`.
    Status {
        dir: PathBuf,
        /// The model; needed only when the folder holds several.
        #[arg(long)]
        name: Option<String>,
    },
}

/// Where the remote tier is.
#[derive(Args)]
pub struct Where {
    /// A modelio config file, or an application's file with a [modelio]
    /// table: its [remote] settings and model.name.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// remote.url: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///path.
    #[arg(long)]
    url: Option<String>,
    /// remote.endpoint: an S3-compatible server's address (http://host:port).
    #[arg(long)]
    endpoint: Option<String>,
    /// remote.allow_http: allow a plain http:// endpoint.
    #[arg(long)]
    allow_http: bool,
    /// remote.region (S3).
    #[arg(long)]
    region: Option<String>,
    /// model.name: the model whose checkpoints to use (default: the config's, else "model").
    #[arg(long, value_name = "MODEL")]
    name: Option<String>,
}

impl Where {
    /// The config file's settings (or the defaults) with the flags applied.
    fn config(&self) -> Result<Config, CliError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let r = &mut config.remote;
        if let Some(url) = &self.url {
            r.url.clone_from(url);
        }
        if let Some(endpoint) = &self.endpoint {
            r.endpoint.clone_from(endpoint);
        }
        if self.allow_http {
            r.allow_http = true;
        }
        if let Some(region) = &self.region {
            r.region.clone_from(region);
        }
        if let Some(name) = &self.name {
            config.model.name.clone_from(name);
        }
        if !config.remote.enabled() {
            return Err(CliError::NoRemote { config: self.config.clone() });
        }
        config.validate()?;
        Ok(config)
    }

    /// The config, refused where the command cannot read the store: a
    /// folder store that is not there (connecting would create it) or a
    /// memory store.
    fn reachable(&self) -> Result<Config, CliError> {
        let config = self.config()?;
        let url = &config.remote.url;
        // Connecting creates a missing folder store: a mistyped path would
        // read as an empty remote, and leave a folder behind.
        if let Some(path) = url.strip_prefix("file://") {
            if !Path::new(path).is_dir() {
                return Err(CliError::RemoteUnusable { url: url.clone(), why: format!("there is no folder {path}") });
            }
        }
        if url.starts_with("memory://") {
            let why = "a memory store lives inside the process that made it; the command cannot see a trainer's";
            return Err(CliError::RemoteUnusable { url: url.clone(), why: why.into() });
        }
        Ok(config)
    }

    /// Connect (no network traffic yet); the remote and the model's name.
    fn connect(&self) -> Result<(Remote, String), CliError> {
        let config = self.reachable()?;
        let remote = Remote::connect(&config.remote, &config.model.name)?;
        Ok((remote, config.model.name))
    }
}

pub fn run(command: RemoteCommand, out: &mut Out) -> Result<ExitCode, CliError> {
    match command {
        RemoteCommand::List { sharded: true, json, at } => crate::sharded::remote_list(&at.reachable()?, json, out),
        RemoteCommand::List { sharded: false, json, at } => list(&at, json, out),
        RemoteCommand::Pull { checkpoint, dir, at } => pull(&at, checkpoint.as_deref(), &dir, out),
        RemoteCommand::Verify { checkpoint, all, sharded: true, at } => {
            crate::sharded::remote_verify(&at.reachable()?, checkpoint.as_deref(), all, out)
        }
        RemoteCommand::Verify { checkpoint, all, sharded: false, at } => verify(&at, checkpoint.as_deref(), all, out),
        RemoteCommand::Status { dir, name } => status(&dir, name, out),
    }
}

/// The checkpoint `which` names, or the latest.
fn choose(remote: &Remote, which: Option<&str>) -> Result<RemoteManifest, CliError> {
    match which {
        Some(which) => Ok(remote.find(which)?),
        None => remote.latest()?.ok_or_else(|| CliError::NoCheckpoints { location: remote.location().to_string() }),
    }
}

fn list(at: &Where, json: bool, out: &mut Out) -> Result<ExitCode, CliError> {
    let (remote, _) = at.connect()?;
    let all = remote.list()?;
    if json {
        let latest = if all.is_empty() { None } else { remote.latest()?.map(|m| m.id()) };
        let rows: Vec<serde_json::Value> = all
            .iter()
            .map(|m| {
                let id = m.id();
                serde_json::json!({
                    "id": id,
                    "iterations": m.iterations,
                    "kind": m.kind,
                    "created": m.created,
                    "bytes": m.bytes(),
                    "with_optimizer": m.with_optimizer,
                    "upload": m.upload,
                    "latest": latest.as_deref() == Some(id.as_str()),
                })
            })
            .collect();
        say!(out, "{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        say!(out, "no checkpoints at {}", remote.location());
        return Ok(ExitCode::SUCCESS);
    }
    let latest = remote.latest()?.map(|m| m.id());
    say!(out, "{} checkpoints at {}, oldest first (* = latest):", all.len(), remote.location());
    for m in &all {
        let id = m.id();
        let mark = if latest.as_deref() == Some(id.as_str()) { '*' } else { ' ' };
        say!(
            out,
            "{mark} {:>10} iterations  {:<8}  {}  {:>10.2} MiB  optimizer {:<3}  {id}",
            m.iterations,
            m.kind,
            short_time(&m.created),
            mib(m.bytes()),
            if m.with_optimizer { "yes" } else { "no" },
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn pull(at: &Where, which: Option<&str>, dir: &Path, out: &mut Out) -> Result<ExitCode, CliError> {
    let (remote, name) = at.connect()?;
    let paths = ModelPaths::new(dir, &name);
    // The pull would replace these: a model's history is never overwritten.
    for file in [paths.archive(), paths.state()] {
        match std::fs::symlink_metadata(&file) {
            Ok(_) => return Err(CliError::PullWouldReplace { dir: dir.to_path_buf(), file }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Io { op: "inspect", path: file, source: e }.into()),
        }
    }
    let m = choose(&remote, which)?;
    remote.pull(&m, &paths)?;
    say!(
        out,
        "pulled {} ({} iterations, {}, created {}, {:.2} MiB) from {}",
        m.id(),
        m.iterations,
        m.kind,
        short_time(&m.created),
        mib(m.bytes()),
        remote.location()
    );
    say!(out, "  {}", paths.archive().display());
    say!(out, "  {}", paths.state().display());
    Ok(ExitCode::SUCCESS)
}

fn verify(at: &Where, which: Option<&str>, all: bool, out: &mut Out) -> Result<ExitCode, CliError> {
    let (remote, _) = at.connect()?;
    let checkpoints = if all { remote.list()? } else { vec![choose(&remote, which)?] };
    if checkpoints.is_empty() {
        return Err(CliError::NoCheckpoints { location: remote.location().to_string() });
    }
    let mut all_ok = true;
    // Every checkpoint is checked (no short circuit): the report names all damage.
    for m in &checkpoints {
        let id = m.id();
        match remote.verify(m) {
            Ok(problems) if problems.is_empty() => say!(out, "ok      {id} ({} iterations)", m.iterations),
            Ok(problems) => {
                all_ok = false;
                for p in &problems {
                    say!(out, "DAMAGED {id}: {p}");
                }
            }
            Err(e) => {
                all_ok = false;
                say!(out, "FAILED  {id}: {}", e.report());
            }
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The uploader's status file of model `name` in `dir`.
fn status_path(dir: &Path, name: &str) -> PathBuf {
    modelio::remote::status::status_path(&ModelPaths::new(dir, name))
}

/// The model `--name` names, or the only model in `dir` (a model folder's
/// files, or an uploader's status file).
fn status_model(dir: &Path, name: Option<String>) -> Result<String, CliError> {
    if let Some(name) = name {
        return Ok(name);
    }
    let mut names = modelio::folder::model_names(dir)?;
    let listed = std::fs::read_dir(dir).map_err(|e| Error::Io { op: "list", path: dir.to_path_buf(), source: e })?;
    for entry in listed.flatten() {
        let Ok(file) = entry.file_name().into_string() else { continue };
        if modelio::folder::durable::is_temp(&file) {
            continue;
        }
        if let Some(n) = file.strip_suffix(STATUS_SUFFIX).filter(|n| !n.is_empty()) {
            names.push(n.to_string());
        }
    }
    crate::only_name(dir, names)
}

/// How long ago `t` was, in words.
fn ago(t: SystemTime) -> String {
    let secs = SystemTime::now().duration_since(t).map_or(0, |d| d.as_secs());
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        7200..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

fn status(dir: &Path, name: Option<String>, out: &mut Out) -> Result<ExitCode, CliError> {
    // A folder that is not there is an error, not a model that uploaded nothing.
    std::fs::read_dir(dir).map_err(|e| Error::Io { op: "list", path: dir.to_path_buf(), source: e })?;
    let name = status_model(dir, name)?;
    let path = status_path(dir, &name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            say!(
                out,
                "model `{name}` has not uploaded anything from {}: there is no {} (its config has no [remote] url, \
                 or no upload has finished or failed yet)",
                dir.display(),
                path.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(Error::Io { op: "read", path, source: e }.into()),
    };
    // A JSON object; a field it lacks (an older uploader's) reads as zero or none.
    let bad = |detail: String| CliError::StatusFile { path: path.clone(), detail };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if !value.is_object() {
        return Err(bad("not a JSON object".into()));
    }
    let s: RemoteStats = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    let updated = std::fs::metadata(&path).and_then(|m| m.modified()).map(ago).unwrap_or_else(|_| "at an unknown time".into());
    say!(out, "remote tier of `{name}` in {} (updated {updated}):", dir.display());
    say!(out, "  location:        {}", if s.location.is_empty() { "unknown" } else { &s.location });
    say!(out, "  uploaded:        {}", s.uploaded);
    match (s.last_uploaded, &s.last_checkpoint) {
        (Some(n), Some(id)) => say!(out, "  last uploaded:   iteration {n} ({id})"),
        (Some(n), None) => say!(out, "  last uploaded:   iteration {n}"),
        (None, _) => say!(out, "  last uploaded:   none by this run"),
    }
    match s.pending {
        Some(n) => say!(out, "  pending:         iteration {n}"),
        None => say!(out, "  pending:         none"),
    }
    say!(out, "  skipped:         {} (replaced by a newer save while waiting)", s.skipped);
    say!(out, "  failed attempts: {}", s.failed_attempts);
    say!(out, "  abandoned:       {} (left for the next run to upload)", s.abandoned);
    match (&s.last_error, &s.last_error_at) {
        (Some(error), Some(at)) => say!(out, "  last error:      {error} (at {})", short_time(at)),
        (Some(error), None) => say!(out, "  last error:      {error}"),
        _ => say!(out, "  last error:      none"),
    }
    Ok(ExitCode::SUCCESS)
}
