//! The schema guards money by itself: each test writes what service code must never write and
//! proves the real PostgreSQL rejects it, by the named constraint. Plus: each service role is
//! confined to its schema, and the migrations can be re-applied.
//!
//! Every test creates its own database (random name) on the cluster of
//! `SECUREPAY_TEST_PG_ADMIN_URL`, applies `MIGRATOR`, and drops the database when it ends, even by
//! panic. Role passwords are cluster-wide: this binary sets them once, with a random value.

mod common;

use common::{TestDb, role_passwords};
use securepay_postgres::{MIGRATOR, RolePasswords, admin_options};
use securepay_testkit::{component, var};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, Postgres};
use uuid::Uuid;

const UNIQUE_VIOLATION: &str = "23505";
const FOREIGN_KEY_VIOLATION: &str = "23503";
const CHECK_VIOLATION: &str = "23514";
const INSUFFICIENT_PRIVILEGE: &str = "42501";

const SCHEMAS: [&str; 3] = ["payments", "accounts", "notifications"];

#[track_caller]
fn assert_rejected<T: std::fmt::Debug>(result: Result<T, sqlx::Error>, code: &str, constraint: &str) {
    let err = result.expect_err(&format!("the store accepted a write that violates {constraint}"));
    let db_err = err.as_database_error().unwrap_or_else(|| panic!("not a database error: {err}"));
    assert_eq!(
        (db_err.code().as_deref(), db_err.constraint()),
        (Some(code), Some(constraint)),
        "rejected, but not by {constraint}: {db_err}"
    );
}

#[track_caller]
fn assert_permission_denied<T: std::fmt::Debug>(result: Result<T, sqlx::Error>, what: &str) {
    let err = result.expect_err(&format!("permitted: {what}"));
    let code = err.as_database_error().and_then(|d| d.code().map(|c| c.into_owned()));
    assert_eq!(code.as_deref(), Some(INSUFFICIENT_PRIVILEGE), "{what}: {err}");
}

async fn execute<'e, E: Executor<'e, Database = Postgres>>(executor: E, sql: &'e str) -> Result<u64, sqlx::Error> {
    executor.execute(sql).await.map(|done| done.rows_affected())
}

async fn insert_account(pool: &PgPool, owner: &str, currency: &str, balance: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO accounts.accounts (account_id, owner, currency, balance, opening_balance) \
         VALUES ($1, $2, $3, $4::numeric, $4::numeric)",
    )
    .bind(id)
    .bind(owner)
    .bind(currency)
    .bind(balance)
    .execute(pool)
    .await
    .expect("insert account");
    id
}

async fn try_insert_payment<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    payment_id: Uuid,
    from: Uuid,
    to: Uuid,
    amount: &str,
) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO payments.transactions (payment_id, subject, from_account, to_account, amount, currency) \
         VALUES ($1, 'alice', $2, $3, $4::numeric, 'EUR')",
    )
    .bind(payment_id)
    .bind(from)
    .bind(to)
    .bind(amount)
    .execute(executor)
    .await
    .map(|done| done.rows_affected())
}

async fn insert_payment(pool: &PgPool) -> Uuid {
    let id = Uuid::new_v4();
    try_insert_payment(pool, id, Uuid::new_v4(), Uuid::new_v4(), "10.00").await.expect("insert payment");
    id
}

/// The legal protocol: record the transition, then apply it, in one transaction.
async fn transition(
    pool: &PgPool,
    payment_id: Uuid,
    from: &str,
    to: &str,
    failure_reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO payments.transitions (payment_id, from_status, to_status, cause) VALUES ($1, $2, $3, 'test')",
    )
    .bind(payment_id)
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE payments.transactions SET status = $2, failure_reason = $3, updated_at = now() WHERE payment_id = $1",
    )
    .bind(payment_id)
    .bind(to)
    .bind(failure_reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

async fn set_status(
    pool: &PgPool,
    payment_id: Uuid,
    to: &str,
    failure_reason: Option<&str>,
) -> Result<u64, sqlx::Error> {
    sqlx::query("UPDATE payments.transactions SET status = $2, failure_reason = $3 WHERE payment_id = $1")
        .bind(payment_id)
        .bind(to)
        .bind(failure_reason)
        .execute(pool)
        .await
        .map(|done| done.rows_affected())
}

async fn try_record_transition(pool: &PgPool, payment_id: Uuid, from: &str, to: &str) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO payments.transitions (payment_id, from_status, to_status, cause) VALUES ($1, $2, $3, 'test')",
    )
    .bind(payment_id)
    .bind(from)
    .bind(to)
    .execute(pool)
    .await
    .map(|done| done.rows_affected())
}

