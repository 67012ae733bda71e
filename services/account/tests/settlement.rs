//! The settlement consumer (`run_settlement`) against the real components: Kafka (fresh topics and
//! consumer group per test), PostgreSQL (fresh database, the `account_service` role) and Redis.
//! Covers the "done when": concurrent settlements draining one account, duplicate delivery
//! (2x and 10x), garbage to the dead-letter topic while the partition keeps moving, and one bad
//! event in a batch not poisoning the others.
#![cfg(not(madsim))]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{Infra, PARTITIONS, Payment, consume, create_topics, dec, fresh, header, wait_until};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use securepay_account::settlement::{DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, REASON_STORE_CORRUPT};
use securepay_account::{SettlementConfig, Settler, run_settlement};
use securepay_core::payment::{FailureReason, Outcome};
use securepay_kafka::{KafkaConsumer, KafkaEventLog};
use securepay_memory::{SeededIds, SimClock};
use securepay_ports::{EventLog, OutgoingRecord};
use securepay_postgres::PgLedgerStore;
use securepay_redis::RedisBalanceCache;

const PATIENCE: Duration = Duration::from_secs(90);

/// One test's topics, group, and running settlement consumers.
struct Consumers {
    topic: String,
    dlq: String,
    group: String,
    log: Arc<KafkaEventLog>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Consumers {
    async fn new(infra: &Infra) -> Consumers {
        let (topic, dlq) = (fresh("payment.initiated"), fresh("payment.initiated.dlq"));
        create_topics(&infra.brokers, &[&topic, &dlq]).await;
        Consumers {
            topic,
            dlq,
            group: fresh("account-service-group"),
            log: infra.event_log(),
            stops: vec![],
            tasks: vec![],
        }
    }

    /// Starts `members` settlement consumers in the test's group, each settling up to `batch_len`
    /// events per transaction.
    async fn start(&mut self, infra: &Infra, members: usize, batch_len: usize) {
        for _ in 0..members {
            let settler: Settler<PgLedgerStore, RedisBalanceCache> = Settler {
                ledger: infra.ledger().await,
                cache: infra.cache(),
                dlq: Arc::clone(&self.log) as Arc<dyn EventLog>,
                ids: Arc::new(SeededIds),
                clock: Arc::new(SimClock),
                config: SettlementConfig { batch_len, ..SettlementConfig::new(self.dlq.clone()) },
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (brokers, group, topic) = (infra.brokers.clone(), self.group.clone(), self.topic.clone());
            self.tasks.push(tokio::spawn(async move {
                let join = || KafkaConsumer::new(&brokers, &group, &[topic.as_str()]);
                run_settlement(&settler, join, async move { drop(stopped.await) }).await;
            }));
            self.stops.push(stop);
        }
    }

    async fn publish(&self, records: &[OutgoingRecord]) {
        for chunk in records.chunks(100) {
            self.log.publish(chunk).await.unwrap();
        }
    }

    /// Stops every consumer and waits until each finished its round.
    async fn stop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for task in self.tasks.drain(..) {
            task.await.expect("settlement task ended cleanly");
        }
    }

    /// The group's committed offset of each partition of the topic (-1001 = none).
    fn committed(&self, brokers: &str) -> Vec<i64> {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", &self.group).create().unwrap();
        let mut list = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            list.add_partition(&self.topic, partition);
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
        committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(n) => n,
                _ => -1001,
            })
            .collect()
    }
}

