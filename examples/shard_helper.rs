//! Test helper for sharded checkpoints (tests/sharded.rs): one rank of a
//! job, its rank and world size from `RANK` and `WORLD_SIZE`.
//!
//! `shard_helper train DIR URL ENDPOINT STEPS DELAY_MS`: saves steps 1..=STEPS
//! of a deterministic state, each rank its rows of `w` and `w.exp_avg`
//! (rank 0 also the whole `b` and `step`), then waits for its writes (and,
//! on rank 0, the commits). URL empty: the model folder DIR is the store.
//!
//! `shard_helper check DIR URL ENDPOINT`: loads the newest committed step,
//! this rank's rows and the whole tensors, and compares them bitwise with
//! the state at that step; prints `ok <iterations>` or exits 1.

use std::process::ExitCode;
use std::time::Duration;

use modelio::sharded::{Part, ShardedIo, Want};
use modelio::tch::{Device, Kind, Tensor};
use modelio::Config;

const ROWS: usize = 12;

/// The global state at step `s`.
fn state(s: u64) -> Vec<(&'static str, Tensor)> {
    let t = |n: i64, k: f64| (Tensor::arange(n, (Kind::Double, Device::Cpu)) * k + s as f64 * 0.1).sin().to_kind(Kind::Float);
    vec![
        ("w", t(ROWS as i64 * 5, 0.37).reshape([ROWS as i64, 5])),
        ("w.exp_avg", t(ROWS as i64 * 5, 0.11).reshape([ROWS as i64, 5])),
        ("b", t(7, 0.5)),
        ("step", Tensor::from(s as i64)),
    ]
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
    let io = ShardedIo::open(&config(args))?;
    let rank = io.rank();
    let (start, end) = rows(rank.rank, rank.world_size);
    match args[1].as_str() {
        "train" => {
            let steps: u64 = args[5].parse().unwrap_or(3);
            let delay = Duration::from_millis(args[6].parse().unwrap_or(0));
            for s in 1..=steps {
                let st = state(s);
                let slices: Vec<Tensor> = st[..2].iter().map(|(_, t)| t.narrow(0, start as i64, (end - start) as i64)).collect();
                let mut parts = vec![Part::rows("w", &slices[0], start, ROWS), Part::rows("w.exp_avg", &slices[1], start, ROWS)];
                if rank.rank == 0 {
                    parts.push(Part::whole("b", &st[2].1));
                    parts.push(Part::whole("step", &st[3].1));
                }
                io.save(s, &parts)?;
                std::thread::sleep(delay);
            }
            let done = io.flush(Duration::from_secs(30));
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
            let st = state(m.iterations);
            let expected = [
                st[0].1.narrow(0, start as i64, (end - start) as i64),
                st[1].1.narrow(0, start as i64, (end - start) as i64),
                st[2].1.shallow_clone(),
                st[3].1.shallow_clone(),
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

fn bytes(t: &Tensor) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = modelio::tensors::copy_bytes(&t.contiguous(), &mut v);
    v
}
