//! The remote tier on in-process stores (memory, local folder): uploads,
//! manifests, `LATEST`, retention, cleanup, catch-up and restore on a fresh
//! folder. The same against a real S3 server is in `remote_s3.rs`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{config, seeded_store, stores_equal};
use modelio::remote::{Reason, Remote};
use modelio::{Config, Error, ModelIo};

fn remote_config(dir: &Path, url: &str) -> Config {
    let mut c = config(dir, "m");
    c.save.interval = 1;
    c.remote.url = url.into();
    c.remote.orphan_grace_secs = 0;
    c
}

fn memory_url(test: &str) -> String {
    format!("memory://{test}-{}", uuid())
}

fn uuid() -> String {
    format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

/// Train `steps` iterations of a seeded store, saving each, waiting for the uploads.
fn train(io: &mut ModelIo, vs: &tch::nn::VarStore, steps: u64) {
    for _ in 0..steps {
        io.record(1.0);
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                let _ = v.g_add_scalar_(0.25);
            }
        });
        io.save(vs, None).unwrap().wait_blocking().unwrap();
        assert!(io.wait_remote_blocking(Duration::from_secs(30)), "upload did not finish");
    }
}

#[test]
fn every_save_is_uploaded_and_a_fresh_folder_resumes_from_the_remote() {
    let url = memory_url("fresh");
    let first = tempfile::tempdir().unwrap();
    let (vs, _net) = seeded_store(1);
    let mut c = remote_config(first.path(), &url);
    c.remote.keep = 2;
    let mut io = ModelIo::open(c.clone()).unwrap();
    train(&mut io, &vs, 4);
    let stats = io.remote_stats().unwrap();
    assert_eq!((stats.uploaded, stats.last_uploaded, stats.failed_attempts), (4, Some(4), 0), "{stats:?}");
    io.shutdown_blocking().unwrap();

    let remote = Remote::connect(&c.remote, "m").unwrap();
    let all = remote.list().unwrap();
    assert_eq!(all.iter().map(|m| m.iterations).collect::<Vec<_>>(), vec![3, 4], "retention keeps the newest 2");
    let latest = remote.latest().unwrap().unwrap();
    assert_eq!((latest.iterations, latest.kind.as_str()), (4, "save"));
    assert!(remote.verify(&latest).unwrap().is_empty());

    // A fresh machine: an empty folder, the same remote.
    let fresh = tempfile::tempdir().unwrap();
    let mut io = ModelIo::open(remote_config(fresh.path(), &url)).unwrap();
    assert!(io.model_exists());
    let (restored, _net) = seeded_store(2);
    let loaded = io.load(&restored).unwrap();
    assert_eq!(loaded.iterations, 4);
    assert!(stores_equal(&vs, &restored));
    assert_eq!(io.iterations(), 4);
    // It is up to date: nothing is uploaded again at open.
    io.shutdown_blocking().unwrap();
    assert_eq!(remote.list().unwrap().len(), 2);
}

#[test]
fn nothing_is_pending_right_after_a_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().join("store").display());
    let (vs, _net) = seeded_store(1);
    let mut io = ModelIo::open(remote_config(&tmp.path().join("first"), &url)).unwrap();
    train(&mut io, &vs, 2);
    io.shutdown_blocking().unwrap();

    // A fresh folder pulls iteration 2, which the remote has: no upload is pending.
    let io = ModelIo::open(remote_config(&tmp.path().join("fresh"), &url)).unwrap();
    assert!(io.model_exists());
    let stats = io.remote_stats().unwrap();
    assert_eq!((stats.pending, stats.uploaded, stats.skipped), (None, 0, 0), "{stats:?}");
    assert!(io.wait_remote_blocking(Duration::from_secs(30)));
    assert_eq!(io.remote_stats().unwrap().pending, None);
    io.shutdown_blocking().unwrap();
    let remote = Remote::connect(&remote_config(tmp.path(), &url).remote, "m").unwrap();
    assert_eq!(remote.list().unwrap().len(), 2, "nothing was uploaded again");
}

