//! Settings: [`PostgresConfig`] and the `postgres://` URL parameters that fill it.

use super::*;

/// Settings of a [`PostgresBackend`].
#[derive(Clone, Debug)]
pub struct PostgresConfig {
    /// Mixed into every key's hash (and the NOTIFY channel), so applications sharing a database do not
    /// share locks. Default `distlock`. Must not contain NUL.
    pub namespace: String,
    /// Most holder sessions (connections) this backend opens. Default 8.
    pub max_sessions: usize,
    /// Holder sessions per distinct TTL; keys are spread over them by hash. Default 4.
    pub sessions_per_ttl: usize,
    /// Most connections on which waiters of plain locks wait on the server itself
    /// (`pg_advisory_lock`), one waiter each: the server grants such a waiter the lock the
    /// moment it is freed, and the connection then holds it (see the README, "Waiting on the
    /// server"). Waiters beyond these wait for release signals. Default
    /// [`QUEUE_SESSIONS`] (4); 0 turns waiting on the server off. At most 64.
    pub queue_sessions: usize,
    /// Bound on opening a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Bound on one statement on a holder session, waiting for the session included. A
    /// statement that takes longer ends the session (and so every lock on it). Default 5 s.
    pub op_timeout: Duration,
    /// Longest a holder session that holds locks may leave a heartbeat probe, or any
    /// statement, unanswered before it counts as gone (its guards are told, the session is
    /// dropped): a silent connection is found [`heartbeat_interval`] + this after its last
    /// answer ([`loss_notice_bound`]). Raise it above the round trip of a slow link. Default
    /// [`PROBE_TIMEOUT`] (250 ms).
    pub probe_timeout: Duration,
    /// `application_name` prefix: holder sessions are `<prefix>-holder`, the listener
    /// `<prefix>-listener`. Default `distlock`.
    pub application_name: String,
    /// Schema-qualified name of the sequence fencing tokens come from; every backend of every
    /// role sharing locks must use the same one. Created (with CACHE 1) if missing, which
    /// needs CREATE on its schema; otherwise USAGE on the sequence is enough. One with
    /// `CACHE > 1` or `CYCLE` is refused (`InvalidConfig`): its tokens are not monotonic.
    /// Default [`FENCE_SEQUENCE`].
    pub fence_sequence: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            namespace: "distlock".into(),
            max_sessions: 8,
            sessions_per_ttl: 4,
            queue_sessions: QUEUE_SESSIONS,
            connect_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(5),
            probe_timeout: PROBE_TIMEOUT,
            application_name: "distlock".into(),
            fence_sequence: FENCE_SEQUENCE.into(),
        }
    }
}

