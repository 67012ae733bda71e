//! The notification service's store (SPEC §6.7): one notification per event of the payment flow,
//! deduplicated by event id, listed per payment.
//!
//! Promises every implementation keeps (checked by ONE contract suite against PostgreSQL and the
//! in-memory twin, `services/postgres/tests/notification_store_contract.rs`):
//! - **one per event**: `record` is atomic per event id. The first call for an event id writes the
//!   notification and answers [`Recorded::New`]; every later call — concurrent ones included —
//!   writes nothing and answers [`Recorded::Duplicate`]. The first write wins; a later one with
//!   other content does not change it.
//! - **exact**: a notification reads back equal to what was recorded, except that `recorded_at` is
//!   kept to the microsecond (the precision of PostgreSQL's `timestamptz`; both stores truncate).
//!   [`Notification::from_event`] builds values that round-trip unchanged.
//! - **order**: `for_payment` lists a payment's notifications in the order they were recorded
//!   (first recorded first), at most `limit` of them; an unknown payment has none.
//! - **batches**: `record_batch` is `record` for each notification of the batch in order, with
//!   nothing in between, in ONE transaction: per notification `New` for the first of its event id
//!   (in the store or earlier in the batch), `Duplicate` for every later one; all of it is written
//!   or none of it. Of concurrent batches and records naming one event id, exactly one answers `New`.
//! - **errors**: `Unavailable` means nothing is known to be written and the same call may be retried
//!   (it is idempotent); `Refused` means the store's rules refused the value (retrying cannot help):
//!   for a batch, one of its notifications (or its length) — nothing of the batch was written, and
//!   recording its notifications one by one isolates the refused one.

use async_trait::async_trait;
use securepay_core::events::PaymentEvent;
use securepay_core::ids::{AccountId, EventId, PaymentId};
use securepay_core::money::Amount;
use securepay_core::payment::{FailureReason, Outcome, PaymentStatus};
use securepay_core::topology::topic;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::{PortError, PortResult};

/// Most notifications one `for_payment` call returns; a larger `limit` is refused.
pub const LIST_LEN_MAX: usize = 1000;
/// Most notifications one `record_batch` call takes; a longer batch is refused
/// (`notifications_batch_len_max`) and nothing of it is written.
pub const RECORD_BATCH_LEN_MAX: usize = 1024;

/// Which event a notification reports: the topic it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NotificationKind {
    /// `payment.initiated`: the payment was accepted (PENDING).
    Initiated,
    /// `payment.completed`: the money moved.
    Completed,
    /// `payment.failed`: the payment was refused at settlement.
    Failed,
}

impl NotificationKind {
    pub const ALL: [NotificationKind; 3] =
        [NotificationKind::Initiated, NotificationKind::Completed, NotificationKind::Failed];

    /// The stable public name: `initiated`, `completed`, `failed`.
    pub const fn as_str(self) -> &'static str {
        match self {
            NotificationKind::Initiated => "initiated",
            NotificationKind::Completed => "completed",
            NotificationKind::Failed => "failed",
        }
    }

    /// The canonical topic of this kind's events (`securepay_core::topology::topic`).
    pub const fn topic(self) -> &'static str {
        match self {
            NotificationKind::Initiated => topic::PAYMENT_INITIATED,
            NotificationKind::Completed => topic::PAYMENT_COMPLETED,
            NotificationKind::Failed => topic::PAYMENT_FAILED,
        }
    }

    /// The kind whose canonical topic is `topic`.
    pub fn from_topic(topic: &str) -> Option<NotificationKind> {
        Self::ALL.into_iter().find(|k| k.topic() == topic)
    }

    /// The payment status this event puts the payment in.
    pub const fn status(self) -> PaymentStatus {
        match self {
            NotificationKind::Initiated => PaymentStatus::Pending,
            NotificationKind::Completed => PaymentStatus::Completed,
            NotificationKind::Failed => PaymentStatus::Failed,
        }
    }
}

/// One recorded notification: what happened to a payment, as one event announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The event's id: a notification's identity (one per event).
    pub event_id: EventId,
    pub payment_id: PaymentId,
    pub kind: NotificationKind,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    /// `Some` exactly when `kind` is `Failed`.
    pub failure_reason: Option<FailureReason>,
    /// When the event happened (the event's own time).
    pub occurred_at: OffsetDateTime,
    /// When this service recorded it (from the `Clock` port), kept to the microsecond.
    pub recorded_at: OffsetDateTime,
}

impl Notification {
    /// The notification of `event`, recorded at `now` (truncated to the microsecond, so the value
    /// round-trips through every store unchanged).
    pub fn from_event(event: &PaymentEvent, now: OffsetDateTime) -> Notification {
        let recorded_at = truncate_to_micros(now);
        match event {
            PaymentEvent::Initiated(e) => Notification {
                event_id: e.event_id,
                payment_id: e.payment_id,
                kind: NotificationKind::Initiated,
                from: e.from,
                to: e.to,
                amount: e.amount,
                failure_reason: None,
                occurred_at: e.occurred_at,
                recorded_at,
            },
            PaymentEvent::Settled(e) => Notification {
                event_id: e.event_id,
                payment_id: e.payment_id,
                kind: match e.outcome {
                    Outcome::Completed => NotificationKind::Completed,
                    Outcome::Failed(_) => NotificationKind::Failed,
                },
                from: e.from,
                to: e.to,
                amount: e.amount,
                failure_reason: e.failure_reason(),
                occurred_at: e.occurred_at,
                recorded_at,
            },
        }
    }
}

