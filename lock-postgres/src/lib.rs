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
//!   the holder session by `idle_session_timeout`, which the backend keeps equal to the largest
//!   TTL of the locks on that session, the renewals being the heartbeat. See the README.
//! - **Lost signal.** Every lease carries its session's token ([`Lease::with_lost_signal`]);
//!   a failed statement or the session heartbeat (every [`heartbeat_interval`], ≤ 250 ms,
//!   while it holds locks) cancels it when the server dropped the session, which frees all
//!   its locks at once. Within that interval only fencing protects the resource.
//! - **Fencing.** The sequence [`PostgresConfig::fence_sequence`] (schema-qualified, default
//!   [`FENCE_SEQUENCE`], created if missing, used by OID) is drawn in the same statement as
//!   `pg_try_advisory_lock`: acquiring a free lock is one round trip, and tokens strictly
//!   increase per key (they increase across all keys), across restarts.
//! - **Server.** PostgreSQL 14 or later (`idle_session_timeout`), reached directly or through
//!   session pooling (transaction pooling is detected and refused).
//! - **Wake-ups.** Release is one statement that unlocks and, when some backend waits for the
//!   key, `NOTIFY`s. A waiting backend marks its interest with a shared advisory lock on the
//!   key's hash in the two-int keyspace (held on its waiter connection) and `LISTEN`s on one
//!   connection, dispatching to its waiters through a [`lock_core::ReleaseHub`].
//! - **Keys** are hashed with sqlx's [`PgAdvisoryLock::new`] over `namespace NUL key`, so two
//!   applications with different namespaces never share a lock. See [`advisory_key`].

use async_trait::async_trait;
use lock_core::{
    Attempt, Capabilities, FencingToken, Lease, LockBackend, LockError, LockKey, OwnerToken,
    ReleaseHub, Releases, validate_ttl,
};
use sqlx::postgres::types::Oid;
use sqlx::postgres::{
    PgAdvisoryLock, PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions,
};
use sqlx::{ConnectOptions, Row};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;

const BACKEND: &str = "postgres";

/// The default sequence that fencing tokens are drawn from ([`PostgresConfig::fence_sequence`]).
pub const FENCE_SEQUENCE: &str = "public.distlock_fence_seq";

/// The waiter-interest key of advisory key `hash`: the same 64 bits in the two-int keyspace
/// (`pg_locks.objsubid` 2), which never meets the one-bigint keyspace of the locks.
pub fn waiter_key(hash: i64) -> (i32, i32) {
    ((hash >> 32) as i32, hash as i32)
}

/// The transaction-level advisory lock that serializes creating the fence sequence: a
/// constant pair in the two-int keyspace, which no user key reaches (user keys are one
/// bigint; waiter keys are pairs but derived from a 64-bit hash, so meeting this one is a
/// 2^-64 accident that would only make setup wait behind a waiter).
pub const SETUP_LOCK: (i32, i32) = (0x6469_7374, 0x6c6f_636b);

/// Longest a `subscribe` call waits for the release listener and the waiter mark (bounded
/// by `op_timeout` too). Past it the waiter polls with the client's backoff.
pub const SUBSCRIBE_BUDGET: Duration = Duration::from_millis(250);

/// Smallest TTL granted: the holder session's `idle_session_timeout` follows the TTL, and a
/// shorter one would end sessions between two statements of a busy client.
pub const MIN_TTL: Duration = Duration::from_millis(500);

/// How often the reaper looks at an empty book (see [`reaper`]).
const REAPER_IDLE_TICK: Duration = Duration::from_secs(1);

/// The 64-bit advisory lock key for `key` in `namespace`: sqlx's [`PgAdvisoryLock::new`]
/// (HKDF-SHA256) over `namespace + "\0" + key`, or over `key` alone when the namespace is
/// empty (then it equals `PgAdvisoryLock::new(key)`, for interop with plain sqlx users).
///
/// Keys never contain NUL, so distinct (namespace, key) pairs hash distinct inputs. Two inputs
/// may still collide in 64 bits (about 1 in 2^32 for 2^16 live keys); a collision only makes
/// the two keys exclude each other. Fences come from one sequence, not from the hash, so they
/// stay correct.
pub fn advisory_key(namespace: &str, key: &str) -> i64 {
    let lock = if namespace.is_empty() {
        PgAdvisoryLock::new(key)
    } else {
        PgAdvisoryLock::new(format!("{namespace}\0{key}"))
    };
    lock.key().as_bigint().unwrap_or_default()
}

/// Settings of a [`PostgresBackend`].
#[derive(Clone, Debug)]
pub struct PostgresConfig {
    /// Mixed into every key's hash (and the NOTIFY channel), so applications sharing a database do not
    /// share locks. Default `distlock`. Must not contain NUL.
    pub namespace: String,
    /// Most holder sessions (connections) this backend opens. Default 8.
    pub max_sessions: usize,
    /// Holder sessions per distinct TTL; keys are spread over them by hash. Default 4.
    pub sessions_per_ttl: usize,
    /// Bound on opening a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Bound on one statement on a holder session, waiting for the session included. A
    /// statement that takes longer ends the session (and so every lock on it). Default 5 s.
    pub op_timeout: Duration,
    /// `application_name` prefix: holder sessions are `<prefix>-holder`, the listener
    /// `<prefix>-listener`. Default `distlock`.
    pub application_name: String,
    /// Schema-qualified name of the sequence fencing tokens come from; every backend of every
    /// role sharing locks must use the same one. Created (with CACHE 1) if missing, which
    /// needs CREATE on its schema; otherwise USAGE on the sequence is enough. Default
    /// [`FENCE_SEQUENCE`].
    pub fence_sequence: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            namespace: "distlock".into(),
            max_sessions: 8,
            sessions_per_ttl: 4,
            connect_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(5),
            application_name: "distlock".into(),
            fence_sequence: FENCE_SEQUENCE.into(),
        }
    }
}

/// `postgres://…` (or `postgresql://…`) → a backend. Extra query parameters read here (and not
/// passed to sqlx): `namespace`, `max_sessions`, `sessions_per_ttl`, `op_timeout_ms`,
/// `connect_timeout_ms`, `application_name`, `fence_sequence`.
pub async fn connect(url: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    Ok(Arc::new(PostgresBackend::connect(url).await?))
}

fn parse_url(url: &str) -> Result<(PgConnectOptions, PostgresConfig), LockError> {
    let mut parsed = url::Url::parse(url)
        .map_err(|error| LockError::InvalidConfig(format!("invalid postgres URL: {error}")))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(LockError::InvalidConfig(format!(
            "a postgres URL starts with postgres:// or postgresql://, not {}://",
            parsed.scheme()
        )));
    }
    let mut config = PostgresConfig::default();
    let mut kept = Vec::new();
    let bad = |name: &str, value: &str| {
        LockError::InvalidConfig(format!("invalid value {value:?} for URL parameter {name}"))
    };
    for (name, value) in parsed.query_pairs() {
        let number = || value.parse::<u64>().map_err(|_| bad(&name, &value));
        match name.as_ref() {
            "namespace" => config.namespace = value.to_string(),
            "max_sessions" => {
                config.max_sessions = usize::try_from(number()?).map_err(|_| bad(&name, &value))?
            }
            "sessions_per_ttl" => {
                config.sessions_per_ttl =
                    usize::try_from(number()?).map_err(|_| bad(&name, &value))?
            }
            "op_timeout_ms" => config.op_timeout = Duration::from_millis(number()?),
            "connect_timeout_ms" => config.connect_timeout = Duration::from_millis(number()?),
            "application_name" => config.application_name = value.to_string(),
            "fence_sequence" => config.fence_sequence = value.to_string(),
            _ => kept.push((name.to_string(), value.to_string())),
        }
    }
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    let options = PgConnectOptions::from_str(parsed.as_str())
        .map_err(|error| LockError::InvalidConfig(format!("invalid postgres URL: {error}")))?;
    Ok((options, config))
}

fn check_config(config: &PostgresConfig) -> Result<(), LockError> {
    if config.namespace.contains('\0') {
        return Err(LockError::InvalidConfig(
            "the namespace must not contain NUL".into(),
        ));
    }
    if config.max_sessions == 0 || config.sessions_per_ttl == 0 {
        return Err(LockError::InvalidConfig(
            "max_sessions and sessions_per_ttl must be at least 1".into(),
        ));
    }
    if config.op_timeout.is_zero() || config.connect_timeout.is_zero() {
        return Err(LockError::InvalidConfig("timeouts must not be zero".into()));
    }
    Ok(())
}

/// Whether the error means the connection (and so the session and its locks) is gone or
/// unusable, rather than one statement failing.
fn is_connection_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08: connection exception; 57: operator intervention (terminated, shutdown).
            code.starts_with("08") || code.starts_with("57")
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

fn map_error(context: &str, error: sqlx::Error) -> LockError {
    match &error {
        sqlx::Error::Configuration(_) => LockError::InvalidConfig(format!("{context}: {error}")),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default().to_string();
            // 28: authentication; 3D000: no such database; 42: syntax/privileges.
            let permanent = code.starts_with("28") || code == "3D000" || code.starts_with("42");
            LockError::backend(BACKEND, format!("{context}: {error}"), !permanent, error)
        }
        _ => LockError::backend(BACKEND, format!("{context}: {error}"), true, error),
    }
}

