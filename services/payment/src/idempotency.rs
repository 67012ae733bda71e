//! Idempotency orchestration (SPEC §6.1): which of the two stores is asked what, and when.
//!
//! - **Truth**: the payment store's `IdempotencyStore` (PostgreSQL's unique (subject, key)). Its
//!   claim is the only one that lets a request execute, and the payment insert completes that claim
//!   in the same transaction (`PaymentStore::insert_with_event`), so a key can never name a payment
//!   that was not written, nor stay claimable after one was. An IN_FLIGHT claim holds a lease; a
//!   crashed request's key is free again for the same request when the lease ends.
//! - **Fast path**: Redis (`RedisIdempotencyStore`), which may be down, flushed or stale and so
//!   must never make a wrong decision:
//!   - a COMPLETED fast record is believed only if it is self-consistent: its response is stored
//!     as `fingerprint ‖ response` ([`fast_value`]) and the embedded fingerprint must equal the
//!     record's. (Redis's `complete` copies the fingerprint of whatever in-flight record it finds;
//!     after a flush that may be another request's, so the check turns that race into a miss);
//!   - an IN_FLIGHT fast record is only a hint: the truth is asked, so a crashed request blocks a
//!     key no longer than the truth's lease;
//!   - `Unavailable` (or any error) → the truth alone, silently;
//!   - a fast claim we made ourselves is always resolved before we return: completed with the
//!     response the truth holds for OUR fingerprint, or released. We never touch another
//!     request's fast record.
//! - **Decision**: always `securepay_core::idempotency::decide`, on whichever record is believed.
//! - **Waiting**: while the truth says the same request is in flight, the duplicate polls it for a
//!   bounded time ([`Idempotency::new`]'s `in_flight_wait`) and replays the first response when it
//!   lands — so concurrent identical retries all get the same bytes; past the bound it is refused
//!   with `request_in_progress`.

use std::sync::Arc;
use std::time::Duration;

use securepay_core::idempotency::{Decision, Fingerprint, IdempotencyKey, Record, decide};
use securepay_core::ids::Subject;
use securepay_ports::{Clock, IdempotencyCompletion, IdempotencyStore};

use crate::error::ServiceError;

/// The fast-path value: the request fingerprint followed by the response bytes.
pub fn fast_value(fingerprint: Fingerprint, response: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(32 + response.len());
    value.extend_from_slice(&fingerprint.0);
    value.extend_from_slice(response);
    value
}

/// A COMPLETED fast record, if self-consistent, as the record the truth holds.
fn believed_fast_record(record: Record<Vec<u8>>) -> Option<Record<Vec<u8>>> {
    match record {
        Record::Completed { fingerprint, response } if response.len() >= 32 && response[..32] == fingerprint.0 => {
            Some(Record::Completed { fingerprint, response: response[32..].to_vec() })
        }
        _ => None,
    }
}

/// What a keyed request may do.
#[derive(Debug)]
pub enum Begin {
    /// The key is ours: execute, then [`Claim::committed`] or [`Claim::release`].
    Execute(Claim),
    /// The same request completed before: return exactly these bytes.
    Replay(Vec<u8>),
}

/// An executing request's hold on its key (in the truth, and maybe in the fast path).
#[derive(Debug)]
#[must_use = "a claim must be completed (by the payment insert) or released"]
pub struct Claim {
    pub subject: Subject,
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    fast_owned: bool,
}

impl Claim {
    /// What the payment insert needs to complete the truth's claim in its own transaction.
    pub fn completion(&self, response: Vec<u8>) -> IdempotencyCompletion {
        IdempotencyCompletion {
            subject: self.subject.clone(),
            key: self.key.clone(),
            fingerprint: self.fingerprint,
            response,
        }
    }
}

/// The orchestration over a truth `T` and a fast path `F`.
pub struct Idempotency<T, F> {
    truth: Arc<T>,
    fast: Arc<F>,
    clock: Arc<dyn Clock>,
    in_flight_wait: Duration,
}

impl<T, F> Clone for Idempotency<T, F> {
    fn clone(&self) -> Self {
        Idempotency {
            truth: self.truth.clone(),
            fast: self.fast.clone(),
            clock: self.clock.clone(),
            in_flight_wait: self.in_flight_wait,
        }
    }
}

const POLL_MIN: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(200);

