//! The demo trainer: a small convolutional autoencoder on procedurally
//! generated images, saved, backed up and snapshotted by modelio.
//!
//! Run it again to resume (a new session; iterations continue). Ctrl-C stops
//! training with an exit save (optimizer included); a second Ctrl-C aborts.
//! Each batch is a pure function of the global iteration number, so a run
//! split in two ends bitwise equal to one uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use modelio::Work;
use modelio::{Adam, Config, ModelIo, OptimizerResume, Schedule};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "Train a small autoencoder with modelio checkpointing")]
struct Args {
    /// The TOML configuration: the demo's `[train]` and modelio's `[modelio]`.
    #[arg(long, default_value = "config/demo.toml")]
    config: PathBuf,
    /// Override `model.dir`.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Iterations to train in this run.
    #[arg(long, default_value_t = 300)]
    iterations: u64,
    /// Override `save.interval` (>= 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    save_interval: Option<u64>,
    /// Override `snapshot.interval`.
    #[arg(long)]
    snapshot_interval: Option<u64>,
    /// libtorch CPU threads (default: libtorch's choice).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1024))]
    threads: Option<i32>,
    /// Test hook: make every background write sleep this long first.
    #[arg(long, hide = true)]
    write_delay_ms: Option<u64>,
}

/// The demo's own settings: `[train]` in its config file, beside modelio's
/// `[modelio]` table.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TrainConfig {
    batch_size: u64,
    learning_rate: f64,
    seed: i64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig { batch_size: 16, learning_rate: 1e-3, seed: 0 }
    }
}

impl TrainConfig {
    /// The `[train]` table of `path`, checked.
    fn from_file(path: &std::path::Path) -> Result<TrainConfig, String> {
        #[derive(serde::Deserialize)]
        struct File {
            #[serde(default)]
            train: TrainConfig,
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
        let c = toml::from_str::<File>(&text).map_err(|e| format!("in [train]: {e}"))?.train;
        if c.batch_size == 0 || !(c.learning_rate.is_finite() && c.learning_rate > 0.0) {
            return Err("[train] needs batch_size >= 1 and a finite learning_rate > 0".into());
        }
        Ok(c)
    }
}

/// Encoder and decoder convolutions.
#[derive(Debug)]
struct AutoEncoder {
    enc1: nn::Conv2D,
    enc2: nn::Conv2D,
    dec1: nn::ConvTranspose2D,
    dec2: nn::ConvTranspose2D,
}

impl AutoEncoder {
    fn new(p: &nn::Path) -> Self {
        let c = nn::ConvConfig { stride: 2, padding: 1, ..Default::default() };
        let t = nn::ConvTransposeConfig { stride: 2, padding: 1, ..Default::default() };
        AutoEncoder {
            enc1: nn::conv2d(p / "enc1", 1, 8, 3, c),
            enc2: nn::conv2d(p / "enc2", 8, 16, 3, c),
            dec1: nn::conv_transpose2d(p / "dec1", 16, 8, 4, t),
            dec2: nn::conv_transpose2d(p / "dec2", 8, 1, 4, t),
        }
    }
}

impl Module for AutoEncoder {
    fn forward(&self, x: &Tensor) -> Tensor {
        let z = self.enc2.forward(&self.enc1.forward(x).relu()).relu();
        self.dec2.forward(&self.dec1.forward(&z).relu()).sigmoid()
    }
}

/// A pseudo-random number in [0, 1) from (iteration, index): splitmix64.
fn unit(iteration: u64, index: u64) -> f64 {
    let mut z = iteration.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The batch of global iteration `iteration`: soft discs on striped backgrounds, 32x32.
fn batch(iteration: u64, size: u64) -> Tensor {
    let grid = Tensor::arange(32, (Kind::Float, Device::Cpu)) / 31.0;
    let ys = grid.view([32, 1]);
    let xs = grid.view([1, 32]);
    let images: Vec<Tensor> = (0..size)
        .map(|b| {
            let r = |k: u64| unit(iteration, b * 8 + k);
            let (cx, cy, radius, freq) = (r(0), r(1), 0.1 + 0.25 * r(2), 2.0 + 6.0 * r(3));
            let d2 = (&xs - cx).square() + (&ys - cy).square();
            let disc = ((d2 * -1.0 + radius * radius) * 200.0).sigmoid();
            let stripes = ((&xs * freq + &ys * (freq * r(4))) * std::f64::consts::TAU).sin() * 0.25 + 0.25;
            (disc * 0.7 + stripes).clamp(0.0, 1.0).unsqueeze(0)
        })
        .collect();
    Tensor::stack(&images, 0)
}

/// What a call that failed had asked for.
#[derive(Debug, Clone, Copy)]
enum Asked {
    Save,
    Snapshot,
}

/// Train on through a transient failure (a full disk, a vanished folder):
/// say what failed and what happens next, and go on. Stop on anything else.
fn keep_going(result: modelio::Result<()>, asked: Asked, bar: &ProgressBar, summary: &mut Summary) -> modelio::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.is_retryable() => {
            let next = match (&e, asked) {
                // An earlier request's failure; this call still did its own work.
                (modelio::Error::Background { what: Work::Save, .. }, _) => {
                    "that save is lost; the next save (or the exit save) writes the model again"
                }
                (modelio::Error::Background { what: Work::Backup, .. }, _) => {
                    "that backup is not retried: the previous .bk files stay, and a later save with a lower average loss makes a new one"
                }
                (modelio::Error::Background { what: Work::Snapshot, .. }, _) => {
                    "that snapshot is not retried; later snapshots are taken as scheduled"
                }
                (modelio::Error::Background { .. }, _) => "it is not retried",
                // This call's own request failed.
                (_, Asked::Save) => "this save was not made; the next save (or the exit save) writes the model",
                (_, Asked::Snapshot) => {
                    summary.snapshots_refused += 1;
                    "this snapshot was not requested and is not retried; later snapshots are taken as scheduled"
                }
            };
            // `suspend`, not `println`: a hidden bar (stderr not a terminal) drops its println.
            bar.suspend(|| eprintln!("warning: {}; {next}; training goes on", e.report()));
            Ok(())
        }
        Err(e) => Err(e),
    }
}

