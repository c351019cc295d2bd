//! `RedlockBackend`: the Redlock algorithm over N independent Redis masters.

use crate::late_calls::{LateCalls, release_on_node};
use crate::node::{Node, NodeAcquire, Nodes, ttl_millis};
use crate::shared::{SharedAcquire, Target};
use crate::{KeyScheme, RedisOptions};
use async_trait::async_trait;
use futures::StreamExt;
use futures::future::join_all;
use futures::stream::FuturesUnordered;
use lock_core::{
    Attempt, Capabilities, FencingToken, Lease, LeaseKind, LockBackend, LockError, LockKey,
    OwnerToken, Releases, RwMode, drift, validate_ttl,
};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, timeout};

/// Locks held on a majority of N independent Redis masters (Redlock).
///
/// - acquire: the acquire script on every node at once, each bounded by the node timeout
///   (at most TTL/5); granted when a quorum (N/2+1) answered yes and the validity
///   TTL − elapsed − drift is still positive; otherwise every node is rolled back.
/// - fence: the largest counter value among the quorum, written back (while we still hold
///   the lock there) to every quorum node whose counter was lower; granted only if a quorum
///   confirms. Any later holder's quorum meets ours on a node whose counter was already at
///   our fence, so its fence is larger. See the crate README for the limits.
/// - renew / release: compare-and-act scripts on every node; renew needs a quorum.
/// - waiting: each node's releases are published on it; the backend keeps one pub/sub
///   connection per node, shared by all its waiters.
#[derive(Clone, Debug)]
pub struct RedlockBackend {
    inner: Arc<Nodes>,
    quorum: usize,
    node_timeout: Duration,
    /// Bound on renew and release calls per node: the command timeout.
    release_timeout: Duration,
    /// Acquire calls still running after their acquire returned (see `late_calls.rs`).
    late_calls: Arc<LateCalls>,
}

/// The smallest TTL granted: smaller requests are raised to it (the lease reports it), as
/// the contract asks. Below it the per-node bound (TTL/5) and the drift leave too little time
/// to collect a quorum.
const MIN_TTL: Duration = Duration::from_millis(10);

/// Rounds of one `try_acquire` when the vote splits, and the pause between them: a random
/// delay whose ceiling doubles each round (2, 4, … 128 ms), so that among many simultaneous
/// contenders one soon gets in first. Four rounds of at most 4–16 ms left 64 contenders on 5
/// nodes with no winner at all now and then.
const SPLIT_ROUNDS: u32 = 8;
const SPLIT_JITTER_MS: u64 = 1;

enum Round {
    /// A final answer: acquired, or another owner holds a quorum.
    Done(Attempt),
    /// No owner has a quorum (contenders split the nodes): worth another round.
    Split(Attempt),
}

/// Whether a node call's `answer` says it set nothing there: `refused` by the script, or
/// never sent (a refused connection). See `late_calls.rs`.
fn set_nothing<T>(answer: &Result<T, LockError>, refused: impl Fn(&T) -> bool) -> bool {
    match answer {
        Ok(answer) => refused(answer),
        Err(error) => !crate::node::may_have_run(error),
    }
}

fn node(nodes: &Nodes, index: usize) -> Result<&Node, LockError> {
    nodes
        .nodes
        .get(index)
        .ok_or_else(|| LockError::backend_msg("redis", format!("no node {index}"), false))
}

/// Counts yes and no answers of a renew or release, and the errors.
fn tally(outcomes: Vec<(usize, Outcome<bool>)>) -> (usize, usize, Failures) {
    let (mut yes, mut no, mut errors) = (0, 0, Failures::default());
    for (_, outcome) in outcomes {
        match outcome {
            Outcome::Answer(true) => yes += 1,
            Outcome::Answer(false) => no += 1,
            Outcome::Failed(error) => errors.failed(error),
        }
    }
    (yes, no, errors)
}

