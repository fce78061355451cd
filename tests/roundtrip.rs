//! Saved then loaded tensors are bitwise equal, over random names, shapes and dtypes.

mod common;

use modelio::archive::format::{DType, OptimizerRef, TensorRef};
use modelio::archive::{commit_archive, ArchiveReader};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![DType::F32, DType::F64, DType::F16, DType::BF16, DType::I64, DType::I32, DType::U8, DType::Bool])
}

fn case() -> impl Strategy<Value = Case> {
    // Shapes include scalars (no dims) and zero-size dims.
    ("[a-z][a-z0-9_.]{0,12}", dtype(), prop::collection::vec(0usize..5, 0..4)).prop_flat_map(|(name, dtype, shape)| {
        let len = shape.iter().product::<usize>() * dtype.size();
        let bytes =
            if dtype == DType::Bool { prop::collection::vec(0u8..2, len).boxed() } else { prop::collection::vec(any::<u8>(), len).boxed() };
        bytes.prop_map(move |data| Case { name: name.clone(), dtype, shape: shape.clone(), data })
    })
}

fn unique(cases: Vec<Case>) -> Vec<Case> {
    let mut seen = std::collections::HashSet::new();
    cases.into_iter().filter(|c| seen.insert(c.name.clone())).collect()
}

/// The state file a save of `iterations` embeds.
fn state_of(iterations: u64) -> Vec<u8> {
    let mut state = modelio::policy::state::State::new("m");
    state.total_iterations = iterations;
    state.to_json()
}

fn refs(cases: &[Case]) -> Vec<TensorRef<'_>> {
    cases.iter().map(|c| TensorRef { name: &c.name, dtype: c.dtype, shape: &c.shape, data: &c.data, crc32c: None, crc32: None }).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn archive_round_trip_is_bitwise(model in prop::collection::vec(case(), 0..8), opt in prop::collection::vec(case(), 0..4), iterations in any::<u64>()) {
        let model = unique(model);
        let opt = unique(opt);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mio");
        let json = serde_json::json!({"step": 3});
        let opt_refs = refs(&opt);
        commit_archive(&path, "m", iterations, &refs(&model), Some(OptimizerRef { kind: "adamw", json: &json, tensors: &opt_refs }), Some(&state_of(iterations))).unwrap();
        let r = ArchiveReader::open(&path).unwrap();
        prop_assert_eq!(r.manifest.iterations, iterations);
        prop_assert!(r.verify().is_empty());
        for (cases, located) in [(&model, &r.model), (&opt, &r.optimizer.as_ref().unwrap().0)] {
            prop_assert_eq!(cases.len(), located.len());
            for c in cases.iter() {
                let l = located.iter().find(|l| l.meta.name == c.name).unwrap();
                prop_assert_eq!(l.meta.dtype, c.dtype);
                prop_assert_eq!(&l.meta.shape, &c.shape);
                prop_assert_eq!(r.checked_data(l).unwrap(), &c.data[..]);
                prop_assert_eq!(l.offset % c.dtype.size(), 0);
            }
        }
        prop_assert_eq!(&r.optimizer.as_ref().unwrap().1, &json);
        prop_assert_eq!(r.state.as_deref(), Some(&state_of(iterations)[..]));
    }

    #[test]
    fn libtorch_round_trip_is_bitwise(c in case()) {
        let t = modelio::tensors::to_tensor(c.dtype, &c.shape, &c.data).unwrap();
        let mut back = Vec::new();
        modelio::tensors::copy_bytes(&t, &mut back).unwrap();
        prop_assert_eq!(back, c.data);
        prop_assert_eq!(modelio::tensors::dtype_of("t", t.kind()).unwrap(), c.dtype);
    }
}

#[test]
fn varstore_round_trip_through_model_io() {
    let dir = tempfile::tempdir().unwrap();
    let (vs, _net) = common::seeded_store(1);
    let mut io = common::open(dir.path(), "m");
    io.record(1.0);
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();

    let (other, _n) = common::seeded_store(2);
    assert!(!common::stores_equal(&vs, &other));
    let mut io = common::open(dir.path(), "m");
    let loaded = io.load(&other).unwrap();
    assert_eq!(loaded.iterations, 1);
    assert!(common::stores_equal(&vs, &other));
}
