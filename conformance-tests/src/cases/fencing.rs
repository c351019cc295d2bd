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
