//! The settlement consumer (SPEC §6.5): `payment.initiated` → one store transaction per batch →
//! outcome events in the account outbox.
//!
//! One round:
//! 1. decode every polled record (`decode_initiated`); a record that does not decode or validate is
//!    a dead letter with the decoder's reason;
//! 2. settle the valid ones as ONE batch (`LedgerStore::settle`: dedupe, conditional debit, credit,
//!    ledger rows, outcome event, all in one transaction). While the store is `Unavailable` the SAME
//!    batch is retried with capped backoff — never skipped, never committed. If the store refuses
//!    the batch (`Refused`/`Corrupt`), each event is settled alone so one bad event cannot poison the
//!    others; the ones refused alone become dead letters with the store's rule as reason;
//! 3. publish the dead letters to the dead-letter topic (original key, payload and headers, plus
//!    [`DLQ_REASON_HEADER`] and [`DLQ_SOURCE_HEADER`]), retried until the broker has them;
//! 4. invalidate the cached balances of every account a new settlement touched (after the commit)
//!    by overwriting them with the balances committed by then (read in one statement), or by
//!    deleting them if that read fails;
//! 5. only then commit the offsets (per partition the highest offset of the round).
//!
//! Tracing (SPEC §8): every consumed record gets an `account.settle` consumer span whose parent is
//! the trace context in the record's headers (the payment service's publish), so a payment's trace
//! runs on into its settlement; the outcome event it settles into carries that span's
//! `traceparent` (`SettlementRequest::outcome_headers`), so the trace runs on into the outcome's
//! consumers. The spans live until the round's store transaction committed and
//! its dead letters are durable; the store calls of the round run in an `account.settle_batch`
//! span of their own (one transaction covers events of many traces).
//!
//! A crash anywhere before 5 means the round is delivered again: settlement dedupes by event and
//! payment id, so nothing moves twice; a dead letter may be published twice (at-least-once). A poll
//! that fails makes the consumer rejoin its group, so records it may have fetched and dropped are
//! delivered again from the last commit rather than skipped by a later commit.
//!
//! PLANTED BUGS (feature `planted-bugs`, simulator only, off unless [`PlantedBugs`] switches one
//! on for a run): `commit_offsets_first` commits the round's offsets BEFORE settling it, so a crash
//! in between loses the round; `cache_decides_debit` lets the cached balance decide a debit
//! (`LedgerStore::settle_funds_checked_by_caller`) instead of the store's conditional debit. A build
//! without the feature has neither.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use securepay_core::ids::AccountId;
use securepay_core::ledger::{Settled, Transfer};
use securepay_core::money::AmountPolicy;
use securepay_core::payment::Outcome;
use securepay_core::topology::topic;
use securepay_kit::trace::{self, names};
use securepay_ports::ledger::{ACCOUNTS_LEN_MAX, SETTLE_BATCH_LEN_MAX};
use securepay_ports::{
    BalanceCache, CachedBalance, Clock, ConsumedRecord, EventConsumer, EventLog, Header, Ids, LedgerStore,
    OutgoingRecord, PortError, PortResult, SettlementRequest, SettlementResult, TopicPartitionOffset,
};
use securepay_proto::convert::decode_initiated;
use time::OffsetDateTime;

use crate::metrics;

/// Dead-letter header: why the record was not settled (a stable code, e.g. `undecodable`).
pub const DLQ_REASON_HEADER: &str = "x-securepay-dlq-reason";
/// Dead-letter header: where the record came from, `topic/partition/offset`.
pub const DLQ_SOURCE_HEADER: &str = "x-securepay-dlq-source";
/// The span around one store call settling a batch (a child of no single trace: the batch holds
/// events of many).
pub const SETTLE_BATCH_SPAN: &str = "account.settle_batch";

/// Dead-letter reason when the store cannot read back the data an event needs (never retried).
pub const REASON_STORE_CORRUPT: &str = "store_corrupt";

/// How the consumer runs. The topic names are configuration so tests can use their own; the
/// binary uses the production names ([`SettlementConfig::production`]).
#[derive(Debug, Clone)]
pub struct SettlementConfig {
    /// The dead-letter topic (`payment.initiated.dlq`).
    pub dlq_topic: String,
    /// Most events settled per transaction (at most `SETTLE_BATCH_LEN_MAX`).
    pub batch_len: usize,
    /// How long one poll waits for the first record.
    pub poll_wait: Duration,
    /// First pause after a failed call; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Bounds on an event's amount. The per-payment maximum is the payment service's rule, checked
    /// when it accepted the payment; an accepted event is not refused here for its size.
    pub amount_policy: AmountPolicy,
    /// The simulator's planted bugs (all off by default; see the module docs).
    #[cfg(feature = "planted-bugs")]
    pub planted: PlantedBugs,
}

