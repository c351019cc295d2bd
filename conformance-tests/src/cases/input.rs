//! Input: bad keys and TTLs are typed errors; unusual keys are independent.

use super::support::*;
use crate::{BackendFactory, unique_key};
use anyhow::{Context, Result, bail, ensure};
use lock_core::{Attempt, LockError, MAX_KEY_LEN, MAX_TTL};
use std::time::Duration;

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
