//! Redis Sentinel: find the master a set of sentinels monitors, and follow it across
//! failovers.
//!
//! URL: `redis+sentinel://[user:pass@]h1:p1,h2:p2,h3:p3/<master name>[/db][?…]`. The hosts
//! are the sentinels; the credentials and database are the master's. Sentinels that require a
//! password of their own take `sentinel_username` / `sentinel_password` parameters.
//! `rediss+sentinel://` (feature `tls`): TLS to the sentinels and to the master, with the
//! same settings (`tls_ca`, `tls_cert`, `tls_key`, `#insecure`, or `RedisOptions::tls`).
//!
//! The lookup follows the Sentinel client protocol: ask the sentinels for the master's
//! address (`SENTINEL MASTER`: the address and its configuration epoch), connect, and check
//! with `ROLE` that it is a master (during a failover a sentinel may still name the old one;
//! the newest epoch wins). All sentinels are asked at once, each bounded by the connect
//! timeout, and the lookup waits at most 100 ms more once a majority answered, so a dead or
//! paused minority of sentinels costs 100 ms, not the connect timeout. (The `redis` crate's own sentinel client asks its sentinels in a
//! fixed order without a timeout of its own: one paused sentinel would stall every lookup.)
//!
//! After a call fails on a lost connection, a timeout or a `READONLY` answer (the master was
//! demoted to a replica), the master is looked up again in the background, at most one lookup
//! at a time and with a growing pause between lookups (50 ms doubling to 1 s, reset when the
//! master moved); when the sentinels name another master the node's connection and its
//! pub/sub listener move there. The failed call itself is not repeated: its error is
//! retryable, and the next call goes to the new master.

use crate::node::{Nodes, Server, connect_server};
use crate::{KeyScheme, RedisBackend, RedisOptions};
use futures::StreamExt;
use lock_core::LockError;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, timeout};

/// Pause between two lookups of the master while calls keep failing: the first, and the
/// largest.
const LOOKUP_MIN_PAUSE: Duration = Duration::from_millis(50);
const LOOKUP_MAX_PAUSE: Duration = Duration::from_secs(1);

/// How long the lookup waits for the other sentinels once a majority answered.
const MINORITY_GRACE: Duration = Duration::from_millis(100);

/// A parsed `redis+sentinel://` URL.
#[derive(Debug)]
struct SentinelUrl {
    /// `redis://[user:pass@]host:port` of each sentinel.
    sentinels: Vec<String>,
    master_name: String,
    /// The master's URL with `{}` where its `host:port` goes (credentials, database and the
    /// parameters for the `redis` crate).
    master_url: (String, String),
    options: RedisOptions,
    db: i64,
}

