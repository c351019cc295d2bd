//! Waiting on the server (#13): a waiter blocks in `pg_advisory_lock` on a queue session, so
//! the server hands it the lock at the release. Its lease must count from the grant, not from
//! the answer; a cancelled wait must leave the server's lock queue at once; and waiters of one
//! key in one process (some on the server, some attempting) must never hold it together.

mod common;

use anyhow::{Context, Result, ensure};
use common::{advisory_held, backend_at, named, server, unique, waiter_marks};
use lock_core::{Backoff, LockBackend, LockKey, Locker};
use lock_harness::postgres::PostgresServer;
use lock_harness::proxy::LinkProxy;
use lock_postgres::PostgresConfig;
use sqlx::postgres::PgPoolOptions;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

/// Requests for advisory key `hash` that wait (not granted), read from `pg_locks`.
async fn waiting_on(pool: &sqlx::PgPool, hash: i64) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
         AND objsubid = 1 AND ((classid::int8 << 32) | objid::int8) = $1",
    )
    .bind(hash)
    .fetch_one(pool)
    .await?)
}

/// Until a request for `hash` waits in the server's lock queue (`pg_locks`), at most `within`.
async fn until_in_queue(
    pool: &sqlx::PgPool,
    hash: i64,
    within: Duration,
    what: &str,
) -> Result<()> {
    let by = Instant::now() + within;
    while waiting_on(pool, hash).await? == 0 {
        ensure!(
            Instant::now() < by,
            "{what} never waited in the server's lock queue"
        );
        sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn inspector(server: &PostgresServer) -> Result<sqlx::PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .connect(&server.url())
        .await?)
}

/// One contested key on the shared server: a holder `Locker` on a backend of its own, a
/// waiter backend and its `Locker`, the key's name and advisory key, and a pool to read
/// `pg_locks` with.
struct Contest {
    server: &'static PostgresServer,
    pool: sqlx::PgPool,
    holder: Locker,
    waiter_backend: Arc<lock_postgres::PostgresBackend>,
    waiter: Locker,
    name: String,
    hash: i64,
}

impl Contest {
    /// `name` made unique; the holder and the waiter backend configured as given.
    async fn new(name: &str, holder: PostgresConfig, waiter: PostgresConfig) -> Result<Self> {
        let server = server().await?;
        let pool = inspector(server).await?;
        let holder = Locker::from_arc(backend_at(&server.url(), holder).await?);
        let waiter_backend = backend_at(&server.url(), waiter).await?;
        let waiter = Locker::from_arc(waiter_backend.clone());
        let name = unique(name);
        let hash = waiter_backend.advisory_key(&LockKey::new(&name)?);
        Ok(Contest {
            server,
            pool,
            holder,
            waiter_backend,
            waiter,
            name,
            hash,
        })
    }

    /// Both backends with the default configuration.
    async fn plain(name: &str) -> Result<Self> {
        Contest::new(name, PostgresConfig::default(), PostgresConfig::default()).await
    }
}

/// A waiter whose next backoff step is 30 s away: only the server (or a release signal)
/// gets it the lock in time.
fn patient<'a>(locker: &'a Locker, key: &str, ttl: Duration) -> lock_core::LockRequest<'a> {
    locker
        .lock(key)
        .ttl(ttl)
        .wait(Duration::from_secs(30))
        .backoff(Backoff::new(
            Duration::from_secs(30),
            Duration::from_secs(30),
        ))
}

/// A task that waits patiently for `name`, releases it at once and returns when it had it.
fn hand_off_to(
    waiter: &Locker,
    name: &str,
    ttl: Duration,
) -> tokio::task::JoinHandle<Result<Instant>> {
    let (waiter, name) = (waiter.clone(), name.to_owned());
    tokio::spawn(async move {
        let guard = patient(&waiter, &name, ttl).acquire().await?;
        let at = Instant::now();
        guard.release().await?;
        anyhow::Ok(at)
    })
}