async fn insert_processed<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    event_id: Uuid,
    payment_id: Uuid,
    outcome: &str,
) -> Result<u64, sqlx::Error> {
    let reason = (outcome == "FAILED").then_some("insufficient_funds");
    sqlx::query(
        "INSERT INTO accounts.processed_events (event_id, payment_id, outcome, failure_reason) VALUES ($1, $2, $3, $4)",
    )
    .bind(event_id)
    .bind(payment_id)
    .bind(outcome)
    .bind(reason)
    .execute(executor)
    .await
    .map(|done| done.rows_affected())
}

async fn insert_entry<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    payment_id: Uuid,
    account_id: Uuid,
    direction: &str,
    amount: &str,
    currency: &str,
) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO accounts.ledger_entries (payment_id, account_id, direction, amount, currency) \
         VALUES ($1, $2, $3, $4::numeric, $5)",
    )
    .bind(payment_id)
    .bind(account_id)
    .bind(direction)
    .bind(amount)
    .bind(currency)
    .execute(executor)
    .await
    .map(|done| done.rows_affected())
}

/// A correct settlement of `amount` EUR from `from` to `to`, as the account service writes it.
async fn settle(pool: &PgPool, payment_id: Uuid, from: Uuid, to: Uuid, amount: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    insert_processed(&mut *tx, Uuid::new_v4(), payment_id, "COMPLETED").await?;
    let debited = sqlx::query("UPDATE accounts.accounts SET balance = balance - $2::numeric WHERE account_id = $1")
        .bind(from)
        .bind(amount)
        .execute(&mut *tx)
        .await?;
    assert_eq!(debited.rows_affected(), 1);
    sqlx::query("UPDATE accounts.accounts SET balance = balance + $2::numeric WHERE account_id = $1")
        .bind(to)
        .bind(amount)
        .execute(&mut *tx)
        .await?;
    insert_entry(&mut *tx, payment_id, from, "DEBIT", amount, "EUR").await?;
    insert_entry(&mut *tx, payment_id, to, "CREDIT", amount, "EUR").await?;
    tx.commit().await
}

async fn insert_outbox(pool: &PgPool, schema: &str, event_id: Uuid, topic: &str) -> Result<u64, sqlx::Error> {
    let sql = format!("INSERT INTO {schema}.outbox (event_id, topic, key, payload) VALUES ($1, $2, $3, '\\x01')");
    sqlx::query(&sql)
        .bind(event_id)
        .bind(topic)
        .bind(event_id.to_string())
        .execute(pool)
        .await
        .map(|done| done.rows_affected())
}

macro_rules! test_db {
    () => {
        match TestDb::new().await {
            Some(db) => db,
            None => return,
        }
    };
}

// ---- accounts: balances and the ledger ----

#[tokio::test]
async fn negative_balance_is_rejected_by_the_check() {
    let db = test_db!();
    let account = insert_account(&db.pool, "alice", "EUR", "10.00").await;

    let overdraw = sqlx::query("UPDATE accounts.accounts SET balance = balance - 10.01 WHERE account_id = $1")
        .bind(account)
        .execute(&db.pool)
        .await;
    assert_rejected(overdraw, CHECK_VIOLATION, "accounts_balance_non_negative");

    let opened_negative = sqlx::query(
        "INSERT INTO accounts.accounts (account_id, owner, currency, balance, opening_balance) \
         VALUES ($1, 'bob', 'EUR', -0.01, 0)",
    )
    .bind(Uuid::new_v4())
    .execute(&db.pool)
    .await;
    assert_rejected(opened_negative, CHECK_VIOLATION, "accounts_balance_non_negative");

    let drained = sqlx::query("UPDATE accounts.accounts SET balance = balance - 10.00 WHERE account_id = $1")
        .bind(account)
        .execute(&db.pool)
        .await;
    assert_eq!(drained.unwrap().rows_affected(), 1, "draining to exactly zero is allowed");
}

