//! What a bench run found: one [`StepResult`] per rate of the ramp, the decisions made on them
//! (sustainable? latency goal held? stop the ramp?), the summary, the printed table and the JSON.
//!
//! Definitions (SPEC §11):
//! - a step is SUSTAINABLE when the platform took what was offered and settled what it took:
//!   accepted/s ≥ 95 % of offered/s and settled/s ≥ 95 % of accepted/s;
//! - the LATENCY GOAL holds when POST p99 ≤ 50 ms (due time → answer, every answer) and the
//!   server-side accepted → terminal p99 ≤ 500 ms, on a sustainable step (a platform that refuses
//!   most payments answers fast, which proves nothing);
//! - the ramp STOPS after a step where settled/s < 50 % of accepted/s (payments stopped
//!   settling) or accepted/s < 50 % of offered/s (most payments refused or not sent), or after
//!   two steps in a row that missed the latency goal.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::pgbench::PgbenchResult;
use super::procs::ProcessUsage;
use crate::load::stats::{ConservationLine, Machine};

pub const POST_P99_GOAL_MS: f64 = 50.0;
pub const SETTLE_P99_GOAL_MS: f64 = 500.0;
/// Sustainable: accepted ≥ this share of offered, settled ≥ this share of accepted.
pub const SUSTAINED_SHARE: f64 = 0.95;
/// Below this share (settled of accepted, or accepted of offered) the ramp stops at once.
pub const COLLAPSE_SHARE: f64 = 0.5;
/// Steps in a row missing the latency goal after which the ramp stops.
pub const LATENCY_MISSES_TO_STOP: usize = 2;
/// SPEC §11's throughput goal, settled payments per second.
pub const SPEC_SETTLED_PER_S: f64 = 1000.0;

/// One step of the ramp.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepResult {
    /// The offered rate asked for, payments/s.
    pub rate: f64,
    pub secs: u64,
    pub offered: u64,
    /// Due but not sent: the client's concurrency limit was reached.
    pub not_sent: u64,
    pub accepted: u64,
    /// Load payments that became terminal during the step (server-side, any creation time).
    pub settled: u64,
    /// Of those, FAILED.
    pub failed: u64,
    pub offered_per_s: f64,
    pub accepted_per_s: f64,
    pub settled_per_s: f64,
    /// POST latency from the due time to the answer, every answer (202 or not).
    pub post_p50_ms: Option<f64>,
    pub post_p99_ms: Option<f64>,
    /// Server-side `updated_at − created_at` of the payments settled in the step.
    pub settle_p50_ms: Option<f64>,
    pub settle_p99_ms: Option<f64>,
    /// POST errors by `"<HTTP status> <problem code>"` (`0 …`: no HTTP answer).
    pub errors: BTreeMap<String, u64>,
    /// The whole machine's busy share, percent of all cores.
    pub machine_cpu_percent: Option<f64>,
    pub processes: Vec<ProcessUsage>,
    pub sustainable: bool,
    pub latency_goal: bool,
}

impl StepResult {
    /// Fills `sustainable` and `latency_goal` from the measured numbers.
    pub fn decide(mut self) -> StepResult {
        self.sustainable = is_sustainable(self.offered_per_s, self.accepted_per_s, self.settled_per_s);
        self.latency_goal = self.sustainable && latency_held(self.post_p99_ms, self.settle_p99_ms);
        self
    }
}

pub fn is_sustainable(offered_per_s: f64, accepted_per_s: f64, settled_per_s: f64) -> bool {
    accepted_per_s > 0.0
        && accepted_per_s >= SUSTAINED_SHARE * offered_per_s
        && settled_per_s >= SUSTAINED_SHARE * accepted_per_s
}

pub fn latency_held(post_p99_ms: Option<f64>, settle_p99_ms: Option<f64>) -> bool {
    matches!((post_p99_ms, settle_p99_ms), (Some(post), Some(settle)) if post <= POST_P99_GOAL_MS && settle <= SETTLE_P99_GOAL_MS)
}