/// PLANTED BUGS, simulator only (feature `planted-bugs`): switches a sim run turns on to prove its
/// invariants catch them. All off by default.
#[cfg(feature = "planted-bugs")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// Commit the round's offsets before the settlement transaction (a crash between loses it).
    pub commit_offsets_first: bool,
    /// Debit whenever the CACHED balance of the payer covers the amount, without the store's check.
    pub cache_decides_debit: bool,
}

impl SettlementConfig {
    pub fn new(dlq_topic: impl Into<String>) -> SettlementConfig {
        SettlementConfig {
            dlq_topic: dlq_topic.into(),
            batch_len: 64,
            poll_wait: Duration::from_millis(200),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            amount_policy: AmountPolicy { maximum: Decimal::MAX },
            #[cfg(feature = "planted-bugs")]
            planted: PlantedBugs::default(),
        }
    }

    pub fn production() -> SettlementConfig {
        SettlementConfig::new(topic::PAYMENT_INITIATED_DLQ)
    }
}

/// The ports settlement works with, and its configuration.
pub struct Settler<L, C> {
    pub ledger: Arc<L>,
    pub cache: Arc<C>,
    /// Where dead letters are published.
    pub dlq: Arc<dyn EventLog>,
    pub ids: Arc<dyn Ids>,
    pub clock: Arc<dyn Clock>,
    pub config: SettlementConfig,
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Settled events in record order: new verdicts and duplicates.
    pub settled: Vec<SettlementResult>,
    /// Records sent to the dead-letter topic, with their reason.
    pub dead_lettered: Vec<(TopicPartitionOffset, &'static str)>,
    /// The positions to commit: per partition the highest offset of the round.
    pub commit: Vec<TopicPartitionOffset>,
}

/// The round was abandoned because shutdown was requested while waiting to retry; nothing of it
/// was committed, so it is delivered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// A shutdown future that can be awaited any number of times (it stays fired once fired).
pub struct Shutdown<'a> {
    future: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    fired: bool,
}

impl<'a> Shutdown<'a> {
    pub fn new(future: impl Future<Output = ()> + Send + 'a) -> Shutdown<'a> {
        Shutdown { future: Box::pin(future), fired: false }
    }

    /// A shutdown that never comes.
    pub fn never() -> Shutdown<'static> {
        Shutdown::new(std::future::pending())
    }

    /// Resolves when shutdown was requested (at once if it already was).
    pub async fn wait(&mut self) {
        if !self.fired {
            (&mut self.future).await;
            self.fired = true;
        }
    }

    /// Sleeps `pause`, unless shutdown comes first.
    async fn pause(&mut self, pause: Duration) -> Result<(), Stopped> {
        tokio::select! {
            () = self.wait() => Err(Stopped),
            () = tokio::time::sleep(pause) => Ok(()),
        }
    }
}

struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(config: &SettlementConfig) -> Backoff {
        Backoff { next: config.backoff_min, min: config.backoff_min, max: config.backoff_max }
    }

    fn next(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Consumes until `shutdown` resolves. `join` makes a consumer-group member subscribed to
/// `payment.initiated`; it is called again (with backoff) whenever a poll fails, so delivery
/// resumes from the last committed offset. The round in progress when shutdown comes is finished
/// (or, if it is waiting to retry, abandoned uncommitted) before this returns.
pub async fn run_settlement<L, C, E, J>(settler: &Settler<L, C>, mut join: J, shutdown: impl Future<Output = ()> + Send)
where
    L: LedgerStore,
    C: BalanceCache,
    E: EventConsumer,
    J: FnMut() -> PortResult<E>,
{
    let mut stop = Shutdown::new(shutdown);
    let mut backoff = Backoff::new(&settler.config);
    let batch_len = settler.config.batch_len.clamp(1, SETTLE_BATCH_LEN_MAX);
    'join: loop {
        let mut consumer = match join() {
            Ok(consumer) => consumer,
            Err(error) => {
                let pause = backoff.next();
                tracing::warn!(%error, retry_in_ms = pause.as_millis() as u64, "cannot join the consumer group");
                if stop.pause(pause).await.is_err() {
                    return;
                }
                continue 'join;
            }
        };
        loop {
            let polled = tokio::select! {
                () = stop.wait() => return,
                polled = consumer.poll(batch_len, settler.config.poll_wait) => polled,
            };
            let records = match polled {
                Ok(records) => records,
                Err(error) => {
                    let pause = backoff.next();
                    tracing::warn!(%error, retry_in_ms = pause.as_millis() as u64,
                        "poll failed; rejoining so delivery resumes from the last committed offset");
                    drop(consumer);
                    if stop.pause(pause).await.is_err() {
                        return;
                    }
                    continue 'join;
                }
            };
            backoff.reset();
            if records.is_empty() {
                continue;
            }
            #[cfg(feature = "planted-bugs")]
            if settler.config.planted.commit_offsets_first {
                // PLANTED BUG: the offsets move before the round's settlement is durable.
                if let Err(error) = consumer.commit(&highest_per_partition(&records)).await {
                    tracing::warn!(%error, "early offset commit failed");
                }
            }
            let Ok(round) = settler.settle_round(&records, &mut stop).await else {
                tracing::info!("shutdown while retrying a round; it stays uncommitted and is delivered again");
                return;
            };
            if let Err(error) = consumer.commit(&round.commit).await {
                // Safe: the round's effects are durable and deduplicated when delivered again.
                tracing::warn!(%error, "offset commit failed; the round will be delivered again and deduplicated");
            }
        }
    }
}

