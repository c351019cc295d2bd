//! Release signals: how a waiter hears that a key was released.
//!
//! A backend with a native signal (Redis pub/sub, Postgres `NOTIFY`, an etcd watch) keeps one
//! [`ReleaseHub`] and one listening connection. Each waiter is an entry in the hub's map, not
//! a connection: when the backend hears "key released" it calls [`ReleaseHub::notify`].
//!
//! Two ways to be woken. A plain subscription wakes on every release (a semaphore permit or
//! a writer's release may let several waiters in). A subscription that [takes
//! turns](Releases::take_turns) (the client's exclusive-lock waiters) is woken one at a time:
//! a release wakes the oldest waiting one of the key, so one release costs one attempt in
//! this process instead of one per waiter. The turn passes on if its waiter goes away (or
//! is still busy with an earlier wake) without taking the lock.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Releases of the key: what plain subscriptions watch.
    generation: AtomicU64,
    /// Reconnects (releases may have been missed): what every subscription watches.
    resync: AtomicU64,
    /// Wakes plain subscriptions (releases and reconnects).
    notify: Notify,
    /// Wakes turn-takers on a reconnect only: a release wakes one of them through its turn.
    resynced: Notify,
    /// Subscriptions that take turns, oldest first.
    turns: Mutex<VecDeque<Arc<Turn>>>,
}

/// One turn-taking subscription's place in its key's line.
#[derive(Default)]
struct Turn {
    /// A wake was handed to this waiter and `next` has not returned it yet.
    pending: AtomicBool,
    /// `next` returned a wake and the waiter has not come back to wait: it is attempting.
    busy: AtomicBool,
    notify: Notify,
}

impl Slot {
    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
        self.wake_next_turn();
    }

    fn resync(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.resync.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
        self.resynced.notify_waiters();
    }

    /// Hands one wake to the oldest turn-taker that is waiting and not woken already; if
    /// every one is busy attempting, to the oldest busy one: its attempt may have been
    /// answered before this release, so it must try once more when it comes back to wait.
    fn wake_next_turn(&self) {
        let turns = lock(&self.turns);
        let unwoken = |turn: &&Arc<Turn>| !turn.pending.load(Ordering::SeqCst);
        let next = turns
            .iter()
            .filter(unwoken)
            .find(|turn| !turn.busy.load(Ordering::SeqCst))
            .or_else(|| turns.iter().find(unwoken));
        if let Some(turn) = next {
            turn.pending.store(true, Ordering::SeqCst);
            turn.notify.notify_one();
        }
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
                    turn: None,
                    acquired: false,
                }),
            },
            first,
        )
    }

    /// Subscribes to releases of `key`.
    pub fn subscribe(&self, key: &str) -> Releases {
        self.subscribe_tracked(key).0
    }

    /// Signals a release of `key`: wakes every plain subscription of it and the oldest
    /// waiting turn-taker.
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
            slot.resync();
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
    /// The generation (plain) or resync count (turn-taker) last returned.
    seen: u64,
    key: String,
    hub: Weak<HubInner>,
    /// Set by [`Releases::take_turns`].
    turn: Option<Arc<Turn>>,
    /// The waiter took the lock ([`Releases::mark_acquired`]): its turn is not passed on.
    acquired: bool,
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

    /// From now on this subscription is woken one waiter at a time (see the module docs):
    /// for waiters of which only one can get in per release, as an exclusive lock's.
    pub fn take_turns(&mut self) {
        let Inner::Hub(sub) = &mut self.inner else {
            return;
        };
        if sub.turn.is_some() {
            return;
        }
        let turn = Arc::new(Turn::default());
        lock(&sub.slot.turns).push_back(turn.clone());
        sub.seen = sub.slot.resync.load(Ordering::SeqCst);
        sub.turn = Some(turn);
    }

    /// The wake last returned got this waiter the lock: dropping the subscription does not
    /// pass the turn on to another waiter.
    pub fn mark_acquired(&mut self) {
        if let Inner::Hub(sub) = &mut self.inner {
            sub.acquired = true;
        }
    }

    /// Resolves when a release is signalled after the subscription (or after the last
    /// `Released`), or at `until`. A turn-taker resolves on its turn or after a reconnect.
    pub async fn next(&mut self, until: Instant) -> Wake {
        match &mut self.inner {
            Inner::Never => {
                sleep_until(until).await;
                Wake::Deadline
            }
            Inner::Hub(sub) => match sub.turn.clone() {
                Some(turn) => sub.next_turn(&turn, until).await,
                None => sub.next_release(until).await,
            },
        }
    }
}

impl HubSubscription {
    /// A turn-taker's wait: its turn, or a reconnect.
    async fn next_turn(&mut self, turn: &Turn, until: Instant) -> Wake {
        // Back to wait: the attempt after the last wake is over (it did not get in).
        turn.busy.store(false, Ordering::SeqCst);
        let take_turn = || {
            let handed = turn.pending.swap(false, Ordering::SeqCst);
            if handed {
                turn.busy.store(true, Ordering::SeqCst);
            }
            handed
        };
        loop {
            let resynced = self.slot.resynced.notified();
            let my_turn = turn.notify.notified();
            tokio::pin!(resynced, my_turn);
            resynced.as_mut().enable();
            if take_turn() {
                return Wake::Released;
            }
            let resync = self.slot.resync.load(Ordering::SeqCst);
            if resync != self.seen {
                self.seen = resync;
                // Attempting now, like a turn-taker handed a wake: the next release goes to
                // a waiter that is waiting, not to this one (it would hear it only after its
                // attempt, one round trip later).
                turn.busy.store(true, Ordering::SeqCst);
                return Wake::Released;
            }
            tokio::select! {
                _ = &mut resynced => {}
                _ = &mut my_turn => {}
                // A turn handed over just now must not be lost with this return.
                _ = sleep_until(until) => {
                    return if take_turn() { Wake::Released } else { Wake::Deadline };
                }
            }
        }
    }

