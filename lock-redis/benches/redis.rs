//! `cargo bench -p lock-redis`: distlock on one local redis-server (started here through
//! `lock_harness`) beside the raw-protocol floor measured in the same run, and the `rslock`
//! crate as a peer.
//!
//! - uncontended acquire+release, one task, fresh key each time;
//! - 64 tasks on distinct keys over one backend / one multiplexed connection;
//! - 8 tasks on one key (acquire, release, again), beside a raw redis-rs loop that retries a
//!   refused `SET NX PX` after 10 ms;
//! - hand-off: a holder keeps the lock 5 ms while a waiter is blocked in `acquire`; time from
//!   the holder's release call to the waiter's acquisition, beside the server's own queue: a
//!   waiter blocked in `BLPOP` and a holder that releases with `LPUSH`.

use anyhow::{Context, Result};
use lock_core::{LockBackend, LockKey, Locker};
use lock_harness::redis::RedisServer;
use lock_redis::RedisBackend;
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(10);
const UNCONTENDED_ROUNDS: usize = 20;
const UNCONTENDED_OPS: usize = 500;
const PARALLEL_TASKS: usize = 64;
// Clients take turns in short slices, so a change in machine load hits all of them alike.
const PARALLEL_SLICES: usize = 24;
const PARALLEL_SLICE: Duration = Duration::from_millis(300);
const HANDOFFS: usize = 600;
const CONTENDED_TASKS: usize = 8;
const CONTENDED_SLICES: usize = 10;
const CONTENDED_SLICE: Duration = Duration::from_millis(500);
/// The raw contended loop's retry after a refused `SET NX PX`.
const RAW_RETRY: Duration = Duration::from_millis(10);
const RSLOCK_HANDOFFS: usize = 500;

/// The raw floor: `SET NX PX`, then compare-and-delete, on a redis-rs connection.
struct Raw {
    conn: ConnectionManager,
    cad: redis::Script,
    /// `SET NX PX`, then `INCR` of a fence counter: a raw lock with a fencing token.
    fenced: redis::Script,
}

impl Raw {
    async fn new(url: &str) -> Result<Self> {
        let conn = ConnectionManager::new(redis::Client::open(url)?).await?;
        let cad = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        let fenced = redis::Script::new(
            "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then \
               return redis.call('INCR', KEYS[2]) end return 0",
        );
        Ok(Raw { conn, cad, fenced })
    }

    /// One turn of the contended loop: take `key` (`SET NX PX`, or with a fencing token from
    /// `fence` when given), sleeping [`RAW_RETRY`] after each refusal, then compare-and-delete.
    async fn take_in_turn(&self, key: &str, fence: Option<&str>) -> Result<()> {
        let token = lock_core::OwnerToken::random().to_string();
        let mut conn = self.conn.clone();
        loop {
            let taken = match fence {
                None => redis::cmd("SET")
                    .arg(key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(10_000)
                    .query_async::<Option<String>>(&mut conn)
                    .await?
                    .is_some(),
                Some(fence) => {
                    self.fenced
                        .key(key)
                        .key(fence)
                        .arg(&token)
                        .arg(10_000)
                        .invoke_async::<i64>(&mut conn)
                        .await?
                        > 0
                }
            };
            if taken {
                break;
            }
            tokio::time::sleep(RAW_RETRY).await;
        }
        let deleted: i64 = self
            .cad
            .key(key)
            .arg(&token)
            .invoke_async(&mut conn)
            .await?;
        anyhow::ensure!(deleted == 1, "raw ({key}): release refused");
        Ok(())
    }

    async fn acquire_release(&self, key: &str, token: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(10_000)
            .query_async(&mut conn)
            .await?;
        anyhow::ensure!(set.is_some(), "raw: key {key} was held");
        let deleted: i64 = self.cad.key(key).arg(token).invoke_async(&mut conn).await?;
        anyhow::ensure!(deleted == 1, "raw: release refused");
        Ok(())
    }
}

/// The raw floor of a semaphore: a sorted set of holders scored by expiry (server time),
/// admitted while fewer than the limit are live, and `ZREM` to release; no fence, no limit
/// agreement, no waiter mark, no key expiry.
struct RawSemaphore {
    conn: ConnectionManager,
    acquire: redis::Script,
    release: redis::Script,
}

impl RawSemaphore {
    async fn new(url: &str) -> Result<Self> {
        let conn = ConnectionManager::new(redis::Client::open(url)?).await?;
        let acquire = redis::Script::new(
            r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  return 1
end
return 0
",
        );
        let release = redis::Script::new("return redis.call('ZREM', KEYS[1], ARGV[1])");
        Ok(RawSemaphore {
            conn,
            acquire,
            release,
        })
    }

