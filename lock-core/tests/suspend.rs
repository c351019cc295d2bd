//! Host suspension, simulated: a test cannot put its machine to sleep, so
//! `lock_core::simulate_suspension` moves the boot-time clock ahead of the monotonic one,
//! which is what a real suspension does on Linux. Its own test binary: the simulation affects
//! the whole process.
//!
//! While a machine sleeps, `Instant` (and every timer on it) stands still but the server's
//! clock does not: a lease with 20 s left locally may have run out on the server long ago and
//! the lock may have a new holder.

use lock_core::{Lease, LockKey, Locker, MemoryBackend, OwnerToken, simulate_suspension};
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!renewed.is_lost() && !unrenewed.is_lost());

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
    for guard in [&renewed, &unrenewed] {
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
