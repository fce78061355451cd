//! Host staging buffers: where a save's tensors are copied before they are
//! written.
//!
//! Host memory is bounded: the pool hands out at most `max_inflight` buffer
//! sets, each reused save after save (a buffer only grows when a tensor got
//! bigger). When none is free a save waits or is skipped, per `staging.on_busy`.
//!
//! CPU tensors are copied at the call (`fill_now`), after it under the
//! [`Fence`] (`fence`), or after it under write protection (`protect`, over
//! the userfaultfd calls of `uffd`); `copy` picks per `staging.cpu_copy`.

mod copy;
pub(crate) mod cuda;
mod fence;
mod protect;
mod uffd;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::background::lock;
pub(crate) use crate::staging::copy::{start, Copies};
pub use crate::staging::fence::{Fence, FenceGuard};
pub use crate::staging::protect::{protect_available, protected_saves};

/// Most threads an immediate staging copy uses (the caller's included).
pub const COPY_THREADS: usize = 4;
/// Pieces an immediate copy is split into, in bytes.
const COPY_PIECE: usize = 4 << 20;

/// The error of a contiguous CPU tensor whose bytes cannot be had.
pub(crate) fn no_host_bytes() -> crate::Error {
    crate::Error::Torch(tch::TchError::Torch("a contiguous CPU tensor has no host bytes".into()))
}

/// A piece of an immediate copy: (source, destination) of the same length.
type Piece<'a> = (&'a [u8], &'a mut [u8]);

/// Tensors at least this large get a placed staging buffer: smaller ones
/// are gathered for a direct write anyway (`folder::direct`).
const PLACE_MIN: usize = 512 << 10;

/// One tensor's host buffer.
pub(crate) enum Buffer {
    /// Pageable memory, filled by a memcpy (CPU tensors): the bytes are
    /// `v[at..at + len]`, `at` chosen so that they start at the offset within
    /// a block where the archive will hold them ([`Lease::place`]), and a
    /// write around the page cache takes them from where they are.
    Host { v: Vec<u8>, at: usize, len: usize },
    /// Page-locked memory as a `u8` libtorch tensor, filled by a non-blocking
    /// device-to-host copy (GPU tensors).
    Pinned(tch::Tensor),
}

impl Buffer {
    /// The buffer's bytes; empty for a pinned buffer that cannot be read as
    /// host bytes (never one [`Lease::pinned`] made): the saver checks every
    /// buffer's length against its tensor before writing, and refuses it.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Buffer::Host { v, at, len } => v.get(*at..*at + *len).unwrap_or_default(),
            // SAFETY: a contiguous CPU u8 tensor that only this lease holds.
            // Its one writer is the device-to-host copy `save` queued into it,
            // and the stager waited for that copy's event before the lease
            // reached anyone who reads it.
            Buffer::Pinned(t) => unsafe { crate::tensors::host_bytes(t) }.unwrap_or_default(),
        }
    }
}

/// One save's buffers, one per tensor.
pub(crate) type BufferSet = Vec<Buffer>;

/// A bounded pool of reusable buffer sets.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    /// How many sets there are, free or on loan.
    sets: usize,
    free: Mutex<Vec<BufferSet>>,
    /// Wakes threads blocked in [`Pool::lease`]...
    returned: Condvar,
    /// ... and tasks awaiting [`Pool::lease_async`], whenever a set comes back.
    available: tokio::sync::Notify,
    grown: AtomicU64,
}

/// Ask for huge pages behind the whole 2 MiB pages of a new buffer of
/// `len` bytes at `ptr` (`MADV_HUGEPAGE`), before it is filled: a copy into
/// it misses the TLB less often, and a direct write pins its pages for the
/// disk a huge page at a time (measured here: the saver's CPU per GiB
/// written fell from 0.050 s to 0.028). A buffer under 4 MiB may hold no
/// whole huge page, and is left as it is; so is one the kernel refuses.
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    if let Some((lo, hi)) = copy::whole_huge_pages(ptr as usize, len) {
        // SAFETY: advice only, on whole pages within memory this buffer
        // owns; it changes how they are backed, never their contents.
        unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
    }
}

/// A buffer set on loan; dropping it returns the set to the pool.
pub(crate) struct Lease {
    set: BufferSet,
    /// Where tensor `i`'s bytes will lie within a block of the archive
    /// ([`Lease::place`]); none: not placed.
    places: Vec<usize>,
    pool: Arc<PoolInner>,
}

