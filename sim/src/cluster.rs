//! The whole platform on the simulated infrastructure (issue 7): the production service libraries
//! on their service nodes, the gateway's HTTP edge on its node, and the workload's clients.
//!
//! Promises:
//! - [`start`] runs, on the nodes of [`Infra`], the code production runs: the payment node serves
//!   `PaymentService` (with `AccountClient` towards the account node) and runs its outbox relay and
//!   `run_outcome_consumer`; the account node serves `AccountGrpc` and runs `run_settlement` and its
//!   relay; the notification node runs `run_consumer` and serves `NotificationGrpc`. Every gRPC server is wrapped in the SVID
//!   interceptor and the invariant's audit ([`ServicePorts::audited`]); every client call carries the
//!   node's simulated SVID. Stores, cache and broker are the remote twins of [`crate::remote`].
//! - a node killed and restarted rebuilds its service from the durable stores: everything that lived
//!   in the node (in-flight requests, consumer membership, the breaker, the SVID) is lost.
//! - the gateway node runs the production gateway: `securepay_gateway::router` (JWT against the
//!   [`DevIssuer`]'s JWKS, per-IP and per-subject rate limits, strict JSON, problem+json, the one
//!   gRPC → HTTP mapping) served over the simulated network at [`http_addr`] ([`crate::http`]),
//!   its backends the payment and account nodes over gRPC with the gateway node's SVID.
//! - [`run_client`] plays one client's operations of a [`Workload`] from its own node outside the
//!   platform (never faulted) as HTTP requests to the gateway with a bearer token per subject: each
//!   payment re-sent with the same idempotency key until it gets a definitive answer or the
//!   client's deadline passes (nothing new is started after it; a 429 waits its `Retry-After`),
//!   concurrent copies sent at once, and a conflicting replay (same key, other amount) after an
//!   accepted one; in between, a few [`crate::edge::Hostile`] probes, each of which must get its
//!   documented 4xx. What it saw is recorded in [`Observed`] for the invariant checks.
//! - reads: a seeded share ([`READ_BACK_SHARE`]) of accepted payments is read back by its payer
//!   (`GET /api/v1/payments/{id}`) at once, and some of those ([`READ_AGAIN_SHARE`]) again later;
//!   every status read is recorded per payment id. With the same share the payer also reads a
//!   payment another subject was told was accepted, which must be refused `403 forbidden` (the
//!   payment service's owner check; the OpenAPI lists 403 `forbidden` for the route).
//! - a `401` to a token the client minted valid (only a gateway whose clock is skewed past the
//!   leeway sends one) is what a real client does with it: mint a fresh token and send again, at
//!   most [`VALID_TOKEN_RETRIES`] times per request; after that a payment counts as refused
//!   (`unauthorized`), a read as given up. Hostile probes that expect another answer than 401
//!   treat such a 401 the same way (retried until the deadline, never recorded as unexpected).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{Request, StatusCode};
use madsim::rand::{Rng, thread_rng};
use madsim::runtime::{Handle, NodeHandle};
use rust_decimal::Decimal;
use securepay_account::{AccountGrpc, SettlementConfig, Settler, run_settlement};
use securepay_core::idempotency::IdempotencyKey;
use securepay_core::ids::Subject;
use securepay_core::topology::{consumer_group, topic};
use securepay_gateway::backends::CallInterceptor;
use securepay_gateway::{AppState, Backends};
use securepay_kit::relay::{RelayConfig, run_relay};
use securepay_memory::SeededIds;
use securepay_payment::{AccountClient, AccountClientConfig, ConsumerConfig, PaymentService, ServiceConfig};
use securepay_ports::{EventLog, Ids, Outbox, PortResult};
use securepay_proto::account::v1::account_service_server::AccountServiceServer;
use securepay_proto::notification::v1::notification_service_server::NotificationServiceServer;
use securepay_proto::payment::v1::payment_service_server::PaymentServiceServer;
use tokio::time::{Instant, sleep};
use tonic::transport::Server;

