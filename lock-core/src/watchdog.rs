//! Keeps held leases alive and fires their lost signal when it cannot.
//!
//! One watchdog per [`crate::Locker`] (shared by its clones): a queue of guards ordered by when
//! each next needs attention, and one lazily spawned task that sleeps until the earliest of
//! them. Acquiring only inserts into the queue — it wakes the task only when the new entry is
//! due before the task's planned wake-up — and releasing only removes, so the lock path pays
//! no task spawn and, in steady state, no cross-thread wake-up. Each due renewal runs in its
//! own short task, so one hung renewal never delays another lease.
//!
//! A `Locker` may be used from several runtimes (a backend outlives the runtime that connected
//! it), so the watchdog is tied to none of them: every runtime that queues a guard gets its own
//! task, all serving the one queue. When a runtime shuts down, its task and the renewals in
//! flight on it are dropped; a dropped renewal puts its guard back in the queue, due now, and
//! wakes the tasks left, so every live guard is still renewed (or told it is lost) as long as
//! any runtime that used this `Locker` runs; when none does, a task on the process's
//! background runtime takes over (as it does beside a current-thread runtime for a guard whose
//! lost token was taken: plain code may check it while that runtime is not driven).

use crate::guard::GuardState;
use crate::telemetry;
use crate::{Lease, LockBackend};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::runtime::{self, Handle};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout_at};

/// How long before the validity deadline the lost signal fires when renewal has not been
/// confirmed: 5% of the TTL, between 2 ms and 250 ms. It leaves the holder time to stop
/// before the server may grant the lock to someone else.
pub fn lost_margin(ttl: Duration) -> Duration {
    (ttl / 20).clamp(Duration::from_millis(2), Duration::from_millis(250))
}

/// When the lost signal fires for `lease` unless a renewal is confirmed first.
pub(crate) fn lost_deadline(lease: &Lease) -> Instant {
    let margin = lost_margin(lease.ttl());
    lease
        .valid_until()
        .checked_sub(margin)
        .unwrap_or_else(|| lease.valid_until())
}

/// One guard under watch.
#[derive(Debug)]
pub(crate) struct Watched {
    pub(crate) backend: Arc<dyn LockBackend>,
    pub(crate) guard: Arc<GuardState>,
    /// The TTL asked for on each renewal.
    pub(crate) ttl: Duration,
    pub(crate) auto_renew: bool,
    /// Where this guard sits in the queue, while it is queued.
    slot: Mutex<Option<QueueKey>>,
}

impl Watched {
    /// Fires the guard's lost signal, counting the loss once under `reason` (a metric label).
    fn lose(&self, reason: &'static str, message: String) {
        if self.guard.fire_lost(message) {
            telemetry::loss(self.backend.name(), reason);
        }
    }
}

type QueueKey = (Instant, u64);

/// A guard in the queue.
#[derive(Debug)]
struct Entry {
    watched: Arc<Watched>,
    /// Left at the guard's lost deadline while a task attends it. The attending task may
    /// stop being driven mid-renewal (a current-thread runtime whose `block_on` returned):
    /// the task of any runtime then still takes the guard by its deadline and tells it.
    backstop: bool,
}

#[derive(Debug, Default)]
struct State {
    queue: BTreeMap<QueueKey, Entry>,
    next_seq: u64,
    /// When the task plans to wake next (`None`: only on notification).
    planned_wake: Option<Instant>,
    /// Whether a guard was queued since the task last looked (see [`IDLE_TICK`]).
    queued_since_wake: bool,
    /// How many times the task has looked at the queue (for tests: it must not be woken per
    /// acquire).
    looks: u64,
    /// One task per runtime that has queued a guard, each woken through its own `Notify`
    /// (see [`Watchdog::schedule`]).
    tasks: HashMap<runtime::Id, Task>,
    /// Whether the suspension watch knows this watchdog (see [`crate::suspend`]).
    watching_suspension: bool,
    /// Runtimes built without timers: their guards are watched from the background runtime.
    untimed: HashSet<runtime::Id>,
    /// How many host suspensions had been found when the task last looked.
    suspensions_seen: u64,
}