/// `pg_backend_pid()` through the simple query protocol (no prepared statement).
async fn backend_pid(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
    sqlx::raw_sql("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await?
        .try_get(0)
}

/// Errors that only a connection pooler between us and PostgreSQL causes: PgBouncer's
/// statement pooling refusing a transaction, or a named prepared statement found missing
/// (`26000`) or already there (`42P05`) because two statements ran in different server
/// sessions, or in one shared with another client.
fn is_pooler_error(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    matches!(db.code().as_deref(), Some("26000" | "42P05"))
        || db.message().to_ascii_lowercase().contains("pooling mode")
}

/// The refusal for a connection pooler that switches server sessions; `what` is the evidence.
fn pooler_refusal(what: &str) -> LockError {
    LockError::InvalidConfig(format!(
        "{what}: this looks like PgBouncer (or another pooler) in transaction or statement \
         pooling mode, which breaks session advisory locks. Connect to PostgreSQL directly or \
         through session pooling."
    ))
}

fn timed_out(context: &str, after: Duration) -> LockError {
    LockError::backend_msg(
        BACKEND,
        format!("{context}: no answer within {after:?}"),
        true,
    )
}

/// Largest TTL granted: `idle_session_timeout`, which enforces the TTL when the process stops,
/// is an `int` of milliseconds (2^31 − 1 ms, about 24.8 days).
pub const MAX_TTL: Duration = Duration::from_millis(i32::MAX as u64);

/// [`validate_ttl`] plus this backend's own ceiling, [`MAX_TTL`].
fn check_ttl(ttl: Duration) -> Result<(), LockError> {
    validate_ttl(ttl)?;
    if ttl_ms(ttl) > MAX_TTL.as_millis() as u64 {
        return Err(LockError::InvalidTtl {
            ttl,
            reason: format!(
                "the postgres backend enforces TTLs with idle_session_timeout, at most \
                 {MAX_TTL:?} (2^31 - 1 ms)"
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

/// One connection's state, behind the session's async mutex (statements on a session are
/// serialized).
#[derive(Debug, Default)]
struct SessionState {
    conn: Option<PgConnection>,
    /// Bumped when the connection is dropped: leases granted on an older epoch are gone.
    epoch: u64,
    /// TTL (ms) → number of locks held on this session with that TTL. The session's
    /// `idle_session_timeout` is the largest key (0 = off when no lock is held).
    ttls: BTreeMap<u64, usize>,
    pid: i32,
    /// Cancelled when this connection is dropped or found dead; every lease granted on it
    /// carries it ([`Lease::with_lost_signal`]), so its guards hear of the loss at once.
    lost: CancellationToken,
    /// When a statement on this connection last got its answer: a session that answered
    /// within the heartbeat interval needs no probe.
    answered_at: Option<Instant>,
    /// The session's `idle_session_timeout` on the server (ms, 0 = off), as we last set it.
    /// It is at least the largest TTL held; statements set it only when that changes. After
    /// the last lock goes it stays (one `set_config` less per release and per next acquire)
    /// and the heartbeat turns it off later; a lock-free session the server ended meanwhile
    /// is reconnected by the next acquire.
    timeout_set_ms: u64,
}

impl SessionState {
    /// Drops the connection: the server ends the session and frees whatever it held. Leases
    /// granted on it hear it through `lost` and are stale by `epoch`. Returns the old epoch.
    fn disconnect(&mut self) -> u64 {
        self.conn = None;
        self.ttls.clear();
        self.lost.cancel();
        self.epoch += 1;
        self.epoch - 1
    }

    /// The largest TTL (ms) held on this session, 0 when none.
    fn max_ttl(&self) -> u64 {
        self.ttls.keys().next_back().copied().unwrap_or(0)
    }

    fn add_ttl(&mut self, ttl: u64) {
        *self.ttls.entry(ttl).or_insert(0) += 1;
    }

    fn remove_ttl(&mut self, ttl: u64) {
        if let Some(count) = self.ttls.get_mut(&ttl) {
            *count -= 1;
            if *count == 0 {
                self.ttls.remove(&ttl);
            }
        }
    }
}

#[derive(Debug)]
struct Session {
    id: usize,
    class_ms: u64,
    state: tokio::sync::Mutex<SessionState>,
    /// Set when an operation was abandoned mid-statement and the session was busy: its next
    /// user drops the connection first.
    tainted: AtomicBool,
}

/// Marks a statement in flight on a session until dropped: an operation abandoned while it
/// is set leaves the session in an unknown state (see [`Inner::abandon`]).
struct InFlight<'a>(&'a AtomicBool);

impl<'a> InFlight<'a> {
    fn start(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::SeqCst);
        InFlight(flag)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Why an unlock failed, for what the book must say afterwards.
#[derive(Debug)]
enum UnlockFailure {
    /// Nothing reached the server (the session stayed busy): the lock is still held.
    NotSent(LockError),
    /// The lock is no longer held (the statement failed and was undone, or the session was
    /// dropped).
    Failed(LockError),
}

#[derive(Debug)]
enum Entry {
    /// An acquire of this advisory key is in flight on one of our sessions.
    Pending,
    Held(HeldLock),
}

#[derive(Debug, Clone)]
struct HeldLock {
    key: LockKey,
    owner: OwnerToken,
    session: Arc<Session>,
    epoch: u64,
    ttl_ms: u64,
    /// The reaper unlocks at this instant unless a renewal moved it.
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Book {
    entries: HashMap<i64, Entry>,
    /// When the reaper plans to wake next.
    reaper_at: Option<Instant>,
}

#[derive(Debug)]
struct Inner {
    options: PgConnectOptions,
    config: PostgresConfig,
    channel: String,
    book: Mutex<Book>,
    sessions: Mutex<Vec<Arc<Session>>>,
    hub: ReleaseHub,
    /// Wakes the heartbeat task when a session's first lock needs a probe before the task's
    /// planned wake-up ([`Inner::heartbeat_at`]).
    heartbeat_wake: Notify,
    /// When the heartbeat task plans to wake next (`None`: not until woken).
    heartbeat_at: Mutex<Option<Instant>>,
    listener: Mutex<ListenerPhase>,
    /// Set when the backend is dropped: a listener that connects afterwards is not started.
    closed: AtomicBool,
    /// Commands for the waiter connection (set once the listener runs), read by the hub's
    /// idle hook.
    waiter_tx: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<WaiterCommand>>>,
    reaper_wake: Notify,
    /// The fence sequence, by OID: found once at setup, never through `search_path`.
    fence_oid: AtomicU32,
    /// Advisory keys of recently used lock keys: the HKDF (and, with a namespace, the
    /// formatting of its input) cost about 1 µs per acquire, a lookup a few dozen ns.
    key_cache: Mutex<HashMap<LockKey, i64>>,
}

/// Entries [`Inner::key_cache`] holds before it starts over (a workload of ever-new keys,
/// e.g. one per order id, must not grow it without bound).
const KEY_CACHE_CAPACITY: usize = 4096;

/// Locks in PostgreSQL (see the crate docs). Build it with [`PostgresBackend::connect`],
/// [`PostgresBackend::from_pool`] or [`PostgresBackend::with_options`]; share it as
/// `Arc<dyn LockBackend>` in a [`lock_core::Locker`].
///
/// Dropping it closes its holder sessions: the server then frees every lock it held.
#[derive(Debug)]
pub struct PostgresBackend {
    inner: Arc<Inner>,
    reaper: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        self.reaper.abort();
        self.heartbeat.abort();
        self.inner.closed.store(true, Ordering::SeqCst);
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
        let channel = format!(
            "distlock_{:016x}",
            advisory_key("", &config.namespace).cast_unsigned()
        );
        let waiter_tx: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<WaiterCommand>>> =
            Arc::default();
        let inner = Arc::new(Inner {
            options,
            config,
            channel,
            book: Mutex::default(),
            sessions: Mutex::default(),
            hub: ReleaseHub::with_idle_hook({
                let waiter_tx = waiter_tx.clone();
                move |key: &str| {
                    if let Some(tx) = waiter_tx.get() {
                        let _ = tx.send(WaiterCommand::Forget(key.to_owned()));
                    }
                }
            }),
            listener: Mutex::new(ListenerPhase::Down),
            closed: AtomicBool::new(false),
            waiter_tx,
            reaper_wake: Notify::new(),
            heartbeat_wake: Notify::new(),
            heartbeat_at: Mutex::new(None),
            fence_oid: AtomicU32::new(0),
            key_cache: Mutex::default(),
        });
        let fence = inner.setup().await?;
        inner.fence_oid.store(fence.0, Ordering::Relaxed);
        let reaper = tokio::spawn(reaper(inner.clone()));
        let heartbeat = tokio::spawn(heartbeat(inner.clone()));
        Ok(PostgresBackend {
            inner,
            reaper,
            heartbeat,
        })
    }

    /// The advisory key this backend uses for `key` (see [`advisory_key`]).
    pub fn advisory_key(&self, key: &LockKey) -> i64 {
        self.inner.advisory_key(key)
    }

    /// The settings in force.
    pub fn config(&self) -> &PostgresConfig {
        &self.inner.config
    }

    /// Server process ids of the holder sessions that are connected now (for tests and
    /// monitoring: `pg_stat_activity.pid`).
    pub async fn holder_pids(&self) -> Vec<i32> {
        let sessions: Vec<Arc<Session>> = lock(&self.inner.sessions).clone();
        let mut pids = Vec::new();
        for session in sessions {
            let state = session.state.lock().await;
            if state.conn.is_some() {
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the maps consistent, so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// The fence column is NULL exactly when the lock was not granted (`nextval` never answers
// NULL), so the answer needs no separate flag. A plain CASE, not a CTE: a CTE over a volatile
// function is materialised, which cost the server ~2.5 µs per acquire.
const ACQUIRE_SQL: &str = "\
SELECT f, pg_backend_pid(),
  set_config('idle_session_timeout', CASE WHEN f IS NULL THEN $3 ELSE $2 END, false)
FROM (SELECT CASE WHEN pg_try_advisory_lock($1) THEN nextval($4::regclass) END AS f OFFSET 0) l";

// The same answer without touching idle_session_timeout, for when it already has the value
// the lock needs.
const ACQUIRE_KEEP_TIMEOUT_SQL: &str =
    "SELECT CASE WHEN pg_try_advisory_lock($1) THEN nextval($2::regclass) END, pg_backend_pid()";

// Every statement returns pg_backend_pid(): a different answer than at connect means a
// pooler switched server sessions under us (see `Inner::session_switched`).
const RENEW_SQL: &str = "SELECT set_config('idle_session_timeout', $1, false), pg_backend_pid()";

// The exclusive xact lock on the waiter key fails only when some backend holds it shared,
// i.e. waits for this key: only then is the NOTIFY (and its commit cost) paid.
// The release needs no pid column: it unlocks a lock our books say this session holds, so it
// answers `true` unless the statement ran in another server session (or the lock is gone),
// and only then does a separate `pg_backend_pid()` tell which (see `Inner::unlock_op`).
const UNLOCK_SQL: &str = "\
SELECT pg_advisory_unlock($1),
  CASE WHEN pg_try_advisory_xact_lock($2, $3) THEN NULL ELSE pg_notify($4, $5)::text END,
  set_config('idle_session_timeout', $6, false)";

const UNLOCK_KEEP_TIMEOUT_SQL: &str = "\
SELECT pg_advisory_unlock($1),
  CASE WHEN pg_try_advisory_xact_lock($2, $3) THEN NULL ELSE pg_notify($4, $5)::text END";

impl Inner {
    /// [`advisory_key`] in this backend's namespace, through [`Inner::key_cache`].
    fn advisory_key(&self, key: &LockKey) -> i64 {
        if let Some(&hash) = lock(&self.key_cache).get(key) {
            return hash;
        }
        let hash = advisory_key(&self.config.namespace, key.as_str());
        let mut cache = lock(&self.key_cache);
        if cache.len() >= KEY_CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(key.clone(), hash);
        hash
    }

    /// Checks the server with a throw-away connection (version, no transaction pooler) and
    /// finds the fence sequence, creating it if missing. Returns the sequence's OID.
    async fn setup(&self) -> Result<Oid, LockError> {
        let deadline = Instant::now() + self.config.connect_timeout;
        let (mut conn, pid) = self.open_session(deadline).await?;
        let checks = async {
            let version: i32 =
                sqlx::query_scalar("SELECT current_setting('server_version_num')::int4")
                    .fetch_one(&mut conn)
                    .await
                    .map_err(|error| map_error("reading the server version", error))?;
            if version < 140_000 {
                return Err(LockError::InvalidConfig(format!(
                    "PostgreSQL 14 or later is required (idle_session_timeout enforces lock \
                     TTLs); this server is version {version}"
                )));
            }
            self.check_no_pooler(&mut conn, pid).await?;
            self.fence_sequence(&mut conn).await
        };
        match timeout_at(deadline, checks).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(
                "checking the server and the fence sequence",
                self.config.connect_timeout,
            )),
        }
    }

    /// A transaction-pooling PgBouncer hands the most recently used idle server connection
    /// to the next transaction (LIFO), so two probes on one client connection usually land on
    /// the same server session. A second client connection opens a transaction meanwhile:
    /// behind such a pooler it gets our session's server connection (same pid) — checked
    /// before anything else runs, as with a pool of one server connection our next probe
    /// would wait for that transaction — or else our next probe has to run on another one.
    ///
    /// The probes use the simple query protocol: sqlx's named prepared statements would
    /// collide on a shared server connection ("prepared statement already exists") and hide
    /// the pooler behind a confusing error. Errors that only a pooler causes (statement
    /// pooling refusing the transaction, prepared statements missing or duplicated) are
    /// refusals too (see [`is_pooler_error`]).
    async fn check_no_pooler(&self, conn: &mut PgConnection, pid: i32) -> Result<(), LockError> {
        let mut other = self
            .options
            .clone()
            .application_name(&format!("{}-probe", self.config.application_name))
            .connect()
            .await
            .map_err(|error| map_error("connecting to postgres", error))?;
        let probe = async {
            sqlx::raw_sql("BEGIN").execute(&mut other).await?;
            let other_pid = backend_pid(&mut other).await?;
            if other_pid == pid {
                return Ok(Some(format!(
                    "a second client connection ran in this one's server session (pid {pid})"
                )));
            }
            let again = backend_pid(&mut *conn).await?;
            Ok::<_, sqlx::Error>((again != pid).then(|| {
                format!(
                    "one client connection ran in two server sessions (pid {pid}, then {again})"
                )
            }))
        };
        let outcome = probe.await;
        // Closing ends the open transaction too.
        let _ = sqlx::Connection::close(other).await;
        match outcome {
            Ok(None) => Ok(()),
            Ok(Some(what)) => Err(pooler_refusal(&what)),
            Err(error) if is_pooler_error(&error) => Err(pooler_refusal(&error.to_string())),
            Err(error) => Err(map_error("probing for a connection pooler", error)),
        }
    }

    /// Finds the fence sequence by its schema-qualified name (never through `search_path`,
    /// which differs between roles), creating it only if it is missing (`CREATE SEQUENCE IF
    /// NOT EXISTS` would demand CREATE privilege even when it exists), and checks it can
    /// serve fences: a sequence, increasing, usable by this role.
    async fn fence_sequence(&self, conn: &mut PgConnection) -> Result<Oid, LockError> {
        let name = self.config.fence_sequence.as_str();
        let invalid =
            |why: String| LockError::InvalidConfig(format!("fence_sequence {name:?}: {why}"));
        let parts: Option<i32> = sqlx::query_scalar("SELECT array_length(parse_ident($1), 1)")
            .bind(name)
            .fetch_one(&mut *conn)
            .await
            .map_err(|error| invalid(format!("not a valid name: {error}")))?;
        if parts != Some(2) {
            return Err(invalid(
                "give it as schema.name, so every role finds the same sequence".into(),
            ));
        }
        let lookup = "SELECT to_regclass($1)::oid";
        let mut oid: Option<Oid> = sqlx::query_scalar(lookup)
            .bind(name)
            .fetch_one(&mut *conn)
            .await
            .map_err(|error| map_error("looking up the fence sequence", error))?;
        if oid.is_none() {
            oid = self.create_fence_sequence(conn).await?;
        }
        if oid.is_none() {
            oid = sqlx::query_scalar(lookup)
                .bind(name)
                .fetch_one(&mut *conn)
                .await
                .map_err(|error| map_error("looking up the fence sequence", error))?;
        }
        let oid = oid.ok_or_else(|| invalid("it could not be found after creating it".into()))?;
        let row = sqlx::query(
            "SELECT c.relkind::text, s.seqincrement, s.seqcache, s.seqcycle, \
               has_sequence_privilege(c.oid, 'USAGE') OR has_sequence_privilege(c.oid, 'UPDATE') \
             FROM pg_class c LEFT JOIN pg_sequence s ON s.seqrelid = c.oid WHERE c.oid = $1",
        )
        .bind(oid)
        .fetch_one(&mut *conn)
        .await
        .map_err(|error| map_error("inspecting the fence sequence", error))?;
        let decoded = (|| {
            Ok::<_, sqlx::Error>((
                row.try_get::<String, _>(0)?,
                row.try_get::<Option<i64>, _>(1)?,
                row.try_get::<Option<i64>, _>(2)?,
                row.try_get::<Option<bool>, _>(3)?,
                row.try_get::<bool, _>(4)?,
            ))
        })();
        let (kind, increment, cache, cycle, usable) =
            decoded.map_err(|error| map_error("inspecting the fence sequence", error))?;
        if kind != "S" {
            return Err(invalid("it exists but is not a sequence".into()));
        }
        if increment.unwrap_or(0) <= 0 {
            return Err(invalid(
                "its increment is not positive: fencing tokens must increase".into(),
            ));
        }
        if !usable {
            return Err(invalid(
                "this role may not draw from it: GRANT USAGE ON SEQUENCE to it".into(),
            ));
        }
        if cache.unwrap_or(1) > 1 {
            // Each session pre-allocates a block: two sessions' values interleave, so a later
            // holder can get a lower token than an earlier one.
            tracing::warn!(
                sequence = name,
                cache,
                "the fence sequence has CACHE > 1: fencing tokens from different sessions \
                 are not monotonic; ALTER SEQUENCE ... CACHE 1"
            );
        }
        if cycle == Some(true) {
            tracing::warn!(
                sequence = name,
                "the fence sequence CYCLEs: after its maximum, tokens start over"
            );
        }
        Ok(oid)
    }

    /// Creates the fence sequence, serialized between backends by a transaction lock that no
    /// user key can reach (a user's lock named "schema" must not block connecting).
    async fn create_fence_sequence(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Option<Oid>, LockError> {
        let name = self.config.fence_sequence.as_str();
        let work = async {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
                .bind(SETUP_LOCK.0)
                .bind(SETUP_LOCK.1)
                .execute(&mut *tx)
                .await?;
            // Someone may have created it while we waited (if this transaction's catalog
            // caches already show it; if not, the CREATE below says so).
            let existing: Option<Oid> = sqlx::query_scalar("SELECT to_regclass($1)::oid")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            if existing.is_some() {
                tx.commit().await?;
                return Ok(existing);
            }
            // The server quotes each part: the name cannot inject SQL.
            let quoted: String = sqlx::query_scalar(
                "SELECT string_agg(quote_ident(part), '.' ORDER BY n) \
                 FROM unnest(parse_ident($1)) WITH ORDINALITY AS t(part, n)",
            )
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
            let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SEQUENCE {quoted}")))
                .execute(&mut *tx)
                .await;
            if let Err(sqlx::Error::Database(db)) = &created
                && matches!(db.code().as_deref(), Some("42P07" | "23505"))
            {
                // Another backend created it after our look-up: this transaction may still
                // see a cached "no such relation" (an advisory lock does not refresh the
                // catalog caches). Roll back; the caller looks again in a new transaction.
                tx.rollback().await?;
                return Ok(None);
            }
            created?;
            let created: Option<Oid> = sqlx::query_scalar("SELECT to_regclass($1)::oid")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(created)
        };
        work.await.map_err(|error| {
            let code = match &error {
                sqlx::Error::Database(db) => db.code().unwrap_or_default().to_string(),
                _ => String::new(),
            };
            match code.as_str() {
                "42501" | "3F000" => LockError::InvalidConfig(format!(
                    "the fence sequence {name} does not exist and this role cannot create it \
                     ({error}); have an administrator run CREATE SEQUENCE {name}; GRANT USAGE \
                     ON SEQUENCE {name} TO <role>"
                )),
                _ => map_error("creating the fence sequence", error),
            }
        })
    }

    /// Opens a holder-style connection: checks that session state survives between
    /// transactions (it does not behind a transaction-pooling PgBouncer) and turns
    /// `idle_session_timeout` off until a lock is held.
    async fn open_session(&self, deadline: Instant) -> Result<(PgConnection, i32), LockError> {
        let options = self
            .options
            .clone()
            .application_name(&format!("{}-holder", self.config.application_name));
        let work = async {
            let mut conn = options.connect().await?;
            let first: i32 = sqlx::query_scalar(
                "SELECT pg_backend_pid() FROM (SELECT set_config('idle_session_timeout', '0', false)) s",
            )
            .fetch_one(&mut conn)
            .await?;
            let second: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut conn)
                .await?;
            Ok::<_, sqlx::Error>((conn, first, second))
        };
        match timeout_at(deadline, work).await {
            Err(_) => Err(timed_out(
                &format!(
                    "connecting to postgres at {}:{}",
                    self.options.get_host(),
                    self.options.get_port()
                ),
                self.config.connect_timeout,
            )),
            Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("42704") => {
                // "unrecognized configuration parameter": idle_session_timeout is new in 14.
                Err(LockError::InvalidConfig(format!(
                    "PostgreSQL 14 or later is required (idle_session_timeout enforces lock \
                     TTLs): {db}"
                )))
            }
            Ok(Err(error)) if is_pooler_error(&error) => Err(pooler_refusal(&error.to_string())),
            Ok(Err(error)) => Err(map_error("connecting to postgres", error)),
            Ok(Ok((_, first, second))) if first != second => Err(pooler_refusal(&format!(
                "two statements on one connection ran in different server sessions (pid \
                 {first}, then {second})"
            ))),
            Ok(Ok((conn, first, _))) => Ok((conn, first)),
        }
    }

    fn pick_session(&self, hash: i64, ttl_ms: u64) -> Arc<Session> {
        let mut sessions = lock(&self.sessions);
        let in_class = |session: &&Arc<Session>| session.class_ms == ttl_ms;
        let per_ttl = self.config.sessions_per_ttl;
        let slot = usize::try_from(hash.cast_unsigned() % per_ttl as u64).unwrap_or(0);
        if let Some(session) = sessions.iter().filter(in_class).nth(slot) {
            return session.clone();
        }
        if sessions.len() < self.config.max_sessions {
            let session = Arc::new(Session {
                id: sessions.len(),
                class_ms: ttl_ms,
                state: tokio::sync::Mutex::default(),
                tainted: AtomicBool::new(false),
            });
            sessions.push(session.clone());
            return session;
        }
        let class_len = sessions.iter().filter(in_class).count();
        if class_len > 0
            && let Some(session) = sessions.iter().filter(in_class).nth(slot % class_len)
        {
            return session.clone();
        }
        // Every session is taken by other TTLs: share the closest one. Its timeout follows the
        // largest TTL on it, so this lock can only be kept longer after a stall, never less.
        sessions
            .iter()
            .min_by_key(|session| session.class_ms.abs_diff(ttl_ms))
            .cloned()
            .unwrap_or_else(|| {
                // Unreachable: max_sessions ≥ 1, so the list is not empty here.
                Arc::new(Session {
                    id: usize::MAX,
                    class_ms: ttl_ms,
                    state: tokio::sync::Mutex::default(),
                    tainted: AtomicBool::new(false),
                })
            })
    }

    /// Waits for the session's mutex, at most `op_timeout`. Running out is a retryable error
    /// that leaves the session alone: nothing was sent on it. A session marked tainted (an
    /// operation was abandoned mid-statement where it could not finish) is dropped first.
    async fn lock_session<'s>(
        &self,
        session: &'s Session,
    ) -> Result<tokio::sync::MutexGuard<'s, SessionState>, LockError> {
        // A free session (the common case) needs no timer.
        let free = session.state.try_lock().ok();
        let mut state = match free {
            Some(state) => state,
            None => tokio::time::timeout(self.config.op_timeout, session.state.lock())
                .await
                .map_err(|_| {
                    LockError::backend_msg(
                        BACKEND,
                        format!(
                            "the holder session stayed busy for {:?}; nothing was sent, the \
                         session and its locks are kept",
                            self.config.op_timeout
                        ),
                        true,
                    )
                })?,
        };
        if session.tainted.swap(false, Ordering::SeqCst) && state.conn.is_some() {
            self.break_session(
                session,
                &mut state,
                "an operation was abandoned mid-statement outside a runtime",
            );
        }
        Ok(state)
    }

    /// Locks the session and makes sure it is connected (connecting within
    /// `connect_timeout`).
    async fn session_conn<'s>(
        &self,
        session: &'s Session,
    ) -> Result<tokio::sync::MutexGuard<'s, SessionState>, LockError> {
        let mut state = self.lock_session(session).await?;
        if state.conn.is_none() {
            self.reconnect(&mut state).await?;
        }
        Ok(state)
    }

    /// Opens a fresh connection for a session that has none (`open_session` sets its
    /// `idle_session_timeout` to 0).
    async fn reconnect(&self, state: &mut SessionState) -> Result<(), LockError> {
        let deadline = Instant::now() + self.config.connect_timeout;
        let (conn, pid) = self.open_session(deadline).await?;
        state.conn = Some(conn);
        state.pid = pid;
        state.ttls.clear();
        state.lost = CancellationToken::new();
        state.timeout_set_ms = 0;
        state.answered_at = Some(Instant::now());
        Ok(())
    }

    /// Drops the session's connection: the server ends the session and frees its locks. Every
    /// lease granted on it is gone from our books, so renew answers `Lost`.
    fn break_session(&self, session: &Session, state: &mut SessionState, why: &str) {
        tracing::warn!(
            session = session.id,
            pid = state.pid,
            why,
            "holder session lost; its locks are lost"
        );
        // The server frees every lock of the session once the connection goes: the guards
        // hear it now (the lost signal), not at their next renewal.
        let old = state.disconnect();
        let mut book = lock(&self.book);
        book.entries.retain(|_, entry| match entry {
            Entry::Held(held) => !(held.session.id == session.id && held.epoch == old),
            Entry::Pending => true,
        });
    }

    /// A statement answered from another server session than the one we opened: a pooler
    /// (PgBouncer in transaction or statement mode) switches sessions under us, so no lock
    /// on this connection can be trusted. Drops the session.
    fn session_switched(&self, session: &Session, state: &mut SessionState, pid: i32) -> LockError {
        let why = format!(
            "a statement ran in server session {pid}, not {}: a pooler is switching sessions",
            state.pid
        );
        self.break_session(session, state, &why);
        pooler_refusal(&why)
    }

    /// After an unlock that answered `false`: a pooler that switched server sessions is
    /// reported as such ([`Inner::session_switched`]); a failed check drops the session.
    async fn check_pid_after_false_unlock(
        &self,
        session: &Session,
        state: &mut SessionState,
    ) -> Result<(), LockError> {
        let Some(conn) = state.conn.as_mut() else {
            return Ok(());
        };
        let query = sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(conn);
        match tokio::time::timeout(self.config.op_timeout, query).await {
            Ok(Ok(pid)) if pid == state.pid => Ok(()),
            Ok(Ok(pid)) => Err(self.session_switched(session, state, pid)),
            _ => {
                self.break_session(
                    session,
                    state,
                    "checking the session after a release failed",
                );
                Ok(())
            }
        }
    }

    /// An operation on `session` was dropped outside any runtime, so it cannot be finished:
    /// if its statement was in flight, the next user of the session drops the connection
    /// (the server then frees whatever that statement took).
    fn abandon(&self, session: &Session, in_flight: &AtomicBool) {
        if !in_flight.load(Ordering::SeqCst) {
            return;
        }
        match session.state.try_lock() {
            Ok(mut state) if state.conn.is_some() => {
                self.break_session(
                    session,
                    &mut state,
                    "an operation was abandoned mid-statement outside a runtime",
                );
            }
            Ok(_) => {}
            Err(_) => session.tainted.store(true, Ordering::SeqCst),
        }
    }

    /// Puts a lease whose unlock never reached the server back in the book: it is still held
    /// there, and the reaper unlocks it at its deadline (or now, if that passed).
    fn restore_held(&self, hash: i64, held: HeldLock) {
        let mut book = lock(&self.book);
        if !matches!(book.entries.get(&hash), Some(Entry::Pending)) {
            return;
        }
        let deadline = held.deadline;
        book.entries.insert(hash, Entry::Held(held));
        if book.reaper_at.is_none_or(|at| deadline < at) {
            book.reaper_at = Some(deadline);
            self.reaper_wake.notify_one();
        }
    }

    /// Unlocks `held` (its book entry is `Pending` meanwhile, so no local acquire can take the
    /// key on the same session before the unlock ran) and settles the book entry.
    async fn release_held(
        self: Arc<Self>,
        hash: i64,
        held: HeldLock,
        in_flight: Arc<AtomicBool>,
    ) -> Result<bool, LockError> {
        match self.unlock_op(hash, &held, &in_flight).await {
            Ok(unlocked) => {
                self.forget_pending(hash);
                Ok(unlocked)
            }
            Err(UnlockFailure::NotSent(error)) => {
                self.restore_held(hash, held);
                Err(error)
            }
            Err(UnlockFailure::Failed(error)) => {
                self.forget_pending(hash);
                Err(error)
            }
        }
    }

    /// One heartbeat: a Sync round trip (no statement to parse). Any failure leaves the
    /// connection in an unknown state, so the session is dropped and its guards told.
    async fn probe(&self, session: &Session, mut state: tokio::sync::MutexGuard<'_, SessionState>) {
        let Some(conn) = state.conn.as_mut() else {
            return;
        };
        match tokio::time::timeout(self.config.op_timeout, sqlx::Connection::ping(conn)).await {
            Ok(Ok(())) => state.answered_at = Some(Instant::now()),
            Ok(Err(error)) => {
                let why = format!("heartbeat failed: {error}");
                self.break_session(session, &mut state, &why);
            }
            Err(_) => self.break_session(session, &mut state, "heartbeat timed out"),
        }
    }

    /// Turns off the `idle_session_timeout` a lock-free session kept from its last lock. A
    /// failure drops the connection (it held nothing); the next acquire connects again.
    async fn turn_off_timeout(
        &self,
        session: &Session,
        mut state: tokio::sync::MutexGuard<'_, SessionState>,
    ) {
        if !state.ttls.is_empty() {
            return;
        }
        let Some(conn) = state.conn.as_mut() else {
            return;
        };
        let query = sqlx::query(RENEW_SQL).bind("0").fetch_one(conn);
        match tokio::time::timeout(self.config.op_timeout, query).await {
            Ok(Ok(row)) if row.try_get::<i32, _>(1).is_ok_and(|pid| pid == state.pid) => {
                state.timeout_set_ms = 0;
                state.answered_at = Some(Instant::now());
            }
            _ => {
                tracing::debug!(session = session.id, "lock-free holder session dropped");
                state.disconnect();
            }
        }
    }

    fn forget_pending(&self, hash: i64) {
        let mut book = lock(&self.book);
        if matches!(book.entries.get(&hash), Some(Entry::Pending)) {
            book.entries.remove(&hash);
        }
    }

    async fn acquire_op(
        self: Arc<Self>,
        key: LockKey,
        hash: i64,
        ttl: Duration,
        sent_at: Instant,
        session: Arc<Session>,
        in_flight: Arc<AtomicBool>,
    ) -> Result<Attempt, LockError> {
        let ttl_ms = ttl_ms(ttl);
        let mut state = match self.session_conn(&session).await {
            Ok(state) => state,
            Err(error) => {
                self.forget_pending(hash);
                return Err(error);
            }
        };
        let owner = OwnerToken::random();
        let fence_oid = Oid(self.fence_oid.load(Ordering::Relaxed));
        let _flight = InFlight::start(&in_flight);
        let mut reconnected = false;
        let (result, wanted) = loop {
            // The session's timeout must cover this lock's TTL, and no more than the largest
            // TTL it will hold: set it only when that changes.
            let wanted = state.max_ttl().max(ttl_ms);
            let query = if wanted == state.timeout_set_ms {
                sqlx::query(ACQUIRE_KEEP_TIMEOUT_SQL)
                    .bind(hash)
                    .bind(fence_oid)
            } else {
                sqlx::query(ACQUIRE_SQL)
                    .bind(hash)
                    .bind(wanted.to_string())
                    .bind(state.timeout_set_ms.to_string())
                    .bind(fence_oid)
            };
            // The statement's own budget starts when it is sent, not when we began waiting.
            let result = match state.conn.as_mut() {
                Some(conn) => {
                    tokio::time::timeout(self.config.op_timeout, query.fetch_one(conn)).await
                }
                None => Ok(Err(sqlx::Error::PoolClosed)),
            };
            match &result {
                // A session holding no lock may have been ended by the server: its timeout
                // outlives its last lock until the heartbeat turns it off. Nothing was held
                // on it, so nothing is lost: connect again and send the statement once more.
                Ok(Err(error))
                    if !reconnected && state.ttls.is_empty() && is_connection_error(error) =>
                {
                    tracing::debug!(%error, session = session.id, "lock-free holder session ended; reconnecting");
                    reconnected = true;
                    state.disconnect();
                    if let Err(error) = self.reconnect(&mut state).await {
                        self.forget_pending(hash);
                        return Err(error);
                    }
                }
                _ => break (result, wanted),
            }
        };
        let row = match result {
            Ok(Ok(row)) => {
                state.answered_at = Some(Instant::now());
                row
            }
            Ok(Err(error)) => {
                if is_connection_error(&error) {
                    self.break_session(&session, &mut state, "acquire failed");
                } else if let Some(conn) = state.conn.as_mut() {
                    // A session lock taken by a statement that then failed survives the
                    // rollback: undo it. We did not hold this key on this session (our books
                    // said so), so this unlock cannot drop a lock we mean to keep.
                    let undo = sqlx::query("SELECT pg_advisory_unlock($1)")
                        .bind(hash)
                        .execute(conn);
                    if !matches!(
                        tokio::time::timeout(self.config.op_timeout, undo).await,
                        Ok(Ok(_))
                    ) {
                        self.break_session(&session, &mut state, "undoing a failed acquire failed");
                    }
                }
                self.forget_pending(hash);
                return Err(map_error("acquire", error));
            }
            Err(_) => {
                self.break_session(&session, &mut state, "acquire timed out");
                self.forget_pending(hash);
                return Err(timed_out("acquire", self.config.op_timeout));
            }
        };
        let decoded = (|| {
            let fence: Option<i64> = row.try_get(0)?;
            let pid: i32 = row.try_get(1)?;
            Ok::<_, sqlx::Error>((fence, pid))
        })();
        let (fence, pid) = match decoded {
            Ok(values) => values,
            Err(error) => {
                self.break_session(&session, &mut state, "unexpected acquire answer");
                self.forget_pending(hash);
                return Err(map_error("decoding the acquire answer", error));
            }
        };
        if pid != state.pid {
            // The lock (if granted) sits on a server session we do not own: dropping our
            // connection is all we can do (a pooler may keep that session, and the lock).
            let error = self.session_switched(&session, &mut state, pid);
            self.forget_pending(hash);
            return Err(error);
        }
        let Some(fence) = fence else {
            self.forget_pending(hash);
            // Another backend's deadline is known only to it; waiters hear the release.
            return Ok(Attempt::Held { expires_in: None });
        };
        let Ok(fence) = u64::try_from(fence) else {
            // Granted, but the sequence answered a negative number (setup checks only that
            // it increases; it may start below zero): dropping the session frees the lock.
            self.break_session(
                &session,
                &mut state,
                "fence sequence answered a negative value",
            );
            self.forget_pending(hash);
            return Err(LockError::backend_msg(
                BACKEND,
                format!("the fence sequence answered {fence}; fencing tokens must be positive"),
                false,
            ));
        };
        let first_on_session = state.ttls.is_empty();
        state.add_ttl(ttl_ms);
        state.timeout_set_ms = wanted;
        let lost_signal = state.lost.clone();
        let deadline = sent_at + ttl;
        let epoch = state.epoch;
        {
            let mut book = lock(&self.book);
            book.entries.insert(
                hash,
                Entry::Held(HeldLock {
                    key: key.clone(),
                    owner,
                    session: session.clone(),
                    epoch,
                    ttl_ms,
                    deadline,
                }),
            );
            if book.reaper_at.is_none_or(|at| deadline < at) {
                book.reaper_at = Some(deadline);
                self.reaper_wake.notify_one();
            }
        }
        drop(state);
        if first_on_session {
            // The heartbeat must probe this session within an interval from now; wake it only
            // if it plans to sleep longer (an idle one, or one waiting to turn off a lock-free
            // session's timeout), not for every lock in a busy loop.
            let due = Instant::now() + heartbeat_interval(ttl_ms);
            let mut planned = lock(&self.heartbeat_at);
            if planned.is_none_or(|at| at > due) {
                *planned = Some(due);
                self.heartbeat_wake.notify_one();
            }
        }
        Ok(Attempt::Acquired(
            Lease::new(key, owner, Some(FencingToken(fence)), ttl, sent_at)
                .with_lost_signal(lost_signal)
                .with_backend_data(Arc::new(LeaseKey(hash))),
        ))
    }

    /// Unlocks `held` on its session and wakes waiters. `Ok(false)` if its session is gone.
    /// After a failed statement the lock may still be held on the server with nothing in our
    /// books: a plain unlock follows, and if that fails too the session is dropped.
    /// `hash` is `held`'s advisory key (its book key).
    async fn unlock_op(
        &self,
        hash: i64,
        held: &HeldLock,
        in_flight: &AtomicBool,
    ) -> Result<bool, UnlockFailure> {
        let mut state = self
            .lock_session(&held.session)
            .await
            .map_err(UnlockFailure::NotSent)?;
        if state.epoch != held.epoch || state.conn.is_none() {
            return Ok(false);
        }
        state.remove_ttl(held.ttl_ms);
        let (high, low) = waiter_key(hash);
        // Locks left on the session: its timeout follows down to the largest of their TTLs.
        // None left: it stays as it is (see `SessionState::timeout_set_ms`).
        let remaining = state.max_ttl();
        let lower_to = (remaining != 0 && remaining != state.timeout_set_ms).then_some(remaining);
        let query = match lower_to {
            Some(timeout) => sqlx::query(UNLOCK_SQL)
                .bind(hash)
                .bind(high)
                .bind(low)
                .bind(&self.channel)
                .bind(held.key.as_str())
                .bind(timeout.to_string()),
            None => sqlx::query(UNLOCK_KEEP_TIMEOUT_SQL)
                .bind(hash)
                .bind(high)
                .bind(low)
                .bind(&self.channel)
                .bind(held.key.as_str()),
        };
        let _flight = InFlight::start(in_flight);
        let result = match state.conn.as_mut() {
            Some(conn) => tokio::time::timeout(self.config.op_timeout, query.fetch_one(conn)).await,
            None => Ok(Err(sqlx::Error::PoolClosed)),
        };
        // Local waiters need not wait for the NOTIFY round trip.
        self.hub.notify(held.key.as_str());
        let error = match result {
            Ok(Ok(row)) => {
                state.answered_at = Some(Instant::now());
                if let Some(timeout) = lower_to {
                    state.timeout_set_ms = timeout;
                }
                return match row.try_get::<bool, _>(0) {
                    Ok(true) => Ok(true),
                    // Our books say this session holds the lock: `false` means the statement
                    // ran in another server session (a pooler), or the lock was gone.
                    Ok(false) => self
                        .check_pid_after_false_unlock(&held.session, &mut state)
                        .await
                        .map(|()| false)
                        .map_err(UnlockFailure::Failed),
                    Err(error) => {
                        self.break_session(&held.session, &mut state, "unexpected release answer");
                        Err(UnlockFailure::Failed(map_error(
                            "decoding the release answer",
                            error,
                        )))
                    }
                };
            }
            Ok(Err(error)) if is_connection_error(&error) => {
                self.break_session(&held.session, &mut state, "release failed");
                return Err(UnlockFailure::Failed(map_error("release", error)));
            }
            Ok(Err(error)) => error,
            Err(_) => {
                self.break_session(&held.session, &mut state, "release timed out");
                return Err(UnlockFailure::Failed(timed_out(
                    "release",
                    self.config.op_timeout,
                )));
            }
        };
        // The statement failed, maybe before its unlock ran (a privilege or planning error):
        // unlock plainly, as the acquire undo does. `false` then means the failed statement
        // had unlocked already; either way the lock is free.
        let plain = sqlx::query("SELECT pg_advisory_unlock($1), pg_backend_pid()").bind(hash);
        let answer = match state.conn.as_mut() {
            Some(conn) => tokio::time::timeout(self.config.op_timeout, plain.fetch_one(conn)).await,
            None => Ok(Err(sqlx::Error::PoolClosed)),
        };
        match answer.map(|row| row.and_then(|row| row.try_get::<i32, _>(1))) {
            Ok(Ok(pid)) if pid == state.pid => {
                tracing::warn!(key = %held.key, %error, "release statement failed; unlocked plainly (no NOTIFY: remote waiters poll)");
                Ok(true)
            }
            _ => {
                self.break_session(
                    &held.session,
                    &mut state,
                    "release failed and the plain unlock too",
                );
                Err(UnlockFailure::Failed(map_error("release", error)))
            }
        }
    }

    async fn renew_op(
        self: Arc<Self>,
        lease: Lease,
        ttl: Duration,
        sent_at: Instant,
    ) -> Result<Lease, LockError> {
        let key = lease.key().clone();
        let hash = lease_advisory_key(&self.config.namespace, &lease);
        let lost = |reason: &str| LockError::lost(key.as_str(), reason);
        let held = match lock(&self.book).entries.get(&hash) {
            Some(Entry::Held(held)) if held.owner == lease.owner() && held.key == key => {
                if held.deadline <= sent_at {
                    return Err(lost("the lease expired before it was renewed"));
                }
                held.clone()
            }
            _ => return Err(lost("this backend does not hold the key for this owner")),
        };
        let new_ttl = ttl_ms(ttl);
        // A busy session is retryable: the watchdog tries again before the deadline.
        let mut state = self.lock_session(&held.session).await?;
        if state.epoch != held.epoch || state.conn.is_none() {
            return Err(lost("its holder session was lost"));
        }
        let wanted = state.max_ttl().max(new_ttl);
        let query = sqlx::query(RENEW_SQL).bind(wanted.to_string());
        let result = match state.conn.as_mut() {
            Some(conn) => tokio::time::timeout(self.config.op_timeout, query.fetch_one(conn)).await,
            None => Ok(Err(sqlx::Error::PoolClosed)),
        };
        if matches!(result, Ok(Ok(_))) {
            state.answered_at = Some(Instant::now());
            state.timeout_set_ms = wanted;
        }
        match result {
            Ok(Ok(row)) => match row.try_get::<i32, _>(1) {
                Ok(pid) if pid == state.pid => {}
                Ok(pid) => {
                    let error = self.session_switched(&held.session, &mut state, pid);
                    return Err(LockError::lost(key.as_str(), error.to_string()));
                }
                Err(error) => {
                    self.break_session(&held.session, &mut state, "unexpected renew answer");
                    return Err(LockError::lost(
                        key.as_str(),
                        format!("its holder session gave an unexpected answer: {error}"),
                    ));
                }
            },
            Ok(Err(error)) if is_connection_error(&error) => {
                self.break_session(&held.session, &mut state, "renew failed");
                return Err(LockError::lost(
                    key.as_str(),
                    format!("its holder session was lost: {error}"),
                ));
            }
            Ok(Err(error)) => return Err(map_error("renew", error)),
            Err(_) => {
                self.break_session(&held.session, &mut state, "renew timed out");
                return Err(lost("its holder session stopped answering"));
            }
        }
        // Only now move the deadline, and only if the reaper did not take the lock meanwhile.
        let mut book = lock(&self.book);
        match book.entries.get_mut(&hash) {
            Some(Entry::Held(entry))
                if entry.owner == lease.owner() && entry.epoch == held.epoch =>
            {
                if entry.ttl_ms != new_ttl {
                    state.remove_ttl(entry.ttl_ms);
                    state.add_ttl(new_ttl);
                    entry.ttl_ms = new_ttl;
                }
                entry.deadline = sent_at + ttl;
                Ok(lease.renewed(ttl, sent_at))
            }
            _ => Err(lost("the lease expired while it was being renewed")),
        }
    }

    /// Makes sure the release listener runs, or is being started by a background task, and
    /// waits for it until `deadline`. `false`: not (yet) listening; the caller polls. A slow
    /// or unreachable server never holds a subscriber past its budget, and subscribers do not
    /// queue behind each other's connect attempts.
    async fn ensure_listener(self: &Arc<Self>, deadline: Instant) -> bool {
        let mut ready = {
            let mut phase = lock(&self.listener);
            match &*phase {
                ListenerPhase::Up(_) => return true,
                ListenerPhase::Starting(ready) => ready.clone(),
                ListenerPhase::Down => {
                    let (tx, rx) = tokio::sync::watch::channel(false);
                    *phase = ListenerPhase::Starting(rx.clone());
                    tokio::spawn(start_listener(self.clone(), tx));
                    rx
                }
            }
        };
        matches!(
            timeout_at(deadline, ready.wait_for(|up| *up)).await,
            Ok(Ok(_))
        )
    }

    /// Marks this backend's interest in releases of `key` on the server (a shared lock on the
    /// waiter key), so releasers send a NOTIFY. Resolves once the mark is in place, also when
    /// another subscriber's mark of the key is still in flight (commands run in order), or at
    /// `deadline`.
    async fn register_waiter(&self, key: &str, deadline: Instant) -> Result<(), LockError> {
        let Some(tx) = self.waiter_tx.get() else {
            return Err(LockError::backend_msg(
                BACKEND,
                "no waiter connection",
                true,
            ));
        };
        let (ack, done) = tokio::sync::oneshot::channel();
        tx.send(WaiterCommand::Mark(key.to_owned(), ack))
            .map_err(|_| {
                LockError::backend_msg(BACKEND, "the waiter connection task ended", true)
            })?;
        match timeout_at(deadline, done).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(LockError::backend_msg(
                BACKEND,
                "the waiter connection task ended",
                true,
            )),
            Err(_) => Err(timed_out("marking a waiter", SUBSCRIBE_BUDGET)),
        }
    }
}

/// Connects the release listener and starts its tasks (see [`Inner::ensure_listener`]).
async fn start_listener(inner: Arc<Inner>, ready: tokio::sync::watch::Sender<bool>) {
    let app = &inner.config.application_name;
    let listen_options = inner
        .options
        .clone()
        .application_name(&format!("{app}-listener"));
    let waiter_options = inner
        .options
        .clone()
        .application_name(&format!("{app}-waiter"));
    let timeout = inner.config.connect_timeout;
    let work = async {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(listen_options)
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(&inner.channel).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    let result = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(listener)) => Ok(listener),
        Ok(Err(error)) => Err(map_error("starting the release listener", error)),
        Err(_) => Err(timed_out("starting the release listener", timeout)),
    };
    let mut phase = lock(&inner.listener);
    match result {
        Ok(listener) if !inner.closed.load(Ordering::SeqCst) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let _ = inner.waiter_tx.set(tx);
            *phase = ListenerPhase::Up(Listening {
                listen: tokio::spawn(listen_loop(listener, inner.hub.clone())),
                waiters: tokio::spawn(waiter_loop(
                    rx,
                    waiter_options,
                    inner.config.namespace.clone(),
                    timeout,
                    inner.hub.clone(),
                )),
            });
            let _ = ready.send(true);
        }
        // The backend was dropped meanwhile: nobody would stop these tasks.
        Ok(_) => *phase = ListenerPhase::Down,
        Err(error) => {
            // Dropping `ready` tells the subscribers waiting; the next subscribe retries.
            tracing::warn!(%error, "no release listener; waiters fall back to polling");
            *phase = ListenerPhase::Down;
        }
    }
}

/// Where the release listener is.
#[derive(Debug)]
enum ListenerPhase {
    Down,
    /// A task is connecting it; the flag turns true when it runs.
    Starting(tokio::sync::watch::Receiver<bool>),
    Up(Listening),
}

/// The background tasks that deliver release notifications.
#[derive(Debug)]
struct Listening {
    listen: JoinHandle<()>,
    waiters: JoinHandle<()>,
}

#[derive(Debug)]
enum WaiterCommand {
    /// Make sure the key's shared waiter lock is held (a subscription exists).
    Mark(String, tokio::sync::oneshot::Sender<Result<(), LockError>>),
    /// Drop it if no subscription of the key is left.
    Forget(String),
}

/// Takes the shared waiter lock of `pair` without queueing: a releaser holds the same pair
/// exclusively only for the instant of its release statement, so a refusal is retried
/// shortly (that release itself happened before our next attempt, which sees it).
async fn try_mark(
    conn: &mut PgConnection,
    pair: (i32, i32),
    deadline: Instant,
) -> Result<(), LockError> {
    loop {
        let query = sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock_shared($1, $2)")
            .bind(pair.0)
            .bind(pair.1)
            .fetch_one(&mut *conn);
        let marked = timeout_at(deadline, query)
            .await
            .map_err(|_| timed_out("marking a waiter", SUBSCRIBE_BUDGET))?
            .map_err(|error| map_error("marking a waiter", error))?;
        if marked {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(timed_out("marking a waiter", SUBSCRIBE_BUDGET));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Owns the waiter connection: holds a shared lock on the waiter key of every key this
/// backend has subscriptions for, reconciling each command with the hub (the truth about
/// who waits), so marks and forgets that cross each other never leave a waiting key unmarked.
/// After the connection fails, the next command reconnects and marks every key again.
async fn waiter_loop(
    mut commands: tokio::sync::mpsc::UnboundedReceiver<WaiterCommand>,
    options: PgConnectOptions,
    namespace: String,
    timeout: Duration,
    hub: ReleaseHub,
) {
    let mut conn: Option<PgConnection> = None;
    // Keys that should be marked; when `conn` is there, all of them are marked on it.
    let mut marked: std::collections::HashSet<String> = std::collections::HashSet::new();
    let pair = |key: &str| waiter_key(advisory_key(&namespace, key));
    while let Some(command) = commands.recv().await {
        let deadline = Instant::now() + timeout;
        match command {
            WaiterCommand::Mark(key, ack) => {
                let result = async {
                    if !hub.has_waiters(&key) {
                        return Ok(());
                    }
                    if conn.is_none() {
                        let mut fresh = timeout_at(deadline, options.connect())
                            .await
                            .map_err(|_| timed_out("connecting the waiter session", timeout))?
                            .map_err(|error| map_error("connecting the waiter session", error))?;
                        marked.retain(|key| hub.has_waiters(key));
                        for key in marked.iter() {
                            try_mark(&mut fresh, pair(key), deadline).await?;
                        }
                        conn = Some(fresh);
                    }
                    if !marked.contains(&key)
                        && let Some(live) = conn.as_mut()
                    {
                        try_mark(live, pair(&key), deadline).await?;
                        marked.insert(key.clone());
                    }
                    Ok(())
                }
                .await;
                if result.is_err() {
                    // Unknown state: start over on a fresh session next time.
                    conn = None;
                }
                let _ = ack.send(result);
            }
            WaiterCommand::Forget(key) => {
                if !marked.contains(&key) || hub.has_waiters(&key) {
                    continue;
                }
                marked.remove(&key);
                let Some(live) = conn.as_mut() else {
                    continue;
                };
                let (high, low) = pair(&key);
                let query = sqlx::query("SELECT pg_advisory_unlock_shared($1, $2)::text")
                    .bind(high)
                    .bind(low)
                    .execute(live);
                if !matches!(timeout_at(deadline, query).await, Ok(Ok(_))) {
                    conn = None;
                }
            }
        }
    }
}

async fn listen_loop(mut listener: PgListener, hub: ReleaseHub) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => hub.notify(notification.payload()),
            Ok(None) => {
                // Reconnected: releases in between were missed, so every waiter tries again.
                tracing::debug!("release listener reconnected");
                hub.notify_all();
            }
            Err(error) => {
                tracing::warn!(%error, "release listener failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                hub.notify_all();
            }
        }
    }
}

/// Unlocks locks whose renewal did not arrive before their deadline (a guard leaked or a
/// watchdog stopped while this process keeps running).
async fn reaper(inner: Arc<Inner>) {
    loop {
        let now = Instant::now();
        let (expired, next) = {
            let mut book = lock(&inner.book);
            let mut expired = Vec::new();
            let mut next: Option<Instant> = None;
            for (hash, entry) in book.entries.iter_mut() {
                match entry {
                    Entry::Held(held) if held.deadline <= now => {
                        // Pending while the unlock runs: no local acquire may take the key
                        // on the same (reentrant) session before it.
                        if let Entry::Held(held) = std::mem::replace(entry, Entry::Pending) {
                            expired.push((*hash, held));
                        }
                    }
                    Entry::Held(held) => {
                        next = Some(next.map_or(held.deadline, |at| at.min(held.deadline)));
                    }
                    Entry::Pending => {}
                }
            }
            // Nothing held: wake at the idle tick anyway, so that an acquire (its deadline
            // is later than the tick for any TTL above it) need not wake this task: in a
            // tight acquire/release loop that would cost a cross-thread wake-up per lock.
            book.reaper_at = Some(next.unwrap_or(now + REAPER_IDLE_TICK));
            (expired, next)
        };
        for (hash, held) in expired {
            tracing::debug!(key = %held.key, "lease expired without renewal; unlocking");
            let inner = inner.clone();
            tokio::spawn(async move {
                let in_flight = Arc::new(AtomicBool::new(false));
                if let Err(error) = inner.release_held(hash, held, in_flight).await {
                    tracing::warn!(%error, "unlocking an expired lease failed");
                }
            });
        }
        let wake = next.unwrap_or(now + REAPER_IDLE_TICK);
        tokio::select! {
            _ = sleep_until(wake) => {}
            _ = inner.reaper_wake.notified() => {}
        }
    }
}

/// Probes every holder session that holds locks, every [`heartbeat_interval`] of its
/// smallest TTL: a session the server ended (terminate, restart, failover) frees all its
/// locks at once, and the probe lets its guards know within the interval instead of at their
/// next renewal (T/3). A session busy with a statement is skipped: that statement is the probe.
async fn heartbeat(inner: Arc<Inner>) {
    loop {
        let now = Instant::now();
        let sessions: Vec<Arc<Session>> = lock(&inner.sessions).clone();
        // The plan is locked through the scan, so that a first lock either is seen by the
        // scan or sees the plan it makes.
        let (next, probes, resets) = {
            let mut planned = lock(&inner.heartbeat_at);
            let mut next: Option<Instant> = None;
            let mut probes = Vec::new();
            let mut resets = Vec::new();
            for session in &sessions {
                let Ok(state) = session.state.try_lock() else {
                    // Busy: its statement is the probe. Look again within the longest interval.
                    plan(&mut next, now + HEARTBEAT_MAX);
                    continue;
                };
                if state.conn.is_none() {
                    continue;
                }
                let Some(&min_ttl) = state.ttls.keys().next() else {
                    // No lock left, but the timeout of the last one still runs: turn it off
                    // before the server ends the idle session (at half of it).
                    if state.timeout_set_ms > 0 {
                        let due = state.answered_at.map_or(now, |at| {
                            at + Duration::from_millis(state.timeout_set_ms / 2)
                        });
                        if due <= now {
                            resets.push(inner.turn_off_timeout(session, state));
                            plan(&mut next, now + HEARTBEAT_MAX);
                        } else {
                            plan(&mut next, due);
                        }
                    }
                    continue;
                };
                let every = heartbeat_interval(min_ttl);
                // Any statement answered within the interval proved the session alive: a
                // session in steady use is never probed, and a lock just taken is not probed
                // at once (that probe would hold the session while its release waits).
                let due = state.answered_at.map_or(now, |at| at + every);
                if due <= now {
                    probes.push(inner.probe(session, state));
                    plan(&mut next, now + every);
                } else {
                    plan(&mut next, due);
                }
            }
            *planned = next;
            (next, probes, resets)
        };
        futures::future::join(
            futures::future::join_all(probes),
            futures::future::join_all(resets),
        )
        .await;
        match next {
            Some(at) => {
                tokio::select! {
                    _ = sleep_until(at) => {}
                    _ = inner.heartbeat_wake.notified() => {}
                }
            }
            // Nothing held: sleep until an acquire wakes us.
            None => inner.heartbeat_wake.notified().await,
        }
    }
}

/// Moves the heartbeat's next wake-up to `at` if that is earlier.
fn plan(next: &mut Option<Instant>, at: Instant) {
    *next = Some(next.map_or(at, |next| next.min(at)));
}

type OpFuture<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, LockError>> + Send>>;

/// Runs `work` in place, but if the caller drops it before it finishes, the rest runs on a
/// task: a statement is never cut off mid-protocol on a shared session, and a lock granted
/// meanwhile is handed to `on_orphan` (which gives it back). No task or thread hop in the
/// common case.
///
/// Dropped where no runtime can finish it, the work is dropped and `on_abandon` settles what
/// it leaves behind (a `Pending` book entry, a statement in flight on a session).
struct Detached<T: Send + 'static> {
    work: Option<OpFuture<T>>,
    on_orphan: Option<Box<dyn FnOnce(T) + Send>>,
    on_abandon: Option<Box<dyn FnOnce() + Send>>,
}

fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, LockError>> + Send + 'static,
    on_orphan: impl FnOnce(T) + Send + 'static,
    on_abandon: impl FnOnce() + Send + 'static,
) -> Detached<T> {
    Detached {
        work: Some(Box::pin(work)),
        on_orphan: Some(Box::new(on_orphan)),
        on_abandon: Some(Box::new(on_abandon)),
    }
}

