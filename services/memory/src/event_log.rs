//! `MemoryEventLog`: a simulated Kafka broker behind the [`EventLog`] port, handing out
//! [`MemoryConsumer`]s that keep the [`EventConsumer`] promises the way a Kafka consumer group does.
//!
//! Model (the part of Kafka the services rely on, and nothing more):
//! - a topic has a fixed number of partitions; a record goes to the partition picked by a stable
//!   FNV-1a hash of its key (never std's `RandomState`: a simulation run must not depend on it), so
//!   records with one key keep their publish order;
//! - a consumer group keeps one committed offset per (topic, partition); a member fetches its
//!   assigned partitions from a fetch position that starts at the committed offset (or 0);
//! - membership change = rebalance: the assignment is recomputed deterministically (partitions in
//!   order, round-robin over members in join order) and every fetch position goes back to the
//!   committed offset, so whatever was delivered but not committed is delivered again
//!   (at-least-once). Dropping a consumer is how it crashes or leaves;
//! - one `std::sync::Mutex`, never held across an `.await`; clones share the broker (the durable
//!   half: a broker created by the simulator survives a service node's kill/restart).
//!
//! Fault hooks for the simulator: [`MemoryEventLog::set_available`] (broker outage: every call is
//! `Unavailable { component: "kafka" }`), [`MemoryEventLog::duplicate_next`] (the next n
//! deliveries are each handed out twice) and [`MemoryEventLog::rebalance`] (a forced rebalance of a
//! group: redelivery of everything uncommitted).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use securepay_ports::{
    ConsumedRecord, EventConsumer, EventLog, OutgoingRecord, PortError, PortResult, TopicPartitionOffset,
};
use tokio::sync::Notify;

/// Partitions of a topic unless [`MemoryEventLog::with_partitions`] says otherwise.
pub const PARTITIONS_DEFAULT: i32 = 3;
/// Most partitions a topic may have.
pub const PARTITIONS_MAX: i32 = 64;
/// Most records one `poll` returns, whatever the caller asks for ("up to" allows fewer).
pub const POLL_RECORDS_MAX: usize = 1024;
/// Most records one `publish` call accepts.
pub const PUBLISH_BATCH_LEN_MAX: usize = 4096;
/// Most records the broker retains over all topics: a run that publishes more is a runaway.
pub const RETAINED_RECORDS_MAX: usize = 1_000_000;

const COMPONENT: &str = "kafka";

/// The simulated broker. Clones share one broker.
#[derive(Debug, Clone)]
pub struct MemoryEventLog {
    broker: Arc<Mutex<Broker>>,
    /// Woken on every publish, commit and rebalance: pollers re-check instead of sleeping.
    changed: Arc<Notify>,
}

#[derive(Debug)]
struct Broker {
    partitions: i32,
    available: bool,
    duplicates_pending: usize,
    /// Topic → partitions → records (offset = index).
    topics: BTreeMap<String, Vec<Vec<Stored>>>,
    groups: BTreeMap<String, Group>,
    retained: usize,
    next_member_id: u64,
}

#[derive(Debug, Clone)]
struct Stored {
    key: String,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
}

type TopicPartition = (String, i32);

#[derive(Debug, Default)]
struct Group {
    committed: BTreeMap<TopicPartition, i64>,
    /// Member id (join order) → subscribed topics.
    members: BTreeMap<u64, Vec<String>>,
    /// Partition → its owner and the next offset to deliver. Cleared on rebalance.
    assignment: BTreeMap<TopicPartition, (u64, i64)>,
}

impl Default for MemoryEventLog {
    fn default() -> MemoryEventLog {
        MemoryEventLog::with_partitions(PARTITIONS_DEFAULT)
    }
}

impl MemoryEventLog {
    pub fn new() -> MemoryEventLog {
        MemoryEventLog::default()
    }

    /// A broker whose topics (created on first use) have `partitions` partitions.
    pub fn with_partitions(partitions: i32) -> MemoryEventLog {
        assert!((1..=PARTITIONS_MAX).contains(&partitions), "partitions {partitions} out of 1..={PARTITIONS_MAX}");
        let broker = Broker {
            partitions,
            available: true,
            duplicates_pending: 0,
            topics: BTreeMap::new(),
            groups: BTreeMap::new(),
            retained: 0,
            next_member_id: 0,
        };
        MemoryEventLog { broker: Arc::new(Mutex::new(broker)), changed: Arc::new(Notify::new()) }
    }

