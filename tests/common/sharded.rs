//! Ranks of a sharded job, opened in this process.

use std::path::Path;

use modelio::sharded::ShardedIo;
use modelio::Config;

/// Rank `rank` of `world` ranks of run `run`, saving model `m` of the
/// folder `dir` on `url` (the folder itself when empty); the coordinator
/// waits `deadline` seconds for a step's records.
pub fn rank_config(dir: &Path, url: &str, rank: usize, world: usize, run: &str, deadline: u64) -> Config {
    let mut c = super::config(dir, "m");
    c.remote.url = url.into();
    c.shard.rank = Some(rank);
    c.shard.world_size = Some(world);
    c.shard.run_id = run.into();
    c.shard.commit_deadline_secs = deadline;
    c
}

/// That rank, opened.
pub fn open_rank(dir: &Path, url: &str, rank: usize, world: usize, run: &str, deadline: u64) -> ShardedIo {
    ShardedIo::open(&rank_config(dir, url, rank, world, run, deadline)).unwrap()
}
