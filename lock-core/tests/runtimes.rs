//! A guard acquired on a current-thread runtime that is then left alive but undriven (its
//! `block_on` returned), and watched from another runtime that never acquired anything: the
//! only watchdog task was on the first runtime, so nothing renewed the lease and nothing fired
//! `lost()` (only `is_lost()` turned true at the deadline). Waiting for `lost()` now starts a
//! watchdog task on the waiter's runtime, which renews the guard (or fires its signal).

use lock_core::{
    Attempt, Capabilities, Lease, LockBackend, LockError, LockKey, Locker, MemoryBackend,
};
use std::time::Duration;

#[test]
fn a_guard_watched_from_another_runtime_is_renewed_there() {
    let locker = Locker::new(MemoryBackend::new());
    let acquiring = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ttl = Duration::from_millis(600);
    let guard = acquiring
        .block_on(locker.lock("moved").ttl(ttl).acquire())
        .unwrap();
    // `acquiring` stays alive but is never driven again.
    let other = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    other.block_on(async {
        let lost = guard.lost();
        let waited = tokio::time::timeout(ttl * 3, lost).await;
        assert!(
            waited.is_err(),
            "lost() fired for a guard that could be renewed: {:?}",
            guard.lost_reason()
        );
        assert!(
            !guard.is_lost(),
            "the guard ran past its deadline unrenewed and lost() never fired"
        );
    });
    drop(acquiring);
}

/// The memory backend, with renewals that take `renew_delay` to answer: before they reach
/// the backend, or (`renewed_first`) after (a slow link's return path).
#[derive(Debug)]
struct SlowRenewals {
    inner: MemoryBackend,
    renew_delay: Duration,
    renewed_first: bool,
}

#[lock_core::async_trait]
impl LockBackend for SlowRenewals {
    async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
        self.inner.try_acquire(key, ttl).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
        if self.renewed_first {
            let renewed = self.inner.renew(lease, ttl).await;
            tokio::time::sleep(self.renew_delay).await;
            return renewed;
        }
        tokio::time::sleep(self.renew_delay).await;
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
        self.inner.release(lease).await
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

/// Finding (review, 2026-12-03): a runtime that stalls past the lost deadline with a renewal
/// in flight finds, when it runs again, the renewal's answer and the deadline's timer both
/// ready, and the timeout looked at the answer first: the guard, already reported lost by
/// `is_lost()` during the stall (its validity had passed), was taken up again and never
/// told. A renewal confirmed after the lost deadline now ends in the lost signal.
#[test]
fn a_renewal_answered_past_the_deadline_of_a_stalled_runtime_is_not_taken_up() {
    let backend = SlowRenewals {
        inner: MemoryBackend::new(),
        renew_delay: Duration::from_millis(400),
        renewed_first: true,
    };
    let locker = Locker::new(backend);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let ttl = Duration::from_millis(600);
        let guard = locker.lock("stalled").ttl(ttl).acquire().await.unwrap();
        // Renewal sent at ttl/3 = 200 ms, answered at ~600 ms: past the lost deadline
        // (~530 ms) and the validity (592 ms).
        tokio::time::sleep(Duration::from_millis(250)).await;
        let stalled_until = guard.valid_until() + Duration::from_millis(60);
        // The runtime's only thread is busy: nothing runs until both are due.
        std::thread::sleep(stalled_until.saturating_duration_since(tokio::time::Instant::now()));
        assert!(
            guard.is_lost(),
            "is_lost() was false past the validity deadline"
        );
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            guard.is_lost(),
            "a guard is_lost() had reported lost was taken up again by a renewal answered \
             after its lost deadline (valid for {:?} more)",
            guard
                .valid_until()
                .saturating_duration_since(tokio::time::Instant::now())
        );
        assert!(
            guard.lost_token().is_cancelled(),
            "the lost signal never fired"
        );
    });
}

