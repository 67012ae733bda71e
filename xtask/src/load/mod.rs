//! `cargo xtask load`: drives a chosen rate of payments for a chosen time through the gateway of
//! a running platform (`cargo xtask up`) and reports what happened.
//!
//! 1. Seeds the load accounts (LOAD-TEST DATA, see [`accounts`]) in PostgreSQL as the superuser
//!    and mints one token per owner with the profile's dev key.
//! 2. Audits all load accounts' balances (before).
//! 3. Runs the open-loop [`schedule`]: each due payment is POSTed with its payer's token and its
//!    own Idempotency-Key, unless `--concurrency` POSTs are already in flight (then it is counted
//!    as offered, not sent). A 202 is then polled with GET until COMPLETED/FAILED, at most until
//!    the drain ends.
//! 4. Audits again (after): the sum of all load accounts' balances must not move and must equal
//!    their opening balances (they only pay each other), and each account's balance must equal
//!    opening + credits − debits of the ledger.
//! 5. Prints the report ([`stats::report`]); fails if conservation broke or an unaffordable
//!    payment completed.
//!
//! Progress goes to stderr once a second; the report goes to stdout.
//!
//! `cargo xtask bench` reuses the pieces: [`prepare`] (step 1) and [`drive`] (step 3, one load
//! step returning its [`Stats`]), with polling off so that only the POSTs load the platform.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use securepay_core::identity::ServiceIdentity;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::components::postgres::{DATABASE, Postgres};
use crate::ctx::Ctx;
use crate::services::SERVICES;

pub mod accounts;
pub mod api;
pub mod schedule;
pub mod stats;

use api::{Answer, Gateway};
use schedule::{Planned, Planner, Schedule};
use stats::{Intent, Machine, RunInfo, Stats};

/// The gateway's development signing key in `secrets/`, created by `up` (`gateway dev-keys`).
/// Ordinary amounts: 1.00 to 20.00 EUR.
const AMOUNT_MINOR: (i64, i64) = (100, 2_000);
/// The gateway's default maximum amount (SPEC §3): an unaffordable amount must stay below it.
const MAX_AMOUNT_MINOR: i64 = 100_000_000;

#[derive(clap::Args)]
pub struct Args {
    /// Payments offered per second (open loop: not lowered when the server is slow).
    #[arg(long)]
    rate: f64,
    /// How long to offer payments, in seconds.
    #[arg(long)]
    duration: u64,
    /// How many load accounts (`load-user-<i>`, 1000.00 EUR opening balance each) pay each other.
    #[arg(long, default_value_t = 200)]
    accounts: usize,
    /// At most this many POSTs in flight; a payment due beyond it is counted as not sent.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Share of payments for more than all load accounts hold together (must end FAILED).
    #[arg(long, default_value_t = 0.1)]
    unaffordable_share: f64,
    /// Seed of the payer/payee/amount choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How often an accepted payment is polled until it is COMPLETED or FAILED, in milliseconds.
    #[arg(long, default_value_t = 250)]
    poll_interval_ms: u64,
    /// After the last payment is offered, wait at most this long for settlements, in seconds.
    #[arg(long, default_value_t = 30)]
    drain: u64,
    /// Send everything from 127.0.0.1 (one client IP: the gateway's per-IP limit, 50/s by
    /// default, then caps the run, polls included) instead of one loopback address per user.
    #[arg(long)]
    one_source_ip: bool,
}

impl Args {
    fn validate(&self) -> Result<()> {
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 100_000.0) {
            bail!("--rate must be in (0, 100000]");
        }
        if self.duration == 0 || self.duration > 24 * 3600 {
            bail!("--duration must be 1 to 86400 seconds");
        }
        // Their total must stay below the maximum amount, so that amount is unaffordable for any one.
        let max_accounts = usize::try_from(MAX_AMOUNT_MINOR / accounts::OPENING_BALANCE_MINOR - 1).unwrap_or(0);
        if !(2..=max_accounts).contains(&self.accounts) {
            bail!("--accounts must be 2 to {max_accounts}");
        }
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.unaffordable_share) {
            bail!("--unaffordable-share must be in [0, 1]");
        }
        if self.poll_interval_ms == 0 {
            bail!("--poll-interval-ms must be at least 1");
        }
        Ok(())
    }
}

