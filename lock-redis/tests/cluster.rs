//! `redis+cluster://`: the conformance suite on a Redis Cluster, keys spread over every
//! master, and a master killed while locks are held, on real servers (three masters, three
//! replicas) started by `lock_harness::redis_cluster`.

mod common;

use anyhow::{Context, Result, bail, ensure};
use async_trait::async_trait;
use conformance_tests::{BackendFactory, ServerFaults};
use lock_core::{Attempt, Lease, LockBackend, LockError, LockKey};
use lock_harness::redis_cluster::{ClusterPool, RedisCluster};
use lock_redis::{KeyScheme, RedisBackend, RedisOptions};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::time::{Instant, sleep};

/// The suite's factory: three masters, each behind a proxy the cluster announces as the
/// node's address (for the cut and black-hole cases). Failure detection is slowed to 60 s so
/// that the suite's pauses and cuts never start a failover.
struct ClusterFactory {
    cluster: RedisCluster,
    scheme: KeyScheme,
    /// A direct connection to each master, and the slot ranges it serves (fixed: the suite
    /// fails no node over), so that `is_held` costs two round trips: polling cases measure
    /// expiry with it.
    masters: Vec<(redis::aio::MultiplexedConnection, Vec<(u16, u16)>)>,
}

impl ClusterFactory {
    /// A connection to the master that serves `redis_key`'s hash slot.
    async fn master_of(&self, redis_key: &str) -> Result<redis::aio::MultiplexedConnection> {
        let mut any = self.masters.first().context("no master")?.0.clone();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(redis_key)
            .query_async(&mut any)
            .await?;
        let (conn, _) = self
            .masters
            .iter()
            .find(|(_, ranges)| {
                ranges
                    .iter()
                    .any(|(low, high)| (*low..=*high).contains(&slot))
            })
            .with_context(|| format!("no master serves slot {slot}"))?;
        Ok(conn.clone())
    }

    async fn start() -> Result<Self> {
        // Three masters, no replicas: the suite kills no node. Started ahead by a pool: a
        // cluster takes 2 s before it accepts writes, more than most cases take.
        static POOL: LazyLock<ClusterPool> = LazyLock::new(|| {
            ClusterPool::new(
                RedisCluster::builder()
                    .node_timeout(Duration::from_secs(60))
                    .replicas(false)
                    .proxy(true),
                4,
            )
        });
        let cluster = POOL.take().await?;
        let mut masters = Vec::new();
        for view in cluster.topology(0).await? {
            if !view.master {
                continue;
            }
            let index = cluster
                .node_index(view.addr)
                .context("a master that is none of ours")?;
            let conn = cluster
                .node_client(index)?
                .get_multiplexed_async_connection_with_config(&unbounded())
                .await?;
            masters.push((conn, view.slots));
        }
        Ok(ClusterFactory {
            cluster,
            scheme: KeyScheme::new(RedisOptions::default_prefix(), 0)?,
            masters,
        })
    }

    fn each_proxy(&self, action: impl Fn(&lock_harness::TcpProxy)) -> Result<()> {
        let proxies = self.cluster.proxies();
        ensure!(!proxies.is_empty(), "started without proxies");
        proxies.into_iter().for_each(action);
        Ok(())
    }
}

#[async_trait]
impl BackendFactory for ClusterFactory {
    fn name(&self) -> String {
        "redis-cluster".into()
    }

    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(RedisBackend::connect(&self.cluster.url()).await?))
    }

    /// Read on the master serving the key's slot, directly (not through its proxy).
    async fn is_held(&self, key: &LockKey) -> Result<Option<bool>> {
        let lock_key = self.scheme.lock_key(key);
        let exists: bool = redis::cmd("EXISTS")
            .arg(&lock_key)
            .query_async(&mut self.master_of(&lock_key).await?)
            .await?;
        Ok(Some(exists))
    }

    /// The lock key and the fair queue's entries (one hash slot: they share the key's tag).
    async fn contenders(&self, key: &LockKey) -> Result<Option<usize>> {
        let mut master = self.master_of(&self.scheme.lock_key(key)).await?;
        Ok(Some(
            common::contenders(&mut master, &self.scheme, key).await?,
        ))
    }

    fn faults(&self) -> Option<&dyn ServerFaults> {
        Some(self)
    }
}

