//! Names shared by every deployment of the platform: topics, consumer groups, database schemas and
//! the roles that own them. The local runner, compose.yaml and the tests read them from here.

/// Kafka topics (SPEC §7). Events are keyed by payment id.
pub mod topic {
    pub const PAYMENT_INITIATED: &str = "payment.initiated";
    pub const PAYMENT_COMPLETED: &str = "payment.completed";
    pub const PAYMENT_FAILED: &str = "payment.failed";
    /// Where the account service parks `payment.initiated` records it cannot decode or validate.
    pub const PAYMENT_INITIATED_DLQ: &str = "payment.initiated.dlq";

    pub const ALL: [&str; 4] = [PAYMENT_INITIATED, PAYMENT_COMPLETED, PAYMENT_FAILED, PAYMENT_INITIATED_DLQ];
}

/// Kafka consumer groups (SPEC §6).
pub mod consumer_group {
    pub const ACCOUNT_SERVICE: &str = "account-service-group";
    pub const NOTIFICATION_SERVICE: &str = "notification-service-group";
    pub const PAYMENT_SERVICE: &str = "payment-service-group";
}

/// PostgreSQL schemas and the role of the one service allowed to touch each (SPEC §7).
pub const SCHEMAS: [(&str, &str); 3] =
    [("payments", "payment_service"), ("accounts", "account_service"), ("notifications", "notification_service")];
