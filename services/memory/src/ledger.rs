//! `MemoryLedgerStore`: the account service's [`LedgerStore`] as the core ledger model behind one
//! mutex.
//!
//! It keeps the port's promises the way `PgLedgerStore` does, so the simulator tests the same
//! contract the production store keeps:
//! - single writer: one `std::sync::Mutex`, never held across an `.await` (every method does its
//!   work synchronously, then returns);
//! - a batch is atomic: it is checked whole first (`check_batch`; a refused batch writes nothing),
//!   then applied under the one lock, where no request can fail (each gets its verdict), so no
//!   other call ever sees part of a batch;
//! - dedupe by event id AND by payment id: a request whose event, or whose payment, was processed
//!   before is `Settled::Duplicate(first verdict)` and writes nothing (no money, no outbox event);
//! - the verdict is `securepay_core::ledger`'s, the one settlement rule;
//! - each new settlement puts exactly one outcome event (`events.v1.PaymentCompleted` or
//!   `PaymentFailed`, protobuf) in the outbox, in commit order, with its request's
//!   `outcome_headers` (one value per header name, the last given, as a PostgreSQL row holds them).
//!
//! PLANTED BUGS (feature `planted-bugs`, simulator only; off unless switched on): with
//! [`MemoryLedgerStore::plant_skip_dedupe`] a redelivered event is applied again; with
//! `LedgerStore::settle_funds_checked_by_caller` a request the caller flagged as funded is debited
//! without the funds check. Neither exists in a build without the feature.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use rust_decimal::Decimal;
use securepay_core::ids::{AccountId, EventId, PaymentId, Subject};
use securepay_core::ledger::{Ledger, OpenError, Settled};
use securepay_core::money::Currency;
use securepay_core::payment::Outcome;
use securepay_ports::{
    AccountView, LedgerStore, Outbox, OutboxEvent, PortError, PortResult, SettlementRequest, SettlementResult,
};
use time::OffsetDateTime;

use crate::outbox::OutboxRows;

/// Most outbox events one `unpublished`/`mark_published` call handles (as `PgLedgerStore`).
pub const OUTBOX_BATCH_LEN_MAX: usize = 1024;

/// The in-memory store of record. Clones share one state (see the crate docs on crash semantics).
#[derive(Debug, Clone, Default)]
pub struct MemoryLedgerStore {
    state: Arc<Mutex<LedgerSnapshot>>,
    /// PLANTED BUG `skip_settlement_dedupe` (see the module docs).
    #[cfg(feature = "planted-bugs")]
    skip_dedupe: Arc<std::sync::atomic::AtomicBool>,
}

/// Everything the store has committed: a copy of it is a snapshot of the "disk".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerSnapshot {
    ledger: Ledger,
    owners: BTreeMap<AccountId, Subject>,
    /// Processed `payment.initiated` events and the payment each settled.
    processed_events: BTreeMap<EventId, PaymentId>,
    outbox: OutboxRows,
}

impl MemoryLedgerStore {
    pub fn new() -> MemoryLedgerStore {
        MemoryLedgerStore::default()
    }

    /// A store whose state is `snapshot` (a restart from a copied disk).
    pub fn restore(snapshot: LedgerSnapshot) -> MemoryLedgerStore {
        MemoryLedgerStore {
            state: Arc::new(Mutex::new(snapshot)),
            #[cfg(feature = "planted-bugs")]
            skip_dedupe: Arc::default(),
        }
    }

    /// A copy of everything committed so far.
    pub fn snapshot(&self) -> LedgerSnapshot {
        self.lock().clone()
    }

    /// Opens an account (the only way money enters, as the seed does for PostgreSQL).
    pub fn open(&self, id: AccountId, owner: Subject, currency: Currency, opening: Decimal) -> Result<(), OpenError> {
        let mut state = self.lock();
        state.ledger.open(id, currency, opening)?;
        state.owners.insert(id, owner);
        Ok(())
    }

    /// A copy of the ledger model: balances, verdicts and ledger rows, for invariant checks.
    pub fn ledger(&self) -> Ledger {
        self.lock().ledger.clone()
    }

