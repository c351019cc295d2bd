//! Blockers (#13): hearing at once that the server ended a lock holder's session, on a
//! bounded set of connections.
//!
//! A release NOTIFYs waiters, but a lock the *server* frees (its holder session terminated,
//! ended by `idle_session_timeout`, its connection closed) sends nothing: waiters used to
//! learn of it at their next backoff step, up to the backoff cap (1 s) late. Every holder
//! session takes its *alive key* `(HOLDER_ALIVE_CLASS, pid)` exclusively when it connects and
//! never gives it back. For a key whose attempt the server answered "held" while this backend
//! has waiters for it, one blocker connection runs one statement ([`BLOCK_SQL`]) that finds
//! the holder's pid in `pg_locks` and asks for its alive key shared (given back in the same
//! statement): it returns the moment that session ends, and the blocker then wakes the key's
//! next local waiter through the hub, which tries at once on its holder session.
//!
//! - **Why the alive key, not the lock's key.** The design first suggested,
//!   `pg_advisory_lock_shared(k), pg_advisory_unlock_shared(k)`, also returns on a release,
//!   but the shared lock it is granted for that instant makes a `pg_try_advisory_lock(k)` sent
//!   just after the release fail, also another process's: the conformance case
//!   `wait_timeout_is_bounded` failed with it ("timed-out waiters left the key blocked": a
//!   blocker still queued when the holder released). The alive key is no one's lock.
//!   Releases keep coming by NOTIFY (the waiter mark), as before.
//! - **Bounded.** At most [`MAX_BLOCKERS`] connections per backend (`<app>-blocker`), one key
//!   each at a time; keys beyond that keep the NOTIFY + backoff path.
//! - **Armed by a held answer.** A blocker blocks once per `try_acquire` of the key that the
//!   server answered "held" while the hub has waiters for it (the client's re-check right
//!   after subscribing is such an attempt), and again after each lock timeout while waiters
//!   remain (the holder may have changed: the lookup is redone). A holder that is not a
//!   distlock holder session (no alive key) is not waited on, and a key with a waiter that
//!   waits on the server (`server_wait.rs`) arms none: the server grants that waiter the
//!   lock when the holder's session ends.
//! - **Cancel-safe.** The statement runs under `lock_timeout` = [`BLOCKER_LOCK_TIMEOUT`], so a
//!   waiter that gave up leaves a queued request (on the alive key, never on the lock) for at
//!   most that long, and never a lock; a statement we stop waiting for drops its connection.
//!   The hub's idle hook retires the key's blocker when its last waiter goes; a blocker idle
//!   for [`BLOCKER_IDLE`] frees its slot; all are aborted with the backend.
//! - **Plain locks only.** Semaphores and reader-writer locks stay on NOTIFY + backoff.

use super::*;

/// Most blocker connections (and keys blocked on at once) per backend.
pub const MAX_BLOCKERS: usize = 4;

/// A blocker not armed for this long gives its slot (and connection, to the idle set) back.
pub(crate) const BLOCKER_IDLE: Duration = Duration::from_secs(1);

/// An idle blocker connection older than this is closed rather than reused: the server ends
/// it at [`IDLE_CONNECTION_TIMEOUT`].
const BLOCKER_REUSE_WITHIN: Duration = Duration::from_secs(3);

/// Finds the session holding advisory key `$1` and, if it is a holder session with an alive
/// key (a distlock backend's), waits until that session ends (see [`HOLDER_ALIVE_CLASS`]),
/// giving the shared lock on the alive key back in the same statement. No row: the key is
/// not held. A NULL: its holder has no alive key (not a distlock holder session).
pub(crate) const BLOCK_SQL: &str = "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks a WHERE a.locktype = 'advisory' \
       AND a.granted AND a.objsubid = 2 AND a.classid = 1684826977::oid \
       AND a.objid = h.pid::oid AND a.pid = h.pid) \
     THEN pg_advisory_lock_shared(1684826977, h.pid)::text \
       || pg_advisory_unlock_shared(1684826977, h.pid)::text END \
     FROM (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
       AND mode = 'ExclusiveLock' AND objsubid = 1 \
       AND ((classid::int8 << 32) | objid::int8) = $1 LIMIT 1) h";

/// One key's blocker: armed by each held answer for the key.
#[derive(Debug, Default)]
pub(crate) struct Arm {
    armed: AtomicBool,
    wake: Notify,
}