impl Pool {
    /// A pool of `sets` buffer sets (allocated lazily, then reused).
    pub fn new(sets: usize) -> Pool {
        let sets = sets.max(1);
        let free = (0..sets).map(|_| Vec::new()).collect();
        Pool {
            inner: Arc::new(PoolInner {
                sets,
                free: Mutex::new(free),
                returned: Condvar::new(),
                available: tokio::sync::Notify::new(),
                grown: AtomicU64::new(0),
            }),
        }
    }

    /// A free set now, or `None` when every set is in flight.
    pub fn try_lease(&self) -> Option<Lease> {
        lock(&self.inner.free).pop().map(|set| Lease { set, places: Vec::new(), pool: self.inner.clone() })
    }

    /// Wait for a free set.
    pub fn lease(&self) -> Lease {
        let mut free = lock(&self.inner.free);
        loop {
            if let Some(set) = free.pop() {
                return Lease { set, places: Vec::new(), pool: self.inner.clone() };
            }
            free = self.inner.returned.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Wait for a free set without blocking the thread (for async callers).
    pub async fn lease_async(&self) -> Lease {
        loop {
            // Register for the wake-up before looking, so a set returned
            // between the look and the wait is not missed.
            let returned = self.inner.available.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(lease) = self.try_lease() {
                return lease;
            }
            returned.await;
        }
    }

    /// How many times a buffer had to grow (0 after the first save of a
    /// fixed-size state means every later save reused memory).
    pub fn growths(&self) -> u64 {
        self.inner.grown.load(Ordering::Relaxed)
    }
}

impl Lease {
    /// How many sets the pool has: at most this many leases exist at once.
    pub fn pool_size(&self) -> usize {
        self.pool.sets
    }

    /// The buffer for tensor `i`, created on first use.
    fn slot(&mut self, i: usize) -> &mut Buffer {
        if self.set.len() <= i {
            self.set.resize_with(i + 1, || Buffer::Host { v: Vec::new(), at: 0, len: 0 });
        }
        &mut self.set[i]
    }

    /// Place the host buffers for the archive: tensor `i`'s bytes will lie
    /// at `places[i]` within a block of the file (`archive::block_offsets`).
    pub fn place(&mut self, places: Vec<usize>) {
        self.places = places;
    }

    /// The host buffer for tensor `i`, exactly `len` bytes, placed when
    /// [`Lease::place`] said where (counting a growth when it must
    /// reallocate). Its bytes are those of the last save that used it, or
    /// zeros.
    pub fn host(&mut self, i: usize, len: usize) -> &mut [u8] {
        let block = crate::folder::direct::BLOCK;
        let place = self.places.get(i).copied().filter(|_| len >= PLACE_MIN);
        let pool = self.pool.clone();
        let slot = self.slot(i);
        if !matches!(slot, Buffer::Host { .. }) {
            *slot = Buffer::Host { v: Vec::new(), at: 0, len: 0 };
        }
        let Buffer::Host { v, at, len: filled } = slot else { unreachable!("set to Host above") };
        let room = len + if place.is_some() { block } else { 0 };
        if v.capacity() < room {
            pool.grown.fetch_add(1, Ordering::Relaxed);
            *v = Vec::with_capacity(room);
            advise_huge_pages(v.as_mut_ptr(), room);
        }
        *at = place.map_or(0, |p| (p % block + block - v.as_ptr() as usize % block) % block);
        // Reused buffers keep their length: no memset after the first save.
        if v.len() < *at + len {
            v.resize(*at + len, 0);
        }
        *filled = len;
        &mut v[*at..*at + len]
    }

    /// A pinned buffer for tensor `i` of exactly `len` bytes, allocated on
    /// first use and reused while the size stays the same.
    ///
    /// # Errors
    /// [`crate::Error::Torch`] when pinned memory cannot be allocated.
    pub fn pinned(&mut self, i: usize, len: usize, device: tch::Device) -> crate::Result<&tch::Tensor> {
        let pool = self.pool.clone();
        let slot = self.slot(i);
        let fits = matches!(slot, Buffer::Pinned(t) if t.numel() == len);
        if !fits {
            pool.grown.fetch_add(1, Ordering::Relaxed);
            let t = tch::Tensor::f_empty([len as i64], (tch::Kind::Uint8, tch::Device::Cpu))?.f_pin_memory(device)?;
            *slot = Buffer::Pinned(t);
        }
        match slot {
            Buffer::Pinned(t) => Ok(t),
            Buffer::Host { .. } => unreachable!("set to Pinned above"),
        }
    }

    /// Copy CPU tensors into their buffers now, on the calling thread and up
    /// to [`COPY_THREADS`] - 1 helpers, so the copy costs about one memcpy of
    /// the state divided over the cores. When this returns the lease holds
    /// the values the tensors had at the call.
    ///
    /// # Errors
    /// [`crate::Error::Torch`] when a non-contiguous tensor cannot be made contiguous.
    pub fn fill_now(&mut self, tensors: &[(usize, tch::Tensor)]) -> crate::Result<()> {
        // Contiguous views (a copy only for a non-contiguous tensor).
        let views = tensors.iter().map(|(i, t)| Ok((*i, t.f_contiguous()?))).collect::<crate::Result<Vec<_>>>()?;
        let mut total = 0usize;
        for (i, t) in &views {
            let len = crate::tensors::byte_len(t);
            self.host(*i, len);
            total += len;
        }
        // (source, destination) pieces of at most COPY_PIECE bytes.
        let mut pieces: Vec<Piece> = Vec::new();
        let mut dsts: Vec<Option<&mut [u8]>> = self
            .set
            .iter_mut()
            .map(|b| match b {
                Buffer::Host { v, at, len } => v.get_mut(*at..*at + *len),
                Buffer::Pinned(_) => None,
            })
            .collect();
        for (i, t) in &views {
            // SAFETY: the caller's tensors, read during its `save` call, which
            // borrows them; modelio never writes them. A write from another
            // thread meanwhile would be the caller's race, as with any read
            // of a tensor through tch.
            let src = unsafe { crate::tensors::host_bytes(t) }.ok_or_else(no_host_bytes)?;
            let Some(dst) = dsts.get_mut(*i).and_then(Option::take) else { continue };
            for (s, d) in src.chunks(COPY_PIECE).zip(dst.chunks_mut(COPY_PIECE)) {
                pieces.push((s, d));
            }
        }
        let threads = COPY_THREADS.min(crate::cores()).min(total / COPY_PIECE + 1);
        if threads <= 1 {
            pieces.into_iter().for_each(|(s, d)| d.copy_from_slice(s));
            return Ok(());
        }
        // A shared queue of pieces: helpers and the caller take the next one
        // until none is left, so the caller alone finishes the copy if a
        // helper thread cannot be started.
        let queue: Vec<Mutex<Option<Piece>>> = pieces.into_iter().map(|p| Mutex::new(Some(p))).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = || {
            while let Some(piece) = queue.get(next.fetch_add(1, Ordering::Relaxed)) {
                if let Some((s, d)) = lock(piece).take() {
                    d.copy_from_slice(s);
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                let _ = std::thread::Builder::new().name("modelio-copy".into()).spawn_scoped(scope, work);
            }
            work();
        });
        Ok(())
    }

    /// The filled buffers' bytes.
    pub fn buffers(&self) -> Vec<&[u8]> {
        self.set.iter().map(Buffer::bytes).collect()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let set = std::mem::take(&mut self.set);
        lock(&self.pool.free).push(set);
        self.pool.returned.notify_one();
        self.pool.available.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_bounded_and_reuses_memory() {
        let pool = Pool::new(1);
        let mut a = pool.try_lease().unwrap();
        assert!(pool.try_lease().is_none());
        a.host(0, 1000).fill(1);
        drop(a);
        let mut b = pool.try_lease().unwrap();
        b.host(0, 1000);
        assert_eq!(pool.growths(), 1);
    }

    #[test]
    fn placed_buffers_start_where_the_archive_holds_their_bytes() {
        let pool = Pool::new(1);
        let block = crate::folder::direct::BLOCK;
        let len = PLACE_MIN + 100;
        for place in [0, 1, 64, 4000] {
            let mut lease = pool.try_lease().unwrap();
            lease.place(vec![place, place]);
            lease.host(0, len).fill(place as u8);
            let small = lease.host(1, 10).as_ptr() as usize;
            let b = lease.buffers();
            assert_eq!((b[0].as_ptr() as usize % block, b[0].len()), (place, len), "placed");
            assert!(b[0].iter().all(|&x| x == place as u8));
            assert_eq!(b[1].as_ptr() as usize, small, "a small tensor is not placed");
        }
        assert_eq!(pool.growths(), 2, "each buffer allocated once, placed anew each time");
    }
}
