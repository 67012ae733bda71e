//! The double-entry ledger model: what settlement must do to balances, as a pure state machine.
//!
//! The PostgreSQL adapter implements the same rules in one transaction (conditional debit, credit,
//! two ledger rows, a processed-payment row); the simulator's in-memory store IS this model. Its
//! guarantees, checked by proptest on arbitrary sequences with duplicates and reordering:
//! - conservation: per currency, the sum of balances never changes;
//! - no account is ever negative (a debit happens only when funds suffice);
//! - each payment takes effect at most once: a replay returns the first verdict and moves nothing.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::ids::{AccountId, PaymentId};
use crate::money::{Amount, Currency};
use crate::payment::{FailureReason, Outcome};

/// A request to settle one payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub payment_id: PaymentId,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Debit,
    Credit,
}

impl Direction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Debit => "DEBIT",
            Direction::Credit => "CREDIT",
        }
    }
}

/// One ledger row. A completed payment writes exactly two: a debit of the payer and a credit of
/// the payee, same amount, same currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub payment_id: PaymentId,
    pub account: AccountId,
    pub direction: Direction,
    pub amount: Amount,
}

/// An account as the ledger sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub currency: Currency,
    /// Never negative (asserted on every change).
    pub balance: Decimal,
}

/// The result of [`Ledger::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// First time this payment was seen: this is its verdict, and balances moved if Completed.
    New(Outcome),
    /// The payment was settled before: its original verdict; nothing moved now.
    Duplicate(Outcome),
}

impl Settled {
    pub fn outcome(self) -> Outcome {
        match self {
            Settled::New(outcome) | Settled::Duplicate(outcome) => outcome,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("account already exists")]
    AlreadyExists,
    #[error("opening balance must not be negative")]
    NegativeBalance,
}

/// The verdict for a transfer given the two accounts as they are now: the one settlement rule.
pub fn verdict(payer: Option<&Account>, payee: Option<&Account>, amount: Amount) -> Outcome {
    let (Some(payer), Some(payee)) = (payer, payee) else {
        return Outcome::Failed(FailureReason::UnknownAccount);
    };
    if payer.currency != amount.currency() || payee.currency != amount.currency() {
        return Outcome::Failed(FailureReason::CurrencyMismatch);
    }
    if payer.balance < amount.value() {
        return Outcome::Failed(FailureReason::InsufficientFunds);
    }
    Outcome::Completed
}

/// Balances, settled payments and ledger rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    accounts: BTreeMap<AccountId, Account>,
    settled: BTreeMap<PaymentId, Outcome>,
    entries: Vec<Entry>,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Opens an account with an opening balance (the only way money enters the model).
    pub fn open(&mut self, id: AccountId, currency: Currency, opening: Decimal) -> Result<(), OpenError> {
        if opening < Decimal::ZERO {
            return Err(OpenError::NegativeBalance);
        }
        if self.accounts.contains_key(&id) {
            return Err(OpenError::AlreadyExists);
        }
        self.accounts.insert(id, Account { currency, balance: opening });
        Ok(())
    }

    /// Settles a transfer at most once per payment id.
    pub fn settle(&mut self, transfer: &Transfer) -> Settled {
        if let Some(&outcome) = self.settled.get(&transfer.payment_id) {
            return Settled::Duplicate(outcome);
        }
        let outcome = verdict(self.accounts.get(&transfer.from), self.accounts.get(&transfer.to), transfer.amount);
        if outcome == Outcome::Completed {
            self.move_funds(transfer);
        }
        self.settled.insert(transfer.payment_id, outcome);
        Settled::New(outcome)
    }

    fn move_funds(&mut self, transfer: &Transfer) {
        let amount = transfer.amount.value();
        let payer = self.accounts.get_mut(&transfer.from).expect("verdict checked the payer exists");
        payer.balance -= amount;
        assert!(payer.balance >= Decimal::ZERO, "ledger invariant: a debit made a balance negative");
        let payee = self.accounts.get_mut(&transfer.to).expect("verdict checked the payee exists");
        payee.balance += amount;
        for (account, direction) in [(transfer.from, Direction::Debit), (transfer.to, Direction::Credit)] {
            self.entries.push(Entry { payment_id: transfer.payment_id, account, direction, amount: transfer.amount });
        }
    }

    /// PLANTED BUGS, simulator only (feature `planted-bugs`, never in a production build): settles
    /// like [`Ledger::settle`] but without the replay check when `dedupe` is false (a payment seen
    /// before takes effect again and its verdict is overwritten) and without the funds check when
    /// `funds_check` is false (the debit goes through even if it makes the balance negative). With
    /// both `true` it is exactly [`Ledger::settle`].
    #[cfg(feature = "planted-bugs")]
    pub fn settle_planted(&mut self, transfer: &Transfer, dedupe: bool, funds_check: bool) -> Settled {
        if dedupe && let Some(&outcome) = self.settled.get(&transfer.payment_id) {
            return Settled::Duplicate(outcome);
        }
        let mut outcome = verdict(self.accounts.get(&transfer.from), self.accounts.get(&transfer.to), transfer.amount);
        if !funds_check && outcome == Outcome::Failed(FailureReason::InsufficientFunds) {
            outcome = Outcome::Completed;
        }
        if outcome == Outcome::Completed {
            let amount = transfer.amount.value();
            for (account, delta) in [(transfer.from, -amount), (transfer.to, amount)] {
                self.accounts.get_mut(&account).expect("verdict checked both accounts exist").balance += delta;
            }
            for (account, direction) in [(transfer.from, Direction::Debit), (transfer.to, Direction::Credit)] {
                self.entries.push(Entry {
                    payment_id: transfer.payment_id,
                    account,
                    direction,
                    amount: transfer.amount,
                });
            }
        }
        self.settled.insert(transfer.payment_id, outcome);
        Settled::New(outcome)
    }

