//! The `IdempotencyStore` contract (SPEC §6.1): ONE suite of guarantees, each a generic function
//! over the store, run against the real Redis (`RedisIdempotencyStore`) and its in-memory twin
//! (`MemoryIdempotencyStore`). Every test uses a fresh random subject, so tests sharing one Redis
//! never see each other's records.
//!
//! The decision (replay, `KeyReused`, `InProgress`) is `securepay_core::idempotency::decide`'s;
//! these tests check only what the stores persist and return to it.

use std::sync::Arc;

use securepay_core::idempotency::{Fingerprint, IdempotencyKey, Record};
use securepay_core::ids::Subject;
use securepay_memory::MemoryIdempotencyStore;
use securepay_ports::{IdempotencyStore, PortError};
use securepay_redis::{CALL_TIMEOUT_DEFAULT, Redis, RedisIdempotencyStore, idempotency_key};
use securepay_testkit::{component, var};
use time::OffsetDateTime;
use uuid::Uuid;

/// How many callers race for one key.
const CONCURRENT_CLAIMERS: usize = 50;

fn subject() -> Subject {
    Subject::parse(&format!("user-{}", Uuid::new_v4().simple())).unwrap()
}

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::parse(text).unwrap()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
}

fn fingerprint(request: &str) -> Fingerprint {
    Fingerprint::of(&[request])
}

/// A response with every byte value, so any text conversion on the way would show.
fn response() -> Vec<u8> {
    (0..=255u8).chain(b"{\"payment_id\":\"p-1\"}".iter().copied()).collect()
}

// ---------------------------------------------------------------------------------------------
// The guarantees.

async fn contract_the_first_claim_gets_none_and_the_second_the_in_flight_record<S: IdempotencyStore>(store: S) {
    let (s, k) = (subject(), key("order-1"));
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(), None);
    assert_eq!(
        store.claim(&s, &k, fingerprint("b"), now()).await.unwrap(),
        Some(Record::InFlight { fingerprint: fingerprint("a") }),
        "the record keeps the first fingerprint, whoever asks"
    );
}

async fn contract_after_complete_a_claim_gets_the_byte_identical_response<S: IdempotencyStore>(store: S) {
    let (s, k) = (subject(), key("order-2"));
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(), None);
    store.complete(&s, &k, &response()).await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(),
            Some(Record::Completed { fingerprint: fingerprint("a"), response: response() })
        );
    }
    assert_eq!(
        store.claim(&s, &k, fingerprint("other"), now()).await.unwrap(),
        Some(Record::Completed { fingerprint: fingerprint("a"), response: response() })
    );
}

async fn contract_an_empty_response_is_stored_as_empty<S: IdempotencyStore>(store: S) {
    let (s, k) = (subject(), key("order-empty"));
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(), None);
    store.complete(&s, &k, b"").await.unwrap();
    assert_eq!(
        store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(),
        Some(Record::Completed { fingerprint: fingerprint("a"), response: Vec::new() })
    );
}

async fn contract_complete_needs_the_in_flight_claim<S: IdempotencyStore>(store: S) {
    let (s, k) = (subject(), key("order-3"));
    assert_eq!(store.complete(&s, &k, b"x").await, Err(PortError::Refused { rule: "idempotency_claim_missing" }));
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(), None, "a refused complete wrote nothing");
    store.complete(&s, &k, b"first").await.unwrap();
    assert_eq!(
        store.complete(&s, &k, b"second").await,
        Err(PortError::Refused { rule: "idempotency_already_completed" })
    );
    assert_eq!(
        store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(),
        Some(Record::Completed { fingerprint: fingerprint("a"), response: b"first".to_vec() })
    );
}

async fn contract_release_frees_an_in_flight_claim_for_a_retry<S: IdempotencyStore>(store: S) {
    let (s, k) = (subject(), key("order-4"));
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(), None);
    store.release(&s, &k).await.unwrap();
    assert_eq!(store.claim(&s, &k, fingerprint("b"), now()).await.unwrap(), None, "the key is free again");
    store.release(&s, &k).await.unwrap();
    store.release(&s, &k).await.unwrap();
}

async fn contract_release_never_frees_a_completed_record<S: IdempotencyStore>(store: S) {
    let (s, k) = (subject(), key("order-5"));
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(), None);
    store.complete(&s, &k, &response()).await.unwrap();
    store.release(&s, &k).await.unwrap();
    assert_eq!(
        store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(),
        Some(Record::Completed { fingerprint: fingerprint("a"), response: response() })
    );
}

