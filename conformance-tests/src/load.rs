//! What holding many locks costs (#13), measured the same way on every backend: each
//! backend's `held` bench holds [`HeldLoad::locks`] locks with auto-renew on its real server
//! and prints the CPU share and memory per lock beside the floor (the driver alone sending
//! the same renewals at the same rate, through [`paced_cpu_share`]) from the same run.
//!
//! CPU is the whole process's user + system time from `/proc/self/stat`, memory its resident
//! set from `/proc/self/status` (Linux only).

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use lock_core::{LockGuard, Locker};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// How many locks, for how long, renewed how often.
#[derive(Debug, Clone, Copy)]
pub struct HeldLoad {
    /// Locks held at once.
    pub locks: usize,
    /// Their TTL; the watchdog renews each every TTL/3.
    pub ttl: Duration,
    /// How long the CPU is measured, in steady state (after every lease's first renewal).
    pub window: Duration,
    /// How the locks are taken, and so when their renewals fall due.
    pub pattern: Pattern,
}

/// When the locks are taken: all at once, or one after another over a renewal period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// As fast as 64 at a time go: renewals fall due together, in bursts a client can batch.
    Burst,
    /// Evenly over one renewal period (as locks taken over time are): renewals fall due one
    /// at a time, the worst case for batching.
    Spread,
}

impl HeldLoad {
    /// 10,000 locks of TTL 30 s over a 20 s window, unless `DISTLOCK_BENCH_HELD` or
    /// `DISTLOCK_BENCH_WINDOW_S` say otherwise.
    pub fn from_env() -> Result<Self> {
        let number = |name: &str| -> Result<Option<u64>> {
            std::env::var(name)
                .ok()
                .map(|value| value.trim().parse::<u64>())
                .transpose()
                .with_context(|| format!("{name} must be a whole number"))
        };
        Ok(HeldLoad {
            locks: number("DISTLOCK_BENCH_HELD")?.map_or(10_000, |n| n as usize),
            ttl: Duration::from_secs(30),
            window: Duration::from_secs(number("DISTLOCK_BENCH_WINDOW_S")?.unwrap_or(20)),
            pattern: Pattern::Burst,
        })
    }

    /// The same load taken with `pattern`.
    pub fn with_pattern(self, pattern: Pattern) -> Self {
        HeldLoad { pattern, ..self }
    }

    /// The gap between two acquisitions (and two floor renewals) of the spread pattern.
    fn gap(&self) -> Duration {
        self.period() / u32::try_from(self.locks.max(1)).unwrap_or(u32::MAX)
    }

    /// The watchdog's renewal period: TTL/3.
    pub fn period(&self) -> Duration {
        self.ttl / 3
    }
}

/// What [`hold_many`] measured.
#[derive(Debug, Clone, Copy)]
pub struct HeldFigures {
    /// Share of one core the process used over the window (1.0 = a whole core).
    pub cpu_share: f64,
    /// Resident memory added by acquiring the locks, per lock.
    pub bytes_per_lock: f64,
    /// Leases whose validity moved during the window (each should, at least once).
    pub renewed: usize,
}

/// CPU time (user + system) this process has used so far.
pub fn process_cpu_time() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // The fields after the command name (which may hold spaces) start after its last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/self/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
    let field = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .context("short /proc/self/stat")?
            .parse::<u64>()
            .context("a CPU time field of /proc/self/stat")
    };
    // In USER_HZ: 100 on Linux.
    Ok(Duration::from_millis((field(11)? + field(12)?) * 10))
}

/// Resident memory of this process, in bytes.
pub fn process_rss() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .context("no VmRSS in /proc/self/status")?
        .parse()?;
    Ok(kib * 1024)
}

/// Share of one core this process uses over `window`, doing whatever its tasks do.
pub async fn cpu_share_over(window: Duration) -> Result<f64> {
    let (cpu, start) = (process_cpu_time()?, Instant::now());
    tokio::time::sleep(window).await;
    Ok((process_cpu_time()? - cpu).as_secs_f64() / start.elapsed().as_secs_f64())
}