    async fn acquire_release(&self, key: &str, token: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        let admitted: i64 = self
            .acquire
            .key(key)
            .arg(token)
            .arg(2)
            .arg(10_000)
            .invoke_async(&mut conn)
            .await?;
        anyhow::ensure!(admitted == 1, "raw semaphore: {key} was full");
        let removed: i64 = self
            .release
            .key(key)
            .arg(token)
            .invoke_async(&mut conn)
            .await?;
        anyhow::ensure!(removed == 1, "raw semaphore: release refused");
        Ok(())
    }
}

struct Stats {
    p50: Duration,
    p99: Duration,
    ops_per_sec: f64,
}

fn stats(mut samples: Vec<Duration>, wall: Duration) -> Stats {
    samples.sort_unstable();
    let pick = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(index).copied().unwrap_or_default()
    };
    Stats {
        p50: pick(0.5),
        p99: pick(0.99),
        ops_per_sec: samples.len() as f64 / wall.as_secs_f64(),
    }
}

fn us(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

#[derive(Default)]
struct Series {
    samples: Vec<Duration>,
    wall: Duration,
}

impl Series {
    async fn run<F, Fut>(&mut self, ops: usize, mut op: F) -> Result<()>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let start = Instant::now();
        for i in 0..ops {
            let before = Instant::now();
            op(i).await?;
            self.samples.push(before.elapsed());
        }
        self.wall += start.elapsed();
        Ok(())
    }

    fn stats(self) -> Stats {
        stats(self.samples, self.wall)
    }
}

fn key(prefix: &str, round: usize, i: usize) -> String {
    format!("bench:{prefix}:{round}:{i}")
}

async fn uncontended(url: &str) -> Result<Vec<(&'static str, Stats)>> {
    let backend: Arc<dyn LockBackend> = Arc::new(RedisBackend::connect(url).await?);
    let locker = Locker::from_arc(backend.clone());
    let raw = Raw::new(url).await?;
    let rslock = rslock::LockManager::new(vec![url.to_owned()]);
    let (mut s_locker, mut s_trait, mut s_raw, mut s_rslock) = (
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
    );
    // Warm up every client (connections, script cache), then interleave rounds so drift in
    // machine load hits all of them alike.
    for round in 0..=UNCONTENDED_ROUNDS {
        let ops = if round == 0 { 300 } else { UNCONTENDED_OPS };
        let mut warm = Series::default();
        let (a, b, c, d): (&mut Series, &mut Series, &mut Series, &mut Series) = if round == 0 {
            (
                &mut warm,
                &mut Series::default(),
                &mut Series::default(),
                &mut Series::default(),
            )
        } else {
            (&mut s_locker, &mut s_trait, &mut s_raw, &mut s_rslock)
        };
        a.run(ops, |i| {
            let locker = locker.clone();
            async move {
                let guard = locker
                    .lock(key("locker", round, i))
                    .ttl(TTL)
                    .try_acquire()
                    .await?
                    .context("held")?;
                guard.release().await?;
                Ok(())
            }
        })
        .await?;
        b.run(ops, |i| {
            let backend = backend.clone();
            async move {
                let key = LockKey::new(key("trait", round, i))?;
                let lease = backend
                    .try_acquire(&key, TTL)
                    .await?
                    .into_lease()
                    .context("held")?;
                backend.release(&lease).await?;
                Ok(())
            }
        })
        .await?;
        c.run(ops, |i| {
            let raw = &raw;
            async move {
                let token = lock_core::OwnerToken::random().to_string();
                raw.acquire_release(&key("raw", round, i), &token).await
            }
        })
        .await?;
        d.run(ops, |i| {
            let rslock = &rslock;
            async move {
                let lock = rslock
                    .lock(key("rslock", round, i).as_str(), TTL)
                    .await
                    .map_err(|error| anyhow::anyhow!("rslock: {error:?}"))?;
                rslock.unlock(&lock).await;
                Ok(())
            }
        })
        .await?;
    }
    Ok(vec![
        ("distlock Locker (guard + watchdog entry)", s_locker.stats()),
        ("distlock RedisBackend (trait calls)", s_trait.stats()),
        ("raw floor: SET NX PX + CAD script", s_raw.stats()),
        ("rslock 0.10 (1 node)", s_rslock.stats()),
    ])
}

