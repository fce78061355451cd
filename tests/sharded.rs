//! Sharded checkpoints across rank processes: N = 3 ranks save, N = 2 and
//! N = 4 resume bitwise; a rank killed mid-save never yields a manifest
//! naming a missing shard; racing coordinators make one manifest.
//!
//! The ranks are `examples/shard_helper.rs` processes (rank and world size
//! from `RANK` and `WORLD_SIZE`) training parameters and their momentum with
//! elementwise, exactly rounded steps, so the state at step s does not depend
//! on how the rows were split, and every rank checks what it loads bitwise
//! against an uninterrupted run.
#![cfg(feature = "remote")]

mod common;

use common::Rng;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::s3::S3Server;
use common::sharded::{open_rank, rank_config};
use modelio::sharded::{Part, ShardedIo, Want};
use modelio::Config;
use tch::{Device, Kind, Tensor};

fn helper() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(Path::parent).unwrap().join("examples/shard_helper");
    assert!(path.exists(), "{} missing: `cargo test` builds examples", path.display());
    path
}

/// Where the ranks store: the model folder (a shared filesystem), or a remote.
struct Store {
    dir: PathBuf,
    url: String,
    endpoint: String,
    env: Vec<(&'static str, String)>,
}

/// A run id for one launch of every rank, new at each call.
fn launch() -> String {
    static LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("launch-{}-{}", std::process::id(), LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// The variables a launcher may set a run id with.
const RUN_ID_VARS: [&str; 6] =
    ["MODELIO_RUN_ID", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"];

/// Rank `rank` of a launch whose run id is `run` (`None`: no id at all).
fn rank(store: &Store, mode: &str, rank: usize, world: usize, run: Option<&str>, extra: &[&str]) -> Child {
    let mut c = Command::new(helper());
    for v in RUN_ID_VARS {
        c.env_remove(v);
    }
    if let Some(run) = run {
        c.env("MODELIO_RUN_ID", run);
    }
    c.arg(mode)
        .arg(&store.dir)
        .arg(&store.url)
        .arg(&store.endpoint)
        .args(extra)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .envs(store.env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn output(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Every rank of a `world`-rank job checks the newest step; returns its iterations.
fn check(store: &Store, world: usize) -> u64 {
    let run = launch();
    let children: Vec<Child> = (0..world).map(|r| rank(store, "check", r, world, Some(&run), &[])).collect();
    let mut seen = None;
    for (r, child) in children.into_iter().enumerate() {
        let (ok, text) = output(child);
        assert!(ok, "rank {r} of {world}: {text}");
        let n: u64 = text.trim().strip_prefix("ok ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("rank {r}: {text}"));
        assert!(seen.is_none_or(|s| s == n), "ranks loaded different steps");
        seen = Some(n);
    }
    seen.unwrap()
}

fn train(store: &Store, world: usize, steps: u64) {
    let run = launch();
    let children: Vec<Child> = (0..world).map(|r| rank(store, "train", r, world, Some(&run), &[&steps.to_string(), "5"])).collect();
    for (r, child) in children.into_iter().enumerate() {
        let (ok, text) = output(child);
        assert!(ok && text.contains("flushed true"), "rank {r}: {text}");
    }
}

fn reader(store: &Store) -> ShardedIo {
    let mut c = Config::default();
    c.model.dir = store.dir.clone();
    c.model.name = "m".into();
    if !store.url.is_empty() {
        c.remote.url = store.url.clone();
        c.remote.endpoint = store.endpoint.clone();
        c.remote.allow_http = true;
    }
    c.shard.rank = Some(0);
    c.shard.world_size = Some(1);
    ShardedIo::open(&c).unwrap()
}

fn save_then_resume_on_other_world_sizes(store: &Store) {
    train(store, 3, 4);
    let io = reader(store);
    let all = io.list().unwrap();
    // A step a rank skipped (its previous save still being written) is not
    // committed; the last one always is.
    assert_eq!(all.last().map(|m| m.iterations), Some(4), "{:?}", all.iter().map(|m| m.iterations).collect::<Vec<_>>());
    for m in &all {
        assert_eq!(m.world_size, 3);
        assert!(io.verify(m).unwrap().is_empty(), "step {}", m.iterations);
    }
    assert_eq!(check(store, 2), 4);
    assert_eq!(check(store, 4), 4);
    // Two ranks resume from step 4, each loading its rows, and train on to
    // step 7: four ranks then load what an uninterrupted run holds at 7.
    let run = launch();
    let children: Vec<Child> = (0..2).map(|r| rank(store, "train", r, 2, Some(&run), &["7", "5", "resume"])).collect();
    for child in children {
        let (ok, text) = output(child);
        assert!(ok && text.contains("flushed true"), "{text}");
    }
    assert_eq!(check(store, 4), 7);
    assert_eq!(check(store, 1), 7);
}

#[test]
fn three_ranks_save_and_two_or_four_resume_bitwise_on_a_shared_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store { dir: tmp.path().join("model"), url: String::new(), endpoint: String::new(), env: Vec::new() };
    save_then_resume_on_other_world_sizes(&store);
    // One shard is an ordinary archive: Python reads it with zipfile + safetensors.
    let shard = std::fs::read_dir(store.dir.join("m/sharded/steps/00000000000000000004"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("rank-1-"))
        .unwrap();
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let script = "import sys, zipfile, json\n\
                  from safetensors.numpy import load\n\
                  z = zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None\n\
                  t = load(z.read('model.safetensors'))\n\
                  print(sorted(t), t['w'].shape)\n";
    let out = Command::new(&python).arg("-c").arg(script).arg(&shard).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{}", text, String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.trim(), "['w', 'w.exp_avg'] (4, 5)");
}

#[test]
fn three_ranks_save_and_two_or_four_resume_bitwise_on_s3() {
    let server = S3Server::start();
    server.set_env();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store { dir: tmp.path().join("model"), url: server.url("sharded"), endpoint: server.endpoint(), env: server.env() };
    save_then_resume_on_other_world_sizes(&store);
}

/// The ranks' whole state after `s` uninterrupted steps, as
/// `examples/shard_helper.rs` trains it: `w`, `w.exp_avg`, `b`, `step`.
fn state(s: u64) -> Vec<Tensor> {
    let mut w = (Tensor::arange(60, (Kind::Double, Device::Cpu)) * 0.37).sin().to_kind(Kind::Float).reshape([12, 5]);
    let mut m = w.zeros_like();
    let mut b = (Tensor::arange(7, (Kind::Double, Device::Cpu)) * 0.5).sin().to_kind(Kind::Float);
    for t in 1..=s {
        let g = &w * 0.5 + t as f64 * 0.001;
        m = &m * 0.9 + &g * 0.1;
        w = &w - &m * 0.05;
        b = &b * 0.99 + 0.01;
    }
    vec![w, m, b, Tensor::from(s as i64)]
}

#[test]
fn a_rank_killed_mid_save_never_leaves_a_manifest_naming_a_missing_shard() {
    let trials: u64 = std::env::var("MODELIO_SHARD_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let mut rng = Rng(0x5eed_cafe);
    let mut committed_in_all = 0;
    for trial in 0..trials {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store { dir: tmp.path().join("model"), url: String::new(), endpoint: String::new(), env: Vec::new() };
        let victim = rng.below(3) as usize;
        // The kill comes a random moment after the ranks started saving (a
        // shard exists), or after the first step was committed: mid-save
        // either way, however slowly the processes start on a busy machine.
        let after_commit = rng.below(2) == 1;
        let after = Duration::from_millis(rng.below(400));
        let run = launch();
        let mut children: Vec<Child> = (0..3).map(|r| rank(&store, "train", r, 3, Some(&run), &["12", "20"])).collect();
        let sharded = store.dir.join("m/sharded");
        let started = || {
            let any = |d: PathBuf| std::fs::read_dir(d).map(|mut e| e.next().is_some()).unwrap_or(false);
            if after_commit {
                any(sharded.join("manifests"))
            } else {
                any(sharded.join("steps"))
            }
        };
        let waited = Instant::now();
        while !started() {
            if children.iter_mut().all(|c| !matches!(c.try_wait(), Ok(None))) {
                break;
            }
            assert!(waited.elapsed() < Duration::from_secs(300), "trial {trial}: the ranks never started saving");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(after);
        children[victim].kill().unwrap();
        let mut last = 0;
        for (r, child) in children.into_iter().enumerate() {
            let (ok, text) = output(child);
            assert!(ok || r == victim, "trial {trial}, rank {r}: {text}");
        }
        let io = reader(&store);
        let all = io.list().unwrap();
        for m in &all {
            let problems = io.verify(m).unwrap();
            assert!(
                problems.is_empty(),
                "trial {trial} (rank {victim} killed {after:?} after the first {}), step {}: {problems:?}",
                if after_commit { "commit" } else { "shard" },
                m.iterations
            );
            assert_eq!(m.shards.len(), 3);
            last = m.iterations;
        }
        if let Some(m) = all.last() {
            committed_in_all += 1;
            // The newest complete step loads, whole, as it was saved.
            let got = io.load(m, &[Want::whole("w"), Want::whole("w.exp_avg"), Want::whole("b"), Want::whole("step")]).unwrap();
            let want = state(last);
            for (g, w) in got.iter().zip(&want) {
                assert!(g.equal(w), "trial {trial}: step {last} differs");
            }
        }
    }
    // The kills land before, during and after the first commits.
    assert!(committed_in_all > 0, "no trial committed a step: the kills all came too early to test anything");
    println!("{trials} trials, {committed_in_all} with a committed step, every manifest whole");
}

#[test]
fn racing_coordinators_commit_a_step_once() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = format!("file://{}", tmp.path().join("store").display());
    let memory = format!("memory://race-{}", std::process::id());
    for url in [folder, memory] {
        let w = Tensor::arange(8, (Kind::Float, Device::Cpu)).reshape([4, 2]);
        let other = open_rank(tmp.path(), &url, 1, 2, "race", 5);
        other.save(7, &[Part::rows("w", &w.narrow(0, 2, 2), 2, 4)]).unwrap();
        assert!(other.flush(Duration::from_secs(10)).unwrap());
        // The coordinator's background commit races with commits by hand
        // from several threads.
        let coordinator = open_rank(tmp.path(), &url, 0, 2, "race", 5);
        coordinator.save(7, &[Part::rows("w", &w.narrow(0, 0, 2), 0, 4)]).unwrap();
        use std::sync::atomic::Ordering::Relaxed;
        // Its shard is written: its background commit starts now, as do the others.
        let waited = Instant::now();
        while coordinator.stats().written.load(Relaxed) == 0 {
            assert!(waited.elapsed() < Duration::from_secs(120), "{url}: the coordinator's shard was never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        let barrier = Arc::new(Barrier::new(4));
        let created: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (barrier, io) = (barrier.clone(), &coordinator);
                    s.spawn(move || {
                        barrier.wait();
                        usize::from(io.commit(7).unwrap_or(false))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert!(coordinator.flush(Duration::from_secs(20)).unwrap(), "{url}");
        let background = coordinator.stats().committed.load(Relaxed);
        assert_eq!(created as u64 + background, 1, "{url}: exactly one commit created the manifest");
        let all = coordinator.list().unwrap();
        assert_eq!(all.len(), 1, "{url}");
        assert!(coordinator.verify(&all[0]).unwrap().is_empty(), "{url}");
        let got = coordinator.load(&all[0], &[Want::whole("w")]).unwrap();
        assert_eq!(Vec::<f32>::try_from(got[0].reshape([-1])).unwrap(), (0..8).map(|x| x as f32).collect::<Vec<_>>());
    }
}

#[test]
fn wants_outside_the_saved_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("memory://wants-{}", std::process::id());
    let io = open_rank(tmp.path(), &url, 0, 1, "race", 5);
    let w = Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([3, 2]);
    let half = w.narrow(0, 0, 2);
    // Rows past the global shape are refused at the call.
    let e = io.save(1, &[Part::rows("w", &half, 2, 3)]).unwrap_err().to_string();
    assert!(e.contains("rows of `w`"), "{e}");
    io.save(1, &[Part::rows("w", &half, 0, 3)]).unwrap();
    assert!(io.flush(Duration::from_secs(10)).unwrap());
    let m = io.latest().unwrap().unwrap();
    // Row 2 was never saved: not a complete tensor.
    assert!(io.verify(&m).unwrap().iter().any(|p| p.contains("rows are in no shard")));
    let e = io.load(&m, &[Want::whole("w")]).unwrap_err().to_string();
    assert!(e.contains("no piece holds row 2"), "{e}");
    let e = io.load(&m, &[Want::whole("nope")]).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("no such tensor"), "{e}");
    let rows = io.load(&m, &[Want::rows("w", 1, 2)]).unwrap();
    assert_eq!(Vec::<f32>::try_from(rows[0].reshape([-1])).unwrap(), vec![2.0, 3.0]);
}

#[test]
fn the_coordinator_keeps_global_backups_and_snapshots_through_retention() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("memory://backups-{}", std::process::id());
    let open = || {
        let mut c = Config::default();
        c.model.dir = tmp.path().to_path_buf();
        c.model.name = "m".into();
        c.remote.url = url.clone();
        c.shard.rank = Some(0);
        c.shard.world_size = Some(1);
        c.shard.keep = 2;
        ShardedIo::open(&c).unwrap()
    };
    let io = open();
    let value = |s: u64| Tensor::from_slice(&[s as f32; 4]).reshape([2, 2]);
    for (s, loss) in [(1, 3.0), (2, 2.0), (3, 4.0), (4, 1.0), (5, 5.0)] {
        io.save_with_loss(s, &[Part::whole("w", &value(s))], loss).unwrap();
        if s == 2 {
            assert!(io.snapshot());
        }
        assert!(io.flush(Duration::from_secs(10)).unwrap());
    }
    let steps = |all: Vec<modelio::sharded::GlobalManifest>| all.iter().map(|m| m.iterations).collect::<Vec<_>>();
    assert_eq!(steps(io.list().unwrap()), vec![4, 5], "shard.keep = 2");
    let backup = io.backup().unwrap().unwrap();
    assert_eq!((backup.iterations, backup.lowest), (4, 1.0), "the lowest loss after the first");
    let snapshots = io.snapshots().unwrap();
    assert_eq!(steps(snapshots.clone()), vec![2]);
    // Their shards outlive retention: both load, as saved.
    for m in [&backup, &snapshots[0]] {
        assert!(io.verify(m).unwrap().is_empty());
        let got = io.load(m, &[Want::whole("w")]).unwrap();
        assert!(got[0].equal(&value(m.iterations)), "step {}", m.iterations);
    }
    drop(io);
    // A restarted coordinator goes on from the lowest loss recorded.
    let io = open();
    io.save_with_loss(6, &[Part::whole("w", &value(6))], 1.5).unwrap();
    assert!(io.flush(Duration::from_secs(10)).unwrap());
    assert_eq!(io.backup().unwrap().unwrap().iterations, 4);
    io.save_with_loss(7, &[Part::whole("w", &value(7))], 0.5).unwrap();
    assert!(io.flush(Duration::from_secs(10)).unwrap());
    assert_eq!(io.backup().unwrap().unwrap().iterations, 7);
    // A snapshot asked for after its step was committed is made at once.
    assert!(io.snapshot());
    assert_eq!(steps(io.snapshots().unwrap()), vec![2, 7]);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(io.stats().snapshots_failed.load(Relaxed), 0);
}

#[test]
fn a_restarted_job_never_commits_a_dead_runs_shard_nor_saves_silently_over_a_committed_step() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("memory://runs-{}", std::process::id());
    let rows = |v: f32| Tensor::from_slice(&[v; 4]).reshape([2, 2]);
    // Run "a": rank 1 wrote step 3, then the job died before rank 0 did.
    let dead = open_rank(tmp.path(), &url, 1, 2, "a", 5);
    dead.save(3, &[Part::rows("w", &rows(100.0), 2, 4)]).unwrap();
    assert!(dead.flush(Duration::from_secs(10)).unwrap());
    drop(dead);
    // Run "b" saves step 3: its coordinator waits for run b's rank 1, not a's.
    let coordinator = open_rank(tmp.path(), &url, 0, 2, "b", 10);
    let other = open_rank(tmp.path(), &url, 1, 2, "b", 10);
    coordinator.save(3, &[Part::rows("w", &rows(1.0), 0, 4)]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(coordinator.latest().unwrap().is_none(), "run a's shard was not taken for run b's");
    other.save(3, &[Part::rows("w", &rows(2.0), 2, 4)]).unwrap();
    assert!(other.flush(Duration::from_secs(10)).unwrap());
    assert!(coordinator.flush(Duration::from_secs(10)).unwrap());
    let m = coordinator.latest().unwrap().unwrap();
    let w = coordinator.load(&m, &[Want::whole("w")]).unwrap();
    assert_eq!(Vec::<f32>::try_from(w[0].reshape([-1])).unwrap(), vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
    drop((coordinator, other));
    // Run "c" resumes from an older step and saves step 3 again: it is told.
    let coordinator = open_rank(tmp.path(), &url, 0, 2, "c", 10);
    let other = open_rank(tmp.path(), &url, 1, 2, "c", 10);
    other.save(3, &[Part::rows("w", &rows(5.0), 2, 4)]).unwrap();
    coordinator.save(3, &[Part::rows("w", &rows(5.0), 0, 4)]).unwrap();
    assert!(other.flush(Duration::from_secs(10)).unwrap());
    let e = coordinator.flush(Duration::from_secs(10)).unwrap_err();
    assert!(matches!(&e, modelio::Error::StepCommitted { iterations: 3, .. }), "{e:?}");
    assert!(e.to_string().contains("resume from the newest step"), "{e}");
    drop((coordinator, other));
    // A launch that reuses an earlier launch's id is refused: run b's
    // leftovers could otherwise complete its steps.
    let mut c = Config::default();
    c.model.dir = tmp.path().to_path_buf();
    c.model.name = "m".into();
    c.remote.url = url.clone();
    c.shard.rank = Some(0);
    c.shard.world_size = Some(2);
    c.shard.run_id = "b".into();
    let e = ShardedIo::open(&c).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("run id `b` was used by an earlier launch") && e.contains("MODELIO_RUN_ID"), "{e}");
}

#[test]
fn pieces_that_do_not_fit_together_are_never_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("memory://fit-{}", std::process::id());
    let coordinator = open_rank(tmp.path(), &url, 0, 2, "fit", 2);
    let other = open_rank(tmp.path(), &url, 1, 2, "fit", 2);
    let f32s = Tensor::from_slice(&[1f32; 4]).reshape([2, 2]);
    let f64s = Tensor::from_slice(&[2f64; 4]).reshape([2, 2]);
    other.save(1, &[Part::rows("w", &f64s, 2, 4)]).unwrap();
    coordinator.save(1, &[Part::rows("w", &f32s, 0, 4)]).unwrap();
    assert!(other.flush(Duration::from_secs(10)).unwrap());
    let e = coordinator.flush(Duration::from_secs(10)).unwrap_err();
    assert!(matches!(&e, modelio::Error::ShardInconsistent { iterations: 1, .. }), "{e:?}");
    assert!(e.to_string().contains("F64") && e.to_string().contains("F32"), "{e}");
    assert!(coordinator.latest().unwrap().is_none());
}

#[test]
fn a_coordinator_dropped_without_flush_still_commits_its_last_step() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("memory://drop-{}", std::process::id());
    let coordinator = open_rank(tmp.path(), &url, 0, 2, "drop", 10);
    let other = open_rank(tmp.path(), &url, 1, 2, "drop", 10);
    let rows = Tensor::from_slice(&[1f32; 4]).reshape([2, 2]);
    coordinator.save(4, &[Part::rows("w", &rows, 0, 4)]).unwrap();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        other.save(4, &[Part::rows("w", &rows, 2, 4)]).unwrap();
        other
    });
    drop(coordinator);
    let other = late.join().unwrap();
    assert_eq!(other.latest().unwrap().map(|m| m.iterations), Some(4));
}

#[test]
fn a_job_of_several_ranks_without_a_run_id_is_refused_before_it_writes() {
    // The README's first sharded run, restarted: no launcher sets an id, so
    // nothing tells this launch's shards from a dead one's. Every rank says
    // how to set one, and nothing is written.
    let tmp = tempfile::tempdir().unwrap();
    let store = Store { dir: tmp.path().join("model"), url: String::new(), endpoint: String::new(), env: Vec::new() };
    let children: Vec<Child> = (0..3).map(|r| rank(&store, "train", r, 3, None, &["2", "0"])).collect();
    for (r, child) in children.into_iter().enumerate() {
        let (ok, text) = output(child);
        assert!(!ok, "rank {r} started without a run id: {text}");
        assert!(text.contains("needs a run id") && text.contains("MODELIO_RUN_ID") && text.contains("shard.run_id"), "rank {r}: {text}");
    }
    assert!(!store.dir.join("m/sharded/steps").exists(), "a refused rank wrote a shard");
    // A single rank needs none: it is the whole run.
    let (ok, text) = output(rank(&store, "train", 0, 1, None, &["2", "0"]));
    assert!(ok && text.contains("flushed true"), "{text}");
}

/// Two ranks of one run in this process, on a folder store; rank 1 may be
/// given `f64` rows of steps in `bad` (pieces that never commit together).
fn two_ranks(dir: &Path, snapshot_keep: usize) -> (ShardedIo, ShardedIo) {
    let open = |rank| {
        // Long enough for a slow rank 1 on a busy machine: every step here commits or fails before it.
        let mut c = rank_config(dir, "", rank, 2, "two", 600);
        c.shard.keep = 0;
        c.snapshot.keep = snapshot_keep;
        ShardedIo::open(&c).unwrap()
    };
    (open(0), open(1))
}

#[test]
fn every_snapshot_requested_of_a_step_that_commits_is_made_or_reported() {
    use std::sync::atomic::Ordering::Relaxed;
    let tmp = tempfile::tempdir().unwrap();
    let (coordinator, other) = two_ranks(tmp.path(), 0);
    let rows = |v: f32| Tensor::from_slice(&[v; 4]).reshape([2, 2]);
    // Rank 0 saves and asks for a snapshot at every step while rank 1 has
    // not saved any yet: every request waits for its step's commit.
    for s in 1..=10u64 {
        coordinator.save(s, &[Part::rows("w", &rows(s as f32), 0, 4)]).unwrap();
        assert!(coordinator.snapshot(), "step {s}");
    }
    // Rank 1, slower, saves them all; its step 7 does not fit rank 0's.
    for s in 1..=10u64 {
        let mine = if s == 7 { Tensor::from_slice(&[7f64; 4]).reshape([2, 2]) } else { rows(s as f32) };
        other.save(s, &[Part::rows("w", &mine, 2, 4)]).unwrap();
    }
    assert!(other.flush(Duration::from_secs(600)).unwrap());
    let e = coordinator.flush(Duration::from_secs(600)).unwrap_err();
    assert!(matches!(e, modelio::Error::ShardInconsistent { iterations: 7, .. }), "{e:?}");
    // The snapshot of step 7 is reported as not made, not dropped.
    let e = coordinator.flush(Duration::from_secs(600)).unwrap_err();
    assert!(matches!(e, modelio::Error::ShardSnapshot { iterations: 7, .. }), "{e:?}");
    assert!(e.to_string().contains("no snapshot of sharded step 7"), "{e}");
    assert!(coordinator.flush(Duration::from_secs(600)).unwrap());
    let steps: Vec<u64> = coordinator.snapshots().unwrap().iter().map(|m| m.iterations).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6, 8, 9, 10]);
    assert_eq!((coordinator.stats().snapshots.load(Relaxed), coordinator.stats().snapshots_failed.load(Relaxed)), (9, 1));
    for m in coordinator.snapshots().unwrap() {
        let w = coordinator.load(&m, &[Want::whole("w")]).unwrap();
        assert!(w[0].equal(&rows(m.iterations as f32).repeat([2, 1])), "snapshot of step {}", m.iterations);
    }
}

/// With `staging.cpu_copy = "protect"` a rank's save holds its rows as they
/// were at the call, though they are overwritten as soon as it returns.
#[test]
fn a_ranks_protected_save_holds_the_values_at_the_call() {
    let tmp = tempfile::tempdir().unwrap();
    let open = |rank| {
        let mut c = rank_config(tmp.path(), "", rank, 2, "protect", 600);
        c.shard.keep = 0;
        c.staging.cpu_copy = modelio::config::CpuCopy::Protect;
        ShardedIo::open(&c).unwrap()
    };
    let ranks = [open(0), open(1)];
    let rows = [Tensor::zeros([256, 1024], (Kind::Float, Device::Cpu)), Tensor::zeros([256, 1024], (Kind::Float, Device::Cpu))];
    for s in 1..=5u64 {
        for (r, (io, t)) in ranks.iter().zip(&rows).enumerate() {
            let _ = t.shallow_clone().fill_(s as f64);
            io.save(s, &[Part::rows("w", t, 256 * r, 512)]).unwrap();
            let _ = t.shallow_clone().fill_(-1.0);
        }
    }
    for io in ranks.iter().rev() {
        assert!(io.flush(Duration::from_secs(600)).unwrap());
    }
    let steps = ranks[0].list().unwrap();
    assert_eq!(steps.len(), 5);
    for m in steps {
        let w = ranks[0].load(&m, &[Want::whole("w")]).unwrap();
        assert!(w[0].equal(&Tensor::full([512, 1024], m.iterations as f64, (Kind::Float, Device::Cpu))), "step {}", m.iterations);
    }
}

#[test]
fn flush_names_the_oldest_failure_when_many_are_waiting() {
    let tmp = tempfile::tempdir().unwrap();
    let (coordinator, other) = two_ranks(tmp.path(), 0);
    // 20 steps that cannot be committed: more failures than `flush` keeps.
    for s in 1..=20u64 {
        coordinator.save(s, &[Part::rows("w", &Tensor::from_slice(&[1f32; 4]).reshape([2, 2]), 0, 4)]).unwrap();
        other.save(s, &[Part::rows("w", &Tensor::from_slice(&[1f64; 4]).reshape([2, 2]), 2, 4)]).unwrap();
    }
    assert!(other.flush(Duration::from_secs(600)).unwrap());
    let e = coordinator.flush(Duration::from_secs(600)).unwrap_err();
    assert!(matches!(e, modelio::Error::ShardInconsistent { iterations: 1, .. }), "the oldest failure first: {e:?}");
    let e = coordinator.flush(Duration::from_secs(600)).unwrap_err();
    assert!(matches!(e, modelio::Error::ShardInconsistent { iterations: 2, .. }), "then the next: {e:?}");
}

#[test]
fn an_optimizers_state_saves_by_rows_and_resumes_on_another_world_size() {
    use modelio::sharded::{optimizer_json, optimizer_state, OPTIMIZER_JSON};
    use modelio::{Adam, Optimizer};
    let tmp = tempfile::tempdir().unwrap();
    let (coordinator, other) = two_ranks(tmp.path(), 0);
    let whole = Tensor::arange(8, (Kind::Float, Device::Cpu)).reshape([4, 2]);
    // Each rank trains its two rows of `w` with an Adam of its own.
    let train = |lo: i64| {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let w = vs.root().var_copy("w", &whole.narrow(0, lo, 2));
        let mut opt = Adam::adam(&vs, 0.1, (0.9, 0.999), 1e-8, 0.0).unwrap();
        for _ in 0..3 {
            opt.zero_grad();
            (&w * &w).sum(Kind::Float).backward();
            opt.step().unwrap();
        }
        (vs, w, opt)
    };
    let ranks = [(&coordinator, train(0), 0), (&other, train(2), 2)];
    for (io, (_, w, opt), lo) in &ranks {
        let state = opt.state_tensors();
        let json = optimizer_json(opt).unwrap();
        let mut parts = vec![Part::rows("w", w, *lo, 4)];
        parts.extend(state.iter().map(|(name, t)| Part::rows(name, t, *lo, 4)));
        if *lo == 0 {
            parts.push(Part::whole(OPTIMIZER_JSON, &json));
        }
        io.save(3, &parts).unwrap();
    }
    assert!(other.flush(Duration::from_secs(600)).unwrap());
    assert!(coordinator.flush(Duration::from_secs(600)).unwrap());
    // One rank resumes all of it: the optimizer takes the whole state.
    let m = coordinator.latest().unwrap().unwrap();
    let got = coordinator.load(&m, &["w", "w.exp_avg", "w.exp_avg_sq", OPTIMIZER_JSON].map(Want::whole)).unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _w = vs.root().var_copy("w", &got[0]);
    let mut resumed = Adam::adam(&vs, 0.1, (0.9, 0.999), 1e-8, 0.0).unwrap();
    let tensors = [("w.exp_avg".to_string(), got[1].shallow_clone()), ("w.exp_avg_sq".to_string(), got[2].shallow_clone())];
    resumed.load_state(&optimizer_state(&got[3], tensors).unwrap()).unwrap();
    assert_eq!(resumed.state_json()["step"], 3);
    let saved = |i: usize| Tensor::cat(&[&ranks[0].1 .2.state_tensors()[i].1, &ranks[1].1 .2.state_tensors()[i].1], 0);
    for (i, (name, t)) in resumed.state_tensors().iter().enumerate() {
        assert!(t.equal(&saved(i)), "{name}");
    }
    // Another kind of optimizer is told what the step holds.
    let mut sgd = modelio::Sgd::new(&vs, 0.1, 0.9, 0.0, 0.0, false);
    let e = sgd.load_state(&optimizer_state(&got[3], []).unwrap()).unwrap_err().to_string();
    assert!(e.contains("`adam`"), "{e}");
}

/// Rank `rank` of `world` ranks of run `run` on a folder store.
fn folder_rank(dir: &Path, rank: usize, world: usize, run: &str) -> ShardedIo {
    let mut c = rank_config(dir, "", rank, world, run, 600);
    c.shard.keep = 0;
    ShardedIo::open(&c).unwrap()
}

/// `[start, end)` of `n` split into `parts` near-equal runs, the `i`-th.
fn split(n: usize, parts: usize, i: usize) -> (usize, usize) {
    (n * i / parts, n * (i + 1) / parts)
}

#[test]
fn boxes_saved_split_one_way_load_split_any_other_way_bitwise() {
    // `cols` is a row-parallel layer's weight: three ranks hold three
    // column blocks; `rows` is split along its first dimension; `cube` is
    // cut in two dimensions at once. Values are random bit patterns of
    // every width, so a misplaced element is seen.
    let mut rng = Rng(21);
    let random = |rng: &mut Rng, kind: Kind, shape: &[i64]| {
        let n: i64 = shape.iter().product();
        let bytes: Vec<u8> = (0..n * kind.elt_size_in_bytes() as i64).map(|_| rng.below(256) as u8).collect();
        // NaN payloads survive: the bits are compared, not the values.
        Tensor::from_data_size(&bytes, shape, kind)
    };
    let cols = random(&mut rng, Kind::Float, &[6, 9]);
    let rows = random(&mut rng, Kind::Double, &[9, 4]);
    let cube = random(&mut rng, Kind::BFloat16, &[4, 6, 5]);
    let bits = |t: &Tensor| Vec::<u8>::try_from(t.contiguous().view_dtype(Kind::Uint8).reshape([-1])).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let savers: Vec<ShardedIo> = (0..3).map(|r| folder_rank(tmp.path(), r, 3, "boxes")).collect();
    for (r, io) in savers.iter().enumerate() {
        let (c0, c1) = split(9, 3, r);
        let (r0, r1) = split(9, 3, r);
        let (d0, d1) = split(6, 3, r);
        let col_block = cols.narrow(1, c0 as i64, (c1 - c0) as i64);
        let row_block = rows.narrow(0, r0 as i64, (r1 - r0) as i64);
        // The cube: rank r holds depth rows 0..2 or 2..4 (by parity) of
        // its third of dimension 1, and the rest of dimension 1 is held by
        // the next rank: every element is held once.
        let cube_a = cube.narrow(1, d0 as i64, (d1 - d0) as i64).narrow(0, 0, 2);
        let next = split(6, 3, (r + 1) % 3);
        let cube_b = cube.narrow(1, next.0 as i64, (next.1 - next.0) as i64).narrow(0, 2, 2);
        io.save(
            5,
            &[
                Part::boxed("cols", &col_block, &[0, c0], &[6, 9]),
                Part::rows("rows", &row_block, r0, 9),
                Part::boxed("cube.a", &cube_a, &[0, d0, 0], &[4, 6, 5]),
                Part::boxed("cube.b", &cube_b, &[2, next.0, 0], &[4, 6, 5]),
            ],
        )
        .unwrap();
    }
    for io in savers.iter().rev() {
        assert!(io.flush(Duration::from_secs(600)).unwrap());
    }
    drop(savers);
    // A different world loads from the same folder: any rank can read.
    let reader = folder_rank(tmp.path(), 0, 1, "load");
    let m = reader.latest().unwrap().unwrap();
    assert_eq!((m.iterations, m.world_size), (5, 3));
    let problems = reader.verify(&m).unwrap();
    assert!(problems.len() == 2 && problems.iter().all(|p| p.contains("cube.") && p.contains("in no shard")), "{problems:?}");
    // Two ranks, split the other way: `cols` by rows, `rows` by columns.
    let mut cols_by_rows = Vec::new();
    let mut rows_by_cols = Vec::new();
    for r in 0..2 {
        let (a, b) = split(6, 2, r);
        let (c, d) = split(4, 2, r);
        let got = reader.load(&m, &[Want::rows("cols", a, b), Want::boxed("rows", &[0, c], &[9, d - c])]).unwrap();
        assert_eq!(got[0].size(), [(b - a) as i64, 9]);
        assert_eq!(got[1].size(), [9, (d - c) as i64]);
        cols_by_rows.push(got[0].shallow_clone());
        rows_by_cols.push(got[1].shallow_clone());
    }
    assert_eq!(bits(&Tensor::cat(&cols_by_rows, 0)), bits(&cols));
    assert_eq!(bits(&Tensor::cat(&rows_by_cols, 1)), bits(&rows));
    // Four ranks, a 2 x 2 grid of uneven blocks of each matrix.
    for (name, whole) in [("cols", &cols), ("rows", &rows)] {
        let (h, w) = (whole.size()[0] as usize, whole.size()[1] as usize);
        let mut grid = Vec::new();
        for i in 0..2 {
            let (r0, r1) = (if i == 0 { 0 } else { h / 3 }, if i == 0 { h / 3 } else { h });
            let mut line = Vec::new();
            for j in 0..2 {
                let (c0, c1) = (if j == 0 { 0 } else { w - 1 }, if j == 0 { w - 1 } else { w });
                let got = reader.load(&m, &[Want::boxed(name, &[r0, c0], &[r1 - r0, c1 - c0])]).unwrap();
                line.push(got.into_iter().next().unwrap());
            }
            grid.push(Tensor::cat(&line, 1));
        }
        assert_eq!(bits(&Tensor::cat(&grid, 0)), bits(whole), "{name} from a 2 x 2 grid");
    }
    // One rank: everything whole, the cube from its two halves.
    let got = reader.load(&m, &[Want::whole("cols"), Want::whole("rows"), Want::whole("cube.a"), Want::whole("cube.b")]);
    let e = got.unwrap_err().to_string();
    assert!(e.contains("cube.a") && e.contains("no piece holds"), "each half holds half the cube: {e}");
    let got = reader.load(&m, &[Want::whole("cols"), Want::whole("rows")]).unwrap();
    assert_eq!((bits(&got[0]), bits(&got[1])), (bits(&cols), bits(&rows)));
    let a = reader.load(&m, &[Want::boxed("cube.a", &[0, 0, 0], &[2, 6, 5])]).unwrap();
    let b = reader.load(&m, &[Want::boxed("cube.b", &[2, 0, 0], &[2, 6, 5])]).unwrap();
    assert_eq!(bits(&Tensor::cat(&[&a[0], &b[0]], 0)), bits(&cube));
    // A box of a box that straddles two ranks' pieces in two dimensions.
    let got = reader.load(&m, &[Want::boxed("cube.b", &[2, 1, 1], &[2, 4, 3])]).unwrap();
    assert_eq!(bits(&got[0]), bits(&cube.narrow(0, 2, 2).narrow(1, 1, 4).narrow(2, 1, 3)));
    // A box outside the tensor, or with the wrong number of dimensions, is named.
    for want in [Want::boxed("cols", &[0, 8], &[6, 2]), Want::boxed("cols", &[0], &[6])] {
        let e = reader.load(&m, &[want]).unwrap_err().to_string();
        assert!(e.contains("cols") && e.contains("[6, 9]"), "{e}");
    }
    // A part whose box does not fit its global shape is refused at the call.
    let io = folder_rank(tmp.path(), 0, 1, "refused");
    let e = io.save(6, &[Part::boxed("cols", &cols, &[0, 1], &[6, 9])]).unwrap_err();
    assert!(matches!(e, modelio::Error::Argument { .. }) && e.to_string().contains("the box of `cols`"), "{e}");
}

/// Launch `run`, of 2 ranks, commits step `committed` (`w` = 1s), then
/// its coordinator gives up on step `left` before rank 1's record is there,
/// and rank 1 writes it (`w` = 2s over 3s): the store holds what a
/// coordinator killed after every record was written and before its commit
/// leaves behind.
fn dead_launch(dir: &Path, run: &str, committed: u64, left: u64) {
    let rows = |v: f32| Tensor::from_slice(&[v; 6]).reshape([2, 3]);
    let coordinator = open_rank(dir, "", 0, 2, run, 1);
    let other = open_rank(dir, "", 1, 2, run, 1);
    other.save(committed, &[Part::rows("w", &rows(1.0), 2, 4)]).unwrap();
    assert!(other.flush(Duration::from_secs(600)).unwrap());
    coordinator.save(committed, &[Part::rows("w", &rows(1.0), 0, 4)]).unwrap();
    assert!(coordinator.flush(Duration::from_secs(600)).unwrap());
    coordinator.save(left, &[Part::rows("w", &rows(2.0), 0, 4)]).unwrap();
    let e = coordinator.flush(Duration::from_secs(600)).unwrap_err();
    assert!(matches!(e, modelio::Error::ShardMissing { rank: 1, .. }), "{e:?}");
    other.save(left, &[Part::rows("w", &rows(3.0), 2, 4)]).unwrap();
    assert!(other.flush(Duration::from_secs(600)).unwrap());
}

/// What `dead_launch` saved at its uncommitted step.
fn left_whole() -> Tensor {
    Tensor::cat(&[Tensor::from_slice(&[2f32; 6]), Tensor::from_slice(&[3f32; 6])], 0).reshape([4, 3])
}

#[test]
fn a_step_written_whole_by_a_launch_that_died_before_its_commit_is_committed_by_the_next() {
    use std::sync::atomic::Ordering::Relaxed;
    let tmp = tempfile::tempdir().unwrap();
    dead_launch(tmp.path(), "dead", 1, 2);
    // A reader never writes: it sees step 1, and cannot save.
    let reader = ShardedIo::open_reader(&rank_config(tmp.path(), "", 0, 1, "", 600)).unwrap();
    assert_eq!(reader.latest().unwrap().map(|m| m.iterations), Some(1));
    let e = reader.save(9, &[Part::whole("w", &left_whole())]).unwrap_err();
    assert!(e.to_string().contains("open_reader"), "{e}");
    drop(reader);
    // A single rank opened beside a job leaves a step whose records are
    // younger than its commit deadline to that job.
    let single = open_rank(tmp.path(), "", 0, 1, "single", 600);
    assert_eq!(single.stats().recovered.load(Relaxed), 0);
    assert_eq!(single.latest().unwrap().map(|m| m.iterations), Some(1));
    drop(single);
    // The next launch, of 3 ranks: the first rank to open (not the
    // coordinator) commits step 2 before its open returns.
    let late = open_rank(tmp.path(), "", 2, 3, "next", 10);
    assert_eq!(late.stats().recovered.load(Relaxed), 1);
    let m = late.latest().unwrap().unwrap();
    assert_eq!((m.iterations, m.world_size, m.loss), (2, 2, None));
    assert!(late.verify(&m).unwrap().is_empty());
    let w = late.load(&m, &[Want::whole("w")]).unwrap();
    assert!(w[0].equal(&left_whole()));
    // The others find it committed and resume from it too.
    let coordinator = open_rank(tmp.path(), "", 0, 3, "next", 10);
    assert_eq!(coordinator.stats().recovered.load(Relaxed), 0);
    assert_eq!(coordinator.latest().unwrap().map(|m| m.iterations), Some(2));
}

#[test]
fn a_single_rank_commits_a_dead_launchs_step_once_its_records_are_older_than_its_deadline() {
    use std::sync::atomic::Ordering::Relaxed;
    let tmp = tempfile::tempdir().unwrap();
    dead_launch(tmp.path(), "dead", 1, 2);
    // Its deadline is one second: the records age past it.
    let waited = Instant::now();
    loop {
        let single = open_rank(tmp.path(), "", 0, 1, "", 1);
        if single.stats().recovered.load(Relaxed) == 1 {
            assert!(single.load(&single.latest().unwrap().unwrap(), &[Want::whole("w")]).unwrap()[0].equal(&left_whole()));
            break;
        }
        assert_eq!(single.latest().unwrap().map(|m| m.iterations), Some(1));
        assert!(waited.elapsed() < Duration::from_secs(120), "never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_dead_launchs_step_is_never_committed_over_a_newer_commit_nor_from_two_runs() {
    use std::sync::atomic::Ordering::Relaxed;
    let tmp = tempfile::tempdir().unwrap();
    dead_launch(tmp.path(), "dead", 10, 20);
    // A trainer of one rank resumes from step 10 (step 20's records are
    // too young for it) and commits step 15.
    let single = open_rank(tmp.path(), "", 0, 1, "", 600);
    assert_eq!(single.latest().unwrap().map(|m| m.iterations), Some(10));
    single.save(15, &[Part::whole("w", &Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)))]).unwrap();
    assert!(single.flush(Duration::from_secs(600)).unwrap());
    drop(single);
    // Step 21: rank 0's record of run "x", rank 1's of run "y".
    let x = open_rank(tmp.path(), "", 0, 2, "x", 1);
    x.save(21, &[Part::rows("w", &Tensor::ones([2, 3], (Kind::Float, Device::Cpu)), 0, 4)]).unwrap();
    assert!(x.flush(Duration::from_secs(600)).is_err());
    let y = open_rank(tmp.path(), "", 1, 2, "y", 1);
    y.save(21, &[Part::rows("w", &Tensor::ones([2, 3], (Kind::Float, Device::Cpu)), 2, 4)]).unwrap();
    assert!(y.flush(Duration::from_secs(600)).unwrap());
    drop((x, y));
    // A new launch takes neither step 20 (older than the commit of 15) nor 21.
    let next = open_rank(tmp.path(), "", 1, 2, "next", 10);
    assert_eq!(next.stats().recovered.load(Relaxed), 0);
    assert_eq!(next.latest().unwrap().map(|m| m.iterations), Some(15));
}

#[test]
fn empty_tensors_and_empty_boxes_load_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let (coordinator, other) = two_ranks(tmp.path(), 0);
    let empty = Tensor::zeros([0, 4], (Kind::Float, Device::Cpu));
    let w = Tensor::arange(9, (Kind::Float, Device::Cpu)).reshape([3, 3]);
    // Rank 1 holds no rows of `w` (an uneven split of 3 rows over 2 ranks
    // gives one rank none when the split is 3 + 0).
    other.save(1, &[Part::rows("w", &w.narrow(0, 3, 0), 3, 3), Part::whole("empty", &empty)]).unwrap();
    coordinator.save(1, &[Part::rows("w", &w, 0, 3)]).unwrap();
    assert!(other.flush(Duration::from_secs(600)).unwrap());
    assert!(coordinator.flush(Duration::from_secs(600)).unwrap());
    let m = coordinator.latest().unwrap().unwrap();
    assert!(coordinator.verify(&m).unwrap().is_empty(), "{:?}", coordinator.verify(&m));
    let got = coordinator.load(&m, &[Want::whole("empty"), Want::rows("w", 2, 2), Want::rows("w", 3, 3), Want::whole("w")]).unwrap();
    assert_eq!(got[0].size(), [0, 4]);
    assert_eq!((got[1].size(), got[2].size()), (vec![0, 3], vec![0, 3]));
    assert!(got[3].equal(&w));
}

#[test]
fn verify_names_the_rank_whose_shard_is_damaged_or_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let (coordinator, other) = two_ranks(tmp.path(), 0);
    let rows = |v: f32| Tensor::from_slice(&[v; 4]).reshape([2, 2]);
    other.save(1, &[Part::rows("w", &rows(2.0), 2, 4)]).unwrap();
    coordinator.save(1, &[Part::rows("w", &rows(1.0), 0, 4)]).unwrap();
    assert!(other.flush(Duration::from_secs(600)).unwrap());
    assert!(coordinator.flush(Duration::from_secs(600)).unwrap());
    let m = coordinator.latest().unwrap().unwrap();
    assert!(coordinator.verify(&m).unwrap().is_empty());
    let shard = |rank: usize| {
        let dir = tmp.path().join(format!("m/sharded/steps/{:020}", 1));
        let prefix = format!("rank-{rank}-");
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&prefix))
            .unwrap()
    };
    // One byte of rank 1's tensor flipped (a new file: committed files are
    // never changed in place).
    let path = shard(1);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = m.shards[1].pieces[0].data_offset as usize;
    bytes[at] ^= 0x40;
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let problems = coordinator.verify(&m).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("rank 1: ") && problems[0].contains("differs from its done-record"), "{problems:?}");
    let e = coordinator.load(&m, &[Want::whole("w")]).unwrap_err().to_string();
    assert!(e.contains("CRC-32C"), "{e}");
    // Rank 0's shard gone as well.
    std::fs::remove_file(shard(0)).unwrap();
    let problems = coordinator.verify(&m).unwrap();
    assert!(problems.iter().any(|p| p.starts_with("rank 0: ") && p.contains("is missing")), "{problems:?}");
}

