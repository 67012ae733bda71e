//! The whole platform on the simulated infrastructure (issue 7): the production service libraries
//! on their service nodes, the gateway's backend role, and the workload's clients.
//!
//! Promises:
//! - [`start`] runs, on the nodes of [`Infra`], the code production runs: the payment node serves
//!   `PaymentService` (with `AccountClient` towards the account node) and runs its outbox relay and
//!   `run_outcome_consumer`; the account node serves `AccountGrpc` and runs `run_settlement` and its
//!   relay; the notification node runs `run_consumer`. Every gRPC server is wrapped in the SVID
//!   interceptor and the invariant's audit ([`ServicePorts::audited`]); every client call carries the
//!   node's simulated SVID. Stores, cache and broker are the remote twins of [`crate::remote`].
//! - a node killed and restarted rebuilds its service from the durable stores: everything that lived
//!   in the node (in-flight requests, consumer membership, the breaker, the SVID) is lost.
//! - the gateway node is, for now, only the gateway's *backend role*: a small RPC endpoint
//!   ([`GATEWAY_PORT`]) whose operations call the payment and account services over gRPC from the
//!   gateway node, as `spiffe://…/api-gateway` with the end user in `x-securepay-subject`
//!   (`securepay_kit::with_subject`) — the way the real gateway calls them after it authenticated
//!   the user. The gateway library's HTTP edge (JWT, rate limit, problem+json) is not in the loop yet.
//! - [`run_client`] plays one client's operations of a [`Workload`] from its own node outside the
//!   platform (never faulted): each payment re-sent with the same idempotency key until it gets a
//!   definitive answer or the client's deadline passes (nothing new is started after it),
//!   concurrent copies sent at once, and a
//!   conflicting replay (same key, other amount) after an accepted one. What it saw is recorded in
//!   [`Observed`] for the invariant checks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::rand::{Rng, thread_rng};
use madsim::runtime::{Handle, NodeHandle};
use rust_decimal::Decimal;
use securepay_account::{AccountGrpc, SettlementConfig, Settler, run_settlement};
use securepay_core::idempotency::IdempotencyKey;
use securepay_core::ids::Subject;
use securepay_core::topology::{consumer_group, topic};
use securepay_kit::relay::{RelayConfig, run_relay};
use securepay_kit::status::error_code;
use securepay_kit::with_subject;
use securepay_memory::SeededIds;
use securepay_payment::{AccountClient, AccountClientConfig, ConsumerConfig, PaymentService, ServiceConfig};
use securepay_ports::{EventLog, Ids, Outbox};
use securepay_proto::account::v1::GetBalanceRequest;
use securepay_proto::account::v1::account_service_client::AccountServiceClient;
use securepay_proto::account::v1::account_service_server::AccountServiceServer;
use securepay_proto::payment::v1::payment_service_client::PaymentServiceClient;
use securepay_proto::payment::v1::payment_service_server::PaymentServiceServer;
use securepay_proto::payment::v1::{InitiatePaymentRequest, Money};
use tokio::time::{Instant, sleep};
use tonic::transport::{Channel, Server};
use tonic::{Code, Request};

use crate::infra::{Infra, ServicePorts, addr, ip};
use crate::plan::Node;
use crate::remote::{RemoteClient, ServerFaults, serve};
use crate::spire::ClientInterceptor;
use crate::workload::{Op, Pay, Workload};

/// The port of the gateway node's backend-role endpoint (see the module docs).
pub const GATEWAY_PORT: u16 = 7000;
/// What the gateway gives one backend call (its request budget is 10 s; backends get a little less).
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(9);
/// What a client waits for one answer from the gateway before it retries.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway backend role's endpoint.
pub fn gateway_addr() -> SocketAddr {
    SocketAddr::new(ip(Node::Gateway), GATEWAY_PORT)
}

/// The address of workload client `index` (10.3.0.x: outside the platform, never faulted).
pub fn client_ip(index: usize) -> IpAddr {
    let host = u8::try_from(index + 1).expect("fewer than 255 clients");
    IpAddr::V4(Ipv4Addr::new(10, 3, 0, host))
}

/// Opens the workload's accounts in the database (the only way money enters, as the seed does).
pub fn open_accounts(infra: &Infra, workload: &Workload) {
    for account in &workload.accounts {
        infra
            .database
            .ledger
            .open(account.id, account.owner.clone(), account.currency, account.opening)
            .expect("workload account ids are unique");
    }
}

