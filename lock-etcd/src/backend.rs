//! `EtcdBackend`: the `LockBackend` over etcd leases, a FIFO queue per key and watches.

use crate::config::EtcdConfig;
use crate::connection::Connection;
use crate::keys::{entry_key, key_range};
use crate::lock;
use crate::renewer::{Renewal, Renewer};
use crate::security;
use crate::watch::{Watcher, Woken};
use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use lock_core::{
    Attempt, Capabilities, FencingToken, Lease, LockBackend, LockError, LockKey, OwnerToken,
    validate_ttl,
};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};

mod shared;

const BACKEND: &str = "etcd";

/// etcd's smallest lease TTL with its default raft timing (heartbeat 100 ms, election
/// 1 s): it raises shorter requests to this.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// How long after its TTL an abandoned lease may still hold its key: etcd's lessor looks for
/// expired leases every 500 ms and then revokes them through raft; 200 ms more covers the
/// raft round, the watch event and a loaded machine.
///
/// Measured on a quiet, stable single node. A leader change resets every lease to its full
/// TTL + the election timeout (etcd 3.4 without `--experimental-enable-lease-checkpoint`),
/// and expired leases are revoked at most 1,000/s: after a failover, or when many locks
/// expire together, a dead holder's lock can outlive this slack (liveness, not safety).
pub const EXPIRY_SLACK: Duration = Duration::from_millis(700);

/// What a granted lease carries for renew and release.
#[derive(Debug)]
struct Held {
    /// The queue entry `<prefix>/<enc(key)>/<lease hex>`, or a semaphore or rwlock holder
    /// key under `<prefix>/%sync/<enc(key)>/`.
    entry: Vec<u8>,
    lease_id: i64,
    /// The TTL etcd granted (whole seconds, at least the requested TTL).
    granted: Duration,
    /// Whose lease this is: a lease copied under another owner (`Lease::with_owner`) shares
    /// this record but must never revoke the etcd lease.
    owner: OwnerToken,
}

struct Inner {
    connection: Arc<Connection>,
    config: EtcdConfig,
    watcher: Watcher,
    renewer: Renewer,
    /// Subscribers to releases (`subscribe`), woken by a follower task per name.
    hub: lock_core::ReleaseHub,
    /// This backend's live writer-intent marks: intents range → (lease id, marked at).
    intents: Mutex<std::collections::HashMap<Vec<u8>, (i64, Instant)>>,
    /// The running release follower of each subscribed name.
    followers: Mutex<std::collections::HashMap<String, tokio::task::JoinHandle<()>>>,
}

/// Locks in etcd: a lease per lock, a queue of contenders per key ordered by create
/// revision, fencing by revision, and watch wake-ups.
///
/// - The lock key `k` owns the range `<prefix>/<enc(k)>/`; each contender puts
///   `<range><lease hex>` (value: its owner token) attached to its own lease. The holder is
///   the entry with the smallest create revision; its create revision is the fencing token.
/// - `try_acquire` puts its entry only if the range is empty (one txn), so it never leaves a
///   waiter entry behind.
/// - `acquire_queued` joins the queue and watches only its predecessor's entry (no thundering
///   herd), starting at the read's revision + 1; after every wake-up it checks that its own
///   entry still exists before it looks for predecessors (etcd issue #11456), and keeps its
///   lease alive while it waits. A cancelled or timed-out wait revokes its lease, which
///   deletes its entry.
/// - renew = check (entry's value is our owner token and it is on our lease, read in one
///   txn) + lease keep-alive, batched across concurrent renewals; release = one txn that
///   deletes the entry only if it carries our owner token on our lease, then a background
///   revoke of the emptied lease. A forged or stale lease fails the compare and touches
///   nothing.
/// - Semaphores and reader-writer locks keep holder keys on per-holder leases under
///   `<prefix>/%sync/<enc(key)>/`, each decision one txn with compares (see the crate
///   README); `subscribe` wakes their waiters on every delete under the name's ranges.
///
/// Cheap to clone? No: wrap it in an `Arc` (as [`crate::connect`] does). Each instance has its
/// own connection and its own watch stream.
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.inner.config.endpoints)
            .field("prefix", &self.inner.config.prefix)
            .finish()
    }
}

/// Classifies an etcd client error: transport trouble and unavailability may pass if
/// retried; bad arguments and protocol errors will not; wrong credentials, missing
/// permissions and refused certificates are `LockError::Refused`.
fn backend_error(config: &EtcdConfig, what: &str, error: etcd_client::Error) -> LockError {
    use etcd_client::Error as E;
    use tonic::Code;
    if let Some(refused) = security::refusal(config, &error) {
        return refused;
    }
    let retryable = match &error {
        // A lease that expired before a put or txn naming it (a slow grant outlived a short
        // TTL): a new attempt grants a new lease.
        E::GRpcStatus(status) if status.message().contains("lease not found") => true,
        E::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
        ),
        E::TransportError(_)
        | E::IoError(_)
        | E::WatchError(_)
        | E::LeaseKeepAliveError(_)
        | E::EndpointError(_)
        | E::Internal(_) => true,
        _ => false,
    };
    LockError::backend(BACKEND, format!("{what}: {error}"), retryable, error)
}

/// Whether etcd said the lease does not exist (expired or revoked).
fn is_lease_not_found(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound || status.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("not found"),
        _ => false,
    }
}

