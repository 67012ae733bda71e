//! Batching of concurrent store calls (issue #13): requests that arrive while the store is busy
//! share its next call — one round trip, one statement, one commit for many — instead of one each.
//! Used for the accept transaction ([`crate::group_commit`]) and the idempotency claims
//! ([`crate::idempotency`]).
//!
//! Each request puts its item into a bounded queue and waits for its own answer. A dispatcher takes
//! a call slot (at most [`BatchConfig::writers`] calls in flight), then everything queued (up to
//! [`BatchConfig::batch_max`]), and runs the batch call in a task of its own. While every slot is
//! busy, arrivals queue up and the next call takes them together, so batches grow with load and a
//! lone request waits for no timer.
//!
//! Guarantees: every item gets exactly the answer the batch call gave it, or [`Unanswered`] when
//! there was none (the call answered a wrong count, or its task died); the queue is bounded — when
//! full, a request is refused at once ([`Unanswered::QueueFull`]), it never piles up memory; a
//! request whose caller hangs up still goes through with its batch.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

/// How a [`Batcher`] groups calls.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    /// Most items in one call.
    pub batch_max: usize,
    /// Calls in flight at once.
    pub writers: usize,
    /// Most items waiting for a call; one more is refused at once.
    pub queue_max: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { batch_max: 256, writers: 2, queue_max: 4096 }
    }
}

/// Why an item got no answer from its batch call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The queue was full: the item was never taken.
    QueueFull,
    /// The call answered a wrong count or its task died: the item's fate is unknown.
    Lost,
}

type Pending<I, A> = (I, oneshot::Sender<A>);

/// The request side: cheap to clone, shared by every request.
pub struct Batcher<I, A> {
    queue: mpsc::Sender<Pending<I, A>>,
}

impl<I, A> Clone for Batcher<I, A> {
    fn clone(&self) -> Self {
        Batcher { queue: self.queue.clone() }
    }
}

impl<I: Send + 'static, A: Send + 'static> Batcher<I, A> {
    /// Starts the dispatcher (a task of the current runtime, ending when the last clone is
    /// dropped). `call` answers a batch with one answer per item, in order.
    pub fn start<C, Fut>(config: &BatchConfig, call: C) -> Batcher<I, A>
    where
        C: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<A>> + Send + 'static,
    {
        assert!(config.batch_max >= 1, "a batch holds at least one item");
        assert!(config.writers >= 1 && config.queue_max >= 1, "a batcher needs a writer and a queue");
        let (queue, pending) = mpsc::channel(config.queue_max);
        tokio::task::spawn(dispatch(Arc::new(call), pending, config.clone()));
        Batcher { queue }
    }

    /// `item`'s answer from the batch call it joined.
    pub async fn submit(&self, item: I) -> Result<A, Unanswered> {
        let (reply, answer) = oneshot::channel();
        if self.queue.try_send((item, reply)).is_err() {
            return Err(Unanswered::QueueFull);
        }
        answer.await.map_err(|_| Unanswered::Lost)
    }
}

async fn dispatch<I, A, C, Fut>(call: Arc<C>, mut pending: mpsc::Receiver<Pending<I, A>>, config: BatchConfig)
where
    I: Send + 'static,
    A: Send + 'static,
    C: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<A>> + Send + 'static,
{
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
        let call = Arc::clone(&call);
        tokio::task::spawn(async move {
            let (items, replies): (Vec<I>, Vec<oneshot::Sender<A>>) = batch.into_iter().unzip();
            let expected = items.len();
            let answers = call(items).await;
            if answers.len() != expected {
                // Every reply is dropped: each item is answered `Lost`.
                tracing::error!(items = expected, answers = answers.len(), "a batch call answered a wrong count");
            } else {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    // The requester may be gone (its process is stopping); its item's fate is decided.
                    let _ = reply.send(answer);
                }
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_answering_a_wrong_count_leaves_every_item_unanswered_not_misanswered() {
        let batcher: Batcher<u32, u32> =
            Batcher::start(
                &BatchConfig::default(),
                |items: Vec<u32>| async move { items.into_iter().skip(1).collect() },
            );
        assert_eq!(batcher.submit(7).await, Err(Unanswered::Lost));
    }

    #[tokio::test]
    async fn each_item_gets_its_own_answer() {
        let batcher: Batcher<u32, u32> =
            Batcher::start(
                &BatchConfig::default(),
                |items: Vec<u32>| async move { items.iter().map(|i| i * 10).collect() },
            );
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let batcher = batcher.clone();
                tokio::spawn(async move { (i, batcher.submit(i).await) })
            })
            .collect();
        for task in tasks {
            let (i, answer) = task.await.unwrap();
            assert_eq!(answer, Ok(i * 10));
        }
    }
}