impl<L: LedgerStore, C: BalanceCache> Settler<L, C> {
    /// Settles one round of consumed records (steps 1–4 of the module docs) and returns the
    /// positions to commit. `Err(Stopped)` only when shutdown came while waiting to retry.
    pub async fn settle_round(&self, records: &[ConsumedRecord], stop: &mut Shutdown<'_>) -> Result<Round, Stopped> {
        let mut requests = Vec::new();
        let mut sources = Vec::new();
        let mut dead: Vec<(&ConsumedRecord, &'static str)> = Vec::new();
        // One consumer span per record, continuing the producer's trace; kept until the round's
        // store transaction committed and its dead letters are published (end of this function).
        let spans: BTreeMap<&TopicPartitionOffset, tracing::Span> =
            records.iter().map(|record| (&record.position, settle_span(record))).collect();
        for record in records {
            match decode_initiated(&record.payload, self.config.amount_policy) {
                Ok(event) => {
                    let span = spans.get(&record.position).cloned().unwrap_or_else(tracing::Span::none);
                    span.record("payment_id", tracing::field::display(event.payment_id));
                    span.record("event_id", tracing::field::display(event.event_id));
                    requests.push(SettlementRequest {
                        event_id: event.event_id,
                        transfer: Transfer {
                            payment_id: event.payment_id,
                            from: event.from,
                            to: event.to,
                            amount: event.amount,
                        },
                        outcome_event_id: self.ids.event_id(),
                        outcome_headers: outcome_headers(&span, record),
                    });
                    sources.push(record);
                }
                Err(invalid) => dead.push((record, invalid.reason)),
            }
        }

        let started = tokio::time::Instant::now();
        let verdicts = self.settle_isolating(&requests, stop).await?;
        metrics::settle_batch(requests.len(), started.elapsed());

        let mut round = Round::default();
        let mut touched = BTreeSet::new();
        for ((request, record), verdict) in requests.iter().zip(&sources).zip(verdicts) {
            let span = spans.get(&record.position).cloned().unwrap_or_else(tracing::Span::none);
            match verdict {
                Ok(settled) => {
                    span.in_scope(|| log_settled(request, settled));
                    metrics::settled(settled);
                    if matches!(settled, Settled::New(_)) {
                        touched.extend([request.transfer.from, request.transfer.to]);
                    }
                    round.settled.push(SettlementResult { event_id: request.event_id, settled });
                }
                Err(reason) => dead.push((record, reason)),
            }
        }
        for (record, reason) in &dead {
            if let Some(span) = spans.get(&record.position) {
                span.record("dead_letter", *reason);
            }
        }

        self.dead_letter(&dead, stop).await?;
        round.dead_lettered = dead.iter().map(|(record, reason)| (record.position.clone(), *reason)).collect();
        self.refresh_cache(touched).await;
        round.commit = highest_per_partition(records);
        drop(spans);
        Ok(round)
    }

    /// The store settles `batch`: it alone decides every debit (unless a planted bug says otherwise).
    async fn store_settle(
        &self,
        batch: &[SettlementRequest],
        now: OffsetDateTime,
    ) -> PortResult<Vec<SettlementResult>> {
        #[cfg(feature = "planted-bugs")]
        if self.config.planted.cache_decides_debit {
            // PLANTED BUG: the cached balance of the payer decides whether the debit goes through.
            let mut funded = Vec::with_capacity(batch.len());
            for request in batch {
                let transfer = &request.transfer;
                let cached = self.cache.get(transfer.from).await;
                funded.push(matches!(cached, Ok(Some(hit))
                    if hit.account.id == transfer.from
                        && hit.account.currency == transfer.amount.currency()
                        && hit.account.balance >= transfer.amount.value()));
            }
            return self.ledger.settle_funds_checked_by_caller(batch, &funded, now).await;
        }
        self.ledger.settle(batch, now).await
    }

    /// Settles `requests` as one batch; if the store refuses the batch, settles each alone. Per
    /// request: its result, or the reason it was refused alone.
    async fn settle_isolating(
        &self,
        requests: &[SettlementRequest],
        stop: &mut Shutdown<'_>,
    ) -> Result<Vec<Result<Settled, &'static str>>, Stopped> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        match self.settle_retrying(requests, stop).await? {
            Ok(results) => return Ok(results.into_iter().map(|r| Ok(r.settled)).collect()),
            Err(error) if requests.len() == 1 => return Ok(vec![Err(refusal_reason(&error))]),
            Err(error) => {
                tracing::warn!(%error, events = requests.len(), "batch refused; settling its events one by one")
            }
        }
        let mut verdicts = Vec::with_capacity(requests.len());
        for request in requests {
            let verdict = match self.settle_retrying(std::slice::from_ref(request), stop).await? {
                Ok(results) => Ok(results[0].settled),
                Err(error) => Err(refusal_reason(&error)),
            };
            verdicts.push(verdict);
        }
        Ok(verdicts)
    }

    /// `settle`, retried with capped backoff while the store is unavailable. Returns the store's
    /// answer otherwise (`Refused`/`Corrupt` included).
    async fn settle_retrying(
        &self,
        batch: &[SettlementRequest],
        stop: &mut Shutdown<'_>,
    ) -> Result<PortResult<Vec<SettlementResult>>, Stopped> {
        let mut backoff = Backoff::new(&self.config);
        loop {
            let span = tracing::info_span!(SETTLE_BATCH_SPAN, events = batch.len());
            let result = tracing::Instrument::instrument(self.store_settle(batch, self.clock.now()), span).await;
            match result {
                Err(PortError::Unavailable { component }) => {
                    let pause = backoff.next();
                    tracing::warn!(
                        component,
                        events = batch.len(),
                        retry_in_ms = pause.as_millis() as u64,
                        "settlement store unavailable; retrying the same batch"
                    );
                    stop.pause(pause).await?;
                }
                Ok(results) if results.len() != batch.len() => {
                    return Ok(Err(PortError::Corrupt { what: "settle returned a result per request".into() }));
                }
                other => return Ok(other),
            }
        }
    }

    /// Publishes the dead letters, retried until the broker has them.
    async fn dead_letter(
        &self,
        dead: &[(&ConsumedRecord, &'static str)],
        stop: &mut Shutdown<'_>,
    ) -> Result<(), Stopped> {
        if dead.is_empty() {
            return Ok(());
        }
        let letters: Vec<OutgoingRecord> = dead
            .iter()
            .map(|(record, reason)| {
                let p = &record.position;
                let mut headers = record.headers.clone();
                headers.push((DLQ_REASON_HEADER.to_owned(), (*reason).to_owned()));
                headers.push((DLQ_SOURCE_HEADER.to_owned(), format!("{}/{}/{}", p.topic, p.partition, p.offset)));
                OutgoingRecord {
                    topic: self.config.dlq_topic.clone(),
                    key: record.key.clone(),
                    payload: record.payload.clone(),
                    headers,
                }
            })
            .collect();
        let mut backoff = Backoff::new(&self.config);
        while let Err(error) = self.dlq.publish(&letters).await {
            let pause = backoff.next();
            tracing::warn!(%error, retry_in_ms = pause.as_millis() as u64, "dead-letter publish failed; retrying");
            stop.pause(pause).await?;
        }
        for (record, reason) in dead {
            let p = &record.position;
            securepay_kit::metrics::dead_letter(topic::PAYMENT_INITIATED_DLQ, reason);
            tracing::warn!(topic = %p.topic, partition = p.partition, offset = p.offset, key = %record.key, reason,
                dlq_topic = %self.config.dlq_topic, "record dead-lettered");
        }
        Ok(())
    }

    /// Invalidates the cached balances of `accounts` (after their settlement committed) by
    /// overwriting them with the balances committed now — read in one statement AFTER the commit,
    /// so never older than it — which keeps the next balance checks of busy accounts cache hits;
    /// if that read fails, the entries are deleted instead. A failure of both only leaves a stale
    /// advisory balance until the cache's short TTL expires.
    async fn refresh_cache(&self, accounts: BTreeSet<AccountId>) {
        if accounts.is_empty() {
            return;
        }
        let accounts: Vec<AccountId> = accounts.into_iter().collect();
        for chunk in accounts.chunks(ACCOUNTS_LEN_MAX) {
            let read_at = self.clock.now();
            let refreshed = match self.ledger.accounts(chunk).await {
                Ok(views) => {
                    let balances: Vec<CachedBalance> = views
                        .into_iter()
                        .flatten()
                        .map(|account| CachedBalance { account, cached_at: read_at })
                        .collect();
                    self.cache.put_many(&balances, crate::CACHE_TTL_S).await
                }
                Err(error) => Err(error),
            };
            if let Err(error) = refreshed {
                tracing::debug!(%error, accounts = chunk.len(), "cached balances not refreshed; deleting them");
                if let Err(error) = self.cache.invalidate(chunk).await {
                    metrics::cache_invalidation_failed();
                    tracing::warn!(%error, accounts = chunk.len(), "balance cache not invalidated; stale until its TTL");
                }
            }
        }
    }
}

/// The `account.settle` consumer span of one record, parented from its trace headers.
fn settle_span(record: &ConsumedRecord) -> tracing::Span {
    let p = &record.position;
    let span = tracing::info_span!(
        names::ACCOUNT_SETTLE,
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.destination.name = %p.topic,
        messaging.kafka.partition = p.partition,
        messaging.kafka.offset = p.offset,
        payment_id = tracing::field::Empty,
        event_id = tracing::field::Empty,
        dead_letter = tracing::field::Empty,
    );
    trace::set_parent(&span, trace::context_from_headers(&record.headers));
    span
}

/// The headers of the outcome event that settling `record` writes: the trace context of its
/// `account.settle` span, so the outcome's consumers (`payment.outcome`, `notification.record`)
/// continue the payment's trace. Without an OpenTelemetry layer (simulation) the span has none;
/// then the trace context `record` came with is passed on, so the outcome stays in its trace.
fn outcome_headers(span: &tracing::Span, record: &ConsumedRecord) -> Vec<Header> {
    let headers = trace::headers_for_span(span);
    if !headers.is_empty() {
        return headers;
    }
    record.headers.iter().filter(|(name, _)| trace::is_trace_header(name)).cloned().collect()
}

fn refusal_reason(error: &PortError) -> &'static str {
    match error {
        PortError::Refused { rule } => rule,
        PortError::Corrupt { .. } | PortError::Unavailable { .. } => REASON_STORE_CORRUPT,
    }
}

