//! The consumer loop against the REAL PostgreSQL and Kafka (fresh database, topics and group per
//! test): exactly one notification per event under duplicate publishing and redelivery after a
//! restart before commit; invalid records skipped and committed past. Plus, on the in-memory twins
//! (an outage cannot be injected into the shared PostgreSQL): a store outage is retried and never
//! committed past.
#![cfg(not(madsim))]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use securepay_core::events::PaymentEvent;
use securepay_core::ids::PaymentId;
use securepay_core::payment::{FailureReason, Outcome};
use securepay_kafka::{KafkaConsumer, KafkaEventLog};
use securepay_memory::{MemoryEventLog, MemoryNotificationStore};
use securepay_notification::{ConsumerConfig, run_consumer};
use securepay_ports::{
    ConsumedRecord, EventConsumer, EventLog, NotificationKind, NotificationStore, OutgoingRecord, PortError,
    PortResult, TopicPartitionOffset,
};
use securepay_postgres::PgNotificationStore;
use securepay_postgres::testing::TestDb;
use securepay_testkit::{component, var};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A running consumer loop and the switch that stops it.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    fn start<S, C>(store: S, mut consumer: C, config: ConsumerConfig) -> Running
    where
        S: NotificationStore,
        C: EventConsumer,
    {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            run_consumer(&store, &mut consumer, &SystemClock, &config, stopped).await;
        });
        Running { stop, task }
    }

    /// Asks for shutdown and waits (bounded) for the loop to finish its batch and return.
    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(PATIENCE, self.task).await.expect("the consumer stops").expect("the consumer task");
    }
}

/// A consumer that crashes before every commit: it processes, but commits nothing.
struct NeverCommits<C>(C);

#[async_trait]
impl<C: EventConsumer> EventConsumer for NeverCommits<C> {
    async fn poll(&mut self, max_records: usize, wait: Duration) -> PortResult<Vec<ConsumedRecord>> {
        self.0.poll(max_records, wait).await
    }

    async fn commit(&mut self, _positions: &[TopicPartitionOffset]) -> PortResult<()> {
        Err(PortError::Unavailable { component: "kafka" })
    }
}

struct Real {
    db: TestDb,
    brokers: String,
    log: KafkaEventLog,
    store: PgNotificationStore,
}

async fn real() -> Option<Real> {
    let brokers = component(var::KAFKA_BROKERS)?;
    let db = TestDb::new().await?;
    let store = PgNotificationStore::connect(db.role_options("notification_service").await, 4)
        .await
        .expect("notification_service logs in");
    let log = KafkaEventLog::new(&brokers).expect("producer");
    Some(Real { db, brokers, log, store })
}

impl Real {
    async fn rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM notifications.notifications").fetch_one(&self.db.pool).await.unwrap()
    }

    /// The kinds recorded for `payment`, sorted.
    async fn kinds(&self, payment: PaymentId) -> Vec<NotificationKind> {
        let mut kinds: Vec<_> =
            self.store.for_payment(payment, 100).await.unwrap().into_iter().map(|n| n.kind).collect();
        kinds.sort();
        kinds
    }

    /// Committed offsets (next record) of `group` on every partition of `topic` that has one.
    fn committed(&self, group: &str, topic: &str) -> BTreeMap<i32, i64> {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).set("group.id", group).create().unwrap();
        let mut list = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            list.add_partition(topic, partition);
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(10)).expect("committed offsets");
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(next) => Some((e.partition(), next)),
                _ => None,
            })
            .collect()
    }
}

/// A payment's two events: initiated, then completed or failed.
fn payment_events(i: usize) -> (PaymentId, Vec<PaymentEvent>) {
    let payment = PaymentId::from_uuid(Uuid::new_v4());
    let first = initiated(payment, &format!("{}.25", i + 1));
    let outcome =
        if i.is_multiple_of(2) { Outcome::Completed } else { Outcome::Failed(FailureReason::InsufficientFunds) };
    let second = settled(&first, outcome);
    (payment, vec![first, second])
}

fn expected_kinds(i: usize) -> Vec<NotificationKind> {
    let outcome = if i.is_multiple_of(2) { NotificationKind::Completed } else { NotificationKind::Failed };
    vec![NotificationKind::Initiated, outcome]
}

