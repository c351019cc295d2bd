//! `Locker`: waiting, retry, renewal and the lost signal over any backend.

use crate::guard::{GuardState, LockGuard};
use crate::telemetry;
use crate::watchdog::{Watchdog, lost_deadline};
use crate::{
    Attempt, Backoff, Capabilities, LeaseKind, LockBackend, LockError, LockKey, Releases, RwMode,
    validate_ttl,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

/// Options of one acquisition; a [`Locker`] holds defaults that each call can override.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LockOptions {
    /// Lease TTL: how long the lock outlives a holder that stops renewing. Default 30 s.
    pub ttl: Duration,
    /// How long `acquire` waits behind another holder. Zero (the default) tries once.
    pub wait: Duration,
    /// Delay between attempts when no release signal arrives.
    pub backoff: Backoff,
    /// Renew the lease in the background at TTL/3 while the guard lives. Default on.
    pub auto_renew: bool,
    /// At most this many further attempts after the first (`None`, the default: bounded by
    /// `wait` alone). With `wait` zero, the count alone bounds the wait; with both, whichever
    /// ends first. Each retry follows a backoff step (from `backoff.min`) or a release signal.
    /// A counted wait polls even on a backend with a fair queue, so every attempt is counted.
    pub retries: Option<u32>,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: Duration::from_secs(30),
            wait: Duration::ZERO,
            backoff: Backoff::default(),
            auto_renew: true,
            retries: None,
        }
    }
}

/// The client: acquire, try, or run a future under a lock, on any backend.
///
/// Cheap to clone (the backend is shared). Two `Locker`s — in one process or in many —
/// contend for real: the lock is not reentrant, a second acquisition of a held key waits.
#[derive(Clone, Debug)]
pub struct Locker {
    backend: Arc<dyn LockBackend>,
    /// The backend's capabilities, read once: they are constant for its life.
    caps: Capabilities,
    defaults: LockOptions,
    watchdog: Watchdog,
}

impl Locker {
    /// A locker over `backend` with default options.
    pub fn new(backend: impl LockBackend) -> Self {
        Self::from_arc(Arc::new(backend))
    }

    /// A locker over a shared backend.
    pub fn from_arc(backend: Arc<dyn LockBackend>) -> Self {
        Locker {
            caps: backend.capabilities(),
            backend,
            defaults: LockOptions::default(),
            watchdog: Watchdog::default(),
        }
    }

    /// The same locker with other default options.
    pub fn with_defaults(mut self, defaults: LockOptions) -> Self {
        self.defaults = defaults;
        self
    }

    /// The default options.
    pub fn defaults(&self) -> &LockOptions {
        &self.defaults
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn LockBackend> {
        &self.backend
    }

    /// Starts a request for `key` with this locker's defaults; set options on it, then call
    /// `acquire`, `try_acquire` or `run`.
    pub fn lock(&self, key: impl Into<String>) -> LockRequest<'_> {
        LockRequest {
            locker: self,
            key: key.into(),
            options: self.defaults,
            kind: LeaseKind::Lock,
            permits_misused: false,
        }
    }

    /// Starts a request for one permit of the counting semaphore `name`, which admits at
    /// most `limit` permits at once across every client (take several with
    /// [`LockRequest::permits`]). The guard is a [`LockGuard`] like a lock's: renewed while it
    /// lives, lost signal, fence, release. Every caller must use the same `limit` while
    /// permits are held (a different one is refused with `InvalidConfig`). A semaphore's name
    /// is its own: a lock of the same name is unrelated.
    ///
    /// ```
    /// # async fn demo(locker: lock_core::Locker) -> Result<(), lock_core::LockError> {
    /// use std::time::Duration;
    /// // At most 5 calls to the payment API at once, across every process.
    /// let permit = locker
    ///     .semaphore("api:payments", 5)
    ///     .wait(Duration::from_secs(10))
    ///     .acquire()
    ///     .await?;
    /// permit.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn semaphore(&self, name: impl Into<String>, limit: u32) -> LockRequest<'_> {
        LockRequest {
            kind: LeaseKind::Permits { limit, count: 1 },
            ..self.lock(name)
        }
    }

    /// A reader-writer lock named `name`: [`RwLockName::read`] for a shared guard (any number
    /// of readers), [`RwLockName::write`] for an exclusive one (one writer, no reader).
    /// Writers are not starved by a stream of readers: once a writer waits, new readers wait
    /// behind it ([`crate::WRITER_INTENT`]).
    pub fn rwlock(&self, name: impl Into<String>) -> RwLockName<'_> {
        RwLockName {
            locker: self,
            name: name.into(),
        }
    }

    /// Acquires `key`, waiting up to the default wait. `Err(Timeout)` if still held then.
    pub async fn acquire(&self, key: impl Into<String>) -> Result<LockGuard, LockError> {
        self.lock(key).acquire().await
    }

    /// One attempt: `Ok(None)` if someone else holds `key`.
    pub async fn try_acquire(
        &self,
        key: impl Into<String>,
    ) -> Result<Option<LockGuard>, LockError> {
        self.lock(key).try_acquire().await
    }

    /// Runs `work` while holding `key`, then releases. If the lock is lost midway, `work` is
    /// dropped and the result is `Err(Lost)`.
    pub async fn with_lock<F: Future>(
        &self,
        key: impl Into<String>,
        work: F,
    ) -> Result<F::Output, LockError> {
        self.lock(key).run(work).await
    }
}

