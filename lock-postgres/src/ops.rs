//! The lock operations on a holder session: acquire, release and renew statements and their
//! bookkeeping.

use super::*;

/// Why an unlock failed, for what the book must say afterwards.
#[derive(Debug)]
pub(crate) enum UnlockFailure {
    /// Nothing reached the server (the session stayed busy): the lock is still held.
    NotSent(LockError),
    /// The lock is no longer held (the statement failed and was undone, or the session was
    /// dropped).
    Failed(LockError),
}

// The fence column is NULL exactly when the lock was not granted (`nextval` never answers
// NULL), so the answer needs no separate flag. A subquery with OFFSET 0, not a CTE: a CTE
// over a volatile function is materialised, which cost the server ~2.5 µs per acquire.
//
// A granted fence must be on disk before the answer leaves the server, or a crash hands it
// out again. `nextval` writes WAL only every 32nd value (and then assigns a transaction id,
// so the commit flushes: holder sessions force `synchronous_commit` on, see
// `Inner::open_session`); the other values are covered by an earlier record, possibly
// written by a session that committed asynchronously and not flushed yet. So when WAL is
// pending (flush < insert position, read after `nextval`), or a synchronous standby must
// confirm it (`synchronous_standby_names`), the statement writes a transactional logical
// message (an empty WAL record, which also assigns a transaction id; a transaction id alone
// writes no WAL, and such a commit does not flush): its commit then waits for the flush
// (and the standby) of everything up to its commit record, the fence's record included. On
// a quiet server with everything flushed it costs nothing.
//
// `grant_sql!(extra columns, subquery yielding f)`: the answer of any statement that takes a
// lock and its fence (the acquire below, and a wait on the server in `server_wait.rs`).
macro_rules! grant_sql {
    ($extra:expr, $granted:expr) => {
        concat!(
            "SELECT f, pg_backend_pid(), CASE WHEN f IS NOT NULL AND \
               (pg_current_wal_flush_lsn() < pg_current_wal_insert_lsn() \
                OR current_setting('synchronous_standby_names') <> '') \
             THEN pg_logical_emit_message(true, 'distlock', '') END",
            $extra,
            " FROM ",
            $granted
        )
    };
}

macro_rules! acquire_sql {
    ($extra:literal, $fence:literal) => {
        grant_sql!(
            $extra,
            concat!(
                "(SELECT CASE WHEN pg_try_advisory_lock($1) THEN nextval(",
                $fence,
                "::regclass) END AS f OFFSET 0) l"
            )
        )
    };
}

pub(crate) const ACQUIRE_SQL: &str = acquire_sql!(
    ", set_config('idle_session_timeout', CASE WHEN f IS NULL THEN $3 ELSE $2 END, false)",
    "$4"
);

// The same answer without touching idle_session_timeout, for when it already has the value
// the lock needs.
pub(crate) const ACQUIRE_KEEP_TIMEOUT_SQL: &str = acquire_sql!("", "$2");

// Every statement returns pg_backend_pid(): a different answer than at connect means a
// pooler switched server sessions under us (see `Inner::session_switched`).
pub(crate) const RENEW_SQL: &str =
    "SELECT set_config('idle_session_timeout', $1, false), pg_backend_pid()";

// The exclusive xact lock on the waiter key fails only when some backend holds it shared,
// i.e. waits for this key: only then is the NOTIFY (and its commit cost) paid.
// The release needs no pid column: it unlocks a lock our books say this session holds, so it
// answers `true` unless the statement ran in another server session (or the lock is gone),
// and only then does a separate `pg_backend_pid()` tell which (see `Inner::unlock_op`).
pub(crate) const UNLOCK_SQL: &str = "\
SELECT pg_advisory_unlock($1),
  CASE WHEN pg_try_advisory_xact_lock($2, $3) THEN NULL ELSE pg_notify($4, $5)::text END,
  set_config('idle_session_timeout', $6, false)";

pub(crate) const UNLOCK_KEEP_TIMEOUT_SQL: &str = "\
SELECT pg_advisory_unlock($1),
  CASE WHEN pg_try_advisory_xact_lock($2, $3) THEN NULL ELSE pg_notify($4, $5)::text END";

