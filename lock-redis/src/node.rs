//! One Redis server: the command connection, the scripts, and the pub/sub listener.

use crate::KeyScheme;
use crate::link::Link;
use futures::StreamExt;
use lock_core::{LockError, ReleaseHub};
use redis::IntoConnectionInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

// The lock key holds the owner token, with a `+` appended once a waiter asked to be woken
// (the "waiter mark"). The release announces itself on the key's channel only when the mark
// is there: a `PUBLISH` from a script costs the server about as much as the rest of an
// uncontended release, and nobody listens for most releases. Tokens are hex, so the mark
// cannot be confused with a token.

/// Lua for every script that grants: `next_fence(counter, clock)` raises the fence counter and
/// returns the new fence. With `clock` (an answer of `TIME`) the fence is also at least the
/// server's time in microseconds: a counter that went back (a restart without persistence, an
/// `appendfsync everysec` crash, a failover to a replica that had not received the last
/// increments) then still gives fences above every one handed out before, as long as fewer
/// than a million were handed out per second and the server's clock did not step back by more
/// than the outage lasted. Without `clock` (Redlock: the quorum's largest counter is the fence,
/// and nodes whose clocks differ would need the fence round on every acquire) it is `INCR`.
/// Lua numbers are doubles: microseconds since 1970 stay exact until the year 2255.
pub(crate) const NEXT_FENCE: &str = r"
local function next_fence(counter, clock)
  if not clock then
    return redis.call('INCR', counter)
  end
  local current = redis.call('GET', counter)
  local fence = (tonumber(current or '0') or error('fence counter ' .. counter .. ' holds ' .. current)) + 1
  local floor = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  if fence < floor then
    fence = floor
  end
  redis.call('SET', counter, string.format('%d', fence))
  return fence
end
-- The answer of an attempt that ran before (a re-sent call). The counter is written again
-- (its own value and TTL) so that this call writes something: `WAIT` after it counts the
-- replicas that have the first run's writes too. A call that writes nothing is counted
-- against a connection that wrote nothing, and `WAIT` answers at once, whatever the replicas
-- have (a re-sent acquire was taken as replicated while no replica had it).
local function resent_fence(counter)
  local fence = redis.call('GET', counter)
  if fence then
    redis.call('SET', counter, fence, 'KEEPTTL')
  end
  return tonumber(fence or '1')
end
";

/// Lua shared by the scripts of a lock's keys (KEYS: lock, fence counter, queue, queue
/// entries; see [`KeyScheme::lock_keys`]), placed after a script's fast path so that the
/// common calls do not even define it. `hand_over(channel, caller)` gives the free lock to the
/// first live entry of the fair queue: sets the lock key to its token (with the waiter mark
/// when more entries wait, so that its release looks at the queue, or when `marked`: a
/// released lock was marked, and a polling waiter that marked it must hear of the next
/// release too) and the TTL it asked for,
/// raises the fence, and announces the grant on `channel` as `g:<token>:<fence>` (unless the
/// entry is `caller`, which learns it from the answer). Entries whose liveness deadline
/// (server time) passed are dropped on the way; at most 64 per call, the next call goes on.
/// Returns `{token, fence}`, or nil when no entry is live.
const HAND_OVER: &str = r"
local function hand_over(channel, caller, marked)
  local clock, now
  for _ = 1, 64 do
    local head = redis.call('ZPOPMIN', KEYS[3])[1]
    if not head then
      return nil
    end
    if not now then
      clock = redis.call('TIME')
      now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
    end
    local entry = redis.call('HGET', KEYS[4], head)
    redis.call('HDEL', KEYS[4], head)
    if entry then
      local sep = string.find(entry, ':', 1, true)
      if sep and tonumber(string.sub(entry, 1, sep - 1)) >= now then
        local value = head
        if marked or redis.call('EXISTS', KEYS[3]) == 1 then
          value = head .. '+'
        end
        redis.call('SET', KEYS[1], value, 'PX', string.sub(entry, sep + 1))
        local fence = next_fence(KEYS[2], clock)
        if head ~= caller then
          redis.pcall('PUBLISH', channel, 'g:' .. head .. ':' .. string.format('%d', fence))
        end
        return {head, fence}
      end
    end
  end
  return nil
end
";

/// `SET lock token NX PX ttl`; on success raise the fence counter and return it (an
/// integer; also when the holder is this token already: the same attempt sent twice), else
/// `{PTTL, holder token}` so the caller knows when the holder's lease runs out (and, for Redlock, whether one holder has a quorum or the vote split). With ARGV[3] =
/// `1` (the caller has waiters for this key, subscribed before this call) the holder's value
/// gets the waiter mark, so that its release publishes. (The fair queue is not consulted: a
/// lock freed by its holder's expiry, not by a release, goes to whoever asks first, a queued
/// waiter's refresh at the holder's expiry or another client's attempt.) ARGV[4] = `1`: fences
/// follow the server clock too (see [`NEXT_FENCE`]).
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{NEXT_FENCE}{}",
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return next_fence(KEYS[2], ARGV[4] == '1' and redis.call('TIME') or nil)
end
local holder = redis.call('GET', KEYS[1]) or ''
local marked = string.sub(holder, -1) == '+'
if marked then
  holder = string.sub(holder, 1, -2)
end
if holder == ARGV[1] then
  -- This very attempt ran before (a client that re-sends a call whose connection dropped,
  -- as the Cluster client does): it holds the lock. The fence counter has not gone back.
  return resent_fence(KEYS[2])
end
if ARGV[3] == '1' and holder ~= '' and not marked then
  redis.call('APPEND', KEYS[1], '+')
end
return {redis.call('PTTL', KEYS[1]), holder}
"
    ))
});

/// A waiter's place in the fair queue (ARGV: token, TTL ms, entry liveness ms, database,
/// `1` to join or `0` to refresh): joins at the tail (an arrival counter orders the queue)
/// or refreshes its liveness deadline in place; a free lock goes to the first live entry.
/// Answers `{1, fence, ttl}` when this call granted the lock to the caller (its TTL started
/// now), `{2, fence, pttl}` when the lock was already handed to the caller (its grant message
/// may be on the way), `{0, pttl}` while it waits (the holder's remaining TTL), and `{3}`
/// when a refresh finds the entry gone (dropped as dead, or granted and expired unnoticed): a
/// token joins once, so a grant to it is never mistaken for one made after a later refresh.
static QUEUE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{NEXT_FENCE}{HAND_OVER}{}",
        r"
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] or value == ARGV[1] .. '+' then
  return {2, tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('PTTL', KEYS[1])}
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local live = tonumber(ARGV[3])
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  if ARGV[5] ~= '1' then
    return {3}
  end
  redis.call('ZADD', KEYS[3], redis.call('HINCRBY', KEYS[4], '#seq', 1), ARGV[1])
end
redis.call('HSET', KEYS[4], ARGV[1], string.format('%d', now + live) .. ':' .. ARGV[2])
for _, name in ipairs({KEYS[3], KEYS[4]}) do
  if redis.call('PTTL', name) < 2 * live then
    redis.call('PEXPIRE', name, 2 * live)
  end
end
if not value then
  local given = hand_over(string.sub(KEYS[1], 1, -5) .. 'rel:' .. ARGV[4], ARGV[1], false)
  if given and given[1] == ARGV[1] then
    return {1, given[2], tonumber(ARGV[2])}
  end
elseif string.sub(value, -1) ~= '+' then
  -- The holder's release must look at the queue.
  redis.call('APPEND', KEYS[1], '+')
end
return {0, redis.call('PTTL', KEYS[1])}
"
    ))
});

/// Compare the owner token (marked or not), then `PEXPIRE`. An expired key reads as absent,
/// so a late renew never revives it.
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] or value == ARGV[1] .. '+' then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// Compare the owner token, then `DEL`. An unmarked lock is done there: nobody waits. A
/// marked one (a waiter of the fair queue or a polling waiter asked to hear of it) is handed
/// to the first live entry of the queue if there is one (see `HAND_OVER`: its `SET` overwrites
/// the key; deleting it first and creating it again made every hand-off about 30 µs slower,
/// measured on a local server), else the key is deleted and the release is
/// announced (with the releaser's token, which names this release: Redlock's listeners hear
/// it from every node and pass it on once, see `heard.rs`) on the key's channel: the lock key `<base>:lock` with `lock` replaced by
/// `rel:<db>` (ARGV[2] is the database; [`KeyScheme::channel`] builds the same name), so the
/// client builds no channel name for the many releases that publish nothing. The `PUBLISH` is
/// a `pcall`: Lua does not roll the `DEL` back, so a failed announcement (an ACL user without
/// channel rights: `NOPERM`) must not turn a done release into an error; waiters then find the
/// lock free at their next backoff step. A token that is not the holder leaves the queue (a
/// waiter that gave up).
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{}{NEXT_FENCE}{HAND_OVER}{}",
        r"
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
if value ~= ARGV[1] .. '+' then
  if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then
    redis.call('HDEL', KEYS[4], ARGV[1])
  end
  return 0
end
",
        r"
local channel = string.sub(KEYS[1], 1, -5) .. 'rel:' .. ARGV[2]
if hand_over(channel, ARGV[1], true) then
  return 1
end
redis.call('DEL', KEYS[1])
redis.pcall('PUBLISH', channel, ARGV[1])
return 1
"
    ))
});

