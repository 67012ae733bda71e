//! The HTTP edge over the simulated network: an axum `Router` (the gateway's) served from its
//! node with [`serve_router`], and [`RemoteHttp`], the client a workload node sends requests with.
//!
//! madsim has no HTTP server (`axum::serve` needs real IO), so a request travels as a value on the
//! same datagram RPC as the infrastructure (`crate::remote`) and runs on the gateway node through
//! `tower::ServiceExt::oneshot` — the router, its middleware and its handlers exactly as in
//! production. As `into_make_service_with_connect_info` does in production, every request carries
//! the peer's address as axum's `ConnectInfo<SocketAddr>` extension (the address the simulated
//! network delivered it from), so the per-IP rate limit sees each client. Partitions and kills of
//! the gateway node hit it like any other node; a request without a reply within the bound is
//! `Unavailable` (the client cannot tell whether it was served: that is what idempotency keys are
//! for).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode};
use securepay_ports::PortResult;
use tower::ServiceExt;

use crate::remote::{RemoteClient, ServerFaults, serve};

/// The port the gateway's HTTP edge listens on.
pub const HTTP_PORT: u16 = 8080;
/// Most bytes of one response body read back.
pub const RESPONSE_BODY_MAX: usize = 1024 * 1024;

/// A response as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Serves `router` at `addr` until the node dies (call from the gateway node's `init`).
pub async fn serve_router(addr: SocketAddr, router: Router, faults: Arc<ServerFaults>) {
    serve(addr, router, faults).await;
}

/// A client of a served router, bound on the calling node.
#[derive(Debug, Clone)]
pub struct RemoteHttp(RemoteClient<Router>, Duration);

impl RemoteHttp {
    /// A client on the current node for the router at `addr`; each request is bounded by `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> RemoteHttp {
        RemoteHttp(RemoteClient::connect(addr, "gateway").await, timeout)
    }

    /// Sends `request`; `Unavailable` when no reply came within the bound.
    pub async fn send(&self, request: Request<Vec<u8>>) -> PortResult<HttpResponse> {
        let bound = self.1;
        self.0
            .call_with(bound, move |router: Router, peer: SocketAddr| async move {
                let mut request = request.map(Body::from);
                request.extensions_mut().insert(ConnectInfo(peer));
                let response = router.oneshot(request).await.unwrap_or_else(|never| match never {});
                let (parts, body) = response.into_parts();
                // A body that cannot be read whole is answered as the server error it is.
                let body = axum::body::to_bytes(body, RESPONSE_BODY_MAX).await.map(|b| b.to_vec());
                match body {
                    Ok(body) => HttpResponse { status: parts.status, headers: parts.headers, body },
                    Err(_) => HttpResponse {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        headers: HeaderMap::new(),
                        body: Vec::new(),
                    },
                }
            })
            .await
    }
}
