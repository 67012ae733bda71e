//! Wire → domain for InitiatePayment (SPEC §4): every field is checked before anything is read or
//! written, and each refusal is `INVALID_ARGUMENT` with its own stable code. The money rules are
//! `securepay_core::money` (one strict decimal grammar, currency minor units, positive, ≤ the
//! configured maximum); the request rules are `PaymentRequest::new`.

use securepay_core::idempotency::IdempotencyKey;
use securepay_core::ids::{AccountId, PaymentId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::{PaymentRequest, RequestError};
use securepay_proto::payment::v1 as wire;

use crate::error::ServiceError;

/// The validated request, or the first refusal.
pub fn initiate_request(
    subject: Subject,
    request: &wire::InitiatePaymentRequest,
    policy: AmountPolicy,
) -> Result<PaymentRequest, ServiceError> {
    let payment_id = match request.payment_id.as_str() {
        "" => None,
        text => Some(
            PaymentId::parse(text)
                .map_err(|_| ServiceError::invalid("invalid_payment_id", "payment_id must be a UUID when given"))?,
        ),
    };
    let account = |text: &str, field: &str| {
        AccountId::parse(text)
            .map_err(|_| ServiceError::invalid("invalid_account", format!("{field} must be an account UUID")))
    };
    let from = account(&request.from_account, "from_account")?;
    let to = account(&request.to_account, "to_account")?;
    let money = request.amount.as_ref().ok_or_else(|| ServiceError::invalid("invalid_amount", "amount is required"))?;
    let currency = Currency::from_code(&money.currency).map_err(|e| ServiceError::invalid(e.code(), e.to_string()))?;
    let amount =
        Amount::parse(&money.amount, currency, policy).map_err(|e| ServiceError::invalid(e.code(), e.to_string()))?;
    let key = match request.idempotency_key.as_str() {
        "" => None,
        text => Some(
            IdempotencyKey::parse(text).map_err(|e| ServiceError::invalid("invalid_idempotency_key", e.to_string()))?,
        ),
    };
    PaymentRequest::new(subject, payment_id, from, to, amount, key).map_err(|e| match e {
        RequestError::SameAccount => ServiceError::invalid("same_account", e.to_string()),
    })
}

/// The payment id of a GetPayment request.
pub fn payment_id(text: &str) -> Result<PaymentId, ServiceError> {
    PaymentId::parse(text).map_err(|_| ServiceError::invalid("invalid_payment_id", "payment_id must be a UUID"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FROM: &str = "a11ce000-0000-4000-8000-000000000001";
    const TO: &str = "b0b00000-0000-4000-8000-000000000001";

    fn request(amount: &str, currency: &str) -> wire::InitiatePaymentRequest {
        wire::InitiatePaymentRequest {
            payment_id: String::new(),
            from_account: FROM.into(),
            to_account: TO.into(),
            amount: Some(wire::Money { amount: amount.into(), currency: currency.into() }),
            idempotency_key: "k-1".into(),
        }
    }

    fn code(r: &wire::InitiatePaymentRequest) -> &'static str {
        initiate_request(Subject::parse("alice").unwrap(), r, AmountPolicy::default()).unwrap_err().code()
    }

    #[test]
    fn a_well_formed_request_is_accepted_exactly() {
        let ok = initiate_request(Subject::parse("alice").unwrap(), &request("10.5", "EUR"), AmountPolicy::default())
            .unwrap();
        assert_eq!(ok.amount.to_string(), "10.50");
        assert_eq!(ok.idempotency_key.unwrap().as_str(), "k-1");
    }

    #[test]
    fn hostile_amounts_are_invalid_amount() {
        for bad in ["1e400", "NaN", "-5", "0", "10.123", "Infinity", " 1", "1,00", "", "1000000.01", "0x10"] {
            assert_eq!(code(&request(bad, "EUR")), "invalid_amount", "{bad:?}");
        }
        assert_eq!(code(&request("10", "XXX")), "unsupported_currency");
        assert_eq!(code(&request("10.5", "JPY")), "invalid_amount", "JPY has no minor units");
    }

    #[test]
    fn ids_keys_and_accounts_are_checked() {
        let mut r = request("1", "EUR");
        r.payment_id = "'; DROP TABLE payments; --".into();
        assert_eq!(code(&r), "invalid_payment_id");
        let mut r = request("1", "EUR");
        r.from_account = "1 OR 1=1".into();
        assert_eq!(code(&r), "invalid_account");
        let mut r = request("1", "EUR");
        r.to_account = FROM.into();
        assert_eq!(code(&r), "same_account");
        let mut r = request("1", "EUR");
        r.idempotency_key = "a b".into();
        assert_eq!(code(&r), "invalid_idempotency_key");
        let mut r = request("1", "EUR");
        r.amount = None;
        assert_eq!(code(&r), "invalid_amount");
    }
}