/// Redlock: while we still hold the lock on this node, raise its fence counter to at least
/// ARGV[2] (the largest fence our quorum returned). Returns 1 if we still held it.
static RAISE_FENCE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local value = redis.call('GET', KEYS[1])
if value ~= ARGV[1] and value ~= ARGV[1] .. '+' then
  return 0
end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local wanted = tonumber(ARGV[2])
if current == nil or current < wanted then
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
",
    )
});

/// Warns (once per connected node, in the background) when the server may evict lock keys:
/// with a `maxmemory` and any policy but `noeviction`, every lock key is a candidate (each
/// has a TTL, which the `volatile-*` policies pick from), and an evicted lock is free for the
/// next client while its holder, until its next renewal, believes it holds it.
pub(crate) fn warn_if_locks_may_be_evicted(mut conn: ConnectionManager, addr: String) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    tokio::spawn(async move {
        let info = timeout(
            Duration::from_secs(2),
            redis::cmd("INFO")
                .arg("memory")
                .query_async::<String>(&mut conn),
        )
        .await;
        if let Ok(Ok(info)) = info {
            warn_if_evicting(&info, &addr);
        }
    });
}

/// The warning of [`warn_if_locks_may_be_evicted`], from an `INFO` answer that has the memory
/// section.
fn warn_if_evicting(info: &str, addr: &str) {
    if let Some(policy) = eviction_policy(info) {
        tracing::warn!(
            server = %addr,
            policy,
            "this redis server may evict keys under memory pressure (maxmemory is set and \
             maxmemory-policy is not noeviction): an evicted lock is free for another \
             client while its holder still believes it holds it; use a server (or \
             database instance) with maxmemory-policy noeviction for locks"
        );
    }
}

/// The eviction policy from an `INFO memory` answer, when it can evict keys (a `maxmemory`
/// is set and the policy is not `noeviction`).
pub(crate) fn eviction_policy(info: &str) -> Option<String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    let maxmemory: u64 = field("maxmemory:")?.parse().ok()?;
    let policy = field("maxmemory_policy:")?;
    (maxmemory > 0 && policy != "noeviction").then(|| policy.to_owned())
}

/// Maps a redis error to a [`LockError::Backend`], keeping it as the source.
pub(crate) fn backend_error(context: &str, error: redis::RedisError) -> LockError {
    // redis marks a failed AUTH "reconnect", but a wrong password, a missing ACL right or an
    // untrusted certificate stays wrong however often we retry: a refusal, so callers stop.
    if let Some(refused) = crate::tls::refusal(context, &error) {
        return refused;
    }
    let retryable = !matches!(error.retry_method(), redis::RetryMethod::NoRetry)
        || !is_server_reply(&error)
        || refuses_writes_for_a_while(&error);
    LockError::backend("redis", format!("{context}: {error}"), retryable, error)
}

/// Whether `error` is the server's own answer (as opposed to no answer: an I/O error, a
/// timeout, a dropped connection).
fn is_server_reply(error: &redis::RedisError) -> bool {
    !(error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal())
}

/// A server that refuses writes until something changes on its side: too few replicas
/// (`min-replicas-to-write`, e.g. just after a failover), full under `noeviction`, busy with
/// a long script, or failing to persist. redis-rs reads these codes as final; a waiting
/// acquire (and the watchdog) should wait them out instead.
fn refuses_writes_for_a_while(error: &redis::RedisError) -> bool {
    matches!(
        error.code(),
        Some("NOREPLICAS" | "OOM" | "BUSY" | "MISCONF" | "CLUSTERDOWN")
    )
}

/// Whether a command that failed with `error` may have run on the server: false only when it
/// provably never left this client (the connection was refused). A timeout or a connection
/// lost after sending leaves it unknown.
pub(crate) fn may_have_run(error: &LockError) -> bool {
    let redis = std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<redis::RedisError>());
    !redis.is_some_and(redis::RedisError::is_connection_refusal)
}

/// Idle time before the first TCP keepalive probe, the pause between probes, and how long
/// sent data may stay unacknowledged before the kernel aborts the connection: a peer that
/// vanished (host gone, a NAT or firewall that dropped the flow) is noticed in seconds, not
/// after the kernel's ~15 minutes of retransmissions.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for `url` (with the TLS settings `tls`) whose TCP connections use keepalive and a
/// user timeout.
fn open_client(url: &str, tls: &crate::RedisTls) -> Result<redis::Client, LockError> {
    let bad = |error: redis::RedisError| {
        let url = lock_core::redact_url(url);
        LockError::InvalidConfig(format!("redis URL {url:?}: {error}"))
    };
    let info = url.into_connection_info().map_err(bad)?;
    let keepalive = redis::io::tcp::socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    let tcp = info.tcp_settings().clone().set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let tcp = tcp.set_user_timeout(TCP_USER_TIMEOUT);
    crate::tls::build_client(info.set_tcp_settings(tcp), tls)
}

/// The command connection of a node, replaced when it goes silent.
///
/// `ConnectionManager` reconnects only on errors that close the connection; a response
/// timeout leaves it on the same socket. A flow that a NAT or firewall dropped (or a vanished
/// host) then times out every command until the kernel gives up on the socket. So a command
/// that timed out (or was abandoned by its caller) makes one probe `PING` the connection, and
/// if that goes unanswered too, a fresh `ConnectionManager` takes its place.
struct Conn {
    /// The connection and its generation (bumped at each replacement).
    current: Mutex<(u64, Link)>,
    /// The server's client (fresh connections, the pub/sub listener); replaced when Sentinel
    /// names another master. A cluster: its seed nodes, which the listener tries in turn.
    clients: Mutex<Vec<redis::Client>>,
    config: ConnectionManagerConfig,
    command_timeout: Duration,
    /// One probe at a time.
    probing: AtomicBool,
    /// Sentinel: re-resolves the master after failures; `None` for a fixed server or a cluster.
    follow: Option<Arc<crate::sentinel::Follower>>,
    /// Bumped each time the node moved to another server, so the listener moves too (at
    /// once, skipping what is left of its reconnect backoff).
    moved: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("clients", &self.clients())
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

impl Conn {
    fn current(&self) -> (u64, Link) {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// A command on the current connection went unanswered: probe it in the background.
    fn suspect(self: &Arc<Self>) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let conn = self.clone();
        // On the background runtime: a probe ended with a caller's runtime would leave
        // `probing` set, and a silent connection would never be replaced.
        let spawned = lock_core::spawn_background(async move {
            conn.probe().await;
            conn.probing.store(false, Ordering::Release);
        });
        if spawned.is_none() {
            self.probing.store(false, Ordering::Release);
        }
    }

    async fn probe(&self) {
        let (generation, mut manager) = self.current();
        // A cluster connection reconnects and re-routes by itself.
        if manager.is_cluster() {
            return;
        }
        let answer = timeout(
            self.command_timeout,
            redis::cmd("PING").query_async::<redis::Value>(&mut manager),
        )
        .await;
        let silent = match answer {
            Err(_) => true,
            Ok(Err(error)) => error.is_timeout(),
            Ok(Ok(_)) => false,
        };
        if !silent {
            return;
        }
        // Lazy: it connects on first use, so a still unreachable server costs nothing here.
        let Some(client) = self.clients().into_iter().next() else {
            return;
        };
        match ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone()) {
            Ok(fresh) => {
                let mut current = self
                    .current
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if current.0 == generation {
                    *current = (generation + 1, Link::Server(fresh));
                    tracing::warn!(
                        addr = %client.get_connection_info().addr(),
                        "redis connection silent (PING unanswered within {:?}); replaced it",
                        self.command_timeout
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "replacing a silent redis connection failed"),
        }
    }
}

/// Following a server that moves (Sentinel) and serving the listener (Sentinel, Cluster).
impl Conn {
    /// A connection to one fixed server, or to the master Sentinel named (`follow`).
    fn server(
        client: redis::Client,
        config: ConnectionManagerConfig,
        manager: ConnectionManager,
        command_timeout: Duration,
        follow: Option<Arc<crate::sentinel::Follower>>,
    ) -> Self {
        Conn {
            current: Mutex::new((0, Link::Server(manager))),
            clients: Mutex::new(vec![client]),
            config,
            command_timeout,
            probing: AtomicBool::new(false),
            follow,
            moved: tokio::sync::watch::Sender::new(0),
        }
    }

    fn clients(&self) -> Vec<redis::Client> {
        self.clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The client the listener's `attempt`-th connection uses: the server's, or for a cluster
    /// the seed nodes in turn (classic pub/sub reaches every node of a cluster).
    fn pubsub_client(&self, attempt: usize) -> Option<redis::Client> {
        let clients = self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = clients.len();
        (count > 0).then(|| clients[attempt % count].clone())
    }

    /// Moves the node to another server (Sentinel named a new master): later calls and the
    /// listener use `client`; calls in flight finish (or fail) on the old connection.
    fn repoint(&self, client: redis::Client, manager: ConnectionManager) {
        *self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = vec![client];
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = (current.0 + 1, Link::Server(manager));
        drop(current);
        self.moved.send_modify(|moves| *moves += 1);
    }

    /// A call failed with `error`: with Sentinel, a lost connection or a `READONLY` answer
    /// (the master was demoted) has the master resolved again, in the background.
    fn after_error(self: &Arc<Self>, error: &redis::RedisError) {
        self.follow_master(Some(error));
    }

    /// Sentinel: looks the master up again, after `error` (paced, and only for errors that
    /// suggest a move) or at once (`None`: a sentinel announced a failover).
    fn follow_master(self: &Arc<Self>, error: Option<&redis::RedisError>) {
        let Some(follow) = &self.follow else {
            return;
        };
        let addr = self
            .clients()
            .first()
            .map(|client| client.get_connection_info().addr().to_string())
            .unwrap_or_default();
        let conn = self.clone();
        follow.after_error(error, addr, move |client, manager| {
            conn.repoint(client, manager);
        });
    }
}

/// Armed while a command is in flight; dropped armed (the command timed out or its caller
/// gave up on it), it has the connection probed.
struct InFlight<'a> {
    conn: &'a Arc<Conn>,
    armed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.conn.suspect();
        }
    }
}

