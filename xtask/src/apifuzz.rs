//! `cargo xtask test`'s API fuzzing stage: schemathesis (PyPI) against the OpenAPI document the
//! running test gateway serves, with valid tokens, then the money checked in the database.
//!
//! 1. schemathesis [`VERSION`] is installed once into a virtualenv in the tool cache;
//! 2. the books are read as the superuser: balances per currency, the ledger;
//! 3. one schemathesis run per demo subject (alice, bob: each its own rate-limit bucket), side by
//!    side, every phase (examples, coverage, fuzzing, stateful) and every check but
//!    `positive_data_acceptance` (a schema-valid payment may rightly be refused: unknown account,
//!    insufficient funds, an amount finer than its currency), each throttled under the gateway's
//!    per-subject limit so the requests reach the logic behind it;
//! 4. it fails unless the gateway served at least [`REQUESTS_MIN`] requests of the runs (its own
//!    RED counter), and — after every accepted payment settled — unless money is exactly where the
//!    accepted payments put it: per currency the total is unchanged, no balance is negative, and the
//!    ledger grew by one DEBIT and one CREDIT of its amount for each payment that COMPLETED, and by
//!    nothing else. A request that moved money without being a valid payment fails the stage.
//!
//! A failure prints schemathesis's own report (with a `curl` to reproduce each case) and the seed;
//! `SECUREPAY_API_FUZZ_EXAMPLES` raises the cases per operation for a longer run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use rust_decimal::Decimal;
use securepay_core::identity::ServiceIdentity;
use sqlx::{PgConnection, Row as _};

use crate::components::postgres::{DATABASE, Postgres};
use crate::ctx::Ctx;
use crate::services::SERVICES;

/// The schemathesis release on PyPI this stage runs (in its own virtualenv).
pub const VERSION: &str = "4.32.5";
/// At least this many requests must reach the gateway across the runs (issue #16).
pub const REQUESTS_MIN: u64 = 1_000;
/// Cases per operation and phase unless `SECUREPAY_API_FUZZ_EXAMPLES` says otherwise.
const EXAMPLES_DEFAULT: u32 = 60;
/// The subjects fuzzed side by side (demo users with accounts, so some payments are valid).
const SUBJECTS: [&str; 2] = ["alice", "bob"];
/// Under the gateway's default per-subject limit (10/s, burst 20).
const RATE_PER_SUBJECT: &str = "9/s";
/// Fixed seeds: the same run each time; change them to explore.
const SEED_BASE: u64 = 20_261_204;
/// How long accepted payments get to settle before the books are compared.
const SETTLE_WAIT: Duration = Duration::from_secs(60);

