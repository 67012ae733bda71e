//! CPU and memory of every platform process during a bench step, from `/proc`.
//!
//! Each watched process is found through the runner's pid file (and only counts while its command
//! line still names it, as `down` checks). A component is its process TREE: PostgreSQL's
//! postmaster with all its backends, a JVM with whatever it forks. CPU of a tree is the sum of
//! `utime + stime + cutime + cstime` (`/proc/<pid>/stat`) over its live processes: a backend that
//! exits during the step moves its time into its parent's `cutime`, so the difference of two
//! samples counts every tick spent in the window exactly once. CPU is reported in percent of ONE
//! core (200 % = both cores of a 2-core machine); the machine's overall busy share from
//! `/proc/stat` in percent of all cores.
//!
//! Memory is the tree's resident set at the end of the step: the sum of private and file-backed
//! resident pages (`RssAnon + RssFile` of `/proc/<pid>/status`) plus the largest `RssShmem` of
//! any one process — PostgreSQL's shared buffers are mapped by every backend and would otherwise
//! be counted once per backend.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;

use crate::components::registry;
use crate::ctx::Ctx;
use crate::process;
use crate::services::SERVICES;

/// Kernel clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`: 100 on every Linux ABI xtask
/// runs on; the kernel converts to it whatever `HZ` it was built with).
const TICKS_PER_SECOND: f64 = 100.0;

/// One process the bench reports on.
#[derive(Debug, Clone)]
pub struct Watched {
    /// `gateway`, `payment`, ..., `pg`, `kafka`, ..., `bench` (this process: the load generator).
    pub name: String,
    /// `None`: not running (no pid file, or the pid is no longer ours).
    pub pid: Option<u32>,
}

/// The services, every infrastructure component, and the generator itself.
pub fn watched(ctx: &Ctx) -> Vec<Watched> {
    let mut all = Vec::new();
    for s in &SERVICES {
        let name = s.name();
        let short = name.trim_start_matches("api-").trim_end_matches("-service");
        let pid = process::running_pid(&ctx.pid_file(&format!("svc-{name}")), s.binary());
        all.push(Watched { name: short.to_string(), pid });
    }
    for c in registry() {
        let pid = process::running_pid(&ctx.pid_file(c.name()), c.process_marker());
        all.push(Watched { name: c.name().to_string(), pid });
    }
    all.push(Watched { name: "bench".to_string(), pid: Some(std::process::id()) });
    all
}

/// One process's line of `/proc/<pid>/stat`, the fields we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatLine {
    pub ppid: u32,
    /// `utime + stime + cutime + cstime`, in clock ticks.
    pub ticks: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may contain
/// spaces and parentheses itself, so fields are counted after the LAST `)`.
pub fn parse_stat(text: &str) -> Option<StatLine> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<i64>().ok());
    let ppid = u32::try_from(field(4)?).ok()?;
    let ticks = [14, 15, 16, 17].iter().map(|&n| field(n).map(|t| t.max(0) as u64)).sum::<Option<u64>>()?;
    Some(StatLine { ppid, ticks })
}

/// Resident memory of one process, KiB, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rss {
    pub anon_kib: u64,
    pub file_kib: u64,
    pub shmem_kib: u64,
}

pub fn parse_status(text: &str) -> Option<Rss> {
    let kib = |key: &str| -> Option<u64> {
        text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    // Kernel threads have none of these; a process without RssAnon has no user memory to count.
    Some(Rss {
        anon_kib: kib("RssAnon:")?,
        file_kib: kib("RssFile:").unwrap_or(0),
        shmem_kib: kib("RssShmem:").unwrap_or(0),
    })
}

/// The tree's resident set: private + file pages of each, shared memory once (the largest).
pub fn tree_rss_kib(members: &[Rss]) -> u64 {
    members.iter().map(|r| r.anon_kib + r.file_kib).sum::<u64>()
        + members.iter().map(|r| r.shmem_kib).max().unwrap_or(0)
}

/// `root` and all its descendants, given every live process's parent.
pub fn tree(root: u32, parents: &HashMap<u32, u32>) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            out.extend(kids.iter().copied().filter(|k| *k != root));
        }
        i += 1;
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `(busy, total)` jiffies of all cores from the first line of `/proc/stat`; idle and iowait are
/// not busy.
pub fn parse_cpu_totals(proc_stat: &str) -> Option<(u64, u64)> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice].
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Percent of one core: `ticks` clock ticks over `seconds` of wall time.
pub fn cpu_percent(ticks: u64, seconds: f64) -> Option<f64> {
    (seconds > 0.0).then(|| ticks as f64 / TICKS_PER_SECOND / seconds * 100.0)
}

