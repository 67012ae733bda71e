//! The outbox relay (SPEC §6.4, §6.5): publishes what a store committed to its outbox, in commit
//! order, and marks it published only after the broker acknowledged it. At-least-once: a relay that
//! dies between publish and mark publishes the same events again after restart, and two relays may
//! both publish an event — consumers dedupe by event id, so money never moves twice.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use securepay_ports::{EventLog, Outbox, OutgoingRecord, PortResult};

use crate::{metrics, trace};

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The service label of the outbox-lag gauge (`payment`, `account`).
    pub service: &'static str,
    /// Most events fetched and published per round.
    pub batch_len: usize,
    /// Pause after a round that found nothing.
    pub idle_wait: Duration,
    /// First pause after a failed round; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl RelayConfig {
    pub fn new(service: &'static str) -> RelayConfig {
        RelayConfig {
            service,
            batch_len: 256,
            idle_wait: Duration::from_millis(20),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// One round: publishes up to `batch_len` unpublished events and marks them. Returns how many
/// were published. An `Err` leaves them unpublished (they are retried next round).
pub async fn relay_once(outbox: &dyn Outbox, log: &dyn EventLog, config: &RelayConfig) -> PortResult<usize> {
    let events = outbox.unpublished(config.batch_len).await?;
    metrics::outbox_lag(config.service, events.len());
    if events.is_empty() {
        return Ok(0);
    }
    // One `kafka.publish <topic>` span per event, child of the span that wrote it; the record
    // carries the publish span's context, so consumers continue the same trace. The spans end
    // when the broker acknowledged (or refused) the batch.
    let spans: Vec<tracing::Span> = events.iter().map(|e| trace::publish_span(&e.topic, &e.headers)).collect();
    let records: Vec<OutgoingRecord> = events
        .iter()
        .zip(&spans)
        .map(|(e, span)| OutgoingRecord {
            topic: e.topic.clone(),
            key: e.key.clone(),
            payload: e.payload.clone(),
            headers: trace::relay_headers(&e.headers, span),
        })
        .collect();
    log.publish(&records).await?;
    drop(spans);
    let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    outbox.mark_published(&sequences).await?;
    Ok(events.len())
}

/// Runs rounds until `shutdown` resolves, backing off exponentially while the store or the broker
/// is unavailable. Finishes the round in progress before returning.
pub async fn run_relay(
    outbox: Arc<dyn Outbox>,
    log: Arc<dyn EventLog>,
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = config.backoff_min;
    loop {
        let pause = match relay_once(outbox.as_ref(), log.as_ref(), &config).await {
            Ok(n) if n == config.batch_len => Duration::ZERO,
            Ok(n) => {
                backoff = config.backoff_min;
                if n > 0 {
                    tracing::debug!(service = config.service, published = n, "outbox relayed");
                }
                config.idle_wait
            }
            Err(error) => {
                tracing::warn!(service = config.service, %error, retry_in_ms = backoff.as_millis() as u64, "outbox relay round failed");
                let pause = backoff;
                backoff = (backoff * 2).min(config.backoff_max);
                pause
            }
        };
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use securepay_memory::MemoryEventLog;
    use securepay_ports::EventConsumer;

    use super::*;

    /// An outbox of `n` events that can be made unavailable.
    struct VecOutbox {
        rows: std::sync::Mutex<Vec<(securepay_ports::OutboxEvent, bool)>>,
    }

    impl VecOutbox {
        fn new(n: i64) -> VecOutbox {
            let rows = (1..=n)
                .map(|sequence| {
                    let event = securepay_ports::OutboxEvent {
                        sequence,
                        topic: "payment.initiated".into(),
                        key: format!("p{}", sequence % 3),
                        payload: sequence.to_be_bytes().to_vec(),
                        headers: vec![("traceparent".into(), "00-abc".into())],
                    };
                    (event, false)
                })
                .collect();
            VecOutbox { rows: std::sync::Mutex::new(rows) }
        }
    }

    #[async_trait::async_trait]
    impl Outbox for VecOutbox {
        async fn unpublished(&self, limit: usize) -> PortResult<Vec<securepay_ports::OutboxEvent>> {
            let rows = self.rows.lock().unwrap();
            Ok(rows.iter().filter(|(_, published)| !published).take(limit).map(|(e, _)| e.clone()).collect())
        }

        async fn mark_published(&self, sequences: &[i64]) -> PortResult<()> {
            for (e, published) in self.rows.lock().unwrap().iter_mut() {
                *published |= sequences.contains(&e.sequence);
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn every_event_is_published_once_with_its_headers_and_marked() {
        let outbox = VecOutbox::new(10);
        let log = MemoryEventLog::new();
        let mut consumer = log.consumer("g", &["payment.initiated"]);
        let config = RelayConfig { batch_len: 4, ..RelayConfig::new("test") };
        let mut total = 0;
        while let n @ 1.. = relay_once(&outbox, &log, &config).await.unwrap() {
            total += n;
        }
        assert_eq!(total, 10);
        let records = consumer.poll(100, Duration::from_millis(10)).await.unwrap();
        assert_eq!(records.len(), 10);
        assert!(records.iter().all(|r| r.headers == [("traceparent".to_owned(), "00-abc".to_owned())]));
        assert!(outbox.unpublished(100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_broker_outage_leaves_events_unpublished_for_the_next_round() {
        let outbox = VecOutbox::new(3);
        let log = MemoryEventLog::new();
        let config = RelayConfig::new("test");
        log.set_available(false);
        assert!(relay_once(&outbox, &log, &config).await.is_err());
        assert_eq!(outbox.unpublished(100).await.unwrap().len(), 3, "nothing marked while the broker is down");
        log.set_available(true);
        assert_eq!(relay_once(&outbox, &log, &config).await.unwrap(), 3);
    }
}
