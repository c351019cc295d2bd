//! A payment service whose method carries `#[distlock::locked]`: eight concurrent callers
//! (as eight pods would) process the same orders, and no order is ever charged twice.
//!
//! Runs on the in-memory backend by default; `DISTLOCK_URL=redis://127.0.0.1:6379/0` (with
//! `--features redis`) runs it on a real server. The lock defaults come from the environment
//! too (`DISTLOCK_TTL`, `DISTLOCK_WAIT`, … — see `distlock::Config`).

use anyhow::{Context, bail};
use distlock::{LockError, Locker};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CALLERS: usize = 8;
const ORDERS: u64 = 20;

/// The payment provider: charges whatever it is asked to (so charging twice is the bug).
#[derive(Default)]
struct Provider {
    charges: Mutex<HashMap<u64, u32>>,
}

/// What the service stores: orders already paid.
#[derive(Default)]
struct Store {
    paid: Mutex<HashMap<u64, u64>>,
}

#[derive(Debug)]
enum PaymentError {
    /// The order's lock could not be had (busy past the wait, lost, or the server failed).
    Lock(LockError),
}

impl std::fmt::Display for PaymentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PaymentError::Lock(error) => write!(f, "payment not processed: {error}"),
        }
    }
}

impl From<LockError> for PaymentError {
    fn from(error: LockError) -> Self {
        PaymentError::Lock(error)
    }
}

#[derive(Debug, PartialEq)]
enum Receipt {
    Charged { fence: Option<u64> },
    AlreadyPaid,
}

struct PaymentService {
    locker: Locker,
    store: Arc<Store>,
    provider: Arc<Provider>,
    run: String,
}

impl PaymentService {
    /// Check, charge, record: only the lock keeps two callers from both seeing "unpaid".
    #[distlock::locked("{self.run}:payment:{order_id}", ttl = "10s", wait = "30s", locker = self.locker, guard = lock)]
    async fn process_payment(&self, order_id: u64) -> Result<Receipt, PaymentError> {
        if self
            .store
            .paid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&order_id)
        {
            return Ok(Receipt::AlreadyPaid);
        }
        // The provider call takes a while: the window in which a second caller would charge
        // again without the lock.
        tokio::time::sleep(Duration::from_millis(3)).await;
        *self
            .provider
            .charges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(order_id)
            .or_default() += 1;
        let fence = lock.fence().map(|f| f.0);
        self.store
            .paid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(order_id, fence.unwrap_or(0));
        Ok(Receipt::Charged { fence })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = distlock::Config::from_env()?;
    println!(
        "payment example on {}: {CALLERS} callers x {ORDERS} orders",
        config.url
    );
    let run = format!("payment-example-{}", std::process::id());
    let (store, provider) = (Arc::new(Store::default()), Arc::new(Provider::default()));
    let mut callers = Vec::new();
    for caller in 0..CALLERS {
        // Each caller connects on its own, as separate pods would.
        let service = PaymentService {
            locker: config.connect().await.context("connecting")?,
            store: store.clone(),
            provider: provider.clone(),
            run: run.clone(),
        };
        callers.push(tokio::spawn(async move {
            let mut charged = 0;
            for order_id in 0..ORDERS {
                // Callers walk the orders from different starting points.
                let order_id = (order_id + caller as u64 * 3) % ORDERS;
                match service.process_payment(order_id).await {
                    Ok(Receipt::Charged { .. }) => charged += 1,
                    Ok(Receipt::AlreadyPaid) => {}
                    Err(error) => return Err(anyhow::anyhow!("order {order_id}: {error}")),
                }
            }
            anyhow::Ok(charged)
        }));
    }
    let mut charged_by_callers = 0;
    for caller in callers {
        charged_by_callers += caller.await??;
    }
    let charges = provider
        .charges
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let twice: Vec<_> = charges.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "orders charged: {} of {ORDERS}, charges made: {}, by the callers' count: {charged_by_callers}",
        charges.len(),
        charges.values().sum::<u32>()
    );
    if !twice.is_empty() {
        bail!("orders charged more than once: {twice:?}");
    }
    if charges.len() as u64 != ORDERS || charged_by_callers != ORDERS {
        bail!("not every order was charged exactly once");
    }
    println!("OK: every order charged exactly once");
    Ok(())
}