#[tokio::test]
async fn duplicate_processed_event_id_is_rejected() {
    let db = test_db!();
    let event = Uuid::new_v4();
    insert_processed(&db.pool, event, Uuid::new_v4(), "FAILED").await.unwrap();
    let redelivered = insert_processed(&db.pool, event, Uuid::new_v4(), "FAILED").await;
    assert_rejected(redelivered, UNIQUE_VIOLATION, "processed_events_pkey");
}

#[tokio::test]
async fn second_settlement_of_the_same_payment_is_rejected() {
    let db = test_db!();
    let alice = insert_account(&db.pool, "alice", "EUR", "100.00").await;
    let bob = insert_account(&db.pool, "bob", "EUR", "0").await;
    let payment = Uuid::new_v4();
    settle(&db.pool, payment, alice, bob, "30.00").await.expect("first settlement");

    // The same payment carried by another event id (e.g. re-published by a second relay).
    let again = settle(&db.pool, payment, alice, bob, "30.00").await;
    assert_rejected(again, UNIQUE_VIOLATION, "processed_events_payment_unique");

    let balance: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT balance FROM accounts.accounts WHERE account_id = $1")
            .bind(alice)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(balance, rust_decimal::Decimal::new(7000, 2), "the rejected settlement moved no money");
}

#[tokio::test]
async fn second_debit_of_the_same_payment_is_rejected() {
    let db = test_db!();
    let alice = insert_account(&db.pool, "alice", "EUR", "100.00").await;
    let bob = insert_account(&db.pool, "bob", "EUR", "0").await;
    let carol = insert_account(&db.pool, "carol", "EUR", "100.00").await;
    let payment = Uuid::new_v4();
    settle(&db.pool, payment, alice, bob, "30.00").await.unwrap();

    let second_debit = insert_entry(&db.pool, payment, carol, "DEBIT", "30.00", "EUR").await;
    assert_rejected(second_debit, UNIQUE_VIOLATION, "ledger_entries_one_per_direction");
}

#[tokio::test]
async fn ledger_entry_for_a_nonexistent_account_is_rejected_by_the_foreign_key() {
    let db = test_db!();
    let entry = insert_entry(&db.pool, Uuid::new_v4(), Uuid::new_v4(), "DEBIT", "1.00", "EUR").await;
    assert_rejected(entry, FOREIGN_KEY_VIOLATION, "ledger_entries_account_fkey");
}

#[tokio::test]
async fn ledger_entry_in_another_currency_than_its_account_is_rejected() {
    let db = test_db!();
    let account = insert_account(&db.pool, "alice", "TRY", "100.00").await;
    let entry = insert_entry(&db.pool, Uuid::new_v4(), account, "DEBIT", "1.00", "EUR").await;
    assert_rejected(entry, FOREIGN_KEY_VIOLATION, "ledger_entries_account_fkey");
}

#[tokio::test]
async fn unbalanced_ledger_is_rejected_at_commit() {
    let db = test_db!();
    let alice = insert_account(&db.pool, "alice", "EUR", "100.00").await;
    let bob = insert_account(&db.pool, "bob", "EUR", "0").await;

    // A debit without its credit.
    let payment = Uuid::new_v4();
    let mut tx = db.pool.begin().await.unwrap();
    insert_processed(&mut *tx, Uuid::new_v4(), payment, "COMPLETED").await.unwrap();
    insert_entry(&mut *tx, payment, alice, "DEBIT", "5.00", "EUR").await.unwrap();
    assert_rejected(tx.commit().await, CHECK_VIOLATION, "ledger_entries_balanced");

    // A credit larger than its debit: money created.
    let payment = Uuid::new_v4();
    let mut tx = db.pool.begin().await.unwrap();
    insert_processed(&mut *tx, Uuid::new_v4(), payment, "COMPLETED").await.unwrap();
    insert_entry(&mut *tx, payment, alice, "DEBIT", "5.00", "EUR").await.unwrap();
    insert_entry(&mut *tx, payment, bob, "CREDIT", "5.01", "EUR").await.unwrap();
    assert_rejected(tx.commit().await, CHECK_VIOLATION, "ledger_entries_balanced");

    // Debit and credit on the same account.
    let payment = Uuid::new_v4();
    let mut tx = db.pool.begin().await.unwrap();
    insert_processed(&mut *tx, Uuid::new_v4(), payment, "COMPLETED").await.unwrap();
    insert_entry(&mut *tx, payment, alice, "DEBIT", "5.00", "EUR").await.unwrap();
    insert_entry(&mut *tx, payment, alice, "CREDIT", "5.00", "EUR").await.unwrap();
    assert_rejected(tx.commit().await, CHECK_VIOLATION, "ledger_entries_balanced");
}

