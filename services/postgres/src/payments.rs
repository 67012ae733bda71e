//! `PgPaymentStore`: the payment service's store of record over the `payments` schema, connected
//! as the `payment_service` role — [`PaymentStore`], its [`Outbox`] and the PostgreSQL truth of
//! [`IdempotencyStore`] (SPEC §6.1, §6.2, §6.4).
//!
//! Every write is ONE transaction:
//! - `insert_with_event`: INSERT the PENDING payment, INSERT its `payment.initiated` outbox row and,
//!   with a completion, turn the key's IN_FLIGHT claim (same fingerprint) into COMPLETED with the
//!   response and the payment id — 0 rows updated rolls the whole transaction back as
//!   `Refused { rule: "idempotency_claim_lost" }`, so a key never names a payment that was not
//!   written and no payment is written for a key another request completed;
//! - `record_transitions` (and `record_transition`, a batch of one): lock the batch's payment rows
//!   in payment-id order (`SELECT ... FOR NO KEY UPDATE`, so racing batches never deadlock),
//!   decide every item from the locked statuses with `decide_transitions` (what the items one by
//!   one would answer: a lost compare-and-set, an illegal pair or a second transition out of a
//!   state is `Refused { rule: "illegal_transition" }`), then for the applied ones ONE multi-row
//!   INSERT of the transition rows (batch order) and ONE multi-row `UPDATE ... FROM unnest(...)
//!   WHERE status = from` (the schema's protocol; its triggers check the pair and that it was
//!   recorded, `transitions_once_per_state` refuses a second move out of a state). Every row
//!   updated is checked: the compare-and-set holds in the database too, not only in the decision;
//! - `get_many`: one statement (one snapshot) for all the ids, `= ANY($1)`;
//! - `claim`: `INSERT ... ON CONFLICT DO NOTHING` (the primary key makes exactly one concurrent
//!   claimer win); otherwise a conditional UPDATE takes over an IN_FLIGHT claim whose lease
//!   ([`IDEMPOTENCY_LEASE_S`]) ended, only for the same fingerprint (row-locked, so one taker wins);
//!   otherwise the record is returned unchanged.
//!
//! Decisions never read the database clock: times come from the arguments (`now`, `transition.at`,
//! `payment.created_at`); PostgreSQL's `now()` only stamps bookkeeping columns the port passes no
//! time for (`published_at`, `updated_at` of a completed key). Deadlocks and serialization failures
//! are retried from scratch at most [`WRITE_ATTEMPTS_MAX`] times, then `Unavailable`; timeouts and
//! lost connections are `Unavailable`; constraint violations are `Refused` by rule. Driver text
//! never leaves this module.

use std::collections::BTreeMap;
use std::future::Future;

use async_trait::async_trait;
use rust_decimal::Decimal;
use securepay_core::events::PaymentInitiated;
use securepay_core::idempotency::{Fingerprint, IdempotencyKey, Record};
use securepay_core::ids::{AccountId, PaymentId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::{FailureReason, Payment, PaymentStatus, Transition};
use securepay_core::topology::topic;
use securepay_ports::payments::{
    IDEMPOTENCY_LEASE_S, IDEMPOTENCY_RESPONSE_LEN_MAX, IDEMPOTENCY_RETENTION_H, PAYMENT_BATCH_LEN_MAX, check_insert,
    decide_transitions, insert_each,
};
use securepay_ports::{
    IdempotencyCompletion, IdempotencyStore, NewPayment, Outbox, OutboxEvent, PaymentStore, PortError, PortResult,
    TransitionRecord,
};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgRow};
use sqlx::types::Json;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::ledger::OUTBOX_BATCH_LEN_MAX;

/// A group commit's fresh key records (`IdempotencyCompletion::claimed == false`), in key order so
/// racing batches wait on each other in one order. Parameters as [`COMPLETE_CLAIMED_KEYS`].
const INSERT_FRESH_KEYS: &str = "INSERT INTO payments.idempotency_keys \
     (subject, key, request_fingerprint, state, locked_until, response, payment_id, created_at, updated_at, expires_at) \
     SELECT subject, key, fingerprint, 'COMPLETED', NULL, response, payment_id, at, at, at + interval '24 hours' \
     FROM unnest($1::text[], $2::text[], $3::bytea[], $4::uuid[], $5::bytea[], $6::timestamptz[]) \
          AS c(subject, key, response, payment_id, fingerprint, at) \
     ORDER BY subject, key \
     ON CONFLICT (subject, key) DO NOTHING";

