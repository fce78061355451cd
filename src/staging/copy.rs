//! A save's copies into its staging buffers, in two halves: [`start`] on
//! the trainer's thread when `save` is called, [`Copies::land`] on a worker
//! before the bytes are written. Every save goes through these, a single
//! process's and a rank's alike.

use std::time::{Duration, Instant};

use super::{cuda, Fence, FenceGuard, Lease};
use crate::config::CpuCopy;
use crate::error::Result;

/// A save's copies once started: the lease they go to, the CPU tensors left
/// to copy (`"deferred"` mode; empty otherwise) under a fence guard, and one
/// event per GPU marking the end of its queued copies.
pub(crate) struct Copies {
    pub lease: Lease,
    /// CPU tensors to copy, with their buffer index in the lease.
    pub deferred: Vec<(usize, tch::Tensor)>,
    /// Held while deferred CPU tensors are being copied; released as soon
    /// as their bytes are in the lease, so parameters may change again.
    pub guard: Option<FenceGuard>,
    /// One event per GPU, recorded after this save's device-to-host copies:
    /// the worker waits on them before touching the pinned buffers.
    pub events: Vec<cuda::Event>,
}

/// A landed save: its lease holding the bytes, the (CRC-32C, zip CRC-32) of
/// each buffer, and how long landing took.
pub(crate) type Landed = (Lease, Vec<(u32, u32)>, Duration);

/// Start the copies of a save's `tensors` into `lease` (tensor `i` into
/// buffer `i`): GPU tensors as non-blocking copies queued in stream order
/// (with one event per GPU), CPU tensors copied now (`"immediate"`) or left
/// for [`Copies::land`] (`"deferred"`, with `fence` armed until they land).
///
/// # Errors
/// [`crate::Error::Torch`] when a pinned buffer cannot be allocated, a copy
/// cannot be queued or a tensor cannot be made contiguous.
pub(crate) fn start(tensors: Vec<tch::Tensor>, mut lease: Lease, cpu_copy: CpuCopy, fence: &Fence) -> Result<Copies> {
    let mut cpu = Vec::with_capacity(tensors.len());
    let mut gpus: Vec<usize> = Vec::new();
    for (i, t) in tensors.into_iter().enumerate() {
        match t.device() {
            tch::Device::Cuda(d) => {
                enqueue_device_copy(&t, &mut lease, i)?;
                if !gpus.contains(&d) {
                    gpus.push(d);
                }
            }
            _ => cpu.push((i, t)),
        }
    }
    // One event per GPU marks the end of this save's copies on its stream.
    let events = gpus.into_iter().map(cuda::Event::record).collect::<Result<Vec<_>>>()?;
    if cpu_copy == CpuCopy::Immediate {
        lease.fill_now(&cpu)?;
        cpu.clear();
    }
    // Deferred CPU copies hold writers back until they land.
    let guard = if cpu.is_empty() { None } else { Some(fence.arm()) };
    Ok(Copies { lease, deferred: cpu, guard, events })
}

impl Copies {
    /// Wait for the device-to-host copies, copy the deferred CPU tensors,
    /// release the fence, checksum the staged bytes. Runs on a worker.
    ///
    /// # Errors
    /// [`crate::Error::Torch`] when a copy fails.
    pub fn land(self) -> Result<Landed> {
        let Copies { mut lease, deferred, guard, events } = self;
        let start = Instant::now();
        // The trainer queued the device-to-host copies in stream order and
        // recorded an event after them; wait for exactly those copies here,
        // off the trainer's thread.
        let landed = events.iter().try_for_each(cuda::Event::wait);
        drop(events);
        let copied = landed.and_then(|()| copy_all(&deferred, &mut lease));
        // The bytes are in the lease: parameters may change again. The
        // checksums are computed on the staged copy, after the fence.
        drop(deferred);
        drop(guard);
        copied?;
        let crcs = lease.buffers().iter().map(|b| crate::tensors::checksums(b)).collect();
        Ok((lease, crcs, start.elapsed()))
    }
}

/// Copy CPU tensors into their buffers of the lease. Only this part needs
/// the parameters to hold still.
fn copy_all(tensors: &[(usize, tch::Tensor)], lease: &mut Lease) -> Result<()> {
    for (i, t) in tensors {
        let src = t.f_contiguous()?;
        // SAFETY: the caller's tensor (or a contiguous copy of it), read
        // under the armed fence, which every writer waits on.
        let bytes = unsafe { crate::tensors::host_bytes(&src) }
            .ok_or_else(|| crate::Error::Torch(tch::TchError::Torch("a contiguous CPU tensor has no host bytes".into())))?;
        lease.host(*i, bytes.len()).copy_from_slice(bytes);
    }
    Ok(())
}

/// Queue a non-blocking copy of a GPU tensor into pinned buffer `i` of the lease.
fn enqueue_device_copy(t: &tch::Tensor, lease: &mut Lease, i: usize) -> Result<()> {
    let len = crate::tensors::byte_len(t);
    let buf = lease.pinned(i, len, t.device())?;
    if len == 0 {
        return Ok(());
    }
    let src = t.f_contiguous()?;
    let mut dst = buf.f_view_dtype(src.kind())?.f_reshape(src.size())?;
    cuda::copy_async(&mut dst, &src)
}
