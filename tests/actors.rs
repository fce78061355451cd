//! The actors under stress: a panic in the background is a reported failure
//! that costs nothing later, and requests beyond the bounds are refused as
//! overload, not as stopped actors.

mod common;

use std::time::Duration;

use modelio::folder::snapshot::snapshot_dir;
use modelio::Error;
use modelio::Work;

/// A handle on model `m` in a fresh folder, and the seeded store it saves
/// (the temporary folder lives as long as the first value).
fn opened() -> (tempfile::TempDir, std::path::PathBuf, tch::nn::VarStore, modelio::ModelIo) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let (vs, _net) = common::seeded_store(0);
    let io = common::open(&dir, "m");
    (tmp, dir, vs, io)
}

/// The error a background failure wraps.
fn cause(e: &Error) -> &Error {
    match e {
        Error::Background { source, .. } => source,
        other => other,
    }
}

#[test]
fn a_panicking_write_fails_its_ticket_and_the_next_save_commits() {
    let (_tmp, dir, vs, mut io) = opened();
    io.record(1.0);
    io.inject_panic_in_next_write();
    let err = io.save(&vs, None).unwrap().wait_blocking().expect_err("the write panicked");
    assert!(err.is_background(), "{err:?}");
    match cause(&err) {
        Error::Internal { what: Work::Save, message } => assert!(message.contains("inject_panic_in_next_write"), "{message}"),
        other => panic!("expected an internal error, got {other:?}"),
    }
    assert!(err.report().to_string().contains("panicked"), "{}", err.report());
    // Reported once, on its ticket: the next save is neither refused nor lost.
    io.record(1.0);
    let c = io.save(&vs, None).expect("reported on the ticket already").wait_blocking().unwrap();
    assert_eq!(c.iterations, 2);
    io.snapshot().unwrap();
    io.flush_blocking().unwrap();
    assert!(snapshot_dir(&dir, 2).join("m.mio").exists(), "a snapshot after the panic is built");
    assert_eq!(io.stats().failed, 1);
    io.shutdown_blocking().unwrap();
    let r = modelio::archive::ArchiveReader::open(&dir.join("m.mio")).unwrap();
    assert_eq!(r.manifest.iterations, 2);
    assert!(r.verify().is_empty());
}

#[test]
fn a_panic_whose_ticket_was_dropped_goes_to_the_next_call() {
    let (_tmp, dir, vs, mut io) = opened();
    io.record(1.0);
    io.inject_panic_in_next_write();
    drop(io.save(&vs, None).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while io.stats().failed < 1 {
        assert!(std::time::Instant::now() < deadline, "the panicking save never reported its failure");
        std::thread::sleep(Duration::from_millis(5));
    }
    io.record(1.0);
    let err = io.save(&vs, None).expect_err("the dropped ticket's panic");
    assert!(matches!(cause(&err), Error::Internal { what: Work::Save, .. }), "{err:?}");
    // Reported once; the save that reported it was still committed.
    io.flush_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    assert_eq!(modelio::archive::ArchiveReader::open(&dir.join("m.mio")).unwrap().manifest.iterations, 2);
}

#[test]
fn snapshots_requested_faster_than_they_are_built_are_refused_as_overload() {
    let (_tmp, dir, vs, mut io) = opened();
    io.record(1.0);
    io.set_write_delay(Duration::from_millis(500));
    let ticket = io.save(&vs, None).unwrap();
    // Every request waits for the slow save: the first ones are accepted,
    // then they are refused as overload.
    let results: Vec<_> = (0..20).map(|_| io.snapshot()).collect();
    let accepted = results.iter().take_while(|r| r.is_ok()).count();
    assert!((1..20).contains(&accepted), "{accepted} of 20 accepted");
    let err = results[accepted].as_ref().unwrap_err();
    assert!(matches!(err, Error::Overloaded { what: Work::Snapshot, capacity } if *capacity == accepted), "{err:?}");
    assert!(!matches!(err, Error::Stopped) && err.is_retryable() && !err.is_background());
    assert!(err.to_string().contains("faster than they can be handed over"), "{err}");
    assert!(results[accepted..].iter().all(|r| matches!(r, Err(Error::Overloaded { .. }))));
    // Nothing was lost or left behind: the save and the accepted snapshots are done.
    ticket.wait_blocking().unwrap();
    io.set_write_delay(Duration::ZERO);
    io.flush_blocking().unwrap();
    assert!(snapshot_dir(&dir, 1).join("m.mio").exists(), "built before the flush returned");
    io.snapshot().expect("room again once the snapshots are built");
    io.shutdown_blocking().unwrap();
}

#[test]
fn a_snapshot_requested_with_its_save_is_built_before_the_flush_returns() {
    let (_tmp, dir, vs, mut io) = opened();
    for i in 1..=3u64 {
        io.record(1.0);
        io.set_write_delay(Duration::from_millis(if i == 2 { 200 } else { 0 }));
        let _ticket = io.save(&vs, None).unwrap();
        io.snapshot().unwrap();
    }
    io.flush_blocking().unwrap();
    for i in 1..=3u64 {
        let archive = snapshot_dir(&dir, i).join("m.mio");
        assert_eq!(modelio::archive::ArchiveReader::open(&archive).unwrap().manifest.iterations, i, "snapshot {i}");
    }
    io.shutdown_blocking().unwrap();
}
