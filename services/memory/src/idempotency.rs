//! `MemoryIdempotencyStore`: the [`IdempotencyStore`] twin, with an outage switch.
//!
//! Keeps the promises of `RedisIdempotencyStore` (and of the PostgreSQL store): a claim is atomic
//! (one `std::sync::Mutex`, never held across an `.await`, so exactly one concurrent claimer gets
//! `None`); an IN_FLIGHT claim holds a lease of `IDEMPOTENCY_LEASE_S` from its `now`, after which
//! the same fingerprint takes it over; records are keyed by the (subject, key) pair itself, so no
//! two pairs can share one;
//! `complete` needs the in-flight claim; `release` never deletes a completed record. Records are
//! kept until `purge_before` (the Redis store lets its TTL do that instead).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use securepay_core::idempotency::{Fingerprint, IdempotencyKey, Record};
use securepay_core::ids::Subject;
use securepay_ports::payments::IDEMPOTENCY_LEASE_S;
use securepay_ports::{IdempotencyStore, PortError, PortResult};
use time::{Duration, OffsetDateTime};

/// Most bytes of one stored response (as `RedisIdempotencyStore`).
const RESPONSE_LEN_MAX: usize = 64 * 1024;

/// The in-memory store. Clones share one state.
#[derive(Debug, Clone, Default)]
pub struct MemoryIdempotencyStore {
    state: Arc<Mutex<IdempotencyState>>,
}

#[derive(Debug, Default)]
struct IdempotencyState {
    unavailable: bool,
    records: BTreeMap<(Subject, IdempotencyKey), Stored>,
}

#[derive(Debug)]
struct Stored {
    record: Record<Vec<u8>>,
    created_at: OffsetDateTime,
    /// When an IN_FLIGHT claim's lease ends ([`IDEMPOTENCY_LEASE_S`] after it was taken).
    lease_end: OffsetDateTime,
}

impl MemoryIdempotencyStore {
    pub fn new() -> MemoryIdempotencyStore {
        MemoryIdempotencyStore::default()
    }

    /// Outage injection: while `false`, every call fails as `Unavailable { component: "redis" }`.
    pub fn set_available(&self, available: bool) {
        self.lock().unavailable = !available;
    }

    /// Drops every record (a Redis `FLUSHALL`): the fast path forgets, PostgreSQL must not.
    pub fn flush(&self) {
        self.lock().records.clear();
    }

    fn up(&self) -> PortResult<MutexGuard<'_, IdempotencyState>> {
        let state = self.lock();
        if state.unavailable { Err(PortError::Unavailable { component: "redis" }) } else { Ok(state) }
    }

    fn lock(&self) -> MutexGuard<'_, IdempotencyState> {
        // Every method changes the map in one step; a poisoned lock still holds a consistent store.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    async fn claim(
        &self,
        subject: &Subject,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: OffsetDateTime,
    ) -> PortResult<Option<Record<Vec<u8>>>> {
        let mut state = self.up()?;
        let pair = (subject.clone(), key.clone());
        let lease_end = now + Duration::seconds(IDEMPOTENCY_LEASE_S);
        match state.records.get_mut(&pair) {
            Some(existing) => match existing.record {
                Record::InFlight { fingerprint: held } if held == fingerprint && existing.lease_end <= now => {
                    existing.lease_end = lease_end;
                    Ok(None)
                }
                _ => Ok(Some(existing.record.clone())),
            },
            None => {
                let stored = Stored { record: Record::InFlight { fingerprint }, created_at: now, lease_end };
                state.records.insert(pair, stored);
                Ok(None)
            }
        }
    }

    async fn lookup(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<Option<Record<Vec<u8>>>> {
        let state = self.up()?;
        Ok(state.records.get(&(subject.clone(), key.clone())).map(|stored| stored.record.clone()))
    }

    async fn complete(&self, subject: &Subject, key: &IdempotencyKey, response: &[u8]) -> PortResult<()> {
        if response.len() > RESPONSE_LEN_MAX {
            return Err(PortError::Refused { rule: "idempotency_response_len_max" });
        }
        let mut state = self.up()?;
        let stored = state
            .records
            .get_mut(&(subject.clone(), key.clone()))
            .ok_or(PortError::Refused { rule: "idempotency_claim_missing" })?;
        match stored.record {
            Record::InFlight { fingerprint } => {
                stored.record = Record::Completed { fingerprint, response: response.to_vec() };
                Ok(())
            }
            Record::Completed { .. } => Err(PortError::Refused { rule: "idempotency_already_completed" }),
        }
    }

    async fn release(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<()> {
        let mut state = self.up()?;
        let pair = (subject.clone(), key.clone());
        if matches!(state.records.get(&pair), Some(Stored { record: Record::InFlight { .. }, .. })) {
            state.records.remove(&pair);
        }
        Ok(())
    }

    async fn purge_before(&self, cutoff: OffsetDateTime) -> PortResult<u64> {
        let mut state = self.up()?;
        let before = state.records.len();
        state.records.retain(|_, stored| stored.created_at >= cutoff);
        Ok((before - state.records.len()) as u64)
    }
}
