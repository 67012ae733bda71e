//! `RedisIdempotencyStore`: the fast path of SPEC §6.1. PostgreSQL's unique constraint is the
//! truth; this store answers most retries and in-flight duplicates without touching it and may
//! lose records (flush, crash).
//!
//! One key per (subject, idempotency key): `securepay:idem:<hex sha256 of the length-prefixed
//! pair>`, so neither a `:` in a subject or key nor any length can make two pairs share a key.
//! Values are `codec`'s records: `I<fingerprint><lease end>` (in flight, with the lease of
//! `IDEMPOTENCY_LEASE_S` every store keeps) or `C<fingerprint><response>`.
//! Each operation is one atomic step on the server (a `SET NX` inside a Lua script), so concurrent
//! callers see one order.

use std::sync::LazyLock;

use async_trait::async_trait;
use securepay_core::idempotency::{Fingerprint, IdempotencyKey, Record};
use securepay_core::ids::Subject;
use securepay_ports::payments::IDEMPOTENCY_LEASE_S;
use securepay_ports::{IdempotencyStore, PortError, PortResult};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::codec::{decode_record, encode_in_flight};
use crate::connection::Redis;

/// How long a record lives: 25 h, so a key is kept at least the 24 h SPEC §6.1 promises even when
/// the TTL is counted from the claim and not from the completion.
pub const IDEMPOTENCY_TTL_S: u64 = 25 * 60 * 60;
const _: () = assert!(IDEMPOTENCY_TTL_S >= 24 * 60 * 60, "SPEC §6.1: keys kept at least 24 h");

/// Most bytes of one stored response (Redis values may be larger; a payment response is far smaller).
const RESPONSE_LEN_MAX: usize = 64 * 1024;

/// The Redis key of (subject, key).
pub fn idempotency_key(subject: &Subject, key: &IdempotencyKey) -> String {
    let mut hasher = Sha256::new();
    for field in [subject.as_str(), key.as_str()] {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("securepay:idem:{hex}")
}

/// Claims the key if free, or takes over an in-flight claim of the SAME fingerprint whose lease
/// ended by `now` (ARGV[3], unix ms) — returns nil; else returns the record held, in one atomic
/// step. A claim is `I<fingerprint><lease end, unix ms>`; a claim without a lease end (an older
/// writer's) counts as ended.
static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local v = redis.call('GET', KEYS[1])
          if v and (string.sub(v, 1, 1) ~= 'I' or string.sub(v, 2, 33) ~= string.sub(ARGV[1], 2, 33)
                    or (tonumber(string.sub(v, 34)) or 0) > tonumber(ARGV[3])) then
            return v
          end
          redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
          return false",
    )
});

/// Turns the in-flight claim into a completed record with the same fingerprint and a fresh TTL.
/// Returns 1 if completed, 0 if there is no claim, -1 if the record is already completed.
static COMPLETE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local v = redis.call('GET', KEYS[1])
          if not v then return 0 end
          if string.sub(v, 1, 1) ~= 'I' then return -1 end
          redis.call('SET', KEYS[1], 'C' .. string.sub(v, 2, 33) .. ARGV[1], 'EX', ARGV[2])
          return 1",
    )
});

/// Deletes the record only while it is in flight: a completed record is never released.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local v = redis.call('GET', KEYS[1])
          if v and string.sub(v, 1, 1) == 'I' then return redis.call('DEL', KEYS[1]) end
          return 0",
    )
});

/// `at` in whole unix milliseconds (a Lua number holds it exactly).
fn unix_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).expect("a plausible instant fits i64 ms")
}

#[derive(Debug, Clone)]
pub struct RedisIdempotencyStore {
    redis: Redis,
}

impl RedisIdempotencyStore {
    pub fn new(redis: Redis) -> RedisIdempotencyStore {
        RedisIdempotencyStore { redis }
    }
}

#[async_trait]
impl IdempotencyStore for RedisIdempotencyStore {
    async fn claim(
        &self,
        subject: &Subject,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: OffsetDateTime,
    ) -> PortResult<Option<Record<Vec<u8>>>> {
        let redis_key = idempotency_key(subject, key);
        let now_ms = unix_ms(now);
        let value = encode_in_flight(fingerprint, now_ms + IDEMPOTENCY_LEASE_S * 1_000);
        let existing: Option<Vec<u8>> = self
            .redis
            .call("idempotency_claim", |mut c| async move {
                CLAIM.key(redis_key).arg(value).arg(IDEMPOTENCY_TTL_S).arg(now_ms).invoke_async(&mut c).await
            })
            .await?;
        existing.map(|bytes| decode_record(&bytes)).transpose()
    }

    async fn lookup(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<Option<Record<Vec<u8>>>> {
        let redis_key = idempotency_key(subject, key);
        let existing: Option<Vec<u8>> =
            self.redis
                .call("idempotency_lookup", |mut c| async move {
                    redis::cmd("GET").arg(redis_key).query_async(&mut c).await
                })
                .await?;
        existing.map(|bytes| decode_record(&bytes)).transpose()
    }

    async fn complete(&self, subject: &Subject, key: &IdempotencyKey, response: &[u8]) -> PortResult<()> {
        if response.len() > RESPONSE_LEN_MAX {
            return Err(PortError::Refused { rule: "idempotency_response_len_max" });
        }
        let redis_key = idempotency_key(subject, key);
        let response = response.to_vec();
        let outcome: i64 = self
            .redis
            .call("idempotency_complete", |mut c| async move {
                COMPLETE.key(redis_key).arg(response).arg(IDEMPOTENCY_TTL_S).invoke_async(&mut c).await
            })
            .await?;
        match outcome {
            1 => Ok(()),
            0 => Err(PortError::Refused { rule: "idempotency_claim_missing" }),
            _ => Err(PortError::Refused { rule: "idempotency_already_completed" }),
        }
    }

    async fn release(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<()> {
        let redis_key = idempotency_key(subject, key);
        self.redis
            .call(
                "idempotency_release",
                |mut c| async move { RELEASE.key(redis_key).invoke_async::<i64>(&mut c).await },
            )
            .await
            .map(|_deleted| ())
    }

    /// Returns 0: every record carries a TTL of [`IDEMPOTENCY_TTL_S`] (≥ 24 h), so Redis purges on
    /// its own and nothing is left for a sweep to delete.
    async fn purge_before(&self, _cutoff: OffsetDateTime) -> PortResult<u64> {
        Ok(0)
    }
}
