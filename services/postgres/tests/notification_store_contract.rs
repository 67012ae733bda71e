//! The `NotificationStore` contract: ONE suite of guarantees, each a generic function over a
//! [`Harness`], run against the real store (`PgNotificationStore`, a fresh PostgreSQL database per
//! test, logged in as `notification_service`) and its in-memory twin (`MemoryNotificationStore`).
//! A store that passes here keeps SPEC §6.7: one notification per event, however often it arrives,
//! one by one or in batches.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::TestDb;
use securepay_core::events::{PaymentEvent, PaymentInitiated, PaymentSettled};
use securepay_core::ids::{AccountId, EventId, PaymentId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::{FailureReason, Outcome};
use securepay_memory::MemoryNotificationStore;
use securepay_ports::notifications::{LIST_LEN_MAX, RECORD_BATCH_LEN_MAX};
use securepay_ports::{Notification, NotificationKind, NotificationStore, PortError, Recorded};
use securepay_postgres::PgNotificationStore;
use time::OffsetDateTime;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// The harness: the store plus what the port does not offer (counting stored rows of an event).

#[async_trait]
trait Harness: Send + Sync + 'static {
    type Store: NotificationStore + Clone;
    fn store(&self) -> &Self::Store;
    /// How many notifications are stored for `event` (the port only lists by payment).
    async fn rows_of_event(&self, event: EventId) -> usize;
}

// ---------------------------------------------------------------------------------------------
// Builders.

fn id() -> Uuid {
    Uuid::new_v4()
}

fn at(seconds: i64, nanos: u32) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000 + seconds).unwrap().replace_nanosecond(nanos).unwrap()
}

fn amount(text: &str, currency: &str) -> Amount {
    Amount::parse(text, Currency::from_code(currency).unwrap(), AmountPolicy::default()).unwrap()
}

fn initiated(payment: PaymentId, value: &str, currency: &str) -> PaymentEvent {
    PaymentEvent::Initiated(PaymentInitiated {
        event_id: EventId::from_uuid(id()),
        payment_id: payment,
        subject: Subject::parse("alice").unwrap(),
        from: AccountId::from_uuid(id()),
        to: AccountId::from_uuid(id()),
        amount: amount(value, currency),
        occurred_at: at(0, 123_456_789),
    })
}

fn settled(payment: PaymentId, outcome: Outcome) -> PaymentEvent {
    PaymentEvent::Settled(PaymentSettled {
        event_id: EventId::from_uuid(id()),
        payment_id: payment,
        from: AccountId::from_uuid(id()),
        to: AccountId::from_uuid(id()),
        amount: amount("1234.567", "KWD"),
        outcome,
        occurred_at: at(1, 999_999_999),
    })
}

fn notification(event: &PaymentEvent, recorded_seconds: i64) -> Notification {
    Notification::from_event(event, at(recorded_seconds, 987_654_321))
}

fn payment() -> PaymentId {
    PaymentId::from_uuid(id())
}

// ---------------------------------------------------------------------------------------------
// The guarantees.

async fn contract_every_kind_of_notification_reads_back_exactly<H: Harness>(h: H) {
    let p = payment();
    let events = [
        initiated(p, "10.50", "EUR"),
        settled(p, Outcome::Completed),
        settled(p, Outcome::Failed(FailureReason::InsufficientFunds)),
        settled(p, Outcome::Failed(FailureReason::CurrencyMismatch)),
    ];
    let written: Vec<Notification> = events.iter().enumerate().map(|(i, e)| notification(e, i as i64)).collect();
    for n in &written {
        assert_eq!(h.store().record(n).await, Ok(Recorded::New));
    }

    let read = h.store().for_payment(p, 10).await.expect("list");

    assert_eq!(read, written, "every field, every kind, in recording order");
    assert_eq!(read[0].amount.to_string(), "10.50");
    assert_eq!(read[1].amount.to_string(), "1234.567", "three decimals of KWD are kept exactly");
    assert_eq!(read[0].occurred_at.nanosecond(), 123_456_789, "occurred_at keeps its nanoseconds");
    assert_eq!(
        [read[0].kind, read[1].kind, read[2].kind],
        [NotificationKind::Initiated, NotificationKind::Completed, NotificationKind::Failed]
    );
    assert_eq!(read[2].failure_reason, Some(FailureReason::InsufficientFunds));
}

async fn contract_recorded_at_is_kept_to_the_microsecond<H: Harness>(h: H) {
    let p = payment();
    let mut n = notification(&initiated(p, "1", "JPY"), 0);
    n.recorded_at = at(5, 123_456_789);

    assert_eq!(h.store().record(&n).await, Ok(Recorded::New));

    let read = h.store().for_payment(p, 1).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].recorded_at, at(5, 123_456_000));
    assert_eq!(Notification { recorded_at: n.recorded_at, ..read[0].clone() }, n, "nothing else changed");
}

