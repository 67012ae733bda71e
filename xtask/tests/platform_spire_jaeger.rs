//! Proof that the runner's SPIRE and Jaeger work as the services will use them: each of the four
//! service binaries gets an X.509-SVID carrying exactly its own SPIFFE ID, any other process gets
//! none, and a span sent over OTLP/HTTP comes back from Jaeger's query API.
//!
//! Run by `cargo xtask test` (which exports `securepay_testkit::var::*` and builds the service
//! binaries before registering them); under a bare `cargo test` each test says it was skipped.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use securepay_core::identity::ServiceIdentity;
use securepay_identity::IdentityError;
use securepay_testkit::{component, var};

/// The agent syncs entries every few seconds; the runner already waited for them, so this is slack.
const SVID_WAIT: Duration = Duration::from_secs(30);
const TRACE_WAIT: Duration = Duration::from_secs(30);

fn endpoint(agent_socket: &str) -> String {
    format!("unix://{agent_socket}")
}

/// Where the runner builds the services and what the `unix:path` selectors name.
fn service_binary(service: ServiceIdentity) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let path = root.join("target/debug").join(service.binary());
    assert!(path.is_file(), "{} is missing: `cargo xtask up` builds it before registering it", path.display());
    path
}

fn identity(cmd: &mut Command, agent_socket: &str) -> Output {
    cmd.env("SPIFFE_ENDPOINT_SOCKET", endpoint(agent_socket)).output().expect("spawning the binary")
}

#[test]
fn each_service_binary_gets_an_svid_with_exactly_its_own_spiffe_id() {
    let Some(agent_socket) = component(var::SPIRE_AGENT_SOCKET) else { return };
    for service in ServiceIdentity::ALL {
        let binary = service_binary(service);
        let deadline = Instant::now() + SVID_WAIT;
        let out = loop {
            let out = identity(Command::new(&binary).arg("identity"), &agent_socket);
            if out.status.success() || Instant::now() >= deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{} identity failed: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout.lines().count(), 1, "one JSON line, got {stdout:?}");
        let svid: serde_json::Value = serde_json::from_str(&stdout).expect("identity prints JSON");
        assert_eq!(svid["spiffe_id"], service.spiffe_id(), "{}", binary.display());
        assert_eq!(ServiceIdentity::from_spiffe_id(svid["spiffe_id"].as_str().unwrap()), Some(service));
        assert!(svid["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')), "expires_at: {}", svid["expires_at"]);
    }
}

#[tokio::test]
async fn a_process_that_is_not_a_service_gets_no_svid() {
    let Some(agent_socket) = component(var::SPIRE_AGENT_SOCKET) else { return };
    // This test binary is attested like any workload: its path matches no entry.
    match securepay_identity::fetch_x509_svid(&endpoint(&agent_socket)).await {
        Err(IdentityError::NoIdentityIssued) => {}
        other => panic!("the test process must get no SVID, got {other:?}"),
    }
}

#[test]
fn a_copy_of_a_service_binary_at_another_path_gets_no_svid() {
    let Some(agent_socket) = component(var::SPIRE_AGENT_SOCKET) else { return };
    let original = service_binary(ServiceIdentity::PaymentService);
    let dir = std::env::temp_dir().join(format!("securepay-svid-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(ServiceIdentity::PaymentService.binary());
    std::fs::copy(&original, &copy).unwrap();
    // Same bytes, same user, other path, started through a shell: the selector is the path.
    let out = identity(Command::new("/bin/sh").arg("-c").arg("exec \"$0\" identity").arg(&copy), &agent_socket);
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a copy at {} got an identity: {}",
        copy.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty(), "nothing on stdout when failing closed");
    assert!(stderr.contains("no identity"), "stderr: {stderr}");
}

#[test]
fn a_span_sent_over_otlp_http_comes_back_from_jaeger() {
    let Some(otlp_http) = component(var::OTLP_HTTP) else { return };
    let Some(query) = component(var::JAEGER_QUERY_URL) else { return };
    let now_ns = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let trace_id = format!("{:032x}", now_ns ^ (u128::from(std::process::id()) << 64));
    let span_id = format!("{:016x}", (now_ns as u64) | 1);
    let service = format!("securepay-proof-{}", std::process::id());
    let body = serde_json::json!({
        "resourceSpans": [{
            "resource": { "attributes": [{ "key": "service.name", "value": { "stringValue": service } }] },
            "scopeSpans": [{
                "scope": { "name": "securepay-proof" },
                "spans": [{
                    "traceId": trace_id,
                    "spanId": span_id,
                    "name": "gateway.request",
                    "kind": 2,
                    "startTimeUnixNano": (now_ns - 5_000_000).to_string(),
                    "endTimeUnixNano": now_ns.to_string(),
                }]
            }]
        }]
    });
    let (status, answer) = http(&otlp_http, "POST", "/v1/traces", Some(&body.to_string()));
    assert_eq!(status, 200, "OTLP/HTTP export answered {status}: {answer}");

    let deadline = Instant::now() + TRACE_WAIT;
    loop {
        let (status, answer) = http(&query, "GET", &format!("/api/traces?service={service}&limit=20"), None);
        if status == 200 {
            let traces: serde_json::Value = serde_json::from_str(&answer).expect("query API answers JSON");
            let found = traces["data"].as_array().into_iter().flatten().any(|t| {
                t["traceID"] == trace_id.as_str()
                    && t["spans"].as_array().into_iter().flatten().any(|s| s["operationName"] == "gateway.request")
            });
            if found {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "trace {trace_id} of {service} not in Jaeger after {TRACE_WAIT:?}: {status} {answer}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A minimal HTTP/1.0 exchange (no chunked bodies) with `base` = `http://127.0.0.1:<port>`.
fn http(base: &str, method: &str, path: &str, json: Option<&str>) -> (u16, String) {
    let host = base.strip_prefix("http://").expect("http:// URL").trim_end_matches('/');
    let mut stream = TcpStream::connect(host).unwrap_or_else(|e| panic!("connecting to {host}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = json.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
