//! Release wake-ups: one `LISTEN` connection per backend and one waiter connection that marks
//! waited-for keys.

use super::*;

/// Connects the release listener and starts its tasks (see [`Inner::ensure_listener`]).
pub(crate) async fn start_listener(inner: Arc<Inner>, ready: tokio::sync::watch::Sender<bool>) {
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
pub(crate) enum ListenerPhase {
    Down,
    /// A task is connecting it; the flag turns true when it runs.
    Starting(tokio::sync::watch::Receiver<bool>),
    Up(Listening),
}

/// The background tasks that deliver release notifications.
#[derive(Debug)]
pub(crate) struct Listening {
    pub(crate) listen: JoinHandle<()>,
    pub(crate) waiters: JoinHandle<()>,
}

#[derive(Debug)]
pub(crate) enum WaiterCommand {
    /// Make sure the key's shared waiter lock is held (a subscription exists).
    Mark(String, tokio::sync::oneshot::Sender<Result<(), LockError>>),
    /// Drop it if no subscription of the key is left.
    Forget(String),
}

/// Takes the shared waiter lock of `pair` without queueing: a releaser holds the same pair
/// exclusively only for the instant of its release statement, so a refusal is retried
/// shortly (that release itself happened before our next attempt, which sees it).
pub(crate) async fn try_mark(
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
pub(crate) async fn waiter_loop(
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

pub(crate) async fn listen_loop(mut listener: PgListener, hub: ReleaseHub) {
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

impl Inner {
    /// Makes sure the release listener runs, or is being started by a background task, and
    /// waits for it until `deadline`. `false`: not (yet) listening; the caller polls. A slow
    /// or unreachable server never holds a subscriber past its budget, and subscribers do not
    /// queue behind each other's connect attempts.
    pub(crate) async fn ensure_listener(self: &Arc<Self>, deadline: Instant) -> bool {
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
    pub(crate) async fn register_waiter(
        &self,
        key: &str,
        deadline: Instant,
    ) -> Result<(), LockError> {
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
