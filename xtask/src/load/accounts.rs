//! The load accounts: LOAD-TEST DATA, seeded by `cargo xtask load`, never by `up`.
//!
//! Account `i` has the id `10ad0000-0000-4000-8000-<i, 12 hex digits>` and the owner
//! `load-user-<i>`, EUR, with an opening balance of [`OPENING_BALANCE_MINOR`] cents. Like the
//! demo seed (`securepay_postgres::seed_demo`), the balance is inserted as the account's
//! OPENING balance with no ledger rows, and an existing account is left as it is — so re-running
//! reuses the accounts and their current balances, and conservation (sum of balances = sum of
//! opening balances; per account, balance = opening + credits − debits) holds from the insert on.
//!
//! Tokens are minted per owner with the gateway's `token` command and the profile's dev key.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use rust_decimal::Decimal;
use sqlx::{Connection as _, PgConnection, Row as _};
use uuid::Uuid;

use super::stats::ConservationLine;

/// 1000.00 EUR per account.
pub const OPENING_BALANCE_MINOR: i64 = 100_000;
pub const CURRENCY: &str = "EUR";
/// The id prefix marking an account as load-test data.
const ID_PREFIX: u128 = 0x10ad0000_0000_4000_8000_000000000000;
/// Ids are unique for up to 2^48 accounts; far more than `--accounts` allows.
pub const MAX_ACCOUNTS: usize = 1 << 20;

pub fn account_id(i: usize) -> Uuid {
    assert!(i < MAX_ACCOUNTS, "load account index out of range");
    Uuid::from_u128(ID_PREFIX | i as u128)
}

/// The first and last id a load account can have (every id with the load prefix).
pub fn id_range() -> (Uuid, Uuid) {
    (Uuid::from_u128(ID_PREFIX), Uuid::from_u128(ID_PREFIX | 0xffff_ffff_ffff))
}

pub fn owner(i: usize) -> String {
    format!("load-user-{i}")
}

/// Connects to the platform's database as the superuser.
pub async fn connect(admin_url: &str, database: &str) -> Result<PgConnection> {
    let options = securepay_postgres::admin_options(admin_url, database)?;
    PgConnection::connect_with(&options)
        .await
        .context("connecting to PostgreSQL as the superuser (is the platform up?)")
}

/// Inserts the missing load accounts `0..n` in one transaction; returns how many were inserted.
/// Fails if an id of the range belongs to something else (another owner or currency).
pub async fn seed(conn: &mut PgConnection, n: usize) -> Result<u64> {
    let ids: Vec<Uuid> = (0..n).map(account_id).collect();
    let owners: Vec<String> = (0..n).map(owner).collect();
    let mut tx = conn.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO accounts.accounts (account_id, owner, currency, balance, opening_balance) \
         SELECT id, owner, $3, $4, $4 FROM unnest($1::uuid[], $2::text[]) AS t(id, owner) \
         ON CONFLICT (account_id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&owners)
    .bind(CURRENCY)
    .bind(Decimal::new(OPENING_BALANCE_MINOR, 2))
    .execute(&mut *tx)
    .await
    .context("inserting the load accounts")?
    .rows_affected();
    let matching: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM accounts.accounts a JOIN unnest($1::uuid[], $2::text[]) AS t(id, owner) \
         ON a.account_id = t.id AND a.owner = t.owner AND a.currency = $3",
    )
    .bind(&ids)
    .bind(&owners)
    .bind(CURRENCY)
    .fetch_one(&mut *tx)
    .await?;
    if usize::try_from(matching).ok() != Some(n) {
        bail!("{} of the {n} load account ids hold another owner or currency", n as i64 - matching);
    }
    tx.commit().await?;
    Ok(inserted)
}

/// Sums over ALL load accounts (every id with the load prefix, whatever `--accounts` a run used):
/// balances, opening balances, and how many accounts break `balance = opening + credits − debits`
/// against the ledger. Load accounts only ever pay each other, so the balances must sum to the
/// opening balances at every moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audit {
    pub balance: Decimal,
    pub opening: Decimal,
    pub ledger_mismatches: i64,
}

