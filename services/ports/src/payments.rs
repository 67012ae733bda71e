//! The payment service's store: payments, their transitions, and the transactional outbox.

use async_trait::async_trait;
use securepay_core::events::PaymentInitiated;
use securepay_core::idempotency::{Fingerprint, IdempotencyKey};
use securepay_core::ids::{PaymentId, Subject};
use securepay_core::payment::{Payment, Transition};

use crate::error::PortResult;
use crate::outbox::Outbox;

/// The idempotency record a payment's insert completes in its own transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyCompletion {
    pub subject: Subject,
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    /// The encoded first response, replayed byte for byte to identical retries.
    pub response: Vec<u8>,
}

#[async_trait]
pub trait PaymentStore: Outbox {
    /// Writes a new PENDING payment AND its `payment.initiated` outbox event atomically: both or
    /// neither (the transactional outbox — no accepted payment without its event). With
    /// `idempotency`, the same transaction also completes that key's IN_FLIGHT claim (made through
    /// this store's `IdempotencyStore::claim`) with the response to replay and the payment id, so a
    /// key can never name a payment that was not written, nor be left claimable after one was.
    /// Refusals (nothing written): `payment_exists` if the id is taken; `idempotency_claim_lost` if
    /// the key's record is not an IN_FLIGHT claim with `completion.fingerprint` (completed by a
    /// racing request, or purged).
    async fn insert_with_event(
        &self,
        payment: &Payment,
        event: &PaymentInitiated,
        headers: &[(String, String)],
        idempotency: Option<&IdempotencyCompletion>,
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
