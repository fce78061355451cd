//! The seed API of DESIGN.md section 1 on the ModelIo handle.

mod common;

use std::time::Duration;

use modelio::config::OptimizerPolicy;
use modelio::{Adam, Error, ModelIo};

#[test]
fn filename_model_dir_and_exists() {
    let dir = tempfile::tempdir().unwrap();
    let io = common::open(dir.path(), "original");
    assert_eq!(io.filename(), dir.path().join("original.mio"));
    assert_eq!(io.model_dir(), dir.path());
    assert!(!io.model_exists());
}

#[test]
fn multiple_models_in_folder_cases() {
    let dir = tempfile::tempdir().unwrap();
    let io = common::open(dir.path(), "original");
    assert_eq!(io.multiple_models_in_folder(), None, "empty folder");
    std::fs::write(dir.path().join("other.mio"), b"").unwrap();
    assert_eq!(io.multiple_models_in_folder(), Some(vec!["other".to_string()]));
    std::fs::remove_file(dir.path().join("other.mio")).unwrap();
    let (vs, _n) = common::seeded_store(0);
    let mut io = io;
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    assert_eq!(io.multiple_models_in_folder(), None, "only this model");
    io.shutdown_blocking().unwrap();
}

#[test]
fn predict_mode_without_model_names_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::config(&dir.path().join("nowhere"), "m");
    c.model.predict = true;
    let mut io = ModelIo::open(c).unwrap();
    let (vs, _n) = common::seeded_store(0);
    let err = io.load(&vs).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains(&dir.path().join("nowhere").display().to_string()), "{err}");
    assert!(!dir.path().join("nowhere").exists(), "predict mode must not create the folder");
    assert!(matches!(io.save_exit(&vs, None), Err(Error::PredictMode { .. })));
}

#[test]
fn optimizer_policy_matrix() {
    for policy in [OptimizerPolicy::Never, OptimizerPolicy::Always, OptimizerPolicy::Exit] {
        for is_exit in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut c = common::config(dir.path(), "m");
            c.save.optimizer = policy;
            let mut io = ModelIo::open(c).unwrap();
            let (vs, _n) = common::seeded_store(0);
            let opt = Adam::adamw(&vs, 1e-3, (0.9, 0.999), 1e-8, 0.01).unwrap();
            let ticket = if is_exit { io.save_exit(&vs, Some(&opt)) } else { io.save(&vs, Some(&opt)) };
            let committed = ticket.unwrap().wait_blocking().unwrap();
            let stored = io.load_optimizer().unwrap();
            let want = policy.stores(is_exit);
            assert_eq!(stored.is_some(), want, "{policy:?} is_exit={is_exit}");
            assert_eq!(committed.with_optimizer, want);
            if let Some(s) = stored {
                assert_eq!(s.kind, "adamw");
                assert_eq!(s.tensors.len(), 2 * vs.trainable_variables().len());
            }
            io.shutdown_blocking().unwrap();
        }
    }
}

#[test]
fn state_file_records_sessions_iterations_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let (vs, _n) = common::seeded_store(0);
    for session in 0..2 {
        let mut io = common::open(dir.path(), "m");
        io.set_model_config(serde_json::json!({"layers": 2}));
        for _ in 0..3 {
            io.record(1.0 + session as f64);
        }
        io.save(&vs, None).unwrap().wait_blocking().unwrap();
        io.shutdown_blocking().unwrap();
    }
    let state = modelio::policy::state::State::read(&dir.path().join("m_state.json")).unwrap();
    assert_eq!(state.model_name, "m");
    assert_eq!(state.total_iterations, 6);
    assert_eq!(state.sessions.len(), 2);
    assert_eq!(state.sessions[1].iterations, 3);
    assert_eq!(state.lowest_average_loss, 1.0);
    assert_eq!(state.config["model"]["layers"], 2);
    assert_eq!(state.config["modelio"]["save"]["optimizer"], "exit");
}

#[test]
fn load_reports_mismatched_missing_and_extra_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let (vs, _n) = common::seeded_store(0);
    let mut io = common::open(dir.path(), "m");
    io.save(&vs, None).unwrap().wait_blocking().unwrap();

    // Different shape.
    let other = tch::nn::VarStore::new(tch::Device::Cpu);
    let root = other.root();
    let _l1 = tch::nn::linear(&root / "l1", 8, 16, Default::default());
    let _l2 = tch::nn::linear(&root / "l2", 16, 5, Default::default());
    let err = io.load(&other).unwrap_err().to_string();
    assert!(err.contains("l2.") && err.contains("[5") && err.contains("[4"), "{err}");

    // Missing in the archive.
    let _extra = root.zeros("extra", &[2]);
    let err = io.load(&other).unwrap_err().to_string();
    assert!(err.contains("extra"), "{err}");

    // Extra in the archive.
    let small = tch::nn::VarStore::new(tch::Device::Cpu);
    let _l1 = tch::nn::linear(&small.root() / "l1", 8, 16, Default::default());
    let err = io.load(&small).unwrap_err().to_string();
    assert!(err.contains("l2.") && err.contains("no such variable"), "{err}");
    io.shutdown_blocking().unwrap();
}

#[test]
fn stale_temp_files_are_ignored_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (vs, _n) = common::seeded_store(0);
    let mut io = common::open(dir.path(), "m");
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    // A temporary of a process that has surely ended: a child, waited for.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let torn = dir.path().join(format!(".modelio-tmp-{dead}-abc-m.mio"));
    std::fs::write(&torn, b"PK\x03\x04 torn").unwrap();
    assert_eq!(modelio::folder::archive_names(dir.path()), ["m"]);
    let mut io = common::open(dir.path(), "m");
    assert!(!torn.exists());
    let (other, _n) = common::seeded_store(5);
    io.load(&other).unwrap();
    assert!(common::stores_equal(&vs, &other));
}

