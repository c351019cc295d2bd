//! Host suspension. Lease deadlines are `tokio::time::Instant`s, which read
//! `CLOCK_MONOTONIC`, and on Linux that clock stops while the machine is suspended (a laptop
//! lid, a VM paused by its host, a hibernated instance); the lock server's clock does not.
//! After 60 s asleep, a lease renewed 10 s before with a 30 s TTL ran out on the server long
//! ago and the lock may have a new holder, yet locally 20 s of validity seem to be left, and
//! the watchdog's timers (on the same clock) wake no earlier than they would have.
//!
//! `CLOCK_BOOTTIME` keeps counting through suspension, so the difference between the two
//! clocks grows by exactly the time spent suspended. Every look at a lease's deadline samples
//! that difference ([`suspended_since`]): a lease whose request was sent before a detected
//! suspension is void (its validity ends at its sending). A thread started with the first
//! watched guard samples it every [`SAMPLE_EVERY`] and wakes the watchdogs, so `lost()`
//! fires within about that long of the machine waking up, not at the next renewal.
//!
//! Other systems: not detected (documented in the README).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// Growth of the clock difference taken for a suspension. Reading the two clocks is not
/// atomic; the bounds below keep preemption between the reads from looking like one. A
/// shorter suspension is within every lease's drift allowance (1 % of the TTL + 2 ms).
const TOLERANCE_NS: i64 = 1_000_000;

/// How often the background thread samples the clocks.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The largest upper bound of the clock difference seen so far (`i64::MIN`: none yet).
static LAST_GAP_UPPER: AtomicI64 = AtomicI64::new(i64::MIN);
/// When (nanoseconds after [`anchor`], on tokio's clock) the latest suspension was found;
/// 0: none.
static SUSPENSION_FOUND_AT: AtomicU64 = AtomicU64::new(0);
/// How many suspensions were found (the watchdogs compare it with what they last saw).
static SUSPENSIONS: AtomicU64 = AtomicU64::new(0);
/// Simulated suspension for tests ([`simulate_suspension`]), in nanoseconds.
static SIMULATED_NS: AtomicI64 = AtomicI64::new(0);

fn anchor() -> Instant {
    static ANCHOR: OnceLock<Instant> = OnceLock::new();
    *ANCHOR.get_or_init(|| {
        let now = Instant::now();
        // A little before the first use, so that instants taken just before it count.
        now.checked_sub(Duration::from_secs(1)).unwrap_or(now)
    })
}

fn since_anchor(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(anchor()).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(target_os = "linux")]
fn clock_ns(clock: nix::time::ClockId) -> Option<i64> {
    // Both clocks exist on every Linux since 2.6.39; a failed read makes no sample.
    let now = nix::time::clock_gettime(clock).ok()?;
    // `i64::from`: the fields are 32-bit on 32-bit targets.
    #[allow(clippy::useless_conversion)]
    Some(
        i64::from(now.tv_sec())
            .saturating_mul(1_000_000_000)
            .saturating_add(i64::from(now.tv_nsec())),
    )
}

/// A sample whose two monotonic reads lie further apart than this (the thread was preempted
/// between them) is taken again: its upper bound would raise the baseline for good and hide
/// later, shorter suspensions.
#[cfg(target_os = "linux")]
const TIGHT_NS: i64 = 50_000;