pub fn run(ctx: &Ctx, args: Args) -> Result<ExitCode> {
    args.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let ttl = args.duration + args.drain + 300;
    let Prepared { target, mut db, tokens } = prepare(ctx, &runtime, "load", args.accounts, ttl)?;
    let info = RunInfo {
        target,
        rate: args.rate,
        duration: Duration::from_secs(args.duration),
        accounts: args.accounts,
        concurrency: args.concurrency,
        unaffordable_share: args.unaffordable_share,
        seed: args.seed,
        poll_interval: Some(Duration::from_millis(args.poll_interval_ms)),
        drain: Duration::from_secs(args.drain),
        one_source_ip: args.one_source_ip,
    };
    let before = runtime.block_on(accounts::audit(&mut db))?;
    let unaffordable_minor = accounts::unaffordable_minor(&before)?;
    if unaffordable_minor > MAX_AMOUNT_MINOR {
        bail!("the load accounts hold more than the maximum amount together: no amount is unaffordable for all");
    }
    let machine = Machine::detect();
    let gateway = Arc::new(Gateway::new(info.target.clone(), info.accounts, info.one_source_ip));
    let options = DriveOptions {
        run_id: format!("{}-{}", info.seed, std::process::id()),
        progress: Arc::new(stats::progress_line),
    };
    let stats = runtime.block_on(drive(&info, gateway, tokens, unaffordable_minor, options));
    let after = runtime.block_on(accounts::audit(&mut db))?;
    let conservation = accounts::conservation(&before, &after);
    println!("{}", stats::report(&info, &machine, &stats, Some(&conservation)));
    if !conservation.holds() {
        bail!("conservation violated over the load accounts");
    }
    if stats.unaffordable_completed() > 0 {
        bail!("{} unaffordable payments completed", stats.unaffordable_completed());
    }
    Ok(ExitCode::SUCCESS)
}

/// What every load run needs from a running platform.
pub struct Prepared {
    /// `http://127.0.0.1:<gateway port>`.
    pub target: String,
    /// A superuser connection to the platform's database (seeding, audits).
    pub db: sqlx::PgConnection,
    /// One token per load user, valid for the TTL [`prepare`] was given.
    pub tokens: Arc<[String]>,
}

/// Connects as the superuser, seeds load accounts `0..accounts` (reusing existing ones) and mints
/// one token per load user valid for `token_ttl` seconds; progress lines under `step`'s name.
pub fn prepare(
    ctx: &Ctx,
    runtime: &tokio::runtime::Runtime,
    step: &str,
    accounts: usize,
    token_ttl: u64,
) -> Result<Prepared> {
    let gateway = SERVICES.iter().find(|s| s.identity == ServiceIdentity::ApiGateway).context("no gateway service")?;
    let gateway_port = ctx.port(gateway.main)?;
    let admin_url =
        Postgres.admin_url(ctx).context("reading the PostgreSQL superuser password (is the platform up?)")?;
    let mut db = runtime.block_on(accounts::connect(&admin_url, DATABASE))?;
    let inserted = ctx.progress.step(step, &format!("seed {accounts} load accounts (load-user-*)"), || {
        runtime.block_on(accounts::seed(&mut db, accounts))
    })?;
    ctx.progress.note(step, &format!("{inserted} inserted, {} reused", accounts as u64 - inserted));
    // Any build of the gateway mints valid tokens; the running one is surely there.
    let gateway_bin = ctx.service_binary(ServiceIdentity::ApiGateway.binary());
    let tokens = ctx.progress.step(step, "mint one token per load user", || {
        accounts::mint_tokens(&gateway_bin, &crate::services::dev_key_path(ctx), accounts, token_ttl)
    })?;
    Ok(Prepared { target: format!("http://127.0.0.1:{gateway_port}"), db, tokens: tokens.into() })
}

/// Formats the once-a-second progress line of a load step (elapsed since its start, stats so far).
pub type ProgressLine = Arc<dyn Fn(Duration, &Stats) -> String + Send + Sync>;

/// How [`drive`] runs besides the [`RunInfo`].
pub struct DriveOptions {
    /// Makes this step's idempotency keys (`load-<run_id>-<i>`) distinct from every other step's
    /// and run's.
    pub run_id: String,
    /// Printed to stderr once a second and once at the end.
    pub progress: ProgressLine,
}

/// Everything one payment's task needs.
struct Shared {
    gateway: Arc<Gateway>,
    tokens: Arc<[String]>,
    stats: Mutex<Stats>,
    start: Instant,
    /// Polling stops here: the end of the run plus the drain.
    deadline: Instant,
    /// `None`: accepted payments are not polled (their settlement is measured server-side).
    poll_interval: Option<Duration>,
    /// Distinguishes this run's idempotency keys from earlier runs'.
    run_id: String,
    progress: ProgressLine,
}

