//! The `modelio` command line, run as a user runs it. Model folders are built
//! from plain bytes with the archive writer (no training handle, no actors).

mod common;

use common::{printed, text};

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use modelio::archive::format::{DType, TensorRef};
use modelio::archive::{commit_archive, ArchiveReader};
use modelio::folder::durable::commit_bytes;
use modelio::folder::snapshot::snapshot_dir;
use modelio::policy::state::{Session, State};

fn cli() -> Command {
    Command::new(common::cli())
}

/// Commit an archive of model `name` at `iterations` holding `n` small f32
/// tensors `layer<i>.weight`, their bytes derived from `seed`.
fn archive(path: &Path, name: &str, iterations: u64, n: usize, seed: u8) {
    let names: Vec<String> = (0..n).map(|i| format!("layer{i}.weight")).collect();
    let data: Vec<Vec<u8>> = (0..n).map(|i| (0..16u8).map(|b| b.wrapping_mul(seed | 1).wrapping_add(i as u8)).collect()).collect();
    let shape = [4usize];
    let tensors: Vec<TensorRef<'_>> = names
        .iter()
        .zip(&data)
        .map(|(name, d)| TensorRef { name, dtype: DType::F32, shape: &shape, data: d, crc32c: None, crc32: None })
        .collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    commit_archive(path, name, iterations, &tensors, None, None).unwrap();
}

/// Commit a state file of model `name` that knows the sessions `ids`.
fn state(path: &Path, name: &str, iterations: u64, ids: &[&str]) {
    let mut s = State::new(name);
    s.total_iterations = iterations;
    s.sessions = ids
        .iter()
        .map(|id| Session { id: id.to_string(), started: "2024-01-01T00:00:00Z".into(), batch_size: Some(8), iterations })
        .collect();
    commit_bytes(path, &s.to_json()).unwrap();
}

/// Flip a byte in the middle of tensor `i` of an archive, in place (the
/// file keeps its inode, as disk damage would).
fn damage(path: &Path, i: usize) {
    let r = ArchiveReader::open(path).unwrap();
    let offset = r.model[i].offset + r.model[i].len / 2;
    drop(r);
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

fn verifies(path: &Path) -> bool {
    ArchiveReader::open(path).map(|r| r.verify().is_empty()).unwrap_or(false)
}

/// A model folder `<tmp>/model` holding model `m`: archive and state file at
/// `iterations`, and `.bk` copies of both from iteration `backup`.
fn model_folder(tmp: &Path, iterations: u64, backup: u64) -> PathBuf {
    let dir = tmp.join("model");
    archive(&dir.join("m.mio"), "m", backup, 3, 1);
    state(&dir.join("m_state.json"), "m", backup, &[]);
    std::fs::copy(dir.join("m.mio"), dir.join("m.mio.bk")).unwrap();
    std::fs::copy(dir.join("m_state.json"), dir.join("m_state.json.bk")).unwrap();
    archive(&dir.join("m.mio"), "m", iterations, 3, 2);
    state(&dir.join("m_state.json"), "m", iterations, &[]);
    dir
}

// ---- output to a reader that went away -------------------------------------

/// Run with stdout a pipe whose read end is closed before the command writes.
fn run_with_closed_stdout(args: &[&std::ffi::OsStr]) -> Output {
    let mut child = cli().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_ends_output_quietly_with_the_usual_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    // Enough tensors that `inspect` prints far more than a pipe holds (64 KiB).
    archive(&dir.join("m.mio"), "m", 7, 3000, 1);
    archive(&snapshot_dir(&dir, 7).join("m.mio"), "m", 7, 3, 1);
    let file = dir.join("m.mio");
    let cases: [(Vec<&std::ffi::OsStr>, i32); 5] = [
        (vec!["inspect".as_ref(), file.as_os_str()], 0),
        (vec!["inspect".as_ref(), "--json".as_ref(), file.as_os_str()], 0),
        (vec!["verify".as_ref(), dir.as_os_str()], 0),
        (vec!["verify".as_ref(), file.as_os_str()], 0),
        (vec!["snapshots".as_ref(), "--name".as_ref(), "m".as_ref(), dir.as_os_str()], 0),
    ];
    for (args, code) in &cases {
        let out = run_with_closed_stdout(args);
        let stderr = text(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.signal(), None, "{args:?}: killed by a signal; {stderr}");
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
    }
    // A damaged archive keeps its exit code 1 when nobody reads the output.
    damage(&file, 2999);
    let out = run_with_closed_stdout(&["inspect".as_ref(), file.as_os_str()]);
    assert!(!text(&out.stderr).contains("panicked"), "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_failing_stdout_other_than_a_closed_pipe_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("m.mio");
    archive(&file, "m", 7, 3, 1);
    let Ok(full) = std::fs::File::options().write(true).open("/dev/full") else { return };
    let out = cli().arg("inspect").arg(&file).stdout(full).output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("could not write to standard output") && !stderr.contains("panicked"), "{stderr}");
}

// ---- errors are printed with their causes ------------------------------------

#[test]
fn errors_are_printed_with_their_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.mio");
    let out = cli().arg("inspect").arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: could not open"), "{stderr}");
    assert!(stderr.contains("nope.mio") && stderr.contains("No such file or directory"), "{stderr}");
}

