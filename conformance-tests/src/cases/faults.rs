//! Server and network faults: a paused server, a cut connection, a silent partition.

use super::support::*;
use crate::{BackendFactory, unique_key};
use anyhow::{Context, Result, bail, ensure};
use lock_core::Locker;
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

/// Holder side of a server fault: `lost()` fires before the validity deadline, and a
/// contender gets the lock only after that. With `server_still_holds` (a fault the server
/// does not see: a silent partition), the server is read directly the moment `lost()` fired:
/// it must still hold the key, or a contender could have had it before the holder was told.
/// (Not for a cut: a server that ends a session when its connection closes, as PostgreSQL
/// does, frees its locks at once, before any client could be told; nor for a paused server,
/// which cannot be read.)
async fn lost_before_contender(
    factory: &dyn BackendFactory,
    case: &str,
    server_still_holds: bool,
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
    // The server's own TTL started after the lease's request was sent: a read answered
    // before `sent_at + ttl` saw the key while the server could not yet have freed it by
    // expiry. A later answer (a slow machine) proves nothing either way.
    let lease = guard.lease();
    let server_expiry_floor = lease.sent_at() + lease.ttl();
    let held_when_told = if server_still_holds && outcome.is_ok() {
        let key = lock_core::LockKey::new(name.clone())?;
        let read = timeout(Duration::from_secs(2), factory.is_held(&key))
            .await
            .ok()
            .transpose()?
            .flatten();
        read.filter(|_| Instant::now() < server_expiry_floor)
    } else {
        None
    };
    mend_it(faults).await?;
    outcome.with_context(|| format!("{case}: lost() never fired"))?;
    ensure!(
        lost_at < valid_until,
        "{case}: lost() fired {:?} after the validity deadline",
        lost_at - valid_until
    );
    ensure!(
        held_when_told != Some(false),
        "{case}: the server had freed the key when lost() fired: a contender could have \
         held it before the holder was told"
    );
    drop(guard);
    // A fresh client (direct to the service again) takes the lock: the service is usable
    // after the fault. (That it could not have had it before the holder was told is the
    // direct read above; a contender started after `lost()` proves nothing about that.)
    let contender = locker(factory).await?;
    let next = contender
        .lock(&name)
        .ttl(ttl)
        .wait(ttl + caps.expiry_slack_for(ttl) + Duration::from_secs(5))
        .acquire()
        .await
        .with_context(|| format!("{case}: no contender got the lock after the fault"))?;
    next.release().await?;
    Ok(holder)
}

