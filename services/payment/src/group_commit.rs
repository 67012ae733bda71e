//! Group commit of accepted payments (issue #13): concurrent InitiatePayment requests share one
//! store transaction — one commit and one WAL flush for many payments — instead of one each.
//!
//! Each request puts its payment into a bounded queue and waits for its own answer. A dispatcher
//! takes a write slot (at most [`GroupCommitConfig::writers`] transactions in flight), then
//! everything queued (up to [`GroupCommitConfig::batch_max`]), and hands it to
//! `PaymentStore::insert_many` in a task of its own. While every slot is busy, arrivals queue up and
//! the next transaction takes them together, so batches grow with load and a lone request waits for
//! no timer.
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
use tokio::sync::{Semaphore, mpsc, oneshot};

const COMPONENT: &str = "payment group commit";

#[derive(Debug, Clone, PartialEq)]
pub struct GroupCommitConfig {
    /// Most payments in one transaction.
    pub batch_max: usize,
    /// Transactions in flight at once.
    pub writers: usize,
    /// Most payments waiting for a transaction; one more is refused at once.
    pub queue_max: usize,
    /// PLANTED BUG, simulator only (feature `planted-bugs`, `group_commit_ignores_failure`): a
    /// batch whose transaction failed is answered as committed.
    #[cfg(feature = "planted-bugs")]
    pub planted_ignore_failure: bool,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        GroupCommitConfig {
            batch_max: 256,
            writers: 2,
            queue_max: 4096,
            #[cfg(feature = "planted-bugs")]
            planted_ignore_failure: false,
        }
    }
}

struct Pending {
    item: NewPayment,
    reply: oneshot::Sender<PortResult<()>>,
}

/// The request side: cheap to clone, shared by every InitiatePayment.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Pending>,
}

impl GroupCommit {
    /// Starts the dispatcher over `store` (a task of the current runtime, ending when the last
    /// `GroupCommit` clone is dropped).
    pub fn start<S: PaymentStore + 'static>(store: Arc<S>, config: GroupCommitConfig) -> GroupCommit {
        assert!(config.batch_max >= 1 && config.batch_max <= PAYMENT_BATCH_LEN_MAX, "batch_max out of range");
        assert!(config.writers >= 1 && config.queue_max >= 1, "a group commit needs a writer and a queue");
        let (queue, pending) = mpsc::channel(config.queue_max);
        tokio::task::spawn(dispatch(store, pending, config));
        GroupCommit { queue }
    }

    /// Writes `item` as `PaymentStore::insert_with_event` would, in a transaction shared with the
    /// payments queued alongside it; answers once that transaction committed or failed.
    pub async fn insert(&self, item: NewPayment) -> PortResult<()> {
        let (reply, answer) = oneshot::channel();
        if self.queue.try_send(Pending { item, reply }).is_err() {
            tracing::warn!("group commit queue full; refusing the payment");
            return Err(PortError::Unavailable { component: COMPONENT });
        }
        // A dropped reply means the writer's task died with its transaction's outcome unknown.
        answer.await.unwrap_or(Err(PortError::Unavailable { component: COMPONENT }))
    }
}

async fn dispatch<S: PaymentStore + 'static>(
    store: Arc<S>,
    mut pending: mpsc::Receiver<Pending>,
    config: GroupCommitConfig,
) {
    let slots = Arc::new(Semaphore::new(config.writers));
    loop {
        let slot = Arc::clone(&slots).acquire_owned().await.expect("the semaphore is never closed");
        let Some(first) = pending.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < config.batch_max {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let store = Arc::clone(&store);
        #[cfg(feature = "planted-bugs")]
        let planted = config.planted_ignore_failure;
        #[cfg(not(feature = "planted-bugs"))]
        let planted = false;
        tokio::task::spawn(async move {
            write(store.as_ref(), batch, planted).await;
            drop(slot);
        });
    }
}

/// One transaction for `batch`, then every item's answer.
async fn write<S: PaymentStore>(store: &S, batch: Vec<Pending>, planted_ignore_failure: bool) {
    let (items, replies): (Vec<NewPayment>, Vec<oneshot::Sender<PortResult<()>>>) =
        batch.into_iter().map(|p| (p.item, p.reply)).unzip();
    metrics::histogram!(BATCH_LEN).record(items.len() as f64);
    let answers = match store.insert_many(&items).await {
        Ok(answers) if answers.len() == items.len() => answers,
        Ok(answers) => {
            tracing::error!(items = items.len(), answers = answers.len(), "insert_many answered a wrong count");
            vec![Err(PortError::Corrupt { what: "insert_many answer count".into() }); items.len()]
        }
        Err(_) if planted_ignore_failure => vec![Ok(()); items.len()],
        Err(error) => vec![Err(error); items.len()],
    };
    for (reply, answer) in replies.into_iter().zip(answers) {
        // The requester may be gone (its process is stopping); its payment's fate is decided.
        let _ = reply.send(answer);
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
        let commits = GroupCommit::start(Arc::clone(&store), GroupCommitConfig { writers: 1, ..Default::default() });
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
        let mut config = GroupCommitConfig::default();
        (config.writers, config.queue_max, config.batch_max) = (1, 3, 1);
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
