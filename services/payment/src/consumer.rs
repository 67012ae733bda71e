//! The outcome consumer (SPEC §6 step 6): `payment.completed` / `payment.failed` move a payment to
//! its terminal state, idempotently.
//!
//! Per record: decode (`convert::decode_settled`) → read the payment → `Payment::apply` (the one
//! transition table) → `record_transition` (compare-and-set in the store). A redelivered outcome is
//! `AlreadyApplied`: nothing to do. A contradicting outcome (or one the store refuses as
//! `illegal_transition`) is counted in `securepay_illegal_transitions_total`, logged and skipped,
//! so one bad record never blocks its partition; so is an undecodable record or one naming an
//! unknown payment. While the store is unavailable the SAME record is retried with backoff and
//! nothing is committed: offsets are committed only after every record before them is durable.
//! Each record is handled in a `payment.outcome` span parented from the trace context in its headers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use securepay_core::events::PaymentSettled;
use securepay_core::money::AmountPolicy;
use securepay_core::payment::{Applied, Payment};
use securepay_kit::trace;
use securepay_ports::{Clock, ConsumedRecord, EventConsumer, PaymentStore, PortError, TopicPartitionOffset};
use securepay_proto::convert::decode_settled;
use tracing::Instrument as _;

use crate::metrics;

