//! Semaphores and reader-writer locks on one Redis server: the scripts and their calls.
//!
//! Holders of shared kinds live in sorted sets scored by their expiry in the server's own
//! milliseconds (`TIME` inside the script, the same clock that expires keys), so one script
//! can drop the expired ones, count the rest and admit or refuse atomically. Every key of a
//! name carries the name's hash tag, so the scripts stay in one cluster slot together with the
//! slot's fence counter (see [`crate::KeyScheme`]).
//!
//! Wake-ups follow the lock's waiter mark: a refused attempt made while its backend has
//! waiters for the name sets a mark, and a release publishes on the name's channel only when
//! it finds (and clears) the mark. Clearing is safe: every waiter woken by that publish tries
//! again, and one that is refused again sets the mark again.

use crate::KeyScheme;
use crate::node::{NEXT_FENCE, Node, backend_error};
use lock_core::{LeaseKind, LockError, LockKey, RwMode};
use std::sync::LazyLock;
use std::time::Duration;

/// The script's view of the server clock, in milliseconds.
const NOW: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
";

/// Semaphore acquire. KEYS: holders (zset of `<count>:<token>` scored by expiry), meta (hash:
/// `limit`, `used`, `mark`), fence counter. ARGV: token, ttl ms, limit, count, mark (`1`: the
/// caller has waiters). Expired holders are dropped first; with none left the limit is free
/// to change. Answers the fence, `{'held', ms until the soonest holder expires}` or
/// `{'limit', limit the permits are held with}`. Both keys expire with their longest holder,
/// so an abandoned semaphore leaves nothing behind.
static SEM_ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{NOW}{NEXT_FENCE}
local ttl = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local count = tonumber(ARGV[4])
local used = 0
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
if redis.call('ZSCORE', KEYS[1], ARGV[4] .. ':' .. ARGV[1]) then
  -- This very attempt ran before (re-sent after its connection dropped, as the Cluster
  -- client does): it holds its permits; counting them again would lose them for good. A
  -- fresh fence: the counter now may be the fence of a holder admitted since.
  return next_fence(KEYS[3], clock)
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
else
  local meta = redis.call('HMGET', KEYS[2], 'limit', 'used')
  local held = tonumber(meta[1])
  if meta[2] then
    used = tonumber(meta[2])
    for _, member in ipairs(expired) do
      used = used - tonumber(string.match(member, '^(%d+):'))
    end
    if #expired > 0 then
      -- Written back on every path: the expired holders are gone from the set now, so
      -- a refusal below (another limit) must not leave their permits counted for good.
      redis.call('HSET', KEYS[2], 'used', used)
    end
  end
  if held and held ~= limit then
    return {{'limit', held}}
  end
  if not meta[2] then
    -- No counter (should not happen): count the live holders.
    for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
      used = used + tonumber(string.match(member, '^(%d+):'))
    end
  end
  if used + count > limit then
    redis.call('HSET', KEYS[2], 'limit', limit, 'used', used)
    if ARGV[5] == '1' then
      redis.call('HSET', KEYS[2], 'mark', '1')
    end
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {{'held', tonumber(first[2]) - now}}
  end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4] .. ':' .. ARGV[1])
redis.call('HSET', KEYS[2], 'limit', limit, 'used', used + count)
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return next_fence(KEYS[3], clock)
"
    ))
});

/// Renew one live holder of a sorted set (semaphore holder or reader). KEYS: holders, and a
/// second key that expires with them (the semaphore's meta; the readers set again for a
/// reader). ARGV: member, ttl ms. An expired member is not revived.
static ZSET_RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{NOW}
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) <= now then
  return 0
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 1
"
    ))
});

/// Semaphore release. KEYS: holders, meta. ARGV: member, count, db. Removes only this
/// member; publishes on the name's channel (`<base>:rel:<db>`, the holders key without `sem`)
/// when a waiter marked the semaphore. Answers 1 when the permits were still live.
static SEM_RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{NOW}
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
local mark
if redis.call('EXISTS', KEYS[1]) == 0 then
  mark = redis.call('HGET', KEYS[2], 'mark')
  redis.call('DEL', KEYS[2])
