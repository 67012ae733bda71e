//! Idempotency with Stripe semantics, scoped per subject (SPEC §6.1).
//!
//! A key names one intended effect. The first request with a key claims it (`InFlight`) and, when
//! done, stores its response (`Completed`). Later requests with the same key get, by
//! [`decide`]: the stored response (same request), `KeyReused` (different request) or
//! `InProgress` (the first is still running). The stores (Redis fast path, PostgreSQL truth) only
//! persist [`Record`]s; the decision is this pure function, the same in production and simulation.

use sha2::{Digest, Sha256};

/// A client-supplied idempotency key: 1 to 255 characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const LEN_MAX: usize = 255;

    pub fn parse(text: &str) -> Result<IdempotencyKey, InvalidIdempotencyKey> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':');
        if !text.is_empty() && text.len() <= Self::LEN_MAX && text.bytes().all(allowed) {
            Ok(IdempotencyKey(text.to_owned()))
        } else {
            Err(InvalidIdempotencyKey)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("idempotency key must be 1 to 255 characters of letters, digits, '-', '_', '.', ':'")]
pub struct InvalidIdempotencyKey;

/// SHA-256 of a request's canonical form: equal fingerprints mean "the same request".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Hashes canonical fields; each is length-prefixed so `("ab","c")` and `("a","bc")` differ.
    pub fn of(fields: &[&str]) -> Fingerprint {
        let mut hasher = Sha256::new();
        for field in fields {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field.as_bytes());
        }
        Fingerprint(hasher.finalize().into())
    }
}

/// What the stores keep per (subject, key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<R> {
    /// Claimed by a request that has not finished.
    InFlight { fingerprint: Fingerprint },
    /// Finished; `response` is replayed byte-for-byte to identical retries.
    Completed { fingerprint: Fingerprint, response: R },
}

/// What to do with a request, given what the store holds for its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<R> {
    /// No record: claim the key and execute.
    Execute,
    /// Same request already completed: return its stored response, execute nothing.
    Replay(R),
    /// Same key, different request: `422 idempotency_key_reused`.
    KeyReused,
    /// Same key, first request still running: `409 request_in_progress`.
    InProgress,
}

/// The single idempotency rule.
pub fn decide<R: Clone>(existing: Option<&Record<R>>, fingerprint: Fingerprint) -> Decision<R> {
    match existing {
        None => Decision::Execute,
        Some(Record::InFlight { fingerprint: first }) | Some(Record::Completed { fingerprint: first, .. })
            if *first != fingerprint =>
        {
            Decision::KeyReused
        }
        Some(Record::InFlight { .. }) => Decision::InProgress,
        Some(Record::Completed { response, .. }) => Decision::Replay(response.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_with_a_safe_charset() {
        assert!(IdempotencyKey::parse("order-42:retry_1.a").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        for bad in ["", " ", "a b", "a/b", "ключ", "a\nb", "'; DROP TABLE x; --"] {
            assert!(IdempotencyKey::parse(bad).is_err(), "{bad:?}");
        }
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    }

    #[test]
    fn fingerprint_fields_cannot_be_shifted() {
        assert_ne!(Fingerprint::of(&["ab", "c"]), Fingerprint::of(&["a", "bc"]));
        assert_eq!(Fingerprint::of(&["a", "b"]), Fingerprint::of(&["a", "b"]));
    }

    #[test]
    fn the_rule_follows_stripe_semantics() {
        let a = Fingerprint::of(&["a"]);
        let b = Fingerprint::of(&["b"]);
        assert_eq!(decide::<u8>(None, a), Decision::Execute);
        assert_eq!(decide::<u8>(Some(&Record::InFlight { fingerprint: a }), a), Decision::InProgress);
        assert_eq!(decide::<u8>(Some(&Record::InFlight { fingerprint: a }), b), Decision::KeyReused);
        let done = Record::Completed { fingerprint: a, response: 7u8 };
        assert_eq!(decide(Some(&done), a), Decision::Replay(7));
        assert_eq!(decide(Some(&done), b), Decision::KeyReused);
    }
}
