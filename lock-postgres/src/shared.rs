//! Semaphores and reader-writer locks (issue #14), on the same holder sessions, TTL, heartbeat,
//! fence and wake-ups as locks.
//!
//! - **Semaphore** `name` with limit `L`: `L` slot keys derived from the name (in a namespace
//!   of their own, so a lock of the same name is unrelated); a request for `count` permits
//!   tries the slots in order with `pg_try_advisory_lock` and keeps `count` of them, or none
//!   (one statement). Every permit lease also holds a shared advisory lock on the *limit
//!   marker* `(tag(name), L)` in the two-int keyspace; a request first takes its own marker,
//!   then looks in `pg_locks` for a marker of the same name with another limit: if one is
//!   held, it gives everything back and is refused with `InvalidConfig` naming both limits.
//! - **Reader-writer** `name`: one advisory key; readers `pg_try_advisory_lock_shared`, a
//!   writer `pg_try_advisory_lock`. A refused writer upserts a row `(key, now + WRITER_INTENT)`
//!   into the unlogged table `<fence schema>.distlock_rw_intent`; a reader is refused while
//!   that row is in the future (server clock only); a granted writer deletes it.
//! - Both run as `pg_temp` PL/pgSQL functions created on the holder session at its first use
//!   (temporary: nothing to install, gone with the session), draw the fence from the lock's
//!   sequence with the same WAL flush check, and are freed with the session exactly like locks
//!   (reaper at the deadline, `idle_session_timeout` when the process stops).

use super::*;
use lock_core::{LeaseKind, RwMode, WRITER_INTENT};

/// The largest semaphore limit: a request passes (and may try) one advisory key per slot.
pub const MAX_PERMITS: u32 = 4096;

/// What a permit lease or a reader-writer side holds on its session, for its unlock.
#[derive(Debug)]
pub(crate) struct SharedHold {
    pub(crate) kind: LeaseKind,
    /// One-bigint advisory keys held exclusively (semaphore slots, a writer's key).
    pub(crate) exclusive: Vec<i64>,
    /// One-bigint advisory keys held shared (a reader's key).
    pub(crate) shared: Vec<i64>,
    /// The semaphore's limit marker (held shared).
    pub(crate) marker: Option<(i32, i32)>,
}

impl HeldLock {
    /// The lease kind this book entry holds.
    pub(crate) fn kind(&self) -> LeaseKind {
        self.shared
            .as_ref()
            .map_or(LeaseKind::Lock, |shared| shared.kind)
    }
}

/// The book key of `lease`: a lock by its advisory key, anything else by its owner.
pub(crate) fn book_key(inner: &Inner, lease: &Lease) -> BookKey {
    match lease.kind() {
        LeaseKind::Lock => BookKey::Lock(inner.advisory_key(lease.key())),
        _ => BookKey::Shared(lease.owner()),
    }
}

/// A 64-bit mix (splitmix64's finalizer): slot keys spread over the keyspace.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The base hash of semaphore `key`: the advisory hash in a namespace of its own (keys never
/// contain NUL, so no lock key reaches it).
pub fn semaphore_base(namespace: &str, key: &str) -> i64 {
    advisory_key(&format!("{namespace}\u{1}semaphore"), key)
}

/// The advisory key of slot `slot` of the semaphore whose base is `base`.
pub fn slot_key(base: i64, slot: u32) -> i64 {
    mix(base.cast_unsigned() ^ mix(u64::from(slot) + 1)).cast_signed()
}

/// The first int of the semaphore's limit markers `(tag, limit)` (31 bits: `pg_locks` shows
/// it as an `oid`, compared here without sign trouble).
pub fn limit_tag(base: i64) -> i32 {
    (mix(base.cast_unsigned() ^ 0x006c_696d_6974) >> 33) as i32
}

/// The advisory key of reader-writer lock `key`.
pub fn rw_key(namespace: &str, key: &str) -> i64 {
    advisory_key(&format!("{namespace}\u{1}rwlock"), key)
}

