//! The contract every backend keeps.

use crate::{Lease, LockError, LockKey, Releases};
use async_trait::async_trait;
use std::time::Duration;
use tokio::time::Instant;

/// A side of a reader-writer lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RwMode {
    /// Shared: any number of readers at once.
    Read,
    /// Exclusive: one writer, no reader.
    Write,
}

/// How long a refused writer's mark keeps new readers out ([`LockBackend::try_acquire_rw`]).
/// The client retries a waiting writer at least every half of it, so the mark never lapses
/// while the writer waits.
pub const WRITER_INTENT: Duration = Duration::from_secs(2);

fn unsupported(backend: &str, what: &str) -> LockError {
    LockError::InvalidConfig(format!(
        "the {backend} backend has no {what} (its Capabilities say so)"
    ))
}

/// The answer to one acquisition attempt.
#[derive(Debug)]
pub enum Attempt {
    /// The lock is ours.
    Acquired(Lease),
    /// Someone else holds it. `expires_in` is the holder's remaining TTL when the backend
    /// knows it: the client never waits longer than that before trying again, so a holder
    /// that died is taken over as soon as its lease runs out.
    Held {
        /// Remaining TTL of the current holder, if known.
        expires_in: Option<Duration>,
    },
}

impl Attempt {
    /// The lease, if acquired.
    pub fn into_lease(self) -> Option<Lease> {
        match self {
            Attempt::Acquired(lease) => Some(lease),
            Attempt::Held { .. } => None,
        }
    }
}

/// What a backend can promise. The client and the conformance suite adapt to it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Leases carry fencing tokens that strictly increase per key.
    pub fencing: bool,
    /// `subscribe` delivers a signal on release (pub/sub, NOTIFY, watch); without it the
    /// client polls with backoff.
    pub release_notifications: bool,
    /// The backend queues waiters itself ([`LockBackend::acquire_queued`]), first come first
    /// served.
    pub fair_queue: bool,
    /// A waiter can wait on the server itself ([`LockBackend::wait_on_server`]), which grants
    /// it a lock the moment it is freed: no release signal and attempt in between. Not a
    /// promise of order, and not for every waiter (the backend's waiting connections are
    /// bounded): the others wait for release signals as usual.
    pub server_wait: bool,
    /// Smallest TTL the server honours; smaller requests are raised to it (and the granted
    /// TTL is reported in the lease).
    pub min_ttl: Duration,
    /// Resolution of the server's TTL (1 ms for Redis `PX`, 1 s for etcd leases).
    pub ttl_granularity: Duration,
    /// How long after TTL a lock of a holder that stopped renewing may still be held: the
    /// server's expiry slack (timer resolution, heartbeat interval). The fixed part of
    /// [`Capabilities::expiry_slack_for`]; read that one.
    pub expiry_slack: Duration,
    /// The part of the slack that grows with the lease's TTL, in percent of the TTL: a
    /// backend whose server frees leases in groups (PostgreSQL frees a holder session's
    /// locks together, at the latest deadline among them) can keep a stopped holder's lease
    /// up to this share of its TTL past its deadline. 0 where each lease expires on its own.
    pub expiry_slack_ttl_percent: u32,
    /// Counting semaphores: [`LockBackend::try_acquire_permits`].
    pub semaphores: bool,
    /// Reader-writer locks: [`LockBackend::try_acquire_rw`].
    pub rw_locks: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            fencing: false,
            release_notifications: false,
            fair_queue: false,
            server_wait: false,
            min_ttl: Duration::from_millis(1),
            ttl_granularity: Duration::from_millis(1),
            expiry_slack: Duration::from_millis(50),
            expiry_slack_ttl_percent: 0,
            semaphores: false,
            rw_locks: false,
        }
    }
}

impl Capabilities {
    /// How long after its deadline a lease of `ttl` whose holder stopped (paused, cut off,
    /// dead) may still be held on the server: [`Capabilities::expiry_slack`] plus
    /// [`Capabilities::expiry_slack_ttl_percent`] of `ttl`. A waiter gets the lock by then.
    pub fn expiry_slack_for(&self, ttl: Duration) -> Duration {
        let grouped = ttl.saturating_mul(self.expiry_slack_ttl_percent) / 100;
        self.expiry_slack.saturating_add(grouped)
    }
}

