//! Blockers (#13): waiting server-side for a held lock to go, on a bounded set of
//! connections.
//!
//! A release NOTIFYs waiters, but a lock the *server* frees (its holder session terminated,
//! ended by `idle_session_timeout`, its connection closed) sends nothing: waiters used to
//! learn of it at their next backoff step, up to the backoff cap (1 s) late. A blocker asks
//! the server instead: for a key whose last attempt from this backend found it held while
//! the backend has waiters for it, one blocker connection runs
//!
//! ```sql
//! SELECT pg_advisory_lock_shared(k), pg_advisory_unlock_shared(k)
//! ```
//!
//! which returns the moment the exclusive holder is gone, however it went (released, session
//! ended), and gives the shared lock back in the same statement (a shared lock held even
//! briefly makes other processes' `pg_try_advisory_lock` fail, so it never outlives the
//! statement). On its return the blocker wakes the key's next local waiter through the
//! hub, which then tries at once on its holder session. The wait is level-triggered: a
//! release between the waiter's failed attempt and the blocker's statement makes the
//! statement return at once, so nothing is missed.
//!
//! - **Bounded.** At most [`MAX_BLOCKERS`] connections per backend (`<app>-blocker`), one key
//!   each at a time; keys beyond that keep the NOTIFY + backoff path, which stays in place
//!   for every key anyway (blockers add a wake-up, they replace nothing).
//! - **Armed by a held answer.** A blocker blocks once per `try_acquire` of the key that the
//!   server answered "held" while the hub has waiters for it (the client's re-check right
//!   after subscribing is such an attempt). After its statement returns it waits for the next
//!   such answer, so it never spins on a free key while the woken waiter's attempt is in
//!   flight. A key whose lock this backend holds itself needs none: the local release wakes
//!   the waiter.
//! - **Cancel-safe.** The statement runs under `lock_timeout` = [`BLOCKER_LOCK_TIMEOUT`], and
//!   after a timeout the blocker blocks again only while the key still has waiters, so a
//!   waiter that gave up leaves a queued request behind for at most that long, and never a
//!   lock (the shared lock is given back within the statement; a statement we stop waiting
//!   for drops its connection, which ends the session and its requests). A blocker idle for
//!   [`BLOCKER_IDLE`] frees its slot.
//! - **Plain locks only.** Semaphores and reader-writer locks use other advisory keys (slots,
//!   sides) and stay on the NOTIFY + backoff path.

use super::*;

/// Most blocker connections (and keys blocked on at once) per backend.
pub const MAX_BLOCKERS: usize = 4;

/// A blocker not armed for this long gives its slot (and connection, to the idle set) back.
pub(crate) const BLOCKER_IDLE: Duration = Duration::from_secs(1);

/// An idle blocker connection older than this is closed rather than reused: the server ends
/// it at [`IDLE_CONNECTION_TIMEOUT`].
const BLOCKER_REUSE_WITHIN: Duration = Duration::from_secs(3);

const BLOCK_SQL: &str = "SELECT pg_advisory_lock_shared($1)::text, pg_advisory_unlock_shared($1)";

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
    /// Keys whose last attempt here was a plain lock the server answered "held" (bounded:
    /// emptied when full). Read by `subscribe`.
    lock_held: std::collections::HashSet<String>,
    /// Keys with waiters that `subscribe` left without a waiter mark (see
    /// [`Inner::subscribe_without_mark`]); emptied of a key when its last waiter goes.
    unmarked: std::collections::HashSet<String>,
}

/// How many keys [`Blockers::lock_held`] remembers before it starts over.
const LOCK_HELD_CAPACITY: usize = 4096;

/// What one blocking statement found.
enum Blocked {
    /// The exclusive holder is gone (or the key was free already).
    Free,
    /// Still held after the lock timeout.
    StillHeld,
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
        if let Some((arm, _)) = self.running.get(key) {
            arm.wake.notify_one();
        }
    }
}

impl Inner {
    /// Whether a new subscriber of `key` can do without the waiter mark (and so without
    /// making every release of the key pay for a NOTIFY, which a releaser in this same
    /// process then echoes back to us: in a loop of 8 workers on one key the echoes cost
    /// 40 % of the rate). True when the key is a plain lock held here (our release wakes
    /// the waiter locally) or held elsewhere with a blocker slot for it: then every attempt
    /// the server answers "held" arms a blocker, and if none can be had the key is marked
    /// then ([`Inner::lock_held_elsewhere`]). Semaphores and reader-writer locks always mark.
    pub(crate) fn subscribe_without_mark(&self, key: &LockKey) -> bool {
        let hash = self.advisory_key(key);
        let held_here = lock(&self.book).entries.contains_key(&BookKey::Lock(hash));
        let mut blockers = lock(&self.blockers);
        let lock_wait = held_here || blockers.lock_held.contains(key.as_str());
        let slot =
            blockers.running.contains_key(key.as_str()) || blockers.running.len() < MAX_BLOCKERS;
        if lock_wait && slot {
            blockers.unmarked.insert(key.as_str().to_owned());
            return true;
        }
        false
    }

