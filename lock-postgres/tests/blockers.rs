//! A lock freed by the server (its holder session ended: terminated, idle timeout, closed)
//! sends no NOTIFY. A waiting backend must still hear of it within about a round trip
//! (#13), not at its next backoff step (0.6–1.35 s later before). A waiter never asks for
//! the lock's key itself (a shared lock on it would make others' tries fail), and one that
//! gives up leaves nothing queued or held on the server. And a lock held in this process
//! needs no NOTIFY for its local waiters.

mod common;

use anyhow::{Context, Result, ensure};
use common::{backend_at, named, server, unique};
use lock_core::{Backoff, LockBackend, LockKey, Locker, Releases, Wake};
use lock_harness::postgres::PostgresServer;
use lock_postgres::{BLOCKER_LOCK_TIMEOUT, PostgresBackend, PostgresConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// "About a round trip" with the margin a loaded 2-core machine needs (a round trip here is
/// 0.05–0.2 ms; the waiter's next backoff step in these tests is seconds away).
const FREED_WITHIN: Duration = Duration::from_millis(300);

/// `waiter` tries `key` (held), subscribes, tries again (held), then waits on the
/// subscription alone: no backoff step can wake it. Returns the subscription.
async fn wait_behind(waiter: &PostgresBackend, key: &LockKey) -> Result<Releases> {
    let ttl = Duration::from_secs(10);
    ensure!(
        waiter.try_acquire(key, ttl).await?.into_lease().is_none(),
        "the key was free"
    );
    let mut releases = waiter.subscribe(key).await?;
    releases.take_turns();
    ensure!(
        waiter.try_acquire(key, ttl).await?.into_lease().is_none(),
        "the key was free after subscribing"
    );
    Ok(releases)
}

/// Terminates `app`'s holder sessions (`<app>-holder`, at least one must be there) and returns
/// the instant after the call.
async fn terminate_holders(server: &'static PostgresServer, app: &str) -> Result<Instant> {
    let name = format!("{app}-holder");
    let terminated =
        tokio::task::spawn_blocking(move || server.terminate_sessions(&name)).await??;
    ensure!(terminated >= 1, "no holder session to terminate");
    Ok(Instant::now())
}

/// Waits until a blocker of the backend named `app` waits on the server for a holder's
/// session (a session `<app>-blocker` in a lock wait).
async fn blocker_waiting(server: &'static PostgresServer, app: &str) -> Result<()> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&server.url()).await?;
    let name = format!("{app}-blocker");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind(&name)
        .fetch_one(&mut conn)
        .await?;
        if waiting > 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "no blocker of {app} waited on the server within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Throws away wake-ups already delivered (a release seen earlier must not count).
async fn drain_wakes(releases: &mut Releases) {
    while releases
        .next(Instant::now() + Duration::from_millis(1))
        .await
        == Wake::Released
    {}
}

/// Waits up to 5 s after `since` for `releases` to wake; fails, naming `what`, unless a
/// release was heard within [`FREED_WITHIN`]. Returns how long it took.
async fn expect_woken(releases: &mut Releases, since: Instant, what: &str) -> Result<Duration> {
    let wake = releases.next(since + Duration::from_secs(5)).await;
    let heard = since.elapsed();
    ensure!(
        wake == Wake::Released && heard <= FREED_WITHIN,
        "{what} not woken within {FREED_WITHIN:?}: {wake:?} after {heard:?}"
    );
    Ok(heard)
}

/// The holder's session is terminated (`pg_terminate_backend`): the server frees the lock
/// silently. The waiter's subscription must wake within [`FREED_WITHIN`] of the terminate and
/// its next attempt get the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiter_gets_a_lock_freed_by_a_terminated_session_at_once() -> Result<()> {
    let server = server().await?;
    let app = unique("term-holder");
    let holder = backend_at(&server.url(), named(&app)).await?;
    let waiter_app = unique("term-waiter");
    let waiter = backend_at(&server.url(), named(&waiter_app)).await?;
    let key = LockKey::new(unique("terminated"))?;
    let _lease = holder
        .try_acquire(&key, Duration::from_secs(30))
        .await?
        .into_lease()
        .context("the key was not free")?;
    let mut releases = wait_behind(&waiter, &key).await?;
    blocker_waiting(server, &waiter_app).await?;
    let freed = terminate_holders(server, &app).await?;
    let heard = expect_woken(
        &mut releases,
        freed,
        "waiter (after the holder's session ended)",
    )
    .await?;
    println!("terminated holder: waiter woken {heard:?} after the terminate");
    let lease = waiter
        .try_acquire(&key, Duration::from_secs(10))
        .await?
        .into_lease()
        .context("woken, but the lock was still held")?;
    ensure!(waiter.release(&lease).await?, "release answered false");
    Ok(())
}

/// Two holders in a row, each ended by the server, with one waiter that keeps its
/// subscription: the blocker, idle after the first freed lock, is armed again by the second
/// holder's held answer and wakes the waiter at once the second time too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocker_serves_two_terminated_holders_in_a_row() -> Result<()> {
    let server = server().await?;
    let waiter_app = unique("twice-waiter");
    let waiter = backend_at(&server.url(), named(&waiter_app)).await?;
    let key = LockKey::new(unique("twice"))?;
    let mut releases = None;
    for round in 0..2 {
        let app = unique(&format!("twice-holder-{round}"));
        let holder = backend_at(&server.url(), named(&app)).await?;
        let _lease = holder
            .try_acquire(&key, Duration::from_secs(30))
            .await?
            .into_lease()
            .context("the key was not free")?;
        match releases.as_mut() {
            None => releases = Some(wait_behind(&waiter, &key).await?),
            // The same subscription; this held answer arms the idle blocker again.
            Some(_) => ensure!(
                waiter
                    .try_acquire(&key, Duration::from_secs(10))
                    .await?
                    .into_lease()
                    .is_none(),
                "round {round}: the key was free"
            ),
        }
        blocker_waiting(server, &waiter_app).await?;
        let subscribed = releases.as_mut().context("subscribed in round 0")?;
        // Round 1: a wake left over from our own release in round 0 must not count.
        drain_wakes(subscribed).await;
        let freed = terminate_holders(server, &app).await?;
        expect_woken(
            subscribed,
            freed,
            &format!("round {round}: waiter (after the holder's session ended)"),
        )
        .await?;
        let lease = waiter
            .try_acquire(&key, Duration::from_secs(10))
            .await?
            .into_lease()
            .context("woken, but the lock was still held")?;
        ensure!(waiter.release(&lease).await?, "release answered false");
    }
    Ok(())
}