/// Whole seconds of lease TTL for a requested TTL: rounded up, at least [`MIN_TTL`].
fn lease_seconds(ttl: Duration) -> i64 {
    let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(seconds.max(MIN_TTL.as_secs())).unwrap_or(i64::MAX)
}

fn revision(response: &TxnResponse) -> Result<i64, LockError> {
    response
        .header()
        .map(|header| header.revision())
        .ok_or_else(|| LockError::backend_msg(BACKEND, "txn answer without a header", false))
}

fn fence(create_revision: i64) -> Result<FencingToken, LockError> {
    u64::try_from(create_revision)
        .map(FencingToken)
        .map_err(|_| LockError::backend_msg(BACKEND, "negative create revision", false))
}

/// The key-values of the `index`-th op answer of a txn, if it was a range read.
fn range_answer(response: &TxnResponse, index: usize) -> Vec<KeyValue> {
    match response.op_responses().into_iter().nth(index) {
        Some(TxnOpResponse::Get(get)) => get.kvs().to_vec(),
        _ => Vec::new(),
    }
}

/// Reads the key of the oldest entry (smallest create revision) in a queue range: its holder.
fn oldest_entry(range: Vec<u8>) -> TxnOp {
    TxnOp::get(
        range,
        Some(
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_limit(1)
                .with_keys_only(),
        ),
    )
}

/// Revokes a lease in the background when dropped while armed: a cancelled or failed
/// acquisition must not leave a queue entry (attached to that lease), or the lease itself,
/// behind.
///
/// Armed before the grant is sent (the lease id is ours, see [`new_lease_id`]): a future
/// dropped while its grant is in flight, or a grant whose answer was lost, still has its
/// lease revoked. While the grant may still land, "lease not found" is not taken as final:
/// the revoke is repeated until a request timeout after the drop. Transport failures are
/// retried for the lease's TTL, at least [`REVOKE_PERSISTENCE`]: after that the lease has
/// expired anyway.
struct RevokeOnDrop {
    armed: Option<(Arc<Inner>, i64)>,
    /// The grant was sent but not answered: the lease may not exist yet.
    grant_in_flight: bool,
    /// The lease's TTL: how long it may live without us.
    ttl: Duration,
}

/// The shortest time a background revoke keeps retrying transport failures. Once it gave up
/// after this whatever the TTL: a waiter's entry with a long TTL, left by a revoke that
/// failed while a member was silent for longer, stayed at the head of the queue, owned by
/// nobody, until that TTL ran out.
const REVOKE_PERSISTENCE: Duration = Duration::from_secs(30);

impl RevokeOnDrop {
    /// Armed for a lease of `ttl` that exists.
    fn new(inner: &Arc<Inner>, lease_id: i64, ttl: Duration) -> Self {
        RevokeOnDrop {
            armed: Some((inner.clone(), lease_id)),
            grant_in_flight: false,
            ttl,
        }
    }

    /// Armed for a lease of `ttl` whose grant is about to be sent.
    fn before_grant(inner: &Arc<Inner>, lease_id: i64, ttl: Duration) -> Self {
        RevokeOnDrop {
            armed: Some((inner.clone(), lease_id)),
            grant_in_flight: true,
            ttl,
        }
    }

    /// The grant answered: the lease exists, with the TTL etcd `granted`.
    fn granted(&mut self, granted: Duration) {
        self.grant_in_flight = false;
        self.ttl = self.ttl.max(granted);
    }

    fn disarm(&mut self) {
        self.armed = None;
    }
}

impl Drop for RevokeOnDrop {
    fn drop(&mut self) {
        let Some((inner, lease_id)) = self.armed.take() else {
            return;
        };
        // On the driver runtime: it runs even when the caller's runtime is shutting down.
        let Ok(runtime) = crate::driver::handle() else {
            return;
        };
        let dropped_at = Instant::now();
        let grant_landing_until = self
            .grant_in_flight
            .then(|| dropped_at + inner.config.request_timeout);
        // The lease may live its whole TTL from its last renewal (or from a grant landing
        // up to a request timeout late).
        let persistence =
            REVOKE_PERSISTENCE.max(self.ttl.saturating_add(inner.config.request_timeout));
        runtime.spawn(async move {
            let mut pause = Duration::from_millis(50);
            loop {
                let retry = match inner.revoke(lease_id).await {
                    Ok(true) => false,
                    // The grant may not have been applied yet: revoke again after it.
                    Ok(false) => grant_landing_until.is_some_and(|until| Instant::now() < until),
                    Err(error) if error.is_retryable() => {
                        let retry = dropped_at.elapsed() < persistence;
                        if !retry {
                            tracing::debug!(%error, lease_id, "background revoke failed; the lease will expire");
                        }
                        retry
                    }
                    Err(error) => {
                        tracing::debug!(%error, lease_id, "background revoke failed; the lease will expire");
                        false
                    }
                };
                if !retry {
                    return;
                }
                sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        });
    }
}

/// A fresh lease id, chosen by the client (etcd takes a requested id): the revoke-on-drop is
/// armed before the grant is sent, and a retried grant cannot create a second lease.
fn new_lease_id() -> i64 {
    // 63 random bits of a fresh owner token (random, like any token): a positive id.
    let bits = OwnerToken::random().as_u128() & u128::from(u64::MAX >> 1);
    i64::try_from(bits).unwrap_or(1).max(1)
}

/// Whether etcd refused a grant because the requested lease id exists.
fn is_lease_exists(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.message().contains("lease already exists"))
}

