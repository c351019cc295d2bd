//! A guard acquired on a current-thread runtime that is then left alive but undriven (its
//! `block_on` returned), and watched from another runtime that never acquired anything: the
//! only watchdog task was on the first runtime, so nothing renewed the lease and nothing fired
//! `lost()` (only `is_lost()` turned true at the deadline). Waiting for `lost()` now starts a
//! watchdog task on the waiter's runtime, which renews the guard (or fires its signal).

use lock_core::{Locker, MemoryBackend};
use std::time::Duration;

#[test]
fn a_guard_watched_from_another_runtime_is_renewed_there() {
    let locker = Locker::new(MemoryBackend::new());
    let acquiring = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ttl = Duration::from_millis(600);
    let guard = acquiring
        .block_on(locker.lock("moved").ttl(ttl).acquire())
        .unwrap();
    // `acquiring` stays alive but is never driven again.
    let other = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    other.block_on(async {
        let lost = guard.lost();
        let waited = tokio::time::timeout(ttl * 3, lost).await;
        assert!(
            waited.is_err(),
            "lost() fired for a guard that could be renewed: {:?}",
            guard.lost_reason()
        );
        assert!(
            !guard.is_lost(),
            "the guard ran past its deadline unrenewed and lost() never fired"
        );
    });
    drop(acquiring);
}
