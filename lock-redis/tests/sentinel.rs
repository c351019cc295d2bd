//! `redis+sentinel://`: the conformance suite through Sentinel, and what failovers do to held
//! locks and fences, on real servers (one master, one replica, three sentinels) started by
//! `lock_harness::redis_sentinel`.

mod common;

use anyhow::{Context, Result, bail, ensure};
use async_trait::async_trait;
use conformance_tests::{BackendFactory, ServerFaults};
use lock_core::{Attempt, Lease, LockBackend, LockError, LockKey};
use lock_harness::redis_sentinel::SentinelSet;
use lock_redis::{KeyScheme, RedisBackend, RedisOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, sleep};

/// The suite's factory: the sentinels name the master through a proxy (for the cut and
/// black-hole cases); failure detection is slowed to 60 s so that the suite's pauses and cuts
/// never start a failover.
struct SentinelFactory {
    set: SentinelSet,
    master: redis::aio::MultiplexedConnection,
    scheme: KeyScheme,
}

impl SentinelFactory {
    async fn start() -> Result<Self> {
        let set = SentinelSet::builder()
            .proxy(true)
            .down_after(Duration::from_secs(60))
            .failover_timeout(Duration::from_secs(60))
            .start()
            .await?;
        let master = set
            .node_client(0)?
            .get_multiplexed_async_connection_with_config(&unbounded())
            .await?;
        Ok(SentinelFactory {
            set,
            master,
            scheme: KeyScheme::new(RedisOptions::default_prefix(), 0)?,
        })
    }

    fn proxy(&self) -> Result<&lock_harness::TcpProxy> {
        self.set.proxy().context("started without a proxy")
    }
}

#[async_trait]
impl BackendFactory for SentinelFactory {
    fn name(&self) -> String {
        "redis-sentinel".into()
    }

    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(RedisBackend::connect(&self.set.url()).await?))
    }

    async fn is_held(&self, key: &LockKey) -> Result<Option<bool>> {
        let mut master = self.master.clone();
        let exists: bool = redis::cmd("EXISTS")
            .arg(self.scheme.lock_key(key))
            .query_async(&mut master)
            .await?;
        Ok(Some(exists))
    }

    /// The lock key and the fair queue's entries, on the master.
    async fn contenders(&self, key: &LockKey) -> Result<Option<usize>> {
        Ok(Some(
            common::contenders(&mut self.master.clone(), &self.scheme, key).await?,
        ))
    }

    fn faults(&self) -> Option<&dyn ServerFaults> {
        Some(self)
    }
}

#[async_trait]
impl ServerFaults for SentinelFactory {
    async fn pause(&self) -> Result<()> {
        self.set.pause_node(0)
    }

    async fn resume(&self) -> Result<()> {
        self.set.resume_node(0)
    }

    async fn cut(&self) -> Result<()> {
        self.proxy()?.cut();
        Ok(())
    }

    async fn blackhole(&self) -> Result<()> {
        self.proxy()?.blackhole();
        Ok(())
    }

    async fn delay_answers(&self, delay: std::time::Duration) -> Result<()> {
        self.proxy()?.set_delays(std::time::Duration::ZERO, delay);
        Ok(())
    }

    async fn heal(&self) -> Result<()> {
        self.proxy()?.heal();
        Ok(())
    }

    async fn forget_connections(&self) -> Result<()> {
        self.proxy()?.forget_flows();
        Ok(())
    }

    /// The master killed and started again without persistence, before the sentinels would
    /// fail over (`down-after` is 60 s here): it comes back empty, and its replica, syncing
    /// from it, is emptied too.
    async fn restart(&self) -> Result<()> {
        self.set.restart_node(0)
    }
}

mod conformance {
    conformance_tests::conformance_suite! {
        factory = super::SentinelFactory::start(),
    }
}

/// Test connections without the `redis` crate's 500 ms response timeout (a loaded machine).
fn unbounded() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new().set_response_timeout(None)
}

fn unique(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

fn key(name: &str) -> Result<LockKey> {
    Ok(LockKey::new(name)?)
}

const TTL: Duration = Duration::from_secs(30);

fn options() -> RedisOptions {
    RedisOptions::default()
        .connect_timeout(Duration::from_secs(1))
        .command_timeout(Duration::from_secs(1))
}

async fn acquired(backend: &RedisBackend, key: &LockKey) -> Result<Lease> {
    match backend.try_acquire(key, TTL).await? {
        Attempt::Acquired(lease) => Ok(lease),
        Attempt::Held { .. } => bail!("{key:?} is held"),
    }
}

/// Repeats `call` while it fails with a retryable error (the backend is still moving to the
/// new master), up to `within`; returns the first other outcome and when it came.
async fn settle<T, F, Fut>(within: Duration, mut call: F) -> Result<(Result<T, LockError>, Instant)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LockError>>,
{
    let deadline = Instant::now() + within;
    loop {
        match call().await {
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                sleep(Duration::from_millis(20)).await;
            }
            other => return Ok((other, Instant::now())),
        }
    }
}

