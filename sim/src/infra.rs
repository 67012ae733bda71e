//! The simulated platform's infrastructure, ready for service nodes: where every node lives, the
//! infrastructure nodes themselves ([`Infra::start`]), what a service node connects to
//! ([`ServicePorts::connect`]) and the [`Injector`] that plays a fault plan's [`Schedule`] onto
//! all of it.
//!
//! Promises:
//! - fixed addresses per [`Node`] ([`ip`], [`addr`]), so a replayed seed builds the same cluster;
//! - the durable state (database tables, broker log and committed offsets, cache entries) is
//!   created here, outside the nodes, and survives their kills; node-local state (consumer-group
//!   membership, in-flight calls, the SVID a node holds) does not;
//! - the SPIRE issuer registers each service's address as that service's SPIFFE ID, with the
//!   plan's SVID TTL; its key is drawn from the seed;
//! - [`Injector::run`] applies every event of a schedule at its time and returns with every fault
//!   healed; [`Injector::heal_all`] heals anything left on (for the liveness phase).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle};
use madsim::task::NodeId;
use securepay_core::identity::ServiceIdentity;
use securepay_core::topology::consumer_group as group;
use securepay_memory::MemoryEventLog;
use securepay_ports::Clock;
use tokio::time::{Instant, sleep_until};

use crate::clock::SkewedClock;
use crate::plan::{Action, Event, Fault, Node, Plan, Schedule};
use crate::planted::PlantedBug;
use crate::remote::{
    BROKER_PORT, Broker, BrokerFaults, CACHE_PORT, Cache, DATABASE_PORT, Database, RemoteBalanceCache, RemoteClient,
    RemoteConsumer, RemoteEventLog, RemoteIdempotencyStore, RemoteLedgerStore, RemoteNotificationStore,
    RemotePaymentStore, ServerFaults, serve,
};
use crate::spire::{
    Audited, ClientInterceptor, ISSUER_PORT, Issuer, IssuerKey, ServerInterceptor, SimSvidSource, SvidAudit,
};

/// The port every service serves gRPC on.
pub const GRPC_PORT: u16 = 50_051;

/// The consumer groups of the platform (what [`Infra::groups`] starts with).
pub const GROUPS: [&str; 3] = [group::ACCOUNT_SERVICE, group::NOTIFICATION_SERVICE, group::PAYMENT_SERVICE];

/// The address of a node: services on 10.1.0.x, infrastructure on 10.2.0.x.
pub fn ip(node: Node) -> IpAddr {
    let (net, host) = match node {
        Node::Gateway => (1, 1),
        Node::Payment => (1, 2),
        Node::Account => (1, 3),
        Node::Notification => (1, 4),
        Node::Database => (2, 1),
        Node::Broker => (2, 2),
        Node::Cache => (2, 3),
        Node::Spire => (2, 4),
    };
    IpAddr::V4(Ipv4Addr::new(10, net, 0, host))
}

/// The address a node serves at: its gRPC port for services, its infrastructure port otherwise.
pub fn addr(node: Node) -> SocketAddr {
    let port = match node {
        Node::Gateway | Node::Payment | Node::Account | Node::Notification => GRPC_PORT,
        Node::Database => DATABASE_PORT,
        Node::Broker => BROKER_PORT,
        Node::Cache => CACHE_PORT,
        Node::Spire => ISSUER_PORT,
    };
    SocketAddr::new(ip(node), port)
}

/// Where the gateway's HTTP edge listens (see [`crate::http`]).
pub fn http_addr() -> SocketAddr {
    SocketAddr::new(ip(Node::Gateway), crate::http::HTTP_PORT)
}

/// The workload a service node runs as.
pub fn identity(node: Node) -> Option<ServiceIdentity> {
    match node {
        Node::Gateway => Some(ServiceIdentity::ApiGateway),
        Node::Payment => Some(ServiceIdentity::PaymentService),
        Node::Account => Some(ServiceIdentity::AccountService),
        Node::Notification => Some(ServiceIdentity::NotificationService),
        _ => None,
    }
}

