//! Release announcements on a real `redis-server`: a release publishes on the key's channel
//! only when a waiter marked the lock, and a marked release wakes the waiter at once. Also: a
//! fence counter per hash slot keeps the keyspace bounded.

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use lock_core::{LockBackend, LockKey, Locker};
use lock_harness::proxy::LinkProxy;
use lock_harness::redis::RedisServer;
use lock_redis::{KeyScheme, RedisBackend, RedisOptions, RedlockBackend};
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

fn scheme() -> Result<KeyScheme> {
    Ok(KeyScheme::new(RedisOptions::default_prefix(), 0)?)
}

async fn raw_value(server: &RedisServer, key: &LockKey) -> Result<Option<String>> {
    let mut conn = server.client()?.get_multiplexed_async_connection().await?;
    Ok(redis::cmd("GET")
        .arg(scheme()?.lock_key(key))
        .query_async(&mut conn)
        .await?)
}

/// Messages on the key's release channel, seen by a plain subscriber of our own.
async fn listen(server: &RedisServer, key: &LockKey) -> Result<redis::aio::PubSub> {
    let mut pubsub = server.client()?.get_async_pubsub().await?;
    pubsub.subscribe(scheme()?.channel(key.as_str())).await?;
    Ok(pubsub)
}

/// `try_acquire` (TTL 5 s) of a key that must be free.
async fn acquire_free(backend: &RedisBackend, key: &LockKey) -> Result<lock_core::Lease> {
    backend
        .try_acquire(key, Duration::from_secs(5))
        .await?
        .into_lease()
        .context("free key not acquired")
}

