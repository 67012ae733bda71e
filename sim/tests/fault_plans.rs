//! Every fault plan of `fault-plans/`, played by the `Injector` onto the simulated infrastructure
//! (database, cache, broker, SPIRE nodes) while a probe on each of the four service nodes keeps
//! using every port through `ServicePorts` — the infrastructure half of the whole-platform
//! simulation, checked on its own.
//!
//! Safety phase: the plan's faults, drawn from the seed. Then everything is healed and, within the
//! plan's liveness bound, every service node must again: read the database, use the cache (a
//! balance put and invalidated is gone: not stale), publish
//! to and consume from the broker (a record published after healing), and hold a valid SVID. This
//! proves each fault is injected *and* healed — a partition left clogged, a node never restarted,
//! a switch left on, an SVID never renewed all fail the run with its replay command.
//!
//! Run: `MADSIM_TEST_SEED=1 MADSIM_TEST_NUM=5 cargo sim --test fault_plans`.
#![cfg(madsim)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::rand::thread_rng;
use rust_decimal::Decimal;
use securepay_core::ids::{AccountId, Subject};
use securepay_core::money::Currency;
use securepay_ports::{
    AccountView, BalanceCache, CachedBalance, EventConsumer, EventLog, LedgerStore, OutgoingRecord, SvidSource,
};
use securepay_sim::infra::{Infra, Injector, ServicePorts};
use securepay_sim::plan::{Node, Plan, Schedule};
use securepay_sim::run::{self, Checker};
use tokio::time::{Instant, sleep};

const TEST: &str = "fault_plans";
const PROBE_TOPIC: &str = "probe";
const PROBE_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Probe {
    Database,
    Cache,
    Publish,
    Consume,
    Svid,
}

const PROBES: [Probe; 5] = [Probe::Database, Probe::Cache, Probe::Publish, Probe::Consume, Probe::Svid];

/// Per (service node, probe): the last time it succeeded, and how often it failed.
#[derive(Debug, Default)]
struct Stats {
    last_ok: BTreeMap<(Node, Probe), Instant>,
    failures: BTreeMap<Probe, u64>,
}

type Shared = Arc<Mutex<Stats>>;

fn note(stats: &Shared, node: Node, probe: Probe, ok: bool) {
    let mut stats = stats.lock().unwrap();
    if ok {
        stats.last_ok.insert((node, probe), Instant::now());
    } else {
        *stats.failures.entry(probe).or_default() += 1;
    }
}

/// The cache works and is not stale: a balance put, invalidated, then read is gone (a stale-cache
/// switch left on keeps it; an outage or partition refuses).
async fn cache_round_trip(ports: &ServicePorts, node: Node, id: AccountId) -> bool {
    let entry = CachedBalance {
        account: AccountView {
            id,
            owner: Subject::parse(node.name()).expect("a node name is a valid subject"),
            currency: Currency::from_code("EUR").expect("a known currency"),
            balance: Decimal::ONE,
        },
        cached_at: ports.clock.now(),
    };
    ports.balances.put(&entry, 5).await.is_ok()
        && ports.balances.invalidate(&[id]).await.is_ok()
        && matches!(ports.balances.get(id).await, Ok(None))
}

/// A service node's probe: every port, over and over, until the node dies.
async fn probe(node: Node, ports: ServicePorts, stats: Shared) {
    let group = format!("probe-{node}");
    let mut consumer = ports.consumer(&group, &[PROBE_TOPIC]);
    let unknown = AccountId::from_uuid(uuid::Uuid::from_u128(u128::from(u32::from(node as u8))));
    loop {
        note(&stats, node, Probe::Database, ports.ledger.account(unknown).await.is_ok());
        note(&stats, node, Probe::Cache, cache_round_trip(&ports, node, unknown).await);
        let record =
            OutgoingRecord { topic: PROBE_TOPIC.into(), key: node.name().into(), payload: vec![], headers: vec![] };
        note(&stats, node, Probe::Publish, ports.events.publish(&[record]).await.is_ok());
        match consumer.poll(100, PROBE_PAUSE).await {
            Ok(records) if !records.is_empty() => {
                let last = records.last().expect("non-empty").position.clone();
                note(&stats, node, Probe::Consume, consumer.commit(&[last]).await.is_ok());
            }
            Ok(_) => {}
            Err(_) => note(&stats, node, Probe::Consume, false),
        }
        note(&stats, node, Probe::Svid, matches!(ports.svid.current().await, Ok(Some(_))));
        sleep(PROBE_PAUSE).await;
    }
}

async fn run_plan(name: &str) {
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    let plan = Plan::named(name).unwrap_or_else(|e| panic!("{e}"));
    let schedule = Schedule::draw(&plan, &mut thread_rng()).unwrap_or_else(|e| panic!("{e}"));
    let mut infra = Infra::start(&plan);
    infra.groups.extend(Node::SERVICES.iter().map(|n| format!("probe-{n}")));
    let stats = Shared::default();
    for node in Node::SERVICES {
        let stats = Arc::clone(&stats);
        infra.start_service(node, move |ports| probe(node, ports, Arc::clone(&stats)));
    }

    let injector = Injector::new(&infra);
    let injected = injector.run(&schedule).await;
    check.check(injected.events == schedule.events.len(), || {
        format!("{} of {} events injected", injected.events, schedule.events.len())
    });

    // Liveness: healed; every probe of every service succeeds again within the bound.
    let healed = Instant::now();
    let deadline = healed + plan.liveness();
    let lagging = || {
        let stats = stats.lock().unwrap();
        let mut lagging = Vec::new();
        for node in Node::SERVICES {
            for probe in PROBES {
                if stats.last_ok.get(&(node, probe)).is_none_or(|&at| at <= healed) {
                    lagging.push(format!("{node}/{probe:?}"));
                }
            }
        }
        lagging
    };
    while !lagging().is_empty() && Instant::now() < deadline {
        sleep(Duration::from_millis(100)).await;
    }
    let recovered_ms = healed.elapsed().as_millis();
    let lagging = lagging();
    check.check(lagging.is_empty(), || {
        format!("{name}: not recovered within {} ms of healing: {lagging:?}", plan.liveness_ms)
    });
    let failures = stats.lock().unwrap().failures.clone();
    run::print_line(&format!(
        "{TEST} plan={name} seed={} faults={:?} events={} failures={failures:?} recovered_ms={recovered_ms} checks={}",
        run::seed(),
        schedule.kinds(&plan),
        injected.events,
        check.checks(),
    ));
}

macro_rules! plan_tests {
    ($($test:ident => $plan:literal,)*) => {
        $(
            #[madsim::test]
            async fn $test() {
                run_plan($plan).await;
            }
        )*

        /// Every plan file has a test above (a new plan must be added here).
        #[test]
        fn every_plan_has_a_test() {
            let tested = [$($plan),*];
            for name in securepay_sim::plan::plan_names().unwrap() {
                assert!(tested.contains(&name.as_str()), "fault-plans/{name}.toml has no test in {}", file!());
            }
        }
    };
}

plan_tests! {
    partition_broker => "partition-broker",
    partition_database => "partition-database",
    partition_gateway_payment => "partition-gateway-payment",
    kill_gateway => "kill-gateway",
    kill_payment => "kill-payment",
    kill_account => "kill-account",
    kill_notification => "kill-notification",
    broker_outage => "broker-outage",
    database_outage => "database-outage",
    cache_faults => "cache-faults",
    duplicates_and_delays => "duplicates-and-delays",
    rebalance => "rebalance",
    clock_skew => "clock-skew",
    svid_expiry => "svid-expiry",
    swarm => "swarm",
}