/// A reader-writer lock's name, from [`Locker::rwlock`]: pick a side.
#[derive(Debug)]
#[must_use = "call read() or write()"]
pub struct RwLockName<'a> {
    locker: &'a Locker,
    name: String,
}

impl<'a> RwLockName<'a> {
    /// A request for a shared (reader) guard.
    pub fn read(self) -> LockRequest<'a> {
        LockRequest {
            kind: LeaseKind::Read,
            ..self.locker.lock(self.name)
        }
    }

    /// A request for the exclusive (writer) guard.
    pub fn write(self) -> LockRequest<'a> {
        LockRequest {
            kind: LeaseKind::Write,
            ..self.locker.lock(self.name)
        }
    }
}

/// One acquisition being configured: `locker.lock("k").wait(..).ttl(..).acquire().await`.
#[derive(Debug)]
#[must_use = "call acquire, try_acquire or run"]
pub struct LockRequest<'a> {
    locker: &'a Locker,
    key: String,
    options: LockOptions,
    /// A lock, semaphore permits, or a reader-writer side.
    kind: LeaseKind,
    /// `permits` was called on a request that is not a semaphore's: acquire refuses it.
    permits_misused: bool,
}

impl LockRequest<'_> {
    /// Lease TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = ttl;
        self
    }

    /// How long to wait behind another holder (zero: try once).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.options.wait = wait;
        self
    }

    /// Backoff between attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.options.backoff = backoff;
        self
    }

    /// Whether a watchdog renews the lease while the guard lives.
    pub fn auto_renew(mut self, auto_renew: bool) -> Self {
        self.options.auto_renew = auto_renew;
        self
    }

    /// How many of a semaphore's permits to take at once (default 1). Only for requests from
    /// [`Locker::semaphore`]; on any other request it is an `InvalidConfig` error at acquire.
    pub fn permits(mut self, count: u32) -> Self {
        match self.kind {
            LeaseKind::Permits { limit, .. } => self.kind = LeaseKind::Permits { limit, count },
            // Acquire reports the misuse.
            _ => self.permits_misused = true,
        }
        self
    }

    /// At most `retries` further attempts after the first (see [`LockOptions::retries`]): the
    /// `retryCount` / `maxRetries` of other lock libraries. Combine with
    /// [`retry_delay`](Self::retry_delay).
    pub fn retries(mut self, retries: u32) -> Self {
        self.options.retries = Some(retries);
        self
    }

    /// The first delay between attempts (then growing as [`Backoff`] does, capped at its
    /// `max`, which is raised to `delay` if smaller).
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.options.backoff.min = delay;
        self.options.backoff.max = self.options.backoff.max.max(delay);
        self
    }

    /// All options at once.
    pub fn options(mut self, options: LockOptions) -> Self {
        self.options = options;
        self
    }

    /// Acquires, waiting up to `wait` (and `retries`, if set); `Err(Timeout)` if still held
    /// then.
    pub async fn acquire(self) -> Result<LockGuard, LockError> {
        let key = self.key.clone();
        let started = Instant::now();
        let wait = self.options.wait;
        match self.acquire_inner(wait).await? {
            Some(guard) => Ok(guard),
            None => Err(LockError::Timeout {
                key,
                waited: started.elapsed(),
            }),
        }
    }

    /// One attempt: `Ok(None)` if someone else holds the key.
    pub async fn try_acquire(mut self) -> Result<Option<LockGuard>, LockError> {
        self.options.retries = None;
        self.acquire_inner(Duration::ZERO).await
    }

    /// Runs `work` under the lock (see [`Locker::with_lock`]).
    pub async fn run<F: Future>(self, work: F) -> Result<F::Output, LockError> {
        self.run_with(async move |_guard: &LockGuard| work.await)
            .await
    }

    /// Runs `work` under the lock, handing it the guard, so the critical section can pass
    /// [`LockGuard::fence`] to the resource it protects:
    ///
    /// ```
    /// # async fn demo(locker: lock_core::Locker) -> Result<(), lock_core::LockError> {
    /// let charged = locker
    ///     .lock("payment:42")
    ///     .run_with(async |guard| format!("charged with fence {:?}", guard.fence()))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// As with [`run`](Self::run): the work never starts on a lost guard, is dropped (and
    /// `Err(Lost)` returned) if the lock is lost midway, and the lock is released after.
    pub async fn run_with<F, T>(self, work: F) -> Result<T, LockError>
    where
        F: AsyncFnOnce(&LockGuard) -> T,
    {
        let guard = self.acquire().await?;
        supervise(guard, work).await
    }

    async fn acquire_inner(self, wait: Duration) -> Result<Option<LockGuard>, LockError> {
        let key = LockKey::new(self.key)?;
        let mut options = self.options;
        let kind = self.kind;
        if self.permits_misused {
            let what = match kind {
                LeaseKind::Read | LeaseKind::Write => "a reader-writer lock",
                _ => "a lock",
            };
            return Err(LockError::InvalidConfig(format!(
                "{key}: permits(..) applies only to a semaphore (Locker::semaphore), and this \
                 request is for {what}"
            )));
        }
        validate_ttl(options.ttl)?;
        let backend = self.locker.backend.clone();
        let caps = &self.locker.caps;
        crate::lease::check_usable_ttl(options.ttl, caps.min_ttl)?;
        match kind {
            LeaseKind::Permits { limit, count } => {
                if !caps.semaphores {
                    return Err(unsupported(&*backend, "semaphores"));
                }
                crate::memory::check_permits(&key, limit, count)?;
            }
            LeaseKind::Read | LeaseKind::Write if !caps.rw_locks => {
                return Err(unsupported(&*backend, "reader-writer locks"));
            }
            _ => {}
        }
        // A year at most between attempts: `Instant + Duration::MAX` would panic, and no wait
        // lasts longer than a year anyway.
        options.backoff.max = options.backoff.max.min(crate::MAX_TTL);
        options.backoff.min = options.backoff.min.min(options.backoff.max);
        if kind == LeaseKind::Write {
            // A waiting writer's mark must not lapse between two of its attempts.
            options.backoff.max = options.backoff.max.min(crate::WRITER_INTENT / 2);
            options.backoff.min = options.backoff.min.min(options.backoff.max);
        }
        let watchdog = self.locker.watchdog.clone();
        let span = tracing::debug_span!("acquire", key = %key, ttl = ?options.ttl, wait = ?wait);
        let backend_name = backend.name();
        let fair_queue = caps.fair_queue;
        let server_wait = caps.server_wait;
        let start = Instant::now();
        let outcome = async move {
            let deadline = wait_deadline(start, wait, options.retries);
            let waits = !wait.is_zero() || options.retries.is_some_and(|retries| retries > 0);
            let lease = if !waits {
                wait_loop(&backend, &key, &options, kind, start, server_wait).await?
            } else if options.retries.is_none() && kind == LeaseKind::Lock && fair_queue {
                queue_loop(&backend, &key, &options, deadline).await?
            } else {
                wait_loop(&backend, &key, &options, kind, deadline, server_wait).await?
            };
            let Some(lease) = lease else {
                tracing::debug!(waited = ?start.elapsed(), "not acquired");
                return Ok(None);
            };
            tracing::debug!(fence = ?lease.fence(), waited = ?start.elapsed(), "acquired");
            let watched = watchdog.watch(
                backend,
                GuardState::new(lease),
                options.ttl,
                options.auto_renew,
            );
            Ok(Some(LockGuard::new(watchdog, watched)))
        }
        .instrument(span)
        .await;
        let label = match &outcome {
            Ok(Some(_)) => "acquired",
            Ok(None) => "busy",
            Err(_) => "error",
        };
        telemetry::acquisition(backend_name, label, start.elapsed());
        outcome
    }
}

