//! Holder sessions: the connections that hold the locks, how one is picked, locked, reconnected and
//! dropped.

use super::*;

/// The columns that count what a previous client left on this server session: its advisory
/// locks and prepared statements (append to a first statement's select list, so that a clean
/// session costs no round trip of its own).
pub(crate) const LEFTOVER_COUNTS: &str = "(SELECT count(*) FROM pg_locks WHERE locktype = \
     'advisory' AND pid = pg_backend_pid()), (SELECT count(*) FROM pg_prepared_statements)";

/// Whether a session's first answer (`row`, with [`LEFTOVER_COUNTS`] from column `first`)
/// shows leftovers, after which the caller runs `DISCARD ALL` ([`discard_leftovers`]) and
/// its settings again.
///
/// A pooler that puts server connections back without resetting them (PgBouncer in session
/// mode with an empty `server_reset_query`; its default, `DISCARD ALL`, resets them) hands the
/// next client the advisory locks its last client held when it disconnected, and its prepared
/// statements. Kept, such a lock could be taken by nobody else while this connection lives,
/// and our own acquire of its key would succeed without excluding anyone.
pub(crate) fn has_leftovers(
    row: &sqlx::postgres::PgRow,
    first: usize,
) -> Result<bool, sqlx::Error> {
    let locks: i64 = row.try_get(first)?;
    let prepared: i64 = row.try_get(first + 1)?;
    if locks == 0 && prepared == 0 {
        return Ok(false);
    }
    tracing::warn!(
        locks,
        prepared,
        "a new connection came with an earlier client's advisory locks or prepared \
         statements: a connection pooler in front of PostgreSQL hands server connections on \
         without resetting them (PgBouncer: set server_reset_query to DISCARD ALL, its \
         default); discarding them"
    );
    Ok(true)
}

/// `DISCARD ALL`: gives back every session lock and prepared statement, resets settings.
pub(crate) async fn discard_leftovers(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("DISCARD ALL").execute(conn).await?;
    Ok(())
}

