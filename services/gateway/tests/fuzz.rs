//! Fuzz targets of the gateway's decoders at the edge: JWT verification (`auth`, on hostile
//! tokens), the strict JSON body decoder (`body::parse`) and `POST /api/v1/payments` as a whole
//! (the router in front of a recording payment backend).
//!
//! bolero drives each target with random inputs for a bounded time under plain `cargo test`
//! ([`BUDGET`] each; `BOLERO_RANDOM_TEST_TIME_MS` runs longer: README → Testing → Fuzzing);
//! inputs saved in `tests/__fuzz__/<target>/crashes/` are replayed first. Structured inputs are
//! built from valid and invalid choices per field, so the checks behind the parser are reached,
//! and each target compares the gateway's answer with an oracle written from the documented
//! rules (SPEC §3, §5), not only that nothing panics.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bolero::{TypeGenerator, check};
use http_body_util::BodyExt as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use p256::SecretKey;
use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use securepay_core::idempotency::IdempotencyKey;
use securepay_core::ids::{AccountId, PaymentId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_gateway::api::CreatePaymentRequest;
use securepay_gateway::auth::{AuthFailure, Principal};
use securepay_gateway::config::{GatewayConfig, JSON_DEPTH_MAX, JwtConfig, RateQuota};
use securepay_gateway::{AppState, Authenticator, Backends, Channels, body, devkeys};
use securepay_ports::Clock;
use securepay_proto::payment::v1 as payment;
use serde_json::Value;
use time::OffsetDateTime;
use tower::ServiceExt as _;

/// How long each target runs in the test command.
const BUDGET: Duration = Duration::from_secs(3);

/// The gateway's clock in the JWT targets: fixed, so no verdict depends on when the test runs.
const NOW: i64 = 1_767_225_600;

struct FixedClock;

impl Clock for FixedClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(NOW).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// JWT verification

/// The keys a token can be signed with: the JWKS's EC and RSA keys, and one it does not know.
struct Keys {
    ec: EncodingKey,
    ec_kid: String,
    rsa: EncodingKey,
    stranger: EncodingKey,
    /// The EC public key's PEM: an HS256 "signature" with it is the classic key-confusion attack.
    ec_public_pem: Vec<u8>,
    jwks: String,
}

fn keys() -> Keys {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let ec = SecretKey::from_slice(&[0x42; 32]).unwrap();
    let pem = |k: &SecretKey| k.to_pkcs8_pem(LineEnding::LF).unwrap();
    let rsa_jwk: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{fixtures}/rsa-test-jwk.json")).unwrap()).unwrap();
    let rsa_pem = std::fs::read(format!("{fixtures}/rsa-test-key.pem")).unwrap();
    Keys {
        ec: EncodingKey::from_ec_pem(pem(&ec).as_bytes()).unwrap(),
        ec_kid: devkeys::key_id(&ec.public_key()),
        rsa: EncodingKey::from_rsa_pem(&rsa_pem).unwrap(),
        stranger: EncodingKey::from_ec_pem(pem(&SecretKey::from_slice(&[0x17; 32]).unwrap()).as_bytes()).unwrap(),
        ec_public_pem: ec.public_key().to_public_key_pem(LineEnding::LF).unwrap().into_bytes(),
        jwks: serde_json::json!({"keys": [devkeys::public_jwk(&ec.public_key()), rsa_jwk]}).to_string(),
    }
}

#[derive(Debug, Clone, TypeGenerator)]
enum Alg {
    Es256,
    Rs256,
    Hs256,
    None,
    Lower,
    Missing,
    Any(String),
}

#[derive(Debug, Clone, TypeGenerator)]
enum Kid {
    Ec,
    Rsa,
    Missing,
    Any(String),
}

/// A string claim (iss, sub): the right value, absent, another text, or not a string.
#[derive(Debug, Clone, TypeGenerator)]
enum Text {
    Right,
    Missing,
    Any(String),
    Number(i32),
}

#[derive(Debug, Clone, TypeGenerator)]
enum Aud {
    Right,
    ListWithRight,
    ListWithout(String),
    Missing,
    Any(String),
}

/// A NumericDate claim, relative to [`NOW`].
#[derive(Debug, Clone, TypeGenerator)]
enum Date {
    Seconds(i32),
    Fraction(i32, u16),
    Huge(i64),
    Exponent(u8),
    Text(i32),
    Null,
    Missing,
}

/// How the token is signed; `RsaKey` is rare on purpose (an RSA signature is slow in debug).
#[derive(Debug, Clone, TypeGenerator)]
enum Signer {
    EcKey,
    RsaKey(u8),
    Stranger,
    HmacWithPublicKey,
    Empty,
    Garbage(Vec<u8>),
}

/// Damage to the finished token text.
#[derive(Debug, Clone, TypeGenerator)]
enum Mangle {
    Truncate(u16),
    FlipByte(u16, u8),
    InsertDot(u16),
    Repeat,
}

/// Every part of a token, as rendered.
#[derive(Debug)]
struct Parts {
    alg: Alg,
    kid: Kid,
    iss: Text,
    aud: Aud,
    sub: Text,
    exp: Date,
    nbf: Date,
    scope: Option<String>,
    signer: Signer,
    mangle: Option<Mangle>,
}

/// One way a part of an otherwise valid token is spoiled.
#[derive(Debug, TypeGenerator)]
enum Fault {
    Alg(Alg),
    Kid(Kid),
    Iss(Text),
    Aud(Aud),
    Sub(Text),
    Exp(Date),
    Nbf(Date),
    Signer(Signer),
    Mangle(Mangle),
}

/// A valid ES256 (now and then RS256) token, its times within ±2 h of now (so about half are
/// expired or not yet valid), then at most two faults: often none, so the checks after the
/// signature are reached.
#[derive(Debug, TypeGenerator)]
struct Token {
    /// 0 (one token in 256: RSA signing is slow in debug): an RS256 token by the RSA key.
    rsa: u8,
    exp: i16,
    nbf: Option<i16>,
    sub: Option<String>,
    scope: Option<String>,
    faults: (Option<Fault>, Option<Fault>),
}

impl Token {
    fn parts(&self) -> Parts {
        let mut p = Parts {
            alg: Alg::Es256,
            kid: Kid::Ec,
            iss: Text::Right,
            aud: Aud::Right,
            sub: self.sub.clone().map_or(Text::Right, Text::Any),
            exp: Date::Seconds(i32::from(self.exp) / 4),
            nbf: self.nbf.map_or(Date::Missing, |n| Date::Seconds(i32::from(n) / 4)),
            scope: self.scope.clone(),
            signer: Signer::EcKey,
            mangle: None,
        };
        if self.rsa == 0 {
            (p.alg, p.kid, p.signer) = (Alg::Rs256, Kid::Rsa, Signer::RsaKey(0));
        }
        for fault in [&self.faults.0, &self.faults.1].into_iter().flatten() {
            match fault {
                Fault::Alg(a) => p.alg = a.clone(),
                Fault::Kid(k) => p.kid = k.clone(),
                Fault::Iss(t) => p.iss = t.clone(),
                Fault::Aud(a) => p.aud = a.clone(),
                Fault::Sub(t) => p.sub = t.clone(),
                Fault::Exp(d) => p.exp = d.clone(),
                Fault::Nbf(d) => p.nbf = d.clone(),
                Fault::Signer(s) => p.signer = s.clone(),
                Fault::Mangle(m) => p.mangle = Some(m.clone()),
            }
        }
        p
    }
}

/// What the claim is as JSON text (`None`: absent), and the whole seconds the gateway must read.
fn date(d: &Date) -> (Option<String>, Option<i64>) {
    let at = |offset: i32| NOW + i64::from(offset);
    match *d {
        Date::Seconds(offset) => (Some(at(offset).to_string()), Some(at(offset))),
        Date::Fraction(offset, frac) => (Some(format!("{}.{frac:04}", at(offset))), Some(at(offset))),
        Date::Huge(n) => (Some(n.to_string()), Some(n)),
        Date::Exponent(e) => (Some(format!("1e{e}")), (e < 15).then(|| 10i64.pow(u32::from(e)))),
        Date::Text(offset) => (Some(format!("\"{}\"", at(offset))), None),
        Date::Null => (Some("null".into()), None),
        Date::Missing => (None, None),
    }
}

fn string_claim(t: &Text, right: &str) -> (Option<String>, Option<String>) {
    match t {
        Text::Right => (Some(serde_json::to_string(right).unwrap()), Some(right.to_owned())),
        Text::Missing => (None, None),
        Text::Any(any) => (Some(serde_json::to_string(any).unwrap()), Some(any.clone())),
        Text::Number(n) => (Some(n.to_string()), None),
    }
}

/// The token's text and the verdict the documented rules give it.
fn render(t: &Parts, k: &Keys, jwt: &JwtConfig) -> (String, Result<Principal, AuthFailure>) {
    let mut verdict_ok = true;
    let alg = match &t.alg {
        Alg::Es256 => Some("ES256".to_owned()),
        Alg::Rs256 => Some("RS256".to_owned()),
        Alg::Hs256 => Some("HS256".to_owned()),
        Alg::None => Some("none".to_owned()),
        Alg::Lower => Some("es256".to_owned()),
        Alg::Missing => None,
        Alg::Any(s) => Some(s.clone()),
    };
    let kid = match &t.kid {
        Kid::Ec => Some(k.ec_kid.clone()),
        Kid::Rsa => Some("rsa-test".to_owned()),
        Kid::Missing => None,
        Kid::Any(s) => Some(s.clone()),
    };
    let mut header = serde_json::Map::new();
    if let Some(alg) = &alg {
        header.insert("alg".into(), alg.clone().into());
    }
    header.insert("typ".into(), "JWT".into());
    if let Some(kid) = &kid {
        header.insert("kid".into(), kid.clone().into());
    }
    // Whether this (alg, kid, signing key) is one the JWKS vouches for.
    verdict_ok &= match (&t.signer, alg.as_deref(), kid.as_deref()) {
        (Signer::EcKey, Some("ES256"), Some(kid)) => kid == k.ec_kid,
        (Signer::RsaKey(0), Some("RS256"), Some("rsa-test")) => true,
        _ => false,
    };

    let mut claims = Vec::new();
    let (iss, iss_value) = string_claim(&t.iss, &jwt.issuer);
    verdict_ok &= iss_value.as_deref() == Some(jwt.issuer.as_str());
    if let Some(iss) = iss {
        claims.push(format!("\"iss\":{iss}"));
    }
    let right_aud = serde_json::to_string(&jwt.audience).unwrap();
    let aud = match &t.aud {
        Aud::Right => Some(right_aud.clone()),
        Aud::ListWithRight => Some(format!("[\"other\",{right_aud}]")),
        Aud::ListWithout(s) => Some(format!("[{}]", serde_json::to_string(s).unwrap())),
        Aud::Missing => None,
        Aud::Any(s) => Some(serde_json::to_string(s).unwrap()),
    };
    let aud_ok = match &t.aud {
        Aud::Right | Aud::ListWithRight => true,
        Aud::ListWithout(s) | Aud::Any(s) => *s == jwt.audience,
        Aud::Missing => false,
    };
    verdict_ok &= aud_ok;
    if let Some(aud) = aud {
        claims.push(format!("\"aud\":{aud}"));
    }
    let (sub, sub_value) = string_claim(&t.sub, "user-1");
    let subject = sub_value.as_deref().and_then(|s| Subject::parse(s).ok());
    verdict_ok &= subject.is_some();
    if let Some(sub) = sub {
        claims.push(format!("\"sub\":{sub}"));
    }
    let (exp, exp_at) = date(&t.exp);
    verdict_ok &= exp_at.is_some();
    if let Some(exp) = exp {
        claims.push(format!("\"exp\":{exp}"));
    }
    let (nbf, nbf_at) = date(&t.nbf);
    // `nbf` is optional, and a null one is read as absent (lenient, and harmless: absent is fine).
    let nbf_ok = matches!(t.nbf, Date::Missing | Date::Null) || nbf_at.is_some();
    verdict_ok &= nbf_ok;
    if let Some(nbf) = nbf {
        claims.push(format!("\"nbf\":{nbf}"));
    }
    if let Some(scope) = &t.scope {
        claims.push(format!("\"scope\":{}", serde_json::to_string(scope).unwrap()));
    }

    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(Value::Object(header).to_string()),
        URL_SAFE_NO_PAD.encode(format!("{{{}}}", claims.join(",")))
    );
    let sign =
        |key: &EncodingKey, alg: Algorithm| jsonwebtoken::crypto::sign(signing_input.as_bytes(), key, alg).unwrap();
    let signature = match &t.signer {
        Signer::EcKey => sign(&k.ec, Algorithm::ES256),
        Signer::RsaKey(0) => sign(&k.rsa, Algorithm::RS256),
        Signer::RsaKey(_) | Signer::Stranger => sign(&k.stranger, Algorithm::ES256),
        Signer::HmacWithPublicKey => sign(&EncodingKey::from_secret(&k.ec_public_pem), Algorithm::HS256),
        Signer::Empty => String::new(),
        Signer::Garbage(bytes) => URL_SAFE_NO_PAD.encode(bytes),
    };
    let original = format!("{signing_input}.{signature}");
    let text = match &t.mangle {
        None => original.clone(),
        Some(m) => {
            let mut bytes = original.clone().into_bytes();
            let at = |i: u16| usize::from(i) % bytes.len().max(1);
            match *m {
                Mangle::Truncate(i) => bytes.truncate(at(i)),
                Mangle::FlipByte(i, x) => {
                    let i = at(i);
                    bytes[i] ^= x.max(1);
                }
                Mangle::InsertDot(i) => {
                    let i = at(i);
                    bytes.insert(i, b'.');
                }
                Mangle::Repeat => bytes.extend_from_slice(original.as_bytes()),
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }
    };
    verdict_ok &= text == original;
    let leeway = i64::try_from(jwt.leeway_seconds).unwrap();
    let verdict = if !verdict_ok {
        Err(AuthFailure::Invalid)
    } else if exp_at.is_some_and(|exp| exp < NOW - leeway) {
        Err(AuthFailure::Expired)
    } else if nbf_at.is_some_and(|nbf| nbf > NOW + leeway) {
        Err(AuthFailure::Invalid)
    } else {
        let scopes = t.scope.as_deref().unwrap_or_default().split_ascii_whitespace().map(str::to_owned).collect();
        Ok(Principal { subject: subject.expect("checked above"), scopes })
    };
    (text, verdict)
}

#[test]
fn hostile_tokens_get_exactly_the_documented_verdict() {
    let (k, jwt) = (keys(), JwtConfig::default());
    let auth = Authenticator::from_jwks_text(&k.jwks, jwt.clone()).unwrap().with_clock(Arc::new(FixedClock));
    // A panic fails the test; nothing observes the authenticator after one.
    let auth = AssertUnwindSafe(auth);
    check!().with_type::<Token>().with_test_time(BUDGET).for_each(|token| {
        let (text, want) = render(&token.parts(), &k, &jwt);
        let got = auth.verify(&text);
        assert_eq!(got, want, "token {text}");
        // A second use is answered from the verified-token cache: the same verdict.
        assert_eq!(auth.verify(&text), got, "cached verdict differs for {text}");
    });
}

#[test]
fn arbitrary_token_text_is_never_accepted() {
    let (k, jwt) = (keys(), JwtConfig::default());
    let auth = AssertUnwindSafe(Authenticator::from_jwks_text(&k.jwks, jwt).unwrap().with_clock(Arc::new(FixedClock)));
    check!().with_test_time(BUDGET).for_each(|bytes: &[u8]| {
        // Mostly base64url characters and dots, so the text often splits into three parts.
        const ALPHABET: &[u8] =
            b"eyJhbGciOiJFUzI1NiJ9.-_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789..";
        let text: String = bytes.iter().map(|&b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()])).collect();
        assert!(auth.verify(&text).is_err(), "accepted {text:?}");
    });
}