/// The infrastructure of one run: its nodes, durable state and fault switches.
pub struct Infra {
    pub database: Database,
    pub cache: Cache,
    pub log: MemoryEventLog,
    pub database_faults: Arc<ServerFaults>,
    pub cache_faults: Arc<ServerFaults>,
    pub broker_server_faults: Arc<ServerFaults>,
    pub broker_faults: Arc<BrokerFaults>,
    pub issuer_key: IssuerKey,
    /// One clock per service node (set by `clock_skew`).
    pub clocks: BTreeMap<Node, SkewedClock>,
    /// The groups a `rebalance` without a named group hits: the platform's, plus any a test adds.
    pub groups: Vec<String>,
    /// The PLANTED BUG of this run (`None` by default); set it before starting the service nodes
    /// ([`Infra::start_service`] switches it on where it lives):
    /// - [`PlantedBug::TrustExpiredSvid`]: their server interceptors trust expired SVIDs (see
    ///   [`ServerInterceptor::trust_expired_svid`]);
    /// - [`PlantedBug::SkipSettlementDedupe`]: the database's ledger skips the replay check
    ///   (`MemoryLedgerStore::plant_skip_dedupe`);
    /// - [`PlantedBug::FreshKeyUnchecked`]: the database's payment store writes a key's record
    ///   without looking for an existing one (`MemoryPaymentStore::plant_fresh_key_unchecked`);
    /// - [`PlantedBug::CommitOffsetBeforeDbCommit`], [`PlantedBug::CacheDecidedDebit`]: the account
    ///   node's settlement (`crate::planted::plant_settlement`, from [`ServicePorts::planted`]).
    pub planted: Option<PlantedBug>,
    /// What every [`ServicePorts::audited`] server saw: the SVID invariant's evidence.
    pub svid_audit: Arc<SvidAudit>,
    nodes: BTreeMap<Node, NodeHandle>,
}

impl std::fmt::Debug for Infra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Infra").field("nodes", &self.nodes.keys().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

impl Infra {
    /// Starts the database, cache, broker and SPIRE nodes (`plan` gives the SVID TTL).
    pub fn start(plan: &Plan) -> Infra {
        let handle = Handle::current();
        let infra_node = |node: Node| handle.create_node().name(node.name()).ip(ip(node));
        let database = Database::default();
        let cache = Cache::default();
        let log = MemoryEventLog::new();
        let (database_faults, cache_faults, broker_server_faults) =
            (ServerFaults::new(), ServerFaults::new(), ServerFaults::new());
        let broker_faults = BrokerFaults::new();
        let issuer_key = IssuerKey::from_seed();
        let mut nodes = BTreeMap::new();

        let (state, faults) = (database.clone(), Arc::clone(&database_faults));
        let node = infra_node(Node::Database)
            .init(move || serve(addr(Node::Database), state.clone(), Arc::clone(&faults)))
            .build();
        nodes.insert(Node::Database, node);

        let (state, faults) = (cache.clone(), Arc::clone(&cache_faults));
        let node =
            infra_node(Node::Cache).init(move || serve(addr(Node::Cache), state.clone(), Arc::clone(&faults))).build();
        nodes.insert(Node::Cache, node);

        let (state, server, faults) = (log.clone(), Arc::clone(&broker_server_faults), Arc::clone(&broker_faults));
        let node = infra_node(Node::Broker)
            .init(move || {
                let (log, server, faults) = (state.clone(), Arc::clone(&server), Arc::clone(&faults));
                // Membership is node state: a new `Broker` per node lifetime, over the durable log.
                async move { Broker::new(log, faults).serve(addr(Node::Broker), server).await }
            })
            .build();
        nodes.insert(Node::Broker, node);

        let entries = Node::SERVICES.iter().filter_map(|&n| Some((ip(n), identity(n)?))).collect();
        let issuer = Issuer::new(issuer_key.clone(), plan.svid_ttl(), entries);
        let node =
            infra_node(Node::Spire).init(move || issuer.clone().serve(addr(Node::Spire), ServerFaults::new())).build();
        nodes.insert(Node::Spire, node);

        let clocks = Node::SERVICES.iter().map(|&n| (n, SkewedClock::new())).collect();
        Infra {
            database,
            cache,
            log,
            database_faults,
            cache_faults,
            broker_server_faults,
            broker_faults,
            issuer_key,
            clocks,
            groups: GROUPS.iter().map(|g| (*g).to_owned()).collect(),
            planted: None,
            svid_audit: SvidAudit::new(),
            nodes,
        }
    }

