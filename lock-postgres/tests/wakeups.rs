//! Release wake-ups after the waiter or listener connection is lost (`pg_terminate_backend`,
//! a server restart, a role's `idle_session_timeout`): the next hand-off must still arrive by
//! notification, not by the client's backoff, also for a key that had waiters all along.

mod common;

use anyhow::{Context, Result, ensure};
use common::{backend_at, named, server, unique};
use lock_core::{LockBackend, LockKey, Wake};
use lock_harness::postgres::PostgresServer;
use lock_postgres::{PostgresBackend, PostgresConfig};
use std::time::Duration;
use tokio::time::Instant;

/// A release heard by notification arrives within a few ms; the client's backoff step is
/// 10 ms at first and 1 s at its cap. Far above the first, far below the second.
const NOTIFIED_WITHIN: Duration = Duration::from_millis(400);

/// One hand-off: `holder` takes `key`, `waiter` subscribes, `holder` releases; the waiter's
/// subscription must be woken by the release's notification within [`NOTIFIED_WITHIN`].
async fn hand_off_is_notified(
    holder: &PostgresBackend,
    waiter: &PostgresBackend,
    key: &LockKey,
) -> Result<Duration> {
    let lease = holder
        .try_acquire(key, Duration::from_secs(10))
        .await?
        .into_lease()
        .context("the key was not free")?;
    let mut releases = waiter.subscribe(key).await?;
    let released = Instant::now();
    ensure!(holder.release(&lease).await?, "release answered false");
    let wake = releases.next(released + NOTIFIED_WITHIN).await;
    ensure!(
        wake == Wake::Released,
        "no release notification within {NOTIFIED_WITHIN:?}: the waiter's mark or listener \
         is gone, so it would fall back to polling"
    );
    Ok(released.elapsed())
}

/// Terminates the sessions `<app>-<role>`; returns how many.
async fn terminate(server: &'static PostgresServer, app: &str, role: &str) -> Result<usize> {
    let name = format!("{app}-{role}");
    tokio::task::spawn_blocking(move || server.terminate_sessions(&name)).await?
}

/// The waiter connection (and, every other round, the listener) is terminated under a key
/// that has a waiter all along (a hot key). Each following hand-off must still be notified:
/// the backend must notice the dead connection and mark the key again on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wakeups_survive_terminated_waiter_and_listener_sessions() -> Result<()> {
    let server = server().await?;
    let app = unique("wake");
    let waiter = backend_at(&server.url(), named(&app)).await?;
    let holder = backend_at(&server.url(), PostgresConfig::default()).await?;
    let key = LockKey::new(unique("hot"))?;
    // A subscription that lives through every round: the key stays marked in the backend's
    // books the whole time.
    let _hot = waiter.subscribe(&key).await?;
    hand_off_is_notified(&holder, &waiter, &key).await?;
    for round in 0..4 {
        ensure!(
            terminate(server, &app, "waiter").await? == 1,
            "round {round}: no waiter session to terminate"
        );
        if round % 2 == 1 {
            ensure!(
                terminate(server, &app, "listener").await? == 1,
                "round {round}: no listener session to terminate"
            );
        }
        // Let the server finish ending them (and the listener reconnect, waking everyone
        // once, which must not count as this round's notification).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let took = hand_off_is_notified(&holder, &waiter, &key)
            .await
            .with_context(|| format!("round {round}"))?;
        println!("round {round}: notified {took:?} after the release");
    }
    Ok(())
}

/// A role whose `idle_session_timeout` is short: the server would end the waiter and listener
/// sessions while they wait idle. Hand-offs after a longer wait must still be notified.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wakeups_survive_a_roles_idle_session_timeout() -> Result<()> {
    let server = server().await?;
    let role = unique("idler").replace('-', "_");
    let setup = format!(
        "CREATE ROLE {role} LOGIN; ALTER ROLE {role} SET idle_session_timeout = '1s'; \
         GRANT USAGE ON SEQUENCE {} TO {role}",
        lock_postgres::FENCE_SEQUENCE
    );
    // The fence sequence exists once any backend connected.
    let holder = backend_at(&server.url(), PostgresConfig::default()).await?;
    tokio::task::spawn_blocking(move || server.sql(&setup)).await??;
    let url = server.url().replace("postgres@", &format!("{role}@"));
    let waiter = backend_at(&url, PostgresConfig::default()).await?;
    let key = LockKey::new(unique("idle"))?;
    let _hot = waiter.subscribe(&key).await?;
    for round in 0..2 {
        // Longer than the role's timeout, with nothing to do.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let took = hand_off_is_notified(&holder, &waiter, &key)
            .await
            .with_context(|| format!("round {round}"))?;
        println!("round {round}: notified {took:?} after the release");
    }
    Ok(())
}
