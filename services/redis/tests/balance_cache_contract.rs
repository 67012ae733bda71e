//! The `BalanceCache` contract (SPEC §6.3): ONE suite of guarantees, each a generic function over
//! the cache, run against the real Redis (`RedisBalanceCache`) and its in-memory twin
//! (`MemoryBalanceCache`). Every test uses fresh random account ids, so tests sharing one Redis
//! never see each other's keys.
//!
//! Plus, Redis only: a value that does not read back is `Corrupt`; an unreachable Redis is
//! `Unavailable` within the call timeout, never a hang.

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use securepay_core::ids::{AccountId, Subject};
use securepay_core::money::Currency;
use securepay_memory::MemoryBalanceCache;
use securepay_ports::{AccountView, BalanceCache, CachedBalance, PortError};
use securepay_redis::{CALL_TIMEOUT_DEFAULT, Redis, RedisBalanceCache, balance_key};
use securepay_testkit::{component, var};
use time::OffsetDateTime;
use uuid::Uuid;

/// How long a TTL test waits at most for a 1 s entry to be gone (Redis expires lazily on read, so
/// it is gone as soon as the TTL passed; the margin only absorbs a slow machine).
const EXPIRY_WAIT_MAX: Duration = Duration::from_secs(5);

fn account() -> AccountId {
    AccountId::from_uuid(Uuid::new_v4())
}

fn cached(id: AccountId, balance: &str) -> CachedBalance {
    CachedBalance {
        account: AccountView {
            id,
            owner: Subject::parse("user:contract|42").unwrap(),
            currency: Currency::from_code("EUR").unwrap(),
            balance: Decimal::from_str(balance).unwrap(),
        },
        cached_at: OffsetDateTime::from_unix_timestamp_nanos(1_800_000_000_123_456_789).unwrap(),
    }
}

// ---------------------------------------------------------------------------------------------
// The guarantees.

async fn contract_an_account_never_put_is_a_miss<C: BalanceCache>(cache: C) {
    assert_eq!(cache.get(account()).await.unwrap(), None);
}

async fn contract_a_put_balance_reads_back_exactly_with_its_decimal_balance<C: BalanceCache>(cache: C) {
    let id = account();
    // More digits than an f64 holds: a float anywhere on the way would change it.
    let balance = cached(id, "98765432109876543.21");
    cache.put(&balance, 60).await.unwrap();
    assert_eq!(cache.get(id).await.unwrap(), Some(balance.clone()));
    assert_eq!(cache.get(id).await.unwrap().unwrap().account.balance.to_string(), "98765432109876543.21");

    let zero_with_scale = cached(id, "0.00");
    cache.put(&zero_with_scale, 60).await.unwrap();
    let read = cache.get(id).await.unwrap().unwrap();
    assert_eq!(read.account.balance.to_string(), "0.00", "the scale survives too");
}

async fn contract_a_put_overwrites_and_accounts_are_independent<C: BalanceCache>(cache: C) {
    let (a, b) = (account(), account());
    cache.put(&cached(a, "1.00"), 60).await.unwrap();
    cache.put(&cached(b, "2.00"), 60).await.unwrap();
    cache.put(&cached(a, "3.00"), 60).await.unwrap();
    assert_eq!(cache.get(a).await.unwrap(), Some(cached(a, "3.00")));
    assert_eq!(cache.get(b).await.unwrap(), Some(cached(b, "2.00")));
}

async fn contract_invalidate_removes_exactly_the_given_accounts<C: BalanceCache>(cache: C) {
    let (a, b, c) = (account(), account(), account());
    for id in [a, b, c] {
        cache.put(&cached(id, "10.00"), 60).await.unwrap();
    }
    cache.invalidate(&[a, b, account()]).await.unwrap();
    assert_eq!(cache.get(a).await.unwrap(), None);
    assert_eq!(cache.get(b).await.unwrap(), None);
    assert_eq!(cache.get(c).await.unwrap(), Some(cached(c, "10.00")));
    cache.invalidate(&[]).await.unwrap();
}

async fn contract_put_many_is_a_put_of_each<C: BalanceCache>(cache: C) {
    let (a, b) = (account(), account());
    cache.put(&cached(a, "1.00"), 60).await.unwrap();
    cache.put_many(&[cached(a, "7.00"), cached(b, "8.50")], 60).await.unwrap();
    assert_eq!(cache.get(a).await.unwrap(), Some(cached(a, "7.00")), "overwritten");
    assert_eq!(cache.get(b).await.unwrap(), Some(cached(b, "8.50")));
    cache.put_many(&[], 60).await.unwrap();
    assert_eq!(cache.put_many(&[cached(a, "9.00")], 0).await, Err(PortError::Refused { rule: "cache_ttl_positive" }));
    assert_eq!(cache.get(a).await.unwrap(), Some(cached(a, "7.00")), "a refused call writes nothing");
}

async fn contract_an_entry_expires_after_its_ttl<C: BalanceCache>(cache: C) {
    let id = account();
    cache.put(&cached(id, "5.00"), 1).await.unwrap();
    assert!(cache.get(id).await.unwrap().is_some(), "fresh entry is a hit");
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if cache.get(id).await.unwrap().is_none() {
            break;
        }
        assert!(started.elapsed() < EXPIRY_WAIT_MAX, "a 1 s entry still served after {EXPIRY_WAIT_MAX:?}");
    }
    assert!(started.elapsed() >= Duration::from_millis(800), "expired too early: {:?}", started.elapsed());
}

