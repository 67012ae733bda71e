//! The payment service's store: payments, their transitions, and the transactional outbox.

use async_trait::async_trait;
use securepay_core::events::PaymentInitiated;
use securepay_core::ids::PaymentId;
use securepay_core::payment::{Payment, Transition};

use crate::error::PortResult;
use crate::outbox::Outbox;

#[async_trait]
pub trait PaymentStore: Outbox {
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
}
