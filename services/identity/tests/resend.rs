//! A call its HTTP/2 connection closed before sending is sent again: against a plaintext tonic
//! server whose connections live only milliseconds (graceful GOAWAY at `max_connection_age`, as
//! `grpc::serve` does at a quarter of the SVID lifetime), many calls cross a connection close.
//! A bare tonic `Channel` loses some of them as `Cancelled: connection closed`; the
//! `ResendingChannel` the services dial with loses none.

use std::time::Duration;

use securepay_identity::grpc::ResendingChannel;
use securepay_proto::account::v1::account_service_client::AccountServiceClient;
use securepay_proto::account::v1::account_service_server::{AccountService, AccountServiceServer};
use securepay_proto::account::v1::{Balance, CheckBalanceRequest, CheckBalanceResponse, GetBalanceRequest};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

/// Answers anyone: support's `EchoAccount` authorizes the mTLS peer, and this server is plaintext.
struct Echo;

#[tonic::async_trait]
impl AccountService for Echo {
    async fn check_balance(&self, r: Request<CheckBalanceRequest>) -> Result<Response<CheckBalanceResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(CheckBalanceResponse { account_id: r.account_id, sufficient: true, currency: r.currency }))
    }

    async fn get_balance(&self, r: Request<GetBalanceRequest>) -> Result<Response<Balance>, Status> {
        Ok(Response::new(Balance { account_id: r.into_inner().account_id, ..Default::default() }))
    }
}

const CALLS: usize = 3000;
const CONCURRENCY: usize = 8;

async fn short_lived_connections_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        Server::builder()
            .max_connection_age(Duration::from_millis(5))
            .add_service(AccountServiceServer::new(Echo))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

/// Calls `CALLS` times from `CONCURRENCY` tasks; the failures, by message.
async fn failures<T>(client: AccountServiceClient<T>) -> Vec<String>
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    T::Future: Send,
{
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..CONCURRENCY {
        let mut client = client.clone();
        tasks.spawn(async move {
            let mut failed = Vec::new();
            for call in 0..CALLS / CONCURRENCY {
                let request = CheckBalanceRequest { account_id: format!("{task}-{call}"), ..Default::default() };
                match client.check_balance(request).await {
                    Ok(reply) => assert_eq!(reply.into_inner().account_id, format!("{task}-{call}")),
                    Err(status) => failed.push(format!("{status:?}")),
                }
            }
            failed
        });
    }
    let mut all = Vec::new();
    while let Some(failed) = tasks.join_next().await {
        all.extend(failed.unwrap());
    }
    all
}

fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_dropped_unsent_at_a_connection_close_are_resent() {
    let addr = short_lived_connections_server().await;
    let bare = failures(AccountServiceClient::new(channel(&addr))).await;
    let resending = failures(AccountServiceClient::new(ResendingChannel::from(channel(&addr)))).await;
    // The race is real: without resending, calls are lost at connection closes.
    assert!(!bare.is_empty(), "no call crossed a connection close: the test does not exercise the race");
    assert!(resending.is_empty(), "{} of {CALLS} calls failed with resending: {resending:#?}", resending.len());
}
