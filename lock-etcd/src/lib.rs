//! distlock backend for etcd (v3 API, etcd ≥ 3.4): a lease per lock, a fair FIFO queue per key
//! ordered by create revision, fencing tokens = create revision, and watch wake-ups in which
//! each waiter watches only its predecessor. Semaphores and reader-writer locks keep holder
//! keys on per-holder leases, each decision one txn (see the crate README).
//!
//! ```no_run
//! # async fn demo() -> Result<(), lock_core::LockError> {
//! use lock_core::Locker;
//! use std::time::Duration;
//!
//! let backend = lock_etcd::connect("etcd://127.0.0.1:2379/myapp").await?;
//! let locker = Locker::from_arc(backend);
//! let guard = locker.lock("ledger:42").wait(Duration::from_secs(5)).acquire().await?;
//! println!("fence {:?}", guard.fence());
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! See [`EtcdBackend`] for the protocol and [`Capabilities`](lock_core::Capabilities) for
//! what it promises (TTLs of at least 2 s in whole seconds, ~0.7 s expiry slack).

mod backend;
mod config;
mod connection;
mod driver;
mod keys;
mod renewer;
mod security;
mod watch;

pub use backend::{EXPIRY_SLACK, EtcdBackend, MIN_TTL};
pub use config::{Credentials, DEFAULT_PREFIX, EtcdConfig, EtcdTls};
pub use keys::{key_range, sync_range};

use lock_core::{LockBackend, LockError};
use std::sync::{Arc, Mutex, MutexGuard};

/// Connects to `etcd[s]://[user:password@]host:port[,host:port…][/prefix][?options]` (see
/// [`EtcdConfig::from_url`]; `etcds://` needs the crate feature `tls`).
///
/// A malformed URL is `LockError::InvalidConfig`; wrong credentials, a prefix the user may
/// not use, a certificate not accepted by either side, or TLS spoken by one side only is a
/// `LockError::Refused` (never retryable); a cluster that does not answer within the connect
/// timeout (3 s) is a retryable `LockError::Backend`.
pub async fn connect(url: &str) -> Result<Arc<dyn LockBackend>, LockError> {
    let config = EtcdConfig::from_url(url)?;
    Ok(Arc::new(EtcdBackend::connect(config).await?))
}

/// Locks a mutex whose data stays valid even if a holder panicked.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
