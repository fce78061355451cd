//! `make bench`: save stall, write and load throughput, memory and training
//! throughput, each side by side with its reference measured in the same run,
//! on the disk of `--dir`; and the remote tier's upload throughput and
//! training throughput against an S3 server on loopback (`.tools/bin/s3s-fs`;
//! skipped without it). Python peers' figures (bench/peers.py) are merged
//! from `--peers`.

mod bench;
mod cpu;
mod s3;
#[cfg(feature = "remote")]
mod sharded;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use modelio::Error;

#[derive(Parser)]
#[command(name = "bench", about = "Measure modelio against its references")]
struct Args {
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
    /// Save every this many steps in the training-throughput run (>= 1).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..))]
    save_every: u64,
    /// JSON of the Python peers' figures to merge (from bench/peers.py).
    #[arg(long)]
    peers: Option<PathBuf>,
    /// Write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure only one group of figures.
    #[arg(long, value_enum)]
    only: Option<bench::Phase>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> modelio::Result<()> {
    let device = match args.device.as_str() {
        "cpu" => tch::Device::Cpu,
        "cuda" if tch::Cuda::is_available() => tch::Device::Cuda(0),
        "cuda" => {
            return Err(Error::Argument {
                arg: "--device".into(),
                value: "cuda".into(),
                allowed: "cpu (no CUDA device is available)".into(),
            })
        }
        other => return Err(Error::Argument { arg: "--device".into(), value: other.into(), allowed: "cpu or cuda".into() }),
    };
    let opts = bench::BenchOptions {
        size_mib: args.size_mib,
        dir: args.dir,
        reps: args.reps,
        device,
        steps: args.steps,
        save_every: args.save_every,
        only: args.only,
    };
    eprintln!("measuring a {} MiB state on {device:?} in {} ({} repetitions each)...", args.size_mib, opts.dir.display(), opts.reps);
    let mut report = bench::run(&opts)?;
    if let Some(p) = &args.peers {
        let text = std::fs::read_to_string(p).map_err(|source| Error::Io { op: "read", path: p.clone(), source })?;
        let v: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| Error::ConfigParse { path: p.clone(), message: e.to_string() })?;
        for (k, v) in v {
            if let Some(x) = v.as_f64() {
                report.insert(k, x);
            }
        }
    }
    let rows = bench::table(&report);
    println!("{:<44} {:>12} {:>12} {:>10} {:>12} {:>6}", "figure", "modelio", "reference", "ratio", "target", "holds");
    for r in &rows {
        println!("{:<44} {:>12} {:>12} {:>10} {:>12} {:>6}", r[0], r[1], r[2], r[3], r[4], r[5]);
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| Error::ConfigParse { path: path.clone(), message: e.to_string() })?;
        modelio::folder::durable::commit_bytes(path, text.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
