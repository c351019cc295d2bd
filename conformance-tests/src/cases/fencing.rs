//! Fencing: tokens strictly increase per key.

use super::support::*;
use crate::{BackendFactory, unique_key};
use anyhow::{Context, Result, ensure};
use std::time::Duration;

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

/// What [`fences_increase_across_a_server_restart`] takes a fence of.
#[derive(Clone, Copy, Debug)]
enum Fenced {
    Lock,
    Permits,
    Writer,
}

/// One fence of `what` on `name`, waiting (and, while the server comes back, retrying
/// retryable errors) up to 60 s.
async fn fence_of(
    locker: &lock_core::Locker,
    what: Fenced,
    name: &str,
    ttl: Duration,
) -> Result<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let request = match what {
            Fenced::Lock => locker.lock(name),
            Fenced::Permits => locker.semaphore(name, 2),
            Fenced::Writer => locker.rwlock(name).write(),
        };
        match request
            .ttl(ttl)
            .wait(Duration::from_secs(10))
            .acquire()
            .await
        {
            Ok(guard) => {
                let fence = guard
                    .fence()
                    .with_context(|| format!("no fence for a {what:?}"))?;
                guard.release().await?;
                return Ok(fence.0);
            }
            Err(error) if error.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => {
                return Err(error).with_context(|| format!("{what:?} on {name:?}"));
            }
        }
    }
}

/// Fences keep increasing across a crash of the server (killed, then started again with
/// whatever it had made durable, as after a power cut or an OOM kill): a fence counter the
/// server lost, or that fell behind what it had handed out, must not hand out a fence below
/// one handed out before. Checked for the backend that lived through the restart and for a
/// new one, for locks and, where the backend has them, semaphores and writers. Each kind is
/// used once first (a backend may create what it needs then, and such a step may flush
/// whatever the server had not), and the last kind drawn before the crash, locks, draws 40
/// fences: a counter that reserves values ahead in batches (PostgreSQL logs a sequence 32
/// values ahead) must reserve again after the last such flush.
pub async fn fences_increase_across_a_server_restart(factory: &dyn BackendFactory) -> Result<()> {
    let case = "fences_increase_across_a_server_restart";
    let faults = super::support::faults_of(factory, case)?;
    let before = locker(factory).await?;
    let caps = before.backend().capabilities();
    ensure!(
        caps.fencing,
        "backend declares no fencing tokens: list `{case}` under skip with the reason"
    );
    let ttl = ttl_for(&caps, Duration::from_secs(10));
    let mut kinds = Vec::new();
    if caps.semaphores {
        kinds.push(Fenced::Permits);
    }
    if caps.rw_locks {
        kinds.push(Fenced::Writer);
    }
    kinds.push(Fenced::Lock);
    let names: Vec<String> = kinds
        .iter()
        .map(|kind| unique_key(&format!("restart-{kind:?}")))
        .collect();
    for (kind, name) in kinds.iter().zip(&names) {
        fence_of(&before, *kind, name, ttl).await?;
    }
    let mut last = Vec::new();
    for (kind, name) in kinds.iter().zip(&names) {
        let draws = if matches!(kind, Fenced::Lock) { 40 } else { 5 };
        let mut fence = 0;
        for _ in 0..draws {
            fence = fence_of(&before, *kind, name, ttl).await?;
        }
        last.push(fence);
    }
    faults.restart().await?;
    let after = locker(factory).await?;
    for ((kind, name), last) in kinds.iter().zip(&names).zip(&last) {
        for (who, locker) in [
            ("the backend from before the restart", &before),
            ("a new backend", &after),
        ] {
            let fence = fence_of(locker, *kind, name, ttl).await?;
            ensure!(
                fence > *last,
                "{kind:?}: {who} got fence {fence} after the server restarted, not above {last} from before it"
            );
        }
    }
    Ok(())
}
