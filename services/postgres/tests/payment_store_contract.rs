//! The payment service's store contract — `PaymentStore`, its `Outbox` and the PostgreSQL truth of
//! `IdempotencyStore` — as ONE suite of guarantees, each a generic function over a [`Harness`],
//! run against the real store (`PgPaymentStore`, a fresh PostgreSQL database per test, logged in
//! as `payment_service`, so the role's grants are proven sufficient) and its in-memory twin
//! (`MemoryPaymentStore`). A store that passes here keeps SPEC §6.1 (idempotency), §6.2 (the state
//! machine, one transition at a time or a batch in one transaction) and §6.4 (transactional outbox).
//!
//! Plus, PostgreSQL only: the schema itself refuses illegal changes made around the store.

mod common;

use std::collections::BTreeSet;

use async_trait::async_trait;
use common::TestDb;
use securepay_core::events::PaymentInitiated;
use securepay_core::idempotency::{Decision, Fingerprint, IdempotencyKey, Record, decide};
use securepay_core::ids::{AccountId, EventId, PaymentId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::{Payment, PaymentRequest, PaymentStatus, Transition};
use securepay_memory::MemoryPaymentStore;
use securepay_ports::payments::{IDEMPOTENCY_LEASE_S, PAYMENT_BATCH_LEN_MAX};
use securepay_ports::{
    IdempotencyCompletion, IdempotencyStore, NewPayment, Outbox, PaymentStore, PortError, TransitionRecord,
};
use securepay_postgres::PgPaymentStore;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// The harness: what a contract test needs besides the ports themselves.

/// One store under test plus what the ports do not offer: which payment a key's record names.
#[async_trait]
trait Harness: Send + Sync + 'static {
    type Store: PaymentStore + IdempotencyStore + Clone;
    fn store(&self) -> &Self::Store;
    async fn payment_of_key(&self, subject: &Subject, key: &IdempotencyKey) -> Option<PaymentId>;
}

// ---------------------------------------------------------------------------------------------
// Builders.

/// A fixed instant with microseconds (PostgreSQL's precision), so round trips must be exact.
fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(1_800_000_000_123_456_000).unwrap()
}

fn subject() -> Subject {
    Subject::parse("alice").unwrap()
}

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::parse(text).unwrap()
}

fn fingerprint(text: &str) -> Fingerprint {
    Fingerprint::of(&[text])
}

fn refused(rule: &'static str) -> Result<(), PortError> {
    Err(PortError::Refused { rule })
}

/// A new PENDING payment of `value` `currency` between two fresh accounts, and its event.
fn payment_of(value: &str, currency: &str) -> (Payment, PaymentInitiated) {
    let amount = Amount::parse(value, Currency::from_code(currency).unwrap(), AmountPolicy::default()).unwrap();
    let request = PaymentRequest::new(
        subject(),
        None,
        AccountId::from_uuid(Uuid::new_v4()),
        AccountId::from_uuid(Uuid::new_v4()),
        amount,
        None,
    )
    .unwrap();
    let payment = Payment::accept(PaymentId::from_uuid(Uuid::new_v4()), &request, t0());
    let event = initiated(&payment);
    (payment, event)
}

fn payment() -> (Payment, PaymentInitiated) {
    payment_of("10.50", "EUR")
}

fn initiated(payment: &Payment) -> PaymentInitiated {
    PaymentInitiated {
        event_id: EventId::from_uuid(Uuid::new_v4()),
        payment_id: payment.id,
        subject: payment.subject.clone(),
        from: payment.from,
        to: payment.to,
        amount: payment.amount,
        occurred_at: payment.created_at,
    }
}

fn transition(from: PaymentStatus, to: PaymentStatus, cause: &str, at: OffsetDateTime) -> Transition {
    Transition { from, to, cause: cause.to_owned(), at }
}

fn completion(k: &str, fp: Fingerprint, response: &[u8]) -> IdempotencyCompletion {
    IdempotencyCompletion {
        subject: subject(),
        key: key(k),
        fingerprint: fp,
        response: response.to_vec(),
        claimed: true,
    }
}

/// A completion of a key claimed only in the fast path: the insert writes its record.
fn fresh(k: &str, fp: Fingerprint, response: &[u8]) -> IdempotencyCompletion {
    IdempotencyCompletion { claimed: false, ..completion(k, fp, response) }
}

async fn insert<H: Harness>(h: &H) -> Payment {
    let (p, e) = payment();
    h.store().insert_with_event(&p, &e, &[], None).await.expect("insert");
    p
}

// ---------------------------------------------------------------------------------------------
// Payments and their outbox.

async fn contract_a_payment_reads_back_exactly_as_written<H: Harness>(h: H) {
    let (p, e) = payment_of("1234.567", "KWD");
    h.store().insert_with_event(&p, &e, &[], None).await.unwrap();

    let stored = h.store().get(p.id).await.unwrap().expect("payment exists");
    assert_eq!(stored, p, "every field exact: amount to the last decimal, times to the microsecond");
    assert_eq!(stored.amount.value().to_string(), "1234.567");
    assert_eq!((stored.status, stored.transitions.len()), (PaymentStatus::Pending, 0));
    assert_eq!(h.store().get(PaymentId::from_uuid(Uuid::new_v4())).await.unwrap(), None);
}

