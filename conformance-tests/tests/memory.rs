//! The conformance suite on the in-memory backend.

use async_trait::async_trait;
use conformance_tests::BackendFactory;
use lock_core::{LockBackend, LockKey, MemoryBackend};
use std::sync::Arc;

/// Every backend from this factory shares one lock table, as processes share a server.
struct MemoryFactory {
    table: MemoryBackend,
}

#[async_trait]
impl BackendFactory for MemoryFactory {
    fn name(&self) -> String {
        "memory".into()
    }

    async fn backend(&self) -> anyhow::Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(self.table.clone()))
    }

    async fn is_held(&self, key: &LockKey) -> anyhow::Result<Option<bool>> {
        Ok(Some(self.table.is_held(key)))
    }
}

conformance_tests::conformance_suite! {
    factory = async { anyhow::Ok(MemoryFactory { table: MemoryBackend::new() }) },
    skip = {
        fair_queue_serves_waiters_in_arrival_order: "no fair queue: a released key goes to whichever waiter asks first (Capabilities::fair_queue is false)",
        server_pause_fires_lost: "in-process table: there is no server to pause",
        fences_increase_across_a_server_restart: "in-process table: there is no server to restart (its fences live and end with the process)",
        connection_cut_fires_lost_and_recovers: "in-process table: there is no connection to cut",
        connection_blackhole_fires_lost_and_recovers: "in-process table: there is no connection to cut",
        stopped_holders_leases_expire_by_their_slack: "in-process table: a holder cannot be cut off from it (a leaked guard's expiry is abandoned_lock_expires_within_ttl)",
        late_renewal_counts_from_its_sending: "in-process table: there is no connection whose answers could come late",
    },
}
