//! Reader-writer locks: readers share, a writer excludes everyone, writers are not starved by
//! a stream of readers, fences order writers after everyone before them.

use super::support::*;
use crate::{BackendFactory, Fault, unique_key};
use anyhow::{Context, Result, ensure};
use lock_core::{Capabilities, FencingToken};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

fn require_rw_locks(caps: &Capabilities) -> Result<()> {
    ensure!(
        caps.rw_locks,
        "the backend has no reader-writer locks (Capabilities::rw_locks is false): list this \
         case under skip with the reason"
    );
    Ok(())
}

/// One hold: writer or not, its window, its fence.
type Hold = (bool, Instant, Instant, Option<FencingToken>);

/// 25. Readers and writers on two backend instances: no reader holds during a writer, no two
///     writers overlap (windows recorded and checked), readers do share, and a writer's fence
///     is greater than that of every hold that ended before it began.
pub async fn rwlock_readers_share_writers_exclude(factory: &dyn BackendFactory) -> Result<()> {
    let lockers = [locker(factory).await?, locker(factory).await?];
    let caps = lockers[0].backend().capabilities();
    require_rw_locks(&caps)?;
    let ttl = ttl_for(&caps, Duration::from_secs(10));
    let name = unique_key("rwlock");
    let holds: Arc<std::sync::Mutex<Vec<Hold>>> = Arc::default();
    let mut tasks = Vec::new();
    for task in 0..10usize {
        let locker = lockers[task % 2].clone();
        let (name, holds) = (name.clone(), holds.clone());
        let writer = task % 5 == 0;
        tasks.push(tokio::spawn(async move {
            for _ in 0..4 {
                let side = locker.rwlock(&name);
                let request = if writer { side.write() } else { side.read() };
                let guard = request
                    .ttl(ttl)
                    .wait(Duration::from_secs(60))
                    .acquire()
                    .await?;
                let start = Instant::now();
                sleep(if writer { 3 * MS } else { 8 * MS }).await;
                let end = Instant::now();
                holds.lock().unwrap_or_else(|p| p.into_inner()).push((
                    writer,
                    start,
                    end,
                    guard.fence(),
                ));
                ensure!(
                    guard.release().await?,
                    "release of an rwlock guard returned false"
                );
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let holds = holds.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut readers_shared = false;
    for (i, a) in holds.iter().enumerate() {
        for b in &holds[i + 1..] {
            let overlap = a.1 < b.2 && b.1 < a.2;
            if overlap && (a.0 || b.0) {
                anyhow::bail!("a writer overlapped another holder: {a:?} and {b:?}");
            }
            readers_shared |= overlap;
        }
    }
    ensure!(
        readers_shared,
        "no two readers ever held at once: readers do not share"
    );
    for writer in holds.iter().filter(|hold| hold.0) {
        for earlier in holds.iter().filter(|hold| hold.2 <= writer.1) {
            if let (Some(before), Some(mine)) = (earlier.3, writer.3) {
                ensure!(
                    mine > before,
                    "a writer's fence {mine} is not above an earlier holder's {before}"
                );
            }
        }
    }
    Ok(())
}

/// 26. A continuous stream of overlapping readers does not starve a writer: it gets the lock
///     within a few reader hold times, and readers that came after it wait.
pub async fn rwlock_writer_not_starved(factory: &dyn BackendFactory) -> Result<()> {
    let readers = locker(factory).await?;
    let writer = locker(factory).await?;
    let caps = readers.backend().capabilities();
    require_rw_locks(&caps)?;
    let ttl = ttl_for(&caps, Duration::from_secs(10));
    let name = unique_key("rwlock-starve");
    let stop = Arc::new(AtomicBool::new(false));
    let writer_in = Arc::new(AtomicBool::new(false));
    let overlap = Arc::new(AtomicBool::new(false));
    // Readers holding now, read by the writer at both ends of its hold: a reader whose hold
    // spans the writer's whole window is seen there (the readers' own checks at their two
    // ends would miss it).
    let readers_in = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Six readers in a loop, each holding 120 ms, started 20 ms apart: several readers hold at
    // every instant (even on a loaded machine), so a writer that only got in between readers
    // would never get in.
    let mut stream = Vec::new();
    for reader in 0..6u32 {
        let (readers, name, stop) = (readers.clone(), name.clone(), stop.clone());
        let (writer_in, overlap) = (writer_in.clone(), overlap.clone());
        let readers_in = readers_in.clone();
        stream.push(tokio::spawn(async move {
            sleep(20 * MS * reader).await;
            while !stop.load(Ordering::SeqCst) {
                let guard = readers
                    .rwlock(&name)
                    .read()
                    .ttl(ttl)
                    .wait(Duration::from_secs(30))
                    .acquire()
                    .await?;
                readers_in.fetch_add(1, Ordering::SeqCst);
                if writer_in.load(Ordering::SeqCst) {
                    overlap.store(true, Ordering::SeqCst);
                }
                sleep(120 * MS).await;
                if writer_in.load(Ordering::SeqCst) {
                    overlap.store(true, Ordering::SeqCst);
                }
                readers_in.fetch_sub(1, Ordering::SeqCst);
                guard.release().await?;
                sleep(4 * MS).await;
            }
            anyhow::Ok(())
        }));
    }
    sleep(300 * MS).await;
    let asked = Instant::now();
    let outcome = writer
        .rwlock(&name)
        .write()
        .ttl(ttl)
        .wait(Duration::from_secs(10))
        .acquire()
        .await;
    let waited = asked.elapsed();
    let guard = match outcome {
        Ok(guard) => guard,
        Err(error) => {
            stop.store(true, Ordering::SeqCst);
            return Err(error).context("the writer was starved by a stream of readers");
        }
    };
    writer_in.store(true, Ordering::SeqCst);
    let readers_at_start = readers_in.load(Ordering::SeqCst);
    sleep(30 * MS).await;
    let readers_at_end = readers_in.load(Ordering::SeqCst);
    writer_in.store(false, Ordering::SeqCst);
    guard.release().await?;
    stop.store(true, Ordering::SeqCst);
    for reader in stream {
        reader.await??;
    }
    ensure!(
        !overlap.load(Ordering::SeqCst) && readers_at_start == 0 && readers_at_end == 0,
        "a reader held while the writer did ({readers_at_start} readers in as the writer \
         began, {readers_at_end} as it ended)"
    );
    ensure!(
        waited < Duration::from_secs(3),
        "the writer waited {waited:?} behind readers holding 120 ms each"
    );
    Ok(())
}

/// 27. Reader and writer guards are guards like locks: failing renewals fire `lost()` before
///     the validity deadline, and a dead reader's share frees within TTL + slack for a writer.
pub async fn rwlock_loss_and_expiry(factory: &dyn BackendFactory) -> Result<()> {
    let (faulty, plan) = faulty_locker(factory).await?;
    let caps = faulty.backend().capabilities();
    require_rw_locks(&caps)?;
    let ttl = ttl_for(&caps, Duration::from_millis(1500));
    for write in [false, true] {
        let name = unique_key("rwlock-loss");
        let side = faulty.rwlock(&name);
        let request = if write { side.write() } else { side.read() };
        let guard = request.ttl(ttl).acquire().await?;
        plan.renew(Fault::Fail);
        timeout(ttl + Duration::from_secs(1), guard.lost())
            .await
            .with_context(|| {
                format!(
                    "lost() never fired for a failing {} guard",
                    if write { "write" } else { "read" }
                )
            })?;
        ensure!(
            Instant::now() < guard.valid_until(),
            "an rwlock guard's lost() fired after its validity deadline"
        );
        plan.renew(Fault::None);
        drop(guard);
    }
    // A dead reader (no renewal, no release) frees the lock for a writer within TTL + slack.
    let dead = locker(factory).await?;
    let name = unique_key("rwlock-dead");
    let short = ttl_for(&caps, Duration::from_millis(600));
    let lease = dead
        .backend()
        .try_acquire_rw(&key(&name)?, lock_core::RwMode::Read, short)
        .await?
        .into_lease()
        .context("the first reader was refused")?;
    std::mem::forget(lease);
    let taken = Instant::now();
    let writer = locker(factory).await?;
    let guard = writer
        .rwlock(&name)
        .write()
        .ttl(ttl)
        .wait(short + caps.expiry_slack + Duration::from_secs(3))
        .acquire()
        .await
        .context("a dead reader kept the writer out past TTL + slack")?;
    ensure!(
        taken.elapsed() <= short + caps.expiry_slack + Duration::from_millis(1500),
        "a dead reader's share freed only after {:?} (TTL {short:?})",
        taken.elapsed()
    );
    guard.release().await?;
    Ok(())
}