/// Takes the lease's book entry for a release: `Pending` until the unlock settles. `None`
/// when the lease is not ours (any more). The flag says whether it was still valid.
pub(crate) fn begin_release(inner: &Inner, lease: &Lease) -> Option<(BookKey, HeldLock, bool)> {
    let hash = book_key(inner, lease);
    let now = Instant::now();
    let mut book = lock(&inner.book);
    let entry = book.entries.get_mut(&hash)?;
    match entry {
        Entry::Held(held)
            if held.owner == lease.owner()
                && held.key == *lease.key()
                && held.kind() == lease.kind() =>
        {
            let still_valid = held.deadline > now;
            match std::mem::replace(entry, Entry::Pending) {
                Entry::Held(held) => Some((hash, held, still_valid)),
                Entry::Pending | Entry::Waiting => None,
            }
        }
        _ => None,
    }
}

/// Releases a lease from a task (the orphan path: nobody waits for the answer).
pub(crate) async fn release_lease(inner: Arc<Inner>, lease: Lease) -> Result<bool, LockError> {
    let Some((hash, held, still_valid)) = begin_release(&inner, &lease) else {
        return Ok(false);
    };
    let unlocked = inner.settled_release(hash, held).await?;
    Ok(unlocked && still_valid)
}

impl Inner {
    /// [`Inner::release_held`], settling the key's `Pending` book entry however it ends. If
    /// it is dropped unfinished where no runtime can finish it (its runtime shut down, e.g.
    /// the reaper's, with the unlock's answer still on its way), an unlock that may have run
    /// drops the session (which frees the lock on the server) and one never sent puts the
    /// lease back for the reaper. Before, a dropped reaper or orphan release left the entry
    /// `Pending` for good: every later acquire of the key in this process was answered
    /// "held" without asking the server.
    pub(crate) fn settled_release(
        self: &Arc<Self>,
        hash: BookKey,
        held: HeldLock,
    ) -> Detached<bool> {
        let in_flight = Arc::new(AtomicBool::new(false));
        let abandon = {
            let inner = self.clone();
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
        detached(
            self.clone().release_held(hash, held, in_flight),
            |_| {},
            abandon,
        )
    }

    /// Puts a lease whose unlock never reached the server back in the book: it is still held
    /// there, and the reaper unlocks it at its deadline (or now, if that passed).
    pub(crate) fn restore_held(&self, hash: BookKey, held: HeldLock) {
        let mut book = lock(&self.book);
        if !matches!(book.entries.get(&hash), Some(Entry::Pending)) {
            return;
        }
        let deadline = held.deadline;
        book.entries.insert(hash, Entry::Held(held));
        // Held again: its later release wakes the key's waiters, including one that found
        // this release in flight.
        if let BookKey::Lock(hash) = hash {
            book.waited_behind.remove(&hash);
        }
        if book.reaper_at.is_none_or(|at| deadline < at) {
            book.reaper_at = Some(deadline);
            self.reaper_wake.notify_one();
        }
    }

    /// Unlocks `held` (its book entry is `Pending` meanwhile, so no local acquire can take the
    /// key on the same session before the unlock ran) and settles the book entry.
    pub(crate) async fn release_held(
        self: Arc<Self>,
        hash: BookKey,
        held: HeldLock,
        in_flight: Arc<AtomicBool>,
    ) -> Result<bool, LockError> {
        // A lock's local waiters are woken after its book entry is gone (see `unlock_op`);
        // permits and sides wake theirs in `unlock_shared` (their entries are per owner).
        let wake_locally = |inner: &Self| {
            if matches!(hash, BookKey::Lock(_)) {
                inner.hub.notify(held.key.as_str());
            }
        };
        // The release's own wake-up covers a waiter that found it in flight (see
        // [`Book::waited_behind`]): one release, one wake-up, so the entry is only taken out.
        match self.unlock_op(hash, &held, &in_flight).await {
            Ok(unlocked) => {
                self.take_pending(hash);
                wake_locally(&self);
                Ok(unlocked)
            }
            Err(UnlockFailure::NotSent(error)) => {
                self.restore_held(hash, held);
                Err(error)
            }
            Err(UnlockFailure::Failed(error)) => {
                self.take_pending(hash);
                wake_locally(&self);
                Err(error)
            }
        }
    }

    /// Takes a `Pending` entry out of the book (its attempt or release ended), and wakes the
    /// key's waiters if one found it on its way to the server (see [`Book::waited_behind`]).
    pub(crate) fn forget_pending(&self, hash: BookKey) {
        if let Some(key) = self.take_pending(hash) {
            self.hub.notify(key.as_str());
        }
    }

    /// [`Inner::forget_pending`] without the wake-up: returns the key whose waiter found the
    /// entry on its way to the server, if one did.
    fn take_pending(&self, hash: BookKey) -> Option<LockKey> {
        let mut book = lock(&self.book);
        if !matches!(book.entries.get(&hash), Some(Entry::Pending)) {
            return None;
        }
        book.entries.remove(&hash);
        match hash {
            BookKey::Lock(hash) => book.waited_behind.remove(&hash),
            BookKey::Shared(_) => None,
        }
    }

    pub(crate) async fn acquire_op(
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
                self.forget_pending(BookKey::Lock(hash));
                return Err(error);
            }
        };
        let owner = OwnerToken::random();
        let fence_oid = Oid(self.fence_oid.load(Ordering::Relaxed));
        let _flight = InFlight::start(&in_flight);
        let mut reconnected = false;
        let deadline = sent_at + ttl;
        let (result, set_to) = loop {
            // The session's timeout must reach this lock's deadline (and every other one on
            // it), and not much further: set it only when it falls outside that (in a steady
            // acquire/release loop it never does).
            let wanted = state
                .timeout_for(Some(deadline), Instant::now())
                .unwrap_or(ttl_ms);
            let set_to = state.timeout_needs(wanted).then_some(wanted);
            let query = match set_to {
                None => sqlx::query(ACQUIRE_KEEP_TIMEOUT_SQL)
                    .bind(hash)
                    .bind(fence_oid),
                Some(wanted) => sqlx::query(ACQUIRE_SQL)
                    .bind(hash)
                    .bind(wanted.to_string())
                    .bind(state.timeout_set_ms.to_string())
                    .bind(fence_oid),
            };
            // The statement's own budget starts when it is sent, not when we began waiting.
            let result = state.fetch_one(query, self.config.op_timeout).await;
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
                        self.forget_pending(BookKey::Lock(hash));
                        return Err(error);
                    }
                }
                _ => break (result, set_to),
            }
        };
        let row = match result {
            Ok(Ok(row)) => row,
            Ok(Err(error)) => {
                if is_connection_error(&error) {
                    self.break_session(&session, &mut state, "acquire failed");
                } else if state.conn.is_some() {
                    // A session lock taken by a statement that then failed survives the
                    // rollback: undo it. We did not hold this key on this session (our books
                    // said so), so this unlock cannot drop a lock we mean to keep.
                    let undo = sqlx::query("SELECT pg_advisory_unlock($1)").bind(hash);
                    if !matches!(
                        state.fetch_one(undo, self.config.op_timeout).await,
                        Ok(Ok(_))
                    ) {
                        self.break_session(&session, &mut state, "undoing a failed acquire failed");
                    }
                }
                self.forget_pending(BookKey::Lock(hash));
                return Err(map_error("acquire", error));
            }
            Err(_) => {
                self.break_session(&session, &mut state, "acquire timed out");
                self.forget_pending(BookKey::Lock(hash));
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
                self.forget_pending(BookKey::Lock(hash));
                return Err(map_error("decoding the acquire answer", error));
            }
        };
        if pid != state.pid {
            // The lock (if granted) sits on a server session we do not own: dropping our
            // connection is all we can do (a pooler may keep that session, and the lock).
            let error = self.session_switched(&session, &mut state, pid);
            self.forget_pending(BookKey::Lock(hash));
            return Err(error);
        }
        let Some(fence) = fence else {
            self.forget_pending(BookKey::Lock(hash));
            drop(state);
            // Held by another session: if we have waiters for it, a blocker waits on the
            // server for the holder to go, also when the server ends its session (no NOTIFY).
            self.lock_held_elsewhere(&key);
            // Another backend's deadline is known only to it; waiters hear the release.
            return Ok(Attempt::Held { expires_in: None });
        };
        let fence = match self.checked_fence(&session, &mut state, fence) {
            Ok(fence) => fence,
            Err(error) => {
                self.forget_pending(BookKey::Lock(hash));
                return Err(error);
            }
        };
        if let Some(wanted) = set_to {
            state.timeout_set_ms = wanted;
        }
        let held = HeldLock {
            key: key.clone(),
            shared: None,
            owner,
            session: session.clone(),
            epoch: state.epoch,
            ttl_ms,
            deadline,
        };
        let lost_signal = self.record_grant(state, BookKey::Lock(hash), held);
        Ok(Attempt::Acquired(
            Lease::new(key, owner, Some(FencingToken(fence)), ttl, sent_at)
                .with_lost_signal(lost_signal),
        ))
    }

    /// Books a lease just granted on `state`'s session (a lock, or permits or a
    /// reader-writer side): counts its TTL and deadline on the session, enters it in the book
    /// (waking the reaper if its deadline comes first), releases the session and, for the
    /// session's first lease, has the heartbeat probe it within an interval. Returns the lost
    /// signal the lease carries.
    pub(crate) fn record_grant(
        &self,
        mut state: tokio::sync::MutexGuard<'_, SessionState>,
        book_key: BookKey,
        held: HeldLock,
    ) -> CancellationToken {
        let (ttl_ms, deadline) = (held.ttl_ms, held.deadline);
        let first_on_session = state.ttls.is_empty();
        state.add_ttl(ttl_ms);
        state.add_deadline(deadline);
        let lost_signal = state.lost.clone();
        {
            let mut book = lock(&self.book);
            book.entries.insert(book_key, Entry::Held(held));
            // A waiter behind the attempt is woken by this lock's release now.
            if let BookKey::Lock(hash) = book_key {
                book.waited_behind.remove(&hash);
            }
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
        lost_signal
    }

    /// Unlocks `held` on its session and wakes waiters. `Ok(false)` if its session is gone.
    /// After a failed statement the lock may still be held on the server with nothing in our
    /// books: a plain unlock follows, and if that fails too the session is dropped.
    /// `book_key` is `held`'s book key (for a lock, its advisory key).
    pub(crate) async fn unlock_op(
        &self,
        book_key: BookKey,
        held: &HeldLock,
        in_flight: &AtomicBool,
    ) -> Result<bool, UnlockFailure> {
        let hash = match (book_key, &held.shared) {
            (BookKey::Lock(hash), None) => hash,
            (_, Some(shared)) => return self.unlock_shared(held, shared, in_flight).await,
            (BookKey::Shared(_), None) => return Ok(false),
        };
        let mut state = self
            .lock_session(&held.session)
            .await
            .map_err(UnlockFailure::NotSent)?;
        if state.epoch != held.epoch || state.conn.is_none() {
            return Ok(false);
        }
        state.remove_ttl(held.ttl_ms);
        state.remove_deadline(held.deadline);
        let (high, low) = waiter_key(hash);
        // Locks left on the session: its timeout follows down to the latest of their
        // deadlines. None left: it stays as it is (see `SessionState::timeout_set_ms`).
        let lower_to = state
            .timeout_for(None, Instant::now())
            .filter(|&wanted| state.timeout_needs(wanted));
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
        let result = state.fetch_one(query, self.config.op_timeout).await;
        // Local waiters are woken by `release_held` once the book entry is gone (not here:
        // a waiter woken now would find the entry still `Pending`, answer itself "held" and,
        // with no NOTIFY to follow for a key held here, sleep until its backoff step).
        let error = match result {
            Ok(Ok(row)) => {
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
        let answer = state.fetch_one(plain, self.config.op_timeout).await;
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

    pub(crate) async fn renew_op(
        self: Arc<Self>,
        lease: Lease,
        ttl: Duration,
        sent_at: Instant,
    ) -> Result<Lease, LockError> {
        let key = lease.key().clone();
        let hash = book_key(&self, &lease);
        let lost = |reason: &str| LockError::lost(key.as_str(), reason);
        let held = match lock(&self.book).entries.get(&hash) {
            Some(Entry::Held(held))
                if held.owner == lease.owner()
                    && held.key == key
                    && held.kind() == lease.kind() =>
            {
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
        let new_deadline = sent_at + ttl;
        let wanted = state
            .timeout_for(Some(new_deadline), Instant::now())
            .unwrap_or(new_ttl);
        let query = sqlx::query(RENEW_SQL).bind(wanted.to_string());
        match state.fetch_one(query, self.config.op_timeout).await {
            Ok(Ok(row)) => match row.try_get::<i32, _>(1) {
                Ok(pid) if pid == state.pid => state.timeout_set_ms = wanted,
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
                state.remove_deadline(entry.deadline);
                state.add_deadline(new_deadline);
                entry.deadline = new_deadline;
                Ok(lease.renewed(ttl, sent_at))
            }
            _ => Err(lost("the lease expired while it was being renewed")),
        }
    }
}