// ---- inspect verifies checksums ------------------------------------------------

#[test]
fn inspect_verifies_checksums_and_reports_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("m.mio");
    archive(&file, "m", 5, 3, 1);

    let out = cli().arg("inspect").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(text(&out.stdout).contains("checksums: ok (3 tensors verified)"), "{}", printed(&out));
    let out = cli().args(["inspect", "--json"]).arg(&file).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["damaged"], serde_json::json!([]));

    damage(&file, 0);
    damage(&file, 2);
    let out = cli().arg("inspect").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("checksums: DAMAGED: layer0.weight, layer2.weight"), "{stdout}");
    assert!(stdout.contains("layer1.weight"), "the listing is still printed: {stdout}");
    assert!(text(&out.stderr).contains("modelio restore"), "{}", text(&out.stderr));
    let out = cli().args(["inspect", "--json"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert_eq!(v["damaged"], serde_json::json!(["layer0.weight", "layer2.weight"]));
    assert_eq!(v["tensors"].as_array().unwrap().len(), 3);
}

// ---- --name is inferred --------------------------------------------------------

#[test]
fn snapshots_and_restore_infer_the_only_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_folder(tmp.path(), 4, 2);
    archive(&snapshot_dir(&dir, 3).join("m.mio"), "m", 3, 3, 1);

    let out = cli().args(["snapshots", "--json"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["iterations"], 3);
    assert_eq!(rows[0]["verifies"], true, "the snapshot's archive is found under the inferred name");

    let out = cli().arg("restore").arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(ArchiveReader::open(&dir.join("m.mio")).unwrap().manifest.iterations, 2);
}

#[test]
fn a_model_whose_archive_is_missing_is_still_found() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_folder(tmp.path(), 4, 2);
    std::fs::remove_file(dir.join("m.mio")).unwrap();
    std::fs::remove_file(dir.join("m.mio.bk")).unwrap();
    let out = cli().arg("restore").arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(State::read(&dir.join("m_state.json")).unwrap().total_iterations, 2);
}

#[test]
fn several_models_or_none_need_a_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_folder(tmp.path(), 4, 2);
    archive(&dir.join("other.mio"), "other", 1, 3, 1);
    state(&dir.join("third_state.json"), "third", 1, &[]);
    for cmd in ["snapshots", "restore"] {
        let out = cli().arg(cmd).arg(&dir).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", printed(&out));
        let stderr = text(&out.stderr);
        for name in ["m", "other", "third", "--name"] {
            assert!(stderr.contains(name), "{cmd}: must name {name}: {stderr}");
        }
    }
    assert_eq!(ArchiveReader::open(&dir.join("m.mio")).unwrap().manifest.iterations, 4, "nothing restored");
    let out = cli().args(["restore", "--name", "m"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::create_dir(empty.join("m_logs")).unwrap();
    for cmd in ["snapshots", "restore"] {
        let out = cli().arg(cmd).arg(&empty).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", printed(&out));
        let stderr = text(&out.stderr);
        assert!(stderr.contains("no model") && stderr.contains(&empty.display().to_string()), "{cmd}: {stderr}");
    }
}

// ---- restore -------------------------------------------------------------------

#[test]
fn restore_without_backups_changes_nothing_not_even_the_lock_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    archive(&dir.join("m.mio"), "m", 4, 3, 1);
    state(&dir.join("m_state.json"), "m", 4, &[]);
    let listing = |dir: &Path| {
        // Each file's name, size and first bytes (the lock file's pid).
        let mut names: Vec<(String, usize, String)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                let head = String::from_utf8_lossy(&bytes[..bytes.len().min(16)]).into_owned();
                (p.file_name().unwrap().to_string_lossy().into_owned(), bytes.len(), head)
            })
            .collect();
        names.sort();
        names
    };
    // Without a lock file, then with one an earlier trainer (pid 12345) left.
    for lock in [None, Some("12345")] {
        if let Some(pid) = lock {
            std::fs::write(dir.join(".modelio.lock"), pid).unwrap();
        }
        let before = listing(&dir);
        let out = cli().arg("restore").arg(&dir).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
        assert!(text(&out.stderr).contains("nothing was changed"), "{}", printed(&out));
        assert_eq!(listing(&dir), before, "the folder changed although the command says nothing was changed");
    }
}

const KNOWN: &str = "0b6a3c4e-7f1d-4a8e-9c2b-5d7e8f901234";
const UNKNOWN: &str = "9f8e7d6c-5b4a-4392-8172-6a5b4c3d2e1f";

