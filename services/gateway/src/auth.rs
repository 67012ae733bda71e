//! Who the human caller is (SPEC §5): a bearer JWT verified against a JWKS.
//!
//! Promises: only ES256 and RS256 are ever accepted (`none`, HS* and anything else are refused
//! before any key is touched, so an HMAC token "signed" with a public key cannot pass); the key is
//! chosen by `kid` and its own algorithm must equal the token's; `exp` is required, and `exp`,
//! `nbf`, `iss`, `aud` are checked with the configured leeway; `sub` must be a valid subject.
//! Scopes come from the space-separated `scope` claim.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use securepay_core::ids::Subject;
use serde::Deserialize;

use crate::config::JwtConfig;

pub const SCOPE_READ: &str = "payments:read";
pub const SCOPE_WRITE: &str = "payments:write";

/// The algorithms the gateway accepts, nothing else.
pub const ALLOWED_ALGORITHMS: [Algorithm; 2] = [Algorithm::ES256, Algorithm::RS256];

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: Subject,
    pub scopes: Vec<String>,
}

impl Principal {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// Why a token was refused; each is a `securepay_auth_failures_total` reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Invalid,
    Expired,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "jwt_missing",
            AuthFailure::Invalid => "jwt_invalid",
            AuthFailure::Expired => "jwt_expired",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read the JWKS file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the JWKS is not a valid JSON Web Key Set: {0}")]
    Parse(serde_json::Error),
    #[error("the JWKS holds no usable ES256 (P-256) or RS256 signing key with a kid")]
    NoUsableKey,
}

struct VerifyingKey {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies bearer tokens against the keys of one JWKS.
pub struct Authenticator {
    keys: HashMap<String, VerifyingKey>,
    config: JwtConfig,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
}

impl Authenticator {
    /// Keeps every key of `jwks` that has a `kid`, is meant for signatures, and is P-256 (ES256) or
    /// RSA (RS256) with a matching `alg` if it names one; others are skipped with a warning.
    pub fn from_jwks(jwks: &JwkSet, config: JwtConfig) -> Result<Authenticator, JwksError> {
        let mut keys = HashMap::new();
        for jwk in &jwks.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                tracing::warn!("JWKS key without kid skipped");
                continue;
            };
            if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
                tracing::warn!(kid, "JWKS key not meant for signatures skipped");
                continue;
            }
            let algorithm = match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => Algorithm::ES256,
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                _ => {
                    tracing::warn!(kid, "JWKS key of an unsupported type skipped");
                    continue;
                }
            };
            let declared_ok = match jwk.common.key_algorithm {
                None => true,
                Some(KeyAlgorithm::ES256) => algorithm == Algorithm::ES256,
                Some(KeyAlgorithm::RS256) => algorithm == Algorithm::RS256,
                Some(_) => false,
            };
            if !declared_ok {
                tracing::warn!(kid, "JWKS key whose alg is not allowed or does not match its type skipped");
                continue;
            }
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    keys.insert(kid, VerifyingKey { algorithm, key });
                }
                Err(_) => tracing::warn!(kid, "JWKS key that does not parse skipped"),
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(Authenticator { keys, config })
    }

    /// Reads a JWKS file (SECUREPAY_JWKS_PATH).
    pub fn from_jwks_file(path: &Path, config: JwtConfig) -> Result<Authenticator, JwksError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| JwksError::Read { path: path.display().to_string(), source })?;
        Authenticator::from_jwks_text(&text, config)
    }

    /// Parses a JWKS document (the text of a `jwks.json`).
    pub fn from_jwks_text(text: &str, config: JwtConfig) -> Result<Authenticator, JwksError> {
        let jwks: JwkSet = serde_json::from_str(text).map_err(JwksError::Parse)?;
        Authenticator::from_jwks(&jwks, config)
    }

    /// Verifies a compact JWS (without the `Bearer ` prefix).
    pub fn verify(&self, token: &str) -> Result<Principal, AuthFailure> {
        if token.len() > 8 * 1024 {
            return Err(AuthFailure::Invalid);
        }
        // An unknown `alg` (`none`, anything not in jsonwebtoken's enum) fails here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Invalid)?;
        if !ALLOWED_ALGORITHMS.contains(&header.alg) {
            return Err(AuthFailure::Invalid);
        }
        let key = header.kid.as_deref().and_then(|kid| self.keys.get(kid)).ok_or(AuthFailure::Invalid)?;
        if key.algorithm != header.alg {
            return Err(AuthFailure::Invalid);
        }
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.config.leeway_seconds;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[self.config.issuer.as_str()]);
        validation.set_audience(&[self.config.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthFailure::Expired,
            _ => AuthFailure::Invalid,
        })?;
        let subject = Subject::parse(&data.claims.sub).map_err(|_| AuthFailure::Invalid)?;
        let scopes = data.claims.scope.unwrap_or_default().split_ascii_whitespace().map(str::to_owned).collect();
        Ok(Principal { subject, scopes })
    }
}