async fn contract_an_accepted_payment_has_exactly_its_initiated_event_in_the_outbox<H: Harness>(h: H) {
    let (p, e) = payment();
    let headers = vec![
        ("traceparent".to_owned(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()),
        ("tracestate".to_owned(), "securepay=1".to_owned()),
    ];
    h.store().insert_with_event(&p, &e, &headers, None).await.unwrap();

    let outbox = h.store().unpublished(100).await.unwrap();
    assert_eq!(outbox.len(), 1, "one event per payment");
    assert_eq!((outbox[0].topic.as_str(), outbox[0].key.clone()), ("payment.initiated", p.id.to_string()));
    assert_eq!(outbox[0].headers, headers);
    let decoded = securepay_proto::convert::decode_initiated(&outbox[0].payload, AmountPolicy::default())
        .expect("payload is events.v1.PaymentInitiated");
    assert_eq!(decoded, e);
}

async fn contract_a_taken_payment_id_or_event_id_is_refused_and_writes_nothing<H: Harness>(h: H) {
    let (first, first_event) = payment();
    h.store().insert_with_event(&first, &first_event, &[], None).await.unwrap();

    // Same payment id, other terms and another event.
    let (mut again, _) = payment_of("99.00", "EUR");
    again.id = first.id;
    let again_event = initiated(&again);
    assert_eq!(h.store().insert_with_event(&again, &again_event, &[], None).await, refused("payment_exists"));

    // A new payment reusing the first one's event id.
    let (other, mut other_event) = payment();
    other_event.event_id = first_event.event_id;
    let refusal = h.store().insert_with_event(&other, &other_event, &[], None).await;
    assert_eq!(refusal, refused("outbox_event_id_unique"));
    assert_eq!(refusal.unwrap_err().to_string(), "refused by the store: outbox_event_id_unique", "no driver text");

    assert_eq!(h.store().get(first.id).await.unwrap(), Some(first.clone()), "the first payment is untouched");
    assert_eq!(h.store().get(other.id).await.unwrap(), None, "the refused payment was not written");
    let outbox = h.store().unpublished(100).await.unwrap();
    assert_eq!(outbox.len(), 1, "no event of a refused insert");
    assert_eq!(outbox[0].key, first.id.to_string());
}

async fn contract_only_a_new_pending_payment_with_its_own_event_is_accepted<H: Harness>(h: H) {
    let (p, e) = payment();
    let mut completed = p.clone();
    completed.status = PaymentStatus::Completed;
    assert_eq!(h.store().insert_with_event(&completed, &e, &[], None).await, refused("invalid_payment"));
    let (other, _) = payment();
    assert_eq!(h.store().insert_with_event(&p, &initiated(&other), &[], None).await, refused("invalid_event"));
    assert_eq!(h.store().get(p.id).await.unwrap(), None);
    assert!(h.store().unpublished(100).await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// The state machine.

async fn contract_a_transition_is_a_compare_and_set_through_the_table_and_recorded_with_time_and_cause<H: Harness>(
    h: H,
) {
    use PaymentStatus::*;
    let p = insert(&h).await;
    let at = t0() + Duration::seconds(2);
    let settled = transition(Pending, Completed, "settled", at);
    h.store().record_transition(p.id, &settled, None).await.unwrap();

    // A contradicting outcome arriving later, a repeat, and a move out of a terminal state.
    let contradicting = transition(Pending, Failed, "insufficient_funds", at + Duration::seconds(1));
    let store = h.store();
    assert_eq!(
        store.record_transition(p.id, &contradicting, Some("insufficient_funds")).await,
        refused("illegal_transition")
    );
    assert_eq!(store.record_transition(p.id, &settled, None).await, refused("illegal_transition"));
    let out_of_terminal = transition(Completed, Failed, "insufficient_funds", at);
    assert_eq!(
        store.record_transition(p.id, &out_of_terminal, Some("insufficient_funds")).await,
        refused("illegal_transition")
    );

    let stored = store.get(p.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.failure_reason, stored.updated_at), (Completed, None, at));
    assert_eq!(stored.created_at, p.created_at);
    assert_eq!(stored.transitions, [settled]);
}

async fn contract_a_failure_carries_its_reason_and_only_a_failure_does<H: Harness>(h: H) {
    use PaymentStatus::*;
    let p = insert(&h).await;
    let failed = transition(Pending, Failed, "insufficient_funds", t0() + Duration::seconds(1));
    assert_eq!(h.store().record_transition(p.id, &failed, None).await, refused("illegal_transition"));
    let completed = transition(Pending, Completed, "settled", t0());
    assert_eq!(
        h.store().record_transition(p.id, &completed, Some("insufficient_funds")).await,
        refused("illegal_transition")
    );
    assert_eq!(h.store().get(p.id).await.unwrap().unwrap(), p, "refusals wrote nothing");

    h.store().record_transition(p.id, &failed, Some("insufficient_funds")).await.unwrap();
    let stored = h.store().get(p.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.failure_reason.map(|r| r.code())), (Failed, Some("insufficient_funds")));
    assert_eq!(stored.transitions, [failed]);

    let unknown = PaymentId::from_uuid(Uuid::new_v4());
    assert_eq!(h.store().record_transition(unknown, &completed, None).await, refused("unknown_payment"));
}

async fn contract_of_concurrent_contradicting_outcomes_exactly_one_applies<H: Harness>(h: H) {
    use PaymentStatus::*;
    let p = insert(&h).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let store = h.store().clone();
        tasks.push(tokio::spawn(async move {
            let (to, cause, reason) = if i % 2 == 0 {
                (Completed, "settled", None)
            } else {
                (Failed, "unknown_account", Some("unknown_account"))
            };
            let t = transition(Pending, to, cause, t0() + Duration::seconds(i));
            (store.record_transition(p.id, &t, reason).await, t)
        }));
    }
    let mut applied = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (Ok(()), t) => applied.push(t),
            (result, _) => assert_eq!(result, refused("illegal_transition")),
        }
    }
    assert_eq!(applied.len(), 1, "exactly one transition out of PENDING");
    let stored = h.store().get(p.id).await.unwrap().unwrap();
    assert_eq!(stored.status, applied[0].to);
    assert_eq!(stored.transitions, applied);
}

// ---------------------------------------------------------------------------------------------
// Batches of transitions: `record_transition` of each item in order, in one transaction.

fn item(p: &Payment, t: Transition, reason: Option<&str>) -> TransitionRecord {
    TransitionRecord { payment: p.id, transition: t, failure_reason: reason.map(str::to_owned) }
}