/// A store that refuses any single put larger than `limit` bytes, as S3
/// refuses one over 5 GiB, and counts the parts of multipart uploads: how
/// many, and the most being sent at once.
#[derive(Debug)]
struct Capped {
    inner: object_store::memory::InMemory,
    limit: usize,
    counts: Arc<PartCounts>,
}

#[derive(Debug, Default)]
struct PartCounts {
    parts: std::sync::atomic::AtomicUsize,
    sending: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    /// Every part fails while set.
    failing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Display for Capped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Capped({})", self.limit)
    }
}

#[derive(Debug)]
struct CountedUpload {
    inner: Box<dyn object_store::MultipartUpload>,
    counts: Arc<PartCounts>,
}

#[async_trait::async_trait]
impl object_store::MultipartUpload for CountedUpload {
    fn put_part(&mut self, data: object_store::PutPayload) -> object_store::UploadPart {
        use std::sync::atomic::Ordering::SeqCst;
        let counts = self.counts.clone();
        counts.parts.fetch_add(1, SeqCst);
        let now = counts.sending.fetch_add(1, SeqCst) + 1;
        counts.most.fetch_max(now, SeqCst);
        let part = self.inner.put_part(data);
        let failing = counts.failing.load(SeqCst);
        Box::pin(async move {
            if failing {
                counts.sending.fetch_sub(1, SeqCst);
                return Err(object_store::Error::Generic { store: "Capped", source: "the part was refused".into() });
            }
            // Give the writer time to fill more parts if it would.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let done = part.await;
            counts.sending.fetch_sub(1, SeqCst);
            done
        })
    }
    async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
        self.inner.complete().await
    }
    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for Capped {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        if payload.content_length() > self.limit {
            let source = format!("a single put of {} bytes is over this store's limit of {}", payload.content_length(), self.limit);
            return Err(object_store::Error::Generic { store: "Capped", source: source.into() });
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(CountedUpload { inner, counts: self.counts.clone() }))
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&object_store::path::Path>) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[test]
fn a_shard_larger_than_any_single_put_streams_up_in_parts() {
    use object_store::{ObjectStore, ObjectStoreExt};
    use std::sync::atomic::Ordering::SeqCst;
    let counts = Arc::new(PartCounts::default());
    let store = Arc::new(Capped { inner: object_store::memory::InMemory::new(), limit: 6 << 20, counts: counts.clone() });
    // The cap is real: a put of one 7 MiB object is refused.
    let big = object_store::PutPayload::from(vec![0u8; 7 << 20]);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert!(rt.block_on(store.put(&object_store::path::Path::from("probe"), big)).is_err());
    let name = format!("capped-{}", std::process::id());
    modelio::remote::register_store(&name, store.clone() as Arc<dyn ObjectStore>);
    let tmp = tempfile::tempdir().unwrap();
    let mut c = rank_config(tmp.path(), &format!("memory://{name}"), 0, 1, "", 600);
    c.remote.part_size_mib = 5;
    c.remote.parts_in_flight = 2;
    let io = ShardedIo::open(&c).unwrap();
    // 24 MiB of distinct values: five parts of 5 MiB, none whole in one put.
    let w = Tensor::arange(6 << 20, (Kind::Float, Device::Cpu)).reshape([6 << 10, 1 << 10]);
    let b = Tensor::from_slice(&[1.5f64, -2.5]);
    io.save(1, &[Part::whole("w", &w), Part::whole("b", &b)]).unwrap();
    assert!(io.flush(Duration::from_secs(600)).unwrap());
    let (parts, most) = (counts.parts.load(SeqCst), counts.most.load(SeqCst));
    assert!(parts >= 5, "{parts} parts");
    assert!(most <= 2, "{most} parts were being sent at once, more than parts_in_flight");
    let m = io.latest().unwrap().unwrap();
    assert!(io.verify(&m).unwrap().is_empty());
    let got = io.load(&m, &[Want::whole("w"), Want::rows("w", 3000, 3001), Want::whole("b")]).unwrap();
    assert!(got[0].equal(&w) && got[1].equal(&w.narrow(0, 3000, 1)) && got[2].equal(&b));
    // A part the store refuses fails that save, reported once; the next
    // save streams up whole.
    counts.failing.store(true, SeqCst);
    io.save(2, &[Part::whole("w", &w), Part::whole("b", &b)]).unwrap();
    let e = io.flush(Duration::from_secs(600)).unwrap_err();
    let report = e.report().to_string();
    assert!(matches!(e, modelio::Error::Remote { op: "upload part of", .. }) && report.contains("the part was refused"), "{report}");
    counts.failing.store(false, SeqCst);
    let w3 = &w + 1;
    io.save(3, &[Part::whole("w", &w3), Part::whole("b", &b)]).unwrap();
    assert!(io.flush(Duration::from_secs(600)).unwrap());
    let m = io.latest().unwrap().unwrap();
    assert_eq!(m.iterations, 3);
    assert!(io.load(&m, &[Want::whole("w")]).unwrap()[0].equal(&w3));
    // On a shared folder the parts go straight into the shard's file.
    let mut c = rank_config(tmp.path(), "", 0, 1, "", 600);
    c.remote.part_size_mib = 5;
    let io = ShardedIo::open(&c).unwrap();
    io.save(1, &[Part::whole("w", &w)]).unwrap();
    assert!(io.flush(Duration::from_secs(600)).unwrap());
    let m = io.latest().unwrap().unwrap();
    assert!(io.verify(&m).unwrap().is_empty());
    assert!(io.load(&m, &[Want::whole("w")]).unwrap()[0].equal(&w));
}

