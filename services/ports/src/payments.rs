//! The payment service's store: payments, their transitions, and the transactional outbox.

use async_trait::async_trait;
use securepay_core::events::PaymentInitiated;
use securepay_core::ids::PaymentId;
use securepay_core::payment::{Payment, Transition};

use crate::error::PortResult;

/// An outbox row waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Store-assigned, increasing in commit order; the relay publishes in this order.
    pub sequence: i64,
    pub topic: String,
    /// Kafka key (the payment id).
    pub key: String,
    /// Encoded `events.v1` message.
    pub payload: Vec<u8>,
    /// W3C trace context and other headers to put on the record.
    pub headers: Vec<(String, String)>,
}

#[async_trait]
pub trait PaymentStore: Send + Sync + 'static {
    /// Writes a new PENDING payment AND its `payment.initiated` outbox event atomically: both or
    /// neither (the transactional outbox — no accepted payment without its event).
    /// `Refused { rule: "payment_exists" }` if the id is taken.
    async fn insert_with_event(
        &self,
        payment: &Payment,
        event: &PaymentInitiated,
        headers: &[(String, String)],
    ) -> PortResult<()>;

    /// The payment with its transition history, if any.
    async fn get(&self, id: PaymentId) -> PortResult<Option<Payment>>;

    /// Persists one transition and the new status atomically, only if the stored status is still
    /// `transition.from` (compare-and-set); otherwise `Refused { rule: "illegal_transition" }`.
    /// The store enforces the transition table itself, even if the caller is wrong.
    async fn record_transition(
        &self,
        id: PaymentId,
        transition: &Transition,
        failure_reason: Option<&str>,
    ) -> PortResult<()>;

    /// Up to `limit` unpublished outbox events in sequence order. Safe with several relays: an
    /// event may be handed to two relays (at-least-once), never lost.
    async fn unpublished(&self, limit: usize) -> PortResult<Vec<OutboxEvent>>;

    /// Marks events published (after the broker acknowledged them). Idempotent.
    async fn mark_published(&self, sequences: &[i64]) -> PortResult<()>;
}