/// When a wait that started at `start` ends: after `wait`, or never (a year) when a retry
/// count alone bounds it (`wait` zero with `retries` set).
pub(crate) fn wait_deadline(start: Instant, wait: Duration, retries: Option<u32>) -> Instant {
    if retries.is_some() && wait.is_zero() {
        return start + crate::MAX_TTL;
    }
    start.checked_add(wait).unwrap_or(start + crate::MAX_TTL)
}

/// Runs `work` on a held guard: never on a lost one, dropped if the lock is lost midway,
/// released after.
pub(crate) async fn supervise<G, F, T>(guard: G, work: F) -> Result<T, LockError>
where
    G: Supervised,
    F: AsyncFnOnce(&G) -> T,
{
    // Never start the work on a guard that is already lost (or past its deadline without the
    // signal having fired yet).
    if guard.is_lost() {
        return Err(guard.into_lost_error());
    }
    let outcome = {
        let mut lost = std::pin::pin!(guard.lost_signal());
        let mut work = std::pin::pin!(work(&guard));
        // The deadline is checked before every poll of the work, not left to the lost signal
        // alone: that comes from the watchdog's timer, which a busy runtime handles late (a
        // current-thread runtime whose tasks keep waking each other polls its timers only
        // every few dozen polls), and the work must not run past it meanwhile.
        std::future::poll_fn(|cx| {
            if lost.as_mut().poll(cx).is_ready() || Instant::now() >= guard.stop_at() {
                return std::task::Poll::Ready(None);
            }
            work.as_mut().poll(cx).map(Some)
        })
        .await
    };
    match outcome {
        None => Err(guard.into_lost_error()),
        // The work's last poll ran past the deadline (it blocked the runtime: synchronous
        // I/O, CPU work): it was not stopped in time, and another holder may have acted
        // meanwhile, so it is not reported as done under the lock.
        Some(_) if guard.is_lost() || Instant::now() >= guard.stop_at() => {
            tracing::warn!(
                "the work finished after the lock's lost deadline (its last poll blocked \
                 past it); reported as lost"
            );
            Err(guard.into_lost_error())
        }
        Some(output) => {
            if let Err(error) = guard.release_after_work().await {
                tracing::warn!(%error, "release after the work failed; TTL will free the lock");
            }
            Ok(output)
        }
    }
}

/// What [`supervise`] needs of a guard (one key or several).
pub(crate) trait Supervised {
    fn is_lost(&self) -> bool;
    /// When the work must stop: the lost signal's deadline for the current lease(s).
    fn stop_at(&self) -> Instant;
    fn lost_signal(&self) -> tokio_util::sync::WaitForCancellationFutureOwned;
    /// Drops the guard (releasing in the background) and says why it was lost.
    fn into_lost_error(self) -> LockError;
    async fn release_after_work(self) -> Result<bool, LockError>;
}

