//! SVID rotation and expiry against the real SPIRE of the test platform, with short-lived SVIDs
//! (entries with a small `-x509SVIDTTL` for this test executable): a server keeps serving across
//! several rotations of both its own and its client's SVID without a restart and without one
//! failed call, and an SVID held past its expiry is refused at the handshake.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use securepay_core::identity::ServiceIdentity;
use securepay_identity::IdentityError;
use securepay_identity::grpc;
use securepay_identity::x509::WorkloadIdentity;
use support::{
    FixedClientCert, Spire, TestServer, assert_refused_by_server, check_balance, client, client_config_presenting,
    tls_probe,
};
use time::OffsetDateTime;

/// Short enough for several rotations within a minute or two; the agent rotates at half-life.
const SVID_TTL_SECS: u32 = 30;
const ROTATIONS: usize = 3;
const ROTATION_WAIT: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_without_restart_and_expired_svids_refused() {
    let Some(spire) = Spire::from_env() else { return };
    // The only test in this executable: the global recorder sees every gauge the identities set.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap();
    let _entries = spire
        .register_this_test(&[ServiceIdentity::AccountService, ServiceIdentity::PaymentService], Some(SVID_TTL_SECS));
    let account = spire.identity(ServiceIdentity::AccountService).await;
    let payment = spire.identity(ServiceIdentity::PaymentService).await;
    let server = TestServer::start(&account).await;

    tokio::join!(
        rotations_cause_no_failed_call(&server, &account, &payment),
        an_expired_svid_is_refused(&server, &payment),
        an_unregistered_identity_fails_closed_with_one_clear_line(&spire),
    );
    server.stop().await;

    // The refused handshake (the expired SVID) was counted as an auth failure.
    let text = prometheus.render();
    assert!(
        text.lines().any(|l| l.starts_with("securepay_auth_failures_total{reason=\"tls_handshake_failed\"}")),
        "no refused handshake counted:\n{text}"
    );

    // After the rotations, the expiry gauge names each identity's current SVID.
    for identity in [&account, &payment] {
        let id = identity.identity().spiffe_id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let want = identity.current().expect("an SVID").not_after.unix_timestamp();
            let line = format!("securepay_svid_expiry_timestamp_seconds{{spiffe_id=\"{id}\"}} {want}");
            let text = prometheus.render();
            if text.lines().any(|l| l == line) {
                break;
            }
            assert!(Instant::now() < deadline, "the metrics have no `{line}`:\n{text}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn rotations_cause_no_failed_call(server: &TestServer, account: &WorkloadIdentity, payment: &WorkloadIdentity) {
    let long_lived = client(grpc::channel(&server.addr, ServiceIdentity::AccountService, payment).unwrap());
    let mut server_certs = BTreeSet::new();
    let mut calls = 0usize;
    let mut failures = Vec::new();
    let deadline = Instant::now() + ROTATION_WAIT;
    let mut last_fresh = Instant::now() - Duration::from_secs(1);
    loop {
        let client_certs: BTreeSet<OffsetDateTime> =
            server.service.peers.lock().unwrap().iter().map(|p| p.0.not_after).collect();
        if server_certs.len() > ROTATIONS && client_certs.len() > ROTATIONS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "within {ROTATION_WAIT:?}: server presented {} SVIDs, handler saw {} client SVIDs, want > {ROTATIONS} each \
             (is the agent rotating at half-life?)",
            server_certs.len(),
            client_certs.len()
        );
        calls += 1;
        if let Err(status) = long_lived.clone().check_balance(check_balance("acc-1")).await {
            failures.push(format!("long-lived channel: {status:?}"));
        }
        if last_fresh.elapsed() >= Duration::from_secs(1) {
            last_fresh = Instant::now();
            // A new connection: the server's certificate must be its current SVID.
            let fresh = client(grpc::channel(&server.addr, ServiceIdentity::AccountService, payment).unwrap());
            calls += 1;
            if let Err(status) = fresh.clone().check_balance(check_balance("acc-1")).await {
                failures.push(format!("fresh channel: {status:?}"));
            }
            let svid = payment.source().svid().unwrap();
            let config = client_config_presenting(payment, ServiceIdentity::AccountService, FixedClientCert::of(&svid));
            let presented = server_cert_not_after(&server.addr, config).await;
            let current = account.current().expect("the server has an SVID").not_after;
            // The agent may rotate between the handshake and this read: then the next probe sees it.
            assert!(presented <= current, "the server presented an SVID newer than its current one?");
            server_certs.insert(presented);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failures.is_empty(), "{} of {calls} calls failed across rotations: {failures:#?}", failures.len());
}

async fn an_expired_svid_is_refused(server: &TestServer, payment: &WorkloadIdentity) {
    let held = payment.source().svid().unwrap();
    let expires = securepay_identity::x509::leaf_not_after(held.leaf().as_ref()).unwrap();
    // Accepted while valid...
    let config = client_config_presenting(payment, ServiceIdentity::AccountService, FixedClientCert::of(&held));
    assert!(tls_probe(&server.addr, config).await.expect("the SVID is still valid") > 0);
    // ...refused once it has expired, although the agent has long rotated it.
    let wait = (expires - OffsetDateTime::now_utc()).unsigned_abs() + Duration::from_secs(2);
    assert!(wait <= Duration::from_secs(u64::from(SVID_TTL_SECS) + 15), "SVID lifetime {wait:?} exceeds the entry TTL");
    tokio::time::sleep(wait).await;
    assert!(OffsetDateTime::now_utc() > expires);
    let config = client_config_presenting(payment, ServiceIdentity::AccountService, FixedClientCert::of(&held));
    assert_refused_by_server(tls_probe(&server.addr, config).await, "an expired SVID");
    // The current SVID of the same workload still works.
    let current = payment.source().svid().unwrap();
    assert_ne!(current.leaf().as_ref(), held.leaf().as_ref(), "the agent rotated the SVID");
    let config = client_config_presenting(payment, ServiceIdentity::AccountService, FixedClientCert::of(&current));
    assert!(tls_probe(&server.addr, config).await.expect("the current SVID is accepted") > 0);
}

async fn an_unregistered_identity_fails_closed_with_one_clear_line(spire: &Spire) {
    // This executable is registered as account-service and payment-service only.
    let err = WorkloadIdentity::connect(&spire.endpoint, ServiceIdentity::NotificationService, Duration::from_secs(3))
        .await
        .expect_err("no SVID for an identity this process is not registered as");
    assert!(matches!(err, IdentityError::NoSvidWithin { .. }), "{err:?}");
    assert!(err.to_string().contains("is the agent running and is this binary registered?"), "{err}");
}

/// The `notAfter` of the certificate the server presents on a new connection.
async fn server_cert_not_after(addr: &str, config: rustls::ClientConfig) -> OffsetDateTime {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .expect("handshake with a current SVID");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    securepay_identity::x509::leaf_not_after(leaf.as_ref()).unwrap()
}
