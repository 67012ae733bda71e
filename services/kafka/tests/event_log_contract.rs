//! The `EventLog` / `EventConsumer` contract: ONE suite of guarantees, each a generic function over
//! a [`Harness`], run against the real Kafka (`KafkaEventLog` / `KafkaConsumer`, a fresh 3-partition
//! topic and fresh group ids per test) and its simulated twin (`MemoryEventLog`, a fresh broker per
//! test). A broker that passes here keeps the promises the services build on: per-key order,
//! at-least-once delivery, resumption from the last committed offset, independent groups.
#![cfg(not(madsim))]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use securepay_kafka::{KafkaConsumer, KafkaEventLog};
use securepay_memory::{MemoryConsumer, MemoryEventLog};
use securepay_ports::{ConsumedRecord, EventConsumer, EventLog, OutgoingRecord, TopicPartitionOffset};
use securepay_testkit::{component, var};
use uuid::Uuid;

const PARTITIONS: i32 = 3;
/// How long one poll of the helpers waits.
const POLL_WAIT: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// The harness: what a contract test needs besides the ports themselves.

#[async_trait]
trait Harness: Send + Sync + 'static {
    type Log: EventLog;
    type Consumer: EventConsumer;
    fn log(&self) -> &Self::Log;
    /// A topic of its own with [`PARTITIONS`] partitions.
    async fn topic(&self) -> String;
    /// A new member of `group` subscribed to `topic`.
    fn consumer(&self, group: &str, topic: &str) -> Self::Consumer;
    /// How long a new member may take to get its first records (a real group join takes seconds).
    fn patience(&self) -> Duration;
}

// ---------------------------------------------------------------------------------------------
// Builders and helpers.

fn group() -> String {
    format!("contract-group-{}", Uuid::new_v4())
}

fn record(topic: &str, key: &str, payload: &str) -> OutgoingRecord {
    OutgoingRecord {
        topic: topic.to_string(),
        key: key.to_string(),
        payload: payload.as_bytes().to_vec(),
        headers: vec![],
    }
}

fn payload(r: &ConsumedRecord) -> String {
    String::from_utf8(r.payload.clone()).unwrap()
}

/// Polls until `count` records arrived or the harness's patience ran out.
async fn consume<H: Harness>(h: &H, consumer: &mut H::Consumer, count: usize) -> Vec<ConsumedRecord> {
    let deadline = Instant::now() + h.patience();
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < deadline {
        out.extend(consumer.poll(count - out.len(), POLL_WAIT).await.expect("poll"));
    }
    assert_eq!(out.len(), count, "records consumed within {:?}: {out:?}", h.patience());
    out
}

/// The last position per partition: what a consumer commits after processing `records`.
fn last_positions(records: &[ConsumedRecord]) -> Vec<TopicPartitionOffset> {
    let mut last = BTreeMap::new();
    for r in records {
        last.insert((r.position.topic.clone(), r.position.partition), r.position.clone());
    }
    last.into_values().collect()
}

fn sorted_payloads(records: &[ConsumedRecord]) -> Vec<String> {
    let mut payloads: Vec<String> = records.iter().map(payload).collect();
    payloads.sort();
    payloads
}

// ---------------------------------------------------------------------------------------------
// The guarantees.

async fn contract_records_with_the_same_key_come_back_in_publish_order<H: Harness>(h: H) {
    let topic = h.topic().await;
    for batch in 0..3 {
        let records: Vec<_> = (0..8)
            .map(|i| record(&topic, if i % 2 == 0 { "payment-a" } else { "payment-b" }, &format!("{batch}-{i:02}")))
            .collect();
        h.log().publish(&records).await.expect("publish");
    }
    let mut consumer = h.consumer(&group(), &topic);
    let consumed = consume(&h, &mut consumer, 24).await;

    for key in ["payment-a", "payment-b"] {
        let of_key: Vec<&ConsumedRecord> = consumed.iter().filter(|r| r.key == key).collect();
        let payloads: Vec<String> = of_key.iter().map(|r| payload(r)).collect();
        let mut in_publish_order = payloads.clone();
        in_publish_order.sort();
        assert_eq!(payloads, in_publish_order, "records of {key} in publish order");
        assert_eq!(payloads.len(), 12);
        assert!(of_key.iter().all(|r| r.position.partition == of_key[0].position.partition), "one key, one partition");
        assert!(of_key.windows(2).all(|w| w[0].position.offset < w[1].position.offset), "offsets grow");
    }
}

