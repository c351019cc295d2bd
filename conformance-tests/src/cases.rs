//! The conformance cases. Each takes a [`BackendFactory`] and fails with a message saying what
//! the backend did wrong. Every case uses fresh keys, so cases may share one server.

use crate::{BackendFactory, Fault, FaultyBackend, unique_key};
use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use lock_core::{
    Attempt, Backoff, Capabilities, LockBackend, LockError, LockKey, Locker, MAX_KEY_LEN, MAX_TTL,
    OwnerToken,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Barrier;
use tokio::time::{Instant, sleep, timeout};

const MS: Duration = Duration::from_millis(1);

/// `wanted`, raised to the backend's minimum TTL and rounded up to its granularity.
fn ttl_for(caps: &Capabilities, wanted: Duration) -> Duration {
    let ttl = wanted.max(caps.min_ttl);
    let step = caps.ttl_granularity.as_nanos().max(1);
    let nanos = ttl.as_nanos().div_ceil(step) * step;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

async fn locker(factory: &dyn BackendFactory) -> Result<Locker> {
    Ok(Locker::from_arc(factory.backend().await?))
}

fn key(name: &str) -> Result<LockKey> {
    Ok(LockKey::new(name)?)
}

async fn held_by_other(
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

async fn expect_server_view(factory: &dyn BackendFactory, key: &LockKey, held: bool) -> Result<()> {
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

/// 1. acquire → release → re-acquire; a second `try_acquire` of a held key returns `None` fast.
pub async fn acquire_release_reacquire(factory: &dyn BackendFactory) -> Result<()> {
    let a = locker(factory).await?;
    let b = locker(factory).await?;
    let name = unique_key("basic");
    let k = key(&name)?;
    let ttl = ttl_for(&a.backend().capabilities(), Duration::from_secs(5));

    let guard = a.lock(&name).ttl(ttl).acquire().await?;
    ensure!(!guard.is_lost(), "a fresh guard reports lost");
    ensure!(guard.key() == &k, "guard has the wrong key");
    ensure!(
        guard.valid_until() > Instant::now(),
        "fresh lease already past its validity deadline"
    );
    expect_server_view(factory, &k, true).await?;

    let started = Instant::now();
    let second = b.lock(&name).ttl(ttl).try_acquire().await?;
    let took = started.elapsed();
    ensure!(
        second.is_none(),
        "try_acquire of a held key returned a guard"
    );
    ensure!(
        took < Duration::from_millis(500),
        "try_acquire of a held key took {took:?}; it must not wait"
    );
    ensure!(
        a.try_acquire(&name).await?.is_none(),
        "the holder's own locker got the key again"
    );

    ensure!(
        guard.release().await?,
        "release of a held lock returned false"
    );
    expect_server_view(factory, &k, false).await?;

    let again = b
        .lock(&name)
        .ttl(ttl)
        .try_acquire()
        .await?
        .context("key not free after release")?;
    ensure!(again.release().await?, "second release returned false");
    Ok(())
}

/// 2. N-way contention over two backend instances: a read → yield → write counter loses no
///    update, and hold windows never overlap.
pub async fn contention_no_lost_updates(factory: &dyn BackendFactory) -> Result<()> {
    const TASKS: usize = 32;
    const ROUNDS: usize = 3;
    let lockers = [locker(factory).await?, locker(factory).await?];
    let name = unique_key("contention");
    let ttl = ttl_for(
        &lockers[0].backend().capabilities(),
        Duration::from_secs(10),
    );
    let counter = Arc::new(AtomicU64::new(0));
    let windows = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let locker = lockers[task % 2].clone();
        let counter = counter.clone();
        let windows = windows.clone();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = locker
                    .lock(&name)
                    .ttl(ttl)
                    .wait(Duration::from_secs(60))
                    .acquire()
                    .await?;
                let start = Instant::now();
                // Deliberately non-atomic: only the lock keeps this correct.
                let seen = counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                sleep(MS).await;
                counter.store(seen + 1, Ordering::SeqCst);
                let end = Instant::now();
                windows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((start, end, guard.fence()));
                ensure!(
                    guard.release().await?,
                    "release inside contention returned false"
                );
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let total = counter.load(Ordering::SeqCst);
    ensure!(
        total == (TASKS * ROUNDS) as u64,
        "lost updates: counter is {total}, expected {}",
        TASKS * ROUNDS
    );
    let mut windows = windows.lock().unwrap_or_else(|p| p.into_inner()).clone();
    windows.sort_by_key(|w| w.0);
    for pair in windows.windows(2) {
        ensure!(
            pair[1].0 >= pair[0].1,
            "hold windows overlap: {:?} and {:?}",
            pair[0],
            pair[1]
        );
        if let (Some(first), Some(second)) = (pair[0].2, pair[1].2) {
            ensure!(
                second > first,
                "fences not increasing under contention: {first} then {second}"
            );
        }
    }
    Ok(())
}

/// 3. Simultaneous `try_acquire` by many tasks: exactly one wins.
pub async fn simultaneous_try_acquire_one_winner(factory: &dyn BackendFactory) -> Result<()> {
    const TASKS: usize = 64;
    let lockers = [locker(factory).await?, locker(factory).await?];
    for round in 0..3 {
        let name = unique_key(&format!("race{round}"));
        let ttl = ttl_for(
            &lockers[0].backend().capabilities(),
            Duration::from_secs(10),
        );
        let barrier = Arc::new(Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let locker = lockers[task % 2].clone();
            let barrier = barrier.clone();
            let name = name.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                locker.lock(&name).ttl(ttl).try_acquire().await
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            if let Some(guard) = task.await?? {
                winners.push(guard);
            }
        }
        ensure!(
            winners.len() == 1,
            "round {round}: {} tasks won the same key",
            winners.len()
        );
        for guard in winners {
            guard.release().await?;
        }
    }
    Ok(())
}

/// 4. Not reentrant: the same `Locker` (and a second `Locker` on the same backend instance)
///    acquiring a held key waits and times out.
pub async fn not_reentrant(factory: &dyn BackendFactory) -> Result<()> {
    let backend = factory.backend().await?;
    let a = Locker::from_arc(backend.clone());
    let a2 = Locker::from_arc(backend);
    let name = unique_key("reentrant");
    let ttl = ttl_for(&a.backend().capabilities(), Duration::from_secs(10));
    let guard = a.lock(&name).ttl(ttl).acquire().await?;
    let wait = Duration::from_millis(300);
    let started = Instant::now();
    match a.lock(&name).ttl(ttl).wait(wait).acquire().await {
        Err(LockError::Timeout { .. }) => {}
        Ok(_) => bail!("the holder's own Locker acquired the held key again (reentrant)"),
        Err(other) => bail!("expected Timeout, got {other}"),
    }
    ensure!(
        started.elapsed() >= wait - 5 * MS,
        "Timeout came before the wait ran out: {:?}",
        started.elapsed()
    );
    ensure!(
        a2.try_acquire(&name).await?.is_none(),
        "a second Locker on the same backend got the held key"
    );
    ensure!(guard.release().await?, "release returned false");
    let again = a
        .lock(&name)
        .ttl(ttl)
        .try_acquire()
        .await?
        .context("not free after release")?;
    again.release().await?;
    Ok(())
}

/// 5. Wrong owner: renew or release with a forged or stale lease fails and the lock stays held.
pub async fn forged_lease_cannot_renew_or_release(factory: &dyn BackendFactory) -> Result<()> {
    let backend = factory.backend().await?;
    let other = factory.backend().await?;
    let name = unique_key("forged");
    let k = key(&name)?;
    let ttl = ttl_for(&backend.capabilities(), Duration::from_secs(10));
    let lease = backend
        .try_acquire(&k, ttl)
        .await?
        .into_lease()
        .context("fresh key not acquired")?;
    let forged = lease.clone().with_owner(OwnerToken::random());
    match backend.renew(&forged, ttl).await {
        Err(error) if error.is_lost() => {}
        Ok(_) => bail!("renew with a forged owner token succeeded"),
        Err(error) => bail!("renew with a forged owner token: expected Lost, got {error}"),
    }
    ensure!(
        !backend.release(&forged).await?,
        "release with a forged owner token returned true"
    );
    ensure!(
        !other.release(&forged).await?,
        "release with a forged owner token (other instance) returned true"
    );
    ensure!(
        held_by_other(&other, &k, ttl).await?,
        "the lock was freed by a forged release"
    );
    expect_server_view(factory, &k, true).await?;

    // Stale: the first holder's lease after a new holder took the key.
    ensure!(
        backend.release(&lease).await?,
        "release of the real lease returned false"
    );
    let second = other
        .try_acquire(&k, ttl)
        .await?
        .into_lease()
        .context("key not free after release")?;
    match backend.renew(&lease, ttl).await {
        Err(error) if error.is_lost() => {}
        Ok(_) => bail!("renew with a stale lease succeeded"),
        Err(error) => bail!("renew with a stale lease: expected Lost, got {error}"),
    }
    ensure!(
        !backend.release(&lease).await?,
        "release with a stale lease returned true"
    );
    ensure!(
        held_by_other(&backend, &k, ttl).await?,
        "a stale release freed the new holder's lock"
    );
    other
        .renew(&second, ttl)
        .await
        .context("the new holder could not renew")?;
    ensure!(
        other.release(&second).await?,
        "new holder's release returned false"
    );
    Ok(())
}

async fn wait_until_acquired(
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

/// 6. Release after expiry never frees the next holder's lock; double release is `Ok(false)`.
pub async fn release_after_expiry_spares_next_holder(factory: &dyn BackendFactory) -> Result<()> {
    let first = factory.backend().await?;
    let second = factory.backend().await?;
    let third = factory.backend().await?;
    let caps = first.capabilities();
    let short = ttl_for(&caps, Duration::from_millis(300));
    let long = ttl_for(&caps, Duration::from_secs(10));
    // An expired lease that nobody took is not ours any more either.
    let lonely = key(&unique_key("expired-alone"))?;
    let lease = first
        .try_acquire(&lonely, short)
        .await?
        .into_lease()
        .context("not acquired")?;
    // The server set the expiry at the latest when its answer arrived, so count from here
    // (not from `sent_at`: transit time on a loaded machine is not the backend's fault).
    let answered = Instant::now();
    sleep_until_instant(answered + lease.ttl() + caps.expiry_slack + 50 * MS).await;
    ensure!(
        !first.release(&lease).await?,
        "release of an expired lease (nobody took over) returned true"
    );
    let k = key(&unique_key("expiry"))?;
    let old = first
        .try_acquire(&k, short)
        .await?
        .into_lease()
        .context("not acquired")?;
    let new = wait_until_acquired(
        &second,
        &k,
        long,
        short + caps.expiry_slack + Duration::from_secs(2),
    )
    .await?;
    ensure!(
        !first.release(&old).await?,
        "release of an expired lease returned true"
    );
    ensure!(
        held_by_other(&third, &k, long).await?,
        "releasing the expired lease freed the next holder's lock"
    );
    expect_server_view(factory, &k, true).await?;
    second
        .renew(&new, long)
        .await
        .context("next holder could not renew")?;
    ensure!(
        second.release(&new).await?,
        "next holder's release returned false"
    );
    ensure!(!second.release(&new).await?, "double release returned true");
    Ok(())
}

/// 7. Renew extends past the original expiry; renew after expiry is `Lost` and does not revive.
pub async fn renew_extends_and_expired_renew_is_lost(factory: &dyn BackendFactory) -> Result<()> {
    let backend = factory.backend().await?;
    let other = factory.backend().await?;
    let caps = backend.capabilities();
    let ttl = ttl_for(&caps, Duration::from_millis(1000));
    let k = key(&unique_key("renew"))?;
    let lease = backend
        .try_acquire(&k, ttl)
        .await?
        .into_lease()
        .context("not acquired")?;
    let original_expiry = lease.sent_at() + lease.ttl();
    sleep(ttl / 2).await;
    let renewed = backend.renew(&lease, ttl).await?;
    let renew_answered = Instant::now();
    ensure!(
        renewed.valid_until() > lease.valid_until(),
        "renew did not move the validity deadline"
    );
    ensure!(
        renewed.fence() == lease.fence(),
        "renew changed the fencing token"
    );
    // Past the original expiry (plus the server's slack) the lock must still be ours.
    sleep_until_instant(original_expiry + caps.expiry_slack + 50 * MS).await;
    ensure!(
        held_by_other(&other, &k, ttl).await?,
        "lock expired at its original TTL despite renew"
    );
    // Now let it expire for real.
    let renewed_expiry = renew_answered + renewed.ttl();
    sleep_until_instant(renewed_expiry + caps.expiry_slack + 100 * MS).await;
    match backend.renew(&renewed, ttl).await {
        Err(error) if error.is_lost() => {}
        Ok(_) => bail!("renew after expiry succeeded (revived an expired lock)"),
        Err(error) => bail!("renew after expiry: expected Lost, got {error}"),
    }
    let taken =
        other.try_acquire(&k, ttl).await?.into_lease().context(
            "after a refused renew the key is still held: the expired lease was revived",
        )?;
    other.release(&taken).await?;
    Ok(())
}

async fn sleep_until_instant(at: Instant) {
    tokio::time::sleep_until(at).await;
}

/// 8. A holder that stops renewing (guard leaked, no watchdog) frees the lock within TTL + the
///    backend's slack, and a waiter then gets it.
pub async fn abandoned_lock_expires_within_ttl(factory: &dyn BackendFactory) -> Result<()> {
    let a = locker(factory).await?;
    let b = locker(factory).await?;
    let caps = a.backend().capabilities();
    let ttl = ttl_for(&caps, Duration::from_millis(800));
    let name = unique_key("abandoned");
    // Another lock on the same backend instance keeps being renewed meanwhile.
    let busy = a.lock(unique_key("busy")).ttl(ttl).acquire().await?;
    let started = Instant::now();
    let guard = a.lock(&name).ttl(ttl).auto_renew(false).acquire().await?;
    std::mem::forget(guard);
    let limit = ttl + caps.expiry_slack + Duration::from_millis(300);
    let next = b
        .lock(&name)
        .ttl(ttl)
        .wait(limit + Duration::from_secs(2))
        .acquire()
        .await
        .context("a waiter never got the abandoned lock")?;
    let took = started.elapsed();
    ensure!(
        took <= limit,
        "abandoned lock freed after {took:?}; TTL {ttl:?} + slack {:?} allows at most {limit:?}",
        caps.expiry_slack
    );
    ensure!(
        took + 50 * MS >= ttl.saturating_sub(lock_core::drift(ttl)),
        "abandoned lock freed after {took:?}, before its TTL {ttl:?}"
    );
    next.release().await?;
    ensure!(
        !busy.is_lost(),
        "the renewed lock on the same backend was lost"
    );
    busy.release().await?;
    Ok(())
}

/// 9. Fencing tokens strictly increase across successive holders, including expiry take-over.
pub async fn fencing_tokens_increase(factory: &dyn BackendFactory) -> Result<()> {
    let a = locker(factory).await?;
    let b = locker(factory).await?;
    let caps = a.backend().capabilities();
    ensure!(
        caps.fencing,
        "backend declares no fencing tokens: list `fencing_tokens_increase` under skip with the reason"
    );
    let name = unique_key("fence");
    let ttl = ttl_for(&caps, Duration::from_secs(10));
    let mut last = None;
    for round in 0..6 {
        let locker = if round % 2 == 0 { &a } else { &b };
        let guard = locker
            .lock(&name)
            .ttl(ttl)
            .wait(Duration::from_secs(5))
            .acquire()
            .await?;
        let fence = guard
            .fence()
            .context("a backend with fencing returned no fence")?;
        if let Some(previous) = last {
            ensure!(fence > previous, "fence went from {previous} to {fence}");
        }
        last = Some(fence);
        guard.release().await?;
    }
    // Expiry take-over.
    let short = ttl_for(&caps, Duration::from_millis(400));
    let abandoned = a.lock(&name).ttl(short).auto_renew(false).acquire().await?;
    let abandoned_fence = abandoned.fence().context("no fence")?;
    ensure!(Some(abandoned_fence) > last, "fence did not increase");
    std::mem::forget(abandoned);
    let taker = b
        .lock(&name)
        .ttl(ttl)
        .wait(short + caps.expiry_slack + Duration::from_secs(3))
        .acquire()
        .await?;
    let taken_fence = taker.fence().context("no fence")?;
    ensure!(
        taken_fence > abandoned_fence,
        "take-over after expiry got fence {taken_fence}, not above the expired holder's {abandoned_fence}"
    );
    taker.release().await?;
    // Another key has its own sequence but must also be well-formed.
    let other = a.lock(unique_key("fence-other")).ttl(ttl).acquire().await?;
    ensure!(other.fence().is_some(), "no fence on another key");
    other.release().await?;
    Ok(())
}

/// 10. Wait timeout: `acquire` with wait T returns `Timeout` within T + a small ε.
pub async fn wait_timeout_is_bounded(factory: &dyn BackendFactory) -> Result<()> {
    let a = locker(factory).await?;
    let b = locker(factory).await?;
    let caps = a.backend().capabilities();
    let ttl = ttl_for(&caps, Duration::from_secs(10));
    let name = unique_key("timeout");
    let guard = a.lock(&name).ttl(ttl).acquire().await?;
    for wait in [
        Duration::ZERO,
        Duration::from_millis(250),
        Duration::from_millis(700),
    ] {
        let started = Instant::now();
        let outcome = b.lock(&name).ttl(ttl).wait(wait).acquire().await;
        let took = started.elapsed();
        match outcome {
            Err(LockError::Timeout { .. }) => {}
            Ok(_) => bail!("acquired a held key"),
            Err(other) => bail!("wait {wait:?}: expected Timeout, got {other}"),
        }
        ensure!(
            took + 5 * MS >= wait,
            "wait {wait:?}: Timeout after only {took:?}"
        );
        ensure!(
            took <= wait + Duration::from_millis(250),
            "wait {wait:?}: Timeout after {took:?}, more than wait + 250 ms"
        );
    }
    ensure!(guard.release().await?, "release returned false");
    // After the timed-out waits nothing of theirs is left: the key is free.
    let again = b
        .lock(&name)
        .ttl(ttl)
        .try_acquire()
        .await?
        .context("timed-out waiters left the key blocked")?;
    again.release().await?;
    Ok(())
}

/// 11. Cancel safety: dropping `acquire` futures mid-wait, at random points, leaves nothing held.
pub async fn cancelled_acquires_leave_nothing(factory: &dyn BackendFactory) -> Result<()> {
    let holder = locker(factory).await?;
    let waiters = [locker(factory).await?, locker(factory).await?];
    let caps = holder.backend().capabilities();
    // Long TTL: a leaked lease would block the key far longer than the check below allows.
    let ttl = ttl_for(&caps, Duration::from_secs(20));
    for round in 0..4 {
        let name = unique_key(&format!("cancel{round}"));
        let guard = holder.lock(&name).ttl(ttl).acquire().await?;
        let mut tasks = Vec::new();
        for task in 0..16 {
            let locker = waiters[task % 2].clone();
            let name = name.clone();
            let give_up = Duration::from_micros(rand::random_range(0..250_000));
            tasks.push(tokio::spawn(async move {
                let acquire = locker
                    .lock(&name)
                    .ttl(ttl)
                    .wait(Duration::from_secs(30))
                    .acquire();
                match timeout(give_up, acquire).await {
                    // Acquired before the cancel: dropping the guard releases it.
                    Ok(Ok(guard)) => drop(guard),
                    Ok(Err(error)) => return Err(anyhow::Error::from(error)),
                    Err(_) => {}
                }
                Ok(())
            }));
        }
        // Release somewhere in the middle of the cancellations, so some are cut off while
        // their attempt is in flight.
        sleep(Duration::from_micros(rand::random_range(0..200_000))).await;
        guard.release().await?;
        for task in tasks {
            task.await??;
        }
        let check = locker(factory).await?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(guard) = check.lock(&name).ttl(ttl).try_acquire().await? {
                guard.release().await?;
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "round {round}: key still held 3 s after every acquire was cancelled or released (TTL {ttl:?})"
            );
            sleep(20 * MS).await;
        }
    }
    Ok(())
}

/// 12. Hand-off: a waiter blocked in `acquire` wakes within a few ms of release, far below its
///     polling interval.
pub async fn handoff_wakes_waiter_fast(factory: &dyn BackendFactory) -> Result<()> {
    let a = locker(factory).await?;
    let b = locker(factory).await?;
    let caps = a.backend().capabilities();
    ensure!(
        caps.release_notifications || caps.fair_queue,
        "backend has no release signal: list `handoff_wakes_waiter_fast` under skip with the reason"
    );
    let ttl = ttl_for(&caps, Duration::from_secs(10));
    // A polling client with this backoff would take ~100 ms or more per hand-off.
    let slow_polling = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    let mut delays = Vec::new();
    for _ in 0..10 {
        let name = unique_key("handoff");
        let guard = a.lock(&name).ttl(ttl).acquire().await?;
        let waiter = {
            let b = b.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let guard = b
                    .lock(&name)
                    .ttl(ttl)
                    .backoff(slow_polling)
                    .wait(Duration::from_secs(10))
                    .acquire()
                    .await?;
                let at = Instant::now();
                guard.release().await?;
                anyhow::Ok(at)
            })
        };
        sleep(Duration::from_millis(300)).await;
        let released_at = Instant::now();
        ensure!(guard.release().await?, "release returned false");
        let acquired_at = waiter.await??;
        delays.push(acquired_at.saturating_duration_since(released_at));
    }
    delays.sort();
    let median = delays[delays.len() / 2];
    ensure!(
        median <= Duration::from_millis(25),
        "median hand-off {median:?} (all: {delays:?}): the waiter is polling, not woken by the release"
    );
    Ok(())
}

async fn faulty_locker(factory: &dyn BackendFactory) -> Result<(Locker, crate::FaultPlan)> {
    let (backend, plan) = FaultyBackend::wrap(factory.backend().await?);
    Ok((Locker::from_arc(backend), plan))
}

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

struct SetOnDrop(Arc<AtomicBool>);
impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
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

/// 14. A guard dropped without `release` frees the lock promptly in the background.
pub async fn drop_releases_in_background(factory: &dyn BackendFactory) -> Result<()> {
    let a = locker(factory).await?;
    let b = locker(factory).await?;
    let caps = a.backend().capabilities();
    let ttl = ttl_for(&caps, Duration::from_secs(30));
    let name = unique_key("drop");
    let guard = a.lock(&name).ttl(ttl).acquire().await?;
    let waiter = {
        let b = b.clone();
        let name = name.clone();
        tokio::spawn(async move {
            b.lock(&name)
                .ttl(ttl)
                .wait(Duration::from_secs(10))
                .acquire()
                .await
        })
    };
    sleep(Duration::from_millis(100)).await;
    let dropped_at = Instant::now();
    drop(guard);
    let next = waiter.await??;
    let took = dropped_at.elapsed();
    ensure!(
        took < Duration::from_millis(500),
        "dropped guard freed the lock only after {took:?} (TTL {ttl:?})"
    );
    next.release().await?;
    Ok(())
}

/// 15. Bad input gets typed errors, never a panic, and leaves no lock behind.
pub async fn bad_input_is_rejected(factory: &dyn BackendFactory) -> Result<()> {
    let locker = locker(factory).await?;
    let backend = locker.backend().clone();
    let too_long = "k".repeat(MAX_KEY_LEN + 1);
    for bad in ["", "a\0b", too_long.as_str()] {
        match locker.try_acquire(bad).await {
            Err(LockError::InvalidKey(_)) => {}
            other => bail!(
                "key {:?}: expected InvalidKey, got {other:?}",
                &bad[..bad.len().min(20)]
            ),
        }
        match locker.with_lock(bad, async {}).await {
            Err(LockError::InvalidKey(_)) => {}
            other => bail!(
                "with_lock key {:?}: expected InvalidKey, got {other:?}",
                &bad[..bad.len().min(20)]
            ),
        }
    }
    let name = unique_key("bad-ttl");
    for ttl in [
        Duration::ZERO,
        MAX_TTL + Duration::from_secs(1),
        Duration::MAX,
    ] {
        match locker.lock(&name).ttl(ttl).try_acquire().await {
            Err(LockError::InvalidTtl { .. }) => {}
            other => bail!("ttl {ttl:?}: expected InvalidTtl, got {other:?}"),
        }
        // The backend itself also refuses, without leaving a lock.
        match backend.try_acquire(&key(&name)?, ttl).await {
            Err(LockError::InvalidTtl { .. }) => {}
            Ok(Attempt::Acquired(lease)) => {
                backend.release(&lease).await?;
                bail!("backend granted a lease with TTL {ttl:?}")
            }
            other => bail!("backend, ttl {ttl:?}: expected InvalidTtl, got {other:?}"),
        }
    }
    let ok_ttl = ttl_for(&backend.capabilities(), Duration::from_secs(5));
    let free = locker
        .lock(&name)
        .ttl(ok_ttl)
        .try_acquire()
        .await?
        .context("bad TTLs left the key held")?;
    free.release().await?;
    // The longest valid key, in multi-byte characters, and odd characters, all work.
    let mut longest = unique_key("long");
    while longest.len() + 'é'.len_utf8() <= MAX_KEY_LEN {
        longest.push('é');
    }
    for good in [longest, format!("ключ/{{x}}:\n\t {}", unique_key("odd"))] {
        let guard = locker
            .lock(&good)
            .ttl(ok_ttl)
            .try_acquire()
            .await?
            .with_context(|| format!("valid key {:?} not acquired", &good[..20]))?;
        ensure!(
            guard.release().await?,
            "release of a valid odd key returned false"
        );
    }
    Ok(())
}

/// 16. 1,000 distinct keys held at once by one `Locker` with auto-renew: all renewed, all
///     released.
pub async fn many_keys_held_and_renewed(factory: &dyn BackendFactory) -> Result<()> {
    const KEYS: usize = 1000;
    let locker = locker(factory).await?;
    let other = factory.backend().await?;
    let caps = locker.backend().capabilities();
    // 3 s: a renewal round of 1,000 leases must fit in the window between TTL/3 and the lost
    // deadline even when the machine is loaded (etcd's 2 s minimum left ~1.2 s).
    let ttl = ttl_for(&caps, Duration::from_secs(3));
    let base = unique_key("many");
    let names: Vec<String> = (0..KEYS).map(|i| format!("{base}-{i}")).collect();
    let guards: Vec<_> = futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let locker = locker.clone();
            async move { locker.lock(name).ttl(ttl).acquire().await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let guards = guards.into_iter().collect::<Result<Vec<_>, _>>()?;
    let all_acquired = Instant::now();
    // Past 1.5 TTL every lease has been renewed at least once.
    sleep(ttl + ttl / 2).await;
    let lost = guards.iter().filter(|guard| guard.is_lost()).count();
    ensure!(
        lost == 0,
        "{lost} of {KEYS} held locks were lost while auto-renew was on"
    );
    let renewed = guards
        .iter()
        .filter(|guard| {
            guard.lease().sent_at() > all_acquired && guard.valid_until() > Instant::now()
        })
        .count();
    ensure!(
        renewed == KEYS,
        "only {renewed} of {KEYS} leases were renewed and are still valid after 1.5 TTL"
    );
    let still_held: Vec<bool> = futures::stream::iter(names.iter())
        .map(|name| {
            let other = other.clone();
            async move { held_by_other(&other, &key(name)?, ttl).await }
        })
        .buffer_unordered(64)
        .collect::<Vec<Result<bool>>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let free = still_held.iter().filter(|held| !**held).count();
    ensure!(
        free == 0,
        "{free} of {KEYS} keys were free on the server while their guards lived"
    );
    let released: Vec<_> = futures::stream::iter(guards)
        .map(|guard| guard.release())
        .buffer_unordered(64)
        .collect()
        .await;
    let released = released.into_iter().collect::<Result<Vec<bool>, _>>()?;
    let refused = released.iter().filter(|ok| !**ok).count();
    ensure!(refused == 0, "{refused} of {KEYS} releases returned false");
    Ok(())
}

/// 17. Keys that are prefixes of each other or contain `/ { } :` or typical backend suffixes
///     are independent.
pub async fn keys_are_independent(factory: &dyn BackendFactory) -> Result<()> {
    let a = locker(factory).await?;
    let b = locker(factory).await?;
    let caps = a.backend().capabilities();
    let ttl = ttl_for(&caps, Duration::from_secs(10));
    let base = unique_key("indep");
    let suffixes = [
        "",
        "/",
        "/b",
        ":",
        ":b",
        ":lock",
        ":fence",
        ":fence:lock",
        "}:fence",
        "{",
        "}",
        "{b}",
        "b",
        "/0",
        "%2F",
        "\\",
        "*",
        "?",
        "[a]",
        " ",
        "_",
        "-",
        ".",
        "..",
        "/..",
        "é",
        "\u{0301}",
    ];
    let names: Vec<String> = suffixes
        .iter()
        .map(|suffix| format!("{base}{suffix}"))
        .chain(std::iter::once(format!("{{{base}}}")))
        .chain(std::iter::once(format!("x{base}")))
        .collect();
    let mut guards = Vec::new();
    for name in &names {
        let guard = a
            .lock(name)
            .ttl(ttl)
            .try_acquire()
            .await?
            .with_context(|| format!("key {name:?} was not free: it collides with another key"))?;
        guards.push(guard);
    }
    for name in &names {
        ensure!(
            b.try_acquire(name).await?.is_none(),
            "key {name:?} was free while held"
        );
    }
    // Releasing one key frees that key only.
    let first = guards.remove(0);
    ensure!(first.release().await?, "release returned false");
    let retaken = b
        .try_acquire(&names[0])
        .await?
        .context("released key not free")?;
    for name in &names[1..] {
        ensure!(
            b.try_acquire(name).await?.is_none(),
            "releasing {:?} freed {name:?}",
            names[0]
        );
    }
    retaken.release().await?;
    for guard in guards {
        let k = guard.key().clone();
        ensure!(guard.release().await?, "release of {k:?} returned false");
    }
    Ok(())
}

fn faults_of<'a>(
    factory: &'a dyn BackendFactory,
    case: &str,
) -> Result<&'a dyn crate::ServerFaults> {
    factory.faults().with_context(|| {
        format!("the factory offers no server fault hooks: implement BackendFactory::faults, or list `{case}` under skip with the reason")
    })
}

/// Holder side of a server fault: `lost()` fires before the validity deadline, and a
/// contender gets the lock only after that.
async fn lost_before_contender(
    factory: &dyn BackendFactory,
    case: &str,
    break_it: impl AsyncFnOnce(&dyn crate::ServerFaults) -> Result<()>,
    mend_it: impl AsyncFnOnce(&dyn crate::ServerFaults) -> Result<()>,
) -> Result<Locker> {
    let faults = faults_of(factory, case)?;
    let holder = locker(factory).await?;
    let caps = holder.backend().capabilities();
    let ttl = ttl_for(&caps, Duration::from_millis(1500));
    let name = unique_key(case);
    let guard = holder.lock(&name).ttl(ttl).acquire().await?;
    break_it(faults).await?;
    let outcome = timeout(ttl + Duration::from_secs(2), guard.lost()).await;
    let lost_at = Instant::now();
    let valid_until = guard.valid_until();
    mend_it(faults).await?;
    outcome.with_context(|| format!("{case}: lost() never fired"))?;
    ensure!(
        lost_at < valid_until,
        "{case}: lost() fired {:?} after the validity deadline",
        lost_at - valid_until
    );
    drop(guard);
    // A fresh client (direct to the service again) takes the lock, after the holder was told.
    let contender = locker(factory).await?;
    let next = contender
        .lock(&name)
        .ttl(ttl)
        .wait(ttl + caps.expiry_slack + Duration::from_secs(5))
        .acquire()
        .await
        .with_context(|| format!("{case}: no contender got the lock after the fault"))?;
    ensure!(
        Instant::now() > lost_at,
        "{case}: a contender got the lock before the holder was told it lost it"
    );
    next.release().await?;
    Ok(holder)
}

/// 18. Server frozen (SIGSTOP) while a lock is held: the holder's `lost()` fires before its
///     validity deadline; after the server resumes a contender acquires, and only after that.
pub async fn server_pause_fires_lost(factory: &dyn BackendFactory) -> Result<()> {
    lost_before_contender(
        factory,
        "server_pause_fires_lost",
        async |faults| faults.pause().await,
        async |faults| faults.resume().await,
    )
    .await?;
    Ok(())
}

/// 19. Connection cut (closed, new ones refused): `lost()` fires before the deadline; after
///     healing, the same backend instance acquires again.
pub async fn connection_cut_fires_lost_and_recovers(factory: &dyn BackendFactory) -> Result<()> {
    let holder = lost_before_contender(
        factory,
        "connection_cut_fires_lost_and_recovers",
        async |faults| faults.cut().await,
        async |faults| faults.heal().await,
    )
    .await?;
    same_instance_recovers(&holder, "cut").await
}

/// 20. Silent partition (nothing forwarded, nothing closed): `lost()` fires before the
///     deadline; after healing, the same backend instance acquires again within seconds
///     (a client that waits for TCP to notice a dead peer would take many minutes).
pub async fn connection_blackhole_fires_lost_and_recovers(
    factory: &dyn BackendFactory,
) -> Result<()> {
    let holder = lost_before_contender(
        factory,
        "connection_blackhole_fires_lost_and_recovers",
        async |faults| faults.blackhole().await,
        async |faults| faults.heal().await,
    )
    .await?;
    same_instance_recovers(&holder, "blackhole").await
}

async fn same_instance_recovers(holder: &Locker, fault: &str) -> Result<()> {
    let caps = holder.backend().capabilities();
    let ttl = ttl_for(&caps, Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(15);
    let name = unique_key("recovered");
    loop {
        match holder.lock(&name).ttl(ttl).try_acquire().await {
            Ok(Some(guard)) => {
                guard.release().await?;
                return Ok(());
            }
            Ok(None) => bail!("after the {fault} healed, a fresh key was reported held"),
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "not recovered yet");
                sleep(Duration::from_millis(100)).await;
            }
            Err(error) => {
                bail!(
                    "the backend instance did not recover within 15 s after the {fault} healed: {error}"
                )
            }
        }
    }
}
