//! `cargo xtask bench`: how fast the RUNNING platform of a profile is (SPEC §11), measured
//! against a baseline from the same PostgreSQL.
//!
//! 1. [`pgbench`]: TPC-B in a scratch database (created and dropped), its TPS without the
//!    initial connection time (`--skip-pgbench` leaves it out).
//! 2. A ramp of the load generator (`crate::load`, open loop, polling off): for each rate of
//!    `--rates`, one load step of `--step-secs`; after each step the server's settlements in the
//!    step's window are counted in PostgreSQL ([`server`]) and the CPU and memory of every
//!    platform process are read from `/proc` ([`procs`]). The ramp stops early when payments stop
//!    settling or the latency goal is missed twice in a row ([`report::stop_reason`]).
//! 3. The conservation audit of the load accounts before and after the whole ramp; a broken one
//!    fails the command (after the report is written).
//! 4. The table on stdout, the JSON and the SVG picture in `<state dir>/bench/` (`bench-<unix
//!    time>.{json,svg}` and `latest.{json,svg}`). Progress goes to stderr.

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use securepay_core::identity::ServiceIdentity;

use crate::ctx::Ctx;
use crate::load::api::Gateway;
use crate::load::stats::{Machine, RunInfo, Stats};
use crate::load::{self, DriveOptions, Prepared, accounts};
use crate::services::SERVICES;

mod pgbench;
mod procs;
mod rebalance;
mod report;
mod server;
mod svg;

use report::{Report, StepResult};