const PAYMENTS_PER_HALF: usize = 4;

/// Every event is published twice. The first consumer records the first half but dies before any
/// commit; the second member of the group gets all of it again (redelivery) plus the second half.
/// Result: exactly one notification per event, and the redelivered ones were all duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_notified_once_despite_double_publishing_and_a_restart_before_commit() {
    let Some(r) = real().await else { return };
    let (topics, group) = (fresh_topics(), fresh_group());
    create_topics(&r.brokers, &topics).await;
    let halves: Vec<Vec<(PaymentId, Vec<PaymentEvent>)>> = (0..2)
        .map(|half| (0..PAYMENTS_PER_HALF).map(|i| payment_events(half * PAYMENTS_PER_HALF + i)).collect())
        .collect();
    let publish_twice = |half: &[(PaymentId, Vec<PaymentEvent>)]| {
        let records: Vec<OutgoingRecord> =
            half.iter().flat_map(|(_, events)| events.iter().map(|e| record_of(e, &topics))).collect();
        [records.clone(), records]
    };

    for records in publish_twice(&halves[0]) {
        r.log.publish(&records).await.expect("publish");
    }
    let first = Counting::new(r.store.clone());
    let consumer = KafkaConsumer::new(&r.brokers, &group, &topics.all()).unwrap();
    let running = Running::start(first.clone(), NeverCommits(consumer), config(topics.clone(), group.clone()));
    let first_half_events = 2 * PAYMENTS_PER_HALF;
    wait_until("the first consumer recorded the first half", || async {
        r.rows().await == i64::try_from(first_half_events).unwrap()
    })
    .await;
    running.stop().await;
    assert!(r.committed(&group, &topics.initiated).is_empty(), "the first consumer committed nothing");
    let (new, duplicates, _) = first.counts();
    assert_eq!(new, first_half_events, "one New per event");
    assert!(duplicates <= first_half_events, "the second copy of each event at most");

    for records in publish_twice(&halves[1]) {
        r.log.publish(&records).await.expect("publish");
    }
    let second = Counting::new(r.store.clone());
    let consumer = KafkaConsumer::new(&r.brokers, &group, &topics.all()).unwrap();
    let running = Running::start(second.clone(), consumer, config(topics.clone(), group.clone()));
    let all_records = 2 * 2 * 2 * PAYMENTS_PER_HALF;
    wait_until("the second consumer handled every record, redelivered ones included", || async {
        let (new, duplicates, _) = second.counts();
        new + duplicates == all_records
    })
    .await;
    running.stop().await;

    let (new, duplicates, failed) = second.counts();
    assert_eq!(new, 2 * PAYMENTS_PER_HALF, "only the second half's events are new");
    assert_eq!(duplicates, all_records - new, "every redelivered record and every second copy changed nothing");
    assert_eq!(failed, 0);
    assert_eq!(r.rows().await, i64::try_from(4 * PAYMENTS_PER_HALF).unwrap(), "one row per event");
    for (i, (payment, _)) in halves.iter().flatten().enumerate() {
        assert_eq!(r.kinds(*payment).await, expected_kinds(i), "payment {i}");
    }
    let committed: i64 = r.committed(&group, &topics.initiated).values().sum();
    assert_eq!(committed, i64::try_from(2 * 2 * PAYMENTS_PER_HALF).unwrap(), "the second consumer committed all");
}

