//! Cancel safety: an operation whose caller goes away finishes on a task instead of stopping
//! mid-statement.

use super::*;

pub(crate) type OpFuture<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, LockError>> + Send>>;

/// Runs `work` in place, but if the caller drops it before it finishes, the rest runs on a
/// task: a statement is never cut off mid-protocol on a shared session, and a lock granted
/// meanwhile is handed to `on_orphan` (which gives it back). No task or thread hop in the
/// common case.
///
/// Dropped where no runtime can finish it, the work is dropped and `on_abandon` settles what
/// it leaves behind (a `Pending` book entry, a statement in flight on a session).
pub(crate) struct Detached<T: Send + 'static> {
    pub(crate) work: Option<OpFuture<T>>,
    pub(crate) on_orphan: Option<Box<dyn FnOnce(T) + Send>>,
    pub(crate) on_abandon: Option<Box<dyn FnOnce() + Send>>,
}

pub(crate) fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, LockError>> + Send + 'static,
    on_orphan: impl FnOnce(T) + Send + 'static,
    on_abandon: impl FnOnce() + Send + 'static,
) -> Detached<T> {
    Detached {
        work: Some(Box::pin(work)),
        on_orphan: Some(Box::new(on_orphan)),
        on_abandon: Some(Box::new(on_abandon)),
    }
}

impl<T: Send + 'static> std::future::Future for Detached<T> {
    type Output = Result<T, LockError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(work) = self.work.as_mut() else {
            return std::task::Poll::Ready(Err(LockError::backend_msg(
                BACKEND,
                "operation polled after completion",
                false,
            )));
        };
        let output = std::task::ready!(work.as_mut().poll(cx));
        self.work = None;
        std::task::Poll::Ready(output)
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        let orphan = Orphan {
            work: Some(work),
            on_orphan: self.on_orphan.take(),
            on_abandon: self.on_abandon.take(),
        };
        // With no runtime to finish it on, the orphan is dropped here and settles what the
        // work leaves behind. A runtime shutting down drops its tasks in its own context: the
        // spawn then lands on a closed runtime and the orphan is dropped unrun (or the rest
        // mid-way), which settles it the same way.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(orphan);
        }
    }
}

/// The rest of a dropped operation, run on a task; `on_abandon` if it is dropped before the
/// work finishes (no runtime, or one that shut down).
struct Orphan<T: Send + 'static> {
    work: Option<OpFuture<T>>,
    on_orphan: Option<Box<dyn FnOnce(T) + Send>>,
    on_abandon: Option<Box<dyn FnOnce() + Send>>,
}

impl<T: Send + 'static> std::future::Future for Orphan<T> {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let Some(work) = self.work.as_mut() else {
            return std::task::Poll::Ready(());
        };
        let output = std::task::ready!(work.as_mut().poll(cx));
        self.work = None;
        if let (Ok(orphan), Some(on_orphan)) = (output, self.on_orphan.take()) {
            on_orphan(orphan);
        }
        std::task::Poll::Ready(())
    }
}

impl<T: Send + 'static> Drop for Orphan<T> {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        // Settled while the work (and its in-flight mark) still exists, then dropped.
        if let Some(on_abandon) = self.on_abandon.take() {
            on_abandon();
        }
        drop(work);
    }
}
