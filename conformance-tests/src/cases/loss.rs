//! Loss: the holder hears of a lost lock before anyone else can be granted it.

use super::support::*;
use crate::{BackendFactory, Fault, unique_key};
use anyhow::{Context, Result, bail, ensure};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

async fn lost_fires_before_deadline(factory: &dyn BackendFactory, fault: Fault) -> Result<()> {
    let (locker, plan) = faulty_locker(factory).await?;
    let caps = locker.backend().capabilities();
    let ttl = ttl_for(&caps, Duration::from_millis(1500));
    let guard = locker.lock(unique_key("lost")).ttl(ttl).acquire().await?;
    // Let at least one renewal succeed first.
    let deadline = Instant::now() + ttl;
    while plan.renew_calls() == 0 {
        ensure!(
            Instant::now() < deadline,
            "the watchdog never renewed within one TTL"
        );
        sleep(10 * MS).await;
    }
    sleep(20 * MS).await;
    ensure!(!guard.is_lost(), "lost before any fault");
    plan.renew(fault);
    let injected = Instant::now();
    let lost = guard.lost();
    timeout(ttl + Duration::from_secs(1), lost)
        .await
        .with_context(|| format!("lost() never fired with renew fault {fault:?}"))?;
    let fired = Instant::now();
    let valid_until = guard.valid_until();
    ensure!(
        fired < valid_until,
        "lost() fired {:?} after the validity deadline",
        fired - valid_until
    );
    ensure!(guard.is_lost(), "is_lost() false after lost() fired");
    if fault == Fault::Lost {
        ensure!(
            fired - injected <= ttl / 3 + Duration::from_millis(200),
            "a Lost answer took {:?} to fire the signal",
            fired - injected
        );
    }
    plan.renew(Fault::None);
    drop(guard);
    Ok(())
}

/// 13a. Renew failures (errors) fire `lost()` before the validity deadline.
pub async fn lost_fires_on_renew_failure(factory: &dyn BackendFactory) -> Result<()> {
    lost_fires_before_deadline(factory, Fault::Fail).await
}

/// 13b. Renew calls that hang fire `lost()` before the validity deadline.
pub async fn lost_fires_on_renew_hang(factory: &dyn BackendFactory) -> Result<()> {
    lost_fires_before_deadline(factory, Fault::Hang).await
}

/// 13c. A `Lost` answer to renew fires `lost()` at once.
pub async fn lost_fires_on_lost_answer(factory: &dyn BackendFactory) -> Result<()> {
    lost_fires_before_deadline(factory, Fault::Lost).await
}

/// 13d. `with_lock` returns `Err(Lost)` when the lock is lost midway, and drops the work.
pub async fn with_lock_drops_work_on_loss(factory: &dyn BackendFactory) -> Result<()> {
    let (locker, plan) = faulty_locker(factory).await?;
    let caps = locker.backend().capabilities();
    let ttl = ttl_for(&caps, Duration::from_millis(1500));
    // Happy path first: the value comes back and the key is free afterwards.
    let name = unique_key("with-lock");
    let value = locker.lock(&name).ttl(ttl).run(async { 42 }).await?;
    ensure!(value == 42, "with_lock returned the wrong value");
    let free = locker
        .try_acquire(&name)
        .await?
        .context("with_lock left the key held")?;
    free.release().await?;

    let dropped = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let work = {
        let dropped = SetOnDrop(dropped.clone());
        let finished = finished.clone();
        async move {
            let _dropped = dropped;
            sleep(Duration::from_secs(60)).await;
            finished.store(true, Ordering::SeqCst);
        }
    };
    let injector = {
        let plan = plan.clone();
        tokio::spawn(async move {
            sleep(Duration::from_millis(100)).await;
            plan.renew(Fault::Lost);
        })
    };
    let started = Instant::now();
    let outcome = timeout(
        ttl * 2 + Duration::from_secs(1),
        locker.lock(&name).ttl(ttl).run(work),
    )
    .await
    .context("with_lock kept running after the lock was lost")?;
    injector.await?;
    match outcome {
        Err(error) if error.is_lost() => {}
        Ok(()) => bail!("with_lock completed although the lock was lost"),
        Err(error) => bail!("with_lock: expected Lost, got {error}"),
    }
    ensure!(
        dropped.load(Ordering::SeqCst),
        "with_lock returned but the work future was not dropped"
    );
    ensure!(!finished.load(Ordering::SeqCst), "the work ran to the end");
    ensure!(
        started.elapsed() < ttl,
        "loss noticed only after {:?}",
        started.elapsed()
    );
    Ok(())
}