    /// Starts a service node at its address: on every (re)start it connects [`ServicePorts`] (with
    /// the node's clock and the issuer's bundle) and runs `service` with them until the node dies.
    /// The node is known to the injector.
    pub fn start_service<F, Fut>(&mut self, node: Node, service: F) -> NodeHandle
    where
        F: Fn(ServicePorts) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.database.ledger.plant_skip_dedupe(self.planted == Some(PlantedBug::SkipSettlementDedupe));
        self.database.payments.plant_fresh_key_unchecked(self.planted == Some(PlantedBug::FreshKeyUnchecked));
        let planted = self.planted;
        let service = Arc::new(service);
        let clock = self.clock(node);
        let security = NodeSecurity {
            bundle: self.issuer_key.clone(),
            trust_expired_svid: self.planted == Some(PlantedBug::TrustExpiredSvid),
            audit: Arc::clone(&self.svid_audit),
        };
        let handle = Handle::current()
            .create_node()
            .name(node.name())
            .ip(ip(node))
            .init(move || {
                let (service, clock, security) = (Arc::clone(&service), clock.clone(), security.clone());
                async move {
                    let mut ports = ServicePorts::connect(clock, security).await;
                    ports.planted = planted;
                    service(ports).await
                }
            })
            .build();
        self.add_service(node, handle.clone());
        handle
    }

    /// Makes a service node known to the fault injector (kills, partitions).
    pub fn add_service(&mut self, node: Node, handle: NodeHandle) {
        assert!(node.is_service(), "{node} is not a service");
        self.nodes.insert(node, handle);
    }

    /// The madsim id of a started node.
    pub fn node_id(&self, node: Node) -> Option<NodeId> {
        self.nodes.get(&node).map(NodeHandle::id)
    }

    /// The clock a service node must use (shared with the injector).
    pub fn clock(&self, node: Node) -> SkewedClock {
        self.clocks.get(&node).cloned().unwrap_or_default()
    }
}

/// Everything a service node talks to, connected from inside that node (call in its `init`).
#[derive(Clone)]
pub struct ServicePorts {
    pub ledger: RemoteLedgerStore,
    pub payments: RemotePaymentStore,
    pub notifications: RemoteNotificationStore,
    pub balances: RemoteBalanceCache,
    pub idempotency_fast: RemoteIdempotencyStore,
    pub events: RemoteEventLog,
    broker: RemoteClient<Broker>,
    pub svid: SimSvidSource,
    pub clock: Arc<dyn Clock>,
    /// The run's planted bug ([`Infra::planted`]), for the service code that plants it.
    pub planted: Option<PlantedBug>,
    security: NodeSecurity,
}

/// How a service node's gRPC servers authenticate callers.
#[derive(Debug, Clone)]
pub struct NodeSecurity {
    /// The issuer's trust bundle.
    pub bundle: IssuerKey,
    /// [`PlantedBug::TrustExpiredSvid`] planted (see [`Infra::planted`]).
    pub trust_expired_svid: bool,
    pub audit: Arc<SvidAudit>,
}

impl std::fmt::Debug for ServicePorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicePorts").field("svid", &self.svid).finish_non_exhaustive()
    }
}

