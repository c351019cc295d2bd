//! Helpers shared by the test binaries' conformance factories.

use lock_core::LockKey;
use lock_redis::KeyScheme;

/// The clients that hold or wait in line for `key` on the server behind `conn`: the lock key
/// (0 or 1) plus the fair queue's entries (one hash slot: they share the key's tag).
pub async fn contenders(
    conn: &mut impl redis::aio::ConnectionLike,
    scheme: &KeyScheme,
    key: &LockKey,
) -> anyhow::Result<usize> {
    let [lock, _, queue, _] = scheme.lock_keys(key);
    let (held, waiting): (usize, usize) = redis::pipe()
        .cmd("EXISTS")
        .arg(lock)
        .cmd("ZCARD")
        .arg(queue)
        .query_async(conn)
        .await?;
    Ok(held + waiting)
}
