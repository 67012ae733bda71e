//! The zero-trust gRPC transport (SPEC §2): every hop is mTLS with X.509-SVIDs from the SPIRE
//! agent, the trust domain is pinned to `securepay.dev`, and nothing else is served or dialled.
//!
//! - [`serve`] runs tonic services on a listener that completes only mTLS handshakes: the client
//!   must present a certificate that chains to the trust domain's current bundle and names one of
//!   the four SecurePay workloads. Plaintext, foreign and expired clients fail the handshake. The
//!   verified peer (SPIFFE ID from the URI SAN, the leaf's `notAfter`) reaches every request as a
//!   [`PeerSvid`] extension, and handlers authorize per method with `securepay_kit::authorize`.
//! - [`channel`] dials a service over mTLS and refuses any server whose SVID is not exactly the
//!   expected workload's. It is a [`ResendingChannel`]: a call that its connection closed before
//!   sending (the server's GOAWAY racing the dispatch) is sent again on a new connection.
//!
//! Rotation: both sides resolve the current SVID and bundle at each handshake, so rotated SVIDs
//! take effect without a restart. A connection is never used past the certificates it was opened
//! with: the server closes each connection gracefully (HTTP/2 GOAWAY, in-flight calls finish)
//! after a quarter of its SVID's lifetime, at most [`MAX_CONNECTION_AGE_CAP`]; clients reconnect
//! with their current SVID.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use securepay_core::identity::{ServiceIdentity, TRUST_DOMAIN};
use securepay_kit::PeerSvid;
use securepay_ports::Svid;
use spiffe_rustls::{LocalOnly, SpiffeId, TrustDomain, authorizer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::StreamExt as _;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Server};
use x509_parser::extensions::GeneralName;

use crate::x509::{WorkloadIdentity, leaf_not_after};

/// A client that has not completed its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on how long one connection is used, whatever the SVID lifetime.
pub const MAX_CONNECTION_AGE_CAP: Duration = Duration::from_secs(300);
/// Connecting (TCP + handshake) to a service gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ALPN_H2: &[u8] = b"h2";

/// Why the transport could not be set up or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("the mTLS configuration could not be built from the current SVID: {0}")]
    Tls(String),
    #[error("{0} is not a gRPC address (expected host:port)")]
    Address(String),
    #[error("the gRPC server failed: {0}")]
    Serve(String),
}

/// Serves `routes` on `listener` over mTLS only, as `workload`, until `shutdown` completes; then
/// stops accepting and waits for open calls to finish. `server` carries the caller's settings
/// (request timeout, concurrency limits...); the transport adds the connection age. Do not set
/// `max_connection_age_grace` on it: tonic 0.14 then never closes connections gracefully.
///
/// ```ignore
/// let routes = Routes::new(AccountServiceServer::new(service));
/// let server = Server::builder().timeout(GRPC_REQUEST_TIMEOUT);
/// securepay_identity::grpc::serve(server, routes, listener, &workload, shutdown).await?;
/// ```
pub async fn serve<F>(
    server: Server,
    routes: Routes,
    listener: TcpListener,
    workload: &WorkloadIdentity,
    shutdown: F,
) -> Result<(), TransportError>
where
    F: Future<Output = ()>,
{
    let max_age = connection_max_age(workload)?;
    let acceptor = TlsAcceptor::from(Arc::new(server_config(workload)?));
    let (tx, rx) = tokio::sync::mpsc::channel::<MtlsStream>(64);
    let accepting = AbortOnDrop(tokio::spawn(accept_loop(listener, acceptor, tx)));
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
    let served = server
        .max_connection_age(max_age)
        // No `max_connection_age_grace`: with it, tonic 0.14 skips the graceful GOAWAY at
        // `max_connection_age` and only cuts the connection after age + grace.
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    drop(accepting);
    served.map_err(|e| TransportError::Serve(e.to_string()))
}