    /// A plain-lock attempt on `key` that the server answered "held": a blocker waits for
    /// the holder to go if the backend has waiters; a waited-for key left unmarked that gets
    /// no blocker is marked now (and its waiters woken once, see [`Inner::mark_late`]).
    pub(crate) fn lock_held_elsewhere(self: &Arc<Self>, key: &LockKey) {
        {
            let mut blockers = lock(&self.blockers);
            if blockers.lock_held.len() >= LOCK_HELD_CAPACITY {
                blockers.lock_held.clear();
            }
            if !blockers.lock_held.contains(key.as_str()) {
                blockers.lock_held.insert(key.as_str().to_owned());
            }
        }
        if !self.arm_blocker(key) {
            self.mark_if_unmarked(key.as_str());
        }
    }

    /// A waited-for key left unmarked by `subscribe` that nothing else covers now: mark it.
    pub(crate) fn mark_if_unmarked(self: &Arc<Self>, key: &str) {
        let was_unmarked = lock(&self.blockers).unmarked.remove(key);
        if was_unmarked && self.hub.has_waiters(key) {
            self.clone().mark_late(key.to_owned());
        }
    }

    /// Has a blocker wait for `key`'s holder to go (starting one if a slot is free). `true`
    /// when one does, or when nobody here waits for the key. See the module docs.
    fn arm_blocker(self: &Arc<Self>, key: &LockKey) -> bool {
        if !self.hub.has_waiters(key.as_str()) {
            return true;
        }
        if self.closed.load(Ordering::SeqCst) {
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
        let task = tokio::spawn(
            self.clone()
                .run_blocker(key.clone(), hash, arm.clone(), conn),
        );
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
                if !arm.armed.swap(false, Ordering::SeqCst)
                    && (!woken || !self.hub.has_waiters(key.as_str()))
                    && self.retire_blocker(&key, &arm, &mut conn)
                {
                    return;
                }
                if !arm.armed.swap(false, Ordering::SeqCst) {
                    continue;
                }
            }
            if !self.hub.has_waiters(key.as_str()) || self.closed.load(Ordering::SeqCst) {
                continue;
            }
            let live = match conn.as_mut() {
                Some(live) => live,
                None => match self.open_blocker_session().await {
                    Ok(fresh) => conn.insert(fresh),
                    Err(error) => {
                        tracing::debug!(%error, "no blocker connection; waiters poll");
                        self.retire_blocker_now(&key, &arm);
                        return;
                    }
                },
            };
            match self.block_once(live, hash).await {
                Blocked::Free => {
                    failures = 0;
                    self.hub.notify(key.as_str());
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
                        self.retire_blocker_now(&key, &arm);
                        return;
                    }
                    arm.armed.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// One blocking statement, bounded by the lock timeout plus `op_timeout` on our side.
    async fn block_once(&self, conn: &mut PgConnection, hash: i64) -> Blocked {
        let query = sqlx::query(BLOCK_SQL).bind(hash).execute(&mut *conn);
        let limit = BLOCKER_LOCK_TIMEOUT + self.config.op_timeout;
        match tokio::time::timeout(limit, query).await {
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
            && !self.closed.load(Ordering::SeqCst)
        {
            blockers.idle.push((conn, Instant::now()));
        }
        true
    }

    /// Gives the slot up at once (the blocker cannot run): waiters of an unmarked key get
    /// the mark instead.
    fn retire_blocker_now(self: &Arc<Self>, key: &LockKey, arm: &Arc<Arm>) {
        {
            let mut blockers = lock(&self.blockers);
            if blockers
                .running
                .get(key.as_str())
                .is_some_and(|(ours, _)| Arc::ptr_eq(ours, arm))
            {
                blockers.running.remove(key.as_str());
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
                "{}, set_config('lock_timeout', '{}', false)",
                idle_connection_settings(),
                BLOCKER_LOCK_TIMEOUT.as_millis()
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(settings))
                .execute(&mut fresh)
                .await?;
            Ok::<_, sqlx::Error>(fresh)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| timed_out("connecting a blocker session", timeout))?
            .map_err(|error| connect_error("connecting a blocker session", &options, error))
    }
}