/// `EVALSHA` of `script`, sized up front: growing the buffers argument by argument was a
/// measurable share of the client's time per call.
fn evalsha(script: &redis::Script, keys: &[&str], args: impl redis::ToRedisArgs) -> redis::Cmd {
    let mut command = redis::Cmd::with_capacity(8, 160);
    command
        .arg("EVALSHA")
        .arg(script.get_hash())
        .arg(keys.len())
        .arg(keys)
        .arg(args);
    command
}

/// What `WAIT` answered after a write, when `wait_replicas` asked for it.
#[derive(Debug)]
pub(crate) struct Replicated(Option<Shortfall>);

#[derive(Debug)]
struct Shortfall {
    reached: u32,
    replicas: u32,
    wait: Duration,
}

impl Replicated {
    /// A retryable error when the write reached fewer replicas than asked for: a failover
    /// could lose it. The caller gives back a grant it made, as after a lost answer.
    pub(crate) fn confirm(&self, context: &str) -> Result<(), LockError> {
        match &self.0 {
            Some(Shortfall {
                reached,
                replicas,
                wait,
            }) if reached < replicas => Err(LockError::backend_msg(
                "redis",
                format!(
                    "{context}: the write reached {reached} of the {replicas} replicas asked \
                     for within {wait:?} (wait_replicas): a failover could lose it, so it does \
                     not count (a grant is given back)"
                ),
                true,
            )),
            _ => Ok(()),
        }
    }
}

/// What [`Node::call`] sends: a script, or a script and `WAIT` in one pipeline.
enum Request {
    Script(redis::Cmd),
    Confirmed(redis::Pipeline),
}

impl Request {
    async fn query<T: redis::FromRedisValue>(&self, conn: &mut Link) -> redis::RedisResult<T> {
        match self {
            Request::Script(command) => command.query_async(conn).await,
            // Boxed: the rare pipeline's state would otherwise enlarge every script call's
            // future.
            Request::Confirmed(pipeline) => Box::pin(pipeline.query_async(conn)).await,
        }
    }
}

/// A node's answer to the queue script.
#[derive(Debug, Clone, Copy)]
pub(crate) enum InLine {
    /// This call granted the lock (its TTL started after the call was sent); the fence.
    Granted(u64),
    /// A release handed the lock over earlier; the fence and the remaining TTL in ms.
    Handed(u64, i64),
    /// Still waiting; the holder's remaining TTL in ms (negative: none or unknown).
    Waiting(i64),
    /// A refresh found the entry gone: join again, with a new token.
    Gone,
}

/// A node's answer to the acquire script.
#[derive(Debug, Clone)]
pub(crate) enum NodeAcquire {
    /// Set; the fence counter's new value.
    Acquired(u64),
    /// Held by another owner: its remaining TTL in ms (negative: unknown) and its token.
    Held(i64, String),
}

enum Command {
    Subscribe(String, oneshot::Sender<()>),
    Unsubscribe(String),
}

/// Keys whose channel the listener has confirmed on its current connection. A waiter of such
/// a key needs no message to the listener (`Node::subscribe`): in a busy loop on one key that
/// message and its answer were two task wake-ups per acquisition. Cleared when the
/// connection is lost. Why a key found here stays subscribed: a waiter joins the hub before
/// it looks here, and the listener, before it sends a key's `UNSUBSCRIBE`, takes the key out
/// of this set and only then checks that the hub has no waiter of it (only the listener's
/// own task puts keys in, and never between those two steps); so a waiter that found the key
/// is seen by that check.
#[derive(Clone, Debug, Default)]
struct ConfirmedKeys(Arc<Mutex<HashSet<String>>>);

impl ConfirmedKeys {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn contains(&self, key: &str) -> bool {
        self.set().contains(key)
    }

    fn insert(&self, key: &str) {
        let mut set = self.set();
        if !set.contains(key) {
            set.insert(key.to_owned());
        }
    }

    fn remove(&self, key: &str) {
        self.set().remove(key);
    }

    fn clear(&self) {
        self.set().clear();
    }

    /// Before a key's `UNSUBSCRIBE` is decided: takes `key` out, and only then asks
    /// `has_waiters`. A waiter that still found the key here had joined the hub before, so
    /// `has_waiters` sees it (see the type's docs).
    fn take_out_then_check(&self, key: &str, has_waiters: impl FnOnce(&str) -> bool) -> bool {
        self.remove(key);
        has_waiters(key)
    }
}

/// What a node and the hub's idle hook hold of a listener: its command queue and the keys it
/// has confirmed.
#[derive(Clone, Debug)]
struct ListenerLink {
    commands: mpsc::UnboundedSender<Command>,
    confirmed: ConfirmedKeys,
}

/// A listener's link and the receiving end of its command queue.
fn listener_channel() -> (ListenerLink, mpsc::UnboundedReceiver<Command>) {
    let (commands, receiver) = mpsc::unbounded_channel();
    let link = ListenerLink {
        commands,
        confirmed: ConfirmedKeys::default(),
    };
    (link, receiver)
}

/// One Redis server.
#[derive(Debug)]
pub(crate) struct Node {
    conn: Arc<Conn>,
    /// The database (release announcements name it: pub/sub ignores databases).
    db: i64,
    listener: ListenerLink,
    addr: String,
    /// `RedisOptions::wait_replicas`: each write script is followed by `WAIT` in the same
    /// pipeline (see [`Node::eval_write`]).
    replicas: Option<(u32, Duration)>,
    /// Whether fences also follow the server clock ([`NEXT_FENCE`]): yes but on a Redlock of
    /// more than one node.
    pub(crate) clock_fences: bool,
    /// Redlock: the servers of all nodes, and whether this node's was found to be another
    /// node's too (checked before its first vote; see [`DistinctServers`]).
    distinct: Option<(Arc<DistinctServers>, DistinctVerdict)>,
}

/// Whether a node's server is no other node's, once asked (`Err`: why it never votes).
type DistinctVerdict = std::sync::OnceLock<Result<(), String>>;

/// Redlock: which server each node turned out to be (`run_id` from `INFO server`). One server
/// listed under two names (a host name and its address, two of its interfaces) would cast two
/// votes: with 3 nodes it alone would be a quorum, and its restart would let a second holder
/// in. The first node to name a server keeps its vote; a later one never votes.
#[derive(Debug, Default)]
pub(crate) struct DistinctServers {
    /// run_id → the address of the node that reached it first.
    seen: Mutex<HashMap<String, String>>,
}

impl DistinctServers {
    /// Registers `addr`'s server; `Err` naming the other node if that server was another's.
    fn register(&self, run_id: &str, addr: &str) -> Result<(), String> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match seen.get(run_id) {
            Some(first) if first != addr => Err(format!(
                "redlock nodes {first} and {addr} are the same redis server (run_id {run_id}): \
                 it would count twice towards the quorum; list each server once"
            )),
            Some(_) => Ok(()),
            None => {
                seen.insert(run_id.to_owned(), addr.to_owned());
                Ok(())
            }
        }
    }
}

/// What a node needs before it connects: its client, the connection settings, its address.
struct Prepared {
    client: redis::Client,
    config: ConnectionManagerConfig,
    addr: String,
}

impl Prepared {
    fn new(url: &str, options: &crate::RedisOptions) -> Result<Self, LockError> {
        let client = open_client(url, &options.tls)?;
        let addr = client.get_connection_info().addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            // No per-request timer in the driver: `eval` bounds the whole call (reconnect
            // included) with one timer of its own; two per call cost 64-task throughput.
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        Ok(Prepared {
            client,
            config,
            addr,
        })
    }

    /// Connects now, bounded by `connect_timeout`.
    async fn connect(&self, connect_timeout: Duration) -> Result<ConnectionManager, LockError> {
        let addr = &self.addr;
        // A `PING` once connected: a server that wants credentials the URL lacks (or a user
        // switched off) accepts the connection and refuses only the first command, which
        // should fail `connect`, not the first lock.
        let connect = async {
            let mut conn =
                ConnectionManager::new_with_config(self.client.clone(), self.config.clone())
                    .await?;
            redis::cmd("PING")
                .query_async::<redis::Value>(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(conn)
        };
        match timeout(connect_timeout, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(error)) => {
                let hint = crate::tls::mismatch_hint(&self.client, Some(&error));
                Err(crate::tls::with_hint(
                    backend_error(&format!("connecting to {addr}"), error),
                    hint,
                ))
            }
            Err(_) => Err(LockError::backend_msg(
                "redis",
                format!(
                    "connecting to {addr}: no answer within {connect_timeout:?}{}",
                    crate::tls::mismatch_hint(&self.client, None)
                ),
                true,
            )),
        }
    }