/// Waited after a step's window before counting its settlements: a transaction whose
/// `updated_at` fell just inside the window may commit a moment later.
const COMMIT_GRACE: Duration = Duration::from_millis(1500);
/// After the ramp, how long the audit waits for the run's payments to leave PENDING.
const FINAL_DRAIN: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct Args {
    /// Offered rates of the ramp, payments/s, rising, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1200.0, 1600.0])]
    rates: Vec<f64>,
    /// How long each rate is offered, in seconds (SPEC §11's "sustained" is 60).
    #[arg(long, default_value_t = 30)]
    step_secs: u64,
    /// How long pgbench runs, in seconds.
    #[arg(long, default_value_t = 60)]
    pgbench_secs: u64,
    /// pgbench's client connections.
    #[arg(long, default_value_t = 8)]
    pgbench_clients: u32,
    /// Leave out the pgbench baseline.
    #[arg(long)]
    skip_pgbench: bool,
    /// Seconds of load at the first rate before the ramp, not measured (a freshly started broker
    /// JIT-compiles for its first minute); 0 leaves it out.
    #[arg(long, default_value_t = 20)]
    warmup_secs: u64,
    /// How many load accounts (`load-user-<i>`, 1000.00 EUR opening balance each) pay each other;
    /// each is its own client (own source address), so the per-user limit (10/s by default)
    /// needs rate / accounts well below it.
    #[arg(long, default_value_t = 400)]
    accounts: usize,
    /// At most this many POSTs in flight; a payment due beyond it is counted as not sent.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Seed of the payer/payee/amount choices (step i uses seed + i).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl Args {
    fn validate(&self) -> Result<()> {
        if self.rates.is_empty() {
            bail!("--rates needs at least one rate");
        }
        if let Some(bad) = self.rates.iter().find(|r| !(r.is_finite() && **r > 0.0 && **r <= 100_000.0)) {
            bail!("--rates: {bad} is not in (0, 100000]");
        }
        if self.rates.windows(2).any(|w| w[1] <= w[0]) {
            bail!("--rates must rise: a ramp");
        }
        if !(1..=3600).contains(&self.step_secs) {
            bail!("--step-secs must be 1 to 3600");
        }
        if !(1..=3600).contains(&self.pgbench_secs) {
            bail!("--pgbench-secs must be 1 to 3600");
        }
        // PostgreSQL runs with max_connections=200, and the services hold pools of their own.
        if self.warmup_secs > 600 {
            bail!("--warmup-secs must be 0 to 600");
        }
        if !(1..=100).contains(&self.pgbench_clients) {
            bail!("--pgbench-clients must be 1 to 100");
        }
        if !(2..=10_000).contains(&self.accounts) {
            bail!("--accounts must be 2 to 10000");
        }
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        Ok(())
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// `git rev-parse HEAD` and whether tracked files have uncommitted changes.
fn git_state(ctx: &Ctx) -> (String, bool) {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(&ctx.root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    (commit, dirty)
}

pub fn run(ctx: &Ctx, args: Args) -> Result<ExitCode> {
    args.validate()?;
    let gateway = SERVICES.iter().find(|s| s.identity == ServiceIdentity::ApiGateway).context("no gateway service")?;
    let gateway_port = ctx.port(gateway.main)?;
    if !crate::net::port_open(gateway_port) {
        bail!(
            "nothing answers on 127.0.0.1:{gateway_port}: start the platform first (`cargo xtask --profile {} up`)",
            ctx.profile
        );
    }
    let started_unix = unix_now();
    let machine = Machine::detect();
    let (git_commit, git_dirty) = git_state(ctx);
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;

    let pgbench =
        if args.skip_pgbench { None } else { Some(pgbench::run(ctx, args.pgbench_clients, args.pgbench_secs)?) };

    // Tokens outlive the whole ramp, each step's drain included.
    let ttl = args.warmup_secs + args.rates.len() as u64 * (args.step_secs + 15) + FINAL_DRAIN.as_secs() + 600;
    let Prepared { target, mut db, tokens } = load::prepare(ctx, &runtime, "bench", args.accounts, ttl)?;
    let (fsync, synchronous_commit) = runtime.block_on(server::durability(&mut db))?;
    let header = report::Header {
        date,
        unix_time: started_unix as u64,
        git_commit,
        git_dirty,
        profile: ctx.profile.to_string(),
        build: ctx.build.to_string(),
        target: target.clone(),
        machine: (&machine).into(),
        postgres_fsync: fsync,
        postgres_synchronous_commit: synchronous_commit,
        config: report::Config {
            rates: args.rates.clone(),
            step_secs: args.step_secs,
            accounts: args.accounts,
            concurrency: args.concurrency,
            seed: args.seed,
            pgbench_secs: pgbench.as_ref().map(|_| args.pgbench_secs),
            pgbench_clients: pgbench.as_ref().map(|_| args.pgbench_clients),
        },
    };
    println!("{}", report::header_text(&header));
    if let Some(p) = &pgbench {
        println!("{}\n", report::pgbench_text(p));
    }

    let client = Arc::new(Gateway::new(target.clone(), args.accounts, false));
    let run_id = format!("{}-{}", args.seed, std::process::id());
    let rebalanced = ctx.progress.step("bench", "rebalance the load accounts to their opening balances", || {
        runtime.block_on(rebalance::run(&mut db, &client, &tokens, args.accounts, &run_id))
    })?;
    ctx.progress.note("bench", &format!("{rebalanced} payments between load accounts, all settled"));
    if args.warmup_secs > 0 {
        let rate = args.rates[0];
        let info = RunInfo {
            target: target.clone(),
            rate,
            duration: Duration::from_secs(args.warmup_secs),
            accounts: args.accounts,
            concurrency: args.concurrency,
            unaffordable_share: 0.0,
            seed: args.seed.wrapping_sub(1),
            poll_interval: None,
            drain: Duration::ZERO,
            one_source_ip: false,
        };
        let label = format!("[bench warm-up {} /s]", report::fmt_rate(rate));
        let options = DriveOptions {
            run_id: format!("bench-{}-{}-warmup", started_unix as u64, std::process::id()),
            progress: Arc::new(move |elapsed, s: &Stats| step_progress(&label, elapsed, s)),
        };
        runtime.block_on(load::drive(&info, client.clone(), tokens.clone(), 1, options));
        // Its last payments settle before the first measured window opens.
        std::thread::sleep(COMMIT_GRACE);
    }
    let before = runtime.block_on(accounts::audit(&mut db))?;
    let watched = procs::watched(ctx);
    let missing: Vec<&str> = watched.iter().filter(|w| w.pid.is_none()).map(|w| w.name.as_str()).collect();
    if !missing.is_empty() {
        ctx.progress.note("bench", &format!("not running (no CPU/memory for them): {}", missing.join(", ")));
    }
    let profiling = runtime.block_on(server::statements_reset(&mut db));
    if !profiling {
        ctx.progress.note("bench", "pg_stat_statements is not preloaded: no statement profile");
    }
    let ramp_started = unix_now();
    let mut steps: Vec<StepResult> = Vec::new();
    let mut stopped = None;
    println!("{}", report::table_header());
    for (i, &rate) in args.rates.iter().enumerate() {
        let info = RunInfo {
            target: target.clone(),
            rate,
            duration: Duration::from_secs(args.step_secs),
            accounts: args.accounts,
            concurrency: args.concurrency,
            // Every payment affordable: a refused one would count against "accepted".
            unaffordable_share: 0.0,
            seed: args.seed.wrapping_add(i as u64),
            poll_interval: None,
            drain: Duration::ZERO,
            one_source_ip: false,
        };
        let label = format!("[bench {}/{} {} /s]", i + 1, args.rates.len(), report::fmt_rate(rate));
        let options = DriveOptions {
            run_id: format!("bench-{}-{}-{i}", started_unix as u64, std::process::id()),
            progress: Arc::new(move |elapsed, s: &Stats| step_progress(&label, elapsed, s)),
        };
        let window_start = unix_now();
        let first = procs::snapshot(&watched);
        // The POSTs' unaffordable amount is never drawn (share 0); any positive amount will do.
        let stats = runtime.block_on(load::drive(&info, client.clone(), tokens.clone(), 1, options));
        let last = procs::snapshot(&watched);
        let window_end = window_start + args.step_secs as f64;
        let wait = window_end + COMMIT_GRACE.as_secs_f64() - unix_now();
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
        let settled = runtime.block_on(server::window(&mut db, window_start, window_end))?;
        let (processes, machine_cpu_percent) = procs::between(&watched, &first, &last);
        let step = step_result(rate, args.step_secs, &stats, &settled, processes, machine_cpu_percent);
        println!("{}", report::row_text(&step));
        steps.push(step);
        if let Some(reason) = report::stop_reason(&steps) {
            if i + 1 < args.rates.len() {
                stopped = Some(reason);
            }
            break;
        }
    }

    // Conservation holds at every moment; waiting for the backlog makes "pending" meaningful.
    let pending = ctx.progress.step("bench", "wait for the run's payments to settle, audit", || {
        let deadline = std::time::Instant::now() + FINAL_DRAIN;
        loop {
            let pending = runtime.block_on(server::pending_since(&mut db, ramp_started))?;
            if pending == 0 || std::time::Instant::now() >= deadline {
                return Ok(pending);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    })?;
    let statements = if profiling { Some(runtime.block_on(server::top_statements(&mut db, 15))?) } else { None };
    let after = runtime.block_on(accounts::audit(&mut db))?;
    let conservation = accounts::conservation(&before, &after);
    let summary = report::summarize(&steps, pgbench.as_ref().map(|p| p.tps));
    let report = Report {
        schema: report::SCHEMA,
        header,
        pgbench,
        steps,
        stopped,
        summary,
        statements,
        conservation: report::Conservation::new(&conservation, pending),
    };
    println!("\n{}", report::summary_text(&report));
    let (json, picture) = write_outputs(ctx, &report)?;
    println!("report      {}  (also {})", json.display(), json.with_file_name("latest.json").display());
    println!("picture     {}  (also {})", picture.display(), picture.with_file_name("latest.svg").display());
    if !conservation.holds() {
        bail!("conservation violated over the load accounts");
    }
    Ok(ExitCode::SUCCESS)
}

/// `[bench 3/8 100 /s] [  12s] offered 1200  accepted 1190  errors 2  in flight 3`.
fn step_progress(label: &str, elapsed: Duration, s: &Stats) -> String {
    let in_flight = s.offered.saturating_sub(s.accepted + s.errors());
    format!(
        "{label} [{:>4}s] offered {}  accepted {}  errors {}  in flight {}",
        elapsed.as_secs(),
        s.offered,
        s.accepted,
        s.errors(),
        in_flight
    )
}

fn step_result(
    rate: f64,
    secs: u64,
    stats: &Stats,
    settled: &server::Window,
    processes: Vec<procs::ProcessUsage>,
    machine_cpu_percent: Option<f64>,
) -> StepResult {
    let per_s = |n: u64| n as f64 / secs as f64;
    let ms = |q: f64| stats.post_latency.quantile(q).map(|d| d.as_secs_f64() * 1000.0);
    let mut errors = std::collections::BTreeMap::new();
    for ((error, _intent), n) in &stats.post_errors {
        *errors.entry(error.clone()).or_default() += n;
    }
    StepResult {
        rate,
        secs,
        offered: stats.offered,
        not_sent: stats.not_sent,
        accepted: stats.accepted,
        settled: settled.settled,
        failed: settled.failed,
        offered_per_s: per_s(stats.offered),
        accepted_per_s: per_s(stats.accepted),
        settled_per_s: per_s(settled.settled),
        post_p50_ms: ms(0.50),
        post_p99_ms: ms(0.99),
        settle_p50_ms: settled.p50_s.map(|s| s * 1000.0),
        settle_p99_ms: settled.p99_s.map(|s| s * 1000.0),
        errors,
        machine_cpu_percent,
        processes,
        sustainable: false,
        latency_goal: false,
    }
    .decide()
}

/// Writes `bench-<unix time>.{json,svg}` and `latest.{json,svg}` into `<state dir>/bench/`.
fn write_outputs(ctx: &Ctx, report: &Report) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = ctx.state.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = format!("bench-{}", report.header.unix_time);
    let json = report::to_json(report) + "\n";
    let picture = svg::render(report);
    let (json_path, svg_path) = (dir.join(format!("{stem}.json")), dir.join(format!("{stem}.svg")));
    for (path, contents) in [
        (&json_path, &json),
        (&dir.join("latest.json"), &json),
        (&svg_path, &picture),
        (&dir.join("latest.svg"), &picture),
    ] {
        crate::fsutil::write_atomic(path, contents)?;
    }
    Ok((json_path, svg_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::stats::Intent;

    #[test]
    fn a_step_is_computed_from_the_client_stats_and_the_server_window() {
        let mut stats = Stats::default();
        for i in 0..100u64 {
            let due = Duration::from_millis(i * 100);
            stats.offered(due, i != 99, Intent::Affordable);
            if i < 97 {
                stats.accepted(due, Duration::from_millis(10 + i % 10), Duration::from_millis(5), false);
            }
        }
        stats.rejected(
            Duration::ZERO,
            Duration::from_millis(3),
            Duration::from_millis(3),
            "429 rate_limited".into(),
            Intent::Affordable,
        );
        stats.rejected(
            Duration::ZERO,
            Duration::from_millis(3),
            Duration::from_millis(3),
            "429 rate_limited".into(),
            Intent::Unaffordable,
        );
        let window = server::Window { settled: 95, failed: 1, p50_s: Some(0.08), p99_s: Some(0.2) };
        let step = step_result(10.0, 10, &stats, &window, Vec::new(), None);
        assert_eq!((step.offered, step.accepted, step.not_sent, step.settled), (100, 97, 1, 95));
        assert_eq!((step.offered_per_s, step.accepted_per_s, step.settled_per_s), (10.0, 9.7, 9.5));
        assert_eq!(step.errors.get("429 rate_limited"), Some(&2), "intents are summed");
        assert_eq!(step.errors.get("not sent (client concurrency limit)"), Some(&1));
        assert_eq!(step.settle_p99_ms, Some(200.0));
        assert!(step.post_p99_ms.unwrap() < 20.0);
        assert!(step.sustainable && step.latency_goal, "{step:?}");
    }

    #[test]
    fn the_progress_line_counts_what_is_still_in_flight() {
        let mut stats = Stats::default();
        for i in 0..5 {
            stats.offered(Duration::from_millis(i), true, Intent::Affordable);
        }
        stats.accepted(Duration::ZERO, Duration::ZERO, Duration::ZERO, false);
        let line = step_progress("[bench 1/2 25 /s]", Duration::from_secs(3), &stats);
        assert_eq!(line, "[bench 1/2 25 /s] [   3s] offered 5  accepted 1  errors 0  in flight 4");
    }

    #[test]
    fn flags_must_describe_a_rising_ramp() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let parse =
            |line: &[&str]| Cli::try_parse_from(std::iter::once("bench").chain(line.iter().copied())).map(|c| c.args);
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.rates, vec![25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1200.0, 1600.0]);
        assert_eq!((defaults.step_secs, defaults.pgbench_secs, defaults.pgbench_clients), (30, 60, 8));
        defaults.validate().unwrap();
        let short =
            parse(&["--rates", "10,20", "--step-secs", "10", "--pgbench-secs", "10", "--skip-pgbench"]).unwrap();
        assert_eq!(short.rates, vec![10.0, 20.0]);
        assert!(short.skip_pgbench);
        short.validate().unwrap();
        assert!(parse(&["--rates", "20,10"]).unwrap().validate().is_err());
        assert!(parse(&["--rates", "0"]).unwrap().validate().is_err());
        assert!(parse(&["--step-secs", "0"]).unwrap().validate().is_err());
    }
}
