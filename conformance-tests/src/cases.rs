//! The cases (being written).
use crate::BackendFactory;
/// Placeholder.
pub async fn acquire_release_reacquire(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn contention_no_lost_updates(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn simultaneous_try_acquire_one_winner(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn not_reentrant(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn forged_lease_cannot_renew_or_release(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn release_after_expiry_spares_next_holder(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn renew_extends_and_expired_renew_is_lost(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn abandoned_lock_expires_within_ttl(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn fencing_tokens_increase(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn wait_timeout_is_bounded(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn cancelled_acquires_leave_nothing(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn handoff_wakes_waiter_fast(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn lost_fires_on_renew_failure(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn lost_fires_on_renew_hang(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn lost_fires_on_lost_answer(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn with_lock_drops_work_on_loss(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn drop_releases_in_background(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn bad_input_is_rejected(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn many_keys_held_and_renewed(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Placeholder.
pub async fn keys_are_independent(_f: &dyn BackendFactory) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
