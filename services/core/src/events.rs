//! The domain events of the payment flow (wire form: `proto/events/v1`). Each carries its own
//! event id — consumers dedupe by it — and is keyed by payment id on the bus.

use time::OffsetDateTime;

use crate::ids::{AccountId, EventId, PaymentId, Subject};
use crate::money::Amount;
use crate::payment::{FailureReason, Outcome};
use crate::topology::topic;

/// Written to the payment outbox in the same transaction as the payment row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentInitiated {
    pub event_id: EventId,
    pub payment_id: PaymentId,
    pub subject: Subject,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    pub occurred_at: OffsetDateTime,
}

/// The settlement verdict, written to the account outbox in the settlement transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentSettled {
    pub event_id: EventId,
    pub payment_id: PaymentId,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    pub outcome: Outcome,
    pub occurred_at: OffsetDateTime,
}

impl PaymentSettled {
    /// `payment.completed` or `payment.failed`.
    pub fn topic(&self) -> &'static str {
        match self.outcome {
            Outcome::Completed => topic::PAYMENT_COMPLETED,
            Outcome::Failed(_) => topic::PAYMENT_FAILED,
        }
    }

    pub fn failure_reason(&self) -> Option<FailureReason> {
        match self.outcome {
            Outcome::Completed => None,
            Outcome::Failed(reason) => Some(reason),
        }
    }
}

/// Any event of the flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentEvent {
    Initiated(PaymentInitiated),
    Settled(PaymentSettled),
}

impl PaymentEvent {
    pub fn event_id(&self) -> EventId {
        match self {
            PaymentEvent::Initiated(e) => e.event_id,
            PaymentEvent::Settled(e) => e.event_id,
        }
    }

    pub fn payment_id(&self) -> PaymentId {
        match self {
            PaymentEvent::Initiated(e) => e.payment_id,
            PaymentEvent::Settled(e) => e.payment_id,
        }
    }

    pub fn topic(&self) -> &'static str {
        match self {
            PaymentEvent::Initiated(_) => topic::PAYMENT_INITIATED,
            PaymentEvent::Settled(e) => e.topic(),
        }
    }
}