    /// PLANTED BUG `skip_settlement_dedupe`, simulator only: while on, `settle` skips the replay
    /// check, so a redelivered event (or a second event of a settled payment) takes effect again.
    /// Shared by every clone.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_skip_dedupe(&self, on: bool) {
        self.skip_dedupe.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Settles `batch` atomically, deciding each request (with its index) by `one`.
    fn settle_with(
        &self,
        batch: &[SettlementRequest],
        mut one: impl FnMut(&mut LedgerSnapshot, usize, &SettlementRequest) -> Settled,
    ) -> PortResult<Vec<SettlementResult>> {
        securepay_ports::ledger::check_batch(batch)?;
        let mut state = self.lock();
        let before = state.ledger.totals();
        let results: Vec<SettlementResult> = batch
            .iter()
            .enumerate()
            .map(|(i, request)| SettlementResult { event_id: request.event_id, settled: one(&mut state, i, request) })
            .collect();
        assert_eq!(state.ledger.totals(), before, "a settlement batch changed a currency's total");
        Ok(results)
    }

    fn lock(&self) -> MutexGuard<'_, LedgerSnapshot> {
        // A panic while holding the lock happens only on a broken invariant (the totals check),
        // which already failed the run.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl LedgerSnapshot {
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The first verdict of this request's event or payment, if either was processed.
    fn verdict_of(&self, request: &SettlementRequest) -> Option<Outcome> {
        let payment = self.processed_events.get(&request.event_id).copied();
        let payment = payment.unwrap_or(request.transfer.payment_id);
        self.ledger.outcome(payment)
    }

    fn settle_one(&mut self, request: &SettlementRequest, now: OffsetDateTime) -> Settled {
        if let Some(first) = self.verdict_of(request) {
            return Settled::Duplicate(first);
        }
        let settled = self.ledger.settle(&request.transfer);
        let Settled::New(outcome) = settled else {
            unreachable!("verdict_of saw no settlement of this payment, the model did");
        };
        self.record_new(request, outcome, now);
        settled
    }

    /// The planted-bug variant of [`LedgerSnapshot::settle_one`] (see the module docs).
    #[cfg(feature = "planted-bugs")]
    fn settle_one_planted(
        &mut self,
        request: &SettlementRequest,
        now: OffsetDateTime,
        dedupe: bool,
        funds_check: bool,
    ) -> Settled {
        if dedupe && let Some(first) = self.verdict_of(request) {
            return Settled::Duplicate(first);
        }
        let settled = self.ledger.settle_planted(&request.transfer, dedupe, funds_check);
        if let Settled::New(outcome) = settled {
            self.record_new(request, outcome, now);
        }
        settled
    }

    /// Records a new settlement: the event as processed, its outcome event in the outbox.
    fn record_new(&mut self, request: &SettlementRequest, outcome: Outcome, now: OffsetDateTime) {
        self.processed_events.insert(request.event_id, request.transfer.payment_id);
        let event = request.outcome_event(outcome, now);
        self.outbox.push(OutboxEvent {
            sequence: self.outbox.next_sequence(),
            topic: event.topic().to_owned(),
            key: event.payment_id.to_string(),
            payload: securepay_proto::convert::encode_settled(&event),
            headers: outbox_headers(&request.outcome_headers),
        });
    }
}

/// Headers as an outbox row keeps them: one value per name (the last given), in name order, the
/// way `PgLedgerStore`'s JSON object column reads back.
fn outbox_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers.iter().cloned().collect::<BTreeMap<String, String>>().into_iter().collect()
}

#[async_trait]
impl LedgerStore for MemoryLedgerStore {
    async fn settle(&self, batch: &[SettlementRequest], now: OffsetDateTime) -> PortResult<Vec<SettlementResult>> {
        #[cfg(feature = "planted-bugs")]
        if self.skip_dedupe.load(std::sync::atomic::Ordering::SeqCst) {
            return self.settle_with(batch, |state, _, request| state.settle_one_planted(request, now, false, true));
        }
        self.settle_with(batch, |state, _, request| state.settle_one(request, now))
    }