async fn contract_a_batch_of_transitions_answers_per_item_as_the_items_one_by_one<H: Harness>(h: H) {
    use PaymentStatus::*;
    let (a, b, done) = (insert(&h).await, insert(&h).await, insert(&h).await);
    let at = t0() + Duration::seconds(5);
    let settled = transition(Pending, Completed, "settled", at);
    h.store().record_transition(done.id, &settled, None).await.unwrap();
    let (unknown, _) = payment();
    let failed = transition(Pending, Failed, "insufficient_funds", at);
    let batch = [
        item(&a, settled.clone(), None),
        item(&a, settled.clone(), None), // the same outcome again: lost CAS
        item(&b, failed.clone(), Some("insufficient_funds")),
        item(&a, failed.clone(), Some("insufficient_funds")), // contradicting the first of `a`
        item(&done, settled.clone(), None),                   // terminal before the batch
        item(&unknown, settled.clone(), None),                // no such payment
        item(&b, transition(Pending, Completed, "", at), None), // a rule of check_transition
        item(&b, failed.clone(), Some("no_such_reason")),
    ];

    let answers = h.store().record_transitions(&batch).await.expect("the batch commits");

    assert_eq!(
        answers,
        [
            Ok(()),
            refused("illegal_transition"),
            Ok(()),
            refused("illegal_transition"),
            refused("illegal_transition"),
            refused("unknown_payment"),
            refused("transitions_cause_bounded"),
            refused("unknown_failure_reason"),
        ],
        "the good items applied, each bad one refused alone"
    );
    let read = |p: PaymentId| h.store().get(p);
    let (a_now, b_now) = (read(a.id).await.unwrap().unwrap(), read(b.id).await.unwrap().unwrap());
    assert_eq!((a_now.status, a_now.failure_reason, a_now.updated_at), (Completed, None, at));
    assert_eq!(a_now.transitions, std::slice::from_ref(&settled));
    assert_eq!((b_now.status, b_now.failure_reason.map(|r| r.code())), (Failed, Some("insufficient_funds")));
    assert_eq!(b_now.transitions, [failed]);
    assert_eq!(read(done.id).await.unwrap().unwrap().transitions, [settled], "the terminal one untouched");
    assert_eq!(read(unknown.id).await, Ok(None));
    assert_eq!(h.store().record_transitions(&[]).await, Ok(vec![]), "an empty batch is nothing");
}

async fn contract_a_redelivered_batch_of_transitions_applies_nothing_again<H: Harness>(h: H) {
    use PaymentStatus::*;
    let (a, b) = (insert(&h).await, insert(&h).await);
    let at = t0() + Duration::seconds(1);
    let batch = [
        item(&a, transition(Pending, Completed, "settled", at), None),
        item(&b, transition(Pending, Failed, "unknown_account", at), Some("unknown_account")),
    ];
    assert_eq!(h.store().record_transitions(&batch).await, Ok(vec![Ok(()), Ok(())]));
    let before = (h.store().get(a.id).await.unwrap(), h.store().get(b.id).await.unwrap());

    let again = h.store().record_transitions(&batch).await;

    assert_eq!(again, Ok(vec![refused("illegal_transition"), refused("illegal_transition")]));
    assert_eq!((h.store().get(a.id).await.unwrap(), h.store().get(b.id).await.unwrap()), before);
}

async fn contract_get_many_reads_every_payment_with_its_history<H: Harness>(h: H) {
    use PaymentStatus::*;
    let (a, b) = (insert(&h).await, insert(&h).await);
    let settled = transition(Pending, Completed, "settled", t0() + Duration::seconds(1));
    h.store().record_transition(a.id, &settled, None).await.unwrap();
    let (unknown, _) = payment();

    let read = h.store().get_many(&[a.id, unknown.id, b.id, a.id]).await.unwrap();

    let a_now = h.store().get(a.id).await.unwrap();
    assert_eq!(read, [a_now.clone(), None, Some(b), a_now.clone()], "in the order asked, an id asked twice twice");
    assert_eq!(a_now.map(|p| p.transitions), Some(vec![settled]));
    assert_eq!(h.store().get_many(&[]).await, Ok(vec![]));
    let too_many = vec![a.id; PAYMENT_BATCH_LEN_MAX + 1];
    assert_eq!(h.store().get_many(&too_many).await, Err(PortError::Refused { rule: "payments_batch_len_max" }));
}

async fn contract_a_batch_of_transitions_longer_than_the_maximum_is_refused_and_writes_nothing<H: Harness>(h: H) {
    let p = insert(&h).await;
    let settled = transition(PaymentStatus::Pending, PaymentStatus::Completed, "settled", t0());
    let batch = vec![item(&p, settled, None); PAYMENT_BATCH_LEN_MAX + 1];
    assert_eq!(h.store().record_transitions(&batch).await, Err(PortError::Refused { rule: "payments_batch_len_max" }));
    assert_eq!(h.store().get(p.id).await.unwrap(), Some(p));
}

const RACING_BATCHES: usize = 6;
const PAYMENTS_PER_BATCH: usize = 10;

/// Batches over the same payments, each in another order and half of them with the contradicting
/// outcome, race: every payment moves exactly once, to the outcome of the one item that applied
/// (and PostgreSQL does not deadlock).
async fn contract_concurrent_batches_over_the_same_payments_move_each_payment_once<H: Harness>(h: H) {
    use PaymentStatus::*;
    let mut payments = Vec::new();
    for _ in 0..PAYMENTS_PER_BATCH {
        payments.push(insert(&h).await);
    }
    let mut tasks = Vec::new();
    for k in 0..RACING_BATCHES {
        let at = t0() + Duration::seconds(k as i64);
        let (to, cause, reason) = if k % 2 == 0 {
            (Completed, "settled", None)
        } else {
            (Failed, "unknown_account", Some("unknown_account"))
        };
        let mut batch: Vec<TransitionRecord> =
            payments.iter().map(|p| item(p, transition(Pending, to, cause, at), reason)).collect();
        batch.rotate_left(k * 3 % PAYMENTS_PER_BATCH);
        if k % 3 == 1 {
            batch.reverse();
        }
        let store = h.store().clone();
        tasks.push(tokio::spawn(async move {
            let answers = store.record_transitions(&batch).await.expect("record_transitions under concurrency");
            batch.into_iter().zip(answers).collect::<Vec<_>>()
        }));
    }
    let mut applied: std::collections::BTreeMap<PaymentId, Vec<Transition>> = std::collections::BTreeMap::new();
    for task in tasks {
        for (item, answer) in task.await.unwrap() {
            match answer {
                Ok(()) => applied.entry(item.payment).or_default().push(item.transition),
                refusal => assert_eq!(refusal, refused("illegal_transition")),
            }
        }
    }
    assert_eq!(applied.len(), PAYMENTS_PER_BATCH, "every payment moved");
    for p in &payments {
        let winners = &applied[&p.id];
        assert_eq!(winners.len(), 1, "exactly one transition out of PENDING");
        let stored = h.store().get(p.id).await.unwrap().unwrap();
        assert_eq!(stored.status, winners[0].to);
        assert_eq!(&stored.transitions, winners);
    }
}