/// The plan of rank `r` of `world` in the VarStore tests: `fc1.weight`
/// (6 x 4) split by rows as a column-parallel layer's, `fc2.weight` (3 x 6)
/// by columns as a row-parallel layer's, `bias` replicated.
fn layer_plan(r: usize, world: usize) -> (modelio::sharded::Plan, (usize, usize)) {
    let (lo, hi) = split(6, world, r);
    (modelio::sharded::Plan::new().rows("fc1.weight", lo, 6).boxed("fc2.weight", &[0, lo], &[3, 6]), (lo, hi))
}

/// Rank `r` of `world`'s VarStore under `layer_plan`, its pieces cut from
/// `fc1`, `fc2` and `bias`, and an AdamW over it.
fn layer_rank(r: usize, world: usize, [fc1, fc2, bias]: &[Tensor; 3]) -> (tch::nn::VarStore, modelio::Adam) {
    let (_, (lo, hi)) = layer_plan(r, world);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let n = (hi - lo) as i64;
    let _ = (&root / "fc1").var_copy("weight", &fc1.narrow(0, lo as i64, n));
    let _ = (&root / "fc2").var_copy("weight", &fc2.narrow(1, lo as i64, n));
    let _ = root.var_copy("bias", bias);
    let opt = modelio::Adam::adamw(&vs, 1e-2, (0.9, 0.999), 1e-8, 0.01).unwrap();
    (vs, opt)
}

