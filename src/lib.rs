//! modelio: the model IO of a libtorch (`tch`) training loop.
//!
//! A training loop holds a [`ModelIo`]. `save` takes a staging buffer, queues
//! the copy of the tensors and returns a [`Ticket`]; actors copy, write the
//! archive and state file atomically, make `.bk` backups when the loss
//! improved, and build snapshots, all off the trainer's thread.
//!
//! Where things are:
//! - [`handle`]: [`ModelIo`], the trainer's handle (save, load, snapshot, shutdown).
//! - [`actors`]: stager -> saver -> backup / snapshot, thin actix actors.
//! - [`staging`]: the bounded pool of host buffers and the [`Fence`]; [`cuda`]: the
//!   non-blocking device-to-host copy and per-save event (a small C++ shim).
//! - [`archive`] and [`format`]: archive format v2 (zip + safetensors), reader and writer;
//!   [`zipread`]: the strict zip layer of the reader.
//! - [`durable`]: the one atomic-commit helper every write goes through.
//! - [`state`]: the state file and the backup rule; [`folder`]: names in a model folder.
//! - [`snapshot`], [`retention`], [`restore`], [`schedule`]: snapshots, which to keep,
//!   restoring backups, and when to save.
//! - [`optim`]: SGD, Adam and AdamW whose state can be saved, behind [`Optimizer`].
//! - [`lock`]: one training process per model folder.
//! - [`bench`]: `modelio bench`, figures side by side with their references.
//! - [`config`]: the TOML configuration; [`error`]: the one error type.

#[cfg(feature = "torch")]
pub mod actors;
pub mod archive;
#[cfg(feature = "torch")]
pub mod bench;
pub mod config;
#[cfg(feature = "torch")]
pub mod cuda;
pub mod durable;
pub mod error;
pub mod folder;
pub mod format;
#[cfg(feature = "torch")]
pub mod handle;
pub mod lock;
#[cfg(feature = "torch")]
pub mod optim;
pub mod restore;
pub mod retention;
pub mod schedule;
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
pub use handle::{Committed, Loaded, ModelIo, OptimizerResume, Resumed, SaveStats, Ticket};
#[cfg(feature = "torch")]
pub use optim::{Adam, Optimizer, OptimizerState, Sgd};
pub use schedule::Schedule;
#[cfg(feature = "torch")]
pub use staging::Fence;
/// The `tch` modelio is built with: a crate using modelio names `modelio::tch`
/// instead of depending on `tch` itself, so the two can never differ.
#[cfg(feature = "torch")]
pub use tch;
