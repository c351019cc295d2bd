//! TLS and credentials against real PostgreSQL servers the harness starts (#12).
//!
//! With the `tls` feature (on under `--all-features`): one TLS-only server for this binary
//! (certificates made at test time by `lock_harness::tls::TestPki`; `pg_hba.conf`: plain TCP
//! rejected, user `distlock` by client certificate, everyone else by scram-sha-256 password),
//! and
//! - the conformance suite over `sslmode=verify-full` + `sslrootcert` + a password, through a
//!   proxy so the cut / black-hole cases run;
//! - holder, queue, listener and waiter sessions all on TLS (read from `pg_stat_ssl`), by password
//!   and by client certificate;
//! - refusals, each a non-retryable `LockError::Refused` well within the connect timeout: an
//!   untrusted server certificate, a wrong password, an unknown user, a certificate user
//!   without a certificate, a plain connection to the TLS-only server, `sslmode=require`
//!   against the plain server of `common`;
//! - a `Locker` whose role's password changed after connecting gets the refusal at once (no
//!   retry loop) and leaves no lock.
//!
//! Without the feature: a URL that demands TLS is `InvalidConfig` naming the feature, and
//! `sslmode=prefer` (sqlx's default) still connects to a plain server.

mod common;

use anyhow::{Result, bail, ensure};
use lock_core::LockError;
use lock_postgres::PostgresBackend;
use std::time::{Duration, Instant};

/// `sslmode=prefer` falls back to a plain connection when the server has no TLS, with or
/// without the feature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_connects_to_a_plain_server() -> Result<()> {
    let server = common::server().await?;
    let url = format!(
        "postgres://postgres@{}/postgres?sslmode=prefer",
        server.addr()
    );
    let backend = PostgresBackend::connect(&url).await?;
    let locker = lock_core::Locker::new(backend);
    let guard = locker.lock(common::unique("prefer")).try_acquire().await?;
    ensure!(guard.is_some(), "the lock was not granted");
    Ok(())
}

/// Without the feature, a URL that demands TLS is refused before any connection.
#[cfg(not(feature = "tls"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_url_without_the_feature_is_invalid_config() -> Result<()> {
    let server = common::server().await?;
    for mode in ["require", "verify-ca", "verify-full"] {
        let url = format!(
            "postgres://postgres@{}/postgres?sslmode={mode}",
            server.addr()
        );
        match PostgresBackend::connect(&url).await {
            Err(LockError::InvalidConfig(message)) => {
                ensure!(
                    message.contains("feature `tls`"),
                    "sslmode={mode}: the message does not name the feature: {message}"
                );
                println!("sslmode={mode}: {message}");
            }
            Err(other) => bail!("sslmode={mode}: not InvalidConfig: {other}"),
            Ok(_) => bail!("sslmode={mode}: connected without TLS support"),
        }
    }
    Ok(())
}

/// Certificate files named in the URL are checked when the URL is read, and
/// `sslrootcert=system` needs `verify-full`: both `InvalidConfig` before any connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_certificate_files_and_weak_system_roots_are_invalid_config() -> Result<()> {
    let garbage = tempfile::NamedTempFile::new()?;
    std::fs::write(garbage.path(), "not a certificate\n")?;
    let directory = tempfile::tempdir()?;
    let not_a_file = format!(
        "sslmode=verify-full&sslrootcert={}",
        directory.path().display()
    );
    let not_pem = format!(
        "sslmode=verify-full&sslrootcert={}",
        garbage.path().display()
    );
    let certificate = tempfile::NamedTempFile::new()?;
    std::fs::write(
        certificate.path(),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )?;
    let key = tempfile::NamedTempFile::new()?;
    std::fs::write(
        key.path(),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )?;
    let certificate_as_key = format!(
        "sslmode=verify-full&sslcert={0}&sslkey={0}",
        certificate.path().display()
    );
    let key_as_root = format!("sslmode=verify-full&sslrootcert={}", key.path().display());
    let cases = [
        (certificate_as_key.as_str(), "no private key"),
        (key_as_root.as_str(), "no certificate"),
        (
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "sslrootcert",
        ),
        (not_a_file.as_str(), "sslrootcert"),
        (not_pem.as_str(), "no PEM data"),
        (
            "sslmode=verify-full&sslcert=/nonexistent/c.crt&sslkey=/nonexistent/c.key",
            "sslcert",
        ),
        ("sslmode=require&sslrootcert=system", "sslrootcert=system"),
    ];
    for (query, named) in cases {
        // Port 9 (discard): nothing is ever connected to.
        let url = format!("postgres://app@127.0.0.1:9/postgres?{query}");
        match PostgresBackend::connect(&url).await {
            Err(LockError::InvalidConfig(message)) => ensure!(
                message.contains(named),
                "{query}: the message does not name {named}: {message}"
            ),
            Err(other) => bail!("{query}: not InvalidConfig: {other}"),
            Ok(_) => bail!("{query}: connected"),
        }
    }
    Ok(())
}

