//! The backend behind a real PgBouncer (Debian package `pgbouncer`, installed by
//! `scripts/setup`) that the harness starts in front of this binary's PostgreSQL server:
//!
//! - transaction and statement pooling break session advisory locks: connecting through
//!   them is refused with `InvalidConfig` naming PgBouncer, well within the connect timeout,
//!   with a pool of one server connection and with several;
//! - session pooling keeps a server session per client connection: the whole conformance
//!   suite runs through it (pausing is skipped for the reason the main suite gives).

mod common;

use anyhow::{Context, Result, bail, ensure};
use lock_core::LockError;
use lock_harness::postgres::{PgBouncer, PoolMode};
use lock_postgres::PostgresBackend;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The session-pooling PgBouncer the conformance cases share (started on first use, from a
/// blocking thread; the harness's parent-death signal stops it with the binary).
async fn session_bouncer() -> Result<&'static PgBouncer> {
    static BOUNCER: OnceLock<std::result::Result<PgBouncer, String>> = OnceLock::new();
    let server = common::server().await?;
    let bouncer = tokio::task::spawn_blocking(move || {
        BOUNCER
            .get_or_init(|| {
                // One server connection per client connection: enough for the cases that
                // run at once, each with a few backends.
                PgBouncer::start(server, PoolMode::Session, 200)
                    .map_err(|error| format!("{error:#}"))
            })
            .as_ref()
            .map_err(|error| anyhow::anyhow!("starting pgbouncer: {error}"))
    })
    .await??;
    Ok(bouncer)
}

conformance_tests::conformance_suite! {
    factory = async { common::PgFactory::start_through(session_bouncer().await?.addr()).await },
    skip = {
        fair_queue_serves_waiters_in_arrival_order: "no fair queue: try-lock attempts woken by NOTIFY, whichever comes first gets the key (Capabilities::fair_queue is false; see README)",
        fences_increase_across_a_server_restart: "one PostgreSQL server is shared by every case of this binary and \
            crashing it would fail the cases beside it (the case runs on a dedicated server in \
            tests/dedicated.rs)",
        server_pause_fires_lost: "one PostgreSQL server is shared by every case of this binary and \
            pausing it would stall the cases beside it (the case runs on a dedicated server in \
            tests/dedicated.rs)",
    },
}

/// Connecting through `mode` pooling with `pool_size` server connections must fail fast with
/// an error that names PgBouncer.
async fn assert_refused(mode: PoolMode, pool_size: u32) -> Result<()> {
    let server = common::server().await?;
    let bouncer =
        tokio::task::spawn_blocking(move || PgBouncer::start(server, mode, pool_size)).await??;
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        PostgresBackend::connect(&bouncer.url()),
    )
    .await;
    let waited = started.elapsed();
    match outcome {
        Err(_) => bail!("{mode:?} pooling, pool {pool_size}: connect hung for 30 s"),
        Ok(Ok(_)) => bail!("{mode:?} pooling, pool {pool_size}: connect succeeded"),
        Ok(Err(LockError::InvalidConfig(message))) => {
            ensure!(
                message.contains("PgBouncer"),
                "{mode:?} pooling, pool {pool_size}: the refusal does not name PgBouncer: {message}"
            );
            // Well within the default connect timeout (5 s): a probe must not wait for a
            // server connection its own other probe holds.
            ensure!(
                waited < Duration::from_secs(3),
                "{mode:?} pooling, pool {pool_size}: refused only after {waited:?}"
            );
            println!("{mode:?} pooling, pool {pool_size}: refused after {waited:?}: {message}");
            Ok(())
        }
        Ok(Err(other)) => {
            bail!("{mode:?} pooling, pool {pool_size}: failed, but not as a pooler: {other}")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_is_refused_with_one_server_connection() -> Result<()> {
    assert_refused(PoolMode::Transaction, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_is_refused_with_several_server_connections() -> Result<()> {
    assert_refused(PoolMode::Transaction, 4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_pooling_is_refused() -> Result<()> {
    assert_refused(PoolMode::Statement, 4).await
}

/// A pooler that puts a server connection back without resetting it (PgBouncer with an empty
/// `server_reset_query`; its default `DISCARD ALL` releases advisory locks) hands the next
/// client the advisory locks the last one held when it disconnected, and its prepared
/// statements. Had a holder session kept such a lock, nobody else could take it while that
/// client lived, and its own acquire would succeed without excluding anyone; sqlx's prepared
/// statements would collide with the leftover ones ("sqlx_s_1 already exists"). Every
/// connection the backend opens discards them first, with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_session_left_with_locks_gives_them_back() -> Result<()> {
    for leftover_statement in [false, true] {
        session_left_with_a_lock(leftover_statement).await?;
    }
    Ok(())
}

async fn session_left_with_a_lock(leftover_statement: bool) -> Result<()> {
    use sqlx::Connection;
    let server = common::server().await?;
    let bouncer = tokio::task::spawn_blocking(move || {
        PgBouncer::start_with_reset(server, PoolMode::Session, 4, Some(""))
    })
    .await??;
    let direct = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&server.url())
        .await?;
    let key = common::unique("left-by-a-pooler");
    let namespace = lock_postgres::PostgresConfig::default().namespace;
    let hash = lock_postgres::advisory_key(&namespace, &key);
    // A client that held the lock and disconnected: its server connection, the only one
    // the pooler has opened, goes back to the pool still holding it.
    let mut gone = sqlx::PgConnection::connect(&bouncer.url()).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SELECT pg_advisory_lock({hash})"
    )))
    .execute(&mut gone)
    .await?;
    if leftover_statement {
        // A named prepared statement (`sqlx_s_1`), as every sqlx client leaves one.
        sqlx::query("SELECT $1::int4")
            .bind(1)
            .execute(&mut gone)
            .await?;
    }
    gone.close().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(
        common::advisory_held(&direct, hash).await?,
        "the pooler reset the server connection after all: this test shows nothing"
    );
    // The next client of the pooler gets that server connection first.
    let next = PostgresBackend::connect(&bouncer.url())
        .await
        .with_context(|| {
            format!("connecting after a client left (statement left: {leftover_statement})")
        })?;
    let elsewhere = PostgresBackend::connect(&server.url()).await?;
    let lock_key = lock_core::LockKey::new(key.clone())?;
    let ttl = Duration::from_secs(30);
    let attempt = lock_core::LockBackend::try_acquire(&elsewhere, &lock_key, ttl).await?;
    let lock_core::Attempt::Acquired(lease) = attempt else {
        bail!(
            "a lock left on a pooled server session stayed held after the next client \
             connected (statement left: {leftover_statement}): {attempt:?}"
        );
    };
    // And the next client is excluded while it is held elsewhere.
    let theirs = lock_core::LockBackend::try_acquire(&next, &lock_key, ttl).await?;
    ensure!(
        matches!(theirs, lock_core::Attempt::Held { .. }),
        "the pooler's next client took a lock held elsewhere: {theirs:?}"
    );
    lock_core::LockBackend::release(&elsewhere, &lease).await?;
    Ok(())
}
