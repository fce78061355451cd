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
//! Where things are (each folder of `src/` holds one part):
//! - [`handle`]: [`ModelIo`], the trainer's handle (save, load, snapshot,
//!   shutdown), its [`Ticket`]s and outcomes, and the recovery of a folder at open.
//! - `actors/` (internal): the workers, thin actix actors: stager -> saver ->
//!   backup / snapshot, one file each.
//! - [`staging`]: the bounded pool of host buffers, a save's copies into them
//!   (`copy`, internal: started at the call, landed by a worker, for single
//!   saves and ranks alike), the [`Fence`] of deferred copies, `protect`
//!   (internal): copies under write protection over `uffd`, Linux's
//!   userfaultfd, with one handler thread, and `cuda`
//!   (internal): the non-blocking device-to-host copy and per-save event (a
//!   small C++ shim). [`tensors`]: tensors to and from the
//!   archive's bytes.
//! - [`archive`]: archive format v2 (zip + safetensors): `writer` and `reader`
//!   (internal, their items re-exported by [`archive`]), `safetensors`
//!   (internal): the tensor entries' header, built and checked;
//!   [`archive::format`]: the manifest and names; [`archive::zipread`]: the
//!   strict zip layer of the reader.
//! - [`folder`]: the model folder on disk: its names, [`folder::durable`] (the
//!   one atomic-commit helper every write goes through), [`folder::lock`] (one
//!   training process per folder), [`folder::snapshot`] and [`folder::restore`]
//!   (putting backups back).
//! - [`policy`]: when to save ([`Schedule`]), when a save becomes the backup
//!   ([`policy::state`], beside the state file), which snapshots to keep
//!   ([`policy::retention`]).
//! - [`remote`]: the remote tier (object storage): uploads after commits, pulls,
//!   verification and retention there; `remote/objects.rs` is the one
//!   object-store layer, which sharded checkpoints use too.
//! - [`sharded`]: checkpoints saved by several ranks, each its shard (tensors, or
//!   a `VarStore` and optimizer under a plan, through the staging pipeline),
//!   committed by rank 0 as one step, loaded on any number of ranks.
//! - [`optim`]: SGD, Adam and AdamW whose state can be saved, behind [`Optimizer`].
//! - [`signals`]: the first Ctrl-C or SIGTERM as a cancellation token, for the exit save.
//! - `background` (internal): what every worker shares: the lock helper, the
//!   latest-wins slot, the failure inbox.
//! - [`config`]: the TOML configuration; [`error`]: the one error type;
//!   `crc` (internal): the CRC-32C and zip CRC-32 of everything written.

#[cfg(feature = "torch")]
pub(crate) mod actors;
pub mod archive;
#[cfg(any(feature = "torch", feature = "remote"))]
mod background;
pub mod config;
mod crc;
pub mod error;
pub mod folder;
#[cfg(feature = "torch")]
pub mod handle;
#[cfg(feature = "torch")]
pub mod optim;
pub mod policy;
#[cfg(feature = "remote")]
pub mod remote;
#[cfg(feature = "remote")]
pub mod sharded;
#[cfg(feature = "torch")]
pub mod signals;
#[cfg(feature = "torch")]
pub mod staging;
#[cfg(feature = "torch")]
pub mod tensors;

/// The cores this process may use, asked once (the answer reads the
/// process's cgroup files, too slow for a trainer's every save).
pub(crate) fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

pub use config::Config;
pub use error::{Error, ErrorKind, Report, Result, Work};
#[cfg(feature = "torch")]
pub use handle::{Committed, Finished, Loaded, ModelIo, OptimizerResume, Resumed, SaveStats, Ticket};
#[cfg(feature = "torch")]
pub use optim::{Adam, Optimizer, OptimizerState, Sgd};
pub use policy::schedule::Schedule;
#[cfg(feature = "torch")]
pub use staging::Fence;
/// The `tch` modelio is built with: a crate using modelio names `modelio::tch`
/// instead of depending on `tch` itself, so the two can never differ.
#[cfg(feature = "torch")]
pub use tch;