/// What became of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The payment moved to its terminal state.
    Transitioned,
    /// The payment already reflected this outcome (a redelivery).
    AlreadyApplied,
    /// Skipped and counted: an illegal transition, an invalid payload or an unknown payment.
    Skipped(&'static str),
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub amount_policy: AmountPolicy,
    pub batch_len: usize,
    pub poll_wait: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            amount_policy: AmountPolicy::default(),
            batch_len: 128,
            poll_wait: Duration::from_millis(500),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Handles one record. `Err` only when the store is unavailable: retry the same record.
pub async fn handle<S: PaymentStore + ?Sized>(
    store: &S,
    clock: &dyn Clock,
    policy: AmountPolicy,
    record: &ConsumedRecord,
) -> Result<Handled, PortError> {
    let topic = record.position.topic.as_str();
    let settled = match decode_settled(topic, &record.payload, policy) {
        Ok(settled) => settled,
        Err(invalid) => {
            tracing::warn!(
                topic,
                offset = record.position.offset,
                reason = invalid.reason,
                "skipping an invalid outcome event"
            );
            metrics::invalid_event(topic, invalid.reason);
            return Ok(Handled::Skipped(invalid.reason));
        }
    };
    // Two rounds at most: a lost compare-and-set re-reads once and then sees what won.
    for _ in 0..2 {
        let Some(mut payment) = store.get(settled.payment_id).await.map_err(retry_or_skip)? else {
            tracing::warn!(payment_id = %settled.payment_id, "outcome for an unknown payment; skipped");
            metrics::invalid_event(topic, "unknown_payment");
            return Ok(Handled::Skipped("unknown_payment"));
        };
        if !same_terms(&payment, &settled) {
            tracing::warn!(payment_id = %settled.payment_id, "outcome does not match the payment's terms; skipped");
            metrics::invalid_event(topic, "terms_mismatch");
            return Ok(Handled::Skipped("terms_mismatch"));
        }
        let before = payment.status;
        let now = clock.now();
        let transition = match payment.apply(settled.outcome, now) {
            Ok(Applied::AlreadyApplied) => return Ok(Handled::AlreadyApplied),
            Ok(Applied::Transitioned(transition)) => transition,
            Err(illegal) => {
                tracing::warn!(payment_id = %settled.payment_id, %illegal, "illegal transition refused");
                metrics::illegal_transition();
                return Ok(Handled::Skipped("illegal_transition"));
            }
        };
        let reason = settled.failure_reason().map(|r| r.code());
        match store.record_transition(payment.id, &transition, reason).await {
            Ok(()) => {
                metrics::transition(before, transition.to);
                metrics::payment_status(transition.to);
                metrics::settlement((now - payment.created_at).as_seconds_f64());
                tracing::info!(payment_id = %payment.id, status = %transition.to, cause = %transition.cause, "payment settled");
                return Ok(Handled::Transitioned);
            }
            // Someone moved it first (a concurrent redelivery): read again and judge that.
            Err(PortError::Refused { rule: "illegal_transition" }) => continue,
            Err(error @ PortError::Unavailable { .. }) => return Err(error),
            Err(error) => {
                tracing::error!(%error, payment_id = %payment.id, "the store refused a transition; skipped");
                return Ok(Handled::Skipped("store_refused"));
            }
        }
    }
    tracing::warn!(payment_id = %settled.payment_id, "the store refused the transition as illegal");
    metrics::illegal_transition();
    Ok(Handled::Skipped("illegal_transition"))
}

fn same_terms(payment: &Payment, settled: &PaymentSettled) -> bool {
    payment.from == settled.from && payment.to == settled.to && payment.amount == settled.amount
}

/// `Unavailable` is retried; anything else is logged (the caller skips the record).
fn retry_or_skip(error: PortError) -> PortError {
    if !matches!(error, PortError::Unavailable { .. }) {
        tracing::error!(%error, "payment store refused an outcome");
    }
    error
}

/// Consumes until `shutdown` resolves. Commits each polled batch after all its records are handled.
pub async fn run_outcome_consumer<S, C>(
    store: Arc<S>,
    mut consumer: C,
    clock: Arc<dyn Clock>,
    config: ConsumerConfig,
    shutdown: impl Future<Output = ()>,
) where
    S: PaymentStore + ?Sized,
    C: EventConsumer,
{
    tokio::pin!(shutdown);
    let mut backoff = config.backoff_min;
    loop {
        let records = tokio::select! {
            () = &mut shutdown => return,
            polled = consumer.poll(config.batch_len, config.poll_wait) => polled,
        };
        let records = match records {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(%error, "outcome poll failed");
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(config.backoff_max);
                continue;
            }
        };
        backoff = config.backoff_min;
        let mut done: Vec<TopicPartitionOffset> = Vec::with_capacity(records.len());
        for record in &records {
            // Each outcome joins the trace of the payment it settles (the headers it was
            // published with).
            let span = tracing::info_span!("payment.outcome", otel.kind = "consumer", topic = %record.position.topic);
            trace::set_parent(&span, trace::context_from_headers(&record.headers));
            let mut pause = config.backoff_min;
            loop {
                let handled = handle(store.as_ref(), clock.as_ref(), config.amount_policy, record);
                match handled.instrument(span.clone()).await {
                    Ok(_) => break,
                    Err(PortError::Unavailable { .. }) => {
                        tracing::warn!(
                            parent: &span,
                            offset = record.position.offset,
                            "payment store unavailable; retrying the outcome"
                        );
                        tokio::select! {
                            () = &mut shutdown => {
                                commit(&mut consumer, &done).await;
                                return;
                            }
                            () = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(config.backoff_max);
                    }
                    Err(_) => break,
                }
            }
            done.push(record.position.clone());
        }
        commit(&mut consumer, &done).await;
    }
}

/// Commits the highest handled offset per partition. A failed commit only means redelivery.
async fn commit<C: EventConsumer>(consumer: &mut C, done: &[TopicPartitionOffset]) {
    let mut highest: std::collections::BTreeMap<(&str, i32), i64> = std::collections::BTreeMap::new();
    for p in done {
        let entry = highest.entry((p.topic.as_str(), p.partition)).or_insert(p.offset);
        *entry = (*entry).max(p.offset);
    }
    let positions: Vec<TopicPartitionOffset> = highest
        .into_iter()
        .map(|((topic, partition), offset)| TopicPartitionOffset { topic: topic.to_owned(), partition, offset })
        .collect();
    if positions.is_empty() {
        return;
    }
    if let Err(error) = consumer.commit(&positions).await {
        tracing::warn!(%error, "outcome commit failed; the records will be delivered again");
    }
}
