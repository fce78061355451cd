//! Test helper for sharded checkpoints (tests/sharded.rs): one rank of a
//! job, its rank and world size from `RANK` and `WORLD_SIZE`.
//!
//! `shard_helper train DIR URL ENDPOINT STEPS DELAY_MS [resume]`: trains and
//! saves steps 1..=STEPS (with `resume`, from the newest committed step on,
//! each rank loading its own rows of it), each rank its rows of the
//! parameters `w` and their momentum `w.exp_avg` (rank 0 also the whole `b`
//! and `step`), then waits for its writes (and, on rank 0, the commits).
//! URL empty: the model folder DIR is the store.
//!
//! `shard_helper vars DIR WORLD`: WORLD ranks (threads, each with its own
//! handle and runtime) train a VarStore and an AdamW in lock-step, each
//! saving its rows under a plan every step (rank 0 prints `saved N` once
//! step N is committed), until SIGINT or SIGTERM: then every rank ends with
//! `finish` at the same step (rank 0 prints `finished N committed BOOL
//! unreported K`).
//!
//! `shard_helper check DIR URL ENDPOINT`: loads the newest committed step,
//! this rank's rows and the whole tensors, and compares them bitwise with
//! an uninterrupted run to that step; prints `ok <iterations>` or exits 1.

use std::process::ExitCode;
use std::time::Duration;

use modelio::sharded::{Part, ShardedIo, Want};
use modelio::tch::{Device, Kind, Tensor};
use modelio::Config;

const ROWS: usize = 12;

/// The initial state: parameters `w` (ROWS x 5), their first moment
/// `w.exp_avg`, a bias `b` (held whole by rank 0) and the step.
fn initial() -> [Tensor; 3] {
    let w = (Tensor::arange(ROWS as i64 * 5, (Kind::Double, Device::Cpu)) * 0.37).sin().to_kind(Kind::Float).reshape([ROWS as i64, 5]);
    let b = (Tensor::arange(7, (Kind::Double, Device::Cpu)) * 0.5).sin().to_kind(Kind::Float);
    [w.shallow_clone(), w.zeros_like(), b]
}

/// One training step `t` of a momentum optimizer on rows of `w` (or all of
/// them): elementwise and exactly rounded, so a row's values do not depend
/// on which rank holds it or how the rows are split.
fn train_step(w: &Tensor, m: &Tensor, b: &Tensor, t: u64) -> [Tensor; 3] {
    let g = w * 0.5 + t as f64 * 0.001;
    let m = m * 0.9 + &g * 0.1;
    let w = w - &m * 0.05;
    let b = b * 0.99 + 0.01;
    [w, m, b]
}

/// The whole state after `s` steps, uninterrupted.
fn state(s: u64) -> [Tensor; 3] {
    let [mut w, mut m, mut b] = initial();
    for t in 1..=s {
        [w, m, b] = train_step(&w, &m, &b, t);
    }
    [w, m, b]
}

/// Rows `[start, end)` of `ROWS` that rank `r` of `world` holds.
fn rows(r: usize, world: usize) -> (usize, usize) {
    (ROWS * r / world, ROWS * (r + 1) / world)
}