/// What a refusal must look like: `Refused` of `kind`, not retryable, within `bound`.
fn expect_refused(
    what: &str,
    outcome: std::result::Result<Result<PostgresBackend, LockError>, tokio::time::error::Elapsed>,
    waited: Duration,
    kind: lock_core::RefusalKind,
    bound: Duration,
) -> Result<String> {
    let error = match outcome {
        Err(_) => bail!("{what}: connect hung"),
        Ok(Ok(_)) => bail!("{what}: connected"),
        Ok(Err(error)) => error,
    };
    let LockError::Refused {
        kind: found,
        ref message,
        ..
    } = error
    else {
        bail!("{what}: not a refusal: {error:?}");
    };
    ensure!(
        found == kind,
        "{what}: refused as {found:?}, not {kind:?}: {error}"
    );
    ensure!(
        !error.is_retryable(),
        "{what}: a refusal must not be retryable"
    );
    ensure!(error.is_refused(), "{what}: is_refused() is false");
    ensure!(
        waited < bound,
        "{what}: refused only after {waited:?} (bound {bound:?})"
    );
    println!("{what}: refused after {waited:?}: {error}");
    Ok(message.clone())
}

/// `sslmode=require` against a server without TLS (the plain server of `common`).
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_but_server_plain_is_refused() -> Result<()> {
    let server = common::server().await?;
    let url = format!(
        "postgres://postgres@{}/postgres?sslmode=require&connect_timeout_ms=2000",
        server.addr()
    );
    let started = Instant::now();
    let outcome =
        tokio::time::timeout(Duration::from_secs(10), PostgresBackend::connect(&url)).await;
    let message = expect_refused(
        "sslmode=require, plain server",
        outcome,
        started.elapsed(),
        lock_core::RefusalKind::Tls,
        Duration::from_secs(2),
    )?;
    ensure!(
        message.contains("sslmode"),
        "the message does not name sslmode: {message}"
    );
    Ok(())
}

/// An unknown role on a trust server is SQLSTATE 28000 (with scram-sha-256 the server answers
/// 28P01 instead, see `with_tls::unknown_user_is_refused`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_role_is_refused() -> Result<()> {
    let server = common::server().await?;
    let url = format!(
        "postgres://no_such_role@{}/postgres?sslmode=disable&connect_timeout_ms=2000",
        server.addr()
    );
    let started = Instant::now();
    let outcome =
        tokio::time::timeout(Duration::from_secs(10), PostgresBackend::connect(&url)).await;
    let message = expect_refused(
        "unknown role, trust server",
        outcome,
        started.elapsed(),
        lock_core::RefusalKind::Authentication,
        Duration::from_secs(2),
    )?;
    ensure!(message.contains("28000"), "no SQLSTATE in: {message}");
    Ok(())
}

#[cfg(feature = "tls")]
mod with_tls {
    use super::*;
    use anyhow::Context;
    use lock_harness::postgres::PostgresServer;
    use lock_harness::tls::TestPki;
    use sqlx::postgres::PgPool;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    /// Password of the role `app`, which the conformance suite and most cases use.
    const APP_PASSWORD: &str = "s3cret pass/word";

    /// `app:<password>` for a URL's user info, the password percent-encoded (it has a space
    /// and a slash, which must arrive intact).
    fn app_credentials() -> String {
        let mut url =
            url::Url::parse("postgres://app@localhost").unwrap_or_else(|_| unreachable!());
        let _ = url.set_password(Some(APP_PASSWORD));
        format!("app:{}", url.password().unwrap_or_default())
    }

    /// The binary's TLS-only server and the client-side certificate files.
    pub(super) struct TlsServer {
        pub server: PostgresServer,
        /// The CA that signed the server's certificate.
        pub ca: PathBuf,
        /// A CA that signed nothing here.
        pub other_ca: PathBuf,
        /// Client certificate (CN `distlock`) and key.
        pub client_cert: PathBuf,
        pub client_key: PathBuf,
    }