/// Uncontended semaphore (1 of 2 permits) acquire+release, fresh name each time: `Locker`,
/// trait calls, the raw sorted-set floor, and the raw lock floor again for reference, in
/// interleaved rounds.
async fn uncontended_semaphore(url: &str) -> Result<Vec<(&'static str, Stats)>> {
    let backend: Arc<dyn LockBackend> = Arc::new(RedisBackend::connect(url).await?);
    let locker = Locker::from_arc(backend.clone());
    let raw = RawSemaphore::new(url).await?;
    let raw_lock = Raw::new(url).await?;
    let mut series: Vec<Series> = (0..4).map(|_| Series::default()).collect();
    for round in 0..=UNCONTENDED_ROUNDS {
        let ops = if round == 0 { 300 } else { UNCONTENDED_OPS };
        let mut warm: Vec<Series> = (0..4).map(|_| Series::default()).collect();
        let target = if round == 0 { &mut warm } else { &mut series };
        let [a, b, c, d] = target.as_mut_slice() else {
            anyhow::bail!("four series expected");
        };
        a.run(ops, |i| {
            let locker = locker.clone();
            async move {
                let permit = locker
                    .semaphore(key("sem-locker", round, i), 2)
                    .ttl(TTL)
                    .try_acquire()
                    .await?
                    .context("full")?;
                permit.release().await?;
                Ok(())
            }
        })
        .await?;
        b.run(ops, |i| {
            let backend = backend.clone();
            async move {
                let key = LockKey::new(key("sem-trait", round, i))?;
                let lease = backend
                    .try_acquire_permits(&key, 2, 1, TTL)
                    .await?
                    .into_lease()
                    .context("full")?;
                backend.release(&lease).await?;
                Ok(())
            }
        })
        .await?;
        c.run(ops, |i| {
            let raw = &raw;
            async move {
                let token = lock_core::OwnerToken::random().to_string();
                raw.acquire_release(&key("sem-raw", round, i), &token).await
            }
        })
        .await?;
        d.run(ops, |i| {
            let raw_lock = &raw_lock;
            async move {
                let token = lock_core::OwnerToken::random().to_string();
                raw_lock
                    .acquire_release(&key("sem-rawlock", round, i), &token)
                    .await
            }
        })
        .await?;
    }
    let mut series = series.into_iter();
    let mut next = || {
        series.next().map(Series::stats).unwrap_or(Stats {
            p50: Duration::ZERO,
            p99: Duration::ZERO,
            ops_per_sec: 0.0,
        })
    };
    Ok(vec![
        (
            "distlock semaphore, Locker (guard + watchdog entry)",
            next(),
        ),
        ("distlock semaphore, RedisBackend (trait calls)", next()),
        ("raw floor: sorted-set admit script + ZREM script", next()),
        ("raw lock floor (SET NX PX + CAD script), same run", next()),
    ])
}

/// Runs `op(task, i)` in `tasks` tasks for `length`; returns completed ops/s.
async fn rate<F, Fut>(tasks: usize, length: Duration, op: Arc<F>) -> Result<f64>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut running = Vec::new();
    for task in 0..tasks {
        let (op, stop, done) = (op.clone(), stop.clone(), done.clone());
        running.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                op(task, i).await?;
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(length).await;
    let counted = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in running {
        task.await??;
    }
    Ok(counted as f64 / elapsed.as_secs_f64())
}

