//! Release announcements heard from several nodes count once.
//!
//! With Redlock, a release runs its script on every node and each node's script announces it
//! on the key's channel, so each node's listener hears the same release. Passed to the hub
//! each time, one release handed a wake to as many local waiters as there are nodes, each of
//! which spent a round of attempts to find the lock taken by the first (#13: "a release wakes
//! one local waiter per key"). A lock's release announcement carries the releaser's owner
//! token, which names one release: the second and later copies are dropped here.

use std::collections::HashMap;
use std::sync::Mutex;

/// Keys remembered at most; past it the memory starts over (a forgotten key costs at most one
/// extra wake-up).
const CAPACITY: usize = 4096;

/// The last announcement heard per key, shared by a backend's node listeners.
#[derive(Debug, Default)]
pub(crate) struct Heard {
    last: Mutex<HashMap<String, Vec<u8>>>,
}

impl Heard {
    /// Whether announcement `payload` of `key` is news: false for a copy of the last one heard
    /// for the key. Announcements that name no release (`1`: semaphores, reader-writer locks,
    /// an older release script) are always news.
    pub(crate) fn is_news(&self, key: &str, payload: &[u8]) -> bool {
        if payload == b"1" {
            return true;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.get(key).is_some_and(|seen| seen.as_slice() == payload) {
            return false;
        }
        if last.len() >= CAPACITY && !last.contains_key(key) {
            last.clear();
        }
        last.insert(key.to_owned(), payload.to_vec());
        true
    }

    /// `key` has no waiters left here.
    pub(crate) fn forget(&self, key: &str) {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_counts_once_and_the_next_one_again() {
        let heard = Heard::default();
        assert!(heard.is_news("k", b"aa"));
        assert!(!heard.is_news("k", b"aa"), "a copy from another node");
        assert!(heard.is_news("other", b"aa"), "another key");
        assert!(heard.is_news("k", b"bb"), "the next release");
        assert!(heard.is_news("k", b"1") && heard.is_news("k", b"1"));
        heard.forget("k");
        assert!(heard.is_news("k", b"bb"), "forgotten with its last waiter");
    }
}
