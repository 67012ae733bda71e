//! The `LedgerStore` contract: ONE suite of guarantees, each a generic function over a [`Harness`],
//! run against the real store (`PgLedgerStore`, a fresh PostgreSQL database per test) and its
//! in-memory twin (`MemoryLedgerStore`). A store that passes here keeps SPEC §6.5's promises:
//! conservation, no overdraft, at most one effect per payment, one outcome event per settlement.
//!
//! Plus, PostgreSQL only: concurrent batches draining one account (issue 4, "done when").

mod common;

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use common::TestDb;
use prost::Message as _;
use rust_decimal::Decimal;
use securepay_core::ids::Subject;
use securepay_core::ids::{AccountId, EventId, PaymentId};
use securepay_core::ledger::{Direction, Settled, Transfer};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::{FailureReason, Outcome};
use securepay_memory::MemoryLedgerStore;
use securepay_ports::ledger::SETTLE_BATCH_LEN_MAX;
use securepay_ports::{LedgerStore, Outbox, PortError, SettlementRequest, SettlementResult};
use securepay_postgres::PgLedgerStore;
use securepay_proto::events::v1 as wire;
use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// The harness: what a contract test needs besides the port itself.

/// One store under test plus the two things the port does not offer: opening an account with an
/// opening balance (money enters only that way) and reading a payment's ledger rows.
#[async_trait]
trait Harness: Send + Sync + 'static {
    type Store: LedgerStore;
    fn store(&self) -> &Self::Store;
    async fn open(&self, currency: &str, opening: &str) -> AccountId;
    async fn ledger_entries(&self, payment: PaymentId) -> Vec<(AccountId, Direction, Decimal)>;
}

// ---------------------------------------------------------------------------------------------
// Builders.

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

fn amount(text: &str, currency: &str) -> Amount {
    Amount::parse(text, Currency::from_code(currency).unwrap(), AmountPolicy::default()).unwrap()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
}

fn request(from: AccountId, to: AccountId, value: &str, currency: &str) -> SettlementRequest {
    SettlementRequest {
        event_id: EventId::from_uuid(Uuid::new_v4()),
        transfer: Transfer {
            payment_id: PaymentId::from_uuid(Uuid::new_v4()),
            from,
            to,
            amount: amount(value, currency),
        },
        outcome_event_id: EventId::from_uuid(Uuid::new_v4()),
        outcome_headers: vec![("traceparent".to_owned(), traceparent())],
    }
}

/// A fresh W3C traceparent: each request is settled in a span of its own trace.
fn traceparent() -> String {
    format!("00-{}-{}-01", Uuid::new_v4().simple(), &Uuid::new_v4().simple().to_string()[..16])
}

fn unknown_account() -> AccountId {
    AccountId::from_uuid(Uuid::new_v4())
}

async fn settle_one<H: Harness>(h: &H, request: &SettlementRequest) -> Settled {
    let results = h.store().settle(std::slice::from_ref(request), now()).await.expect("settle");
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].event_id, request.event_id);
    results[0].settled
}

async fn balance<H: Harness>(h: &H, id: AccountId) -> Decimal {
    h.store().account(id).await.expect("account").expect("account exists").balance
}

async fn balances<H: Harness>(h: &H, ids: &[AccountId]) -> Vec<Decimal> {
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        out.push(balance(h, id).await);
    }
    out
}

const INSUFFICIENT: Outcome = Outcome::Failed(FailureReason::InsufficientFunds);

// ---------------------------------------------------------------------------------------------
// The guarantees.

async fn contract_a_completed_settlement_moves_exactly_the_amount_and_writes_two_ledger_rows_and_one_outcome_event<
    H: Harness,
