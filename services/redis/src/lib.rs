//! The Redis adapters: [`RedisBalanceCache`] (SPEC §6.3, cache-aside balances) and
//! [`RedisIdempotencyStore`] (SPEC §6.1, the fast path in front of PostgreSQL, which stays the truth).
//!
//! Both are advisory: Redis may be down, slow or flushed, and the services then fall back to
//! PostgreSQL. So every call is bounded by a short timeout ([`CALL_TIMEOUT_DEFAULT`]) and a hung or
//! unreachable Redis is `PortError::Unavailable { component: "redis" }`, never a hang. Driver errors
//! become [`securepay_ports::PortError`]s in one place (`connection::Redis::call`); the driver text
//! goes to the log, never into `Display`.
//!
//! Architecture invariant: depends on the domain core and the ports only; the simulator
//! (`--cfg madsim`) never builds the redis crate and uses `securepay_memory::MemoryBalanceCache` and
//! `MemoryIdempotencyStore`, checked by the same contract suites (`tests/*_contract.rs`).

#[cfg(not(madsim))]
mod codec;

#[cfg(not(madsim))]
mod balance_cache;
#[cfg(not(madsim))]
mod connection;
#[cfg(not(madsim))]
mod idempotency;

#[cfg(not(madsim))]
pub use balance_cache::{RedisBalanceCache, balance_key};
#[cfg(not(madsim))]
pub use connection::{CALL_TIMEOUT_DEFAULT, Redis};
#[cfg(not(madsim))]
pub use idempotency::{IDEMPOTENCY_TTL_S, RedisIdempotencyStore, idempotency_key};
