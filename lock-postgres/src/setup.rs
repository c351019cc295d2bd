//! Connecting: the server checks (version, no transaction pooler) and the fence sequence.

use super::*;

/// How long the pooler probe waits for its own connection's answer before it ends the second
/// connection's transaction (see [`Inner::check_no_pooler`]).
const POOLER_PROBE_PATIENCE: Duration = Duration::from_millis(500);

/// The server ends the connection kept from `connect` for the first holder session after this
/// long without a statement (the waiter and listener sessions' [`IDLE_CONNECTION_TIMEOUT`]).
pub(crate) const SPARE_IDLE_TIMEOUT: Duration = IDLE_CONNECTION_TIMEOUT;

/// A holder session's settings. `synchronous_commit = off` (server, database or role setting)
/// would let a fence's WAL sit unflushed after its answer: a crash then hands it out again. A
/// session-level setting outranks those, also after a configuration reload; other values
/// (local, remote_write, on, remote_apply) all flush locally and are kept.
/// `idle_session_timeout` is off until a lock is held. Simple protocol (see `has_leftovers`).
const HOLDER_SETTINGS: &str = "SELECT set_config('idle_session_timeout', '0', false), \
     set_config('synchronous_commit', CASE current_setting('synchronous_commit') \
     WHEN 'off' THEN 'on' ELSE current_setting('synchronous_commit') END, false)";

/// Takes the session's alive key (see HOLDER_ALIVE_CLASS): other backends' blockers wait on it
/// to hear at once when the server ends this session. Simple protocol, like the probes (a
/// pooler's shared prepared statements). A try, never a wait: a waiter mark or a blocker's
/// leftover request on the same pair must not stall this connect; without the key, blockers
/// just see a session without one and leave its waiters to NOTIFY and backoff.
async fn take_alive_key(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SELECT pg_try_advisory_lock({HOLDER_ALIVE_CLASS}, pg_backend_pid())"
    )))
    .execute(conn)
    .await?;
    Ok(())
}

/// A holder session that came with leftovers, cleaned: `DISCARD ALL` (which also resets its
/// settings and gives back its alive key), then both again.
async fn clean_holder_session(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    discard_leftovers(conn).await?;
    sqlx::raw_sql(HOLDER_SETTINGS).execute(&mut *conn).await?;
    take_alive_key(conn).await
}