/// Bounds of `CLOCK_BOOTTIME - CLOCK_MONOTONIC` now (monotonic read before and after the
/// boot-time clock), plus any simulated suspension.
#[cfg(target_os = "linux")]
fn gap_bounds() -> Option<(i64, i64)> {
    use nix::time::ClockId;
    let simulated = SIMULATED_NS.load(Ordering::Relaxed);
    let mut tries = 0;
    loop {
        let before = clock_ns(ClockId::CLOCK_MONOTONIC)?;
        let boot = clock_ns(ClockId::CLOCK_BOOTTIME)?;
        let after = clock_ns(ClockId::CLOCK_MONOTONIC)?;
        tries += 1;
        if after - before <= TIGHT_NS || tries == 3 {
            if after - before > TIGHT_NS {
                return None;
            }
            return Some((
                boot.saturating_sub(after).saturating_add(simulated),
                boot.saturating_sub(before).saturating_add(simulated),
            ));
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn gap_bounds() -> Option<(i64, i64)> {
    let simulated = SIMULATED_NS.load(Ordering::Relaxed);
    Some((simulated, simulated))
}

/// Samples the clocks; records a suspension when the difference's lower bound now exceeds
/// the largest upper bound seen before by more than [`TOLERANCE_NS`].
fn sample() {
    let Some((lower, upper)) = gap_bounds() else {
        return;
    };
    let previous = LAST_GAP_UPPER.load(Ordering::Acquire);
    // The finding is published before the baseline moves: a look at a lease between the two
    // must not take the new baseline for "no suspension".
    let found = previous != i64::MIN && lower.saturating_sub(previous) > TOLERANCE_NS;
    if found {
        SUSPENSION_FOUND_AT.fetch_max(since_anchor(Instant::now()), Ordering::AcqRel);
        SUSPENSIONS.fetch_add(1, Ordering::AcqRel);
    }
    // Written only when it grows (the common sample writes nothing shared).
    if upper > previous {
        LAST_GAP_UPPER.fetch_max(upper, Ordering::AcqRel);
    }
    if found {
        tracing::warn!(
            asleep = ?Duration::from_nanos(u64::try_from(lower - previous).unwrap_or(0)),
            "the machine was suspended: leases sent before count as expired"
        );
        wake_watchdogs();
    }
}

/// Whether a suspension was found after `at` (which is then no base for a deadline: the
/// machine may have slept at any moment since). Samples the clocks first.
pub(crate) fn suspended_since(at: Instant) -> bool {
    sample();
    let found = SUSPENSION_FOUND_AT.load(Ordering::Acquire);
    found != 0 && found > since_anchor(at)
}

/// How many suspensions were found so far.
pub(crate) fn suspensions() -> u64 {
    SUSPENSIONS.load(Ordering::Acquire)
}

/// What the sampling thread wakes when it finds a suspension (a `Locker`'s watchdog).
pub(crate) trait SuspensionWake: Send + Sync {
    /// Called from the sampling thread: must be cheap and must not block.
    fn woken_by_suspension(&self);
}

fn registry() -> &'static Mutex<Vec<Weak<dyn SuspensionWake>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Weak<dyn SuspensionWake>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

fn registered() -> std::sync::MutexGuard<'static, Vec<Weak<dyn SuspensionWake>>> {
    registry()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn wake_watchdogs() {
    // Woken outside the registry's lock: a watchdog takes its own lock to wake.
    let live: Vec<Arc<dyn SuspensionWake>> = {
        let mut all = registered();
        all.retain(|weak| weak.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    };
    for watchdog in live {
        watchdog.woken_by_suspension();
    }
}

/// Wakes `watchdog` whenever a suspension is found, from the sampling thread (started now if
/// it is not running yet), for as long as it lives.
pub(crate) fn watch_for_suspension(watchdog: Weak<dyn SuspensionWake>) {
    static THREAD: OnceLock<()> = OnceLock::new();
    {
        let mut all = registered();
        all.retain(|weak| weak.strong_count() > 0);
        all.push(watchdog);
    }
    THREAD.get_or_init(|| {
        sample();
        let started = std::thread::Builder::new()
            .name("distlock-suspend".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(SAMPLE_EVERY);
                    sample();
                }
            });
        if let Err(error) = started {
            tracing::warn!(
                %error,
                "no thread to watch for host suspension: lost() fires at the next renewal after one"
            );
        }
    });
}

/// Makes the clocks look as if the machine had just been suspended for `asleep`, for tests of
/// what follows (a real suspension cannot be caused from a test). Affects the whole process.
#[doc(hidden)]
pub fn simulate_suspension(asleep: Duration) {
    sample();
    let nanos = i64::try_from(asleep.as_nanos()).unwrap_or(i64::MAX);
    SIMULATED_NS.fetch_add(nanos, Ordering::AcqRel);
}