    #[cfg(feature = "planted-bugs")]
    async fn settle_funds_checked_by_caller(
        &self,
        batch: &[SettlementRequest],
        funded: &[bool],
        now: OffsetDateTime,
    ) -> PortResult<Vec<SettlementResult>> {
        if funded.len() != batch.len() {
            return Err(PortError::Refused { rule: "funded_len" });
        }
        let dedupe = !self.skip_dedupe.load(std::sync::atomic::Ordering::SeqCst);
        self.settle_with(batch, |state, i, request| state.settle_one_planted(request, now, dedupe, !funded[i]))
    }

    async fn account(&self, id: AccountId) -> PortResult<Option<AccountView>> {
        let state = self.lock();
        let Some(account) = state.ledger.account(id) else { return Ok(None) };
        let owner = state
            .owners
            .get(&id)
            .cloned()
            .ok_or_else(|| PortError::Corrupt { what: "account without owner".into() })?;
        Ok(Some(AccountView { id, owner, currency: account.currency, balance: account.balance }))
    }
}

#[async_trait]
impl Outbox for MemoryLedgerStore {
    async fn unpublished(&self, limit: usize) -> PortResult<Vec<OutboxEvent>> {
        let limit = limit.min(OUTBOX_BATCH_LEN_MAX);
        Ok(self.lock().outbox.unpublished(limit))
    }