#[test]
fn a_local_save_newer_than_the_remote_is_uploaded_at_open() {
    let url = memory_url("catch-up");
    let dir = tempfile::tempdir().unwrap();
    let (vs, _net) = seeded_store(3);
    // Trained without the remote tier.
    let mut io = ModelIo::open(remote_config(dir.path(), "")).unwrap();
    for _ in 0..3 {
        io.record(1.0);
    }
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();

    let c = remote_config(dir.path(), &url);
    let io = ModelIo::open(c.clone()).unwrap();
    assert!(io.wait_remote_blocking(Duration::from_secs(30)));
    let latest = Remote::connect(&c.remote, "m").unwrap().latest().unwrap().unwrap();
    assert_eq!((latest.iterations, latest.kind.as_str()), (3, "catch-up"));
    io.shutdown_blocking().unwrap();
    // Opening again uploads nothing more.
    let io = ModelIo::open(c.clone()).unwrap();
    assert!(io.wait_remote_blocking(Duration::from_secs(30)));
    io.shutdown_blocking().unwrap();
    assert_eq!(Remote::connect(&c.remote, "m").unwrap().list().unwrap().len(), 1);
}

#[test]
fn milestones_upload_only_backups_and_the_exit_save() {
    let url = memory_url("milestones");
    let dir = tempfile::tempdir().unwrap();
    let (vs, _net) = seeded_store(4);
    let mut c = remote_config(dir.path(), &url);
    c.remote.upload = modelio::config::UploadPolicy::Milestones;
    c.remote.keep = 0;
    let mut io = ModelIo::open(c.clone()).unwrap();
    let mut backed_up = Vec::new();
    for loss in [3.0, 2.0, 4.0, 5.0] {
        io.record(loss);
        let c = io.save(&vs, None).unwrap().wait_blocking().unwrap();
        if c.backed_up {
            backed_up.push((c.iterations, "backup".to_string()));
        }
    }
    assert!(!backed_up.is_empty() && backed_up.len() < 4, "{backed_up:?}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let finished = rt.block_on(io.finish(&vs, None)).unwrap();
    assert!(finished.unreported.is_empty(), "{:?}", finished.unreported);
    let kinds: Vec<(u64, String)> =
        Remote::connect(&c.remote, "m").unwrap().list().unwrap().into_iter().map(|m| (m.iterations, m.kind)).collect();
    backed_up.push((4, "exit".to_string()));
    assert_eq!(kinds, backed_up);
}

/// Archives for direct uploads: committed saves of a small store at `n` iterations.
fn archive_at(dir: &Path, n: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let d = dir.join(format!("src{n}"));
    let (vs, _net) = seeded_store(n as i64);
    let mut io = ModelIo::open(remote_config(&d, "")).unwrap();
    for _ in 0..n {
        io.record(1.0);
    }
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    (d.join("m.mio"), d.join("m_state.json"))
}

#[test]
fn racing_uploads_leave_latest_at_the_newest_and_every_manifest_whole() {
    // The local folder store has an atomic create-if-absent; memory has
    // conditional updates too. Both are raced.
    let tmp = tempfile::tempdir().unwrap();
    for url in [memory_url("race"), format!("file://{}", tmp.path().join("store").display())] {
        let c = remote_config(tmp.path(), &url);
        let remote = Arc::new(Remote::connect(&c.remote, "m").unwrap());
        let sources: Vec<_> = (1..=6).map(|n| archive_at(tmp.path(), n)).collect();
        std::thread::scope(|s| {
            for (archive, state) in &sources {
                let remote = remote.clone();
                s.spawn(move || remote.upload(archive, state, Reason::Save, &|| false).unwrap());
            }
        });
        let all = remote.list().unwrap();
        assert_eq!(all.len(), 6, "{url}");
        for m in &all {
            assert!(remote.verify(m).unwrap().is_empty(), "{url} {}", m.id());
        }
        // The memory store updates LATEST conditionally, so the newest wins
        // every race; the folder store overwrites, so LATEST is any of them,
        // and readers still find the newest by listing when it is stale.
        if url.starts_with("memory") {
            assert_eq!(remote.latest().unwrap().unwrap().iterations, 6);
        }
        let _ = std::fs::remove_dir_all(tmp.path().join("store"));
    }
}

#[test]
fn a_partial_upload_is_invisible_and_removed_by_a_later_run() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let url = format!("file://{}", store.display());
    let c = remote_config(tmp.path(), &url);
    let remote = Remote::connect(&c.remote, "m").unwrap();
    let (archive, state) = archive_at(tmp.path(), 2);
    remote.upload(&archive, &state, Reason::Save, &|| false).unwrap();
    // An upload abandoned after its data (no manifest), as a killed run leaves it.
    let orphan = store.join("m/data/00000000000000000009-deadbeefdeadbeef");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::copy(&archive, orphan.join("archive.mio")).unwrap();
    std::fs::create_dir_all(store.join("m/uploads")).unwrap();
    std::fs::write(store.join("m/uploads/deadbeefdeadbeef.json"), br#"{"upload":"deadbeefdeadbeef","iterations":9,"multipart":[]}"#)
        .unwrap();
    // Stopped between parts: also nothing visible.
    let big = tmp.path().join("big.mio");
    std::fs::write(&big, vec![0u8; 1]).unwrap();
    assert_eq!(remote.latest().unwrap().unwrap().iterations, 2, "the partial upload is invisible");
    assert_eq!(remote.clean_orphans(Duration::ZERO).unwrap(), 1);
    assert!(!orphan.exists());
    assert!(!store.join("m/uploads/deadbeefdeadbeef.json").exists());
    assert_eq!(remote.list().unwrap().len(), 1);
    assert!(remote.verify(&remote.latest().unwrap().unwrap()).unwrap().is_empty());
}

#[test]
fn a_stopped_upload_leaves_no_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = remote_config(tmp.path(), &memory_url("stop"));
    c.remote.part_size_mib = 5;
    let remote = Remote::connect(&c.remote, "m").unwrap();
    // An archive over one part: a multipart upload, stopped before its first part.
    let d = tmp.path().join("src");
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _w = vs.root().zeros("w", &[3 << 20]);
    let mut io = ModelIo::open(remote_config(&d, "")).unwrap();
    io.record(1.0);
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    let e = remote.upload(&d.join("m.mio"), &d.join("m_state.json"), Reason::Save, &|| true).unwrap_err();
    assert!(e.report().to_string().contains("abandoned"), "{}", e.report());
    assert!(remote.latest().unwrap().is_none());
    // The same upload, not stopped: multipart, and it verifies.
    let m = remote.upload(&d.join("m.mio"), &d.join("m_state.json"), Reason::Save, &|| false).unwrap();
    assert!(m.object("archive").unwrap().size > 5 << 20);
    assert!(remote.verify(&m).unwrap().is_empty());
}

