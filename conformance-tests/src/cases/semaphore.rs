//! Counting semaphores: never more than N permits held, dead holders' permits come back,
//! callers must agree on N, loss and cancel safety as for a lock.

use super::support::*;
use crate::{BackendFactory, Fault, unique_key};
use anyhow::{Context, Result, bail, ensure};
use lock_core::{Capabilities, LockError};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

fn require_semaphores(caps: &Capabilities) -> Result<()> {
    ensure!(
        caps.semaphores,
        "the backend has no semaphores (Capabilities::semaphores is false): list this case \
         under skip with the reason"
    );
    Ok(())
}

/// The most windows open at once.
fn max_overlap(windows: &[(Instant, Instant)]) -> usize {
    let mut events: Vec<(Instant, i32)> = windows
        .iter()
        .flat_map(|(start, end)| [(*start, 1), (*end, -1)])
        .collect();
    // At equal instants, ends before starts: touching windows do not overlap.
    events.sort();
    let (mut open, mut most) = (0i32, 0i32);
    for (_, delta) in events {
        open += delta;
        most = most.max(open);
    }
    usize::try_from(most).unwrap_or(0)
}

/// 21. Many tasks on two backend instances take permits of one semaphore of 3: never more
///     than 3 hold at once (windows recorded and checked), and more than one does (it is not a
///     mutex); a request for 2 permits counts as 2.
pub async fn semaphore_never_exceeds_permits(factory: &dyn BackendFactory) -> Result<()> {
    const LIMIT: u32 = 3;
    const TASKS: usize = 12;
    const ROUNDS: usize = 3;
    let lockers = [locker(factory).await?, locker(factory).await?];
    let caps = lockers[0].backend().capabilities();
    require_semaphores(&caps)?;
    let ttl = ttl_for(&caps, Duration::from_secs(10));
    let name = unique_key("semaphore");
    let windows = Arc::new(std::sync::Mutex::new(Vec::new()));
    // One window per hold (whatever its count): two holders at once is what a mutex never
    // shows (a hold of 2 permits alone fills two of `windows`).
    let holds = Arc::new(std::sync::Mutex::new(Vec::new()));
    let inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let locker = lockers[task % 2].clone();
        let (name, windows, holds, inside) =
            (name.clone(), windows.clone(), holds.clone(), inside.clone());
        // Every fourth task takes two permits at once.
        let count = if task % 4 == 3 { 2 } else { 1 };
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let permit = locker
                    .semaphore(&name, LIMIT)
                    .permits(count)
                    .ttl(ttl)
                    .wait(Duration::from_secs(60))
                    .acquire()
                    .await?;
                let now_inside =
                    inside.fetch_add(count as usize, Ordering::SeqCst) + count as usize;
                ensure!(
                    now_inside <= LIMIT as usize,
                    "{now_inside} permits held at once with a limit of {LIMIT}"
                );
                let start = Instant::now();
                // Long enough to overlap the next grant on a loaded machine: with 5 ms, etcd-3
                // in a full parallel run once showed no two holders at once.
                sleep(25 * MS).await;
                let end = Instant::now();
                inside.fetch_sub(count as usize, Ordering::SeqCst);
                {
                    let mut windows = windows.lock().unwrap_or_else(|p| p.into_inner());
                    for _ in 0..count {
                        windows.push((start, end));
                    }
                }
                holds
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((start, end));
                ensure!(permit.release().await?, "a permit's release returned false");
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let windows = windows.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let most = max_overlap(&windows);
    ensure!(
        most <= LIMIT as usize,
        "hold windows show {most} permits at once with a limit of {LIMIT}"
    );
    let holds = holds.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure!(
        max_overlap(&holds) >= 2,
        "never two holders at once: the semaphore behaves as a mutex"
    );
    Ok(())
}

