//! The conformance cases that stop the server, each on a PostgreSQL server of its own: the
//! conformance binary shares one server between its cases, so it cannot freeze or crash that
//! one. `server_pause_fires_lost`, and `fences_increase_across_a_server_restart` on a server
//! that commits asynchronously (`synchronous_commit = off`, the WAL writer asleep for 10 s),
//! crashed by an immediate shutdown: what no flush forced out is lost.

use anyhow::Result;
use async_trait::async_trait;
use conformance_tests::{BackendFactory, ServerFaults};
use lock_core::LockBackend;
use lock_harness::postgres::PostgresServer;
use lock_postgres::{PostgresBackend, PostgresConfig};
use sqlx::postgres::PgConnectOptions;
use std::str::FromStr;
use std::sync::Arc;

struct DedicatedFactory {
    server: PostgresServer,
}

#[async_trait]
impl BackendFactory for DedicatedFactory {
    fn name(&self) -> String {
        "postgres (dedicated server)".into()
    }

    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        let options = PgConnectOptions::from_str(&self.server.url())?;
        Ok(Arc::new(
            PostgresBackend::with_options(options, PostgresConfig::default()).await?,
        ))
    }

    fn faults(&self) -> Option<&dyn ServerFaults> {
        Some(self)
    }
}

#[async_trait]
impl ServerFaults for DedicatedFactory {
    async fn pause(&self) -> Result<()> {
        self.server.pause()
    }
    async fn resume(&self) -> Result<()> {
        self.server.resume()
    }
    async fn cut(&self) -> Result<()> {
        anyhow::bail!("not used by this test")
    }
    async fn blackhole(&self) -> Result<()> {
        anyhow::bail!("not used by this test")
    }
    async fn heal(&self) -> Result<()> {
        Ok(())
    }
    async fn forget_connections(&self) -> Result<()> {
        anyhow::bail!("not used by this test")
    }
    /// Immediate shutdown (SIGQUIT: no checkpoint, unflushed WAL lost), then crash recovery.
    async fn restart(&self) -> Result<()> {
        self.server.kill()?;
        self.server.start_again()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_pause_fires_lost() {
    conformance_tests::run_case(
        "server_pause_fires_lost",
        async {
            let server = tokio::task::spawn_blocking(PostgresServer::start).await??;
            anyhow::Ok(DedicatedFactory { server })
        },
        |factory| async move { conformance_tests::cases::server_pause_fires_lost(&*factory).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fences_increase_across_a_server_restart() {
    conformance_tests::run_case(
        "fences_increase_across_a_server_restart",
        async {
            let server = tokio::task::spawn_blocking(|| {
                PostgresServer::start_with(&[
                    ("synchronous_commit", "off"),
                    ("wal_writer_delay", "10000"),
                ])
            })
            .await??;
            anyhow::Ok(DedicatedFactory { server })
        },
        |factory| async move {
            conformance_tests::cases::fences_increase_across_a_server_restart(&*factory).await
        },
    )
    .await;
}
