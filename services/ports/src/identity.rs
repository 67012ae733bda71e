//! Workload identity: our own X.509-SVID, and the verification of a peer's.

use async_trait::async_trait;
use securepay_core::identity::ServiceIdentity;
use time::OffsetDateTime;

use crate::error::PortResult;

/// The identity a workload presents, as the verifier sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Svid {
    /// The SPIFFE ID in the certificate's URI SAN.
    pub spiffe_id: String,
    pub not_after: OffsetDateTime,
}

/// Our own SVID. Real: the SPIRE agent's Workload API (rotates before expiry, pushed to us).
/// Simulated: a simulated SPIRE issuer on simulated time. `None` (no SVID, or expired) means the
/// service must not serve or call (fail closed).
#[async_trait]
pub trait SvidSource: Send + Sync + 'static {
    async fn current(&self) -> PortResult<Option<Svid>>;
}

/// Why a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    #[error("no client certificate")]
    NoSvid,
    #[error("SVID expired")]
    Expired,
    #[error("SPIFFE ID is not a SecurePay workload")]
    UnknownIdentity,
    #[error("caller may not invoke this method")]
    MethodNotAllowed,
}

/// Authorizes a caller per method (SPEC §2). The same function runs in the production mTLS
/// interceptor (peer from the verified client certificate) and in the simulator's interceptor (peer
/// from the simulated SVID), so both refuse exactly the same callers.
pub fn authorize_peer(peer: Option<&Svid>, method: &str, now: OffsetDateTime) -> Result<ServiceIdentity, PeerRefusal> {
    let peer = peer.ok_or(PeerRefusal::NoSvid)?;
    if peer.not_after <= now {
        return Err(PeerRefusal::Expired);
    }
    let caller = ServiceIdentity::from_spiffe_id(&peer.spiffe_id).ok_or(PeerRefusal::UnknownIdentity)?;
    if securepay_core::identity::is_allowed(method, caller) { Ok(caller) } else { Err(PeerRefusal::MethodNotAllowed) }
}

#[cfg(test)]
mod tests {
    use securepay_core::identity::method;
    use time::Duration;

    use super::*;

    fn svid(who: ServiceIdentity, not_after: OffsetDateTime) -> Svid {
        Svid { spiffe_id: who.spiffe_id().to_owned(), not_after }
    }

    #[test]
    fn only_allowed_unexpired_workloads_are_served() {
        let now = OffsetDateTime::UNIX_EPOCH + Duration::days(1);
        let later = now + Duration::minutes(5);
        let gateway = svid(ServiceIdentity::ApiGateway, later);
        assert_eq!(authorize_peer(Some(&gateway), method::INITIATE_PAYMENT, now), Ok(ServiceIdentity::ApiGateway));
        assert_eq!(authorize_peer(None, method::INITIATE_PAYMENT, now), Err(PeerRefusal::NoSvid));
        let expired = svid(ServiceIdentity::ApiGateway, now);
        assert_eq!(authorize_peer(Some(&expired), method::INITIATE_PAYMENT, now), Err(PeerRefusal::Expired));
        let notification = svid(ServiceIdentity::NotificationService, later);
        assert_eq!(authorize_peer(Some(&notification), method::GET_BALANCE, now), Err(PeerRefusal::MethodNotAllowed));
        let stranger = Svid { spiffe_id: "spiffe://evil.dev/api-gateway".into(), not_after: later };
        assert_eq!(authorize_peer(Some(&stranger), method::GET_BALANCE, now), Err(PeerRefusal::UnknownIdentity));
    }
}
