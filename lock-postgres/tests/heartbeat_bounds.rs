//! How soon a holder hears that its session is gone when the session went silent (host crash,
//! failover, a black-holed connection while the server frees the session): within the
//! documented bound (heartbeat interval + probe timeout), not after `op_timeout`, and one
//! silent session does not hold up another session's heartbeat.

mod common;

use anyhow::{Context, Result, ensure};
use common::{advisory_held, backend_at, server, unique};
use lock_core::{LockBackend, LockKey, Locker};
use lock_harness::TcpProxy;
use lock_harness::postgres::PostgresServer;
use lock_postgres::{PostgresBackend, PostgresConfig};
use sqlx::postgres::PgPoolOptions;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, timeout};

/// What the README promises: a holder whose session is gone hears of it within this long of
/// the session's last answer.
fn notice_bound(ttl: Duration) -> Duration {
    lock_postgres::loss_notice_bound(ttl.as_millis() as u64)
}

/// Room for a loaded 2-core machine (scheduling, psql start-up); the bug this guards against
/// is `op_timeout` (5 s).
const LOAD_MARGIN: Duration = Duration::from_millis(400);

/// Waits for a guard's lost signal in a task; answers when it fired.
fn lost_at(guard: &lock_core::LockGuard) -> tokio::task::JoinHandle<Instant> {
    let lost = guard.lost();
    tokio::spawn(async move {
        lost.await;
        Instant::now()
    })
}