// ---------------------------------------------------------------------------------------------
// Idempotency.

const CLAIMERS: usize = 50;

async fn contract_of_fifty_concurrent_claims_exactly_one_wins<H: Harness>(h: H) {
    let mut tasks = Vec::new();
    for _ in 0..CLAIMERS {
        let store = h.store().clone();
        tasks.push(tokio::spawn(async move { store.claim(&subject(), &key("k-race"), fingerprint("a"), t0()).await }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.unwrap().expect("claim") {
            None => winners += 1,
            Some(record) => assert_eq!(record, Record::InFlight { fingerprint: fingerprint("a") }),
        }
    }
    assert_eq!(winners, 1);
}

/// After the lease ends, of many retries of the same request racing to take the claim over,
/// exactly one wins.
async fn contract_of_concurrent_takeovers_of_an_expired_lease_exactly_one_wins<H: Harness>(h: H) {
    let fp = fingerprint("a");
    assert_eq!(h.store().claim(&subject(), &key("k"), fp, t0()).await.unwrap(), None);
    let expired = t0() + Duration::seconds(IDEMPOTENCY_LEASE_S);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let store = h.store().clone();
        tasks.push(tokio::spawn(async move { store.claim(&subject(), &key("k"), fp, expired).await }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.unwrap().expect("claim") {
            None => winners += 1,
            Some(record) => assert_eq!(record, Record::InFlight { fingerprint: fp }),
        }
    }
    assert_eq!(winners, 1);
}

async fn contract_a_completed_record_is_replayed_unchanged_and_a_different_request_is_key_reused<H: Harness>(h: H) {
    let s = h.store();
    let (a, b) = (fingerprint("a"), fingerprint("b"));
    assert_eq!(s.claim(&subject(), &key("k"), a, t0()).await.unwrap(), None);
    let in_flight = s.claim(&subject(), &key("k"), a, t0()).await.unwrap();
    assert_eq!(decide(in_flight.as_ref(), a), Decision::InProgress);
    let in_flight = s.claim(&subject(), &key("k"), b, t0()).await.unwrap();
    assert_eq!(decide(in_flight.as_ref(), b), Decision::KeyReused);

    s.complete(&subject(), &key("k"), b"{\"status\":\"rejected\"}").await.unwrap();
    let later = t0() + Duration::hours(1);
    for _ in 0..2 {
        let record = s.claim(&subject(), &key("k"), a, later).await.unwrap();
        assert_eq!(record, Some(Record::Completed { fingerprint: a, response: b"{\"status\":\"rejected\"}".to_vec() }));
        assert_eq!(decide(record.as_ref(), a), Decision::Replay(b"{\"status\":\"rejected\"}".to_vec()));
        assert_eq!(decide(s.claim(&subject(), &key("k"), b, later).await.unwrap().as_ref(), b), Decision::KeyReused);
    }
    assert_eq!(s.complete(&subject(), &key("k"), b"other").await, refused("idempotency_already_completed"));
    assert_eq!(s.complete(&subject(), &key("never-claimed"), b"x").await, refused("idempotency_claim_missing"));
    // Keys are scoped per subject: bob's "k" is a different key.
    assert_eq!(s.claim(&Subject::parse("bob").unwrap(), &key("k"), b, t0()).await.unwrap(), None);
}

async fn contract_an_expired_lease_is_taken_over_by_the_same_request_only<H: Harness>(h: H) {
    let s = h.store();
    let (a, b) = (fingerprint("a"), fingerprint("b"));
    assert_eq!(s.claim(&subject(), &key("k"), a, t0()).await.unwrap(), None);
    let in_flight = Some(Record::InFlight { fingerprint: a });
    let within = t0() + Duration::seconds(IDEMPOTENCY_LEASE_S) - Duration::microseconds(1);
    let expired = t0() + Duration::seconds(IDEMPOTENCY_LEASE_S);
    assert_eq!(s.claim(&subject(), &key("k"), a, within).await.unwrap(), in_flight, "lease still held");
    assert_eq!(
        s.claim(&subject(), &key("k"), b, expired).await.unwrap(),
        in_flight,
        "another request never takes over"
    );
    assert_eq!(s.claim(&subject(), &key("k"), a, expired).await.unwrap(), None, "the same request takes over");
    assert_eq!(s.claim(&subject(), &key("k"), a, expired).await.unwrap(), in_flight, "with a fresh lease");
    let renewed_expiry = expired + Duration::seconds(IDEMPOTENCY_LEASE_S);
    assert_eq!(s.claim(&subject(), &key("k"), a, renewed_expiry).await.unwrap(), None);
}

async fn contract_an_insert_completes_its_claim_with_the_response_and_the_payment<H: Harness>(h: H) {
    let fp = fingerprint("a");
    assert_eq!(h.store().claim(&subject(), &key("k"), fp, t0()).await.unwrap(), None);
    let (p, e) = payment();
    h.store().insert_with_event(&p, &e, &[], Some(&completion("k", fp, b"accepted"))).await.unwrap();

    assert_eq!(
        h.store().claim(&subject(), &key("k"), fp, t0()).await.unwrap(),
        Some(Record::Completed { fingerprint: fp, response: b"accepted".to_vec() })
    );
    assert_eq!(h.payment_of_key(&subject(), &key("k")).await, Some(p.id));
    assert_eq!(h.store().get(p.id).await.unwrap(), Some(p));
    h.store().release(&subject(), &key("k")).await.unwrap();
    assert!(
        matches!(h.store().claim(&subject(), &key("k"), fp, t0()).await.unwrap(), Some(Record::Completed { .. })),
        "a completed record is never released"
    );
}

async fn contract_an_insert_whose_claim_was_lost_writes_no_payment_and_no_event<H: Harness>(h: H) {
    let s = h.store();
    let fp = fingerprint("a");
    // Never claimed (or purged).
    let (p, e) = payment();
    assert_eq!(
        s.insert_with_event(&p, &e, &[], Some(&completion("unclaimed", fp, b"r"))).await,
        refused("idempotency_claim_lost")
    );
    // Claimed by a different request.
    assert_eq!(s.claim(&subject(), &key("other-request"), fingerprint("b"), t0()).await.unwrap(), None);
    assert_eq!(
        s.insert_with_event(&p, &e, &[], Some(&completion("other-request", fp, b"r"))).await,
        refused("idempotency_claim_lost")
    );
    // Completed by a racing request with the same fingerprint.
    assert_eq!(s.claim(&subject(), &key("raced"), fp, t0()).await.unwrap(), None);
    let (winner, winner_event) = payment();
    s.insert_with_event(&winner, &winner_event, &[], Some(&completion("raced", fp, b"first"))).await.unwrap();
    assert_eq!(
        s.insert_with_event(&p, &e, &[], Some(&completion("raced", fp, b"second"))).await,
        refused("idempotency_claim_lost")
    );

    assert_eq!(s.get(p.id).await.unwrap(), None, "no payment without its key");
    let outbox = s.unpublished(100).await.unwrap();
    assert_eq!(outbox.iter().map(|o| o.key.clone()).collect::<Vec<_>>(), [winner.id.to_string()], "no orphan event");
    assert_eq!(
        s.claim(&subject(), &key("raced"), fp, t0()).await.unwrap(),
        Some(Record::Completed { fingerprint: fp, response: b"first".to_vec() }),
        "the winner's response stays"
    );
    assert_eq!(h.payment_of_key(&subject(), &key("raced")).await, Some(winner.id));
    assert_eq!(h.payment_of_key(&subject(), &key("other-request")).await, None);
}

async fn contract_an_insert_with_a_fresh_key_writes_its_completed_record_only_if_the_key_has_none<H: Harness>(h: H) {
    let s = h.store();
    let fp = fingerprint("a");
    let (p, e) = payment();
    s.insert_with_event(&p, &e, &[], Some(&fresh("k", fp, b"accepted"))).await.unwrap();
    assert_eq!(
        s.claim(&subject(), &key("k"), fp, t0()).await.unwrap(),
        Some(Record::Completed { fingerprint: fp, response: b"accepted".to_vec() })
    );
    assert_eq!(h.payment_of_key(&subject(), &key("k")).await, Some(p.id));
    s.release(&subject(), &key("k")).await.unwrap();
    assert!(matches!(s.claim(&subject(), &key("k"), fp, t0()).await.unwrap(), Some(Record::Completed { .. })));

    // The key has a record: completed (a retry that lost the race), or in flight (a request that
    // went through the store's claim) — nothing is written, whatever the payment id.
    let (q, f) = payment();
    assert_eq!(
        s.insert_with_event(&q, &f, &[], Some(&fresh("k", fp, b"second"))).await,
        refused("idempotency_claim_lost")
    );
    assert_eq!(s.claim(&subject(), &key("held"), fp, t0()).await.unwrap(), None);
    assert_eq!(
        s.insert_with_event(&q, &f, &[], Some(&fresh("held", fp, b"r"))).await,
        refused("idempotency_claim_lost")
    );
    assert_eq!(
        s.insert_with_event(&p, &initiated(&p), &[], Some(&fresh("k", fp, b"again"))).await,
        refused("idempotency_claim_lost"),
        "the key's race is told before the taken payment id"
    );
    assert_eq!(s.get(q.id).await.unwrap(), None);
    assert_eq!(s.claim(&subject(), &key("held"), fp, t0()).await.unwrap(), Some(Record::InFlight { fingerprint: fp }));

    // A free key with a taken payment id: refused, and the key stays free.
    assert_eq!(
        s.insert_with_event(&p, &initiated(&p), &[], Some(&fresh("free", fp, b"r"))).await,
        refused("payment_exists")
    );
    assert_eq!(s.claim(&subject(), &key("free"), fp, t0()).await.unwrap(), None, "nothing was recorded");
    assert_eq!(s.unpublished(100).await.unwrap().len(), 1, "one event: the first payment's");
}

async fn contract_of_concurrent_fresh_inserts_of_one_key_exactly_one_writes<H: Harness>(h: H) {
    concurrent_inserts_of_one_key_exactly_one_writes(&h, fresh).await;
}

async fn contract_lookup_reads_the_record_and_never_claims_nor_takes_over<H: Harness>(h: H) {
    let s = h.store();
    let fp = fingerprint("a");
    assert_eq!(s.lookup(&subject(), &key("k")).await.unwrap(), None);
    assert_eq!(s.claim(&subject(), &key("k"), fp, t0()).await.unwrap(), None, "the lookup claimed nothing");
    assert_eq!(s.lookup(&subject(), &key("k")).await.unwrap(), Some(Record::InFlight { fingerprint: fp }));
    let ended = t0() + Duration::seconds(IDEMPOTENCY_LEASE_S);
    assert_eq!(s.lookup(&subject(), &key("k")).await.unwrap(), Some(Record::InFlight { fingerprint: fp }));
    assert_eq!(s.claim(&subject(), &key("k"), fp, ended).await.unwrap(), None, "the lease was still there to take");
    let (p, e) = payment();
    s.insert_with_event(&p, &e, &[], Some(&completion("k", fp, b"done"))).await.unwrap();
    assert_eq!(
        s.lookup(&subject(), &key("k")).await.unwrap(),
        Some(Record::Completed { fingerprint: fp, response: b"done".to_vec() })
    );
}

async fn contract_a_released_claim_lets_a_new_claim_in<H: Harness>(h: H) {
    let s = h.store();
    assert_eq!(s.claim(&subject(), &key("k"), fingerprint("a"), t0()).await.unwrap(), None);
    s.release(&subject(), &key("k")).await.unwrap();
    s.release(&subject(), &key("k")).await.expect("releasing twice is harmless");
    assert_eq!(s.claim(&subject(), &key("k"), fingerprint("b"), t0()).await.unwrap(), None, "free again");
    assert_eq!(
        s.claim(&subject(), &key("k"), fingerprint("a"), t0()).await.unwrap(),
        Some(Record::InFlight { fingerprint: fingerprint("b") })
    );
}

async fn contract_purge_deletes_only_records_created_before_the_cutoff<H: Harness>(h: H) {
    let s = h.store();
    let day = Duration::hours(24);
    let (a, b) = (fingerprint("a"), fingerprint("b"));
    // An old completed key naming a payment, an old in-flight key, and a young key.
    assert_eq!(s.claim(&subject(), &key("old-done"), a, t0()).await.unwrap(), None);
    let (p, e) = payment();
    s.insert_with_event(&p, &e, &[], Some(&completion("old-done", a, b"r"))).await.unwrap();
    assert_eq!(s.claim(&subject(), &key("old-open"), a, t0() + Duration::minutes(1)).await.unwrap(), None);
    let young = t0() + Duration::hours(20);
    assert_eq!(s.claim(&subject(), &key("young"), a, young).await.unwrap(), None);

    // 24 h after the first claim, purging what is older than 24 h removes nothing yet.
    assert_eq!(s.purge_before(t0()).await.unwrap(), 0);
    assert!(s.claim(&subject(), &key("old-done"), b, t0() + day).await.unwrap().is_some(), "kept 24 h");
    // A day and two minutes later, the two old keys are gone, the young one stays.
    assert_eq!(s.purge_before(t0() + Duration::minutes(2)).await.unwrap(), 2);
    assert_eq!(s.purge_before(t0() + Duration::minutes(2)).await.unwrap(), 0, "purging is idempotent");
    let later = t0() + day + Duration::minutes(2);
    assert_eq!(s.claim(&subject(), &key("old-done"), b, later).await.unwrap(), None, "purged");
    assert_eq!(s.claim(&subject(), &key("old-open"), b, later).await.unwrap(), None, "purged");
    assert_eq!(s.claim(&subject(), &key("young"), b, later).await.unwrap(), Some(Record::InFlight { fingerprint: a }));
    assert_eq!(s.get(p.id).await.unwrap(), Some(p), "the payment outlives its key");
}

/// A completion for a key another payment's insert is racing on: many inserts, each with its own
/// payment, try to complete ONE claim at once; exactly one payment (and one event) exists after.
async fn contract_of_concurrent_inserts_completing_one_claim_exactly_one_writes<H: Harness>(h: H) {
    assert_eq!(h.store().claim(&subject(), &key("k"), fingerprint("a"), t0()).await.unwrap(), None);
    concurrent_inserts_of_one_key_exactly_one_writes(&h, completion).await;
}

/// Ten inserts, each with its own payment and the completion `of` key "k" (fingerprint "a"), race;
/// exactly one payment (and one event) exists after, the key names it and replays its response,
/// and every loser was refused `idempotency_claim_lost` and wrote nothing.
async fn concurrent_inserts_of_one_key_exactly_one_writes<H: Harness>(
    h: &H,
    of: fn(&str, Fingerprint, &[u8]) -> IdempotencyCompletion,
) {
    let fp = fingerprint("a");
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        let store = h.store().clone();
        tasks.push(tokio::spawn(async move {
            let (p, e) = payment();
            let result = store.insert_with_event(&p, &e, &[], Some(&of("k", fp, &[i]))).await;
            (result, p.id, i)
        }));
    }
    let mut written = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (Ok(()), id, i) => written.push((id, i)),
            (result, id, _) => {
                assert_eq!(result, refused("idempotency_claim_lost"));
                assert_eq!(h.store().get(id).await.unwrap(), None);
            }
        }
    }
    assert_eq!(written.len(), 1, "one payment per key");
    let (id, i) = written[0];
    assert_eq!(h.payment_of_key(&subject(), &key("k")).await, Some(id));
    assert_eq!(
        h.store().claim(&subject(), &key("k"), fp, t0()).await.unwrap(),
        Some(Record::Completed { fingerprint: fp, response: vec![i] })
    );
    assert_eq!(h.store().unpublished(100).await.unwrap().len(), 1);
}