/// A lock store. One attempt at a time; the client ([`crate::Locker`]) adds waiting, retry,
/// renewal and the lost signal on top.
///
/// Every method takes `&self` and may be called concurrently. Renew and release compare the
/// lease's owner token atomically on the server: they never act on another holder's lock.
#[async_trait]
pub trait LockBackend: Send + Sync + std::fmt::Debug + 'static {
    /// One attempt that never waits behind a holder.
    ///
    /// `ttl` has been validated ([`crate::validate_ttl`]). The returned lease's
    /// `sent_at` must be taken before the request leaves, so that its deadline is safe.
    async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError>;

    /// Extends a lease we still hold to `ttl` from now. `Err(LockError::Lost)` when the
    /// backend no longer has us as the holder; other errors mean "could not tell".
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError>;

    /// Gives the lease up. `Ok(false)`: it was no longer ours (expired, taken over, already
    /// released). Never frees another holder's lock.
    async fn release(&self, lease: &Lease) -> Result<bool, LockError>;

    /// Starts listening for releases of `key`. The client subscribes before the attempt that
    /// precedes a wait, so a release in between is not missed. The default never signals:
    /// the client then polls with backoff.
    async fn subscribe(&self, _key: &LockKey) -> Result<Releases, LockError> {
        Ok(Releases::never())
    }

    /// [`LockBackend::subscribe`] for a waiter of the plain lock `key` that will wait on the
    /// server ([`LockBackend::wait_on_server`]; the client calls this instead of `subscribe`
    /// when [`Capabilities::server_wait`] is set). The default is `subscribe`.
    ///
    /// A backend may leave out what only a waiter of release signals needs (PostgreSQL's
    /// waiter mark, which makes every release of the key pay for a `NOTIFY`: a waiter on the
    /// server is granted the lock by the server itself), provided that its `wait_on_server`,
    /// whenever it returns without having waited on the server (every waiting connection
    /// taken, a failure), first puts that in place and then looks at the lock once more (a
    /// release in between sent no signal), returning the lock if it got it.
    async fn subscribe_server_waiter(&self, key: &LockKey) -> Result<Releases, LockError> {
        self.subscribe(key).await
    }

    /// Waits in the backend's own fair queue until the lock is granted or `deadline`
    /// passes (`Ok(None)`). Called only when [`Capabilities::fair_queue`] is set.
    ///
    /// Must be cancel-safe: dropping the future leaves no queue entry and no lock behind.
    async fn acquire_queued(
        &self,
        key: &LockKey,
        ttl: Duration,
        deadline: Instant,
    ) -> Result<Option<Lease>, LockError> {
        let _ = (key, ttl, deadline);
        Err(LockError::InvalidConfig(
            "this backend has no fair queue (Capabilities::fair_queue is false)".into(),
        ))
    }

    /// Waits on the server for the plain lock `key` until `until` and takes it when the
    /// server grants it. Called by the client in a wait, after an attempt was answered "held",
    /// in place of waiting for a release signal, when [`Capabilities::server_wait`] is set.
    /// `Ok(None)` when `until` came first, or when the backend cannot wait there now (every
    /// waiting connection is taken): the client then waits for a release signal until
    /// `until`. The lease's validity must count from no later than the server started its
    /// TTL.
    ///
    /// Must be cancel-safe: dropping the future leaves nothing queued or held on the server
    /// for longer than a moment.
    async fn wait_on_server(
        &self,
        key: &LockKey,
        ttl: Duration,
        until: Instant,
    ) -> Result<Option<Lease>, LockError> {
        let _ = (key, ttl, until);
        Ok(None)
    }

    /// One attempt at `count` of the `limit` permits of the semaphore `key` (a name of its
    /// own: a semaphore and a lock of the same name are unrelated), never waiting. The lease
    /// has kind [`crate::LeaseKind::Permits`] and is renewed and released like a lock's. At most
    /// `limit` permits are held at any instant across all clients. While any permit is held,
    /// a request with another `limit` is refused with [`LockError::InvalidConfig`]; the first
    /// request after the last permit ends sets the limit. Called only when
    /// [`Capabilities::semaphores`] is set.
    async fn try_acquire_permits(
        &self,
        key: &LockKey,
        limit: u32,
        count: u32,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        let _ = (key, limit, count, ttl);
        Err(unsupported(self.name(), "semaphores"))
    }

    /// One attempt at one side of the reader-writer lock `key` (a name of its own), never
    /// waiting: any number of readers, or one writer. Writers are not starved: a refused
    /// writer marks the lock for [`WRITER_INTENT`], and while the mark lives new readers are
    /// refused (readers already in keep their leases); the client retries a waiting writer at
    /// least every half of it. Fences come from one counter per name: a writer's fence is
    /// greater than every earlier holder's, a reader's greater than every earlier writer's.
    /// Called only when [`Capabilities::rw_locks`] is set.
    async fn try_acquire_rw(
        &self,
        key: &LockKey,
        mode: RwMode,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        let _ = (key, mode, ttl);
        Err(unsupported(self.name(), "reader-writer locks"))
    }

    /// What this backend can promise. Constant for the backend's life: a [`crate::Locker`]
    /// reads it once.
    fn capabilities(&self) -> Capabilities;

    /// A short name for logs and the `backend` label of metrics (`memory`, `redis`, `redlock`,
    /// `postgres`, `etcd`). Keep it constant: it is a metric label, not an instance name.
    fn name(&self) -> &'static str {
        "custom"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_slack_grows_with_the_ttl_share() {
        let mut caps = Capabilities {
            expiry_slack: Duration::from_millis(250),
            ..Capabilities::default()
        };
        assert_eq!(
            caps.expiry_slack_for(Duration::from_secs(3)),
            Duration::from_millis(250)
        );
        caps.expiry_slack_ttl_percent = 100;
        assert_eq!(
            caps.expiry_slack_for(Duration::from_secs(3)),
            Duration::from_millis(3250)
        );
        caps.expiry_slack_ttl_percent = 34;
        assert_eq!(
            caps.expiry_slack_for(Duration::from_millis(1500)),
            Duration::from_millis(760)
        );
        caps.expiry_slack_ttl_percent = u32::MAX;
        assert_eq!(
            caps.expiry_slack_for(Duration::MAX),
            Duration::MAX / 100 + Duration::from_millis(250)
        );
    }
}
