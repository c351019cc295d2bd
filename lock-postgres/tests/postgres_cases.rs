//! PostgreSQL-specific cases: a terminated holder session, a server restart, a cut or
//! partitioned client, many keys on few connections, a user's pool left alone, bad URLs.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::{PgFactory, advisory_held, server};
use lock_core::{LockBackend, LockError, LockKey, Locker};
use lock_harness::TcpProxy;
use lock_harness::postgres::PostgresServer;
use lock_postgres::{PostgresBackend, PostgresConfig, advisory_key};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, timeout};

fn unique(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

fn config_named(app: &str) -> PostgresConfig {
    PostgresConfig {
        application_name: app.to_owned(),
        ..PostgresConfig::default()
    }
}

async fn backend_at(url: &str, config: PostgresConfig) -> Result<Arc<dyn LockBackend>> {
    let options = PgConnectOptions::from_str(url)?;
    Ok(Arc::new(
        PostgresBackend::with_options(options, config).await?,
    ))
}

/// `pg_terminate_backend` of the holder session: the server frees its locks at once. The
/// guard's lost signal must fire before another process can act on the lock, or at worst
/// within the heartbeat interval of it (the holder finds out by its session heartbeat, not
/// at its next renewal T/3 later). A waiter polling every 2 ms measures when the lock became
/// available elsewhere; a `Locker` waiter then gets it with a higher fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_holder_session_fires_lost_and_waiter_acquires() -> Result<()> {
    let server = server().await?;
    let app = unique("term");
    let holder = Locker::from_arc(backend_at(&server.url(), config_named(&app)).await?);
    let poller = backend_at(&server.url(), PostgresConfig::default()).await?;
    let waiter = Locker::from_arc(backend_at(&server.url(), PostgresConfig::default()).await?);
    let key = unique("terminated");
    let ttl = Duration::from_secs(3);
    let interval = lock_postgres::heartbeat_interval(ttl.as_millis() as u64);
    let guard = holder.lock(&key).ttl(ttl).acquire().await?;
    let lost_at = tokio::spawn({
        let lost = guard.lost();
        async move {
            lost.await;
            Instant::now()
        }
    });
    let polled = tokio::spawn({
        let key = LockKey::new(&key)?;
        async move {
            loop {
                if let Some(lease) = poller.try_acquire(&key, ttl).await?.into_lease() {
                    return Ok::<_, anyhow::Error>((Instant::now(), poller, lease));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let terminated_at = terminate_holder_sessions(server, &app).await?;
    let lost_at = timeout(ttl, lost_at)
        .await
        .context("lost() did not fire within the TTL after the holder session was terminated")??;
    ensure!(
        lost_at < guard.valid_until(),
        "lost fired only after the validity deadline"
    );
    let (acquired_at, poller, lease) = timeout(Duration::from_secs(5), polled)
        .await
        .context("the polling waiter did not get the lock")???;
    // Positive: the holder heard of the loss after the other process got the lock.
    let gap_ms = lost_at.duration_since(terminated_at).as_secs_f64() * 1e3
        - acquired_at.duration_since(terminated_at).as_secs_f64() * 1e3;
    tracing::info!(gap_ms, "lost() relative to the waiter's acquisition");
    println!(
        "terminated holder: lost() {:?} after the terminate call, waiter acquired {:?} after; \
         gap lost - acquired = {gap_ms:+.1} ms (heartbeat interval {interval:?})",
        lost_at.saturating_duration_since(terminated_at),
        acquired_at.saturating_duration_since(terminated_at),
    );
    // The heartbeat's probe takes a round trip past its interval, and both instants are read
    // when their tasks next run: 100 ms for those on a loaded machine. Hearing it at the next
    // renewal instead (T/3 = 1 s) still fails.
    ensure!(
        lost_at <= acquired_at + interval + Duration::from_millis(100),
        "lost() fired {gap_ms:.1} ms after another process acquired the lock (heartbeat \
         interval {interval:?})"
    );
    ensure!(lease.fence() > guard.fence(), "fence did not increase");
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        let key = key.clone();
        async move {
            waiter
                .lock(&key)
                .ttl(ttl)
                .wait(Duration::from_secs(10))
                .acquire()
                .await
        }
    });
    ensure!(
        poller.release(&lease).await?,
        "the poller's release answered false"
    );
    let next = timeout(Duration::from_secs(5), waiting)
        .await
        .context("the waiter did not get the lock")???;
    ensure!(next.fence() > lease.fence(), "fence did not increase");
    next.release().await?;
    Ok(())
}

/// A server restart: held locks report lost; afterwards acquisitions work again (new holder
/// sessions) and fences keep increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_restart_loses_locks_then_recovers() -> Result<()> {
    let server = Arc::new(tokio::task::spawn_blocking(PostgresServer::start).await??);
    let locker = Locker::from_arc(backend_at(&server.url(), PostgresConfig::default()).await?);
    let ttl = Duration::from_secs(3);
    let mut guards = Vec::new();
    for i in 0..5 {
        guards.push(
            locker
                .lock(format!("restart-{i}"))
                .ttl(ttl)
                .acquire()
                .await?,
        );
    }
    let fence_before = guards[0].fence();
    tokio::task::spawn_blocking({
        let server = server.clone();
        move || server.restart()
    })
    .await??;
    for guard in &guards {
        timeout(ttl, guard.lost())
            .await
            .with_context(|| format!("{} was not reported lost after a restart", guard.key()))?;
    }
    // The same backend acquires again after the restart (it reconnects its sessions).
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        match locker
            .lock("restart-0")
            .ttl(ttl)
            .wait(Duration::from_secs(2))
            .acquire()
            .await
        {
            Ok(guard) => break guard,
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "not yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => bail!("no acquisition after the restart: {error}"),
        }
    };
    ensure!(
        again.fence() > fence_before,
        "fence went back after the restart"
    );
    drop(guards);
    again.release().await?;
    Ok(())
}

/// 500 keys held at once by one Locker whose backend was built from a user's pool of 10:
/// the pool is not used for holding (its size does not move), the backend stays within its
/// session limit, and the pool keeps answering queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_keys_leave_a_pool_of_ten_alone() -> Result<()> {
    let server = server().await?;
    let options = PgConnectOptions::from_str(&server.url())?.application_name("user-pool");
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .min_connections(2)
        .connect_with(options)
        .await?;
    let app = unique("many");
    let backend = PostgresBackend::from_pool(&pool, config_named(&app)).await?;
    let max_sessions = backend.config().max_sessions;
    let locker = Locker::new(backend);
    let size_before = pool.size();
    let prefix = unique("k500");
    let mut guards = Vec::new();
    for i in 0..500 {
        guards.push(
            locker
                .lock(format!("{prefix}-{i}"))
                .ttl(Duration::from_secs(2))
                .acquire()
                .await?,
        );
    }
    let all_acquired = tokio::time::Instant::now();
    // Held across at least one renewal round: each lease must be renewed since the last
    // acquire (a 2 s lease taken quickly would otherwise still be valid unrenewed), within
    // 3 s (renewals fall due at a third of the TTL).
    let by = all_acquired + Duration::from_secs(3);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ensure!(
            guards.iter().all(|guard| !guard.is_lost()),
            "a lock was lost while held"
        );
        let unrenewed = guards
            .iter()
            .filter(|guard| guard.lease().sent_at() <= all_acquired)
            .count();
        if unrenewed == 0 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < by,
            "{unrenewed} of 500 leases were not renewed within 3 s"
        );
    }
    ensure!(
        pool.size() == size_before,
        "the user's pool changed size: {} → {}",
        size_before,
        pool.size()
    );
    let holders: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(format!("{app}-holder"))
            .fetch_one(&pool)
            .await?;
    ensure!(
        holders >= 1 && holders as usize <= max_sessions,
        "{holders} holder sessions for 500 locks (limit {max_sessions})"
    );
    let sample = advisory_key("distlock", &format!("{prefix}-7"));
    ensure!(
        advisory_held(&pool, sample).await?,
        "the server does not show key 7 held"
    );
    for guard in guards {
        ensure!(guard.release().await?, "a release answered false");
    }
    ensure!(
        !advisory_held(&pool, sample).await?,
        "key 7 still held after release"
    );
    Ok(())
}

