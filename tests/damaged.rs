//! Damaged archives: every flipped byte and every truncation is a typed error
//! or is caught by a checksum; never a panic, a hang, or silently wrong data.
//! Unsafe or duplicate entry names are refused. Fallback loads the newest good copy.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use modelio::archive::format::{DType, TensorRef};
use modelio::archive::{commit_archive, ArchiveReader};
use modelio::{Error, ModelIo};

fn small_archive(path: &Path) -> Vec<(String, Vec<u8>)> {
    let a: Vec<u8> = (0..64u8).collect();
    let b: Vec<u8> = (0..24u8).map(|x| x.wrapping_mul(7)).collect();
    let tensors = [
        TensorRef { name: "a", dtype: DType::F32, shape: &[4, 4], data: &a, crc32c: None, crc32: None },
        TensorRef { name: "b", dtype: DType::I64, shape: &[3], data: &b, crc32c: None, crc32: None },
    ];
    let json = serde_json::json!({"step": 1});
    let opt = [TensorRef { name: "a.exp_avg", dtype: DType::F32, shape: &[4, 4], data: &a, crc32c: None, crc32: None }];
    let optimizer = modelio::archive::format::OptimizerRef { kind: "adam", json: &json, tensors: &opt };
    let state = br#"{"model_name":"m","total_iterations":3,"sessions":[],"lowest_average_loss":0.5,"config":null}"#;
    commit_archive(path, "m", 3, &tensors, Some(optimizer), Some(state)).unwrap();
    vec![("a".into(), a.clone()), ("b".into(), b), ("a.exp_avg".into(), a)]
}

/// Open and verify; Ok(true) when everything checks out and the data is the original.
fn outcome(path: &Path, original: &[(String, Vec<u8>)]) -> Result<(), String> {
    let r = ArchiveReader::open(path).map_err(|e| {
        assert!(matches!(e, Error::Damaged { .. } | Error::Io { .. }), "untyped error: {e:?}");
        e.to_string()
    })?;
    let damaged = r.verify();
    if !damaged.is_empty() {
        return Err(format!("checksums: {damaged:?}"));
    }
    // Undetected: then every tensor must be exactly the original.
    let all = r.model.iter().chain(r.optimizer.iter().flat_map(|(t, _)| t.iter()));
    for t in all {
        let want = &original.iter().find(|(n, _)| n == &t.meta.name).expect("no invented tensors").1;
        assert_eq!(r.data(t), &want[..], "silently wrong data in {}", t.meta.name);
    }
    Ok(())
}

#[test]
fn every_flip_and_truncation_is_caught_or_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.mio");
    let original = small_archive(&path);
    let pristine = std::fs::read(&path).unwrap();
    assert!(outcome(&path, &original).is_ok());
    let probe = dir.path().join("probe.mio");
    let (mut caught, mut harmless) = (0, 0);
    for offset in 0..pristine.len() {
        for mask in [0x01u8, 0xff] {
            let mut bytes = pristine.clone();
            bytes[offset] ^= mask;
            std::fs::write(&probe, &bytes).unwrap();
            match outcome(&probe, &original) {
                Ok(()) => harmless += 1,
                Err(_) => caught += 1,
            }
        }
        std::fs::write(&probe, &pristine[..offset]).unwrap();
        assert!(outcome(&probe, &original).is_err(), "truncated to {offset} bytes must not load");
    }
    println!("{} bytes: {caught} flips caught, {harmless} harmless (padding, timestamps, unread metadata)", pristine.len());
    // The tensor bytes themselves are always caught.
    let r = ArchiveReader::open(&path).unwrap();
    for t in r.model.iter() {
        let mut bytes = pristine.clone();
        bytes[t.offset] ^= 1;
        std::fs::write(&probe, &bytes).unwrap();
        assert!(outcome(&probe, &original).is_err());
    }
}

/// A zip of STORED entries with these names, written verbatim (no name
/// normalisation, so that unsafe names reach the reader as they are).
fn zip_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = rawzip::ZipArchiveWriter::new(Vec::new());
    for (name, data) in entries {
        let (mut entry, _config) = zip.new_file(rawzip::path::EntryPath::verbatim(name.as_bytes())).start().unwrap();
        entry.write_all(data).unwrap();
        entry.finish(rawzip::DataDescriptorOutput::new(crc32fast::hash(data), data.len() as u64)).unwrap();
    }
    zip.finish().unwrap()
}

