//! TLS and credentials against real `redis-server` processes that speak TLS only (`--port 0
//! --tls-port N`), with a CA and certificates made at test time (`lock_harness::tls`): the
//! conformance suite over TLS (one server with a client certificate and an ACL user; Redlock
//! over 3 with a password, trusting the CA through the builder), and the refusals: an
//! untrusted server certificate, a missing client certificate, a wrong password (at connect
//! and after a password change), TLS spoken by one side only.
#![cfg(feature = "tls")]

mod common;

use anyhow::{Result, bail, ensure};
use async_trait::async_trait;
use conformance_tests::{BackendFactory, ServerFaults};
use lock_core::{LockBackend, LockError, LockKey, Locker, RefusalKind};
use lock_harness::TcpProxy;
use lock_harness::redis::RedisServer;
use lock_harness::tls::TestPki;
use lock_redis::{KeyScheme, RedisOptions, RedisTls, RedlockBackend};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const USER: &str = "locker";
const PASSWORD: &str = "s3cret pass";

/// `tls_ca`, `tls_cert` and `tls_key` URL parameters for `pki` (client certificate included
/// when `client_cert`).
fn tls_params(pki: &TestPki, ca: &std::path::Path, client_cert: bool) -> String {
    let mut query = format!("tls_ca={}", ca.display());
    if client_cert {
        query.push_str(&format!(
            "&tls_cert={}&tls_key={}",
            pki.client.cert_path.display(),
            pki.client.key_path.display()
        ));
    }
    query
}

/// TLS servers behind proxies. One server: an ACL user, a client certificate required, the
/// TLS files given as URL parameters. Several (Redlock): the default user with a password,
/// client certificates optional and none sent, the CA given through [`RedisTls`].
struct TlsFactory {
    pki: TestPki,
    servers: Vec<RedisServer>,
    clients: Vec<redis::aio::MultiplexedConnection>,
    scheme: KeyScheme,
}

impl TlsFactory {
    async fn start(nodes: usize) -> Result<Self> {
        let pki = TestPki::generate()?;
        let mut servers = Vec::with_capacity(nodes);
        let mut clients = Vec::with_capacity(nodes);
        for _ in 0..nodes {
            let builder = RedisServer::builder().proxy(true).tls(&pki);
            let builder = if nodes == 1 {
                builder.require_client_cert(true).user(USER, PASSWORD)
            } else {
                builder.password(PASSWORD)
            };
            let server = builder.start()?;
            clients.push(server.client()?.get_multiplexed_async_connection().await?);
            servers.push(server);
        }
        Ok(TlsFactory {
            pki,
            servers,
            clients,
            scheme: KeyScheme::new(RedisOptions::default_prefix(), 0)?,
        })
    }
}

#[async_trait]
impl BackendFactory for TlsFactory {
    fn name(&self) -> String {
        match self.servers.len() {
            1 => "redis-tls".into(),
            n => format!("redlock-tls-{n}"),
        }
    }

    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        if let [server] = self.servers.as_slice() {
            // `url()` is rediss://locker:s3cret%20pass@<proxy>/0.
            let url = format!(
                "{}?{}",
                server.url(),
                tls_params(&self.pki, &self.pki.ca.cert_path, true)
            );
            ensure!(url.starts_with("rediss://locker:"), "unexpected URL {url}");
            return Ok(lock_redis::connect(&url).await?);
        }
        let hosts: Vec<String> = self
            .servers
            .iter()
            .map(|server| server.client_addr().to_string())
            .collect();
        let url = format!("redlocks://:s3cret%20pass@{}/0", hosts.join(","));
        let options =
            RedisOptions::default().tls(RedisTls::default().ca_file(&self.pki.ca.cert_path));
        Ok(Arc::new(RedlockBackend::connect_with(&url, options).await?))
    }

    /// Read on the servers directly (over TLS): held when a quorum has the lock key.
    async fn is_held(&self, key: &LockKey) -> Result<Option<bool>> {
        let lock_key = self.scheme.lock_key(key);
        let mut holding = 0;
        for client in &self.clients {
            let exists: bool = redis::cmd("EXISTS")
                .arg(&lock_key)
                .query_async(&mut client.clone())
                .await?;
            holding += usize::from(exists);
        }
        Ok(Some(holding > self.servers.len() / 2))
    }

    /// One server: the lock key and the fair queue's entries (Redlock has no queue).
    async fn contenders(&self, key: &LockKey) -> Result<Option<usize>> {
        let [client] = self.clients.as_slice() else {
            return Ok(None);
        };
        Ok(Some(
            common::contenders(&mut client.clone(), &self.scheme, key).await?,
        ))
    }

    fn faults(&self) -> Option<&dyn ServerFaults> {
        Some(self)
    }
}

