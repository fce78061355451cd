//! This run's id: where it comes from, and the coordinator's claim on it.

use object_store::PutMode;

use super::{Rank, Shared};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::remote::objects::{to_json, unsupported, Put};

/// This run's id: the same on every rank of one launch, new at each launch,
/// so that a step never mixes shards of two runs (a dead run's shard of a
/// step past the newest committed one would otherwise complete a restarted
/// run's step). In order: `shard.run_id`; `MODELIO_RUN_ID`; torchrun's
/// `TORCHELASTIC_RUN_ID` with its restart count; Slurm's `SLURM_JOB_ID` with
/// its step and restart count; a single rank makes one up. A job of several
/// ranks with none of these is refused ([`Error::RunIdMissing`]): its ranks
/// could not tell this launch from the last one.
pub(super) fn run_id(config: &Config, rank: Rank, env: impl Fn(&str) -> Option<String>) -> Result<String> {
    let env = |name: &str| env(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    if !config.shard.run_id.trim().is_empty() {
        return Ok(config.shard.run_id.trim().to_string());
    }
    if let Some(id) = env("MODELIO_RUN_ID") {
        return Ok(id);
    }
    // torchrun keeps its run id across the restarts of one job (and says
    // "none" when none was given); the restart count tells them apart.
    if let Some(id) = env("TORCHELASTIC_RUN_ID").filter(|id| id != "none") {
        return Ok(format!("torchelastic-{id}.{}", env("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into())));
    }
    // A Slurm job keeps its id when requeued and across the `srun` steps of
    // one batch script.
    if let Some(job) = env("SLURM_JOB_ID") {
        let step = env("SLURM_STEP_ID").unwrap_or_else(|| "-".into());
        let restart = env("SLURM_RESTART_COUNT").unwrap_or_else(|| "0".into());
        return Ok(format!("slurm-{job}.{step}.{restart}"));
    }
    if rank.world_size == 1 {
        return Ok(uuid::Uuid::new_v4().simple().to_string());
    }
    Err(Error::RunIdMissing { world_size: rank.world_size })
}

impl Shared {
    /// Record this run's id, create-if-absent: refused when an earlier
    /// launch's coordinator used it. `claim` is this open's own mark: a
    /// retried claim that finds it there finds its own put.
    pub(super) async fn claim_run(&self, claim: &str) -> Result<()> {
        let key = self.layout.run(&self.run_id);
        let record = serde_json::json!({
            "run": self.run_id,
            "world_size": self.rank.world_size,
            "created": chrono::Utc::now().to_rfc3339(),
            "claim": claim,
        });
        let json = to_json(&key, &record, true)?;
        match self.objects.put_if("record the run id", &key, json, PutMode::Create).await? {
            Put::Written => Ok(()),
            Put::Lost => match self.objects.get_json::<serde_json::Value>(&key).await? {
                Some((earlier, _)) if earlier.get("claim").and_then(|c| c.as_str()) == Some(claim) => Ok(()),
                _ => Err(Error::RunIdReused { run_id: self.run_id.clone(), key: key.to_string() }),
            },
            Put::Unsupported => Err(unsupported("record the run id", &key)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run_id` with an environment of `vars` only.
    fn id_with(configured: &str, world_size: usize, vars: &[(&str, &str)]) -> Result<String> {
        let mut c = Config::default();
        c.shard.run_id = configured.into();
        let env = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        run_id(&c, Rank { rank: 0, world_size }, env)
    }

    #[test]
    fn a_job_of_several_ranks_without_a_run_id_is_refused() {
        let e = id_with("", 3, &[]).unwrap_err();
        assert!(matches!(e, Error::RunIdMissing { world_size: 3 }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("shard.run_id") && text.contains("MODELIO_RUN_ID"), "{text}");
        // torchrun's placeholder is no id; blanks are none either.
        assert!(id_with(" ", 2, &[("TORCHELASTIC_RUN_ID", "none"), ("MODELIO_RUN_ID", "")]).is_err());
    }

    #[test]
    fn every_launch_gets_its_own_run_id() {
        assert_eq!(id_with("mine", 3, &[("MODELIO_RUN_ID", "env")]).unwrap(), "mine");
        assert_eq!(id_with("", 3, &[("MODELIO_RUN_ID", "env"), ("SLURM_JOB_ID", "7")]).unwrap(), "env");
        // torchrun keeps its run id when it restarts the workers; Slurm keeps
        // the job id when it requeues the job and across `srun` steps.
        let torch = |restart: &str| id_with("", 3, &[("TORCHELASTIC_RUN_ID", "j1"), ("TORCHELASTIC_RESTART_COUNT", restart)]).unwrap();
        assert_ne!(torch("0"), torch("1"));
        let slurm = |step: &str, restart: &str| {
            id_with("", 3, &[("SLURM_JOB_ID", "42"), ("SLURM_STEP_ID", step), ("SLURM_RESTART_COUNT", restart)]).unwrap()
        };
        assert_ne!(slurm("0", "0"), slurm("0", "1"));
        assert_ne!(slurm("0", "0"), slurm("1", "0"));
        // A single rank is its own run: a new id at each open.
        assert_ne!(id_with("", 1, &[]).unwrap(), id_with("", 1, &[]).unwrap());
    }
}
