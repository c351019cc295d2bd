//! Semaphores and reader-writer locks (issue #14), on the same holder sessions, TTL, heartbeat,
//! fence and wake-ups as locks.
//!
//! - **Semaphore** `name` with limit `L`: `L` slot keys derived from the name (in a namespace
//!   of their own, so a lock of the same name is unrelated); a request for `count` permits
//!   tries the slots in order with `pg_try_advisory_lock` and keeps `count` of them, or none
//!   (one statement). Every permit lease also holds the semaphore's *occupancy key* (its base
//!   key) shared. The limit in force is a row of the unlogged table
//!   `<fence schema>.distlock_semaphore_limit`, binding only while the occupancy key is held:
//!   a request that gets the occupancy key exclusively (transaction-level: nobody holds a
//!   permit) writes its limit there; any other request reads it, and another limit is refused
//!   with `InvalidConfig` naming both.
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
CREATE OR REPLACE FUNCTION pg_temp.distlock_permits(slots bigint[], want int, o bigint,
    lim int, own bool, fence regclass, OUT f bigint, OUT taken bigint[], OUT other int)
LANGUAGE plpgsql AS $fn$
DECLARE
  got bigint[] := '{}';
  k bigint;
  cur int;
BEGIN
  -- The occupancy key o: every permit holder holds it shared, so the limit row is binding
  -- exactly while it is held. Only these statements take it exclusively, and only at
  -- transaction level: a shared request waits at most for another attempt's statement.
  IF own THEN
    -- This session holds permits of the semaphore already (it would be granted o
    -- exclusively by itself): the row is binding.
    SELECT permit_limit INTO cur FROM {limits} WHERE name_key = o;
    IF cur IS DISTINCT FROM lim THEN
      other := cur;
      RETURN;
    END IF;
    PERFORM pg_advisory_lock_shared(o);
  ELSIF pg_try_advisory_xact_lock(o) THEN
    -- Nobody holds a permit: this request sets the limit (committed before the
    -- transaction lock goes, so a request that waited for it reads the new row).
    SELECT permit_limit INTO cur FROM {limits} WHERE name_key = o;
    IF cur IS DISTINCT FROM lim THEN
      INSERT INTO {limits} (name_key, permit_limit) VALUES (o, lim)
        ON CONFLICT (name_key) DO UPDATE SET permit_limit = excluded.permit_limit;
    END IF;
    PERFORM pg_advisory_lock_shared(o);
  ELSE
    -- Waits only for an attempt that is setting the limit; held to the end of this
    -- statement, it keeps the row as read. (Reads and writes of the table come before the
    -- session lock: a privilege error then leaves nothing held.)
    PERFORM pg_advisory_xact_lock_shared(o);
    SELECT permit_limit INTO cur FROM {limits} WHERE name_key = o;
    IF cur IS DISTINCT FROM lim THEN
      -- The holders may have left meanwhile: with nobody else on o, we set the limit.
      IF pg_try_advisory_xact_lock(o) THEN
        INSERT INTO {limits} (name_key, permit_limit) VALUES (o, lim)
          ON CONFLICT (name_key) DO UPDATE SET permit_limit = excluded.permit_limit;
      ELSE
        other := cur;
        RETURN;
      END IF;
    END IF;
    PERFORM pg_advisory_lock_shared(o);
  END IF;
  FOREACH k IN ARRAY slots LOOP
    EXIT WHEN cardinality(got) >= want;
    IF pg_try_advisory_lock(k) THEN
      got := got || k;
    END IF;
  END LOOP;
  IF cardinality(got) < want THEN
    PERFORM pg_advisory_unlock(x) FROM unnest(got) x;
    PERFORM pg_advisory_unlock_shared(o);
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
FROM pg_temp.distlock_permits($1, $2, $3, $4, $8, $5::regclass) p";

const RW_SQL: &str = "\
SELECT r.f, NULL::bigint[], NULL::int, pg_backend_pid(),
  CASE WHEN $5 <> '' THEN set_config('idle_session_timeout',
    CASE WHEN r.f IS NULL THEN $6 ELSE $5 END, false) END
FROM pg_temp.distlock_rw($1, $2, $3, $4::regclass) r";

// Every column is evaluated (no short-circuit between them); aggregates read every row.
const UNLOCK_SHARED_SQL: &str = "\
SELECT (SELECT coalesce(bool_and(pg_advisory_unlock(k)), true) FROM unnest($1::bigint[]) k),
  (SELECT coalesce(bool_and(pg_advisory_unlock_shared(k)), true) FROM unnest($2::bigint[]) k),
  CASE WHEN pg_try_advisory_xact_lock($3, $4) THEN NULL ELSE pg_notify($5, $6)::text END,
  CASE WHEN $7 <> '' THEN set_config('idle_session_timeout', $7, false) END,
  pg_backend_pid()";

