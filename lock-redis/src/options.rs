//! Options and URL parsing.

use lock_core::LockError;
use std::time::Duration;

/// Options shared by [`crate::RedisBackend`] and [`crate::RedlockBackend`].
///
/// ```
/// use lock_redis::RedisOptions;
/// use std::time::Duration;
/// let options = RedisOptions::default()
///     .prefix("billing:")
///     .command_timeout(Duration::from_secs(1));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisOptions {
    pub(crate) prefix: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) node_timeout: Duration,
    pub(crate) tls: crate::RedisTls,
    /// `WAIT` with every acquire and renew: (replicas, how long to wait for them).
    pub(crate) wait_replicas: Option<(u32, Duration)>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: Self::default_prefix().into(),
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            node_timeout: Duration::from_millis(250),
            tls: crate::RedisTls::default(),
            wait_replicas: None,
        }
    }
}

impl RedisOptions {
    /// The default key prefix, `distlock:`.
    pub fn default_prefix() -> &'static str {
        "distlock:"
    }

    /// Prefix of every Redis key and channel (default `distlock:`). Must not contain braces.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Bound on establishing a connection (default 2 s). `connect` fails with a retryable
    /// `LockError::Backend` after it.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on one call (default 2 s): a script's answer, including a reconnect it waits
    /// for; on Redlock, renew and release per node. A connection that lets a call run into it
    /// is probed and, if silent, replaced.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Redlock: bound on one node's answer to acquire (default 250 ms, and never more than TTL/5 of
    /// the call), so a slow or dead node cannot stall an acquisition.
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// TLS settings for `rediss://` / `redlocks://` servers: a private CA, a client
    /// certificate (see [`crate::RedisTls`]). URL parameters `tls_ca`, `tls_cert`, `tls_key`
    /// override them.
    pub fn tls(mut self, tls: crate::RedisTls) -> Self {
        self.tls = tls;
        self
    }

    /// One server, Sentinel or Cluster: with every acquire and renew, wait (Redis `WAIT`, in
    /// one pipeline with the script on one connection; on a cluster to the master serving the
    /// name's slot) until
    /// `replicas` replicas have the write, at most `timeout` (URL: `wait_replicas=N`,
    /// `wait_timeout_ms=T`, default 100 ms). A lock or permit whose write did not reach them
    /// in time is released at once and the attempt is a retryable `Backend` error; a renewal
    /// that did not is a retryable error (the watchdog retries it, and reports the lock lost
    /// at its deadline if the replicas stay behind). So a failover to one of those replicas
    /// keeps every granted lock and its fence counter. Off by default: each acquire and renew
    /// answers only once the replicas acknowledged, and `WAIT` holds the backend's shared connection while it waits.
    /// Redlock refuses it (its masters have no replicas to wait for).
    pub fn wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = Some((replicas, timeout));
        self
    }

    pub(crate) fn validate(&self) -> Result<(), LockError> {
        if let Some((replicas, wait)) = self.wait_replicas {
            if replicas == 0 || wait.is_zero() {
                return Err(LockError::InvalidConfig(
                    "wait_replicas needs at least one replica and a non-zero timeout".into(),
                ));
            }
            if wait >= self.command_timeout {
                return Err(LockError::InvalidConfig(format!(
                    "the wait_replicas timeout ({wait:?}) must be below the command timeout ({:?})",
                    self.command_timeout
                )));
            }
        }
        self.tls.validate()?;
        if let Some(why) = lock_core::timeout_problem(&[
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
            ("node_timeout", self.node_timeout),
        ]) {
            return Err(LockError::InvalidConfig(why));
        }
        crate::KeyScheme::new(self.prefix.clone(), 0).map(|_| ())
    }
}

/// How long `wait_replicas` waits when the URL gives no `wait_timeout_ms`.
const DEFAULT_REPLICA_WAIT: Duration = Duration::from_millis(100);

/// A parsed distlock Redis URL: the node URLs handed to `redis`, and our own options.
#[derive(Debug)]
pub(crate) struct ParsedUrl {
    pub(crate) redlock: bool,
    pub(crate) nodes: Vec<String>,
    pub(crate) options: RedisOptions,
}