>(
    h: H,
) {
    let payer = h.open("EUR", "100.00").await;
    let payee = h.open("EUR", "5.00").await;
    let r = request(payer, payee, "30.25", "EUR");

    assert_eq!(settle_one(&h, &r).await, Settled::New(Outcome::Completed));

    assert_eq!(balances(&h, &[payer, payee]).await, [dec("69.75"), dec("35.25")]);
    let mut entries = h.ledger_entries(r.transfer.payment_id).await;
    entries.sort_by_key(|(_, direction, _)| *direction);
    assert_eq!(entries, [(payer, Direction::Debit, dec("30.25")), (payee, Direction::Credit, dec("30.25"))]);
    let outbox = h.store().unpublished(100).await.unwrap();
    assert_eq!(outbox.len(), 1, "one outcome event");
    assert_eq!(
        (outbox[0].topic.as_str(), outbox[0].key.clone()),
        ("payment.completed", r.transfer.payment_id.to_string())
    );
    let event =
        wire::PaymentCompleted::decode(outbox[0].payload.as_slice()).expect("payload is events.v1.PaymentCompleted");
    assert_eq!(event.event_id, r.outcome_event_id.to_string());
    assert_eq!(event.payment_id, r.transfer.payment_id.to_string());
    assert_eq!(event.amount.map(|m| (m.amount, m.currency)), Some(("30.25".to_owned(), "EUR".to_owned())));
}

async fn contract_an_unaffordable_settlement_fails_with_insufficient_funds_and_moves_nothing<H: Harness>(h: H) {
    let payer = h.open("EUR", "10.00").await;
    let payee = h.open("EUR", "0").await;
    let r = request(payer, payee, "10.01", "EUR");

    assert_eq!(settle_one(&h, &r).await, Settled::New(INSUFFICIENT));

    assert_eq!(balances(&h, &[payer, payee]).await, [dec("10.00"), dec("0")]);
    assert!(h.ledger_entries(r.transfer.payment_id).await.is_empty());
    let outbox = h.store().unpublished(100).await.unwrap();
    assert_eq!(outbox.len(), 1, "a failure is an outcome event too");
    assert_eq!(outbox[0].topic, "payment.failed");
    let event = wire::PaymentFailed::decode(outbox[0].payload.as_slice()).expect("payload is events.v1.PaymentFailed");
    assert_eq!((event.event_id, event.reason), (r.outcome_event_id.to_string(), "insufficient_funds".to_owned()));
}

async fn contract_accounts_reads_each_as_account_would<H: Harness>(h: H) {
    let (a, b) = (h.open("EUR", "50.00").await, h.open("TRY", "7.5").await);
    let ids = [b, unknown_account(), a, b];
    let mut expected = Vec::new();
    for id in ids {
        expected.push(h.store().account(id).await.unwrap());
    }
    assert_eq!(h.store().accounts(&ids).await.unwrap(), expected);
    assert!(expected[0].is_some() && expected[1].is_none());
    assert_eq!(h.store().accounts(&[]).await.unwrap(), Vec::new());
    let too_many = vec![a; securepay_ports::ledger::ACCOUNTS_LEN_MAX + 1];
    assert_eq!(h.store().accounts(&too_many).await, Err(PortError::Refused { rule: "accounts_len_max" }));
}

async fn contract_an_unknown_account_fails_with_unknown_account<H: Harness>(h: H) {
    let known = h.open("EUR", "50.00").await;
    for r in [request(known, unknown_account(), "1.00", "EUR"), request(unknown_account(), known, "1.00", "EUR")] {
        assert_eq!(settle_one(&h, &r).await, Settled::New(Outcome::Failed(FailureReason::UnknownAccount)));
    }
    assert_eq!(balance(&h, known).await, dec("50.00"));
    assert_eq!(h.store().account(unknown_account()).await.unwrap(), None);
}

async fn contract_a_currency_mismatch_fails_with_currency_mismatch<H: Harness>(h: H) {
    let eur = h.open("EUR", "50.00").await;
    let eur_payee = h.open("EUR", "0").await;
    let try_payee = h.open("TRY", "0").await;
    let cases = [request(eur, try_payee, "1.00", "EUR"), request(eur, eur_payee, "1.00", "TRY")];
    for r in cases {
        assert_eq!(settle_one(&h, &r).await, Settled::New(Outcome::Failed(FailureReason::CurrencyMismatch)));
    }
    assert_eq!(balances(&h, &[eur, eur_payee, try_payee]).await, [dec("50.00"), dec("0"), dec("0")]);
}