/// Whether `key`'s lock key is on data node `index`.
async fn on_node(set: &SentinelSet, index: usize, key: &LockKey) -> Result<bool> {
    let scheme = KeyScheme::new(RedisOptions::default_prefix(), 0)?;
    let mut conn = set
        .node_client(index)?
        .get_multiplexed_async_connection_with_config(&unbounded())
        .await?;
    Ok(redis::cmd("EXISTS")
        .arg(scheme.lock_key(key))
        .query_async(&mut conn)
        .await?)
}

/// The master is killed while 20 replicated locks are held: the sentinels promote the
/// replica, the backend follows it (same backend object, no reconnect by the caller), every
/// lock is still held there (a second client is refused, the holder renews), fences keep
/// increasing, and the pub/sub listener followed (a release wakes a waiter at once).
#[tokio::test]
async fn killed_master_keeps_replicated_locks_and_the_backend_follows() -> Result<()> {
    let mut set = SentinelSet::builder()
        .wait_for_sentinels(true)
        .start()
        .await?;
    let holder = RedisBackend::connect_with(&set.url(), options()).await?;
    let keys: Vec<LockKey> = (0..20)
        .map(|i| key(&unique(&format!("fo{i}"))))
        .collect::<Result<_>>()?;
    let mut leases = Vec::new();
    for key in &keys {
        leases.push(acquired(&holder, key).await?);
    }
    // Replication is asynchronous but fast on loopback: wait until the replica has them.
    let deadline = Instant::now() + Duration::from_secs(5);
    for key in &keys {
        while !on_node(&set, 1, key).await? {
            ensure!(Instant::now() < deadline, "the replica never got {key:?}");
            sleep(Duration::from_millis(10)).await;
        }
    }

    let killed_at = Instant::now();
    let old = set.kill_master().await?;
    let probe = key(&unique("probe"))?;
    let (first, first_at) =
        settle(Duration::from_secs(30), || holder.try_acquire(&probe, TTL)).await?;
    ensure!(
        matches!(first, Ok(Attempt::Acquired(_))),
        "after the failover: {first:?}"
    );
    let new = set.master_addr().await?;
    ensure!(new != old, "the sentinels still name {old}");
    println!(
        "master {old} killed; the same backend acquired on the new master {new} after {:?}",
        first_at - killed_at
    );

    // Every held lock survived: a fresh client is refused, the holder renews each.
    let other = RedisBackend::connect_with(&set.url(), options()).await?;
    for key in &keys {
        let attempt = other.try_acquire(key, TTL).await?;
        ensure!(
            matches!(attempt, Attempt::Held { .. }),
            "{key:?} was granted to a second client after the failover"
        );
    }
    for lease in &mut leases {
        let (renewed, _) = settle(Duration::from_secs(5), || holder.renew(lease, TTL)).await?;
        *lease = renewed.with_context(|| format!("renewing {:?}", lease.key()))?;
    }

    // Fences keep increasing: the counters were replicated with the locks.
    let before = leases[0].fence().context("no fence")?;
    ensure!(holder.release(&leases[0]).await?, "release after failover");
    let again = acquired(&other, &keys[0]).await?;
    let after = again.fence().context("no fence")?;
    ensure!(after > before, "fence went from {before:?} to {after:?}");

    // The holder's listener followed: a waiter of the holder's backend is woken by a
    // release on the new master.
    let waited = &keys[1];
    ensure!(holder.release(&leases[1]).await?, "release after failover");
    let second = acquired(&other, waited).await?;
    let mut releases = holder.subscribe(waited).await?;
    // A refused attempt with a waiter marks the lock, so its release publishes.
    ensure!(matches!(
        holder.try_acquire(waited, TTL).await?,
        Attempt::Held { .. }
    ));
    // Wake-ups the subscription met before the release (a listener that reconnected wakes
    // every subscription) are not the release's: drain them, then bound the release's.
    sleep(Duration::from_millis(300)).await;
    while releases
        .next(Instant::now() + Duration::from_millis(1))
        .await
        == lock_core::Wake::Released
    {}
    let released_at = Instant::now();
    ensure!(other.release(&second).await?, "second holder's release");
    let wake = releases.next(released_at + Duration::from_secs(1)).await;
    ensure!(
        matches!(wake, lock_core::Wake::Released),
        "the waiter was not woken within 1 s of the release after the failover: {wake:?}"
    );
    println!("waiter woken {:?} after the release", released_at.elapsed());
    Ok(())
}

