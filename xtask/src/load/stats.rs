//! What a load run measured, and its report.
//!
//! Every event is recorded with its offset from the run's start, so the per-second table and the
//! totals come from one place. Latencies go into HdrHistograms (microseconds, 3 significant
//! digits); percentiles are the histogram's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Counts of one second of the run (by the second an event happened in).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Second {
    pub offered: u64,
    pub accepted: u64,
    pub settled: u64,
    pub errors: u64,
}

/// A latency histogram in microseconds, up to one hour.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Latency {
    pub fn record(&mut self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(micros);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// `q` in [0, 1]; `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        (self.count() > 0).then(|| Duration::from_micros(self.0.value_at_quantile(q)))
    }

    pub fn max(&self) -> Option<Duration> {
        (self.count() > 0).then(|| Duration::from_micros(self.0.max()))
    }

    /// `p50 12.3 ms  p95 40.1 ms  p99 88.0 ms  max 120.4 ms  (n=1234)`.
    pub fn summary(&self) -> String {
        if self.count() == 0 {
            return "no samples".to_string();
        }
        let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        format!(
            "p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (n={})",
            ms(self.quantile(0.50)),
            ms(self.quantile(0.95)),
            ms(self.quantile(0.99)),
            ms(self.max()),
            self.count()
        )
    }
}

/// Which kind of payment an event belongs to: the report splits outcomes and errors by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Intent {
    Affordable,
    Unaffordable,
}

impl Intent {
    pub fn of(unaffordable: bool) -> Intent {
        if unaffordable { Intent::Unaffordable } else { Intent::Affordable }
    }
}

/// Everything measured during a run.
#[derive(Debug, Default)]
pub struct Stats {
    pub seconds: Vec<Second>,
    pub offered: u64,
    /// Due but not sent: the client's concurrency limit was reached.
    pub not_sent: u64,
    pub accepted: u64,
    /// 202s answered from the idempotency record (should be 0: every payment has its own key).
    pub replayed: u64,
    pub settled: u64,
    /// Accepted but not terminal when the drain ended.
    pub unsettled: u64,
    /// POST answers other than 202, and transport failures, by `"<status> <code>"` and intent.
    pub post_errors: BTreeMap<(String, Intent), u64>,
    /// GET (settlement polling) failures by `"<status> <code>"`.
    pub poll_errors: BTreeMap<String, u64>,
    /// Terminal outcomes (`COMPLETED`, `FAILED insufficient_funds`, ...) by intent.
    pub outcomes: BTreeMap<(String, Intent), u64>,
    /// From the payment's due time to the POST's answer, whatever it was (includes time waiting
    /// to be sent).
    pub post_latency: Latency,
    /// From the POST being sent to its answer, whatever it was (the server's share).
    pub post_service: Latency,
    /// From the 202 to the first poll that saw a terminal status (granularity: the poll interval).
    pub settle_observed: Latency,
    /// The payment's `updated_at − created_at` as the server recorded them.
    pub settle_server: Latency,
    /// When the last settlement was observed.
    pub last_settled_at: Option<Duration>,
}

impl Stats {
    fn second(&mut self, at: Duration) -> &mut Second {
        let i = usize::try_from(at.as_secs()).unwrap_or(usize::MAX - 1);
        if self.seconds.len() <= i {
            self.seconds.resize(i + 1, Second::default());
        }
        &mut self.seconds[i]
    }

    /// Payment due at `due`: offered; `sent` false when the concurrency limit refused it.
    pub fn offered(&mut self, due: Duration, sent: bool, intent: Intent) {
        self.offered += 1;
        self.second(due).offered += 1;
        if !sent {
            self.not_sent += 1;
            let key = ("not sent (client concurrency limit)".to_string(), intent);
            *self.post_errors.entry(key).or_default() += 1;
            self.second(due).errors += 1;
        }
    }

    /// A 202 at `at`: `latency` from the due time, `service` from the write.
    pub fn accepted(&mut self, at: Duration, latency: Duration, service: Duration, replayed: bool) {
        self.accepted += 1;
        self.replayed += u64::from(replayed);
        self.second(at).accepted += 1;
        self.post_latency.record(latency);
        self.post_service.record(service);
    }