impl Supervised for LockGuard {
    fn is_lost(&self) -> bool {
        LockGuard::is_lost(self)
    }
    fn stop_at(&self) -> Instant {
        self.lost_deadline()
    }
    fn lost_signal(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.lost()
    }
    fn into_lost_error(self) -> LockError {
        let reason = self
            .lost_reason()
            .unwrap_or_else(|| "the lease reached its validity deadline".into());
        LockError::lost(self.key().as_str(), reason)
    }
    async fn release_after_work(self) -> Result<bool, LockError> {
        self.release().await
    }
}

/// Waits in the backend's fair queue; a retryable failure (a partition that cost the waiter
/// its place, a timed-out request) rejoins the queue after a backoff step, until the deadline,
/// as the non-queued loop retries its attempts.
async fn queue_loop(
    backend: &Arc<dyn LockBackend>,
    key: &LockKey,
    options: &LockOptions,
    deadline: Instant,
) -> Result<Option<crate::Lease>, LockError> {
    let mut delays = options.backoff.delays();
    loop {
        telemetry::attempt(backend.name());
        match backend.acquire_queued(key, options.ttl, deadline).await {
            Ok(Some(lease)) if is_late(&lease) => {
                give_back_late(backend, lease);
                if Instant::now() >= deadline {
                    return Ok(None);
                }
            }
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                tracing::debug!(%error, "queued wait failed; rejoining");
            }
            outcome => return outcome,
        }
        let step = delays.next().unwrap_or(options.backoff.max);
        tokio::time::sleep_until((Instant::now() + step).min(deadline)).await;
    }
}

fn unsupported(backend: &dyn LockBackend, what: &str) -> LockError {
    LockError::InvalidConfig(format!(
        "the {} backend has no {what} (Capabilities says so)",
        backend.name()
    ))
}

/// Whether a grant came back too late to be used: at or past the moment the watchdog would
/// fire its lost signal (the validity deadline less the lost margin). An answer delayed by a
/// slow link or a paused client may arrive after the lease expired on the server, when
/// another client may already hold the key; such a lease is never handed out.
fn is_late(lease: &crate::Lease) -> bool {
    Instant::now() >= lost_deadline(lease)
}

/// Gives a late grant back in the background (it may still be ours on the server, e.g. when
/// the server extended it meanwhile); the caller keeps trying until its wait ends.
fn give_back_late(backend: &Arc<dyn LockBackend>, lease: crate::Lease) {
    telemetry::late_grant(backend.name());
    tracing::warn!(
        key = %lease.key(),
        late_by = ?Instant::now().saturating_duration_since(lost_deadline(&lease)),
        "a grant arrived too close to or past its validity deadline; giving it back"
    );
    crate::detached::release_detached(backend.clone(), lease, "late_grant");
}

/// subscribe → try → wait for a release or the next backoff step → try again.
async fn wait_loop(
    backend: &Arc<dyn LockBackend>,
    key: &LockKey,
    options: &LockOptions,
    kind: LeaseKind,
    deadline: Instant,
    // `Capabilities::server_wait`, read once by the caller.
    server_wait: bool,
) -> Result<Option<crate::Lease>, LockError> {
    let mut releases: Option<Releases> = None;
    // Built on the first wait only: an attempt that gets the lock at once needs no delays.
    let mut delays = None;
    // Attempts left after a wait, when counted (the re-check right after subscribing is part
    // of the first attempt, not a retry).
    let mut retries_left = options.retries;
    loop {
        telemetry::attempt(backend.name());
        let outcome = InFlightAttempt::start(backend, key, options.ttl, kind).await;
        let now = Instant::now();
        let expires_in = match outcome {
            Ok(Attempt::Acquired(lease)) if !is_late(&lease) => {
                if let Some(releases) = releases.as_mut() {
                    releases.mark_acquired();
                }
                return Ok(Some(lease.with_kind(kind)));
            }
            Ok(Attempt::Acquired(lease)) => {
                give_back_late(backend, lease);
                None
            }
            Ok(Attempt::Held { expires_in }) => expires_in,
            Err(error) if error.is_retryable() && now < deadline => {
                tracing::debug!(%error, "attempt failed; retrying");
                None
            }
            Err(error) => return Err(error),
        };
        if now >= deadline {
            return Ok(None);
        }
        if releases.is_some() {
            match retries_left.as_mut() {
                Some(0) => return Ok(None),
                Some(left) => *left -= 1,
                None => {}
            }
        }
        if releases.is_none() {
            // Subscribe, then try again at once: a release between the failed attempt and
            // the subscription would otherwise be missed.
            let mut subscription = if server_wait && kind == LeaseKind::Lock {
                backend.subscribe_server_waiter(key).await?
            } else {
                backend.subscribe(key).await?
            };
            if kind == LeaseKind::Lock {
                // One release lets one lock holder in: wake one local waiter per release,
                // not all of them (each would spend a round trip to find it taken).
                subscription.take_turns();
            }
            releases = Some(subscription);
            continue;
        }
        let step = delays
            .get_or_insert_with(|| options.backoff.delays())
            .next()
            .unwrap_or(options.backoff.max);
        let mut until = now + step;
        // A backend may answer `Duration::MAX` for a holder without expiry.
        if let Some(free_at) = expires_in.and_then(|remaining| {
            now.checked_add(remaining.saturating_add(Duration::from_millis(1)))
        }) {
            until = until.min(free_at);
        }
        let until = until.min(deadline);
        if let Some(releases) = releases.as_mut() {
            if server_wait && kind == LeaseKind::Lock {
                // The server grants the lock at its release: no need to poll on a jittered
                // step. One wait per backoff ceiling still ends in an attempt (a silent
                // waiting connection must not hide a free lock for long); a counted wait
                // (`retries`) keeps its steps.
                let server_until = if options.retries.is_none() {
                    (now + options.backoff.max).min(deadline)
                } else {
                    until
                };
                match backend.wait_on_server(key, options.ttl, server_until).await {
                    Ok(Some(lease)) if !is_late(&lease) => {
                        releases.mark_acquired();
                        return Ok(Some(lease.with_kind(kind)));
                    }
                    Ok(Some(lease)) => give_back_late(backend, lease),
                    // Waited until `until` (the wait below then returns at once), or could
                    // not wait on the server: wait for a release signal instead.
                    Ok(None) => {}
                    Err(error) if error.is_retryable() => {
                        tracing::debug!(%error, "waiting on the server failed; waiting for a release");
                    }
                    Err(error) => return Err(error),
                }
            }
            let wake = releases.next(until).await;
            telemetry::wakeup(backend.name(), matches!(wake, crate::Wake::Released));
            tracing::trace!(?wake, "woke");
        }
    }
}

