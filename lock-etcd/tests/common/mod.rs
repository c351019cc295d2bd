//! Shared by the etcd test binaries: a conformance factory over a harness-started cluster.

#![allow(dead_code)]

use async_trait::async_trait;
use conformance_tests::{BackendFactory, ServerFaults};
use lock_core::{LockBackend, LockKey};
use lock_harness::etcd::EtcdCluster;
use std::sync::Arc;

/// Backends on one etcd cluster (1 or 3 members) that this test started itself; every backend
/// connects through the harness proxies, `is_held` reads the server directly.
pub struct EtcdFactory {
    pub cluster: EtcdCluster,
    pub prefix: String,
}

impl EtcdFactory {
    /// Starts a cluster of `members` for one test (killed when the factory drops).
    pub async fn start(members: usize) -> anyhow::Result<Self> {
        let cluster = EtcdCluster::start(members).await?;
        Ok(EtcdFactory {
            cluster,
            prefix: format!("distlock-test-{:08x}", rand_suffix()),
        })
    }

    pub fn url(&self) -> String {
        self.cluster.url(Some(&self.prefix))
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) as u32
}

#[async_trait]
impl BackendFactory for EtcdFactory {
    fn name(&self) -> String {
        format!("etcd-{}", self.cluster.size())
    }

    async fn backend(&self) -> anyhow::Result<Arc<dyn LockBackend>> {
        Ok(lock_etcd::connect(&self.url()).await?)
    }

    async fn is_held(&self, key: &LockKey) -> anyhow::Result<Option<bool>> {
        let range = lock_etcd::key_range(&self.prefix, key);
        let entries = self.cluster.keys_with_prefix(&range).await?;
        Ok(Some(!entries.is_empty()))
    }

    /// The keys under the lock's range: the holder's and each waiter's.
    async fn contenders(&self, key: &LockKey) -> anyhow::Result<Option<usize>> {
        let range = lock_etcd::key_range(&self.prefix, key);
        Ok(Some(self.cluster.keys_with_prefix(&range).await?.len()))
    }

    fn faults(&self) -> Option<&dyn ServerFaults> {
        Some(self)
    }
}

/// Faults hit every member: "the server" is the whole cluster.
#[async_trait]
impl ServerFaults for EtcdFactory {
    async fn pause(&self) -> anyhow::Result<()> {
        (0..self.cluster.size()).try_for_each(|member| self.cluster.pause(member))
    }

    async fn resume(&self) -> anyhow::Result<()> {
        (0..self.cluster.size()).try_for_each(|member| self.cluster.resume(member))
    }

    async fn cut(&self) -> anyhow::Result<()> {
        (0..self.cluster.size()).try_for_each(|member| self.cluster.cut(member))
    }

    async fn blackhole(&self) -> anyhow::Result<()> {
        (0..self.cluster.size()).try_for_each(|member| self.cluster.blackhole(member))
    }

    async fn heal(&self) -> anyhow::Result<()> {
        (0..self.cluster.size()).try_for_each(|member| self.cluster.heal(member))
    }

    async fn delay_answers(&self, delay: std::time::Duration) -> anyhow::Result<()> {
        for member in self.cluster.members() {
            member.proxy().set_delays(std::time::Duration::ZERO, delay);
        }
        Ok(())
    }

    async fn forget_connections(&self) -> anyhow::Result<()> {
        for member in self.cluster.members() {
            member.proxy().forget_flows();
        }
        Ok(())
    }

    /// Every member killed and started again on its data directory (a crash of the whole
    /// cluster: what raft committed survives).
    async fn restart(&self) -> anyhow::Result<()> {
        self.cluster.restart_all().await
    }
}
