//! The conformance suite against real `redis-server` processes: one server, Redlock over 3,
//! Redlock over 5.
//!
//! Each test starts its own servers (redis-server starts in a few ms) on free loopback ports
//! through `lock_harness`, and drops them when the test ends: tests never share state.

mod common;

use async_trait::async_trait;
use conformance_tests::{BackendFactory, ServerFaults};
use lock_core::{LockBackend, LockKey};
use lock_harness::redis::RedisServer;
use lock_redis::{KeyScheme, RedisBackend, RedisOptions, RedlockBackend};
use std::sync::Arc;

/// N servers; N = 1 gives `RedisBackend`, N > 1 `RedlockBackend`.
struct RedisFactory {
    servers: Vec<RedisServer>,
    clients: Vec<redis::aio::MultiplexedConnection>,
    scheme: KeyScheme,
}

impl RedisFactory {
    async fn start(nodes: usize) -> anyhow::Result<Self> {
        let mut servers = Vec::with_capacity(nodes);
        let mut clients = Vec::with_capacity(nodes);
        for _ in 0..nodes {
            // Backends connect through the harness proxy (for cut/blackhole); `is_held` reads
            // the server directly.
            let server = RedisServer::builder().proxy(true).start()?;
            clients.push(server.client()?.get_multiplexed_async_connection().await?);
            servers.push(server);
        }
        Ok(RedisFactory {
            servers,
            clients,
            scheme: KeyScheme::new(RedisOptions::default_prefix(), 0)?,
        })
    }
}

#[async_trait]
impl BackendFactory for RedisFactory {
    fn name(&self) -> String {
        match self.servers.len() {
            1 => "redis".into(),
            n => format!("redlock-{n}"),
        }
    }

    async fn backend(&self) -> anyhow::Result<Arc<dyn LockBackend>> {
        let urls: Vec<String> = self.servers.iter().map(RedisServer::url).collect();
        Ok(if urls.len() == 1 {
            Arc::new(RedisBackend::connect(&urls[0]).await?)
        } else {
            Arc::new(RedlockBackend::connect_nodes(&urls, RedisOptions::default()).await?)
        })
    }

    /// Read on the servers directly: held when a quorum of them has the lock key.
    async fn is_held(&self, key: &LockKey) -> anyhow::Result<Option<bool>> {
        let lock_key = self.scheme.lock_key(key);
        let mut holding = 0;
        for client in &self.clients {
            let mut client = client.clone();
            let exists: bool = redis::cmd("EXISTS")
                .arg(&lock_key)
                .query_async(&mut client)
                .await?;
            holding += usize::from(exists);
        }
        Ok(Some(holding > self.servers.len() / 2))
    }

    /// One server: the lock key and the fair queue's entries (Redlock has no queue).
    async fn contenders(&self, key: &LockKey) -> anyhow::Result<Option<usize>> {
        let [client] = self.clients.as_slice() else {
            return Ok(None);
        };
        Ok(Some(
            common::contenders(&mut client.clone(), &self.scheme, key).await?,
        ))
    }

    fn faults(&self) -> Option<&dyn ServerFaults> {
        Some(self)
    }
}

/// Faults hit every node: "the server" of a Redlock is all its masters.
#[async_trait]
impl ServerFaults for RedisFactory {
    async fn pause(&self) -> anyhow::Result<()> {
        self.servers.iter().try_for_each(RedisServer::pause)
    }

    async fn resume(&self) -> anyhow::Result<()> {
        self.servers.iter().try_for_each(RedisServer::resume)
    }

    async fn cut(&self) -> anyhow::Result<()> {
        self.each_proxy(lock_harness::TcpProxy::cut)
    }

    async fn blackhole(&self) -> anyhow::Result<()> {
        self.each_proxy(lock_harness::TcpProxy::blackhole)
    }

    async fn heal(&self) -> anyhow::Result<()> {
        self.each_proxy(lock_harness::TcpProxy::heal)
    }

    async fn delay_answers(&self, delay: std::time::Duration) -> anyhow::Result<()> {
        self.each_proxy(|proxy| proxy.set_delays(std::time::Duration::ZERO, delay))
    }

    async fn forget_connections(&self) -> anyhow::Result<()> {
        self.each_proxy(lock_harness::TcpProxy::forget_flows)
    }

    /// One server: killed and started again without persistence (its data gone). Not for
    /// Redlock (its suites skip the case, with the reason).
    async fn restart(&self) -> anyhow::Result<()> {
        match self.servers.as_slice() {
            [server] => server.restart(),
            _ => anyhow::bail!("Redlock's suites skip the restart case"),
        }
    }
}

