//! etcd-specific cases of semaphores and reader-writer locks (issue #14): the check-and-create
//! txn under concurrent attempts from several clients, wake-ups on a holder lease revoked from
//! outside, and a writer intent that lapses when its writer gives up.

mod common;

use anyhow::{Context, Result, ensure};
use common::EtcdFactory;
use conformance_tests::BackendFactory;
use lock_core::{Attempt, Backoff, Lease, LockBackend, LockKey, Locker, RwMode, WRITER_INTENT};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

/// Keys left under the sync range of `name`.
async fn sync_keys(factory: &EtcdFactory, name: &str) -> Result<Vec<(Vec<u8>, i64, i64)>> {
    let range = lock_etcd::sync_range(&factory.prefix, &LockKey::new(name)?);
    factory.cluster.keys_with_prefix(&range).await
}

/// Whether a key under a sync range is a writer intent (`.../i/<lease hex>`).
fn is_intent(key: &[u8]) -> bool {
    key.windows(3).any(|w| w == b"/i/")
}

/// A reader admitted on a free `key`.
async fn admitted_reader(backend: &dyn LockBackend, key: &LockKey, ttl: Duration) -> Result<Lease> {
    backend
        .try_acquire_rw(key, RwMode::Read, ttl)
        .await?
        .into_lease()
        .context("the first reader was refused")
}

/// A writer attempt on `key` while a reader holds it: it must be refused (and so marks its
/// intent).
async fn refused_writer(backend: &dyn LockBackend, key: &LockKey, ttl: Duration) -> Result<()> {
    let writer = backend.try_acquire_rw(key, RwMode::Write, ttl).await?;
    ensure!(
        matches!(writer, Attempt::Held { .. }),
        "a writer got in beside a reader"
    );
    Ok(())
}

/// A waiter for one permit of the semaphore `name` (limit 2) that polls only every 5 s, so
/// that only a notification wakes it in time; it releases the permit at once and returns
/// when it got it.
fn slow_polling_waiter(
    waiter: Locker,
    name: &'static str,
    ttl: Duration,
    wait: Duration,
) -> JoinHandle<Result<Instant>> {
    tokio::spawn(async move {
        let permit = waiter
            .semaphore(name, 2)
            .ttl(ttl)
            // A poll of a jittered 60 s step lands near the release in under 1 % of runs.
            .backoff(Backoff::new(
                Duration::from_secs(60),
                Duration::from_secs(60),
            ))
            .wait(wait)
            .acquire()
            .await?;
        let got = Instant::now();
        permit.release().await?;
        anyhow::Ok(got)
    })
}

/// Forty attempts at once (four clients, ten each) at one permit of a semaphore of 3, five
/// times over: never more than 3 granted, as counted both by the grants and by the holder
/// keys on the server. Two attempts that read the same holders and both see room must not
/// both create: the second txn's compare (no holder key changed since the read) refuses the
/// later one. Without that compare, rounds grant 4 or more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_permit_attempts_never_exceed_the_limit() -> Result<()> {
    const LIMIT: u32 = 3;
    let factory = EtcdFactory::start(1).await?;
    let mut backends: Vec<Arc<dyn LockBackend>> = Vec::new();
    for _ in 0..4 {
        backends.push(factory.backend().await?);
    }
    let ttl = Duration::from_secs(10);
    for round in 0..5 {
        let name = format!("sem-race-{round}");
        let key = LockKey::new(&name)?;
        // One holder first, so every attempt takes the read-then-create path.
        let first = backends[0]
            .try_acquire_permits(&key, LIMIT, 1, ttl)
            .await?
            .into_lease()
            .context("the first permit was refused")?;
        let mut attempts = Vec::new();
        for index in 0..40 {
            let backend = backends[index % backends.len()].clone();
            let key = key.clone();
            attempts.push(tokio::spawn(async move {
                backend.try_acquire_permits(&key, LIMIT, 1, ttl).await
            }));
        }
        let mut granted = vec![first];
        for attempt in attempts {
            if let Attempt::Acquired(lease) = attempt.await?? {
                granted.push(lease);
            }
        }
        let on_server = sync_keys(&factory, &name).await?.len();
        ensure!(
            granted.len() <= LIMIT as usize && on_server <= LIMIT as usize,
            "round {round}: {} permits granted, {on_server} holder keys on the server, limit {LIMIT}",
            granted.len()
        );
        ensure!(
            granted.len() == LIMIT as usize,
            "round {round}: only {} of {LIMIT} permits granted to 41 attempts",
            granted.len()
        );
        for lease in &granted {
            ensure!(
                backends[0].release(lease).await?,
                "a release returned false"
            );
        }
        let left = sync_keys(&factory, &name).await?;
        ensure!(
            left.is_empty(),
            "round {round}: keys left after release: {left:?}"
        );
    }
    Ok(())
}

