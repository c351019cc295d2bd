//! Fencing tokens across a server crash (immediate shutdown, as SIGKILL/SIGQUIT or a power cut
//! leave it): a fence handed out must never be handed out again, also when
//! `synchronous_commit = off` is set for the server, the role, or another session drawing from
//! the sequence. And a fence sequence that cannot give monotonic tokens is refused at connect.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::server;
use lock_core::{LockBackend, LockError, LockKey};
use lock_harness::postgres::PostgresServer;
use lock_postgres::{PostgresBackend, PostgresConfig};
use sqlx::postgres::PgConnectOptions;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

fn unique(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

async fn backend_at(url: &str, config: PostgresConfig) -> Result<PostgresBackend> {
    let options = PgConnectOptions::from_str(url)?;
    Ok(PostgresBackend::with_options(options, config).await?)
}

/// A dedicated server whose WAL stays in shared memory as long as nothing forces it out:
/// `synchronous_commit = off` for everyone (as in postgresql.conf or `ALTER SYSTEM`) and the
/// WAL writer asleep for 10 s (its longest delay), so an immediate shutdown loses whatever
/// no commit flushed.
async fn lazy_wal_server() -> Result<Arc<PostgresServer>> {
    let server = tokio::task::spawn_blocking(|| {
        PostgresServer::start_with(&[("synchronous_commit", "off"), ("wal_writer_delay", "10000")])
    })
    .await??;
    Ok(Arc::new(server))
}

async fn sql(server: &Arc<PostgresServer>, query: &str) -> Result<String> {
    let server = server.clone();
    let query = query.to_owned();
    tokio::task::spawn_blocking(move || server.sql(&query)).await?
}

/// Immediate shutdown (SIGQUIT to the postmaster: no shutdown checkpoint, WAL buffers lost),
/// then a start on the same data directory (crash recovery).
async fn crash_and_restart(server: &Arc<PostgresServer>) -> Result<()> {
    let server = server.clone();
    tokio::task::spawn_blocking(move || {
        server.kill()?;
        server.start_again()
    })
    .await?
}

/// Acquires and releases `key` `rounds` times; returns the fences handed out.
async fn draw_fences(backend: &PostgresBackend, key: &LockKey, rounds: usize) -> Result<Vec<u64>> {
    let mut fences = Vec::new();
    for _ in 0..rounds {
        let lease = backend
            .try_acquire(key, Duration::from_secs(10))
            .await?
            .into_lease()
            .context("the key was not free")?;
        fences.push(lease.fence().context("no fence")?.0);
        ensure!(backend.release(&lease).await?, "release answered false");
    }
    Ok(fences)
}

/// The fence after a crash must be above every fence handed out before it.
async fn fence_after_crash(server: &Arc<PostgresServer>, key: &LockKey, before: u64) -> Result<()> {
    let backend = backend_at(&server.url(), PostgresConfig::default()).await?;
    let after = draw_fences(&backend, key, 1).await?[0];
    ensure!(
        after > before,
        "fence {after} handed out after the crash, but {before} was handed out before it"
    );
    Ok(())
}

/// `synchronous_commit = off` for the server and for the role: the holder session's
/// `nextval` must still reach the disk before its answer leaves the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_survive_a_crash_with_synchronous_commit_off() -> Result<()> {
    let server = lazy_wal_server().await?;
    sql(&server, "ALTER ROLE postgres SET synchronous_commit = off").await?;
    let key = LockKey::new(unique("crash"))?;
    for round in 0..2 {
        let backend = backend_at(&server.url(), PostgresConfig::default()).await?;
        // Everything so far (the sequence itself) on disk: what follows is the test.
        sql(&server, "CHECKPOINT").await?;
        let fences = draw_fences(&backend, &key, 5).await?;
        let before = *fences.last().context("no fence")?;
        drop(backend);
        crash_and_restart(&server).await?;
        fence_after_crash(&server, &key, before)
            .await
            .with_context(|| format!("round {round}, fences before the crash {fences:?}"))?;
    }
    Ok(())
}