/// A semaphore request's numbers: the checks every backend makes
/// ([`lock_core::check_permits`]), plus [`MAX_PERMITS`].
pub(crate) fn check_permits(key: &LockKey, limit: u32, count: u32) -> Result<(), LockError> {
    lock_core::check_permits(key, limit, count)?;
    if limit > MAX_PERMITS {
        return Err(LockError::InvalidConfig(format!(
            "semaphore {key}: the postgres backend supports limits up to {MAX_PERMITS}, not \
             {limit}"
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
        let sql = FUNCTIONS_SQL
            .replace("{intent}", &self.table("distlock_rw_intent"))
            .replace("{limits}", &self.table("distlock_semaphore_limit"))
            .replace("{intent_ms}", &WRITER_INTENT.as_millis().to_string());
        let expecting = state.expect_answer();
        let Some(conn) = state.conn.as_mut() else {
            return Err(sqlx::Error::PoolClosed);
        };
        tokio::time::timeout(
            self.config.op_timeout,
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(conn),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
        drop(expecting);
        if state.lost.is_cancelled() {
            return Err(crate::session::reported_lost());
        }
        state.shared_ready = true;
        Ok(())
    }

    /// Table `name` in the fence sequence's schema (as the server quoted it at setup).
    fn table(&self, name: &str) -> String {
        // Setup sets it before the backend exists; "public" only to be total.
        let schema = self.fence_schema.get().map_or("public", String::as_str);
        format!("{schema}.{name}")
    }

    /// Whether both tables exist, looked up on the holder session (one short statement).
    /// `Ok(false)`: the caller lets the session go and runs [`Self::create_tables`] (created
    /// if missing, serialized like the fence sequence's creation; needs CREATE on the schema
    /// only then) on a connection of its own, so that waiting for another process's setup, or
    /// a stall inside the transaction, never holds a session that may hold locks: held, the
    /// session went unread, and one the server ended meanwhile was noticed only after the wait.
    async fn tables_exist(
        &self,
        session: &Session,
        state: &mut SessionState,
    ) -> Result<bool, LockError> {
        if self.tables_ready.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let intent = self.table("distlock_rw_intent");
        let limits = self.table("distlock_semaphore_limit");
        let looked = state
            .fetch_one(
                sqlx::query("SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL")
                    .bind(&intent)
                    .bind(&limits),
                self.config.op_timeout,
            )
            .await;
        let what = "looking for the semaphore and reader-writer tables";
        let exists: bool = match looked {
            Ok(Ok(row)) => row.try_get(0).map_err(|error| map_error(what, error))?,
            Ok(Err(error)) => {
                if is_connection_error(&error) {
                    // Its guards hear it now, not at the next probe.
                    self.break_session(session, state, "looking for the tables failed");
                }
                return Err(map_error(what, error));
            }
            Err(_) => {
                self.break_session(session, state, "looking for the tables timed out");
                return Err(timed_out(what, self.config.op_timeout));
            }
        };
        if exists {
            self.tables_ready.store(true, Ordering::Relaxed);
        }
        Ok(exists)
    }

    /// Creates the tables on a connection of its own (see [`Self::tables_exist`]).
    async fn create_tables(&self) -> Result<(), LockError> {
        let intent = &self.table("distlock_rw_intent");
        let limits = &self.table("distlock_semaphore_limit");
        let table = format!("{intent} / {limits}");
        let options = self
            .options
            .clone()
            .application_name(&format!("{}-setup", self.config.application_name));
        // The setting takes at most 2^31 - 1 ms.
        let op_timeout_ms = self
            .config
            .op_timeout
            .as_millis()
            .clamp(1, i32::MAX as u128)
            .to_string();
        let work = async {
            let mut conn = options.connect().await?;
            let mut tx = sqlx::Connection::begin(&mut conn).await?;
            // A process stopped inside this transaction would keep the setup lock, which every
            // other backend's setup waits for, for as long as it is stopped: the server ends
            // the connection instead.
            sqlx::query("SELECT set_config('idle_in_transaction_session_timeout', $1, true)")
                .bind(&op_timeout_ms)
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
                .bind(SETUP_LOCK.0)
                .bind(SETUP_LOCK.1)
                .execute(&mut *tx)
                .await?;
            // Unlogged: an intent is worth nothing after a crash (it lapses in 2 s anyway),
            // and writing it costs no WAL.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE UNLOGGED TABLE IF NOT EXISTS {intent} \
                 (name_key bigint PRIMARY KEY, until timestamptz NOT NULL)"
            )))
            .execute(&mut *tx)
            .await?;
            // Unlogged too: a crash or failover ends every holder session, so no permit
            // outlives the rows.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE UNLOGGED TABLE IF NOT EXISTS {limits} \
                 (name_key bigint PRIMARY KEY, permit_limit int NOT NULL)"
            )))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            let _ = sqlx::Connection::close(conn).await;
            Ok::<_, sqlx::Error>(())
        };
        // Dropped on a timeout: the server ends the connection and rolls its transaction back.
        match tokio::time::timeout(self.config.op_timeout, work).await {
            Ok(Ok(())) => {
                self.tables_ready.store(true, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("42501") => {
                Err(LockError::InvalidConfig(format!(
                    "semaphores and reader-writer locks need the tables {table}, which do not exist and this \
                     role cannot create them ({db}); have an administrator create them (see the \
                     lock-postgres README) and grant SELECT, INSERT, UPDATE, DELETE on them"
                )))
            }
            Ok(Err(error)) => Err(map_error(
                "creating the semaphore and reader-writer tables",
                error,
            )),
            Err(_) => Err(timed_out(
                "creating the semaphore and reader-writer tables",
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
        if !self.tables_exist(&session, &mut state).await? {
            drop(state);
            self.create_tables().await?;
            state = self.session_conn(&session).await?;
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
                    let own = state
                        .holds
                        .get(&base)
                        .is_some_and(|&(shared, _)| shared > 0);
                    let query = sqlx::query(PERMITS_SQL)
                        .bind(slots)
                        .bind(i32::try_from(count).unwrap_or(i32::MAX))
                        .bind(base)
                        .bind(i32::try_from(limit).unwrap_or(i32::MAX))
                        .bind(fence_oid)
                        .bind(new)
                        .bind(old)
                        .bind(own);
                    let hold = SharedHold {
                        kind: LeaseKind::Permits { limit, count },
                        exclusive: Vec::new(),
                        shared: vec![base],
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
                        }
                    } else {
                        SharedHold {
                            kind: LeaseKind::Read,
                            exclusive: Vec::new(),
                            shared: vec![k],
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
                // A privilege error on the limit or intent table comes before any lock is
                // taken (or after the function gave its lock back): the session's locks are
                // intact. One on the fence sequence or the WAL message (a right revoked while
                // running) comes after the function took its session locks: a lease-free
                // session gives back all its locks, one with other leases is dropped.
                let message = db.message();
                let on_tables = message.contains("distlock_semaphore_limit")
                    || message.contains("distlock_rw_intent");
                if !on_tables {
                    if state.ttls.is_empty() {
                        state.unlock_all_or_disconnect(self.config.op_timeout).await;
                    } else {
                        self.break_session(&session, &mut state, "privilege refused after locking");
                    }
                }
                return Err(LockError::InvalidConfig(format!(
                    "semaphores and reader-writer locks need SELECT, INSERT, UPDATE and DELETE \
                     on {} and {}: {db}",
                    self.table("distlock_semaphore_limit"),
                    self.table("distlock_rw_intent")
                )));
            }
            Ok(Err(error)) => {
                // The statement may have taken locks before it failed (session locks survive
                // the rollback): a session with other leases is dropped (only that frees them
                // for sure); a lease-free one gives back all its locks.
                if !state.ttls.is_empty() || is_connection_error(&error) {
                    self.break_session(&session, &mut state, "semaphore/rwlock attempt failed");
                } else {
                    state.unlock_all_or_disconnect(self.config.op_timeout).await;
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
            drop(state);
            // Left unmarked by `subscribe` (a plain lock of this name was held): these waiters
            // need the mark, which only a lock's blocker replaces.
            self.mark_if_unmarked(key.as_str());
            return Ok(Attempt::Held { expires_in: None });
        };
        let fence = self.checked_fence(&session, &mut state, fence)?;
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
        let held = HeldLock {
            key: key.clone(),
            shared: Some(Arc::new(hold)),
            owner,
            session: session.clone(),
            epoch: state.epoch,
            ttl_ms,
            deadline,
        };
        let lost_signal = self.record_grant(state, BookKey::Shared(owner), held);
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
        let query = sqlx::query(UNLOCK_SHARED_SQL)
            .bind(hold.exclusive.clone())
            .bind(hold.shared.clone())
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
                    let pid: i32 = row.try_get(4)?;
                    Ok::<_, sqlx::Error>((a && b, pid))
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

/// How many times a limit refusal is checked again before it is reported (see
/// `PostgresBackend::try_shared`).
pub(crate) const LIMIT_RECHECKS: u32 = 3;

/// A phrase of [`lock_core::limit_mismatch`]'s message, by which a limit refusal is known.
const MISMATCH_MARK: &str = "permits; a request with a limit";

/// Whether `error` is a limit refusal ([`limit_mismatch`]).
pub(crate) fn is_limit_mismatch(error: &LockError) -> bool {
    matches!(error, LockError::InvalidConfig(message) if message.contains(MISMATCH_MARK))
}

/// Two callers disagree on a semaphore's limit while permits are held (the shared error,
/// whose message carries [`MISMATCH_MARK`]).
fn limit_mismatch(key: &LockKey, held_with: i32, asked: u32) -> LockError {
    lock_core::limit_mismatch(key, u32::try_from(held_with).unwrap_or(0), asked)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod limit_error_tests {
    use super::*;

    /// The limit retry recognises the shared error by a phrase of its message: keep them in
    /// step.
    #[test]
    fn the_shared_limit_error_carries_the_mark() {
        let key = LockKey::new("payments").unwrap();
        let error = limit_mismatch(&key, 5, 3);
        assert!(is_limit_mismatch(&error), "{error}");
        assert!(!is_limit_mismatch(&check_permits(&key, 0, 1).unwrap_err()));
    }
}
