//! The coordinator (rank 0): commits a step once every rank's done-record
//! is there, then its backup, snapshot and retention.

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::PutMode;

use super::records::inconsistency;
use super::ticket::deliver;
use super::{lock, Commit, DoneRecord, GlobalManifest, ShardSaved, Shared, Wake, SHARDED_FORMAT};
use crate::background::guarded;
use crate::error::{Error, Result, Work};
use crate::remote::objects::{to_json, unsupported, Put};

/// The coordinator (rank 0 only): commits the steps its writer wrote, in order.
pub(super) struct Coordinator {
    pub shared: Arc<Shared>,
}

impl actix::Actor for Coordinator {
    type Context = actix::SyncContext<Self>;
}

impl actix::Handler<Wake> for Coordinator {
    type Result = ();
    fn handle(&mut self, _: Wake, _: &mut Self::Context) {
        let s = &self.shared;
        while let Some(commit) = s.next_commit() {
            // The commit is over however this ends, a panic included: a
            // drop of the handle waits for it.
            let _over = CommitOver(s);
            let iterations = commit.iterations;
            if let Err(e) = guarded(Work::ShardedCommit, || {
                s.commit_step(commit);
                Ok(())
            }) {
                s.stats.commit_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(target: "modelio", "sharded step {iterations}: {}", e.report());
                s.report_later(e);
            }
        }
    }
}

/// Ends the commit in progress when dropped: snapshot requests left without
/// a step to wait for are reported, and waiters are told.
struct CommitOver<'a>(&'a Shared);

impl Drop for CommitOver<'_> {
    fn drop(&mut self) {
        lock(&self.0.queue).committing = false;
        self.0.settle_snapshots();
        self.0.wake.notify_all();
    }
}

impl Shared {
    /// The oldest step waiting to be committed, now the one in progress.
    fn next_commit(&self) -> Option<Commit> {
        let mut q = lock(&self.queue);
        if q.commits.is_empty() {
            return None;
        }
        q.committing = true;
        Some(q.commits.remove(0))
    }

    /// Commit one step, waiting for every done-record until its deadline
    /// (`shard.commit_deadline_secs` after its own shard was written), so a
    /// dead rank costs one deadline, not one per step queued behind it.
    fn commit_step(&self, Commit { iterations, deadline: until, loss, saved }: Commit) {
        // Records read by earlier polls of this step, not read again.
        let mut seen = Seen::default();
        let outcome = loop {
            // A missing done-record or a store failure (refused
            // credentials and a missing bucket included: both may be
            // fixed while training goes on) is retried until the step's
            // deadline, also while the handle is being dropped.
            match self.run(self.commit_once(iterations, loss, &mut seen)) {
                Err(
                    Error::ShardMissing { .. }
                    | Error::Remote { .. }
                    | Error::RemoteContended { .. }
                    | Error::RemoteDenied { .. }
                    | Error::RemoteNoBucket { .. },
                ) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => break other,
            }
        };
        let (saved, reply) = saved.map_or((None, None), |(s, r)| (Some(s), r));
        let tell = |committed: Result<()>| match saved {
            Some(saved) => deliver(reply, committed.map(|()| ShardSaved { committed: true, ..saved }), |e| self.report_later(e)),
            None => {
                if let Err(e) = committed {
                    self.report_later(e);
                }
            }
        };
        match outcome {
            Ok(Some(manifest)) => {
                self.stats.committed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(target: "modelio", "committed sharded step {iterations} ({} ranks)", self.rank.world_size);
                self.after_commit(&manifest);
                tell(Ok(()));
            }
            Ok(None) => {
                self.stats.already_committed.fetch_add(1, Ordering::Relaxed);
                // Committed by a racing coordinator of this run: its manifest is the step's.
                if lock(&self.queue).snapshots.remove(&iterations) {
                    self.snapshot_committed(iterations);
                }
                tell(Ok(()));
            }
            Err(e) => {
                self.stats.commit_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(target: "modelio", "sharded step {iterations} not committed: {}", e.report());
                tell(Err(e));
                if lock(&self.queue).snapshots.remove(&iterations) {
                    self.snapshot_not_made(iterations, "the step was not committed");
                }
            }
        }
    }