    /// Joins `group` as a new member subscribed to `topics`: a rebalance of the group.
    pub fn consumer(&self, group: &str, topics: &[&str]) -> MemoryConsumer {
        assert!(!topics.is_empty(), "a consumer subscribes to at least one topic");
        let member_id = {
            let mut broker = self.lock();
            let member_id = broker.next_member_id;
            broker.next_member_id += 1;
            let state = broker.groups.entry(group.to_string()).or_default();
            state.members.insert(member_id, topics.iter().map(|t| t.to_string()).collect());
            state.assignment.clear();
            member_id
        };
        self.changed.notify_waiters();
        MemoryConsumer { log: self.clone(), group: group.to_string(), member_id, rotation: 0 }
    }

    /// Broker outage switch: while `false`, every publish, poll and commit is `Unavailable`.
    pub fn set_available(&self, available: bool) {
        self.lock().available = available;
        self.changed.notify_waiters();
    }

    /// The next `n` records delivered (to any group) are each delivered twice in a row.
    pub fn duplicate_next(&self, n: usize) {
        self.lock().duplicates_pending += n;
    }

    /// Forces a rebalance of `group`: every member resumes from the committed offsets.
    pub fn rebalance(&self, group: &str) {
        if let Some(state) = self.lock().groups.get_mut(group) {
            state.assignment.clear();
        }
        self.changed.notify_waiters();
    }

    /// The committed offset (next record to deliver) of a group's partition, if any was committed.
    pub fn committed(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
        let broker = self.lock();
        broker.groups.get(group)?.committed.get(&(topic.to_string(), partition)).copied()
    }

    /// Records retained over all topics.
    pub fn retained(&self) -> usize {
        self.lock().retained
    }

    fn lock(&self) -> MutexGuard<'_, Broker> {
        // A panic under the lock is a broken invariant that already failed the run.
        self.broker.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// FNV-1a, 32 bit: stable across runs, platforms and processes.
fn partition_of(key: &str, partitions: i32) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::try_from(hash % partitions.unsigned_abs()).expect("partition fits i32")
}

impl Broker {
    fn check_available(&self) -> PortResult<()> {
        if self.available { Ok(()) } else { Err(PortError::Unavailable { component: COMPONENT }) }
    }

    fn topic(&mut self, topic: &str) -> &mut Vec<Vec<Stored>> {
        let partitions = usize::try_from(self.partitions).expect("positive");
        self.topics.entry(topic.to_string()).or_insert_with(|| vec![Vec::new(); partitions])
    }

    fn publish(&mut self, records: &[OutgoingRecord]) -> PortResult<()> {
        self.check_available()?;
        assert!(records.len() <= PUBLISH_BATCH_LEN_MAX, "publish of {} records", records.len());
        let partitions = self.partitions;
        for record in records {
            let partition = usize::try_from(partition_of(&record.key, partitions)).expect("non-negative");
            let stored =
                Stored { key: record.key.clone(), payload: record.payload.clone(), headers: record.headers.clone() };
            self.topic(&record.topic)[partition].push(stored);
        }
        self.retained += records.len();
        assert!(self.retained <= RETAINED_RECORDS_MAX, "broker retains {} records", self.retained);
        Ok(())
    }

    /// Recomputes the group's assignment if a rebalance cleared it.
    fn assign(&mut self, group: &str) {
        let partitions = self.partitions;
        let Some(state) = self.groups.get(group) else { return };
        if !state.assignment.is_empty() || state.members.is_empty() {
            return;
        }
        let mut topics: Vec<&String> = state.members.values().flatten().collect();
        topics.sort();
        topics.dedup();
        let mut assignment = BTreeMap::new();
        for topic in topics {
            let subscribers: Vec<u64> =
                state.members.iter().filter(|(_, subscribed)| subscribed.contains(topic)).map(|(id, _)| *id).collect();
            for partition in 0..partitions {
                let owner = subscribers[usize::try_from(partition).expect("non-negative") % subscribers.len()];
                let key = (topic.clone(), partition);
                let next = state.committed.get(&key).copied().unwrap_or(0);
                assignment.insert(key, (owner, next));
            }
        }
        self.groups.get_mut(group).expect("checked above").assignment = assignment;
    }