impl<T: Send + 'static> std::future::Future for Detached<T> {
    type Output = Result<T, LockError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(work) = self.work.as_mut() else {
            return std::task::Poll::Ready(Err(LockError::backend_msg(
                BACKEND,
                "operation polled after completion",
                false,
            )));
        };
        let output = std::task::ready!(work.as_mut().poll(cx));
        self.work = None;
        std::task::Poll::Ready(output)
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let (Some(work), Some(on_orphan)) = (self.work.take(), self.on_orphan.take()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to finish it on: settle its traces while the work (and its
            // in-flight mark) still exists, then drop it.
            if let Some(on_abandon) = self.on_abandon.take() {
                on_abandon();
            }
            drop(work);
            return;
        };
        runtime.spawn(async move {
            if let Ok(orphan) = work.await {
                on_orphan(orphan);
            }
        });
    }
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
            match book.entries.get(&hash) {
                // Ours already (or being acquired): a session would grant it again, so we
                // answer for it, like any other holder.
                Some(Entry::Held(held)) => {
                    return Ok(Attempt::Held {
                        expires_in: Some(held.deadline.saturating_duration_since(sent_at)),
                    });
                }
                Some(Entry::Pending) => return Ok(Attempt::Held { expires_in: None }),
                None => {
                    book.entries.insert(hash, Entry::Pending);
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
                abandon_inner.forget_pending(hash);
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
        let in_flight = Arc::new(AtomicBool::new(false));
        let abandon = {
            let inner = self.inner.clone();
            let held = held.clone();
            let in_flight = in_flight.clone();
            move || {
                if in_flight.load(Ordering::SeqCst) {
                    // The unlock may or may not have run: dropping the session frees it.
                    inner.abandon(&held.session, &in_flight);
                    inner.forget_pending(hash);
                } else {
                    inner.restore_held(hash, held);
                }
            }
        };
        let unlocked = detached(
            self.inner.clone().release_held(hash, held, in_flight),
            |_| {},
            abandon,
        )
        .await?;
        Ok(unlocked && still_valid)
    }

    async fn subscribe(&self, key: &LockKey) -> Result<Releases, LockError> {
        // The client subscribes before each attempt, under its own wait deadline, which we do
        // not see: never spend more than a short budget here. Past it, the subscription still
        // hears local releases and the client's backoff bounds the rest.
        let deadline = Instant::now() + SUBSCRIBE_BUDGET.min(self.inner.config.op_timeout);
        let releases = self.inner.hub.subscribe(key.as_str());
        if !self.inner.ensure_listener(deadline).await {
            tracing::debug!(key = %key, "release listener not up yet; this waiter polls");
            return Ok(releases);
        }
        // Every subscriber waits for the key's mark, also one another subscriber started:
        // a release before the mark is in place sends no NOTIFY.
        if let Err(error) = self.inner.register_waiter(key.as_str(), deadline).await {
            tracing::debug!(%error, key = %key, "waiter not marked; it falls back to polling");
        }
        Ok(releases)
    }

    fn capabilities(&self) -> Capabilities {
        let mut capabilities = Capabilities::default();
        capabilities.fencing = true;
        capabilities.release_notifications = true;
        capabilities.fair_queue = false;
        capabilities.min_ttl = MIN_TTL;
        capabilities.ttl_granularity = Duration::from_millis(1);
        // Covers the reaper (process alive, lease not renewed). A stalled or partitioned
        // process keeps its locks until its session's idle_session_timeout fires: the largest
        // TTL on that session after its last statement, up to T/3 past a lease's deadline with
        // the watchdog on (more when TTL classes share a session). One fixed Duration cannot
        // say that; see the README, "TTL semantics".
        capabilities.expiry_slack = Duration::from_millis(250);
        capabilities
    }
}