async fn contract_a_group_commit_answers_per_item_as_the_items_one_by_one<H: Harness>(h: H) {
    let s = h.store();
    let item = |(payment, event): (Payment, PaymentInitiated), idempotency: Option<IdempotencyCompletion>| NewPayment {
        payment,
        event,
        headers: vec![("traceparent".to_owned(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned())],
        idempotency,
    };
    // All good: written together, keys completed, events in batch order.
    let mut good = Vec::new();
    for i in 0..5 {
        let fp = fingerprint(&format!("good-{i}"));
        assert_eq!(s.claim(&subject(), &key(&format!("good-{i}")), fp, t0()).await.unwrap(), None);
        good.push(item(payment(), Some(completion(&format!("good-{i}"), fp, format!("r{i}").as_bytes()))));
    }
    good.push(item(payment(), None));
    assert_eq!(s.insert_many(&good).await.unwrap(), vec![Ok(()); 6]);
    for (i, g) in good.iter().enumerate() {
        assert_eq!(s.get(g.payment.id).await.unwrap().as_ref(), Some(&g.payment));
        if i < 5 {
            assert_eq!(h.payment_of_key(&subject(), &key(&format!("good-{i}"))).await, Some(g.payment.id));
        }
    }
    let events = s.unpublished(100).await.unwrap();
    let keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();
    assert_eq!(keys, good.iter().map(|g| g.payment.id.to_string()).collect::<Vec<_>>(), "in batch order");
    assert_eq!(events[0].headers, good[0].headers);

    // Bad neighbours: a taken payment id, a lost claim, an invalid event; the good ones are written.
    let taken = item((good[0].payment.clone(), initiated(&good[0].payment)), None);
    let (p, e) = payment();
    let lost = item((p, e), Some(completion("never-claimed", fingerprint("x"), b"r")));
    let (p, _) = payment();
    let (_, other_event) = payment();
    let invalid = item((p, other_event), None);
    let fp = fingerprint("mixed");
    assert_eq!(s.claim(&subject(), &key("mixed"), fp, t0()).await.unwrap(), None);
    let fine = item(payment(), Some(completion("mixed", fp, b"fine")));
    let plain = item(payment(), None);
    let new_key = item(payment(), Some(fresh("fresh", fingerprint("f"), b"f")));
    let same_key = item(payment(), Some(fresh("fresh", fingerprint("f"), b"g")));
    let batch =
        vec![taken, fine.clone(), lost.clone(), invalid.clone(), plain.clone(), new_key.clone(), same_key.clone()];
    assert_eq!(
        s.insert_many(&batch).await.unwrap(),
        vec![
            refused("payment_exists"),
            Ok(()),
            refused("idempotency_claim_lost"),
            refused("invalid_event"),
            Ok(()),
            Ok(()),
            refused("idempotency_claim_lost")
        ]
    );
    assert_eq!(h.payment_of_key(&subject(), &key("fresh")).await, Some(new_key.payment.id));
    assert_eq!(s.get(same_key.payment.id).await.unwrap(), None);
    assert_eq!(s.get(fine.payment.id).await.unwrap(), Some(fine.payment.clone()));
    assert_eq!(s.get(plain.payment.id).await.unwrap(), Some(plain.payment.clone()));
    assert_eq!(s.get(lost.payment.id).await.unwrap(), None);
    assert_eq!(s.get(invalid.payment.id).await.unwrap(), None);
    assert_eq!(h.payment_of_key(&subject(), &key("mixed")).await, Some(fine.payment.id));
    assert_eq!(s.unpublished(100).await.unwrap().len(), 9, "one event per written payment");

    // A batch of fresh keys only, all new: one transaction.
    let fresh_only: Vec<NewPayment> =
        (0..4).map(|i| item(payment(), Some(fresh(&format!("fresh-{i}"), fingerprint("f"), b"f")))).collect();
    assert_eq!(s.insert_many(&fresh_only).await.unwrap(), vec![Ok(()); 4]);
    for (i, g) in fresh_only.iter().enumerate() {
        assert_eq!(h.payment_of_key(&subject(), &key(&format!("fresh-{i}"))).await, Some(g.payment.id));
    }

    assert_eq!(s.insert_many(&[]).await.unwrap(), Vec::new());
    let too_long: Vec<NewPayment> = (0..=PAYMENT_BATCH_LEN_MAX).map(|_| plain.clone()).collect();
    assert_eq!(s.insert_many(&too_long).await, Err(PortError::Refused { rule: "payments_batch_len_max" }));
}

// ---------------------------------------------------------------------------------------------
// The relay's view.

async fn contract_two_relays_see_every_event_at_least_once_and_marking_is_idempotent<H: Harness>(h: H) {
    let s = h.store();
    let mut payments = Vec::new();
    for _ in 0..3 {
        payments.push(insert(&h).await.id.to_string());
    }
    let relay_a = s.unpublished(100).await.unwrap();
    let relay_b = s.unpublished(100).await.unwrap();
    assert_eq!(relay_a, relay_b, "an unmarked event is handed to every relay");
    assert_eq!(relay_a.iter().map(|o| o.key.clone()).collect::<Vec<_>>(), payments, "in write order");
    let sequences: Vec<i64> = relay_a.iter().map(|o| o.sequence).collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "sequences increase: {sequences:?}");
    assert_eq!(s.unpublished(2).await.unwrap(), relay_a[..2], "the limit takes the oldest");

    // Relay A publishes the first two and dies before marking the third; relay B marks all three.
    s.mark_published(&sequences[..2]).await.unwrap();
    assert_eq!(s.unpublished(100).await.unwrap(), relay_a[2..], "the unmarked event is handed out again");
    s.mark_published(&sequences).await.unwrap();
    s.mark_published(&sequences).await.expect("marking twice is harmless");
    s.mark_published(&[]).await.unwrap();
    assert!(s.unpublished(100).await.unwrap().is_empty());

    let fourth = insert(&h).await;
    let left = s.unpublished(100).await.unwrap();
    assert_eq!(left.iter().map(|o| o.key.clone()).collect::<Vec<_>>(), [fourth.id.to_string()]);
    assert!(left[0].sequence > sequences[2]);
    let distinct: BTreeSet<i64> = sequences.iter().copied().chain([left[0].sequence]).collect();
    assert_eq!(distinct.len(), 4);
}