pub async fn audit(conn: &mut PgConnection) -> Result<Audit> {
    let (first, last) = id_range();
    let row = sqlx::query(
        "SELECT coalesce(sum(a.balance), 0) AS balance, coalesce(sum(a.opening_balance), 0) AS opening, \
                count(*) FILTER (WHERE a.balance <> a.opening_balance + coalesce(l.credits, 0) - coalesce(l.debits, 0)) \
                    AS mismatches \
         FROM accounts.accounts a \
         LEFT JOIN (SELECT account_id, \
                           sum(amount) FILTER (WHERE direction = 'CREDIT') AS credits, \
                           sum(amount) FILTER (WHERE direction = 'DEBIT') AS debits \
                    FROM accounts.ledger_entries WHERE account_id BETWEEN $1 AND $2 GROUP BY account_id) l \
                USING (account_id) \
         WHERE a.account_id BETWEEN $1 AND $2",
    )
    .bind(first)
    .bind(last)
    .fetch_one(&mut *conn)
    .await
    .context("auditing the load accounts")?;
    Ok(Audit {
        balance: row.try_get("balance")?,
        opening: row.try_get("opening")?,
        ledger_mismatches: row.try_get("mismatches")?,
    })
}

/// More than all load accounts hold together (in cents): no single one can afford it.
pub fn unaffordable_minor(audit: &Audit) -> Result<i64> {
    let cents = (audit.opening * Decimal::ONE_HUNDRED).trunc();
    i64::try_from(cents).map(|c| c + 100).context("the load accounts' total does not fit in cents")
}

/// Before/after as the report prints it.
pub fn conservation(before: &Audit, after: &Audit) -> ConservationLine {
    let money = |d: Decimal| format!("{d:.2}");
    ConservationLine {
        before: money(before.balance),
        after: money(after.balance),
        opening: money(after.opening),
        ledger_mismatches: after.ledger_mismatches,
    }
}

/// One token per load user `0..n`; see [`mint_tokens_for`].
pub fn mint_tokens(gateway_bin: &Path, dev_key: &Path, n: usize, ttl_seconds: u64) -> Result<Vec<String>> {
    mint_tokens_for(gateway_bin, dev_key, &(0..n).map(owner).collect::<Vec<_>>(), ttl_seconds)
}

