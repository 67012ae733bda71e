//! `account.v1` over a real gRPC connection: the library's `AccountGrpc` served in-process on
//! 127.0.0.1, backed by a real PostgreSQL (fresh database) and Redis. TEST-ONLY transport: the
//! dev plaintext interceptors put the `PeerSvid` a test client claims on each request, so one test
//! can act as every caller; the binary never serves this way (it serves mTLS only, see
//! `tests/binary.rs`), and the handlers read the `PeerSvid` the same way under both. Covers per-method peer authorization, per-owner object
//! authorization, input validation, cache-aside reads, and the stale-cache guarantee: a stale cached
//! balance may make the advisory check say "sufficient", but settlement still fails the payment with
//! `insufficient_funds` and never overdraws.
#![cfg(not(madsim))]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Infra, Payment, create_topics, dec, fresh, wait_until};
use rust_decimal::Decimal;
use securepay_account::{AccountGrpc, SettlementConfig, Settler, run_settlement};
use securepay_core::identity::ServiceIdentity;
use securepay_core::ids::{AccountId, Subject};
use securepay_core::money::Currency;
use securepay_core::payment::{FailureReason, Outcome};
use securepay_kafka::KafkaConsumer;
use securepay_kit::caller::claimed::{ClientInterceptor, ServerInterceptor};
use securepay_kit::status::error_code;
use securepay_memory::{SeededIds, SimClock};
use securepay_ports::{AccountView, BalanceCache, CachedBalance, EventLog, LedgerStore};
use securepay_proto::account::v1::account_service_client::AccountServiceClient;
use securepay_proto::account::v1::account_service_server::AccountServiceServer;
use securepay_proto::account::v1::{CheckBalanceRequest, GetBalanceRequest};
use securepay_redis::{CALL_TIMEOUT_DEFAULT, Redis, RedisBalanceCache};
use time::OffsetDateTime;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Serves `service` on an ephemeral port; returns its URL.
async fn serve<L: LedgerStore, C: BalanceCache>(service: AccountGrpc<L, C>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AccountServiceServer::with_interceptor(service, ServerInterceptor))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    format!("http://{addr}")
}

type Client = AccountServiceClient<InterceptedService<Channel, ClientInterceptor>>;

/// A client claiming `peer`'s SPIFFE ID.
async fn client(url: &str, peer: ServiceIdentity) -> Client {
    let channel = Channel::from_shared(url.to_owned()).unwrap().connect().await.unwrap();
    AccountServiceClient::with_interceptor(channel, ClientInterceptor(peer))
}

fn as_subject<T>(message: T, subject: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    securepay_kit::with_subject(&mut request, &Subject::parse(subject).unwrap());
    request
}

fn get(account: AccountId, subject: &str) -> tonic::Request<GetBalanceRequest> {
    as_subject(GetBalanceRequest { account_id: account.to_string() }, subject)
}

fn check(from: &str, to: &str, amount: &str, currency: &str, subject: &str) -> tonic::Request<CheckBalanceRequest> {
    let m = CheckBalanceRequest {
        account_id: from.to_owned(),
        to_account: to.to_owned(),
        amount: amount.to_owned(),
        currency: currency.to_owned(),
    };
    as_subject(m, subject)
}

fn assert_refused(status: &tonic::Status, code: Code, error: Option<&str>) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(error_code(status), error, "{status:?}");
}

struct Fixture {
    infra: Infra,
    url: String,
    cache: Arc<RedisBalanceCache>,
    alice_eur: AccountId,
    bob_eur: AccountId,
    bob_try: AccountId,
}

async fn fixture() -> Option<Fixture> {
    let infra = Infra::new().await?;
    let alice_eur = infra.open("alice", "EUR", "100.00").await;
    let bob_eur = infra.open("bob", "EUR", "5.00").await;
    let bob_try = infra.open("bob", "TRY", "70.00").await;
    let cache = infra.cache();
    let service = AccountGrpc::new(infra.ledger().await, Arc::clone(&cache), Arc::new(SimClock));
    let url = serve(service).await;
    Some(Fixture { infra, url, cache, alice_eur, bob_eur, bob_try })
}