async fn contract_a_duplicate_event_is_reported_and_stored_once<H: Harness>(h: H) {
    let p = payment();
    let first = notification(&initiated(p, "7.00", "EUR"), 0);
    // The same event id again, even with other content and a later time: the first write wins.
    let again = Notification { amount: amount("999.00", "EUR"), recorded_at: at(60, 0), ..first.clone() };

    assert_eq!(h.store().record(&first).await, Ok(Recorded::New));
    assert_eq!(h.store().record(&first).await, Ok(Recorded::Duplicate));
    assert_eq!(h.store().record(&again).await, Ok(Recorded::Duplicate));

    assert_eq!(h.rows_of_event(first.event_id).await, 1);
    assert_eq!(h.store().for_payment(p, 10).await.unwrap(), vec![first]);
}

const CONCURRENT_RECORDS: usize = 20;

async fn contract_concurrent_records_of_one_event_make_exactly_one_new<H: Harness>(h: H) {
    let p = payment();
    let n = notification(&settled(p, Outcome::Completed), 0);
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENT_RECORDS {
        let (store, n) = (h.store().clone(), n.clone());
        tasks.push(tokio::spawn(async move { store.record(&n).await }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("task").expect("record under concurrency"));
    }

    assert_eq!(outcomes.iter().filter(|r| **r == Recorded::New).count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|r| **r == Recorded::Duplicate).count(), CONCURRENT_RECORDS - 1);
    assert_eq!(h.rows_of_event(n.event_id).await, 1);
    assert_eq!(h.store().for_payment(p, 10).await.unwrap(), vec![n]);
}

async fn contract_a_payment_lists_its_own_notifications_in_recording_order_up_to_the_limit<H: Harness>(h: H) {
    let (p, other) = (payment(), payment());
    // Recorded in this order; occurred_at deliberately out of order: the listing is by recording.
    let mut mine = Vec::new();
    for i in 0..5 {
        let mut n = notification(&initiated(p, &format!("{}.00", i + 1), "EUR"), i);
        n.occurred_at = at(100 - i, 0);
        assert_eq!(h.store().record(&n).await, Ok(Recorded::New));
        mine.push(n);
        let noise = notification(&initiated(other, "1.00", "EUR"), i);
        assert_eq!(h.store().record(&noise).await, Ok(Recorded::New));
    }

    assert_eq!(h.store().for_payment(p, 10).await.unwrap(), mine);
    assert_eq!(h.store().for_payment(p, 5).await.unwrap(), mine);
    assert_eq!(h.store().for_payment(p, 3).await.unwrap(), mine[..3].to_vec(), "the first recorded");
    assert_eq!(h.store().for_payment(p, 0).await.unwrap(), vec![]);
    assert!(h.store().for_payment(other, 10).await.unwrap().iter().all(|n| n.payment_id == other));
    assert_eq!(h.store().for_payment(other, 10).await.unwrap().len(), 5);
}

async fn contract_an_unknown_payment_has_no_notifications<H: Harness>(h: H) {
    let known = payment();
    h.store().record(&notification(&initiated(known, "1.00", "EUR"), 0)).await.unwrap();

    assert_eq!(h.store().for_payment(payment(), LIST_LEN_MAX).await, Ok(vec![]));
}

async fn contract_a_limit_above_the_maximum_is_refused<H: Harness>(h: H) {
    assert_eq!(
        h.store().for_payment(payment(), LIST_LEN_MAX + 1).await,
        Err(PortError::Refused { rule: "notifications_list_len_max" })
    );
}

// ---------------------------------------------------------------------------------------------
// Batches: `record` of each notification in order, in one transaction.

async fn contract_a_batch_records_the_first_of_each_event_once_in_batch_order<H: Harness>(h: H) {
    let p = payment();
    let (a, b, c) = (
        notification(&initiated(p, "1.00", "EUR"), 0),
        notification(&settled(p, Outcome::Completed), 1),
        notification(&settled(p, Outcome::Failed(FailureReason::InsufficientFunds)), 2),
    );
    // `a` twice in the batch, the second time with other content: the first wins.
    let a_again = Notification { amount: amount("999.00", "EUR"), ..a.clone() };
    let known = notification(&initiated(p, "2.00", "EUR"), 3);
    assert_eq!(h.store().record(&known).await, Ok(Recorded::New));

    let answers = h.store().record_batch(&[a.clone(), b.clone(), a_again, known.clone(), c.clone()]).await;

    use Recorded::{Duplicate, New};
    assert_eq!(answers, Ok(vec![New, New, Duplicate, Duplicate, New]));
    for n in [&a, &b, &c, &known] {
        assert_eq!(h.rows_of_event(n.event_id).await, 1);
    }
    // Event ids are random, so their order is not the batch's: the listing keeps recording order.
    assert_eq!(h.store().for_payment(p, 10).await.unwrap(), vec![known, a, b, c]);
    assert_eq!(h.store().record_batch(&[]).await, Ok(vec![]), "an empty batch is nothing");
}

