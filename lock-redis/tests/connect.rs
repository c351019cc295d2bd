//! `lock_redis::connect`: typed errors, quickly, for bad URLs and unreachable servers.

use anyhow::{Result, bail, ensure};
use lock_core::LockError;
use lock_harness::redis::RedisServer;
use lock_harness::{TcpProxy, free_port};
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test]
async fn malformed_urls_are_invalid_config() -> Result<()> {
    for url in [
        "",
        "redis//h",
        "http://127.0.0.1:1/0",
        "redis://127.0.0.1:1/notadb",
        "redis://h1:1,h2:2/0",
        "redis://127.0.0.1:1/0?prefix=%7Bx",
        "redlock:///0",
    ] {
        match lock_redis::connect(url).await {
            Err(LockError::InvalidConfig(_)) => {}
            other => bail!("{url:?}: expected InvalidConfig, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn refused_and_silent_servers_fail_fast_and_retryable() -> Result<()> {
    // Nothing listens on a fresh free port: connection refused.
    let refused = format!("redis://127.0.0.1:{}/0", free_port()?);
    // A proxy that accepts and never forwards: a silent server.
    let server = RedisServer::start()?;
    let silent = TcpProxy::start(server.server_addr())?;
    silent.blackhole();
    let silent = format!("redis://{}/0?connect_timeout_ms=300", silent.addr());
    let redlock = format!(
        "redlock://127.0.0.1:{},127.0.0.1:{},{}/0?connect_timeout_ms=300",
        free_port()?,
        free_port()?,
        server.server_addr()
    );
    for url in [refused, silent, redlock] {
        let started = Instant::now();
        match lock_redis::connect(&url).await {
            Err(error @ LockError::Backend { .. }) => {
                ensure!(error.is_retryable(), "{url}: not retryable: {error}")
            }
            other => bail!("{url}: expected Backend error, got {other:?}"),
        }
        let took = started.elapsed();
        ensure!(took < Duration::from_millis(2500), "{url}: took {took:?}");
    }
    // One of three Redlock nodes down at connect: a quorum answers, so it connects.
    let second = RedisServer::start()?;
    let url = format!(
        "redlock://127.0.0.1:{},{},{}/0?connect_timeout_ms=300",
        free_port()?,
        server.server_addr(),
        second.server_addr()
    );
    lock_redis::connect(&url).await?;
    Ok(())
}

/// A wrong password is not worth retrying: it must not come back as retryable.
#[tokio::test]
async fn wrong_password_is_not_retryable() -> Result<()> {
    let server = RedisServer::start()?;
    let mut admin = server.client()?.get_multiplexed_async_connection().await?;
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("locker")
        .arg("on")
        .arg(">right")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut admin)
        .await?;
    let url = format!("redis://locker:wrong@{}/0", server.server_addr());
    let started = Instant::now();
    match lock_redis::connect(&url).await {
        Err(error) => ensure!(
            !error.is_retryable(),
            "wrong password reported as retryable: {error}"
        ),
        Ok(_) => bail!("connected with a wrong password"),
    }
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// A database number the servers do not have is a configuration error, on one server and on
/// Redlock alike: not retryable, and not reported as an outage ("only 0 of 3 nodes
/// answered", retryable, as Redlock said before).
#[tokio::test]
async fn database_out_of_range_is_not_retryable_on_redlock_either() -> Result<()> {
    let servers = [
        RedisServer::start()?,
        RedisServer::start()?,
        RedisServer::start()?,
    ];
    let one = format!("redis://{}/99", servers[0].server_addr());
    let all = servers
        .iter()
        .map(|server| server.server_addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let redlock = format!("redlock://{all}/99");
    for url in [one, redlock] {
        match lock_redis::connect(&url).await {
            Err(error) => ensure!(
                !error.is_retryable() && error.to_string().contains("database"),
                "{url}: database 99 reported as retryable, or not named: {error}"
            ),
            Ok(_) => bail!("{url}: connected to database 99 of 16"),
        }
    }
    Ok(())
}

/// Captures what a `tracing` subscriber writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// Captures the WARN events of this thread (tests on a current-thread runtime: the checks'
/// tasks run on this thread, under this subscriber) until the guard drops.
fn capture_warnings() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// Gives the server behind `client` a `maxmemory` and a policy that evicts keys with a TTL.
async fn make_evicting(client: redis::Client) -> Result<()> {
    let mut admin = client.get_multiplexed_async_connection().await?;
    for (name, value) in [("maxmemory", "100mb"), ("maxmemory-policy", "volatile-lru")] {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut admin)
            .await?;
    }
    Ok(())
}

/// Waits (3 s at most) until `captured` holds `count` eviction warnings.
async fn warned(captured: &Captured, count: usize, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    while captured.text().matches("may evict").count() < count {
        ensure!(
            Instant::now() < deadline,
            "no warning about {what}: {:?}",
            captured.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A server that may evict lock keys (a `maxmemory` with a `volatile-*` policy picks among
/// keys with a TTL, which every lock key has) is named in a warning when the backend
/// connects; the default server (no `maxmemory`) is not.
#[tokio::test]
async fn a_server_that_may_evict_locks_is_warned_about() -> Result<()> {
    let (captured, _default) = capture_warnings();
    let plain = RedisServer::start()?;
    let _backend = lock_redis::connect(&plain.url()).await?;
    let evicting = RedisServer::start()?;
    make_evicting(evicting.client()?).await?;
    let _evicting_backend = lock_redis::connect(&evicting.url()).await?;
    warned(&captured, 1, "an evicting server").await?;
    let text = captured.text();
    ensure!(
        text.matches("may evict").count() == 1
            && text.contains(&evicting.server_addr().to_string()),
        "the warning must name the evicting server only: {text}"
    );
    Ok(())
}

/// The same warning for a Sentinel master (the first, and each one after a failover) and for
/// a Redlock node that connects only after the quorum did (before: only servers the backend
/// connected to by URL at once were looked at).
#[tokio::test(flavor = "current_thread")]
async fn evicting_sentinel_masters_and_late_redlock_nodes_are_warned_about() -> Result<()> {
    let (captured, _default) = capture_warnings();
    let set = lock_harness::redis_sentinel::SentinelSet::builder()
        .wait_for_sentinels(true)
        .start()
        .await?;
    for index in 0..set.node_addrs().len() {
        make_evicting(set.node_client(index)?).await?;
    }
    let _sentinel = lock_redis::connect(&set.url()).await?;
    warned(&captured, 1, "an evicting Sentinel master").await?;

    let plain = [RedisServer::start()?, RedisServer::start()?];
    let late = RedisServer::builder().proxy(true).start()?;
    make_evicting(late.client()?).await?;
    let proxy = late.proxy().expect("started with a proxy");
    proxy.blackhole();
    let urls = vec![plain[0].url(), plain[1].url(), late.url()];
    let redlock =
        lock_redis::RedlockBackend::connect_nodes(&urls, lock_redis::RedisOptions::default())
            .await?;
    proxy.heal();
    let key = lock_core::LockKey::new(format!("late-{}", free_port()?))?;
    let lease = lock_core::LockBackend::try_acquire(&redlock, &key, Duration::from_secs(5))
        .await?
        .into_lease();
    warned(&captured, 2, "a Redlock node connected after the quorum").await?;
    if let Some(lease) = lease {
        lock_core::LockBackend::release(&redlock, &lease).await?;
    }
    ensure!(
        captured.text().matches("may evict").count() == 2,
        "one warning per evicting server: {}",
        captured.text()
    );
    Ok(())
}
