//! What a backend grants: a lease with an owner token, a fencing token and a local deadline.

use crate::{LockError, LockKey};
use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest TTL accepted anywhere: one year. Larger values overflow some servers' millisecond
/// arithmetic and are never what a caller meant.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Checks a TTL before it reaches a backend: not zero, not above [`MAX_TTL`].
pub fn validate_ttl(ttl: Duration) -> Result<(), LockError> {
    if ttl.is_zero() {
        return Err(LockError::InvalidTtl {
            ttl,
            reason: "a TTL of zero would expire before it is granted".into(),
        });
    }
    if ttl > MAX_TTL {
        return Err(LockError::InvalidTtl {
            ttl,
            reason: format!("the largest accepted TTL is {MAX_TTL:?}"),
        });
    }
    Ok(())
}

/// The clock-drift allowance subtracted from a TTL: 1% of it plus 2 ms (as in Redlock).
pub fn drift(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// Refuses a TTL too short to use: a lease's validity is its TTL less the clock-drift
/// allowance ([`drift`]), and the lost signal fires a margin ([`crate::lost_margin`]) before
/// that. The watchdog renews at a third of the TTL, on a timer that may fire up to a
/// millisecond late, so what is left must outlast that: a TTL (as granted: raised to
/// `min_ttl`, the backend's minimum) of about 7.62 ms or less would be reported lost before
/// its first renewal could be tried, however fast the server.
pub fn check_usable_ttl(ttl: Duration, min_ttl: Duration) -> Result<(), LockError> {
    let granted = ttl.max(min_ttl);
    let reserved = drift(granted) + crate::lost_margin(granted);
    let first_renewal = granted / 3 + Duration::from_millis(1);
    if granted.saturating_sub(reserved) <= first_renewal {
        return Err(LockError::InvalidTtl {
            ttl,
            reason: format!(
                "too short to use: the clock-drift allowance and the lost margin take {reserved:?} \
                 of it, which leaves no time to renew it (a TTL must be more than about 7.62 ms)"
            ),
        });
    }
    Ok(())
}

/// What is wrong with the first of a backend's timeout settings (`(name, value)`) that has a
/// problem, if any: zero (nothing could ever answer in time) or more than a year (deadlines
/// are `Instant + timeout`, and `Duration::MAX` overflows). Every backend checks its timeouts
/// with this at construction.
pub fn timeout_problem(timeouts: &[(&str, Duration)]) -> Option<String> {
    timeouts.iter().find_map(|&(name, value)| {
        if value.is_zero() {
            Some(format!("{name} must not be zero"))
        } else {
            (value > MAX_TTL).then(|| format!("{name} must be at most a year, not {value:?}"))
        }
    })
}

/// A random 128-bit token that names one holder; renew and release compare it on the server.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerToken(u128);

impl OwnerToken {
    /// A fresh random token.
    pub fn random() -> Self {
        OwnerToken(rand::random())
    }

    /// A token from its raw value (as read back from a server).
    pub fn from_u128(value: u128) -> Self {
        OwnerToken(value)
    }

    /// The raw value.
    pub fn as_u128(&self) -> u128 {
        self.0
    }
}

impl fmt::Display for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerToken({self})")
    }
}

/// A number that strictly increases for successive holders of one key.
///
/// Pass it to the resource you protect and have the resource reject writes carrying a token
/// lower than one it has seen: that is what makes a paused, expired holder harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a lease holds: a lock, permits of a semaphore, or one side of a reader-writer lock.
/// Backends read it in `renew` and `release` to find the holder record it names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeaseKind {
    /// An exclusive lock (a mutex): the default.
    #[default]
    Lock,
    /// `count` of the `limit` permits of a counting semaphore.
    Permits {
        /// How many holders' permits the semaphore admits at once.
        limit: u32,
        /// How many permits this lease holds.
        count: u32,
    },
    /// The shared side of a reader-writer lock.
    Read,
    /// The exclusive side of a reader-writer lock.
    Write,
}

/// One grant of a lock by a backend.
///
/// The holder may act on the protected resource only before [`Lease::valid_until`], which is
/// computed locally as (instant the request was sent) + TTL − drift, so it never trusts a
/// server clock. Renewing returns a new `Lease` with a later deadline.
#[derive(Clone)]
pub struct Lease {
    key: LockKey,
    owner: OwnerToken,
    fence: Option<FencingToken>,
    ttl: Duration,
    sent_at: Instant,
    valid_until: Instant,
    backend_data: Option<Arc<dyn Any + Send + Sync>>,
    lost_signal: Option<CancellationToken>,
    kind: LeaseKind,
}

impl Lease {
    /// A lease for `key` granted with `ttl` to a request sent at `sent_at`.
    pub fn new(
        key: LockKey,
        owner: OwnerToken,
        fence: Option<FencingToken>,
        ttl: Duration,
        sent_at: Instant,
    ) -> Self {
        // No lease is valid for more than `MAX_TTL` (acquire refuses longer TTLs); the cap
        // also keeps a backend's absurd TTL (a server's answer) from overflowing `Instant`.
        let valid_for = ttl.min(MAX_TTL);
        let valid_until = sent_at + valid_for.saturating_sub(drift(valid_for));
        Lease {
            key,
            owner,
            fence,
            ttl,
            sent_at,
            valid_until,
            backend_data: None,
            lost_signal: None,
            kind: LeaseKind::Lock,
        }
    }

