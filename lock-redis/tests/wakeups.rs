//! Release announcements on a real `redis-server`: a release publishes on the key's channel
//! only when a waiter marked the lock, and a marked release wakes the waiter at once. Also: a
//! fence counter per hash slot keeps the keyspace bounded.

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use lock_core::{LockBackend, LockKey, Locker};
use lock_harness::redis::RedisServer;
use lock_redis::{KeyScheme, RedisBackend, RedisOptions};
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

fn scheme() -> Result<KeyScheme> {
    Ok(KeyScheme::new(RedisOptions::default_prefix(), 0)?)
}

async fn raw_value(server: &RedisServer, key: &LockKey) -> Result<Option<String>> {
    let mut conn = server.client()?.get_multiplexed_async_connection().await?;
    Ok(redis::cmd("GET")
        .arg(scheme()?.lock_key(key))
        .query_async(&mut conn)
        .await?)
}

/// Messages on the key's release channel, seen by a plain subscriber of our own.
async fn listen(server: &RedisServer, key: &LockKey) -> Result<redis::aio::PubSub> {
    let mut pubsub = server.client()?.get_async_pubsub().await?;
    pubsub.subscribe(scheme()?.channel(key.as_str())).await?;
    Ok(pubsub)
}

/// `try_acquire` (TTL 5 s) of a key that must be free.
async fn acquire_free(backend: &RedisBackend, key: &LockKey) -> Result<lock_core::Lease> {
    backend
        .try_acquire(key, Duration::from_secs(5))
        .await?
        .into_lease()
        .context("free key not acquired")
}

async fn message_within(pubsub: &mut redis::aio::PubSub, within: Duration) -> bool {
    timeout(within, pubsub.on_message().next())
        .await
        .ok()
        .flatten()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_without_waiters_publishes_nothing() -> Result<()> {
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let key = LockKey::new("quiet")?;
    let mut pubsub = listen(&server, &key).await?;
    for _ in 0..5 {
        let lease = acquire_free(&backend, &key).await?;
        ensure!(backend.release(&lease).await?, "release refused");
    }
    ensure!(
        !message_within(&mut pubsub, Duration::from_millis(300)).await,
        "a release nobody waited for was published"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_marks_the_holder_and_its_release_wakes_it() -> Result<()> {
    let server = RedisServer::start()?;
    let holder = Locker::new(RedisBackend::connect(&server.url()).await?);
    // The waiter's backoff cap is far above the hand-off bound checked below: only the
    // published release can wake it in time.
    let waiter = Locker::new(RedisBackend::connect(&server.url()).await?);
    let key = LockKey::new("marked")?;
    let mut pubsub = listen(&server, &key).await?;
    let guard = holder
        .lock(key.as_str())
        .ttl(Duration::from_secs(30))
        .try_acquire()
        .await?
        .context("free key not acquired")?;
    let token_only = raw_value(&server, &key)
        .await?
        .context("lock key missing")?;
    ensure!(!token_only.ends_with('+'), "marked before anyone waited");

    let waiting = tokio::spawn({
        let (waiter, key) = (waiter.clone(), key.clone());
        async move {
            let guard = waiter
                .lock(key.as_str())
                .ttl(Duration::from_secs(30))
                .wait(Duration::from_secs(20))
                .backoff(lock_core::Backoff::new(
                    Duration::from_secs(5),
                    Duration::from_secs(5),
                ))
                .acquire()
                .await?;
            let acquired = Instant::now();
            guard.release().await?;
            anyhow::Ok(acquired)
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = raw_value(&server, &key)
            .await?
            .context("lock key missing")?;
        if value == format!("{token_only}+") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the waiter never marked the lock"
        );
        sleep(Duration::from_millis(10)).await;
    }
    // A renew keeps a marked lock (the mark is not a different owner).
    let renewed = holder
        .backend()
        .renew(&guard.lease(), Duration::from_secs(30))
        .await;
    ensure!(
        renewed.is_ok(),
        "renew of a marked lock failed: {renewed:?}"
    );
    let released = Instant::now();
    guard.release().await?;
    ensure!(
        message_within(&mut pubsub, Duration::from_secs(1)).await,
        "a release a waiter marked was not published"
    );
    let acquired = timeout(Duration::from_secs(3), waiting).await???;
    let hand_off = acquired.saturating_duration_since(released);
    ensure!(
        hand_off < Duration::from_millis(500),
        "the waiter took {hand_off:?} after the release (its backoff is 5 s)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_counters_stay_bounded_and_increase() -> Result<()> {
    // More lock names than hash slots: a counter per name would leave 20 000 keys behind.
    const NAMES: usize = 20_000;
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let same = LockKey::new("fenced")?;
    let mut last = 0;
    let mut names = futures::stream::iter(0..NAMES)
        .map(|i| {
            let backend = backend.clone();
            async move {
                let key = LockKey::new(format!("order:{i}"))?;
                let lease = acquire_free(&backend, &key).await?;
                ensure!(backend.release(&lease).await?, "release refused");
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64);
    let mut done = 0;
    while let Some(result) = names.next().await {
        result?;
        done += 1;
        if done % 500 == 0 {
            // Meanwhile one key's fences keep increasing although its counter is shared.
            let lease = acquire_free(&backend, &same).await?;
            let fence = lease.fence().context("no fence")?.0;
            ensure!(fence > last, "fence {fence} after {last}");
            last = fence;
            backend.release(&lease).await?;
        }
    }
    let mut conn = server.client()?.get_multiplexed_async_connection().await?;
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
    ensure!(
        keys <= 16_384,
        "{keys} keys left after {NAMES} released lock names (one counter per hash slot at most)"
    );
    let locks: Vec<String> = redis::cmd("KEYS")
        .arg("*:lock")
        .query_async(&mut conn)
        .await?;
    ensure!(locks.is_empty(), "lock keys left behind: {locks:?}");
    Ok(())
}
