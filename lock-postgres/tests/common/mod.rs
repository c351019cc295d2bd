//! Shared test setup: one PostgreSQL server per test binary (started on first use by
//! `lock_harness::postgres::shared`, stopped by the parent-death signal when the binary
//! exits) and a conformance factory giving each test fresh backends on it.

#![allow(dead_code)]

use anyhow::Result;
use async_trait::async_trait;
use conformance_tests::{BackendFactory, ServerFaults};
use lock_core::{LockBackend, LockKey};
use lock_harness::postgres::PostgresServer;
use lock_postgres::{PostgresBackend, PostgresConfig, advisory_key};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::sync::Arc;
use tokio::sync::OnceCell;

/// The test binary's server. With `RUST_LOG` set, the backend's traces go to the test's
/// output.
pub async fn server() -> Result<&'static PostgresServer> {
    conformance_tests::init_tracing();
    tokio::task::spawn_blocking(lock_harness::postgres::shared).await?
}

/// `name` made unique per run, so tests on the shared server never meet.
pub fn unique(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

/// A backend on `url` with `config`.
pub async fn backend_at(url: &str, config: PostgresConfig) -> Result<Arc<PostgresBackend>> {
    let options = PgConnectOptions::from_str(url)?;
    Ok(Arc::new(
        PostgresBackend::with_options(options, config).await?,
    ))
}

/// The default configuration with `application_name` prefix `app`.
pub fn named(app: &str) -> PostgresConfig {
    PostgresConfig {
        application_name: app.to_owned(),
        ..PostgresConfig::default()
    }
}

/// Whether advisory key `hash` is held by any session, read from `pg_locks`.
pub async fn advisory_held(pool: &PgPool, hash: i64) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND objsubid = 1 AND ((classid::int8 << 32) | objid::int8) = $1)",
    )
    .bind(hash)
    .fetch_one(pool)
    .await?)
}

/// Granted locks on the waiter key of advisory key `hash` (a backend's waiter mark, a shared
/// lock on the pair, which makes releases of the key NOTIFY), read from `pg_locks`.
pub async fn waiter_marks(pool: &PgPool, hash: i64) -> Result<i64> {
    let (high, low) = lock_postgres::waiter_key(hash);
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND objsubid = 2 AND classid::int8 = ($1::int8 & 4294967295) \
         AND objid::int8 = ($2::int8 & 4294967295)",
    )
    .bind(i64::from(high))
    .bind(i64::from(low))
    .fetch_one(pool)
    .await?)
}

/// Makes the URL backends connect with from the proxy's address.
pub type ClientUrl = Box<dyn Fn(std::net::SocketAddr) -> String + Send + Sync>;

/// Fresh backends on the shared server; `is_held` reads `pg_locks` on its own connection.
pub struct PgFactory {
    /// The server itself (the inspector connects here).
    pub url: String,
    pub config: PostgresConfig,
    inspector: OnceCell<PgPool>,
    /// This factory's backends connect through it, so cutting it touches no other test.
    proxy: lock_harness::TcpProxy,
    /// The backends' URL through the proxy (default [`PostgresServer::url_for`]).
    client_url: ClientUrl,
}

impl PgFactory {
    pub async fn start() -> Result<Self> {
        let server = server().await?;
        Self::start_through(server.addr()).await
    }

    /// Backends connect to `upstream` (through this factory's proxy): the server itself, or
    /// a pooler in front of it. The inspector always reads the server directly.
    pub async fn start_through(upstream: std::net::SocketAddr) -> Result<Self> {
        let server = server().await?;
        Self::custom(upstream, server.url(), Box::new(PostgresServer::url_for))
    }

    /// Backends connect to `upstream` through the proxy with the URL `client_url` makes of
    /// the proxy's address (credentials, TLS); the inspector connects with `inspector_url`.
    pub fn custom(
        upstream: std::net::SocketAddr,
        inspector_url: String,
        client_url: ClientUrl,
    ) -> Result<Self> {
        Ok(PgFactory {
            url: inspector_url,
            config: PostgresConfig::default(),
            inspector: OnceCell::new(),
            proxy: lock_harness::TcpProxy::start(upstream)?,
            client_url,
        })
    }

    pub async fn inspector(&self) -> Result<&PgPool> {
        self.inspector
            .get_or_try_init(|| async {
                let options = PgConnectOptions::from_str(&self.url)?.application_name("inspector");
                Ok::<_, anyhow::Error>(
                    PgPoolOptions::new()
                        .max_connections(2)
                        .connect_with(options)
                        .await?,
                )
            })
            .await
    }
}

#[async_trait]
impl BackendFactory for PgFactory {
    fn name(&self) -> String {
        "postgres".into()
    }

    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        let options = PgConnectOptions::from_str(&(self.client_url)(self.proxy.addr()))?;
        Ok(Arc::new(
            PostgresBackend::with_options(options, self.config.clone()).await?,
        ))
    }

    async fn is_held(&self, key: &LockKey) -> Result<Option<bool>> {
        let hash = advisory_key(&self.config.namespace, key.as_str());
        Ok(Some(advisory_held(self.inspector().await?, hash).await?))
    }

    fn faults(&self) -> Option<&dyn ServerFaults> {
        Some(self)
    }
}

/// Connection faults through this factory's own proxy. The server is shared by every test of
/// the binary, so it is never paused here (`server_pause_fires_lost` is skipped).
#[async_trait]
impl ServerFaults for PgFactory {
    async fn pause(&self) -> Result<()> {
        anyhow::bail!("the shared test server is not paused: it would stall the other tests")
    }

    async fn resume(&self) -> Result<()> {
        Ok(())
    }

    async fn cut(&self) -> Result<()> {
        self.proxy.cut();
        Ok(())
    }

    async fn blackhole(&self) -> Result<()> {
        self.proxy.blackhole();
        Ok(())
    }

    async fn delay_answers(&self, delay: std::time::Duration) -> Result<()> {
        self.proxy.set_delays(std::time::Duration::ZERO, delay);
        Ok(())
    }

    async fn heal(&self) -> Result<()> {
        self.proxy.heal();
        Ok(())
    }

    async fn forget_connections(&self) -> Result<()> {
        self.proxy.forget_flows();
        Ok(())
    }
}