    /// The same lease for a semaphore's permits or a reader-writer side (default: a lock).
    pub fn with_kind(mut self, kind: LeaseKind) -> Self {
        self.kind = kind;
        self
    }

    /// What the lease holds.
    pub fn kind(&self) -> LeaseKind {
        self.kind
    }

    /// Attaches backend-private data (an etcd lease id, a session handle). Backends read it
    /// back with [`Lease::backend_data`].
    pub fn with_backend_data(mut self, data: Arc<dyn Any + Send + Sync>) -> Self {
        self.backend_data = Some(data);
        self
    }

    /// Attaches a token the backend cancels the moment it learns, on its own, that the lease
    /// is gone (a Postgres holder session ended, a connection carrying the lock dropped). The
    /// guard's lost signal is a child of it, so it fires at once instead of at the next renew.
    pub fn with_lost_signal(mut self, signal: CancellationToken) -> Self {
        self.lost_signal = Some(signal);
        self
    }

    /// The backend's lost signal, if it attached one.
    pub fn lost_signal(&self) -> Option<&CancellationToken> {
        self.lost_signal.as_ref()
    }

    /// Replaces the validity deadline, e.g. with Redlock's TTL − elapsed − drift.
    pub fn with_valid_until(mut self, valid_until: Instant) -> Self {
        self.valid_until = valid_until;
        self
    }

    /// The same lease with another owner token. Backends use it never; the conformance suite
    /// uses it to forge a lease and check that the backend refuses it.
    pub fn with_owner(mut self, owner: OwnerToken) -> Self {
        self.owner = owner;
        self
    }

    /// The same lease renewed: same owner and fence, new TTL and deadline from `sent_at`.
    pub fn renewed(&self, ttl: Duration, sent_at: Instant) -> Self {
        let mut next = Lease::new(self.key.clone(), self.owner, self.fence, ttl, sent_at);
        next.backend_data = self.backend_data.clone();
        next.lost_signal = self.lost_signal.clone();
        next.kind = self.kind;
        next
    }

    /// The locked key.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// The holder's owner token.
    pub fn owner(&self) -> OwnerToken {
        self.owner
    }

    /// The fencing token, when the backend provides one.
    pub fn fence(&self) -> Option<FencingToken> {
        self.fence
    }

    /// The TTL the backend granted (it may be larger than asked, e.g. etcd's 2 s minimum).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// When the request that produced this lease was sent.
    pub fn sent_at(&self) -> Instant {
        self.sent_at
    }

    /// Until when the holder may act, unless renewed.
    ///
    /// A lease whose request was sent before the machine was suspended (see
    /// [`Lease::voided_by_suspension`]) is valid until its sending: already over.
    pub fn valid_until(&self) -> Instant {
        if self.voided_by_suspension() {
            return self.sent_at.min(self.valid_until);
        }
        self.valid_until
    }

    /// Whether the machine was found suspended after this lease's request was sent (Linux:
    /// `CLOCK_BOOTTIME` ran ahead of `CLOCK_MONOTONIC`, which `Instant` reads and which stops
    /// during suspension). The server's clock ran on meanwhile, so nothing local tells how
    /// much of the lease is left: it counts as expired.
    pub fn voided_by_suspension(&self) -> bool {
        crate::suspend::suspended_since(self.sent_at)
    }

    /// Whether the local validity deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.valid_until()
    }

    /// Backend-private data attached with [`Lease::with_backend_data`], if it has type `T`.
    pub fn backend_data<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.backend_data.as_ref()?.downcast_ref::<T>()
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("owner", &self.owner)
            .field("kind", &self.kind)
            .field("fence", &self.fence)
            .field("ttl", &self.ttl)
            .field(
                "valid_for",
                &self.valid_until().saturating_duration_since(Instant::now()),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rules() {
        assert!(validate_ttl(Duration::ZERO).is_err());
        assert!(validate_ttl(Duration::MAX).is_err());
        assert!(validate_ttl(Duration::from_millis(1)).is_ok());
    }

    /// A backend handing over an absurd TTL (a server's answer) gets a lease valid for at
    /// most `MAX_TTL`, not a panic from `Instant` overflowing.
    #[test]
    fn an_absurd_ttl_is_capped_not_a_panic() {
        let now = Instant::now();
        let lease = Lease::new(
            LockKey::new("k").unwrap(),
            OwnerToken::random(),
            None,
            Duration::MAX,
            now,
        );
        assert!(lease.valid_until() <= now + MAX_TTL);
        assert!(lease.valid_until() > now + MAX_TTL / 2);
    }

    #[tokio::test]
    async fn deadline_subtracts_drift() {
        let now = Instant::now();
        let lease = Lease::new(
            LockKey::new("k").unwrap(),
            OwnerToken::random(),
            None,
            Duration::from_secs(10),
            now,
        );
        assert_eq!(lease.valid_until(), now + Duration::from_millis(9898));
        assert_eq!(lease.owner().to_string().len(), 32);
    }
}