/// What went wrong in one round, as text, and how many nodes refused us (wrong password,
/// certificate; `LockError::Refused`) with the first such refusal: when more than N − quorum
/// nodes refuse, no quorum is possible until the configuration changes, so the call returns
/// the refusal (not retryable) instead of a retryable "no quorum".
#[derive(Default)]
struct Failures {
    messages: Vec<String>,
    refused: usize,
    refusal: Option<(lock_core::RefusalKind, String)>,
}

impl Failures {
    fn push(&mut self, message: String) {
        self.messages.push(message);
    }

    fn failed(&mut self, error: LockError) {
        self.messages.push(error.to_string());
        if let LockError::Refused { kind, message, .. } = error {
            self.refused += 1;
            self.refusal.get_or_insert((kind, message));
        }
    }

    fn len(&self) -> usize {
        self.messages.len()
    }

    fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

enum Outcome<T> {
    Answer(T),
    Failed(LockError),
}

/// The acquire answers of one round, counted per owner.
#[derive(Default)]
struct Votes<'a> {
    /// Nodes that gave us the lock.
    acquired: usize,
    /// Nodes held by another owner, per owner token.
    holders: HashMap<&'a str, usize>,
}

impl<'a> Votes<'a> {
    fn count(outcomes: impl Iterator<Item = &'a Outcome<NodeAcquire>>) -> Self {
        let mut votes = Votes::default();
        for outcome in outcomes {
            match outcome {
                Outcome::Answer(NodeAcquire::Acquired(_)) => votes.acquired += 1,
                Outcome::Answer(NodeAcquire::Held(_, holder)) => {
                    *votes.holders.entry(holder.as_str()).or_default() += 1;
                }
                Outcome::Failed(_) => {}
            }
        }
        votes
    }

    /// The most nodes one other owner holds.
    fn top_holder(&self) -> usize {
        self.holders.values().copied().max().unwrap_or(0)
    }

    /// Owners (us included) that hold a node: two or more is contention, which another
    /// round may settle; one is not.
    fn owners(&self) -> usize {
        self.holders.len() + usize::from(self.acquired > 0)
    }
}

/// Refuses a server listed twice (same host and port, or socket path; databases aside): its
/// answers would count as several votes, so it alone could make a quorum and its restart
/// without persistence would let a second holder in: no longer Redlock.
fn reject_repeated_nodes(urls: &[String]) -> Result<(), LockError> {
    let mut seen = std::collections::HashSet::new();
    for url in urls {
        let client = redis::Client::open(url.as_str()).map_err(|error| {
            LockError::InvalidConfig(format!(
                "Redlock node {:?}: {error}",
                lock_core::redact_url(url)
            ))
        })?;
        let server = match client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => {
                format!("{}:{port}", host.to_ascii_lowercase())
            }
            redis::ConnectionAddr::Unix(path) => path.display().to_string(),
            other => format!("{other}"),
        };
        if !seen.insert(server.clone()) {
            return Err(LockError::InvalidConfig(format!(
                "Redlock node {server} is listed twice: one server's answers would count as \
                 several votes toward the quorum; list each independent master once"
            )));
        }
    }
    Ok(())
}

impl RedlockBackend {
    /// Connects to `redlock://[user:pass@]h1:p1,h2:p2,h3:p3[/db][?prefix=…]`.
    pub async fn connect(url: &str) -> Result<Self, LockError> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// Connects with `options` (URL parameters override them).
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self, LockError> {
        let parsed = crate::options::parse_url(url, options)?;
        Self::connect_nodes(&parsed.nodes, parsed.options).await
    }

    /// Connects to the given `redis://` node URLs (one per independent master). At least a
    /// quorum must answer now; the others are retried on use.
    pub async fn connect_nodes(urls: &[String], options: RedisOptions) -> Result<Self, LockError> {
        options.validate()?;
        if options.wait_replicas.is_some() {
            return Err(LockError::InvalidConfig(
                "wait_replicas is for one server or Sentinel, not Redlock".into(),
            ));
        }
        if urls.is_empty() {
            return Err(LockError::InvalidConfig(
                "Redlock needs at least one node".into(),
            ));
        }
        reject_repeated_nodes(urls)?;
        let quorum = urls.len() / 2 + 1;
        let inner = Nodes::connect(urls, &options, quorum).await?;
        Ok(RedlockBackend {
            inner,
            quorum,
            node_timeout: options.node_timeout,
            release_timeout: options.command_timeout,
            late_calls: Arc::default(),
        })
    }