/// Starts the payment, account, notification and gateway nodes on `infra` (see the module docs).
pub fn start(infra: &mut Infra) -> BTreeMap<Node, NodeHandle> {
    let mut nodes = BTreeMap::new();
    nodes.insert(Node::Payment, infra.start_service(Node::Payment, payment_node));
    nodes.insert(Node::Account, infra.start_service(Node::Account, account_node));
    nodes.insert(Node::Notification, infra.start_service(Node::Notification, notification_node));
    nodes.insert(Node::Gateway, infra.start_service(Node::Gateway, gateway_node));
    nodes
}

/// The payment service: gRPC payment.v1, its outbox relay, its outcome consumer.
async fn payment_node(ports: ServicePorts) {
    let ids: Arc<dyn Ids> = Arc::new(SeededIds);
    let store = Arc::new(ports.payments.clone());
    let accounts = Arc::new(AccountClient::with_interceptor(
        ports.channel(Node::Account),
        ports.client_interceptor(),
        AccountClientConfig::default(),
        Arc::clone(&ids),
    ));
    let service = PaymentService::new(
        Arc::clone(&store),
        Arc::new(ports.idempotency_fast.clone()),
        accounts,
        Arc::clone(&ports.clock),
        ids,
        ServiceConfig::default(),
    );
    let events: Arc<dyn EventLog> = Arc::new(ports.events.clone());
    let outbox: Arc<dyn Outbox> = store.clone();
    madsim::task::spawn(run_relay(outbox, events, RelayConfig::new("payment"), std::future::pending()));
    let consumer = ports.consumer(consumer_group::PAYMENT_SERVICE, &[topic::PAYMENT_COMPLETED, topic::PAYMENT_FAILED]);
    let clock = Arc::clone(&ports.clock);
    madsim::task::spawn(securepay_payment::run_outcome_consumer(
        store,
        consumer,
        clock,
        ConsumerConfig::default(),
        std::future::pending(),
    ));
    Server::builder()
        .add_service(ports.audited(PaymentServiceServer::with_interceptor(service, ports.server_interceptor())))
        .serve(addr(Node::Payment))
        .await
        .expect("the payment node serves gRPC");
}

/// The account service: gRPC account.v1, settlement, its outbox relay.
async fn account_node(ports: ServicePorts) {
    let ledger = Arc::new(ports.ledger.clone());
    let cache = Arc::new(ports.balances.clone());
    let grpc = AccountGrpc::new(Arc::clone(&ledger), Arc::clone(&cache), Arc::clone(&ports.clock));
    let events: Arc<dyn EventLog> = Arc::new(ports.events.clone());
    let outbox: Arc<dyn Outbox> = ledger.clone();
    madsim::task::spawn(run_relay(outbox, Arc::clone(&events), RelayConfig::new("account"), std::future::pending()));
    let settler = Settler {
        ledger,
        cache,
        dlq: events,
        ids: Arc::new(SeededIds),
        clock: Arc::clone(&ports.clock),
        config: SettlementConfig::production(),
    };
    let consumer_ports = ports.clone();
    madsim::task::spawn(async move {
        let join = || Ok(consumer_ports.consumer(consumer_group::ACCOUNT_SERVICE, &[topic::PAYMENT_INITIATED]));
        run_settlement(&settler, join, std::future::pending()).await;
    });
    Server::builder()
        .add_service(ports.audited(AccountServiceServer::with_interceptor(grpc, ports.server_interceptor())))
        .serve(addr(Node::Account))
        .await
        .expect("the account node serves gRPC");
}

/// The notification service: its consumer (the HTTP read side is real-mode only).
async fn notification_node(ports: ServicePorts) {
    let config = securepay_notification::ConsumerConfig::default();
    let mut consumer = ports.consumer(&config.group, &config.topics.all());
    // The sender lives as long as the node: the loop stops only when the node dies.
    let (_keep, shutdown) = tokio::sync::watch::channel(false);
    securepay_notification::run_consumer(&ports.notifications, &mut consumer, ports.clock.as_ref(), &config, shutdown)
        .await;
}

/// The gateway's backend role (see the module docs): answers the clients' calls from the gateway node.
async fn gateway_node(ports: ServicePorts) {
    let gateway = Gateway {
        payments: PaymentServiceClient::with_interceptor(ports.channel(Node::Payment), ports.client_interceptor()),
        accounts: AccountServiceClient::with_interceptor(ports.channel(Node::Account), ports.client_interceptor()),
    };
    serve(gateway_addr(), gateway, ServerFaults::new()).await;
}

