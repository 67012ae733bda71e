//! Wire contracts of SecurePay, generated from `proto/` at the repository root.
//!
//! Architecture invariant: this crate holds generated types only — no logic, no conversions. Turning a
//! wire message into a domain value (and failing on bad input) is the job of the service edge.

#![allow(clippy::all, unreachable_pub, missing_docs)]

pub mod payment {
    pub mod v1 {
        tonic::include_proto!("securepay.payment.v1");
    }
}

pub mod account {
    pub mod v1 {
        tonic::include_proto!("securepay.account.v1");
    }
}

pub mod events {
    pub mod v1 {
        tonic::include_proto!("securepay.events.v1");
    }
}