    /// How this backend names Redis keys and channels.
    pub fn key_scheme(&self) -> &KeyScheme {
        &self.inner.scheme
    }

    /// Nodes needed for a grant: N/2+1.
    pub fn quorum(&self) -> usize {
        self.quorum
    }

    /// The number of nodes.
    pub fn node_count(&self) -> usize {
        self.inner.nodes.len()
    }

    /// Subscriptions a waiter waits for: N − quorum + 1 nodes meet every quorum.
    fn subscribe_needed(&self) -> usize {
        self.inner.nodes.len() - self.quorum + 1
    }

    fn node_timeout(&self, ttl: Duration) -> Duration {
        self.node_timeout.min(ttl / 5).max(Duration::from_millis(1))
    }

    /// Runs `call` on every node at once, each bounded by `limit`, in spawned tasks. Returns
    /// as soon as `decided` says the outcomes so far settle the answer (the other calls
    /// finish in the background, so a slow node delays nothing), else when every node
    /// answered or timed out.
    async fn on_all<T, F, Fut>(
        &self,
        limit: Duration,
        call: F,
        decided: impl Fn(&[(usize, Outcome<T>)]) -> bool,
    ) -> Vec<(usize, Outcome<T>)>
    where
        T: Send + 'static,
        F: Fn(Arc<Nodes>, usize) -> Fut,
        Fut: Future<Output = Result<T, LockError>> + Send + 'static,
    {
        let mut pending: FuturesUnordered<_> = (0..self.inner.nodes.len())
            .map(|index| {
                let call = call(self.inner.clone(), index);
                let task = tokio::spawn(async move { timeout(limit, call).await });
                async move { (index, task.await) }
            })
            .collect();
        let mut outcomes = Vec::with_capacity(self.inner.nodes.len());
        while let Some((index, joined)) = pending.next().await {
            let addr = self.inner.nodes.get(index).map_or("?", Node::addr);
            let outcome = match joined {
                Ok(Ok(Ok(answer))) => Outcome::Answer(answer),
                Ok(Ok(Err(error))) => Outcome::Failed(error),
                Ok(Err(_)) => Outcome::Failed(LockError::backend_msg(
                    "redis",
                    format!("node {addr} did not answer within {limit:?}"),
                    true,
                )),
                Err(join) => Outcome::Failed(LockError::backend(
                    "redis",
                    format!("node {addr}: call failed"),
                    true,
                    join,
                )),
            };
            outcomes.push((index, outcome));
            if decided(&outcomes) {
                break;
            }
        }
        outcomes
    }

    /// For renew and release, where an error is as bad as a "no": settled once a quorum
    /// answered `enough`, or once so many did not that a quorum is out of reach.
    fn quorum_or_out_of_reach<T>(
        &self,
        enough: fn(&T) -> bool,
    ) -> impl Fn(&[(usize, Outcome<T>)]) -> bool + use<T> {
        let (quorum, spare) = (self.quorum, self.inner.nodes.len() - self.quorum);
        move |outcomes| {
            let good = outcomes
                .iter()
                .filter(|(_, outcome)| matches!(outcome, Outcome::Answer(answer) if enough(answer)))
                .count();
            good >= quorum || outcomes.len() - good > spare
        }
    }

    /// For acquire, where an error is no vote (for nobody): settled once we or one holder
    /// has a quorum, or once nobody can reach one with the nodes still pending. Counting a
    /// failed node as a "no" stopped at one failure and one `Held` answer, before the
    /// holder's second node answered: a lock held on the live nodes looked like a split vote
    /// (up to [`SPLIT_ROUNDS`] rounds, `expires_in` lost).
    fn acquire_decided(&self) -> impl Fn(&[(usize, Outcome<NodeAcquire>)]) -> bool + use<> {
        let (quorum, nodes) = (self.quorum, self.inner.nodes.len());
        move |outcomes| {
            let votes = Votes::count(outcomes.iter().map(|(_, outcome)| outcome));
            let best = votes.acquired.max(votes.top_holder());
            best >= quorum || best + (nodes - outcomes.len()) < quorum
        }
    }