impl State {
    /// Queues `watched` at `due` (the caller records the key in its slot).
    fn insert(&mut self, watched: &Arc<Watched>, due: Instant, backstop: bool) -> QueueKey {
        let key = (due, self.next_seq);
        self.next_seq += 1;
        let watched = watched.clone();
        self.queue.insert(key, Entry { watched, backstop });
        key
    }

    /// Wakes every runtime's task (one between two looks keeps a permit).
    fn wake_tasks(&self) {
        for task in self.tasks.values() {
            task.wake.notify_one();
        }
    }
}

/// How long the task keeps a planned wake-up when its queue runs empty while guards keep
/// coming. Without it, a lock taken and released between two looks at the queue leaves no
/// planned wake-up behind, so the next acquire had to wake the task again: one wake-up (and
/// poll) per acquire in a busy loop. With it, a guard due later than the tick wakes nobody;
/// a queue that stays empty for a whole tick lets the task sleep untimed again.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Longest a renewal is sent before it is due so that it goes out with others (see
/// [`renew_ahead`]).
const MAX_RENEW_AHEAD: Duration = Duration::from_secs(1);

/// How early a guard's renewal may go out to join the renewals due now: a tenth of its
/// renewal period (TTL/30), at most [`MAX_RENEW_AHEAD`]. Renewals of locks taken one after
/// another fall due one at a time; gathered, they leave together (one wake-up of the
/// watchdog, and a backend can send them in one round trip: a Redis pipeline, one statement
/// per PostgreSQL session, one etcd txn), for about 10 % more renewals. Renewing early is
/// always safe: the lease only gets longer.
fn renew_ahead(watched: &Watched) -> Duration {
    (watched.ttl / 30).min(MAX_RENEW_AHEAD)
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Woken when a host suspension is found: renewals in flight and retry pauses, timed on
    /// the clock that stood still, look again at once.
    suspended: Notify,
}

impl Drop for Shared {
    /// The `Locker` and its guards are gone: the tasks, which may wait for a wake-up with no
    /// timer, look once more and end.
    fn drop(&mut self) {
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.wake_tasks();
    }
}

impl crate::suspend::SuspensionWake for Shared {
    /// Every queued guard was sent before the suspension: the tasks look at once.
    fn woken_by_suspension(&self) {
        let mut state = lock(&self.state);
        state.planned_wake = None;
        state.wake_tasks();
        drop(state);
        self.suspended.notify_waiters();
    }
}

/// A runtime's watchdog task and its wake-up.
#[derive(Debug)]
struct Task {
    handle: JoinHandle<()>,
    wake: Arc<Notify>,
}