/// The server frees the holder sessions of `app` (exactly one, terminated) while the holder
/// cannot hear it; once `other` gets `key`, the old holder's `lost` (see [`lost_at`]) must
/// fire within the documented bound of that grant.
async fn terminate_and_check_notice(
    server: &'static PostgresServer,
    app: &str,
    other: &PostgresBackend,
    key: &LockKey,
    ttl: Duration,
    lost: tokio::task::JoinHandle<Instant>,
    what: &str,
) -> Result<()> {
    let terminated = tokio::task::spawn_blocking({
        let app = format!("{app}-holder");
        move || server.terminate_sessions(&app)
    })
    .await??;
    ensure!(terminated == 1, "terminated {terminated} holder sessions");
    let acquired_at = loop {
        if let Some(lease) = other.try_acquire(key, ttl).await?.into_lease() {
            let at = Instant::now();
            other.release(&lease).await?;
            break at;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let lost_at = timeout(Duration::from_secs(10), lost)
        .await
        .context("lost() did not fire within 10 s")??;
    let late = lost_at.saturating_duration_since(acquired_at);
    println!(
        "{what}: lost() {late:?} after another process acquired (bound {:?})",
        notice_bound(ttl)
    );
    ensure!(
        late <= notice_bound(ttl) + LOAD_MARGIN,
        "lost() fired {late:?} after another process acquired the lock; documented bound {:?}",
        notice_bound(ttl)
    );
    Ok(())
}

/// The holder's connection goes silent (black hole: nothing passes, nothing closes) and the
/// server frees its session (`pg_terminate_backend`, as after a failover or when the server
/// saw the client die): another process can take the lock at once. The old holder's `lost()`
/// must fire within the documented bound of that grant, not when the probe's `op_timeout`
/// (5 s) runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blackholed_holder_hears_of_its_loss_within_the_bound() -> Result<()> {
    let server = server().await?;
    let proxy = TcpProxy::start(server.addr())?;
    let app = unique("silent");
    let holder = Locker::from_arc(
        backend_at(
            &PostgresServer::url_for(proxy.addr()),
            PostgresConfig {
                application_name: app.clone(),
                ..PostgresConfig::default()
            },
        )
        .await?,
    );
    let other = backend_at(&server.url(), PostgresConfig::default()).await?;
    let key = LockKey::new(unique("blackholed"))?;
    let ttl = Duration::from_secs(30);
    let guard = holder.lock(key.as_str()).ttl(ttl).acquire().await?;
    let lost = lost_at(&guard);
    proxy.blackhole();
    terminate_and_check_notice(server, &app, &other, &key, ttl, lost, "black-holed holder").await?;
    proxy.heal();
    Ok(())
}

/// Resumes a stopped server process when dropped (also when the test fails).
struct Stopped(i32);

impl Stopped {
    fn stop(pid: i32) -> Result<Self> {
        signal(pid, "-STOP")?;
        Ok(Stopped(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = signal(self.0, "-CONT");
    }
}

fn signal(pid: i32, which: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill {which} {pid} failed");
    Ok(())
}

/// Two holder sessions of one backend. One goes silent (its server process is stopped, so
/// its heartbeat probe gets no answer); meanwhile the other is terminated. The terminated
/// session's guard must hear of it within the bound: the silent session's probe must not
/// hold up the heartbeat of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_session_does_not_delay_another_sessions_heartbeat() -> Result<()> {
    let server = server().await?;
    let backend = backend_at(&server.url(), PostgresConfig::default()).await?;
    let locker = Locker::from_arc(backend.clone());
    let inspector = PgPoolOptions::new()
        .max_connections(1)
        .connect(&server.url())
        .await?;
    // Different TTLs: different holder sessions.
    let (silent_ttl, dropped_ttl) = (Duration::from_secs(20), Duration::from_secs(10));
    let silent = locker
        .lock(unique("silent"))
        .ttl(silent_ttl)
        .acquire()
        .await?;
    let dropped = locker
        .lock(unique("dropped"))
        .ttl(dropped_ttl)
        .acquire()
        .await?;
    let pid_of = |key: &LockKey| {
        let hash = backend.advisory_key(key);
        let inspector = inspector.clone();
        let key = key.clone();
        async move {
            ensure!(advisory_held(&inspector, hash).await?, "{key} not held");
            let pid: i32 = sqlx::query_scalar(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND objsubid = 1 AND ((classid::int8 << 32) | objid::int8) = $1",
            )
            .bind(hash)
            .fetch_one(&inspector)
            .await?;
            anyhow::Ok(pid)
        }
    };
    let silent_pid = pid_of(silent.key()).await?;
    let dropped_pid = pid_of(dropped.key()).await?;
    ensure!(silent_pid != dropped_pid, "both locks on one session");
    let lost = lost_at(&dropped);
    let _stopped = Stopped::stop(silent_pid)?;
    // Let the silent session's probe start (it is due a heartbeat interval after its last
    // answer) and hang.
    tokio::time::sleep(lock_postgres::HEARTBEAT_MAX * 2).await;
    let terminated_at = Instant::now();
    ensure!(
        tokio::task::spawn_blocking(move || server.terminate_backend(dropped_pid)).await??,
        "the other session was not terminated"
    );
    let lost_at = timeout(Duration::from_secs(10), lost)
        .await
        .context("lost() did not fire within 10 s")??;
    let late = lost_at.saturating_duration_since(terminated_at);
    println!(
        "terminated session next to a silent one: lost() {late:?} after the terminate call \
         (bound {:?})",
        notice_bound(dropped_ttl)
    );
    ensure!(
        late <= notice_bound(dropped_ttl) + LOAD_MARGIN,
        "lost() of the terminated session fired {late:?} after the terminate call; \
         documented bound {:?}",
        notice_bound(dropped_ttl)
    );
    drop(_stopped);
    drop((silent, dropped));
    Ok(())
}

/// As above, but the holder session is busy when its connection goes silent: a statement
/// (here another key's acquire) is in flight, so the heartbeat skips the session ("its
/// statement is the probe"). That statement's silence must count like an unanswered probe:
/// `lost()` within the bound, not when the statement's `op_timeout` (5 s) runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holder_with_a_statement_in_flight_hears_within_the_bound() -> Result<()> {
    busy_holder_hears_within_the_bound("busy", |backend, ttl| async move {
        let key = LockKey::new(unique("busy-other"))?;
        backend.try_acquire(&key, ttl).await?;
        Ok(())
    })
    .await
}

/// As above, but the statement in flight is the first semaphore call of a fresh backend: it
/// looks for the semaphore tables and creates the session's functions with statements of its
/// own, which went out without the "awaited" mark; the heartbeat skipped the busy session and
/// the guard heard only when that statement's `op_timeout` (5 s) ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holder_busy_with_its_first_semaphore_call_hears_within_the_bound() -> Result<()> {
    busy_holder_hears_within_the_bound("first-permits", |backend, ttl| async move {
        let key = LockKey::new(unique("first-permits-sem"))?;
        backend.try_acquire_permits(&key, 3, 1, ttl).await?;
        Ok(())
    })
    .await
}

