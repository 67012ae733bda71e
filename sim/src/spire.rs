//! A simulated SPIRE: short-lived SVIDs on simulated time, carried on simulated gRPC (which has no
//! TLS) as an issuer-signed token, and turned back into `securepay_kit::PeerSvid` on the server so
//! handlers run exactly the production check, `securepay_kit::authorize` (expiry, identity,
//! per-method allow-list).
//!
//! - [`IssuerKey`]: the issuer's signing key, which is also the trust bundle verifiers hold. A token
//!   is `<not_after unix ms>.<hex HMAC-SHA256>.<spiffe id>` over the id and expiry: a node cannot
//!   forge or extend one without the key, and the key is drawn from the seed.
//! - [`ServerInterceptor`]: drops any `PeerSvid` that arrived on the request (madsim-tonic carries
//!   request extensions across the simulated wire, so a caller could otherwise plant one), verifies
//!   the token in [`SVID_METADATA`] and, only if the signature holds, inserts the `PeerSvid`. It does
//!   not judge expiry — `authorize` does, as in production — unless the planted bug
//!   [`ServerInterceptor::trust_expired_svid`] is switched on.
//! - [`ClientInterceptor`]: attaches the caller's latest SVID token (even an expired one: the server
//!   decides, as a TLS server would with an expired client certificate).
//! - madsim only: [`Issuer`], served on its own node, mints SVIDs for the identity registered for
//!   the caller's node address (node attestation by source address) with `not_after = now + ttl`
//!   on the issuer's clock; [`SimSvidSource`] is a node's `SvidSource`: it renews at half-life and
//!   keeps retrying while the issuer is unreachable, so an outage longer than the TTL leaves the
//!   node without a valid SVID (fail closed) until the issuer is back.

use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use securepay_kit::PeerSvid;
use securepay_ports::Svid;
use sha2::Sha256;
use time::OffsetDateTime;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// gRPC metadata entry carrying the caller's signed SVID token.
pub const SVID_METADATA: &str = "x-securepay-sim-svid";

/// The issuer's key and trust bundle (symmetric in simulation).
#[derive(Clone, PartialEq, Eq)]
pub struct IssuerKey([u8; 32]);

impl std::fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IssuerKey(..)")
    }
}

/// An SVID and the token that proves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedSvid {
    pub svid: Svid,
    pub token: String,
}

impl IssuerKey {
    pub fn new(key: [u8; 32]) -> IssuerKey {
        IssuerKey(key)
    }

    /// A key drawn from the simulation's seeded RNG.
    pub fn from_seed() -> IssuerKey {
        IssuerKey(madsim::rand::random())
    }

    fn mac(&self, spiffe_id: &str, not_after_ms: i128) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(&not_after_ms.to_be_bytes());
        mac.update(spiffe_id.as_bytes());
        mac
    }

    /// Signs `svid`.
    pub fn sign(&self, svid: Svid) -> SignedSvid {
        let not_after_ms = svid.not_after.unix_timestamp_nanos() / 1_000_000;
        let tag = self.mac(&svid.spiffe_id, not_after_ms).finalize().into_bytes();
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let token = format!("{not_after_ms}.{hex}.{}", svid.spiffe_id);
        // The expiry is carried at millisecond precision: the SVID says exactly what the token does.
        let svid = Svid { not_after: from_unix_ms(not_after_ms), ..svid };
        SignedSvid { svid, token }
    }

    /// The SVID a token proves, if it was signed with this key (expired or not).
    pub fn verify(&self, token: &str) -> Option<Svid> {
        let mut parts = token.splitn(3, '.');
        let not_after_ms: i128 = parts.next()?.parse().ok()?;
        let hex = parts.next()?;
        let spiffe_id = parts.next()?;
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let tag: Vec<u8> =
            (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)).collect::<Result<_, _>>().ok()?;
        self.mac(spiffe_id, not_after_ms).verify_slice(&tag).ok()?;
        Some(Svid { spiffe_id: spiffe_id.to_owned(), not_after: from_unix_ms(not_after_ms) })
    }
}

fn from_unix_ms(ms: i128) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Server side: authenticates the caller's SVID token (see the module docs).
#[derive(Debug, Clone)]
pub struct ServerInterceptor {
    bundle: IssuerKey,
    trust_expired: bool,
}

impl ServerInterceptor {
    pub fn new(bundle: IssuerKey) -> ServerInterceptor {
        ServerInterceptor { bundle, trust_expired: false }
    }

