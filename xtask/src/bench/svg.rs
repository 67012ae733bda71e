//! The bench's picture, hand-written SVG (no plotting dependency): two panels against the
//! offered rate (log scale, one tick per step) —
//! 1. throughput: offered (dashed), accepted and settled payments/s, pgbench's TPS as a line;
//! 2. latency (log scale): POST p99 and server-side settlement p99 with their goals (50 / 500 ms).
//!
//! A dashed vertical line marks the maximum sustainable rate in both panels.

use std::fmt::Write as _;

use super::report::{POST_P99_GOAL_MS, Report, SETTLE_P99_GOAL_MS, fmt_rate};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 720.0;
const LEFT: f64 = 80.0;
const PLOT_W: f64 = 660.0;
const LEGEND_X: f64 = LEFT + PLOT_W + 30.0;
const THROUGHPUT_TOP: f64 = 90.0;
const THROUGHPUT_H: f64 = 250.0;
const LATENCY_TOP: f64 = 420.0;
const LATENCY_H: f64 = 240.0;

const OFFERED: &str = "#888888";
const ACCEPTED: &str = "#1f77b4";
const SETTLED: &str = "#2ca02c";
const PGBENCH: &str = "#d62728";
const POST: &str = "#ff7f0e";
const SETTLE: &str = "#9467bd";

/// Text safe inside an SVG element or attribute.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The smallest of 1, 2, 5 × 10^k that is ≥ `v` (and > 0).
pub fn nice_ceil(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let decade = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * decade).find(|c| *c >= v * (1.0 - 1e-12)).unwrap_or(10.0 * decade)
}

/// Maps an offered rate to x: log scale over the steps' rates.
struct XScale {
    lo: f64,
    hi: f64,
}

impl XScale {
    fn x(&self, rate: f64) -> f64 {
        if self.hi <= self.lo || rate <= 0.0 {
            return LEFT + PLOT_W / 2.0;
        }
        let pad = 0.04 * PLOT_W;
        LEFT + pad + (rate.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln()) * (PLOT_W - 2.0 * pad)
    }
}

struct Svg(String);

impl Svg {
    fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), color: &str, width: f64, dash: bool) {
        let dash = if dash { " stroke-dasharray=\"6 4\"" } else { "" };
        let _ = writeln!(
            self.0,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{color}" stroke-width="{width}"{dash}/>"#
        );
    }

    fn text(&mut self, (x, y): (f64, f64), anchor: &str, size: u32, content: &str) {
        let _ = writeln!(
            self.0,
            r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-size="{size}">{}</text>"#,
            escape(content)
        );
    }

    /// A line through the points that have a value (a missing value breaks the line), with a dot
    /// at each point.
    fn series(&mut self, points: &[(f64, Option<f64>)], color: &str, dash: bool, dots: bool) {
        let mut segment: Vec<(f64, f64)> = Vec::new();
        let mut segments = Vec::new();
        for &(x, y) in points {
            match y {
                Some(y) => segment.push((x, y)),
                None => segments.push(std::mem::take(&mut segment)),
            }
        }
        segments.push(segment);
        for seg in segments.iter().filter(|s| s.len() > 1) {
            let coords: Vec<String> = seg.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let dash = if dash { " stroke-dasharray=\"6 4\"" } else { "" };
            let _ = writeln!(
                self.0,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                coords.join(" ")
            );
        }
        if dots {
            for (x, y) in segments.iter().flatten() {
                let _ = writeln!(self.0, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/>"#);
            }
        }
    }

    fn legend(&mut self, row: usize, top: f64, color: &str, dash: bool, label: &str) {
        let y = top + 10.0 + row as f64 * 22.0;
        self.line((LEGEND_X, y), (LEGEND_X + 28.0, y), color, 2.5, dash);
        self.text((LEGEND_X + 36.0, y + 4.0), "start", 12, label);
    }

    fn frame(&mut self, top: f64, height: f64, title: &str, y_label: &str) {
        let _ = writeln!(
            self.0,
            r##"<rect x="{LEFT}" y="{top}" width="{PLOT_W}" height="{height}" fill="none" stroke="#444444"/>"##
        );
        self.text((LEFT, top - 10.0), "start", 14, title);
        let (x, y) = (LEFT - 55.0, top + height / 2.0);
        let _ = writeln!(
            self.0,
            r#"<text x="{x:.1}" y="{y:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 {x:.1} {y:.1})">{}</text>"#,
            escape(y_label)
        );
    }
}

