//! Properties of the domain core, stated as the guarantees of SPEC §4 and §6.

use proptest::prelude::*;
use rust_decimal::Decimal;
use securepay_core::ids::Subject;
use securepay_core::ids::{AccountId, PaymentId};
use securepay_core::ledger::{Ledger, Settled, Transfer};
use securepay_core::money::{Amount, AmountPolicy, Currency, parse_decimal_text};
use securepay_core::payment::{Applied, FailureReason, Outcome, Payment, PaymentRequest, PaymentStatus, TRANSITIONS};
use time::OffsetDateTime;
use uuid::Uuid;

fn currency() -> impl Strategy<Value = Currency> {
    prop::sample::select(Currency::all().collect::<Vec<_>>())
}

/// Decimal text with at most `currency`'s minor units, built digit by digit (no float anywhere).
fn amount_text(currency: Currency) -> impl Strategy<Value = String> {
    let decimals = 0..=currency.minor_units() as usize;
    ("[1-9][0-9]{0,11}", decimals).prop_flat_map(|(int, n)| {
        prop::collection::vec(0u8..10, n).prop_map(move |digits| {
            if digits.is_empty() {
                int.clone()
            } else {
                let frac: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
                format!("{int}.{frac}")
            }
        })
    })
}

fn unlimited() -> AmountPolicy {
    AmountPolicy { maximum: Decimal::MAX }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Parse then format gives the canonical text, and parsing that again gives the same amount.
    #[test]
    fn money_round_trips_through_its_canonical_text(
        (currency, text) in currency().prop_flat_map(|c| (Just(c), amount_text(c)))
    ) {
        let amount = Amount::parse(&text, currency, unlimited()).unwrap();
        let canonical = amount.to_string();
        let decimals = canonical.split_once('.').map_or(0, |(_, f)| f.len());
        prop_assert_eq!(decimals as u32, currency.minor_units());
        prop_assert_eq!(Amount::parse(&canonical, currency, unlimited()).unwrap(), amount);
    }

    /// Every digit survives: the minor-unit count equals the integer spelled by the text, even where
    /// an f64 would have rounded (beyond 2^53).
    #[test]
    fn money_parsing_keeps_every_digit(int in "[1-9][0-9]{14,19}", cents in "[0-9]{2}") {
        let eur = Currency::from_code("EUR").unwrap();
        let amount = Amount::parse(&format!("{int}.{cents}"), eur, unlimited()).unwrap();
        let expected: i128 = format!("{int}{cents}").parse().unwrap();
        prop_assert_eq!(amount.minor_units(), expected);
    }

    /// Nothing that is not plain digits with at most one inner point is accepted, and nothing panics.
    #[test]
    fn money_parsing_refuses_everything_but_plain_decimals(text in "\\PC{0,40}") {
        let plain = {
            let mut parts = text.splitn(2, '.');
            let int = parts.next().unwrap_or("");
            let frac = parts.next();
            !int.is_empty() && int.bytes().all(|b| b.is_ascii_digit())
                && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
        };
        if parse_decimal_text(&text).is_ok() {
            prop_assert!(plain, "accepted {:?}", text);
        }
    }

    /// Whatever outcomes arrive, in any order and any number of times, a payment's history holds
    /// only transitions of the table, at most one, and a terminal status never changes.
    #[test]
    fn the_state_machine_admits_only_the_transitions_of_the_table(
        outcomes in prop::collection::vec(
            prop_oneof![
                Just(Outcome::Completed),
                prop::sample::select(FailureReason::ALL.to_vec()).prop_map(Outcome::Failed),
            ],
            0..8,
        )
    ) {
        let mut payment = sample_payment();
        let mut first_terminal = None;
        for outcome in outcomes {
            let before = payment.status;
            match payment.apply(outcome, OffsetDateTime::UNIX_EPOCH) {
                Ok(Applied::Transitioned(t)) => {
                    prop_assert!(TRANSITIONS.contains(&(t.from, t.to)));
                    prop_assert_eq!(before, PaymentStatus::Pending);
                    first_terminal = Some(outcome);
                }
                Ok(Applied::AlreadyApplied) => prop_assert_eq!(Some(outcome), first_terminal),
                Err(illegal) => {
                    prop_assert!(!TRANSITIONS.contains(&(illegal.from, illegal.to)));
                    prop_assert_eq!(payment.status, before);
                }
            }
        }
        prop_assert!(payment.transitions.len() <= 1);
    }

    /// Any sequence of transfers — with duplicates and in any order — conserves the total per
    /// currency, never makes a balance negative, and applies each payment at most once.
    #[test]
    fn the_ledger_conserves_money_and_applies_each_payment_at_most_once(
        (openings, transfers) in ledger_workload()
    ) {
        let mut ledger = opened(&openings);
        let totals = ledger.totals();
        let mut first_verdicts = std::collections::BTreeMap::new();
        for transfer in &transfers {
            let settled = ledger.settle(transfer);
            match first_verdicts.get(&transfer.payment_id) {
                None => {
                    prop_assert!(matches!(settled, Settled::New(_)));
                    first_verdicts.insert(transfer.payment_id, settled.outcome());
                }
                Some(&first) => prop_assert_eq!(settled, Settled::Duplicate(first)),
            }
            prop_assert_eq!(&ledger.totals(), &totals);
            for (_, account) in ledger.accounts() {
                prop_assert!(account.balance >= Decimal::ZERO);
            }
        }
        for (payment_id, outcome) in &first_verdicts {
            let rows = ledger.entries().iter().filter(|e| e.payment_id == *payment_id).count();
            prop_assert_eq!(rows, if *outcome == Outcome::Completed { 2 } else { 0 });
        }
    }

    /// Redelivering transfers changes nothing: the ledger after a sequence with duplicates equals
    /// the ledger after the same sequence with every duplicate removed.
    #[test]
    fn redelivered_transfers_have_no_effect((openings, transfers) in ledger_workload()) {
        let mut with_duplicates = opened(&openings);
        for transfer in &transfers {
            with_duplicates.settle(transfer);
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut deduplicated = opened(&openings);
        for transfer in transfers.iter().filter(|t| seen.insert(t.payment_id)) {
            deduplicated.settle(transfer);
        }
        prop_assert_eq!(with_duplicates, deduplicated);
    }
}

fn sample_payment() -> Payment {
    let eur = Currency::from_code("EUR").unwrap();
    let request = PaymentRequest::new(
        Subject::parse("alice").unwrap(),
        None,
        AccountId::from_uuid(Uuid::from_u128(1)),
        AccountId::from_uuid(Uuid::from_u128(2)),
        Amount::parse("1.00", eur, AmountPolicy::default()).unwrap(),
        None,
    )
    .unwrap();
    Payment::accept(PaymentId::from_uuid(Uuid::from_u128(7)), &request, OffsetDateTime::UNIX_EPOCH)
}

type Opening = (AccountId, Currency, Decimal);

fn opened(openings: &[Opening]) -> Ledger {
    let mut ledger = Ledger::new();
    for &(id, currency, balance) in openings {
        ledger.open(id, currency, balance).unwrap();
    }
    ledger
}

/// A handful of accounts in two currencies (plus ids nobody opened) and a sequence of transfers
/// between them, each payment possibly delivered several times and the deliveries shuffled.
fn ledger_workload() -> impl Strategy<Value = (Vec<Opening>, Vec<Transfer>)> {
    let eur = Currency::from_code("EUR").unwrap();
    let jpy = Currency::from_code("JPY").unwrap();
    let account_count = 6u128;
    let openings = prop::collection::vec(0i64..50_000, account_count as usize).prop_map(move |cents| {
        cents
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let currency = if i % 3 == 2 { jpy } else { eur };
                let balance = Decimal::new(c, currency.minor_units());
                (AccountId::from_uuid(Uuid::from_u128(i as u128)), currency, balance)
            })
            .collect::<Vec<_>>()
    });
    let transfer = (0..account_count + 1, 0..account_count + 1, 1i64..20_000, any::<bool>(), 1usize..4);
    let payments = prop::collection::vec(transfer, 0..40).prop_map(move |specs| {
        let mut deliveries = Vec::new();
        for (n, (from, to, minor, in_yen, copies)) in specs.into_iter().enumerate() {
            let currency = if in_yen { jpy } else { eur };
            let Ok(amount) = Amount::new(Decimal::new(minor, currency.minor_units()), currency, unlimited()) else {
                continue;
            };
            let transfer = Transfer {
                payment_id: PaymentId::from_uuid(Uuid::from_u128(1_000 + n as u128)),
                from: AccountId::from_uuid(Uuid::from_u128(from)),
                to: AccountId::from_uuid(Uuid::from_u128(to)),
                amount,
            };
            deliveries.extend(std::iter::repeat_n(transfer, copies));
        }
        deliveries
    });
    (openings, payments).prop_flat_map(|(openings, deliveries)| (Just(openings), Just(deliveries).prop_shuffle()))
}
