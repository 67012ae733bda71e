//! Rate limits (SPEC §5): GCRA per client IP before authentication and per subject after it
//! (`governor`). A refusal is a 429 `rate_limited` problem with `Retry-After`; every answer of a
//! limited route carries the `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`
//! headers of draft-ietf-httpapi-ratelimit-headers for the limiter that decided it.

use std::hash::Hash;
use std::net::IpAddr;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::{RateLimitConfig, RateQuota};
use crate::problem::Problem;

pub const REJECTIONS: &str = "securepay_rate_limit_rejections_total";

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// One keyed GCRA limiter and the headers it reports.
pub struct Limiter<K: Hash + Eq + Clone> {
    scope: &'static str,
    quota: RateQuota,
    inner: Keyed<K>,
}

/// What a limiter decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the quota is fully available again (allowed) or until a retry can pass (refused).
    pub reset_seconds: u64,
}

impl Verdict {
    pub fn apply_headers(&self, headers: &mut HeaderMap) {
        headers.insert("ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("ratelimit-reset", HeaderValue::from(self.reset_seconds));
    }

    /// The 429 answer of a refused request.
    pub fn rejection(&self) -> Response {
        let mut response =
            Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests; retry later")
                .into_response();
        self.apply_headers(response.headers_mut());
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.reset_seconds));
        response
    }
}

fn ceil_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub fn new(scope: &'static str, quota: RateQuota) -> Limiter<K> {
        let q = Quota::per_second(quota.per_second).allow_burst(quota.burst);
        Limiter { scope, quota, inner: RateLimiter::keyed(q).with_middleware::<StateInformationMiddleware>() }
    }

    /// Takes one cell for `key`.
    pub fn check(&self, key: &K) -> Verdict {
        let limit = self.quota.burst.get();
        match self.inner.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let used = u64::from(limit - remaining.min(limit));
                let per_s = u64::from(self.quota.per_second.get());
                Verdict { allowed: true, limit, remaining, reset_seconds: used.div_ceil(per_s) }
            }
            Err(not_until) => {
                metrics::counter!(REJECTIONS, "scope" => self.scope).increment(1);
                let wait = not_until.wait_time_from(self.inner.clock().now());
                Verdict { allowed: false, limit, remaining: 0, reset_seconds: ceil_seconds(wait).max(1) }
            }
        }
    }

    /// Forgets keys whose buckets are full again (call periodically so memory stays bounded).
    pub fn forget_idle(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }
}

/// The gateway's two limiters.
pub struct RateLimits {
    pub ip: Limiter<IpAddr>,
    pub subject: Limiter<String>,
}

impl RateLimits {
    pub fn new(config: RateLimitConfig) -> RateLimits {
        RateLimits { ip: Limiter::new("ip", config.ip), subject: Limiter::new("subject", config.subject) }
    }

    pub fn forget_idle(&self) {
        self.ip.forget_idle();
        self.subject.forget_idle();
    }

    /// Exports the rejection counters at zero so dashboards have data on an idle stack.
    pub fn register_known_series() {
        for scope in ["ip", "subject"] {
            metrics::counter!(REJECTIONS, "scope" => scope).increment(0);
        }
    }
}
