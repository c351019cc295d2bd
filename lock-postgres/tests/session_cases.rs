//! Holder-session edge cases: a busy session, a release statement that fails, an operation
//! abandoned outside a runtime, TTL bounds.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::{advisory_held, server};
use lock_core::{LockBackend, LockError, LockKey};
use lock_harness::TcpProxy;
use lock_harness::postgres::PostgresServer;
use lock_postgres::{PostgresBackend, PostgresConfig, advisory_key};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

fn unique(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

/// One holder session for everything, so every operation queues on the same mutex.
fn one_session() -> PostgresConfig {
    PostgresConfig {
        max_sessions: 1,
        sessions_per_ttl: 1,
        ..PostgresConfig::default()
    }
}

async fn backend_at(url: &str, config: PostgresConfig) -> Result<Arc<PostgresBackend>> {
    let options = PgConnectOptions::from_str(url)?;
    Ok(Arc::new(
        PostgresBackend::with_options(options, config).await?,
    ))
}

/// Operations queued behind slow statements on one session: waiting for the session is not
/// charged to the statement, and a wait that runs out is a retryable error that leaves the
/// session (and every lock on it) alone. Before, one deadline covered wait + statement, so
/// the third queued op timed out mid-statement and dropped the session with all its locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_ops_on_a_slow_session_do_not_drop_its_locks() -> Result<()> {
    let server = server().await?;
    let proxy = TcpProxy::start(server.addr())?;
    // The link below answers in ~600 ms: above the default probe timeout (250 ms), which
    // would rightly count the session as gone; a slow link needs a larger one.
    let config = PostgresConfig {
        op_timeout: Duration::from_millis(1500),
        probe_timeout: Duration::from_millis(1500),
        ..one_session()
    };
    let backend = backend_at(&PostgresServer::url_for(proxy.addr()), config).await?;
    let ttl = Duration::from_secs(30);
    let kept = LockKey::new(unique("kept"))?;
    let lease = backend
        .try_acquire(&kept, ttl)
        .await?
        .into_lease()
        .context("kept key not free")?;
    let pids = backend.holder_pids().await;
    // Each statement now takes ~600 ms: three queued ops wait up to 1.2 s (plus a heartbeat).
    proxy.set_delay(Duration::from_millis(300));
    let started = Instant::now();
    let ops: Vec<_> = (0..3)
        .map(|i| {
            let backend = backend.clone();
            let key = LockKey::new(unique(&format!("queued-{i}")));
            tokio::spawn(async move {
                backend
                    .try_acquire(&key?, ttl)
                    .await
                    .map_err(anyhow::Error::from)
            })
        })
        .collect();
    let mut acquired = Vec::new();
    for op in ops {
        match op.await? {
            Ok(attempt) => acquired.push(attempt.into_lease().context("a fresh key was held")?),
            Err(error) => {
                let retryable = error
                    .downcast_ref::<LockError>()
                    .is_some_and(LockError::is_retryable);
                ensure!(retryable, "a queued op failed for good: {error:#}");
            }
        }
    }
    let took = started.elapsed();
    proxy.set_delay(Duration::ZERO);
    let signal = lease.lost_signal().context("no lost signal on the lease")?;
    ensure!(
        !signal.is_cancelled(),
        "the session was dropped (its locks lost) after {took:?} of queueing"
    );
    ensure!(
        acquired.len() >= 2,
        "only {} of 3 queued ops got through",
        acquired.len()
    );
    ensure!(
        backend.holder_pids().await == pids,
        "the holder session was replaced"
    );
    let renewed = backend.renew(&lease, ttl).await?;
    for held in acquired {
        ensure!(backend.release(&held).await?, "release answered false");
    }
    ensure!(backend.release(&renewed).await?, "release answered false");
    Ok(())
}

