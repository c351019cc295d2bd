//! Helpers the cases share: TTLs fitted to a backend, lockers, server views.

use crate::{BackendFactory, FaultyBackend};
use anyhow::{Context, Result, bail, ensure};
use lock_core::{Attempt, Capabilities, LockBackend, LockKey, Locker};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::{Instant, sleep};

pub(crate) const MS: Duration = Duration::from_millis(1);

/// `wanted`, raised to the backend's minimum TTL and rounded up to its granularity.
pub(crate) fn ttl_for(caps: &Capabilities, wanted: Duration) -> Duration {
    let ttl = wanted.max(caps.min_ttl);
    let step = caps.ttl_granularity.as_nanos().max(1);
    let nanos = ttl.as_nanos().div_ceil(step) * step;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// A request for `name`: a lock, or with `permits` a semaphore of that many permits.
pub(crate) fn request<'a>(
    locker: &'a Locker,
    name: &str,
    permits: Option<u32>,
) -> lock_core::LockRequest<'a> {
    match permits {
        Some(permits) => locker.semaphore(name, permits),
        None => locker.lock(name),
    }
}

/// A task that waits for `name` (see [`request`]) polling with `backoff`, releases it at once,
/// and answers when it got it: hand-off cases time it against the release.
pub(crate) fn spawn_waiter(
    locker: &Locker,
    name: &str,
    permits: Option<u32>,
    ttl: Duration,
    backoff: lock_core::Backoff,
) -> tokio::task::JoinHandle<Result<Instant>> {
    let (locker, name) = (locker.clone(), name.to_owned());
    tokio::spawn(async move {
        let guard = request(&locker, &name, permits)
            .ttl(ttl)
            .backoff(backoff)
            .wait(Duration::from_secs(10))
            .acquire()
            .await?;
        let at = Instant::now();
        guard.release().await?;
        Ok(at)
    })
}

pub(crate) async fn locker(factory: &dyn BackendFactory) -> Result<Locker> {
    Ok(Locker::from_arc(factory.backend().await?))
}

pub(crate) fn key(name: &str) -> Result<LockKey> {
    Ok(LockKey::new(name)?)
}

pub(crate) async fn held_by_other(
    backend: &Arc<dyn LockBackend>,
    key: &LockKey,
    ttl: Duration,
) -> Result<bool> {
    match backend.try_acquire(key, ttl).await? {
        Attempt::Held { .. } => Ok(true),
        Attempt::Acquired(lease) => {
            backend.release(&lease).await?;
            Ok(false)
        }
    }
}

pub(crate) async fn expect_server_view(
    factory: &dyn BackendFactory,
    key: &LockKey,
    held: bool,
) -> Result<()> {
    if let Some(actual) = factory.is_held(key).await? {
        ensure!(
            actual == held,
            "server says key {key} is {}held, expected {}held",
            if actual { "" } else { "not " },
            if held { "" } else { "not " }
        );
    }
    Ok(())
}

pub(crate) async fn wait_until_acquired(
    backend: &Arc<dyn LockBackend>,
    k: &LockKey,
    ttl: Duration,
    within: Duration,
) -> Result<lock_core::Lease> {
    let deadline = Instant::now() + within;
    loop {
        if let Attempt::Acquired(lease) = backend.try_acquire(k, ttl).await? {
            return Ok(lease);
        }
        if Instant::now() >= deadline {
            bail!("key {k} still held {within:?} later");
        }
        sleep(10 * MS).await;
    }
}

pub(crate) async fn sleep_until_instant(at: Instant) {
    tokio::time::sleep_until(at).await;
}

/// A locker whose grants come back `delay` late (the grant itself happens at once on the
/// server): a cancel then often falls between the server's grant and its answer, the window
/// in which a careless client leaks a lock.
pub(crate) async fn slow_answer_locker(
    factory: &dyn BackendFactory,
    delay: Duration,
) -> Result<Locker> {
    let (locker, plan) = faulty_locker(factory).await?;
    plan.acquire(crate::Fault::DelayAnswer(delay));
    Ok(locker)
}

pub(crate) async fn faulty_locker(
    factory: &dyn BackendFactory,
) -> Result<(Locker, crate::FaultPlan)> {
    let (backend, plan) = FaultyBackend::wrap(factory.backend().await?);
    Ok((Locker::from_arc(backend), plan))
}

pub(crate) struct SetOnDrop(pub(crate) Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

pub(crate) fn faults_of<'a>(
    factory: &'a dyn BackendFactory,
    case: &str,
) -> Result<&'a dyn crate::ServerFaults> {
    factory.faults().with_context(|| {
        format!("the factory offers no server fault hooks: implement BackendFactory::faults, or list `{case}` under skip with the reason")
    })
}
