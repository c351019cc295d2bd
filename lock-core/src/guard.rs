//! The held lock: fence, deadline, lost signal, release.

use crate::telemetry;
use crate::watchdog::{Watchdog, Watched};
use crate::{FencingToken, Lease, LockError, LockKey};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;
use tokio_util::sync::{
    CancellationToken, WaitForCancellationFuture, WaitForCancellationFutureOwned,
};

/// State shared by a guard and its watchdog.
#[derive(Debug)]
pub(crate) struct GuardState {
    lease: Mutex<Lease>,
    lost: CancellationToken,
    lost_reason: Mutex<Option<String>>,
    /// Cancelled on release or drop: the watchdog leaves the guard alone from then on.
    stop: CancellationToken,
}

impl GuardState {
    pub(crate) fn new(lease: Lease) -> Arc<Self> {
        // A backend that can tell on its own that a lease is gone cancels its token; as a
        // child, the guard's signal fires with it, without a task per guard.
        let lost = lease
            .lost_signal()
            .map_or_else(CancellationToken::new, CancellationToken::child_token);
        Arc::new(GuardState {
            lease: Mutex::new(lease),
            lost,
            lost_reason: Mutex::new(None),
            stop: CancellationToken::new(),
        })
    }

    pub(crate) fn lease(&self) -> Lease {
        lock(&self.lease).clone()
    }

    /// Reads the current lease without cloning it.
    pub(crate) fn with_lease<T>(&self, read: impl FnOnce(&Lease) -> T) -> T {
        read(&lock(&self.lease))
    }

    /// Takes up a renewed lease only if it is still before `lost_at`, checked under the
    /// lease's lock: a reader of the old lease then never saw it past its validity, so
    /// `is_lost()` cannot go from true back to false.
    pub(crate) fn take_renewal_before(&self, renewed: Lease, lost_at: Instant) -> bool {
        let mut lease = lock(&self.lease);
        if Instant::now() >= lost_at {
            return false;
        }
        *lease = renewed;
        true
    }

    /// Fires the lost signal; `true` the first time (so a loss is counted once).
    pub(crate) fn fire_lost(&self, reason: String) -> bool {
        let mut slot = lock(&self.lost_reason);
        let first = slot.is_none();
        if first {
            tracing::warn!(key = %lock(&self.lease).key(), %reason, "lock lost");
            *slot = Some(reason);
        }
        drop(slot);
        self.lost.cancel();
        first
    }

    /// Whether the backend's own signal fired the loss (no reason of ours recorded).
    fn lost_by_backend_signal(&self) -> bool {
        self.lost.is_cancelled() && lock(&self.lost_reason).is_none()
    }

    pub(crate) fn lost_token(&self) -> &CancellationToken {
        &self.lost
    }

    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    pub(crate) fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A held lock.
///
/// While it lives (and auto-renew is on) a watchdog renews the lease at TTL/3. If renewal is
/// refused, or cannot be confirmed before the lease's local validity deadline, the guard's
/// lost signal fires: stop the critical section. Release it with [`LockGuard::release`];
/// dropping it releases in the background: on the current Tokio runtime, or, outside one (or
/// on one shutting down), on a background runtime of the process.
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock"]
pub struct LockGuard {
    key: LockKey,
    watched: Arc<Watched>,
    watchdog: Watchdog,
    released: bool,
}

impl LockGuard {
    pub(crate) fn new(watchdog: Watchdog, watched: Arc<Watched>) -> Self {
        telemetry::held(watched.backend.name(), 1.0);
        let key = watched.guard.with_lease(|lease| lease.key().clone());
        LockGuard {
            key,
            watched,
            watchdog,
            released: false,
        }
    }

    /// The locked key.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// The fencing token of this hold, when the backend provides one.
    pub fn fence(&self) -> Option<FencingToken> {
        self.watched.guard.lease().fence()
    }

    /// The current lease (renewals replace it).
    pub fn lease(&self) -> Lease {
        self.watched.guard.lease()
    }

    /// Until when the holder may act: the latest lease's local validity deadline.
    pub fn valid_until(&self) -> Instant {
        self.watched.guard.lease().valid_until()
    }

    /// When the lost signal fires unless a renewal is confirmed first (the current lease's
    /// deadline less [`crate::lost_margin`]).
    pub(crate) fn lost_deadline(&self) -> Instant {
        self.watched
            .guard
            .with_lease(crate::watchdog::lost_deadline)
    }

    /// Whether the lock is lost (signal fired, or validity deadline passed).
    pub fn is_lost(&self) -> bool {
        self.watched.guard.lost_token().is_cancelled() || self.watched.guard.lease().is_expired()
    }

    /// Why the lock was lost, once it was.
    pub fn lost_reason(&self) -> Option<String> {
        let reason = lock(&self.watched.guard.lost_reason).clone();
        reason.or_else(|| {
            self.watched.guard.lost_token().is_cancelled().then(|| {
                "the backend reported the lease gone (e.g. its server session ended)".into()
            })
        })
    }

    /// A future that resolves when the lock is lost. It is `'static`: move it into a task or a
    /// `select!`.
    pub fn lost(&self) -> WaitForCancellationFutureOwned {
        self.watchdog.attend_from_current_runtime();
        self.watched.guard.lost_token().clone().cancelled_owned()
    }

    /// A token cancelled when the lock is lost (a child of the guard's own token, so
    /// cancelling it does not fire the guard's signal).
    ///
    /// The token may be checked from plain code while no runtime runs: taken on a
    /// current-thread runtime or outside Tokio, a watchdog task on the process's background
    /// runtime (if it could be started) renews the guard, or cancels the token in time.
    pub fn lost_token(&self) -> CancellationToken {
        self.watchdog.attend_from_anywhere();
        self.watched.guard.lost_token().child_token()
    }

    /// Releases the lock. `Ok(false)`: it was no longer ours (expired or taken over). A
    /// retryable error (a connection reset, a timeout) is returned, and the release goes on in
    /// the background, retried until the lease's TTL would have freed the key anyway: the
    /// guard is gone, so the caller could not try again, and nothing renews the lease.
    pub async fn release(mut self) -> Result<bool, LockError> {
        self.watchdog.unwatch(&self.watched);
        let lease = self.watched.guard.lease();
        let result = self.watched.backend.release(&lease).await;
        // Only now: if this future is dropped mid-release, Drop releases in the background.
        self.released = true;
        if let Err(error) = &result
            && error.is_retryable()
        {
            crate::detached::release_detached(self.watched.backend.clone(), lease, "retry");
        }
        let backend = self.watched.backend.name();
        telemetry::release(backend, telemetry::release_outcome(&result), "explicit");
        self.count_end(backend);
        tracing::debug!(key = %self.key, ?result, "released");
        result
    }
}

impl LockGuard {
    /// The guard's end, for metrics: one fewer held lock, and a loss the backend signalled
    /// (counted here, as no watchdog call saw it happen).
    fn count_end(&self, backend: &'static str) {
        telemetry::held(backend, -1.0);
        if self.watched.guard.lost_by_backend_signal() {
            telemetry::loss(backend, "backend_signal");
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            // `release` has unwatched it already.
            return;
        }
        self.watchdog.unwatch(&self.watched);
        self.count_end(self.watched.backend.name());
        crate::detached::release_detached(
            self.watched.backend.clone(),
            self.watched.guard.lease(),
            "drop",
        );
    }
}