/// A release statement that fails before its unlock ran (here: the role may not call
/// `pg_notify`, checked when the statement starts) must not leave the lock held on the
/// server with nothing in the backend's books: a plain unlock follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_release_statement_leaves_no_orphan_lock() -> Result<()> {
    // Own server: the REVOKE below would change what other tests' roles may do.
    let server = tokio::task::spawn_blocking(PostgresServer::start).await??;
    server.sql(
        "CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app; \
         REVOKE EXECUTE ON FUNCTION pg_notify(text, text) FROM PUBLIC",
    )?;
    let url = format!(
        "postgres://app@127.0.0.1:{}/postgres?sslmode=disable",
        server.port()
    );
    let backend = backend_at(&url, PostgresConfig::default()).await?;
    let inspector = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(PgConnectOptions::from_str(&server.url())?)
        .await?;
    let key = LockKey::new(unique("orphan"))?;
    let hash = advisory_key("distlock", key.as_str());
    let lease = backend
        .try_acquire(&key, Duration::from_secs(30))
        .await?
        .into_lease()
        .context("key not free")?;
    ensure!(
        advisory_held(&inspector, hash).await?,
        "not held after acquire"
    );
    let released = backend.release(&lease).await;
    ensure!(
        !advisory_held(&inspector, hash).await?,
        "the lock stayed held on the server after the release ({released:?})"
    );
    ensure!(
        matches!(released, Ok(true)),
        "release answered {released:?}"
    );
    // And the key is usable again.
    let again = backend
        .try_acquire(&key, Duration::from_secs(30))
        .await?
        .into_lease()
        .context("key not free after the release")?;
    drop(again);
    Ok(())
}

/// An acquire polled once and then dropped where no runtime runs (its statement in flight)
/// must not leave the key answered `Held` forever, nor an orphan lock on the session.
#[test]
fn acquire_dropped_outside_a_runtime_leaves_the_key_usable() -> Result<()> {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (backend, proxy) = main.block_on(proxied_backend())?;
    let key = LockKey::new(unique("abandoned"))?;
    abandon_an_acquire(&backend, &proxy, &key)?;
    main.block_on(key_becomes_usable(&backend, &key))
}

/// Polls an acquire of `key` once on a runtime of its own, its statement slowed by the proxy
/// so that it is surely in flight, then drops it where no runtime runs (the backend cannot
/// finish the operation).
fn abandon_an_acquire(backend: &PostgresBackend, proxy: &TcpProxy, key: &LockKey) -> Result<()> {
    proxy.set_delay(Duration::from_millis(50));
    let side = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (pending, early) = side.block_on(async {
        let mut acquire = backend.try_acquire(key, Duration::from_secs(5));
        let early = futures_poll_once(acquire.as_mut()).await;
        (acquire, early)
    });
    if let Some(result) = early {
        bail!("the acquire finished on its first poll ({result:?}); cannot test abandonment");
    }
    drop(pending);
    drop(side);
    proxy.set_delay(Duration::ZERO);
    Ok(())
}