/// Issue bullet: 200 concurrent settlements draining one account never overdraw it; the sum of
/// balances is unchanged; exactly the affordable ones complete, the rest fail insufficient_funds.
#[tokio::test]
async fn two_hundred_concurrent_settlements_drain_one_account_exactly() {
    let Some(infra) = Infra::new().await else { return };
    let payer = infra.open("alice", "EUR", "100.50").await;
    let mut payees = Vec::new();
    for owner in ["bob", "carol", "dave", "erin"] {
        payees.push(infra.open(owner, "EUR", "10.00").await);
    }
    let mut c = Consumers::new(&infra).await;
    let payments: Vec<Payment> =
        (0..200).map(|i| Payment::new(payer, payees[i % payees.len()], "1.00", "EUR", "alice")).collect();
    let records: Vec<OutgoingRecord> = payments.iter().map(|p| p.record(&c.topic)).collect();
    c.publish(&records).await;
    // Three members share the three partitions: batches of different partitions race for the payer.
    c.start(&infra, 3, 16).await;
    wait_until(PATIENCE, "all 200 settled", || async { infra.processed().await == 200 }).await;
    c.stop().await;

    assert_eq!(infra.balance(payer).await, dec("0.50"), "exactly 100 of 1.00 were affordable");
    let outcomes = infra.outbox().await;
    assert_eq!(outcomes.len(), 200, "one outcome event per payment");
    let completed = outcomes.iter().filter(|o| o.outcome == Outcome::Completed).count();
    let insufficient =
        outcomes.iter().filter(|o| o.outcome == Outcome::Failed(FailureReason::InsufficientFunds)).count();
    assert_eq!((completed, insufficient), (100, 100));
    let paid: BTreeSet<_> = outcomes.iter().map(|o| o.payment_id).collect();
    assert_eq!(paid, payments.iter().map(|p| p.payment_id).collect(), "every payment has its outcome");
    let mut received = rust_decimal::Decimal::ZERO;
    for payee in &payees {
        received += infra.balance(*payee).await - dec("10.00");
    }
    assert_eq!(received, dec("100.00"));
    infra.assert_books_balance().await;
}

/// Issue bullet: the same event delivered twice (and 10 times) changes balances once.
#[tokio::test]
async fn an_event_delivered_twice_or_ten_times_moves_money_once() {
    let Some(infra) = Infra::new().await else { return };
    let alice = infra.open("alice", "EUR", "50.00").await;
    let bob = infra.open("bob", "EUR", "0.00").await;
    let mut c = Consumers::new(&infra).await;
    let twice = Payment::new(alice, bob, "7.25", "EUR", "alice");
    let ten_times = Payment::new(alice, bob, "3.50", "EUR", "alice");
    let mut records = vec![twice.record(&c.topic); 2];
    records.extend(vec![ten_times.record(&c.topic); 10]);
    c.publish(&records).await;
    // Small batches: duplicates land both inside one batch and across batches.
    c.start(&infra, 1, 3).await;
    wait_until(PATIENCE, "both payments settled", || async { infra.processed().await == 2 }).await;
    // Every copy is consumed and committed before checking that nothing moved twice.
    wait_until(PATIENCE, "all 12 deliveries committed", || async {
        let committed: i64 = c.committed(&infra.brokers).iter().filter(|o| **o >= 0).sum();
        committed == 12
    })
    .await;
    c.stop().await;

    assert_eq!(infra.balance(alice).await, dec("39.25"));
    assert_eq!(infra.balance(bob).await, dec("10.75"));
    assert_eq!(infra.outbox().await.len(), 2, "one outcome event per payment");
    assert_eq!(infra.count("SELECT count(*) FROM accounts.ledger_entries").await, 4);
    infra.assert_books_balance().await;
}

