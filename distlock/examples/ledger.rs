//! Transfers between ledger accounts with `lock_all`: each transfer locks both accounts at
//! once (in whatever order the caller names them, without deadlock), and passes each account's
//! fencing token to the store, which refuses a write older than one it has seen.
//!
//! Runs on the in-memory backend by default; `DISTLOCK_URL=redis://127.0.0.1:6379/0` (with
//! `--features redis`) runs it on a real server.

use anyhow::{Context, bail};
use distlock::FencingToken;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WORKERS: usize = 8;
const TRANSFERS: usize = 25;
const ACCOUNTS: usize = 5;
const OPENING_BALANCE: i64 = 1_000;

/// The account store: a balance and the highest fence that wrote it, per account. A write
/// carrying a lower fence than one already seen is from a holder whose lock expired meanwhile:
/// it is refused, which is what makes a paused holder harmless.
#[derive(Default)]
struct Store {
    accounts: Mutex<HashMap<String, (i64, Option<FencingToken>)>>,
    refused: Mutex<u64>,
}

impl Store {
    fn balance(&self, account: &str) -> i64 {
        self.accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(account)
            .map_or(OPENING_BALANCE, |(balance, _)| *balance)
    }

    /// Writes `balance` if `fence` is not older than the account's last writer.
    fn write(&self, account: &str, balance: i64, fence: Option<FencingToken>) -> bool {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let entry = accounts
            .entry(account.to_owned())
            .or_insert((OPENING_BALANCE, None));
        if let (Some(seen), Some(fence)) = (entry.1, fence)
            && fence < seen
        {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            return false;
        }
        *entry = (balance, fence.or(entry.1));
        true
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = distlock::Config::from_env()?;
    println!(
        "ledger example on {}: {WORKERS} workers x {TRANSFERS} transfers over {ACCOUNTS} accounts",
        config.url
    );
    let run = format!("ledger-example-{}", std::process::id());
    let accounts: Vec<String> = (0..ACCOUNTS)
        .map(|n| format!("{run}:account:{n}"))
        .collect();
    let store = Arc::new(Store::default());
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let locker = config.connect().await.context("connecting")?;
        let (store, accounts) = (store.clone(), accounts.clone());
        workers.push(tokio::spawn(async move {
            for transfer in 0..TRANSFERS {
                // From and to in both orders across workers: lock_all sorts them.
                let from = &accounts[(worker + transfer) % ACCOUNTS];
                let to = &accounts[(worker * 2 + transfer + 1) % ACCOUNTS];
                if from == to {
                    continue;
                }
                let amount = (worker + transfer) as i64 % 7 + 1;
                locker
                    .lock_all([to.clone(), from.clone()])
                    .ttl(Duration::from_secs(10))
                    .wait(Duration::from_secs(30))
                    .run_with(async |both| {
                        // Read, pause, write: only the locks keep these from losing money.
                        let (from_balance, to_balance) = (store.balance(from), store.balance(to));
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let written = store.write(from, from_balance - amount, both.fence_of(from))
                            && store.write(to, to_balance + amount, both.fence_of(to));
                        anyhow::ensure!(written, "the store refused a write from a live holder");
                        anyhow::Ok(())
                    })
                    .await??;
            }
            anyhow::Ok(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    let balances: Vec<i64> = accounts.iter().map(|a| store.balance(a)).collect();
    let total: i64 = balances.iter().sum();
    let expected = OPENING_BALANCE * ACCOUNTS as i64;
    let refused = *store.refused.lock().unwrap_or_else(|p| p.into_inner());
    println!(
        "balances {balances:?}: total {total}, expected {expected}; stale writes refused: {refused}"
    );
    if total != expected {
        bail!("money created or destroyed: the locks did not exclude concurrent transfers");
    }
    println!("OK: the ledger balances");
    Ok(())
}