else
  local meta = redis.call('HMGET', KEYS[2], 'used', 'mark')
  if meta[1] then
    redis.call('HINCRBY', KEYS[2], 'used', -tonumber(ARGV[2]))
  end
  mark = meta[2]
  if mark then
    redis.call('HDEL', KEYS[2], 'mark')
  end
end
if mark then
  redis.pcall('PUBLISH', string.sub(KEYS[1], 1, -4) .. 'rel:' .. ARGV[3], '1')
end
if tonumber(score) > now then
  return 1
end
return 0
"
    ))
});

/// The refusal of an rwlock attempt (shared by both sides): the soonest holder expiry (or
/// the intent's, when only the intent keeps a reader out), and the waiter mark, set to live
/// as long as the longest holder or intent. KEYS as in the acquire scripts.
const RW_REFUSED: &str = r"
local function refused(now, writer, mark)
  local soonest = -1
  local latest = 0
  if writer >= 0 then
    soonest = writer
    latest = writer
  end
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[2] then
    local left = tonumber(first[2]) - now
    if soonest < 0 or left < soonest then
      soonest = left
    end
    local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    local longest = tonumber(last[2]) - now
    if longest > latest then
      latest = longest
    end
  end
  local intent = redis.call('PTTL', KEYS[3])
  if intent > latest then
    latest = intent
  end
  if soonest < 0 and intent > 0 then
    soonest = intent
  end
  if mark == '1' and latest > 0 then
    redis.call('SET', KEYS[4], '1', 'PX', latest)
  end
  return {'held', soonest}
end
";

/// Reader acquire. KEYS: readers (zset of tokens scored by expiry), writer (token, `PX`),
/// writer intent (`PX`), waiter mark, fence counter. ARGV: token, ttl ms, mark, `1` when
/// fences follow the server clock too ([`NEXT_FENCE`]). Refused while a writer holds or a
/// refused writer's intent lives.
static RW_READ_ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{NOW}{NEXT_FENCE}{RW_REFUSED}
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local writer = redis.call('PTTL', KEYS[2])
if writer ~= -2 or redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    -- This very attempt ran before (re-sent) and holds a share; a writer refused since
    -- then set its intent. Refusing now would leave that share to nobody for its TTL.
    -- A fresh fence: the counter now may be the fence of a reader admitted since.
    return next_fence(KEYS[5], ARGV[4] == '1' and clock or nil)
  end
  return refused(now, writer, ARGV[3])
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return next_fence(KEYS[5], ARGV[4] == '1' and clock or nil)
"
    ))
});

/// Writer acquire. KEYS as for a reader. ARGV: token, ttl ms, mark, intent ms, clock fences.
/// Refused while
/// a writer or a live reader holds; a refused writer sets the intent, which keeps new readers
/// out; the writer that gets in clears it.
static RW_WRITE_ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{NOW}{NEXT_FENCE}{RW_REFUSED}
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local writer = redis.call('PTTL', KEYS[2])
if writer ~= -2 or redis.call('EXISTS', KEYS[1]) == 1 then
  if writer ~= -2 and redis.call('GET', KEYS[2]) == ARGV[1] then
    -- This very attempt ran before (re-sent): it is the writer.
    return resent_fence(KEYS[5])
  end
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
  return refused(now, writer, ARGV[3])
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[3])
return next_fence(KEYS[5], ARGV[5] == '1' and clock or nil)
"
    ))
});

/// Reader release. KEYS: readers, waiter mark. ARGV: token, db. Answers 1 when the share was
/// still live.
static RW_READ_RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{NOW}
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('DEL', KEYS[2]) == 1 then
  redis.pcall('PUBLISH', string.sub(KEYS[1], 1, -5) .. 'rel:' .. ARGV[2], '1')
end
if tonumber(score) > now then
  return 1
end
return 0
"
    ))
});

/// Writer release. KEYS: readers, writer, waiter mark. ARGV: token, db.
static RW_WRITE_RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2])
if redis.call('DEL', KEYS[3]) == 1 then
  redis.pcall('PUBLISH', string.sub(KEYS[1], 1, -5) .. 'rel:' .. ARGV[2], '1')
