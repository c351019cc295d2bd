//! Loss: the holder hears of a lost lock before anyone else can be granted it.

use super::support::*;
use crate::{BackendFactory, Fault, unique_key};
use anyhow::{Context, Result, bail, ensure};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

async fn lost_fires_before_deadline(factory: &dyn BackendFactory, fault: Fault) -> Result<()> {
    let (locker, plan) = faulty_locker(factory).await?;
    let caps = locker.backend().capabilities();
    let ttl = ttl_for(&caps, Duration::from_millis(1500));
    let guard = locker.lock(unique_key("lost")).ttl(ttl).acquire().await?;
    // Let at least one renewal succeed first.
    let deadline = Instant::now() + ttl;
    while plan.renew_calls() == 0 {
        ensure!(
            Instant::now() < deadline,
            "the watchdog never renewed within one TTL"
        );
        sleep(10 * MS).await;
    }
    sleep(20 * MS).await;
    ensure!(!guard.is_lost(), "lost before any fault");
    plan.renew(fault);
    let injected = Instant::now();
    let lost = guard.lost();
    timeout(ttl + Duration::from_secs(1), lost)
        .await
        .with_context(|| format!("lost() never fired with renew fault {fault:?}"))?;
    let fired = Instant::now();
    let valid_until = guard.valid_until();
    ensure!(
        fired < valid_until,
        "lost() fired {:?} after the validity deadline",
        fired - valid_until
    );
    ensure!(guard.is_lost(), "is_lost() false after lost() fired");
    if fault == Fault::Lost {
        ensure!(
            fired - injected <= ttl / 3 + Duration::from_millis(200),
            "a Lost answer took {:?} to fire the signal",
            fired - injected
        );
    }
    plan.renew(Fault::None);
    drop(guard);
    Ok(())
}

/// 13a. Renew failures (errors) fire `lost()` before the validity deadline.
pub async fn lost_fires_on_renew_failure(factory: &dyn BackendFactory) -> Result<()> {
    lost_fires_before_deadline(factory, Fault::Fail).await
}

/// 13b. Renew calls that hang fire `lost()` before the validity deadline.
pub async fn lost_fires_on_renew_hang(factory: &dyn BackendFactory) -> Result<()> {
    lost_fires_before_deadline(factory, Fault::Hang).await
}

/// 13c. A `Lost` answer to renew fires `lost()` at once.
pub async fn lost_fires_on_lost_answer(factory: &dyn BackendFactory) -> Result<()> {
    lost_fires_before_deadline(factory, Fault::Lost).await
}

/// 13d. `with_lock` returns `Err(Lost)` when the lock is lost midway, and drops the work.
pub async fn with_lock_drops_work_on_loss(factory: &dyn BackendFactory) -> Result<()> {
    let (locker, plan) = faulty_locker(factory).await?;
    let caps = locker.backend().capabilities();
    let ttl = ttl_for(&caps, Duration::from_millis(1500));
    // Happy path first: the value comes back and the key is free afterwards.
    let name = unique_key("with-lock");
    let value = locker.lock(&name).ttl(ttl).run(async { 42 }).await?;
    ensure!(value == 42, "with_lock returned the wrong value");
    let free = locker
        .try_acquire(&name)
        .await?
        .context("with_lock left the key held")?;
    free.release().await?;

    let dropped = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let work = {
        let dropped = SetOnDrop(dropped.clone());
        let finished = finished.clone();
        async move {
            let _dropped = dropped;
            sleep(Duration::from_secs(60)).await;
            finished.store(true, Ordering::SeqCst);
        }
    };
    let injector = {
        let plan = plan.clone();
        tokio::spawn(async move {
            sleep(Duration::from_millis(100)).await;
            plan.renew(Fault::Lost);
        })
    };
    let started = Instant::now();
    let outcome = timeout(
        ttl * 2 + Duration::from_secs(1),
        locker.lock(&name).ttl(ttl).run(work),
    )
    .await
    .context("with_lock kept running after the lock was lost")?;
    injector.await?;
    match outcome {
        Err(error) if error.is_lost() => {}
        Ok(()) => bail!("with_lock completed although the lock was lost"),
        Err(error) => bail!("with_lock: expected Lost, got {error}"),
    }
    ensure!(
        dropped.load(Ordering::SeqCst),
        "with_lock returned but the work future was not dropped"
    );
    ensure!(!finished.load(Ordering::SeqCst), "the work ran to the end");
    ensure!(
        started.elapsed() < ttl,
        "loss noticed only after {:?}",
        started.elapsed()
    );
    Ok(())
}
