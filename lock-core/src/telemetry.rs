//! Metrics through the `metrics` facade: the application installs whatever exporter it likes
//! (Prometheus, StatsD, …); without one, recording costs a no-op call. Every metric carries the
//! backend's [`crate::LockBackend::name`] as the `backend` label.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `distlock_acquire_attempts_total` | counter | backend | attempts sent to the backend (single tries and queued waits) |
//! | `distlock_acquisitions_total` | counter | backend, outcome = `acquired`, `busy`, `error` | finished `acquire` / `try_acquire` calls |
//! | `distlock_acquire_wait_seconds` | histogram (s) | backend, outcome | time from the call to its outcome |
//! | `distlock_wakeups_total` | counter | backend, cause = `release`, `timer` | a waiter woke: by a release signal (hand-off) or a backoff/expiry timer |
//! | `distlock_late_grants_total` | counter | backend | grants that came back too late to use and were given back |
//! | `distlock_renewals_total` | counter | backend, outcome = `renewed`, `failed`, `lost`, `timeout` | renew calls by the watchdog |
//! | `distlock_renewal_seconds` | histogram (s) | backend | latency of renew calls that answered |
//! | `distlock_losses_total` | counter | backend, reason = `renew_refused`, `renew_unconfirmed`, `renew_timeout`, `deadline`, `suspended`, `backend_signal` | locks lost while held |
//! | `distlock_releases_total` | counter | backend, outcome = `released`, `not_ours`, `error`, how = `explicit`, `drop`, `late_grant` (a grant that came too late, given back), `retry` (an explicit release that failed with a retryable error, retried in the background), `cancelled` (a grant that answered a cancelled acquire) | releases |
//! | `distlock_held_locks` | gauge | backend | guards alive now |

use std::time::Duration;

pub(crate) fn attempt(backend: &'static str) {
    metrics::counter!("distlock_acquire_attempts_total", "backend" => backend).increment(1);
}

