//! The whole platform under a fault plan (issue 7): what one seed does, the SPEC §6 invariants it
//! checks, and the sweep that runs many (plan, seed) pairs and reports on them.
//!
//! Per seed ([`run_seed`]):
//! 1. `Infra::start` + `cluster::start`; the workload's accounts opened in the database;
//! 2. safety phase: the `Injector` plays the plan's `Schedule` while the clients send the workload
//!    (retries with the same key, concurrent copies, conflicting replays);
//! 3. healed; clients finish (they re-send until answered or their deadline); then the run waits,
//!    within the plan's liveness bound, until every payment is terminal and notified;
//! 4. the invariants ([`check_invariants`]), each failing with the command that replays the seed.
//!
//! [`sweep`] runs each (plan, seed) in its own madsim runtime on a few worker threads (seeds are
//! independent; each stays deterministic), catches failures instead of stopping at the first, and
//! [`report`] prints seeds, faults injected, payments, invariant checks and simulated payments
//! per wall-clock second per plan. [`Sweep::check_determinism`] runs every pair twice through
//! madsim's determinism check instead.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::rand::thread_rng;
use rust_decimal::Decimal;
use securepay_core::ids::PaymentId;
use securepay_core::money::Currency;
use securepay_core::payment::PaymentStatus;
use securepay_ports::NotificationKind;
use tokio::time::{Instant, sleep};

use crate::cluster::{self, Observed, SharedObserved};
use crate::infra::{Infra, Injector};
use crate::plan::{Fault, Node, Plan, Schedule};
use crate::planted::PlantedBug;
use crate::run::{self, Checker};
use crate::workload::{Workload, WorkloadConfig};

/// The test target and test that run the platform sweep (for replay commands).
pub const TEST_TARGET: &str = "platform";
const TEST_NAME: &str = "every_plan_keeps_the_invariants";

/// The one command that replays `seed` of `plan` (with `planted` planted).
pub fn replay_command(plan: &str, seed: u64, planted: Option<PlantedBug>) -> String {
    let plant = planted.map(|bug| format!("SECUREPAY_SIM_PLANT={bug} ")).unwrap_or_default();
    format!(
        "{plant}SECUREPAY_SIM_PLANS={plan} MADSIM_TEST_SEED={seed} MADSIM_TEST_NUM=1 cargo sim --test {TEST_TARGET} {TEST_NAME}"
    )
}

/// The workload's size and shape, drawn from the seed (issue 17): from 2 clients doing a handful
/// of operations to 24 clients doing 60 each (a few to several hundred payments), over 2-10
/// accounts per currency, with a hot-account share from none to most payments, so batching code
/// sees partial and full batches and hot accounts are contended by many clients.
pub fn workload_config<R: madsim::rand::Rng + ?Sized>(rng: &mut R) -> WorkloadConfig {
    let accounts_per_currency = rng.gen_range(2..=10);
    WorkloadConfig {
        clients: rng.gen_range(2..=24),
        ops_per_client: rng.gen_range(5..=60),
        accounts_per_currency,
        subjects: rng.gen_range(2..=2 * accounts_per_currency),
        hot_per_mille: rng.gen_range(0..=800),
        ..WorkloadConfig::default()
    }
}

/// What one seed did, for its summary line and the sweep's report.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub plan: String,
    /// The fault kinds the schedule drew.
    pub faults: Vec<&'static str>,
    /// Fault events injected (starts, stops, triggers).
    pub events: usize,
    /// Payments the platform stored.
    pub payments: usize,
    /// Invariant checks made.
    pub checks: u64,
    /// What the clients saw, one line.
    pub observed: String,
    pub sim_seconds: f64,
}