/// The advisory key of a lease this backend granted, kept in the lease so that renew and
/// release need not hash the key again (the HKDF costs about as much as the rest of the
/// client's bookkeeping for a call).
#[derive(Debug)]
struct LeaseKey(i64);

/// The lease's advisory key: the one kept in it, or (a lease built elsewhere) hashed anew. A
/// wrong one finds no book entry with this owner and key, so it can do no harm.
fn lease_advisory_key(namespace: &str, lease: &Lease) -> i64 {
    lease.backend_data::<LeaseKey>().map_or_else(
        || advisory_key(namespace, lease.key().as_str()),
        |key| key.0,
    )
}

/// Takes the lease's book entry for a release: `Pending` until the unlock settles. `None`
/// when the lease is not ours (any more). The flag says whether it was still valid.
fn begin_release(inner: &Inner, lease: &Lease) -> Option<(i64, HeldLock, bool)> {
    let hash = lease_advisory_key(&inner.config.namespace, lease);
    let now = Instant::now();
    let mut book = lock(&inner.book);
    let entry = book.entries.get_mut(&hash)?;
    match entry {
        Entry::Held(held) if held.owner == lease.owner() && held.key == *lease.key() => {
            let still_valid = held.deadline > now;
            match std::mem::replace(entry, Entry::Pending) {
                Entry::Held(held) => Some((hash, held, still_valid)),
                Entry::Pending => None,
            }
        }
        _ => None,
    }
}