async fn message_within(pubsub: &mut redis::aio::PubSub, within: Duration) -> bool {
    timeout(within, pubsub.on_message().next())
        .await
        .ok()
        .flatten()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_without_waiters_publishes_nothing() -> Result<()> {
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let key = LockKey::new("quiet")?;
    let mut pubsub = listen(&server, &key).await?;
    for _ in 0..5 {
        let lease = acquire_free(&backend, &key).await?;
        ensure!(backend.release(&lease).await?, "release refused");
    }
    ensure!(
        !message_within(&mut pubsub, Duration::from_millis(300)).await,
        "a release nobody waited for was published"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_marks_the_holder_and_its_release_wakes_it() -> Result<()> {
    let server = RedisServer::start()?;
    let holder = Locker::new(RedisBackend::connect(&server.url()).await?);
    // The waiter's backoff cap is far above the hand-off bound checked below: only the
    // published release can wake it in time.
    let waiter = Locker::new(RedisBackend::connect(&server.url()).await?);
    let key = LockKey::new("marked")?;
    let mut pubsub = listen(&server, &key).await?;
    let guard = holder
        .lock(key.as_str())
        .ttl(Duration::from_secs(30))
        .try_acquire()
        .await?
        .context("free key not acquired")?;
    let token_only = raw_value(&server, &key)
        .await?
        .context("lock key missing")?;
    ensure!(!token_only.ends_with('+'), "marked before anyone waited");

    // A waiter with a retry count polls instead of lining up in the fair queue (as every
    // Redlock waiter does): it is the one that marks.
    let waiting = tokio::spawn({
        let (waiter, key) = (waiter.clone(), key.clone());
        async move {
            let guard = waiter
                .lock(key.as_str())
                .ttl(Duration::from_secs(30))
                .retries(3)
                // Jittered: a poll lands near the release in under 1 % of runs with 60 s.
                .backoff(lock_core::Backoff::new(
                    Duration::from_secs(60),
                    Duration::from_secs(60),
                ))
                .acquire()
                .await?;
            let acquired = Instant::now();
            guard.release().await?;
            anyhow::Ok(acquired)
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = raw_value(&server, &key)
            .await?
            .context("lock key missing")?;
        if value == format!("{token_only}+") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the waiter never marked the lock"
        );
        sleep(Duration::from_millis(10)).await;
    }
    // A renew keeps a marked lock (the mark is not a different owner).
    let renewed = holder
        .backend()
        .renew(&guard.lease(), Duration::from_secs(30))
        .await;
    ensure!(
        renewed.is_ok(),
        "renew of a marked lock failed: {renewed:?}"
    );
    let released = Instant::now();
    guard.release().await?;
    ensure!(
        message_within(&mut pubsub, Duration::from_secs(1)).await,
        "a release a waiter marked was not published"
    );
    let acquired = timeout(Duration::from_secs(3), waiting).await???;
    let hand_off = acquired.saturating_duration_since(released);
    ensure!(
        hand_off < Duration::from_millis(500),
        "the waiter took {hand_off:?} after the release (its backoff is 60 s)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_counters_stay_bounded_and_increase() -> Result<()> {
    // More lock names than hash slots: a counter per name would leave 20 000 keys behind.
    const NAMES: usize = 20_000;
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let same = LockKey::new("fenced")?;
    let mut last = 0;
    let mut names = futures::stream::iter(0..NAMES)
        .map(|i| {
            let backend = backend.clone();
            async move {
                let key = LockKey::new(format!("order:{i}"))?;
                let lease = acquire_free(&backend, &key).await?;
                ensure!(backend.release(&lease).await?, "release refused");
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64);
    let mut done = 0;
    while let Some(result) = names.next().await {
        result?;
        done += 1;
        if done % 500 == 0 {
            // Meanwhile one key's fences keep increasing although its counter is shared.
            let lease = acquire_free(&backend, &same).await?;
            let fence = lease.fence().context("no fence")?.0;
            ensure!(fence > last, "fence {fence} after {last}");
            last = fence;
            backend.release(&lease).await?;
        }
    }
    let mut conn = server.client()?.get_multiplexed_async_connection().await?;
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
    ensure!(
        keys <= 16_384,
        "{keys} keys left after {NAMES} released lock names (one counter per hash slot at most)"
    );
    let locks: Vec<String> = redis::cmd("KEYS")
        .arg("*:lock")
        .query_async(&mut conn)
        .await?;
    ensure!(locks.is_empty(), "lock keys left behind: {locks:?}");
    Ok(())
}

// Subscriptions at scale (issue #13): the backend's one pub/sub connection must carry many
// waiters' SUBSCRIBEs at once, answer a waiter of an already subscribed key without a round
// trip, and keep dispatching release messages while confirmations are outstanding. The link
// is slowed by the harness proxy, so a round trip is long against scheduling noise.

/// Median of a few `PING` round trips through `url` (the proxied link as it is now).
async fn round_trip(url: &str) -> Result<Duration> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut samples = Vec::new();
    for _ in 0..7 {
        let sent = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        samples.push(sent.elapsed());
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

/// How many subscribers the server counts on each of `keys`' release channels.
async fn subscribers(server: &RedisServer, keys: &[LockKey]) -> Result<Vec<u64>> {
    let mut conn = server.client()?.get_multiplexed_async_connection().await?;
    let mut command = redis::cmd("PUBSUB");
    command.arg("NUMSUB");
    for key in keys {
        command.arg(scheme()?.channel(key.as_str()));
    }
    let answer: Vec<(String, u64)> = command.query_async(&mut conn).await?;
    Ok(answer.into_iter().map(|(_, count)| count).collect())
}

/// `count` waiters on distinct keys subscribe at once; each one's time from its call to the
/// confirmed subscription, sorted. The subscriptions are returned so they stay live.
async fn subscribe_all(
    backend: &RedisBackend,
    keys: &[LockKey],
) -> Result<(Vec<Duration>, Vec<lock_core::Releases>)> {
    let tasks: Vec<_> = keys
        .iter()
        .map(|key| {
            let (backend, key) = (backend.clone(), key.clone());
            tokio::spawn(async move {
                let called = Instant::now();
                let releases = backend.subscribe(&key).await?;
                anyhow::Ok((called.elapsed(), releases))
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut live = Vec::new();
    for task in tasks {
        let (took, releases) = task.await??;
        times.push(took);
        live.push(releases);
    }
    times.sort();
    Ok((times, live))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_waiters_are_subscribed_within_three_round_trips() -> Result<()> {
    const WAITERS: usize = 300;
    // A link with 15 ms latency each way whose packets overlap, as a real one's do (the
    // harness TcpProxy's delay queues each chunk behind the one before: a burst of writes
    // would pay its latency several times over and measure the proxy, not the client). The
    // issue's figure was on a 4 ms link; at 15 ms the bound's two spare round trips (60 ms)
    // also absorb a loaded machine's scheduling stalls, and subscribing one at a time would
    // still take 300 round trips.
    const LATENCY: Duration = Duration::from_millis(15);
    let server = RedisServer::start()?;
    let link = LinkProxy::start(server.server_addr(), LATENCY, LATENCY)?;
    let url = format!("redis://{}/0", link.addr());
    let backend = RedisBackend::connect(&url).await?;
    // The listener connects in the background: one subscription first, so the figure below
    // is the subscriptions', not the connect's.
    drop(backend.subscribe(&LockKey::new("warm-up")?).await?);
    let rtt = round_trip(&url).await?;
    let keys = (0..WAITERS)
        .map(|i| LockKey::new(format!("many:{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let (times, live) = subscribe_all(&backend, &keys).await?;
    let (median, last) = (times[WAITERS / 2], times[WAITERS - 1]);
    eprintln!(
        "{WAITERS} subscriptions, link {LATENCY:?} each way (PING {rtt:?}): median {median:?}, max {last:?}"
    );
    let slow = times.iter().filter(|took| **took > rtt * 3).count();
    ensure!(
        slow == 0,
        "{slow} of {WAITERS} subscriptions took over 3 round trips ({:?}): median {median:?}, max {last:?}",
        rtt * 3
    );
    // Each returned because the server confirmed it, not because the wait ran out.
    let counts = subscribers(&server, &keys).await?;
    let missing = counts.iter().filter(|count| **count != 1).count();
    ensure!(
        missing == 0,
        "{missing} of {WAITERS} channels not subscribed"
    );
    drop(live);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_waiter_of_a_subscribed_key_needs_no_round_trip() -> Result<()> {
    let server = RedisServer::builder().proxy(true).start()?;
    let proxy = server.proxy().context("no proxy")?;
    let backend = RedisBackend::connect(&server.url()).await?;
    drop(backend.subscribe(&LockKey::new("warm-up")?).await?);
    // A round trip of at least 200 ms: anything that crosses the link shows.
    proxy.set_delay(Duration::from_millis(100));
    let key = LockKey::new("shared")?;
    let first = backend.subscribe(&key).await?;
    let keys = vec![key; 20];
    let started = Instant::now();
    let (times, live) = subscribe_all(&backend, &keys).await?;
    let all = started.elapsed();
    eprintln!("20 more waiters of a subscribed key (link 100 ms each way): all back in {all:?}");
    // Under one round trip (200 ms), with room for a loaded machine's scheduling.
    ensure!(
        all < Duration::from_millis(150),
        "20 more waiters of a subscribed key took {all:?} (slowest {:?}; a round trip is ≥ 200 ms)",
        times[times.len() - 1]
    );
    drop((first, live));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_is_delivered_while_other_subscriptions_are_outstanding() -> Result<()> {
    const OTHERS: usize = 300;
    // Requests to the server take 400 ms, its messages come at once: the other keys'
    // SUBSCRIBEs stay outstanding while key A's release message is already here.
    const UP: Duration = Duration::from_millis(400);
    let server = RedisServer::start()?;
    let link = LinkProxy::start(server.server_addr(), UP, Duration::ZERO)?;
    let waiter = RedisBackend::connect(&format!("redis://{}/0", link.addr())).await?;
    let holder = RedisBackend::connect(&server.direct_url()).await?;
    let a = LockKey::new("A")?;
    let mut releases = waiter.subscribe(&a).await?;
    // (Its confirmation may have taken longer than `subscribe` waits, with the connect.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while subscribers(&server, std::slice::from_ref(&a)).await? != [1] {
        ensure!(Instant::now() < deadline, "A never subscribed");
        sleep(Duration::from_millis(20)).await;
    }
    let lease = acquire_free(&holder, &a).await?;
    // The waiter's attempt marks the holder, so the release publishes.
    let attempt = waiter.try_acquire(&a, Duration::from_secs(5)).await?;
    ensure!(attempt.into_lease().is_none(), "A acquired twice");
    let value = raw_value(&server, &a).await?.context("lock key missing")?;
    ensure!(value.ends_with('+'), "the waiter did not mark the holder");

    // Wakes from before (the listener's connect wakes every waiter) are not the release's.
    while releases.next(Instant::now()).await == lock_core::Wake::Released {}
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let others: Vec<_> = (0..OTHERS)
        .map(|i| {
            let (waiter, done) = (waiter.clone(), done.clone());
            tokio::spawn(async move {
                let releases = waiter
                    .subscribe(&LockKey::new(format!("other:{i}"))?)
                    .await?;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                anyhow::Ok(releases)
            })
        })
        .collect();
    // Let the listener take the subscriptions up and send them.
    sleep(Duration::from_millis(50)).await;
    let released = Instant::now();
    ensure!(holder.release(&lease).await?, "release refused");
    let wake = releases.next(released + Duration::from_secs(3)).await;
    let took = released.elapsed();
    let confirmed = done.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "A's waiter woken {took:?} after the release; {confirmed} of {OTHERS} other subscribes had returned"
    );
    ensure!(
        wake == lock_core::Wake::Released,
        "A's waiter was not woken within 3 s"
    );
    // Behind the outstanding subscriptions it would wait for a request's 400 ms; 300 ms
    // leaves room for a loaded machine's scheduling.
    ensure!(
        took < UP - Duration::from_millis(100),
        "A's release reached its waiter after {took:?}, behind outstanding subscriptions \
         ({confirmed} of {OTHERS} other subscribes returned; requests take {UP:?}, messages arrive at once)"
    );
    ensure!(
        confirmed < OTHERS,
        "every other waiter's subscribe had returned before A's wake (nothing was outstanding)"
    );
    for other in others {
        drop(other.await??);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_waiter_leaving_unsubscribes() -> Result<()> {
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let keys = (0..50)
        .map(|i| LockKey::new(format!("leave:{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let (_, live) = subscribe_all(&backend, &keys).await?;
    ensure!(
        subscribers(&server, &keys)
            .await?
            .iter()
            .all(|count| *count == 1),
        "not every channel subscribed"
    );
    drop(live);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = subscribers(&server, &keys)
            .await?
            .iter()
            .filter(|count| **count > 0)
            .count();
        if left == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{left} channels still subscribed 3 s after their waiters left"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// A waiter of a key whose channel is confirmed returns without asking the listener (since
/// 2026-12-02: a set of confirmed keys the listener shares). The set must never answer for a
/// channel that is not, or soon will not be, subscribed: here four tasks of one backend
/// subscribe to one key and leave again, 150 times each, so the key's last waiter leaves
/// (and its UNSUBSCRIBE is decided) while others come; each time a subscribe has returned,
/// with its waiter still there, the server must count a subscriber on the channel once the
/// listener has done what it had queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_coming_and_going_keep_the_channel_subscribed() -> Result<()> {
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(&server.url()).await?;
    let key = LockKey::new("come-and-go")?;
    let channel = scheme()?.channel(key.as_str());
    let mut tasks = Vec::new();
    for task in 0..4 {
        let (backend, key, channel) = (backend.clone(), key.clone(), channel.clone());
        let mut conn = server.client()?.get_multiplexed_async_connection().await?;
        tasks.push(tokio::spawn(async move {
            for round in 0..150 {
                let waiter = backend.subscribe(&key).await?;
                // Whatever the listener had queued (another waiter's leaving) is done by now.
                sleep(Duration::from_millis(3)).await;
                let counted: Vec<(String, u64)> = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(&channel)
                    .query_async(&mut conn)
                    .await?;
                ensure!(
                    counted.first().map(|(_, count)| *count) == Some(1),
                    "task {task}, round {round}: a waiter's subscribe returned, but the server counts {counted:?}"
                );
                drop(waiter);
                if round % 2 == task % 2 {
                    tokio::task::yield_now().await;
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Redlock runs a release on every node and each node announces it: the copies must count as
/// one release, which wakes one of this process's two waiters of the key, not one per node
/// (#13: a release wakes one local waiter per key). Before, the three copies woke both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_release_heard_from_every_node_wakes_one_waiter() -> Result<()> {
    let servers = (0..3)
        .map(|_| RedisServer::start())
        .collect::<Result<Vec<_>>>()?;
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let holder = RedlockBackend::connect_nodes(&urls, RedisOptions::default()).await?;
    let waiter = RedlockBackend::connect_nodes(&urls, RedisOptions::default()).await?;
    let key = LockKey::new("redlock-one-wake")?;
    let ttl = Duration::from_secs(30);
    let lease = holder
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("free key not acquired")?;
    let mut turns = Vec::new();
    for _ in 0..2 {
        let mut releases = waiter.subscribe(&key).await?;
        releases.take_turns();
        // Held: marks the holder's value on every node, so that its release announces.
        ensure!(
            waiter.try_acquire(&key, ttl).await?.into_lease().is_none(),
            "the key was free"
        );
        turns.push(releases);
    }
    // Wake-ups from subscribing (a listener that came up) are not the release's.
    sleep(Duration::from_millis(300)).await;
    for releases in &mut turns {
        while releases
            .next(Instant::now() + Duration::from_millis(1))
            .await
            == lock_core::Wake::Released
        {}
    }
    ensure!(holder.release(&lease).await?, "release answered false");
    let (first, second) = turns.split_at_mut(1);
    let (a, b) = tokio::join!(
        first[0].next(Instant::now() + Duration::from_millis(500)),
        second[0].next(Instant::now() + Duration::from_millis(500)),
    );
    let woken = [a, b]
        .iter()
        .filter(|wake| **wake == lock_core::Wake::Released)
        .count();
    ensure!(
        woken == 1,
        "one release (announced by 3 nodes) woke {woken} of 2 waiters: {a:?}, {b:?}"
    );
    Ok(())
}