fn log_settled(request: &SettlementRequest, settled: Settled) {
    let outcome = settled.outcome();
    let reason = match outcome {
        Outcome::Completed => None,
        Outcome::Failed(reason) => Some(reason.code()),
    };
    tracing::info!(
        payment_id = %request.transfer.payment_id,
        event_id = %request.event_id,
        outcome = outcome.status().as_str(),
        reason,
        duplicate = matches!(settled, Settled::Duplicate(_)),
        "payment settled"
    );
}

/// Per partition, the highest offset among `records`.
fn highest_per_partition(records: &[ConsumedRecord]) -> Vec<TopicPartitionOffset> {
    let mut highest: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for r in records {
        let p = &r.position;
        let entry = highest.entry((p.topic.as_str(), p.partition)).or_insert(p.offset);
        *entry = (*entry).max(p.offset);
    }
    highest
        .into_iter()
        .map(|((topic, partition), offset)| TopicPartitionOffset { topic: topic.to_owned(), partition, offset })
        .collect()
}

#[cfg(test)]
mod tests {
    //! The round's control flow against the in-memory twins (fast, deterministic). The same code
    //! against the real components: `tests/settlement.rs` and `tests/binary.rs`.

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use securepay_core::events::PaymentInitiated;
    use securepay_core::ids::{EventId, PaymentId, Subject};
    use securepay_core::money::{Amount, Currency};
    use securepay_memory::{MemoryBalanceCache, MemoryEventLog, MemoryLedgerStore, SeededIds, SimClock};
    use securepay_ports::{AccountView, CachedBalance, Outbox, OutboxEvent};
    use time::OffsetDateTime;