/// A user's pool on the same server keeps its connections and keeps working while locks are
/// held and contended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_user_is_unaffected() -> Result<()> {
    let server = server().await?;
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .min_connections(3)
        .connect_with(PgConnectOptions::from_str(&server.url())?)
        .await?;
    // sqlx opens the minimum in the background: wait for it rather than a fixed 100 ms.
    let opened_by = Instant::now() + Duration::from_secs(5);
    while pool.size() < 3 {
        ensure!(
            Instant::now() < opened_by,
            "the pool never opened its 3 connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let size_before = pool.size();
    let a = Locker::from_arc(Arc::new(
        PostgresBackend::from_pool(&pool, PostgresConfig::default()).await?,
    ));
    let b = Locker::from_arc(backend_at(&server.url(), PostgresConfig::default()).await?);
    let key = unique("shared");
    let guard = a.lock(&key).ttl(Duration::from_secs(2)).acquire().await?;
    let contender = b
        .lock(&key)
        .wait(Duration::from_millis(300))
        .acquire()
        .await;
    ensure!(
        matches!(contender, Err(LockError::Timeout { .. })),
        "contender was not refused"
    );
    for _ in 0..20 {
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await?;
        ensure!(one == 1);
    }
    ensure!(
        pool.size() == size_before,
        "pool size changed: {size_before} → {}",
        pool.size()
    );
    // sqlx hands a connection back to the pool in the background after a query: all are
    // idle again soon, unless the backend kept one.
    let returned_by = Instant::now() + Duration::from_secs(2);
    while pool.num_idle() != size_before as usize {
        ensure!(
            Instant::now() < returned_by,
            "a pool connection is still checked out 2 s after the last query"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    guard.release().await?;
    Ok(())
}

/// Cutting the client's connections (reset) fires lost() at the next renewal; healing lets
/// the backend acquire again on fresh sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_connection_fires_lost_then_heals() -> Result<()> {
    let server = server().await?;
    let proxy = TcpProxy::start(server.addr())?;
    let url = PostgresServer::url_for(proxy.addr());
    let locker = Locker::from_arc(backend_at(&url, PostgresConfig::default()).await?);
    let other = Locker::from_arc(backend_at(&server.url(), PostgresConfig::default()).await?);
    let key = unique("cut");
    let ttl = Duration::from_secs(3);
    let guard = locker.lock(&key).ttl(ttl).acquire().await?;
    proxy.cut();
    timeout(ttl, guard.lost())
        .await
        .context("lost() did not fire after a cut")?;
    ensure!(
        Instant::now() < guard.valid_until(),
        "lost fired after the validity deadline"
    );
    // The server saw the connection close: the lock is free at once.
    let taken = other
        .lock(&key)
        .ttl(ttl)
        .wait(Duration::from_secs(2))
        .acquire()
        .await?;
    taken.release().await?;
    proxy.heal();
    let again = locker
        .lock(&key)
        .ttl(ttl)
        .wait(Duration::from_secs(5))
        .acquire()
        .await?;
    again.release().await?;
    Ok(())
}

/// A silent partition (black hole: the holder looks alive but nothing arrives, as with a
/// paused process): the server ends the holder session by `idle_session_timeout` within TTL
/// of the last statement, so another client gets the lock within TTL + slack, while the
/// partitioned holder's guard reports lost before its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_partition_frees_lock_within_ttl() -> Result<()> {
    let server = server().await?;
    let proxy = TcpProxy::start(server.addr())?;
    let url = PostgresServer::url_for(proxy.addr());
    let backend = backend_at(&url, PostgresConfig::default()).await?;
    let slack = backend.capabilities().expiry_slack;
    let locker = Locker::from_arc(backend);
    let other = Locker::from_arc(backend_at(&server.url(), PostgresConfig::default()).await?);
    let key = unique("blackhole");
    let ttl = Duration::from_secs(2);
    let guard = locker.lock(&key).ttl(ttl).acquire().await?;
    // When the signal fires, not whether the guard reads lost afterwards (`is_lost()` is
    // also true once the deadline passed, which it always has by the time another client
    // gets the lock).
    let signal = guard.lost();
    let told = tokio::spawn(async move {
        signal.await;
        Instant::now()
    });
    let cut_at = Instant::now();
    proxy.blackhole();
    let taken = other
        .lock(&key)
        .ttl(ttl)
        .wait(ttl + Duration::from_secs(3))
        .acquire()
        .await
        .context("the lock of a partitioned holder was never freed")?;
    let taken_at = Instant::now();
    let freed_after = cut_at.elapsed();
    ensure!(
        freed_after <= ttl + slack + Duration::from_millis(1100),
        "freed {freed_after:?} after the partition (TTL {ttl:?}; backoff cap 1 s adds up to 1 s)"
    );
    let told_at = tokio::time::timeout(Duration::from_secs(1), told)
        .await
        .context("the partitioned holder's lost() never fired")??;
    ensure!(
        told_at < guard.valid_until() && told_at < taken_at,
        "lost() fired at +{:?}, after the deadline (+{:?}) or after another client took the \
         lock (+{:?})",
        told_at - cut_at,
        guard.valid_until().saturating_duration_since(cut_at),
        taken_at - cut_at
    );
    taken.release().await?;
    proxy.heal();
    Ok(())
}

/// Bad URLs and unreachable servers give typed errors quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_unreachable_servers_fail_fast() -> Result<()> {
    for url in [
        "not a url",
        "redis://127.0.0.1/",
        "postgres://127.0.0.1:5432/db?max_sessions=x",
        // Parameters sqlx would drop with only a log line.
        "postgres://127.0.0.1:5432/db?namespce=billing",
        "postgres://127.0.0.1:5432/db?ssl=true",
        "postgres://127.0.0.1:5432/db?connect_timeout=10",
        "postgres://127.0.0.1:5432/db?target_session_attrs=read-write",
    ] {
        match lock_postgres::connect(url).await {
            Err(LockError::InvalidConfig(_)) => {}
            other => bail!("{url}: expected InvalidConfig, got {other:?}"),
        }
    }
    // A port nobody listens on: refused at once, retryable.
    let port = lock_harness::free_port()?;
    let started = Instant::now();
    match lock_postgres::connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres")).await {
        Err(error @ LockError::Backend { .. }) => ensure!(error.is_retryable(), "{error}"),
        other => bail!("expected a Backend error, got {other:?}"),
    }
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // A black-holed server: bounded by the connect timeout.
    let server = server().await?;
    let proxy = TcpProxy::start(server.addr())?;
    proxy.blackhole();
    let started = Instant::now();
    let url = format!(
        "{}&connect_timeout_ms=500",
        PostgresServer::url_for(proxy.addr())
    );
    match lock_postgres::connect(&url).await {
        Err(error @ LockError::Backend { .. }) => ensure!(error.is_retryable(), "{error}"),
        other => bail!("expected a Backend error, got {other:?}"),
    }
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Two namespaces on one server never share a lock; a hash-derived key is independent of the
/// namespace-less sqlx key for the same name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_are_independent() -> Result<()> {
    let server = server().await?;
    let one = backend_at(
        &server.url(),
        PostgresConfig {
            namespace: "app-one".into(),
            ..PostgresConfig::default()
        },
    )
    .await?;
    let two = backend_at(
        &server.url(),
        PostgresConfig {
            namespace: "app-two".into(),
            ..PostgresConfig::default()
        },
    )
    .await?;
    let key = LockKey::new(unique("ns"))?;
    let ttl = Duration::from_secs(2);
    let a = one
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("one")?;
    let b = two
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("two")?;
    ensure!(one.release(&a).await? && two.release(&b).await?);
    ensure!(advisory_key("app-one", key.as_str()) != advisory_key("app-two", key.as_str()));
    Ok(())
}

