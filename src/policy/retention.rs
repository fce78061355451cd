//! Which snapshots to remove: a pure policy over (iteration, folder) pairs.

use std::path::PathBuf;

/// The snapshots to delete so that only the newest `keep` (by iteration
/// number, numerically) remain. `keep == 0` keeps all.
pub fn to_remove(snapshots: &[(u64, PathBuf)], keep: usize) -> Vec<PathBuf> {
    if keep == 0 || snapshots.len() <= keep {
        return Vec::new();
    }
    let mut sorted: Vec<&(u64, PathBuf)> = snapshots.iter().collect();
    sorted.sort_by_key(|(n, _)| *n);
    sorted[..sorted.len() - keep].iter().map(|(_, p)| p.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snaps(ns: &[u64]) -> Vec<(u64, PathBuf)> {
        ns.iter().map(|n| (*n, PathBuf::from(format!("m_snapshot_{n}_iters")))).collect()
    }

    #[test]
    fn keeps_newest_numerically() {
        let removed = to_remove(&snaps(&[1000, 800, 900, 1100]), 2);
        assert_eq!(removed, [PathBuf::from("m_snapshot_800_iters"), PathBuf::from("m_snapshot_900_iters")]);
    }

    fn iterations(removed: &[PathBuf]) -> Vec<u64> {
        let snaps = snaps(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        removed.iter().map(|p| snaps.iter().find(|(_, q)| q == p).unwrap().0).collect()
    }

    #[test]
    fn removes_all_but_the_newest_keep() {
        // Counts where removing n-keep differs from removing n/keep or n%keep.
        assert_eq!(iterations(&to_remove(&snaps(&[5, 3, 1, 4, 2]), 1)), [1, 2, 3, 4]);
        assert_eq!(iterations(&to_remove(&snaps(&[5, 3, 1, 4, 2]), 2)), [1, 2, 3]);
        assert_eq!(iterations(&to_remove(&snaps(&[2, 4, 1, 3]), 3)), [1]);
        assert_eq!(iterations(&to_remove(&snaps(&[9, 8, 7, 6, 5, 4, 3]), 4)), [3, 4, 5]);
        assert!(to_remove(&snaps(&[1, 2, 3, 4, 5]), 5).is_empty());
        assert!(to_remove(&snaps(&[1, 2, 3, 4, 5]), 6).is_empty());
        assert!(to_remove(&snaps(&[1, 2, 3, 4, 5]), 0).is_empty(), "0 keeps all");
    }

    #[test]
    fn zero_keeps_all_and_small_sets_untouched() {
        assert!(to_remove(&snaps(&[1, 2, 3]), 0).is_empty());
        assert!(to_remove(&snaps(&[1, 2]), 2).is_empty());
        assert!(to_remove(&[], 1).is_empty());
    }
}