/// The same with the acquire running on a task of a runtime that shuts down while its
/// statement is in flight: the runtime drops the task in its own context, so the cancel-safe
/// wrapper found a runtime, spawned the rest of the work on it, and the closing runtime
/// dropped that unrun, without settling the `Pending` entry: the key answered `Held` for good.
#[test]
fn acquire_dropped_by_a_closing_runtime_leaves_the_key_usable() -> Result<()> {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (backend, proxy) = main.block_on(proxied_backend())?;
    proxy.set_delay(Duration::from_millis(50));
    let key = LockKey::new(unique("closing"))?;
    let side = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    side.block_on(async {
        let (backend, key) = (backend.clone(), key.clone());
        tokio::spawn(async move { backend.try_acquire(&key, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
    });
    // Shuts down with the acquire's statement in flight.
    drop(side);
    proxy.set_delay(Duration::ZERO);
    main.block_on(key_becomes_usable(&backend, &key))
}

/// Finding (review, 2026-12-03): the reaper unlocked a lease that ran out unrenewed on a plain
/// task of its own runtime. That runtime shutting down with the unlock's answer on its way
/// dropped the task and left the key's book entry `Pending` for good: the key answered `Held`
/// in this process without asking the server.
#[test]
fn a_reaper_unlock_dropped_with_its_runtime_leaves_the_key_usable() -> Result<()> {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The backend connects here, so its reaper runs here, driven by the runtime's own worker.
    let side = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // Slow answers must not make the heartbeat drop the session first (its locks would go
    // with it, and the reaper would find nothing to unlock).
    let config = PostgresConfig {
        probe_timeout: Duration::from_secs(10),
        ..one_session()
    };
    let (backend, proxy) = side.block_on(proxied_backend_with(config))?;
    let key = LockKey::new(unique("reaped"))?;
    let lease = side
        .block_on(backend.try_acquire(&key, lock_postgres::MIN_TTL))?
        .into_lease()
        .context("key not free")?;
    // Never renewed: the reaper unlocks it at its deadline, and the answer takes 2 s.
    proxy.set_delays(Duration::ZERO, Duration::from_secs(2));
    let deadline = lease.sent_at() + lease.ttl();
    std::thread::sleep(
        (deadline + Duration::from_millis(300)).saturating_duration_since(Instant::now()),
    );
    // Shuts down with the reaper's unlock in flight.
    drop(side);
    proxy.set_delay(Duration::ZERO);
    main.block_on(key_becomes_usable(&backend, &key))
}

/// Finding (review, 2026-12-03): an acquire abandoned mid-statement outside a runtime marks
/// its (busy) session tainted, and the session's next user drops the connection. The
/// heartbeat's probe took the session without looking at the mark: it read past the
/// abandoned statement's answer (a grant nobody recorded) and kept the session alive, so the
/// key stayed locked on the server until the session's next ordinary use (here the lease of
/// another key running out, 10 s later).
#[test]
fn a_heartbeat_probe_drops_a_tainted_session() -> Result<()> {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (backend, proxy) = main.block_on(proxied_backend())?;
    // A lock on the session keeps the heartbeat probing it (every 250 ms).
    let kept = LockKey::new(unique("kept"))?;
    main.block_on(backend.try_acquire(&kept, Duration::from_secs(10)))?
        .into_lease()
        .context("kept key not free")?;
    // The same statement as the abandoned acquire's, so that statement is prepared already
    // and its one poll sends the statement itself (not only its preparation).
    let same_shape = LockKey::new(unique("same-shape"))?;
    let lease = main
        .block_on(backend.try_acquire(&same_shape, Duration::from_secs(5)))?
        .into_lease()
        .context("key not free")?;
    main.block_on(backend.release(&lease))?;
    let key = LockKey::new(unique("tainted"))?;
    abandon_an_acquire(&backend, &proxy, &key)?;
    // The abandoned statement reaches the server first (another client trying meanwhile
    // would take the key before it, and nothing would be left to find).
    std::thread::sleep(Duration::from_millis(200));
    // Nothing else uses `backend`: only its heartbeat touches the session. Another client
    // must get the key once the abandoned statement's session is gone.
    main.block_on(async {
        let other = backend_at(&server().await?.url(), PostgresConfig::default()).await?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(lease) = other
                .try_acquire(&key, Duration::from_secs(5))
                .await?
                .into_lease()
            {
                other.release(&lease).await?;
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the abandoned acquire's grant stayed on a session the heartbeat kept alive");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// A one-session backend through a proxy (so a statement is surely still in flight after
/// one poll), its holder session connected on the calling runtime.
async fn proxied_backend() -> Result<(Arc<PostgresBackend>, TcpProxy)> {
    proxied_backend_with(one_session()).await
}

/// [`proxied_backend`] with `config`.
async fn proxied_backend_with(config: PostgresConfig) -> Result<(Arc<PostgresBackend>, TcpProxy)> {
    let server = server().await?;
    let proxy = TcpProxy::start(server.addr())?;
    let backend = backend_at(&PostgresServer::url_for(proxy.addr()), config).await?;
    let warm = LockKey::new(unique("warm"))?;
    let lease = backend
        .try_acquire(&warm, Duration::from_secs(5))
        .await?
        .into_lease()
        .context("warm-up key not free")?;
    backend.release(&lease).await?;
    Ok((backend, proxy))
}

/// Within 3 s the key can be taken and released, and no orphan lock stays on the server.
async fn key_becomes_usable(backend: &PostgresBackend, key: &LockKey) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match backend.try_acquire(key, Duration::from_secs(5)).await {
            Ok(attempt) => {
                if let Some(lease) = attempt.into_lease() {
                    ensure!(backend.release(&lease).await?, "release answered false");
                    let inspector = PgPoolOptions::new()
                        .max_connections(1)
                        .connect_with(PgConnectOptions::from_str(&server().await?.url())?)
                        .await?;
                    let hash = advisory_key("distlock", key.as_str());
                    ensure!(
                        !advisory_held(&inspector, hash).await?,
                        "an orphan lock stayed on the server"
                    );
                    return Ok(());
                }
            }
            Err(error) => tracing::debug!(%error, "retrying"),
        }
        if Instant::now() >= deadline {
            bail!("the key stayed held after the abandoned acquire");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls a future once; `Some` if it finished.
async fn futures_poll_once<F: std::future::Future + Unpin>(future: F) -> Option<F::Output> {
    let mut future = future;
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// TTLs beyond what `idle_session_timeout` can hold (2^31 − 1 ms ≈ 24.8 days) are refused as
/// `InvalidTtl` on acquire and renew, instead of failing on the server as a retryable error;
/// 24 days still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_above_idle_session_timeout_range_is_invalid() -> Result<()> {
    let server = server().await?;
    let backend = backend_at(&server.url(), PostgresConfig::default()).await?;
    let key = LockKey::new(unique("long-ttl"))?;
    let day = Duration::from_secs(24 * 3600);
    match backend.try_acquire(&key, 30 * day).await {
        Err(LockError::InvalidTtl { .. }) => {}
        other => bail!("30-day TTL: expected InvalidTtl, got {other:?}"),
    }
    let lease = backend
        .try_acquire(&key, 24 * day)
        .await?
        .into_lease()
        .context("24-day TTL not granted")?;
    match backend.renew(&lease, 30 * day).await {
        Err(LockError::InvalidTtl { .. }) => {}
        other => bail!("renew to 30 days: expected InvalidTtl, got {other:?}"),
    }
    let lease = backend.renew(&lease, 24 * day).await?;
    ensure!(backend.release(&lease).await?, "release answered false");
    // The documented ceiling itself works (before, the timeout set with it, the TTL plus
    // its padding, overflowed the setting: a retryable error on every attempt), and a
    // millisecond more is refused.
    let lease = backend
        .try_acquire(&key, lock_postgres::MAX_TTL)
        .await?
        .into_lease()
        .context("a TTL of MAX_TTL not granted")?;
    let lease = backend.renew(&lease, lock_postgres::MAX_TTL).await?;
    ensure!(backend.release(&lease).await?, "release answered false");
    match backend
        .try_acquire(&key, lock_postgres::MAX_TTL + Duration::from_millis(1))
        .await
    {
        Err(LockError::InvalidTtl { .. }) => {}
        other => bail!("MAX_TTL + 1 ms: expected InvalidTtl, got {other:?}"),
    }
    Ok(())
}

/// The fence sequence is found by its schema-qualified name, whatever a role's
/// `search_path`, and a role without CREATE on its schema can use one a DBA created. Before,
/// an unqualified name made a role with its own `search_path` create (and draw from) its own
/// sequence, so fences of one key went back; and `CREATE SEQUENCE IF NOT EXISTS` refused a
/// role without CREATE privilege even though the sequence existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_sequence_is_shared_by_roles_and_needs_no_create() -> Result<()> {
    let server = tokio::task::spawn_blocking(PostgresServer::start).await??;
    let url_as = |role: &str| {
        format!(
            "postgres://{role}@127.0.0.1:{}/postgres?sslmode=disable",
            server.port()
        )
    };
    // The DBA's backend creates public.distlock_fence_seq; draw a few fences on key k.
    let dba = backend_at(&server.url(), PostgresConfig::default()).await?;
    let key = LockKey::new("k")?;
    let mut last = None;
    for _ in 0..5 {
        let lease = dba
            .try_acquire(&key, Duration::from_secs(5))
            .await?
            .into_lease()
            .context("k not free")?;
        last = lease.fence();
        dba.release(&lease).await?;
    }
    server.sql(
        "CREATE ROLE plain LOGIN; \
         CREATE ROLE own LOGIN; CREATE SCHEMA own AUTHORIZATION own; \
         ALTER ROLE own SET search_path = own; \
         GRANT USAGE ON SEQUENCE public.distlock_fence_seq TO plain, own",
    )?;
    // No CREATE on public (PostgreSQL 15+ default): connecting works all the same.
    let plain = backend_at(&url_as("plain"), PostgresConfig::default())
        .await
        .context("a role without CREATE could not connect")?;
    // Its own search_path, where it could create a sequence of its own.
    let own = backend_at(&url_as("own"), PostgresConfig::default()).await?;
    for backend in [&plain, &own] {
        let lease = backend
            .try_acquire(&key, Duration::from_secs(5))
            .await?
            .into_lease()
            .context("k not free")?;
        ensure!(
            lease.fence() > last,
            "fence went back: {:?} after {last:?}",
            lease.fence()
        );
        last = lease.fence();
        backend.release(&lease).await?;
    }
    let own_seq =
        server.sql("SELECT count(*) FROM pg_class WHERE relname = 'distlock_fence_seq'")?;
    ensure!(own_seq == "1", "{own_seq} fence sequences exist");
    // An unqualified name is refused: it would depend on each role's search_path.
    let unqualified = PostgresConfig {
        fence_sequence: "distlock_fence_seq".into(),
        ..PostgresConfig::default()
    };
    match backend_at(&server.url(), unqualified).await {
        Err(error) => ensure!(
            matches!(
                error.downcast_ref::<LockError>(),
                Some(LockError::InvalidConfig(_))
            ),
            "unqualified name: {error:#}"
        ),
        Ok(_) => bail!("an unqualified fence_sequence was accepted"),
    }
    Ok(())
}

/// `subscribe` runs under the caller's wait, so it must stay short: against a black-holed
/// server (the listener cannot connect; connect timeout 5 s) each call returns within its
/// budget, the first and the ones queued behind the same connect attempt alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_is_bounded_against_a_blackholed_server() -> Result<()> {
    let server = server().await?;
    let proxy = TcpProxy::start(server.addr())?;
    let config = PostgresConfig {
        op_timeout: Duration::from_millis(300),
        ..PostgresConfig::default()
    };
    let backend = backend_at(&PostgresServer::url_for(proxy.addr()), config).await?;
    let key = LockKey::new(unique("blackholed-sub"))?;
    // Connect the holder session now: the acquire below is then bounded by op_timeout
    // (300 ms), and what remains to test is subscribe (connect_timeout is the default 5 s).
    let warm = backend
        .try_acquire(&key, Duration::from_secs(5))
        .await?
        .into_lease()
        .context("key not free")?;
    backend.release(&warm).await?;
    proxy.blackhole();
    let started = Instant::now();
    let releases = backend.subscribe(&key).await?;
    let took = started.elapsed();
    ensure!(
        took <= lock_postgres::SUBSCRIBE_BUDGET + Duration::from_millis(150),
        "subscribe took {took:?}"
    );
    drop(releases);
    // A second subscriber, while the listener is still trying to connect, is bounded too.
    let started = Instant::now();
    drop(backend.subscribe(&key).await?);
    let took = started.elapsed();
    ensure!(
        took <= lock_postgres::SUBSCRIBE_BUDGET + Duration::from_millis(150),
        "the second subscribe took {took:?}"
    );
    proxy.heal();
    Ok(())
}

/// A second subscriber of a key whose first mark is still in flight waits for it: a release
/// right after its `subscribe` returned must send the NOTIFY that wakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_subscriber_waits_for_the_inflight_mark() -> Result<()> {
    let server = server().await?;
    let proxy = TcpProxy::start(server.addr())?;
    let waiter = backend_at(
        &PostgresServer::url_for(proxy.addr()),
        PostgresConfig::default(),
    )
    .await?;
    let holder = backend_at(&server.url(), PostgresConfig::default()).await?;
    // Bring the listener and waiter connection up first.
    let warm = waiter.subscribe(&LockKey::new(unique("warm"))?).await?;
    drop(warm);
    let key = LockKey::new(unique("second-sub"))?;
    let lease = holder
        .try_acquire(&key, Duration::from_secs(10))
        .await?
        .into_lease()
        .context("key not free")?;
    // A mark now takes ~160 ms: the first subscriber is still waiting for it when the second
    // subscribes.
    proxy.set_delay(Duration::from_millis(80));
    let first = tokio::spawn({
        let waiter = waiter.clone();
        let key = key.clone();
        async move { waiter.subscribe(&key).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut second = waiter.subscribe(&key).await?;
    ensure!(holder.release(&lease).await?, "release answered false");
    let wake = second
        .next(Instant::now() + Duration::from_millis(800))
        .await;
    ensure!(
        wake == lock_core::Wake::Released,
        "the second subscriber heard no release within 800 ms"
    );
    drop(first.await??);
    proxy.set_delay(Duration::ZERO);
    Ok(())
}

/// Backends connecting at once to a server without the fence sequence: one creates it, the
/// others find it (a racing CREATE that reports "already exists" is not an error).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_connects_create_the_fence_sequence_once() -> Result<()> {
    let server = tokio::task::spawn_blocking(PostgresServer::start).await??;
    for round in 0..3 {
        let connects: Vec<_> = (0..8)
            .map(|_| {
                let url = server.url();
                tokio::spawn(async move { backend_at(&url, PostgresConfig::default()).await })
            })
            .collect();
        for connect in connects {
            connect
                .await?
                .with_context(|| format!("round {round}: a connect failed"))?;
        }
        server.sql("DROP SEQUENCE public.distlock_fence_seq")?;
    }
    Ok(())
}

/// The idle_session_timeout a session kept from its last lock: the heartbeat turns it off
/// before the server would end the idle session, so the session (same server pid) outlives
/// twice the TTL without a lock and serves the next acquire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_free_session_survives_its_last_locks_timeout() -> Result<()> {
    let server = server().await?;
    let backend = backend_at(&server.url(), one_session()).await?;
    // The heartbeat turns the timeout off at half of it (750 ms of margin against a
    // loaded machine); the server would end the session at 1.5 s.
    let ttl = Duration::from_millis(1500);
    let key = LockKey::new(unique("lazy"))?;
    let lease = acquire_free(&backend, &key, ttl).await?;
    ensure!(backend.release(&lease).await?, "release refused");
    let pids = backend.holder_pids().await;
    ensure!(pids.len() == 1, "expected one holder session, got {pids:?}");
    tokio::time::sleep(ttl * 3).await;
    let alive: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
        .bind(pids[0])
        .fetch_one(&inspector(server).await?)
        .await?;
    ensure!(
        alive == 1,
        "the lock-free session {} was ended by its idle_session_timeout",
        pids[0]
    );
    let lease = acquire_free(&backend, &key, ttl).await?;
    ensure!(
        backend.holder_pids().await == pids,
        "the session was replaced"
    );
    ensure!(backend.release(&lease).await?, "release refused");
    Ok(())
}

/// A lock-free session the server ended (here: terminated from outside) costs the next
/// acquire a reconnect, not an error: nothing was held on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_on_a_lock_free_session_the_server_ended_reconnects() -> Result<()> {
    let server = server().await?;
    let backend = backend_at(&server.url(), one_session()).await?;
    let ttl = Duration::from_secs(30);
    let key = LockKey::new(unique("ended"))?;
    let lease = acquire_free(&backend, &key, ttl).await?;
    ensure!(backend.release(&lease).await?, "release refused");
    let pids = backend.holder_pids().await;
    let inspector = inspector(server).await?;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pids[0])
        .fetch_one(&inspector)
        .await?;
    ensure!(terminated, "could not terminate {}", pids[0]);
    // Wait until the server has ended it (the signal is handled asynchronously).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
            .bind(pids[0])
            .fetch_one(&inspector)
            .await?;
        if alive == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "session {} still alive after 5 s",
            pids[0]
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lease = backend
        .try_acquire(&key, ttl)
        .await
        .context("acquire after the session ended")?
        .into_lease()
        .context("free key not acquired")?;
    let now = backend.holder_pids().await;
    ensure!(now != pids, "still on the terminated session {pids:?}");
    let hash = advisory_key(&backend.config().namespace, key.as_str());
    ensure!(
        advisory_held(&inspector, hash).await?,
        "the lock is not held on the server"
    );
    ensure!(backend.release(&lease).await?, "release refused");
    Ok(())
}

/// A connection of the test's own, to look at the server independently of the backend.
async fn inspector(server: &PostgresServer) -> Result<sqlx::PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .connect(&server.url())
        .await?)
}

/// `try_acquire` of a key that must be free.
async fn acquire_free(
    backend: &PostgresBackend,
    key: &LockKey,
    ttl: Duration,
) -> Result<lock_core::Lease> {
    backend
        .try_acquire(key, ttl)
        .await?
        .into_lease()
        .with_context(|| format!("{key} was not free"))
}
