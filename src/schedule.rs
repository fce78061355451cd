//! When the trainer saves and snapshots (the reference's rules).

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

    /// Snapshot at this iteration? True on the iteration after a save whose
    /// iteration is a multiple of `snapshot_interval`; the snapshot is built
    /// from that save (iteration - 1).
    pub fn snapshot_at(&self, iteration: u64) -> bool {
        let saved = iteration.wrapping_sub(1);
        self.snapshot_interval > 0 && iteration > 1 && self.save_at(saved) && saved.is_multiple_of(self.snapshot_interval)
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
        assert_eq!(snaps, [21, 41]);
        let never = Schedule { save_interval: 10, snapshot_interval: 0 };
        assert!(!(0..100).any(|i| never.snapshot_at(i)));
        // A snapshot interval that is no multiple of the save interval only fires on common multiples.
        let odd = Schedule { save_interval: 4, snapshot_interval: 6 };
        assert_eq!((0..=30).filter(|&i| odd.snapshot_at(i)).collect::<Vec<_>>(), [13, 25]);
    }
}