/// Faults hit every node; the proxies forward the TLS bytes unchanged.
#[async_trait]
impl ServerFaults for TlsFactory {
    async fn pause(&self) -> Result<()> {
        self.servers.iter().try_for_each(RedisServer::pause)
    }

    async fn resume(&self) -> Result<()> {
        self.servers.iter().try_for_each(RedisServer::resume)
    }

    async fn cut(&self) -> Result<()> {
        self.each_proxy(lock_harness::TcpProxy::cut)
    }

    async fn blackhole(&self) -> Result<()> {
        self.each_proxy(lock_harness::TcpProxy::blackhole)
    }

    async fn heal(&self) -> Result<()> {
        self.each_proxy(lock_harness::TcpProxy::heal)
    }

    async fn delay_answers(&self, delay: std::time::Duration) -> Result<()> {
        self.each_proxy(|proxy| proxy.set_delays(std::time::Duration::ZERO, delay))
    }

    async fn forget_connections(&self) -> Result<()> {
        self.each_proxy(lock_harness::TcpProxy::forget_flows)
    }

    /// One server, killed and started again without persistence. Not for Redlock (its suite
    /// skips the case, with the reason).
    async fn restart(&self) -> Result<()> {
        match self.servers.as_slice() {
            [server] => server.restart(),
            _ => bail!("Redlock's suite skips the restart case"),
        }
    }
}

impl TlsFactory {
    fn each_proxy(&self, action: impl Fn(&lock_harness::TcpProxy)) -> Result<()> {
        for server in &self.servers {
            match server.proxy() {
                Some(proxy) => action(proxy),
                None => bail!("server started without a proxy"),
            }
        }
        Ok(())
    }
}

mod single_tls {
    conformance_tests::conformance_suite! {
        factory = super::TlsFactory::start(1),
    }
}

mod redlock3_tls {
    conformance_tests::conformance_suite! {
        factory = super::TlsFactory::start(3),
        skip = {
            fences_increase_across_a_server_restart: "Redlock fences need the nodes to keep their counters (README, Fencing tokens on Redlock): a node restarted without persistence, in the next quorum with a node that lagged behind the last grant, can repeat a fence; run Redlock nodes with persistence",
            fair_queue_serves_waiters_in_arrival_order: "Redlock has no fair queue: a queue on each node cannot agree on one order (Capabilities::fair_queue is false; see README, Redlock)",
            semaphore_never_exceeds_permits: "Redlock offers no semaphores (Capabilities::semaphores is false; see README, Redlock)",
            semaphore_dead_holder_permit_returns: "Redlock offers no semaphores (Capabilities::semaphores is false; see README, Redlock)",
            semaphore_limits_must_agree: "Redlock offers no semaphores (Capabilities::semaphores is false; see README, Redlock)",
            semaphore_loss_and_cancel: "Redlock offers no semaphores (Capabilities::semaphores is false; see README, Redlock)",
            semaphore_release_wakes_waiter: "Redlock offers no semaphores (Capabilities::semaphores is false; see README, Redlock)",
        },
    }
}

/// `url` must be refused with `kind`, non-retryable, within `within`; returns the message.
async fn expect_refused(
    url: &str,
    options: RedisOptions,
    kind: RefusalKind,
    within: Duration,
) -> Result<String> {
    let started = Instant::now();
    let result = lock_redis::connect_with(url, options).await;
    let took = started.elapsed();
    let error = match result {
        Err(error) => error,
        Ok(_) => bail!("{url}: connected, expected a refusal ({kind})"),
    };
    match &error {
        LockError::Refused { kind: got, .. } if *got == kind => {}
        other => bail!("{url}: expected Refused {{ kind: {kind:?} }}, got {other:?}"),
    }
    ensure!(
        !error.is_retryable(),
        "{url}: refusal reported as retryable"
    );
    ensure!(took < within, "{url}: refused only after {took:?}");
    Ok(error.to_string())
}