/// Releases a lease from a task (the orphan path: nobody waits for the answer).
async fn release_lease(inner: Arc<Inner>, lease: Lease) -> Result<bool, LockError> {
    let Some((hash, held, still_valid)) = begin_release(&inner, &lease) else {
        return Ok(false);
    };
    let in_flight = Arc::new(AtomicBool::new(false));
    let unlocked = inner.release_held(hash, held, in_flight).await?;
    Ok(unlocked && still_valid)
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

    /// The cache in front of the HKDF answers exactly what the hash does, in the backend's
    /// namespace, and starts over instead of growing past its capacity.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_advisory_keys_match_the_hash_and_stay_bounded() -> Result<()> {
        let backend = one_session_backend().await?;
        let namespace = backend.config().namespace.clone();
        ensure!(!namespace.is_empty(), "the default namespace is not empty");
        for round in 0..2 {
            for n in 0..KEY_CACHE_CAPACITY + 100 {
                let key = LockKey::new(format!("order-{n}"))?;
                let expected = advisory_key(&namespace, key.as_str());
                ensure!(
                    backend.advisory_key(&key) == expected,
                    "round {round}: cached key of {key} differs from the hash"
                );
                ensure!(expected != advisory_key("", key.as_str()));
            }
            let cached = lock(&backend.inner.key_cache).len();
            ensure!(cached <= KEY_CACHE_CAPACITY, "cache grew to {cached}");
        }
        Ok(())
    }

    /// There is no PgBouncer on this machine. A pooler switching server sessions under a
    /// connection is simulated by making our record of the session's pid wrong: the real
    /// acquire statement then answers with another `pg_backend_pid()`, and the backend must
    /// refuse (InvalidConfig naming PgBouncer), undo nothing it cannot see, drop the session
    /// (its leases' lost signal fires) and leave the key free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statement_on_another_server_session_is_refused() -> Result<()> {
        let backend = one_session_backend().await?;
        let ttl = Duration::from_secs(10);
        let first = LockKey::new(format!("pid-a-{:x}", rand::random::<u64>()))?;
        let held = backend
            .try_acquire(&first, ttl)
            .await?
            .into_lease()
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
        let lease = backend
            .try_acquire(&key, ttl)
            .await?
            .into_lease()
            .context("key not free")?;
        unlock_behind(&lease).await?;
        ensure!(
            !backend.release(&lease).await?,
            "release of a lock the session no longer held answered true"
        );
        let lease = backend
            .try_acquire(&key, ttl)
            .await?
            .into_lease()
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