fn config(args: &[String]) -> Config {
    let mut c = Config::default();
    c.model.dir = args[2].clone().into();
    c.model.name = "m".into();
    if !args[3].is_empty() {
        c.remote.url = args[3].clone();
        c.remote.endpoint = args[4].clone();
        c.remote.allow_http = true;
    }
    c.shard.commit_deadline_secs = 2;
    c.shard.keep = 0;
    c
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> modelio::Result<ExitCode> {
    if args[1] == "vars" {
        return vars(args);
    }
    let io = ShardedIo::open(&config(args))?;
    let rank = io.rank();
    let (start, end) = rows(rank.rank, rank.world_size);
    match args[1].as_str() {
        // train DIR URL ENDPOINT STEPS DELAY_MS [resume]
        "train" => {
            let steps: u64 = args[5].parse().unwrap_or(3);
            let delay = Duration::from_millis(args[6].parse().unwrap_or(0));
            let rows = |t: &Tensor| t.narrow(0, start as i64, (end - start) as i64);
            // From scratch, or from the newest committed step, this rank's rows.
            let (first, [mut w, mut m, mut b]) = match (args.get(7).map(String::as_str), io.latest()?) {
                (Some("resume"), Some(latest)) => {
                    let wants = [Want::rows("w", start, end), Want::rows("w.exp_avg", start, end), Want::whole("b")];
                    let mut t = io.load(&latest, &wants)?.into_iter();
                    let mut next = || t.next().unwrap_or_else(|| Tensor::zeros([0], (Kind::Float, Device::Cpu)));
                    (latest.iterations + 1, [next(), next(), next()])
                }
                _ => {
                    let [w, m, b] = initial();
                    (1, [rows(&w), rows(&m), b])
                }
            };
            for s in first..=steps {
                [w, m, b] = train_step(&w, &m, &b, s);
                let step = Tensor::from(s as i64);
                let mut parts = vec![Part::rows("w", &w, start, ROWS), Part::rows("w.exp_avg", &m, start, ROWS)];
                if rank.rank == 0 {
                    parts.push(Part::whole("b", &b));
                    parts.push(Part::whole("step", &step));
                }
                io.save(s, &parts)?;
                std::thread::sleep(delay);
            }
            // A step another rank never finished is a failure here, reported
            // by the flush: printed, for the test to judge.
            let done = match io.flush(Duration::from_secs(30)) {
                Ok(done) => done.to_string(),
                Err(e) => format!("error: {}", e.report()),
            };
            let s = io.stats();
            use std::sync::atomic::Ordering::Relaxed;
            println!(
                "rank {} written {} skipped {} committed {} commit_failed {} flushed {done}",
                rank.rank,
                s.written.load(Relaxed),
                s.skipped.load(Relaxed),
                s.committed.load(Relaxed),
                s.commit_failed.load(Relaxed)
            );
            Ok(ExitCode::SUCCESS)
        }
        "check" => {
            let Some(m) = io.latest()? else {
                println!("none");
                return Ok(ExitCode::from(1));
            };
            let wants = [Want::rows("w", start, end), Want::rows("w.exp_avg", start, end), Want::whole("b"), Want::whole("step")];
            let loaded = io.load(&m, &wants)?;
            let [w, m_, b] = state(m.iterations);
            let expected = [
                w.narrow(0, start as i64, (end - start) as i64),
                m_.narrow(0, start as i64, (end - start) as i64),
                b,
                Tensor::from(m.iterations as i64),
            ];
            for ((w, got), want) in wants.iter().zip(&loaded).zip(&expected) {
                let same = got.size() == want.size() && got.kind() == want.kind() && bytes(got) == bytes(want);
                if !same {
                    println!("differs {} at {}", w.name, m.iterations);
                    return Ok(ExitCode::from(1));
                }
            }
            println!("ok {}", m.iterations);
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprintln!("unknown mode {other}");
            Ok(ExitCode::from(2))
        }
    }
}

/// `vars DIR WORLD`: ranks in lock-step until a signal, then `finish`.
fn vars(args: &[String]) -> modelio::Result<ExitCode> {
    use modelio::sharded::Plan;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};
    let world: usize = args[3].parse().unwrap_or(2);
    // One token for the process, shared by every rank; its signals are
    // awaited on a thread of their own, so a loop that never yields sees it.
    let token = modelio::signals::cancel_on_signals()?;
    let (barrier, stop) = (Arc::new(Barrier::new(world)), Arc::new(AtomicBool::new(false)));
    let ranks: Vec<_> = (0..world)
        .map(|r| {
            let (token, barrier, stop) = (token.clone(), barrier.clone(), stop.clone());
            let mut c = Config::default();
            c.model.dir = args[2].clone().into();
            c.model.name = "m".into();
            c.shard.rank = Some(r);
            c.shard.world_size = Some(world);
            c.shard.run_id = "vars".into();
            std::thread::spawn(move || -> modelio::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| modelio::Error::Signals { detail: e.to_string() })?;
                rt.block_on(async move {
                    let io = ShardedIo::open(&c)?;
                    let (start, end) = rows(r, world);
                    let vs = modelio::tch::nn::VarStore::new(Device::Cpu);
                    let w = vs.root().var_copy("w", &initial()[0].narrow(0, start as i64, (end - start) as i64));
                    let mut opt = modelio::Adam::adamw(&vs, 1e-2, (0.9, 0.999), 1e-8, 0.01)?;
                    let plan = Plan::new().rows("w", start, ROWS);
                    for step in 1..=100_000u64 {
                        opt.zero_grad();
                        (&w * &w).sum(Kind::Float).backward();
                        opt.step()?;
                        // Rank 0 decides for all whether this step is the last,
                        // as a job's ranks agree through a collective.
                        if r == 0 {
                            stop.store(token.is_cancelled(), Ordering::SeqCst);
                        }
                        barrier.wait();
                        let last = stop.load(Ordering::SeqCst);
                        barrier.wait();
                        if last {
                            let finished = io.finish(step, &vs, Some(&opt), &plan).await?;
                            if r == 0 {
                                let e = &finished.exit_save;
                                println!("finished {} committed {} unreported {}", e.iterations, e.committed, finished.unreported.len());
                            }
                            return Ok(());
                        }
                        let ticket = io.save_vars_async(step, &vs, Some(&opt), &plan).await?;
                        if r == 0 {
                            let saved = ticket.await?;
                            println!("saved {}", saved.iterations);
                        }
                    }
                    Ok(())
                })
            })
        })
        .collect();
    let mut code = ExitCode::SUCCESS;
    for (r, h) in ranks.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("rank {r}: {}", e.report());
                code = ExitCode::from(2);
            }
            Err(_) => code = ExitCode::from(3),
        }
    }
    Ok(code)
}

fn bytes(t: &Tensor) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = modelio::tensors::copy_bytes(&t.contiguous(), &mut v);
    v
}