securepay_testkit::contract_suite! {
    cases: [
        contract_a_payment_reads_back_exactly_as_written,
        contract_an_accepted_payment_has_exactly_its_initiated_event_in_the_outbox,
        contract_a_taken_payment_id_or_event_id_is_refused_and_writes_nothing,
        contract_only_a_new_pending_payment_with_its_own_event_is_accepted,
        contract_a_transition_is_a_compare_and_set_through_the_table_and_recorded_with_time_and_cause,
        contract_a_failure_carries_its_reason_and_only_a_failure_does,
        contract_of_concurrent_contradicting_outcomes_exactly_one_applies,
        contract_a_batch_of_transitions_answers_per_item_as_the_items_one_by_one,
        contract_a_redelivered_batch_of_transitions_applies_nothing_again,
        contract_get_many_reads_every_payment_with_its_history,
        contract_a_batch_of_transitions_longer_than_the_maximum_is_refused_and_writes_nothing,
        contract_concurrent_batches_over_the_same_payments_move_each_payment_once,
        contract_of_fifty_concurrent_claims_exactly_one_wins,
        contract_a_completed_record_is_replayed_unchanged_and_a_different_request_is_key_reused,
        contract_an_expired_lease_is_taken_over_by_the_same_request_only,
        contract_an_insert_completes_its_claim_with_the_response_and_the_payment,
        contract_an_insert_whose_claim_was_lost_writes_no_payment_and_no_event,
        contract_of_concurrent_inserts_completing_one_claim_exactly_one_writes,
        contract_an_insert_with_a_fresh_key_writes_its_completed_record_only_if_the_key_has_none,
        contract_of_concurrent_fresh_inserts_of_one_key_exactly_one_writes,
        contract_a_group_commit_answers_per_item_as_the_items_one_by_one,
        contract_of_concurrent_takeovers_of_an_expired_lease_exactly_one_wins,
        contract_a_released_claim_lets_a_new_claim_in,
        contract_lookup_reads_the_record_and_never_claims_nor_takes_over,
        contract_purge_deletes_only_records_created_before_the_cutoff,
        contract_two_relays_see_every_event_at_least_once_and_marking_is_idempotent,
    ],
    implementations: { memory => memory_harness, postgres => pg_harness },
}

