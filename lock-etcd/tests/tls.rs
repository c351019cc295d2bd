//! etcd with TLS, client certificates and authentication (RBAC), all switched on by the
//! harness with certificates made at test time: the conformance suite over
//! `etcds://user:password@…?ca=…&cert=…&key=…` through the proxies (so the fault cases run),
//! and the refusals (untrusted server, wrong password, no permission, no client certificate,
//! TLS spoken by one side only) as `LockError::Refused`, each within the connect timeout.
//! Plus: a backend keeps working after its authentication token expired.

#![cfg(feature = "tls")]

use anyhow::{Context, Result, bail, ensure};
use async_trait::async_trait;
use conformance_tests::{BackendFactory, ServerFaults};
use lock_core::{LockBackend, LockError, LockKey, Locker, RefusalKind};
use lock_harness::etcd::{EtcdAuth, EtcdCluster, EtcdSecurity, EtcdUser};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The user the backends log in as; it may read and write its factory's prefix only.
const LOCKER: &str = "locker";
const LOCKER_PASSWORD: &str = "locker-secret";
/// A user without any role.
const NOBODY: &str = "nobody";
const NOBODY_PASSWORD: &str = "nobody-secret";

/// How long a refusal may take: the connect timeout (3 s) plus scheduling slack on a loaded
/// machine.
const REFUSAL_BOUND: Duration = Duration::from_secs(4);

fn security(prefix: &str, client_cert_auth: bool) -> EtcdSecurity {
    EtcdSecurity {
        tls: true,
        client_cert_auth,
        auth: Some(EtcdAuth {
            root_password: "root-secret".into(),
            users: vec![
                EtcdUser {
                    name: LOCKER.into(),
                    password: LOCKER_PASSWORD.into(),
                    readwrite_prefix: Some(format!("{prefix}/")),
                },
                EtcdUser {
                    name: NOBODY.into(),
                    password: NOBODY_PASSWORD.into(),
                    readwrite_prefix: None,
                },
            ],
        }),
    }
}

fn fresh_prefix() -> String {
    use std::hash::{BuildHasher, RandomState};
    let suffix = RandomState::new().hash_one(std::time::SystemTime::now()) as u32;
    format!("distlock-tls-{suffix:08x}")
}

/// One single-node etcd with TLS, client certificates required and authentication on;
/// backends log in as [`LOCKER`] over the proxy.
pub struct SecureFactory {
    cluster: EtcdCluster,
    prefix: String,
}

impl SecureFactory {
    async fn start_with_args(extra_args: &[&str]) -> Result<Self> {
        let prefix = fresh_prefix();
        let cluster = EtcdCluster::start_secure(1, security(&prefix, true), extra_args).await?;
        Ok(SecureFactory { cluster, prefix })
    }

    async fn start() -> Result<Self> {
        Self::start_with_args(&[]).await
    }

    fn url(&self) -> String {
        self.cluster
            .url_as(LOCKER, LOCKER_PASSWORD, Some(&self.prefix))
    }
}

#[async_trait]
impl BackendFactory for SecureFactory {
    fn name(&self) -> String {
        "etcd-tls-auth".into()
    }

    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(lock_etcd::connect(&self.url()).await?)
    }

    async fn is_held(&self, key: &LockKey) -> Result<Option<bool>> {
        let range = lock_etcd::key_range(&self.prefix, key);
        Ok(Some(
            !self.cluster.keys_with_prefix(&range).await?.is_empty(),
        ))
    }

    /// The keys under the lock's range: the holder's and each waiter's.
    async fn contenders(&self, key: &LockKey) -> Result<Option<usize>> {
        let range = lock_etcd::key_range(&self.prefix, key);
        Ok(Some(self.cluster.keys_with_prefix(&range).await?.len()))
    }

    fn faults(&self) -> Option<&dyn ServerFaults> {
        Some(self)
    }
}

#[async_trait]
impl ServerFaults for SecureFactory {
    async fn pause(&self) -> Result<()> {
        self.cluster.pause(0)
    }

    async fn resume(&self) -> Result<()> {
        self.cluster.resume(0)
    }

