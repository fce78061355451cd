//! Safe by default: a save holds the values at the call whatever the caller
//! does next, backups and snapshots survive damage to the live archive, a
//! fallback load continues from what it loaded, and the ticket API is honest.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use modelio::archive::ArchiveReader;
use modelio::config::{CpuCopy, OptimizerPolicy};
use modelio::policy::state::State;
use modelio::{Adam, Error, ModelIo, Optimizer, OptimizerResume};
use tch::nn::{self, ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

/// A linear layer and a BatchNorm whose running statistics are buffers no
/// optimizer fence covers.
fn bn_store() -> (VarStore, nn::Linear, nn::BatchNorm) {
    let vs = VarStore::new(Device::Cpu);
    let lin = nn::linear(vs.root() / "lin", 256, 256, Default::default());
    let bn = nn::batch_norm1d(vs.root() / "bn", 256, Default::default());
    (vs, lin, bn)
}

fn stored(r: &ArchiveReader, name: &str) -> Vec<u8> {
    let t = r.model.iter().find(|t| t.meta.name == name).unwrap();
    r.checked_data(t).unwrap().to_vec()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    let mut v = Vec::new();
    modelio::tensors::copy_bytes(t, &mut v).unwrap();
    v
}

/// 200 saves, each followed at once by writes no fence covers: a parameter
/// edited in place and BatchNorm's running mean updated by a training-mode
/// forward. Every archive must hold the values of its call.
fn torn_saves(cpu_copy: CpuCopy, reps: usize) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = common::config(tmp.path(), "m");
    c.staging.cpu_copy = cpu_copy;
    c.staging.max_inflight = 2;
    let mut io = ModelIo::open(c).unwrap();
    let (vs, lin, bn) = bn_store();
    let x = Tensor::ones([4, 256], (Kind::Float, Device::Cpu));
    let mut torn = 0;
    for i in 0..reps {
        tch::no_grad(|| {
            let _ = lin.ws.shallow_clone().fill_(i as f64);
        });
        let _ = bn.forward_t(&x, true);
        let (want_w, want_mean) = (bytes(&lin.ws), bytes(&bn.running_mean));
        io.record(1.0);
        let ticket = io.save(&vs, None).unwrap();
        // Right after the call, with no fence: the next step's writes.
        tch::no_grad(|| {
            let _ = lin.ws.shallow_clone().fill_(-1.0);
        });
        let _ = bn.forward_t(&(&x * 3.0), true);
        ticket.wait_blocking().unwrap();
        let r = ArchiveReader::open(&tmp.path().join("m.mio")).unwrap();
        if stored(&r, "lin.weight") != want_w || stored(&r, "bn.running_mean") != want_mean {
            torn += 1;
        }
    }
    io.shutdown_blocking().unwrap();
    torn
}

#[test]
fn every_save_holds_the_values_at_the_call_without_any_fence() {
    assert_eq!(torn_saves(CpuCopy::Immediate, 200), 0, "torn checkpoints in the default mode");
}

/// The same with `staging.cpu_copy = "protect"`: the copy runs after the
/// call and the writes right after it wait for their pages to be copied.
#[test]
fn protected_saves_hold_the_values_at_the_call_without_any_fence() {
    let before = modelio::staging::protected_saves();
    assert_eq!(torn_saves(CpuCopy::Protect, 200), 0, "torn checkpoints with cpu_copy = \"protect\"");
    match modelio::staging::protect_available() {
        // Every save protected its tensors, no save fell back to copying at the call.
        Ok(()) => assert_eq!(modelio::staging::protected_saves() - before, 200, "saves that were not protected"),
        Err(why) => eprintln!("userfaultfd is not available, the saves copied at the call: {why}"),
    }
}

#[test]
fn backups_and_snapshots_survive_damage_to_the_live_archive() {
    for hard_links in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        let mut c = common::config(&dir, "m");
        c.save.hard_links = hard_links;
        let mut io = ModelIo::open(c).unwrap();
        let (vs, _n) = common::seeded_store(0);
        io.record(2.0);
        io.save(&vs, None).unwrap().wait_blocking().unwrap();
        io.record(1.0);
        let c = io.save(&vs, None).unwrap().wait_blocking().unwrap();
        // The ticket answers once the backup exists.
        assert!(c.backed_up && dir.join("m.mio.bk").exists() && dir.join("m_state.json.bk").exists());
        io.snapshot().unwrap();
        io.shutdown_blocking().unwrap();
        let live = dir.join("m.mio");
        let snap = modelio::folder::snapshot::snapshot_dir(&dir, 2).join("m.mio");
        let r = ArchiveReader::open(&live).unwrap();
        let off = r.model[0].offset;
        drop(r);
        common::flip_byte(&live, off); // damage in place, as a failing disk would
        assert!(!ArchiveReader::open(&live).unwrap().verify().is_empty());
        let bk_ok = ArchiveReader::open(&dir.join("m.mio.bk")).unwrap().verify().is_empty();
        let snap_ok = ArchiveReader::open(&snap).unwrap().verify().is_empty();
        let shares = std::fs::metadata(&live).unwrap().ino() == std::fs::metadata(dir.join("m.mio.bk")).unwrap().ino();
        if hard_links {
            assert!(shares && !bk_ok && !snap_ok, "hard links share the live archive's blocks (the documented trade-off)");
        } else {
            assert!(!shares && bk_ok && snap_ok, "independent copies survive damage to the live archive");
        }
    }
}

