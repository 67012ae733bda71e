//! `MemoryNotificationStore`: the [`NotificationStore`] twin of `PgNotificationStore`, with an
//! outage switch.
//!
//! Keeps the same promises: one notification per event id (the first write wins, later ones are
//! `Duplicate` and write nothing), `recorded_at` kept to the microsecond, a payment's notifications
//! listed in recording order. One `std::sync::Mutex`, never held across an `.await`, so a `record`
//! (and a `record_batch`: the whole batch under one lock, checked before anything is written) is
//! atomic. While switched off ([`MemoryNotificationStore::set_available`]) every call fails as
//! `Unavailable { component: "postgresql" }` and the data survives (the database came back).
//! Clones share state (see the crate docs on crash semantics).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use securepay_core::ids::{EventId, PaymentId};
use securepay_ports::notifications::{
    LIST_LEN_MAX, RECORD_BATCH_LEN_MAX, check_notification, first_of_event_in_batch, truncate_to_micros,
};
use securepay_ports::{Notification, NotificationStore, PortError, PortResult, Recorded};

/// The in-memory notification store. Clones share one state.
#[derive(Debug, Clone)]
pub struct MemoryNotificationStore {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    available: bool,
    /// Recording order: a notification's position is its recording sequence.
    notifications: Vec<Notification>,
    events: BTreeSet<EventId>,
}

impl Default for MemoryNotificationStore {
    fn default() -> MemoryNotificationStore {
        let state = State { available: true, notifications: Vec::new(), events: BTreeSet::new() };
        MemoryNotificationStore { state: Arc::new(Mutex::new(state)) }
    }
}

impl State {
    /// Records `n` (already checked) unless its event id is known.
    fn record(&mut self, n: &Notification) -> Recorded {
        if !self.events.insert(n.event_id) {
            return Recorded::Duplicate;
        }
        self.notifications.push(Notification { recorded_at: truncate_to_micros(n.recorded_at), ..n.clone() });
        Recorded::New
    }
}

impl MemoryNotificationStore {
    /// An empty, available store.
    pub fn new() -> MemoryNotificationStore {
        MemoryNotificationStore::default()
    }

    /// Outage injection: while `false`, every call fails as `Unavailable`.
    pub fn set_available(&self, available: bool) {
        self.lock().available = available;
    }

    /// Every recorded notification in recording order (for invariant checks).
    pub fn all(&self) -> Vec<Notification> {
        self.lock().notifications.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied write: every write is one push.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state, if the store is up.
    fn up(&self) -> PortResult<MutexGuard<'_, State>> {
        let state = self.lock();
        if state.available { Ok(state) } else { Err(PortError::Unavailable { component: "postgresql" }) }
    }
}

#[async_trait]
impl NotificationStore for MemoryNotificationStore {
    async fn record(&self, notification: &Notification) -> PortResult<Recorded> {
        check_notification(notification)?;
        Ok(self.up()?.record(notification))
    }

    async fn record_batch(&self, batch: &[Notification]) -> PortResult<Vec<Recorded>> {
        if batch.len() > RECORD_BATCH_LEN_MAX {
            return Err(PortError::Refused { rule: "notifications_batch_len_max" });
        }
        // Every rule first: a refused notification leaves nothing of its batch behind.
        batch.iter().try_for_each(check_notification)?;
        let mut state = self.up()?;
        let first = first_of_event_in_batch(batch);
        Ok(batch
            .iter()
            .zip(first)
            .map(|(n, first)| if first { state.record(n) } else { Recorded::Duplicate })
            .collect())
    }

    async fn for_payment(&self, payment: PaymentId, limit: usize) -> PortResult<Vec<Notification>> {
        if limit > LIST_LEN_MAX {
            return Err(PortError::Refused { rule: "notifications_list_len_max" });
        }
        let state = self.up()?;
        Ok(state.notifications.iter().filter(|n| n.payment_id == payment).take(limit).cloned().collect())
    }
}
