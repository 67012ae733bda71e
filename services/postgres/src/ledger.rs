//! `PgLedgerStore`: the account service's [`LedgerStore`] over the `accounts` schema, connected as
//! the `account_service` role (which may only move `balance`/`updated_at` and append everything else).
//!
//! One `settle` call is ONE transaction for the whole batch:
//! 1. lock every account the batch names, in `account_id` order (`FOR UPDATE`), so two batches
//!    touching the same accounts queue behind each other and can never deadlock on them;
//! 2. read which of the batch's events and payments were processed before (after the locks, so a
//!    settlement committed by the batch we waited for is seen);
//! 3. per request, in order: a seen event or payment is `Duplicate(first verdict)`; otherwise
//!    `securepay_core::ledger::verdict` decides against the locked balances (moved along by every
//!    earlier settlement of the batch);
//! 4. then ONE statement per table for the whole batch: the net balance change of each touched
//!    account (`UPDATE ... FROM unnest`, a payer's only `WHERE balance + delta >= 0`; every touched
//!    row must be updated or the batch fails — the database wins over the model), the processed
//!    rows, the two ledger rows of each COMPLETED settlement, and the outcome events in batch order,
//!    each with its request's `outcome_headers` (its settling span's `traceparent`) as the row's
//!    `headers` object.
//!
//! A request the rule refuses (unknown account, currency mismatch, no funds) gets its FAILED verdict
//! and never aborts the batch. Deadlocks, serialization failures and a concurrent settlement of the
//! same event or payment abort the transaction; it is retried from scratch, at most
//! [`SETTLE_ATTEMPTS_MAX`] times, then reported as `Unavailable`. Nothing is half-written: the
//! schema's constraints (balance ≥ 0, one settlement per payment, balanced ledger checked at commit)
//! are the last guard.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use rust_decimal::Decimal;
use securepay_core::ids::{AccountId, Subject};
use securepay_core::ledger::{Account, Settled, verdict};
use securepay_core::money::Currency;
use securepay_core::payment::{FailureReason, Outcome};
use securepay_ports::{
    AccountView, LedgerStore, Outbox, OutboxEvent, PortError, PortResult, SettlementRequest, SettlementResult,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

/// Attempts of one batch's transaction before a deadlock/serialization failure is `Unavailable`.
pub const SETTLE_ATTEMPTS_MAX: u32 = 8;
/// Most outbox events one `unpublished`/`mark_published` call handles.
pub const OUTBOX_BATCH_LEN_MAX: usize = 1024;
/// How long a caller waits for a pooled connection before the store is `Unavailable`.
pub const ACQUIRE_TIMEOUT_MS: u64 = 5_000;
/// Longest a statement (a row-lock wait included) may run before the store is `Unavailable`.
pub const STATEMENT_TIMEOUT_MS: u64 = 5_000;

const COMPONENT: &str = "postgresql";

/// The pool every store connects with: at most `connections_max` connections with `options` (the
/// service's role), a [`STATEMENT_TIMEOUT_MS`] statement timeout on each and an
/// [`ACQUIRE_TIMEOUT_MS`] bound on waiting for one, so a stuck database surfaces as an error.
pub(crate) async fn service_pool(options: PgConnectOptions, connections_max: u32) -> Result<PgPool, sqlx::Error> {
    assert!(connections_max > 0, "a pool needs at least one connection");
    let options = options.options([("statement_timeout", STATEMENT_TIMEOUT_MS.to_string())]);
    PgPoolOptions::new()
        .max_connections(connections_max)
        .acquire_timeout(std::time::Duration::from_millis(ACQUIRE_TIMEOUT_MS))
        .connect_with(options)
        .await
}

/// The account service's store of record in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgLedgerStore {
    pool: PgPool,
}

impl PgLedgerStore {
    /// Over an existing pool; its connections must log in as `account_service`.
    pub fn new(pool: PgPool) -> PgLedgerStore {
        PgLedgerStore { pool }
    }