#[test]
fn a_fractional_exp_is_read_as_whole_seconds() {
    // Found by `hostile_tokens_get_exactly_the_documented_verdict`: the JWT library counted an
    // exp as present only if it was a whole number, so an RFC 7519 NumericDate with a fraction
    // was refused as invalid instead of being cut to whole seconds.
    let (k, jwt) = (keys(), JwtConfig::default());
    let auth = Authenticator::from_jwks_text(&k.jwks, jwt.clone()).unwrap().with_clock(Arc::new(FixedClock));
    for (exp, want) in [(Date::Fraction(600, 5), true), (Date::Fraction(-600, 9999), false)] {
        let parts =
            Token { rsa: 1, exp: 0, nbf: None, sub: None, scope: None, faults: (Some(Fault::Exp(exp)), None) }.parts();
        let (text, verdict) = render(&parts, &k, &jwt);
        assert_eq!(verdict.is_ok(), want);
        assert_eq!(auth.verify(&text), verdict);
    }
}

// ---------------------------------------------------------------------------------------------
// Strict JSON bodies and POST /api/v1/payments

/// The documented request schema (OpenAPI `CreatePaymentRequest`), written apart from the
/// gateway's own type: the oracle of which bodies have the right shape.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read through Debug and the oracle below
struct DocumentedShape {
    payment_id: Option<String>,
    from_account: String,
    to_account: String,
    amount: Value,
    currency: String,
    idempotency_key: Option<String>,
}

