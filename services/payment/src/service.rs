//! payment.v1: InitiatePayment and GetPayment over the ports.
//!
//! InitiatePayment, in order: authorize the caller (SVID per method + subject) → validate
//! (SPEC §4) → idempotency ([`crate::idempotency`]) → balance pre-check ([`crate::accounts`]) →
//! ONE store transaction: the PENDING payment, its `payment.initiated` outbox event (with a W3C
//! `traceparent`) and the completion of the idempotency claim with the encoded response — shared
//! with the payments accepted at the same moment ([`crate::group_commit`]). A request that writes
//! nothing releases its claim so a retry can run.
//!
//! The response body of a replay is byte-identical to the first one (`replayed` stays `false`
//! inside it); a replay is signalled in the response metadata [`REPLAYED_METADATA`].
//!
//! Tracing (SPEC §8): InitiatePayment runs in a `payment.initiate` server span parented from the
//! caller's gRPC metadata, GetPayment in a `payment.get` span; the outbox event carries the
//! `payment.initiate` span's context, so the publish and the settlement join the same trace.

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use securepay_core::events::PaymentInitiated;
use securepay_core::identity::method;
use securepay_core::ids::Subject;
use securepay_core::money::AmountPolicy;
use securepay_core::payment::{Payment, PaymentRequest};
use securepay_kit::authorize;
use securepay_kit::metrics as kit_metrics;
use securepay_kit::trace::{self as kit_trace, names};
use securepay_ports::{Clock, IdempotencyStore, Ids, NewPayment, PaymentStore, PortError};
use securepay_proto::payment::v1 as wire;
use securepay_proto::payment::v1::payment_service_server;
use time::OffsetDateTime;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::accounts::{AccountError, Accounts, BalanceCheck};
use crate::error::ServiceError;
use crate::group_commit::{GroupCommit, GroupCommitConfig};
use crate::idempotency::{Begin, Claim, Idempotency};
use crate::metrics;
use crate::trace::{TRACEPARENT, traceparent};
use crate::validate;

/// Response metadata entry present (`true`) when the body is a replay of the first response.
pub const REPLAYED_METADATA: &str = "x-securepay-idempotent-replayed";

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub amount_policy: AmountPolicy,
    /// How long a duplicate waits for the first request with its key before `request_in_progress`.
    pub in_flight_wait: Duration,
    /// TEST-ONLY failpoint (`SECUREPAY_FAILPOINT=crash_after_commit`): abort the process right after
    /// a payment's commit, before anything is published.
    pub crash_after_commit: bool,
    /// How accepted payments share store transactions ([`crate::group_commit`]).
    pub group_commit: GroupCommitConfig,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            amount_policy: AmountPolicy::default(),
            // Longer than a healthy first request takes (the account client gives up after about
            // 3 s), far shorter than the truth's 30 s lease, and shorter than the gateway's backend
            // budget (90 % of its 10 s request timeout), so a waiting duplicate gets its
            // `request_in_progress` instead of the gateway's 504 (found by the simulator, seed 23 of
            // partition-database).
            in_flight_wait: Duration::from_secs(7),
            crash_after_commit: false,
            group_commit: GroupCommitConfig::default(),
        }
    }
}

/// A served InitiatePayment: the response body and whether it is a replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Initiated {
    pub response: wire::InitiatePaymentResponse,
    pub replayed: bool,
}

/// The service over its store `S` (payments + outbox + idempotency truth), the idempotency fast
/// path `F` and the account service `A`.
pub struct PaymentService<S, F, A> {
    store: Arc<S>,
    idempotency: Idempotency<S, F>,
    commits: GroupCommit,
    accounts: Arc<A>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn Ids>,
    config: ServiceConfig,
}

