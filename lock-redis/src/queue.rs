//! The fair queue of a lock (one server, Sentinel, Cluster): waiters line up in a sorted set
//! beside the lock key, and a release hands the lock straight to the first live waiter in
//! the same script, announcing the grant on the lock's channel. The waiter then holds the
//! lock when the message reaches it: one hop after the release, as a server-side queue
//! (`BLPOP`) gives it, where a woken waiter would need a round trip of its own, and first
//! come, first served ([`lock_core::Capabilities::fair_queue`]).
//!
//! Each waiter refreshes its entry's liveness deadline while it waits; a waiter that died
//! stops refreshing and its entry is skipped once that deadline passed. A holder whose TTL
//! runs out hands nothing over: the waiters refresh at the holder's expiry, and that call
//! hands the free lock to the first live entry.

use crate::RedisBackend;
use crate::node::InLine;
use crate::shared::Target;
use lock_core::{FencingToken, Lease, LockError, LockKey, OwnerToken};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};

/// The most often a waiter refreshes its entry; the least often is [`MAX_REFRESH`]. A
/// pushed grant's lease counts from the last refresh sent before it (the grant happened
/// after that refresh ran), so a refresh every TTL/4 costs a pushed grant at most a quarter
/// of its validity.
const MIN_REFRESH: Duration = Duration::from_millis(20);
const MAX_REFRESH: Duration = Duration::from_secs(1);
/// An entry lives three refresh intervals and this much more without a refresh: a waiter
/// whose refreshes are late (a loaded machine, a slow link) keeps its place.
const LIVE_PAD: Duration = Duration::from_millis(200);

/// The grants a backend's waiters expect, by owner token: the listener delivers each
/// `g:<token>:<fence>` message of a subscribed channel here.
#[derive(Clone, Debug, Default)]
pub(crate) struct Grants(Arc<Mutex<HashMap<String, oneshot::Sender<u64>>>>);

impl Grants {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<u64>>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers `token`; the receiver gets the fence of its grant.
    fn expect(&self, token: &str) -> oneshot::Receiver<u64> {
        let (sender, receiver) = oneshot::channel();
        self.map().insert(token.to_owned(), sender);
        receiver
    }

    fn forget(&self, token: &str) {
        self.map().remove(token);
    }

    /// Handles a channel message; false when it is not a grant (a release announcement).
    /// A grant for a token nobody here expects (another process's waiter, or one of ours
    /// that left: its leaving releases what it was given) is ignored.
    pub(crate) fn deliver(&self, payload: &[u8]) -> bool {
        let Some(grant) = payload.strip_prefix(b"g:") else {
            return false;
        };
        let parsed = std::str::from_utf8(grant).ok().and_then(|grant| {
            let (token, fence) = grant.rsplit_once(':')?;
            Some((token, fence.parse::<u64>().ok()?))
        });
        if let Some((token, fence)) = parsed
            && let Some(sender) = self.map().remove(token)
        {
            let _ = sender.send(fence);
        }
        true
    }
}

/// A waiter's entry while it waits: its owner token and the grant it expects. Dropped without [`Place::settle`] (the
/// wait was cancelled, or failed), it takes the entry out of the queue in the background,
/// releasing the lock if a release handed it over meanwhile.
struct Place<'a> {
    backend: &'a RedisBackend,
    keys: [String; 4],
    owner: OwnerToken,
    token: String,
    grant: oneshot::Receiver<u64>,
    /// Whether the next queue call joins (a new token) rather than refreshes.
    join: bool,
    /// When the entry and any grant to it have run out on the server anyway.
    expires: Instant,
    settled: bool,
}

impl<'a> Place<'a> {
    fn new(backend: &'a RedisBackend, keys: [String; 4], expires: Instant) -> Self {
        let owner = OwnerToken::random();
        let token = crate::node::token_hex(owner);
        let grant = backend.nodes().grants.expect(&token);
        Place {
            backend,
            keys,
            owner,
            token,
            grant,
            join: true,
            expires,
            settled: false,
        }
    }

    /// Starts over under a new token (see [`InLine::Gone`]). The old token may hold a grant
    /// on its way out (a renewal found it gone) or nothing: either way its release in the
    /// background leaves nothing behind.
    fn rejoin(&mut self) {
        let fresh = Place::new(self.backend, self.keys.clone(), self.expires);
        // Dropping the old place forgets its grant and releases its token.
        drop(std::mem::replace(self, fresh));
    }

    fn settle(&mut self) {
        self.settled = true;
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.backend.nodes().grants.forget(&self.token);
        if !self.settled {
            self.backend.leave_queue_in_background(
                Target::Lock(self.keys.clone()),
                self.token.clone(),
                self.expires,
            );
        }
    }
}