/// The waiter waits in the server's lock queue (a request in `pg_locks` that is not granted)
/// and has the lock within a few milliseconds of the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_waits_in_the_servers_queue_and_gets_the_lock_at_the_release() -> Result<()> {
    let Contest {
        pool,
        holder,
        waiter_backend,
        waiter,
        name,
        hash,
        ..
    } = Contest::plain("queued").await?;
    ensure!(
        waiter_backend.capabilities().server_wait,
        "queue sessions are on by default"
    );
    let ttl = Duration::from_secs(10);
    let guard = holder.lock(&name).ttl(ttl).acquire().await?;
    let waiting = hand_off_to(&waiter, &name, ttl);
    until_in_queue(&pool, hash, Duration::from_secs(5), "the waiter").await?;
    let released = Instant::now();
    ensure!(guard.release().await?, "release answered false");
    let acquired = timeout(Duration::from_secs(5), waiting).await???;
    let hand_off = acquired.saturating_duration_since(released);
    println!("hand-off through the server's queue: {hand_off:?}");
    // Proof of the server's queue is the request in `pg_locks` above; the bound only says
    // that nothing slow (a 30 s backoff step) came between, with room for a loaded machine.
    ensure!(
        hand_off < Duration::from_millis(500),
        "the waiter had the lock {hand_off:?} after the release"
    );
    Ok(())
}

/// The answer to a granted wait is slow to come back (300 ms on the way back): the lease
/// counts from the grant (the server starts the TTL when the statement ends), not from when
/// the answer arrived, or the waiter would believe in its lock 300 ms longer than the server
/// keeps it for a process that stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_granted_on_the_server_counts_from_the_grant() -> Result<()> {
    const BACK: Duration = Duration::from_millis(300);
    let server = server().await?;
    let link = LinkProxy::start(server.addr(), Duration::ZERO, BACK)?;
    let holder = Locker::from_arc(backend_at(&server.url(), PostgresConfig::default()).await?);
    let waiter = Locker::from_arc(
        backend_at(
            &PostgresServer::url_for(link.addr()),
            PostgresConfig::default(),
        )
        .await?,
    );
    let name = unique("slow-answer");
    let hash = lock_postgres::advisory_key(&PostgresConfig::default().namespace, &name);
    let pool = inspector(server).await?;
    let ttl = Duration::from_secs(5);
    // A first wait prepares the statement on the queue session (a prepare is one more round
    // trip before the statement, which makes the lease count from earlier still: safe, but
    // not what this test measures).
    let warm = unique("warm-up");
    let warm_guard = holder.lock(&warm).ttl(ttl).acquire().await?;
    let warm_wait = tokio::spawn({
        let (waiter, warm) = (waiter.clone(), warm.clone());
        async move { anyhow::Ok(patient(&waiter, &warm, ttl).acquire().await?) }
    });
    let warm_hash = lock_postgres::advisory_key(&PostgresConfig::default().namespace, &warm);
    until_in_queue(
        &pool,
        warm_hash,
        Duration::from_secs(20),
        "the warm-up wait",
    )
    .await?;
    warm_guard.release().await?;
    timeout(Duration::from_secs(10), warm_wait)
        .await???
        .release()
        .await?;
    let guard = holder.lock(&name).ttl(ttl).acquire().await?;
    let waiting = tokio::spawn({
        let (waiter, name) = (waiter.clone(), name.clone());
        async move {
            let guard = patient(&waiter, &name, ttl).acquire().await?;
            anyhow::Ok((guard, Instant::now()))
        }
    });
    // Until the waiter waits on the server (its connections and attempts are slow: every
    // answer takes 300 ms).
    until_in_queue(&pool, hash, Duration::from_secs(20), "the waiter").await?;
    let released = Instant::now();
    ensure!(guard.release().await?, "release answered false");
    let (lease, arrived_at) = timeout(Duration::from_secs(10), waiting)
        .await
        .context("the waiter did not get the lock")???;
    let arrived = arrived_at.saturating_duration_since(released);
    let valid_until = lease.valid_until();
    // The server granted the lock soon after the release, and no later than the answer's
    // arrival less its 300 ms on the way back (a waiting server process woken late by a
    // loaded machine grants later than the release): a lease counted from the answer's
    // arrival overshoots both by about 300 ms.
    let granted_by = released.max(arrived_at.checked_sub(BACK).unwrap_or(released));
    let bound = granted_by + ttl + Duration::from_millis(30);
    println!(
        "answer arrived {arrived:?} after the release; lease valid until release + {:?}",
        valid_until.saturating_duration_since(released)
    );
    ensure!(
        arrived >= BACK,
        "the answer came back in {arrived:?}, faster than the link allows"
    );
    ensure!(
        valid_until <= bound,
        "the lease is valid until release + {:?}: it counts from the answer, not the grant",
        valid_until.saturating_duration_since(released)
    );
    ensure!(
        valid_until + Duration::from_millis(300) >= released + ttl,
        "the lease is valid only until release + {:?}: far earlier than the grant allows",
        valid_until.saturating_duration_since(released)
    );
    lease.release().await?;
    Ok(())
}