#[tokio::test]
async fn ledger_entries_of_a_failed_or_unrecorded_settlement_are_rejected() {
    let db = test_db!();
    let alice = insert_account(&db.pool, "alice", "EUR", "100.00").await;
    let bob = insert_account(&db.pool, "bob", "EUR", "0").await;

    let payment = Uuid::new_v4();
    let mut tx = db.pool.begin().await.unwrap();
    insert_processed(&mut *tx, Uuid::new_v4(), payment, "FAILED").await.unwrap();
    insert_entry(&mut *tx, payment, alice, "DEBIT", "5.00", "EUR").await.unwrap();
    insert_entry(&mut *tx, payment, bob, "CREDIT", "5.00", "EUR").await.unwrap();
    assert_rejected(tx.commit().await, CHECK_VIOLATION, "ledger_entries_balanced");

    let payment = Uuid::new_v4();
    let mut tx = db.pool.begin().await.unwrap();
    insert_entry(&mut *tx, payment, alice, "DEBIT", "5.00", "EUR").await.unwrap();
    insert_entry(&mut *tx, payment, bob, "CREDIT", "5.00", "EUR").await.unwrap();
    let committed = tx.commit().await;
    let code =
        committed.as_ref().err().and_then(|e| e.as_database_error()).and_then(|d| d.code().map(|c| c.into_owned()));
    assert!(
        matches!(code.as_deref(), Some(FOREIGN_KEY_VIOLATION | CHECK_VIOLATION)),
        "ledger rows without a settlement record were committed: {committed:?}"
    );
}

#[tokio::test]
async fn correct_settlement_is_accepted() {
    let db = test_db!();
    let alice = insert_account(&db.pool, "alice", "EUR", "100.00").await;
    let bob = insert_account(&db.pool, "bob", "EUR", "0").await;
    settle(&db.pool, Uuid::new_v4(), alice, bob, "99.995").await.expect("a balanced settlement commits");
}

// ---- payments: amounts, accounts, the state machine, idempotency ----

#[tokio::test]
async fn amount_of_zero_or_less_is_rejected() {
    let db = test_db!();
    for amount in ["0", "0.000", "-0.01", "-5"] {
        let result = try_insert_payment(&db.pool, Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), amount).await;
        assert_rejected(result, CHECK_VIOLATION, "transactions_amount_positive");
    }
    let alice = insert_account(&db.pool, "alice", "EUR", "1.00").await;
    for amount in ["0", "-1.00"] {
        let entry = insert_entry(&db.pool, Uuid::new_v4(), alice, "CREDIT", amount, "EUR").await;
        assert_rejected(entry, CHECK_VIOLATION, "ledger_entries_amount_positive");
    }
}

#[tokio::test]
async fn amount_with_more_than_three_decimals_is_rejected_not_rounded() {
    let db = test_db!();
    let result = try_insert_payment(&db.pool, Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), "10.0001").await;
    assert_rejected(result, CHECK_VIOLATION, "transactions_amount_scale");
    let trailing_zeros =
        try_insert_payment(&db.pool, Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), "10.500000").await;
    assert_eq!(trailing_zeros.unwrap(), 1, "trailing zeros are not extra precision");
}

#[tokio::test]
async fn payment_from_an_account_to_itself_is_rejected() {
    let db = test_db!();
    let account = Uuid::new_v4();
    let result = try_insert_payment(&db.pool, Uuid::new_v4(), account, account, "1.00").await;
    assert_rejected(result, CHECK_VIOLATION, "transactions_distinct_accounts");
}

#[tokio::test]
async fn malformed_currency_is_rejected() {
    let db = test_db!();
    for currency in ["eur", "EU", "E1R"] {
        let result = sqlx::query(
            "INSERT INTO accounts.accounts (account_id, owner, currency, balance, opening_balance) VALUES ($1, 'a', $2, 0, 0)",
        )
        .bind(Uuid::new_v4())
        .bind(currency)
        .execute(&db.pool)
        .await;
        assert_rejected(result, CHECK_VIOLATION, "accounts_currency_format");
    }
}

