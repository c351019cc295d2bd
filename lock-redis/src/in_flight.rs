//! Redlock acquire calls still on their way to a node after the acquire returned.
//!
//! A Redlock acquire returns once a quorum answered; its calls to the other nodes run on in
//! their own tasks. A release (or the roll-back of a refused round) sent right after can
//! reach such a node first: tasks do not run in spawn order, and a call may need a script
//! reload there. The late call then sets the key of a lease already given back, and the node
//! keeps it until its TTL: a stale minority key, not a second holder, but every later
//! acquirer then needs all the other nodes.
//!
//! So each call holds a [`CallGuard`]; when the call ends (answered, failed or cut off by the
//! node timeout) and the lease was given back meanwhile, the guard releases the token on its
//! node. Ordering makes that complete: the guard looks at the flag only after its call either
//! ran on the server or can no longer be sent, and a release sets the flag before it sends
//! anything, so any release the guard does not see goes out on the node's connection after
//! the late call and removes what it set.

use crate::node::Nodes;
use crate::shared::Target;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One acquire's token: whether its lease was given back, and how many of its node calls
/// have not ended.
#[derive(Debug)]
struct Flight {
    given_back: AtomicBool,
    pending: AtomicUsize,
}

/// A backend's acquires with node calls still running, by owner token (hex). An entry lives
/// until its acquire's last call ends, at most the node timeout.
#[derive(Debug, Default)]
pub(crate) struct CallsInFlight(Mutex<HashMap<Arc<str>, Arc<Flight>>>);

impl CallsInFlight {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Flight>>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers an acquire of `token` about to call `calls` nodes; each call gets a
    /// [`CallGuard`] from [`CallsInFlight::guard`].
    pub(crate) fn start(self: &Arc<Self>, token: &Arc<str>, calls: usize) -> Started {
        let flight = Arc::new(Flight {
            given_back: AtomicBool::new(false),
            pending: AtomicUsize::new(calls),
        });
        self.map().insert(token.clone(), flight.clone());
        Started {
            calls: self.clone(),
            token: token.clone(),
            flight,
        }
    }

    /// Marks `token`'s lease as given back: its calls still running release it on their node
    /// when they end. Call before sending the release.
    pub(crate) fn give_back(&self, token: &str) {
        if let Some(flight) = self.map().get(token) {
            flight.given_back.store(true, Ordering::SeqCst);
        }
    }
}

/// An acquire registered with [`CallsInFlight::start`].
#[derive(Debug)]
pub(crate) struct Started {
    calls: Arc<CallsInFlight>,
    token: Arc<str>,
    flight: Arc<Flight>,
}

impl Started {
    /// The guard one node call holds until it ends: `target` and `index` name what to release
    /// where, `limit` bounds that release.
    pub(crate) fn guard(
        &self,
        nodes: Arc<Nodes>,
        index: usize,
        target: Arc<Target>,
        limit: Duration,
    ) -> CallGuard {
        CallGuard {
            calls: self.calls.clone(),
            token: self.token.clone(),
            flight: self.flight.clone(),
            nodes,
            index,
            target,
            limit,
        }
    }

    /// Marks this acquire's lease as given back (a refused round's roll-back).
    pub(crate) fn give_back(&self) {
        self.flight.given_back.store(true, Ordering::SeqCst);
    }
}

/// Held by one node call of an acquire; see the module docs.
#[derive(Debug)]
pub(crate) struct CallGuard {
    calls: Arc<CallsInFlight>,
    token: Arc<str>,
    flight: Arc<Flight>,
    nodes: Arc<Nodes>,
    index: usize,
    target: Arc<Target>,
    limit: Duration,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.flight.given_back.load(Ordering::SeqCst)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (nodes, target, token) =
                (self.nodes.clone(), self.target.clone(), self.token.clone());
            let (index, limit) = (self.index, self.limit);
            runtime.spawn(async move {
                let Some(node) = nodes.nodes.get(index) else {
                    return;
                };
                match tokio::time::timeout(limit, target.release(node, &token)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => tracing::debug!(
                        %error, node = node.addr(),
                        "releasing a late acquire call failed; its TTL frees the key"
                    ),
                    Err(_) => tracing::debug!(
                        node = node.addr(),
                        "releasing a late acquire call timed out; its TTL frees the key"
                    ),
                }
            });
        }
        if self.flight.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut map = self.calls.map();
            if map
                .get(&self.token)
                .is_some_and(|flight| Arc::ptr_eq(flight, &self.flight))
            {
                map.remove(&self.token);
            }
        }
    }
}
