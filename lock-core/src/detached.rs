//! Work that must finish after its caller is gone: a guard's release on drop, a grant given
//! back. It runs on the current Tokio runtime; outside any runtime (a guard dropped after
//! `block_on` returned), or when the runtime drops it unrun (it was shutting down), it runs on
//! a short-lived thread of its own, so that a lock is released now rather than at its TTL.

use crate::telemetry;
use crate::{Lease, LockBackend};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Longest a fallback thread waits for its work: a backend whose connections belong to a
/// runtime that no longer runs cannot answer, and the TTL frees the lock then anyway.
const THREAD_BOUND: Duration = Duration::from_secs(10);

/// Runs `work` in the background: on the current runtime, or on a thread of its own.
pub(crate) fn run_detached<F>(work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(work);
        }
        Err(_) => on_own_thread(work),
    }
}

/// Runs `work` on a new thread with a current-thread runtime, at most [`THREAD_BOUND`].
fn on_own_thread<F>(work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let spawned = std::thread::Builder::new()
        .name("distlock-release".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(async move {
                    let _ = tokio::time::timeout(THREAD_BOUND, work).await;
                }),
                Err(error) => tracing::warn!(%error, "no runtime for a background release"),
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no thread for a background release; TTL will free the lock");
    }
}

/// Releases `lease` in the background (`why`: the metric label, e.g. `"drop"`). If the
/// runtime drops the release unfinished (it was shutting down), it is sent again from a
/// thread of its own: a release is idempotent (it compares the owner token).
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
    /// False on the fallback thread: one retry, never a chain of them.
    again_on_drop: bool,
}

impl Release {
    async fn run(mut self) {
        let result = self.backend.release(&self.lease).await;
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
        on_own_thread(again.run());
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
