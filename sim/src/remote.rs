//! Infrastructure on its own madsim nodes: the in-memory twins served over the simulated network,
//! and the port clients service nodes use to reach them — so partitions, kills and outages hit the
//! database, the broker and the cache the way they hit PostgreSQL, Kafka and Redis.
//!
//! Transport: a datagram RPC on a madsim `net::Endpoint` (`send_to_raw` / `recv_from_raw`; the
//! payload is a `Box<dyn Any>`, nothing is serialized). A call ships one operation to the node that
//! owns the state and runs it there against the twin; the reply comes back tagged with a per-call
//! tag drawn from the seed. Promises:
//! - every call is bounded: no reply within its timeout (partition, killed node, lost reply) is
//!   `PortError::Unavailable { component }`, as the real adapters report a timeout;
//! - an operation runs atomically on the owning node (the twins apply a call under one lock), so a
//!   call either committed or did nothing — and "committed but unacknowledged" happens: a reply
//!   lost on a clogged link, to a node kill, or to [`ServerFaults::lose_replies`];
//! - a killed infrastructure node loses only what lived in the node (connections, consumer-group
//!   membership, calls in flight); the twin it served was created by the harness and keeps every
//!   committed call, like a database's disk ([`serve`] takes it from outside the node);
//! - [`ServerFaults::set_down`] is an outage: the node answers every call `Unavailable` at once;
//! - [`CacheFaults::lose_invalidations`] makes the cache stale: balance invalidations are
//!   acknowledged but not applied (entries still expire with their TTL).
//!
//! Ports served: [`Database`] (`LedgerStore` + `Outbox`, `PaymentStore` + `Outbox` +
//! `IdempotencyStore` truth), [`Cache`] (`BalanceCache`, `IdempotencyStore` fast path) and
//! [`Broker`] (`EventLog`, `EventConsumer`: membership lives on the broker node, ends with a
//! session timeout when its client stops polling, and a member the broker no longer knows rejoins
//! on its next poll — resuming from the committed offsets).

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use madsim::net::Endpoint;
use madsim::rand::{Rng, thread_rng};
use securepay_core::events::PaymentInitiated;
use securepay_core::idempotency::{Fingerprint, IdempotencyKey, Record};
use securepay_core::ids::{AccountId, PaymentId, Subject};
use securepay_core::payment::{Payment, Transition};
use securepay_memory::{
    MemoryBalanceCache, MemoryConsumer, MemoryEventLog, MemoryIdempotencyStore, MemoryLedgerStore,
    MemoryNotificationStore, MemoryPaymentStore,
};
use securepay_ports::{
    AccountView, BalanceCache, CachedBalance, ConsumedRecord, EventConsumer, EventLog, IdempotencyCompletion,
    IdempotencyStore, LedgerStore, NewPayment, Notification, NotificationStore, Outbox, OutboxEvent, OutgoingRecord,
    PaymentStore, PortError, PortResult, Recorded, SettlementRequest, SettlementResult, TopicPartitionOffset,
    TransitionRecord,
};
use time::OffsetDateTime;
use tokio::time::{Instant, sleep, timeout};

/// The endpoint tag every request travels under (one server per address).
const REQUEST_TAG: u64 = 0x5ec0_0e9a_7000_0001;

/// The ports the infrastructure nodes listen on.
pub const DATABASE_PORT: u16 = 5432;
pub const CACHE_PORT: u16 = 6379;
pub const BROKER_PORT: u16 = 9092;

/// Default bound of one call (the Redis adapter uses 250 ms, PostgreSQL a statement timeout).
pub const CALL_TIMEOUT_DEFAULT: Duration = Duration::from_millis(500);
/// A consumer that has not polled for this long is removed from its group (Kafka's
/// `session.timeout.ms`), so a killed service's partitions move to the surviving members.
pub const SESSION_TIMEOUT: Duration = Duration::from_millis(3_000);

type Reply = Box<dyn Any + Send + Sync>;
type Job<S> = Box<dyn FnOnce(S, SocketAddr) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send>;
/// What travels: the reply tag and the operation (a `Mutex` only to make the payload `Sync`).
type RequestPayload<S> = (u64, Mutex<Option<Job<S>>>);
/// What comes back: the operation's result, or `None` when the node refused it (outage).
type ReplyPayload = Option<Reply>;