const FIELDS: [&str; 6] = ["payment_id", "from_account", "to_account", "amount", "currency", "idempotency_key"];

/// The problem codes a refused body may carry.
const BODY_CODES: [&str; 3] = ["invalid_json", "unknown_field", "invalid_request"];

/// Whether the body's nesting exceeds the documented depth (strings skipped), as its own count.
fn too_deep(bytes: &[u8]) -> bool {
    let (mut depth, mut in_string, mut escaped, mut max) = (0usize, false, false, 0usize);
    for &b in bytes {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, ..) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'{' | b'[') => {
                depth += 1;
                max = max.max(depth);
            }
            (false, _, b'}' | b']') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max > JSON_DEPTH_MAX
}

/// A JSON value put where a field's value goes.
#[derive(Debug, TypeGenerator)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    EmptyArray,
    EmptyObject,
}

impl Json {
    fn render(&self) -> String {
        match self {
            Json::Null => "null".into(),
            Json::Bool(b) => b.to_string(),
            Json::Int(n) => n.to_string(),
            Json::Str(s) => serde_json::to_string(s).unwrap(),
            Json::EmptyArray => "[]".into(),
            Json::EmptyObject => "{}".into(),
        }
    }
}

/// One way an otherwise valid payment body is spoiled.
#[derive(Debug, TypeGenerator)]
enum BodyFault {
    Drop(u8),
    Replace(u8, Json),
    Unknown(String),
    Duplicate(u8),
    /// The amount as a string over an alphabet near the grammar's edge.
    AmountText(Vec<u8>),
    /// The amount as bare number text over the same alphabet (not always JSON).
    AmountNumber(Vec<u8>),
    Currency(String),
    AccountText(bool, String),
    SameAccount,
    PaymentId(String),
    BodyKey(String),
    /// The `Idempotency-Key` header: absent, equal to the body's, or this text.
    HeaderKey(Option<String>),
    /// Wrap a field's value in this many arrays.
    Nest(u8, u8),
    Truncate(u16),
    Append(Vec<u8>),
}