async fn contract_payload_and_headers_round_trip<H: Harness>(h: H) {
    let topic = h.topic().await;
    let sent = vec![
        OutgoingRecord {
            topic: topic.clone(),
            key: "payment-7f3a".to_string(),
            payload: vec![0, 159, 146, 150, 255, 10],
            headers: vec![
                ("traceparent".to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string()),
                ("event-type".to_string(), "events.v1.PaymentInitiated".to_string()),
            ],
        },
        OutgoingRecord { topic: topic.clone(), key: "payment-7f3a".to_string(), payload: vec![], headers: vec![] },
    ];
    h.log().publish(&sent).await.expect("publish");
    let mut consumer = h.consumer(&group(), &topic);
    let got = consume(&h, &mut consumer, 2).await;

    for (sent, got) in sent.iter().zip(&got) {
        assert_eq!(
            (&got.position.topic, &got.key, &got.payload, &got.headers),
            (&sent.topic, &sent.key, &sent.payload, &sent.headers)
        );
    }
}

async fn contract_a_consumer_replaced_after_committing_resumes_after_the_commit<H: Harness>(h: H) {
    let topic = h.topic().await;
    let group = group();
    let first: Vec<_> = (0..6).map(|i| record(&topic, &format!("key-{i}"), &format!("first-{i}"))).collect();
    h.log().publish(&first).await.expect("publish");
    let mut consumer = h.consumer(&group, &topic);
    let processed = consume(&h, &mut consumer, 6).await;
    consumer.commit(&last_positions(&processed)).await.expect("commit");
    drop(consumer);

    let second: Vec<_> = (0..4).map(|i| record(&topic, &format!("key-{i}"), &format!("second-{i}"))).collect();
    h.log().publish(&second).await.expect("publish");
    let mut replacement = h.consumer(&group, &topic);
    let resumed = consume(&h, &mut replacement, 4).await;
    let extra = replacement.poll(100, POLL_WAIT).await.expect("poll");

    assert_eq!(sorted_payloads(&resumed), ["second-0", "second-1", "second-2", "second-3"]);
    assert_eq!(extra, [], "nothing committed is delivered again");
}

async fn contract_a_consumer_replaced_without_committing_gets_the_records_again<H: Harness>(h: H) {
    let topic = h.topic().await;
    let group = group();
    let records: Vec<_> = (0..5).map(|i| record(&topic, &format!("key-{i}"), &format!("event-{i}"))).collect();
    h.log().publish(&records).await.expect("publish");
    let mut consumer = h.consumer(&group, &topic);
    let delivered = consume(&h, &mut consumer, 5).await;
    // Processed but not committed: a crash now.
    drop(consumer);

    let mut replacement = h.consumer(&group, &topic);
    let redelivered = consume(&h, &mut replacement, 5).await;

    assert_eq!(sorted_payloads(&redelivered), sorted_payloads(&delivered));
    assert_eq!(
        redelivered.iter().map(|r| &r.position).collect::<std::collections::BTreeSet<_>>(),
        delivered.iter().map(|r| &r.position).collect(),
        "the same records, at the same positions"
    );
}

async fn contract_two_groups_each_get_every_record<H: Harness>(h: H) {
    let topic = h.topic().await;
    let records: Vec<_> = (0..7).map(|i| record(&topic, &format!("key-{i}"), &format!("event-{i}"))).collect();
    h.log().publish(&records).await.expect("publish");
    let mut settlement = h.consumer(&group(), &topic);
    let mut notification = h.consumer(&group(), &topic);

    let by_settlement = consume(&h, &mut settlement, 7).await;
    settlement.commit(&last_positions(&by_settlement)).await.expect("commit");
    let by_notification = consume(&h, &mut notification, 7).await;

    let all: Vec<String> = (0..7).map(|i| format!("event-{i}")).collect();
    assert_eq!(sorted_payloads(&by_settlement), all);
    assert_eq!(sorted_payloads(&by_notification), all, "another group's commit does not move this group");
}

async fn contract_an_empty_poll_returns_empty_after_the_wait<H: Harness>(h: H) {
    let topic = h.topic().await;
    let mut consumer = h.consumer(&group(), &topic);
    let wait = Duration::from_millis(300);

    let started = Instant::now();
    let got = consumer.poll(10, wait).await.expect("poll");
    let elapsed = started.elapsed();

    assert_eq!(got, []);
    assert!(elapsed >= wait - Duration::from_millis(5), "returned after {elapsed:?}, before the wait");
    assert!(elapsed < wait + Duration::from_secs(3), "returned after {elapsed:?}, long past the wait");
}

