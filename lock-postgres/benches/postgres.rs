//! `cargo bench -p lock-postgres`: distlock on PostgreSQL against the raw-protocol floor,
//! measured in the same run on a server the harness starts (fsync=off).
//!
//! - uncontended: acquire + release of one key, one task (raw floor: one sqlx connection
//!   doing `pg_try_advisory_lock` then `pg_advisory_unlock`);
//! - 16 tasks on distinct keys: throughput (raw: 16 connections doing the same);
//! - hand-off: a holder keeps the lock 5 ms, one waiter is blocked in `acquire`; time from the
//!   release call to the waiter holding the lock (raw: unlock + `pg_notify` on one connection,
//!   the waiter's connection `LISTEN`s and then `pg_try_advisory_lock`s); and the server's own
//!   queue as the floor (#13): the waiter's connection blocks in `pg_advisory_lock`; the
//!   three interleaved round by round in rotating order (since 2026-12-02), also against the
//!   second server on the other CPU;
//! - contended (#13): 8 workers in this process on one key, acquire + release for 5 s, against
//!   pgbench with 8 clients running blocking `pg_advisory_lock` + `pg_advisory_unlock` on the
//!   same server for 5 s (same CPU pinning: pgbench inherits the bench's CPU).

use anyhow::{Context, Result, ensure};
use lock_core::{LockOptions, Locker};
use lock_harness::postgres::PostgresServer;
use lock_postgres::PostgresBackend;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const UNCONTENDED_ROUNDS: usize = 3000;
const PARALLEL_TASKS: usize = 16;
const PARALLEL_ROUNDS: usize = 300;
const HANDOFF_ROUNDS: usize = 200;
const CONTENDED_WORKERS: usize = 8;
const CONTENDED_FOR: Duration = Duration::from_secs(5);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

struct Stats {
    p50: Duration,
    p99: Duration,
    ops: f64,
}

fn stats(mut samples: Vec<Duration>, elapsed: Duration) -> Stats {
    samples.sort();
    Stats {
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        ops: samples.len() as f64 / elapsed.as_secs_f64(),
    }
}

fn us(duration: Duration) -> String {
    format!("{:.0} µs", duration.as_secs_f64() * 1e6)
}

/// distlock as the rows measure it: a `Locker` (auto-renew on, TTL 30 s) over a fresh backend.
async fn locker_at(url: &str) -> Result<Locker> {
    let options = LockOptions {
        ttl: Duration::from_secs(30),
        ..LockOptions::default()
    };
    Ok(Locker::from_arc(Arc::new(PostgresBackend::connect(url).await?)).with_defaults(options))
}

/// A table row: `label`, the floor's and distlock's time, distlock's over the floor's.
fn ratio_row(label: &str, floor: Duration, ours: Duration) -> String {
    format!(
        "| {label} | {} | {} | {:.2}× |",
        us(floor),
        us(ours),
        ours.as_secs_f64() / floor.as_secs_f64().max(1e-9)
    )
}

/// The table row of [`interleaved_uncontended`].
fn interleaved_row(raw: &Stats, ours: &Stats) -> String {
    format!(
        "| uncontended p50, interleaved (20 alternating slices × 150) | {} | {} | {:.2}× |",
        us(raw.p50),
        us(ours.p50),
        ours.p50.as_secs_f64() / raw.p50.as_secs_f64().max(1e-9)
    )
}

async fn raw_conn(url: &str) -> Result<PgConnection> {
    Ok(PgConnectOptions::from_str(url)?.connect().await?)
}

async fn raw_pair(conn: &mut PgConnection, key: i64) -> Result<()> {
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await?;
    ensure!(got, "raw lock not granted");
    let freed: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await?;
    ensure!(freed, "raw unlock failed");
    Ok(())
}

/// 300 warm-up rounds of `$pair` (a future of `Result<()>`, built afresh each round), then
/// [`UNCONTENDED_ROUNDS`] timed ones: `Result<Stats>`. A macro, not a function taking an
/// async closure: such a closure over `&mut` state makes the benchmark future not `Send`.
macro_rules! timed_pairs {
    ($pair:expr) => {{
        for _ in 0..300 {
            $pair.await?;
        }
        let mut samples = Vec::with_capacity(UNCONTENDED_ROUNDS);
        let started = Instant::now();
        for _ in 0..UNCONTENDED_ROUNDS {
            let t = Instant::now();
            $pair.await?;
            samples.push(t.elapsed());
        }
        Ok(stats(samples, started.elapsed()))
    }};
}