#[test]
fn a_damaged_remote_object_is_never_committed_locally() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let url = format!("file://{}", store.display());
    let c = remote_config(tmp.path(), &url);
    let remote = Remote::connect(&c.remote, "m").unwrap();
    let (a1, s1) = archive_at(tmp.path(), 1);
    let (a2, s2) = archive_at(tmp.path(), 2);
    remote.upload(&a1, &s1, Reason::Save, &|| false).unwrap();
    let newest = remote.upload(&a2, &s2, Reason::Save, &|| false).unwrap();
    let object = store.join(newest.object("archive").unwrap().key.as_str());
    let mut bytes = std::fs::read(&object).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&object, bytes).unwrap();
    let problems = remote.verify(&newest).unwrap();
    assert!(problems.iter().any(|p| p.contains("CRC-32C")), "{problems:?}");
    // A fresh folder restores the checkpoint before it.
    let fresh = tmp.path().join("fresh");
    let mut io = ModelIo::open(remote_config(&fresh, &url)).unwrap();
    let (vs, _net) = seeded_store(9);
    assert_eq!(io.load(&vs).unwrap().iterations, 1);
    io.shutdown_blocking().unwrap();
}

#[test]
fn bad_urls_and_missing_credentials_are_named_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let e = ModelIo::open(remote_config(dir.path(), "ftp://x/y")).err().unwrap().to_string();
    assert!(e.contains("remote.url") && e.contains("ftp://x/y"), "{e}");
    let mut c = remote_config(dir.path(), "s3://bucket/p");
    c.remote.endpoint = "http://127.0.0.1:1".into();
    let e = ModelIo::open(c.clone()).err().unwrap().to_string();
    assert!(e.contains("remote.allow_http"), "{e}");
    c.remote.allow_http = true;
    // The environment of this test binary has no AWS keys.
    let e = ModelIo::open(c).err().unwrap();
    assert!(matches!(&e, Error::RemoteCredentials { missing, .. } if missing == "AWS_ACCESS_KEY_ID"), "{e}");
    let e = ModelIo::open(remote_config(dir.path(), "gs://b/p")).err().unwrap().to_string();
    assert!(e.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{e}");
}

