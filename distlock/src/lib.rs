//! distlock: distributed locks with swappable backends.
//!
//! One contract ([`LockBackend`]) and one client ([`Locker`]) with waiting, retry, watchdog
//! renewal, a lost-lock signal and fencing tokens, over:
//!
//! | URL | backend | Cargo feature |
//! |---|---|---|
//! | `memory://` or `memory://name` | in-process table (the default) | none |
//! | `redis://host:port/db` | one Redis server | `redis` |
//! | `redlock://h1:p1,h2:p2,h3:p3/db` | Redlock over independent Redis masters | `redis` |
//! | `postgres://user:pass@host:port/db` | PostgreSQL advisory locks | `postgres` |
//! | `etcd://host:port[,host:port…]` | etcd leases | `etcd` |
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), distlock::LockError> {
//! use std::time::Duration;
//! let locker = distlock::connect("memory://").await?;
//! let guard = locker.lock("invoice:42").wait(Duration::from_secs(5)).acquire().await?;
//! // Pass the fence to the resource so it can refuse a stale holder.
//! println!("holding {} with fence {:?}", guard.key(), guard.fence());
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! Swap backends by changing the URL (and enabling the backend's feature); the code above
//! stays the same.

pub use lock_core::*;

mod config;
pub use config::{Config, ENV_VARS, default_locker, from_env, parse_duration, set_default_locker};

/// Runs an `async fn` under a distributed lock whose key is built from its arguments.
///
/// ```
/// # #[derive(Debug)] struct PaymentError;
/// # impl From<distlock::LockError> for PaymentError { fn from(_: distlock::LockError) -> Self { PaymentError } }
/// # struct Payments { locker: distlock::Locker }
/// impl Payments {
///     #[distlock::locked("payment:{order_id}", ttl = "10s", wait = "5s", locker = self.locker)]
///     async fn process_payment(&self, order_id: u64) -> Result<String, PaymentError> {
///         Ok(format!("charged order {order_id}"))
///     }
/// }
/// ```
///
/// The lock is taken before the body runs and released after it; if it is lost midway the
/// body is dropped (as [`Locker::with_lock`]). The first argument is the key: a template over
/// the function's arguments — `{order_id}`, a field `{order.id}` or `{self.tenant}`, a method
/// call `{order.id()}`; `{{`/`}}` are braces — or, instead, `key = <expression>`.
///
/// | option | value | default |
/// |---|---|---|
/// | `ttl`, `wait`, `retry_delay` | `"10s"`, `"100ms"`, `"1m30s"` (checked at compile time), or a `Duration` expression | the locker's defaults |
/// | `retries` | a count ([`LockRequest::retries`]) | the locker's default |
/// | `auto_renew` | `bool` | the locker's default |
/// | `locker` | an expression giving a `Locker` (or `&Locker`), e.g. `self.locker` | the process default: [`from_env`] or [`set_default_locker`] |
/// | `on_busy` | `error`: return `Err(E::from(LockError))`, the function returns `Result<T, E>`; `skip`: return `None`, the function returns `Option<T>` | `error` |
/// | `guard` | a name bound to the `&LockGuard` in the body, e.g. `guard = lock` then `lock.fence()` | — |
///
/// With `on_busy = skip` every failure to run the body gives `None`: a busy lock (logged at
/// debug), and also a lost lock, a backend error or no default locker (logged as a warning).
#[cfg(feature = "macros")]
pub use distlock_macros::locked;

/// Used by the code `#[locked]` generates; not part of the API.
#[doc(hidden)]
pub mod __private {
    /// `on_busy = skip` gave up: say why, quietly when the lock was merely busy.
    pub fn skipped(error: &crate::LockError) {
        if error.is_timeout() {
            tracing::debug!(%error, "lock busy; #[locked] function skipped");
        } else {
            tracing::warn!(%error, "#[locked] function skipped");
        }
    }
}

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Connects to the backend named by `url` and returns a [`Locker`] with default options.
///
/// `memory://` is this process's default in-memory table and `memory://name` a named one:
/// every `connect` to the same memory URL shares the same table, as clients of one server do.
/// A URL whose backend feature is not enabled is an [`LockError::InvalidConfig`] naming the
/// feature.
pub async fn connect(url: &str) -> Result<Locker, LockError> {
    Ok(Locker::from_arc(connect_backend(url).await?))
}

/// Like [`connect`], but returns the backend itself (to wrap it, or share it between lockers
/// with different defaults).
pub async fn connect_backend(url: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    let url = url.trim();
    // What messages show: never the password.
    let shown = lock_core::redact_url(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(LockError::InvalidConfig(format!(
            "{shown:?} is not a lock URL: expected scheme://…, e.g. memory://, redis://127.0.0.1:6379/0, \
             postgres://user@127.0.0.1/db, etcd://127.0.0.1:2379"
        )));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "memory" => memory_table(rest),
        "redis" | "rediss" | "redis+unix" | "redlock" | "redlocks" | "redis+sentinel"
        | "rediss+sentinel" | "redis+cluster" | "rediss+cluster" => redis_backend(url).await,
        "postgres" | "postgresql" => postgres_backend(url).await,
        "etcd" | "etcds" => etcd_backend(url).await,
        other => Err(LockError::InvalidConfig(format!(
            "unknown lock URL scheme {other:?} in {shown:?}: supported are memory, redis, \
             redis+unix, redlock, redis+sentinel, redis+cluster (feature `redis`; with TLS \
             rediss, redlocks, rediss+sentinel, rediss+cluster: feature `redis-tls`), postgres, \
             postgresql (feature `postgres`; TLS by sslmode: `postgres-tls`), etcd (feature \
             `etcd`; etcds: `etcd-tls`)"
        ))),
    }
}

fn memory_table(name: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    static TABLES: OnceLock<Mutex<HashMap<String, MemoryBackend>>> = OnceLock::new();
    let name = name.trim_end_matches('/');
    if name.contains(['/', '?', '#', '@']) {
        return Err(LockError::InvalidConfig(format!(
            "memory URL takes only an optional table name (memory:// or memory://name), got memory://{name}"
        )));
    }
    let tables = TABLES.get_or_init(Mutex::default);
    let mut tables = tables.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Arc::new(tables.entry(name.to_owned()).or_default().clone()))
}

#[cfg(not(all(feature = "redis", feature = "postgres", feature = "etcd")))]
fn feature_off(feature: &str, url: &str) -> LockError {
    let url = lock_core::redact_url(url);
    LockError::InvalidConfig(format!(
        "{url:?} needs the `{feature}` backend, which this build of distlock does not include: \
         enable the Cargo feature `{feature}` (e.g. `distlock = {{ features = [\"{feature}\"] }}`, \
         or `--features {feature}`)"
    ))
}

#[cfg(feature = "redis")]
async fn redis_backend(url: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    lock_redis::connect(url).await
}
#[cfg(not(feature = "redis"))]
async fn redis_backend(url: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    Err(feature_off("redis", url))
}

#[cfg(feature = "postgres")]
async fn postgres_backend(url: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    lock_postgres::connect(url).await
}
#[cfg(not(feature = "postgres"))]
async fn postgres_backend(url: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    Err(feature_off("postgres", url))
}

#[cfg(feature = "etcd")]
async fn etcd_backend(url: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    lock_etcd::connect(url).await
}
#[cfg(not(feature = "etcd"))]
async fn etcd_backend(url: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    Err(feature_off("etcd", url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_urls_share_tables_by_name() {
        let a = connect("memory://facade-test").await.unwrap();
        let b = connect("memory://facade-test").await.unwrap();
        let c = connect("memory://other-table").await.unwrap();
        let guard = a.acquire("k").await.unwrap();
        assert!(b.try_acquire("k").await.unwrap().is_none());
        let elsewhere = c.try_acquire("k").await.unwrap();
        assert!(elsewhere.is_some());
        guard.release().await.unwrap();
    }

    #[tokio::test]
    async fn bad_urls_are_typed_errors() {
        for url in ["", "localhost:6379", "ftp://x", "memory://a/b", "://"] {
            match connect(url).await {
                Err(LockError::InvalidConfig(message)) => assert!(!message.is_empty()),
                other => panic!("{url:?}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    /// No message repeats a URL's password (the CLI prints them, and the URL usually comes
    /// from `DISTLOCK_URL` precisely to keep the password out of sight).
    #[tokio::test]
    async fn errors_never_show_the_password() {
        for url in [
            "app:s3cret@127.0.0.1:6379",
            "postgress://app:s3cret@127.0.0.1/x",
            "redis://app:s3cret@127.0.0.1:1/abc",
            "redis://app:s3cret@127.0.0.1:1/0?bogus=1",
            "redlock://app:s3cret@127.0.0.1:1/0?prefix=",
            "redis+sentinel://app:s3cret@127.0.0.1:1",
            "redis+cluster://app:s3cret@",
            "postgres://app:s3cret@127.0.0.1:1/x?sslmode=bogus",
            "postgres://app@127.0.0.1:1/x?password=s3cret&sslmode=bogus",
            "etcd://app:s3cret@127.0.0.1:1/p?bogus=1",
            // Bad escapes in the password itself.
            "etcd://app:s3cr%et@127.0.0.1:1",
            "etcd://app:s3cret%FF@127.0.0.1:1",
            "etcd://app:s3cret%+1@127.0.0.1:1",
            "redis://app:s3cr%et@127.0.0.1:1/0",
            "redis://app:s3cret%FF@127.0.0.1:1/0",
            "redlock://app:s3cr%et@127.0.0.1:1/0,127.0.0.1:2/0,127.0.0.1:3/0",
            "postgres://app:s3cr%et@127.0.0.1:1/x",
            "postgres://app:s3cret%FF@127.0.0.1:1/x",
        ] {
            let message = match connect(url).await {
                Err(error) => format!("{error} / {error:?}"),
                Ok(_) => panic!("{url:?} connected"),
            };
            assert!(!message.contains("s3cret"), "{url:?}: {message}");
        }
    }

    #[cfg(not(feature = "redis"))]
    #[tokio::test]
    async fn disabled_feature_is_named() {
        let error = connect("redis://127.0.0.1:1/0").await.unwrap_err();
        assert!(error.to_string().contains("feature `redis`"), "{error}");
    }
}