/// A waiter cancelled while it waits on the server: its request leaves the server's lock
/// queue within a few hundred milliseconds (the server checks a waiting client's socket every
/// 100 ms), not at the end of its wait step (30 s here), and after the holder's release the
/// lock is free, not granted to the cancelled waiter's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_wait_leaves_the_servers_queue() -> Result<()> {
    let Contest {
        pool,
        holder,
        waiter_backend,
        waiter,
        name,
        hash,
        ..
    } = Contest::new(
        "cancelled-wait",
        PostgresConfig::default(),
        named(&unique("cancelled")),
    )
    .await?;
    let ttl = Duration::from_secs(10);
    let guard = holder.lock(&name).ttl(ttl).acquire().await?;
    let waiting = tokio::spawn({
        let (waiter, name) = (waiter.clone(), name.clone());
        async move { anyhow::Ok(patient(&waiter, &name, ttl).acquire().await?) }
    });
    until_in_queue(&pool, hash, Duration::from_secs(5), "the waiter").await?;
    waiting.abort();
    let _ = waiting.await;
    let cancelled = Instant::now();
    while waiting_on(&pool, hash).await? > 0 {
        ensure!(
            cancelled.elapsed() < Duration::from_secs(2),
            "the cancelled wait was still in the server's lock queue 2 s later"
        );
        sleep(Duration::from_millis(10)).await;
    }
    let left = cancelled.elapsed();
    println!("cancelled wait left the server's queue after {left:?}");
    ensure!(
        left < Duration::from_millis(500),
        "the cancelled wait left the server's lock queue only {left:?} later"
    );
    // The release has committed when it returns: a grant to the cancelled waiter's session
    // would show now.
    ensure!(guard.release().await?, "release answered false");
    ensure!(
        !advisory_held(&pool, hash).await?,
        "after the release the lock is held (by the cancelled waiter's session?)"
    );
    ensure!(
        waiter_backend.held_count() == 0,
        "the waiter's books hold a lock"
    );
    Ok(())
}

/// Two backends, four tasks each, on one key: two of each backend's tasks wait (on the
/// server, or for a release signal), two only try, over and over; some attempts are answered
/// from the books. No two ever hold the key at once,
/// fences rise in the order of the holds, and every release finds its lock. (A grant on a
/// queue session used to take over the book entry of a local attempt still in flight; a
/// second local attempt then took the key again on that attempt's session: two holders in
/// one process, and a release that answered false. This test did not reproduce that in 4 runs
/// of the old code; the suite's `lock_all_never_deadlocks_or_overlaps` through PgBouncer did,
/// about 1 run in 5.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_on_the_server_and_local_attempts_never_hold_together() -> Result<()> {
    const TASKS_PER_BACKEND: usize = 4;
    const ROUNDS: usize = 40;
    let server = server().await?;
    // A millisecond each way keeps attempts in flight long enough to meet the grants.
    let link = LinkProxy::start(
        server.addr(),
        Duration::from_millis(1),
        Duration::from_millis(1),
    )?;
    let url = PostgresServer::url_for(link.addr());
    let lockers = [
        Locker::from_arc(backend_at(&url, PostgresConfig::default()).await?),
        Locker::from_arc(backend_at(&url, PostgresConfig::default()).await?),
    ];
    let name = unique("together");
    let ttl = Duration::from_secs(10);
    let holds = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for task in 0..2 * TASKS_PER_BACKEND {
        let locker = lockers[task % 2].clone();
        let (name, holds) = (name.clone(), holds.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                // Half the tasks wait (on the server, when a queue session is free), half
                // only try, so that attempts are often in flight when a grant comes.
                let guard = if task % 4 < 2 {
                    locker
                        .lock(&name)
                        .ttl(ttl)
                        .wait(Duration::from_secs(30))
                        .backoff(Backoff::new(
                            Duration::from_millis(1),
                            Duration::from_millis(5),
                        ))
                        .acquire()
                        .await?
                } else {
                    let by = Instant::now() + Duration::from_secs(30);
                    loop {
                        if let Some(guard) = locker.lock(&name).ttl(ttl).try_acquire().await? {
                            break guard;
                        }
                        ensure!(Instant::now() < by, "a trying task never got the lock");
                        tokio::task::yield_now().await;
                    }
                };
                let start = Instant::now();
                sleep(Duration::from_micros(200)).await;
                let end = Instant::now();
                holds
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((start, end, guard.fence()));
                ensure!(guard.release().await?, "a release found its lock gone");
            }
            anyhow::Ok(())
        }));
    }
    timeout(Duration::from_secs(120), async {
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    })
    .await
    .context("the tasks did not finish within 120 s")??;
    let mut holds = holds.lock().unwrap_or_else(|p| p.into_inner()).clone();
    holds.sort_by_key(|(start, _, _)| *start);
    for pair in holds.windows(2) {
        let ((_, end, fence), (start, _, next_fence)) = (pair[0], pair[1]);
        ensure!(
            end <= start,
            "two holders at once: fences {fence:?} and {next_fence:?}"
        );
        ensure!(
            fence < next_fence,
            "fences do not rise with the holds: {fence:?} then {next_fence:?}"
        );
    }
    Ok(())
}