type AttemptFuture = Pin<Box<dyn Future<Output = Result<Attempt, LockError>> + Send>>;

/// One `try_acquire` in flight. If it is dropped before it finishes (the caller's `acquire`
/// was cancelled), the attempt is finished in the background and a lease it was granted is
/// released, so cancellation never leaves a lock behind.
struct InFlightAttempt {
    attempt: Option<AttemptFuture>,
    backend: Arc<dyn LockBackend>,
}

impl InFlightAttempt {
    fn start(
        backend: &Arc<dyn LockBackend>,
        key: &LockKey,
        ttl: Duration,
        kind: LeaseKind,
    ) -> Self {
        let owned_backend = backend.clone();
        let key = key.clone();
        InFlightAttempt {
            attempt: Some(Box::pin(async move {
                match kind {
                    LeaseKind::Permits { limit, count } => {
                        owned_backend
                            .try_acquire_permits(&key, limit, count, ttl)
                            .await
                    }
                    LeaseKind::Read => owned_backend.try_acquire_rw(&key, RwMode::Read, ttl).await,
                    LeaseKind::Write => {
                        owned_backend.try_acquire_rw(&key, RwMode::Write, ttl).await
                    }
                    _ => owned_backend.try_acquire(&key, ttl).await,
                }
            })),
            backend: backend.clone(),
        }
    }
}

impl Future for InFlightAttempt {
    type Output = Result<Attempt, LockError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(attempt) = self.attempt.as_mut() else {
            return Poll::Ready(Err(LockError::InvalidConfig(
                "attempt polled after completion".into(),
            )));
        };
        let output = std::task::ready!(attempt.as_mut().poll(cx));
        self.attempt = None;
        Poll::Ready(output)
    }
}

impl Drop for InFlightAttempt {
    fn drop(&mut self) {
        let Some(attempt) = self.attempt.take() else {
            return;
        };
        let backend = self.backend.clone();
        // Finished in the background (outside a runtime too): the attempt may be on the wire.
        crate::detached::run_detached(async move {
            if let Ok(Attempt::Acquired(lease)) = attempt.await {
                tracing::debug!(key = %lease.key(), "releasing a lease granted to a cancelled acquire");
                // Retried like any background release: one failed try left the lock to its TTL.
                crate::detached::release_detached(backend, lease, "cancelled");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Capabilities, Lease, MemoryBackend};
    use async_trait::async_trait;
    use tokio_util::sync::CancellationToken;

    /// A memory backend whose first `failures` releases fail with a retryable error.
    #[derive(Debug)]
    struct FlakyReleases {
        inner: MemoryBackend,
        failures: Arc<std::sync::atomic::AtomicU32>,
    }

    #[async_trait]
    impl LockBackend for FlakyReleases {
        async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
            self.inner.try_acquire(key, ttl).await
        }
        async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
            self.inner.renew(lease, ttl).await
        }
        async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
            let left = self.failures.load(std::sync::atomic::Ordering::SeqCst);
            if left > 0 {
                self.failures
                    .store(left - 1, std::sync::atomic::Ordering::SeqCst);
                return Err(LockError::backend_msg("flaky", "connection reset", true));
            }
            self.inner.release(lease).await
        }
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
    }

