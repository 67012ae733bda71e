//! The seeded client workload of a whole-platform run (issue 7, item 2), as data: the accounts to
//! open and, per client, the operations to send. Executing them (HTTP to the gateway, retries,
//! timeouts) is the cluster's job; this module only decides *what* is sent, so the invariants can
//! be checked against it.
//!
//! Promises:
//! - [`Workload::draw`] is a pure function of the config and the random numbers it is given (under
//!   madsim: `madsim::rand::thread_rng()`); every id, key, subject and amount comes from them;
//! - every payment is paid by an account its `subject` owns, to another existing account of the
//!   same currency (the gateway would refuse anything else before it reaches the money path);
//! - idempotency keys are unique per (subject, key) except where a payment deliberately reuses
//!   one: [`Pay::replay_conflicting`] (same key, different amount → `422 idempotency_key_reused`);
//!   [`Pay::concurrent_copies`] says how many copies of the SAME request go out at once (→ one
//!   payment, the others `409 request_in_progress` or the first response replayed);
//! - "unaffordable" payments ask for more than all the money of their currency, so they fail
//!   whatever the interleaving; "hot" accounts take a configured share of all payments.

use madsim::rand::Rng;
use rust_decimal::Decimal;
use securepay_core::idempotency::IdempotencyKey;
use securepay_core::ids::{AccountId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};

/// The knobs of a workload; [`WorkloadConfig::default`] is a small but mean mix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadConfig {
    pub clients: usize,
    pub ops_per_client: usize,
    /// ISO codes; each gets `accounts_per_currency` accounts.
    pub currencies: Vec<&'static str>,
    pub accounts_per_currency: usize,
    /// Distinct end users owning the accounts (round-robin).
    pub subjects: usize,
    /// Opening balance range, in minor units.
    pub opening_minor: (i64, i64),
    /// Affordable payment amount range, in minor units.
    pub amount_minor: (i64, i64),
    /// The first `hot_accounts` accounts of each currency take `hot_per_mille` of the payments.
    pub hot_accounts: usize,
    pub hot_per_mille: u32,
    pub unaffordable_per_mille: u32,
    pub balance_read_per_mille: u32,
    pub conflicting_replay_per_mille: u32,
    pub concurrent_duplicate_per_mille: u32,
    /// Most copies of one request sent at once.
    pub concurrent_copies_max: u32,
}

impl Default for WorkloadConfig {
    fn default() -> WorkloadConfig {
        WorkloadConfig {
            clients: 4,
            ops_per_client: 30,
            currencies: vec!["EUR", "KWD"],
            accounts_per_currency: 4,
            subjects: 5,
            opening_minor: (10_000, 100_000),
            amount_minor: (1, 20_000),
            hot_accounts: 1,
            hot_per_mille: 400,
            unaffordable_per_mille: 80,
            balance_read_per_mille: 150,
            conflicting_replay_per_mille: 50,
            concurrent_duplicate_per_mille: 80,
            concurrent_copies_max: 4,
        }
    }
}

/// An account to open before the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSeed {
    pub id: AccountId,
    pub owner: Subject,
    pub currency: Currency,
    pub opening: Decimal,
}

/// One payment request as a client sends it (and re-sends on retry, unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pay {
    pub subject: Subject,
    pub key: IdempotencyKey,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    /// Asks for more than all the money of its currency: must end FAILED (insufficient funds).
    /// Otherwise the amount is at most the payer's opening balance (it may still fail if the
    /// payer spent its money first).
    pub unaffordable: bool,
    /// After the first response, the same key is sent again with a different amount.
    pub replay_conflicting: bool,
    /// Copies of this exact request sent at once (1 = just this one).
    pub concurrent_copies: u32,
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Pay(Pay),
    /// `GET /balance` of an account the subject owns.
    ReadBalance {
        subject: Subject,
        account: AccountId,
    },
}

