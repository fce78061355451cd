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

    #[test]
    fn zero_keeps_all_and_small_sets_untouched() {
        assert!(to_remove(&snaps(&[1, 2, 3]), 0).is_empty());
        assert!(to_remove(&snaps(&[1, 2]), 2).is_empty());
        assert!(to_remove(&[], 1).is_empty());
    }
}
