//! The infrastructure nodes of `securepay_sim::remote`: the twins served from their own madsim
//! nodes, reached by service nodes through the port clients, so that partitions, outages and
//! kills hit them.
//!
//! - a call across a partition is `Unavailable` (bounded), the same call after healing succeeds;
//! - a settlement whose reply is lost committed anyway, and its retry is a duplicate with the
//!   first verdict (applied-but-unacknowledged);
//! - an outage refuses without writing; a killed database node keeps every committed call;
//! - a consumer killed before committing has its records redelivered to the next member of its
//!   group (after the session timeout), from the committed offset on; a broker restart forgets
//!   the membership and the consumer rejoins from the commit;
//! - duplicated deliveries arrive twice;
//! - the cache faults of a plan (outage, partition, stale = lost invalidations) played by the
//!   `Injector` onto `Infra`'s cache node refuse or go stale, and heal.
//!
//! Run: `MADSIM_TEST_SEED=1 MADSIM_TEST_NUM=5 cargo sim --test infrastructure`.
#![cfg(madsim)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle};
use rust_decimal::Decimal;
use securepay_core::ids::{AccountId, Subject};
use securepay_core::ledger::{Settled, Transfer};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::Outcome;
use securepay_memory::{MemoryEventLog, SeededIds, SimClock};
use securepay_ports::{Clock, EventConsumer, EventLog, Ids, LedgerStore, OutgoingRecord, PortError, SettlementRequest};
use securepay_sim::remote::{
    BROKER_PORT, Broker, BrokerFaults, DATABASE_PORT, Database, RemoteClient, RemoteConsumer, RemoteEventLog,
    RemoteLedgerStore, SESSION_TIMEOUT, ServerFaults, serve,
};
use securepay_sim::run::{self, Checker};
use tokio::time::{Instant, sleep};

const TEST: &str = "infrastructure";
const DOWN: PortError = PortError::Unavailable { component: "postgresql" };
const KAFKA_DOWN: PortError = PortError::Unavailable { component: "kafka" };

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

/// A database node serving `db` (created here, outside the node: the durable half).
fn database_node(db: &Database, faults: &Arc<ServerFaults>) -> (NodeHandle, SocketAddr) {
    let addr = SocketAddr::new(ip(10), DATABASE_PORT);
    let node = Handle::current()
        .create_node()
        .name("database")
        .ip(addr.ip())
        .init({
            let (db, faults) = (db.clone(), Arc::clone(faults));
            move || serve(addr, db.clone(), Arc::clone(&faults))
        })
        .build();
    (node, addr)
}

fn broker_node(log: &MemoryEventLog, faults: &Arc<BrokerFaults>) -> (NodeHandle, SocketAddr) {
    let addr = SocketAddr::new(ip(11), BROKER_PORT);
    let node = Handle::current()
        .create_node()
        .name("broker")
        .ip(addr.ip())
        .init({
            let (log, faults) = (log.clone(), Arc::clone(faults));
            // Membership is node state: a new `Broker` per node lifetime, over the durable log.
            move || {
                let (log, faults) = (log.clone(), Arc::clone(&faults));
                async move { Broker::new(log, faults).serve(addr, ServerFaults::new()).await }
            }
        })
        .build();
    (node, addr)
}

fn service_node(name: &str, last: u8) -> NodeHandle {
    Handle::current().create_node().name(name).ip(ip(last)).build()
}

fn eur() -> Currency {
    Currency::from_code("EUR").expect("supported")
}

/// Two EUR accounts with 100.00 each.
fn open_two(db: &Database) -> (AccountId, AccountId) {
    let owner = Subject::parse("sim-owner").expect("valid");
    let (a, b) = (AccountId::from_uuid(SeededIds.uuid()), AccountId::from_uuid(SeededIds.uuid()));
    for id in [a, b] {
        db.ledger.open(id, owner.clone(), eur(), Decimal::new(10_000, 2)).expect("fresh account");
    }
    (a, b)
}

fn transfer(from: AccountId, to: AccountId, minor: i64) -> SettlementRequest {
    SettlementRequest {
        event_id: SeededIds.event_id(),
        transfer: Transfer {
            payment_id: SeededIds.payment_id(),
            from,
            to,
            amount: Amount::new(Decimal::new(minor, 2), eur(), AmountPolicy::default()).expect("valid"),
        },
        outcome_event_id: SeededIds.event_id(),
        outcome_headers: Vec::new(),
    }
}