use crate::edge::{self, DevIssuer, Hostile, PaymentAnswer, Probe};
use crate::http::{HttpResponse, RemoteHttp, serve_router};
use crate::infra::{Infra, ServicePorts, addr, http_addr};
use crate::plan::Node;
use crate::remote::ServerFaults;
use crate::workload::{Op, Pay, Workload};

/// What a client waits for one answer from the gateway before it retries: a little more than the
/// gateway's own request budget, so its 504 arrives.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(11);

/// Hostile probes each client sends (kinds drawn from [`Hostile::ALL`] per client and seed).
pub const HOSTILE_PER_CLIENT: usize = 3;

/// Share of accepted payments their payer reads back at once (and of those, reads a payment of
/// another subject).
pub const READ_BACK_SHARE: f64 = 0.3;

/// Share of read-back payments read once more, a random pause (up to the client's pace) later.
pub const READ_AGAIN_SHARE: f64 = 0.5;

/// Times one request is re-sent with a fresh token after a `401` to a token the client believes
/// valid (a gateway clock skewed past the leeway), each after 0.5–1 s.
pub const VALID_TOKEN_RETRIES: u32 = 8;

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
        crate::planted::plant_service(ServiceConfig::default(), ports.planted),
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
        crate::planted::plant_outcome_consumer(ConsumerConfig::default(), ports.planted),
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
        config: crate::planted::plant_settlement(SettlementConfig::production(), ports.planted),
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

/// The notification service: its consumer, and gRPC notification.v1 (the gateway's query).
async fn notification_node(ports: ServicePorts) {
    let config = securepay_notification::ConsumerConfig::default();
    let mut consumer = ports.consumer(&config.group, &config.topics.all());
    let (store, clock) = (ports.notifications.clone(), Arc::clone(&ports.clock));
    madsim::task::spawn(async move {
        // The sender lives as long as the task: the loop stops only when the node dies.
        let (_keep, shutdown) = tokio::sync::watch::channel(false);
        securepay_notification::run_consumer(&store, &mut consumer, clock.as_ref(), &config, shutdown).await;
    });
    let grpc =
        securepay_notification::NotificationGrpc::new(Arc::new(ports.notifications.clone()), Arc::clone(&ports.clock));
    Server::builder()
        .add_service(ports.audited(NotificationServiceServer::with_interceptor(grpc, ports.server_interceptor())))
        .serve(addr(Node::Notification))
        .await
        .expect("the notification node serves gRPC");
}

/// The gateway: the production router at [`http_addr`], calling payment, account and notification
/// as the gateway node (its SVID on every call).
async fn gateway_node(ports: ServicePorts) {
    let interceptor = CallInterceptor::new(ports.client_interceptor());
    let channels = securepay_gateway::Channels {
        payment: ports.channel(Node::Payment),
        account: ports.channel(Node::Account),
        notification: ports.channel(Node::Notification),
    };
    let backends = Backends::new(channels, interceptor);
    // Token times on the node's clock: a `clock_skew` of the gateway reaches its JWT checks.
    let auth = DevIssuer::new().authenticator_on(Arc::clone(&ports.clock));
    let state = AppState::new(edge::gateway_config(), auth, backends, None);
    serve_router(http_addr(), securepay_gateway::router(state), ServerFaults::new()).await;
}

