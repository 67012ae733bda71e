//! This workload's identity: the X.509-SVID the SPIRE agent's Workload API issues to the calling
//! process, found through `SPIFFE_ENDPOINT_SOCKET` (SPEC §2).
//!
//! The agent decides who the caller is from the kernel (unix attestor: the binary's path), so a
//! process that is not one of the four services gets no SVID and every caller here fails closed:
//! an error is returned, never a default identity.
//!
//! - [`x509`]: the live identity a service holds while it runs (rotation pushed by the agent).
//! - [`grpc`]: the zero-trust gRPC transport built on it — mTLS server and client channels whose
//!   every handshake uses the current SVID, trust domain pinned, peers identified by SPIFFE ID.
//!
//! Architecture invariant: no service logic; only the Workload API client, the transport, and the
//! summary of what was issued. Under `--cfg madsim` the real client is not compiled and every fetch fails with
//! [`IdentityError::Unsupported`]; the simulator issues SVIDs through its own port.

#[cfg(not(madsim))]
pub mod grpc;
#[cfg(all(not(madsim), feature = "testing"))]
pub mod testing;
#[cfg(not(madsim))]
pub mod x509;

use securepay_core::identity::TRUST_DOMAIN;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The environment variable naming the Workload API endpoint, e.g. `unix:///run/spire/api.sock`.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// The argument that makes a service binary print its identity and exit (`securepay-gateway identity`).
pub const IDENTITY_SUBCOMMAND: &str = "identity";

/// Upper bound on connecting to the agent plus one fetch; the agent answers in milliseconds when up.
pub const FETCH_TIMEOUT_MS_MAX: u64 = 10_000;

/// What the agent issued: the SPIFFE ID in the SVID's leaf certificate and when that certificate expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidSummary {
    pub spiffe_id: String,
    pub expires_at: OffsetDateTime,
}

impl SvidSummary {
    /// One JSON line: `{"spiffe_id":"spiffe://securepay.dev/api-gateway","expires_at":"2026-11-27T01:00:00Z"}`.
    pub fn to_json_line(&self) -> String {
        let expires_at = self.expires_at.format(&Rfc3339).unwrap_or_else(|_| self.expires_at.to_string());
        serde_json::json!({ "spiffe_id": self.spiffe_id, "expires_at": expires_at }).to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{ENDPOINT_ENV} is not set: there is no Workload API to ask for an identity")]
    EndpointNotConfigured,
    #[error("{ENDPOINT_ENV}={endpoint} is not a Workload API endpoint: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    #[error("the SPIRE agent at {endpoint} could not be reached: {reason}")]
    AgentUnreachable { endpoint: String, reason: String },
    #[error("the SPIRE agent issued no identity to this process (no registration entry matches it)")]
    NoIdentityIssued,
    #[error("the SPIRE agent refused an identity: {0}")]
    PermissionDenied(String),
    #[error(
        "no X.509-SVID for {spiffe_id} from the SPIRE agent at {endpoint} within {secs} s: is the agent running and is this binary registered?"
    )]
    NoSvidWithin { spiffe_id: &'static str, endpoint: String, secs: u64 },
    #[error("the Workload API did not answer within {FETCH_TIMEOUT_MS_MAX} ms")]
    Timeout,
    #[error("the Workload API returned an unusable SVID: {0}")]
    InvalidSvid(String),
    #[error("the SVID names {0}, which is outside the trust domain {TRUST_DOMAIN}")]
    ForeignTrustDomain(String),
    #[error("the Workload API is not available in the simulator (--cfg madsim)")]
    Unsupported,
}

/// Fetches this process's X.509-SVID from the endpoint named by `SPIFFE_ENDPOINT_SOCKET`.
pub async fn fetch_x509_svid_from_env() -> Result<SvidSummary, IdentityError> {
    match std::env::var(ENDPOINT_ENV) {
        Ok(endpoint) if !endpoint.is_empty() => fetch_x509_svid(&endpoint).await,
        _ => Err(IdentityError::EndpointNotConfigured),
    }
}

