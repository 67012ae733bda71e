//! One multiplexed, self-reconnecting connection (`ConnectionManager`) and the one place where a
//! Redis call is bounded in time and its errors become [`PortError`]s.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use securepay_ports::{PortError, PortResult};

/// How long one call (including a reconnect attempt) may take before it fails as `Unavailable`.
/// Short: every caller has a PostgreSQL fallback, and waiting longer only adds latency to it.
pub const CALL_TIMEOUT_DEFAULT: Duration = Duration::from_millis(250);

/// Reconnect attempts the manager makes inside one call before giving up (the call timeout bounds
/// them anyway).
const RECONNECT_RETRIES_MAX: usize = 2;

/// A handle to one Redis. Clones share the connection.
#[derive(Clone)]
pub struct Redis {
    manager: ConnectionManager,
    call_timeout: Duration,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("call_timeout", &self.call_timeout).finish_non_exhaustive()
    }
}

impl Redis {
    /// A handle to the Redis at `url` (`redis://host:port[/db]`). Connects lazily: a Redis that is
    /// down at start-up makes the first calls `Unavailable`, not the service fail to start.
    pub fn connect(url: &str, call_timeout: Duration) -> PortResult<Redis> {
        assert!(call_timeout > Duration::ZERO, "a call timeout of zero would fail every call");
        let client = redis::Client::open(url).map_err(|error| unavailable("open", &error))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(call_timeout))
            .set_response_timeout(Some(call_timeout))
            .set_number_of_retries(RECONNECT_RETRIES_MAX);
        let manager =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|error| unavailable("connect", &error))?;
        Ok(Redis { manager, call_timeout })
    }

    /// `PING`, bounded by the call timeout (readiness checks).
    pub async fn ping(&self) -> PortResult<()> {
        self.call("ping", |mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await.map(drop) }).await
    }

    /// Runs one call on the shared connection, bounded by the call timeout.
    pub(crate) async fn call<T, F, Fut>(&self, what: &'static str, f: F) -> PortResult<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.call_timeout, f(self.manager.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(unavailable(what, &error)),
            Err(_elapsed) => {
                tracing::warn!(call = what, timeout_ms = self.call_timeout.as_millis() as u64, "redis call timed out");
                Err(PortError::Unavailable { component: "redis" })
            }
        }
    }
}

fn unavailable(what: &'static str, error: &redis::RedisError) -> PortError {
    tracing::warn!(call = what, %error, "redis call failed");
    PortError::Unavailable { component: "redis" }
}
