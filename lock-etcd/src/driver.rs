//! The runtime the etcd client and the backend's long-lived tasks run on: one per process,
//! one worker thread, started on first use and never shut down.
//!
//! tonic runs a channel's worker (and the connections under it) as tasks of the runtime that
//! built the channel, and the renewal, watch and follower tasks are long-lived too. Put on a
//! caller's runtime they stopped with it: a runtime that shut down took every renewal of the
//! backend with it (the tasks kept a client whose channel was gone), and a current-thread
//! runtime kept alive but no longer driven (its `block_on` returned) left every renewal of
//! every runtime queued in a task that never ran. On this runtime they run whatever the
//! callers' runtimes do; requests made from any runtime reach them through channels.

use lock_core::LockError;
use std::future::Future;
use std::sync::OnceLock;
use tokio::runtime::Handle;

/// The driver runtime's handle.
pub(crate) fn handle() -> Result<&'static Handle, LockError> {
    static DRIVER: OnceLock<Result<Handle, String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("distlock-etcd")
                .enable_all()
                .build()
                .map_err(|error| error.to_string())?;
            let handle = runtime.handle().clone();
            // Never dropped: the client's channel and the tasks live as long as the process.
            std::mem::forget(runtime);
            Ok(handle)
        })
        .as_ref()
        .map_err(|error| {
            LockError::backend_msg(
                "etcd",
                format!("cannot start the etcd client's runtime: {error}"),
                false,
            )
        })
}

/// Runs `work` on the driver runtime and waits for it from the caller's.
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
