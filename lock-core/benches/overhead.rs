//! What `Locker` adds on top of a backend: acquire+release of fresh keys on the in-memory
//! backend, through the trait directly (the floor) and through `Locker` (with auto-renew on,
//! the default), and the same for one permit of a semaphore of 5 (the memory backend is the
//! reference engine: its raw floor is its own trait call). Run: `cargo bench -p lock-core`.

#![allow(clippy::expect_used, missing_docs)]

use lock_core::{LockBackend, LockKey, Locker, MemoryBackend};
use std::sync::Arc;
use std::time::{Duration, Instant};

const OPS: usize = 200_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

fn report(name: &str, mut samples: Vec<Duration>, total: Duration) {
    samples.sort();
    println!(
        "{name:<34} p50 {:>7.2} µs   p99 {:>7.2} µs   {:>9.0} ops/s",
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        samples.len() as f64 / total.as_secs_f64()
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let backend: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
        let keys: Vec<LockKey> = (0..OPS)
            .map(|i| LockKey::new(format!("k{i}")).expect("key"))
            .collect();
        let ttl = Duration::from_secs(30);
        let handle = tokio::spawn({
            let backend = backend.clone();
            let keys = keys.clone();
            async move {
                let mut samples = Vec::with_capacity(OPS);
                let start = Instant::now();
                for key in &keys {
                    let t = Instant::now();
                    let lease = backend.try_acquire(key, ttl).await.expect("acquire");
                    let lease = lease.into_lease().expect("free");
                    backend.release(&lease).await.expect("release");
                    samples.push(t.elapsed());
                }
                (samples, start.elapsed())
            }
        });
        let (samples, total) = handle.await.expect("task");
        report("backend trait (floor)", samples, total);

        let locker = Locker::from_arc(Arc::new(MemoryBackend::new()));
        let handle = tokio::spawn(async move {
            let mut samples = Vec::with_capacity(OPS);
            let start = Instant::now();
            for key in &keys {
                let t = Instant::now();
                let guard = locker.acquire(key.as_str()).await.expect("acquire");
                guard.release().await.expect("release");
                samples.push(t.elapsed());
            }
            (samples, start.elapsed())
        });
        let (samples, total) = handle.await.expect("task");
        report("Locker (auto-renew on)", samples, total);

        let backend: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
        let permit_keys: Vec<LockKey> = (0..OPS)
            .map(|i| LockKey::new(format!("s{i}")).expect("key"))
            .collect();
        let handle = tokio::spawn({
            let (backend, keys) = (backend.clone(), permit_keys.clone());
            async move {
                let mut samples = Vec::with_capacity(OPS);
                let start = Instant::now();
                for key in &keys {
                    let t = Instant::now();
                    let attempt = backend.try_acquire_permits(key, 5, 1, ttl).await;
                    let lease = attempt.expect("acquire").into_lease().expect("free");
                    backend.release(&lease).await.expect("release");
                    samples.push(t.elapsed());
                }
                (samples, start.elapsed())
            }
        });
        let (samples, total) = handle.await.expect("task");
        report("semaphore: trait (floor)", samples, total);

        let locker = Locker::from_arc(backend);
        let handle = tokio::spawn(async move {
            let mut samples = Vec::with_capacity(OPS);
            let start = Instant::now();
            for key in &permit_keys {
                let t = Instant::now();
                let permit = locker
                    .semaphore(key.as_str(), 5)
                    .acquire()
                    .await
                    .expect("acquire");
                permit.release().await.expect("release");
                samples.push(t.elapsed());
            }
            (samples, start.elapsed())
        });
        let (samples, total) = handle.await.expect("task");
        report("semaphore: Locker", samples, total);
    });
}