/// Plays the current seed of `plan` (with `planted` planted, if any) and checks the invariants;
/// a broken one panics with the command that replays this seed.
pub async fn run_seed(plan: &Plan, planted: Option<PlantedBug>) -> Outcome {
    let started = Instant::now();
    let mut check = Checker::with_replay(replay_command(&plan.name, run::seed(), planted));
    let schedule = Schedule::draw(plan, &mut thread_rng()).unwrap_or_else(|e| panic!("{e}"));
    let config = workload_config(&mut thread_rng());
    let workload = Workload::draw(&config, &mut thread_rng());
    let mut infra = Infra::start(plan);
    infra.planted = planted;
    cluster::open_accounts(&infra, &workload);
    cluster::start(&mut infra);

    // Clients re-send until half the liveness bound has passed after healing.
    let observed = SharedObserved::default();
    let wallet = cluster::Wallet::new();
    let client_deadline = started + plan.safety() + plan.liveness() / 2;
    // A pause of up to `pace` before each operation: on average the operations take the first half
    // of the safety phase, leaving the rest for answers slowed by the faults.
    let pace = plan.safety() / u32::try_from(config.ops_per_client).expect("small");
    let clients: Vec<_> = workload
        .clients
        .iter()
        .enumerate()
        .map(|(i, ops)| {
            let (ops, wallet, observed) = (ops.clone(), wallet.clone(), Arc::clone(&observed));
            madsim::task::spawn(cluster::run_client(i, ops, pace, client_deadline, wallet, observed))
        })
        .collect();
    let injected = Injector::new(&infra).run(&schedule).await;
    check.check(injected.events == schedule.events.len(), || {
        format!("{} of {} events injected", injected.events, schedule.events.len())
    });
    for client in clients {
        client.await.expect("a client finishes");
    }

    // Liveness: every payment terminal, every event notified, within the bound counted from when
    // the faults were healed AND the clients stopped (a request a client sent late in its retries
    // may still be accepted then: the payment service finishes a request in its own task).
    let deadline = Instant::now() + plan.liveness();
    while !quiescent(&infra) && Instant::now() < deadline {
        sleep(Duration::from_millis(200)).await;
    }
    let observed = std::mem::take(&mut *observed.lock().unwrap());
    check_invariants(&mut check, &infra, &workload, &observed, plan, &schedule);
    Outcome {
        plan: plan.name.clone(),
        faults: schedule.kinds(plan),
        events: injected.events,
        payments: infra.database.payments.snapshot().payments().count(),
        checks: check.checks(),
        observed: format!(
            "sent={} accepted_keys={} refused={:?} gave_up={} not_sent={} balance_reads={} payment_reads={} foreign_reads={} reads_gave_up={} throttled={} valid_token_refused={} hostile={}",
            observed.sent,
            observed.accepted.len(),
            observed.refused,
            observed.gave_up,
            observed.not_sent,
            observed.balance_reads,
            observed.payment_reads.values().map(Vec::len).sum::<usize>(),
            observed.foreign_reads,
            observed.reads_gave_up,
            observed.throttled,
            observed.valid_token_refused,
            observed.hostile_answered,
        ),
        sim_seconds: started.elapsed().as_secs_f64(),
    }
}

/// Every payment terminal and every one of its events notified.
fn quiescent(infra: &Infra) -> bool {
    let payments = infra.database.payments.snapshot();
    let notifications = infra.database.notifications.all();
    let mut expected = 0;
    for payment in payments.payments() {
        if !payment.status.is_terminal() {
            return false;
        }
        expected += 2;
    }
    notifications.len() >= expected
}