#[madsim::test]
async fn database_calls_fail_as_unavailable_across_partitions_outages_and_kills_and_keep_committed_work() {
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    let net = NetSim::current();
    let db = Database::default();
    let (a, b) = open_two(&db);
    let faults = ServerFaults::new();
    let (db_node, db_addr) = database_node(&db, &faults);
    let account = service_node("account", 3);
    let store = account
        .spawn(async move { RemoteLedgerStore(RemoteClient::connect(db_addr, "postgresql").await) })
        .await
        .expect("client");
    // Runs a block on the account node (where the client lives) and waits for it.
    macro_rules! on_account {
        ($body:expr) => {
            account.spawn(async move { $body }).await.expect("account task")
        };
    }

    // Reachable: the account reads back.
    let s = store.clone();
    let read = on_account!(s.account(a).await.map(|v| v.map(|v| v.balance)));
    check.check(read == Ok(Some(Decimal::new(10_000, 2))), || format!("read before any fault: {read:?}"));

    // Partitioned: Unavailable, then the same call succeeds after healing.
    net.clog_link(account.id(), db_node.id());
    net.clog_link(db_node.id(), account.id());
    let s = store.clone();
    let read = on_account!(s.account(a).await.map(|v| v.map(|v| v.balance)));
    check.check(read == Err(DOWN), || format!("read across a partition: {read:?}"));
    net.unclog_link(account.id(), db_node.id());
    net.unclog_link(db_node.id(), account.id());
    let s = store.clone();
    let read = on_account!(s.account(a).await.map(|v| v.map(|v| v.balance)));
    check.check(read == Ok(Some(Decimal::new(10_000, 2))), || format!("read after healing: {read:?}"));

    // Reply lost (the link back is clogged): the settlement committed, the caller saw Unavailable;
    // its retry with the same ids is a duplicate carrying the first verdict.
    let request = transfer(a, b, 2_500);
    net.clog_link(db_node.id(), account.id());
    let (s, r) = (store.clone(), request.clone());
    let first = on_account!(s.settle(&[r], SimClock.now()).await.map(|_| ()));
    check.check(first == Err(DOWN), || format!("settle with its reply lost: {first:?}"));
    check.check(
        db.ledger.ledger().outcome(request.transfer.payment_id) == Some(Outcome::Completed),
        || "the settlement whose reply was lost did not commit",
    );
    net.unclog_link(db_node.id(), account.id());
    let (s, r) = (store.clone(), request.clone());
    let retry = on_account!(s.settle(&[r], SimClock.now()).await);
    let settled = retry.as_ref().map(|results| results.iter().map(|r| r.settled).collect::<Vec<_>>());
    check.check(settled == Ok(vec![Settled::Duplicate(Outcome::Completed)]), || format!("retry: {retry:?}"));

    // Outage: refused, nothing written.
    faults.set_down(true);
    let request = transfer(a, b, 100);
    let (s, r) = (store.clone(), request.clone());
    let during = on_account!(s.settle(&[r], SimClock.now()).await.map(|_| ()));
    check.check(during == Err(DOWN), || format!("settle during an outage: {during:?}"));
    check.check(db.ledger.ledger().outcome(request.transfer.payment_id).is_none(), || "an outage wrote");
    faults.set_down(false);

    // Killed database node: Unavailable while down; after restart every committed call is there.
    Handle::current().kill(db_node.id());
    let s = store.clone();
    let read = on_account!(s.account(b).await.map(|v| v.map(|v| v.balance)));
    check.check(read == Err(DOWN), || format!("read from a killed database: {read:?}"));
    Handle::current().restart(db_node.id());
    sleep(Duration::from_millis(50)).await;
    let s = store.clone();
    let read = on_account!(s.account(b).await.map(|v| v.map(|v| v.balance)));
    check.check(read == Ok(Some(Decimal::new(12_500, 2))), || format!("read after the restart: {read:?}"));

    // The lost-reply switch: the call commits, its reply is dropped, the caller sees Unavailable.
    faults.lose_replies(1000);
    let request = transfer(b, a, 100);
    let (s, r) = (store.clone(), request.clone());
    let lost = on_account!(s.settle(&[r], SimClock.now()).await.map(|_| ()));
    faults.lose_replies(0);
    check.check(lost == Err(DOWN), || format!("settle with the reply dropped: {lost:?}"));
    check.check(
        db.ledger.ledger().outcome(request.transfer.payment_id) == Some(Outcome::Completed),
        || "the settlement whose reply was dropped did not commit",
    );
    check.check(faults.lost_replies() == 1, || format!("{} replies dropped", faults.lost_replies()));
    run::print_line(&format!("{TEST}/database seed={} checks={}", run::seed(), check.checks()));
}