pub(crate) fn parse_url(url: &str) -> Result<(PgConnectOptions, PostgresConfig), LockError> {
    let mut parsed = url::Url::parse(url)
        .map_err(|error| LockError::InvalidConfig(format!("invalid postgres URL: {error}")))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(LockError::InvalidConfig(format!(
            "a postgres URL starts with postgres:// or postgresql://, not {}://",
            parsed.scheme()
        )));
    }
    let mut config = PostgresConfig::default();
    let mut kept = Vec::new();
    let mut system_roots = false;
    let mut ssl_mode: Option<String> = None;
    let bad = |name: &str, value: &str| {
        LockError::InvalidConfig(format!("invalid value {value:?} for URL parameter {name}"))
    };
    let mut seen = std::collections::HashSet::new();
    for (name, value) in parsed.query_pairs() {
        let number = || value.parse::<u64>().map_err(|_| bad(&name, &value));
        // A parameter given twice would be settled silently by its last value (a second
        // `namespace` decides which locks clash with which): refused instead.
        if !seen.insert(canonical_parameter(&name)) {
            return Err(LockError::InvalidConfig(format!(
                "URL parameter {name} is given more than once"
            )));
        }
        match name.as_ref() {
            "namespace" => config.namespace = value.to_string(),
            "max_sessions" => {
                config.max_sessions = usize::try_from(number()?).map_err(|_| bad(&name, &value))?
            }
            "sessions_per_ttl" => {
                config.sessions_per_ttl =
                    usize::try_from(number()?).map_err(|_| bad(&name, &value))?
            }
            "queue_sessions" => {
                config.queue_sessions =
                    usize::try_from(number()?).map_err(|_| bad(&name, &value))?
            }
            "op_timeout_ms" => config.op_timeout = Duration::from_millis(number()?),
            "probe_timeout_ms" => config.probe_timeout = Duration::from_millis(number()?),
            "connect_timeout_ms" => config.connect_timeout = Duration::from_millis(number()?),
            "application_name" => config.application_name = value.to_string(),
            "fence_sequence" => config.fence_sequence = value.to_string(),
            // libpq's "trust the system's roots": sqlx trusts its default roots when no CA is
            // given, so the parameter goes; like libpq, it implies verify-full.
            "sslrootcert" | "ssl-root-cert" | "ssl-ca" if value == "system" => system_roots = true,
            "sslrootcert" | "ssl-root-cert" | "ssl-ca" | "sslcert" | "ssl-cert" | "sslkey"
            | "ssl-key" => {
                check_readable(&format!("URL parameter {name}"), &value, is_key(&name))?;
                kept.push((name.to_string(), value.to_string()))
            }
            "sslmode" | "ssl-mode" => {
                ssl_mode = Some(value.to_string());
                kept.push((name.to_string(), value.to_string()))
            }
            // What sqlx itself reads. It ignores anything else with only a log line, so a
            // typo (`namespce`, which would put these locks in another namespace than their
            // peers') or a libpq parameter sqlx does not know (`connect_timeout`,
            // `target_session_attrs`) is refused rather than silently dropped.
            "statement-cache-capacity"
            | "host"
            | "hostaddr"
            | "port"
            | "dbname"
            | "user"
            | "password"
            | "options" => kept.push((name.to_string(), value.to_string())),
            known if known.starts_with("options[") && known.ends_with(']') => {
                kept.push((name.to_string(), value.to_string()))
            }
            "connect_timeout" => {
                return Err(LockError::InvalidConfig(
                    "URL parameter connect_timeout (libpq's, in seconds) is not read here: use \
                     connect_timeout_ms"
                        .into(),
                ));
            }
            unknown => {
                return Err(LockError::InvalidConfig(format!(
                    "unknown URL parameter {unknown:?} (known: namespace, max_sessions, \
                     sessions_per_ttl, queue_sessions, op_timeout_ms, probe_timeout_ms, \
                     connect_timeout_ms, application_name, fence_sequence, sslmode, \
                     sslrootcert, sslcert, sslkey, statement-cache-capacity, host, hostaddr, \
                     port, dbname, user, password, options)"
                )));
            }
        }
    }
    if system_roots {
        match ssl_mode.as_deref() {
            None => kept.push(("sslmode".into(), "verify-full".into())),
            Some("verify-full") => {}
            Some(weaker) => {
                return Err(LockError::InvalidConfig(format!(
                    "sslrootcert=system needs sslmode=verify-full (as in libpq), not sslmode={weaker}"
                )));
            }
        }
    }
    check_environment(&seen, parsed.port().is_some())?;
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    let mut options = PgConnectOptions::from_str(parsed.as_str())
        .map_err(|error| LockError::InvalidConfig(format!("invalid postgres URL: {error}")))?;
    // sqlx keeps an IPv6 host in its URL brackets (`[::1]`), which no resolver takes.
    let host = options.get_host();
    if let Some(bare) = host
        .strip_prefix('[')
        .and_then(|host| host.strip_suffix(']'))
    {
        let bare = bare.to_owned();
        options = options.host(&bare);
    }
    Ok((options, config))
}

/// A certificate or key file named in the URL must be readable now: sqlx reads it only at
/// the first TLS handshake, where a missing file would look like a connection failure. Inline
/// PEM (sqlx accepts it for these parameters) is not a file.
fn check_readable(what: &str, value: &str, key: bool) -> Result<(), LockError> {
    if value.trim_start().starts_with("-----BEGIN") {
        return Ok(());
    }
    let contents = std::fs::read(value).map_err(|error| {
        LockError::InvalidConfig(format!("{what}: cannot read {value:?}: {error}"))
    })?;
    // sqlx parses the file only at the first TLS handshake, where garbage would read as a
    // failed connection: a PEM file has a BEGIN line.
    if let Some(problem) = lock_core::pem_problem(&contents, key) {
        return Err(LockError::InvalidConfig(format!(
            "{what}: {value:?} {problem}"
        )));
    }
    Ok(())
}

fn is_key(name: &str) -> bool {
    matches!(name, "sslkey" | "ssl-key")
}

/// One name for a URL parameter and its aliases.
fn canonical_parameter(name: &str) -> String {
    match name {
        "ssl-root-cert" | "ssl-ca" => "sslrootcert".into(),
        "ssl-cert" => "sslcert".into(),
        "ssl-key" => "sslkey".into(),
        "ssl-mode" => "sslmode".into(),
        other => other.into(),
    }
}

