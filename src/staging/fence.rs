//! The fence that keeps tensors still while a deferred save copies them
//! (`staging.cpu_copy = "deferred"`). With the default immediate copy no save
//! arms it, and waiting on it returns at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::background::lock;
use std::time::{Duration, Instant};

/// Blocks parameter updates while a save is still copying them.
///
/// A save arms the fence on the trainer's thread before it returns; the
/// copier releases it when the bytes are in host memory. An optimizer's `step`
/// calls [`Fence::wait`] first, so it never modifies a parameter mid-copy.
#[derive(Clone, Default)]
pub struct Fence {
    inner: Arc<FenceInner>,
}

#[derive(Default)]
struct FenceInner {
    /// Copies in flight. Guarded by the mutex so that `wait` cannot miss the
    /// notification of the last release.
    pending: Mutex<u64>,
    released: Condvar,
    waited_ns: AtomicU64,
    waits: AtomicU64,
}

/// Held by an in-flight copy; dropping it releases the fence (also on error).
pub struct FenceGuard {
    inner: Arc<FenceInner>,
}

impl Fence {
    /// Mark one copy in flight.
    pub fn arm(&self) -> FenceGuard {
        *lock(&self.inner.pending) += 1;
        FenceGuard { inner: self.inner.clone() }
    }

    /// Wait until no copy is in flight; returns how long it waited.
    pub fn wait(&self) -> Duration {
        let start = Instant::now();
        let mut pending = lock(&self.inner.pending);
        if *pending == 0 {
            return Duration::ZERO;
        }
        while *pending > 0 {
            pending = self.inner.released.wait(pending).unwrap_or_else(|p| p.into_inner());
        }
        let waited = start.elapsed();
        self.inner.waited_ns.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        self.inner.waits.fetch_add(1, Ordering::Relaxed);
        waited
    }

    /// Total time optimizer steps spent waiting on this fence, and how often they waited.
    pub fn waited(&self) -> (Duration, u64) {
        (Duration::from_nanos(self.inner.waited_ns.load(Ordering::Relaxed)), self.inner.waits.load(Ordering::Relaxed))
    }
}

impl Drop for FenceGuard {
    fn drop(&mut self) {
        let mut pending = lock(&self.inner.pending);
        *pending = pending.saturating_sub(1);
        self.inner.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_blocks_until_released() {
        let fence = Fence::default();
        assert_eq!(fence.wait(), Duration::ZERO);
        let guard = fence.arm();
        let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = {
            let released = released.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                released.store(true, std::sync::atomic::Ordering::SeqCst);
                drop(guard);
            })
        };
        fence.wait();
        assert!(released.load(std::sync::atomic::Ordering::SeqCst), "wait returned before the copy in flight was released");
        assert_eq!(fence.waited().1, 1);
        t.join().unwrap();
    }
}
