//! Persistence of idempotency records (SPEC §6.1). The decision is `securepay_core::idempotency::decide`;
//! stores only claim, complete and read records.

use async_trait::async_trait;
use securepay_core::idempotency::{Fingerprint, IdempotencyKey, Record};
use securepay_core::ids::Subject;
use time::OffsetDateTime;

use crate::error::PortResult;

#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Atomically claims (subject, key) as in flight for `fingerprint` if no record exists and
    /// returns `None`; otherwise returns the existing record unchanged. Exactly one of any number of
    /// concurrent claimers gets `None` (PostgreSQL: unique constraint; Redis: SET NX).
    /// Every store (PostgreSQL, Redis and their twins) holds an IN_FLIGHT claim for a lease of
    /// [`IDEMPOTENCY_LEASE_S`](crate::payments::IDEMPOTENCY_LEASE_S) from `now`: once it ended, a
    /// claim with the SAME fingerprint takes it over (`None`; the first request's process is
    /// presumed dead), so a crash never blocks a key for longer. A fast path may forget records
    /// (Redis flushed): its answers are never the last word on what was WRITTEN — the store of
    /// record's unique (subject, key) is, at the payment's insert.
    async fn claim(
        &self,
        subject: &Subject,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: OffsetDateTime,
    ) -> PortResult<Option<Record<Vec<u8>>>>;

    /// The record of (subject, key), if any, exactly as `claim` would return it — but a read only:
    /// it never claims nor takes over a lease.
    async fn lookup(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<Option<Record<Vec<u8>>>>;

    /// Stores the response for replay. Only the claimer calls it.
    async fn complete(&self, subject: &Subject, key: &IdempotencyKey, response: &[u8]) -> PortResult<()>;

    /// Releases an in-flight claim whose request wrote nothing (validation failed, dependency
    /// down), so the client may retry with the same key.
    async fn release(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<()>;

    /// Deletes records created before `cutoff` (kept at least 24 h). Returns how many.
    async fn purge_before(&self, cutoff: OffsetDateTime) -> PortResult<u64>;
}