    /// A connection that connects on first use (and retries on use).
    fn lazy(&self) -> Result<ConnectionManager, LockError> {
        ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
            .map_err(|error| backend_error(&format!("connecting to {}", self.addr), error))
    }
}

/// What a node's listener feeds: the release hub (release announcements) and the grants the
/// backend's queued waiters expect.
#[derive(Clone)]
struct Feeds {
    hub: ReleaseHub,
    grants: crate::queue::Grants,
    /// With several nodes (Redlock), the copies of one release each node announces pass to
    /// the hub once.
    heard: Option<Arc<crate::heard::Heard>>,
}

impl Node {
    /// A node over `conn` (connected or lazy); starts the pub/sub listener, which connects
    /// in the background and feeds `hub`.
    fn start(
        prepared: Prepared,
        conn: ConnectionManager,
        scheme: KeyScheme,
        feeds: Feeds,
        commands: (ListenerLink, mpsc::UnboundedReceiver<Command>),
        options: &crate::RedisOptions,
        shutdown: CancellationToken,
    ) -> Node {
        let Prepared {
            client,
            config,
            addr,
        } = prepared;
        let conn = Conn::server(client, config, conn, options.command_timeout, None);
        Self::spawn(
            Arc::new(conn),
            addr,
            scheme,
            feeds,
            commands,
            options,
            shutdown,
        )
    }

    /// A node over `conn`; starts its pub/sub listener.
    fn spawn(
        conn: Arc<Conn>,
        addr: String,
        scheme: KeyScheme,
        feeds: Feeds,
        commands: (ListenerLink, mpsc::UnboundedReceiver<Command>),
        options: &crate::RedisOptions,
        shutdown: CancellationToken,
    ) -> Node {
        let (link, receiver) = commands;
        let db = scheme.db();
        // On the caller's runtime, where the waiters it wakes run (a grant passed to another
        // thread cost a hand-off a wake-up of that thread); if that runtime shuts down (a
        // backend in a static, connected by the first `#[tokio::test]`), it starts again on
        // the background runtime, connects and wakes its waiters, instead of ending: every
        // waiter would poll from then on (conformance
        // `backend_outlives_the_runtime_that_connected_it`).
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let op_timeout = options.command_timeout.min(Duration::from_secs(1));
        lock_core::spawn_resident(shutdown.clone(), {
            let conn = conn.clone();
            let confirmed = link.confirmed.clone();
            move || {
                let (conn, scheme, feeds) = (conn.clone(), scheme.clone(), feeds.clone());
                let (receiver, confirmed) = (receiver.clone(), confirmed.clone());
                let shutdown = shutdown.clone();
                async move {
                    // Free once the listener that ran before is dropped.
                    let mut commands = receiver.lock().await;
                    listen(
                        &conn,
                        &scheme,
                        &feeds,
                        &mut commands,
                        &confirmed,
                        &shutdown,
                        op_timeout,
                    )
                    .await;
                }
            }
        });
        Node {
            conn,
            db,
            listener: link,
            addr,
            replicas: options.wait_replicas,
            clock_fences: true,
            distinct: None,
        }
    }

    /// Redlock: whether this node's server is no other node's. Asked once (`INFO`), before
    /// the node's first vote.
    pub(crate) async fn check_distinct(&self) -> redis::RedisResult<()> {
        let Some((servers, verdict)) = &self.distinct else {
            return Ok(());
        };
        let verdict = match verdict.get() {
            Some(verdict) => verdict.clone(),
            None => {
                let found = match self.server_run_id().await? {
                    Some(run_id) => servers.register(&run_id, &self.addr),
                    // A server (or proxy) that does not say, or a user that may not ask:
                    // nothing to compare, the node votes unchecked.
                    None => Ok(()),
                };
                verdict.get_or_init(|| found).clone()
            }
        };
        verdict.map_err(|message| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "repeated redlock server",
                message,
            ))
        })
    }

    /// The server's `run_id` from one `INFO` (its default sections: `server` for the id,
    /// `memory` for the eviction warning, given here too). `Err` only when it did not
    /// answer (asked again before the next call); `None` when it does not say or refuses
    /// (a user without the `info` right, a renamed command).
    async fn server_run_id(&self) -> redis::RedisResult<Option<String>> {
        let (_, mut conn) = self.conn.current();
        let limit = self.conn.command_timeout;
        let info = timeout(limit, redis::cmd("INFO").query_async::<String>(&mut conn))
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer to INFO within {limit:?}"),
                ))
            })?;
        match info {
            Ok(info) => {
                warn_if_evicting(&info, &self.addr);
                Ok(info
                    .lines()
                    .find_map(|line| line.strip_prefix("run_id:"))
                    .map(|run_id| run_id.trim().to_owned())
                    .filter(|run_id| !run_id.is_empty()))
            }
            Err(error) if !is_server_reply(&error) => Err(error),
            Err(error) => {
                tracing::warn!(
                    node = %self.addr, %error,
                    "cannot tell whether this redlock node is another node's server (INFO \
                     refused): list each server once"
                );
                Ok(None)
            }
        }
    }

    /// The database number (release channels name it).
    pub(crate) fn db(&self) -> i64 {
        self.db
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// One attempt at the lock whose key and fence counter are `lock_key` and `fence_key`.
    pub(crate) async fn acquire(
        &self,
        lock_key: &str,
        fence_key: &str,
        token: &str,
        ttl_ms: u64,
        mark_for_waiters: bool,
    ) -> Result<NodeAcquire, LockError> {
        let (answer, replicated): (redis::Value, _) = self
            .eval_write(
                "acquire",
                &ACQUIRE,
                &[lock_key, fence_key],
                (
                    token,
                    ttl_ms,
                    u8::from(mark_for_waiters),
                    u8::from(self.clock_fences),
                ),
            )
            .await?;
        let unexpected = |answer: &redis::Value| {
            LockError::backend_msg(
                "redis",
                format!("unexpected answer to the acquire script: {answer:?}"),
                false,
            )
        };
        match answer {
            redis::Value::Int(fence) => {
                let fence = u64::try_from(fence).map_err(|_| unexpected(&answer))?;
                replicated.confirm("acquire")?;
                Ok(NodeAcquire::Acquired(fence))
            }
            redis::Value::Array(ref items) => match items.as_slice() {
                [redis::Value::Int(pttl), holder] => {
                    let holder = redis::from_redis_value_ref::<String>(holder)
                        .map_err(|_| unexpected(&answer))?;
                    Ok(NodeAcquire::Held(*pttl, holder))
                }
                _ => Err(unexpected(&answer)),
            },
            other => Err(unexpected(&other)),
        }
    }

    /// `EVALSHA` of `script` with `keys` and `args`, built as one command (no
    /// intermediate buffers); on `NOSCRIPT` (a restarted or flushed server) the script is
    /// loaded and the call repeated. The whole call, a reconnect it waits for included, is
    /// bounded by the command timeout; a call that times out or is abandoned has the
    /// connection probed (see [`Conn`]).
    pub(crate) async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: impl redis::ToRedisArgs,
    ) -> redis::RedisResult<T> {
        self.call(script, &Request::Script(evalsha(script, keys, args)))
            .await
    }

    /// [`Node::eval`] of a script that writes a lease (acquire, renew). With `wait_replicas`
    /// the script and `WAIT replicas ms` go out as one pipeline on one connection, so the
    /// count answers for the connection that carried this write. (A `WAIT` sent as a command
    /// of its own could go out on a connection replaced meanwhile, by a reconnect or a
    /// Sentinel switch, which wrote nothing: it would confirm a write no replica has.) The
    /// caller checks the count with [`Replicated::confirm`] where the write matters (a grant,
    /// a renewal), not for a refusal.
    pub(crate) async fn eval_write<T: redis::FromRedisValue>(
        &self,
        context: &str,
        script: &redis::Script,
        keys: &[&str],
        args: impl redis::ToRedisArgs,
    ) -> Result<(T, Replicated), LockError> {
        let command = evalsha(script, keys, args);
        let Some((replicas, wait)) = self.replicas else {
            let answer = self
                .call(script, &Request::Script(command))
                .await
                .map_err(|error| backend_error(context, error))?;
            return Ok((answer, Replicated(None)));
        };
        let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipeline = redis::pipe();
        pipeline.add_command(command);
        pipeline.cmd("WAIT").arg(replicas).arg(millis);
        // On a cluster the pipeline goes to the master of the script's key (WAIT names no
        // key, so the script's slot routes both).
        let (answer, reached): (T, u32) = self
            .call(script, &Request::Confirmed(pipeline))
            .await
            .map_err(|error| backend_error(context, error))?;
        Ok((
            answer,
            Replicated(Some(Shortfall {
                reached,
                replicas,
                wait,
            })),
        ))
    }

    /// Sends `request` on the current connection, bounded by the command timeout.
    async fn call<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        request: &Request,
    ) -> redis::RedisResult<T> {
        self.check_distinct().await?;
        let (_, mut conn) = self.conn.current();
        let mut in_flight = InFlight {
            conn: &self.conn,
            armed: true,
        };
        let limit = self.conn.command_timeout;
        let result = match timeout(limit, Self::run(&mut conn, script, request)).await {
            Ok(result) => result,
            // ConnectionManager bounds each answer, not the reconnect a call may wait for.
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {limit:?}"),
            )
            .into()),
        };
        in_flight.armed = matches!(&result, Err(error) if error.is_timeout());
        if let Err(error) = &result {
            self.conn.after_error(error);
        }
        result
    }

    async fn run<T: redis::FromRedisValue>(
        conn: &mut Link,
        script: &redis::Script,
        request: &Request,
    ) -> redis::RedisResult<T> {
        match request.query(conn).await {
            Err(error)
                if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                script.load_async(conn).await?;
                request.query(conn).await
            }
            other => other,
        }
    }

    pub(crate) async fn renew(
        &self,
        lock_key: &str,
        token: &str,
        ttl_ms: u64,
    ) -> Result<bool, LockError> {
        let (renewed, replicated): (i64, _) = self
            .eval_write("renew", &RENEW, &[lock_key], (token, ttl_ms))
            .await?;
        if renewed == 1 {
            replicated.confirm("renew")?;
        }
        Ok(renewed == 1)
    }

    /// Releases `token`'s lock (handing it to the queue's first live entry), or takes
    /// `token` out of the queue; true when `token` held the lock.
    pub(crate) async fn release(&self, keys: &[String; 4], token: &str) -> Result<bool, LockError> {
        let released: i64 = self
            .eval(
                &RELEASE,
                &keys.each_ref().map(String::as_str),
                (token, self.db),
            )
            .await
            .map_err(|error| backend_error("release", error))?;
        Ok(released == 1)
    }

    /// Joins the lock's fair queue as `token` (`join`), or refreshes its place (see
    /// [`QUEUE`]); `live_ms` is how long the entry stays without another refresh.
    pub(crate) async fn queue(
        &self,
        keys: &[String; 4],
        token: &str,
        ttl_ms: u64,
        live_ms: u64,
        join: bool,
    ) -> Result<InLine, LockError> {
        // Not through the replica wait: most answers are "still waiting"; a grant is
        // confirmed by the waiter (one renewal) when `wait_replicas` asks for it.
        let answer: Vec<i64> = self
            .eval(
                &QUEUE,
                &keys.each_ref().map(String::as_str),
                (token, ttl_ms, live_ms, self.db, u8::from(join)),
            )
            .await
            .map_err(|error| backend_error("queue", error))?;
        let fence = |value: i64| {
            u64::try_from(value).map_err(|_| {
                LockError::backend_msg(
                    "redis",
                    format!("unexpected answer to the queue script: {answer:?}"),
                    false,
                )
            })
        };
        match answer.as_slice() {
            [1, granted, _] => Ok(InLine::Granted(fence(*granted)?)),
            [2, granted, pttl] => Ok(InLine::Handed(fence(*granted)?, *pttl)),
            [0, pttl] => Ok(InLine::Waiting(*pttl)),
            [3] => Ok(InLine::Gone),
            _ => Err(LockError::backend_msg(
                "redis",
                format!("unexpected answer to the queue script: {answer:?}"),
                false,
            )),
        }
    }

    /// Whether writes wait for replicas (`RedisOptions::wait_replicas`).
    pub(crate) fn waits_for_replicas(&self) -> bool {
        self.replicas.is_some()
    }

    pub(crate) async fn raise_fence(
        &self,
        lock_key: &str,
        fence_key: &str,
        token: &str,
        fence: u64,
    ) -> Result<bool, LockError> {
        let held: i64 = self
            .eval(&RAISE_FENCE, &[lock_key, fence_key], (token, fence))
            .await
            .map_err(|error| backend_error("raise fence", error))?;
        Ok(held == 1)
    }

    /// Asks the listener to subscribe to `key`'s channel; resolves when the server confirmed
    /// it (at once if it already had: no round trip), or when the listener is not connected
    /// (it then subscribes on reconnect and wakes every waiter). The listener keeps the
    /// request when the caller stops waiting (cancel safe: the key stays subscribed while it
    /// has waiters in the hub).
    pub(crate) async fn subscribe(&self, key: &str) {
        if self.listener.confirmed.contains(key) {
            return;
        }
        let (ack, confirmed) = oneshot::channel();
        if self
            .listener
            .commands
            .send(Command::Subscribe(key.to_owned(), ack))
            .is_ok()
        {
            let _ = confirmed.await;
        }
    }
}