    /// Commit `iterations` if every rank's done-record is there: the new
    /// manifest, or `None` when it already existed. `seen` keeps the
    /// records read by an earlier call for the same step.
    pub(super) async fn commit_once(&self, iterations: u64, loss: Option<f64>, seen: &mut Seen) -> Result<Option<GlobalManifest>> {
        let shards = self.gather(iterations, &self.run_id, self.rank.world_size, seen).await?;
        self.publish(iterations, shards, loss, &mut seen.1).await
    }

    /// The done-records of step `iterations` by every rank of run `run` of
    /// `world` ranks, each shard there with its size. One listing of the
    /// step's folder says which records and shards exist; only records not
    /// read before (new, or rewritten since) are read, several at a time, so
    /// a coordinator waiting for a slow rank lists once per poll instead of
    /// reading every rank's record again.
    async fn gather(&self, iterations: u64, run: &str, world: usize, seen: &mut Seen) -> Result<Vec<DoneRecord>> {
        let listed = self.objects.list(&self.layout.step(iterations)).await?;
        let by_key: HashMap<&str, &object_store::ObjectMeta> = listed.iter().map(|m| (m.location.as_ref(), m)).collect();
        let keys: Vec<object_store::path::Path> = (0..world).map(|r| self.layout.done(iterations, r)).collect();
        if let Some(r) = keys.iter().position(|k| !by_key.contains_key(k.as_ref())) {
            return Err(Error::ShardMissing { iterations, rank: r, key: keys[r].to_string() });
        }
        // Read what is new, up to 16 at a time.
        let stale: Vec<object_store::path::Path> = keys
            .iter()
            .filter(|k| {
                let meta = by_key.get(k.as_ref());
                seen.0.get(k.as_ref()).is_none_or(|(version, _)| meta.is_none_or(|m| *version != (m.e_tag.clone(), m.last_modified)))
            })
            .cloned()
            .collect();
        let objects = &self.objects;
        let read: Vec<Result<Option<(DoneRecord, object_store::UpdateVersion)>>> = futures::stream::iter(stale.clone())
            .map(move |k| async move { objects.get_json::<DoneRecord>(&k).await })
            .buffered(16)
            .collect()
            .await;
        // Every record read is kept before a failed read is returned: the
        // next poll reads only what failed.
        let mut failed = None;
        for (k, got) in stale.into_iter().zip(read) {
            let got = match got {
                Ok(got) => got,
                Err(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
            };
            match got {
                Some((d, _)) => {
                    let m = by_key.get(k.as_ref()).map(|m| (m.e_tag.clone(), m.last_modified));
                    if let Some(version) = m {
                        seen.0.insert(k.to_string(), (version, d));
                    }
                }
                // Listed, then gone: missing after all.
                None => {
                    seen.0.remove(k.as_ref());
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let mut shards = Vec::with_capacity(keys.len());
        for (r, key) in keys.iter().enumerate() {
            match seen.0.get(key.as_ref()).map(|(_, d)| d) {
                Some(d) if d.iterations == iterations && d.world_size == world && d.rank == r && d.run == run => shards.push(d.clone()),
                // Another run's record (a dead launch's) is not this run's shard.
                Some(d) if d.run != run => {
                    return Err(Error::ShardMissing { iterations, rank: r, key: format!("{key} is run `{}`'s, not this run's", d.run) })
                }
                _ => return Err(Error::ShardMissing { iterations, rank: r, key: key.to_string() }),
            }
        }
        // Each shard named must exist with its size: the done-record follows its shard.
        for d in &shards {
            let key = self.objects.stored_key(&d.key)?;
            if by_key.get(key.as_ref()).is_none_or(|meta| meta.size != d.size) {
                return Err(Error::ShardMissing { iterations, rank: d.rank, key: d.key.clone() });
            }
        }
        Ok(shards)
    }

    /// Write the manifest that commits step `iterations` of `shards`
    /// (create-if-absent), then `LATEST` and the backup: the new manifest,
    /// or `None` when the same shards were committed already.
    async fn publish(
        &self,
        iterations: u64,
        shards: Vec<DoneRecord>,
        loss: Option<f64>,
        tried: &mut PutTried,
    ) -> Result<Option<GlobalManifest>> {
        let world_size = shards.len();
        if let Some(problem) = inconsistency(&shards) {
            return Err(Error::ShardInconsistent { iterations, detail: problem });
        }
        let lowest = self.lowest().await?;
        let decision = loss.map(|l| crate::policy::state::backup_rule(&[l], lowest));
        let mut manifest = GlobalManifest {
            format: SHARDED_FORMAT,
            model: self.model.clone(),
            iterations,
            world_size,
            created: chrono::Utc::now().to_rfc3339(),
            shards,
            loss,
            lowest: decision.map_or(lowest, |d| d.lowest),
        };
        let key = self.layout.manifest(iterations);
        let json = to_json(&key, &manifest, true)?;
        let retried = std::mem::replace(&mut tried.0, true);
        match self.objects.put_if("commit global manifest", &key, json, PutMode::Create).await? {
            Put::Written => {}
            // Committed already: by a racing coordinator of this run (the
            // same shards), or by another run (a job resumed from an older
            // step saving over a committed one), which must not pass silently.
            Put::Lost => {
                let existing = self.objects.get_json::<GlobalManifest>(&key).await?.map(|(m, _)| m);
                let ours = |e: &GlobalManifest| e.shards.iter().map(|d| &d.key).eq(manifest.shards.iter().map(|d| &d.key));
                match existing {
                    // This commit's own earlier put, whose reply was lost:
                    // the step is committed by this coordinator after all.
                    Some(e) if ours(&e) && retried => manifest = e,
                    Some(e) if ours(&e) => return Ok(None),
                    _ => return Err(Error::StepCommitted { iterations, key: key.to_string() }),
                }
            }
            Put::Unsupported => return Err(unsupported("commit global manifest", &key)),
        }
        *lock(&self.lowest) = Some(manifest.lowest);
        // The step exists now; `LATEST` is a hint (readers list manifests).
        if let Err(e) = self.objects.advance_latest(&self.layout.latest(), &self.layout.manifests(), &key, iterations).await {
            tracing::warn!(target: "modelio", "sharded step {iterations}: {}", e.report());
        }
        // The step is committed whatever happens to its backup.
        if decision.is_some_and(|d| d.backup) {
            let backup = self.layout.backup();
            let written = match to_json(&backup, &manifest, true) {
                Ok(json) => self.objects.put("write global backup", &backup, json).await,
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => self.stats.backups.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    tracing::error!(target: "modelio", "sharded step {iterations} is committed but not backed up: {}", e.report());
                    self.report_later(e);
                    self.stats.backups_failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        Ok(Some(manifest))
    }

    /// Commit the steps past the newest manifest that a dead launch wrote
    /// whole: every rank's done-record of one run other than this one (of
    /// its own world size) and every shard there, never committed because
    /// the launch died between its last record and its manifest. Each is
    /// committed as its own run saved it (no loss is known: no backup); a
    /// step this run writes is left to its coordinator. Every rank of a
    /// launch of several calls this before `open` returns, so none reads an
    /// older newest step than another: a new launch of the job means the
    /// run that wrote them is over. A single rank (a reader beside a live
    /// job, say) only commits steps whose records are older than its commit
    /// deadline, which a live coordinator would have committed by then. A
    /// step whose objects are all older than the newest manifest is never
    /// taken back: the run that committed that manifest went on past it.
    /// A damaged record is skipped with a warning. Returns the steps
    /// committed here.
    pub(super) async fn recover(&self) -> Result<Vec<u64>> {
        // The newest committed step, and when its manifest was stored.
        let mut newest: Option<(u64, chrono::DateTime<chrono::Utc>)> = None;
        for meta in self.objects.list(&self.layout.manifests()).await? {
            if let Some(n) = step_of(&meta.location) {
                if newest.is_none_or(|(m, _)| n > m) {
                    newest = Some((n, meta.last_modified));
                }
            }
        }
        let steps = self.layout.steps();
        // Only what follows the newest committed step is listed.
        let after = match newest {
            Some((n, _)) => match n.checked_add(1) {
                Some(next) => self.layout.step(next),
                None => return Ok(Vec::new()),
            },
            None => steps.clone(),
        };
        // Each later step: its newest object's time, and its ranks with a done-record.
        let mut candidates: BTreeMap<u64, (chrono::DateTime<chrono::Utc>, usize)> = BTreeMap::new();
        for meta in self.objects.list_after(&steps, &after).await? {
            let mut parts = meta.location.prefix_match(&steps).into_iter().flatten();
            let Some(n) = parts.next().and_then(|p| p.as_ref().parse::<u64>().ok()) else { continue };
            if newest.is_some_and(|(m, _)| n <= m) {
                continue;
            }
            let entry = candidates.entry(n).or_insert((meta.last_modified, 0));
            entry.0 = entry.0.max(meta.last_modified);
            if parts.next().is_some_and(|f| f.as_ref().starts_with("done-")) {
                entry.1 += 1;
            }
        }
        let settled = chrono::Duration::from_std(self.deadline).ok().and_then(|d| chrono::Utc::now().checked_sub_signed(d));
        let mut recovered = Vec::new();
        for (n, (modified, records)) in candidates {
            // Written before the newest commit: a step the run that
            // committed it went on past (resumed from an older one), never
            // to be taken back over it.
            if newest.is_some_and(|(_, committed)| modified <= committed) {
                continue;
            }
            if self.rank.world_size == 1 && settled.is_none_or(|s| modified > s) {
                continue;
            }
            // Rank 0's record names the run and its world size.
            let first = match self.objects.get_json::<DoneRecord>(&self.layout.done(n, 0)).await {
                Ok(Some((first, _))) => first,
                Ok(None) => continue,
                Err(e @ Error::RemoteDamaged { .. }) => {
                    tracing::warn!(target: "modelio", "sharded step {n} not recovered: {}", e.report());
                    continue;
                }
                Err(e) => return Err(e),
            };
            if first.run == self.run_id || first.iterations != n || first.world_size == 0 || first.world_size > records {
                continue;
            }
            let shards = match self.gather(n, &first.run, first.world_size, &mut Seen::default()).await {
                Ok(shards) => shards,
                Err(Error::ShardMissing { .. }) => continue,
                Err(e @ Error::RemoteDamaged { .. }) => {
                    tracing::warn!(target: "modelio", "sharded step {n} not recovered: {}", e.report());
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(problem) = inconsistency(&shards) {
                tracing::warn!(target: "modelio", "sharded step {n} of run `{}` is whole but not committed: {problem}", first.run);
                continue;
            }
            match self.publish(n, shards, None, &mut PutTried::default()).await {
                Ok(Some(_)) => {
                    tracing::info!(target: "modelio", "committed sharded step {n}, left whole but uncommitted by run `{}`", first.run);
                    self.stats.recovered.fetch_add(1, Ordering::Relaxed);
                    recovered.push(n);
                }
                // Another rank of this launch committed it first.
                Ok(None) | Err(Error::StepCommitted { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(recovered)
    }

    /// The lowest loss so far: from memory, else from the newest manifest.
    pub(super) async fn lowest(&self) -> Result<f64> {
        if let Some(l) = *lock(&self.lowest) {
            return Ok(l);
        }
        let l = self.latest().await?.map_or(0.0, |m| m.lowest);
        *lock(&self.lowest) = Some(l);
        Ok(l)
    }

    /// After step `m` was committed: its snapshot when one was requested
    /// (requests of older steps are over: those steps were not committed),
    /// then retention.
    pub(super) fn after_commit(&self, m: &GlobalManifest) {
        let (older, wanted) = {
            let mut q = lock(&self.queue);
            let later = m.iterations.checked_add(1).map(|k| q.snapshots.split_off(&k)).unwrap_or_default();
            let mut upto = std::mem::replace(&mut q.snapshots, later);
            let wanted = upto.remove(&m.iterations);
            (upto, wanted)
        };
        for n in older {
            self.snapshot_not_made(n, "the step was not committed");
        }
        if wanted {
            match self.run(self.write_snapshot(m)) {
                Ok(()) => {
                    self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.snapshot_not_made(m.iterations, &format!("{}", e.report())),
            }
        }
        if let Err(e) = self.run(self.retain()) {
            tracing::warn!(target: "modelio", "sharded retention: {}", e.report());
        }
    }

    pub(super) async fn write_snapshot(&self, m: &GlobalManifest) -> Result<()> {
        let key = self.layout.snapshot(m.iterations);
        match self.objects.put_if("write global snapshot", &key, to_json(&key, m, true)?, PutMode::Create).await? {
            Put::Written | Put::Lost => {}
            Put::Unsupported => return Err(unsupported("write global snapshot", &key)),
        }
        if self.snapshot_keep > 0 {
            let keys = self.objects.list_keys(&self.layout.snapshots()).await?;
            let excess = keys.len().saturating_sub(self.snapshot_keep);
            for k in keys.into_iter().take(excess) {
                let _ = self.objects.delete(&k).await;
            }
        }
        Ok(())
    }

    /// Steps that a backup or snapshot holds (retention keeps their shards).
    pub(super) async fn protected(&self) -> Result<Vec<u64>> {
        let mut steps: Vec<u64> = self.objects.list_keys(&self.layout.snapshots()).await?.iter().filter_map(step_of).collect();
        if let Some((b, _)) = self.objects.get_json::<GlobalManifest>(&self.layout.backup()).await? {
            steps.push(b.iterations);
        }
        Ok(steps)
    }

    /// Keep the newest `keep` committed steps (0 = all); delete a manifest
    /// before its step's objects, and the objects of steps older than the
    /// newest committed one that never got a manifest.
    pub(super) async fn retain(&self) -> Result<()> {
        let mut committed = BTreeMap::new();
        for key in self.objects.list_keys(&self.layout.manifests()).await? {
            if let Some(n) = step_of(&key) {
                committed.insert(n, key);
            }
        }
        let Some(&newest) = committed.keys().next_back() else { return Ok(()) };
        let pending: Vec<u64> = lock(&self.queue).commits.iter().map(|c| c.iterations).collect();
        let protected = self.protected().await?;
        let excess = if self.keep == 0 { 0 } else { committed.len().saturating_sub(self.keep) };
        let doomed: Vec<u64> = committed.keys().take(excess).copied().collect();
        for n in &doomed {
            if let Some(key) = committed.get(n) {
                let _ = self.objects.delete(key).await;
            }
        }
        // Step folders: doomed ones, and uncommitted ones older than the newest.
        let steps = self.layout.steps();
        let mut stale = Vec::new();
        for meta in self.objects.list(&steps).await? {
            let Some(n) = meta.location.prefix_match(&steps).and_then(|mut p| p.next()).and_then(|p| p.as_ref().parse::<u64>().ok()) else {
                continue;
            };
            let uncommitted_old = n < newest && !committed.contains_key(&n) && !pending.contains(&n);
            if (doomed.contains(&n) || uncommitted_old) && !protected.contains(&n) {
                stale.push(meta.location);
            }
        }
        for key in stale {
            let _ = self.objects.delete(&key).await;
        }
        Ok(())
    }

    /// The snapshot requested of step `n` was not made: counted, logged, and
    /// reported by the next `flush`.
    pub(super) fn snapshot_not_made(&self, n: u64, reason: &str) {
        self.stats.snapshots_failed.fetch_add(1, Ordering::Relaxed);
        let e = Error::ShardSnapshot { iterations: n, reason: reason.into() };
        tracing::error!(target: "modelio", "{e}");
        self.report_later(e);
    }

    /// Snapshot committed step `n` now, from its manifest; false when it was
    /// not committed or the snapshot could not be written (both reported).
    pub(super) fn snapshot_committed(&self, n: u64) -> bool {
        let made = self.run(async {
            match self.objects.get_json::<GlobalManifest>(&self.layout.manifest(n)).await? {
                Some((m, _)) => self.write_snapshot(&m).await.map(|()| true),
                None => Ok(false),
            }
        });
        match made {
            Ok(true) => {
                self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(false) => {
                self.snapshot_not_made(n, "the step was not committed");
                false
            }
            Err(e) => {
                self.snapshot_not_made(n, &format!("{}", e.report()));
                false
            }
        }
    }

    /// Requests left once nothing is being written or committed belong to
    /// steps that will never commit: report them.
    pub(super) fn settle_snapshots(&self) {
        let left = {
            let mut q = lock(&self.queue);
            if !q.is_idle() {
                return;
            }
            std::mem::take(&mut q.snapshots)
        };
        for n in left {
            self.snapshot_not_made(n, "the step was not committed");
        }
    }
}

/// The step a key under `manifests/` commits.
fn step_of(key: &object_store::path::Path) -> Option<u64> {
    key.filename().and_then(|f| f.strip_suffix(".json")).and_then(|n| n.parse().ok())
}

/// Done-records already read while committing a step, by key, with the
/// version (entity tag and time) they were read at.
#[derive(Default)]
pub(super) struct Seen(HashMap<String, (Version, DoneRecord)>, PutTried);

/// Whether this commit of a step has sent its manifest's put before: a
/// retry that finds the manifest there with its own shards finds its own
/// put, whose reply was lost.
#[derive(Default)]
pub(super) struct PutTried(bool);

/// An object's entity tag and time: a record rewritten since has another.
type Version = (Option<String>, chrono::DateTime<chrono::Utc>);