/// The holder process goes away without releasing (its backend is dropped, so its
/// connections close and the server frees the lock, without a NOTIFY). A `Locker` waiting
/// with a long backoff (its next step is seconds away) gets the lock within
/// [`FREED_WITHIN`] of the server freeing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locker_gets_a_lock_whose_holder_went_away_at_once() -> Result<()> {
    let server = server().await?;
    let app = unique("gone-holder");
    let holder = backend_at(&server.url(), named(&app)).await?;
    let waiter: Arc<dyn LockBackend> = backend_at(&server.url(), PostgresConfig::default()).await?;
    let key = LockKey::new(unique("gone"))?;
    let _lease = holder
        .try_acquire(&key, Duration::from_secs(30))
        .await?
        .into_lease()
        .context("the key was not free")?;
    let locker = Locker::from_arc(waiter);
    let waiting = tokio::spawn({
        let key = key.clone();
        async move {
            let guard = locker
                .lock(key.as_str())
                .wait(Duration::from_secs(30))
                .backoff(Backoff::new(
                    Duration::from_secs(20),
                    Duration::from_secs(20),
                ))
                .acquire()
                .await?;
            let at = Instant::now();
            guard.release().await?;
            anyhow::Ok(at)
        }
    });
    // The waiter is past its first attempt, subscribed and waiting.
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Until the server has ended the session, the lock is held: measure from when it is
    // gone from pg_stat_activity.
    drop(holder);
    let gone = wait_sessions_gone(server, &format!("{app}-holder")).await?;
    let acquired = tokio::time::timeout(Duration::from_secs(25), waiting)
        .await
        .context("the waiter never got the lock")???;
    let late = acquired.saturating_duration_since(gone);
    println!("holder went away: lock taken {late:?} after its session was gone");
    ensure!(
        late <= FREED_WITHIN,
        "lock taken {late:?} after the holder's session was gone (bound {FREED_WITHIN:?})"
    );
    Ok(())
}