    fn start() -> Result<TlsServer> {
        let pki = TestPki::generate()?;
        let server = PostgresServer::builder()
            .test_pki(&pki)
            .hba("hostnossl all all 127.0.0.1/32 reject")
            .hba(&format!(
                "hostssl all {} 127.0.0.1/32 cert",
                TestPki::CLIENT_NAME
            ))
            .hba("hostssl all all 127.0.0.1/32 scram-sha-256")
            .role("app", Some(APP_PASSWORD))
            .role("rotating", Some("first password"))
            .role(TestPki::CLIENT_NAME, None)
            .start()?;
        // The semaphore / reader-writer tables are created at first use (PostgreSQL 15's
        // `public` grants no CREATE to PUBLIC); the fence sequence is shared by every role,
        // so a DBA's one, not owned by whichever role connected first.
        server.sql(&format!(
            "GRANT CREATE ON SCHEMA public TO app, rotating, {user}; \
             CREATE SEQUENCE public.distlock_fence_seq; \
             GRANT USAGE ON SEQUENCE public.distlock_fence_seq TO app, rotating, {user}",
            user = TestPki::CLIENT_NAME
        ))?;
        // The client's copies live in a directory named like the harness's server
        // directories (`distlock-pg-<pid>-…`), so the next run removes it if this process
        // dies; `pki`'s own directory goes when it drops here.
        let dir =
            std::env::temp_dir().join(format!("distlock-pg-{}-client-tls", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let copy = |from: &PathBuf, name: &str| -> Result<PathBuf> {
            let to = dir.join(name);
            std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
            Ok(to)
        };
        Ok(TlsServer {
            ca: copy(&pki.ca.cert_path, "ca.crt")?,
            other_ca: copy(&pki.other_ca.cert_path, "other-ca.crt")?,
            client_cert: copy(&pki.client.cert_path, "client.crt")?,
            client_key: copy(&pki.client.key_path, "client.key")?,
            server,
        })
    }

    /// Started on first use from a plain thread (the server must not belong to a test's
    /// runtime); stopped by the harness's parent-death signal when the binary exits.
    pub(super) async fn tls_server() -> Result<&'static TlsServer> {
        static SERVER: OnceLock<std::result::Result<TlsServer, String>> = OnceLock::new();
        tokio::task::spawn_blocking(|| {
            SERVER
                .get_or_init(|| {
                    std::thread::spawn(|| start().map_err(|error| format!("{error:#}")))
                        .join()
                        .unwrap_or_else(|_| Err("the thread starting postgres panicked".into()))
                })
                .as_ref()
                .map_err(|error| anyhow::anyhow!("starting the TLS postgres server: {error}"))
        })
        .await?
    }

    impl TlsServer {
        /// `user[:password]` at `addr`, verify-full against `ca`, with `extra` parameters.
        pub fn url(
            &self,
            addr: std::net::SocketAddr,
            credentials: &str,
            ca: &std::path::Path,
            extra: &str,
        ) -> String {
            format!(
                "postgres://{credentials}@{addr}/postgres?sslmode=verify-full&sslrootcert={}{extra}",
                ca.display()
            )
        }

        /// The `app` role with its password, verified TLS.
        pub fn app_url(&self, addr: std::net::SocketAddr) -> String {
            self.url(addr, &app_credentials(), &self.ca, "")
        }

        /// A superuser pool over the Unix socket, to read `pg_stat_ssl` and `pg_locks`.
        pub async fn inspector(&self) -> Result<PgPool> {
            Ok(sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(&self.server.socket_url())
                .await?)
        }
    }

    /// The whole conformance suite over TLS with a scram password, through a proxy.
    mod conformance {
        use super::*;

        async fn factory() -> Result<common::PgFactory> {
            let tls = tls_server().await?;
            common::PgFactory::custom(
                tls.server.addr(),
                tls.server.socket_url(),
                Box::new(|addr| tls.app_url(addr)),
            )
        }

        conformance_tests::conformance_suite! {
            factory = factory(),
            skip = {
                fair_queue_serves_waiters_in_arrival_order: "no fair queue: try-lock attempts woken by NOTIFY, whichever comes first gets the key (Capabilities::fair_queue is false; see README)",
                fences_increase_across_a_server_restart: "one TLS server is shared by every case of this \
                    binary and crashing it would fail the cases beside it (the case runs on a \
                    dedicated plain server in tests/dedicated.rs; TLS changes nothing there)",
                server_pause_fires_lost: "one TLS server is shared by every case of this \
                    binary and pausing it would stall the cases beside it (the case runs on a \
                    dedicated plain server in tests/dedicated.rs; TLS changes nothing there)",
            },
        }
    }

    /// Sessions of `application_name` prefix `app` and whether each uses TLS, with the client
    /// certificate's subject.
    async fn sessions(pool: &PgPool, app: &str) -> Result<Vec<(String, bool, Option<String>)>> {
        Ok(sqlx::query_as(
            "SELECT a.application_name, s.ssl, s.client_dn FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE $1 || '-%' \
             ORDER BY 1",
        )
        .bind(app)
        .fetch_all(pool)
        .await?)
    }

    /// Holder, queue, listener and waiter sessions all run over TLS: a lock held by one
    /// backend (a), waited for by a backend that waits for release signals (b, no queue
    /// sessions: it opens its listener and waiter sessions) and by one that waits on the
    /// server (c, on a queue session), handed over twice.
    async fn every_session_on_tls(url: &str, app: &str, client_dn: Option<&str>) -> Result<()> {
        let tls = tls_server().await?;
        let inspector = tls.inspector().await?;
        let backend = async |suffix: &str| -> Result<lock_core::Locker> {
            Ok(lock_core::Locker::new(
                PostgresBackend::connect(&format!("{url}&application_name={app}-{suffix}")).await?,
            ))
        };
        let holder = backend("a").await?;
        let key = common::unique("tls-handoff");
        let guard = holder.lock(&key).acquire().await?;
        let wait = |locker: lock_core::Locker| {
            let key = key.clone();
            tokio::spawn(async move {
                locker
                    .lock(&key)
                    .wait(Duration::from_secs(10))
                    .acquire()
                    .await
            })
        };
        let on_signals = wait(backend("b&queue_sessions=0").await?);
        let on_server = wait(backend("c").await?);
        // Until b's listener and waiter sessions are up and c waits on the server.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let names: Vec<String> = sessions(&inspector, app)
                .await?
                .into_iter()
                .map(|(name, _, _)| name)
                .collect();
            let waiting_on_server: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
                 AND wait_event_type = 'Lock'",
            )
            .bind(format!("{app}-c-holder"))
            .fetch_one(&inspector)
            .await?;
            if names.iter().any(|name| name.ends_with("b-listener"))
                && names.iter().any(|name| name.ends_with("b-waiter"))
                && waiting_on_server > 0
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "no listener/waiter session of b, or c not waiting on the server: {names:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = sessions(&inspector, app).await?;
        let fence = guard.fence();
        drop(guard);
        // The server hands the lock to c's queue session; b gets it after c lets go.
        let first = on_server.await??;
        ensure!(first.fence() > fence, "fences did not increase over TLS");
        let first_fence = first.fence();
        drop(first);
        let second = on_signals.await??;
        ensure!(
            second.fence() > first_fence,
            "fences did not increase over TLS"
        );
        for kind in ["a-holder", "b-listener", "b-waiter", "c-holder"] {
            ensure!(
                seen.iter().any(|(name, _, _)| name.ends_with(kind)),
                "no {kind} session among {seen:?}"
            );
        }
        for (name, ssl, dn) in &seen {
            ensure!(*ssl, "session {name} is not on TLS");
            ensure!(
                dn.as_deref() == client_dn,
                "session {name}: client certificate {dn:?}, expected {client_dn:?}"
            );
        }
        println!("sessions: {seen:?}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn password_login_puts_every_session_on_tls() -> Result<()> {
        let tls = tls_server().await?;
        every_session_on_tls(&tls.app_url(tls.server.addr()), &common::unique("pw"), None).await
    }

    /// `cert` authentication: user `distlock` logs in with its client certificate alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_certificate_login_puts_every_session_on_tls() -> Result<()> {
        let tls = tls_server().await?;
        let url = tls.url(
            tls.server.addr(),
            TestPki::CLIENT_NAME,
            &tls.ca,
            &format!(
                "&sslcert={}&sslkey={}",
                tls.client_cert.display(),
                tls.client_key.display()
            ),
        );
        every_session_on_tls(&url, &common::unique("cert"), Some("/CN=distlock")).await
    }