#[tokio::test]
async fn payment_is_created_pending_only() {
    let db = test_db!();
    let result = sqlx::query(
        "INSERT INTO payments.transactions (payment_id, subject, from_account, to_account, amount, currency, status) \
         VALUES ($1, 'alice', $2, $3, 1, 'EUR', 'COMPLETED')",
    )
    .bind(Uuid::new_v4())
    .bind(Uuid::new_v4())
    .bind(Uuid::new_v4())
    .execute(&db.pool)
    .await;
    assert_rejected(result, CHECK_VIOLATION, "transactions_created_pending");
}

#[tokio::test]
async fn completed_to_pending_is_rejected_by_the_store() {
    let db = test_db!();
    let payment = insert_payment(&db.pool).await;
    transition(&db.pool, payment, "PENDING", "COMPLETED", None).await.expect("PENDING -> COMPLETED is legal");

    assert_rejected(
        set_status(&db.pool, payment, "PENDING", None).await,
        CHECK_VIOLATION,
        "transactions_legal_transition",
    );
    assert_rejected(
        try_record_transition(&db.pool, payment, "COMPLETED", "PENDING").await,
        CHECK_VIOLATION,
        "transitions_legal",
    );
    assert_rejected(
        transition(&db.pool, payment, "COMPLETED", "PENDING", None).await,
        CHECK_VIOLATION,
        "transitions_legal",
    );
}

#[tokio::test]
async fn failed_to_completed_is_rejected_by_the_store() {
    let db = test_db!();
    let payment = insert_payment(&db.pool).await;
    transition(&db.pool, payment, "PENDING", "FAILED", Some("insufficient_funds"))
        .await
        .expect("PENDING -> FAILED is legal");

    assert_rejected(
        set_status(&db.pool, payment, "COMPLETED", None).await,
        CHECK_VIOLATION,
        "transactions_legal_transition",
    );
    assert_rejected(
        try_record_transition(&db.pool, payment, "FAILED", "COMPLETED").await,
        CHECK_VIOLATION,
        "transitions_legal",
    );
}

#[tokio::test]
async fn payment_leaves_pending_only_once() {
    let db = test_db!();
    let payment = insert_payment(&db.pool).await;
    transition(&db.pool, payment, "PENDING", "COMPLETED", None).await.unwrap();
    // A contradicting outcome for the same payment, recorded as if it were still PENDING.
    assert_rejected(
        try_record_transition(&db.pool, payment, "PENDING", "FAILED").await,
        UNIQUE_VIOLATION,
        "transitions_once_per_state",
    );
}

#[tokio::test]
async fn status_change_without_a_recorded_transition_is_rejected() {
    let db = test_db!();
    let payment = insert_payment(&db.pool).await;
    assert_rejected(
        set_status(&db.pool, payment, "COMPLETED", None).await,
        CHECK_VIOLATION,
        "transactions_transition_recorded",
    );
}

#[tokio::test]
async fn recorded_transition_that_is_not_applied_is_rejected_at_commit() {
    let db = test_db!();
    let payment = insert_payment(&db.pool).await;
    assert_rejected(
        try_record_transition(&db.pool, payment, "PENDING", "COMPLETED").await,
        CHECK_VIOLATION,
        "transitions_applied",
    );
}

#[tokio::test]
async fn failure_reason_is_present_exactly_when_failed() {
    let db = test_db!();
    let payment = insert_payment(&db.pool).await;
    assert_rejected(
        transition(&db.pool, payment, "PENDING", "FAILED", None).await,
        CHECK_VIOLATION,
        "transactions_failure_reason_iff_failed",
    );
    assert_rejected(
        transition(&db.pool, payment, "PENDING", "COMPLETED", Some("insufficient_funds")).await,
        CHECK_VIOLATION,
        "transactions_failure_reason_iff_failed",
    );
}

#[tokio::test]
async fn agreed_terms_of_a_payment_never_change() {
    let db = test_db!();
    let payment = insert_payment(&db.pool).await;
    for change in ["amount = 1000000", "to_account = gen_random_uuid()", "currency = 'USD'", "subject = 'mallory'"] {
        let sql = format!("UPDATE payments.transactions SET {change} WHERE payment_id = $1");
        let result = sqlx::query(&sql).bind(payment).execute(&db.pool).await;
        assert_rejected(result, CHECK_VIOLATION, "transactions_immutable");
    }
}

