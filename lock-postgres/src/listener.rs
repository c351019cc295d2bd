//! Release wake-ups: one `LISTEN` connection per backend and one waiter connection that marks
//! waited-for keys.

use super::*;

/// How often the waiter and listener connections send a statement while they are open:
/// it keeps them inside their [`IDLE_CONNECTION_TIMEOUT`] and finds a connection the server
/// ended behind our back (terminated, restarted, a timeout of its own) within this long.
pub const WAITER_PING_EVERY: Duration = Duration::from_secs(1);

/// `idle_session_timeout` of the waiter and listener sessions on the server. They wait idle by
/// design, so a role's or database's own (shorter) setting would end them over and over; and
/// without one, the sessions of a frozen or cut-off process (its waiter marks, which make
/// every release pay for a NOTIFY, and its place in the notification queue) would stay until
/// the server's TCP keepalive gives up (2 h by default). The process pings every
/// [`WAITER_PING_EVERY`], so only a process that stopped talking is ended.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Session settings of the waiter and listener connections: the idle timeout above, and
/// server-side TCP keepalives (probe after 5 s of silence, every 2 s, give up after 3) so a
/// dead peer is found even while the server has something to send it. Holder sessions get
/// neither: their timeout is the lock TTL, and ending them sooner would lose locks early.
pub(crate) fn idle_connection_settings() -> String {
    format!(
        "SELECT set_config('idle_session_timeout', '{}', false), \
           set_config('tcp_keepalives_idle', '5', false), \
           set_config('tcp_keepalives_interval', '2', false), \
           set_config('tcp_keepalives_count', '3', false)",
        IDLE_CONNECTION_TIMEOUT.as_millis()
    )
}