/// Fault switches of one server, held by the harness (they outlive node restarts).
#[derive(Debug, Default)]
pub struct ServerFaults {
    down: AtomicBool,
    lose_reply_per_mille: AtomicU32,
    lost_replies: AtomicU64,
}

impl ServerFaults {
    pub fn new() -> Arc<ServerFaults> {
        Arc::new(ServerFaults::default())
    }

    /// Outage: while `true` every call is answered `Unavailable` and nothing runs.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// After running an operation, drop its reply with this probability (per mille): the call
    /// committed but the caller times out and must retry.
    pub fn lose_replies(&self, per_mille: u32) {
        self.lose_reply_per_mille.store(per_mille.min(1000), Ordering::SeqCst);
    }

    /// How many replies were dropped so far.
    pub fn lost_replies(&self) -> u64 {
        self.lost_replies.load(Ordering::SeqCst)
    }
}

/// Serves `state` at `addr` until the node dies. Call it from the node's `init` closure with
/// state created outside the node (the durable half), so a restart serves the same state again.
pub async fn serve<S: Clone + Send + Sync + 'static>(addr: SocketAddr, state: S, faults: Arc<ServerFaults>) {
    let endpoint = Endpoint::bind(addr).await.expect("an infrastructure node binds its port");
    loop {
        let Ok((payload, from)) = endpoint.recv_from_raw(REQUEST_TAG).await else { return };
        let Ok(request) = payload.downcast::<RequestPayload<S>>() else {
            // A client of another kind of node: nothing it could mean here, and no reply tag to use.
            continue;
        };
        let (reply_tag, job) = *request;
        let Some(job) = job.into_inner().unwrap_or_else(|p| p.into_inner()) else { continue };
        let endpoint = endpoint.clone();
        let state = state.clone();
        let faults = Arc::clone(&faults);
        madsim::task::spawn(async move {
            let reply: ReplyPayload =
                if faults.down.load(Ordering::SeqCst) { None } else { Some(job(state, from).await) };
            let lose = faults.lose_reply_per_mille.load(Ordering::SeqCst);
            if reply.is_some() && lose > 0 && thread_rng().gen_range(0..1000) < lose {
                faults.lost_replies.fetch_add(1, Ordering::SeqCst);
                return;
            }
            // A reply to a node that is gone is simply lost, as on a real network.
            let _ = endpoint.send_to_raw(from, reply_tag, Box::new(reply)).await;
        });
    }
}

/// A client of one infrastructure node, bound on the calling node.
pub struct RemoteClient<S> {
    endpoint: Endpoint,
    server: SocketAddr,
    component: &'static str,
    timeout: Duration,
    state: PhantomData<fn() -> S>,
}

impl<S> Clone for RemoteClient<S> {
    fn clone(&self) -> Self {
        RemoteClient {
            endpoint: self.endpoint.clone(),
            server: self.server,
            component: self.component,
            timeout: self.timeout,
            state: PhantomData,
        }
    }
}

impl<S> fmt::Debug for RemoteClient<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteClient").field("server", &self.server).field("component", &self.component).finish()
    }
}