#[tokio::test]
async fn the_owner_reads_the_balance_and_it_is_cached() {
    let Some(f) = fixture().await else { return };
    let mut gateway = client(&f.url, ServiceIdentity::ApiGateway).await;
    let balance = gateway.get_balance(get(f.alice_eur, "alice")).await.unwrap().into_inner();
    assert_eq!(balance.account_id, f.alice_eur.to_string());
    assert_eq!((balance.balance.as_str(), balance.currency.as_str()), ("100.00", "EUR"));
    assert!(balance.as_of.is_some());
    let cached = f.cache.get(f.alice_eur).await.unwrap().expect("the read filled the cache");
    assert_eq!(cached.account.balance, dec("100.00"));
    assert_eq!(cached.account.owner.as_str(), "alice");
}

#[tokio::test]
async fn check_balance_answers_from_the_balance() {
    let Some(f) = fixture().await else { return };
    let mut payment = client(&f.url, ServiceIdentity::PaymentService).await;
    let (alice, bob) = (f.alice_eur.to_string(), f.bob_eur.to_string());
    for (amount, sufficient) in [("100.00", true), ("0.01", true), ("100.01", false), ("5000", false)] {
        let answer = payment.check_balance(check(&alice, &bob, amount, "EUR", "alice")).await.unwrap().into_inner();
        assert_eq!(answer.sufficient, sufficient, "{amount}");
        assert_eq!((answer.account_id.as_str(), answer.currency.as_str()), (alice.as_str(), "EUR"));
    }
}

/// What a check needs of the payee (it exists; its currency) is remembered for the cache's TTL:
/// a second check reads the payer's balance again but not the payee at all.
#[tokio::test]
async fn a_checked_payee_is_remembered_and_not_read_again() {
    let Some(f) = fixture().await else { return };
    let mut payment = client(&f.url, ServiceIdentity::PaymentService).await;
    let (alice, bob) = (f.alice_eur.to_string(), f.bob_eur.to_string());
    assert!(payment.check_balance(check(&alice, &bob, "1.00", "EUR", "alice")).await.unwrap().into_inner().sufficient);
    assert!(f.cache.get(f.bob_eur).await.unwrap().is_some(), "the first check read the payee (and cached it)");
    f.cache.invalidate(&[f.alice_eur, f.bob_eur]).await.unwrap();
    assert!(payment.check_balance(check(&alice, &bob, "1.00", "EUR", "alice")).await.unwrap().into_inner().sufficient);
    assert!(f.cache.get(f.alice_eur).await.unwrap().is_some(), "the payer's balance is read every time");
    assert!(f.cache.get(f.bob_eur).await.unwrap().is_none(), "the payee was not read again");
}

#[tokio::test]
async fn only_the_owner_may_read_or_pay_from_an_account() {
    let Some(f) = fixture().await else { return };
    let mut gateway = client(&f.url, ServiceIdentity::ApiGateway).await;
    let refused = gateway.get_balance(get(f.alice_eur, "bob")).await.unwrap_err();
    assert_refused(&refused, Code::PermissionDenied, Some("forbidden"));
    assert!(!refused.message().contains("100"), "no balance leaks in the refusal");

    let mut payment = client(&f.url, ServiceIdentity::PaymentService).await;
    let (alice, bob) = (f.alice_eur.to_string(), f.bob_eur.to_string());
    let refused = payment.check_balance(check(&alice, &bob, "1.00", "EUR", "bob")).await.unwrap_err();
    assert_refused(&refused, Code::PermissionDenied, Some("forbidden"));
    // Paying TO someone else's account is what payments are for.
    assert!(payment.check_balance(check(&bob, &alice, "1.00", "EUR", "bob")).await.is_ok());
}

