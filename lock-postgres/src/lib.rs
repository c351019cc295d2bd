//! PostgreSQL backend for distlock: session advisory locks on dedicated holder sessions.
//!
//! - **Holder sessions.** Held locks live on a few connections the backend opens itself (never
//!   borrowed from, nor returned to, a user's pool). Many locks share one session: at most
//!   [`PostgresConfig::max_sessions`] connections however many locks are held.
//! - **Not reentrant.** A session is reentrant for advisory locks, so the backend keeps a local
//!   table of the advisory keys it holds (or is acquiring) and answers `Held` for them.
//! - **TTL.** Advisory locks have none; the backend gives them one twice over. While the process
//!   runs, a reaper task unlocks every lock whose renewal did not arrive before its deadline
//!   (the leaked-guard case). If the process stops (paused, partitioned, dead), the server ends
//!   the holder session by `idle_session_timeout`, which the backend keeps at the latest lease
//!   deadline on that session plus 100 ms, set afresh by the heartbeat and renewals. See the
//!   README.
//! - **Lost signal.** Every lease carries its session's token ([`Lease::with_lost_signal`]);
//!   a failed statement or the session heartbeat (every [`heartbeat_interval`], ≤ 250 ms,
//!   while it holds locks; unanswered within [`PROBE_TIMEOUT`] it drops the session) cancels
//!   it when the server dropped the session, which frees all its locks at once. Within
//!   [`loss_notice_bound`] only fencing protects the resource.
//! - **Fencing.** The sequence [`PostgresConfig::fence_sequence`] (schema-qualified, default
//!   [`FENCE_SEQUENCE`], created if missing, used by OID) is drawn in the same statement as
//!   `pg_try_advisory_lock`: acquiring a free lock is one round trip, and tokens strictly
//!   increase per key (they increase across all keys), across restarts and crashes: a fence's
//!   WAL is flushed before its answer leaves the server, whatever `synchronous_commit` says.
//! - **Server.** PostgreSQL 14 or later (`idle_session_timeout`), reached directly or through
//!   session pooling (transaction pooling is detected and refused).
//! - **Wake-ups.** Release is one statement that unlocks and, when some backend waits for the
//!   key, `NOTIFY`s. A waiting backend marks its interest with a shared advisory lock on the
//!   key's hash in the two-int keyspace (held on its waiter connection) and `LISTEN`s on one
//!   connection, dispatching to its waiters through a [`lock_core::ReleaseHub`]. A lock held
//!   in this process takes no mark (its release wakes the local waiter). A holder session the
//!   server ends frees its locks without a NOTIFY: up to [`MAX_BLOCKERS`] blocker connections
//!   wait on such a session's alive key ([`HOLDER_ALIVE_CLASS`]) and wake the waiter the
//!   moment it ends (#13, `blocker.rs`).
//! - **Semaphores and reader-writer locks** (#14): permits are advisory slot keys derived from
//!   the name, a semaphore's limit is agreed through an occupancy key and a limit row, reader
//!   and writer sides are a shared or exclusive advisory lock with a writer-intent row; same
//!   sessions, TTL, lost signal, fences and wake-ups as locks (see `shared.rs` and the README).
//! - **Keys** are hashed with sqlx's [`PgAdvisoryLock::new`] over `namespace NUL key`, so two
//!   applications with different namespaces never share a lock. See [`advisory_key`].

use async_trait::async_trait;
use lock_core::{
    Attempt, Capabilities, FencingToken, Lease, LockBackend, LockError, LockKey, OwnerToken,
    RefusalKind, ReleaseHub, Releases, validate_ttl,
};
use sqlx::postgres::types::Oid;
use sqlx::postgres::{
    PgAdvisoryLock, PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgSslMode,
};
use sqlx::{ConnectOptions, Row};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;

mod blocker;
mod config;
mod detached;
mod errors;
mod keys;
mod listener;
#[macro_use]
mod ops;
mod server_wait;
mod session;
mod setup;
mod shared;
mod tasks;

pub use blocker::MAX_BLOCKERS;
use blocker::*;
pub use config::PostgresConfig;
use config::*;
use detached::*;
use errors::*;
pub use keys::{HOLDER_ALIVE_CLASS, SETUP_LOCK, advisory_key, waiter_key};
use listener::*;
pub use listener::{IDLE_CONNECTION_TIMEOUT, WAITER_PING_EVERY};
use ops::*;
use server_wait::ServerWait;
pub use server_wait::{MAX_QUEUE_SESSIONS, QUEUE_SESSIONS};
use session::*;
use setup::SPARE_IDLE_TIMEOUT;
use shared::*;
pub use shared::{MAX_PERMITS, rw_key, semaphore_base, slot_key};
use tasks::*;

