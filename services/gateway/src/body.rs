//! Strict JSON request bodies: `Content-Type: application/json` (415 otherwise), at most
//! `BODY_LIMIT_BYTES` (413 `payload_too_large`), nesting at most `JSON_DEPTH_MAX` deep
//! (400 `invalid_json`), syntactically valid (400 `invalid_json`), no unknown fields
//! (400 `unknown_field`, the target types use `deny_unknown_fields`) and the right shape
//! (400 `invalid_request`). The body is read and checked before a handler runs.

use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::config::{BODY_LIMIT_BYTES, JSON_DEPTH_MAX};
use crate::problem::Problem;

pub struct StrictJson<T>(pub T);

fn payload_too_large() -> Problem {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the request body is larger than 16 KiB")
}

fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    let Some(text) = content_type.and_then(|v| v.to_str().ok()) else { return false };
    let essence = text.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// The deepest nesting of arrays and objects in `bytes` (strings skipped), stopping early once
/// beyond `max`.
pub fn nesting_exceeds(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Parses `bytes` strictly into `T`, classifying failures into stable codes.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    if nesting_exceeds(bytes, JSON_DEPTH_MAX) {
        return Err(Problem::bad_request("invalid_json", "the JSON body is nested too deeply"));
    }
    // Syntax first: decoding into `T` stops at the first missing or unknown field, before it has
    // seen the rest, so a broken body would be named `invalid_request` (found by tests/fuzz.rs).
    if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err() {
        return Err(Problem::bad_request("invalid_json", "the body is not valid JSON"));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                Problem::bad_request("invalid_json", "the body is not valid JSON")
            }
            Category::Data => {
                let text = e.to_string();
                if let Some(rest) = text.strip_prefix("unknown field `") {
                    let field: String = rest.chars().take_while(|&c| c != '`').take(64).collect();
                    let field: String =
                        field.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-').collect();
                    Problem::bad_request("unknown_field", format!("unknown field \"{field}\""))
                } else if let Some(rest) = text.strip_prefix("missing field `") {
                    let field: String = rest.chars().take_while(|&c| c != '`').collect();
                    Problem::bad_request("invalid_request", format!("missing field \"{field}\""))
                } else {
                    Problem::bad_request("invalid_request", "the body does not have the documented shape")
                }
            }
        }
    })
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for StrictJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Problem> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be application/json",
            ));
        }
        let declared =
            req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > BODY_LIMIT_BYTES as u64) {
            return Err(payload_too_large());
        }
        let bytes = axum::body::to_bytes(req.into_body(), BODY_LIMIT_BYTES).await.map_err(|e| {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                payload_too_large()
            } else {
                Problem::bad_request("invalid_request", "the body could not be read")
            }
        })?;
        parse(&bytes).map(StrictJson)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_only_structure_outside_strings() {
        assert!(!nesting_exceeds(br#"{"a":"[[[[[[[[[[[["}"#, 2));
        assert!(nesting_exceeds(br#"{"a":[[[1]]]}"#, 3));
        assert!(!nesting_exceeds(br#"{"a":[[1]]}"#, 3));
        assert!(!nesting_exceeds(br#"{"a":"\"[[[["}"#, 1));
    }
}