    /// A POST answered with something else than 202 (`status` 0: no HTTP answer).
    /// A POST answered otherwise (or not at all) at `at`: latencies as for [`Stats::accepted`].
    pub fn rejected(&mut self, at: Duration, latency: Duration, service: Duration, error: String, intent: Intent) {
        self.second(at).errors += 1;
        self.post_latency.record(latency);
        self.post_service.record(service);
        *self.post_errors.entry((error, intent)).or_default() += 1;
    }

    pub fn poll_error(&mut self, error: String) {
        *self.poll_errors.entry(error).or_default() += 1;
    }

    /// A terminal status first seen at `at`.
    pub fn settled(
        &mut self,
        at: Duration,
        outcome: String,
        intent: Intent,
        observed: Duration,
        server: Option<Duration>,
    ) {
        self.settled += 1;
        self.second(at).settled += 1;
        self.last_settled_at = Some(self.last_settled_at.map_or(at, |last| last.max(at)));
        self.settle_observed.record(observed);
        if let Some(server) = server {
            self.settle_server.record(server);
        }
        *self.outcomes.entry((outcome, intent)).or_default() += 1;
    }

    pub fn unsettled(&mut self) {
        self.unsettled += 1;
    }

    pub fn errors(&self) -> u64 {
        self.post_errors.values().sum()
    }

    /// Unaffordable payments that completed: money that did not exist moved. Must be 0.
    pub fn unaffordable_completed(&self) -> u64 {
        self.outcomes.get(&("COMPLETED".to_string(), Intent::Unaffordable)).copied().unwrap_or(0)
    }
}

/// The run's parameters, as printed in the report.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub target: String,
    pub rate: f64,
    pub duration: Duration,
    pub accounts: usize,
    pub concurrency: usize,
    pub unaffordable_share: f64,
    pub seed: u64,
    /// How often accepted payments are polled; `None`: not at all (`cargo xtask bench` measures
    /// settlement server-side instead).
    pub poll_interval: Option<Duration>,
    pub drain: Duration,
    /// All calls from 127.0.0.1 instead of one loopback address per load user.
    pub one_source_ip: bool,
}

/// The machine the numbers were measured on (the whole platform runs on it too).
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    /// `/proc/loadavg`'s 1/5/15-minute averages when the run started: other work on the machine.
    pub load_average: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        Machine {
            cpu: cpu_model(&read("/proc/cpuinfo")).unwrap_or_else(|| "unknown CPU".to_string()),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_gib: mem_total_kib(&read("/proc/meminfo")).map_or(0.0, |kib| kib as f64 / 1024.0 / 1024.0),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            load_average: read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        }
    }
}

/// The first `model name` of `/proc/cpuinfo`.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, v)| v.trim()))
        .map(str::to_string)
}

/// `MemTotal` of `/proc/meminfo`, in KiB.
fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Conservation over the load accounts, before and after the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConservationLine {
    pub before: String,
    pub after: String,
    pub opening: String,
    /// Accounts whose balance differs from opening + credits − debits of the ledger.
    pub ledger_mismatches: i64,
}

impl ConservationLine {
    /// The balances did not move in sum, equal the opening balances, and match the ledger.
    pub fn holds(&self) -> bool {
        self.before == self.after && self.after == self.opening && self.ledger_mismatches == 0
    }
}

fn per_second(count: u64, over: Duration) -> f64 {
    if over.is_zero() { 0.0 } else { count as f64 / over.as_secs_f64() }
}

/// `1/s` for the progress line: `[  3s] offered 60  accepted 58  settled 50  errors 0  in flight 8`.
pub fn progress_line(elapsed: Duration, s: &Stats) -> String {
    format!(
        "[{:>4}s] offered {}  accepted {}  settled {}  errors {}  awaiting settlement {}",
        elapsed.as_secs(),
        s.offered,
        s.accepted,
        s.settled,
        s.errors(),
        s.accepted.saturating_sub(s.settled + s.unsettled)
    )
}

