//! What the adapters store in Redis, as compact bytes, and reading it back. Anything that does not
//! read back as a domain value is `PortError::Corrupt`, never a guess.

use std::str::FromStr;

use rust_decimal::Decimal;
use securepay_core::idempotency::{Fingerprint, Record};
use securepay_core::ids::{AccountId, Subject};
use securepay_core::money::{Currency, parse_decimal_text};
use securepay_ports::{AccountView, CachedBalance, PortError, PortResult};
use time::OffsetDateTime;

/// Version tag of the balance format; a value with another tag is corrupt (or from a newer writer).
const BALANCE_FORMAT: &str = "1";

/// `1|<account id>|<currency>|<balance>|<cached_at unix ns>|<owner>`. The balance is decimal text,
/// exact (never a float). The owner goes last because it is the only field that may contain `|`.
pub(crate) fn encode_balance(balance: &CachedBalance) -> String {
    let account = &balance.account;
    format!(
        "{BALANCE_FORMAT}|{}|{}|{}|{}|{}",
        account.id,
        account.currency.code(),
        account.balance,
        balance.cached_at.unix_timestamp_nanos(),
        account.owner
    )
}

pub(crate) fn decode_balance(expected: AccountId, bytes: &[u8]) -> PortResult<CachedBalance> {
    let corrupt = |what: &str| PortError::Corrupt { what: format!("cached balance of {expected}: {what}") };
    let text = std::str::from_utf8(bytes).map_err(|_| corrupt("not UTF-8"))?;
    let mut fields = text.splitn(6, '|');
    let mut next = |name: &str| fields.next().ok_or_else(|| corrupt(&format!("no {name}")));
    if next("format")? != BALANCE_FORMAT {
        return Err(corrupt("unknown format"));
    }
    let id = AccountId::parse(next("account id")?).map_err(|_| corrupt("account id"))?;
    if id != expected {
        return Err(corrupt("cached under another account's key"));
    }
    let currency = Currency::from_code(next("currency")?).map_err(|_| corrupt("currency"))?;
    let balance = decode_decimal(next("balance")?).ok_or_else(|| corrupt("balance"))?;
    let cached_at_ns = i128::from_str(next("cached_at")?).map_err(|_| corrupt("cached_at"))?;
    let cached_at = OffsetDateTime::from_unix_timestamp_nanos(cached_at_ns).map_err(|_| corrupt("cached_at"))?;
    let owner = Subject::parse(next("owner")?).map_err(|_| corrupt("owner"))?;
    Ok(CachedBalance { account: AccountView { id, owner, currency, balance }, cached_at })
}

/// Exact decimal text, as `Decimal`'s `Display` writes it: `[-]digits[.digits]`, nothing else (no
/// exponent, no blank), so a value nobody wrote is never read as a balance.
fn decode_decimal(text: &str) -> Option<Decimal> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(digits) => (true, digits),
        None => (false, text),
    };
    let value = parse_decimal_text(digits).ok()?;
    Some(if negative { -value } else { value })
}

const IN_FLIGHT: u8 = b'I';
const COMPLETED: u8 = b'C';
const FINGERPRINT_LEN: usize = 32;

/// `I<fingerprint><lease end, unix ms as decimal digits>`: a claim. The Lua scripts read the first
/// byte, so it is the record's state, and the lease end as a number.
pub(crate) fn encode_in_flight(fingerprint: Fingerprint, lease_end_ms: i64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + FINGERPRINT_LEN + 20);
    bytes.push(IN_FLIGHT);
    bytes.extend_from_slice(&fingerprint.0);
    bytes.extend_from_slice(lease_end_ms.to_string().as_bytes());
    bytes
}

/// `I<fingerprint>[<lease end>]` or `C<fingerprint><response bytes>`.
pub(crate) fn decode_record(bytes: &[u8]) -> PortResult<Record<Vec<u8>>> {
    let corrupt = |what: &str| PortError::Corrupt { what: format!("idempotency record: {what}") };
    let (&state, rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
    if rest.len() < FINGERPRINT_LEN {
        return Err(corrupt("short fingerprint"));
    }
    let (fingerprint, response) = rest.split_at(FINGERPRINT_LEN);
    let fingerprint = Fingerprint(fingerprint.try_into().expect("split at the fingerprint length"));
    match state {
        IN_FLIGHT if response.iter().all(u8::is_ascii_digit) => Ok(Record::InFlight { fingerprint }),
        COMPLETED => Ok(Record::Completed { fingerprint, response: response.to_vec() }),
        _ => Err(corrupt("unknown state")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balance(owner: &str, value: &str) -> CachedBalance {
        CachedBalance {
            account: AccountView {
                id: AccountId::parse("0b9e4f3e-4f6a-4c8e-9d3c-2a1b0c9d8e7f").unwrap(),
                owner: Subject::parse(owner).unwrap(),
                currency: Currency::from_code("JPY").unwrap(),
                balance: Decimal::from_str(value).unwrap(),
            },
            cached_at: OffsetDateTime::from_unix_timestamp_nanos(1_800_000_000_123_456_789).unwrap(),
        }
    }

    #[test]
    fn a_balance_reads_back_exactly_even_with_a_pipe_in_the_owner() {
        for value in ["12345678901234567890.1234", "0.00", "-3.5", "7"] {
            let cached = balance("user|with|pipes", value);
            let text = encode_balance(&cached);
            assert!(text.contains(&format!("|{value}|")), "the balance is decimal text: {text}");
            assert_eq!(decode_balance(cached.account.id, text.as_bytes()).unwrap(), cached);
        }
    }

    #[test]
    fn a_garbled_or_misplaced_balance_is_corrupt() {
        let cached = balance("alice", "1.50");
        let good = encode_balance(&cached);
        let other = AccountId::parse("11111111-1111-4111-8111-111111111111").unwrap();
        assert!(matches!(decode_balance(other, good.as_bytes()), Err(PortError::Corrupt { .. })));
        for bad in ["", "garbage", "2|x", &good.replace("1.50", "1.5e3"), &good.replace("JPY", "XXX")] {
            assert!(
                matches!(decode_balance(cached.account.id, bad.as_bytes()), Err(PortError::Corrupt { .. })),
                "{bad}"
            );
        }
        assert!(matches!(decode_balance(cached.account.id, &[0xff, 0xfe]), Err(PortError::Corrupt { .. })));
    }

    #[test]
    fn records_read_back_and_garbage_is_corrupt() {
        let fingerprint = Fingerprint::of(&["request"]);
        assert_eq!(
            decode_record(&encode_in_flight(fingerprint, 1_800_000_030_000)).unwrap(),
            Record::InFlight { fingerprint }
        );
        let mut completed = vec![COMPLETED];
        completed.extend_from_slice(&fingerprint.0);
        completed.extend_from_slice(b"\x00response");
        assert_eq!(
            decode_record(&completed).unwrap(),
            Record::Completed { fingerprint, response: b"\x00response".to_vec() }
        );
        for bad in [&b""[..], b"I", b"Xshort", &[b'X'; 33]] {
            assert!(matches!(decode_record(bad), Err(PortError::Corrupt { .. })));
        }
    }
}
