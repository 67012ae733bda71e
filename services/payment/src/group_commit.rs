//! Group commit of accepted payments (issue #13): concurrent InitiatePayment requests share one
//! store transaction — one commit and one WAL flush for many payments — instead of one each.
//!
//! The batching itself is [`crate::batcher`]: a request waits for no timer, batches grow with load,
//! and the queue is bounded.
//!
//! Guarantees kept:
//! - a request is answered `Ok` only after the transaction holding its payment committed; a failed
//!   transaction answers every item with its error (nothing of it was written);
//! - a refused item answers only itself (`insert_many` pins refusals on their items);
//! - the queue is bounded: when full, the request is refused at once (`Unavailable` → 503), it never
//!   piles up memory;
//! - a request whose caller hangs up still gets written or not as a whole (InitiatePayment runs in
//!   its own task); a process that dies loses only unanswered requests.

use std::sync::Arc;

use securepay_ports::payments::PAYMENT_BATCH_LEN_MAX;
use securepay_ports::{NewPayment, PaymentStore, PortError, PortResult};

use crate::batcher::{BatchConfig, Batcher, Unanswered};

const COMPONENT: &str = "payment group commit";

#[derive(Debug, Clone, PartialEq, Default)]
pub struct GroupCommitConfig {
    /// Most payments in one transaction, transactions in flight, payments waiting.
    pub batching: BatchConfig,
    /// PLANTED BUG, simulator only (feature `planted-bugs`, `group_commit_ignores_failure`): a
    /// batch whose transaction failed is answered as committed.
    #[cfg(feature = "planted-bugs")]
    pub planted_ignore_failure: bool,
}

/// The request side: cheap to clone, shared by every InitiatePayment.
#[derive(Clone)]
pub struct GroupCommit {
    batcher: Batcher<NewPayment, PortResult<()>>,
}

impl GroupCommit {
    /// Starts the dispatcher over `store` (a task of the current runtime, ending when the last
    /// `GroupCommit` clone is dropped).
    pub fn start<S: PaymentStore + 'static>(store: Arc<S>, config: GroupCommitConfig) -> GroupCommit {
        assert!(config.batching.batch_max <= PAYMENT_BATCH_LEN_MAX, "batch_max out of range");
        #[cfg(feature = "planted-bugs")]
        let planted = config.planted_ignore_failure;
        #[cfg(not(feature = "planted-bugs"))]
        let planted = false;
        let batcher = Batcher::start(&config.batching, move |items: Vec<NewPayment>| {
            let store = Arc::clone(&store);
            async move { write(store.as_ref(), items, planted).await }
        });
        GroupCommit { batcher }
    }

    /// Writes `item` as `PaymentStore::insert_with_event` would, in a transaction shared with the
    /// payments queued alongside it; answers once that transaction committed or failed.
    pub async fn insert(&self, item: NewPayment) -> PortResult<()> {
        match self.batcher.submit(item).await {
            Ok(answer) => answer,
            Err(Unanswered::QueueFull) => {
                tracing::warn!("group commit queue full; refusing the payment");
                Err(PortError::Unavailable { component: COMPONENT })
            }
            // The writer's task died with its transaction's outcome unknown.
            Err(Unanswered::Lost) => Err(PortError::Unavailable { component: COMPONENT }),
        }
    }
}

/// One transaction for `items`: every item's answer.
async fn write<S: PaymentStore>(
    store: &S,
    items: Vec<NewPayment>,
    planted_ignore_failure: bool,
) -> Vec<PortResult<()>> {
    metrics::histogram!(BATCH_LEN).record(items.len() as f64);
    match store.insert_many(&items).await {
        Ok(answers) if answers.len() == items.len() => answers,
        Ok(answers) => {
            tracing::error!(items = items.len(), answers = answers.len(), "insert_many answered a wrong count");
            vec![Err(PortError::Corrupt { what: "insert_many answer count".into() }); items.len()]
        }
        Err(_) if planted_ignore_failure => vec![Ok(()); items.len()],
        Err(error) => vec![Err(error); items.len()],
    }
}