const BACKEND: &str = "postgres";

/// The default sequence that fencing tokens are drawn from ([`PostgresConfig::fence_sequence`]).
pub const FENCE_SEQUENCE: &str = "public.distlock_fence_seq";

/// Longest a `subscribe` call waits for the release listener and the waiter mark (bounded
/// by `op_timeout` too). Past it the waiter polls with the client's backoff.
pub const SUBSCRIBE_BUDGET: Duration = Duration::from_millis(250);

/// Smallest TTL granted: the holder session's `idle_session_timeout` follows the TTL, and a
/// shorter one would end sessions between two statements of a busy client.
pub const MIN_TTL: Duration = Duration::from_millis(500);

/// `lock_timeout` of a blocker's statement (see `blocker.rs`): a blocker whose waiters all
/// gave up is queued on the server at most this long.
pub const BLOCKER_LOCK_TIMEOUT: Duration = Duration::from_millis(200);

/// How often the reaper looks at an empty book (see [`reaper`]).
const REAPER_IDLE_TICK: Duration = Duration::from_secs(1);

/// `postgres://…` (or `postgresql://…`) → a backend. Extra query parameters read here (and not
/// passed to sqlx): `namespace`, `max_sessions`, `sessions_per_ttl`, `queue_sessions`, `op_timeout_ms`,
/// `probe_timeout_ms`, `connect_timeout_ms`, `application_name`, `fence_sequence`.
pub async fn connect(url: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    Ok(Arc::new(PostgresBackend::connect(url).await?))
}

/// Largest TTL granted: `idle_session_timeout`, which enforces the TTL when the process stops,
/// is an `int` of milliseconds (2^31 − 1 ms, about 24.8 days), less a second for the padding
/// added to the timeout set with it.
pub const MAX_TTL: Duration = Duration::from_millis(i32::MAX as u64 - 1_000);

/// [`validate_ttl`] plus this backend's own ceiling, [`MAX_TTL`].
fn check_ttl(ttl: Duration) -> Result<(), LockError> {
    validate_ttl(ttl)?;
    if ttl_ms(ttl) > MAX_TTL.as_millis() as u64 {
        return Err(LockError::InvalidTtl {
            ttl,
            reason: format!(
                "the postgres backend enforces TTLs with idle_session_timeout, at most \
                 {MAX_TTL:?} (2^31 - 1 ms, less 1 s for the padding it adds)"
            ),
        });
    }
    Ok(())
}

fn ttl_ms(ttl: Duration) -> u64 {
    // Round up: the session must never time out before the lease's deadline.
    u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// Longest pause between two heartbeats on a holder session that holds locks.
pub const HEARTBEAT_MAX: Duration = Duration::from_millis(250);

/// The heartbeat interval of a session whose smallest TTL is `min_ttl_ms`: a tenth of it,
/// at most [`HEARTBEAT_MAX`]. A session the server dropped (terminated, restarted) is found
/// within this interval, and its guards' lost signal fires.
pub fn heartbeat_interval(min_ttl_ms: u64) -> Duration {
    Duration::from_millis(min_ttl_ms / 10).min(HEARTBEAT_MAX)
}

/// Default of [`PostgresConfig::probe_timeout`]: how long a heartbeat probe (or a statement)
/// on a holder session that holds locks may stay unanswered before the session counts as
/// gone (it is dropped and its guards' lost signal fires). A silent connection (black hole,
/// a host that died without closing it) is found this long after the probe was sent.
pub const PROBE_TIMEOUT: Duration = HEARTBEAT_MAX;

/// How soon a holder session that holds locks and whose smallest TTL is `min_ttl_ms` is found
/// gone after its last answer, at the latest, with the default [`PROBE_TIMEOUT`]: the next
/// probe is sent a [`heartbeat_interval`] after that answer and waits that long (a statement
/// in flight instead gets the same bound). A session the server ended and told the client
/// about is found within the interval (plus a round trip).
pub fn loss_notice_bound(min_ttl_ms: u64) -> Duration {
    loss_bound(min_ttl_ms, PROBE_TIMEOUT)
}

fn loss_bound(min_ttl_ms: u64, probe_timeout: Duration) -> Duration {
    heartbeat_interval(min_ttl_ms) + probe_timeout
}

#[derive(Debug)]
enum Entry {
    /// An acquire of this advisory key is in flight on one of our sessions.
    Pending,
    /// A waiter of this backend waits for the key on a queue session (`server_wait.rs`):
    /// no other local attempt may run meanwhile, or the grant would have to book over the
    /// entry of an attempt still in flight, and a second attempt could then take the key
    /// again on that attempt's (reentrant) session.
    Waiting,
    Held(HeldLock),
}

/// What a book entry is keyed by: a lock by its advisory key (one holder per key on this
/// backend), a semaphore's permits or a reader-writer side by its owner token (many leases
/// of one name may be held at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum BookKey {
    Lock(i64),
    Shared(OwnerToken),
}