/// Runs `settings` (a `SELECT` of `set_config` calls, simple protocol) as a connection's first
/// statement, with the leftover check in the same round trip; on a session that came with
/// leftovers, discards them and runs `settings` again.
pub(crate) async fn first_settings(
    conn: &mut PgConnection,
    settings: &str,
) -> Result<(), sqlx::Error> {
    let checked = format!("SELECT {LEFTOVER_COUNTS} FROM ({settings}) AS settings");
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(checked))
        .fetch_one(&mut *conn)
        .await?;
    if has_leftovers(&row, 0)? {
        discard_leftovers(conn).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(settings.to_owned()))
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// `pg_backend_pid()` through the simple query protocol (no prepared statement).
pub(crate) async fn backend_pid(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
    sqlx::raw_sql("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await?
        .try_get(0)
}

/// One connection's state, behind the session's async mutex (statements on a session are
/// serialized).
#[derive(Debug, Default)]
pub(crate) struct SessionState {
    pub(crate) conn: Option<PgConnection>,
    /// Bumped when the connection is dropped: leases granted on an older epoch are gone.
    pub(crate) epoch: u64,
    /// TTL (ms) → number of locks held on this session with that TTL (the smallest sets the
    /// heartbeat interval).
    pub(crate) ttls: BTreeMap<u64, usize>,
    pub(crate) pid: i32,
    /// Cancelled when this connection is dropped or found dead; every lease granted on it
    /// carries it ([`Lease::with_lost_signal`]), so its guards hear of the loss at once.
    pub(crate) lost: CancellationToken,
    /// When a statement on this connection last got its answer: a session that answered
    /// within the heartbeat interval needs no probe.
    pub(crate) answered_at: Option<Instant>,
    /// The session's `idle_session_timeout` on the server (ms, 0 = off), as we last set it.
    /// A statement sent at `t` that sets it to at least the time from `t` to the latest
    /// lease deadline on the session ([`SessionState::timeout_for`]) lets the server end the
    /// session, if nothing follows, no earlier than that deadline: no early loss. Statements
    /// set it again only when it is too short for that, or more than [`TIMEOUT_TOLERANCE`]
    /// too long (which is how late a stopped holder's locks are freed). After the last lock
    /// goes it stays (one `set_config` less per release and per next acquire) and the
    /// heartbeat turns it off later; a lock-free session the server ended meanwhile is
    /// reconnected by the next acquire.
    pub(crate) timeout_set_ms: u64,
    /// Lease deadline → number of locks on this session with it.
    pub(crate) deadlines: BTreeMap<Instant, usize>,
    /// The statement in flight, for the heartbeat (shared with [`Session::watch`]).
    pub(crate) watch: Arc<Mutex<Watch>>,
    /// [`PostgresConfig::probe_timeout`].
    pub(crate) probe_timeout: Duration,
    /// Advisory keys of semaphore slots and reader-writer sides held on this session:
    /// (shared holds, exclusive holds). A session is granted a lock it holds again, so an
    /// attempt on this session leaves these out (see `shared.rs`).
    pub(crate) holds: HashMap<i64, (u32, u32)>,
    /// The session's `pg_temp` functions for semaphores and reader-writer locks exist.
    pub(crate) shared_ready: bool,
}

/// The error of a statement answered after the heartbeat gave up on its session and told
/// its guards: the caller drops the session (a connection error).
pub(crate) fn reported_lost() -> sqlx::Error {
    sqlx::Error::Protocol(
        "the holder session did not answer in time; its locks were reported lost".into(),
    )
}

/// A statement awaited on a holder session (see [`SessionState::expect_answer`]); the mark
/// goes when it drops.
pub(crate) struct ExpectedAnswer(Arc<Mutex<Watch>>);

impl Drop for ExpectedAnswer {
    fn drop(&mut self) {
        lock(&self.0).answer_by = None;
    }
}

/// What the heartbeat may see of a session busy with a statement without waiting for it.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    /// When the statement in flight on a session that holds locks counts as an unanswered
    /// probe: [`loss_notice_bound`] (with the configured probe timeout) after the session's
    /// last answer, and no sooner than a probe timeout after the statement was sent.
    pub(crate) answer_by: Option<Instant>,
    /// The connection's lost signal ([`SessionState::lost`]), set when it connects.
    pub(crate) lost: CancellationToken,
}

/// How much longer than needed a holder session's `idle_session_timeout` may be before a
/// statement sets it again (see [`SessionState::timeout_set_ms`]).
pub(crate) const TIMEOUT_TOLERANCE: Duration = Duration::from_millis(50);

/// How long after the latest lease deadline on it the server may end an idle holder
/// session. While the process runs, the reaper's unlock at the deadline (which wakes remote
/// waiters by NOTIFY; a session ended by the server frees the lock silently) and a renewal
/// sent just before it must arrive first. A stopped holder's locks are freed this long plus
/// up to [`TIMEOUT_TOLERANCE`] and a round trip after that deadline.
pub(crate) const TIMEOUT_PAD: Duration = Duration::from_millis(100);

impl SessionState {
    /// Drops the connection: the server ends the session and frees whatever it held. Leases
    /// granted on it hear it through `lost` and are stale by `epoch`. Returns the old epoch.
    pub(crate) fn disconnect(&mut self) -> u64 {
        self.conn = None;
        self.ttls.clear();
        self.deadlines.clear();
        self.holds.clear();
        self.shared_ready = false;
        self.lost.cancel();
        self.epoch += 1;
        self.epoch - 1
    }

