//! The facade over TLS on each engine, with the certificates made at test time: a URL that
//! names the test CA connects (two lockers exclude each other), a URL that trusts another CA
//! or sends a wrong password gets `LockError::Refused` at once, and the CLI exits 77 for it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use lock_core::{LockError, RefusalKind};
use std::time::{Duration, Instant};

/// Two lockers from two `connect` calls exclude each other.
#[allow(dead_code)]
async fn two_clients_exclude(url: &str) {
    let a = distlock::connect(url).await.unwrap();
    let b = distlock::connect(url).await.unwrap();
    let key = format!("facade-tls-{}", std::process::id());
    let first = a
        .lock(&key)
        .ttl(Duration::from_secs(5))
        .acquire()
        .await
        .unwrap();
    assert!(
        b.try_acquire(&key).await.unwrap().is_none(),
        "{url}: a second client got a held lock"
    );
    assert!(first.release().await.unwrap());
    let second = b
        .lock(&key)
        .wait(Duration::from_secs(5))
        .acquire()
        .await
        .unwrap();
    second.release().await.unwrap();
}

/// `connect` (or the first acquire, with a long wait) is refused with `kind`, promptly.
#[allow(dead_code)]
async fn refused(url: &str, kind: RefusalKind) {
    let started = Instant::now();
    let outcome = match distlock::connect(url).await {
        Ok(locker) => locker
            .lock("refused")
            .wait(Duration::from_secs(20))
            .acquire()
            .await
            .map(drop),
        Err(error) => Err(error),
    };
    match outcome {
        Err(LockError::Refused { kind: got, .. }) if got == kind => {}
        other => panic!("{url}: expected Refused({kind}), got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{url}: the refusal took {:?}",
        started.elapsed()
    );
}

#[cfg(feature = "redis-tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls() {
    use lock_harness::redis::RedisServer;
    use lock_harness::tls::TestPki;
    let pki = TestPki::generate().unwrap();
    let server = RedisServer::builder()
        .tls(&pki)
        .password("facade-secret")
        .start()
        .unwrap();
    let url = |ca: &TestPki| format!("{}?tls_ca={}", server.url(), ca.ca.cert_path.display());
    assert!(url(&pki).starts_with("rediss://"), "{}", url(&pki));
    two_clients_exclude(&url(&pki)).await;
    let other = format!(
        "{}?tls_ca={}",
        server.url(),
        pki.other_ca.cert_path.display()
    );
    refused(&other, RefusalKind::Certificate).await;
    let wrong = url(&pki).replace("facade-secret", "wrong-secret");
    refused(&wrong, RefusalKind::Authentication).await;

    // The CLI says so with its own status.
    #[cfg(feature = "cli")]
    {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_distlock"))
            .args(["run", "--url", &wrong, "cron", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(77),
            "stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[cfg(feature = "postgres-tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls() {
    use lock_harness::postgres::PostgresServer;
    use lock_harness::tls::TestPki;
    let pki = TestPki::generate().unwrap();
    let builder = PostgresServer::builder()
        .test_pki(&pki)
        .hba("hostnossl all all 127.0.0.1/32 reject")
        .hba("hostssl all all 127.0.0.1/32 scram-sha-256")
        .role("facade", Some("facade-secret"));
    let server = tokio::task::spawn_blocking(move || builder.start())
        .await
        .unwrap()
        .unwrap();
    server.sql("ALTER ROLE facade SUPERUSER").unwrap();
    let url = |user: &str, ca: &std::path::Path| {
        format!(
            "postgres://{user}@{}/postgres?sslmode=verify-full&sslrootcert={}",
            server.addr(),
            ca.display()
        )
    };
    two_clients_exclude(&url("facade:facade-secret", &pki.ca.cert_path)).await;
    refused(
        &url("facade:facade-secret", &pki.other_ca.cert_path),
        RefusalKind::Certificate,
    )
    .await;
    refused(
        &url("facade:wrong-secret", &pki.ca.cert_path),
        RefusalKind::Authentication,
    )
    .await;
}

#[cfg(feature = "etcd-tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls() {
    use lock_harness::etcd::{EtcdAuth, EtcdCluster, EtcdSecurity, EtcdUser};
    let prefix = format!("facade-{}", std::process::id());
    let security = EtcdSecurity {
        tls: true,
        client_cert_auth: false,
        auth: Some(EtcdAuth {
            root_password: "root-secret".into(),
            users: vec![EtcdUser {
                name: "facade".into(),
                password: "facade-secret".into(),
                readwrite_prefix: Some(format!("{prefix}/")),
            }],
        }),
    };
    let cluster = EtcdCluster::start_secure(1, security, &[]).await.unwrap();
    let url = cluster.url_as("facade", "facade-secret", Some(&prefix));
    assert!(url.starts_with("etcds://"), "{url}");
    two_clients_exclude(&url).await;
    let pki = cluster.pki().unwrap();
    let ca = pki.ca.cert_path.display().to_string();
    let other = pki.other_ca.cert_path.display().to_string();
    refused(&url.replace(&ca, &other), RefusalKind::Certificate).await;
    refused(
        &cluster.url_as("facade", "wrong-secret", Some(&prefix)),
        RefusalKind::Authentication,
    )
    .await;
}
