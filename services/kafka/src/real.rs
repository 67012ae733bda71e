//! The rdkafka adapters (not built under `--cfg madsim`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::Message as _;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext};
use securepay_ports::{
    ConsumedRecord, EventConsumer, EventLog, OutgoingRecord, PortError, PortResult, TopicPartitionOffset,
};

const COMPONENT: &str = "kafka";

/// How long the producer keeps retrying a record before `publish` fails (`message.timeout.ms`).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Session timeout of a consumer: how long a crashed member holds its partitions. The broker's
/// minimum (`group.min.session.timeout.ms`) by default.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// How often a consumer's client reports its statistics, and so how fresh its exported lag is.
const STATISTICS_INTERVAL: Duration = Duration::from_secs(5);

/// The one mapping of driver errors: every rdkafka failure is the broker being unreachable, slow or
/// refusing for a reason a retry may cure. The driver text is logged, not returned.
fn unavailable(operation: &'static str, error: &KafkaError) -> PortError {
    tracing::warn!(operation, error = %error, "kafka call failed");
    PortError::Unavailable { component: COMPONENT }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// Publishes with an idempotent producer (`enable.idempotence=true`, `acks=all`): a retry inside the
/// producer session never duplicates, and `Ok` means every record is on all in-sync replicas.
#[derive(Clone)]
pub struct KafkaEventLog {
    producer: FutureProducer,
}

impl std::fmt::Debug for KafkaEventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaEventLog").finish_non_exhaustive()
    }
}

impl KafkaEventLog {
    pub fn new(bootstrap_servers: &str) -> PortResult<KafkaEventLog> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", millis(PUBLISH_TIMEOUT))
            .create()
            .map_err(|e| unavailable("create producer", &e))?;
        Ok(KafkaEventLog { producer })
    }

    /// Whether the brokers answer a metadata request within `timeout` (readiness checks).
    pub async fn reachable(&self, timeout: Duration) -> bool {
        use rdkafka::producer::Producer as _;
        let producer = self.producer.clone();
        // The metadata call blocks its thread until the broker answers: off the async workers.
        let answered = tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout).is_ok());
        answered.await.unwrap_or(false)
    }
}

#[async_trait]
impl EventLog for KafkaEventLog {
    async fn publish(&self, records: &[OutgoingRecord]) -> PortResult<()> {
        // Enqueue all, then wait for every acknowledgement: the idempotent producer keeps the
        // enqueue order per partition even with several batches in flight.
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
            for (key, value) in &record.headers {
                headers = headers.insert(Header { key, value: Some(value) });
            }
            let future = FutureRecord::to(&record.topic).key(&record.key).payload(&record.payload).headers(headers);
            let delivery = self.producer.send_result(future).map_err(|(e, _)| unavailable("enqueue", &e))?;
            deliveries.push(delivery);
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(unavailable("publish", &e)),
                Err(_canceled) => return Err(unavailable("publish", &KafkaError::Canceled)),
            }
        }
        Ok(())
    }
}

/// A member of a consumer group: `enable.auto.commit=false`, `auto.offset.reset=earliest` (a group
/// without a committed offset starts at the beginning: nothing published before it joined is
/// skipped). Dropping it leaves the group. Its lag is exported by [`LagReporter`].
pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer<LagReporter>>,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer").finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// Joins `group` subscribed to `topics`. The partitions come with the first polls (group join).
    pub fn new(bootstrap_servers: &str, group: &str, topics: &[&str]) -> PortResult<KafkaConsumer> {
        let consumer: StreamConsumer<LagReporter> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap_servers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", millis(SESSION_TIMEOUT))
            .set("statistics.interval.ms", millis(STATISTICS_INTERVAL))
            .create_with_context(LagReporter::new(group))
            .map_err(|e| unavailable("create consumer", &e))?;
        consumer.subscribe(topics).map_err(|e| unavailable("subscribe", &e))?;
        Ok(KafkaConsumer { consumer: Arc::new(consumer) })
    }
}

/// Exports `securepay_consumer_lag_records{group,topic,partition}` from the statistics librdkafka
/// emits every [`STATISTICS_INTERVAL`]. They are delivered by the consumer's own poll, so the cost is
/// one small JSON decode per interval on the polling thread, and nothing ever waits on the broker.
///
/// Every partition assigned to this member is exported once its watermarks are known (0 when
/// caught up); a partition it no longer holds is set to 0 once, since its new owner reports it. So
/// the series are bounded by the subscribed topics' partitions.
struct LagReporter {
    group: String,
    /// The partitions exported by the last report.
    held: Mutex<BTreeSet<(String, i32)>>,
}

impl LagReporter {
    fn new(group: &str) -> LagReporter {
        LagReporter { group: group.to_string(), held: Mutex::new(BTreeSet::new()) }
    }
}