fn record(i: u8) -> OutgoingRecord {
    OutgoingRecord { topic: "payments".into(), key: "k".into(), payload: vec![i], headers: vec![] }
}

/// Polls until `want` payloads arrived or `bound` passed; returns what arrived in order.
async fn poll_until(consumer: &mut RemoteConsumer, want: usize, bound: Duration) -> Vec<u8> {
    let deadline = Instant::now() + bound;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        if let Ok(records) = consumer.poll(100, Duration::from_millis(200)).await {
            got.extend(records.into_iter().map(|r| r.payload[0]));
        }
    }
    got
}

#[madsim::test]
async fn a_consumer_killed_before_committing_has_its_records_redelivered_to_the_next_member() {
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    // One partition: the order of delivery is the order of publishing.
    let log = MemoryEventLog::with_partitions(1);
    let broker_faults = BrokerFaults::new();
    let (broker, broker_addr) = broker_node(&log, &broker_faults);
    let group = "account-service-group";

    // A publisher publishes 10 records through the broker node.
    let publisher = service_node("payment", 2);
    let published = publisher
        .spawn(async move {
            let events = RemoteEventLog(RemoteClient::connect(broker_addr, "kafka").await);
            events.publish(&(0..10).map(record).collect::<Vec<_>>()).await
        })
        .await
        .unwrap();
    check.check(published.is_ok(), || format!("publish: {published:?}"));

    // The first member takes everything, commits up to record 3, and dies.
    let first = service_node("account-1", 3);
    let got = first.spawn(async move {
        let mut consumer = RemoteConsumer::new(RemoteClient::connect(broker_addr, "kafka").await, group, &["payments"]);
        let got = consumer.poll(100, Duration::from_millis(500)).await.expect("poll");
        consumer.commit(&[got[3].position.clone()]).await.expect("commit");
        // Keep the consumer alive (and its node busy) until the node is killed.
        sleep(Duration::from_secs(3_600)).await;
        drop(consumer);
    });
    sleep(Duration::from_millis(800)).await;
    check.check(log.committed(group, "payments", 0) == Some(4), || {
        format!("first member's commit: {:?}", log.committed(group, "payments", 0))
    });
    Handle::current().kill(first.id());
    drop(got);

    // The next member gets records 4..=9 — only after the dead member's session expired.
    let second = service_node("account-2", 4);
    let redelivered = second
        .spawn(async move {
            let mut consumer =
                RemoteConsumer::new(RemoteClient::connect(broker_addr, "kafka").await, group, &["payments"]);
            let got = poll_until(&mut consumer, 6, SESSION_TIMEOUT * 4).await;
            (consumer, got)
        })
        .await
        .unwrap();
    let (mut consumer, got) = redelivered;
    check.check(got == vec![4, 5, 6, 7, 8, 9], || format!("the next member got {got:?}, not records 4..=9"));

    // The broker restarts: it forgets the membership; the consumer rejoins from the commit (4).
    Handle::current().kill(broker.id());
    Handle::current().restart(broker.id());
    sleep(Duration::from_millis(50)).await;
    let again = second
        .spawn(async move {
            let before = consumer.commit(&[]).await;
            let got = poll_until(&mut consumer, 6, Duration::from_secs(5)).await;
            (before, got)
        })
        .await
        .unwrap();
    check.check(again.0 == Err(KAFKA_DOWN), || format!("a commit by a forgotten member: {:?}", again.0));
    check.check(again.1 == vec![4, 5, 6, 7, 8, 9], || format!("after the broker restart: {:?}", again.1));
    run::print_line(&format!("{TEST}/consumer seed={} checks={}", run::seed(), check.checks()));
}

