//! The consumer loop: payment events in, one notification per event out (SPEC §6.7).
//!
//! Per polled batch, in delivery order (so per-partition order is kept):
//! 1. the record's topic names its kind ([`Topics`]); the payload is decoded and validated by
//!    `securepay_proto::convert` — a record that fails is logged with its reason (never its
//!    payload), counted (`securepay_notification_invalid_events_total{kind,reason}`) and skipped,
//!    so one bad record never stalls its partition;
//! 2. the batch's notifications are recorded in ONE store call (`NotificationStore::record_batch`,
//!    one transaction), each record in a span `notification.record` whose parent is the trace
//!    context of the record's headers (W3C `traceparent`, SPEC §8); the store call itself runs in a
//!    [`RECORD_BATCH_SPAN`] span. `New` is logged as ONE structured line (fields `event_id`,
//!    `payment_id`, `kind`, `amount`, `currency`, `reason`); `Duplicate` (redelivery, an event
//!    published twice, or the same event twice in the batch) changes nothing. `Unavailable` retries
//!    the SAME batch with capped exponential backoff — nothing of it is committed meanwhile. A
//!    batch the store refuses (`Refused`/`Corrupt`) is recorded one notification at a time, so one
//!    bad notification cannot take its neighbours down: the one refused alone (retrying cannot
//!    help) is logged, counted as `store_refused` and skipped;
//! 3. then, and only then, the batch's offsets are committed. A failed commit is retried a few
//!    times, then left: the records are delivered again and deduplicated by event id.
//!
//! Shutdown (the watch channel turns `true`): the current batch is finished and committed, then the
//! loop returns. During a store outage it stops at once and commits nothing of the batch.

use std::collections::BTreeMap;
use std::time::Duration;

use securepay_core::events::PaymentEvent;
use securepay_core::money::AmountPolicy;
use securepay_core::topology::{consumer_group, topic};
use securepay_kit::trace;
use securepay_ports::notifications::RECORD_BATCH_LEN_MAX;
use securepay_ports::{
    Clock, ConsumedRecord, EventConsumer, Notification, NotificationKind, NotificationStore, PortError, Recorded,
    TopicPartitionOffset,
};
use securepay_proto::convert::{InvalidEvent, decode_initiated, decode_settled};
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::metrics;

/// Attempts of one commit before the loop moves on (the records will be delivered again).
pub const COMMIT_ATTEMPTS_MAX: u32 = 5;
/// The span around a batch's store call (a child of no single trace: the batch holds events of
/// many).
pub const RECORD_BATCH_SPAN: &str = "notification.record_batch";

/// The topic of each kind. Production uses the canonical names; tests use names of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub initiated: String,
    pub completed: String,
    pub failed: String,
}

impl Default for Topics {
    /// `payment.initiated`, `payment.completed`, `payment.failed`.
    fn default() -> Topics {
        Topics {
            initiated: topic::PAYMENT_INITIATED.to_owned(),
            completed: topic::PAYMENT_COMPLETED.to_owned(),
            failed: topic::PAYMENT_FAILED.to_owned(),
        }
    }
}

impl Topics {
    /// The three topics, to subscribe to.
    pub fn all(&self) -> [&str; 3] {
        [&self.initiated, &self.completed, &self.failed]
    }

    /// The kind of the events on `topic`, if it is one of ours.
    pub fn kind_of(&self, topic: &str) -> Option<NotificationKind> {
        if topic == self.initiated {
            Some(NotificationKind::Initiated)
        } else if topic == self.completed {
            Some(NotificationKind::Completed)
        } else if topic == self.failed {
            Some(NotificationKind::Failed)
        } else {
            None
        }
    }
}

/// How the loop consumes; [`ConsumerConfig::default`] is production's.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub topics: Topics,
    /// The consumer group (`notification-service-group`): whoever builds the consumer joins it.
    pub group: String,
    /// Most records polled per batch, hence per store transaction (at most
    /// `RECORD_BATCH_LEN_MAX`).
    pub batch_len: usize,
    /// Longest one poll waits for records (also how quickly an idle loop notices shutdown).
    pub poll_wait: Duration,
    /// First pause after a failed poll, write or commit; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Limits an event's amount must keep to be valid.
    pub amount_policy: AmountPolicy,
}

impl Default for ConsumerConfig {
    fn default() -> ConsumerConfig {
        ConsumerConfig {
            topics: Topics::default(),
            group: consumer_group::NOTIFICATION_SERVICE.to_owned(),
            batch_len: 256,
            poll_wait: Duration::from_millis(500),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            amount_policy: AmountPolicy::default(),
        }
    }
}

