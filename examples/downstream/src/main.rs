//! A crate of its own that trains with modelio, set up exactly as the README's
//! "Using modelio from your own crate" says. Not part of modelio's package:
//! `tests/downstream.rs` copies it next to a modelio checkout (the
//! `../modelio` of its Cargo.toml), builds it and runs it twice.
//!
//! `downstream MODEL_DIR`: trains a small regression 40 iterations, saving
//! every 10; run again, it resumes where the last run ended.

use modelio::tch::nn::{self, Module};
use modelio::tch::{Device, Kind, Reduction, Tensor};
use modelio::{Adam, Config, ModelIo, Schedule};

#[tokio::main]
async fn main() -> modelio::Result<()> {
    // modelio logs its saves through `tracing`; without a subscriber they are not shown.
    tracing_subscriber::fmt().init();
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: downstream MODEL_DIR");
        std::process::exit(2);
    };
    let mut config = Config::default();
    config.model.dir = dir.into();
    config.save.interval = 10;
    let schedule = Schedule::from_config(&config);
    let mut io = ModelIo::open_async(config).await?;

    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let net = nn::seq()
        .add(nn::linear(&root / "hidden", 8, 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "out", 16, 1, Default::default()));
    let mut opt = Adam::adamw(&vs, 1e-2, (0.9, 0.999), 1e-8, 0.01)?;
    let resumed = io.resume_async(&vs, Some(&mut opt)).await?;
    match &resumed.loaded {
        Some(loaded) => println!("resumed from {} at iteration {}", loaded.path.display(), io.iterations()),
        None => println!("new model at iteration {}", io.iterations()),
    }

    let mut losses = Vec::new();
    for _ in 0..40 {
        // Synthetic data: the target is a fixed function of the input.
        let x = Tensor::randn([64, 8], (Kind::Float, Device::Cpu));
        let y = x.narrow(1, 0, 1) * 2.0 - x.narrow(1, 1, 1) + 0.5;
        let loss = net.forward(&x).mse_loss(&y, Reduction::Mean);
        opt.zero_grad();
        loss.backward();
        opt.step()?;
        losses.push(loss.double_value(&[]));
        io.record(losses[losses.len() - 1]);
        if schedule.save_at(io.iterations()) {
            match io.save_async(&vs, Some(&opt)).await {
                Ok(_ticket) => {} // committed in the background
                // A full disk, a vanished folder: train on, the next save tries again.
                Err(e) if e.is_retryable() => eprintln!("warning: {}", e.report()),
                Err(e) => return Err(e),
            }
        }
    }
    let iterations = io.iterations();
    let finished = io.finish(&vs, Some(&opt)).await?; // exit save (optimizer included), then drain
    for e in &finished.unreported {
        eprintln!("warning: {}", e.report()); // a backup or snapshot that failed near the end
    }
    println!("trained to iteration {iterations}, loss {:.4} -> {:.4}", losses[0], losses[losses.len() - 1]);
    Ok(())
}
