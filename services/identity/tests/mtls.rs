//! The zero-trust transport against the real SPIRE of the test platform: this test executable is
//! registered as the four workloads, serves a tiny account.v1 server over `grpc::serve` and calls
//! it over `grpc::channel`. Who may call what is decided by `securepay_kit::authorize` in the
//! handler, from the peer SVID the mTLS handshake verified.
//!
//! One test function: the scenarios share one set of registration entries, created at the start
//! and deleted at the end.

mod support;

use std::time::Duration;

use securepay_core::identity::ServiceIdentity;
use securepay_identity::IdentityError;
use securepay_identity::grpc::{self, TransportError};
use securepay_identity::x509::WorkloadIdentity;
use securepay_ports::SvidSource;
use securepay_proto::account::v1::GetBalanceRequest;
use support::{
    FixedClientCert, Spire, TestServer, assert_refused_by_server, check_balance, client, client_config_presenting,
    tls_probe,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_trust_transport_against_real_spire() {
    let Some(spire) = Spire::from_env() else { return };
    let _entries = spire.register_this_test(&ServiceIdentity::ALL, None);
    let account = spire.identity(ServiceIdentity::AccountService).await;
    let payment = spire.identity(ServiceIdentity::PaymentService).await;
    let gateway = spire.identity(ServiceIdentity::ApiGateway).await;
    let notification = spire.identity(ServiceIdentity::NotificationService).await;
    let server = TestServer::start(&account).await;

    an_allowed_workload_is_served_and_the_handler_sees_its_verified_svid(&server, &payment).await;
    a_workload_the_method_does_not_allow_gets_permission_denied(&server, &notification, &payment, &gateway).await;
    a_plaintext_client_is_refused(&server).await;
    a_client_without_a_certificate_is_refused(&server, &payment).await;
    a_client_expecting_another_server_id_refuses_to_connect(&server, &gateway).await;
    forged_and_foreign_certificates_are_refused(&server, &payment).await;
    the_svid_source_port_reports_the_current_svid(&payment).await;

    server.stop().await;
}

async fn an_allowed_workload_is_served_and_the_handler_sees_its_verified_svid(
    server: &TestServer,
    payment: &WorkloadIdentity,
) {
    let channel = grpc::channel(&server.addr, ServiceIdentity::AccountService, payment).unwrap();
    let response = client(channel).check_balance(check_balance("acc-1")).await.expect("payment → account is allowed");
    let response = response.into_inner();
    assert_eq!(response.account_id, "acc-1");
    assert_eq!(response.currency, ServiceIdentity::PaymentService.spiffe_id(), "kit::authorize saw payment-service");
    let seen = server.service.peers.lock().unwrap().last().cloned().expect("the handler saw a PeerSvid");
    let presented = payment.current().expect("payment has an SVID");
    assert_eq!(seen.0.spiffe_id, ServiceIdentity::PaymentService.spiffe_id());
    assert_eq!(seen.0.not_after, presented.not_after, "the PeerSvid is the certificate presented");
}

async fn a_workload_the_method_does_not_allow_gets_permission_denied(
    server: &TestServer,
    notification: &WorkloadIdentity,
    payment: &WorkloadIdentity,
    gateway: &WorkloadIdentity,
) {
    // notification-service may call nothing: the handshake succeeds (a SecurePay workload), the method refuses.
    let channel = grpc::channel(&server.addr, ServiceIdentity::AccountService, notification).unwrap();
    let status = client(channel).check_balance(check_balance("acc-1")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let seen = server.service.peers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.0.spiffe_id, ServiceIdentity::NotificationService.spiffe_id());

    // payment-service may CheckBalance but not GetBalance (gateway only), and vice versa.
    let mut from_payment = client(grpc::channel(&server.addr, ServiceIdentity::AccountService, payment).unwrap());
    let mut from_gateway = client(grpc::channel(&server.addr, ServiceIdentity::AccountService, gateway).unwrap());
    let get_balance = || {
        let mut r = tonic::Request::new(GetBalanceRequest { account_id: "acc-1".into() });
        securepay_kit::with_subject(&mut r, &securepay_core::ids::Subject::parse("alice").unwrap());
        r
    };
    assert_eq!(from_payment.get_balance(get_balance()).await.unwrap_err().code(), Code::PermissionDenied);
    from_gateway.get_balance(get_balance()).await.expect("gateway may read balances");
    assert_eq!(from_gateway.check_balance(check_balance("acc-1")).await.unwrap_err().code(), Code::PermissionDenied);
}

async fn a_plaintext_client_is_refused(server: &TestServer) {
    let served_before = server.service.peers.lock().unwrap().len();
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let status = client(plaintext).check_balance(check_balance("acc-1")).await.unwrap_err();
    // The server answers the HTTP/2 preface with a TLS alert and hangs up; what the plaintext client
    // makes of that varies (broken pipe, frame error), but never a response.
    assert!(!status.message().is_empty(), "{status:?}");
    assert_eq!(server.service.peers.lock().unwrap().len(), served_before, "no handler ran");
}

async fn a_client_without_a_certificate_is_refused(server: &TestServer, payment: &WorkloadIdentity) {
    // Control: the same probe presenting payment's current SVID is accepted (server SETTINGS arrive).
    let svid = payment.source().svid().unwrap();
    let accepted = client_config_presenting(payment, ServiceIdentity::AccountService, FixedClientCert::of(&svid));
    assert!(tls_probe(&server.addr, accepted).await.expect("a valid SVID is accepted") > 0);

    let no_cert = client_config_presenting(payment, ServiceIdentity::AccountService, FixedClientCert(None));
    assert_refused_by_server(tls_probe(&server.addr, no_cert).await, "a client without a certificate");
}

async fn a_client_expecting_another_server_id_refuses_to_connect(server: &TestServer, gateway: &WorkloadIdentity) {
    let served_before = server.service.peers.lock().unwrap().len();
    // The gateway wants payment-service; the listener is account-service: the client aborts the handshake.
    let wrong = grpc::channel(&server.addr, ServiceIdentity::PaymentService, gateway).unwrap();
    let status = client(wrong).check_balance(check_balance("acc-1")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(server.service.peers.lock().unwrap().len(), served_before, "no request was sent");

    let svid = gateway.source().svid().unwrap();
    let config = client_config_presenting(gateway, ServiceIdentity::PaymentService, FixedClientCert::of(&svid));
    let err = tls_probe(&server.addr, config).await.expect_err("the client refuses the server's SVID");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
}

async fn forged_and_foreign_certificates_are_refused(server: &TestServer, payment: &WorkloadIdentity) {
    for claimed in [ServiceIdentity::PaymentService.spiffe_id(), "spiffe://evil.dev/payment-service"] {
        let config =
            client_config_presenting(payment, ServiceIdentity::AccountService, FixedClientCert::forged(claimed));
        assert_refused_by_server(tls_probe(&server.addr, config).await, &format!("{claimed} from a rogue CA"));
    }
}

async fn the_svid_source_port_reports_the_current_svid(payment: &WorkloadIdentity) {
    let svid = SvidSource::current(payment).await.unwrap().expect("an SVID");
    assert_eq!(svid.spiffe_id, ServiceIdentity::PaymentService.spiffe_id());
    assert!(svid.not_after > time::OffsetDateTime::now_utc());
    assert_eq!(payment.identity(), ServiceIdentity::PaymentService);
}

#[tokio::test]
async fn no_agent_means_no_identity_and_one_clear_line() {
    let endpoint = "unix:///nonexistent/securepay/agent.sock";
    let err = WorkloadIdentity::connect(endpoint, ServiceIdentity::AccountService, Duration::from_secs(2))
        .await
        .expect_err("no agent, no identity");
    assert!(matches!(err, IdentityError::NoSvidWithin { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "no X.509-SVID for spiffe://securepay.dev/account-service from the SPIRE agent at \
         unix:///nonexistent/securepay/agent.sock within 2 s: is the agent running and is this binary registered?"
    );
    let err = WorkloadIdentity::connect("tcp://not a socket", ServiceIdentity::AccountService, Duration::from_secs(2))
        .await
        .expect_err("an invalid endpoint");
    assert!(matches!(err, IdentityError::InvalidEndpoint { .. }), "{err:?}");
}

#[test]
fn a_transport_error_says_what_failed_without_internals() {
    assert_eq!(TransportError::Address("x".into()).to_string(), "x is not a gRPC address (expected host:port)");
}