/// A renewal's lease counts from when the renewal was sent, not from its answer: a renewal
/// answered late (a slow return path) extends the lock on the server from the moment the
/// server ran it, so a lease counted from the answer would outlive the server's by the delay,
/// and its holder would act while another client holds the key. The watchdog takes the
/// lease a backend returns as it is, so each backend proves it here.
pub async fn late_renewal_counts_from_its_sending(factory: &dyn BackendFactory) -> Result<()> {
    let faults = faults_of(factory, "late_renewal_counts_from_its_sending")?;
    let backend = factory.backend().await?;
    let caps = backend.capabilities();
    let ttl = ttl_for(&caps, 2000 * MS);
    // Shorter than any backend's own silence bounds (a heartbeat probe, a request timeout),
    // long beside a lease's clock-drift allowance.
    let delay = 200 * MS;
    let key = lock_core::LockKey::new(unique_key("late-renew"))?;
    let lease = backend
        .try_acquire(&key, ttl)
        .await?
        .into_lease()
        .context("a fresh key was not free")?;
    faults.delay_answers(delay).await?;
    let sent = Instant::now();
    let renewed = backend.renew(&lease, ttl).await;
    let answered = Instant::now();
    faults.delay_answers(Duration::ZERO).await?;
    let renewed = renewed.context("the renewal with delayed answers failed")?;
    ensure!(
        answered >= sent + delay,
        "the premise: the answer came back {:?} after the renewal was sent",
        answered - sent
    );
    // The backend's own work before it sends the request may take a little; a lease counted
    // from the answer would be a whole delay later.
    let latest = sent + renewed.ttl() + delay / 4;
    ensure!(
        renewed.valid_until() <= latest,
        "a renewal answered {:?} after it was sent counts its lease until {:?} after the \
         sending, past the {:?} the server gives it",
        answered - sent,
        renewed.valid_until().saturating_duration_since(sent),
        renewed.ttl()
    );
    backend.release(&renewed).await?;
    Ok(())
}