/// A connected server, for a node made outside [`Nodes::connect`] (Sentinel's master).
pub(crate) struct Server {
    pub(crate) client: redis::Client,
    config: ConnectionManagerConfig,
    pub(crate) manager: ConnectionManager,
    pub(crate) addr: String,
}

/// Connects to the server at `url` (the options' settings: keepalive, timeouts, and whatever
/// the URL asks for), bounded by the connect timeout.
pub(crate) async fn connect_server(
    url: &str,
    options: &crate::RedisOptions,
) -> Result<Server, LockError> {
    let prepared = Prepared::new(url, options)?;
    let manager = prepared.connect(options.connect_timeout).await?;
    Ok(Server {
        client: prepared.client,
        config: prepared.config,
        manager,
        addr: prepared.addr,
    })
}

impl Server {
    /// A connection manager to the same server that connects on its first command (on the
    /// runtime that sends it).
    pub(crate) fn lazy_twin(&self) -> redis::RedisResult<ConnectionManager> {
        ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
    }
}

/// The hook a hub calls when a key's last waiter leaves: unsubscribe on every node.
fn idle_hook(links: Vec<ListenerLink>, heard: Option<Arc<crate::heard::Heard>>) -> ReleaseHub {
    ReleaseHub::with_idle_hook(move |key| {
        if let Some(heard) = &heard {
            heard.forget(key);
        }
        for link in &links {
            // The listener takes the key out of its confirmed set itself (see
            // `ConfirmedKeys`), and keeps it if a waiter came back meanwhile.
            let _ = link.commands.send(Command::Unsubscribe(key.to_owned()));
        }
    })
}

/// The pub/sub listener of one node: one connection per backend and node, whatever the
/// number of waiters. Reconnects with backoff; after each (re)connect it subscribes every key
/// that has waiters and wakes them all, since releases may have been missed meanwhile.
async fn listen(
    conn: &Arc<Conn>,
    scheme: &KeyScheme,
    feeds: &Feeds,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    confirmed: &ConfirmedKeys,
    shutdown: &CancellationToken,
    op_timeout: Duration,
) {
    let Feeds { hub, grants, heard } = feeds;
    let mut delay = LISTEN_MIN_DELAY;
    let mut first = true;
    let mut attempt = 0usize;
    let mut moved = conn.moved.subscribe();
    loop {
        // Nothing is confirmed on a connection that is not there (yet, or any more).
        confirmed.clear();
        if !first {
            // Every reconnect waits its backoff step, whatever failed (connect, SUBSCRIBE
            // refused by an ACL, a dropped link), so a failure that repeats at once cannot
            // turn into a tight reconnect loop. Subscribes that come meanwhile are answered
            // at once (they are redone on connect).
            let until = Instant::now() + delay;
            delay = (delay * 2).min(LISTEN_MAX_DELAY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => break,
                    command = commands.recv() => if command.is_none() { return },
                    // The server moved: no reason to wait before connecting there.
                    Ok(()) = moved.changed() => {
                        delay = LISTEN_MIN_DELAY;
                        break;
                    }
                }
            }
        }
        first = false;
        let Some(client) = conn.pubsub_client(attempt) else {
            return;
        };
        let client = for_listener(client);
        attempt = attempt.wrapping_add(1);
        // From now on a move (Sentinel named a new master) makes the listener reconnect.
        moved.borrow_and_update();
        let (pushed, mut pushes) = mpsc::unbounded_channel();
        let inline = grants.clone();
        // Requests are bounded here (`start`), the connect by the timeout around it.
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(None)
            .set_push_sender(move |push| {
                on_push(&inline, &pushed, push);
                Ok::<(), std::convert::Infallible>(())
            });
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            connected = timeout(
                op_timeout.max(Duration::from_millis(500)),
                client.get_multiplexed_async_connection_with_config(&config),
            ) => connected,
        };
        let sink = match connected {
            Ok(Ok(sink)) => sink,
            Ok(Err(error)) => {
                // Sentinel: a master that went away is looked up again.
                conn.after_error(&error);
                continue;
            }
            Err(_) => continue,
        };
        let mut channels: HashMap<String, String> = HashMap::new();
        let keys = hub.subscribed_keys();
        if !keys.is_empty() {
            // Nothing else to serve before the connection is back: one SUBSCRIBE for all.
            let names: Vec<String> = keys.iter().map(|key| scheme.channel(key)).collect();
            let mut sink = sink.clone();
            if !matches!(
                timeout(op_timeout, sink.subscribe(&names)).await,
                Ok(Ok(()))
            ) {
                continue;
            }
            channels.extend(names.into_iter().zip(keys.iter().cloned()));
        }
        for key in &keys {
            confirmed.insert(key);
        }
        let mut subs = Subscriptions {
            state: keys.into_iter().map(|key| (key, Sub::Confirmed)).collect(),
            channels,
            requests: Requests::new(),
            batch: Vec::new(),
            batch_id: 0,
            sink,
            scheme: scheme.clone(),
            limit: op_timeout,
            confirmed: confirmed.clone(),
        };
        let connected_at = Instant::now();
        hub.notify_all();
        let mut ping = tokio::time::interval(Duration::from_secs(1));
        ping.tick().await;
        let mut pinging = false;
        // No request is awaited inline: the loop keeps reading release messages and commands
        // while confirmations are on their way (`subs.requests`).
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    // Waiters that start together reach this queue a few microseconds
                    // apart: one yield lets them all in, so they share one SUBSCRIBE.
                    tokio::task::yield_now().await;
                    // Every command waiting now is taken (bounded, so that a flood of
                    // commands cannot keep messages waiting); the new keys' SUBSCRIBEs go
                    // out as one command.
                    let mut next = Some(command);
                    let mut taken = 0;
                    while let Some(command) = next {
                        subs.take(command, hub).await;
                        taken += 1;
                        next = if taken < COMMAND_BATCH { commands.try_recv().ok() } else { None };
                    }
                    subs.send_batch().await;
                }
                Some(done) = subs.requests.next() => match done {
                    Done::Subscribed { batch, keys, ok: true } => subs.confirmed(batch, keys),
                    Done::Pong { ok: true } => pinging = false,
                    Done::Unsubscribed { ok: true } => {}
                    // A refused (ACL) or unanswered request: reconnect, with backoff. The
                    // waiters still pending are answered (their acks dropped); the
                    // reconnect subscribes their keys and wakes them.
                    Done::Subscribed { ok: false, .. }
                    | Done::Pong { ok: false }
                    | Done::Unsubscribed { ok: false } => break,
                },
                pushed = pushes.recv() => match pushed {
                    None | Some(Pushed::Closed) => break,
                    // A release announcement (grants went to their waiters in `on_push`).
                    Some(Pushed::Message { channel, payload }) => {
                        if let Some(key) = subs.channels.get(&channel)
                            && heard.as_ref().is_none_or(|heard| heard.is_news(key, &payload))
                        {
                            hub.notify(key);
                        }
                    }
                },
                Ok(()) = moved.changed() => break,
                _ = ping.tick() => {
                    // A silent peer (paused server, black-holed network) never closes the
                    // stream: a ping that goes unanswered makes us reconnect. One at a time.
                    if !pinging {
                        pinging = true;
                        subs.ping().await;
                    }
                }
            }
        }
        if connected_at.elapsed() >= LISTEN_HEALTHY {
            // Only a connection that stayed up a while resets the backoff.
            delay = LISTEN_MIN_DELAY;
        }
        tracing::debug!("redis pub/sub connection lost; reconnecting");
    }
}