async fn raw_uncontended(url: &str) -> Result<Stats> {
    let mut conn = raw_conn(url).await?;
    timed_pairs!(raw_pair(&mut conn, 42))
}

async fn distlock_uncontended(locker: &Locker) -> Result<Stats> {
    timed_pairs!(async {
        let guard = locker.acquire("bench-uncontended").await?;
        ensure!(guard.release().await?, "release answered false");
        anyhow::Ok(())
    })
}

/// Raw floor and distlock alternating in 20 slices of 150 pairs each, so a change in the
/// machine's load hits both alike (the separate runs above swing by ±30 % on a shared VM).
async fn interleaved_uncontended(url: &str, locker: &Locker) -> Result<(Stats, Stats)> {
    const SLICES: usize = 20;
    const PER_SLICE: usize = 150;
    let mut conn = raw_conn(url).await?;
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    let (mut raw_time, mut our_time) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..SLICES {
        let started = Instant::now();
        for _ in 0..PER_SLICE {
            let t = Instant::now();
            raw_pair(&mut conn, 43).await?;
            raw.push(t.elapsed());
        }
        raw_time += started.elapsed();
        let started = Instant::now();
        for _ in 0..PER_SLICE {
            let t = Instant::now();
            let guard = locker.acquire("bench-interleaved").await?;
            ensure!(guard.release().await?, "release answered false");
            ours.push(t.elapsed());
        }
        our_time += started.elapsed();
    }
    Ok((stats(raw, raw_time), stats(ours, our_time)))
}

async fn backend_uncontended(backend: &Arc<dyn lock_core::LockBackend>) -> Result<Stats> {
    let key = lock_core::LockKey::new("bench-direct")?;
    let ttl = Duration::from_secs(30);
    let mut samples = Vec::with_capacity(UNCONTENDED_ROUNDS);
    let mut started = Instant::now();
    for round in 0..UNCONTENDED_ROUNDS + 300 {
        if round == 300 {
            samples.clear();
            started = Instant::now();
        }
        let t = Instant::now();
        let lease = backend
            .try_acquire(&key, ttl)
            .await?
            .into_lease()
            .context("held")?;
        ensure!(backend.release(&lease).await?, "release answered false");
        samples.push(t.elapsed());
    }
    Ok(stats(samples, started.elapsed()))
}

/// distlock's own statements on a raw connection: the server-side part of its cost.
async fn raw_distlock_sql(url: &str) -> Result<Stats> {
    let mut conn = raw_conn(url).await?;
    sqlx::query("CREATE SEQUENCE IF NOT EXISTS public.distlock_fence_seq")
        .execute(&mut conn)
        .await?;
    let fence: sqlx::postgres::types::Oid =
        sqlx::query_scalar("SELECT to_regclass('public.distlock_fence_seq')::oid")
            .fetch_one(&mut conn)
            .await?;
    let mut samples = Vec::with_capacity(UNCONTENDED_ROUNDS);
    let mut started = Instant::now();
    for round in 0..UNCONTENDED_ROUNDS + 300 {
        if round == 300 {
            samples.clear();
            started = Instant::now();
        }
        let t = Instant::now();
        // The statements the backend sends in steady state: the session's
        // idle_session_timeout already fits, so neither statement sets it.
        let row = sqlx::query(
            "SELECT CASE WHEN pg_try_advisory_lock($1) THEN nextval($2::regclass) END, \
             pg_backend_pid()",
        )
        .bind(77_i64)
        .bind(fence)
        .fetch_one(&mut conn)
        .await?;
        ensure!(sqlx::Row::try_get::<Option<i64>, _>(&row, 0)?.is_some());
        sqlx::query(
            "SELECT pg_advisory_unlock($1), CASE WHEN pg_try_advisory_xact_lock($2, $3) THEN NULL \
             ELSE pg_notify($4, $5)::text END",
        )
        .bind(77_i64)
        .bind(0_i32)
        .bind(77_i32)
        .bind("bench_chan")
        .bind("k")
        .fetch_one(&mut conn)
        .await?;
        samples.push(t.elapsed());
    }
    Ok(stats(samples, started.elapsed()))
}

/// Joins the parallel tasks and pools their samples; `started` is when the timed part began.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<Result<Vec<Duration>>>>,
    started: Instant,
) -> Result<Stats> {
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(stats(all, started.elapsed()))
}

