//! Backups, snapshots, retention and restore.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use modelio::archive::ArchiveReader;
use modelio::folder::snapshot::snapshot_dir;
use modelio::policy::state::State;
use modelio::ModelIo;
use tch::nn::VarStore;

fn perturb(vs: &VarStore, by: f64) {
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            let _ = t.f_add_scalar_(by);
        }
    });
}

fn loads_equal(archive: &Path, vs: &VarStore) -> bool {
    let r = ArchiveReader::open(archive).unwrap();
    assert!(r.verify().is_empty());
    let (other, _n) = common::seeded_store(77);
    modelio::tensors::load_varstore(&r, &other).unwrap();
    common::stores_equal(vs, &other)
}

#[test]
fn backup_is_the_save_it_came_from_while_next_save_is_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let (vs, _n) = common::seeded_store(0);
    let mut io = common::open(&dir, "m");
    // Save 1 sets the lowest (3.0), save 2 is lower (1.0): backed up.
    io.record(3.0);
    assert!(!io.save(&vs, None).unwrap().wait_blocking().unwrap().backed_up);
    perturb(&vs, 1.0);
    let (expected, _n2) = common::seeded_store(0);
    perturb(&expected, 1.0);
    io.record(1.0);
    let c = io.save(&vs, None).unwrap().wait_blocking().unwrap();
    assert!(c.backed_up);
    // The next save (higher loss: no backup) is slow and still in flight.
    io.set_write_delay(Duration::from_millis(300));
    perturb(&vs, 1.0);
    io.record(5.0);
    let pending = io.save(&vs, None).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let bk = dir.join("m.mio.bk");
    assert!(bk.exists(), "backup of save 2 must exist while save 3 is written");
    assert!(loads_equal(&bk, &expected));
    let state_bk = State::read(&dir.join("m_state.json.bk")).unwrap();
    assert_eq!(state_bk.total_iterations, 2);
    assert_eq!(state_bk.lowest_average_loss, 1.0);
    let c3 = pending.wait_blocking().unwrap();
    assert!(!c3.backed_up);
    io.shutdown_blocking().unwrap();
    // The backup is still save 2; the live archive is save 3.
    assert!(loads_equal(&bk, &expected));
    assert_eq!(ArchiveReader::open(&dir.join("m.mio")).unwrap().manifest.iterations, 3);
    assert_eq!(ArchiveReader::open(&bk).unwrap().manifest.iterations, 2);
}

#[test]
fn snapshot_waits_for_the_save_still_being_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let (vs, _n) = common::seeded_store(0);
    let mut io = common::open(&dir, "m");
    std::fs::create_dir_all(dir.join("m_logs/session-a")).unwrap();
    std::fs::write(dir.join("m_logs/session-a/log.txt"), b"loss 1\n").unwrap();
    std::fs::write(dir.join("unrelated.txt"), b"x").unwrap();
    for _ in 0..5 {
        io.record(1.0);
    }
    let _ticket = io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.set_write_delay(Duration::from_millis(300));
    for _ in 0..5 {
        io.record(1.0);
    }
    let ticket = io.save(&vs, None).unwrap();
    io.snapshot().unwrap(); // requested while save 10 is being written
    ticket.wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    let snap = snapshot_dir(&dir, 10);
    assert!(snap.is_dir(), "snapshot of the in-flight save (10) exists");
    assert!(!snapshot_dir(&dir, 5).exists());
    assert_eq!(ArchiveReader::open(&snap.join("m.mio")).unwrap().manifest.iterations, 10);
    assert_eq!(State::read(&snap.join("m_state.json")).unwrap().total_iterations, 10);
    assert_eq!(std::fs::read(snap.join("m_logs/session-a/log.txt")).unwrap(), b"loss 1\n");
    assert!(!snap.join("unrelated.txt").exists());
    assert!(!snap.join("m.mio.bk").exists());
}