/// Waits in `key`'s queue until the lock is handed over (`Ok(Some)`) or `deadline` passes
/// (`Ok(None)`, the entry taken out). A wait that is cancelled or fails takes its entry (or
/// a grant to it) back in the background.
pub(crate) async fn wait_in_line(
    backend: &RedisBackend,
    key: &LockKey,
    ttl_ms: u64,
    deadline: Instant,
) -> Result<Option<Lease>, LockError> {
    let nodes = backend.nodes();
    let node = nodes
        .nodes
        .first()
        .ok_or_else(|| LockError::InvalidConfig("no redis node".into()))?;
    let granted = Duration::from_millis(ttl_ms);
    let refresh = (granted / 4).clamp(MIN_REFRESH, MAX_REFRESH);
    let live = refresh * 3 + LIVE_PAD;
    let live_ms = crate::node::ttl_millis(live);
    // Grant messages: the key's channel stays subscribed while this handle lives, and the
    // subscription is confirmed before the entry exists, so no grant goes unheard. (A grant
    // missed anyway, e.g. across a reconnect of the listener, is found by the next refresh.)
    // The handle also hears release announcements: a lock left free with entries waiting (a
    // hand-over that gave up after 64 dead entries) makes the waiters refresh at once.
    let mut releases = nodes.hub.subscribe(key.as_str());
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .min(Duration::from_secs(1));
    nodes.subscribe(key.as_str(), 1, wait).await;
    let mut place = Place::new(
        backend,
        nodes.scheme.lock_keys(key),
        Instant::now() + granted + live,
    );
    let lease = |owner: OwnerToken, fence: u64, ttl: Duration, since: Instant| {
        Lease::new(key.clone(), owner, Some(FencingToken(fence)), ttl, since)
    };
    loop {
        let sent_at = Instant::now();
        // A grant can come up to `live` after this refresh and then lasts its TTL.
        place.expires = sent_at + live + granted;
        let join = std::mem::replace(&mut place.join, false);
        let answer = node
            .queue(&place.keys, &place.token, ttl_ms, live_ms, join)
            .await?;
        let mut given = None;
        match answer {
            InLine::Granted(fence) => given = Some(lease(place.owner, fence, granted, sent_at)),
            // The TTL started before this call, at the release; the remaining TTL, counted
            // from the call's sending, ends no later than the server's.
            InLine::Handed(fence, pttl) if pttl > 0 => {
                let left = Duration::from_millis(pttl.unsigned_abs());
                given = Some(lease(place.owner, fence, left, sent_at));
            }
            // Handed over, but its TTL ran out as we asked: our entry is gone.
            InLine::Handed(..) => sleep_until((sent_at + MIN_REFRESH).min(deadline)).await,
            // Our entry was dropped (we were late refreshing it), or a grant to it ran out
            // unnoticed: join again under a new token, so that no grant to the old one can
            // be taken for one made after this.
            InLine::Gone => place.rejoin(),
            InLine::Waiting(pttl) => {
                let mut next = sent_at + refresh;
                // A holder that stops renewing frees the lock at its expiry: be there.
                if let Ok(pttl) = u64::try_from(pttl) {
                    next = next.min(sent_at + Duration::from_millis(pttl + 1));
                }
                let pushed = if sent_at < deadline {
                    tokio::select! {
                        biased;
                        fence = &mut place.grant => match fence {
                            Ok(fence) => Some(fence),
                            // The registration is gone (cannot happen while we wait):
                            // register again (a spent receiver must not be polled) and refresh.
                            Err(_) => {
                                place.grant = nodes.grants.expect(&place.token);
                                None
                            }
                        },
                        _ = releases.next(next.min(deadline)) => None,
                    }
                } else {
                    // Out of time, but a grant already came: keep it rather than give it back.
                    place.grant.try_recv().ok()
                };
                // A grant pushed now was made after this refresh found us waiting (a token
                // joins once, so an earlier grant would have answered "handed" or "gone"):
                // its TTL started after `sent_at`.
                given = pushed.map(|fence| lease(place.owner, fence, granted, sent_at));
            }
        }
        if let Some(lease) = given {
            if let Some(lease) = settle_grant(backend, node, lease, granted).await? {
                place.settle();
                return Ok(Some(lease));
            }
            // Renewing it found it gone (it ran out on the way, or a failover lost the
            // hand-over): wait again under a new token.
            place.rejoin();
        }
        if Instant::now() >= deadline && sent_at >= deadline {
            break;
        }
    }
    // Out of time: leave the queue now; a grant that came meanwhile is released by it.
    match node.release(&place.keys, &place.token).await {
        Ok(_) => place.settle(),
        Err(error) => {
            tracing::debug!(%error, "leaving the queue failed; leaving in the background")
        }
    }
    Ok(None)
}

/// A granted lease as the caller gets it. Renewed once (which counts its validity from now)
/// when writes must reach replicas (`wait_replicas`: neither the release's hand-over nor the
/// queue call waited for replicas) or when less than half its TTL is left (with a short TTL, a
/// grant pushed long after the last refresh would otherwise be too close to its deadline to
/// hand out). `None` when the renewal found the lock gone.
async fn settle_grant(
    backend: &RedisBackend,
    node: &crate::node::Node,
    lease: Lease,
    ttl: Duration,
) -> Result<Option<Lease>, LockError> {
    let left = lease
        .valid_until()
        .saturating_duration_since(Instant::now());
    if !node.waits_for_replicas() && left * 2 >= ttl {
        return Ok(Some(lease));
    }
    match lock_core::LockBackend::renew(backend, &lease, ttl).await {
        Ok(renewed) => Ok(Some(renewed)),
        Err(error) if error.is_lost() => Ok(None),
        Err(error) => Err(error),
    }
}