    /// Finding (review, 2026-12-03): a release that failed with a retryable error was
    /// tried once, and the guard was gone: the key stayed held for the rest of its TTL
    /// (30 s here), every waiter timing out. It is retried in the background now.
    #[tokio::test]
    async fn a_release_that_fails_is_retried_in_the_background() {
        let failures = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let locker = Locker::new(FlakyReleases {
            inner: MemoryBackend::new(),
            failures: failures.clone(),
        });
        let flaky = |n| failures.store(n, std::sync::atomic::Ordering::SeqCst);
        let request = || {
            locker
                .lock("k")
                .ttl(Duration::from_secs(30))
                .wait(Duration::from_secs(3))
        };
        // An explicit release: the error is returned, and the release goes on.
        let guard = request().acquire().await.unwrap();
        flaky(2);
        assert!(
            guard
                .release()
                .await
                .is_err_and(|error| error.is_retryable())
        );
        // Dropped, and released after the work of `run`.
        let guard = request()
            .acquire()
            .await
            .expect("the key stayed held after a failed release");
        flaky(2);
        drop(guard);
        request()
            .run(async {
                flaky(2);
            })
            .await
            .expect("the key stayed held after a dropped guard's failed release");
        let last = request().acquire().await;
        assert!(
            last.is_ok(),
            "the key stayed held after run's failed release: {last:?}"
        );
    }

    /// Grants answering 50 ms after the call, over [`FlakyReleases`].
    #[derive(Debug)]
    struct SlowGrants(FlakyReleases);

