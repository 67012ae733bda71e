//! Where integration tests find the real components (PostgreSQL, Redis, Kafka, SPIRE, Jaeger,
//! Prometheus) that `cargo xtask test` starts on its own ports and state directory.
//!
//! The runner exports one `SECUREPAY_TEST_*` variable per component plus
//! `SECUREPAY_INFRA_REQUIRED=1`. Under the runner a missing component is a test failure, never a
//! silent pass; under a bare `cargo test` the integration tests say they were skipped and why.
//!
//! Architecture invariant: test-only; no production crate depends on it.

/// Environment variable names: the contract between `xtask` and the tests.
pub mod var {
    /// Set to `1` by `cargo xtask test`: every component below must be present.
    pub const INFRA_REQUIRED: &str = "SECUREPAY_INFRA_REQUIRED";
    /// Superuser URL of the test PostgreSQL cluster, e.g. `postgres://postgres:pw@127.0.0.1:15432/postgres`.
    pub const PG_ADMIN_URL: &str = "SECUREPAY_TEST_PG_ADMIN_URL";
    /// `redis://127.0.0.1:16379`.
    pub const REDIS_URL: &str = "SECUREPAY_TEST_REDIS_URL";
    /// Kafka bootstrap servers, `127.0.0.1:19092`.
    pub const KAFKA_BROKERS: &str = "SECUREPAY_TEST_KAFKA_BROKERS";
    /// Path of the SPIRE agent's Workload API unix socket.
    pub const SPIRE_AGENT_SOCKET: &str = "SECUREPAY_TEST_SPIRE_AGENT_SOCKET";
    /// Path of the SPIRE server's admin unix socket.
    pub const SPIRE_SERVER_SOCKET: &str = "SECUREPAY_TEST_SPIRE_SERVER_SOCKET";
    /// Directory holding the runner's binaries (`spire-server`, `spire-agent`, ...), if tests need them.
    pub const TOOLS_BIN: &str = "SECUREPAY_TEST_TOOLS_BIN";
    /// Jaeger OTLP/HTTP endpoint, `http://127.0.0.1:14318`.
    pub const OTLP_HTTP: &str = "SECUREPAY_TEST_OTLP_HTTP";
    /// Jaeger OTLP/gRPC endpoint, `http://127.0.0.1:14317`.
    pub const OTLP_GRPC: &str = "SECUREPAY_TEST_OTLP_GRPC";
    /// Jaeger query API base URL, `http://127.0.0.1:26686`.
    pub const JAEGER_QUERY_URL: &str = "SECUREPAY_TEST_JAEGER_QUERY_URL";
    /// Prometheus base URL, `http://127.0.0.1:19090`.
    pub const PROMETHEUS_URL: &str = "SECUREPAY_TEST_PROMETHEUS_URL";
    /// The runner's state directory for this test run.
    pub const STATE_DIR: &str = "SECUREPAY_TEST_STATE_DIR";
    /// The services of the test platform (end-to-end tests): base URLs of the gateway and of the
    /// admin listeners of notification, payment and account.
    pub const GATEWAY_URL: &str = "SECUREPAY_TEST_GATEWAY_URL";
    pub const NOTIFICATION_ADMIN_URL: &str = "SECUREPAY_TEST_NOTIFICATION_ADMIN_URL";
    pub const PAYMENT_ADMIN_URL: &str = "SECUREPAY_TEST_PAYMENT_ADMIN_URL";
    pub const ACCOUNT_ADMIN_URL: &str = "SECUREPAY_TEST_ACCOUNT_ADMIN_URL";
    /// The development JWT signing key the gateway trusts (mint tokens with `securepay-gateway token`).
    pub const JWT_DEV_KEY: &str = "SECUREPAY_TEST_JWT_DEV_KEY";
}

/// Returns the value of a component variable.
///
/// Missing under `SECUREPAY_INFRA_REQUIRED=1`: panics, so the test fails. Missing otherwise: prints
/// why the test is skipped and returns `None`; the caller returns early.
pub fn component(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if infra_required() => {
            panic!("{name} is not set although {} = 1: the runner did not start this component", var::INFRA_REQUIRED)
        }
        _ => {
            eprintln!("skipped: {name} is not set; run the tests with `cargo xtask test`");
            None
        }
    }
}

/// Whether the real components are promised by the runner.
pub fn infra_required() -> bool {
    std::env::var(var::INFRA_REQUIRED).is_ok_and(|v| v == "1")
}

/// Instantiates a port's contract suite once per implementation, so every guarantee runs against
/// the real adapter and its simulated twin alike.
///
/// Each case is a generic `async fn case(subject)` in the calling module; each implementation is
/// a `make` function in that module returning `Option<subject>` (`None` skips, see [`component`]).
///
/// ```ignore
/// securepay_testkit::contract_suite! {
///     cases: [contract_a, contract_b],
///     implementations: { memory => memory_harness, postgres => pg_harness },
/// }
/// ```
#[macro_export]
macro_rules! contract_suite {
    (cases: $cases:tt, implementations: { $($module:ident => $make:path),+ $(,)? } $(,)?) => {
        $( $crate::contract_suite!(@implementation $module, $make, $cases); )+
    };
    (@implementation $module:ident, $make:path, [$($case:ident),+ $(,)?]) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(subject) = $make().await else { return };
                    super::$case(subject).await;
                }
            )+
        }
    };
}
