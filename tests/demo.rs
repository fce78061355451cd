//! The demo trainer as a child process: Ctrl-C exit saves, split runs resume exactly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use modelio::archive::ArchiveReader;
use modelio::state::State;

fn demo() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/train
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir.join("examples/train");
    assert!(path.exists(), "{} missing: `cargo test` builds examples", path.display());
    path
}

fn run_demo(dir: &Path, iterations: u64) {
    let out = Command::new(demo())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("--model-dir")
        .arg(dir)
        .args(["--iterations", &iterations.to_string(), "--save-interval", "7", "--snapshot-interval", "14", "--threads", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "demo failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let r = ArchiveReader::open(path).unwrap();
    let opt = r.optimizer.iter().flat_map(|(t, _)| t.iter());
    let mut all: Vec<(String, Vec<u8>)> =
        r.model.iter().chain(opt).map(|t| (t.meta.name.clone(), r.checked_data(t).unwrap().to_vec())).collect();
    all.sort();
    all
}

#[test]
fn split_run_equals_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, split) = (tmp.path().join("one/model"), tmp.path().join("split/model"));
    run_demo(&one, 30);
    run_demo(&split, 15);
    run_demo(&split, 15);
    let (a, b) = (tensors(&one.join("model.mio")), tensors(&split.join("model.mio")));
    assert_eq!(a.len(), b.len());
    for ((na, da), (nb, db)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(da == db, "tensor {na} differs between one run of 30 and 15 + 15");
    }
    let state = State::read(&split.join("model_state.json")).unwrap();
    assert_eq!(state.total_iterations, 30);
    assert_eq!(state.sessions.len(), 2);
    assert!(modelio::snapshot::snapshot_dir(&split, 28).join("model.mio").exists());
    assert!(split.join("model_logs").join(&state.sessions[1].id).join("train.log").exists());
}

/// Start a long demo run into `dir` and wait until its first save is committed.
fn start_training(dir: &Path, extra: &[&str]) -> std::process::Child {
    let child = Command::new(demo())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("--model-dir")
        .arg(dir)
        .args(["--iterations", "1000000", "--threads", "1"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !dir.join("model_state.json").exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "demo never saved");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn sigint(child: &std::process::Child) {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
}

#[test]
fn sigint_mid_run_exits_0_with_exit_save() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let child = start_training(&dir, &["--save-interval", "50"]);
    std::thread::sleep(Duration::from_millis(300));
    sigint(&child);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("interrupted"), "{stdout}");
    let archive = ArchiveReader::open(&dir.join("model.mio")).unwrap();
    assert!(archive.verify().is_empty());
    assert!(archive.optimizer.is_some(), "policy `exit`: the exit save holds the optimizer");
    let state = State::read(&dir.join("model_state.json")).unwrap();
    let trained: u64 = stdout.split("trained ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(trained > 0);
    assert_eq!(state.total_iterations, trained);
    assert_eq!(archive.manifest.iterations, trained);
}

#[test]
fn second_sigint_during_the_drain_aborts_and_loses_nothing_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let child = start_training(&dir, &["--save-interval", "5", "--write-delay-ms", "400"]);
    sigint(&child);
    std::thread::sleep(Duration::from_millis(100));
    sigint(&child);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("aborted"), "{stderr}");
    // What was committed is intact, and the folder opens for the next run.
    let archive = ArchiveReader::open(&dir.join("model.mio")).unwrap();
    assert!(archive.verify().is_empty());
    let mut c = common::config(&dir, "model");
    c.model.dir = dir.clone();
    let io = modelio::ModelIo::open(c).unwrap();
    assert_eq!(io.iterations(), archive.manifest.iterations);
}

#[test]
fn bad_flags_are_refused_with_a_message_not_a_panic() {
    for args in [["--threads", "0"], ["--save-interval", "0"]] {
        let out = Command::new(demo()).current_dir(env!("CARGO_MANIFEST_DIR")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(args[0]) && !stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn training_goes_on_through_a_full_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"]).arg(&disk).output().unwrap();
    if !mounted.status.success() {
        println!("skipped: cannot mount a tmpfs here ({})", String::from_utf8_lossy(&mounted.stderr).trim());
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&disk);
    let dir = disk.join("model");
    let mut child = start_training(&dir, &["--save-interval", "5", "--write-delay-ms", "20"]);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    });
    let iterations = || ArchiveReader::open(&dir.join("model.mio")).map(|r| r.manifest.iterations).unwrap_or(0);
    // Fill the disk to the last byte, until a save fails and the demo says so.
    let filler = disk.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[1u8; 4096]).is_ok() {}
    }
    let mut lines = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
            panic!("the demo reported no failure while the disk was full: {}", lines.join("\n"));
        };
        let warned = line.contains("warning:") && line.contains("no space left");
        lines.push(line);
        if warned {
            break;
        }
    }
    let stuck = iterations();
    // Space is back: saving resumes without a restart.
    std::fs::remove_file(&filler).unwrap();
    let started = Instant::now();
    while iterations() <= stuck {
        assert!(started.elapsed() < Duration::from_secs(60), "no save was committed after the disk was freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    sigint(&child);
    let out = child.wait_with_output().unwrap();
    lines.extend(rx.try_iter());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {}", lines.join("\n"));
    assert!(lines.iter().any(|l| l.contains("training goes on")), "{}", lines.join("\n"));
    let trained: u64 = stdout.split("trained ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert_eq!(iterations(), trained, "the exit save is committed");
}