/// SPEC §6's invariants at quiescence.
fn check_invariants(
    check: &mut Checker,
    infra: &Infra,
    workload: &Workload,
    observed: &Observed,
    plan: &Plan,
    schedule: &Schedule,
) {
    let name = &plan.name;
    let ledger = infra.database.ledger.ledger();
    let payments = infra.database.payments.snapshot();

    // Conservation per currency; no negative balance.
    let mut opened: BTreeMap<Currency, Decimal> = BTreeMap::new();
    for account in &workload.accounts {
        *opened.entry(account.currency).or_default() += account.opening;
    }
    let totals = ledger.totals();
    check.check(totals == opened, || format!("{name}: conservation: opened {opened:?}, now {totals:?}"));
    for (id, account) in ledger.accounts() {
        check.check(account.balance >= Decimal::ZERO, || format!("{name}: account {id} is at {}", account.balance));
    }

    // At most one ledger effect per payment: none, or one debit and one credit of its amount.
    let mut effects: BTreeMap<PaymentId, usize> = BTreeMap::new();
    for entry in ledger.entries() {
        *effects.entry(entry.payment_id).or_default() += 1;
    }
    let stored: BTreeMap<PaymentId, _> = payments.payments().map(|p| (p.id, p)).collect();
    for (id, count) in &effects {
        check.check(*count == 2, || format!("{name}: payment {id} has {count} ledger rows"));
        check.check(stored.contains_key(id), || format!("{name}: ledger rows for unknown payment {id}"));
    }

    // At most one payment per (subject, idempotency key): every stored payment is named by exactly
    // one key, and every accepted answer for a key named that payment.
    let mut by_key: BTreeMap<PaymentId, usize> = BTreeMap::new();
    for pay in workload.payments() {
        if let Some(id) = payments.payment_of_key(&pay.subject, &pay.key) {
            *by_key.entry(id).or_default() += 1;
            check.check(stored.contains_key(&id), || {
                format!("{name}: ({:?}, {:?}) names payment {id}, which is not stored", pay.subject, pay.key)
            });
        }
    }
    for id in stored.keys() {
        let keys = by_key.get(id).copied().unwrap_or(0);
        check.check(keys == 1, || format!("{name}: payment {id} is named by {keys} idempotency keys"));
    }
    for ((subject, key), ids) in &observed.accepted {
        let truth = payments.payment_of_key(subject, key).map(|id| id.to_string());
        let expected: BTreeSet<String> = truth.into_iter().collect();
        check.check(*ids == expected, || {
            format!("{name}: ({subject:?}, {key:?}) answered {ids:?}, the store has {expected:?}")
        });
    }
    check.check(observed.conflicting_accepted.is_empty(), || {
        format!("{name}: conflicting replays accepted: {:?}", observed.conflicting_accepted)
    });
    check.check(observed.hostile_unexpected.is_empty(), || {
        format!("{name}: hostile requests answered unexpectedly: {:?}", observed.hostile_unexpected)
    });
    check.check(observed.negative_balances_read.is_empty(), || {
        format!("{name}: negative balances read: {:?}", observed.negative_balances_read)
    });

    // Payment reads: every status the payer read is on the payment's path (PENDING, then its final
    // status; never a terminal status other than the final one, never PENDING after a terminal
    // one); the payer's read of an accepted payment is never refused; another subject's is.
    for (id, reads) in &observed.payment_reads {
        let final_status = PaymentId::parse(id).ok().and_then(|id| stored.get(&id)).map(|p| p.status);
        let on_path = final_status.is_some_and(|last| {
            let mut terminal_seen = false;
            reads.iter().all(|read| {
                let ok = if read == PaymentStatus::Pending.as_str() { !terminal_seen } else { read == last.as_str() };
                terminal_seen |= read != PaymentStatus::Pending.as_str();
                ok
            })
        });
        check
            .check(on_path, || format!("{name}: payment {id} read as {reads:?}, its final status is {final_status:?}"));
    }
    check.check(observed.payer_reads_refused.is_empty(), || {
        format!("{name}: payers' reads of accepted payments refused: {:?}", observed.payer_reads_refused)
    });
    check.check(observed.foreign_reads_unexpected.is_empty(), || {
        format!("{name}: reads of another subject's payment not refused: {:?}", observed.foreign_reads_unexpected)
    });
    // A token minted valid is refused only by a gateway whose clock was skewed past the leeway.
    let leeway_ms = i64::try_from(crate::edge::gateway_config().jwt.leeway_seconds * 1000).expect("small");
    let gateway_skewed = schedule
        .events
        .iter()
        .any(|e| matches!(e.fault, Fault::ClockSkew { node: Node::Gateway, offset_ms } if offset_ms.abs() > leeway_ms));
    check.check(gateway_skewed || observed.valid_token_refused == 0, || {
        format!(
            "{name}: {} valid tokens refused (401) without a gateway clock skewed past the leeway",
            observed.valid_token_refused
        )
    });

    // Liveness and agreement: every payment terminal, its status the ledger's verdict, and exactly
    // one notification per event (initiated + its outcome).
    let unaffordable: BTreeSet<(String, String)> = workload
        .payments()
        .filter(|p| p.unaffordable)
        .map(|p| (p.subject.as_str().to_owned(), p.key.as_str().to_owned()))
        .collect();
    let mut notified: BTreeMap<(PaymentId, NotificationKind), usize> = BTreeMap::new();
    for notification in infra.database.notifications.all() {
        *notified.entry((notification.payment_id, notification.kind)).or_default() += 1;
    }
    for (id, payment) in &stored {
        check.check(payment.status.is_terminal(), || {
            let kinds: Vec<_> = notified.keys().filter(|(p, _)| p == id).map(|(_, k)| k).collect();
            format!(
                "{name}: payment {id} is {:?} {} ms after healing and the last client request (ledger verdict {:?}, notified {kinds:?})",
                payment.status,
                plan.liveness_ms,
                ledger.outcome(*id)
            )
        });
        let verdict = ledger.outcome(*id);
        check.check(verdict.map(|o| o.status()) == Some(payment.status), || {
            format!("{name}: payment {id} is {:?}, the ledger says {verdict:?}", payment.status)
        });
        let outcome_kind = match payment.status {
            PaymentStatus::Completed => NotificationKind::Completed,
            _ => NotificationKind::Failed,
        };
        for kind in [NotificationKind::Initiated, outcome_kind] {
            let count = notified.get(&(*id, kind)).copied().unwrap_or(0);
            check.check(count == 1, || format!("{name}: payment {id} has {count} {kind:?} notifications"));
        }
        let other = if outcome_kind == NotificationKind::Completed {
            NotificationKind::Failed
        } else {
            NotificationKind::Completed
        };
        check.check(!notified.contains_key(&(*id, other)), || format!("{name}: payment {id} notified {other:?}"));
    }
    for (subject, key) in &unaffordable {
        let status = workload
            .payments()
            .find(|p| p.subject.as_str() == subject && p.key.as_str() == key)
            .and_then(|p| payments.payment_of_key(&p.subject, &p.key))
            .and_then(|id| stored.get(&id).map(|p| p.status));
        check.check(status.is_none_or(|s| s == PaymentStatus::Failed), || {
            format!("{name}: an unaffordable payment ({subject}, {key}) ended {status:?}")
        });
    }
    let unknown: Vec<PaymentId> = notified.keys().map(|(id, _)| *id).filter(|id| !stored.contains_key(id)).collect();
    check.check(unknown.is_empty(), || format!("{name}: notifications of unknown payments {unknown:?}"));

    // No request served without a valid SVID.
    let audit = &infra.svid_audit;
    check.check(audit.served() > 0, || format!("{name}: no gRPC request was served at all"));
    let violations = audit.violations();
    check.check(violations.is_empty(), || {
        format!("{name}: {} requests served without a valid SVID, first {:?}", violations.len(), violations.first())
    });
}