/// A waiter on the server needs no waiter mark: the server grants it the lock, and a mark
/// would make its holder's release pay for a NOTIFY and its commit (about as much again as
/// the server's own hand-off). Before this, every waiter marked its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_the_server_leaves_its_key_unmarked() -> Result<()> {
    let Contest {
        pool,
        holder,
        waiter,
        name,
        hash,
        ..
    } = Contest::plain("unmarked").await?;
    let ttl = Duration::from_secs(10);
    let guard = holder.lock(&name).ttl(ttl).acquire().await?;
    let waiting = hand_off_to(&waiter, &name, ttl);
    until_in_queue(&pool, hash, Duration::from_secs(5), "the waiter").await?;
    // A mark taken in the background would show within a few round trips.
    sleep(Duration::from_millis(200)).await;
    let marks = waiter_marks(&pool, hash).await?;
    ensure!(
        marks == 0,
        "the waiter on the server marked its key ({marks} marks)"
    );
    ensure!(guard.release().await?, "release answered false");
    timeout(Duration::from_secs(5), waiting).await???;
    Ok(())
}

/// A waiter that finds no queue session free (one per backend here, taken by a waiter of
/// another key) marks its key after all, so its holder's release wakes it at once, not at
/// its next backoff step 30 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_without_a_queue_session_marks_its_key_and_is_woken() -> Result<()> {
    let server = server().await?;
    let pool = inspector(server).await?;
    let holder = Locker::from_arc(backend_at(&server.url(), PostgresConfig::default()).await?);
    let waiter_backend = backend_at(
        &server.url(),
        PostgresConfig {
            queue_sessions: 1,
            ..PostgresConfig::default()
        },
    )
    .await?;
    let waiter = Locker::from_arc(waiter_backend.clone());
    let (first, second) = (unique("first-in-line"), unique("no-session-left"));
    let first_hash = waiter_backend.advisory_key(&LockKey::new(&first)?);
    let second_hash = waiter_backend.advisory_key(&LockKey::new(&second)?);
    let ttl = Duration::from_secs(10);
    let first_guard = holder.lock(&first).ttl(ttl).acquire().await?;
    let second_guard = holder.lock(&second).ttl(ttl).acquire().await?;
    let first_waiting = hand_off_to(&waiter, &first, ttl);
    until_in_queue(
        &pool,
        first_hash,
        Duration::from_secs(5),
        "the first waiter",
    )
    .await?;
    let second_waiting = hand_off_to(&waiter, &second, ttl);
    let by = Instant::now() + Duration::from_secs(5);
    while waiter_marks(&pool, second_hash).await? == 0 {
        ensure!(
            Instant::now() < by,
            "the waiter without a queue session never marked its key"
        );
        sleep(Duration::from_millis(10)).await;
    }
    ensure!(
        waiting_on(&pool, second_hash).await? == 0,
        "the second waiter found a queue session after all"
    );
    let released = Instant::now();
    ensure!(second_guard.release().await?, "release answered false");
    let acquired = timeout(Duration::from_secs(5), second_waiting).await???;
    let woken = acquired.saturating_duration_since(released);
    println!("waiter without a queue session had the lock {woken:?} after the release");
    ensure!(
        woken < Duration::from_secs(1),
        "the waiter had the lock {woken:?} after the release"
    );
    ensure!(first_guard.release().await?, "release answered false");
    timeout(Duration::from_secs(5), first_waiting).await???;
    Ok(())
}

