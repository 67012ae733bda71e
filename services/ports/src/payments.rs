//! The payment service's store: payments, their transitions, and the transactional outbox.

use async_trait::async_trait;
use securepay_core::events::PaymentInitiated;
use securepay_core::idempotency::{Fingerprint, IdempotencyKey};
use securepay_core::ids::{PaymentId, Subject};
use securepay_core::payment::{FailureReason, Payment, PaymentStatus, Transition, is_legal};

use crate::error::{PortError, PortResult};
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

/// How long an IN_FLIGHT idempotency claim is held before a retry of the same request may take it
/// over (the first request's process is presumed dead).
pub const IDEMPOTENCY_LEASE_S: i64 = 30;
/// How long an idempotency record is kept at least (SPEC §6.1; the schema's `idempotency_keys_kept_24h`).
pub const IDEMPOTENCY_RETENTION_H: i64 = 24;
/// Most bytes of one stored idempotent response (the schema's `idempotency_keys_response_bounded`).
pub const IDEMPOTENCY_RESPONSE_LEN_MAX: usize = 64 * 1024;
/// Longest transition cause, in characters (the schema's `transitions_cause_bounded`).
pub const TRANSITION_CAUSE_LEN_MAX: usize = 128;

fn refused(rule: &'static str) -> PortError {
    PortError::Refused { rule }
}

/// The preconditions every `PaymentStore::insert_with_event` checks before writing (the same
/// refusal rules in every implementation, before any IO).
pub fn check_insert(
    payment: &Payment,
    event: &PaymentInitiated,
    completion: Option<&IdempotencyCompletion>,
) -> PortResult<()> {
    if payment.status != PaymentStatus::Pending || payment.failure_reason.is_some() || !payment.transitions.is_empty() {
        return Err(refused("invalid_payment"));
    }
    let same_terms = event.payment_id == payment.id
        && event.subject == payment.subject
        && event.from == payment.from
        && event.to == payment.to
        && event.amount == payment.amount;
    if !same_terms {
        return Err(refused("invalid_event"));
    }
    if let Some(completion) = completion {
        if completion.subject != payment.subject {
            return Err(refused("idempotency_subject_mismatch"));
        }
        if completion.response.len() > IDEMPOTENCY_RESPONSE_LEN_MAX {
            return Err(refused("idempotency_response_len_max"));
        }
    }
    Ok(())
}

/// What a transition must be before any store records it; returns the parsed failure reason.
pub fn check_transition(transition: &Transition, failure_reason: Option<&str>) -> PortResult<Option<FailureReason>> {
    let cause_len = transition.cause.chars().count();
    if !(1..=TRANSITION_CAUSE_LEN_MAX).contains(&cause_len) {
        return Err(refused("transitions_cause_bounded"));
    }
    if !is_legal(transition.from, transition.to) {
        return Err(refused("illegal_transition"));
    }
    match (transition.to, failure_reason) {
        (PaymentStatus::Failed, Some(code)) => {
            FailureReason::parse(code).map(Some).ok_or(refused("unknown_failure_reason"))
        }
        (PaymentStatus::Failed, None) | (_, Some(_)) => Err(refused("illegal_transition")),
        (_, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_rules_are_checked_before_any_io() {
        let t =
            |from, to, cause: &str| Transition { from, to, cause: cause.into(), at: time::OffsetDateTime::UNIX_EPOCH };
        let refused = |rule| Err(PortError::Refused { rule });
        use PaymentStatus::*;
        assert_eq!(check_transition(&t(Pending, Completed, "settled"), None), Ok(None));
        assert_eq!(
            check_transition(&t(Pending, Failed, "x"), Some("insufficient_funds")),
            Ok(Some(FailureReason::InsufficientFunds))
        );
        assert_eq!(
            check_transition(&t(Completed, Failed, "x"), Some("insufficient_funds")),
            refused("illegal_transition")
        );
        assert_eq!(check_transition(&t(Pending, Failed, "x"), None), refused("illegal_transition"));
        assert_eq!(
            check_transition(&t(Pending, Completed, "x"), Some("insufficient_funds")),
            refused("illegal_transition")
        );
        assert_eq!(check_transition(&t(Pending, Failed, "x"), Some("nope")), refused("unknown_failure_reason"));
        assert_eq!(check_transition(&t(Pending, Completed, ""), None), refused("transitions_cause_bounded"));
        assert_eq!(
            check_transition(&t(Pending, Completed, &"c".repeat(TRANSITION_CAUSE_LEN_MAX + 1)), None),
            refused("transitions_cause_bounded")
        );
    }
}
