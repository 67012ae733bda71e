//! The gateway's gRPC clients of the payment and account services, built in ONE function,
//! [`Backends::connect_dev_insecure`]. Today the transport is the development-only plaintext one
//! (the gateway *claims* `spiffe://securepay.dev/api-gateway` in metadata); the mTLS transport with
//! SPIRE SVIDs replaces this function and nothing else.

use std::time::Duration;

use securepay_core::identity::ServiceIdentity;
use securepay_kit::caller::dev_insecure::ClientInterceptor;
use securepay_proto::account::v1::account_service_client::AccountServiceClient;
use securepay_proto::payment::v1::payment_service_client::PaymentServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub type PaymentClient = PaymentServiceClient<InterceptedService<Channel, ClientInterceptor>>;
pub type AccountClient = AccountServiceClient<InterceptedService<Channel, ClientInterceptor>>;

/// Cheap to clone: each client shares one HTTP/2 connection.
#[derive(Clone)]
pub struct Backends {
    pub payment: PaymentClient,
    pub account: AccountClient,
}

fn channel(addr: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| anyhow::anyhow!("{addr:?} is not a valid host:port"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}

impl Backends {
    /// Lazily connecting clients to `payment_addr` and `account_addr` (host:port), over the
    /// development-only plaintext transport.
    pub fn connect_dev_insecure(payment_addr: &str, account_addr: &str) -> anyhow::Result<Backends> {
        let claim = ClientInterceptor(ServiceIdentity::ApiGateway);
        Ok(Backends {
            payment: PaymentServiceClient::with_interceptor(channel(payment_addr)?, claim),
            account: AccountServiceClient::with_interceptor(channel(account_addr)?, claim),
        })
    }
}
