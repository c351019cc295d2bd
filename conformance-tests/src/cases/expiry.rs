//! Expiry and renewal: leases end at their TTL unless renewed, and a dead holder frees the lock.

use super::support::*;
use crate::{BackendFactory, unique_key};
use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use std::time::Duration;
use tokio::time::{Instant, sleep};

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

/// 8. A holder that stops renewing (guard leaked, no watchdog) frees the lock within TTL + the
///    backend's slack, and a waiter blocked in `acquire` gets it then: it learns of the
///    freeing from the server (a release signal, a watch, the holder's remaining TTL), not
///    from its backoff, which is 30 s here.
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
        .retry_delay(Duration::from_secs(30))
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

/// 37. Renewals keep their pace: a lease of a long TTL held beside one of a short TTL is not
///     renewed along with it (the watchdog may send a renewal a little early to go with
///     others, not whenever another lease is due).
pub async fn long_lease_is_not_renewed_with_short_ones(factory: &dyn BackendFactory) -> Result<()> {
    let (locker, plan) = faulty_locker(factory).await?;
    let caps = locker.backend().capabilities();
    let short = ttl_for(&caps, Duration::from_millis(900));
    let long = short * 12;
    let window = short * 2;
    let short_guard = locker
        .lock(unique_key("short"))
        .ttl(short)
        .acquire()
        .await?;
    let long_guard = locker.lock(unique_key("long")).ttl(long).acquire().await?;
    let long_valid = long_guard.valid_until();
    let before = plan.renew_calls();
    sleep(window).await;
    let calls = plan.renew_calls() - before;
    // The short lease: one renewal per third of its TTL (6 in the window, and retries are
    // not expected here); the long one: none before a third of its TTL (4 short TTLs).
    ensure!(
        calls <= 8,
        "{calls} renewals in {window:?} for one lease of {short:?} and one of {long:?}: the \
         long one is renewed with the short one"
    );
    ensure!(
        long_guard.valid_until() == long_valid,
        "the lease of {long:?} was renewed within {window:?}"
    );
    ensure!(!short_guard.is_lost(), "the short lease was lost");
    drop((short_guard, long_guard));
    Ok(())
}
