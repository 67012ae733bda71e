//! The simulated SPIRE of `securepay_sim::spire` on real madsim nodes: an issuer node minting
//! short-lived SVIDs by node attestation, service nodes renewing them, and an account-service
//! stand-in whose handlers run `securepay_kit::authorize` — the production check — behind the
//! simulator's server interceptor.
//!
//! - a payment-service SVID is served CheckBalance; an expired or forged one is refused
//!   (UNAUTHENTICATED); a notification-service SVID gets PERMISSION_DENIED; the planted bug
//!   `trust_expired_svid` serves the expired one (so a whole-platform run can catch it);
//! - an issuer outage past the TTL: the node's `SvidSource` reports no SVID and every call is
//!   refused; after healing the SVID is renewed and calls are served again within a bound.
//!
//! Run: `MADSIM_TEST_SEED=1 MADSIM_TEST_NUM=5 cargo sim --test spire`.
#![cfg(madsim)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle};
use securepay_core::identity::{ServiceIdentity, method};
use securepay_core::ids::Subject;
use securepay_kit::{authorize, with_subject};
use securepay_memory::SimClock;
use securepay_ports::{Clock, Svid, SvidSource};
use securepay_proto::account::v1::account_service_client::AccountServiceClient;
use securepay_proto::account::v1::account_service_server::{AccountService, AccountServiceServer};
use securepay_proto::account::v1::{Balance, CheckBalanceRequest, CheckBalanceResponse, GetBalanceRequest};
use securepay_sim::infra::{self, Infra, ServicePorts};
use securepay_sim::plan::{Node, Plan};
use securepay_sim::remote::ServerFaults;
use securepay_sim::run::{self, Checker};
use securepay_sim::spire::{
    Audited, ClientInterceptor, ISSUER_PORT, Issuer, IssuerKey, ServerInterceptor, SimSvidSource, SvidAudit, SvidCell,
};
use tokio::time::{Instant, sleep, timeout};
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Request, Response, Status};

const TEST: &str = "spire";
const ACCOUNT_PORT: u16 = 50_052;
const BUGGY_PORT: u16 = 50_053;
const CALL_TIMEOUT: Duration = Duration::from_millis(500);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

const PAYMENT_IP: u8 = 2;
const ACCOUNT_IP: u8 = 3;
const NOTIFICATION_IP: u8 = 4;
const SPIRE_IP: u8 = 20;

/// An account-service stand-in: each handler authorizes exactly as the real one must, then answers.
struct Probe;

#[tonic::async_trait]
impl AccountService for Probe {
    async fn check_balance(
        &self,
        request: Request<CheckBalanceRequest>,
    ) -> Result<Response<CheckBalanceResponse>, Status> {
        authorize(&request, method::CHECK_BALANCE, SimClock.now())?;
        let r = request.into_inner();
        Ok(Response::new(CheckBalanceResponse { account_id: r.account_id, sufficient: true, currency: r.currency }))
    }

    async fn get_balance(&self, request: Request<GetBalanceRequest>) -> Result<Response<Balance>, Status> {
        authorize(&request, method::GET_BALANCE, SimClock.now())?;
        Err(Status::unimplemented("not needed by this test"))
    }
}

struct Cluster {
    key: IssuerKey,
    spire: NodeHandle,
    /// What the correct server served, and what the one with the planted bug served.
    audit: Arc<SvidAudit>,
    buggy_audit: Arc<SvidAudit>,
}

/// The issuer node (payment and notification nodes registered) and the account node, which
/// serves the probe behind the interceptor, and behind the planted bug on a second port.
fn cluster(ttl: Duration) -> Cluster {
    let handle = Handle::current();
    let key = IssuerKey::from_seed();
    let entries = BTreeMap::from([
        (ip(PAYMENT_IP), ServiceIdentity::PaymentService),
        (ip(NOTIFICATION_IP), ServiceIdentity::NotificationService),
    ]);
    let issuer = Issuer::new(key.clone(), ttl, entries);
    let issuer_addr = SocketAddr::new(ip(SPIRE_IP), ISSUER_PORT);
    let spire = handle
        .create_node()
        .name("spire")
        .ip(issuer_addr.ip())
        .init(move || issuer.clone().serve(issuer_addr, ServerFaults::new()))
        .build();
    let (audit, buggy_audit) = (SvidAudit::new(), SvidAudit::new());
    let (bundle, audits) = (key.clone(), (Arc::clone(&audit), Arc::clone(&buggy_audit)));
    handle
        .create_node()
        .name("account")
        .ip(ip(ACCOUNT_IP))
        .init(move || {
            let (bundle, (audit, buggy_audit)) = (bundle.clone(), audits.clone());
            async move {
                let clock: Arc<dyn Clock> = Arc::new(SimClock);
                let buggy = ServerInterceptor::new(bundle.clone()).trust_expired_svid(true);
                let buggy = AccountServiceServer::with_interceptor(Probe, buggy);
                madsim::task::spawn(
                    Server::builder()
                        .add_service(Audited::new(buggy, bundle.clone(), Arc::clone(&clock), buggy_audit))
                        .serve(SocketAddr::new(ip(ACCOUNT_IP), BUGGY_PORT)),
                );
                let correct = AccountServiceServer::with_interceptor(Probe, ServerInterceptor::new(bundle.clone()));
                Server::builder()
                    .add_service(Audited::new(correct, bundle, clock, audit))
                    .serve(SocketAddr::new(ip(ACCOUNT_IP), ACCOUNT_PORT))
                    .await
                    .expect("account node serves");
            }
        })
        .build();
    Cluster { key, spire, audit, buggy_audit }
}

