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
//! - **errors**: `Unavailable` means nothing is known to be written and the same call may be retried
//!   (it is idempotent); `Refused` means the store's rules refused the value (retrying cannot help).

use async_trait::async_trait;
use securepay_core::events::PaymentEvent;
use securepay_core::ids::{AccountId, EventId, PaymentId};
use securepay_core::money::Amount;
use securepay_core::payment::{FailureReason, Outcome, PaymentStatus};
use securepay_core::topology::topic;
use time::OffsetDateTime;

use crate::error::PortResult;

/// Most notifications one `for_payment` call returns; a larger `limit` is refused.
pub const LIST_LEN_MAX: usize = 1000;

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
    fn truncation_keeps_whole_microseconds() {
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap().replace_nanosecond(123_456_789).unwrap();
        assert_eq!(truncate_to_micros(at).nanosecond(), 123_456_000);
        assert_eq!(truncate_to_micros(truncate_to_micros(at)), truncate_to_micros(at));
    }
}
