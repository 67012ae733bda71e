//! The balance pre-check (flow steps 3–5): the [`Accounts`] port and its gRPC implementation
//! [`AccountClient`] towards account.v1 `CheckBalance`.
//!
//! The client never hangs a request: every attempt has a deadline; only `UNAVAILABLE` and
//! `DEADLINE_EXCEEDED` (and `CANCELLED`) are retried, at most `attempts` times in all, with exponential backoff and
//! full jitter drawn from the `Ids` port (seeded in simulation, so runs replay); a
//! [`CircuitBreaker`] fails calls fast while the account service is down. Any way of not getting an
//! answer ends as [`AccountError::Unavailable`] within about
//! `attempts × deadline + Σ backoff`. The account service's own refusals (stable codes in
//! `x-securepay-error-code`) come back typed. Each attempt carries the current span's trace
//! context in its metadata (`securepay_kit::trace`).
//!
//! The client takes a ready [`AccountChannel`]: in production the mTLS channel of
//! `securepay_identity::grpc::channel`, which also resends a call a closing connection never sent
//! (the transport proves who we are, so [`AccountClient::new`] adds nothing to the calls); the
//! simulator and plaintext tests pass their own [`Interceptor`] to [`AccountClient::with_interceptor`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use securepay_core::ids::Subject;
use securepay_core::payment::PaymentRequest;
use securepay_kit::status::error_code;
use securepay_kit::trace;
use securepay_kit::with_subject;
use securepay_ports::Ids;
use securepay_proto::account::v1::CheckBalanceRequest;
use securepay_proto::account::v1::account_service_client::AccountServiceClient;
use tonic::Code;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tracing::Span;

use crate::breaker::CircuitBreaker;

/// The advisory verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceCheck {
    Sufficient,
    Insufficient,
}

/// Why the pre-check gave no verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    #[error("the subject does not own the paying account")]
    Forbidden,
    #[error("an account does not exist")]
    UnknownAccount,
    #[error("the accounts hold different currencies")]
    CurrencyMismatch,
    #[error("the account service refused the amount")]
    InvalidAmount,
    #[error("the account service is unavailable")]
    Unavailable,
}

/// The account service as the payment service needs it.
#[async_trait]
pub trait Accounts: Send + Sync + 'static {
    /// Whether `request.from` (owned by `subject`) can cover `request.amount` to `request.to`.
    async fn check_balance(&self, subject: &Subject, request: &PaymentRequest) -> Result<BalanceCheck, AccountError>;
}

#[derive(Debug, Clone)]
pub struct AccountClientConfig {
    /// Deadline of one attempt.
    pub deadline: Duration,
    /// Attempts in all (first + retries).
    pub attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Consecutive failed attempts that open the circuit.
    pub breaker_threshold: u32,
    pub breaker_cool_down: Duration,
}

impl Default for AccountClientConfig {
    fn default() -> Self {
        AccountClientConfig {
            deadline: Duration::from_millis(800),
            attempts: 3,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
            breaker_threshold: 5,
            breaker_cool_down: Duration::from_secs(5),
        }
    }
}

/// The channel the client sends over: for real, one that resends a call its connection closed
/// before sending (`securepay_identity::grpc::ResendingChannel`; a plain [`Channel`] converts
/// into it); madsim-tonic's own channel in simulation.
#[cfg(not(madsim))]
pub type AccountChannel = securepay_identity::grpc::ResendingChannel;
#[cfg(madsim)]
pub type AccountChannel = Channel;

/// The generated client with an interceptor: real tonic wraps the channel, madsim-tonic keeps the
/// interceptor beside it.
#[cfg(not(madsim))]
type InterceptedClient<I> = AccountServiceClient<tonic::service::interceptor::InterceptedService<AccountChannel, I>>;
#[cfg(madsim)]
type InterceptedClient<I> = AccountServiceClient<Channel, I>;

/// Adds nothing to a call: the mTLS channel itself identifies this workload.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoInterceptor;

impl Interceptor for NoInterceptor {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        Ok(request)
    }
}

/// A lazily connecting plaintext channel to `uri` (`http://host:port`) — for the simulator and
/// tests only; production dials with `securepay_identity::grpc::channel`.
pub fn plaintext_channel(uri: &str, connect_timeout: Duration) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(uri.to_owned())
        .map_err(|_| format!("not a valid account service address: {uri}"))?
        .connect_timeout(connect_timeout);
    Ok(endpoint.connect_lazy())
}

