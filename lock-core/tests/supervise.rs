//! `run` / `run_with` stop the work at the lost deadline even when the runtime handles its
//! timers late. A current-thread runtime whose task keeps waking itself polls its timer
//! driver only every few dozen task polls; a work future that blocks a little in each poll
//! then ran on long past its deadline, because the lost signal comes from the watchdog's
//! timer.

use lock_core::{Locker, MemoryBackend};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Finding (review, 2026-12-03): the deadline was checked before each poll of the work only;
/// work whose last poll blocked past it (synchronous I/O, CPU work) returned `Ok` although
/// another holder may have acted meanwhile.
#[test]
fn work_that_finishes_past_the_deadline_is_reported_lost() {
    current_thread().unwrap().block_on(async {
        let locker = Locker::new(MemoryBackend::new());
        let outcome = locker
            .lock("blocking")
            .ttl(Duration::from_millis(100))
            .auto_renew(false)
            .run(async {
                std::thread::sleep(Duration::from_millis(300));
                42
            })
            .await;
        assert!(
            outcome.as_ref().is_err_and(lock_core::LockError::is_lost),
            "work that blocked past the lost deadline was reported done: {outcome:?}"
        );
    });
}

#[test]
fn work_never_runs_past_the_deadline_on_a_busy_runtime() {
    current_thread().unwrap().block_on(async {
        let locker = Locker::new(MemoryBackend::new());
        let ttl = Duration::from_millis(500);
        // When each poll of the work began, and the lease's deadline.
        let polls: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let deadline: Arc<Mutex<Option<Instant>>> = Arc::default();
        let outcome = tokio::spawn({
            let (polls, deadline) = (polls.clone(), deadline.clone());
            async move {
                locker
                    .lock("busy")
                    .ttl(ttl)
                    .auto_renew(false)
                    .run_with(async move |guard| {
                        *deadline.lock().unwrap() = Some(guard.valid_until());
                        let started = Instant::now();
                        while started.elapsed() < Duration::from_secs(3) {
                            polls.lock().unwrap().push(Instant::now());
                            // Work that blocks the thread a little in each poll (CPU, a
                            // synchronous call), then yields.
                            std::thread::sleep(Duration::from_millis(20));
                            wake_self_once().await;
                        }
                    })
                    .await
            }
        })
        .await
        .unwrap();
        assert!(
            matches!(&outcome, Err(error) if error.is_lost()),
            "the work ran to its end: {outcome:?}"
        );
        let deadline = deadline.lock().unwrap().expect("the work never started");
        let polls = polls.lock().unwrap();
        let last = *polls.last().expect("no poll");
        assert!(
            last < deadline,
            "the work was polled {:?} after the lease's deadline ({} polls)",
            last - deadline,
            polls.len()
        );
    });
}

/// Pending once, having woken itself: the task goes back in the run queue at once (unlike
/// `yield_now`, which lets the runtime look at its timers first).
async fn wake_self_once() {
    let mut woken = false;
    std::future::poll_fn(|cx| {
        if woken {
            return std::task::Poll::Ready(());
        }
        woken = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}