    /// Releases our token after a round that was not granted: on every node except those in
    /// `held`, which answered `Held` (the script is atomic, so our token is not there) or
    /// refused the connection (nothing was sent). Waits (within
    /// `limit`) only for the nodes in `wait_for`, those that answered "acquired": the
    /// next round must find them free. Nodes that failed or have not answered yet (they may
    /// still set our key) are released in the background, so a slow node does not cost a
    /// second node timeout per attempt.
    async fn roll_back(
        &self,
        target: &Arc<Target>,
        token: &Arc<str>,
        limit: Duration,
        held: &[usize],
        wait_for: &[usize],
    ) {
        let mut waits = Vec::with_capacity(wait_for.len());
        for index in (0..self.inner.nodes.len()).filter(|index| !held.contains(index)) {
            let task = release_on_node(&self.inner, target, token, index, limit);
            if let Some(task) = task.filter(|_| wait_for.contains(&index)) {
                waits.push(task);
            }
        }
        join_all(waits).await;
    }

    /// The fence round of a granted vote: the largest fence among `acquired`, and how many
    /// of those nodes confirm it once every node behind was raised to it by `raise` (which
    /// answers whether our hold is still live there). Any later holder's quorum meets ours
    /// on a node whose counter is at our fence, so its fence is larger.
    async fn confirm_fence<'a, Fut>(
        &'a self,
        acquired: &[(usize, u64)],
        limit: Duration,
        raise: impl Fn(&'a Node, u64) -> Fut,
    ) -> (u64, usize)
    where
        Fut: Future<Output = Result<bool, LockError>>,
    {
        let fence = acquired.iter().map(|(_, fence)| *fence).max().unwrap_or(0);
        let behind: Vec<&Node> = acquired
            .iter()
            .filter(|(_, value)| *value < fence)
            .filter_map(|(index, _)| self.inner.nodes.get(*index))
            .collect();
        let mut confirmed = acquired.len() - behind.len();
        if !behind.is_empty() {
            let raised = join_all(
                behind
                    .into_iter()
                    .map(|node| timeout(limit, raise(node, fence))),
            )
            .await;
            confirmed += raised
                .iter()
                .filter(|outcome| matches!(outcome, Ok(Ok(true))))
                .count();
        }
        (fence, confirmed)
    }

    /// When a quorum may be free after a refused round: once enough of the refusing nodes'
    /// holders expire (`expiries`, one per refusing node) beside the `acquired` nodes we
    /// rolled back. `None` when that is unknown.
    fn free_in(
        &self,
        acquired: usize,
        expiries: impl ExactSizeIterator<Item = Option<Duration>>,
    ) -> Option<Duration> {
        let needed = self.quorum.saturating_sub(acquired);
        let refusing = expiries.len();
        let mut known: Vec<Duration> = expiries.flatten().collect();
        known.sort_unstable();
        if needed == 0 || known.len() < refusing {
            None
        } else {
            known.get(needed - 1).copied()
        }
    }