    async fn mark_published(&self, sequences: &[i64]) -> PortResult<()> {
        if sequences.len() > OUTBOX_BATCH_LEN_MAX {
            return Err(PortError::Refused { rule: "outbox_batch_len_max" });
        }
        self.lock().outbox.mark_published(sequences);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use securepay_proto::events::v1 as wire;
    use std::str::FromStr;

    use securepay_core::ledger::{Direction, Transfer};
    use securepay_core::money::{Amount, AmountPolicy};
    use securepay_core::payment::FailureReason;
    use uuid::Uuid;

    use super::*;

    const INSUFFICIENT: Outcome = Outcome::Failed(FailureReason::InsufficientFunds);

    fn eur() -> Currency {
        Currency::from_code("EUR").unwrap()
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    /// Ids from a counter: tests need distinct ids, not random ones.
    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn account(n: u128) -> AccountId {
        AccountId::from_uuid(id(n))
    }

    fn store_with(balances: &[(u128, &str)]) -> MemoryLedgerStore {
        let store = MemoryLedgerStore::new();
        for &(n, opening) in balances {
            store
                .open(account(n), Subject::parse("alice").unwrap(), eur(), Decimal::from_str(opening).unwrap())
                .unwrap();
        }
        store
    }

    /// Payment `n`, event `1000 + n`, outcome event `2000 + n`.
    fn request(n: u128, from: u128, to: u128, amount: &str) -> SettlementRequest {
        SettlementRequest {
            event_id: EventId::from_uuid(id(1000 + n)),
            transfer: Transfer {
                payment_id: PaymentId::from_uuid(id(n)),
                from: account(from),
                to: account(to),
                amount: Amount::parse(amount, eur(), AmountPolicy::default()).unwrap(),
            },
            outcome_event_id: EventId::from_uuid(id(2000 + n)),
            outcome_headers: vec![("traceparent".into(), format!("00-{:032x}-{:016x}-01", n, n))],
        }
    }

    async fn settled(store: &MemoryLedgerStore, batch: &[SettlementRequest]) -> Vec<Settled> {
        store.settle(batch, now()).await.unwrap().into_iter().map(|r| r.settled).collect()
    }

    async fn balances(store: &MemoryLedgerStore, ns: &[u128]) -> Vec<Decimal> {
        let mut out = Vec::new();
        for &n in ns {
            out.push(store.account(account(n)).await.unwrap().unwrap().balance);
        }
        out
    }

    #[tokio::test]
    async fn a_completed_settlement_moves_the_amount_writes_two_rows_and_one_outcome_event() {
        let store = store_with(&[(1, "100.00"), (2, "0")]);
        let r = request(10, 1, 2, "30.25");
        assert_eq!(settled(&store, std::slice::from_ref(&r)).await, [Settled::New(Outcome::Completed)]);
        assert_eq!(
            balances(&store, &[1, 2]).await,
            [Decimal::from_str("69.75").unwrap(), Decimal::from_str("30.25").unwrap()]
        );
        let rows: Vec<_> = store.ledger().entries().iter().map(|e| (e.account, e.direction)).collect();
        assert_eq!(rows, [(account(1), Direction::Debit), (account(2), Direction::Credit)]);
        let outbox = store.unpublished(100).await.unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(
            (outbox[0].topic.as_str(), outbox[0].key.clone()),
            ("payment.completed", r.transfer.payment_id.to_string())
        );
        let event = wire::PaymentCompleted::decode(outbox[0].payload.as_slice()).unwrap();
        assert_eq!(event.event_id, r.outcome_event_id.to_string());
        assert_eq!(outbox[0].headers, r.outcome_headers, "its settling span's trace context");
        assert_eq!(event.amount.map(|m| (m.amount, m.currency)), Some(("30.25".into(), "EUR".into())));
    }

    #[tokio::test]
    async fn an_unaffordable_settlement_fails_moves_nothing_and_still_writes_its_outcome_event() {
        let store = store_with(&[(1, "10.00"), (2, "0")]);
        assert_eq!(settled(&store, &[request(10, 1, 2, "10.01")]).await, [Settled::New(INSUFFICIENT)]);
        assert_eq!(balances(&store, &[1, 2]).await, [Decimal::from(10), Decimal::ZERO]);
        let outbox = store.unpublished(100).await.unwrap();
        let event = wire::PaymentFailed::decode(outbox[0].payload.as_slice()).unwrap();
        assert_eq!((outbox[0].topic.as_str(), event.reason.as_str()), ("payment.failed", "insufficient_funds"));
    }

    #[tokio::test]
    async fn a_redelivered_event_is_a_duplicate_with_the_first_verdict_and_writes_nothing() {
        let store = store_with(&[(1, "10.00"), (2, "100.00")]);
        let r = request(10, 1, 2, "50.00");
        assert_eq!(settled(&store, std::slice::from_ref(&r)).await, [Settled::New(INSUFFICIENT)]);
        // Funds arrive; the payment was decided already.
        assert_eq!(settled(&store, &[request(11, 2, 1, "90.00")]).await, [Settled::New(Outcome::Completed)]);
        assert_eq!(settled(&store, &[r.clone(), r]).await, [Settled::Duplicate(INSUFFICIENT); 2]);
        assert_eq!(balances(&store, &[1, 2]).await, [Decimal::from(100), Decimal::from(10)]);
        assert_eq!(store.unpublished(100).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_new_event_for_a_settled_payment_is_a_duplicate_even_within_one_batch() {
        let store = store_with(&[(1, "100.00"), (2, "0")]);
        let first = request(10, 1, 2, "25.00");
        let again = SettlementRequest { event_id: EventId::from_uuid(id(99)), ..first.clone() };
        assert_eq!(
            settled(&store, &[first, again]).await,
            [Settled::New(Outcome::Completed), Settled::Duplicate(Outcome::Completed)]
        );
        assert_eq!(balances(&store, &[1, 2]).await, [Decimal::from(75), Decimal::from(25)]);
        assert_eq!(store.ledger().entries().len(), 2);
    }

    #[tokio::test]
    async fn a_refused_batch_writes_nothing_at_all() {
        let store = store_with(&[(1, "100.00"), (2, "0")]);
        let before = store.snapshot();
        let batch = [request(10, 1, 2, "10.00"), request(11, 1, 1, "10.00")];
        assert_eq!(store.settle(&batch, now()).await, Err(PortError::Refused { rule: "transfer_same_account" }));
        let too_long = vec![request(12, 1, 2, "1.00"); securepay_ports::ledger::SETTLE_BATCH_LEN_MAX + 1];
        assert!(store.settle(&too_long, now()).await.is_err());
        assert_eq!(store.snapshot(), before);
    }

    #[tokio::test]
    async fn a_batch_decides_in_order_against_the_balances_before_it() {
        let store = store_with(&[(1, "100.00"), (2, "50.00"), (3, "0")]);
        let batch = [
            request(10, 1, 2, "60.00"),
            request(11, 1, 3, "60.00"),
            request(12, 2, 3, "110.00"),
            request(13, 3, 9, "1.00"),
        ];
        assert_eq!(
            settled(&store, &batch).await,
            [
                Settled::New(Outcome::Completed),
                Settled::New(INSUFFICIENT),
                Settled::New(Outcome::Completed),
                Settled::New(Outcome::Failed(FailureReason::UnknownAccount)),
            ]
        );
        assert_eq!(balances(&store, &[1, 2, 3]).await, [Decimal::from(40), Decimal::ZERO, Decimal::from(110)]);
    }

    #[tokio::test]
    async fn outbox_events_stay_unpublished_until_marked_in_sequence_order() {
        let store = store_with(&[(1, "100.00"), (2, "0")]);
        let batch: Vec<_> = (0..5).map(|n| request(10 + n, 1, 2, "1.00")).collect();
        store.settle(&batch, now()).await.unwrap();
        let all = store.unpublished(100).await.unwrap();
        assert!(all.windows(2).all(|w| w[0].sequence < w[1].sequence));
        assert_eq!(store.unpublished(2).await.unwrap(), all[..2]);
        store.mark_published(&[all[0].sequence, all[2].sequence]).await.unwrap();
        store.mark_published(&[all[0].sequence]).await.expect("idempotent");
        assert_eq!(store.unpublished(100).await.unwrap(), [all[1].clone(), all[3].clone(), all[4].clone()]);
    }

    #[tokio::test]
    async fn a_clone_shares_the_state_and_a_restored_snapshot_keeps_what_was_committed() {
        let store = store_with(&[(1, "100.00"), (2, "0")]);
        let durable = store.clone();
        store.settle(&[request(10, 1, 2, "40.00")], now()).await.unwrap();
        assert_eq!(durable.ledger().balance(account(2)), Some(Decimal::from(40)));
        let restarted = MemoryLedgerStore::restore(durable.snapshot());
        assert_eq!(settled(&restarted, &[request(10, 1, 2, "40.00")]).await, [Settled::Duplicate(Outcome::Completed)]);
        assert_eq!(restarted.account(account(1)).await.unwrap().unwrap().owner.as_str(), "alice");
    }

    #[cfg(feature = "planted-bugs")]
    #[tokio::test]
    async fn planted_skip_dedupe_is_off_by_default_and_applies_a_redelivery_again_when_on() {
        let store = store_with(&[(1, "100.00"), (2, "0")]);
        let r = request(10, 1, 2, "10.00");
        settled(&store, std::slice::from_ref(&r)).await;
        assert_eq!(settled(&store, std::slice::from_ref(&r)).await, [Settled::Duplicate(Outcome::Completed)]);
        store.clone().plant_skip_dedupe(true);
        assert_eq!(settled(&store, std::slice::from_ref(&r)).await, [Settled::New(Outcome::Completed)]);
        assert_eq!(store.ledger().entries().len(), 4, "the payment moved twice");
        assert_eq!(balances(&store, &[1, 2]).await, [Decimal::from(80), Decimal::from(20)]);
    }

    #[cfg(feature = "planted-bugs")]
    #[tokio::test]
    async fn planted_funds_checked_by_caller_debits_a_flagged_request_past_zero_and_only_that_one() {
        let store = store_with(&[(1, "10.00"), (2, "0")]);
        let batch = [request(10, 1, 2, "30.00"), request(11, 1, 2, "30.00")];
        assert!(store.settle_funds_checked_by_caller(&batch, &[true], now()).await.is_err(), "one flag per request");
        assert_eq!(
            store
                .settle_funds_checked_by_caller(&batch, &[true, false], now())
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.settled)
                .collect::<Vec<_>>(),
            [Settled::New(Outcome::Completed), Settled::New(INSUFFICIENT)]
        );
        assert_eq!(balances(&store, &[1, 2]).await, [Decimal::from(-20), Decimal::from(30)]);
        assert_eq!(settled(&store, &batch[..1]).await, [Settled::Duplicate(Outcome::Completed)], "still deduped");
    }
}
