//! This workload's live X.509 identity: a long-lived [`WorkloadIdentity`] over the SPIRE agent's
//! Workload API (`spiffe::X509Source`), kept current by the agent's pushes (SVID rotation, bundle
//! updates) for as long as the process runs.
//!
//! Promises:
//! - Start-up waits a bounded time for the first SVID carrying exactly the expected SPIFFE ID, and
//!   otherwise fails with one line naming the socket and the likely cause (fail closed).
//! - [`WorkloadIdentity::current`] is the SVID in use now, `None` if there is none or it has
//!   expired; it is also the [`SvidSource`] port.
//! - Every SVID the agent pushes sets `securepay_svid_expiry_timestamp_seconds{spiffe_id}` and is
//!   logged once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use securepay_core::identity::ServiceIdentity;
use securepay_ports::{PortResult, Svid, SvidSource};
use spiffe::x509_source::SvidPicker;
use spiffe::{WorkloadApiError, X509Source, X509SourceError, X509Svid};
use time::OffsetDateTime;

use crate::{ENDPOINT_ENV, IdentityError};

/// Gauge: the current SVID's `notAfter` as a Unix timestamp, labelled by `spiffe_id`.
pub const SVID_EXPIRY_GAUGE: &str = "securepay_svid_expiry_timestamp_seconds";

/// How long start-up waits for the first SVID unless told otherwise. The agent answers in
/// milliseconds once it knows the workload; a fresh registration reaches it within a sync or two.
pub const DEFAULT_START_WAIT: Duration = Duration::from_secs(30);

/// This process's X.509-SVID and trust bundle, kept current by the SPIRE agent. Cheap to clone;
/// the last clone dropped stops watching the agent.
#[derive(Clone)]
pub struct WorkloadIdentity {
    inner: Arc<Inner>,
}

struct Inner {
    source: X509Source,
    identity: ServiceIdentity,
    endpoint: String,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl std::fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("identity", &self.inner.identity)
            .field("endpoint", &self.inner.endpoint)
            .finish()
    }
}

/// Selects exactly the SVID of the workload we are; the source never falls back to another one.
struct ExactId(&'static str);

impl SvidPicker for ExactId {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids.iter().position(|svid| svid.spiffe_id().to_string() == self.0)
    }
}

impl WorkloadIdentity {
    /// Starts watching the Workload API named by `SPIFFE_ENDPOINT_SOCKET` for `me`'s SVID,
    /// waiting at most [`DEFAULT_START_WAIT`] for the first one.
    pub async fn from_env(me: ServiceIdentity) -> Result<Self, IdentityError> {
        match std::env::var(ENDPOINT_ENV) {
            Ok(endpoint) if !endpoint.is_empty() => Self::connect(&endpoint, me, DEFAULT_START_WAIT).await,
            _ => Err(IdentityError::EndpointNotConfigured),
        }
    }

    /// Starts watching the Workload API at `endpoint` (`unix:///path/api.sock`) for the SVID whose
    /// SPIFFE ID is `me`'s, waiting at most `wait` for the first one. An agent that issues this
    /// process other identities only is the same failure as one that issues none.
    pub async fn connect(endpoint: &str, me: ServiceIdentity, wait: Duration) -> Result<Self, IdentityError> {
        let not_within = || IdentityError::NoSvidWithin {
            spiffe_id: me.spiffe_id(),
            endpoint: endpoint.to_owned(),
            secs: wait.as_secs().max(1),
        };
        let build = X509Source::builder()
            .endpoint(endpoint)
            .picker(ExactId(me.spiffe_id()))
            .reconnect_backoff(Duration::from_millis(200), Duration::from_secs(5))
            .initial_sync_timeout(wait)
            .build();
        // The builder bounds its own wait; this outer bound only guards against a hung connect.
        let source = match tokio::time::timeout(wait + Duration::from_secs(1), build).await {
            Err(_) => return Err(not_within()),
            Ok(Ok(source)) => source,
            Ok(Err(X509SourceError::Source(WorkloadApiError::Endpoint(reason)))) => {
                return Err(IdentityError::InvalidEndpoint {
                    endpoint: endpoint.to_owned(),
                    reason: reason.to_string(),
                });
            }
            Ok(Err(X509SourceError::InitialSyncTimeout | X509SourceError::NoSuitableSvid)) => {
                return Err(not_within());
            }
            Ok(Err(other)) => {
                return Err(IdentityError::AgentUnreachable {
                    endpoint: endpoint.to_owned(),
                    reason: other.to_string(),
                });
            }
        };
        let watcher = tokio::spawn(watch_rotations(source.clone()));
        Ok(Self { inner: Arc::new(Inner { source, identity: me, endpoint: endpoint.to_owned(), watcher }) })
    }

    /// The workload this identity is for.
    pub fn identity(&self) -> ServiceIdentity {
        self.inner.identity
    }

    /// The Workload API endpoint this identity is watched from.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The SVID in use now; `None` when the agent has withdrawn it or it has expired (fail closed).
    pub fn current(&self) -> Option<Svid> {
        let svid = self.inner.source.try_svid()?;
        summary_of(&svid).ok().filter(|svid| svid.not_after > OffsetDateTime::now_utc())
    }

    /// The live source (SVID + bundle), for TLS configurations built from it ([`crate::grpc`]).
    pub fn source(&self) -> &X509Source {
        &self.inner.source
    }
}

#[async_trait]
impl SvidSource for WorkloadIdentity {
    async fn current(&self) -> PortResult<Option<Svid>> {
        Ok(WorkloadIdentity::current(self))
    }
}

/// The SPIFFE ID and `notAfter` of an SVID's leaf certificate.
pub fn summary_of(svid: &X509Svid) -> Result<Svid, IdentityError> {
    let not_after = leaf_not_after(svid.leaf().as_ref())?;
    Ok(Svid { spiffe_id: svid.spiffe_id().to_string(), not_after })
}

/// `notAfter` of a DER certificate.
pub fn leaf_not_after(der: &[u8]) -> Result<OffsetDateTime, IdentityError> {
    let (_, leaf) = x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::InvalidSvid(e.to_string()))?;
    OffsetDateTime::from_unix_timestamp(leaf.validity().not_after.timestamp())
        .map_err(|e| IdentityError::InvalidSvid(e.to_string()))
}

/// Records every SVID the agent pushes (gauge + one log line) until the source closes.
async fn watch_rotations(source: X509Source) {
    let mut updates = source.updated();
    let mut last: Option<Svid> = None;
    loop {
        match source.try_svid().map(|svid| summary_of(&svid)) {
            Some(Ok(svid)) if last.as_ref() != Some(&svid) => {
                let expires_at = svid.not_after.unix_timestamp();
                metrics::gauge!(SVID_EXPIRY_GAUGE, "spiffe_id" => svid.spiffe_id.clone()).set(expires_at as f64);
                tracing::info!(spiffe_id = %svid.spiffe_id, expires_at, "X.509-SVID in use");
                last = Some(svid);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::error!(error = %e, "the SPIRE agent pushed an unusable X.509-SVID"),
            None => tracing::error!("the SPIRE agent withdrew this workload's X.509-SVID: new connections fail"),
        }
        if updates.changed().await.is_err() {
            tracing::warn!("the Workload API source closed: SVIDs no longer rotate");
            return;
        }
    }
}
