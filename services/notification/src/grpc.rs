//! `securepay.notification.v1.NotificationService` over the [`NotificationStore`] port (both modes:
//! the binary serves it over mTLS, the simulator over its simulated network).
//!
//! The one method, `ListNotifications`, is the query behind the gateway's
//! `GET /api/v1/payments/{id}/notifications`: `kit::authorize` admits only the API gateway (SPEC §2)
//! acting for an end-user subject, the payment id is validated (`INVALID_ARGUMENT`
//! `invalid_payment_id`), and the store's answer is returned first recorded first (at most
//! [`LIST_LIMIT`]). Object-level authorization is the payment's owner's business: the gateway asks
//! the payment service for the payment AS the subject first (403/404 there) and calls this only
//! when that succeeded; this service holds no account owners to decide it again.
//!
//! Every call is counted (RED) and runs in a `notification.list` server span continuing the
//! caller's trace.

use std::sync::Arc;

use securepay_core::identity::method;
use securepay_core::ids::PaymentId;
use securepay_kit::status::{status, unavailable};
use securepay_kit::trace;
use securepay_ports::{Clock, Notification, NotificationStore, PortError};
use securepay_proto::notification::v1 as wire;
use securepay_proto::notification::v1::notification_service_server::NotificationService;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;

use crate::metrics::SERVICE;

/// Most notifications one answer lists (a payment has a handful: initiated, then its outcome).
pub const LIST_LIMIT: usize = 100;

/// The span of one `ListNotifications` call.
pub const LIST_SPAN: &str = "notification.list";

/// The gRPC service. Cheap to clone (shared handles).
pub struct NotificationGrpc<S> {
    store: Arc<S>,
    clock: Arc<dyn Clock>,
}

impl<S> Clone for NotificationGrpc<S> {
    fn clone(&self) -> Self {
        NotificationGrpc { store: Arc::clone(&self.store), clock: Arc::clone(&self.clock) }
    }
}

impl<S: NotificationStore> NotificationGrpc<S> {
    pub fn new(store: Arc<S>, clock: Arc<dyn Clock>) -> NotificationGrpc<S> {
        NotificationGrpc { store, clock }
    }

    async fn list_inner(
        &self,
        request: Request<wire::ListNotificationsRequest>,
    ) -> Result<wire::ListNotificationsResponse, Status> {
        securepay_kit::authorize(&request, method::LIST_NOTIFICATIONS, self.clock.now())?;
        let payment = PaymentId::parse(&request.get_ref().payment_id)
            .map_err(|_| status(Code::InvalidArgument, "invalid_payment_id", "the payment id must be a UUID"))?;
        let notifications = match self.store.for_payment(payment, LIST_LIMIT).await {
            Ok(notifications) => notifications,
            Err(PortError::Unavailable { .. }) => return Err(unavailable()),
            Err(error) => {
                tracing::error!(%error, payment_id = %payment, "listing notifications failed");
                return Err(status(Code::Internal, "internal", "the notifications could not be read"));
            }
        };
        Ok(wire::ListNotificationsResponse {
            payment_id: payment.to_string(),
            notifications: notifications.iter().map(to_wire).collect(),
        })
    }
}

/// A stored notification as the wire shows it (amounts as exact decimal text).
fn to_wire(n: &Notification) -> wire::Notification {
    wire::Notification {
        event_id: n.event_id.to_string(),
        kind: n.kind.as_str().to_owned(),
        status: n.kind.status().as_str().to_owned(),
        failure_reason: n.failure_reason.map(|r| r.code().to_owned()).unwrap_or_default(),
        amount: n.amount.to_string(),
        currency: n.amount.currency().code().to_owned(),
        from_account: n.from.to_string(),
        to_account: n.to.to_string(),
        occurred_at: Some(securepay_proto::convert::timestamp(n.occurred_at)),
        recorded_at: Some(securepay_proto::convert::timestamp(n.recorded_at)),
    }
}

#[tonic::async_trait]
impl<S: NotificationStore> NotificationService for NotificationGrpc<S> {
    async fn list_notifications(
        &self,
        request: Request<wire::ListNotificationsRequest>,
    ) -> Result<Response<wire::ListNotificationsResponse>, Status> {
        let span = tracing::info_span!(
            LIST_SPAN,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = method::LIST_NOTIFICATIONS
        );
        trace::set_parent(&span, trace::extract_from_metadata(request.metadata()));
        let started = tokio::time::Instant::now();
        let result = self.list_inner(request).instrument(span).await;
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        securepay_kit::metrics::grpc_request(SERVICE, method::LIST_NOTIFICATIONS, code, started.elapsed());
        result.map(Response::new)
    }
}
