//! Who the human caller is (SPEC §5): a bearer JWT verified against a JWKS.
//!
//! Promises: only ES256 and RS256 are ever accepted (`none`, HS* and anything else are refused
//! before any key is touched, so an HMAC token "signed" with a public key cannot pass); the key is
//! chosen by `kid` and its own algorithm must equal the token's; `exp` is required, and `exp`,
//! `nbf`, `iss`, `aud` are checked with the configured leeway; `sub` must be a valid subject.
//! Scopes come from the space-separated `scope` claim.
//!
//! Time: `exp` and `nbf` are compared with the injected [`Clock`] (the `securepay_ports` port), never
//! read from the OS by the JWT library: production gives [`SystemClock`], the simulator the gateway
//! node's skewable clock, so a gateway whose clock is off refuses tokens exactly as a real one would.
//! A token is expired when `exp < now - leeway` (`jwt_expired`), not yet valid when
//! `nbf > now + leeway` (`jwt_invalid`).
//!
//! Cost: an ES256 verification is most of the gateway's CPU per request (profiled: a third of the
//! whole platform's CPU at 400 requests/s). A client sends the same token with every request until
//! it expires, so the outcome of the signature, `iss`, `aud` and `sub` checks is kept per token
//! text ([`VerifiedTokens`], bounded); `exp`/`nbf` are checked on the clock at EVERY use, so a
//! cached token expires exactly when an uncached one would. The key set never changes under an
//! `Authenticator`, so a cached verdict cannot outlive its key.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use securepay_core::ids::Subject;
use securepay_ports::{Clock, SystemClock};
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

/// Verifies bearer tokens against the keys of one JWKS, on its clock.
pub struct Authenticator {
    keys: HashMap<String, VerifyingKey>,
    config: JwtConfig,
    clock: Arc<dyn Clock>,
    verified: VerifiedTokens,
}

/// What a signature check established about one token text; its times are checked at each use.
#[derive(Debug, Clone)]
struct Verified {
    principal: Principal,
    exp: i64,
    nbf: Option<i64>,
}

/// Tokens whose signature, issuer, audience and subject were verified, by their exact text.
///
/// Bounded: two generations of at most [`VerifiedTokens::GENERATION_LEN_MAX`] entries; when the
/// current one is full it becomes the old one and the old one is dropped, so memory stays below
/// 2 × 4,096 tokens (≈ 4 MiB) and a token in use keeps being found (a hit in the old generation
/// moves it to the current one).
#[derive(Debug, Default)]
struct VerifiedTokens {
    generations: Mutex<(HashMap<String, Verified>, HashMap<String, Verified>)>,
}

impl VerifiedTokens {
    const GENERATION_LEN_MAX: usize = 4096;

    fn get(&self, token: &str) -> Option<Verified> {
        let mut g = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = g.0.get(token) {
            return Some(hit.clone());
        }
        let hit = g.1.remove(token)?;
        Self::insert_into(&mut g, token, hit.clone());
        Some(hit)
    }

    fn insert(&self, token: &str, verified: Verified) {
        let mut g = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        Self::insert_into(&mut g, token, verified);
    }

    fn insert_into(g: &mut (HashMap<String, Verified>, HashMap<String, Verified>), token: &str, verified: Verified) {
        if g.0.len() >= Self::GENERATION_LEN_MAX {
            g.1 = std::mem::take(&mut g.0);
        }
        g.0.insert(token.to_owned(), verified);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let g = self.generations.lock().unwrap();
        g.0.len() + g.1.len()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    exp: serde_json::Number,
    #[serde(default)]
    nbf: Option<serde_json::Number>,
}

/// A NumericDate (RFC 7519 §2) as whole seconds; fractions are cut (a token is never valid longer).
fn seconds(value: &serde_json::Number) -> Option<i64> {
    value.as_i64().or_else(|| {
        value.as_f64().filter(|f| f.is_finite() && f.abs() < 1e15).map(|f| {
            #[allow(clippy::cast_possible_truncation)]
            let whole = f.floor() as i64;
            whole
        })
    })
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
        Ok(Authenticator { keys, config, clock: Arc::new(SystemClock), verified: VerifiedTokens::default() })
    }

