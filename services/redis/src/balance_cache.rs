//! `RedisBalanceCache`: cache-aside balances (SPEC §6.3) under `securepay:balance:<account id>`, or
//! `securepay:<namespace>:balance:<account id>` when several platforms (databases) share one Redis.

use async_trait::async_trait;
use redis::AsyncCommands as _;
use securepay_core::ids::AccountId;
use securepay_ports::{BalanceCache, CachedBalance, PortError, PortResult};

use crate::codec::{decode_balance, encode_balance};
use crate::connection::Redis;

/// Most accounts one `invalidate` call deletes (a settlement touches two).
const INVALIDATE_LEN_MAX: usize = 1024;

/// The Redis key of an account's cached balance (no namespace).
pub fn balance_key(id: AccountId) -> String {
    format!("securepay:balance:{id}")
}

/// Most bytes of a namespace: `[a-z0-9_]`, like a PostgreSQL database name.
pub const NAMESPACE_LEN_MAX: usize = 63;

/// Advisory only: the account service never decides a debit from it. Every method fails as
/// `Unavailable` when Redis is down or slow; a value that does not read back is `Corrupt`, which a
/// caller treats as a miss (and the next `put` overwrites it).
#[derive(Debug, Clone)]
pub struct RedisBalanceCache {
    redis: Redis,
    namespace: Option<String>,
}

impl RedisBalanceCache {
    pub fn new(redis: Redis) -> RedisBalanceCache {
        RedisBalanceCache { redis, namespace: None }
    }

    /// Keys under `securepay:<namespace>:balance:`, so balances of the same account ids in two
    /// databases (a second platform, a test database) never read each other's entries. The
    /// account service uses its database name. `None` if `namespace` is not `[a-z0-9_]{1,63}`.
    pub fn namespaced(redis: Redis, namespace: &str) -> Option<RedisBalanceCache> {
        let valid = !namespace.is_empty()
            && namespace.len() <= NAMESPACE_LEN_MAX
            && namespace.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        valid.then(|| RedisBalanceCache { redis, namespace: Some(namespace.to_owned()) })
    }

    fn key(&self, id: AccountId) -> String {
        match &self.namespace {
            Some(namespace) => format!("securepay:{namespace}:balance:{id}"),
            None => balance_key(id),
        }
    }
}

#[async_trait]
impl BalanceCache for RedisBalanceCache {
    async fn get(&self, id: AccountId) -> PortResult<Option<CachedBalance>> {
        let key = self.key(id);
        let value: Option<Vec<u8>> = self.redis.call("balance_get", |mut c| async move { c.get(key).await }).await?;
        value.map(|bytes| decode_balance(id, &bytes)).transpose()
    }

    async fn put(&self, balance: &CachedBalance, ttl_s: u32) -> PortResult<()> {
        if ttl_s == 0 {
            // `SET .. EX 0` is an error in Redis; a zero TTL is a caller bug, refused the same way
            // by the twin.
            return Err(PortError::Refused { rule: "cache_ttl_positive" });
        }
        let key = self.key(balance.account.id);
        let value = encode_balance(balance);
        self.redis.call("balance_put", |mut c| async move { c.set_ex(key, value, u64::from(ttl_s)).await }).await
    }

    async fn put_many(&self, balances: &[CachedBalance], ttl_s: u32) -> PortResult<()> {
        if ttl_s == 0 {
            return Err(PortError::Refused { rule: "cache_ttl_positive" });
        }
        if balances.len() > securepay_ports::ledger::ACCOUNTS_LEN_MAX {
            return Err(PortError::Refused { rule: "accounts_len_max" });
        }
        if balances.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for balance in balances {
            pipe.set_ex(self.key(balance.account.id), encode_balance(balance), u64::from(ttl_s)).ignore();
        }
        self.redis.call("balance_put_many", |mut c| async move { pipe.query_async::<()>(&mut c).await }).await
    }

    async fn invalidate(&self, ids: &[AccountId]) -> PortResult<()> {
        if ids.len() > INVALIDATE_LEN_MAX {
            return Err(PortError::Refused { rule: "invalidate_len_max" });
        }
        if ids.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key(*id)).collect();
        self.redis.call("balance_invalidate", |mut c| async move { c.del::<_, ()>(keys).await }).await
    }
}