/// A semaphore waiter is woken when a holder's lease is revoked from outside (an operator, a
/// lease lost to a partition), not only by a release: the subscription watches deletes of the
/// holder keys, whatever removes them. The waiter polls only every 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_holder_lease_wakes_a_semaphore_waiter() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let holder = factory.backend().await?;
    let waiter = Locker::from_arc(factory.backend().await?);
    let ttl = Duration::from_secs(30);
    let key = LockKey::new("sem-revoked")?;
    let both = holder
        .try_acquire_permits(&key, 2, 2, ttl)
        .await?
        .into_lease()
        .context("2 of 2 permits refused")?;
    let lease_id = lock_etcd::EtcdBackend::lease_id(&both).context("no lease id")?;
    let waiting = slow_polling_waiter(waiter, "sem-revoked", ttl, Duration::from_secs(20));
    sleep(Duration::from_millis(300)).await;
    let revoked = Instant::now();
    factory.cluster.revoke_lease(lease_id).await?;
    let got = waiting.await??;
    let after = got.saturating_duration_since(revoked);
    ensure!(
        after < Duration::from_millis(500),
        "the waiter got a permit {after:?} after the holder's lease was revoked"
    );
    Ok(())
}

/// A writer that was refused and then gave up leaves an intent that keeps new readers out for
/// WRITER_INTENT only: a reader is refused right after the refusal, and admitted once the
/// intent lease (2 s, etcd's minimum) has expired, within etcd's expiry slack.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abandoned_writer_intent_lapses() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let backend = factory.backend().await?;
    let ttl = Duration::from_secs(10);
    let key = LockKey::new("rw-intent")?;
    let reader = admitted_reader(&*backend, &key, ttl).await?;
    let refused_at = Instant::now();
    refused_writer(&*backend, &key, ttl).await?;
    let intents = sync_keys(&factory, "rw-intent").await?;
    ensure!(
        intents.iter().any(|(key, _, _)| is_intent(key)),
        "the refused writer left no intent key: {intents:?}"
    );
    let second = backend.try_acquire_rw(&key, RwMode::Read, ttl).await?;
    ensure!(
        matches!(second, Attempt::Held { .. }),
        "a new reader got in while a writer's intent lived"
    );
    // The writer gave up: no further attempt renews its mark.
    let deadline = refused_at + WRITER_INTENT + lock_etcd::EXPIRY_SLACK + Duration::from_secs(1);
    let admitted_after = loop {
        match backend.try_acquire_rw(&key, RwMode::Read, ttl).await? {
            Attempt::Acquired(lease) => {
                let after = refused_at.elapsed();
                backend.release(&lease).await?;
                break after;
            }
            Attempt::Held { .. } => {
                ensure!(
                    Instant::now() < deadline,
                    "readers still refused {:?} after the writer gave up",
                    refused_at.elapsed()
                );
                sleep(Duration::from_millis(50)).await;
            }
        }
    };
    ensure!(
        admitted_after >= WRITER_INTENT - Duration::from_millis(300),
        "a reader got in {admitted_after:?} after a writer's refusal, before its intent lapsed"
    );
    ensure!(
        backend.release(&reader).await?,
        "the first reader's release"
    );
    Ok(())
}

