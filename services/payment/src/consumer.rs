//! The outcome consumer (SPEC §6 step 6): `payment.completed` / `payment.failed` move a payment to
//! its terminal state, idempotently.
//!
//! Per polled batch ([`handle_batch`]): decode every record (`convert::decode_settled`) → read all
//! their payments in ONE call (`PaymentStore::get_many`) → judge each record in delivery order
//! with `Payment::apply` (the one transition table) on a working copy, so two outcomes of one
//! payment in a batch are judged as if they came one after the other: the first transitions, an
//! equal second is `AlreadyApplied`, a contradicting one illegal → write every transition in ONE
//! store transaction (`PaymentStore::record_transitions`, compare-and-set per payment). A
//! redelivered outcome is `AlreadyApplied`: nothing to do. A contradicting outcome (or one the
//! store refuses as `illegal_transition`) is counted in `securepay_illegal_transitions_total`,
//! logged and skipped, so one bad record never blocks its partition; so is an undecodable record
//! or one naming an unknown payment. A transition that lost its compare-and-set to a concurrent
//! writer is judged again alone ([`handle`]: re-read, then judge what won), together with every
//! later record of its payment; if the store refuses the batch as a whole, every record is
//! handled alone, so one bad record cannot take its neighbours down.
//!
//! While the store is unavailable the SAME batch is retried with backoff and nothing is
//! committed: offsets are committed only after the batch's store call returned. Each record is
//! handled in a `payment.outcome` span parented from the trace context in its headers; the
//! batch's store calls run in a [`OUTCOME_BATCH_SPAN`] span of their own.
//!
//! PLANTED BUG (feature `planted-bugs`, simulator only, off unless [`PlantedBugs`] switches it on
//! for a run): `ack_batch_before_commit` commits a batch's offsets BEFORE its store transaction,
//! so a crash in between loses the batch's outcomes. A build without the feature does not have it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::collections::{BTreeMap, BTreeSet};

use securepay_core::events::PaymentSettled;
use securepay_core::ids::PaymentId;
use securepay_core::money::AmountPolicy;
use securepay_core::payment::{Applied, IllegalTransition, Payment, PaymentStatus, Transition};
use securepay_kit::trace;
use securepay_ports::payments::PAYMENT_BATCH_LEN_MAX;
use securepay_ports::{
    Clock, ConsumedRecord, EventConsumer, PaymentStore, PortError, PortResult, TopicPartitionOffset, TransitionRecord,
};
use securepay_proto::convert::decode_settled;
use time::OffsetDateTime;
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

/// The span around a batch's store calls (a child of no single trace: the batch holds outcomes
/// of many).
pub const OUTCOME_BATCH_SPAN: &str = "payment.outcome_batch";

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub amount_policy: AmountPolicy,
    /// Most records per poll, hence per store transaction (at most `PAYMENT_BATCH_LEN_MAX`).
    pub batch_len: usize,
    pub poll_wait: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The simulator's planted bug (off by default; see the module docs).
    #[cfg(feature = "planted-bugs")]
    pub planted: PlantedBugs,
}

/// PLANTED BUGS, simulator only (feature `planted-bugs`): switches a sim run turns on to prove its
/// invariants catch them. All off by default.
#[cfg(feature = "planted-bugs")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// Commit a batch's offsets before its store transaction (a crash between loses the batch).
    pub ack_batch_before_commit: bool,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            amount_policy: AmountPolicy::default(),
            batch_len: 128,
            poll_wait: Duration::from_millis(500),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            #[cfg(feature = "planted-bugs")]
            planted: PlantedBugs::default(),
        }
    }
}