/// Issue bullet: a garbage message lands in the DLQ (with its reason) and the next good message is
/// still settled; the partition's offset moves past both.
#[tokio::test]
async fn garbage_goes_to_the_dead_letter_topic_and_the_partition_keeps_moving() {
    let Some(infra) = Infra::new().await else { return };
    let alice = infra.open("alice", "EUR", "20.00").await;
    let bob = infra.open("bob", "EUR", "0.00").await;
    let mut c = Consumers::new(&infra).await;
    let good = Payment::new(alice, bob, "5.00", "EUR", "alice");
    // Same key: one partition, in this order.
    let key = good.payment_id.to_string();
    let garbage = OutgoingRecord {
        topic: c.topic.clone(),
        key: key.clone(),
        payload: b"\xff\xfe\x00 definitely not protobuf".to_vec(),
        headers: vec![("traceparent".into(), "00-abc-def-01".into())],
    };
    let mut invalid = Payment::new(alice, bob, "1.00", "EUR", "alice").record(&c.topic);
    invalid.key = key.clone();
    invalid.payload = {
        use prost::Message as _;
        let mut m = securepay_proto::events::v1::PaymentInitiated::decode(invalid.payload.as_slice()).unwrap();
        m.amount.as_mut().unwrap().amount = "-5.00".into();
        m.encode_to_vec()
    };
    c.publish(&[garbage.clone(), invalid.clone(), good.record(&c.topic)]).await;
    c.start(&infra, 1, 64).await;
    wait_until(PATIENCE, "the good payment settled", || async { infra.processed().await == 1 }).await;
    let letters = consume(&infra.brokers, &[&c.dlq], 2, PATIENCE).await;
    wait_until(PATIENCE, "offsets committed past all three", || async {
        c.committed(&infra.brokers).iter().filter(|o| **o >= 0).sum::<i64>() == 3
    })
    .await;
    c.stop().await;

    assert_eq!(infra.balance(bob).await, dec("5.00"), "the good payment after the garbage settled");
    let reasons: Vec<&str> = letters.iter().map(|l| header(l, DLQ_REASON_HEADER).unwrap()).collect();
    assert_eq!(reasons, ["undecodable", "invalid_amount"]);
    assert_eq!(letters[0].payload, garbage.payload, "the original bytes");
    assert_eq!(letters[1].payload, invalid.payload);
    assert!(letters.iter().all(|l| l.key == key), "the original key");
    assert_eq!(header(&letters[0], "traceparent"), Some("00-abc-def-01"), "the original headers");
    let source = header(&letters[0], DLQ_SOURCE_HEADER).unwrap();
    assert!(source.starts_with(&format!("{}/", c.topic)) && source.ends_with("/0"), "{source}");
    infra.assert_books_balance().await;
}

/// One event the store refuses (here: its payer's row is unreadable) must not poison the events
/// batched with it: they settle, it goes to the dead-letter topic with the store's reason.
#[tokio::test]
async fn one_bad_event_does_not_poison_its_batch() {
    let Some(infra) = Infra::new().await else { return };
    let alice = infra.open("alice", "EUR", "20.00").await;
    let bob = infra.open("bob", "EUR", "0.00").await;
    // A currency the domain does not know: the store cannot read this account back (Corrupt).
    let broken = infra.open("mallory", "XXX", "20.00").await;
    let mut c = Consumers::new(&infra).await;
    let first = Payment::new(alice, bob, "1.00", "EUR", "alice");
    let poison = Payment::new(broken, bob, "1.00", "EUR", "mallory");
    let last = Payment::new(alice, bob, "2.00", "EUR", "alice");
    let key = first.payment_id.to_string();
    let records: Vec<OutgoingRecord> =
        [&first, &poison, &last].iter().map(|p| OutgoingRecord { key: key.clone(), ..p.record(&c.topic) }).collect();
    c.publish(&records).await;
    c.start(&infra, 1, 64).await;
    wait_until(PATIENCE, "the two good payments settled", || async { infra.processed().await == 2 }).await;
    let letters = consume(&infra.brokers, &[&c.dlq], 1, PATIENCE).await;
    c.stop().await;

    assert_eq!(header(&letters[0], DLQ_REASON_HEADER), Some(REASON_STORE_CORRUPT));
    assert_eq!(letters[0].payload, records[1].payload);
    assert_eq!(infra.balance(bob).await, dec("3.00"));
    assert_eq!(infra.balance(broken).await, dec("20.00"));
    let settled: BTreeSet<_> = infra.outbox().await.iter().map(|o| o.payment_id).collect();
    assert_eq!(settled, [first.payment_id, last.payment_id].into_iter().collect());
}