/// A holder (one session, behind a proxy) whose connection goes silent while `stuck` runs a
/// statement on that session; the server then ends the session and another process takes the
/// lock: the holder's `lost()` must fire within the bound.
async fn busy_holder_hears_within_the_bound<F>(
    name: &str,
    stuck: impl FnOnce(Arc<PostgresBackend>, Duration) -> F,
) -> Result<()>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let server = server().await?;
    let proxy = TcpProxy::start(server.addr())?;
    let app = unique(name);
    let backend = backend_at(
        &PostgresServer::url_for(proxy.addr()),
        PostgresConfig {
            application_name: app.clone(),
            max_sessions: 1,
            sessions_per_ttl: 1,
            ..PostgresConfig::default()
        },
    )
    .await?;
    let holder = Locker::from_arc(backend.clone());
    let other = backend_at(&server.url(), PostgresConfig::default()).await?;
    let key = LockKey::new(unique(&format!("{name}-held")))?;
    let ttl = Duration::from_secs(30);
    let guard = holder.lock(key.as_str()).ttl(ttl).acquire().await?;
    let lost = lost_at(&guard);
    proxy.blackhole();
    // A statement on the same (only) session, stuck in the black hole.
    let stuck = tokio::spawn(stuck(backend.clone(), ttl));
    tokio::time::sleep(Duration::from_millis(50)).await;
    terminate_and_check_notice(
        server,
        &app,
        &other,
        &key,
        ttl,
        lost,
        &format!("{name}: busy black-holed holder"),
    )
    .await?;
    proxy.heal();
    let _ = timeout(Duration::from_secs(10), stuck).await;
    Ok(())
}

/// The process stalls (a GC pause, a descheduled VM; here the whole runtime is blocked)
/// for longer than the loss bound while the server and the connection stay fine. The first
/// statement after the stall is answered at once, so the lock must not be reported lost:
/// an unanswered statement counts as a failed probe only after it had a probe's time.
#[tokio::test(flavor = "current_thread")]
async fn a_stalled_process_does_not_count_its_session_silent() -> Result<()> {
    let server = server().await?;
    let backend = backend_at(
        &server.url(),
        PostgresConfig {
            max_sessions: 1,
            sessions_per_ttl: 1,
            ..PostgresConfig::default()
        },
    )
    .await?;
    let locker = Locker::from_arc(backend.clone());
    let ttl = Duration::from_secs(30);
    let guard = locker.lock(unique("stalled")).ttl(ttl).acquire().await?;
    let lost = lost_at(&guard);
    // Whether the heartbeat or the statement runs first after the stall varies: a few rounds.
    for round in 0..4 {
        // Nothing runs meanwhile: no heartbeat, no answer read.
        std::thread::sleep(notice_bound(ttl) * 3);
        let key = LockKey::new(unique("after-stall"))?;
        let attempt = backend.try_acquire(&key, ttl).await;
        let lease = attempt
            .with_context(|| format!("round {round}: the first statement after the stall failed"))?
            .into_lease()
            .context("the key was not free")?;
        backend.release(&lease).await?;
        // Give the heartbeat its turns.
        tokio::time::sleep(Duration::from_millis(300)).await;
        ensure!(
            !lost.is_finished(),
            "round {round}: lost() fired after a stall of the process, though its session answered"
        );
    }
    ensure!(
        guard.release().await?,
        "the lock was not held any more after the stall"
    );
    Ok(())
}
