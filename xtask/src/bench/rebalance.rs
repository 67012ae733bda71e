//! Before a ramp: the load accounts are moved back to their opening balances, THROUGH THE API.
//!
//! Every run moves money between the same load accounts at random, so over runs on one database
//! their balances spread and ever more planned payments meet `422 insufficient_funds`, which
//! counts against "accepted". So each bench run first pays, from the accounts holding more than
//! their opening balance to those holding less, exactly the differences ([`plan`]) — ordinary
//! payments through the gateway, settled by the platform, written to the ledger, so conservation
//! and every per-account ledger check hold as for any other payment — and waits until they are
//! settled. They also warm the platform up (connections, the broker's JIT) before the first step.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rust_decimal::Decimal;
use sqlx::{PgConnection, Row as _};
use uuid::Uuid;

use crate::load::accounts::{self, OPENING_BALANCE_MINOR};
use crate::load::api::{Answer, Gateway};

/// How long the rebalancing payments may take to settle.
const SETTLE_BOUND: Duration = Duration::from_secs(60);
/// Rebalancing payments in flight at once.
const CONCURRENCY: usize = 16;
/// How often one rebalancing payment is sent again after `429` (the per-user limit).
const RATE_LIMITED_RETRIES: u32 = 30;

/// One rebalancing payment between load accounts (indices), in cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub from: usize,
    pub to: usize,
    pub amount_minor: i64,
}

/// The payments that bring every account back to its opening balance, given `deltas[i]` =
/// balance − opening of account `i` (cents; they sum to zero among accounts that only pay each
/// other): deficits are filled from surpluses, both in index order, so at most `n − 1` payments,
/// none larger than the larger of the surplus and the deficit it settles.
pub fn plan(deltas: &[i64]) -> Vec<Transfer> {
    let mut surplus: Vec<(usize, i64)> = deltas.iter().copied().enumerate().filter(|(_, d)| *d > 0).collect();
    let mut deficit: Vec<(usize, i64)> =
        deltas.iter().copied().enumerate().filter(|(_, d)| *d < 0).map(|(i, d)| (i, -d)).collect();
    let (mut s, mut d) = (0, 0);
    let mut transfers = Vec::new();
    while s < surplus.len() && d < deficit.len() {
        let amount_minor = surplus[s].1.min(deficit[d].1);
        transfers.push(Transfer { from: surplus[s].0, to: deficit[d].0, amount_minor });
        surplus[s].1 -= amount_minor;
        deficit[d].1 -= amount_minor;
        if surplus[s].1 == 0 {
            s += 1;
        }
        if deficit[d].1 == 0 {
            d += 1;
        }
    }
    transfers
}

/// balance − opening of load accounts `0..n`, in cents.
async fn deltas(db: &mut PgConnection, n: usize) -> Result<Vec<i64>> {
    let ids: Vec<Uuid> = (0..n).map(accounts::account_id).collect();
    let rows = sqlx::query("SELECT account_id, balance FROM accounts.accounts WHERE account_id = ANY($1)")
        .bind(&ids)
        .fetch_all(&mut *db)
        .await
        .context("reading the load accounts' balances")?;
    let mut deltas = vec![0i64; n];
    for row in rows {
        let id: Uuid = row.try_get("account_id")?;
        let balance: Decimal = row.try_get("balance")?;
        let index = ids.iter().position(|i| *i == id).context("a balance of an account not asked for")?;
        let cents = i64::try_from((balance * Decimal::ONE_HUNDRED).trunc()).context("a balance beyond i64 cents")?;
        deltas[index] = cents - OPENING_BALANCE_MINOR;
    }
    Ok(deltas)
}

/// Pays the [`plan`] of load accounts `0..n` through `gateway` (as each payer, with `tokens`) and
/// waits until every one of those payments is settled; returns how many were made.
pub async fn run(db: &mut PgConnection, gateway: &Gateway, tokens: &[String], n: usize, run_id: &str) -> Result<usize> {
    let transfers = plan(&deltas(db, n).await?);
    let mut ids: Vec<Uuid> = Vec::with_capacity(transfers.len());
    for (chunk_index, chunk) in transfers.chunks(CONCURRENCY).enumerate() {
        let answers = futures_util::future::join_all(chunk.iter().enumerate().map(|(i, t)| {
            let key = format!("rebalance-{run_id}-{}", chunk_index * CONCURRENCY + i);
            let body = serde_json::json!({
                "from_account": accounts::account_id(t.from).to_string(),
                "to_account": accounts::account_id(t.to).to_string(),
                "amount": crate::load::schedule::format_minor(t.amount_minor),
                "currency": accounts::CURRENCY,
            });
            async move {
                // One payer may owe several deficits: its per-user rate limit may answer 429; the
                // same key is sent again once the limit's window has moved on.
                let mut attempts = 0;
                loop {
                    let answer = gateway.create_payment(t.from, &tokens[t.from], &key, body.clone()).await;
                    match &answer {
                        Answer::Error(error) if error.starts_with("429") && attempts < RATE_LIMITED_RETRIES => {
                            attempts += 1;
                            tokio::time::sleep(Duration::from_millis(1100)).await;
                        }
                        _ => return answer,
                    }
                }
            }
        }))
        .await;
        for answer in answers {
            match answer {
                Answer::Payment { view, .. } => ids.push(view.payment_id.parse().context("a payment id")?),
                Answer::Error(error) => bail!("a rebalancing payment was refused: {error}"),
            }
        }
    }
    let started = Instant::now();
    loop {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM payments.transactions WHERE payment_id = ANY($1) AND status = 'PENDING'",
        )
        .bind(&ids)
        .fetch_one(&mut *db)
        .await?;
        if pending == 0 {
            return Ok(ids.len());
        }
        if started.elapsed() > SETTLE_BOUND {
            bail!("{pending} rebalancing payments still PENDING after {} s", SETTLE_BOUND.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(deltas: &[i64], transfers: &[Transfer]) -> Vec<i64> {
        let mut after = deltas.to_vec();
        for t in transfers {
            assert!(t.amount_minor > 0 && t.from != t.to);
            after[t.from] -= t.amount_minor;
            after[t.to] += t.amount_minor;
        }
        after
    }

    #[test]
    fn the_plan_brings_every_account_back_to_its_opening_balance() {
        for deltas in [vec![], vec![0, 0], vec![500, -500], vec![300, -100, -200, 0], vec![-700, 250, 250, 200, 0]] {
            let transfers = plan(&deltas);
            assert!(apply(&deltas, &transfers).iter().all(|d| *d == 0), "{deltas:?} -> {transfers:?}");
            assert!(transfers.len() < deltas.len().max(1), "at most n - 1 payments");
        }
        assert_eq!(plan(&[500, -500]), [Transfer { from: 0, to: 1, amount_minor: 500 }]);
    }

    #[test]
    fn no_payer_pays_more_than_its_surplus() {
        let deltas = [900, -300, 100, -700];
        let transfers = plan(&deltas);
        for i in [0, 2] {
            let paid: i64 = transfers.iter().filter(|t| t.from == i).map(|t| t.amount_minor).sum();
            assert_eq!(paid, deltas[i]);
        }
        assert!(transfers.iter().all(|t| deltas[t.to] < 0), "only accounts below their opening balance are paid");
    }
}
