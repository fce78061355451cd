//! Speed and memory, each figure side by side with its
//! reference measured in the same run (medians of several repetitions).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use modelio::archive::{commit_archive, ArchiveReader};
use modelio::config::{Config, CpuCopy, OptimizerPolicy};
use modelio::{Error, Result};

/// Attach a path and operation to an `io::Result`, as the library's errors do.
pub trait IoContext<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io { op, path: path.to_path_buf(), source })
    }
}
use modelio::archive::format::{OptimizerRef, TensorRef};
use modelio::tensors::{byte_len, dtype_of, shape_of};
use modelio::ModelIo;
use modelio::{Adam, Optimizer};

use crate::cpu::CpuClock;
use crate::s3::{self, S3Server};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Model + optimizer state size in MiB.
    pub size_mib: u64,
    /// Folder on the disk to measure (created; bench files are removed after).
    pub dir: PathBuf,
    /// Repetitions per measurement (medians are reported).
    pub reps: usize,
    pub device: Device,
    /// Training steps per throughput run, and the save interval while saving.
    pub steps: u64,
    pub save_every: u64,
    /// Only one group of figures (a quick look while changing them).
    pub only: Option<Phase>,
}

/// A group of figures that `--only` measures alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// Background CPU per GiB saved.
    Cpu,
    /// Save stalls and write throughput against their references.
    Save,
    /// Loads against a raw read of the same archive.
    Load,
    /// Training throughput without and with saves.
    Train,
    /// Sharded saves' stalls and memory, and a sharded load against a raw
    /// read (CPU state; built with the `remote` feature).
    Sharded,
}

/// Figures by name (the keys of `target/bench.json`).
pub type Report = BTreeMap<String, f64>;

/// The median (of an even count, the mean of the middle two; 0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A synthetic model whose tensors mix large matrices, medium ones and small
/// vectors, with AdamW state (twice the model), about `bytes` in all.
pub fn synthetic_state(bytes: u64, device: Device) -> Result<(VarStore, Adam)> {
    let vs = VarStore::new(device);
    let model_bytes = bytes / 3;
    let pattern: [&[i64]; 6] = [&[4096, 4096], &[4096], &[1024, 4096], &[1024], &[1024, 1024], &[1024]];
    let mut total = 0u64;
    let mut i = 0usize;
    while total < model_bytes {
        let mut shape = pattern[i % pattern.len()].to_vec();
        let size = 4 * shape.iter().product::<i64>() as u64;
        if total + size > model_bytes {
            shape = vec![((model_bytes - total) / 4).max(1) as i64];
        }
        let t = (vs.root() / format!("layer{}", i / 6)).var(&format!("p{}", i % 6), &shape, nn::Init::Uniform { lo: -0.1, up: 0.1 });
        total += byte_len(&t) as u64;
        i += 1;
    }
    let mut opt = Adam::adamw(&vs, 1e-4, (0.9, 0.999), 1e-8, 0.01)?;
    // One real step so the optimizer state holds real values.
    let loss =
        vs.trainable_variables().iter().map(|t| t.square().sum(Kind::Float)).fold(Tensor::from(0f32).to_device(device), |a, b| a + b);
    opt.zero_grad();
    loss.backward();
    opt.step()?;
    Ok((vs, opt))
}

/// All tensors of the state, model then optimizer, on the CPU.
type Named = Vec<(String, Tensor)>;

fn cpu_tensors(vs: &VarStore, opt: &Adam) -> Result<(Named, Named)> {
    let mut model: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    model.sort_by(|a, b| a.0.cmp(&b.0));
    let to_cpu = |v: Vec<(String, Tensor)>| -> Result<Vec<(String, Tensor)>> {
        v.into_iter().map(|(n, t)| Ok((n, t.f_to_device(Device::Cpu)?.f_contiguous()?))).collect()
    };
    Ok((to_cpu(model)?, to_cpu(opt.state_tensors())?))
}

/// Bytes of a tensor from `cpu_tensors` (contiguous, on the CPU).
fn bytes_of(t: &Tensor) -> &[u8] {
    let len = byte_len(t);
    if len == 0 || t.device() != Device::Cpu || !t.is_contiguous() {
        return &[];
    }
    // SAFETY: a contiguous CPU tensor of exactly `len` bytes, borrowed for
    // as long as `t`; the bench's own model and optimizer, which nothing
    // trains while they are read here.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
}

/// The synchronous baseline: write the archive and fsync on the caller.
fn sync_save(path: &Path, vs: &VarStore, opt: &Adam) -> Result<Duration> {
    let start = Instant::now();
    let (model, state) = cpu_tensors(vs, opt)?;
    let shapes: Vec<Vec<usize>> = model.iter().chain(&state).map(|(_, t)| shape_of(t)).collect();
    let mut refs = Vec::with_capacity(shapes.len());
    for ((name, t), shape) in model.iter().chain(&state).zip(&shapes) {
        refs.push(TensorRef { name, dtype: dtype_of(name, t.kind())?, shape, data: bytes_of(t), crc32c: None, crc32: None });
    }
    let (m, o) = refs.split_at(model.len());
    let json = opt.state_json();
    commit_archive(path, "sync", 0, m, Some(OptimizerRef { kind: opt.kind(), json: &json, tensors: o }), None)?;
    Ok(start.elapsed())
}