/// A server whose certificate the client's roots do not include is refused as `Certificate`:
/// with an unrelated CA (`tls_ca`, or the builder), with the default roots, on one server
/// and on Redlock (not folded into "only 0 of 3 nodes answered").
#[tokio::test]
async fn untrusted_server_certificate_is_refused() -> Result<()> {
    let pki = TestPki::generate()?;
    let server = RedisServer::builder().tls(&pki).start()?;
    let addr = server.server_addr();
    let within = Duration::from_secs(1);
    let other_ca = pki.other_ca.cert_path.display();
    let message = expect_refused(
        &format!("rediss://{addr}/0?tls_ca={other_ca}&connect_timeout_ms=1000"),
        RedisOptions::default(),
        RefusalKind::Certificate,
        within,
    )
    .await?;
    ensure!(
        message.contains("tls_ca"),
        "message does not name tls_ca: {message}"
    );
    println!("wrong CA: {message}");
    expect_refused(
        &format!("rediss://{addr}/0?connect_timeout_ms=1000"),
        RedisOptions::default(),
        RefusalKind::Certificate,
        within,
    )
    .await?;
    // Redlock refuses a server listed twice: two more addresses for the same one.
    let (second, third) = (TcpProxy::start(addr)?, TcpProxy::start(addr)?);
    let (second, third) = (second.addr(), third.addr());
    expect_refused(
        &format!("redlocks://{addr},{second},{third}/0?connect_timeout_ms=1000"),
        RedisOptions::default().tls(RedisTls::default().ca_pem(pki.other_ca.cert_pem.clone())),
        RefusalKind::Certificate,
        within,
    )
    .await?;
    // The right CA connects; with feature `tls-insecure`, `#insecure` (no checks) does too.
    let good = format!("rediss://{addr}/0?tls_ca={}", pki.ca.cert_path.display());
    let locker = Locker::from_arc(lock_redis::connect(&good).await?);
    locker.acquire("tls:ca").await?.release().await?;
    #[cfg(feature = "tls-insecure")]
    lock_redis::connect(&format!("rediss://{addr}/0#insecure")).await?;
    Ok(())
}

/// `tls-auth-clients yes`: without a client certificate the server refuses the handshake
/// (`Certificate`, naming `tls_cert`); with one its CA signed, the client connects and locks.
#[tokio::test]
async fn client_certificate_is_required_and_accepted() -> Result<()> {
    let pki = TestPki::generate()?;
    let server = RedisServer::builder()
        .tls(&pki)
        .require_client_cert(true)
        .start()?;
    let addr = server.server_addr();
    let message = expect_refused(
        &format!(
            "rediss://{addr}/0?{}",
            tls_params(&pki, &pki.ca.cert_path, false)
        ),
        RedisOptions::default(),
        RefusalKind::Certificate,
        Duration::from_secs(1),
    )
    .await?;
    ensure!(
        message.contains("tls_cert"),
        "message does not name tls_cert: {message}"
    );
    println!("no client certificate: {message}");
    let options = RedisOptions::default().tls(
        RedisTls::default()
            .ca_file(&pki.ca.cert_path)
            .client_cert_pem(pki.client.cert_pem.clone(), pki.client.key_pem.clone()),
    );
    let locker =
        Locker::from_arc(lock_redis::connect_with(&format!("rediss://{addr}/0"), options).await?);
    locker.acquire("tls:client-cert").await?.release().await?;
    Ok(())
}