/// Polls `pg_stat_activity` until no session named `name` is left; returns when that was
/// seen (the server frees a session's locks before it leaves the list).
async fn wait_sessions_gone(
    server: &'static lock_harness::postgres::PostgresServer,
    name: &str,
) -> Result<Instant> {
    let url = server.url();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
                .bind(name)
                .fetch_one(&mut conn)
                .await?;
        if left == 0 {
            return Ok(Instant::now());
        }
        ensure!(
            Instant::now() < deadline,
            "the holder's session never ended"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A waiter that gives up leaves no blocker queued on the key for longer than the
/// blocker's lock timeout, and never a lock behind: after the waiter is gone, the holder's
/// release lets a third party's `pg_try_advisory_lock` in at once, and no session of the
/// waiting backend has a granted or waiting lock on the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_that_gives_up_leaves_nothing_on_the_server() -> Result<()> {
    let server = server().await?;
    let app = unique("quitter");
    let holder = backend_at(&server.url(), PostgresConfig::default()).await?;
    let waiter = backend_at(&server.url(), named(&app)).await?;
    let key = LockKey::new(unique("quit"))?;
    let hash = holder.advisory_key(&key);
    let lease = holder
        .try_acquire(&key, Duration::from_secs(30))
        .await?
        .into_lease()
        .context("the key was not free")?;
    let releases = wait_behind(&waiter, &key).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&server.url()).await?;
    let queued = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                  WHERE l.locktype = 'advisory' AND a.application_name LIKE $1 \
                  AND ((l.classid::int8 << 32) | l.objid::int8) = $2 AND l.objsubid = 1";
    // Even while it waits, the waiting backend asks for nothing on the lock's key: its
    // blocker waits on the holder session's alive key, so a shared lock on the key never
    // makes a third party's pg_try_advisory_lock fail at the release.
    let waiting: i64 = sqlx::query_scalar(queued)
        .bind(format!("{app}-%"))
        .bind(hash)
        .fetch_one(&mut conn)
        .await?;
    ensure!(
        waiting == 0,
        "the waiting backend has {waiting} lock request(s) on the key"
    );
    drop(releases);
    // Once the waiter gave up, its blocker leaves no request queued either (on the holder
    // session's alive key: the only thing it ever waits on).
    let blocker_queued = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                          WHERE l.locktype = 'advisory' AND NOT l.granted \
                          AND a.application_name LIKE $1";
    let by = Instant::now() + BLOCKER_LOCK_TIMEOUT + Duration::from_secs(2);
    loop {
        let left: i64 = sqlx::query_scalar(blocker_queued)
            .bind(format!("{app}-%"))
            .fetch_one(&mut conn)
            .await?;
        if left == 0 {
            break;
        }
        ensure!(
            Instant::now() < by,
            "the waiting backend still has {left} lock request(s) on the key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(holder.release(&lease).await?, "release answered false");
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(hash)
        .fetch_one(&mut conn)
        .await?;
    ensure!(
        got,
        "a third party could not take the key after the release"
    );
    Ok(())
}

/// 8 workers of one process on one key (issue #13's contended case): every waiter used to
/// mark the key, so each release paid for a NOTIFY that our own listener then echoed back
/// as a second wake-up (the rate was 0.6 of pgbench's). A lock held by this backend needs
/// no mark: its release wakes the local waiter directly. No NOTIFY may reach the channel,
/// and the waiter still gets the lock at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_with_only_local_waiters_sends_no_notify() -> Result<()> {
    let server = server().await?;
    let config = PostgresConfig {
        namespace: unique("local-only"),
        ..PostgresConfig::default()
    };
    let channel = format!(
        "distlock_{:016x}",
        lock_postgres::advisory_key("", &config.namespace).cast_unsigned()
    );
    let backend: Arc<dyn LockBackend> = backend_at(&server.url(), config).await?;
    let mut listener = sqlx::postgres::PgListener::connect(&server.url()).await?;
    listener.listen(&channel).await?;
    let locker = Locker::from_arc(backend);
    let guard = locker.acquire("hot").await?;
    let waiting = tokio::spawn({
        let locker = locker.clone();
        async move {
            let guard = locker
                .lock("hot")
                .wait(Duration::from_secs(10))
                .backoff(Backoff::new(
                    Duration::from_secs(20),
                    Duration::from_secs(20),
                ))
                .acquire()
                .await?;
            let at = Instant::now();
            guard.release().await?;
            anyhow::Ok(at)
        }
    });
    // The waiter has subscribed and waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    ensure!(guard.release().await?, "release answered false");
    let acquired = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .context("the local waiter did not get the lock")???;
    let took = acquired.saturating_duration_since(released);
    println!("local hand-off: {took:?}");
    ensure!(took <= FREED_WITHIN, "local hand-off took {took:?}");
    let note = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    ensure!(
        note.is_err(),
        "a release with only this backend's waiters sent a NOTIFY: {note:?}"
    );
    Ok(())
}

/// A lock held in this process needs no waiter mark (its release wakes the local waiters
/// here) and gets no blocker (the held answer came from our own book). So when its holder
/// session breaks on our side (here: a renewal finds that the server ended it), the backend
/// itself must wake the key's local waiters: nothing else will before their backoff step.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_waiters_wake_when_the_holder_session_breaks() -> Result<()> {
    let server = server().await?;
    let app = unique("broken-holder");
    let backend = backend_at(&server.url(), named(&app)).await?;
    let key = LockKey::new(unique("broken"))?;
    let ttl = Duration::from_secs(30);
    let lease = backend
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("the key was not free")?;
    let mut releases = wait_behind(&backend, &key).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drain_wakes(&mut releases).await;
    terminate_holders(server, &app).await?;
    // The renewal meets the ended session and drops it (the lease is lost).
    let renewed = backend.renew(&lease, ttl).await;
    ensure!(renewed.is_err(), "a renewal on an ended session succeeded");
    let broke = Instant::now();
    expect_woken(
        &mut releases,
        broke,
        "local waiter (after the holder session broke)",
    )
    .await?;
    let lease = backend
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("woken, but the lock was still held")?;
    ensure!(backend.release(&lease).await?, "release answered false");
    Ok(())
}