    /// After a statement failed on a session that holds no lease: gives back every session
    /// lock the statement may have taken before it failed (a session lock outlives the
    /// rollback) and keeps the session, or drops the connection when that fails. Unlocking
    /// frees them before the caller's error returns; a dropped connection frees them only
    /// once the server has noticed and ended the session, so a retry right after the error
    /// could still find them taken.
    pub(crate) async fn unlock_all_or_disconnect(&mut self, limit: Duration) {
        debug_assert!(self.ttls.is_empty(), "the session holds leases");
        // Out of the state while the statement runs: a caller dropped meanwhile (a waiter's
        // acquire is cancellable) drops the connection, never leaves one that may still hold
        // a lock looking free.
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Both outcomes clear them; cleared now, a caller cancelled during the statement
        // leaves no hold counted on a session without a connection.
        self.holds.clear();
        // `unlock_all` also gives back the session's alive key (see HOLDER_ALIVE_CLASS), which
        // other backends' blockers wait on: take it again, after the unlock (a FROM subquery
        // with a volatile call is run first, never folded into the outer select). The pid
        // proves the statement ran in this session (an undetected pooler could have run it
        // in another client's). Simple protocol: no prepare round trip to be cancelled in.
        let statement = format!(
            "SELECT pg_try_advisory_lock({HOLDER_ALIVE_CLASS}, s.pid), s.pid FROM \
             (SELECT pg_advisory_unlock_all(), pg_backend_pid() AS pid) s"
        );
        let unlock = sqlx::raw_sql(sqlx::AssertSqlSafe(statement)).fetch_one(&mut conn);
        let answer = tokio::time::timeout(limit, unlock).await;
        let alive_again = match answer {
            Ok(Ok(row)) => {
                row.try_get::<bool, _>(0).unwrap_or(false)
                    && row.try_get::<i32, _>(1).ok() == Some(self.pid)
            }
            _ => false,
        };
        if alive_again {
            self.conn = Some(conn);
            self.answered_at = Some(Instant::now());
        } else {
            drop(conn);
            self.disconnect();
        }
    }

    pub(crate) fn add_ttl(&mut self, ttl: u64) {
        *self.ttls.entry(ttl).or_insert(0) += 1;
    }