/// Clones share everything (the handler moves a clone into its own task).
impl<S, F, A> Clone for PaymentService<S, F, A> {
    fn clone(&self) -> Self {
        PaymentService {
            store: self.store.clone(),
            idempotency: self.idempotency.clone(),
            commits: self.commits.clone(),
            accounts: self.accounts.clone(),
            clock: self.clock.clone(),
            ids: self.ids.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S, F, A> PaymentService<S, F, A>
where
    S: PaymentStore + IdempotencyStore + 'static,
    F: IdempotencyStore,
    A: Accounts,
{
    pub fn new(
        store: Arc<S>,
        fast: Arc<F>,
        accounts: Arc<A>,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn Ids>,
        config: ServiceConfig,
    ) -> Self {
        let idempotency = Idempotency::new(store.clone(), fast, clock.clone(), config.in_flight_wait);
        let commits = GroupCommit::start(store.clone(), config.group_commit.clone());
        PaymentService { store, idempotency, commits, accounts, clock, ids, config }
    }

    /// InitiatePayment for an authorized `subject`; `trace` is the caller's `traceparent`, if any.
    pub async fn initiate(
        &self,
        subject: Subject,
        request: &wire::InitiatePaymentRequest,
        trace: Option<&str>,
    ) -> Result<Initiated, ServiceError> {
        let request = validate::initiate_request(subject, request, self.config.amount_policy)?;
        let mut claim = match &request.idempotency_key {
            None => None,
            Some(key) => match self.idempotency.begin(&request.subject, key, request.fingerprint()).await? {
                Begin::Replay(bytes) => return decode_replay(&bytes),
                Begin::Execute(claim) => Some(claim),
            },
        };
        for _ in 0..EXECUTIONS_MAX {
            match self.execute(&request, claim.as_ref(), trace).await {
                Ok((response, bytes)) => {
                    if let Some(claim) = claim {
                        self.idempotency.committed(claim, &bytes).await;
                    }
                    return Ok(Initiated { response, replayed: false });
                }
                Err(Executed::Refused(error)) => {
                    if let Some(claim) = claim {
                        self.idempotency.release(claim).await;
                    }
                    return Err(error);
                }
                Err(Executed::ClaimLost) => {
                    // A request with the same key was recorded first (one the fast path did not
                    // see, or ours completed it after our lease ran out): the truth decides.
                    let lost = claim.take().expect("a claim can only be lost when there was one");
                    match self.idempotency.after_claim_lost(lost).await? {
                        Begin::Replay(bytes) => return decode_replay(&bytes),
                        Begin::Execute(again) => claim = Some(again),
                    }
                }
            }
        }
        if let Some(claim) = claim {
            self.idempotency.release(claim).await;
        }
        Err(ServiceError::RequestInProgress)
    }

    /// Pre-check, then the one transaction. Returns the response and its encoding.
    async fn execute(
        &self,
        request: &PaymentRequest,
        claim: Option<&Claim>,
        trace: Option<&str>,
    ) -> Result<(wire::InitiatePaymentResponse, Vec<u8>), Executed> {
        match self.accounts.check_balance(&request.subject, request).await {
            Ok(BalanceCheck::Sufficient) => {}
            Ok(BalanceCheck::Insufficient) => return Err(Executed::Refused(ServiceError::InsufficientFunds)),
            Err(error) => {
                return Err(Executed::Refused(match error {
                    AccountError::Forbidden => {
                        kit_metrics::auth_failure("object_forbidden");
                        ServiceError::Forbidden
                    }
                    AccountError::UnknownAccount => ServiceError::UnknownAccount,
                    AccountError::CurrencyMismatch => ServiceError::CurrencyMismatch,
                    AccountError::InvalidAmount => {
                        ServiceError::invalid("invalid_amount", "the amount is not valid for this account")
                    }
                    AccountError::Unavailable => ServiceError::AccountServiceUnavailable,
                }));
            }
        }

        let now = micros(self.clock.now());
        let id = request.payment_id.unwrap_or_else(|| self.ids.payment_id());
        let payment = Payment::accept(id, request, now);
        let event = PaymentInitiated {
            event_id: self.ids.event_id(),
            payment_id: id,
            subject: request.subject.clone(),
            from: request.from,
            to: request.to,
            amount: request.amount,
            occurred_at: now,
        };
        let response = wire::InitiatePaymentResponse { payment: Some(crate::wire::payment(&payment)), replayed: false };
        let bytes = response.encode_to_vec();
        // The current span's context (`payment.initiate`) when an OpenTelemetry layer is
        // installed; without one (simulation) the deterministic traceparent from the `Ids` port.
        let mut headers = kit_trace::headers_for_current_span();
        if headers.is_empty() {
            headers.push((TRACEPARENT.to_owned(), traceparent(trace, self.ids.as_ref())));
        }
        let completion = claim.map(|claim| claim.completion(bytes.clone()));
        let status = payment.status;
        let item = NewPayment { payment, event, headers, idempotency: completion };
        match self.commits.insert(item).await {
            Ok(()) => {}
            Err(PortError::Refused { rule: "payment_exists" }) => {
                return Err(Executed::Refused(ServiceError::PaymentExists));
            }
            Err(PortError::Refused { rule: "idempotency_claim_lost" }) => return Err(Executed::ClaimLost),
            Err(PortError::Unavailable { .. }) => return Err(Executed::Refused(ServiceError::Unavailable)),
            Err(error) => {
                tracing::error!(%error, payment_id = %id, "payment insert refused");
                return Err(Executed::Refused(ServiceError::Internal));
            }
        }
        if self.config.crash_after_commit {
            tracing::error!(payment_id = %id, "FAILPOINT crash_after_commit: aborting after the commit (test only)");
            std::process::abort();
        }
        metrics::payment_status(status);
        tracing::info!(payment_id = %id, "payment accepted");
        Ok((response, bytes))
    }

    /// GetPayment: only the payment's subject may read it.
    pub async fn get(&self, subject: &Subject, payment_id: &str) -> Result<wire::Payment, ServiceError> {
        let id = validate::payment_id(payment_id)?;
        let payment = match self.store.get(id).await {
            Ok(Some(payment)) => payment,
            Ok(None) => return Err(ServiceError::PaymentNotFound),
            Err(PortError::Unavailable { .. }) => return Err(ServiceError::Unavailable),
            Err(error) => {
                tracing::error!(%error, payment_id = %id, "payment read failed");
                return Err(ServiceError::Internal);
            }
        };
        if payment.subject != *subject {
            kit_metrics::auth_failure("object_forbidden");
            return Err(ServiceError::Forbidden);
        }
        Ok(crate::wire::payment(&payment))
    }

    /// Purges idempotency records older than the retention (24 h) every `every`, until `shutdown`.
    pub async fn run_purge(&self, every: Duration, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let cutoff = self.clock.now() - time::Duration::hours(IDEMPOTENCY_RETENTION_H);
            match self.idempotency.purge_before(cutoff).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "idempotency keys purged"),
                Err(error) => tracing::warn!(%error, "idempotency purge failed; retrying next round"),
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// How often one request may execute (balance check and insert) before its key's races make it
/// give up with `request_in_progress`: the first try, and a retry each time the truth's record of
/// the key vanished between the lost insert and the truth's answer.
const EXECUTIONS_MAX: usize = 3;

/// How long idempotency keys are kept at least (SPEC §6.1).
pub const IDEMPOTENCY_RETENTION_H: i64 = 24;

enum Executed {
    /// Nothing was written: release the claim.
    Refused(ServiceError),
    /// The claim was completed by a racing identical request.
    ClaimLost,
}

fn decode_replay(bytes: &[u8]) -> Result<Initiated, ServiceError> {
    match wire::InitiatePaymentResponse::decode(bytes) {
        Ok(response) => Ok(Initiated { response, replayed: true }),
        Err(_) => {
            tracing::error!("a stored idempotent response does not decode");
            Err(ServiceError::Internal)
        }
    }
}

/// PostgreSQL keeps microseconds: the first response shows the instants a read will show.
fn micros(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_nanosecond(at.nanosecond() / 1_000 * 1_000).expect("a truncated nanosecond is in range")
}

#[tonic::async_trait]
impl<S, F, A> payment_service_server::PaymentService for PaymentService<S, F, A>
where
    S: PaymentStore + IdempotencyStore,
    F: IdempotencyStore,
    A: Accounts,
{
    async fn initiate_payment(
        &self,
        request: Request<wire::InitiatePaymentRequest>,
    ) -> Result<Response<wire::InitiatePaymentResponse>, Status> {
        let started = Instant::now();
        let span = tracing::info_span!(names::PAYMENT_INITIATE, otel.kind = "server");
        kit_trace::set_parent(&span, kit_trace::extract_from_metadata(request.metadata()));
        let result = async {
            let caller = authorize(&request, method::INITIATE_PAYMENT, self.clock.now())?;
            let trace = request.metadata().get(TRACEPARENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
            // In its own task: a caller that hangs up (a gateway timeout) does not cut a request
            // between its idempotency claim and its commit; a retry then replays its response
            // instead of waiting out the claim's lease.
            let this = self.clone();
            let message = request.into_inner();
            let task = async move { this.initiate(caller.subject, &message, trace.as_deref()).await };
            let initiated = tokio::task::spawn(task.instrument(span.clone()))
                .await
                .map_err(|_| Status::from(ServiceError::Internal))?
                .map_err(Status::from)?;
            let mut response = Response::new(initiated.response);
            if initiated.replayed {
                response.metadata_mut().insert(REPLAYED_METADATA, MetadataValue::from_static("true"));
            }
            Ok(response)
        }
        .instrument(span.clone())
        .await;
        record(method::INITIATE_PAYMENT, &result, started);
        result
    }

    async fn get_payment(&self, request: Request<wire::GetPaymentRequest>) -> Result<Response<wire::Payment>, Status> {
        let started = Instant::now();
        let span = tracing::info_span!("payment.get", otel.kind = "server");
        kit_trace::set_parent(&span, kit_trace::extract_from_metadata(request.metadata()));
        let result = async {
            let caller = authorize(&request, method::GET_PAYMENT, self.clock.now())?;
            let payment = self.get(&caller.subject, &request.get_ref().payment_id).await.map_err(Status::from)?;
            Ok(Response::new(payment))
        }
        .instrument(span)
        .await;
        record(method::GET_PAYMENT, &result, started);
        result
    }
}

fn record<T>(method: &'static str, result: &Result<T, Status>, started: Instant) {
    let code = result.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code());
    kit_metrics::grpc_request("payment", method, code, started.elapsed());
}