/// A lazily connecting channel to `addr` (`host:port`) that accepts only a server presenting
/// `server`'s SVID. Each new connection presents `workload`'s current SVID.
pub fn channel(
    addr: &str,
    server: ServiceIdentity,
    workload: &WorkloadIdentity,
) -> Result<ResendingChannel, TransportError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| TransportError::Address(addr.to_owned()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let config = client_config(server, workload)?;
    let channel = endpoint.connect_with_connector_lazy(SpiffeConnector { tls: TlsConnector::from(Arc::new(config)) });
    Ok(ResendingChannel::from(channel))
}

/// How often one call is handed to a connection before its "connection closed" is the answer.
pub const SEND_ATTEMPTS: usize = 3;

/// A tonic [`Channel`] that sends a call again when its HTTP/2 connection closed before the call
/// was written to it. Servers close connections on purpose (each one lives a quarter of the SVID
/// lifetime, see [`serve`]); a call dispatched to a connection just as its GOAWAY arrives is
/// dropped unsent (tonic reports `Cancelled: connection closed`), and one that opened a stream the
/// server's GOAWAY declares unprocessed fails with `h2 protocol error: ... NO_ERROR`. Only those
/// two errors are resent (see [`never_sent`]): both prove the server never saw the call, so
/// resending is safe for every method, idempotent or not.
///
/// Unary calls only (all SecurePay RPCs are): the request body is buffered to be resendable.
#[derive(Clone, Debug)]
pub struct ResendingChannel {
    inner: Channel,
}

impl From<Channel> for ResendingChannel {
    /// Wraps any channel: production's mTLS one (from [`channel`]) or a test's plaintext one.
    fn from(inner: Channel) -> Self {
        ResendingChannel { inner }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Request<tonic::body::Body>> for ResendingChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower_service::Service::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // The ready channel goes with the call; `self` keeps a fresh clone for the next one.
        let fresh = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, fresh);
        Box::pin(async move {
            use http_body_util::BodyExt as _;
            let (parts, body) = request.into_parts();
            let body = body.collect().await.map_err(BoxError::from)?.to_bytes();
            let mut attempt = 1;
            loop {
                let request = http::Request::from_parts(parts.clone(), resendable(body.clone()));
                match tower_service::Service::call(&mut ready, request).await {
                    Err(error) if attempt < SEND_ATTEMPTS && never_sent(&error) => {
                        tracing::debug!(attempt, %error, "the connection closed before sending the call; resending");
                        attempt += 1;
                        std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut ready, cx)).await?;
                    }
                    answer => return answer.map_err(Into::into),
                }
            }
        })
    }
}

fn resendable(body: bytes::Bytes) -> tonic::body::Body {
    tonic::body::Body::new(http_body_util::Full::new(body))
}

/// Whether `error` proves the call never reached the server, so sending it again cannot apply it
/// twice:
/// - hyper's "canceled": the request was dropped before it was written to the connection;
/// - h2's graceful remote GOAWAY (`NO_ERROR`): h2 fails with it only the streams the server
///   declared unprocessed (ids above the GOAWAY's last stream id, RFC 9113 §6.8) and the streams
///   opened after it; a stream the server may have processed ends with a broken pipe instead.
fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(hyper) = e.downcast_ref::<hyper::Error>()
            && hyper.is_canceled()
        {
            return true;
        }
        if let Some(stream) = e.downcast_ref::<h2::Error>() {
            return stream.is_go_away() && stream.is_remote() && stream.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = e.source();
    }
    false
}

fn trust_domain() -> Result<TrustDomain, TransportError> {
    TrustDomain::new(TRUST_DOMAIN).map_err(|e| TransportError::Tls(e.to_string()))
}

/// Client certificate required and verified against our trust domain's bundle only; any of the
/// four workloads passes the handshake (per-method authorization happens in the handlers).
fn server_config(workload: &WorkloadIdentity) -> Result<rustls::ServerConfig, TransportError> {
    spiffe_rustls::mtls_server(workload.source().clone())
        .authorize(|peer: &SpiffeId| ServiceIdentity::from_spiffe_id(&peer.to_string()).is_some())
        .trust_domain_policy(LocalOnly(trust_domain()?))
        .with_alpn_protocols([ALPN_H2])
        .build()
        .map_err(|e| TransportError::Tls(e.to_string()))
}