#[test]
fn retention_across_900_1000_and_atomic_replace() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let (vs, _n) = common::seeded_store(0);
    let mut c = common::config(&dir, "m");
    c.snapshot.keep = 2;
    let mut io = ModelIo::open(c).unwrap();
    let mut done = 0u64;
    for target in [800u64, 900, 1000, 1100] {
        while done < target {
            io.record(1.0);
            done += 1;
        }
        let _ticket = io.save(&vs, None).unwrap();
        io.snapshot().unwrap();
    }
    // Replace snapshot 1100 with another snapshot of the same save.
    io.snapshot().unwrap();
    io.shutdown_blocking().unwrap();
    let mut kept: Vec<u64> = modelio::folder::snapshot::list(&dir).into_iter().map(|(n, _)| n).collect();
    kept.sort();
    assert_eq!(kept, [1000, 1100]);
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| modelio::folder::durable::is_temp(&e.file_name().to_string_lossy()))
        .collect();
    assert!(leftovers.is_empty(), "no temporary folders left: {leftovers:?}");
    assert!(ArchiveReader::open(&snapshot_dir(&dir, 1100).join("m.mio")).unwrap().verify().is_empty());
}

#[test]
fn snapshots_command_lists_iterations_size_and_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let (vs, _n) = common::seeded_store(0);
    let mut io = common::open(&dir, "m");
    for _ in 0..2 {
        io.record(1.0);
        let _ticket = io.save(&vs, None).unwrap();
        io.snapshot().unwrap();
    }
    io.shutdown_blocking().unwrap();
    common::flip_byte(&snapshot_dir(&dir, 2).join("m.mio"), 600);
    let out = Command::new(common::cli()).args(["snapshots", "--json", "--name", "m"]).arg(&dir).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["iterations"], 1);
    assert_eq!(rows[0]["verifies"], true);
    assert!(rows[0]["bytes"].as_u64().unwrap() > 1000);
    assert_eq!(rows[1]["iterations"], 2);
    assert_eq!(rows[1]["verifies"], false);
}

#[test]
fn restore_round_trip_and_refusal_without_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let (vs, _n) = common::seeded_store(0);

    // No backup yet: refuse and change nothing.
    let mut io = common::open(&dir, "m");
    io.record(3.0);
    let _ticket = io.save(&vs, None).unwrap().wait_blocking().unwrap();
    // Restore refuses while a trainer holds the folder.
    let out = Command::new(common::cli()).args(["restore", "--name", "m"]).arg(&dir).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by process"), "{}", String::from_utf8_lossy(&out.stderr));
    io.shutdown_blocking().unwrap();
    let before: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
    let out = Command::new(common::cli()).args(["restore", "--name", "m"]).arg(&dir).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no backup"));
    let after: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(before, after);
    let mut io = common::open(&dir, "m");

    // A lower loss backs up; then a later save that gets corrupted.
    io.record(1.0);
    let _ticket = io.save(&vs, None).unwrap().wait_blocking().unwrap();
    let session = io.state().sessions.last().unwrap().id.clone();
    std::fs::create_dir_all(dir.join("m_logs").join(&session)).unwrap();
    let later = uuid::Uuid::new_v4().to_string();
    std::fs::create_dir_all(dir.join("m_logs").join(&later)).unwrap();
    std::fs::create_dir_all(dir.join("m_logs/tensorboard")).unwrap();
    io.shutdown_blocking().unwrap();
    let (expected, _n) = common::seeded_store(0);
    let io = common::open(&dir, "m");
    drop(io);
    perturb(&vs, 2.0);
    let mut io = common::open(&dir, "m");
    io.record(9.0);
    let _ticket = io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    let live = dir.join("m.mio");
    let r = ArchiveReader::open(&live).unwrap();
    let victim = r.model[0].offset + 1;
    drop(r);
    common::flip_byte(&live, victim);
    assert_eq!(Command::new(common::cli()).arg("verify").arg(&live).status().unwrap().code(), Some(1));

    let out = Command::new(common::cli()).args(["restore", "--name", "m"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(Command::new(common::cli()).arg("verify").arg(&live).status().unwrap().success());
    assert!(loads_equal(&live, &expected));
    assert_eq!(State::read(&dir.join("m_state.json")).unwrap().total_iterations, 2);
    let archived: Vec<_> =
        std::fs::read_dir(&dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("m_archived_")).collect();
    assert_eq!(archived.len(), 1);
    let archived = archived[0].path();
    assert!(archived.join("m.mio").exists(), "damaged archive kept aside");
    assert!(dir.join("m_logs").join(&session).is_dir(), "known session's logs stay");
    assert!(archived.join("m_logs").join(&later).is_dir(), "unknown session's logs move aside");
    assert!(dir.join("m_logs/tensorboard").is_dir(), "a log layout of the user's choosing stays");
}