    /// PLANTED BUG for the simulator's self-test (off unless a test switches it on): an expired
    /// SVID is passed on as if it were valid for another year, so `authorize` serves it.
    pub fn trust_expired_svid(mut self, on: bool) -> ServerInterceptor {
        self.trust_expired = on;
        self
    }
}

impl Interceptor for ServerInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        // Only what this interceptor verified may reach a handler as the peer's identity.
        request.extensions_mut().remove::<PeerSvid>();
        let token = request.metadata().get(SVID_METADATA).and_then(|v| v.to_str().ok());
        if let Some(mut svid) = token.and_then(|t| self.bundle.verify(t)) {
            if self.trust_expired {
                svid.not_after = svid.not_after.max(OffsetDateTime::now_utc()) + time::Duration::days(365);
            }
            request.extensions_mut().insert(PeerSvid(svid));
        }
        // No or bad token: no PeerSvid, so `authorize` refuses with UNAUTHENTICATED.
        Ok(request)
    }
}

/// The latest SVID of a node, shared by its [`SvidSource`](securepay_ports::SvidSource) and its
/// client interceptors.
pub type SvidCell = Arc<Mutex<Option<SignedSvid>>>;

/// Client side: attaches the node's latest SVID token to every outgoing request.
#[derive(Debug, Clone, Default)]
pub struct ClientInterceptor {
    cell: SvidCell,
}

impl ClientInterceptor {
    pub fn new(cell: SvidCell) -> ClientInterceptor {
        ClientInterceptor { cell }
    }
}

impl Interceptor for ClientInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = self.cell.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|s| s.token.clone());
        if let Some(token) = token {
            let value = MetadataValue::try_from(token).map_err(|_| Status::internal("unencodable SVID token"))?;
            request.metadata_mut().insert(SVID_METADATA, value);
        }
        Ok(request)
    }
}

#[cfg(madsim)]
pub use node::{Audited, ISSUER_PORT, Issuer, SimSvidSource, SvidAudit, Violation};