/// Consumes until `shutdown` turns `true` (or its sender is dropped), then returns after
/// committing what was handled. See the module docs for the per-batch protocol.
pub async fn run_consumer<S, C>(
    store: &S,
    consumer: &mut C,
    clock: &dyn Clock,
    config: &ConsumerConfig,
    mut shutdown: watch::Receiver<bool>,
) where
    S: NotificationStore + ?Sized,
    C: EventConsumer + ?Sized,
{
    tracing::info!(group = %config.group, topics = ?config.topics.all(), "notification consumer started");
    let mut backoff = Backoff::new(config);
    let batch_len = config.batch_len.clamp(1, RECORD_BATCH_LEN_MAX);
    while !stopping(&shutdown) {
        let records = match consumer.poll(batch_len, config.poll_wait).await {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(%error, "poll failed; retrying");
                if pause(backoff.next(), &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        if records.is_empty() {
            continue;
        }
        if !handle_batch(store, clock, config, &records, &mut shutdown).await {
            tracing::info!(
                records = records.len(),
                "shutdown while the store is unavailable; the batch stays uncommitted"
            );
            break;
        }
        commit(consumer, &records, config, &mut shutdown).await;
    }
    tracing::info!(group = %config.group, "notification consumer stopped");
}

/// Handles `records` (steps 1–2 of the module docs); `false` when shutdown came during a store
/// outage (then nothing of the batch is known to be recorded, and nothing may be committed).
async fn handle_batch<S: NotificationStore + ?Sized>(
    store: &S,
    clock: &dyn Clock,
    config: &ConsumerConfig,
    records: &[ConsumedRecord],
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut batch: Vec<Notification> = Vec::with_capacity(records.len());
    let mut spans: Vec<tracing::Span> = Vec::with_capacity(records.len());
    for record in records {
        let Some(kind) = config.topics.kind_of(&record.position.topic) else {
            tracing::warn!(topic = %record.position.topic, "record from a topic this service does not consume; skipped");
            continue;
        };
        let notification = match decode(kind, &record.payload, config.amount_policy) {
            Ok(event) => Notification::from_event(&event, clock.now()),
            Err(InvalidEvent { reason }) => {
                skip(record, kind, reason);
                continue;
            }
        };
        // SPEC §8: one `notification.record` span per event, a child of the trace that produced it.
        let span = tracing::info_span!(
            trace::names::NOTIFICATION_RECORD,
            event_id = %notification.event_id,
            payment_id = %notification.payment_id,
            kind = notification.kind.as_str(),
        );
        trace::set_parent(&span, trace::context_from_headers(&record.headers));
        batch.push(notification);
        spans.push(span);
    }
    if batch.is_empty() {
        return true;
    }
    let mut backoff = Backoff::new(config);
    loop {
        let span = tracing::info_span!(RECORD_BATCH_SPAN, notifications = batch.len());
        match store.record_batch(&batch).instrument(span).await {
            Ok(answers) if answers.len() == batch.len() => {
                for ((n, span), recorded) in batch.iter().zip(&spans).zip(answers) {
                    report(n, span, recorded);
                }
                return true;
            }
            Err(PortError::Unavailable { component }) => {
                tracing::warn!(
                    component,
                    notifications = batch.len(),
                    "notification store unavailable; retrying the batch"
                );
                if pause(backoff.next(), shutdown).await {
                    return false;
                }
            }
            refused => {
                let error = refused.err().unwrap_or(PortError::Corrupt { what: "an answer per notification".into() });
                if batch.len() == 1 {
                    refused_alone(&batch[0], &spans[0], &error);
                    return true;
                }
                tracing::warn!(%error, notifications = batch.len(), "batch refused; recording its notifications one by one");
                for (n, span) in batch.iter().zip(&spans) {
                    if !record_until_stored(store, n, config, span, shutdown).await {
                        return false;
                    }
                }
                return true;
            }
        }
    }
}

/// Records one notification alone, retrying while the store is unavailable. `false`: shutdown
/// came first.
async fn record_until_stored<S: NotificationStore + ?Sized>(
    store: &S,
    n: &Notification,
    config: &ConsumerConfig,
    span: &tracing::Span,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut backoff = Backoff::new(config);
    loop {
        match store.record(n).instrument(span.clone()).await {
            Ok(recorded) => {
                report(n, span, recorded);
                return true;
            }
            Err(PortError::Unavailable { component }) => {
                tracing::warn!(event_id = %n.event_id, component, "notification store unavailable; retrying");
                if pause(backoff.next(), shutdown).await {
                    return false;
                }
            }
            Err(error @ (PortError::Refused { .. } | PortError::Corrupt { .. })) => {
                refused_alone(n, span, &error);
                return true;
            }
        }
    }
}

/// Logs and counts what the store answered for `n`, in its span.
fn report(n: &Notification, span: &tracing::Span, recorded: Recorded) {
    span.in_scope(|| match recorded {
        Recorded::New => {
            metrics::recorded(n.kind);
            tracing::info!(
                event_id = %n.event_id,
                payment_id = %n.payment_id,
                kind = n.kind.as_str(),
                amount = %n.amount,
                currency = n.amount.currency().code(),
                reason = n.failure_reason.map(|r| r.code()),
                "notification recorded"
            );
        }
        Recorded::Duplicate => {
            metrics::duplicate(n.kind);
            tracing::debug!(event_id = %n.event_id, kind = n.kind.as_str(), "duplicate event; already notified");
        }
    });
}

/// A notification the store refused on its own (retrying cannot help): logged, counted, skipped.
fn refused_alone(n: &Notification, span: &tracing::Span, error: &PortError) {
    metrics::invalid_event(n.kind, "store_refused");
    span.in_scope(|| {
        tracing::error!(event_id = %n.event_id, kind = n.kind.as_str(), %error, "store refused a notification; skipped")
    });
}

fn decode(kind: NotificationKind, payload: &[u8], policy: AmountPolicy) -> Result<PaymentEvent, InvalidEvent> {
    match kind {
        NotificationKind::Initiated => decode_initiated(payload, policy).map(PaymentEvent::Initiated),
        NotificationKind::Completed | NotificationKind::Failed => {
            decode_settled(kind.topic(), payload, policy).map(PaymentEvent::Settled)
        }
    }
}

fn skip(record: &ConsumedRecord, kind: NotificationKind, reason: &'static str) {
    metrics::invalid_event(kind, reason);
    let p = &record.position;
    tracing::warn!(
        topic = %p.topic,
        partition = p.partition,
        offset = p.offset,
        kind = kind.as_str(),
        reason,
        "invalid event skipped"
    );
}

/// Commits the last position of each partition among `handled`.
async fn commit<C: EventConsumer + ?Sized>(
    consumer: &mut C,
    handled: &[ConsumedRecord],
    config: &ConsumerConfig,
    shutdown: &mut watch::Receiver<bool>,
) {
    let mut last: BTreeMap<(&str, i32), &TopicPartitionOffset> = BTreeMap::new();
    for r in handled {
        last.insert((r.position.topic.as_str(), r.position.partition), &r.position);
    }
    let positions: Vec<TopicPartitionOffset> = last.into_values().cloned().collect();
    if positions.is_empty() {
        return;
    }
    let mut backoff = Backoff::new(config);
    for attempt in 1..=COMMIT_ATTEMPTS_MAX {
        match consumer.commit(&positions).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, attempt, "commit failed; the records will be delivered again if it never succeeds");
                if attempt < COMMIT_ATTEMPTS_MAX && pause(backoff.next(), shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Shutdown was asked for, or nobody can ask any more (the sender is gone: the owner stopped).
fn stopping(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// Sleeps `duration` unless shutdown comes first; `true` when shutting down.
async fn pause(duration: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if stopping(shutdown) {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(duration) => stopping(shutdown),
        _ = shutdown.changed() => stopping(shutdown),
    }
}

/// Capped exponential backoff.
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(config: &ConsumerConfig) -> Backoff {
        Backoff { next: config.backoff_min, min: config.backoff_min, max: config.backoff_max }
    }

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use securepay_core::events::PaymentInitiated;
    use securepay_core::ids::{AccountId, EventId, PaymentId, Subject};
    use securepay_core::money::{Amount, Currency};
    use securepay_memory::{MemoryEventLog, MemoryNotificationStore};
    use securepay_ports::{EventLog, OutgoingRecord, PortResult};
    use time::OffsetDateTime;

    use super::*;

    /// The twin behind a switch: a batch naming `refused` is refused whole, and that notification
    /// alone too. Records the length of every batch and counts single records.
    #[derive(Default)]
    struct Switched {
        inner: MemoryNotificationStore,
        refused: Option<EventId>,
        batches: Mutex<Vec<usize>>,
        singles: Mutex<usize>,
    }

    #[async_trait]
    impl NotificationStore for Switched {
        async fn record(&self, n: &Notification) -> PortResult<Recorded> {
            *self.singles.lock().unwrap() += 1;
            if Some(n.event_id) == self.refused {
                return Err(PortError::Refused { rule: "test_rule" });
            }
            self.inner.record(n).await
        }
        async fn record_batch(&self, batch: &[Notification]) -> PortResult<Vec<Recorded>> {
            self.batches.lock().unwrap().push(batch.len());
            if batch.iter().any(|n| Some(n.event_id) == self.refused) {
                return Err(PortError::Refused { rule: "test_rule" });
            }
            self.inner.record_batch(batch).await
        }
        async fn for_payment(&self, payment: PaymentId, limit: usize) -> PortResult<Vec<Notification>> {
            self.inner.for_payment(payment, limit).await
        }
    }

    struct FixedClock;

    impl Clock for FixedClock {
        fn now(&self) -> OffsetDateTime {
            OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
        }
    }

    fn initiated(n: u128) -> PaymentInitiated {
        PaymentInitiated {
            event_id: EventId::from_uuid(uuid::Uuid::from_u128(n)),
            payment_id: PaymentId::from_uuid(uuid::Uuid::from_u128(1000 + n)),
            subject: Subject::parse("alice").unwrap(),
            from: AccountId::from_uuid(uuid::Uuid::from_u128(2000 + n)),
            to: AccountId::from_uuid(uuid::Uuid::from_u128(3000 + n)),
            amount: Amount::parse("1.00", Currency::from_code("EUR").unwrap(), AmountPolicy::default()).unwrap(),
            occurred_at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
        }
    }

    fn record(event: &PaymentInitiated) -> OutgoingRecord {
        OutgoingRecord {
            topic: topic::PAYMENT_INITIATED.into(),
            key: "one-partition".into(),
            payload: securepay_proto::convert::encode_initiated(event),
            headers: vec![],
        }
    }

    /// Publishes `records`, runs the loop until the group committed all of them, stops it.
    async fn consume(store: &Switched, records: &[OutgoingRecord]) {
        let log = MemoryEventLog::with_partitions(1);
        log.publish(records).await.unwrap();
        let config = ConsumerConfig { poll_wait: Duration::from_millis(5), ..ConsumerConfig::default() };
        let mut consumer = log.consumer(&config.group, &config.topics.all());
        let (stop, stopped) = watch::channel(false);
        let end = records.len() as i64;
        let group = config.group.clone();
        let watching = async {
            while log.committed(&group, topic::PAYMENT_INITIATED, 0) != Some(end) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            stop.send(true).unwrap();
        };
        let running = run_consumer(store, &mut consumer, &FixedClock, &config, stopped);
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(running, watching) })
            .await
            .expect("consumed, committed and stopped");
    }

    #[tokio::test]
    async fn a_polled_batch_is_one_store_call_and_an_event_twice_in_it_is_recorded_once() {
        let store = Switched::default();
        let (a, b) = (initiated(1), initiated(2));
        let garbage = OutgoingRecord { payload: b"garbage".to_vec(), ..record(&a) };
        consume(&store, &[record(&a), record(&b), garbage, record(&a)]).await;

        assert_eq!(*store.batches.lock().unwrap(), [3], "one call for the three valid records");
        assert_eq!(*store.singles.lock().unwrap(), 0);
        let ids: Vec<EventId> = store.inner.all().iter().map(|n| n.event_id).collect();
        assert_eq!(ids, [a.event_id, b.event_id], "once each, in delivery order");
    }

    #[tokio::test]
    async fn a_refused_batch_is_recorded_one_by_one_and_only_the_bad_one_is_skipped() {
        let (good, bad, last) = (initiated(1), initiated(2), initiated(3));
        let store = Switched { refused: Some(bad.event_id), ..Switched::default() };
        consume(&store, &[record(&good), record(&bad), record(&last)]).await;

        assert_eq!(*store.batches.lock().unwrap(), [3], "the batch, refused");
        assert_eq!(*store.singles.lock().unwrap(), 3, "then each alone");
        let ids: Vec<EventId> = store.inner.all().iter().map(|n| n.event_id).collect();
        assert_eq!(ids, [good.event_id, last.event_id], "the good ones recorded, the bad one skipped");
    }

    #[test]
    fn each_configured_topic_names_its_kind_and_nothing_else_does() {
        let topics = Topics { initiated: "a.i".into(), completed: "a.c".into(), failed: "a.f".into() };
        assert_eq!(topics.kind_of("a.i"), Some(NotificationKind::Initiated));
        assert_eq!(topics.kind_of("a.c"), Some(NotificationKind::Completed));
        assert_eq!(topics.kind_of("a.f"), Some(NotificationKind::Failed));
        for other in ["payment.initiated", "", "a.i.dlq"] {
            assert_eq!(topics.kind_of(other), None, "{other}");
        }
        let production = Topics::default();
        for kind in NotificationKind::ALL {
            assert_eq!(production.kind_of(kind.topic()), Some(kind));
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let config = ConsumerConfig {
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(300),
            ..ConsumerConfig::default()
        };
        let mut backoff = Backoff::new(&config);
        let waits: Vec<u128> = (0..5).map(|_| backoff.next().as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 300, 300]);
        backoff.reset();
        assert_eq!(backoff.next(), Duration::from_millis(50));
    }

    #[test]
    fn undecodable_payloads_name_their_reason() {
        let policy = AmountPolicy::default();
        assert_eq!(decode(NotificationKind::Initiated, b"\xff\xff", policy).unwrap_err().reason, "undecodable");
        assert_eq!(decode(NotificationKind::Failed, b"", policy).unwrap_err().reason, "unknown_failure_reason");
    }
}
