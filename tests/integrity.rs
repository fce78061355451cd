//! Checksums on load and the `inspect` / `verify` commands.

mod common;

use std::process::Command;

use modelio::archive::ArchiveReader;
use modelio::{Adam, Error};

fn saved_model(dir: &std::path::Path) -> tch::nn::VarStore {
    let (vs, _n) = common::seeded_store(3);
    let mut c = common::config(dir, "m");
    c.save.optimizer = modelio::config::OptimizerPolicy::Always;
    let mut io = modelio::ModelIo::open(c).unwrap();
    let opt = Adam::adam(&vs, 1e-3, (0.9, 0.999), 1e-8, 0.0).unwrap();
    io.record(1.0);
    io.save(&vs, Some(&opt)).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    vs
}

#[test]
fn flipping_a_byte_in_any_tensor_is_caught_by_verify_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let vs = saved_model(dir.path());
    let archive = dir.path().join("m.mio");
    let pristine = std::fs::read(&archive).unwrap();
    let reader = ArchiveReader::open(&archive).unwrap();
    let tensors: Vec<_> = reader.model.iter().chain(reader.optimizer.as_ref().unwrap().0.iter()).cloned().collect();
    drop(reader);
    assert!(tensors.len() >= 8);
    for t in tensors.iter().filter(|t| t.len > 0) {
        std::fs::write(&archive, &pristine).unwrap();
        common::flip_byte(&archive, t.offset + t.len / 2);

        let out = Command::new(common::cli()).arg("verify").arg(&archive).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains(&t.meta.name), "verify must name {}: {stdout}", t.meta.name);

        let out = Command::new(common::cli()).arg("verify").arg(dir.path()).output().unwrap();
        assert_eq!(out.status.code(), Some(1));

        let mut io = common::open(dir.path(), "m");
        let (other, _n) = common::seeded_store(9);
        let is_model = !t.meta.name.contains("exp_avg");
        let err = if is_model { io.load(&other).unwrap_err() } else { io.load_optimizer().unwrap_err() };
        assert!(matches!(err, Error::Damaged { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("m.mio") && msg.contains(&t.meta.name) && msg.contains("modelio restore"), "{msg}");
        if is_model {
            assert!(!common::stores_equal(&vs, &other));
        }
        io.shutdown_blocking().unwrap();
    }
    std::fs::write(&archive, &pristine).unwrap();
    let out = Command::new(common::cli()).arg("verify").arg(&archive).output().unwrap();
    assert!(out.status.success());
}

#[test]
fn inspect_json_lists_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let vs = saved_model(dir.path());
    let out = Command::new(common::cli()).args(["inspect", "--json"]).arg(dir.path().join("m.mio")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "m");
    assert_eq!(v["iterations"], 1);
    assert_eq!(v["format_version"], modelio::archive::format::FORMAT_VERSION);
    assert_eq!(v["optimizer"], true);
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), vs.variables().len());
    let w = tensors.iter().find(|t| t["name"] == "l1.weight").unwrap();
    assert_eq!(w["dtype"], "F32");
    assert_eq!(w["shape"], serde_json::json!([16, 8]));
    assert_eq!(w["bytes"], 16 * 8 * 4);

    let text = Command::new(common::cli()).arg("inspect").arg(dir.path().join("m.mio")).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("optimizer: adam"));
}

#[test]
fn cli_errors_name_the_file_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.mio");
    let out = Command::new(common::cli()).arg("inspect").arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.mio"));
    let out = Command::new(common::cli()).arg("verify").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&dir.path().display().to_string()));
    let garbage = dir.path().join("g.mio");
    std::fs::write(&garbage, b"not a zip at all").unwrap();
    let out = Command::new(common::cli()).arg("verify").arg(&garbage).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("DAMAGED"));
}

#[test]
fn truncation_and_header_damage_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path());
    let archive = dir.path().join("m.mio");
    let pristine = std::fs::read(&archive).unwrap();
    let probe = dir.path().join("probe.mio");
    let step = (pristine.len() / 97).max(1);
    for cut in (0..pristine.len()).step_by(step) {
        std::fs::write(&probe, &pristine[..cut]).unwrap();
        assert!(ArchiveReader::open(&probe).is_err(), "truncated at {cut} must not open");
        let mut flipped = pristine.clone();
        flipped[cut] ^= 0x5a;
        std::fs::write(&probe, &flipped).unwrap();
        // Any outcome but a panic is fine here; a structural hit is an error, a data hit fails verify.
        if let Ok(r) = ArchiveReader::open(&probe) {
            let _ = r.verify();
        }
    }
}
