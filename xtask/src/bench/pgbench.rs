//! The baseline: pgbench TPC-B on the platform's own PostgreSQL, in a scratch database that is
//! created for the run and dropped afterwards (also when pgbench fails).
//!
//! `pgbench -i -s <scale>` then `pgbench -c <clients> -j <threads> -T <secs> -M prepared -P 1`,
//! as the superuser the runner uses, over TCP on loopback (as the services connect). Its
//! once-a-second progress goes straight to stderr; its summary (stdout) is parsed for the TPS
//! without the initial connection time.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::components::postgres::{self, Postgres, SUPERUSER};
use crate::ctx::Ctx;

/// The scratch database; never the platform's.
pub const SCRATCH_DB: &str = "securepay_pgbench";
/// TPC-B scale: 10 branches, 1,000,000 accounts (≈ 160 MB).
pub const SCALE: u32 = 10;
/// pgbench worker threads (the machine has 2 cores).
pub const THREADS: u32 = 2;

/// What the pgbench run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PgbenchResult {
    /// Transactions per second, without the initial connection time.
    pub tps: f64,
    pub scale: u32,
    pub clients: u32,
    pub threads: u32,
    pub duration_s: u64,
    pub transactions: Option<u64>,
    pub failed_transactions: Option<u64>,
    pub latency_avg_ms: Option<f64>,
}

/// The numbers of pgbench's summary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub tps: f64,
    pub transactions: Option<u64>,
    pub failed_transactions: Option<u64>,
    pub latency_avg_ms: Option<f64>,
}

/// Parses pgbench's summary. The TPS is the one without connection time: `tps = N (without
/// initial connection time)` (pgbench ≥ 14) or `tps = N (excluding connections establishing)`
/// (≤ 13); a lone `tps = N` line is taken as it is.
pub fn parse(output: &str) -> Result<Summary> {
    let mut excluding = None;
    let mut any = Vec::new();
    let mut transactions = None;
    let mut failed = None;
    let mut latency = None;
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("tps = ") {
            let number = rest.split_whitespace().next().and_then(|n| n.parse::<f64>().ok());
            let Some(number) = number else { continue };
            if rest.contains("without initial connection time") || rest.contains("excluding connections establishing") {
                excluding = Some(number);
            }
            any.push(number);
        } else if let Some(rest) = line.strip_prefix("number of transactions actually processed:") {
            transactions = rest.split('/').next().and_then(|n| n.trim().parse().ok());
        } else if let Some(rest) = line.strip_prefix("number of failed transactions:") {
            failed = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(rest) = line.strip_prefix("latency average =") {
            latency = rest.trim().strip_suffix("ms").and_then(|n| n.trim().parse().ok());
        }
    }
    let tps = match (excluding, any.as_slice()) {
        (Some(tps), _) => tps,
        (None, [only]) => *only,
        (None, []) => bail!("pgbench printed no `tps = ` line"),
        (None, _) => bail!("pgbench printed several `tps = ` lines, none without connection time"),
    };
    if !(tps.is_finite() && tps >= 0.0) {
        bail!("pgbench printed an impossible TPS {tps}");
    }
    Ok(Summary { tps, transactions, failed_transactions: failed, latency_avg_ms: latency })
}

/// Creates the scratch database, initialises and runs pgbench, drops the database.
pub fn run(ctx: &Ctx, clients: u32, secs: u64) -> Result<PgbenchResult> {
    crate::system::ensure(ctx, crate::system::Step::Bench)?;
    let drop_sql = format!("DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)");
    ctx.progress.step("pgbench", &format!("create the scratch database {SCRATCH_DB}"), || {
        Postgres.psql(ctx, &drop_sql)?;
        Postgres.psql(ctx, &format!("CREATE DATABASE {SCRATCH_DB}"))
    })?;
    let result = measure(ctx, clients, secs);
    let dropped = ctx.progress.step("pgbench", &format!("drop {SCRATCH_DB}"), || Postgres.psql(ctx, &drop_sql));
    let result = result?;
    dropped?;
    Ok(result)
}

