//! Redis backend for distlock: [`RedisBackend`] (one server) and [`RedlockBackend`] (N
//! independent masters), both implementing [`lock_core::LockBackend`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), lock_core::LockError> {
//! let backend = lock_redis::connect("redis://127.0.0.1:6379/0?prefix=app:").await?;
//! let locker = lock_core::Locker::from_arc(backend);
//! let guard = locker.acquire("invoice:42").await?;
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! URL forms:
//! - `redis://[user:pass@]host:port[/db][?prefix=…]` — one server (also `rediss://` when the
//!   `redis` crate's TLS feature is enabled, and `redis+unix:///path?db=N`);
//! - `redlock://[user:pass@]h1:p1,h2:p2,h3:p3[/db][?prefix=…]` — Redlock over independent
//!   masters (same credentials and database on each);
//! - optional parameters on both: `prefix`, `connect_timeout_ms`, `command_timeout_ms`,
//!   `node_timeout_ms`; other parameters go to the `redis` crate unchanged.

mod keys;
mod node;
mod options;
mod redlock;
mod shared;
mod single;

pub use keys::KeyScheme;
pub use options::RedisOptions;
pub use redlock::RedlockBackend;
pub use single::RedisBackend;

use lock_core::{LockBackend, LockError};
use std::sync::Arc;

/// Connects to a `redis://` or `redlock://` URL (see the crate docs) with default options.
///
/// Malformed URLs give `LockError::InvalidConfig`; unreachable servers give a retryable
/// `LockError::Backend` within the connect timeout (2 s by default).
pub async fn connect(url: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    connect_with(url, RedisOptions::default()).await
}

/// [`connect`] with options (URL parameters override them).
pub async fn connect_with(
    url: &str,
    options: RedisOptions,
) -> Result<Arc<dyn LockBackend>, LockError> {
    let parsed = options::parse_url(url, options)?;
    if parsed.redlock {
        Ok(Arc::new(
            RedlockBackend::connect_nodes(&parsed.nodes, parsed.options).await?,
        ))
    } else {
        Ok(Arc::new(
            RedisBackend::connect_node(&parsed.nodes, &parsed.options).await?,
        ))
    }
}
