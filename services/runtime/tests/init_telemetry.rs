//! `init_telemetry` exactly as a service binary runs it: in a child process (the global
//! subscriber and the standard `OTEL_EXPORTER_OTLP_ENDPOINT` are per process) whose stdout is
//! read back. Its JSON log line carries the trace id, and dropping the guard at exit is what
//! delivers the span to the REAL Jaeger of the test platform — under `RUST_LOG=warn` too, which
//! drops the `info` lines and not the spans.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use common::http_get;
use securepay_testkit::{component, var};

mod common;

/// Set in the child process: the service name it runs as.
const CHILD_SERVICE: &str = "SECUREPAY_TELEMETRY_TEST_SERVICE";
const CHILD_TEST: &str = "child_service_process";

/// The "service": not a test of its own (it runs only when the parent starts it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started by a_service_logs_its_trace_id_and_its_spans_reach_jaeger_when_it_exits"]
async fn child_service_process() {
    let service: &'static str =
        Box::leak(std::env::var(CHILD_SERVICE).expect("started by the parent test").into_boxed_str());
    let guard = securepay_runtime::init_telemetry(service).expect("telemetry installs");
    assert!(securepay_runtime::init_telemetry(service).is_err(), "a second global subscriber is refused");
    let span = tracing::info_span!(securepay_kit::trace::names::PAYMENT_INITIATE, payment_id = "p-child");
    span.in_scope(|| {
        tracing::info!("payment accepted");
        tracing::warn!("payment slow");
    });
    drop(span);
    drop(guard); // what `main` does at exit: the buffered span must be exported now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_logs_its_trace_id_and_its_spans_reach_jaeger_when_it_exits() {
    let Some(lines) = run_child_service("info", "payment accepted").await else { return };
    let messages: Vec<&serde_json::Value> = lines.iter().map(|line| &line["fields"]["message"]).collect();
    assert_eq!(messages, ["payment accepted", "payment slow"]);
    assert_eq!(lines[0]["span"]["name"], "payment.initiate", "{}", lines[0]);
}

/// `RUST_LOG` quiets the log lines only: the `info` line is gone, the span is still exported (and
/// the `warn` line still names its trace; the log layer no longer sees the `info` span itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_warn_drops_the_info_lines_and_the_spans_still_reach_jaeger() {
    let Some(lines) = run_child_service("warn", "payment slow").await else { return };
    assert!(lines.iter().all(|line| line["fields"]["message"] != "payment accepted"), "{lines:?}");
}

/// Runs the child service with `rust_log`; checks that its log line `message` carries the trace and
/// span id of the span Jaeger then shows. Returns the child's JSON log lines (`None` without Jaeger).
async fn run_child_service(rust_log: &str, message: &str) -> Option<Vec<serde_json::Value>> {
    let (Some(otlp), Some(query_url)) = (component(var::OTLP_GRPC), component(var::JAEGER_QUERY_URL)) else {
        return None;
    };
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let service = format!("securepay-test-init-{:016x}", hasher.finish());

    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_SERVICE, &service)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .env("RUST_LOG", rust_log)
        .env_remove(securepay_runtime::telemetry::TRACE_FILTER_VAR);
    let output = tokio::task::spawn_blocking(move || child.output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the child service failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let lines: Vec<serde_json::Value> = stdout
        .lines()
        // libtest may print `test child_service_process ... ` in front of the first line.
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line[line.find('{')?..]).ok())
        .collect();
    let line = lines
        .iter()
        .find(|json| json["fields"]["message"] == message)
        .unwrap_or_else(|| panic!("no JSON log line {message:?} under RUST_LOG={rust_log} on stdout:\n{stdout}"));
    let trace_id = line["trace_id"].as_str().unwrap_or_else(|| panic!("the log line has no trace_id: {line}"));
    let span_id = line["span_id"].as_str().unwrap_or_else(|| panic!("the log line has no span_id: {line}"));

    // Nothing flushes the child's exporter but the guard's drop, and the child has exited.
    let url = format!("{}/api/traces/{trace_id}", query_url.trim_end_matches('/'));
    let mut last = String::new();
    for _ in 0..60 {
        match http_get(&url).await {
            Ok((200, body)) => {
                let json: serde_json::Value = serde_json::from_str(&body).unwrap();
                let found = &json["data"][0];
                let span = &found["spans"][0];
                assert_eq!(span["operationName"], "payment.initiate", "{json}");
                assert_eq!(span["spanID"], span_id, "the logged span is the exported span: {json}");
                let process = span["processID"].as_str().unwrap();
                assert_eq!(found["processes"][process]["serviceName"], service.as_str(), "resource service.name");
                return Some(lines);
            }
            Ok((status, body)) => last = format!("HTTP {status}: {}", body.chars().take(200).collect::<String>()),
            Err(error) => last = format!("query failed: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("trace {trace_id} of {service} did not reach Jaeger at {query_url} within 30 s; last: {last}");
}