/// 13e. A grant whose answer arrives after the lease's validity deadline (a slow link, a
///      paused client) is never handed out: `try_acquire` does not return it, `with_lock`
///      never runs its work on it while another client holds the key, and the stale grant
///      does not keep the key held.
pub async fn late_grant_is_never_handed_out(factory: &dyn BackendFactory) -> Result<()> {
    let (slow, plan) = faulty_locker(factory).await?;
    let other = locker(factory).await?;
    let caps = slow.backend().capabilities();
    let ttl = ttl_for(&caps, 300 * MS);
    // The answer comes back after the lease expired on the server (and locally).
    let late = ttl + caps.expiry_slack + 300 * MS;
    let name = unique_key("late");
    plan.acquire(Fault::DelayAnswer(late));

    // One attempt answered late: no guard.
    let started = Instant::now();
    match slow.lock(&name).ttl(ttl).try_acquire().await {
        Ok(Some(guard)) => bail!(
            "a grant answered {:?} after it was asked for (TTL {ttl:?}) was handed out: \
             {:?} of validity left, is_lost() {}",
            started.elapsed(),
            guard
                .valid_until()
                .saturating_duration_since(Instant::now()),
            guard.is_lost()
        ),
        Ok(None) => {}
        Err(error) if error.is_retryable() => {}
        Err(error) => bail!("a late grant gave a non-retryable error: {error}"),
    }
    // The refused grant does not keep the key: another client gets it.
    let guard = other
        .lock(&name)
        .ttl(ttl)
        .wait(ttl + caps.expiry_slack + Duration::from_secs(2))
        .acquire()
        .await
        .context("the key stayed held after a late grant was refused")?;
    guard.release().await?;

    // with_lock, while a contender takes the key during the slow answer's way back.
    let other_holds = Arc::new(AtomicBool::new(false));
    let ran_while_other_held = Arc::new(AtomicBool::new(false));
    let contender = {
        let (other, name, other_holds) = (other.clone(), name.clone(), other_holds.clone());
        tokio::spawn(async move {
            // After the slow client's attempt has reached the server.
            sleep(20 * MS).await;
            let guard = other.lock(&name).ttl(ttl).wait(late * 3).acquire().await?;
            other_holds.store(true, Ordering::SeqCst);
            // Past the slow client's whole wait.
            sleep(late * 2 + 500 * MS).await;
            other_holds.store(false, Ordering::SeqCst);
            guard.release().await?;
            anyhow::Ok(())
        })
    };
    let work = {
        let (other_holds, ran) = (other_holds.clone(), ran_while_other_held.clone());
        async move {
            if other_holds.load(Ordering::SeqCst) {
                ran.store(true, Ordering::SeqCst);
            }
        }
    };
    let outcome = slow
        .lock(&name)
        .ttl(ttl)
        .wait(late + 200 * MS)
        .run(work)
        .await;
    plan.acquire(Fault::None);
    contender.await??;
    ensure!(
        !ran_while_other_held.load(Ordering::SeqCst),
        "with_lock ran its work on a grant that arrived after its deadline, while another \
         client held the key (outcome: {outcome:?})"
    );

    // lock_all: each grant is on time, but the first key runs out while the second is
    // taken (every call waits a TTL before it is sent, and nothing renews). The guard was
    // handed out with its first key lost (finding of 2026-12-03).
    let keys = [unique_key("late-all-a"), unique_key("late-all-b")];
    plan.acquire(Fault::Delay(ttl));
    let outcome = slow
        .lock_all(keys.clone())
        .ttl(ttl)
        .auto_renew(false)
        .try_acquire()
        .await;
    plan.acquire(Fault::None);
    match outcome {
        Ok(Some(guard)) if guard.is_lost() => bail!(
            "lock_all handed out a guard with a key already past its deadline (each call \
             waited {ttl:?} before it was sent, TTL {ttl:?})"
        ),
        Ok(Some(guard)) => {
            guard.release().await?;
        }
        Ok(None) => {}
        Err(error) if error.is_retryable() => {}
        Err(error) => bail!("lock_all with slow calls gave a non-retryable error: {error}"),
    }
    // The round given back holds nothing.
    let guard = other
        .lock_all(keys.clone())
        .ttl(ttl)
        .wait(ttl + caps.expiry_slack + Duration::from_secs(2))
        .acquire()
        .await
        .context("the keys stayed held after lock_all gave a late round back")?;
    guard.release().await?;
    Ok(())
}

