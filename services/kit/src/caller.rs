//! Who is calling: the authenticated workload (by SVID, per method) and the end user it acts for.
//!
//! The transport authenticates the peer and leaves its SVID on the request as a [`PeerSvid`]
//! extension: the production mTLS acceptor from the verified client certificate, the simulator's
//! interceptor from the simulated issuer, or — in in-process tests only — `claimed`. Handlers
//! then call [`authorize`] with their method path; nothing else decides whether a call is served.

use securepay_core::identity::ServiceIdentity;
use securepay_core::ids::Subject;
use securepay_ports::{PeerRefusal, Svid, authorize_peer};
use time::OffsetDateTime;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

use crate::metrics;

/// gRPC metadata entry carrying the end-user subject the gateway verified (SPEC §5).
pub const SUBJECT_METADATA: &str = "x-securepay-subject";

/// The peer's SVID as authenticated by the transport (a request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSvid(pub Svid);

/// An authorized call: the workload that made it and the end user it acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub service: ServiceIdentity,
    pub subject: Subject,
}

/// Authorizes `request` for `method` (a `securepay_core::identity::method` path) at `now`:
/// the peer must present an unexpired SVID whose SPIFFE ID the allow-list admits for the method,
/// and must name the end-user subject it acts for. Refusals are counted and carry no internals:
/// `UNAUTHENTICATED` without an SVID or subject, `PERMISSION_DENIED` otherwise.
pub fn authorize<T>(request: &Request<T>, method: &str, now: OffsetDateTime) -> Result<Caller, Status> {
    let peer = request.extensions().get::<PeerSvid>().map(|p| &p.0);
    let service = authorize_peer(peer, method, now).map_err(|refusal| {
        let reason = match refusal {
            PeerRefusal::NoSvid => "svid_missing",
            PeerRefusal::Expired => "svid_expired",
            PeerRefusal::UnknownIdentity => "peer_unknown",
            PeerRefusal::MethodNotAllowed => "peer_not_allowed",
        };
        metrics::auth_failure(reason);
        tracing::warn!(method, reason, peer = peer.map(|p| p.spiffe_id.as_str()), "refused a gRPC caller");
        match refusal {
            PeerRefusal::NoSvid => Status::unauthenticated("an X.509-SVID is required"),
            PeerRefusal::Expired => Status::unauthenticated("the presented SVID has expired"),
            PeerRefusal::UnknownIdentity | PeerRefusal::MethodNotAllowed => {
                Status::permission_denied("this workload may not call this method")
            }
        }
    })?;
    let subject = request
        .metadata()
        .get(SUBJECT_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|text| Subject::parse(text).ok())
        .ok_or_else(|| {
            metrics::auth_failure("subject_missing");
            Status::unauthenticated("the end-user subject is missing or malformed")
        })?;
    Ok(Caller { service, subject })
}

/// Puts the end-user subject on an outgoing request (the gateway, and the payment service acting
/// for the same subject towards the account service).
pub fn with_subject<T>(request: &mut Request<T>, subject: &Subject) {
    let value = MetadataValue::try_from(subject.as_str()).expect("a Subject is visible ASCII, a valid metadata value");
    request.metadata_mut().insert(SUBJECT_METADATA, value);
}

/// TESTS ONLY (feature `test-support`): plaintext gRPC where the caller *claims* its SPIFFE ID in
/// a metadata entry, for in-process tests of handlers and clients. Nothing is authenticated, so no
/// binary can use it: services serve and dial only through the mTLS transport of
/// `securepay-identity`, and nothing switches this on at run time.
#[cfg(any(test, feature = "test-support"))]
pub mod claimed {
    use securepay_core::identity::ServiceIdentity;
    use securepay_ports::Svid;
    use time::OffsetDateTime;
    use tonic::metadata::MetadataValue;
    use tonic::service::Interceptor;
    use tonic::{Request, Status};

    use super::PeerSvid;

    /// Metadata entry in which a test caller claims its SPIFFE ID.
    pub const PEER_METADATA: &str = "x-securepay-test-claimed-peer";

