//! Settlement as the server recorded it: the load payments in `payments.transactions` whose
//! status became terminal (COMPLETED/FAILED, at `updated_at`) within a step's window — one query
//! per step after it ends, never a GET per payment during it (that would load the platform with
//! reads the measurement then includes).
//!
//! `updated_at` and `created_at` are written by the payment service from the system clock of
//! this machine, so the window is given in the same wall-clock time.

use anyhow::{Context as _, Result};
use sqlx::{PgConnection, Row as _};

use crate::load::accounts;

/// Settlements in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    /// Load payments that became terminal in the window.
    pub settled: u64,
    /// Of those, FAILED (insufficient funds, ...).
    pub failed: u64,
    /// Quantiles of `updated_at − created_at` over them (accepted → terminal), seconds.
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
}

/// Payments from a load account whose terminal status was written in `[from, to)` (Unix seconds).
pub async fn window(db: &mut PgConnection, from_unix: f64, to_unix: f64) -> Result<Window> {
    let (first, last) = accounts::id_range();
    let row = sqlx::query(
        "SELECT count(*) AS settled, count(*) FILTER (WHERE status = 'FAILED') AS failed, \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at)::float8) AS p50, \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at)::float8) AS p99 \
         FROM payments.transactions \
         WHERE status <> 'PENDING' AND updated_at >= to_timestamp($1) AND updated_at < to_timestamp($2) \
           AND from_account BETWEEN $3 AND $4",
    )
    .bind(from_unix)
    .bind(to_unix)
    .bind(first)
    .bind(last)
    .fetch_one(&mut *db)
    .await
    .context("counting the settlements of a bench step")?;
    let count = |name: &str| -> Result<u64> { Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or(0)) };
    Ok(Window {
        settled: count("settled")?,
        failed: count("failed")?,
        p50_s: row.try_get("p50")?,
        p99_s: row.try_get("p99")?,
    })
}

/// Load payments created since `since_unix` that are still PENDING.
pub async fn pending_since(db: &mut PgConnection, since_unix: f64) -> Result<u64> {
    let (first, last) = accounts::id_range();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payments.transactions \
         WHERE status = 'PENDING' AND created_at >= to_timestamp($1) AND from_account BETWEEN $2 AND $3",
    )
    .bind(since_unix)
    .bind(first)
    .bind(last)
    .fetch_one(&mut *db)
    .await
    .context("counting pending load payments")?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The durability settings the numbers depend on (SPEC §11 asks for both on).
pub async fn durability(db: &mut PgConnection) -> Result<(String, String)> {
    let row = sqlx::query("SELECT current_setting('fsync') AS fsync, current_setting('synchronous_commit') AS sc")
        .fetch_one(&mut *db)
        .await
        .context("reading fsync and synchronous_commit")?;
    Ok((row.try_get("fsync")?, row.try_get("sc")?))
}

/// One normalized statement as `pg_stat_statements` counted it over the ramp.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Statement {
    pub query: String,
    pub calls: u64,
    pub rows: u64,
    pub total_ms: f64,
    pub mean_ms: f64,
}

/// Starts a statement profile: creates `pg_stat_statements` if the server preloads it and zeroes
/// its counters. `false` (and the bench goes on without a profile) when it is not available.
pub async fn statements_reset(db: &mut PgConnection) -> bool {
    let preloaded: Option<String> = sqlx::query_scalar("SELECT current_setting('shared_preload_libraries')")
        .fetch_optional(&mut *db)
        .await
        .ok()
        .flatten();
    if !preloaded.is_some_and(|libs| libs.split(',').any(|l| l.trim() == "pg_stat_statements")) {
        return false;
    }
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&mut *db).await.is_ok()
        && sqlx::query("SELECT pg_stat_statements_reset()").execute(&mut *db).await.is_ok()
}