#[test]
fn unsafe_and_duplicate_entry_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.mio");
    for bad in ["../evil", "/abs/path", "a/../../b", "C:\\x", "a\\b"] {
        std::fs::write(&path, zip_with(&[("manifest.json", b"{}"), (bad, b"x")])).unwrap();
        let err = ArchiveReader::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a plain relative name") && err.contains("m.mio"), "{bad}: {err}");
    }
    // Two entries with the same name (renamed in place after writing).
    let mut bytes = zip_with(&[("manifest.json", b"{}"), ("manifesX.json", b"{}")]);
    let from = b"manifesX.json";
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i + 7] = b't';
        }
        i += 1;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = ArchiveReader::open(&path).unwrap_err().to_string();
    assert!(err.contains("twice") || err.contains("uplicate"), "{err}");
}

fn io_with_fallback(dir: &Path, fallback: bool) -> ModelIo {
    let mut c = common::config(dir, "m");
    c.load.fallback = fallback;
    ModelIo::open(c).unwrap()
}

#[test]
fn fallback_loads_newest_good_copy_and_says_which() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let (v1, _a) = common::seeded_store(1);
    let (v2, _b) = common::seeded_store(2);
    let (v3, _c) = common::seeded_store(3);
    let mut io = io_with_fallback(&dir, false);
    io.record(3.0);
    let _ticket = io.save(&v1, None).unwrap();
    io.snapshot().unwrap(); // snapshot 1 = v1
    io.record(2.0);
    let _ticket = io.save(&v2, None).unwrap(); // lower: .bk = v2
    io.record(9.0);
    let _ticket = io.save(&v3, None).unwrap(); // live = v3
    io.shutdown_blocking().unwrap();
    let live = dir.join("m.mio");
    let r = ArchiveReader::open(&live).unwrap();
    let off = r.model[1].offset;
    drop(r);
    // Replace (not modify) the live file by a damaged copy: .bk is a hard link
    // of an earlier save and must stay as it is.
    let mut bytes = std::fs::read(&live).unwrap();
    bytes[off] ^= 0xff;
    std::fs::remove_file(&live).unwrap();
    std::fs::write(&live, &bytes).unwrap();

    let (target, _t) = common::seeded_store(9);
    let mut strict = io_with_fallback(&dir, false);
    let err = strict.load(&target).unwrap_err();
    assert!(err.is_damaged() && err.to_string().contains("modelio restore"), "{err}");
    drop(strict);

    let mut lenient = io_with_fallback(&dir, true);
    let loaded = lenient.load(&target).unwrap();
    assert!(loaded.fallback);
    assert_eq!(loaded.path, dir.join("m.mio.bk"));
    assert!(common::stores_equal(&target, &v2));
    drop(lenient);

    // Without the live archive and with a damaged backup: the newest snapshot.
    std::fs::remove_file(&live).unwrap();
    std::fs::remove_file(dir.join("m.mio.bk")).unwrap();
    std::fs::write(dir.join("m.mio.bk"), b"junk").unwrap();
    let mut lenient = io_with_fallback(&dir, true);
    let loaded = lenient.load(&target).unwrap();
    assert_eq!(loaded.path, modelio::folder::snapshot::snapshot_dir(&dir, 1).join("m.mio"));
    let reason = loaded.reason.unwrap_or_default();
    assert!(reason.contains("m.mio is missing") && !reason.contains("train a model first"), "{reason}");
    assert!(common::stores_equal(&target, &v1));
    drop(lenient);
    // Without fallback, a folder with backups and snapshots but no archive is
    // not a new model: opening it for training is refused, naming what is there.
    let err = ModelIo::open(common::config(&dir, "m")).err().expect("refused");
    assert!(matches!(err, Error::ArchiveMissing { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("m.mio.bk") && msg.contains("1 snapshot") && msg.contains("modelio restore"), "{msg}");
}

#[test]
fn second_training_process_gets_the_holders_pid_and_predict_may_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let exe = std::env::current_exe().unwrap();
    let helper = exe.parent().and_then(Path::parent).unwrap().join("examples/crash_helper");
    let mut child = std::process::Command::new(helper).arg(&dir).stdout(std::process::Stdio::null()).spawn().unwrap();
    let start = std::time::Instant::now();
    while !dir.join("crash.mio").exists() {
        assert!(start.elapsed().as_secs() < 60, "helper never saved");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let err = ModelIo::open(common::config(&dir, "crash")).err().expect("the folder is locked");
    let msg = err.to_string();
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(err, Error::Locked { .. }), "{err:?}");
    assert!(msg.contains(&child.id().to_string()) && msg.contains(&dir.display().to_string()), "{msg}");
    // Predict mode takes no lock and reads committed files.
    let mut c = common::config(&dir, "crash");
    c.model.predict = true;
    let io = ModelIo::open(c).unwrap();
    assert!(io.model_exists());
}