#[cfg(madsim)]
mod node {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, SocketAddr};
    use std::sync::Arc;
    use std::time::Duration;

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::task::{Context, Poll};

    use async_trait::async_trait;
    use securepay_core::identity::ServiceIdentity;
    use securepay_memory::SimClock;
    use securepay_ports::{Clock, PortResult, Svid, SvidSource, authorize_peer};
    use time::OffsetDateTime;
    use tokio::time::sleep;
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::codegen::{BoxFuture, BoxMessageStream, Service};
    use tonic::transport::NamedService;
    use tonic::{Request, Response, Status};

    use super::{IssuerKey, SVID_METADATA, SignedSvid, SvidCell};
    use crate::remote::{RemoteClient, ServerFaults, serve};

    pub const ISSUER_PORT: u16 = 8081;
    /// How long a node waits before asking an unreachable issuer again.
    const RETRY: Duration = Duration::from_millis(250);
    /// Bound of one fetch.
    const FETCH_TIMEOUT: Duration = Duration::from_millis(500);

    /// The issuer: registration entries (node address → workload) and the signing key.
    #[derive(Debug, Clone)]
    pub struct Issuer {
        key: IssuerKey,
        ttl: Duration,
        entries: Arc<BTreeMap<IpAddr, ServiceIdentity>>,
    }

    impl Issuer {
        pub fn new(key: IssuerKey, ttl: Duration, entries: BTreeMap<IpAddr, ServiceIdentity>) -> Issuer {
            Issuer { key, ttl, entries: Arc::new(entries) }
        }

        /// An SVID for the workload registered at `node`, valid for the TTL from now (the issuer's
        /// own clock), or `None` for an unregistered node.
        pub fn mint(&self, node: IpAddr) -> Option<SignedSvid> {
            let identity = self.entries.get(&node)?;
            let not_after = SimClock.now() + self.ttl;
            Some(self.key.sign(Svid { spiffe_id: identity.spiffe_id().to_owned(), not_after }))
        }

        /// Serves the issuer on the current node (call from the SPIRE node's `init`).
        pub async fn serve(self, addr: SocketAddr, faults: Arc<ServerFaults>) {
            serve(addr, self, faults).await;
        }
    }

    /// A node's `SvidSource`: its latest SVID from the issuer, renewed in the background.
    #[derive(Clone)]
    pub struct SimSvidSource {
        cell: SvidCell,
        clock: Arc<dyn Clock>,
    }

    impl std::fmt::Debug for SimSvidSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("SimSvidSource").field("latest", &self.latest()).finish_non_exhaustive()
        }
    }

    impl SimSvidSource {
        /// Starts fetching and renewing this node's SVID from the issuer at `issuer` (spawned on
        /// the current node, so it dies with it). `clock` is the node's clock, used to judge
        /// whether the SVID is still valid (a skewed node misjudges, as a real one would).
        pub async fn start(issuer: SocketAddr, clock: Arc<dyn Clock>) -> SimSvidSource {
            let client: RemoteClient<Issuer> = RemoteClient::connect(issuer, "spire").await.with_timeout(FETCH_TIMEOUT);
            let cell = SvidCell::default();
            let source = SimSvidSource { cell: Arc::clone(&cell), clock };
            madsim::task::spawn(async move {
                loop {
                    let minted = client
                        .call_with(FETCH_TIMEOUT, |issuer: Issuer, from| async move { issuer.mint(from.ip()) })
                        .await;
                    let wait = match minted {
                        Ok(Some(signed)) => {
                            let left = signed.svid.not_after - SimClock.now();
                            *cell.lock().unwrap_or_else(|p| p.into_inner()) = Some(signed);
                            // Renew at half-life, as SPIRE agents do.
                            Duration::try_from(left / 2).unwrap_or(RETRY).max(RETRY)
                        }
                        // Not registered, or the issuer is unreachable: ask again soon.
                        Ok(None) | Err(_) => RETRY,
                    };
                    sleep(wait).await;
                }
            });
            source
        }

        /// The cell the node's [`ClientInterceptor`](super::ClientInterceptor)s read.
        pub fn cell(&self) -> SvidCell {
            Arc::clone(&self.cell)
        }

        /// The latest SVID, expired or not.
        pub fn latest(&self) -> Option<SignedSvid> {
            self.cell.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
    }

    /// A request a service SERVED (its handler answered `Ok`) although, judged at its arrival by
    /// the serving node's clock, the caller had no valid, unexpired, allow-listed SVID (SPEC §6).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Violation {
        pub method: String,
        pub peer: Option<Svid>,
        pub at: OffsetDateTime,
        pub why: String,
    }

    /// What the [`Audited`] servers of a run saw; one per run, shared by every service node.
    #[derive(Debug, Default)]
    pub struct SvidAudit {
        served: AtomicU64,
        violations: Mutex<Vec<Violation>>,
    }

    impl SvidAudit {
        pub fn new() -> Arc<SvidAudit> {
            Arc::new(SvidAudit::default())
        }

        /// Requests served so far.
        pub fn served(&self) -> u64 {
            self.served.load(Ordering::SeqCst)
        }

        /// Every request served without a valid SVID (empty unless something is broken).
        pub fn violations(&self) -> Vec<Violation> {
            self.violations.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
    }

    /// The observer of the SVID invariant, wrapped around a generated gRPC server (outside its
    /// interceptor): it verifies the caller's token itself and judges it with
    /// `securepay_ports::authorize_peer` at arrival, on the serving node's clock; when the handler
    /// then serves the request (`Ok`), a refusal becomes a [`Violation`]. A handler that forgets
    /// `authorize`, or an interceptor that trusts what it must not, is caught by what was served,
    /// not by how.
    #[derive(Clone)]
    pub struct Audited<S> {
        inner: S,
        bundle: IssuerKey,
        clock: Arc<dyn Clock>,
        audit: Arc<SvidAudit>,
    }

    impl<S> Audited<S> {
        pub fn new(inner: S, bundle: IssuerKey, clock: Arc<dyn Clock>, audit: Arc<SvidAudit>) -> Audited<S> {
            Audited { inner, bundle, clock, audit }
        }
    }

    impl<S: NamedService> NamedService for Audited<S> {
        const NAME: &'static str = S::NAME;
    }

    impl<S> Service<(PathAndQuery, Request<BoxMessageStream>)> for Audited<S>
    where
        S: Service<
                (PathAndQuery, Request<BoxMessageStream>),
                Response = Response<BoxMessageStream>,
                Error = Status,
                Future = BoxFuture<Response<BoxMessageStream>, Status>,
            >,
    {
        type Response = Response<BoxMessageStream>;
        type Error = Status;
        type Future = BoxFuture<Response<BoxMessageStream>, Status>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, (path, request): (PathAndQuery, Request<BoxMessageStream>)) -> Self::Future {
            let token = request.metadata().get(SVID_METADATA).and_then(|v| v.to_str().ok());
            let peer = token.and_then(|t| self.bundle.verify(t));
            let at = self.clock.now();
            let refusal = authorize_peer(peer.as_ref(), path.path(), at).err();
            let method = path.path().to_owned();
            let audit = Arc::clone(&self.audit);
            let served = self.inner.call((path, request));
            Box::pin(async move {
                let response = served.await;
                if response.is_ok() {
                    audit.served.fetch_add(1, Ordering::SeqCst);
                    if let Some(refusal) = refusal {
                        let violation = Violation { method, peer, at, why: refusal.to_string() };
                        audit.violations.lock().unwrap_or_else(|p| p.into_inner()).push(violation);
                    }
                }
                response
            })
        }
    }

    #[async_trait]
    impl SvidSource for SimSvidSource {
        async fn current(&self) -> PortResult<Option<Svid>> {
            let now = self.clock.now();
            Ok(self.latest().map(|s| s.svid).filter(|svid| svid.not_after > now))
        }
    }
}

