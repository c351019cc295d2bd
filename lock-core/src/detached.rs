//! Work that must finish after its caller is gone: a guard's release on drop, a grant given
//! back, a cancelled attempt's grant. It runs on the current Tokio runtime; outside any
//! runtime (a guard dropped after `block_on` returned), on one background runtime of this
//! process, started on first use (one thread); and a release that its runtime drops unrun (it
//! was shutting down) is sent again there. So a lock is released now rather than at its TTL,
//! and what the backend spawns on the way (a clean-up worker, a connection probe) keeps
//! running afterwards. Not covered: a cancelled attempt's in-flight call that a shutting-down
//! runtime drops unrun (the call cannot be re-created; a grant it got runs out by its TTL).

use crate::telemetry;
use crate::{Lease, LockBackend};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Longest background work may take there: a backend whose connections belong to a runtime
/// that no longer runs cannot answer, and the TTL frees the lock then anyway.
const BACKGROUND_BOUND: Duration = Duration::from_secs(10);

/// The process's background runtime: one worker thread, started on first use, never shut
/// down (it lives as long as the process, as a global executor does). `None` if it could not
/// be started. The client runs work there that must not depend on a caller's runtime
/// (releases after the caller is gone, the watchdog of guards acquired outside Tokio); a
/// backend may run its long-lived tasks there for the same reason (lock-etcd does).
pub fn background_runtime() -> Option<&'static tokio::runtime::Handle> {
    static BACKGROUND: OnceLock<Option<tokio::runtime::Handle>> = OnceLock::new();
    BACKGROUND
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("distlock-background")
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => {
                    let handle = runtime.handle().clone();
                    // Never dropped: its worker runs what is spawned on it for good.
                    std::mem::forget(runtime);
                    Some(handle)
                }
                Err(error) => {
                    tracing::warn!(%error, "no background runtime; TTLs will free locks dropped outside a runtime");
                    None
                }
            }
        })
        .as_ref()
}

/// The background runtime when the caller's context may go undriven while plain code waits
/// on a token: a current-thread runtime (driven only inside `block_on`), or no runtime. A
/// multi-thread runtime's workers drive it whatever the caller does: `None` there.
pub(crate) fn background_if_undriven() -> Option<&'static tokio::runtime::Handle> {
    let undriven_risk = tokio::runtime::Handle::try_current()
        .ok()
        .is_none_or(|current| {
            current.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
        });
    undriven_risk.then(background_runtime).flatten()
}

/// Spawns a backend's long-lived task (a release listener, a reaper, a heartbeat, a
/// connection probe) where no caller's runtime can end it: on [`background_runtime`], else on
/// the current runtime. A task spawned on a caller's runtime dies when that runtime shuts
/// down (the first `#[tokio::test]` of a backend kept in a `static`, a short-lived runtime at
/// start-up) and stalls while it is not driven; the backend would live on without it
/// (conformance: `backend_outlives_the_runtime_that_connected_it`). `None` outside any
/// runtime when the background runtime could not be started.
pub fn spawn_background<F>(task: F) -> Option<tokio::task::JoinHandle<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match background_runtime() {
        Some(background) => Some(background.spawn(task)),
        None => tokio::runtime::Handle::try_current()
            .ok()
            .map(|runtime| runtime.spawn(task)),
    }
}

/// Spawns a backend's long-lived task that should run beside the connections it serves (on
/// the current runtime: their sockets are read by that runtime's driver, so a task elsewhere
/// would take a runtime that is merely busy for a silent peer, and every wake-up it gives a
/// waiter would cross threads), yet must not end with that runtime. If the runtime drops the
/// task unfinished (it shut down: the first `#[tokio::test]` of a backend kept in a
/// `static`), `task` is called again and the new future runs on [`background_runtime`].
/// Cancelling `stop` ends the task wherever it runs (the backend was dropped). A task that
/// panics is not started again. Outside a runtime it starts on the background runtime.
pub fn spawn_resident<F, Fut>(stop: tokio_util::sync::CancellationToken, task: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let home = tokio::runtime::Handle::try_current()
        .ok()
        .or_else(|| background_runtime().cloned());
    if let Some(home) = home {
        home.spawn(Resident::new(stop, Arc::new(task)));
    }
}

/// A [`spawn_resident`] task: its future, and how to make it again.
struct Resident<F, Fut>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    stop: tokio_util::sync::CancellationToken,
    /// Ready once `stop` is cancelled (kept across polls: it holds the task's wake-up).
    stopped: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    task: Arc<F>,
    running: std::pin::Pin<Box<Fut>>,
    ended: bool,
    /// Set while `running` is polled: still set at drop, the poll panicked.
    in_poll: bool,
}

impl<F, Fut> Resident<F, Fut>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn new(stop: tokio_util::sync::CancellationToken, task: Arc<F>) -> Self {
        Resident {
            stopped: Box::pin(stop.clone().cancelled_owned()),
            stop,
            running: Box::pin(task()),
            task,
            ended: false,
            in_poll: false,
        }
    }
}

impl<F, Fut> Future for Resident<F, Fut>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = &mut *self;
        if this.stopped.as_mut().poll(cx).is_ready() {
            this.ended = true;
            return std::task::Poll::Ready(());
        }
        this.in_poll = true;
        let ready = this.running.as_mut().poll(cx).is_ready();
        this.in_poll = false;
        if ready {
            this.ended = true;
            return std::task::Poll::Ready(());
        }
        std::task::Poll::Pending
    }
}