/// 13f. The watchdog is not tied to one runtime. A `Locker` used from two runtimes: (1) a
///      guard whose renewal is in flight on a runtime that shuts down is attended again
///      (renewed, or told it is lost) once the `Locker` is used on another runtime; (2) when
///      the runtime of a `Locker`'s first acquire shuts down, guards acquired on another
///      runtime are still renewed, or their `lost()` fires; (3) a runtime that is alive but
///      no longer driven (a current-thread runtime after its `block_on` returned) does not
///      swallow the wake-up meant for the watchdog task of a runtime that runs.
pub async fn guards_outlive_a_stopped_runtime(factory: &dyn BackendFactory) -> Result<()> {
    let caps = factory.backend().await?.capabilities();
    let ttl = ttl_for(&caps, 900 * MS);

    // (1) Only runtime A has used this locker: the renewal in flight runs there.
    let (locker, plan) = faulty_locker(factory).await?;
    let (on_a, stop_a, runtime_a) =
        hold_on_own_runtime(&locker, unique_key("in-flight"), ttl).await?;
    let from_a = on_a.await.context("runtime A ended early")??;
    plan.renew(Fault::Hang);
    wait_for_a_renewal(&plan, ttl).await?;
    stop_runtime(stop_a, runtime_a).await?;
    plan.renew(Fault::None);
    // The locker is used again, here: whatever was dropped with A must be picked up.
    let here = locker
        .lock(unique_key("after"))
        .ttl(ttl)
        .wait(ttl * 2)
        .acquire()
        .await?;
    sleep(ttl * 2 + caps.expiry_slack + 100 * MS).await;
    expect_attended(
        &from_a,
        "its renewal was in flight when its runtime stopped",
    )?;
    drop((from_a, here));

    // (2) The locker's first acquire runs on runtime B; this runtime acquires while B runs.
    let (locker, plan) = faulty_locker(factory).await?;
    let (on_b, stop_b, runtime_b) = hold_on_own_runtime(&locker, unique_key("first"), ttl).await?;
    let from_b = on_b.await.context("runtime B ended early")??;
    let from_here = locker.lock(unique_key("second")).ttl(ttl).acquire().await?;
    plan.renew(Fault::Hang);
    wait_for_a_renewal(&plan, ttl).await?;
    stop_runtime(stop_b, runtime_b).await?;
    plan.renew(Fault::None);
    sleep(ttl * 2 + caps.expiry_slack + 100 * MS).await;
    expect_attended(&from_b, "it was acquired on the runtime that stopped")?;
    expect_attended(
        &from_here,
        "the runtime of the locker's first acquire stopped",
    )?;
    // Renewed, or lost with the signal: a backend whose connections belong to the runtime
    // that opened them (PostgreSQL sessions) may lose the lock there, but must say so.
    drop((from_b, from_here));

    // (3) This runtime's watchdog task exists and plans to wake when "warm" is due; then a
    // current-thread runtime takes and releases a lock and is left alive, undriven, its task
    // still waiting for a wake-up. This runtime's task then wakes on its timer, finds nothing
    // and waits with no timer, registered after the idle one: a wake-up that reaches only the
    // oldest waiter reaches the idle runtime, and a guard taken now is never renewed.
    let locker = self::locker(factory).await?;
    locker
        .lock(unique_key("warm"))
        .ttl(ttl)
        .acquire()
        .await?
        .release()
        .await?;
    let idle = IdleRuntime::after_a_hold(&locker, unique_key("idle"), ttl * 20).await?;
    // "warm" was due at a third of its TTL: by then this runtime's task waits untimed.
    sleep(ttl / 3 + 200 * MS).await;
    let woken = locker.lock(unique_key("woken")).ttl(ttl).acquire().await?;
    sleep(ttl * 2 + caps.expiry_slack + 100 * MS).await;
    let attended = expect_attended(
        &woken,
        "a runtime left alive but undriven held the watchdog's wake-up",
    );
    drop(woken);
    idle.stop().await?;
    attended
}