struct Summary {
    /// Snapshots refused when requested (not counted by the handle's stats).
    snapshots_refused: u64,
    trained: u64,
    total: u64,
    last_loss: f64,
    stalls: Vec<Duration>,
    interrupted: bool,
    /// Failures reported only at the end of the run (by `finish`).
    unreported: usize,
}

/// The training loop, on the runtime: libtorch work runs on this thread,
/// saves await a free staging buffer instead of blocking it, and the signal
/// task runs on another worker.
async fn train(
    mut io: ModelIo,
    train: &TrainConfig,
    args: &Args,
    token: &CancellationToken,
) -> modelio::Result<(Summary, modelio::SaveStats)> {
    let config = io.config().clone();
    tch::manual_seed(train.seed);
    io.set_batch_size(train.batch_size);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = AutoEncoder::new(&vs.root());
    let mut opt = Adam::adamw(&vs, train.learning_rate, (0.9, 0.999), 1e-8, 0.01)?.with_fence(io.fence());
    let resumed = io.resume_async(&vs, Some(&mut opt)).await?;
    if let Some(loaded) = &resumed.loaded {
        if let Some(reason) = &loaded.reason {
            eprintln!("warning: {reason}");
            eprintln!("fallback: loaded {} instead (load.fallback = true)", loaded.path.display());
        }
        eprintln!("resumed from {} at iteration {}", loaded.path.display(), io.iterations());
        if let OptimizerResume::Missing(why) = &resumed.optimizer {
            eprintln!("warning: no optimizer state to resume ({why}); the optimizer starts afresh");
        }
    }
    let schedule = Schedule::from_config(&config);
    let bar = ProgressBar::new(args.iterations);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut summary = Summary {
        snapshots_refused: 0,
        trained: 0,
        total: io.iterations(),
        last_loss: 0.0,
        stalls: Vec::new(),
        interrupted: false,
        unreported: 0,
    };
    let mut last_stall = Duration::ZERO;
    for _ in 0..args.iterations {
        if token.is_cancelled() {
            summary.interrupted = true;
            break;
        }
        let x = batch(io.iterations() + 1, train.batch_size);
        let loss = net.forward_t(&x, true).mse_loss(&x, tch::Reduction::Mean);
        opt.zero_grad();
        loss.backward();
        opt.step()?;
        let loss = loss.double_value(&[]);
        io.record(loss);
        let iteration = io.iterations();
        if schedule.save_at(iteration) {
            let started = std::time::Instant::now();
            // Committed in the background; a failure reaches the next call.
            let saved = io.save_async(&vs, Some(&opt)).await.map(drop);
            last_stall = started.elapsed();
            summary.stalls.push(last_stall);
            keep_going(saved, Asked::Save, &bar, &mut summary)?;
        }
        if schedule.snapshot_at(iteration) {
            keep_going(io.snapshot(), Asked::Snapshot, &bar, &mut summary)?;
        }
        summary.trained += 1;
        summary.total = iteration;
        summary.last_loss = loss;
        bar.inc(1);
        bar.set_message(format!("iteration {iteration} loss {loss:.5} last save stall {:.3} ms", last_stall.as_secs_f64() * 1e3));
    }
    bar.finish_and_clear();
    let (fence_wait, fence_waits) = io.fence().waited();
    // The exit save, then every actor drains.
    let finished = io.finish(&vs, Some(&opt)).await?;
    let committed = &finished.exit_save;
    let on_disk = match std::fs::metadata(&committed.path) {
        Ok(m) => format!("{} bytes on disk", m.len()),
        Err(e) => format!("size on disk unknown: {e}"),
    };
    eprintln!(
        "exit save: {} (iteration {}; {on_disk}, {} bytes of tensors); optimizer steps waited {} times for save copies, {:.3} ms in all",
        committed.path.display(),
        committed.iterations,
        committed.bytes,
        fence_waits,
        fence_wait.as_secs_f64() * 1e3
    );
    // Backups and snapshots that failed near the end: reported here, once.
    for e in &finished.unreported {
        eprintln!("warning: {}; it is not retried (reported at the end of the run)", e.report());
    }
    summary.unreported = finished.unreported.len();
    Ok((summary, finished.stats))
}