/// The factory works for ad-hoc use too (keeps `common` fully used in this binary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn factory_reports_held_keys() -> Result<()> {
    use conformance_tests::BackendFactory;
    let factory = PgFactory::start().await?;
    let backend = factory.backend().await?;
    let key = LockKey::new(unique("factory"))?;
    let lease = backend
        .try_acquire(&key, Duration::from_secs(2))
        .await?
        .into_lease()
        .context("acquire")?;
    ensure!(factory.is_held(&key).await? == Some(true));
    backend.release(&lease).await?;
    ensure!(factory.is_held(&key).await? == Some(false));
    Ok(())
}

/// A user's lock on key "schema" (default namespace) must not block a new backend's setup:
/// setup serializes itself on a lock no user key can reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_not_blocked_by_a_user_key_named_schema() -> Result<()> {
    let server = server().await?;
    let holder = backend_at(&server.url(), PostgresConfig::default()).await?;
    let key = LockKey::new("schema")?;
    let lease = holder
        .try_acquire(&key, Duration::from_secs(30))
        .await?
        .into_lease()
        .context("key \"schema\" was not free")?;
    let started = Instant::now();
    let fresh = timeout(
        Duration::from_secs(3),
        backend_at(&server.url(), PostgresConfig::default()),
    )
    .await
    .context("connect() hung behind the user's lock on \"schema\"")??;
    let took = started.elapsed();
    ensure!(
        took < Duration::from_secs(1),
        "connect() took {took:?} while a user held \"schema\""
    );
    drop(fresh);
    ensure!(holder.release(&lease).await?, "release answered false");
    Ok(())
}

