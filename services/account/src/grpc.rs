//! `securepay.account.v1.AccountService` over the ports.
//!
//! Each handler: authorize the peer for the method (`securepay_kit::authorize`: SVID allow-list and
//! the end-user subject), validate the input (`INVALID_ARGUMENT` with a stable code), read the
//! account cache-aside, authorize the object (only the owner: `PERMISSION_DENIED` `forbidden`;
//! absent: `NOT_FOUND` `unknown_account`), answer. Every call is counted (RED).
//!
//! A payee's existence and currency (all CheckBalance needs of it; fixed when the account is
//! opened) are remembered in process for the balance cache's TTL, so most checks read one balance.
//!
//! Balances served here are advisory: a stale cached balance may say "sufficient" for a payment
//! that settlement then fails with `insufficient_funds` — settlement decides, from the store of
//! record, inside its transaction. The transport (mTLS: `securepay_identity::grpc::serve` in the
//! binary) is not this module's business: it only reads the `PeerSvid` the transport left on the
//! request.
//!
//! Tracing (SPEC §8): each handler runs in a server span (`account.check_balance`,
//! `account.get_balance`) whose parent is the caller's trace context from the gRPC metadata; the
//! cache read is a `cache.lookup` child span, the PostgreSQL fallback read a `db.balance_read` one.

use std::sync::Arc;

use rust_decimal::Decimal;
use securepay_core::identity::method;
use securepay_core::ids::AccountId;
use securepay_core::money::{Amount, AmountPolicy, Currency, MoneyError, format_decimal};
use securepay_kit::status::{status, unavailable};
use securepay_kit::trace::{self, names};
use securepay_ports::{AccountView, BalanceCache, CachedBalance, Clock, LedgerStore, PortError};
use securepay_proto::account::v1::account_service_server::AccountService;
use securepay_proto::account::v1::{Balance, CheckBalanceRequest, CheckBalanceResponse, GetBalanceRequest};
use time::OffsetDateTime;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;

use crate::SERVICE;

/// The span name of `GetBalance` (SPEC §8 names only the balance check; this one follows suit).
pub const GET_BALANCE_SPAN: &str = "account.get_balance";

/// How long a balance stays in the cache (seconds): bounds how stale a read can be if an
/// invalidation after a settlement is lost.
pub const CACHE_TTL_S: u32 = 5;

/// Most payees [`Payees`] remembers; when full it starts over (a bound, not an eviction policy).
pub const PAYEES_MAX: usize = 100_000;

/// What CheckBalance needs of a payee — that it exists, and its currency — remembered in process
/// for as long as the balance cache would keep it ([`CACHE_TTL_S`]), so the payee costs no cache or
/// database round trip on most payments. Both facts are fixed when the account is opened; the
/// payee's balance is never read from here.
#[derive(Debug, Default)]
struct Payees(std::sync::Mutex<std::collections::BTreeMap<AccountId, (Currency, OffsetDateTime)>>);

impl Payees {
    fn get(&self, id: AccountId, now: OffsetDateTime) -> Option<Currency> {
        let known = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        known.get(&id).filter(|(_, until)| now < *until).map(|(currency, _)| *currency)
    }

    fn remember(&self, id: AccountId, currency: Currency, until: OffsetDateTime) {
        let mut known = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() >= PAYEES_MAX {
            known.clear();
        }
        known.insert(id, (currency, until));
    }
}

/// The gRPC service. Cheap to clone (shared handles).
pub struct AccountGrpc<L, C> {
    ledger: Arc<L>,
    cache: Arc<C>,
    clock: Arc<dyn Clock>,
    cache_ttl_s: u32,
    payees: Arc<Payees>,
}

impl<L, C> Clone for AccountGrpc<L, C> {
    fn clone(&self) -> Self {
        AccountGrpc {
            ledger: Arc::clone(&self.ledger),
            cache: Arc::clone(&self.cache),
            clock: Arc::clone(&self.clock),
            cache_ttl_s: self.cache_ttl_s,
            payees: Arc::clone(&self.payees),
        }
    }
}

impl<L: LedgerStore, C: BalanceCache> AccountGrpc<L, C> {
    pub fn new(ledger: Arc<L>, cache: Arc<C>, clock: Arc<dyn Clock>) -> AccountGrpc<L, C> {
        AccountGrpc { ledger, cache, clock, cache_ttl_s: CACHE_TTL_S, payees: Arc::default() }
    }

    /// The payee's currency (`None`: no such account): remembered ([`Payees`]) or read as any
    /// account is, then remembered.
    async fn payee_currency(&self, id: AccountId) -> Result<Option<Currency>, Status> {
        let now = self.clock.now();
        if let Some(currency) = self.payees.get(id, now) {
            return Ok(Some(currency));
        }
        let Some((view, _)) = self.account(id).await? else { return Ok(None) };
        let until = now + time::Duration::seconds(i64::from(self.cache_ttl_s));
        self.payees.remember(id, view.currency, until);
        Ok(Some(view.currency))
    }