impl ServicePorts {
    /// Connects the current node to the infrastructure and starts its SVID renewal; `security`
    /// says how its gRPC servers authenticate callers.
    pub async fn connect(clock: SkewedClock, security: NodeSecurity) -> ServicePorts {
        let db: RemoteClient<Database> = RemoteClient::connect(addr(Node::Database), "postgresql").await;
        let cache: RemoteClient<Cache> = RemoteClient::connect(addr(Node::Cache), "redis").await;
        let broker: RemoteClient<Broker> = RemoteClient::connect(addr(Node::Broker), "kafka").await;
        let clock: Arc<dyn Clock> = Arc::new(clock);
        ServicePorts {
            ledger: RemoteLedgerStore(db.clone()),
            payments: RemotePaymentStore(db.clone()),
            notifications: RemoteNotificationStore(db),
            balances: RemoteBalanceCache(cache.clone()),
            idempotency_fast: RemoteIdempotencyStore(cache),
            events: RemoteEventLog(broker.clone()),
            broker,
            svid: SimSvidSource::start(addr(Node::Spire), Arc::clone(&clock)).await,
            clock,
            planted: None,
            security,
        }
    }

    /// For this node's gRPC servers: `XServer::with_interceptor(service, ports.server_interceptor())`,
    /// then handlers call `securepay_kit::authorize`.
    pub fn server_interceptor(&self) -> ServerInterceptor {
        ServerInterceptor::new(self.security.bundle.clone()).trust_expired_svid(self.security.trust_expired_svid)
    }

    /// Wraps a generated server (with its interceptor) in the SVID invariant's observer:
    /// `add_service(ports.audited(XServer::with_interceptor(svc, ports.server_interceptor())))`.
    pub fn audited<S>(&self, server: S) -> Audited<S> {
        Audited::new(server, self.security.bundle.clone(), Arc::clone(&self.clock), Arc::clone(&self.security.audit))
    }

    /// For this node's gRPC clients: `XClient::with_interceptor(channel, ports.client_interceptor())`
    /// attaches the node's current SVID.
    pub fn client_interceptor(&self) -> ClientInterceptor {
        ClientInterceptor::new(self.svid.cell())
    }

    /// A lazily connecting channel to a service's gRPC port. Calls through it need a timeout:
    /// simulated TCP waits out a partition instead of failing.
    pub fn channel(&self, to: Node) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", addr(to)))
            .expect("a node address is a valid URI")
            .connect_lazy()
    }

    /// A new member of `group` subscribed to `topics` (joins on its first poll).
    pub fn consumer(&self, group: &str, topics: &[&str]) -> RemoteConsumer {
        RemoteConsumer::new(self.broker.clone(), group, topics)
    }
}

/// What an injection did (for the run's report line).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Injected {
    pub events: usize,
    /// Events per fault kind.
    pub by_kind: BTreeMap<&'static str, usize>,
}

/// Applies fault events to the cluster.
pub struct Injector<'a> {
    infra: &'a Infra,
    net: Arc<NetSim>,
    /// Nodes this injector killed and has not restarted yet.
    killed: Mutex<BTreeSet<Node>>,
}

impl std::fmt::Debug for Injector<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector").finish_non_exhaustive()
    }
}