/// Handles one record alone (the path of a record whose batch could not decide it). `Err` only
/// when the store is unavailable: retry the same record.
pub async fn handle<S: PaymentStore + ?Sized>(
    store: &S,
    clock: &dyn Clock,
    policy: AmountPolicy,
    record: &ConsumedRecord,
) -> Result<Handled, PortError> {
    let topic = record.position.topic.as_str();
    let settled = match decode(record, policy) {
        Ok(settled) => settled,
        Err(skipped) => return Ok(skipped),
    };
    // Two rounds at most: a lost compare-and-set re-reads once and then sees what won.
    for _ in 0..2 {
        let mut payment = store.get(settled.payment_id).await.map_err(retry_or_skip)?;
        let now = clock.now();
        let (transition, before, created_at) = match judge(payment.as_mut(), &settled, now) {
            Judged::Transition { transition, before, created_at } => (transition, before, created_at),
            other => return Ok(report(topic, &settled, other)),
        };
        let reason = settled.failure_reason().map(|r| r.code());
        match store.record_transition(settled.payment_id, &transition, reason).await {
            Ok(()) => return Ok(transitioned(&settled, &transition, before, created_at, now)),
            // Someone moved it first (a concurrent redelivery): read again and judge that.
            Err(PortError::Refused { rule: "illegal_transition" }) => continue,
            Err(error @ PortError::Unavailable { .. }) => return Err(error),
            Err(error) => return Ok(store_refused(&settled, &error)),
        }
    }
    tracing::warn!(payment_id = %settled.payment_id, "the store refused the transition as illegal");
    metrics::illegal_transition();
    Ok(Handled::Skipped("illegal_transition"))
}

/// What the transition table says about one outcome for the payment as it stands (`None`: no
/// such payment). A `Transition` has been applied to `payment`, so a later outcome of the same
/// payment is judged against the moved payment.
#[derive(Debug)]
enum Judged {
    Unknown,
    TermsMismatch,
    AlreadyApplied,
    Illegal(IllegalTransition),
    Transition { transition: Transition, before: PaymentStatus, created_at: OffsetDateTime },
}

fn judge(payment: Option<&mut Payment>, settled: &PaymentSettled, now: OffsetDateTime) -> Judged {
    let Some(payment) = payment else { return Judged::Unknown };
    if !same_terms(payment, settled) {
        return Judged::TermsMismatch;
    }
    let before = payment.status;
    match payment.apply(settled.outcome, now) {
        Ok(Applied::AlreadyApplied) => Judged::AlreadyApplied,
        Ok(Applied::Transitioned(transition)) => {
            Judged::Transition { transition, before, created_at: payment.created_at }
        }
        Err(illegal) => Judged::Illegal(illegal),
    }
}

/// Logs and counts a judgement that writes nothing (a `Transition` is reported by
/// [`transitioned`] once written).
fn report(topic: &str, settled: &PaymentSettled, judged: Judged) -> Handled {
    match judged {
        Judged::Unknown => {
            tracing::warn!(payment_id = %settled.payment_id, "outcome for an unknown payment; skipped");
            metrics::invalid_event(topic, "unknown_payment");
            Handled::Skipped("unknown_payment")
        }
        Judged::TermsMismatch => {
            tracing::warn!(payment_id = %settled.payment_id, "outcome does not match the payment's terms; skipped");
            metrics::invalid_event(topic, "terms_mismatch");
            Handled::Skipped("terms_mismatch")
        }
        Judged::AlreadyApplied => Handled::AlreadyApplied,
        Judged::Illegal(illegal) => {
            tracing::warn!(payment_id = %settled.payment_id, %illegal, "illegal transition refused");
            metrics::illegal_transition();
            Handled::Skipped("illegal_transition")
        }
        Judged::Transition { .. } => unreachable!("a transition is reported once written"),
    }
}

fn transitioned(
    settled: &PaymentSettled,
    transition: &Transition,
    before: PaymentStatus,
    created_at: OffsetDateTime,
    now: OffsetDateTime,
) -> Handled {
    metrics::transition(before, transition.to);
    metrics::payment_status(transition.to);
    metrics::settlement((now - created_at).as_seconds_f64());
    tracing::info!(payment_id = %settled.payment_id, status = %transition.to, cause = %transition.cause, "payment settled");
    Handled::Transitioned
}

fn store_refused(settled: &PaymentSettled, error: &PortError) -> Handled {
    tracing::error!(%error, payment_id = %settled.payment_id, "the store refused a transition; skipped");
    Handled::Skipped("store_refused")
}

