//! `MemoryPaymentStore`: the payment service's store of record in memory — [`PaymentStore`],
//! its [`Outbox`] and the PostgreSQL half of [`IdempotencyStore`] over ONE mutex-protected state,
//! so that `insert_with_event` writes the payment, its event and the completion of its
//! idempotency claim in one step, exactly as `PgPaymentStore` does in one transaction.
//!
//! It keeps the promises `PgPaymentStore` keeps (the contract suite
//! `services/postgres/tests/payment_store_contract.rs` runs both):
//! - single writer: one `std::sync::Mutex`, never held across an `.await`; every write checks all
//!   its rules before it changes anything, so a refused write leaves nothing behind;
//! - a payment is born PENDING without history; its status moves only through
//!   `securepay_core::payment::is_legal`, as a compare-and-set on `transition.from`, and every move
//!   is appended to its history with time and cause; a batch of transitions is decided by
//!   `securepay_ports::payments::decide_transitions` and applied under the one lock, so it is one
//!   step, as PostgreSQL's one transaction is;
//! - an outbox event per accepted payment (`payment.initiated`, keyed by payment id), sequences
//!   increasing in commit order, unpublished until marked; event ids unique;
//! - idempotency: exactly one concurrent claimer of a (subject, key) gets `None`; an IN_FLIGHT claim
//!   holds a lease of [`IDEMPOTENCY_LEASE_S`] seconds, after which a request with the SAME
//!   fingerprint may take it over (the first request's process died); a completed record is
//!   replayed unchanged and never released.
//!
//! Time comes only from the arguments (`now`, `transition.at`, `payment.created_at`), never from a
//! clock, and is kept at PostgreSQL's precision (microseconds) so both stores read back the same.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use securepay_core::events::PaymentInitiated;
use securepay_core::idempotency::{Fingerprint, IdempotencyKey, Record};
use securepay_core::ids::{EventId, PaymentId, Subject};
use securepay_core::payment::{Payment, Transition};
use securepay_core::topology::topic;
use securepay_ports::payments::{
    IDEMPOTENCY_LEASE_S, IDEMPOTENCY_RESPONSE_LEN_MAX, PAYMENT_BATCH_LEN_MAX, check_insert, decide_transitions,
};
use securepay_ports::{
    IdempotencyCompletion, IdempotencyStore, Outbox, OutboxEvent, PaymentStore, PortError, PortResult, TransitionRecord,
};
use time::{Duration, OffsetDateTime};

use crate::ledger::OUTBOX_BATCH_LEN_MAX;
use crate::outbox::OutboxRows;

/// As `PgPaymentStore` (and `PgLedgerStore`) name it, so a caller cannot tell the twin from the real store.
const COMPONENT: &str = "postgresql";

/// The in-memory store. Clones share one state (see the crate docs on crash semantics).
#[derive(Debug, Clone, Default)]
pub struct MemoryPaymentStore {
    state: Arc<Mutex<State>>,
    /// PLANTED BUG `fresh_key_unchecked` (see [`MemoryPaymentStore::plant_fresh_key_unchecked`]).
    #[cfg(feature = "planted-bugs")]
    fresh_key_unchecked: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, Default)]
struct State {
    unavailable: bool,
    committed: PaymentSnapshot,
}

