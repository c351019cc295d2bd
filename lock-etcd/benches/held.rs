//! `cargo bench -p lock-etcd --bench held`: 10,000 locks held with auto-renew on a
//! single-node etcd started here, the process's CPU share and memory per lock, beside the
//! floor from the same run: etcd-client alone keeping one lease per lock alive at the same
//! rate, each keep-alive on one of 16 long-lived streams (what etcd's own clients do: a
//! lease per lock, keep-alives multiplexed). See `conformance_tests::load`.

use anyhow::{Context, Result};
use conformance_tests::load::{
    HeldLoad, hold_many, paced_cpu_share, patterns, print_header, print_row,
};
use lock_harness::etcd::EtcdCluster;
use std::sync::Arc;
use tokio::sync::Mutex;

const STREAMS: usize = 16;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if std::env::args().any(|arg| arg == "--list") {
        return Ok(());
    }
    let load = HeldLoad::from_env()?;
    let cluster = EtcdCluster::single().await?;
    print_header(load);
    let client = cluster.client().await?;
    let mut lease_client = client.lease_client();
    for pattern in patterns() {
        let load = load.with_pattern(pattern);
        let locker = lock_core::Locker::from_arc(lock_etcd::connect(&cluster.url(None)).await?);
        let figures = hold_many(&locker, load).await?;
        drop(locker);
        // Granted just before the floor runs: they would expire while distlock's locks are
        // held.
        let mut leases = Vec::with_capacity(load.locks);
        let ttl = load.ttl.as_secs() as i64;
        while leases.len() < load.locks {
            match lease_client.grant(ttl, None).await {
                Ok(granted) => leases.push(granted.id()),
                // etcd sheds load ("too many requests") while it applies the revocations of
                // the locks just released.
                Err(error) if error.to_string().contains("too many requests") => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
        let mut streams = Vec::with_capacity(STREAMS);
        for lease in leases.iter().take(STREAMS) {
            streams.push(Arc::new(Mutex::new(lease_client.keep_alive(*lease).await?)));
        }
        let (leases, streams) = (&leases, &streams);
        let floor = paced_cpu_share(load, |index| async move {
            let stream = &streams[index % STREAMS];
            let mut stream = stream.lock().await;
            let (keeper, answers) = &mut *stream;
            keeper.id = leases[index];
            keeper.keep_alive().await?;
            let answer = answers
                .message()
                .await?
                .context("keep-alive stream ended")?;
            anyhow::ensure!(answer.ttl() > 0, "lease {} expired", leases[index]);
            Ok(())
        })
        .await?;
        print_row("etcd", load, figures, Some(floor));
    }
    Ok(())
}
