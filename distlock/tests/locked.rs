//! `#[distlock::locked]`: key templates, options, busy handling, loss, the process default.
#![cfg(feature = "macros")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use distlock::{LockError, Locker, MemoryBackend};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug)]
enum AppError {
    Lock(LockError),
}

impl From<LockError> for AppError {
    fn from(error: LockError) -> Self {
        AppError::Lock(error)
    }
}

struct Order {
    id: u64,
}

impl Order {
    fn region(&self) -> &str {
        "eu"
    }
}

struct Service {
    locker: Locker,
    /// Another client of the same table, to look at the lock from outside.
    observer: Locker,
    tenant: String,
}

impl Service {
    #[distlock::locked("payment:{order_id}", ttl = "10s", wait = "1s", locker = self.locker)]
    async fn pay(&self, order_id: u64) -> Result<bool, AppError> {
        // The lock is held while the body runs: another client cannot have it.
        Ok(self
            .observer
            .try_acquire(format!("payment:{order_id}"))
            .await?
            .is_none())
    }

    #[distlock::locked("{self.tenant}:order:{order.id}:{order.region()}", locker = self.locker, guard = lock)]
    async fn ship(
        &self,
        order: &Order,
    ) -> Result<(String, Option<distlock::FencingToken>), AppError> {
        Ok((lock.key().to_string(), lock.fence()))
    }

    #[distlock::locked(key = format!("report-{}", day * 2), locker = &self.locker, on_busy = skip)]
    async fn nightly_report(&self, day: u32) -> Option<u32> {
        Some(day)
    }

    #[distlock::locked("retried", locker = self.locker, retries = 2, retry_delay = "5ms")]
    async fn retried(&self) -> Result<(), AppError> {
        Ok(())
    }

    #[distlock::locked(
        "short",
        locker = self.locker,
        ttl = Duration::from_millis(60),
        auto_renew = false
    )]
    async fn outlives_its_lease(&self, finished: Arc<AtomicBool>) -> Result<(), AppError> {
        tokio::time::sleep(Duration::from_secs(2)).await;
        finished.store(true, Ordering::SeqCst);
        Ok(())
    }
}

fn service() -> Service {
    let table = MemoryBackend::new();
    Service {
        locker: Locker::new(table.clone()),
        observer: Locker::new(table),
        tenant: "acme".into(),
    }
}

#[tokio::test]
async fn the_body_runs_under_the_templated_key() {
    let service = service();
    assert!(
        service.pay(42).await.unwrap(),
        "the key was not held while the body ran"
    );
    // Released after: free again.
    assert!(
        service
            .observer
            .try_acquire("payment:42")
            .await
            .unwrap()
            .is_some()
    );
    let (key, fence) = service.ship(&Order { id: 7 }).await.unwrap();
    assert_eq!(key, "acme:order:7:eu");
    assert!(fence.is_some());
}

#[tokio::test]
async fn busy_is_an_error_or_a_skip() {
    let service = service();
    let held = service.observer.acquire("payment:1").await.unwrap();
    match service.pay(1).await {
        Err(AppError::Lock(LockError::Timeout { key, .. })) => assert_eq!(key, "payment:1"),
        other => panic!("expected a Timeout error, got {other:?}"),
    }
    held.release().await.unwrap();
    let report = service.observer.acquire("report-6").await.unwrap();
    assert_eq!(
        service.nightly_report(3).await,
        None,
        "ran while another host held it"
    );
    report.release().await.unwrap();
    assert_eq!(service.nightly_report(3).await, Some(3));
    // retries = 2: gives up after the count, without a wait.
    let held = service.observer.acquire("retried").await.unwrap();
    assert!(matches!(
        service.retried().await,
        Err(AppError::Lock(LockError::Timeout { .. }))
    ));
    held.release().await.unwrap();
    service.retried().await.unwrap();
}

#[tokio::test]
async fn a_lost_lock_drops_the_body() {
    let service = service();
    let finished = Arc::new(AtomicBool::new(false));
    let outcome = service.outlives_its_lease(finished.clone()).await;
    assert!(
        matches!(outcome, Err(AppError::Lock(LockError::Lost { .. }))),
        "{outcome:?}"
    );
    assert!(
        !finished.load(Ordering::SeqCst),
        "the body ran to the end without its lock"
    );
}

#[distlock::locked("free-fn:{job}", on_busy = skip)]
async fn cron_job(job: &str) -> Option<String> {
    Some(format!("ran {job}"))
}

#[tokio::test]
async fn free_functions_use_the_process_default() {
    // The only test in this binary that sets the process default.
    distlock::set_default_locker(Locker::new(MemoryBackend::new()));
    assert_eq!(cron_job("backup").await.as_deref(), Some("ran backup"));
    let held = distlock::default_locker()
        .unwrap()
        .acquire("free-fn:backup")
        .await
        .unwrap();
    assert_eq!(cron_job("backup").await, None);
    held.release().await.unwrap();
}
