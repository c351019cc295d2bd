//! Lock keys: the advisory key a lock name hashes to, and the waiter-interest key beside it.

use super::*;

/// The waiter-interest key of advisory key `hash`: the same 64 bits in the two-int keyspace
/// (`pg_locks.objsubid` 2), which never meets the one-bigint keyspace of the locks.
pub fn waiter_key(hash: i64) -> (i32, i32) {
    ((hash >> 32) as i32, hash as i32)
}

/// The transaction-level advisory lock that serializes creating the fence sequence: a
/// constant pair in the two-int keyspace, which no user key reaches (user keys are one
/// bigint; waiter keys are pairs but derived from a 64-bit hash, so meeting this one is a
/// 2^-64 accident that would only make setup wait behind a waiter).
pub const SETUP_LOCK: (i32, i32) = (0x6469_7374, 0x6c6f_636b);

/// First int of every holder session's *alive key* `(HOLDER_ALIVE_CLASS, pg_backend_pid())`
/// in the two-int keyspace: taken exclusively when the session connects and never given back,
/// so it goes exactly when the session ends. A blocker (`blocker.rs`) waits for a lock's
/// holder session to end by asking for that key shared: it meets no user key, so waiting on
/// it never makes anyone's `pg_try_advisory_lock` of the lock fail. (A waiter key of a hash
/// whose high 32 bits are this constant and low 32 bits a live holder's pid can meet it: a
/// 2^-32 accident per key that only leaves that waiter on backoff.)
pub const HOLDER_ALIVE_CLASS: i32 = 0x646c_6b61;

/// The 64-bit advisory lock key for `key` in `namespace`: sqlx's [`PgAdvisoryLock::new`]
/// (HKDF-SHA256) over `namespace + "\0" + key`, or over `key` alone when the namespace is
/// empty (then it equals `PgAdvisoryLock::new(key)`, for interop with plain sqlx users).
///
/// Keys never contain NUL, so distinct (namespace, key) pairs hash distinct inputs. Two inputs
/// may still collide in 64 bits (about 1 in 2^32 for 2^16 live keys); a collision only makes
/// the two keys exclude each other. Fences come from one sequence, not from the hash, so they
/// stay correct.
pub fn advisory_key(namespace: &str, key: &str) -> i64 {
    let lock = if namespace.is_empty() {
        PgAdvisoryLock::new(key)
    } else {
        PgAdvisoryLock::new(format!("{namespace}\0{key}"))
    };
    lock.key().as_bigint().unwrap_or_default()
}

/// Entries [`Inner::key_cache`] holds before it starts over (a workload of ever-new keys,
/// e.g. one per order id, must not grow it without bound).
pub(crate) const KEY_CACHE_CAPACITY: usize = 4096;

impl Inner {
    /// [`advisory_key`] in this backend's namespace, through [`Inner::key_cache`]: acquire,
    /// renew and release of one key hash it once (the HKDF, and with a namespace the
    /// formatting of its input, cost about 1 µs; a lookup a few dozen ns).
    pub(crate) fn advisory_key(&self, key: &LockKey) -> i64 {
        if let Some(&hash) = lock(&self.key_cache).get(key) {
            return hash;
        }
        let hash = advisory_key(&self.config.namespace, key.as_str());
        let mut cache = lock(&self.key_cache);
        if cache.len() >= KEY_CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(key.clone(), hash);
        hash
    }
}