#[tokio::test]
async fn duplicate_subject_and_idempotency_key_is_rejected() {
    let db = test_db!();
    let claim = |subject: &'static str| {
        sqlx::query(
            "INSERT INTO payments.idempotency_keys (subject, key, request_fingerprint, state, locked_until) \
             VALUES ($1, 'order-42', sha256('request'), 'IN_FLIGHT', now() + interval '30 seconds')",
        )
        .bind(subject)
        .execute(&db.pool)
    };
    claim("alice").await.expect("first claim");
    assert_rejected(claim("alice").await, UNIQUE_VIOLATION, "idempotency_keys_pkey");
    claim("bob").await.expect("keys are scoped per subject");
}

#[tokio::test]
async fn idempotency_key_kept_less_than_24_hours_is_rejected() {
    let db = test_db!();
    let result = sqlx::query(
        "INSERT INTO payments.idempotency_keys (subject, key, request_fingerprint, state, locked_until, expires_at) \
         VALUES ('alice', 'k', sha256('r'), 'IN_FLIGHT', now(), now() + interval '23 hours')",
    )
    .execute(&db.pool)
    .await;
    assert_rejected(result, CHECK_VIOLATION, "idempotency_keys_kept_24h");
}

#[tokio::test]
async fn one_payment_cannot_answer_two_idempotency_keys() {
    let db = test_db!();
    let payment = insert_payment(&db.pool).await;
    let complete = |key: &'static str| {
        sqlx::query(
            "INSERT INTO payments.idempotency_keys (subject, key, request_fingerprint, state, response, payment_id) \
             VALUES ('alice', $1, sha256('r'), 'COMPLETED', '\\x7b7d', $2)",
        )
        .bind(key)
        .bind(payment)
        .execute(&db.pool)
    };
    complete("a").await.unwrap();
    assert_rejected(complete("b").await, UNIQUE_VIOLATION, "idempotency_keys_payment_unique");
}

// ---- outboxes and notifications ----

#[tokio::test]
async fn duplicate_outbox_event_id_is_rejected() {
    let db = test_db!();
    for (schema, topic) in [("payments", "payment.initiated"), ("accounts", "payment.completed")] {
        let event = Uuid::new_v4();
        insert_outbox(&db.pool, schema, event, topic).await.unwrap();
        assert_rejected(
            insert_outbox(&db.pool, schema, event, topic).await,
            UNIQUE_VIOLATION,
            "outbox_event_id_unique",
        );
    }
}

#[tokio::test]
async fn outbox_accepts_only_its_services_topics() {
    let db = test_db!();
    for (schema, foreign_topic) in [("payments", "payment.completed"), ("accounts", "payment.initiated")] {
        let result = insert_outbox(&db.pool, schema, Uuid::new_v4(), foreign_topic).await;
        assert_rejected(result, CHECK_VIOLATION, "outbox_topic_known");
    }
}

#[tokio::test]
async fn duplicate_notification_event_id_is_rejected() {
    let db = test_db!();
    let event = Uuid::new_v4();
    let record = || {
        sqlx::query(
            "INSERT INTO notifications.notifications (event_id, payment_id, kind, payload) \
             VALUES ($1, $2, 'payment.completed', '{}')",
        )
        .bind(event)
        .bind(Uuid::new_v4())
        .execute(&db.pool)
    };
    record().await.unwrap();
    assert_rejected(record().await, UNIQUE_VIOLATION, "notifications_event_id_unique");
}

// ---- roles: each service touches only its schema ----

async fn tables_of(db: &TestDb, schema: &str) -> Vec<String> {
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT tablename::text FROM pg_catalog.pg_tables WHERE schemaname = $1 ORDER BY 1")
            .bind(schema)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(!tables.is_empty(), "schema {schema} has no tables");
    tables
}

/// `role` can read every table of `own_schema` and is denied every table of the other schemas
/// and the migrations' bookkeeping in `public`.
async fn assert_confined(db: &TestDb, conn: &mut PgConnection, role: &str, own_schema: &str) {
    for schema in SCHEMAS {
        for table in tables_of(db, schema).await {
            let sql = format!("SELECT count(*) FROM {schema}.{table}");
            let read = execute(&mut *conn, &sql).await;
            if schema == own_schema {
                read.unwrap_or_else(|e| panic!("{role} cannot read its own {schema}.{table}: {e}"));
            } else {
                assert_permission_denied(read, &format!("{role} reads {schema}.{table}"));
                let sql = format!("DELETE FROM {schema}.{table}");
                assert_permission_denied(execute(&mut *conn, &sql).await, &format!("{role} deletes {schema}.{table}"));
            }
        }
    }
    assert_permission_denied(
        execute(&mut *conn, "SELECT count(*) FROM public._sqlx_migrations").await,
        &format!("{role} reads the migrations table"),
    );
}