#[derive(Debug, Clone)]
struct HeldLock {
    key: LockKey,
    /// What the unlock must give back: nothing more for a lock (its advisory key is the book
    /// key), the slots and occupancy key of permits, the side of a reader-writer lock.
    shared: Option<Arc<SharedHold>>,
    owner: OwnerToken,
    session: Arc<Session>,
    epoch: u64,
    ttl_ms: u64,
    /// The reaper unlocks at this instant unless a renewal moved it.
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Book {
    entries: HashMap<BookKey, Entry>,
    /// When the reaper plans to wake next.
    reaper_at: Option<Instant>,
    /// Advisory keys whose `Pending` entry a waiter found on its way to the server, so that
    /// it waits for a local signal instead (`ServerWait::Local`): if that attempt ends without
    /// the lock, nothing else would wake it (no mark, no blocker, nobody on the server), so
    /// `forget_pending` wakes the key's waiters. Bounded: emptied when full (a lost entry
    /// costs that waiter its backoff step, a stale one an extra wake-up).
    waited_behind: HashMap<i64, LockKey>,
}

/// Most keys in [`Book::waited_behind`] before it starts over.
const WAITED_BEHIND_CAPACITY: usize = 1024;

#[derive(Debug)]
struct Inner {
    options: PgConnectOptions,
    config: PostgresConfig,
    channel: String,
    book: Mutex<Book>,
    sessions: Mutex<Vec<Arc<Session>>>,
    /// Connections on which waiters wait on the server (`server_wait.rs`); a granted one
    /// holds its lock like a holder session.
    queue_sessions: Mutex<Vec<Arc<Session>>>,
    /// Keys with a waiter subscribed to wait on the server without a waiter mark
    /// ([`LockBackend::subscribe_server_waiter`]): one that cannot wait there marks the key
    /// first (`server_wait.rs`).
    unmarked_server_waiters: Mutex<HashSet<String>>,
    hub: ReleaseHub,
    /// Wakes the heartbeat task when a session's first lock needs a probe before the task's
    /// planned wake-up ([`Inner::heartbeat_at`]).
    heartbeat_wake: Notify,
    /// When the heartbeat task plans to wake next (`None`: not until woken).
    heartbeat_at: Mutex<Option<Instant>>,
    listener: Mutex<ListenerPhase>,
    /// Cancelled when the backend is dropped: a listener that connects afterwards is not
    /// started, and the reaper and the heartbeat end wherever they run.
    closed: tokio_util::sync::CancellationToken,
    /// Commands for the waiter connection (set once the listener runs), read by the hub's
    /// idle hook.
    waiter_tx: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<WaiterCommand>>>,
    reaper_wake: Notify,
    /// The fence sequence, by OID: found once at setup, never through `search_path`.
    fence_oid: AtomicU32,
    /// The fence sequence's schema, quoted by the server (set at setup): the semaphore and
    /// reader-writer tables live there.
    fence_schema: std::sync::OnceLock<String>,
    /// Advisory keys of recently used lock keys (see [`Inner::advisory_key`]).
    key_cache: Mutex<HashMap<LockKey, i64>>,
    /// The semaphore-limit and reader-writer intent tables exist (checked or created once per
    /// backend).
    tables_ready: AtomicBool,
    /// The holder-style connection `setup` checked the server on, with its pid, kept for the
    /// first holder session so that the first lock does not wait for a connection of its own.
    /// With the instant it was parked (its last statement).
    spare: Mutex<Option<(PgConnection, i32, Instant)>>,
    /// Blocker connections waiting server-side for held locks to go (`blocker.rs`); shared
    /// with the hub's idle hook.
    blockers: Arc<Mutex<Blockers>>,
}

/// Locks in PostgreSQL (see the crate docs). Build it with [`PostgresBackend::connect`],
/// [`PostgresBackend::from_pool`] or [`PostgresBackend::with_options`]; share it as
/// `Arc<dyn LockBackend>` in a [`lock_core::Locker`].
///
/// Dropping it closes its holder sessions: the server then frees every lock it held.
#[derive(Debug)]
pub struct PostgresBackend {
    inner: Arc<Inner>,
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        // Also ends the reaper and the heartbeat, wherever they run.
        self.inner.closed.cancel();
        lock(&self.inner.blockers).shut_down();
        if let ListenerPhase::Up(listening) = &*lock(&self.inner.listener) {
            listening.listen.abort();
            listening.waiters.abort();
        }
    }
}