#[tokio::test]
async fn unknown_accounts_and_currency_mismatches_have_their_codes() {
    let Some(f) = fixture().await else { return };
    let nobody = AccountId::from_uuid(uuid::Uuid::new_v4());
    let mut gateway = client(&f.url, ServiceIdentity::ApiGateway).await;
    let refused = gateway.get_balance(get(nobody, "alice")).await.unwrap_err();
    assert_refused(&refused, Code::NotFound, Some("unknown_account"));

    let mut payment = client(&f.url, ServiceIdentity::PaymentService).await;
    let (alice, bob_try) = (f.alice_eur.to_string(), f.bob_try.to_string());
    let cases = [
        (check(&nobody.to_string(), &alice, "1.00", "EUR", "alice"), Code::NotFound, "unknown_account"),
        (check(&alice, &nobody.to_string(), "1.00", "EUR", "alice"), Code::NotFound, "unknown_account"),
        (check(&alice, &bob_try, "1.00", "EUR", "alice"), Code::FailedPrecondition, "currency_mismatch"),
        (check(&alice, &bob_try, "1.00", "TRY", "alice"), Code::FailedPrecondition, "currency_mismatch"),
    ];
    for (i, (request, code, error)) in cases.into_iter().enumerate() {
        let refused = payment.check_balance(request).await.unwrap_err();
        assert_eq!((refused.code(), error_code(&refused)), (code, Some(error)), "case {i}: {refused:?}");
    }
}

#[tokio::test]
async fn garbage_input_is_an_invalid_argument_with_a_code() {
    let Some(f) = fixture().await else { return };
    let mut payment = client(&f.url, ServiceIdentity::PaymentService).await;
    let (alice, bob) = (f.alice_eur.to_string(), f.bob_eur.to_string());
    let cases = [
        (check("not-a-uuid", &bob, "1.00", "EUR", "alice"), "invalid_account"),
        (check(&alice, "'; DROP TABLE accounts; --", "1.00", "EUR", "alice"), "invalid_account"),
        (check(&alice, &alice, "1.00", "EUR", "alice"), "same_account"),
        (check(&alice, &bob, "1.00", "XYZ", "alice"), "unsupported_currency"),
        (check(&alice, &bob, "-1", "EUR", "alice"), "invalid_amount"),
        (check(&alice, &bob, "0", "EUR", "alice"), "invalid_amount"),
        (check(&alice, &bob, "1e5", "EUR", "alice"), "invalid_amount"),
        (check(&alice, &bob, "NaN", "EUR", "alice"), "invalid_amount"),
        (check(&alice, &bob, "1.001", "EUR", "alice"), "invalid_amount"),
        (check(&alice, &bob, "", "EUR", "alice"), "invalid_amount"),
    ];
    for (i, (request, error)) in cases.into_iter().enumerate() {
        let refused = payment.check_balance(request).await.unwrap_err();
        assert_refused(&refused, Code::InvalidArgument, Some(error));
        assert!(!refused.message().is_empty(), "case {i}");
    }
    let mut gateway = client(&f.url, ServiceIdentity::ApiGateway).await;
    let garbage = as_subject(GetBalanceRequest { account_id: "garbage".into() }, "alice");
    assert_refused(&gateway.get_balance(garbage).await.unwrap_err(), Code::InvalidArgument, Some("invalid_account"));
}

