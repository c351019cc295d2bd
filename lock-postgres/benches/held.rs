//! `cargo bench -p lock-postgres --bench held`: 10,000 locks held with auto-renew on a
//! PostgreSQL server started here, the process's CPU share and memory per lock, beside the
//! floor from the same run: sqlx alone sending one statement per renewal (what a renewal
//! sends: it sets the holder session's idle timeout) at the same rate over 8 connections,
//! the backend's default holder sessions. See `conformance_tests::load`.

use anyhow::Result;
use conformance_tests::load::{
    HeldLoad, hold_many, paced_cpu_share, patterns, print_header, print_row,
};
use lock_harness::postgres::PostgresServer;
use sqlx::postgres::PgPoolOptions;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if std::env::args().any(|arg| arg == "--list") {
        return Ok(());
    }
    let load = HeldLoad::from_env()?;
    let server = tokio::task::spawn_blocking(PostgresServer::start).await??;
    print_header(load);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .min_connections(8)
        .connect(&server.url())
        .await?;
    for pattern in patterns() {
        let load = load.with_pattern(pattern);
        let locker = lock_core::Locker::from_arc(lock_postgres::connect(&server.url()).await?);
        let figures = hold_many(&locker, load).await?;
        drop(locker);
        let floor = paced_cpu_share(load, |_| {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT set_config('idle_session_timeout', '30100', false)")
                    .execute(&pool)
                    .await?;
                Ok(())
            }
        })
        .await?;
        print_row("postgres", load, figures, Some(floor));
    }
    Ok(())
}
