//! A save's copies into its staging buffers, in two halves: [`start`] on
//! the trainer's thread when `save` is called, [`Copies::land`] on a worker
//! before the bytes are written. Every save goes through these, a single
//! process's and a rank's alike.

use std::time::{Duration, Instant};

use super::protect::{self, Piece, Protected};
use super::{cuda, Fence, FenceGuard, Lease};
use crate::config::CpuCopy;
use crate::error::{Error, Result};

/// A save's copies once started: the lease they go to, the CPU tensors
/// being copied under write protection (`"protect"` mode) or left to copy
/// (`"deferred"` mode, under a fence guard), and one event per GPU marking
/// the end of its queued copies.
pub(crate) struct Copies {
    /// Declared before `lease`: a save dropped before it landed waits here
    /// for the protect handler to stop writing into the lease's buffers
    /// before the lease goes back to the pool.
    pub protected: Option<Protection>,
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

/// CPU tensors being copied under write protection, kept alive until their
/// copy is done (`protected` is dropped, and so waited for, first).
pub(crate) struct Protection {
    protected: Protected,
    tensors: Vec<tch::Tensor>,
}

/// A landed save: its lease holding the bytes, the (CRC-32C, zip CRC-32) of
/// each buffer, and how long landing took.
pub(crate) type Landed = (Lease, Vec<(u32, u32)>, Duration);

/// Start the copies of a save's `tensors` into `lease` (tensor `i` into
/// buffer `i`): GPU tensors as non-blocking copies queued in stream order
/// (with one event per GPU), CPU tensors copied now (`"immediate"`), left
/// for [`Copies::land`] (`"deferred"`, with `fence` armed until they land),
/// or write-protected and copied in the background (`"protect"`).
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
    let protected = match cpu_copy {
        CpuCopy::Immediate => {
            lease.fill_now(&cpu)?;
            cpu.clear();
            None
        }
        CpuCopy::Protect => Some(protect_cpu(std::mem::take(&mut cpu), &mut lease)?),
        CpuCopy::Deferred => None,
    };
    // Deferred CPU copies hold writers back until they land.
    let guard = if cpu.is_empty() { None } else { Some(fence.arm()) };
    Ok(Copies { protected, lease, deferred: cpu, guard, events })
}

/// Write-protect the contiguous CPU tensors and start their background
/// copy; the others are copied now (making them contiguous copies them
/// anyway).
fn protect_cpu(cpu: Vec<(usize, tch::Tensor)>, lease: &mut Lease) -> Result<Protection> {
    let (contiguous, other): (Vec<_>, Vec<_>) = cpu.into_iter().partition(|(_, t)| t.is_contiguous());
    if !other.is_empty() {
        lease.fill_now(&other)?;
    }
    let mut pieces = Vec::with_capacity(contiguous.len());
    let mut held = Vec::with_capacity(contiguous.len());
    for (i, t) in &contiguous {
        // A tensor of its own on the same storage: the storage stays
        // alive (and mapped) even if the caller's tensor is given other
        // data meanwhile (`set_data`).
        let t = t.f_detach()?;
        let len = crate::tensors::byte_len(&t);
        let buf = lease.host(*i, len);
        // SAFETY: only the address is taken here; the protection makes
        // every later write to these bytes wait until they are copied.
        let src = unsafe { crate::tensors::host_bytes(&t) }.ok_or_else(super::no_host_bytes)?;
        pieces.push(Piece { src: src.as_ptr(), dst: buf.as_mut_ptr(), len });
        held.push(t);
    }
    // SAFETY: the sources are the tensors' storages, kept alive (and so
    // mapped) by `held` in the `Protection` until its copy is waited for; the
    // destinations are the lease's buffers, which nothing touches until
    // then (`Copies::land` waits first, and `Copies` drops the protection
    // before the lease); a staging buffer never overlaps a tensor.
    let protected = unsafe { protect::copy_protected(pieces) };
    Ok(Protection { protected, tensors: held })
}

impl Copies {
    /// Wait for the protected copies and the device-to-host copies, copy
    /// the deferred CPU tensors, release the fence, checksum the staged
    /// bytes. Runs on a worker.
    ///
    /// # Errors
    /// [`crate::Error::Torch`] when a copy fails, [`crate::Error::Protect`]
    /// when the protected copy failed.
    pub fn land(self) -> Result<Landed> {
        let Copies { protected, mut lease, deferred, guard, events } = self;
        let start = Instant::now();
        // First: the handler may still be writing into the lease.
        let protected = protected.map_or(Ok(()), |p| {
            let copied = p.protected.wait().map_err(|source| Error::Protect { source });
            if copied.is_ok() {
                p.tensors.iter().for_each(prefer_huge_pages);
            }
            copied
        });
        // The trainer queued the device-to-host copies in stream order and
        // recorded an event after them; wait for exactly those copies here,
        // off the trainer's thread.
        let landed = protected.and_then(|()| events.iter().try_for_each(cuda::Event::wait));
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

/// `madvise` advice (Linux 6.1): back the range with huge pages now.
const MADV_COLLAPSE: libc::c_int = 25;
/// A huge page.
const HUGE_PAGE: usize = 2 << 20;

/// The whole huge pages within `len` bytes at `start`, as (first, end)
/// addresses; none when the bytes hold no whole huge page.
pub(super) fn whole_huge_pages(start: usize, len: usize) -> Option<(usize, usize)> {
    let (lo, hi) = (start.next_multiple_of(HUGE_PAGE), start.saturating_add(len) / HUGE_PAGE * HUGE_PAGE);
    (hi > lo).then_some((lo, hi))
}

/// Ask the kernel to back the 2 MiB-aligned stretches of a protected
/// tensor's bytes with huge pages now (`MADV_COLLAPSE`): write-protecting a
/// huge page is one step where 512 small pages are 512, so the next
/// protected save of the tensor stalls a fraction as long (measured here:
/// about 30 ms per GiB on small pages, 5 on huge ones). The bytes do not
/// change; memory already on huge pages costs nothing, the rest a copy, on
/// this worker. A kernel or memory that refuses it changes nothing.
fn prefer_huge_pages(t: &tch::Tensor) {
    if let Some((lo, hi)) = whole_huge_pages(t.data_ptr() as usize, crate::tensors::byte_len(t)) {
        // SAFETY: advice on the pages of a tensor this save holds alive;
        // the kernel keeps their contents, concurrent writes included.
        unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, MADV_COLLAPSE) };
    }
}

/// Copy CPU tensors into their buffers of the lease. Only this part needs
/// the parameters to hold still.
fn copy_all(tensors: &[(usize, tch::Tensor)], lease: &mut Lease) -> Result<()> {
    for (i, t) in tensors {
        let src = t.f_contiguous()?;
        // SAFETY: the caller's tensor (or a contiguous copy of it), read
        // under the armed fence, which every writer waits on.
        let bytes = unsafe { crate::tensors::host_bytes(&src) }.ok_or_else(super::no_host_bytes)?;
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