/// The blockers of a backend, and which waited-for keys have no waiter mark.
#[derive(Debug, Default)]
pub(crate) struct Blockers {
    /// Key → the arm of the task blocking on it, and the task (aborted when the backend is
    /// dropped: it must not keep the backend's sessions alive).
    running: HashMap<String, (Arc<Arm>, tokio::task::AbortHandle)>,
    /// Connections of retired blockers, with when they last answered.
    idle: Vec<(PgConnection, Instant)>,
    /// Plain-lock keys whose last attempt here was answered "held" by this backend's own
    /// book (a holder in this process), not by the server. Bounded: emptied when full.
    held_here: std::collections::HashSet<String>,
    /// Keys with waiters that `subscribe` left without a waiter mark (see
    /// [`Inner::subscribe_without_mark`]); emptied of a key when its last waiter goes.
    unmarked: std::collections::HashSet<String>,
    /// Keys with a waiter of release signals (`subscribe`, not a waiter on the server):
    /// their "held" answers arm a blocker even when the key is also in
    /// `Inner::unmarked_server_waiters` (a waiter on the server subscribed before or after,
    /// and may be gone: `Inner::lock_held_elsewhere`). Emptied of a key when its last waiter
    /// goes.
    signal_waited: std::collections::HashSet<String>,
}

/// How many keys [`Blockers::held_here`] remembers before it starts over.
const HELD_HERE_CAPACITY: usize = 4096;

/// What one blocking statement found.
enum Blocked {
    /// The exclusive holder is gone (or the key was free already).
    Free,
    /// Still held after the lock timeout.
    StillHeld,
    /// Held by a session without an alive key: nothing to wait on here.
    Foreign,
    /// The connection failed or did not answer in time (dropped).
    Failed,
}

impl Blockers {
    /// Stops every blocker and closes the idle connections (the backend is dropped).
    pub(crate) fn shut_down(&mut self) {
        for (_, (_, task)) in self.running.drain() {
            task.abort();
        }
        self.idle.clear();
    }

    /// The hub's idle hook: `key` has no waiters left. Its blocker (if any) retires now
    /// instead of holding a slot for [`BLOCKER_IDLE`].
    pub(crate) fn key_idle(&mut self, key: &str) {
        self.unmarked.remove(key);
        self.signal_waited.remove(key);
        if let Some((arm, _)) = self.running.get(key) {
            arm.wake.notify_one();
        }
    }
}

impl Inner {
    /// Whether a new subscriber of `key` can do without the waiter mark (which makes every
    /// release of the key pay for a NOTIFY that, from a releaser in this same process, our
    /// own listener echoes back as a second wake-up: in a loop of 8 workers on one key the
    /// echoes cost 40 % of the rate). True when this backend holds the key as a plain lock:
    /// its release wakes the local waiter directly. If a later attempt finds the key held
    /// by another session, the key is marked then ([`Inner::lock_held_elsewhere`]).
    ///
    /// Decided by how the attempt before the subscription was answered (the client always
    /// tries once first), not only by the book at this instant: in a busy loop the key is
    /// often between two local holders when a waiter subscribes, and one mark taken then
    /// stays as long as the key has waiters (in the 8-worker bench, for the whole run: 0.65
    /// of pgbench's rate instead of 0.98).
    pub(crate) fn subscribe_without_mark(&self, key: &LockKey) -> bool {
        let hash = self.advisory_key(key);
        let held_now = lock(&self.book).entries.contains_key(&BookKey::Lock(hash));
        let mut blockers = lock(&self.blockers);
        if held_now || blockers.held_here.contains(key.as_str()) {
            blockers.unmarked.insert(key.as_str().to_owned());
            return true;
        }
        false
    }

    /// A plain-lock attempt on `key` answered "held" by the book (a holder in this process).
    pub(crate) fn lock_held_here(&self, key: &LockKey) {
        let mut blockers = lock(&self.blockers);
        if blockers.held_here.contains(key.as_str()) {
            return;
        }
        if blockers.held_here.len() >= HELD_HERE_CAPACITY {
            blockers.held_here.clear();
        }
        blockers.held_here.insert(key.as_str().to_owned());
    }

    /// A plain-lock attempt on `key` that the server answered "held": a waited-for key left
    /// unmarked is marked now (the release will NOTIFY; its waiters are woken once, see
    /// [`Inner::mark_late`]), and a blocker waits for the holder's session to end.
    ///
    /// Not for a key with a waiter subscribed to wait on the server that has not fallen back
    /// to release signals (`Inner::unmarked_server_waiters`, `server_wait.rs`): the server grants
    /// it the lock when the holder's session ends, so a blocker only adds a connection and a
    /// `pg_locks` scan per held answer, and its blocked statement sits on the server for up
    /// to [`BLOCKER_LOCK_TIMEOUT`] after the hand-off (the interleaved hand-off bench read
    /// 170–202 µs, 2.62–2.66× the server's queue, with it; 119–124 µs, 2.18–2.21×, without).
    /// If that waiter cannot wait on the server, it forgets the key first and its next held
    /// answer arms one.
    pub(crate) fn lock_held_elsewhere(self: &Arc<Self>, key: &LockKey) {
        let signal_waited = {
            let mut blockers = lock(&self.blockers);
            blockers.held_here.remove(key.as_str());
            blockers.signal_waited.contains(key.as_str())
        };
        self.mark_if_unmarked(key.as_str());
        // A waiter of release signals needs the blocker whatever waits on the server: a
        // waiter on the server leaves the key in that set, and may be gone.
        if signal_waited || !self.has_unmarked_server_waiter(key) {
            self.arm_blocker(key);
        }
    }