/// What the clients saw: the evidence the idempotency checks use.
#[derive(Debug, Default)]
pub struct Observed {
    /// Per (subject, key): every payment id an accepted answer named (must be one).
    pub accepted: BTreeMap<(Subject, IdempotencyKey), BTreeSet<String>>,
    /// Conflicting replays (same key, other amount) that were accepted: must stay empty.
    pub conflicting_accepted: Vec<(Subject, IdempotencyKey, String)>,
    /// Definitive refusals by problem code.
    pub refused: BTreeMap<String, u64>,
    /// Requests sent (every copy and retry; hostile probes not included).
    pub sent: u64,
    /// Requests that never got a definitive answer before the client's deadline.
    pub gave_up: u64,
    /// Operations not started because their client's deadline had passed.
    pub not_sent: u64,
    /// Balance reads answered; balances read that were negative (must stay empty).
    pub balance_reads: u64,
    pub negative_balances_read: Vec<String>,
    /// Answers `429 rate_limited` (each retried after its `Retry-After`).
    pub throttled: u64,
    /// Hostile probes answered (with the expected refusal or not).
    pub hostile_answered: u64,
    /// Hostile probes answered with anything but their documented refusal: must stay empty.
    pub hostile_unexpected: Vec<String>,
    /// `401` answers to tokens the client minted valid (each re-minted and retried): only a
    /// gateway clock skewed past the leeway sends them.
    pub valid_token_refused: u64,
    /// Per payment id, every status its payer read (`PENDING`, `COMPLETED`, `FAILED`), in order.
    pub payment_reads: BTreeMap<String, Vec<String>>,
    /// Payer reads of an accepted payment answered with a definitive refusal (404...): must stay
    /// empty (after acceptance the payment exists and is the payer's).
    pub payer_reads_refused: Vec<String>,
    /// Reads that got no definitive answer before the deadline (or the token retries ran out).
    pub reads_gave_up: u64,
    /// Reads of another subject's payment answered (`403 forbidden` expected).
    pub foreign_reads: u64,
    /// Reads of another subject's payment answered otherwise: must stay empty.
    pub foreign_reads_unexpected: Vec<String>,
}

/// The shared record of every client.
pub type SharedObserved = Arc<Mutex<Observed>>;

fn observe(observed: &SharedObserved, f: impl FnOnce(&mut Observed)) {
    f(&mut observed.lock().unwrap_or_else(|p| p.into_inner()));
}

/// The end users' bearer tokens, shared by every client of a run: a user holds one token and
/// uses it from every client (as from a phone and a browser), so a run mints one per subject (on
/// the simulated clock) instead of one per (client, subject); a `401` to a token believed valid
/// replaces it for everyone.
#[derive(Clone)]
pub struct Wallet {
    issuer: DevIssuer,
    tokens: Arc<Mutex<BTreeMap<Subject, String>>>,
}

impl Wallet {
    pub fn new() -> Wallet {
        Wallet { issuer: DevIssuer::new(), tokens: Arc::default() }
    }

    /// The bearer token of `subject` (minted once per run, on the simulated clock).
    fn token(&self, subject: &Subject) -> String {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.entry(subject.clone()).or_insert_with(|| self.issuer.token(subject)).clone()
    }

    /// Replaces `subject`'s token with a fresh one (after a `401` to a token believed valid).
    fn remint(&self, subject: &Subject) {
        let fresh = self.issuer.token(subject);
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(subject.clone(), fresh);
    }
}

impl Default for Wallet {
    fn default() -> Wallet {
        Wallet::new()
    }
}

/// One workload client: its HTTP client on its node, the users' tokens, its record.
#[derive(Clone)]
struct Client {
    index: usize,
    http: RemoteHttp,
    wallet: Wallet,
    requests: Arc<AtomicU64>,
    observed: SharedObserved,
    /// The client's pause between operations (later reads wait up to this).
    pace: Duration,
    /// Reads scheduled for later, awaited before the client finishes.
    later: Arc<Mutex<Vec<madsim::task::JoinHandle<()>>>>,
}

impl Client {
    /// A fresh request id (`X-Request-Id`).
    fn request_id(&self) -> String {
        format!("c{}-{}", self.index, self.requests.fetch_add(1, Ordering::SeqCst))
    }
}

