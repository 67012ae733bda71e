//! What the notification service's integration tests share: events as the producers write them,
//! fresh Kafka topics, the consumer run in-process, and a minimal HTTP/1.1 client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use securepay_core::events::{PaymentEvent, PaymentInitiated, PaymentSettled};
use securepay_core::ids::{AccountId, EventId, PaymentId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::Outcome;
use securepay_notification::{ConsumerConfig, Topics};
use securepay_ports::{Clock, Notification, NotificationStore, OutgoingRecord, PortResult, Recorded};
use securepay_proto::convert::{encode_initiated, encode_settled};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use uuid::Uuid;

pub const PARTITIONS: i32 = 3;
/// How long a bounded wait lasts before the test fails (a real group join takes seconds).
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

pub fn amount(text: &str, currency: &str) -> Amount {
    Amount::parse(text, Currency::from_code(currency).unwrap(), AmountPolicy::default()).unwrap()
}

pub fn initiated(payment: PaymentId, value: &str) -> PaymentEvent {
    PaymentEvent::Initiated(PaymentInitiated {
        event_id: EventId::from_uuid(Uuid::new_v4()),
        payment_id: payment,
        subject: Subject::parse("alice").unwrap(),
        from: AccountId::from_uuid(Uuid::new_v4()),
        to: AccountId::from_uuid(Uuid::new_v4()),
        amount: amount(value, "EUR"),
        occurred_at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap().replace_nanosecond(5).unwrap(),
    })
}

/// The outcome event of `initiated`.
pub fn settled(initiated: &PaymentEvent, outcome: Outcome) -> PaymentEvent {
    let PaymentEvent::Initiated(i) = initiated else { panic!("not an initiated event") };
    PaymentEvent::Settled(PaymentSettled {
        event_id: EventId::from_uuid(Uuid::new_v4()),
        payment_id: i.payment_id,
        from: i.from,
        to: i.to,
        amount: i.amount,
        outcome,
        occurred_at: i.occurred_at + time::Duration::seconds(1),
    })
}

/// Fresh topic names of this test (`<tag>.<uuid>.initiated` ...).
pub fn fresh_topics() -> Topics {
    let base = format!("notification-test.{}", Uuid::new_v4());
    Topics {
        initiated: format!("{base}.initiated"),
        completed: format!("{base}.completed"),
        failed: format!("{base}.failed"),
    }
}

pub fn fresh_group() -> String {
    format!("notification-test-group-{}", Uuid::new_v4())
}

/// A consumer config on `topics`/`group` that notices shutdown and retries quickly.
pub fn config(topics: Topics, group: String) -> ConsumerConfig {
    ConsumerConfig {
        topics,
        group,
        poll_wait: Duration::from_millis(200),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..ConsumerConfig::default()
    }
}

/// Creates `topics` with [`PARTITIONS`] partitions each on the real broker.
pub async fn create_topics(brokers: &str, topics: &Topics) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let new: Vec<NewTopic<'_>> =
        topics.all().iter().map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1))).collect();
    let created = admin.create_topics(&new, &options).await.expect("create_topics");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
}

/// The record a producer writes for `event` (key = payment id), on the test's topic of its kind.
pub fn record_of(event: &PaymentEvent, topics: &Topics) -> OutgoingRecord {
    let (topic, payload) = match event {
        PaymentEvent::Initiated(e) => (&topics.initiated, encode_initiated(e)),
        PaymentEvent::Settled(e) => match e.outcome {
            Outcome::Completed => (&topics.completed, encode_settled(e)),
            Outcome::Failed(_) => (&topics.failed, encode_settled(e)),
        },
    };
    OutgoingRecord { topic: topic.clone(), key: event.payment_id().to_string(), payload, headers: vec![] }
}

/// Polls `condition` until it holds or [`PATIENCE`] ran out (then panics with `what`).
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !condition().await {
        assert!(Instant::now() < deadline, "not within {PATIENCE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A store that counts what `record` and `record_batch` answered (per notification; a failed call
/// counts once), delegating to the real one.
#[derive(Clone)]
pub struct Counting<S> {
    pub inner: S,
    pub new: Arc<AtomicUsize>,
    pub duplicate: Arc<AtomicUsize>,
    pub failed: Arc<AtomicUsize>,
}

impl<S> Counting<S> {
    pub fn new(inner: S) -> Counting<S> {
        Counting { inner, new: Arc::default(), duplicate: Arc::default(), failed: Arc::default() }
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        (self.new.load(Ordering::SeqCst), self.duplicate.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst))
    }
}

#[async_trait]
impl<S: NotificationStore> NotificationStore for Counting<S> {
    async fn record(&self, notification: &Notification) -> PortResult<Recorded> {
        let result = self.inner.record(notification).await;
        let counter = match result {
            Ok(Recorded::New) => &self.new,
            Ok(Recorded::Duplicate) => &self.duplicate,
            Err(_) => &self.failed,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        result
    }

    async fn record_batch(&self, batch: &[Notification]) -> PortResult<Vec<Recorded>> {
        let result = self.inner.record_batch(batch).await;
        match &result {
            Ok(answers) => {
                for answer in answers {
                    let counter = if *answer == Recorded::New { &self.new } else { &self.duplicate };
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
            }
        }
        result
    }

    async fn for_payment(&self, payment: PaymentId, limit: usize) -> PortResult<Vec<Notification>> {
        self.inner.for_payment(payment, limit).await
    }
}

/// One HTTP/1.1 answer.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// `GET target` (already percent-encoded) on a fresh connection.
pub async fn http_get(addr: SocketAddr, target: &str) -> std::io::Result<HttpAnswer> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).expect("an HTTP answer in UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP head");
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status line");
    let mut content_type = String::new();
    for line in lines {
        let (name, value) = line.split_once(':').expect("a header line");
        assert!(
            !(name.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked")),
            "this client reads only sized bodies"
        );
        if name.eq_ignore_ascii_case("content-type") {
            content_type = value.trim().to_owned();
        }
    }
    Ok(HttpAnswer { status, content_type, body: body.to_owned() })
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