    async fn cut(&self) -> Result<()> {
        self.cluster.cut(0)
    }

    async fn blackhole(&self) -> Result<()> {
        self.cluster.blackhole(0)
    }

    async fn heal(&self) -> Result<()> {
        self.cluster.heal(0)
    }

    async fn delay_answers(&self, delay: Duration) -> Result<()> {
        for member in self.cluster.members() {
            member.proxy().set_delays(Duration::ZERO, delay);
        }
        Ok(())
    }

    async fn forget_connections(&self) -> Result<()> {
        self.cluster.members()[0].proxy().forget_flows();
        Ok(())
    }

    /// Every member killed and started again on its data directory (a crash of the whole
    /// cluster: what raft committed survives).
    async fn restart(&self) -> anyhow::Result<()> {
        self.cluster.restart_all().await
    }
}

/// The whole suite over TLS + client certificate + password, through the proxy.
mod conformance {
    use super::SecureFactory;
    conformance_tests::conformance_suite! {
        factory = SecureFactory::start(),
    }
}

/// Connects to `url`, expecting a refusal of `kind` within [`REFUSAL_BOUND`]; returns its
/// message.
async fn expect_refused(url: &str, kind: RefusalKind) -> Result<String> {
    let started = Instant::now();
    let outcome = lock_etcd::connect(url).await;
    let elapsed = started.elapsed();
    let error = match outcome {
        Ok(_) => bail!("{url}: connected, expected a refusal ({kind})"),
        Err(error) => error,
    };
    match &error {
        LockError::Refused {
            kind: got, message, ..
        } if *got == kind => {
            ensure!(
                !error.is_retryable(),
                "a refusal must not be retryable: {error}"
            );
            ensure!(
                elapsed < REFUSAL_BOUND,
                "refused after {elapsed:?} (bound {REFUSAL_BOUND:?}): {error}"
            );
            println!("{kind} after {elapsed:?}: {error}");
            Ok(message.clone())
        }
        _ => bail!("{url}: expected Refused({kind}), got {error:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_typed_clear_and_fast() -> Result<()> {
    let factory = SecureFactory::start().await?;
    let cluster = &factory.cluster;
    let pki = cluster.pki().context("no PKI")?;
    let hosts = cluster.endpoints().join(",");
    let prefix = &factory.prefix;
    let client_cert = format!(
        "cert={}&key={}",
        pki.client.cert_path.display(),
        pki.client.key_path.display()
    );

    // The right settings connect and lock.
    let locker = Locker::from_arc(lock_etcd::connect(&factory.url()).await?);
    let guard = locker
        .lock("refusals")
        .try_acquire()
        .await?
        .context("not acquired")?;
    guard.release().await?;

    // A CA that did not sign the server's certificate.
    let message = expect_refused(
        &format!(
            "etcds://{LOCKER}:{LOCKER_PASSWORD}@{hosts}/{prefix}?ca={}&{client_cert}",
            pki.other_ca.cert_path.display()
        ),
        RefusalKind::Certificate,
    )
    .await?;
    ensure!(message.contains("ca="), "does not name ca=: {message}");

    // The certificate names 127.0.0.1 and localhost: server_name= may pick the name to
    // verify, and a name it does not carry is refused, naming server_name=.
    let with_name = |name: &str| {
        format!(
            "etcds://{LOCKER}:{LOCKER_PASSWORD}@{hosts}/{prefix}?ca={}&{client_cert}&server_name={name}",
            pki.ca.cert_path.display()
        )
    };
    drop(lock_etcd::connect(&with_name("localhost")).await?);
    let message = expect_refused(&with_name("etcd.example"), RefusalKind::Certificate).await?;
    ensure!(message.contains("server_name="), "{message}");

    // A wrong password.
    let message = expect_refused(
        &cluster.url_as(LOCKER, "wrong-password", Some(prefix)),
        RefusalKind::Authentication,
    )
    .await?;
    ensure!(
        message.contains("authentication failed") && message.contains("user:password@"),
        "{message}"
    );

    // A user without permission on the prefix, and the right user on another prefix.
    for url in [
        cluster.url_as(NOBODY, NOBODY_PASSWORD, Some(prefix)),
        cluster.url_as(LOCKER, LOCKER_PASSWORD, Some("elsewhere")),
    ] {
        let message = expect_refused(&url, RefusalKind::Authentication).await?;
        ensure!(message.contains("permission denied"), "{message}");
    }

    // No client certificate where the server requires one.
    let message = expect_refused(
        &format!(
            "etcds://{LOCKER}:{LOCKER_PASSWORD}@{hosts}/{prefix}?ca={}",
            pki.ca.cert_path.display()
        ),
        RefusalKind::Certificate,
    )
    .await?;
    ensure!(message.contains("cert="), "{message}");

    // A client certificate the server's CA did not sign.
    let message = expect_refused(
        &format!(
            "etcds://{LOCKER}:{LOCKER_PASSWORD}@{hosts}/{prefix}?ca={}&cert={}&key={}",
            pki.ca.cert_path.display(),
            pki.other_ca.cert_path.display(),
            pki.other_ca.key_path.display()
        ),
        RefusalKind::Certificate,
    )
    .await?;
    ensure!(message.contains("cert="), "{message}");

    // Plain etcd:// against the TLS-only server.
    let message = expect_refused(
        &format!("etcd://{LOCKER}:{LOCKER_PASSWORD}@{hosts}/{prefix}"),
        RefusalKind::Tls,
    )
    .await?;
    ensure!(message.contains("etcds://"), "{message}");

    // A certificate given as the key: a usage error naming key=, not a retryable failure
    // to reach etcd (tonic found it only when building the endpoint).
    let url = format!(
        "etcds://{LOCKER}:{LOCKER_PASSWORD}@{hosts}/{prefix}?ca={0}&cert={1}&key={1}",
        pki.ca.cert_path.display(),
        pki.client.cert_path.display()
    );
    match lock_etcd::connect(&url).await {
        Err(LockError::InvalidConfig(message)) => {
            ensure!(message.contains("key="), "{message}")
        }
        Err(other) => bail!("a certificate as key= is not InvalidConfig: {other}"),
        Ok(_) => bail!("connected with a certificate as key="),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_against_a_plain_server_is_refused() -> Result<()> {
    let cluster = EtcdCluster::single().await?;
    let pki = lock_harness::tls::TestPki::generate()?;
    let url = format!(
        "etcds://{}/x?ca={}",
        cluster.endpoints().join(","),
        pki.ca.cert_path.display()
    );
    let message = expect_refused(&url, RefusalKind::Tls).await?;
    ensure!(message.contains("etcd://"), "{message}");
    Ok(())
}

/// etcd's simple tokens expire `--auth-token-ttl` after their last use (checked every
/// second). With a 1 s TTL: a lock renewed every 3 s (TTL 9 s) meets an expired token at
/// every renewal, and the backend's watch stream, opened with the first token, outlives it.
/// Renewals, new acquisitions and watch wake-ups must all keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_continues_after_the_auth_token_expires() -> Result<()> {
    let factory = SecureFactory::start_with_args(&["--auth-token-ttl=1"]).await?;
    let backend = lock_etcd::connect(&factory.url()).await?;
    let locker = Locker::from_arc(backend);

    // Opens the backend's watch stream with the first token.
    handoff(&factory, &locker, "warm-up").await?;

    let held = locker
        .lock("held")
        .ttl(Duration::from_secs(9))
        .try_acquire()
        .await?
        .context("held: not acquired")?;
    let lease_id = lock_etcd::EtcdBackend::lease_id(&held.lease()).context("no lease id")?;
    // Renewals at ~3 s and ~6 s, each after the token expired.
    tokio::time::sleep(Duration::from_secs(7)).await;
    ensure!(!held.is_lost(), "lost: {:?}", held.lost_reason());
    let mut client = factory.cluster.client().await?;
    let left = client.lease_time_to_live(lease_id, None).await?.ttl();
    // Had no renewal succeeded after the token expired (~1-2 s after the acquire), 2 s
    // would be left.
    ensure!(
        left > 4,
        "the lease was not renewed after the token expired: {left} s left"
    );

    // The watch stream still carries the first token; new watches on it must still wake.
    handoff(&factory, &locker, "after-expiry").await?;
    held.release().await?;
    Ok(())
}

/// A holder and a queued waiter on `name`: the waiter must get the lock within 1 s of the
/// release, having sent few watch requests while it waited (a watch refused for an expired
/// token would be retried over and over).
async fn handoff(factory: &SecureFactory, locker: &Locker, name: &str) -> Result<()> {
    let holder = locker
        .lock(name)
        .try_acquire()
        .await?
        .with_context(|| format!("{name}: not acquired"))?;
    let watches = || {
        factory.cluster.metric(
            0,
            "grpc_server_msg_received_total",
            &["grpc_method=\"Watch\""],
        )
    };
    let before = watches().await?;
    let waiting = {
        let locker = locker.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let guard = locker
                .lock(name.as_str())
                .wait(Duration::from_secs(10))
                .acquire()
                .await;
            (guard, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = watches().await? - before;
    let released = Instant::now();
    holder.release().await?;
    let (guard, acquired_at) = waiting.await?;
    let guard = guard?;
    let latency = acquired_at.saturating_duration_since(released);
    println!("{name}: {sent} watch requests while waiting; acquired {latency:?} after the release");
    ensure!(
        latency < Duration::from_secs(1),
        "{name}: acquired {latency:?} after the release"
    );
    ensure!(
        sent <= 4.0,
        "{name}: {sent} watch requests in 1.5 s of waiting"
    );
    guard.release().await?;
    Ok(())
}

/// Authentication without TLS: no credentials is refused (naming `user:password@`), the right
/// ones work; credentials for a server with authentication off are ignored (as etcd's Go
/// client does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_without_tls() -> Result<()> {
    let prefix = fresh_prefix();
    let security = EtcdSecurity {
        tls: false,
        ..security(&prefix, false)
    };
    let cluster = EtcdCluster::start_secure(1, security, &[]).await?;
    let message = expect_refused(&cluster.url(Some(&prefix)), RefusalKind::Authentication).await?;
    ensure!(message.contains("user:password@"), "{message}");
    let locker = Locker::from_arc(
        lock_etcd::connect(&cluster.url_as(LOCKER, LOCKER_PASSWORD, Some(&prefix))).await?,
    );
    let guard = locker
        .lock("plain-auth")
        .try_acquire()
        .await?
        .context("not acquired")?;
    guard.release().await?;

    let open = EtcdCluster::single().await?;
    let locker = Locker::from_arc(
        lock_etcd::connect(&open.url_as(LOCKER, LOCKER_PASSWORD, Some(&prefix))).await?,
    );
    let guard = locker
        .lock("no-auth")
        .try_acquire()
        .await?
        .context("not acquired")?;
    guard.release().await?;
    Ok(())
}

/// Every change to etcd's users or roles raises the auth store's revision, and etcd then
/// refuses every token issued before ("revision of auth store is old"). A backend must log
/// in again: a held lock keeps being renewed, new locks and watch wake-ups work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_continues_after_users_change() -> Result<()> {
    let factory = SecureFactory::start().await?;
    let locker = Locker::from_arc(lock_etcd::connect(&factory.url()).await?);
    handoff(&factory, &locker, "warm-up").await?;
    let held = locker
        .lock("held")
        .ttl(Duration::from_secs(3))
        .try_acquire()
        .await?
        .context("held: not acquired")?;

    let mut admin = factory.cluster.client().await?;
    admin.user_add("someone-else", "pw", None).await?;

    // Renewals every 1 s; without a new login they would fail until the lock is lost (3 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    ensure!(!held.is_lost(), "lost: {:?}", held.lost_reason());
    let other = locker
        .lock("after-change")
        .try_acquire()
        .await?
        .context("after-change: not acquired")?;
    other.release().await?;
    handoff(&factory, &locker, "after-change-handoff").await?;
    held.release().await?;
    Ok(())
}