#[test]
fn restore_moves_only_unknown_session_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_folder(tmp.path(), 4, 2);
    state(&dir.join("m_state.json.bk"), "m", 2, &[KNOWN]);
    state(&dir.join("m_state.json"), "m", 4, &[KNOWN, UNKNOWN]);
    let logs = dir.join("m_logs");
    for folder in [KNOWN, UNKNOWN, "tensorboard", "tensorboard/run1", "notes"] {
        std::fs::create_dir_all(logs.join(folder)).unwrap();
    }
    std::fs::write(logs.join(UNKNOWN).join("log.txt"), b"loss 9\n").unwrap();
    std::fs::write(logs.join("tensorboard/run1/events"), b"e").unwrap();
    std::fs::write(logs.join("summary.txt"), b"s").unwrap();

    let out = cli().args(["restore", "--name", "m"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(logs.join(KNOWN).is_dir(), "a session the restored state knows stays");
    for kept in ["tensorboard/run1/events", "notes", "summary.txt"] {
        assert!(logs.join(kept).exists(), "{kept}: the user's own layout stays");
    }
    assert!(!logs.join(UNKNOWN).exists(), "a session the restored state does not know moves");
    let archived: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("m_archived_"))
        .collect();
    assert_eq!(archived.len(), 1);
    assert_eq!(std::fs::read(archived[0].join("m_logs").join(UNKNOWN).join("log.txt")).unwrap(), b"loss 9\n");
    let stdout = text(&out.stdout);
    assert!(stdout.contains(UNKNOWN), "what moved is printed: {stdout}");
    assert!(!stdout.contains("tensorboard"), "{stdout}");
}

#[test]
fn a_restored_archive_does_not_share_its_backups_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_folder(tmp.path(), 4, 2);
    damage(&dir.join("m.mio"), 1);
    let out = cli().args(["restore", "--name", "m"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let (live, bk) = (dir.join("m.mio"), dir.join("m.mio.bk"));
    assert_ne!(std::fs::metadata(&live).unwrap().ino(), std::fs::metadata(&bk).unwrap().ino(), "not a hard link");
    assert!(verifies(&live));
    // Damage to the restored archive leaves the backup intact.
    damage(&live, 0);
    assert!(!verifies(&live));
    assert!(verifies(&bk), "the backup must survive damage to the restored archive");
    let state_ino = |p: &str| std::fs::metadata(dir.join(p)).unwrap().ino();
    assert_ne!(state_ino("m_state.json"), state_ino("m_state.json.bk"));
}

// ---- verify --------------------------------------------------------------------

#[test]
fn verify_of_a_bare_file_name_suggests_restoring_this_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_folder(tmp.path(), 4, 2);
    damage(&dir.join("m.mio"), 1);
    let out = cli().args(["verify", "m.mio"]).current_dir(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let all = printed(&out);
    assert!(all.contains("DAMAGED") && all.contains("layer1.weight"), "{all}");
    assert!(all.contains("modelio restore . --name m"), "{all}");
}

fn verify_dir(dir: &Path) -> (Option<i32>, String) {
    let out = cli().arg("verify").arg(dir).output().unwrap();
    (out.status.code(), printed(&out))
}

fn fallback_line(path: &Path, iterations: u64) -> String {
    format!("fallback: load.fallback would load {} (iteration {iterations})", path.display())
}

#[test]
fn verify_names_what_a_fallback_load_would_use() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_folder(tmp.path(), 6, 2);
    let (live, bk) = (dir.join("m.mio"), dir.join("m.mio.bk"));
    archive(&snapshot_dir(&dir, 3).join("m.mio"), "m", 3, 3, 3);
    archive(&snapshot_dir(&dir, 5).join("m.mio"), "m", 5, 3, 5);

    // Healthy: no fallback line.
    let (code, all) = verify_dir(&dir);
    assert_eq!(code, Some(0), "{all}");
    assert!(!all.contains("fallback:"), "{all}");

    // Live damaged: the backup.
    damage(&live, 0);
    let (code, all) = verify_dir(&dir);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains(&fallback_line(&bk, 2)), "{all}");

    // Backup damaged too: the newest snapshot that verifies (5 is damaged).
    damage(&bk, 0);
    damage(&snapshot_dir(&dir, 5).join("m.mio"), 1);
    let (code, all) = verify_dir(&dir);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains(&fallback_line(&snapshot_dir(&dir, 3).join("m.mio"), 3)), "{all}");

    // Live missing: said so, and the fallback named.
    std::fs::remove_file(&live).unwrap();
    let (code, all) = verify_dir(&dir);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains("MISSING") && all.contains(&live.display().to_string()), "{all}");
    assert!(all.contains(&fallback_line(&snapshot_dir(&dir, 3).join("m.mio"), 3)), "{all}");

    // Nothing verifies: said so.
    damage(&snapshot_dir(&dir, 3).join("m.mio"), 2);
    let (code, all) = verify_dir(&dir);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains("fallback: none"), "{all}");
}

#[test]
fn the_command_does_not_load_libtorch() {
    // Reading and renaming files needs no libtorch: `modelio --help` starts
    // in milliseconds instead of loading half a gigabyte of CUDA libraries.
    let exe = common::cli();
    let Ok(out) = Command::new("ldd").arg(&exe).output() else {
        println!("skipped: no ldd here");
        return;
    };
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(!libs.contains("torch") && !libs.contains("c10"), "{libs}");
    let out = Command::new(&exe).arg("--help").output().unwrap();
    assert!(out.status.success());
}
