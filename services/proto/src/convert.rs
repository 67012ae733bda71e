//! The one place where wire messages and domain values meet. Encoders cannot fail; decoders (added
//! with the consumers) refuse bad input with typed errors instead of trusting the wire.

use prost::Message as _;
use securepay_core::events::{PaymentInitiated, PaymentSettled};
use securepay_core::ids::{AccountId, EventId, PaymentId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::{FailureReason, Outcome};
use securepay_core::topology::topic;
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

/// The payload of `payment.initiated`.
pub fn encode_initiated(event: &PaymentInitiated) -> Vec<u8> {
    wire::PaymentInitiated {
        event_id: event.event_id.to_string(),
        payment_id: event.payment_id.to_string(),
        from_account: event.from.to_string(),
        to_account: event.to.to_string(),
        amount: Some(money(event.amount)),
        occurred_at: Some(timestamp(event.occurred_at)),
        subject: event.subject.to_string(),
    }
    .encode_to_vec()
}

/// Why a consumed event was refused. `reason` is a stable code: it names the dead-letter record's
/// reason and the metric label, and never carries the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid event: {reason}")]
pub struct InvalidEvent {
    pub reason: &'static str,
}

fn invalid(reason: &'static str) -> InvalidEvent {
    InvalidEvent { reason }
}

/// Decodes `payment.initiated`, validating every field as the domain requires (a consumer must
/// not trust the wire): ids are UUIDs, accounts differ, the amount is exact and within `policy`.
pub fn decode_initiated(payload: &[u8], policy: AmountPolicy) -> Result<PaymentInitiated, InvalidEvent> {
    let m = wire::PaymentInitiated::decode(payload).map_err(|_| invalid("undecodable"))?;
    let (from, to) = accounts(&m.from_account, &m.to_account)?;
    Ok(PaymentInitiated {
        event_id: EventId::parse(&m.event_id).map_err(|_| invalid("invalid_event_id"))?,
        payment_id: PaymentId::parse(&m.payment_id).map_err(|_| invalid("invalid_payment_id"))?,
        subject: Subject::parse(&m.subject).map_err(|_| invalid("invalid_subject"))?,
        from,
        to,
        amount: amount(m.amount.as_ref(), policy)?,
        occurred_at: occurred_at(m.occurred_at.as_ref())?,
    })
}

/// Decodes `payment.completed` (`topic::PAYMENT_COMPLETED`) or `payment.failed`, by topic.
pub fn decode_settled(topic: &str, payload: &[u8], policy: AmountPolicy) -> Result<PaymentSettled, InvalidEvent> {
    let (event_id, payment_id, from, to, amount_m, at, outcome) = match topic {
        topic::PAYMENT_COMPLETED => {
            let m = wire::PaymentCompleted::decode(payload).map_err(|_| invalid("undecodable"))?;
            (m.event_id, m.payment_id, m.from_account, m.to_account, m.amount, m.occurred_at, Outcome::Completed)
        }
        topic::PAYMENT_FAILED => {
            let m = wire::PaymentFailed::decode(payload).map_err(|_| invalid("undecodable"))?;
            let reason = FailureReason::parse(&m.reason).ok_or(invalid("unknown_failure_reason"))?;
            (m.event_id, m.payment_id, m.from_account, m.to_account, m.amount, m.occurred_at, Outcome::Failed(reason))
        }
        _ => return Err(invalid("unknown_topic")),
    };
    let (from, to) = accounts(&from, &to)?;
    Ok(PaymentSettled {
        event_id: EventId::parse(&event_id).map_err(|_| invalid("invalid_event_id"))?,
        payment_id: PaymentId::parse(&payment_id).map_err(|_| invalid("invalid_payment_id"))?,
        from,
        to,
        amount: amount(amount_m.as_ref(), policy)?,
        outcome,
        occurred_at: occurred_at(at.as_ref())?,
    })
}

fn accounts(from: &str, to: &str) -> Result<(AccountId, AccountId), InvalidEvent> {
    let from = AccountId::parse(from).map_err(|_| invalid("invalid_account"))?;
    let to = AccountId::parse(to).map_err(|_| invalid("invalid_account"))?;
    if from == to {
        return Err(invalid("same_account"));
    }
    Ok((from, to))
}

fn amount(m: Option<&wire::Money>, policy: AmountPolicy) -> Result<Amount, InvalidEvent> {
    let m = m.ok_or(invalid("invalid_amount"))?;
    let currency = Currency::from_code(&m.currency).map_err(|_| invalid("unsupported_currency"))?;
    Amount::parse(&m.amount, currency, policy).map_err(|_| invalid("invalid_amount"))
}

fn occurred_at(t: Option<&prost_types::Timestamp>) -> Result<OffsetDateTime, InvalidEvent> {
    let t = t.ok_or(invalid("invalid_timestamp"))?;
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000).ok_or(invalid("invalid_timestamp"))?;
    OffsetDateTime::from_unix_timestamp(t.seconds)
        .ok()
        .and_then(|at| at.replace_nanosecond(nanos).ok())
        .ok_or(invalid("invalid_timestamp"))
}