/// Another session (not a distlock backend: a script, an older client, a role with
/// `synchronous_commit = off`) draws from the fence sequence first. PostgreSQL logs a
/// sequence 32 values ahead and the next 31 `nextval`s write no WAL and assign no
/// transaction id, so their commit waits for nothing: the holder's fences are covered only
/// by that other session's unflushed record, unless the backend makes sure it is flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_survive_a_crash_after_an_asynchronous_draw_by_another_session() -> Result<()> {
    let server = lazy_wal_server().await?;
    let key = LockKey::new(unique("crash-other"))?;
    let backend = backend_at(&server.url(), PostgresConfig::default()).await?;
    sql(&server, "CHECKPOINT").await?;
    let other: i64 = sql(
        &server,
        &format!(
            "SET synchronous_commit = off; SELECT nextval('{}')",
            lock_postgres::FENCE_SEQUENCE
        ),
    )
    .await?
    .lines()
    .last()
    .context("no answer")?
    .parse()?;
    let fences = draw_fences(&backend, &key, 3).await?;
    let before = *fences.last().context("no fence")?;
    ensure!(before > other as u64, "fences {fences:?} not above {other}");
    drop(backend);
    crash_and_restart(&server).await?;
    fence_after_crash(&server, &key, before)
        .await
        .with_context(|| format!("fences before the crash {fences:?}"))
}

/// The same for semaphore permits and reader sides (#14): their fences come from the lock's
/// sequence inside the session's `pg_temp` functions, which must flush it the same way. The
/// first permit and reader (which create the functions and tables and write the limit row:
/// commits that flush) come before the checkpoint, so the fences drawn after it write no WAL
/// of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permit_and_reader_fences_survive_a_crash_after_an_asynchronous_draw() -> Result<()> {
    let server = lazy_wal_server().await?;
    let sem = LockKey::new(unique("crash-sem"))?;
    let rw = LockKey::new(unique("crash-rw"))?;
    let ttl = Duration::from_secs(10);
    let backend = backend_at(&server.url(), PostgresConfig::default()).await?;
    let draw = async |backend: &PostgresBackend| -> Result<Vec<u64>> {
        let mut fences = Vec::new();
        for _ in 0..3 {
            let permit = backend
                .try_acquire_permits(&sem, 2, 1, ttl)
                .await?
                .into_lease()
                .context("no permit")?;
            let reader = backend
                .try_acquire_rw(&rw, lock_core::RwMode::Read, ttl)
                .await?
                .into_lease()
                .context("no reader side")?;
            fences.push(permit.fence().context("no fence")?.0);
            fences.push(reader.fence().context("no fence")?.0);
            ensure!(
                backend.release(&permit).await?,
                "permit release answered false"
            );
            ensure!(
                backend.release(&reader).await?,
                "reader release answered false"
            );
        }
        Ok(fences)
    };
    draw(&backend).await?;
    sql(&server, "CHECKPOINT").await?;
    sql(
        &server,
        &format!(
            "SET synchronous_commit = off; SELECT nextval('{}')",
            lock_postgres::FENCE_SEQUENCE
        ),
    )
    .await?;
    let fences = draw(&backend).await?;
    let before = *fences.iter().max().context("no fence")?;
    drop(backend);
    crash_and_restart(&server).await?;
    let backend = backend_at(&server.url(), PostgresConfig::default()).await?;
    let after = draw(&backend).await?;
    ensure!(
        after.iter().all(|&fence| fence > before),
        "fences {after:?} handed out after the crash, but {before} was handed out before it \
         (before the crash: {fences:?})"
    );
    Ok(())
}

/// A sequence with `CACHE > 1` hands each session its own block (a later holder can get a
/// lower token), one with `CYCLE` starts over after its maximum: both are refused at connect
/// with `InvalidConfig` naming the problem, not merely logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_monotonic_fence_sequences_are_refused() -> Result<()> {
    let server = server().await?;
    for (option, expected) in [("CACHE 20", "CACHE"), ("CYCLE", "CYCLE")] {
        let name = format!("public.{}", unique("fseq").replace('-', "_"));
        let create = format!("CREATE SEQUENCE {name} {option}");
        tokio::task::spawn_blocking(move || server.sql(&create)).await??;
        let config = PostgresConfig {
            fence_sequence: name.clone(),
            ..PostgresConfig::default()
        };
        match backend_at(&server.url(), config).await {
            Err(error) => match error.downcast_ref::<LockError>() {
                Some(LockError::InvalidConfig(message)) if message.contains(expected) => {}
                _ => bail!("{option}: expected InvalidConfig naming {expected}, got {error:#}"),
            },
            Ok(_) => bail!("a fence sequence with {option} was accepted"),
        }
    }
    Ok(())
}
