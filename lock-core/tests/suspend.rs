//! Host suspension, simulated: a test cannot put its machine to sleep, so
//! `lock_core::simulate_suspension` moves the boot-time clock ahead of the monotonic one,
//! which is what a real suspension does on Linux. Its own test binary: the simulation affects
//! the whole process.
//!
//! While a machine sleeps, `Instant` (and every timer on it) stands still but the server's
//! clock does not: a lease with 20 s left locally may have run out on the server long ago and
//! the lock may have a new holder.

use lock_core::{
    Attempt, Capabilities, Lease, LockBackend, LockError, LockKey, Locker, MemoryBackend,
    OwnerToken, simulate_suspension,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::{Instant, timeout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_sent_before_a_suspension_count_as_expired() {
    let locker = Locker::new(MemoryBackend::new());
    let ttl = Duration::from_secs(30);
    let renewed = locker.lock("renewed").ttl(ttl).acquire().await.unwrap();
    let unrenewed = locker
        .lock("unrenewed")
        .ttl(ttl)
        .auto_renew(false)
        .acquire()
        .await
        .unwrap();
    // A guard whose renewal is in flight (it hangs) when the machine sleeps: its wait is timed
    // on the clock that stood still.
    let hanging = Arc::new(HangingRenewals {
        inner: MemoryBackend::new(),
        hang: AtomicBool::new(false),
        renewing: tokio::sync::Notify::new(),
    });
    let hung = Locker::from_arc(hanging.clone())
        .lock("renewal-in-flight")
        .ttl(Duration::from_secs(6))
        .acquire()
        .await
        .unwrap();
    hanging.hang.store(true, Ordering::SeqCst);
    let work = {
        let locker = locker.clone();
        tokio::spawn(async move {
            locker
                .lock("work")
                .ttl(ttl)
                .run(std::future::pending::<()>())
                .await
        })
    };
    // A request sent before the suspension and answered after it.
    let in_flight = Lease::new(
        LockKey::new("in-flight").unwrap(),
        OwnerToken::random(),
        None,
        ttl,
        Instant::now(),
    );
    // Its renewal (due at TTL/3 = 2 s) is in flight; without the suspension it would be cut
    // off at its lost deadline, 5.7 s after the acquire.
    timeout(Duration::from_secs(5), hanging.renewing.notified())
        .await
        .expect("the hanging guard's renewal was never sent");
    assert!(!renewed.is_lost() && !unrenewed.is_lost() && !hung.is_lost());

    simulate_suspension(Duration::from_secs(60));
    let woke = Instant::now();
    // Every look at a deadline sees it at once...
    assert!(
        renewed.is_lost(),
        "a lease sent before the suspension still looks valid"
    );
    assert!(renewed.valid_until() <= Instant::now());
    assert!(unrenewed.is_lost());
    assert!(in_flight.is_expired() && in_flight.voided_by_suspension());
    // ...and lost() fires within about the sampling period, not at the next renewal (10 s
    // away on the stopped clock) or the deadline (30 s).
    for guard in [&renewed, &unrenewed, &hung] {
        timeout(Duration::from_secs(2), guard.lost())
            .await
            .expect("lost() did not fire after the suspension");
        let reason = guard.lost_reason().unwrap_or_default();
        assert!(reason.contains("suspended"), "{reason}");
    }
    assert!(woke.elapsed() < Duration::from_secs(2));
    // The work under `run` is dropped with a loss.
    let outcome = timeout(Duration::from_secs(2), work)
        .await
        .expect("run's work went on after the suspension")
        .unwrap();
    assert!(
        matches!(&outcome, Err(error) if error.is_lost()),
        "{outcome:?}"
    );
    // A lock taken after the suspension is valid as usual.
    let after = locker.lock("taken-after").ttl(ttl).acquire().await.unwrap();
    assert!(!after.is_lost());
    assert!(after.valid_until() > Instant::now() + ttl / 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !after.is_lost(),
        "a lease taken after the suspension was voided"
    );
}

/// The memory backend, with renewals that hang once `hang` is set.
#[derive(Debug)]
struct HangingRenewals {
    inner: MemoryBackend,
    hang: AtomicBool,
    /// Told when a renewal starts hanging.
    renewing: tokio::sync::Notify,
}

#[lock_core::async_trait]
impl LockBackend for HangingRenewals {
    async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
        self.inner.try_acquire(key, ttl).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
        if self.hang.load(Ordering::SeqCst) {
            self.renewing.notify_one();
            std::future::pending::<()>().await;
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
