//! The payment service's store: payments, their transitions, and the transactional outbox.

use std::collections::BTreeMap;

use async_trait::async_trait;
use securepay_core::events::PaymentInitiated;
use securepay_core::idempotency::{Fingerprint, IdempotencyKey};
use securepay_core::ids::{PaymentId, Subject};
use securepay_core::payment::{FailureReason, Payment, PaymentStatus, Transition, is_legal};

use crate::error::{PortError, PortResult};
use crate::outbox::Outbox;

/// One transition of a [`PaymentStore::record_transitions`] batch: the arguments of one
/// [`PaymentStore::record_transition`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionRecord {
    pub payment: PaymentId,
    pub transition: Transition,
    /// The failure reason's code; `Some` exactly for a transition to FAILED.
    pub failure_reason: Option<String>,
}

/// Most items one `get_many` or `record_transitions` call takes; more is refused
/// (`payments_batch_len_max`) and nothing is read or written.
pub const PAYMENT_BATCH_LEN_MAX: usize = 1024;

/// The idempotency record a payment's insert completes in its own transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyCompletion {
    pub subject: Subject,
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    /// The encoded first response, replayed byte for byte to identical retries.
    pub response: Vec<u8>,
    /// `true`: the request holds this store's IN_FLIGHT claim (made through its
    /// `IdempotencyStore::claim`) and the insert completes it. `false`: the request claimed the
    /// key only in the fast path, and the insert writes the key's COMPLETED record itself — so the
    /// unique (subject, key) of the store is what lets exactly one request with a key write a
    /// payment, in the payment's own transaction (one transaction per accepted payment).
    pub claimed: bool,
}

/// One payment of a [`PaymentStore::insert_many`] batch: the arguments of one
/// [`PaymentStore::insert_with_event`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPayment {
    pub payment: Payment,
    pub event: PaymentInitiated,
    pub headers: Vec<(String, String)>,
    pub idempotency: Option<IdempotencyCompletion>,
}

#[async_trait]
pub trait PaymentStore: Outbox {
    /// Writes a new PENDING payment AND its `payment.initiated` outbox event atomically: both or
    /// neither (the transactional outbox — no accepted payment without its event). With
    /// `idempotency`, the same transaction also records that key as COMPLETED with the response to
    /// replay and the payment id — completing its IN_FLIGHT claim (`claimed`, made through this
    /// store's `IdempotencyStore::claim`), or writing the record afresh (`!claimed`) — so a key can
    /// never name a payment that was not written, nor be left claimable after one was.
    /// Refusals (nothing written): `idempotency_claim_lost` if the key's record is not what the
    /// completion expects — `claimed`: an IN_FLIGHT claim with `completion.fingerprint` (it was
    /// completed by a racing request, or purged); `!claimed`: absent (any record of the key, in
    /// flight or completed, refuses it) — checked before `payment_exists` (the id is taken), so a
    /// retry that lost its key's race learns that first.
    async fn insert_with_event(
        &self,
        payment: &Payment,
        event: &PaymentInitiated,
        headers: &[(String, String)],
        idempotency: Option<&IdempotencyCompletion>,
    ) -> PortResult<()>;

    /// Group commit: inserts every item of `batch` (at most [`PAYMENT_BATCH_LEN_MAX`]) exactly as
    /// `insert_with_event` of each would, answering per item (`answers[i]` for `batch[i]`); a
    /// refused item takes nothing else down. A store writes the batch in ONE transaction where it
    /// can (one commit, one WAL flush for all), and falls back to one transaction per item when the
    /// batch's transaction is refused, so a refusal is pinned on its own item. `Err` means nothing
    /// was written (`Unavailable`: the caller answers every item with it). The default is the
    /// one-by-one loop.
    async fn insert_many(&self, batch: &[NewPayment]) -> PortResult<Vec<PortResult<()>>> {
        if batch.len() > PAYMENT_BATCH_LEN_MAX {
            return Err(PortError::Refused { rule: "payments_batch_len_max" });
        }
        Ok(insert_each(self, batch).await)
    }

    /// The payment with its transition history, if any.
    async fn get(&self, id: PaymentId) -> PortResult<Option<Payment>>;

    /// `get` of each of `ids` (at most [`PAYMENT_BATCH_LEN_MAX`]) in ONE read: one consistent
    /// view, the answer for `ids[i]` at position `i` (`None`: no such payment; an id named twice
    /// is answered twice).
    async fn get_many(&self, ids: &[PaymentId]) -> PortResult<Vec<Option<Payment>>>;