/// The server must present exactly `server`'s SPIFFE ID from our trust domain.
fn client_config(server: ServiceIdentity, workload: &WorkloadIdentity) -> Result<rustls::ClientConfig, TransportError> {
    let exact = authorizer::exact([server.spiffe_id()]).map_err(|e| TransportError::Tls(e.to_string()))?;
    spiffe_rustls::mtls_client(workload.source().clone())
        .authorize(exact)
        .trust_domain_policy(LocalOnly(trust_domain()?))
        .with_alpn_protocols([ALPN_H2])
        .build()
        .map_err(|e| TransportError::Tls(e.to_string()))
}

/// A quarter of our SVID's lifetime: the agent rotates at half-life, so a connection opened with
/// any SVID of the same lifetime closes well before that SVID expires.
fn connection_max_age(workload: &WorkloadIdentity) -> Result<Duration, TransportError> {
    let svid = workload.source().svid().map_err(|e| TransportError::Tls(e.to_string()))?;
    let (_, leaf) =
        x509_parser::parse_x509_certificate(svid.leaf().as_ref()).map_err(|e| TransportError::Tls(e.to_string()))?;
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    let quarter = Duration::from_secs(u64::try_from(lifetime / 4).unwrap_or(0).max(1));
    Ok(quarter.min(MAX_CONNECTION_AGE_CAP))
}

/// Accepts TCP connections and completes mTLS handshakes concurrently (a slow or hostile client
/// never delays others); only verified connections reach tonic.
async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, verified: tokio::sync::mpsc::Sender<MtlsStream>) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a gRPC connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if verified.is_closed() {
            return;
        }
        let _ = tcp.set_nodelay(true);
        let (acceptor, verified) = (acceptor.clone(), verified.clone());
        tokio::spawn(async move {
            let refused = |reason: &'static str, detail: String| {
                securepay_kit::metrics::auth_failure(reason);
                tracing::warn!(%remote, reason, detail, "refused a gRPC connection");
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Err(_) => refused("tls_handshake_timeout", String::new()),
                Ok(Err(e)) => refused("tls_handshake_failed", e.to_string()),
                Ok(Ok(tls)) => match verified_peer(&tls) {
                    Some(peer) => {
                        let _ = verified.send(MtlsStream { tls, peer: PeerSvid(peer) }).await;
                    }
                    None => refused("tls_peer_unreadable", String::new()),
                },
            }
        });
    }
}

/// The client's SPIFFE ID and `notAfter`, from the leaf certificate the handshake verified.
fn verified_peer(tls: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<Svid> {
    let leaf = tls.get_ref().1.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|name| match name {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let spiffe_id = uris.next().filter(|uri| uri.starts_with("spiffe://"))?.to_owned();
    if uris.next().is_some() {
        return None; // an X.509-SVID has exactly one URI SAN
    }
    Some(Svid { spiffe_id, not_after: leaf_not_after(leaf.as_ref()).ok()? })
}

/// A verified mTLS connection; tonic puts its [`PeerSvid`] on every request made over it.
struct MtlsStream {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerSvid,
}

impl Connected for MtlsStream {
    type ConnectInfo = PeerSvid;

    fn connect_info(&self) -> PeerSvid {
        self.peer.clone()
    }
}

impl AsyncRead for MtlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// Dials TCP and completes the mTLS handshake with the current SVID, for tonic's channel.
#[derive(Clone)]
struct SpiffeConnector {
    tls: TlsConnector,
}

impl tower_service::Service<http::Uri> for SpiffeConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri} has no host:port"));
            let host = uri.host().ok_or_else(invalid)?.trim_matches(['[', ']']).to_owned();
            let port = uri.port_u16().ok_or_else(invalid)?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // The server is identified by the SPIFFE ID in its SVID; the name only fills SNI.
            let name = rustls::pki_types::ServerName::try_from(host).map_err(|_| invalid())?;
            Ok(TokioIo::new(tls.connect(name, tcp).await?))
        })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