    /// The account as last known: from the cache, else from the store (then cached). A cache that
    /// is down, slow or holds an unreadable value is a miss, never an error. Returns the view and
    /// the time it was read from the store.
    async fn account(&self, id: AccountId) -> Result<Option<(AccountView, OffsetDateTime)>, Status> {
        let cached = self.cache.get(id).instrument(tracing::info_span!(names::CACHE_LOOKUP)).await;
        match cached {
            Ok(Some(hit)) if hit.account.id == id => return Ok(Some((hit.account, hit.cached_at))),
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, account_id = %id, "balance cache unusable; reading the store"),
        }
        let read_at = self.clock.now();
        let stored = self.ledger.account(id).instrument(tracing::info_span!(names::DB_BALANCE_READ)).await;
        let view = match stored {
            Ok(Some(view)) => view,
            Ok(None) => return Ok(None),
            Err(PortError::Unavailable { .. }) => return Err(unavailable()),
            Err(error) => {
                tracing::error!(%error, account_id = %id, "account could not be read");
                return Err(status(Code::Internal, "internal", "the account could not be read"));
            }
        };
        let entry = CachedBalance { account: view.clone(), cached_at: read_at };
        if let Err(error) = self.cache.put(&entry, self.cache_ttl_s).await {
            tracing::debug!(%error, account_id = %id, "balance not cached");
        }
        Ok(Some((view, read_at)))
    }

    async fn check_balance_inner(&self, request: Request<CheckBalanceRequest>) -> Result<CheckBalanceResponse, Status> {
        let caller = securepay_kit::authorize(&request, method::CHECK_BALANCE, self.clock.now())?;
        let m = request.into_inner();
        let from = account_id(&m.account_id)?;
        let to = account_id(&m.to_account)?;
        if from == to {
            return Err(status(Code::InvalidArgument, "same_account", "payer and payee must be different accounts"));
        }
        let currency = Currency::from_code(&m.currency).map_err(money_error)?;
        let amount = Amount::parse(&m.amount, currency, amount_policy()).map_err(money_error)?;

        // Both reads at once (the payer's a cache round trip, maybe a database read and a cache
        // fill; the payee's usually remembered); judged in the same order as one after the other:
        // the payer's answer first.
        let (payer, payee) = tokio::join!(self.account(from), self.payee_currency(to));
        let (payer, _) = payer?.ok_or_else(unknown_account)?;
        if payer.owner != caller.subject {
            return Err(forbidden(&caller.subject, from));
        }
        let payee_currency = payee?.ok_or_else(unknown_account)?;
        if payer.currency != currency || payee_currency != currency {
            return Err(status(
                Code::FailedPrecondition,
                "currency_mismatch",
                "both accounts must hold the payment's currency",
            ));
        }
        Ok(CheckBalanceResponse {
            account_id: from.to_string(),
            sufficient: payer.balance >= amount.value(),
            currency: currency.code().to_owned(),
        })
    }

    async fn get_balance_inner(&self, request: Request<GetBalanceRequest>) -> Result<Balance, Status> {
        let caller = securepay_kit::authorize(&request, method::GET_BALANCE, self.clock.now())?;
        let id = account_id(&request.get_ref().account_id)?;
        let (view, as_of) = self.account(id).await?.ok_or_else(unknown_account)?;
        if view.owner != caller.subject {
            return Err(forbidden(&caller.subject, id));
        }
        Ok(Balance {
            account_id: id.to_string(),
            balance: format_decimal(view.balance, view.currency),
            currency: view.currency.code().to_owned(),
            as_of: Some(securepay_proto::convert::timestamp(as_of)),
        })
    }
}

#[tonic::async_trait]
impl<L: LedgerStore, C: BalanceCache> AccountService for AccountGrpc<L, C> {
    async fn check_balance(
        &self,
        request: Request<CheckBalanceRequest>,
    ) -> Result<Response<CheckBalanceResponse>, Status> {
        let span = tracing::info_span!(
            names::ACCOUNT_CHECK_BALANCE,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = method::CHECK_BALANCE
        );
        trace::set_parent(&span, trace::extract_from_metadata(request.metadata()));
        counted(method::CHECK_BALANCE, self.check_balance_inner(request).instrument(span)).await.map(Response::new)
    }

    async fn get_balance(&self, request: Request<GetBalanceRequest>) -> Result<Response<Balance>, Status> {
        let span = tracing::info_span!(
            GET_BALANCE_SPAN,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = method::GET_BALANCE
        );
        trace::set_parent(&span, trace::extract_from_metadata(request.metadata()));
        counted(method::GET_BALANCE, self.get_balance_inner(request).instrument(span)).await.map(Response::new)
    }
}

/// Runs a handler and records it (RED).
async fn counted<T>(method: &'static str, handler: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    let started = tokio::time::Instant::now();
    let result = handler.await;
    let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
    securepay_kit::metrics::grpc_request(SERVICE, method, code, started.elapsed());
    result
}

/// Amounts here are only compared with a balance; the configured per-payment maximum is the
/// payment service's rule, so any well-formed amount is accepted.
fn amount_policy() -> AmountPolicy {
    AmountPolicy { maximum: Decimal::MAX }
}

fn account_id(text: &str) -> Result<AccountId, Status> {
    AccountId::parse(text).map_err(|_| status(Code::InvalidArgument, "invalid_account", "account ids are UUIDs"))
}

fn money_error(error: MoneyError) -> Status {
    status(Code::InvalidArgument, error.code(), error.to_string())
}

fn unknown_account() -> Status {
    status(Code::NotFound, "unknown_account", "no such account")
}

fn forbidden(subject: &securepay_core::ids::Subject, account: AccountId) -> Status {
    securepay_kit::metrics::auth_failure("object_forbidden");
    tracing::warn!(subject = subject.as_str(), account_id = %account, "refused access to another owner's account");
    status(Code::PermissionDenied, "forbidden", "this account belongs to someone else")
}