/// A valid payment body (either amount form, optional id and key), then at most two faults.
#[derive(Debug, TypeGenerator)]
struct PaymentBody {
    from: u128,
    to: u128,
    minor_units: u64,
    currency: u8,
    amount_as_number: bool,
    payment_id: Option<u128>,
    key: Option<u128>,
    faults: (Option<BodyFault>, Option<BodyFault>),
}

fn uuid_text(n: u128) -> String {
    let h = format!("{n:032x}");
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

fn edge_text(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"0123456789001.-+eE ";
    bytes.iter().take(40).map(|&b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()])).collect()
}

impl PaymentBody {
    /// The body's bytes and the `Idempotency-Key` header to send with it.
    fn render(&self) -> (Vec<u8>, Option<String>) {
        let all: Vec<Currency> = Currency::all().collect();
        let currency = all[usize::from(self.currency) % all.len()];
        let scale = 10u64.pow(currency.minor_units());
        let minor = 1 + self.minor_units % (1_000_000 * scale);
        let amount = match currency.minor_units() {
            0 => minor.to_string(),
            digits => format!("{}.{:0width$}", minor / scale, minor % scale, width = digits as usize),
        };
        let string = |s: &str| serde_json::to_string(s).unwrap();
        let (from, mut to) = (uuid_text(self.from), uuid_text(self.to));
        if from == to {
            to = uuid_text(!self.to);
        }
        let mut fields: Vec<(String, String)> = vec![
            ("from_account".into(), string(&from)),
            ("to_account".into(), string(&to)),
            ("amount".into(), if self.amount_as_number { amount.clone() } else { string(&amount) }),
            ("currency".into(), string(currency.code())),
        ];
        if let Some(id) = self.payment_id {
            fields.push(("payment_id".into(), string(&uuid_text(id))));
        }
        let body_key = self.key.map(uuid_text);
        if let Some(key) = &body_key {
            fields.push(("idempotency_key".into(), string(key)));
        }
        let mut header = body_key.clone();
        let set = |fields: &mut Vec<(String, String)>, name: &str, value: String| match fields
            .iter_mut()
            .find(|(n, _)| n == name)
        {
            Some(field) => field.1 = value,
            None => fields.push((name.to_owned(), value)),
        };
        let mut tail: Vec<&BodyFault> = Vec::new();
        for fault in [&self.faults.0, &self.faults.1].into_iter().flatten() {
            let field = |i: &u8| FIELDS[usize::from(*i) % FIELDS.len()];
            match fault {
                BodyFault::Drop(i) => fields.retain(|(n, _)| n != field(i)),
                BodyFault::Replace(i, json) => set(&mut fields, field(i), json.render()),
                BodyFault::Unknown(name) => fields.push((name.clone(), "1".into())),
                BodyFault::Duplicate(i) => {
                    if let Some(f) = fields.iter().find(|(n, _)| n == field(i)).cloned() {
                        fields.push(f);
                    }
                }
                BodyFault::AmountText(b) => set(&mut fields, "amount", string(&edge_text(b))),
                BodyFault::AmountNumber(b) => set(&mut fields, "amount", edge_text(b)),
                BodyFault::Currency(c) => set(&mut fields, "currency", string(c)),
                BodyFault::AccountText(first, text) => {
                    set(&mut fields, if *first { "from_account" } else { "to_account" }, string(text));
                }
                BodyFault::SameAccount => set(&mut fields, "to_account", string(&from)),
                BodyFault::PaymentId(text) => set(&mut fields, "payment_id", string(text)),
                BodyFault::BodyKey(text) => set(&mut fields, "idempotency_key", string(text)),
                BodyFault::HeaderKey(h) => header = h.clone(),
                BodyFault::Nest(i, n) => {
                    if let Some(f) = fields.iter_mut().find(|(name, _)| name == field(i)) {
                        let n = usize::from(*n % 12);
                        f.1 = format!("{}{}{}", "[".repeat(n), f.1, "]".repeat(n));
                    }
                }
                BodyFault::Truncate(_) | BodyFault::Append(_) => tail.push(fault),
            }
        }
        let text =
            format!("{{{}}}", fields.iter().map(|(n, v)| format!("{}:{v}", string(n))).collect::<Vec<_>>().join(","));
        let mut bytes = text.into_bytes();
        for fault in tail {
            match fault {
                BodyFault::Truncate(at) => bytes.truncate(usize::from(*at) % (bytes.len() + 1)),
                BodyFault::Append(more) => bytes.extend_from_slice(more),
                _ => unreachable!("only text faults are left"),
            }
        }
        (bytes, header)
    }
}