/// Garbage, and an event that decodes but is invalid, between good events of one payment (one
/// partition): the good ones are recorded, the bad ones skipped, and the partition's committed
/// offset moves past all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_between_good_ones_are_skipped_and_committed_past() {
    let Some(r) = real().await else { return };
    let (topics, group) = (fresh_topics(), fresh_group());
    create_topics(&r.brokers, &topics).await;
    let payment = PaymentId::from_uuid(Uuid::new_v4());
    let good = initiated(payment, "10.00");
    let PaymentEvent::Initiated(mut invalid) = initiated(payment, "1.00") else { unreachable!() };
    invalid.to = invalid.from; // a payment to itself: decodes, but is refused as same_account
    let also_good = initiated(payment, "20.00");
    let garbage = |payload: &[u8]| OutgoingRecord {
        topic: topics.initiated.clone(),
        key: payment.to_string(),
        payload: payload.to_vec(),
        headers: vec![],
    };
    let records = vec![
        record_of(&good, &topics),
        garbage(b"\xff\xfe not protobuf at all"),
        garbage(&securepay_proto::convert::encode_initiated(&invalid)),
        garbage(b""),
        record_of(&also_good, &topics),
    ];
    r.log.publish(&records).await.expect("publish");
    let completed_garbage = OutgoingRecord { topic: topics.completed.clone(), ..garbage(b"\x08\x96\x01") };
    r.log.publish(&[completed_garbage]).await.expect("publish");

    let consumer = KafkaConsumer::new(&r.brokers, &group, &topics.all()).unwrap();
    let running = Running::start(r.store.clone(), consumer, config(topics.clone(), group.clone()));
    wait_until("both good events are recorded", || async { r.rows().await == 2 }).await;
    wait_until("the committed offset passes every record of the partition", || async {
        r.committed(&group, &topics.initiated).values().sum::<i64>() == 5
            && r.committed(&group, &topics.completed).values().sum::<i64>() == 1
    })
    .await;
    running.stop().await;

    let listed = r.store.for_payment(payment, 10).await.unwrap();
    let ids: Vec<_> = listed.iter().map(|n| n.event_id).collect();
    assert_eq!(ids, [good.event_id(), also_good.event_id()], "the good ones, in order");
    assert_eq!(r.rows().await, 2, "nothing else was recorded");
}

// ---------------------------------------------------------------------------------------------
// On the twins: a store outage.

/// While the store is down nothing is committed and the same records are retried; when it is back
/// they are recorded once and committed.
#[tokio::test]
async fn a_store_outage_is_retried_and_never_committed_past() {
    let log = MemoryEventLog::with_partitions(1);
    let store = MemoryNotificationStore::new();
    store.set_available(false);
    let (topics, group) = (fresh_topics(), fresh_group());
    let payment = PaymentId::from_uuid(Uuid::new_v4());
    let events = [initiated(payment, "3.00"), initiated(payment, "4.00")];
    let records: Vec<_> = events.iter().map(|e| record_of(e, &topics)).collect();
    log.publish(&records).await.unwrap();
    let counting = Counting::new(store.clone());
    let consumer = log.consumer(&group, &topics.all());
    let running = Running::start(counting.clone(), consumer, config(topics.clone(), group.clone()));

    wait_until("the consumer retried the unavailable store", || async { counting.counts().2 >= 3 }).await;
    assert_eq!(log.committed(&group, &topics.initiated, 0), None, "nothing committed during the outage");
    assert!(store.all().is_empty());

    store.set_available(true);
    wait_until("both events are recorded once the store is back", || async { store.all().len() == 2 }).await;
    wait_until("the records are committed", || async { log.committed(&group, &topics.initiated, 0) == Some(2) }).await;
    running.stop().await;
    assert_eq!(counting.counts().0, 2);
    let ids: Vec<_> = store.all().iter().map(|n| n.event_id).collect();
    assert_eq!(ids, [events[0].event_id(), events[1].event_id()]);
}

/// A shutdown during an outage returns promptly and commits nothing it did not record.
#[tokio::test]
async fn shutdown_during_an_outage_commits_nothing_unrecorded() {
    let log = MemoryEventLog::with_partitions(1);
    let store = MemoryNotificationStore::new();
    store.set_available(false);
    let (topics, group) = (fresh_topics(), fresh_group());
    log.publish(&[record_of(&initiated(PaymentId::from_uuid(Uuid::new_v4()), "1.00"), &topics)]).await.unwrap();
    let counting = Counting::new(store.clone());
    let running =
        Running::start(counting.clone(), log.consumer(&group, &topics.all()), config(topics.clone(), group.clone()));
    wait_until("the consumer tried the store", || async { counting.counts().2 >= 1 }).await;

    running.stop().await;

    assert_eq!(log.committed(&group, &topics.initiated, 0), None);
}
