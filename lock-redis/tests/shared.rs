//! Semaphores and reader-writer locks on a real `redis-server`, where Redis has failure modes
//! of its own: releases nobody waits for publish nothing, an abandoned name leaves no keys
//! behind, a forged lease frees nothing, and a restart without persistence loses holders
//! cleanly.

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use lock_core::{LockBackend, LockError, LockKey, OwnerToken, RwMode};
use lock_harness::redis::RedisServer;
use lock_redis::{KeyScheme, RedisBackend, RedisOptions};
use std::time::Duration;
use tokio::time::{sleep, timeout};

fn scheme() -> Result<KeyScheme> {
    Ok(KeyScheme::new(RedisOptions::default_prefix(), 0)?)
}

/// Every key of the semaphore and the rwlock `key` (not the slot's fence counter, which is
/// shared and meant to stay) that exists on the server.
async fn leftover_keys(server: &RedisServer, key: &LockKey) -> Result<Vec<String>> {
    let scheme = scheme()?;
    let [holders, meta, _] = scheme.semaphore_keys(key);
    let [readers, writer, intent, mark, _] = scheme.rw_keys(key);
    let mut conn = server.client()?.get_multiplexed_async_connection().await?;
    let mut left = Vec::new();
    for name in [holders, meta, readers, writer, intent, mark] {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&name)
            .query_async(&mut conn)
            .await?;
        if exists {
            left.push(name);
        }
    }
    Ok(left)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_releases_without_waiters_publish_nothing() -> Result<()> {
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let key = LockKey::new("quiet-shared")?;
    let mut pubsub = server.client()?.get_async_pubsub().await?;
    pubsub.subscribe(scheme()?.channel(key.as_str())).await?;
    let ttl = Duration::from_secs(5);
    for _ in 0..5 {
        let permits = backend
            .try_acquire_permits(&key, 3, 2, ttl)
            .await?
            .into_lease()
            .context("free semaphore refused")?;
        ensure!(backend.release(&permits).await?, "permit release refused");
        for mode in [RwMode::Read, RwMode::Write] {
            let side = backend
                .try_acquire_rw(&key, mode, ttl)
                .await?
                .into_lease()
                .context("free rwlock refused")?;
            ensure!(backend.release(&side).await?, "{mode:?} release refused");
        }
    }
    let message = timeout(Duration::from_millis(300), pubsub.on_message().next()).await;
    ensure!(
        message.is_err(),
        "a release nobody waited for was published"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_and_released_names_leave_no_keys() -> Result<()> {
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let ttl = Duration::from_millis(300);
    // Released: nothing stays.
    let released = LockKey::new("released-shared")?;
    let permits = backend
        .try_acquire_permits(&released, 2, 1, ttl)
        .await?
        .into_lease()
        .context("free semaphore refused")?;
    let reader = backend
        .try_acquire_rw(&released, RwMode::Read, ttl)
        .await?
        .into_lease()
        .context("free rwlock refused")?;
    backend.release(&permits).await?;
    backend.release(&reader).await?;
    let left = leftover_keys(&server, &released).await?;
    ensure!(left.is_empty(), "released names left {left:?}");
    // Abandoned (never released, nobody comes back): the keys expire with their holders.
    let abandoned = LockKey::new("abandoned-shared")?;
    for (limit, count) in [(3, 2), (3, 1)] {
        let lease = backend
            .try_acquire_permits(&abandoned, limit, count, ttl)
            .await?;
        ensure!(lease.into_lease().is_some(), "free permits refused");
    }
    let lease = backend
        .try_acquire_rw(&abandoned, RwMode::Read, ttl)
        .await?;
    ensure!(lease.into_lease().is_some(), "free reader refused");
    ensure!(
        !leftover_keys(&server, &abandoned).await?.is_empty(),
        "the holders were not written where the test looks"
    );
    sleep(ttl + Duration::from_millis(300)).await;
    let left = leftover_keys(&server, &abandoned).await?;
    ensure!(left.is_empty(), "abandoned names left {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_shared_leases_free_nothing() -> Result<()> {
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let key = LockKey::new("forged-shared")?;
    let ttl = Duration::from_secs(10);
    let permits = backend
        .try_acquire_permits(&key, 2, 2, ttl)
        .await?
        .into_lease()
        .context("free semaphore refused")?;
    let forged = permits.clone().with_owner(OwnerToken::random());
    ensure!(
        matches!(
            backend.renew(&forged, ttl).await,
            Err(LockError::Lost { .. })
        ),
        "a forged permit lease renewed"
    );
    ensure!(
        !backend.release(&forged).await?,
        "a forged permit lease released"
    );
    ensure!(
        backend
            .try_acquire_permits(&key, 2, 1, ttl)
            .await?
            .into_lease()
            .is_none(),
        "a forged release freed a permit"
    );
    let writer = backend
        .try_acquire_rw(&key, RwMode::Write, ttl)
        .await?
        .into_lease()
        .context("free rwlock refused")?;
    let forged = writer.clone().with_owner(OwnerToken::random());
    ensure!(
        matches!(
            backend.renew(&forged, ttl).await,
            Err(LockError::Lost { .. })
        ),
        "a forged writer lease renewed"
    );
    ensure!(
        !backend.release(&forged).await?,
        "a forged writer lease released"
    );
    ensure!(
        backend
            .try_acquire_rw(&key, RwMode::Write, ttl)
            .await?
            .into_lease()
            .is_none(),
        "a forged release freed the writer's side"
    );
    ensure!(
        backend.release(&permits).await?,
        "the real permits were gone"
    );
    ensure!(backend.release(&writer).await?, "the real writer was gone");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_persistence_loses_shared_holders_cleanly() -> Result<()> {
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let key = LockKey::new("restarted-shared")?;
    let ttl = Duration::from_secs(10);
    let permits = backend
        .try_acquire_permits(&key, 2, 1, ttl)
        .await?
        .into_lease()
        .context("free semaphore refused")?;
    let reader = backend
        .try_acquire_rw(&key, RwMode::Read, ttl)
        .await?
        .into_lease()
        .context("free rwlock refused")?;
    server.restart()?;
    // The restarted server has forgotten both holders (and the scripts: NOSCRIPT reloads).
    let mut outcome = backend.renew(&permits, ttl).await;
    for _ in 0..50 {
        if !matches!(&outcome, Err(error) if error.is_retryable()) {
            break;
        }
        sleep(Duration::from_millis(100)).await;
        outcome = backend.renew(&permits, ttl).await;
    }
    ensure!(
        matches!(outcome, Err(LockError::Lost { .. })),
        "renewing permits after a restart gave {outcome:?}"
    );
    let outcome = backend.renew(&reader, ttl).await;
    ensure!(
        matches!(outcome, Err(LockError::Lost { .. })),
        "renewing a reader after a restart gave {outcome:?}"
    );
    // The name works again, with a new limit (no permit is held any more).
    let again = backend
        .try_acquire_permits(&key, 5, 5, ttl)
        .await?
        .into_lease()
        .context("the restarted semaphore refused")?;
    ensure!(
        backend.release(&again).await?,
        "release after restart refused"
    );
    ensure!(
        !backend.release(&permits).await?,
        "a forgotten permit released"
    );
    Ok(())
}

/// Redlock fences for reader-writer locks: a later writer's fence exceeds an earlier
/// reader's even when its quorum misses the node that gave the reader its (largest) fence,
/// because the reader's fence round raised the other quorum nodes while its share was there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_rw_fences_increase_across_quorums() -> Result<()> {
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(RedisServer::start()?);
    }
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let backend = lock_redis::RedlockBackend::connect_nodes(&urls, RedisOptions::default()).await?;
    let key = LockKey::new("rw-fences")?;
    let ttl = Duration::from_secs(10);
    let first = backend
        .try_acquire_rw(&key, RwMode::Write, ttl)
        .await?
        .into_lease()
        .context("free rwlock refused a writer")?;
    backend.release(&first).await?;
    // Release returns once a quorum answered; the third node's release may still be on its
    // way (in the background) and would make that node refuse the reader below: wait until
    // no node has the writer key. The acquire also returned at a quorum, and its call to the
    // third node may land after the release's; since 2026-12-02 that call releases the writer
    // itself (`late_calls.rs`; tested in `faults.rs`). Before, a CI run (loaded machine) found
    // the writer on a node 5 s later. One case stays uncovered there (a call cut off by the
    // node timeout whose connection was replaced before the release), so this test still
    // releases again now and then rather than fail on it.
    let writer_key = scheme()?.rw_keys(&key)[1].clone();
    for server in &servers {
        let mut conn = server.client()?.get_multiplexed_async_connection().await?;
        let gone = async {
            let mut checks = 0_u32;
            loop {
                let exists: bool = redis::cmd("EXISTS")
                    .arg(&writer_key)
                    .query_async(&mut conn)
                    .await?;
                if !exists {
                    return anyhow::Ok(());
                }
                checks += 1;
                if checks.is_multiple_of(50) {
                    backend.release(&first).await?;
                }
                sleep(Duration::from_millis(10)).await;
            }
        };
        timeout(Duration::from_secs(5), gone)
            .await
            .context("a node kept the released writer for 5 s")??;
    }
    // The third node's counter runs far ahead of the others (as after other keys of its slot
    // were locked there while the other nodes were down).
    let fence_key = scheme()?.rw_keys(&key)[4].clone();
    let mut third = servers[2]
        .client()?
        .get_multiplexed_async_connection()
        .await?;
    let _: i64 = redis::cmd("INCRBY")
        .arg(&fence_key)
        .arg(100)
        .query_async(&mut third)
        .await?;
    // The reader's quorum is the second and third node (the first is paused).
    servers[0].pause()?;
    let short = Duration::from_secs(1);
    // A few tries: on a loaded machine a live node may miss the per-node timeout (TTL/5) once.
    let mut reader = None;
    for _ in 0..5 {
        match backend.try_acquire_rw(&key, RwMode::Read, short).await {
            Ok(attempt) => {
                if let Some(lease) = attempt.into_lease() {
                    reader = Some(lease);
                    break;
                }
            }
            Err(error) if error.is_retryable() => {}
            Err(error) => {
                servers[0].resume()?;
                return Err(error.into());
            }
        }
        sleep(Duration::from_millis(300)).await;
    }
    servers[0].resume()?;
    let reader = reader.context("free rwlock refused a reader five times")?;
    let reader_fence = reader.fence().context("no reader fence")?;
    ensure!(
        reader_fence.0 > 100,
        "the reader's fence {reader_fence} is not the quorum's largest"
    );
    backend.release(&reader).await?;
    // The paused node ran the reader's acquire late: let that share expire too.
    sleep(short + Duration::from_millis(300)).await;
    // Without the third node, a writer's quorum is the first two.
    servers[2].kill()?;
    let writer = backend
        .try_acquire_rw(&key, RwMode::Write, ttl)
        .await?
        .into_lease()
        .context("the writer was refused with two of three nodes up")?;
    let writer_fence = writer.fence().context("no writer fence")?;
    ensure!(
        writer_fence > reader_fence,
        "a writer's fence {writer_fence} is not above the earlier reader's {reader_fence}"
    );
    backend.release(&writer).await?;
    Ok(())
}

/// A semaphore acquire whose answer never came (a stall past the command timeout) but whose
/// script ran must not keep a permit, with a token nobody knows, for the whole TTL: the
/// backend returns it in the background, as it frees a lock's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_permit_acquire_leaves_no_permit_behind() -> Result<()> {
    let server = RedisServer::builder().proxy(true).start()?;
    let proxy = server.proxy().context("no proxy")?;
    let options = RedisOptions::default().command_timeout(Duration::from_millis(300));
    let backend = RedisBackend::connect_with(&server.url(), options).await?;
    // Load the scripts first (a NOSCRIPT round trip would keep the script from running).
    let warm = LockKey::new("warm-up")?;
    for mode in [RwMode::Read, RwMode::Write] {
        let lease = backend
            .try_acquire_rw(&warm, mode, Duration::from_secs(5))
            .await?
            .into_lease()
            .context("warm-up refused")?;
        backend.release(&lease).await?;
    }
    let lease = backend
        .try_acquire_permits(&warm, 1, 1, Duration::from_secs(5))
        .await?
        .into_lease()
        .context("warm-up refused")?;
    backend.release(&lease).await?;
    let mut conn = server.client()?.get_multiplexed_async_connection().await?;
    for (what, key) in [("permits", "failed-permits"), ("writer", "failed-writer")] {
        let key = LockKey::new(key)?;
        let [holders, _, fence_key] = scheme()?.semaphore_keys(&key);
        let held_at = if what == "permits" {
            holders
        } else {
            scheme()?.rw_keys(&key)[1].clone()
        };
        // The acquire script counts a fence when it admits: that shows it ran, however
        // briefly its key lived.
        let fence_before: Option<u64> = redis::cmd("GET")
            .arg(&fence_key)
            .query_async(&mut conn)
            .await?;
        // 500 ms each way: the script runs on the server, the answer comes after the client
        // gave up.
        proxy.set_delay(Duration::from_millis(500));
        let attempt = if what == "permits" {
            backend
                .try_acquire_permits(&key, 1, 1, Duration::from_secs(30))
                .await
        } else {
            backend
                .try_acquire_rw(&key, RwMode::Write, Duration::from_secs(30))
                .await
        };
        ensure!(
            attempt.is_err(),
            "{what} through a 1 s round trip: {attempt:?}"
        );
        let failed_at = tokio::time::Instant::now();
        let (mut ran, mut freed) = (false, false);
        while failed_at.elapsed() < Duration::from_secs(4) {
            let fence: Option<u64> = redis::cmd("GET")
                .arg(&fence_key)
                .query_async(&mut conn)
                .await?;
            ran = fence > fence_before;
            let exists: bool = redis::cmd("EXISTS")
                .arg(&held_at)
                .query_async(&mut conn)
                .await?;
            if ran && !exists {
                freed = true;
                break;
            }
            sleep(Duration::from_millis(20)).await;
        }
        proxy.set_delay(Duration::ZERO);
        ensure!(ran, "the delayed {what} acquire never ran on the server");
        ensure!(
            freed,
            "the {what} of a failed acquire were still held {:?} later (TTL 30 s)",
            failed_at.elapsed()
        );
        // Let the clean-up's answers come back before the next round.
        sleep(Duration::from_millis(1200)).await;
    }
    Ok(())
}

/// A Redlock rwlock attempt whose nodes all refuse the connection is an error, as a lock's
/// is: nobody holds the name, so answering "held" would have a waiter wait for a holder
/// that does not exist, and `try_read`/`try_write` would report contention for an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_rw_with_every_node_down_is_an_error() -> Result<()> {
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(RedisServer::start()?);
    }
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let backend = lock_redis::RedlockBackend::connect_nodes(&urls, RedisOptions::default()).await?;
    let key = LockKey::new("rw-all-down")?;
    for server in &mut servers {
        server.kill()?;
    }
    let ttl = Duration::from_secs(5);
    let lock = backend.try_acquire(&key, ttl).await;
    ensure!(lock.is_err(), "a lock with every node down gave {lock:?}");
    for mode in [RwMode::Read, RwMode::Write] {
        let attempt = backend.try_acquire_rw(&key, mode, ttl).await;
        ensure!(
            matches!(&attempt, Err(error) if error.is_retryable()),
            "a {mode:?} attempt with every node down gave {attempt:?}"
        );
    }
    Ok(())
}