    /// Runs `query` on this session's connection within `limit` (a session without one
    /// answers `PoolClosed`). An answer shows the session alive ([`Self::answered_at`]).
    pub(crate) async fn fetch_one(
        &mut self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        limit: Duration,
    ) -> Result<Result<sqlx::postgres::PgRow, sqlx::Error>, tokio::time::error::Elapsed> {
        let expecting = self.expect_answer();
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Err(sqlx::Error::PoolClosed));
        };
        let result = tokio::time::timeout(limit, query.fetch_one(conn)).await;
        drop(expecting);
        if self.lost.is_cancelled() {
            // The heartbeat gave up on this session meanwhile and told its guards: whatever
            // the answer, the session must go (the caller drops it on this error).
            return Ok(Err(reported_lost()));
        }
        if matches!(result, Ok(Ok(_))) {
            self.answered_at = Some(Instant::now());
        }
        result
    }

    /// Marks a statement about to be sent on this session as awaited until the guard drops.
    /// A session holding locks whose statement stays unanswered is treated like one whose
    /// probe does (the heartbeat skips busy sessions): see `Watch`. Every statement on a
    /// holder session goes out under one, or a silent link would be heard only at the
    /// statement's own timeout.
    pub(crate) fn expect_answer(&self) -> ExpectedAnswer {
        if let Some(&min_ttl) = self.ttls.keys().next() {
            let now = Instant::now();
            let since = self.answered_at.unwrap_or(now);
            // At least a probe's time from now: after a stall of this process (the heartbeat
            // could not probe meanwhile) the last answer is old, and a statement answered at
            // once must not count as unanswered.
            let by =
                (since + loss_bound(min_ttl, self.probe_timeout)).max(now + self.probe_timeout);
            lock(&self.watch).answer_by = Some(by);
        }
        ExpectedAnswer(self.watch.clone())
    }

    pub(crate) fn add_deadline(&mut self, deadline: Instant) {
        *self.deadlines.entry(deadline).or_insert(0) += 1;
    }

    pub(crate) fn remove_deadline(&mut self, deadline: Instant) {
        if let Some(count) = self.deadlines.get_mut(&deadline) {
            *count -= 1;
            if *count == 0 {
                self.deadlines.remove(&deadline);
            }
        }
    }

    /// The `idle_session_timeout` (ms) a statement sent `now` must set so that the server,
    /// if nothing follows, ends the session no earlier than the latest lease deadline on it
    /// (and `extra`, a lock being added), and not much later. `None` without deadlines.
    pub(crate) fn timeout_for(&self, extra: Option<Instant>, now: Instant) -> Option<u64> {
        let latest = self.deadlines.keys().next_back().copied().max(extra)?;
        // Rounded up; never 0, which means off.
        // At most what the setting takes (2^31 - 1 ms; MAX_TTL leaves room for the pad).
        Some(ttl_ms(latest.saturating_duration_since(now) + TIMEOUT_PAD).min(i32::MAX as u64))
    }

    /// Whether the timeout set now is too short for `wanted` (a lock could be freed before
    /// its deadline) or too long by more than [`TIMEOUT_TOLERANCE`].
    pub(crate) fn timeout_needs(&self, wanted: u64) -> bool {
        self.timeout_set_ms < wanted
            || self.timeout_set_ms > wanted + TIMEOUT_TOLERANCE.as_millis() as u64
    }

    pub(crate) fn remove_ttl(&mut self, ttl: u64) {
        if let Some(count) = self.ttls.get_mut(&ttl) {
            *count -= 1;
            if *count == 0 {
                self.ttls.remove(&ttl);
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: usize,
    pub(crate) class_ms: u64,
    pub(crate) state: tokio::sync::Mutex<SessionState>,
    /// Set when an operation was abandoned mid-statement and the session was busy: its next
    /// user drops the connection first.
    pub(crate) tainted: AtomicBool,
    /// The statement in flight, readable while the session is busy.
    pub(crate) watch: Arc<Mutex<Watch>>,
}

impl Session {
    /// A session not connected yet (its first user connects it).
    pub(crate) fn new(id: usize, class_ms: u64, probe_timeout: Duration) -> Arc<Self> {
        let watch = Arc::new(Mutex::new(Watch::default()));
        Arc::new(Session {
            id,
            class_ms,
            state: tokio::sync::Mutex::new(SessionState {
                watch: watch.clone(),
                probe_timeout,
                ..SessionState::default()
            }),
            tainted: AtomicBool::new(false),
            watch,
        })
    }
}

/// Marks a statement in flight on a session until dropped: an operation abandoned while it
/// is set leaves the session in an unknown state (see [`Inner::abandon`]).
pub(crate) struct InFlight<'a>(&'a AtomicBool);

impl<'a> InFlight<'a> {
    pub(crate) fn start(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::SeqCst);
        InFlight(flag)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Inner {
    pub(crate) fn pick_session(self: &Arc<Self>, hash: i64, ttl_ms: u64) -> Arc<Session> {
        let mut sessions = lock(&self.sessions);
        let in_class = |session: &&Arc<Session>| session.class_ms == ttl_ms;
        let per_ttl = self.config.sessions_per_ttl;
        let slot = usize::try_from(hash.cast_unsigned() % per_ttl as u64).unwrap_or(0);
        if let Some(session) = sessions.iter().filter(in_class).nth(slot) {
            return session.clone();
        }
        if sessions.len() < self.config.max_sessions {
            let class_len = sessions.iter().filter(in_class).count();
            let session = Session::new(sessions.len(), ttl_ms, self.config.probe_timeout);
            sessions.push(session.clone());
            // Only a class's first session is connected on an attempt's path: while the
            // class fills up, an attempt whose slot is missing uses a session the class has
            // and its own connects in the background. A connection costs a few round trips,
            // and with TLS and a password ~150 ms of CPU in a debug build: before, a waiter's
            // first attempts each opened one and overran its wait (the conformance case
            // `wait_timeout_is_bounded` over TLS, by 300 ms).
            if class_len > 0
                && let Some(existing) = sessions.iter().filter(in_class).nth(slot % class_len)
            {
                let existing = existing.clone();
                self.connect_in_background(session);
                return existing;
            }
            return session;
        }
        let class_len = sessions.iter().filter(in_class).count();
        if class_len > 0
            && let Some(session) = sessions.iter().filter(in_class).nth(slot % class_len)
        {
            return session.clone();
        }
        // Every session is taken by other TTLs. Its timeout follows the latest deadline on
        // it, so a lock sharing it is only ever kept longer after a stall, never less; how
        // much longer is bounded by the longest TTL beside it. Share the longest class not
        // longer than ours (the lock then keeps Capabilities::expiry_slack_for), or, when
        // every class is longer, the shortest one (the README says what that costs).
        let shorter = sessions
            .iter()
            .filter(|session| session.class_ms <= ttl_ms)
            .max_by_key(|session| session.class_ms);
        shorter
            .or_else(|| sessions.iter().min_by_key(|session| session.class_ms))
            .cloned()
            // Unreachable: max_sessions ≥ 1, so the list is not empty here.
            .unwrap_or_else(|| Session::new(usize::MAX, ttl_ms, self.config.probe_timeout))
    }

    /// Connects a new holder session on a task (see [`Inner::pick_session`]). A failure is
    /// only logged: the session's first statement connects it again and reports the error.
    fn connect_in_background(self: &Arc<Self>, session: Arc<Session>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Weak: a backend dropped meanwhile needs no new connection.
        let inner = Arc::downgrade(self);
        runtime.spawn(async move {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            if let Err(error) = inner.session_conn(&session).await {
                tracing::debug!(%error, session = session.id, "connecting a holder session ahead of use failed");
            }
        });
    }

    /// Waits for the session's mutex, at most `op_timeout`. Running out is a retryable error
    /// that leaves the session alone: nothing was sent on it. A session marked tainted (an
    /// operation was abandoned mid-statement where it could not finish) is dropped first.
    pub(crate) async fn lock_session<'s>(
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
        self.drop_if_tainted(session, &mut state);
        Ok(state)
    }

    /// The session's state if it is free now, for the heartbeat's own statements. A tainted
    /// session is dropped first, as [`Inner::lock_session`] drops it: the abandoned
    /// statement's answer (a grant nobody recorded) would otherwise be read and skipped by
    /// the next statement, and the session would keep that lock while it lives.
    pub(crate) fn try_lock_session<'s>(
        &self,
        session: &'s Session,
    ) -> Option<tokio::sync::MutexGuard<'s, SessionState>> {
        let mut state = session.state.try_lock().ok()?;
        self.drop_if_tainted(session, &mut state);
        Some(state)
    }

    /// Drops the connection of a session marked tainted (see [`Inner::abandon`]).
    fn drop_if_tainted(&self, session: &Session, state: &mut SessionState) {
        if session.tainted.swap(false, Ordering::SeqCst) && state.conn.is_some() {
            self.break_session(
                session,
                state,
                "an operation was abandoned mid-statement outside a runtime",
            );
        }
    }

    /// Locks the session and makes sure it is connected (connecting within
    /// `connect_timeout`).
    pub(crate) async fn session_conn<'s>(
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
    pub(crate) async fn reconnect(&self, state: &mut SessionState) -> Result<(), LockError> {
        let deadline = Instant::now() + self.config.connect_timeout;
        // The connection `setup` opened (a holder session like this one) serves first while
        // well inside its idle timeout (older, it is closed). Should the server have ended it
        // anyway, the session holds nothing yet, and its first statement's failure makes
        // acquire connect again (see `acquire_op`).
        let spare = lock(&self.spare)
            .take()
            .filter(|(_, _, parked)| parked.elapsed() < SPARE_IDLE_TIMEOUT / 2);
        let (conn, pid, timeout_set_ms) = match spare {
            Some((conn, pid, _)) => (conn, pid, SPARE_IDLE_TIMEOUT.as_millis() as u64),
            None => {
                // Setup's pooler probe passed on this URL: a session is a client's own.
                let (conn, pid, _) = self.open_session(deadline, true).await?;
                (conn, pid, 0)
            }
        };
        state.conn = Some(conn);
        state.pid = pid;
        state.ttls.clear();
        state.deadlines.clear();
        state.holds.clear();
        state.shared_ready = false;
        state.lost = CancellationToken::new();
        // Once per connection, not per statement: the token changes only here.
        lock(&state.watch).lost = state.lost.clone();
        state.timeout_set_ms = timeout_set_ms;
        state.answered_at = Some(Instant::now());
        Ok(())
    }

    /// A fence the sequence answered, as a token: a negative one (setup checks only that the
    /// sequence increases; it may start below zero) drops the session, which frees the lock
    /// just granted on it, and is an error.
    pub(crate) fn checked_fence(
        &self,
        session: &Session,
        state: &mut SessionState,
        fence: i64,
    ) -> Result<u64, LockError> {
        u64::try_from(fence).map_err(|_| {
            self.break_session(session, state, "fence sequence answered a negative value");
            LockError::backend_msg(
                BACKEND,
                format!("the fence sequence answered {fence}; fencing tokens must be positive"),
                false,
            )
        })
    }

    /// Drops the session's connection: the server ends the session and frees its locks. Every
    /// lease granted on it is gone from our books, so renew answers `Lost`.
    pub(crate) fn break_session(&self, session: &Session, state: &mut SessionState, why: &str) {
        tracing::warn!(
            session = session.id,
            pid = state.pid,
            why,
            "holder session lost; its locks are lost"
        );
        // The server frees every lock of the session once the connection goes: the guards
        // hear it now (the lost signal), not at their next renewal.
        let old = state.disconnect();
        let mut freed = Vec::new();
        lock(&self.book).entries.retain(|_, entry| match entry {
            Entry::Held(held) if held.session.id == session.id && held.epoch == old => {
                freed.push(held.key.clone());
                false
            }
            _ => true,
        });
        // Our own waiters of those keys may have left no mark (a lock held in this process
        // needs none: its release wakes them here) and have no blocker: wake them now.
        for key in freed {
            self.hub.notify(key.as_str());
        }
    }

    /// A statement answered from another server session than the one we opened: a pooler
    /// (PgBouncer in transaction or statement mode) switches sessions under us, so no lock
    /// on this connection can be trusted. Drops the session.
    pub(crate) fn session_switched(
        &self,
        session: &Session,
        state: &mut SessionState,
        pid: i32,
    ) -> LockError {
        let why = format!(
            "a statement ran in server session {pid}, not {}: a pooler is switching sessions",
            state.pid
        );
        self.break_session(session, state, &why);
        pooler_refusal(&why)
    }

    /// After an unlock that answered `false`: a pooler that switched server sessions is
    /// reported as such ([`Inner::session_switched`]); a failed check drops the session.
    pub(crate) async fn check_pid_after_false_unlock(
        &self,
        session: &Session,
        state: &mut SessionState,
    ) -> Result<(), LockError> {
        let _expecting = state.expect_answer();
        let Some(conn) = state.conn.as_mut() else {
            return Ok(());
        };
        match tokio::time::timeout(self.config.op_timeout, backend_pid(conn)).await {
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
    pub(crate) fn abandon(&self, session: &Session, in_flight: &AtomicBool) {
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
}