/// One token per subject of `owners`, in order, minted by `gateway token --key <dev key> --sub
/// <owner> --ttl <ttl>` (a few processes at a time).
pub fn mint_tokens_for(gateway_bin: &Path, dev_key: &Path, owners: &[String], ttl_seconds: u64) -> Result<Vec<String>> {
    let n = owners.len();
    if !gateway_bin.is_file() {
        bail!("{} is missing: run `cargo xtask up` first", gateway_bin.display());
    }
    if !dev_key.is_file() {
        bail!("{} is missing: run `cargo xtask up` first", dev_key.display());
    }
    let mint = |i: usize| -> Result<String> {
        let out = Command::new(gateway_bin)
            .arg("token")
            .arg("--key")
            .arg(dev_key)
            .args(["--sub", &owners[i], "--ttl", &ttl_seconds.to_string()])
            .output()
            .with_context(|| format!("running {}", gateway_bin.display()))?;
        if !out.status.success() {
            bail!("minting a token for {} failed: {}", owners[i], String::from_utf8_lossy(&out.stderr).trim());
        }
        let token = String::from_utf8(out.stdout).context("the token is not UTF-8")?.trim().to_string();
        if token.split('.').count() != 3 {
            bail!("the gateway's token command printed something that is not a JWT");
        }
        Ok(token)
    };
    const WORKERS: usize = 4;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| scope.spawn(move || (w..n).step_by(WORKERS).map(|i| mint(i).map(|t| (i, t))).collect::<Vec<_>>()))
            .collect();
        let mut tokens = vec![String::new(); n];
        for worker in workers {
            for minted in worker.join().map_err(|_| anyhow::anyhow!("a token worker panicked"))? {
                let (i, token) = minted?;
                tokens[i] = token;
            }
        }
        Ok(tokens)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_accounts_are_recognizable_and_distinct() {
        assert_eq!(account_id(0).to_string(), "10ad0000-0000-4000-8000-000000000000");
        assert_eq!(account_id(199).to_string(), "10ad0000-0000-4000-8000-0000000000c7");
        assert_ne!(account_id(1), account_id(2));
        assert_eq!(owner(7), "load-user-7");
    }

    #[test]
    fn conservation_compares_before_after_and_opening() {
        let a = |balance: i64, opening: i64, m| Audit {
            balance: Decimal::new(balance, 2),
            opening: Decimal::new(opening, 2),
            ledger_mismatches: m,
        };
        assert!(conservation(&a(20_000_000, 20_000_000, 0), &a(20_000_000, 20_000_000, 0)).holds());
        let line = conservation(&a(20_000_000, 20_000_000, 0), &a(19_999_900, 20_000_000, 0));
        assert_eq!((line.before.as_str(), line.after.as_str()), ("200000.00", "199999.00"));
        assert!(!line.holds());
        assert!(!conservation(&a(100, 100, 0), &a(100, 100, 1)).holds());
    }

    /// Against a fresh database on the test platform (`SECUREPAY_TEST_PG_ADMIN_URL`).
    #[tokio::test(flavor = "multi_thread")]
    async fn seeding_is_idempotent_and_the_audit_catches_money_that_moved_outside_the_ledger() {
        let Some(db) = securepay_postgres::testing::TestDb::new().await else { return };
        let mut conn = connect(&db.admin_url, &db.name).await.unwrap();
        assert_eq!(seed(&mut conn, 5).await.unwrap(), 5);
        assert_eq!(seed(&mut conn, 5).await.unwrap(), 0, "existing accounts are reused");
        assert_eq!(seed(&mut conn, 7).await.unwrap(), 2);
        let before = audit(&mut conn).await.unwrap();
        let total = Decimal::new(7 * OPENING_BALANCE_MINOR, 2);
        assert_eq!(before, Audit { balance: total, opening: total, ledger_mismatches: 0 });
        assert_eq!(unaffordable_minor(&before).unwrap(), 7 * OPENING_BALANCE_MINOR + 100);

        // A settlement as the account service writes it: money moves, the sum does not.
        let (payment, amount) = (Uuid::from_u128(0x5e771e), Decimal::new(1250, 2));
        let mut tx = conn.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO accounts.processed_events (event_id, payment_id, outcome) VALUES ($1, $1, 'COMPLETED')",
        )
        .bind(payment)
        .execute(&mut *tx)
        .await
        .unwrap();
        for (account, direction, delta) in [(account_id(0), "DEBIT", -amount), (account_id(1), "CREDIT", amount)] {
            sqlx::query(
                "INSERT INTO accounts.ledger_entries (payment_id, account_id, direction, amount, currency) \
                 VALUES ($1, $2, $3, $4, 'EUR')",
            )
            .bind(payment)
            .bind(account)
            .bind(direction)
            .bind(amount)
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::query("UPDATE accounts.accounts SET balance = balance + $2 WHERE account_id = $1")
                .bind(account)
                .bind(delta)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let after = audit(&mut conn).await.unwrap();
        assert_eq!(after, before, "a settled payment between load accounts keeps the sums");
        assert!(conservation(&before, &after).holds());

        // Money appearing without a ledger row: both checks see it.
        sqlx::query("UPDATE accounts.accounts SET balance = balance + 1 WHERE account_id = $1")
            .bind(account_id(3))
            .execute(&mut conn)
            .await
            .unwrap();
        let broken = audit(&mut conn).await.unwrap();
        assert_eq!(broken.ledger_mismatches, 1);
        assert_eq!(broken.balance, total + Decimal::ONE);
        assert!(!conservation(&before, &broken).holds());

        // An id of the range held by someone else is refused, not silently used.
        sqlx::query(
            "INSERT INTO accounts.accounts (account_id, owner, currency, balance, opening_balance) \
             VALUES ($1, 'mallory', 'EUR', 0, 0)",
        )
        .bind(account_id(8))
        .execute(&mut conn)
        .await
        .unwrap();
        let refused = seed(&mut conn, 9).await.unwrap_err().to_string();
        assert!(refused.contains("1 of the 9 load account ids"), "{refused}");
    }
}