/// The renewal is in flight on the acquiring current-thread runtime when its `block_on`
/// returns: that runtime never finishes it. The guard was out of the watchdog's queue while
/// attended, so the task another runtime starts for `lost()` did not see it: never renewed,
/// never told, while another holder took the key.
#[test]
fn a_renewal_stranded_on_an_undriven_runtime_still_ends_in_a_signal() {
    let memory = MemoryBackend::new();
    let backend = SlowRenewals {
        inner: memory.clone(),
        renew_delay: Duration::from_millis(300),
        renewed_first: false,
    };
    let locker = Locker::new(backend);
    let acquiring = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ttl = Duration::from_millis(600);
    let guard = acquiring
        .block_on(locker.lock("stranded").ttl(ttl).acquire())
        .unwrap();
    // Renewal due at ttl/3 = 200 ms, answered at ~500 ms: in flight at 250 ms, when the
    // acquiring runtime stops being driven.
    acquiring.block_on(async { tokio::time::sleep(Duration::from_millis(250)).await });
    let other = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    other.block_on(async {
        let waited = tokio::time::timeout(ttl * 3, guard.lost()).await;
        let contender = Locker::new(memory.clone());
        let taken = contender.lock("stranded").try_acquire().await.unwrap();
        assert!(
            waited.is_ok() || taken.is_none(),
            "another holder took the key while lost() never fired (is_lost: {})",
            guard.is_lost()
        );
    });
    drop(acquiring);
}

/// A guard taken in a sync wrapper's `block_on` whose runtime then shuts down, its holder
/// working on in plain code and checking its `lost_token()`: the watchdog's only task died
/// with that runtime, so the guard was neither renewed nor told it was lost, and another
/// holder took the key while the token said "held" (found by a review, 2026-12-03).
#[test]
fn a_guard_whose_runtime_shut_down_is_still_watched_from_sync_code() {
    let memory = MemoryBackend::new();
    let locker = Locker::new(memory.clone());
    let ttl = Duration::from_millis(600);
    let (guard, token) = sync_call(|| async {
        let guard = locker.lock("shut-down").ttl(ttl).acquire().await.unwrap();
        let token = guard.lost_token();
        (guard, token)
    })
    .unwrap();
    renewed_through_plain_work(&memory, "shut-down", ttl, &guard, || token.is_cancelled()).unwrap();
}

/// The same with the runtime kept (as a sync wrapper keeps one for its next call) but not
/// driven between calls: the watchdog's task there never ran.
#[test]
fn a_guard_whose_runtime_is_left_undriven_is_still_watched_from_sync_code() {
    let memory = MemoryBackend::new();
    let locker = Locker::new(memory.clone());
    let ttl = Duration::from_millis(600);
    let kept = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (guard, token) = kept.block_on(async {
        let guard = locker.lock("undriven").ttl(ttl).acquire().await.unwrap();
        let token = guard.lost_token();
        (guard, token)
    });
    renewed_through_plain_work(&memory, "undriven", ttl, &guard, || token.is_cancelled()).unwrap();
    drop(kept);
}

/// A guard whose runtime, the only one its `Locker` used, shut down, with nobody taking its
/// token or waiting for `lost()`: the watchdog's task there hands the guard to one on the
/// background runtime, which renews it (before, nothing did until the `Locker` was used
/// from a runtime again).
#[test]
fn a_guard_whose_runtime_shut_down_is_still_renewed() {
    let memory = MemoryBackend::new();
    let locker = Locker::new(memory.clone());
    let ttl = Duration::from_millis(600);
    let guard =
        sync_call(|| async { locker.lock("handed-on").ttl(ttl).acquire().await.unwrap() }).unwrap();
    renewed_through_plain_work(&memory, "handed-on", ttl, &guard, || guard.is_lost()).unwrap();
}

/// A backend whose renewals answer "lost" once `losing` is set.
#[derive(Debug)]
struct LosingRenewals {
    inner: MemoryBackend,
    losing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[lock_core::async_trait]
impl LockBackend for LosingRenewals {
    async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
        self.inner.try_acquire(key, ttl).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
        if self.losing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LockError::lost(
                lease.key().as_str(),
                "taken away by the test",
            ));
        }
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
        self.inner.release(lease).await
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

