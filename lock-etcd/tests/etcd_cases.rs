//! etcd-specific cases on harness-started servers: FIFO order, leader loss, a waiter whose
//! lease is revoked from outside (#11456), a paused server, a cut connection, bad URLs.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::EtcdFactory;
use conformance_tests::BackendFactory;
use lock_core::{LockError, LockKey, Locker};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

async fn locker(factory: &EtcdFactory) -> Result<Locker> {
    Ok(Locker::from_arc(factory.backend().await?))
}

/// Waits until the queue of `key` has `len` entries; returns them (oldest first).
async fn queue_of(
    factory: &EtcdFactory,
    key: &str,
    len: usize,
) -> Result<Vec<(Vec<u8>, i64, i64)>> {
    let range = lock_etcd::key_range(&factory.prefix, &LockKey::new(key)?);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let entries = factory.cluster.keys_with_prefix(&range).await?;
        if entries.len() == len {
            return Ok(entries);
        }
        ensure!(
            Instant::now() < deadline,
            "queue of {key} has {} entries, expected {len}",
            entries.len()
        );
        sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifo_order_of_eight_waiters() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let holder = locker(&factory).await?;
    let waiters = [locker(&factory).await?, locker(&factory).await?];
    let guard = holder
        .lock("fifo")
        .ttl(Duration::from_secs(10))
        .acquire()
        .await?;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for index in 0..8 {
        let locker = waiters[index % 2].clone();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let guard = locker
                .lock("fifo")
                .ttl(Duration::from_secs(10))
                .wait(Duration::from_secs(30))
                .acquire()
                .await?;
            order
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((index, guard.fence()));
            sleep(Duration::from_millis(5)).await;
            guard.release().await?;
            anyhow::Ok(())
        }));
        // The next waiter joins only once this one is in the queue.
        queue_of(&factory, "fifo", index + 2).await?;
    }
    ensure!(guard.release().await?, "holder's release returned false");
    for task in tasks {
        task.await??;
    }
    let order = order.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let indices: Vec<usize> = order.iter().map(|(index, _)| *index).collect();
    ensure!(
        indices == (0..8).collect::<Vec<_>>(),
        "waiters acquired in order {indices:?}"
    );
    let fences: Vec<_> = order.iter().map(|(_, fence)| *fence).collect();
    ensure!(
        fences.windows(2).all(|pair| pair[0] < pair[1]),
        "fences not increasing: {fences:?}"
    );
    queue_of(&factory, "fifo", 0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_while_held_keeps_lock_and_renewals() -> Result<()> {
    let factory = EtcdFactory::start(3).await?;
    let holder = locker(&factory).await?;
    let other = locker(&factory).await?;
    let ttl = Duration::from_secs(2);
    let guard = holder.lock("leader").ttl(ttl).acquire().await?;
    let fence = guard.fence();
    let killed = factory.cluster.kill_leader().await?;
    let killed_at = Instant::now();
    // Three TTLs: without renewals through the new leader the lease would be long gone.
    sleep(ttl * 3).await;
    ensure!(
        !guard.is_lost(),
        "lock lost after leader {killed} was killed: {:?}",
        guard.lost_reason()
    );
    ensure!(
        guard.lease().sent_at() > killed_at + ttl,
        "no renewal went through after the leader was killed"
    );
    ensure!(guard.fence() == fence, "fence changed");
    ensure!(
        other.try_acquire("leader").await?.is_none(),
        "another locker got the held key"
    );
    ensure!(guard.release().await?, "release returned false");
    let again = other
        .try_acquire("leader")
        .await?
        .context("key not free after release")?;
    again.release().await?;
    // The killed member comes back and the cluster is whole again.
    factory.cluster.restart(killed).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiter_with_revoked_lease_never_acquires() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let holder = locker(&factory).await?;
    let waiter = locker(&factory).await?;
    let guard = holder
        .lock("revoked")
        .ttl(Duration::from_secs(10))
        .acquire()
        .await?;
    let task = tokio::spawn(async move {
        waiter
            .lock("revoked")
            .ttl(Duration::from_secs(10))
            .wait(Duration::from_secs(20))
            .acquire()
            .await
    });
    let queue = queue_of(&factory, "revoked", 2).await?;
    let (_, _, waiter_lease) = queue[1];
    factory.cluster.revoke_lease(waiter_lease).await?;
    queue_of(&factory, "revoked", 1).await?;
    ensure!(guard.release().await?, "holder's release returned false");
    // The client rejoins the queue after the retryable "entry vanished" error, so the waiter
    // may get the lock, but only through a new entry on a new lease, never the revoked one.
    match timeout(Duration::from_secs(5), task)
        .await
        .context("waiter hung")??
    {
        Ok(guard) => {
            let lease_id = lock_etcd::EtcdBackend::lease_id(&guard.lease());
            ensure!(
                lease_id != Some(waiter_lease),
                "the waiter acquired on its revoked lease {waiter_lease:x}"
            );
            ensure!(
                guard.fence().map(|fence| fence.0) > Some(u64::try_from(queue[1].1)?),
                "the waiter acquired with its old queue entry's fence {:?}",
                guard.fence()
            );
            guard.release().await?;
        }
        Err(error) => ensure!(
            error.is_retryable(),
            "expected a retryable error, got {error}"
        ),
    }
    queue_of(&factory, "revoked", 0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_server_fires_lost_before_deadline() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let holder = locker(&factory).await?;
    let ttl = Duration::from_secs(2);
    let guard = holder.lock("paused").ttl(ttl).acquire().await?;
    sleep(Duration::from_millis(100)).await;
    factory.cluster.pause(0)?;
    let outcome = timeout(ttl * 2, guard.lost()).await;
    let fired = Instant::now();
    factory.cluster.resume(0)?;
    outcome.context("lost() never fired while the server was paused")?;
    let valid_until = guard.valid_until();
    ensure!(
        fired < valid_until,
        "lost() fired {:?} after the validity deadline",
        fired - valid_until
    );
    drop(guard);
    // The server recovers and the key becomes free (released in the background or expired).
    let other = locker(&factory).await?;
    let next = other
        .lock("paused")
        .ttl(ttl)
        .wait(ttl + lock_etcd::EXPIRY_SLACK + Duration::from_secs(3))
        .acquire()
        .await?;
    next.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_connection_fires_lost_and_heals() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let holder = locker(&factory).await?;
    let ttl = Duration::from_secs(2);
    let guard = holder.lock("cut").ttl(ttl).acquire().await?;
    factory.cluster.cut(0)?;
    timeout(ttl * 2, guard.lost())
        .await
        .context("lost() never fired with the connection cut")?;
    ensure!(
        Instant::now() < guard.valid_until(),
        "lost() fired after the validity deadline"
    );
    factory.cluster.heal(0)?;
    drop(guard);
    let next = holder
        .lock("cut")
        .ttl(ttl)
        .wait(ttl + lock_etcd::EXPIRY_SLACK + Duration::from_secs(3))
        .acquire()
        .await?;
    ensure!(next.release().await?, "release after heal returned false");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_unreachable_servers_fail_fast() -> Result<()> {
    for bad in [
        "",
        "etcd://",
        "etcd://host",
        "etcd://host:port",
        "http://127.0.0.1:2379",
        "etcd://a:1,,b:2",
    ] {
        match lock_etcd::connect(bad).await {
            Err(LockError::InvalidConfig(_)) => {}
            other => bail!("{bad:?}: expected InvalidConfig, got {other:?}"),
        }
    }
    // Nothing listens on a fresh free port.
    let port = lock_harness::free_port()?;
    let started = Instant::now();
    match lock_etcd::connect(&format!("etcd://127.0.0.1:{port}")).await {
        Err(error @ LockError::Backend { .. }) => {
            ensure!(error.is_retryable(), "not retryable: {error}")
        }
        other => bail!("unreachable server: expected Backend, got {other:?}"),
    }
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "connect took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Measures how late etcd deletes an abandoned entry after its TTL (the lessor's 500 ms scan
/// plus a raft round), the basis of `EXPIRY_SLACK`. It fails only on an entry seen alive past
/// the slack: the lag counted is up to the start of the last look that still found the entry
/// (each look opens a client of its own, which on a loaded machine took 100 ms and more, and
/// counting to the end of the first look that did not find it once failed the test for that
/// time alone); the bound to that end is printed beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry_lag_is_within_the_declared_slack() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let backend = factory.backend().await?;
    let mut lags = Vec::new();
    let mut gone_by = Vec::new();
    for round in 0..6 {
        let key = LockKey::new(format!("lag{round}"))?;
        let range = lock_etcd::key_range(&factory.prefix, &key);
        let lease = backend
            .try_acquire(&key, Duration::from_secs(2))
            .await?
            .into_lease()
            .context("not acquired")?;
        let expires = lease.sent_at() + lease.ttl();
        sleep(lease.ttl() - Duration::from_millis(300)).await;
        let mut seen_alive = expires;
        loop {
            let asked = Instant::now();
            let entries = factory.cluster.keys_with_prefix(&range).await?;
            let Some(&(_, _, lease_id)) = entries.first() else {
                break;
            };
            seen_alive = seen_alive.max(asked);
            if Instant::now() >= expires + Duration::from_secs(3) {
                // Say what etcd thinks of the lease, so that a failure tells a lease the
                // server extended (TTL > 0) from one it found expired but did not revoke.
                let mut client = factory.cluster.client().await?;
                let seen = client
                    .lease_time_to_live(lease_id, None)
                    .await
                    .map(|ttl| format!("TTL {} s of {} s granted", ttl.ttl(), ttl.granted_ttl()));
                bail!(
                    "round {round}: entry never expired, 3 s after its TTL; lease {lease_id:x}: {seen:?}"
                );
            }
            sleep(Duration::from_millis(5)).await;
        }
        lags.push(seen_alive.saturating_duration_since(expires));
        gone_by.push(Instant::now().saturating_duration_since(expires));
    }
    println!("expiry lag after TTL, seen alive until / seen gone by: {lags:?} / {gone_by:?}");
    lags.sort();
    let worst = lags[lags.len() - 1];
    ensure!(
        worst <= lock_etcd::EXPIRY_SLACK,
        "an entry was seen alive {worst:?} after its TTL, more than the declared slack {:?} \
         (seen alive until / gone by, per round: {lags:?} / {gone_by:?})",
        lock_etcd::EXPIRY_SLACK
    );
    Ok(())
}

/// A backend on `factory`'s server that bypasses the harness proxies (unaffected by
/// `blackhole`/`cut`).
async fn direct_backend(factory: &EtcdFactory) -> Result<Arc<dyn lock_core::LockBackend>> {
    let config = lock_etcd::EtcdConfig::new(factory.cluster.direct_endpoints())
        .with_prefix(factory.prefix.clone());
    Ok(Arc::new(lock_etcd::EtcdBackend::connect(config).await?))
}

/// A queued waiter's keep-alive that hangs (a silent partition) delays neither its deadline
/// nor the revoke of its entry: `wait(w)` ends close to `w`, not a request timeout (3 s) or
/// two later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_waiter_keeps_its_deadline_while_a_keep_alive_hangs() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let holder = Locker::from_arc(direct_backend(&factory).await?);
    let waiter = locker(&factory).await?;
    let guard = holder
        .lock("deadline")
        .ttl(Duration::from_secs(30))
        .acquire()
        .await?;
    let wait = Duration::from_millis(2500);
    let started = Instant::now();
    let task = tokio::spawn(async move {
        // TTL 2 s: the waiter's first keep-alive is due ~667 ms after it joined.
        waiter
            .lock("deadline")
            .ttl(Duration::from_secs(2))
            .wait(wait)
            .acquire()
            .await
    });
    queue_of(&factory, "deadline", 2).await?;
    factory.cluster.blackhole(0)?;
    let outcome = timeout(Duration::from_secs(10), task).await;
    let elapsed = started.elapsed();
    factory.cluster.heal(0)?;
    match outcome.context("waiter hung for 10 s")?? {
        Err(error) if error.is_timeout() => {}
        other => bail!("expected a timeout, got {other:?}"),
    }
    ensure!(
        elapsed < wait + Duration::from_millis(700),
        "wait({wait:?}) returned after {elapsed:?}"
    );
    guard.release().await?;
    Ok(())
}

/// Finding (review, 2026-12-03): the revoke of a waiter's lease that gave up gave up for
/// good after 30 s of failures, whatever the lease's TTL. A waiter with a long TTL whose
/// member went away for longer than that left its queue entry behind: once the holder
/// released, that entry was the head of the queue, owned by nobody, and every other waiter
/// waited out its TTL (90 s here). The revoke now retries for the lease's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiters_revoke_outlasts_a_long_outage() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let holder = Locker::from_arc(direct_backend(&factory).await?);
    let third = Locker::from_arc(direct_backend(&factory).await?);
    let waiter = locker(&factory).await?;
    let guard = holder
        .lock("ghost")
        .ttl(Duration::from_secs(120))
        .acquire()
        .await?;
    let task = tokio::spawn(async move {
        waiter
            .lock("ghost")
            .ttl(Duration::from_secs(90))
            .wait(Duration::from_millis(2500))
            .acquire()
            .await
    });
    queue_of(&factory, "ghost", 2).await?;
    factory.cluster.blackhole(0)?;
    let outcome = timeout(Duration::from_secs(10), task).await;
    // Then unreachable (connections refused: a black hole would keep the revokes' bytes and
    // deliver them when healed) past the 30 s the revoke used to give up after (its tries
    // take up to a request timeout each).
    factory.cluster.cut(0)?;
    tokio::time::sleep(Duration::from_secs(36)).await;
    factory.cluster.heal(0)?;
    match outcome.context("waiter hung for 10 s")?? {
        Err(error) if error.is_timeout() => {}
        other => bail!("expected the waiter to time out, got {other:?}"),
    }
    guard.release().await?;
    match third
        .lock("ghost")
        .ttl(Duration::from_secs(5))
        .wait(Duration::from_secs(6))
        .acquire()
        .await
    {
        Ok(guard) => {
            guard.release().await?;
        }
        Err(error) => {
            bail!("the timed-out waiter's entry still held the queue after the outage: {error}")
        }
    }
    Ok(())
}

/// Waiters keep their leases alive over the renewer's shared streams: 20 waiters over three
/// keep-alive periods open at most the renewer's 16 streams, not one per keep-alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_keep_alive_over_shared_streams() -> Result<()> {
    const WAITERS: usize = 20;
    let factory = EtcdFactory::start(1).await?;
    let holder = Locker::from_arc(direct_backend(&factory).await?);
    let waiter = locker(&factory).await?;
    let guard = holder
        .lock("streams")
        .ttl(Duration::from_secs(30))
        .auto_renew(false)
        .acquire()
        .await?;
    let streams = || {
        factory.cluster.metric(
            0,
            "grpc_server_started_total",
            &["grpc_method=\"LeaseKeepAlive\""],
        )
    };
    let before = streams().await?;
    let mut tasks = Vec::new();
    for _ in 0..WAITERS {
        let waiter = waiter.clone();
        tasks.push(tokio::spawn(async move {
            waiter
                .lock("streams")
                .ttl(Duration::from_secs(2))
                .wait(Duration::from_millis(2300))
                .acquire()
                .await
        }));
    }
    for task in tasks {
        match task.await? {
            Err(error) if error.is_timeout() => {}
            other => bail!("expected a timeout, got {other:?}"),
        }
    }
    let opened = streams().await? - before;
    println!("keep-alive streams opened by {WAITERS} waiters: {opened}");
    ensure!(
        opened > 0.0,
        "no keep-alive stream counted: the metric is not read"
    );
    ensure!(
        opened <= 16.0,
        "{WAITERS} waiters opened {opened} keep-alive streams"
    );
    guard.release().await?;
    Ok(())
}

