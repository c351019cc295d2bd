//! Exclusion: one holder at a time, and only the holder can renew or release.

use super::support::*;
use crate::{BackendFactory, unique_key};
use anyhow::{Context, Result, bail, ensure};
use lock_core::{LockError, Locker, OwnerToken};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Barrier;
use tokio::time::{Instant, sleep};

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

/// 7. Several keys at once (`lock_all`): callers naming the same keys in opposite orders, on
///    two backend instances, never deadlock and never hold a key together (hold windows
///    checked per key, fences increasing); a round that finds one key held holds none.
pub async fn lock_all_never_deadlocks_or_overlaps(factory: &dyn BackendFactory) -> Result<()> {
    const ROUNDS: usize = 12;
    let lockers = [locker(factory).await?, locker(factory).await?];
    let ttl = ttl_for(
        &lockers[0].backend().capabilities(),
        Duration::from_secs(10),
    );
    let (a, b) = (unique_key("multi-a"), unique_key("multi-b"));
    // (key, start, end, fence) of every hold.
    let windows = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (task, keys) in [[a.clone(), b.clone()], [b.clone(), a.clone()]]
        .into_iter()
        .cycle()
        .take(4)
        .enumerate()
    {
        let locker = lockers[task % 2].clone();
        let windows = windows.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = locker
                    .lock_all(keys.clone())
                    .ttl(ttl)
                    .wait(Duration::from_secs(60))
                    .acquire()
                    .await?;
                let start = Instant::now();
                tokio::task::yield_now().await;
                sleep(MS).await;
                let end = Instant::now();
                {
                    let mut windows = windows.lock().unwrap_or_else(|p| p.into_inner());
                    for held in guard.guards() {
                        windows.push((held.key().to_string(), start, end, held.fence()));
                    }
                }
                ensure!(
                    guard.release().await?,
                    "release of a lock_all guard returned false"
                );
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::timeout(Duration::from_secs(120), async {
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    })
    .await
    .context("lock_all callers with opposite key orders deadlocked")??;
    let windows = windows.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for name in [&a, &b] {
        let mut mine: Vec<_> = windows.iter().filter(|w| &w.0 == name).collect();
        ensure!(
            mine.len() == 4 * ROUNDS,
            "{name}: {} holds, expected {}",
            mine.len(),
            4 * ROUNDS
        );
        mine.sort_by_key(|w| w.1);
        for pair in mine.windows(2) {
            ensure!(
                pair[1].1 >= pair[0].2,
                "{name}: hold windows overlap: {:?} and {:?}",
                pair[0],
                pair[1]
            );
            if let (Some(first), Some(second)) = (pair[0].3, pair[1].3) {
                ensure!(
                    second > first,
                    "{name}: fences not increasing: {first} then {second}"
                );
            }
        }
    }
    // All or nothing: with b held elsewhere, a round gets nothing and leaves a free.
    let other = lockers[1].lock(&b).ttl(ttl).acquire().await?;
    let round = lockers[0]
        .lock_all([a.clone(), b.clone()])
        .ttl(ttl)
        .try_acquire()
        .await?;
    ensure!(round.is_none(), "lock_all got every key while {b} was held");
    let a_free = lockers[1].lock(&a).ttl(ttl).try_acquire().await?;
    ensure!(
        a_free.is_some(),
        "{a} stayed held after an incomplete lock_all round"
    );
    drop(a_free);
    other.release().await?;
    Ok(())
}