/// A lock the replica never got is lost on failover: the promoted replica does not have it,
/// so a second client is granted the same lock while the first still believes it holds it;
/// the first holder's renewal then answers `Lost`. The promoted replica's fence counter is
/// behind too, yet the second client's fence is above the first holder's (fences follow the
/// server clock as well; before, it was below). This is asynchronous replication, measured here by detaching the replica first
/// (on loopback the replica otherwise gets every write within a millisecond).
#[tokio::test]
async fn failover_to_a_replica_that_missed_the_lock_loses_it() -> Result<()> {
    let set = SentinelSet::builder()
        .wait_for_sentinels(true)
        .start()
        .await?;
    let first = RedisBackend::connect_with(&set.url(), options()).await?;
    let name = key(&unique("lost"))?;
    // Three acquisitions the replica gets (its counter for the slot reaches the third fence).
    let mut replicated = 0;
    for _ in 0..3 {
        let lease = acquired(&first, &name).await?;
        replicated = lease.fence().context("no fence")?.0;
        first.release(&lease).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let scheme = KeyScheme::new(RedisOptions::default_prefix(), 0)?;
    let (_, fence_key) = scheme.lock_and_fence_keys(&name);
    loop {
        let mut replica = set
            .node_client(1)?
            .get_multiplexed_async_connection_with_config(&unbounded())
            .await?;
        let counter: Option<u64> = redis::cmd("GET")
            .arg(&fence_key)
            .query_async(&mut replica)
            .await?;
        if counter == Some(replicated) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the replica never got the counter"
        );
        sleep(Duration::from_millis(10)).await;
    }
    set.detach_replica(1).await?;
    // Three more the replica misses; the last one stays held.
    for _ in 0..2 {
        let lease = acquired(&first, &name).await?;
        first.release(&lease).await?;
    }
    let held = acquired(&first, &name).await?;
    let held_fence = held.fence().context("no fence")?;
    ensure!(
        !on_node(&set, 1, &name).await?,
        "the detached replica has the lock"
    );

    let new = set.failover(Duration::from_secs(30)).await?;
    let second = RedisBackend::connect_with(&set.url(), options()).await?;
    let (granted, _) = settle(Duration::from_secs(10), || second.try_acquire(&name, TTL)).await?;
    let Ok(Attempt::Acquired(taken)) = granted else {
        bail!("the lock was not granted again after the failover: {granted:?}");
    };
    let taken_fence = taken.fence().context("no fence")?;
    ensure!(
        taken_fence > held_fence,
        "fence {taken_fence:?} after the failover is not above {held_fence:?}: the promoted \
         replica's counter was behind"
    );
    // The first holder's backend is still connected to the old master, which accepts writes
    // until the sentinels turn it into a replica (at their next INFO of it, up to 10 s
    // later): both holders could renew "their" lock meanwhile. The backend listens for the
    // sentinels' `+switch-master`, moves to the new master and its renewal answers Lost.
    let failed_over_at = Instant::now();
    let mut split_renewals = 0;
    let outcome = loop {
        match first.renew(&held, TTL).await {
            Ok(_) => split_renewals += 1,
            Err(error) if error.is_retryable() => {}
            Err(error) => break error,
        }
        ensure!(
            failed_over_at.elapsed() < Duration::from_secs(30),
            "the first holder still renews 30 s after the failover"
        );
        sleep(Duration::from_millis(50)).await;
    };
    let split_for = failed_over_at.elapsed();
    ensure!(
        matches!(outcome, LockError::Lost { .. }),
        "the first holder's renew after the failover: {outcome:?}"
    );
    // The backend hears the sentinels' `+switch-master` and moves at once; without it the
    // old master took its renewals for ~10 s (until the sentinels reconfigured it).
    ensure!(
        split_for < Duration::from_secs(5),
        "the first holder kept renewing on the demoted master for {split_for:?}"
    );
    println!(
        "failover to {new}: the lock held with fence {held_fence:?} on the old master was \
         granted again with fence {taken_fence:?}; the first holder renewed {split_renewals} \
         times on the old master, then got Lost {split_for:?} after the failover"
    );
    Ok(())
}