#[madsim::test]
async fn the_broker_duplicates_deliveries_and_refuses_during_an_outage() {
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    let log = MemoryEventLog::with_partitions(1);
    let broker_faults = BrokerFaults::new();
    let addr = SocketAddr::new(ip(11), BROKER_PORT);
    let server_faults = ServerFaults::new();
    Handle::current()
        .create_node()
        .name("broker")
        .ip(addr.ip())
        .init({
            let (log, faults, server) = (log.clone(), Arc::clone(&broker_faults), Arc::clone(&server_faults));
            move || {
                let (log, faults, server) = (log.clone(), Arc::clone(&faults), Arc::clone(&server));
                async move { Broker::new(log, faults).serve(addr, server).await }
            }
        })
        .build();
    let node = service_node("notification", 5);
    let (f, s) = (Arc::clone(&broker_faults), Arc::clone(&server_faults));
    let (outage, got) = node
        .spawn(async move {
            let client: RemoteClient<Broker> = RemoteClient::connect(addr, "kafka").await;
            let events = RemoteEventLog(client.clone());
            s.set_down(true);
            let outage = events.publish(&[record(0)]).await;
            s.set_down(false);
            events.publish(&(0..3).map(record).collect::<Vec<_>>()).await.expect("publish");
            f.duplicate(1000);
            let mut consumer = RemoteConsumer::new(client, "notification-service-group", &["payments"]);
            (outage, poll_until(&mut consumer, 6, Duration::from_secs(5)).await)
        })
        .await
        .unwrap();
    check.check(outage == Err(KAFKA_DOWN), || format!("publish during an outage: {outage:?}"));
    check.check(log.retained() == 3, || format!("the outage wrote: {} records retained", log.retained()));
    check.check(got == vec![0, 0, 1, 1, 2, 2], || format!("duplicated deliveries: {got:?}"));
    check.check(broker_faults.duplicated() == 3, || format!("{} duplicates counted", broker_faults.duplicated()));
    run::print_line(&format!("{TEST}/broker seed={} checks={}", run::seed(), check.checks()));
}

#[madsim::test]
async fn records_whose_poll_reply_was_lost_are_delivered_again() {
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    let log = MemoryEventLog::with_partitions(1);
    let (broker, broker_addr) = broker_node(&log, &BrokerFaults::new());
    let net = NetSim::current();
    let node = service_node("account", 3);
    let node_id = node.id();
    log.publish(&(0..5).map(record).collect::<Vec<_>>()).await.expect("publish");
    let mut consumer = node
        .spawn(async move {
            let mut consumer =
                RemoteConsumer::new(RemoteClient::connect(broker_addr, "kafka").await, "g", &["payments"]);
            // Join with an empty first poll of nothing (max 0), so the next poll is the one that fetches.
            consumer.poll(0, Duration::from_millis(10)).await.expect("join");
            consumer
        })
        .await
        .unwrap();
    // The broker hands the records out, but the reply never reaches the consumer.
    net.clog_link(broker.id(), node_id);
    let (lost, returned) = node
        .spawn(async move {
            let lost = consumer.poll(100, Duration::from_millis(100)).await;
            (lost, consumer)
        })
        .await
        .unwrap();
    consumer = returned;
    check.check(lost == Err(KAFKA_DOWN), || format!("a poll with its reply lost: {lost:?}"));
    net.unclog_link(broker.id(), node_id);
    let got = node.spawn(async move { poll_until(&mut consumer, 5, Duration::from_secs(5)).await }).await.unwrap();
    check.check(got == vec![0, 1, 2, 3, 4], || format!("after the lost reply the consumer got {got:?}"));
    run::print_line(&format!("{TEST}/lost-poll seed={} checks={}", run::seed(), check.checks()));
}

