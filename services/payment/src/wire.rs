//! Domain → payment.v1 wire messages, once. A payment's view lists its birth ("accepted",
//! UNSPECIFIED → PENDING at `created_at`) followed by every recorded transition.

use securepay_core::payment::{Payment, PaymentStatus};
use securepay_proto::convert::timestamp;
use securepay_proto::payment::v1 as wire;

pub fn status(status: PaymentStatus) -> wire::PaymentStatus {
    match status {
        PaymentStatus::Pending => wire::PaymentStatus::Pending,
        PaymentStatus::Completed => wire::PaymentStatus::Completed,
        PaymentStatus::Failed => wire::PaymentStatus::Failed,
    }
}

pub fn payment(payment: &Payment) -> wire::Payment {
    let accepted = wire::Transition {
        from: wire::PaymentStatus::Unspecified as i32,
        to: wire::PaymentStatus::Pending as i32,
        cause: "accepted".to_owned(),
        at: Some(timestamp(payment.created_at)),
    };
    let recorded = payment.transitions.iter().map(|t| wire::Transition {
        from: status(t.from) as i32,
        to: status(t.to) as i32,
        cause: t.cause.clone(),
        at: Some(timestamp(t.at)),
    });
    wire::Payment {
        payment_id: payment.id.to_string(),
        status: status(payment.status) as i32,
        failure_reason: payment.failure_reason.map(|r| r.code().to_owned()).unwrap_or_default(),
        amount: Some(wire::Money {
            amount: payment.amount.to_string(),
            currency: payment.amount.currency().code().to_owned(),
        }),
        from_account: payment.from.to_string(),
        to_account: payment.to.to_string(),
        created_at: Some(timestamp(payment.created_at)),
        updated_at: Some(timestamp(payment.updated_at)),
        transitions: std::iter::once(accepted).chain(recorded).collect(),
    }
}
