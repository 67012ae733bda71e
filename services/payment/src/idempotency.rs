//! Idempotency orchestration (SPEC §6.1): which of the two stores is asked what, and when.
//!
//! - **Truth**: the payment store (PostgreSQL's unique (subject, key)). Only the payment's insert
//!   writes a key's COMPLETED record, in the payment's own transaction
//!   (`PaymentStore::insert_with_event`), so a key can never name a payment that was not written,
//!   nor stay claimable after one was; and of two requests with one key at most one insert wins —
//!   the loser wrote nothing and asks the truth what to answer.
//! - **Fast path**: Redis (`RedisIdempotencyStore`). Its claim (an IN_FLIGHT record with the same
//!   30 s lease the truth keeps) is what lets a request execute while Redis is up: the truth is
//!   then written once, at the insert — ONE PostgreSQL transaction per accepted payment. Redis may
//!   be down, flushed or stale, and so must never make a wrong decision:
//!   - a COMPLETED fast record is believed only if it is self-consistent: its response is stored
//!     as `fingerprint ‖ response` ([`fast_value`]) and the embedded fingerprint must equal the
//!     record's. (Redis's `complete` copies the fingerprint of whatever in-flight record it finds;
//!     after a flush that may be another request's, so the check turns that race into a miss);
//!   - an IN_FLIGHT fast record of the same request: the duplicate waits for it (below), reading
//!     the truth at every round too — a first request that committed and died before telling
//!     Redis is replayed at once from the truth;
//!   - an IN_FLIGHT fast record of another request: the truth is asked, and if the truth has no
//!     record either, the key is taken by that other request (`idempotency_key_reused`);
//!   - a flushed or expired fast record only lets a duplicate run a second time: its insert then
//!     loses at the truth's unique key, and the duplicate replays what the truth holds;
//!   - `Unavailable` (or any error) → the truth alone, through its own claim (with its lease), as
//!     before the fast path existed;
//!   - a fast claim we made ourselves is always resolved before we return: completed with the
//!     response the truth holds for OUR fingerprint, or released. We never touch another
//!     request's fast record.
//! - **Decision**: always `securepay_core::idempotency::decide`, on whichever record is believed.
//! - **Waiting**: while the same request is in flight, the duplicate polls for a bounded time
//!   ([`Idempotency::new`]'s `in_flight_wait`) and replays the first response when it lands — so
//!   concurrent identical retries all get the same bytes; past the bound it is refused with
//!   `request_in_progress`.

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
    /// The truth holds our IN_FLIGHT claim (taken when the fast path could not decide); otherwise
    /// only the fast path does and the insert writes the truth's record afresh.
    in_truth: bool,
}

impl Claim {
    /// What the payment insert needs to record the key in the truth, in its own transaction.
    pub fn completion(&self, response: Vec<u8>) -> IdempotencyCompletion {
        IdempotencyCompletion {
            subject: self.subject.clone(),
            key: self.key.clone(),
            fingerprint: self.fingerprint,
            response,
            claimed: self.in_truth,
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
        let started = tokio::time::Instant::now();
        let mut pause = POLL_MIN;
        let mut held_by_another = false;
        loop {
            match self.fast.claim(subject, key, fingerprint, self.clock.now()).await {
                Ok(None) => {
                    return Ok(Begin::Execute(Claim {
                        subject: subject.clone(),
                        key: key.clone(),
                        fingerprint,
                        fast_owned: true,
                        in_truth: false,
                    }));
                }
                Ok(Some(record @ Record::InFlight { .. })) => match decide(Some(&record), fingerprint) {
                    Decision::InProgress => {
                        // The first may have committed and died before telling the fast path
                        // (or Redis missed its completion): the truth's record says so.
                        match self.truth.lookup(subject, key).await {
                            Ok(Some(truth)) => match decide(Some(&truth), fingerprint) {
                                Decision::Replay(response) => return Ok(Begin::Replay(response)),
                                Decision::KeyReused => return Err(ServiceError::IdempotencyKeyReused),
                                Decision::Execute | Decision::InProgress => {}
                            },
                            Ok(None) => {}
                            Err(error) => tracing::debug!(%error, "idempotency truth not readable; waiting"),
                        }
                        if started.elapsed() >= self.in_flight_wait {
                            return Err(ServiceError::RequestInProgress);
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(POLL_MAX);
                        continue;
                    }
                    _ => held_by_another = true,
                },
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
            return self.begin_in_truth(subject, key, fingerprint, false, held_by_another, started).await;
        }
    }

    /// The truth decides, through its own claim. `fast_owned`: we hold the fast path's claim
    /// (resolved here unless we return `Execute`). `held_by_another`: the fast path names another
    /// request in flight with this key, so if the truth has no record either, that request has it.
    async fn begin_in_truth(
        &self,
        subject: &Subject,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        fast_owned: bool,
        held_by_another: bool,
        started: tokio::time::Instant,
    ) -> Result<Begin, ServiceError> {
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
                Decision::Execute if held_by_another => {
                    // Our claim in the truth must not outrun the request the fast path names.
                    if let Err(error) = self.truth.release(subject, key).await {
                        tracing::warn!(%error, "could not release an idempotency claim; its lease will expire");
                    }
                    return Err(ServiceError::IdempotencyKeyReused);
                }
                Decision::Execute => {
                    return Ok(Begin::Execute(Claim {
                        subject: subject.clone(),
                        key: key.clone(),
                        fingerprint,
                        fast_owned,
                        in_truth: true,
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
        if claim.in_truth
            && let Err(error) = self.truth.release(&claim.subject, &claim.key).await
        {
            // The lease frees it anyway once it runs out.
            tracing::warn!(%error, "could not release an idempotency claim; its lease will expire");
        }
        self.release_fast(&claim.subject, &claim.key, claim.fast_owned).await;
    }

    /// The insert found the key already recorded in the truth — by a racing request with the same
    /// key that the fast path did not see (flushed, down when it claimed, or our lease had run
    /// out): the truth decides, normally a replay of what it holds. `Execute` again only if the
    /// truth's record is gone by now (released, or its lease over); we then hold its claim.
    pub async fn after_claim_lost(&self, claim: Claim) -> Result<Begin, ServiceError> {
        let started = tokio::time::Instant::now();
        self.begin_in_truth(&claim.subject, &claim.key, claim.fingerprint, claim.fast_owned, false, started).await
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