/// Holds `load.locks` locks (keys `held-<pattern>-<n>`) on `locker` with auto-renew, taken as
/// `load.pattern` says, waits for every lease's first renewal, measures the CPU share over
/// `load.window`, checks none was lost, and drops them.
pub async fn hold_many(locker: &Locker, load: HeldLoad) -> Result<HeldFigures> {
    let before = process_rss()?;
    let guards: Vec<LockGuard> = paced(load, |index| {
        let locker = locker.clone();
        async move {
            Ok(locker
                .lock(format!("held-{:?}-{index}", load.pattern))
                .ttl(load.ttl)
                // A server shedding load answers with retryable errors: ride them out.
                .wait(load.ttl)
                .acquire()
                .await?)
        }
    })
    .await?;
    let after = process_rss()?;
    tokio::time::sleep(load.period() + Duration::from_secs(1)).await;
    let valid_before: Vec<Instant> = guards.iter().map(LockGuard::valid_until).collect();
    let cpu_share = cpu_share_over(load.window).await?;
    let renewed = guards
        .iter()
        .zip(&valid_before)
        .filter(|(guard, before)| guard.valid_until() > **before)
        .count();
    if let Some(lost) = guards.iter().find(|guard| guard.is_lost()) {
        bail!("a held lock was lost during the window: {:?}", lost.key());
    }
    drop(guards);
    Ok(HeldFigures {
        cpu_share,
        bytes_per_lock: after.saturating_sub(before) as f64 / load.locks as f64,
        renewed,
    })
}

/// Runs `work(n)` once for every n in `0..load.locks`: 64 at a time as fast as they go
/// ([`Pattern::Burst`]), or one every period/locks ([`Pattern::Spread`]). Returns the outputs
/// in any order.
async fn paced<T, F, Fut>(load: HeldLoad, work: F) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    match load.pattern {
        Pattern::Burst => futures::stream::iter(0..load.locks)
            .map(work)
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect(),
        Pattern::Spread => {
            let mut in_flight = futures::stream::FuturesUnordered::new();
            let mut outputs = Vec::with_capacity(load.locks);
            let start = Instant::now();
            for index in 0..load.locks {
                in_flight.push(work(index));
                let next = start + load.gap() * u32::try_from(index + 1).unwrap_or(u32::MAX);
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(next) => break,
                        Some(output) = in_flight.next() => outputs.push(output?),
                    }
                }
            }
            while let Some(output) = in_flight.next().await {
                outputs.push(output?);
            }
            Ok(outputs)
        }
    }
}

/// The floor: runs `renew(n)` for every n in `0..load.locks` once per [`HeldLoad::period`],
/// in the same pattern as [`hold_many`] takes its locks (so renewals fall due the same way),
/// for `load.window`, and returns the share of one core the process used meanwhile.
pub async fn paced_cpu_share<F, Fut>(load: HeldLoad, renew: F) -> Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let (cpu, start) = (process_cpu_time()?, Instant::now());
    let mut round = 0u32;
    while start.elapsed() < load.window {
        paced(load, &renew).await?;
        round += 1;
        tokio::time::sleep_until(start + load.period() * round).await;
    }
    Ok((process_cpu_time()? - cpu).as_secs_f64() / start.elapsed().as_secs_f64())
}

/// Both patterns, burst first.
pub fn patterns() -> [Pattern; 2] {
    [Pattern::Burst, Pattern::Spread]
}

/// The table's header.
pub fn print_header(load: HeldLoad) {
    println!(
        "holding {} locks, TTL {:?} (renewed every {:?}), CPU over {:?}",
        load.locks,
        load.ttl,
        load.period(),
        load.window
    );
    println!(
        "| engine | locks | distlock CPU (share of a core) | floor: driver alone, same renewals | ratio | memory per lock | leases renewed in the window |"
    );
    println!("|---|---|---|---|---|---|---|");
}

/// One row: distlock's figures beside the floor.
pub fn print_row(engine: &str, load: HeldLoad, figures: HeldFigures, floor: Option<f64>) {
    let engine = match load.pattern {
        Pattern::Burst => format!("{engine}, taken at once"),
        Pattern::Spread => format!("{engine}, taken over {:?}", load.period()),
    };
    let (floor, ratio) = match floor {
        Some(floor) => (
            format!("{:.2} %", floor * 100.0),
            format!("{:.2}×", figures.cpu_share / floor.max(1e-9)),
        ),
        None => ("—".into(), "—".into()),
    };
    // A later run in the same process reuses what the earlier one freed: its RSS barely grows.
    let memory = match load.pattern {
        Pattern::Burst => format!("{:.0} B", figures.bytes_per_lock),
        Pattern::Spread => "(reuses the first run's)".to_owned(),
    };
    println!(
        "| {engine} | {} | {:.2} % | {floor} | {ratio} | {memory} | {} |",
        load.locks,
        figures.cpu_share * 100.0,
        figures.renewed,
    );
}