/// Refuses an `@` after a `/`, `?` or `#` (`rest` is the URL after its scheme): either a
/// password holds one of those unescaped, and the host, database or parameters would be
/// read out of it (and echoed in errors), or a parameter value holds an `@`. The message
/// repeats nothing of the URL.
pub(crate) fn check_userinfo(rest: &str) -> Result<(), &'static str> {
    match rest.rsplit_once('@') {
        Some((before, _)) if before.contains(['/', '?', '#']) => Err(
            "an '@' follows a '/', '?' or '#': percent-encode those in the user name and \
             password (%2F, %3F, %23) and an '@' in a parameter value (%40)",
        ),
        _ => Ok(()),
    }
}

/// Parses `redis://[user:pass@]host:port[/db][?prefix=…]` or
/// `redlock://[user:pass@]h1:p1,h2:p2,h3:p3[/db][?prefix=…]` (TLS: `rediss://`,
/// `redlocks://`, with `tls_ca`, `tls_cert`, `tls_key` and an optional `#insecure`).
/// `url` with its scheme in lower case: schemes are case-insensitive (RFC 3986), and the
/// rest of the parsing compares them as written (`REDIS://` was an "unknown scheme").
pub(crate) fn lowercase_scheme(url: &str) -> std::borrow::Cow<'_, str> {
    match url.split_once("://") {
        Some((scheme, rest)) if scheme.bytes().any(|byte| byte.is_ascii_uppercase()) => {
            format!("{}://{rest}", scheme.to_ascii_lowercase()).into()
        }
        _ => url.into(),
    }
}

