//! The demo trainer: a small convolutional autoencoder on procedurally
//! generated images, saved, backed up and snapshotted by modelio.
//!
//! Run it again to resume (a new session; iterations continue). Ctrl-C stops
//! training with an exit save (optimizer included); a second Ctrl-C aborts.
//! Each batch is a pure function of the global iteration number, so a run
//! split in two ends bitwise equal to one uninterrupted run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
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

/// Train on through a transient failure (a full disk, a vanished folder):
/// say so and go on; the next save may succeed. Stop on anything else.
fn keep_going(result: modelio::Result<()>, bar: &ProgressBar, summary: &mut Summary) -> modelio::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.is_retryable() => {
            summary.failures += 1;
            // `suspend`, not `println`: a hidden bar (stderr not a terminal) drops its println.
            bar.suspend(|| eprintln!("warning: {}; training goes on and the next save will try again", e.report()));
            Ok(())
        }
        Err(e) => Err(e),
    }
}

struct Summary {
    failures: u64,
    trained: u64,
    total: u64,
    last_loss: f64,
    stalls: Vec<Duration>,
    interrupted: bool,
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
    let mut summary = Summary { failures: 0, trained: 0, total: io.iterations(), last_loss: 0.0, stalls: Vec::new(), interrupted: false };
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
            keep_going(saved, &bar, &mut summary)?;
        }
        if schedule.snapshot_at(iteration) {
            keep_going(io.snapshot(), &bar, &mut summary)?;
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
    eprintln!(
        "exit save: {} ({} bytes, iteration {}); optimizer steps waited {} times for save copies, {:.3} ms in all",
        committed.path.display(),
        committed.bytes,
        committed.iterations,
        fence_waits,
        fence_wait.as_secs_f64() * 1e3
    );
    Ok((summary, finished.stats))
}

fn init_logging(io: &ModelIo) -> Option<()> {
    let session = io.state().sessions.last()?.id.clone();
    let dir = io.model_dir().join(format!("{}_logs", io.name())).join(session);
    std::fs::create_dir_all(&dir).ok()?;
    let file = std::fs::File::create(dir.join("train.log")).ok()?;
    tracing_subscriber::fmt().with_writer(Arc::new(file)).with_ansi(false).with_env_filter("modelio=info").try_init().ok()
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.report());
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> modelio::Result<()> {
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
    init_logging(&io);
    let (summary, stats) = train(io, &train_config, &args, &token).await?;
    let max_stall = summary.stalls.iter().max().copied().unwrap_or_default();
    println!(
        "{}trained {} iterations (total {}), last loss {:.5}; saves: {} committed, {} skipped, {} failed; trainer stall per save: max {:.3} ms",
        if summary.interrupted { "interrupted: " } else { "" },
        summary.trained,
        summary.total,
        summary.last_loss,
        stats.committed,
        stats.skipped,
        stats.failed,
        max_stall.as_secs_f64() * 1e3,
    );
    Ok(())
}