/// What an attempt asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SharedRequest {
    Permits { limit: u32, count: u32 },
    Rw(RwMode),
}

/// The session functions. `{intent}` is the intent table, `{intent_ms}` WRITER_INTENT.
/// A function raising after it took locks would leave them (session locks survive the
/// rollback): the caller then drops the session.
const FUNCTIONS_SQL: &str = r#"
CREATE OR REPLACE FUNCTION pg_temp.distlock_permits(slots bigint[], want int, tag int, lim int,
    fence regclass, OUT f bigint, OUT taken bigint[], OUT other int)
LANGUAGE plpgsql AS $fn$
DECLARE
  got bigint[] := '{}';
  k bigint;
BEGIN
  -- Our marker first, then look for another limit's: of two requests that disagree, the
  -- later look sees the earlier marker.
  IF NOT pg_try_advisory_lock_shared(tag, lim) THEN
    RETURN;
  END IF;
  SELECT l.objid::bigint::int INTO other FROM pg_locks l
   WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.classid = tag::oid
     AND l.objid <> lim::oid AND l.granted
     AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
   LIMIT 1;
  IF other IS NOT NULL THEN
    PERFORM pg_advisory_unlock_shared(tag, lim);
    RETURN;
  END IF;
  FOREACH k IN ARRAY slots LOOP
    EXIT WHEN cardinality(got) >= want;
    IF pg_try_advisory_lock(k) THEN
      got := got || k;
    END IF;
  END LOOP;
  IF cardinality(got) < want THEN
    PERFORM pg_advisory_unlock(x) FROM unnest(got) x;
    PERFORM pg_advisory_unlock_shared(tag, lim);
    RETURN;
  END IF;
  taken := got;
  f := nextval(fence);
  IF pg_current_wal_flush_lsn() < pg_current_wal_insert_lsn()
     OR current_setting('synchronous_standby_names') <> '' THEN
    PERFORM pg_logical_emit_message(true, 'distlock', '');
  END IF;
END $fn$;
CREATE OR REPLACE FUNCTION pg_temp.distlock_rw(k bigint, write bool, may_try bool,
    fence regclass, OUT f bigint)
LANGUAGE plpgsql AS $fn$
BEGIN
  IF write THEN
    IF may_try AND pg_try_advisory_lock(k) THEN
      -- Granted: the intent is fulfilled. A failure here (a role without DELETE on the
      -- table) must not leave the lock behind: session locks outlive the rollback.
      BEGIN
        DELETE FROM {intent} WHERE name_key = k;
      EXCEPTION WHEN OTHERS THEN
        PERFORM pg_advisory_unlock(k);
        RAISE;
      END;
    ELSE
      INSERT INTO {intent} AS i (name_key, until)
        VALUES (k, clock_timestamp() + interval '{intent_ms} milliseconds')
        ON CONFLICT (name_key) DO UPDATE SET until = excluded.until;
      RETURN;
    END IF;
  ELSIF NOT may_try
     OR EXISTS (SELECT 1 FROM {intent} WHERE name_key = k AND until > clock_timestamp())
     OR NOT pg_try_advisory_lock_shared(k) THEN
    RETURN;
  END IF;
  f := nextval(fence);
  IF pg_current_wal_flush_lsn() < pg_current_wal_insert_lsn()
     OR current_setting('synchronous_standby_names') <> '' THEN
    PERFORM pg_logical_emit_message(true, 'distlock', '');
  END IF;
END $fn$;
"#;

// Both attempts answer (fence, slots taken, other limit, pid); the timeout is set as the
// lock's acquire sets it, only when `$new` is not empty ($old when nothing was granted).
const PERMITS_SQL: &str = "\
SELECT p.f, p.taken, p.other, pg_backend_pid(),
  CASE WHEN $6 <> '' THEN set_config('idle_session_timeout',
    CASE WHEN p.f IS NULL THEN $7 ELSE $6 END, false) END
FROM pg_temp.distlock_permits($1, $2, $3, $4, $5::regclass) p";

