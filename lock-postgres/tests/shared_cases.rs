//! Semaphores and reader-writer locks where PostgreSQL has its own failure modes (#14): a
//! session grants an advisory lock it holds again (reentrancy), a terminated holder session
//! frees permits at once, a stopped holder's permits are freed by `idle_session_timeout`,
//! and a refused writer's intent lives on the server for `WRITER_INTENT`, not longer.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::{advisory_held, backend_at, server, unique};
use lock_core::{Attempt, LockBackend, LockKey, Locker, RwMode, WRITER_INTENT};
use lock_harness::TcpProxy;
use lock_harness::postgres::PostgresServer;
use lock_postgres::{PostgresConfig, semaphore_base, slot_key};
use sqlx::postgres::PgPoolOptions;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

fn acquired(attempt: Attempt, what: &str) -> Result<lock_core::Lease> {
    attempt
        .into_lease()
        .with_context(|| format!("{what} was refused"))
}

/// Everything of one backend on one holder session: that session would grant a slot or an
/// exclusive side it holds already (advisory locks are reentrant per session), so the
/// backend must leave its own slots out and refuse a writer next to its own readers (and a
/// reader next to its own writer) without trying the lock on the server; a limit that
/// disagrees with the session's own permits is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_never_grants_its_own_slot_or_side_again() -> Result<()> {
    let server = server().await?;
    let config = PostgresConfig {
        max_sessions: 1,
        sessions_per_ttl: 1,
        ..PostgresConfig::default()
    };
    let backend = backend_at(&server.url(), config.clone()).await?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&server.url())
        .await?;
    let ttl = Duration::from_secs(10);
    let name = LockKey::new(unique("reentrant-sem"))?;
    let a = acquired(
        backend.try_acquire_permits(&name, 2, 1, ttl).await?,
        "permit 1 of 2",
    )?;
    let b = acquired(
        backend.try_acquire_permits(&name, 2, 1, ttl).await?,
        "permit 2 of 2",
    )?;
    let third = backend.try_acquire_permits(&name, 2, 1, ttl).await?;
    ensure!(
        matches!(third, Attempt::Held { .. }),
        "a third permit of 2 was granted on the session holding the first two"
    );
    // The session holds permits of this semaphore: another limit is refused all the same.
    let other_limit = backend.try_acquire_permits(&name, 3, 1, ttl).await;
    ensure!(
        matches!(&other_limit, Err(lock_core::LockError::InvalidConfig(m)) if m.contains('2') && m.contains('3')),
        "a limit of 3 beside this session's permits of 2 gave {other_limit:?}"
    );
    let base = semaphore_base(&config.namespace, name.as_str());
    for slot in 0..2 {
        ensure!(
            advisory_held(&pool, slot_key(base, slot)).await?,
            "slot {slot} is not held on the server"
        );
    }
    ensure!(
        backend.release(&a).await?,
        "release of permit 1 answered false"
    );
    let c = acquired(
        backend.try_acquire_permits(&name, 2, 1, ttl).await?,
        "a permit after a release",
    )?;
    ensure!(backend.release(&b).await?);
    ensure!(backend.release(&c).await?);

    let rw = LockKey::new(unique("reentrant-rw"))?;
    let r1 = acquired(
        backend.try_acquire_rw(&rw, RwMode::Read, ttl).await?,
        "reader 1",
    )?;
    let r2 = acquired(
        backend.try_acquire_rw(&rw, RwMode::Read, ttl).await?,
        "reader 2",
    )?;
    let writer = backend.try_acquire_rw(&rw, RwMode::Write, ttl).await?;
    ensure!(
        matches!(writer, Attempt::Held { .. }),
        "a writer was granted on the session holding two readers"
    );
    ensure!(backend.release(&r1).await?);
    ensure!(backend.release(&r2).await?);
    let w = acquired(
        backend.try_acquire_rw(&rw, RwMode::Write, ttl).await?,
        "the writer after the readers left",
    )?;
    let reader = backend.try_acquire_rw(&rw, RwMode::Read, ttl).await?;
    ensure!(
        matches!(reader, Attempt::Held { .. }),
        "a reader was granted on the session holding the writer"
    );
    ensure!(backend.release(&w).await?);
    let r3 = acquired(
        backend.try_acquire_rw(&rw, RwMode::Read, ttl).await?,
        "a reader after the writer",
    )?;
    ensure!(backend.release(&r3).await?);
    ensure!(backend.held_count() == 0, "the book still holds leases");
    Ok(())
}