/// Payments per group-commit transaction.
pub const BATCH_LEN: &str = "securepay_payment_group_commit_batch_len";

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use securepay_core::events::PaymentInitiated;
    use securepay_core::ids::{AccountId, EventId, PaymentId, Subject};
    use securepay_core::money::{Amount, AmountPolicy, Currency};
    use securepay_core::payment::{Payment, PaymentRequest, Transition};
    use securepay_memory::MemoryPaymentStore;
    use securepay_ports::{IdempotencyCompletion, Outbox, OutboxEvent, TransitionRecord};
    use time::OffsetDateTime;
    use tokio::sync::Semaphore;
    use uuid::Uuid;

    use super::*;

    /// The twin behind a gate: every `insert_many` records its length, then waits for one permit
    /// of `gate`, then fails whole when `down`.
    struct Gated {
        inner: MemoryPaymentStore,
        gate: Semaphore,
        batches: Mutex<Vec<usize>>,
        down: bool,
    }

    impl Gated {
        fn new(open: bool, down: bool) -> Arc<Gated> {
            let permits = if open { Semaphore::MAX_PERMITS } else { 0 };
            Arc::new(Gated {
                inner: MemoryPaymentStore::default(),
                gate: Semaphore::new(permits),
                batches: Mutex::default(),
                down,
            })
        }
    }

    #[async_trait]
    impl Outbox for Gated {
        async fn unpublished(&self, limit: usize) -> PortResult<Vec<OutboxEvent>> {
            self.inner.unpublished(limit).await
        }
        async fn mark_published(&self, sequences: &[i64]) -> PortResult<()> {
            self.inner.mark_published(sequences).await
        }
    }

    #[async_trait]
    impl PaymentStore for Gated {
        async fn insert_with_event(
            &self,
            payment: &Payment,
            event: &PaymentInitiated,
            headers: &[(String, String)],
            idempotency: Option<&IdempotencyCompletion>,
        ) -> PortResult<()> {
            self.inner.insert_with_event(payment, event, headers, idempotency).await
        }
        async fn insert_many(&self, batch: &[NewPayment]) -> PortResult<Vec<PortResult<()>>> {
            self.batches.lock().unwrap().push(batch.len());
            self.gate.acquire().await.unwrap().forget();
            if self.down {
                return Err(PortError::Unavailable { component: "test database" });
            }
            self.inner.insert_many(batch).await
        }
        async fn get(&self, id: PaymentId) -> PortResult<Option<Payment>> {
            self.inner.get(id).await
        }
        async fn get_many(&self, ids: &[PaymentId]) -> PortResult<Vec<Option<Payment>>> {
            self.inner.get_many(ids).await
        }
        async fn record_transition(&self, id: PaymentId, t: &Transition, reason: Option<&str>) -> PortResult<()> {
            self.inner.record_transition(id, t, reason).await
        }
        async fn record_transitions(&self, batch: &[TransitionRecord]) -> PortResult<Vec<PortResult<()>>> {
            self.inner.record_transitions(batch).await
        }
    }

    #[allow(clippy::needless_update)] // the `planted-bugs` feature adds a field
    fn config(batching: BatchConfig) -> GroupCommitConfig {
        GroupCommitConfig { batching, ..GroupCommitConfig::default() }
    }

    fn new_payment() -> NewPayment {
        let request = PaymentRequest::new(
            Subject::parse("alice").unwrap(),
            None,
            AccountId::from_uuid(Uuid::new_v4()),
            AccountId::from_uuid(Uuid::new_v4()),
            Amount::parse("5.00", Currency::from_code("EUR").unwrap(), AmountPolicy::default()).unwrap(),
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
        NewPayment { payment, event, headers: Vec::new(), idempotency: None }
    }

    fn spawn_inserts(commits: &GroupCommit, items: Vec<NewPayment>) -> Vec<tokio::task::JoinHandle<PortResult<()>>> {
        items
            .into_iter()
            .map(|item| {
                let commits = commits.clone();
                tokio::spawn(async move { commits.insert(item).await })
            })
            .collect()
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn arrivals_during_a_transaction_share_the_next_one_and_each_gets_its_own_answer() {
        let store = Gated::new(false, false);
        let commits =
            GroupCommit::start(Arc::clone(&store), config(BatchConfig { writers: 1, ..BatchConfig::default() }));
        let first = new_payment();
        let mut tasks = spawn_inserts(&commits, vec![first.clone()]);
        settle().await;
        // While the first transaction is open, 30 more arrive, one of them a taken id.
        tasks.extend(spawn_inserts(&commits, (0..29).map(|_| new_payment()).chain([first.clone()]).collect()));
        settle().await;
        store.gate.add_permits(2);
        let answers: Vec<PortResult<()>> = futures_join(tasks).await;
        assert_eq!(*store.batches.lock().unwrap(), vec![1, 30], "one transaction for all that waited");
        assert!(answers[..30].iter().all(Result::is_ok), "{answers:?}");
        assert_eq!(answers[30], Err(PortError::Refused { rule: "payment_exists" }), "refused alone");
        assert_eq!(store.unpublished(100).await.unwrap().len(), 30, "one event per accepted payment");
    }

    #[tokio::test]
    async fn a_failed_transaction_answers_every_item_with_its_error() {
        let store = Gated::new(true, true);
        let commits = GroupCommit::start(Arc::clone(&store), GroupCommitConfig::default());
        let answers = futures_join(spawn_inserts(&commits, (0..5).map(|_| new_payment()).collect())).await;
        assert!(answers.iter().all(|a| matches!(a, Err(PortError::Unavailable { .. }))), "{answers:?}");
        assert!(store.unpublished(100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_instead_of_piling_up() {
        let store = Gated::new(false, false);
        let config = config(BatchConfig { writers: 1, queue_max: 3, batch_max: 1 });
        let commits = GroupCommit::start(Arc::clone(&store), config);
        // One in the open transaction, three queued behind it, the fifth refused.
        let mut tasks = spawn_inserts(&commits, vec![new_payment()]);
        settle().await;
        tasks.extend(spawn_inserts(&commits, (0..3).map(|_| new_payment()).collect()));
        settle().await;
        let refused = commits.insert(new_payment()).await;
        assert_eq!(refused, Err(PortError::Unavailable { component: COMPONENT }));
        store.gate.add_permits(4);
        let answers = futures_join(tasks).await;
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        assert_eq!(*store.batches.lock().unwrap(), vec![1, 1, 1, 1]);
    }

    async fn futures_join(tasks: Vec<tokio::task::JoinHandle<PortResult<()>>>) -> Vec<PortResult<()>> {
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        answers
    }
}