/// Everything the store has committed: a copy of it is a snapshot of the "disk".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PaymentSnapshot {
    payments: BTreeMap<PaymentId, Payment>,
    keys: BTreeMap<(Subject, IdempotencyKey), KeyRow>,
    outbox: OutboxRows,
    event_ids: BTreeSet<EventId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyRow {
    fingerprint: Fingerprint,
    state: KeyState,
    created_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyState {
    InFlight { locked_until: OffsetDateTime },
    Completed { response: Vec<u8>, payment_id: Option<PaymentId> },
}

impl KeyRow {
    fn record(&self) -> Record<Vec<u8>> {
        match &self.state {
            KeyState::InFlight { .. } => Record::InFlight { fingerprint: self.fingerprint },
            KeyState::Completed { response, .. } => {
                Record::Completed { fingerprint: self.fingerprint, response: response.clone() }
            }
        }
    }
}

impl PaymentSnapshot {
    /// Every payment, in id order.
    pub fn payments(&self) -> impl Iterator<Item = &Payment> {
        self.payments.values()
    }

    /// The payment an idempotency key's completed record names, if any.
    pub fn payment_of_key(&self, subject: &Subject, key: &IdempotencyKey) -> Option<PaymentId> {
        match self.keys.get(&(subject.clone(), key.clone()))?.state {
            KeyState::Completed { payment_id, .. } => payment_id,
            KeyState::InFlight { .. } => None,
        }
    }

    /// Every outbox event, published or not, in sequence order.
    pub fn outbox(&self) -> impl Iterator<Item = &OutboxEvent> {
        self.outbox.events()
    }
}

impl MemoryPaymentStore {
    pub fn new() -> MemoryPaymentStore {
        MemoryPaymentStore::default()
    }

    /// A store whose state is `snapshot` (a restart from a copied disk).
    pub fn restore(snapshot: PaymentSnapshot) -> MemoryPaymentStore {
        MemoryPaymentStore {
            state: Arc::new(Mutex::new(State { unavailable: false, committed: snapshot })),
            #[cfg(feature = "planted-bugs")]
            fresh_key_unchecked: Arc::default(),
        }
    }

    /// PLANTED BUG `fresh_key_unchecked`, simulator only: while on, an insert that writes its key's
    /// record afresh (`IdempotencyCompletion::claimed == false`) does not look for an existing
    /// record and overwrites it — so a duplicate the fast path missed writes a second payment.
    /// Shared by every clone.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_fresh_key_unchecked(&self, on: bool) {
        self.fresh_key_unchecked.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    #[cfg(feature = "planted-bugs")]
    fn fresh_key_unchecked(&self) -> bool {
        self.fresh_key_unchecked.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[cfg(not(feature = "planted-bugs"))]
    fn fresh_key_unchecked(&self) -> bool {
        false
    }

    /// A copy of everything committed so far.
    pub fn snapshot(&self) -> PaymentSnapshot {
        self.lock().committed.clone()
    }

    /// Outage injection: while `false`, every call fails as `Unavailable { component: "postgresql" }`
    /// and writes nothing.
    pub fn set_available(&self, available: bool) {
        self.lock().unavailable = !available;
    }

    fn up(&self) -> PortResult<MutexGuard<'_, State>> {
        let state = self.lock();
        if state.unavailable { Err(PortError::Unavailable { component: COMPONENT }) } else { Ok(state) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every write checks its rules first and then changes the state without panicking, so a
        // poisoned lock still guards the last committed state.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// PostgreSQL keeps microseconds; so does the twin, so both read back the same instant.
fn at_pg_precision(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_nanosecond(at.nanosecond() / 1_000 * 1_000).expect("a truncated nanosecond is in range")
}

fn refused(rule: &'static str) -> PortError {
    PortError::Refused { rule }
}

#[async_trait]
impl PaymentStore for MemoryPaymentStore {
    async fn insert_with_event(
        &self,
        payment: &Payment,
        event: &PaymentInitiated,
        headers: &[(String, String)],
        idempotency: Option<&IdempotencyCompletion>,
    ) -> PortResult<()> {
        check_insert(payment, event, idempotency)?;
        let fresh_key_unchecked = self.fresh_key_unchecked();
        let mut state = self.up()?;
        let committed = &mut state.committed;
        // Every rule first, in the order PostgreSQL meets them (the key's record, then the
        // payment, then its event); nothing is written on a refusal.
        let claim = match idempotency {
            None => None,
            Some(completion) => {
                let pair = (completion.subject.clone(), completion.key.clone());
                match (completion.claimed, committed.keys.get(&pair)) {
                    (true, Some(KeyRow { fingerprint, state: KeyState::InFlight { .. }, .. }))
                        if *fingerprint == completion.fingerprint =>
                    {
                        Some((pair, completion))
                    }
                    (false, None) => Some((pair, completion)),
                    (false, Some(_)) if fresh_key_unchecked => Some((pair, completion)),
                    _ => return Err(refused("idempotency_claim_lost")),
                }
            }
        };
        if committed.payments.contains_key(&payment.id) {
            return Err(refused("payment_exists"));
        }
        if committed.event_ids.contains(&event.event_id) {
            return Err(refused("outbox_event_id_unique"));
        }

        let mut stored = payment.clone();
        stored.created_at = at_pg_precision(payment.created_at);
        stored.updated_at = at_pg_precision(payment.updated_at);
        committed.payments.insert(payment.id, stored);
        committed.event_ids.insert(event.event_id);
        let sequence = committed.outbox.next_sequence();
        // Headers are a JSON object in PostgreSQL: one value per name (the last), sorted by name.
        let headers: BTreeMap<String, String> = headers.iter().cloned().collect();
        committed.outbox.push(OutboxEvent {
            sequence,
            topic: topic::PAYMENT_INITIATED.to_owned(),
            key: payment.id.to_string(),
            payload: securepay_proto::convert::encode_initiated(event),
            headers: headers.into_iter().collect(),
        });
        if let Some((pair, completion)) = claim {
            let completed = KeyState::Completed { response: completion.response.clone(), payment_id: Some(payment.id) };
            match committed.keys.get_mut(&pair) {
                Some(row) if completion.claimed => row.state = completed,
                _ => {
                    let row = KeyRow {
                        fingerprint: completion.fingerprint,
                        state: completed,
                        created_at: at_pg_precision(payment.created_at),
                    };
                    committed.keys.insert(pair, row);
                }
            }
        }
        Ok(())
    }

    async fn get(&self, id: PaymentId) -> PortResult<Option<Payment>> {
        Ok(self.up()?.committed.payments.get(&id).cloned())
    }

    async fn get_many(&self, ids: &[PaymentId]) -> PortResult<Vec<Option<Payment>>> {
        if ids.len() > PAYMENT_BATCH_LEN_MAX {
            return Err(refused("payments_batch_len_max"));
        }
        let state = self.up()?;
        Ok(ids.iter().map(|id| state.committed.payments.get(id).cloned()).collect())
    }

    async fn record_transition(
        &self,
        id: PaymentId,
        transition: &Transition,
        failure_reason: Option<&str>,
    ) -> PortResult<()> {
        let item = TransitionRecord {
            payment: id,
            transition: transition.clone(),
            failure_reason: failure_reason.map(str::to_owned),
        };
        let mut answers = self.record_transitions(std::slice::from_ref(&item)).await?;
        answers.pop().expect("one answer per item")
    }

    async fn record_transitions(&self, batch: &[TransitionRecord]) -> PortResult<Vec<PortResult<()>>> {
        if batch.len() > PAYMENT_BATCH_LEN_MAX {
            return Err(refused("payments_batch_len_max"));
        }
        let mut state = self.up()?;
        let payments = &mut state.committed.payments;
        let decided = decide_transitions(batch, |id| payments.get(&id).map(|p| p.status));
        Ok(batch
            .iter()
            .zip(decided)
            .map(|(item, decision)| {
                let reason = decision?;
                let payment = payments.get_mut(&item.payment).expect("decided on a stored payment");
                let at = at_pg_precision(item.transition.at);
                payment.status = item.transition.to;
                payment.failure_reason = reason;
                payment.updated_at = at;
                payment.transitions.push(Transition { at, ..item.transition.clone() });
                Ok(())
            })
            .collect())
    }
}

#[async_trait]
impl Outbox for MemoryPaymentStore {
    async fn unpublished(&self, limit: usize) -> PortResult<Vec<OutboxEvent>> {
        let limit = limit.min(OUTBOX_BATCH_LEN_MAX);
        Ok(self.up()?.committed.outbox.unpublished(limit))
    }

    async fn mark_published(&self, sequences: &[i64]) -> PortResult<()> {
        if sequences.len() > OUTBOX_BATCH_LEN_MAX {
            return Err(refused("outbox_batch_len_max"));
        }
        self.up()?.committed.outbox.mark_published(sequences);
        Ok(())
    }
}

#[async_trait]
impl IdempotencyStore for MemoryPaymentStore {
    async fn lookup(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<Option<Record<Vec<u8>>>> {
        let state = self.up()?;
        Ok(state.committed.keys.get(&(subject.clone(), key.clone())).map(KeyRow::record))
    }

    async fn claim(
        &self,
        subject: &Subject,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: OffsetDateTime,
    ) -> PortResult<Option<Record<Vec<u8>>>> {
        let now = at_pg_precision(now);
        let locked_until = now + Duration::seconds(IDEMPOTENCY_LEASE_S);
        let mut state = self.up()?;
        let pair = (subject.clone(), key.clone());
        match state.committed.keys.get_mut(&pair) {
            None => {
                let row = KeyRow { fingerprint, state: KeyState::InFlight { locked_until }, created_at: now };
                state.committed.keys.insert(pair, row);
                Ok(None)
            }
            Some(row) => match &mut row.state {
                // The first request's lease ran out (its process died): the same request takes over.
                KeyState::InFlight { locked_until: lease } if *lease <= now && row.fingerprint == fingerprint => {
                    *lease = locked_until;
                    Ok(None)
                }
                _ => Ok(Some(row.record())),
            },
        }
    }

    async fn complete(&self, subject: &Subject, key: &IdempotencyKey, response: &[u8]) -> PortResult<()> {
        if response.len() > IDEMPOTENCY_RESPONSE_LEN_MAX {
            return Err(refused("idempotency_response_len_max"));
        }
        let mut state = self.up()?;
        let row = state
            .committed
            .keys
            .get_mut(&(subject.clone(), key.clone()))
            .ok_or(refused("idempotency_claim_missing"))?;
        match row.state {
            KeyState::InFlight { .. } => {
                row.state = KeyState::Completed { response: response.to_vec(), payment_id: None };
                Ok(())
            }
            KeyState::Completed { .. } => Err(refused("idempotency_already_completed")),
        }
    }

    async fn release(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<()> {
        let mut state = self.up()?;
        let pair = (subject.clone(), key.clone());
        if matches!(state.committed.keys.get(&pair), Some(KeyRow { state: KeyState::InFlight { .. }, .. })) {
            state.committed.keys.remove(&pair);
        }
        Ok(())
    }

    async fn purge_before(&self, cutoff: OffsetDateTime) -> PortResult<u64> {
        let cutoff = at_pg_precision(cutoff);
        let mut state = self.up()?;
        let keys = &mut state.committed.keys;
        let before = keys.len();
        keys.retain(|_, row| row.created_at >= cutoff);
        Ok((before - keys.len()) as u64)
    }
}

#[cfg(test)]
mod tests {
    use securepay_core::ids::AccountId;
    use securepay_core::money::{Amount, AmountPolicy, Currency};
    use securepay_core::payment::{PaymentRequest, PaymentStatus};
    use uuid::Uuid;

    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn subject() -> Subject {
        Subject::parse("alice").unwrap()
    }

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::parse(text).unwrap()
    }

    fn payment(n: u128) -> (Payment, PaymentInitiated) {
        let request = PaymentRequest::new(
            subject(),
            None,
            AccountId::from_uuid(Uuid::from_u128(1)),
            AccountId::from_uuid(Uuid::from_u128(2)),
            Amount::parse("10.50", Currency::from_code("EUR").unwrap(), AmountPolicy::default()).unwrap(),
            None,
        )
        .unwrap();
        let payment = Payment::accept(PaymentId::from_uuid(Uuid::from_u128(n)), &request, now());
        let event = PaymentInitiated {
            event_id: EventId::from_uuid(Uuid::from_u128(1000 + n)),
            payment_id: payment.id,
            subject: payment.subject.clone(),
            from: payment.from,
            to: payment.to,
            amount: payment.amount,
            occurred_at: now(),
        };
        (payment, event)
    }

    fn completion(k: &str, fingerprint: Fingerprint) -> IdempotencyCompletion {
        IdempotencyCompletion {
            subject: subject(),
            key: key(k),
            fingerprint,
            response: b"first".to_vec(),
            claimed: true,
        }
    }

    #[tokio::test]
    async fn an_insert_completes_its_claim_in_the_same_step() {
        let store = MemoryPaymentStore::new();
        let fp = Fingerprint::of(&["a"]);
        assert_eq!(store.claim(&subject(), &key("k"), fp, now()).await.unwrap(), None);
        let (p, e) = payment(1);
        store.insert_with_event(&p, &e, &[], Some(&completion("k", fp))).await.unwrap();
        assert_eq!(
            store.claim(&subject(), &key("k"), fp, now()).await.unwrap(),
            Some(Record::Completed { fingerprint: fp, response: b"first".to_vec() })
        );
        assert_eq!(store.snapshot().payment_of_key(&subject(), &key("k")), Some(p.id));
    }

    #[tokio::test]
    async fn a_lost_claim_writes_neither_payment_nor_event() {
        let store = MemoryPaymentStore::new();
        let fp = Fingerprint::of(&["a"]);
        let (p, e) = payment(1);
        let lost = store.insert_with_event(&p, &e, &[], Some(&completion("k", fp))).await;
        assert_eq!(lost, Err(refused("idempotency_claim_lost")));
        store.claim(&subject(), &key("k"), Fingerprint::of(&["other"]), now()).await.unwrap();
        let lost = store.insert_with_event(&p, &e, &[], Some(&completion("k", fp))).await;
        assert_eq!(lost, Err(refused("idempotency_claim_lost")));
        assert_eq!(store.get(p.id).await.unwrap(), None);
        assert!(store.unpublished(10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_only_by_the_same_request() {
        let store = MemoryPaymentStore::new();
        let (a, b) = (Fingerprint::of(&["a"]), Fingerprint::of(&["b"]));
        assert_eq!(store.claim(&subject(), &key("k"), a, now()).await.unwrap(), None);
        let within = now() + Duration::seconds(IDEMPOTENCY_LEASE_S - 1);
        let after = now() + Duration::seconds(IDEMPOTENCY_LEASE_S);
        let in_flight = Some(Record::InFlight { fingerprint: a });
        assert_eq!(store.claim(&subject(), &key("k"), a, within).await.unwrap(), in_flight);
        assert_eq!(store.claim(&subject(), &key("k"), b, after).await.unwrap(), in_flight);
        assert_eq!(store.claim(&subject(), &key("k"), a, after).await.unwrap(), None);
        // The taken-over claim holds a fresh lease.
        assert_eq!(store.claim(&subject(), &key("k"), a, after).await.unwrap(), in_flight);
    }

    #[tokio::test]
    async fn transitions_are_compare_and_set_through_the_table() {
        let store = MemoryPaymentStore::new();
        let (p, e) = payment(1);
        store.insert_with_event(&p, &e, &[], None).await.unwrap();
        let t = |to, cause: &str| Transition { from: PaymentStatus::Pending, to, cause: cause.into(), at: now() };
        store.record_transition(p.id, &t(PaymentStatus::Completed, "settled"), None).await.unwrap();
        let again = store
            .record_transition(p.id, &t(PaymentStatus::Failed, "insufficient_funds"), Some("insufficient_funds"))
            .await;
        assert_eq!(again, Err(refused("illegal_transition")));
        let stored = store.get(p.id).await.unwrap().unwrap();
        assert_eq!((stored.status, stored.transitions.len()), (PaymentStatus::Completed, 1));
    }

    #[tokio::test]
    async fn an_outage_refuses_every_call_and_clones_share_state() {
        let store = MemoryPaymentStore::new();
        let clone = store.clone();
        let (p, e) = payment(1);
        store.set_available(false);
        assert_eq!(clone.get(p.id).await, Err(PortError::Unavailable { component: "postgresql" }));
        assert_eq!(
            clone.insert_with_event(&p, &e, &[], None).await,
            Err(PortError::Unavailable { component: "postgresql" })
        );
        store.set_available(true);
        clone.insert_with_event(&p, &e, &[], None).await.unwrap();
        assert!(store.get(p.id).await.unwrap().is_some());
        let restored = MemoryPaymentStore::restore(store.snapshot());
        assert_eq!(restored.get(p.id).await.unwrap(), store.get(p.id).await.unwrap());
    }
}