#[tokio::test]
async fn callers_are_authorized_per_method_before_anything_else() {
    let Some(f) = fixture().await else { return };
    let (alice, bob) = (f.alice_eur.to_string(), f.bob_eur.to_string());

    // A workload the allow-list does not admit for the method.
    let mut notification = client(&f.url, ServiceIdentity::NotificationService).await;
    let refused = notification.get_balance(get(f.alice_eur, "alice")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = notification.check_balance(check(&alice, &bob, "1.00", "EUR", "alice")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let mut payment = client(&f.url, ServiceIdentity::PaymentService).await;
    assert_eq!(payment.get_balance(get(f.alice_eur, "alice")).await.unwrap_err().code(), Code::PermissionDenied);
    let mut gateway = client(&f.url, ServiceIdentity::ApiGateway).await;
    let refused = gateway.check_balance(check(&alice, &bob, "1.00", "EUR", "alice")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // No peer identity at all; a peer without the end-user subject. Even garbage input is
    // refused as unauthenticated first.
    let channel = Channel::from_shared(f.url.clone()).unwrap().connect().await.unwrap();
    let mut anonymous = AccountServiceClient::new(channel);
    assert_eq!(anonymous.get_balance(get(f.alice_eur, "alice")).await.unwrap_err().code(), Code::Unauthenticated);
    let garbage = check("x", "y", "z", "EUR", "alice");
    assert_eq!(anonymous.check_balance(garbage).await.unwrap_err().code(), Code::Unauthenticated);
    let no_subject = tonic::Request::new(GetBalanceRequest { account_id: alice.clone() });
    assert_eq!(gateway.get_balance(no_subject).await.unwrap_err().code(), Code::Unauthenticated);
}

#[tokio::test]
async fn reads_fall_back_to_postgresql_when_redis_is_unreachable() {
    let Some(infra) = Infra::new().await else { return };
    let alice = infra.open("alice", "EUR", "42.50").await;
    // Nothing listens on port 1: every cache call fails fast as Unavailable.
    let dead = Arc::new(RedisBalanceCache::new(Redis::connect("redis://127.0.0.1:1", CALL_TIMEOUT_DEFAULT).unwrap()));
    let url = serve(AccountGrpc::new(infra.ledger().await, dead, Arc::new(SimClock))).await;
    let mut gateway = client(&url, ServiceIdentity::ApiGateway).await;
    let balance = gateway.get_balance(get(alice, "alice")).await.unwrap().into_inner();
    assert_eq!(balance.balance, "42.50");
}

/// Issue bullet: a stale cache never lets a payment be accepted that settlement would reject
/// silently — the payment ends FAILED with its reason and nothing is overdrawn.
#[tokio::test]
async fn a_stale_cached_balance_never_lets_settlement_overdraw() {
    let Some(f) = fixture().await else { return };
    let eur = Currency::from_code("EUR").unwrap();
    // The cache believes alice holds 1000.00; she holds 100.00.
    let stale = CachedBalance {
        account: AccountView {
            id: f.alice_eur,
            owner: Subject::parse("alice").unwrap(),
            currency: eur,
            balance: dec("1000.00"),
        },
        cached_at: OffsetDateTime::now_utc(),
    };
    f.cache.put(&stale, 60).await.unwrap();
    let mut payment = client(&f.url, ServiceIdentity::PaymentService).await;
    let (alice, bob) = (f.alice_eur.to_string(), f.bob_eur.to_string());
    let advisory = payment.check_balance(check(&alice, &bob, "500.00", "EUR", "alice")).await.unwrap().into_inner();
    assert!(advisory.sufficient, "the advisory check answered from the stale cache");

    // The payment service accepted it and published payment.initiated; settlement decides.
    let (topic, dlq) = (fresh("payment.initiated"), fresh("payment.initiated.dlq"));
    create_topics(&f.infra.brokers, &[&topic, &dlq]).await;
    let log = f.infra.event_log();
    let p = Payment::new(f.alice_eur, f.bob_eur, "500.00", "EUR", "alice");
    log.publish(&[p.record(&topic)]).await.unwrap();
    let settler = Arc::new(Settler {
        ledger: f.infra.ledger().await,
        cache: Arc::clone(&f.cache),
        dlq: log,
        ids: Arc::new(SeededIds),
        clock: Arc::new(SimClock),
        config: SettlementConfig::new(dlq),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (brokers, group) = (f.infra.brokers.clone(), fresh("account-service-group"));
    let task = tokio::spawn({
        let settler = Arc::clone(&settler);
        async move {
            let join = || KafkaConsumer::new(&brokers, &group, &[topic.as_str()]);
            run_settlement(&settler, join, async move { drop(stopped.await) }).await;
        }
    });
    wait_until(Duration::from_secs(60), "the payment is settled", || async { f.infra.processed().await == 1 }).await;
    stop.send(()).unwrap();
    task.await.unwrap();

    let outcomes = f.infra.outbox().await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].payment_id, p.payment_id);
    assert_eq!(outcomes[0].outcome, Outcome::Failed(FailureReason::InsufficientFunds), "FAILED, with its reason");
    assert_eq!(f.infra.balance(f.alice_eur).await, dec("100.00"), "nothing moved");
    assert!(f.infra.balance(f.alice_eur).await >= Decimal::ZERO);
    f.infra.assert_books_balance().await;

    // Settlement invalidated the payer's cached balance: the owner now reads the truth.
    let mut gateway = client(&f.url, ServiceIdentity::ApiGateway).await;
    let balance = gateway.get_balance(get(f.alice_eur, "alice")).await.unwrap().into_inner();
    assert_eq!(balance.balance, "100.00");
    let advisory = payment.check_balance(check(&alice, &bob, "500.00", "EUR", "alice")).await.unwrap().into_inner();
    assert!(!advisory.sufficient);
}
