//! The dashboards against the running stack (SPEC §8: every dashboard query returns data). After a
//! payment through the gateway, every target of every panel of every Grafana dashboard in
//! `observability/grafana/dashboards/` is run against the test platform's Prometheus, with
//! Grafana's variables filled in as Grafana would; an erroring query, or one whose series carry no
//! number (nothing to draw), fails the test naming its panel. Also: every consumer group exports
//! its lag per partition, and is back to 0 once the platform is idle.
//!
//! Run by `cargo xtask test` with the test platform up (`securepay_testkit::var::*`); under a bare
//! `cargo test` it says it was skipped, under `SECUREPAY_INFRA_REQUIRED=1` a missing component fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use securepay_core::topology::consumer_group;
use securepay_testkit::{component, var};
use serde_json::{Value, json};
use uuid::Uuid;

const ALICE_EUR: &str = "a11ce000-0000-4000-8000-000000000001";
const BOB_EUR: &str = "b0b00000-0000-4000-8000-000000000001";

/// How long a payment may take to reach its terminal state on the test platform.
const SETTLE_WAIT: Duration = Duration::from_secs(30);
/// How long Prometheus may take to scrape every target once more (several scrape intervals).
const SCRAPE_WAIT: Duration = Duration::from_secs(30);
/// How long the consumers may take to commit past everything and report it (stats every 5 s).
const CAUGHT_UP_WAIT: Duration = Duration::from_secs(30);
/// The dashboards' time range as Grafana opens them (`"time": {"from": "now-1h"}`).
const RANGE_S: u64 = 3600;

