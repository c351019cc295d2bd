//! Several keys locked together: all or nothing, without deadlock.
//!
//! Keys are taken in one global order (sorted, duplicates removed), and a caller never waits
//! while it holds any of them: it waits (by notification or backoff) for the first key it could
//! not get while holding nothing, then takes the rest with single attempts; if one of those is
//! held, it gives back everything and waits for that one. Two callers naming the same keys in
//! different orders therefore never wait on each other in a cycle.

use crate::client::{Supervised, supervise, wait_deadline};
use crate::{FencingToken, LockError, LockGuard, LockKey, LockOptions, Locker};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

impl Locker {
    /// Starts a request for several keys, locked together: one guard for all of them, all or
    /// nothing (see [`MultiLockRequest`]).
    ///
    /// ```
    /// # async fn demo(locker: lock_core::Locker) -> Result<(), lock_core::LockError> {
    /// use std::time::Duration;
    /// let both = locker
    ///     .lock_all(["account:1", "account:2"])
    ///     .wait(Duration::from_secs(5))
    ///     .acquire()
    ///     .await?;
    /// for (key, fence) in both.keys().zip(both.fences()) {
    ///     println!("{key}: fence {fence:?}");
    /// }
    /// both.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn lock_all<I, K>(&self, keys: I) -> MultiLockRequest<'_>
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        MultiLockRequest {
            locker: self,
            keys: keys.into_iter().map(Into::into).collect(),
            options: *self.defaults(),
        }
    }
}

/// Several keys being locked together: `locker.lock_all([a, b]).wait(..).acquire().await`.
///
/// The options apply to each key; `wait` and `retries` bound the whole acquisition.
#[derive(Debug)]
#[must_use = "call acquire, try_acquire, run or run_with"]
pub struct MultiLockRequest<'a> {
    locker: &'a Locker,
    keys: Vec<String>,
    options: LockOptions,
}