    pub fn account(&self, id: AccountId) -> Option<&Account> {
        self.accounts.get(&id)
    }

    pub fn balance(&self, id: AccountId) -> Option<Decimal> {
        self.accounts.get(&id).map(|a| a.balance)
    }

    pub fn accounts(&self) -> impl Iterator<Item = (AccountId, &Account)> {
        self.accounts.iter().map(|(id, a)| (*id, a))
    }

    /// The verdict a payment got, if it was settled.
    pub fn outcome(&self, payment_id: PaymentId) -> Option<Outcome> {
        self.settled.get(&payment_id).copied()
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Sum of balances per currency: constant over any sequence of settlements.
    pub fn totals(&self) -> BTreeMap<Currency, Decimal> {
        let mut totals = BTreeMap::new();
        for account in self.accounts.values() {
            *totals.entry(account.currency).or_insert(Decimal::ZERO) += account.balance;
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::money::AmountPolicy;

    fn account(n: u128) -> AccountId {
        AccountId::from_uuid(Uuid::from_u128(n))
    }

    fn eur(text: &str) -> Amount {
        Amount::parse(text, Currency::from_code("EUR").unwrap(), AmountPolicy::default()).unwrap()
    }

    fn two_accounts() -> Ledger {
        let mut ledger = Ledger::new();
        let eur_currency = Currency::from_code("EUR").unwrap();
        ledger.open(account(1), eur_currency, Decimal::from(100)).unwrap();
        ledger.open(account(2), eur_currency, Decimal::ZERO).unwrap();
        ledger
    }

    fn transfer(payment: u128, amount: &str) -> Transfer {
        Transfer {
            payment_id: PaymentId::from_uuid(Uuid::from_u128(payment)),
            from: account(1),
            to: account(2),
            amount: eur(amount),
        }
    }

    #[cfg(feature = "planted-bugs")]
    #[test]
    fn the_planted_settle_is_settle_with_both_checks_and_breaks_exactly_the_one_switched_off() {
        let (mut checked, mut model) = (two_accounts(), two_accounts());
        for (payment, amount) in [(10, "60.00"), (11, "60.00"), (10, "60.00")] {
            assert_eq!(
                checked.settle_planted(&transfer(payment, amount), true, true),
                model.settle(&transfer(payment, amount))
            );
        }
        assert_eq!(checked, model);

        let mut replayed = two_accounts();
        replayed.settle_planted(&transfer(10, "30.00"), false, true);
        assert_eq!(replayed.settle_planted(&transfer(10, "30.00"), false, true), Settled::New(Outcome::Completed));
        assert_eq!((replayed.balance(account(1)), replayed.entries().len()), (Some(Decimal::from(40)), 4));

        let mut overdrawn = two_accounts();
        assert_eq!(overdrawn.settle_planted(&transfer(10, "130.00"), true, false), Settled::New(Outcome::Completed));
        assert_eq!(overdrawn.balance(account(1)), Some(Decimal::from(-30)));
        assert_eq!(
            overdrawn.settle_planted(&transfer(10, "130.00"), true, false),
            Settled::Duplicate(Outcome::Completed)
        );
        assert_eq!(overdrawn.totals(), two_accounts().totals(), "conserved all the same");
    }

    #[test]
    fn a_completed_transfer_writes_one_debit_and_one_credit() {
        let mut ledger = two_accounts();
        assert_eq!(ledger.settle(&transfer(10, "30.00")), Settled::New(Outcome::Completed));
        assert_eq!(ledger.balance(account(1)), Some(Decimal::from(70)));
        assert_eq!(ledger.balance(account(2)), Some(Decimal::from(30)));
        let directions: Vec<_> = ledger.entries().iter().map(|e| (e.account, e.direction)).collect();
        assert_eq!(directions, [(account(1), Direction::Debit), (account(2), Direction::Credit)]);
    }

    #[test]
    fn an_unaffordable_transfer_fails_and_moves_nothing() {
        let mut ledger = two_accounts();
        let before = ledger.clone();
        let outcome = ledger.settle(&transfer(10, "100.01"));
        assert_eq!(outcome, Settled::New(Outcome::Failed(FailureReason::InsufficientFunds)));
        assert_eq!(ledger.accounts().collect::<Vec<_>>(), before.accounts().collect::<Vec<_>>());
        assert!(ledger.entries().is_empty());
    }

    #[test]
    fn a_replayed_payment_returns_its_first_verdict_even_if_it_would_now_differ() {
        let mut ledger = two_accounts();
        assert_eq!(
            ledger.settle(&transfer(10, "100.01")),
            Settled::New(Outcome::Failed(FailureReason::InsufficientFunds))
        );
        ledger.settle(&Transfer { from: account(2), to: account(1), ..transfer(11, "50.00") });
        assert_eq!(
            ledger.settle(&transfer(10, "100.01")),
            Settled::Duplicate(Outcome::Failed(FailureReason::InsufficientFunds))
        );
    }

    #[test]
    fn unknown_accounts_and_currency_mismatch_fail() {
        let mut ledger = two_accounts();
        let unknown = Transfer { to: account(99), ..transfer(1, "1.00") };
        assert_eq!(ledger.settle(&unknown).outcome(), Outcome::Failed(FailureReason::UnknownAccount));
        let usd = Amount::parse("1.00", Currency::from_code("USD").unwrap(), AmountPolicy::default()).unwrap();
        let mismatch = Transfer { amount: usd, ..transfer(2, "1.00") };
        assert_eq!(ledger.settle(&mismatch).outcome(), Outcome::Failed(FailureReason::CurrencyMismatch));
    }
}