/// What the gateway must forward for this body, by the documented rules (SPEC §3), or the
/// refusal's problem code.
fn oracle(bytes: &[u8], header: Option<&str>) -> Result<payment::InitiatePaymentRequest, &'static str> {
    if too_deep(bytes) || serde_json::from_slice::<Value>(bytes).is_err() {
        return Err("invalid_json");
    }
    let shape: DocumentedShape = serde_json::from_slice(bytes)
        .map_err(|e| if e.to_string().starts_with("unknown field") { "unknown_field" } else { "invalid_request" })?;
    let currency = Currency::from_code(&shape.currency).map_err(|_| "unsupported_currency")?;
    let amount = Amount::from_json(&shape.amount, currency, AmountPolicy::default()).map_err(|_| "invalid_amount")?;
    let from = AccountId::parse(&shape.from_account).map_err(|_| "invalid_account")?;
    let to = AccountId::parse(&shape.to_account).map_err(|_| "invalid_account")?;
    if from == to {
        return Err("same_account");
    }
    let id = shape.payment_id.as_deref().map(PaymentId::parse).transpose().map_err(|_| "invalid_payment_id")?;
    // A header with bytes beyond visible ASCII cannot be read as text: not a key.
    if header.is_some_and(|h| !h.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))) {
        return Err("invalid_idempotency_key");
    }
    let key = match (header, shape.idempotency_key.as_deref()) {
        (Some(h), Some(b)) if h != b => return Err("idempotency_key_mismatch"),
        (Some(k), _) | (None, Some(k)) => {
            Some(IdempotencyKey::parse(k).map_err(|_| "invalid_idempotency_key")?.as_str().to_owned())
        }
        (None, None) => None,
    };
    Ok(payment::InitiatePaymentRequest {
        payment_id: id.map(|id| id.to_string()).unwrap_or_default(),
        from_account: from.to_string(),
        to_account: to.to_string(),
        amount: Some(payment::Money { amount: amount.to_string(), currency: currency.code().to_owned() }),
        idempotency_key: key.unwrap_or_default(),
    })
}

