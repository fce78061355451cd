//! An async training loop on a single-threaded runtime: saving never blocks
//! the runtime, and every save either commits or is counted as skipped.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelio::config::OnBusy;
use modelio::ModelIo;

/// Trains `steps` on a `current_thread` runtime, saving every step with
/// `max_inflight = 1` and slow writes, while another task ticks every ms.
/// Returns the longest gap between ticks and the handle's counters.
fn run(on_busy: OnBusy, steps: u64) -> (Duration, modelio::SaveStats, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = common::config(tmp.path(), "m");
        c.staging.max_inflight = 1;
        c.staging.on_busy = on_busy;
        let mut io = ModelIo::open_async(c).await.unwrap();
        io.set_write_delay(Duration::from_millis(30));
        let (vs, _net) = common::seeded_store(3);
        io.resume_async(&vs, None).await.unwrap();
        let stop = Arc::new(AtomicU64::new(0));
        let worst = Arc::new(AtomicU64::new(0));
        let ticker = {
            let (stop, worst) = (stop.clone(), worst.clone());
            tokio::spawn(async move {
                let mut last = Instant::now();
                while stop.load(Ordering::Relaxed) == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let gap = last.elapsed();
                    worst.fetch_max(gap.as_micros() as u64, Ordering::Relaxed);
                    last = Instant::now();
                }
            })
        };
        let mut tickets = Vec::new();
        for _ in 0..steps {
            io.record(1.0);
            tickets.push(io.save_async(&vs, None).await.unwrap());
            tokio::task::yield_now().await;
        }
        let mut committed = 0;
        for t in tickets {
            let c = t.await.unwrap();
            if !c.skipped {
                committed += 1;
            }
        }
        stop.store(1, Ordering::Relaxed);
        ticker.await.unwrap();
        let stats = io.stats();
        io.shutdown().await.unwrap();
        (Duration::from_micros(worst.load(Ordering::Relaxed)), stats, committed)
    })
}

#[test]
fn saving_every_step_never_blocks_a_current_thread_runtime() {
    for on_busy in [OnBusy::Wait, OnBusy::Skip] {
        let (worst, stats, committed) = run(on_busy, 20);
        assert!(worst < Duration::from_millis(10), "{on_busy:?}: the runtime was blocked for {worst:?}");
        assert_eq!(stats.requested, 20);
        assert_eq!(stats.committed + stats.skipped, 20, "{on_busy:?}: {stats:?}");
        assert_eq!(committed, stats.committed);
        match on_busy {
            OnBusy::Wait => assert!(stats.waited > 0 && stats.skipped == 0, "{stats:?}"),
            OnBusy::Skip => assert!(stats.skipped > 0, "{stats:?}"),
        }
    }
}