#[test]
fn background_failure_is_reported_once_and_never_costs_a_later_save() {
    let dir = tempfile::tempdir().unwrap();
    let (vs, _n) = common::seeded_store(0);
    let mut io = common::open(dir.path(), "m");
    io.set_write_delay(Duration::from_millis(200));
    io.record(1.0);
    let ticket = io.save(&vs, None).unwrap();
    // Make the commit fail: the model folder disappears under the writer.
    std::fs::remove_dir_all(dir.path()).unwrap();
    let err = ticket.wait_blocking().unwrap_err();
    assert!(err.is_background() && err.is_retryable(), "{err:?}");
    let chain = err.report().to_string();
    assert!(chain.starts_with("background save failed: could not"), "{chain}");
    std::fs::create_dir_all(dir.path()).unwrap();
    io.set_write_delay(Duration::ZERO);
    // Its ticket reported it: the next save is neither refused nor lost.
    io.record(1.0);
    let c = io.save(&vs, None).expect("reported once, on its ticket").wait_blocking().unwrap();
    assert_eq!(c.iterations, 2);

    // A failed save whose ticket was dropped is reported by the next call,
    // which still does its own work.
    io.set_write_delay(Duration::from_millis(200));
    io.record(1.0);
    drop(io.save(&vs, None).unwrap());
    std::fs::remove_dir_all(dir.path()).unwrap();
    while io.stats().failed < 2 {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::create_dir_all(dir.path()).unwrap();
    io.set_write_delay(Duration::ZERO);
    io.record(1.0);
    let err = io.save(&vs, None).expect_err("the dropped ticket's failure");
    assert!(err.is_background(), "{err:?}");
    io.flush_blocking().unwrap();
    let r = modelio::archive::ArchiveReader::open(&dir.path().join("m.mio")).unwrap();
    assert_eq!(r.manifest.iterations, 4, "the save that reported the failure was committed");
    io.shutdown_blocking().unwrap();
}

#[test]
fn snapshot_after_a_failed_save_fails_loudly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let (vs, _n) = common::seeded_store(0);
    let mut io = common::open(&dir, "m");
    io.record(1.0);
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.set_write_delay(Duration::from_millis(200));
    io.record(1.0);
    let ticket = io.save(&vs, None).unwrap();
    io.snapshot().unwrap();
    // The save of iteration 2 fails: its folder vanishes under the writer.
    let archive = std::fs::read(dir.join("m.mio")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(ticket.wait_blocking().is_err());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("m.mio"), archive).unwrap();
    let err = io.flush_blocking().expect_err("the snapshot of iteration 2 cannot be taken");
    assert!(err.report().to_string().contains("snapshot of iteration 2 not taken"), "{}", err.report());
    assert!(!modelio::folder::snapshot::snapshot_dir(&dir, 2).exists());
    assert!(!modelio::folder::snapshot::snapshot_dir(&dir, 1).exists(), "no older save under a later request");
    io.shutdown_blocking().unwrap();
}

#[test]
fn async_handle_in_tokio() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        let (vs, _n) = common::seeded_store(0);
        let mut io = common::open(&dir, "m");
        io.record(2.0);
        let ticket = io.save_exit(&vs, None).unwrap();
        let c = ticket.wait().await.unwrap();
        assert_eq!(c.iterations, 1);
        io.snapshot().unwrap();
        io.shutdown().await.unwrap();
        assert!(modelio::folder::snapshot::snapshot_dir(&dir, 1).join("m.mio").exists());
    });
}

#[test]
fn busy_policy_wait_loses_nothing_and_skip_counts() {
    use modelio::config::OnBusy;
    for on_busy in [OnBusy::Wait, OnBusy::Skip] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = common::config(dir.path(), "m");
        c.staging.on_busy = on_busy;
        c.staging.max_inflight = 1;
        let mut io = ModelIo::open(c).unwrap();
        io.set_write_delay(Duration::from_millis(40));
        let (vs, _n) = common::seeded_store(0);
        let tensors = vs.variables().len() as u64;
        let mut tickets = Vec::new();
        for _ in 0..6 {
            io.record(1.0);
            tickets.push(io.save(&vs, None).unwrap());
        }
        io.record(1.0);
        tickets.push(io.save_exit(&vs, None).unwrap()); // exit save: always waits
        let results: Vec<_> = tickets.into_iter().map(|t| t.wait_blocking().unwrap()).collect();
        let stats = io.stats();
        io.shutdown_blocking().unwrap();
        assert_eq!(stats.requested, 7);
        assert_eq!(stats.buffer_growths, tensors, "buffers are allocated once and reused");
        let skipped = results.iter().filter(|c| c.skipped).count() as u64;
        assert_eq!(skipped, stats.skipped);
        assert!(!results.last().unwrap().skipped, "the exit save is never skipped");
        match on_busy {
            OnBusy::Wait => {
                assert_eq!(stats.committed, 7);
                assert!(stats.waited > 0);
                assert_eq!(skipped, 0);
            }
            OnBusy::Skip => {
                assert!(skipped >= 4, "{stats:?}");
                assert_eq!(stats.committed + stats.skipped, 7);
            }
        }
        let r = modelio::archive::ArchiveReader::open(&dir.path().join("m.mio")).unwrap();
        assert_eq!(r.manifest.iterations, 7);
    }
}
