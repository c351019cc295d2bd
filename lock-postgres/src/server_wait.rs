//! Waiting on the server (#13): a waiter of a plain lock blocks in `pg_advisory_lock` on a
//! *queue session* of its own, so the server grants it the lock the moment the holder lets go
//! (an unlock, or the end of the holder's session), as it does for its own blocking clients:
//! no NOTIFY, wake-up and attempt in between.
//!
//! - **Bounded.** At most [`PostgresConfig::queue_sessions`] connections per backend
//!   (`<app>-holder`, with an alive key like every holder session), one waiter each. A queue
//!   session is free while it holds nothing; once granted, it holds that lock like a holder
//!   session (renew, release, reaper, heartbeat, lost signal: the same code, through the
//!   lease's book entry) and is free again after its release. Waiters that find none free wait
//!   for release signals, as before.
//! - **Nothing else on the connection.** A session that waits holds no lock, so the wait can
//!   be cut off at any time by dropping its connection, and it cannot deadlock.
//! - **Bounded waits.** The statement sets `lock_timeout` to the client's wait step (the
//!   server answers "lock not available" at its end; after each step the client tries on a
//!   holder session, as it would after a backoff step) and the answer is awaited at most a
//!   little longer; then the connection is dropped. A lock timeout that fires just as the
//!   server grants the lock fails the statement with the lock held (a session lock outlives
//!   the rollback): every such answer is followed by an unlock of the key on the session
//!   (the conformance case `lock_all_never_deadlocks_or_overlaps` found this: a free queue
//!   session kept the lock, and every waiter starved).
//! - **Cancel-safe.** The connection is taken out of the session while the statement runs: a
//!   waiter that goes away drops it, and the server, which checks a waiting client's socket
//!   every [`CLIENT_CHECK_MS`] (`client_connection_check_interval`, set at connect), ends the
//!   wait (or frees a lock granted just before).
//! - **No waiter mark.** A waiter that will wait here subscribes without marking the key
//!   ([`LockBackend::subscribe_server_waiter`]), so its holder's release sends no NOTIFY:
//!   the NOTIFY's commit and the listeners it wakes cost a hand-off about as much again as
//!   the server's own queue. A waiter that finds no queue session to wait on (all taken, a
//!   failure) marks the key then and tries once more before it waits for release signals
//!   ([`PostgresBackend`]'s `wait_on_server`); a key held, being acquired or waited for on
//!   the server in this process needs no mark, as in `subscribe`: what comes of that wakes
//!   the waiter (the local release; an attempt or a wait on the server that ends without the
//!   lock wakes the key's waiters too, see `Book::waited_behind` and [`WaitingEntry`]).
//! - **No blocker.** The server grants a queued waiter the lock when the holder's session
//!   ends, so a key with a waiter subscribed to wait here arms no blocker (`blocker.rs`).
//! - **TTL from the grant.** The server starts the session's `idle_session_timeout` (the lock's
//!   TTL) when the statement ends, which may be long after it was sent. The statement reports
//!   how long it ran by the server's clock; the lease counts from the send plus that, which
//!   is no later than the server's start. A run longer than the time we waited for the answer
//!   (a server clock that jumped forward) is not believed, and the lease counts from the send:
//!   counting from the answer instead would date it after the server's start, by however long
//!   this process was stalled before it read the answer. A process paused after the grant thus
//!   finds its lease as old as the server's, never younger.

use super::*;

/// Queue sessions per backend by default ([`PostgresConfig::queue_sessions`]).
pub const QUEUE_SESSIONS: usize = 4;

/// Most queue sessions a backend may be configured with.
pub const MAX_QUEUE_SESSIONS: usize = 64;

/// `client_connection_check_interval` on queue sessions: how soon the server ends the wait of
/// a client that went away.
pub(crate) const CLIENT_CHECK_MS: u64 = 100;

/// Queue sessions' ids start here (holder sessions count from 0): book entries name their
/// session by id.
const QUEUE_SESSION_IDS: usize = 1 << 20;

/// How much longer than its `lock_timeout` a waiting statement's answer may take before the
/// connection is dropped.
const ANSWER_SLACK: Duration = Duration::from_millis(500);

