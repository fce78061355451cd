//! When the trainer saves and snapshots.
//!
//! The reference's rules, with two differences:
//! - Iterations are counted over all sessions (total iterations, as the
//!   state file records them), where the reference counts the iterations of
//!   the current session after a resume. A resumed run therefore saves and
//!   snapshots at the same iterations as an uninterrupted one, and snapshot
//!   folders are named after total iterations.
//! - A snapshot is requested at the save it is built from. The reference
//!   snapshots one iteration after that save, so a run that stops exactly
//!   there got none; here snapshots are ordered after their save by the
//!   actors, so no iteration needs to pass.

use crate::config::Config;

/// Save and snapshot intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Save on iteration 1 and every multiple of this (>= 1).
    pub save_interval: u64,
    /// Snapshot after saves at multiples of this (0 = never).
    pub snapshot_interval: u64,
}

impl Schedule {
    pub fn from_config(c: &Config) -> Schedule {
        Schedule { save_interval: c.save.interval.max(1), snapshot_interval: c.snapshot.interval }
    }

    /// Save at this iteration (1-based)?
    pub fn save_at(&self, iteration: u64) -> bool {
        iteration == 1 || (iteration > 0 && iteration.is_multiple_of(self.save_interval.max(1)))
    }

    /// Snapshot at this iteration, right after its save? True at saves
    /// whose iteration is a multiple of `snapshot_interval`; the snapshot is
    /// built from that save once it is committed.
    pub fn snapshot_at(&self, iteration: u64) -> bool {
        self.snapshot_interval != 0 && self.save_at(iteration) && iteration.is_multiple_of(self.snapshot_interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_schedule() {
        let s = Schedule { save_interval: 10, snapshot_interval: 20 };
        let saves: Vec<u64> = (0..=45).filter(|&i| s.save_at(i)).collect();
        assert_eq!(saves, [1, 10, 20, 30, 40]);
        let snaps: Vec<u64> = (0..=45).filter(|&i| s.snapshot_at(i)).collect();
        assert_eq!(snaps, [20, 40]);
        let never = Schedule { save_interval: 10, snapshot_interval: 0 };
        assert!(!(0..100).any(|i| never.snapshot_at(i)));
        // A snapshot interval that is no multiple of the save interval only fires on common multiples.
        let odd = Schedule { save_interval: 4, snapshot_interval: 6 };
        assert_eq!((0..=30).filter(|&i| odd.snapshot_at(i)).collect::<Vec<_>>(), [12, 24]);
        // A run that stops at a snapshot iteration gets its snapshot.
        assert!(s.snapshot_at(40));
    }
}
