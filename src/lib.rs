//! modelio: the model IO of a libtorch (`tch`) training loop.
//!
//! A training loop holds a [`ModelIo`]. `save` copies the tensors into a
//! reused staging buffer and returns a [`Ticket`]; actors write the archive
//! and state file atomically, make `.bk` backups when the loss improved, and
//! build snapshots, all off the trainer's thread. A save holds the values at
//! the call, every file is checksummed, and a failure is reported once and
//! never costs a later save.
//!
//! # Quick start
//!
//! An async loop (the pattern the README and `examples/train.rs` follow):
//! resume, train, save in the background, and end with an exit save when
//! the loop ends or the first Ctrl-C arrives.
//!
//! ```no_run
//! use modelio::tch::nn::{self, Module};
//! use modelio::tch::{Device, Kind, Tensor};
//! use modelio::{Adam, Config, ModelIo, Schedule};
//!
//! #[tokio::main]
//! async fn main() -> modelio::Result<()> {
//!     let mut config = Config::default();
//!     config.model.dir = "models/quickstart".into();
//!     config.save.interval = 50;
//!     let vs = nn::VarStore::new(Device::Cpu);
//!     let net = nn::linear(vs.root() / "layer", 8, 1, Default::default());
//!     let mut opt = Adam::adam(&vs, 1e-3, (0.9, 0.999), 1e-8, 0.0)?;
//!
//!     let mut io = ModelIo::open_async(config.clone()).await?;
//!     io.resume_async(&vs, Some(&mut opt)).await?;
//!     let stop = modelio::signals::cancel_on_signals()?;
//!     let schedule = Schedule::from_config(&config);
//!     while !stop.is_cancelled() && io.iterations() < 1000 {
//!         let x = Tensor::randn([32, 8], (Kind::Float, Device::Cpu));
//!         let loss = net.forward(&x).square().mean(Kind::Float);
//!         opt.zero_grad();
//!         loss.backward();
//!         opt.step()?;
//!         io.record(loss.double_value(&[]));
//!         if schedule.save_at(io.iterations()) {
//!             match io.save_async(&vs, Some(&opt)).await {
//!                 Ok(_ticket) => {} // committed in the background
//!                 // A full disk or a vanished folder: train on, the next save retries.
//!                 Err(e) if e.is_retryable() => eprintln!("warning: {}", e.report()),
//!                 Err(e) => return Err(e),
//!             }
//!         }
//!     }
//!     let finished = io.finish(&vs, Some(&opt)).await?; // exit save, then drain
//!     for e in &finished.unreported {
//!         eprintln!("warning: {}", e.report()); // a backup or snapshot that failed near the end
//!     }
//!     Ok(())
//! }
//! ```
//!
//! Where things are:
//! - [`handle`]: [`ModelIo`], the trainer's handle (save, load, snapshot, shutdown).
//! - `actors` (internal): stager -> saver -> backup / snapshot, thin actix actors.
//! - [`staging`]: the bounded pool of host buffers (internal) and, in `fence.rs`, the [`Fence`]
//!   of deferred copies;
//!   `cuda` (internal): the non-blocking device-to-host copy and per-save event
//!   (a small C++ shim).
//! - [`archive`] and [`format`](mod@format): archive format v2 (zip + safetensors), reader and writer;
//!   [`zipread`]: the strict zip layer of the reader.
//! - [`durable`]: the one atomic-commit helper every write goes through.
//! - [`state`]: the state file and the backup rule; [`folder`]: names in a model folder.
//! - [`snapshot`], [`retention`], [`restore`], [`schedule`]: snapshots, which to keep,
//!   restoring backups, and when to save.
//! - [`optim`]: SGD, Adam and AdamW whose state can be saved, behind [`Optimizer`].
//! - [`lock`]: one training process per model folder.
//! - [`signals`]: the first Ctrl-C or SIGTERM as a cancellation token, for the exit save.
//! - [`tensors`]: tensors to and from the archive's bytes, dtypes and shapes.
//! - [`remote`]: the remote tier (object storage): uploads after commits, pulls,
//!   verification and retention there; `remote/objects.rs` (internal) is the one
//!   object-store layer, which sharded checkpoints use too.
//! - [`sharded`]: checkpoints saved by several ranks, each its shard, committed by
//!   rank 0 as one step, loaded on any number of ranks.
//! - `background` (internal): the lock helper and failure inbox every worker shares.
//! - [`config`]: the TOML configuration; [`error`]: the one error type.

#[cfg(feature = "torch")]
pub(crate) mod actors;
pub mod archive;
#[cfg(any(feature = "torch", feature = "remote"))]
mod background;
pub mod config;
#[cfg(feature = "torch")]
pub(crate) mod cuda;
mod disk;
pub mod durable;
pub mod error;
#[cfg(feature = "torch")]
mod fence;
pub mod folder;
pub mod format;
#[cfg(feature = "torch")]
pub mod handle;
pub mod lock;
#[cfg(feature = "torch")]
pub mod optim;
#[cfg(feature = "remote")]
pub mod remote;
pub mod restore;
pub mod retention;
pub mod schedule;
#[cfg(feature = "remote")]
pub mod sharded;
#[cfg(feature = "torch")]
pub mod signals;
pub mod snapshot;
#[cfg(feature = "torch")]
pub mod staging;
pub mod state;
#[cfg(feature = "torch")]
pub mod tensors;
pub mod zipread;

pub use config::Config;
pub use error::{Error, Report, Result};
#[cfg(feature = "torch")]
pub use handle::{Committed, Finished, Loaded, ModelIo, OptimizerResume, Resumed, SaveStats, Ticket};
#[cfg(feature = "torch")]
pub use optim::{Adam, Optimizer, OptimizerState, Sgd};
pub use schedule::Schedule;
#[cfg(feature = "torch")]
pub use staging::Fence;
/// The `tch` modelio is built with: a crate using modelio names `modelio::tch`
/// instead of depending on `tch` itself, so the two can never differ.
#[cfg(feature = "torch")]
pub use tch;