fn waiting_options() -> RedisOptions {
    options().wait_replicas(1, Duration::from_millis(200))
}

/// With `wait_replicas(1, …)` a lock is granted only once the replica has it: a failover
/// right after the acquire keeps the lock (a second client is refused, the holder renews) and
/// the fence counter (the next holder's fence is higher).
#[tokio::test]
async fn wait_replicas_keeps_the_lock_and_fence_across_a_failover() -> Result<()> {
    let set = SentinelSet::builder()
        .wait_for_sentinels(true)
        .start()
        .await?;
    let holder = RedisBackend::connect_with(&set.url(), waiting_options()).await?;
    let name = key(&unique("kept"))?;
    let lease = acquired(&holder, &name).await?;
    let fence = lease.fence().context("no fence")?;
    let new = set.failover(Duration::from_secs(30)).await?;
    let other = RedisBackend::connect_with(&set.url(), waiting_options()).await?;
    let attempt = other.try_acquire(&name, TTL).await?;
    ensure!(
        matches!(attempt, Attempt::Held { .. }),
        "after the failover to {new} the lock was granted again: {attempt:?}"
    );
    // The new master's only replica is the old master, which the sentinels turn into its
    // replica at their next INFO of it (up to 10 s): until then WAIT finds no replica and the
    // renewal is a retryable error.
    let failed_over_at = Instant::now();
    let (renewed, renewed_at) =
        settle(Duration::from_secs(20), || holder.renew(&lease, TTL)).await?;
    let renewed = renewed.context("the holder's renew after the failover")?;
    println!(
        "wait_replicas: the holder's first renewal after the failover went through {:?} later",
        renewed_at - failed_over_at
    );
    let (released, released_at) =
        settle(Duration::from_secs(10), || holder.release(&renewed)).await?;
    ensure!(released?, "the holder's release after the failover");
    // The replica's link may still be settling after the renewal's WAIT got through (measured
    // under load: the next acquire's WAIT found no replica for up to 0.66 s in 3 of 8 runs),
    // and a write no replica acknowledged is refused with a retryable error: retry it, as the
    // renewal and the release are retried.
    let (next, acquired_at) =
        settle(Duration::from_secs(10), || other.try_acquire(&name, TTL)).await?;
    println!(
        "wait_replicas: the next holder's acquire went through {:?} after the release",
        acquired_at - released_at
    );
    let Attempt::Acquired(next) = next? else {
        bail!("{name:?} is held after the holder released it");
    };
    let next_fence = next.fence().context("no fence")?;
    ensure!(
        next_fence > fence,
        "fence {next_fence:?} after the failover is not above {fence:?}"
    );
    Ok(())
}

/// With `wait_replicas(1, …)` and the replica not replicating, an acquire is refused with a
/// retryable error naming the shortfall, and leaves no lock on the master.
#[tokio::test]
async fn wait_replicas_refuses_a_lock_the_replica_did_not_get() -> Result<()> {
    let set = SentinelSet::builder().start().await?;
    let holder = RedisBackend::connect_with(&set.url(), waiting_options()).await?;
    let name = key(&unique("unreplicated"))?;
    // Replicated: granted.
    let lease = acquired(&holder, &name).await?;
    ensure!(holder.release(&lease).await?, "release");
    set.detach_replica(1).await?;
    let started = Instant::now();
    let refused = holder.try_acquire(&name, TTL).await;
    let took = started.elapsed();
    let Err(error) = refused else {
        bail!("granted without the replica: {refused:?}");
    };
    ensure!(
        error.is_retryable() && error.to_string().contains("wait_replicas"),
        "unexpected error: {error}"
    );
    ensure!(
        took < Duration::from_secs(1),
        "the refusal took {took:?} (wait 200 ms)"
    );
    // The grant was released at once.
    let deadline = Instant::now() + Duration::from_secs(2);
    while on_node(&set, 0, &name).await? {
        ensure!(
            Instant::now() < deadline,
            "the refused grant is still on the master"
        );
        sleep(Duration::from_millis(10)).await;
    }
    println!("refused after {took:?}: {error}");
    Ok(())
}