/// Write the archive at `path` again with the same tensors and optimizer
/// and `state` as its embedded state file (the manifest's checksums then
/// cover it: only the reader's comparison with the manifest can object).
fn rewrite_state(path: &Path, state: &[u8]) {
    let r = ArchiveReader::open(path).unwrap();
    let copy = |t: &modelio::archive::Located| (t.meta.name.clone(), t.meta.dtype, t.meta.shape.clone(), r.data(t).to_vec());
    let model: Vec<_> = r.model.iter().map(copy).collect();
    let optimizer = r.optimizer.as_ref().map(|(located, json)| {
        let kind = r.manifest.optimizer.as_ref().unwrap().kind.clone();
        (kind, json.clone(), located.iter().map(copy).collect::<Vec<_>>())
    });
    let (name, iterations) = (r.manifest.name.clone(), r.manifest.iterations);
    drop(r);
    fn refs(ts: &[(String, DType, Vec<usize>, Vec<u8>)]) -> Vec<TensorRef<'_>> {
        ts.iter().map(|(n, d, s, b)| TensorRef { name: n, dtype: *d, shape: s, data: b, crc32c: None, crc32: None }).collect()
    }
    let model_refs = refs(&model);
    let opt_refs = optimizer.as_ref().map(|(_, _, ts)| refs(ts));
    let opt = optimizer.as_ref().zip(opt_refs.as_deref()).map(|((kind, json, _), tensors)| modelio::archive::format::OptimizerRef {
        kind,
        json,
        tensors,
    });
    commit_archive(path, &name, iterations, &model_refs, opt, Some(state)).unwrap();
}

#[test]
fn an_embedded_state_that_disagrees_with_the_manifest_is_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let (vs, _n) = common::seeded_store(1);
    let mut io = io_with_fallback(&dir, false);
    for _ in 0..30 {
        io.record(1.0);
    }
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    let live = dir.join("m.mio");
    let good = std::fs::read(&live).unwrap();
    let mut ahead = modelio::policy::state::State::read(&dir.join("m_state.json")).unwrap();
    assert_eq!(ahead.total_iterations, 30);
    ahead.total_iterations += 1000;

    for (what, state) in [("empty", Vec::new()), ("not a state file", b"{\"x\":1}".to_vec()), ("1000 ahead", ahead.to_json())] {
        std::fs::write(&live, &good).unwrap();
        rewrite_state(&live, &state);
        // The state file was lost: the archive's copy is all there is.
        let _ = std::fs::remove_file(dir.join("m_state.json"));
        let e = ArchiveReader::open(&live).expect_err(what);
        assert!(matches!(&e, Error::Damaged { what: part, .. } if part == "state.json"), "{what}: {e:?}");
        let text = e.to_string();
        assert!(text.contains(&live.display().to_string()) && text.contains("modelio restore"), "{what}: {text}");
        let out = Command::new(common::cli()).arg("verify").arg(&live).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{what}: `modelio verify` accepts it: {stdout}");
        assert!(stdout.contains("DAMAGED") && stdout.contains("state.json"), "{what}: {stdout}");

        // A load refuses it rather than resuming at iteration 0 or 1030.
        let (target, _t) = common::seeded_store(9);
        let mut io = io_with_fallback(&dir, false);
        let err = io.load(&target).expect_err(what);
        assert!(err.is_damaged() && err.to_string().contains("state.json"), "{what}: {err}");
        drop(io);

        // With a good backup, the fallback loads it and goes on from its 30 iterations.
        std::fs::write(dir.join("m.mio.bk"), &good).unwrap();
        let mut io = io_with_fallback(&dir, true);
        let loaded = io.load(&target).unwrap();
        assert_eq!((loaded.fallback, loaded.iterations, io.iterations()), (true, 30, 30), "{what}");
        assert!(common::stores_equal(&target, &vs));
        drop(io);
        std::fs::remove_file(dir.join("m.mio.bk")).unwrap();
    }
}

