//! Crash harness: SIGKILL a process that saves in a loop at random moments;
//! the folder must always open and load exactly the last committed save or
//! the one being written, never a torn file.
//!
//! The trials alternate `staging.cpu_copy` between "immediate" and "protect".
//! `MODELIO_CRASH_TRIALS` sets the number of trials (30 by default; `make soak` runs 200).

mod common;

use common::Rng;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use modelio::archive::ArchiveReader;
use modelio::policy::state::State;
use modelio::ModelIo;
use tch::nn::VarStore;
use tch::Device;

fn helper() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().join("examples/crash_helper")
}

struct Outcome {
    committed: u64,
    requested: u64,
}

/// The `staging.cpu_copy` modes the trials rotate through.
const CPU_COPY: [&str; 2] = ["immediate", "protect"];

/// Run the helper until a few saves committed, then kill it after a random delay.
fn run_and_kill(dir: &Path, cpu_copy: &str, rng: &mut Rng) -> Outcome {
    let mut child =
        Command::new(helper()).arg(dir).env("MODELIO_CPU_COPY", cpu_copy).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (rx, reader) = common::read_lines(stdout);
    let mut outcome = Outcome { committed: 0, requested: 0 };
    let mut record = |line: String, o: &mut Outcome| {
        let mut parts = line.split(' ');
        let (Some(what), Some(n)) = (parts.next(), parts.next().and_then(|n| n.parse::<u64>().ok())) else { return };
        match what {
            "committed" => o.committed = o.committed.max(n),
            "requested" => o.requested = o.requested.max(n),
            _ => {}
        }
    };
    // Wait for the first commit of this run, then let it go on for a random while.
    let first = outcome_wait(&rx, &mut outcome, &mut record);
    assert!(first, "helper committed nothing within 60 s");
    std::thread::sleep(Duration::from_micros(rng.below(40_000)));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    for line in rx.try_iter() {
        record(line, &mut outcome);
    }
    outcome
}

fn outcome_wait(rx: &mpsc::Receiver<String>, o: &mut Outcome, record: &mut impl FnMut(String, &mut Outcome)) -> bool {
    let start = o.committed;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        record(line, o);
        if o.committed > start {
            return true;
        }
    }
    false
}

/// The iteration a verified archive holds (every parameter equals it).
fn check_archive(path: &Path) -> Result<u64, String> {
    let r = ArchiveReader::open(path).map_err(|e| format!("{} does not open: {e}", path.display()))?;
    let damaged = r.verify();
    if !damaged.is_empty() {
        return Err(format!("{} damaged: {damaged:?}", path.display()));
    }
    let n = r.manifest.iterations;
    for t in &r.model {
        let v = modelio::tensors::read_tensor(&r, t).map_err(|e| e.to_string())?;
        let (min, max) = (v.min().double_value(&[]), v.max().double_value(&[]));
        if min != n as f64 || max != n as f64 {
            return Err(format!("{}: tensor {} holds {min}..{max}, not save {n}", path.display(), t.meta.name));
        }
    }
    let state: State = serde_json::from_slice(r.state.as_deref().ok_or("no state entry")?).map_err(|e| e.to_string())?;
    if state.total_iterations != n || r.optimizer.is_none() {
        return Err(format!(
            "{}: embedded state says {} for save {n}, or the optimizer is missing",
            path.display(),
            state.total_iterations
        ));
    }
    Ok(n)
}

/// Open the folder as the next training run would and check everything in it.
/// Returns the save the live archive holds.
fn check_folder(dir: &Path) -> Result<u64, String> {
    let mut c = common::config(dir, "crash");
    c.save.optimizer = modelio::config::OptimizerPolicy::Always;
    // Lock, remove temporary files, reconcile the state file with the archive.
    let mut io = ModelIo::open(c).map_err(|e| e.to_string())?;
    let leftovers = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .filter(|e| modelio::folder::durable::is_temp(&e.file_name().to_string_lossy()))
        .count();
    if leftovers > 0 {
        return Err(format!("{leftovers} temporary files survive the next open"));
    }
    let n = check_archive(&io.filename())?;
    let on_disk = State::read(&dir.join("crash_state.json")).map_err(|e| e.to_string())?.total_iterations;
    if io.state().total_iterations != n || on_disk != n {
        return Err(format!("state file says {on_disk}, archive holds {n}"));
    }
    let vs = VarStore::new(Device::Cpu);
    for i in 0..4 {
        let _ = vs.root().zeros(&format!("w{i}"), &[256, 256]);
    }
    io.load(&vs).map_err(|e| e.to_string())?;
    io.load_optimizer().map_err(|e| e.to_string())?.ok_or("optimizer missing")?;
    let bk = dir.join("crash.mio.bk");
    if bk.exists() && check_archive(&bk)? > n {
        return Err("backup is newer than the archive".into());
    }
    for (s, snap) in modelio::folder::snapshot::list(dir) {
        if check_archive(&snap.join("crash.mio"))? != s {
            return Err(format!("snapshot {s} holds another save"));
        }
    }
    io.shutdown_blocking().map_err(|e| e.to_string())?;
    Ok(n)
}

#[test]
fn sigkill_never_loses_or_tears_a_commit() {
    let trials: u64 = std::env::var("MODELIO_CRASH_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (mut unloadable, mut lost, mut mid_save) = (0u64, 0u64, 0u64);
    let mut problems = Vec::new();
    for trial in 0..trials {
        let cpu_copy = CPU_COPY[trial as usize % CPU_COPY.len()];
        let o = run_and_kill(&dir, cpu_copy, &mut rng);
        if o.requested > o.committed {
            mid_save += 1;
        }
        match check_folder(&dir) {
            Ok(n) if n == o.committed || n == o.requested => {}
            Ok(n) => {
                lost += 1;
                problems.push(format!(
                    "trial {trial} ({cpu_copy}): archive holds save {n}; committed {}, requested {}",
                    o.committed, o.requested
                ));
            }
            Err(e) => {
                unloadable += 1;
                problems.push(format!("trial {trial} ({cpu_copy}): {e}"));
            }
        }
        if !problems.is_empty() {
            break;
        }
    }
    println!("{trials} trials, {unloadable} unloadable, {lost} lost commits ({mid_save} killed with a save in flight)");
    assert!(problems.is_empty(), "{problems:#?}");
}