impl<'a> Injector<'a> {
    pub fn new(infra: &'a Infra) -> Injector<'a> {
        Injector { infra, net: NetSim::current(), killed: Mutex::default() }
    }

    /// Plays `schedule` from now (its time 0) to the end of its safety phase, then heals all.
    pub async fn run(&self, schedule: &Schedule) -> Injected {
        let start = Instant::now();
        let mut injected = Injected::default();
        for event in &schedule.events {
            sleep_until(start + event.at).await;
            self.apply(event);
            injected.events += 1;
            *injected.by_kind.entry(kind(&event.fault)).or_default() += 1;
        }
        sleep_until(start + schedule.safety).await;
        self.heal_all();
        injected
    }

    /// Applies one event now.
    pub fn apply(&self, event: &Event) {
        let on = event.action != Action::Stop;
        match &event.fault {
            Fault::Partition { a, b } => {
                if let (Some(a), Some(b)) = (self.infra.node_id(*a), self.infra.node_id(*b)) {
                    for (src, dst) in [(a, b), (b, a)] {
                        if on { self.net.clog_link(src, dst) } else { self.net.unclog_link(src, dst) }
                    }
                }
            }
            Fault::Kill { node } => {
                if let Some(id) = self.infra.node_id(*node) {
                    let handle = Handle::current();
                    let mut killed = self.killed.lock().unwrap_or_else(|p| p.into_inner());
                    if on {
                        handle.kill(id);
                        killed.insert(*node);
                    } else if killed.remove(node) {
                        handle.restart(id);
                    }
                }
            }
            Fault::BrokerOutage => self.infra.broker_server_faults.set_down(on),
            Fault::DatabaseOutage => self.infra.database_faults.set_down(on),
            Fault::CacheOutage => self.infra.cache_faults.set_down(on),
            Fault::StaleCache => self.infra.cache.faults.lose_invalidations(on),
            Fault::DuplicateDeliveries { probability } => {
                // Per mille: the probability is validated to [0, 1].
                let per_mille = if on { (probability * 1000.0).round() as u32 } else { 0 };
                self.infra.broker_faults.duplicate(per_mille);
            }
            Fault::Delay { max } => self.infra.broker_faults.delay(if on { *max } else { Duration::ZERO }),
            Fault::Rebalance { group } => match group {
                Some(group) => self.infra.log.rebalance(group),
                None => self.infra.groups.iter().for_each(|g| self.infra.log.rebalance(g)),
            },
            Fault::ClockSkew { node, offset_ms } => {
                if let Some(clock) = self.infra.clocks.get(node) {
                    clock.set_offset_ms(if on { *offset_ms } else { 0 });
                }
            }
            Fault::SvidIssuerOutage => {
                if let Some(id) = self.infra.node_id(Node::Spire) {
                    if on { self.net.clog_node(id) } else { self.net.unclog_node(id) }
                }
            }
        }
    }

    /// Heals everything: links, nodes (a killed node is restarted), switches, clocks.
    pub fn heal_all(&self) {
        let ids: Vec<NodeId> = Node::ALL.iter().filter_map(|&n| self.infra.node_id(n)).collect();
        for &a in &ids {
            self.net.unclog_node(a);
            for &b in &ids {
                self.net.unclog_link(a, b);
            }
        }
        let killed = std::mem::take(&mut *self.killed.lock().unwrap_or_else(|p| p.into_inner()));
        for node in killed {
            if let Some(id) = self.infra.node_id(node) {
                Handle::current().restart(id);
            }
        }
        for faults in [&self.infra.database_faults, &self.infra.cache_faults, &self.infra.broker_server_faults] {
            faults.set_down(false);
        }
        self.infra.cache.faults.lose_invalidations(false);
        self.infra.broker_faults.duplicate(0);
        self.infra.broker_faults.delay(Duration::ZERO);
        for clock in self.infra.clocks.values() {
            clock.set_offset_ms(0);
        }
    }
}

fn kind(fault: &Fault) -> &'static str {
    match fault {
        Fault::Partition { .. } => "partition",
        Fault::Kill { .. } => "kill",
        Fault::BrokerOutage => "broker_outage",
        Fault::DatabaseOutage => "database_outage",
        Fault::CacheOutage => "cache_outage",
        Fault::StaleCache => "stale_cache",
        Fault::DuplicateDeliveries { .. } => "duplicate_deliveries",
        Fault::Delay { .. } => "delay",
        Fault::Rebalance { .. } => "rebalance",
        Fault::ClockSkew { .. } => "clock_skew",
        Fault::SvidIssuerOutage => "svid_issuer_outage",
    }
}