pub(crate) fn acquisition(backend: &'static str, outcome: &'static str, waited: Duration) {
    metrics::counter!("distlock_acquisitions_total", "backend" => backend, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("distlock_acquire_wait_seconds", "backend" => backend, "outcome" => outcome)
        .record(waited.as_secs_f64());
}

pub(crate) fn wakeup(backend: &'static str, by_release: bool) {
    let cause = if by_release { "release" } else { "timer" };
    metrics::counter!("distlock_wakeups_total", "backend" => backend, "cause" => cause)
        .increment(1);
}

pub(crate) fn late_grant(backend: &'static str) {
    metrics::counter!("distlock_late_grants_total", "backend" => backend).increment(1);
}

pub(crate) fn renewal(backend: &'static str, outcome: &'static str, took: Option<Duration>) {
    metrics::counter!("distlock_renewals_total", "backend" => backend, "outcome" => outcome)
        .increment(1);
    if let Some(took) = took {
        metrics::histogram!("distlock_renewal_seconds", "backend" => backend)
            .record(took.as_secs_f64());
    }
}

pub(crate) fn loss(backend: &'static str, reason: &'static str) {
    metrics::counter!("distlock_losses_total", "backend" => backend, "reason" => reason)
        .increment(1);
}

pub(crate) fn release(backend: &'static str, outcome: &'static str, how: &'static str) {
    metrics::counter!("distlock_releases_total", "backend" => backend, "outcome" => outcome, "how" => how)
        .increment(1);
}

pub(crate) fn held(backend: &'static str, delta: f64) {
    metrics::gauge!("distlock_held_locks", "backend" => backend).increment(delta);
}

/// The `outcome` label of a release result.
pub(crate) fn release_outcome<E>(result: &Result<bool, E>) -> &'static str {
    match result {
        Ok(true) => "released",
        Ok(false) => "not_ours",
        Err(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use crate::{Locker, MemoryBackend};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use std::collections::HashMap;
    use std::time::Duration;

    /// (name, sorted labels) → value, from a recorder's snapshot.
    fn read(recorder: &DebuggingRecorder) -> HashMap<(String, Vec<String>), DebugValue> {
        recorder
            .snapshotter()
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let key = key.key();
                let mut labels: Vec<String> = key
                    .labels()
                    .map(|label| format!("{}={}", label.key(), label.value()))
                    .collect();
                labels.sort();
                ((key.name().to_owned(), labels), value)
            })
            .collect()
    }

    fn counter(
        metrics: &HashMap<(String, Vec<String>), DebugValue>,
        name: &str,
        labels: &[&str],
    ) -> u64 {
        let mut labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        labels.sort();
        match metrics.get(&(name.to_owned(), labels)) {
            Some(DebugValue::Counter(value)) => *value,
            None => 0,
            Some(other) => panic!("{name} is not a counter: {other:?}"),
        }
    }

    /// A scripted run: each step's metric is checked by count.
    #[test]
    fn a_scripted_run_is_counted() {
        let recorder = DebuggingRecorder::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let table = MemoryBackend::new();
                let (a, b) = (Locker::new(table.clone()), Locker::new(table));
                // Acquired, then busy for another client, then released.
                let held = a.acquire("k1").await.unwrap();
                assert!(b.try_acquire("k1").await.unwrap().is_none());
                assert!(held.release().await.unwrap());
                // A hand-off: the waiter wakes on the release signal.
                let held = a.acquire("k2").await.unwrap();
                let waiter = tokio::spawn({
                    let b = b.clone();
                    async move { b.lock("k2").wait(Duration::from_secs(5)).acquire().await }
                });
                tokio::time::sleep(Duration::from_millis(30)).await;
                held.release().await.unwrap();
                let handed = waiter.await.unwrap().unwrap();
                // Renewed at TTL/3 while held.
                let renewed = a
                    .lock("k3")
                    .ttl(Duration::from_millis(300))
                    .acquire()
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(250)).await;
                // Lost at its deadline without auto-renew.
                let expiring = a
                    .lock("k4")
                    .ttl(Duration::from_millis(40))
                    .auto_renew(false)
                    .acquire()
                    .await
                    .unwrap();
                expiring.lost().await;
                // lost() fires before the server's expiry, by design: let that pass too.
                tokio::time::sleep(Duration::from_millis(20)).await;
                // Dropped guards release in the background.
                drop((handed, renewed, expiring));
                tokio::time::sleep(Duration::from_millis(50)).await;
            })
        });
        let metrics = read(&recorder);
        let backend = "backend=memory";
        assert_eq!(
            counter(
                &metrics,
                "distlock_acquisitions_total",
                &[backend, "outcome=acquired"]
            ),
            5
        );
        assert_eq!(
            counter(
                &metrics,
                "distlock_acquisitions_total",
                &[backend, "outcome=busy"]
            ),
            1
        );
        assert!(counter(&metrics, "distlock_acquire_attempts_total", &[backend]) >= 7);
        assert!(
            counter(
                &metrics,
                "distlock_wakeups_total",
                &[backend, "cause=release"]
            ) >= 1
        );
        assert!(
            counter(
                &metrics,
                "distlock_renewals_total",
                &[backend, "outcome=renewed"]
            ) >= 1
        );
        assert_eq!(
            counter(
                &metrics,
                "distlock_losses_total",
                &[backend, "reason=deadline"]
            ),
            1
        );
        assert_eq!(
            counter(
                &metrics,
                "distlock_releases_total",
                &[backend, "how=explicit", "outcome=released"]
            ),
            2
        );
        // k2 and k3 were still ours when dropped; k4 had expired.
        assert_eq!(
            counter(
                &metrics,
                "distlock_releases_total",
                &[backend, "how=drop", "outcome=released"]
            ),
            2
        );
        assert_eq!(
            counter(
                &metrics,
                "distlock_releases_total",
                &[backend, "how=drop", "outcome=not_ours"]
            ),
            1
        );
        match metrics.get(&("distlock_held_locks".to_owned(), vec![backend.to_owned()])) {
            Some(DebugValue::Gauge(value)) => assert_eq!(value.into_inner(), 0.0),
            other => panic!("held gauge: {other:?}"),
        }
        match metrics.get(&(
            "distlock_acquire_wait_seconds".to_owned(),
            vec![backend.to_owned(), "outcome=acquired".to_owned()],
        )) {
            Some(DebugValue::Histogram(values)) => assert_eq!(values.len(), 5),
            other => panic!("wait histogram: {other:?}"),
        }
    }
}
