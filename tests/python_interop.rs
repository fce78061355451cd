//! An archive written from Rust reads in Python with only zipfile + safetensors.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The formula `tests/python/check_archive.py` rebuilds.
fn expected(kind: Kind, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let values = Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.37 - 2.5;
    match kind {
        Kind::Bool => values.gt(0.0).reshape(shape),
        Kind::Uint8 => values.abs().to_kind(kind).reshape(shape),
        _ => values.to_kind(kind).reshape(shape),
    }
}

#[test]
fn python_reads_what_rust_wrote() {
    let kinds = [
        ("f32", Kind::Float),
        ("f64", Kind::Double),
        ("f16", Kind::Half),
        ("bf16", Kind::BFloat16),
        ("i64", Kind::Int64),
        ("i32", Kind::Int),
        ("u8", Kind::Uint8),
        ("bool", Kind::Bool),
    ];
    let shapes: [&[i64]; 4] = [&[], &[5], &[3, 4], &[2, 0, 3]];
    let vs = VarStore::new(Device::Cpu);
    let mut listed = BTreeMap::new();
    for (prefix, kind) in kinds {
        for (i, shape) in shapes.iter().enumerate() {
            let name = format!("{prefix}.t{i}");
            let _ = (vs.root() / prefix).add(&format!("t{i}"), expected(kind, shape), false);
            listed.insert(name, shape.to_vec());
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut io = common::open(dir.path(), "interop");
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();

    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(python.exists(), "{} missing: run `make setup` (make test does it)", python.display());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_archive.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir.path().join("interop.mio"))
        .arg(serde_json::to_string(&listed).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("32 tensors match"));
}