    async fn refused(what: &str, url: &str, kind: lock_core::RefusalKind) -> Result<String> {
        let url = format!("{url}&connect_timeout_ms=2000");
        let started = Instant::now();
        let outcome =
            tokio::time::timeout(Duration::from_secs(10), PostgresBackend::connect(&url)).await;
        expect_refused(
            what,
            outcome,
            started.elapsed(),
            kind,
            Duration::from_secs(2),
        )
    }

    /// A server certificate signed by a CA the client does not trust.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn untrusted_server_certificate_is_refused() -> Result<()> {
        let tls = tls_server().await?;
        for mode in ["verify-full", "verify-ca"] {
            let url = tls
                .url(tls.server.addr(), &app_credentials(), &tls.other_ca, "")
                .replace("verify-full", mode);
            let message = refused(
                &format!("wrong CA, sslmode={mode}"),
                &url,
                lock_core::RefusalKind::Certificate,
            )
            .await?;
            ensure!(
                message.contains("sslrootcert"),
                "the message does not name sslrootcert"
            );
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_password_is_refused() -> Result<()> {
        let tls = tls_server().await?;
        let url = tls.url(tls.server.addr(), "app:wrong", &tls.ca, "");
        let message = refused(
            "wrong password",
            &url,
            lock_core::RefusalKind::Authentication,
        )
        .await?;
        ensure!(message.contains("28P01"), "no SQLSTATE in: {message}");
        ensure!(
            message.contains("password"),
            "the message does not say password"
        );
        Ok(())
    }

    /// With scram-sha-256 the server answers an unknown user like a wrong password.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_user_is_refused() -> Result<()> {
        let tls = tls_server().await?;
        let url = tls.url(tls.server.addr(), "nobody:whatever", &tls.ca, "");
        refused("unknown user", &url, lock_core::RefusalKind::Authentication).await?;
        Ok(())
    }