    /// A waiter of release signals subscribed to `key` (see [`Blockers::signal_waited`]).
    pub(crate) fn note_signal_waiter(&self, key: &LockKey) {
        lock(&self.blockers)
            .signal_waited
            .insert(key.as_str().to_owned());
    }

    /// A waited-for key left unmarked by `subscribe` that nothing else covers now: mark it.
    pub(crate) fn mark_if_unmarked(self: &Arc<Self>, key: &str) {
        let was_unmarked = lock(&self.blockers).unmarked.remove(key);
        if was_unmarked && self.hub.has_waiters(key) {
            self.clone().mark_late(key.to_owned());
        }
    }

    /// Has a blocker wait for `key`'s holder session to end (starting one if a slot is
    /// free). `true` when one does, or when nobody here waits for the key.
    fn arm_blocker(self: &Arc<Self>, key: &LockKey) -> bool {
        if !self.hub.has_waiters(key.as_str()) {
            return true;
        }
        if self.closed.is_cancelled() {
            return false;
        }
        let mut blockers = lock(&self.blockers);
        if let Some((arm, _)) = blockers.running.get(key.as_str()) {
            arm.armed.store(true, Ordering::SeqCst);
            arm.wake.notify_one();
            return true;
        }
        if blockers.running.len() >= MAX_BLOCKERS {
            return false;
        }
        let arm = Arc::new(Arm::default());
        arm.armed.store(true, Ordering::SeqCst);
        // Reuse an idle connection if a fresh enough one is there (taken here, under the
        // lock, so connections never outnumber the slots).
        let now = Instant::now();
        blockers
            .idle
            .retain(|(_, at)| now.saturating_duration_since(*at) < BLOCKER_REUSE_WITHIN);
        let conn = blockers.idle.pop().map(|(conn, _)| conn);
        let hash = self.advisory_key(key);
        // Spawned under the lock: the task's own retirement waits for this entry.
        // On the background runtime, as its connection: not ended with a caller's runtime.
        let Some(task) = lock_core::spawn_background(self.clone().run_blocker(
            key.clone(),
            hash,
            arm.clone(),
            conn,
        )) else {
            return false;
        };
        blockers
            .running
            .insert(key.as_str().to_owned(), (arm, task.abort_handle()));
        true
    }