#[tokio::test]
async fn payment_service_reads_and_writes_only_the_payments_schema() {
    let db = test_db!();
    let mut conn = db.connect_as("payment_service").await;
    assert_confined(&db, &mut conn, "payment_service", "payments").await;

    // Unqualified names resolve to its schema (search_path); the whole happy path is permitted.
    let payment = Uuid::new_v4();
    let mut tx = conn.begin().await.unwrap();
    try_insert_payment(&mut *tx, payment, Uuid::new_v4(), Uuid::new_v4(), "10.00").await.unwrap();
    sqlx::query("INSERT INTO outbox (event_id, topic, key, payload) VALUES ($1, 'payment.initiated', $2, '\\x01')")
        .bind(Uuid::new_v4())
        .bind(payment.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (subject, key, request_fingerprint, state, response, payment_id) \
         VALUES ('alice', 'k1', sha256('r'), 'COMPLETED', '\\x01', $1)",
    )
    .bind(payment)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("INSERT INTO transitions (payment_id, from_status, to_status, cause) VALUES ($1, 'PENDING', 'COMPLETED', 'settled')")
        .bind(payment)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE transactions SET status = 'COMPLETED', updated_at = now() WHERE payment_id = $1")
        .bind(payment)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let published =
        execute(&mut conn, "UPDATE outbox SET published_at = now() WHERE published_at IS NULL").await.unwrap();
    assert_eq!(published, 1);
    execute(&mut conn, "DELETE FROM idempotency_keys WHERE expires_at < now()").await.unwrap();
}

