//! `PgNotificationStore`: the notification service's [`NotificationStore`] over the
//! `notifications` schema (migration 0004), connected as the `notification_service` role (which may
//! insert and read, never rewrite a notification).
//!
//! - `record` is ONE statement, `INSERT ... ON CONFLICT (event_id) DO NOTHING`: the unique
//!   `notifications_event_id_unique` makes exactly one of any number of concurrent writers of an
//!   event id insert (`New`, one row affected); the others wait for it and insert nothing
//!   (`Duplicate`).
//! - `record_batch` is ONE `INSERT ... SELECT FROM unnest(...) ON CONFLICT (event_id) DO NOTHING
//!   RETURNING event_id` (one statement: all rows or none): only the first notification of each
//!   event id in the batch is sent (later ones are `Duplicate`), each gets its `id` from the
//!   table's sequence in batch order first (so the listing keeps recording order), and the rows
//!   are inserted in event-id order, so two batches racing on the same event ids wait on each
//!   other in one order and never deadlock. The returned event ids are the `New` ones.
//! - Columns: `event_id`, `payment_id`, `kind` (the canonical topic, as the schema's
//!   `notifications_kind_known` requires), `created_at` = the notification's `recorded_at` (the
//!   caller's clock, never the database's), and `payload`, a JSON object of text fields:
//!   `from_account`, `to_account`, `amount` (exact decimal text), `currency`, `occurred_at`
//!   (RFC 3339, to the nanosecond) and `failure_reason` (only for a failed payment).
//! - `for_payment` reads `WHERE payment_id = $1 ORDER BY id LIMIT $2` (the `notifications_payment_idx`
//!   index): recording order.
//!
//! Driver errors are mapped once ([`port_error`]) to `PortError`; driver text never leaves this
//! module. A row that does not read back as a domain value is `Corrupt`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use rust_decimal::Decimal;
use securepay_core::ids::{AccountId, EventId, PaymentId};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::FailureReason;
use securepay_ports::notifications::{
    LIST_LEN_MAX, RECORD_BATCH_LEN_MAX, check_notification, first_of_event_in_batch, truncate_to_micros,
};
use securepay_ports::{Notification, NotificationKind, NotificationStore, PortError, PortResult, Recorded};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgRow};
use sqlx::types::Json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

const COMPONENT: &str = "postgresql";

type Payload = Json<BTreeMap<String, String>>;

/// The notification service's store of record in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgNotificationStore {
    pool: PgPool,
}

impl PgNotificationStore {
    /// Over an existing pool; its connections must log in as `notification_service`.
    pub fn new(pool: PgPool) -> PgNotificationStore {
        PgNotificationStore { pool }
    }

    /// A pool of at most `connections_max` connections with `options` (role
    /// `notification_service`), each with a [`STATEMENT_TIMEOUT_MS`] statement timeout.
    pub async fn connect(options: PgConnectOptions, connections_max: u32) -> PortResult<PgNotificationStore> {
        let pool = crate::ledger::service_pool(options, connections_max).await.map_err(port_error)?;
        Ok(PgNotificationStore { pool })
    }

    /// Whether the database answers a trivial query now (the readiness check).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

#[async_trait]
impl NotificationStore for PgNotificationStore {
    async fn record(&self, notification: &Notification) -> PortResult<Recorded> {
        let inserted = sqlx::query(
            "INSERT INTO notifications.notifications (event_id, payment_id, kind, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(notification.event_id.as_uuid())
        .bind(notification.payment_id.as_uuid())
        .bind(notification.kind.topic())
        .bind(payload(notification)?)
        .bind(truncate_to_micros(notification.recorded_at))
        .execute(&self.pool)
        .await
        .map_err(port_error)?;
        Ok(if inserted.rows_affected() == 1 { Recorded::New } else { Recorded::Duplicate })
    }

    async fn record_batch(&self, batch: &[Notification]) -> PortResult<Vec<Recorded>> {
        if batch.len() > RECORD_BATCH_LEN_MAX {
            return Err(PortError::Refused { rule: "notifications_batch_len_max" });
        }
        let first = first_of_event_in_batch(batch);
        let firsts: Vec<&Notification> =
            batch.iter().zip(&first).filter(|(_, first)| **first).map(|(n, _)| n).collect();
        if firsts.is_empty() {
            return Ok(Vec::new());
        }
        let payloads = firsts.iter().map(|n| payload(n)).collect::<PortResult<Vec<Payload>>>()?;
        // Ids in batch order: a sequence hands one session increasing values.
        let mut ids: Vec<i64> =
            sqlx::query_scalar("SELECT nextval('notifications.notifications_id_seq') FROM generate_series(1, $1)")
                .bind(i32::try_from(firsts.len()).expect("RECORD_BATCH_LEN_MAX fits i32"))
                .fetch_all(&self.pool)
                .await
                .map_err(port_error)?;
        ids.sort_unstable();
        let event_ids: Vec<Uuid> = firsts.iter().map(|n| n.event_id.as_uuid()).collect();
        let inserted: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO notifications.notifications (id, event_id, payment_id, kind, payload, created_at) \
             SELECT id, event_id, payment_id, kind, payload, created_at \
             FROM unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::text[], $5::jsonb[], $6::timestamptz[]) \
                  AS t(id, event_id, payment_id, kind, payload, created_at) \
             ORDER BY event_id \
             ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        )
        .bind(&ids)
        .bind(&event_ids)
        .bind(firsts.iter().map(|n| n.payment_id.as_uuid()).collect::<Vec<Uuid>>())
        .bind(firsts.iter().map(|n| n.kind.topic()).collect::<Vec<&str>>())
        .bind(&payloads)
        .bind(firsts.iter().map(|n| truncate_to_micros(n.recorded_at)).collect::<Vec<OffsetDateTime>>())
        .fetch_all(&self.pool)
        .await
        .map_err(port_error)?;
        let inserted: std::collections::BTreeSet<Uuid> = inserted.into_iter().collect();
        Ok(batch
            .iter()
            .zip(first)
            .map(
                |(n, first)| {
                    if first && inserted.contains(&n.event_id.as_uuid()) { Recorded::New } else { Recorded::Duplicate }
                },
            )
            .collect())
    }