#[test]
fn fallback_continues_from_what_it_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let config = |fallback: bool| {
        let mut c = common::config(&dir, "m");
        c.load.fallback = fallback;
        c.save.optimizer = OptimizerPolicy::Exit;
        c
    };
    let (vs, _n) = common::seeded_store(1);
    let opt = Adam::adamw(&vs, 1e-3, (0.9, 0.999), 1e-8, 0.01).unwrap();
    let mut io = ModelIo::open(config(false)).unwrap();
    for _ in 0..16 {
        io.record(1.0);
    }
    io.save(&vs, Some(&opt)).unwrap().wait_blocking().unwrap();
    io.snapshot().unwrap(); // snapshot 16
    for _ in 0..7 {
        io.record(2.0);
    }
    // A periodic save at 23, then the process dies (no exit save).
    io.save(&vs, Some(&opt)).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    let live = dir.join("m.mio");
    let off = ArchiveReader::open(&live).unwrap().model[0].offset;
    common::flip_byte(&live, off);

    let mut io = ModelIo::open(config(true)).unwrap();
    let sessions_before = io.state().sessions.len();
    let (target, _t) = common::seeded_store(9);
    let mut opt = Adam::adamw(&target, 1e-3, (0.9, 0.999), 1e-8, 0.01).unwrap();
    let resumed = io.resume(&target, Some(&mut opt as &mut dyn Optimizer)).unwrap();
    let loaded = resumed.loaded.expect("a model was loaded");
    assert!(loaded.fallback && loaded.reason.as_deref().is_some_and(|r| r.contains("damaged")), "{loaded:?}");
    assert_eq!(loaded.path, modelio::folder::snapshot::snapshot_dir(&dir, 16).join("m.mio"));
    assert_eq!(loaded.iterations, 16);
    assert_eq!(io.iterations(), 16, "the handle continues from the loaded save, not the damaged one");
    assert_eq!(io.state().sessions.len(), sessions_before, "the loaded save's sessions plus this run's");
    match &resumed.optimizer {
        OptimizerResume::Missing(why) => assert!(why.contains("exit"), "{why}"),
        other => panic!("the periodic save holds no optimizer state: {other:?}"),
    }
    io.record(1.0);
    let c = io.save(&target, None).unwrap().wait_blocking().unwrap();
    assert_eq!(c.iterations, 17);
    io.shutdown_blocking().unwrap();
    let state = State::read(&dir.join("m_state.json")).unwrap();
    assert_eq!(state.total_iterations, 17);
    assert_eq!(state.sessions.iter().map(|s| s.iterations).sum::<u64>(), 17);
}

#[test]
fn missing_archive_with_history_is_not_a_new_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let (vs, _n) = common::seeded_store(1);
    let mut io = common::open(&dir, "m");
    for loss in [3.0, 2.0] {
        io.record(loss);
        io.save(&vs, None).unwrap().wait_blocking().unwrap();
    }
    io.record(5.0);
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    std::fs::remove_file(dir.join("m.mio")).unwrap();

    let err = ModelIo::open(common::config(&dir, "m")).err().expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, Error::ArchiveMissing { .. }), "{err:?}");
    assert!(msg.contains("m_state.json (3 iterations)") && msg.contains("m.mio.bk") && msg.contains("modelio restore"), "{msg}");

    let mut c = common::config(&dir, "m");
    c.load.fallback = true;
    let mut io = ModelIo::open(c).unwrap();
    assert!(io.model_exists(), "the README's `if model_exists() {{ load }}` reaches the fallback");
    io.record(1.0);
    let err = io.save(&vs, None).expect_err("saving over unloaded history is refused");
    assert!(matches!(err, Error::ArchiveMissing { .. }), "{err:?}");
    let (target, _t) = common::seeded_store(7);
    let loaded = io.load(&target).unwrap();
    assert_eq!((loaded.fallback, loaded.iterations, io.iterations()), (true, 2, 2));
    io.record(1.0);
    assert_eq!(io.save(&target, None).unwrap().wait_blocking().unwrap().iterations, 3);
    io.shutdown_blocking().unwrap();
}

