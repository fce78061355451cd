//! CPU time spent by modelio's own threads: what a save takes from a
//! training loop whose cores are busy, apart from the stall itself.
//!
//! The process's CPU time (dead threads included) less the CPU time of every
//! living thread whose name does not start with `modelio-` (the caller's
//! thread, libtorch's pools): what remains is modelio's threads', living or
//! exited. A thread of someone else's that exited meanwhile would count as
//! modelio's, so the figure errs high, never low.

use std::collections::HashMap;

/// Name, user and system CPU seconds of one thread of this process, from
/// `/proc/self/task/<tid>/stat`.
fn thread_cpu(tid: &str) -> Option<(String, f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // "tid (comm) state ...": the name may hold spaces and parentheses.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let (user, system): (f64, f64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((name, user / hz, system / hz))
}

/// Every living thread's (name, user, system CPU seconds), by thread id.
fn threads() -> HashMap<String, (String, f64, f64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return HashMap::new() };
    dir.filter_map(|e| {
        let tid = e.ok()?.file_name().to_string_lossy().into_owned();
        Some((tid.clone(), thread_cpu(&tid)?))
    })
    .collect()
}

/// CPU seconds another process has used (its threads, living and exited).
pub fn process_cpu_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some(close) = stat.rfind(')') else { return 0.0 };
    let fields: Vec<&str> = stat.get(close + 2..).unwrap_or("").split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf takes no pointers.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// The whole process's CPU seconds, exited threads included.
fn process_cpu() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// A reading to measure modelio's CPU time from.
pub struct CpuClock {
    process: f64,
    threads: HashMap<String, (String, f64, f64)>,
}

impl CpuClock {
    pub fn start() -> CpuClock {
        CpuClock { threads: threads(), process: process_cpu() }
    }

    /// CPU seconds modelio's threads spent since [`CpuClock::start`], and
    /// the living ones' share by name: (name, user, system seconds).
    pub fn modelio_secs(&self) -> (f64, Vec<(String, f64, f64)>) {
        let total = process_cpu() - self.process;
        let (mut others, mut ours) = (0.0, std::collections::BTreeMap::<String, (f64, f64)>::new());
        for (tid, (name, user, system)) in threads() {
            let (u0, s0) = self.threads.get(&tid).map_or((0.0, 0.0), |t| (t.1, t.2));
            if name.starts_with("modelio-") {
                let e = ours.entry(name).or_default();
                *e = (e.0 + user - u0, e.1 + system - s0);
            } else {
                others += user - u0 + system - s0;
            }
        }
        ((total - others).max(0.0), ours.into_iter().map(|(n, (u, s))| (n, u, s)).collect())
    }
}
