//! Settlement over a faulty network: client nodes settle seeded transfers on a ledger node over
//! madsim-tonic while the harness clogs and unclogs the links between them. Timed-out calls are
//! retried with the same event and payment ids, so the store sees duplicates and late deliveries.
//!
//! Safety phase: workload plus link clogs drawn from the seed. Liveness phase: every link healed,
//! every client must reach a verdict for each of its payments within a bound. Then the invariants
//! of SPEC §6: conservation per currency, no negative balance, at most one effect per payment,
//! every client-observed verdict is the ledger's, every payment has a verdict, one outcome event
//! per settled payment.
//!
//! Run: `MADSIM_TEST_SEED=1 MADSIM_TEST_NUM=20 cargo sim --test ledger_over_grpc`.
#![cfg(madsim)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use madsim::net::NetSim;
use madsim::rand::{Rng, thread_rng};
use madsim::runtime::{Handle, NodeHandle};
use rust_decimal::Decimal;
use securepay_core::ids::{AccountId, PaymentId, Subject};
use securepay_core::ledger::Transfer;
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::Outcome;
use securepay_memory::{MemoryLedgerStore, SeededIds, SimClock};
use securepay_ports::{Ids, LedgerStore, Outbox, SettlementRequest};
use securepay_sim::ledger_node::{
    LEDGER_NODE_PORT, LedgerNode, LedgerNodeClient, LedgerNodeServer, outcome_code, parse_outcome, to_wire,
};
use securepay_sim::run::{self, Checker};
use tokio::time::{Instant, sleep, timeout};
use tonic::transport::{Endpoint, Server};

const TEST: &str = "ledger_over_grpc";

const CLIENT_COUNT: u8 = 3;
const TRANSFERS_PER_CLIENT: usize = 40;
const CURRENCIES: [&str; 2] = ["EUR", "TRY"];
const ACCOUNTS_PER_CURRENCY: usize = 3;
const OPENING_MINOR_MIN: i64 = 5_000;
const OPENING_MINOR_MAX: i64 = 50_000;
const AMOUNT_MINOR_MAX: i64 = 5_000;
/// Per mille of transfers sent in a currency other than the payer's, or to an unknown account
/// (otherwise the payee is another account of the payer's currency).
const CURRENCY_MISMATCH_PER_MILLE: u32 = 50;
const UNKNOWN_PAYEE_PER_MILLE: u32 = 30;

/// Every call is bounded: simulated TCP never gives up on a clogged link by itself.
const CALL_TIMEOUT_MS: u64 = 250;
const BACKOFF_MS_MAX: u64 = 100;
const PAUSE_MS_MAX: u64 = 300;
/// A payment still without a verdict after this many attempts is a liveness failure.
const ATTEMPTS_MAX: u32 = 400;

const SAFETY_PHASE_MS: u64 = 8_000;
/// After healing, every client must be done within this much simulated time.
const LIVENESS_BOUND_MS: u64 = 20_000;

/// What one client saw.
#[derive(Debug, Default)]
struct ClientReport {
    verdicts: Vec<(PaymentId, Outcome)>,
    unresolved: Vec<PaymentId>,
    retries: u64,
    duplicates: u64,
}

/// The fault parameters of one seed, drawn from it (TigerBeetle's VOPR style).
#[derive(Debug)]
struct FaultPlan {
    clog_gap_ms_max: u64,
    clog_ms_max: u64,
}