impl ClientContext for LagReporter {
    fn stats(&self, statistics: Statistics) {
        let mut held = BTreeSet::new();
        for (topic, stats) in &statistics.topics {
            // Partition -1 is librdkafka's internal "unassigned" queue; `desired` = assigned to us.
            for partition in stats.partitions.values().filter(|p| p.partition >= 0 && p.desired) {
                held.insert((topic.clone(), partition.partition));
                if let Some(records) = lag(partition.hi_offset, partition.committed_offset, partition.lo_offset) {
                    securepay_kit::metrics::consumer_lag(&self.group, topic, partition.partition, records);
                }
            }
        }
        let mut previous = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        for (topic, partition) in previous.difference(&held) {
            securepay_kit::metrics::consumer_lag(&self.group, topic, *partition, 0);
        }
        *previous = held;
    }
}

impl ConsumerContext for LagReporter {}

/// Records of a partition the group has not committed past: high watermark − committed offset.
/// Without a commit the group starts at the low watermark (`auto.offset.reset=earliest`), so that
/// counts. `None` while an offset is unknown (librdkafka's negative sentinels): until a fetch has
/// told the client the watermarks.
fn lag(high: i64, committed: i64, low: i64) -> Option<i64> {
    let from = if committed >= 0 { committed } else { low };
    (high >= 0 && from >= 0).then(|| (high - from).max(0))
}

/// A broker record as the port sees it. Never fails: a key or header value that is not UTF-8 is
/// delivered lossily decoded (keys and headers route and trace; they never decide money), so the
/// service still sees the record, and can dead-letter it, instead of the poll dropping it.
fn consumed(message: &BorrowedMessage<'_>) -> ConsumedRecord {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let headers = message
        .headers()
        .map(|borrowed| borrowed.iter().map(|h| (h.key.to_string(), text(h.value.unwrap_or_default()))).collect())
        .unwrap_or_default();
    ConsumedRecord {
        position: TopicPartitionOffset {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
        },
        key: text(message.key().unwrap_or_default()),
        payload: message.payload().unwrap_or_default().to_vec(),
        headers,
    }
}

#[async_trait]
impl EventConsumer for KafkaConsumer {
    async fn poll(&mut self, max_records: usize, wait: Duration) -> PortResult<Vec<ConsumedRecord>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < max_records {
            // After the first record take only what is already fetched: a zero timeout still polls
            // the queue once.
            let remaining = if out.is_empty() {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            } else {
                Duration::ZERO
            };
            match tokio::time::timeout(remaining, self.consumer.recv()).await {
                Err(_elapsed) => break,
                Ok(Ok(message)) => out.push(consumed(&message)),
                // Records already taken from the client's queue are returned, never dropped: the
                // client has moved past them, so losing them here would let a later commit skip them.
                Ok(Err(_)) if !out.is_empty() => break,
                Ok(Err(e)) => return Err(unavailable("poll", &e)),
            }
        }
        Ok(out)
    }

    async fn commit(&mut self, positions: &[TopicPartitionOffset]) -> PortResult<()> {
        if positions.is_empty() {
            return Ok(());
        }
        // One entry per partition, the last position given wins (as in the memory broker).
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for p in positions {
            next.insert((p.topic.as_str(), p.partition), p.offset + 1);
        }
        let mut list = TopicPartitionList::with_capacity(next.len());
        for ((topic, partition), offset) in next {
            list.add_partition_offset(topic, partition, Offset::Offset(offset))
                .map_err(|e| unavailable("commit", &e))?;
        }
        // A synchronous commit blocks its thread until the broker answers: off the async workers.
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync))
            .await
            .map_err(|_| PortError::Unavailable { component: COMPONENT })?
            .map_err(|e| unavailable("commit", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::lag;

    /// librdkafka's "no offset" sentinel (`RD_KAFKA_OFFSET_INVALID`).
    const INVALID: i64 = -1001;

    #[test]
    fn lag_is_the_high_watermark_minus_the_committed_offset() {
        assert_eq!(lag(10, 7, 0), Some(3));
        assert_eq!(lag(10, 10, 0), Some(0), "caught up");
    }

    #[test]
    fn without_a_commit_the_lag_counts_from_the_low_watermark() {
        assert_eq!(lag(10, INVALID, 4), Some(6));
        assert_eq!(lag(0, INVALID, 0), Some(0), "an empty partition is caught up");
    }

    #[test]
    fn unknown_watermarks_report_nothing() {
        assert_eq!(lag(-1, 5, 0), None);
        assert_eq!(lag(10, INVALID, -1), None);
    }

    #[test]
    fn a_commit_ahead_of_a_stale_high_watermark_is_no_lag() {
        assert_eq!(lag(5, 7, 0), Some(0));
    }
}