/// The per-`Locker` watchdog. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Watchdog {
    /// Starts watching a freshly acquired guard.
    pub(crate) fn watch(
        &self,
        backend: Arc<dyn LockBackend>,
        guard: Arc<GuardState>,
        ttl: Duration,
        auto_renew: bool,
    ) -> Arc<Watched> {
        let watched = Arc::new(Watched {
            backend,
            guard,
            ttl,
            auto_renew,
            slot: Mutex::new(None),
        });
        let due = watched.guard.with_lease(|lease| next_due(&watched, lease));
        self.schedule(&watched, due);
        watched
    }

    /// Stops watching (release or drop). Cheap: no wake-up.
    pub(crate) fn unwatch(&self, watched: &Watched) {
        watched.guard.stop();
        let mut state = lock(&self.shared.state);
        if let Some(key) = lock(&watched.slot).take() {
            state.queue.remove(&key);
        }
    }

    fn schedule(&self, watched: &Arc<Watched>, due: Instant) {
        let mut state = lock(&self.shared.state);
        if watched.guard.is_stopped() {
            return;
        }
        // Registered after our lock is dropped: finding a suspension wakes watchdogs, which
        // takes their locks.
        let register = !state.watching_suspension;
        if register {
            state.watching_suspension = true;
            state.suspensions_seen = crate::suspend::suspensions();
        }
        let key = state.insert(watched, due, false);
        state.queued_since_wake = true;
        // Replaces a backstop left while the guard was attended (see [`Entry::backstop`]).
        if let Some(old) = lock(&watched.slot).replace(key) {
            state.queue.remove(&old);
        }
        if state.planned_wake.is_none_or(|planned| due < planned) {
            state.planned_wake = Some(due);
            // Every runtime's task, each through its own `Notify` (a waiting task is woken, one
            // between two looks keeps a permit). One `Notify` shared by all woke only its oldest
            // waiter, which may be the task of a runtime that is alive but no longer driven (a
            // current-thread runtime after its `block_on` returned): the task that runs slept
            // on, and this guard was neither renewed nor told it was lost.
            state.wake_tasks();
        }
        self.ensure_task(&mut state);
        drop(state);
        if register {
            let shared: Arc<dyn crate::suspend::SuspensionWake> = self.shared.clone();
            crate::suspend::watch_for_suspension(Arc::downgrade(&shared));
        }
    }

    /// A task on the current runtime, if it has none (or its task ended with an earlier
    /// shutdown of a runtime that had the same id). Outside any Tokio runtime (another
    /// executor), or on one built without timers, where the task could not sleep, the task
    /// runs on the process's background runtime instead: a guard is watched wherever it was
    /// acquired.
    fn ensure_task(&self, state: &mut State) {
        if let Some(runtime) = task_runtime(state) {
            self.ensure_task_on(state, &runtime);
        }
    }

    /// A task on `runtime`, if it has none (or its task ended with an earlier shutdown of a
    /// runtime that had the same id).
    fn ensure_task_on(&self, state: &mut State, runtime: &Handle) {
        let id = runtime.id();
        if state
            .tasks
            .get(&id)
            .is_none_or(|task| task.handle.is_finished())
        {
            state.tasks.retain(|_, task| !task.handle.is_finished());
            let wake = Arc::new(Notify::new());
            // Made before the spawn: a task dropped unpolled (its runtime shutting down) must
            // still hand its work on.
            let on_drop = HandOnWhenDropped {
                watchdog: Arc::downgrade(&self.shared),
                runtime: id,
            };
            let watchdog = Arc::downgrade(&self.shared);
            let task_wake = wake.clone();
            // A runtime that is shutting down drops the task inside `spawn`, on this thread,
            // while we hold the state lock: its hand-on must not take the lock (see below).
            SPAWNING.set(true);
            let handle = runtime.spawn(async move {
                let _on_drop = on_drop;
                run(watchdog, task_wake).await;
            });
            SPAWNING.set(false);
            if !handle.is_finished() {
                state.tasks.insert(id, Task { handle, wake });
                return;
            }
            // The runtime is shutting down (a guard put back by a renewal it dropped).
            self.hand_to_background_if_orphaned(state, id);
        }
    }

    /// When guards are queued and no runtime but `leaving` has a live task, starts one on
    /// the background runtime: `leaving` is shutting down, and nobody else would attend them.
    fn hand_to_background_if_orphaned(&self, state: &mut State, leaving: runtime::Id) {
        let orphaned = !state.queue.is_empty()
            && !state
                .tasks
                .iter()
                .any(|(id, task)| *id != leaving && !task.handle.is_finished());
        if orphaned
            && let Some(background) = crate::detached::background_runtime()
            && background.id() != leaving
        {
            state.tasks.remove(&leaving);
            self.ensure_task_on(state, background);
        }
    }

    /// Makes sure the runtime the caller runs on has a watchdog task, woken now when it is
    /// new. Called by whoever waits for a guard's lost signal: the guard may have come from
    /// a runtime that is alive but no longer driven (a current-thread runtime after its
    /// `block_on` returned), whose task would renew it and fire the signal never; the task
    /// here does both.
    pub(crate) fn attend_from_current_runtime(&self) {
        let mut state = lock(&self.shared.state);
        // The new task (if one is needed) looks at the whole queue when it starts.
        self.ensure_task(&mut state);
    }

    /// [`Self::attend_from_current_runtime`], and, called on a current-thread runtime (or
    /// outside Tokio), a task on the background runtime too: for a lost token, which plain
    /// code may check while no runtime is driven at all (a sync wrapper that keeps its
    /// current-thread runtime between calls). The task of that runtime would not run then:
    /// the guard was neither renewed nor told it was lost. A multi-thread runtime's workers
    /// drive it whatever the caller does (and its shutdown hands the guards on, see
    /// [`HandOnWhenDropped`]), so async callers there pay for no second task.
    pub(crate) fn attend_from_anywhere(&self) {
        let background = crate::detached::background_if_undriven();
        let mut state = lock(&self.shared.state);
        self.ensure_task(&mut state);
        if let Some(background) = background {
            self.ensure_task_on(&mut state, background);
        }
    }

    /// Takes the guard's entry (a backstop) out of the queue: it was told it is lost.
    fn unqueue(&self, watched: &Watched) {
        let mut state = lock(&self.shared.state);
        if let Some(key) = lock(&watched.slot).take() {
            state.queue.remove(&key);
        }
    }

    /// Wakes every task now (not one): used when a runtime stops, so that a task on another
    /// runtime looks at the queue even if the one a single wake-up would reach is gone.
    fn wake_all(&self) {
        let mut state = lock(&self.shared.state);
        state.planned_wake = None;
        state.wake_tasks();
    }

    /// Puts back a guard whose attendance was dropped unfinished (its runtime stopped), due
    /// now, for a task on another runtime.
    fn rescue(&self, watched: &Arc<Watched>) {
        if watched.guard.is_stopped() {
            return;
        }
        self.schedule(watched, Instant::now());
        self.wake_all();
    }

    /// How many times the task has looked at the queue so far.
    #[cfg(test)]
    pub(crate) fn looks(&self) -> u64 {
        lock(&self.shared.state).looks
    }

    fn take_due(&self) -> (Vec<Arc<Watched>>, Option<Instant>) {
        let mut state = lock(&self.shared.state);
        state.looks += 1;
        let now = Instant::now();
        let mut due = Vec::new();
        // After a host suspension every queued lease may have run out on the server: all are
        // attended now (each is found void and told it is lost, or renewed if it was sent
        // after the suspension).
        let suspensions = crate::suspend::suspensions();
        let take_all = suspensions != state.suspensions_seen;
        state.suspensions_seen = suspensions;
        let mut taken = Vec::new();
        while let Some(entry) = state.queue.first_entry() {
            let (due_at, queued) = (entry.key().0, entry.get());
            // Past due, or a renewal close enough to go with the ones past due. Only
            // renewals: a deadline (auto-renew off) or a backstop is never taken early.
            let gathered = !taken.is_empty()
                && !queued.backstop
                && queued.watched.auto_renew
                && due_at <= now + renew_ahead(&queued.watched);
            if !take_all && due_at > now && !gathered {
                break;
            }
            taken.push(entry.remove().watched);
        }
        for watched in taken {
            let mut slot = lock(&watched.slot);
            *slot = None;
            let lost_at = watched.guard.with_lease(lost_deadline);
            if lost_at > now && !watched.guard.is_stopped() {
                *slot = Some(state.insert(&watched, lost_at, true));
            }
            drop(slot);
            due.push(watched);
        }
        let mut next = state.queue.keys().next().map(|key| key.0);
        if next.is_none() && state.queued_since_wake {
            next = Some(now + IDLE_TICK);
        }
        state.queued_since_wake = false;
        state.planned_wake = next;
        (due, next)
    }
}

