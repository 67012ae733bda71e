//! `MemoryBalanceCache`: the [`BalanceCache`] twin of `RedisBalanceCache`, with an outage switch.
//!
//! Keeps the same promises: a hit returns exactly what was put; an entry expires `ttl_s` seconds
//! after its `put` (measured on the [`Clock`] port, so under madsim on simulated time);
//! `invalidate` removes. One `std::sync::Mutex`, never held across an `.await`. While switched off
//! ([`MemoryBalanceCache::set_available`]) every call fails as `Unavailable { component: "redis" }`,
//! as the real cache does when Redis is down, and the entries survive (Redis restarted with its data).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use securepay_core::ids::AccountId;
use securepay_ports::{BalanceCache, CachedBalance, Clock, PortError, PortResult};
use time::{Duration, OffsetDateTime};

use crate::runtime::SimClock;

/// Most accounts one `invalidate` call deletes (as `RedisBalanceCache`).
const INVALIDATE_LEN_MAX: usize = 1024;

/// The in-memory cache. Clones share one state.
#[derive(Clone)]
pub struct MemoryBalanceCache {
    state: Arc<Mutex<CacheState>>,
    clock: Arc<dyn Clock>,
}

struct CacheState {
    available: bool,
    entries: BTreeMap<AccountId, Entry>,
}

struct Entry {
    balance: CachedBalance,
    expires_at: OffsetDateTime,
}

impl fmt::Debug for MemoryBalanceCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryBalanceCache")
            .field("available", &state.available)
            .field("entries", &state.entries.len())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBalanceCache {
    fn default() -> MemoryBalanceCache {
        MemoryBalanceCache::with_clock(Arc::new(SimClock))
    }
}

impl MemoryBalanceCache {
    /// An empty, available cache timed by [`SimClock`].
    pub fn new() -> MemoryBalanceCache {
        MemoryBalanceCache::default()
    }

    /// An empty, available cache whose TTLs run on `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> MemoryBalanceCache {
        let state = CacheState { available: true, entries: BTreeMap::new() };
        MemoryBalanceCache { state: Arc::new(Mutex::new(state)), clock }
    }

    /// Outage injection: while `false`, every call fails as `Unavailable`.
    pub fn set_available(&self, available: bool) {
        self.lock().available = available;
    }

    /// Drops every entry (a Redis `FLUSHALL` or a restart without persistence).
    pub fn flush(&self) {
        self.lock().entries.clear();
    }

    /// The state, if the cache is up.
    fn up(&self) -> PortResult<MutexGuard<'_, CacheState>> {
        let state = self.lock();
        if state.available { Ok(state) } else { Err(PortError::Unavailable { component: "redis" }) }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // Every method leaves the state consistent before it could panic; a poisoned lock still
        // holds a usable cache.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl BalanceCache for MemoryBalanceCache {
    async fn get(&self, id: AccountId) -> PortResult<Option<CachedBalance>> {
        let now = self.clock.now();
        let mut state = self.up()?;
        match state.entries.get(&id) {
            Some(entry) if now < entry.expires_at => Ok(Some(entry.balance.clone())),
            Some(_) => {
                state.entries.remove(&id);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn put(&self, balance: &CachedBalance, ttl_s: u32) -> PortResult<()> {
        if ttl_s == 0 {
            return Err(PortError::Refused { rule: "cache_ttl_positive" });
        }
        let expires_at = self.clock.now() + Duration::seconds(i64::from(ttl_s));
        let mut state = self.up()?;
        state.entries.insert(balance.account.id, Entry { balance: balance.clone(), expires_at });
        Ok(())
    }

    async fn invalidate(&self, ids: &[AccountId]) -> PortResult<()> {
        if ids.len() > INVALIDATE_LEN_MAX {
            return Err(PortError::Refused { rule: "invalidate_len_max" });
        }
        let mut state = self.up()?;
        for id in ids {
            state.entries.remove(id);
        }
        Ok(())
    }
}
