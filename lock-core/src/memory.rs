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
    // Kept after release so fences keep increasing for the life of the backend.
    fences: HashMap<LockKey, u64>,
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
        let owner = OwnerToken::random();
        state.holders.insert(
            key.clone(),
            Holder {
                owner,
                expires_at: now + ttl,
            },
        );
        let fence = state.fences.entry(key.clone()).or_insert(0);
        *fence += 1;
        let fence = FencingToken(*fence);
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