end
return 1
",
    )
});

/// Redlock: while our reader share is still live on this node, raise the slot's fence counter
/// to at least ARGV[2] (the largest fence our quorum returned). KEYS: readers, fence counter.
/// ARGV: token, fence. Answers 1 if still held. (A writer holds its key as a lock holds its
/// own, so the lock's fence script serves it.)
static RW_RAISE_READER_FENCE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{NOW}
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) <= now then
  return 0
end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local wanted = tonumber(ARGV[2])
if current == nil or current < wanted then
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
"
    ))
});

/// A node's answer to a semaphore or rwlock acquire.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SharedAcquire {
    /// Admitted; the fence counter's new value.
    Acquired(u64),
    /// Refused; the soonest holder expiry when there is one.
    Held(Option<Duration>),
    /// A semaphore held with this other limit.
    LimitMismatch(u32),
}

/// The sorted-set member of a semaphore holder: its count travels in the member, so a release
/// knows how many permits it returns without another key.
pub(crate) fn permit_member(count: u32, token: &str) -> String {
    format!("{count}:{token}")
}

/// What a lease (or an acquire whose answer never came) holds on a node, with its Redis
/// keys: a lock, permits, or one side of a reader-writer lock. The one place renew and
/// release (of both backends, and the clean-up) pick the scripts for a lease's kind.
#[derive(Debug)]
pub(crate) enum Target {
    /// A lock's keys ([`KeyScheme::lock_keys`]).
    Lock([String; 4]),
    /// A semaphore's keys and the permits held.
    Permits([String; 3], u32),
    /// A reader-writer lock's keys and the side held.
    Rw([String; 5], RwMode),
}

impl Target {
    /// The target of a lease of `kind` on `key`.
    pub(crate) fn of(scheme: &KeyScheme, key: &LockKey, kind: LeaseKind) -> Self {
        match kind {
            LeaseKind::Permits { count, .. } => Target::Permits(scheme.semaphore_keys(key), count),
            LeaseKind::Read => Target::Rw(scheme.rw_keys(key), RwMode::Read),
            LeaseKind::Write => Target::Rw(scheme.rw_keys(key), RwMode::Write),
            _ => Target::Lock(scheme.lock_keys(key)),
        }
    }

    /// Renews `token`'s hold on `node`; false when it is gone or expired.
    pub(crate) async fn renew(
        &self,
        node: &Node,
        token: &str,
        ttl_ms: u64,
    ) -> Result<bool, LockError> {
        match self {
            Target::Lock(keys) => node.renew(&keys[0], token, ttl_ms).await,
            Target::Permits(keys, count) => {
                node.renew_permits(keys, &permit_member(*count, token), ttl_ms)
                    .await
            }
            Target::Rw(keys, mode) => node.renew_rw(keys, *mode, token, ttl_ms).await,
        }
    }

    /// Releases `token`'s hold on `node`; true when it was still held.
    pub(crate) async fn release(&self, node: &Node, token: &str) -> Result<bool, LockError> {
        match self {
            Target::Lock(keys) => node.release(keys, token).await,
            Target::Permits(keys, count) => {
                node.release_permits(keys, &permit_member(*count, token), *count)
                    .await
            }
            Target::Rw(keys, mode) => node.release_rw(keys, *mode, token).await,
        }
    }
}

/// `answer`, once a grant in it is confirmed replicated (`wait_replicas`).
fn granted(
    answer: SharedAcquire,
    replicated: &crate::node::Replicated,
    context: &str,
) -> Result<SharedAcquire, LockError> {
    if matches!(answer, SharedAcquire::Acquired(_)) {
        replicated.confirm(context)?;
    }
    Ok(answer)
}