    use super::*;

    const TOPIC: &str = "payment.initiated";
    const DLQ: &str = "payment.initiated.dlq";

    /// The memory store behind switches: the next `outages` calls are `Unavailable`; a batch
    /// naming `refused` is refused whole. Records the length of every batch it is asked to settle.
    struct Switched {
        inner: MemoryLedgerStore,
        outages: AtomicUsize,
        refused: Option<PaymentId>,
        batches: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl Outbox for Switched {
        async fn unpublished(&self, limit: usize) -> PortResult<Vec<OutboxEvent>> {
            self.inner.unpublished(limit).await
        }
        async fn mark_published(&self, sequences: &[i64]) -> PortResult<()> {
            self.inner.mark_published(sequences).await
        }
    }

    #[async_trait]
    impl LedgerStore for Switched {
        async fn settle(&self, batch: &[SettlementRequest], now: OffsetDateTime) -> PortResult<Vec<SettlementResult>> {
            self.batches.lock().unwrap().push(batch.len());
            if self.outages.load(Ordering::SeqCst) > 0 {
                self.outages.fetch_sub(1, Ordering::SeqCst);
                return Err(PortError::Unavailable { component: "postgresql" });
            }
            if batch.iter().any(|r| Some(r.transfer.payment_id) == self.refused) {
                return Err(PortError::Refused { rule: "test_rule" });
            }
            self.inner.settle(batch, now).await
        }
        async fn account(&self, id: AccountId) -> PortResult<Option<AccountView>> {
            self.inner.account(id).await
        }
    }

    struct World {
        log: MemoryEventLog,
        store: MemoryLedgerStore,
        cache: Arc<MemoryBalanceCache>,
        alice: AccountId,
        bob: AccountId,
    }

    fn eur() -> Currency {
        Currency::from_code("EUR").unwrap()
    }

    fn world() -> World {
        let store = MemoryLedgerStore::new();
        let (alice, bob) = (AccountId::from_uuid(SeededIds.uuid()), AccountId::from_uuid(SeededIds.uuid()));
        store.open(alice, Subject::parse("alice").unwrap(), eur(), Decimal::from(100)).unwrap();
        store.open(bob, Subject::parse("bob").unwrap(), eur(), Decimal::ZERO).unwrap();
        World { log: MemoryEventLog::with_partitions(1), store, cache: Arc::new(MemoryBalanceCache::new()), alice, bob }
    }

    fn payment(w: &World, amount: &str) -> (PaymentId, OutgoingRecord) {
        let event = PaymentInitiated {
            event_id: EventId::from_uuid(SeededIds.uuid()),
            payment_id: PaymentId::from_uuid(SeededIds.uuid()),
            subject: Subject::parse("alice").unwrap(),
            from: w.alice,
            to: w.bob,
            amount: Amount::parse(amount, eur(), AmountPolicy::default()).unwrap(),
            occurred_at: OffsetDateTime::now_utc(),
        };
        let record = OutgoingRecord {
            topic: TOPIC.into(),
            key: "one-partition".into(),
            payload: securepay_proto::convert::encode_initiated(&event),
            headers: vec![("traceparent".into(), "00-t".into())],
        };
        (event.payment_id, record)
    }

    fn settler(w: &World, outages: usize, refused: Option<PaymentId>) -> Settler<Switched, MemoryBalanceCache> {
        let ledger =
            Switched { inner: w.store.clone(), outages: AtomicUsize::new(outages), refused, batches: Mutex::default() };
        let config = SettlementConfig {
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(4),
            ..SettlementConfig::new(DLQ)
        };
        Settler {
            ledger: Arc::new(ledger),
            cache: Arc::clone(&w.cache),
            dlq: Arc::new(w.log.clone()),
            ids: Arc::new(SeededIds),
            clock: Arc::new(SimClock),
            config,
        }
    }