/// The stage: install, run, check. Progress lines under `api-fuzz`.
pub fn run(ctx: &Ctx) -> Result<()> {
    let st = ensure_schemathesis(ctx)?;
    let gateway = SERVICES.iter().find(|s| s.identity == ServiceIdentity::ApiGateway).context("no gateway service")?;
    let port = ctx.port(gateway.main)?;
    let base = format!("http://127.0.0.1:{port}");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let admin_url = Postgres.admin_url(ctx).context("reading the PostgreSQL superuser password")?;
    let mut db = runtime.block_on(crate::load::accounts::connect(&admin_url, DATABASE))?;
    let before = runtime.block_on(Books::read(&mut db))?;
    let served_before = gateway_requests(port)?;

    let examples = match std::env::var("SECUREPAY_API_FUZZ_EXAMPLES") {
        Ok(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .context("SECUREPAY_API_FUZZ_EXAMPLES must be a positive whole number")?,
        Err(_) => EXAMPLES_DEFAULT,
    };
    let dir = ctx.state.join("api-fuzz");
    std::fs::create_dir_all(&dir)?;
    let gateway_bin = ctx.service_binary(ServiceIdentity::ApiGateway.binary());
    let owners: Vec<String> = SUBJECTS.iter().map(|s| (*s).to_owned()).collect();
    let tokens =
        crate::load::accounts::mint_tokens_for(&gateway_bin, &crate::services::dev_key_path(ctx), &owners, 3_600)?;
    warm_up(ctx, port, &tokens[0])?;
    let what =
        format!("schemathesis {VERSION}: {} subjects × {examples} cases per operation and phase", SUBJECTS.len());
    let dir = dir.as_path();
    let outcomes = ctx.progress.step("api-fuzz", &what, || {
        std::thread::scope(|scope| {
            let runs: Vec<_> = SUBJECTS
                .iter()
                .zip(&tokens)
                .enumerate()
                .map(|(i, (subject, token))| {
                    let command = st_command(&st, &base, token, SEED_BASE + i as u64, examples, dir, subject);
                    let log = dir.join(format!("{subject}.log"));
                    scope.spawn(move || run_logged(command, &log))
                })
                .collect();
            runs.into_iter()
                .map(|r| r.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a run panicked"))))
                .collect::<Vec<_>>()
        })
        .into_iter()
        .collect::<Result<Vec<_>>>()
    })?;
    let served = gateway_requests(port)?.saturating_sub(served_before);
    ctx.progress.note("api-fuzz", &format!("the gateway served {served} requests of the runs"));
    let failed: Vec<&str> =
        SUBJECTS.iter().zip(&outcomes).filter(|(_, (ok, _))| !ok).map(|(subject, _)| *subject).collect();
    if !failed.is_empty() {
        let reports: Vec<String> = outcomes.iter().filter(|(ok, _)| !ok).map(|(_, log)| tail(log, 80)).collect();
        bail!("schemathesis found failures as {failed:?} (logs in {}):\n{}", dir.display(), reports.join("\n"));
    }
    ensure!(served >= REQUESTS_MIN, "only {served} requests reached the gateway (at least {REQUESTS_MIN} expected)");

    ctx.progress.step("api-fuzz", "the money: accepted payments settle, nothing else moved", || {
        runtime.block_on(async {
            let deadline = Instant::now() + SETTLE_WAIT;
            while before.pending_since(&mut db).await? > 0 {
                ensure!(
                    Instant::now() < deadline,
                    "payments accepted during the run are still PENDING after {SETTLE_WAIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let after = Books::read(&mut db).await?;
            before.check_moved_only_by_payments(&after, &mut db).await
        })
    })
}

/// Waits until every read route answers without a 5xx: a service `up` just restarted leaves the
/// gateway one broken connection per backend, whose first call is (rightly) a 503.
fn warm_up(ctx: &Ctx, port: u16, token: &str) -> Result<()> {
    const WAIT: Duration = Duration::from_secs(30);
    let unknown = "00000000-0000-4000-8000-000000000000";
    let paths = [
        format!("/api/v1/accounts/{unknown}/balance"),
        format!("/api/v1/payments/{unknown}"),
        format!("/api/v1/payments/{unknown}/notifications"),
    ];
    let auth = format!("Bearer {token}");
    ctx.progress.step("api-fuzz", "wait until every backend answers through the gateway", || {
        let deadline = Instant::now() + WAIT;
        for path in &paths {
            loop {
                let answer = crate::net::http_get_with(port, path, &[("Authorization", &auth)]);
                match answer {
                    Ok((status, _)) if status < 500 => break,
                    _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                    Ok((status, body)) => bail!("GET {path} still answers {status} after {WAIT:?}: {body}"),
                    Err(e) => return Err(e.context(format!("GET {path}"))),
                }
            }
        }
        Ok(())
    })
}

/// The virtualenv with schemathesis, from the tool cache (installed once per version).
fn ensure_schemathesis(ctx: &Ctx) -> Result<PathBuf> {
    crate::system::ensure(ctx, crate::system::Step::ApiFuzz)?;
    let dir = crate::install::cached_tool(ctx, "api-fuzz", "schemathesis", VERSION, |scratch| {
        let venv = scratch.join("venv");
        crate::process::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("python3 -m venv failed (Debian: apt-get install python3-venv)")?;
        crate::process::run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            &format!("schemathesis=={VERSION}"),
        ]))
        .context("pip could not install schemathesis from PyPI")?;
        Ok(())
    })?;
    // A virtualenv records its absolute path: run the interpreter with the module, not the script.
    Ok(dir.join("venv/bin/python3"))
}

fn st_command(python: &Path, base: &str, token: &str, seed: u64, examples: u32, dir: &Path, subject: &str) -> Command {
    let mut cmd = Command::new(python);
    cmd.current_dir(dir)
        .args(["-m", "schemathesis.cli", "run", &format!("{base}/api/v1/openapi.json")])
        .args(["--url", base])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", &examples.to_string(), "--seed", &seed.to_string()])
        .args(["--rate-limit", RATE_PER_SUBJECT, "--workers", "1", "--request-timeout", "15"])
        .args(["--generation-database", "none", "--no-color", "--report", "junit"])
        .arg("--report-junit-path")
        .arg(dir.join(format!("{subject}.junit.xml")))
        .env("SCHEMATHESIS_TELEMETRY", "false");
    cmd
}

/// Runs `command` with its output in `log`; whether it passed, and the log's path.
fn run_logged(mut command: Command, log: &Path) -> Result<(bool, PathBuf)> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let status = command.stdout(file.try_clone()?).stderr(file).status().context("running schemathesis")?;
    Ok((status.success(), log.to_path_buf()))
}

