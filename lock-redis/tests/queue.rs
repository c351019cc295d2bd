//! The fair queue on a real `redis-server`: a grant pushed by a release never claims more
//! validity than the server gives, and a waiter that went silent does not hold the line.

use anyhow::{Context, Result, ensure};
use lock_core::{Lease, LockBackend, LockError, LockKey};
use lock_harness::proxy::{LinkProxy, TcpProxy};
use lock_harness::redis::RedisServer;
use lock_redis::{KeyScheme, RedisBackend, RedisOptions};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

fn scheme() -> Result<KeyScheme> {
    Ok(KeyScheme::new(RedisOptions::default_prefix(), 0)?)
}

/// A lease on `key`, which must be free (TTL 30 s: it outlasts every case).
async fn hold(backend: &RedisBackend, key: &LockKey) -> Result<Lease> {
    backend
        .try_acquire(key, Duration::from_secs(30))
        .await?
        .into_lease()
        .context("free key not acquired")
}

/// `backend` waits in `key`'s queue (TTL `ttl`) for at most `within`, in a task of its own.
fn queue_up(
    backend: &RedisBackend,
    key: &LockKey,
    ttl: Duration,
    within: Duration,
) -> JoinHandle<Result<Option<Lease>, LockError>> {
    let (backend, key) = (backend.clone(), key.clone());
    tokio::spawn(async move {
        backend
            .acquire_queued(&key, ttl, Instant::now() + within)
            .await
    })
}

/// How many entries the key's queue has, read on the server.
async fn queue_len(server: &RedisServer, key: &LockKey) -> Result<usize> {
    let mut conn = server.client()?.get_multiplexed_async_connection().await?;
    Ok(redis::cmd("ZCARD")
        .arg(&scheme()?.lock_keys(key)[2])
        .query_async(&mut conn)
        .await?)
}

async fn queue_reaches(server: &RedisServer, key: &LockKey, len: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while queue_len(server, key).await? != len {
        ensure!(
            Instant::now() < deadline,
            "the queue of {key} did not reach {len} entries"
        );
        sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The lease a release hands over is counted from before the hand-over: the waiter hears of
/// the grant 150 ms after the server made it (its link delays answers), and the lease's
/// validity deadline must still fall before the server's expiry of the key. A waiter that
/// counted the TTL from the moment the message reached it would claim 150 ms the server never
/// gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_grant_lease_never_outlives_the_server() -> Result<()> {
    const DOWN: Duration = Duration::from_millis(150);
    let server = RedisServer::start()?;
    let link = LinkProxy::start(server.server_addr(), Duration::ZERO, DOWN)?;
    let waiter = RedisBackend::connect(&format!("redis://{}/0", link.addr())).await?;
    let holder = RedisBackend::connect(&server.direct_url()).await?;
    let mut direct = server.client()?.get_multiplexed_async_connection().await?;
    let ttl = Duration::from_secs(2);
    for round in 0..3 {
        let key = LockKey::new(format!("pushed-{round}"))?;
        let held = hold(&holder, &key).await?;
        let waiting = queue_up(&waiter, &key, ttl, Duration::from_secs(20));
        queue_reaches(&server, &key, 1).await?;
        // Past a refresh or two, so the bound is a refresh's, not the joining call's.
        sleep(Duration::from_millis(700)).await;
        ensure!(holder.release(&held).await?, "release refused");
        let lease = timeout(Duration::from_secs(5), waiting)
            .await
            .context("the waiter did not get the lock within 5 s of the release")???
            .context("the wait ended without the lock")?;
        let pttl: i64 = redis::cmd("PTTL")
            .arg(scheme()?.lock_key(&key))
            .query_async(&mut direct)
            .await?;
        // From the answer: the latest the expiry can be, so a delayed request never counts
        // against the lease (the 150 ms a wrong count would claim still shows).
        let answered = Instant::now();
        let server_expiry = answered + Duration::from_millis(u64::try_from(pttl)?);
        ensure!(
            lease.valid_until() <= server_expiry + Duration::from_millis(5),
            "round {round}: the handed-over lease claims {:?} past the server's expiry",
            lease.valid_until() - server_expiry
        );
        ensure!(
            waiter.release(&lease).await?,
            "the waiter's release refused"
        );
    }
    Ok(())
}

/// A waiter that went silent (its link black-holed: no refresh, no leaving) is skipped once
/// its entry's liveness deadline passed: the lock goes to the next waiter at the release, not
/// to the silent one for a whole TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_waiter_does_not_hold_the_line() -> Result<()> {
    let server = RedisServer::start()?;
    let link = TcpProxy::start(server.server_addr())?;
    let silent = RedisBackend::connect(&format!("redis://{}/0", link.addr())).await?;
    let next = RedisBackend::connect(&server.direct_url()).await?;
    let holder = RedisBackend::connect(&server.direct_url()).await?;
    let key = LockKey::new("silent")?;
    // Waiters' TTL 1 s: entries are refreshed every 250 ms and live 950 ms unrefreshed.
    let ttl = Duration::from_secs(1);
    let held = hold(&holder, &key).await?;
    let first = queue_up(&silent, &key, ttl, Duration::from_secs(30));
    queue_reaches(&server, &key, 1).await?;
    let second = queue_up(&next, &key, ttl, Duration::from_secs(30));
    queue_reaches(&server, &key, 2).await?;
    link.blackhole();
    sleep(Duration::from_millis(1500)).await;
    let released = Instant::now();
    ensure!(holder.release(&held).await?, "release refused");
    let lease = timeout(Duration::from_secs(3), second)
        .await
        .context("the next waiter did not get the lock within 3 s of the release")???
        .context("the next waiter's wait ended without the lock")?;
    let took = released.elapsed();
    ensure!(
        took < Duration::from_millis(500),
        "the next waiter got the lock {took:?} after the release (the silent one held the line)"
    );
    next.release(&lease).await?;
    first.abort();
    link.heal();
    Ok(())
}

