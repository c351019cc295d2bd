//! The conformance cases, one module per theme. Each case takes a [`crate::BackendFactory`]
//! and fails with a message saying what the backend did wrong. Every case uses fresh keys, so
//! cases may share one server.

mod support;

pub mod exclusion;
pub mod expiry;
pub mod faults;
pub mod fencing;
pub mod input;
pub mod loss;
pub mod rwlock;
pub mod semaphore;
pub mod waiting;

pub use exclusion::*;
pub use expiry::*;
pub use faults::*;
pub use fencing::*;
pub use input::*;
pub use loss::*;
pub use rwlock::*;
pub use semaphore::*;
pub use waiting::*;