/// The demo's log file: the first write that fails is reported on standard
/// error once; later failures are only counted, never flood the terminal
/// (a full disk fails every log line). Writing goes on being tried.
struct LogFile {
    file: std::fs::File,
    path: PathBuf,
    lost: AtomicU64,
}

impl LogFile {
    fn report_lost(&self, e: &std::io::Error) {
        if self.lost.fetch_add(1, Ordering::Relaxed) == 0 {
            eprintln!(
                "warning: could not write the log {}: {e}; log lines that cannot be written are dropped \
                 and counted at the end, not reported one by one",
                self.path.display()
            );
        }
    }
}

impl std::io::Write for &LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    /// One log line: written whole, or counted as lost.
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Err(e) = (&self.file).write_all(buf) {
            self.report_lost(&e);
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Err(e) = (&self.file).flush() {
            self.report_lost(&e);
        }
        Ok(())
    }
}

fn init_logging(io: &ModelIo) -> Option<Arc<LogFile>> {
    let session = io.state().sessions.last()?.id.clone();
    let dir = io.model_dir().join(format!("{}_logs", io.name())).join(session);
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join("train.log");
    let file = std::fs::File::create(&path).ok()?;
    let log = Arc::new(LogFile { file, path, lost: AtomicU64::new(0) });
    tracing_subscriber::fmt().with_writer(log.clone()).with_ansi(false).with_env_filter("modelio=info").try_init().ok()?;
    Some(log)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::FAILURE
        }
    }
}