#[test]
fn the_strict_decoder_accepts_exactly_the_documented_shape() {
    check!().with_test_time(BUDGET).for_each(|bytes: &[u8]| {
        let got = body::parse::<CreatePaymentRequest>(bytes);
        let want_ok = !too_deep(bytes) && serde_json::from_slice::<DocumentedShape>(bytes).is_ok();
        match got {
            Ok(_) => assert!(want_ok, "accepted {:?}", String::from_utf8_lossy(bytes)),
            Err(problem) => {
                assert!(!want_ok, "refused {:?} as {}", String::from_utf8_lossy(bytes), problem.code);
                assert!(BODY_CODES.contains(&problem.code.as_str()), "{}", problem.code);
                assert_eq!(problem.status, StatusCode::BAD_REQUEST);
            }
        }
    });
}

#[test]
fn a_broken_body_is_invalid_json_even_after_a_missing_field() {
    // Found by `the_gateway_forwards_exactly_the_valid_payments_and_canonical_values`: decoding
    // stopped at the missing field and named the body `invalid_request`, unread garbage and all.
    for text in [&b"{\"to_account\":\"x\"} trailing"[..], b"{\"amount\":\"1\"", b"{\"nope\":1,"] {
        let problem = body::parse::<CreatePaymentRequest>(text).err().unwrap();
        assert_eq!(problem.code, "invalid_json", "{}", String::from_utf8_lossy(text));
    }
}

