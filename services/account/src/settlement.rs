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
//! 4. invalidate the cached balances of every account a new settlement touched (after the commit);
//! 5. only then commit the offsets (per partition the highest offset of the round).
//!
//! A crash anywhere before 5 means the round is delivered again: settlement dedupes by event and
//! payment id, so nothing moves twice; a dead letter may be published twice (at-least-once). A poll
//! that fails makes the consumer rejoin its group, so records it may have fetched and dropped are
//! delivered again from the last commit rather than skipped by a later commit.

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
use securepay_ports::ledger::SETTLE_BATCH_LEN_MAX;
use securepay_ports::{
    BalanceCache, Clock, ConsumedRecord, EventConsumer, EventLog, Ids, LedgerStore, OutgoingRecord, PortError,
    PortResult, SettlementRequest, SettlementResult, TopicPartitionOffset,
};
use securepay_proto::convert::decode_initiated;

use crate::metrics;

/// Dead-letter header: why the record was not settled (a stable code, e.g. `undecodable`).
pub const DLQ_REASON_HEADER: &str = "x-securepay-dlq-reason";
/// Dead-letter header: where the record came from, `topic/partition/offset`.
pub const DLQ_SOURCE_HEADER: &str = "x-securepay-dlq-source";
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
        for record in records {
            match decode_initiated(&record.payload, self.config.amount_policy) {
                Ok(event) => {
                    requests.push(SettlementRequest {
                        event_id: event.event_id,
                        transfer: Transfer {
                            payment_id: event.payment_id,
                            from: event.from,
                            to: event.to,
                            amount: event.amount,
                        },
                        outcome_event_id: self.ids.event_id(),
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
            match verdict {
                Ok(settled) => {
                    log_settled(request, settled);
                    metrics::settled(settled);
                    if matches!(settled, Settled::New(_)) {
                        touched.extend([request.transfer.from, request.transfer.to]);
                    }
                    round.settled.push(SettlementResult { event_id: request.event_id, settled });
                }
                Err(reason) => dead.push((record, reason)),
            }
        }

        self.dead_letter(&dead, stop).await?;
        round.dead_lettered = dead.iter().map(|(record, reason)| (record.position.clone(), *reason)).collect();
        self.invalidate(touched).await;
        round.commit = highest_per_partition(records);
        Ok(round)
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
            let span = tracing::info_span!("account.settle", events = batch.len());
            let result = tracing::Instrument::instrument(self.ledger.settle(batch, self.clock.now()), span).await;
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

    /// Drops the cached balances of `accounts` (after their settlement committed). A failure only
    /// leaves a stale advisory balance until the cache's short TTL expires.
    async fn invalidate(&self, accounts: BTreeSet<AccountId>) {
        if accounts.is_empty() {
            return;
        }
        let accounts: Vec<AccountId> = accounts.into_iter().collect();
        for chunk in accounts.chunks(512) {
            if let Err(error) = self.cache.invalidate(chunk).await {
                metrics::cache_invalidation_failed();
                tracing::warn!(%error, accounts = chunk.len(), "balance cache not invalidated; stale until its TTL");
            }
        }
    }
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