/// CheckBalance from the current node with the SVID in `cell`, to the account node at `port`.
async fn check_balance(cell: SvidCell, port: u16) -> Result<(), Code> {
    let channel = Endpoint::from_shared(format!("http://{}:{port}", ip(ACCOUNT_IP))).expect("valid uri").connect_lazy();
    let mut client = AccountServiceClient::with_interceptor(channel, ClientInterceptor::new(cell));
    let mut request = Request::new(CheckBalanceRequest {
        account_id: "acc".into(),
        amount: "1.00".into(),
        currency: "EUR".into(),
        to_account: "other".into(),
    });
    with_subject(&mut request, &Subject::parse("alice").expect("valid"));
    match timeout(CALL_TIMEOUT, client.check_balance(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(status.code()),
        Err(_) => Err(Code::DeadlineExceeded),
    }
}

/// Starts the node's SVID source and waits (bounded) until it holds a valid SVID.
async fn fetch_svid() -> Option<SimSvidSource> {
    let source = SimSvidSource::start(SocketAddr::new(ip(SPIRE_IP), ISSUER_PORT), Arc::new(SimClock)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(source.current().await, Ok(Some(_))) {
            return Some(source);
        }
        sleep(Duration::from_millis(50)).await;
    }
    None
}

fn cell_with(signed: securepay_sim::spire::SignedSvid) -> SvidCell {
    Arc::new(std::sync::Mutex::new(Some(signed)))
}

#[madsim::test]
async fn the_account_service_serves_exactly_the_callers_the_allow_list_admits() {
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    let handle = Handle::current();
    let cluster = cluster(Duration::from_secs(10));
    let payment = handle.create_node().name("payment").ip(ip(PAYMENT_IP)).build();
    let notification = handle.create_node().name("notification").ip(ip(NOTIFICATION_IP)).build();
    sleep(Duration::from_millis(100)).await;

    // A valid payment-service SVID from the issuer is served.
    let (served, identity) = payment
        .spawn(async {
            let source = fetch_svid().await.expect("the payment node gets an SVID");
            let svid = source.current().await.expect("source").expect("valid");
            (check_balance(source.cell(), ACCOUNT_PORT).await, svid.spiffe_id)
        })
        .await
        .unwrap();
    check.check(identity == ServiceIdentity::PaymentService.spiffe_id(), || format!("issued {identity}"));
    check.check(served == Ok(()), || format!("a valid payment-service SVID was refused: {served:?}"));

    // The notification service may not call CheckBalance.
    let denied = notification
        .spawn(async {
            let source = fetch_svid().await.expect("the notification node gets an SVID");
            check_balance(source.cell(), ACCOUNT_PORT).await
        })
        .await
        .unwrap();
    check.check(denied == Err(Code::PermissionDenied), || format!("notification calling CheckBalance: {denied:?}"));

    // Expired (signed by the issuer's key, not_after in the past) and forged SVIDs are refused.
    let past = SimClock.now() - time::Duration::seconds(1);
    let payment_id = ServiceIdentity::PaymentService.spiffe_id().to_owned();
    let expired = cluster.key.sign(Svid { spiffe_id: payment_id.clone(), not_after: past });
    let forged = IssuerKey::new([9; 32])
        .sign(Svid { spiffe_id: payment_id, not_after: SimClock.now() + time::Duration::minutes(5) });
    let (refused_expired, refused_forged, bug_serves_expired) = payment
        .spawn(async move {
            (
                check_balance(cell_with(expired.clone()), ACCOUNT_PORT).await,
                check_balance(cell_with(forged), ACCOUNT_PORT).await,
                check_balance(cell_with(expired), BUGGY_PORT).await,
            )
        })
        .await
        .unwrap();
    check.check(refused_expired == Err(Code::Unauthenticated), || format!("expired SVID: {refused_expired:?}"));
    check.check(refused_forged == Err(Code::Unauthenticated), || format!("forged SVID: {refused_forged:?}"));
    check.check(bug_serves_expired == Ok(()), || {
        format!("the planted trust_expired_svid bug should serve an expired SVID: {bug_serves_expired:?}")
    });
    // The audit sees what was served: nothing wrong on the correct server, the expired SVID on the
    // buggy one.
    check.check(cluster.audit.served() == 1 && cluster.audit.violations().is_empty(), || {
        format!("correct server: {} served, violations {:?}", cluster.audit.served(), cluster.audit.violations())
    });
    let caught = cluster.buggy_audit.violations();
    check.check(caught.len() == 1 && caught[0].why == "SVID expired", || {
        format!("the audit should catch the expired SVID the planted bug served: {caught:?}")
    });
    drop(cluster.spire);
    run::print_line(&format!("{TEST}/allow-list seed={} checks={}", run::seed(), check.checks()));
}

#[madsim::test]
async fn an_issuer_outage_past_the_ttl_refuses_calls_until_the_svid_is_renewed() {
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    let handle = Handle::current();
    let ttl = Duration::from_secs(2);
    let cluster = cluster(ttl);
    let payment = handle.create_node().name("payment").ip(ip(PAYMENT_IP)).build();
    sleep(Duration::from_millis(100)).await;
    let source = payment.spawn(async { fetch_svid().await.expect("an SVID before the outage") }).await.unwrap();
    let cell = source.cell();
    let before = payment.spawn(check_balance(cell.clone(), ACCOUNT_PORT)).await.unwrap();
    check.check(before == Ok(()), || format!("served before the outage: {before:?}"));

    // The issuer is unreachable for longer than an SVID lives: renewals fail, the SVID expires.
    let net = NetSim::current();
    net.clog_node(cluster.spire.id());
    sleep(ttl + Duration::from_millis(500)).await;
    let current = source.current().await.expect("source");
    check.check(current.is_none(), || format!("the source still reports {current:?} past the TTL"));
    let during = payment.spawn(check_balance(cell.clone(), ACCOUNT_PORT)).await.unwrap();
    check.check(during == Err(Code::Unauthenticated), || format!("a call on an expired SVID: {during:?}"));

    // Healed: the SVID is renewed and calls are served again, within a bound.
    net.unclog_node(cluster.spire.id());
    let bound = Duration::from_secs(3);
    let healed_at = Instant::now();
    let mut after = Err(Code::Unknown);
    while after.is_err() && healed_at.elapsed() < bound {
        sleep(Duration::from_millis(100)).await;
        after = payment.spawn(check_balance(cell.clone(), ACCOUNT_PORT)).await.unwrap();
    }
    check.check(after == Ok(()), || format!("not served within {bound:?} of healing the issuer: {after:?}"));
    run::print_line(&format!(
        "{TEST}/issuer-outage seed={} checks={} recovered_ms={}",
        run::seed(),
        check.checks(),
        healed_at.elapsed().as_millis()
    ));
}

/// What each caller node saw last, keyed by its node.
type Seen = Arc<std::sync::Mutex<BTreeMap<Node, Result<(), Code>>>>;

#[madsim::test]
async fn service_nodes_started_by_infra_authenticate_each_other_with_their_issued_svids() {
    run::print_replay_command_on_panic(TEST);
    let mut check = Checker::new(TEST);
    let plan = Plan::named("svid-expiry").unwrap_or_else(|e| panic!("{e}"));
    let mut infra = Infra::start(&plan);
    infra.start_service(Node::Account, |ports: ServicePorts| async move {
        Server::builder()
            .add_service(ports.audited(AccountServiceServer::with_interceptor(Probe, ports.server_interceptor())))
            .serve(infra::addr(Node::Account))
            .await
            .expect("account serves");
    });
    let seen = Seen::default();
    for caller in [Node::Payment, Node::Notification] {
        let seen = Arc::clone(&seen);
        infra.start_service(caller, move |ports: ServicePorts| {
            let seen = Arc::clone(&seen);
            async move {
                let mut client =
                    AccountServiceClient::with_interceptor(ports.channel(Node::Account), ports.client_interceptor());
                loop {
                    let mut request = Request::new(CheckBalanceRequest::default());
                    with_subject(&mut request, &Subject::parse("alice").expect("valid"));
                    let outcome = match timeout(CALL_TIMEOUT, client.check_balance(request)).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(status)) => Err(status.code()),
                        Err(_) => Err(Code::DeadlineExceeded),
                    };
                    seen.lock().unwrap().insert(caller, outcome);
                    sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
    let expected = BTreeMap::from([(Node::Payment, Ok(())), (Node::Notification, Err(Code::PermissionDenied))]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while *seen.lock().unwrap() != expected && Instant::now() < deadline {
        sleep(Duration::from_millis(100)).await;
    }
    let last = seen.lock().unwrap().clone();
    check.check(last == expected, || format!("callers saw {last:?}, expected {expected:?}"));
    let audit = &infra.svid_audit;
    check.check(audit.served() > 0 && audit.violations().is_empty(), || {
        format!("audit: {} served, violations {:?}", audit.served(), audit.violations())
    });
    run::print_line(&format!(
        "{TEST}/infra-grpc seed={} served={} checks={}",
        run::seed(),
        audit.served(),
        check.checks()
    ));
}