/// Waits for the lock (`$1`) under `lock_timeout` = `$4` ms (local to the statement), then
/// takes a fence from the sequence `$3` and sets `idle_session_timeout` to `$2` ms, and
/// reports how long the statement ran (µs, server clock, read after the grant). Subqueries
/// with OFFSET 0 run in order, innermost first: the setting, the lock, the fence. The answer's
/// first columns and the WAL flush are the acquire's (`grant_sql!` in `ops.rs`).
pub(crate) const WAIT_SQL: &str = grant_sql!(
    ", set_config('idle_session_timeout', $2, false), \
     (extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000000)::int8",
    "(SELECT nextval($3::regclass) AS f FROM \
       (SELECT pg_advisory_lock($1) FROM \
         (SELECT set_config('lock_timeout', $4, true) OFFSET 0) t OFFSET 0) l OFFSET 0) g"
);

/// SQLSTATEs of a wait that ended without the lock: `lock_not_available` (the lock timeout)
/// and `query_canceled`.
fn ended_without_lock(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("55P03" | "57014")))
}

/// How a wait on the server ended (see [`Inner::wait_on_server`]).
pub(crate) enum ServerWait {
    /// The server granted the lock.
    Granted(Lease),
    /// Waited until the step's end (or too little of the step was left to wait): the client
    /// tries again next.
    Waited,
    /// The key is held, being acquired or waited for on the server by this process: what
    /// comes of that wakes the waiter (a release here, or that attempt or wait ending
    /// without the lock, wakes the local waiters).
    Local,
    /// Could not wait on the server: the waiter waits for release signals.
    NotThere,
}

/// Most keys remembered in [`Inner::unmarked_server_waiters`] before the ones nobody waits
/// for any more are dropped.
const UNMARKED_CAPACITY: usize = 1024;

/// Takes a waiter's [`Entry::Waiting`] out of the book when its wait ends, however it ends
/// (a grant has replaced it with the lease's entry by then).
///
/// A wait that ends without the lock (cancelled, timed out, its connection lost) wakes the
/// key's other local waiters: they waited for signals because this one was on the server
/// ([`ServerWait::Local`]), their key is unmarked, so no NOTIFY will come; woken, one of
/// them takes the place on the server (or marks the key) instead of sleeping until its
/// next backoff step.
struct WaitingEntry<'a> {
    inner: &'a Inner,
    key: &'a LockKey,
    hash: i64,
}

impl Drop for WaitingEntry<'_> {
    fn drop(&mut self) {
        let ended_without_lock = {
            let mut book = lock(&self.inner.book);
            let waiting = matches!(
                book.entries.get(&BookKey::Lock(self.hash)),
                Some(Entry::Waiting)
            );
            if waiting {
                book.entries.remove(&BookKey::Lock(self.hash));
            }
            waiting
        };
        if ended_without_lock {
            self.inner.hub.notify(self.key.as_str());
        }
    }
}

impl Inner {
    /// A waiter of `key` subscribed without a waiter mark.
    pub(crate) fn note_unmarked_server_waiter(&self, key: &LockKey) {
        let mut keys = lock(&self.unmarked_server_waiters);
        if keys.len() >= UNMARKED_CAPACITY {
            keys.retain(|key| self.hub.has_waiters(key));
        }
        keys.insert(key.as_str().to_owned());
    }

    /// Whether a waiter of `key` subscribed to wait on the server (and has not fallen back
    /// to release signals).
    pub(crate) fn has_unmarked_server_waiter(&self, key: &LockKey) -> bool {
        lock(&self.unmarked_server_waiters).contains(key.as_str())
    }

    /// Whether `key` may have a waiter without its mark (forgotten here: the caller marks it).
    pub(crate) fn take_unmarked_server_waiter(&self, key: &LockKey) -> bool {
        lock(&self.unmarked_server_waiters).remove(key.as_str())
    }

    /// A queue session that holds nothing and is not in use, locked for the caller; a new
    /// one while fewer than the configured number exist. `None` when all are taken.
    fn claim_queue_session(&self) -> Option<Arc<Session>> {
        let mut sessions = lock(&self.queue_sessions);
        for session in sessions.iter() {
            if let Ok(state) = session.state.try_lock()
                && state.ttls.is_empty()
                && state.holds.is_empty()
            {
                drop(state);
                return Some(session.clone());
            }
        }
        if sessions.len() >= self.config.queue_sessions {
            return None;
        }
        let session = Session::new(
            QUEUE_SESSION_IDS + sessions.len(),
            0,
            self.config.probe_timeout,
        );
        sessions.push(session.clone());
        Some(session)
    }