impl<F, Fut> Drop for Resident<F, Fut>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn drop(&mut self) {
        // A task whose poll panicked would panic again: not started again. (Not
        // `thread::panicking()`: a runtime dropped while its thread unwinds, a failed
        // `#[tokio::test]`, drops its tasks during that unwind, and they must go on.)
        if self.ended || self.in_poll || self.stop.is_cancelled() {
            return;
        }
        // Dropped unfinished: its runtime shut down. The background runtime never does.
        if let Some(background) = background_runtime() {
            tracing::debug!("a backend task's runtime shut down; it goes on in the background");
            // `task` runs in the background runtime's context: anything it spawns or arms
            // before its future is first polled must not land on the runtime going away.
            let _context = background.enter();
            background.spawn(Resident::new(self.stop.clone(), self.task.clone()));
        }
    }
}

/// Runs `work` in the background: on the current runtime, or on the background runtime
/// (bounded by [`BACKGROUND_BOUND`]).
pub(crate) fn run_detached<F>(work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(work);
        }
        Err(_) => on_background(work),
    }
}

fn on_background<F>(work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    if let Some(background) = background_runtime() {
        background.spawn(async move {
            let _ = tokio::time::timeout(BACKGROUND_BOUND, work).await;
        });
    }
}

/// Releases `lease` in the background (`why`: the metric label, e.g. `"drop"`). If the
/// runtime drops the release unfinished (it was shutting down), it is sent again on the
/// background runtime: a release is idempotent (it compares the owner token).
pub(crate) fn release_detached(backend: Arc<dyn LockBackend>, lease: Lease, why: &'static str) {
    let release = Release {
        backend,
        lease,
        why,
        done: false,
        again_on_drop: true,
    };
    run_detached(release.run());
}

struct Release {
    backend: Arc<dyn LockBackend>,
    lease: Lease,
    why: &'static str,
    done: bool,
    /// False for the second sending: once again at most, never a chain.
    again_on_drop: bool,
}

impl Release {
    async fn run(mut self) {
        // A retryable failure is tried again until the key would expire by its TTL anyway:
        // one attempt left the lock to every waiter's timeout for the rest of that TTL.
        // Checked: a hand-written backend's lease may carry an absurd TTL.
        let expires = self
            .lease
            .sent_at()
            .checked_add(self.lease.ttl())
            .unwrap_or_else(|| self.lease.valid_until());
        let mut pause = Duration::from_millis(50);
        let result = loop {
            let result = self.backend.release(&self.lease).await;
            match &result {
                Err(error)
                    if error.is_retryable() && tokio::time::Instant::now() + pause < expires =>
                {
                    tracing::debug!(key = %self.lease.key(), %error, why = self.why, "background release failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                _ => break result,
            }
        };
        self.done = true;
        telemetry::release(
            self.backend.name(),
            telemetry::release_outcome(&result),
            self.why,
        );
        match result {
            Ok(released) => {
                tracing::debug!(key = %self.lease.key(), released, why = self.why, "released in the background")
            }
            Err(error) => {
                tracing::warn!(key = %self.lease.key(), %error, why = self.why, "background release failed; TTL will free it")
            }
        }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.done || !self.again_on_drop {
            return;
        }
        let again = Release {
            backend: self.backend.clone(),
            lease: self.lease.clone(),
            why: self.why,
            done: false,
            again_on_drop: false,
        };
        on_background(again.run());
    }
}

#[cfg(test)]
mod tests {
    use crate::{Locker, MemoryBackend};
    use std::time::{Duration, Instant};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Polls until `key` can be taken again, at most 2 s (its TTL is 30 s).
    fn released_soon(locker: &Locker, key: &str) -> bool {
        let runtime = runtime();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            if runtime
                .block_on(locker.lock(key).try_acquire())
                .unwrap()
                .is_some()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// A guard dropped outside any runtime (after `block_on` returned) is released, not left
    /// to its TTL.
    #[test]
    fn a_guard_dropped_outside_a_runtime_is_released() {
        let locker = Locker::new(MemoryBackend::new());
        let runtime = runtime();
        let guard = runtime
            .block_on(
                locker
                    .lock("outside")
                    .ttl(Duration::from_secs(30))
                    .acquire(),
            )
            .unwrap();
        drop(guard);
        assert!(released_soon(&locker, "outside"));
    }

    /// A guard held by a task of a runtime that shuts down is released.
    #[test]
    fn a_guard_dropped_with_its_runtime_is_released() {
        let locker = Locker::new(MemoryBackend::new());
        let runtime = runtime();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let holder = locker.clone();
        runtime.spawn(async move {
            let guard = holder
                .lock("shutdown")
                .ttl(Duration::from_secs(30))
                .acquire()
                .await;
            let _ = held_tx.send(());
            std::future::pending::<()>().await;
            drop(guard);
        });
        runtime.block_on(async {
            while held_rx.try_recv().is_err() {
                tokio::task::yield_now().await;
            }
        });
        drop(runtime);
        assert!(released_soon(&locker, "shutdown"));
    }
}
