//! An async training loop on a single-threaded runtime: saving never blocks
//! the runtime, and every save either commits or is counted as skipped.
//!
//! Behaviour only, no durations: the runtime's other tasks run while a save
//! waits for a staging buffer, and a save returns before its archive is
//! written. How long the runtime's worst pause is belongs to `make bench`
//! ("runtime's worst tick gap, saving every step").

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use modelio::config::OnBusy;
use modelio::ModelIo;

/// What a run saw.
struct Seen {
    stats: modelio::SaveStats,
    committed: u64,
    /// Calls that had to wait for a staging buffer, and the ticker's ticks
    /// during each of them.
    waiting_calls: Vec<u64>,
    /// Saves whose ticket was still in flight when their call returned.
    returned_in_flight: u64,
}

/// Trains `steps` on a `current_thread` runtime, saving every step with
/// `max_inflight = 1` and slow writes, while another task on the same
/// runtime ticks whenever it is polled (it yields after every tick).
fn run(on_busy: OnBusy, steps: u64) -> Seen {
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
        let stop = Arc::new(AtomicBool::new(false));
        let ticks = Arc::new(AtomicU64::new(0));
        let ticker = {
            let (stop, ticks) = (stop.clone(), ticks.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    ticks.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut saves = Vec::new();
        let mut waiting_calls = Vec::new();
        for _ in 0..steps {
            io.record(1.0);
            let (waits, ticked) = (io.stats().waited, ticks.load(Ordering::Relaxed));
            let mut ticket = io.save_async(&vs, None).await.unwrap();
            if io.stats().waited > waits {
                waiting_calls.push(ticks.load(Ordering::Relaxed) - ticked);
            }
            saves.push(match ticket.try_result() {
                None => Saved::InFlight(ticket),
                Some(outcome) => Saved::Done(outcome.unwrap()),
            });
            tokio::task::yield_now().await;
        }
        let returned_in_flight = saves.iter().filter(|s| matches!(s, Saved::InFlight(_))).count() as u64;
        let mut committed = 0;
        for save in saves {
            let c = match save {
                Saved::InFlight(t) => t.await.unwrap(),
                Saved::Done(c) => c,
            };
            if !c.skipped {
                committed += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        ticker.await.unwrap();
        let stats = io.stats();
        io.shutdown().await.unwrap();
        Seen { stats, committed, waiting_calls, returned_in_flight }
    })
}

/// A save as its call returned it.
enum Saved {
    /// Not written yet.
    InFlight(modelio::Ticket),
    /// Already answered (a skipped save, or one written already).
    Done(modelio::Committed),
}

#[test]
fn saving_every_step_never_blocks_a_current_thread_runtime() {
    for on_busy in [OnBusy::Wait, OnBusy::Skip] {
        let seen = run(on_busy, 20);
        let stats = &seen.stats;
        assert_eq!(stats.requested, 20);
        assert_eq!(stats.committed + stats.skipped, 20, "{on_busy:?}: {stats:?}");
        assert_eq!(seen.committed, stats.committed);
        // A save that wrote its archive before returning would come back answered.
        assert!(seen.returned_in_flight > 0, "{on_busy:?}: every save call returned only once its archive was written");
        match on_busy {
            OnBusy::Wait => {
                assert!(stats.waited > 0 && stats.skipped == 0, "{stats:?}");
                assert_eq!(seen.waiting_calls.len() as u64, stats.waited);
                // While a save waited for the buffer of the save before it,
                // the runtime went on polling its other task.
                assert!(
                    seen.waiting_calls.iter().any(|&ticks| ticks > 0),
                    "no task ran on the runtime while save_async waited for a staging buffer: {:?}",
                    seen.waiting_calls
                );
            }
            // Skipped: the previous save's buffer was still busy, so that
            // save's call had returned before its archive was written.
            OnBusy::Skip => assert!(stats.skipped > 0 && seen.waiting_calls.is_empty(), "{stats:?}"),
        }
    }
}