    /// See [`LockBackend::wait_on_server`]: waits for `key` on a queue session until `until`.
    pub(crate) async fn wait_on_server(
        self: Arc<Self>,
        key: &LockKey,
        ttl: Duration,
        until: Instant,
    ) -> Result<ServerWait, LockError> {
        // Whole milliseconds left (0 would mean no lock timeout at all): checked before a
        // queue session is claimed, and again after connecting it.
        let step_ms = || until.saturating_duration_since(Instant::now()).as_millis();
        if self.config.queue_sessions == 0 {
            return Ok(ServerWait::NotThere);
        }
        if step_ms() < 2 {
            return Ok(ServerWait::Waited);
        }
        let Some(session) = self.claim_queue_session() else {
            return Ok(ServerWait::NotThere);
        };
        // Claimed above, but another waiter may have taken it since: then wait for signals.
        let Some(mut state) = self.try_lock_session(&session) else {
            return Ok(ServerWait::NotThere);
        };
        if !state.ttls.is_empty() || !state.holds.is_empty() {
            return Ok(ServerWait::NotThere);
        }
        // Connected before the key's book entry is taken: local attempts of the key must not
        // be told "held" while we connect.
        if state.conn.is_none() {
            self.connect_queue_session(&mut state).await?;
        }
        // At most what `lock_timeout` takes (2^31 - 1 ms): a longer wait ends in an attempt
        // and another wait.
        let step_ms = step_ms().min(i32::MAX as u128);
        if step_ms < 2 {
            return Ok(ServerWait::Waited);
        }
        let hash = self.advisory_key(key);
        // One waiter per key and backend on the server, and no local attempt of the key
        // meanwhile (see `Entry::Waiting`); a key this backend holds, is acquiring or waits
        // for on the server is left to its local wake-up (as `subscribe` leaves it unmarked).
        {
            let mut book = lock(&self.book);
            match book.entries.get(&BookKey::Lock(hash)) {
                // An attempt in flight: if it ends without the lock, `forget_pending` wakes us.
                Some(Entry::Pending) => {
                    if book.waited_behind.len() >= WAITED_BEHIND_CAPACITY {
                        book.waited_behind.clear();
                    }
                    book.waited_behind.insert(hash, key.clone());
                    return Ok(ServerWait::Local);
                }
                Some(_) => return Ok(ServerWait::Local),
                None => {}
            }
            book.entries.insert(BookKey::Lock(hash), Entry::Waiting);
        }
        let _waiting = WaitingEntry {
            inner: &self,
            key,
            hash,
        };
        let ttl_ms = ttl_ms(ttl);
        let timeout_ms = ttl_ms + TIMEOUT_PAD.as_millis() as u64;
        let fence_oid = Oid(self.fence_oid.load(Ordering::Relaxed));
        let query = sqlx::query(WAIT_SQL)
            .bind(hash)
            .bind(timeout_ms.to_string())
            .bind(fence_oid)
            .bind(step_ms.to_string());
        // Out of the session while the statement runs: if this future is dropped, so is the
        // connection (see the module docs).
        let Some(mut conn) = state.conn.take() else {
            return Ok(ServerWait::NotThere);
        };
        let sent_at = Instant::now();
        let limit = Duration::from_millis(step_ms as u64) + ANSWER_SLACK;
        let answer = tokio::time::timeout(limit, query.fetch_one(&mut conn)).await;
        let answered_at = Instant::now();
        let row = match answer {
            Ok(Ok(row)) => row,
            Ok(Err(error)) if ended_without_lock(&error) => {
                tracing::trace!(key = %key, "wait on the server ended without the lock");
                // A lock timeout that fires as the lock is granted still fails the statement,
                // and the session keeps the lock (a session lock outlives the rollback): give
                // it back, or drop the connection, before the session counts as free.
                let undo = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(hash)
                    .fetch_one(&mut conn);
                match tokio::time::timeout(self.config.op_timeout, undo).await {
                    Ok(Ok(_)) => {
                        state.conn = Some(conn);
                        state.answered_at = Some(Instant::now());
                    }
                    _ => {
                        drop(conn);
                        state.disconnect();
                    }
                }
                return Ok(ServerWait::Waited);
            }
            Ok(Err(error)) => {
                // The lock may have been granted before the statement failed (a session lock
                // outlives the rollback): the session held nothing else, so dropping the
                // connection gives back whatever this statement took. Unless the connection
                // failed, unlocking everything on it does so at once.
                if is_connection_error(&error) {
                    tracing::debug!(%error, "waiting on the server failed; connection dropped");
                    drop(conn);
                    state.disconnect();
                    return Ok(ServerWait::NotThere);
                }
                state.conn = Some(conn);
                state.unlock_all_or_disconnect(self.config.op_timeout).await;
                return Err(map_error("waiting on the server", error));
            }
            Err(_) => {
                tracing::debug!(
                    ?limit,
                    "no answer to a wait on the server; connection dropped"
                );
                drop(conn);
                state.disconnect();
                return Ok(ServerWait::NotThere);
            }
        };
        state.conn = Some(conn);
        state.answered_at = Some(answered_at);
        let decoded = (|| {
            let fence: i64 = row.try_get(0)?;
            let pid: i32 = row.try_get(1)?;
            let ran_us: i64 = row.try_get(4)?;
            Ok::<_, sqlx::Error>((fence, pid, ran_us))
        })();
        let (fence, pid, ran_us) = match decoded {
            Ok(values) => values,
            Err(error) => {
                self.break_session(&session, &mut state, "unexpected answer to a wait");
                return Err(map_error("decoding the answer to a wait", error));
            }
        };
        if pid != state.pid {
            return Err(self.session_switched(&session, &mut state, pid));
        }
        let fence = self.checked_fence(&session, &mut state, fence)?;
        state.timeout_set_ms = timeout_ms;
        let valid_from = grant_valid_from(sent_at, answered_at, ran_us);
        let owner = OwnerToken::random();
        let held = HeldLock {
            key: key.clone(),
            shared: None,
            owner,
            session: session.clone(),
            epoch: state.epoch,
            ttl_ms,
            deadline: valid_from + ttl,
        };
        tracing::trace!(key = %key, session = session.id, ran_us, "granted on the server");
        let lost_signal = self.record_grant(state, BookKey::Lock(hash), held);
        Ok(ServerWait::Granted(
            Lease::new(
                key.clone(),
                owner,
                Some(FencingToken(fence)),
                ttl,
                valid_from,
            )
            .with_lost_signal(lost_signal),
        ))
    }

