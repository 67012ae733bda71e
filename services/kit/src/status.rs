//! Domain errors on the gRPC wire. A refused call carries its stable public code (SPEC §3:
//! `invalid_amount`, `unknown_account`, `insufficient_funds`, `idempotency_key_reused`, ...) in the
//! `x-securepay-error-code` metadata entry next to a short, client-safe message; the gateway maps
//! the code once to problem+json. No driver or internal text ever goes into a status.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

pub const ERROR_CODE_METADATA: &str = "x-securepay-error-code";

/// A status carrying a stable error code. `error_code` must be a lowercase snake_case constant.
pub fn status(code: Code, error_code: &'static str, message: impl Into<String>) -> Status {
    let mut status = Status::new(code, message);
    status.metadata_mut().insert(ERROR_CODE_METADATA, MetadataValue::from_static(error_code));
    status
}

/// The stable error code a status carries, if any.
pub fn error_code(status: &Status) -> Option<&str> {
    status.metadata().get(ERROR_CODE_METADATA).and_then(|v| v.to_str().ok())
}

/// A dependency (database, broker, another service) is unavailable: retry later.
pub fn unavailable() -> Status {
    status(Code::Unavailable, "service_unavailable", "a dependency is unavailable; retry later")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_survives_alongside_the_message() {
        let s = status(Code::FailedPrecondition, "insufficient_funds", "the account cannot cover this amount");
        assert_eq!(error_code(&s), Some("insufficient_funds"));
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(error_code(&Status::internal("x")), None);
    }
}