/// The record's outcome, or (logged and counted) why it is skipped.
fn decode(record: &ConsumedRecord, policy: AmountPolicy) -> Result<PaymentSettled, Handled> {
    let topic = record.position.topic.as_str();
    decode_settled(topic, &record.payload, policy).map_err(|invalid| {
        tracing::warn!(
            topic,
            offset = record.position.offset,
            reason = invalid.reason,
            "skipping an invalid outcome event"
        );
        metrics::invalid_event(topic, invalid.reason);
        Handled::Skipped(invalid.reason)
    })
}

/// The `payment.outcome` span of one record: it joins the trace of the payment it settles (the
/// headers it was published with).
pub fn outcome_span(record: &ConsumedRecord) -> tracing::Span {
    let span = tracing::info_span!("payment.outcome", otel.kind = "consumer", topic = %record.position.topic);
    trace::set_parent(&span, trace::context_from_headers(&record.headers));
    span
}

/// Handles one polled batch (see the module docs): per record, in order, what became of it —
/// `spans[i]` is the span of `records[i]` ([`outcome_span`]). `Err` only when the store is
/// unavailable: nothing more of the batch is known to be written; retry the SAME batch (what was
/// written is then `AlreadyApplied`).
pub async fn handle_batch<S: PaymentStore + ?Sized>(
    store: &S,
    clock: &dyn Clock,
    policy: AmountPolicy,
    records: &[ConsumedRecord],
    spans: &[tracing::Span],
) -> Result<Vec<Handled>, PortError> {
    assert_eq!(records.len(), spans.len(), "one span per record");
    let mut handled: Vec<Option<Handled>> = vec![None; records.len()];
    let mut decoded: Vec<(usize, PaymentSettled)> = Vec::with_capacity(records.len());
    for (i, record) in records.iter().enumerate() {
        match spans[i].in_scope(|| decode(record, policy)) {
            Ok(settled) => decoded.push((i, settled)),
            Err(skipped) => handled[i] = Some(skipped),
        }
    }
    if decoded.is_empty() {
        return Ok(handled.into_iter().map(|h| h.expect("every record decided")).collect());
    }
    let batch_span = tracing::info_span!(OUTCOME_BATCH_SPAN, records = records.len());

    let ids: Vec<PaymentId> = decoded.iter().map(|(_, s)| s.payment_id).collect::<BTreeSet<_>>().into_iter().collect();
    let read = store.get_many(&ids).instrument(batch_span.clone()).await;
    let mut payments: BTreeMap<PaymentId, Payment> = match read {
        Ok(found) => ids.iter().zip(found).filter_map(|(id, p)| p.map(|p| (*id, p))).collect(),
        Err(error @ PortError::Unavailable { .. }) => return Err(error),
        Err(error) => {
            tracing::warn!(%error, records = decoded.len(), "batch read refused; handling the outcomes one by one");
            return alone(store, clock, policy, records, spans, handled, &decoded).await;
        }
    };

    // Judge in delivery order against the working copy; only transitions are written.
    let now = clock.now();
    let mut judged: Vec<(usize, Judged)> = Vec::with_capacity(decoded.len());
    let mut writes: Vec<TransitionRecord> = Vec::new();
    for (i, settled) in &decoded {
        let verdict = judge(payments.get_mut(&settled.payment_id), settled, now);
        if let Judged::Transition { transition, .. } = &verdict {
            writes.push(TransitionRecord {
                payment: settled.payment_id,
                transition: transition.clone(),
                failure_reason: settled.failure_reason().map(|r| r.code().to_owned()),
            });
        }
        judged.push((*i, verdict));
    }
    let answers: Vec<PortResult<()>> = if writes.is_empty() {
        Vec::new()
    } else {
        match store.record_transitions(&writes).instrument(batch_span.clone()).await {
            Ok(answers) if answers.len() == writes.len() => answers,
            Err(error @ PortError::Unavailable { .. }) => return Err(error),
            refused => {
                let error = refused.err().unwrap_or(PortError::Corrupt { what: "an answer per transition".into() });
                tracing::warn!(%error, transitions = writes.len(), "batch refused; handling the outcomes one by one");
                return alone(store, clock, policy, records, spans, handled, &decoded).await;
            }
        }
    };

    // Report; a payment whose write lost its compare-and-set is judged again alone, from that
    // record on (the records of it before were judged against what the store held).
    let mut answers = answers.into_iter();
    let mut lost: BTreeSet<PaymentId> = BTreeSet::new();
    let mut again: Vec<(usize, PaymentSettled)> = Vec::new();
    for ((i, verdict), (_, settled)) in judged.into_iter().zip(&decoded) {
        let topic = records[i].position.topic.as_str();
        if lost.contains(&settled.payment_id) {
            again.push((i, settled.clone()));
            continue;
        }
        handled[i] = Some(match verdict {
            Judged::Transition { transition, before, created_at } => match answers.next().expect("one per write") {
                Ok(()) => spans[i].in_scope(|| transitioned(settled, &transition, before, created_at, now)),
                Err(PortError::Refused { rule: "illegal_transition" }) => {
                    lost.insert(settled.payment_id);
                    again.push((i, settled.clone()));
                    continue;
                }
                Err(error) => spans[i].in_scope(|| store_refused(settled, &error)),
            },
            other => spans[i].in_scope(|| report(topic, settled, other)),
        });
    }
    alone(store, clock, policy, records, spans, handled, &again).await
}