/// A path as a shell word: as it is when that is safe, else single-quoted.
fn shell_word(path: &Path) -> String {
    let s = path.display().to_string();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+,:@%".contains(c)) {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Where the run left its files, and the commands that look at them.
fn print_where(dir: &Path, name: &str, log: Option<&LogFile>) {
    let archive = dir.join(format!("{name}.mio"));
    let backup = dir.join(format!("{name}.mio.bk"));
    let mut snapshots = modelio::folder::snapshot::list(dir);
    snapshots.sort();
    println!("model: {} (state {}_state.json, logs {}_logs/)", archive.display(), name, name);
    if backup.exists() {
        println!("backup: {} (the save with the lowest average loss)", backup.display());
    }
    match snapshots.last() {
        Some((_, newest)) => println!("snapshots: {} beside the model folder, the newest {}", snapshots.len(), newest.display()),
        None => println!("snapshots: none yet (snapshot.interval in the config)"),
    }
    if let Some(log) = log {
        println!("log: {}", log.path.display());
    }
    let (dir, name) = (shell_word(dir), shell_word(Path::new(name)));
    println!("look at them (in the repo root; `cargo install --path cli` installs the same command as `modelio`):");
    println!("  cargo modelio inspect {}", shell_word(&archive));
    println!("  cargo modelio verify {dir}");
    println!("  cargo modelio snapshots {dir} --name {name}");
    if backup.exists() {
        println!("and to put the .bk backups back (the current files move aside first):");
        println!("  cargo modelio restore {dir} --name {name}");
    }
}

async fn run() -> modelio::Result<ExitCode> {
    let args = Args::parse();
    let mut config = Config::from_file(&args.config)?;
    let train_config = match TrainConfig::from_file(&args.config) {
        Ok(t) => t,
        Err(message) => return Err(modelio::Error::ConfigParse { path: args.config.clone(), message }),
    };
    if let Some(d) = &args.model_dir {
        config.model.dir = d.clone();
    }
    if let Some(n) = args.save_interval {
        config.save.interval = n;
    }
    if let Some(n) = args.snapshot_interval {
        config.snapshot.interval = n;
    }
    config.validate()?;
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    // First SIGINT/SIGTERM: the loop ends with its exit save; second: abort.
    let token = modelio::signals::cancel_on_signals()?;

    let mut io = ModelIo::open_async(config).await?;
    if let Some(ms) = args.write_delay_ms {
        io.set_write_delay(Duration::from_millis(ms));
    }
    io.set_model_config(serde_json::json!({"model": "conv-autoencoder", "image": [1, 32, 32]}));
    if let Some(others) = io.multiple_models_in_folder() {
        eprintln!("note: {} also holds other models: {}", io.model_dir().display(), others.join(", "));
    }
    let log = init_logging(&io);
    let (dir, name) = (io.model_dir().to_path_buf(), io.name().to_string());
    let (summary, stats) = train(io, &train_config, &args, &token).await?;
    let max_stall = summary.stalls.iter().max().copied().unwrap_or_default();
    // Backups and snapshots that failed in the background (those reported at
    // the end included), and snapshots refused when requested.
    let failed_other = stats.failed_other + summary.snapshots_refused;
    println!(
        "{}trained {} iterations (total {}), last loss {:.5}; saves: {} committed, {} skipped, {} failed; \
         backups and snapshots: {} failed; trainer stall per save: max {:.3} ms",
        if summary.interrupted { "interrupted: " } else { "" },
        summary.trained,
        summary.total,
        summary.last_loss,
        stats.committed,
        stats.skipped,
        stats.failed,
        failed_other,
        max_stall.as_secs_f64() * 1e3,
    );
    print_where(&dir, &name, log.as_deref());
    let lost = log.as_ref().map_or(0, |l| l.lost.load(Ordering::Relaxed));
    if let Some(log) = log.as_ref().filter(|_| lost > 0) {
        eprintln!("warning: {lost} log lines could not be written to {}", log.path.display());
    }
    if failed_other > 0 || summary.unreported > 0 {
        let what = match failed_other {
            0 => format!("{} background failures were reported at the end of the run", summary.unreported),
            n => format!("{n} backups or snapshots failed"),
        };
        eprintln!("error: {what} (the warnings above say which and why); the exit save is committed, but not everything this run was asked to keep was kept");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