fn measure(ctx: &Ctx, clients: u32, secs: u64) -> Result<PgbenchResult> {
    let command = || -> Result<Command> {
        let mut cmd = Command::new("pgbench");
        cmd.env("PGPASSWORD", Postgres.superuser_password(ctx)?).env("PGCONNECT_TIMEOUT", "5").args([
            "-h",
            "127.0.0.1",
            "-p",
            &ctx.port(postgres::PORT)?.to_string(),
            "-U",
            SUPERUSER,
        ]);
        Ok(cmd)
    };
    ctx.progress.step("pgbench", &format!("initialise TPC-B, scale {SCALE} (pgbench -i)"), || {
        crate::process::run(command()?.args(["-i", "-q", "-s", &SCALE.to_string(), SCRATCH_DB])).map(drop)
    })?;
    ctx.progress.note(
        "pgbench",
        &format!("TPC-B: {clients} clients, {THREADS} threads, {secs} s, prepared statements (progress below)"),
    );
    let output = command()?
        .args(["-c", &clients.to_string(), "-j", &THREADS.to_string(), "-T", &secs.to_string()])
        .args(["-M", "prepared", "-P", "1", SCRATCH_DB])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("pgbench failed ({}):\n{}", output.status, stdout.trim());
    }
    let summary = parse(&stdout).with_context(|| format!("reading pgbench's summary:\n{}", stdout.trim()))?;
    ctx.progress.note("pgbench", &format!("{:.1} tps (without initial connection time)", summary.tps));
    Ok(PgbenchResult {
        tps: summary.tps,
        scale: SCALE,
        clients,
        threads: THREADS,
        duration_s: secs,
        transactions: summary.transactions,
        failed_transactions: summary.failed_transactions,
        latency_avg_ms: summary.latency_avg_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG15: &str = "pgbench (15.18 (Debian 15.18-0+deb12u1), server 16.9)
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 10
query mode: prepared
number of clients: 8
number of threads: 2
maximum number of tries: 1
duration: 60 s
number of transactions actually processed: 123456
number of failed transactions: 0 (0.000%)
latency average = 3.887 ms
latency stddev = 1.204 ms
initial connection time = 15.263 ms
tps = 2057.903219 (without initial connection time)
";

    const PG13: &str = "transaction type: <builtin: TPC-B (sort of)>
number of transactions actually processed: 6000/6000
latency average = 8.000 ms
tps = 990.123 (including connections establishing)
tps = 1001.5 (excluding connections establishing)
";

    #[test]
    fn the_tps_without_connection_time_is_read_from_pgbench_15() {
        let s = parse(PG15).unwrap();
        assert_eq!(s.tps, 2057.903219);
        assert_eq!(s.transactions, Some(123_456));
        assert_eq!(s.failed_transactions, Some(0));
        assert_eq!(s.latency_avg_ms, Some(3.887));
    }

    #[test]
    fn older_pgbench_prints_both_and_the_excluding_one_wins() {
        let s = parse(PG13).unwrap();
        assert_eq!(s.tps, 1001.5);
        assert_eq!(s.transactions, Some(6000));
        assert_eq!(s.failed_transactions, None);
        assert_eq!(s.latency_avg_ms, Some(8.0));
    }

    #[test]
    fn output_without_a_usable_tps_is_an_error() {
        assert!(parse("").is_err());
        assert!(parse("tps = lots (without initial connection time)\n").is_err());
        assert!(parse("tps = 1 (including connections establishing)\ntps = 2 (whatever)\n").is_err());
        assert_eq!(parse("tps = 42.5\n").unwrap().tps, 42.5);
        assert!(parse("tps = NaN (without initial connection time)\n").is_err());
    }
}