/// Which (plan, seed) pairs a [`sweep`] runs, and how.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub plans: Vec<Plan>,
    /// Every plan runs every seed of `first_seed..first_seed + seeds`.
    pub first_seed: u64,
    pub seeds: u64,
    pub planted: Option<PlantedBug>,
    /// Worker threads (each runs one seed at a time in its own runtime).
    pub workers: usize,
    /// Run every pair twice through madsim's determinism check (one worker).
    pub check_determinism: bool,
    /// Stop at the first failing seed (the planted-bug hunts); otherwise run everything.
    pub stop_at_first_failure: bool,
}

/// One (plan, seed) of a sweep.
#[derive(Debug, Clone)]
pub struct SeedRun {
    pub plan: String,
    pub seed: u64,
    /// The outcome, or the failure message (which carries the replay command).
    pub result: Result<Outcome, String>,
    /// Real time the seed took.
    pub wall: Duration,
}

/// The job of a determinism check: `Runtime::check_determinism` takes a plain `fn`, so the pair
/// to run travels through here (determinism sweeps run one pair at a time).
static DETERMINISM_JOB: Mutex<Option<(Plan, Option<PlantedBug>)>> = Mutex::new(None);

fn determinism_job() -> impl std::future::Future<Output = Outcome> {
    let (plan, planted) = DETERMINISM_JOB.lock().unwrap_or_else(|p| p.into_inner()).clone().expect("a job is set");
    async move { run_seed(&plan, planted).await }
}

/// Runs `seed` of `plan` in a fresh madsim runtime; a panic (an invariant, a node) is the error.
pub fn run_one(plan: &Plan, seed: u64, planted: Option<PlantedBug>, check_determinism: bool) -> SeedRun {
    let started = std::time::Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if check_determinism {
            *DETERMINISM_JOB.lock().unwrap_or_else(|p| p.into_inner()) = Some((plan.clone(), planted));
            madsim::runtime::Runtime::check_determinism(seed, madsim::Config::default(), determinism_job)
        } else {
            let mut runtime = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
            // A seed that never quiesces fails instead of hanging the sweep.
            runtime.set_time_limit(plan.safety() + plan.liveness() * 3 + Duration::from_secs(60));
            runtime.block_on(run_seed(plan, planted))
        }
    }));
    let result = result.map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a non-text panic".to_owned());
        if message.contains(run::REPLAY_PREFIX) {
            message
        } else {
            format!("{message}\n{}{}", run::REPLAY_PREFIX, replay_command(&plan.name, seed, planted))
        }
    });
    SeedRun { plan: plan.name.clone(), seed, result, wall: started.elapsed() }
}