/// `part` escaped for a URL's user info, as the redis crate reads it back (percent-decoding
/// only: form encoding's `+` for a space would reach the sentinel as a `+`).
fn userinfo_escape(part: &str) -> String {
    percent_encoding::utf8_percent_encode(part, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Parses `redis+sentinel://[user:pass@]h1:p1,h2:p2/<master name>[/db][?…]`.
fn parse(url: &str, options: RedisOptions) -> Result<SentinelUrl, LockError> {
    let bad = |why: &str| {
        let url = lock_core::redact_url(url);
        LockError::InvalidConfig(format!("redis sentinel URL {url:?}: {why}"))
    };
    let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
        (true, rest)
    } else {
        return Err(bad(
            "expected redis+sentinel://h1:p1,h2:p2,h3:p3/<master name>[/db] (or rediss+sentinel://)",
        ));
    };
    crate::options::check_userinfo(rest).map_err(bad)?;
    // `#insecure` (TLS without certificate checks) goes to every URL made from this one.
    let (rest, fragment) = match rest.split_once('#') {
        Some((rest, fragment)) => (rest, format!("#{fragment}")),
        None => (rest, String::new()),
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, query),
        None => (rest, ""),
    };
    let (authority, path) = before_query
        .split_once('/')
        .ok_or_else(|| bad("the master name is missing (…/<master name>[/db])"))?;
    let (master_name, db) = match path.split_once('/') {
        Some((name, db)) => (name, db),
        None => (path, "0"),
    };
    if master_name.is_empty() {
        return Err(bad("the master name is empty"));
    }
    let master_name = url::form_urlencoded::parse(format!("n={master_name}").as_bytes())
        .next()
        .map(|(_, name)| name.into_owned())
        .unwrap_or_default();
    let db = if db.is_empty() { "0" } else { db };
    // The sentinels' own credentials come out of the query; the rest (our options and the
    // `redis` crate's parameters) is parsed as for the other forms.
    let mut sentinel_user = None;
    let mut sentinel_password = None;
    let mut kept = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "sentinel_username" | "sentinel_password" => {
                let slot = if name == "sentinel_username" {
                    &mut sentinel_user
                } else {
                    &mut sentinel_password
                };
                if slot.replace(value.into_owned()).is_some() {
                    return Err(bad(&format!("parameter {name} is given more than once")));
                }
            }
            _ => {
                kept.append_pair(&name, &value);
            }
        }
    }
    let kept = kept.finish();
    // TLS: the master and the sentinels alike (`redlocks://` makes `rediss://` node URLs and
    // takes the `tls_*` parameters).
    let form = if tls { "redlocks" } else { "redlock" };
    let rewritten = if kept.is_empty() {
        format!("{form}://{authority}/{db}{fragment}")
    } else {
        format!("{form}://{authority}/{db}?{kept}{fragment}")
    };
    let parsed =
        crate::options::parse_url(&rewritten, options).map_err(|error| bad(&error.to_string()))?;
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
    let (Some(first_node), Some(first_host)) = (parsed.nodes.first(), hosts.first()) else {
        return Err(bad("no sentinel given"));
    };
    // parse_url builds `redis[s]://[userinfo@]<host>/<db>[?params][#insecure]`: the master's
    // URL is the same with the master's address in place of the first sentinel's.
    let scheme_end = first_node
        .find("://")
        .map(|at| at + 3)
        .ok_or_else(|| bad("could not place the master's address in the URL"))?;
    let at = scheme_end + userinfo.map_or(0, |userinfo| userinfo.len() + 1);
    let master_url = match (
        first_node.get(..at),
        first_node.get(at + first_host.len()..),
    ) {
        (Some(head), Some(tail)) => (head.to_owned(), tail.to_owned()),
        _ => return Err(bad("could not place the master's address in the URL")),
    };
    let sentinel_auth = match (&sentinel_user, &sentinel_password) {
        (None, None) => String::new(),
        (user, password) => format!(
            "{}:{}@",
            userinfo_escape(user.as_deref().unwrap_or("")),
            userinfo_escape(password.as_deref().unwrap_or(""))
        ),
    };
    let scheme = if tls { "rediss" } else { "redis" };
    let sentinels = hosts
        .iter()
        .map(|host| format!("{scheme}://{sentinel_auth}{host}{fragment}"))
        .collect();
    Ok(SentinelUrl {
        sentinels,
        master_name,
        master_url,
        db: db
            .parse()
            .map_err(|_| bad(&format!("database {db:?} is not a number")))?,
        options: parsed.options,
    })
}

/// What one sentinel says of the master.
struct MasterView {
    host: String,
    port: u16,
    /// The configuration epoch: raised by every failover.
    epoch: u64,
}

impl MasterView {
    /// From the fields of `SENTINEL MASTER <name>`.
    fn of(fields: &HashMap<String, String>) -> Option<Self> {
        Some(MasterView {
            host: fields.get("ip")?.clone(),
            port: fields.get("port")?.parse().ok()?,
            epoch: fields
                .get("config-epoch")
                .and_then(|epoch| epoch.parse().ok())
                .unwrap_or(0),
        })
    }
}