    async fn poll_all(w: &World, group: &str) -> Vec<ConsumedRecord> {
        w.log.consumer(group, &[TOPIC]).poll(100, Duration::from_millis(10)).await.unwrap()
    }

    #[tokio::test]
    async fn an_outage_retries_the_same_batch_until_it_commits() {
        let w = world();
        let records: Vec<OutgoingRecord> = (0..5).map(|_| payment(&w, "1.00").1).collect();
        w.log.publish(&records).await.unwrap();
        let s = settler(&w, 3, None);
        let round = s.settle_round(&poll_all(&w, "g").await, &mut Shutdown::never()).await.unwrap();
        assert_eq!(*s.ledger.batches.lock().unwrap(), [5, 5, 5, 5], "the same batch, retried whole");
        assert_eq!(round.settled.len(), 5);
        assert!(round.dead_lettered.is_empty());
        assert_eq!(round.commit.len(), 1);
        assert_eq!(round.commit[0].offset, 4, "the highest offset of the round");
        assert_eq!(w.store.ledger().balance(w.bob), Some(Decimal::from(5)));
        // No OpenTelemetry layer here (as in simulation): each outcome keeps its payment's trace.
        let outcomes = w.store.unpublished(10).await.unwrap();
        assert_eq!(outcomes.len(), 5);
        assert!(outcomes.iter().all(|e| e.headers == [("traceparent".to_owned(), "00-t".to_owned())]), "{outcomes:?}");
    }

    #[tokio::test]
    async fn shutdown_during_an_outage_abandons_the_round_uncommitted() {
        let w = world();
        w.log.publish(&[payment(&w, "1.00").1]).await.unwrap();
        let s = settler(&w, usize::MAX, None);
        let records = poll_all(&w, "g").await;
        let mut stop = Shutdown::new(tokio::time::sleep(Duration::from_millis(30)));
        assert_eq!(s.settle_round(&records, &mut stop).await, Err(Stopped));
        assert_eq!(w.store.ledger().balance(w.bob), Some(Decimal::ZERO));
    }