#[cfg(test)]
mod tests {
    use securepay_core::identity::{ServiceIdentity, method};
    use securepay_core::ids::Subject;
    use securepay_kit::{authorize, with_subject};
    use tonic::Code;

    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::days(19_000)
    }

    fn signed(key: &IssuerKey, who: ServiceIdentity, valid_for: time::Duration) -> SignedSvid {
        key.sign(Svid { spiffe_id: who.spiffe_id().to_owned(), not_after: now() + valid_for })
    }

    /// A request as the server's handler sees it after the client and server interceptors.
    fn through(token: Option<&SignedSvid>, server: ServerInterceptor) -> Request<()> {
        let cell = SvidCell::default();
        *cell.lock().unwrap() = token.cloned();
        let mut request = ClientInterceptor::new(cell).call(Request::new(())).unwrap();
        with_subject(&mut request, &Subject::parse("alice").unwrap());
        let mut server = server;
        server.call(request).unwrap()
    }

    #[test]
    fn a_token_verifies_only_under_its_key_and_unaltered() {
        let key = IssuerKey::new([7; 32]);
        let s = signed(&key, ServiceIdentity::PaymentService, time::Duration::minutes(1));
        assert_eq!(key.verify(&s.token), Some(s.svid.clone()));
        assert_eq!(IssuerKey::new([8; 32]).verify(&s.token), None);
        let other = ServiceIdentity::ApiGateway.spiffe_id();
        let renamed = s.token.replace(ServiceIdentity::PaymentService.spiffe_id(), other);
        assert_eq!(key.verify(&renamed), None, "the identity is signed");
        let (ms, rest) = s.token.split_once('.').unwrap();
        let extended = format!("{}.{rest}", ms.parse::<i128>().unwrap() + 60_000);
        assert_eq!(key.verify(&extended), None, "the expiry is signed");
        for junk in ["", "1.2.3", "x.00.spiffe://a", &s.token[..s.token.len() / 2]] {
            assert_eq!(key.verify(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn the_server_serves_exactly_what_authorize_allows() {
        let key = IssuerKey::new([1; 32]);
        let valid = signed(&key, ServiceIdentity::PaymentService, time::Duration::minutes(1));
        let expired = signed(&key, ServiceIdentity::PaymentService, -time::Duration::seconds(1));
        let notification = signed(&key, ServiceIdentity::NotificationService, time::Duration::minutes(1));
        let forged = signed(&IssuerKey::new([2; 32]), ServiceIdentity::PaymentService, time::Duration::minutes(1));
        let server = ServerInterceptor::new(key.clone());
        let check =
            |r: Request<()>| authorize(&r, method::CHECK_BALANCE, now()).map(|c| c.service).map_err(|s| s.code());
        assert_eq!(check(through(Some(&valid), server.clone())), Ok(ServiceIdentity::PaymentService));
        assert_eq!(check(through(Some(&expired), server.clone())), Err(Code::Unauthenticated));
        assert_eq!(check(through(Some(&notification), server.clone())), Err(Code::PermissionDenied));
        assert_eq!(check(through(Some(&forged), server.clone())), Err(Code::Unauthenticated));
        assert_eq!(check(through(None, server.clone())), Err(Code::Unauthenticated));
        // The planted bug serves the expired SVID.
        let buggy = server.trust_expired_svid(true);
        assert_eq!(check(through(Some(&expired), buggy)), Ok(ServiceIdentity::PaymentService));
    }

    #[test]
    fn a_peer_svid_planted_by_the_caller_is_dropped() {
        let mut request = Request::new(());
        let claimed = Svid { spiffe_id: ServiceIdentity::PaymentService.spiffe_id().into(), not_after: now() };
        request.extensions_mut().insert(PeerSvid(claimed));
        let request = ServerInterceptor::new(IssuerKey::new([1; 32])).call(request).unwrap();
        assert!(request.extensions().get::<PeerSvid>().is_none());
    }
}
