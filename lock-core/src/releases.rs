//! Release signals: how a waiter hears that a key was released.
//!
//! A backend with a native signal (Redis pub/sub, Postgres `NOTIFY`, an etcd watch) keeps one
//! [`ReleaseHub`] and one listening connection. Each waiter is an entry in the hub's map, not
//! a connection: when the backend hears "key released" it calls [`ReleaseHub::notify`], and
//! every [`Releases`] subscribed to that key wakes.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};

/// Why [`Releases::next`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A release of the key was signalled (or may have been missed, e.g. after a reconnect):
    /// try again now.
    Released,
    /// The deadline passed without a signal.
    Deadline,
}

#[derive(Default)]
struct Slot {
    generation: AtomicU64,
    notify: Notify,
}

impl Slot {
    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

type IdleHook = Box<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
struct HubInner {
    // key -> (slot, number of live subscriptions)
    slots: Mutex<HashMap<String, (Arc<Slot>, usize)>>,
    on_idle: Option<IdleHook>,
}

/// A map from key to the waiters subscribed to it. Cheap to clone (shared state).
#[derive(Clone, Default)]
pub struct ReleaseHub {
    inner: Arc<HubInner>,
}

impl fmt::Debug for ReleaseHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseHub")
            .field("keys", &self.subscribed_keys().len())
            .finish()
    }
}

impl ReleaseHub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty hub that calls `on_idle(key)` when the last subscription of a key is dropped
    /// (e.g. to `UNSUBSCRIBE` a per-key channel).
    pub fn with_idle_hook(on_idle: impl Fn(&str) + Send + Sync + 'static) -> Self {
        ReleaseHub {
            inner: Arc::new(HubInner {
                slots: Mutex::default(),
                on_idle: Some(Box::new(on_idle)),
            }),
        }
    }

    /// Subscribes to releases of `key`. The second value is true when this is the key's first
    /// live subscription (a backend with per-key channels subscribes on the server then).
    pub fn subscribe_tracked(&self, key: &str) -> (Releases, bool) {
        let mut slots = lock(&self.inner.slots);
        let entry = slots
            .entry(key.to_owned())
            .or_insert_with(|| (Arc::new(Slot::default()), 0));
        entry.1 += 1;
        let first = entry.1 == 1;
        let slot = entry.0.clone();
        let seen = slot.generation.load(Ordering::SeqCst);
        drop(slots);
        (
            Releases {
                inner: Inner::Hub(HubSubscription {
                    slot,
                    seen,
                    key: key.to_owned(),
                    hub: Arc::downgrade(&self.inner),
                }),
            },
            first,
        )
    }

    /// Subscribes to releases of `key`.
    pub fn subscribe(&self, key: &str) -> Releases {
        self.subscribe_tracked(key).0
    }

    /// Wakes every waiter of `key`.
    pub fn notify(&self, key: &str) {
        let slot = lock(&self.inner.slots)
            .get(key)
            .map(|(slot, _)| slot.clone());
        if let Some(slot) = slot {
            slot.bump();
        }
    }

    /// Wakes every waiter of every key: after a reconnect, when releases may have been missed.
    pub fn notify_all(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.inner.slots)
            .values()
            .map(|(slot, _)| slot.clone())
            .collect();
        for slot in slots {
            slot.bump();
        }
    }

    /// Keys that have at least one live subscription (to re-subscribe after a reconnect).
    pub fn subscribed_keys(&self) -> Vec<String> {
        lock(&self.inner.slots).keys().cloned().collect()
    }

    /// Whether `key` has a live subscription.
    pub fn has_waiters(&self, key: &str) -> bool {
        lock(&self.inner.slots).contains_key(key)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent (each operation is
    // a single insert/remove), so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct HubSubscription {
    slot: Arc<Slot>,
    seen: u64,
    key: String,
    hub: Weak<HubInner>,
}

enum Inner {
    Never,
    Hub(HubSubscription),
}

/// A subscription to releases of one key. Dropping it unsubscribes.
pub struct Releases {
    inner: Inner,
}

impl fmt::Debug for Releases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Never => f.write_str("Releases::never"),
            Inner::Hub(sub) => write!(f, "Releases({:?})", sub.key),
        }
    }
}

impl Releases {
    /// A subscription that never signals: `next` just sleeps until its deadline.
    pub fn never() -> Self {
        Releases {
            inner: Inner::Never,
        }
    }

    /// Resolves when a release is signalled after the subscription (or after the last
    /// `Released`), or at `until`.
    pub async fn next(&mut self, until: Instant) -> Wake {
        match &mut self.inner {
            Inner::Never => {
                sleep_until(until).await;
                Wake::Deadline
            }
            Inner::Hub(sub) => loop {
                let notified = sub.slot.notify.notified();
                tokio::pin!(notified);
                // Register before reading the generation so a bump in between is not lost.
                notified.as_mut().enable();
                let generation = sub.slot.generation.load(Ordering::SeqCst);
                if generation != sub.seen {
                    sub.seen = generation;
                    return Wake::Released;
                }
                tokio::select! {
                    _ = &mut notified => continue,
                    _ = sleep_until(until) => return Wake::Deadline,
                }
            },
        }
    }
}

impl Drop for Releases {
    fn drop(&mut self) {
        let Inner::Hub(sub) = &self.inner else { return };
        let Some(hub) = sub.hub.upgrade() else { return };
        let idle = {
            let mut slots = lock(&hub.slots);
            match slots.get_mut(&sub.key) {
                Some(entry) if entry.1 <= 1 => {
                    slots.remove(&sub.key);
                    true
                }
                Some(entry) => {
                    entry.1 -= 1;
                    false
                }
                None => false,
            }
        };
        if idle && let Some(hook) = &hub.on_idle {
            hook(&sub.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn signal_between_subscribe_and_wait_is_kept() {
        let hub = ReleaseHub::new();
        let mut sub = hub.subscribe("k");
        hub.notify("k");
        let wake = sub.next(Instant::now() + Duration::from_secs(5)).await;
        assert_eq!(wake, Wake::Released);
        let wake = sub.next(Instant::now() + Duration::from_millis(10)).await;
        assert_eq!(wake, Wake::Deadline);
    }

    #[tokio::test]
    async fn other_keys_do_not_wake_and_drop_cleans_up() {
        let hub = ReleaseHub::new();
        let mut sub = hub.subscribe("a");
        hub.notify("ab");
        let wake = sub.next(Instant::now() + Duration::from_millis(10)).await;
        assert_eq!(wake, Wake::Deadline);
        assert!(hub.has_waiters("a"));
        drop(sub);
        assert!(!hub.has_waiters("a"));
    }
}