async fn raw_parallel(url: &str) -> Result<Stats> {
    let mut conns = Vec::new();
    for _ in 0..PARALLEL_TASKS {
        conns.push(raw_conn(url).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(PARALLEL_ROUNDS);
            for _ in 0..PARALLEL_ROUNDS {
                let t = Instant::now();
                raw_pair(&mut conn, 1000 + i as i64).await?;
                samples.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(samples)
        }));
    }
    gather(tasks, started).await
}

async fn distlock_parallel(locker: &Locker) -> Result<Stats> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..PARALLEL_TASKS {
        let locker = locker.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("bench-parallel-{i}");
            let mut samples = Vec::with_capacity(PARALLEL_ROUNDS);
            for _ in 0..PARALLEL_ROUNDS {
                let t = Instant::now();
                let guard = locker.acquire(key.as_str()).await?;
                guard.release().await?;
                samples.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(samples)
        }));
    }
    gather(tasks, started).await
}

/// One distlock hand-off on a fresh key: the waiter blocks in `acquire` while the holder
/// keeps the lock 5 ms; time from the release call to the waiter's `acquire` returning.
async fn distlock_handoff(holder: &Locker, waiter: &Locker, round: usize) -> Result<Duration> {
    let key = format!("bench-handoff-{round}");
    let guard = holder.acquire(key.as_str()).await?;
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move {
            let guard = waiter
                .lock(key)
                .wait(Duration::from_secs(5))
                .acquire()
                .await?;
            let at = Instant::now();
            guard.release().await?;
            Ok::<_, anyhow::Error>(at)
        }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let released_at = Instant::now();
    guard.release().await?;
    let acquired_at = waiting.await??;
    Ok(acquired_at.saturating_duration_since(released_at))
}

/// The raw signal path: holder and waiter connections, the unlock NOTIFYs, a listener hears
/// it and the waiter tries again.
struct RawHandoff {
    holder: PgConnection,
    waiter: PgConnection,
    listener: PgListener,
}

impl RawHandoff {
    async fn connect(url: &str) -> Result<Self> {
        let mut listener = PgListener::connect(url).await?;
        listener.listen("bench_raw").await?;
        Ok(RawHandoff {
            holder: raw_conn(url).await?,
            waiter: raw_conn(url).await?,
            listener,
        })
    }

    async fn once(&mut self, round: usize) -> Result<Duration> {
        let key = 5000 + round as i64;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut self.holder)
            .await?;
        ensure!(got);
        let busy: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut self.waiter)
            .await?;
        ensure!(!busy);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let released_at = Instant::now();
        sqlx::query("SELECT pg_advisory_unlock($1), pg_notify('bench_raw', $2)::text")
            .bind(key)
            .bind(key.to_string())
            .execute(&mut self.holder)
            .await?;
        loop {
            let note = self.listener.recv().await?;
            if note.payload() == key.to_string() {
                break;
            }
        }
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut self.waiter)
            .await?;
        ensure!(got, "raw waiter did not get the lock");
        let acquired_at = Instant::now();
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .execute(&mut self.waiter)
            .await?;
        Ok(acquired_at - released_at)
    }
}

/// The server's own queue: the waiter's connection blocks in `pg_advisory_lock` while the
/// holder keeps the lock 5 ms; time from the unlock call to the waiter's statement returning.
struct QueueHandoff {
    holder: PgConnection,
    waiter: Option<PgConnection>,
}

impl QueueHandoff {
    async fn connect(url: &str) -> Result<Self> {
        Ok(QueueHandoff {
            holder: raw_conn(url).await?,
            waiter: Some(raw_conn(url).await?),
        })
    }

