//! The gateway's gRPC clients of the payment, account and notification services, built in ONE
//! constructor, [`Backends::new`]: three channels plus a [`CallInterceptor`] every call passes
//! through.
//!
//! Production builds them with [`Backends::connect`]: mTLS with the gateway's own X.509-SVID
//! (`spiffe://securepay.dev/api-gateway`, from the SPIRE agent), each server presenting exactly the
//! SVID of the service it is supposed to be (`securepay_identity::grpc::channel`), and
//! [`CallInterceptor::none`]: the services authorize the gateway by the SVID its connection was
//! verified with; nothing in the request metadata claims an identity. The simulator (madsim-tonic
//! has no TLS) passes its own interceptor, which attaches the gateway node's simulated SVID; tests
//! pass plaintext channels to in-process fakes.

use std::sync::Arc;

#[cfg(not(madsim))]
use securepay_core::identity::ServiceIdentity;
#[cfg(not(madsim))]
use securepay_identity::x509::WorkloadIdentity;
use securepay_proto::account::v1::account_service_client::AccountServiceClient;
use securepay_proto::notification::v1::notification_service_client::NotificationServiceClient;
use securepay_proto::payment::v1::payment_service_client::PaymentServiceClient;
use tonic::service::Interceptor;
#[cfg(madsim)]
use tonic::transport::Channel;
use tonic::{Request, Status};

type InterceptFn = dyn Fn(Request<()>) -> Result<Request<()>, Status> + Send + Sync;

/// What every backend call passes through before it is sent (type-erased, so [`Backends`] and the
/// router state stay one concrete type in both modes). Cheap to clone.
#[derive(Clone)]
pub struct CallInterceptor(Arc<InterceptFn>);

impl CallInterceptor {
    /// Adds nothing to a call: the mTLS channel itself identifies the gateway.
    pub fn none() -> CallInterceptor {
        CallInterceptor(Arc::new(Ok::<Request<()>, Status>))
    }

    /// Every call passes through (a clone of) `interceptor`.
    pub fn new<I: Interceptor + Clone + Send + Sync + 'static>(interceptor: I) -> CallInterceptor {
        CallInterceptor(Arc::new(move |request| interceptor.clone().call(request)))
    }
}

impl std::fmt::Debug for CallInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallInterceptor")
    }
}

impl Interceptor for CallInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        (self.0)(request)
    }
}

/// The channel the clients send over: for real, one that resends a call its connection closed
/// before sending (`securepay_identity::grpc::ResendingChannel`; a plain [`Channel`] converts
/// into it); madsim-tonic's own channel in simulation.
///
/// [`Channel`]: tonic::transport::Channel
#[cfg(not(madsim))]
pub type BackendChannel = securepay_identity::grpc::ResendingChannel;
#[cfg(madsim)]
pub type BackendChannel = Channel;

/// The generated clients with an interceptor: real tonic wraps the channel, madsim-tonic keeps the
/// interceptor beside it.
#[cfg(not(madsim))]
pub type PaymentClient =
    PaymentServiceClient<tonic::service::interceptor::InterceptedService<BackendChannel, CallInterceptor>>;
#[cfg(madsim)]
pub type PaymentClient = PaymentServiceClient<Channel, CallInterceptor>;
#[cfg(not(madsim))]
pub type AccountClient =
    AccountServiceClient<tonic::service::interceptor::InterceptedService<BackendChannel, CallInterceptor>>;
#[cfg(madsim)]
pub type AccountClient = AccountServiceClient<Channel, CallInterceptor>;
#[cfg(not(madsim))]
pub type NotificationClient =
    NotificationServiceClient<tonic::service::interceptor::InterceptedService<BackendChannel, CallInterceptor>>;
#[cfg(madsim)]
pub type NotificationClient = NotificationServiceClient<Channel, CallInterceptor>;

/// The three channels the gateway calls over, one per backend service (or their addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channels<C> {
    pub payment: C,
    pub account: C,
    pub notification: C,
}

impl<C: Clone> Channels<C> {
    /// All three backends over one channel (in-process fakes serving every service).
    pub fn one(channel: C) -> Channels<C> {
        Channels { payment: channel.clone(), account: channel.clone(), notification: channel }
    }
}

/// Cheap to clone: each client shares one HTTP/2 connection.
#[derive(Clone)]
pub struct Backends {
    pub payment: PaymentClient,
    pub account: AccountClient,
    pub notification: NotificationClient,
}

impl Backends {
    /// Clients over `channels`, every call passing through `interceptor`. The binary calls it only
    /// through [`Backends::connect`].
    pub fn new(channels: Channels<impl Into<BackendChannel>>, interceptor: CallInterceptor) -> Backends {
        Backends {
            payment: PaymentServiceClient::with_interceptor(channels.payment.into(), interceptor.clone()),
            account: AccountServiceClient::with_interceptor(channels.account.into(), interceptor.clone()),
            notification: NotificationServiceClient::with_interceptor(channels.notification.into(), interceptor),
        }
    }

    /// Lazily connecting mTLS clients to each address (host:port), presenting `identity`'s current
    /// SVID and accepting only the SVID of the service that address is supposed to be.
    #[cfg(not(madsim))]
    pub fn connect(addrs: &Channels<String>, identity: &WorkloadIdentity) -> anyhow::Result<Backends> {
        use securepay_identity::grpc::channel;
        let channels = Channels {
            payment: channel(&addrs.payment, ServiceIdentity::PaymentService, identity)?,
            account: channel(&addrs.account, ServiceIdentity::AccountService, identity)?,
            notification: channel(&addrs.notification, ServiceIdentity::NotificationService, identity)?,
        };
        Ok(Backends::new(channels, CallInterceptor::none()))
    }
}