/// `client` as the listener connects: with `TCP_NODELAY`, and speaking RESP3.
///
/// Nagle: the listener writes one `SUBSCRIBE` after another without waiting for answers;
/// with Nagle's algorithm the kernel holds each small write back until the one before is
/// acknowledged, so every batch after the first cost a whole round trip more (measured: 300
/// waiters on a 4 ms link, the second batch confirmed at 2 round trips instead of 1).
///
/// RESP3: its messages come to a callback that runs in the connection's own task
/// ([`on_push`]), so a grant reaches its waiter without passing through the listener's task
/// first (a RESP2 pub/sub connection hands each message to the listener's stream: one task
/// wake-up more, measured 10–40 µs of a local hand-off's 250 µs). RESP3 needs Redis 6 or
/// later.
fn for_listener(client: redis::Client) -> redis::Client {
    let info = client.get_connection_info().clone();
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    let redis = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    redis::Client::open(info.set_tcp_settings(tcp).set_redis_settings(redis)).unwrap_or(client)
}

/// What the listener's connection passes on to the listener's task.
enum Pushed {
    /// A message that is not a grant: a release announcement on `channel`.
    Message { channel: String, payload: Vec<u8> },
    /// The connection closed.
    Closed,
}

/// Runs in the listener connection's task for each push from the server: a grant goes
/// straight to the waiter it names (it frees nothing), other messages and the connection's
/// end to the listener. Subscription confirmations are answered through the requests.
fn on_push(
    grants: &crate::queue::Grants,
    listener: &mpsc::UnboundedSender<Pushed>,
    push: redis::PushInfo,
) {
    match push.kind {
        redis::PushKind::Message => {
            let mut data = push.data.into_iter();
            let (Some(redis::Value::BulkString(channel)), Some(redis::Value::BulkString(payload))) =
                (data.next(), data.next())
            else {
                return;
            };
            if grants.deliver(&payload) {
                return;
            }
            if let Ok(channel) = String::from_utf8(channel) {
                let _ = listener.send(Pushed::Message { channel, payload });
            }
        }
        redis::PushKind::Disconnection => {
            let _ = listener.send(Pushed::Closed);
        }
        _ => {}
    }
}

/// Where a key's subscription stands on the listener's current connection.
enum Sub {
    /// Its `SUBSCRIBE` went out in batch `batch`; `acks` are the waiters that await its
    /// confirmation (the first, and any that came meanwhile).
    Pending {
        batch: u64,
        acks: Vec<oneshot::Sender<()>>,
    },
    /// The server confirmed it: a new waiter of the key is answered without a round trip.
    Confirmed,
}

/// The outcome of a request on the pub/sub connection (`ok`: answered in time, no error).
enum Done {
    Subscribed {
        batch: u64,
        keys: Vec<String>,
        ok: bool,
    },
    Unsubscribed {
        ok: bool,
    },
    Pong {
        ok: bool,
    },
}

type Requests = futures::stream::FuturesUnordered<futures::future::BoxFuture<'static, Done>>;

/// At most this many commands are taken from the queue before the listener reads messages
/// again (so also at most this many channels in one `SUBSCRIBE`).
const COMMAND_BATCH: usize = 1024;

/// The subscriptions of one pub/sub connection, and its requests in flight.
struct Subscriptions {
    /// Every key subscribed (or being subscribed) on this connection.
    state: HashMap<String, Sub>,
    /// Channel name to key, for the messages.
    channels: HashMap<String, String>,
    /// Sent and not yet answered, each bounded by `limit`.
    requests: Requests,
    /// Keys taken from the queue whose `SUBSCRIBE` is not sent yet (batch `batch_id`).
    batch: Vec<String>,
    batch_id: u64,
    /// The listener's connection (RESP3: requests and pushed messages share it).
    sink: redis::aio::MultiplexedConnection,
    scheme: KeyScheme,
    limit: Duration,
    /// The keys in `state` that are `Confirmed`, for waiters to read.
    confirmed: ConfirmedKeys,
}

impl Subscriptions {
    /// One command from the queue. A new key joins the batch being gathered.
    async fn take(&mut self, command: Command, hub: &ReleaseHub) {
        match command {
            Command::Subscribe(key, ack) => match self.state.get_mut(&key) {
                // Confirmed on this connection: no round trip needed.
                Some(Sub::Confirmed) => {
                    let _ = ack.send(());
                }
                // Its SUBSCRIBE is on the way: confirmed with it.
                Some(Sub::Pending { acks, .. }) => acks.push(ack),
                None => {
                    // Mapped now: a message can only follow the confirmation, but the
                    // listener may see the confirmation second.
                    self.channels.insert(self.scheme.channel(&key), key.clone());
                    let pending = Sub::Pending {
                        batch: self.batch_id,
                        acks: vec![ack],
                    };
                    self.state.insert(key.clone(), pending);
                    self.batch.push(key);
                }
            },
            Command::Unsubscribe(key) => {
                // A new waiter may have come between the hook and now: keep it. A key not
                // subscribed on this connection has nothing to undo.
                if self
                    .confirmed
                    .take_out_then_check(&key, |key| hub.has_waiters(key))
                {
                    if matches!(self.state.get(&key), Some(Sub::Confirmed)) {
                        self.confirmed.insert(&key);
                    }
                    return;
                }
                if self.state.remove(&key).is_none() {
                    return;
                }
                // The SUBSCRIBEs gathered so far go first: the server must see a key's
                // SUBSCRIBE and UNSUBSCRIBE in the order they were asked for.
                self.send_batch().await;
                let channel = self.scheme.channel(&key);
                self.channels.remove(&channel);
                let mut sink = self.sink.clone();
                let request = async move { sink.unsubscribe(channel).await };
                start(&mut self.requests, request, self.limit, |ok| {
                    Done::Unsubscribed { ok }
                })
                .await;
            }
        }
    }

    /// Sends one `SUBSCRIBE` for the keys gathered (if any).
    async fn send_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let keys = std::mem::take(&mut self.batch);
        let names: Vec<String> = keys.iter().map(|key| self.scheme.channel(key)).collect();
        let batch = self.batch_id;
        self.batch_id += 1;
        let mut sink = self.sink.clone();
        let request = async move { sink.subscribe(names).await };
        start(&mut self.requests, request, self.limit, move |ok| {
            Done::Subscribed { batch, keys, ok }
        })
        .await;
    }

    /// The server confirmed batch `batch`: answer its waiters.
    fn confirmed(&mut self, batch: u64, keys: Vec<String>) {
        for key in keys {
            // Only if no UNSUBSCRIBE (and new SUBSCRIBE) of the key came after this one.
            let Some(sub) = self.state.get_mut(&key) else {
                continue;
            };
            if !matches!(sub, Sub::Pending { batch: sent, .. } if *sent == batch) {
                continue;
            }
            self.confirmed.insert(&key);
            if let Sub::Pending { acks, .. } = std::mem::replace(sub, Sub::Confirmed) {
                for ack in acks {
                    let _ = ack.send(());
                }
            }
        }
    }

    /// Sends a `PING`; its answer comes back as [`Done::Pong`].
    async fn ping(&mut self) {
        let mut sink = self.sink.clone();
        let request = async move {
            redis::cmd("PING")
                .query_async::<redis::Value>(&mut sink)
                .await
        };
        start(&mut self.requests, request, self.limit, |ok| Done::Pong {
            ok,
        })
        .await;
    }
}

