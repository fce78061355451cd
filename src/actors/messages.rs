//! Every message the actors exchange. Callers never build these: they use
//! [`crate::ModelIo`], which owns the addresses.

use std::path::PathBuf;
use std::time::Duration;

use actix::Message;
use tokio::sync::oneshot;

use crate::error::Error;
use crate::handle::Committed;
use crate::format::DType;
use crate::snapshot::Pinned;
use crate::staging::{FenceGuard, Lease};

/// Answers a save's ticket: the commit, or the failure as
/// [`Error::Background`] (sent to the handle's next call instead when the
/// ticket is gone).
pub(crate) type Reply = oneshot::Sender<Result<Committed, Error>>;

/// A tensor's description; its bytes are in the lease at the same index.
#[derive(Debug, Clone)]
pub(crate) struct Desc {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Everything a save needs besides the tensor bytes.
pub(crate) struct SaveJob {
    pub iterations: u64,
    pub state_json: Vec<u8>,
    pub average_loss: f64,
    pub backup: bool,
    pub model: Vec<Desc>,
    /// Kind, JSON and tensor descriptions (bytes follow the model's in the lease).
    pub optimizer: Option<(String, serde_json::Value, Vec<Desc>)>,
    pub stall: Duration,
    /// Whether the save had to wait for a free staging buffer.
    pub waited: bool,
    pub reply: Reply,
}

/// Copy tensors into the lease, then hand the save to the saver.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Stage {
    pub job: SaveJob,
    /// CPU tensors to copy, with their buffer index in the lease.
    pub tensors: Vec<(usize, tch::Tensor)>,
    pub lease: Lease,
    /// Held while CPU tensors are being copied; released as soon as the bytes
    /// are in the lease, so parameters may change again.
    pub guard: Option<FenceGuard>,
    /// One event per GPU, recorded after this save's device-to-host copies:
    /// the stager waits on them before touching the pinned buffers.
    pub events: Vec<crate::cuda::Event>,
}

/// Write the staged bytes as archive + state file.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Write {
    pub job: SaveJob,
    pub lease: Lease,
    /// (CRC-32C, zip CRC-32) of each buffer, computed by the stager on the staged copy.
    pub crcs: Vec<(u32, u32)>,
    pub copy: Duration,
}

/// Snapshot the save of iteration `of` (ordered after it), or with `None`
/// the last committed save.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Snapshot {
    pub of: Option<u64>,
}

/// Build a snapshot from files pinned at save `iterations`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct BuildSnapshot {
    pub iterations: u64,
    pub pinned: Vec<Pinned>,
}

/// Make `.bk` files from links pinned at a save: (pin, target); then answer
/// the save's ticket, so a committed ticket with `backed_up` means the
/// `.bk` files exist.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Backup {
    pub pinned: Vec<(PathBuf, PathBuf)>,
    pub committed: Committed,
    pub reply: Reply,
}

/// Answered once everything sent before it is done, downstream included.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Flush;