impl<T: IdempotencyStore, F: IdempotencyStore> Idempotency<T, F> {
    pub fn new(truth: Arc<T>, fast: Arc<F>, clock: Arc<dyn Clock>, in_flight_wait: Duration) -> Self {
        Idempotency { truth, fast, clock, in_flight_wait }
    }

    /// Decides a keyed request: execute (holding the key), replay, or a refusal
    /// (`IdempotencyKeyReused`, `RequestInProgress`, `Unavailable` when the truth is down).
    pub async fn begin(
        &self,
        subject: &Subject,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
    ) -> Result<Begin, ServiceError> {
        let mut fast_owned = false;
        match self.fast.claim(subject, key, fingerprint, self.clock.now()).await {
            Ok(None) => fast_owned = true,
            Ok(Some(record)) => {
                if let Some(record) = believed_fast_record(record) {
                    match decide(Some(&record), fingerprint) {
                        Decision::Replay(response) => return Ok(Begin::Replay(response)),
                        Decision::KeyReused => return Err(ServiceError::IdempotencyKeyReused),
                        Decision::Execute | Decision::InProgress => {}
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "idempotency fast path unavailable; asking PostgreSQL"),
        }

        let started = tokio::time::Instant::now();
        let mut pause = POLL_MIN;
        loop {
            let existing = match self.truth.claim(subject, key, fingerprint, self.clock.now()).await {
                Ok(existing) => existing,
                Err(error) => {
                    tracing::warn!(%error, "idempotency truth unavailable");
                    self.release_fast(subject, key, fast_owned).await;
                    return Err(ServiceError::Unavailable);
                }
            };
            match decide(existing.as_ref(), fingerprint) {
                Decision::Execute => {
                    return Ok(Begin::Execute(Claim {
                        subject: subject.clone(),
                        key: key.clone(),
                        fingerprint,
                        fast_owned,
                    }));
                }
                Decision::Replay(response) => {
                    if fast_owned {
                        self.complete_fast(subject, key, fingerprint, &response).await;
                    }
                    return Ok(Begin::Replay(response));
                }
                Decision::KeyReused => {
                    self.release_fast(subject, key, fast_owned).await;
                    return Err(ServiceError::IdempotencyKeyReused);
                }
                Decision::InProgress => {
                    if started.elapsed() >= self.in_flight_wait {
                        self.release_fast(subject, key, fast_owned).await;
                        return Err(ServiceError::RequestInProgress);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(POLL_MAX);
                }
            }
        }
    }

    /// After the payment insert committed `response` with the claim: best effort, the fast path
    /// learns it (only if we own its record; otherwise the next retry fills it from the truth).
    pub async fn committed(&self, claim: Claim, response: &[u8]) {
        if claim.fast_owned {
            self.complete_fast(&claim.subject, &claim.key, claim.fingerprint, response).await;
        }
    }

    /// The request wrote nothing: frees the key in both stores so a retry can run.
    pub async fn release(&self, claim: Claim) {
        if let Err(error) = self.truth.release(&claim.subject, &claim.key).await {
            // The lease frees it anyway once it runs out.
            tracing::warn!(%error, "could not release an idempotency claim; its lease will expire");
        }
        self.release_fast(&claim.subject, &claim.key, claim.fast_owned).await;
    }

    /// The insert found the truth's claim completed by a racing identical request (our lease had
    /// run out): gives back our own fast-path claim, then decides again — normally a replay.
    pub async fn after_claim_lost(&self, claim: Claim) -> Result<Begin, ServiceError> {
        self.release_fast(&claim.subject, &claim.key, claim.fast_owned).await;
        self.begin(&claim.subject, &claim.key, claim.fingerprint).await
    }

    /// Deletes truth records created before `cutoff` (SPEC §6.1: kept ≥ 24 h, then purged).
    pub async fn purge_before(&self, cutoff: time::OffsetDateTime) -> securepay_ports::PortResult<u64> {
        self.truth.purge_before(cutoff).await
    }

    async fn complete_fast(&self, subject: &Subject, key: &IdempotencyKey, fingerprint: Fingerprint, response: &[u8]) {
        if let Err(error) = self.fast.complete(subject, key, &fast_value(fingerprint, response)).await {
            tracing::debug!(%error, "idempotency fast path not updated");
        }
    }

    async fn release_fast(&self, subject: &Subject, key: &IdempotencyKey, owned: bool) {
        if owned && let Err(error) = self.fast.release(subject, key).await {
            tracing::debug!(%error, "idempotency fast-path claim not released; the truth decides anyway");
        }
    }
}