/// A writer that gets in deletes the intents: readers queue behind the writer, and once it
/// releases they are admitted at once, not WRITER_INTENT later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admitted_writer_clears_the_intents() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let backend = factory.backend().await?;
    let ttl = Duration::from_secs(10);
    let key = LockKey::new("rw-clear")?;
    let reader = admitted_reader(&*backend, &key, ttl).await?;
    refused_writer(&*backend, &key, ttl).await?;
    ensure!(backend.release(&reader).await?, "reader release");
    let writer = backend
        .try_acquire_rw(&key, RwMode::Write, ttl)
        .await?
        .into_lease()
        .context("the writer was refused with no reader left")?;
    ensure!(backend.release(&writer).await?, "writer release");
    let next = backend.try_acquire_rw(&key, RwMode::Read, ttl).await?;
    let Attempt::Acquired(next) = next else {
        anyhow::bail!("a reader was refused right after the writer released");
    };
    ensure!(
        next.fence() > writer.fence() && writer.fence() > reader.fence(),
        "fences out of order: reader {:?}, writer {:?}, next reader {:?}",
        reader.fence(),
        writer.fence(),
        next.fence()
    );
    backend.release(&next).await?;
    Ok(())
}

/// A waiting writer is woken by every reader's release and refused again while readers
/// remain: its attempts reuse its fresh intent instead of granting a lease and putting a key
/// each time. Twenty refusals within ~200 ms leave one intent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_writer_refusals_reuse_a_fresh_intent() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    let backend = factory.backend().await?;
    let ttl = Duration::from_secs(10);
    let key = LockKey::new("rw-reuse")?;
    let reader = admitted_reader(&*backend, &key, ttl).await?;
    let started = Instant::now();
    for _ in 0..20 {
        refused_writer(&*backend, &key, ttl).await?;
    }
    let elapsed = started.elapsed();
    let intents = sync_keys(&factory, "rw-reuse")
        .await?
        .into_iter()
        .filter(|(key, _, _)| is_intent(key))
        .count();
    // One mark per 500 ms of refusals at most.
    let allowed = 1 + usize::try_from(elapsed.as_millis() / 500).unwrap_or(usize::MAX);
    ensure!(
        (1..=allowed).contains(&intents),
        "{intents} intent keys after 20 refusals in {elapsed:?} (allowed 1 to {allowed})"
    );
    backend.release(&reader).await?;
    Ok(())
}

/// A semaphore waiter whose watch stream breaks (connection cut, then healed) is still woken
/// by a release after the heal: the follower of its subscription re-reads the revision,
/// wakes it once (a release may have been missed) and watches again. It polls only every 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn semaphore_waiter_is_woken_after_its_watch_stream_broke() -> Result<()> {
    let factory = EtcdFactory::start(1).await?;
    // The holder bypasses the proxy, the waiter goes through it.
    let config = lock_etcd::EtcdConfig::new(factory.cluster.direct_endpoints())
        .with_prefix(factory.prefix.clone());
    let holder = Locker::from_arc(Arc::new(lock_etcd::EtcdBackend::connect(config).await?));
    let waiter = Locker::from_arc(factory.backend().await?);
    let ttl = Duration::from_secs(30);
    let both = holder
        .semaphore("sem-cut", 2)
        .permits(2)
        .ttl(ttl)
        .auto_renew(false)
        .try_acquire()
        .await?
        .context("2 of 2 permits refused")?;
    let waiting = slow_polling_waiter(waiter, "sem-cut", ttl, Duration::from_secs(25));
    sleep(Duration::from_millis(300)).await;
    factory.cluster.cut(0)?;
    sleep(Duration::from_millis(500)).await;
    factory.cluster.heal(0)?;
    // Past the waiter's wake-up on the heal and its (refused) re-check; its next poll is ~5 s
    // away.
    sleep(Duration::from_millis(1500)).await;
    let released = Instant::now();
    both.release().await?;
    let got = waiting.await??;
    let after = got.saturating_duration_since(released);
    ensure!(
        after < Duration::from_millis(700),
        "the waiter got a permit {after:?} after the release: its watch was not re-armed"
    );
    Ok(())
}