/// Why the ramp stops after the last of `steps`, if it does.
pub fn stop_reason(steps: &[StepResult]) -> Option<String> {
    let last = steps.last()?;
    if last.settled_per_s < COLLAPSE_SHARE * last.accepted_per_s {
        return Some(format!(
            "payments stopped settling at {} /s: settled {:.1}/s < {:.0} % of accepted {:.1}/s",
            fmt_rate(last.rate),
            last.settled_per_s,
            COLLAPSE_SHARE * 100.0,
            last.accepted_per_s
        ));
    }
    if last.accepted_per_s < COLLAPSE_SHARE * last.offered_per_s {
        return Some(format!(
            "most payments refused or not sent at {} /s: accepted {:.1}/s < {:.0} % of offered {:.1}/s",
            fmt_rate(last.rate),
            last.accepted_per_s,
            COLLAPSE_SHARE * 100.0,
            last.offered_per_s
        ));
    }
    let misses = steps.iter().rev().take_while(|s| !s.latency_goal).count();
    (misses >= LATENCY_MISSES_TO_STOP).then(|| {
        format!("latency goal missed {misses} steps in a row (POST p99 ≤ {POST_P99_GOAL_MS} ms, settlement p99 ≤ {SETTLE_P99_GOAL_MS} ms)")
    })
}

/// The ramp's conclusions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The highest offered rate of a sustainable step.
    pub max_sustainable_rate: Option<f64>,
    /// Settled/s of that step.
    pub max_sustainable_settled_per_s: Option<f64>,
    /// The highest offered rate of a step that met the latency goal (sustainable too).
    pub latency_goal_max_rate: Option<f64>,
    /// The most settled/s of any step.
    pub max_settled_per_s: f64,
    pub pgbench_tps: Option<f64>,
    /// `max_settled_per_s / pgbench_tps`.
    pub settled_per_pgbench_tps: Option<f64>,
    /// SPEC §11: ≥ 1,000 settled payments/s sustained.
    pub spec_throughput_met: bool,
    /// SPEC §11: settled/s ≥ pgbench TPS (unknown without pgbench).
    pub spec_pgbench_met: Option<bool>,
    /// SPEC §11: the latency goal at half the sustained rate — on the highest step at or below
    /// it (unknown when no step is).
    pub spec_latency_at_half_met: Option<bool>,
}

pub fn summarize(steps: &[StepResult], pgbench_tps: Option<f64>) -> Summary {
    let best = steps.iter().filter(|s| s.sustainable).max_by(|a, b| a.rate.total_cmp(&b.rate));
    let max_sustainable_rate = best.map(|s| s.rate);
    let latency_goal_max_rate = steps.iter().filter(|s| s.latency_goal).map(|s| s.rate).max_by(f64::total_cmp);
    let max_settled_per_s = steps.iter().map(|s| s.settled_per_s).max_by(f64::total_cmp).unwrap_or(0.0);
    let settled_per_pgbench_tps = pgbench_tps.filter(|t| *t > 0.0).map(|t| max_settled_per_s / t);
    let half = max_sustainable_rate
        .and_then(|max| steps.iter().filter(|s| s.rate <= max / 2.0).max_by(|a, b| a.rate.total_cmp(&b.rate)));
    Summary {
        max_sustainable_rate,
        max_sustainable_settled_per_s: best.map(|s| s.settled_per_s),
        latency_goal_max_rate,
        max_settled_per_s,
        pgbench_tps,
        settled_per_pgbench_tps,
        spec_throughput_met: best.is_some_and(|s| s.settled_per_s >= SPEC_SETTLED_PER_S),
        spec_pgbench_met: settled_per_pgbench_tps.map(|r| r >= 1.0),
        spec_latency_at_half_met: half.map(|s| s.latency_goal),
    }
}

