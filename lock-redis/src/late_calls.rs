//! Redlock acquire calls that end after their acquire returned.
//!
//! A Redlock acquire returns once a quorum answered; its calls to the other nodes run on in
//! their own tasks. A release (or the roll-back of a refused round) sent right after can
//! reach such a node first: tasks do not run in spawn order, and a call may need a script
//! reload there. The late call then sets the key of a lease already given back, and the node
//! keeps it until its TTL: a stale minority key, not a second holder, but every later
//! acquirer then needs all the other nodes.
//!
//! So each node call holds a [`NodeCallGuard`]; when the call ends (answered, failed or cut
//! off by the node timeout) and the lease was given back meanwhile, the guard releases the
//! token on its node. A release marks the lease given back before it sends anything, and the
//! guard looks only once its call ended, so a release the guard does not see goes out after
//! that: after the call ran on the server, or, for a call cut off unanswered, after it on the
//! same connection (commands on one connection run in order).
//!
//! Not covered: a call cut off unanswered whose connection is replaced before the release
//! goes out (a reconnect, a probe that found it dead, a Sentinel failover), if the old
//! connection's bytes still reach the server after the release's; and a release from another
//! backend instance (the registry is per instance). Such a key lives until its TTL, as before.
//!
//! An acquire round dropped midway (a direct caller of the backend cancelled it; the
//! `Locker` finishes dropped attempts itself) gives its lease back too: every node is
//! released in the background and calls still running release when they end.

use crate::node::Nodes;
use crate::shared::Target;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// A backend's acquire rounds with node calls still running: owner token (hex) → whether
/// the round's lease was given back. An entry lives as long as its round or one of the
/// round's calls does (at most the node timeout after the round returned).
#[derive(Debug, Default)]
pub(crate) struct LateCalls(Mutex<HashMap<Arc<str>, Arc<AtomicBool>>>);

impl LateCalls {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<AtomicBool>>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers an acquire round of `token` on `target`; each node call gets a guard from
    /// [`AcquireCalls::guard`]. `limit` bounds each release the guards send.
    pub(crate) fn start(
        self: &Arc<Self>,
        token: &Arc<str>,
        nodes: Arc<Nodes>,
        target: Arc<Target>,
        limit: Duration,
    ) -> AcquireCalls {
        let given_back = Arc::new(AtomicBool::new(false));
        self.map().insert(token.clone(), given_back.clone());
        let round = Round {
            registry: self.clone(),
            token: token.clone(),
            given_back,
            nodes,
            target,
            limit,
        };
        AcquireCalls {
            round: Arc::new(round),
            kept: false,
        }
    }

    /// Marks `token`'s lease as given back: its calls still running release it on their node
    /// when they end. Call before sending the release.
    pub(crate) fn give_back(&self, token: &str) {
        if let Some(given_back) = self.map().get(token) {
            given_back.store(true, Ordering::SeqCst);
        }
    }
}

/// What a round and its calls share. Its registry entry goes with the last of them.
#[derive(Debug)]
struct Round {
    registry: Arc<LateCalls>,
    token: Arc<str>,
    given_back: Arc<AtomicBool>,
    nodes: Arc<Nodes>,
    target: Arc<Target>,
    limit: Duration,
}

impl Drop for Round {
    fn drop(&mut self) {
        let mut map = self.registry.map();
        if map
            .get(&self.token)
            .is_some_and(|registered| Arc::ptr_eq(registered, &self.given_back))
        {
            map.remove(&self.token);
        }
    }
}

/// An acquire round registered with [`LateCalls::start`]. Dropped without
/// [`AcquireCalls::keep`] or [`AcquireCalls::give_back`] (the round was cancelled midway),
/// it gives the lease back and releases it on every node in the background.
#[derive(Debug)]
pub(crate) struct AcquireCalls {
    round: Arc<Round>,
    kept: bool,
}

impl AcquireCalls {
    /// The guard the call to node `index` holds until it ends.
    pub(crate) fn guard(&self, index: usize) -> NodeCallGuard {
        NodeCallGuard {
            round: self.round.clone(),
            index,
            key_possible: true,
        }
    }

    /// The round granted the lease: it stays ours until released.
    pub(crate) fn keep(&mut self) {
        self.kept = true;
    }

    /// The round was not granted: marks the lease given back before its roll-back is sent.
    pub(crate) fn give_back(&self) {
        self.round.given_back.store(true, Ordering::SeqCst);
    }
}

impl Drop for AcquireCalls {
    fn drop(&mut self) {
        let round = &self.round;
        if !self.kept && !round.given_back.swap(true, Ordering::SeqCst) {
            // Cancelled midway: nothing was rolled back. Calls that already answered "yes"
            // set the key; those still running see the mark when they end.
            for index in 0..round.nodes.nodes.len() {
                release_on_node(
                    &round.nodes,
                    &round.target,
                    &round.token,
                    index,
                    round.limit,
                );
            }
        }
    }
}

/// Held by one node call of an acquire round; see the module docs.
#[derive(Debug)]
pub(crate) struct NodeCallGuard {
    round: Arc<Round>,
    index: usize,
    /// False once the call's answer says it set nothing (the node refused: another holder).
    key_possible: bool,
}

impl NodeCallGuard {
    /// The call ended without setting our key on its node (refused by the script, or never
    /// sent): nothing to release there.
    pub(crate) fn set_nothing(&mut self) {
        self.key_possible = false;
    }
}

impl Drop for NodeCallGuard {
    fn drop(&mut self) {
        let round = &self.round;
        if self.key_possible && round.given_back.load(Ordering::SeqCst) {
            release_on_node(
                &round.nodes,
                &round.target,
                &round.token,
                self.index,
                round.limit,
            );
        }
    }
}

/// Releases `token` on node `index` in a task, bounded by `limit`; a failure is logged (the
/// key's TTL frees it). Outside a runtime (it is shutting down) nothing is sent: `None`.
pub(crate) fn release_on_node(
    nodes: &Arc<Nodes>,
    target: &Arc<Target>,
    token: &Arc<str>,
    index: usize,
    limit: Duration,
) -> Option<JoinHandle<()>> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("no runtime to release a Redlock token on; its TTL frees the key");
        return None;
    };
    let (nodes, target, token) = (nodes.clone(), target.clone(), token.clone());
    Some(runtime.spawn(async move {
        let Some(node) = nodes.nodes.get(index) else {
            return;
        };
        match tokio::time::timeout(limit, target.release(node, &token)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::debug!(
                %error, node = node.addr(),
                "releasing a Redlock token failed; its TTL frees the key"
            ),
            Err(_) => tracing::debug!(
                node = node.addr(),
                "releasing a Redlock token timed out; its TTL frees the key"
            ),
        }
    }))
}