/// The whole picture of a bench run.
pub fn render(report: &Report) -> String {
    let steps = &report.steps;
    let rates: Vec<f64> = steps.iter().map(|s| s.rate).collect();
    let xs = XScale {
        lo: rates.iter().copied().fold(f64::INFINITY, f64::min),
        hi: rates.iter().copied().fold(0.0, f64::max),
    };
    let mut svg = Svg(String::new());
    let _ = writeln!(
        svg.0,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">"#
    );
    let _ = writeln!(svg.0, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let h = &report.header;
    let commit: String = h.git_commit.chars().take(12).collect();
    svg.text(
        (WIDTH / 2.0, 26.0),
        "middle",
        17,
        &format!("SecurePay bench — {} — {commit} — {} build", h.date, h.build),
    );
    svg.text(
        (WIDTH / 2.0, 46.0),
        "middle",
        12,
        &format!(
            "{} ({} cores), {:.1} GiB, Linux {} · fsync {}, synchronous_commit {} · {} s per step",
            h.machine.cpu,
            h.machine.cores,
            h.machine.memory_gib,
            h.machine.kernel,
            h.postgres_fsync,
            h.postgres_synchronous_commit,
            h.config.step_secs
        ),
    );
    let s = &report.summary;
    let rate = |r: Option<f64>| r.map_or("none".to_string(), |r| format!("{} /s", fmt_rate(r)));
    svg.text(
        (WIDTH / 2.0, 64.0),
        "middle",
        12,
        &format!(
            "max sustainable rate {} · latency goal held up to {} · max settled {:.1}/s{}",
            rate(s.max_sustainable_rate),
            rate(s.latency_goal_max_rate),
            s.max_settled_per_s,
            s.settled_per_pgbench_tps.map(|r| format!(" = {r:.2} × pgbench TPS")).unwrap_or_default()
        ),
    );

    // Panel 1: throughput.
    let tps = report.pgbench.as_ref().map(|p| p.tps);
    let measured = steps.iter().flat_map(|s| [s.offered_per_s, s.accepted_per_s, s.settled_per_s]).fold(0.0, f64::max);
    // pgbench's line only when it does not squash the measured lines flat.
    let tps_on_scale = tps.filter(|t| *t <= 2.0 * measured.max(1.0));
    let y_max = nice_ceil(measured.max(tps_on_scale.unwrap_or(0.0)).max(1.0) * 1.05);
    let ty = |v: f64| THROUGHPUT_TOP + THROUGHPUT_H - v / y_max * THROUGHPUT_H;
    svg.frame(THROUGHPUT_TOP, THROUGHPUT_H, "Throughput against offered rate", "payments / s");
    for i in 0..=5 {
        let v = y_max * f64::from(i) / 5.0;
        svg.line((LEFT, ty(v)), (LEFT + PLOT_W, ty(v)), "#e4e4e4", 1.0, false);
        svg.text((LEFT - 8.0, ty(v) + 4.0), "end", 11, &fmt_rate((v * 100.0).round() / 100.0));
    }
    let points = |f: &dyn Fn(&super::report::StepResult) -> Option<f64>, y: &dyn Fn(f64) -> f64| {
        steps.iter().map(|st| (xs.x(st.rate), f(st).map(y))).collect::<Vec<_>>()
    };
    svg.series(&points(&|st| Some(st.offered_per_s), &ty), OFFERED, true, false);
    svg.series(&points(&|st| Some(st.accepted_per_s), &ty), ACCEPTED, false, true);
    svg.series(&points(&|st| Some(st.settled_per_s), &ty), SETTLED, false, true);
    svg.legend(0, THROUGHPUT_TOP, OFFERED, true, "offered/s");
    svg.legend(1, THROUGHPUT_TOP, ACCEPTED, false, "accepted/s (202)");
    svg.legend(2, THROUGHPUT_TOP, SETTLED, false, "settled/s (server)");
    match (tps, tps_on_scale) {
        (Some(t), Some(_)) => {
            svg.line((LEFT, ty(t)), (LEFT + PLOT_W, ty(t)), PGBENCH, 1.5, true);
            svg.legend(3, THROUGHPUT_TOP, PGBENCH, true, &format!("pgbench {t:.0} tps"));
        }
        (Some(t), None) => {
            svg.text((LEGEND_X, THROUGHPUT_TOP + 76.0), "start", 12, &format!("pgbench {t:.0} tps (off scale)"))
        }
        _ => {}
    }

    // Panel 2: latency, log scale.
    let latencies: Vec<f64> =
        steps.iter().flat_map(|s| [s.post_p99_ms, s.settle_p99_ms]).flatten().filter(|v| *v > 0.0).collect();
    // From 1 ms, or the decade below the fastest p99 if that is faster.
    let lo_ms = 10f64.powf(latencies.iter().copied().fold(1.0, f64::min).log10().floor());
    let hi_ms = 10f64.powf((latencies.iter().copied().fold(SETTLE_P99_GOAL_MS, f64::max) * 1.5).log10().ceil());
    let ly = |v: f64| {
        let v = v.max(lo_ms);
        LATENCY_TOP + LATENCY_H - (v.log10() - lo_ms.log10()) / (hi_ms.log10() - lo_ms.log10()) * LATENCY_H
    };
    svg.frame(LATENCY_TOP, LATENCY_H, "p99 latency against offered rate (log scale)", "milliseconds");
    let mut decade = lo_ms;
    while decade <= hi_ms * 1.0001 {
        svg.line((LEFT, ly(decade)), (LEFT + PLOT_W, ly(decade)), "#e4e4e4", 1.0, false);
        let label = if decade >= 1.0 { format!("{decade:.0}") } else { format!("{decade}") };
        svg.text((LEFT - 8.0, ly(decade) + 4.0), "end", 11, &label);
        decade *= 10.0;
    }
    svg.line((LEFT, ly(POST_P99_GOAL_MS)), (LEFT + PLOT_W, ly(POST_P99_GOAL_MS)), POST, 1.0, true);
    svg.line((LEFT, ly(SETTLE_P99_GOAL_MS)), (LEFT + PLOT_W, ly(SETTLE_P99_GOAL_MS)), SETTLE, 1.0, true);
    svg.series(&points(&|st| st.post_p99_ms, &ly), POST, false, true);
    svg.series(&points(&|st| st.settle_p99_ms, &ly), SETTLE, false, true);
    svg.legend(0, LATENCY_TOP, POST, false, "POST p99");
    svg.legend(1, LATENCY_TOP, SETTLE, false, "settlement p99 (server)");
    svg.legend(2, LATENCY_TOP, POST, true, &format!("goal {POST_P99_GOAL_MS} ms"));
    svg.legend(3, LATENCY_TOP, SETTLE, true, &format!("goal {SETTLE_P99_GOAL_MS} ms"));

    // The x axis of both panels: one tick per step.
    for top_bottom in [THROUGHPUT_TOP + THROUGHPUT_H, LATENCY_TOP + LATENCY_H] {
        for r in &rates {
            let x = xs.x(*r);
            svg.line((x, top_bottom), (x, top_bottom + 5.0), "#444444", 1.0, false);
            svg.text((x, top_bottom + 18.0), "middle", 11, &fmt_rate(*r));
        }
        svg.text((LEFT + PLOT_W / 2.0, top_bottom + 36.0), "middle", 12, "offered payments / s");
    }
    if let Some(max) = s.max_sustainable_rate {
        let x = xs.x(max);
        svg.line((x, THROUGHPUT_TOP), (x, THROUGHPUT_TOP + THROUGHPUT_H), "#555555", 1.0, true);
        svg.line((x, LATENCY_TOP), (x, LATENCY_TOP + LATENCY_H), "#555555", 1.0, true);
        svg.text((x + 4.0, THROUGHPUT_TOP + 14.0), "start", 11, "max sustainable");
    }
    svg.0.push_str("</svg>\n");
    svg.0
}

#[cfg(test)]
mod tests {
    use super::super::report::tests::{report, step};
    use super::*;

    /// Every tag closed in order, attributes quoted, entities known: enough to call it XML.
    fn assert_well_formed(svg: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            assert!(!text.contains('>'), "stray '>' in text: {text:?}");
            for (i, _) in text.match_indices('&') {
                let entity = &text[i..];
                assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;"].iter().any(|e| entity.starts_with(e)),
                    "bare & in {text:?}"
                );
            }
            let close = rest[open..].find('>').expect("unclosed tag") + open;
            let tag = &rest[open + 1..close];
            assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes in <{tag}>");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap().to_string());
            }
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert!(rest.trim().is_empty());
    }

    #[test]
    fn the_picture_is_well_formed_svg_with_every_step_and_goal() {
        let steps = vec![
            step(25.0, 25.0, 25.0, 8.0, 90.0),
            step(50.0, 50.0, 50.0, 9.0, 120.0),
            step(100.0, 100.0, 99.0, 30.0, 400.0),
            step(200.0, 199.0, 195.0, 70.0, 900.0),
        ];
        let mut r = report(steps);
        r.header.machine.cpu = "Intel <Xeon> & friends".into();
        let svg = render(&r);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_well_formed(&svg);
        assert!(svg.contains("Intel &lt;Xeon&gt; &amp; friends"), "text is escaped");
        // Dots: accepted, settled, POST p99, settlement p99 for each of the 4 steps.
        assert_eq!(svg.matches("<circle").count(), 16);
        // offered, accepted, settled, POST p99, settlement p99.
        assert_eq!(svg.matches("<polyline").count(), 5);
        for want in
            ["goal 50 ms", "goal 500 ms", "pgbench 800 tps", "max sustainable", "SecurePay bench", ">200<", ">25<"]
        {
            assert!(svg.contains(want), "the picture lacks {want:?}");
        }
    }

    #[test]
    fn one_step_missing_values_and_an_off_scale_pgbench_still_draw() {
        let mut lonely = step(10.0, 0.0, 0.0, 3.0, 0.0);
        lonely.settle_p99_ms = None;
        let mut r = report(vec![lonely]);
        r.pgbench.as_mut().unwrap().tps = 5000.0;
        r.summary = super::super::report::summarize(&r.steps, Some(5000.0));
        let svg = render(&r);
        assert_well_formed(&svg);
        assert!(svg.contains("pgbench 5000 tps (off scale)"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 0, "one point is a dot, not a line");
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_ceil(0.0), 1.0);
        assert_eq!(nice_ceil(1.0), 1.0);
        assert_eq!(nice_ceil(1.2), 2.0);
        assert_eq!(nice_ceil(420.0), 500.0);
        assert_eq!(nice_ceil(1680.0), 2000.0);
        assert_eq!(nice_ceil(5001.0), 10_000.0);
    }
}
