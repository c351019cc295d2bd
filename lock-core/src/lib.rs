//! The distlock contract and client.
//!
//! - [`LockBackend`]: what a lock store must do — one non-blocking attempt, renew, release
//!   (both compare-and-act on an owner token), and optionally a release signal or a fair queue.
//! - [`Locker`]: the client every backend shares — waiting with backoff and release signals,
//!   a watchdog that renews at TTL/3, a lost-lock signal that fires before the lease's
//!   validity deadline, fencing tokens, and cancel-safe acquisition.
//! - [`MemoryBackend`]: an in-process backend, the embedded default (and the reference
//!   implementation of semaphores and reader-writer locks).
//! - Beyond a mutex: [`Locker::semaphore`] (at most N holders), [`Locker::rwlock`] (readers
//!   or one writer, writers not starved), [`Locker::lock_all`] (several keys, all or nothing),
//!   retries by count, and metrics through the `metrics` facade.
//!
//! ```
//! # async fn demo() -> Result<(), lock_core::LockError> {
//! use lock_core::{Locker, MemoryBackend};
//! use std::time::Duration;
//!
//! let locker = Locker::new(MemoryBackend::new());
//! let guard = locker.lock("ledger:42").wait(Duration::from_secs(5)).acquire().await?;
//! println!("fence {:?}", guard.fence());
//! guard.release().await?;
//! # Ok(()) }
//! ```

mod backend;
mod client;
mod detached;
mod error;
mod guard;
mod key;
mod lease;
mod memory;
mod multi;
mod releases;
mod retry;
mod suspend;
mod telemetry;
mod watchdog;

pub use backend::{Attempt, Capabilities, LockBackend, RwMode, WRITER_INTENT};
pub use client::{LockOptions, LockRequest, Locker, RwLockName};
pub use detached::{background_runtime, spawn_background, spawn_resident};
pub use error::{BoxError, LockError, RefusalKind, looks_like_pem, pem_problem, redact_url};
pub use guard::LockGuard;
pub use key::{LockKey, MAX_KEY_LEN};
pub use lease::{
    FencingToken, Lease, LeaseKind, MAX_TTL, OwnerToken, check_usable_ttl, drift, timeout_problem,
    validate_ttl,
};
pub use memory::{MemoryBackend, check_permits, limit_mismatch};
pub use multi::{MultiGuard, MultiLockRequest};
pub use releases::{ReleaseHub, Releases, Wake};
pub use retry::{Backoff, Delays};
#[doc(hidden)]
pub use suspend::simulate_suspension;
pub use watchdog::lost_margin;

pub use async_trait::async_trait;
