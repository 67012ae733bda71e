//! Workload identities (SPIFFE IDs) and the per-method allow-list of SPEC §2.
//!
//! The policy is pure data so that production interceptors, the simulator's interceptors and the
//! runner's SPIRE registration entries all read the same table.

use std::fmt;

/// The trust domain every SecurePay workload belongs to; peers from any other domain are refused.
pub const TRUST_DOMAIN: &str = "securepay.dev";

/// The four SecurePay workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceIdentity {
    ApiGateway,
    PaymentService,
    AccountService,
    NotificationService,
}

impl ServiceIdentity {
    pub const ALL: [ServiceIdentity; 4] = [
        ServiceIdentity::ApiGateway,
        ServiceIdentity::PaymentService,
        ServiceIdentity::AccountService,
        ServiceIdentity::NotificationService,
    ];

    /// The SPIFFE ID this workload's X.509-SVID carries.
    pub const fn spiffe_id(self) -> &'static str {
        match self {
            ServiceIdentity::ApiGateway => "spiffe://securepay.dev/api-gateway",
            ServiceIdentity::PaymentService => "spiffe://securepay.dev/payment-service",
            ServiceIdentity::AccountService => "spiffe://securepay.dev/account-service",
            ServiceIdentity::NotificationService => "spiffe://securepay.dev/notification-service",
        }
    }

    /// The name of the workload's binary (and of its crate).
    pub const fn binary(self) -> &'static str {
        match self {
            ServiceIdentity::ApiGateway => "securepay-gateway",
            ServiceIdentity::PaymentService => "securepay-payment",
            ServiceIdentity::AccountService => "securepay-account",
            ServiceIdentity::NotificationService => "securepay-notification",
        }
    }

    /// Parses a SPIFFE ID; anything outside the trust domain or not one of ours is `None`.
    pub fn from_spiffe_id(id: &str) -> Option<ServiceIdentity> {
        Self::ALL.into_iter().find(|s| s.spiffe_id() == id)
    }
}

impl fmt::Display for ServiceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.spiffe_id())
    }
}

/// The gRPC methods that take callers, as `/package.Service/Method` paths.
pub mod method {
    pub const INITIATE_PAYMENT: &str = "/securepay.payment.v1.PaymentService/InitiatePayment";
    pub const GET_PAYMENT: &str = "/securepay.payment.v1.PaymentService/GetPayment";
    pub const CHECK_BALANCE: &str = "/securepay.account.v1.AccountService/CheckBalance";
    pub const GET_BALANCE: &str = "/securepay.account.v1.AccountService/GetBalance";
    pub const LIST_NOTIFICATIONS: &str = "/securepay.notification.v1.NotificationService/ListNotifications";
}

/// SPEC §2 allow-list: which workload may call which method. Everything not listed is denied.
pub const ALLOWED_CALLERS: &[(&str, &[ServiceIdentity])] = &[
    (method::INITIATE_PAYMENT, &[ServiceIdentity::ApiGateway]),
    (method::GET_PAYMENT, &[ServiceIdentity::ApiGateway]),
    (method::CHECK_BALANCE, &[ServiceIdentity::PaymentService]),
    (method::GET_BALANCE, &[ServiceIdentity::ApiGateway]),
    (method::LIST_NOTIFICATIONS, &[ServiceIdentity::ApiGateway]),
];

/// Whether `caller` may invoke `method`. Unknown methods are denied (fail closed).
pub fn is_allowed(method: &str, caller: ServiceIdentity) -> bool {
    ALLOWED_CALLERS.iter().find(|(m, _)| *m == method).is_some_and(|(_, callers)| callers.contains(&caller))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_identity_round_trips_through_its_spiffe_id() {
        for s in ServiceIdentity::ALL {
            assert_eq!(ServiceIdentity::from_spiffe_id(s.spiffe_id()), Some(s));
            assert!(s.spiffe_id().starts_with(&format!("spiffe://{TRUST_DOMAIN}/")));
        }
        assert_eq!(ServiceIdentity::from_spiffe_id("spiffe://evil.dev/api-gateway"), None);
    }

    #[test]
    fn notification_service_may_call_nothing() {
        for (m, _) in ALLOWED_CALLERS {
            assert!(!is_allowed(m, ServiceIdentity::NotificationService), "{m}");
        }
    }

    #[test]
    fn unknown_methods_are_denied() {
        for s in ServiceIdentity::ALL {
            assert!(!is_allowed("/securepay.account.v1.AccountService/Debit", s));
        }
    }
}