async fn contract_of_concurrent_claims_of_one_key_exactly_one_gets_none<S: IdempotencyStore + Clone>(store: S) {
    let (s, k) = (subject(), key("order-race"));
    let start = Arc::new(tokio::sync::Barrier::new(CONCURRENT_CLAIMERS));
    let mut claimers = Vec::with_capacity(CONCURRENT_CLAIMERS);
    for i in 0..CONCURRENT_CLAIMERS {
        let (store, s, k, start) = (store.clone(), s.clone(), k.clone(), start.clone());
        claimers.push(tokio::spawn(async move {
            start.wait().await;
            store.claim(&s, &k, fingerprint(&format!("claimer-{i}")), now()).await.unwrap()
        }));
    }
    let mut winners = Vec::new();
    let mut seen = Vec::new();
    for (i, claimer) in claimers.into_iter().enumerate() {
        match claimer.await.unwrap() {
            None => winners.push(i),
            Some(Record::InFlight { fingerprint }) => seen.push(fingerprint),
            Some(other) => panic!("unexpected record {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one claimer wins, got {winners:?}");
    let winner = fingerprint(&format!("claimer-{}", winners[0]));
    assert!(seen.iter().all(|f| *f == winner), "every loser sees the winner's claim");
}

async fn contract_an_ended_lease_is_taken_over_by_the_same_request_only<S: IdempotencyStore>(store: S) {
    let (s, k) = (subject(), key("order-lease"));
    let lease = time::Duration::seconds(securepay_ports::payments::IDEMPOTENCY_LEASE_S);
    let held = Some(Record::InFlight { fingerprint: fingerprint("a") });
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(), None);
    let almost = now() + lease - time::Duration::seconds(1);
    assert_eq!(store.claim(&s, &k, fingerprint("a"), almost).await.unwrap(), held, "the lease holds");
    let ended = now() + lease;
    assert_eq!(store.claim(&s, &k, fingerprint("b"), ended).await.unwrap(), held, "another request never takes over");
    assert_eq!(store.claim(&s, &k, fingerprint("a"), ended).await.unwrap(), None, "the same request takes over");
    assert_eq!(store.claim(&s, &k, fingerprint("a"), ended).await.unwrap(), held, "with a new lease");
    store.complete(&s, &k, b"done").await.unwrap();
    let much_later = ended + lease * 10;
    assert!(
        matches!(store.claim(&s, &k, fingerprint("a"), much_later).await.unwrap(), Some(Record::Completed { .. })),
        "a completed record has no lease"
    );
}

async fn contract_lookup_reads_the_record_and_never_claims<S: IdempotencyStore>(store: S) {
    let (s, k) = (subject(), key("order-lookup"));
    assert_eq!(store.lookup(&s, &k).await.unwrap(), None);
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(), None, "the lookup claimed nothing");
    assert_eq!(store.lookup(&s, &k).await.unwrap(), Some(Record::InFlight { fingerprint: fingerprint("a") }));
    store.complete(&s, &k, &response()).await.unwrap();
    assert_eq!(
        store.lookup(&s, &k).await.unwrap(),
        Some(Record::Completed { fingerprint: fingerprint("a"), response: response() })
    );
}

async fn contract_subjects_are_isolated<S: IdempotencyStore>(store: S) {
    let (alice, bob, k) = (subject(), subject(), key("shared-key"));
    assert_eq!(store.claim(&alice, &k, fingerprint("a"), now()).await.unwrap(), None);
    assert_eq!(store.claim(&bob, &k, fingerprint("b"), now()).await.unwrap(), None, "bob's key is his own");
    store.complete(&alice, &k, b"alice").await.unwrap();
    store.release(&bob, &k).await.unwrap();
    assert_eq!(
        store.claim(&alice, &k, fingerprint("a"), now()).await.unwrap(),
        Some(Record::Completed { fingerprint: fingerprint("a"), response: b"alice".to_vec() })
    );
    assert_eq!(store.claim(&bob, &k, fingerprint("b"), now()).await.unwrap(), None);
}

