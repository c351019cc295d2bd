//! Several workers contend for one lock around a deliberately non-atomic update.
//!
//! Runs on the in-memory backend by default; set `DISTLOCK_URL` to run the same program on a
//! real server, e.g. `DISTLOCK_URL=redis://127.0.0.1:6379/0` with `--features redis`.

use anyhow::{Context, bail};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const WORKERS: usize = 8;
const ROUNDS: usize = 5;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DISTLOCK_URL").unwrap_or_else(|_| "memory://".to_owned());
    println!("distlock quickstart on {url}: {WORKERS} workers x {ROUNDS} rounds");
    // A key of its own per run, so runs against a shared server do not meet.
    let key = format!("quickstart-{}", std::process::id());
    let balance = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        // Each worker connects on its own, as separate processes would.
        let locker = distlock::connect(&url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let (key, balance) = (key.clone(), balance.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = locker
                    .lock(&key)
                    .ttl(Duration::from_secs(10))
                    .wait(Duration::from_secs(30))
                    .acquire()
                    .await?;
                // Read, pause, write: only the lock keeps this from losing updates.
                let seen = balance.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                balance.store(seen + 1, Ordering::SeqCst);
                let fence = guard.fence().map_or("none".to_owned(), |f| f.to_string());
                println!(
                    "worker {worker} held {key} with fence {fence}: balance {seen} -> {}",
                    seen + 1
                );
                guard.release().await?;
            }
            anyhow::Ok(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    let expected = (WORKERS * ROUNDS) as u64;
    let actual = balance.load(Ordering::SeqCst);
    println!(
        "final balance {actual}, expected {expected}, in {:?}",
        started.elapsed()
    );
    if actual != expected {
        bail!("lost updates: the lock did not exclude concurrent holders");
    }
    println!("OK: no update lost");
    Ok(())
}