/// A caller with another limit, arriving after a holder expired, must not leave the expired
/// holder's permits counted: the script drops expired holders before it compares limits,
/// and it used to return the mismatch without writing the lowered count back, so those
/// permits were lost for as long as the semaphore had any holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_mismatch_after_an_expiry_leaks_no_permits() -> Result<()> {
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let key = LockKey::new("mismatch-after-expiry")?;
    // A: 3 of 5, abandoned (short TTL, never renewed); B: 1 of 5, held.
    let short = Duration::from_millis(200);
    let long = Duration::from_secs(30);
    let _abandoned = backend
        .try_acquire_permits(&key, 5, 3, short)
        .await?
        .into_lease()
        .context("3 free permits refused")?;
    let held = backend
        .try_acquire_permits(&key, 5, 1, long)
        .await?
        .into_lease()
        .context("a 4th free permit refused")?;
    sleep(short + Duration::from_millis(100)).await;
    // C asks with another limit: refused, and it removes A's expired entry on the way.
    match backend.try_acquire_permits(&key, 4, 1, long).await {
        Err(LockError::InvalidConfig(_)) => {}
        other => anyhow::bail!("limit 4 against 5: expected InvalidConfig, got {other:?}"),
    }
    // 1 of 5 is in use: 4 more must be free.
    let more = backend
        .try_acquire_permits(&key, 5, 4, long)
        .await?
        .into_lease()
        .context("4 of the 5 permits refused while only 1 is held: the expired holder's 3 stayed counted")?;
    backend.release(&more).await?;
    backend.release(&held).await?;
    Ok(())
}