/// Fetches this process's X.509-SVID from `endpoint` (`unix:///path/to/api.sock`).
#[cfg(not(madsim))]
pub async fn fetch_x509_svid(endpoint: &str) -> Result<SvidSummary, IdentityError> {
    let timeout = std::time::Duration::from_millis(FETCH_TIMEOUT_MS_MAX);
    let fetched =
        tokio::time::timeout(timeout, fetch_unbounded(endpoint)).await.map_err(|_| IdentityError::Timeout)??;
    check_trust_domain(fetched)
}

/// Fetches this process's X.509-SVID: always [`IdentityError::Unsupported`] under the simulator.
#[cfg(madsim)]
pub async fn fetch_x509_svid(_endpoint: &str) -> Result<SvidSummary, IdentityError> {
    Err(IdentityError::Unsupported)
}

#[cfg(not(madsim))]
async fn fetch_unbounded(endpoint: &str) -> Result<SvidSummary, IdentityError> {
    use spiffe::{WorkloadApiClient, WorkloadApiError};

    let client = WorkloadApiClient::connect_to(endpoint).await.map_err(|e| match e {
        WorkloadApiError::Endpoint(reason) => {
            IdentityError::InvalidEndpoint { endpoint: endpoint.to_owned(), reason: reason.to_string() }
        }
        other => IdentityError::AgentUnreachable { endpoint: endpoint.to_owned(), reason: other.to_string() },
    })?;
    let svid = client.fetch_x509_svid().await.map_err(|e| match e {
        WorkloadApiError::NoIdentityIssued | WorkloadApiError::EmptyResponse => IdentityError::NoIdentityIssued,
        WorkloadApiError::PermissionDenied(reason) => IdentityError::PermissionDenied(reason),
        WorkloadApiError::Transport(reason) => {
            IdentityError::AgentUnreachable { endpoint: endpoint.to_owned(), reason: reason.to_string() }
        }
        other => IdentityError::InvalidSvid(other.to_string()),
    })?;
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_ref())
        .map_err(|e| IdentityError::InvalidSvid(e.to_string()))?;
    let expires_at = OffsetDateTime::from_unix_timestamp(leaf.validity().not_after.timestamp())
        .map_err(|e| IdentityError::InvalidSvid(e.to_string()))?;
    Ok(SvidSummary { spiffe_id: svid.spiffe_id().to_string(), expires_at })
}

/// A workload of ours only ever accepts an identity in our own trust domain (fail closed).
#[cfg_attr(madsim, allow(dead_code))]
fn check_trust_domain(svid: SvidSummary) -> Result<SvidSummary, IdentityError> {
    let in_domain = svid
        .spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split('/').next())
        .is_some_and(|domain| domain == TRUST_DOMAIN);
    if in_domain { Ok(svid) } else { Err(IdentityError::ForeignTrustDomain(svid.spiffe_id)) }
}

/// The `identity` subcommand of every service binary: prints the SVID summary as one JSON line on
/// stdout and returns exit code 0, or prints the reason on stderr and returns 1 (fail closed).
pub async fn identity_command() -> i32 {
    match fetch_x509_svid_from_env().await {
        Ok(svid) => {
            println!("{}", svid.to_json_line());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(id: &str) -> SvidSummary {
        SvidSummary { spiffe_id: id.to_owned(), expires_at: OffsetDateTime::UNIX_EPOCH }
    }

    #[test]
    fn json_line_carries_the_spiffe_id_and_an_rfc3339_expiry() {
        let line = summary("spiffe://securepay.dev/api-gateway").to_json_line();
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["spiffe_id"], "spiffe://securepay.dev/api-gateway");
        assert_eq!(parsed["expires_at"], "1970-01-01T00:00:00Z");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn an_svid_from_another_trust_domain_is_refused() {
        assert!(check_trust_domain(summary("spiffe://securepay.dev/payment-service")).is_ok());
        for foreign in ["spiffe://evil.dev/payment-service", "spiffe://securepay.dev.evil.dev/x", "securepay.dev/x"] {
            assert!(matches!(check_trust_domain(summary(foreign)), Err(IdentityError::ForeignTrustDomain(_))));
        }
    }

    #[tokio::test]
    async fn a_missing_agent_socket_is_an_error_not_an_identity() {
        let err = fetch_x509_svid("unix:///nonexistent/securepay/api.sock").await.unwrap_err();
        assert!(matches!(err, IdentityError::AgentUnreachable { .. }), "{err}");
    }
}
