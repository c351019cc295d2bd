//! A wrapper backend that fails, hangs or delays calls on demand, so watchdog and lost-signal
//! cases run on every backend.

use async_trait::async_trait;
use lock_core::{Attempt, Capabilities, Lease, LockBackend, LockError, LockKey, Releases, RwMode};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What to do to one kind of call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Pass the call through.
    #[default]
    None,
    /// Answer with a retryable backend error, without calling the backend.
    Fail,
    /// Never answer (until the fault is changed: a hung call then finishes as `None` would).
    Hang,
    /// Answer `Lost` (renew) without calling the backend.
    Lost,
    /// Wait this long, then pass the call through.
    Delay(Duration),
    /// Pass the call through, then hold its answer back this long: a slow link's return
    /// path, so the answer arrives after what it granted may have expired on the server.
    DelayAnswer(Duration),
}

/// The faults in force, shared between a [`FaultyBackend`] and the test that steers it.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    inner: Arc<Mutex<Plan>>,
    /// Wakes hung calls when the plan changes.
    changed: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Default)]
struct Plan {
    acquire: Fault,
    renew: Fault,
    release: Fault,
    renew_calls: u64,
    acquire_calls: u64,
    /// A delay for the next `try_acquire` only.
    acquire_delay_once: Option<Duration>,
    /// The task whose `try_acquire` took that delay.
    delayed_task: Option<tokio::task::Id>,
}

impl FaultPlan {
    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Sets the fault for `try_acquire`.
    pub fn acquire(&self, fault: Fault) {
        self.plan().acquire = fault;
        self.changed.notify_waiters();
    }
    /// Sets the fault for `renew`.
    pub fn renew(&self, fault: Fault) {
        self.plan().renew = fault;
        self.changed.notify_waiters();
    }
    /// Sets the fault for `release`.
    pub fn release(&self, fault: Fault) {
        self.plan().release = fault;
        self.changed.notify_waiters();
    }
    /// How many renew calls reached the wrapper.
    pub fn renew_calls(&self) -> u64 {
        self.plan().renew_calls
    }
    /// Delays the next `try_acquire` call only (by `delay`, before it is passed through);
    /// later calls follow the plan.
    pub fn delay_next_acquire(&self, delay: Duration) {
        self.plan().acquire_delay_once = Some(delay);
    }
    /// The tokio task whose `try_acquire` took the delay set by
    /// [`delay_next_acquire`](Self::delay_next_acquire), once it did (the client's attempt
    /// runs on the waiter's own task, so this tells which waiter is slow).
    pub fn delayed_task(&self) -> Option<tokio::task::Id> {
        self.plan().delayed_task
    }
    /// How many attempts (`try_acquire` or `acquire_queued` calls) reached the wrapper.
    pub fn acquire_calls(&self) -> u64 {
        self.plan().acquire_calls
    }
}

/// Wraps a backend and applies a [`FaultPlan`] to its calls.
#[derive(Debug)]
pub struct FaultyBackend {
    inner: Arc<dyn LockBackend>,
    plan: FaultPlan,
}

impl FaultyBackend {
    /// Wraps `inner`; steer it through the returned plan.
    pub fn wrap(inner: Arc<dyn LockBackend>) -> (Arc<Self>, FaultPlan) {
        let plan = FaultPlan::default();
        (
            Arc::new(FaultyBackend {
                inner,
                plan: plan.clone(),
            }),
            plan,
        )
    }

    async fn apply(&self, which: fn(&Plan) -> Fault) -> Result<(), LockError> {
        loop {
            // Registered before reading the plan, so a change in between is not missed.
            let changed = self.plan.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let fault = which(&self.plan.plan());
            match fault {
                Fault::None | Fault::DelayAnswer(_) => return Ok(()),
                Fault::Fail => {
                    return Err(LockError::backend_msg("faulty", "injected failure", true));
                }
                Fault::Lost => return Err(LockError::lost("?", "injected Lost answer")),
                Fault::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    return Ok(());
                }
                Fault::Hang => changed.await,
            }
        }
    }
}

/// Releases a lease in the background unless disarmed (see `acquire_queued`).
struct GiveBackOnDrop {
    backend: Arc<dyn LockBackend>,
    lease: Option<Lease>,
}