/// The follower of a name's subscriptions runs on the runtime of the first subscriber. If
/// that runtime shuts down while a subscription lives on (here: moved out of it), the next
/// subscription, on another runtime, starts a new follower instead of relying on the dead
/// one: a release still wakes it at once.
#[test]
fn subscription_outlives_the_runtime_of_the_first_subscriber() -> Result<()> {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let factory = main.block_on(EtcdFactory::start(1))?;
    let key = LockKey::new("sem-runtime")?;
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (backend, kept) = first.block_on(async {
        let backend = factory.backend().await?;
        let kept = backend.subscribe(&key).await?;
        anyhow::Ok((backend, kept))
    })?;
    drop(first);
    main.block_on(async {
        let holder = factory.backend().await?;
        let permit = holder
            .try_acquire_permits(&key, 1, 1, Duration::from_secs(10))
            .await?
            .into_lease()
            .context("the permit was refused")?;
        // No pause for the follower to arm its watches: they start after the revision that
        // subscribe read, so a release from here on is seen whenever they are armed.
        let mut releases = backend.subscribe(&key).await?;
        let released = Instant::now();
        ensure!(holder.release(&permit).await?, "release returned false");
        let wake = releases.next(released + Duration::from_secs(3)).await;
        ensure!(
            wake == lock_core::Wake::Released && released.elapsed() < Duration::from_millis(500),
            "the subscriber was not woken by the release ({wake:?} after {:?})",
            released.elapsed()
        );
        anyhow::Ok(())
    })?;
    drop(kept);
    Ok(())
}

/// A 3-member cluster loses its leader while both permits of a semaphore and a reader are
/// held: the holders keep them (renewed through the new leader for three TTLs), the limit is
/// still enforced, a writer is still refused, and after the releases both are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_while_permits_and_a_reader_are_held() -> Result<()> {
    let factory = EtcdFactory::start(3).await?;
    let holder = Locker::from_arc(factory.backend().await?);
    let other = Locker::from_arc(factory.backend().await?);
    let ttl = Duration::from_secs(2);
    let permits = holder
        .semaphore("leader-sem", 2)
        .permits(2)
        .ttl(ttl)
        .acquire()
        .await?;
    let reader = holder.rwlock("leader-rw").read().ttl(ttl).acquire().await?;
    let killed = factory.cluster.kill_leader().await?;
    let killed_at = Instant::now();
    sleep(ttl * 3).await;
    for (what, guard) in [("permits", &permits), ("reader", &reader)] {
        ensure!(
            !guard.is_lost(),
            "{what} lost after leader {killed} was killed: {:?}",
            guard.lost_reason()
        );
        ensure!(
            guard.lease().sent_at() > killed_at + ttl,
            "no renewal of the {what} went through the new leader"
        );
    }
    ensure!(
        other
            .semaphore("leader-sem", 2)
            .ttl(ttl)
            .try_acquire()
            .await?
            .is_none(),
        "a third permit of 2 was granted"
    );
    ensure!(
        other
            .rwlock("leader-rw")
            .write()
            .ttl(ttl)
            .try_acquire()
            .await?
            .is_none(),
        "a writer got in beside a reader"
    );
    ensure!(permits.release().await?, "permits release returned false");
    ensure!(reader.release().await?, "reader release returned false");
    let again = other
        .semaphore("leader-sem", 2)
        .permits(2)
        .ttl(ttl)
        .try_acquire()
        .await?
        .context("permits not free after release")?;
    again.release().await?;
    // The refused writer's intent (2 s) may still keep readers out; a writer gets in.
    let writer = other
        .rwlock("leader-rw")
        .write()
        .ttl(ttl)
        .try_acquire()
        .await?
        .context("rwlock not free for a writer after the reader's release")?;
    writer.release().await?;
    factory.cluster.restart(killed).await?;
    Ok(())
}