/// Flush every dirty page and give the disk a moment, between measured writes.
pub fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(300));
}

/// Drop a file's pages from the page cache so the next read comes from disk.
pub fn evict(path: &Path) {
    if let Ok(f) = File::open(path) {
        // SAFETY: advisory call on a descriptor we own.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

pub fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

pub fn io_for(dir: &Path, name: &str, cpu_copy: CpuCopy) -> Result<ModelIo> {
    let mut c = Config::default();
    c.model.dir = dir.to_path_buf();
    c.model.name = name.into();
    c.save.optimizer = OptimizerPolicy::Always;
    c.staging.cpu_copy = cpu_copy;
    ModelIo::open(c)
}

/// Peak extra resident memory over 20 consecutive saves, as a ratio to the state.
fn memory_phase(dir: &Path, vs: &VarStore, opt: &Adam, bytes: u64, r: &mut Report) -> Result<()> {
    let mut io = io_for(dir, "bench", CpuCopy::Immediate)?;
    let base = rss_kib("VmRSS:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    for _ in 0..20 {
        io.record(1.0);
        let _ticket = io.save(vs, Some(opt))?;
    }
    io.flush_blocking()?;
    let peak = rss_kib("VmHWM:").max(rss_kib("VmRSS:"));
    r.insert("peak_extra_mem_ratio".into(), (peak.saturating_sub(base) * 1024) as f64 / bytes as f64);
    r.insert("buffer_allocations_over_20_saves".into(), io.stats().buffer_growths as f64);
    io.shutdown_blocking()
}

/// CPU seconds modelio's threads spend per GiB saved (bench/cpu.rs), with
/// `io`: `reps` saves of `vs` + `opt`, each waited for (and its upload, with
/// the remote tier), after one untimed save that sizes the buffers.
fn cpu_per_gib(io: &mut ModelIo, vs: &VarStore, opt: &Adam, bytes: u64, reps: usize) -> Result<f64> {
    let save = |io: &mut ModelIo| -> Result<()> {
        io.record(1.0);
        io.save(vs, Some(opt))?.wait_blocking()?;
        wait_uploads(io);
        Ok(())
    };
    save(io)?;
    let clock = CpuClock::start();
    for _ in 0..reps {
        save(io)?;
    }
    let gib = reps as f64 * bytes as f64 / (1u64 << 30) as f64;
    let (secs, by_thread) = clock.modelio_secs();
    let shares: Vec<String> = by_thread.iter().map(|(n, u, s)| format!("{n} {:.3} (system {:.3})", (u + s) / gib, s / gib)).collect();
    eprintln!("background CPU s per GiB: {:.3}; living threads: {}", secs / gib, shares.join(", "));
    Ok(secs / gib)
}

/// Background CPU per GiB saved: `vs` + `opt` saved locally, then (with a
/// server) a state of at most [`UPLOAD_MAX_MIB`] saved with the remote tier,
/// each save's commit and upload counted.
fn cpu_phase(work: &Path, vs: &VarStore, opt: &Adam, bytes: u64, reps: usize, server: Option<&S3Server>, r: &mut Report) -> Result<()> {
    let mut io = io_for(&work.join("cpu"), "bench", CpuCopy::Immediate)?;
    r.insert("bg_cpu_s_per_gib".into(), cpu_per_gib(&mut io, vs, opt, bytes, reps)?);
    io.shutdown_blocking()?;
    let _ = std::fs::remove_dir_all(work.join("cpu"));
    #[cfg(feature = "remote")]
    if let Some(server) = server {
        let (vs, opt) = synthetic_state(bytes.min(UPLOAD_MAX_MIB << 20), Device::Cpu)?;
        let (model, state) = cpu_tensors(&vs, &opt)?;
        let upload_bytes: u64 = model.iter().chain(&state).map(|(_, t)| byte_len(t) as u64).sum();
        drop((model, state));
        let mut io = io_with_remote(&work.join("cpu-remote"), "cpu", server, "bench-cpu")?;
        r.insert("bg_cpu_s_per_gib_remote".into(), cpu_per_gib(&mut io, &vs, &opt, upload_bytes, reps)?);
        io.shutdown_blocking()?;
        let _ = std::fs::remove_dir_all(work.join("cpu-remote"));
        server.remove("bench-cpu");
    }
    #[cfg(not(feature = "remote"))]
    let _ = server;
    Ok(())
}

/// A small real model for the training-throughput comparison.
#[derive(Debug)]
struct Mlp {
    layers: Vec<nn::Linear>,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h);
            if i + 1 < self.layers.len() {
                h = h.relu();
            }
        }
        h
    }
}

/// The small real model of the training-throughput comparison and its
/// optimizer, built once: every run trains the same tensors, so that where
/// the allocator puts a run's memory adds nothing to its time.
struct Trainer {
    device: Device,
    vs: VarStore,
    net: Mlp,
    /// Taken out for each run, to be given that run's fence.
    opt: Option<Adam>,
    x: Tensor,
}