    #[async_trait]
    impl LockBackend for SlowGrants {
        async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.0.try_acquire(key, ttl).await
        }
        async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
            self.0.renew(lease, ttl).await
        }
        async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
            self.0.release(lease).await
        }
        fn capabilities(&self) -> Capabilities {
            self.0.capabilities()
        }
    }

    /// Finding (Redlock review, 2026-12-04): the grant that answered a cancelled acquire was
    /// released with one try; a retryable failure left the key held for its whole TTL
    /// (30 s here). It is released as any background release now, retried until it expires.
    #[tokio::test]
    async fn a_cancelled_acquires_grant_is_released_despite_a_failed_try() {
        let failures = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let locker = Locker::new(SlowGrants(FlakyReleases {
            inner: MemoryBackend::new(),
            failures: failures.clone(),
        }));
        let cancelled = tokio::time::timeout(
            Duration::from_millis(10),
            locker.lock("k").ttl(Duration::from_secs(30)).acquire(),
        )
        .await;
        assert!(
            cancelled.is_err(),
            "the acquire was not cut off: {cancelled:?}"
        );
        // The grant lands about 40 ms later; its first release fails.
        failures.store(1, std::sync::atomic::Ordering::SeqCst);
        let next = locker
            .lock("k")
            .ttl(Duration::from_secs(30))
            .wait(Duration::from_secs(3))
            .acquire()
            .await;
        assert!(
            next.is_ok(),
            "the cancelled acquire's grant stayed held after one failed release: {next:?}"
        );
    }

    /// `permits` on a lock or a reader-writer request says so (it once said "a limit of 0
    /// permits admits nobody", a limit the caller never set), and takes nothing.
    #[tokio::test]
    async fn permits_on_a_request_that_is_not_a_semaphore_is_named() {
        let locker = Locker::new(MemoryBackend::new());
        for (request, what) in [
            (locker.lock("k").permits(2), "for a lock"),
            (locker.rwlock("k").read().permits(2), "reader-writer"),
            (locker.rwlock("k").write().permits(1), "reader-writer"),
        ] {
            match request.try_acquire().await {
                Err(LockError::InvalidConfig(message)) => {
                    assert!(message.contains("Locker::semaphore"), "{message}");
                    assert!(message.contains(what), "{message}");
                }
                other => panic!("expected InvalidConfig, got {other:?}"),
            }
        }
        assert!(locker.lock("k").try_acquire().await.unwrap().is_some());
    }

    /// A memory backend that attaches one shared lost signal to every lease, as a backend
    /// does for all leases on one server session.
    #[derive(Debug, Default)]
    struct SessionBackend {
        inner: MemoryBackend,
        session_gone: CancellationToken,
    }

    #[async_trait]
    impl LockBackend for SessionBackend {
        async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
            Ok(match self.inner.try_acquire(key, ttl).await? {
                Attempt::Acquired(lease) => {
                    Attempt::Acquired(lease.with_lost_signal(self.session_gone.clone()))
                }
                held => held,
            })
        }
        async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
            self.inner.renew(lease, ttl).await
        }
        async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
            self.inner.release(lease).await
        }
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
    }

    /// A TTL that clock drift and the lost margin would use up entirely is refused, not
    /// granted and given back as late on every attempt until the wait ends. So is one that
    /// leaves less than its first renewal needs (a third of it, plus a timer's millisecond):
    /// 5–7 ms were accepted and every such lock was reported lost before it could be renewed
    /// (facade review, 2026-12-04).
    #[tokio::test]
    async fn a_ttl_too_short_to_use_is_invalid() {
        let locker = Locker::new(MemoryBackend::new());
        for ttl in [1, 3, 4, 5, 6, 7] {
            let outcome = locker
                .lock("short")
                .ttl(Duration::from_millis(ttl))
                .wait(Duration::from_millis(50))
                .acquire()
                .await;
            assert!(
                matches!(outcome, Err(LockError::InvalidTtl { .. })),
                "{ttl} ms: {outcome:?}"
            );
        }
        let guard = locker
            .lock("short")
            .ttl(Duration::from_millis(20))
            .acquire()
            .await
            .unwrap();
        guard.release().await.unwrap();
    }

    // Paused clock: the loop never idles, so time stands still and the idle tick cannot add
    // a look, however slow the machine.
    #[tokio::test(start_paused = true)]
    async fn busy_lock_loop_does_not_wake_the_watchdog_per_acquire() {
        let locker = Locker::new(MemoryBackend::new());
        for _ in 0..200 {
            let guard = locker.acquire("busy").await.unwrap();
            assert!(guard.release().await.unwrap());
            // Let the watchdog task run between two locks, as a real backend's I/O does.
            tokio::task::yield_now().await;
        }
        // Once to start, maybe once more on its idle tick; it used to look once per acquire.
        let looks = locker.watchdog.looks();
        assert!(
            looks <= 3,
            "the watchdog task looked {looks} times for 200 locks"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lease_due_after_the_idle_tick_is_still_renewed() {
        let locker = Locker::new(MemoryBackend::new());
        // Locks that come and go: the task finds its queue empty and plans its idle tick.
        for _ in 0..3 {
            locker
                .acquire("first")
                .await
                .unwrap()
                .release()
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
        // Due for renewal (2 s) after that tick (1 s): queueing it wakes nobody, so the task
        // must find it when the tick comes.
        let guard = locker
            .lock("second")
            .ttl(Duration::from_secs(6))
            .acquire()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!guard.is_lost(), "{:?}", guard.lost_reason());
        assert!(guard.valid_until() > Instant::now());
    }

    #[tokio::test]
    async fn backend_lost_signal_fires_every_guard_at_once() {
        let backend = Arc::new(SessionBackend::default());
        let locker = Locker::from_arc(backend.clone());
        let first = locker.acquire("a").await.unwrap();
        let second = locker.acquire("b").await.unwrap();
        assert!(!first.is_lost() && !second.is_lost());
        backend.session_gone.cancel();
        tokio::time::timeout(Duration::from_millis(100), first.lost())
            .await
            .expect("lost() did not fire on the backend's signal");
        assert!(second.is_lost());
        assert!(first.lost_reason().is_some());
        // Cancelling the guard's own token (a child) never reaches the backend's.
        let other = SessionBackend::default();
        let locker = Locker::from_arc(Arc::new(other));
        let guard = locker.acquire("c").await.unwrap();
        guard.lost_token().cancel();
        assert!(!guard.is_lost());
    }

    /// A backend that raises every TTL to 2 s (as etcd raises 100 ms to its minimum) and whose
    /// renewals fail: the watchdog's retries must follow the granted TTL, not the requested one.
    #[derive(Debug, Default)]
    struct RaisedTtlBackend {
        inner: MemoryBackend,
        renew_calls: std::sync::atomic::AtomicU64,
    }

    const RAISED_TTL: Duration = Duration::from_secs(2);

    #[async_trait]
    impl LockBackend for RaisedTtlBackend {
        async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
            self.inner.try_acquire(key, ttl.max(RAISED_TTL)).await
        }
        async fn renew(&self, _lease: &Lease, _ttl: Duration) -> Result<Lease, LockError> {
            self.renew_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(LockError::backend_msg("test", "server unreachable", true))
        }
        async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
            self.inner.release(lease).await
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                min_ttl: RAISED_TTL,
                ..self.inner.capabilities()
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renew_retries_follow_the_granted_ttl() {
        let backend = Arc::new(RaisedTtlBackend::default());
        let locker = Locker::from_arc(backend.clone());
        let guard = locker
            .lock("raised")
            .ttl(Duration::from_millis(100))
            .acquire()
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), guard.lost())
            .await
            .expect("lost() never fired");
        let calls = backend
            .renew_calls
            .load(std::sync::atomic::Ordering::SeqCst);
        // From TTL/3 to the lost deadline (~1.2 s) at 40 ms doubling to 200 ms: about 10.
        assert!(
            calls <= 20,
            "{calls} renew calls during one outage of a 2 s lease"
        );
    }

    /// Counts attempts (so a retry count can be checked exactly) and records when each key
    /// was renewed.
    #[derive(Debug, Default)]
    struct CountingBackend {
        inner: MemoryBackend,
        attempts: std::sync::atomic::AtomicU64,
        renewed: std::sync::Mutex<Vec<(String, Instant)>>,
    }

    #[async_trait]
    impl LockBackend for CountingBackend {
        async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
            self.attempts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.try_acquire(key, ttl).await
        }
        async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
            self.renewed
                .lock()
                .unwrap()
                .push((lease.key().as_str().to_owned(), Instant::now()));
            self.inner.renew(lease, ttl).await
        }
        async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
            self.inner.release(lease).await
        }
        async fn subscribe(&self, key: &LockKey) -> Result<Releases, LockError> {
            self.inner.subscribe(key).await
        }
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
    }

    /// #13: renewals falling due close together leave together (one look of the watchdog,
    /// so a backend can batch them), up to a tenth of the renewal period early; a lease
    /// without auto-renew is never attended early. Paused time: on the real clock a loaded
    /// machine's late wake-ups moved the two leases apart.
    #[tokio::test(start_paused = true)]
    async fn renewals_due_close_together_are_sent_together() {
        let backend = Arc::new(CountingBackend::default());
        let locker = Locker::from_arc(backend.clone());
        let ttl = Duration::from_secs(3);
        let first = locker.lock("first").ttl(ttl).acquire().await.unwrap();
        // 60 ms later: within TTL/30 = 100 ms of the first one's renewal.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let asked = Instant::now();
        let second = locker.lock("second").ttl(ttl).acquire().await.unwrap();
        let by = Instant::now() + ttl;
        while backend.renewed.lock().unwrap().len() < 2 {
            assert!(Instant::now() < by, "not renewed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let renewed = backend.renewed.lock().unwrap().clone();
        let apart = renewed[1].1.duration_since(renewed[0].1);
        assert!(
            apart < Duration::from_millis(25),
            "renewals due 60 ms apart were sent {apart:?} apart: {renewed:?}"
        );
        // Renewed no earlier than a tenth of the period ahead of its due time.
        let second_at = renewed.iter().find(|(key, _)| key == "second").unwrap().1;
        assert!(
            second_at >= asked + ttl / 3 - ttl / 30,
            "the second lease was renewed {:?} after it was taken, more than TTL/30 early",
            second_at.duration_since(asked)
        );
        drop((first, second));
    }

    /// #13: a release wakes one local lock waiter, not all of them; and the line moves on
    /// to every waiter (none is left asleep while the key is free).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_costs_one_attempt_however_many_wait() {
        const WAITERS: usize = 20;
        let backend = Arc::new(CountingBackend::default());
        let locker = Locker::from_arc(backend.clone());
        let held = locker.acquire("line").await.unwrap();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..WAITERS {
            let (locker, done_tx) = (locker.clone(), done_tx.clone());
            tokio::spawn(async move {
                // Backoff far beyond the test: only release signals wake these waiters.
                let guard = locker
                    .lock("line")
                    .wait(Duration::from_secs(30))
                    .retry_delay(Duration::from_secs(20))
                    .acquire()
                    .await;
                let _ = done_tx.send(guard);
            });
        }
        let attempts = || backend.attempts.load(std::sync::atomic::Ordering::SeqCst);
        // Every waiter made its first attempt and its re-check after subscribing.
        let settled_by = Instant::now() + Duration::from_secs(5);
        while attempts() < 1 + 2 * WAITERS as u64 {
            assert!(Instant::now() < settled_by, "waiters did not start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = attempts();
        held.release().await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(2), done_rx.recv())
            .await
            .expect("no waiter got the released lock within 2 s")
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let spent = attempts() - before;
        assert!(
            spent <= 2,
            "one release made {spent} attempts among {WAITERS} waiters (one wake each?)"
        );
        // Each holder hands on: every waiter gets the lock, one release at a time.
        first.release().await.unwrap();
        for served in 1..WAITERS {
            let guard = tokio::time::timeout(Duration::from_secs(2), done_rx.recv())
                .await
                .unwrap_or_else(|_| panic!("waiter {served} never woke after a release"))
                .unwrap()
                .unwrap();
            guard.release().await.unwrap();
        }
        let total = attempts() - before;
        assert!(
            total <= 2 * WAITERS as u64,
            "{total} attempts for {WAITERS} hand-offs"
        );
    }

    #[tokio::test]
    async fn retries_count_attempts_and_are_the_only_bound_without_wait() {
        let backend = Arc::new(CountingBackend::default());
        let holder = Locker::from_arc(backend.clone());
        let _held = holder.acquire("busy").await.unwrap();
        let before = backend.attempts.load(std::sync::atomic::Ordering::SeqCst);
        let started = Instant::now();
        let outcome = holder
            .lock("busy")
            .retries(3)
            .retry_delay(Duration::from_millis(10))
            .acquire()
            .await;
        assert!(
            matches!(outcome, Err(LockError::Timeout { .. })),
            "{outcome:?}"
        );
        let attempts = backend.attempts.load(std::sync::atomic::Ordering::SeqCst) - before;
        // The first attempt, its re-check after subscribing, then three retries.
        assert_eq!(attempts, 5, "attempts for retries(3)");
        assert!(started.elapsed() < Duration::from_secs(2));
        // A release within the retries is taken.
        let held = holder.acquire("handed").await.unwrap();
        let waiter = tokio::spawn({
            let holder = holder.clone();
            async move {
                holder
                    .lock("handed")
                    .retries(50)
                    .retry_delay(Duration::from_millis(20))
                    .acquire()
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        held.release().await.unwrap();
        waiter.await.unwrap().unwrap().release().await.unwrap();
        // With a wait as well, whichever ends first: here the wait.
        let _held = holder.acquire("both").await.unwrap();
        let started = Instant::now();
        let outcome = holder
            .lock("both")
            .retries(1_000)
            .retry_delay(Duration::from_millis(5))
            .wait(Duration::from_millis(100))
            .acquire()
            .await;
        assert!(matches!(outcome, Err(LockError::Timeout { .. })));
        assert!(started.elapsed() < Duration::from_millis(600));
    }

    #[tokio::test]
    async fn run_with_hands_the_guard_to_the_work() {
        let locker = Locker::new(MemoryBackend::new());
        let fence = locker
            .lock("fenced")
            .run_with(async |guard| guard.fence())
            .await
            .unwrap();
        assert!(fence.is_some());
        // Released after: the next holder gets a higher fence.
        let next = locker.acquire("fenced").await.unwrap();
        assert!(next.fence() > fence);
    }
}