const RW_SQL: &str = "\
SELECT r.f, NULL::bigint[], NULL::int, pg_backend_pid(),
  CASE WHEN $5 <> '' THEN set_config('idle_session_timeout',
    CASE WHEN r.f IS NULL THEN $6 ELSE $5 END, false) END
FROM pg_temp.distlock_rw($1, $2, $3, $4::regclass) r";

// Every column is evaluated (no short-circuit between them); aggregates read every row.
const UNLOCK_SHARED_SQL: &str = "\
SELECT (SELECT coalesce(bool_and(pg_advisory_unlock(k)), true) FROM unnest($1::bigint[]) k),
  (SELECT coalesce(bool_and(pg_advisory_unlock_shared(k)), true) FROM unnest($2::bigint[]) k),
  CASE WHEN $3 THEN pg_advisory_unlock_shared($4, $5) ELSE true END,
  CASE WHEN pg_try_advisory_xact_lock($6, $7) THEN NULL ELSE pg_notify($8, $9)::text END,
  CASE WHEN $10 <> '' THEN set_config('idle_session_timeout', $10, false) END,
  pg_backend_pid()";

/// A semaphore request's numbers (as `MemoryBackend` checks them, plus [`MAX_PERMITS`]).
pub(crate) fn check_permits(key: &LockKey, limit: u32, count: u32) -> Result<(), LockError> {
    if limit == 0 {
        return Err(LockError::InvalidConfig(format!(
            "semaphore {key}: a limit of 0 permits admits nobody"
        )));
    }
    if limit > MAX_PERMITS {
        return Err(LockError::InvalidConfig(format!(
            "semaphore {key}: the postgres backend supports limits up to {MAX_PERMITS}, not \
             {limit}"
        )));
    }
    if count == 0 || count > limit {
        return Err(LockError::InvalidConfig(format!(
            "semaphore {key}: cannot take {count} of {limit} permits (1 to {limit})"
        )));
    }
    Ok(())
}