/// The final report.
pub fn report(info: &RunInfo, machine: &Machine, s: &Stats, conservation: Option<&ConservationLine>) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "== SecurePay load run ==");
    let _ = writeln!(
        w,
        "machine     {} ({} cores), {:.1} GiB RAM, Linux {}; the platform runs on the same machine; \
         load average at start {}",
        machine.cpu, machine.cores, machine.memory_gib, machine.kernel, machine.load_average
    );
    let _ = writeln!(
        w,
        "run         {} payments/s for {} s against {}; {} accounts ({}), concurrency {}, unaffordable share {}, seed {}",
        info.rate,
        info.duration.as_secs(),
        info.target,
        info.accounts,
        if info.one_source_ip { "all from 127.0.0.1" } else { "each from its own 127.10.x.y" },
        info.concurrency,
        info.unaffordable_share,
        info.seed
    );
    match info.poll_interval {
        Some(interval) => {
            let _ = writeln!(
                w,
                "settlement  polled every {} ms, drained for at most {} s after the run",
                interval.as_millis(),
                info.drain.as_secs()
            );
        }
        None => {
            let _ = writeln!(w, "settlement  not polled");
        }
    }
    let _ = writeln!(w);
    let settle_window = s.last_settled_at.unwrap_or(info.duration).max(info.duration);
    let _ = writeln!(
        w,
        "totals      offered {}  sent {}  accepted {} ({} replayed)  errors {}  settled {}  unsettled {}",
        s.offered,
        s.offered - s.not_sent,
        s.accepted,
        s.replayed,
        s.errors(),
        s.settled,
        s.unsettled
    );
    let _ = writeln!(
        w,
        "per second  offered {:.1}/s  accepted {:.1}/s (over the {} s run)  settled {:.1}/s (over {:.1} s, until the last settlement)",
        per_second(s.offered, info.duration),
        per_second(s.accepted, info.duration),
        info.duration.as_secs(),
        per_second(s.settled, settle_window),
        settle_window.as_secs_f64()
    );
    let _ = writeln!(w);
    let _ = writeln!(w, "latency     POST, due → answer     {}", s.post_latency.summary());
    let _ = writeln!(w, "            POST, sent → answer    {}", s.post_service.summary());
    let _ = writeln!(w, "            settlement, observed   {}", s.settle_observed.summary());
    let _ = writeln!(w, "            settlement, server     {}", s.settle_server.summary());
    let _ = writeln!(
        w,
        "            (POST: every answer, 202 or not; due: the open-loop send time. Settlement observed: 202 → first poll\n             \
             seeing COMPLETED/FAILED, granularity {} ms; server: the payment's updated_at − created_at)",
        info.poll_interval.unwrap_or_default().as_millis()
    );
    let _ = writeln!(w);
    let _ = writeln!(w, "outcomes    {:<40} {:>12} {:>12}", "", "affordable", "unaffordable");
    for outcome in s.outcomes.keys().map(|(o, _)| o).collect::<std::collections::BTreeSet<_>>() {
        let n = |intent| s.outcomes.get(&(outcome.clone(), intent)).copied().unwrap_or(0);
        let _ = writeln!(w, "            {outcome:<40} {:>12} {:>12}", n(Intent::Affordable), n(Intent::Unaffordable));
    }
    if s.outcomes.is_empty() {
        let _ = writeln!(w, "            (none settled)");
    }
    let _ = writeln!(w, "errors      POST, by HTTP status and problem code");
    for error in s.post_errors.keys().map(|(e, _)| e).collect::<std::collections::BTreeSet<_>>() {
        let n = |intent| s.post_errors.get(&(error.clone(), intent)).copied().unwrap_or(0);
        let _ = writeln!(w, "            {error:<40} {:>12} {:>12}", n(Intent::Affordable), n(Intent::Unaffordable));
    }
    if s.post_errors.is_empty() {
        let _ = writeln!(w, "            (none)");
    }
    if !s.poll_errors.is_empty() {
        let _ = writeln!(w, "            GET (settlement polling)");
        for (error, n) in &s.poll_errors {
            let _ = writeln!(w, "            {error:<40} {n:>12}");
        }
    }
    let rate_limited =
        s.post_errors.keys().any(|(e, _)| e.starts_with("429 ")) || s.poll_errors.keys().any(|e| e.starts_with("429 "));
    if rate_limited {
        let _ = writeln!(
            w,
            "            429: the gateway's rate limits refused calls (polls count too): per client IP \
             SECUREPAY_RATE_LIMIT_IP_PER_S/_BURST (default 50/s, 100), per user \
             SECUREPAY_RATE_LIMIT_SUBJECT_PER_S/_BURST (10/s, 20); use more --accounts or raise them"
        );
    }
    if s.unaffordable_completed() > 0 {
        let _ = writeln!(w, "VIOLATION   {} unaffordable payments COMPLETED", s.unaffordable_completed());
    }
    let _ = writeln!(w);
    if let Some(c) = conservation {
        let _ = writeln!(
            w,
            "conservation  all load accounts' balances: before {}  after {}  opening {}  ledger mismatches {}  → {}",
            c.before,
            c.after,
            c.opening,
            c.ledger_mismatches,
            if c.holds() { "holds" } else { "VIOLATED" }
        );
        let _ = writeln!(w);
    }
    write_timeline(w, &s.seconds);
    out
}

