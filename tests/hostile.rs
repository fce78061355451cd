//! Hostile inputs and odd folders: no panic, no hang, no harm outside the
//! model, no silent fresh start.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::time::{Duration, Instant};

use modelio::{Error, ModelIo};

/// Run `f` on another thread; fail if it does not finish within `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("hung")
}

#[test]
fn opening_a_model_never_removes_another_models_temporaries() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path();
    // Model `a`'s snapshot being built beside its folder, by a live trainer
    // (this process stands in for it).
    let busy = models.join(format!(".modelio-tmp-{}-0123456789abcdef-a_snapshot_322_iters", std::process::id()));
    std::fs::create_dir_all(busy.join("a_logs")).unwrap();
    // A stale one of `b` itself, from a process long gone.
    let stale = models.join(".modelio-tmp-4194999-fedcba9876543210-b_snapshot_7_iters");
    std::fs::create_dir_all(&stale).unwrap();
    for _ in 0..3 {
        let io = common::open(&models.join("b"), "model");
        io.shutdown_blocking().unwrap();
    }
    assert!(busy.join("a_logs").exists(), "model b removed model a's snapshot in progress");
    assert!(!stale.exists(), "b's own stale temporary is cleaned up");
}

#[test]
fn a_non_utf8_model_folder_is_refused_at_open_without_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(OsStr::from_bytes(b"model-\xff\xfe"));
    let err = ModelIo::open(common::config(&dir, "m")).err().expect("refused");
    assert!(matches!(&err, Error::ConfigValue { key, .. } if key == "model.dir"), "{err:?}");
    assert!(err.to_string().contains("UTF-8"), "{err}");
}

#[test]
fn a_fifo_named_like_the_archive_is_refused_without_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("m.mio");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let config = common::config(&dir, "m");
    let err = within(Duration::from_secs(20), move || ModelIo::open(config).err()).expect("refused");
    assert!(matches!(err, Error::NotRegular { .. }) && err.to_string().contains("FIFO"), "{err:?}");
    // Built before the clock starts: a build is not a hang.
    let cli = common::cli();
    for args in
        [vec!["verify".as_ref(), fifo.as_os_str()], vec!["inspect".as_ref(), fifo.as_os_str()], vec!["verify".as_ref(), dir.as_os_str()]]
    {
        let start = Instant::now();
        let mut child =
            Command::new(&cli).args(&args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("`modelio {args:?}` hung on a FIFO");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(1), "{args:?}");
    }
}

#[test]
fn a_name_too_long_for_temporary_files_is_refused_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "n".repeat(200);
    let err = ModelIo::open(common::config(tmp.path(), &name)).err().expect("refused");
    assert!(matches!(&err, Error::ConfigValue { key, .. } if key == "model.name"), "{err:?}");
    // The longest allowed name saves, backs up and snapshots.
    let name = "n".repeat(modelio::config::MAX_NAME);
    let dir = tmp.path().join("d".repeat(modelio::config::MAX_NAME));
    let mut io = common::open(&dir, &name);
    let (vs, _n) = common::seeded_store(0);
    for loss in [2.0, 1.0] {
        io.record(loss);
        assert!(io.save(&vs, None).unwrap().wait_blocking().is_ok());
    }
    io.snapshot().unwrap();
    io.shutdown_blocking().unwrap();
    assert!(dir.join(format!("{name}.mio.bk")).exists());
    assert!(modelio::folder::snapshot::snapshot_dir(&dir, 2).join(format!("{name}.mio")).exists());
}

#[test]
fn a_damaged_state_file_is_called_a_state_file() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("m_state.json");
    std::fs::write(&state, b"{ not json").unwrap();
    let mut c = common::config(tmp.path(), "m");
    c.model.predict = true;
    let err = ModelIo::open(c).err().expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, Error::DamagedState { .. }), "{err:?}");
    assert!(msg.starts_with(&format!("state file {} is damaged", state.display())), "{msg}");
    assert!(!msg.contains("load.fallback"), "fallback cannot help a state file: {msg}");
}

#[test]
fn a_file_at_a_snapshots_name_is_refused_and_never_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let mut io = common::open(&dir, "m");
    let (vs, _n) = common::seeded_store(0);
    io.record(1.0);
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    let target = modelio::folder::snapshot::snapshot_dir(&dir, io.iterations());
    std::fs::write(&target, b"the user's own file").unwrap();
    io.snapshot().unwrap();
    let err = io.flush_blocking().expect_err("the snapshot is refused");
    let report = err.report().to_string();
    assert!(err.is_background() && report.contains(&target.display().to_string()), "{report}");
    assert!(report.contains("not a snapshot modelio made") && report.contains("move or rename it"), "{report}");
    io.shutdown_blocking().unwrap();
    // Later runs clean up what interrupted runs left, and never this file.
    for _ in 0..2 {
        common::open(&dir, "m").shutdown_blocking().unwrap();
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"the user's own file");
    let beside: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(beside.len(), 2, "only the model folder and the file: {beside:?}");
}

#[test]
fn restore_refuses_while_a_trainer_holds_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let mut io = common::open(&dir, "m");
    let (vs, _n) = common::seeded_store(0);
    for loss in [2.0, 1.0] {
        io.record(loss);
        io.save(&vs, None).unwrap().wait_blocking().unwrap();
    }
    let err = modelio::folder::restore::restore(&modelio::folder::ModelPaths::new(&dir, "m")).expect_err("refused");
    assert!(matches!(err, Error::Locked { .. }), "{err:?}");
    assert!(dir.join("m.mio").exists(), "nothing was moved");
    io.shutdown_blocking().unwrap();
    modelio::folder::restore::restore(&modelio::folder::ModelPaths::new(&dir, "m")).unwrap();
}