fn parse_acquire(answer: redis::Value) -> Result<SharedAcquire, LockError> {
    let unexpected = |answer: &redis::Value| {
        LockError::backend_msg(
            "redis",
            format!("unexpected answer to a shared acquire script: {answer:?}"),
            false,
        )
    };
    match answer {
        redis::Value::Int(fence) => u64::try_from(fence)
            .map(SharedAcquire::Acquired)
            .map_err(|_| unexpected(&answer)),
        redis::Value::Array(ref items) => match items.as_slice() {
            [what, redis::Value::Int(number)] => {
                let what =
                    redis::from_redis_value_ref::<String>(what).map_err(|_| unexpected(&answer))?;
                match what.as_str() {
                    "held" => Ok(SharedAcquire::Held(
                        u64::try_from(*number).ok().map(Duration::from_millis),
                    )),
                    "limit" => u32::try_from(*number)
                        .map(SharedAcquire::LimitMismatch)
                        .map_err(|_| unexpected(&answer)),
                    _ => Err(unexpected(&answer)),
                }
            }
            _ => Err(unexpected(&answer)),
        },
        other => Err(unexpected(&other)),
    }
}

impl Node {
    /// One semaphore attempt (see [`SEM_ACQUIRE`]).
    pub(crate) async fn acquire_permits(
        &self,
        keys: &[String; 3],
        token: &str,
        ttl_ms: u64,
        limit: u32,
        count: u32,
        mark: bool,
    ) -> Result<SharedAcquire, LockError> {
        let [holders, meta, fence] = keys;
        let (answer, replicated): (redis::Value, _) = self
            .eval_write(
                "semaphore acquire",
                &SEM_ACQUIRE,
                &[holders, meta, fence],
                (token, ttl_ms, limit, count, u8::from(mark)),
            )
            .await?;
        granted(parse_acquire(answer)?, &replicated, "semaphore acquire")
    }

    /// Renews one live member of a holders set (see [`ZSET_RENEW`]), `companion` expiring
    /// with it; false when it is gone or expired.
    async fn renew_member(
        &self,
        holders: &str,
        companion: &str,
        member: &str,
        ttl_ms: u64,
    ) -> Result<bool, LockError> {
        let (renewed, replicated): (i64, _) = self
            .eval_write(
                "shared renew",
                &ZSET_RENEW,
                &[holders, companion],
                (member, ttl_ms),
            )
            .await?;
        if renewed == 1 {
            replicated.confirm("shared renew")?;
        }
        Ok(renewed == 1)
    }

    /// Renews a semaphore holder; false when it is gone or expired.
    pub(crate) async fn renew_permits(
        &self,
        keys: &[String; 3],
        member: &str,
        ttl_ms: u64,
    ) -> Result<bool, LockError> {
        self.renew_member(&keys[0], &keys[1], member, ttl_ms).await
    }

    /// Returns a semaphore holder's permits; true when they were still live.
    pub(crate) async fn release_permits(
        &self,
        keys: &[String; 3],
        member: &str,
        count: u32,
    ) -> Result<bool, LockError> {
        let released: i64 = self
            .eval(
                &SEM_RELEASE,
                &[&keys[0], &keys[1]],
                (member, count, self.db()),
            )
            .await
            .map_err(|error| backend_error("semaphore release", error))?;
        Ok(released == 1)
    }

    /// One reader or writer attempt.
    pub(crate) async fn acquire_rw(
        &self,
        keys: &[String; 5],
        mode: RwMode,
        token: &str,
        ttl_ms: u64,
        mark: bool,
    ) -> Result<SharedAcquire, LockError> {
        let keys = keys.each_ref().map(String::as_str);
        let mark = u8::from(mark);
        let (answer, replicated): (redis::Value, _) = match mode {
            RwMode::Read => {
                self.eval_write(
                    "rwlock acquire",
                    &RW_READ_ACQUIRE,
                    &keys,
                    (token, ttl_ms, mark, u8::from(self.clock_fences)),
                )
                .await?
            }
            RwMode::Write => {
                let intent = crate::node::ttl_millis(lock_core::WRITER_INTENT);
                self.eval_write(
                    "rwlock acquire",
                    &RW_WRITE_ACQUIRE,
                    &keys,
                    (token, ttl_ms, mark, intent, u8::from(self.clock_fences)),
                )
                .await?
            }
        };
        granted(parse_acquire(answer)?, &replicated, "rwlock acquire")
    }