/// `at` without its sub-microsecond part: the precision a store keeps `recorded_at` at.
pub fn truncate_to_micros(at: OffsetDateTime) -> OffsetDateTime {
    let nanos = at.nanosecond() / 1_000 * 1_000;
    at.replace_nanosecond(nanos).expect("a truncated nanosecond field is still below 1e9")
}

/// The rule every store checks before writing `n`, the same in every implementation: its
/// `occurred_at` must be expressible as RFC 3339 (years 0000–9999, whole-minute offset), the form
/// it is stored in — else `Refused { rule: "occurred_at_rfc3339" }`.
pub fn check_notification(n: &Notification) -> PortResult<()> {
    match n.occurred_at.format(&Rfc3339) {
        Ok(_) => Ok(()),
        Err(_) => Err(PortError::Refused { rule: "occurred_at_rfc3339" }),
    }
}

/// Per notification of `batch`: whether it is the first of its event id within the batch (a
/// later one is a `Duplicate` whatever the store holds).
pub fn first_of_event_in_batch(batch: &[Notification]) -> Vec<bool> {
    let mut seen = std::collections::BTreeSet::new();
    batch.iter().map(|n| seen.insert(n.event_id)).collect()
}

/// What `record` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The first time this event id was recorded: the notification is now stored.
    New,
    /// The event id was recorded before; nothing was written.
    Duplicate,
}

/// The notification service's store of record. See the module docs for the promises.
#[async_trait]
pub trait NotificationStore: Send + Sync + 'static {
    /// Records `notification` unless its event id was recorded before (atomically: of any number
    /// of concurrent calls for one event id exactly one answers `New`).
    async fn record(&self, notification: &Notification) -> PortResult<Recorded>;

    /// Records `batch` in ONE transaction, exactly as `record` of each of its notifications in
    /// order would (see the module docs): `Ok` holds one answer per notification, in order (empty
    /// for an empty batch); `Err` means nothing of the batch was written. Longer than
    /// [`RECORD_BATCH_LEN_MAX`]: `Refused { rule: "notifications_batch_len_max" }`.
    async fn record_batch(&self, batch: &[Notification]) -> PortResult<Vec<Recorded>>;

    /// Up to `limit` (≤ [`LIST_LEN_MAX`], else `Refused`) notifications of `payment`, first
    /// recorded first. Empty for a payment without any.
    async fn for_payment(&self, payment: PaymentId, limit: usize) -> PortResult<Vec<Notification>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_their_topics_and_back() {
        for kind in NotificationKind::ALL {
            assert_eq!(NotificationKind::from_topic(kind.topic()), Some(kind));
        }
        assert_eq!(NotificationKind::from_topic(topic::PAYMENT_INITIATED_DLQ), None);
        assert_eq!(NotificationKind::from_topic("initiated"), None);
    }

    #[test]
    fn the_first_of_each_event_id_in_a_batch_is_marked() {
        let event = |n: u128| PaymentEvent::Initiated(initiated(n));
        let at = OffsetDateTime::UNIX_EPOCH;
        let (a, b) = (Notification::from_event(&event(1), at), Notification::from_event(&event(2), at));
        assert_eq!(
            first_of_event_in_batch(&[a.clone(), b.clone(), a.clone(), b, a]),
            [true, true, false, false, false]
        );
        assert!(first_of_event_in_batch(&[]).is_empty());
    }

    #[test]
    fn an_occurred_at_rfc_3339_cannot_write_is_refused() {
        let mut n = Notification::from_event(&PaymentEvent::Initiated(initiated(1)), OffsetDateTime::UNIX_EPOCH);
        assert_eq!(check_notification(&n), Ok(()));
        n.occurred_at = OffsetDateTime::from_unix_timestamp(-70_000_000_000).unwrap();
        assert_eq!(check_notification(&n), Err(PortError::Refused { rule: "occurred_at_rfc3339" }));
    }

    fn initiated(n: u128) -> securepay_core::events::PaymentInitiated {
        use securepay_core::ids::Subject;
        use securepay_core::money::{AmountPolicy, Currency};
        securepay_core::events::PaymentInitiated {
            event_id: EventId::from_uuid(uuid::Uuid::from_u128(n)),
            payment_id: PaymentId::from_uuid(uuid::Uuid::from_u128(100 + n)),
            subject: Subject::parse("alice").unwrap(),
            from: AccountId::from_uuid(uuid::Uuid::from_u128(200 + n)),
            to: AccountId::from_uuid(uuid::Uuid::from_u128(300 + n)),
            amount: Amount::parse("1.00", Currency::from_code("EUR").unwrap(), AmountPolicy::default()).unwrap(),
            occurred_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn truncation_keeps_whole_microseconds() {
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap().replace_nanosecond(123_456_789).unwrap();
        assert_eq!(truncate_to_micros(at).nanosecond(), 123_456_000);
        assert_eq!(truncate_to_micros(truncate_to_micros(at)), truncate_to_micros(at));
    }
}