/// Completes `handled` by handling each of `decoded` alone ([`handle`], in its span), in order.
async fn alone<S: PaymentStore + ?Sized>(
    store: &S,
    clock: &dyn Clock,
    policy: AmountPolicy,
    records: &[ConsumedRecord],
    spans: &[tracing::Span],
    mut handled: Vec<Option<Handled>>,
    decoded: &[(usize, PaymentSettled)],
) -> Result<Vec<Handled>, PortError> {
    for (i, _) in decoded {
        handled[*i] = Some(match handle(store, clock, policy, &records[*i]).instrument(spans[*i].clone()).await {
            Ok(handled) => handled,
            Err(error @ PortError::Unavailable { .. }) => return Err(error),
            // Refused or corrupt on its own (logged by `handle`): retrying cannot help.
            Err(_) => Handled::Skipped("store_refused"),
        });
    }
    Ok(handled.into_iter().map(|h| h.expect("every record decided")).collect())
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

/// Consumes until `shutdown` resolves. Commits each polled batch after its store call returned.
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
    let batch_len = config.batch_len.clamp(1, PAYMENT_BATCH_LEN_MAX);
    loop {
        let records = tokio::select! {
            () = &mut shutdown => return,
            polled = consumer.poll(batch_len, config.poll_wait) => polled,
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
        if records.is_empty() {
            continue;
        }
        let positions: Vec<TopicPartitionOffset> = records.iter().map(|r| r.position.clone()).collect();
        #[cfg(feature = "planted-bugs")]
        if config.planted.ack_batch_before_commit {
            // PLANTED BUG: the offsets move before the batch's transitions are durable.
            commit(&mut consumer, &positions).await;
        }
        let spans: Vec<tracing::Span> = records.iter().map(outcome_span).collect();
        let mut pause = config.backoff_min;
        // `handle_batch` decides every record (one refused alone is skipped inside the batch);
        // only an unavailable store leaves the batch undecided.
        while let Err(error) =
            handle_batch(store.as_ref(), clock.as_ref(), config.amount_policy, &records, &spans).await
        {
            tracing::warn!(%error, records = records.len(), "payment store unavailable; retrying the same batch");
            tokio::select! {
                // Nothing of an unfinished batch is committed: it is delivered again.
                () = &mut shutdown => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(config.backoff_max);
        }
        commit(&mut consumer, &positions).await;
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

#[cfg(test)]
mod tests {
    //! The batch path against the in-memory twin (fast, deterministic); the same code against
    //! PostgreSQL and Kafka: `tests/real_stack.rs`, and in the whole platform: the simulator.

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use securepay_core::events::PaymentInitiated;
    use securepay_core::ids::{AccountId, EventId, Subject};
    use securepay_core::money::{Amount, Currency};
    use securepay_core::payment::{FailureReason, Outcome, PaymentRequest};
    use securepay_core::topology::topic;
    use securepay_memory::{MemoryEventLog, MemoryPaymentStore};
    use securepay_ports::{EventLog, Outbox, OutboxEvent, OutgoingRecord};
    use uuid::Uuid;

    use super::*;

    /// The twin behind switches: counts the calls of each kind; a batch write naming `refused` is
    /// refused whole, and its transition alone too; `racer` is moved to FAILED by "someone else"
    /// just before each batch write (a concurrent writer winning the compare-and-set).
    #[derive(Default)]
    struct Switched {
        inner: MemoryPaymentStore,
        refused: Option<PaymentId>,
        racer: Mutex<Option<PaymentId>>,
        gets: AtomicUsize,
        batch_reads: AtomicUsize,
        batch_writes: Mutex<Vec<usize>>,
        single_writes: AtomicUsize,
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
    impl PaymentStore for Switched {
        async fn insert_with_event(
            &self,
            payment: &Payment,
            event: &PaymentInitiated,
            headers: &[(String, String)],
            idempotency: Option<&securepay_ports::IdempotencyCompletion>,
        ) -> PortResult<()> {
            self.inner.insert_with_event(payment, event, headers, idempotency).await
        }
        async fn get(&self, id: PaymentId) -> PortResult<Option<Payment>> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.inner.get(id).await
        }
        async fn get_many(&self, ids: &[PaymentId]) -> PortResult<Vec<Option<Payment>>> {
            self.batch_reads.fetch_add(1, Ordering::SeqCst);
            self.inner.get_many(ids).await
        }
        async fn record_transition(
            &self,
            id: PaymentId,
            transition: &Transition,
            failure_reason: Option<&str>,
        ) -> PortResult<()> {
            self.single_writes.fetch_add(1, Ordering::SeqCst);
            if Some(id) == self.refused {
                return Err(PortError::Refused { rule: "test_rule" });
            }
            self.inner.record_transition(id, transition, failure_reason).await
        }
        async fn record_transitions(&self, batch: &[TransitionRecord]) -> PortResult<Vec<PortResult<()>>> {
            self.batch_writes.lock().unwrap().push(batch.len());
            if batch.iter().any(|item| Some(item.payment) == self.refused) {
                return Err(PortError::Refused { rule: "test_rule" });
            }
            let racer = self.racer.lock().unwrap().take();
            if let Some(racer) = racer {
                let failed = Transition {
                    from: PaymentStatus::Pending,
                    to: PaymentStatus::Failed,
                    cause: "insufficient_funds".into(),
                    at: OffsetDateTime::UNIX_EPOCH,
                };
                self.inner.record_transition(racer, &failed, Some("insufficient_funds")).await.unwrap();
            }
            self.inner.record_transitions(batch).await
        }
    }

    struct FixedClock;

    impl Clock for FixedClock {
        fn now(&self) -> OffsetDateTime {
            OffsetDateTime::from_unix_timestamp(1_800_000_060).unwrap()
        }
    }

    fn eur(value: &str) -> Amount {
        Amount::parse(value, Currency::from_code("EUR").unwrap(), AmountPolicy::default()).unwrap()
    }

    /// A new PENDING payment in `store`.
    async fn pending(store: &Switched) -> Payment {
        let request = PaymentRequest::new(
            Subject::parse("alice").unwrap(),
            None,
            AccountId::from_uuid(Uuid::new_v4()),
            AccountId::from_uuid(Uuid::new_v4()),
            eur("5.00"),
            None,
        )
        .unwrap();
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let payment = Payment::accept(PaymentId::from_uuid(Uuid::new_v4()), &request, at);
        let event = PaymentInitiated {
            event_id: EventId::from_uuid(Uuid::new_v4()),
            payment_id: payment.id,
            subject: payment.subject.clone(),
            from: payment.from,
            to: payment.to,
            amount: payment.amount,
            occurred_at: at,
        };
        store.insert_with_event(&payment, &event, &[], None).await.unwrap();
        payment
    }

    fn outcome(payment: &Payment, outcome: Outcome) -> PaymentSettled {
        PaymentSettled {
            event_id: EventId::from_uuid(Uuid::new_v4()),
            payment_id: payment.id,
            from: payment.from,
            to: payment.to,
            amount: payment.amount,
            outcome,
            occurred_at: OffsetDateTime::from_unix_timestamp(1_800_000_030).unwrap(),
        }
    }

    fn outgoing(event: &PaymentSettled) -> OutgoingRecord {
        OutgoingRecord {
            topic: event.topic().to_owned(),
            key: "one-partition".into(),
            payload: securepay_proto::convert::encode_settled(event),
            headers: vec![],
        }
    }

    fn consumed(events: &[OutgoingRecord]) -> Vec<ConsumedRecord> {
        events
            .iter()
            .enumerate()
            .map(|(i, r)| ConsumedRecord {
                position: TopicPartitionOffset { topic: r.topic.clone(), partition: 0, offset: i as i64 },
                key: r.key.clone(),
                payload: r.payload.clone(),
                headers: r.headers.clone(),
            })
            .collect()
    }

    async fn run(store: &Switched, records: &[ConsumedRecord]) -> Result<Vec<Handled>, PortError> {
        let spans: Vec<tracing::Span> = records.iter().map(outcome_span).collect();
        handle_batch(store, &FixedClock, AmountPolicy::default(), records, &spans).await
    }

    fn insufficient() -> Outcome {
        Outcome::Failed(FailureReason::InsufficientFunds)
    }

    #[tokio::test]
    async fn a_batch_is_one_read_and_one_write_judged_in_delivery_order() {
        let store = Switched::default();
        let (a, b, c) = (pending(&store).await, pending(&store).await, pending(&store).await);
        let mut done_c = outcome(&c, Outcome::Completed);
        let unknown = Payment { id: PaymentId::from_uuid(Uuid::new_v4()), ..a.clone() };
        let records = consumed(&[
            outgoing(&outcome(&a, Outcome::Completed)),
            outgoing(&outcome(&a, Outcome::Completed)), // the same outcome again in the batch
            outgoing(&outcome(&b, insufficient())),
            outgoing(&outcome(&b, Outcome::Completed)), // contradicting the first of b
            OutgoingRecord { payload: b"\xff\xff".to_vec(), ..outgoing(&done_c) },
            outgoing(&outcome(&unknown, Outcome::Completed)),
            outgoing(&done_c),
        ]);
        done_c.amount = eur("6.00");
        let records = [records, consumed(&[outgoing(&done_c)])].concat(); // other terms than c's

        let handled = run(&store, &records).await.unwrap();

        assert_eq!(
            handled,
            [
                Handled::Transitioned,
                Handled::AlreadyApplied,
                Handled::Transitioned,
                Handled::Skipped("illegal_transition"),
                Handled::Skipped("undecodable"),
                Handled::Skipped("unknown_payment"),
                Handled::Transitioned,
                Handled::Skipped("terms_mismatch"),
            ]
        );
        assert_eq!(store.batch_reads.load(Ordering::SeqCst), 1, "one read for the batch");
        assert_eq!(*store.batch_writes.lock().unwrap(), [3], "one write of the three transitions");
        assert_eq!((store.gets.load(Ordering::SeqCst), store.single_writes.load(Ordering::SeqCst)), (0, 0));
        let status = |p: &Payment| store.inner.snapshot().payments().find(|s| s.id == p.id).unwrap().status;
        assert_eq!(
            [status(&a), status(&b), status(&c)],
            [PaymentStatus::Completed, PaymentStatus::Failed, PaymentStatus::Completed]
        );

        // Redelivered: nothing moves again.
        let again = run(&store, &records).await.unwrap();
        assert_eq!(again[..3], [Handled::AlreadyApplied, Handled::AlreadyApplied, Handled::AlreadyApplied]);
        assert_eq!(*store.batch_writes.lock().unwrap(), [3], "nothing to write");
    }

    #[tokio::test]
    async fn a_refused_batch_is_handled_one_by_one_and_only_the_bad_record_is_skipped() {
        let mut store = Switched::default();
        let (a, bad, c) = (pending(&store).await, pending(&store).await, pending(&store).await);
        store.refused = Some(bad.id);
        let records = consumed(&[
            outgoing(&outcome(&a, Outcome::Completed)),
            outgoing(&outcome(&bad, Outcome::Completed)),
            outgoing(&outcome(&c, insufficient())),
        ]);

        let handled = run(&store, &records).await.unwrap();

        assert_eq!(handled, [Handled::Transitioned, Handled::Skipped("store_refused"), Handled::Transitioned]);
        assert_eq!(*store.batch_writes.lock().unwrap(), [3], "the batch, refused");
        assert_eq!(store.single_writes.load(Ordering::SeqCst), 3, "then each alone");
    }

    #[tokio::test]
    async fn a_lost_compare_and_set_is_judged_again_with_what_won() {
        let store = Switched::default();
        let (a, raced) = (pending(&store).await, pending(&store).await);
        *store.racer.lock().unwrap() = Some(raced.id);
        let records = consumed(&[
            outgoing(&outcome(&raced, Outcome::Completed)),
            outgoing(&outcome(&a, Outcome::Completed)),
            outgoing(&outcome(&raced, Outcome::Completed)),
        ]);

        let handled = run(&store, &records).await.unwrap();

        // The concurrent FAILED won: both COMPLETED outcomes of it now contradict it.
        assert_eq!(
            handled,
            [Handled::Skipped("illegal_transition"), Handled::Transitioned, Handled::Skipped("illegal_transition")]
        );
        assert_eq!(store.gets.load(Ordering::SeqCst), 2, "each record of the raced payment re-read alone");
    }

    #[tokio::test]
    async fn an_outage_fails_the_batch_as_unavailable_and_writes_nothing() {
        let store = Switched::default();
        let a = pending(&store).await;
        store.inner.set_available(false);
        let records = consumed(&[outgoing(&outcome(&a, Outcome::Completed))]);
        assert_eq!(run(&store, &records).await, Err(PortError::Unavailable { component: "postgresql" }));
        store.inner.set_available(true);
        assert_eq!(run(&store, &records).await, Ok(vec![Handled::Transitioned]), "the same batch, retried");
    }

    /// Runs the loop on one outcome while the store is down; returns the group's committed offset
    /// once the loop has retried a while.
    async fn committed_while_the_store_is_down(config: ConsumerConfig) -> Option<i64> {
        let store = Arc::new(Switched::default());
        let a = pending(&store).await;
        let log = MemoryEventLog::with_partitions(1);
        log.publish(&[outgoing(&outcome(&a, Outcome::Completed))]).await.unwrap();
        store.inner.set_available(false);
        let consumer = log.consumer("g", &[topic::PAYMENT_COMPLETED]);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(run_outcome_consumer(
            Arc::clone(&store),
            consumer,
            Arc::new(FixedClock),
            config,
            async move { drop(stopped.await) },
        ));
        while store.batch_reads.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let committed = log.committed("g", topic::PAYMENT_COMPLETED, 0);
        stop.send(()).unwrap();
        running.await.unwrap();
        store.inner.set_available(true);
        assert_eq!(store.inner.get(a.id).await.unwrap().unwrap().status, PaymentStatus::Pending);
        committed
    }

    fn fast() -> ConsumerConfig {
        ConsumerConfig {
            poll_wait: Duration::from_millis(5),
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(4),
            ..ConsumerConfig::default()
        }
    }

    #[tokio::test]
    async fn nothing_is_committed_while_the_store_is_down() {
        assert_eq!(committed_while_the_store_is_down(fast()).await, None);
    }

    #[cfg(feature = "planted-bugs")]
    #[tokio::test]
    async fn the_planted_bug_commits_the_batch_before_its_store_call() {
        assert_eq!(ConsumerConfig::default().planted, PlantedBugs::default(), "off by default");
        let planted = ConsumerConfig { planted: PlantedBugs { ack_batch_before_commit: true }, ..fast() };
        assert_eq!(committed_while_the_store_is_down(planted).await, Some(1), "committed before it was written");
    }
}