impl PostgresBackend {
    /// Connects with a `postgres://` URL (see [`connect`] for the extra parameters).
    pub async fn connect(url: &str) -> Result<Self, LockError> {
        let (options, config) = parse_url(url)?;
        Self::with_options(options, config).await
    }

    /// A backend on the same server as `pool`, with its own connections: the pool's
    /// connections are never used to hold locks, so its size is unaffected.
    pub async fn from_pool(pool: &PgPool, config: PostgresConfig) -> Result<Self, LockError> {
        Self::with_options((*pool.connect_options()).clone(), config).await
    }

    /// A backend from connect options. Checks the server (reachable, not behind a
    /// transaction-pooling PgBouncer, version 14+) and finds the fence sequence, creating it
    /// if missing.
    pub async fn with_options(
        options: PgConnectOptions,
        config: PostgresConfig,
    ) -> Result<Self, LockError> {
        check_config(&config)?;
        check_tls_available(&options)?;
        let channel = format!(
            "distlock_{:016x}",
            advisory_key("", &config.namespace).cast_unsigned()
        );
        let waiter_tx: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<WaiterCommand>>> =
            Arc::default();
        let blockers: Arc<Mutex<Blockers>> = Arc::default();
        let inner = Arc::new(Inner {
            options,
            config,
            channel,
            book: Mutex::default(),
            sessions: Mutex::default(),
            queue_sessions: Mutex::default(),
            unmarked_server_waiters: Mutex::default(),
            hub: ReleaseHub::with_idle_hook({
                let waiter_tx = waiter_tx.clone();
                let blockers = blockers.clone();
                move |key: &str| {
                    lock(&blockers).key_idle(key);
                    if let Some(tx) = waiter_tx.get() {
                        let _ = tx.send(WaiterCommand::Forget(key.to_owned()));
                    }
                }
            }),
            listener: Mutex::new(ListenerPhase::Down),
            closed: tokio_util::sync::CancellationToken::new(),
            waiter_tx,
            reaper_wake: Notify::new(),
            heartbeat_wake: Notify::new(),
            heartbeat_at: Mutex::new(None),
            fence_oid: AtomicU32::new(0),
            fence_schema: std::sync::OnceLock::new(),
            key_cache: Mutex::default(),
            tables_ready: AtomicBool::new(false),
            spare: Mutex::new(None),
            blockers,
        });
        let fence = inner.setup().await?;
        inner.fence_oid.store(fence.0, Ordering::Relaxed);
        // On this runtime, beside the sessions whose sockets its driver reads (a heartbeat on
        // another runtime would take this one being busy, or not driven between two
        // `block_on` calls of a sync wrapper, for silent sessions and close them); on the
        // background runtime once this one shuts down (a backend kept in a static outlives
        // the runtime that connected it), instead of ending with it: its locks would go
        // unreaped and unwatched.
        lock_core::spawn_resident(inner.closed.clone(), {
            let inner = inner.clone();
            move || reaper(inner.clone())
        });
        lock_core::spawn_resident(inner.closed.clone(), {
            let inner = inner.clone();
            move || heartbeat(inner.clone())
        });
        Ok(PostgresBackend { inner })
    }

    /// The advisory key this backend uses for `key` (see [`advisory_key`]).
    pub fn advisory_key(&self, key: &LockKey) -> i64 {
        self.inner.advisory_key(key)
    }

    /// The settings in force.
    pub fn config(&self) -> &PostgresConfig {
        &self.inner.config
    }

