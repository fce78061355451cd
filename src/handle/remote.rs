//! The handle's side of the remote tier, the one place the handle meets it:
//! connecting at open, a fresh machine's model pulled from it, the tier
//! started as the pipeline's [`Rider`], the save on disk offered for upload,
//! and the uploads left behind at shutdown. Without the `remote` feature
//! `no_remote.rs` stands here with the same calls, which do nothing.

use std::sync::Arc;
use std::time::Duration;

use super::ModelIo;
use crate::actors::Rider;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::folder::snapshot::Pinned;
use crate::folder::ModelPaths;
use crate::remote::status::RemoteStats;
use crate::remote::tier::{Tier, Upload};
use crate::remote::{Reason, Remote};

/// The remote tier of one handle, when `[remote]` is configured.
#[derive(Default)]
pub(super) struct Seam {
    /// Connected at open, until the tier takes it over.
    remote: Option<Remote>,
    tier: Option<Arc<Tier>>,
    /// The model on disk was just pulled from the remote: not offered back.
    restored: bool,
}

impl Seam {
    /// Connect to the remote tier (before anything is written locally, so
    /// a bad URL or missing credentials change nothing).
    ///
    /// # Errors
    /// [`Error::ConfigValue`], [`Error::RemoteCredentials`].
    pub fn connect(config: &Config) -> Result<Seam> {
        let remote = match config.remote.enabled() {
            true => Some(Remote::connect(&config.remote, &config.model.name)?),
            false => None,
        };
        Ok(Seam { remote, ..Seam::default() })
    }

    /// On a fresh machine (`remote.restore`, no archive and no history in
    /// the folder, which this process holds locked), pull the newest remote
    /// checkpoint that verifies.
    ///
    /// # Errors
    /// [`Error::RemoteRestore`] when the remote cannot be read or holds only
    /// damaged checkpoints; local errors as themselves.
    pub fn restore_if_fresh(&mut self, config: &Config, paths: &ModelPaths, locked: bool, fresh: impl Fn() -> Result<bool>) -> Result<()> {
        if let (Some(remote), true) = (&self.remote, locked) {
            if config.remote.restore && fresh()? {
                self.restored = restore_from_remote(remote, paths)?;
            }
        }
        Ok(())
    }

    /// The tier that rides on the pipeline (none in predict mode).
    pub fn rider(&mut self, config: &Config, paths: &ModelPaths) -> Option<Arc<dyn Rider>> {
        let remote = self.remote.take().filter(|_| !config.model.predict)?;
        let tier = Arc::new(Tier::new(remote, config.remote.clone(), paths.clone()));
        self.tier = Some(tier.clone());
        Some(tier)
    }

    /// Offer the save on disk (of `iterations`; the last run may have
    /// stopped before uploading it) unless it was just restored from the
    /// remote. Called before any save is queued, so `pin` pins the committed files.
    pub fn catch_up(&self, iterations: u64, pin: impl Fn() -> Result<Vec<Pinned>>) {
        let Some(tier) = self.tier.as_ref().filter(|_| !self.restored) else { return };
        match pin() {
            Ok(pinned) => tier.offer(Upload { pinned, iterations, reason: Reason::CatchUp }),
            Err(e) => tracing::warn!(target: "modelio", "remote: could not pin the save on disk for upload: {}", e.report()),
        }
    }

    /// After the actors drained: give uploads `remote.drain_secs` to
    /// finish, then stop them. An upload still under way is reported.
    pub async fn drain(&self) -> Option<Error> {
        let tier = self.tier.clone()?;
        let t = tier.clone();
        let idle = tokio::task::spawn_blocking(move || t.wait_idle(Duration::from_secs(t.config.drain_secs))).await.unwrap_or(false);
        remote_behind(&tier, idle)
    }

    /// [`Seam::drain`], blocking the calling thread.
    pub fn drain_blocking(&self) -> Option<Error> {
        let tier = self.tier.as_ref()?;
        let idle = tier.wait_idle(Duration::from_secs(tier.config.drain_secs));
        remote_behind(tier, idle)
    }
}

/// What the remote tier adds to the handle's API.
impl ModelIo {
    /// The remote tier's counters (`None` without `[remote]`, or in predict mode).
    pub fn remote_stats(&self) -> Option<RemoteStats> {
        self.remote.tier.as_ref().map(|t| t.stats())
    }

    /// Wait until the remote tier has uploaded every committed save offered
    /// to it so far (or was idle), at most `timeout`; true when it has.
    /// Blocks the calling thread.
    pub fn wait_remote_blocking(&self, timeout: Duration) -> bool {
        self.remote.tier.as_ref().is_none_or(|t| t.wait_idle(timeout))
    }

    /// Test hook: make every upload to the remote tier sleep first.
    #[doc(hidden)]
    pub fn set_upload_delay(&self, delay: Duration) {
        if let Some(t) = &self.remote.tier {
            t.set_delay(delay);
        }
    }
}

/// Stop the remote tier's uploads unless it drained (`idle`), reporting the
/// upload left behind and its last failure.
fn remote_behind(tier: &Tier, idle: bool) -> Option<Error> {
    if idle {
        return None;
    }
    let stats = tier.stats();
    tier.stop();
    Some(Error::RemoteBehind {
        location: stats.location,
        iterations: stats.pending.unwrap_or_default(),
        waited_secs: tier.config.drain_secs,
        last_error: stats.last_error.unwrap_or_else(|| "none; it was still uploading".into()),
    })
}

/// Pull the newest remote checkpoint that verifies into the empty model
/// folder `paths`; a damaged one is skipped for the one before it. Returns
/// whether one was pulled (false: the remote holds none).
fn restore_from_remote(remote: &Remote, paths: &ModelPaths) -> Result<bool> {
    // Only the store's failures are "could not be read"; a full disk, a
    // local error, refused credentials and a missing bucket are reported as
    // themselves (each names its cause and what to do).
    let unreadable = |e: Error| match e {
        Error::Remote { .. } => {
            Error::RemoteRestore { dir: paths.dir.clone(), location: remote.location().to_string(), source: Box::new(e) }
        }
        other => other,
    };
    let mut all = remote.list().map_err(unreadable)?;
    let mut damaged = Vec::new();
    while let Some(m) = all.pop() {
        match remote.pull(&m, paths) {
            Ok(()) => {
                tracing::info!(target: "modelio", "restored iteration {} from {} ({})", m.iterations, remote.location(), m.id());
                for (id, e) in &damaged {
                    tracing::warn!(target: "modelio", "skipped remote checkpoint {id}, which does not verify: {}", Error::report(e));
                }
                return Ok(true);
            }
            Err(e @ (Error::RemoteDamaged { .. } | Error::Damaged { .. })) => damaged.push((m.id(), e)),
            Err(e) => return Err(unreadable(e)),
        }
    }
    // Checkpoints exist but none verifies: starting from scratch would be
    // silent data loss, so refuse (remote.restore = false starts afresh).
    match damaged.into_iter().next() {
        Some((_, newest)) => {
            Err(Error::RemoteRestore { dir: paths.dir.clone(), location: remote.location().to_string(), source: Box::new(newest) })
        }
        None => Ok(false),
    }
}