// ---------------------------------------------------------------------------------------------
// In memory: the simulator's store, a fresh one per test.

struct MemoryHarness {
    store: MemoryPaymentStore,
}

async fn memory_harness() -> Option<MemoryHarness> {
    Some(MemoryHarness { store: MemoryPaymentStore::new() })
}

#[async_trait]
impl Harness for MemoryHarness {
    type Store = MemoryPaymentStore;

    fn store(&self) -> &MemoryPaymentStore {
        &self.store
    }

    async fn payment_of_key(&self, subject: &Subject, key: &IdempotencyKey) -> Option<PaymentId> {
        self.store.snapshot().payment_of_key(subject, key)
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: a fresh, migrated database per test; the store logs in as `payment_service`.

/// Enough connections that the concurrent cases really race in the database.
const PG_CONNECTIONS_MAX: u32 = 8;

struct PgHarness {
    db: TestDb,
    store: PgPaymentStore,
}

async fn pg_harness() -> Option<PgHarness> {
    let db = TestDb::new().await?;
    let options = db.role_options("payment_service").await;
    let store = PgPaymentStore::connect(options, PG_CONNECTIONS_MAX).await.expect("payment_service logs in");
    store.ping().await.expect("ping");
    Some(PgHarness { db, store })
}

#[async_trait]
impl Harness for PgHarness {
    type Store = PgPaymentStore;

    fn store(&self) -> &PgPaymentStore {
        &self.store
    }

    async fn payment_of_key(&self, subject: &Subject, key: &IdempotencyKey) -> Option<PaymentId> {
        let id: Option<Option<Uuid>> =
            sqlx::query_scalar("SELECT payment_id FROM payments.idempotency_keys WHERE subject = $1 AND key = $2")
                .bind(subject.as_str())
                .bind(key.as_str())
                .fetch_optional(&self.db.pool)
                .await
                .unwrap();
        id.flatten().map(PaymentId::from_uuid)
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: the schema is the last guard, even against SQL written around the store.

/// The SQLSTATE and constraint of a refused statement.
fn violation(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> (String, Option<String>) {
    let e = result.expect_err("the schema must refuse this");
    let db = e.as_database_error().expect("a database error");
    (db.code().unwrap_or_default().into_owned(), db.constraint().map(str::to_owned))
}

fn check(constraint: &str) -> (String, Option<String>) {
    ("23514".to_owned(), Some(constraint.to_owned()))
}

#[tokio::test]
async fn the_schema_refuses_illegal_changes_made_around_the_store_by_the_service_role() {
    use sqlx::{Connection, Executor};
    let Some(h) = pg_harness().await else { return };
    let p = insert(&h).await;
    let id = p.id.as_uuid();
    let mut conn = h.db.connect_as("payment_service").await;

    // A status change without its recorded transition.
    let bare = sqlx::query("UPDATE payments.transactions SET status = 'COMPLETED' WHERE payment_id = $1").bind(id);
    assert_eq!(violation(bare.execute(&mut conn).await), check("transactions_transition_recorded"));
    // A recorded transition never applied to the payment: refused at commit.
    let mut tx = conn.begin().await.unwrap();
    tx.execute(
        sqlx::query(
            "INSERT INTO payments.transitions (payment_id, from_status, to_status, cause) \
             VALUES ($1, 'PENDING', 'COMPLETED', 'settled')",
        )
        .bind(id),
    )
    .await
    .unwrap();
    let commit = tx.commit().await.expect_err("an unapplied transition must not commit");
    assert_eq!(commit.as_database_error().and_then(|d| d.constraint()), Some("transitions_applied"));
    // The agreed terms never change.
    let amount = sqlx::query("UPDATE payments.transactions SET amount = amount + 1 WHERE payment_id = $1").bind(id);
    assert_eq!(violation(amount.execute(&mut conn).await), check("transactions_immutable"));
    // A payment born in a terminal state.
    let born_done = sqlx::query(
        "INSERT INTO payments.transactions (payment_id, subject, from_account, to_account, amount, currency, status) \
         VALUES ($1, 'alice', $2, $3, 1, 'EUR', 'COMPLETED')",
    )
    .bind(Uuid::new_v4())
    .bind(Uuid::new_v4())
    .bind(Uuid::new_v4());
    assert_eq!(violation(born_done.execute(&mut conn).await), check("transactions_created_pending"));

    // Through the store it completes; then no way out of COMPLETED, even with a recorded row.
    let settled = transition(PaymentStatus::Pending, PaymentStatus::Completed, "settled", t0());
    h.store().record_transition(p.id, &settled, None).await.unwrap();
    let back = sqlx::query(
        "INSERT INTO payments.transitions (payment_id, from_status, to_status, cause) \
         VALUES ($1, 'COMPLETED', 'FAILED', 'x')",
    )
    .bind(id);
    assert_eq!(violation(back.execute(&mut conn).await), check("transitions_legal"));
    let flip = sqlx::query(
        "UPDATE payments.transactions SET status = 'FAILED', failure_reason = 'insufficient_funds' \
         WHERE payment_id = $1",
    )
    .bind(id);
    assert_eq!(violation(flip.execute(&mut conn).await), check("transactions_legal_transition"));
    // History is append-only and money rows are never deleted, for the service role.
    for sql in ["UPDATE payments.transitions SET cause = 'x'", "DELETE FROM payments.transactions"] {
        let (code, _) = violation(sqlx::query(sql).execute(&mut conn).await);
        assert_eq!(code, "42501", "{sql}: insufficient privilege");
    }
    let stored = h.store().get(p.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.transitions), (PaymentStatus::Completed, vec![settled]));
}

/// A statement stuck behind a lock past the store's statement timeout fails as `Unavailable`
/// (retryable, nothing written), and the same call succeeds once the lock is gone.
#[tokio::test]
async fn a_write_blocked_past_the_statement_timeout_is_unavailable_and_changes_nothing() {
    let Some(h) = pg_harness().await else { return };
    let fp = fingerprint("a");
    assert_eq!(h.store().claim(&subject(), &key("k"), fp, t0()).await.unwrap(), None);
    let mut blocker = h.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM payments.idempotency_keys WHERE key = 'k' FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();

    let expired = t0() + Duration::seconds(IDEMPOTENCY_LEASE_S);
    let blocked = h.store().claim(&subject(), &key("k"), fp, expired).await;
    assert_eq!(blocked, Err(PortError::Unavailable { component: "postgresql" }));

    blocker.rollback().await.unwrap();
    assert_eq!(h.store().claim(&subject(), &key("k"), fp, expired).await.unwrap(), None, "the takeover now succeeds");
}

/// A database nobody listens on is `Unavailable`, never a driver error text.
#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    let options = sqlx::postgres::PgConnectOptions::new().host("127.0.0.1").port(1).username("payment_service");
    let refused = PgPaymentStore::connect(options, 1).await.map(|_| ());
    assert_eq!(refused, Err(PortError::Unavailable { component: "postgresql" }));
}