    async fn once(&mut self, round: usize) -> Result<Duration> {
        let key = 7000 + round as i64;
        sqlx::query("SELECT pg_advisory_lock($1)::text")
            .bind(key)
            .execute(&mut self.holder)
            .await?;
        let mut conn = self.waiter.take().context("waiter connection")?;
        let waiting = tokio::spawn(async move {
            sqlx::query("SELECT pg_advisory_lock($1)::text")
                .bind(key)
                .execute(&mut conn)
                .await?;
            let at = Instant::now();
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .execute(&mut conn)
                .await?;
            Ok::<_, anyhow::Error>((at, conn))
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let released_at = Instant::now();
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .execute(&mut self.holder)
            .await?;
        let (acquired_at, conn) = waiting.await??;
        self.waiter = Some(conn);
        Ok(acquired_at.saturating_duration_since(released_at))
    }
}

/// The three hand-offs (raw signal path, distlock, the server's queue) interleaved round by
/// round in rotating order, so the machine's drift over the run hits all three alike; 10
/// warm-up rounds. Returns (raw, distlock, queue).
async fn handoffs(url: &str, holder: &Locker, waiter: &Locker) -> Result<(Stats, Stats, Stats)> {
    let mut raw = RawHandoff::connect(url).await?;
    let mut queue = QueueHandoff::connect(url).await?;
    let mut samples: [Vec<Duration>; 3] = Default::default();
    let started = Instant::now();
    for round in 0..HANDOFF_ROUNDS + 10 {
        let mut got = [Duration::ZERO; 3];
        for turn in 0..3 {
            let which = (round + turn) % 3;
            got[which] = match which {
                0 => raw.once(round).await?,
                1 => distlock_handoff(holder, waiter, round).await?,
                _ => queue.once(round).await?,
            };
        }
        if round >= 10 {
            for (sample, all) in got.into_iter().zip(samples.iter_mut()) {
                all.push(sample);
            }
        }
    }
    let elapsed = started.elapsed();
    let [raw, ours, queue] = samples;
    Ok((
        stats(raw, elapsed),
        stats(ours, elapsed),
        stats(queue, elapsed),
    ))
}

/// [`CONTENDED_WORKERS`] tasks sharing one `Locker`, one key: acquire (waiting) + release in a
/// loop for [`CONTENDED_FOR`]; acquisitions per second.
async fn distlock_contended(locker: &Locker) -> Result<f64> {
    let stop = Instant::now() + CONTENDED_FOR;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONTENDED_WORKERS {
        let locker = locker.clone();
        tasks.push(tokio::spawn(async move {
            let mut count = 0_u64;
            while Instant::now() < stop {
                let guard = locker
                    .lock("bench-contended")
                    .wait(Duration::from_secs(10))
                    .acquire()
                    .await?;
                ensure!(guard.release().await?, "release answered false");
                count += 1;
            }
            Ok::<_, anyhow::Error>(count)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// pgbench with [`CONTENDED_WORKERS`] clients, each transaction a blocking
/// `pg_advisory_lock(1)` + `pg_advisory_unlock(1)`, for [`CONTENDED_FOR`]: its tps.
async fn pgbench_contended(server: &PostgresServer) -> Result<f64> {
    let script = std::env::temp_dir().join(format!("distlock-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "SELECT pg_advisory_lock(1);\nSELECT pg_advisory_unlock(1);\n",
    )?;
    let port = server.port().to_string();
    let secs = CONTENDED_FOR.as_secs().to_string();
    let clients = CONTENDED_WORKERS.to_string();
    let pgbench = lock_harness::postgres::find_pg_binary("pgbench")?;
    let output = tokio::process::Command::new(&pgbench)
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
            &port,
            "-c",
            &clients,
        ])
        .args(["-j", "1", "-T", &secs, "-f"])
        .arg(&script)
        .arg("postgres")
        .output()
        .await
        .with_context(|| format!("running {}", pgbench.display()))?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tps = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse::<f64>().ok())
        .with_context(|| format!("no tps in pgbench's output: {text}"))?;
    Ok(tps)
}

/// Semaphore (limit 3, 1 permit) acquire + release through the `Locker`, uncontended.
async fn distlock_semaphore(locker: &Locker) -> Result<Stats> {
    timed_pairs!(async {
        let guard = locker.semaphore("bench-semaphore", 3).acquire().await?;
        ensure!(guard.release().await?, "release answered false");
        anyhow::Ok(())
    })
}

/// Reader-writer read side acquire + release through the `Locker`, uncontended.
async fn distlock_read(locker: &Locker) -> Result<Stats> {
    timed_pairs!(async {
        let guard = locker.rwlock("bench-rw").read().acquire().await?;
        ensure!(guard.release().await?, "release answered false");
        anyhow::Ok(())
    })
}

/// The raw floor of a semaphore permit: the same server-side work as distlock's, as plain
/// statements on one connection: the occupancy key (transaction-level exclusive try, then
/// shared), the limit row read, a slot; then slot and occupancy key given back.
async fn raw_semaphore(url: &str) -> Result<Stats> {
    let mut conn = raw_conn(url).await?;
    sqlx::raw_sql(
        "CREATE TEMP TABLE lim (name_key bigint PRIMARY KEY, permit_limit int NOT NULL); \
         INSERT INTO lim VALUES (4242, 3)",
    )
    .execute(&mut conn)
    .await?;
    let (occupancy, slot) = (4242_i64, 0x5eed_i64);
    let pair = async |conn: &mut PgConnection| -> Result<()> {
        let (alone, limit, got): (bool, Option<i32>, bool) = sqlx::query_as(
            "SELECT pg_try_advisory_xact_lock($1), \
             (SELECT permit_limit FROM lim WHERE name_key = $1), \
             pg_try_advisory_lock_shared($1) AND pg_try_advisory_lock($2)",
        )
        .bind(occupancy)
        .bind(slot)
        .fetch_one(&mut *conn)
        .await?;
        ensure!(alone && limit == Some(3) && got, "raw permit not granted");
        let (a, b): (bool, bool) =
            sqlx::query_as("SELECT pg_advisory_unlock($2), pg_advisory_unlock_shared($1)")
                .bind(occupancy)
                .bind(slot)
                .fetch_one(&mut *conn)
                .await?;
        ensure!(a && b, "raw permit release failed");
        Ok(())
    };
    timed_pairs!(pair(&mut conn))
}

async fn run(server: &PostgresServer) -> Result<()> {
    let url = server.url();
    let locker = locker_at(&url).await?;
    let waiter = locker_at(&url).await?;

    let raw_one = raw_uncontended(&url).await?;
    let raw_sql = raw_distlock_sql(&url).await?;
    let direct = backend_uncontended(locker.backend()).await?;
    let dl_one = distlock_uncontended(&locker).await?;
    let (raw_mixed, dl_mixed) = interleaved_uncontended(&url, &locker).await?;
    let raw_par = raw_parallel(&url).await?;
    let dl_par = distlock_parallel(&locker).await?;
    let (raw_hand, dl_hand, queue_hand) = handoffs(&url, &locker, &waiter).await?;
    let bench_tps = pgbench_contended(server).await?;
    let dl_contended = distlock_contended(&locker).await?;
    let raw_sem = raw_semaphore(&url).await?;
    let dl_sem = distlock_semaphore(&locker).await?;
    let dl_read = distlock_read(&locker).await?;

    println!("| measure | raw floor | distlock | ratio |");
    println!("|---|---|---|---|");
    println!("{}", interleaved_row(&raw_mixed, &dl_mixed));
    let ratio = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64().max(1e-9);
    println!(
        "| uncontended acquire+release p50 | {} | {} | {:.2}× |",
        us(raw_one.p50),
        us(dl_one.p50),
        ratio(raw_one.p50, dl_one.p50)
    );
    println!(
        "| uncontended acquire+release p99 | {} | {} | {:.2}× |",
        us(raw_one.p99),
        us(dl_one.p99),
        ratio(raw_one.p99, dl_one.p99)
    );
    println!(
        "| (breakdown) distlock's SQL on a raw connection p50 / p99 | {} / {} | | {:.2}× |",
        us(raw_sql.p50),
        us(raw_sql.p99),
        ratio(raw_one.p50, raw_sql.p50)
    );
    println!(
        "| (breakdown) PostgresBackend trait calls, no Locker p50 / p99 | | {} / {} | {:.2}× |",
        us(direct.p50),
        us(direct.p99),
        ratio(raw_one.p50, direct.p50)
    );
    println!(
        "| uncontended ops/s (pairs) | {:.0} | {:.0} | {:.2}× |",
        raw_one.ops,
        dl_one.ops,
        raw_one.ops / dl_one.ops.max(1e-9)
    );
    println!(
        "| {PARALLEL_TASKS} tasks, distinct keys: ops/s | {:.0} | {:.0} | {:.2}× |",
        raw_par.ops,
        dl_par.ops,
        raw_par.ops / dl_par.ops.max(1e-9)
    );
    println!(
        "| {PARALLEL_TASKS} tasks, distinct keys: p50 / p99 | {} / {} | {} / {} | |",
        us(raw_par.p50),
        us(raw_par.p99),
        us(dl_par.p50),
        us(dl_par.p99)
    );
    for (label, floor, ours) in [
        (
            "hand-off median (5 ms hold, 1 waiter)",
            raw_hand.p50,
            dl_hand.p50,
        ),
        ("hand-off p99", raw_hand.p99, dl_hand.p99),
        (
            "hand-off median against the server's queue (waiter blocked in pg_advisory_lock)",
            queue_hand.p50,
            dl_hand.p50,
        ),
        (
            "hand-off p99 against the server's queue",
            queue_hand.p99,
            dl_hand.p99,
        ),
    ] {
        println!("{}", ratio_row(label, floor, ours));
    }
    println!(
        "| contended acquisitions/s, {CONTENDED_WORKERS} workers one key (raw: pgbench -c {CONTENDED_WORKERS}, blocking pg_advisory_lock) | {:.0} | {:.0} | {:.2} of pgbench |",
        bench_tps,
        dl_contended,
        dl_contended / bench_tps.max(1e-9)
    );
    println!(
        "| semaphore (limit 3, 1 permit) acquire+release p50 / p99; raw = occupancy key + limit row + slot, then both unlocked | {} / {} | {} / {} | {:.2}× |",
        us(raw_sem.p50),
        us(raw_sem.p99),
        us(dl_sem.p50),
        us(dl_sem.p99),
        ratio(raw_sem.p50, dl_sem.p50)
    );
    println!(
        "| semaphore p50 against the plain lock pair (raw floor above) | {} | {} | {:.2}× |",
        us(raw_one.p50),
        us(dl_sem.p50),
        ratio(raw_one.p50, dl_sem.p50)
    );
    println!(
        "| reader-writer read acquire+release p50 / p99 (raw: plain lock pair) | {} / {} | {} / {} | {:.2}× |",
        us(raw_one.p50),
        us(raw_one.p99),
        us(dl_read.p50),
        us(dl_read.p99),
        ratio(raw_one.p50, dl_read.p50)
    );
    println!();
    println!(
        "rounds: uncontended {UNCONTENDED_ROUNDS}, parallel {PARALLEL_TASKS}×{PARALLEL_ROUNDS}, hand-off {HANDOFF_ROUNDS}; \
         distlock = Locker (auto-renew on, TTL 30 s) over PostgresBackend"
    );
    Ok(())
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing to parse.
    // Client and server on one CPU: see `pin_to_one_cpu` (before, the raw floor and distlock
    // landed at 60 µs or 200 µs per pair depending on where their server processes ran).
    let cpus = lock_harness::allowed_cpus()?;
    let cpu = lock_harness::pin_to_one_cpu()?;
    println!("client and PostgreSQL pinned to CPU {cpu}");
    let server = Arc::new(PostgresServer::start().context("starting postgres")?);
    // A second server on another CPU, for one more row: every message then pays a
    // cross-CPU wake-up (as a real client pays a network hop), for raw and distlock alike.
    let other_cpu = cpus.into_iter().find(|&other| other != cpu);
    let apart = match other_cpu {
        Some(other) => {
            let apart = PostgresServer::start().context("starting the second postgres")?;
            apart.pin_to_cpu(other)?;
            Some((Arc::new(apart), other))
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Run on a worker thread, as an application's tasks do (raw and distlock alike).
    let result = runtime.block_on({
        let server = server.clone();
        let apart = apart.clone();
        async move {
            tokio::spawn(async move {
                run(&server).await?;
                if let Some((apart, other)) = apart {
                    run_apart(&apart, cpu, other).await?;
                }
                anyhow::Ok(())
            })
            .await?
        }
    });
    drop(runtime);
    drop(server);
    drop(apart);
    result
}

/// The interleaved uncontended measurement and the interleaved hand-offs against a server
/// pinned to another CPU.
async fn run_apart(server: &PostgresServer, client_cpu: usize, server_cpu: usize) -> Result<()> {
    let url = server.url();
    let locker = locker_at(&url).await?;
    let waiter = locker_at(&url).await?;
    let (raw, ours) = interleaved_uncontended(&url, &locker).await?;
    let (raw_hand, dl_hand, queue_hand) = handoffs(&url, &locker, &waiter).await?;
    println!();
    println!(
        "server on CPU {server_cpu}, client on CPU {client_cpu} (cross-CPU wake-up per message):"
    );
    println!("| measure | raw floor | distlock | ratio |");
    println!("|---|---|---|---|");
    println!("{}", interleaved_row(&raw, &ours));
    println!(
        "{}",
        ratio_row(
            "hand-off median, raw NOTIFY path (interleaved)",
            raw_hand.p50,
            dl_hand.p50
        )
    );
    println!(
        "{}",
        ratio_row(
            "hand-off median against the server's queue (interleaved)",
            queue_hand.p50,
            dl_hand.p50
        )
    );
    Ok(())
}
