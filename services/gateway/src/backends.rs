//! The gateway's gRPC clients of the payment and account services, built in ONE function,
//! [`Backends::connect`]: mTLS with the gateway's own X.509-SVID
//! (`spiffe://securepay.dev/api-gateway`, from the SPIRE agent), and each server must present
//! exactly the SVID of the service it is supposed to be (`securepay_identity::grpc::channel`). The
//! services authorize the gateway by the SVID its connection was verified with; nothing in the
//! request metadata claims an identity.
//!
//! [`Backends::from_channels`] is for tests that serve fake backends in-process.

use securepay_core::identity::ServiceIdentity;
use securepay_identity::x509::WorkloadIdentity;
use securepay_proto::account::v1::account_service_client::AccountServiceClient;
use securepay_proto::payment::v1::payment_service_client::PaymentServiceClient;
use tonic::transport::Channel;

pub type PaymentClient = PaymentServiceClient<Channel>;
pub type AccountClient = AccountServiceClient<Channel>;

/// Cheap to clone: each client shares one HTTP/2 connection.
#[derive(Clone)]
pub struct Backends {
    pub payment: PaymentClient,
    pub account: AccountClient,
}

impl Backends {
    /// Lazily connecting mTLS clients to `payment_addr` and `account_addr` (host:port), presenting
    /// `identity`'s current SVID and accepting only the payment service's and the account
    /// service's SVID respectively.
    pub fn connect(payment_addr: &str, account_addr: &str, identity: &WorkloadIdentity) -> anyhow::Result<Backends> {
        let payment = securepay_identity::grpc::channel(payment_addr, ServiceIdentity::PaymentService, identity)?;
        let account = securepay_identity::grpc::channel(account_addr, ServiceIdentity::AccountService, identity)?;
        Ok(Backends::from_channels(payment, account))
    }

    /// TESTS ONLY: clients over channels the caller built (e.g. plaintext to in-process fakes).
    /// The binary always uses [`Backends::connect`].
    pub fn from_channels(payment: Channel, account: Channel) -> Backends {
        Backends { payment: PaymentServiceClient::new(payment), account: AccountServiceClient::new(account) }
    }
}