/// Where and on what the run was measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Header {
    /// RFC 3339, UTC.
    pub date: String,
    pub unix_time: u64,
    pub git_commit: String,
    /// The work tree had uncommitted changes to tracked files.
    pub git_dirty: bool,
    pub profile: String,
    /// `release` or `debug`: which service binaries ran.
    pub build: String,
    pub target: String,
    pub machine: MachineInfo,
    pub postgres_fsync: String,
    pub postgres_synchronous_commit: String,
    pub config: Config,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineInfo {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub load_average_at_start: String,
}

impl From<&Machine> for MachineInfo {
    fn from(m: &Machine) -> Self {
        MachineInfo {
            cpu: m.cpu.clone(),
            cores: m.cores,
            memory_gib: (m.memory_gib * 10.0).round() / 10.0,
            kernel: m.kernel.clone(),
            load_average_at_start: m.load_average.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub rates: Vec<f64>,
    pub step_secs: u64,
    pub accounts: usize,
    pub concurrency: usize,
    pub seed: u64,
    pub pgbench_secs: Option<u64>,
    pub pgbench_clients: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conservation {
    pub before: String,
    pub after: String,
    pub opening: String,
    pub ledger_mismatches: i64,
    pub holds: bool,
    /// Load payments of the run still PENDING when the after-audit ran.
    pub pending_at_end: u64,
}

impl Conservation {
    pub fn new(line: &ConservationLine, pending_at_end: u64) -> Conservation {
        Conservation {
            before: line.before.clone(),
            after: line.after.clone(),
            opening: line.opening.clone(),
            ledger_mismatches: line.ledger_mismatches,
            holds: line.holds(),
            pending_at_end,
        }
    }
}

/// Everything `latest.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub schema: &'static str,
    #[serde(flatten)]
    pub header: Header,
    pub pgbench: Option<PgbenchResult>,
    pub steps: Vec<StepResult>,
    /// Why the ramp ended before its last rate (`None`: it ran every rate).
    pub stopped: Option<String>,
    pub summary: Summary,
    /// Where PostgreSQL spent the ramp (`pg_stat_statements`, most time first); `None` when the
    /// server does not preload it.
    pub statements: Option<Vec<crate::bench::server::Statement>>,
    pub conservation: Conservation,
}

pub const SCHEMA: &str = "securepay-bench/1";

pub fn to_json(report: &Report) -> String {
    serde_json::to_string_pretty(report).expect("a bench report always serializes")
}

pub fn fmt_rate(rate: f64) -> String {
    if rate.fract() == 0.0 { format!("{rate:.0}") } else { format!("{rate}") }
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "–".to_string(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

pub fn header_text(h: &Header) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "== SecurePay bench ==");
    let _ = writeln!(
        w,
        "date        {}   commit {}{}   profile {}, {} build of the services",
        h.date,
        h.git_commit,
        if h.git_dirty { " (+ uncommitted changes)" } else { "" },
        h.profile,
        h.build
    );
    let m = &h.machine;
    let _ = writeln!(
        w,
        "machine     {} ({} cores), {:.1} GiB RAM, Linux {}; the platform runs on the same machine; load average at start {}",
        m.cpu, m.cores, m.memory_gib, m.kernel, m.load_average_at_start
    );
    let _ = writeln!(w, "postgres    fsync {}, synchronous_commit {}", h.postgres_fsync, h.postgres_synchronous_commit);
    let c = &h.config;
    let rates: Vec<String> = c.rates.iter().map(|r| fmt_rate(*r)).collect();
    let _ = writeln!(
        w,
        "ramp        {} /s, {} s each, against {}; {} load accounts, concurrency {}, seed {}; settlement measured \
         server-side (accepted payments are not polled)",
        rates.join(", "),
        c.step_secs,
        h.target,
        c.accounts,
        c.concurrency,
        c.seed
    );
    out
}

pub fn pgbench_text(p: &PgbenchResult) -> String {
    format!(
        "pgbench     TPC-B scale {}, {} clients, {} threads, {} s, prepared: {:.1} tps (without initial connection time){}{}",
        p.scale,
        p.clients,
        p.threads,
        p.duration_s,
        p.tps,
        p.latency_avg_ms.map(|l| format!(", latency avg {l:.2} ms")).unwrap_or_default(),
        p.failed_transactions.filter(|f| *f > 0).map(|f| format!(", {f} failed")).unwrap_or_default()
    )
}

/// The column titles of [`row_text`].
pub fn table_header() -> String {
    format!(
        "{:>6} {:>10} {:>10} {:>10} {:>15} {:>15}  {:<11} errors\n{:>6} {:>10} {:>10} {:>10} {:>15} {:>15}",
        "rate",
        "offered/s",
        "accepted/s",
        "settled/s",
        "POST p50/p99",
        "settle p50/p99",
        "verdict",
        "/s",
        "",
        "",
        "",
        "ms",
        "ms (server)"
    )
}

/// One step: the numbers row, then the per-process CPU/memory line.
pub fn row_text(s: &StepResult) -> String {
    let verdict = match (s.sustainable, s.latency_goal) {
        (true, true) => "ok",
        (true, false) => "slow",
        (false, _) => "NOT SUSTAINED",
    };
    let errors = if s.errors.is_empty() {
        "-".to_string()
    } else {
        s.errors.iter().map(|(e, n)| format!("{e} ×{n}")).collect::<Vec<_>>().join(", ")
    };
    let mut out = format!(
        "{:>6} {:>10.1} {:>10.1} {:>10.1} {:>15} {:>15}  {verdict:<11} {errors}",
        fmt_rate(s.rate),
        s.offered_per_s,
        s.accepted_per_s,
        s.settled_per_s,
        format!("{} / {}", ms(s.post_p50_ms), ms(s.post_p99_ms)),
        format!("{} / {}", ms(s.settle_p50_ms), ms(s.settle_p99_ms)),
    );
    let procs: Vec<String> = s
        .processes
        .iter()
        .map(|p| match (p.cpu_percent, p.rss_mib) {
            (Some(cpu), Some(rss)) => format!("{} {cpu:.0}%/{rss:.0}M", p.name),
            (None, Some(rss)) => format!("{} ?/{rss:.0}M", p.name),
            _ => format!("{} –", p.name),
        })
        .collect();
    let machine = s.machine_cpu_percent.map(|m| format!("  [machine {m:.0}% busy]")).unwrap_or_default();
    let _ = write!(out, "\n{:>6} cpu%/rss: {}{machine}", "", procs.join("  "));
    if s.failed > 0 {
        let _ = write!(out, "\n{:>6} {} of the settled payments FAILED", "", s.failed);
    }
    out
}

pub fn summary_text(report: &Report) -> String {
    let s = &report.summary;
    let mut out = String::new();
    let w = &mut out;
    let rate = |r: Option<f64>| r.map_or("none".to_string(), |r| format!("{} /s", fmt_rate(r)));
    let yes = |b: Option<bool>| match b {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "unknown",
    };
    if let Some(reason) = &report.stopped {
        let _ = writeln!(w, "ramp stopped: {reason}");
    }
    let _ = writeln!(
        w,
        "max sustainable rate    {}{}   (accepted ≥ 95 % of offered, settled ≥ 95 % of accepted)",
        rate(s.max_sustainable_rate),
        s.max_sustainable_settled_per_s.map(|v| format!(", {v:.1} settled/s")).unwrap_or_default()
    );
    let _ = writeln!(
        w,
        "latency goal held up to {}   (POST p99 ≤ {POST_P99_GOAL_MS} ms, settlement p99 ≤ {SETTLE_P99_GOAL_MS} ms, on a sustainable step)",
        rate(s.latency_goal_max_rate)
    );
    let _ = writeln!(
        w,
        "max settled/s           {:.1}{}",
        s.max_settled_per_s,
        match (s.pgbench_tps, s.settled_per_pgbench_tps) {
            (Some(tps), Some(ratio)) => format!("   ÷ pgbench {tps:.1} tps = {ratio:.2}"),
            _ => "   (pgbench skipped)".to_string(),
        }
    );
    let _ = writeln!(
        w,
        "SPEC §11                ≥ 1000 settled/s sustained: {}; settled/s ≥ pgbench TPS: {}; latency goal at half the sustained rate: {}{}",
        yes(Some(s.spec_throughput_met)),
        yes(s.spec_pgbench_met),
        yes(s.spec_latency_at_half_met),
        if report.header.build == "release" { "" } else { "  (SPEC's numbers are for release builds)" }
    );
    let c = &report.conservation;
    let _ = writeln!(
        w,
        "conservation            all load accounts' balances: before {}  after {}  opening {}  ledger mismatches {}  → {}{}",
        c.before,
        c.after,
        c.opening,
        c.ledger_mismatches,
        if c.holds { "holds" } else { "VIOLATED" },
        if c.pending_at_end > 0 {
            format!("  ({} payments still PENDING at the end)", c.pending_at_end)
        } else {
            String::new()
        }
    );
    if let Some(statements) = &report.statements {
        let settled: u64 = report.steps.iter().map(|s| s.settled).sum::<u64>().max(1);
        let _ = writeln!(w, "\nPostgreSQL time over the ramp (pg_stat_statements; per settled payment: calls, ms):");
        for s in statements {
            let query: String = s.query.chars().take(110).collect();
            let _ = writeln!(
                w,
                "  {:>7.2} calls {:>6.3} ms  {:>9.0} ms total  {:>7.3} ms mean  {query}",
                s.calls as f64 / settled as f64,
                s.total_ms / settled as f64,
                s.total_ms,
                s.mean_ms
            );
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A decided step with the given rates and latencies (ms).
    pub fn step(rate: f64, accepted: f64, settled: f64, post_p99: f64, settle_p99: f64) -> StepResult {
        StepResult {
            rate,
            secs: 30,
            offered: (rate * 30.0) as u64,
            not_sent: 0,
            accepted: (accepted * 30.0) as u64,
            settled: (settled * 30.0) as u64,
            failed: 0,
            offered_per_s: rate,
            accepted_per_s: accepted,
            settled_per_s: settled,
            post_p50_ms: Some(post_p99 / 3.0),
            post_p99_ms: Some(post_p99),
            settle_p50_ms: Some(settle_p99 / 3.0),
            settle_p99_ms: Some(settle_p99),
            errors: BTreeMap::new(),
            machine_cpu_percent: Some(70.0),
            processes: vec![ProcessUsage {
                name: "pg".into(),
                pid: Some(7),
                cpu_percent: Some(55.0),
                rss_mib: Some(180.0),
            }],
            sustainable: false,
            latency_goal: false,
        }
        .decide()
    }

    #[test]
    fn sustainable_means_taken_and_settled() {
        assert!(is_sustainable(100.0, 100.0, 100.0));
        assert!(is_sustainable(100.0, 95.0, 91.0), "95 % taken and 95 % of that settled still count");
        assert!(!is_sustainable(100.0, 94.0, 94.0), "5 % refused is too many");
        assert!(!is_sustainable(100.0, 100.0, 90.0), "a settlement backlog grows");
        assert!(!is_sustainable(0.0, 0.0, 0.0), "nothing accepted is not a throughput");
        // Settling the backlog of an earlier step can exceed the accepted rate: still sustainable.
        assert!(is_sustainable(100.0, 100.0, 120.0));
    }

    #[test]
    fn the_latency_goal_needs_both_p99s_and_a_sustainable_step() {
        assert!(latency_held(Some(50.0), Some(500.0)));
        assert!(!latency_held(Some(50.1), Some(100.0)));
        assert!(!latency_held(Some(10.0), Some(501.0)));
        assert!(!latency_held(Some(10.0), None), "nothing settled: no evidence");
        assert!(step(100.0, 100.0, 100.0, 20.0, 200.0).latency_goal);
        assert!(!step(100.0, 40.0, 40.0, 5.0, 100.0).latency_goal, "fast refusals do not count");
    }

    #[test]
    fn the_ramp_stops_on_collapse_at_once_and_on_latency_after_two_misses() {
        let ok = step(100.0, 100.0, 100.0, 20.0, 200.0);
        let slow = step(200.0, 200.0, 199.0, 80.0, 300.0);
        assert_eq!(stop_reason(&[]), None);
        assert_eq!(stop_reason(std::slice::from_ref(&ok)), None);
        assert_eq!(stop_reason(&[ok.clone(), slow.clone()]), None, "one slow step is not enough");
        assert_eq!(stop_reason(&[slow.clone(), ok.clone(), slow.clone()]), None, "misses must be in a row");
        let reason = stop_reason(&[ok.clone(), slow.clone(), slow.clone()]).unwrap();
        assert!(reason.contains("2 steps in a row"), "{reason}");
        let stuck = step(400.0, 400.0, 150.0, 20.0, 200.0);
        assert!(stop_reason(&[ok.clone(), stuck]).unwrap().contains("stopped settling"));
        let refused = step(800.0, 300.0, 300.0, 5.0, 100.0);
        assert!(stop_reason(&[ok, refused]).unwrap().contains("refused or not sent"));
    }

    #[test]
    fn the_summary_names_the_highest_sustainable_and_latency_rates() {
        let steps = [
            step(25.0, 25.0, 25.0, 10.0, 100.0),
            step(50.0, 50.0, 50.0, 12.0, 150.0),
            step(100.0, 100.0, 99.0, 30.0, 400.0),
            step(200.0, 199.0, 195.0, 70.0, 900.0),
            step(400.0, 390.0, 250.0, 900.0, 5000.0),
        ];
        let s = summarize(&steps, Some(500.0));
        assert_eq!(s.max_sustainable_rate, Some(200.0));
        assert_eq!(s.max_sustainable_settled_per_s, Some(195.0));
        assert_eq!(s.latency_goal_max_rate, Some(100.0));
        assert_eq!(s.max_settled_per_s, 250.0);
        assert_eq!(s.settled_per_pgbench_tps, Some(0.5));
        assert!(!s.spec_throughput_met);
        assert_eq!(s.spec_pgbench_met, Some(false));
        assert_eq!(s.spec_latency_at_half_met, Some(true), "at 100/s, half of 200/s, the goal held");
        let none = summarize(&[step(400.0, 100.0, 10.0, 900.0, 9000.0)], None);
        assert_eq!((none.max_sustainable_rate, none.latency_goal_max_rate), (None, None));
        assert_eq!(
            (none.settled_per_pgbench_tps, none.spec_pgbench_met, none.spec_latency_at_half_met),
            (None, None, None)
        );
    }

    pub fn report(steps: Vec<StepResult>) -> Report {
        let pgbench = PgbenchResult {
            tps: 800.0,
            scale: 10,
            clients: 8,
            threads: 2,
            duration_s: 60,
            transactions: Some(48_000),
            failed_transactions: Some(0),
            latency_avg_ms: Some(9.9),
        };
        let summary = summarize(&steps, Some(pgbench.tps));
        Report {
            schema: SCHEMA,
            header: Header {
                date: "2026-12-02T18:00:00Z".into(),
                unix_time: 1_796_234_400,
                git_commit: "0123456789abcdef0123456789abcdef01234567".into(),
                git_dirty: false,
                profile: "dev".into(),
                build: "release".into(),
                target: "http://127.0.0.1:8080".into(),
                machine: MachineInfo {
                    cpu: "Test CPU".into(),
                    cores: 2,
                    memory_gib: 23.5,
                    kernel: "6.18".into(),
                    load_average_at_start: "0.1 0.2 0.3".into(),
                },
                postgres_fsync: "on".into(),
                postgres_synchronous_commit: "on".into(),
                config: Config {
                    rates: steps.iter().map(|s| s.rate).collect(),
                    step_secs: 30,
                    accounts: 400,
                    concurrency: 256,
                    seed: 1,
                    pgbench_secs: Some(60),
                    pgbench_clients: Some(8),
                },
            },
            pgbench: Some(pgbench),
            steps,
            stopped: Some("latency goal missed 2 steps in a row".into()),
            summary,
            statements: None,
            conservation: Conservation {
                before: "400000.00".into(),
                after: "400000.00".into(),
                opening: "400000.00".into(),
                ledger_mismatches: 0,
                holds: true,
                pending_at_end: 0,
            },
        }
    }

    #[test]
    fn the_json_has_header_steps_summary_and_conservation() {
        let mut slow = step(200.0, 200.0, 199.0, 80.0, 300.0);
        slow.errors.insert("429 rate_limited".into(), 3);
        let json: serde_json::Value =
            serde_json::from_str(&to_json(&report(vec![step(100.0, 100.0, 100.0, 20.0, 200.0), slow]))).unwrap();
        assert_eq!(json["schema"], "securepay-bench/1");
        for key in ["date", "unix_time", "git_commit", "git_dirty", "profile", "build", "machine", "config"] {
            assert!(json.get(key).is_some(), "no {key} in {json}");
        }
        assert_eq!(json["machine"]["cores"], 2);
        assert_eq!(json["machine"]["cpu"], "Test CPU");
        assert_eq!(json["pgbench"]["tps"], 800.0);
        assert_eq!(json["steps"].as_array().unwrap().len(), 2);
        let step1 = &json["steps"][1];
        assert_eq!(step1["rate"], 200.0);
        assert_eq!(step1["settled_per_s"], 199.0);
        assert_eq!(step1["post_p99_ms"], 80.0);
        assert_eq!(step1["errors"]["429 rate_limited"], 3);
        assert_eq!(step1["sustainable"], true);
        assert_eq!(step1["latency_goal"], false);
        assert_eq!(step1["processes"][0]["name"], "pg");
        assert_eq!(step1["processes"][0]["rss_mib"], 180.0);
        assert_eq!(json["summary"]["max_sustainable_rate"], 200.0);
        assert_eq!(json["summary"]["latency_goal_max_rate"], 100.0);
        assert_eq!(json["summary"]["settled_per_pgbench_tps"], 199.0 / 800.0);
        assert_eq!(json["conservation"]["holds"], true);
        assert_eq!(json["stopped"], "latency goal missed 2 steps in a row");
    }

    #[test]
    fn rows_and_summary_print_the_numbers_and_verdicts() {
        let mut slow = step(200.0, 200.0, 199.0, 80.0, 300.0);
        slow.errors.insert("503 unavailable".into(), 2);
        let row = row_text(&slow);
        for want in [
            "   200",
            "200.0",
            "199.0",
            "26.7 / 80.0",
            "100 / 300",
            "slow",
            "503 unavailable ×2",
            "pg 55%/180M",
            "machine 70% busy",
        ] {
            assert!(row.contains(want), "row lacks {want:?}:\n{row}");
        }
        assert!(row_text(&step(25.0, 25.0, 25.0, 10.0, 100.0)).contains(" ok "));
        assert!(row_text(&step(800.0, 300.0, 300.0, 5.0, 100.0)).contains("NOT SUSTAINED"));
        let r = report(vec![step(100.0, 100.0, 100.0, 20.0, 200.0), slow]);
        let text = summary_text(&r);
        for want in [
            "max sustainable rate    200 /s, 199.0 settled/s",
            "latency goal held up to 100 /s",
            "÷ pgbench 800.0 tps = 0.25",
            "→ holds",
            "ramp stopped",
        ] {
            assert!(text.contains(want), "summary lacks {want:?}:\n{text}");
        }
        let header = header_text(&r.header);
        for want in [
            "Test CPU (2 cores), 23.5 GiB RAM, Linux 6.18",
            "commit 0123456789abcdef",
            "release build",
            "fsync on",
            "100, 200 /s, 30 s each",
        ] {
            assert!(header.contains(want), "header lacks {want:?}:\n{header}");
        }
        assert!(pgbench_text(r.pgbench.as_ref().unwrap()).contains("800.0 tps (without initial connection time)"));
    }
}