    /// The same authenticator checking `exp`/`nbf` against `clock` instead of the OS clock.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Authenticator {
        self.clock = clock;
        self
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
        let verified = match self.verified.get(token) {
            Some(verified) => verified,
            None => {
                let verified = self.verify_signed(token)?;
                self.verified.insert(token, verified.clone());
                verified
            }
        };
        self.check_times(&verified)?;
        Ok(verified.principal)
    }

    /// `exp` and `nbf` against the clock, with the leeway (at every use, cached or not).
    fn check_times(&self, verified: &Verified) -> Result<(), AuthFailure> {
        let now = self.clock.now().unix_timestamp();
        let leeway = i64::try_from(self.config.leeway_seconds).unwrap_or(i64::MAX);
        if verified.exp < now.saturating_sub(leeway) {
            return Err(AuthFailure::Expired);
        }
        if verified.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(AuthFailure::Invalid);
        }
        Ok(())
    }

    /// Everything that does not depend on the time: algorithm, key, signature, iss, aud, sub.
    fn verify_signed(&self, token: &str) -> Result<Verified, AuthFailure> {
        // An unknown `alg` (`none`, anything not in jsonwebtoken's enum) fails here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Invalid)?;
        if !ALLOWED_ALGORITHMS.contains(&header.alg) {
            return Err(AuthFailure::Invalid);
        }
        let key = header.kid.as_deref().and_then(|kid| self.keys.get(kid)).ok_or(AuthFailure::Invalid)?;
        if key.algorithm != header.alg {
            return Err(AuthFailure::Invalid);
        }
        // Signature, iss and aud by the library; exp (required by `Claims`) and nbf read by
        // `seconds` and checked on our clock. Not "exp" among the library's required claims: it
        // counts an exp as present only if it is a whole u64, so an RFC 7519 NumericDate with a
        // fraction (`1767225600.5`) was refused as invalid (found by tests/fuzz.rs).
        let mut validation = Validation::new(key.algorithm);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_issuer(&[self.config.issuer.as_str()]);
        validation.set_audience(&[self.config.audience.as_str()]);
        validation.set_required_spec_claims(&["iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|_| AuthFailure::Invalid)?;
        let exp = seconds(&data.claims.exp).ok_or(AuthFailure::Invalid)?;
        let nbf = data.claims.nbf.as_ref().map(|nbf| seconds(nbf).ok_or(AuthFailure::Invalid)).transpose()?;
        let subject = Subject::parse(&data.claims.sub).map_err(|_| AuthFailure::Invalid)?;
        let scopes = data.claims.scope.unwrap_or_default().split_ascii_whitespace().map(str::to_owned).collect();
        Ok(Verified { principal: Principal { subject, scopes }, exp, nbf })
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;
    use crate::devkeys::{self, SecretKey, TokenSigner};

    /// A wall clock `offset_s` away from the OS clock.
    struct Skewed(i64);

    impl Clock for Skewed {
        fn now(&self) -> OffsetDateTime {
            OffsetDateTime::now_utc() + time::Duration::seconds(self.0)
        }
    }

    fn issuer() -> (TokenSigner, String) {
        let key = SecretKey::from_slice(&[0x42; 32]).expect("a valid scalar");
        let jwks = serde_json::json!({"keys": [devkeys::public_jwk(&key.public_key())]}).to_string();
        (TokenSigner::new(&key).expect("the key encodes"), jwks)
    }

    fn gateway_at(jwks: &str, offset_s: i64) -> Authenticator {
        Authenticator::from_jwks_text(jwks, JwtConfig::default())
            .expect("a usable JWKS")
            .with_clock(Arc::new(Skewed(offset_s)))
    }

    #[test]
    fn token_times_are_read_from_the_injected_clock_with_the_leeway() {
        let (signer, jwks) = issuer();
        let jwt = JwtConfig::default();
        let leeway = i64::try_from(jwt.leeway_seconds).expect("small");
        let now = OffsetDateTime::now_utc().unix_timestamp();
        // Valid on the real clock: issued now, for ten minutes.
        let token = signer.mint_at(&jwt, "user-1", SCOPE_READ, now, 600, "jti-1").expect("signs");
        assert!(gateway_at(&jwks, 0).verify(&token).is_ok());

        // The gateway's clock behind: the token is not yet valid beyond the leeway, fine within it.
        assert_eq!(gateway_at(&jwks, -(leeway + 60)).verify(&token), Err(AuthFailure::Invalid));
        assert!(gateway_at(&jwks, -(leeway - 10)).verify(&token).is_ok());

        // The gateway's clock ahead: expired past exp + leeway, still accepted within it.
        assert_eq!(gateway_at(&jwks, 600 + leeway + 60).verify(&token), Err(AuthFailure::Expired));
        assert!(gateway_at(&jwks, 600 + leeway - 10).verify(&token).is_ok());
    }

    #[test]
    fn a_token_expired_on_the_real_clock_passes_only_a_gateway_whose_clock_is_behind() {
        let (signer, jwks) = issuer();
        let jwt = JwtConfig::default();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let token = signer.mint_at(&jwt, "user-1", SCOPE_READ, now - 7200, 3600, "jti-2").expect("signs");
        assert_eq!(gateway_at(&jwks, 0).verify(&token), Err(AuthFailure::Expired));
        assert!(gateway_at(&jwks, -3600).verify(&token).is_ok());
    }

    /// A clock the test moves.
    struct Settable(std::sync::atomic::AtomicI64);

    impl Clock for Settable {
        fn now(&self) -> OffsetDateTime {
            OffsetDateTime::from_unix_timestamp(self.0.load(std::sync::atomic::Ordering::SeqCst)).unwrap()
        }
    }

    #[test]
    fn a_cached_token_still_expires_on_the_clock_and_a_tampered_one_is_never_a_hit() {
        let (signer, jwks) = issuer();
        let jwt = JwtConfig::default();
        let leeway = i64::try_from(jwt.leeway_seconds).expect("small");
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let clock = Arc::new(Settable(std::sync::atomic::AtomicI64::new(now)));
        let gateway = Authenticator::from_jwks_text(&jwks, jwt.clone()).unwrap().with_clock(clock.clone());
        let token = signer.mint_at(&jwt, "user-1", SCOPE_READ, now, 600, "jti-3").expect("signs");
        assert!(gateway.verify(&token).is_ok());
        assert!(gateway.verify(&token).is_ok(), "served from the cache");
        assert_eq!(gateway.verified.len(), 1);
        clock.0.store(now + 600 + leeway + 1, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(gateway.verify(&token), Err(AuthFailure::Expired), "a cached verdict does not outlive exp");
        clock.0.store(now, std::sync::atomic::Ordering::SeqCst);
        // One byte changed in the signature is another text: verified from scratch, refused.
        // (a character well inside the signature: the last one may carry only padding bits)
        let at = token.len() - 10;
        let flipped = if &token[at..=at] == "A" { "B" } else { "A" };
        let tampered = format!("{}{flipped}{}", &token[..at], &token[at + 1..]);
        assert_eq!(gateway.verify(&tampered), Err(AuthFailure::Invalid));
        assert_eq!(gateway.verified.len(), 1, "a refused token is not cached");
    }

    #[test]
    fn the_cache_stays_bounded() {
        let (signer, jwks) = issuer();
        let jwt = JwtConfig::default();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let gateway = Authenticator::from_jwks_text(&jwks, jwt.clone()).unwrap();
        let count = VerifiedTokens::GENERATION_LEN_MAX * 2 + 10;
        let tokens: Vec<String> = (0..count)
            .map(|i| signer.mint_at(&jwt, "user-1", SCOPE_READ, now, 600, &format!("j{i}")).unwrap())
            .collect();
        for token in &tokens {
            assert!(gateway.verify(token).is_ok());
        }
        assert!(gateway.verified.len() <= 2 * VerifiedTokens::GENERATION_LEN_MAX);
        assert!(gateway.verify(&tokens[0]).is_ok(), "an evicted token is verified again");
    }
}