    fn fetch(&mut self, group: &str, member_id: u64, max_records: usize, rotation: usize) -> Vec<ConsumedRecord> {
        self.assign(group);
        let Some(state) = self.groups.get(group) else { return Vec::new() };
        let mine: Vec<TopicPartition> =
            state.assignment.iter().filter(|(_, (owner, _))| *owner == member_id).map(|(tp, _)| tp.clone()).collect();
        let mut out = Vec::new();
        // Start at a rotating partition so one busy partition cannot starve the others.
        for i in 0..mine.len() {
            let (topic, partition) = &mine[(rotation + i) % mine.len()];
            let key = (topic.clone(), *partition);
            let next = self.groups[group].assignment[&key].1;
            let log = self.topics.get(topic).map(|p| &p[usize::try_from(*partition).expect("non-negative")]);
            let available = log.map_or(&[][..], |records| &records[usize::try_from(next).expect("offset")..]);
            let mut delivered = 0_i64;
            for stored in available {
                if out.len() >= max_records {
                    break;
                }
                let record = ConsumedRecord {
                    position: TopicPartitionOffset {
                        topic: topic.clone(),
                        partition: *partition,
                        offset: next + delivered,
                    },
                    key: stored.key.clone(),
                    payload: stored.payload.clone(),
                    headers: stored.headers.clone(),
                };
                if self.duplicates_pending > 0 && out.len() + 1 < max_records {
                    self.duplicates_pending -= 1;
                    out.push(record.clone());
                }
                out.push(record);
                delivered += 1;
            }
            self.groups.get_mut(group).expect("exists").assignment.get_mut(&key).expect("assigned").1 += delivered;
        }
        out
    }

    fn commit(&mut self, group: &str, positions: &[TopicPartitionOffset]) -> PortResult<()> {
        self.check_available()?;
        let state = self.groups.entry(group.to_string()).or_default();
        for position in positions {
            assert!(position.offset >= 0, "commit of a negative offset {position:?}");
            state.committed.insert((position.topic.clone(), position.partition), position.offset + 1);
        }
        Ok(())
    }
}

#[async_trait]
impl EventLog for MemoryEventLog {
    async fn publish(&self, records: &[OutgoingRecord]) -> PortResult<()> {
        self.lock().publish(records)?;
        self.changed.notify_waiters();
        Ok(())
    }
}

/// A member of a consumer group on a [`MemoryEventLog`]. Dropping it leaves the group (a crash):
/// the group rebalances and its partitions resume from the committed offsets.
#[derive(Debug)]
pub struct MemoryConsumer {
    log: MemoryEventLog,
    group: String,
    member_id: u64,
    rotation: usize,
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        if let Some(state) = self.log.lock().groups.get_mut(&self.group) {
            state.members.remove(&self.member_id);
            state.assignment.clear();
        }
        self.log.changed.notify_waiters();
    }
}

