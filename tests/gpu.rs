//! GPU staging: `save` only queues device-to-host copies into pinned buffers,
//! and the archive holds the tensors as they were at the call even though
//! training modifies them right after. Skipped (with a message) without CUDA.
//! The shim's own tests are unit tests in `src/staging/cuda.rs` (the module is internal).

mod common;

use std::time::Instant;

use modelio::archive::ArchiveReader;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[test]
fn gpu_save_is_a_queue_and_captures_the_moment_of_the_call() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA device");
        return;
    }
    let device = Device::Cuda(0);
    let tmp = tempfile::tempdir().unwrap();
    let mut io = common::open(&tmp.path().join("model"), "gpu");
    let vs = VarStore::new(device);
    // 512 MiB of f32 in 8 tensors.
    for i in 0..8 {
        let _ = vs.root().var(&format!("w{i}"), &[4096, 4096], tch::nn::Init::Uniform { lo: -1.0, up: 1.0 });
    }
    let gib = 8.0 * 4096.0 * 4096.0 * 4.0 / (1u64 << 30) as f64;
    // The first save allocates the pinned buffers; later ones reuse them.
    io.save(&vs, None).unwrap().wait_blocking().unwrap();

    let expected: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.to_device(Device::Cpu))).collect();
    tch::Cuda::synchronize(0);
    let start = Instant::now();
    let ticket = io.save(&vs, None).unwrap();
    let stall = start.elapsed();
    // Training goes on: modify every parameter in place right away.
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            let _ = t.f_add_scalar_(1.0).unwrap();
        }
    });
    ticket.wait_blocking().unwrap();
    io.shutdown_blocking().unwrap();
    let ms_per_gib = stall.as_secs_f64() * 1e3 / gib;
    // A figure, not a check: `make bench DEVICE=cuda` reports it against its target.
    println!("gpu save stall: {:.3} ms for {gib:.2} GiB ({ms_per_gib:.3} ms/GiB)", stall.as_secs_f64() * 1e3);

    let r = ArchiveReader::open(&tmp.path().join("model/gpu.mio")).unwrap();
    for (name, want) in expected {
        let t = r.model.iter().find(|t| t.meta.name == name).unwrap();
        let got = modelio::tensors::read_tensor(&r, t).unwrap();
        assert!(common::bitwise_eq(&got, &want.to_kind(Kind::Float)), "{name} is not the value at the call");
    }
}

#[cfg(feature = "remote")]
#[test]
fn a_ranks_gpu_save_is_a_queue_and_captures_the_moment_of_the_call() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA device");
        return;
    }
    use modelio::sharded::{Plan, ShardedIo};
    let device = Device::Cuda(0);
    let tmp = tempfile::tempdir().unwrap();
    let mut c = common::config(&tmp.path().join("model"), "gpu");
    c.shard.rank = Some(0);
    c.shard.world_size = Some(1);
    let io = ShardedIo::open(&c).unwrap();
    let vs = VarStore::new(device);
    // 512 MiB of f32 in 8 tensors: this rank's rows of each.
    for i in 0..8 {
        let _ = vs.root().var(&format!("w{i}"), &[4096, 4096], tch::nn::Init::Uniform { lo: -1.0, up: 1.0 });
    }
    let plan = (0..8).fold(Plan::new(), |p, i| p.rows(&format!("w{i}"), 4096, 8192));
    let gib = 8.0 * 4096.0 * 4096.0 * 4.0 / (1u64 << 30) as f64;
    // The first save allocates the pinned buffers; later ones reuse them.
    io.save_vars(1, &vs, None, &plan).unwrap().wait_blocking().unwrap();
    let expected: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.to_device(Device::Cpu))).collect();
    tch::Cuda::synchronize(0);
    let start = Instant::now();
    let ticket = io.save_vars(2, &vs, None, &plan).unwrap();
    let stall = start.elapsed();
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            let _ = t.f_add_scalar_(1.0).unwrap();
        }
    });
    let saved = ticket.wait_blocking().unwrap();
    assert!(saved.committed);
    assert_eq!(io.buffer_growths(), 8, "the second save reused the pinned buffers");
    println!("rank gpu save stall: {:.3} ms for {gib:.2} GiB ({:.3} ms/GiB)", stall.as_secs_f64() * 1e3, stall.as_secs_f64() * 1e3 / gib);
    // A CPU rank resumes the values at the call, bitwise.
    let cpu = VarStore::new(Device::Cpu);
    for i in 0..8 {
        let _ = cpu.root().zeros(&format!("w{i}"), &[4096, 4096]);
    }
    assert_eq!(io.resume(&cpu, None, &plan).unwrap().unwrap().iterations, 2);
    let got = cpu.variables();
    for (name, want) in expected {
        assert!(common::bitwise_eq(&got[&name], &want), "{name} is not the value at the call");
    }
}
