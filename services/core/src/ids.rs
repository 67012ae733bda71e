//! Typed identifiers. Ids are UUIDs on the wire; a typed id can only be built from a valid one, so
//! a payment id can never be passed where an account id is expected.
//!
//! New ids are minted by the `Ids` port (seeded in simulation); this module only parses and wraps.

use std::fmt;

use uuid::Uuid;

/// The longest id text looked at before parsing (a hyphenated UUID is 36 characters).
const ID_TEXT_LEN_MAX: usize = 36;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} must be a UUID like 3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a65")]
pub struct InvalidId {
    pub kind: &'static str,
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            pub const KIND: &'static str = $kind;

            /// Parses the hyphenated UUID form only (what our API documents).
            pub fn parse(text: &str) -> Result<Self, InvalidId> {
                if text.len() != ID_TEXT_LEN_MAX {
                    return Err(InvalidId { kind: $kind });
                }
                Uuid::try_parse(text).map($name).map_err(|_| InvalidId { kind: $kind })
            }

            pub const fn from_uuid(uuid: Uuid) -> Self {
                $name(uuid)
            }

            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_id!(
    /// A payment, chosen by the client or minted by the payment service.
    PaymentId, "payment_id"
);
uuid_id!(
    /// An account holding a balance in one currency.
    AccountId, "account_id"
);
uuid_id!(
    /// One event on the bus; consumers dedupe by it.
    EventId, "event_id"
);

/// The verified end-user subject (the JWT `sub`), bounded and printable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(String);

impl Subject {
    pub const LEN_MAX: usize = 128;

    pub fn parse(text: &str) -> Result<Subject, InvalidSubject> {
        let ok = !text.is_empty() && text.len() <= Self::LEN_MAX && text.bytes().all(|b| b.is_ascii_graphic());
        if ok { Ok(Subject(text.to_owned())) } else { Err(InvalidSubject) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subject must be 1 to 128 printable ASCII characters")]
pub struct InvalidSubject;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_only_hyphenated_uuids() {
        let ok = "3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a65";
        assert_eq!(PaymentId::parse(ok).unwrap().to_string(), ok);
        for bad in [
            "",
            "1",
            "3f2b8c1e9d4a4e7b8f6a2c1d0e9b7a65",
            "{3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a65}",
            "3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a6'",
            "' OR 1=1 --",
            "urn:uuid:3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a65",
        ] {
            assert!(AccountId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn subjects_are_bounded_and_printable() {
        assert!(Subject::parse("alice").is_ok());
        assert!(Subject::parse("").is_err());
        assert!(Subject::parse("a b").is_err());
        assert!(Subject::parse(&"a".repeat(129)).is_err());
        assert!(Subject::parse("al\u{0}ice").is_err());
    }
}
