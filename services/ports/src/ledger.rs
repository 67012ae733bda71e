//! The account service's store (balances, ledger, processed events, outbox) and its balance cache.

use async_trait::async_trait;
use rust_decimal::Decimal;
use securepay_core::events::PaymentSettled;
use securepay_core::ids::{AccountId, EventId, Subject};
use securepay_core::ledger::{Settled, Transfer};
use securepay_core::money::Currency;
use securepay_core::payment::Outcome;
use time::OffsetDateTime;

use crate::error::{PortError, PortResult};
use crate::event_log::Header;
use crate::outbox::Outbox;

/// Most requests one `settle` call accepts: bounds a batch's locks and its transaction's duration.
pub const SETTLE_BATCH_LEN_MAX: usize = 256;

/// Most accounts one `LedgerStore::accounts` read or `BalanceCache::put_many` takes (a full
/// settlement batch touches twice [`SETTLE_BATCH_LEN_MAX`]).
pub const ACCOUNTS_LEN_MAX: usize = 2 * SETTLE_BATCH_LEN_MAX;

/// The preconditions every `LedgerStore::settle` checks before touching state: a batch of at most
/// [`SETTLE_BATCH_LEN_MAX`] requests, none paying an account to itself (upstream refuses such a
/// payment, so an event carrying one is invalid input for the dead-letter queue, not a verdict).
pub fn check_batch(batch: &[SettlementRequest]) -> PortResult<()> {
    if batch.len() > SETTLE_BATCH_LEN_MAX {
        return Err(PortError::Refused { rule: "settle_batch_len_max" });
    }
    if batch.iter().any(|r| r.transfer.from == r.transfer.to) {
        return Err(PortError::Refused { rule: "transfer_same_account" });
    }
    Ok(())
}

/// One `payment.initiated` event to settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementRequest {
    pub event_id: EventId,
    pub transfer: Transfer,
    /// Event id of the outcome event (`payment.completed`/`failed`) written if this settles now.
    /// Minted by the caller; when the request turns out to be a duplicate it is simply unused.
    pub outcome_event_id: EventId,
    /// Headers stored with the outcome event and published with it: the W3C trace context
    /// (`traceparent`) of the span that settled this request, so the outcome's consumers continue
    /// the payment's trace. Empty when there is none.
    pub outcome_headers: Vec<Header>,
}

impl SettlementRequest {
    /// The outcome event (`payment.completed` / `payment.failed`) a store writes to its outbox when
    /// this request settles now with `outcome`.
    pub fn outcome_event(&self, outcome: Outcome, now: OffsetDateTime) -> PaymentSettled {
        let transfer = self.transfer;
        PaymentSettled {
            event_id: self.outcome_event_id,
            payment_id: transfer.payment_id,
            from: transfer.from,
            to: transfer.to,
            amount: transfer.amount,
            outcome,
            occurred_at: now,
        }
    }
}

/// What settling one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettlementResult {
    pub event_id: EventId,
    pub settled: Settled,
}

#[async_trait]
pub trait LedgerStore: Outbox {
    /// Settles a batch (refused whole unless [`check_batch`] passes). For EACH request, atomically: skip it if its event id (or its payment id)
    /// was processed before (`Settled::Duplicate` with the first verdict); else decide by
    /// `securepay_core::ledger::verdict` against the committed balances, debit the payer only if
    /// funds suffice (a CHECK ≥ 0 is the last guard), credit the payee, write two ledger rows,
    /// record the event as processed and put the outcome event in the outbox with the request's
    /// `outcome_headers` (each request its own). The whole batch
    /// commits or none of it does; an `Err` means nothing was written. Results are in request order.
    async fn settle(&self, batch: &[SettlementRequest], now: OffsetDateTime) -> PortResult<Vec<SettlementResult>>;

    /// The committed balance, currency and owner of an account.
    async fn account(&self, id: AccountId) -> PortResult<Option<AccountView>>;

    /// `account` of each of `ids` (at most [`ACCOUNTS_LEN_MAX`]), answer `i` for `ids[i]`; a store
    /// reads them in one statement where it can. The default asks one by one.
    async fn accounts(&self, ids: &[AccountId]) -> PortResult<Vec<Option<AccountView>>> {
        if ids.len() > ACCOUNTS_LEN_MAX {
            return Err(PortError::Refused { rule: "accounts_len_max" });
        }
        let mut views = Vec::with_capacity(ids.len());
        for id in ids {
            views.push(self.account(*id).await?);
        }
        Ok(views)
    }

    /// PLANTED BUG `cache_decided_debit`, simulator only (feature `planted-bugs`, never in a
    /// production build): [`LedgerStore::settle`], except that a request whose `funded` flag is
    /// set is debited WITHOUT the store's funds check (the caller decided it can pay). `funded`
    /// has one flag per request. Stores that do not plant bugs refuse it (the default).
    #[cfg(feature = "planted-bugs")]
    async fn settle_funds_checked_by_caller(
        &self,
        batch: &[SettlementRequest],
        funded: &[bool],
        now: OffsetDateTime,
    ) -> PortResult<Vec<SettlementResult>> {
        let _ = (batch, funded, now);
        Err(PortError::Refused { rule: "planted_bug_unsupported" })
    }
}

/// An account as read from the store of record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    pub id: AccountId,
    pub owner: Subject,
    pub currency: Currency,
    pub balance: Decimal,
}

/// A balance as cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBalance {
    pub account: AccountView,
    pub cached_at: OffsetDateTime,
}

/// Cache-aside balances (SPEC §6.3). Advisory only: never consulted to decide a debit. Every
/// method may fail with `Unavailable`; callers then fall back to the store, never to an error.
#[async_trait]
pub trait BalanceCache: Send + Sync + 'static {
    async fn get(&self, id: AccountId) -> PortResult<Option<CachedBalance>>;
    /// Stores with a short TTL (seconds), bounding how stale a read can be if an invalidation is lost.
    async fn put(&self, balance: &CachedBalance, ttl_s: u32) -> PortResult<()>;
    /// Called after every committed balance change.
    async fn invalidate(&self, ids: &[AccountId]) -> PortResult<()>;
    /// `put` of each of `balances` (at most [`ACCOUNTS_LEN_MAX`]); a cache writes them in one round
    /// trip where it can. The default puts one by one.
    async fn put_many(&self, balances: &[CachedBalance], ttl_s: u32) -> PortResult<()> {
        if balances.len() > ACCOUNTS_LEN_MAX {
            return Err(PortError::Refused { rule: "accounts_len_max" });
        }
        for balance in balances {
            self.put(balance, ttl_s).await?;
        }
        Ok(())
    }
}