    /// Server process ids of the holder sessions that are connected now, and of the queue
    /// sessions that hold a lock (for tests and monitoring: `pg_stat_activity.pid`).
    pub async fn holder_pids(&self) -> Vec<i32> {
        let sessions: Vec<Arc<Session>> = lock(&self.inner.sessions).clone();
        let mut pids = Vec::new();
        for session in sessions {
            let state = session.state.lock().await;
            if state.conn.is_some() {
                pids.push(state.pid);
            }
        }
        // A busy queue session is waiting, and holds nothing.
        let queued: Vec<Arc<Session>> = lock(&self.inner.queue_sessions).clone();
        for session in queued {
            if let Ok(state) = session.state.try_lock()
                && state.conn.is_some()
                && !state.ttls.is_empty()
            {
                pids.push(state.pid);
            }
        }
        pids
    }

    /// How many locks this backend holds now, by its own bookkeeping.
    pub fn held_count(&self) -> usize {
        lock(&self.inner.book)
            .entries
            .values()
            .filter(|entry| matches!(entry, Entry::Held(_)))
            .count()
    }
}

impl PostgresBackend {
    /// A semaphore or reader-writer attempt, cancel-safe like `try_acquire`: a grant whose
    /// caller went away is given back.
    ///
    /// A limit refusal is tried again up to [`LIMIT_RECHECKS`] times after a short random
    /// pause: two requests that found a stale limit row just as its holders left refuse each
    /// other once (each holds the occupancy key for the other's check); retried apart, the
    /// first sets the limit. A real disagreement is refused every time.
    async fn try_shared(
        &self,
        key: &LockKey,
        request: SharedRequest,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        let mut rechecks = 0;
        loop {
            match self.try_shared_once(key, request, ttl).await {
                Err(error) if is_limit_mismatch(&error) && rechecks < LIMIT_RECHECKS => {
                    rechecks += 1;
                    let pause = Duration::from_micros(rand::random_range(200..2000));
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }

    async fn try_shared_once(
        &self,
        key: &LockKey,
        request: SharedRequest,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        check_ttl(ttl)?;
        let ttl = ttl.max(MIN_TTL);
        let sent_at = Instant::now();
        let spread = match request {
            SharedRequest::Permits { .. } => {
                semaphore_base(&self.inner.config.namespace, key.as_str())
            }
            SharedRequest::Rw(_) => rw_key(&self.inner.config.namespace, key.as_str()),
        };
        let session = self.inner.pick_session(spread, ttl_ms(ttl));
        let in_flight = Arc::new(AtomicBool::new(false));
        let orphan_inner = self.inner.clone();
        let abandon = {
            let inner = self.inner.clone();
            let session = session.clone();
            let in_flight = in_flight.clone();
            move || inner.abandon(&session, &in_flight)
        };
        detached(
            self.inner.clone().acquire_shared_op(
                key.clone(),
                request,
                ttl,
                sent_at,
                session,
                in_flight,
            ),
            move |attempt| {
                if let Attempt::Acquired(lease) = attempt {
                    tokio::spawn(async move {
                        let _ = release_lease(orphan_inner, lease).await;
                    });
                }
            },
            abandon,
        )
        .await
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the maps consistent, so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl LockBackend for PostgresBackend {
    async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
        check_ttl(ttl)?;
        let ttl = ttl.max(MIN_TTL);
        let sent_at = Instant::now();
        let hash = self.advisory_key(key);
        {
            let mut book = lock(&self.inner.book);
            match book.entries.get(&BookKey::Lock(hash)) {
                // Ours already (or being acquired): a session would grant it again, so we
                // answer for it, like any other holder.
                Some(Entry::Held(held)) => {
                    let expires_in = held.deadline.saturating_duration_since(sent_at);
                    drop(book);
                    // Remembered for `subscribe` (no waiter mark: blocker.rs).
                    self.inner.lock_held_here(key);
                    return Ok(Attempt::Held {
                        expires_in: Some(expires_in),
                    });
                }
                Some(Entry::Pending) => {
                    drop(book);
                    self.inner.lock_held_here(key);
                    return Ok(Attempt::Held { expires_in: None });
                }
                // Not held here: another process's holder, which our queue session waits
                // behind (this attempt's waiter still marks the key for its release).
                Some(Entry::Waiting) => return Ok(Attempt::Held { expires_in: None }),
                None => {
                    book.entries.insert(BookKey::Lock(hash), Entry::Pending);
                }
            }
        }
        let inner = self.inner.clone();
        let orphan_inner = self.inner.clone();
        let abandon_inner = self.inner.clone();
        let session = self.inner.pick_session(hash, ttl_ms(ttl));
        let in_flight = Arc::new(AtomicBool::new(false));
        let abandon = {
            let session = session.clone();
            let in_flight = in_flight.clone();
            move || {
                abandon_inner.abandon(&session, &in_flight);
                abandon_inner.forget_pending(BookKey::Lock(hash));
            }
        };
        detached(
            inner.acquire_op(key.clone(), hash, ttl, sent_at, session, in_flight),
            move |attempt| {
                // The caller went away after the lock was granted: give it back at once.
                if let Attempt::Acquired(lease) = attempt {
                    tokio::spawn(async move {
                        let _ = release_lease(orphan_inner, lease).await;
                    });
                }
            },
            abandon,
        )
        .await
    }

    async fn wait_on_server(
        &self,
        key: &LockKey,
        ttl: Duration,
        until: Instant,
    ) -> Result<Option<Lease>, LockError> {
        check_ttl(ttl)?;
        let waited = self
            .inner
            .clone()
            .wait_on_server(key, ttl.max(MIN_TTL), until)
            .await;
        let failure = match waited {
            Ok(ServerWait::Granted(lease)) => return Ok(Some(lease)),
            Ok(ServerWait::Waited | ServerWait::Local) => return Ok(None),
            Ok(ServerWait::NotThere) => None,
            Err(error) if error.is_retryable() => Some(error),
            Err(error) => return Err(error),
        };
        // This waiter waits for release signals after all. If its subscription left the
        // waiter mark out, put it in place and look at the lock once more: a release before
        // the mark sent no NOTIFY.
        if !self.inner.take_unmarked_server_waiter(key) {
            return failure.map_or(Ok(None), Err);
        }
        if let Some(error) = failure {
            tracing::debug!(%error, key = %key, "waiting on the server failed; marking the key");
        }
        self.inner.mark_for_signals(key).await;
        match self.try_acquire(key, ttl).await? {
            Attempt::Acquired(lease) => Ok(Some(lease)),
            _ => Ok(None),
        }
    }

    async fn try_acquire_permits(
        &self,
        key: &LockKey,
        limit: u32,
        count: u32,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        check_permits(key, limit, count)?;
        self.try_shared(key, SharedRequest::Permits { limit, count }, ttl)
            .await
    }

    async fn try_acquire_rw(
        &self,
        key: &LockKey,
        mode: lock_core::RwMode,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        self.try_shared(key, SharedRequest::Rw(mode), ttl).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
        check_ttl(ttl)?;
        let ttl = ttl.max(MIN_TTL);
        let sent_at = Instant::now();
        // Abandoned, a renewal leaves nothing to settle: the book moves only on its answer.
        detached(
            self.inner.clone().renew_op(lease.clone(), ttl, sent_at),
            |_| {},
            || {},
        )
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
        let Some((hash, held, still_valid)) = begin_release(&self.inner, lease) else {
            return Ok(false);
        };
        let unlocked = self.inner.settled_release(hash, held).await?;
        Ok(unlocked && still_valid)
    }

    async fn subscribe(&self, key: &LockKey) -> Result<Releases, LockError> {
        Ok(self.inner.subscribe_waiter(key, true).await)
    }

    async fn subscribe_server_waiter(&self, key: &LockKey) -> Result<Releases, LockError> {
        // Marked now only if it cannot wait on the server at all (no queue sessions).
        let mark = self.inner.config.queue_sessions == 0;
        Ok(self.inner.subscribe_waiter(key, mark).await)
    }

    fn name(&self) -> &'static str {
        "postgres"
    }

    fn capabilities(&self) -> Capabilities {
        let mut capabilities = Capabilities::default();
        capabilities.fencing = true;
        capabilities.release_notifications = true;
        capabilities.fair_queue = false;
        capabilities.server_wait = self.inner.config.queue_sessions > 0;
        capabilities.min_ttl = MIN_TTL;
        capabilities.ttl_granularity = Duration::from_millis(1);
        // Process alive, lease not renewed: the reaper's round trip. Process stopped or cut
        // off: the holder session's idle_session_timeout follows the latest lease deadline on
        // it + TIMEOUT_PAD (100 ms), within TIMEOUT_TOLERANCE (50 ms), so the server frees the
        // session's locks together at most that long plus a round trip after that deadline.
        // A lock sharing its session with leases of its TTL (or shorter: pick_session never
        // puts a lock beside longer-TTL ones while a session of its own class or a shorter
        // one exists) whose deadlines are later is freed with the latest of them: up to one
        // TTL after its own deadline (README, "TTL semantics").
        capabilities.expiry_slack = Duration::from_millis(250);
        capabilities.expiry_slack_ttl_percent = 100;
        capabilities.semaphores = true;
        capabilities.rw_locks = true;
        capabilities
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{Context, Result, bail, ensure};
    use std::str::FromStr;

    /// A backend with one holder session on the test binary's shared server.
    async fn one_session_backend() -> Result<PostgresBackend> {
        let server = tokio::task::spawn_blocking(lock_harness::postgres::shared).await??;
        let options = PgConnectOptions::from_str(&server.url())?;
        let config = PostgresConfig {
            max_sessions: 1,
            sessions_per_ttl: 1,
            ..PostgresConfig::default()
        };
        Ok(PostgresBackend::with_options(options, config).await?)
    }

    /// `try_acquire` of a key that must be free.
    async fn acquire_free(
        backend: &PostgresBackend,
        key: &LockKey,
        ttl: Duration,
    ) -> Result<Lease> {
        backend
            .try_acquire(key, ttl)
            .await?
            .into_lease()
            .context("the key is held")
    }

    /// A waiter on its way to the server that finds an attempt of its key in flight here
    /// waits for a local signal (`ServerWait::Local`). When that attempt ends without the
    /// lock, the waiter must be woken: its key is unmarked, it armed no blocker and nobody
    /// waits on the server, so otherwise it sleeps until its backoff step. (The attempt is
    /// stood in for by its `Pending` book entry: the window between a waiter's last attempt
    /// and its wait is too short to hit from outside.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_behind_an_attempt_in_flight_is_woken_when_it_fails() -> Result<()> {
        let backend = one_session_backend().await?;
        let key = LockKey::new(format!("behind-{:x}", rand::random::<u64>()))?;
        let hash = backend.advisory_key(&key);
        let mut releases = backend.subscribe_server_waiter(&key).await?;
        releases.take_turns();
        lock(&backend.inner.book)
            .entries
            .insert(BookKey::Lock(hash), Entry::Pending);
        let waited = backend
            .inner
            .clone()
            .wait_on_server(
                &key,
                Duration::from_secs(10),
                Instant::now() + Duration::from_secs(5),
            )
            .await?;
        ensure!(
            matches!(waited, server_wait::ServerWait::Local),
            "the waiter did not wait behind the attempt in flight"
        );
        // The attempt is answered "held" by the server.
        backend.inner.forget_pending(BookKey::Lock(hash));
        let wake = releases.next(Instant::now() + Duration::from_secs(1)).await;
        ensure!(
            wake == lock_core::Wake::Released,
            "the waiter behind the failed attempt was not woken ({wake:?})"
        );
        Ok(())
    }

    /// A waiter that found a *release* of its key in flight (recorded in
    /// `Book::waited_behind`) is woken by that release once: one release, one local waiter
    /// woken (waiters take turns). Before, `forget_pending` woke one for the record and the
    /// release woke another, which then spent an attempt to find the lock taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_wakes_one_waiter_even_with_one_waiting_behind_it() -> Result<()> {
        let backend = one_session_backend().await?;
        let key = LockKey::new(format!("behind-release-{:x}", rand::random::<u64>()))?;
        let hash = backend.advisory_key(&key);
        let lease = acquire_free(&backend, &key, Duration::from_secs(10)).await?;
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let mut releases = backend.subscribe(&key).await?;
            releases.take_turns();
            waiters.push(releases);
        }
        // A waiter met the release's `Pending` entry on its way to the server.
        lock(&backend.inner.book)
            .waited_behind
            .insert(hash, key.clone());
        ensure!(backend.release(&lease).await?, "the release did not unlock");
        let mut woken = 0;
        for releases in &mut waiters {
            let until = Instant::now() + Duration::from_millis(300);
            if releases.next(until).await == lock_core::Wake::Released {
                woken += 1;
            }
        }
        ensure!(woken == 1, "one release woke {woken} waiters");
        Ok(())
    }

    /// The cache in front of the HKDF answers exactly what the hash does, in the backend's
    /// namespace, and starts over instead of growing past its capacity.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_advisory_keys_match_the_hash_and_stay_bounded() -> Result<()> {
        let backend = one_session_backend().await?;
        let namespace = backend.config().namespace.clone();
        ensure!(!namespace.is_empty(), "the default namespace is not empty");
        for round in 0..2 {
            for n in 0..keys::KEY_CACHE_CAPACITY + 100 {
                let key = LockKey::new(format!("order-{n}"))?;
                let expected = advisory_key(&namespace, key.as_str());
                ensure!(
                    backend.advisory_key(&key) == expected,
                    "round {round}: cached key of {key} differs from the hash"
                );
                ensure!(expected != advisory_key("", key.as_str()));
            }
            let cached = lock(&backend.inner.key_cache).len();
            ensure!(cached <= keys::KEY_CACHE_CAPACITY, "cache grew to {cached}");
        }
        Ok(())
    }