    /// A pool of at most `connections_max` connections with `options` (role `account_service`),
    /// each with a [`STATEMENT_TIMEOUT_MS`] statement timeout.
    pub async fn connect(options: PgConnectOptions, connections_max: u32) -> PortResult<PgLedgerStore> {
        let pool = service_pool(options, connections_max).await.map_err(port_error)?;
        Ok(PgLedgerStore { pool })
    }

    /// One `SELECT 1` on the pool (readiness checks): `Unavailable` when PostgreSQL does not answer.
    pub async fn ping(&self) -> PortResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(drop).map_err(port_error)
    }

    async fn settle_once(
        &self,
        batch: &[SettlementRequest],
        now: OffsetDateTime,
    ) -> Result<Vec<SettlementResult>, Failure> {
        let mut tx = self.pool.begin().await?;
        let mut accounts = lock_accounts(&mut tx, batch).await?;
        let mut seen = Seen::load(&mut tx, batch).await?;
        let mut writes = Writes::default();
        let mut results = Vec::with_capacity(batch.len());
        for request in batch {
            let settled = match seen.verdict_of(request) {
                Some(first) => Settled::Duplicate(first),
                None => {
                    let outcome = writes.settle_new(&mut accounts, request, now);
                    seen.record(request, outcome);
                    Settled::New(outcome)
                }
            };
            results.push(SettlementResult { event_id: request.event_id, settled });
        }
        writes.apply(&mut tx, now).await?;
        tx.commit().await?;
        Ok(results)
    }
}