/// Connect errors are typed and bounded: no sentinel listening is a retryable error within
/// the connect timeout; a master name no sentinel knows is a non-retryable one; a malformed
/// URL is `InvalidConfig`; one paused sentinel of three does not hold a connect up.
#[tokio::test]
async fn connect_errors_are_typed_and_bounded() -> Result<()> {
    let nowhere: Vec<String> = (0..2)
        .map(|_| Ok(format!("127.0.0.1:{}", lock_harness::free_port()?)))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let refused = RedisBackend::connect_with(
        &format!("redis+sentinel://{}/m", nowhere.join(",")),
        options(),
    )
    .await;
    let took = started.elapsed();
    match refused {
        Err(LockError::Backend {
            retryable: true, ..
        }) => {}
        other => bail!("no sentinel listening: {other:?}"),
    }
    ensure!(took < Duration::from_millis(1500), "took {took:?}");

    let set = SentinelSet::builder().start().await?;
    let unknown = set.url().replace("/m", "/nosuchmaster");
    match RedisBackend::connect_with(&unknown, options()).await {
        Err(error @ LockError::Backend { .. }) => ensure!(
            !error.is_retryable() && error.to_string().contains("nosuchmaster"),
            "unknown master: {error}"
        ),
        other => bail!("unknown master: {other:?}"),
    }
    for bad in [
        "redis+sentinel://127.0.0.1:1",
        "redis+sentinel://127.0.0.1:1/m/x",
        "redis+sentinel://127.0.0.1:1/m?wait_timeout_ms=5",
    ] {
        ensure!(
            matches!(
                RedisBackend::connect(bad).await,
                Err(LockError::InvalidConfig(_))
            ),
            "{bad} was not InvalidConfig"
        );
    }

    set.pause_sentinel(0)?;
    let started = Instant::now();
    let backend = RedisBackend::connect_with(&set.url(), options()).await;
    let took = started.elapsed();
    set.resume_sentinel(0)?;
    let backend = backend.context("connect with one sentinel paused")?;
    acquired(&backend, &key(&unique("paused-sentinel"))?).await?;
    ensure!(
        took < Duration::from_millis(700),
        "connect with one of three sentinels paused took {took:?}"
    );
    println!("connect with one sentinel paused: {took:?}");
    Ok(())
}

/// `rediss+sentinel://` (feature `tls`): every data node and sentinel speaks TLS only.
#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use lock_harness::tls::TestPki;
    use lock_redis::RedisTls;

    /// Through TLS sentinels to a TLS master: locks and fences work, a killed master is
    /// followed to the promoted replica (the lock survives, the backend acquires again), and
    /// a client that does not trust the servers' CA is refused at connect, not retried.
    #[tokio::test]
    async fn tls_sentinels_lock_and_follow_a_failover() -> Result<()> {
        let pki = TestPki::generate()?;
        let mut set = SentinelSet::builder()
            .tls(&pki)
            .wait_for_sentinels(true)
            .start()
            .await?;
        ensure!(set.url().starts_with("rediss+sentinel://"), "{}", set.url());
        let trusting = options().tls(RedisTls::default().ca_file(&pki.ca.cert_path));
        let holder = RedisBackend::connect_with(&set.url(), trusting.clone()).await?;
        let name = key(&unique("tls"))?;
        let lease = acquired(&holder, &name).await?;
        let fence = lease.fence().context("no fence")?;
        // Let the replica have it, then kill the master.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !on_node(&set, 1, &name).await? {
            ensure!(Instant::now() < deadline, "the replica never got the lock");
            sleep(Duration::from_millis(10)).await;
        }
        let killed_at = Instant::now();
        set.kill_master().await?;
        let probe = key(&unique("tls-probe"))?;
        let (first, first_at) =
            settle(Duration::from_secs(30), || holder.try_acquire(&probe, TTL)).await?;
        ensure!(
            matches!(first, Ok(Attempt::Acquired(_))),
            "after the failover: {first:?}"
        );
        let (renewed, _) = settle(Duration::from_secs(5), || holder.renew(&lease, TTL)).await?;
        let renewed = renewed.context("renew over TLS after the failover")?;
        ensure!(
            holder.release(&renewed).await?,
            "release after the failover"
        );
        let other = RedisBackend::connect_with(&set.url(), trusting).await?;
        let next = acquired(&other, &name).await?;
        ensure!(
            next.fence().context("no fence")? > fence,
            "fence did not increase"
        );
        println!(
            "TLS: the same backend acquired on the new master {:?} after the kill",
            first_at - killed_at
        );

        let distrusting = options().tls(RedisTls::default().ca_file(&pki.other_ca.cert_path));
        match RedisBackend::connect_with(&set.url(), distrusting).await {
            Err(error) if !error.is_retryable() => {
                println!("untrusted CA: {error}");
                Ok(())
            }
            other => bail!("a client with the wrong CA: {other:?}"),
        }
    }
}