/// `lock_all`'s guard in a sync caller: its token, taken in `block_on` on a runtime then
/// dropped, fires when a key is lost. Its watcher ran on that runtime only, so the token
/// stayed silent while the key was gone.
#[test]
fn a_multi_guards_token_fires_for_a_sync_caller() {
    let losing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let locker = Locker::new(LosingRenewals {
        inner: MemoryBackend::new(),
        losing: losing.clone(),
    });
    let ttl = Duration::from_millis(600);
    let (guard, token) = sync_call(|| async {
        let guard = locker
            .lock_all(["multi-a", "multi-b"])
            .ttl(ttl)
            .acquire()
            .await
            .unwrap();
        let token = guard.lost_token();
        (guard, token)
    })
    .unwrap();
    losing.store(true, std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(ttl);
    assert!(
        token.is_cancelled(),
        "a key's renewal answered lost, and the multi-guard's token stayed silent (is_lost: {})",
        guard.is_lost()
    );
}

/// A watchdog task ends with its `Locker` and the guards it watched. A `Locker` made per call
/// of a sync wrapper, its guard's token taken (a task on the background runtime), left one
/// task there per call for good.
#[test]
fn watchdog_tasks_end_with_their_locker() {
    let memory = MemoryBackend::new();
    let background = lock_core::background_runtime().unwrap();
    let per_call = || {
        let locker = Locker::new(memory.clone());
        sync_call(|| async {
            let guard = locker.lock("per-call").acquire().await.unwrap();
            let _token = guard.lost_token();
            guard.release().await.unwrap();
        })
        .unwrap();
    };
    per_call();
    std::thread::sleep(Duration::from_millis(200));
    let before = background.metrics().num_alive_tasks();
    let calls = 50;
    for _ in 0..calls {
        per_call();
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = background.metrics().num_alive_tasks();
    assert!(
        after < before + 10,
        "{} background tasks more after {calls} calls with a Locker each",
        after.saturating_sub(before)
    );
}

/// After four TTLs of the holder's work in plain code, another client cannot take `name`:
/// `guard` was renewed. If it was taken, the guard must at least have been told (`told`).
fn renewed_through_plain_work(
    memory: &MemoryBackend,
    name: &str,
    ttl: Duration,
    guard: &lock_core::LockGuard,
    told: impl Fn() -> bool,
) -> Result<(), Box<dyn std::error::Error>> {
    std::thread::sleep(ttl * 4);
    let taken = sync_call(|| async {
        let contender = Locker::new(memory.clone());
        contender.lock(name).try_acquire().await
    })??;
    assert!(
        told() || taken.is_none(),
        "another holder took the key while its guard said it was held"
    );
    assert!(
        taken.is_none(),
        "the guard was not renewed: {:?}",
        guard.lost_reason()
    );
    Ok(())
}

/// Runs `call` on a current-thread runtime of its own, shut down afterwards: a sync
/// wrapper's call.
fn sync_call<F, Fut>(call: F) -> std::io::Result<Fut::Output>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future,
{
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(call()))
}

/// A runtime built without timers: the watchdog's task there could not sleep (Tokio panics
/// in it), so the guard was neither renewed nor told, and the key went to another holder.
#[test]
fn a_guard_from_a_runtime_without_timers_is_still_watched() {
    let memory = MemoryBackend::new();
    let locker = Locker::new(memory.clone());
    let no_timers = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let ttl = Duration::from_millis(300);
    let guard = no_timers
        .block_on(locker.lock("untimed").ttl(ttl).acquire())
        .unwrap();
    std::thread::sleep(ttl * 3);
    let other = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let taken = other.block_on(async {
        let contender = Locker::new(memory.clone());
        contender.lock("untimed").try_acquire().await.unwrap()
    });
    assert!(
        guard.is_lost() || taken.is_none(),
        "another holder took the key of a guard that was neither renewed nor lost"
    );
    assert!(
        taken.is_none(),
        "the guard was not renewed: {:?}",
        guard.lost_reason()
    );
    drop(no_timers);
}

/// Outside any Tokio runtime (another executor) the guard is renewed too.
#[test]
fn a_guard_acquired_outside_tokio_is_renewed() {
    let memory = MemoryBackend::new();
    let locker = Locker::new(memory.clone());
    let ttl = Duration::from_millis(300);
    let guard = futures::executor::block_on(locker.lock("elsewhere").ttl(ttl).acquire()).unwrap();
    std::thread::sleep(ttl * 3);
    let contender = Locker::new(memory.clone());
    let taken = futures::executor::block_on(contender.lock("elsewhere").try_acquire()).unwrap();
    assert!(
        taken.is_none() && !guard.is_lost(),
        "the guard was not renewed: lost {:?}",
        guard.lost_reason()
    );
}

/// Finding (review, 2026-12-03): `lock_all` outside Tokio built its `MultiGuard` without a
/// watcher (none could be spawned there), so `lost()` never resolved when a key was lost.
/// It now starts a watcher on the background runtime.
#[test]
fn a_multi_guards_lost_fires_when_taken_outside_tokio() {
    let locker = Locker::new(MemoryBackend::new());
    let guard = futures::executor::block_on(
        locker
            .lock_all(["outside-a", "outside-b"])
            .ttl(Duration::from_millis(100))
            .auto_renew(false)
            .try_acquire(),
    )
    .unwrap()
    .expect("free keys");
    let waited = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async { tokio::time::timeout(Duration::from_secs(2), guard.lost()).await });
    assert!(
        waited.is_ok(),
        "lost() never fired (is_lost: {})",
        guard.is_lost()
    );
}

