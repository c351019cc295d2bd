//! `cargo bench -p lock-etcd`: distlock on etcd against the raw etcd-client floor, measured in
//! the same run on a single-node etcd that this bench starts itself (harness, free loopback
//! ports, data on tmpfs).
//!
//! - uncontended acquire + release: `Locker::try_acquire` + `LockGuard::release`, against
//!   etcd-client doing lease grant + txn put + lease revoke with no library;
//! - hand-off: a holder keeps the lock 5 ms while one waiter is blocked in `acquire`; the time
//!   from the holder's `release` call to the waiter's `acquire` returning;
//! - uncontended semaphore acquire + release: `Locker::semaphore(name, 3).try_acquire` +
//!   release, against etcd-client doing the same engine sequence with no library (lease
//!   grant + txn "if no holder key under the name, put mine" + lease revoke);
//! - one etcd write (a put), to state the hand-off bar (2 ms + one write);
//! - 1,000 keys: acquire all (64 at a time), renew all at once (batched), release all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use futures::StreamExt;
use lock_core::{LockKey, Locker};
use lock_harness::etcd::EtcdCluster;
use std::time::{Duration, Instant};

const UNCONTENDED: usize = 1000;
const BLOCK: usize = 100;
const HANDOFFS: usize = 200;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64() * 1000.0)
}

struct Stats {
    p50: Duration,
    p99: Duration,
    ops: f64,
}

fn stats(mut samples: Vec<Duration>, wall: Duration) -> Stats {
    samples.sort();
    Stats {
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        ops: samples.len() as f64 / wall.as_secs_f64(),
    }
}

/// Times `op` on BLOCK fresh names `<prefix><block>-<i>`; adds the samples, returns the wall
/// time of the block.
async fn timed_block(
    prefix: &str,
    block: usize,
    op: &mut impl AsyncFnMut(&str) -> Result<()>,
    samples: &mut Vec<Duration>,
) -> Result<Duration> {
    let started = Instant::now();
    for i in 0..BLOCK {
        let t = Instant::now();
        op(&format!("{prefix}{block}-{i}")).await?;
        samples.push(t.elapsed());
    }
    Ok(started.elapsed())
}

/// `ours` against `floor`, UNCONTENDED operations each, in alternating blocks so that
/// machine noise hits both alike: `(ours, floor)`.
async fn alternating(
    prefix: &str,
    mut ours: impl AsyncFnMut(&str) -> Result<()>,
    mut floor: impl AsyncFnMut(&str) -> Result<()>,
) -> Result<(Stats, Stats)> {
    let (mut ours_samples, mut floor_samples) = (Vec::new(), Vec::new());
    let (mut ours_wall, mut floor_wall) = (Duration::ZERO, Duration::ZERO);
    for block in 0..UNCONTENDED / BLOCK {
        ours_wall += timed_block(prefix, block, &mut ours, &mut ours_samples).await?;
        floor_wall += timed_block(prefix, block, &mut floor, &mut floor_samples).await?;
    }
    Ok((
        stats(ours_samples, ours_wall),
        stats(floor_samples, floor_wall),
    ))
}

async fn raw_once(client: &Client, key: &str) -> Result<()> {
    let mut lease = client.lease_client();
    let mut kv = client.kv_client();
    let id = lease.grant(10, None).await?.id();
    let entry = format!("raw/{key}/{id:016x}");
    let txn = Txn::new()
        .when([Compare::create_revision(entry.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            entry,
            "owner",
            Some(PutOptions::new().with_lease(id)),
        )]);
    let answer = kv.txn(txn).await?;
    anyhow::ensure!(answer.succeeded(), "raw txn failed");
    lease.revoke(id).await?;
    Ok(())
}

/// The semaphore's raw floor: grant + the uncontended check-and-create txn + revoke.
async fn raw_semaphore_once(client: &Client, key: &str) -> Result<()> {
    let mut lease = client.lease_client();
    let mut kv = client.kv_client();
    let id = lease.grant(10, None).await?.id();
    let holders = format!("raw/%sync/{key}/s/");
    let txn = Txn::new()
        .when([Compare::create_revision(holders.clone(), CompareOp::Equal, 0).with_prefix()])
        .and_then([TxnOp::put(
            format!("{holders}{id:016x}"),
            "owner 1 3",
            Some(PutOptions::new().with_lease(id)),
        )])
        .or_else([TxnOp::get(holders, Some(GetOptions::new().with_prefix()))]);
    let answer = kv.txn(txn).await?;
    anyhow::ensure!(answer.succeeded(), "raw semaphore txn failed");
    lease.revoke(id).await?;
    Ok(())
}