impl Inner {
    /// Creates the session's `pg_temp` functions (once per connection).
    async fn ensure_functions(&self, state: &mut SessionState) -> Result<(), sqlx::Error> {
        if state.shared_ready {
            return Ok(());
        }
        let intent = self.intent_table();
        let sql = FUNCTIONS_SQL
            .replace("{intent}", &intent)
            .replace("{intent_ms}", &WRITER_INTENT.as_millis().to_string());
        let Some(conn) = state.conn.as_mut() else {
            return Err(sqlx::Error::PoolClosed);
        };
        tokio::time::timeout(
            self.config.op_timeout,
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(conn),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
        state.shared_ready = true;
        Ok(())
    }

    /// The intent table, in the fence sequence's schema (the name is quoted part by part).
    fn intent_table(&self) -> String {
        let name = self.config.fence_sequence.as_str();
        let schema = name.rsplit_once('.').map_or("public", |(schema, _)| schema);
        format!("{schema}.distlock_rw_intent")
    }

    /// Makes sure the intent table exists (created if missing, serialized like the fence
    /// sequence's creation; needs CREATE on the schema only then).
    async fn ensure_intent_table(&self, state: &mut SessionState) -> Result<(), LockError> {
        if self.intent_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let table = self.intent_table();
        let Some(conn) = state.conn.as_mut() else {
            return Err(LockError::backend_msg(BACKEND, "no holder session", true));
        };
        let work = async {
            let exists: Option<Oid> = sqlx::query_scalar("SELECT to_regclass($1)::oid")
                .bind(&table)
                .fetch_one(&mut *conn)
                .await?;
            if exists.is_none() {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
                    .bind(SETUP_LOCK.0)
                    .bind(SETUP_LOCK.1)
                    .execute(&mut *tx)
                    .await?;
                // Unlogged: an intent is worth nothing after a crash (it lapses in 2 s anyway),
                // and writing it costs no WAL.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE UNLOGGED TABLE IF NOT EXISTS {table} \
                     (name_key bigint PRIMARY KEY, until timestamptz NOT NULL)"
                )))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
            Ok::<_, sqlx::Error>(())
        };
        match tokio::time::timeout(self.config.op_timeout, work).await {
            Ok(Ok(())) => {
                self.intent_ready.store(true, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("42501") => {
                Err(LockError::InvalidConfig(format!(
                    "reader-writer locks need the table {table}, which does not exist and this \
                     role cannot create it ({db}); have an administrator create it (see the \
                     lock-postgres README) and grant SELECT, INSERT, UPDATE, DELETE on it"
                )))
            }
            Ok(Err(error)) => Err(map_error("creating the reader-writer intent table", error)),
            Err(_) => Err(timed_out(
                "creating the reader-writer intent table",
                self.config.op_timeout,
            )),
        }
    }

    /// One attempt at permits or a reader-writer side on `session` (see the module docs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn acquire_shared_op(
        self: Arc<Self>,
        key: LockKey,
        request: SharedRequest,
        ttl: Duration,
        sent_at: Instant,
        session: Arc<Session>,
        in_flight: Arc<AtomicBool>,
    ) -> Result<Attempt, LockError> {
        let ttl_ms = ttl_ms(ttl);
        let namespace = self.config.namespace.clone();
        let mut state = self.session_conn(&session).await?;
        if matches!(request, SharedRequest::Rw(_)) {
            self.ensure_intent_table(&mut state).await?;
        }
        let fence_oid = Oid(self.fence_oid.load(Ordering::Relaxed));
        let owner = OwnerToken::random();
        let deadline = sent_at + ttl;
        let _flight = InFlight::start(&in_flight);
        let mut reconnected = false;
        let (result, set_to, hold) = loop {
            let functions = match self.ensure_functions(&mut state).await {
                // Creating the functions takes no lock: a refusal (a role without TEMP on
                // the database) leaves the session and its locks alone.
                Err(error) if !is_connection_error(&error) => {
                    return Err(LockError::InvalidConfig(format!(
                        "semaphores and reader-writer locks create pg_temp functions on the                          holder session, which failed (the role needs TEMP on the database):                          {error}"
                    )));
                }
                other => other,
            };
            let wanted = state
                .timeout_for(Some(deadline), Instant::now())
                .unwrap_or(ttl_ms);
            let set_to = state.timeout_needs(wanted).then_some(wanted);
            let (new, old) = match set_to {
                Some(wanted) => (wanted.to_string(), state.timeout_set_ms.to_string()),
                None => (String::new(), String::new()),
            };
            // What this session may try: never a key it holds already (it would be granted
            // again, reentrantly).
            let (query, hold) = match request {
                SharedRequest::Permits { limit, count } => {
                    let base = semaphore_base(&namespace, key.as_str());
                    let slots: Vec<i64> = (0..limit)
                        .map(|slot| slot_key(base, slot))
                        .filter(|slot| !state.holds.contains_key(slot))
                        .collect();
                    let tag = limit_tag(base);
                    let limit_i32 = i32::try_from(limit).unwrap_or(i32::MAX);
                    let query = sqlx::query(PERMITS_SQL)
                        .bind(slots)
                        .bind(i32::try_from(count).unwrap_or(i32::MAX))
                        .bind(tag)
                        .bind(limit_i32)
                        .bind(fence_oid)
                        .bind(new)
                        .bind(old);
                    let hold = SharedHold {
                        kind: LeaseKind::Permits { limit, count },
                        exclusive: Vec::new(),
                        shared: Vec::new(),
                        marker: Some((tag, limit_i32)),
                    };
                    (query, hold)
                }
                SharedRequest::Rw(mode) => {
                    let k = rw_key(&namespace, key.as_str());
                    let (shared_here, exclusive_here) =
                        state.holds.get(&k).copied().unwrap_or_default();
                    let write = mode == RwMode::Write;
                    let may_try = if write {
                        shared_here == 0 && exclusive_here == 0
                    } else {
                        exclusive_here == 0
                    };
                    let query = sqlx::query(RW_SQL)
                        .bind(k)
                        .bind(write)
                        .bind(may_try)
                        .bind(fence_oid)
                        .bind(new)
                        .bind(old);
                    let hold = if write {
                        SharedHold {
                            kind: LeaseKind::Write,
                            exclusive: vec![k],
                            shared: Vec::new(),
                            marker: None,
                        }
                    } else {
                        SharedHold {
                            kind: LeaseKind::Read,
                            exclusive: Vec::new(),
                            shared: vec![k],
                            marker: None,
                        }
                    };
                    (query, hold)
                }
            };
            let result = match functions {
                Ok(()) => state.fetch_one(query, self.config.op_timeout).await,
                Err(error) => Ok(Err(error)),
            };
            match &result {
                // A lock-free session the server ended: reconnect and send it once more.
                Ok(Err(error))
                    if !reconnected && state.ttls.is_empty() && is_connection_error(error) =>
                {
                    reconnected = true;
                    state.disconnect();
                    self.reconnect(&mut state).await?;
                }
                _ => break (result, set_to, hold),
            }
        };
        let row = match result {
            Ok(Ok(row)) => row,
            Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("42501") => {
                // A privilege error on the intent table comes before any lock is taken (or
                // after the function gave its lock back): the session's locks are intact.
                return Err(LockError::InvalidConfig(format!(
                    "reader-writer locks need SELECT, INSERT, UPDATE and DELETE on {}: {db}",
                    self.intent_table()
                )));
            }
            Ok(Err(error)) => {
                // The statement may have taken locks before it failed (session locks survive
                // the rollback): only dropping the session frees them for sure.
                if !state.ttls.is_empty() || is_connection_error(&error) {
                    self.break_session(&session, &mut state, "semaphore/rwlock attempt failed");
                } else {
                    state.disconnect();
                }
                return Err(map_error("acquire", error));
            }
            Err(_) => {
                self.break_session(&session, &mut state, "acquire timed out");
                return Err(timed_out("acquire", self.config.op_timeout));
            }
        };
        let decoded = (|| {
            let fence: Option<i64> = row.try_get(0)?;
            let taken: Option<Vec<i64>> = row.try_get(1)?;
            let other: Option<i32> = row.try_get(2)?;
            let pid: i32 = row.try_get(3)?;
            Ok::<_, sqlx::Error>((fence, taken, other, pid))
        })();
        let (fence, taken, other, pid) = match decoded {
            Ok(values) => values,
            Err(error) => {
                self.break_session(&session, &mut state, "unexpected acquire answer");
                return Err(map_error("decoding the acquire answer", error));
            }
        };
        if pid != state.pid {
            return Err(self.session_switched(&session, &mut state, pid));
        }
        if let Some(wanted) = set_to {
            // Granted: the new value; refused: the old one was set again.
            if fence.is_some() {
                state.timeout_set_ms = wanted;
            }
        }
        if let (Some(other), SharedRequest::Permits { limit, .. }) = (other, request) {
            return Err(limit_mismatch(&key, other, limit));
        }
        let Some(fence) = fence else {
            return Ok(Attempt::Held { expires_in: None });
        };
        let Ok(fence) = u64::try_from(fence) else {
            self.break_session(
                &session,
                &mut state,
                "fence sequence answered a negative value",
            );
            return Err(LockError::backend_msg(
                BACKEND,
                format!("the fence sequence answered {fence}; fencing tokens must be positive"),
                false,
            ));
        };
        let mut hold = hold;
        if let Some(taken) = taken {
            hold.exclusive = taken;
        }
        for k in &hold.exclusive {
            state.holds.entry(*k).or_default().1 += 1;
        }
        for k in &hold.shared {
            state.holds.entry(*k).or_default().0 += 1;
        }
        let kind = hold.kind;
        let first_on_session = state.ttls.is_empty();
        state.add_ttl(ttl_ms);
        state.add_deadline(deadline);
        let lost_signal = state.lost.clone();
        let epoch = state.epoch;
        {
            let mut book = lock(&self.book);
            book.entries.insert(
                BookKey::Shared(owner),
                Entry::Held(HeldLock {
                    key: key.clone(),
                    shared: Some(Arc::new(hold)),
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
            let due = Instant::now() + heartbeat_interval(ttl_ms);
            let mut planned = lock(&self.heartbeat_at);
            if planned.is_none_or(|at| at > due) {
                *planned = Some(due);
                self.heartbeat_wake.notify_one();
            }
        }
        Ok(Attempt::Acquired(
            Lease::new(key, owner, Some(FencingToken(fence)), ttl, sent_at)
                .with_kind(kind)
                .with_lost_signal(lost_signal),
        ))
    }

    /// Gives back what a permit lease or reader-writer side holds and wakes waiters of the
    /// name (the lock's channel and waiter mark: `subscribe` gets the same name). `Ok(false)`
    /// if its session is gone or the server no longer had it. A failed statement drops the
    /// session (it may have unlocked part).
    pub(crate) async fn unlock_shared(
        &self,
        held: &HeldLock,
        hold: &SharedHold,
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
        state.remove_deadline(held.deadline);
        for (k, exclusive) in hold
            .exclusive
            .iter()
            .map(|k| (k, true))
            .chain(hold.shared.iter().map(|k| (k, false)))
        {
            if let Some(counts) = state.holds.get_mut(k) {
                if exclusive {
                    counts.1 = counts.1.saturating_sub(1);
                } else {
                    counts.0 = counts.0.saturating_sub(1);
                }
                if *counts == (0, 0) {
                    state.holds.remove(k);
                }
            }
        }
        let (high, low) = waiter_key(self.advisory_key(&held.key));
        let lower_to = state
            .timeout_for(None, Instant::now())
            .filter(|&wanted| state.timeout_needs(wanted));
        let (marker_on, (tag, limit)) = match hold.marker {
            Some(marker) => (true, marker),
            None => (false, (0, 0)),
        };
        let query = sqlx::query(UNLOCK_SHARED_SQL)
            .bind(hold.exclusive.clone())
            .bind(hold.shared.clone())
            .bind(marker_on)
            .bind(tag)
            .bind(limit)
            .bind(high)
            .bind(low)
            .bind(&self.channel)
            .bind(held.key.as_str())
            .bind(lower_to.map(|t| t.to_string()).unwrap_or_default());
        let _flight = InFlight::start(in_flight);
        let result = state.fetch_one(query, self.config.op_timeout).await;
        self.hub.notify(held.key.as_str());
        match result {
            Ok(Ok(row)) => {
                let decoded = (|| {
                    let a: bool = row.try_get(0)?;
                    let b: bool = row.try_get(1)?;
                    let c: bool = row.try_get(2)?;
                    let pid: i32 = row.try_get(5)?;
                    Ok::<_, sqlx::Error>((a && b && c, pid))
                })();
                match decoded {
                    Ok((_, pid)) if pid != state.pid => Err(UnlockFailure::Failed(
                        self.session_switched(&held.session, &mut state, pid),
                    )),
                    Ok((all, _)) => {
                        if let Some(timeout) = lower_to {
                            state.timeout_set_ms = timeout;
                        }
                        Ok(all)
                    }
                    Err(error) => {
                        self.break_session(&held.session, &mut state, "unexpected release answer");
                        Err(UnlockFailure::Failed(map_error(
                            "decoding the release answer",
                            error,
                        )))
                    }
                }
            }
            Ok(Err(error)) => {
                self.break_session(&held.session, &mut state, "release failed");
                Err(UnlockFailure::Failed(map_error("release", error)))
            }
            Err(_) => {
                self.break_session(&held.session, &mut state, "release timed out");
                Err(UnlockFailure::Failed(timed_out(
                    "release",
                    self.config.op_timeout,
                )))
            }
        }
    }
}

/// Two callers disagree on a semaphore's limit while permits are held.
fn limit_mismatch(key: &LockKey, held_with: i32, asked: u32) -> LockError {
    LockError::InvalidConfig(format!(
        "semaphore {key} is held with a limit of {held_with} permits; a request with a limit \
         of {asked} is refused (every caller must use the same limit; a new limit applies once \
         no permit is held)"
    ))
}