/// The cache faults of a plan, played by the `Injector` onto `Infra`'s cache node: an outage
/// refuses every call and keeps the entries; a partition from the account node times out; a stale
/// episode acknowledges invalidations but loses them (the entry is served until its TTL), and
/// after healing an invalidation drops the entry again.
#[madsim::test]
async fn cache_outages_partitions_and_lost_invalidations_hit_the_cache_node_and_heal() {
    use securepay_ports::{AccountView, BalanceCache, CachedBalance};
    use securepay_sim::infra::{Infra, Injector, addr};
    use securepay_sim::plan::{Action, Event, Fault, Node, Plan};
    use securepay_sim::remote::RemoteBalanceCache;

    const REDIS_DOWN: PortError = PortError::Unavailable { component: "redis" };
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    let plan = Plan::parse("name = \"cache\"\nsafety_ms = 1000\nliveness_ms = 1000\n").expect("a valid plan");
    let mut infra = Infra::start(&plan);
    let account_ip = securepay_sim::infra::ip(Node::Account);
    let account = Handle::current().create_node().name("account").ip(account_ip).build();
    infra.add_service(Node::Account, account.clone());
    let injector = Injector::new(&infra);
    let event = |action, fault| Event { at: Duration::ZERO, action, fault, entry: 0 };
    let cache = account
        .spawn(async { RemoteBalanceCache(RemoteClient::connect(addr(Node::Cache), "redis").await) })
        .await
        .expect("client");
    let id = AccountId::from_uuid(SeededIds.uuid());
    let balance = |value: i64| CachedBalance {
        account: AccountView {
            id,
            owner: Subject::parse("alice").expect("valid"),
            currency: eur(),
            balance: Decimal::new(value, 2),
        },
        cached_at: SimClock.now(),
    };
    macro_rules! on_account {
        ($body:expr) => {{
            let c = cache.clone();
            account.spawn(async move { $body(c).await }).await.expect("account task")
        }};
    }
    macro_rules! read {
        () => {
            on_account!(|c: RemoteBalanceCache| async move { c.get(id).await.map(|b| b.map(|b| b.account.balance)) })
        };
    }
    let put = balance(10_000);
    let stored = on_account!(|c: RemoteBalanceCache| async move { c.put(&put, 5).await });
    check.check(stored == Ok(()), || format!("put: {stored:?}"));
    check.check(read!() == Ok(Some(Decimal::new(10_000, 2))), || "a hit returns what was put");

    // Outage: every call refused at once; the entry survives it.
    injector.apply(&event(Action::Start, Fault::CacheOutage));
    let during = read!();
    check.check(during == Err(REDIS_DOWN), || format!("read during a cache outage: {during:?}"));
    let dropped = on_account!(|c: RemoteBalanceCache| async move { c.invalidate(&[id]).await });
    check.check(dropped == Err(REDIS_DOWN), || format!("invalidate during a cache outage: {dropped:?}"));
    injector.apply(&event(Action::Stop, Fault::CacheOutage));
    check.check(read!() == Ok(Some(Decimal::new(10_000, 2))), || "the entry survived the outage");

    // Partition account-cache: the call times out as Unavailable; healed, it is served again.
    injector.apply(&event(Action::Start, Fault::Partition { a: Node::Account, b: Node::Cache }));
    let across = read!();
    check.check(across == Err(REDIS_DOWN), || format!("read across a partition: {across:?}"));
    injector.apply(&event(Action::Stop, Fault::Partition { a: Node::Account, b: Node::Cache }));
    check.check(read!() == Ok(Some(Decimal::new(10_000, 2))), || "read after the partition healed");

    // Stale: the invalidation is acknowledged but lost; the old balance is served until its TTL.
    injector.apply(&event(Action::Start, Fault::StaleCache));
    let dropped = on_account!(|c: RemoteBalanceCache| async move { c.invalidate(&[id]).await });
    check.check(dropped == Ok(()), || format!("a lost invalidation is acknowledged: {dropped:?}"));
    check.check(read!() == Ok(Some(Decimal::new(10_000, 2))), || "a stale cache still serves the dropped balance");
    check.check(infra.cache.faults.lost_invalidations() == 1, || "one invalidation lost");
    sleep(Duration::from_secs(6)).await;
    check.check(read!() == Ok(None), || "the TTL still ends a stale entry");

    // Healed (heal_all ends the stale episode): invalidations drop entries again.
    let put = balance(5_000);
    let stored = on_account!(|c: RemoteBalanceCache| async move { c.put(&put, 5).await });
    check.check(stored == Ok(()), || format!("put: {stored:?}"));
    injector.heal_all();
    let dropped = on_account!(|c: RemoteBalanceCache| async move { c.invalidate(&[id]).await });
    check.check(dropped == Ok(()), || format!("invalidate after healing: {dropped:?}"));
    check.check(read!() == Ok(None), || "an invalidation after healing drops the entry");
    check.check(infra.cache.faults.lost_invalidations() == 1, || "no invalidation lost after healing");
    run::print_line(&format!("{TEST}/cache seed={} checks={}", run::seed(), check.checks()));
}