    /// Redlock's fence round for a reader (see [`RW_RAISE_READER_FENCE`]) or the writer.
    pub(crate) async fn raise_rw_fence(
        &self,
        keys: &[String; 5],
        mode: RwMode,
        token: &str,
        fence: u64,
    ) -> Result<bool, LockError> {
        match mode {
            RwMode::Read => {
                let held: i64 = self
                    .eval(
                        &RW_RAISE_READER_FENCE,
                        &[&keys[0], &keys[4]],
                        (token, fence),
                    )
                    .await
                    .map_err(|error| backend_error("rwlock raise fence", error))?;
                Ok(held == 1)
            }
            // The writer key holds our bare token, as a lock key does.
            RwMode::Write => self.raise_fence(&keys[1], &keys[4], token, fence).await,
        }
    }

    /// Renews a reader or the writer; false when it is gone or expired.
    pub(crate) async fn renew_rw(
        &self,
        keys: &[String; 5],
        mode: RwMode,
        token: &str,
        ttl_ms: u64,
    ) -> Result<bool, LockError> {
        match mode {
            RwMode::Read => self.renew_member(&keys[0], &keys[0], token, ttl_ms).await,
            // The writer key holds our bare token, as a lock key does: the lock's renew.
            RwMode::Write => self.renew(&keys[1], token, ttl_ms).await,
        }
    }