/// A waiter that waited on the server leaves its key in the backend's set of server waiters
/// (such keys arm no blocker: the server grants them the lock when the holder's session
/// ends). A later waiter of the same key that waits for release signals must still get a
/// blocker, and so hear at once that the next holder's session was terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_once_waited_for_on_the_server_still_arms_a_blocker_for_a_signal_waiter() -> Result<()>
{
    let server = server().await?;
    let waiter_app = unique("once-waiter");
    let waiter = backend_at(&server.url(), named(&waiter_app)).await?;
    let name = unique("once-on-the-server");
    let key = LockKey::new(&name)?;
    let ttl = Duration::from_secs(30);
    // First a waiter on the server, handed the lock by a release.
    let first_holder =
        Locker::from_arc(backend_at(&server.url(), PostgresConfig::default()).await?);
    let guard = first_holder.lock(&name).ttl(ttl).acquire().await?;
    let queued = tokio::spawn({
        let (waiter, name) = (Locker::from_arc(waiter.clone()), name.clone());
        async move {
            let guard = waiter
                .lock(&name)
                .ttl(ttl)
                .wait(Duration::from_secs(10))
                .backoff(Backoff::new(
                    Duration::from_secs(20),
                    Duration::from_secs(20),
                ))
                .acquire()
                .await?;
            guard.release().await?;
            anyhow::Ok(())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(guard.release().await?, "release answered false");
    tokio::time::timeout(Duration::from_secs(5), queued).await???;
    // Then a holder whose session the server ends, and a waiter of release signals.
    let app = unique("later-holder");
    let holder = backend_at(&server.url(), named(&app)).await?;
    let _lease = holder
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("the key was not free")?;
    let mut releases = wait_behind(&waiter, &key).await?;
    blocker_waiting(server, &waiter_app).await?;
    let freed = terminate_holders(server, &app).await?;
    expect_woken(
        &mut releases,
        freed,
        "waiter (after the holder's session ended)",
    )
    .await?;
    Ok(())
}

/// The other order: a waiter of release signals first, then a waiter on the server of the
/// same key that leaves again. The key stayed in the backend's set of server waiters, so the
/// signal waiter's "held" answers about the next holder armed no blocker, and it did not hear
/// that this holder's session was terminated (until its backoff step).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signal_waiter_keeps_its_blocker_after_a_server_waiter_came_and_left() -> Result<()> {
    let server = server().await?;
    let waiter_app = unique("signal-waiter");
    let waiter = backend_at(&server.url(), named(&waiter_app)).await?;
    let name = unique("signal-then-server");
    let key = LockKey::new(&name)?;
    let ttl = Duration::from_secs(30);
    let first = backend_at(&server.url(), PostgresConfig::default()).await?;
    let lease = first
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("the key was not free")?;
    let mut releases = wait_behind(&waiter, &key).await?;
    // A waiter on the server comes and goes.
    drop(waiter.subscribe_server_waiter(&key).await?);
    ensure!(first.release(&lease).await?, "release answered false");
    // The next holder, whose session the server will end.
    let app = unique("signal-then-server-holder");
    let holder = backend_at(&server.url(), named(&app)).await?;
    let _lease = holder
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("the key was not free after the release")?;
    ensure!(
        waiter.try_acquire(&key, ttl).await?.into_lease().is_none(),
        "the key was free"
    );
    blocker_waiting(server, &waiter_app).await?;
    drain_wakes(&mut releases).await;
    let freed = terminate_holders(server, &app).await?;
    expect_woken(
        &mut releases,
        freed,
        "signal waiter (after a server waiter came and left, the next holder's session ended)",
    )
    .await?;
    Ok(())
}