    /// Rounds of one acquire: another after a random pause while the vote splits (up to
    /// [`SPLIT_ROUNDS`]).
    async fn split_rounds<Fut>(&self, round: impl Fn() -> Fut) -> Result<Attempt, LockError>
    where
        Fut: Future<Output = Result<Round, LockError>>,
    {
        let mut rounds = 0;
        loop {
            rounds += 1;
            match round().await? {
                Round::Done(attempt) => return Ok(attempt),
                Round::Split(_) if rounds < SPLIT_ROUNDS => {
                    // Nobody has a quorum: contenders split the nodes between them and all
                    // rolled back. Retrying after a random pause lets one of them win, as
                    // Redlock prescribes; this is not waiting behind a holder.
                    let jitter = rand::random_range(0..=SPLIT_JITTER_MS << rounds);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Round::Split(attempt) => return Ok(attempt),
            }
        }
    }

    /// One Redlock round: the acquire script on every node, the fence round, roll-back.
    async fn acquire_round(&self, key: &LockKey, ttl: Duration) -> Result<Round, LockError> {
        let ttl_ms = ttl_millis(ttl);
        let granted = Duration::from_millis(ttl_ms);
        let limit = self.node_timeout(granted);
        let scheme = &self.inner.scheme;
        let lock_keys = scheme.lock_keys(key);
        let (lock_key, fence_key) = (lock_keys[0].clone(), lock_keys[1].clone());
        let owner = OwnerToken::random();
        let token = Arc::<str>::from(crate::node::token_hex(owner));
        // Waiters of ours subscribed before this attempt: mark the holder so its release
        // publishes.
        let mark = self.inner.hub.has_waiters(key.as_str());
        let sent_at = Instant::now();
        // Redlock validity: TTL − elapsed − drift, i.e. sent_at + TTL − drift.
        let valid_until = sent_at + granted.saturating_sub(drift(granted));

        let target = Arc::new(Target::Lock(lock_keys.clone()));
        let mut calls = self.late_calls.start(
            &token,
            self.inner.clone(),
            target.clone(),
            self.release_timeout,
        );
        let outcomes = {
            let keys = Arc::new(lock_keys.clone());
            self.on_all(
                limit,
                |nodes, index| {
                    let (keys, token) = (keys.clone(), token.clone());
                    let mut guard = calls.guard(index);
                    async move {
                        let answer = node(&nodes, index)?
                            .acquire(&keys[0], &keys[1], &token, ttl_ms, mark)
                            .await;
                        if set_nothing(&answer, |answer| matches!(answer, NodeAcquire::Held(..))) {
                            guard.set_nothing();
                        }
                        answer
                    }
                },
                self.acquire_decided(),
            )
            .await
        };
        let votes = Votes::count(outcomes.iter().map(|(_, outcome)| outcome));
        let (holder_has_quorum, contended) =
            (votes.top_holder() >= self.quorum, votes.owners() > 1);
        let mut acquired: Vec<(usize, u64)> = Vec::new();
        let mut held: Vec<(Option<u64>, String)> = Vec::new();
        let mut held_nodes: Vec<usize> = Vec::new();
        let mut not_sent: Vec<usize> = Vec::new();
        let mut errors = Failures::default();
        for (index, outcome) in outcomes {
            match outcome {
                Outcome::Answer(NodeAcquire::Acquired(fence)) => acquired.push((index, fence)),
                Outcome::Answer(NodeAcquire::Held(pttl, holder)) => {
                    held.push((u64::try_from(pttl).ok(), holder));
                    held_nodes.push(index);
                }
                Outcome::Failed(error) => {
                    // A refused connection sent nothing: no roll-back there.
                    if !crate::node::may_have_run(&error) {
                        not_sent.push(index);
                    }
                    errors.failed(error);
                }
            }
        }

        if acquired.len() >= self.quorum && Instant::now() >= valid_until {
            errors.push(format!(
                "{} nodes said yes, but only after the validity ({:?}) had run out",
                acquired.len(),
                granted.saturating_sub(drift(granted))
            ));
        } else if acquired.len() >= self.quorum {
            // Fence round: bring every quorum node's counter up to the largest one.
            let (fence, confirmed) = self
                .confirm_fence(&acquired, limit, |node, fence| {
                    node.raise_fence(&lock_key, &fence_key, &token, fence)
                })
                .await;
            if confirmed >= self.quorum && Instant::now() < valid_until {
                let lease = Lease::new(
                    key.clone(),
                    owner,
                    Some(FencingToken(fence)),
                    granted,
                    sent_at,
                )
                .with_valid_until(valid_until);
                calls.keep();
                return Ok(Round::Done(Attempt::Acquired(lease)));
            }
            errors.push(format!(
                "only {confirmed} nodes confirmed the fence before the validity ran out"
            ));
        }

        // Not granted: roll back (a node that timed out may have set the key), calls still
        // on their way included.
        calls.give_back();
        let acquired_nodes: Vec<usize> = acquired.iter().map(|(index, _)| *index).collect();
        held_nodes.extend(not_sent);
        self.roll_back(&target, &token, limit, &held_nodes, &acquired_nodes)
            .await;
        // The nodes we rolled back are free; a quorum is free once enough of the holders'
        // keys expire too.
        let expires_in = self.free_in(
            acquired.len(),
            held.iter().map(|(pttl, _)| pttl.map(Duration::from_millis)),
        );
        if held.is_empty() {
            // Unreachable nodes, not contention: another round right now would not help.
            return Err(self.quorum_error("acquire", &errors));
        }
        if holder_has_quorum || !contended {
            // One owner holds every node that answered (the others failed or are slow): a
            // failed node is no vote, and another round would meet the same holder.
            return Ok(Round::Done(Attempt::Held { expires_in }));
        }
        Ok(Round::Split(Attempt::Held { expires_in }))
    }

    /// One reader-writer round: the side's acquire script on every node, the fence round,
    /// roll-back. Readers and writers both need a majority, so a reader's and a writer's
    /// quorums (and two writers') always share a node, whose script keeps them apart there.
    async fn rw_round(
        &self,
        key: &LockKey,
        mode: RwMode,
        ttl: Duration,
    ) -> Result<Round, LockError> {
        let ttl_ms = ttl_millis(ttl);
        let granted = Duration::from_millis(ttl_ms);
        let limit = self.node_timeout(granted);
        let keys = Arc::new(self.inner.scheme.rw_keys(key));
        let owner = OwnerToken::random();
        let token = Arc::<str>::from(crate::node::token_hex(owner));
        let mark = self.inner.hub.has_waiters(key.as_str());
        let sent_at = Instant::now();
        let valid_until = sent_at + granted.saturating_sub(drift(granted));
        let (quorum, spare) = (self.quorum, self.inner.nodes.len() - self.quorum);
        let target = Arc::new(Target::Rw((*keys).clone(), mode));
        let mut calls = self.late_calls.start(
            &token,
            self.inner.clone(),
            target.clone(),
            self.release_timeout,
        );
        let outcomes = self
            .on_all(
                limit,
                |nodes, index| {
                    let (keys, token) = (keys.clone(), token.clone());
                    let mut guard = calls.guard(index);
                    async move {
                        let answer = node(&nodes, index)?
                            .acquire_rw(&keys, mode, &token, ttl_ms, mark)
                            .await;
                        if set_nothing(&answer, |answer| {
                            !matches!(answer, SharedAcquire::Acquired(_))
                        }) {
                            guard.set_nothing();
                        }
                        answer
                    }
                },
                move |outcomes| {
                    let count = |acquired: bool| {
                        outcomes
                            .iter()
                            .filter(|(_, outcome)| match outcome {
                                Outcome::Answer(SharedAcquire::Acquired(_)) => acquired,
                                Outcome::Answer(_) => !acquired,
                                Outcome::Failed(_) => false,
                            })
                            .count()
                    };
                    count(true) >= quorum || count(false) > spare
                },
            )
            .await;
        let mut acquired: Vec<(usize, u64)> = Vec::new();
        let mut refused: Vec<usize> = Vec::new();
        let mut not_sent: Vec<usize> = Vec::new();
        let mut expiries: Vec<Option<Duration>> = Vec::new();
        let mut errors = Failures::default();
        for (index, outcome) in outcomes {
            match outcome {
                Outcome::Answer(SharedAcquire::Acquired(fence)) => acquired.push((index, fence)),
                Outcome::Answer(SharedAcquire::Held(expires_in)) => {
                    refused.push(index);
                    expiries.push(expires_in);
                }
                Outcome::Answer(SharedAcquire::LimitMismatch(_)) => refused.push(index),
                Outcome::Failed(error) => {
                    // A refused connection sent nothing: no roll-back there, but no refusal
                    // either (an outage is not contention).
                    if !crate::node::may_have_run(&error) {
                        not_sent.push(index);
                    }
                    errors.failed(error);
                }
            }
        }
        if acquired.len() >= self.quorum && Instant::now() < valid_until {
            // Fence round, as for a lock: raise every quorum node that is behind, while our
            // side is still live there.
            let (fence, confirmed) = self
                .confirm_fence(&acquired, limit, |node, fence| {
                    node.raise_rw_fence(&keys, mode, &token, fence)
                })
                .await;
            if confirmed >= self.quorum && Instant::now() < valid_until {
                let kind = match mode {
                    RwMode::Read => LeaseKind::Read,
                    RwMode::Write => LeaseKind::Write,
                };
                let lease = Lease::new(
                    key.clone(),
                    owner,
                    Some(FencingToken(fence)),
                    granted,
                    sent_at,
                )
                .with_valid_until(valid_until)
                .with_kind(kind);
                calls.keep();
                return Ok(Round::Done(Attempt::Acquired(lease)));
            }
            errors.push(format!(
                "only {confirmed} nodes confirmed the fence before the validity ran out"
            ));
        } else if acquired.len() >= self.quorum {
            errors.push("a quorum said yes, but only after the validity had run out".into());
        }
        // Not granted: roll our side back everywhere it may be (not where it was refused:
        // the script is atomic), waiting only for the nodes that admitted us; calls still on
        // their way release it when they land.
        calls.give_back();
        let acquired_nodes: Vec<usize> = acquired.iter().map(|(index, _)| *index).collect();
        self.roll_back(
            &target,
            &token,
            limit,
            &[refused.as_slice(), &not_sent].concat(),
            &acquired_nodes,
        )
        .await;
        if refused.is_empty() {
            return Err(self.quorum_error("rwlock acquire", &errors));
        }
        // A quorum is free once enough of the refusing nodes' holders expire.
        let expires_in = self.free_in(acquired.len(), expiries.into_iter());
        let attempt = Attempt::Held { expires_in };
        // We got some nodes but not a quorum: contenders split them; another round may settle.
        if acquired.is_empty() {
            Ok(Round::Done(attempt))
        } else {
            Ok(Round::Split(attempt))
        }
    }

    /// Renew (`renew_ms`) or release (`None`) of `lease`, whatever its kind, on every node:
    /// (yes, no, errors), settled at a quorum of yes.
    async fn on_all_for_lease(
        &self,
        lease: &Lease,
        renew_ms: Option<u64>,
        limit: Duration,
    ) -> (usize, usize, Failures) {
        let target = Arc::new(Target::of(&self.inner.scheme, lease.key(), lease.kind()));
        let token = Arc::<str>::from(crate::node::token_hex(lease.owner()));
        let outcomes = self
            .on_all(
                limit,
                |nodes, index| {
                    let (target, token) = (target.clone(), token.clone());
                    async move {
                        let node = node(&nodes, index)?;
                        match renew_ms {
                            Some(ttl_ms) => target.renew(node, &token, ttl_ms).await,
                            None => target.release(node, &token).await,
                        }
                    }
                },
                self.quorum_or_out_of_reach(|done| *done),
            )
            .await;
        tally(outcomes)
    }

    fn quorum_error(&self, what: &str, errors: &Failures) -> LockError {
        if errors.refused > self.inner.nodes.len() - self.quorum
            && let Some((kind, message)) = &errors.refusal
        {
            return LockError::refused(
                "redis",
                *kind,
                format!(
                    "redlock {what}: {} of {} nodes refused us: {message}",
                    errors.refused,
                    self.inner.nodes.len()
                ),
                None,
            );
        }
        LockError::backend_msg(
            "redis",
            format!(
                "redlock {what}: no quorum of {} of {} nodes ({})",
                self.quorum,
                self.inner.nodes.len(),
                errors.messages.join("; ")
            ),
            true,
        )
    }
}

#[async_trait]
impl LockBackend for RedlockBackend {
    async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
        validate_ttl(ttl)?;
        let ttl = ttl.max(MIN_TTL);
        self.split_rounds(|| self.acquire_round(key, ttl)).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
        validate_ttl(ttl)?;
        let ttl = ttl.max(MIN_TTL);
        let ttl_ms = ttl_millis(ttl);
        let granted = Duration::from_millis(ttl_ms);
        // Unlike acquire, renew needs no tight per-node bound: it returns as soon as a
        // quorum confirmed, and the new validity counts from `sent_at` whatever the wait. A
        // node may take as long as the current lease stays valid (within the command
        // timeout), so a burst of renewals on a busy machine does not lose locks.
        let limit = lease
            .valid_until()
            .saturating_duration_since(Instant::now())
            .min(self.release_timeout)
            .max(self.node_timeout(granted));
        let sent_at = Instant::now();
        let valid_until = sent_at + granted.saturating_sub(drift(granted));
        let (renewed, refused, errors) = self.on_all_for_lease(lease, Some(ttl_ms), limit).await;
        if renewed >= self.quorum && Instant::now() < valid_until {
            return Ok(lease
                .renewed(granted, sent_at)
                .with_valid_until(valid_until));
        }
        if refused > self.inner.nodes.len() - self.quorum {
            return Err(LockError::lost(
                lease.key().as_str(),
                format!(
                    "{refused} of {} redis nodes no longer hold our token",
                    self.inner.nodes.len()
                ),
            ));
        }
        Err(self.quorum_error("renew", &errors))
    }

