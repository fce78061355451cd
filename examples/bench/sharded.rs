//! Sharded figures, each side by side with its reference in the same run:
//! a rank's save stall against a single process's save of the same state;
//! a rank's peak extra memory against its shard; a load on another number
//! of ranks than saved against a raw read of the same shard files.

use std::path::Path;
use std::time::Instant;

use modelio::config::{Config, CpuCopy};
use modelio::sharded::{Part, Plan, ShardedIo, Want};
use modelio::tensors::byte_len;
use modelio::{Adam, Optimizer, Result};
use tch::nn::VarStore;
use tch::Tensor;

use crate::bench::{evict, io_for, median, ms, rss_kib, settle, IoContext, Report};

/// Rank `rank` of `world` saving model `m` into the folder `dir`.
fn rank(dir: &Path, rank: usize, world: usize, run: &str) -> Result<ShardedIo> {
    let mut c = Config::default();
    c.model.dir = dir.to_path_buf();
    c.model.name = "m".into();
    c.staging.cpu_copy = CpuCopy::Immediate;
    c.shard.rank = Some(rank);
    c.shard.world_size = Some(world);
    c.shard.run_id = run.into();
    c.shard.keep = 2;
    ShardedIo::open(&c)
}

/// Peak extra resident memory of a rank over 10 saves of its shard (the
/// whole state, one rank), as a ratio to the shard, before anything else
/// maps memory. The shard streams to the folder in parts of
/// `remote.part_size_mib`, at most `remote.parts_in_flight` at once.
pub fn memory_phase(dir: &Path, vs: &VarStore, opt: &Adam, bytes: u64, r: &mut Report) -> Result<()> {
    let io = rank(dir, 0, 1, "memory")?;
    let base = rss_kib("VmRSS:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    for step in 1..=10 {
        let _ticket = io.save_vars(step, vs, Some(opt), &Plan::new())?;
    }
    io.flush(std::time::Duration::MAX)?;
    let peak = rss_kib("VmHWM:").max(rss_kib("VmRSS:"));
    r.insert("sharded_peak_extra_mem_ratio".into(), (peak.saturating_sub(base) * 1024) as f64 / bytes as f64);
    let parts = Config::default().remote;
    r.insert(
        "sharded_parts_in_flight_ratio".into(),
        (parts.part_size_mib * parts.parts_in_flight) as f64 * (1u64 << 20) as f64 / bytes as f64,
    );
    Ok(())
}

/// The stall and load figures.
pub fn run(work: &Path, reps: usize, vs: &VarStore, opt: &Adam, bytes: u64, r: &mut Report) -> Result<()> {
    // A rank's save (one rank of one: its shard is the whole state) and a
    // single process's save of the same VarStore and optimizer, alternated.
    let mut single = io_for(&work.join("single"), "bench", CpuCopy::Immediate)?;
    let io = rank(&work.join("sharded"), 0, 1, "stall")?;
    // One save each first: it allocates the staging buffers, which later
    // saves reuse. Then more repetitions than elsewhere: a stall is short,
    // and a memcpy's time swings from one save to the next.
    io.save_vars(0, vs, Some(opt), &Plan::new())?.wait_blocking()?;
    single.save(vs, Some(opt))?.wait_blocking()?;
    let (mut rank_stall, mut single_stall) = (vec![], vec![]);
    for rep in 0..2 * reps + 1 {
        for which in (0..2).map(|k| (k + rep) % 2) {
            settle();
            if which == 0 {
                let start = Instant::now();
                let ticket = io.save_vars(rep as u64 + 1, vs, Some(opt), &Plan::new())?;
                rank_stall.push(ms(start.elapsed()));
                ticket.wait_blocking()?;
            } else {
                single.record(1.0);
                let start = Instant::now();
                let ticket = single.save(vs, Some(opt))?;
                single_stall.push(ms(start.elapsed()));
                ticket.wait_blocking()?;
            }
        }
    }
    single.shutdown_blocking()?;
    drop(io);
    r.insert("sharded_rank_stall_ms".into(), median(rank_stall));
    r.insert("sharded_single_stall_ms".into(), median(single_stall));

    // Two ranks save the state split by rows; one rank loads it whole, from
    // disk, against a raw read of the two shard files.
    let dir = work.join("resharded");
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.extend(opt.state_tensors());
    let ranks = [rank(&dir, 0, 2, "load")?, rank(&dir, 1, 2, "load")?];
    for (i, io) in ranks.iter().enumerate() {
        let halves: Vec<(String, Tensor, usize, usize)> = tensors
            .iter()
            .map(|(n, t)| {
                let rows = t.size()[0] as usize;
                let (lo, hi) = (rows * i / 2, rows * (i + 1) / 2);
                (n.clone(), t.narrow(0, lo as i64, (hi - lo) as i64), lo, rows)
            })
            .collect();
        let parts: Vec<Part<'_>> = halves.iter().map(|(n, t, lo, rows)| Part::rows(n, t, *lo, *rows)).collect();
        io.save(1, &parts)?;
    }
    ranks[1].flush(std::time::Duration::MAX)?;
    ranks[0].flush(std::time::Duration::MAX)?;
    let [reader, _] = ranks;
    let m = reader.latest()?.ok_or(modelio::Error::Argument {
        arg: "sharded bench".into(),
        value: "no committed step".into(),
        allowed: "a step both ranks saved".into(),
    })?;
    let files: Vec<std::path::PathBuf> = m.shards.iter().map(|d| dir.join(&d.key)).collect();
    let wants: Vec<Want> = tensors.iter().map(|(n, _)| Want::whole(n)).collect();
    let (mut load, mut read) = (vec![], vec![]);
    // The two take turns going first (the disk's speed drifts).
    for rep in 0..reps {
        for which in (0..2).map(|k| (k + rep) % 2) {
            files.iter().for_each(|f| evict(f));
            let start = Instant::now();
            if which == 0 {
                let mut n = 0u64;
                for f in &files {
                    n += std::fs::read(f).at("read", f)?.len() as u64;
                }
                read.push(n as f64 / start.elapsed().as_secs_f64() / 1e9);
                continue;
            }
            let loaded = reader.load(&m, &wants)?;
            load.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
            let got: u64 = loaded.iter().map(|t| byte_len(t) as u64).sum();
            if got != bytes {
                return Err(modelio::Error::Argument {
                    arg: "sharded bench".into(),
                    value: format!("{got} bytes loaded"),
                    allowed: format!("the {bytes} bytes saved"),
                });
            }
        }
    }
    r.insert("sharded_load_gbps".into(), median(load));
    r.insert("sharded_raw_read_gbps".into(), median(read));
    Ok(())
}
