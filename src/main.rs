//! The `modelio` command: inspect, verify, restore and list snapshots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use modelio::archive::ArchiveReader;
use modelio::folder::ModelPaths;
use modelio::format::EXTENSION;
use modelio::{snapshot, Error};

#[derive(Parser)]
#[command(name = "modelio", version, about = "Inspect, verify and restore modelio archives")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what an archive holds.
    Inspect {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every tensor checksum of an archive, or of every archive in a model folder.
    Verify { path: PathBuf },
    /// Put a model's `.bk` backups back; the current files move to `<name>_archived_<timestamp>/`.
    Restore {
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// List a model's snapshots with iterations, size and whether they verify.
    Snapshots {
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Measure save stall, write and load throughput, memory and training
    /// throughput against their references, on the disk of `--dir`.
    Bench {
        /// Model + optimizer state size in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// A folder on the disk to measure.
        #[arg(long, default_value = "target/bench-dir")]
        dir: PathBuf,
        /// Repetitions per figure (medians are reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// "cpu" or "cuda".
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Training steps per throughput run.
        #[arg(long, default_value_t = 100)]
        steps: u64,
        /// Save every this many steps in the training-throughput run.
        #[arg(long, default_value_t = 25)]
        save_every: u64,
        /// JSON of the Python peers' figures to merge (from bench/peers.py).
        #[arg(long)]
        peers: Option<PathBuf>,
        /// Write every figure as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { file, json } => inspect(&file, json),
        Command::Verify { path } => verify(&path),
        Command::Restore { dir, name } => restore(&dir, &name),
        Command::Snapshots { dir, name, json } => snapshots(&dir, &name, json),
        Command::Bench { size_mib, dir, reps, device, steps, save_every, peers, json } => {
            bench(size_mib, dir, reps, &device, steps, save_every, peers.as_deref(), json.as_deref())
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn inspect(file: &Path, json: bool) -> Result<ExitCode, Error> {
    let r = ArchiveReader::open(file)?;
    let m = &r.manifest;
    let tensors: Vec<serde_json::Value> = r
        .model
        .iter()
        .map(|t| serde_json::json!({"name": t.meta.name, "dtype": t.meta.dtype, "shape": t.meta.shape, "bytes": t.len}))
        .collect();
    let optimizer = r.optimizer.as_ref().map(|(t, _)| t.len());
    if json {
        let out = serde_json::json!({
            "name": m.name,
            "iterations": m.iterations,
            "format_version": m.format_version,
            "created": m.created,
            "tensors": tensors,
            "optimizer": optimizer.is_some(),
            "optimizer_kind": m.optimizer.as_ref().map(|o| o.kind.clone()),
            "optimizer_tensors": optimizer.unwrap_or(0),
            "tensor_bytes": r.tensor_bytes(),
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        println!("{}: model `{}`, {} iterations, format v{}, created {}", file.display(), m.name, m.iterations, m.format_version, m.created);
        for t in &r.model {
            println!("  {:<40} {:<5} {:<20} {} bytes", t.meta.name, t.meta.dtype.name(), format!("{:?}", t.meta.shape), t.len);
        }
        match &m.optimizer {
            Some(o) => println!("optimizer: {} ({} state tensors)", o.kind, o.tensors.len()),
            None => println!("optimizer: none"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Verify one archive; prints its damaged parts. Returns whether it is intact.
fn verify_one(file: &Path) -> bool {
    match ArchiveReader::open(file) {
        Ok(r) => {
            let damaged = r.verify();
            if damaged.is_empty() {
                println!("ok      {} ({} tensors)", file.display(), r.model.len() + r.optimizer.as_ref().map_or(0, |o| o.0.len()));
                true
            } else {
                println!("DAMAGED {}: tensors {}", file.display(), damaged.join(", "));
                false
            }
        }
        Err(e) => {
            println!("DAMAGED {}: {e}", file.display());
            false
        }
    }
}

fn verify(path: &Path) -> Result<ExitCode, Error> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let ext = format!(".{EXTENSION}");
        let bk = format!(".{EXTENSION}.bk");
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::Io { op: "list", path: path.to_path_buf(), source: e })?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !modelio::durable::is_temp(n) && (n.ends_with(&ext) || n.ends_with(&bk)))
            .map(|n| path.join(n))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::ModelNotFound { dir: path.to_path_buf(), name: "*".into(), file: format!("*.{EXTENSION}") });
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    // Verify every file (no short circuit): the report names all damage.
    let results: Vec<bool> = files.iter().map(|f| verify_one(f)).collect();
    let all_ok = results.iter().all(|&ok| ok);
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn restore(dir: &Path, name: &str) -> Result<ExitCode, Error> {
    let r = modelio::restore::restore(&ModelPaths::new(dir, name))?;
    println!("moved the current files of `{name}` to {}", r.archived.display());
    for f in &r.restored {
        println!("restored {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn snapshots(dir: &Path, name: &str, json: bool) -> Result<ExitCode, Error> {
    let mut list = snapshot::list(dir);
    list.sort_by_key(|(n, _)| *n);
    let archive_name = ModelPaths::new(dir, name).archive().file_name().map(|n| n.to_owned()).unwrap_or_default();
    let rows: Vec<serde_json::Value> = list
        .iter()
        .map(|(n, path)| {
            let size: u64 = std::fs::read_dir(path).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
            let verifies = ArchiveReader::open(&path.join(&archive_name)).map(|r| r.verify().is_empty()).unwrap_or(false);
            serde_json::json!({"iterations": n, "path": path, "bytes": size, "verifies": verifies})
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
    } else if rows.is_empty() {
        println!("no snapshots of {}", dir.display());
    } else {
        for r in &rows {
            println!("{:>10} iterations  {:>12} bytes  {}  {}", r["iterations"], r["bytes"], if r["verifies"] == true { "ok     " } else { "DAMAGED" }, r["path"].as_str().unwrap_or(""));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn bench(size_mib: u64, dir: PathBuf, reps: usize, device: &str, steps: u64, save_every: u64, peers: Option<&Path>, json: Option<&Path>) -> Result<ExitCode, Error> {
    let device = match device {
        "cpu" => tch::Device::Cpu,
        "cuda" if tch::Cuda::is_available() => tch::Device::Cuda(0),
        "cuda" => {
            return Err(Error::ConfigValue { key: "--device".into(), value: "cuda".into(), allowed: "cpu (no CUDA device is available)".into() })
        }
        other => return Err(Error::ConfigValue { key: "--device".into(), value: other.into(), allowed: "cpu or cuda".into() }),
    };
    if save_every == 0 {
        return Err(Error::ConfigValue { key: "--save-every".into(), value: "0".into(), allowed: "an integer >= 1".into() });
    }
    let opts = modelio::bench::BenchOptions { size_mib, dir, reps, device, steps, save_every };
    eprintln!("measuring a {size_mib} MiB state on {device:?} in {} ({reps} repetitions each)...", opts.dir.display());
    let mut report = modelio::bench::run(&opts)?;
    if let Some(p) = peers {
        let text = std::fs::read_to_string(p).map_err(|e| Error::Io { op: "read", path: p.to_path_buf(), source: e })?;
        let v: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| Error::ConfigParse { path: p.to_path_buf(), message: e.to_string() })?;
        for (k, v) in v {
            if let Some(x) = v.as_f64() {
                report.insert(k, x);
            }
        }
    }
    let rows = modelio::bench::table(&report);
    println!("{:<40} {:>12} {:>12} {:>10} {:>12} {:>6}", "figure", "modelio", "reference", "ratio", "target", "holds");
    for r in &rows {
        println!("{:<40} {:>12} {:>12} {:>10} {:>12} {:>6}", r[0], r[1], r[2], r[3], r[4], r[5]);
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        modelio::durable::commit_bytes(path, text.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