/// 18. Server frozen (SIGSTOP) while a lock is held: the holder's `lost()` fires before its
///     validity deadline; after the server resumes a contender acquires, and only after that.
pub async fn server_pause_fires_lost(factory: &dyn BackendFactory) -> Result<()> {
    lost_before_contender(
        factory,
        "server_pause_fires_lost",
        false,
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
        false,
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
        true,
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

/// 35. A holder cut off from the server (to the server, a stopped process: nothing more is
///     said, nothing is closed) while it holds leases of one TTL taken in two groups 60 % of
///     a TTL apart: on the server each is free within [`Capabilities::expiry_slack_for`] of
///     its own deadline, and never before that deadline. A backend whose server frees leases
///     in groups (they share a connection, a session, a lease) must say so in
///     `expiry_slack_ttl_percent`. Six keys a group, so that a backend spreading keys over a
///     few connections puts leases of both groups on one of them.
///
/// [`Capabilities::expiry_slack_for`]: lock_core::Capabilities::expiry_slack_for
pub async fn stopped_holders_leases_expire_by_their_slack(
    factory: &dyn BackendFactory,
) -> Result<()> {
    let case = "stopped_holders_leases_expire_by_their_slack";
    let faults = faults_of(factory, case)?;
    let holder = factory.backend().await?;
    let caps = holder.capabilities();
    let ttl = ttl_for(&caps, Duration::from_millis(1500));
    let slack = caps.expiry_slack_for(ttl);
    let mut leases = Vec::new();
    for group in 0..2 {
        if group > 0 {
            sleep(ttl * 3 / 5).await;
        }
        for index in 0..6 {
            let k = key(&unique_key(&format!("stopped-{group}-{index}")))?;
            let lease = holder
                .try_acquire(&k, ttl)
                .await?
                .into_lease()
                .with_context(|| format!("{k:?}: a fresh key was held"))?;
            // The server started the TTL between sending and this answer.
            let answered = Instant::now();
            leases.push((k, lease, answered));
        }
    }
    faults.blackhole().await?;
    let cut_at = Instant::now();
    let outcome = async {
        // Every key is polled on every round (directly on the server, not through the
        // cut-off link), so a key freed early with an earlier group is seen when it goes.
        let mut freed_at: Vec<Option<Instant>> = vec![None; leases.len()];
        // When the last read that found each key held was sent: the server held it at some
        // instant after that, so a stall of this task between reads never counts against it.
        let mut held_when_asked: Vec<Option<Instant>> = vec![None; leases.len()];
        let give_up = leases
            .iter()
            .map(|(_, lease, answered)| *answered + lease.ttl() + slack)
            .max()
            .unwrap_or_else(Instant::now)
            + Duration::from_secs(3);
        while freed_at.iter().any(Option::is_none) {
            for (((k, _, _), freed), held_asked) in leases
                .iter()
                .zip(freed_at.iter_mut())
                .zip(held_when_asked.iter_mut())
            {
                if freed.is_some() {
                    continue;
                }
                let asked = Instant::now();
                match factory.is_held(k).await? {
                    Some(true) => *held_asked = Some(asked),
                    Some(false) => *freed = Some(Instant::now()),
                    None => bail!(
                        "{case}: the factory cannot read the server (BackendFactory::is_held); \
                         implement it or skip the case with the reason"
                    ),
                }
            }
            ensure!(
                Instant::now() < give_up,
                "{case}: {} of {} leases still held 3 s past their deadline + slack {slack:?}",
                freed_at.iter().filter(|freed| freed.is_none()).count(),
                leases.len()
            );
            sleep(10 * MS).await;
        }
        // On failure, every lease's times (ms from the first acquire's sending), so that a
        // rare failure says which group and which order of events it was.
        let origin = leases
            .first()
            .map_or(cut_at, |(_, lease, _)| lease.sent_at());
        let at = |instant: Instant| instant.saturating_duration_since(origin).as_millis();
        let timeline = format!(
            "cut at {} ms; per lease (sent, answered, deadline, freed): {}",
            at(cut_at),
            leases
                .iter()
                .zip(&freed_at)
                .map(|((_, lease, answered), freed)| format!(
                    "({}, {}, {}, {})",
                    at(lease.sent_at()),
                    at(*answered),
                    at(lease.sent_at() + lease.ttl()),
                    freed.map_or_else(|| "-".to_owned(), |freed| at(freed).to_string())
                ))
                .collect::<Vec<_>>()
                .join(" ")
        );
        for (((k, lease, answered), freed_at), held_asked) in
            leases.iter().zip(freed_at).zip(held_when_asked)
        {
            let freed_at = freed_at.context("polled until every lease was freed")?;
            // The server starts the TTL after `sent_at`, so it never frees before this;
            // 20 ms for the poll's scheduling.
            let earliest = lease.sent_at() + lease.ttl();
            ensure!(
                freed_at + 20 * MS >= earliest,
                "{case}: {k:?} freed {:?} before its deadline; {timeline}",
                earliest.saturating_duration_since(freed_at)
            );
            // Late only if a read sent after deadline + slack still found it held; 150 ms
            // for the server's own expiry rounds (it was measured from the answer of the
            // freeing read, which a loaded machine's poll loop could delay by as much).
            let latest = *answered + lease.ttl() + slack;
            if let Some(held_asked) = held_asked {
                ensure!(
                    held_asked <= latest + 150 * MS,
                    "{case}: {k:?} of a stopped holder was still held {:?} after its \
                     deadline; Capabilities::expiry_slack_for({ttl:?}) says {slack:?}; \
                     {timeline}",
                    held_asked.saturating_duration_since(earliest)
                );
            }
        }
        Ok(())
    }
    .await;
    faults.heal().await?;
    outcome
}
