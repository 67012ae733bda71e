//! The consumer loop: payment events in, one notification per event out (SPEC §6.7).
//!
//! Per polled batch, in delivery order (so per-partition order is kept):
//! 1. the record's topic names its kind ([`Topics`]); the payload is decoded and validated by
//!    `securepay_proto::convert` — a record that fails is logged with its reason (never its
//!    payload), counted (`securepay_notification_invalid_events_total{kind,reason}`) and skipped,
//!    so one bad record never stalls its partition;
//! 2. the notification is recorded in a span `notification.record` whose parent is the trace context
//!    of the record's headers (W3C `traceparent`, SPEC §8). `New` is logged as ONE structured
//!    line (fields `event_id`, `payment_id`, `kind`, `amount`, `currency`, `reason`); `Duplicate`
//!    (redelivery, or an event published twice) changes nothing. `Unavailable` retries the SAME
//!    record with capped exponential backoff — nothing after it is handled, nothing committed past
//!    it. A record the store refuses (`Refused`/`Corrupt`: retrying cannot help) is logged, counted
//!    as `store_refused` and skipped;
//! 3. then, and only then, the handled records' offsets are committed. A failed commit is retried a
//!    few times, then left: the records are delivered again and deduplicated by event id.
//!
//! Shutdown (the watch channel turns `true`): the current batch is finished and committed, then the
//! loop returns. During a store outage it stops at once and commits only the records handled so far.

use std::collections::BTreeMap;
use std::time::Duration;

use securepay_core::events::PaymentEvent;
use securepay_core::money::AmountPolicy;
use securepay_core::topology::{consumer_group, topic};
use securepay_kit::trace;
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
    /// Most records polled per batch.
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
    while !stopping(&shutdown) {
        let records = match consumer.poll(config.batch_len, config.poll_wait).await {
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
        let handled = handle_batch(store, clock, config, &records, &mut shutdown).await;
        commit(consumer, &records[..handled], config, &mut shutdown).await;
    }
    tracing::info!(group = %config.group, "notification consumer stopped");
}

/// Handles `records` in order; returns how many were handled (all, unless shutdown came during a
/// store outage).
async fn handle_batch<S: NotificationStore + ?Sized>(
    store: &S,
    clock: &dyn Clock,
    config: &ConsumerConfig,
    records: &[ConsumedRecord],
    shutdown: &mut watch::Receiver<bool>,
) -> usize {
    for (i, record) in records.iter().enumerate() {
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
        if !record_until_stored(store, &notification, config, &span, shutdown).await {
            return i;
        }
    }
    records.len()
}

/// Records one notification, retrying while the store is unavailable. `false`: shutdown came first.
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
            Ok(Recorded::New) => {
                metrics::recorded(n.kind);
                span.in_scope(|| {
                    tracing::info!(
                        event_id = %n.event_id,
                        payment_id = %n.payment_id,
                        kind = n.kind.as_str(),
                        amount = %n.amount,
                        currency = n.amount.currency().code(),
                        reason = n.failure_reason.map(|r| r.code()),
                        "notification recorded"
                    )
                });
                return true;
            }
            Ok(Recorded::Duplicate) => {
                metrics::duplicate(n.kind);
                tracing::debug!(event_id = %n.event_id, kind = n.kind.as_str(), "duplicate event; already notified");
                return true;
            }
            Err(PortError::Unavailable { component }) => {
                tracing::warn!(event_id = %n.event_id, component, "notification store unavailable; retrying");
                if pause(backoff.next(), shutdown).await {
                    return false;
                }
            }
            Err(error @ (PortError::Refused { .. } | PortError::Corrupt { .. })) => {
                metrics::invalid_event(n.kind, "store_refused");
                tracing::error!(event_id = %n.event_id, kind = n.kind.as_str(), %error, "store refused a notification; skipped");
                return true;
            }
        }
    }
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
    use super::*;

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
