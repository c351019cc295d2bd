//! `MemoryBackend`: locks inside one process, the embedded default.

use crate::{
    Attempt, Capabilities, FencingToken, Lease, LeaseKind, LockBackend, LockError, LockKey,
    OwnerToken, ReleaseHub, Releases, RwMode, WRITER_INTENT, validate_ttl,
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

/// A counting semaphore: its limit (set by the first holder) and its holders' permits.
#[derive(Debug, Default)]
struct Semaphore {
    limit: u32,
    /// Owner → (permits held, expiry).
    holders: HashMap<OwnerToken, (u32, Instant)>,
}

impl Semaphore {
    fn purge(&mut self, now: Instant) {
        self.holders.retain(|_, (_, expires_at)| *expires_at > now);
    }
}

/// A reader-writer lock: its readers, its writer, and a waiting writer's mark.
#[derive(Debug, Default)]
struct RwLockState {
    readers: HashMap<OwnerToken, Instant>,
    writer: Option<(OwnerToken, Instant)>,
    /// New readers are refused until then (a writer is waiting).
    writer_waiting_until: Option<Instant>,
}

impl RwLockState {
    fn purge(&mut self, now: Instant) {
        self.readers.retain(|_, expires_at| *expires_at > now);
        self.writer = self.writer.filter(|(_, expires_at)| *expires_at > now);
    }

    fn is_idle(&self, now: Instant) -> bool {
        self.readers.values().all(|expires_at| *expires_at <= now)
            && self.writer.is_none_or(|(_, expires_at)| expires_at <= now)
            && self.writer_waiting_until.is_none_or(|until| until <= now)
    }

    /// The soonest any current holder's lease ends.
    fn next_expiry(&self, now: Instant) -> Option<Duration> {
        self.readers
            .values()
            .chain(self.writer.as_ref().map(|(_, expires_at)| expires_at))
            .min()
            .map(|expires_at| expires_at.saturating_duration_since(now))
    }
}

#[derive(Debug, Default)]
struct State {
    holders: HashMap<LockKey, Holder>,
    semaphores: HashMap<LockKey, Semaphore>,
    rw_locks: HashMap<LockKey, RwLockState>,
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
        let entries = self.holders.len() + self.semaphores.len() + self.rw_locks.len();
        if entries < self.sweep_at.max(MIN_SWEEP) {
            return;
        }
        self.holders.retain(|_, holder| holder.expires_at > now);
        self.semaphores.retain(|_, semaphore| {
            semaphore.purge(now);
            !semaphore.holders.is_empty()
        });
        self.rw_locks.retain(|_, rw| !rw.is_idle(now));
        let entries = self.holders.len() + self.semaphores.len() + self.rw_locks.len();
        self.sweep_at = (entries * 2).max(MIN_SWEEP);
    }

    fn next_fence(&mut self) -> FencingToken {
        self.last_fence += 1;
        FencingToken(self.last_fence)
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
        if lease.kind() != LeaseKind::Lock {
            return self.renew_shared_kind(lease, ttl);
        }
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
        if lease.kind() != LeaseKind::Lock {
            return Ok(self.release_shared_kind(lease));
        }
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

    async fn try_acquire_permits(
        &self,
        key: &LockKey,
        limit: u32,
        count: u32,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        validate_ttl(ttl)?;
        check_permits(key, limit, count)?;
        let now = Instant::now();
        let mut state = self.state();
        state.sweep_expired(now);
        let semaphore = state.semaphores.entry(key.clone()).or_default();
        semaphore.purge(now);
        if semaphore.holders.is_empty() {
            semaphore.limit = limit;
        } else if semaphore.limit != limit {
            return Err(limit_mismatch(key, semaphore.limit, limit));
        }
        // Summed in u64: permits near u32::MAX must not wrap (and let one more holder in).
        let used: u64 = semaphore
            .holders
            .values()
            .map(|(count, _)| u64::from(*count))
            .sum();
        if used + u64::from(count) > u64::from(limit) {
            let expires_in = semaphore
                .holders
                .values()
                .map(|(_, expires_at)| expires_at.saturating_duration_since(now))
                .min();
            return Ok(Attempt::Held { expires_in });
        }
        let owner = OwnerToken::random();
        semaphore.holders.insert(owner, (count, now + ttl));
        let fence = state.next_fence();
        Ok(Attempt::Acquired(
            Lease::new(key.clone(), owner, Some(fence), ttl, now)
                .with_kind(LeaseKind::Permits { limit, count }),
        ))
    }

    async fn try_acquire_rw(
        &self,
        key: &LockKey,
        mode: RwMode,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        validate_ttl(ttl)?;
        let now = Instant::now();
        let mut state = self.state();
        state.sweep_expired(now);
        let rw = state.rw_locks.entry(key.clone()).or_default();
        rw.purge(now);
        let owner = OwnerToken::random();
        let kind = match mode {
            RwMode::Read => {
                let writer_waits = rw.writer_waiting_until.is_some_and(|until| until > now);
                if rw.writer.is_some() || writer_waits {
                    let expires_in = rw.next_expiry(now);
                    return Ok(Attempt::Held { expires_in });
                }
                rw.readers.insert(owner, now + ttl);
                LeaseKind::Read
            }
            RwMode::Write => {
                if rw.writer.is_some() || !rw.readers.is_empty() {
                    rw.writer_waiting_until = Some(now + WRITER_INTENT);
                    let expires_in = rw.next_expiry(now);
                    return Ok(Attempt::Held { expires_in });
                }
                rw.writer = Some((owner, now + ttl));
                rw.writer_waiting_until = None;
                LeaseKind::Write
            }
        };
        let fence = state.next_fence();
        Ok(Attempt::Acquired(
            Lease::new(key.clone(), owner, Some(fence), ttl, now).with_kind(kind),
        ))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fencing: true,
            release_notifications: true,
            fair_queue: false,
            server_wait: false,
            min_ttl: Duration::from_millis(1),
            ttl_granularity: Duration::from_nanos(1),
            expiry_slack: Duration::from_millis(5),
            expiry_slack_ttl_percent: 0,
            semaphores: true,
            rw_locks: true,
        }
    }
}