    /// Connects a queue session: a holder session that also lets the server check, while it
    /// waits, that we are still there.
    async fn connect_queue_session(&self, state: &mut SessionState) -> Result<(), LockError> {
        self.reconnect(state).await?;
        let Some(conn) = state.conn.as_mut() else {
            return Err(LockError::backend_msg(BACKEND, "no connection", true));
        };
        let set = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET client_connection_check_interval = {CLIENT_CHECK_MS}"
        )))
        .execute(conn);
        match tokio::time::timeout(self.config.op_timeout, set).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => {
                state.disconnect();
                Err(map_error("setting up a queue session", error))
            }
            Err(_) => {
                state.disconnect();
                Err(timed_out(
                    "setting up a queue session",
                    self.config.op_timeout,
                ))
            }
        }
    }
}

/// When a lease granted on the server starts, no later than the server's start of its TTL
/// (see the module docs): the send plus how long the statement ran by the server's clock
/// (`ran_us`), or the send itself when that run is longer than the time we waited for the
/// answer (the server's clock jumped) or negative (it went back).
fn grant_valid_from(sent_at: Instant, answered_at: Instant, ran_us: i64) -> Instant {
    let ran = Duration::from_micros(u64::try_from(ran_us).unwrap_or(0));
    if ran <= answered_at.saturating_duration_since(sent_at) {
        sent_at + ran
    } else {
        sent_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_counts_from_the_send_plus_the_servers_run() {
        let sent_at = Instant::now();
        let answered_at = sent_at + Duration::from_millis(900);
        assert_eq!(
            grant_valid_from(sent_at, answered_at, 800_000),
            sent_at + Duration::from_millis(800)
        );
        // The server's clock went back: the run reads negative.
        assert_eq!(grant_valid_from(sent_at, answered_at, -5), sent_at);
    }

    /// Finding (review, 2026-12-03): a run longer than our wait (the server's clock jumped
    /// forward) made the lease count from the answer's arrival, which is after the server's
    /// start by however long this process stalled before reading it: a lease younger than
    /// the server's. It counts from the send now.
    #[test]
    fn a_run_longer_than_the_wait_is_not_believed() {
        let sent_at = Instant::now();
        let answered_at = sent_at + Duration::from_millis(900);
        assert_eq!(grant_valid_from(sent_at, answered_at, 60_000_000), sent_at);
    }
}
