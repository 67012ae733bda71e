//! The gateway's configuration: one typed struct, read from the environment and validated at
//! start-up (a bad value stops the process with a message naming the variable).

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use securepay_core::money::AmountPolicy;

pub const ENV_LISTEN_ADDR: &str = "SECUREPAY_LISTEN_ADDR";
pub const ENV_PAYMENT_ADDR: &str = "SECUREPAY_PAYMENT_ADDR";
pub const ENV_ACCOUNT_ADDR: &str = "SECUREPAY_ACCOUNT_ADDR";
pub const ENV_NOTIFICATION_ADDR: &str = "SECUREPAY_NOTIFICATION_ADDR";
pub const ENV_JWKS_PATH: &str = "SECUREPAY_JWKS_PATH";
pub const ENV_JWT_ISSUER: &str = "SECUREPAY_JWT_ISSUER";
pub const ENV_JWT_AUDIENCE: &str = "SECUREPAY_JWT_AUDIENCE";
pub const ENV_RATE_IP_PER_S: &str = "SECUREPAY_RATE_LIMIT_IP_PER_S";
pub const ENV_RATE_IP_BURST: &str = "SECUREPAY_RATE_LIMIT_IP_BURST";
pub const ENV_RATE_SUBJECT_PER_S: &str = "SECUREPAY_RATE_LIMIT_SUBJECT_PER_S";
pub const ENV_RATE_SUBJECT_BURST: &str = "SECUREPAY_RATE_LIMIT_SUBJECT_BURST";
pub const ENV_REQUEST_TIMEOUT_MS: &str = "SECUREPAY_REQUEST_TIMEOUT_MS";

pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_ISSUER: &str = "https://auth.securepay.dev";
pub const DEFAULT_AUDIENCE: &str = "securepay-api";

/// Largest request body accepted (413 `payload_too_large` above it).
pub const BODY_LIMIT_BYTES: usize = 16 * 1024;
/// Largest total size of the request headers, names and values (431 above it).
pub const HEADER_LIMIT_BYTES: usize = 8 * 1024;
/// Deepest JSON nesting accepted in a body (400 `invalid_json` beyond it).
pub const JSON_DEPTH_MAX: usize = 8;
/// Clock skew tolerated on `exp` and `nbf`.
pub const JWT_LEEWAY_SECONDS: u64 = 30;

/// What a JWT must say about who issued it and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    pub issuer: String,
    pub audience: String,
    pub leeway_seconds: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            issuer: DEFAULT_ISSUER.to_owned(),
            audience: DEFAULT_AUDIENCE.to_owned(),
            leeway_seconds: JWT_LEEWAY_SECONDS,
        }
    }
}

/// A GCRA quota: a sustained rate and the burst allowed on top of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateQuota {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Per client IP, applied before authentication.
    pub ip: RateQuota,
    /// Per verified subject, applied after authentication.
    pub subject: RateQuota,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        let q = |per_second: u32, burst: u32| RateQuota {
            per_second: NonZeroU32::new(per_second).expect("non-zero"),
            burst: NonZeroU32::new(burst).expect("non-zero"),
        };
        RateLimitConfig { ip: q(50, 100), subject: q(10, 20) }
    }
}

/// Everything the router needs besides its backends and keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub jwt: JwtConfig,
    pub rate_limits: RateLimitConfig,
    /// Whole-request budget (504 `gateway_timeout` beyond it); backend calls get a little less.
    pub request_timeout: Duration,
    pub amount_policy: AmountPolicy,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            jwt: JwtConfig::default(),
            rate_limits: RateLimitConfig::default(),
            request_timeout: Duration::from_secs(10),
            amount_policy: AmountPolicy::default(),
        }
    }
}

/// The process configuration: the router's, plus where to listen and whom to call.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    pub listen_addr: std::net::SocketAddr,
    /// The backends' gRPC addresses (host:port).
    pub backends: crate::backends::Channels<String>,
    pub jwks_path: PathBuf,
    pub gateway: GatewayConfig,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

fn env_nonzero(name: &'static str, default: u32) -> anyhow::Result<NonZeroU32> {
    match std::env::var(name) {
        Ok(text) if !text.is_empty() => {
            text.parse::<NonZeroU32>().map_err(|_| anyhow::anyhow!("{name} must be a positive integer, not {text:?}"))
        }
        _ => Ok(NonZeroU32::new(default).expect("defaults are non-zero")),
    }
}

fn host_port(name: &'static str) -> anyhow::Result<String> {
    let text = std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set (host:port)"))?;
    let ok = text.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    anyhow::ensure!(ok, "{name} must be host:port, not {text:?}");
    Ok(text)
}

/// A string header value from the environment for the JWT checks: non-empty, visible ASCII.
fn claim_value(name: &'static str, default: &str) -> anyhow::Result<String> {
    let text = env_or(name, default);
    anyhow::ensure!(text.bytes().all(|b| b.is_ascii_graphic()), "{name} must be visible ASCII");
    Ok(text)
}

impl GatewayConfig {
    /// The router's configuration from the environment (defaults for what is unset).
    pub fn from_env() -> anyhow::Result<GatewayConfig> {
        let defaults = RateLimitConfig::default();
        let timeout_ms = env_nonzero(ENV_REQUEST_TIMEOUT_MS, 10_000)?;
        Ok(GatewayConfig {
            jwt: JwtConfig {
                issuer: claim_value(ENV_JWT_ISSUER, DEFAULT_ISSUER)?,
                audience: claim_value(ENV_JWT_AUDIENCE, DEFAULT_AUDIENCE)?,
                leeway_seconds: JWT_LEEWAY_SECONDS,
            },
            rate_limits: RateLimitConfig {
                ip: RateQuota {
                    per_second: env_nonzero(ENV_RATE_IP_PER_S, defaults.ip.per_second.get())?,
                    burst: env_nonzero(ENV_RATE_IP_BURST, defaults.ip.burst.get())?,
                },
                subject: RateQuota {
                    per_second: env_nonzero(ENV_RATE_SUBJECT_PER_S, defaults.subject.per_second.get())?,
                    burst: env_nonzero(ENV_RATE_SUBJECT_BURST, defaults.subject.burst.get())?,
                },
            },
            request_timeout: Duration::from_millis(u64::from(timeout_ms.get())),
            amount_policy: AmountPolicy::default(),
        })
    }
}

impl ProcessConfig {
    pub fn from_env() -> anyhow::Result<ProcessConfig> {
        let listen = env_or(ENV_LISTEN_ADDR, DEFAULT_LISTEN_ADDR);
        Ok(ProcessConfig {
            listen_addr: listen.parse().map_err(|_| {
                anyhow::anyhow!("{ENV_LISTEN_ADDR} must be an address like 127.0.0.1:8080, not {listen:?}")
            })?,
            backends: crate::backends::Channels {
                payment: host_port(ENV_PAYMENT_ADDR)?,
                account: host_port(ENV_ACCOUNT_ADDR)?,
                notification: host_port(ENV_NOTIFICATION_ADDR)?,
            },
            jwks_path: PathBuf::from(
                std::env::var(ENV_JWKS_PATH).map_err(|_| anyhow::anyhow!("{ENV_JWKS_PATH} is not set"))?,
            ),
            gateway: GatewayConfig::from_env()?,
        })
    }
}