/// The runtime a watchdog task for the caller's context runs on: the current one, or the
/// background runtime outside Tokio or on a runtime without timers (found once per runtime:
/// making a timer there panics, which Tokio reports with what to enable).
fn task_runtime(state: &mut State) -> Option<Handle> {
    let Ok(current) = Handle::try_current() else {
        return crate::detached::background_runtime().cloned();
    };
    let id = current.id();
    if state.untimed.contains(&id) {
        return crate::detached::background_runtime().cloned();
    }
    if state
        .tasks
        .get(&id)
        .is_some_and(|task| !task.handle.is_finished())
    {
        return Some(current);
    }
    let timed = std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO))).is_ok();
    if timed {
        Some(current)
    } else {
        tracing::warn!(
            "this Tokio runtime has no timers (enable_time or enable_all): distlock watches its \
             guards from a background runtime"
        );
        state.untimed.insert(id);
        crate::detached::background_runtime().cloned()
    }
}

/// When a guard next needs attention: its renewal time (TTL/3 after the lease was sent), or
/// its lost deadline if that comes first or auto-renew is off.
fn next_due(watched: &Watched, lease: &Lease) -> Instant {
    let lost_at = lost_deadline(lease);
    if watched.auto_renew {
        lease
            .sent_at()
            .checked_add(lease.ttl() / 3)
            .map_or(lost_at, |renew_at| renew_at.min(lost_at))
    } else {
        lost_at
    }
}