async fn contract_a_redelivered_batch_is_all_duplicates_and_writes_nothing<H: Harness>(h: H) {
    let p = payment();
    let batch: Vec<Notification> = (0..4).map(|i| notification(&initiated(p, "3.00", "EUR"), i)).collect();
    assert_eq!(h.store().record_batch(&batch).await, Ok(vec![Recorded::New; 4]));

    assert_eq!(h.store().record_batch(&batch).await, Ok(vec![Recorded::Duplicate; 4]));
    let reversed: Vec<Notification> = batch.iter().rev().cloned().collect();
    assert_eq!(h.store().record_batch(&reversed).await, Ok(vec![Recorded::Duplicate; 4]));
    assert_eq!(h.store().record(&batch[2]).await, Ok(Recorded::Duplicate), "and one by one");

    assert_eq!(h.store().for_payment(p, 10).await.unwrap(), batch);
}

async fn contract_a_batch_with_a_refused_notification_writes_nothing_and_its_good_ones_record_alone<H: Harness>(h: H) {
    let p = payment();
    let (good, last) = (notification(&initiated(p, "1.00", "EUR"), 0), notification(&initiated(p, "2.00", "EUR"), 1));
    // An occurred_at RFC 3339 cannot write (year -248): the store refuses it.
    let mut bad = notification(&settled(p, Outcome::Completed), 2);
    bad.occurred_at = OffsetDateTime::from_unix_timestamp(-70_000_000_000).unwrap();
    let refused = PortError::Refused { rule: "occurred_at_rfc3339" };

    assert_eq!(h.store().record_batch(&[good.clone(), bad.clone(), last.clone()]).await, Err(refused.clone()));
    assert_eq!(h.store().for_payment(p, 10).await.unwrap(), vec![], "nothing of the refused batch");

    // One by one, the good ones record and the bad one alone is refused.
    assert_eq!(h.store().record(&good).await, Ok(Recorded::New));
    assert_eq!(h.store().record(&bad).await, Err(refused));
    assert_eq!(h.store().record(&last).await, Ok(Recorded::New));
    assert_eq!(h.store().for_payment(p, 10).await.unwrap(), vec![good, last]);
}

async fn contract_a_batch_longer_than_the_maximum_is_refused_and_writes_nothing<H: Harness>(h: H) {
    let p = payment();
    let batch: Vec<Notification> =
        (0..=RECORD_BATCH_LEN_MAX).map(|_| notification(&initiated(p, "1.00", "EUR"), 0)).collect();
    assert_eq!(h.store().record_batch(&batch).await, Err(PortError::Refused { rule: "notifications_batch_len_max" }));
    assert_eq!(h.store().for_payment(p, 10).await.unwrap(), vec![]);
}

const CONCURRENT_BATCHES: usize = 8;
const EVENTS_PER_BATCH: usize = 12;

/// Batches over the same event ids, each in another order (rotated, half of them reversed), race:
/// every event id is `New` exactly once across all of them (and PostgreSQL does not deadlock).
async fn contract_concurrent_batches_over_the_same_events_make_exactly_one_new_per_event<H: Harness>(h: H) {
    let p = payment();
    let events: Vec<Notification> =
        (0..EVENTS_PER_BATCH).map(|i| notification(&initiated(p, "1.00", "EUR"), i as i64)).collect();
    let mut tasks = Vec::new();
    for k in 0..CONCURRENT_BATCHES {
        let mut batch = events.clone();
        batch.rotate_left(k * 5 % EVENTS_PER_BATCH);
        if k % 2 == 1 {
            batch.reverse();
        }
        let store = h.store().clone();
        tasks.push(tokio::spawn(async move {
            let answers = store.record_batch(&batch).await.expect("record_batch under concurrency");
            batch.into_iter().zip(answers).collect::<Vec<_>>()
        }));
    }
    let mut new_per_event = std::collections::BTreeMap::new();
    for task in tasks {
        for (n, answer) in task.await.expect("task") {
            *new_per_event.entry(n.event_id).or_insert(0) += usize::from(answer == Recorded::New);
        }
    }

    assert_eq!(new_per_event.len(), EVENTS_PER_BATCH);
    assert!(new_per_event.values().all(|new| *new == 1), "{new_per_event:?}");
    for n in &events {
        assert_eq!(h.rows_of_event(n.event_id).await, 1);
    }
    assert_eq!(h.store().for_payment(p, 100).await.unwrap().len(), EVENTS_PER_BATCH);
}

