//! The outbox table both twins keep (the ledger's outcome events, the payments' initiated events):
//! rows only ever appended, an event's sequence its position + 1, a `published` flag per row.
//!
//! The relay reads it many times per simulated second, so reads start at the first row that may
//! still be unpublished (a cursor derived from the rows, advanced as rows are marked) instead of
//! at row 1: a read costs what is unpublished, not the whole history.

use securepay_ports::OutboxEvent;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OutboxRows {
    rows: Vec<Row>,
    /// Every row before this index is published.
    unpublished_from: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    event: OutboxEvent,
    published: bool,
}

impl OutboxRows {
    /// The sequence the next appended event must carry.
    pub(crate) fn next_sequence(&self) -> i64 {
        i64::try_from(self.rows.len() + 1).expect("outbox length fits i64")
    }

    /// Appends `event` (its `sequence` must be [`OutboxRows::next_sequence`]).
    pub(crate) fn push(&mut self, event: OutboxEvent) {
        debug_assert_eq!(event.sequence, self.next_sequence(), "outbox sequences are positions + 1");
        self.rows.push(Row { event, published: false });
    }

    /// Every event, published or not, in sequence order.
    pub(crate) fn events(&self) -> impl Iterator<Item = &OutboxEvent> {
        self.rows.iter().map(|row| &row.event)
    }

    /// The first `limit` unpublished events, in sequence order.
    pub(crate) fn unpublished(&self, limit: usize) -> Vec<OutboxEvent> {
        let rows = &self.rows[self.unpublished_from..];
        rows.iter().filter(|row| !row.published).take(limit).map(|row| row.event.clone()).collect()
    }

    /// Marks the events of `sequences` published (unknown sequences are ignored, as an `UPDATE`
    /// matching no row).
    pub(crate) fn mark_published(&mut self, sequences: &[i64]) {
        for &sequence in sequences {
            let index = usize::try_from(sequence - 1).ok();
            if let Some(row) = index.and_then(|i| self.rows.get_mut(i)) {
                row.published = true;
            }
        }
        while self.rows.get(self.unpublished_from).is_some_and(|row| row.published) {
            self.unpublished_from += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: i64) -> OutboxEvent {
        OutboxEvent { sequence, topic: "t".into(), key: sequence.to_string(), payload: vec![], headers: vec![] }
    }

    #[test]
    fn reads_skip_what_is_published_in_any_order() {
        let mut rows = OutboxRows::default();
        for _ in 0..5 {
            rows.push(event(rows.next_sequence()));
        }
        rows.mark_published(&[2, 4, 99, 0, -1]);
        let left: Vec<i64> = rows.unpublished(10).iter().map(|e| e.sequence).collect();
        assert_eq!(left, [1, 3, 5]);
        rows.mark_published(&[1]);
        assert_eq!(rows.unpublished_from, 2, "the cursor stops at the first unpublished row");
        assert_eq!(rows.unpublished(1).iter().map(|e| e.sequence).collect::<Vec<_>>(), [3]);
        rows.mark_published(&[3, 5]);
        assert!(rows.unpublished(10).is_empty());
        assert_eq!(rows.events().count(), 5);
    }
}
