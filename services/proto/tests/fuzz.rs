//! Fuzz targets of the event decoders (`convert::decode_initiated`, `convert::decode_settled`):
//! what the account, payment and notification consumers run on every record they poll.
//!
//! bolero drives each target with random inputs for a bounded time under plain `cargo test`
//! ([`BUDGET`] each; `BOLERO_RANDOM_TEST_TIME_MS` runs longer: README → Testing → Fuzzing);
//! inputs saved in `tests/__fuzz__/<target>/crashes/` are replayed first. Two kinds of input:
//! raw bytes (hostile payloads), and wire messages built field by field from valid and invalid
//! choices, so decoding gets past the protobuf layer and the field checks are reached.
//! Properties: a decoded event re-encodes to the same value (and to stable bytes); a message is
//! accepted exactly when every field is valid for the domain, and then carries those values.

use std::time::Duration;

use bolero::{TypeGenerator, check};
use prost::Message as _;
use securepay_core::events::{PaymentInitiated, PaymentSettled};
use securepay_core::ids::{AccountId, EventId, PaymentId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::{FailureReason, Outcome};
use securepay_core::topology::topic;
use securepay_proto::convert::{decode_initiated, decode_settled, encode_initiated, encode_settled};
use securepay_proto::events::v1 as wire;
use time::OffsetDateTime;

/// How long each target runs in the test command.
const BUDGET: Duration = Duration::from_secs(3);

/// The reasons a decoder may give (the dead-letter and metric labels).
const REASONS: &[&str] = &[
    "undecodable",
    "invalid_event_id",
    "invalid_payment_id",
    "invalid_subject",
    "invalid_account",
    "same_account",
    "invalid_amount",
    "unsupported_currency",
    "invalid_timestamp",
    "unknown_failure_reason",
    "unknown_topic",
];

/// Id text: mostly UUID forms (valid or nearly), sometimes anything.
#[derive(Debug, TypeGenerator)]
enum IdText {
    Hyphenated(u128),
    Upper(u128),
    Simple(u128),
    Braced(u128),
    Empty,
    Any(String),
}

impl IdText {
    fn render(&self) -> String {
        let hyphenated = |n: u128| {
            let h = format!("{n:032x}");
            format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
        };
        match self {
            IdText::Hyphenated(n) => hyphenated(*n),
            IdText::Upper(n) => hyphenated(*n).to_uppercase(),
            IdText::Simple(n) => format!("{n:032x}"),
            IdText::Braced(n) => format!("{{{}}}", hyphenated(*n)),
            IdText::Empty => String::new(),
            IdText::Any(text) => text.clone(),
        }
    }
}

#[derive(Debug, TypeGenerator)]
enum Stamp {
    Missing,
    Any(i64, i32),
}

/// One way a field of an otherwise valid message is spoiled.
#[derive(Debug, TypeGenerator)]
enum Fault {
    /// Id number `.0 % 4` (event, payment, from, to) becomes this text.
    Id(u8, IdText),
    SameAccount,
    /// The amount text, over an alphabet near the grammar's edge.
    AmountText(Vec<u8>),
    Currency(String),
    NoMoney,
    Stamp(Stamp),
}

/// A valid message's fields, then at most two faults (often none, so decoding is reached).
#[derive(Debug, TypeGenerator)]
struct Common {
    ids: [u128; 4],
    minor_units: u64,
    currency: u8,
    seconds: u32,
    nanos: u32,
    faults: (Option<Fault>, Option<Fault>),
}

struct Rendered {
    event_id: String,
    payment_id: String,
    from: String,
    to: String,
    money: Option<wire::Money>,
    at: Option<prost_types::Timestamp>,
}

impl Common {
    fn render(&self) -> Rendered {
        let all: Vec<Currency> = Currency::all().collect();
        let currency = all[usize::from(self.currency) % all.len()];
        // 1 minor unit up to the default maximum (1,000,000 major units), as canonical text.
        let scale = 10u64.pow(currency.minor_units());
        let minor = 1 + self.minor_units % (1_000_000 * scale);
        let amount = match currency.minor_units() {
            0 => minor.to_string(),
            digits => format!("{}.{:0width$}", minor / scale, minor % scale, width = digits as usize),
        };
        let mut ids = self.ids.map(|n| IdText::Hyphenated(n).render());
        let mut money = Some(wire::Money { amount, currency: currency.code().to_owned() });
        let mut at = Some(prost_types::Timestamp {
            seconds: 1_767_225_600 + i64::from(self.seconds),
            nanos: (self.nanos % 1_000_000_000) as i32,
        });
        for fault in [&self.faults.0, &self.faults.1].into_iter().flatten() {
            match fault {
                Fault::Id(which, text) => ids[usize::from(which % 4)] = text.render(),
                Fault::SameAccount => ids[3] = ids[2].clone(),
                Fault::AmountText(bytes) => {
                    const ALPHABET: &[u8] = b"0123456789012345.-+e ";
                    let text = bytes.iter().take(36).map(|&b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
                    money = money.map(|m| wire::Money { amount: text.collect(), ..m });
                }
                Fault::Currency(code) => money = money.map(|m| wire::Money { currency: code.clone(), ..m }),
                Fault::NoMoney => money = None,
                Fault::Stamp(Stamp::Missing) => at = None,
                Fault::Stamp(Stamp::Any(seconds, nanos)) => {
                    at = Some(prost_types::Timestamp { seconds: *seconds, nanos: *nanos });
                }
            }
        }
        let [event_id, payment_id, from, to] = ids;
        Rendered { event_id, payment_id, from, to, money, at }
    }
}

/// The oracle's reading of the common fields: each by the domain's own parser.
struct Expected {
    event_id: EventId,
    payment_id: PaymentId,
    from: AccountId,
    to: AccountId,
    amount: Amount,
    occurred_at: OffsetDateTime,
}

fn expected(r: &Rendered, policy: AmountPolicy) -> Option<Expected> {
    let money = r.money.as_ref()?;
    let amount = Amount::parse(&money.amount, Currency::from_code(&money.currency).ok()?, policy).ok()?;
    let at = r.at?;
    let nanos = u32::try_from(at.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    let occurred_at = OffsetDateTime::from_unix_timestamp(at.seconds).ok()?.replace_nanosecond(nanos).ok()?;
    let (from, to) = (AccountId::parse(&r.from).ok()?, AccountId::parse(&r.to).ok()?);
    (from != to).then_some(())?;
    Some(Expected {
        event_id: EventId::parse(&r.event_id).ok()?,
        payment_id: PaymentId::parse(&r.payment_id).ok()?,
        from,
        to,
        amount,
        occurred_at,
    })
}

/// A subject: printable ASCII, now and then a blank, a few too long; no bytes is a plain name.
fn subject_text(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "alice".to_owned();
    }
    bytes.iter().take(130).map(|&b| if b < 2 { ' ' } else { char::from(0x21 + b % 94) }).collect()
}

fn assert_initiated_round_trips(event: &PaymentInitiated) {
    let bytes = encode_initiated(event);
    let again = decode_initiated(&bytes, AmountPolicy::default()).expect("an encoded event decodes");
    assert_eq!(&again, event, "re-encoded event decodes to another value");
    assert_eq!(encode_initiated(&again), bytes, "encoding is not stable");
}

fn assert_settled_round_trips(event: &PaymentSettled) {
    let bytes = encode_settled(event);
    let again = decode_settled(event.topic(), &bytes, AmountPolicy::default()).expect("an encoded event decodes");
    assert_eq!(&again, event, "re-encoded event decodes to another value");
    assert_eq!(encode_settled(&again), bytes, "encoding is not stable");
}

#[test]
fn initiated_payloads_decode_to_valid_events_or_a_reason() {
    check!().with_test_time(BUDGET).for_each(|payload: &[u8]| {
        match decode_initiated(payload, AmountPolicy::default()) {
            Ok(event) => {
                assert_ne!(event.from, event.to);
                assert_initiated_round_trips(&event);
            }
            Err(invalid) => assert!(REASONS.contains(&invalid.reason), "{invalid:?}"),
        }
    });
}

#[test]
fn settled_payloads_decode_to_valid_events_or_a_reason() {
    check!().with_test_time(BUDGET).for_each(|input: &[u8]| {
        let Some((&pick, payload)) = input.split_first() else { return };
        let topic = [topic::PAYMENT_COMPLETED, topic::PAYMENT_FAILED, topic::PAYMENT_INITIATED][usize::from(pick % 3)];
        match decode_settled(topic, payload, AmountPolicy::default()) {
            Ok(event) => {
                assert_eq!(event.topic(), topic, "an event decoded from {topic} says another outcome");
                assert_ne!(event.from, event.to);
                assert_settled_round_trips(&event);
            }
            Err(invalid) => assert!(REASONS.contains(&invalid.reason), "{invalid:?}"),
        }
    });
}

#[test]
fn initiated_messages_are_accepted_exactly_when_every_field_is_valid() {
    check!().with_type::<(Common, Vec<u8>)>().with_test_time(BUDGET).for_each(|(common, subject)| {
        let (r, subject, policy) = (common.render(), subject_text(subject), AmountPolicy::default());
        let message = wire::PaymentInitiated {
            event_id: r.event_id.clone(),
            payment_id: r.payment_id.clone(),
            from_account: r.from.clone(),
            to_account: r.to.clone(),
            amount: r.money.clone(),
            occurred_at: r.at,
            subject: subject.clone(),
        };
        let decoded = decode_initiated(&message.encode_to_vec(), policy);
        let want = expected(&r, policy).zip(Subject::parse(&subject).ok()).map(|(e, subject)| PaymentInitiated {
            event_id: e.event_id,
            payment_id: e.payment_id,
            subject,
            from: e.from,
            to: e.to,
            amount: e.amount,
            occurred_at: e.occurred_at,
        });
        assert_eq!(decoded.as_ref().ok(), want.as_ref(), "{message:?} decoded as {decoded:?}");
        if let Ok(event) = decoded {
            assert_initiated_round_trips(&event);
        }
    });
}

#[derive(Debug, TypeGenerator)]
enum Reason {
    Known(u8),
    Any(String),
}

#[test]
fn settled_messages_are_accepted_exactly_when_every_field_is_valid() {
    check!().with_type::<(Common, Option<Reason>)>().with_test_time(BUDGET).for_each(|(common, reason)| {
        let (r, policy) = (common.render(), AmountPolicy::default());
        // No reason: a payment.completed message; a reason: payment.failed.
        let (topic, payload, outcome) = match reason {
            None => {
                let m = wire::PaymentCompleted {
                    event_id: r.event_id.clone(),
                    payment_id: r.payment_id.clone(),
                    from_account: r.from.clone(),
                    to_account: r.to.clone(),
                    amount: r.money.clone(),
                    occurred_at: r.at,
                };
                (topic::PAYMENT_COMPLETED, m.encode_to_vec(), Some(Outcome::Completed))
            }
            Some(reason) => {
                let code = match reason {
                    Reason::Known(i) => {
                        FailureReason::ALL[usize::from(*i) % FailureReason::ALL.len()].code().to_owned()
                    }
                    Reason::Any(text) => text.clone(),
                };
                let m = wire::PaymentFailed {
                    event_id: r.event_id.clone(),
                    payment_id: r.payment_id.clone(),
                    from_account: r.from.clone(),
                    to_account: r.to.clone(),
                    amount: r.money.clone(),
                    occurred_at: r.at,
                    reason: code.clone(),
                };
                (topic::PAYMENT_FAILED, m.encode_to_vec(), FailureReason::parse(&code).map(Outcome::Failed))
            }
        };
        let decoded = decode_settled(topic, &payload, policy);
        let want = expected(&r, policy).zip(outcome).map(|(e, outcome)| PaymentSettled {
            event_id: e.event_id,
            payment_id: e.payment_id,
            from: e.from,
            to: e.to,
            amount: e.amount,
            outcome,
            occurred_at: e.occurred_at,
        });
        assert_eq!(decoded.as_ref().ok(), want.as_ref(), "{topic} {:?} decoded as {decoded:?}", r.event_id);
        if let Ok(event) = decoded {
            assert_settled_round_trips(&event);
        }
    });
}