    async fn run_blocker(
        self: Arc<Self>,
        key: LockKey,
        hash: i64,
        arm: Arc<Arm>,
        mut conn: Option<PgConnection>,
    ) {
        let mut failures = 0;
        loop {
            if !arm.armed.swap(false, Ordering::SeqCst) {
                let woken = tokio::time::timeout(BLOCKER_IDLE, arm.wake.notified())
                    .await
                    .is_ok();
                // Not armed: idle for BLOCKER_IDLE, or woken because the key's last waiter
                // went. Either way the slot goes back (a later held answer starts a new one).
                // (One swap: a second one would throw away the arm that woke us.)
                if !arm.armed.swap(false, Ordering::SeqCst) {
                    if (!woken || !self.hub.has_waiters(key.as_str()))
                        && self.retire_blocker(&key, &arm, &mut conn)
                    {
                        return;
                    }
                    continue;
                }
            }
            if !self.hub.has_waiters(key.as_str()) || self.closed.is_cancelled() {
                continue;
            }
            let live = match conn.as_mut() {
                Some(live) => live,
                None => match self.open_blocker_session().await {
                    Ok(fresh) => conn.insert(fresh),
                    Err(error) => {
                        tracing::debug!(%error, "no blocker connection; waiters poll");
                        self.retire_blocker_now(&key, &arm, None);
                        return;
                    }
                },
            };
            match self.block_once(live, hash).await {
                Blocked::Free => {
                    failures = 0;
                    self.hub.notify(key.as_str());
                }
                Blocked::Foreign => {
                    tracing::debug!(key = %key, "lock held by a session without an alive key; its waiters poll");
                    self.retire_blocker_now(&key, &arm, conn.take());
                    return;
                }
                Blocked::StillHeld => {
                    failures = 0;
                    // Keep waiting while someone does (checked at the top of the loop).
                    arm.armed.store(true, Ordering::SeqCst);
                }
                Blocked::Failed => {
                    conn = None;
                    failures += 1;
                    // The holder may have gone meanwhile: let the waiter look.
                    self.hub.notify(key.as_str());
                    if failures >= 2 {
                        self.retire_blocker_now(&key, &arm, None);
                        return;
                    }
                    arm.armed.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// One blocking statement, bounded by the lock timeout plus `op_timeout` on our side.
    async fn block_once(&self, conn: &mut PgConnection, hash: i64) -> Blocked {
        let limit = BLOCKER_LOCK_TIMEOUT + self.config.op_timeout;
        let query = sqlx::query_scalar::<_, Option<String>>(BLOCK_SQL)
            .bind(hash)
            .fetch_optional(&mut *conn);
        match tokio::time::timeout(limit, query).await {
            Ok(Ok(Some(None))) => Blocked::Foreign,
            // No row: free; a row: the holder session ended while we waited.
            Ok(Ok(_)) => Blocked::Free,
            // lock_timeout (55P03), or a role's statement_timeout (57014) shorter than it.
            Ok(Err(sqlx::Error::Database(db)))
                if matches!(db.code().as_deref(), Some("55P03" | "57014")) =>
            {
                Blocked::StillHeld
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "blocker statement failed");
                Blocked::Failed
            }
            Err(_) => Blocked::Failed,
        }
    }

    /// Gives the slot up unless the blocker was armed meanwhile (then `false`: go on, with
    /// the connection). A retired blocker's connection joins the idle set.
    fn retire_blocker(
        &self,
        key: &LockKey,
        arm: &Arc<Arm>,
        conn: &mut Option<PgConnection>,
    ) -> bool {
        let mut blockers = lock(&self.blockers);
        // Armed under this lock by `arm_blocker`: checked under it too, so an arm is never
        // left with no task to act on it.
        if arm.armed.load(Ordering::SeqCst) {
            return false;
        }
        if blockers
            .running
            .get(key.as_str())
            .is_some_and(|(ours, _)| Arc::ptr_eq(ours, arm))
        {
            blockers.running.remove(key.as_str());
        }
        if let Some(conn) = conn.take()
            && blockers.idle.len() + blockers.running.len() < MAX_BLOCKERS
            && !self.closed.is_cancelled()
        {
            blockers.idle.push((conn, Instant::now()));
        }
        true
    }

    /// Gives the slot up at once (the blocker cannot run): waiters of an unmarked key get
    /// the mark instead. A connection still good (`conn`) joins the idle set, so a key held
    /// by a foreign session does not cost a connect per attempt.
    fn retire_blocker_now(
        self: &Arc<Self>,
        key: &LockKey,
        arm: &Arc<Arm>,
        conn: Option<PgConnection>,
    ) {
        {
            let mut blockers = lock(&self.blockers);
            if blockers
                .running
                .get(key.as_str())
                .is_some_and(|(ours, _)| Arc::ptr_eq(ours, arm))
            {
                blockers.running.remove(key.as_str());
            }
            if let Some(conn) = conn
                && blockers.idle.len() + blockers.running.len() < MAX_BLOCKERS
                && !self.closed.is_cancelled()
            {
                blockers.idle.push((conn, Instant::now()));
            }
        }
        self.mark_if_unmarked(key.as_str());
    }
    /// A new blocker connection (`<app>-blocker`): the waiter session's idle timeout and
    /// keepalives (a frozen process's queued requests go with its session) and the lock
    /// timeout that bounds each blocking statement.
    async fn open_blocker_session(&self) -> Result<PgConnection, LockError> {
        let options = self
            .options
            .clone()
            .application_name(&format!("{}-blocker", self.config.application_name));
        let timeout = self.config.connect_timeout;
        let work = async {
            let mut fresh = options.connect().await?;
            let settings = format!(
                // statement_timeout 0: a role's shorter one would end each wait early and
                // turn the blocker into a busy loop of pg_locks scans.
                "{}, set_config('lock_timeout', '{}', false), \
                 set_config('statement_timeout', '0', false)",
                idle_connection_settings(),
                BLOCKER_LOCK_TIMEOUT.as_millis()
            );
            first_settings(&mut fresh, &settings).await?;
            Ok::<_, sqlx::Error>(fresh)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| timed_out("connecting a blocker session", timeout))?
            .map_err(|error| connect_error("connecting a blocker session", &options, error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statement spells [`HOLDER_ALIVE_CLASS`] out as a literal: they must agree.
    #[test]
    fn block_sql_names_the_alive_class() {
        let literal = HOLDER_ALIVE_CLASS.to_string();
        assert_eq!(BLOCK_SQL.matches(literal.as_str()).count(), 3);
    }
}
