//! Where the etcd client and the backend's long-lived tasks run: lock-core's background
//! runtime ([`lock_core::background_runtime`], one worker thread per process, never shut
//! down), not a caller's.
//!
//! tonic runs a channel's worker (and the connections under it) as tasks of the runtime that
//! built the channel, and the renewal, watch and follower tasks are long-lived too. Put on a
//! caller's runtime they stopped with it: a runtime that shut down took every renewal of the
//! backend with it (the tasks kept a client whose channel was gone), and a current-thread
//! runtime kept alive but no longer driven (its `block_on` returned) left every renewal of
//! every runtime queued in a task that never ran. On the background runtime they run whatever
//! the callers' runtimes do; requests made from any runtime reach them through channels.

use lock_core::LockError;
use std::future::Future;
use tokio::runtime::Handle;

/// The background runtime's handle.
pub(crate) fn handle() -> Result<&'static Handle, LockError> {
    lock_core::background_runtime().ok_or_else(|| {
        LockError::backend_msg(
            "etcd",
            "the background runtime for the etcd client could not be started",
            false,
        )
    })
}

/// Runs `work` on the background runtime and waits for it from the caller's.
pub(crate) async fn run<F>(work: F) -> Result<F::Output, LockError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    handle()?.spawn(work).await.map_err(|error| {
        if error.is_panic() {
            std::panic::resume_unwind(error.into_panic());
        }
        LockError::backend_msg("etcd", "the etcd client's runtime stopped", false)
    })
}