#[test]
fn with_fallback_a_lost_archive_beside_its_state_file_is_named_as_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let (vs, _n) = common::seeded_store(1);
    let mut io = io_with_fallback(&dir, false);
    for _ in 0..3 {
        io.record(1.0);
    }
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    // The first save sets the lowest loss and makes no backup: only the state file is left.
    std::fs::remove_file(dir.join("m.mio")).unwrap();
    assert!(!dir.join("m.mio.bk").exists());

    let mut io = io_with_fallback(&dir, true);
    assert!(io.model_exists());
    let (target, _t) = common::seeded_store(9);
    for err in [io.load(&target).unwrap_err(), io.resume(&target, None).unwrap_err()] {
        assert!(matches!(err, Error::ArchiveLost { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(!msg.contains("train a model first"), "{msg}");
        assert!(msg.contains("m.mio is missing") && msg.contains("m_state.json (3 iterations)"), "{msg}");
        assert!(msg.contains(&format!("modelio restore {} --name m", dir.display())) && msg.contains("snapshot"), "{msg}");
    }
    io.shutdown_blocking().unwrap();
}

/// An archive laid out by hand (as another writer could): a manifest with
/// its checksum and one U8 tensor `w` of one element in `shape`.
fn archive_with_shape(shape: &[usize]) -> Vec<u8> {
    use modelio::archive::format::{Manifest, TensorMeta, FORMAT_NAME, FORMAT_VERSION};
    let data = [7u8];
    let header = serde_json::json!({"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}}).to_string();
    let mut blob = (header.len() as u64).to_le_bytes().to_vec();
    blob.extend_from_slice(header.as_bytes());
    blob.extend_from_slice(&data);
    let mut m = Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        name: "m".into(),
        iterations: 1,
        created: "2026-01-01T00:00:00+00:00".into(),
        model: vec![TensorMeta { name: "w".into(), dtype: DType::U8, shape: shape.to_vec(), crc32c: crc32c::crc32c(&data) }],
        optimizer: None,
        state_crc32c: None,
        checksum: Some(0),
    };
    m.checksum = Some(crc32c::crc32c(&serde_json::to_vec_pretty(&m).unwrap()));
    zip_with(&[("manifest.json", &serde_json::to_vec_pretty(&m).unwrap()), ("model.safetensors", &blob)])
}

#[test]
fn a_tensor_of_more_dimensions_than_readers_take_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // As many as NumPy takes: fine.
    let most = dir.path().join("most.mio");
    std::fs::write(&most, archive_with_shape(&[1; modelio::archive::format::MAX_RANK])).unwrap();
    assert!(ArchiveReader::open(&most).unwrap().verify().is_empty());

    let path = dir.path().join("m.mio");
    std::fs::write(&path, archive_with_shape(&[1; 10_000])).unwrap();
    let Err(e) = ArchiveReader::open(&path) else { panic!("a tensor of 10000 dimensions must be refused") };
    assert!(matches!(e, Error::Damaged { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(&path.display().to_string()) && text.contains("`w`") && text.contains("10000 dimensions"), "{text}");
    let out = Command::new(common::cli()).arg("verify").arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "`modelio verify` accepts it: {stdout}");
    assert!(stdout.contains("DAMAGED") && stdout.contains("`w`"), "{stdout}");

    // Nor is one written: not by the archive writer...
    let big = dir.path().join("big.mio");
    let shape = [1; modelio::archive::format::MAX_RANK + 1];
    let w = TensorRef { name: "w", dtype: DType::U8, shape: &shape, data: &[7], crc32c: None, crc32: None };
    let e = commit_archive(&big, "big", 1, &[w], None, None).unwrap_err();
    assert!(matches!(e, Error::TooManyDims { rank: 65, .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(&big.display().to_string()) && text.contains("`w`"), "{text}");
    assert!(!big.exists());
    // ...nor by a save, which says so at the call.
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _w = vs.root().zeros("w", &[1; modelio::archive::format::MAX_RANK + 1]);
    let model = dir.path().join("model");
    let mut io = io_with_fallback(&model, false);
    let e = io.save(&vs, None).unwrap_err();
    assert!(matches!(e, Error::TooManyDims { .. }), "{e:?}");
    assert!(e.to_string().contains(&model.join("m.mio").display().to_string()), "{e}");
    io.shutdown_blocking().unwrap();
    assert!(!model.join("m.mio").exists());
}