impl Trainer {
    fn new(device: Device) -> Result<Trainer> {
        tch::manual_seed(0);
        let vs = VarStore::new(device);
        let dims = [512, 1024, 1024, 1024, 512];
        let layers =
            dims.windows(2).enumerate().map(|(i, w)| nn::linear(vs.root() / format!("l{i}"), w[0], w[1], Default::default())).collect();
        let net = Mlp { layers };
        let opt = Adam::adamw(&vs, 1e-4, (0.9, 0.999), 1e-8, 0.01)?;
        let x = Tensor::f_randn([128, 512], (Kind::Float, device))?;
        Ok(Trainer { device, vs, net, opt: Some(opt), x })
    }

    /// Steps per second over `steps` steps, saving every `save_every` steps
    /// when `io` is given: in the middle of each interval, so that every
    /// save's background work falls inside the timed run as long as it takes
    /// less than half an interval (at the defaults, a 45 MB save's checksums
    /// and write take about 20 ms of the 12 steps' 220 ms; anything left is
    /// waited for, untimed, after the run).
    fn rate(&mut self, steps: u64, save_every: u64, io: Option<&mut ModelIo>) -> Result<f64> {
        let mut opt = self.opt.take().ok_or_else(|| Error::Internal {
            what: modelio::Work::Save,
            message: "the optimizer of the run before was not put back".into(),
        })?;
        if let Some(io) = &io {
            opt = opt.with_fence(io.fence());
        }
        let result = self.run(&mut opt, steps, save_every, io);
        self.opt = Some(opt);
        result
    }

    fn run(&self, opt: &mut Adam, steps: u64, save_every: u64, mut io: Option<&mut ModelIo>) -> Result<f64> {
        let start = Instant::now();
        for step in 1..=steps {
            let loss = self.net.forward(&self.x).square().mean(Kind::Float);
            opt.zero_grad();
            loss.backward();
            opt.step()?;
            if let Some(io) = io.as_deref_mut() {
                io.record(1.0);
                if step % save_every == save_every / 2 {
                    let _ticket = io.save(&self.vs, Some(&*opt))?;
                }
            }
        }
        if self.device != Device::Cpu {
            tch::Cuda::synchronize(0);
        }
        let rate = steps as f64 / start.elapsed().as_secs_f64();
        if let Some(io) = io {
            io.flush_blocking()?;
        }
        Ok(rate)
    }
}

/// Saves in the runtime's worst-tick-gap figure.
const TICK_GAP_SAVES: u64 = 40;

/// The longest gap between ticks of a task that sleeps 1 ms, on a
/// `current_thread` runtime whose loop saves a small state (4 MiB) every
/// step with `save_async` and one staging buffer, so that most saves wait
/// for the one before: how long saving ever holds up the runtime's other
/// tasks (tests/async_loop.rs checks that it does not block them at all).
fn runtime_tick_gap_ms(dir: &Path, device: Device) -> Result<f64> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().at("start a runtime for", dir)?;
    rt.block_on(async {
        let mut c = Config::default();
        c.model.dir = dir.to_path_buf();
        c.model.name = "ticks".into();
        c.staging.max_inflight = 1;
        let mut io = ModelIo::open_async(c).await?;
        let (vs, _opt) = synthetic_state(4 << 20, device)?;
        let stop = Arc::new(AtomicBool::new(false));
        let worst_us = Arc::new(AtomicU64::new(0));
        let ticker = {
            let (stop, worst_us) = (stop.clone(), worst_us.clone());
            tokio::spawn(async move {
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    worst_us.fetch_max(last.elapsed().as_micros() as u64, Ordering::Relaxed);
                    last = Instant::now();
                }
            })
        };
        let mut result = Ok(());
        for _ in 0..TICK_GAP_SAVES {
            io.record(1.0);
            if let Err(e) = io.save_async(&vs, None).await {
                result = Err(e);
                break;
            }
            tokio::task::yield_now().await;
        }
        let flushed = io.flush().await;
        stop.store(true, Ordering::Relaxed);
        let _ = ticker.await;
        let shut = io.shutdown().await;
        result.and(flushed).and(shut)?;
        Ok(worst_us.load(Ordering::Relaxed) as f64 / 1e3)
    })
}