    async fn for_payment(&self, payment: PaymentId, limit: usize) -> PortResult<Vec<Notification>> {
        if limit > LIST_LEN_MAX {
            return Err(PortError::Refused { rule: "notifications_list_len_max" });
        }
        let rows = sqlx::query(
            "SELECT event_id, payment_id, kind, payload, created_at FROM notifications.notifications \
             WHERE payment_id = $1 ORDER BY id LIMIT $2",
        )
        .bind(payment.as_uuid())
        .bind(i64::try_from(limit).expect("LIST_LEN_MAX fits i64"))
        .fetch_all(&self.pool)
        .await
        .map_err(port_error)?;
        rows.iter().map(notification).collect()
    }
}

fn payload(n: &Notification) -> PortResult<Payload> {
    check_notification(n)?;
    let occurred_at = n.occurred_at.format(&Rfc3339).map_err(|_| PortError::Refused { rule: "occurred_at_rfc3339" })?;
    let mut fields = BTreeMap::from([
        ("from_account".to_owned(), n.from.to_string()),
        ("to_account".to_owned(), n.to.to_string()),
        ("amount".to_owned(), n.amount.to_string()),
        ("currency".to_owned(), n.amount.currency().code().to_owned()),
        ("occurred_at".to_owned(), occurred_at),
    ]);
    if let Some(reason) = n.failure_reason {
        fields.insert("failure_reason".to_owned(), reason.code().to_owned());
    }
    Ok(Json(fields))
}

/// A stored row as a domain value; anything that does not parse is `Corrupt`.
fn notification(row: &PgRow) -> PortResult<Notification> {
    let event_id: Uuid = row.try_get("event_id").map_err(port_error)?;
    let payment_id: Uuid = row.try_get("payment_id").map_err(port_error)?;
    let kind: String = row.try_get("kind").map_err(port_error)?;
    let Json(fields): Payload = row.try_get("payload").map_err(port_error)?;
    let recorded_at: OffsetDateTime = row.try_get("created_at").map_err(port_error)?;
    let field = |name: &str| fields.get(name).map(String::as_str).ok_or_else(|| corrupt("notification payload"));
    let account = |name: &str| AccountId::parse(field(name)?).map_err(|_| corrupt("notification account"));
    let currency = Currency::from_code(field("currency")?).map_err(|_| corrupt("notification currency"))?;
    // The amount was validated against the policy when its event was decoded; reading it back
    // checks only that it is a valid amount of its currency.
    let read_policy = AmountPolicy { maximum: Decimal::MAX };
    let amount = Amount::parse(field("amount")?, currency, read_policy).map_err(|_| corrupt("notification amount"))?;
    let failure_reason = match fields.get("failure_reason") {
        None => None,
        Some(code) => Some(FailureReason::parse(code).ok_or_else(|| corrupt("notification failure reason"))?),
    };
    let kind = NotificationKind::from_topic(&kind).ok_or_else(|| corrupt("notification kind"))?;
    if (kind == NotificationKind::Failed) != failure_reason.is_some() {
        return Err(corrupt("notification failure reason"));
    }
    Ok(Notification {
        event_id: EventId::from_uuid(event_id),
        payment_id: PaymentId::from_uuid(payment_id),
        kind,
        from: account("from_account")?,
        to: account("to_account")?,
        amount,
        failure_reason,
        occurred_at: OffsetDateTime::parse(field("occurred_at")?, &Rfc3339)
            .map_err(|_| corrupt("notification occurred_at"))?,
        recorded_at,
    })
}

/// The constraints of `notifications` a write can hit, as the `rule` of `PortError::Refused`.
const CONSTRAINTS: &[&str] = &[
    "notifications_event_id_unique",
    "notifications_kind_known",
    "notifications_payload_object",
    "notifications_payload_bounded",
];

/// The one mapping of driver errors to the port's: by kind and SQLSTATE, never by driver text.
fn port_error(e: sqlx::Error) -> PortError {
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
        | sqlx::Error::RowNotFound => corrupt("row of the notifications schema"),
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