/// "The server" is every node.
#[async_trait]
impl ServerFaults for ClusterFactory {
    async fn pause(&self) -> Result<()> {
        self.cluster.pause_all()
    }

    async fn resume(&self) -> Result<()> {
        self.cluster.resume_all()
    }

    async fn cut(&self) -> Result<()> {
        self.each_proxy(lock_harness::TcpProxy::cut)
    }

    async fn blackhole(&self) -> Result<()> {
        self.each_proxy(lock_harness::TcpProxy::blackhole)
    }

    async fn heal(&self) -> Result<()> {
        self.each_proxy(lock_harness::TcpProxy::heal)
    }

    async fn delay_answers(&self, delay: std::time::Duration) -> Result<()> {
        self.each_proxy(|proxy| proxy.set_delays(std::time::Duration::ZERO, delay))
    }

    async fn forget_connections(&self) -> Result<()> {
        self.each_proxy(lock_harness::TcpProxy::forget_flows)
    }
}

mod conformance {
    conformance_tests::conformance_suite! {
        factory = super::ClusterFactory::start(),
        skip = {
            fences_increase_across_a_server_restart: "not built for Cluster: the suite's clusters come from a pool the binary's tests share, and a crash of every node would have to re-form the cluster before the next test takes it. The mechanism is the one server's (fences follow the server clock), checked by the redis and redis-sentinel suites; a master's crash with its replica promoted is killed_master_keeps_replicated_locks_and_the_backend_continues",
        },
    }
}

/// Test connections without the `redis` crate's 500 ms response timeout (a loaded machine).
fn unbounded() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new().set_response_timeout(None)
}