/// A sample of every watched tree at one moment.
pub struct Snapshot {
    at: Instant,
    /// Per watched process (same order): the tree's ticks and resident KiB.
    trees: Vec<Option<(u64, u64)>>,
    machine: Option<(u64, u64)>,
}

/// Reads `/proc` once: all processes' parents, then each watched tree's ticks and memory.
pub fn snapshot(watched: &[Watched]) -> Snapshot {
    let at = Instant::now();
    let mut stats: HashMap<u32, StatLine> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(line) =
                std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().as_deref().and_then(parse_stat)
            {
                stats.insert(pid, line);
            }
        }
    }
    let parents: HashMap<u32, u32> = stats.iter().map(|(&pid, s)| (pid, s.ppid)).collect();
    let trees = watched
        .iter()
        .map(|w| {
            let root = w.pid.filter(|pid| stats.contains_key(pid))?;
            let members = tree(root, &parents);
            let ticks = members.iter().filter_map(|pid| stats.get(pid)).map(|s| s.ticks).sum();
            let rss: Vec<Rss> = members
                .iter()
                .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
                .filter_map(|text| parse_status(&text))
                .collect();
            Some((ticks, tree_rss_kib(&rss)))
        })
        .collect();
    let machine = std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(parse_cpu_totals);
    Snapshot { at, trees, machine }
}

/// One component's share of a step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessUsage {
    pub name: String,
    pub pid: Option<u32>,
    /// Percent of one core over the step; `None`: not running.
    pub cpu_percent: Option<f64>,
    /// Resident MiB at the end of the step; `None`: not running.
    pub rss_mib: Option<f64>,
}

/// What happened between two snapshots: per watched tree, and the machine's busy percent.
pub fn between(watched: &[Watched], a: &Snapshot, b: &Snapshot) -> (Vec<ProcessUsage>, Option<f64>) {
    let seconds = b.at.duration_since(a.at).as_secs_f64();
    let usage = watched
        .iter()
        .zip(a.trees.iter().zip(&b.trees))
        .map(|(w, (before, after))| {
            let (cpu_percent, rss_mib) = match (before, after) {
                (Some((t0, _)), Some((t1, rss))) => {
                    (cpu_percent(t1.saturating_sub(*t0), seconds), Some(*rss as f64 / 1024.0))
                }
                (None, Some((_, rss))) => (None, Some(*rss as f64 / 1024.0)),
                _ => (None, None),
            };
            ProcessUsage { name: w.name.clone(), pid: w.pid, cpu_percent, rss_mib }
        })
        .collect();
    let machine = match (a.machine, b.machine) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            Some(busy1.saturating_sub(busy0) as f64 / (total1 - total0) as f64 * 100.0)
        }
        _ => None,
    };
    (usage, machine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A name with spaces and a parenthesis, as `postgres: walwriter` or `(sd-pam)` have.
        let line = "4242 (postgres: x) y) S 4200 4242 4242 0 -1 4194560 500 0 0 0 150 50 7 3 20 0 1 0 100 \
                    200000000 5000 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(line), Some(StatLine { ppid: 4200, ticks: 150 + 50 + 7 + 3 }));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (init) S"), None);
    }

    #[test]
    fn memory_counts_shared_buffers_once() {
        let status = "Name:\tpostgres\nVmRSS:\t  150000 kB\nRssAnon:\t    4000 kB\nRssFile:\t    6000 kB\nRssShmem:\t  140000 kB\n";
        let rss = parse_status(status).unwrap();
        assert_eq!(rss, Rss { anon_kib: 4000, file_kib: 6000, shmem_kib: 140_000 });
        assert_eq!(parse_status("Name:\tkthreadd\n"), None);
        let backend = Rss { anon_kib: 1000, file_kib: 2000, shmem_kib: 100_000 };
        assert_eq!(tree_rss_kib(&[rss, backend, backend]), 4000 + 6000 + 2 * 3000 + 140_000);
        assert_eq!(tree_rss_kib(&[]), 0);
    }

    #[test]
    fn a_tree_is_the_root_and_every_descendant() {
        // 10 → 11, 12; 12 → 13; 20 is someone else's; 1 is init.
        let parents = HashMap::from([(10, 1), (11, 10), (12, 10), (13, 12), (20, 1), (1, 0)]);
        assert_eq!(tree(10, &parents), vec![10, 11, 12, 13]);
        assert_eq!(tree(13, &parents), vec![13]);
        assert_eq!(tree(99, &parents), vec![99]);
    }

    #[test]
    fn machine_busy_share_and_per_core_percent() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        assert_eq!(parse_cpu_totals(stat), Some((150, 1000)));
        assert_eq!(parse_cpu_totals("intr 1 2 3\n"), None);
        assert_eq!(cpu_percent(150, 1.0), Some(150.0), "1.5 cores busy for a second");
        assert_eq!(cpu_percent(100, 0.0), None);
    }
}
