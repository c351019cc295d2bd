//! `cargo bench -p conformance-tests --bench held`: 10,000 locks held with auto-renew on the
//! memory backend (no server, no floor): what the client alone costs. The engines' figures
//! come from `cargo bench -p lock-redis --bench held` (and lock-postgres, lock-etcd).

use anyhow::Result;
use conformance_tests::load::{HeldLoad, hold_many, print_header, print_row};
use lock_core::{Locker, MemoryBackend};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if std::env::args().any(|arg| arg == "--list") {
        return Ok(());
    }
    let load = HeldLoad::from_env()?;
    print_header(load);
    let figures = hold_many(&Locker::new(MemoryBackend::new()), load).await?;
    print_row("memory", load, figures, None);
    Ok(())
}