fn tail(path: &Path, lines: usize) -> String {
    crate::fsutil::tail(path, lines)
}

/// Every request the gateway has counted (`securepay_http_requests_total`, all series).
fn gateway_requests(port: u16) -> Result<u64> {
    let (code, body) = crate::net::http_get(port, "/metrics")?;
    ensure!(code == 200, "the gateway's /metrics answered {code}");
    Ok(body
        .lines()
        .filter(|l| l.starts_with("securepay_http_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// What the stage compares before and after: totals per currency and the ledger's high-water mark.
struct Books {
    totals: BTreeMap<String, Decimal>,
    last_entry: i64,
    started: time::OffsetDateTime,
}

impl Books {
    async fn read(db: &mut PgConnection) -> Result<Books> {
        let rows = sqlx::query("SELECT currency::text AS c, sum(balance)::text AS s FROM accounts.accounts GROUP BY 1")
            .fetch_all(&mut *db)
            .await?;
        let totals = rows
            .iter()
            .map(|r| Ok((r.try_get::<String, _>("c")?, r.try_get::<String, _>("s")?.parse::<Decimal>()?)))
            .collect::<Result<_>>()?;
        let last_entry: i64 =
            sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM accounts.ledger_entries").fetch_one(&mut *db).await?;
        let started: time::OffsetDateTime = sqlx::query_scalar("SELECT now()").fetch_one(&mut *db).await?;
        Ok(Books { totals, last_entry, started })
    }

    async fn pending_since(&self, db: &mut PgConnection) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM payments.transactions WHERE created_at >= $1 AND status = 'PENDING'",
        )
        .bind(self.started)
        .fetch_one(&mut *db)
        .await?)
    }

    async fn check_moved_only_by_payments(&self, after: &Books, db: &mut PgConnection) -> Result<()> {
        ensure!(
            self.totals == after.totals,
            "money is not conserved: per currency {:?} before, {:?} after",
            self.totals,
            after.totals
        );
        let negative: i64 =
            sqlx::query_scalar("SELECT count(*) FROM accounts.accounts WHERE balance < 0").fetch_one(&mut *db).await?;
        ensure!(negative == 0, "{negative} accounts have a negative balance");
        // Every new ledger row belongs to a payment that COMPLETED, with its amount and accounts,
        // and every payment that completed since has exactly its two rows.
        let stray: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM accounts.ledger_entries e
             LEFT JOIN payments.transactions p ON p.payment_id = e.payment_id
             WHERE e.id > $1 AND (p.payment_id IS NULL OR p.status <> 'COMPLETED' OR p.amount <> e.amount
                   OR p.currency <> e.currency
                   OR e.account_id <> CASE e.direction WHEN 'DEBIT' THEN p.from_account ELSE p.to_account END)",
        )
        .bind(self.last_entry)
        .fetch_one(&mut *db)
        .await?;
        ensure!(stray == 0, "{stray} ledger rows written during the run match no completed payment");
        let unbooked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM payments.transactions p
             WHERE p.created_at >= $1 AND p.status = 'COMPLETED'
               AND (SELECT count(*) FROM accounts.ledger_entries e WHERE e.payment_id = p.payment_id AND e.id > $2) <> 2",
        )
        .bind(self.started)
        .bind(self.last_entry)
        .fetch_one(&mut *db)
        .await?;
        ensure!(unbooked == 0, "{unbooked} payments completed during the run without their debit and credit");
        Ok(())
    }
}