#[madsim::test]
async fn settlement_over_clogged_links_conserves_money_and_settles_each_payment_once() {
    run::print_replay_command_on_panic(TEST);
    let started = Instant::now();
    let mut rng = thread_rng();
    let faults = FaultPlan { clog_gap_ms_max: rng.gen_range(50..=1_500), clog_ms_max: rng.gen_range(100..=3_000) };

    let store = MemoryLedgerStore::new();
    let accounts = open_accounts(&store);
    let opening_totals = store.ledger().totals();

    // The store lives outside the node (the durable half); the node only serves it.
    let ledger_ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let ledger_addr = SocketAddr::new(ledger_ip, LEDGER_NODE_PORT);
    let handle = Handle::current();
    let ledger_node = handle
        .create_node()
        .name("ledger")
        .ip(ledger_ip)
        .init({
            let store = store.clone();
            move || serve_ledger(store.clone(), ledger_addr)
        })
        .build();

    let mut plans = Vec::new();
    for _ in 0..CLIENT_COUNT {
        plans.push(plan_transfers(&accounts));
    }
    let mut clients: Vec<(NodeHandle, tokio::task::JoinHandle<ClientReport>)> = Vec::new();
    for (index, plan) in (1..=CLIENT_COUNT).zip(plans.iter().cloned()) {
        let node =
            handle.create_node().name(format!("client-{index}")).ip(IpAddr::V4(Ipv4Addr::new(10, 0, 1, index))).build();
        let join = node.spawn(run_client(ledger_addr, plan));
        clients.push((node, join));
    }

    // Safety phase: clog one client's link to or from the ledger at a time, at seeded moments.
    let net = NetSim::current();
    let ledger_id = ledger_node.id();
    let safety_end = Instant::now() + Duration::from_millis(SAFETY_PHASE_MS);
    let mut clogs = 0_u64;
    while Instant::now() < safety_end {
        sleep(Duration::from_millis(rng.gen_range(0..=faults.clog_gap_ms_max))).await;
        let client = clients[rng.gen_range(0..clients.len())].0.id();
        // Replies lost more often than requests: a settled request whose reply is lost is what
        // makes a retry a duplicate.
        let links: &[_] = match rng.gen_range(0..4) {
            0 => &[(client, ledger_id)],
            1 => &[(client, ledger_id), (ledger_id, client)],
            _ => &[(ledger_id, client)],
        };
        for &(src, dst) in links {
            net.clog_link(src, dst);
        }
        clogs += 1;
        sleep(Duration::from_millis(rng.gen_range(10..=faults.clog_ms_max))).await;
        for &(src, dst) in links {
            net.unclog_link(src, dst);
        }
    }

    // Liveness phase: everything healed; every client must finish within the bound.
    for (node, _) in &clients {
        net.unclog_link(node.id(), ledger_id);
        net.unclog_link(ledger_id, node.id());
    }
    let mut check = Checker::new(TEST);
    let liveness_end = Instant::now() + Duration::from_millis(LIVENESS_BOUND_MS);
    let mut reports = Vec::new();
    for (index, (_, join)) in (1..).zip(clients) {
        let left = liveness_end.saturating_duration_since(Instant::now());
        let report = timeout(left, join).await;
        check.check(report.is_ok(), || {
            format!("client-{index} did not finish within {LIVENESS_BOUND_MS} ms of healing")
        });
        reports.push(report.expect("checked").expect("client task"));
    }

    // Invariants.
    let ledger = store.ledger();
    check.check(ledger.totals() == opening_totals, || {
        format!("totals {:?} != opening {opening_totals:?}", ledger.totals())
    });
    for (id, account) in ledger.accounts() {
        check.check(account.balance >= Decimal::ZERO, || format!("account {id} is negative: {}", account.balance));
    }
    let mut entries_per_payment: BTreeMap<PaymentId, usize> = BTreeMap::new();
    for entry in ledger.entries() {
        *entries_per_payment.entry(entry.payment_id).or_default() += 1;
    }
    let sent: BTreeSet<PaymentId> = plans.iter().flatten().map(|r| r.transfer.payment_id).collect();
    check.check(sent.len() == plans.iter().map(Vec::len).sum::<usize>(), || "payment ids repeat across the plan");
    for payment in entries_per_payment.keys() {
        check.check(sent.contains(payment), || format!("ledger rows for payment {payment} nobody sent"));
    }
    let mut verdicts: BTreeMap<&str, u64> = BTreeMap::new();
    for &payment in &sent {
        let rows = entries_per_payment.get(&payment).copied().unwrap_or(0);
        let recorded = ledger.outcome(payment);
        check.check(recorded.is_some(), || format!("payment {payment} reached no verdict in the ledger"));
        check.check(rows == 0 || rows == 2, || {
            format!("payment {payment} has {rows} ledger rows (settled more than once?)")
        });
        check.check((rows == 2) == (recorded == Some(Outcome::Completed)), || {
            format!("payment {payment}: {rows} ledger rows but verdict {recorded:?}")
        });
        if let Some(outcome) = recorded {
            *verdicts.entry(outcome_code(outcome)).or_default() += 1;
        }
    }
    let mut observed: BTreeMap<PaymentId, Outcome> = BTreeMap::new();
    for report in &reports {
        check.check(report.unresolved.is_empty(), || {
            format!("payments without a verdict after {ATTEMPTS_MAX} attempts: {:?}", report.unresolved)
        });
        for &(payment, outcome) in &report.verdicts {
            check.check(ledger.outcome(payment) == Some(outcome), || {
                format!("client saw {outcome:?} for {payment}, the ledger recorded {:?}", ledger.outcome(payment))
            });
            observed.insert(payment, outcome);
        }
    }
    check.check(observed.len() == sent.len(), || {
        format!("{} of {} payments got a verdict at their client", observed.len(), sent.len())
    });
    let outbox = store.unpublished(usize::MAX).await.expect("outbox");
    check.check(outbox.len() == sent.len(), || {
        format!("{} outcome events for {} settled payments", outbox.len(), sent.len())
    });

    let retries: u64 = reports.iter().map(|r| r.retries).sum();
    let duplicates: u64 = reports.iter().map(|r| r.duplicates).sum();
    run::print_line(&format!(
        "{TEST} seed={} transfers={} retries={retries} duplicates_seen={duplicates} clogs={clogs} verdicts={verdicts:?} checks={} sim_ms={}",
        run::seed(),
        sent.len(),
        check.checks(),
        started.elapsed().as_millis(),
    ));
}