#[tokio::test]
async fn account_service_reads_and_writes_only_the_accounts_schema() {
    let db = test_db!();
    let mut conn = db.connect_as("account_service").await;
    assert_confined(&db, &mut conn, "account_service", "accounts").await;

    let (alice, bob, payment) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for (id, owner, balance) in [(alice, "alice", "10.00"), (bob, "bob", "0")] {
        sqlx::query("INSERT INTO accounts (account_id, owner, currency, balance, opening_balance) VALUES ($1, $2, 'EUR', $3::numeric, $3::numeric)")
            .bind(id)
            .bind(owner)
            .bind(balance)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let mut tx = conn.begin().await.unwrap();
    insert_processed(&mut *tx, Uuid::new_v4(), payment, "COMPLETED").await.unwrap();
    for (id, delta) in [(alice, "-4.00"), (bob, "4.00")] {
        sqlx::query("UPDATE accounts SET balance = balance + $2::numeric, updated_at = now() WHERE account_id = $1")
            .bind(id)
            .bind(delta)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    insert_entry(&mut *tx, payment, alice, "DEBIT", "4.00", "EUR").await.unwrap();
    insert_entry(&mut *tx, payment, bob, "CREDIT", "4.00", "EUR").await.unwrap();
    sqlx::query("INSERT INTO outbox (event_id, topic, key, payload) VALUES ($1, 'payment.completed', $2, '\\x01')")
        .bind(Uuid::new_v4())
        .bind(payment.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.expect("account_service settles within its schema");
    execute(&mut conn, "UPDATE outbox SET published_at = now()").await.unwrap();
}

#[tokio::test]
async fn notification_service_reads_and_writes_only_the_notifications_schema() {
    let db = test_db!();
    let mut conn = db.connect_as("notification_service").await;
    assert_confined(&db, &mut conn, "notification_service", "notifications").await;

    let inserted = sqlx::query(
        "INSERT INTO notifications (event_id, payment_id, kind, payload) VALUES ($1, $2, 'payment.failed', '{}') \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(Uuid::new_v4())
    .bind(Uuid::new_v4())
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(inserted.rows_affected(), 1);
}

#[tokio::test]
async fn service_roles_cannot_create_objects_or_temporary_tables() {
    let db = test_db!();
    for (schema, role) in securepay_core::topology::SCHEMAS {
        let mut conn = db.connect_as(role).await;
        for target in [schema, "public"] {
            let sql = format!("CREATE TABLE {target}.intruder (id int)");
            assert_permission_denied(execute(&mut conn, &sql).await, &format!("{role} creates a table in {target}"));
        }
        assert_permission_denied(
            execute(&mut conn, "CREATE TEMPORARY TABLE intruder (id int)").await,
            &format!("{role} creates a temporary table"),
        );
    }
}

#[tokio::test]
async fn service_roles_cannot_delete_or_rewrite_money_history() {
    let db = test_db!();
    let alice = insert_account(&db.pool, "alice", "EUR", "100.00").await;
    let bob = insert_account(&db.pool, "bob", "EUR", "0").await;
    settle(&db.pool, Uuid::new_v4(), alice, bob, "1.00").await.unwrap();
    let payment = insert_payment(&db.pool).await;
    transition(&db.pool, payment, "PENDING", "COMPLETED", None).await.unwrap();

    let mut account_service = db.connect_as("account_service").await;
    for sql in [
        "DELETE FROM accounts",
        "UPDATE accounts SET owner = 'mallory'",
        "UPDATE accounts SET opening_balance = opening_balance + 1",
        "UPDATE ledger_entries SET amount = amount * 2",
        "DELETE FROM ledger_entries",
        "UPDATE processed_events SET outcome = 'FAILED', failure_reason = 'x'",
        "DELETE FROM processed_events",
        "TRUNCATE ledger_entries",
    ] {
        assert_permission_denied(execute(&mut account_service, sql).await, &format!("account_service: {sql}"));
    }
    let mut payment_service = db.connect_as("payment_service").await;
    for sql in ["DELETE FROM transactions", "UPDATE transitions SET cause = 'rewritten'", "DELETE FROM transitions"] {
        assert_permission_denied(execute(&mut payment_service, sql).await, &format!("payment_service: {sql}"));
    }
}

// ---- migrations and set-up ----

#[tokio::test]
async fn migrations_are_idempotent() {
    let db = test_db!();
    MIGRATOR.run(&db.pool).await.expect("re-running the migrator is a no-op");
    // The role migration also tolerates running again in a database that already has everything
    // (roles are cluster-wide; every new database re-runs it).
    let roles = MIGRATOR.iter().next().expect("first migration");
    db.pool.execute(&*roles.sql).await.expect("re-run the role migration");

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM public._sqlx_migrations WHERE success")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied, MIGRATOR.iter().count() as i64);
}

#[tokio::test]
async fn setup_creates_the_database_and_lets_each_role_log_in() {
    let Some(admin_url) = component(var::PG_ADMIN_URL) else {
        return;
    };
    // Reuse this process's passwords so concurrent tests keep logging in.
    let passwords = role_passwords(&admin_url).await;
    let name = format!("securepay_test_{}", Uuid::new_v4().simple());
    let pool = PgPoolOptions::new().max_connections(1).connect_lazy_with(admin_options(&admin_url, &name).unwrap());
    let db = TestDb { admin_url: admin_url.clone(), name: name.clone(), pool };

    securepay_postgres::setup(&admin_url, &name, passwords).await.expect("setup");
    securepay_postgres::setup(&admin_url, &name, passwords).await.expect("setup is idempotent");
    for (_, role) in securepay_core::topology::SCHEMAS {
        db.connect_as(role).await;
    }

    let inserted = securepay_postgres::seed_demo(&admin_url, &name).await.expect("seed");
    assert_eq!(inserted, securepay_postgres::DEMO_ACCOUNTS.len() as u64);
    sqlx::query("UPDATE accounts.accounts SET balance = 0").execute(&db.pool).await.unwrap();
    assert_eq!(securepay_postgres::seed_demo(&admin_url, &name).await.expect("re-seed"), 0);
    let untouched: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts.accounts WHERE balance = 0")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(untouched, securepay_postgres::DEMO_ACCOUNTS.len() as i64, "re-seeding never resets a balance");
}

#[tokio::test]
async fn setup_refuses_a_weak_password_before_touching_the_cluster() {
    let weak = RolePasswords {
        payment_service: "short".into(),
        account_service: "long-enough-password".into(),
        notification_service: "long-enough-password".into(),
    };
    let result = securepay_postgres::setup("postgres://unused@127.0.0.1:1/postgres", "securepay", &weak).await;
    assert!(matches!(result, Err(securepay_postgres::SetupError::Password { role: "payment_service" })), "{result:?}");
}
