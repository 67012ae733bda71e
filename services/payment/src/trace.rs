//! W3C trace context for the outbox (SPEC §7: trace context travels in Kafka headers). One
//! function decides the `traceparent` an event carries: the incoming request's trace continued
//! with a fresh span id when the caller sent a valid one, else a new trace. Ids come from the
//! `Ids` port (seeded in simulation). OTLP export joins later; this stays the one place.

use securepay_ports::Ids;

pub const TRACEPARENT: &str = "traceparent";

/// `00-<trace id>-<span id>-<flags>`, continuing `incoming` (its trace id and its sampling
/// decision) when it is a valid version-00 traceparent; else a new, sampled trace.
pub fn traceparent(incoming: Option<&str>, ids: &dyn Ids) -> String {
    let span_id = format!("{:016x}", (ids.uuid().as_u128() as u64).max(1));
    match incoming.and_then(parse) {
        Some((trace_id, flags)) => format!("00-{trace_id}-{span_id}-{flags}"),
        None => format!("00-{:032x}-{span_id}-01", ids.uuid().as_u128().max(1)),
    }
}

/// The trace id of a valid version-00 traceparent.
#[cfg(test)]
fn parse_trace_id(text: &str) -> Option<&str> {
    parse(text).map(|(trace, _)| trace)
}

/// The trace id and the trace flags of a valid version-00 traceparent.
fn parse(text: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = text.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    match parts.as_slice() {
        [version, trace, span, flags]
            if *version == "00"
                && hex(trace, 32)
                && nonzero(trace)
                && hex(span, 16)
                && nonzero(span)
                && hex(flags, 2) =>
        {
            Some((trace, flags))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use securepay_memory::SeededIds;

    use super::*;

    #[test]
    fn a_valid_incoming_trace_is_continued_and_anything_else_starts_one() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let out = traceparent(Some(incoming), &SeededIds);
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert_ne!(out, incoming, "a new span");
        for bad in [None, Some("garbage"), Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01")] {
            let fresh = traceparent(bad, &SeededIds);
            assert_eq!(parse_trace_id(&fresh).map(str::len), Some(32), "{fresh}");
            assert!(!fresh.contains("00000000000000000000000000000000"));
            assert!(fresh.ends_with("-01"), "a new trace is sampled: {fresh}");
        }
    }

    #[test]
    fn the_callers_sampling_decision_travels_with_the_event() {
        // With a sampling ratio below 1 the gateway drops most traces: the settlement and the
        // notification of an unsampled payment must not start exporting it again.
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(traceparent(Some(unsampled), &SeededIds).ends_with("-00"));
    }
}