/// Starts client `index` on its own node: it plays `ops`, pausing a random time up to `pace`
/// before each, re-sends until `deadline` and starts nothing after it; the hostile probes go out
/// before randomly chosen operations. Returns when it is done.
pub async fn run_client(
    index: usize,
    ops: Vec<Op>,
    pace: Duration,
    deadline: Instant,
    wallet: Wallet,
    observed: SharedObserved,
) {
    let node = Handle::current().create_node().name(format!("client-{index}")).ip(client_ip(index)).build();
    let task = node.spawn(async move {
        let http = RemoteHttp::connect(http_addr(), CLIENT_TIMEOUT).await;
        let client = Client {
            index,
            http,
            wallet,
            requests: Arc::default(),
            observed: Arc::clone(&observed),
            pace,
            later: Arc::default(),
        };
        let total = ops.len();
        // A few hostile probes (a seeded choice of kinds), each before a random operation, carrying
        // the client's first payment under keys no workload payment uses.
        let mut probes: Vec<(usize, Probe)> = Vec::new();
        if let Some(pay) = ops.iter().find_map(|op| match op {
            Op::Pay(pay) => Some(pay.clone()),
            Op::ReadBalance { .. } => None,
        }) {
            let mut kinds = Hostile::ALL.to_vec();
            for n in 0..HOSTILE_PER_CLIENT.min(kinds.len()) {
                let kind = kinds.swap_remove(thread_rng().gen_range(0..kinds.len()));
                let key = format!("hostile-c{index}-{n}");
                let probe = kind.probe(
                    &client.wallet.issuer,
                    &client.wallet.token(&pay.subject),
                    &pay,
                    &key,
                    &client.request_id(),
                );
                probes.push((thread_rng().gen_range(0..total), probe));
            }
        }
        for (done, op) in ops.into_iter().enumerate() {
            let pause = pace.mul_f64(thread_rng().gen_range(0.0..1.0));
            sleep(pause).await;
            if Instant::now() >= deadline {
                // A client that fell behind (long retries) stops: nothing new after its deadline.
                observe(&observed, |o| o.not_sent += (total - done) as u64);
                break;
            }
            let (now, later): (Vec<_>, Vec<_>) = probes.into_iter().partition(|(at, _)| *at == done);
            probes = later;
            for (_, probe) in now {
                send_probe(&client, probe, deadline).await;
            }
            match op {
                Op::Pay(pay) => pay_op(&client, pay, deadline).await,
                Op::ReadBalance { subject, account } => {
                    let request = edge::get_balance(&client.request_id(), &client.wallet.token(&subject), account);
                    let answer = client.http.send(request).await;
                    if let Ok(response) = answer.as_ref()
                        && response.status == StatusCode::OK
                    {
                        let balance = edge::body_field(response, "balance").unwrap_or_default();
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
        let later = std::mem::take(&mut *client.later.lock().unwrap_or_else(|p| p.into_inner()));
        for read in later {
            read.await.expect("a client task does not panic");
        }
    });
    task.await.expect("a client node is never killed");
}

/// Sends one hostile probe until the gateway answers (no reply and 429 are retried until
/// `deadline`); an answer other than the probe's documented refusal is recorded.
async fn send_probe(client: &Client, probe: Probe, deadline: Instant) {
    loop {
        match client.http.send(edge::copy_request(&probe.request)).await {
            Ok(response) if response.status == StatusCode::TOO_MANY_REQUESTS => {
                observe(&client.observed, |o| o.throttled += 1);
            }
            // A valid token refused by a skewed gateway clock: a fresh one is no different (the
            // probe carries its own), so the same probe again after the pause.
            Ok(response) if response.status == StatusCode::UNAUTHORIZED && probe.status != StatusCode::UNAUTHORIZED => {
                observe(&client.observed, |o| o.valid_token_refused += 1);
            }
            Ok(response) => {
                let code = edge::problem_code(&response);
                let expected = response.status == probe.status && code.as_deref() == Some(probe.code);
                observe(&client.observed, |o| {
                    o.hostile_answered += 1;
                    if !expected {
                        o.hostile_unexpected.push(format!(
                            "client {} probe {}: {} {code:?}, expected {} {}",
                            client.index, probe.name, response.status, probe.status, probe.code
                        ));
                    }
                });
                return;
            }
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return;
        }
        sleep(Duration::from_millis(thread_rng().gen_range(200..1000))).await;
    }
}

/// One payment: its concurrent copies at once, each re-sent until answered; then the conflicting
/// replay if the payment was accepted and the workload asks for one.
async fn pay_op(client: &Client, pay: Pay, deadline: Instant) {
    let body = edge::payment_body(&pay, &pay.amount.value().to_string());
    let copies: Vec<_> = (0..pay.concurrent_copies)
        .map(|_| {
            let (client, pay, body) = (client.clone(), pay.clone(), body.clone());
            madsim::task::spawn(async move { send_until_answered(&client, &pay, body, deadline).await })
        })
        .collect();
    let mut accepted = None;
    for copy in copies {
        if let Some(PaymentAnswer::Accepted(payment_id)) = copy.await.expect("a client task does not panic") {
            accepted = Some(payment_id.clone());
            observe(&client.observed, |o| {
                o.accepted.entry((pay.subject.clone(), pay.key.clone())).or_default().insert(payment_id);
            });
        }
    }
    if let Some(payment_id) = &accepted
        && thread_rng().gen_bool(READ_BACK_SHARE)
    {
        read_back(client, &pay.subject, payment_id, deadline).await;
        read_foreign(client, &pay.subject, deadline).await;
        if thread_rng().gen_bool(READ_AGAIN_SHARE) {
            let pause = client.pace.mul_f64(thread_rng().gen_range(0.0..1.0));
            let (again, subject, payment_id) = (client.clone(), pay.subject.clone(), payment_id.clone());
            let read = madsim::task::spawn(async move {
                sleep(pause).await;
                read_back(&again, &subject, &payment_id, deadline).await;
            });
            client.later.lock().unwrap_or_else(|p| p.into_inner()).push(read);
        }
    }
    let accepted = accepted.is_some();
    if accepted && pay.replay_conflicting {
        let other = pay.amount.value() + Decimal::new(1, pay.amount.currency().minor_units());
        let body = edge::payment_body(&pay, &other.to_string());
        if let Some(PaymentAnswer::Accepted(payment_id)) = send_until_answered(client, &pay, body, deadline).await {
            observe(&client.observed, |o| {
                o.conflicting_accepted.push((pay.subject.clone(), pay.key.clone(), payment_id));
            });
        }
    }
}

/// Sends `pay`'s key with `body` until the platform decides (accepted or a definitive refusal) or
/// `deadline` passes (`None`).
async fn send_until_answered(client: &Client, pay: &Pay, body: Vec<u8>, deadline: Instant) -> Option<PaymentAnswer> {
    let mut pause = Duration::from_millis(100);
    let mut token_retries = 0;
    loop {
        let request: Request<Vec<u8>> = edge::create_payment(
            &client.request_id(),
            Some(&client.wallet.token(&pay.subject)),
            pay.key.as_str(),
            body.clone(),
        );
        observe(&client.observed, |o| o.sent += 1);
        let response = client.http.send(request).await;
        let mut wait = pause.mul_f64(thread_rng().gen_range(0.5..1.0));
        if refused_valid_token(client, &response, &pay.subject, &mut token_retries) {
            if Instant::now() >= deadline {
                observe(&client.observed, |o| o.gave_up += 1);
                return None;
            }
            sleep(token_retry_pause()).await;
            continue;
        }
        let answer = edge::read_payment(&response);
        match answer {
            PaymentAnswer::Accepted(_) => return Some(answer),
            PaymentAnswer::Refused(ref label) => {
                observe(&client.observed, |o| *o.refused.entry(label.clone()).or_default() += 1);
                return Some(answer);
            }
            // The gateway unreachable, or the platform did not decide: the same request again.
            PaymentAnswer::Retry { throttled, after } => {
                if throttled {
                    observe(&client.observed, |o| o.throttled += 1);
                }
                wait = wait.max(after.unwrap_or_default());
            }
        }
        if Instant::now() >= deadline {
            observe(&client.observed, |o| o.gave_up += 1);
            return None;
        }
        sleep(wait).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// A `401` to the token the client minted valid, with retries left: records it, mints a fresh
/// token for `subject` and says to send again (see the module docs).
fn refused_valid_token(
    client: &Client,
    answer: &PortResult<HttpResponse>,
    subject: &Subject,
    retries: &mut u32,
) -> bool {
    let refused = matches!(answer, Ok(response) if response.status == StatusCode::UNAUTHORIZED);
    if !refused || *retries >= VALID_TOKEN_RETRIES {
        return false;
    }
    *retries += 1;
    observe(&client.observed, |o| o.valid_token_refused += 1);
    client.wallet.remint(subject);
    true
}

fn token_retry_pause() -> Duration {
    Duration::from_millis(thread_rng().gen_range(500..1000))
}

/// `GET` (built by `build` from a request id and a token of `subject`) until a definitive
/// answer: no reply, 5xx and 429 (after its `Retry-After`) are retried, a `401` to a valid token
/// as [`refused_valid_token`] says. `None` when `deadline` passes or the token retries run out.
async fn get_until_answered(
    client: &Client,
    subject: &Subject,
    deadline: Instant,
    build: impl Fn(&str, &str) -> Request<Vec<u8>>,
) -> Option<HttpResponse> {
    let mut pause = Duration::from_millis(100);
    let mut token_retries = 0;
    loop {
        let answer = client.http.send(build(&client.request_id(), &client.wallet.token(subject))).await;
        let mut wait = pause.mul_f64(thread_rng().gen_range(0.5..1.0));
        if refused_valid_token(client, &answer, subject, &mut token_retries) {
            wait = token_retry_pause();
        } else {
            match answer {
                Ok(response) if response.status == StatusCode::TOO_MANY_REQUESTS => {
                    observe(&client.observed, |o| o.throttled += 1);
                    let after = response
                        .headers
                        .get(axum::http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    wait = wait.max(after.unwrap_or_default());
                }
                Ok(response) if response.status == StatusCode::UNAUTHORIZED => return None,
                Ok(response) if !response.status.is_server_error() => return Some(response),
                _ => {}
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(wait).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// The payer reads its accepted payment `payment_id`: the status is recorded; a definitive
/// refusal (the payment exists and is the payer's, so none is right) is recorded too.
async fn read_back(client: &Client, subject: &Subject, payment_id: &str, deadline: Instant) {
    let answer =
        get_until_answered(client, subject, deadline, |id, token| edge::get_payment(id, token, payment_id)).await;
    observe(&client.observed, |o| match answer {
        None => o.reads_gave_up += 1,
        Some(response) if response.status == StatusCode::OK => {
            let named = edge::body_field(&response, "payment_id");
            let status = edge::body_field(&response, "status").unwrap_or_default();
            if named.as_deref() == Some(payment_id) {
                o.payment_reads.entry(payment_id.to_owned()).or_default().push(status);
            } else {
                o.payer_reads_refused.push(format!("{payment_id}: 200 naming {named:?}"));
            }
        }
        Some(response) => o.payer_reads_refused.push(format!(
            "client {} read {payment_id}: {} {:?}",
            client.index,
            response.status,
            edge::problem_code(&response)
        )),
    });
}

/// `subject` reads a payment another subject was told was accepted (if there is one yet): it
/// must be refused `403 forbidden`.
async fn read_foreign(client: &Client, subject: &Subject, deadline: Instant) {
    let foreign: Vec<String> = {
        let observed = client.observed.lock().unwrap_or_else(|p| p.into_inner());
        observed.accepted.iter().filter(|((s, _), _)| s != subject).flat_map(|(_, ids)| ids.iter().cloned()).collect()
    };
    if foreign.is_empty() {
        return;
    }
    let payment_id = &foreign[thread_rng().gen_range(0..foreign.len())];
    let answer =
        get_until_answered(client, subject, deadline, |id, token| edge::get_payment(id, token, payment_id)).await;
    observe(&client.observed, |o| match answer {
        None => o.reads_gave_up += 1,
        Some(response) => {
            o.foreign_reads += 1;
            let code = edge::problem_code(&response);
            if response.status != StatusCode::FORBIDDEN || code.as_deref() != Some("forbidden") {
                o.foreign_reads_unexpected.push(format!(
                    "client {} as {subject} read {payment_id}: {} {code:?}, expected 403 forbidden",
                    client.index, response.status
                ));
            }
        }
    });
}
