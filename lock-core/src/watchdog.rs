//! Keeps a held lease alive and fires the lost signal when it cannot.

use crate::guard::GuardState;
use crate::{Lease, LockBackend};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, sleep_until, timeout_at};

/// How long before the validity deadline the lost signal fires when renewal has not been
/// confirmed: 5% of the TTL, between 2 ms and 250 ms. It leaves the holder time to stop
/// before the server may grant the lock to someone else.
pub fn lost_margin(ttl: Duration) -> Duration {
    (ttl / 20).clamp(Duration::from_millis(2), Duration::from_millis(250))
}

fn lost_deadline(lease: &Lease) -> Instant {
    let margin = lost_margin(lease.ttl());
    lease
        .valid_until()
        .checked_sub(margin)
        .unwrap_or_else(|| lease.valid_until())
}

/// Runs until the lease is lost (or the task is aborted by release/drop).
///
/// With `auto_renew`, renews at TTL/3 after each grant; a `Lost` answer fires the signal at
/// once; other errors are retried until the lost deadline; a renew call that hangs is cut off
/// at that deadline. Without `auto_renew` it only fires the signal at the lost deadline.
pub(crate) async fn run(
    backend: Arc<dyn LockBackend>,
    state: Arc<GuardState>,
    ttl: Duration,
    auto_renew: bool,
) {
    loop {
        let lease = state.lease();
        let lost_at = lost_deadline(&lease);
        if !auto_renew {
            sleep_until(lost_at).await;
            state.fire_lost("the lease reached its validity deadline (auto-renew is off)".into());
            return;
        }
        let renew_at = lease.sent_at() + lease.ttl() / 3;
        sleep_until(renew_at.min(lost_at)).await;
        let mut retry_delay = (ttl / 50).max(Duration::from_millis(5));
        loop {
            if Instant::now() >= lost_at {
                state.fire_lost(
                    "renewal could not be confirmed before the validity deadline".into(),
                );
                return;
            }
            match timeout_at(lost_at, backend.renew(&lease, ttl)).await {
                Err(_) => {
                    state.fire_lost("renewal did not answer before the validity deadline".into());
                    return;
                }
                Ok(Ok(renewed)) => {
                    tracing::trace!(key = %renewed.key(), "renewed");
                    state.set_lease(renewed);
                    break;
                }
                Ok(Err(error)) if error.is_lost() => {
                    state.fire_lost(error.to_string());
                    return;
                }
                Ok(Err(error)) => {
                    tracing::debug!(key = %lease.key(), %error, "renew failed; retrying");
                    sleep_until((Instant::now() + retry_delay).min(lost_at)).await;
                    retry_delay = (retry_delay * 2).min((ttl / 10).max(Duration::from_millis(5)));
                }
            }
        }
    }
}