/// A current-thread runtime on its own thread that acquired and released a lock, then stays
/// alive without being driven until [`IdleRuntime::stop`].
struct IdleRuntime {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl IdleRuntime {
    async fn after_a_hold(
        locker: &lock_core::Locker,
        name: String,
        ttl: Duration,
    ) -> Result<IdleRuntime> {
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let locker = locker.clone();
        let thread = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let held = runtime.block_on(async move {
                let guard = locker.lock(&name).ttl(ttl).acquire().await?;
                // Lets this runtime's watchdog task run and wait for a wake-up.
                sleep(50 * MS).await;
                guard.release().await
            });
            let _ = held_tx.send(held);
            let _ = stop_rx.recv();
            drop(runtime);
            Ok(())
        });
        held_rx
            .await
            .context("the idle runtime's thread ended early")??;
        Ok(IdleRuntime { stop, thread })
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the idle runtime's thread panicked"))?
    }
}

type GuardFromRuntime =
    tokio::sync::oneshot::Receiver<Result<lock_core::LockGuard, lock_core::LockError>>;

/// Acquires `name` on a runtime of its own thread, which runs until told to stop.
async fn hold_on_own_runtime(
    locker: &lock_core::Locker,
    name: String,
    ttl: Duration,
) -> Result<(
    GuardFromRuntime,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<Result<()>>,
)> {
    let (guard_tx, guard_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let locker = locker.clone();
    let thread = std::thread::spawn(move || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let guard = locker.lock(&name).ttl(ttl).acquire().await;
            let _ = guard_tx.send(guard);
            let _ = stop_rx.await;
        });
        // Dropping the runtime cancels every task on it, renewals in flight included.
        drop(runtime);
        Ok(())
    });
    Ok((guard_rx, stop_tx, thread))
}

async fn wait_for_a_renewal(plan: &crate::FaultPlan, ttl: Duration) -> Result<()> {
    let calls = plan.renew_calls();
    let waited = Instant::now();
    while plan.renew_calls() == calls {
        ensure!(waited.elapsed() < ttl, "no renewal started within one TTL");
        sleep(5 * MS).await;
    }
    Ok(())
}

async fn stop_runtime(
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<()>>,
) -> Result<()> {
    let _ = stop.send(());
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("a runtime's thread panicked"))?
}

/// Renewed (still valid), or told it is lost: never expired in silence.
fn expect_attended(guard: &lock_core::LockGuard, context: &str) -> Result<()> {
    let renewed = !guard.is_lost() && guard.valid_until() > Instant::now();
    let told = guard.lost_token().is_cancelled();
    ensure!(
        renewed || told,
        "guard of {} expired unrenewed and lost() never fired ({context})",
        guard.key()
    );
    Ok(())
}