#[async_trait]
impl LedgerStore for PgLedgerStore {
    async fn settle(&self, batch: &[SettlementRequest], now: OffsetDateTime) -> PortResult<Vec<SettlementResult>> {
        securepay_ports::ledger::check_batch(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut attempt = 1;
        loop {
            match self.settle_once(batch, now).await {
                Ok(results) => {
                    debug_assert_eq!(results.len(), batch.len());
                    return Ok(results);
                }
                Err(Failure::Sql(e)) if is_retryable(&e) && attempt < SETTLE_ATTEMPTS_MAX => attempt += 1,
                Err(Failure::Sql(e)) if is_retryable(&e) => {
                    return Err(PortError::Unavailable { component: COMPONENT });
                }
                Err(Failure::Sql(e)) => return Err(port_error(e)),
                Err(Failure::Corrupt(what)) => return Err(PortError::Corrupt { what }),
            }
        }
    }

    async fn account(&self, id: AccountId) -> PortResult<Option<AccountView>> {
        let row = sqlx::query("SELECT owner, currency, balance FROM accounts.accounts WHERE account_id = $1")
            .bind(id.as_uuid())
            .fetch_optional(&self.pool)
            .await
            .map_err(port_error)?;
        let Some(row) = row else { return Ok(None) };
        let owner: String = row.try_get("owner").map_err(port_error)?;
        let currency: String = row.try_get("currency").map_err(port_error)?;
        let balance: Decimal = row.try_get("balance").map_err(port_error)?;
        Ok(Some(AccountView {
            id,
            owner: Subject::parse(&owner).map_err(|_| corrupt("account owner"))?,
            currency: parse_currency(&currency)?,
            balance,
        }))
    }

    async fn accounts(&self, ids: &[AccountId]) -> PortResult<Vec<Option<AccountView>>> {
        if ids.len() > securepay_ports::ledger::ACCOUNTS_LEN_MAX {
            return Err(PortError::Refused { rule: "accounts_len_max" });
        }
        let uuids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
        // One statement, one snapshot.
        let rows = sqlx::query(
            "SELECT account_id, owner, currency, balance FROM accounts.accounts WHERE account_id = ANY($1)",
        )
        .bind(&uuids)
        .fetch_all(&self.pool)
        .await
        .map_err(port_error)?;
        let mut found = std::collections::BTreeMap::new();
        for row in &rows {
            let id = AccountId::from_uuid(row.try_get("account_id").map_err(port_error)?);
            let owner: String = row.try_get("owner").map_err(port_error)?;
            let currency: String = row.try_get("currency").map_err(port_error)?;
            let balance: Decimal = row.try_get("balance").map_err(port_error)?;
            let view = AccountView {
                id,
                owner: Subject::parse(&owner).map_err(|_| corrupt("account owner"))?,
                currency: parse_currency(&currency)?,
                balance,
            };
            found.insert(id, view);
        }
        Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
    }
}

#[async_trait]
impl Outbox for PgLedgerStore {
    async fn unpublished(&self, limit: usize) -> PortResult<Vec<OutboxEvent>> {
        let limit = limit.min(OUTBOX_BATCH_LEN_MAX);
        let rows = sqlx::query(
            "SELECT id, topic, key, payload, headers FROM accounts.outbox \
             WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(i64::try_from(limit).expect("OUTBOX_BATCH_LEN_MAX fits i64"))
        .fetch_all(&self.pool)
        .await
        .map_err(port_error)?;
        rows.iter()
            .map(|row| {
                let headers: HeadersJson = row.try_get("headers").map_err(|_| corrupt("outbox headers"))?;
                Ok(OutboxEvent {
                    sequence: row.try_get("id").map_err(port_error)?,
                    topic: row.try_get("topic").map_err(port_error)?,
                    key: row.try_get("key").map_err(port_error)?,
                    payload: row.try_get("payload").map_err(port_error)?,
                    headers: headers.0.into_iter().collect(),
                })
            })
            .collect()
    }

    async fn mark_published(&self, sequences: &[i64]) -> PortResult<()> {
        if sequences.len() > OUTBOX_BATCH_LEN_MAX {
            return Err(PortError::Refused { rule: "outbox_batch_len_max" });
        }
        sqlx::query("UPDATE accounts.outbox SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL")
            .bind(sequences)
            .execute(&self.pool)
            .await
            .map_err(port_error)?;
        Ok(())
    }
}

/// Locks every account named by the batch, in `account_id` order, and returns them as the ledger
/// model sees them. Absent ids are simply missing (the verdict says `unknown_account`).
async fn lock_accounts(
    tx: &mut Transaction<'_, Postgres>,
    batch: &[SettlementRequest],
) -> Result<BTreeMap<AccountId, Account>, Failure> {
    let ids: BTreeSet<Uuid> = batch.iter().flat_map(|r| [r.transfer.from.as_uuid(), r.transfer.to.as_uuid()]).collect();
    let ids: Vec<Uuid> = ids.into_iter().collect();
    let rows = sqlx::query(
        "SELECT account_id, currency, balance FROM accounts.accounts \
         WHERE account_id = ANY($1) ORDER BY account_id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut accounts = BTreeMap::new();
    for row in rows {
        let id: Uuid = row.try_get("account_id")?;
        let currency: String = row.try_get("currency")?;
        let balance: Decimal = row.try_get("balance")?;
        let currency = parse_currency(&currency).map_err(|_| Failure::Corrupt("account currency".into()))?;
        accounts.insert(AccountId::from_uuid(id), Account { currency, balance });
    }
    Ok(accounts)
}

/// An outbox row's headers as its `jsonb` object: one value per header name (the last given).
type HeadersJson = Json<BTreeMap<String, String>>;

/// The writes of a batch's new settlements, gathered while deciding them in order, then written
/// as one statement per table ([`Writes::apply`]): a batch costs five statements, not five per
/// payment.
#[derive(Default)]
struct Writes {
    /// Net balance change per account touched by a COMPLETED settlement.
    deltas: BTreeMap<AccountId, Decimal>,
    processed: Vec<(Uuid, Uuid, &'static str, Option<&'static str>)>,
    /// (payment, account, direction, amount, currency).
    entries: Vec<(Uuid, Uuid, &'static str, Decimal, &'static str)>,
    /// (event id, topic, key, payload, headers).
    outbox: Vec<(Uuid, &'static str, String, Vec<u8>, HeadersJson)>,
}

impl Writes {
    /// Decides one request not seen before against `accounts` (the locked balances, moved along
    /// with every earlier settlement of the batch) and records what it writes; returns its verdict.
    fn settle_new(
        &mut self,
        accounts: &mut BTreeMap<AccountId, Account>,
        request: &SettlementRequest,
        now: OffsetDateTime,
    ) -> Outcome {
        let transfer = request.transfer;
        let amount = transfer.amount.value();
        let outcome = verdict(accounts.get(&transfer.from), accounts.get(&transfer.to), transfer.amount);
        if outcome == Outcome::Completed {
            let payer = accounts.get_mut(&transfer.from).expect("verdict saw the payer");
            payer.balance -= amount;
            assert!(payer.balance >= Decimal::ZERO, "a debit made a balance negative");
            accounts.get_mut(&transfer.to).expect("verdict saw the payee").balance += amount;
            *self.deltas.entry(transfer.from).or_default() -= amount;
            *self.deltas.entry(transfer.to).or_default() += amount;
            let (payment, currency) = (transfer.payment_id.as_uuid(), transfer.amount.currency().code());
            self.entries.push((payment, transfer.from.as_uuid(), "DEBIT", amount, currency));
            self.entries.push((payment, transfer.to.as_uuid(), "CREDIT", amount, currency));
        }
        let (outcome_text, failure_reason) = match outcome {
            Outcome::Completed => ("COMPLETED", None),
            Outcome::Failed(reason) => ("FAILED", Some(reason.code())),
        };
        self.processed.push((request.event_id.as_uuid(), transfer.payment_id.as_uuid(), outcome_text, failure_reason));
        let event = request.outcome_event(outcome, now);
        self.outbox.push((
            event.event_id.as_uuid(),
            event.topic(),
            event.payment_id.to_string(),
            securepay_proto::convert::encode_settled(&event),
            // The settling span's trace context: the outcome's consumers continue the payment's trace.
            Json(request.outcome_headers.iter().cloned().collect()),
        ));
        outcome
    }

    /// Writes everything gathered: the net balance moves — each payer's only `WHERE balance +
    /// delta >= 0`, and every touched row must be updated, or the batch fails (the locked balances
    /// and the decisions disagreed: the database wins) — then the processed rows, the ledger rows
    /// and the outcome events, each in batch order.
    async fn apply(self, tx: &mut Transaction<'_, Postgres>, now: OffsetDateTime) -> Result<(), Failure> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let moved: Vec<(Uuid, Decimal)> =
            self.deltas.iter().filter(|(_, d)| !d.is_zero()).map(|(id, d)| (id.as_uuid(), *d)).collect();
        if !moved.is_empty() {
            let updated = sqlx::query(
                "UPDATE accounts.accounts AS a SET balance = a.balance + d.delta, updated_at = $3 \
                 FROM unnest($1::uuid[], $2::numeric[]) AS d(account_id, delta) \
                 WHERE a.account_id = d.account_id AND a.balance + d.delta >= 0",
            )
            .bind(moved.iter().map(|(id, _)| *id).collect::<Vec<Uuid>>())
            .bind(moved.iter().map(|(_, d)| *d).collect::<Vec<Decimal>>())
            .bind(now)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            if updated != moved.len() as u64 {
                return Err(Failure::Corrupt("a locked balance changed under the settlement".into()));
            }
        }
        sqlx::query(
            "INSERT INTO accounts.processed_events (event_id, payment_id, outcome, failure_reason, processed_at) \
             SELECT event_id, payment_id, outcome, failure_reason, $5 \
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[]) AS p(event_id, payment_id, outcome, failure_reason)",
        )
        .bind(self.processed.iter().map(|p| p.0).collect::<Vec<Uuid>>())
        .bind(self.processed.iter().map(|p| p.1).collect::<Vec<Uuid>>())
        .bind(self.processed.iter().map(|p| p.2).collect::<Vec<&str>>())
        .bind(self.processed.iter().map(|p| p.3).collect::<Vec<Option<&str>>>())
        .bind(now)
        .execute(&mut **tx)
        .await?;
        if !self.entries.is_empty() {
            sqlx::query(
                "INSERT INTO accounts.ledger_entries (payment_id, account_id, direction, amount, currency, created_at) \
                 SELECT payment_id, account_id, direction, amount, currency, $6 \
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::numeric[], $5::text[]) WITH ORDINALITY \
                      AS e(payment_id, account_id, direction, amount, currency, n) \
                 ORDER BY n",
            )
            .bind(self.entries.iter().map(|e| e.0).collect::<Vec<Uuid>>())
            .bind(self.entries.iter().map(|e| e.1).collect::<Vec<Uuid>>())
            .bind(self.entries.iter().map(|e| e.2).collect::<Vec<&str>>())
            .bind(self.entries.iter().map(|e| e.3).collect::<Vec<Decimal>>())
            .bind(self.entries.iter().map(|e| e.4).collect::<Vec<&str>>())
            .bind(now)
            .execute(&mut **tx)
            .await?;
        }
        // In batch order, so the relay publishes the outcomes in the order they were decided.
        sqlx::query(
            "INSERT INTO accounts.outbox (event_id, topic, key, payload, headers, created_at) \
             SELECT event_id, topic, key, payload, headers, $6 \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::jsonb[]) WITH ORDINALITY \
                  AS o(event_id, topic, key, payload, headers, n) \
             ORDER BY n",
        )
        .bind(self.outbox.iter().map(|o| o.0).collect::<Vec<Uuid>>())
        .bind(self.outbox.iter().map(|o| o.1).collect::<Vec<&str>>())
        .bind(self.outbox.iter().map(|o| o.2.as_str()).collect::<Vec<&str>>())
        .bind(self.outbox.iter().map(|o| o.3.as_slice()).collect::<Vec<&[u8]>>())
        .bind(self.outbox.iter().map(|o| o.4.clone()).collect::<Vec<_>>())
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// Verdicts of events and payments already processed: before this batch, or earlier in it.
struct Seen {
    by_event: HashMap<Uuid, Outcome>,
    by_payment: HashMap<Uuid, Outcome>,
}

impl Seen {
    async fn load(tx: &mut Transaction<'_, Postgres>, batch: &[SettlementRequest]) -> Result<Seen, Failure> {
        let events: Vec<Uuid> = batch.iter().map(|r| r.event_id.as_uuid()).collect();
        let payments: Vec<Uuid> = batch.iter().map(|r| r.transfer.payment_id.as_uuid()).collect();
        let rows = sqlx::query(
            "SELECT event_id, payment_id, outcome, failure_reason FROM accounts.processed_events \
             WHERE event_id = ANY($1) OR payment_id = ANY($2)",
        )
        .bind(&events)
        .bind(&payments)
        .fetch_all(&mut **tx)
        .await?;
        let mut seen = Seen { by_event: HashMap::new(), by_payment: HashMap::new() };
        for row in rows {
            let outcome_text: String = row.try_get("outcome")?;
            let failure_reason: Option<String> = row.try_get("failure_reason")?;
            let outcome = parse_outcome(&outcome_text, failure_reason.as_deref())
                .ok_or_else(|| Failure::Corrupt("processed event outcome".into()))?;
            seen.by_event.insert(row.try_get("event_id")?, outcome);
            seen.by_payment.insert(row.try_get("payment_id")?, outcome);
        }
        Ok(seen)
    }

    fn verdict_of(&self, request: &SettlementRequest) -> Option<Outcome> {
        self.by_event
            .get(&request.event_id.as_uuid())
            .or_else(|| self.by_payment.get(&request.transfer.payment_id.as_uuid()))
            .copied()
    }

    fn record(&mut self, request: &SettlementRequest, outcome: Outcome) {
        self.by_event.insert(request.event_id.as_uuid(), outcome);
        self.by_payment.insert(request.transfer.payment_id.as_uuid(), outcome);
    }
}

fn parse_outcome(outcome: &str, failure_reason: Option<&str>) -> Option<Outcome> {
    match (outcome, failure_reason) {
        ("COMPLETED", None) => Some(Outcome::Completed),
        ("FAILED", Some(code)) => FailureReason::parse(code).map(Outcome::Failed),
        _ => None,
    }
}

fn parse_currency(code: &str) -> PortResult<Currency> {
    Currency::from_code(code).map_err(|_| corrupt("currency"))
}

/// Why one attempt of a settlement transaction did not commit.
enum Failure {
    Sql(sqlx::Error),
    Corrupt(String),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Failure {
        Failure::Sql(e)
    }
}

const SERIALIZATION_FAILURE: &str = "40001";
const DEADLOCK_DETECTED: &str = "40P01";
const UNIQUE_VIOLATION: &str = "23505";

/// Errors after which the same batch, retried, may commit: a lost race, not a bad request.
fn is_retryable(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else { return false };
    match db.code().as_deref() {
        Some(SERIALIZATION_FAILURE | DEADLOCK_DETECTED) => true,
        // Another transaction settled the same event or payment first; the retry reads its verdict.
        Some(UNIQUE_VIOLATION) => {
            matches!(db.constraint(), Some("processed_events_pkey" | "processed_events_payment_unique"))
        }
        _ => false,
    }
}

/// The constraints of `accounts` a write can hit, as the `rule` of `PortError::Refused`.
const CONSTRAINTS: &[&str] = &[
    "accounts_balance_non_negative",
    "accounts_balance_scale",
    "processed_events_pkey",
    "processed_events_payment_unique",
    "processed_events_outcome_known",
    "processed_events_failure_reason_iff_failed",
    "processed_events_failure_reason_bounded",
    "ledger_entries_direction_known",
    "ledger_entries_amount_positive",
    "ledger_entries_amount_scale",
    "ledger_entries_currency_format",
    "ledger_entries_one_per_direction",
    "ledger_entries_account_fkey",
    "ledger_entries_settlement_fkey",
    "ledger_entries_balanced",
    "outbox_event_id_unique",
    "outbox_topic_known",
    "outbox_key_bounded",
    "outbox_payload_bounded",
    "outbox_headers_object",
];

/// The one mapping of driver errors to the port's: by kind and SQLSTATE, never by driver text.
pub(crate) fn port_error(e: sqlx::Error) -> PortError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if code.starts_with("23") {
                let rule = db
                    .constraint()
                    .and_then(|name| CONSTRAINTS.iter().copied().find(|known| *known == name))
                    .unwrap_or("integrity_constraint");
                return PortError::Refused { rule };
            }
            match &code[..code.len().min(2)] {
                // Transaction rollback, connection, resources, operator intervention, system error.
                "40" | "08" | "53" | "57" | "58" => PortError::Unavailable { component: COMPONENT },
                "42" if code == "42501" => PortError::Refused { rule: "insufficient_privilege" },
                _ => PortError::Corrupt { what: format!("unexpected database error {code}") },
            }
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::RowNotFound => corrupt("row of the accounts schema"),
        _ => PortError::Unavailable { component: COMPONENT },
    }
}

fn corrupt(what: &str) -> PortError {
    PortError::Corrupt { what: what.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_outcomes_read_back_exactly() {
        assert_eq!(parse_outcome("COMPLETED", None), Some(Outcome::Completed));
        for reason in FailureReason::ALL {
            assert_eq!(parse_outcome("FAILED", Some(reason.code())), Some(Outcome::Failed(reason)));
        }
        for (outcome, reason) in
            [("COMPLETED", Some("insufficient_funds")), ("FAILED", None), ("FAILED", Some("x")), ("", None)]
        {
            assert_eq!(parse_outcome(outcome, reason), None);
        }
    }

    #[test]
    fn driver_errors_never_reach_the_display() {
        let e = port_error(sqlx::Error::Protocol("secret driver text".into()));
        assert_eq!(e, PortError::Unavailable { component: COMPONENT });
        assert!(!e.to_string().contains("secret"));
        assert!(matches!(port_error(sqlx::Error::RowNotFound), PortError::Corrupt { .. }));
        assert!(matches!(port_error(sqlx::Error::PoolTimedOut), PortError::Unavailable { .. }));
    }
}
