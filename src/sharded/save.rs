//! A rank's save, through the pipeline of a single process's saves: a
//! staging buffer set from the pool (`staging.max_inflight` sets, reused),
//! the copies started at the call (the immediate CPU copy by default, the
//! deferred one under the fence, non-blocking device-to-host copies into
//! pinned buffers with one event per GPU), landed and checksummed by the
//! rank's writer. Also the end of training: the exit save and the drain.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tch::nn::VarStore;

use super::plan::{items, Item, Plan};
use super::{lock, DoneRecord, Error, Job, Part, Result, ShardFinished, ShardSaved, ShardTicket, ShardedIo, Shared, Staged};
use crate::error::Work;
use crate::optim::Optimizer;
use crate::staging::{Fence, Lease};
use crate::tensors::{dtype_of, shape_of};

/// A staging buffer set for a save; `None`: the save is skipped.
type Leased = Option<Lease>;

impl ShardedIo {
    /// Save this rank's `parts` as step `iterations`, through the pipeline
    /// of [`ModelIo::save`](crate::ModelIo::save): a staging buffer set, the
    /// copies started at the call (with the default
    /// `staging.cpu_copy = "immediate"` about one memcpy of the parts; GPU
    /// tensors are queued as non-blocking copies into pinned buffers), the
    /// shard written in the background. When every buffer set is busy
    /// (`staging.max_inflight`, 1 by default: one save being written) the
    /// save waits for one (`staging.on_busy = "wait"`), or replaces the
    /// save waiting to be written, or is skipped (`"skip"`, counted in
    /// `skipped`; a step that some rank skipped is never committed). Never
    /// waits on another rank. A failure in the background is reported by
    /// the next [`ShardedIo::flush`].
    ///
    /// # Errors
    /// [`Error::UnsupportedDtype`], [`Error::DuplicateTensor`], [`Error::Argument`]
    /// for rows or a box outside the global shape, [`Error::Torch`].
    pub fn save(&self, iterations: u64, parts: &[Part<'_>]) -> Result<()> {
        self.save_parts(iterations, parts, None)
    }

    /// [`ShardedIo::save`] with the average loss since the last save. The
    /// coordinator's loss decides the global backup (the rule of local
    /// saves: the first loss sets the lowest, a strictly lower one makes
    /// that step the backup); other ranks' losses are not used.
    ///
    /// # Errors
    /// As [`ShardedIo::save`].
    pub fn save_with_loss(&self, iterations: u64, parts: &[Part<'_>], loss: f64) -> Result<()> {
        self.save_parts(iterations, parts, Some(loss))
    }

    fn save_parts(&self, iterations: u64, parts: &[Part<'_>], loss: Option<f64>) -> Result<()> {
        let started = Instant::now();
        let mut list = Vec::with_capacity(parts.len());
        for p in parts {
            let (region, global) = p.region(&shape_of(p.tensor))?;
            list.push(Item { name: p.name.to_string(), tensor: p.tensor.shallow_clone(), region, global });
        }
        let leased = self.take_lease(false)?;
        // Without a ticket, a failure waits for the next flush.
        drop(self.queue(iterations, list, loss, leased, started)?);
        Ok(())
    }

    /// Record one training iteration's loss: the average of those recorded
    /// since the last save goes with the next [`ShardedIo::save_vars`] (the
    /// coordinator's decides the global backup).
    pub fn record(&self, loss: f64) {
        lock(&self.shared.history).push(loss);
    }

    /// Save this rank's variables of `vs` and, when given, `optimizer`'s
    /// state under `plan` as step `iterations`: each variable whole
    /// (replicated: rank 0 saves it), whole and this rank's own, or a box
    /// of a global tensor; the optimizer's state tensors follow their
    /// parameter's place, its hyper-parameters and step count are saved by
    /// rank 0. Returns at once, as [`ShardedIo::save`], with a ticket for
    /// the outcome: on the coordinator once the step is committed, on other
    /// ranks once their shard and done-record are stored. The average of
    /// the losses [`ShardedIo::record`]ed since the last save goes with it.
    ///
    /// # Errors
    /// [`Error::Argument`] for a plan naming a variable `vs` does not hold
    /// or a box that does not fit; as [`ShardedIo::save`].
    pub fn save_vars(&self, iterations: u64, vs: &VarStore, optimizer: Option<&dyn Optimizer>, plan: &Plan) -> Result<ShardTicket> {
        self.save_vars_as(iterations, vs, optimizer, plan, false)
    }

    /// The exit save: as [`ShardedIo::save_vars`], but never skipped (it
    /// waits for a staging buffer set). Async loops end with
    /// [`ShardedIo::finish`], which makes it and drains.
    ///
    /// # Errors
    /// As [`ShardedIo::save_vars`].
    pub fn save_vars_exit(&self, iterations: u64, vs: &VarStore, optimizer: Option<&dyn Optimizer>, plan: &Plan) -> Result<ShardTicket> {
        self.save_vars_as(iterations, vs, optimizer, plan, true)
    }

    fn save_vars_as(
        &self,
        iterations: u64,
        vs: &VarStore,
        optimizer: Option<&dyn Optimizer>,
        plan: &Plan,
        exit: bool,
    ) -> Result<ShardTicket> {
        let started = Instant::now();
        let list = items(vs, optimizer, plan, self.shared.rank)?;
        let leased = self.take_lease(exit)?;
        let loss = self.shared.average_loss();
        self.queue(iterations, list, loss, leased, started)
    }

    /// [`ShardedIo::save_vars`] for async loops: when every staging buffer
    /// set is busy (and the save is not skipped), waits for one without
    /// blocking the runtime. The immediate copy of CPU tensors still runs on
    /// the calling thread.
    ///
    /// # Errors
    /// As [`ShardedIo::save_vars`].
    pub async fn save_vars_async(
        &self,
        iterations: u64,
        vs: &VarStore,
        optimizer: Option<&dyn Optimizer>,
        plan: &Plan,
    ) -> Result<ShardTicket> {
        self.save_vars_async_as(iterations, vs, optimizer, plan, false).await
    }

    async fn save_vars_async_as(
        &self,
        iterations: u64,
        vs: &VarStore,
        optimizer: Option<&dyn Optimizer>,
        plan: &Plan,
        exit: bool,
    ) -> Result<ShardTicket> {
        let started = Instant::now();
        let list = items(vs, optimizer, plan, self.shared.rank)?;
        let leased = self.take_lease_async(exit).await?;
        let loss = self.shared.average_loss();
        self.queue(iterations, list, loss, leased, started)
    }

    /// The fence that writers of saved tensors wait on with
    /// `staging.cpu_copy = "deferred"` (see [`Fence`]); with the default
    /// immediate copy it never holds anyone back.
    pub fn fence(&self) -> Fence {
        self.shared.fence.clone()
    }

    /// How many times a staging buffer had to grow (0 after the first save
    /// of a fixed-size state means every later save reused memory).
    pub fn buffer_growths(&self) -> u64 {
        self.shared.pool.growths()
    }

    /// [`ShardedIo::flush`] for async loops: waits on a blocking thread.
    ///
    /// # Errors
    /// As [`ShardedIo::flush`].
    pub async fn flush_async(&self, timeout: Duration) -> Result<bool> {
        let shared = self.shared.clone();
        let done = tokio::task::spawn_blocking(move || shared.wait_idle(timeout))
            .await
            .map_err(|e| Error::Internal { what: Work::ShardedSave, message: e.to_string() })?;
        match self.shared.failures.take() {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// End training: wait for the saves in flight, make the exit save of
    /// step `iterations` (never skipped; not made again when this rank of
    /// this run stored that step already, as a loop that saves and then
    /// stops does), wait until it is stored and committed, then stop this
    /// rank's workers. What the end of the loop or a signal-driven stop
    /// ([`crate::signals::cancel_on_signals`]) calls, on every rank with the
    /// same `iterations`. Every rank learns whether the step committed: the
    /// coordinator from its commit, the others by looking for the step's
    /// manifest until `shard.commit_deadline_secs` have passed
    /// ([`ShardSaved::committed`]; when it never appears,
    /// [`Error::StepNotCommitted`] is among the unreported failures). Does
    /// not block the runtime.
    ///
    /// # Errors
    /// The exit save's failure; the failures not reported yet are then logged.
    pub async fn finish(self, iterations: u64, vs: &VarStore, optimizer: Option<&dyn Optimizer>, plan: &Plan) -> Result<ShardFinished> {
        let shared = self.shared.clone();
        let wait = move || shared.wait_idle(Duration::MAX);
        let drained = tokio::task::spawn_blocking(wait.clone()).await;
        // Failures of the run not reported yet: the caller sees them all.
        let mut unreported: Vec<Error> = std::iter::from_fn(|| self.shared.failures.take()).collect();
        if let Err(e) = drained {
            unreported.push(Error::Internal { what: Work::ShardedSave, message: e.to_string() });
        }
        let shared = self.shared.clone();
        let stored = tokio::task::spawn_blocking(move || shared.run(shared.stored_already(iterations)))
            .await
            .map_err(|e| Error::Internal { what: Work::ShardedSave, message: e.to_string() })
            .and_then(|stored| stored);
        let saved = match stored {
            Ok(true) => Ok(ShardSaved {
                iterations,
                bytes: 0,
                stall: Duration::ZERO,
                copy: Duration::ZERO,
                write: Duration::ZERO,
                skipped: false,
                committed: false,
            }),
            Ok(false) => match self.save_vars_async_as(iterations, vs, optimizer, plan, true).await {
                Ok(ticket) => ticket.await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let _ = tokio::task::spawn_blocking(wait).await;
        unreported.extend(std::iter::from_fn(|| self.shared.failures.take()));
        let saved = match saved {
            Ok(mut saved) if !saved.committed => {
                // The coordinator's commit is over; another rank waits for it.
                let patience = if self.shared.rank.rank == 0 { Duration::ZERO } else { self.shared.deadline };
                let shared = self.shared.clone();
                let seen = tokio::task::spawn_blocking(move || shared.manifest_appears(iterations, patience)).await.unwrap_or(false);
                if seen {
                    saved.committed = true;
                } else {
                    unreported.push(Error::StepNotCommitted {
                        iterations,
                        key: self.shared.layout.manifest(iterations).to_string(),
                        secs: self.shared.deadline.as_secs(),
                    });
                }
                Ok(saved)
            }
            other => other,
        };
        // Every save is over: dropping the handle stops the workers at once.
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
        match saved {
            Ok(exit_save) => Ok(ShardFinished { exit_save, unreported }),
            Err(e) => {
                for u in &unreported {
                    tracing::error!(target: "modelio", "not reported before the exit save failed: {}", u.report());
                }
                Err(e)
            }
        }
    }

    fn refuse_reader(&self) -> Result<()> {
        if self.shared.reader {
            return Err(Error::Argument {
                arg: "ShardedIo::save".into(),
                value: "a handle opened with ShardedIo::open_reader".into(),
                allowed: "a handle opened with ShardedIo::open".into(),
            });
        }
        Ok(())
    }

    /// Whether a save finding every buffer set busy does not wait
    /// (`staging.on_busy = "skip"`; an exit save always waits).
    fn skips(&self, exit: bool) -> bool {
        !self.shared.wait_when_busy && !exit
    }

    /// A staging buffer set for a save, blocking the thread when it must wait.
    fn take_lease(&self, exit: bool) -> Result<Leased> {
        self.refuse_reader()?;
        Ok(match self.shared.pool.try_lease() {
            Some(l) => Some(l),
            None if self.skips(exit) => self.replace_waiting(),
            None => Some(self.shared.pool.lease()),
        })
    }

    /// [`ShardedIo::take_lease`] without blocking the runtime.
    async fn take_lease_async(&self, exit: bool) -> Result<Leased> {
        self.refuse_reader()?;
        Ok(match self.shared.pool.try_lease() {
            Some(l) => Some(l),
            None if self.skips(exit) => self.replace_waiting(),
            None => Some(self.shared.pool.lease_async().await),
        })
    }

    /// `staging.on_busy = "skip"` with every buffer set busy: the newest
    /// save replaces the one waiting to be written (whose set it takes), or
    /// is skipped when none waits.
    fn replace_waiting(&self) -> Leased {
        let waiting = lock(&self.shared.queue).job.cancel();
        let job = waiting?;
        self.shared.replaced(job);
        self.shared.pool.try_lease()
    }

    /// Queue a save of `list` into its buffer set: start its copies and
    /// hand it to the writer. A `None` lease means skipped.
    fn queue(&self, iterations: u64, list: Vec<Item>, loss: Option<f64>, leased: Leased, started: Instant) -> Result<ShardTicket> {
        // A NaN or infinite loss cannot be compared with the lowest: it is not used.
        let loss = match loss {
            Some(l) if !l.is_finite() => {
                tracing::warn!(target: "modelio", "sharded step {iterations}: loss {l} ignored for the backup rule");
                None
            }
            other => other,
        };
        let mut tensors = Vec::with_capacity(list.len());
        let mut staged = Vec::with_capacity(list.len());
        let mut names = HashSet::new();
        for Item { name, tensor, region, global } in list {
            let dtype = dtype_of(&name, tensor.kind())?;
            if !names.insert(name.clone()) {
                return Err(Error::DuplicateTensor { tensor: name });
            }
            staged.push(Staged { name, dtype, region, global });
            tensors.push(tensor);
        }
        let Some(lease) = leased else {
            self.shared.stats.skipped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "modelio", "sharded step {iterations} skipped: every staging buffer is busy (staging.on_busy = \"skip\")");
            lock(&self.shared.queue).last_saved = Some(iterations);
            return Ok(ShardTicket::ready(Ok(ShardSaved::skipped(iterations, started.elapsed()))));
        };
        let copies = crate::staging::start(tensors, lease, self.shared.cpu_copy, &self.shared.fence)?;
        let (ticket, reply) = ShardTicket::pending();
        let replaced = {
            let mut q = lock(&self.shared.queue);
            // With `staging.on_busy = "wait"` a save never replaces the one
            // waiting to be written: ranks that each dropped different steps
            // would never complete a step together. The writer takes the
            // waiting save as soon as it releases its buffers, so this wait
            // is short.
            while self.shared.wait_when_busy && q.job.waiting().is_some() && !q.stop {
                q = self.shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            q.last_saved = Some(iterations);
            let job = Job { iterations, tensors: staged, copies, loss, stall: started.elapsed(), reply: Some(reply) };
            q.job.offer(job)
        };
        self.shared.wake_writer();
        if let Some(job) = replaced {
            self.shared.replaced(job);
        }
        self.shared.wake.notify_all();
        Ok(ticket)
    }
}

impl Shared {
    /// A save replaced by a newer one before it was written: counted,
    /// its ticket told, its snapshot reported as not made.
    fn replaced(&self, job: Job) {
        self.stats.skipped.fetch_add(1, Ordering::Relaxed);
        let iterations = job.iterations;
        let snapshot_wanted = lock(&self.queue).snapshots.remove(&iterations);
        if let Some(reply) = job.reply {
            let _ = reply.send(Ok(ShardSaved::skipped(iterations, job.stall)));
        }
        if snapshot_wanted {
            self.snapshot_not_made(iterations, "its save was replaced by a newer one before it was written (staging.on_busy = \"skip\")");
        }
    }

    /// The average of the losses recorded since the last save, if any.
    fn average_loss(&self) -> Option<f64> {
        let losses = std::mem::take(&mut *lock(&self.history));
        (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64)
    }

    /// Whether this rank of this run stored step `iterations` already (its
    /// done-record is there).
    async fn stored_already(&self, iterations: u64) -> Result<bool> {
        let key = self.layout.done(iterations, self.rank.rank);
        Ok(self.objects.get_json::<DoneRecord>(&key).await?.is_some_and(|(d, _)| d.run == self.run_id && d.iterations == iterations))
    }

    /// Whether step `iterations`' manifest exists, looking again (100 ms,
    /// then up to 1 s apart) for at most `patience`.
    fn manifest_appears(&self, iterations: u64, patience: Duration) -> bool {
        let key = self.layout.manifest(iterations);
        let until = Instant::now().checked_add(patience).unwrap_or_else(Instant::now);
        let mut pause = Duration::from_millis(100);
        loop {
            if let Ok(Some(_)) = self.run(self.objects.head(&key)) {
                return true;
            }
            if Instant::now() + pause > until {
                return false;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}