/// Sends `request` now and adds its outcome, bounded by `limit`, to `requests`.
///
/// The connection queues a command for the wire when its future is first polled:
/// polling it here, once, rather than whenever the set gets to it, keeps the commands on the
/// wire in the order the listener made them (a key's `UNSUBSCRIBE` must not overtake its
/// `SUBSCRIBE`). The answers are then awaited concurrently with everything else (the sink
/// matches them to requests in order).
async fn start<T, F>(
    requests: &mut Requests,
    request: F,
    limit: Duration,
    done: impl FnOnce(bool) -> Done + Send + 'static,
) where
    F: std::future::Future<Output = redis::RedisResult<T>> + Send + 'static,
{
    let mut request = Box::pin(request);
    let first = futures::poll!(request.as_mut()).map(|answer| answer.is_ok());
    requests.push(Box::pin(async move {
        let ok = match first {
            std::task::Poll::Ready(ok) => ok,
            std::task::Poll::Pending => matches!(timeout(limit, request).await, Ok(Ok(_))),
        };
        done(ok)
    }));
}

/// Backoff of the pub/sub listener's reconnects, and how long a connection must have stayed
/// up for the next reconnect to start from the smallest step again.
const LISTEN_MIN_DELAY: Duration = Duration::from_millis(10);
const LISTEN_MAX_DELAY: Duration = Duration::from_secs(1);
const LISTEN_HEALTHY: Duration = Duration::from_secs(5);

/// The owner token as 32 lowercase hex digits (what `Display` prints), without the
/// formatting machinery: it is built on every call.
pub(crate) fn token_hex(owner: lock_core::OwnerToken) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let value = owner.as_u128();
    let mut text = String::with_capacity(32);
    for nibble in (0..32).rev() {
        text.push(char::from(DIGITS[((value >> (nibble * 4)) & 0xf) as usize]));
    }
    text
}

/// A TTL in whole milliseconds, rounded up (the server then holds at least as long as the
/// lease says), and at least 1.
pub(crate) fn ttl_millis(ttl: Duration) -> u64 {
    let millis = ttl.as_nanos().div_ceil(1_000_000);
    u64::try_from(millis).unwrap_or(u64::MAX).max(1)
}