async fn contract_the_same_event_delivered_twice_and_ten_times_changes_balances_once<H: Harness>(h: H) {
    let payer = h.open("EUR", "100.00").await;
    let payee = h.open("EUR", "0").await;
    let r = request(payer, payee, "40.00", "EUR");
    assert_eq!(settle_one(&h, &r).await, Settled::New(Outcome::Completed));
    assert_eq!(settle_one(&h, &r).await, Settled::Duplicate(Outcome::Completed), "second delivery");
    // Eight more deliveries, in one batch: ten in all.
    let batch = vec![r.clone(); 8];
    let results = h.store().settle(&batch, now()).await.unwrap();
    assert_eq!(
        results,
        vec![SettlementResult { event_id: r.event_id, settled: Settled::Duplicate(Outcome::Completed) }; 8]
    );

    assert_eq!(balances(&h, &[payer, payee]).await, [dec("60.00"), dec("40.00")]);
    assert_eq!(h.ledger_entries(r.transfer.payment_id).await.len(), 2);
    assert_eq!(h.store().unpublished(100).await.unwrap().len(), 1, "one outcome event for ten deliveries");
}

async fn contract_a_redelivery_returns_the_first_verdict_even_when_it_would_now_differ<H: Harness>(h: H) {
    let payer = h.open("EUR", "10.00").await;
    let payee = h.open("EUR", "100.00").await;
    let r = request(payer, payee, "50.00", "EUR");
    assert_eq!(settle_one(&h, &r).await, Settled::New(INSUFFICIENT));
    // Funds arrive; the payment was decided already.
    assert_eq!(settle_one(&h, &request(payee, payer, "90.00", "EUR")).await, Settled::New(Outcome::Completed));
    assert_eq!(settle_one(&h, &r).await, Settled::Duplicate(INSUFFICIENT));
    assert_eq!(balances(&h, &[payer, payee]).await, [dec("100.00"), dec("10.00")]);
}

async fn contract_a_different_event_for_an_already_settled_payment_is_a_duplicate<H: Harness>(h: H) {
    let payer = h.open("EUR", "100.00").await;
    let payee = h.open("EUR", "0").await;
    let first = request(payer, payee, "25.00", "EUR");
    let again = SettlementRequest {
        event_id: EventId::from_uuid(Uuid::new_v4()),
        outcome_event_id: EventId::from_uuid(Uuid::new_v4()),
        ..first.clone()
    };
    assert_eq!(settle_one(&h, &first).await, Settled::New(Outcome::Completed));
    assert_eq!(settle_one(&h, &again).await, Settled::Duplicate(Outcome::Completed));
    // The same within one batch.
    let third = request(payer, payee, "1.00", "EUR");
    let third_again = SettlementRequest { event_id: EventId::from_uuid(Uuid::new_v4()), ..third.clone() };
    let settled: Vec<Settled> =
        h.store().settle(&[third, third_again], now()).await.unwrap().into_iter().map(|r| r.settled).collect();
    assert_eq!(settled, [Settled::New(Outcome::Completed), Settled::Duplicate(Outcome::Completed)]);

    assert_eq!(balances(&h, &[payer, payee]).await, [dec("74.00"), dec("26.00")]);
    assert_eq!(h.store().unpublished(100).await.unwrap().len(), 2);
}

async fn contract_a_batch_with_one_bad_request_still_settles_the_others<H: Harness>(h: H) {
    let payer = h.open("EUR", "100.00").await;
    let payee = h.open("EUR", "0").await;
    let batch = [
        request(payer, payee, "10.00", "EUR"),
        request(payer, unknown_account(), "10.00", "EUR"),
        request(payer, payee, "20.00", "EUR"),
    ];
    let results = h.store().settle(&batch, now()).await.expect("one bad request does not fail the batch");
    let got: Vec<_> = results.iter().map(|r| (r.event_id, r.settled)).collect();
    assert_eq!(
        got,
        [
            (batch[0].event_id, Settled::New(Outcome::Completed)),
            (batch[1].event_id, Settled::New(Outcome::Failed(FailureReason::UnknownAccount))),
            (batch[2].event_id, Settled::New(Outcome::Completed)),
        ]
    );
    assert_eq!(balances(&h, &[payer, payee]).await, [dec("70.00"), dec("30.00")]);
    assert_eq!(h.store().unpublished(100).await.unwrap().len(), 3);
}