/// A group commit's completions of IN_FLIGHT claims with the same fingerprint. Parameters:
/// subjects, keys, responses, payment ids, fingerprints, times.
const COMPLETE_CLAIMED_KEYS: &str = "UPDATE payments.idempotency_keys AS k \
     SET state = 'COMPLETED', locked_until = NULL, response = c.response, payment_id = c.payment_id, updated_at = c.at \
     FROM unnest($1::text[], $2::text[], $3::bytea[], $4::uuid[], $5::bytea[], $6::timestamptz[]) \
          AS c(subject, key, response, payment_id, fingerprint, at) \
     WHERE k.subject = c.subject AND k.key = c.key AND k.state = 'IN_FLIGHT' AND k.request_fingerprint = c.fingerprint";

/// Attempts of one write transaction before a deadlock/serialization failure is `Unavailable`.
pub const WRITE_ATTEMPTS_MAX: u32 = 8;

const COMPONENT: &str = "postgresql";

/// The payment service's store of record in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgPaymentStore {
    pool: PgPool,
}

impl PgPaymentStore {
    /// Over an existing pool; its connections must log in as `payment_service`.
    pub fn new(pool: PgPool) -> PgPaymentStore {
        PgPaymentStore { pool }
    }

    /// A pool of at most `connections_max` connections with `options` (role `payment_service`),
    /// each with a [`STATEMENT_TIMEOUT_MS`] statement timeout.
    pub async fn connect(options: PgConnectOptions, connections_max: u32) -> PortResult<PgPaymentStore> {
        let pool = crate::ledger::service_pool(options, connections_max).await.map_err(port_error)?;
        Ok(PgPaymentStore { pool })
    }