    async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
        // Acquire calls of this lease still on their way release it when they land.
        self.late_calls
            .give_back(&crate::node::token_hex(lease.owner()));
        // No validity is at stake here, so a loaded node gets the longer command timeout.
        let limit = self.release_timeout;
        let (released, _, errors) = self.on_all_for_lease(lease, None, limit).await;
        if released >= self.quorum {
            return Ok(true);
        }
        if released + errors.len() >= self.quorum && !errors.is_empty() {
            // Could have been ours on the nodes we could not reach: their TTL frees them.
            return Err(self.quorum_error("release", &errors));
        }
        Ok(false)
    }

    async fn try_acquire_rw(
        &self,
        key: &LockKey,
        mode: RwMode,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        validate_ttl(ttl)?;
        let ttl = ttl.max(MIN_TTL);
        self.split_rounds(|| self.rw_round(key, mode, ttl)).await
    }

    async fn subscribe(&self, key: &LockKey) -> Result<Releases, LockError> {
        let releases = self.inner.hub.subscribe(key.as_str());
        // See RedisBackend::subscribe: every waiter waits for its confirmation, here from
        // N − quorum + 1 nodes: any release that frees a quorum (the next holder's) is
        // published on a node of that set, so a paused or black-holed minority node does
        // not hold every waiter up. Bounded by the node timeout.
        self.inner
            .subscribe(key.as_str(), self.subscribe_needed(), self.node_timeout)
            .await;
        Ok(releases)
    }

    fn name(&self) -> &'static str {
        "redlock"
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.fencing = true;
        caps.release_notifications = true;
        caps.min_ttl = MIN_TTL;
        caps.ttl_granularity = Duration::from_millis(1);
        caps.expiry_slack = Duration::from_millis(10);
        // Readers and writers both need a majority, and two majorities always share a node:
        // sound. A semaphore with N > 1 permits is not offered: see the crate README.
        caps.rw_locks = true;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checked before any connection: no server is needed (the ports are never dialled).
    #[tokio::test]
    async fn a_node_listed_twice_is_refused() {
        for url in [
            "redlock://127.0.0.1:1,127.0.0.1:1,127.0.0.1:2/0",
            "redlock://Example.COM:7,example.com:7,127.0.0.1:2",
            "redlock://example.com,example.com:6379,127.0.0.1:2",
        ] {
            match RedlockBackend::connect(url).await {
                Err(LockError::InvalidConfig(message)) => {
                    assert!(message.contains("listed twice"), "{url}: {message}")
                }
                Err(other) => panic!("{url}: expected InvalidConfig, got {other}"),
                Ok(_) => panic!("{url}: connected"),
            }
        }
    }
}