/// With a short TTL a grant pushed long after the waiter's last refresh would reach it with
/// little validity left, and the client would give it back as late: the waiter renews such a
/// grant before it returns it, so every hand-off returns a lease with at least half its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ttl_grants_come_with_half_their_ttl() -> Result<()> {
    let server = RedisServer::start()?;
    let waiter = RedisBackend::connect(&server.direct_url()).await?;
    let holder = RedisBackend::connect(&server.direct_url()).await?;
    // Shorter than the 20 ms refresh interval: a grant pushed late in it has little left.
    let ttl = Duration::from_millis(10);
    for round in 0..30u64 {
        let key = LockKey::new(format!("short-{round}"))?;
        let held = hold(&holder, &key).await?;
        let waiting = queue_up(&waiter, &key, ttl, Duration::from_secs(5));
        queue_reaches(&server, &key, 1).await?;
        // Releases spread over the refresh interval (20 ms), the latest just before a refresh.
        sleep(Duration::from_millis(20 + round % 20)).await;
        let released = Instant::now();
        ensure!(holder.release(&held).await?, "release refused");
        let lease = timeout(Duration::from_secs(3), waiting)
            .await
            .context("no hand-off within 3 s")???
            .context("the wait ended without the lock")?;
        // The waiter checked what was left after the grant, so after `released`: half the
        // TTL past that check is past `released` too. Measured here instead, a loaded
        // machine's scheduling delay before this line would count against the lease.
        let past_release = lease.valid_until().saturating_duration_since(released);
        ensure!(
            past_release * 2 >= ttl,
            "round {round}: the handed-over lease ran {past_release:?} past the release, \
             less than half its {ttl:?}"
        );
        waiter.release(&lease).await?;
    }
    Ok(())
}

/// A waiter cut off long enough for its entry to be dropped as dead learns so at its next
/// refresh ("gone"), joins again under a new token and still gets the lock; the server then
/// holds its new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_that_lost_its_place_joins_again() -> Result<()> {
    let server = RedisServer::start()?;
    let link = TcpProxy::start(server.server_addr())?;
    let waiter = RedisBackend::connect(&format!("redis://{}/0", link.addr())).await?;
    let holder = RedisBackend::connect(&server.direct_url()).await?;
    let other = RedisBackend::connect(&server.direct_url()).await?;
    let key = LockKey::new("lost-place")?;
    // TTL 400 ms: refreshes every 100 ms, an entry lives 500 ms unrefreshed.
    let ttl = Duration::from_millis(400);
    let held = hold(&holder, &key).await?;
    let waiting = queue_up(&waiter, &key, ttl, Duration::from_secs(20));
    queue_reaches(&server, &key, 1).await?;
    link.blackhole();
    // Another waiter joins, so a dead entry is dropped when the queue is next handed over.
    let behind = queue_up(&other, &key, ttl, Duration::from_secs(20));
    queue_reaches(&server, &key, 2).await?;
    sleep(Duration::from_millis(1000)).await;
    // The cut-off entry is past its liveness deadline: the release skips it.
    ensure!(holder.release(&held).await?, "release refused");
    let second = timeout(Duration::from_secs(3), behind)
        .await
        .context("the waiter behind did not get the lock")???
        .context("the waiter behind ended without the lock")?;
    link.heal();
    // The cut-off waiter's next refresh finds its entry gone; it joins again behind the
    // holder and gets the lock at its release.
    queue_reaches(&server, &key, 1).await?;
    ensure!(other.release(&second).await?, "release refused");
    let lease = timeout(Duration::from_secs(5), waiting)
        .await
        .context("the cut-off waiter never got the lock after healing")???
        .context("the cut-off waiter's wait ended without the lock")?;
    let mut direct = server.client()?.get_multiplexed_async_connection().await?;
    let value: Option<String> = redis::cmd("GET")
        .arg(scheme()?.lock_key(&key))
        .query_async(&mut direct)
        .await?;
    let value = value.context("the lock key is missing while the waiter holds it")?;
    ensure!(
        value.trim_end_matches('+') == lease.owner().to_string(),
        "the waiter's lease names a token the server does not hold"
    );
    waiter.release(&lease).await?;
    Ok(())
}