/// Run every measurement.
///
/// # Errors
/// Any IO or libtorch failure, naming the file.
pub fn run(opts: &BenchOptions) -> Result<Report> {
    let mut r = Report::new();
    let reps = opts.reps.max(1);
    std::fs::create_dir_all(&opts.dir).at("create", &opts.dir)?;
    let work = opts.dir.join(format!("modelio-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).at("create", &work)?;
    // The S3 server first: it sets its credentials in this process's
    // environment, best before any other thread runs.
    let server = start_server(&work);
    let result = run_in(opts, reps, &work, server.as_ref(), &mut r);
    drop(server);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| r)
}

/// The S3 server of the remote tier's figures, its data under `work`;
/// `None`, with a note, when there is none (those figures are then skipped).
fn start_server(work: &Path) -> Option<S3Server> {
    if !cfg!(feature = "remote") {
        eprintln!("note: built without the `remote` feature: the remote tier's figures are skipped");
        return None;
    }
    match S3Server::start(work) {
        Ok(Some(server)) => Some(server),
        Ok(None) => {
            eprintln!("note: {} is missing (`make setup` installs it): the remote tier's figures are skipped", s3::binary().display());
            None
        }
        Err(e) => {
            eprintln!("note: the remote tier's figures are skipped: {}", e.report());
            None
        }
    }
}

/// Like [`io_for`] (immediate copy), with `[remote]` on the bench's S3 server.
fn io_with_remote(dir: &Path, name: &str, server: &S3Server, prefix: &str) -> Result<ModelIo> {
    let mut c = Config::default();
    c.model.dir = dir.to_path_buf();
    c.model.name = name.into();
    c.save.optimizer = OptimizerPolicy::Always;
    c.remote = server.remote_config(prefix);
    ModelIo::open(c)
}

/// After a run with the remote tier: wait (untimed) for its last upload, so
/// that it does not overlap the next run.
#[cfg(feature = "remote")]
fn wait_uploads(io: &ModelIo) {
    if !io.wait_remote_blocking(Duration::from_secs(120)) {
        eprintln!("note: the remote tier was still uploading after 120 s");
    }
}

#[cfg(not(feature = "remote"))]
fn wait_uploads(_: &ModelIo) {}

/// The largest archive uploaded, MiB (a larger state's figure uploads a state this size).
#[cfg(feature = "remote")]
const UPLOAD_MAX_MIB: u64 = 256;

fn run_in(opts: &BenchOptions, reps: usize, work: &Path, server: Option<&S3Server>, r: &mut Report) -> Result<()> {
    let state_bytes = opts.size_mib << 20;
    let (vs, opt) = synthetic_state(state_bytes, opts.device)?;
    let (model, state) = cpu_tensors(&vs, &opt)?;
    let bytes: u64 = model.iter().chain(&state).map(|(_, t)| byte_len(t) as u64).sum();
    drop((model, state));
    r.insert("state_bytes".into(), bytes as f64);
    match opts.only {
        Some(Phase::Cpu) => return cpu_phase(work, &vs, &opt, bytes, reps, server, r),
        Some(Phase::Load) => {
            let mut io = io_for(&work.join("mem"), "bench", CpuCopy::Immediate)?;
            io.record(1.0);
            io.save(&vs, Some(&opt))?.wait_blocking()?;
            io.shutdown_blocking()?;
            drop((vs, opt));
            return load_phase(&work.join("mem").join("bench.mio"), bytes, reps, r);
        }
        Some(Phase::Save) => return save_phase(opts, reps, work, &vs, &opt, bytes, r),
        Some(Phase::Train) => {
            drop((vs, opt));
            return train_phase(opts, reps, work, server, r);
        }
        #[cfg(feature = "remote")]
        Some(Phase::Sharded) if opts.device == Device::Cpu => {
            let dir = work.join("sharded-memory");
            let memory = crate::sharded::memory_phase(&dir, &vs, &opt, bytes, r);
            let _ = std::fs::remove_dir_all(&dir);
            memory?;
            return crate::sharded::run(work, reps, &vs, &opt, bytes, r);
        }
        Some(Phase::Sharded) => {
            eprintln!("the sharded figures are measured on a CPU state, with the `remote` feature: none here");
            return Ok(());
        }
        None => {}
    }

    // Memory first (before anything maps files): peak extra RSS over 20
    // saves. Written to a tmpfs when there is one: the figure is the
    // process's resident memory, and 20 full writes to a slow disk would
    // dominate the run. (tmpfs pages are not part of the process's RSS.)
    let shm = Path::new("/dev/shm");
    let mem_dir = if shm.is_dir() { shm.join(format!("modelio-bench-{}", std::process::id())) } else { work.join("mem") };
    let result = memory_phase(&mem_dir, &vs, &opt, bytes, r);
    let _ = std::fs::remove_dir_all(&mem_dir);
    result?;
    #[cfg(feature = "remote")]
    {
        let result = crate::sharded::memory_phase(&mem_dir, &vs, &opt, bytes, r);
        let _ = std::fs::remove_dir_all(&mem_dir);
        result?;
    }
    // Background CPU per GiB saved, local and with the remote tier.
    cpu_phase(work, &vs, &opt, bytes, reps, server, r)?;

    save_phase(opts, reps, work, &vs, &opt, bytes, r)?;

    load_phase(&work.join("mem").join("bench.mio"), bytes, reps, r)?;
    #[cfg(feature = "remote")]
    if opts.device == Device::Cpu {
        crate::sharded::run(work, reps, &vs, &opt, bytes, r)?;
    }
    drop((vs, opt));

    // Uploads of a committed archive to the remote tier vs a plain
    // object_store multipart put of the same file, alternated: that archive
    // when it is at most UPLOAD_MAX_MIB, else one of a state that size
    // (uploads to a server on the same machine go at about 0.1 GB/s on 2 cores).
    #[cfg(feature = "remote")]
    if let Some(server) = server {
        let paths = if state_bytes > UPLOAD_MAX_MIB << 20 {
            let dir = work.join("upload");
            let (vs, opt) = synthetic_state(UPLOAD_MAX_MIB << 20, Device::Cpu)?;
            let mut io = io_for(&dir, "upload", CpuCopy::Immediate)?;
            io.record(1.0);
            io.save(&vs, Some(&opt))?.wait_blocking()?;
            io.shutdown_blocking()?;
            modelio::folder::ModelPaths::new(dir, "upload")
        } else {
            modelio::folder::ModelPaths::new(work.join("mem"), "bench")
        };
        s3::upload_phase(server, &paths.archive(), &paths.state(), reps, r)?;
    }

    train_phase(opts, reps, work, server, r)
}

/// Saves (immediate, deferred and protected CPU copy), a synchronous save,
/// a memcpy and a raw write of the same bytes, interleaved per repetition;
/// the immediate saves' archive stays in `work/mem` for the loads.
fn save_phase(opts: &BenchOptions, reps: usize, work: &Path, vs: &VarStore, opt: &Adam, bytes: u64, r: &mut Report) -> Result<()> {
    let mut io = io_for(&work.join("mem"), "bench", CpuCopy::Immediate)?;
    let mut deferred_io = io_for(&work.join("deferred"), "bench", CpuCopy::Deferred)?;
    let mut protect_io = io_for(&work.join("protect"), "bench", CpuCopy::Protect)?;

    // Async saves (immediate and deferred CPU copy), a synchronous save and
    // a raw write of the same bytes, interleaved per repetition so that
    // drifts of the disk's speed hit them all alike.
    let (model, state) = cpu_tensors(vs, opt)?;
    let mut buffers: Vec<Vec<u8>> = model.iter().chain(&state).map(|(_, t)| Vec::with_capacity(byte_len(t))).collect();
    let (mut stall, mut fenced, mut write_gbps) = (vec![], vec![], vec![]);
    let (mut deferred_stall, mut deferred_fenced) = (vec![], vec![]);
    let mut protect_stall = vec![];
    let (mut sync, mut memcpy, mut raw_gbps) = (vec![], vec![], vec![]);
    let sync_path = work.join("sync.mio");
    let raw = work.join("raw.bin");
    for rep in 0..reps {
        // Rotate the order each repetition, and let the disk settle before
        // each write, so no method always pays for the one before it.
        for which in (0..5).map(|k| (k + rep) % 5) {
            settle();
            match which {
                // Write protection covers CPU tensors only.
                4 if opts.device != Device::Cpu || modelio::staging::protect_available().is_err() => {}
                4 => {
                    protect_io.record(1.0);
                    let start = Instant::now();
                    let ticket = protect_io.save(vs, Some(opt))?;
                    protect_stall.push(ms(start.elapsed()));
                    ticket.wait_blocking()?;
                }
                // GPU tensors are always queued at the call: no deferred mode to measure.
                3 if opts.device != Device::Cpu => {}
                3 => {
                    deferred_io.record(1.0);
                    let start = Instant::now();
                    let ticket = deferred_io.save(vs, Some(opt))?;
                    deferred_stall.push(ms(start.elapsed()));
                    deferred_io.fence().wait();
                    deferred_fenced.push(ms(start.elapsed()));
                    ticket.wait_blocking()?;
                }
                0 => {
                    io.record(1.0);
                    let start = Instant::now();
                    let ticket = io.save(vs, Some(opt))?;
                    stall.push(ms(start.elapsed()));
                    io.fence().wait();
                    if opts.device != Device::Cpu {
                        tch::Cuda::synchronize(0);
                    }
                    fenced.push(ms(start.elapsed()));
                    let c = ticket.wait_blocking()?;
                    write_gbps.push(c.bytes as f64 / c.write.as_secs_f64() / 1e9);
                }
                1 => sync.push(ms(sync_save(&sync_path, vs, opt)?)),
                _ => {
                    let start = Instant::now();
                    for ((_, t), b) in model.iter().chain(&state).zip(buffers.iter_mut()) {
                        b.clear();
                        b.extend_from_slice(bytes_of(t));
                    }
                    memcpy.push(ms(start.elapsed()));
                    settle();
                    let start = Instant::now();
                    let mut f = File::create(&raw).at("create", &raw)?;
                    for b in &buffers {
                        f.write_all(b).at("write", &raw)?;
                    }
                    f.sync_all().at("fsync", &raw)?;
                    raw_gbps.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
                }
            }
        }
    }
    io.shutdown_blocking()?;
    deferred_io.shutdown_blocking()?;
    protect_io.shutdown_blocking()?;
    if !protect_stall.is_empty() {
        r.insert("protect_stall_ms".into(), median(protect_stall));
    }
    drop((model, state, buffers));
    if !deferred_stall.is_empty() {
        r.insert("deferred_stall_ms".into(), median(deferred_stall));
        r.insert("deferred_copy_done_ms".into(), median(deferred_fenced));
    }
    r.insert("async_stall_ms".into(), median(stall));
    r.insert("async_copy_done_ms".into(), median(fenced));
    r.insert("write_gbps".into(), median(write_gbps));
    if opts.device != Device::Cpu {
        r.insert("staging_gbps".into(), bytes as f64 / (r["async_copy_done_ms"] / 1e3) / 1e9);
    }
    r.insert("sync_save_ms".into(), median(sync));
    r.insert("memcpy_ms".into(), median(memcpy));
    r.insert("raw_write_gbps".into(), median(raw_gbps));
    Ok(())
}

/// Loads of `archive` (holding `bytes` of tensors) from disk, the page cache
/// dropped before each, against a raw read of the same file.
fn load_phase(archive: &Path, bytes: u64, reps: usize, r: &mut Report) -> Result<()> {
    let archive = archive.to_path_buf();
    let file_bytes = std::fs::metadata(&archive).at("stat", &archive)?.len() as f64;
    let (mut load, mut mapped, mut read) = (vec![], vec![], vec![]);
    // The three take turns going first: the disk's speed drifts (on a VM,
    // with its host's cache), and no method should always read after another.
    for rep in 0..reps {
        for which in (0..3).map(|k| (k + rep) % 3) {
            evict(&archive);
            let start = Instant::now();
            match which {
                0 => {
                    let data = std::fs::read(&archive).at("read", &archive)?;
                    read.push(file_bytes / start.elapsed().as_secs_f64() / 1e9);
                    drop(data);
                }
                1 => {
                    let reader = ArchiveReader::open(&archive)?;
                    let opt_tensors = reader.optimizer.iter().flat_map(|(t, _)| t.iter());
                    let mut loaded = Vec::new();
                    for t in reader.model.iter().chain(opt_tensors) {
                        loaded.push(modelio::tensors::read_tensor(&reader, t)?);
                    }
                    load.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
                    drop((loaded, reader));
                }
                _ => {
                    let reader = ArchiveReader::open(&archive)?;
                    let damaged = reader.verify();
                    if !damaged.is_empty() {
                        return Err(Error::Damaged {
                            path: archive.clone(),
                            name: "bench".into(),
                            what: "damaged parts".into(),
                            detail: damaged.join(", "),
                        });
                    }
                    mapped.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
                }
            }
        }
    }
    r.insert("load_gbps".into(), median(load));
    r.insert("mapped_load_gbps".into(), median(mapped));
    r.insert("raw_read_gbps".into(), median(read));
    Ok(())
}

/// Training throughput without saves, with saves, and with saves uploaded
/// to the remote tier (every save): one run of each per repetition, in
/// every order in turn, each saving run compared with the run without saves
/// of the same repetition.
fn train_phase(opts: &BenchOptions, reps: usize, work: &Path, server: Option<&S3Server>, r: &mut Report) -> Result<()> {
    let (mut plain, mut saving, mut remote) = (vec![], vec![], vec![]);
    // CPU seconds per remote run: modelio's threads, and the S3 server's.
    let (mut remote_cpu, mut server_cpu) = (vec![], vec![]);
    let mut io = io_for(&work.join("train"), "mlp", CpuCopy::Immediate)?;
    let mut remote_io = server.map(|s| io_with_remote(&work.join("train-remote"), "mlp", s, "bench-train")).transpose()?;
    let mut trainer = Trainer::new(opts.device)?;
    trainer.rate(5, opts.save_every, None)?; // warm-up
    let before = io.fence().waited().0;
    // The speed of this machine drifts by several percent from one run to
    // the next (more than a save costs): about four times the repetitions,
    // each ratio taken within a repetition, whose runs follow each other.
    // The repetitions go through every order of the kinds in turn, so that
    // each kind comes first, last and after each other kind equally often.
    let kinds: &[usize] = if remote_io.is_some() { &[0, 1, 2] } else { &[0, 1] };
    let orders = permutations(kinds);
    let runs = (4 * reps).next_multiple_of(orders.len());
    for rep in 0..runs {
        for &which in &orders[rep % orders.len()] {
            match (which, remote_io.as_mut()) {
                (0, _) => plain.push(trainer.rate(opts.steps, opts.save_every, None)?),
                (1, _) => saving.push(trainer.rate(opts.steps, opts.save_every, Some(&mut io))?),
                (_, Some(rio)) => {
                    let (clock, served) = (CpuClock::start(), server.map_or(0.0, S3Server::cpu_secs));
                    remote.push(trainer.rate(opts.steps, opts.save_every, Some(rio))?);
                    wait_uploads(rio);
                    remote_cpu.push(clock.modelio_secs().0);
                    server_cpu.push(server.map_or(0.0, S3Server::cpu_secs) - served);
                }
                _ => {}
            }
        }
    }
    let paired = |with: &[f64]| median(with.iter().zip(&plain).map(|(w, p)| w / p).collect());
    r.insert("train_saving_ratio".into(), paired(&saving));
    if !remote.is_empty() {
        r.insert("train_remote_ratio".into(), paired(&remote));
    }
    let every = opts.save_every.max(1);
    let saves = runs as u64 * (1..=opts.steps).filter(|step| step % every == every / 2).count() as u64;
    r.insert("train_fence_wait_ms_per_save".into(), ms(io.fence().waited().0.saturating_sub(before)) / saves.max(1) as f64);
    io.shutdown_blocking()?;
    r.insert("steps_per_s_plain".into(), median(plain));
    r.insert("steps_per_s_saving".into(), median(saving));
    let gaps = (0..reps).map(|rep| runtime_tick_gap_ms(&work.join(format!("ticks-{rep}")), opts.device)).collect::<Result<Vec<_>>>()?;
    r.insert("runtime_worst_tick_gap_ms".into(), median(gaps));
    if let Some(rio) = remote_io {
        #[cfg(feature = "remote")]
        if let Some(s) = rio.remote_stats() {
            r.insert("train_remote_uploaded".into(), s.uploaded as f64);
            r.insert("train_remote_skipped".into(), s.skipped as f64);
            r.insert("train_remote_failed_attempts".into(), s.failed_attempts as f64);
        }
        rio.shutdown_blocking()?;
        r.insert("steps_per_s_remote".into(), median(remote));
        r.insert("train_remote_modelio_cpu_s".into(), median(remote_cpu));
        r.insert("train_remote_server_cpu_s".into(), median(server_cpu));
    }
    Ok(())
}

/// Every order of `items` (6 of 3, 2 of 2).
fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut all = Vec::new();
    for (i, &first) in items.iter().enumerate() {
        let rest: Vec<usize> = items.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, &x)| x).collect();
        for mut tail in permutations(&rest) {
            tail.insert(0, first);
            all.push(tail);
        }
    }
    all
}