#[test]
fn an_unreadable_latest_is_replaced_and_names_with_odd_characters_work() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let url = format!("file://{}", store.display());
    let mut c = remote_config(tmp.path(), &url);
    c.model.name = "run#1 [a]".into();
    let remote = Remote::connect(&c.remote, "run#1 [a]").unwrap();
    let (archive, state) = archive_at(tmp.path(), 2);
    let first = remote.upload(&archive, &state, Reason::Save, &|| false).unwrap();
    assert!(remote.verify(&first).unwrap().is_empty());
    // LATEST damaged: the next upload succeeds and replaces it.
    let latest = std::fs::read_dir(&store).unwrap().flatten().next().unwrap().path().join("LATEST");
    std::fs::write(&latest, b"{not json").unwrap();
    let (archive, state) = archive_at(tmp.path(), 3);
    let second = remote.upload(&archive, &state, Reason::Save, &|| false).unwrap();
    let text = std::fs::read_to_string(&latest).unwrap();
    assert!(text.contains("\"iterations\":3"), "{text}");
    assert_eq!(remote.latest().unwrap().unwrap(), second);
    let fresh = modelio::folder::ModelPaths::new(tmp.path().join("fresh"), "run#1 [a]");
    remote.pull(&second, &fresh).unwrap();
    assert_eq!(modelio::archive::ArchiveReader::open(&fresh.archive()).unwrap().manifest.iterations, 3);
    // Retention keeps an upload just made even when newer ones exist.
    let (archive, state) = archive_at(tmp.path(), 1);
    let old = remote.upload(&archive, &state, Reason::Save, &|| false).unwrap();
    assert_eq!(remote.apply_retention(1, Some(&old.id())).unwrap(), 1);
    let left: Vec<u64> = remote.list().unwrap().iter().map(|m| m.iterations).collect();
    assert_eq!(left, vec![1, 3], "the protected upload and LATEST's stay");
}

#[test]
fn a_fresh_folder_refuses_to_start_when_no_remote_checkpoint_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let url = format!("file://{}", store.display());
    let remote = Remote::connect(&remote_config(tmp.path(), &url).remote, "m").unwrap();
    let (archive, state) = archive_at(tmp.path(), 2);
    let m = remote.upload(&archive, &state, Reason::Save, &|| false).unwrap();
    std::fs::remove_file(store.join(m.object("archive").unwrap().key.as_str())).unwrap();
    let fresh = tmp.path().join("fresh");
    let e = ModelIo::open(remote_config(&fresh, &url)).err().unwrap();
    assert!(matches!(&e, Error::RemoteRestore { .. }), "{e:?}");
    let report = e.report().to_string();
    assert!(report.contains("missing") && report.contains("remote.restore = false"), "{report}");
    assert!(!fresh.join("m.mio").exists());
    // Starting afresh is a choice.
    let mut c = remote_config(&fresh, &url);
    c.remote.restore = false;
    let io = ModelIo::open(c).unwrap();
    assert!(!io.model_exists());
    io.shutdown_blocking().unwrap();
}

#[test]
fn shutdown_reports_an_upload_it_stopped_waiting_for() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = remote_config(dir.path(), &memory_url("behind"));
    c.remote.drain_secs = 1;
    let mut io = ModelIo::open(c).unwrap();
    io.set_upload_delay(Duration::from_secs(3));
    let (vs, _net) = seeded_store(5);
    io.record(1.0);
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    let e = io.shutdown_blocking().unwrap_err();
    assert!(matches!(&e, Error::RemoteBehind { iterations: 1, .. }), "{e:?}");
    assert!(e.to_string().contains("next run uploads it"), "{e}");
}
