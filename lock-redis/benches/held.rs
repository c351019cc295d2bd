//! `cargo bench -p lock-redis --bench held`: 10,000 locks held with auto-renew on one local
//! redis-server (started here), the process's CPU share and memory per lock, beside the floor
//! from the same run: redis-rs alone running the same renewals (compare the token, `PEXPIRE`)
//! at the same rate on one multiplexed connection. See `conformance_tests::load`.

use anyhow::Result;
use conformance_tests::load::{
    HeldLoad, hold_many, paced_cpu_share, patterns, print_header, print_row,
};
use lock_harness::redis::RedisServer;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if std::env::args().any(|arg| arg == "--list") {
        return Ok(());
    }
    let load = HeldLoad::from_env()?;
    let server = RedisServer::start()?;
    print_header(load);
    let mut conn = server.client()?.get_multiplexed_async_connection().await?;
    let ttl_ms = load.ttl.as_millis() as u64;
    let renew = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
         return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
    );
    for pattern in patterns() {
        let load = load.with_pattern(pattern);
        let locker = lock_core::Locker::from_arc(lock_redis::connect(&server.url()).await?);
        let figures = hold_many(&locker, load).await?;
        drop(locker);
        // Set just before the floor runs: they would expire while distlock's locks are held.
        for index in 0..load.locks {
            let () = redis::cmd("SET")
                .arg(format!("raw-{index}"))
                .arg("token")
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut conn)
                .await?;
        }
        let floor = paced_cpu_share(load, |index| {
            let (mut conn, renew) = (conn.clone(), renew.clone());
            async move {
                let renewed: i64 = renew
                    .key(format!("raw-{index}"))
                    .arg("token")
                    .arg(ttl_ms)
                    .invoke_async(&mut conn)
                    .await?;
                anyhow::ensure!(renewed == 1, "raw renewal of raw-{index} refused");
                Ok(())
            }
        })
        .await?;
        print_row("redis", load, figures, Some(floor));
    }
    Ok(())
}
