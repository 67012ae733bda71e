//! A payment's life: the validated request, the state machine and its single transition table.
//!
//! PENDING → COMPLETED | FAILED, nothing else (SPEC §6.2). Every change goes through
//! [`Payment::apply`], which consults [`TRANSITIONS`] and records the transition with time and
//! cause. Redelivered outcomes that the payment already reflects are recognised as no-ops, so the
//! outcome consumer is idempotent; contradicting outcomes are refused and the caller counts them.

use std::fmt;

use time::OffsetDateTime;

use crate::idempotency::{Fingerprint, IdempotencyKey};
use crate::ids::{AccountId, PaymentId, Subject};
use crate::money::Amount;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PaymentStatus {
    Pending,
    Completed,
    Failed,
}

impl PaymentStatus {
    pub const ALL: [PaymentStatus; 3] = [PaymentStatus::Pending, PaymentStatus::Completed, PaymentStatus::Failed];

    /// The wire/database spelling (`PENDING`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "PENDING",
            PaymentStatus::Completed => "COMPLETED",
            PaymentStatus::Failed => "FAILED",
        }
    }

    pub fn parse(text: &str) -> Option<PaymentStatus> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        self != PaymentStatus::Pending
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// THE transition table. The database enforces the same pairs (migrations), the simulator checks
/// histories against it; nothing else decides whether a status may change.
pub const TRANSITIONS: &[(PaymentStatus, PaymentStatus)] =
    &[(PaymentStatus::Pending, PaymentStatus::Completed), (PaymentStatus::Pending, PaymentStatus::Failed)];

pub fn is_legal(from: PaymentStatus, to: PaymentStatus) -> bool {
    TRANSITIONS.contains(&(from, to))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal payment transition {from} -> {to}")]
pub struct IllegalTransition {
    pub from: PaymentStatus,
    pub to: PaymentStatus,
}

/// Why a payment failed; each has a stable public code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureReason {
    InsufficientFunds,
    UnknownAccount,
    CurrencyMismatch,
}

impl FailureReason {
    pub const ALL: [FailureReason; 3] =
        [FailureReason::InsufficientFunds, FailureReason::UnknownAccount, FailureReason::CurrencyMismatch];

    pub const fn code(self) -> &'static str {
        match self {
            FailureReason::InsufficientFunds => "insufficient_funds",
            FailureReason::UnknownAccount => "unknown_account",
            FailureReason::CurrencyMismatch => "currency_mismatch",
        }
    }

    pub fn parse(code: &str) -> Option<FailureReason> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

/// The settlement verdict for a payment, as carried by `payment.completed` / `payment.failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Completed,
    Failed(FailureReason),
}

impl Outcome {
    pub const fn status(self) -> PaymentStatus {
        match self {
            Outcome::Completed => PaymentStatus::Completed,
            Outcome::Failed(_) => PaymentStatus::Failed,
        }
    }

    /// The cause recorded with the transition.
    pub const fn cause(self) -> &'static str {
        match self {
            Outcome::Completed => "settled",
            Outcome::Failed(reason) => reason.code(),
        }
    }
}

/// One recorded status change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: PaymentStatus,
    pub to: PaymentStatus,
    pub cause: String,
    pub at: OffsetDateTime,
}

/// Why a payment request is refused before anything is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("from_account and to_account must differ")]
    SameAccount,
}

/// A validated request to move `amount` from one account to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRequest {
    pub subject: Subject,
    /// Set when the client chose the id; otherwise the service mints one.
    pub payment_id: Option<PaymentId>,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    pub idempotency_key: Option<IdempotencyKey>,
}

impl PaymentRequest {
    pub fn new(
        subject: Subject,
        payment_id: Option<PaymentId>,
        from: AccountId,
        to: AccountId,
        amount: Amount,
        idempotency_key: Option<IdempotencyKey>,
    ) -> Result<PaymentRequest, RequestError> {
        if from == to {
            return Err(RequestError::SameAccount);
        }
        Ok(PaymentRequest { subject, payment_id, from, to, amount, idempotency_key })
    }

    /// What makes two requests "the same" for idempotency: everything but the key itself.
    pub fn fingerprint(&self) -> Fingerprint {
        let payment_id = self.payment_id.map(|id| id.to_string()).unwrap_or_default();
        Fingerprint::of(&[
            &payment_id,
            &self.from.to_string(),
            &self.to.to_string(),
            &self.amount.to_string(),
            self.amount.currency().code(),
        ])
    }
}

/// A payment and its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub id: PaymentId,
    pub subject: Subject,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    pub status: PaymentStatus,
    pub failure_reason: Option<FailureReason>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub transitions: Vec<Transition>,
}

/// The effect of applying an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The status changed; persist this transition.
    Transitioned(Transition),
    /// The payment already reflects this outcome (a redelivery): nothing to do.
    AlreadyApplied,
}

impl Payment {
    /// A new payment in PENDING.
    pub fn accept(id: PaymentId, request: &PaymentRequest, now: OffsetDateTime) -> Payment {
        Payment {
            id,
            subject: request.subject.clone(),
            from: request.from,
            to: request.to,
            amount: request.amount,
            status: PaymentStatus::Pending,
            failure_reason: None,
            created_at: now,
            updated_at: now,
            transitions: Vec::new(),
        }
    }

    /// Moves the payment to the outcome's status through the transition table.
    pub fn apply(&mut self, outcome: Outcome, now: OffsetDateTime) -> Result<Applied, IllegalTransition> {
        let to = outcome.status();
        let reason = match outcome {
            Outcome::Completed => None,
            Outcome::Failed(reason) => Some(reason),
        };
        if self.status == to && self.failure_reason == reason {
            return Ok(Applied::AlreadyApplied);
        }
        if !is_legal(self.status, to) {
            return Err(IllegalTransition { from: self.status, to });
        }
        let transition = Transition { from: self.status, to, cause: outcome.cause().to_owned(), at: now };
        self.status = to;
        self.failure_reason = reason;
        self.updated_at = now;
        self.transitions.push(transition.clone());
        Ok(Applied::Transitioned(transition))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in PaymentStatus::ALL {
            assert_eq!(PaymentStatus::parse(s.as_str()), Some(s));
        }
        for r in FailureReason::ALL {
            assert_eq!(FailureReason::parse(r.code()), Some(r));
        }
    }

    #[test]
    fn terminal_states_have_no_way_out() {
        for (from, _) in TRANSITIONS {
            assert!(!from.is_terminal());
        }
    }
}
