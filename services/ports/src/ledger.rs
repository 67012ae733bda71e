//! The account service's store (balances, ledger, processed events, outbox) and its balance cache.

use async_trait::async_trait;
use rust_decimal::Decimal;
use securepay_core::ids::{AccountId, EventId, Subject};
use securepay_core::ledger::{Settled, Transfer};
use securepay_core::money::Currency;
use time::OffsetDateTime;

use crate::error::PortResult;
use crate::payments::OutboxEvent;

/// One `payment.initiated` event to settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementRequest {
    pub event_id: EventId,
    pub transfer: Transfer,
    /// Event id of the outcome event (`payment.completed`/`failed`) written if this settles now;
    /// minted by the caller so a redelivery of the same request mints nothing new.
    pub outcome_event_id: EventId,
}

/// What settling one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettlementResult {
    pub event_id: EventId,
    pub settled: Settled,
}

#[async_trait]
pub trait LedgerStore: Send + Sync + 'static {
    /// Settles a batch. For EACH request, atomically: skip it if its event id (or its payment id)
    /// was processed before (`Settled::Duplicate` with the first verdict); else decide by
    /// `securepay_core::ledger::verdict` against the committed balances, debit the payer only if
    /// funds suffice (a CHECK ≥ 0 is the last guard), credit the payee, write two ledger rows,
    /// record the event as processed and put the outcome event in the outbox. The whole batch
    /// commits or none of it does; an `Err` means nothing was written. Results are in request order.
    async fn settle(&self, batch: &[SettlementRequest], now: OffsetDateTime) -> PortResult<Vec<SettlementResult>>;

    /// The committed balance, currency and owner of an account.
    async fn account(&self, id: AccountId) -> PortResult<Option<AccountView>>;

    /// Unpublished outcome events, in sequence order (at-least-once, as `PaymentStore::unpublished`).
    async fn unpublished(&self, limit: usize) -> PortResult<Vec<OutboxEvent>>;

    async fn mark_published(&self, sequences: &[i64]) -> PortResult<()>;
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
}