impl RedisFactory {
    fn each_proxy(&self, action: impl Fn(&lock_harness::TcpProxy)) -> anyhow::Result<()> {
        for server in &self.servers {
            let proxy = server
                .proxy()
                .ok_or_else(|| anyhow::anyhow!("server started without a proxy"))?;
            action(proxy);
        }
        Ok(())
    }
}

mod single {
    conformance_tests::conformance_suite! {
        factory = super::RedisFactory::start(1),
    }
}

mod redlock3 {
    conformance_tests::conformance_suite! {
        factory = super::RedisFactory::start(3),
        skip = {
            fences_increase_across_a_server_restart: "Redlock fences need the nodes to keep their counters (README, Fencing tokens on Redlock): a node restarted without persistence, in the next quorum with a node that lagged behind the last grant, can repeat a fence; run Redlock nodes with persistence",
            fair_queue_serves_waiters_in_arrival_order: "Redlock has no fair queue: a queue on each node cannot agree on one order (Capabilities::fair_queue is false; see README, Redlock)",
            semaphore_never_exceeds_permits: "a semaphore with more than one permit cannot keep at most N holders with per-node majorities: on 3 nodes with 2 permits, holders on {A,B}, {B,C} and {A,C} each have a quorum while every node admits only 2 (see README, Redlock; Capabilities::semaphores is false)",
            semaphore_dead_holder_permit_returns: "a semaphore with more than one permit cannot keep at most N holders with per-node majorities: on 3 nodes with 2 permits, holders on {A,B}, {B,C} and {A,C} each have a quorum while every node admits only 2 (see README, Redlock; Capabilities::semaphores is false)",
            semaphore_limits_must_agree: "a semaphore with more than one permit cannot keep at most N holders with per-node majorities: on 3 nodes with 2 permits, holders on {A,B}, {B,C} and {A,C} each have a quorum while every node admits only 2 (see README, Redlock; Capabilities::semaphores is false)",
            semaphore_loss_and_cancel: "a semaphore with more than one permit cannot keep at most N holders with per-node majorities: on 3 nodes with 2 permits, holders on {A,B}, {B,C} and {A,C} each have a quorum while every node admits only 2 (see README, Redlock; Capabilities::semaphores is false)",
            semaphore_release_wakes_waiter: "a semaphore with more than one permit cannot keep at most N holders with per-node majorities: on 3 nodes with 2 permits, holders on {A,B}, {B,C} and {A,C} each have a quorum while every node admits only 2 (see README, Redlock; Capabilities::semaphores is false)",
        },
    }
}

mod redlock5 {
    conformance_tests::conformance_suite! {
        factory = super::RedisFactory::start(5),
        skip = {
            fences_increase_across_a_server_restart: "Redlock fences need the nodes to keep their counters (README, Fencing tokens on Redlock): a node restarted without persistence, in the next quorum with a node that lagged behind the last grant, can repeat a fence; run Redlock nodes with persistence",
            fair_queue_serves_waiters_in_arrival_order: "Redlock has no fair queue: a queue on each node cannot agree on one order (Capabilities::fair_queue is false; see README, Redlock)",
            semaphore_never_exceeds_permits: "a semaphore with more than one permit cannot keep at most N holders with per-node majorities: on 3 nodes with 2 permits, holders on {A,B}, {B,C} and {A,C} each have a quorum while every node admits only 2 (see README, Redlock; Capabilities::semaphores is false)",
            semaphore_dead_holder_permit_returns: "a semaphore with more than one permit cannot keep at most N holders with per-node majorities: on 3 nodes with 2 permits, holders on {A,B}, {B,C} and {A,C} each have a quorum while every node admits only 2 (see README, Redlock; Capabilities::semaphores is false)",
            semaphore_limits_must_agree: "a semaphore with more than one permit cannot keep at most N holders with per-node majorities: on 3 nodes with 2 permits, holders on {A,B}, {B,C} and {A,C} each have a quorum while every node admits only 2 (see README, Redlock; Capabilities::semaphores is false)",
            semaphore_loss_and_cancel: "a semaphore with more than one permit cannot keep at most N holders with per-node majorities: on 3 nodes with 2 permits, holders on {A,B}, {B,C} and {A,C} each have a quorum while every node admits only 2 (see README, Redlock; Capabilities::semaphores is false)",
            semaphore_release_wakes_waiter: "a semaphore with more than one permit cannot keep at most N holders with per-node majorities: on 3 nodes with 2 permits, holders on {A,B}, {B,C} and {A,C} each have a quorum while every node admits only 2 (see README, Redlock; Capabilities::semaphores is false)",
        },
    }
}
