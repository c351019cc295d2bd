//! How lock keys map to etcd key ranges.
//!
//! A lock key `k` owns the range `<prefix>/<enc(k)>/`; each contender puts one key
//! `<prefix>/<enc(k)>/<lease id, 16 hex digits>` in it. `enc` percent-encodes `%` and `/` (and
//! nothing else), so it is injective and never contains `/`: the range of `a` can never hold a
//! key of `a/b` (`a%2Fb`) or of `ab`, and a key that contains `%2F` literally stays distinct
//! (`%252F`).

use lock_core::LockKey;

/// The range (a key prefix ending in `/`) that holds the queue of `key` under `prefix`.
pub fn key_range(prefix: &str, key: &LockKey) -> Vec<u8> {
    let mut range = Vec::with_capacity(prefix.len() + key.as_str().len() + 8);
    range.extend_from_slice(prefix.as_bytes());
    range.push(b'/');
    for byte in key.as_str().bytes() {
        match byte {
            b'%' => range.extend_from_slice(b"%25"),
            b'/' => range.extend_from_slice(b"%2F"),
            other => range.push(other),
        }
    }
    range.push(b'/');
    range
}

/// The range that holds the semaphore and the reader-writer lock named `key`:
/// `<prefix>/%sync/<enc(key)>/`. No lock range can hold it or lie inside it: a lock range is
/// `<prefix>/<enc(k)>/`, and `enc` never yields `%s` (every `%` it writes starts `%25` or
/// `%2F`). Under it: `s/` semaphore holders, `r/` readers, `w/` writers, `i/` writer intents,
/// each `<lease id in hex>`.
pub fn sync_range(prefix: &str, key: &LockKey) -> Vec<u8> {
    let mut range = prefix.as_bytes().to_vec();
    range.extend_from_slice(b"/%sync");
    // `key_range` gives `/<enc(key)>/` after the (here empty) prefix.
    range.extend_from_slice(&key_range("", key));
    range
}

/// A sub-range of a sync range (`s/`, `r/`, `w/`, `i/`).
pub fn sub_range(sync: &[u8], part: &str) -> Vec<u8> {
    let mut range = sync.to_vec();
    range.extend_from_slice(part.as_bytes());
    range.push(b'/');
    range
}

/// The queue entry of one contender: the range followed by its lease id in hex.
pub fn entry_key(range: &[u8], lease_id: i64) -> Vec<u8> {
    let mut key = range.to_vec();
    key.extend_from_slice(format!("{lease_id:016x}").as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(key: &str) -> Vec<u8> {
        key_range("p", &LockKey::new(key).unwrap())
    }

    #[test]
    fn ranges_never_nest() {
        let keys = [
            "a", "a/", "a/b", "ab", "a%2Fb", "a%", "%", "/", "a:b", "{a}",
        ];
        for x in keys {
            for y in keys {
                if x != y {
                    assert!(!range(y).starts_with(&range(x)), "{x:?} range holds {y:?}");
                }
            }
        }
        assert_eq!(range("a/b"), b"p/a%2Fb/");
        // Sync ranges are disjoint from every lock range and from each other.
        for x in keys {
            let sync = sync_range("p", &LockKey::new(x).unwrap());
            for y in keys {
                assert!(
                    !sync.starts_with(&range(y)),
                    "{y:?} lock range holds sync {x:?}"
                );
                assert!(
                    !range(y).starts_with(&sync),
                    "sync {x:?} holds lock range {y:?}"
                );
                let other = sync_range("p", &LockKey::new(y).unwrap());
                if x != y {
                    assert!(!other.starts_with(&sync), "sync {x:?} holds sync {y:?}");
                }
            }
        }
        assert_eq!(
            sync_range("p", &LockKey::new("a/b").unwrap()),
            b"p/%sync/a%2Fb/"
        );
        assert_eq!(entry_key(&range("a"), 0x2a), b"p/a/000000000000002a");
    }
}