impl Shared {
    fn record(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

/// One load step, the open loop: offers every payment at its due time, then waits for the
/// in-flight ones (POSTs, and polls if `info.poll_interval` is set) and returns what it measured.
/// `gateway` must have a client per load account (`info.accounts`); `unaffordable_minor`: the
/// amount of the deliberately unaffordable payments.
pub async fn drive(
    info: &RunInfo,
    gateway: Arc<Gateway>,
    tokens: Arc<[String]>,
    unaffordable_minor: i64,
    options: DriveOptions,
) -> Stats {
    let schedule = Schedule::new(info.rate, info.duration);
    let mut planner = Planner::new(info.seed, info.accounts, AMOUNT_MINOR, info.unaffordable_share, unaffordable_minor);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        gateway,
        tokens,
        stats: Mutex::new(Stats::default()),
        start,
        deadline: start + info.duration + info.drain,
        poll_interval: info.poll_interval,
        run_id: options.run_id,
        progress: options.progress,
    });
    let permits = Arc::new(Semaphore::new(info.concurrency));
    let progress = tokio::spawn(progress_lines(shared.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < schedule.total() {
        tokio::time::sleep_until(start + schedule.due(next)).await;
        // Late wake-ups send every payment that has come due since, each with its own due time.
        let due_now = schedule.due_by(start.elapsed());
        for i in next..due_now.max(next + 1) {
            let planned = planner.next_payment();
            debug_assert_eq!(planned.index, i);
            let due = schedule.due(i);
            match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    shared.record(|s| s.offered(due, true, Intent::of(planned.unaffordable)));
                    tasks.spawn(pay(shared.clone(), planned, due, permit));
                }
                Err(_) => shared.record(|s| s.offered(due, false, Intent::of(planned.unaffordable))),
            }
        }
        next = due_now.max(next + 1);
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    progress.abort();
    let mut stats = shared.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    eprintln!("{}", (shared.progress)(start.elapsed(), &stats));
    std::mem::take(&mut *stats)
}

async fn progress_lines(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval_at(shared.start + Duration::from_secs(1), Duration::from_secs(1));
    loop {
        tick.tick().await;
        let line = (shared.progress)(shared.start.elapsed(), &shared.stats.lock().unwrap_or_else(|e| e.into_inner()));
        eprintln!("{line}");
    }
}

/// One payment: POST it, then (when polling) poll it until it is terminal or the drain ends.
async fn pay(shared: Arc<Shared>, p: Planned, due: Duration, permit: tokio::sync::OwnedSemaphorePermit) {
    let token = &shared.tokens[p.payer];
    let body = serde_json::json!({
        "from_account": accounts::account_id(p.payer).to_string(),
        "to_account": accounts::account_id(p.payee).to_string(),
        "amount": schedule::format_minor(p.amount_minor),
        "currency": accounts::CURRENCY,
    });
    let key = format!("load-{}-{}", shared.run_id, p.index);
    let sent = shared.start.elapsed();
    let answer = shared.gateway.create_payment(p.payer, token, &key, body).await;
    drop(permit);
    let answered = shared.start.elapsed();
    let latency = answered.saturating_sub(due);
    let intent = Intent::of(p.unaffordable);
    let view = match answer {
        Answer::Payment { view, replayed } => {
            shared.record(|s| s.accepted(answered, latency, answered - sent, replayed));
            view
        }
        Answer::Error(error) => {
            shared.record(|s| s.rejected(answered, latency, answered - sent, error, intent));
            return;
        }
    };
    let Some(poll_interval) = shared.poll_interval else { return };
    let mut current = view;
    loop {
        let now = shared.start.elapsed();
        if current.is_terminal() {
            let server = current.server_settlement();
            shared.record(|s| s.settled(now, current.outcome(), intent, now - answered, server));
            return;
        }
        if Instant::now() + poll_interval > shared.deadline {
            shared.record(Stats::unsettled);
            return;
        }
        tokio::time::sleep(poll_interval).await;
        match shared.gateway.get_payment(p.payer, token, &current.payment_id).await {
            Answer::Payment { view, .. } => current = view,
            Answer::Error(error) => shared.record(|s| s.poll_error(error)),
        }
    }
}
