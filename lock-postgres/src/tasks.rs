//! Background tasks: the reaper (locks whose lease ran out unrenewed) and the heartbeat (lost
//! sessions, lock-free sessions' timeouts).

use super::*;

/// Unlocks locks whose renewal did not arrive before their deadline (a guard leaked or a
/// watchdog stopped while this process keeps running).
pub(crate) async fn reaper(inner: Arc<Inner>) {
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
                    Entry::Pending | Entry::Waiting => {}
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
            // Settled however it ends: this task dies with the reaper's runtime.
            let release = inner.settled_release(hash, held);
            tokio::spawn(async move {
                if let Err(error) = release.await {
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
/// locks at once, and the probe lets its guards know within [`loss_notice_bound`] instead of
/// at their next renewal (T/3). A session busy with a statement is skipped: that statement is
/// the probe. Each probe runs on a task of its own, so a silent session (whose probe waits
/// out [`PROBE_TIMEOUT`]) delays no other session's probe.
pub(crate) async fn heartbeat(inner: Arc<Inner>) {
    loop {
        let now = Instant::now();
        let mut sessions: Vec<Arc<Session>> = lock(&inner.sessions).clone();
        // Queue sessions hold their locks like holder sessions (a waiting one is busy and
        // holds nothing).
        sessions.extend(lock(&inner.queue_sessions).iter().cloned());
        // The plan is locked through the scan, so that a first lock either is seen by the
        // scan or sees the plan it makes.
        let (next, probes, resets) = {
            let mut planned = lock(&inner.heartbeat_at);
            let mut next: Option<Instant> = None;
            let mut probes = Vec::new();
            let mut resets = Vec::new();
            for session in &sessions {
                let Ok(state) = session.state.try_lock() else {
                    // Busy: its statement is the probe. One unanswered past the bound counts
                    // as a failed probe: its guards are told now, and the statement's owner
                    // drops the session when it returns (see `SessionState::fetch_one`).
                    let watch = lock(&session.watch);
                    match watch.answer_by {
                        Some(by) if by <= now => {
                            if !watch.lost.is_cancelled() {
                                tracing::warn!(
                                    session = session.id,
                                    "holder session's statement unanswered; its locks are lost"
                                );
                                watch.lost.cancel();
                            }
                            plan(&mut next, now + HEARTBEAT_MAX);
                        }
                        Some(by) => plan(&mut next, by.min(now + HEARTBEAT_MAX)),
                        None => plan(&mut next, now + HEARTBEAT_MAX),
                    }
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
                            resets.push(session.clone());
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
                    probes.push(session.clone());
                    plan(&mut next, now + every);
                } else {
                    plan(&mut next, due);
                }
            }
            *planned = next;
            (next, probes, resets)
        };
        // Off this loop: a probe of a silent session must not hold up the next scan.
        for session in probes {
            let inner = inner.clone();
            tokio::spawn(async move {
                // Taken meanwhile: that statement is the probe.
                if let Some(state) = inner.try_lock_session(&session) {
                    inner.probe(&session, state).await;
                }
            });
        }
        for session in resets {
            let inner = inner.clone();
            tokio::spawn(async move {
                if let Some(state) = inner.try_lock_session(&session) {
                    inner.turn_off_timeout(&session, state).await;
                }
            });
        }
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
pub(crate) fn plan(next: &mut Option<Instant>, at: Instant) {
    *next = Some(next.map_or(at, |next| next.min(at)));
}

impl Inner {
    /// One heartbeat: a statement that sets the session's `idle_session_timeout` afresh to
    /// the latest lease deadline on it (so that a holder stopped after it is freed right
    /// after that deadline, see [`SessionState::timeout_set_ms`]), answered within
    /// [`PROBE_TIMEOUT`]. Any failure leaves the connection in an unknown state, so the
    /// session is dropped and its guards told: a session that stays silent that long may
    /// have been freed by the server already (another process may hold its locks).
    pub(crate) async fn probe(
        &self,
        session: &Session,
        mut state: tokio::sync::MutexGuard<'_, SessionState>,
    ) {
        if state.conn.is_none() {
            return;
        }
        let Some(wanted) = state.timeout_for(None, Instant::now()) else {
            return;
        };
        let query = sqlx::query(RENEW_SQL).bind(wanted.to_string());
        match state.fetch_one(query, self.config.probe_timeout).await {
            Ok(Ok(row)) => match row.try_get::<i32, _>(1) {
                Ok(pid) if pid == state.pid => state.timeout_set_ms = wanted,
                _ => self.break_session(session, &mut state, "unexpected heartbeat answer"),
            },
            Ok(Err(error)) => {
                let why = format!("heartbeat failed: {error}");
                self.break_session(session, &mut state, &why);
            }
            Err(_) => self.break_session(session, &mut state, "heartbeat timed out"),
        }
    }

    /// Turns off the `idle_session_timeout` a lock-free session kept from its last lock. A
    /// failure drops the connection (it held nothing); the next acquire connects again.
    pub(crate) async fn turn_off_timeout(
        &self,
        session: &Session,
        mut state: tokio::sync::MutexGuard<'_, SessionState>,
    ) {
        if !state.ttls.is_empty() {
            return;
        }
        if state.conn.is_none() {
            return;
        }
        let query = sqlx::query(RENEW_SQL).bind("0");
        match state.fetch_one(query, self.config.op_timeout).await {
            Ok(Ok(row)) if row.try_get::<i32, _>(1).is_ok_and(|pid| pid == state.pid) => {
                state.timeout_set_ms = 0;
            }
            _ => {
                tracing::debug!(session = session.id, "lock-free holder session dropped");
                state.disconnect();
            }
        }
    }
}
