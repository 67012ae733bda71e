//! Persistence of idempotency records (SPEC §6.1). The decision is `securepay_core::idempotency::decide`;
//! stores only claim, complete and read records.

use async_trait::async_trait;
use securepay_core::idempotency::{Fingerprint, IdempotencyKey, Record};
use securepay_core::ids::Subject;
use time::OffsetDateTime;

use crate::error::{PortError, PortResult};

/// Most claims in one [`IdempotencyStore::claim_many`].
pub const CLAIM_BATCH_LEN_MAX: usize = 1024;

/// One [`IdempotencyStore::claim`]'s arguments, for [`IdempotencyStore::claim_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    pub subject: Subject,
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    pub now: OffsetDateTime,
}

#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Atomically claims (subject, key) as in flight for `fingerprint` if no record exists and
    /// returns `None`; otherwise returns the existing record unchanged. Exactly one of any number of
    /// concurrent claimers gets `None` (PostgreSQL: unique constraint; Redis: SET NX).
    /// The store of record (PostgreSQL and its twin) holds an IN_FLIGHT claim for a lease of
    /// [`IDEMPOTENCY_LEASE_S`](crate::payments::IDEMPOTENCY_LEASE_S): once it ended, a claim with the
    /// SAME fingerprint takes it over (`None`; the first request's process is presumed dead), so a
    /// crash never blocks a key for longer. The Redis fast path has no lease: callers treat its
    /// IN_FLIGHT as a hint and ask the store of record.
    async fn claim(
        &self,
        subject: &Subject,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: OffsetDateTime,
    ) -> PortResult<Option<Record<Vec<u8>>>>;

    /// [`claim`](Self::claim) of every item of `claims` (at most [`CLAIM_BATCH_LEN_MAX`], else
    /// `Refused { rule: "idempotency_batch_len_max" }`), answered per item exactly as the items
    /// claimed one by one in batch order would be (of two items naming one key, the first claims
    /// it and the second sees the first's record), in as few round trips as the store can:
    /// PostgreSQL takes every free key in one statement. One item's failure answers only itself.
    async fn claim_many(&self, claims: &[ClaimRequest]) -> PortResult<Vec<PortResult<Option<Record<Vec<u8>>>>>> {
        if claims.len() > CLAIM_BATCH_LEN_MAX {
            return Err(PortError::Refused { rule: "idempotency_batch_len_max" });
        }
        let mut answers = Vec::with_capacity(claims.len());
        for c in claims {
            answers.push(self.claim(&c.subject, &c.key, c.fingerprint, c.now).await);
        }
        Ok(answers)
    }

    /// Stores the response for replay. Only the claimer calls it.
    async fn complete(&self, subject: &Subject, key: &IdempotencyKey, response: &[u8]) -> PortResult<()>;

    /// Releases an in-flight claim whose request wrote nothing (validation failed, dependency
    /// down), so the client may retry with the same key.
    async fn release(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<()>;

    /// Deletes records created before `cutoff` (kept at least 24 h). Returns how many.
    async fn purge_before(&self, cutoff: OffsetDateTime) -> PortResult<u64>;
}