impl<S: Send + Sync + 'static> RemoteClient<S> {
    /// A client on the current node for the server at `server`; failures name `component`
    /// (`postgresql`, `redis`, `kafka`, as the real adapters do).
    pub async fn connect(server: SocketAddr, component: &'static str) -> RemoteClient<S> {
        let endpoint = Endpoint::bind("0.0.0.0:0").await.expect("a client endpoint binds an ephemeral port");
        RemoteClient { endpoint, server, component, timeout: CALL_TIMEOUT_DEFAULT, state: PhantomData }
    }

    /// The same client with another call bound.
    pub fn with_timeout(mut self, timeout: Duration) -> RemoteClient<S> {
        self.timeout = timeout;
        self
    }

    fn unavailable(&self) -> PortError {
        PortError::Unavailable { component: self.component }
    }

    /// Runs `op` on the server's state, bounded by the client's timeout.
    pub async fn call<T, F, Fut>(&self, op: F) -> PortResult<T>
    where
        T: Send + Sync + 'static,
        F: FnOnce(S) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        self.call_with(self.timeout, move |state, _| op(state)).await
    }

    /// Runs `op` on the server's state with the caller's address (what the server "sees" of the
    /// peer), bounded by `bound`.
    pub async fn call_with<T, F, Fut>(&self, bound: Duration, op: F) -> PortResult<T>
    where
        T: Send + Sync + 'static,
        F: FnOnce(S, SocketAddr) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let job: Job<S> = Box::new(move |state, from| {
            Box::pin(async move {
                let reply: Reply = Box::new(op(state, from).await);
                reply
            })
        });
        let reply_tag: u64 = thread_rng().r#gen();
        let payload: RequestPayload<S> = (reply_tag, Mutex::new(Some(job)));
        let exchange = async {
            self.endpoint.send_to_raw(self.server, REQUEST_TAG, Box::new(payload)).await.ok()?;
            let (reply, _) = self.endpoint.recv_from_raw(reply_tag).await.ok()?;
            reply.downcast::<ReplyPayload>().ok().map(|r| *r)
        };
        match timeout(bound, exchange).await {
            Ok(Some(Some(reply))) => Ok(*reply.downcast::<T>().expect("a reply has the type its operation returns")),
            // Refused (outage), timed out, or the network is down.
            _ => Err(self.unavailable()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The database node: the stores of record.

/// What the database node serves: the account service's ledger, the payment service's store and
/// the notification service's store. Clones share state; create it in the harness (it survives
/// the node).
#[derive(Debug, Clone, Default)]
pub struct Database {
    pub ledger: MemoryLedgerStore,
    pub payments: MemoryPaymentStore,
    pub notifications: MemoryNotificationStore,
}

/// `NotificationStore` of the notification service, on the database node.
#[derive(Debug, Clone)]
pub struct RemoteNotificationStore(pub RemoteClient<Database>);

#[async_trait]
impl NotificationStore for RemoteNotificationStore {
    async fn record(&self, notification: &Notification) -> PortResult<Recorded> {
        let notification = notification.clone();
        self.0.call(move |db| async move { db.notifications.record(&notification).await }).await?
    }

    async fn record_batch(&self, batch: &[Notification]) -> PortResult<Vec<Recorded>> {
        let batch = batch.to_vec();
        self.0.call(move |db| async move { db.notifications.record_batch(&batch).await }).await?
    }

    async fn for_payment(&self, payment: PaymentId, limit: usize) -> PortResult<Vec<Notification>> {
        self.0.call(move |db| async move { db.notifications.for_payment(payment, limit).await }).await?
    }
}

/// `LedgerStore` + `Outbox` of the account service, on the database node.
#[derive(Debug, Clone)]
pub struct RemoteLedgerStore(pub RemoteClient<Database>);

/// `PaymentStore` + `Outbox` + `IdempotencyStore` (the truth) of the payment service, on the
/// database node.
#[derive(Debug, Clone)]
pub struct RemotePaymentStore(pub RemoteClient<Database>);

#[async_trait]
impl LedgerStore for RemoteLedgerStore {
    async fn settle(&self, batch: &[SettlementRequest], now: OffsetDateTime) -> PortResult<Vec<SettlementResult>> {
        let batch = batch.to_vec();
        self.0.call(move |db| async move { db.ledger.settle(&batch, now).await }).await?
    }

    async fn account(&self, id: AccountId) -> PortResult<Option<AccountView>> {
        self.0.call(move |db| async move { db.ledger.account(id).await }).await?
    }

    async fn accounts(&self, ids: &[AccountId]) -> PortResult<Vec<Option<AccountView>>> {
        let ids = ids.to_vec();
        self.0.call(move |db| async move { db.ledger.accounts(&ids).await }).await?
    }

    /// The planted bug `cache_decided_debit` reaches the database's twin this way (see
    /// `securepay_sim::planted`).
    async fn settle_funds_checked_by_caller(
        &self,
        batch: &[SettlementRequest],
        funded: &[bool],
        now: OffsetDateTime,
    ) -> PortResult<Vec<SettlementResult>> {
        let (batch, funded) = (batch.to_vec(), funded.to_vec());
        self.0
            .call(move |db| async move { db.ledger.settle_funds_checked_by_caller(&batch, &funded, now).await })
            .await?
    }
}

#[async_trait]
impl Outbox for RemoteLedgerStore {
    async fn unpublished(&self, limit: usize) -> PortResult<Vec<OutboxEvent>> {
        self.0.call(move |db| async move { db.ledger.unpublished(limit).await }).await?
    }

    async fn mark_published(&self, sequences: &[i64]) -> PortResult<()> {
        let sequences = sequences.to_vec();
        self.0.call(move |db| async move { db.ledger.mark_published(&sequences).await }).await?
    }
}

#[async_trait]
impl PaymentStore for RemotePaymentStore {
    async fn insert_with_event(
        &self,
        payment: &Payment,
        event: &PaymentInitiated,
        headers: &[(String, String)],
        idempotency: Option<&IdempotencyCompletion>,
    ) -> PortResult<()> {
        let (payment, event, headers, idempotency) =
            (payment.clone(), event.clone(), headers.to_vec(), idempotency.cloned());
        self.0
            .call(move |db| async move {
                db.payments.insert_with_event(&payment, &event, &headers, idempotency.as_ref()).await
            })
            .await?
    }

    /// The whole batch in one round trip to the database node, as the PostgreSQL store writes it
    /// in one transaction.
    async fn insert_many(&self, batch: &[NewPayment]) -> PortResult<Vec<PortResult<()>>> {
        let batch = batch.to_vec();
        self.0.call(move |db| async move { db.payments.insert_many(&batch).await }).await?
    }

    async fn get(&self, id: PaymentId) -> PortResult<Option<Payment>> {
        self.0.call(move |db| async move { db.payments.get(id).await }).await?
    }

    async fn get_many(&self, ids: &[PaymentId]) -> PortResult<Vec<Option<Payment>>> {
        let ids = ids.to_vec();
        self.0.call(move |db| async move { db.payments.get_many(&ids).await }).await?
    }

    async fn record_transition(
        &self,
        id: PaymentId,
        transition: &Transition,
        failure_reason: Option<&str>,
    ) -> PortResult<()> {
        let (transition, reason) = (transition.clone(), failure_reason.map(str::to_owned));
        self.0
            .call(move |db| async move { db.payments.record_transition(id, &transition, reason.as_deref()).await })
            .await?
    }

    async fn record_transitions(&self, batch: &[TransitionRecord]) -> PortResult<Vec<PortResult<()>>> {
        let batch = batch.to_vec();
        self.0.call(move |db| async move { db.payments.record_transitions(&batch).await }).await?
    }
}

#[async_trait]
impl Outbox for RemotePaymentStore {
    async fn unpublished(&self, limit: usize) -> PortResult<Vec<OutboxEvent>> {
        self.0.call(move |db| async move { db.payments.unpublished(limit).await }).await?
    }

    async fn mark_published(&self, sequences: &[i64]) -> PortResult<()> {
        let sequences = sequences.to_vec();
        self.0.call(move |db| async move { db.payments.mark_published(&sequences).await }).await?
    }
}

#[async_trait]
impl IdempotencyStore for RemotePaymentStore {
    async fn claim(
        &self,
        subject: &Subject,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: OffsetDateTime,
    ) -> PortResult<Option<Record<Vec<u8>>>> {
        let (subject, key) = (subject.clone(), key.clone());
        self.0.call(move |db| async move { db.payments.claim(&subject, &key, fingerprint, now).await }).await?
    }

    async fn lookup(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<Option<Record<Vec<u8>>>> {
        let (subject, key) = (subject.clone(), key.clone());
        self.0.call(move |db| async move { db.payments.lookup(&subject, &key).await }).await?
    }

    async fn complete(&self, subject: &Subject, key: &IdempotencyKey, response: &[u8]) -> PortResult<()> {
        let (subject, key, response) = (subject.clone(), key.clone(), response.to_vec());
        self.0.call(move |db| async move { db.payments.complete(&subject, &key, &response).await }).await?
    }

    async fn release(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<()> {
        let (subject, key) = (subject.clone(), key.clone());
        self.0.call(move |db| async move { db.payments.release(&subject, &key).await }).await?
    }

    async fn purge_before(&self, cutoff: OffsetDateTime) -> PortResult<u64> {
        self.0.call(move |db| async move { db.payments.purge_before(cutoff).await }).await?
    }
}

// ---------------------------------------------------------------------------------------------
// The cache node.

/// What the cache node serves: balances and the idempotency fast path, and its stale-cache switch
/// (held by the harness with the entries, so it outlives node restarts).
#[derive(Debug, Clone, Default)]
pub struct Cache {
    pub balances: MemoryBalanceCache,
    pub idempotency: MemoryIdempotencyStore,
    pub faults: Arc<CacheFaults>,
}

/// Stale-cache fault of the cache node: while on, every balance invalidation is acknowledged but
/// lost, so the cache keeps serving the value it should have dropped until its TTL ends it (lost
/// `DEL`s: a failover to a lagging replica, a client that thinks it invalidated).
#[derive(Debug, Default)]
pub struct CacheFaults {
    lose_invalidations: AtomicBool,
    lost_invalidations: AtomicU64,
}

impl CacheFaults {
    /// While `true`, balance invalidations are acknowledged and not applied.
    pub fn lose_invalidations(&self, on: bool) {
        self.lose_invalidations.store(on, Ordering::SeqCst);
    }

    /// How many invalidation calls were lost so far.
    pub fn lost_invalidations(&self) -> u64 {
        self.lost_invalidations.load(Ordering::SeqCst)
    }

    /// Whether this invalidation is lost (counted if so).
    fn loses_invalidation(&self) -> bool {
        let lost = self.lose_invalidations.load(Ordering::SeqCst);
        if lost {
            self.lost_invalidations.fetch_add(1, Ordering::SeqCst);
        }
        lost
    }
}

/// `BalanceCache` on the cache node.
#[derive(Debug, Clone)]
pub struct RemoteBalanceCache(pub RemoteClient<Cache>);

/// `IdempotencyStore` (fast path) on the cache node.
#[derive(Debug, Clone)]
pub struct RemoteIdempotencyStore(pub RemoteClient<Cache>);

#[async_trait]
impl BalanceCache for RemoteBalanceCache {
    async fn get(&self, id: AccountId) -> PortResult<Option<CachedBalance>> {
        self.0.call(move |c| async move { c.balances.get(id).await }).await?
    }

    async fn put(&self, balance: &CachedBalance, ttl_s: u32) -> PortResult<()> {
        let balance = balance.clone();
        self.0.call(move |c| async move { c.balances.put(&balance, ttl_s).await }).await?
    }

    async fn invalidate(&self, ids: &[AccountId]) -> PortResult<()> {
        let ids = ids.to_vec();
        self.0
            .call(move |c| async move {
                if c.faults.loses_invalidation() { Ok(()) } else { c.balances.invalidate(&ids).await }
            })
            .await?
    }

    /// The settlement's refresh (its invalidation by overwriting): one call to the node, lost like
    /// an invalidation under the `stale_cache` fault.
    async fn put_many(&self, balances: &[CachedBalance], ttl_s: u32) -> PortResult<()> {
        let balances = balances.to_vec();
        self.0
            .call(move |c| async move {
                if c.faults.loses_invalidation() { Ok(()) } else { c.balances.put_many(&balances, ttl_s).await }
            })
            .await?
    }
}

#[async_trait]
impl IdempotencyStore for RemoteIdempotencyStore {
    async fn claim(
        &self,
        subject: &Subject,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: OffsetDateTime,
    ) -> PortResult<Option<Record<Vec<u8>>>> {
        let (subject, key) = (subject.clone(), key.clone());
        self.0.call(move |c| async move { c.idempotency.claim(&subject, &key, fingerprint, now).await }).await?
    }

    async fn lookup(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<Option<Record<Vec<u8>>>> {
        let (subject, key) = (subject.clone(), key.clone());
        self.0.call(move |c| async move { c.idempotency.lookup(&subject, &key).await }).await?
    }

    async fn complete(&self, subject: &Subject, key: &IdempotencyKey, response: &[u8]) -> PortResult<()> {
        let (subject, key, response) = (subject.clone(), key.clone(), response.to_vec());
        self.0.call(move |c| async move { c.idempotency.complete(&subject, &key, &response).await }).await?
    }

    async fn release(&self, subject: &Subject, key: &IdempotencyKey) -> PortResult<()> {
        let (subject, key) = (subject.clone(), key.clone());
        self.0.call(move |c| async move { c.idempotency.release(&subject, &key).await }).await?
    }

    async fn purge_before(&self, cutoff: OffsetDateTime) -> PortResult<u64> {
        self.0.call(move |c| async move { c.idempotency.purge_before(cutoff).await }).await?
    }
}

// ---------------------------------------------------------------------------------------------
// The broker node.

/// Delivery faults of the broker, held by the harness.
#[derive(Debug, Default)]
pub struct BrokerFaults {
    duplicate_per_mille: AtomicU32,
    delay_max_ms: AtomicU64,
    duplicated: AtomicU64,
}

impl BrokerFaults {
    pub fn new() -> Arc<BrokerFaults> {
        Arc::new(BrokerFaults::default())
    }

    /// Each delivered record is delivered twice in a row with this probability (per mille).
    pub fn duplicate(&self, per_mille: u32) {
        self.duplicate_per_mille.store(per_mille.min(1000), Ordering::SeqCst);
    }

    /// Each poll's records are held back a drawn `0..=max` before they are sent.
    pub fn delay(&self, max: Duration) {
        self.delay_max_ms.store(u64::try_from(max.as_millis()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// How many duplicate deliveries were made so far.
    pub fn duplicated(&self) -> u64 {
        self.duplicated.load(Ordering::SeqCst)
    }
}

/// What the broker node serves. Create it INSIDE the broker node's `init` with [`Broker::new`]
/// from the harness's durable [`MemoryEventLog`]: the log (records, committed offsets) survives a
/// broker restart, group membership does not.
#[derive(Clone)]
pub struct Broker {
    log: MemoryEventLog,
    faults: Arc<BrokerFaults>,
    members: Arc<Mutex<Members>>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker").field("members", &self.lock().by_id.len()).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Members {
    by_id: BTreeMap<u64, Member>,
}

struct Member {
    consumer: Arc<tokio::sync::Mutex<MemoryConsumer>>,
    last_seen: Instant,
}

impl Broker {
    /// The broker state of one node lifetime; also starts the session reaper on the current node,
    /// so call it inside the broker node's task (in the `async` block its `init` returns).
    pub fn new(log: MemoryEventLog, faults: Arc<BrokerFaults>) -> Broker {
        let broker = Broker { log, faults, members: Arc::default() };
        let reaper = broker.clone();
        madsim::task::spawn(async move {
            loop {
                sleep(SESSION_TIMEOUT / 4).await;
                let now = Instant::now();
                // Dropping a member's consumer leaves the group: the group rebalances.
                reaper.lock().by_id.retain(|_, m| now.duration_since(m.last_seen) < SESSION_TIMEOUT);
            }
        });
        broker
    }

    /// Serves this broker at `addr` (see [`serve`]).
    pub async fn serve(self, addr: SocketAddr, faults: Arc<ServerFaults>) {
        serve(addr, self, faults).await;
    }

    /// How many consumers are members of some group right now.
    pub fn member_count(&self) -> usize {
        self.lock().by_id.len()
    }

    fn lock(&self) -> MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The member's consumer, joining `group` anew if the broker does not know `member`.
    fn member(
        &self,
        member: Option<u64>,
        group: &str,
        topics: &[String],
    ) -> (u64, Arc<tokio::sync::Mutex<MemoryConsumer>>) {
        let mut members = self.lock();
        if let Some(id) = member
            && let Some(m) = members.by_id.get_mut(&id)
        {
            m.last_seen = Instant::now();
            return (id, Arc::clone(&m.consumer));
        }
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        let consumer = Arc::new(tokio::sync::Mutex::new(self.log.consumer(group, &topics)));
        // Drawn, not counted: ids must not repeat across broker restarts, or a member the broker
        // forgot could be mistaken for a new one.
        let id = loop {
            let id: u64 = thread_rng().r#gen();
            if !members.by_id.contains_key(&id) {
                break id;
            }
        };
        members.by_id.insert(id, Member { consumer: Arc::clone(&consumer), last_seen: Instant::now() });
        (id, consumer)
    }

    async fn poll(
        &self,
        member: Option<u64>,
        group: String,
        topics: Vec<String>,
        max_records: usize,
        wait: Duration,
    ) -> (u64, PortResult<Vec<ConsumedRecord>>) {
        let (id, consumer) = self.member(member, &group, &topics);
        let polled = consumer.lock().await.poll(max_records, wait).await;
        if let Some(m) = self.lock().by_id.get_mut(&id) {
            m.last_seen = Instant::now();
        }
        let Ok(records) = polled else { return (id, polled) };
        let duplicate = self.faults.duplicate_per_mille.load(Ordering::SeqCst);
        let mut delivered = Vec::with_capacity(records.len());
        for record in records {
            if duplicate > 0 && thread_rng().gen_range(0..1000) < duplicate {
                self.faults.duplicated.fetch_add(1, Ordering::SeqCst);
                delivered.push(record.clone());
            }
            delivered.push(record);
        }
        let delay = self.faults.delay_max_ms.load(Ordering::SeqCst);
        if delay > 0 && !delivered.is_empty() {
            sleep(Duration::from_millis(thread_rng().gen_range(0..=delay))).await;
        }
        (id, Ok(delivered))
    }

    /// Leaves the group (a consumer closed cleanly): its partitions move at once.
    fn leave(&self, member: u64) {
        self.lock().by_id.remove(&member);
    }

    /// `None` when the broker does not know `member` (evicted, or the broker restarted): Kafka
    /// refuses such a commit, and the member must poll (rejoin) again.
    async fn commit(&self, member: u64, positions: Vec<TopicPartitionOffset>) -> Option<PortResult<()>> {
        let consumer = {
            let mut members = self.lock();
            let m = members.by_id.get_mut(&member)?;
            m.last_seen = Instant::now();
            Arc::clone(&m.consumer)
        };
        Some(consumer.lock().await.commit(&positions).await)
    }
}

/// `EventLog` (publishing) on the broker node.
#[derive(Debug, Clone)]
pub struct RemoteEventLog(pub RemoteClient<Broker>);

#[async_trait]
impl EventLog for RemoteEventLog {
    async fn publish(&self, records: &[OutgoingRecord]) -> PortResult<()> {
        let records = records.to_vec();
        self.0.call(move |b| async move { b.log.publish(&records).await }).await?
    }
}

/// A member of a consumer group on the broker node. Its membership lives on the broker: dropped,
/// it leaves the group (best effort, like Kafka's `close`); if its node dies (or it stops
/// polling), the broker evicts it after [`SESSION_TIMEOUT`]; if the broker forgot it (restart,
/// eviction), its next poll joins again — from the committed offsets. A poll that fails in
/// transit (timeout, partition, outage) also leaves and rejoins, so records whose delivery was
/// lost on the way are delivered again: at-least-once holds through the network.
#[derive(Debug)]
pub struct RemoteConsumer {
    client: RemoteClient<Broker>,
    group: String,
    topics: Vec<String>,
    member: Option<u64>,
}

impl RemoteConsumer {
    /// A consumer of `topics` in `group`; it joins on its first poll.
    pub fn new(client: RemoteClient<Broker>, group: &str, topics: &[&str]) -> RemoteConsumer {
        RemoteConsumer {
            client,
            group: group.to_owned(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            member: None,
        }
    }
}

#[async_trait]
impl EventConsumer for RemoteConsumer {
    async fn poll(&mut self, max_records: usize, wait: Duration) -> PortResult<Vec<ConsumedRecord>> {
        let (member, group, topics) = (self.member, self.group.clone(), self.topics.clone());
        let bound = wait + self.client.timeout;
        let polled = self
            .client
            .call_with(bound, move |b: Broker, _| async move { b.poll(member, group, topics, max_records, wait).await })
            .await;
        match polled {
            Ok((id, records)) => {
                self.member = Some(id);
                records
            }
            Err(unavailable) => {
                // The broker may have handed out records whose reply never arrived: its fetch
                // position moved past them. Leave and rejoin, so the group resumes from the
                // committed offsets and they are delivered again (a Kafka client re-fetches from
                // its own position instead; both keep at-least-once).
                self.leave();
                Err(unavailable)
            }
        }
    }

    async fn commit(&mut self, positions: &[TopicPartitionOffset]) -> PortResult<()> {
        // Never polled: nothing delivered to this member can be committed.
        let Some(member) = self.member else { return Err(PortError::Unavailable { component: "kafka" }) };
        let positions = positions.to_vec();
        match self.client.call(move |b: Broker| async move { b.commit(member, positions).await }).await? {
            Some(committed) => committed,
            None => {
                self.member = None;
                Err(PortError::Unavailable { component: "kafka" })
            }
        }
    }
}

impl RemoteConsumer {
    /// Leaves the group (best effort) and forgets the membership: the next poll joins anew.
    fn leave(&mut self) {
        let Some(member) = self.member.take() else { return };
        let client = self.client.clone();
        // Fire and forget: on a node being killed the task never runs, and the session timeout
        // ends the membership instead — exactly a crash.
        madsim::task::spawn(async move {
            let _ = client.call(move |b: Broker| async move { b.leave(member) }).await;
        });
    }
}

impl Drop for RemoteConsumer {
    fn drop(&mut self) {
        self.leave();
    }
}