/// A backend may answer "held, for ever" with `Duration::MAX`: the wait must not overflow.
#[test]
fn a_holder_without_expiry_does_not_overflow_the_wait() {
    #[derive(Debug)]
    struct HeldForEver;
    #[lock_core::async_trait]
    impl LockBackend for HeldForEver {
        async fn try_acquire(&self, _key: &LockKey, _ttl: Duration) -> Result<Attempt, LockError> {
            Ok(Attempt::Held {
                expires_in: Some(Duration::MAX),
            })
        }
        async fn renew(&self, _lease: &Lease, _ttl: Duration) -> Result<Lease, LockError> {
            unreachable!()
        }
        async fn release(&self, _lease: &Lease) -> Result<bool, LockError> {
            Ok(false)
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let locker = Locker::new(HeldForEver);
    let result = runtime.block_on(
        locker
            .lock("for-ever")
            .wait(Duration::from_millis(100))
            .acquire(),
    );
    assert!(result.is_err(), "acquired a lock held for ever");
}

/// `spawn_resident`: a task spawned on a runtime that shuts down goes on on the background
/// runtime (made again by its closure); cancelling its token ends it wherever it runs; a task
/// that panics is not made again.
#[test]
fn a_resident_task_outlives_its_runtime_and_ends_when_stopped() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_util::sync::CancellationToken;

    let ticks = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    first.block_on(async {
        lock_core::spawn_resident(stop.clone(), {
            let (ticks, started) = (ticks.clone(), started.clone());
            move || {
                started.fetch_add(1, Ordering::SeqCst);
                let ticks = ticks.clone();
                async move {
                    loop {
                        ticks.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    drop(first);
    let at_shutdown = ticks.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        ticks.load(Ordering::SeqCst) > at_shutdown + 5,
        "the task ended with its runtime"
    );
    assert_eq!(
        started.load(Ordering::SeqCst),
        2,
        "made once, then once more"
    );
    stop.cancel();
    std::thread::sleep(Duration::from_millis(50));
    let at_stop = ticks.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        ticks.load(Ordering::SeqCst),
        at_stop,
        "still running after stop"
    );
    assert_eq!(started.load(Ordering::SeqCst), 2);

    // A runtime dropped while its thread unwinds (a failed `#[tokio::test]`) drops its tasks
    // during that unwind: they go on all the same.
    let ticks = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let failed = std::thread::spawn({
        let (ticks, stop) = (ticks.clone(), stop.clone());
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                lock_core::spawn_resident(stop, move || {
                    let ticks = ticks.clone();
                    async move {
                        loop {
                            ticks.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                });
                tokio::time::sleep(Duration::from_millis(30)).await;
            });
            panic!("a test that fails while its runtime is alive");
        }
    })
    .join();
    assert!(failed.is_err());
    let after_the_panic = ticks.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        ticks.load(Ordering::SeqCst) > after_the_panic + 5,
        "the task ended with a runtime dropped during a panic"
    );
    stop.cancel();

    // A task that panics is not made again.
    let made = Arc::new(AtomicUsize::new(0));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        lock_core::spawn_resident(CancellationToken::new(), {
            let made = made.clone();
            move || {
                made.fetch_add(1, Ordering::SeqCst);
                async { panic!("a resident task that panics") }
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    drop(runtime);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        made.load(Ordering::SeqCst),
        1,
        "a panicked task was made again"
    );
}