async fn contract_a_mixed_batch_conserves_the_sum_of_balances_and_decides_in_order<H: Harness>(h: H) {
    let eur: Vec<AccountId> =
        [h.open("EUR", "100.00").await, h.open("EUR", "50.00").await, h.open("EUR", "0").await].into();
    let lira = [h.open("TRY", "1000.00").await, h.open("TRY", "0").await];
    let batch = [
        request(eur[0], eur[1], "60.00", "EUR"),  // completes: 40 | 110 | 0
        request(eur[0], eur[2], "60.00", "EUR"),  // insufficient now (40 left)
        request(eur[1], eur[2], "110.00", "EUR"), // completes, spending what the first brought
        request(eur[2], eur[0], "10.00", "TRY"),  // currency mismatch
        request(lira[0], lira[1], "999.99", "TRY"),
        request(eur[2], unknown_account(), "1.00", "EUR"),
        request(lira[1], eur[0], "1.00", "TRY"), // payee in another currency
    ];
    let settled: Vec<Outcome> =
        h.store().settle(&batch, now()).await.unwrap().into_iter().map(|r| r.settled.outcome()).collect();
    assert_eq!(
        settled,
        [
            Outcome::Completed,
            INSUFFICIENT,
            Outcome::Completed,
            Outcome::Failed(FailureReason::CurrencyMismatch),
            Outcome::Completed,
            Outcome::Failed(FailureReason::UnknownAccount),
            Outcome::Failed(FailureReason::CurrencyMismatch),
        ]
    );
    let eur_after = balances(&h, &eur).await;
    let lira_after = balances(&h, &lira).await;
    assert_eq!(eur_after, [dec("40.00"), dec("0"), dec("110.00")]);
    assert_eq!(eur_after.iter().sum::<Decimal>(), dec("150.00"), "EUR conserved");
    assert_eq!(lira_after.iter().sum::<Decimal>(), dec("1000.00"), "TRY conserved");
    assert_eq!(h.store().unpublished(100).await.unwrap().len(), batch.len());
}