/// Shared state of a backend: its nodes, the release hub and the shutdown signal of the
/// background listeners (cancelled when the backend is dropped).
#[derive(Debug)]
pub(crate) struct Nodes {
    pub(crate) nodes: Vec<Node>,
    pub(crate) hub: ReleaseHub,
    /// The grants this backend's queued waiters expect (fed by the listeners).
    pub(crate) grants: crate::queue::Grants,
    pub(crate) scheme: KeyScheme,
    shutdown: CancellationToken,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Nodes {
    /// Connects every node, each bounded by the connect timeout. With `min_connected` below
    /// the node count (Redlock), returns as soon as that many answered: the others (failed,
    /// or still connecting, e.g. a paused server) get connections that connect on first use,
    /// so one silent node does not cost every new backend the whole connect timeout.
    pub(crate) async fn connect(
        urls: &[String],
        options: &crate::RedisOptions,
        min_connected: usize,
    ) -> Result<Arc<Nodes>, LockError> {
        let db = match urls.first() {
            Some(url) => redis::Client::open(url.as_str())
                .map_err(|error| {
                    let url = lock_core::redact_url(url);
                    LockError::InvalidConfig(format!("redis URL {url:?}: {error}"))
                })?
                .get_connection_info()
                .redis_settings()
                .db(),
            None => return Err(LockError::InvalidConfig("no redis node given".into())),
        };
        let scheme = KeyScheme::new(options.prefix.clone(), db)?;
        let prepared = urls
            .iter()
            .map(|url| Prepared::new(url, options))
            .collect::<Result<Vec<_>, _>>()?;
        let must_answer = min_connected >= urls.len();
        let mut conns: Vec<Option<ConnectionManager>> = vec![None; urls.len()];
        let mut failures = Vec::new();
        let mut not_retryable = None;
        let mut connected = 0;
        {
            let mut pending: futures::stream::FuturesUnordered<_> =
                prepared
                    .iter()
                    .enumerate()
                    .map(|(index, node)| async move {
                        (index, node.connect(options.connect_timeout).await)
                    })
                    .collect();
            while let Some((index, result)) = pending.next().await {
                match result {
                    Ok(conn) => {
                        // Redlock nodes are looked at before their first vote (with their
                        // run_id), also those that connect later.
                        if let Some(node) = prepared.get(index).filter(|_| urls.len() == 1) {
                            warn_if_locks_may_be_evicted(conn.clone(), node.addr.clone());
                        }
                        connected += 1;
                        if let Some(slot) = conns.get_mut(index) {
                            *slot = Some(conn);
                        }
                    }
                    // A refusal (credentials, certificates) is not an outage: say so at once.
                    Err(error) if must_answer || error.is_refused() => return Err(error),
                    Err(error) => {
                        failures.push(error.to_string());
                        // A configuration the nodes reject (a database number out of their
                        // range) is not an outage either: when it leaves too few nodes, it is
                        // the error, not a retryable "only 0 of N nodes answered".
                        if !error.is_retryable() {
                            not_retryable.get_or_insert(error);
                        }
                    }
                }
                if connected >= min_connected || failures.len() > urls.len() - min_connected {
                    break;
                }
            }
        }
        if connected < min_connected {
            if let Some(error) = not_retryable {
                return Err(error);
            }
            return Err(LockError::backend_msg(
                "redis",
                format!(
                    "only {connected} of {} redis nodes answered (need {min_connected}): {}",
                    urls.len(),
                    failures.join("; ")
                ),
                true,
            ));
        }
        // One command channel per node; the senders also go to the hub's idle hook.
        let channels: Vec<_> = urls.iter().map(|_| listener_channel()).collect();
        let heard = (urls.len() > 1).then(Arc::default);
        let hub = idle_hook(
            channels.iter().map(|(link, _)| link.clone()).collect(),
            heard.clone(),
        );
        let shutdown = CancellationToken::new();
        // Until `Nodes` owns the token: a connect dropped at the check below (a caller's
        // timeout) ends the listeners already started instead of leaving them for good.
        let stop_if_dropped = shutdown.clone().drop_guard();
        let grants = crate::queue::Grants::default();
        let distinct = (urls.len() > 1).then(|| Arc::new(DistinctServers::default()));
        let connected_now: Vec<bool> = conns.iter().map(Option::is_some).collect();
        let mut nodes = Vec::with_capacity(urls.len());
        for ((prepared, conn), channel) in prepared.into_iter().zip(conns).zip(channels) {
            let conn = match conn {
                Some(conn) => conn,
                None => match prepared.lazy() {
                    Ok(conn) => conn,
                    Err(error) => return Err(error),
                },
            };
            let mut node = Node::start(
                prepared,
                conn,
                scheme.clone(),
                Feeds {
                    hub: hub.clone(),
                    grants: grants.clone(),
                    heard: heard.clone(),
                },
                channel,
                options,
                shutdown.clone(),
            );
            // Redlock: the fence is the quorum's largest counter (see `NEXT_FENCE`).
            node.clock_fences = urls.len() == 1;
            if let Some(servers) = &distinct {
                node.distinct = Some((servers.clone(), std::sync::OnceLock::new()));
            }
            nodes.push(node);
        }
        // The nodes that answered are checked now: a server listed twice is a configuration
        // error at connect. A node connected later is checked before its first vote.
        if distinct.is_some() {
            let checks = nodes
                .iter()
                .zip(&connected_now)
                .filter(|(_, connected)| **connected)
                .map(|(node, _)| node.check_distinct());
            for checked in futures::future::join_all(checks).await {
                if let Err(error) = checked
                    && error.kind() == redis::ErrorKind::InvalidClientConfig
                {
                    return Err(LockError::InvalidConfig(
                        error
                            .detail()
                            .unwrap_or("repeated redlock server")
                            .to_owned(),
                    ));
                }
            }
        }
        stop_if_dropped.disarm();
        Ok(Arc::new(Nodes {
            nodes,
            hub,
            grants,
            scheme,
            shutdown,
        }))
    }

    /// One node whose server was found elsewhere: the master a set of sentinels named,
    /// followed across failovers by `follow`.
    pub(crate) fn followed(
        server: Server,
        follow: Arc<crate::sentinel::Follower>,
        scheme: KeyScheme,
        options: &crate::RedisOptions,
    ) -> Arc<Nodes> {
        let Server {
            client,
            config,
            manager,
            addr,
        } = server;
        let conn = Arc::new(Conn::server(
            client,
            config,
            manager,
            options.command_timeout,
            Some(follow.clone()),
        ));
        // A failover a sentinel announces moves the node at once, not at its next failure.
        let weak = Arc::downgrade(&conn);
        follow.on_switch(move || {
            if let Some(conn) = weak.upgrade() {
                conn.follow_master(None);
            }
        });
        Self::of_one(conn, addr, scheme, options)
    }

    /// One node that is a whole Redis Cluster: `connection` routes each script to the owner
    /// of its keys' slot; the listener subscribes through one of `seeds` at a time.
    pub(crate) fn cluster(
        connection: redis::cluster_async::ClusterConnection,
        seeds: Vec<redis::Client>,
        scheme: KeyScheme,
        options: &crate::RedisOptions,
    ) -> Arc<Nodes> {
        let addr = seeds
            .iter()
            .map(|seed| seed.get_connection_info().addr().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let conn = Conn {
            current: Mutex::new((0, Link::Cluster(connection))),
            clients: Mutex::new(seeds),
            config: ConnectionManagerConfig::new(),
            command_timeout: options.command_timeout,
            probing: AtomicBool::new(false),
            follow: None,
            moved: tokio::sync::watch::Sender::new(0),
        };
        Self::of_one(Arc::new(conn), addr, scheme, options)
    }

    fn of_one(
        conn: Arc<Conn>,
        addr: String,
        scheme: KeyScheme,
        options: &crate::RedisOptions,
    ) -> Arc<Nodes> {
        let channel = listener_channel();
        let hub = idle_hook(vec![channel.0.clone()], None);
        let shutdown = CancellationToken::new();
        let grants = crate::queue::Grants::default();
        let node = Node::spawn(
            conn,
            addr,
            scheme.clone(),
            Feeds {
                hub: hub.clone(),
                grants: grants.clone(),
                heard: None,
            },
            channel,
            options,
            shutdown.clone(),
        );
        Arc::new(Nodes {
            nodes: vec![node],
            hub,
            grants,
            scheme,
            shutdown,
        })
    }

    /// Subscribes `key` on every node; returns once `needed` nodes confirmed (or are not
    /// connected, see [`Node::subscribe`]), or after `wait`. The other subscriptions go on in
    /// the listeners.
    pub(crate) async fn subscribe(&self, key: &str, needed: usize, wait: Duration) {
        // The common case in a busy loop: confirmed already on every node, nothing to ask.
        // (Not when only `needed` nodes are: the others must still be asked, or a node that
        // unsubscribed the key would stay unsubscribed while it stays busy.)
        if self
            .nodes
            .iter()
            .all(|node| node.listener.confirmed.contains(key))
        {
            return;
        }
        let mut pending: futures::stream::FuturesUnordered<_> =
            self.nodes.iter().map(|node| node.subscribe(key)).collect();
        let _ = timeout(wait, async {
            let mut done = 0;
            while pending.next().await.is_some() {
                done += 1;
                if done >= needed {
                    break;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::ConfirmedKeys;

    /// A server of its own and a connection to it, to run a script on directly.
    pub(crate) async fn script_server() -> (
        lock_harness::redis::RedisServer,
        redis::aio::MultiplexedConnection,
    ) {
        let server = lock_harness::redis::RedisServer::start().unwrap();
        let conn = server
            .client()
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        (server, conn)
    }

    #[test]
    fn an_evicting_server_is_recognised() {
        let info = |maxmemory: &str, policy: &str| {
            format!(
                "# Memory\r\nused_memory:1000\r\nmaxmemory:{maxmemory}\r\nmaxmemory_policy:{policy}\r\n"
            )
        };
        assert_eq!(super::eviction_policy(&info("0", "noeviction")), None);
        assert_eq!(super::eviction_policy(&info("0", "allkeys-lru")), None);
        assert_eq!(
            super::eviction_policy(&info("100000000", "noeviction")),
            None
        );
        assert_eq!(
            super::eviction_policy(&info("100000000", "volatile-lru")).as_deref(),
            Some("volatile-lru")
        );
        assert_eq!(super::eviction_policy("garbage"), None);
    }

    /// Finding (review, 2026-12-03): an acquire re-sent on a new connection (the Cluster
    /// client re-sends a call whose connection dropped) found itself holding and wrote
    /// nothing, so the `WAIT` pipelined after it was counted against a connection that had
    /// written nothing and answered at once: `wait_replicas` took the lock as replicated while
    /// the replica (here paused) had none of it. The re-sent run writes the fence counter
    /// again, so `WAIT` counts only replicas that have the first run's writes.
    #[tokio::test]
    async fn a_resent_acquire_is_confirmed_only_by_replicas_that_have_it() {
        let set = lock_harness::redis_sentinel::SentinelSet::builder()
            .start()
            .await
            .unwrap();
        let master = set.node_client(0).unwrap();
        let mut first = master.get_multiplexed_async_connection().await.unwrap();
        let wait = |conn: &mut redis::aio::MultiplexedConnection| {
            let mut conn = conn.clone();
            async move {
                let reached: u32 = redis::cmd("WAIT")
                    .arg(1)
                    .arg(300)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                reached
            }
        };
        // Loads the script and shows the replica acknowledges while it runs.
        let _: redis::Value = super::ACQUIRE
            .key("w:warm")
            .key("w:fence")
            .arg("token0")
            .arg(30_000)
            .arg("0")
            .invoke_async(&mut first)
            .await
            .unwrap();
        assert_eq!(wait(&mut first).await, 1, "the replica never acknowledged");
        set.pause_node(1).unwrap();
        let _: redis::Value = redis::cmd("EVALSHA")
            .arg(super::ACQUIRE.get_hash())
            .arg(2)
            .arg(&["r:lock", "r:fence"])
            .arg(("token1", 30_000, "0"))
            .query_async(&mut first)
            .await
            .unwrap();
        // The same call again, on a new connection, with its WAIT.
        let mut resent = master.get_multiplexed_async_connection().await.unwrap();
        let mut pipeline = redis::pipe();
        pipeline.add_command(super::evalsha(
            &super::ACQUIRE,
            &["r:lock", "r:fence"],
            ("token1", 30_000, "0"),
        ));
        pipeline.cmd("WAIT").arg(1).arg(300);
        let (fence, reached): (i64, u32) = pipeline.query_async(&mut resent).await.unwrap();
        set.resume_node(1).unwrap();
        assert!(fence > 0, "the re-sent acquire did not answer acquired");
        assert_eq!(
            reached, 0,
            "WAIT counted a paused replica for a re-sent acquire it never received"
        );
    }

    /// The lock's acquire script run twice with the same token (a re-sent call) answers
    /// "acquired" both times; before, the second run found itself holding and answered
    /// "held", and the caller left the lock to its TTL.
    #[tokio::test]
    async fn the_acquire_script_sent_twice_holds_once() {
        let (_server, mut conn) = script_server().await;
        for (run, mark) in [(0, "0"), (1, "1")] {
            let answer: redis::Value = super::ACQUIRE
                .key("l:lock")
                .key("l:fence")
                .arg("token1")
                .arg(30_000)
                .arg(mark)
                .invoke_async(&mut conn)
                .await
                .unwrap();
            assert!(
                matches!(answer, redis::Value::Int(_)),
                "run {run}: {answer:?}"
            );
        }
        let value: String = redis::cmd("GET")
            .arg("l:lock")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(value, "token1", "the holder marked itself");
    }

    /// A fence counter that went back (here: set back by hand, as a restart without
    /// persistence or a failover to a lagging replica does) still gives a fence above the
    /// last one with clock fences; without (Redlock) the script is a plain `INCR`.
    #[tokio::test]
    async fn fences_stay_above_a_counter_that_went_back() {
        let (_server, mut conn) = script_server().await;
        async fn acquire(
            conn: &mut redis::aio::MultiplexedConnection,
            key: &str,
            clocked: &str,
        ) -> redis::RedisResult<i64> {
            super::ACQUIRE
                .key(key)
                .key("f:fence")
                .arg("token1")
                .arg(30_000)
                .arg("0")
                .arg(clocked)
                .invoke_async(conn)
                .await
        }
        async fn set_counter(conn: &mut redis::aio::MultiplexedConnection, value: &str) {
            let _: () = redis::cmd("SET")
                .arg("f:fence")
                .arg(value)
                .query_async(conn)
                .await
                .unwrap();
        }
        let first = acquire(&mut conn, "a:lock", "1").await.unwrap();
        let second = acquire(&mut conn, "b:lock", "1").await.unwrap();
        assert!(second > first, "{first} then {second}");
        set_counter(&mut conn, "3").await;
        let third = acquire(&mut conn, "c:lock", "1").await.unwrap();
        assert!(
            third > second,
            "after the counter went back: {second} then {third}"
        );
        set_counter(&mut conn, "3").await;
        let plain = acquire(&mut conn, "d:lock", "0").await.unwrap();
        assert_eq!(plain, 4, "without clock fences: INCR");
        set_counter(&mut conn, "x").await;
        let refused = acquire(&mut conn, "e:lock", "1").await;
        let error = refused.expect_err("a counter that holds no number");
        assert!(error.to_string().contains("holds x"), "{error}");
    }

    /// The order that keeps a key found in the set subscribed: out of the set first, then
    /// the look at the hub (a waiter joins the hub, then reads the set).
    #[test]
    fn a_key_leaves_the_confirmed_set_before_its_waiters_are_counted() {
        let confirmed = ConfirmedKeys::default();
        confirmed.insert("k");
        let mut looked = false;
        let waited = confirmed.take_out_then_check("k", |key| {
            looked = true;
            // A waiter reading the set now must not find the key.
            !confirmed.contains(key)
        });
        assert!(
            looked && waited,
            "the key was still in the set when the hub was asked"
        );
        assert!(!confirmed.contains("k"));
    }

    #[test]
    fn token_hex_matches_display() {
        for _ in 0..100 {
            let owner = lock_core::OwnerToken::random();
            assert_eq!(super::token_hex(owner), owner.to_string());
        }
        let zero = lock_core::OwnerToken::from_u128(0xab);
        assert_eq!(super::token_hex(zero), zero.to_string());
    }
}