/// 13g. A backend outlives the runtime that connected it: one kept in a `static` and
///      connected by the first `#[tokio::test]`, or by a short-lived runtime at start-up. Its
///      first locks and waits ran there too (tasks a backend starts lazily start there);
///      after that runtime shut down, the backend, used from another runtime: (1) wakes a
///      slowly polling waiter at a release (its release signals still come), (2) keeps a guard
///      renewed past two TTLs, (3) frees a lock abandoned without release within TTL + slack
///      while that guard is renewed.
pub async fn backend_outlives_the_runtime_that_connected_it(
    factory: &dyn BackendFactory,
) -> Result<()> {
    let other = locker(factory).await?;
    let caps = other.backend().capabilities();
    let ttl = ttl_for(&caps, 900 * MS);
    let blocked = unique_key("outlive-blocked");
    let held = other.lock(&blocked).ttl(ttl * 10).acquire().await?;
    // A semaphore's waiters wait for release signals where a lock's may wait on the server
    // (PostgreSQL): a semaphore wait starts the release listener there too.
    let mut held_permit = None;
    if caps.semaphores {
        held_permit = Some(other.semaphore(&blocked, 1).ttl(ttl * 10).acquire().await?);
    }
    let backend = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            scope
                .spawn(|| connect_on_a_runtime_that_ends(factory, &blocked, caps.semaphores, ttl))
                .join()
                .map_err(|_| anyhow::anyhow!("the connecting runtime's thread panicked"))?
        })
    })?;
    held.release().await?;
    if let Some(permit) = held_permit {
        permit.release().await?;
    }
    let ours = lock_core::Locker::from_arc(backend);

    // (1) Woken at the release, not at its next backoff step. A semaphore's waiters wait for
    // release signals even where a lock's waiters wait on the server (PostgreSQL).
    if caps.release_notifications || caps.fair_queue {
        woken_at_releases(&other, &ours, ttl, None).await?;
    }
    if caps.semaphores && caps.release_notifications {
        woken_at_releases(&other, &ours, ttl, Some(1)).await?;
    }

    // (2) and (3). Several renewed guards: a backend that spreads keys over connections puts
    // one beside the abandoned lock, whose expiry then cannot be left to the connection's.
    let mut renewed = Vec::new();
    for _ in 0..16 {
        renewed.push(
            ours.lock(unique_key("outlive-renewed"))
                .ttl(ttl)
                .acquire()
                .await?,
        );
    }
    let abandoned = unique_key("outlive-abandoned");
    let started = Instant::now();
    // Taken through the backend and dropped unreleased (a leaked guard would keep the whole
    // backend, and the tasks this case is about, alive for the rest of the test binary).
    let attempt = ours.backend().try_acquire(&key(&abandoned)?, ttl).await?;
    ensure!(
        attempt.into_lease().is_some(),
        "the abandoned lock's key was not free"
    );
    let limit = ttl + caps.expiry_slack + 300 * MS;
    let next = other
        .lock(&abandoned)
        .ttl(ttl)
        .wait(limit + Duration::from_secs(2))
        .retry_delay(Duration::from_secs(30))
        .acquire()
        .await
        .context("a waiter never got a lock abandoned on the backend")?;
    let took = started.elapsed();
    ensure!(
        took <= limit,
        "after the runtime that connected the backend shut down, a lock abandoned on it was \
         freed after {took:?}; TTL {ttl:?} + slack {:?} allows at most {limit:?}",
        caps.expiry_slack
    );
    next.release().await?;
    let until = started + ttl * 2 + caps.expiry_slack;
    sleep_until_instant(until).await;
    for guard in renewed {
        ensure!(
            !guard.is_lost(),
            "after the runtime that connected the backend shut down, a guard taken since was \
             lost: {:?}",
            guard.lost_reason()
        );
        ensure!(
            held_by_other(other.backend(), &key(guard.key().as_str())?, ttl).await?,
            "a renewed guard's key was free on the server past its TTL"
        );
        ensure!(
            guard.release().await?,
            "a renewed guard's release found no lock"
        );
    }
    Ok(())
}

/// Five hand-offs from `other` to a waiter of `ours` that polls slowly (3 s steps at first,
/// full jitter): the median beyond the release's answer shows a release signal. `permits`:
/// a semaphore of that many permits instead of a lock.
async fn woken_at_releases(
    other: &lock_core::Locker,
    ours: &lock_core::Locker,
    ttl: Duration,
    permits: Option<u32>,
) -> Result<()> {
    let slow_polling = lock_core::Backoff::new(Duration::from_secs(3), Duration::from_secs(5));
    let what = if permits.is_some() {
        "semaphore permit"
    } else {
        "lock"
    };
    let mut beyond_release = Vec::new();
    for _ in 0..5 {
        let name = unique_key("outlive-handoff");
        let guard = request(other, &name, permits)
            .ttl(ttl * 10)
            .acquire()
            .await?;
        let waiter = spawn_waiter(ours, &name, permits, ttl, slow_polling);
        sleep(300 * MS).await;
        ensure!(guard.release().await?, "release returned false");
        let answered = Instant::now();
        let acquired = waiter.await??;
        beyond_release.push(acquired.saturating_duration_since(answered));
    }
    beyond_release.sort();
    let median = beyond_release[beyond_release.len() / 2];
    ensure!(
        median <= 100 * MS,
        "after the runtime that connected the backend shut down, a waiter got a released \
         {what} a median {median:?} after the release (all: {beyond_release:?}): it polls, \
         its release signals no longer come"
    );
    Ok(())
}

