//! A process that stops talking (frozen by SIGSTOP or a GC pause, or cut off by a silent
//! partition: the server cannot tell these apart): its waiter and listener sessions must
//! not outlive it for hours, and its locks must be free within `expiry_slack` of their
//! deadline.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::{backend_at, named, server, unique};
use lock_core::{LockBackend, LockKey, Locker};
use lock_harness::TcpProxy;
use lock_harness::postgres::PostgresServer;
use lock_postgres::{IDLE_CONNECTION_TIMEOUT, PostgresBackend, PostgresConfig};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::time::Duration;
use tokio::time::Instant;

async fn inspector(server: &PostgresServer) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .connect(&server.url())
        .await?)
}

/// Sessions of `app` (`<app>-waiter`, `<app>-listener`, …) the server still has.
async fn sessions_of(inspector: &PgPool, app: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE $1 || '-%' \
         ORDER BY 1",
    )
    .bind(app)
    .fetch_all(inspector)
    .await?)
}

/// Whether some session holds the waiter mark (a shared lock on the pair) of `key`.
async fn marked(inspector: &PgPool, backend: &PostgresBackend, key: &LockKey) -> Result<bool> {
    Ok(common::waiter_marks(inspector, backend.advisory_key(key)).await? > 0)
}

/// A waiting process is cut off (black hole: as far as the server knows, it is frozen): its
/// waiter session, with the marks that make every release of those keys pay for a NOTIFY,
/// and its listener session must be ended by the server within their idle timeout, not
/// after the TCP keepalive's two hours. Healed, the backend marks and listens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_off_waiters_sessions_are_ended_by_the_server() -> Result<()> {
    let server = server().await?;
    let inspector = inspector(server).await?;
    let proxy = TcpProxy::start(server.addr())?;
    let app = unique("cutoff");
    let waiter = backend_at(&PostgresServer::url_for(proxy.addr()), named(&app)).await?;
    let holder = backend_at(&server.url(), PostgresConfig::default()).await?;
    let key = LockKey::new(unique("cutoff"))?;
    let subscription = waiter.subscribe(&key).await?;
    ensure!(
        marked(&inspector, &waiter, &key).await?,
        "the waiter mark is not on the server"
    );
    let sessions = sessions_of(&inspector, &app).await?;
    ensure!(
        sessions.iter().any(|name| name.ends_with("-waiter"))
            && sessions.iter().any(|name| name.ends_with("-listener")),
        "waiter and listener sessions not both up: {sessions:?}"
    );
    proxy.blackhole();
    let cut_at = Instant::now();
    let limit = IDLE_CONNECTION_TIMEOUT + Duration::from_secs(2);
    loop {
        let sessions = sessions_of(&inspector, &app).await?;
        let still_marked = marked(&inspector, &waiter, &key).await?;
        if sessions.is_empty() && !still_marked {
            break;
        }
        if cut_at.elapsed() > limit {
            bail!(
                "{:?} after the cut the server still has {sessions:?} (mark held: \
                 {still_marked}); idle timeout {IDLE_CONNECTION_TIMEOUT:?}",
                cut_at.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "cut-off waiter's sessions ended {:?} after the cut",
        cut_at.elapsed()
    );
    // Healed: the same subscription's key is marked again and hears the next release.
    proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !marked(&inspector, &waiter, &key).await? {
        ensure!(
            Instant::now() < deadline,
            "the key was not marked again within 15 s of healing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = holder
        .try_acquire(&key, Duration::from_secs(5))
        .await?
        .into_lease()
        .context("key not free")?;
    let mut fresh = waiter.subscribe(&key).await?;
    let released = Instant::now();
    ensure!(holder.release(&lease).await?, "release answered false");
    ensure!(
        fresh.next(released + Duration::from_millis(500)).await == lock_core::Wake::Released,
        "no notification after healing"
    );
    drop(subscription);
    Ok(())
}

/// The waiter and listener sessions set short server-side TCP keepalives (a dead peer host is
/// found in seconds, not the system's two hours): read from the server's own socket of each
/// session (`ss` shows the keepalive timer of an idle connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_and_listener_sessions_use_short_keepalives() -> Result<()> {
    let server = server().await?;
    let inspector = inspector(server).await?;
    let app = unique("keepalive");
    let waiter = backend_at(&server.url(), named(&app)).await?;
    let key = LockKey::new(unique("keepalive"))?;
    let _subscription = waiter.subscribe(&key).await?;
    for role in ["waiter", "listener"] {
        let port: i32 = sqlx::query_scalar(
            "SELECT client_port FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(format!("{app}-{role}"))
        .fetch_one(&inspector)
        .await
        .with_context(|| format!("no {role} session"))?;
        let filter = format!("( sport = :{} and dport = :{port} )", server.port());
        // The keepalive timer shows while the socket is idle (not right after a ping).
        let mut seen = String::new();
        let mut timer = None;
        for _ in 0..40 {
            let output = std::process::Command::new("ss")
                .args(["-tnoH", "state", "established", &filter])
                .output()?;
            seen = String::from_utf8_lossy(&output.stdout).into_owned();
            timer = seen
                .split("timer:(keepalive,")
                .nth(1)
                .and_then(|rest| rest.split(',').next())
                .map(str::to_owned);
            if timer.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let timer = timer
            .with_context(|| format!("{role}: no keepalive timer on the server socket: {seen}"))?;
        // "4.932ms", "4.1sec", "1min12sec", "119min": minutes mean the system default.
        ensure!(
            (timer.ends_with("sec") || timer.ends_with("ms")) && !timer.contains("min"),
            "{role} session: server-side keepalive timer {timer} (the system default is 2 h)"
        );
    }
    Ok(())
}

/// A holder that stops (its connection goes silent right before its watchdog's next renewal,
/// the worst moment): its lock must be taken over within `expiry_slack` of the lease's
/// deadline, as `Capabilities` tells the suite and users.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_holders_lock_is_taken_over_within_expiry_slack() -> Result<()> {
    let server = server().await?;
    let ttl = Duration::from_secs(3);
    for round in 0..2 {
        let proxy = TcpProxy::start(server.addr())?;
        let backend = backend_at(
            &PostgresServer::url_for(proxy.addr()),
            PostgresConfig::default(),
        )
        .await?;
        let slack = backend.capabilities().expiry_slack;
        let holder = Locker::from_arc(backend);
        let other = backend_at(&server.url(), PostgresConfig::default()).await?;
        let key = LockKey::new(unique("stopped"))?;
        let guard = holder.lock(key.as_str()).ttl(ttl).acquire().await?;
        // Wait for a renewal, then stop talking just before the next one (T/3 later).
        let first = guard.valid_until();
        let renewed_by = Instant::now() + ttl;
        while guard.valid_until() == first {
            ensure!(Instant::now() < renewed_by, "the watchdog did not renew");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(ttl / 3 - Duration::from_millis(150)).await;
        proxy.blackhole();
        let deadline = guard.valid_until();
        // When the last try that found the lock held was sent: the lock was held at some
        // instant after it, so a stall between the answer and the next try (or before the
        // answer is read) never counts as the server's lateness.
        let mut held_when_asked = deadline;
        let taken_at = loop {
            let asked = Instant::now();
            if let Some(lease) = other.try_acquire(&key, ttl).await?.into_lease() {
                let at = Instant::now();
                other.release(&lease).await?;
                break at;
            }
            held_when_asked = held_when_asked.max(asked);
            ensure!(
                Instant::now() < deadline + ttl * 2,
                "not taken over within 2 TTLs after the deadline"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let taken_late = taken_at.saturating_duration_since(deadline);
        let late = held_when_asked.saturating_duration_since(deadline);
        let early = deadline.saturating_duration_since(taken_at);
        println!(
            "round {round}: taken over {taken_late:?} after the deadline (still held when asked \
             {late:?} after it; early by {early:?}), expiry_slack {slack:?}"
        );
        ensure!(
            early.is_zero(),
            "round {round}: taken over {early:?} before the holder's deadline"
        );
        ensure!(
            late <= slack,
            "round {round}: a stopped holder's lock was still held {late:?} after its \
             deadline; expiry_slack says {slack:?}"
        );
        drop(guard);
        proxy.heal();
    }
    Ok(())
}