/// A wrong password or user is `Refused { Authentication }` at once (the connect timeout is
/// 1 s; it is not retried until then), over TLS and on a plain port, single and Redlock. A
/// password changed under a running backend: the Locker's next acquire, allowed to wait
/// 10 s, returns the refusal within the connect timeout instead of retrying.
#[tokio::test]
async fn wrong_password_is_refused_and_not_retried() -> Result<()> {
    let pki = TestPki::generate()?;
    let server = RedisServer::builder()
        .tls(&pki)
        .user(USER, PASSWORD)
        .start()?;
    let plain = RedisServer::builder().password(PASSWORD).start()?;
    let addr = server.server_addr();
    let params = format!(
        "{}&connect_timeout_ms=1000",
        tls_params(&pki, &pki.ca.cert_path, false)
    );
    let within = Duration::from_secs(1);
    // Redlock refuses a server listed twice: two more addresses for the same one.
    let (second, third) = (TcpProxy::start(addr)?, TcpProxy::start(addr)?);
    let (second, third) = (second.addr(), third.addr());
    let message = expect_refused(
        &format!("rediss://{USER}:wrong@{addr}/0?{params}"),
        RedisOptions::default(),
        RefusalKind::Authentication,
        within,
    )
    .await?;
    ensure!(
        message.contains("password"),
        "message does not name the password: {message}"
    );
    println!("wrong password: {message}");
    for url in [
        format!("rediss://nobody:{PASSWORD}@{addr}/0?{params}"),
        format!("rediss://{addr}/0?{params}"),
        format!("redlocks://{USER}:wrong@{addr},{second},{third}/0?{params}"),
        format!(
            "redis://:wrong@{}/0?connect_timeout_ms=1000",
            plain.server_addr()
        ),
    ] {
        expect_refused(
            &url,
            RedisOptions::default(),
            RefusalKind::Authentication,
            within,
        )
        .await?;
    }

    // The password changes while a backend runs; its connections are closed.
    let url = format!("{}?{params}", server.url());
    let locker = Locker::from_arc(lock_redis::connect(&url).await?);
    locker.acquire("tls:before").await?.release().await?;
    change_password(&server).await?;
    let started = Instant::now();
    let result = locker
        .lock("tls:after")
        .wait(Duration::from_secs(10))
        .acquire()
        .await;
    let took = started.elapsed();
    match result {
        Err(LockError::Refused {
            kind: RefusalKind::Authentication,
            ..
        }) => {}
        other => bail!("after the password change: expected Refused Authentication, got {other:?}"),
    }
    ensure!(took < Duration::from_secs(3), "the refusal took {took:?}");
    Ok(())
}

/// Changes `USER`'s password on `server` and closes its connections.
async fn change_password(server: &RedisServer) -> Result<()> {
    let mut admin = server.client()?.get_multiplexed_async_connection().await?;
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(USER)
        .arg("resetpass")
        .arg(">changed")
        .query_async(&mut admin)
        .await?;
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("USER")
        .arg(USER)
        .query_async(&mut admin)
        .await?;
    Ok(())
}

/// Redlock: the password changes on every node under a running backend. Each node now
/// refuses us, so no quorum is possible: the Locker's acquire (allowed to wait 10 s) returns
/// `Refused { Authentication }` at once, not a retryable "no quorum" it would retry.
#[tokio::test]
async fn redlock_password_change_is_a_refusal() -> Result<()> {
    let pki = TestPki::generate()?;
    let servers = (0..3)
        .map(|_| {
            RedisServer::builder()
                .tls(&pki)
                .user(USER, PASSWORD)
                .start()
        })
        .collect::<Result<Vec<_>>>()?;
    let hosts: Vec<String> = servers
        .iter()
        .map(|s| s.server_addr().to_string())
        .collect();
    let url = format!(
        "redlocks://{USER}:s3cret%20pass@{}/0?{}",
        hosts.join(","),
        tls_params(&pki, &pki.ca.cert_path, false)
    );
    let locker = Locker::from_arc(lock_redis::connect(&url).await?);
    locker.acquire("tls:before").await?.release().await?;
    for server in &servers {
        change_password(server).await?;
    }
    let started = Instant::now();
    let result = locker
        .lock("tls:after")
        .wait(Duration::from_secs(10))
        .acquire()
        .await;
    let took = started.elapsed();
    match result {
        Err(LockError::Refused {
            kind: RefusalKind::Authentication,
            message,
            ..
        }) => println!("redlock after the password change: {message}"),
        other => bail!("expected Refused Authentication, got {other:?} after {took:?}"),
    }
    ensure!(took < Duration::from_secs(3), "the refusal took {took:?}");
    Ok(())
}

