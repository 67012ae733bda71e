//! Development keys and tokens (SPEC §5 "dev token tool"): an ES256 key pair kept as
//! `jwt-dev-key.pem` (PKCS#8, mode 0600) and its public half as `jwks.json`, and tokens minted
//! from it for the seeded demo users (alice, bob, carol). The key id is the RFC 7638 thumbprint of
//! the public key, so a token and the JWKS always agree on `kid`. Not for production issuers.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
pub use p256::{PublicKey, SecretKey};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::JwtConfig;

pub const KEY_FILE: &str = "jwt-dev-key.pem";
pub const JWKS_FILE: &str = "jwks.json";

/// The public JWK of `key` with its kid, `alg` and `use`.
pub fn public_jwk(key: &PublicKey) -> serde_json::Value {
    let jwk: serde_json::Value = serde_json::from_str(&key.to_jwk_string()).expect("a JWK is JSON");
    let field = |name: &str| jwk[name].as_str().expect("EC JWK fields are strings").to_owned();
    let (crv, x, y) = (field("crv"), field("x"), field("y"));
    serde_json::json!({"kty": "EC", "crv": crv, "x": x, "y": y, "kid": key_id(key), "alg": "ES256", "use": "sig"})
}

/// RFC 7638 thumbprint: base64url(SHA-256 of the required members in lexicographic order).
pub fn key_id(key: &PublicKey) -> String {
    let jwk: serde_json::Value = serde_json::from_str(&key.to_jwk_string()).expect("a JWK is JSON");
    let canonical = format!(
        r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
        jwk["crv"].as_str().unwrap_or_default(),
        jwk["x"].as_str().unwrap_or_default(),
        jwk["y"].as_str().unwrap_or_default()
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Creates `dir/jwt-dev-key.pem` if missing, and (re)writes `dir/jwks.json` from it. Returns both paths.
pub fn ensure_dev_keys(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let key_path = dir.join(KEY_FILE);
    let secret = if key_path.exists() {
        load_key(&key_path)?
    } else {
        let secret = SecretKey::random(&mut rand_core::OsRng);
        let pem = secret.to_pkcs8_pem(LineEnding::LF).map_err(|_| anyhow::anyhow!("cannot encode the key"))?;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key_path)?;
        file.write_all(pem.as_bytes())?;
        secret
    };
    let jwks_path = dir.join(JWKS_FILE);
    let jwks = serde_json::json!({"keys": [public_jwk(&secret.public_key())]});
    std::fs::write(&jwks_path, serde_json::to_string_pretty(&jwks)? + "\n")?;
    Ok((key_path, jwks_path))
}

pub fn load_key(path: &Path) -> anyhow::Result<SecretKey> {
    let pem = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    SecretKey::from_pkcs8_pem(&pem).map_err(|_| anyhow::anyhow!("{} is not a PKCS#8 P-256 key", path.display()))
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    scope: &'a str,
    iat: i64,
    nbf: i64,
    exp: i64,
    jti: String,
}

/// An ES256 token for `subject` with `scope`, valid for `ttl_seconds` from now.
pub fn mint_token(
    key: &SecretKey,
    jwt: &JwtConfig,
    subject: &str,
    scope: &str,
    ttl_seconds: i64,
) -> anyhow::Result<String> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    TokenSigner::new(key)?.mint_at(jwt, subject, scope, now, ttl_seconds, &uuid::Uuid::new_v4().to_string())
}

/// Mints development tokens with one key; the key's encoding and id are computed once (the
/// simulator mints many, on its own clock and with seeded ids).
#[derive(Clone)]
pub struct TokenSigner {
    encoding: EncodingKey,
    kid: String,
}

impl TokenSigner {
    pub fn new(key: &SecretKey) -> anyhow::Result<TokenSigner> {
        let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|_| anyhow::anyhow!("cannot encode the key"))?;
        Ok(TokenSigner { encoding: EncodingKey::from_ec_pem(pem.as_bytes())?, kid: key_id(&key.public_key()) })
    }

    /// The key id every token names (the RFC 7638 thumbprint).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// An ES256 token for `subject` with `scope`, issued at `now` (Unix seconds), valid for
    /// `ttl_seconds`, with token id `jti`.
    pub fn mint_at(
        &self,
        jwt: &JwtConfig,
        subject: &str,
        scope: &str,
        now: i64,
        ttl_seconds: i64,
        jti: &str,
    ) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let claims = Claims {
            iss: &jwt.issuer,
            aud: &jwt.audience,
            sub: subject,
            scope,
            iat: now,
            nbf: now,
            exp: now + ttl_seconds,
            jti: jti.to_owned(),
        };
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding)?)
    }
}