fn unique(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
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

/// The index of the master that serves `key`'s lock key.
async fn master_of(cluster: &RedisCluster, key: &LockKey) -> Result<usize> {
    cluster.master_of_slot(slot_of(cluster, key).await?).await
}

/// The hash slot of `key`'s lock key (and fence counter).
async fn slot_of(cluster: &RedisCluster, key: &LockKey) -> Result<u16> {
    let scheme = KeyScheme::new(RedisOptions::default_prefix(), 0)?;
    let mut conn = cluster
        .node_client(cluster.masters().await?[0])?
        .get_multiplexed_async_connection_with_config(&unbounded())
        .await?;
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(scheme.lock_key(key))
        .query_async(&mut conn)
        .await?;
    Ok(slot)
}

/// How many lock keys node `index` stores.
async fn lock_keys_on(cluster: &RedisCluster, index: usize) -> Result<usize> {
    let mut conn = cluster
        .node_client(index)?
        .get_multiplexed_async_connection_with_config(&unbounded())
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*:lock", RedisOptions::default_prefix()))
        .query_async(&mut conn)
        .await?;
    Ok(keys.len())
}

/// 60 lock names: their keys land on all three masters (each master holds some), each on
/// the master serving its slot, and nowhere else among the masters.
#[tokio::test]
async fn lock_keys_spread_over_all_masters() -> Result<()> {
    let cluster = RedisCluster::builder().replicas(false).start().await?;
    let backend = RedisBackend::connect_with(&cluster.url(), options()).await?;
    let keys: Vec<LockKey> = (0..60)
        .map(|i| Ok(LockKey::new(unique(&format!("spread{i}")))?))
        .collect::<Result<_>>()?;
    let mut expected: HashMap<usize, usize> = HashMap::new();
    for key in &keys {
        acquired(&backend, key).await?;
        *expected.entry(master_of(&cluster, key).await?).or_default() += 1;
    }
    let masters = cluster.masters().await?;
    ensure!(masters.len() == 3, "masters: {masters:?}");
    let mut counts = Vec::new();
    for master in &masters {
        let stored = lock_keys_on(&cluster, *master).await?;
        ensure!(stored > 0, "master {master} holds no lock key");
        ensure!(
            stored == expected.get(master).copied().unwrap_or(0),
            "master {master} holds {stored} lock keys, its slots cover {:?}",
            expected.get(master)
        );
        counts.push(stored);
    }
    println!("60 lock keys over the masters {masters:?}: {counts:?}");
    Ok(())
}

/// Repeats `call` while it fails with a retryable error, up to `within`; returns the first
/// other outcome and when it came.
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

/// A master is killed while 30 locks (spread over the masters) are held: its replica is
/// promoted, the same backend carries on (renews every lock, on the promoted replica too),
/// a second client is refused every lock, fences of the failed master's slots keep
/// increasing (the replica had the counters), and the pub/sub listener, which was on the
/// killed node, moved to another (a release wakes a waiter).
#[tokio::test]
async fn killed_master_keeps_replicated_locks_and_the_backend_continues() -> Result<()> {
    let mut cluster = RedisCluster::builder().start().await?;
    let holder = RedisBackend::connect_with(&cluster.url(), options()).await?;
    let mut held = Vec::new();
    for i in 0..30 {
        let key = LockKey::new(unique(&format!("kill{i}")))?;
        let lease = acquired(&holder, &key).await?;
        let master = master_of(&cluster, &key).await?;
        held.push((key, lease, master));
    }
    cluster.wait_for_replication().await?;
    // Node 0: a master, and the node the backend's pub/sub listener uses (the first seed).
    let victim = 0;
    let Some(first) = held.iter().position(|(_, _, master)| *master == victim) else {
        bail!("no lock landed on node 0");
    };
    held.swap(0, first);
    let slot = slot_of(&cluster, &held[0].0).await?;
    let on_victim = held.iter().filter(|(_, _, m)| *m == victim).count();

    let killed_at = Instant::now();
    cluster.kill_node(victim)?;
    // The same backend: renew every lock until each answers (the victim's slots fail until
    // its replica is promoted).
    let mut renewed_at = Vec::new();
    for (key, lease, _) in &mut held {
        let (renewed, at) = settle(Duration::from_secs(30), || holder.renew(lease, TTL)).await?;
        *lease = renewed.with_context(|| format!("renewing {key:?} after the kill"))?;
        renewed_at.push(at);
    }
    let recovered = renewed_at
        .iter()
        .max()
        .map(|at| *at - killed_at)
        .unwrap_or_default();
    cluster
        .wait_for_failover(victim, Duration::from_secs(30))
        .await?;
    let promoted = cluster.master_of_slot(slot).await?;
    ensure!(
        promoted != victim,
        "slot {slot} still served by the killed node"
    );
    println!(
        "master {victim} killed with {on_victim} of 30 locks; every lock renewed by the same \
         backend {recovered:?} after the kill; its replica {promoted} serves its slots"
    );

    // A second client is refused every lock.
    let other = RedisBackend::connect_with(&cluster.url(), options()).await?;
    for (key, _, _) in &held {
        let attempt = other.try_acquire(key, TTL).await?;
        ensure!(
            matches!(attempt, Attempt::Held { .. }),
            "{key:?} was granted to a second client after the failover"
        );
    }
    // Fences on the failed master's slots keep increasing.
    let (key, lease, _) = &held[0];
    let before = lease.fence().context("no fence")?;
    ensure!(holder.release(lease).await?, "release after the failover");
    let next = acquired(&other, key).await?;
    let after = next.fence().context("no fence")?;
    ensure!(after > before, "fence went from {before:?} to {after:?}");

    // The holder's listener moved off the killed node: a release wakes its waiter.
    let (waited, lease, _) = &held[1];
    ensure!(holder.release(lease).await?, "release after the failover");
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

/// Connect errors are typed and bounded: seeds where nothing listens give a retryable error
/// within the connect timeout; a database other than 0 is `InvalidConfig`.
#[tokio::test]
async fn connect_errors_are_typed_and_bounded() -> Result<()> {
    let nowhere: Vec<String> = (0..3)
        .map(|_| Ok(format!("127.0.0.1:{}", lock_harness::free_port()?)))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let refused =
        RedisBackend::connect_with(&format!("redis+cluster://{}", nowhere.join(",")), options())
            .await;
    let took = started.elapsed();
    match refused {
        Err(LockError::Backend {
            retryable: true, ..
        }) => {}
        other => bail!("no seed listening: {other:?}"),
    }
    ensure!(took < Duration::from_millis(1500), "took {took:?}");
    for bad in [
        "redis+cluster://127.0.0.1:1/3",
        "redis+cluster://127.0.0.1:1,,127.0.0.1:2",
    ] {
        ensure!(
            matches!(
                RedisBackend::connect(bad).await,
                Err(LockError::InvalidConfig(_))
            ),
            "{bad} was not InvalidConfig"
        );
    }
    Ok(())
}

/// `wait_replicas(1, …)` on a cluster: `WAIT` goes to the master serving the name's slot. A
/// grant is returned while that master's replica acknowledges; with the replica frozen the
/// acquire is refused with a retryable error and leaves no lock behind.
#[tokio::test]
async fn wait_replicas_waits_for_the_slots_replica() -> Result<()> {
    let cluster = RedisCluster::builder().start().await?;
    let backend = RedisBackend::connect_with(
        &cluster.url(),
        options().wait_replicas(1, Duration::from_millis(200)),
    )
    .await?;
    let key = LockKey::new(unique("waited"))?;
    let lease = acquired(&backend, &key).await?;
    let renewed = backend.renew(&lease, TTL).await?;
    ensure!(backend.release(&renewed).await?, "release");
    let master = master_of(&cluster, &key).await?;
    let replica = cluster.replica_of(master).await?;
    cluster.pause_node(replica)?;
    let refused = backend.try_acquire(&key, TTL).await;
    cluster.resume_node(replica)?;
    let Err(error) = refused else {
        bail!("granted with the slot's replica frozen: {refused:?}");
    };
    ensure!(
        error.is_retryable() && error.to_string().contains("wait_replicas"),
        "unexpected error: {error}"
    );
    let mut conn = cluster
        .node_client(master)?
        .get_multiplexed_async_connection_with_config(&unbounded())
        .await?;
    let scheme = KeyScheme::new(RedisOptions::default_prefix(), 0)?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg(scheme.lock_key(&key))
            .query_async(&mut conn)
            .await?;
        if !exists {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the refused grant is still on the master"
        );
        sleep(Duration::from_millis(10)).await;
    }
    // With the replica back, grants go through again.
    let (again, _) = settle(Duration::from_secs(5), || backend.try_acquire(&key, TTL)).await?;
    ensure!(
        matches!(again, Ok(Attempt::Acquired(_))),
        "after the replica resumed: {again:?}"
    );
    Ok(())
}

/// `rediss+cluster://` (feature `tls`): every node speaks TLS only, the cluster bus and
/// replication too.
#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use lock_harness::tls::TestPki;
    use lock_redis::RedisTls;

    /// Over TLS: locks land on all three masters and renew and release there, a release
    /// wakes a waiter (pub/sub over TLS), and a client that does not trust the nodes' CA is
    /// refused at connect, not retried.
    #[tokio::test]
    async fn tls_cluster_locks_on_every_master() -> Result<()> {
        let pki = TestPki::generate()?;
        let cluster = RedisCluster::builder()
            .replicas(false)
            .tls(&pki)
            .start()
            .await?;
        ensure!(
            cluster.url().starts_with("rediss+cluster://"),
            "{}",
            cluster.url()
        );
        let trusting = options().tls(RedisTls::default().ca_file(&pki.ca.cert_path));
        let backend = RedisBackend::connect_with(&cluster.url(), trusting.clone()).await?;
        let other = RedisBackend::connect_with(&cluster.url(), trusting).await?;
        let mut masters = std::collections::HashSet::new();
        for i in 0..30 {
            let key = LockKey::new(unique(&format!("tls{i}")))?;
            let lease = acquired(&backend, &key).await?;
            masters.insert(master_of(&cluster, &key).await?);
            let renewed = backend.renew(&lease, TTL).await?;
            ensure!(backend.release(&renewed).await?, "release over TLS");
        }
        ensure!(
            masters.len() == 3,
            "locks landed on masters {masters:?} only"
        );

        let waited = LockKey::new(unique("tls-wake"))?;
        let held = acquired(&other, &waited).await?;
        let mut releases = backend.subscribe(&waited).await?;
        ensure!(matches!(
            backend.try_acquire(&waited, TTL).await?,
            Attempt::Held { .. }
        ));
        let released_at = Instant::now();
        ensure!(other.release(&held).await?, "release");
        let wake = releases.next(released_at + Duration::from_secs(3)).await;
        ensure!(
            matches!(wake, lock_core::Wake::Released),
            "the waiter was not woken over TLS: {wake:?}"
        );

        let distrusting = options().tls(RedisTls::default().ca_file(&pki.other_ca.cert_path));
        match RedisBackend::connect_with(&cluster.url(), distrusting).await {
            Err(error) if !error.is_retryable() => {
                println!("untrusted CA: {error}");
                Ok(())
            }
            other => bail!("a client with the wrong CA: {other:?}"),
        }
    }
}