async fn bench() -> Result<()> {
    let cluster = EtcdCluster::single().await?;
    let url = cluster.url(Some("bench"));
    let locker = Locker::from_arc(lock_etcd::connect(&url).await?);
    let raw = Client::connect(cluster.endpoints(), None).await?;
    let ttl = Duration::from_secs(10);

    // Warm-up.
    for i in 0..50 {
        let guard = locker
            .lock(format!("warm{i}"))
            .ttl(ttl)
            .try_acquire()
            .await?
            .unwrap();
        guard.release().await?;
        raw_once(&raw, &format!("warm{i}")).await?;
    }

    // Uncontended lock and semaphore, each against its raw floor.
    let (ours, floor) = alternating(
        "u",
        async |name: &str| {
            let guard = locker
                .lock(name)
                .ttl(ttl)
                .try_acquire()
                .await?
                .expect("uncontended key held");
            guard.release().await?;
            Ok(())
        },
        async |name: &str| raw_once(&raw, name).await,
    )
    .await?;
    let (sem, sem_floor) = alternating(
        "s",
        async |name: &str| {
            let permit = locker
                .semaphore(name, 3)
                .ttl(ttl)
                .try_acquire()
                .await?
                .expect("uncontended semaphore full");
            permit.release().await?;
            Ok(())
        },
        async |name: &str| raw_semaphore_once(&raw, name).await,
    )
    .await?;

    // One etcd write.
    let mut kv = raw.kv_client();
    let mut writes = Vec::new();
    let started = Instant::now();
    for i in 0..500 {
        let t = Instant::now();
        kv.put(format!("w{i}"), "v", None).await?;
        writes.push(t.elapsed());
    }
    let write = stats(writes, started.elapsed());

    // Hand-off.
    let waiter_locker = Locker::from_arc(lock_etcd::connect(&url).await?);
    let mut handoffs = Vec::new();
    for i in 0..HANDOFFS {
        let name = format!("h{i}");
        let range = lock_etcd::key_range("bench", &LockKey::new(name.as_str())?);
        let guard = locker.lock(&name).ttl(ttl).try_acquire().await?.unwrap();
        let waiter = {
            let locker = waiter_locker.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let guard = locker
                    .lock(name)
                    .ttl(ttl)
                    .wait(Duration::from_secs(10))
                    .acquire()
                    .await?;
                let at = Instant::now();
                guard.release().await?;
                anyhow::Ok(at)
            })
        };
        // Until the waiter is queued behind the holder (and watching it).
        while cluster.keys_with_prefix(&range).await?.len() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let released = Instant::now();
        guard.release().await?;
        let acquired = waiter.await??;
        handoffs.push(acquired.saturating_duration_since(released));
    }
    let handoff = stats(handoffs, Duration::from_secs(1));

    // 1,000 keys held at once.
    let backend = lock_etcd::connect(&url).await?;
    let started = Instant::now();
    let leases: Vec<_> = futures::stream::iter(0..1000)
        .map(|i| {
            let backend = backend.clone();
            async move {
                let key = LockKey::new(format!("many{i}")).unwrap();
                backend
                    .try_acquire(&key, ttl)
                    .await
                    .unwrap()
                    .into_lease()
                    .unwrap()
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let acquire_1000 = started.elapsed();
    let started = Instant::now();
    let renewed: Vec<_> = futures::stream::iter(leases.iter())
        .map(|lease| backend.renew(lease, ttl))
        .buffer_unordered(1000)
        .collect()
        .await;
    let renew_1000 = started.elapsed();
    anyhow::ensure!(renewed.iter().all(Result::is_ok), "a renewal failed");
    let started = Instant::now();
    let released: Vec<_> = futures::stream::iter(leases.iter())
        .map(|lease| backend.release(lease))
        .buffer_unordered(64)
        .collect()
        .await;
    let release_1000 = started.elapsed();
    anyhow::ensure!(
        released.iter().all(|r| matches!(r, Ok(true))),
        "a release failed"
    );

    println!();
    println!("lock-etcd bench: etcd 3.4.23 single node (harness, tmpfs), loopback");
    println!();
    println!("| measurement                                  | p50 ms | p99 ms | ops/s  |");
    println!("|----------------------------------------------|--------|--------|--------|");
    let row = |name: &str, s: &Stats| {
        println!(
            "| {name:<44} | {:>6} | {:>6} | {:>6.0} |",
            ms(s.p50),
            ms(s.p99),
            s.ops
        );
    };
    row("distlock try_acquire + release (uncontended)", &ours);
    row("raw floor: grant + txn put + revoke", &floor);
    row("distlock semaphore acquire + release (unc.)", &sem);
    row("raw floor: grant + sem txn + revoke", &sem_floor);
    row("one etcd write (put)", &write);
    println!(
        "| hand-off: release -> blocked waiter acquired | {:>6} | {:>6} |      - |",
        ms(handoff.p50),
        ms(handoff.p99)
    );
    println!();
    println!(
        "uncontended p50 ratio distlock / raw floor: {:.2} (bar <= 1.20)",
        ours.p50.as_secs_f64() / floor.p50.as_secs_f64()
    );
    println!(
        "semaphore uncontended p50 ratio distlock / raw floor: {:.2}",
        sem.p50.as_secs_f64() / sem_floor.p50.as_secs_f64()
    );
    println!(
        "hand-off median {} ms vs bar 2 ms + one write = {} ms",
        ms(handoff.p50),
        ms(Duration::from_millis(2) + write.p50)
    );
    println!(
        "1,000 keys: acquire all (64 at a time) {} ms, renew all at once {} ms, release all {} ms",
        ms(acquire_1000),
        ms(renew_1000),
        ms(release_1000)
    );
    Ok(())
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}
