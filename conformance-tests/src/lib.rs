//! The conformance suite every distlock backend runs.
//!
//! A backend crate implements [`BackendFactory`] (fresh backend instances on one server, and
//! optionally an independent look at whether a key is held) and stamps out one test per case:
//!
//! ```ignore
//! conformance_tests::conformance_suite! {
//!     factory = async { MyFactory::start().await },
//!     skip = { fencing_tokens_increase: "this backend has no fencing tokens" },
//! }
//! ```
//!
//! Each case is an `async fn(&dyn BackendFactory) -> anyhow::Result<()>` in [`cases`], so other
//! harnesses can call them too. A case a backend cannot support is listed under `skip` with a
//! reason: it is reported as ignored with that reason, never as passed. A case that finds a
//! capability missing without being listed fails and says so.

pub mod cases;
pub mod faulty;
pub mod load;
mod suite_macro;

pub use faulty::{Fault, FaultPlan, FaultyBackend};

use async_trait::async_trait;
use lock_core::{LockBackend, LockKey};
use std::sync::Arc;

/// Makes backends for the suite, all on the same server (or shared state).
#[async_trait]
pub trait BackendFactory: Send + Sync + 'static {
    /// A short name for messages (`memory`, `redis`, `redlock-3`).
    fn name(&self) -> String;

    /// A new backend instance with its own connections, on the same server as every other
    /// instance from this factory: two instances contend like two processes would.
    async fn backend(&self) -> anyhow::Result<Arc<dyn LockBackend>>;

    /// Whether `key` is held, read on the server independently of any backend instance's
    /// local state. `Ok(None)` when the factory cannot tell.
    async fn is_held(&self, key: &LockKey) -> anyhow::Result<Option<bool>> {
        let _ = key;
        Ok(None)
    }

    /// How many clients hold or wait in line for `key` on the server (the holder and the
    /// entries of the backend's fair queue), read on the server. `Ok(None)` when the factory
    /// cannot tell: the fair-queue case then gives each waiter a fixed time to get in line.
    async fn contenders(&self, key: &LockKey) -> anyhow::Result<Option<usize>> {
        let _ = key;
        Ok(None)
    }

    /// Hooks that break the server or the connection on purpose, when the factory has them.
    /// Cases that need them fail unless the backend lists them under `skip`.
    fn faults(&self) -> Option<&dyn ServerFaults> {
        None
    }
}

/// Breaks the lock service on purpose. "The server" is the whole lock service behind the
/// factory: every node of a Redlock or etcd cluster.
#[async_trait]
pub trait ServerFaults: Send + Sync {
    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    async fn pause(&self) -> anyhow::Result<()>;
    /// Resumes a paused server (SIGCONT).
    async fn resume(&self) -> anyhow::Result<()>;
    /// Closes the connections of backends made by the factory and refuses new ones (the
    /// factory's backends connect through a proxy; `is_held` does not).
    async fn cut(&self) -> anyhow::Result<()>;
    /// Stops forwarding on the factory's connections without closing them (a silent
    /// partition).
    async fn blackhole(&self) -> anyhow::Result<()>;
    /// Undoes `cut` or `blackhole`.
    async fn heal(&self) -> anyhow::Result<()>;
    /// Makes every connection open now silent for good (nothing forwarded, nothing closed),
    /// while new connections work once healed: a NAT or firewall that lost its flow state.
    async fn forget_connections(&self) -> anyhow::Result<()>;
    /// Crashes the server (killed, no clean shutdown) and starts it again on the same address
    /// with whatever it had made durable; returns once it serves again. The default says the
    /// factory cannot: a case that needs it then fails unless the backend lists it under
    /// `skip`.
    async fn restart(&self) -> anyhow::Result<()> {
        anyhow::bail!(
            "this factory cannot restart its server: implement ServerFaults::restart, or list the case under skip with the reason"
        )
    }
    /// Holds back every answer on the factory's connections by `delay` (requests still go
    /// out at once): a slow return path. `Duration::ZERO` undoes it. The default says the
    /// factory cannot, as for [`Self::restart`].
    async fn delay_answers(&self, delay: std::time::Duration) -> anyhow::Result<()> {
        let _ = delay;
        anyhow::bail!(
            "this factory cannot delay answers: implement ServerFaults::delay_answers, or list the case under skip with the reason"
        )
    }
}

/// A fresh key name for one case, so cases on a shared server never meet.
pub fn unique_key(case: &str) -> String {
    format!("{case}-{:016x}", rand::random::<u64>())
}

/// With `RUST_LOG` set (`RUST_LOG=lock_core=trace,…`), sends traces to the test's output, so
/// a failing test shows what the backend did. Without it, installs nothing. Safe to call from
/// every test: only the first call installs a subscriber.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Runs one case against the factory produced by `factory`, panicking with a readable report
/// on failure (the `conformance_suite!` tests call this).
pub async fn run_case<F, Fut, C, CFut>(case_name: &str, factory: Fut, case: C)
where
    F: BackendFactory,
    Fut: std::future::Future<Output = anyhow::Result<F>>,
    C: FnOnce(Arc<dyn BackendFactory>) -> CFut,
    CFut: std::future::Future<Output = anyhow::Result<()>>,
{
    init_tracing();
    let factory: Arc<dyn BackendFactory> = match factory.await {
        Ok(factory) => Arc::new(factory),
        Err(error) => panic!("{case_name}: could not set up the backend factory: {error:?}"),
    };
    let name = factory.name();
    if let Err(error) = case(factory).await {
        panic!("conformance case `{case_name}` failed on backend `{name}`: {error:?}");
    }
}

/// Stamps out one `#[tokio::test]` per conformance case.
///
/// `factory` is an expression evaluating to a future of `anyhow::Result<impl BackendFactory>`;
/// it is evaluated once per test. Cases named under `skip` become `#[ignore = "reason"]` tests,
/// shown as ignored with their reason in the test report.
#[macro_export]
macro_rules! conformance_suite {
    (factory = $factory:expr $(, skip = { $($skip:ident : $reason:literal),* $(,)? })? $(,)?) => {
        $(
            $( const _: () = { let _ = $crate::cases::$skip; }; )*
        )?
        $crate::__conformance_cases!(@emit [$factory] [$($($skip : $reason),*)?]);
    };
}