/// At most [`TIMELINE_ROWS`] rows: one per second, or per-second averages over equal spans.
const TIMELINE_ROWS: usize = 60;

fn write_timeline(w: &mut String, seconds: &[Second]) {
    let span = seconds.len().div_ceil(TIMELINE_ROWS).max(1);
    if span == 1 {
        let _ = writeln!(w, "second  offered  accepted  settled  errors");
    } else {
        let _ = writeln!(w, "second  offered  accepted  settled  errors   (per-second averages over {span} s)");
    }
    for (row, chunk) in seconds.chunks(span).enumerate() {
        let avg = |f: fn(&Second) -> u64| chunk.iter().map(f).sum::<u64>() as f64 / chunk.len() as f64;
        let [offered, accepted, settled, errors] =
            [avg(|s| s.offered), avg(|s| s.accepted), avg(|s| s.settled), avg(|s| s.errors)];
        let decimals = if span == 1 { 0 } else { 1 };
        let _ = writeln!(
            w,
            "{:>6}  {offered:>7.decimals$}  {accepted:>8.decimals$}  {settled:>7.decimals$}  {errors:>6.decimals$}",
            row * span
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_come_from_the_recorded_latencies() {
        let mut l = Latency::default();
        assert_eq!(l.quantile(0.5), None);
        assert_eq!(l.summary(), "no samples");
        for i in 1..=1000 {
            l.record(ms(i));
        }
        let close = |d: Option<Duration>, want: u64| {
            let got = d.unwrap().as_secs_f64() * 1000.0;
            assert!((got - want as f64).abs() <= want as f64 * 0.001 + 0.01, "got {got} ms, want {want} ms");
        };
        close(l.quantile(0.50), 500);
        close(l.quantile(0.95), 950);
        close(l.quantile(0.99), 990);
        close(l.max(), 1000);
        assert_eq!(l.count(), 1000);
        assert!(l.summary().starts_with("p50 500.") && l.summary().ends_with("(n=1000)"), "{}", l.summary());
    }

    #[test]
    fn events_land_in_the_second_they_happened_and_in_the_totals() {
        let mut s = Stats::default();
        s.offered(ms(100), true, Intent::Affordable);
        s.offered(ms(1500), true, Intent::Affordable);
        s.offered(ms(1600), false, Intent::Unaffordable);
        s.accepted(ms(120), ms(20), ms(15), false);
        s.rejected(ms(1700), ms(100), ms(90), "422 insufficient_funds".into(), Intent::Unaffordable);
        s.settled(ms(2300), "COMPLETED".into(), Intent::Affordable, ms(2180), Some(ms(900)));
        assert_eq!(
            s.seconds,
            vec![
                Second { offered: 1, accepted: 1, settled: 0, errors: 0 },
                Second { offered: 2, accepted: 0, settled: 0, errors: 2 },
                Second { offered: 0, accepted: 0, settled: 1, errors: 0 },
            ]
        );
        assert_eq!((s.offered, s.not_sent, s.accepted, s.settled, s.errors()), (3, 1, 1, 1, 2));
        assert_eq!((s.post_latency.count(), s.post_service.count()), (2, 2), "rejected POSTs have latencies too");
        assert_eq!(s.last_settled_at, Some(ms(2300)));
        assert_eq!(s.unaffordable_completed(), 0);
        s.settled(ms(2400), "COMPLETED".into(), Intent::Unaffordable, ms(10), None);
        assert_eq!(s.unaffordable_completed(), 1);
        assert_eq!(s.settle_server.count(), 1);
    }

    #[test]
    fn the_report_names_machine_rates_latencies_errors_and_conservation() {
        let mut s = Stats::default();
        for i in 0..20 {
            s.offered(ms(i * 100), true, Intent::Affordable);
            s.accepted(ms(i * 100 + 10), ms(10), ms(8), false);
            s.settled(ms(i * 100 + 500), "COMPLETED".into(), Intent::Affordable, ms(490), Some(ms(300)));
        }
        s.rejected(ms(1900), ms(5), ms(5), "429 rate_limited".into(), Intent::Affordable);
        s.poll_error("0 timeout".into());
        let info = RunInfo {
            target: "http://127.0.0.1:8080".into(),
            rate: 10.0,
            duration: Duration::from_secs(2),
            accounts: 200,
            concurrency: 64,
            unaffordable_share: 0.1,
            seed: 1,
            poll_interval: Some(ms(200)),
            drain: Duration::from_secs(30),
            one_source_ip: false,
        };
        let machine = Machine {
            cpu: "Test CPU".into(),
            cores: 2,
            memory_gib: 7.8,
            kernel: "6.1".into(),
            load_average: "0.50 0.40 0.30".into(),
        };
        let c = ConservationLine {
            before: "200000.00".into(),
            after: "200000.00".into(),
            opening: "200000.00".into(),
            ledger_mismatches: 0,
        };
        let r = report(&info, &machine, &s, Some(&c));
        for want in [
            "Test CPU (2 cores), 7.8 GiB RAM",
            "load average at start 0.50 0.40 0.30",
            "offered 20  sent 20  accepted 20 (0 replayed)  errors 1  settled 20  unsettled 0",
            "offered 10.0/s  accepted 10.0/s",
            "settled 8.3/s (over 2.4 s",
            "POST, due → answer     p50 10.0 ms",
            "settlement, server     p50 300.0 ms",
            "granularity 200 ms",
            "429 rate_limited",
            "0 timeout",
            "SECUREPAY_RATE_LIMIT_IP_PER_S",
            "→ holds",
        ] {
            assert!(r.contains(want), "report lacks {want:?}:\n{r}");
        }
        assert!(!r.contains("VIOLATION"));
        let broken = ConservationLine { after: "199999.00".into(), ..c };
        assert!(report(&info, &machine, &s, Some(&broken)).contains("→ VIOLATED"));
    }

    #[test]
    fn long_runs_get_a_timeline_of_averages_short_runs_one_row_per_second() {
        let second = |n| Second { offered: n, accepted: n, settled: n, errors: 0 };
        let mut w = String::new();
        write_timeline(&mut w, &[second(1), second(3)]);
        assert_eq!(w.lines().count(), 3, "{w}");
        assert_eq!(w.lines().nth(2).unwrap(), "     1        3         3        3       0", "{w}");
        let mut w = String::new();
        write_timeline(&mut w, &(0..3600).map(|i| second(i % 2 * 2)).collect::<Vec<_>>());
        assert_eq!(w.lines().count(), 61, "a header and 60 rows");
        assert!(w.contains("averages over 60 s"), "{w}");
        assert!(w.lines().nth(2).unwrap().starts_with("    60      1.0"), "{w}");
    }

    #[test]
    fn machine_facts_are_read_from_proc() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("Intel(R) Xeon(R) CPU @ 2.20GHz"));
        assert_eq!(cpu_model("processor : 0\n"), None);
        assert_eq!(mem_total_kib("MemTotal:        8141204 kB\nMemFree: 1 kB\n"), Some(8_141_204));
        assert_eq!(mem_total_kib(""), None);
    }
}
