//! The payment service's refusals, typed, and their ONE mapping to gRPC status. Every refusal
//! carries a stable SPEC §3 code (`x-securepay-error-code`, see `securepay_kit::status`) and a
//! short client-safe message; no driver or internal text ever reaches a caller. The gateway maps
//! the same codes once more, to problem+json.

use securepay_kit::status::status;
use tonic::{Code, Status};

/// Why a payment request or read was not served. Nothing was written for any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// A field failed validation (SPEC §4); `code` is its stable code (`invalid_amount`, ...).
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// The subject may not pay from this account, or read this payment.
    #[error("forbidden")]
    Forbidden,
    #[error("payment not found")]
    PaymentNotFound,
    #[error("an account does not exist")]
    UnknownAccount,
    #[error("the accounts hold different currencies")]
    CurrencyMismatch,
    #[error("insufficient funds")]
    InsufficientFunds,
    /// The client-chosen payment id is taken by another payment.
    #[error("payment id already used")]
    PaymentExists,
    /// Same idempotency key, different request (SPEC §6.1).
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    /// Same idempotency key while the first request is still in flight (SPEC §6.1).
    #[error("a request with this idempotency key is in progress")]
    RequestInProgress,
    /// The account service did not answer in time (or its circuit is open).
    #[error("account service unavailable")]
    AccountServiceUnavailable,
    /// Our own store is down.
    #[error("a dependency is unavailable")]
    Unavailable,
    /// A bug or corrupt data: logged where it happens, opaque to the caller.
    #[error("internal error")]
    Internal,
}

impl ServiceError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> ServiceError {
        ServiceError::Invalid { code, message: message.into() }
    }

    /// The stable public code.
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::Invalid { code, .. } => code,
            ServiceError::Forbidden => "forbidden",
            ServiceError::PaymentNotFound => "payment_not_found",
            ServiceError::UnknownAccount => "unknown_account",
            ServiceError::CurrencyMismatch => "currency_mismatch",
            ServiceError::InsufficientFunds => "insufficient_funds",
            ServiceError::PaymentExists => "payment_exists",
            ServiceError::IdempotencyKeyReused => "idempotency_key_reused",
            ServiceError::RequestInProgress => "request_in_progress",
            ServiceError::AccountServiceUnavailable => "account_service_unavailable",
            ServiceError::Unavailable => "service_unavailable",
            ServiceError::Internal => "internal",
        }
    }

    /// The gRPC status code: THE mapping.
    pub fn grpc_code(&self) -> Code {
        match self {
            ServiceError::Invalid { .. } => Code::InvalidArgument,
            ServiceError::Forbidden => Code::PermissionDenied,
            ServiceError::PaymentNotFound | ServiceError::UnknownAccount => Code::NotFound,
            ServiceError::CurrencyMismatch | ServiceError::InsufficientFunds | ServiceError::IdempotencyKeyReused => {
                Code::FailedPrecondition
            }
            ServiceError::PaymentExists => Code::AlreadyExists,
            ServiceError::RequestInProgress => Code::Aborted,
            ServiceError::AccountServiceUnavailable | ServiceError::Unavailable => Code::Unavailable,
            ServiceError::Internal => Code::Internal,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Status {
        let message = match &error {
            ServiceError::Invalid { message, .. } => message.clone(),
            ServiceError::AccountServiceUnavailable | ServiceError::Unavailable => {
                format!("{error}; retry later")
            }
            other => other.to_string(),
        };
        status(error.grpc_code(), error.code(), message)
    }
}

#[cfg(test)]
mod tests {
    use securepay_kit::status::error_code;

    use super::*;

    #[test]
    fn every_refusal_keeps_its_code_on_the_wire() {
        let cases = [
            (ServiceError::invalid("invalid_amount", "bad"), Code::InvalidArgument, "invalid_amount"),
            (ServiceError::IdempotencyKeyReused, Code::FailedPrecondition, "idempotency_key_reused"),
            (ServiceError::RequestInProgress, Code::Aborted, "request_in_progress"),
            (ServiceError::AccountServiceUnavailable, Code::Unavailable, "account_service_unavailable"),
            (ServiceError::Forbidden, Code::PermissionDenied, "forbidden"),
            (ServiceError::PaymentNotFound, Code::NotFound, "payment_not_found"),
        ];
        for (error, code, public) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert_eq!(error_code(&status), Some(public));
        }
    }
}