/// 22. A holder that dies with its permits (no release, no renewal) gets them back within
///     TTL + slack; the free permits meanwhile stay usable.
pub async fn semaphore_dead_holder_permit_returns(factory: &dyn BackendFactory) -> Result<()> {
    let dead = locker(factory).await?;
    let live = locker(factory).await?;
    let caps = dead.backend().capabilities();
    require_semaphores(&caps)?;
    let ttl = ttl_for(&caps, Duration::from_millis(800));
    let name = unique_key("semaphore-dead");
    // The dead holder takes 2 of 3 permits and never renews or releases them.
    let k = key(&name)?;
    let taken = Instant::now();
    let lease = dead
        .backend()
        .try_acquire_permits(&k, 3, 2, ttl)
        .await?
        .into_lease()
        .context("the first 2 of 3 permits were refused")?;
    std::mem::forget(lease);
    // One permit is still free; a second request for 2 must wait for the dead holder's.
    let one = live
        .semaphore(&name, 3)
        .ttl(ttl)
        .try_acquire()
        .await?
        .context("the third permit was refused while only 2 were held")?;
    let deadline = ttl + caps.expiry_slack + Duration::from_secs(2);
    let two = live
        .semaphore(&name, 3)
        .permits(2)
        .ttl(ttl)
        .wait(deadline)
        .acquire()
        .await
        .context("the dead holder's permits never came back")?;
    let back_after = taken.elapsed();
    ensure!(
        back_after >= ttl.saturating_sub(caps.ttl_granularity + 50 * MS),
        "the dead holder's permits came back after {back_after:?}, before its TTL {ttl:?}"
    );
    ensure!(
        back_after <= ttl + caps.expiry_slack + Duration::from_millis(1500),
        "the dead holder's permits came back only after {back_after:?} (TTL {ttl:?}, slack {:?})",
        caps.expiry_slack
    );
    one.release().await?;
    two.release().await?;
    Ok(())
}

/// 23. Callers must agree on a semaphore's limit while permits are held (a different limit
///     is `InvalidConfig`, naming both); a new limit applies once none is held; bad numbers
///     (limit 0, more permits than the limit) are `InvalidConfig`; a semaphore and a lock of
///     the same name are unrelated.
pub async fn semaphore_limits_must_agree(factory: &dyn BackendFactory) -> Result<()> {
    let a = locker(factory).await?;
    let b = locker(factory).await?;
    let caps = a.backend().capabilities();
    require_semaphores(&caps)?;
    let ttl = ttl_for(&caps, Duration::from_secs(10));
    let name = unique_key("semaphore-limit");
    let held = a.semaphore(&name, 5).ttl(ttl).acquire().await?;
    match b.semaphore(&name, 3).ttl(ttl).try_acquire().await {
        Err(LockError::InvalidConfig(message)) => ensure!(
            message.contains('5') && message.contains('3'),
            "the refusal does not name both limits: {message}"
        ),
        other => bail!("a limit of 3 on a semaphore held with 5 gave {other:?}"),
    }
    // A lock of the same name is another thing.
    let lock = b
        .lock(&name)
        .ttl(ttl)
        .try_acquire()
        .await?
        .context("a lock named like a held semaphore was refused")?;
    lock.release().await?;
    held.release().await?;
    let with_three = b
        .semaphore(&name, 3)
        .ttl(ttl)
        .try_acquire()
        .await?
        .context("a new limit was refused after every permit was released")?;
    with_three.release().await?;
    for (limit, count) in [(0, 1), (2, 3), (2, 0)] {
        let outcome = a
            .semaphore(&name, limit)
            .permits(count)
            .ttl(ttl)
            .try_acquire()
            .await;
        ensure!(
            matches!(outcome, Err(LockError::InvalidConfig(_))),
            "{count} of {limit} permits gave {outcome:?}, expected InvalidConfig"
        );
    }
    Ok(())
}