    /// A cheap liveness probe (`SELECT 1`) for readiness checks.
    pub async fn ping(&self) -> PortResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(port_error)?;
        Ok(())
    }

    async fn insert_once(
        &self,
        payment: &Payment,
        event: &PaymentInitiated,
        headers: &Json<BTreeMap<String, String>>,
        completion: Option<&IdempotencyCompletion>,
    ) -> Result<(), Failure> {
        let mut tx = self.pool.begin().await?;
        // The key first: a request that lost its key's race learns that before `payment_exists`.
        if let Some(completion) = completion {
            let recorded = if completion.claimed {
                sqlx::query(
                    "UPDATE payments.idempotency_keys \
                     SET state = 'COMPLETED', locked_until = NULL, response = $3, payment_id = $4, updated_at = $6 \
                     WHERE subject = $1 AND key = $2 AND state = 'IN_FLIGHT' AND request_fingerprint = $5",
                )
            } else {
                sqlx::query(
                    "INSERT INTO payments.idempotency_keys \
                     (subject, key, request_fingerprint, state, locked_until, response, payment_id, \
                      created_at, updated_at, expires_at) \
                     VALUES ($1, $2, $5, 'COMPLETED', NULL, $3, $4, $6, $6, $6 + interval '24 hours') \
                     ON CONFLICT (subject, key) DO NOTHING",
                )
            }
            .bind(completion.subject.as_str())
            .bind(completion.key.as_str())
            .bind(&completion.response)
            .bind(payment.id.as_uuid())
            .bind(completion.fingerprint.0.as_slice())
            .bind(payment.created_at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if recorded == 0 {
                tx.rollback().await?;
                return Err(Failure::Refused("idempotency_claim_lost"));
            }
        }
        sqlx::query(
            "INSERT INTO payments.transactions \
             (payment_id, subject, from_account, to_account, amount, currency, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'PENDING', $7, $8)",
        )
        .bind(payment.id.as_uuid())
        .bind(payment.subject.as_str())
        .bind(payment.from.as_uuid())
        .bind(payment.to.as_uuid())
        .bind(payment.amount.value())
        .bind(payment.amount.currency().code())
        .bind(payment.created_at)
        .bind(payment.updated_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO payments.outbox (event_id, topic, key, payload, headers, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(event.event_id.as_uuid())
        .bind(topic::PAYMENT_INITIATED)
        .bind(payment.id.to_string())
        .bind(securepay_proto::convert::encode_initiated(event))
        .bind(headers)
        .bind(payment.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One attempt of a group commit (see the module docs): the whole batch in one transaction,
    /// or nothing (`Refused` when any item's constraint or idempotency claim does not hold).
    async fn insert_batch_once(&self, batch: &[&NewPayment]) -> Result<(), Failure> {
        let payments: Vec<&Payment> = batch.iter().map(|item| &item.payment).collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO payments.transactions \
             (payment_id, subject, from_account, to_account, amount, currency, status, created_at, updated_at) \
             SELECT payment_id, subject, from_account, to_account, amount, currency, 'PENDING', created_at, updated_at \
             FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::numeric[], $6::text[], \
                         $7::timestamptz[], $8::timestamptz[]) WITH ORDINALITY \
                  AS p(payment_id, subject, from_account, to_account, amount, currency, created_at, updated_at, n) \
             ORDER BY n",
        )
        .bind(payments.iter().map(|p| p.id.as_uuid()).collect::<Vec<Uuid>>())
        .bind(payments.iter().map(|p| p.subject.as_str()).collect::<Vec<&str>>())
        .bind(payments.iter().map(|p| p.from.as_uuid()).collect::<Vec<Uuid>>())
        .bind(payments.iter().map(|p| p.to.as_uuid()).collect::<Vec<Uuid>>())
        .bind(payments.iter().map(|p| p.amount.value()).collect::<Vec<Decimal>>())
        .bind(payments.iter().map(|p| p.amount.currency().code()).collect::<Vec<&str>>())
        .bind(payments.iter().map(|p| p.created_at).collect::<Vec<OffsetDateTime>>())
        .bind(payments.iter().map(|p| p.updated_at).collect::<Vec<OffsetDateTime>>())
        .execute(&mut *tx)
        .await?;
        // In batch order, so the relay publishes in the order the payments were accepted.
        sqlx::query(
            "INSERT INTO payments.outbox (event_id, topic, key, payload, headers, created_at) \
             SELECT event_id, $1, key, payload, headers, created_at \
             FROM unnest($2::uuid[], $3::text[], $4::bytea[], $5::jsonb[], $6::timestamptz[]) WITH ORDINALITY \
                  AS e(event_id, key, payload, headers, created_at, n) \
             ORDER BY n",
        )
        .bind(topic::PAYMENT_INITIATED)
        .bind(batch.iter().map(|item| item.event.event_id.as_uuid()).collect::<Vec<Uuid>>())
        .bind(payments.iter().map(|p| p.id.to_string()).collect::<Vec<String>>())
        .bind(
            batch.iter().map(|item| securepay_proto::convert::encode_initiated(&item.event)).collect::<Vec<Vec<u8>>>(),
        )
        .bind(batch.iter().map(|item| headers_json(&item.headers)).collect::<Vec<_>>())
        .bind(payments.iter().map(|p| p.created_at).collect::<Vec<OffsetDateTime>>())
        .execute(&mut *tx)
        .await?;
        let (claimed, fresh): (Vec<_>, Vec<_>) = batch
            .iter()
            .filter_map(|item| item.idempotency.as_ref().map(|c| (&item.payment, c)))
            .partition(|(_, c)| c.claimed);
        // Fresh keys get their COMPLETED record, claimed keys their claim completed; either way
        // a key that is not as expected (or is named twice) refuses the whole batch, and the
        // one-by-one path says whose.
        for (statement, keyed) in [(INSERT_FRESH_KEYS, &fresh), (COMPLETE_CLAIMED_KEYS, &claimed)] {
            if keyed.is_empty() {
                continue;
            }
            let recorded = sqlx::query(statement)
                .bind(keyed.iter().map(|(_, c)| c.subject.as_str()).collect::<Vec<&str>>())
                .bind(keyed.iter().map(|(_, c)| c.key.as_str()).collect::<Vec<&str>>())
                .bind(keyed.iter().map(|(_, c)| c.response.as_slice()).collect::<Vec<&[u8]>>())
                .bind(keyed.iter().map(|(p, _)| p.id.as_uuid()).collect::<Vec<Uuid>>())
                .bind(keyed.iter().map(|(_, c)| c.fingerprint.0.as_slice()).collect::<Vec<&[u8]>>())
                .bind(keyed.iter().map(|(p, _)| p.created_at).collect::<Vec<OffsetDateTime>>())
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if recorded != keyed.len() as u64 {
                tx.rollback().await?;
                return Err(Failure::Refused("idempotency_claim_lost"));
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// One attempt of a batch of transitions (see the module docs): per item its answer.
    async fn transitions_once(&self, batch: &[TransitionRecord]) -> Result<Vec<PortResult<()>>, Failure> {
        let mut ids: Vec<Uuid> = batch.iter().map(|item| item.payment.as_uuid()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT payment_id, status FROM payments.transactions WHERE payment_id = ANY($1) \
             ORDER BY payment_id FOR NO KEY UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut stored = BTreeMap::new();
        for row in &rows {
            let id: Uuid = row.try_get("payment_id")?;
            let status: String = row.try_get("status")?;
            let status = PaymentStatus::parse(&status).ok_or_else(|| Failure::Corrupt("payment status".into()))?;
            stored.insert(PaymentId::from_uuid(id), status);
        }
        let decided = decide_transitions(batch, |id| stored.get(&id).copied());
        let applied: Vec<(&TransitionRecord, Option<FailureReason>)> = batch
            .iter()
            .zip(&decided)
            .filter_map(|(item, decision)| decision.as_ref().ok().map(|reason| (item, *reason)))
            .collect();
        let moved: std::collections::BTreeSet<PaymentId> = applied.iter().map(|(item, _)| item.payment).collect();
        if moved.len() != applied.len() {
            // Two moves of one payment in one batch: the transition table has no such chain
            // (every legal transition leaves PENDING for good); refused whole, so the caller
            // records the items one by one.
            tx.rollback().await?;
            return Err(Failure::Refused("transition_chain_in_batch"));
        }
        if !applied.is_empty() {
            let column =
                |f: fn(&TransitionRecord) -> &'static str| applied.iter().map(|(i, _)| f(i)).collect::<Vec<_>>();
            let payments: Vec<Uuid> = applied.iter().map(|(item, _)| item.payment.as_uuid()).collect();
            let from = column(|item| item.transition.from.as_str());
            let to = column(|item| item.transition.to.as_str());
            let at: Vec<OffsetDateTime> = applied.iter().map(|(item, _)| item.transition.at).collect();
            sqlx::query(
                "INSERT INTO payments.transitions (payment_id, from_status, to_status, cause, at) \
                 SELECT payment_id, from_status, to_status, cause, at \
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) WITH ORDINALITY \
                      AS t(payment_id, from_status, to_status, cause, at, n) \
                 ORDER BY n",
            )
            .bind(&payments)
            .bind(&from)
            .bind(&to)
            .bind(applied.iter().map(|(item, _)| item.transition.cause.as_str()).collect::<Vec<&str>>())
            .bind(&at)
            .execute(&mut *tx)
            .await?;
            let updated = sqlx::query(
                "UPDATE payments.transactions AS p \
                 SET status = w.to_status, failure_reason = w.failure_reason, updated_at = w.at \
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) \
                      AS w(payment_id, from_status, to_status, failure_reason, at) \
                 WHERE p.payment_id = w.payment_id AND p.status = w.from_status",
            )
            .bind(&payments)
            .bind(&from)
            .bind(&to)
            .bind(applied.iter().map(|(_, reason)| reason.map(FailureReason::code)).collect::<Vec<Option<&str>>>())
            .bind(&at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != applied.len() as u64 {
                // The rows are locked, so this cannot happen; if it does, write nothing.
                tx.rollback().await?;
                return Err(Failure::Corrupt("a locked payment changed status".into()));
            }
        }
        tx.commit().await?;
        Ok(decided.into_iter().map(|decision| decision.map(|_| ())).collect())
    }

    /// One claim attempt: `None` if this caller now holds the claim, `Some(record)` if another
    /// does or did, `Err(Vanished)` if the record disappeared between the statements.
    async fn claim_once(
        &self,
        subject: &Subject,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: OffsetDateTime,
    ) -> Result<Option<Record<Vec<u8>>>, Failure> {
        let locked_until = now + Duration::seconds(IDEMPOTENCY_LEASE_S);
        let inserted = sqlx::query(
            "INSERT INTO payments.idempotency_keys \
             (subject, key, request_fingerprint, state, locked_until, created_at, updated_at, expires_at) \
             VALUES ($1, $2, $3, 'IN_FLIGHT', $4, $5, $5, $6) ON CONFLICT (subject, key) DO NOTHING",
        )
        .bind(subject.as_str())
        .bind(key.as_str())
        .bind(fingerprint.0.as_slice())
        .bind(locked_until)
        .bind(now)
        .bind(now + Duration::hours(IDEMPOTENCY_RETENTION_H))
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(None);
        }
        // The row is locked by the UPDATE, so of two concurrent takers one re-reads a fresh lease.
        let taken_over = sqlx::query(
            "UPDATE payments.idempotency_keys SET locked_until = $4, updated_at = $5 \
             WHERE subject = $1 AND key = $2 AND state = 'IN_FLIGHT' AND request_fingerprint = $3 \
             AND locked_until <= $5",
        )
        .bind(subject.as_str())
        .bind(key.as_str())
        .bind(fingerprint.0.as_slice())
        .bind(locked_until)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if taken_over == 1 {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT request_fingerprint, state, response FROM payments.idempotency_keys \
             WHERE subject = $1 AND key = $2",
        )
        .bind(subject.as_str())
        .bind(key.as_str())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Some(read_record(&row)?)),
            None => Err(Failure::Vanished),
        }
    }
}

/// Runs one attempt of a write until it commits, is refused, or has lost [`WRITE_ATTEMPTS_MAX`]
/// races (deadlock, serialization failure, a record vanishing between statements).
async fn retrying<T, F, Fut>(mut attempt: F) -> PortResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    for _ in 0..WRITE_ATTEMPTS_MAX {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(Failure::Sql(e)) if is_retryable(&e) => {}
            Err(Failure::Vanished) => {}
            Err(Failure::Sql(e)) => return Err(port_error(e)),
            Err(Failure::Refused(rule)) => return Err(PortError::Refused { rule }),
            Err(Failure::Corrupt(what)) => return Err(PortError::Corrupt { what }),
        }
    }
    Err(PortError::Unavailable { component: COMPONENT })
}

#[async_trait]
impl PaymentStore for PgPaymentStore {
    async fn insert_with_event(
        &self,
        payment: &Payment,
        event: &PaymentInitiated,
        headers: &[(String, String)],
        idempotency: Option<&IdempotencyCompletion>,
    ) -> PortResult<()> {
        check_insert(payment, event, idempotency)?;
        let headers = headers_json(headers);
        retrying(|| self.insert_once(payment, event, &headers, idempotency)).await
    }

    async fn insert_many(&self, batch: &[NewPayment]) -> PortResult<Vec<PortResult<()>>> {
        if batch.len() > PAYMENT_BATCH_LEN_MAX {
            return Err(PortError::Refused { rule: "payments_batch_len_max" });
        }
        let answers: Vec<PortResult<()>> =
            batch.iter().map(|item| check_insert(&item.payment, &item.event, item.idempotency.as_ref())).collect();
        let valid: Vec<&NewPayment> =
            batch.iter().zip(&answers).filter(|(_, answer)| answer.is_ok()).map(|(item, _)| item).collect();
        if valid.is_empty() {
            return Ok(answers);
        }
        match retrying(|| self.insert_batch_once(&valid)).await {
            Ok(()) => Ok(answers),
            Err(PortError::Unavailable { component }) => Err(PortError::Unavailable { component }),
            // Some item is refused (a taken payment id, a lost claim): nothing of the batch was
            // written; one transaction per item pins the refusal on its own item (an item that
            // failed `check_insert` above gets the same refusal again, without IO).
            Err(_) => Ok(insert_each(self, batch).await),
        }
    }

    async fn get(&self, id: PaymentId) -> PortResult<Option<Payment>> {
        // One statement, one snapshot: the status and the history agree.
        let rows = sqlx::query(
            "SELECT p.subject, p.from_account, p.to_account, p.amount, p.currency, p.status, p.failure_reason, \
                    p.created_at, p.updated_at, t.from_status, t.to_status, t.cause, t.at \
             FROM payments.transactions p LEFT JOIN payments.transitions t ON t.payment_id = p.payment_id \
             WHERE p.payment_id = $1 ORDER BY t.id",
        )
        .bind(id.as_uuid())
        .fetch_all(&self.pool)
        .await
        .map_err(port_error)?;
        let Some(first) = rows.first() else { return Ok(None) };
        let mut payment = read_payment(id, first)?;
        for row in &rows {
            if let Some(transition) = read_transition(row)? {
                payment.transitions.push(transition);
            }
        }
        Ok(Some(payment))
    }

    async fn get_many(&self, ids: &[PaymentId]) -> PortResult<Vec<Option<Payment>>> {
        if ids.len() > PAYMENT_BATCH_LEN_MAX {
            return Err(PortError::Refused { rule: "payments_batch_len_max" });
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let uuids: Vec<Uuid> = ids.iter().map(PaymentId::as_uuid).collect();
        // One statement, one snapshot: every status and history of the answer agree.
        let rows = sqlx::query(
            "SELECT p.payment_id, p.subject, p.from_account, p.to_account, p.amount, p.currency, p.status, \
                    p.failure_reason, p.created_at, p.updated_at, t.from_status, t.to_status, t.cause, t.at \
             FROM payments.transactions p LEFT JOIN payments.transitions t ON t.payment_id = p.payment_id \
             WHERE p.payment_id = ANY($1) ORDER BY p.payment_id, t.id",
        )
        .bind(&uuids)
        .fetch_all(&self.pool)
        .await
        .map_err(port_error)?;
        let mut found: BTreeMap<PaymentId, Payment> = BTreeMap::new();
        for row in &rows {
            let id = PaymentId::from_uuid(row.try_get("payment_id").map_err(port_error)?);
            let payment = match found.entry(id) {
                std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::btree_map::Entry::Vacant(entry) => entry.insert(read_payment(id, row)?),
            };
            if let Some(transition) = read_transition(row)? {
                payment.transitions.push(transition);
            }
        }
        Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
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
            return Err(PortError::Refused { rule: "payments_batch_len_max" });
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        retrying(|| self.transitions_once(batch)).await
    }
}

#[async_trait]
impl Outbox for PgPaymentStore {
    async fn unpublished(&self, limit: usize) -> PortResult<Vec<OutboxEvent>> {
        let limit = limit.min(OUTBOX_BATCH_LEN_MAX);
        let rows = sqlx::query(
            "SELECT id, topic, key, payload, headers FROM payments.outbox \
             WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(i64::try_from(limit).expect("OUTBOX_BATCH_LEN_MAX fits i64"))
        .fetch_all(&self.pool)
        .await
        .map_err(port_error)?;
        rows.iter()
            .map(|row| {
                let headers: Json<BTreeMap<String, String>> =
                    row.try_get("headers").map_err(|_| corrupt("outbox headers"))?;
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
        sqlx::query("UPDATE payments.outbox SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL")
            .bind(sequences)
            .execute(&self.pool)
            .await
            .map_err(port_error)?;
        Ok(())
    }
}

#[async_trait]
impl IdempotencyStore for PgPaymentStore {
    async fn claim(
        &self,
        subject: &Subject,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: OffsetDateTime,
    ) -> PortResult<Option<Record<Vec<u8>>>> {
        retrying(|| self.claim_once(subject, key, fingerprint, now)).await
    }

    async fn lookup(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<Option<Record<Vec<u8>>>> {
        let row = sqlx::query(
            "SELECT request_fingerprint, state, response FROM payments.idempotency_keys \
             WHERE subject = $1 AND key = $2",
        )
        .bind(subject.as_str())
        .bind(key.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(port_error)?;
        match row {
            Some(row) => match read_record(&row) {
                Ok(record) => Ok(Some(record)),
                Err(Failure::Corrupt(what)) => Err(PortError::Corrupt { what }),
                Err(Failure::Sql(error)) => Err(port_error(error)),
                Err(_) => Err(PortError::Corrupt { what: "idempotency record".into() }),
            },
            None => Ok(None),
        }
    }

    async fn complete(&self, subject: &Subject, key: &IdempotencyKey, response: &[u8]) -> PortResult<()> {
        if response.len() > IDEMPOTENCY_RESPONSE_LEN_MAX {
            return Err(PortError::Refused { rule: "idempotency_response_len_max" });
        }
        let completed = sqlx::query(
            "UPDATE payments.idempotency_keys \
             SET state = 'COMPLETED', locked_until = NULL, response = $3, updated_at = now() \
             WHERE subject = $1 AND key = $2 AND state = 'IN_FLIGHT'",
        )
        .bind(subject.as_str())
        .bind(key.as_str())
        .bind(response)
        .execute(&self.pool)
        .await
        .map_err(port_error)?
        .rows_affected();
        if completed == 1 {
            return Ok(());
        }
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM payments.idempotency_keys WHERE subject = $1 AND key = $2)",
        )
        .bind(subject.as_str())
        .bind(key.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(port_error)?;
        let rule = if exists { "idempotency_already_completed" } else { "idempotency_claim_missing" };
        Err(PortError::Refused { rule })
    }

    async fn release(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<()> {
        sqlx::query("DELETE FROM payments.idempotency_keys WHERE subject = $1 AND key = $2 AND state = 'IN_FLIGHT'")
            .bind(subject.as_str())
            .bind(key.as_str())
            .execute(&self.pool)
            .await
            .map_err(port_error)?;
        Ok(())
    }

    async fn purge_before(&self, cutoff: OffsetDateTime) -> PortResult<u64> {
        let purged = sqlx::query("DELETE FROM payments.idempotency_keys WHERE created_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await
            .map_err(port_error)?
            .rows_affected();
        Ok(purged)
    }
}

/// The outbox row's headers: a JSON object, one value per header name (the last given).
fn headers_json(headers: &[(String, String)]) -> Json<BTreeMap<String, String>> {
    Json(headers.iter().cloned().collect())
}

/// Amounts read back are bounded by the schema (`amount < 1e18`), not by today's payment policy.
fn stored_amount_policy() -> AmountPolicy {
    AmountPolicy { maximum: Decimal::from(1_000_000_000_000_000_000_i64) }
}

fn read_payment(id: PaymentId, row: &PgRow) -> PortResult<Payment> {
    let get_uuid = |column: &str| row.try_get::<Uuid, _>(column).map_err(port_error);
    let subject: String = row.try_get("subject").map_err(port_error)?;
    let value: Decimal = row.try_get("amount").map_err(port_error)?;
    let currency: String = row.try_get("currency").map_err(port_error)?;
    let status: String = row.try_get("status").map_err(port_error)?;
    let failure_reason: Option<String> = row.try_get("failure_reason").map_err(port_error)?;
    let currency = Currency::from_code(&currency).map_err(|_| corrupt("payment currency"))?;
    Ok(Payment {
        id,
        subject: Subject::parse(&subject).map_err(|_| corrupt("payment subject"))?,
        from: AccountId::from_uuid(get_uuid("from_account")?),
        to: AccountId::from_uuid(get_uuid("to_account")?),
        amount: Amount::new(value, currency, stored_amount_policy()).map_err(|_| corrupt("payment amount"))?,
        status: PaymentStatus::parse(&status).ok_or_else(|| corrupt("payment status"))?,
        failure_reason: failure_reason
            .map(|code| FailureReason::parse(&code).ok_or_else(|| corrupt("payment failure reason")))
            .transpose()?,
        created_at: row.try_get("created_at").map_err(port_error)?,
        updated_at: row.try_get("updated_at").map_err(port_error)?,
        transitions: Vec::new(),
    })
}

/// The transition of a `get` row; `None` for the one row of a payment without history.
fn read_transition(row: &PgRow) -> PortResult<Option<Transition>> {
    let from: Option<String> = row.try_get("from_status").map_err(port_error)?;
    let Some(from) = from else { return Ok(None) };
    let to: String = row.try_get("to_status").map_err(port_error)?;
    let status = |text: &str| PaymentStatus::parse(text).ok_or_else(|| corrupt("transition status"));
    Ok(Some(Transition {
        from: status(&from)?,
        to: status(&to)?,
        cause: row.try_get("cause").map_err(port_error)?,
        at: row.try_get("at").map_err(port_error)?,
    }))
}

fn read_record(row: &PgRow) -> Result<Record<Vec<u8>>, Failure> {
    let fingerprint: Vec<u8> = row.try_get("request_fingerprint")?;
    let fingerprint =
        Fingerprint(fingerprint.try_into().map_err(|_| Failure::Corrupt("idempotency fingerprint".into()))?);
    let state: String = row.try_get("state")?;
    let response: Option<Vec<u8>> = row.try_get("response")?;
    match (state.as_str(), response) {
        ("IN_FLIGHT", None) => Ok(Record::InFlight { fingerprint }),
        ("COMPLETED", Some(response)) => Ok(Record::Completed { fingerprint, response }),
        _ => Err(Failure::Corrupt("idempotency record state".into())),
    }
}

/// Why one attempt of a write did not commit.
enum Failure {
    Sql(sqlx::Error),
    Refused(&'static str),
    Corrupt(String),
    /// A claim's record was deleted between two statements: try again from the INSERT.
    Vanished,
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Failure {
        Failure::Sql(e)
    }
}

const SERIALIZATION_FAILURE: &str = "40001";
const DEADLOCK_DETECTED: &str = "40P01";

/// Errors after which the same write, retried, may commit: a lost race, not a bad request.
fn is_retryable(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else { return false };
    matches!(db.code().as_deref(), Some(SERIALIZATION_FAILURE | DEADLOCK_DETECTED))
}

/// The constraints (and trigger-raised rules) of `payments` a write can hit, and the `rule` of
/// `PortError::Refused` each is reported as.
const CONSTRAINTS: &[(&str, &str)] = &[
    ("transactions_pkey", "payment_exists"),
    ("transactions_legal_transition", "illegal_transition"),
    ("transactions_transition_recorded", "illegal_transition"),
    ("transitions_legal", "illegal_transition"),
    ("transitions_once_per_state", "illegal_transition"),
    ("transitions_applied", "illegal_transition"),
    ("transitions_payment_fkey", "unknown_payment"),
    ("transitions_cause_bounded", "transitions_cause_bounded"),
    ("transactions_created_pending", "invalid_payment"),
    ("transactions_immutable", "transactions_immutable"),
    ("transactions_subject_bounded", "transactions_subject_bounded"),
    ("transactions_amount_positive", "transactions_amount_positive"),
    ("transactions_amount_scale", "transactions_amount_scale"),
    ("transactions_currency_format", "transactions_currency_format"),
    ("transactions_distinct_accounts", "transactions_distinct_accounts"),
    ("transactions_failure_reason_iff_failed", "illegal_transition"),
    ("transactions_failure_reason_bounded", "transactions_failure_reason_bounded"),
    ("idempotency_keys_response_bounded", "idempotency_response_len_max"),
    // A key names only a payment that was written, so a payment id already named is a taken one
    // (a fresh key record meets this before the payment's own primary key).
    ("idempotency_keys_payment_unique", "payment_exists"),
    ("idempotency_keys_payment_fkey", "idempotency_keys_payment_fkey"),
    ("idempotency_keys_subject_bounded", "idempotency_keys_subject_bounded"),
    ("idempotency_keys_key_format", "idempotency_keys_key_format"),
    ("outbox_event_id_unique", "outbox_event_id_unique"),
    ("outbox_topic_known", "outbox_topic_known"),
    ("outbox_key_bounded", "outbox_key_bounded"),
    ("outbox_payload_bounded", "outbox_payload_bounded"),
    ("outbox_headers_object", "outbox_headers_object"),
];

/// The one mapping of driver errors to the port's: by kind, SQLSTATE and constraint name, never
/// by driver text.
fn port_error(e: sqlx::Error) -> PortError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if code.starts_with("23") {
                let rule = db
                    .constraint()
                    .and_then(|name| CONSTRAINTS.iter().find(|(known, _)| *known == name))
                    .map_or("integrity_constraint", |(_, rule)| *rule);
                return PortError::Refused { rule };
            }
            match &code[..code.len().min(2)] {
                // Transaction rollback, connection, resources, operator intervention (statement
                // timeout included), system error.
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
        | sqlx::Error::RowNotFound => corrupt("row of the payments schema"),
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
    fn driver_errors_never_reach_the_display() {
        let e = port_error(sqlx::Error::Protocol("secret driver text".into()));
        assert_eq!(e, PortError::Unavailable { component: COMPONENT });
        assert!(!e.to_string().contains("secret"));
        assert!(matches!(port_error(sqlx::Error::RowNotFound), PortError::Corrupt { .. }));
        assert!(matches!(port_error(sqlx::Error::PoolTimedOut), PortError::Unavailable { .. }));
    }
}
