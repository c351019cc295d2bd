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
                !error.is_retryable(),
                "{url}: database 99 reported as retryable: {error}"
            ),
            Ok(_) => bail!("{url}: connected to database 99 of 16"),
        }
    }
    Ok(())
}