    /// Server side: turns the claimed SPIFFE ID into a [`PeerSvid`] (valid for a year), so that
    /// `authorize` applies the same per-method allow-list as with real SVIDs.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct ServerInterceptor;

    impl Interceptor for ServerInterceptor {
        fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
            let claimed = request.metadata().get(PEER_METADATA).and_then(|v| v.to_str().ok()).map(str::to_owned);
            if let Some(spiffe_id) = claimed {
                let not_after = OffsetDateTime::now_utc() + time::Duration::days(365);
                request.extensions_mut().insert(PeerSvid(Svid { spiffe_id, not_after }));
            }
            Ok(request)
        }
    }

    /// Client side: claims `identity` on every outgoing request.
    #[derive(Debug, Clone, Copy)]
    pub struct ClientInterceptor(pub ServiceIdentity);

    impl Interceptor for ClientInterceptor {
        fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
            request.metadata_mut().insert(PEER_METADATA, MetadataValue::from_static(self.0.spiffe_id()));
            Ok(request)
        }
    }
}

#[cfg(test)]
mod tests {
    use securepay_core::identity::method;
    use tonic::Code;
    use tonic::service::Interceptor;

    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000)
    }

    fn request(peer: Option<ServiceIdentity>, expires_in: time::Duration, subject: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(peer) = peer {
            let svid = Svid { spiffe_id: peer.spiffe_id().to_owned(), not_after: now() + expires_in };
            request.extensions_mut().insert(PeerSvid(svid));
        }
        if let Some(subject) = subject {
            request.metadata_mut().insert(SUBJECT_METADATA, subject.parse().unwrap());
        }
        request
    }

    #[test]
    fn an_allowed_peer_with_a_subject_is_served() {
        let r = request(Some(ServiceIdentity::ApiGateway), time::Duration::minutes(5), Some("alice"));
        let caller = authorize(&r, method::INITIATE_PAYMENT, now()).unwrap();
        assert_eq!(caller, Caller { service: ServiceIdentity::ApiGateway, subject: Subject::parse("alice").unwrap() });
    }

    #[test]
    fn every_refusal_has_its_status() {
        let minutes = time::Duration::minutes(5);
        let cases = [
            (request(None, minutes, Some("alice")), method::GET_PAYMENT, Code::Unauthenticated),
            (
                request(Some(ServiceIdentity::ApiGateway), -minutes, Some("alice")),
                method::GET_PAYMENT,
                Code::Unauthenticated,
            ),
            (
                request(Some(ServiceIdentity::NotificationService), minutes, Some("alice")),
                method::GET_BALANCE,
                Code::PermissionDenied,
            ),
            (
                request(Some(ServiceIdentity::PaymentService), minutes, Some("alice")),
                method::GET_BALANCE,
                Code::PermissionDenied,
            ),
            (request(Some(ServiceIdentity::ApiGateway), minutes, None), method::GET_BALANCE, Code::Unauthenticated),
            (
                request(Some(ServiceIdentity::ApiGateway), minutes, Some("a b")),
                method::GET_BALANCE,
                Code::Unauthenticated,
            ),
        ];
        for (i, (r, m, code)) in cases.into_iter().enumerate() {
            assert_eq!(authorize(&r, m, now()).unwrap_err().code(), code, "case {i}");
        }
    }

    #[test]
    fn claimed_identities_go_through_the_same_allow_list() {
        let mut r = claimed::ClientInterceptor(ServiceIdentity::PaymentService).call(Request::new(())).unwrap();
        with_subject(&mut r, &Subject::parse("bob").unwrap());
        let r = claimed::ServerInterceptor.call(r).unwrap();
        let at = OffsetDateTime::now_utc();
        assert_eq!(authorize(&r, method::CHECK_BALANCE, at).unwrap().service, ServiceIdentity::PaymentService);
        assert_eq!(authorize(&r, method::GET_BALANCE, at).unwrap_err().code(), Code::PermissionDenied);
    }
}
