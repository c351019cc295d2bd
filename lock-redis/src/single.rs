//! `RedisBackend`: one Redis server.

use crate::node::{NodeAcquire, Nodes, ttl_millis};
use crate::shared::{SharedAcquire, Target};
use crate::{KeyScheme, RedisOptions};
use async_trait::async_trait;
use lock_core::{
    Attempt, Capabilities, FencingToken, Lease, LeaseKind, LockBackend, LockError, LockKey,
    OwnerToken, Releases, RwMode, validate_ttl,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Locks on one Redis server (or a primary with its replicas: only the primary is used).
///
/// Acquire, renew and release are each one Lua script (EVALSHA) over one multiplexed
/// [`redis::aio::ConnectionManager`]: `SET NX PX` + the next fence (the slot's counter + 1 or
/// the server clock in µs, whichever is larger),
/// compare-and-`PEXPIRE`, compare-and-`DEL` + `PUBLISH` (only when a waiter marked the lock).
/// Waiters share one pub/sub connection. Cheap to clone (shared connections).
///
/// Held locks survive a server restart only with persistence (AOF `appendfsync always`);
/// fences keep increasing without it too, since they follow the server clock (the crate
/// README, "Fences follow the server clock too").
#[derive(Clone, Debug)]
pub struct RedisBackend {
    inner: Arc<Nodes>,
    cleanup: Arc<Cleanup>,
}

/// The most clean-ups queued at once per backend (first attempts and retries waiting to go
/// out). Beyond it a failed acquire's key (if the script ran at all) is freed by its TTL, as
/// it would be without clean-up.
const CLEANUP_CAPACITY: usize = 256;
/// The most retries in flight at once (pipelined on the connection). First attempts are not
/// counted: each must go out at once, behind its acquire (at most [`CLEANUP_CAPACITY`] are
/// ever queued).
const CLEANUP_RETRIES_IN_FLIGHT: usize = 64;

/// A token to compare-and-delete: the acquire that set it may have run, its answer never came.
#[derive(Debug)]
struct Pending {
    target: Target,
    token: String,
    /// When the server frees the key anyway (the acquire's TTL).
    expires: Instant,
    /// A retry waits until then (`None`: a first attempt, sent at once).
    not_before: Option<Instant>,
}

/// The clean-ups of one backend: a bounded queue and at most one worker, so an outage that
/// fails many acquires costs a bounded amount of memory, tasks and (when the server returns)
/// commands, instead of one retry loop per failed acquire.
///
/// A first attempt goes out at once, also while earlier clean-ups are in flight: sent on the
/// connection its acquire went out on, it runs after that acquire if the acquire ever
/// arrives. Queued behind a batch still waiting for answers from a silent connection, it
/// went out only after that batch timed out, by when the connection could have been
/// replaced: the new one's release found nothing, and the old one's delayed bytes then set
/// the key for its whole TTL with a token nobody held.
#[derive(Debug, Default)]
struct Cleanup {
    state: std::sync::Mutex<CleanupState>,
    /// Wakes the worker for a new first attempt.
    added: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct CleanupState {
    queue: std::collections::VecDeque<Pending>,
    worker: bool,
}

impl Cleanup {
    fn state(&self) -> std::sync::MutexGuard<'_, CleanupState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `pending`; starts the worker if none runs, else wakes it. `always`: queued
    /// even beyond [`CLEANUP_CAPACITY`] (a waiter leaving the fair queue: dropped, its entry
    /// would be handed the lock by the next release, and nobody would hold it for its whole
    /// TTL; there is one per cancelled waiter, not one per failed attempt of an outage).
    fn push(self: &Arc<Self>, nodes: &Arc<Nodes>, pending: Pending, always: bool) {
        let mut state = self.state();
        if state.queue.len() >= CLEANUP_CAPACITY && !always {
            tracing::debug!("clean-up queue full; the failed acquire's key expires by its TTL");
            return;
        }
        state.queue.push_back(pending);
        if state.worker {
            self.added.notify_one();
        } else {
            // On the background runtime: a worker ended with a caller's runtime would leave
            // `worker` set, and no clean-up would run again.
            state.worker =
                lock_core::spawn_background(self.clone().work(Arc::downgrade(nodes))).is_some();
        }
    }

    /// Sends queued clean-ups as they become due (first attempts at once, retries at most
    /// [`CLEANUP_RETRIES_IN_FLIGHT`] at a time); retryable failures go back in the queue until their
    /// key expires, after a pause that doubles to 1 s while the server fails. Ends when
    /// nothing is queued or in flight, or the backend is dropped.
    async fn work(self: Arc<Self>, nodes: std::sync::Weak<Nodes>) {
        use futures::StreamExt;
        let mut in_flight = futures::stream::FuturesUnordered::new();
        let mut retries_in_flight = 0;
        let mut pause = Duration::from_millis(50);
        loop {
            let mut next_retry: Option<Instant> = None;
            {
                let mut state = self.state();
                let now = Instant::now();
                state.queue.retain(|pending| pending.expires > now);
                let strong = nodes.upgrade();
                let Some(strong) =
                    strong.filter(|_| !state.queue.is_empty() || !in_flight.is_empty())
                else {
                    state.queue.clear();
                    state.worker = false;
                    return;
                };
                let mut index = 0;
                while index < state.queue.len() {
                    match state.queue[index].not_before {
                        Some(at) if at > now => {
                            next_retry = Some(next_retry.map_or(at, |next| next.min(at)));
                            index += 1;
                        }
                        // Waits for a retry in flight to end (which wakes this loop).
                        Some(_) if retries_in_flight >= CLEANUP_RETRIES_IN_FLIGHT => index += 1,
                        retry => {
                            if let Some(pending) = state.queue.remove(index) {
                                retries_in_flight += usize::from(retry.is_some());
                                in_flight.push(send_cleanup(strong.clone(), pending));
                            }
                        }
                    }
                }
            }
            tokio::select! {
                Some((mut pending, result)) = in_flight.next(), if !in_flight.is_empty() => {
                    retries_in_flight -= usize::from(pending.not_before.is_some());
                    match result {
                        Ok(released) => {
                            pause = Duration::from_millis(50);
                            tracing::debug!(released, "cleaned up after a failed redis acquire");
                        }
                        Err(error) if error.is_retryable() => {
                            tracing::debug!(%error, "clean-up after a failed acquire; retrying");
                            pending.not_before = Some(Instant::now() + pause);
                            pause = (pause * 2).min(Duration::from_secs(1));
                            self.state().queue.push_back(pending);
                        }
                        Err(error) => {
                            tracing::debug!(%error, "clean-up after a failed acquire gave up");
                        }
                    }
                }
                _ = self.added.notified() => {}
                _ = tokio::time::sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {}
            }
        }
    }
}

/// One clean-up call on the backend's node; hands `pending` back with the outcome.
async fn send_cleanup(nodes: Arc<Nodes>, pending: Pending) -> (Pending, Result<bool, LockError>) {
    let result = match nodes.nodes.first() {
        Some(node) => pending.target.release(node, &pending.token).await,
        None => Ok(false),
    };
    (pending, result)
}

impl RedisBackend {
    /// Connects to `redis://[user:pass@]host:port[/db][?prefix=…]` with default options; also
    /// to `redis+sentinel://…` (the master the sentinels name, followed across failovers) and
    /// `redis+cluster://…` (a Redis Cluster), see the crate docs.
    pub async fn connect(url: &str) -> Result<Self, LockError> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// Connects with `options` (URL parameters override them).
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self, LockError> {
        if let Some(backend) = crate::connect_followed(url, &options).await {
            return backend;
        }
        let parsed = crate::options::parse_url(url, options)?;
        if parsed.redlock {
            return Err(LockError::InvalidConfig(format!(
                "{url:?} is a redlock:// URL: use RedlockBackend or lock_redis::connect"
            )));
        }
        Self::connect_node(&parsed.nodes, &parsed.options).await
    }

    pub(crate) async fn connect_node(
        nodes: &[String],
        options: &RedisOptions,
    ) -> Result<Self, LockError> {
        options.validate()?;
        let inner = Nodes::connect(nodes, options, nodes.len()).await?;
        Ok(RedisBackend {
            inner,
            cleanup: Arc::default(),
        })
    }

    /// A backend over nodes connected elsewhere (Sentinel's master, a cluster).
    pub(crate) fn from_nodes(inner: Arc<Nodes>) -> Self {
        RedisBackend {
            inner,
            cleanup: Arc::default(),
        }
    }

    /// How this backend names Redis keys and channels.
    pub fn key_scheme(&self) -> &KeyScheme {
        &self.inner.scheme
    }

    /// Compare-and-deletes `token` after a failed acquire that may have run, in the
    /// background (see [`Cleanup`]).
    pub(crate) fn release_in_background(&self, target: Target, token: String, expires: Instant) {
        self.clean_up(target, token, expires, false);
    }

    /// [`Self::release_in_background`] for a waiter leaving the fair queue: never dropped
    /// for a full clean-up queue.
    pub(crate) fn leave_queue_in_background(
        &self,
        target: Target,
        token: String,
        expires: Instant,
    ) {
        self.clean_up(target, token, expires, true);
    }

    fn clean_up(&self, target: Target, token: String, expires: Instant, always: bool) {
        let pending = Pending {
            target,
            token,
            expires,
            not_before: None,
        };
        self.cleanup.push(&self.inner, pending, always);
    }

    /// The nodes, hub and grants this backend shares with its clones.
    pub(crate) fn nodes(&self) -> &Arc<Nodes> {
        &self.inner
    }

    fn node(&self) -> Result<&crate::node::Node, LockError> {
        self.inner
            .nodes
            .first()
            .ok_or_else(|| LockError::InvalidConfig("no redis node".into()))
    }
}

#[async_trait]
impl LockBackend for RedisBackend {
    async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
        validate_ttl(ttl)?;
        let ttl_ms = ttl_millis(ttl);
        let granted = Duration::from_millis(ttl_ms);
        let scheme = &self.inner.scheme;
        let owner = OwnerToken::random();
        let token = crate::node::token_hex(owner);
        // Waiters of ours subscribed before this attempt: mark the holder so its release
        // publishes (unmarked releases skip the PUBLISH).
        let mark = self.inner.hub.has_waiters(key.as_str());
        let sent_at = Instant::now();
        let (lock_key, fence_key) = scheme.lock_and_fence_keys(key);
        let answer = match self
            .node()?
            .acquire(&lock_key, &fence_key, &token, ttl_ms, mark)
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                // The script may have run although we got no answer (a stall past the
                // command timeout, a connection lost after sending): nobody would know the
                // token, and the key would stay locked for the whole TTL. A refused
                // connection sent nothing: nothing to clean up.
                if crate::node::may_have_run(&error) {
                    let keys = scheme.lock_keys(key);
                    self.release_in_background(Target::Lock(keys), token, sent_at + granted);
                }
                return Err(error);
            }
        };
        let attempt = match answer {
            NodeAcquire::Acquired(fence) => Attempt::Acquired(Lease::new(
                key.clone(),
                owner,
                Some(FencingToken(fence)),
                granted,
                sent_at,
            )),
            NodeAcquire::Held(pttl, _) => Attempt::Held {
                expires_in: u64::try_from(pttl).ok().map(Duration::from_millis),
            },
        };
        Ok(attempt)
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
        validate_ttl(ttl)?;
        let ttl_ms = ttl_millis(ttl);
        let sent_at = Instant::now();
        let key = lease.key();
        let token = crate::node::token_hex(lease.owner());
        let renewed = Target::of(&self.inner.scheme, key, lease.kind())
            .renew(self.node()?, &token, ttl_ms)
            .await?;
        if renewed {
            Ok(lease.renewed(Duration::from_millis(ttl_ms), sent_at))
        } else {
            Err(LockError::lost(
                key.as_str(),
                "the redis key expired or belongs to another owner",
            ))
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
        let token = crate::node::token_hex(lease.owner());
        Target::of(&self.inner.scheme, lease.key(), lease.kind())
            .release(self.node()?, &token)
            .await
    }

    async fn try_acquire_permits(
        &self,
        key: &LockKey,
        limit: u32,
        count: u32,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        validate_ttl(ttl)?;
        lock_core::check_permits(key, limit, count)?;
        let ttl_ms = ttl_millis(ttl);
        let granted = Duration::from_millis(ttl_ms);
        let owner = OwnerToken::random();
        let token = crate::node::token_hex(owner);
        let mark = self.inner.hub.has_waiters(key.as_str());
        let sent_at = Instant::now();
        let keys = self.inner.scheme.semaphore_keys(key);
        let answer = match self
            .node()?
            .acquire_permits(&keys, &token, ttl_ms, limit, count, mark)
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                // As for a lock: the script may have run without us hearing of it.
                if crate::node::may_have_run(&error) {
                    let target = Target::Permits(keys, count);
                    self.release_in_background(target, token, sent_at + granted);
                }
                return Err(error);
            }
        };
        let kind = LeaseKind::Permits { limit, count };
        let attempt = shared_attempt(key, owner, granted, sent_at, kind, answer, limit)?;
        Ok(attempt)
    }

    async fn try_acquire_rw(
        &self,
        key: &LockKey,
        mode: RwMode,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        validate_ttl(ttl)?;
        let ttl_ms = ttl_millis(ttl);
        let granted = Duration::from_millis(ttl_ms);
        let owner = OwnerToken::random();
        let token = crate::node::token_hex(owner);
        let mark = self.inner.hub.has_waiters(key.as_str());
        let sent_at = Instant::now();
        let keys = self.inner.scheme.rw_keys(key);
        let answer = match self
            .node()?
            .acquire_rw(&keys, mode, &token, ttl_ms, mark)
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                if crate::node::may_have_run(&error) {
                    self.release_in_background(Target::Rw(keys, mode), token, sent_at + granted);
                }
                return Err(error);
            }
        };
        let kind = match mode {
            RwMode::Read => LeaseKind::Read,
            RwMode::Write => LeaseKind::Write,
        };
        let attempt = shared_attempt(key, owner, granted, sent_at, kind, answer, 0)?;
        Ok(attempt)
    }

    async fn acquire_queued(
        &self,
        key: &LockKey,
        ttl: Duration,
        deadline: Instant,
    ) -> Result<Option<Lease>, LockError> {
        validate_ttl(ttl)?;
        crate::queue::wait_in_line(self, key, ttl_millis(ttl), deadline).await
    }

    async fn subscribe(&self, key: &LockKey) -> Result<Releases, LockError> {
        let releases = self.inner.hub.subscribe(key.as_str());
        // Every waiter (not only a key's first) waits until its key's channel is confirmed:
        // a later waiter of a key whose SUBSCRIBE is still in flight is answered with that
        // confirmation, one of a key already confirmed at once, without a round trip.
        self.inner
            .subscribe(key.as_str(), 1, Duration::from_secs(1))
            .await;
        Ok(releases)
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.fencing = true;
        caps.release_notifications = true;
        caps.min_ttl = Duration::from_millis(1);
        caps.ttl_granularity = Duration::from_millis(1);
        caps.expiry_slack = Duration::from_millis(10);
        caps.semaphores = true;
        caps.rw_locks = true;
        caps.fair_queue = true;
        caps
    }
}

/// The attempt for a shared kind's script answer; `limit` is the semaphore limit asked for
/// (named in a mismatch).
fn shared_attempt(
    key: &LockKey,
    owner: OwnerToken,
    granted: Duration,
    sent_at: Instant,
    kind: LeaseKind,
    answer: SharedAcquire,
    limit: u32,
) -> Result<Attempt, LockError> {
    match answer {
        SharedAcquire::Acquired(fence) => Ok(Attempt::Acquired(
            Lease::new(
                key.clone(),
                owner,
                Some(FencingToken(fence)),
                granted,
                sent_at,
            )
            .with_kind(kind),
        )),
        SharedAcquire::Held(expires_in) => Ok(Attempt::Held { expires_in }),
        SharedAcquire::LimitMismatch(held_with) => {
            Err(lock_core::limit_mismatch(key, held_with, limit))
        }
    }
}
