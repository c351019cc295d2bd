//! Backoff between acquisition attempts: exponential, full jitter, a cap.

use backon::BackoffBuilder;
use rand::Rng;
use std::time::Duration;

/// How long to wait between attempts when the lock is held and no release signal came.
///
/// Delays grow exponentially from `min` by `factor` up to `max` (built with `backon`), and each
/// is drawn uniformly from `[0, delay]` ("full jitter") so that contenders spread out. When
/// the backend signals releases, the delay only bounds how long a missed signal can cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// First delay (before jitter).
    pub min: Duration,
    /// Largest delay (before jitter).
    pub max: Duration,
    /// Growth per attempt.
    pub factor: f32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(10),
            max: Duration::from_secs(1),
            factor: 2.0,
        }
    }
}

impl Backoff {
    /// A backoff from `min` to `max`, doubling.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            factor: 2.0,
        }
    }

    /// An endless sequence of jittered delays.
    pub fn delays(&self) -> Delays {
        // At most a year (no wait is longer): later `Instant + delay` must not overflow.
        let min = self.min.clamp(Duration::from_micros(100), crate::MAX_TTL);
        let max = self.max.clamp(min, crate::MAX_TTL);
        let base = backon::ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(self.factor.max(1.0))
            .without_max_times()
            .build();
        Delays {
            base: Box::new(base),
            max,
        }
    }
}

/// Jittered delays from a [`Backoff`].
pub struct Delays {
    base: Box<dyn Iterator<Item = Duration> + Send>,
    max: Duration,
}

impl std::fmt::Debug for Delays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delays").field("max", &self.max).finish()
    }
}

impl Iterator for Delays {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let ceiling = self.base.next().unwrap_or(self.max).min(self.max);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(rand::rng().random_range(0..=nanos)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jittered_and_capped() {
        let backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let delays: Vec<_> = backoff.delays().take(50).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(80)));
        // Full jitter: not all equal to the ceiling.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(79)));
    }
}