securepay_testkit::contract_suite! {
    cases: [
        contract_every_kind_of_notification_reads_back_exactly,
        contract_recorded_at_is_kept_to_the_microsecond,
        contract_a_duplicate_event_is_reported_and_stored_once,
        contract_concurrent_records_of_one_event_make_exactly_one_new,
        contract_a_payment_lists_its_own_notifications_in_recording_order_up_to_the_limit,
        contract_an_unknown_payment_has_no_notifications,
        contract_a_limit_above_the_maximum_is_refused,
        contract_a_batch_records_the_first_of_each_event_once_in_batch_order,
        contract_a_redelivered_batch_is_all_duplicates_and_writes_nothing,
        contract_a_batch_with_a_refused_notification_writes_nothing_and_its_good_ones_record_alone,
        contract_a_batch_longer_than_the_maximum_is_refused_and_writes_nothing,
        contract_concurrent_batches_over_the_same_events_make_exactly_one_new_per_event,
    ],
    implementations: { memory => memory_harness, postgres => pg_harness },
}

// ---------------------------------------------------------------------------------------------
// Memory.

struct MemoryHarness {
    store: MemoryNotificationStore,
}

async fn memory_harness() -> Option<MemoryHarness> {
    Some(MemoryHarness { store: MemoryNotificationStore::new() })
}

#[async_trait]
impl Harness for MemoryHarness {
    type Store = MemoryNotificationStore;

    fn store(&self) -> &MemoryNotificationStore {
        &self.store
    }

    async fn rows_of_event(&self, event: EventId) -> usize {
        self.store.all().iter().filter(|n| n.event_id == event).count()
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: a fresh, migrated database per test; the store logs in as `notification_service`.

struct PgHarness {
    db: TestDb,
    store: PgNotificationStore,
}

/// Enough connections for the concurrent-record case to really race.
const PG_CONNECTIONS_MAX: u32 = 8;

async fn pg_harness() -> Option<PgHarness> {
    let db = TestDb::new().await?;
    let options = db.role_options("notification_service").await;
    let store = PgNotificationStore::connect(options, PG_CONNECTIONS_MAX).await.expect("notification_service logs in");
    Some(PgHarness { db, store })
}

#[async_trait]
impl Harness for PgHarness {
    type Store = PgNotificationStore;

    fn store(&self) -> &PgNotificationStore {
        &self.store
    }

    async fn rows_of_event(&self, event: EventId) -> usize {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications.notifications WHERE event_id = $1")
            .bind(event.as_uuid())
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
        usize::try_from(count).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: the role and the schema.

/// A notification records what happened: the service role cannot rewrite it (UPDATE is revoked).
#[tokio::test]
async fn the_service_role_cannot_rewrite_a_notification() {
    let Some(h) = pg_harness().await else { return };
    let n = notification(&initiated(payment(), "1.00", "EUR"), 0);
    h.store().record(&n).await.unwrap();
    let mut conn = h.db.connect_as("notification_service").await;

    let refused = sqlx::query("UPDATE notifications.notifications SET kind = 'payment.failed'")
        .execute(&mut conn)
        .await
        .expect_err("UPDATE is revoked from notification_service");

    assert_eq!(refused.as_database_error().and_then(|e| e.code()).as_deref(), Some("42501"));
    assert_eq!(h.store().for_payment(n.payment_id, 10).await.unwrap(), vec![n]);
}

/// Many notifications racing on a handful of event ids through one pool: each id is New once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_records_of_many_events_make_one_new_per_event() {
    let Some(h) = pg_harness().await else { return };
    let p = payment();
    let events: Vec<Notification> = (0..5).map(|i| notification(&initiated(p, "2.00", "EUR"), i)).collect();
    let store = Arc::new(h.store().clone());
    let mut tasks = Vec::new();
    for round in 0..8 {
        for n in &events {
            let (store, n) = (Arc::clone(&store), n.clone());
            tasks.push(tokio::spawn(async move { (round, store.record(&n).await.expect("record")) }));
        }
    }
    let mut new = 0;
    for task in tasks {
        if task.await.unwrap().1 == Recorded::New {
            new += 1;
        }
    }

    assert_eq!(new, events.len());
    assert_eq!(h.store().for_payment(p, 100).await.unwrap().len(), events.len());
}
