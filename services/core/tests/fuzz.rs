//! Fuzz targets of the amount decoder (`money::parse_decimal_text`, `Amount::parse`,
//! `Amount::from_json`): the text every amount enters by, from the API and from the wire.
//!
//! bolero drives each target with random inputs for a bounded time under plain `cargo test`
//! (stable toolchain; [`BUDGET`] each, `BOLERO_RANDOM_TEST_TIME_MS` runs longer: README →
//! Testing → Fuzzing). Inputs in `tests/__fuzz__/<target>/crashes/` and `corpus/` are replayed
//! first, so a crash saved there is a regression test. Each target checks properties against an
//! independent oracle of the grammar, not only that nothing panics.

use std::str::FromStr;
use std::time::Duration;

use bolero::check;
use rust_decimal::Decimal;
use securepay_core::money::{AMOUNT_TEXT_LEN_MAX, Amount, AmountPolicy, Currency, MoneyError, parse_decimal_text};

/// How long each target runs in the test command.
const BUDGET: Duration = Duration::from_secs(3);

/// Bytes map onto this alphabet most of the time, so inputs are near the grammar's edge.
const ALPHABET: &[u8] = b"0123456789000011119999..-+eE _,\t";

/// Turns fuzz bytes into amount-like text: mostly alphabet characters, sometimes any char.
fn amount_like(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| if b < 240 { char::from(ALPHABET[usize::from(b) % ALPHABET.len()]) } else { char::from(b) })
        .collect()
}

/// The documented grammar, written independently of the parser: `digits[.digits]`.
fn in_grammar(text: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match text.split_once('.') {
        Some((int, frac)) => digits(int) && digits(frac),
        None => digits(text),
    }
}

fn currency(index: u8) -> Currency {
    let all: Vec<Currency> = Currency::all().collect();
    all[usize::from(index) % all.len()]
}

/// What any accepted amount must satisfy, and that its canonical text round-trips.
fn check_amount(amount: Amount, text: &str, currency: Currency, policy: AmountPolicy) {
    let value = amount.value();
    assert!(in_grammar(text), "{text:?} accepted outside the grammar");
    assert!(value > Decimal::ZERO && value <= policy.maximum, "{text:?} accepted as {value}");
    assert!(value.scale() <= currency.minor_units(), "{text:?} keeps more decimals than {currency}");
    assert_eq!(Decimal::from_str(text).ok(), Some(value), "{text:?} accepted as another value");
    let canonical = amount.to_string();
    let decimals = canonical.split_once('.').map_or(0, |(_, f)| f.len());
    assert_eq!(decimals, currency.minor_units() as usize, "{canonical:?} is not canonical for {currency}");
    assert_eq!(Amount::parse(&canonical, currency, policy), Ok(amount), "{canonical:?} does not round-trip");
    let scale = Decimal::from(10i64.pow(currency.minor_units()));
    assert_eq!(Decimal::from_i128_with_scale(amount.minor_units(), 0), value * scale, "minor units of {text:?}");
}

#[test]
fn decimal_text_accepts_exactly_the_grammar() {
    check!().with_test_time(BUDGET).with_max_len(48).for_each(|bytes: &[u8]| {
        let text = amount_like(bytes);
        match parse_decimal_text(&text) {
            Ok(value) => {
                assert!(in_grammar(&text) && text.len() <= AMOUNT_TEXT_LEN_MAX, "{text:?} accepted");
                assert_eq!(Decimal::from_str(&text).ok(), Some(value), "{text:?} read as {value}");
                assert_eq!(parse_decimal_text(&value.to_string()), Ok(value), "{value} does not round-trip");
            }
            // Grammatical text that does not fit a Decimal (more than 28 significant digits).
            Err(MoneyError::TooLong) => {}
            Err(MoneyError::Malformed) => assert!(!in_grammar(&text), "{text:?} refused as malformed"),
            Err(other) => panic!("{text:?}: unexpected {other:?}"),
        }
    });
}

#[test]
fn accepted_amounts_are_valid_and_round_trip() {
    check!().with_test_time(BUDGET).with_max_len(40).for_each(|bytes: &[u8]| {
        let Some((&pick, rest)) = bytes.split_first() else { return };
        let (currency, policy) = (currency(pick), AmountPolicy::default());
        let text = amount_like(rest);
        match Amount::parse(&text, currency, policy) {
            Ok(amount) => check_amount(amount, &text, currency, policy),
            Err(error) => assert_eq!(error.code(), "invalid_amount", "{text:?}: {error:?}"),
        }
    });
}

#[test]
fn json_numbers_are_read_as_their_text_never_as_floats() {
    check!().with_test_time(BUDGET).with_max_len(40).for_each(|bytes: &[u8]| {
        let Some((&pick, rest)) = bytes.split_first() else { return };
        let (currency, policy) = (currency(pick), AmountPolicy::default());
        let text = amount_like(rest);
        let Ok(number @ serde_json::Value::Number(_)) = serde_json::from_str::<serde_json::Value>(&text) else {
            return;
        };
        let as_number = Amount::from_json(&number, currency, policy);
        let as_string = Amount::from_json(&serde_json::Value::String(text.trim().to_owned()), currency, policy);
        // serde_json re-spells exponents (`1e0` → `1e+0`), so a refusal may name another reason.
        assert_eq!(as_number.clone().ok(), as_string.clone().ok(), "the JSON number and string {text:?} differ");
        assert_eq!(as_number.clone().map_err(|e| e.code()), as_string.map_err(|e| e.code()), "{text:?}");
        if let Ok(amount) = as_number {
            check_amount(amount, text.trim(), currency, policy);
        }
    });
}

#[test]
fn other_json_types_are_refused() {
    let eur = Currency::from_code("EUR").unwrap();
    for value in [serde_json::json!(null), serde_json::json!(true), serde_json::json!(["1"]), serde_json::json!({})] {
        assert_eq!(Amount::from_json(&value, eur, AmountPolicy::default()), Err(MoneyError::WrongJsonType));
    }
}