/// Opens `ACCOUNTS_PER_CURRENCY` accounts per currency with seeded opening balances.
fn open_accounts(store: &MemoryLedgerStore) -> Vec<(AccountId, Currency)> {
    let mut rng = thread_rng();
    let owner = Subject::parse("sim-owner").expect("valid subject");
    let mut accounts = Vec::new();
    for code in CURRENCIES {
        let currency = Currency::from_code(code).expect("supported currency");
        for _ in 0..ACCOUNTS_PER_CURRENCY {
            let id = AccountId::from_uuid(SeededIds.uuid());
            let opening = Decimal::new(rng.gen_range(OPENING_MINOR_MIN..=OPENING_MINOR_MAX), currency.minor_units());
            store.open(id, owner.clone(), currency, opening).expect("fresh account");
            accounts.push((id, currency));
        }
    }
    accounts
}

/// One client's transfers: ids, accounts and amounts drawn from the seed; ids minted once, here,
/// so every retry resends the same ones.
fn plan_transfers(accounts: &[(AccountId, Currency)]) -> Vec<SettlementRequest> {
    let mut rng = thread_rng();
    (0..TRANSFERS_PER_CLIENT)
        .map(|_| {
            let (from, payer_currency) = accounts[rng.gen_range(0..accounts.len())];
            let to = if rng.gen_range(0..1_000) < UNKNOWN_PAYEE_PER_MILLE {
                AccountId::from_uuid(SeededIds.uuid())
            } else {
                let others: Vec<_> = accounts.iter().filter(|&&(id, c)| id != from && c == payer_currency).collect();
                others[rng.gen_range(0..others.len())].0
            };
            let currency = if rng.gen_range(0..1_000) < CURRENCY_MISMATCH_PER_MILLE {
                Currency::from_code(
                    CURRENCIES.iter().copied().find(|c| *c != payer_currency.code()).expect("two currencies"),
                )
                .expect("supported currency")
            } else {
                payer_currency
            };
            let value = Decimal::new(rng.gen_range(1..=AMOUNT_MINOR_MAX), currency.minor_units());
            SettlementRequest {
                event_id: SeededIds.event_id(),
                transfer: Transfer {
                    payment_id: SeededIds.payment_id(),
                    from,
                    to,
                    amount: Amount::new(value, currency, AmountPolicy::default()).expect("valid amount"),
                },
                outcome_event_id: SeededIds.event_id(),
                outcome_headers: Vec::new(),
            }
        })
        .collect()
}

/// The ledger node's task: serve settlement over the store until the node dies.
async fn serve_ledger(store: MemoryLedgerStore, addr: SocketAddr) {
    let store: Arc<dyn LedgerStore> = Arc::new(store);
    let node = LedgerNode::new(store, Arc::new(SimClock));
    Server::builder().add_service(LedgerNodeServer::new(node)).serve(addr).await.expect("ledger node serves");
}

/// Sends each planned transfer until it gets a verdict, retrying timeouts and errors with the
/// same ids, at most `ATTEMPTS_MAX` times each.
async fn run_client(ledger_addr: SocketAddr, plan: Vec<SettlementRequest>) -> ClientReport {
    let mut rng = thread_rng();
    let channel = Endpoint::from_shared(format!("http://{ledger_addr}")).expect("valid uri").connect_lazy();
    let mut client = LedgerNodeClient::new(channel);
    let mut report = ClientReport::default();
    for request in plan {
        let payment = request.transfer.payment_id;
        let wire = to_wire(&request);
        let mut verdict = None;
        for _attempt in 1..=ATTEMPTS_MAX {
            if let Ok(Ok(reply)) = timeout(Duration::from_millis(CALL_TIMEOUT_MS), client.settle(wire.clone())).await {
                let reply = reply.into_inner();
                report.duplicates += u64::from(reply.duplicate);
                verdict = Some(parse_outcome(&reply.outcome).expect("the node answers a known outcome code"));
                break;
            }
            report.retries += 1;
            sleep(Duration::from_millis(rng.gen_range(1..=BACKOFF_MS_MAX))).await;
        }
        match verdict {
            Some(outcome) => report.verdicts.push((payment, outcome)),
            None => report.unresolved.push(payment),
        }
        sleep(Duration::from_millis(rng.gen_range(0..=PAUSE_MS_MAX))).await;
    }
    report
}