    /// Releases a reader or the writer; true when it was still held.
    pub(crate) async fn release_rw(
        &self,
        keys: &[String; 5],
        mode: RwMode,
        token: &str,
    ) -> Result<bool, LockError> {
        let released: i64 = match mode {
            RwMode::Read => {
                self.eval(&RW_READ_RELEASE, &[&keys[0], &keys[3]], (token, self.db()))
                    .await
            }
            RwMode::Write => {
                self.eval(
                    &RW_WRITE_RELEASE,
                    &[&keys[0], &keys[1], &keys[3]],
                    (token, self.db()),
                )
                .await
            }
        }
        .map_err(|error| backend_error("rwlock release", error))?;
        Ok(released == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::{RW_READ_ACQUIRE, RW_WRITE_ACQUIRE, SEM_ACQUIRE};

    /// An acquire script run twice with the same token (the Cluster client re-sends a call
    /// whose connection dropped after sending) answers "acquired" both times and counts the
    /// permits once; before, the second run counted them again (lost for good) or, for a
    /// writer, found itself holding and answered "held" (the lock stuck for its TTL).
    #[tokio::test]
    async fn acquire_scripts_sent_twice_hold_once() {
        let (_server, mut conn) = crate::node::tests::script_server().await;
        let sem = |conn: &mut redis::aio::MultiplexedConnection| {
            let mut conn = conn.clone();
            async move {
                SEM_ACQUIRE
                    .key("s:holders")
                    .key("s:meta")
                    .key("s:fence")
                    .arg("token1")
                    .arg(30_000)
                    .arg(5)
                    .arg(3)
                    .arg("0")
                    .invoke_async::<redis::Value>(&mut conn)
                    .await
                    .unwrap()
            }
        };
        for run in 0..2 {
            let answer = sem(&mut conn).await;
            assert!(
                matches!(answer, redis::Value::Int(_)),
                "run {run}: {answer:?}"
            );
        }
        let used: i64 = redis::cmd("HGET")
            .arg("s:meta")
            .arg("used")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(used, 3, "the permits were counted twice");
        let write = |conn: &mut redis::aio::MultiplexedConnection| {
            let mut conn = conn.clone();
            async move {
                RW_WRITE_ACQUIRE
                    .key("w:readers")
                    .key("w:writer")
                    .key("w:intent")
                    .key("w:mark")
                    .key("w:fence")
                    .arg("token2")
                    .arg(30_000)
                    .arg("0")
                    .arg(2_000)
                    .invoke_async::<redis::Value>(&mut conn)
                    .await
                    .unwrap()
            }
        };
        for run in 0..2 {
            let answer = write(&mut conn).await;
            assert!(
                matches!(answer, redis::Value::Int(_)),
                "writer run {run}: {answer:?}"
            );
        }
        let intent: bool = redis::cmd("EXISTS")
            .arg("w:intent")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!intent, "the second run set a writer intent against itself");
        // A reader's attempt re-sent after a writer was refused meanwhile: the writer's
        // intent must not make the reader's first run, which holds a share, answer "held"
        // (nobody would know that share, and it would keep the writer out for its TTL).
        let rw = |conn: &mut redis::aio::MultiplexedConnection,
                  script: &'static redis::Script,
                  token: &'static str,
                  intent_ms: Option<u64>| {
            let mut conn = conn.clone();
            async move {
                let mut call = script.key("r:readers");
                call.key("r:writer")
                    .key("r:intent")
                    .key("r:mark")
                    .key("r:fence")
                    .arg(token)
                    .arg(30_000)
                    .arg("0");
                if let Some(intent_ms) = intent_ms {
                    call.arg(intent_ms);
                }
                call.arg("0")
                    .invoke_async::<redis::Value>(&mut conn)
                    .await
                    .unwrap()
            }
        };
        let first = rw(&mut conn, &RW_READ_ACQUIRE, "reader", None).await;
        assert!(matches!(first, redis::Value::Int(_)), "reader: {first:?}");
        let writer = rw(&mut conn, &RW_WRITE_ACQUIRE, "writer", Some(2_000)).await;
        assert!(
            !matches!(writer, redis::Value::Int(_)),
            "the writer got in beside a reader: {writer:?}"
        );
        let again = rw(&mut conn, &RW_READ_ACQUIRE, "reader", None).await;
        assert!(
            matches!(again, redis::Value::Int(_)),
            "the reader's re-sent attempt was refused while its share stays: {again:?}"
        );
    }

    /// Holders of a semaphore or readers hold at once, and each must have its own fence. A
    /// re-sent attempt answered with the counter as it stood, which is the fence of whoever
    /// got in after its first run: two holders with one fence. It now takes a fresh fence.
    #[tokio::test]
    async fn a_resent_shared_attempt_gets_a_fence_of_its_own() {
        let (_server, mut conn) = crate::node::tests::script_server().await;
        let fence = |answer: redis::Value| match answer {
            redis::Value::Int(fence) => fence,
            other => panic!("not granted: {other:?}"),
        };
        let permit = |conn: &mut redis::aio::MultiplexedConnection, token: &'static str| {
            let mut conn = conn.clone();
            async move {
                SEM_ACQUIRE
                    .key("f:holders")
                    .key("f:meta")
                    .key("f:fence")
                    .arg(token)
                    .arg(30_000)
                    .arg(5)
                    .arg(1)
                    .arg("0")
                    .invoke_async::<redis::Value>(&mut conn)
                    .await
                    .unwrap()
            }
        };
        let first = fence(permit(&mut conn, "one").await);
        let second = fence(permit(&mut conn, "two").await);
        let resent = fence(permit(&mut conn, "one").await);
        assert!(
            resent > second && second > first,
            "permits: first run {first}, the next holder {second}, the re-sent first {resent}"
        );
        let read = |conn: &mut redis::aio::MultiplexedConnection, token: &'static str| {
            let mut conn = conn.clone();
            async move {
                RW_READ_ACQUIRE
                    .key("g:readers")
                    .key("g:writer")
                    .key("g:intent")
                    .key("g:mark")
                    .key("g:fence")
                    .arg(token)
                    .arg(30_000)
                    .arg("0")
                    .arg("0")
                    .invoke_async::<redis::Value>(&mut conn)
                    .await
                    .unwrap()
            }
        };
        let first = fence(read(&mut conn, "one").await);
        let second = fence(read(&mut conn, "two").await);
        // A writer refused meanwhile: its intent keeps new readers out, not this one.
        let _: () = redis::cmd("SET")
            .arg("g:intent")
            .arg("1")
            .arg("PX")
            .arg(30_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let resent = fence(read(&mut conn, "one").await);
        assert!(
            resent > second && second > first,
            "readers: first run {first}, the next reader {second}, the re-sent first {resent}"
        );
    }
}
