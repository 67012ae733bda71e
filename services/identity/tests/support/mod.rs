//! What the identity tests share: registration entries for the test executable itself on the real
//! SPIRE server of the test platform, and a tiny account.v1 server whose handlers authorize with
//! `securepay_kit::authorize` exactly as the account service does.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use securepay_core::identity::{ServiceIdentity, method};
use securepay_core::ids::Subject;
use securepay_identity::x509::WorkloadIdentity;
use securepay_kit::PeerSvid;
use securepay_proto::account::v1::account_service_client::AccountServiceClient;
use securepay_proto::account::v1::account_service_server::{AccountService, AccountServiceServer};
use securepay_proto::account::v1::{Balance, CheckBalanceRequest, CheckBalanceResponse, GetBalanceRequest};
use securepay_testkit::{component, var};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

/// The agent syncs new entries within a few seconds; this bounds the wait for their SVIDs.
pub const SVID_WAIT: Duration = Duration::from_secs(60);

/// The real SPIRE of the test platform.
pub struct Spire {
    pub endpoint: String,
    server_socket: String,
    tools_bin: String,
}

impl Spire {
    /// `None` (test skipped) when the runner did not start SPIRE; a failure under INFRA_REQUIRED.
    pub fn from_env() -> Option<Self> {
        let agent = component(var::SPIRE_AGENT_SOCKET)?;
        let server_socket = component(var::SPIRE_SERVER_SOCKET)?;
        let tools_bin = component(var::TOOLS_BIN)?;
        Some(Self { endpoint: format!("unix://{agent}"), server_socket, tools_bin })
    }

    fn cli(&self, args: &[&str]) -> String {
        let bin = PathBuf::from(&self.tools_bin).join("spire-server");
        let out = Command::new(&bin)
            .args(args)
            .arg("-socketPath")
            .arg(&self.server_socket)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
        assert!(
            out.status.success(),
            "spire-server {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The agent this machine's workloads are attested by (the parent of every entry).
    fn agent_id(&self) -> String {
        "spiffe://securepay.dev/node/local-agent".to_owned()
    }

    /// Registers THIS test executable (unix:path selector) as each of `workloads`, with
    /// `x509_svid_ttl` if given. Entries left by an earlier run of this executable are replaced;
    /// the returned guard deletes the new ones.
    pub fn register_this_test(&self, workloads: &[ServiceIdentity], x509_svid_ttl: Option<u32>) -> Registration<'_> {
        let selector = format!("unix:path:{}", std::env::current_exe().unwrap().display());
        self.delete_entries_with(&selector);
        let mut ids = Vec::new();
        for workload in workloads {
            let ttl = x509_svid_ttl.map(|s| s.to_string());
            let mut args = vec![
                "entry",
                "create",
                "-parentID",
                "",
                "-spiffeID",
                workload.spiffe_id(),
                "-selector",
                &selector,
                "-output",
                "json",
            ];
            let agent = self.agent_id();
            args[3] = &agent;
            if let Some(ttl) = &ttl {
                args.extend(["-x509SVIDTTL", ttl.as_str()]);
            }
            let out: serde_json::Value = serde_json::from_str(&self.cli(&args)).unwrap();
            let id = out["results"][0]["entry"]["id"].as_str().unwrap_or_else(|| panic!("no entry id in {out}"));
            ids.push(id.to_owned());
        }
        Registration { spire: self, ids }
    }

    fn delete_entries_with(&self, selector: &str) {
        let out: serde_json::Value =
            serde_json::from_str(&self.cli(&["entry", "show", "-selector", selector, "-output", "json"])).unwrap();
        for entry in out["entries"].as_array().into_iter().flatten() {
            if let Some(id) = entry["id"].as_str() {
                self.cli(&["entry", "delete", "-entryID", id]);
            }
        }
    }

    /// This process's identity as `me`, waiting for the agent to pick up the registration.
    pub async fn identity(&self, me: ServiceIdentity) -> WorkloadIdentity {
        WorkloadIdentity::connect(&self.endpoint, me, SVID_WAIT).await.unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Deletes its registration entries when dropped.
pub struct Registration<'a> {
    spire: &'a Spire,
    ids: Vec<String>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = Command::new(PathBuf::from(&self.spire.tools_bin).join("spire-server"))
                .args(["entry", "delete", "-entryID", id, "-socketPath", &self.spire.server_socket])
                .output();
        }
    }
}

/// A tiny account.v1 server: authorizes each call with `kit::authorize` and records the peer.
#[derive(Clone, Default)]
pub struct EchoAccount {
    pub peers: Arc<Mutex<Vec<PeerSvid>>>,
}