/// 24. Permits are guards like locks: a renewal that fails fires `lost()` before the
///     validity deadline, and acquires dropped mid-wait leave no permit held.
pub async fn semaphore_loss_and_cancel(factory: &dyn BackendFactory) -> Result<()> {
    let (faulty, plan) = faulty_locker(factory).await?;
    let caps = faulty.backend().capabilities();
    require_semaphores(&caps)?;
    let ttl = ttl_for(&caps, Duration::from_millis(1500));
    let name = unique_key("semaphore-loss");
    let permit = faulty.semaphore(&name, 2).ttl(ttl).acquire().await?;
    plan.renew(Fault::Fail);
    timeout(ttl + Duration::from_secs(1), permit.lost())
        .await
        .context("lost() never fired for a permit whose renewals failed")?;
    ensure!(
        Instant::now() < permit.valid_until(),
        "a permit's lost() fired after its validity deadline"
    );
    plan.renew(Fault::None);
    drop(permit);

    // Cancelled acquires, some cut off while their attempt is in flight right after a
    // release (the only time one can be granted): a leaked permit, with its long TTL, would
    // keep the check below out far longer than it waits.
    let long = ttl_for(&caps, Duration::from_secs(20));
    let other = locker(factory).await?;
    let waiters = [
        slow_answer_locker(factory, 60 * MS).await?,
        slow_answer_locker(factory, 60 * MS).await?,
    ];
    for round in 0..3 {
        let name = unique_key(&format!("semaphore-cancel{round}"));
        let both = other
            .semaphore(&name, 2)
            .permits(2)
            .ttl(long)
            .acquire()
            .await?;
        let mut tasks = Vec::new();
        for task in 0..12 {
            let (waiter, name) = (waiters[task % 2].clone(), name.clone());
            let give_up = Duration::from_micros(rand::random_range(0..250_000));
            tasks.push(tokio::spawn(async move {
                let attempt = waiter
                    .semaphore(&name, 2)
                    .ttl(long)
                    .wait(Duration::from_secs(30))
                    .acquire();
                match timeout(give_up, attempt).await {
                    // Granted before the cancel: dropping the permit releases it.
                    Ok(Ok(permit)) => drop(permit),
                    Ok(Err(error)) => return Err(anyhow::Error::from(error)),
                    Err(_) => {}
                }
                anyhow::Ok(())
            }));
        }
        sleep(Duration::from_micros(rand::random_range(0..200_000))).await;
        both.release().await?;
        for task in tasks {
            task.await??;
        }
        let again = other
            .semaphore(&name, 2)
            .permits(2)
            .ttl(long)
            .wait(Duration::from_secs(3))
            .acquire()
            .await
            .with_context(|| {
                format!("round {round}: a cancelled acquire left a permit held (TTL {long:?})")
            })?;
        again.release().await?;
    }
    Ok(())
}

/// 28. A release wakes a waiting semaphore caller by notification: with every permit held, a
///     waiter gets a permit within a few milliseconds of a release, far below its polling
///     interval.
pub async fn semaphore_release_wakes_waiter(factory: &dyn BackendFactory) -> Result<()> {
    let holder = locker(factory).await?;
    let waiter = locker(factory).await?;
    let caps = holder.backend().capabilities();
    require_semaphores(&caps)?;
    ensure!(
        caps.release_notifications,
        "the backend has no release notifications: list this case under skip"
    );
    let ttl = ttl_for(&caps, Duration::from_secs(30));
    let name = unique_key("semaphore-wake");
    let both = holder
        .semaphore(&name, 2)
        .permits(2)
        .ttl(ttl)
        .acquire()
        .await?;
    // Full jitter draws each wait from [0, step]: with a 60 s step a poll lands in the
    // 500 ms after the release in under 1 % of runs (with 5 s, about 10 %).
    let slow_polling = lock_core::Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
    let waiting = tokio::spawn({
        let (waiter, name) = (waiter.clone(), name.clone());
        async move {
            let permit = waiter
                .semaphore(&name, 2)
                .ttl(ttl)
                .backoff(slow_polling)
                .wait(Duration::from_secs(20))
                .acquire()
                .await?;
            let got = Instant::now();
            permit.release().await?;
            anyhow::Ok(got)
        }
    });
    // Let the waiter subscribe and settle into its 60 s step.
    sleep(300 * MS).await;
    let released = Instant::now();
    both.release().await?;
    let got = waiting.await??;
    let after = got.saturating_duration_since(released);
    ensure!(
        after < Duration::from_millis(500),
        "the waiter got a permit {after:?} after the release: woken by its poll, not by the \
         release"
    );
    Ok(())
}