impl GiveBackOnDrop {
    fn disarm(mut self) {
        self.lease = None;
    }
}

impl Drop for GiveBackOnDrop {
    fn drop(&mut self) {
        let (Some(lease), Ok(runtime)) = (self.lease.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let backend = self.backend.clone();
        runtime.spawn(async move {
            let _ = backend.release(&lease).await;
        });
    }
}

impl FaultyBackend {
    /// Holds back the answer of a call that may grant a lease and that the client does not
    /// wrap (`acquire_queued`, `wait_on_server`: each must be cancel-safe itself), when the
    /// plan says [`Fault::DelayAnswer`]; a grant held back is given back if this future is
    /// dropped meanwhile, as a backend that delays its own answer must do.
    async fn delay_grant(
        &self,
        answer: Result<Option<Lease>, LockError>,
    ) -> Result<Option<Lease>, LockError> {
        let give_back = GiveBackOnDrop {
            backend: self.inner.clone(),
            lease: answer.as_ref().ok().and_then(Option::clone),
        };
        self.delay_answer(|plan| plan.acquire).await;
        give_back.disarm();
        answer
    }

    /// Holds an answer back when the plan says [`Fault::DelayAnswer`].
    async fn delay_answer(&self, which: fn(&Plan) -> Fault) {
        let fault = which(&self.plan.plan());
        if let Fault::DelayAnswer(delay) = fault {
            tokio::time::sleep(delay).await;
        }
    }
}

#[async_trait]
impl LockBackend for FaultyBackend {
    async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
        let delay_once = {
            let mut plan = self.plan.plan();
            plan.acquire_calls += 1;
            let delay = plan.acquire_delay_once.take();
            if delay.is_some() {
                plan.delayed_task = tokio::task::try_id();
            }
            delay
        };
        if let Some(delay) = delay_once {
            tokio::time::sleep(delay).await;
        }
        self.apply(|plan| plan.acquire).await?;
        let answer = self.inner.try_acquire(key, ttl).await;
        self.delay_answer(|plan| plan.acquire).await;
        answer
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
        self.plan.plan().renew_calls += 1;
        match self.apply(|plan| plan.renew).await {
            Err(LockError::Lost { reason, .. }) => {
                Err(LockError::lost(lease.key().as_str(), reason))
            }
            Err(error) => Err(error),
            Ok(()) => {
                let answer = self.inner.renew(lease, ttl).await;
                self.delay_answer(|plan| plan.renew).await;
                answer
            }
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
        self.apply(|plan| plan.release).await?;
        self.inner.release(lease).await
    }

    async fn subscribe(&self, key: &LockKey) -> Result<Releases, LockError> {
        self.inner.subscribe(key).await
    }

    // `subscribe_server_waiter` is left to its default (`subscribe`): a waiter subscribed
    // without what signal waiters need relies on the inner `wait_on_server` to put it in place
    // when it cannot wait on the server, and a failure injected here would skip that.

    async fn acquire_queued(
        &self,
        key: &LockKey,
        ttl: Duration,
        deadline: Instant,
    ) -> Result<Option<Lease>, LockError> {
        self.plan.plan().acquire_calls += 1;
        self.apply(|plan| plan.acquire).await?;
        let answer = self.inner.acquire_queued(key, ttl, deadline).await;
        self.delay_grant(answer).await
    }

    async fn wait_on_server(
        &self,
        key: &LockKey,
        ttl: Duration,
        until: Instant,
    ) -> Result<Option<Lease>, LockError> {
        self.plan.plan().acquire_calls += 1;
        self.apply(|plan| plan.acquire).await?;
        let answer = self.inner.wait_on_server(key, ttl, until).await;
        self.delay_grant(answer).await
    }

    async fn try_acquire_permits(
        &self,
        key: &LockKey,
        limit: u32,
        count: u32,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        self.apply(|plan| plan.acquire).await?;
        let answer = self.inner.try_acquire_permits(key, limit, count, ttl).await;
        self.delay_answer(|plan| plan.acquire).await;
        answer
    }

    async fn try_acquire_rw(
        &self,
        key: &LockKey,
        mode: RwMode,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        self.apply(|plan| plan.acquire).await?;
        let answer = self.inner.try_acquire_rw(key, mode, ttl).await;
        self.delay_answer(|plan| plan.acquire).await;
        answer
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}