#[test]
fn empty_sessions_are_not_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (vs, _n) = common::seeded_store(1);
    let mut io = common::open(tmp.path(), "m");
    io.record(1.0);
    io.save(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    // A run that trains nothing but saves on exit.
    let mut io = common::open(tmp.path(), "m");
    io.save_exit(&vs, None).unwrap().wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    let state = State::read(&tmp.path().join("m_state.json")).unwrap();
    assert_eq!(state.sessions.len(), 1, "{:?}", state.sessions);
}

#[test]
fn tickets_are_futures_and_never_panic_inside_a_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    let (vs, _n) = common::seeded_store(1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut io = common::open(tmp.path(), "m");
        io.set_write_delay(Duration::from_millis(100));
        io.record(1.0);
        let mut ticket = io.save(&vs, None).unwrap();
        assert!(ticket.try_result().is_none(), "still in flight");
        let c = ticket.await.unwrap();
        assert_eq!(c.iterations, 1);
        io.record(1.0);
        // The blocking form inside a runtime: no panic.
        let c = io.save(&vs, None).unwrap().wait_blocking().unwrap();
        assert_eq!(c.iterations, 2);
        io.shutdown().await.unwrap();
    });
}

/// A 1 GiB state as a trainer holds it: a third model, the rest AdamW's
/// two moments.
fn gib_state() -> (VarStore, Adam) {
    let vs = VarStore::new(Device::Cpu);
    let model_bytes = (1i64 << 30) / 3;
    let (mut total, mut i) = (0, 0);
    while total < model_bytes {
        let shape: &[i64] = [&[4096, 4096][..], &[4096], &[1024, 4096], &[1024]][i % 4];
        let _ = vs.root().var(&format!("p{i}"), shape, nn::Init::Const(0.5));
        total += 4 * shape.iter().product::<i64>();
        i += 1;
    }
    let mut opt = Adam::adamw(&vs, 1e-4, (0.9, 0.999), 1e-8, 0.01).unwrap();
    let loss = vs.trainable_variables().iter().map(|t| t.square().sum(Kind::Float)).fold(Tensor::from(0f32), |a, b| a + b);
    opt.zero_grad();
    loss.backward();
    opt.step().unwrap();
    (vs, opt)
}

/// The trainer's stall of saving a 1 GiB state, "protect" against
/// "immediate", and what the optimizer step right after a save costs. A
/// timing: run in release,
/// `cargo test --release --test safety save_stall_per_gib -- --ignored --nocapture`
/// (with `THP_MEM_ALLOC_ENABLE=1` for libtorch's huge pages).
#[test]
#[ignore = "a timing; run in release"]
fn save_stall_per_gib() {
    let (vs, mut opt) = gib_state();
    let bytes = vs.variables().values().map(|t| t.numel() * 4).sum::<usize>()
        + opt.state_tensors().iter().map(|(_, t)| t.numel() * 4).sum::<usize>();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let step = |opt: &mut Adam| {
        let start = std::time::Instant::now();
        let loss = vs.trainable_variables().iter().map(|t| t.sum(Kind::Float)).fold(Tensor::from(0f32), |a, b| a + b);
        opt.zero_grad();
        loss.backward();
        opt.step().unwrap();
        start.elapsed().as_secs_f64() * 1e3
    };
    let mut stalls = Vec::new();
    for mode in [CpuCopy::Immediate, CpuCopy::Protect] {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = common::config(tmp.path(), "m");
        c.staging.cpu_copy = mode;
        c.save.optimizer = OptimizerPolicy::Always;
        let mut io = ModelIo::open(c).unwrap();
        let (mut stall, mut after, mut plain) = (vec![], vec![], vec![]);
        for _ in 0..6 {
            plain.push(step(&mut opt));
            io.record(1.0);
            let start = std::time::Instant::now();
            let ticket = io.save(&vs, Some(&opt)).unwrap();
            stall.push(start.elapsed().as_secs_f64() * 1e3);
            after.push(step(&mut opt));
            ticket.wait_blocking().unwrap();
        }
        io.shutdown_blocking().unwrap();
        let (stall, after, plain) = (median(stall[1..].to_vec()), median(after[1..].to_vec()), median(plain[1..].to_vec()));
        println!("{mode:?}: {gib:.2} GiB, save stall {stall:.2} ms ({:.2} ms/GiB); step right after the save {after:.1} ms, without a save {plain:.1} ms", stall / gib);
        stalls.push(stall / gib);
    }
    // Write-protecting costs the kernel a page-table update per page: about
    // half an immediate copy with 4 KiB pages, a few ms/GiB when libtorch
    // allocates on huge pages (`THP_MEM_ALLOC_ENABLE=1`).
    if modelio::staging::protect_available().is_ok() && !cfg!(debug_assertions) {
        assert!(stalls[1] < stalls[0], "protect stalls {:.2} ms/GiB, immediate {:.2}", stalls[1], stalls[0]);
    }
}