#[async_trait]
impl EventConsumer for MemoryConsumer {
    async fn poll(&mut self, max_records: usize, wait: Duration) -> PortResult<Vec<ConsumedRecord>> {
        let max_records = max_records.min(POLL_RECORDS_MAX);
        let deadline = tokio::time::Instant::now() + wait;
        let changed = Arc::clone(&self.log.changed);
        loop {
            // Registered before looking, so a publish between the look and the wait still wakes us.
            let notified = changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            {
                let mut broker = self.log.lock();
                broker.check_available()?;
                let records = broker.fetch(&self.group, self.member_id, max_records, self.rotation);
                if !records.is_empty() || max_records == 0 {
                    self.rotation = self.rotation.wrapping_add(1);
                    return Ok(records);
                }
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() || tokio::time::timeout(remaining, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn commit(&mut self, positions: &[TopicPartitionOffset]) -> PortResult<()> {
        self.log.lock().commit(&self.group, positions)?;
        self.log.changed.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_of_a_key_is_stable_and_in_range() {
        assert_eq!(partition_of("payment-1", 3), partition_of("payment-1", 3));
        // FNV-1a of the empty key is the offset basis.
        assert_eq!(partition_of("", 3), i32::try_from(0x811c_9dc5_u32 % 3).unwrap());
        assert!((0..200).all(|i| (0..7).contains(&partition_of(&format!("k{i}"), 7))));
    }

    #[tokio::test]
    async fn an_outage_makes_every_call_unavailable_until_healed() {
        let log = MemoryEventLog::new();
        let mut consumer = log.consumer("g", &["t"]);
        let record = OutgoingRecord { topic: "t".into(), key: "k".into(), payload: vec![1], headers: vec![] };
        log.set_available(false);
        let down = PortError::Unavailable { component: "kafka" };
        assert_eq!(log.publish(std::slice::from_ref(&record)).await, Err(down.clone()));
        assert_eq!(consumer.poll(10, Duration::from_millis(1)).await, Err(down.clone()));
        assert_eq!(consumer.commit(&[]).await, Err(down));
        log.set_available(true);
        log.publish(&[record]).await.unwrap();
        assert_eq!(consumer.poll(10, Duration::from_millis(1)).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn duplicate_next_delivers_the_next_records_twice() {
        let log = MemoryEventLog::new();
        let mut consumer = log.consumer("g", &["t"]);
        let records: Vec<_> = (0..3)
            .map(|i| OutgoingRecord { topic: "t".into(), key: "k".into(), payload: vec![i], headers: vec![] })
            .collect();
        log.publish(&records).await.unwrap();
        log.duplicate_next(2);
        let payloads: Vec<u8> =
            consumer.poll(10, Duration::from_millis(1)).await.unwrap().into_iter().map(|r| r.payload[0]).collect();
        assert_eq!(payloads, [0, 0, 1, 1, 2]);
    }

    #[tokio::test]
    async fn a_forced_rebalance_redelivers_what_was_not_committed() {
        let log = MemoryEventLog::new();
        let mut consumer = log.consumer("g", &["t"]);
        let records: Vec<_> = (0..4)
            .map(|i| OutgoingRecord { topic: "t".into(), key: "k".into(), payload: vec![i], headers: vec![] })
            .collect();
        log.publish(&records).await.unwrap();
        let first = consumer.poll(10, Duration::from_millis(1)).await.unwrap();
        consumer.commit(&[first[1].position.clone()]).await.unwrap();
        log.rebalance("g");
        let again: Vec<u8> =
            consumer.poll(10, Duration::from_millis(1)).await.unwrap().into_iter().map(|r| r.payload[0]).collect();
        assert_eq!(again, [2, 3]);
    }

    #[tokio::test]
    async fn members_of_one_group_split_the_partitions_and_a_leaver_s_partitions_resume_from_the_commit() {
        let log = MemoryEventLog::with_partitions(3);
        let records: Vec<_> = (0..30)
            .map(|i| OutgoingRecord { topic: "t".into(), key: format!("k{i}"), payload: vec![i], headers: vec![] })
            .collect();
        log.publish(&records).await.unwrap();
        let mut first = log.consumer("g", &["t"]);
        let mut second = log.consumer("g", &["t"]);
        let partitions = |records: &[ConsumedRecord]| {
            let mut p: Vec<i32> = records.iter().map(|r| r.position.partition).collect();
            p.sort();
            p.dedup();
            p
        };
        let by_first = first.poll(100, Duration::from_millis(1)).await.unwrap();
        let by_second = second.poll(100, Duration::from_millis(1)).await.unwrap();
        // Partitions round-robin over members in join order.
        assert_eq!((partitions(&by_first), partitions(&by_second)), (vec![0, 2], vec![1]));
        assert_eq!(by_first.len() + by_second.len(), 30);

        first.commit(&[by_first.iter().find(|r| r.position.partition == 0).unwrap().position.clone()]).await.unwrap();
        drop(first);
        let after = second.poll(100, Duration::from_millis(1)).await.unwrap();
        let expected = by_first.len() - 1 + by_second.len();
        assert_eq!(after.len(), expected, "all but the one committed record come again");
        assert_eq!(log.committed("g", "t", 0), Some(by_first[0].position.offset + 1));
    }
}
