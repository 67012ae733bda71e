//! The service logic over the in-memory twins of its ports (MemoryPaymentStore = the PostgreSQL
//! truth, MemoryIdempotencyStore = the Redis fast path, MemoryEventLog = Kafka) and a scripted
//! account-service twin. The same scenarios run against the real components in `real_stack.rs`;
//! here the twins' fault switches (outage, flush, time) reach cases a real stack cannot stage
//! deterministically.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use prost::Message as _;
use securepay_core::events::PaymentSettled;
use securepay_core::idempotency::IdempotencyKey;
use securepay_core::ids::{EventId, Subject};
use securepay_core::payment::{FailureReason, Outcome, PaymentRequest, PaymentStatus};
use securepay_core::topology::topic;
use securepay_memory::{MemoryEventLog, MemoryIdempotencyStore, MemoryPaymentStore, SeededIds};
use securepay_payment::consumer::{Handled, handle};
use securepay_payment::{AccountError, Accounts, BalanceCheck, PaymentService, ServiceConfig, ServiceError};
use securepay_ports::{Clock, ConsumedRecord, EventConsumer, IdempotencyStore, Outbox, TopicPartitionOffset};
use securepay_proto::payment::v1 as wire;
use time::OffsetDateTime;

const FROM: &str = "a11ce000-0000-4000-8000-000000000001";
const TO: &str = "b0b00000-0000-4000-8000-000000000001";

/// A clock the test moves.
struct ManualClock(Mutex<OffsetDateTime>);

impl ManualClock {
    fn advance(&self, by: time::Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

/// The account service's answers, scripted; counts calls.
struct ScriptedAccounts {
    answer: Mutex<Result<BalanceCheck, AccountError>>,
    delay: Duration,
    calls: AtomicUsize,
}

#[async_trait]
impl Accounts for ScriptedAccounts {
    async fn check_balance(&self, _subject: &Subject, _request: &PaymentRequest) -> Result<BalanceCheck, AccountError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        *self.answer.lock().unwrap()
    }
}

struct Fixture {
    store: Arc<MemoryPaymentStore>,
    fast: Arc<MemoryIdempotencyStore>,
    accounts: Arc<ScriptedAccounts>,
    clock: Arc<ManualClock>,
    service: Arc<PaymentService<MemoryPaymentStore, MemoryIdempotencyStore, ScriptedAccounts>>,
}

fn fixture(delay: Duration) -> Fixture {
    let store = Arc::new(MemoryPaymentStore::new());
    let fast = Arc::new(MemoryIdempotencyStore::new());
    let accounts = Arc::new(ScriptedAccounts {
        answer: Mutex::new(Ok(BalanceCheck::Sufficient)),
        delay,
        calls: AtomicUsize::new(0),
    });
    let clock = Arc::new(ManualClock(Mutex::new(OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap())));
    let service = Arc::new(PaymentService::new(
        store.clone(),
        fast.clone(),
        accounts.clone(),
        clock.clone(),
        Arc::new(SeededIds),
        ServiceConfig { in_flight_wait: Duration::from_secs(5), ..ServiceConfig::default() },
    ));
    Fixture { store, fast, accounts, clock, service }
}

fn alice() -> Subject {
    Subject::parse("alice").unwrap()
}

fn request(amount: &str, key: &str) -> wire::InitiatePaymentRequest {
    wire::InitiatePaymentRequest {
        payment_id: String::new(),
        from_account: FROM.into(),
        to_account: TO.into(),
        amount: Some(wire::Money { amount: amount.into(), currency: "EUR".into() }),
        idempotency_key: key.into(),
    }
}

fn rows(store: &MemoryPaymentStore) -> (usize, usize) {
    let snapshot = store.snapshot();
    (snapshot.payments().count(), snapshot.outbox().count())
}

#[tokio::test]
async fn fifty_concurrent_identical_requests_make_one_payment_and_identical_responses() {
    let f = fixture(Duration::from_millis(30));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let service = f.service.clone();
            tokio::spawn(async move { service.initiate(alice(), &request("10.50", "k-50"), None).await })
        })
        .collect();
    let mut bodies = Vec::new();
    let mut first = 0;
    for task in tasks {
        let initiated = task.await.unwrap().expect("every duplicate is served the first response");
        first += usize::from(!initiated.replayed);
        bodies.push(initiated.response.encode_to_vec());
    }
    assert_eq!(first, 1, "exactly one request executed");
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "every body is byte-identical");
    assert_eq!(rows(&f.store), (1, 1), "one payment, one event");
    assert_eq!(f.accounts.calls.load(Ordering::SeqCst), 1);

    let changed = f.service.initiate(alice(), &request("10.51", "k-50"), None).await.unwrap_err();
    assert_eq!(changed, ServiceError::IdempotencyKeyReused);
    let other_subject = f.service.initiate(Subject::parse("bob").unwrap(), &request("10.50", "k-50"), None).await;
    assert!(!other_subject.unwrap().replayed, "keys are scoped per subject");
}