/// A `LISTEN`ing connection on `channel` (its own pool of one, so sqlx reconnects it), with
/// [`idle_connection_settings`] on every connection.
pub(crate) async fn connect_listener(
    options: PgConnectOptions,
    channel: &str,
    timeout: Duration,
) -> Result<PgListener, sqlx::Error> {
    // The whole of it, `LISTEN` included, within the timeout: a server that accepts and then
    // goes silent must not stall the listener's task (and its reconnects) until TCP gives up.
    tokio::time::timeout(timeout, connect_listener_now(options, channel, timeout))
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

async fn connect_listener_now(
    options: PgConnectOptions,
    channel: &str,
    timeout: Duration,
) -> Result<PgListener, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(timeout)
        .idle_timeout(None)
        .max_lifetime(None)
        // Also when the listener reconnects.
        .after_connect(|conn, _| {
            Box::pin(async move { first_settings(conn, &idle_connection_settings()).await })
        })
        .connect_with(options)
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

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
    let work = connect_listener(listen_options.clone(), &inner.channel, timeout);
    // The waiter session connects beside the listener, not after it: a subscriber waits for
    // both within SUBSCRIBE_BUDGET (250 ms), and one connection with TLS and a password took
    // ~150 ms of CPU in a debug build. Failing here, it connects at the first mark.
    let waiter_work = open_waiter_session(&waiter_options, Instant::now() + timeout, timeout);
    let (result, waiter_conn) = tokio::join!(tokio::time::timeout(timeout, work), waiter_work);
    let waiter_conn = waiter_conn
        .inspect_err(|error| tracing::debug!(%error, "waiter session not connected yet"))
        .ok();
    let result = match result {
        Ok(Ok(listener)) => Ok(listener),
        Ok(Err(error)) => Err(connect_error(
            "starting the release listener",
            &listen_options,
            error,
        )),
        Err(_) => Err(timed_out("starting the release listener", timeout)),
    };
    let mut phase = lock(&inner.listener);
    match result {
        Ok(listener) if !inner.closed.is_cancelled() => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let _ = inner.waiter_tx.set(tx.clone());
            *phase = ListenerPhase::Up(Listening {
                listen: tokio::spawn(listen_loop(
                    listener,
                    ListenerSource {
                        options: listen_options,
                        channel: inner.channel.clone(),
                        timeout,
                    },
                    inner.hub.clone(),
                    tx.clone(),
                )),
                waiters: tokio::spawn(waiter_loop(
                    rx,
                    waiter_conn,
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
    /// The listener lost its connection (a restart or a terminate may have ended the waiter
    /// session too): check the waiter session now, and mark every waited-for key again on a
    /// new one if it is gone.
    Check,
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
///
/// The server can end the waiter session behind our back (terminate, restart, a timeout),
/// and its marks with it. So a mark is acknowledged only after the session answered: a new
/// key is marked on it, an already marked key costs a ping. A connection that fails is
/// replaced at once and every waited-for key marked again; a ping every
/// [`WAITER_PING_EVERY`] (and a [`WaiterCommand::Check`] from the listener) finds a dead one
/// while no command comes, so a key with waiters all along does not fall back to polling.
pub(crate) async fn waiter_loop(
    mut commands: tokio::sync::mpsc::UnboundedReceiver<WaiterCommand>,
    conn: Option<PgConnection>,
    options: PgConnectOptions,
    namespace: String,
    timeout: Duration,
    hub: ReleaseHub,
) {
    let mut waiter = WaiterSession {
        conn,
        marked: std::collections::HashSet::new(),
        options,
        namespace,
        timeout,
        hub,
    };
    let mut ping = tokio::time::interval(WAITER_PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let command = tokio::select! {
            command = commands.recv() => match command {
                Some(command) => command,
                None => return,
            },
            _ = ping.tick() => WaiterCommand::Check,
        };
        let deadline = Instant::now() + waiter.timeout;
        match command {
            WaiterCommand::Mark(key, ack) => {
                let result = waiter.mark(&key, deadline).await;
                let _ = ack.send(result);
            }
            WaiterCommand::Forget(key) => waiter.forget(&key, deadline).await,
            WaiterCommand::Check => {
                let ping_by = Instant::now() + WAITER_PING_EVERY;
                if let Err(error) = waiter.check(ping_by.min(deadline), deadline).await {
                    tracing::debug!(%error, "waiter session lost; its keys are marked again at the next subscribe");
                }
            }
        }
    }
}

/// A new waiter session with [`idle_connection_settings`], by `deadline`.
async fn open_waiter_session(
    options: &PgConnectOptions,
    deadline: Instant,
    timeout: Duration,
) -> Result<PgConnection, LockError> {
    let work = async {
        let mut fresh = options.connect().await?;
        first_settings(&mut fresh, &idle_connection_settings()).await?;
        Ok::<_, sqlx::Error>(fresh)
    };
    timeout_at(deadline, work)
        .await
        .map_err(|_| timed_out("connecting the waiter session", timeout))?
        .map_err(|error| connect_error("connecting the waiter session", options, error))
}

/// The waiter connection and the keys marked on it.
struct WaiterSession {
    conn: Option<PgConnection>,
    /// Keys that should be marked; when `conn` is there, all of them are marked on it.
    marked: std::collections::HashSet<String>,
    options: PgConnectOptions,
    namespace: String,
    timeout: Duration,
    hub: ReleaseHub,
}

impl WaiterSession {
    fn pair(&self, key: &str) -> (i32, i32) {
        waiter_key(advisory_key(&self.namespace, key))
    }

    /// Opens a new waiter session and marks every key that still has waiters on it.
    async fn reconnect(&mut self, deadline: Instant) -> Result<(), LockError> {
        self.conn = None;
        let mut fresh = open_waiter_session(&self.options, deadline, self.timeout).await?;
        let hub = self.hub.clone();
        self.marked.retain(|key| hub.has_waiters(key));
        let pairs: Vec<(i32, i32)> = self.marked.iter().map(|key| self.pair(key)).collect();
        for pair in pairs {
            try_mark(&mut fresh, pair, deadline).await?;
        }
        self.conn = Some(fresh);
        Ok(())
    }

    /// Makes sure `key`'s mark is in place (see [`waiter_loop`]): on the live session, or on
    /// a new one if that fails (once).
    async fn mark(&mut self, key: &str, deadline: Instant) -> Result<(), LockError> {
        if !self.hub.has_waiters(key) {
            return Ok(());
        }
        let mut retried = false;
        loop {
            if self.conn.is_none() {
                let reconnected = self.reconnect(deadline).await;
                if reconnected.is_err() {
                    // Unknown state: start over on a fresh session next time.
                    self.conn = None;
                }
                reconnected?;
            }
            let pair = self.pair(key);
            let already = self.marked.contains(key);
            let Some(live) = self.conn.as_mut() else {
                continue;
            };
            let result = if already {
                // Marked on this session, if the server still has it.
                match timeout_at(deadline, sqlx::Connection::ping(live)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(map_error("checking the waiter session", error)),
                    Err(_) => Err(timed_out("checking the waiter session", self.timeout)),
                }
            } else {
                try_mark(live, pair, deadline).await
            };
            match result {
                Ok(()) => {
                    self.marked.insert(key.to_owned());
                    return Ok(());
                }
                // The session is gone or in an unknown state: a new one marks every key
                // again, this one included.
                Err(error) if retried || Instant::now() >= deadline => {
                    self.conn = None;
                    return Err(error);
                }
                Err(error) => {
                    tracing::debug!(%error, "waiter session failed; reconnecting");
                    self.conn = None;
                    self.marked.insert(key.to_owned());
                    retried = true;
                }
            }
        }
    }

    /// Drops `key`'s mark if no subscription of it is left.
    async fn forget(&mut self, key: &str, deadline: Instant) {
        if !self.marked.contains(key) || self.hub.has_waiters(key) {
            return;
        }
        self.marked.remove(key);
        let (high, low) = self.pair(key);
        let Some(live) = self.conn.as_mut() else {
            return;
        };
        let query = sqlx::query("SELECT pg_advisory_unlock_shared($1, $2)::text")
            .bind(high)
            .bind(low)
            .execute(live);
        if !matches!(timeout_at(deadline, query).await, Ok(Ok(_))) {
            self.conn = None;
        }
    }

    /// Pings the session (answer by `ping_by`), which also keeps it inside its idle timeout;
    /// if it is gone and keys are waited for, marks them again on a new one.
    async fn check(&mut self, ping_by: Instant, deadline: Instant) -> Result<(), LockError> {
        if let Some(live) = self.conn.as_mut()
            && matches!(
                timeout_at(ping_by, sqlx::Connection::ping(live)).await,
                Ok(Ok(()))
            )
        {
            return Ok(());
        }
        self.conn = None;
        let hub = self.hub.clone();
        self.marked.retain(|key| hub.has_waiters(key));
        if self.marked.is_empty() {
            // Nothing to mark: the next subscribe connects.
            return Ok(());
        }
        self.reconnect(deadline).await
    }
}

/// Where [`listen_loop`] connects a new listener.
pub(crate) struct ListenerSource {
    pub(crate) options: PgConnectOptions,
    pub(crate) channel: String,
    pub(crate) timeout: Duration,
}

/// Delivers notifications to the hub. Between them it pings the connection every
/// [`WAITER_PING_EVERY`]: the session's idle timeout must not end a listener that merely
/// waits (waiting for the next message is cancel-safe in sqlx), and a connection that went
/// silent (the server ended the session but nothing reaches us) is replaced. sqlx reconnects
/// a connection that reports its loss itself. Releases in between were missed, so every
/// waiter tries again, and the waiter session, likely ended by the same cause, is checked.
pub(crate) async fn listen_loop(
    listener: PgListener,
    source: ListenerSource,
    hub: ReleaseHub,
    waiter: tokio::sync::mpsc::UnboundedSender<WaiterCommand>,
) {
    let lost = || {
        hub.notify_all();
        let _ = waiter.send(WaiterCommand::Check);
    };
    let mut listener = Some(listener);
    let mut ping = tokio::time::interval(WAITER_PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(live) = listener.as_mut() else {
            // At once, then once per ping interval while connecting fails. (It used to wait
            // a ping interval first: a listener whose end a ping found left waiters without
            // NOTIFY that long; `wakeups_survive_terminated_waiter_and_listener_sessions`
            // failed about 1 run in 6 when the terminate met a ping.)
            match connect_listener(source.options.clone(), &source.channel, source.timeout).await {
                Ok(fresh) => {
                    tracing::debug!("release listener replaced");
                    listener = Some(fresh);
                    lost();
                }
                Err(error) => {
                    tracing::debug!(%error, "release listener not reconnected yet");
                    ping.tick().await;
                }
            }
            continue;
        };
        let received = tokio::select! {
            received = live.try_recv() => received,
            _ = ping.tick() => {
                let pinged = sqlx::raw_sql("SELECT 1").execute(&mut *live);
                if !matches!(tokio::time::timeout(WAITER_PING_EVERY, pinged).await, Ok(Ok(_))) {
                    tracing::debug!("release listener silent; replacing it");
                    listener = None;
                    lost();
                }
                continue;
            }
        };
        match received {
            Ok(Some(notification)) => hub.notify(notification.payload()),
            Ok(None) => {
                tracing::debug!("release listener reconnected");
                lost();
            }
            Err(error) => {
                tracing::warn!(%error, "release listener failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                lost();
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
                    // On the background runtime, and with it the listener's connections
                    // and loops: a caller's runtime that shuts down would end them.
                    if lock_core::spawn_background(start_listener(self.clone(), tx)).is_none() {
                        *phase = ListenerPhase::Down;
                        return false;
                    }
                    rx
                }
            }
        };
        matches!(
            timeout_at(deadline, ready.wait_for(|up| *up)).await,
            Ok(Ok(_))
        )
    }

    /// A subscriber whose listener or mark was not in place within [`SUBSCRIBE_BUDGET`]
    /// polls with the client's backoff, which may be long (seconds). On a task, this waits
    /// (up to the connect timeout) for both, then wakes the key's local waiters once: a
    /// release before the mark sent no NOTIFY, so they try again now, and later releases
    /// NOTIFY them. (Before, over TLS with a password in a debug build, a waiter whose two
    /// sessions were still connecting slept through a release until its 5 s poll: conformance
    /// case `semaphore_release_wakes_waiter`.)
    pub(crate) fn mark_late(self: Arc<Self>, key: String) {
        lock_core::spawn_background(async move {
            let deadline = Instant::now() + self.config.connect_timeout;
            if !self.closed.is_cancelled()
                && self.ensure_listener(deadline).await
                && self.register_waiter(&key, deadline).await.is_ok()
                && self.hub.has_waiters(&key)
            {
                self.hub.notify(&key);
            }
        });
    }

    /// A waiter's subscription to `key`'s releases. A plain lock held here needs no mark: our
    /// own release wakes the waiter (no NOTIFY per release, nor its echo; see blocker.rs).
    /// Otherwise the key is marked now (`mark`), or, for a waiter that will wait on the
    /// server, left unmarked: the server grants it the lock itself, and a mark would make
    /// every release of the key pay for a NOTIFY (and its commit) that nobody needs; one that
    /// cannot wait there marks the key then (`PostgresBackend`'s `wait_on_server`).
    pub(crate) async fn subscribe_waiter(self: &Arc<Self>, key: &LockKey, mark: bool) -> Releases {
        let releases = self.hub.subscribe(key.as_str());
        if mark {
            // A waiter of release signals needs a blocker for a holder session the server
            // ends, whatever waits on the server (before or after it): see `signal_waited`.
            self.note_signal_waiter(key);
        }
        if self.subscribe_without_mark(key) {
            return releases;
        }
        if mark {
            self.mark_for_signals(key).await;
        } else {
            // After subscribing: the set forgets keys nobody is subscribed to.
            self.note_unmarked_server_waiter(key);
        }
        releases
    }

    /// What a waiter of release signals needs (see `subscribe`): the listener up and `key`
    /// marked, waited for under a short budget; past it, in the background (the waiter then
    /// hears local releases, and its backoff bounds the rest).
    pub(crate) async fn mark_for_signals(self: &Arc<Self>, key: &LockKey) {
        // The client subscribes before each attempt, under its own wait deadline, which we do
        // not see: never spend more than a short budget here.
        let deadline = Instant::now() + SUBSCRIBE_BUDGET.min(self.config.op_timeout);
        if !self.ensure_listener(deadline).await {
            tracing::debug!(key = %key, "release listener not up yet; this waiter polls");
            self.clone().mark_late(key.as_str().to_owned());
            return;
        }
        // Every subscriber waits for the key's mark, also one another subscriber started:
        // a release before the mark is in place sends no NOTIFY.
        if let Err(error) = self.register_waiter(key.as_str(), deadline).await {
            tracing::debug!(%error, key = %key, "waiter not marked; it falls back to polling");
            self.clone().mark_late(key.as_str().to_owned());
        }
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
