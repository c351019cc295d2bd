//! `MemoryBackend`: locks inside one process, the embedded default.

use crate::{
    Attempt, Capabilities, FencingToken, Lease, LockBackend, LockError, LockKey, OwnerToken,
    ReleaseHub, Releases, validate_ttl,
};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
struct Holder {
    owner: OwnerToken,
    expires_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    holders: HashMap<LockKey, Holder>,
    /// The last fence handed out. One counter for every key: fences still strictly increase
    /// per key, in constant memory (a counter per key would keep an entry for every key ever
    /// locked, e.g. one per order id).
    last_fence: u64,
    /// Sweep expired holders when the table reaches this size (then twice the live count),
    /// so abandoned keys cost amortised O(1) per acquire and never accumulate.
    sweep_at: usize,
}

/// The smallest table size that triggers a sweep of expired holders.
const MIN_SWEEP: usize = 64;

impl State {
    fn sweep_expired(&mut self, now: Instant) {
        if self.holders.len() < self.sweep_at.max(MIN_SWEEP) {
            return;
        }
        self.holders.retain(|_, holder| holder.expires_at > now);
        self.sweep_at = (self.holders.len() * 2).max(MIN_SWEEP);
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    releases: ReleaseHub,
}

/// Locks held in this process's memory, with real TTL expiry, fencing tokens and
/// notification-based waiting.
///
/// Clones share the same state, so several [`crate::Locker`]s built from clones contend for
/// real. It protects nothing across processes: use it for tests, single-process services,
/// and as the default before a server is configured.
#[derive(Clone, Debug, Default)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

impl MemoryBackend {
    /// An empty lock table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `key` is held right now (not expired).
    pub fn is_held(&self, key: &LockKey) -> bool {
        let state = self.state();
        state
            .holders
            .get(key)
            .is_some_and(|holder| holder.expires_at > Instant::now())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl LockBackend for MemoryBackend {
    async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
        validate_ttl(ttl)?;
        let now = Instant::now();
        let mut state = self.state();
        if let Some(holder) = state.holders.get(key)
            && holder.expires_at > now
        {
            return Ok(Attempt::Held {
                expires_in: Some(holder.expires_at - now),
            });
        }
        state.sweep_expired(now);
        let owner = OwnerToken::random();
        state.holders.insert(
            key.clone(),
            Holder {
                owner,
                expires_at: now + ttl,
            },
        );
        state.last_fence += 1;
        let fence = FencingToken(state.last_fence);
        Ok(Attempt::Acquired(Lease::new(
            key.clone(),
            owner,
            Some(fence),
            ttl,
            now,
        )))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
        validate_ttl(ttl)?;
        let now = Instant::now();
        let mut state = self.state();
        match state.holders.get_mut(lease.key()) {
            Some(holder) if holder.owner == lease.owner() && holder.expires_at > now => {
                holder.expires_at = now + ttl;
                Ok(lease.renewed(ttl, now))
            }
            Some(holder) if holder.owner == lease.owner() => {
                Err(LockError::lost(lease.key().as_str(), "the lease expired"))
            }
            _ => Err(LockError::lost(
                lease.key().as_str(),
                "another owner holds the key, or nobody",
            )),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
        let now = Instant::now();
        let mut state = self.state();
        let ours = state
            .holders
            .get(lease.key())
            .is_some_and(|holder| holder.owner == lease.owner());
        if !ours {
            return Ok(false);
        }
        let holder = state.holders.remove(lease.key());
        drop(state);
        self.shared.releases.notify(lease.key().as_str());
        Ok(holder.is_some_and(|holder| holder.expires_at > now))
    }

    async fn subscribe(&self, key: &LockKey) -> Result<Releases, LockError> {
        Ok(self.shared.releases.subscribe(key.as_str()))
    }

    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fencing: true,
            release_notifications: true,
            fair_queue: false,
            min_ttl: Duration::from_millis(1),
            ttl_granularity: Duration::from_nanos(1),
            expiry_slack: Duration::from_millis(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl MemoryBackend {
        /// Entries the table keeps, held or not.
        fn entries(&self) -> usize {
            self.state().holders.len()
        }
    }

    /// Locking a fresh key per order id must not grow the table for good: released keys
    /// and abandoned (expired) ones leave nothing behind, and fences still increase.
    #[tokio::test]
    async fn table_does_not_grow_with_keys_ever_locked() {
        let backend = MemoryBackend::new();
        let mut first_fence = None;
        for order in 0..10_000 {
            let key = LockKey::new(format!("order:{order}")).unwrap();
            let lease = backend
                .try_acquire(&key, Duration::from_secs(5))
                .await
                .unwrap()
                .into_lease()
                .unwrap();
            first_fence.get_or_insert(lease.fence().unwrap());
            assert!(backend.release(&lease).await.unwrap());
        }
        // Abandoned holders (never released, expired), 1,000 at a time: the table stays
        // bounded by the holders alive at once (twice that, amortised), not by keys ever used.
        for batch in 0..10 {
            for order in 0..1_000 {
                let key = LockKey::new(format!("abandoned:{batch}:{order}")).unwrap();
                backend
                    .try_acquire(&key, Duration::from_millis(1))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let entries = backend.entries();
        assert!(
            entries <= 2 * 1_000 + MIN_SWEEP,
            "{entries} entries kept for 20,000 keys locked, at most 1,000 of them alive at once"
        );
        // The same key again still gets a higher fence than any before.
        let key = LockKey::new("order:0").unwrap();
        let lease = backend
            .try_acquire(&key, Duration::from_secs(5))
            .await
            .unwrap()
            .into_lease()
            .unwrap();
        assert!(
            lease.fence() > first_fence,
            "order:0's fence went backwards"
        );
    }
}