impl MultiLockRequest<'_> {
    /// Lease TTL of each key.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = ttl;
        self
    }

    /// How long to wait, in all, for every key to be free at once (zero: try once).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.options.wait = wait;
        self
    }

    /// At most this many further rounds after the first (see [`LockOptions::retries`]).
    pub fn retries(mut self, retries: u32) -> Self {
        self.options.retries = Some(retries);
        self
    }

    /// Whether the watchdog renews every lease while the guard lives.
    pub fn auto_renew(mut self, auto_renew: bool) -> Self {
        self.options.auto_renew = auto_renew;
        self
    }

    /// All options at once.
    pub fn options(mut self, options: LockOptions) -> Self {
        self.options = options;
        self
    }

    /// Acquires every key, waiting up to `wait`; `Err(Timeout)` (naming the key still held)
    /// if they were not all free at once by then. Holds none of them on any error.
    pub async fn acquire(self) -> Result<MultiGuard, LockError> {
        let started = Instant::now();
        let options = self.options;
        let keys = sorted_keys(self.keys)?;
        let deadline = wait_deadline(started, options.wait, options.retries);
        let mut rounds_left = options.retries;
        let mut first_wanted: Option<usize> = None;
        loop {
            // Wait for the key that stopped the last round while holding nothing.
            let mut held = Vec::with_capacity(keys.len());
            if let Some(index) = first_wanted {
                let remaining = deadline.saturating_duration_since(Instant::now());
                // A counted wait stays counted here too: the rounds left bound it.
                let request = self.locker.lock(keys[index].as_str()).options(LockOptions {
                    wait: remaining,
                    retries: rounds_left,
                    ..options
                });
                match request.acquire().await {
                    Ok(guard) => held.push((index, guard)),
                    Err(LockError::Timeout { key, .. }) => {
                        return Err(LockError::Timeout {
                            key,
                            waited: started.elapsed(),
                        });
                    }
                    Err(error) => return Err(error),
                }
            }
            // Then the others, one attempt each, in order.
            let mut blocked = None;
            for (index, key) in keys.iter().enumerate() {
                if held.iter().any(|(taken, _)| *taken == index) {
                    continue;
                }
                let attempt = self
                    .locker
                    .lock(key.as_str())
                    .options(options)
                    .try_acquire()
                    .await;
                match attempt {
                    Ok(Some(guard)) => held.push((index, guard)),
                    Ok(None) => {
                        blocked = Some(index);
                        break;
                    }
                    Err(error) => {
                        give_back(held).await;
                        return Err(error);
                    }
                }
            }
            // A key taken early in the round may have run out while the later ones were
            // taken (a slow backend, a hung renewal): never hand out a guard past its lost
            // deadline, as a single lock's late grant is never handed out. Such a round is
            // given back and counts as blocked by that key.
            let blocked = blocked.or_else(|| {
                let now = Instant::now();
                let (index, _) = held
                    .iter()
                    .find(|(_, guard)| guard.is_lost() || now >= guard.lost_deadline())?;
                tracing::warn!(
                    key = %keys[*index],
                    "a key of lock_all ran out while the others were taken; giving the round back"
                );
                Some(*index)
            });
            let Some(index) = blocked else {
                held.sort_by_key(|(index, _)| *index);
                return Ok(MultiGuard::new(held.into_iter().map(|(_, g)| g).collect()));
            };
            give_back(held).await;
            let out_of_rounds = match rounds_left.as_mut() {
                Some(0) => true,
                Some(left) => {
                    *left -= 1;
                    false
                }
                None => false,
            };
            if out_of_rounds || Instant::now() >= deadline {
                return Err(LockError::Timeout {
                    key: keys[index].to_string(),
                    waited: started.elapsed(),
                });
            }
            first_wanted = Some(index);
        }
    }

    /// One round: `Ok(None)` if any key is held by someone else (none is held on return).
    pub async fn try_acquire(mut self) -> Result<Option<MultiGuard>, LockError> {
        self.options.wait = Duration::ZERO;
        self.options.retries = None;
        match self.acquire().await {
            Ok(guard) => Ok(Some(guard)),
            Err(LockError::Timeout { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Runs `work` while holding every key, then releases them all; dropped with `Err(Lost)`
    /// if any key is lost midway.
    pub async fn run<F: Future>(self, work: F) -> Result<F::Output, LockError> {
        self.run_with(async move |_guard: &MultiGuard| work.await)
            .await
    }

    /// Like [`run`](Self::run), handing the work the guard (for its fences).
    pub async fn run_with<F, T>(self, work: F) -> Result<T, LockError>
    where
        F: AsyncFnOnce(&MultiGuard) -> T,
    {
        let guard = self.acquire().await?;
        supervise(guard, work).await
    }
}

/// Validates, sorts and de-duplicates the keys: one global order for every caller.
fn sorted_keys(keys: Vec<String>) -> Result<Vec<LockKey>, LockError> {
    if keys.is_empty() {
        return Err(LockError::InvalidKey(
            "lock_all needs at least one key".into(),
        ));
    }
    let mut keys = keys
        .into_iter()
        .map(LockKey::new)
        .collect::<Result<Vec<_>, _>>()?;
    keys.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    keys.dedup_by(|a, b| a.as_str() == b.as_str());
    Ok(keys)
}

/// Releases guards taken in a round that could not complete, so a waiter of those keys can
/// have them while this caller waits.
async fn give_back(held: Vec<(usize, LockGuard)>) {
    for (_, guard) in held {
        if let Err(error) = guard.release().await {
            tracing::debug!(%error, "giving back a key of an incomplete lock_all failed; TTL will free it");
        }
    }
}

/// Several keys held together. Its lost signal fires when any of them is lost; releasing (or
/// dropping) it frees them all.
#[derive(Debug)]
#[must_use = "dropping the guard releases the locks"]
pub struct MultiGuard {
    guards: Vec<LockGuard>,
    lost: CancellationToken,
    /// Fires `lost` when any guard's signal fires; aborted with the guard. It runs on the
    /// runtime that acquired: if that runtime stops (or, current-thread, is no longer
    /// driven) while the guard lives, `lost()` may not fire; `is_lost()` still reads every
    /// guard, and each guard is still renewed by the watchdog.
    watcher: Option<JoinHandle<()>>,
    /// The same on the background runtime, started by [`MultiGuard::lost_token`] taken on a
    /// current-thread runtime (or outside Tokio): plain code may check the token while the
    /// acquiring runtime is not driven, and the watcher there would never run.
    background_watcher: std::sync::OnceLock<JoinHandle<()>>,
}

impl MultiGuard {
    fn new(guards: Vec<LockGuard>) -> Self {
        let lost = CancellationToken::new();
        let signals: Vec<_> = guards.iter().map(|guard| Box::pin(guard.lost())).collect();
        let watcher = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let lost = lost.clone();
            runtime.spawn(async move {
                futures::future::select_all(signals).await;
                lost.cancel();
            })
        });
        MultiGuard {
            guards,
            lost,
            watcher,
            background_watcher: std::sync::OnceLock::new(),
        }
    }

    /// The keys, in the order they were locked (sorted).
    pub fn keys(&self) -> impl Iterator<Item = &LockKey> {
        self.guards.iter().map(LockGuard::key)
    }

    /// Each key's fencing token, in the order of [`keys`](Self::keys).
    pub fn fences(&self) -> Vec<Option<FencingToken>> {
        self.guards.iter().map(LockGuard::fence).collect()
    }

    /// The fence of one key, if it is one of this guard's keys.
    pub fn fence_of(&self, key: &str) -> Option<FencingToken> {
        self.guards
            .iter()
            .find(|guard| guard.key().as_str() == key)
            .and_then(LockGuard::fence)
    }

    /// The guard of each key.
    pub fn guards(&self) -> &[LockGuard] {
        &self.guards
    }

    /// The earliest validity deadline of the keys.
    pub fn valid_until(&self) -> Instant {
        self.guards
            .iter()
            .map(LockGuard::valid_until)
            .min()
            .unwrap_or_else(Instant::now)
    }

    /// Whether any key is lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled() || self.guards.iter().any(LockGuard::is_lost)
    }

    /// A future that resolves when any key is lost.
    pub fn lost(&self) -> WaitForCancellationFutureOwned {
        // Acquired outside Tokio: no watcher runs on an acquiring runtime, so one runs on
        // the background runtime (before, this future never resolved).
        if self.watcher.is_none()
            && let Some(background) = crate::detached::background_runtime()
        {
            self.watch_from(background);
        }
        self.lost.clone().cancelled_owned()
    }

    /// A token cancelled when any key is lost (a child: cancelling it fires nothing).
    ///
    /// Taken on a current-thread runtime or outside Tokio, it is watched from the process's
    /// background runtime too (as [`LockGuard::lost_token`] is): plain code may check it while
    /// no runtime is driven.
    pub fn lost_token(&self) -> CancellationToken {
        if let Some(background) = crate::detached::background_if_undriven() {
            self.watch_from(background);
        }
        self.lost.child_token()
    }

    /// Starts the watcher on `background` (once).
    fn watch_from(&self, background: &tokio::runtime::Handle) {
        self.background_watcher.get_or_init(|| {
            let lost = self.lost.clone();
            // Each key's own token: its watchdog then has a task that runs, too.
            let signals = self
                .guards
                .iter()
                .map(|guard| Box::pin(guard.lost_token().cancelled_owned()))
                .collect::<Vec<_>>();
            background.spawn(async move {
                futures::future::select_all(signals).await;
                lost.cancel();
            })
        });
    }

    /// Releases every key. `Ok(true)` only if every lease was still ours; all are released
    /// even if one fails (the first error is returned).
    pub async fn release(mut self) -> Result<bool, LockError> {
        self.stop_watchers();
        let mut all_ours = true;
        let mut first_error = None;
        for guard in std::mem::take(&mut self.guards) {
            match guard.release().await {
                Ok(ours) => all_ours &= ours,
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(all_ours),
        }
    }

    fn lost_error(&self) -> LockError {
        let lost = self.guards.iter().find(|guard| guard.is_lost());
        match lost {
            Some(guard) => LockError::lost(
                guard.key().as_str(),
                guard
                    .lost_reason()
                    .unwrap_or_else(|| "the lease reached its validity deadline".into()),
            ),
            None => LockError::lost(
                self.keys().next().map_or("", LockKey::as_str),
                "one of the keys was lost",
            ),
        }
    }
}

impl MultiGuard {
    /// Stops the watchers that fire `lost` (release or drop).
    fn stop_watchers(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
        if let Some(watcher) = self.background_watcher.get() {
            watcher.abort();
        }
    }
}

impl Drop for MultiGuard {
    fn drop(&mut self) {
        self.stop_watchers();
        // The guards release themselves in the background as they drop.
    }
}

impl Supervised for MultiGuard {
    fn is_lost(&self) -> bool {
        MultiGuard::is_lost(self)
    }
    fn stop_at(&self) -> Instant {
        self.guards
            .iter()
            .map(LockGuard::lost_deadline)
            .min()
            .unwrap_or_else(Instant::now)
    }
    fn lost_signal(&self) -> WaitForCancellationFutureOwned {
        self.lost()
    }
    fn into_lost_error(self) -> LockError {
        self.lost_error()
    }
    async fn release_after_work(self) -> Result<bool, LockError> {
        self.release().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryBackend;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn assert_send<T: Send>(_: &T) {}

    #[tokio::test]
    async fn futures_are_send() {
        let locker = Locker::new(MemoryBackend::new());
        let single = locker.lock("s").run_with(async |guard| guard.fence());
        assert_send(&single);
        let multi = locker
            .lock_all(["a", "b"])
            .run_with(async |guard| guard.fences());
        assert_send(&multi);
        let fences = multi.await.unwrap();
        assert_eq!(fences.len(), 2);
        assert!(single.await.unwrap().is_some());
    }

    #[tokio::test]
    async fn all_or_nothing() {
        let locker = Locker::new(MemoryBackend::new());
        let other = locker.acquire("b").await.unwrap();
        let attempt = locker
            .lock_all(["a", "b", "c"])
            .try_acquire()
            .await
            .unwrap();
        assert!(attempt.is_none(), "got all keys while b was held");
        // Nothing of the failed round is left held.
        for key in ["a", "c"] {
            let guard = locker.try_acquire(key).await.unwrap();
            assert!(
                guard.is_some(),
                "{key} stayed held after an incomplete lock_all"
            );
        }
        // Once b is free, a waiting lock_all gets all three, sorted and de-duplicated.
        let waiter = tokio::spawn({
            let locker = locker.clone();
            async move {
                locker
                    .lock_all(["c", "b", "a", "b"])
                    .wait(Duration::from_secs(5))
                    .acquire()
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(other.release().await.unwrap());
        let all = waiter.await.unwrap().unwrap();
        let keys: Vec<_> = all.keys().map(LockKey::as_str).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert!(all.fences().iter().all(Option::is_some));
        assert!(all.release().await.unwrap());
    }

    #[tokio::test]
    async fn opposite_orders_never_deadlock_or_overlap() {
        let backend = MemoryBackend::new();
        let inside = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let mut tasks = Vec::new();
        for keys in [["a", "b"], ["b", "a"]] {
            let locker = Locker::new(backend.clone());
            let inside = inside.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..200 {
                    let guard = locker
                        .lock_all(keys)
                        .wait(Duration::from_secs(10))
                        .acquire()
                        .await
                        .unwrap();
                    for flag in inside.iter() {
                        assert!(!flag.swap(true, Ordering::SeqCst), "two holders at once");
                    }
                    tokio::task::yield_now().await;
                    for flag in inside.iter() {
                        flag.store(false, Ordering::SeqCst);
                    }
                    guard.release().await.unwrap();
                }
            }));
        }
        tokio::time::timeout(
            Duration::from_secs(20),
            futures::future::try_join_all(tasks),
        )
        .await
        .expect("deadlocked")
        .unwrap();
    }

    #[tokio::test]
    async fn lost_fires_when_any_key_is_lost() {
        let locker = Locker::new(MemoryBackend::new());
        let guard = locker
            .lock_all(["x", "y"])
            .ttl(Duration::from_millis(60))
            .auto_renew(false)
            .acquire()
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), guard.lost())
            .await
            .expect("lost() did not fire");
        assert!(guard.is_lost());
        let error = locker.lock_all(["p", "q"]).retries(0).run(async {}).await;
        assert!(error.is_ok());
    }

    #[tokio::test]
    async fn empty_and_bad_keys_are_typed_errors() {
        let locker = Locker::new(MemoryBackend::new());
        let none: [&str; 0] = [];
        assert!(matches!(
            locker.lock_all(none).acquire().await,
            Err(LockError::InvalidKey(_))
        ));
        assert!(matches!(
            locker.lock_all(["ok", ""]).acquire().await,
            Err(LockError::InvalidKey(_))
        ));
    }
}