/// Runs `op` in [`PARALLEL_TASKS`] tasks for one slice; returns ops/s.
async fn parallel<F, Fut>(op: Arc<F>, slice: usize) -> Result<f64>
where
    F: Fn(usize, usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(move |task, i| op(slice, task, i));
    rate(PARALLEL_TASKS, PARALLEL_SLICE, op).await
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn parallel_all(
    url: &str,
) -> Result<(Vec<(&'static str, f64)>, Vec<(&'static str, Vec<f64>)>)> {
    let locker = Locker::new(RedisBackend::connect(url).await?);
    let locker_op = Arc::new(move |slice: usize, task: usize, i: u64| {
        let locker = locker.clone();
        async move {
            let guard = locker
                .lock(format!("bench:par:{slice}:{task}:{i}"))
                .ttl(TTL)
                .try_acquire()
                .await?
                .context("held")?;
            guard.release().await?;
            Ok(())
        }
    });
    let backend: Arc<dyn LockBackend> = Arc::new(RedisBackend::connect(url).await?);
    let trait_op = Arc::new(move |slice: usize, task: usize, i: u64| {
        let backend = backend.clone();
        async move {
            let key = LockKey::new(format!("bench:part:{slice}:{task}:{i}"))?;
            let lease = backend
                .try_acquire(&key, TTL)
                .await?
                .into_lease()
                .context("held")?;
            backend.release(&lease).await?;
            Ok(())
        }
    });
    let raw = Arc::new(Raw::new(url).await?);
    let raw_op = Arc::new(move |slice: usize, task: usize, i: u64| {
        let raw = raw.clone();
        async move {
            let token = lock_core::OwnerToken::random().to_string();
            raw.acquire_release(&format!("bench:parr:{slice}:{task}:{i}"), &token)
                .await
        }
    });
    let (mut locker_rates, mut trait_rates, mut raw_rates) = (Vec::new(), Vec::new(), Vec::new());
    let (mut locker_ratios, mut trait_ratios) = (Vec::new(), Vec::new());
    // Slice 0 warms up.
    for slice in 0..=PARALLEL_SLICES {
        // The order rotates, so that no client always runs first or last in a slice.
        let (mut raw_rate, mut locker_rate, mut trait_rate) = (0.0, 0.0, 0.0);
        for turn in 0..3 {
            match (slice + turn) % 3 {
                0 => raw_rate = parallel(raw_op.clone(), slice).await?,
                1 => locker_rate = parallel(locker_op.clone(), slice).await?,
                _ => trait_rate = parallel(trait_op.clone(), slice).await?,
            }
        }
        if slice > 0 {
            raw_rates.push(raw_rate);
            locker_rates.push(locker_rate);
            trait_rates.push(trait_rate);
            locker_ratios.push(locker_rate / raw_rate);
            trait_ratios.push(trait_rate / raw_rate);
        }
    }
    Ok((
        vec![
            (
                "distlock Locker, 64 tasks, one backend",
                median(locker_rates),
            ),
            ("distlock RedisBackend, 64 tasks", median(trait_rates)),
            (
                "raw floor, 64 tasks, one multiplexed connection",
                median(raw_rates),
            ),
        ],
        vec![
            ("distlock Locker", locker_ratios),
            ("distlock RedisBackend", trait_ratios),
        ],
    ))
}

/// Runs `op` in [`CONTENDED_TASKS`] tasks for one slice; returns completed ops/s.
async fn contended<F, Fut>(op: Arc<F>) -> Result<f64>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    rate(CONTENDED_TASKS, CONTENDED_SLICE, Arc::new(move |_, _| op())).await
}

/// The contended section's medians (ops/s) and per-slice ratios against the raw loop.
struct Contended {
    ours: f64,
    raw: f64,
    fenced: f64,
    ratios: Vec<f64>,
    fenced_ratios: Vec<f64>,
}

/// 8 tasks on one key: distlock `acquire` (blocking wait) + release, against a raw redis-rs
/// loop (`SET NX PX`, on refusal sleep 10 ms and retry; compare-and-delete), and the same
/// loop with a fencing token (one script: `SET NX PX`, then `INCR` of a counter), in
/// interleaved slices (the order rotates).
async fn contended_all(url: &str) -> Result<Contended> {
    let locker = Locker::new(RedisBackend::connect(url).await?);
    let locker_op = Arc::new(move || {
        let locker = locker.clone();
        async move {
            let guard = locker
                .lock("bench:contended")
                .ttl(TTL)
                .wait(Duration::from_secs(10))
                .acquire()
                .await?;
            guard.release().await?;
            Ok(())
        }
    });
    let raw = Arc::new(Raw::new(url).await?);
    let raw_op = Arc::new(move || {
        let raw = raw.clone();
        async move { raw.take_in_turn("bench:contended-raw", None).await }
    });
    let fenced = Arc::new(Raw::new(url).await?);
    let fenced_op = Arc::new(move || {
        let fenced = fenced.clone();
        async move {
            fenced
                .take_in_turn(
                    "bench:contended-fenced",
                    Some("bench:contended-fenced:fence"),
                )
                .await
        }
    });
    let mut rates: [Vec<f64>; 3] = Default::default();
    let (mut ratios, mut fenced_ratios) = (Vec::new(), Vec::new());
    // Slice 0 warms up; the order rotates.
    for slice in 0..=CONTENDED_SLICES {
        let mut got = [0.0; 3];
        for turn in 0..3 {
            let client = (slice + turn) % 3;
            got[client] = match client {
                0 => contended(locker_op.clone()).await?,
                1 => contended(raw_op.clone()).await?,
                _ => contended(fenced_op.clone()).await?,
            };
        }
        if slice > 0 {
            for (rate, all) in got.iter().zip(rates.iter_mut()) {
                all.push(*rate);
            }
            ratios.push(got[0] / got[1]);
            fenced_ratios.push(got[2] / got[1]);
        }
    }
    let [ours, raw, fenced] = rates;
    Ok(Contended {
        ours: median(ours),
        raw: median(raw),
        fenced: median(fenced),
        ratios,
        fenced_ratios,
    })
}

