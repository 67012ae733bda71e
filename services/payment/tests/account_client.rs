//! `AccountClient` over real gRPC (tonic on loopback TCP) against a scripted account.v1 server and
//! a black hole that accepts connections and never answers: deadlines, which errors are retried,
//! the circuit breaker failing fast, and the account service's refusals coming back typed. (The
//! real account-service binary is exercised in `real_stack.rs`.)

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use securepay_core::identity::ServiceIdentity;
use securepay_core::ids::{AccountId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::PaymentRequest;
use securepay_kit::caller::claimed::ClientInterceptor;
use securepay_kit::status::status;
use securepay_memory::SeededIds;
use securepay_payment::{AccountClient, AccountClientConfig, AccountError, Accounts, BalanceCheck, plaintext_channel};
use securepay_proto::account::v1 as wire;
use securepay_proto::account::v1::account_service_server::{AccountService, AccountServiceServer};
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

#[derive(Clone, Copy)]
enum Answer {
    Sufficient(bool),
    Refuse(Code, &'static str),
    Hang,
}

/// Answers from a script (then `Sufficient(true)`); counts calls and remembers the subjects.
#[derive(Clone, Default)]
struct Scripted {
    script: Arc<Mutex<VecDeque<Answer>>>,
    calls: Arc<AtomicUsize>,
    subjects: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl AccountService for Scripted {
    async fn check_balance(
        &self,
        request: Request<wire::CheckBalanceRequest>,
    ) -> Result<Response<wire::CheckBalanceResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let subject = request.metadata().get("x-securepay-subject").and_then(|v| v.to_str().ok()).unwrap_or("");
        self.subjects.lock().unwrap().push(subject.to_owned());
        let answer = self.script.lock().unwrap().pop_front().unwrap_or(Answer::Sufficient(true));
        match answer {
            Answer::Sufficient(sufficient) => Ok(Response::new(wire::CheckBalanceResponse {
                account_id: request.get_ref().account_id.clone(),
                sufficient,
                currency: request.get_ref().currency.clone(),
            })),
            Answer::Refuse(code, public) => Err(status(code, public, "refused")),
            Answer::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(Status::internal("unreachable"))
            }
        }
    }

    async fn get_balance(&self, _request: Request<wire::GetBalanceRequest>) -> Result<Response<wire::Balance>, Status> {
        Err(Status::unimplemented("not used"))
    }
}

async fn serve(service: Scripted) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AccountServiceServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

fn config() -> AccountClientConfig {
    AccountClientConfig {
        deadline: Duration::from_millis(300),
        attempts: 3,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
        breaker_threshold: 4,
        breaker_cool_down: Duration::from_secs(60),
    }
}

fn client(addr: SocketAddr) -> AccountClient<ClientInterceptor> {
    let config = config();
    let channel = plaintext_channel(&format!("http://{addr}"), config.deadline).unwrap();
    AccountClient::with_interceptor(
        channel,
        ClientInterceptor(ServiceIdentity::PaymentService),
        config,
        Arc::new(SeededIds),
    )
}

fn request() -> PaymentRequest {
    let eur = Currency::from_code("EUR").unwrap();
    PaymentRequest::new(
        Subject::parse("alice").unwrap(),
        None,
        AccountId::from_uuid(Uuid::new_v4()),
        AccountId::from_uuid(Uuid::new_v4()),
        Amount::parse("10.00", eur, AmountPolicy::default()).unwrap(),
        None,
    )
    .unwrap()
}

fn alice() -> Subject {
    Subject::parse("alice").unwrap()
}

#[tokio::test]
async fn transient_failures_are_retried_and_refusals_are_not() {
    let server = Scripted::default();
    server.script.lock().unwrap().extend([
        Answer::Refuse(Code::Unavailable, "service_unavailable"),
        Answer::Refuse(Code::Unavailable, "service_unavailable"),
        Answer::Sufficient(false),
    ]);
    let client = client(serve(server.clone()).await);
    assert_eq!(client.check_balance(&alice(), &request()).await, Ok(BalanceCheck::Insufficient));
    assert_eq!(server.calls.load(Ordering::SeqCst), 3, "two retries, then the answer");
    assert!(server.subjects.lock().unwrap().iter().all(|s| s == "alice"), "acts for the subject");

    let cases = [
        (Code::PermissionDenied, "forbidden", AccountError::Forbidden),
        (Code::NotFound, "unknown_account", AccountError::UnknownAccount),
        (Code::FailedPrecondition, "currency_mismatch", AccountError::CurrencyMismatch),
        (Code::InvalidArgument, "invalid_amount", AccountError::InvalidAmount),
    ];
    for (code, public, expected) in cases {
        server.script.lock().unwrap().push_back(Answer::Refuse(code, public));
        let before = server.calls.load(Ordering::SeqCst);
        assert_eq!(client.check_balance(&alice(), &request()).await, Err(expected));
        assert_eq!(server.calls.load(Ordering::SeqCst), before + 1, "{public} is not retried");
    }
}

#[tokio::test]
async fn a_hanging_service_ends_in_unavailable_within_the_bound_and_opens_the_circuit() {
    let server = Scripted::default();
    server.script.lock().unwrap().extend([Answer::Hang; 8]);
    let client = client(serve(server.clone()).await);
    let bound = Duration::from_millis(3 * 300 + 2 * 40 + 1000);
    let started = Instant::now();
    assert_eq!(client.check_balance(&alice(), &request()).await, Err(AccountError::Unavailable));
    assert!(started.elapsed() < bound, "gave up after {:?}", started.elapsed());
    assert_eq!(server.calls.load(Ordering::SeqCst), 3, "three attempts, each cut by the deadline");

    // The fourth consecutive failure opens the circuit; then calls fail without trying.
    assert_eq!(client.check_balance(&alice(), &request()).await, Err(AccountError::Unavailable));
    assert_eq!(server.calls.load(Ordering::SeqCst), 4);
    let started = Instant::now();
    assert_eq!(client.check_balance(&alice(), &request()).await, Err(AccountError::Unavailable));
    assert_eq!(server.calls.load(Ordering::SeqCst), 4, "open circuit: no call made");
    assert!(started.elapsed() < Duration::from_millis(300), "failed fast");
}

#[tokio::test]
async fn a_black_hole_that_accepts_and_never_answers_is_unavailable_not_a_hang() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            keep.lock().unwrap().push(socket);
        }
    });
    let client = client(addr);
    let started = Instant::now();
    assert_eq!(client.check_balance(&alice(), &request()).await, Err(AccountError::Unavailable));
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}