async fn contract_a_zero_ttl_is_refused<C: BalanceCache>(cache: C) {
    let id = account();
    assert_eq!(cache.put(&cached(id, "1.00"), 0).await, Err(PortError::Refused { rule: "cache_ttl_positive" }));
    assert_eq!(cache.get(id).await.unwrap(), None);
}

securepay_testkit::contract_suite! {
    cases: [
        contract_an_account_never_put_is_a_miss,
        contract_a_put_balance_reads_back_exactly_with_its_decimal_balance,
        contract_a_put_overwrites_and_accounts_are_independent,
        contract_invalidate_removes_exactly_the_given_accounts,
        contract_put_many_is_a_put_of_each,
        contract_an_entry_expires_after_its_ttl,
        contract_a_zero_ttl_is_refused,
    ],
    implementations: { memory => memory_cache, redis => redis_cache },
}

async fn memory_cache() -> Option<MemoryBalanceCache> {
    Some(MemoryBalanceCache::new())
}

async fn redis_cache() -> Option<RedisBalanceCache> {
    let url = component(var::REDIS_URL)?;
    Some(RedisBalanceCache::new(Redis::connect(&url, CALL_TIMEOUT_DEFAULT).unwrap()))
}

// ---------------------------------------------------------------------------------------------
// The twin's outage switch, and Redis only: corruption and outages.

#[tokio::test]
async fn the_twin_switched_off_is_unavailable_and_keeps_its_entries() {
    let cache = MemoryBalanceCache::new();
    let id = account();
    cache.put(&cached(id, "7.00"), 60).await.unwrap();
    cache.set_available(false);
    let down = Err(PortError::Unavailable { component: "redis" });
    assert_eq!(cache.get(id).await, down.clone().map(|()| None));
    assert_eq!(cache.put(&cached(id, "8.00"), 60).await, down);
    assert_eq!(cache.invalidate(&[id]).await, down);
    cache.set_available(true);
    assert_eq!(cache.get(id).await.unwrap(), Some(cached(id, "7.00")));
}

#[tokio::test]
async fn a_value_that_does_not_read_back_is_corrupt_and_the_next_put_replaces_it() {
    let Some(url) = component(var::REDIS_URL) else { return };
    let id = account();
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    ::redis::cmd("SET")
        .arg(balance_key(id))
        .arg("1|not|a|balance")
        .arg("EX")
        .arg(60)
        .exec_async(&mut conn)
        .await
        .unwrap();

    let cache = RedisBalanceCache::new(Redis::connect(&url, CALL_TIMEOUT_DEFAULT).unwrap());
    assert!(matches!(cache.get(id).await, Err(PortError::Corrupt { .. })));
    cache.put(&cached(id, "4.00"), 60).await.unwrap();
    assert_eq!(cache.get(id).await.unwrap(), Some(cached(id, "4.00")));
}

/// A Redis that accepts connections but never answers (here: a listener nobody reads from) fails
/// each call within the timeout instead of hanging the caller.
#[tokio::test]
async fn a_hung_redis_fails_fast_as_unavailable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let timeout = Duration::from_millis(200);
    let cache = RedisBalanceCache::new(Redis::connect(&format!("redis://{address}"), timeout).unwrap());
    let id = account();
    let started = std::time::Instant::now();
    assert_eq!(cache.get(id).await, Err(PortError::Unavailable { component: "redis" }));
    assert_eq!(cache.put(&cached(id, "1.00"), 60).await, Err(PortError::Unavailable { component: "redis" }));
    assert_eq!(cache.invalidate(&[id]).await, Err(PortError::Unavailable { component: "redis" }));
    assert!(started.elapsed() < Duration::from_secs(2), "three calls took {:?}", started.elapsed());
}

/// Nothing listens: refused connections are `Unavailable` too.
#[tokio::test]
async fn an_unreachable_redis_is_unavailable() {
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let cache = RedisBalanceCache::new(Redis::connect(&format!("redis://{address}"), CALL_TIMEOUT_DEFAULT).unwrap());
    assert_eq!(cache.get(account()).await, Err(PortError::Unavailable { component: "redis" }));
}

/// Two platforms (databases) sharing one Redis: the same account id in two namespaces is two
/// entries, and invalidating one leaves the other (a test database's demo accounts must never
/// answer for the running platform's).
#[tokio::test]
async fn namespaces_keep_the_same_account_apart() {
    let Some(url) = component(var::REDIS_URL) else { return };
    let redis = || Redis::connect(&url, CALL_TIMEOUT_DEFAULT).unwrap();
    let suffix = Uuid::new_v4().simple().to_string();
    let a = RedisBalanceCache::namespaced(redis(), &format!("a_{suffix}")).unwrap();
    let b = RedisBalanceCache::namespaced(redis(), &format!("b_{suffix}")).unwrap();
    let id = account();
    a.put(&cached(id, "1.00"), 60).await.unwrap();
    b.put(&cached(id, "2.00"), 60).await.unwrap();
    assert_eq!(a.get(id).await.unwrap().unwrap().account.balance.to_string(), "1.00");
    assert_eq!(b.get(id).await.unwrap().unwrap().account.balance.to_string(), "2.00");
    a.invalidate(&[id]).await.unwrap();
    assert_eq!(a.get(id).await.unwrap(), None);
    assert!(b.get(id).await.unwrap().is_some(), "another namespace's entry survives");
    for bad in ["", "A", "a-b", "a:b", &"x".repeat(64)] {
        assert!(RedisBalanceCache::namespaced(redis(), bad).is_none(), "{bad:?}");
    }
}