    #[tokio::test]
    async fn an_event_refused_by_the_store_is_dead_lettered_alone() {
        let w = world();
        let (first, a) = payment(&w, "1.00");
        let (bad, b) = payment(&w, "2.00");
        let (last, c) = payment(&w, "4.00");
        w.log.publish(&[a, b.clone(), c]).await.unwrap();
        let mut dlq = w.log.consumer("dlq-reader", &[DLQ]);
        let s = settler(&w, 0, Some(bad));
        let round = s.settle_round(&poll_all(&w, "g").await, &mut Shutdown::never()).await.unwrap();
        assert_eq!(*s.ledger.batches.lock().unwrap(), [3, 1, 1, 1], "the batch, then each event alone");
        assert_eq!(round.dead_lettered.len(), 1);
        assert_eq!(round.dead_lettered[0].1, "test_rule");
        assert_eq!(w.store.ledger().balance(w.bob), Some(Decimal::from(5)), "the other two settled");
        assert!(w.store.ledger().outcome(first).is_some() && w.store.ledger().outcome(last).is_some());
        let letters = dlq.poll(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].payload, b.payload);
        assert_eq!(letters[0].key, b.key);
        let headers: Vec<(&str, &str)> = letters[0].headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            headers,
            [("traceparent", "00-t"), (DLQ_REASON_HEADER, "test_rule"), (DLQ_SOURCE_HEADER, "payment.initiated/0/1")]
        );
        assert_eq!(round.commit[0].offset, 2, "the refused event is passed, not retried forever");
    }

    #[tokio::test]
    async fn the_loop_commits_after_settling_and_refreshes_the_cache() {
        let w = world();
        let stale = CachedBalance {
            account: AccountView {
                id: w.bob,
                owner: Subject::parse("bob").unwrap(),
                currency: eur(),
                balance: Decimal::ZERO,
            },
            cached_at: OffsetDateTime::now_utc(),
        };
        w.cache.put(&stale, 60).await.unwrap();
        let mut records: Vec<OutgoingRecord> = (0..3).map(|_| payment(&w, "1.00").1).collect();
        records.push(OutgoingRecord { payload: b"garbage".to_vec(), ..records[0].clone() });
        w.log.publish(&records).await.unwrap();
        let s = settler(&w, 1, None);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let log = w.log.clone();
        let running = async {
            run_settlement(&s, || Ok(log.consumer("account", &[TOPIC])), async move { drop(stop_rx.await) }).await;
        };
        let watching = async {
            while w.log.committed("account", TOPIC, 0) != Some(4) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop_tx.send(()).unwrap();
        };
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(running, watching) })
            .await
            .expect("the loop settled, committed and stopped");
        assert_eq!(w.store.ledger().balance(w.bob), Some(Decimal::from(3)));
        let cached = w.cache.get(w.bob).await.unwrap().expect("refreshed after the commit");
        assert_eq!(cached.account.balance, Decimal::from(3), "the stale balance was overwritten by the committed one");

        // A cache that cannot take the refresh still loses the stale entry: it is deleted.
        w.cache.put(&stale, 60).await.unwrap();
        let s = settler(&w, 1, None);
        let failing = Settler {
            ledger: s.ledger,
            cache: Arc::new(NoPutMany(Arc::clone(&w.cache))),
            dlq: s.dlq,
            ids: s.ids,
            clock: s.clock,
            config: s.config,
        };
        failing.refresh_cache([w.bob].into_iter().collect()).await;
        assert_eq!(w.cache.get(w.bob).await.unwrap(), None, "invalidated when the refresh failed");
    }

    /// A cache whose `put_many` fails (and whose other calls reach the twin).
    struct NoPutMany(Arc<MemoryBalanceCache>);

    #[async_trait::async_trait]
    impl BalanceCache for NoPutMany {
        async fn get(&self, id: AccountId) -> PortResult<Option<CachedBalance>> {
            self.0.get(id).await
        }
        async fn put(&self, balance: &CachedBalance, ttl_s: u32) -> PortResult<()> {
            self.0.put(balance, ttl_s).await
        }
        async fn invalidate(&self, ids: &[AccountId]) -> PortResult<()> {
            self.0.invalidate(ids).await
        }
        async fn put_many(&self, _balances: &[CachedBalance], _ttl_s: u32) -> PortResult<()> {
            Err(PortError::Unavailable { component: "redis" })
        }
    }

    #[cfg(feature = "planted-bugs")]
    #[test]
    fn planted_bugs_are_off_by_default() {
        let off = PlantedBugs { commit_offsets_first: false, cache_decides_debit: false };
        assert_eq!(PlantedBugs::default(), off);
        assert_eq!(SettlementConfig::production().planted, off);
        assert_eq!(SettlementConfig::new(DLQ).planted, off);
    }

    /// Runs the loop against a store that is down until `committed` (the group's committed offset
    /// of partition 0 once the store was asked `asks` times) is known; returns it.
    #[cfg(feature = "planted-bugs")]
    async fn committed_while_the_store_is_down(planted: PlantedBugs) -> Option<i64> {
        let w = world();
        w.log.publish(&[payment(&w, "1.00").1]).await.unwrap();
        let mut s = settler(&w, usize::MAX, None);
        s.config.planted = planted;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let log = w.log.clone();
        let running = async {
            run_settlement(&s, || Ok(log.consumer("account", &[TOPIC])), async move { drop(stop_rx.await) }).await;
        };
        let watching = async {
            // The store has been asked several times: the round is stuck retrying, uncommitted
            // unless the offsets were committed first.
            while s.ledger.batches.lock().unwrap().len() < 5 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let committed = w.log.committed("account", TOPIC, 0);
            stop_tx.send(()).unwrap();
            committed
        };
        let (_, committed) = tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(running, watching) })
            .await
            .expect("the loop retried the store and stopped");
        assert_eq!(w.store.ledger().balance(w.bob), Some(Decimal::ZERO), "nothing settled while the store is down");
        committed
    }

    #[cfg(feature = "planted-bugs")]
    #[tokio::test]
    async fn offsets_wait_for_the_store_unless_the_commit_first_bug_is_planted() {
        assert_eq!(committed_while_the_store_is_down(PlantedBugs::default()).await, None, "off: nothing committed");
        let planted = PlantedBugs { commit_offsets_first: true, ..PlantedBugs::default() };
        assert_eq!(committed_while_the_store_is_down(planted).await, Some(1), "planted: committed before settling");
    }
}