/// How a backend call ended, as the gateway reports it to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    /// The stable error code (`x-securepay-error-code`), if the service sent one.
    pub error_code: Option<String>,
}

impl Refusal {
    fn of(status: &tonic::Status) -> Refusal {
        Refusal { code: status.code(), error_code: error_code(status).map(str::to_owned) }
    }

    fn timeout() -> Refusal {
        Refusal { code: Code::DeadlineExceeded, error_code: Some("gateway_timeout".into()) }
    }

    /// Whether a client should send the same request again: the platform did not decide (a
    /// dependency down, a timeout, the same key still in flight, or the gateway's own SVID refused
    /// while it cannot renew it).
    pub fn retryable(&self) -> bool {
        matches!(
            self.code,
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::Cancelled
                | Code::Internal
                | Code::Unknown
                | Code::Unauthenticated
        )
    }

    /// A short label for the summary: the stable code, else the gRPC code.
    pub fn label(&self) -> String {
        self.error_code.clone().unwrap_or_else(|| format!("{:?}", self.code))
    }
}

/// The gateway node's gRPC clients (each call runs on the gateway node, with its SVID).
#[derive(Clone)]
pub struct Gateway {
    payments: PaymentServiceClient<Channel, ClientInterceptor>,
    accounts: AccountServiceClient<Channel, ClientInterceptor>,
}

impl Gateway {
    /// `POST /payments` as the gateway forwards it: the accepted payment's id.
    async fn initiate(&self, subject: Subject, message: InitiatePaymentRequest) -> Result<String, Refusal> {
        let mut request = Request::new(message);
        with_subject(&mut request, &subject);
        let mut client = self.payments.clone();
        match tokio::time::timeout(BACKEND_TIMEOUT, client.initiate_payment(request)).await {
            Err(_) => Err(Refusal::timeout()),
            Ok(Err(status)) => Err(Refusal::of(&status)),
            Ok(Ok(response)) => response
                .into_inner()
                .payment
                .map(|p| p.payment_id)
                .ok_or(Refusal { code: Code::Internal, error_code: None }),
        }
    }

    /// `GET /accounts/{id}/balance` as the gateway forwards it: the balance as a decimal string.
    async fn balance(&self, subject: Subject, account_id: String) -> Result<String, Refusal> {
        let mut request = Request::new(GetBalanceRequest { account_id });
        with_subject(&mut request, &subject);
        let mut client = self.accounts.clone();
        match tokio::time::timeout(BACKEND_TIMEOUT, client.get_balance(request)).await {
            Err(_) => Err(Refusal::timeout()),
            Ok(Err(status)) => Err(Refusal::of(&status)),
            Ok(Ok(response)) => Ok(response.into_inner().balance),
        }
    }
}

/// What the clients saw: the evidence the idempotency checks use.
#[derive(Debug, Default)]
pub struct Observed {
    /// Per (subject, key): every payment id an accepted answer named (must be one).
    pub accepted: BTreeMap<(Subject, IdempotencyKey), BTreeSet<String>>,
    /// Conflicting replays (same key, other amount) that were accepted: must stay empty.
    pub conflicting_accepted: Vec<(Subject, IdempotencyKey, String)>,
    /// Definitive refusals by label.
    pub refused: BTreeMap<String, u64>,
    /// Requests sent (every copy and retry).
    pub sent: u64,
    /// Requests that never got a definitive answer before the client's deadline.
    pub gave_up: u64,
    /// Operations not started because their client's deadline had passed.
    pub not_sent: u64,
    /// Balance reads answered; balances read that were negative (must stay empty).
    pub balance_reads: u64,
    pub negative_balances_read: Vec<String>,
}

/// The shared record of every client.
pub type SharedObserved = Arc<Mutex<Observed>>;