struct Stack {
    gateway: String,
    prometheus: String,
    key: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Stack {
    fn new() -> Option<Stack> {
        Some(Stack {
            gateway: component(var::GATEWAY_URL)?,
            prometheus: component(var::PROMETHEUS_URL)?,
            key: component(var::JWT_DEV_KEY)?,
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// A token for `sub` minted by the gateway's own dev-token command from the platform's dev key.
    fn token(&self, sub: &str) -> String {
        let output = std::process::Command::new(root().join("target/debug/securepay-gateway"))
            .args(["token", "--key", &self.key, "--sub", sub])
            .output()
            .expect("run securepay-gateway token");
        assert!(output.status.success(), "token: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// One HTTP call; the status and the body as JSON (`Null` if it is none).
    async fn call(&self, method: &str, url: &str, headers: &[(&str, &str)], body: Option<Value>) -> (u16, Value) {
        let mut request = hyper::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let bytes = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let response = self.http.request(request.body(Full::new(bytes)).unwrap()).await.expect("HTTP call");
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// Pays `amount` EUR from `from` (owned by `sub`) to `to` and waits until it is COMPLETED.
    async fn pay_and_settle(&self, sub: &str, from: &str, to: &str, amount: &str) {
        let token = self.token(sub);
        let bearer = format!("Bearer {token}");
        let key = Uuid::new_v4().to_string();
        let headers = [("authorization", bearer.as_str()), ("idempotency-key", key.as_str())];
        let body = json!({"from_account": from, "to_account": to, "amount": amount, "currency": "EUR"});
        let (status, reply) =
            self.call("POST", &format!("{}/api/v1/payments", self.gateway), &headers, Some(body)).await;
        assert_eq!(status, 202, "payment {from} → {to}: {reply}");
        let id = reply["payment_id"].as_str().expect("payment_id");
        let url = format!("{}/api/v1/payments/{id}", self.gateway);
        let started = Instant::now();
        loop {
            let (status, payment) = self.call("GET", &url, &headers[..1], None).await;
            assert_eq!(status, 200, "GET payment {id}: {payment}");
            if payment["status"] != "PENDING" {
                assert_eq!(payment["status"], "COMPLETED", "{payment}");
                return;
            }
            assert!(started.elapsed() < SETTLE_WAIT, "payment {id} still PENDING after {SETTLE_WAIT:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An instant query: the numbers of its series (a scalar is one), or Prometheus's error.
    async fn query(&self, promql: &str) -> Result<Vec<f64>, String> {
        let url = format!("{}/api/v1/query?query={}", self.prometheus, percent_encode(promql));
        let (status, body) = self.call("GET", &url, &[], None).await;
        if body["status"] != "success" {
            return Err(format!("HTTP {status}: {} {}", body["errorType"], body["error"]));
        }
        let number = |pair: &Value| pair[1].as_str().and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
        let result = &body["data"]["result"];
        match body["data"]["resultType"].as_str() {
            Some("vector") => Ok(result.as_array().into_iter().flatten().map(|s| number(&s["value"])).collect()),
            Some("scalar") => Ok(vec![number(result)]),
            other => Err(format!("a {other:?} result, not an instant vector or scalar")),
        }
    }

    /// Prometheus's scrape interval, from its running configuration (the test profile's template).
    async fn scrape_interval(&self) -> Duration {
        let (_, body) = self.call("GET", &format!("{}/api/v1/status/config", self.prometheus), &[], None).await;
        let config: serde_norway::Value = serde_norway::from_str(body["data"]["yaml"].as_str().expect("config yaml"))
            .expect("Prometheus's config is YAML");
        let text = config["global"]["scrape_interval"].as_str().expect("global.scrape_interval");
        parse_duration(text).unwrap_or_else(|| panic!("scrape_interval {text:?}"))
    }

    /// Waits until Prometheus has scraped every target after `since` (Unix seconds).
    async fn scraped_after(&self, since: f64) {
        let started = Instant::now();
        loop {
            let oldest = self.query("min(timestamp(up))").await.expect("timestamp(up)");
            if oldest.first().is_some_and(|t| *t > since) {
                return;
            }
            assert!(started.elapsed() < SCRAPE_WAIT, "some target not scraped within {SCRAPE_WAIT:?}: {oldest:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// `text` as a URL query value: everything but the unreserved characters percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus duration of one unit (`5s`, `1m`, `500ms`).
fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        "m" => Some(Duration::from_secs(number * 60)),
        "h" => Some(Duration::from_secs(number * 3600)),
        _ => None,
    }
}

/// Grafana's variables as Grafana fills them in for a dashboard opened on its default hour, with
/// Prometheus scraping every `scrape`: `$__interval` is never below the datasource's interval (the
/// scrape interval), and `$__rate_interval` = max(`$__interval` + scrape, 4 × scrape). A dashboard
/// variable takes its current value; "All" (or a multi-value one) matches anything.
fn variables(dashboard: &Value, scrape: Duration) -> BTreeMap<String, String> {
    let seconds = |d: Duration| format!("{}s", d.as_secs());
    let interval = scrape.max(Duration::from_secs(RANGE_S) / 1000);
    let rate_interval = (interval + scrape).max(scrape * 4);
    let mut vars = BTreeMap::from([
        ("__interval".to_string(), seconds(interval)),
        ("__interval_ms".to_string(), interval.as_millis().to_string()),
        ("__rate_interval".to_string(), seconds(rate_interval)),
        ("__range".to_string(), format!("{RANGE_S}s")),
        ("__range_s".to_string(), RANGE_S.to_string()),
    ]);
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let Some(name) = variable["name"].as_str() else { continue };
        let current = &variable["current"]["value"];
        let value = match current.as_str() {
            Some(value) if value != "$__all" => value.to_string(),
            _ => ".+".to_string(),
        };
        vars.insert(name.to_string(), value);
    }
    vars
}

/// `expr` with every `$name` / `${name}` / `${name:format}` replaced from `vars`; an unknown
/// variable is an error naming it.
fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        let (name, used) = if let Some(braced) = tail.strip_prefix('{') {
            let end = braced.find('}').ok_or_else(|| format!("unclosed ${{ in {expr}"))?;
            (braced[..end].split(':').next().unwrap_or_default(), end + 2)
        } else {
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            (&tail[..end], end)
        };
        if name.is_empty() {
            return Err(format!("a lone $ in {expr}"));
        }
        out.push_str(vars.get(name).ok_or_else(|| format!("unknown variable ${name}"))?);
        rest = &tail[used..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every dashboard JSON of the repository, parsed, with its file name.
fn dashboards() -> Vec<(String, Value)> {
    let dir = root().join("observability/grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboard JSON in {}", dir.display());
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let dashboard = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, dashboard)
        })
        .collect()
}

/// The panels of a dashboard that query something, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out.retain(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty()));
    out
}

#[tokio::test]
async fn every_panel_of_every_dashboard_returns_data_after_a_payment() {
    let Some(stack) = Stack::new() else { return };
    let dashboards = dashboards();
    // There and back, so the shared demo balances end where they were.
    stack.pay_and_settle("alice", ALICE_EUR, BOB_EUR, "0.01").await;
    stack.pay_and_settle("bob", BOB_EUR, ALICE_EUR, "0.01").await;
    stack.scraped_after(unix_now()).await;
    let scrape = stack.scrape_interval().await;

    let mut failures = Vec::new();
    let mut queries = 0;
    for (file, dashboard) in &dashboards {
        let vars = variables(dashboard, scrape);
        for panel in panels(dashboard) {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_default();
                let at = format!("{file}: panel {title:?}, target {}", target["refId"].as_str().unwrap_or("?"));
                let promql = match substitute(expr, &vars) {
                    Ok(promql) => promql,
                    Err(e) => {
                        failures.push(format!("{at}: {e}"));
                        continue;
                    }
                };
                queries += 1;
                match stack.query(&promql).await {
                    Err(e) => failures.push(format!("{at}: `{promql}` fails: {e}")),
                    Ok(values) if values.iter().all(|v| v.is_nan()) => failures
                        .push(format!("{at}: `{promql}` returns no data ({} series, none a number)", values.len())),
                    Ok(_) => {}
                }
            }
        }
    }
    assert!(queries > 0, "no panel queries anything");
    assert!(
        failures.is_empty(),
        "{} of {queries} dashboard queries return nothing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn every_consumer_group_exports_its_lag_per_partition_and_catches_up() {
    let Some(stack) = Stack::new() else { return };
    let groups =
        [consumer_group::ACCOUNT_SERVICE, consumer_group::NOTIFICATION_SERVICE, consumer_group::PAYMENT_SERVICE];
    // The group's lag summed over its partitions (max per partition: a member that lost one
    // reports 0), only from series that name their partition: [] if there are none.
    let lag = |group: &str| {
        format!(
            "sum(max by (topic, partition) (securepay_consumer_lag_records{{group=\"{group}\",partition=~\"[0-9]+\"}}))"
        )
    };
    let started = Instant::now();
    loop {
        let mut per_group = BTreeMap::new();
        for group in groups {
            per_group.insert(group, stack.query(&lag(group)).await.expect("the consumer lag query"));
        }
        if per_group.values().all(|v| v == &[0.0]) {
            return;
        }
        assert!(
            started.elapsed() < CAUGHT_UP_WAIT,
            "every group must report its lag per partition and be caught up (0) within {CAUGHT_UP_WAIT:?}: {per_group:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[test]
fn grafana_variables_are_filled_in_as_grafana_does_and_unknown_ones_refused() {
    let dashboard = json!({"templating": {"list": [
        {"name": "job", "current": {"value": "payment-service"}},
        {"name": "group", "current": {"value": "$__all"}},
    ]}});
    let vars = variables(&dashboard, Duration::from_secs(5));
    let expr = "rate(x{job=\"$job\",group=~\"${group}\"}[$__rate_interval]) / $__interval_ms or y[${__interval}]";
    assert_eq!(substitute(expr, &vars).unwrap(), "rate(x{job=\"payment-service\",group=~\".+\"}[20s]) / 5000 or y[5s]");
    assert_eq!(substitute("x[${__range:raw}]", &vars).unwrap(), "x[3600s]");
    assert_eq!(substitute("x{job=\"$nope\"}", &vars), Err("unknown variable $nope".to_string()));
}