    /// A plain subscription's wait: any release or reconnect.
    async fn next_release(&mut self, until: Instant) -> Wake {
        loop {
            let notified = self.slot.notify.notified();
            tokio::pin!(notified);
            // Register before reading the generation so a bump in between is not lost.
            notified.as_mut().enable();
            let generation = self.slot.generation.load(Ordering::SeqCst);
            if generation != self.seen {
                self.seen = generation;
                return Wake::Released;
            }
            tokio::select! {
                _ = &mut notified => continue,
                _ = sleep_until(until) => return Wake::Deadline,
            }
        }
    }
}

impl Drop for Releases {
    fn drop(&mut self) {
        let Inner::Hub(sub) = &self.inner else { return };
        if let Some(turn) = &sub.turn {
            let mut turns = lock(&sub.slot.turns);
            turns.retain(|other| !Arc::ptr_eq(other, turn));
            drop(turns);
            // Woken (or attempting) and gone without the lock: the release it was told of
            // is another waiter's to try.
            let owed = turn.pending.load(Ordering::SeqCst) || turn.busy.load(Ordering::SeqCst);
            if owed && !sub.acquired {
                sub.slot.wake_next_turn();
            }
        }
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

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(20)
    }

    fn turn_taker(hub: &ReleaseHub, key: &str) -> Releases {
        let mut sub = hub.subscribe(key);
        sub.take_turns();
        sub
    }

    #[tokio::test]
    async fn a_release_wakes_the_oldest_turn_taker_and_every_plain_subscription() {
        let hub = ReleaseHub::new();
        let mut plain = (hub.subscribe("k"), hub.subscribe("k"));
        let mut first = turn_taker(&hub, "k");
        let mut second = turn_taker(&hub, "k");
        hub.notify("k");
        assert_eq!(plain.0.next(soon()).await, Wake::Released);
        assert_eq!(plain.1.next(soon()).await, Wake::Released);
        assert_eq!(second.next(soon()).await, Wake::Deadline);
        assert_eq!(first.next(soon()).await, Wake::Released);
        // `first` is attempting: the next release is the second waiter's.
        hub.notify("k");
        assert_eq!(second.next(soon()).await, Wake::Released);
        // Both are attempting: the oldest tries again when it comes back to wait.
        hub.notify("k");
        assert_eq!(first.next(soon()).await, Wake::Released);
        assert_eq!(second.next(soon()).await, Wake::Deadline);
    }

    #[tokio::test]
    async fn a_turn_passes_on_when_its_waiter_leaves_without_the_lock() {
        let hub = ReleaseHub::new();
        // Woken, never came to look: gone.
        let first = turn_taker(&hub, "k");
        let mut second = turn_taker(&hub, "k");
        hub.notify("k");
        drop(first);
        assert_eq!(second.next(soon()).await, Wake::Released);
        // Woken, attempting, cancelled before it came back: gone.
        let mut third = turn_taker(&hub, "k");
        assert_eq!(third.next(soon()).await, Wake::Deadline);
        drop(second);
        assert_eq!(third.next(soon()).await, Wake::Released);
        // Woken and took the lock: nobody else is woken.
        let mut fourth = turn_taker(&hub, "k");
        third.mark_acquired();
        drop(third);
        assert_eq!(fourth.next(soon()).await, Wake::Deadline);
    }

    #[tokio::test]
    async fn a_resync_wakes_every_turn_taker() {
        let hub = ReleaseHub::new();
        let mut first = turn_taker(&hub, "k");
        let mut second = turn_taker(&hub, "k");
        hub.notify_all();
        assert_eq!(first.next(soon()).await, Wake::Released);
        assert_eq!(second.next(soon()).await, Wake::Released);
        assert_eq!(first.next(soon()).await, Wake::Deadline);
        drop((first, second));
        assert!(!hub.has_waiters("k"));
    }

    #[tokio::test]
    async fn a_resync_wakes_a_turn_taker_already_waiting() {
        let hub = ReleaseHub::new();
        let mut first = turn_taker(&hub, "k");
        let waiting =
            tokio::spawn(async move { first.next(Instant::now() + Duration::from_secs(5)).await });
        // Give the task time to be parked in `next` before the resync.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let at = Instant::now();
        hub.notify_all();
        let wake = waiting.await.expect("the waiting task");
        assert_eq!(wake, Wake::Released);
        assert!(at.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_release_after_a_resync_goes_to_a_waiter_that_is_waiting() {
        let hub = ReleaseHub::new();
        let mut first = turn_taker(&hub, "k");
        let mut second = turn_taker(&hub, "k");
        hub.notify_all();
        // Both hear the resync; `first` is then attempting, `second` comes back to wait.
        let soon = || Instant::now() + Duration::from_millis(50);
        assert_eq!(first.next(soon()).await, Wake::Released);
        assert_eq!(second.next(soon()).await, Wake::Released);
        let waiting =
            tokio::spawn(async move { second.next(Instant::now() + Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        hub.notify("k");
        assert_eq!(
            waiting.await.expect("the waiting task"),
            Wake::Released,
            "the release went to the turn-taker busy with its attempt"
        );
        drop(first);
    }
}
