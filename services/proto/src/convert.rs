//! The one place where wire messages and domain values meet. Encoders cannot fail; decoders (added
//! with the consumers) refuse bad input with typed errors instead of trusting the wire.

use prost::Message as _;
use securepay_core::events::PaymentSettled;
use securepay_core::money::Amount;
use securepay_core::payment::Outcome;
use time::OffsetDateTime;

use crate::events::v1 as wire;

/// Decimal text and currency code: money never travels as a double.
pub fn money(amount: Amount) -> wire::Money {
    wire::Money { amount: amount.to_string(), currency: amount.currency().code().to_owned() }
}

pub fn timestamp(at: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.unix_timestamp(),
        nanos: i32::try_from(at.nanosecond()).expect("a nanosecond field is below 1e9"),
    }
}

/// The payload of `payment.completed` / `payment.failed` (topic: `PaymentSettled::topic`).
pub fn encode_settled(event: &PaymentSettled) -> Vec<u8> {
    let (event_id, payment_id) = (event.event_id.to_string(), event.payment_id.to_string());
    let (from_account, to_account) = (event.from.to_string(), event.to.to_string());
    let (amount, occurred_at) = (Some(money(event.amount)), Some(timestamp(event.occurred_at)));
    match event.outcome {
        Outcome::Completed => {
            wire::PaymentCompleted { event_id, payment_id, from_account, to_account, amount, occurred_at }
                .encode_to_vec()
        }
        Outcome::Failed(reason) => wire::PaymentFailed {
            event_id,
            payment_id,
            from_account,
            to_account,
            amount,
            occurred_at,
            reason: reason.code().to_owned(),
        }
        .encode_to_vec(),
    }
}