/// TLS spoken by one side only gives a clear error within the connect timeout, never a
/// hang: a plain client on a TLS port is reset at once (retryable: a reset can be transient;
/// the message says to use rediss://); a TLS client on a plain port hears nothing (the server
/// waits for the end of a line) until the connect timeout, and the message says so.
#[tokio::test]
async fn tls_on_one_side_only_is_a_clear_bounded_error() -> Result<()> {
    let pki = TestPki::generate()?;
    let tls = RedisServer::builder().tls(&pki).start()?;
    let plain = RedisServer::start()?;
    let cases = [
        (
            format!("redis://{}/0?connect_timeout_ms=1000", tls.server_addr()),
            "use rediss://",
        ),
        (
            format!(
                "rediss://{}/0?connect_timeout_ms=1000&tls_ca={}",
                plain.server_addr(),
                pki.ca.cert_path.display()
            ),
            "use redis://",
        ),
    ];
    for (url, advice) in cases {
        let started = Instant::now();
        let result = lock_redis::connect(&url).await;
        let took = started.elapsed();
        let error = match result {
            Ok(_) => bail!("{url}: connected"),
            Err(error) => error,
        };
        println!("{url}: {error}");
        ensure!(
            matches!(
                error,
                LockError::Backend { .. }
                    | LockError::Refused {
                        kind: RefusalKind::Tls,
                        ..
                    }
            ),
            "{url}: {error:?}"
        );
        ensure!(
            error.to_string().contains(advice),
            "{url}: message lacks {advice:?}: {error}"
        );
        ensure!(took < Duration::from_millis(1500), "{url}: took {took:?}");
    }
    Ok(())
}

/// TLS settings are checked before anything connects: they need a TLS URL, a certificate
/// needs its key, a missing file is named.
#[tokio::test]
async fn tls_settings_are_checked() -> Result<()> {
    let pki = TestPki::generate()?;
    let ca = pki.ca.cert_path.display();
    let cert = pki.client.cert_path.display();
    // A CA file without a certificate in it (the redis crate would make it an empty trust
    // store and fail every handshake as "certificate not accepted").
    let garbage = pki.ca.cert_path.with_file_name("not-a-certificate.pem");
    std::fs::write(&garbage, "not a certificate\n")?;
    let garbage = garbage.display();
    for (url, options) in [
        (
            format!("rediss://127.0.0.1:1/0?tls_ca={garbage}"),
            RedisOptions::default(),
        ),
        (
            format!("redis://127.0.0.1:1/0?tls_ca={ca}"),
            RedisOptions::default(),
        ),
        // A certificate where the key belongs, and a key where the CA belongs.
        (
            format!("rediss://127.0.0.1:1/0?tls_ca={ca}&tls_cert={cert}&tls_key={cert}"),
            RedisOptions::default(),
        ),
        (
            format!(
                "rediss://127.0.0.1:1/0?tls_ca={}",
                pki.client.key_path.display()
            ),
            RedisOptions::default(),
        ),
        (
            "redlock://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3/0".to_string(),
            RedisOptions::default().tls(RedisTls::default().ca_file("/x")),
        ),
        (
            format!("rediss://127.0.0.1:1/0?tls_cert={cert}"),
            RedisOptions::default(),
        ),
        (
            "rediss://127.0.0.1:1/0?tls_ca=/no/such/ca.crt".to_string(),
            RedisOptions::default(),
        ),
        (
            "rediss://127.0.0.1:1/0#other".to_string(),
            RedisOptions::default(),
        ),
        (
            "redis://127.0.0.1:1/0#insecure".to_string(),
            RedisOptions::default(),
        ),
    ] {
        match lock_redis::connect_with(&url, options).await {
            Err(LockError::InvalidConfig(message)) => println!("{url}: {message}"),
            other => bail!("{url}: expected InvalidConfig, got {:?}", other.map(|_| ())),
        }
    }
    Ok(())
}
