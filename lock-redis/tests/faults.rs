//! Redis-specific faults on real `redis-server` processes started by `lock_harness`: a paused
//! server, a cut connection, restarts with and without persistence, Redlock with nodes down
//! or slow.

use anyhow::{Context, Result, bail, ensure};
use lock_core::{Attempt, LockBackend, LockKey, Locker};
use lock_harness::redis::RedisServer;
use lock_redis::{KeyScheme, RedisBackend, RedisOptions, RedlockBackend};
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

fn unique(name: &str) -> String {
    format!("{name}-{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    // The owner-token generator is random enough for test key names.
    lock_core::OwnerToken::random().as_u128() as u64
}

async fn exists(server: &RedisServer, key: &LockKey) -> Result<bool> {
    let scheme = KeyScheme::new(RedisOptions::default_prefix(), 0)?;
    let mut conn = server.client()?.get_multiplexed_async_connection().await?;
    Ok(redis::cmd("EXISTS")
        .arg(scheme.lock_key(key))
        .query_async(&mut conn)
        .await?)
}

/// Holder's `lost()` fires before its validity deadline; the contender (on a healthy path)
/// gets the lock only after that.
async fn holder_told_first(
    holder: &Locker,
    contender: &Locker,
    break_it: impl FnOnce() -> Result<()>,
    mend_it: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let name = unique("fault");
    let ttl = Duration::from_millis(1000);
    let guard = holder.lock(&name).ttl(ttl).acquire().await?;
    let fence = guard.fence().context("no fence")?;
    // Let one renewal go through first.
    sleep(ttl / 2).await;
    break_it()?;
    let broken_at = Instant::now();
    timeout(ttl * 2, guard.lost())
        .await
        .context("lost() never fired")?;
    let lost_at = Instant::now();
    ensure!(
        lost_at < guard.valid_until(),
        "lost() fired {:?} after the validity deadline",
        lost_at - guard.valid_until()
    );
    ensure!(
        lost_at - broken_at < ttl,
        "lost() took {:?}",
        lost_at - broken_at
    );
    // Keep it broken past the TTL, then mend.
    sleep(ttl).await;
    mend_it()?;
    let next = contender
        .lock(&name)
        .ttl(ttl)
        .wait(Duration::from_secs(5))
        .acquire()
        .await?;
    let acquired_at = Instant::now();
    ensure!(
        acquired_at > lost_at,
        "contender acquired before the holder was told"
    );
    ensure!(
        next.fence().context("no fence")? > fence,
        "fence did not increase"
    );
    next.release().await?;
    drop(guard);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_server_fires_lost_before_deadline() -> Result<()> {
    let server = RedisServer::start()?;
    let holder = Locker::new(RedisBackend::connect(&server.url()).await?);
    let contender = Locker::new(RedisBackend::connect(&server.url()).await?);
    holder_told_first(&holder, &contender, || server.pause(), || server.resume()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_connection_fires_lost_and_heals() -> Result<()> {
    let server = RedisServer::builder().proxy(true).start()?;
    let proxy = server.proxy().context("no proxy")?;
    let holder = Locker::new(RedisBackend::connect(&server.url()).await?);
    // The contender connects straight to the server: only the holder is cut off.
    let contender = Locker::new(RedisBackend::connect(&server.direct_url()).await?);
    holder_told_first(
        &holder,
        &contender,
        || {
            proxy.cut();
            Ok(())
        },
        || Ok(()),
    )
    .await?;
    proxy.heal();
    // Through the healed proxy, the holder's backend works again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match holder.try_acquire(unique("healed")).await {
            Ok(Some(guard)) => {
                ensure!(guard.release().await?, "release after heal returned false");
                return Ok(());
            }
            Ok(None) => bail!("fresh key held after heal"),
            Err(error) if Instant::now() < deadline && error.is_retryable() => {
                sleep(Duration::from_millis(50)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blackholed_connection_fires_lost() -> Result<()> {
    let server = RedisServer::builder().proxy(true).start()?;
    let proxy = server.proxy().context("no proxy")?;
    let holder = Locker::new(RedisBackend::connect(&server.url()).await?);
    let contender = Locker::new(RedisBackend::connect(&server.direct_url()).await?);
    holder_told_first(
        &holder,
        &contender,
        || {
            proxy.blackhole();
            Ok(())
        },
        || {
            proxy.heal();
            Ok(())
        },
    )
    .await
}

/// Retries a call that may fail while the connection manager reconnects.
async fn settle<T, F, Fut>(mut call: F) -> Result<Result<T, lock_core::LockError>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, lock_core::LockError>>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match call().await {
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                sleep(Duration::from_millis(20)).await;
            }
            other => return Ok(other),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_without_persistence_loses_locks_cleanly() -> Result<()> {
    let mut server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let key = LockKey::new(unique("restart"))?;
    let ttl = Duration::from_secs(30);
    let lease = backend
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("not acquired")?;
    server.restart()?;
    match settle(|| backend.renew(&lease, ttl)).await? {
        Err(error) if error.is_lost() => {}
        other => bail!("renew after a restart without persistence: expected Lost, got {other:?}"),
    }
    ensure!(
        !backend.release(&lease).await?,
        "release after restart returned true"
    );
    let again = settle(|| backend.try_acquire(&key, ttl))
        .await??
        .into_lease()
        .context("key not free after restart")?;
    // Without persistence the fence counter restarted too: documented in the README.
    ensure!(again.fence().is_some(), "no fence");
    ensure!(backend.release(&again).await?, "release returned false");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_with_aof_keeps_fences_increasing() -> Result<()> {
    let mut server = RedisServer::builder().aof(true).start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let key = LockKey::new(unique("aof"))?;
    let ttl = Duration::from_secs(30);
    let mut last = 0;
    for _ in 0..3 {
        let lease = backend
            .try_acquire(&key, ttl)
            .await?
            .into_lease()
            .context("not acquired")?;
        last = lease.fence().context("no fence")?.0;
        backend.release(&lease).await?;
    }
    let held = backend
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("not acquired")?;
    let held_fence = held.fence().context("no fence")?.0;
    ensure!(held_fence > last, "fence did not increase");
    server.restart()?;
    // The held lock survived (AOF always) and is still ours.
    let renewed = settle(|| backend.renew(&held, ttl)).await??;
    ensure!(
        backend.release(&renewed).await?,
        "release after restart returned false"
    );
    let after = settle(|| backend.try_acquire(&key, ttl))
        .await??
        .into_lease()
        .context("not acquired after restart")?;
    let after_fence = after.fence().context("no fence")?.0;
    ensure!(
        after_fence > held_fence,
        "fence went from {held_fence} to {after_fence} across an AOF restart"
    );
    backend.release(&after).await?;
    Ok(())
}

fn redlock_options() -> RedisOptions {
    RedisOptions::default().node_timeout(Duration::from_millis(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_minority_down_still_acquires() -> Result<()> {
    let mut servers = Vec::new();
    for _ in 0..5 {
        servers.push(RedisServer::start()?);
    }
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let locker = Locker::new(RedlockBackend::connect_nodes(&urls, redlock_options()).await?);
    // Two of five down: one killed, one paused (silent).
    servers[0].kill()?;
    servers[1].pause()?;
    for _ in 0..3 {
        let guard = locker
            .try_acquire(unique("minority"))
            .await?
            .context("not acquired with two of five nodes down")?;
        ensure!(guard.release().await?, "release returned false");
    }
    servers[1].resume()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_paused_minority_still_acquires_fast() -> Result<()> {
    let servers = [
        RedisServer::start()?,
        RedisServer::start()?,
        RedisServer::start()?,
    ];
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let backend = RedlockBackend::connect_nodes(&urls, redlock_options()).await?;
    servers[2].pause()?;
    let key = LockKey::new(unique("paused-minority"))?;
    let started = Instant::now();
    let attempt = backend.try_acquire(&key, Duration::from_secs(5)).await;
    let took = started.elapsed();
    servers[2].resume()?;
    let lease = attempt?
        .into_lease()
        .context("not acquired with one node paused")?;
    ensure!(
        took < Duration::from_millis(100 + 150),
        "acquire with a paused node took {took:?} (node timeout 100 ms)"
    );
    ensure!(backend.release(&lease).await?, "release returned false");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_majority_down_refuses_and_leaves_nothing() -> Result<()> {
    let mut servers = [
        RedisServer::start()?,
        RedisServer::start()?,
        RedisServer::start()?,
    ];
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let backend = RedlockBackend::connect_nodes(&urls, redlock_options()).await?;
    servers[0].kill()?;
    servers[1].pause()?;
    let key = LockKey::new(unique("majority"))?;
    let ttl = Duration::from_secs(5);
    let started = Instant::now();
    let attempt = backend.try_acquire(&key, ttl).await;
    let took = started.elapsed();
    match attempt {
        Ok(Attempt::Acquired(_)) => bail!("acquired with a majority of nodes down"),
        Ok(Attempt::Held { .. }) => {}
        Err(error) => ensure!(error.is_retryable(), "non-retryable error: {error}"),
    }
    ensure!(
        took < Duration::from_millis(500),
        "refusal took {took:?} (node timeout 100 ms)"
    );
    ensure!(
        !exists(&servers[2], &key).await?,
        "the surviving node kept our partial acquisition"
    );
    // The paused node processes our queued acquire and its roll-back in order once resumed.
    servers[1].resume()?;
    sleep(Duration::from_millis(200)).await;
    ensure!(
        !exists(&servers[1], &key).await?,
        "the resumed node kept our partial acquisition"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_slow_node_does_not_stall() -> Result<()> {
    let servers = [
        RedisServer::start()?,
        RedisServer::start()?,
        RedisServer::builder().proxy(true).start()?,
    ];
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let backend = RedlockBackend::connect_nodes(&urls, redlock_options()).await?;
    servers[2]
        .proxy()
        .context("no proxy")?
        .set_delay(Duration::from_millis(1000));
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let key = LockKey::new(unique("slow"))?;
        let started = Instant::now();
        let lease = backend
            .try_acquire(&key, Duration::from_secs(5))
            .await?
            .into_lease()
            .context("not acquired with one slow node")?;
        slowest = slowest.max(started.elapsed());
        ensure!(backend.release(&lease).await?, "release returned false");
    }
    ensure!(
        slowest < Duration::from_millis(100 + 150),
        "acquire with a node 1 s slow took up to {slowest:?} (node timeout 100 ms)"
    );
    Ok(())
}