#[cfg(test)]
mod tests {
    use securepay_core::money::Currency;

    use super::*;

    fn initiated() -> PaymentInitiated {
        let eur = Currency::from_code("EUR").unwrap();
        PaymentInitiated {
            event_id: EventId::parse("00000000-0000-4000-8000-000000000001").unwrap(),
            payment_id: PaymentId::parse("00000000-0000-4000-8000-000000000002").unwrap(),
            subject: Subject::parse("alice").unwrap(),
            from: AccountId::parse("00000000-0000-4000-8000-000000000003").unwrap(),
            to: AccountId::parse("00000000-0000-4000-8000-000000000004").unwrap(),
            amount: Amount::parse("10.50", eur, AmountPolicy::default()).unwrap(),
            occurred_at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap().replace_nanosecond(7).unwrap(),
        }
    }

    #[test]
    fn events_round_trip() {
        let event = initiated();
        assert_eq!(decode_initiated(&encode_initiated(&event), AmountPolicy::default()), Ok(event.clone()));
        for outcome in [Outcome::Completed, Outcome::Failed(FailureReason::InsufficientFunds)] {
            let settled = PaymentSettled {
                event_id: event.event_id,
                payment_id: event.payment_id,
                from: event.from,
                to: event.to,
                amount: event.amount,
                outcome,
                occurred_at: event.occurred_at,
            };
            let decoded = decode_settled(settled.topic(), &encode_settled(&settled), AmountPolicy::default());
            assert_eq!(decoded, Ok(settled));
        }
    }

    #[test]
    fn hostile_payloads_are_refused_with_a_reason() {
        let policy = AmountPolicy::default();
        assert_eq!(decode_initiated(b"\xff\xff\xff garbage", policy).unwrap_err().reason, "undecodable");
        let mut m = wire::PaymentInitiated::decode(encode_initiated(&initiated()).as_slice()).unwrap();
        m.to_account = m.from_account.clone();
        assert_eq!(decode_initiated(&m.encode_to_vec(), policy).unwrap_err().reason, "same_account");
        for (amount, reason) in [
            ("-1", "invalid_amount"),
            ("1e400", "invalid_amount"),
            ("NaN", "invalid_amount"),
            ("1.001", "invalid_amount"),
        ] {
            let mut m = wire::PaymentInitiated::decode(encode_initiated(&initiated()).as_slice()).unwrap();
            m.amount.as_mut().unwrap().amount = amount.into();
            assert_eq!(decode_initiated(&m.encode_to_vec(), policy).unwrap_err().reason, reason, "{amount}");
        }
        let mut m = wire::PaymentInitiated::decode(encode_initiated(&initiated()).as_slice()).unwrap();
        m.payment_id = "'; DROP TABLE accounts; --".into();
        assert_eq!(decode_initiated(&m.encode_to_vec(), policy).unwrap_err().reason, "invalid_payment_id");
        assert_eq!(decode_settled("payment.unknown", b"", policy).unwrap_err().reason, "unknown_topic");
    }
}