    /// The certificate user without a certificate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn certificate_user_without_a_certificate_is_refused() -> Result<()> {
        let tls = tls_server().await?;
        let url = tls.url(tls.server.addr(), TestPki::CLIENT_NAME, &tls.ca, "");
        let message = refused(
            "certificate user, no certificate",
            &url,
            lock_core::RefusalKind::Certificate,
        )
        .await?;
        ensure!(
            message.contains("sslcert"),
            "the message does not name sslcert"
        );
        Ok(())
    }

    /// A plain connection to the TLS-only server (`hostnossl … reject`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_connection_to_a_tls_only_server_is_refused() -> Result<()> {
        let tls = tls_server().await?;
        let url = format!(
            "postgres://app:wrong@{}/postgres?sslmode=disable",
            tls.server.addr()
        );
        let message = refused(
            "sslmode=disable, TLS-only server",
            &url,
            lock_core::RefusalKind::Tls,
        )
        .await?;
        ensure!(
            message.contains("sslmode"),
            "the message does not name sslmode"
        );
        Ok(())
    }

    /// A backend that connected, then its role's password changed and its sessions were
    /// ended: the next holder session cannot log in, and `acquire` with a long wait returns the refusal at once instead of
    /// retrying until the wait ends. No lock is left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn locker_gets_a_refusal_at_once_with_a_wrong_password() -> Result<()> {
        let tls = tls_server().await?;
        let url = tls.url(tls.server.addr(), "rotating:first%20password", &tls.ca, "");
        let backend = PostgresBackend::connect(&url).await?;
        let key = common::unique("rotated");
        let hash = backend.advisory_key(&lock_core::LockKey::new(key.as_str())?);
        tls.server
            .sql("ALTER ROLE rotating PASSWORD 'second password'")?;
        // The connection kept from connecting (for the first holder session) goes too, so
        // the acquire must log in again.
        tls.server.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rotating'",
        )?;
        let locker = lock_core::Locker::new(backend);
        let started = Instant::now();
        let outcome = locker
            .lock(&key)
            .wait(Duration::from_secs(20))
            .acquire()
            .await;
        let waited = started.elapsed();
        tls.server
            .sql("ALTER ROLE rotating PASSWORD 'first password'")?;
        match outcome {
            Ok(_) => bail!("acquired with a wrong password"),
            Err(error) => {
                ensure!(
                    matches!(
                        error,
                        LockError::Refused {
                            kind: lock_core::RefusalKind::Authentication,
                            ..
                        }
                    ),
                    "not an authentication refusal: {error:?}"
                );
                ensure!(!error.is_retryable());
                ensure!(
                    waited < Duration::from_secs(2),
                    "returned only after {waited:?}"
                );
                println!("acquire refused after {waited:?}: {error}");
            }
        }
        let inspector = tls.inspector().await?;
        ensure!(
            !common::advisory_held(&inspector, hash).await?,
            "a lock was left behind"
        );
        Ok(())
    }
}