/// Hands a task's work on when the task is dropped (its runtime shut down): wakes the other
/// runtimes' tasks, so the wake-up it was meant to take is not lost with it, and when no
/// other runtime has a live task while guards are queued, starts one on the background
/// runtime. Before, such guards (a sync wrapper's `block_on` on a runtime then dropped) were
/// neither renewed nor told they were lost until some runtime used the `Locker` again.
struct HandOnWhenDropped {
    watchdog: std::sync::Weak<Shared>,
    runtime: runtime::Id,
}

thread_local! {
    /// Set while [`Watchdog::ensure_task_on`] spawns a task holding the state lock.
    static SPAWNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Drop for HandOnWhenDropped {
    fn drop(&mut self) {
        if SPAWNING.get() {
            // Dropped inside `spawn` by a runtime shutting down: the spawner holds the lock
            // and hands the work on itself.
            return;
        }
        let Some(shared) = self.watchdog.upgrade() else {
            return;
        };
        // Declared before the state's guard, so dropped after it: if this is the last
        // reference, `Shared`'s drop takes no lock we hold.
        let watchdog = Watchdog { shared };
        let mut state = lock(&watchdog.shared.state);
        watchdog.hand_to_background_if_orphaned(&mut state, self.runtime);
        state.planned_wake = None;
        state.wake_tasks();
    }
}

/// A watchdog task: holds the watchdog weakly, so that it ends with the `Locker` and the last
/// guard it watched (before, a task lived as long as its runtime: one per `Locker` made per
/// request, for good, on the background runtime too).
async fn run(shared: std::sync::Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let watchdog = Watchdog { shared };
        let (due, next) = watchdog.take_due();
        for watched in due {
            // Built before the spawn: a task dropped unpolled (its runtime shutting down)
            // still puts the guard back.
            let attending = Attending {
                watchdog: watchdog.clone(),
                watched,
                done: false,
            };
            tokio::spawn(attending.run());
        }
        drop(watchdog);
        // A notification that arrived after take_due is kept as a permit, so none is missed.
        match next {
            Some(at) => {
                tokio::select! {
                    _ = sleep_until(at) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// One due guard. Rescues the guard if its attendance is dropped before it finished: the
/// runtime running it shut down mid-renewal, or before it ever ran.
struct Attending {
    watchdog: Watchdog,
    watched: Arc<Watched>,
    done: bool,
}

impl Attending {
    /// Renews the guard (retrying errors until the lost deadline, cutting off a hung call
    /// there) and queues it again, or fires its lost signal.
    async fn run(mut self) {
        attend_once(&self.watchdog, &self.watched).await;
        self.done = true;
        let guard = &self.watched.guard;
        if guard.is_stopped() || guard.lost_token().is_cancelled() {
            // Nothing more to do for it: its backstop goes too.
            self.watchdog.unqueue(&self.watched);
        }
    }
}

impl Drop for Attending {
    fn drop(&mut self) {
        if !self.done {
            self.watchdog.rescue(&self.watched);
        }
    }
}

async fn attend_once(watchdog: &Watchdog, watched: &Arc<Watched>) {
    let state = &watched.guard;
    let lease = state.lease();
    let lose_to_suspension = || {
        watched.lose(
            "suspended",
            "the machine was suspended while the lock was held: the lease may have run out on \
             the server meanwhile"
                .into(),
        )
    };
    if lease.voided_by_suspension() {
        lose_to_suspension();
        return;
    }
    let lost_at = lost_deadline(&lease);
    if !watched.auto_renew {
        if Instant::now() >= lost_at {
            watched.lose(
                "deadline",
                "the lease reached its validity deadline (auto-renew is off)".into(),
            );
        } else {
            watchdog.schedule(watched, lost_at);
        }
        return;
    }
    let ttl = watched.ttl;
    // Retries pace by the TTL the server granted (etcd raises 100 ms to 2 s), not the one
    // asked for: 1/50 of it, doubling up to 1/10.
    let granted = lease.ttl();
    let mut retry_delay = (granted / 50).max(Duration::from_millis(5));
    loop {
        if state.is_stopped() {
            return;
        }
        if state.lost_token().is_cancelled() {
            // The backend said the lease is gone (or a loss fired already): renewing it now
            // would keep a key alive for a holder that was told to stop.
            return;
        }
        // Made before the look below, so a suspension found after it still wakes the waits.
        let suspension = watchdog.shared.suspended.notified();
        if lease.voided_by_suspension() {
            lose_to_suspension();
            return;
        }
        if Instant::now() >= lost_at {
            watched.lose(
                "renew_unconfirmed",
                "renewal could not be confirmed before the validity deadline".into(),
            );
            return;
        }
        let sent = Instant::now();
        let renewal = tokio::select! {
            _ = state.stopped() => return,
            // `lost_at` is on the clock that stood still: look again.
            _ = suspension => continue,
            renewal = timeout_at(lost_at, watched.backend.renew(&lease, ttl)) => renewal,
        };
        let backend = watched.backend.name();
        let took = Some(sent.elapsed());
        match renewal {
            Err(_) => {
                telemetry::renewal(backend, "timeout", None);
                watched.lose(
                    "renew_timeout",
                    "renewal did not answer before the validity deadline".into(),
                );
                return;
            }
            Ok(Ok(renewed)) => {
                telemetry::renewal(backend, "renewed", took);
                if state.lost_token().is_cancelled() {
                    // Told it is lost meanwhile (a backstop on another runtime took it while
                    // this renewal was stranded): the holder stopped; the lease is not taken
                    // up again, and the guard's release frees the key.
                    return;
                }
                // Answered past the lost deadline (a runtime that stalled finds the answer and
                // the timer both ready, and the answer is looked at first): the holder may have
                // been told `is_lost()` meanwhile, so the guard is not taken up again.
                let due = next_due(watched, &renewed);
                tracing::trace!(key = %renewed.key(), "renewed");
                if !state.take_renewal_before(renewed, lost_at) {
                    watched.lose(
                        "renew_unconfirmed",
                        "renewal confirmed only after the validity deadline".into(),
                    );
                    return;
                }
                watchdog.schedule(watched, due);
                return;
            }
            Ok(Err(error)) if error.is_lost() => {
                telemetry::renewal(backend, "lost", took);
                watched.lose("renew_refused", error.to_string());
                return;
            }
            Ok(Err(error)) => {
                telemetry::renewal(backend, "failed", took);
                tracing::debug!(key = %lease.key(), %error, "renew failed; retrying");
                let suspension = watchdog.shared.suspended.notified();
                if lease.voided_by_suspension() {
                    lose_to_suspension();
                    return;
                }
                tokio::select! {
                    _ = sleep_until((Instant::now() + retry_delay).min(lost_at)) => {}
                    _ = suspension => {}
                }
                retry_delay = (retry_delay * 2).min((granted / 10).max(Duration::from_millis(5)));
            }
        }
    }
}