/// Finds the master through the sentinels and moves a node to it after failures.
pub(crate) struct Follower {
    sentinels: Vec<redis::Client>,
    master_name: String,
    master_url: (String, String),
    options: RedisOptions,
    state: Mutex<FollowState>,
    /// Ends the `+switch-master` listener when the backend goes.
    shutdown: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("master_name", &self.master_name)
            .field("sentinels", &self.sentinels.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Listens for `+switch-master` on one sentinel at a time (the next one after a failure, 1 s
/// later) and calls `switched` when it names our master: the node then moves at once rather
/// than at its next failed call. Without it a client that keeps talking to a master demoted
/// by a failover it did not see (a manual `SENTINEL FAILOVER`, a partition) goes on until the
/// sentinels reconfigure that master, up to ~10 s later. Ends with the backend.
async fn watch_switches(
    follower: std::sync::Weak<Follower>,
    sentinels: Vec<redis::Client>,
    master_name: String,
    connect_timeout: Duration,
    shutdown: tokio_util::sync::CancellationToken,
    switched: impl Fn() + Send + Sync + 'static,
) {
    let prefix = format!("{master_name} ");
    for sentinel in sentinels.iter().cycle() {
        let listen = async {
            // `None`: this sentinel failed; try the next.
            let mut pubsub: redis::aio::PubSub =
                timeout(connect_timeout, sentinel.get_async_pubsub())
                    .await
                    .ok()?
                    .ok()?;
            timeout(connect_timeout, pubsub.subscribe("+switch-master"))
                .await
                .ok()?
                .ok()?;
            let (mut sink, mut stream) = pubsub.split();
            let mut ping = tokio::time::interval(Duration::from_secs(5));
            ping.tick().await;
            loop {
                tokio::select! {
                    message = stream.next() => {
                        let message = message?;
                        let payload: String = message.get_payload().unwrap_or_default();
                        if payload.starts_with(&prefix) {
                            tracing::info!(%payload, "sentinel announced a failover");
                            switched();
                        }
                    }
                    _ = ping.tick() => {
                        // A paused sentinel never closes the stream.
                        timeout(connect_timeout, sink.ping::<redis::Value>()).await.ok()?.ok()?;
                    }
                }
            }
            #[allow(unreachable_code)]
            None::<()>
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = listen => {}
        }
        if follower.strong_count() == 0 {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Whether a lookup runs, and when the next may start.
#[derive(Debug)]
struct FollowState {
    looking: bool,
    /// A sentinel announced a failover while a lookup ran (which may have read the sentinels
    /// before they switched): look again as soon as it ends.
    again: bool,
    not_before: Instant,
    pause: Duration,
}

/// Whether a failed call suggests the master moved: the connection failed or went silent, or
/// the server answered as a replica (`READONLY`), or as a master cut off from its replicas
/// (`MASTERDOWN`).
fn suggests_a_move(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(error.code(), Some("READONLY" | "MASTERDOWN"))
        || error.to_string().contains("READONLY")
}

impl Follower {
    /// Looks the master up: every sentinel at once (each bounded by the connect timeout),
    /// then the named addresses, most named first, until one answers `ROLE` as a master.
    async fn resolve(&self) -> Result<Server, LockError> {
        let limit = self.options.connect_timeout;
        // Owned futures (not borrowing `self`), so the lookup can run in a spawned task.
        let lookups: Vec<_> = self
            .sentinels
            .iter()
            .map(|sentinel| {
                let sentinel = sentinel.clone();
                let master_name = self.master_name.clone();
                async move {
                    let ask = async {
                        // No response timeout of the driver's own (500 ms): `limit` bounds
                        // the whole lookup.
                        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
                        let mut conn = sentinel
                            .get_multiplexed_async_connection_with_config(&config)
                            .await?;
                        redis::cmd("SENTINEL")
                            .arg("MASTER")
                            .arg(&master_name)
                            .query_async::<HashMap<String, String>>(&mut conn)
                            .await
                    };
                    let addr = sentinel.get_connection_info().addr().to_string();
                    match timeout(limit, ask).await {
                        Ok(Ok(fields)) => Ok(MasterView::of(&fields)),
                        // The sentinel does not monitor a master of that name.
                        Ok(Err(error)) if error.to_string().contains("No such master") => Ok(None),
                        // A wrong password, an untrusted certificate: retrying cannot help.
                        Ok(Err(error)) => Err((
                            format!("sentinel {addr}: {error}"),
                            crate::tls::refusal(&format!("sentinel {addr}"), &error),
                        )),
                        Err(_) => {
                            Err((format!("sentinel {addr}: no answer within {limit:?}"), None))
                        }
                    }
                }
            })
            .collect();
        // Every sentinel's view counts (during a failover only some know the new master),
        // but once a majority answered the others get a short grace only: a dead or paused
        // minority costs that grace, not the connect timeout.
        let majority = self.sentinels.len() / 2 + 1;
        let mut pending: futures::stream::FuturesUnordered<_> = lookups.into_iter().collect();
        let mut asked = Vec::new();
        let mut answers = 0;
        let mut grace_ends: Option<Instant> = None;
        loop {
            let next = match grace_ends {
                Some(end) => match tokio::time::timeout_at(end, pending.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
                None => pending.next().await,
            };
            let Some(answer) = next else {
                break;
            };
            answers += usize::from(answer.is_ok());
            asked.push(answer);
            if answers >= majority && grace_ends.is_none() {
                grace_ends = Some(Instant::now() + MINORITY_GRACE);
            }
        }
        let mut views: Vec<MasterView> = Vec::new();
        let mut failures = Vec::new();
        let mut refusal = None;
        let mut answered = 0;
        for answer in asked {
            match answer {
                Ok(Some(view)) => {
                    answered += 1;
                    views.push(view);
                }
                Ok(None) => answered += 1,
                Err((failure, refused)) => {
                    failures.push(failure);
                    refusal = refusal.or(refused);
                }
            }
        }
        if answered == 0
            && let Some(refusal) = refusal
        {
            return Err(refusal);
        }
        if answered == 0 {
            return Err(LockError::backend_msg(
                "redis",
                format!(
                    "no sentinel answered for master {:?}: {}",
                    self.master_name,
                    failures.join("; ")
                ),
                true,
            ));
        }
        if views.is_empty() {
            return Err(LockError::backend_msg(
                "redis",
                format!(
                    "no sentinel knows a master named {:?} (check the name in the URL)",
                    self.master_name
                ),
                false,
            ));
        }
        // During a failover the sentinels disagree for a moment, and the old master still
        // answers as a master until it is reconfigured: the address of the newest
        // configuration (the highest epoch: the latest failover) wins, then the most named.
        let mut candidates: Vec<(String, u16, u64, usize)> = Vec::new();
        for view in views {
            match candidates
                .iter_mut()
                .find(|(host, port, _, _)| *host == view.host && *port == view.port)
            {
                Some(candidate) => {
                    candidate.2 = candidate.2.max(view.epoch);
                    candidate.3 += 1;
                }
                None => candidates.push((view.host, view.port, view.epoch, 1)),
            }
        }
        candidates.sort_by_key(|candidate| std::cmp::Reverse((candidate.2, candidate.3)));
        // Only the newest configuration's addresses: an older one may be the demoted master,
        // which still says "master" until the sentinels reconfigure it. If none of them
        // answers, the lookup fails (retryable) rather than settle for an older view.
        let newest = candidates.first().map(|candidate| candidate.2);
        let mut refused = Vec::new();
        for (host, port, _, _) in candidates
            .into_iter()
            .take_while(|candidate| Some(candidate.2) == newest)
        {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            let url = format!("{}{host}:{port}{}", self.master_url.0, self.master_url.1);
            match self.check_master(&url).await {
                Ok(server) => return Ok(server),
                Err(error) if !error.is_retryable() => return Err(error),
                Err(error) => refused.push(format!("{host}:{port}: {error}")),
            }
        }
        Err(LockError::backend_msg(
            "redis",
            format!(
                "the sentinels of {:?} name no reachable master (a failover in progress?): {}",
                self.master_name,
                refused.join("; ")
            ),
            true,
        ))
    }

    /// Connects to `url` and checks that the server is a master.
    async fn check_master(&self, url: &str) -> Result<Server, LockError> {
        let mut server = connect_server(url, &self.options).await?;
        let limit = self.options.connect_timeout;
        let role = timeout(
            limit,
            redis::cmd("ROLE").query_async::<redis::Value>(&mut server.manager),
        )
        .await;
        let role = match role {
            Ok(Ok(redis::Value::Array(items))) => match items.first() {
                Some(first) => redis::from_redis_value_ref::<String>(first).unwrap_or_default(),
                None => String::new(),
            },
            Ok(Ok(other)) => format!("{other:?}"),
            Ok(Err(error)) => return Err(crate::node::backend_error("ROLE", error)),
            Err(_) => {
                return Err(LockError::backend_msg(
                    "redis",
                    format!("ROLE: no answer within {limit:?}"),
                    true,
                ));
            }
        };
        if role == "master" {
            Ok(server)
        } else {
            Err(LockError::backend_msg(
                "redis",
                format!("it is a {role}, not a master"),
                true,
            ))
        }
    }

    /// A call on the master at `current` failed with `error`: if that suggests the master
    /// moved, look it up again in the background (one lookup at a time, paced), and hand a
    /// new master to `repoint`. With `error` `None` (a sentinel announced a failover) the
    /// lookup starts at once, whatever the pace, or right after the one running.
    pub(crate) fn after_error(
        self: &Arc<Self>,
        error: Option<&redis::RedisError>,
        current: String,
        repoint: impl Fn(redis::Client, ConnectionManager) + Send + 'static,
    ) {
        if error.is_some_and(|error| !suggests_a_move(error)) {
            return;
        }
        {
            let mut state = self.state();
            if state.looking {
                state.again |= error.is_none();
                return;
            }
            if error.is_some() && Instant::now() < state.not_before {
                return;
            }
            state.looking = true;
        }
        let follower = self.clone();
        // On the background runtime: a lookup left on a caller's runtime that shut down would
        // keep `looking` set, and no failover would be followed again.
        let spawned = lock_core::spawn_background(async move {
            let mut current = current;
            loop {
                let limit = follower.options.connect_timeout * 2;
                let found = timeout(limit, follower.resolve()).await;
                let moved = match found {
                    Ok(Ok(server)) if server.addr != current => {
                        tracing::warn!(
                            master = %follower.master_name,
                            from = %current,
                            to = %server.addr,
                            "redis master moved (sentinel); following it"
                        );
                        current = server.addr.clone();
                        // Each master we move to (the first one: at connect).
                        crate::node::warn_if_locks_may_be_evicted(
                            server.manager.clone(),
                            server.addr.clone(),
                        );
                        // A lazy twin: its connection is made by the first command that uses
                        // it, on that command's runtime (not necessarily here).
                        let manager = server.lazy_twin().unwrap_or(server.manager);
                        repoint(server.client, manager);
                        true
                    }
                    Ok(Ok(_)) => false,
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "looking up the redis master failed");
                        false
                    }
                    Err(_) => false,
                };
                let mut state = follower.state();
                state.pause = if moved {
                    LOOKUP_MIN_PAUSE
                } else {
                    (state.pause * 2).min(LOOKUP_MAX_PAUSE)
                };
                state.not_before = Instant::now() + state.pause;
                if !std::mem::take(&mut state.again) {
                    state.looking = false;
                    return;
                }
            }
        });
        if spawned.is_none() {
            self.state().looking = false;
        }
    }

    /// Registers what to do when a sentinel announces a failover of our master (the node
    /// looks the master up at once), and starts listening for the announcements.
    pub(crate) fn on_switch(self: &Arc<Self>, switched: impl Fn() + Send + Sync + 'static) {
        lock_core::spawn_background(watch_switches(
            Arc::downgrade(self),
            self.sentinels.clone(),
            self.master_name.clone(),
            self.options.connect_timeout,
            self.shutdown.clone(),
            switched,
        ));
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FollowState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Connects to the master named in a `redis+sentinel://` URL (found within the connect
/// timeout); the backend then follows failovers.
pub(crate) async fn connect(url: &str, options: RedisOptions) -> Result<RedisBackend, LockError> {
    let parsed = parse(url, options)?;
    parsed.options.validate()?;
    let sentinels = parsed
        .sentinels
        .iter()
        .map(|sentinel| {
            let info = redis::IntoConnectionInfo::into_connection_info(sentinel.as_str()).map_err(
                |error| LockError::InvalidConfig(format!("sentinel URL {sentinel:?}: {error}")),
            )?;
            // With TLS, the sentinels are checked against the same CA and shown the same
            // client certificate as the master.
            crate::tls::build_client(info, &parsed.options.tls)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let follower = Arc::new(Follower {
        sentinels,
        master_name: parsed.master_name,
        master_url: parsed.master_url,
        options: parsed.options.clone(),
        state: Mutex::new(FollowState {
            looking: false,
            again: false,
            not_before: Instant::now(),
            pause: LOOKUP_MIN_PAUSE,
        }),
        shutdown: tokio_util::sync::CancellationToken::new(),
    });
    let limit = parsed.options.connect_timeout;
    let server = match timeout(limit, follower.resolve()).await {
        Ok(found) => found?,
        Err(_) => {
            return Err(LockError::backend_msg(
                "redis",
                format!(
                    "finding master {:?} through the sentinels: no answer within {limit:?}",
                    follower.master_name
                ),
                true,
            ));
        }
    };
    let scheme = KeyScheme::new(parsed.options.prefix.clone(), parsed.db)?;
    crate::node::warn_if_locks_may_be_evicted(server.manager.clone(), server.addr.clone());
    let nodes = Nodes::followed(server, follower, scheme, &parsed.options);
    Ok(RedisBackend::from_nodes(nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sentinel_urls() -> Result<(), LockError> {
        let url = parse(
            "redis+sentinel://u:p@127.0.0.1:1,127.0.0.1:2/mymaster/3?prefix=x:&sentinel_password=s",
            RedisOptions::default(),
        )?;
        assert_eq!(
            url.sentinels,
            ["redis://:s@127.0.0.1:1", "redis://:s@127.0.0.1:2"]
        );
        assert_eq!(url.master_name, "mymaster");
        assert_eq!(url.db, 3);
        assert_eq!(url.options.prefix, "x:");
        assert_eq!(
            format!("{}10.0.0.1:7{}", url.master_url.0, url.master_url.1),
            "redis://u:p@10.0.0.1:7/3"
        );
        let waiting = parse(
            "redis+sentinel://h:1/m?wait_replicas=1&wait_timeout_ms=50",
            RedisOptions::default(),
        )?;
        assert_eq!(
            waiting.options.wait_replicas,
            Some((1, Duration::from_millis(50)))
        );
        let secure = parse("rediss+sentinel://h:1,h:2/m/2", RedisOptions::default())?;
        assert_eq!(secure.sentinels, ["rediss://h:1", "rediss://h:2"]);
        assert_eq!(
            format!("{}10.0.0.1:7{}", secure.master_url.0, secure.master_url.1),
            "rediss://10.0.0.1:7/2"
        );
        // A space in the sentinels' password reaches them as a space.
        let spaced = parse(
            "redis+sentinel://h:1/m?sentinel_username=a%2Bb&sentinel_password=p%20w%2Bx",
            RedisOptions::default(),
        )?;
        let client = redis::Client::open(spaced.sentinels[0].as_str())
            .map_err(|error| LockError::InvalidConfig(error.to_string()))?;
        let info = client.get_connection_info().redis_settings();
        assert_eq!(info.username(), Some("a+b"));
        assert_eq!(info.password(), Some("p w+x"));
        let plain = parse("redis+sentinel://h:1/m", RedisOptions::default())?;
        assert_eq!(plain.db, 0);
        assert_eq!(plain.sentinels, ["redis://h:1"]);
        for bad in [
            "redis+sentinel://h:1",
            "redis+sentinel://h:1/",
            "redis+sentinel://h:1/m/x",
            "redis+sentinel://h:1,,h:2/m",
            "redis+sentinel://h:1/m?prefix=a{b",
            "redis+sentinel://h:1/m?wait_timeout_ms=50",
            "redis+sentinel://h:1/m?wait_replicas=0",
            "redis+sentinel://h:1/m?wait_replicas=1&wait_timeout_ms=5000",
            "redis+sentinel://h:1/m?tls=true",
            "redis+sentinel://h:1/m?sentinel_pasword=x",
        ] {
            assert!(
                matches!(
                    parse(bad, RedisOptions::default()),
                    Err(LockError::InvalidConfig(_))
                ),
                "{bad} accepted"
            );
        }
        Ok(())
    }
}