/// account.v1 over a channel, with `I` adding to each call what the channel does not carry
/// ([`NoInterceptor`] over mTLS; the simulator's own interceptor in madsim).
pub struct AccountClient<I: Interceptor = NoInterceptor> {
    client: InterceptedClient<I>,
    config: AccountClientConfig,
    breaker: CircuitBreaker,
    ids: Arc<dyn Ids>,
}

impl AccountClient<NoInterceptor> {
    /// A client over `channel` (the mTLS channel to the account service).
    pub fn new(channel: impl Into<AccountChannel>, config: AccountClientConfig, ids: Arc<dyn Ids>) -> Self {
        Self::with_interceptor(channel, NoInterceptor, config, ids)
    }
}

impl<I: Interceptor + Clone + Send + Sync + 'static> AccountClient<I> {
    /// A client over `channel` whose calls pass through `interceptor` first.
    pub fn with_interceptor(
        channel: impl Into<AccountChannel>,
        interceptor: I,
        config: AccountClientConfig,
        ids: Arc<dyn Ids>,
    ) -> Self {
        let client = AccountServiceClient::with_interceptor(channel.into(), interceptor);
        let breaker = CircuitBreaker::new(config.breaker_threshold, config.breaker_cool_down);
        AccountClient { client, config, breaker, ids }
    }

    /// Full jitter: uniform in [0, min(max, base·2^retry)], from the `Ids` port.
    fn backoff(&self, retry: u32) -> Duration {
        let cap = self.config.backoff_base.saturating_mul(1 << retry.min(16)).min(self.config.backoff_max);
        let unit = (self.ids.uuid().as_u128() % 1_000_001) as f64 / 1_000_000.0;
        cap.mul_f64(unit)
    }
}

#[async_trait]
impl<I: Interceptor + Clone + Send + Sync + 'static> Accounts for AccountClient<I> {
    async fn check_balance(&self, subject: &Subject, request: &PaymentRequest) -> Result<BalanceCheck, AccountError> {
        let message = CheckBalanceRequest {
            account_id: request.from.to_string(),
            amount: request.amount.to_string(),
            currency: request.amount.currency().code().to_owned(),
            to_account: request.to.to_string(),
        };
        for attempt in 0..self.config.attempts {
            if attempt > 0 {
                tokio::time::sleep(self.backoff(attempt - 1)).await;
            }
            if !self.breaker.allow(tokio::time::Instant::now()) {
                tracing::warn!("account service circuit open; failing fast");
                return Err(AccountError::Unavailable);
            }
            let mut call = tonic::Request::new(message.clone());
            call.set_timeout(self.config.deadline);
            with_subject(&mut call, subject);
            trace::inject_into_metadata(&Span::current(), call.metadata_mut());
            let mut client = self.client.clone();
            let answer = match tokio::time::timeout(self.config.deadline, client.check_balance(call)).await {
                Ok(answer) => answer,
                Err(_elapsed) => Err(tonic::Status::deadline_exceeded("account service deadline")),
            };
            match answer {
                Ok(response) => {
                    self.breaker.on_success();
                    let sufficient = response.into_inner().sufficient;
                    return Ok(if sufficient { BalanceCheck::Sufficient } else { BalanceCheck::Insufficient });
                }
                Err(status) if is_transient(status.code()) => {
                    self.breaker.on_failure(tokio::time::Instant::now());
                    tracing::warn!(attempt, code = ?status.code(), "account service call failed");
                }
                Err(status) => {
                    self.breaker.on_success();
                    return Err(refusal(&status));
                }
            }
        }
        Err(AccountError::Unavailable)
    }
}

/// Not an answer: the service was unreachable, too slow, or the call was cut. CheckBalance reads
/// only, so retrying these is safe.
fn is_transient(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled)
}

/// The account service's refusal, by its stable code.
fn refusal(status: &tonic::Status) -> AccountError {
    match error_code(status) {
        Some("forbidden") => AccountError::Forbidden,
        Some("unknown_account") => AccountError::UnknownAccount,
        Some("currency_mismatch") => AccountError::CurrencyMismatch,
        Some("invalid_amount") => AccountError::InvalidAmount,
        other => {
            tracing::warn!(code = ?status.code(), error_code = ?other, "unexpected account service refusal");
            AccountError::Unavailable
        }
    }
}
