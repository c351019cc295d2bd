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
//! - `redis://[user:pass@]host:port[/db][?prefix=…]` — one server (also
//!   `redis+unix:///path?db=N`);
//! - `redlock://[user:pass@]h1:p1,h2:p2,h3:p3[/db][?prefix=…]` — Redlock over independent
//!   masters (same credentials and database on each);
//! - `rediss://…` and `redlocks://…` — the same over TLS (feature `tls`), with
//!   `tls_ca=/path` (trust this CA instead of the default roots), `tls_cert=/path` and
//!   `tls_key=/path` (client certificate), or [`RedisTls`] in the options; `#insecure` at the
//!   end skips certificate checks (feature `tls-insecure`, for tests only);
//! - `redis+sentinel://[user:pass@]s1:p1,s2:p2,s3:p3/<master name>[/db]` — the master a set of
//!   sentinels monitors, followed across failovers (a [`RedisBackend`]; the sentinels' own
//!   credentials as `sentinel_username` / `sentinel_password` parameters); `rediss+sentinel://`
//!   with TLS to the sentinels and the master (feature `tls`);
//! - `redis+cluster://[user:pass@]h1:p1,h2:p2,…` — a Redis Cluster through seed nodes (a
//!   [`RedisBackend`]; scripts go to the master of their keys' slot); `rediss+cluster://`
//!   with TLS to every node (feature `tls`);
//! - optional parameters on all: `prefix`, `connect_timeout_ms`, `command_timeout_ms`,
//!   `node_timeout_ms`; on one server and Sentinel `wait_replicas` and `wait_timeout_ms`
//!   ([`RedisOptions::wait_replicas`]); other parameters go to the `redis` crate unchanged.
//!
//! A wrong password or user, an untrusted server certificate, a client certificate the server
//! does not accept, or TLS spoken by one side only is `LockError::Refused`, never retried.

mod cluster;
mod heard;
mod keys;
mod late_calls;
mod link;
mod node;
mod options;
mod queue;
mod redlock;
mod sentinel;
mod shared;
mod single;
mod tls;

pub use keys::KeyScheme;
pub use options::RedisOptions;
pub use redlock::RedlockBackend;
pub use single::RedisBackend;
pub use tls::RedisTls;

use lock_core::{LockBackend, LockError};
use std::sync::Arc;

/// Connects to any URL form of the crate docs (`redis://`, `rediss://`, `redis+unix://`,
/// `redlock://`, `redlocks://`, `redis+sentinel://`, `redis+cluster://`) with default options.
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
    if let Some(backend) = connect_followed(url, &options).await {
        return Ok(Arc::new(backend?));
    }
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

/// `redis+sentinel://` and `redis+cluster://` URLs (one `RedisBackend` over the master the
/// sentinels name, or over a whole cluster); `None` for the other forms.
async fn connect_followed(
    url: &str,
    options: &RedisOptions,
) -> Option<Result<RedisBackend, LockError>> {
    let url = &*options::lowercase_scheme(url);
    if url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://") {
        Some(sentinel::connect(url, options.clone()).await)
    } else if url.starts_with("redis+cluster://") || url.starts_with("rediss+cluster://") {
        Some(cluster::connect(url, options.clone()).await)
    } else {
        None
    }
}