/// The server's own queue, with blocking redis-rs clients on their own threads (no async
/// runtime in the path): a holder thread that, per request, lets a waiter thread block in
/// `BLPOP`, keeps the "lock" 5 ms, releases with `LPUSH` and reports the time from the
/// `LPUSH` call to the `BLPOP` answer.
struct ThreadQueue {
    ask: std::sync::mpsc::Sender<()>,
    samples: std::sync::mpsc::Receiver<Result<Duration>>,
}

impl ThreadQueue {
    fn start(url: &str) -> Result<Self> {
        let client = redis::Client::open(url)?;
        let list = "bench:handoff-blpop-sync";
        let (go, went) = std::sync::mpsc::channel::<()>();
        let (popped_at, pops) = std::sync::mpsc::channel::<Result<std::time::Instant>>();
        let mut conn = client.get_connection()?;
        std::thread::spawn(move || {
            while went.recv().is_ok() {
                let popped: redis::RedisResult<Option<(String, String)>> =
                    redis::cmd("BLPOP").arg(list).arg(10).query(&mut conn);
                let at = std::time::Instant::now();
                let outcome = match popped {
                    Ok(Some(_)) => Ok(at),
                    Ok(None) => Err(anyhow::anyhow!("BLPOP timed out")),
                    Err(error) => Err(error.into()),
                };
                if popped_at.send(outcome).is_err() {
                    return;
                }
            }
        });
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let (sample, samples) = std::sync::mpsc::channel();
        let mut holder = client.get_connection()?;
        std::thread::spawn(move || {
            while asked.recv().is_ok() {
                let one = (|| -> Result<Duration> {
                    go.send(())?;
                    std::thread::sleep(Duration::from_millis(5));
                    let released_at = std::time::Instant::now();
                    let _: i64 = redis::cmd("LPUSH")
                        .arg(list)
                        .arg("token")
                        .query(&mut holder)?;
                    let acquired_at = pops.recv()??;
                    Ok(acquired_at.saturating_duration_since(released_at))
                })();
                if sample.send(one).is_err() {
                    return;
                }
            }
        });
        Ok(ThreadQueue { ask, samples })
    }

    fn one(&self) -> Result<Duration> {
        tokio::task::block_in_place(|| {
            self.ask.send(())?;
            self.samples.recv()?
        })
    }
}