/// ("u:a", "b") and ("u", "a:b") would both be "u:a:b" if subject and key were just joined.
async fn contract_hostile_keys_do_not_collide<S: IdempotencyStore>(store: S) {
    let base = subject();
    let joined = Subject::parse(&format!("{base}:a")).unwrap();
    assert_eq!(store.claim(&joined, &key("b"), fingerprint("1"), now()).await.unwrap(), None);
    assert_eq!(store.claim(&base, &key("a:b"), fingerprint("2"), now()).await.unwrap(), None);
    assert_eq!(store.claim(&base, &key("a"), fingerprint("3"), now()).await.unwrap(), None);
    assert_eq!(store.claim(&base, &key("a:"), fingerprint("4"), now()).await.unwrap(), None);
    assert_eq!(
        store.claim(&base, &key("a:b"), fingerprint("x"), now()).await.unwrap(),
        Some(Record::InFlight { fingerprint: fingerprint("2") })
    );
}

securepay_testkit::contract_suite! {
    cases: [
        contract_the_first_claim_gets_none_and_the_second_the_in_flight_record,
        contract_after_complete_a_claim_gets_the_byte_identical_response,
        contract_an_empty_response_is_stored_as_empty,
        contract_complete_needs_the_in_flight_claim,
        contract_release_frees_an_in_flight_claim_for_a_retry,
        contract_release_never_frees_a_completed_record,
        contract_of_concurrent_claims_of_one_key_exactly_one_gets_none,
        contract_an_ended_lease_is_taken_over_by_the_same_request_only,
        contract_lookup_reads_the_record_and_never_claims,
        contract_subjects_are_isolated,
        contract_hostile_keys_do_not_collide,
    ],
    implementations: { memory => memory_store, redis => redis_store },
}

async fn memory_store() -> Option<MemoryIdempotencyStore> {
    Some(MemoryIdempotencyStore::new())
}

async fn redis_store() -> Option<RedisIdempotencyStore> {
    let url = component(var::REDIS_URL)?;
    Some(RedisIdempotencyStore::new(Redis::connect(&url, CALL_TIMEOUT_DEFAULT).unwrap()))
}

// ---------------------------------------------------------------------------------------------
// Implementation-specific promises.

#[tokio::test]
async fn redis_records_live_at_least_24_hours() {
    let Some(url) = component(var::REDIS_URL) else { return };
    let store = redis_store().await.unwrap();
    let (s, k) = (subject(), key("order-ttl"));
    let mut conn = ::redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let ttl_s = |conn: &mut ::redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let redis_key = idempotency_key(&s, &k);
        async move { ::redis::cmd("TTL").arg(redis_key).query_async::<i64>(&mut conn).await.unwrap() }
    };
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(), None);
    assert!(ttl_s(&mut conn).await >= 24 * 60 * 60, "claim TTL");
    store.complete(&s, &k, b"done").await.unwrap();
    assert!(ttl_s(&mut conn).await >= 24 * 60 * 60, "completed TTL");
    assert_eq!(store.purge_before(now()).await.unwrap(), 0, "Redis purges by TTL");
}

#[tokio::test]
async fn the_twin_purges_records_created_before_the_cutoff() {
    let store = MemoryIdempotencyStore::new();
    let s = subject();
    let day = time::Duration::days(1);
    store.claim(&s, &key("old"), fingerprint("a"), now() - day * 2).await.unwrap();
    store.claim(&s, &key("new"), fingerprint("b"), now()).await.unwrap();
    assert_eq!(store.purge_before(now() - day).await.unwrap(), 1);
    assert_eq!(store.claim(&s, &key("old"), fingerprint("c"), now()).await.unwrap(), None);
    assert_eq!(
        store.claim(&s, &key("new"), fingerprint("c"), now()).await.unwrap(),
        Some(Record::InFlight { fingerprint: fingerprint("b") })
    );
}

#[tokio::test]
async fn the_twin_switched_off_is_unavailable_and_flush_forgets() {
    let store = MemoryIdempotencyStore::new();
    let (s, k) = (subject(), key("order-down"));
    store.set_available(false);
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await, Err(PortError::Unavailable { component: "redis" }));
    store.set_available(true);
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(), None);
    store.flush();
    assert_eq!(store.claim(&s, &k, fingerprint("a"), now()).await.unwrap(), None);
}

#[tokio::test]
async fn a_redis_record_that_does_not_read_back_is_corrupt() {
    let Some(url) = component(var::REDIS_URL) else { return };
    let store = redis_store().await.unwrap();
    let (s, k) = (subject(), key("order-garbage"));
    let mut conn = ::redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    ::redis::cmd("SET")
        .arg(idempotency_key(&s, &k))
        .arg("garbage")
        .arg("EX")
        .arg(60)
        .exec_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(store.claim(&s, &k, fingerprint("a"), now()).await, Err(PortError::Corrupt { .. })));
}
