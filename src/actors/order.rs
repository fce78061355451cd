//! When a snapshot request is due. The handle sends snapshot requests straight
//! to the saver, not through the stager, so one may reach the saver before
//! the save it follows (still being copied by the stager). The saver keeps it
//! here until that save has been handed over, committed or not.
//!
//! Why counting is enough: the handle queues save k (to the stager) before it
//! sends a request with `after = k`, and the stager hands save k+1 over
//! (`Write` or `Lost`, exactly one per save) only after the handle queued it,
//! that is after the request is already in the saver's mailbox. So when the
//! saver reads the request, at most `after` saves were handed over: the
//! request is never late, and it is due exactly when the `after`-th save has
//! been handed over. A flush sent after the request passes through the
//! stager behind save `after`, so it reaches the saver after the request is
//! due: a flush never leaves a request pending.

use std::collections::VecDeque;

use super::messages::Snapshot;
use crate::error::Error;

/// What to do with a request that is due.
#[derive(Debug)]
pub(crate) enum Due {
    /// Build it from the files of save `iterations`, just committed.
    Save(u64),
    /// No save was queued in this run: snapshot the archive on disk.
    OnDisk,
    /// The save it follows was not committed: refuse, loudly.
    Refused(Error),
}

#[derive(Default)]
pub(crate) struct SnapshotOrder {
    /// Saves handed over to the saver so far, in the order the handle queued them.
    handed: u64,
    /// Iterations of the last save handed over when it was committed; `None`
    /// when it failed or none was handed over yet.
    last: Option<u64>,
    /// Requests whose save was not handed over yet, oldest first (so with
    /// non-decreasing `after`).
    pending: VecDeque<Snapshot>,
}

impl SnapshotOrder {
    /// A request arrived: returned with what to do when it is due now,
    /// kept otherwise.
    pub fn request(&mut self, s: Snapshot) -> Option<(Snapshot, Due)> {
        if s.after <= self.handed {
            let due = self.due(&s);
            return Some((s, due));
        }
        self.pending.push_back(s);
        None
    }

    /// The next save was handed over, committed at `iterations` or failed
    /// (`None`): the requests now due.
    pub fn handed_over(&mut self, committed: Option<u64>) -> Vec<(Snapshot, Due)> {
        self.handed += 1;
        self.last = committed;
        let mut due = Vec::new();
        while self.pending.front().is_some_and(|s| s.after <= self.handed) {
            if let Some(s) = self.pending.pop_front() {
                let d = self.due(&s);
                due.push((s, d));
            }
        }
        due
    }

    fn due(&self, s: &Snapshot) -> Due {
        match (s.of, self.last) {
            (None, _) => Due::OnDisk,
            (Some(n), Some(c)) if n == c => Due::Save(n),
            // Never snapshot another save under its name, nor silently.
            (Some(n), _) => Due::Refused(Error::SnapshotWithoutSave { iterations: n, why: "not committed (it failed)" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use super::*;
    use crate::actors::messages::Permit;

    fn request(of: Option<u64>, after: u64) -> Snapshot {
        let permit = Permit::try_acquire(&Arc::new(AtomicUsize::new(0)), 1).unwrap();
        Snapshot { of, after, permit }
    }

    fn dues(v: Vec<(Snapshot, Due)>) -> Vec<(u64, Due)> {
        v.into_iter().map(|(s, d)| (s.after, d)).collect()
    }

    #[test]
    fn a_request_ahead_of_its_save_waits_for_it() {
        let mut o = SnapshotOrder::default();
        assert!(o.handed_over(Some(10)).is_empty());
        // Save 2 (iteration 20) is still with the stager.
        assert!(o.request(request(Some(20), 2)).is_none());
        assert!(o.request(request(Some(20), 2)).is_none());
        assert!(o.request(request(Some(30), 3)).is_none());
        let due = dues(o.handed_over(Some(20)));
        assert!(matches!(&due[..], [(2, Due::Save(20)), (2, Due::Save(20))]), "{due:?}");
        let due = dues(o.handed_over(Some(30)));
        assert!(matches!(&due[..], [(3, Due::Save(30))]), "{due:?}");
    }

    #[test]
    fn a_request_after_its_save_is_due_at_once() {
        let mut o = SnapshotOrder::default();
        o.handed_over(Some(5));
        assert!(matches!(o.request(request(Some(5), 1)), Some((_, Due::Save(5)))));
    }

    #[test]
    fn a_request_after_a_failed_or_lost_save_is_refused() {
        let mut o = SnapshotOrder::default();
        assert!(o.request(request(Some(7), 1)).is_none());
        let due = dues(o.handed_over(None));
        assert!(matches!(&due[..], [(1, Due::Refused(Error::SnapshotWithoutSave { iterations: 7, .. }))]), "{due:?}");
        // The same iteration count committed by an earlier save does not stand in for it.
        let mut o = SnapshotOrder::default();
        o.handed_over(Some(7));
        assert!(o.request(request(Some(7), 2)).is_none());
        assert!(matches!(&dues(o.handed_over(None))[..], [(2, Due::Refused(_))]));
    }

    #[test]
    fn a_request_is_refused_when_its_save_committed_other_iterations() {
        // Never snapshot another save under the requested iterations' name.
        let mut o = SnapshotOrder::default();
        assert!(o.request(request(Some(20), 1)).is_none());
        let due = dues(o.handed_over(Some(19)));
        assert!(matches!(&due[..], [(1, Due::Refused(Error::SnapshotWithoutSave { iterations: 20, .. }))]), "{due:?}");
        assert!(matches!(o.request(request(Some(20), 1)), Some((_, Due::Refused(_)))));
        assert!(matches!(o.request(request(Some(19), 1)), Some((_, Due::Save(19)))));
    }

    #[test]
    fn a_request_before_any_save_snapshots_the_archive_on_disk() {
        let mut o = SnapshotOrder::default();
        assert!(matches!(o.request(request(None, 0)), Some((_, Due::OnDisk))));
    }
}