/// Runs the sweep (see [`Sweep`]); prints one progress line per finished plan. Pairs run in
/// plan order, seeds ascending, spread over the workers.
pub fn sweep(config: &Sweep) -> Vec<SeedRun> {
    let jobs: Vec<(usize, u64)> = (0..config.plans.len())
        .flat_map(|p| (config.first_seed..config.first_seed + config.seeds).map(move |s| (p, s)))
        .collect();
    let workers = if config.check_determinism { 1 } else { config.workers.max(1) };
    let next = AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let runs: Mutex<Vec<SeedRun>> = Mutex::new(Vec::with_capacity(jobs.len()));
    let done_per_plan: Mutex<Vec<u64>> = Mutex::new(vec![0; config.plans.len()]);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    if config.stop_at_first_failure && failed.load(Ordering::SeqCst) {
                        break;
                    }
                    let Some(&(p, seed)) = jobs.get(next.fetch_add(1, Ordering::SeqCst)) else { break };
                    let plan = &config.plans[p];
                    let run = run_one(plan, seed, config.planted, config.check_determinism);
                    if run.result.is_err() {
                        failed.store(true, Ordering::SeqCst);
                        run::print_line(&match config.planted {
                            // A planted bug hunt is looking for exactly this: say so, not "FAILED".
                            Some(bug) => format!("planted/{bug}: plan={} seed={seed} broke an invariant", plan.name),
                            None => format!("{TEST_TARGET}: plan={} seed={seed} FAILED", plan.name),
                        });
                    }
                    runs.lock().unwrap_or_else(|p| p.into_inner()).push(run);
                    let mut done = done_per_plan.lock().unwrap_or_else(|p| p.into_inner());
                    done[p] += 1;
                    if done[p] == config.seeds {
                        run::print_line(&format!("{TEST_TARGET}: plan {} done ({} seeds)", plan.name, config.seeds));
                    }
                }
            });
        }
    });
    let mut runs = runs.into_inner().unwrap_or_else(|p| p.into_inner());
    runs.sort_by(|a, b| (&a.plan, a.seed).cmp(&(&b.plan, b.seed)));
    runs
}

/// The sweep's report: per plan the seeds run and failed, the fault kinds drawn, fault events
/// injected, payments simulated, invariant checks made, real seconds and simulated payments per
/// real second; then the totals.
pub fn report(runs: &[SeedRun]) -> String {
    #[derive(Default)]
    struct Row {
        seeds: u64,
        failed: u64,
        kinds: BTreeSet<&'static str>,
        events: usize,
        payments: usize,
        checks: u64,
        wall: Duration,
    }
    let mut rows: BTreeMap<&str, Row> = BTreeMap::new();
    for run in runs {
        let row = rows.entry(&run.plan).or_default();
        row.seeds += 1;
        row.wall += run.wall;
        match &run.result {
            Ok(outcome) => {
                row.kinds.extend(outcome.faults.iter().copied());
                row.events += outcome.events;
                row.payments += outcome.payments;
                row.checks += outcome.checks;
            }
            Err(_) => row.failed += 1,
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<26} {:>5} {:>6} {:>7} {:>8} {:>9} {:>7} {:>9}  fault kinds drawn",
        "plan", "seeds", "failed", "faults", "payments", "checks", "wall_s", "pay/wall_s"
    );
    let mut total = Row::default();
    for (plan, row) in &rows {
        let _ = writeln!(
            out,
            "{plan:<26} {:>5} {:>6} {:>7} {:>8} {:>9} {:>7.1} {:>9.0}  {}",
            row.seeds,
            row.failed,
            row.events,
            row.payments,
            row.checks,
            row.wall.as_secs_f64(),
            row.payments as f64 / row.wall.as_secs_f64().max(0.001),
            row.kinds.iter().copied().collect::<Vec<_>>().join(",")
        );
        total.seeds += row.seeds;
        total.failed += row.failed;
        total.events += row.events;
        total.payments += row.payments;
        total.checks += row.checks;
        total.wall += row.wall;
    }
    let _ = writeln!(
        out,
        "{:<26} {:>5} {:>6} {:>7} {:>8} {:>9} {:>7.1} {:>9.0}",
        "TOTAL",
        total.seeds,
        total.failed,
        total.events,
        total.payments,
        total.checks,
        total.wall.as_secs_f64(),
        total.payments as f64 / total.wall.as_secs_f64().max(0.001)
    );
    out
}

/// The summary line of one seed (for `SECUREPAY_SIM_VERBOSE=1` and single-seed replays).
pub fn summary(run: &SeedRun) -> String {
    match &run.result {
        Ok(outcome) => format!(
            "{TEST_TARGET} plan={} seed={} faults={:?} events={} payments={} checks={} {} sim_s={:.1} wall_s={:.2}",
            outcome.plan,
            run.seed,
            outcome.faults,
            outcome.events,
            outcome.payments,
            outcome.checks,
            outcome.observed,
            outcome.sim_seconds,
            run.wall.as_secs_f64(),
        ),
        Err(message) => format!("{TEST_TARGET} plan={} seed={} FAILED: {message}", run.plan, run.seed),
    }
}