/// The recording payment backend: every InitiatePayment it receives, answered as accepted.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<payment::InitiatePaymentRequest>>>);

#[tonic::async_trait]
impl payment::payment_service_server::PaymentService for Recorder {
    async fn initiate_payment(
        &self,
        request: tonic::Request<payment::InitiatePaymentRequest>,
    ) -> Result<tonic::Response<payment::InitiatePaymentResponse>, tonic::Status> {
        let r = request.into_inner();
        self.0.lock().unwrap().push(r.clone());
        let at = Some(prost_types::Timestamp { seconds: NOW, nanos: 0 });
        let id = if r.payment_id.is_empty() { uuid_text(7) } else { r.payment_id };
        let payment = payment::Payment {
            payment_id: id,
            status: payment::PaymentStatus::Pending as i32,
            failure_reason: String::new(),
            amount: r.amount,
            from_account: r.from_account,
            to_account: r.to_account,
            created_at: at,
            updated_at: at,
            transitions: vec![],
        };
        Ok(tonic::Response::new(payment::InitiatePaymentResponse { payment: Some(payment), replayed: false }))
    }

    async fn get_payment(
        &self,
        _request: tonic::Request<payment::GetPaymentRequest>,
    ) -> Result<tonic::Response<payment::Payment>, tonic::Status> {
        Err(tonic::Status::unimplemented("not fuzzed"))
    }
}