    /// A real PgBouncer is refused at connect (`tests/pgbouncer.rs`), so the per-statement
    /// check behind it is tested here: a pooler switching server sessions under a
    /// connection is simulated by making our record of the session's pid wrong: the real
    /// acquire statement then answers with another `pg_backend_pid()`, and the backend must
    /// refuse (InvalidConfig naming PgBouncer), undo nothing it cannot see, drop the session
    /// (its leases' lost signal fires) and leave the key free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statement_on_another_server_session_is_refused() -> Result<()> {
        let backend = one_session_backend().await?;
        let ttl = Duration::from_secs(10);
        let first = LockKey::new(format!("pid-a-{:x}", rand::random::<u64>()))?;
        let held = acquire_free(&backend, &first, ttl)
            .await
            .context("first key not free")?;
        let session = lock(&backend.inner.sessions)
            .first()
            .cloned()
            .context("no holder session")?;
        session.state.lock().await.pid ^= 0x4000_0000;
        let second = LockKey::new(format!("pid-b-{:x}", rand::random::<u64>()))?;
        let refused = backend.try_acquire(&second, ttl).await;
        ensure!(
            matches!(&refused, Err(LockError::InvalidConfig(message)) if message.contains("PgBouncer")),
            "expected InvalidConfig naming PgBouncer, got {refused:?}"
        );
        let signal = held.lost_signal().context("no lost signal")?;
        ensure!(signal.is_cancelled(), "the session's leases were not told");
        ensure!(
            matches!(backend.renew(&held, ttl).await, Err(LockError::Lost { .. })),
            "renew of a lease on the dropped session did not answer Lost"
        );
        ensure!(backend.held_count() == 0, "the book still holds a lease");
        // The next acquire reconnects and works, once the server has seen the dropped
        // connection and ended that session (it frees the lock the refused statement took
        // there; under load that can take longer than our reconnect).
        let deadline = Instant::now() + Duration::from_secs(5);
        let again = loop {
            match backend.try_acquire(&second, ttl).await?.into_lease() {
                Some(lease) => break lease,
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                None => bail!("second key still held 5 s after its session was dropped"),
            }
        };
        ensure!(backend.release(&again).await?, "release answered false");
        Ok(())
    }

    /// The release statement carries no pid: an unlock answering `false` (the lock was not on
    /// the session that ran it) is followed by a pid check, which reports a pooler's session
    /// switch as such, and otherwise leaves a plain `false`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn release_that_finds_no_lock_checks_the_session() -> Result<()> {
        let backend = one_session_backend().await?;
        let ttl = Duration::from_secs(10);
        let session = || {
            lock(&backend.inner.sessions)
                .first()
                .cloned()
                .context("no holder session")
        };
        // Unlocks `lease`'s key behind the backend's back, on its own holder session.
        let unlock_behind = |lease: &Lease| {
            let hash = backend.advisory_key(lease.key());
            let session = session();
            async move {
                let session = session?;
                let mut state = session.state.lock().await;
                let conn = state.conn.as_mut().context("no connection")?;
                let freed: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                    .bind(hash)
                    .fetch_one(conn)
                    .await?;
                ensure!(freed, "the holder session did not hold the lock");
                anyhow::Ok(())
            }
        };
        let key = LockKey::new(format!("gone-{:x}", rand::random::<u64>()))?;
        let lease = acquire_free(&backend, &key, ttl)
            .await
            .context("key not free")?;
        unlock_behind(&lease).await?;
        ensure!(
            !backend.release(&lease).await?,
            "release of a lock the session no longer held answered true"
        );
        let lease = acquire_free(&backend, &key, ttl)
            .await
            .context("key not free")?;
        unlock_behind(&lease).await?;
        session()?.state.lock().await.pid ^= 0x4000_0000;
        let refused = backend.release(&lease).await;
        ensure!(
            matches!(&refused, Err(LockError::InvalidConfig(message)) if message.contains("PgBouncer")),
            "expected InvalidConfig naming PgBouncer, got {refused:?}"
        );
        ensure!(backend.held_count() == 0, "the book still holds a lease");
        Ok(())
    }
}
