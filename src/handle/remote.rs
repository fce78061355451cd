//! The handle's side of the remote tier: a fresh machine's model pulled
//! from it at open, and the uploads left behind at shutdown.

use crate::error::{Error, Result};
use crate::folder::ModelPaths;

/// Stop the remote tier's uploads unless it drained (`idle`), reporting the
/// upload left behind and its last failure.
#[cfg(feature = "remote")]
pub(super) fn remote_behind(tier: &crate::remote::tier::Tier, idle: bool) -> Option<Error> {
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
#[cfg(feature = "remote")]
pub(super) fn restore_from_remote(remote: &crate::remote::Remote, paths: &ModelPaths) -> Result<bool> {
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