/// A holder that finds the key held gets no remaining-TTL lookup (one round trip nobody
/// uses: waiting callers queue instead of polling on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_try_acquire_makes_no_ttl_round_trip() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let backend = factory.backend().await?;
    let key = LockKey::new("held")?;
    let lease = backend
        .try_acquire(&key, Duration::from_secs(10))
        .await?
        .into_lease()
        .context("not acquired")?;
    match backend.try_acquire(&key, Duration::from_secs(10)).await? {
        lock_core::Attempt::Held { expires_in: None } => {}
        other => bail!("expected Held without a TTL, got {other:?}"),
    }
    ensure!(backend.release(&lease).await?, "release returned false");
    Ok(())
}

/// etcd started with `--max-txn-ops=8` (default 128): a burst of 200 renewals at once (as
/// when many locks were taken together) shrinks the check batches to fit instead of failing
/// every renewal "too many operations", and auto-renewed locks all survive 1.5 TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renewals_fit_a_lower_max_txn_ops() -> Result<()> {
    use futures::StreamExt;
    const KEYS: usize = 200;
    let cluster = lock_harness::etcd::EtcdCluster::start_with_args(1, &["--max-txn-ops=8"]).await?;
    let url = cluster.url(Some("ops"));
    let backend = lock_etcd::connect(&url).await?;
    let ttl = Duration::from_secs(2);
    let leases: Vec<_> = futures::stream::iter(0..KEYS)
        .map(|index| {
            let backend = backend.clone();
            async move {
                let key = LockKey::new(format!("ops{index}"))?;
                backend
                    .try_acquire(&key, ttl)
                    .await?
                    .into_lease()
                    .context("not acquired")
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let leases = leases.into_iter().collect::<Result<Vec<_>>>()?;
    for round in 0..2 {
        let renewed =
            futures::future::join_all(leases.iter().map(|lease| backend.renew(lease, ttl))).await;
        let failed: Vec<_> = renewed.iter().filter_map(|r| r.as_ref().err()).collect();
        ensure!(
            failed.is_empty(),
            "round {round}: {} of {KEYS} renewals failed, first: {}",
            failed.len(),
            failed[0]
        );
    }
    let locker = Locker::from_arc(backend.clone());
    let guards: Vec<_> = futures::stream::iter(0..KEYS)
        .map(|index| {
            let locker = locker.clone();
            async move { locker.lock(format!("auto{index}")).ttl(ttl).acquire().await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let guards = guards.into_iter().collect::<Result<Vec<_>, _>>()?;
    sleep(ttl + ttl / 2).await;
    let lost = guards.iter().filter(|guard| guard.is_lost()).count();
    ensure!(lost == 0, "{lost} of {KEYS} auto-renewed locks lost");
    for guard in guards {
        guard.release().await?;
    }
    for lease in &leases {
        backend.release(lease).await?;
    }
    Ok(())
}

/// A backend connected on one runtime that has since shut down keeps working on another:
/// renewals and watch wake-ups restart their tasks there.
#[test]
fn backend_outlives_the_runtime_that_connected_it() -> Result<()> {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    let first = runtime()?;
    let (factory, backend) = first.block_on(async {
        let factory = EtcdFactory::start(1).await?;
        let backend = factory.backend().await?;
        anyhow::Ok((factory, backend))
    })?;
    drop(first);
    runtime()?.block_on(async {
        let locker = Locker::from_arc(backend);
        let ttl = Duration::from_secs(2);
        let guard = locker.lock("runtime").ttl(ttl).acquire().await?;
        let acquired = Instant::now();
        sleep(ttl + ttl / 2).await;
        ensure!(
            !guard.is_lost(),
            "lock lost on the second runtime: {:?}",
            guard.lost_reason()
        );
        ensure!(guard.lease().sent_at() > acquired, "never renewed");
        // A queued waiter still gets the lock on release.
        let waiter = locker.clone();
        let task = tokio::spawn(async move {
            waiter
                .lock("runtime")
                .ttl(ttl)
                .wait(Duration::from_secs(10))
                .acquire()
                .await
        });
        queue_of(&factory, "runtime", 2).await?;
        let released = Instant::now();
        guard.release().await?;
        let next = timeout(Duration::from_secs(5), task)
            .await
            .context("waiter not woken")???;
        println!("hand-off on the second runtime: {:?}", released.elapsed());
        next.release().await?;
        drop(factory);
        anyhow::Ok(())
    })
}

/// The leases etcd currently has (LeaseLeases), read directly.
async fn leases_on_server(factory: &EtcdFactory) -> Result<Vec<i64>> {
    let mut client = factory.cluster.client().await?;
    Ok(client
        .leases()
        .await?
        .leases()
        .iter()
        .map(|lease| lease.id())
        .collect())
}

/// Issue #9 item 7: an acquire cancelled while its lease grant was in flight left the lease
/// on the server for its whole TTL (the revoke-on-drop was armed only once the grant had
/// answered). A retried grant likewise left its first lease behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acquires_cancelled_during_grant_leave_no_lease() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let backend = factory.backend().await?;
    let locker = Locker::from_arc(backend.clone());
    // Warm the connection up (and leave nothing).
    locker
        .try_acquire("warm")
        .await?
        .context("warm-up")?
        .release()
        .await?;
    sleep(Duration::from_millis(200)).await;
    ensure!(
        leases_on_server(&factory).await?.is_empty(),
        "a lease before the test"
    );
    let proxy = factory.cluster.members()[0].proxy();
    // Each chunk waits 300 ms in each direction: the grant reaches etcd, its answer comes
    // after the caller gave up.
    proxy.set_delay(Duration::from_millis(300));
    let ttl = Duration::from_secs(60);
    for index in 0..4 {
        let key = LockKey::new(format!("cancelled-{index}"))?;
        let attempt = timeout(Duration::from_millis(150), backend.try_acquire(&key, ttl)).await;
        ensure!(
            attempt.is_err(),
            "try_acquire answered through a 600 ms round trip"
        );
        let queued = timeout(
            Duration::from_millis(150),
            locker
                .lock(format!("queued-{index}"))
                .ttl(ttl)
                .wait(Duration::from_secs(5))
                .acquire(),
        )
        .await;
        ensure!(
            queued.is_err(),
            "acquire answered through a 600 ms round trip"
        );
    }
    sleep(Duration::from_millis(1000)).await;
    proxy.set_delay(Duration::ZERO);
    // Grants took effect ~300 ms after they were sent; allow the clean-up 2 s more.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let leases = leases_on_server(&factory).await?;
        if leases.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{} leases (TTL {ttl:?}) left on the server by 8 acquires cancelled during their grant",
            leases.len()
        );
        sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Issue #9 item 1b: a queued waiter's lease was handed out with the send time of its last
/// *confirmed* keep-alive, however old: with slow answers (a 600 ms delay each way, TTL
/// 3 s) that time lagged by up to a keep-alive period plus two round trips, so the lease
/// came out with its validity deadline already past or within the lost margin. When the last confirmation is old, the
/// backend now confirms the lease when its turn comes, and never hands out one it cannot
/// show to be valid beyond the lost margin. A keep-alive still unanswered when the turn
/// came was dropped with the wait, and the turn's confirmation then took the lease for run
/// out (no keep-alive confirmed within the TTL) although etcd had it alive: the round was
/// refused (CI, 2026-12-03: all three rounds refused). The confirmation now counts an
/// unanswered keep-alive as one that may have reached etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_lease_is_handed_out_with_a_fresh_validity() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let holder = direct_backend(&factory).await?;
    let waiter = factory.backend().await?;
    let proxy = factory.cluster.members()[0].proxy();
    let ttl = Duration::from_secs(3);
    let margin = lock_core::lost_margin(ttl);
    let mut remaining = Vec::new();
    let mut refused = Vec::new();
    for (round, pause_ms) in [1500_u64, 2300, 3100].into_iter().enumerate() {
        let key = LockKey::new(format!("stale-{round}"))?;
        let held = holder
            .try_acquire(&key, Duration::from_secs(30))
            .await?
            .into_lease()
            .context("holder not granted")?;
        let task = {
            let (waiter, key) = (waiter.clone(), key.clone());
            tokio::spawn(async move {
                let lease = waiter
                    .acquire_queued(&key, ttl, Instant::now() + Duration::from_secs(20))
                    .await;
                (lease, Instant::now())
            })
        };
        queue_of(&factory, key.as_str(), 2).await?;
        proxy.set_delay(Duration::from_millis(600));
        // Different phases of the keep-alive cycle at the hand-off.
        sleep(Duration::from_millis(pause_ms)).await;
        ensure!(
            holder.release(&held).await?,
            "holder's release returned false"
        );
        let (lease, returned_at) = timeout(Duration::from_secs(20), task).await??;
        proxy.set_delay(Duration::ZERO);
        match lease {
            Ok(Some(lease)) => {
                remaining.push(lease.valid_until().saturating_duration_since(returned_at));
                ensure!(
                    lease.valid_until() > returned_at + margin,
                    "round {round}: the lease came out with {:?} of validity left (lost margin {margin:?}); so far {remaining:?}",
                    lease.valid_until().saturating_duration_since(returned_at)
                );
                waiter.release(&lease).await?;
            }
            Ok(None) => bail!("round {round}: the waiter's deadline passed"),
            // Refusing a lease it cannot confirm is allowed; handing out a dead one is not.
            Err(error) => {
                ensure!(error.is_retryable(), "round {round}: {error}");
                // The keep-alives go out every TTL/3 plus a round trip (1.2 s < TTL), so
                // etcd never lets the lease run out here: calling it gone is wrong.
                ensure!(
                    !error.to_string().contains("expired or was revoked"),
                    "round {round}: a lease etcd kept alive was called gone: {error}"
                );
                refused.push(format!("round {round}: {error}"));
            }
        }
    }
    println!("validity left at hand-off: {remaining:?}; refused: {refused:?}");
    // Refusals are allowed, but a run of nothing but refusals would check nothing.
    ensure!(
        !remaining.is_empty(),
        "no round handed a lease out: the validity check never ran"
    );
    Ok(())
}

/// A release that gets no answer (a silent member, an election longer than the request
/// timeout) used to return its error and leave the entry until the lease's TTL ran out,
/// blocking every waiter for up to the whole TTL. The backend now revokes its own lease in
/// the background (retrying until the member answers again), which ends the entry with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_without_an_answer_frees_the_lock_soon_after() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let holder = factory.backend().await?;
    let other = direct_backend(&factory).await?;
    let key = LockKey::new("unanswered-release")?;
    let ttl = Duration::from_secs(60);
    let lock_core::Attempt::Acquired(lease) = holder.try_acquire(&key, ttl).await? else {
        bail!("the first try did not acquire");
    };
    let proxy = factory.cluster.members()[0].proxy();
    proxy.blackhole();
    let started = Instant::now();
    let released = timeout(Duration::from_secs(20), holder.release(&lease))
        .await
        .context("release hung past 20 s")?;
    ensure!(
        released.is_err(),
        "a release through a silent member answered: {released:?}"
    );
    println!("release failed after {:?}: {released:?}", started.elapsed());
    proxy.heal();
    // The lock is free well before its 60 s TTL.
    let freed = Instant::now() + Duration::from_secs(15);
    loop {
        match other.try_acquire(&key, Duration::from_secs(5)).await? {
            lock_core::Attempt::Acquired(next) => {
                other.release(&next).await?;
                break;
            }
            lock_core::Attempt::Held { .. } => ensure!(
                Instant::now() < freed,
                "the lock stayed held 15 s after the failed release was followed by a healed \
                 link (its TTL is {ttl:?})"
            ),
        }
        sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Each member raises a lease's TTL to its own minimum (1.5 × its election timeout) and
/// answers with that figure, but only the leader expires leases, by its own minimum. A client
/// that believed the answering member's raised TTL (4 s here, for 2 s asked) would, behind a
/// follower with a longer election timeout than the leader's, count on seconds the leader
/// never gives: the lease gone, another holder in, while its guard still looked valid. The
/// lease counts the TTL asked for (raised only to the backend's own 2 s minimum), which every
/// member keeps at least.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_counts_the_ttl_asked_for_not_a_members_raised_one() -> Result<()> {
    let cluster = lock_harness::etcd::EtcdCluster::start_with_args(
        1,
        &["--heartbeat-interval=250", "--election-timeout=2500"],
    )
    .await?;
    let backend = lock_etcd::connect(&cluster.url(Some("raised"))).await?;
    let key = LockKey::new("raised")?;
    let ttl = Duration::from_secs(2);
    let lease = backend
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("not acquired")?;
    ensure!(
        lease.ttl() == ttl,
        "the lease counts {:?} (the member's raised TTL), not the {ttl:?} asked for",
        lease.ttl()
    );
    let renewed = backend.renew(&lease, ttl).await?;
    ensure!(renewed.ttl() == ttl, "renewed for {:?}", renewed.ttl());
    backend.release(&renewed).await?;
    Ok(())
}

/// A multi-thread runtime of one worker, for the runtime tests below.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// The backend connected on one runtime, its first renewal made on a second, then the first
/// shut down: the renewal tasks (started on the second) kept the first runtime's client,
/// whose channel died with it, so every renewal failed and every guard was lost.
#[test]
fn renewals_outlive_the_runtime_that_connected() -> Result<()> {
    let harness = runtime()?;
    let cluster = harness.block_on(lock_harness::etcd::EtcdCluster::single())?;
    let url = cluster.url(Some("outlive"));
    let connecting = runtime()?;
    let backend = connecting.block_on(lock_etcd::connect(&url))?;
    let using = runtime()?;
    using.block_on(async move {
        let locker = Locker::from_arc(backend);
        let ttl = Duration::from_secs(2);
        let guard = locker.lock("outlive").ttl(ttl).acquire().await?;
        // The first renewal (at a third of the TTL) starts the renewal tasks.
        sleep(Duration::from_secs(1)).await;
        connecting.shutdown_background();
        sleep(ttl * 2).await;
        ensure!(
            !guard.is_lost(),
            "lost after the connecting runtime shut down: {:?}",
            guard.lost_reason()
        );
        guard.release().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    drop(cluster);
    Ok(())
}

/// A current-thread runtime made the backend's first renewal, then stopped being driven
/// (kept alive): the renewal tasks lived there and never ran again, so the renewals of every
/// other runtime queued into them and every guard was lost.
#[test]
fn renewals_outlive_a_runtime_left_undriven() -> Result<()> {
    let harness = runtime()?;
    let cluster = harness.block_on(lock_harness::etcd::EtcdCluster::single())?;
    let url = cluster.url(Some("undriven"));
    let main = runtime()?;
    let backend = main.block_on(lock_etcd::connect(&url))?;
    let side = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    side.block_on({
        let locker = Locker::from_arc(backend.clone());
        async move {
            let guard = locker
                .lock("undriven-side")
                .ttl(Duration::from_secs(2))
                .acquire()
                .await?;
            sleep(Duration::from_millis(800)).await;
            guard.release().await?;
            Ok::<_, anyhow::Error>(())
        }
    })?;
    // `side` stays alive, undriven.
    main.block_on(async {
        let locker = Locker::from_arc(backend);
        let guard = locker
            .lock("undriven-main")
            .ttl(Duration::from_secs(2))
            .acquire()
            .await?;
        sleep(Duration::from_secs(5)).await;
        ensure!(
            !guard.is_lost(),
            "lost while another runtime was left undriven: {:?}",
            guard.lost_reason()
        );
        guard.release().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    drop(side);
    drop(cluster);
    Ok(())
}