/// The fast path is what lets a request run while Redis is up; when it missed the first request
/// (flushed under it, or down when it claimed), the duplicate runs too, loses at the truth's
/// unique key and replays the first response: still one payment, identical bytes.
#[tokio::test]
async fn a_duplicate_the_fast_path_missed_loses_at_the_truth_and_replays_the_first() {
    for missed_by in ["flush", "outage"] {
        let f = fixture(Duration::from_millis(200));
        let key = format!("k-{missed_by}");
        if missed_by == "outage" {
            f.fast.set_available(false);
        }
        let (service, first_request) = (f.service.clone(), request("3.00", &key));
        let first = tokio::spawn(async move { service.initiate(alice(), &first_request, None).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        match missed_by {
            "flush" => f.fast.flush(),
            _ => f.fast.set_available(true),
        }
        let second = f.service.initiate(alice(), &request("3.00", &key), None).await.unwrap();
        let first = first.await.unwrap().unwrap();
        assert_eq!(f.accounts.calls.load(Ordering::SeqCst), 2, "{missed_by}: both ran");
        assert_eq!(usize::from(first.replayed) + usize::from(second.replayed), 1, "{missed_by}: one executed");
        assert_eq!(first.response.encode_to_vec(), second.response.encode_to_vec(), "{missed_by}");
        assert_eq!(rows(&f.store), (1, 1), "{missed_by}: one payment, one event");
        let third = f.service.initiate(alice(), &request("3.00", &key), None).await.unwrap();
        assert!(third.replayed, "{missed_by}");
        assert_eq!(f.accounts.calls.load(Ordering::SeqCst), 2, "{missed_by}: the replay ran nothing");
    }
}

#[tokio::test]
async fn a_duplicate_past_the_wait_is_request_in_progress() {
    let f = fixture(Duration::from_secs(60));
    let service = f.service.clone();
    let _first = tokio::spawn(async move { service.initiate(alice(), &request("1", "k-slow"), None).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let quick = PaymentService::new(
        f.store.clone(),
        f.fast.clone(),
        f.accounts.clone(),
        f.clock.clone(),
        Arc::new(SeededIds),
        ServiceConfig { in_flight_wait: Duration::from_millis(100), ..ServiceConfig::default() },
    );
    assert_eq!(
        quick.initiate(alice(), &request("1", "k-slow"), None).await.unwrap_err(),
        ServiceError::RequestInProgress
    );
    assert_eq!(
        quick.initiate(alice(), &request("2", "k-slow"), None).await.unwrap_err(),
        ServiceError::IdempotencyKeyReused
    );
}

#[tokio::test]
async fn the_truth_decides_when_the_fast_path_is_down_flushed_or_stale() {
    let f = fixture(Duration::ZERO);
    f.fast.set_available(false);
    let first = f.service.initiate(alice(), &request("5", "k-down"), None).await.unwrap();
    let again = f.service.initiate(alice(), &request("5", "k-down"), None).await.unwrap();
    assert!(!first.replayed && again.replayed);
    assert_eq!(first.response, again.response);
    assert_eq!(
        f.service.initiate(alice(), &request("6", "k-down"), None).await.unwrap_err(),
        ServiceError::IdempotencyKeyReused
    );

    f.fast.set_available(true);
    let a = f.service.initiate(alice(), &request("7", "k-flush"), None).await.unwrap();
    f.fast.flush();
    let b = f.service.initiate(alice(), &request("7", "k-flush"), None).await.unwrap();
    assert!(b.replayed);
    assert_eq!(a.response.encode_to_vec(), b.response.encode_to_vec());
    assert_eq!(
        f.service.initiate(alice(), &request("8", "k-flush"), None).await.unwrap_err(),
        ServiceError::IdempotencyKeyReused
    );
    assert_eq!(rows(&f.store), (2, 2));

    // A request that died after claiming both stores: the fast path's IN_FLIGHT stays for 25 h,
    // but it is only a hint — once the truth's lease ends, the same request runs.
    let key = IdempotencyKey::parse("k-crashed").unwrap();
    let crashed =
        securepay_payment::validate::initiate_request(alice(), &request("9", "k-crashed"), Default::default())
            .unwrap()
            .fingerprint();
    assert!(f.fast.claim(&alice(), &key, crashed, f.clock.now()).await.unwrap().is_none());
    assert!(f.store.claim(&alice(), &key, crashed, f.clock.now()).await.unwrap().is_none());
    assert_eq!(
        f.service.initiate(alice(), &request("9", "k-crashed"), None).await.unwrap_err(),
        ServiceError::RequestInProgress
    );
    f.clock.advance(time::Duration::seconds(31));
    assert!(!f.service.initiate(alice(), &request("9", "k-crashed"), None).await.unwrap().replayed);
    assert!(f.service.initiate(alice(), &request("9", "k-crashed"), None).await.unwrap().replayed);
    assert_eq!(rows(&f.store), (3, 3));
}

#[tokio::test]
async fn a_fast_record_with_a_foreign_fingerprint_is_not_believed() {
    let f = fixture(Duration::ZERO);
    let key = IdempotencyKey::parse("k-forged").unwrap();
    let other = securepay_core::idempotency::Fingerprint::of(&["someone", "else"]);
    let ours = securepay_payment::validate::initiate_request(alice(), &request("3", "k-forged"), Default::default())
        .unwrap()
        .fingerprint();
    // What Redis's `complete` writes when, after a flush, another request's claim sat where ours
    // was: the record's fingerprint is theirs, the embedded one ours.
    assert!(f.fast.claim(&alice(), &key, other, f.clock.now()).await.unwrap().is_none());
    let mixed = securepay_payment::idempotency::fast_value(ours, b"a response the truth never held");
    f.fast.complete(&alice(), &key, &mixed).await.unwrap();
    let served = f.service.initiate(alice(), &request("3", "k-forged"), None).await.unwrap();
    assert!(!served.replayed, "the inconsistent fast record was ignored; the truth let it run");
    assert_eq!(rows(&f.store), (1, 1));
}

#[tokio::test]
async fn requests_that_write_nothing_release_their_key() {
    let f = fixture(Duration::ZERO);
    *f.accounts.answer.lock().unwrap() = Err(AccountError::Unavailable);
    let down = f.service.initiate(alice(), &request("4", "k-retry"), None).await.unwrap_err();
    assert_eq!(down, ServiceError::AccountServiceUnavailable);
    *f.accounts.answer.lock().unwrap() = Ok(BalanceCheck::Insufficient);
    assert_eq!(
        f.service.initiate(alice(), &request("4", "k-retry"), None).await.unwrap_err(),
        ServiceError::InsufficientFunds
    );
    *f.accounts.answer.lock().unwrap() = Err(AccountError::Forbidden);
    assert_eq!(f.service.initiate(alice(), &request("4", "k-retry"), None).await.unwrap_err(), ServiceError::Forbidden);
    assert_eq!(rows(&f.store), (0, 0), "nothing written");
    *f.accounts.answer.lock().unwrap() = Ok(BalanceCheck::Sufficient);
    let ok = f.service.initiate(alice(), &request("4", "k-retry"), None).await.unwrap();
    assert!(!ok.replayed, "the key was free again");

    for amount in ["1e400", "NaN", "-1", "1.001", "0"] {
        let refused = f.service.initiate(alice(), &request(amount, "k-bad"), None).await.unwrap_err();
        assert_eq!(refused.code(), "invalid_amount", "{amount}");
    }
    f.store.set_available(false);
    assert_eq!(f.service.initiate(alice(), &request("4", "k-pg"), None).await.unwrap_err(), ServiceError::Unavailable);
    f.store.set_available(true);
    assert_eq!(rows(&f.store), (1, 1));
}

#[tokio::test]
async fn outcomes_settle_idempotently_and_illegal_ones_are_refused() {
    let f = fixture(Duration::ZERO);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let paid = f.service.initiate(alice(), &request("12", ""), Some(tp)).await.unwrap().response.payment.unwrap();
    let event = f.store.unpublished(10).await.unwrap().remove(0);
    assert_eq!(event.key, paid.payment_id);
    let (_, traceparent) = event.headers.iter().find(|(k, _)| k == "traceparent").unwrap();
    assert!(traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "the caller's trace continues");

    let stored = f.store.snapshot().payments().next().unwrap().clone();
    let settled = |outcome| PaymentSettled {
        event_id: EventId::from_uuid(uuid::Uuid::new_v4()),
        payment_id: stored.id,
        from: stored.from,
        to: stored.to,
        amount: stored.amount,
        outcome,
        occurred_at: f.clock.now(),
    };
    let record = |event: &PaymentSettled| ConsumedRecord {
        position: TopicPartitionOffset { topic: event.topic().to_owned(), partition: 0, offset: 0 },
        key: stored.id.to_string(),
        payload: securepay_proto::convert::encode_settled(event),
        headers: vec![],
    };
    let policy = Default::default();
    let done = settled(Outcome::Completed);
    assert_eq!(
        handle(f.store.as_ref(), f.clock.as_ref(), policy, &record(&done)).await.unwrap(),
        Handled::Transitioned
    );
    assert_eq!(
        handle(f.store.as_ref(), f.clock.as_ref(), policy, &record(&done)).await.unwrap(),
        Handled::AlreadyApplied
    );
    let contradicting = settled(Outcome::Failed(FailureReason::InsufficientFunds));
    assert_eq!(
        handle(f.store.as_ref(), f.clock.as_ref(), policy, &record(&contradicting)).await.unwrap(),
        Handled::Skipped("illegal_transition")
    );
    let garbage = ConsumedRecord { payload: b"\xff\xff".to_vec(), ..record(&done) };
    assert!(matches!(handle(f.store.as_ref(), f.clock.as_ref(), policy, &garbage).await.unwrap(), Handled::Skipped(_)));

    let view = f.service.get(&alice(), &paid.payment_id).await.unwrap();
    assert_eq!(view.status, wire::PaymentStatus::Completed as i32);
    let history: Vec<_> = view.transitions.iter().map(|t| (t.from, t.to, t.cause.as_str())).collect();
    assert_eq!(
        history,
        [
            (wire::PaymentStatus::Unspecified as i32, wire::PaymentStatus::Pending as i32, "accepted"),
            (wire::PaymentStatus::Pending as i32, wire::PaymentStatus::Completed as i32, "settled"),
        ]
    );
    assert_eq!(
        f.service.get(&Subject::parse("bob").unwrap(), &paid.payment_id).await.unwrap_err(),
        ServiceError::Forbidden
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(f.service.get(&alice(), &unknown).await.unwrap_err(), ServiceError::PaymentNotFound);
    assert_eq!(f.service.get(&alice(), "x' OR '1'='1").await.unwrap_err().code(), "invalid_payment_id");
}

#[tokio::test]
async fn the_consumer_loop_commits_only_after_the_store_write() {
    let f = fixture(Duration::ZERO);
    let paid = f.service.initiate(alice(), &request("3", ""), None).await.unwrap().response.payment.unwrap();
    let stored = f.store.snapshot().payments().next().unwrap().clone();
    let log = MemoryEventLog::new();
    let event = PaymentSettled {
        event_id: EventId::from_uuid(uuid::Uuid::new_v4()),
        payment_id: stored.id,
        from: stored.from,
        to: stored.to,
        amount: stored.amount,
        outcome: Outcome::Failed(FailureReason::InsufficientFunds),
        occurred_at: f.clock.now(),
    };
    use securepay_ports::{EventLog, OutgoingRecord};
    let record = OutgoingRecord {
        topic: topic::PAYMENT_FAILED.into(),
        key: paid.payment_id.clone(),
        payload: securepay_proto::convert::encode_settled(&event),
        headers: vec![],
    };
    log.publish(&[record]).await.unwrap();
    f.store.set_available(false);
    let group = "payment-service-group";
    let consumer = log.consumer(group, &[topic::PAYMENT_COMPLETED, topic::PAYMENT_FAILED]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(securepay_payment::run_outcome_consumer(
        f.store.clone(),
        consumer,
        f.clock.clone(),
        Default::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        log.committed(group, topic::PAYMENT_FAILED, 0).unwrap_or(0),
        0,
        "nothing committed while the store is down"
    );
    f.store.set_available(true);
    let mut waited = 0;
    while f.service.get(&alice(), &paid.payment_id).await.unwrap().status != wire::PaymentStatus::Failed as i32 {
        waited += 1;
        assert!(waited < 200, "the payment never reached FAILED");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.send(()).unwrap();
    running.await.unwrap();
    let view = f.service.get(&alice(), &paid.payment_id).await.unwrap();
    assert_eq!(view.failure_reason, "insufficient_funds");
    assert_eq!(f.store.snapshot().payments().next().unwrap().status, PaymentStatus::Failed);
    let mut reader = log.consumer(group, &[topic::PAYMENT_FAILED]);
    assert!(reader.poll(10, Duration::from_millis(50)).await.unwrap().is_empty(), "the outcome was committed");
}

#[tokio::test]
async fn a_client_chosen_id_is_used_once_and_keys_are_purged_after_their_retention() {
    let f = fixture(Duration::ZERO);
    let id = uuid::Uuid::new_v4().to_string();
    let chosen = wire::InitiatePaymentRequest { payment_id: id.clone(), ..request("1", "k-id-1") };
    let paid = f.service.initiate(alice(), &chosen, None).await.unwrap().response.payment.unwrap();
    assert_eq!(paid.payment_id, id);
    let again = wire::InitiatePaymentRequest { payment_id: id.clone(), ..request("1", "k-id-2") };
    assert_eq!(f.service.initiate(alice(), &again, None).await.unwrap_err(), ServiceError::PaymentExists);
    assert_eq!(rows(&f.store), (1, 1));

    // Kept 24 h, then purged: the fast path was down throughout, so the truth alone decides.
    f.fast.set_available(false);
    f.clock.advance(time::Duration::hours(23));
    f.service.run_purge(Duration::from_secs(3600), std::future::ready(())).await;
    assert!(f.service.initiate(alice(), &chosen, None).await.unwrap().replayed, "still kept at 23 h");
    f.clock.advance(time::Duration::hours(2));
    f.service.run_purge(Duration::from_secs(3600), std::future::ready(())).await;
    let after = f.service.initiate(alice(), &chosen, None).await.unwrap_err();
    assert_eq!(after, ServiceError::PaymentExists, "after the purge the key is new; the id is still taken");
}

#[tokio::test]
async fn a_request_that_outlived_its_lease_gets_the_winners_response() {
    let f = fixture(Duration::from_millis(300));
    let first = {
        let service = f.service.clone();
        tokio::spawn(async move { service.initiate(alice(), &request("4", "k-lease"), None).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The first is still in its balance check when its 30 s lease runs out; the same request
    // takes the key over. Whichever inserts second finds the claim completed by the other.
    f.clock.advance(time::Duration::seconds(31));
    let second = f.service.initiate(alice(), &request("4", "k-lease"), None).await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.response.encode_to_vec(), second.response.encode_to_vec(), "one answer for both");
    assert!(first.replayed != second.replayed, "exactly one of them executed");
    assert_eq!(rows(&f.store), (1, 1));
    assert_eq!(f.accounts.calls.load(Ordering::SeqCst), 2, "both ran, one payment");
}