async fn contract_two_members_of_one_group_together_get_every_record<H: Harness>(h: H) {
    let topic = h.topic().await;
    let group = group();
    let records: Vec<_> = (0..9).map(|i| record(&topic, &format!("key-{i}"), &format!("event-{i}"))).collect();
    h.log().publish(&records).await.expect("publish");
    let mut members = [h.consumer(&group, &topic), h.consumer(&group, &topic)];

    let all: std::collections::BTreeSet<String> = (0..9).map(|i| format!("event-{i}")).collect();
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + h.patience();
    while seen != all && Instant::now() < deadline {
        for member in &mut members {
            let got = member.poll(100, Duration::from_millis(200)).await.expect("poll");
            seen.extend(got.iter().map(payload));
            // A commit racing a rebalance may be refused; the records then come again, which is
            // at-least-once, so the test does not insist.
            let _ = member.commit(&last_positions(&got)).await;
        }
    }

    assert_eq!(seen, all, "the group's members together consume every record");
}

securepay_testkit::contract_suite! {
    cases: [
        contract_records_with_the_same_key_come_back_in_publish_order,
        contract_payload_and_headers_round_trip,
        contract_a_consumer_replaced_after_committing_resumes_after_the_commit,
        contract_a_consumer_replaced_without_committing_gets_the_records_again,
        contract_two_groups_each_get_every_record,
        contract_two_members_of_one_group_together_get_every_record,
        contract_an_empty_poll_returns_empty_after_the_wait,
    ],
    implementations: { memory => memory_harness, kafka => kafka_harness },
}

// ---------------------------------------------------------------------------------------------
// In memory: the simulator's broker, a fresh one per test.

struct MemoryHarness {
    log: MemoryEventLog,
}

async fn memory_harness() -> Option<MemoryHarness> {
    Some(MemoryHarness { log: MemoryEventLog::with_partitions(PARTITIONS) })
}

#[async_trait]
impl Harness for MemoryHarness {
    type Log = MemoryEventLog;
    type Consumer = MemoryConsumer;

    fn log(&self) -> &MemoryEventLog {
        &self.log
    }

    async fn topic(&self) -> String {
        "payment.initiated".to_string()
    }

    fn consumer(&self, group: &str, topic: &str) -> MemoryConsumer {
        self.log.consumer(group, &[topic])
    }

    fn patience(&self) -> Duration {
        Duration::from_secs(2)
    }
}

// ---------------------------------------------------------------------------------------------
// The real Kafka the runner started: topics and groups of their own per test.

struct KafkaHarness {
    brokers: String,
    log: KafkaEventLog,
}

async fn kafka_harness() -> Option<KafkaHarness> {
    let brokers = component(var::KAFKA_BROKERS)?;
    let log = KafkaEventLog::new(&brokers).expect("producer");
    Some(KafkaHarness { brokers, log })
}

#[async_trait]
impl Harness for KafkaHarness {
    type Log = KafkaEventLog;
    type Consumer = KafkaConsumer;

    fn log(&self) -> &KafkaEventLog {
        &self.log
    }

    async fn topic(&self) -> String {
        let topic = format!("contract.{}", Uuid::new_v4());
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).create().expect("admin client");
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let created = admin
            .create_topics(&[NewTopic::new(&topic, PARTITIONS, TopicReplication::Fixed(1))], &options)
            .await
            .expect("create_topics");
        assert!(created.iter().all(Result::is_ok), "{created:?}");
        topic
    }

    fn consumer(&self, group: &str, topic: &str) -> KafkaConsumer {
        KafkaConsumer::new(&self.brokers, group, &[topic]).expect("consumer")
    }

    fn patience(&self) -> Duration {
        Duration::from_secs(30)
    }
}

/// Real broker only (the port's records are UTF-8 by type): a record whose key and header bytes
/// are not UTF-8 — written by some other producer — is still delivered (lossily decoded), with
/// the records after it, so the service can dead-letter it instead of the poll dropping a batch.
#[tokio::test]
async fn a_record_with_non_utf8_key_and_header_is_delivered_not_dropped() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let Some(h) = kafka_harness().await else { return };
    let topic = h.topic().await;
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &h.brokers).create().expect("raw producer");
    let headers = OwnedHeaders::new().insert(Header { key: "traceparent", value: Some(&b"\xff\xfe"[..]) });
    let raw = FutureRecord::to(&topic).key(&b"\xc3\x28"[..]).payload("hostile").headers(headers);
    producer.send(raw, Duration::from_secs(10)).await.expect("raw send");
    h.log().publish(&[record(&topic, "k", "after")]).await.expect("publish");

    let mut consumer = h.consumer(&group(), &topic);
    let records = consume(&h, &mut consumer, 2).await;
    assert_eq!(sorted_payloads(&records), ["after", "hostile"]);
    let hostile = records.iter().find(|r| payload(r) == "hostile").unwrap();
    assert_eq!(hostile.key, "\u{fffd}(");
    assert_eq!(hostile.headers, [("traceparent".to_owned(), "\u{fffd}\u{fffd}".to_owned())]);
}