/// The accounts and every client's operations, in the order each client sends them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub accounts: Vec<AccountSeed>,
    pub clients: Vec<Vec<Op>>,
}

impl Workload {
    /// Draws a workload (see the module promises). Panics on a config that cannot be satisfied
    /// (fewer than two accounts per currency, an unknown currency, empty ranges): a harness bug.
    pub fn draw<R: Rng + ?Sized>(config: &WorkloadConfig, rng: &mut R) -> Workload {
        assert!(config.accounts_per_currency >= 2, "a payment needs two accounts of one currency");
        assert!(config.subjects >= 1 && config.hot_accounts <= config.accounts_per_currency);
        let subjects: Vec<Subject> =
            (0..config.subjects).map(|i| Subject::parse(&format!("user-{i}")).expect("a valid subject")).collect();
        let mut accounts = Vec::new();
        for (c, code) in config.currencies.iter().enumerate() {
            let currency = Currency::from_code(code).expect("a supported currency");
            for i in 0..config.accounts_per_currency {
                let opening = Decimal::new(
                    rng.gen_range(config.opening_minor.0..=config.opening_minor.1),
                    currency.minor_units(),
                );
                let owner = subjects[(c * config.accounts_per_currency + i) % subjects.len()].clone();
                accounts.push(AccountSeed { id: AccountId::from_uuid(uuid(rng)), owner, currency, opening });
            }
        }
        let per_currency: Vec<&[AccountSeed]> = accounts.chunks(config.accounts_per_currency).collect();
        let pick = |rng: &mut R, group: &[AccountSeed], except: Option<AccountId>| -> usize {
            loop {
                let index = if config.hot_accounts > 0 && rng.gen_range(0..1000) < config.hot_per_mille {
                    rng.gen_range(0..config.hot_accounts)
                } else {
                    rng.gen_range(0..group.len())
                };
                if Some(group[index].id) != except {
                    return index;
                }
            }
        };
        let mut clients = Vec::with_capacity(config.clients);
        for client in 0..config.clients {
            let mut ops = Vec::with_capacity(config.ops_per_client);
            for op in 0..config.ops_per_client {
                let group = per_currency[rng.gen_range(0..per_currency.len())];
                if rng.gen_range(0..1000) < config.balance_read_per_mille {
                    let account = &group[rng.gen_range(0..group.len())];
                    ops.push(Op::ReadBalance { subject: account.owner.clone(), account: account.id });
                    continue;
                }
                let payer = &group[pick(rng, group, None)];
                let payee = &group[pick(rng, group, Some(payer.id))];
                let unaffordable = rng.gen_range(0..1000) < config.unaffordable_per_mille;
                let minor = if unaffordable {
                    // More than all the money of the currency: no interleaving can make it affordable.
                    let total: Decimal = group.iter().map(|a| a.opening).sum();
                    let total_minor = i64::try_from(total.mantissa()).expect("a total that fits i64");
                    total_minor + rng.gen_range(1..=config.amount_minor.1.max(1))
                } else {
                    let opening_minor = i64::try_from(payer.opening.mantissa()).expect("an opening that fits i64");
                    {
                        let lo = config.amount_minor.0;
                        rng.gen_range(lo..=config.amount_minor.1.min(opening_minor).max(lo))
                    }
                };
                let currency = payer.currency;
                let amount =
                    Amount::new(Decimal::new(minor, currency.minor_units()), currency, AmountPolicy::default())
                        .expect("a positive amount with the currency's scale");
                let key = IdempotencyKey::parse(&format!("c{client}-op{op}-{:08x}", rng.r#gen::<u32>()))
                    .expect("a valid key");
                let concurrent_copies = if rng.gen_range(0..1000) < config.concurrent_duplicate_per_mille {
                    rng.gen_range(2..=config.concurrent_copies_max.max(2))
                } else {
                    1
                };
                ops.push(Op::Pay(Pay {
                    subject: payer.owner.clone(),
                    key,
                    from: payer.id,
                    to: payee.id,
                    amount,
                    unaffordable,
                    replay_conflicting: rng.gen_range(0..1000) < config.conflicting_replay_per_mille,
                    concurrent_copies,
                }));
            }
            clients.push(ops);
        }
        Workload { accounts, clients }
    }

    /// Every payment of the workload.
    pub fn payments(&self) -> impl Iterator<Item = &Pay> {
        self.clients.iter().flatten().filter_map(|op| match op {
            Op::Pay(pay) => Some(pay),
            Op::ReadBalance { .. } => None,
        })
    }
}

fn uuid<R: Rng + ?Sized>(rng: &mut R) -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rng.r#gen()).into_uuid()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use madsim::rand::RngCore;

    use super::*;

    /// SplitMix64, as in `plan`'s tests: seeded and usable in both builds.
    struct SplitMix(u64);

    impl RngCore for SplitMix {
        fn next_u32(&mut self) -> u32 {
            (self.next_u64() >> 32) as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for chunk in dest.chunks_mut(8) {
                let bytes = self.next_u64().to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), madsim::rand::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    #[test]
    fn a_workload_is_a_function_of_the_seed() {
        let config = WorkloadConfig::default();
        let a = Workload::draw(&config, &mut SplitMix(1));
        assert_eq!(a, Workload::draw(&config, &mut SplitMix(1)));
        assert_ne!(a, Workload::draw(&config, &mut SplitMix(2)));
    }

    #[test]
    fn every_payment_is_one_the_gateway_would_let_through() {
        let config = WorkloadConfig::default();
        for seed in 0..50 {
            let w = Workload::draw(&config, &mut SplitMix(seed));
            let accounts: BTreeMap<AccountId, &AccountSeed> = w.accounts.iter().map(|a| (a.id, a)).collect();
            assert_eq!(accounts.len(), config.currencies.len() * config.accounts_per_currency, "account ids repeat");
            let mut keys = BTreeSet::new();
            for pay in w.payments() {
                let (payer, payee) = (accounts[&pay.from], accounts[&pay.to]);
                assert_eq!(payer.owner, pay.subject, "the subject owns the payer");
                assert_ne!(pay.from, pay.to);
                assert_eq!(payer.currency, payee.currency);
                assert_eq!(pay.amount.currency(), payer.currency);
                let total: Decimal =
                    w.accounts.iter().filter(|a| a.currency == payer.currency).map(|a| a.opening).sum();
                assert_eq!(pay.unaffordable, pay.amount.value() > total, "seed {seed}: {pay:?}");
                assert!(pay.unaffordable || pay.amount.value() <= payer.opening, "seed {seed}: {pay:?}");
                assert!((1..=config.concurrent_copies_max).contains(&pay.concurrent_copies));
                assert!(keys.insert((pay.subject.clone(), pay.key.clone())), "seed {seed}: a key repeats");
            }
        }
    }

    #[test]
    fn the_mix_has_every_ingredient_and_hot_accounts_are_hot() {
        let config = WorkloadConfig { clients: 8, ops_per_client: 100, ..WorkloadConfig::default() };
        let w = Workload::draw(&config, &mut SplitMix(42));
        let pays: Vec<&Pay> = w.payments().collect();
        let reads = w.clients.iter().flatten().count() - pays.len();
        assert!(reads > 0);
        assert!(pays.iter().any(|p| p.unaffordable));
        assert!(pays.iter().any(|p| p.replay_conflicting));
        assert!(pays.iter().any(|p| p.concurrent_copies > 1));
        let hot: BTreeSet<AccountId> =
            w.accounts.chunks(config.accounts_per_currency).map(|group| group[0].id).collect();
        let touching_hot = pays.iter().filter(|p| hot.contains(&p.from) || hot.contains(&p.to)).count();
        // Uniform choice alone would touch a hot account in fewer than half of the payments.
        assert!(touching_hot * 2 > pays.len(), "{touching_hot} of {} payments touch a hot account", pays.len());
    }
}