pub(crate) fn parse_url(url: &str, mut options: RedisOptions) -> Result<ParsedUrl, LockError> {
    let url = &*lowercase_scheme(url);
    let bad = |why: &str| {
        let url = lock_core::redact_url(url);
        LockError::InvalidConfig(format!("redis URL {url:?}: {why}"))
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected redis://host:port/db or redlock://h1:p1,h2:p2,h3:p3/db"))?;
    check_userinfo(rest).map_err(bad)?;
    let (redlock, node_scheme) = match scheme {
        "redis" | "rediss" => (false, scheme),
        "redis+unix" | "unix" => (false, scheme),
        "redlock" => (true, "redis"),
        "redlocks" => (true, "rediss"),
        other => {
            return Err(bad(&format!(
                "unknown scheme {other:?} (use redis, rediss, redis+unix, redlock or redlocks)"
            )));
        }
    };
    let tls = node_scheme == "rediss";
    if tls && !cfg!(feature = "tls") {
        return Err(crate::tls::tls_not_built(url));
    }
    // `#insecure` (the redis crate's: no certificate checks) goes to every node URL.
    let (rest, fragment) = match rest.split_once('#') {
        Some((rest, "insecure")) if tls => {
            if !cfg!(feature = "tls-insecure") {
                return Err(bad(
                    "#insecure needs lock-redis's `tls-insecure` feature (meant for tests only)",
                ));
            }
            (rest, "#insecure")
        }
        Some(_) => {
            return Err(bad(
                "the only fragment accepted is #insecure, on rediss:// or redlocks://",
            ));
        }
        None => (rest, ""),
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let unix = matches!(scheme, "redis+unix" | "unix");
    let (authority, path) = match before_query.split_once('/') {
        Some((authority, path)) if !unix => (authority, path),
        _ => (before_query, ""),
    };
    let db: i64 = if path.is_empty() {
        0
    } else {
        path.parse()
            .map_err(|_| bad(&format!("database {path:?} is not a number")))?
    };
    if db < 0 {
        return Err(bad("database must not be negative"));
    }
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let mut passthrough = Vec::new();
    let mut wait_timeout = None;
    if let Some(query) = query {
        let mut seen = std::collections::HashSet::new();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            // Given twice, the last value would win without a word (a second `prefix`
            // decides which locks clash with which).
            if !seen.insert(name.clone()) {
                return Err(bad(&format!("parameter {name} is given more than once")));
            }
            let millis = || {
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|ms| *ms > 0)
                    .map(Duration::from_millis)
                    .ok_or_else(|| {
                        bad(&format!("{name} must be a positive number of milliseconds"))
                    })
            };
            match name.as_ref() {
                "prefix" => options.prefix = value.into_owned(),
                "connect_timeout_ms" => options.connect_timeout = millis()?,
                "command_timeout_ms" => options.command_timeout = millis()?,
                "node_timeout_ms" => options.node_timeout = millis()?,
                "wait_replicas" => {
                    let replicas = value
                        .parse::<u32>()
                        .map_err(|_| bad("wait_replicas must be a number of replicas"))?;
                    let wait = options
                        .wait_replicas
                        .map_or(DEFAULT_REPLICA_WAIT, |(_, wait)| wait);
                    options.wait_replicas = Some((replicas, wait));
                }
                "wait_timeout_ms" => wait_timeout = Some(millis()?),
                "tls_ca" => options.tls.set_ca_file(&value),
                "tls_cert" => options.tls.set_client_cert_file(&value),
                "tls_key" => options.tls.set_client_key_file(&value),
                // What the redis crate itself reads: `protocol`, and on a socket `db`,
                // `user` and `pass`. It ignores anything else without a word, so a typo
                // (`prefx`, which would put these locks in another namespace than their
                // peers') or a parameter of another client (`tls=true`, `db=3`) is refused.
                known
                    if known == "protocol" || (unix && matches!(known, "db" | "user" | "pass")) =>
                {
                    passthrough.push(format!(
                        "{}={}",
                        url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>(),
                        url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>()
                    ))
                }
                unknown => {
                    return Err(bad(&format!(
                        "unknown parameter {unknown:?} (known: prefix, connect_timeout_ms, \
                         command_timeout_ms, node_timeout_ms, wait_replicas, wait_timeout_ms, \
                         tls_ca, tls_cert, tls_key, protocol{}; Sentinel URLs also \
                         sentinel_username, sentinel_password)",
                        if unix { ", db, user, pass" } else { "" },
                    )));
                }
            }
        }
    }
    if let Some(wait) = wait_timeout {
        match &mut options.wait_replicas {
            Some((_, timeout)) => *timeout = wait,
            None => return Err(bad("wait_timeout_ms needs wait_replicas")),
        }
    }
    options.validate()?;
    if !tls && !options.tls.is_default() {
        return Err(bad(
            "TLS settings (tls_ca, tls_cert, tls_key) need a TLS URL: rediss:// or redlocks://",
        ));
    }
    // The parameters that go to the redis crate, as a query string appended to each node.
    let query = if passthrough.is_empty() {
        String::new()
    } else {
        format!("?{}", passthrough.join("&"))
    };
    if unix {
        // A socket path, with the database as `?db=N`: hand it to the redis crate as is.
        let node = format!("{scheme}://{before_query}{query}");
        redis::Client::open(node.as_str()).map_err(|error| bad(&error.to_string()))?;
        return Ok(ParsedUrl {
            redlock,
            nodes: vec![node],
            options,
        });
    }
    let host_list: Vec<&str> = hosts.split(',').map(str::trim).collect();
    if host_list.iter().any(|host| host.is_empty()) {
        return Err(bad("empty host"));
    }
    if !redlock && host_list.len() != 1 {
        return Err(bad(
            "redis:// takes one host; use redlock://h1:p1,h2:p2,h3:p3 for several independent masters",
        ));
    }
    let mut nodes = Vec::with_capacity(host_list.len());
    for host in host_list {
        let mut node = format!("{node_scheme}://");
        if let Some(userinfo) = userinfo {
            node.push_str(userinfo);
            node.push('@');
        }
        node.push_str(host);
        node.push('/');
        node.push_str(&db.to_string());
        node.push_str(&query);
        node.push_str(fragment);
        // Let the redis crate judge host, port and its own parameters now, not at connect.
        redis::Client::open(node.as_str())
            .map_err(|error| bad(&format!("node {host:?}: {error}")))?;
        nodes.push(node);
    }
    Ok(ParsedUrl {
        redlock,
        nodes,
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() -> Result<(), LockError> {
        let single = parse_url(
            "redis://127.0.0.1:6379/3?prefix=x:",
            RedisOptions::default(),
        )?;
        assert!(!single.redlock);
        assert_eq!(single.nodes, ["redis://127.0.0.1:6379/3"]);
        assert_eq!(single.options.prefix, "x:");
        let many = parse_url(
            "redlock://u:p@h1:1,h2:2,h3:3/1?node_timeout_ms=50",
            RedisOptions::default(),
        )?;
        assert!(many.redlock);
        assert_eq!(many.nodes.len(), 3);
        assert_eq!(many.nodes[1], "redis://u:p@h2:2/1");
        assert_eq!(many.options.node_timeout, Duration::from_millis(50));
        let unix = parse_url(
            "redis+unix:///tmp/r.sock?db=2&prefix=u:",
            RedisOptions::default(),
        )?;
        assert_eq!(unix.nodes, ["redis+unix:///tmp/r.sock?db=2"]);
        assert_eq!(unix.options.prefix, "u:");
        let escaped = parse_url(
            "redis://u:a%2Fb@h:1/0?prefix=a%40b",
            RedisOptions::default(),
        )?;
        assert_eq!(escaped.nodes, ["redis://u:a%2Fb@h:1/0"]);
        assert_eq!(escaped.options.prefix, "a@b");
        // No part of a password with an unescaped '/', '?' or '#' reaches the message.
        for leaky in [
            "redis://u:s3/cret@h:1/0",
            "redis://u:s3?cret@h:1/0",
            "redis://u:s3#cret@h:1/0",
            "redlock://u:s3/cret@h:1,h:2,h:3/0",
        ] {
            match parse_url(leaky, RedisOptions::default()) {
                Err(LockError::InvalidConfig(message)) => {
                    assert!(
                        !message.contains("cret") && !message.contains("s3"),
                        "{leaky}: {message}"
                    )
                }
                other => panic!("{leaky}: expected InvalidConfig, got {other:?}"),
            }
        }
        let resp3 = parse_url("redis://h:1/0?protocol=resp3", RedisOptions::default())?;
        assert_eq!(resp3.nodes, ["redis://h:1/0?protocol=resp3"]);
        // Schemes are case-insensitive.
        let upper = parse_url("REDIS://h:1/0", RedisOptions::default())?;
        assert_eq!(upper.nodes, ["redis://h:1/0"]);
        assert!(parse_url("RedLock://h1:1,h2:2,h3:3/0", RedisOptions::default())?.redlock);
        for bad in [
            "redis://h:1/0?prefix=a&prefix=b",
            "redlock://h1:1,h2:2,h3:3/0?node_timeout_ms=5&node_timeout_ms=5",
            "redis//x",
            "http://h:1",
            "redis://h:1/x",
            "redis://h1:1,h2:2/0",
            "redis://h:99999/0",
            "redlock://h1:1,,h2:2",
            "redis://h:1/0?prefix=a{b",
            "redis://h:1/0?node_timeout_ms=0",
            "redis://h:1/0?tls_ca=/ca.crt",
            "redlock://h1:1,h2:2,h3:3/0?tls_cert=/c.crt&tls_key=/c.key",
            "rediss://h:1/0?tls_cert=/c.crt",
            "rediss://h:1/0#secure",
            // Parameters the redis crate would ignore without a word.
            "redis://h:1/0?prefx=billing:",
            "redis://u:a/b@h:1/0",
            "redis://u:a?b@h:1/0",
            "redis://u:a#b@h:1/0",
            "redis://h:1/0?prefix=a@b",
            "redis://h:1/0?tls=true",
            "redis://h:1/?db=3",
            "redis://h:1/0?password=x",
            "redlock://h1:1,h2:2,h3:3/0?bogus=1",
        ] {
            assert!(
                matches!(
                    parse_url(bad, RedisOptions::default()),
                    Err(LockError::InvalidConfig(_))
                ),
                "{bad} accepted"
            );
        }
        Ok(())
    }

    #[cfg(feature = "tls")]
    #[test]
    fn parses_tls_forms() -> Result<(), LockError> {
        let single = parse_url(
            "rediss://u:p@h:1/2?tls_ca=/ca.crt&tls_cert=/c.crt&tls_key=/c.key&prefix=t:",
            RedisOptions::default(),
        )?;
        assert_eq!(single.nodes, ["rediss://u:p@h:1/2"]);
        assert_eq!(
            single.options.tls,
            crate::RedisTls::default()
                .ca_file("/ca.crt")
                .client_cert_files("/c.crt", "/c.key")
        );
        let many = parse_url("redlocks://h1:1,h2:2,h3:3/0", RedisOptions::default())?;
        assert!(many.redlock);
        assert_eq!(many.nodes[2], "rediss://h3:3/0");
        #[cfg(feature = "tls-insecure")]
        assert_eq!(
            parse_url("rediss://h:1/0?prefix=x:#insecure", RedisOptions::default())?.nodes,
            ["rediss://h:1/0#insecure"]
        );
        Ok(())
    }

    /// Without the `tls` feature a TLS URL names the feature to enable.
    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_urls_need_the_feature() {
        for url in ["rediss://h:1/0", "redlocks://h1:1,h2:2,h3:3/0"] {
            match parse_url(url, RedisOptions::default()) {
                Err(LockError::InvalidConfig(message)) => {
                    assert!(message.contains("`tls` feature"), "{url}: {message}")
                }
                other => panic!("{url}: expected InvalidConfig, got {other:?}"),
            }
        }
    }
}
