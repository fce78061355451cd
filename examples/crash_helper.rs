//! Test helper for the crash harness (`tests/crash.rs`): saves as fast as it
//! can (model + optimizer, backups, snapshots) until it is killed. Every
//! parameter holds the save's iteration number, so a reader can tell exactly
//! which save an archive holds. Prints `requested N` before each save and
//! `committed N` once it is durable.
//!
//! `MODELIO_CPU_COPY` picks `staging.cpu_copy` ("immediate" by default,
//! "protect"; not "deferred", since the parameters are filled without the fence).
//!
//! `crash_helper MODEL_DIR REMOTE_URL ENDPOINT` (`tests/remote_s3.rs`) also
//! uploads every save to an S3-compatible server (credentials from the
//! environment) and holds a 6 MiB buffer besides, so that each upload is a
//! multipart upload of 5 MiB parts.

use std::io::Write;

use modelio::config::{CpuCopy, OptimizerPolicy};
use modelio::{Adam, Config, ModelIo};
use tch::nn::VarStore;
use tch::Device;

fn main() -> modelio::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, remote) = match args.as_slice() {
        [dir] => (dir.clone(), None),
        [dir, url, endpoint] => (dir.clone(), Some((url.clone(), endpoint.clone()))),
        _ => {
            eprintln!("usage: crash_helper MODEL_DIR [REMOTE_URL ENDPOINT]");
            std::process::exit(2);
        }
    };
    let mut config = Config::default();
    config.model.dir = dir.into();
    config.model.name = "crash".into();
    config.save.optimizer = OptimizerPolicy::Always;
    config.snapshot.keep = 2;
    config.staging.cpu_copy = match std::env::var("MODELIO_CPU_COPY").as_deref() {
        Ok("protect") => CpuCopy::Protect,
        _ => CpuCopy::Immediate,
    };
    if let Some((url, endpoint)) = &remote {
        config.remote.url = url.clone();
        config.remote.endpoint = endpoint.clone();
        config.remote.allow_http = true;
        config.remote.part_size_mib = 5;
        config.remote.retry_max_secs = 1;
    }
    let mut io = ModelIo::open(config)?;
    let vs = VarStore::new(Device::Cpu);
    for i in 0..4 {
        let _ = vs.root().zeros(&format!("w{i}"), &[256, 256]);
    }
    if remote.is_some() {
        // Not trained (no optimizer state): the archive grows by 6 MiB only.
        let _ = vs.root().zeros_no_train("big", &[3 << 19]);
    }
    let mut opt = Adam::adamw(&vs, 1e-3, (0.9, 0.999), 1e-8, 0.01)?.with_fence(io.fence());
    if io.model_exists() {
        io.load(&vs)?;
    }
    let mut out = std::io::stdout();
    loop {
        let n = io.iterations() + 1;
        tch::no_grad(|| {
            for (_, mut t) in vs.variables() {
                let _ = t.f_fill_(n as f64);
            }
        });
        // A gradient so the optimizer has state, then put the parameters back.
        let loss = vs.variables().values().map(|t| t.sum(tch::Kind::Float)).fold(tch::Tensor::from(0f32), |a, b| a + b);
        opt.zero_grad();
        loss.backward();
        opt.step()?;
        tch::no_grad(|| {
            for (_, mut t) in vs.variables() {
                let _ = t.f_fill_(n as f64);
            }
        });
        io.record(1000.0 / n as f64);
        let _ = writeln!(out, "requested {n}");
        let _ = out.flush();
        io.save(&vs, Some(&opt))?.wait_blocking()?;
        let _ = writeln!(out, "committed {n}");
        let _ = out.flush();
        if n % 3 == 0 {
            io.snapshot()?;
        }
    }
}
