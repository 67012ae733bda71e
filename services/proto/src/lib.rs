//! Wire contracts of SecurePay, generated from `proto/` at the repository root.
//!
//! Architecture invariant: generated types, plus `convert` — the single place where wire messages
//! and domain values meet, so every adapter encodes (and later decodes) events the same way. No IO.

pub mod convert;

#[allow(clippy::all, unreachable_pub, missing_docs)]
pub mod payment {
    pub mod v1 {
        tonic::include_proto!("securepay.payment.v1");
    }
}

#[allow(clippy::all, unreachable_pub, missing_docs)]
pub mod account {
    pub mod v1 {
        tonic::include_proto!("securepay.account.v1");
    }
}

#[allow(clippy::all, unreachable_pub, missing_docs)]
pub mod notification {
    pub mod v1 {
        tonic::include_proto!("securepay.notification.v1");
    }
}

#[allow(clippy::all, unreachable_pub, missing_docs)]
pub mod events {
    pub mod v1 {
        tonic::include_proto!("securepay.events.v1");
    }
}