/// The `limit` statements of every database but pgbench's that took the most execution time
/// since [`statements_reset`], the bench's own queries left out.
pub async fn top_statements(db: &mut PgConnection, limit: i64) -> Result<Vec<Statement>> {
    let rows = sqlx::query(
        "SELECT s.query, s.calls, s.rows, s.total_exec_time AS total_ms, s.mean_exec_time AS mean_ms \
         FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid \
         WHERE r.rolname <> current_user ORDER BY s.total_exec_time DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut *db)
    .await
    .context("reading pg_stat_statements")?;
    rows.iter()
        .map(|row| {
            let query: String = row.try_get("query")?;
            Ok(Statement {
                query: query.split_whitespace().collect::<Vec<_>>().join(" "),
                calls: u64::try_from(row.try_get::<i64, _>("calls")?).unwrap_or(0),
                rows: u64::try_from(row.try_get::<i64, _>("rows")?).unwrap_or(0),
                total_ms: row.try_get("total_ms")?,
                mean_ms: row.try_get("mean_ms")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use sqlx::Connection as _;
    use uuid::Uuid;

    use super::*;

    /// Against a fresh database on the test platform (`SECUREPAY_TEST_PG_ADMIN_URL`); skipped without one.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_window_counts_the_load_payments_that_became_terminal_in_it() {
        let Some(db) = securepay_postgres::testing::TestDb::new().await else { return };
        let mut conn = accounts::connect(&db.admin_url, &db.name).await.unwrap();
        let t0 = 1_800_000_000.0_f64;
        // (from account, created, settled or None, outcome)
        let load = |i| accounts::account_id(i);
        let other = Uuid::from_u128(0xa11ce000_0000_4000_8000_000000000001);
        let payments: Vec<(Uuid, f64, Option<f64>, &str)> = vec![
            (load(0), t0, Some(t0 + 0.1), "COMPLETED"),
            (load(1), t0 + 1.0, Some(t0 + 1.3), "COMPLETED"),
            (load(2), t0 + 2.0, Some(t0 + 2.5), "FAILED"),
            (load(3), t0 - 5.0, Some(t0 + 3.0), "COMPLETED"), // created before, settled inside
            (load(4), t0 + 9.0, Some(t0 + 10.5), "COMPLETED"), // settled after the window
            (load(5), t0 + 9.5, None, "PENDING"),
            (other, t0 + 1.0, Some(t0 + 1.1), "COMPLETED"), // not a load account
        ];
        for (n, (from, created, settled, outcome)) in payments.iter().enumerate() {
            let id = Uuid::from_u128(0xbe4c_0000 + n as u128);
            let mut tx = conn.begin().await.unwrap();
            sqlx::query(
                "INSERT INTO payments.transactions \
                 (payment_id, subject, from_account, to_account, amount, currency, created_at, updated_at) \
                 VALUES ($1, 'load-user-0', $2, $3, 1.00, 'EUR', to_timestamp($4), to_timestamp($4))",
            )
            .bind(id)
            .bind(from)
            .bind(load(9))
            .bind(created)
            .execute(&mut *tx)
            .await
            .unwrap();
            if let Some(settled) = settled {
                sqlx::query(
                    "INSERT INTO payments.transitions (payment_id, from_status, to_status, cause, at) \
                     VALUES ($1, 'PENDING', $2, 'test', to_timestamp($3))",
                )
                .bind(id)
                .bind(outcome)
                .bind(settled)
                .execute(&mut *tx)
                .await
                .unwrap();
                let reason = (*outcome == "FAILED").then_some("insufficient_funds");
                sqlx::query(
                    "UPDATE payments.transactions SET status = $2, failure_reason = $3, updated_at = to_timestamp($4) \
                     WHERE payment_id = $1",
                )
                .bind(id)
                .bind(outcome)
                .bind(reason)
                .bind(settled)
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            tx.commit().await.unwrap();
        }
        let w = window(&mut conn, t0, t0 + 10.0).await.unwrap();
        assert_eq!((w.settled, w.failed), (4, 1), "{w:?}");
        // Settlement times 0.1, 0.3, 0.5 and 8.0 s: continuous percentiles over them.
        let (p50, p99) = (w.p50_s.unwrap(), w.p99_s.unwrap());
        assert!((p50 - 0.4).abs() < 1e-4, "p50 {p50}");
        assert!((p99 - (0.5 + 0.97 * 7.5)).abs() < 1e-4, "p99 {p99}");
        let empty = window(&mut conn, t0 + 100.0, t0 + 110.0).await.unwrap();
        assert_eq!(empty, Window { settled: 0, failed: 0, p50_s: None, p99_s: None });
        assert_eq!(pending_since(&mut conn, t0).await.unwrap(), 1);
        assert_eq!(pending_since(&mut conn, t0 + 9.6).await.unwrap(), 0);
        let (fsync, synchronous_commit) = durability(&mut conn).await.unwrap();
        assert!(!fsync.is_empty() && !synchronous_commit.is_empty());
    }
}
