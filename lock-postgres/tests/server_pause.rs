//! The conformance case `server_pause_fires_lost` on a PostgreSQL server of its own: the
//! conformance binary shares one server between its cases, so it cannot freeze that one.

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