impl Inner {
    /// Checks the server with a throw-away connection (version 14+, no transaction pooler) and
    /// finds the fence sequence, creating it if missing. Returns the sequence's OID.
    pub(crate) async fn setup(&self) -> Result<Oid, LockError> {
        let deadline = Instant::now() + self.config.connect_timeout;
        let (mut conn, pid, leftovers) = self.open_session(deadline, false).await?;
        let checks = async {
            // The pooler check first: the statements after it use named prepared statements,
            // which a transaction pooler breaks with errors that would not name it.
            // (The version needs no query of its own: `open_session` sets
            // idle_session_timeout, which a server before 14 does not know.)
            self.check_no_pooler(&mut conn, pid).await?;
            // No transaction pooler: the session is ours alone and can be cleaned.
            if leftovers {
                clean_holder_session(&mut conn)
                    .await
                    .map_err(|error| map_error("cleaning a session a pooler handed on", error))?;
            }
            self.fence_sequence(&mut conn).await
        };
        let fence = match timeout_at(deadline, checks).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(timed_out(
                    "checking the server and the fence sequence",
                    self.config.connect_timeout,
                ));
            }
        };
        // A connection costs round trips, and with TLS and a password real CPU: the first
        // holder session takes this one (see `reconnect`). Until then it must not outlive a
        // process that froze or was cut off (nothing would end it for the system's 2 h of
        // TCP keepalive): it ends after SPARE_IDLE_TIMEOUT without a statement, and an
        // acquire that finds it ended connects again.
        let parked = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SELECT set_config('idle_session_timeout', '{}', false)",
            SPARE_IDLE_TIMEOUT.as_millis()
        )))
        .execute(&mut conn);
        if matches!(timeout_at(deadline, parked).await, Ok(Ok(_))) {
            *lock(&self.spare) = Some((conn, pid, Instant::now()));
        }
        Ok(fence)
    }

    /// A transaction-pooling PgBouncer hands the most recently used idle server connection
    /// to the next transaction (LIFO), so two probes on one client connection usually land on
    /// the same server session. A second client connection opens a transaction meanwhile:
    /// behind such a pooler it gets our session's server connection (same pid) — checked
    /// before anything else runs, as with a pool of one server connection our next probe
    /// would wait for that transaction — or else our next probe has to run on another one.
    ///
    /// The probes use the simple query protocol: sqlx's named prepared statements would
    /// collide on a shared server connection ("prepared statement already exists") and hide
    /// the pooler behind a confusing error. Errors that only a pooler causes (statement
    /// pooling refusing the transaction, prepared statements missing or duplicated) are
    /// refusals too (see [`is_pooler_error`]).
    pub(crate) async fn check_no_pooler(
        &self,
        conn: &mut PgConnection,
        pid: i32,
    ) -> Result<(), LockError> {
        let other = self
            .options
            .clone()
            .application_name(&format!("{}-probe", self.config.application_name));
        let other = other
            .connect()
            .await
            .map_err(|error| connect_error("connecting to postgres", &self.options, error))?;
        // Closing `other` ends its open transaction too.
        let mut other = Some(other);
        let probe = async {
            let Some(open) = other.as_mut() else {
                return Ok(None);
            };
            sqlx::raw_sql("BEGIN").execute(&mut *open).await?;
            let other_pid = backend_pid(open).await?;
            if other_pid == pid {
                return Ok(Some(format!(
                    "a second client connection ran in this one's server session (pid {pid})"
                )));
            }
            // On a server reached directly this answers at once. Behind a pooler with no
            // server connection to spare it waits for `other`'s transaction: end it after a
            // moment rather than wait for the connect timeout, and look at the answer.
            let again = backend_pid(&mut *conn);
            tokio::pin!(again);
            let again = tokio::select! {
                answer = &mut again => answer?,
                () = tokio::time::sleep(POOLER_PROBE_PATIENCE) => {
                    if let Some(open) = other.take() {
                        let _ = sqlx::Connection::close(open).await;
                    }
                    again.await?
                }
            };
            Ok::<_, sqlx::Error>((again != pid).then(|| {
                format!(
                    "one client connection ran in two server sessions (pid {pid}, then {again})"
                )
            }))
        };
        let outcome = probe.await;
        if let Some(open) = other {
            let _ = sqlx::Connection::close(open).await;
        }
        match outcome {
            Ok(None) => Ok(()),
            Ok(Some(what)) => Err(pooler_refusal(&what)),
            Err(error) if is_pooler_error(&error) => Err(pooler_refusal(&error.to_string())),
            Err(error) => Err(map_error("probing for a connection pooler", error)),
        }
    }

    /// Finds the fence sequence by its schema-qualified name (never through `search_path`,
    /// which differs between roles), creating it only if it is missing (`CREATE SEQUENCE IF
    /// NOT EXISTS` would demand CREATE privilege even when it exists), and checks it can
    /// serve fences: a sequence, increasing, usable by this role.
    pub(crate) async fn fence_sequence(&self, conn: &mut PgConnection) -> Result<Oid, LockError> {
        let name = self.config.fence_sequence.as_str();
        let invalid =
            |why: String| LockError::InvalidConfig(format!("fence_sequence {name:?}: {why}"));
        // The schema, quoted by the server, is where the semaphore and reader-writer tables
        // go: splitting the setting at its last '.' would cut `public."fence.seq"` apart.
        let (parts, schema): (Option<i32>, Option<String>) = sqlx::query_as(
            "SELECT array_length(parse_ident($1), 1), quote_ident((parse_ident($1))[1])",
        )
        .bind(name)
        .fetch_one(&mut *conn)
        .await
        .map_err(|error| invalid(format!("not a valid name: {error}")))?;
        let (Some(2), Some(schema)) = (parts, schema) else {
            return Err(invalid(
                "give it as schema.name, so every role finds the same sequence".into(),
            ));
        };
        let _ = self.fence_schema.set(schema);
        let lookup = "SELECT to_regclass($1)::oid";
        let mut oid: Option<Oid> = sqlx::query_scalar(lookup)
            .bind(name)
            .fetch_one(&mut *conn)
            .await
            .map_err(|error| map_error("looking up the fence sequence", error))?;
        if oid.is_none() {
            oid = self.create_fence_sequence(conn).await?;
        }
        if oid.is_none() {
            oid = sqlx::query_scalar(lookup)
                .bind(name)
                .fetch_one(&mut *conn)
                .await
                .map_err(|error| map_error("looking up the fence sequence", error))?;
        }
        let oid = oid.ok_or_else(|| invalid("it could not be found after creating it".into()))?;
        let row = sqlx::query(
            "SELECT c.relkind::text, s.seqincrement, s.seqcache, s.seqcycle, \
               has_sequence_privilege(c.oid, 'USAGE') OR has_sequence_privilege(c.oid, 'UPDATE'), \
               has_function_privilege('pg_logical_emit_message(boolean, text, text)', 'EXECUTE') \
             FROM pg_class c LEFT JOIN pg_sequence s ON s.seqrelid = c.oid WHERE c.oid = $1",
        )
        .bind(oid)
        .fetch_one(&mut *conn)
        .await
        .map_err(|error| map_error("inspecting the fence sequence", error))?;
        let decoded = (|| {
            Ok::<_, sqlx::Error>((
                row.try_get::<String, _>(0)?,
                row.try_get::<Option<i64>, _>(1)?,
                row.try_get::<Option<i64>, _>(2)?,
                row.try_get::<Option<bool>, _>(3)?,
                row.try_get::<bool, _>(4)?,
                row.try_get::<bool, _>(5)?,
            ))
        })();
        let (kind, increment, cache, cycle, usable, can_flush) =
            decoded.map_err(|error| map_error("inspecting the fence sequence", error))?;
        if kind != "S" {
            return Err(invalid("it exists but is not a sequence".into()));
        }
        if increment.unwrap_or(0) <= 0 {
            return Err(invalid(
                "its increment is not positive: fencing tokens must increase".into(),
            ));
        }
        if !usable {
            return Err(invalid(
                "this role may not draw from it: GRANT USAGE ON SEQUENCE to it".into(),
            ));
        }
        if !can_flush {
            // The acquire statement writes an empty logical message to make its fence's WAL
            // durable (see `ACQUIRE_SQL`); without it every acquire would fail.
            return Err(LockError::InvalidConfig(
                "this role may not execute pg_logical_emit_message, which makes fencing tokens \
                 durable before they are handed out: GRANT EXECUTE ON FUNCTION \
                 pg_logical_emit_message(boolean, text, text) TO <role>"
                    .into(),
            ));
        }
        if let Some(cache) = cache.filter(|&cache| cache > 1) {
            // Each session pre-allocates a block: two sessions' values interleave, so a later
            // holder can get a lower token than an earlier one.
            return Err(invalid(format!(
                "it has CACHE {cache}: each session draws from its own block, so a later \
                 holder can get a lower fencing token; ALTER SEQUENCE {name} CACHE 1"
            )));
        }
        if cycle == Some(true) {
            return Err(invalid(format!(
                "it has CYCLE: after its maximum, fencing tokens would start over; ALTER \
                 SEQUENCE {name} NO CYCLE"
            )));
        }
        Ok(oid)
    }

    /// Creates the fence sequence, serialized between backends by a transaction lock that no
    /// user key can reach (a user's lock named "schema" must not block connecting).
    pub(crate) async fn create_fence_sequence(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Option<Oid>, LockError> {
        let name = self.config.fence_sequence.as_str();
        let work = async {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
                .bind(SETUP_LOCK.0)
                .bind(SETUP_LOCK.1)
                .execute(&mut *tx)
                .await?;
            // Someone may have created it while we waited (if this transaction's catalog
            // caches already show it; if not, the CREATE below says so).
            let existing: Option<Oid> = sqlx::query_scalar("SELECT to_regclass($1)::oid")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            if existing.is_some() {
                tx.commit().await?;
                return Ok(existing);
            }
            // The server quotes each part: the name cannot inject SQL.
            let quoted: String = sqlx::query_scalar(
                "SELECT string_agg(quote_ident(part), '.' ORDER BY n) \
                 FROM unnest(parse_ident($1)) WITH ORDINALITY AS t(part, n)",
            )
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
            let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SEQUENCE {quoted}")))
                .execute(&mut *tx)
                .await;
            if let Err(sqlx::Error::Database(db)) = &created
                && matches!(db.code().as_deref(), Some("42P07" | "23505"))
            {
                // Another backend created it after our look-up: this transaction may still
                // see a cached "no such relation" (an advisory lock does not refresh the
                // catalog caches). Roll back; the caller looks again in a new transaction.
                tx.rollback().await?;
                return Ok(None);
            }
            created?;
            let created: Option<Oid> = sqlx::query_scalar("SELECT to_regclass($1)::oid")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(created)
        };
        work.await.map_err(|error| {
            let code = match &error {
                sqlx::Error::Database(db) => db.code().unwrap_or_default().to_string(),
                _ => String::new(),
            };
            match code.as_str() {
                "42501" | "3F000" => LockError::InvalidConfig(format!(
                    "the fence sequence {name} does not exist and this role cannot create it \
                     ({error}); have an administrator run CREATE SEQUENCE {name}; GRANT USAGE \
                     ON SEQUENCE {name} TO <role>"
                )),
                _ => map_error("creating the fence sequence", error),
            }
        })
    }

    /// Opens a holder-style connection: checks that session state survives between
    /// transactions (it does not behind a transaction-pooling PgBouncer) and turns
    /// `idle_session_timeout` off until a lock is held.
    ///
    /// A session that came with an earlier client's advisory locks or prepared statements
    /// (see [`has_leftovers`]) is cleaned with `DISCARD ALL` when `discard` is set. `setup`
    /// passes false and cleans only after its pooler probe: behind a transaction pooler the
    /// server connection is shared, and wiping its state would break other clients' (the
    /// pooler's own prepared statements); the third value says it is still to be done.
    pub(crate) async fn open_session(
        &self,
        deadline: Instant,
        discard: bool,
    ) -> Result<(PgConnection, i32, bool), LockError> {
        let options = self
            .options
            .clone()
            .application_name(&format!("{}-holder", self.config.application_name));
        let work = async {
            let mut conn = options.connect().await?;
            // Settings and the leftover counts in one round trip.
            let row = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SELECT pg_backend_pid(), {LEFTOVER_COUNTS} FROM ({HOLDER_SETTINGS}) s"
            )))
            .fetch_one(&mut conn)
            .await?;
            let first: i32 = row.try_get(0)?;
            let mut leftovers = has_leftovers(&row, 1)?;
            let second = backend_pid(&mut conn).await?;
            if first == second {
                if leftovers && discard {
                    clean_holder_session(&mut conn).await?;
                    leftovers = false;
                } else {
                    take_alive_key(&mut conn).await?;
                }
            }
            Ok::<_, sqlx::Error>((conn, first, second, leftovers))
        };
        match timeout_at(deadline, work).await {
            Err(_) => Err(timed_out(
                &format!(
                    "connecting to postgres at {}:{}",
                    self.options.get_host(),
                    self.options.get_port()
                ),
                self.config.connect_timeout,
            )),
            Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("42704") => {
                // "unrecognized configuration parameter": idle_session_timeout is new in 14.
                Err(LockError::InvalidConfig(format!(
                    "PostgreSQL 14 or later is required (idle_session_timeout enforces lock \
                     TTLs): {db}"
                )))
            }
            Ok(Err(error)) if is_pooler_error(&error) => Err(pooler_refusal(&error.to_string())),
            Ok(Err(error)) => Err(connect_error("connecting to postgres", &options, error)),
            Ok(Ok((_, first, second, _))) if first != second => Err(pooler_refusal(&format!(
                "two statements on one connection ran in different server sessions (pid \
                 {first}, then {second})"
            ))),
            Ok(Ok((conn, first, _, leftovers))) => Ok((conn, first, leftovers)),
        }
    }
}