/// Hand-offs, one of each client in turn, so that machine noise hits all alike: distlock
/// (the holder keeps the lock 5 ms while another backend's waiter is blocked in `acquire`;
/// release call → acquisition), the server's own queue with the async redis-rs client
/// (`BLPOP` waiter on its own connection, `LPUSH` release), and with blocking clients on
/// threads.
async fn handoffs(url: &str) -> Result<(Stats, Stats, Stats)> {
    let holder = Locker::new(RedisBackend::connect(url).await?);
    let waiter = Locker::new(RedisBackend::connect(url).await?);
    let name = "bench:handoff";
    let client = redis::Client::open(url)?;
    let mut pusher = client.get_multiplexed_async_connection().await?;
    let list = "bench:handoff-blpop";
    let threads = ThreadQueue::start(url)?;
    let (mut ours, mut queue, mut queue_threads) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    for round in 0..HANDOFFS * 3 {
        match round % 3 {
            0 => {
                let guard = holder.lock(name).ttl(TTL).acquire().await?;
                let waiting = {
                    let waiter = waiter.clone();
                    tokio::spawn(async move {
                        let guard = waiter
                            .lock(name)
                            .ttl(TTL)
                            .wait(Duration::from_secs(10))
                            .acquire()
                            .await?;
                        let at = Instant::now();
                        guard.release().await?;
                        anyhow::Ok(at)
                    })
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
                let released_at = Instant::now();
                guard.release().await?;
                let acquired_at = waiting.await??;
                ours.push(acquired_at.saturating_duration_since(released_at));
            }
            1 => {
                // A dedicated connection, as a blocked BLPOP holds its connection.
                let mut conn = client.get_multiplexed_async_connection().await?;
                let waiting = tokio::spawn(async move {
                    let popped: Option<(String, String)> = redis::cmd("BLPOP")
                        .arg(list)
                        .arg(10)
                        .query_async(&mut conn)
                        .await?;
                    let at = Instant::now();
                    popped.context("BLPOP timed out")?;
                    anyhow::Ok(at)
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
                let released_at = Instant::now();
                let _: i64 = redis::cmd("LPUSH")
                    .arg(list)
                    .arg("token")
                    .query_async(&mut pusher)
                    .await?;
                let acquired_at = waiting.await??;
                queue.push(acquired_at.saturating_duration_since(released_at));
            }
            _ => queue_threads.push(threads.one()?),
        }
    }
    let wall = start.elapsed();
    Ok((
        stats(ours, wall),
        stats(queue, wall),
        stats(queue_threads, wall),
    ))
}

async fn handoff_rslock(url: &str) -> Result<Stats> {
    let holder = rslock::LockManager::new(vec![url.to_owned()]);
    let waiter = rslock::LockManager::new(vec![url.to_owned()]);
    let name = "bench:handoff-rslock";
    let mut samples = Vec::with_capacity(RSLOCK_HANDOFFS);
    let start = Instant::now();
    for _ in 0..RSLOCK_HANDOFFS {
        let lock = holder
            .lock(name, TTL)
            .await
            .map_err(|error| anyhow::anyhow!("rslock: {error:?}"))?;
        let waiting = {
            let waiter = waiter.clone();
            tokio::spawn(async move {
                let guard = waiter
                    .acquire(name, TTL)
                    .await
                    .map_err(|error| anyhow::anyhow!("rslock: {error:?}"))?;
                let at = Instant::now();
                guard.release().await;
                anyhow::Ok(at)
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let released_at = Instant::now();
        holder.unlock(&lock).await;
        let acquired_at = waiting.await??;
        samples.push(acquired_at.saturating_duration_since(released_at));
    }
    Ok(stats(samples, start.elapsed()))
}

/// Prints an uncontended table under `title`, then each distlock row's p50 over the floor's:
/// `floor` is (the floor row's name prefix, its name in the ratio lines, a note after them).
fn print_uncontended(title: &str, rows: &[(&str, Stats)], floor: (&str, &str, &str)) {
    let (prefix, floor_name, note) = floor;
    println!("{title}");
    println!("| client | p50 | p99 | ops/s |");
    println!("|---|---:|---:|---:|");
    for (name, s) in rows {
        println!(
            "| {name} | {} | {} | {:.0} |",
            us(s.p50),
            us(s.p99),
            s.ops_per_sec
        );
    }
    let floor = rows
        .iter()
        .find(|(name, _)| name.starts_with(prefix))
        .map(|(_, s)| s.p50)
        .unwrap_or_default();
    for (name, s) in rows.iter().filter(|(name, _)| name.starts_with("distlock")) {
        println!(
            "p50 ratio {name} / {floor_name}: {:.2}{note}",
            s.p50.as_secs_f64() / floor.as_secs_f64()
        );
    }
    println!();
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else to parse. `LOCK_REDIS_BENCH` picks
    // sections (comma-separated: uncontended, semaphore, parallel, contended, handoff).
    let only = std::env::var("LOCK_REDIS_BENCH").ok();
    let wants = |section: &str| {
        only.as_deref()
            .is_none_or(|only| only.split(',').any(|wanted| wanted.trim() == section))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = RedisServer::start()?;
    let url = server.url();
    runtime.block_on(async {
        println!("lock-redis benchmark: one local redis-server ({url}), tokio 2 workers");
        println!();
        if wants("uncontended") {
            let uncontended = uncontended(&url).await?;
            print_uncontended(
                &format!(
                    "uncontended acquire+release, one task, fresh key each time ({} ops each)",
                    UNCONTENDED_ROUNDS * UNCONTENDED_OPS
                ),
                &uncontended,
                ("raw", "raw floor", " (bar ≤ 1.15)"),
            );
        }
        if wants("semaphore") {
            let semaphore = uncontended_semaphore(&url).await?;
            print_uncontended(
                &format!(
                    "uncontended semaphore acquire+release (1 of 2 permits), one task, fresh name each time ({} ops each)",
                    UNCONTENDED_ROUNDS * UNCONTENDED_OPS
                ),
                &semaphore,
                ("raw floor", "raw semaphore floor", ""),
            );
        }
        if wants("parallel") {
            let (parallel, ratios) = parallel_all(&url).await?;
            println!(
                "{PARALLEL_TASKS} tasks on distinct keys, acquire+release: median of {PARALLEL_SLICES} interleaved {:?} slices per client",
                PARALLEL_SLICE
            );
            println!("| client | ops/s |");
            println!("|---|---:|");
            for (name, ops) in &parallel {
                println!("| {name} | {ops:.0} |");
            }
            for (name, slices) in &ratios {
                let low = slices.iter().copied().fold(f64::INFINITY, f64::min);
                let high = slices.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                println!(
                    "throughput ratio {name} / raw floor (median of per-slice ratios): {:.2} (bar ≥ 0.70; slices {low:.2}–{high:.2})",
                    median(slices.clone())
                );
            }
            println!();
        }
        if wants("contended") {
            let Contended {
                ours: ours_rate,
                raw: raw_rate,
                fenced: fenced_rate,
                ratios,
                fenced_ratios,
            } = contended_all(&url).await?;
            println!(
                "{CONTENDED_TASKS} tasks on one key, acquire (waiting) + release: median of {CONTENDED_SLICES} interleaved {CONTENDED_SLICE:?} slices per client"
            );
            println!("| client | ops/s |");
            println!("|---|---:|");
            println!("| distlock Locker, blocking acquire | {ours_rate:.0} |");
            println!(
                "| raw floor: redis-rs SET NX PX, retry after {RAW_RETRY:?} | {raw_rate:.0} |"
            );
            println!(
                "| raw fenced: one script SET NX PX + INCR fence, retry after {RAW_RETRY:?} | {fenced_rate:.0} |"
            );
            let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let high = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            println!(
                "contended ratio distlock / raw floor (median of per-slice ratios): {:.2} (bar ≥ 0.90; slices {low:.2}–{high:.2})",
                median(ratios.clone())
            );
            println!(
                "raw fenced / raw floor (median of per-slice ratios): {:.2}: what a fencing token alone costs",
                median(fenced_ratios.clone())
            );
            println!();
        }
        if wants("handoff") {
            let (ours, floor, floor_threads) = handoffs(&url).await?;
            let theirs = handoff_rslock(&url).await?;
            println!(
                "hand-off: holder keeps the lock 5 ms, waiter blocked in acquire; release → acquisition; the first three rows interleaved"
            );
            println!("| client | hand-offs | median | p99 |");
            println!("|---|---:|---:|---:|");
            println!(
                "| distlock (fair queue: the release hands over, pub/sub grant) | {HANDOFFS} | {} | {} |",
                ms(ours.p50),
                ms(ours.p99)
            );
            println!(
                "| server queue floor (BLPOP waiter, LPUSH release) | {HANDOFFS} | {} | {} |",
                ms(floor.p50),
                ms(floor.p99)
            );
            println!(
                "| server queue floor, blocking clients on threads | {HANDOFFS} | {} | {} |",
                ms(floor_threads.p50),
                ms(floor_threads.p99)
            );
            println!(
                "| rslock 0.10 (default retry: 3 × random 0–200 ms) | {RSLOCK_HANDOFFS} | {} | {} |",
                ms(theirs.p50),
                ms(theirs.p99)
            );
            println!(
                "hand-off median ratio distlock / server queue floor: {:.2} against the async client, {:.2} against blocking clients (bar ≤ 1.5; earlier bar: median ≤ 1 ms)",
                ours.p50.as_secs_f64() / floor.p50.as_secs_f64(),
                ours.p50.as_secs_f64() / floor_threads.p50.as_secs_f64()
            );
        }
        anyhow::Ok(())
    })?;
    drop(server);
    Ok(())
}