/// The comparison table: (figure, ours, reference, ratio, target, holds).
pub fn table(r: &Report) -> Vec<[String; 6]> {
    let get = |k: &str| r.get(k).copied();
    let mut rows = Vec::new();
    let mut row = |name: &str, ours: Option<f64>, reference: Option<f64>, ratio: Option<f64>, target: &str, holds: Option<bool>| {
        let f = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
        rows.push([
            name.into(),
            f(ours),
            f(reference),
            f(ratio),
            target.into(),
            holds.map(|h| if h { "yes" } else { "NO" }.to_string()).unwrap_or("-".into()),
        ]);
    };
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| if b == 0.0 { f64::INFINITY } else { a / b });
    let stall = get("async_stall_ms");
    let cpu = get("deferred_stall_ms").is_some();
    let (mem_target, mem_ok): (&str, fn(f64) -> bool) = if cpu { ("<= 1.2", |x| x <= 1.2) } else { ("-", |_| true) };
    let m = ratio(stall, get("memcpy_ms"));
    row("stall ms (immediate copy) vs memcpy", stall, get("memcpy_ms"), m, mem_target, m.map(mem_ok).filter(|_| cpu));
    let s = ratio(stall, get("sync_save_ms"));
    row("stall ms (immediate copy) vs sync save", stall, get("sync_save_ms"), s, "-", None);
    let deferred = get("deferred_stall_ms");
    let dm = ratio(deferred, get("memcpy_ms"));
    row("stall ms (deferred copy) vs memcpy", deferred, get("memcpy_ms"), dm, "-", None);
    let ds = ratio(deferred, get("sync_save_ms"));
    row("stall ms (deferred copy) vs sync save", deferred, get("sync_save_ms"), ds, "<= 0.01", ds.map(|x| x <= 0.01));
    let gib = get("state_bytes").map(|b| b / (1u64 << 30) as f64);
    let ps = get("protect_stall_ms").zip(gib).map(|(ms, g)| ms / g);
    row("stall ms per GiB (protect copy)", ps, None, None, "<= 5", ps.map(|x| x <= 5.0));
    let pd = ratio(get("dcp_async_stall_ms"), get("protect_stall_ms"));
    row(
        "  DCP async_save stall ms / protect stall",
        get("dcp_async_stall_ms"),
        get("protect_stall_ms"),
        pd,
        ">= 10",
        pd.map(|x| x >= 10.0),
    );
    let dc = ratio(get("deferred_copy_done_ms"), get("memcpy_ms"));
    row("  deferred: copy landed ms vs memcpy", get("deferred_copy_done_ms"), get("memcpy_ms"), dc, "-", None);
    let c = ratio(get("async_copy_done_ms"), get("memcpy_ms"));
    row("copy landed ms (immediate) vs memcpy", get("async_copy_done_ms"), get("memcpy_ms"), c, "-", None);
    let w = ratio(get("write_gbps"), get("raw_write_gbps"));
    row("write GB/s vs raw write+fsync", get("write_gbps"), get("raw_write_gbps"), w, ">= 0.9", w.map(|x| x >= 0.9));
    let l = ratio(get("load_gbps"), get("raw_read_gbps"));
    row("load GB/s vs raw read", get("load_gbps"), get("raw_read_gbps"), l, ">= 0.9", l.map(|x| x >= 0.9));
    let ml = ratio(get("mapped_load_gbps"), get("raw_read_gbps"));
    row("mapped load GB/s vs raw read", get("mapped_load_gbps"), get("raw_read_gbps"), ml, "-", None);
    let mem = get("peak_extra_mem_ratio");
    row("peak extra memory / state (20 saves)", mem, Some(1.0), mem, "<= 1.1", mem.map(|x| x <= 1.1));
    let bg = get("bg_cpu_s_per_gib");
    row("background CPU s per GiB saved", bg, None, None, "<= 0.35", bg.map(|x| x <= 0.35));
    let bgr = get("bg_cpu_s_per_gib_remote");
    row("  same, with the remote tier", bgr, None, None, "<= 0.6", bgr.map(|x| x <= 0.6));
    // The ratios are medians of the repetitions' own (see `train_phase`).
    let t = get("train_saving_ratio");
    row("steps/s saving vs plain", get("steps_per_s_saving"), get("steps_per_s_plain"), t, ">= 0.97", t.map(|x| x >= 0.97));
    row("  optimizer-step wait per save, ms", get("train_fence_wait_ms_per_save"), None, None, "-", None);
    let tr = get("train_remote_ratio");
    row("steps/s saving + remote tier vs plain", get("steps_per_s_remote"), get("steps_per_s_plain"), tr, ">= 0.95", tr.map(|x| x >= 0.95));
    if let (Some(up), Some(skip)) = (get("train_remote_uploaded"), get("train_remote_skipped")) {
        row("  saves uploaded / replaced by a newer one", Some(up), Some(skip), None, "-", None);
    }
    let sc = ratio(get("train_remote_server_cpu_s"), get("train_remote_modelio_cpu_s"));
    row("  CPU s per run: the S3 server vs modelio", get("train_remote_server_cpu_s"), get("train_remote_modelio_cpu_s"), sc, "-", None);
    let up = ratio(get("remote_upload_gbps"), get("plain_multipart_put_gbps"));
    let label = match get("remote_upload_bytes") {
        Some(b) => format!("upload GB/s vs object_store put, {:.0} MiB", b / (1u64 << 20) as f64),
        None => "upload GB/s vs object_store put".into(),
    };
    row(&label, get("remote_upload_gbps"), get("plain_multipart_put_gbps"), up, ">= 0.9", up.map(|x| x >= 0.9));
    // The peers against our fastest stall (deferred on CPU, the only mode on a GPU)...
    let fastest = deferred.or(stall);
    let ts = ratio(get("torch_save_ms"), fastest);
    row("torch.save ms / our stall", get("torch_save_ms"), fastest, ts, ">= 20", ts.map(|x| x >= 20.0));
    let st = ratio(get("safetensors_save_ms"), fastest);
    row("safetensors save ms / our stall", get("safetensors_save_ms"), fastest, st, "-", None);
    let d = ratio(get("dcp_async_stall_ms"), fastest);
    row("DCP async_save stall ms / our stall", get("dcp_async_stall_ms"), fastest, d, ">= 10 (GPU)", d.map(|x| x >= 10.0));
    // ... and against the default (immediate) copy on a CPU.
    if cpu {
        let ti = ratio(get("torch_save_ms"), stall);
        row("  torch.save ms / immediate stall", get("torch_save_ms"), stall, ti, "-", None);
        let di = ratio(get("dcp_async_stall_ms"), stall);
        row("  DCP async_save stall ms / immediate stall", get("dcp_async_stall_ms"), stall, di, "-", None);
    }
    if !cpu {
        let per_gib = stall.zip(get("state_bytes")).map(|(ms, b)| ms / (b / (1u64 << 30) as f64));
        row("stall ms per GiB (GPU state)", per_gib, None, None, "< 1.0", per_gib.map(|x| x < 1.0));
    }
    let rs = ratio(get("sharded_rank_stall_ms"), get("sharded_single_stall_ms"));
    row(
        "sharded: a rank's stall ms vs a single save",
        get("sharded_rank_stall_ms"),
        get("sharded_single_stall_ms"),
        rs,
        "<= 1.2",
        rs.map(|x| x <= 1.2),
    );
    let sm = get("sharded_peak_extra_mem_ratio");
    let limit = 1.1 + get("sharded_parts_in_flight_ratio").unwrap_or(0.0);
    row("sharded: peak extra memory / shard", sm, Some(1.0), sm, &format!("<= {limit:.2}"), sm.map(|x| x <= limit));
    let sl = ratio(get("sharded_load_gbps"), get("sharded_raw_read_gbps"));
    row(
        "sharded: load on 1 rank of 2 GB/s vs raw read",
        get("sharded_load_gbps"),
        get("sharded_raw_read_gbps"),
        sl,
        ">= 0.9",
        sl.map(|x| x >= 0.9),
    );
    let gap = get("runtime_worst_tick_gap_ms");
    row("runtime's worst tick gap, saving every step, ms", gap, None, None, "< 10", gap.map(|x| x < 10.0));
    if let Some(g) = get("staging_gbps") {
        let p = ratio(Some(g), get("pinned_d2h_gbps"));
        row("staging GB/s vs torch pinned D2H", Some(g), get("pinned_d2h_gbps"), p, ">= 0.85", p.map(|x| x >= 0.85));
    }
    rows
}