async fn contract_outbox_events_stay_unpublished_until_marked_in_sequence_order<H: Harness>(h: H) {
    let payer = h.open("EUR", "100.00").await;
    let payee = h.open("EUR", "0").await;
    let batch: Vec<_> = (0..5).map(|_| request(payer, payee, "1.00", "EUR")).collect();
    h.store().settle(&batch, now()).await.unwrap();

    let all = h.store().unpublished(100).await.unwrap();
    let keys: Vec<String> = all.iter().map(|e| e.key.clone()).collect();
    let expected: Vec<String> = batch.iter().map(|r| r.transfer.payment_id.to_string()).collect();
    assert_eq!(keys, expected, "in the order they were settled");
    assert!(all.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert_eq!(h.store().unpublished(2).await.unwrap(), all[..2], "limit is honoured");

    h.store().mark_published(&[all[0].sequence, all[2].sequence]).await.unwrap();
    h.store().mark_published(&[all[0].sequence]).await.expect("idempotent");
    let left = h.store().unpublished(100).await.unwrap();
    assert_eq!(left, [all[1].clone(), all[3].clone(), all[4].clone()]);
    h.store().mark_published(&left.iter().map(|e| e.sequence).collect::<Vec<_>>()).await.unwrap();
    assert!(h.store().unpublished(100).await.unwrap().is_empty());
}

async fn contract_each_outcome_event_carries_the_headers_of_its_own_request<H: Harness>(h: H) {
    let payer = h.open("EUR", "10.00").await;
    let payee = h.open("EUR", "0").await;
    let mut batch = vec![
        request(payer, payee, "4.00", "EUR"),
        request(payer, payee, "7.00", "EUR"),
        request(payer, payee, "6.00", "EUR"),
    ];
    batch[2].outcome_headers.push(("tracestate".to_owned(), "securepay=1".to_owned()));
    // A second event of the first payment, settled in a span of another trace: a duplicate.
    let again = SettlementRequest {
        event_id: EventId::from_uuid(Uuid::new_v4()),
        outcome_event_id: EventId::from_uuid(Uuid::new_v4()),
        outcome_headers: vec![("traceparent".to_owned(), traceparent())],
        ..batch[0].clone()
    };
    batch.push(again);
    let settled: Vec<Settled> = h.store().settle(&batch, now()).await.unwrap().into_iter().map(|r| r.settled).collect();
    let completed = Settled::New(Outcome::Completed);
    assert_eq!(settled, [completed, Settled::New(INSUFFICIENT), completed, Settled::Duplicate(Outcome::Completed)]);

    let outbox = h.store().unpublished(100).await.unwrap();
    let topics: Vec<&str> = outbox.iter().map(|e| e.topic.as_str()).collect();
    assert_eq!(topics, ["payment.completed", "payment.failed", "payment.completed"], "the duplicate writes none");
    for (event, request) in outbox.iter().zip(&batch) {
        let mut expected = request.outcome_headers.clone();
        expected.sort();
        assert_eq!(
            event.headers, expected,
            "the outcome of {} keeps its own trace context",
            request.transfer.payment_id
        );
    }
}

async fn contract_an_oversized_batch_or_a_payment_to_oneself_is_refused_and_writes_nothing<H: Harness>(h: H) {
    let payer = h.open("EUR", "1000.00").await;
    let payee = h.open("EUR", "0").await;
    let oversized: Vec<_> = (0..=SETTLE_BATCH_LEN_MAX).map(|_| request(payer, payee, "1.00", "EUR")).collect();
    assert_eq!(h.store().settle(&oversized, now()).await, Err(PortError::Refused { rule: "settle_batch_len_max" }));
    let to_oneself = [request(payer, payee, "1.00", "EUR"), request(payer, payer, "1.00", "EUR")];
    assert_eq!(h.store().settle(&to_oneself, now()).await, Err(PortError::Refused { rule: "transfer_same_account" }));

    assert_eq!(balances(&h, &[payer, payee]).await, [dec("1000.00"), dec("0")]);
    assert!(h.store().unpublished(100).await.unwrap().is_empty());
    let full: Vec<_> = (0..SETTLE_BATCH_LEN_MAX).map(|_| request(payer, payee, "1.00", "EUR")).collect();
    assert_eq!(
        h.store().settle(&full, now()).await.unwrap().len(),
        SETTLE_BATCH_LEN_MAX,
        "the limit itself is accepted"
    );
}

securepay_testkit::contract_suite! {
    cases: [
        contract_a_completed_settlement_moves_exactly_the_amount_and_writes_two_ledger_rows_and_one_outcome_event,
        contract_an_unaffordable_settlement_fails_with_insufficient_funds_and_moves_nothing,
        contract_an_unknown_account_fails_with_unknown_account,
        contract_accounts_reads_each_as_account_would,
        contract_a_currency_mismatch_fails_with_currency_mismatch,
        contract_the_same_event_delivered_twice_and_ten_times_changes_balances_once,
        contract_a_redelivery_returns_the_first_verdict_even_when_it_would_now_differ,
        contract_a_different_event_for_an_already_settled_payment_is_a_duplicate,
        contract_a_batch_with_one_bad_request_still_settles_the_others,
        contract_a_mixed_batch_conserves_the_sum_of_balances_and_decides_in_order,
        contract_outbox_events_stay_unpublished_until_marked_in_sequence_order,
        contract_each_outcome_event_carries_the_headers_of_its_own_request,
        contract_an_oversized_batch_or_a_payment_to_oneself_is_refused_and_writes_nothing,
    ],
    implementations: { memory => memory_harness, postgres => pg_harness },
}

// ---------------------------------------------------------------------------------------------
// In memory: the simulator's store, a fresh one per test.

struct MemoryHarness {
    store: MemoryLedgerStore,
}

async fn memory_harness() -> Option<MemoryHarness> {
    Some(MemoryHarness { store: MemoryLedgerStore::new() })
}

#[async_trait]
impl Harness for MemoryHarness {
    type Store = MemoryLedgerStore;

    fn store(&self) -> &MemoryLedgerStore {
        &self.store
    }

    async fn open(&self, currency: &str, opening: &str) -> AccountId {
        let id = AccountId::from_uuid(Uuid::new_v4());
        let owner = Subject::parse("contract").unwrap();
        self.store.open(id, owner, Currency::from_code(currency).unwrap(), dec(opening)).expect("open account");
        id
    }

    async fn ledger_entries(&self, payment: PaymentId) -> Vec<(AccountId, Direction, Decimal)> {
        let ledger = self.store.ledger();
        ledger
            .entries()
            .iter()
            .filter(|e| e.payment_id == payment)
            .map(|e| (e.account, e.direction, e.amount.value()))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: a fresh, migrated database per test; the store logs in as `account_service`.

/// A fresh migrated database of its own (its superuser pool opens accounts and reads the ledger,
/// as the seed does) and the store under test, connected as `account_service`.
struct PgHarness {
    db: TestDb,
    store: PgLedgerStore,
}

async fn pg_harness() -> Option<PgHarness> {
    pg_harness_with(2).await
}

async fn pg_harness_with(connections_max: u32) -> Option<PgHarness> {
    let db = TestDb::new().await?;
    let options = db.role_options("account_service").await;
    let store = PgLedgerStore::connect(options, connections_max).await.expect("account_service logs in");
    Some(PgHarness { db, store })
}

#[async_trait]
impl Harness for PgHarness {
    type Store = PgLedgerStore;

    fn store(&self) -> &PgLedgerStore {
        &self.store
    }

    async fn open(&self, currency: &str, opening: &str) -> AccountId {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO accounts.accounts (account_id, owner, currency, balance, opening_balance) \
             VALUES ($1, 'contract', $2, $3, $3)",
        )
        .bind(id)
        .bind(currency)
        .bind(dec(opening))
        .execute(&self.db.pool)
        .await
        .expect("open account");
        AccountId::from_uuid(id)
    }

    async fn ledger_entries(&self, payment: PaymentId) -> Vec<(AccountId, Direction, Decimal)> {
        let rows = sqlx::query(
            "SELECT account_id, direction, amount FROM accounts.ledger_entries WHERE payment_id = $1 ORDER BY id",
        )
        .bind(payment.as_uuid())
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        rows.iter()
            .map(|row| {
                let direction = match row.get::<String, _>("direction").as_str() {
                    "DEBIT" => Direction::Debit,
                    "CREDIT" => Direction::Credit,
                    other => panic!("unknown direction {other}"),
                };
                (AccountId::from_uuid(row.get("account_id")), direction, row.get("amount"))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: the schema as the last guard, and concurrency.

/// A caller bug the verdict cannot see (an outcome event id minted twice) is refused by the named
/// constraint, and the whole batch — including the request that had settled — writes nothing.
#[tokio::test]
async fn a_write_the_schema_refuses_is_refused_by_name_and_the_batch_writes_nothing() {
    let Some(h) = pg_harness().await else { return };
    let payer = h.open("EUR", "100.00").await;
    let payee = h.open("EUR", "0").await;
    let first = request(payer, payee, "10.00", "EUR");
    let clash = SettlementRequest { outcome_event_id: first.outcome_event_id, ..request(payer, payee, "20.00", "EUR") };

    let refused = h.store().settle(&[first.clone(), clash], now()).await;

    assert_eq!(refused, Err(PortError::Refused { rule: "outbox_event_id_unique" }));
    assert_eq!(refused.unwrap_err().to_string(), "refused by the store: outbox_event_id_unique", "no driver text");
    assert_eq!(balances(&h, &[payer, payee]).await, [dec("100.00"), dec("0")]);
    assert!(h.store().unpublished(100).await.unwrap().is_empty());
    assert_eq!(
        settle_one(&h, &first).await,
        Settled::New(Outcome::Completed),
        "nothing of the refused batch was recorded"
    );
}

const DRAIN_TASKS: usize = 20;
const DRAIN_BATCHES_PER_TASK: usize = 10;
const DRAIN_CONNECTIONS_MAX: u32 = 10;

/// 200 settlements of 7.00 from one account holding 1000.00, in 20 tasks × 10 single-request
/// batches plus crossing traffic between the payees (so batches lock several accounts in both
/// directions): exactly 142 complete, 58 fail with insufficient_funds, nothing is overdrawn and
/// the sum of balances is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_settlements_draining_one_account_complete_exactly_the_affordable_ones() {
    let Some(h) = pg_harness_with(DRAIN_CONNECTIONS_MAX).await else { return };
    let h = Arc::new(h);
    let opening = dec("1000.00");
    let drained = h.open("EUR", "1000.00").await;
    let payees: Vec<AccountId> = {
        let mut payees = Vec::new();
        for _ in 0..4 {
            payees.push(h.open("EUR", "0").await);
        }
        payees
    };
    let total_before = opening;

    let mut tasks = Vec::new();
    for task in 0..DRAIN_TASKS {
        let (h, payees) = (Arc::clone(&h), payees.clone());
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for batch in 0..DRAIN_BATCHES_PER_TASK {
                let payee = payees[(task + batch) % payees.len()];
                let other = payees[(task + batch + 1) % payees.len()];
                // The drain, plus a payee-to-payee transfer in reverse account order in the same batch.
                let requests = [request(drained, payee, "7.00", "EUR"), request(other, payee, "0.01", "EUR")];
                let results = h.store().settle(&requests, now()).await.expect("settle under concurrency");
                outcomes.push(results[0].settled);
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.extend(task.await.unwrap());
    }

    assert_eq!(outcomes.len(), DRAIN_TASKS * DRAIN_BATCHES_PER_TASK);
    assert!(outcomes.iter().all(|s| matches!(s, Settled::New(_))));
    let completed = outcomes.iter().filter(|s| s.outcome() == Outcome::Completed).count();
    let insufficient = outcomes.iter().filter(|s| s.outcome() == INSUFFICIENT).count();
    assert_eq!((completed, insufficient), (142, 58), "exactly floor(1000.00 / 7.00) complete");
    assert_eq!(balance(&*h, drained).await, dec("6.00"));
    let mut total_after = balance(&*h, drained).await;
    for &payee in &payees {
        let b = balance(&*h, payee).await;
        assert!(b >= Decimal::ZERO);
        total_after += b;
    }
    assert_eq!(total_after, total_before, "conservation");
    let ledger_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts.ledger_entries WHERE account_id = $1")
        .bind(drained.as_uuid())
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(ledger_rows, 142);
}

/// Many tasks delivering the same events at once (Kafka redelivery racing a rebalance): each
/// payment takes effect once, every delivery gets its verdict, none gets an error. Events between
/// unknown accounts lock no row, so their deliveries really race on the processed-event row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_redeliveries_of_the_same_events_settle_each_payment_once() {
    let Some(h) = pg_harness_with(DRAIN_CONNECTIONS_MAX).await else { return };
    let h = Arc::new(h);
    let payer = h.open("EUR", "100.00").await;
    let payee = h.open("EUR", "0").await;
    let nowhere = unknown_account();
    let events: Arc<Vec<SettlementRequest>> = Arc::new(
        (0..10)
            .map(|i| {
                if i % 2 == 0 {
                    request(payer, payee, "3.00", "EUR")
                } else {
                    request(nowhere, unknown_account(), "3.00", "EUR")
                }
            })
            .collect(),
    );

    let mut tasks = Vec::new();
    for task in 0..10 {
        let (h, events) = (Arc::clone(&h), Arc::clone(&events));
        tasks.push(tokio::spawn(async move {
            // Each task delivers every event in a batch of its own, starting at a different one.
            let mut results = Vec::new();
            for event in events.iter().cycle().skip(task).take(events.len()) {
                results.extend(
                    h.store().settle(std::slice::from_ref(event), now()).await.expect("redelivery under concurrency"),
                );
            }
            results
        }));
    }
    let mut new = 0;
    for task in tasks {
        for result in task.await.unwrap() {
            let event = events.iter().position(|e| e.event_id == result.event_id).unwrap();
            let expected =
                if event % 2 == 0 { Outcome::Completed } else { Outcome::Failed(FailureReason::UnknownAccount) };
            assert_eq!(result.settled.outcome(), expected);
            new += usize::from(matches!(result.settled, Settled::New(_)));
        }
    }
    assert_eq!(new, events.len(), "each event is New exactly once across all deliveries");
    assert_eq!(balances(&*h, &[payer, payee]).await, [dec("85.00"), dec("15.00")]);
    assert_eq!(h.store().unpublished(100).await.unwrap().len(), events.len());
}