/// A holder session the server terminates frees its permits and reader side at once: the
/// guards' lost signal fires within the heartbeat bound and another backend gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_session_frees_permits_and_sides_and_tells_the_guards() -> Result<()> {
    let server = server().await?;
    let holder_backend = backend_at(&server.url(), PostgresConfig::default()).await?;
    let holder = Locker::from_arc(holder_backend.clone());
    let other = backend_at(&server.url(), PostgresConfig::default()).await?;
    let ttl = Duration::from_secs(10);
    let sem = unique("terminated-sem");
    let rw = unique("terminated-rw");
    let permits = holder
        .semaphore(&sem, 2)
        .permits(2)
        .ttl(ttl)
        .acquire()
        .await?;
    let reader = holder.rwlock(&rw).read().ttl(ttl).acquire().await?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&server.url())
        .await?;
    for pid in holder_backend.holder_pids().await {
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&pool)
            .await?;
    }
    let terminated = Instant::now();
    for (what, guard) in [("permits", &permits), ("reader", &reader)] {
        tokio::time::timeout(Duration::from_secs(3), guard.lost())
            .await
            .with_context(|| format!("the {what} guard never heard of its terminated session"))?;
    }
    println!(
        "lost() fired {:?} after the terminate",
        terminated.elapsed()
    );
    let (sem_key, rw_key) = (LockKey::new(&sem)?, LockKey::new(&rw)?);
    let deadline = Instant::now() + Duration::from_secs(3);
    let (p, w) = loop {
        let p = other.try_acquire_permits(&sem_key, 2, 2, ttl).await?;
        let w = other.try_acquire_rw(&rw_key, RwMode::Write, ttl).await?;
        match (p, w) {
            (Attempt::Acquired(p), Attempt::Acquired(w)) => break (p, w),
            (p, w) => {
                if let Attempt::Acquired(p) = p {
                    other.release(&p).await?;
                }
                if let Attempt::Acquired(w) = w {
                    other.release(&w).await?;
                }
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the terminated session's permits and reader side were not free 3 s later"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    other.release(&p).await?;
    other.release(&w).await?;
    Ok(())
}

/// A holder whose process stops (its connection black-holed: no release, no reaper, no
/// close) has its permits freed by the server's `idle_session_timeout`, after the lease's
/// deadline and within `expiry_slack` (+ margin for a loaded machine) of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_holders_permits_are_freed_after_the_deadline() -> Result<()> {
    let server = server().await?;
    let proxy = TcpProxy::start(server.addr())?;
    let holder = backend_at(
        &PostgresServer::url_for(proxy.addr()),
        PostgresConfig::default(),
    )
    .await?;
    let slack = holder.capabilities().expiry_slack;
    let other = backend_at(&server.url(), PostgresConfig::default()).await?;
    let name = LockKey::new(unique("stopped-sem"))?;
    let ttl = Duration::from_secs(2);
    let sent = Instant::now();
    let lease = acquired(
        holder.try_acquire_permits(&name, 3, 3, ttl).await?,
        "3 of 3 permits",
    )?;
    proxy.blackhole();
    let deadline = sent + ttl;
    let taken_at = loop {
        if let Some(lease) = other
            .try_acquire_permits(&name, 3, 3, ttl)
            .await?
            .into_lease()
        {
            let at = Instant::now();
            other.release(&lease).await?;
            break at;
        }
        if Instant::now() > deadline + ttl * 2 {
            bail!("the stopped holder's permits were not freed within 2 TTLs of the deadline");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let late = taken_at.saturating_duration_since(deadline);
    println!("permits taken over {late:?} after the deadline (expiry_slack {slack:?})");
    ensure!(
        taken_at >= deadline,
        "permits taken over {:?} before the stopped holder's deadline",
        deadline - taken_at
    );
    ensure!(
        late <= slack + Duration::from_millis(250),
        "a stopped holder's permits were freed {late:?} after its deadline (slack {slack:?})"
    );
    drop(lease);
    proxy.heal();
    Ok(())
}

/// A refused writer's mark is on the server: it keeps new readers of every backend out while
/// it lives, and lapses `WRITER_INTENT` after the writer's last attempt when the writer stops
/// retrying (no session of the writer needs to stay open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_intent_keeps_readers_out_then_lapses() -> Result<()> {
    let server = server().await?;
    let first = backend_at(&server.url(), PostgresConfig::default()).await?;
    let writer = backend_at(&server.url(), PostgresConfig::default()).await?;
    let late = backend_at(&server.url(), PostgresConfig::default()).await?;
    let ttl = Duration::from_secs(10);
    let name = LockKey::new(unique("intent"))?;
    let reader = acquired(
        first.try_acquire_rw(&name, RwMode::Read, ttl).await?,
        "the first reader",
    )?;
    let refused = writer.try_acquire_rw(&name, RwMode::Write, ttl).await?;
    let marked = Instant::now();
    ensure!(
        matches!(refused, Attempt::Held { .. }),
        "a writer was granted beside a reader"
    );
    // The writer gives up: its backend goes away with its sessions.
    drop(writer);
    tokio::time::sleep(WRITER_INTENT / 2).await;
    let second = late.try_acquire_rw(&name, RwMode::Read, ttl).await?;
    ensure!(
        matches!(second, Attempt::Held { .. }),
        "a new reader was admitted {:?} after a writer was refused (intent {WRITER_INTENT:?})",
        marked.elapsed()
    );
    let lapse_by = marked + WRITER_INTENT + Duration::from_millis(1500);
    tokio::time::sleep_until(marked + WRITER_INTENT).await;
    let second = loop {
        if let Some(lease) = late
            .try_acquire_rw(&name, RwMode::Read, ttl)
            .await?
            .into_lease()
        {
            break lease;
        }
        ensure!(
            Instant::now() < lapse_by,
            "the intent of a writer that stopped retrying still kept readers out {:?} later",
            marked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "a new reader was admitted {:?} after the writer's only attempt",
        marked.elapsed()
    );
    first.release(&reader).await?;
    late.release(&second).await?;
    Ok(())
}

/// A role that may not create the session's `pg_temp` functions, or may not use the intent
/// table, gets `InvalidConfig` naming what is missing, and nothing else happens: the locks
/// and permits already on its holder session stay held (no session is dropped for it), and
/// a writer granted before its intent `DELETE` failed gives its lock back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privilege_refusals_leave_the_sessions_locks_alone() -> Result<()> {
    let server = tokio::task::spawn_blocking(PostgresServer::start).await??;
    let url_as = |role: &str| {
        format!(
            "postgres://{role}@127.0.0.1:{}/postgres?sslmode=disable",
            server.port()
        )
    };
    let ttl = Duration::from_secs(10);
    // The DBA's backend creates the fence sequence and, with a first reader, the tables.
    let dba = backend_at(&server.url(), PostgresConfig::default()).await?;
    let setup = LockKey::new("setup")?;
    let lease = acquired(
        dba.try_acquire_rw(&setup, RwMode::Read, ttl).await?,
        "setup",
    )?;
    dba.release(&lease).await?;
    // A permit of the DBA's keeps the semaphore occupied: a refused request must not take
    // the occupancy key (the table is read before it).
    let sem_held = LockKey::new("sem-held")?;
    let dba_permit = acquired(
        dba.try_acquire_permits(&sem_held, 2, 1, ttl).await?,
        "the DBA's permit",
    )?;
    server.sql(
        "REVOKE TEMP ON DATABASE postgres FROM PUBLIC; \
         CREATE ROLE notemp LOGIN; CREATE ROLE notable LOGIN; \
         GRANT TEMP ON DATABASE postgres TO notable; \
         GRANT USAGE ON SEQUENCE public.distlock_fence_seq TO notemp, notable",
    )?;
    let one_session = PostgresConfig {
        max_sessions: 1,
        sessions_per_ttl: 1,
        ..PostgresConfig::default()
    };
    for role in ["notemp", "notable"] {
        let backend = backend_at(&url_as(role), one_session.clone()).await?;
        let lock = acquired(
            backend.try_acquire(&LockKey::new("held")?, ttl).await?,
            "a lock",
        )?;
        let kept = vec![lock];
        let permits = backend.try_acquire_permits(&sem_held, 2, 1, ttl).await;
        match (role, permits) {
            ("notemp", Err(lock_core::LockError::InvalidConfig(message))) => ensure!(
                message.contains("TEMP"),
                "the refusal does not name TEMP: {message}"
            ),
            ("notable", Err(lock_core::LockError::InvalidConfig(message))) => ensure!(
                message.contains("distlock_semaphore_limit"),
                "the refusal does not name the limit table: {message}"
            ),
            (_, other) => bail!("{role}: a semaphore attempt gave {other:?}"),
        }
        if role == "notable" {
            let rw = LockKey::new(unique("rw"))?;
            for mode in [RwMode::Read, RwMode::Write] {
                match backend.try_acquire_rw(&rw, mode, ttl).await {
                    Err(lock_core::LockError::InvalidConfig(message)) => ensure!(
                        message.contains("distlock_rw_intent"),
                        "the refusal does not name the intent table: {message}"
                    ),
                    other => bail!("{role}: a {mode:?} attempt gave {other:?}"),
                }
            }
            let key = lock_postgres::rw_key(&one_session.namespace, rw.as_str());
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&server.url())
                .await?;
            ensure!(
                !advisory_held(&pool, key).await?,
                "the refused writer left its lock held"
            );
        }
        for lease in &kept {
            ensure!(
                !lease
                    .lost_signal()
                    .is_some_and(|signal| signal.is_cancelled()),
                "{role}: a lease on the session was reported lost"
            );
            backend
                .renew(lease, ttl)
                .await
                .with_context(|| format!("{role}: a lease on the session did not renew"))?;
        }
        for lease in kept {
            ensure!(
                backend.release(&lease).await?,
                "{role}: release answered false"
            );
        }
    }
    // Nothing of the refused requests stayed on the occupancy key: once the DBA's permit is
    // gone, a request with another limit sets it.
    dba.release(&dba_permit).await?;
    let other_limit = dba.try_acquire_permits(&sem_held, 3, 1, ttl).await;
    ensure!(
        matches!(other_limit, Ok(Attempt::Acquired(_))),
        "a new limit after the last permit gave {other_limit:?}: a refused request left the \
         occupancy key held"
    );
    Ok(())
}

/// Requests with two limits race on one semaphore from two backends (on several sessions
/// each): leases of different limits are never held at the same time, and every refusal of
/// a limit names both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disagreeing_limits_are_never_held_together() -> Result<()> {
    let server = server().await?;
    let backends = [
        backend_at(&server.url(), PostgresConfig::default()).await?,
        backend_at(&server.url(), PostgresConfig::default()).await?,
    ];
    let name = LockKey::new(unique("limits-race"))?;
    let held: Arc<std::sync::Mutex<Vec<u32>>> = Arc::default();
    let refusals = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for task in 0..8usize {
        let backend = backends[task % 2].clone();
        let (name, held, refusals) = (name.clone(), held.clone(), refusals.clone());
        let limit = if task % 4 < 2 { 2 } else { 3 };
        // Two TTLs: the tasks of one backend use two holder sessions.
        let ttl = Duration::from_millis(if task % 3 == 0 { 5000 } else { 6000 });
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                match backend.try_acquire_permits(&name, limit, 1, ttl).await {
                    Ok(Attempt::Acquired(lease)) => {
                        {
                            let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                            ensure!(
                                held.iter().all(|&other| other == limit),
                                "a permit of limit {limit} granted while {held:?} are held"
                            );
                            held.push(limit);
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        {
                            let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                            let at = held.iter().position(|&l| l == limit).context("lost")?;
                            held.swap_remove(at);
                        }
                        backend.release(&lease).await?;
                    }
                    Ok(Attempt::Held { .. }) => {}
                    Err(lock_core::LockError::InvalidConfig(message)) => {
                        ensure!(
                            message.contains('2') && message.contains('3'),
                            "a refusal does not name both limits: {message}"
                        );
                        refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(error) => return Err(error.into()),
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let refused = refusals.load(std::sync::atomic::Ordering::Relaxed);
    println!("{refused} refusals of a disagreeing limit");
    // 320 attempts, half with each limit, overlapping: without a refusal, the disagreement
    // (and the message that must name both limits) was never met.
    ensure!(refused > 0, "no attempt met a disagreeing limit");
    Ok(())
}

/// A server restart ends every holder session with its `pg_temp` functions: permit and
/// side guards report lost; afterwards the same backend takes permits and sides again (its
/// new sessions create the functions again), another limit is accepted (the old limit's
/// row may survive a clean restart, but no occupancy key is held, so it binds nobody), and
/// fences keep increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_loses_permits_then_recovers() -> Result<()> {
    let server = Arc::new(tokio::task::spawn_blocking(PostgresServer::start).await??);
    let locker = Locker::from_arc(backend_at(&server.url(), PostgresConfig::default()).await?);
    let ttl = Duration::from_secs(3);
    let permits = locker
        .semaphore("sem", 2)
        .permits(2)
        .ttl(ttl)
        .acquire()
        .await?;
    let reader = locker.rwlock("rw").read().ttl(ttl).acquire().await?;
    let fence_before = permits.fence().max(reader.fence());
    tokio::task::spawn_blocking({
        let server = server.clone();
        move || server.restart()
    })
    .await??;
    for guard in [&permits, &reader] {
        tokio::time::timeout(ttl, guard.lost())
            .await
            .with_context(|| format!("{} was not reported lost after a restart", guard.key()))?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let (again, writer) = loop {
        let attempt = async {
            let again = locker
                .semaphore("sem", 3)
                .permits(3)
                .ttl(ttl)
                .wait(Duration::from_secs(2))
                .acquire()
                .await?;
            let writer = locker
                .rwlock("rw")
                .write()
                .ttl(ttl)
                .wait(Duration::from_secs(2))
                .acquire()
                .await?;
            anyhow::Ok((again, writer))
        };
        match attempt.await {
            Ok(pair) => break pair,
            Err(error) if Instant::now() < deadline => {
                println!("not yet: {error:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => bail!("no permits or writer after the restart: {error:#}"),
        }
    };
    ensure!(
        again.fence() > fence_before && writer.fence() > fence_before,
        "fence went back after the restart"
    );
    drop((permits, reader));
    again.release().await?;
    writer.release().await?;
    Ok(())
}

/// A right revoked while the backend runs (USAGE on the fence sequence) fails a permit
/// attempt after its function took the session locks: the session is dropped, so the
/// semaphore is not left occupied by a refused attempt. (A 42501 used to be taken for one
/// on the limit table, which comes before any lock: the session and its locks were kept.)
/// The session itself is kept with its locks given back, its alive key taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_right_revoked_mid_run_leaves_no_permit_held() -> Result<()> {
    let server = tokio::task::spawn_blocking(PostgresServer::start).await??;
    let ttl = Duration::from_secs(10);
    let dba = backend_at(&server.url(), PostgresConfig::default()).await?;
    // The DBA's first reader creates the fence sequence, the tables and the functions.
    let setup = LockKey::new("setup")?;
    let lease = acquired(
        dba.try_acquire_rw(&setup, RwMode::Read, ttl).await?,
        "setup",
    )?;
    dba.release(&lease).await?;
    server.sql(
        "CREATE ROLE runner LOGIN; \
         GRANT USAGE ON SEQUENCE public.distlock_fence_seq TO runner; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON public.distlock_semaphore_limit, \
         public.distlock_rw_intent TO runner",
    )?;
    let runner_url = format!(
        "postgres://runner@127.0.0.1:{}/postgres?sslmode=disable",
        server.port()
    );
    let one_session = PostgresConfig {
        max_sessions: 1,
        sessions_per_ttl: 1,
        ..PostgresConfig::default()
    };
    let runner = backend_at(&runner_url, one_session).await?;
    let key = LockKey::new(unique("revoked"))?;
    let first = acquired(
        runner.try_acquire_permits(&key, 1, 1, ttl).await?,
        "the runner's first permit",
    )?;
    runner.release(&first).await?;
    server.sql("REVOKE USAGE ON SEQUENCE public.distlock_fence_seq FROM runner")?;
    match runner.try_acquire_permits(&key, 1, 1, ttl).await {
        Err(lock_core::LockError::InvalidConfig(_)) => {}
        other => bail!("a permit without the sequence right gave {other:?}"),
    }
    // A session kept after the refusal (its locks given back) still has its alive key, which
    // other backends' blockers wait on to hear at once when it ends.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&server.url())
        .await?;
    let without_alive_key: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity a WHERE a.usename = 'runner' \
         AND a.application_name LIKE '%-holder' AND NOT EXISTS (SELECT 1 FROM pg_locks l \
         WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
         AND l.classid::int8 = $1 AND l.objid::int8 = a.pid)",
    )
    .bind(i64::from(lock_postgres::HOLDER_ALIVE_CLASS))
    .fetch_one(&pool)
    .await?;
    ensure!(
        without_alive_key == 0,
        "{without_alive_key} holder session(s) kept after the refusal lost their alive key"
    );
    // The semaphore's one permit must be free.
    let permit = acquired(
        dba.try_acquire_permits(&key, 1, 1, ttl).await?,
        "the only permit, after the runner's refused attempt,",
    )?;
    dba.release(&permit).await?;
    Ok(())
}

/// A one-session backend whose fence sequence lives in a schema of its own, where the
/// semaphore tables do not exist yet, and an admin pool on the server.
async fn backend_without_tables() -> Result<(Arc<lock_postgres::PostgresBackend>, sqlx::PgPool)> {
    let config = PostgresConfig {
        max_sessions: 1,
        sessions_per_ttl: 1,
        ..PostgresConfig::default()
    };
    let (backend, admin, _) = backend_in_a_new_schema("distlock_fence", config).await?;
    Ok((backend, admin))
}

/// A backend whose fence sequence is `sequence` in a new schema (returned, with an admin
/// pool on the server).
async fn backend_in_a_new_schema(
    sequence: &str,
    config: PostgresConfig,
) -> Result<(Arc<lock_postgres::PostgresBackend>, sqlx::PgPool, String)> {
    let server = server().await?;
    let schema = unique("tables").replace('-', "_");
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&server.url())
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await?;
    let config = PostgresConfig {
        fence_sequence: format!("{schema}.{sequence}"),
        ..config
    };
    let backend = backend_at(&server.url(), config).await?;
    Ok((backend, admin, schema))
}

/// Takes the setup lock on a connection of `admin`'s, as another process's setup would.
async fn hold_the_setup_lock(
    admin: &sqlx::PgPool,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    let mut setup = admin.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(lock_postgres::SETUP_LOCK.0)
        .bind(lock_postgres::SETUP_LOCK.1)
        .execute(&mut *setup)
        .await?;
    Ok(setup)
}

async fn let_go_of_the_setup_lock(setup: &mut sqlx::PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(lock_postgres::SETUP_LOCK.0)
        .bind(lock_postgres::SETUP_LOCK.1)
        .execute(setup)
        .await?;
    Ok(())
}

/// The first semaphore call of a backend whose tables do not exist yet creates them under the
/// setup lock, which another process may hold a while (creating its own fence sequence or
/// tables). That wait ran on the holder session, counted as an unanswered statement, and
/// reported the session's locks lost after ~0.5 s; the creation now runs on a connection of
/// its own and the holder keeps its locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_to_create_the_tables_keeps_the_sessions_locks() -> Result<()> {
    let (backend, admin) = backend_without_tables().await?;
    let locker = Locker::from_arc(backend.clone());
    let ttl = Duration::from_secs(30);
    let guard = locker.lock(unique("kept")).ttl(ttl).acquire().await?;
    // Another process holds the setup lock for 1.5 s.
    let mut setup = hold_the_setup_lock(&admin).await?;
    let first = tokio::spawn({
        let backend = backend.clone();
        let name = LockKey::new(unique("first-sem"))?;
        async move { backend.try_acquire_permits(&name, 2, 1, ttl).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lost_meanwhile = guard.is_lost();
    let_go_of_the_setup_lock(&mut setup).await?;
    let permit = first.await??.into_lease().context("no permit")?;
    ensure!(
        !lost_meanwhile && !guard.is_lost(),
        "the holder's lock was reported lost while the table creation waited: {:?}",
        guard.lost_reason()
    );
    backend.release(&permit).await?;
    guard.release().await?;
    Ok(())
}

/// Finding (review, 2026-12-03): the session stayed taken (its mutex held) while the table
/// creation waited for another process's setup, so nothing read it: a session the server
/// ended meanwhile was noticed only when the wait was over, and its holders heard of their
/// lost locks seconds after another process could have taken them. The creation now runs
/// with the session free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_to_create_the_tables_leaves_the_session_watched() -> Result<()> {
    let (backend, admin) = backend_without_tables().await?;
    let locker = Locker::from_arc(backend.clone());
    let ttl = Duration::from_secs(30);
    let name = unique("watched");
    let guard = locker.lock(&name).ttl(ttl).acquire().await?;
    let lost = guard.lost();
    // Another process holds the setup lock for 5 s.
    let mut setup = hold_the_setup_lock(&admin).await?;
    let first = tokio::spawn({
        let backend = backend.clone();
        let name = LockKey::new(unique("first-sem"))?;
        async move { backend.try_acquire_permits(&name, 2, 1, ttl).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The server ends the holder's session while the creation waits.
    let hash = lock_postgres::advisory_key("distlock", &name);
    let pid: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
         AND ((classid::int8 << 32) | objid::int8) = $1",
    )
    .bind(hash)
    .fetch_one(&admin)
    .await?;
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&admin)
        .await?;
    let ended = Instant::now();
    let bound = lock_postgres::loss_notice_bound(30_000) + Duration::from_millis(500);
    let heard = tokio::time::timeout(Duration::from_secs(4), lost).await;
    let heard_after = ended.elapsed();
    let_go_of_the_setup_lock(&mut setup).await?;
    let _ = first.await?;
    ensure!(
        heard.is_ok() && heard_after <= bound,
        "the holder heard of its session's end {heard_after:?} after it (bound {bound:?}; \
         heard: {})",
        heard.is_ok()
    );
    Ok(())
}

/// Finding (review, 2026-12-03): the semaphore and reader-writer tables go into the fence
/// sequence's schema, which was cut out of the setting at its last '.': for
/// `schema."fence.seq"` that gave the schema `schema."fence`, and every semaphore failed
/// with an SQL syntax error. The server now names the schema at setup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quoted_fence_sequence_name_with_a_dot_keeps_its_schema() -> Result<()> {
    let (backend, admin, schema) =
        backend_in_a_new_schema("\"fence.seq\"", PostgresConfig::default()).await?;
    let key = LockKey::new(unique("dotted-permits"))?;
    let ttl = Duration::from_secs(5);
    let permit = acquired(
        backend.try_acquire_permits(&key, 2, 1, ttl).await?,
        "a permit of a free semaphore",
    )?;
    backend.release(&permit).await?;
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1 \
         AND tablename IN ('distlock_rw_intent', 'distlock_semaphore_limit')",
    )
    .bind(&schema)
    .fetch_one(&admin)
    .await?;
    ensure!(
        tables == 2,
        "{tables} of the 2 tables are in schema {schema}"
    );
    Ok(())
}