/// Whether an error says the request may not have reached a healthy member (a connection
/// to a dead member, a member without a leader): worth one more try on another connection.
fn worth_retrying(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

impl Inner {
    /// Runs a request, retrying transport failures (a balanced connection to a dead member)
    /// a few times within one request timeout. Every request retried here is safe to repeat:
    /// grants of an unused lease expire, txns re-check their compares, revokes and
    /// keep-alives are idempotent.
    async fn attempt<T, F, Fut>(&self, mut request: F) -> Result<Result<T, etcd_client::Error>, ()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            match tokio::time::timeout_at(deadline, request()).await {
                Err(_) => return Err(()),
                Ok(Err(error)) if worth_retrying(&error) && Instant::now() + pause < deadline => {
                    tracing::debug!(%error, "etcd request failed; retrying");
                    sleep(pause).await;
                    pause = (pause * 4).min(Duration::from_millis(200));
                }
                Ok(answer) => return Ok(answer),
            }
        }
    }

    async fn call<T, F, Fut>(&self, what: &str, request: F) -> Result<T, LockError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        match self.attempt(request).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => Err(backend_error(&self.config, what, error)),
            Err(()) => Err(LockError::backend_msg(
                BACKEND,
                format!("{what}: no answer within {:?}", self.config.request_timeout),
                true,
            )),
        }
    }

    /// Grants lease `lease_id` (chosen by the caller, see [`new_lease_id`]); returns the
    /// granted TTL. A retry that finds the id taken means an earlier try was applied (its
    /// answer was lost): the lease is ours, with the TTL we asked for. A first try that
    /// finds it taken is a collision with someone else's lease: a retryable error, and the
    /// caller must not revoke that lease.
    async fn grant(&self, ttl: Duration, lease_id: i64) -> Result<Granted, LockError> {
        let seconds = lease_seconds(ttl);
        let client = self.connection.client();
        let mut tries = 0_usize;
        let answer = self
            .attempt(|| {
                tries += 1;
                let mut lease = client.lease_client();
                let options = etcd_client::LeaseGrantOptions::new().with_id(lease_id);
                async move { lease.grant(seconds, Some(options)).await }
            })
            .await;
        let granted_seconds = match answer {
            // Not the answer's TTL: the answering member raised it to its own minimum, but
            // the leader expires the lease by the leader's, which may be shorter. Every member
            // keeps at least what was asked for.
            Ok(Ok(_)) => seconds,
            Ok(Err(error)) if is_lease_exists(&error) && tries > 1 => seconds,
            Ok(Err(error)) if is_lease_exists(&error) => {
                return Ok(Granted::Collision(backend_error(
                    &self.config,
                    "lease grant",
                    error,
                )));
            }
            Ok(Err(error)) => return Err(backend_error(&self.config, "lease grant", error)),
            Err(()) => {
                return Err(LockError::backend_msg(
                    BACKEND,
                    format!(
                        "lease grant: no answer within {:?}",
                        self.config.request_timeout
                    ),
                    true,
                ));
            }
        };
        let granted_seconds = u64::try_from(granted_seconds).unwrap_or(u64::MAX);
        Ok(Granted::Ttl(Duration::from_secs(granted_seconds)))
    }

    /// Grants a fresh lease for an acquisition, with its revoke-on-drop armed before the
    /// grant is sent; returns the id, the granted TTL and the armed guard.
    async fn grant_guarded(
        self: &Arc<Self>,
        ttl: Duration,
    ) -> Result<(i64, Duration, RevokeOnDrop), LockError> {
        let lease_id = new_lease_id();
        let mut revoke = RevokeOnDrop::before_grant(self, lease_id, ttl);
        match self.grant(ttl, lease_id).await? {
            Granted::Ttl(granted) => {
                revoke.granted(granted);
                Ok((lease_id, granted, revoke))
            }
            Granted::Collision(error) => {
                revoke.disarm();
                Err(error)
            }
        }
    }

    /// Revokes a lease. `Ok(false)`: it no longer existed.
    async fn revoke(&self, lease_id: i64) -> Result<bool, LockError> {
        let client = self.connection.client();
        let answer = self
            .attempt(|| {
                let mut lease = client.lease_client();
                async move { lease.revoke(lease_id).await }
            })
            .await;
        match answer {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(error)) if is_lease_not_found(&error) => Ok(false),
            Ok(Err(error)) => Err(backend_error(&self.config, "lease revoke", error)),
            Err(()) => Err(LockError::backend_msg(
                BACKEND,
                "lease revoke: no answer",
                true,
            )),
        }
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<TxnResponse, LockError> {
        let client = self.connection.client();
        self.call(what, || {
            let mut kv = client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// Whether a lease still exists (etcd answers TTL −1 for an expired or revoked one).
    async fn lease_alive(&self, lease_id: i64) -> Result<bool, LockError> {
        let client = self.connection.client();
        let answer = self
            .call("lease time-to-live", || {
                let mut lease = client.lease_client();
                async move { lease.time_to_live(lease_id, None).await }
            })
            .await?;
        Ok(answer.ttl() >= 0)
    }
}

fn lease_for(
    key: &LockKey,
    owner: OwnerToken,
    create_revision: i64,
    entry: Vec<u8>,
    lease_id: i64,
    granted: Duration,
    sent_at: Instant,
) -> Result<Lease, LockError> {
    Ok(Lease::new(
        key.clone(),
        owner,
        Some(fence(create_revision)?),
        granted,
        sent_at,
    )
    .with_backend_data(Arc::new(Held {
        entry,
        lease_id,
        granted,
        owner,
    })))
}

/// The answer to a grant with a chosen id.
enum Granted {
    /// Granted (by this try or an earlier one whose answer was lost), with this TTL.
    Ttl(Duration),
    /// The id was already taken by a lease that is not ours.
    Collision(LockError),
}

/// A contender's place in a key's queue.
#[derive(Clone, Copy)]
struct Place<'a> {
    range: &'a [u8],
    entry: &'a [u8],
    my_revision: i64,
    lease_id: i64,
    granted: Duration,
}

impl EtcdBackend {
    /// Connects to the endpoints of `config` and checks, within the connect timeout, that
    /// the cluster answers a linearizable read.
    pub async fn connect(config: EtcdConfig) -> Result<Self, LockError> {
        if config.endpoints.is_empty() {
            return Err(LockError::InvalidConfig("no etcd endpoints".into()));
        }
        config.validate().map_err(LockError::InvalidConfig)?;
        let endpoints: Vec<String> = config
            .endpoints
            .iter()
            .map(|endpoint| security::endpoint_url(&config, endpoint))
            .collect();
        let options = security::client_options(&config)?;
        let deadline = Instant::now() + config.connect_timeout;
        let client = match Self::open(&config, &endpoints, options, deadline).await {
            Ok(client) => client,
            Err(error) if error.is_refused() || !error.is_retryable() => return Err(error),
            Err(error) => {
                // A client speaking the wrong protocol, or a certificate the server does not
                // accept, shows as a closed connection, like a server that died: look at the
                // servers in the time left.
                let left = deadline.saturating_duration_since(Instant::now());
                return Err(security::diagnose(&config, &error, left)
                    .await
                    .unwrap_or(error));
            }
        };
        let connection = Arc::new(Connection::new(client, endpoints));
        let watcher = Watcher::new(connection.clone(), config.request_timeout);
        let renewer = Renewer::new(connection.clone(), config.request_timeout);
        Ok(EtcdBackend {
            inner: Arc::new(Inner {
                connection,
                config,
                watcher,
                renewer,
                hub: lock_core::ReleaseHub::new(),
                intents: Mutex::default(),
                followers: Mutex::default(),
            }),
        })
    }

    /// Builds the client (logging in, if credentials are configured) and proves the cluster
    /// answers a read of the prefix (which also proves the user may read it), all by
    /// `deadline`, on the background runtime ([`crate::driver`]).
    async fn open(
        config: &EtcdConfig,
        endpoints: &[String],
        mut options: ConnectOptions,
        deadline: Instant,
    ) -> Result<Client, LockError> {
        let unreachable = |detail: String| {
            LockError::backend_msg(
                BACKEND,
                format!(
                    "cannot reach etcd at {}: {detail}",
                    config.endpoints.join(",")
                ),
                true,
            )
        };
        let failed = |error: etcd_client::Error| match error {
            etcd_client::Error::InvalidUri(error) => {
                LockError::InvalidConfig(format!("etcd endpoint: {error}"))
            }
            error => security::refusal(config, &error)
                .unwrap_or_else(|| unreachable(security::error_chain(&error))),
        };
        // Built on the driver runtime, so its channel outlives the caller's runtime.
        let connect = |options: ConnectOptions| {
            let endpoints = endpoints.to_vec();
            crate::driver::run(async move {
                timeout_at(deadline, Client::connect(endpoints, Some(options))).await
            })
        };
        let mut connected = connect(options.clone()).await?;
        if let Ok(Err(error)) = &connected
            && config.credentials.is_some()
            && security::error_chain(error).contains("authentication is not enabled")
        {
            // As etcd's own Go client does: credentials for a server without
            // authentication are not an error (it allows every request).
            tracing::warn!(
                "etcd at {} has authentication off; connecting without credentials",
                config.endpoints.join(",")
            );
            options = security::client_options(&EtcdConfig {
                credentials: None,
                ..config.clone()
            })?;
            connected = connect(options.clone()).await?;
        }
        let client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => return Err(failed(error)),
            Err(_) => {
                return Err(unreachable(format!(
                    "no connection within {:?}",
                    config.connect_timeout
                )));
            }
        };
        // The channel connects lazily: prove the cluster answers before handing it out.
        let mut kv = client.kv_client();
        let probe = kv.get(
            format!("{}/", config.prefix),
            Some(GetOptions::new().with_prefix().with_count_only()),
        );
        match timeout_at(deadline, probe).await {
            Ok(Ok(_)) => Ok(client),
            Ok(Err(error)) => Err(failed(error)),
            Err(_) => Err(unreachable(format!(
                "no answer within {:?}",
                config.connect_timeout
            ))),
        }
    }

    /// The configuration this backend was built with.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// The etcd key range that holds the queue of `key` (for tools and tests that look at
    /// the server directly).
    pub fn key_range(&self, key: &LockKey) -> Vec<u8> {
        key_range(&self.inner.config.prefix, key)
    }

    /// The etcd lease id behind a lease granted by this backend.
    pub fn lease_id(lease: &Lease) -> Option<i64> {
        lease.backend_data::<Held>().map(|held| held.lease_id)
    }

    /// Waits until `entry` (created at `my_revision`) is the oldest in `range`, keeping its
    /// lease alive, until `deadline`. `Ok(Some(refreshed))`: acquired, lease last refreshed
    /// by a request sent at `refreshed`. `Ok(None)`: deadline.
    ///
    /// The keep-alives run alongside the wait, never inside it: a keep-alive that hangs for a
    /// request timeout delays neither the wake-up nor the deadline.
    async fn wait_turn(
        &self,
        place: &Place<'_>,
        refreshed: Instant,
        deadline: Instant,
    ) -> Result<Option<Instant>, LockError> {
        // Only confirmed keep-alives move `confirmed`, since it becomes the lease's `sent_at`
        // (its validity deadline).
        let refreshed = Mutex::new(QueuedRefresh {
            confirmed: refreshed,
            in_flight: None,
        });
        let keep_alive = keep_queued_lease_alive(&self.inner, place, &refreshed);
        let turn = tokio::select! {
            // Acquired beats the deadline when both are ready.
            biased;
            turn = self.await_turn(place) => turn,
            error = keep_alive => Err(error),
            () = sleep_until(deadline) => return Ok(None),
        };
        turn?;
        let refresh = *lock(&refreshed);
        self.confirm_turn(place, refresh, deadline).await
    }

    /// Our turn came; `refresh.confirmed` is when the last confirmed keep-alive was sent.
    /// The lease's validity counts from there, so an old one (keep-alive answers slow or
    /// failing) would hand out a lease whose deadline is close or past although etcd may have
    /// kept it alive since. If less than 2/3 of the TTL is left (a scheduled refresh is
    /// overdue), one keep-alive confirms the lease now (bounded by the caller's deadline), and
    /// the validity counts from its send time. A lease that still has no more than the lost
    /// margin left is not handed out: a retryable error (the entry is revoked, the client
    /// rejoins).
    async fn confirm_turn(
        &self,
        place: &Place<'_>,
        refresh: QueuedRefresh,
        deadline: Instant,
    ) -> Result<Option<Instant>, LockError> {
        let granted = place.granted;
        let valid_until = |sent: Instant| sent + granted.saturating_sub(lock_core::drift(granted));
        let last = refresh.confirmed;
        let mut confirmed = last;
        if valid_until(last) < Instant::now() + granted * 2 / 3 {
            // A keep-alive still unanswered when the turn came (its answer was dropped with
            // the wait) may have reached etcd and kept the lease alive past `last + granted`:
            // the lease is known gone only past its send time plus the TTL.
            let alive_until = refresh.in_flight.unwrap_or(last).max(last) + granted;
            let sent = Instant::now();
            match timeout_at(
                deadline.max(sent),
                self.inner.renewer.keep_alive(place.lease_id, alive_until),
            )
            .await
            {
                Ok(Ok(true)) => confirmed = sent,
                Ok(Ok(false)) => {
                    return Err(LockError::backend_msg(
                        BACKEND,
                        "the queue entry's lease expired or was revoked as its turn came",
                        true,
                    ));
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, "keep-alive at the turn failed");
                }
                Err(_) => return Ok(None),
            }
        }
        if valid_until(confirmed) <= Instant::now() + lock_core::lost_margin(granted) {
            return Err(LockError::backend_msg(
                BACKEND,
                format!(
                    "our turn came, but the lease was last confirmed {:?} ago (TTL {granted:?}): \
                     too little validity left to hand it out",
                    confirmed.elapsed()
                ),
                true,
            ));
        }
        Ok(Some(confirmed))
    }

    /// Joins the queue of `key` and waits for its turn until `deadline` (see
    /// [`LockBackend::acquire_queued`]).
    async fn queue(
        &self,
        key: &LockKey,
        ttl: Duration,
        deadline: Instant,
    ) -> Result<Option<Lease>, LockError> {
        let inner = &self.inner;
        let range = key_range(&inner.config.prefix, key);
        let owner = OwnerToken::random();
        let sent_at = Instant::now();
        // From the grant on, dropping this future revokes the lease and so deletes the entry.
        let (lease_id, granted, mut revoke) = inner.grant_guarded(ttl).await?;
        let entry = entry_key(&range, lease_id);
        let join = Txn::new().and_then([
            TxnOp::put(
                entry.clone(),
                owner.to_string(),
                Some(PutOptions::new().with_lease(lease_id)),
            ),
            oldest_entry(range.clone()),
            TxnOp::get(entry.clone(), Some(GetOptions::new().with_keys_only())),
        ]);
        let answer = inner.txn("queue join txn", join).await?;
        // Our own entry's create revision, not the header's: a retried put keeps the
        // revision of the first one.
        let my_revision = range_answer(&answer, 2)
            .first()
            .map(KeyValue::create_revision)
            .ok_or_else(|| {
                LockError::backend_msg(BACKEND, "queue entry missing right after its put", true)
            })?;
        let first = range_answer(&answer, 1)
            .first()
            .map(KeyValue::create_revision);
        let refreshed = if first == Some(my_revision) {
            Some(sent_at)
        } else {
            let place = Place {
                range: &range,
                entry: &entry,
                my_revision,
                lease_id,
                granted,
            };
            self.wait_turn(&place, sent_at, deadline).await?
        };
        match refreshed {
            Some(refreshed) => {
                let lease =
                    lease_for(key, owner, my_revision, entry, lease_id, granted, refreshed)?;
                revoke.disarm();
                Ok(Some(lease))
            }
            // `revoke` drops here: the lease (and so our entry) is revoked in the background,
            // so the deadline is not pushed back by a slow revoke.
            None => Ok(None),
        }
    }

    /// Re-checks the queue after every wake-up until `entry` is the oldest (`Ok(())`).
    /// Retryable check failures are retried (the caller bounds the wait by its deadline).
    async fn await_turn(&self, place: &Place<'_>) -> Result<(), LockError> {
        let Place {
            range,
            entry,
            my_revision,
            ..
        } = *place;
        let inner = &self.inner;
        let mut retry_delay = Duration::from_millis(10);
        loop {
            // Own entry first (#11456), then the newest entry older than ours.
            let check = Txn::new()
                .when([Compare::create_revision(
                    entry.to_vec(),
                    CompareOp::Equal,
                    my_revision,
                )])
                .and_then([TxnOp::get(
                    range.to_vec(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_max_create_revision(my_revision - 1)
                            .with_sort(SortTarget::Create, SortOrder::Descend)
                            .with_limit(1)
                            .with_keys_only(),
                    ),
                )]);
            let answer = match inner.txn("queue check", check).await {
                Ok(answer) => answer,
                Err(error) if error.is_retryable() => {
                    tracing::debug!(%error, "queue check failed; retrying");
                    sleep(retry_delay).await;
                    retry_delay = (retry_delay * 2).min(Duration::from_millis(500));
                    continue;
                }
                Err(error) => return Err(error),
            };
            if !answer.succeeded() {
                return Err(LockError::backend_msg(
                    BACKEND,
                    "the queue entry vanished while waiting (its lease expired or was revoked)",
                    true,
                ));
            }
            let Some(predecessor) = range_answer(&answer, 0).into_iter().next() else {
                return Ok(());
            };
            let watched = predecessor.key().to_vec();
            let mut wakeup = inner
                .watcher
                .on_delete(watched.clone(), revision(&answer)? + 1)
                .await;
            // Bounded waits, each followed by a look at the predecessor's key: a watch stream
            // that went silent (a blackholed connection, a NAT that dropped the flow) delivers
            // no delete and no error until HTTP/2 keep-alive gives up (~15 s). The look is one
            // keys-only get; the watch stays (re-creating it each second would cost the watch
            // task a scan of every watch per waiter).
            loop {
                match timeout(QUEUE_RECHECK, wakeup.wait()).await {
                    Ok(Woken::Interrupted) => {
                        sleep(Duration::from_millis(20)).await;
                        break;
                    }
                    Ok(Woken::Deleted) => break,
                    Err(_) => {
                        let look = Txn::new().and_then([TxnOp::get(
                            watched.clone(),
                            Some(GetOptions::new().with_keys_only()),
                        )]);
                        // Gone: look at the queue again. Still there, or the look failed:
                        // keep waiting on the watch.
                        if let Ok(answer) = inner.txn("queue predecessor look", look).await
                            && range_answer(&answer, 0).is_empty()
                        {
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// Longest a queued waiter trusts its predecessor's watch before it looks again.
const QUEUE_RECHECK: Duration = Duration::from_secs(1);

/// A queued entry's lease refreshes, as its turn finds them.
#[derive(Clone, Copy, Debug)]
struct QueuedRefresh {
    /// Send time of the last keep-alive (or grant) etcd confirmed.
    confirmed: Instant,
    /// Send time of the keep-alive awaiting its answer, if one is.
    in_flight: Option<Instant>,
}

/// Keeps a queued entry's lease alive at TTL/3 over the renewer's shared streams, recording
/// each confirmed refresh in `refreshed`. Returns only when etcd says the lease is gone.
async fn keep_queued_lease_alive(
    inner: &Inner,
    place: &Place<'_>,
    refreshed: &Mutex<QueuedRefresh>,
) -> LockError {
    let mut refresh_at = lock(refreshed).confirmed + place.granted / 3;
    loop {
        sleep_until(refresh_at).await;
        let sent = Instant::now();
        let alive_until = {
            let mut refresh = lock(refreshed);
            refresh.in_flight = Some(sent);
            refresh.confirmed + place.granted
        };
        let answer = inner.renewer.keep_alive(place.lease_id, alive_until).await;
        lock(refreshed).in_flight = None;
        match answer {
            Ok(true) => {
                lock(refreshed).confirmed = sent;
                refresh_at = sent + place.granted / 3;
            }
            Ok(false) => {
                return LockError::backend_msg(
                    BACKEND,
                    "the queue entry's lease expired or was revoked while waiting",
                    true,
                );
            }
            // Tried again soon; the lease has TTL − TTL/3 left after the last refresh.
            Err(error) => {
                tracing::debug!(%error, "keep-alive while waiting failed");
                refresh_at = Instant::now() + Duration::from_millis(100);
            }
        }
    }
}

#[async_trait]
impl LockBackend for EtcdBackend {
    async fn try_acquire(&self, key: &LockKey, ttl: Duration) -> Result<Attempt, LockError> {
        validate_ttl(ttl)?;
        let inner = &self.inner;
        let range = key_range(&inner.config.prefix, key);
        let owner = OwnerToken::random();
        let sent_at = Instant::now();
        let (lease_id, granted, mut revoke) = inner.grant_guarded(ttl).await?;
        let entry = entry_key(&range, lease_id);
        let txn = Txn::new()
            .when([Compare::create_revision(range.clone(), CompareOp::Equal, 0).with_prefix()])
            .and_then([TxnOp::put(
                entry.clone(),
                owner.to_string(),
                Some(PutOptions::new().with_lease(lease_id)),
            )])
            .or_else([oldest_entry(range)]);
        let answer = inner.txn("acquire txn", txn).await?;
        let holder = range_answer(&answer, 0).into_iter().next();
        let created = if answer.succeeded() {
            Some(revision(&answer)?)
        } else {
            // A retried txn whose first try had in fact succeeded: the entry is ours.
            holder
                .as_ref()
                .filter(|holder| holder.lease() == lease_id)
                .map(KeyValue::create_revision)
        };
        if let Some(created) = created {
            let lease = lease_for(key, owner, created, entry, lease_id, granted, sent_at)?;
            revoke.disarm();
            return Ok(Attempt::Acquired(lease));
        }
        // Held: our unused lease is revoked in the background as `revoke` drops. The holder's
        // remaining TTL would cost one more round trip (a txn cannot read it), and no caller
        // needs it: waiting callers queue (`fair_queue`) and never poll on it.
        let expires_in = match holder {
            Some(_) => None,
            // The holder vanished between compare and read: worth trying again at once.
            None => Some(Duration::ZERO),
        };
        Ok(Attempt::Held { expires_in })
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LockError> {
        validate_ttl(ttl)?;
        let Some(held) = lease.backend_data::<Held>() else {
            return Err(LockError::lost(
                lease.key().as_str(),
                "the lease was not granted by an etcd backend",
            ));
        };
        let sent_at = Instant::now();
        let renewal = self
            .inner
            .renewer
            .renew(
                held.entry.clone(),
                shared::holder_value(lease.owner(), lease.kind()),
                held.lease_id,
                // The lease was last confirmed by the call sent at `lease.sent_at()`.
                lease.sent_at() + held.granted,
            )
            .await?;
        match renewal {
            Renewal::Renewed => {}
            Renewal::NotOurs => {
                return Err(LockError::lost(
                    lease.key().as_str(),
                    "the lock entry is gone or belongs to another owner",
                ));
            }
            Renewal::Expired => {
                return Err(LockError::lost(
                    lease.key().as_str(),
                    "the lease expired (etcd answered the keep-alive with TTL 0, or its TTL had \
                     run out before one was sent)",
                ));
            }
        }
        // A keep-alive restores the granted TTL; it cannot change it.
        Ok(lease.renewed(held.granted, sent_at))
    }

    async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
        let Some(held) = lease.backend_data::<Held>() else {
            return Ok(false);
        };
        // Compare-and-delete in one txn: the entry goes only if it still carries our owner
        // token (and, for permits, our count and limit) on our lease. A forged lease (the real
        // holder's lease id, another token) fails the compare and touches nothing.
        let release = Txn::new()
            .when([
                Compare::value(
                    held.entry.clone(),
                    CompareOp::Equal,
                    shared::holder_value(lease.owner(), lease.kind()),
                ),
                Compare::lease(held.entry.clone(), CompareOp::Equal, held.lease_id),
            ])
            .and_then([TxnOp::delete(held.entry.clone(), None)])
            .or_else([TxnOp::get(
                held.entry.clone(),
                Some(GetOptions::new().with_keys_only()),
            )]);
        let mut tries = 0_usize;
        let attempt = async {
            let client = self.inner.connection.client();
            self.inner
                .call("release txn", || {
                    tries += 1;
                    let mut kv = client.kv_client();
                    let release = release.clone();
                    async move { kv.txn(release).await }
                })
                .await
        };
        let answer = match attempt.await {
            Ok(answer) => answer,
            Err(error) => {
                // No answer (a silent member, an election longer than the request timeout):
                // the entry would stay until the lease's TTL ran out, blocking every waiter.
                // Revoking our own lease ends the entry with it, and the revoke keeps
                // retrying in the background. Never for a lease copied under another owner:
                // that etcd lease is someone else's hold.
                if held.owner == lease.owner() {
                    drop(RevokeOnDrop::new(&self.inner, held.lease_id, held.granted));
                }
                return Err(error);
            }
        };
        if !answer.succeeded() {
            let retried = tries > 1;
            let entry_gone = range_answer(&answer, 0).is_empty();
            // A try whose answer was lost may have deleted the entry already. Only our own
            // delete removes the entry while our lease lives (expiry and revoke end the
            // lease), so then the release did happen.
            let deleted_by_us =
                retried && entry_gone && self.inner.lease_alive(held.lease_id).await?;
            if !deleted_by_us {
                return Ok(false);
            }
        }
        // The entry is gone (the next contender is already woken); the now empty lease is
        // revoked off the caller's path. If that fails it simply expires.
        drop(RevokeOnDrop::new(&self.inner, held.lease_id, held.granted));
        Ok(true)
    }

    async fn acquire_queued(
        &self,
        key: &LockKey,
        ttl: Duration,
        deadline: Instant,
    ) -> Result<Option<Lease>, LockError> {
        validate_ttl(ttl)?;
        match self.queue(key, ttl, deadline).await {
            // Past the deadline the caller would not try again anyway: it is a timeout.
            Err(error) if error.is_retryable() && Instant::now() >= deadline => {
                tracing::debug!(%error, "queued wait failed after its deadline");
                Ok(None)
            }
            outcome => outcome,
        }
    }

    async fn try_acquire_permits(
        &self,
        key: &LockKey,
        limit: u32,
        count: u32,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        self.permits(key, limit, count, ttl).await
    }

    async fn try_acquire_rw(
        &self,
        key: &LockKey,
        mode: lock_core::RwMode,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        self.rw(key, mode, ttl).await
    }

    async fn subscribe(&self, key: &LockKey) -> Result<lock_core::Releases, LockError> {
        self.subscribe_releases(key).await
    }

    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        let mut capabilities = Capabilities::default();
        capabilities.fencing = true;
        // Lock waiters queue in etcd, woken by a watch on their predecessor. Semaphore and
        // rwlock waiters (and lock waiters with a retry count) subscribe: a watch on the
        // name's ranges wakes them on every delete.
        capabilities.release_notifications = true;
        capabilities.semaphores = true;
        capabilities.rw_locks = true;
        capabilities.fair_queue = true;
        capabilities.min_ttl = MIN_TTL;
        capabilities.ttl_granularity = Duration::from_secs(1);
        capabilities.expiry_slack = EXPIRY_SLACK;
        capabilities
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_seconds_round_up_to_the_minimum() {
        assert_eq!(lease_seconds(Duration::from_millis(1)), 2);
        assert_eq!(lease_seconds(Duration::from_millis(2001)), 3);
        assert_eq!(lease_seconds(Duration::from_secs(30)), 30);
    }
}

#[cfg(test)]
mod server_tests {
    use super::*;

    /// A put naming a lease that has already expired (a slow grant outlived a short TTL) is
    /// answered "requested lease not found": a new attempt with a new lease can succeed, so
    /// the error is retryable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn put_on_a_vanished_lease_is_retryable() -> anyhow::Result<()> {
        let cluster = lock_harness::etcd::EtcdCluster::single().await?;
        let mut client = Client::connect(cluster.direct_endpoints(), None).await?;
        let lease = client.lease_grant(2, None).await?.id();
        client.lease_revoke(lease).await?;
        let error = match client
            .put("k", "v", Some(PutOptions::new().with_lease(lease)))
            .await
        {
            Ok(_) => anyhow::bail!("put on a revoked lease succeeded"),
            Err(error) => backend_error(&EtcdConfig::new(["test"]), "put", error),
        };
        anyhow::ensure!(error.is_retryable(), "not retryable: {error}");
        Ok(())
    }

    /// Finding (review, 2026-12-03): etcd answers a keep-alive of a lease that expired but is
    /// not revoked yet only once the revoke is done (its next expiry scan, up to 500 ms), and
    /// a stream's keep-alives in order: a late keep-alive of one lease held up the renewals
    /// of every other lease on its shared stream. A lease whose TTL has run out by our clock
    /// now gets no keep-alive.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_out_lease_holds_up_no_other_keep_alive() -> anyhow::Result<()> {
        let cluster = lock_harness::etcd::EtcdCluster::single().await?;
        let mut client = Client::connect(cluster.direct_endpoints(), None).await?;
        let renewer = Renewer::new(
            Arc::new(Connection::new(client.clone(), cluster.direct_endpoints())),
            Duration::from_secs(3),
        );
        // Two leases on one of the renewer's streams (ids equal modulo the stream count).
        let short_id = new_lease_id() & !0xff;
        let long_id = short_id + 16 * 7;
        let with_id = |id| Some(etcd_client::LeaseGrantOptions::new().with_id(id));
        let sent = Instant::now();
        client.lease_grant(2, with_id(short_id)).await?;
        client.lease_grant(30, with_id(long_id)).await?;
        let long_until = Instant::now() + Duration::from_secs(30);
        // Both streams open, then the short lease runs out.
        anyhow::ensure!(
            renewer.keep_alive(long_id, long_until).await?,
            "long lease gone"
        );
        sleep_until(sent + Duration::from_millis(2010)).await;
        let mut slowest = Duration::ZERO;
        for _ in 0..3 {
            let late = renewer.keep_alive(short_id, sent + Duration::from_secs(2));
            let started = Instant::now();
            let (late, alive) = tokio::join!(late, async {
                sleep(Duration::from_millis(1)).await;
                renewer.keep_alive(long_id, long_until).await
            });
            slowest = slowest.max(started.elapsed());
            anyhow::ensure!(!late?, "the run-out lease was kept alive");
            anyhow::ensure!(alive?, "the long lease was lost");
            sleep(Duration::from_millis(150)).await;
        }
        anyhow::ensure!(
            slowest < Duration::from_millis(100),
            "a keep-alive waited {slowest:?} behind a run-out lease's on the same stream"
        );
        Ok(())
    }

    /// A repeated grant of a chosen lease id (a retry whose first try was applied) is
    /// answered "lease already exists", which `grant` recognises: no second lease.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repeated_grant_of_a_chosen_id_is_recognised() -> anyhow::Result<()> {
        let cluster = lock_harness::etcd::EtcdCluster::single().await?;
        let mut client = Client::connect(cluster.direct_endpoints(), None).await?;
        let id = new_lease_id();
        let options = || Some(etcd_client::LeaseGrantOptions::new().with_id(id));
        anyhow::ensure!(
            client.lease_grant(10, options()).await?.id() == id,
            "id not kept"
        );
        match client.lease_grant(10, options()).await {
            Ok(_) => anyhow::bail!("a second grant of lease {id:x} succeeded"),
            Err(error) => anyhow::ensure!(is_lease_exists(&error), "not recognised: {error}"),
        }
        anyhow::ensure!(client.leases().await?.leases().len() == 1, "two leases");
        Ok(())
    }
}