#[tonic::async_trait]
impl AccountService for EchoAccount {
    async fn check_balance(
        &self,
        request: Request<CheckBalanceRequest>,
    ) -> Result<Response<CheckBalanceResponse>, Status> {
        self.peers.lock().unwrap().extend(request.extensions().get::<PeerSvid>().cloned());
        let caller = securepay_kit::authorize(&request, method::CHECK_BALANCE, OffsetDateTime::now_utc())?;
        Ok(Response::new(CheckBalanceResponse {
            account_id: request.into_inner().account_id,
            sufficient: true,
            currency: caller.service.spiffe_id().to_owned(),
        }))
    }

    async fn get_balance(&self, request: Request<GetBalanceRequest>) -> Result<Response<Balance>, Status> {
        self.peers.lock().unwrap().extend(request.extensions().get::<PeerSvid>().cloned());
        securepay_kit::authorize(&request, method::GET_BALANCE, OffsetDateTime::now_utc())?;
        Ok(Response::new(Balance { account_id: request.into_inner().account_id, ..Default::default() }))
    }
}

/// A running mTLS account server: its address and the peers its handlers saw.
pub struct TestServer {
    pub addr: String,
    pub service: EchoAccount,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(identity: &WorkloadIdentity) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let service = EchoAccount::default();
        let routes = Routes::new(AccountServiceServer::new(service.clone()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let identity = identity.clone();
        let task = tokio::spawn(async move {
            let server = tonic::transport::Server::builder().timeout(Duration::from_secs(10));
            securepay_identity::grpc::serve(server, routes, listener, &identity, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self { addr, service, stop: Some(stop), task }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), &mut self.task).await.expect("server stops").unwrap();
    }
}

pub fn check_balance(account: &str) -> Request<CheckBalanceRequest> {
    let mut request = Request::new(CheckBalanceRequest {
        account_id: account.to_owned(),
        amount: "1.00".into(),
        currency: "EUR".into(),
        to_account: String::new(),
    });
    request.set_timeout(Duration::from_secs(10));
    securepay_kit::with_subject(&mut request, &Subject::parse("alice").unwrap());
    request
}

pub fn client(
    channel: impl Into<securepay_identity::grpc::ResendingChannel>,
) -> AccountServiceClient<securepay_identity::grpc::ResendingChannel> {
    AccountServiceClient::new(channel.into())
}

/// A client certificate resolver that always presents one fixed SVID (or none): lets a test
/// present an SVID the live source would never hand out any more, such as an expired one.
#[derive(Debug)]
pub struct FixedClientCert(pub Option<Arc<rustls::sign::CertifiedKey>>);

impl FixedClientCert {
    pub fn of(svid: &spiffe::X509Svid) -> Self {
        let chain =
            svid.cert_chain().iter().map(|c| rustls::pki_types::CertificateDer::from(c.as_ref().to_vec())).collect();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(svid.private_key().as_ref().to_vec().into());
        let key = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
        Self(Some(Arc::new(rustls::sign::CertifiedKey::new(chain, key))))
    }
}

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.clone()
    }

    fn has_certs(&self) -> bool {
        self.0.is_some()
    }
}

/// A client config that verifies the server like the real transport (exactly `server`, trust
/// domain pinned) but presents `cert` as its client certificate.
pub fn client_config_presenting(
    source: &WorkloadIdentity,
    server: ServiceIdentity,
    cert: FixedClientCert,
) -> rustls::ClientConfig {
    spiffe_rustls::mtls_client(source.source().clone())
        .authorize(spiffe_rustls::authorizer::exact([server.spiffe_id()]).unwrap())
        .trust_domain_policy(spiffe_rustls::LocalOnly("securepay.dev".try_into().unwrap()))
        .with_alpn_protocols([b"h2"])
        .with_config_customizer(move |config| config.client_auth_cert_resolver = Arc::new(cert))
        .build()
        .unwrap()
}

/// Completes a TLS handshake with `config` and reads once: the server's HTTP/2 SETTINGS frame
/// (`Ok(n > 0)`) if the server accepted us, an error or end of stream if it refused us.
pub async fn tls_probe(addr: &str, config: rustls::ClientConfig) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt as _;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector.connect("127.0.0.1".try_into().unwrap(), tcp).await?;
    let mut buf = [0u8; 64];
    tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await.map_err(std::io::Error::other)?
}

impl FixedClientCert {
    /// A certificate naming `spiffe_id`, issued by a CA that is not our trust domain's (a forgery).
    pub fn forged(spiffe_id: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
        let leaf = leaf.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let key = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
        Self(Some(Arc::new(rustls::sign::CertifiedKey::new(vec![leaf.der().clone(), ca.der().clone()], key))))
    }
}

/// The probe was refused BY THE SERVER: it sent a fatal TLS alert (not a client-side failure).
pub fn assert_refused_by_server(probe: std::io::Result<usize>, what: &str) {
    match probe {
        Err(e) if e.to_string().contains("received fatal alert") => {}
        other => panic!("{what}: expected the server to refuse with a TLS alert, got {other:?}"),
    }
}
