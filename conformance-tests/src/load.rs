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
        })
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

/// Holds `load.locks` locks (keys `held-<n>`, 64 acquisitions at a time) on `locker` with
/// auto-renew, waits for every lease's first renewal, measures the CPU share over
/// `load.window`, checks none was lost, and drops them.
pub async fn hold_many(locker: &Locker, load: HeldLoad) -> Result<HeldFigures> {
    let before = process_rss()?;
    let guards: Vec<LockGuard> = futures::stream::iter(0..load.locks)
        .map(|index| {
            let locker = locker.clone();
            async move {
                locker
                    .lock(format!("held-{index}"))
                    .ttl(load.ttl)
                    .acquire()
                    .await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
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

/// The floor: runs `renew(n)` for n in `0..load.locks`, each once per [`HeldLoad::period`],
/// spread evenly (as the watchdog spreads leases acquired one after another), for
/// `load.window`, and returns the share of one core the process used meanwhile.
pub async fn paced_cpu_share<F, Fut>(load: HeldLoad, renew: F) -> Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let gap = load.period() / u32::try_from(load.locks.max(1)).unwrap_or(u32::MAX);
    let (cpu, start) = (process_cpu_time()?, Instant::now());
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut next = start;
    let mut index = 0usize;
    while start.elapsed() < load.window {
        in_flight.push(renew(index % load.locks.max(1)));
        index += 1;
        next += gap;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                Some(result) = in_flight.next() => result?,
            }
        }
    }
    while let Some(result) = in_flight.next().await {
        result?;
    }
    Ok((process_cpu_time()? - cpu).as_secs_f64() / start.elapsed().as_secs_f64())
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
    let (floor, ratio) = match floor {
        Some(floor) => (
            format!("{:.2} %", floor * 100.0),
            format!("{:.2}×", figures.cpu_share / floor.max(1e-9)),
        ),
        None => ("—".into(), "—".into()),
    };
    println!(
        "| {engine} | {} | {:.2} % | {floor} | {ratio} | {:.0} B | {} |",
        load.locks,
        figures.cpu_share * 100.0,
        figures.bytes_per_lock,
        figures.renewed,
    );
}