fn observe(observed: &SharedObserved, f: impl FnOnce(&mut Observed)) {
    f(&mut observed.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Starts client `index` on its own node: it plays `ops`, pausing a random time up to `pace`
/// before each, re-sends until `deadline` and starts nothing after it. Returns when it is done.
pub async fn run_client(index: usize, ops: Vec<Op>, pace: Duration, deadline: Instant, observed: SharedObserved) {
    let node = Handle::current().create_node().name(format!("client-{index}")).ip(client_ip(index)).build();
    let task = node.spawn(async move {
        let gateway: RemoteClient<Gateway> =
            RemoteClient::connect(gateway_addr(), "gateway").await.with_timeout(CLIENT_TIMEOUT);
        let total = ops.len();
        for (done, op) in ops.into_iter().enumerate() {
            let pause = pace.mul_f64(thread_rng().gen_range(0.0..1.0));
            sleep(pause).await;
            if Instant::now() >= deadline {
                // A client that fell behind (long retries) stops: nothing new after its deadline.
                observe(&observed, |o| o.not_sent += (total - done) as u64);
                break;
            }
            match op {
                Op::Pay(pay) => pay_op(&gateway, pay, deadline, &observed).await,
                Op::ReadBalance { subject, account } => {
                    let account = account.to_string();
                    let answer = gateway.call(move |gw: Gateway| async move { gw.balance(subject, account).await });
                    if let Ok(Ok(balance)) = answer.await {
                        observe(&observed, |o| {
                            o.balance_reads += 1;
                            if balance.parse::<Decimal>().map_or(true, |b| b < Decimal::ZERO) {
                                o.negative_balances_read.push(balance);
                            }
                        });
                    }
                }
            }
        }
    });
    task.await.expect("a client node is never killed");
}

fn wire_request(pay: &Pay, amount: Decimal) -> InitiatePaymentRequest {
    InitiatePaymentRequest {
        payment_id: String::new(),
        from_account: pay.from.to_string(),
        to_account: pay.to.to_string(),
        amount: Some(Money { amount: amount.to_string(), currency: pay.amount.currency().code().to_owned() }),
        idempotency_key: pay.key.as_str().to_owned(),
    }
}

/// One payment: its concurrent copies at once, each re-sent until answered; then the conflicting
/// replay if the payment was accepted and the workload asks for one.
async fn pay_op(gateway: &RemoteClient<Gateway>, pay: Pay, deadline: Instant, observed: &SharedObserved) {
    let request = wire_request(&pay, pay.amount.value());
    let copies: Vec<_> = (0..pay.concurrent_copies)
        .map(|_| {
            let (gateway, subject, request) = (gateway.clone(), pay.subject.clone(), request.clone());
            let observed = Arc::clone(observed);
            madsim::task::spawn(
                async move { send_until_answered(&gateway, subject, request, deadline, &observed).await },
            )
        })
        .collect();
    let mut accepted = false;
    for copy in copies {
        if let Some(Ok(payment_id)) = copy.await.expect("a client task does not panic") {
            accepted = true;
            observe(observed, |o| {
                o.accepted.entry((pay.subject.clone(), pay.key.clone())).or_default().insert(payment_id);
            });
        }
    }
    if accepted && pay.replay_conflicting {
        let other = pay.amount.value() + Decimal::new(1, pay.amount.currency().minor_units());
        let request = wire_request(&pay, other);
        if let Some(Ok(payment_id)) =
            send_until_answered(gateway, pay.subject.clone(), request, deadline, observed).await
        {
            observe(observed, |o| o.conflicting_accepted.push((pay.subject.clone(), pay.key.clone(), payment_id)));
        }
    }
}

/// Sends `request` until the platform decides (accepted or a definitive refusal) or `deadline`
/// passes (`None`).
async fn send_until_answered(
    gateway: &RemoteClient<Gateway>,
    subject: Subject,
    request: InitiatePaymentRequest,
    deadline: Instant,
    observed: &SharedObserved,
) -> Option<Result<String, Refusal>> {
    let mut pause = Duration::from_millis(100);
    loop {
        let (subject, message) = (subject.clone(), request.clone());
        observe(observed, |o| o.sent += 1);
        let answer = gateway.call(move |gw: Gateway| async move { gw.initiate(subject, message).await }).await;
        match answer {
            Ok(Ok(id)) => return Some(Ok(id)),
            Ok(Err(refusal)) if !refusal.retryable() => {
                observe(observed, |o| *o.refused.entry(refusal.label()).or_default() += 1);
                return Some(Err(refusal));
            }
            // The gateway unreachable, or the platform did not decide: the same request again.
            Ok(Err(_)) | Err(_) => {}
        }
        if Instant::now() >= deadline {
            observe(observed, |o| o.gave_up += 1);
            return None;
        }
        sleep(pause.mul_f64(thread_rng().gen_range(0.5..1.0))).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}
