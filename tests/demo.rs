//! The demo trainer as a child process: Ctrl-C exit saves, split runs resume exactly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use modelio::archive::ArchiveReader;
use modelio::policy::state::State;

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
    common::archive_tensors(path)
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
    assert!(modelio::folder::snapshot::snapshot_dir(&split, 28).join("model.mio").exists());
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
    let Some(_unmount) = Tmpfs::mount(&disk, "8m") else { return };
    let dir = disk.join("model");
    let mut child = start_training(&dir, &["--save-interval", "5", "--snapshot-interval", "0", "--write-delay-ms", "20"]);
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
    let wait_for = |lines: &mut Vec<String>, what: &str, until: &dyn Fn(&str) -> bool| loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
            panic!("the demo reported no {what} while the disk was full: {}", lines.join("\n"));
        };
        let seen = until(&line);
        lines.push(line);
        if seen {
            break;
        }
    };
    wait_for(&mut lines, "failure", &|l| l.contains("warning:") && l.contains("no space left"));
    // The log fills up too (its lines are written on the same disk); the
    // failed saves that follow each log a line that cannot be written.
    let log_failure = |l: &str| l.contains("could not write the log") || l.contains("Unable to write");
    if !lines.iter().any(|l| log_failure(l)) {
        wait_for(&mut lines, "failed log write", &log_failure);
    }
    for _ in 0..3 {
        wait_for(&mut lines, "further failed save", &|l| l.starts_with("warning: background save failed"));
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
    lines.extend(rx.iter());
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Failed saves are superseded by the committed exit save; a backup that
    // failed on the full disk is not, and fails the run.
    let failed = failed_backups_and_snapshots(&stdout);
    assert_eq!(out.status.code(), Some(if failed > 0 { 1 } else { 0 }), "stdout: {stdout}\nstderr: {}", lines.join("\n"));
    assert!(lines.iter().any(|l| l.contains("training goes on")), "{}", lines.join("\n"));
    let trained: u64 = stdout.split("trained ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert_eq!(iterations(), trained, "the exit save is committed");
    // The log on the full disk: its first failed write is reported once, not every line.
    assert!(!lines.iter().any(|l| l.contains("Unable to write")), "{}", lines.join("\n"));
    assert_eq!(lines.iter().filter(|l| l.contains("could not write the log")).count(), 1, "{}", lines.join("\n"));
    assert!(lines.iter().any(|l| l.contains("log lines could not be written to")), "{}", lines.join("\n"));
}

/// A tmpfs of `size` mounted on `at` (created), unmounted when dropped;
/// `None`, saying so, where mounting is not allowed.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output().unwrap();
        if !mounted.status.success() {
            println!("skipped: cannot mount a tmpfs here ({})", String::from_utf8_lossy(&mounted.stderr).trim());
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// N of the summary's "backups and snapshots: N failed".
fn failed_backups_and_snapshots(stdout: &str) -> u64 {
    let count = stdout.split("backups and snapshots: ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok());
    count.unwrap_or_else(|| panic!("no count of failed backups and snapshots in the summary: {stdout}"))
}

#[test]
fn snapshots_on_a_full_disk_fail_the_run_and_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    let Some(_unmount) = Tmpfs::mount(&disk, "8m") else { return };
    let dir = disk.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    // A sparse file that takes no space, but that a snapshot copies with the
    // model's other files: every snapshot runs out of space, saves do not.
    std::fs::File::create(dir.join("model_padding.bin")).unwrap().set_len(64 << 20).unwrap();
    let out = Command::new(demo())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("--model-dir")
        .arg(&dir)
        .args(["--iterations", "20", "--save-interval", "5", "--snapshot-interval", "10", "--threads", "1"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let all = format!("stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{all}");
    // Both snapshots (10 and 20) failed, the last one reported only by
    // `finish`; a backup or save that ran while a snapshot filled the disk
    // may have failed too. Each failure is reported once, and counted.
    let warned = |what: &str| stderr.lines().filter(|l| l.starts_with(&format!("warning: background {what} failed"))).count();
    assert_eq!(warned("snapshot"), 2, "{all}");
    let failed = failed_backups_and_snapshots(&stdout);
    assert_eq!(failed as usize, warned("snapshot") + warned("backup"), "{all}");
    assert!(stderr.contains(&format!("error: {failed} backups or snapshots failed")), "{all}");
    assert!(!stderr.contains("the next save will try again"), "{all}");
    assert!(modelio::folder::snapshot::list(&dir).is_empty(), "{all}");
    let archive = ArchiveReader::open(&dir.join("model.mio")).unwrap();
    assert_eq!(archive.manifest.iterations, 20, "the exit save is committed");
}

/// The commands a demo run printed (`  cargo modelio ARGS`), as argument lists.
fn printed_commands(stdout: &str) -> Vec<Vec<String>> {
    let commands = stdout.lines().filter_map(|l| l.strip_prefix("  cargo modelio "));
    commands.map(|c| c.split_whitespace().map(str::to_string).collect()).collect()
}

#[test]
fn a_demo_run_leaves_snapshots_and_prints_working_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    // config/demo.toml as it is: its save and snapshot intervals.
    let out = Command::new(demo())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("--model-dir")
        .arg(&dir)
        .args(["--iterations", "100", "--threads", "1"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let all = format!("stdout: {stdout}\nstderr: {stderr}");
    assert!(out.status.success(), "{all}");
    assert!(modelio::folder::snapshot::snapshot_dir(&dir, 100).join("model.mio").exists(), "{all}");
    assert!(stdout.contains("backups and snapshots: 0 failed"), "{all}");
    // The exit save's line labels the file's size and the tensor bytes apart.
    let archive = dir.join("model.mio");
    let file_bytes = std::fs::metadata(&archive).unwrap().len();
    let reader = ArchiveReader::open(&archive).unwrap();
    let tensor_bytes: usize = reader.model.iter().chain(reader.optimizer.iter().flat_map(|(t, _)| t.iter())).map(|t| t.len).sum();
    assert!(tensor_bytes > 0 && tensor_bytes as u64 != file_bytes);
    assert!(stderr.contains(&format!("{file_bytes} bytes on disk")), "{all}");
    assert!(stderr.contains(&format!("{tensor_bytes} bytes of tensors")), "{all}");
    let commands = printed_commands(&stdout);
    for wanted in ["inspect", "verify", "snapshots", "restore"] {
        assert!(commands.iter().any(|c| c[0] == wanted), "no `cargo modelio {wanted}` printed: {all}");
    }
    // Restore (which moves the current files aside) last.
    let mut commands = commands;
    commands.sort_by_key(|c| c[0] == "restore");
    for args in commands {
        let out = Command::new(common::cli()).args(&args).output().unwrap();
        let shown = format!("{args:?}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{shown}");
        if args[0] == "snapshots" {
            assert!(String::from_utf8_lossy(&out.stdout).contains("100"), "{shown}");
        }
    }
}
