//! Money: an exact decimal amount in an ISO 4217 currency. No floating point touches an amount.
//!
//! An [`Amount`] can only be built valid: positive, no more decimals than its currency's minor
//! units, and at most the configured maximum. Parsing accepts the decimal text of a JSON string or a
//! JSON number (read as text, never through `f64`), and refuses signs, exponents, `NaN`, blanks.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

/// The longest amount text we look at; longer input is rejected before any arithmetic.
pub const AMOUNT_TEXT_LEN_MAX: usize = 32;

/// An ISO 4217 currency that SecurePay settles in, with its number of minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency {
    code: &'static str,
    minor_units: u8,
}

/// The supported currencies and their minor units (ISO 4217). Adding one is a reviewed change.
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2),
    ("AUD", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PLN", 2),
    ("RON", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("TND", 3),
    ("TRY", 2),
    ("UGX", 0),
    ("USD", 2),
    ("VND", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("ZAR", 2),
];

impl Currency {
    /// Looks up an ISO 4217 alphabetic code (upper case, exactly three letters).
    pub fn from_code(code: &str) -> Result<Currency, MoneyError> {
        CURRENCIES
            .iter()
            .find(|(c, _)| *c == code)
            .map(|&(code, minor_units)| Currency { code, minor_units })
            .ok_or(MoneyError::UnsupportedCurrency)
    }

    pub fn code(self) -> &'static str {
        self.code
    }

    /// Digits after the decimal point this currency allows (EUR 2, JPY 0, KWD 3).
    pub fn minor_units(self) -> u32 {
        u32::from(self.minor_units)
    }

    /// Every supported currency.
    pub fn all() -> impl Iterator<Item = Currency> {
        CURRENCIES.iter().map(|&(code, minor_units)| Currency { code, minor_units })
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::from_code(s)
    }
}

/// Why an amount or currency was refused. Each maps to a stable public error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount must be a decimal number like \"10.50\"")]
    Malformed,
    #[error("amount is longer than {AMOUNT_TEXT_LEN_MAX} characters")]
    TooLong,
    #[error("{currency} allows at most {minor_units} decimal places")]
    TooManyDecimals { currency: Currency, minor_units: u32 },
    #[error("amount must be greater than zero")]
    NotPositive,
    #[error("amount exceeds the maximum of {maximum}")]
    AboveMaximum { maximum: Decimal },
    #[error("currency is not a supported ISO 4217 code")]
    UnsupportedCurrency,
    #[error("amount must be a string or a number")]
    WrongJsonType,
}

impl MoneyError {
    /// The stable error code of SPEC §3.
    pub fn code(&self) -> &'static str {
        match self {
            MoneyError::UnsupportedCurrency => "unsupported_currency",
            _ => "invalid_amount",
        }
    }
}

/// Parses non-negative decimal text exactly: `digits` or `digits.digits`, nothing else.
///
/// This is the only door from text to [`Decimal`] for amounts: no sign, exponent, blank, `NaN`,
/// `Infinity`, thousands separator or leading `.`; bounded length, so the result always fits.
pub fn parse_decimal_text(text: &str) -> Result<Decimal, MoneyError> {
    if text.len() > AMOUNT_TEXT_LEN_MAX {
        return Err(MoneyError::TooLong);
    }
    let (int_part, frac_part) = match text.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (text, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int_part) || frac_part.is_some_and(|f| !all_digits(f)) {
        return Err(MoneyError::Malformed);
    }
    // 32 characters of digits fit Decimal's 96-bit mantissa only up to 28 digits: check, don't trust.
    Decimal::from_str_exact(text).map_err(|_| MoneyError::TooLong)
}

/// A positive amount of money, exact, with at most its currency's minor units of decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Amount {
    value: Decimal,
    currency: Currency,
}

/// Limits on a single payment's amount; part of each service's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmountPolicy {
    /// The largest amount one payment may move, in major units of any currency.
    pub maximum: Decimal,
}

impl Default for AmountPolicy {
    fn default() -> Self {
        AmountPolicy { maximum: Decimal::from(1_000_000) }
    }
}

impl Amount {
    /// Builds an amount from decimal text (`"10.50"`) in `currency`, under `policy`.
    pub fn parse(text: &str, currency: Currency, policy: AmountPolicy) -> Result<Amount, MoneyError> {
        Amount::new(parse_decimal_text(text)?, currency, policy)
    }

    /// Builds an amount from a JSON value: a string, or a number taken as its exact source text
    /// (`serde_json` with `arbitrary_precision` keeps it), never via `f64`.
    pub fn from_json(
        value: &serde_json::Value,
        currency: Currency,
        policy: AmountPolicy,
    ) -> Result<Amount, MoneyError> {
        match value {
            serde_json::Value::String(text) => Amount::parse(text, currency, policy),
            serde_json::Value::Number(number) => Amount::parse(&number.to_string(), currency, policy),
            _ => Err(MoneyError::WrongJsonType),
        }
    }