/// A training step of any rank: an element's gradient is its own.
fn layer_step(vs: &tch::nn::VarStore, opt: &mut modelio::Adam) {
    opt.zero_grad();
    let loss = vs.trainable_variables().iter().map(|v| (v * v).sum(Kind::Float)).fold(Tensor::from(0f32), |a, b| a + b);
    loss.backward();
    opt.step().unwrap();
}

/// Rank `r`'s tensors of a VarStore and its optimizer, by name, copied.
fn held(vs: &tch::nn::VarStore, opt: &modelio::Adam) -> Vec<(String, Tensor)> {
    use modelio::Optimizer;
    let mut out: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
    out.extend(opt.state_tensors().into_iter().map(|(n, t)| (n, t.copy())));
    out
}

/// The global tensor `name` assembled from every rank's pieces.
fn assemble(name: &str, ranks: &[Vec<(String, Tensor)>]) -> Tensor {
    let piece = |r: &Vec<(String, Tensor)>| r.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone()).unwrap();
    let pieces: Vec<Tensor> = ranks.iter().map(piece).collect();
    if name.starts_with("bias") {
        return pieces[0].shallow_clone();
    }
    Tensor::cat(&pieces, if name.starts_with("fc2") { 1 } else { 0 })
}

#[test]
fn ranks_save_a_varstore_and_adam_under_a_plan_and_resume_on_other_world_sizes_bitwise() {
    use modelio::Optimizer;
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("memory://plan-{}", std::process::id());
    let init = || {
        [
            Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([6, 4]) * 0.1,
            Tensor::arange(18, (Kind::Float, Device::Cpu)).reshape([3, 6]) * -0.2,
            Tensor::from_slice(&[0.5f32, -1.0, 2.0]),
        ]
    };
    // Three ranks train in async loops, save every step and end with
    // `finish`: its exit save is step 4.
    let trained: Vec<Vec<(String, Tensor)>> = std::thread::scope(|s| {
        let ranks: Vec<_> = (0..3)
            .map(|r| {
                let (dir, url) = (tmp.path(), url.clone());
                s.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    rt.block_on(async move {
                        let io = open_rank(dir, &url, r, 3, "plan-a", 600);
                        let (plan, _) = layer_plan(r, 3);
                        let (vs, mut opt) = layer_rank(r, 3, &init());
                        for step in 1..=3 {
                            layer_step(&vs, &mut opt);
                            io.record(1.0 / step as f64);
                            let saved = io.save_vars_async(step, &vs, Some(&opt), &plan).await.unwrap().await.unwrap();
                            // The coordinator's ticket waits for the commit.
                            assert_eq!((saved.iterations, saved.committed, saved.skipped), (step, r == 0, false));
                        }
                        layer_step(&vs, &mut opt);
                        let finished = io.finish(4, &vs, Some(&opt), &plan).await.unwrap();
                        assert!(finished.unreported.is_empty(), "{:?}", finished.unreported);
                        // Every rank learns that the exit step committed.
                        assert_eq!((finished.exit_save.iterations, finished.exit_save.committed), (4, true), "rank {r}");
                        held(&vs, &opt)
                    })
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let names: Vec<String> = trained[0].iter().map(|(n, _)| n.clone()).collect();
    let global: Vec<(String, Tensor)> = names.iter().map(|n| (n.clone(), assemble(n, &trained))).collect();
    // Two ranks, then one, resume step 4 under their own plans: each holds
    // its boxes of what the three ranks held at the exit save, its
    // optimizer included, bitwise.
    for world in [2, 1] {
        let run = format!("plan-{world}");
        let opened: Vec<ShardedIo> = (0..world).map(|r| open_rank(tmp.path(), &url, r, world, &run, 600)).collect();
        let zeros = [
            Tensor::zeros([6, 4], (Kind::Float, Device::Cpu)),
            Tensor::zeros([3, 6], (Kind::Float, Device::Cpu)),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        ];
        let mut resumed = Vec::new();
        for (r, io) in opened.iter().enumerate() {
            let (plan, _) = layer_plan(r, world);
            let (vs, mut opt) = layer_rank(r, world, &zeros);
            let got = io.resume(&vs, Some(&mut opt), &plan).unwrap().unwrap();
            assert_eq!(got.iterations, 4);
            assert_eq!(got.optimizer, modelio::OptimizerResume::Restored);
            assert_eq!(opt.state_json()["step"], 4);
            resumed.push(held(&vs, &opt));
        }
        for (name, whole) in &global {
            assert!(assemble(name, &resumed).equal(whole), "{name} on {world} ranks");
        }
    }
    // A step saved without an optimizer says so; a plan naming a variable
    // the VarStore lacks is refused before anything is saved.
    let io = open_rank(tmp.path(), &url, 0, 1, "plan-b", 600);
    let (vs, mut opt) = layer_rank(0, 1, &init());
    let (plan, _) = layer_plan(0, 1);
    io.save_vars(5, &vs, None, &plan).unwrap().wait_blocking().unwrap();
    let got = io.resume(&vs, Some(&mut opt), &plan).unwrap().unwrap();
    assert!(matches!(got.optimizer, modelio::OptimizerResume::Missing(ref why) if why.contains("step 5")), "{:?}", got.optimizer);
    let e = io.save_vars(6, &vs, None, &plan.clone().rows("fc3.weight", 0, 2)).unwrap_err().to_string();
    assert!(e.contains("fc3.weight"), "{e}");
    // A plan of another global shape is refused, naming both.
    let e = io.resume(&vs, None, &modelio::sharded::Plan::new().rows("fc1.weight", 0, 12)).unwrap_err().to_string();
    assert!(e.contains("fc1.weight") && e.contains("[12, 4]") && e.contains("[6, 4]"), "{e}");
    // A loop that saves its last step, then stops, ends with `finish` at
    // that step: it is not saved twice (which could not commit).
    io.save_vars(7, &vs, Some(&opt), &plan).unwrap().wait_blocking().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let finished = rt.block_on(io.finish(7, &vs, Some(&opt), &plan)).unwrap();
    assert!(finished.unreported.is_empty(), "{:?}", finished.unreported);
    assert_eq!((finished.exit_save.iterations, finished.exit_save.committed, finished.exit_save.bytes), (7, true, 0));
}

#[test]
fn a_rank_learns_at_finish_that_its_exit_step_never_committed() {
    // Rank 1 of a launch whose coordinator never saves the exit step.
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("memory://orphan-{}", std::process::id());
    let _coordinator = open_rank(tmp.path(), &url, 0, 2, "orphan", 1);
    let other = open_rank(tmp.path(), &url, 1, 2, "orphan", 1);
    let (plan, _) = layer_plan(1, 2);
    let zeros = [
        Tensor::zeros([6, 4], (Kind::Float, Device::Cpu)),
        Tensor::zeros([3, 6], (Kind::Float, Device::Cpu)),
        Tensor::zeros([3], (Kind::Float, Device::Cpu)),
    ];
    let (vs, opt) = layer_rank(1, 2, &zeros);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let finished = rt.block_on(other.finish(3, &vs, Some(&opt), &plan)).unwrap();
    assert!(!finished.exit_save.committed);
    let e = finished.unreported.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
    assert!(e.contains("sharded step 3 was not committed") && e.contains("rank 0"), "{e}");
}

#[test]
fn a_signal_ends_every_rank_with_an_exit_save_that_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child =
        Command::new(helper()).arg("vars").arg(tmp.path()).arg("3").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (lines, reader) = common::read_lines(child.stdout.take().unwrap());
    // Two steps committed: the ranks train and save; then Ctrl-C.
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l == "saved 2") {
        match lines.recv_timeout(Duration::from_secs(600)) {
            Ok(line) => seen.push(line),
            Err(e) => panic!("{e}: {seen:?}"),
        }
    }
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    seen.extend(lines.try_iter());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{seen:?} {stderr}");
    let last = seen.last().cloned().unwrap_or_default();
    let words: Vec<&str> = last.split(' ').collect();
    assert!(matches!(words[..], ["finished", _, "committed", "true", "unreported", "0"]), "{seen:?} {stderr}");
    let step: u64 = words[1].parse().unwrap();
    assert!(stderr.contains("exit save"), "the signal is announced: {stderr}");
    // The exit save is the newest step, every rank's shard in it, whole.
    let io = ShardedIo::open_reader(&rank_config(tmp.path(), "", 0, 1, "", 600)).unwrap();
    let m = io.latest().unwrap().unwrap();
    assert_eq!((m.iterations, m.world_size), (step, 3));
    assert!(io.verify(&m).unwrap().is_empty());
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _w = vs.root().zeros("w", &[12, 5]);
    let mut opt = modelio::Adam::adamw(&vs, 1e-2, (0.9, 0.999), 1e-8, 0.01).unwrap();
    let got = io.resume(&vs, Some(&mut opt), &modelio::sharded::Plan::new()).unwrap().unwrap();
    assert_eq!(got.optimizer, modelio::OptimizerResume::Restored);
    assert_eq!(modelio::Optimizer::state_json(&opt)["step"], step);
}