/// Two waiters of one key in one backend: the first waits on the server, so the second waits
/// for a local signal and the key stays unmarked (its holder's release sends no NOTIFY). The
/// first is cancelled: the second must take its place (woken at once, not at its backoff
/// step up to 30 s later) and get the lock at the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_waiter_on_the_server_passes_its_place_on() -> Result<()> {
    let Contest {
        pool,
        holder,
        waiter,
        name,
        hash,
        ..
    } = Contest::plain("place-passed-on").await?;
    let ttl = Duration::from_secs(10);
    let guard = holder.lock(&name).ttl(ttl).acquire().await?;
    let first = hand_off_to(&waiter, &name, ttl);
    until_in_queue(&pool, hash, Duration::from_secs(5), "the first waiter").await?;
    let second = hand_off_to(&waiter, &name, ttl);
    // The second waiter's attempt and subscription stay in this process (the key is waited
    // for here): nothing to see on the server, so give it time to settle.
    sleep(Duration::from_millis(300)).await;
    ensure!(
        waiter_marks(&pool, hash).await? == 0,
        "the key was marked: the second waiter would be woken by a NOTIFY anyway"
    );
    first.abort();
    ensure!(
        matches!(first.await, Err(error) if error.is_cancelled()),
        "the first waiter was not cancelled"
    );
    // The second waiter is in the server's queue within a few round trips if it was woken.
    let by = Instant::now() + Duration::from_secs(3);
    loop {
        // The first waiter's request leaves the queue within ~100 ms of its connection going
        // (client_connection_check_interval); the second's replaces it.
        sleep(Duration::from_millis(200)).await;
        if waiting_on(&pool, hash).await? > 0 {
            break;
        }
        ensure!(
            Instant::now() < by,
            "the second waiter did not take the first one's place on the server within 3 s"
        );
    }
    let released = Instant::now();
    ensure!(guard.release().await?, "release answered false");
    let acquired = timeout(Duration::from_secs(5), second).await;
    let acquired = match acquired {
        Ok(joined) => joined??,
        Err(_) => anyhow::bail!("the second waiter did not have the lock 5 s after the release"),
    };
    let woken = acquired.saturating_duration_since(released);
    println!("second waiter had the lock {woken:?} after the release");
    ensure!(
        woken < Duration::from_secs(1),
        "the second waiter had the lock {woken:?} after the release"
    );
    Ok(())
}

/// A waiter on the server needs no blocker: the server grants it the lock the moment the
/// holder's session ends. No `<app>-blocker` connection is opened for it (before, each held
/// answer armed one, which scanned `pg_locks` and waited on the holder's alive key), and
/// after the holder's session is terminated the waiter has the lock at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_the_server_needs_no_blocker_to_take_over_a_dead_holder() -> Result<()> {
    let (holder_app, waiter_app) = (unique("dead-holder"), unique("no-blocker"));
    let Contest {
        server,
        pool,
        holder,
        waiter,
        name,
        hash,
        ..
    } = Contest::new("taken-over", named(&holder_app), named(&waiter_app)).await?;
    let ttl = Duration::from_secs(30);
    let guard = holder.lock(&name).ttl(ttl).acquire().await?;
    let waiting = hand_off_to(&waiter, &name, ttl);
    until_in_queue(&pool, hash, Duration::from_secs(5), "the waiter").await?;
    // A blocker armed by the waiter's held answers would have connected by now.
    sleep(Duration::from_millis(300)).await;
    let blockers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(format!("{waiter_app}-blocker"))
            .fetch_one(&pool)
            .await?;
    ensure!(
        blockers == 0,
        "the waiter on the server opened {blockers} blocker connection(s)"
    );
    let holder_sessions = format!("{holder_app}-holder");
    // Timed from the call: the terminate (through psql) returns after the session ended, by
    // when the waiter may have the lock already.
    let freed = Instant::now();
    let terminated =
        tokio::task::spawn_blocking(move || server.terminate_sessions(&holder_sessions)).await??;
    ensure!(terminated >= 1, "no holder session to terminate");
    let acquired = match timeout(Duration::from_secs(5), waiting).await {
        Ok(joined) => joined??,
        Err(_) => anyhow::bail!("the waiter did not have the lock 5 s after the holder died"),
    };
    let took = acquired.saturating_duration_since(freed);
    println!("waiter on the server had the dead holder's lock {took:?} after the terminate");
    ensure!(
        took < Duration::from_secs(1),
        "the waiter had the dead holder's lock {took:?} after the terminate"
    );
    // The dead holder's guard: its session is gone, dropping it sends nothing that matters.
    drop(guard);
    Ok(())
}