/// A semaphore request's numbers, checked the same way on every backend (the client checks
/// them before any backend call; a backend checks again for callers of the trait itself): a
/// limit of at least 1, and 1 to `limit` permits.
pub fn check_permits(key: &LockKey, limit: u32, count: u32) -> Result<(), LockError> {
    if limit == 0 {
        return Err(LockError::InvalidConfig(format!(
            "semaphore {key}: a limit of 0 permits admits nobody"
        )));
    }
    if count == 0 || count > limit {
        return Err(LockError::InvalidConfig(format!(
            "semaphore {key}: cannot take {count} of {limit} permits (1 to {limit})"
        )));
    }
    Ok(())
}

/// The error every backend gives when two callers disagree on a semaphore's limit while
/// permits are held: refused, never silently merged. Its message names both limits.
pub fn limit_mismatch(key: &LockKey, held_with: u32, asked: u32) -> LockError {
    LockError::InvalidConfig(format!(
        "semaphore {key} is held with a limit of {held_with} permits; a request with a limit \
         of {asked} is refused (every caller must use the same limit; a new limit applies once \
         no permit is held)"
    ))
}

impl MemoryBackend {
    fn renew_shared_kind(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
        let now = Instant::now();
        let mut state = self.state();
        let expires_at = match lease.kind() {
            LeaseKind::Permits { .. } => state
                .semaphores
                .get_mut(lease.key())
                .and_then(|semaphore| semaphore.holders.get_mut(&lease.owner()))
                .map(|(_, expires_at)| expires_at),
            LeaseKind::Read => state
                .rw_locks
                .get_mut(lease.key())
                .and_then(|rw| rw.readers.get_mut(&lease.owner())),
            LeaseKind::Write => state
                .rw_locks
                .get_mut(lease.key())
                .and_then(|rw| rw.writer.as_mut())
                .filter(|(owner, _)| *owner == lease.owner())
                .map(|(_, expires_at)| expires_at),
            LeaseKind::Lock => None,
        };
        match expires_at {
            Some(expires_at) if *expires_at > now => {
                *expires_at = now + ttl;
                Ok(lease.renewed(ttl, now))
            }
            _ => Err(LockError::lost(
                lease.key().as_str(),
                "the lease expired, or another owner holds it",
            )),
        }
    }

    fn release_shared_kind(&self, lease: &Lease) -> bool {
        let now = Instant::now();
        let mut state = self.state();
        let expires_at = match lease.kind() {
            LeaseKind::Permits { .. } => state
                .semaphores
                .get_mut(lease.key())
                .and_then(|semaphore| semaphore.holders.remove(&lease.owner()))
                .map(|(_, expires_at)| expires_at),
            LeaseKind::Read => state
                .rw_locks
                .get_mut(lease.key())
                .and_then(|rw| rw.readers.remove(&lease.owner())),
            LeaseKind::Write => state.rw_locks.get_mut(lease.key()).and_then(|rw| {
                let (owner, expires_at) = rw.writer?;
                (owner == lease.owner()).then(|| {
                    rw.writer = None;
                    expires_at
                })
            }),
            LeaseKind::Lock => None,
        };
        drop(state);
        if expires_at.is_some() {
            self.shared.releases.notify(lease.key().as_str());
        }
        expires_at.is_some_and(|expires_at| expires_at > now)
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

    /// Permits near `u32::MAX` are counted without wrapping: with every permit of a
    /// `u32::MAX` limit held, one more is refused (it used to wrap the sum to 0 and get in, or
    /// panic in a debug build).
    #[tokio::test]
    async fn permits_near_u32_max_never_exceed_the_limit() {
        let backend = MemoryBackend::new();
        let key = LockKey::new("huge").unwrap();
        let ttl = Duration::from_secs(30);
        let all = backend
            .try_acquire_permits(&key, u32::MAX, u32::MAX, ttl)
            .await
            .unwrap();
        assert!(matches!(all, Attempt::Acquired(_)), "{all:?}");
        let one_more = backend
            .try_acquire_permits(&key, u32::MAX, 1, ttl)
            .await
            .unwrap();
        assert!(matches!(one_more, Attempt::Held { .. }), "{one_more:?}");
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
