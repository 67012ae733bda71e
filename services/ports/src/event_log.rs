//! The event bus (Kafka in production, a simulated broker in madsim).

use std::time::Duration;

use async_trait::async_trait;

use crate::error::PortResult;

pub type Header = (String, String);

/// A record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingRecord {
    pub topic: String,
    /// Partitioning key: records with the same key keep their order (one partition).
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<Header>,
}

/// A consumed record and where it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub position: TopicPartitionOffset,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<Header>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Publishing. Promise: `Ok` means the broker durably has the records (acks=all, idempotent
/// producer: a retried publish does not duplicate within a producer session). Across producer
/// restarts a record may be published twice — consumers dedupe by event id.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    async fn publish(&self, records: &[OutgoingRecord]) -> PortResult<()>;
}

/// A member of a consumer group. Promises: at-least-once delivery; per-partition order; after a
/// crash or rebalance, delivery resumes from the last COMMITTED offset, so anything processed but
/// not committed is delivered again. Commit only after the effects are durable.
#[async_trait]
pub trait EventConsumer: Send + 'static {
    /// Up to `max_records`, waiting at most `wait`. Empty on timeout.
    async fn poll(&mut self, max_records: usize, wait: Duration) -> PortResult<Vec<ConsumedRecord>>;

    /// Commits: the next record delivered to the group after each position is `offset + 1`.
    async fn commit(&mut self, positions: &[TopicPartitionOffset]) -> PortResult<()>;
}