/// 13h. A sync caller's guard: taken in `block_on` on a current-thread runtime of the
///      caller's, which is then dropped (1) or kept, undriven, for the caller's next call
///      (2), while the holder works on in plain code and checks its `lost_token()`. After
///      two TTLs each guard is renewed (another client cannot take its key) or its token is
///      cancelled: never expired while its token says "held". Before the client kept a
///      watchdog task on its background runtime for such tokens, both expired unrenewed and
///      another holder got in while the tokens stayed silent.
pub async fn sync_callers_guards_are_attended(factory: &dyn BackendFactory) -> Result<()> {
    // A locker of its own: no watchdog task of this runtime's serves its guards.
    let holder = locker(factory).await?;
    let contender = locker(factory).await?;
    let caps = contender.backend().capabilities();
    let ttl = ttl_for(&caps, 900 * MS);
    let work = ttl * 2 + caps.expiry_slack_for(ttl) + 100 * MS;
    let keys = [unique_key("sync-dropped"), unique_key("sync-undriven")];
    let names = keys.clone();
    let (held, kept) = tokio::task::spawn_blocking(move || -> Result<_> {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        };
        let take = |runtime: &tokio::runtime::Runtime, name: &str| {
            runtime.block_on(async {
                let guard = holder.lock(name).ttl(ttl).acquire().await?;
                let token = guard.lost_token();
                anyhow::Ok((guard, token))
            })
        };
        let dropped = take(&runtime()?, &names[0])?;
        let kept = runtime()?;
        let undriven = take(&kept, &names[1])?;
        // The holder's work, in plain code.
        std::thread::sleep(work);
        Ok(([dropped, undriven], kept))
    })
    .await??;
    let mut outcome = Ok(());
    for ((guard, token), (key, how)) in held
        .iter()
        .zip(keys.iter().zip(["dropped", "kept undriven"]))
    {
        let taken = contender.lock(key).ttl(ttl).try_acquire().await?;
        if taken.is_some() && !token.is_cancelled() && outcome.is_ok() {
            outcome = Err(anyhow::anyhow!(
                "another client took {key} while its holder's lost token (runtime {how}) said \
                 it was held: neither renewed nor told (is_lost: {})",
                guard.is_lost()
            ));
        }
    }
    drop(held);
    tokio::task::spawn_blocking(move || drop(kept)).await?;
    outcome
}

/// On a thread of its own, a current-thread runtime connects a backend, takes and releases a
/// lock, and waits for `blocked` (held elsewhere: the lock, and with `semaphore` a semaphore
/// of one permit of that name) until its waits time out; then the runtime shuts down, ending
/// every task it ran.
fn connect_on_a_runtime_that_ends(
    factory: &dyn BackendFactory,
    blocked: &str,
    semaphore: bool,
    ttl: Duration,
) -> Result<Arc<dyn lock_core::LockBackend>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let backend = runtime.block_on(async {
        let backend = factory.backend().await?;
        let locker = lock_core::Locker::from_arc(backend.clone());
        locker
            .lock(unique_key("outlive-warm"))
            .ttl(ttl)
            .acquire()
            .await?
            .release()
            .await?;
        let waited = locker.lock(blocked).ttl(ttl).wait(300 * MS).acquire().await;
        ensure!(
            waited.is_err(),
            "got a lock another backend holds: {waited:?}"
        );
        if semaphore {
            let waited = locker
                .semaphore(blocked, 1)
                .ttl(ttl)
                .wait(300 * MS)
                .acquire()
                .await;
            ensure!(
                waited.is_err(),
                "got the only permit another backend holds: {waited:?}"
            );
        }
        anyhow::Ok(backend)
    })?;
    drop(runtime);
    Ok(backend)
}