/// A lock taken on a session that sat lock-free (its last lock's timeout still set, the
/// heartbeat asleep until it turns that off) is still watched from the start: terminating
/// its session fires `lost()` within about a heartbeat interval, not at the next renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_after_an_idle_spell_is_watched_by_the_heartbeat() -> Result<()> {
    let server = server().await?;
    let app = unique("idle-spell");
    let holder = Locker::from_arc(backend_at(&server.url(), config_named(&app)).await?);
    let key = unique("idle-spell");
    let ttl = Duration::from_secs(30);
    // A lock and its release leave the session lock-free with a 30 s timeout: the heartbeat
    // then plans to wake only to turn that off, 15 s later.
    holder
        .lock(&key)
        .ttl(ttl)
        .acquire()
        .await?
        .release()
        .await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let guard = holder.lock(&key).ttl(ttl).acquire().await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let terminated_at = terminate_holder_sessions(server, &app).await?;
    timeout(Duration::from_secs(2), guard.lost())
        .await
        .context("lost() did not fire within 2 s of the termination (renewal is 10 s away)")?;
    println!(
        "lost() {:?} after the terminate call",
        terminated_at.elapsed()
    );
    Ok(())
}

/// Terminates the holder sessions of the backend named `app` (`pg_terminate_backend`, from a
/// blocking thread: the harness runs `psql`); returns when it asked, after checking that
/// there was at least one.
async fn terminate_holder_sessions(server: &'static PostgresServer, app: &str) -> Result<Instant> {
    let terminated_at = Instant::now();
    let terminated = tokio::task::spawn_blocking({
        let app = format!("{app}-holder");
        move || server.terminate_sessions(&app)
    })
    .await??;
    ensure!(terminated >= 1, "no holder session was terminated");
    Ok(terminated_at)
}