    /// Persists one transition and the new status atomically, only if the stored status is still
    /// `transition.from` (compare-and-set); otherwise `Refused { rule: "illegal_transition" }`.
    /// The store enforces the transition table itself, even if the caller is wrong.
    async fn record_transition(
        &self,
        id: PaymentId,
        transition: &Transition,
        failure_reason: Option<&str>,
    ) -> PortResult<()>;

    /// Records `batch` in ONE transaction, exactly as `record_transition` of each item in order,
    /// with nothing in between, would: `Ok(answers)` holds per item what that call would have
    /// answered — `Ok(())` applied, or its refusal (`illegal_transition` when the compare-and-set
    /// fails, e.g. the second of two outcomes of one payment in the batch, `unknown_payment`, or a
    /// rule of [`check_transition`]) — and every applied item is committed together; a refused
    /// item takes nothing else down. The decision per item is [`decide_transitions`]. `Err` means
    /// nothing of the batch was written: `Unavailable` (retry the same batch), or `Refused` /
    /// `Corrupt` the store could not pin on one item (record the items one by one to isolate it);
    /// longer than [`PAYMENT_BATCH_LEN_MAX`]: `Refused { rule: "payments_batch_len_max" }`.
    async fn record_transitions(&self, batch: &[TransitionRecord]) -> PortResult<Vec<PortResult<()>>>;
}

/// `insert_with_event` of each item of `batch` in order, one answer per item: the one-by-one path
/// of [`PaymentStore::insert_many`] (its default, and a store's fallback when the batch's
/// transaction is refused).
pub async fn insert_each<S: PaymentStore + ?Sized>(store: &S, batch: &[NewPayment]) -> Vec<PortResult<()>> {
    let mut answers = Vec::with_capacity(batch.len());
    for item in batch {
        answers
            .push(store.insert_with_event(&item.payment, &item.event, &item.headers, item.idempotency.as_ref()).await);
    }
    answers
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

/// The decision of every `record_transitions`: per item of `batch`, in order, what
/// `record_transition` would answer were the items recorded one by one — given `status_of`, each
/// payment's stored status before the batch (`None`: no such payment). `Ok(reason)`: the item
/// applies (with its parsed failure reason) and moves its payment on for the items after it;
/// otherwise the refusal: a [`check_transition`] rule, `unknown_payment`, or `illegal_transition`
/// when the payment is no longer in `transition.from` (compare-and-set).
pub fn decide_transitions(
    batch: &[TransitionRecord],
    status_of: impl Fn(PaymentId) -> Option<PaymentStatus>,
) -> Vec<PortResult<Option<FailureReason>>> {
    let mut moved: BTreeMap<PaymentId, PaymentStatus> = BTreeMap::new();
    batch
        .iter()
        .map(|item| {
            let reason = check_transition(&item.transition, item.failure_reason.as_deref())?;
            let status = moved
                .get(&item.payment)
                .copied()
                .or_else(|| status_of(item.payment))
                .ok_or(refused("unknown_payment"))?;
            if status != item.transition.from {
                return Err(refused("illegal_transition"));
            }
            moved.insert(item.payment, item.transition.to);
            Ok(reason)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_decided_as_the_same_transitions_one_by_one() {
        use PaymentStatus::*;
        let id = |n: u128| PaymentId::from_uuid(uuid::Uuid::from_u128(n));
        let item = |n, to, reason: Option<&str>| TransitionRecord {
            payment: id(n),
            transition: Transition { from: Pending, to, cause: "settled".into(), at: time::OffsetDateTime::UNIX_EPOCH },
            failure_reason: reason.map(str::to_owned),
        };
        let stored = |p: PaymentId| match p.as_uuid().as_u128() {
            1 | 2 => Some(Pending),
            3 => Some(Completed),
            _ => None,
        };
        let batch = [
            item(1, Completed, None),
            item(1, Completed, None), // the same outcome again: lost CAS
            item(2, Failed, Some("insufficient_funds")),
            item(1, Failed, Some("insufficient_funds")), // contradicting the first
            item(3, Completed, None),                    // already terminal in the store
            item(4, Completed, None),                    // no such payment
            item(2, Completed, Some("insufficient_funds")), // refused by check_transition first
        ];
        let refused = |rule| Err(PortError::Refused { rule });
        assert_eq!(
            decide_transitions(&batch, stored),
            [
                Ok(None),
                refused("illegal_transition"),
                Ok(Some(FailureReason::InsufficientFunds)),
                refused("illegal_transition"),
                refused("illegal_transition"),
                refused("unknown_payment"),
                refused("illegal_transition"),
            ]
        );
        assert!(decide_transitions(&[], stored).is_empty());
    }

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