    /// Builds an amount from an exact decimal.
    pub fn new(value: Decimal, currency: Currency, policy: AmountPolicy) -> Result<Amount, MoneyError> {
        let value = value.normalize();
        if value.scale() > currency.minor_units() {
            return Err(MoneyError::TooManyDecimals { currency, minor_units: currency.minor_units() });
        }
        if value <= Decimal::ZERO {
            return Err(MoneyError::NotPositive);
        }
        if value > policy.maximum {
            return Err(MoneyError::AboveMaximum { maximum: policy.maximum });
        }
        Ok(Amount { value, currency })
    }

    pub fn value(self) -> Decimal {
        self.value
    }

    pub fn currency(self) -> Currency {
        self.currency
    }

    /// The amount in minor units (cents): exact because the scale never exceeds the minor units.
    pub fn minor_units(self) -> i128 {
        let mut scaled = self.value;
        scaled.rescale(self.currency.minor_units());
        scaled.mantissa()
    }
}

/// Canonical text: exactly the currency's minor units of decimals (`"10.50"`, JPY `"1000"`).
impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_decimal(self.value, self.currency))
    }
}

/// Formats any decimal (a balance, for instance) with exactly `currency`'s minor units.
pub fn format_decimal(value: Decimal, currency: Currency) -> String {
    let mut v = value;
    v.rescale(currency.minor_units());
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur() -> Currency {
        Currency::from_code("EUR").unwrap()
    }

    fn parse(text: &str) -> Result<Amount, MoneyError> {
        Amount::parse(text, eur(), AmountPolicy::default())
    }

    #[test]
    fn hostile_amount_texts_are_refused() {
        for text in [
            "", " 1", "1 ", "+1", "-1", "1e2", "1E2", "1e400", "NaN", "nan", "Infinity", "0x10", ".5", "5.", "1,00",
            "1_000", "１", "1.2.3", "--1", "٣",
        ] {
            assert!(parse(text).is_err(), "{text:?} must be refused");
        }
    }

    #[test]
    fn zero_and_negative_are_not_positive() {
        assert_eq!(parse("0"), Err(MoneyError::NotPositive));
        assert_eq!(parse("0.00"), Err(MoneyError::NotPositive));
        assert!(Amount::new(Decimal::from(-5), eur(), AmountPolicy::default()).is_err());
    }

    #[test]
    fn more_decimals_than_the_currency_allows_is_refused() {
        assert!(matches!(parse("10.505"), Err(MoneyError::TooManyDecimals { .. })));
        let jpy = Currency::from_code("JPY").unwrap();
        assert!(matches!(
            Amount::parse("100.5", jpy, AmountPolicy::default()),
            Err(MoneyError::TooManyDecimals { .. })
        ));
        let kwd = Currency::from_code("KWD").unwrap();
        assert_eq!(Amount::parse("1.234", kwd, AmountPolicy::default()).unwrap().to_string(), "1.234");
        // Trailing zeros are not extra precision.
        assert_eq!(parse("10.500").unwrap().to_string(), "10.50");
    }

    #[test]
    fn above_the_maximum_is_refused() {
        let policy = AmountPolicy { maximum: Decimal::from(100) };
        assert!(Amount::parse("100.00", eur(), policy).is_ok());
        assert!(matches!(Amount::parse("100.01", eur(), policy), Err(MoneyError::AboveMaximum { .. })));
        assert_eq!(parse("99999999999999999999999999999999"), Err(MoneyError::TooLong));
        assert_eq!(parse("999999999999999999999999999999999"), Err(MoneyError::TooLong));
    }

    #[test]
    fn json_numbers_are_read_exactly_and_other_types_refused() {
        let v: serde_json::Value = serde_json::from_str("10.10").unwrap();
        assert_eq!(Amount::from_json(&v, eur(), AmountPolicy::default()).unwrap().to_string(), "10.10");
        let v: serde_json::Value = serde_json::from_str("1e400").unwrap();
        assert!(Amount::from_json(&v, eur(), AmountPolicy::default()).is_err());
        for json in ["true", "null", "[1]", "{\"a\":1}"] {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            assert_eq!(Amount::from_json(&v, eur(), AmountPolicy::default()), Err(MoneyError::WrongJsonType));
        }
    }

    #[test]
    fn minor_units_are_exact() {
        assert_eq!(parse("10.5").unwrap().minor_units(), 1050);
        let jpy = Currency::from_code("JPY").unwrap();
        assert_eq!(Amount::parse("1000", jpy, AmountPolicy::default()).unwrap().minor_units(), 1000);
    }

    #[test]
    fn currencies_are_case_sensitive_iso_codes() {
        assert!(Currency::from_code("eur").is_err());
        assert!(Currency::from_code("EURO").is_err());
        assert!(Currency::from_code("XXX").is_err());
        assert_eq!(Currency::from_code("TRY").unwrap().minor_units(), 2);
    }
}
