//! What the Sentinel set and the Cluster harnesses share: their TLS files, the harness's own
//! clients and queries, the readiness check of a freshly started node, and the TLS arguments
//! of `redis-server`.

use crate::process::ServerProcess;
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::timeout;

/// Bound on one query of the harness's own.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// TLS files of a set of nodes: server certificate and CA for every node, and the client
/// certificate the harness's own clients present.
#[cfg(feature = "redis-tls")]
#[derive(Clone, Debug)]
pub(crate) struct NodeTls {
    pub(crate) ca: crate::tls::PemPair,
    pub(crate) server: crate::tls::PemPair,
    pub(crate) client: crate::tls::PemPair,
}

/// Without TLS support nodes never have TLS files.
#[cfg(not(feature = "redis-tls"))]
pub(crate) type NodeTls = std::convert::Infallible;

/// `--port 0 --tls-port PORT` and the certificate files of a TLS-only `redis-server`;
/// `auth_clients` is `--tls-auth-clients` (`yes` or `optional`).
#[cfg(feature = "redis-tls")]
pub(crate) fn tls_server_args(
    command: &mut std::process::Command,
    port: u16,
    server: &crate::tls::PemPair,
    ca: &std::path::Path,
    auth_clients: &str,
) {
    command
        .arg("--port")
        .arg("0")
        .arg("--tls-port")
        .arg(port.to_string())
        .arg("--tls-cert-file")
        .arg(&server.cert_path)
        .arg("--tls-key-file")
        .arg(&server.key_path)
        .arg("--tls-ca-cert-file")
        .arg(ca)
        .arg("--tls-auth-clients")
        .arg(auth_clients);
}

/// The redis crate's rustls takes the process's default crypto provider; pick `ring` unless
/// something else already chose one.
#[cfg(feature = "redis-tls")]
pub(crate) fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A client of the harness's own for the node at `addr` (database 0; with TLS trusting the
/// test CA and presenting the test client certificate).
pub(crate) fn client_at(addr: SocketAddr, tls: Option<&NodeTls>) -> Result<redis::Client> {
    #[cfg(feature = "redis-tls")]
    if let Some(tls) = tls {
        install_crypto_provider();
        let certificates = redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: tls.client.cert_pem.clone().into_bytes(),
                client_key: tls.client.key_pem.clone().into_bytes(),
            }),
            root_cert: Some(tls.ca.cert_pem.clone().into_bytes()),
        };
        return redis::Client::build_with_tls(format!("rediss://{addr}/0"), certificates)
            .context("building a TLS redis client");
    }
    #[cfg(not(feature = "redis-tls"))]
    let _ = tls;
    redis::Client::open(format!("redis://{addr}/0")).context("building a redis client")
}

/// Connection settings without the `redis` crate's 500 ms response timeout: `WAIT` and a
/// loaded machine take longer; every query here has a bound of its own.
pub(crate) fn unbounded() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(Some(QUERY_TIMEOUT))
}

/// `cmd` on a fresh connection of `client`, bounded by [`QUERY_TIMEOUT`].
pub(crate) async fn query<T: redis::FromRedisValue>(
    client: &redis::Client,
    cmd: &mut redis::Cmd,
) -> Result<T> {
    let run = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&unbounded())
            .await?;
        cmd.query_async::<T>(&mut conn).await
    };
    match timeout(QUERY_TIMEOUT, run).await {
        Ok(result) => Ok(result?),
        Err(_) => bail!("no answer within {QUERY_TIMEOUT:?}"),
    }
}

/// Sends `PING`s (inline, or through a TLS client) until the process answers `PONG`, exits,
/// or `within` passes.
pub(crate) fn wait_for_ping(
    addr: SocketAddr,
    tls: Option<&NodeTls>,
    process: &mut ServerProcess,
    within: Duration,
) -> Result<()> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + within;
    loop {
        process.check_running()?;
        if tls.is_some() {
            let pong = client_at(addr, tls)
                .and_then(|client| {
                    Ok(client.get_connection_with_timeout(Duration::from_millis(500))?)
                })
                .and_then(|mut conn| Ok(redis::cmd("PING").query::<String>(&mut conn)?));
            if matches!(pong.as_deref(), Ok("PONG")) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!("{addr} did not answer PING over TLS within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let pong = (|| -> std::io::Result<bool> {
            let mut stream =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
            stream.set_read_timeout(Some(Duration::from_millis(500)))?;
            stream.write_all(b"PING\r\n")?;
            let mut reply = [0u8; 64];
            let read = stream.read(&mut reply)?;
            Ok(reply[..read].starts_with(b"+PONG"))
        })()
        .unwrap_or(false);
        if pong {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("{addr} did not answer PING within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
