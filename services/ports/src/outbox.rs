//! The transactional outbox both money services write to (SPEC §6.4, §6.5): events committed in
//! the same database transaction as the state change they announce, published later by a relay.

use async_trait::async_trait;

use crate::error::PortResult;

/// An outbox row waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Store-assigned, increasing in commit order; the relay publishes in this order.
    pub sequence: i64,
    pub topic: String,
    /// Kafka key (the payment id).
    pub key: String,
    /// Encoded `events.v1` message.
    pub payload: Vec<u8>,
    /// W3C trace context and other headers to put on the record.
    pub headers: Vec<(String, String)>,
}

/// The relay's view of a store's outbox. Promise: at-least-once — an event stays unpublished until
/// `mark_published` after the broker acknowledged it, so a relay that dies in between publishes it
/// again (consumers dedupe by event id). Safe with several relays: an event may be handed to two
/// relays, never lost.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Up to `limit` unpublished events in sequence order.
    async fn unpublished(&self, limit: usize) -> PortResult<Vec<OutboxEvent>>;

    /// Marks events published (after the broker acknowledged them). Idempotent.
    async fn mark_published(&self, sequences: &[i64]) -> PortResult<()>;
}