/// The `PG*` environment variables sqlx reads (as libpq does) for what the URL leaves out.
/// sqlx drops a value it cannot use without a word: `PGSSLMODE=verify-fulll` would connect
/// with `prefer` (no certificate check), `PGPORT=abc` to 5432, and a missing `PGSSLROOTCERT`
/// would fail only at the TLS handshake, looking like an unreachable server. Refused here,
/// naming the variable.
fn check_environment(
    url_parameters: &std::collections::HashSet<String>,
    url_has_port: bool,
) -> Result<(), LockError> {
    let read = |name: &str| -> Result<Option<String>, LockError> {
        match std::env::var(name) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(LockError::InvalidConfig(format!(
                "environment variable {name} is not valid UTF-8"
            ))),
        }
    };
    if !url_parameters.contains("sslmode")
        && let Some(mode) = read("PGSSLMODE")?
        && mode.parse::<sqlx::postgres::PgSslMode>().is_err()
    {
        return Err(LockError::InvalidConfig(format!(
            "environment variable PGSSLMODE={mode:?} is not an sslmode (disable, allow, prefer, \
             require, verify-ca, verify-full)"
        )));
    }
    if !url_has_port
        && !url_parameters.contains("port")
        && let Some(port) = read("PGPORT")?
        && !port.parse::<u16>().is_ok_and(|port| port > 0)
    {
        return Err(LockError::InvalidConfig(format!(
            "environment variable PGPORT={port:?} is not a port number"
        )));
    }
    for (variable, parameter) in [
        ("PGSSLROOTCERT", "sslrootcert"),
        ("PGSSLCERT", "sslcert"),
        ("PGSSLKEY", "sslkey"),
    ] {
        if !url_parameters.contains(parameter)
            && let Some(value) = read(variable)?
        {
            check_readable(
                &format!("environment variable {variable}"),
                &value,
                is_key(parameter),
            )?;
        }
    }
    // The rest (PGHOST, PGUSER, PGPASSWORD, PGDATABASE, PGAPPNAME, PGOPTIONS) are taken as
    // they are, by sqlx as by libpq.
    for name in [
        "PGHOST",
        "PGHOSTADDR",
        "PGUSER",
        "PGPASSWORD",
        "PGDATABASE",
        "PGAPPNAME",
        "PGOPTIONS",
    ] {
        read(name)?;
    }
    Ok(())
}

pub(crate) fn check_config(config: &PostgresConfig) -> Result<(), LockError> {
    // Internal key spaces are the namespace plus a control character and a suffix
    // (`billing\u{1}semaphore`): a namespace with one could name another's semaphores.
    if config.namespace.chars().any(char::is_control) {
        return Err(LockError::InvalidConfig(format!(
            "the namespace {:?} must not contain control characters",
            config.namespace
        )));
    }
    if config.max_sessions == 0 || config.sessions_per_ttl == 0 {
        return Err(LockError::InvalidConfig(
            "max_sessions and sessions_per_ttl must be at least 1".into(),
        ));
    }
    if config.queue_sessions > MAX_QUEUE_SESSIONS {
        return Err(LockError::InvalidConfig(format!(
            "queue_sessions must be at most {MAX_QUEUE_SESSIONS}, not {}",
            config.queue_sessions
        )));
    }
    if let Some(why) = lock_core::timeout_problem(&[
        ("op_timeout", config.op_timeout),
        ("connect_timeout", config.connect_timeout),
        ("probe_timeout", config.probe_timeout),
    ]) {
        return Err(LockError::InvalidConfig(why));
    }
    if config.application_name.contains('\0') {
        return Err(LockError::InvalidConfig(
            "the application_name must not contain NUL".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parameter given twice (or under two of its names) is refused, not settled by the
    /// last one.
    #[test]
    fn a_parameter_given_twice_is_refused() {
        for url in [
            "postgres://u@h/db?namespace=a&namespace=b",
            "postgres://u@h/db?sslmode=require&ssl-mode=disable",
            "postgres://u@h/db?op_timeout_ms=10&op_timeout_ms=10",
        ] {
            match parse_url(url) {
                Err(LockError::InvalidConfig(message)) => {
                    assert!(message.contains("more than once"), "{url}: {message}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_ipv6_host_loses_its_brackets() -> Result<(), LockError> {
        let (options, _) = parse_url("postgres://u@[::1]:5433/db")?;
        assert_eq!(options.get_host(), "::1");
        assert_eq!(options.get_port(), 5433);
        let (options, _) = parse_url("postgres://u@127.0.0.1:5433/db")?;
        assert_eq!(options.get_host(), "127.0.0.1");
        Ok(())
    }

    /// `billing\u{1}semaphore` would share its lock keys with namespace `billing`'s
    /// semaphores.
    #[test]
    fn a_namespace_with_control_characters_is_refused() {
        for namespace in ["billing\u{1}semaphore", "a\0b", "tab\there", "line\n"] {
            let config = PostgresConfig {
                namespace: namespace.into(),
                ..PostgresConfig::default()
            };
            assert!(
                matches!(check_config(&config), Err(LockError::InvalidConfig(_))),
                "{namespace:?} accepted"
            );
        }
        assert!(check_config(&PostgresConfig::default()).is_ok());
    }
}