/// The gateway's router in front of the recorder, on a runtime of its own, with a valid token.
struct Edge {
    runtime: tokio::runtime::Runtime,
    app: axum::Router,
    calls: Recorder,
    token: String,
    _dir: tempfile::TempDir,
}

fn edge() -> Edge {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let calls = Recorder::default();
    let addr = runtime.block_on(async {
        let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let server = payment::payment_service_server::PaymentServiceServer::new(calls.clone());
        tokio::spawn(tonic::transport::Server::builder().add_service(server).serve_with_incoming(incoming));
        addr
    });
    let dir = tempfile::tempdir().unwrap();
    let (key_path, jwks_path) = devkeys::ensure_dev_keys(dir.path()).unwrap();
    let mut config = GatewayConfig::default();
    // Thousands of requests a second from one client: the limits are not what is fuzzed here.
    let unlimited = RateQuota { per_second: 1_000_000.try_into().unwrap(), burst: 1_000_000.try_into().unwrap() };
    config.rate_limits.ip = unlimited;
    config.rate_limits.subject = unlimited;
    let auth = Authenticator::from_jwks_file(&jwks_path, config.jwt.clone()).unwrap();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let signer = devkeys::TokenSigner::new(&devkeys::load_key(&key_path).unwrap()).unwrap();
    let token = signer.mint_at(&config.jwt, "fuzzer", "payments:read payments:write", now, 3600, "fuzz").unwrap();
    let channel = runtime
        .block_on(async { tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy() });
    let backends = Backends::new(Channels::one(channel), securepay_gateway::backends::CallInterceptor::none());
    let app = securepay_gateway::router(AppState::new(config, auth, backends, None));
    Edge { runtime, app, calls, token, _dir: dir }
}

impl Edge {
    /// POSTs `body`; the status, the problem code (if any) and the calls the backend received.
    fn post(
        &self,
        body: Vec<u8>,
        key: Option<&str>,
    ) -> (StatusCode, Option<String>, Vec<payment::InitiatePaymentRequest>) {
        let mut request = Request::post("/api/v1/payments")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let mut request = request.body(Body::from(body)).unwrap();
        request.extensions_mut().insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 1], 1))));
        let (status, content_type, bytes) = self.runtime.block_on(async {
            let response = self.app.clone().oneshot(request).await.unwrap();
            let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            (response.status(), content_type, response.into_body().collect().await.unwrap().to_bytes())
        });
        let code = (!status.is_success()).then(|| {
            assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{status}");
            let problem: Value = serde_json::from_slice(&bytes).unwrap();
            problem["code"].as_str().unwrap().to_owned()
        });
        (status, code, std::mem::take(&mut *self.calls.0.lock().unwrap()))
    }
}

#[test]
fn the_gateway_forwards_exactly_the_valid_payments_and_canonical_values() {
    let edge = AssertUnwindSafe(edge());
    check!().with_type::<PaymentBody>().with_test_time(BUDGET).for_each(|body| {
        let (bytes, header) = body.render();
        let text = format!("{} with Idempotency-Key {header:?}", String::from_utf8_lossy(&bytes));
        // A header value must be visible ASCII; others cannot be sent, so they are not tried.
        if header.as_deref().is_some_and(|h| axum::http::HeaderValue::from_str(h).is_err()) {
            return;
        }
        let want = oracle(&bytes, header.as_deref());
        let (status, code, calls) = edge.post(bytes, header.as_deref());
        assert!(!status.is_server_error(), "{status} for {text}");
        match want {
            Ok(forwarded) => {
                assert_eq!(status, StatusCode::ACCEPTED, "{code:?} for {text}");
                assert_eq!(calls, vec![forwarded], "forwarded for {text}");
            }
            Err(want_code) => {
                assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
                assert_eq!(code.as_deref(), Some(want_code), "{text}");
                assert!(calls.is_empty(), "a refused body reached the backend: {text}");
            }
        }
    });
}
