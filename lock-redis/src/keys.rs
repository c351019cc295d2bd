//! From a lock key to Redis names: the lock key, the fence counter and the release channel.

use lock_core::{LockError, LockKey};
use std::fmt::Write;

/// Builds the Redis names for a lock key.
///
/// For key `k` and prefix `p` the names are `p{e}:lock`, `p{e}:fence` and `p{e}:rel:<db>`,
/// where `e` is `k` with `%`, `{` and `}` percent-encoded (`%25`, `%7B`, `%7D`). The encoding
/// is injective and `e` contains no brace, so the hash tag `{e}` is exactly the encoded key:
/// the lock and its fence counter always share one Redis Cluster slot, and no key can end
/// its hash tag early or forge another key's suffix. Pub/sub channels are global across
/// databases, so the channel also names the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyScheme {
    prefix: String,
    db: i64,
}

impl KeyScheme {
    /// A scheme with `prefix` (which must not contain `{` or `}`: they would move the hash tag)
    /// for database `db`.
    pub fn new(prefix: impl Into<String>, db: i64) -> Result<Self, LockError> {
        let prefix = prefix.into();
        if prefix.contains(['{', '}']) {
            return Err(LockError::InvalidConfig(format!(
                "redis key prefix {prefix:?} must not contain `{{` or `}}` (they would change the hash tag)"
            )));
        }
        Ok(KeyScheme { prefix, db })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn base(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + key.len() + 16);
        out.push_str(&self.prefix);
        out.push('{');
        for ch in key.chars() {
            match ch {
                '%' => out.push_str("%25"),
                '{' => out.push_str("%7B"),
                '}' => out.push_str("%7D"),
                other => out.push(other),
            }
        }
        out.push('}');
        out
    }

    /// The Redis key holding the owner token while the lock is held.
    pub fn lock_key(&self, key: &LockKey) -> String {
        let mut out = self.base(key.as_str());
        out.push_str(":lock");
        out
    }

    /// The Redis key of the lock's fencing counter (never expires).
    pub fn fence_key(&self, key: &LockKey) -> String {
        let mut out = self.base(key.as_str());
        out.push_str(":fence");
        out
    }

    /// The pub/sub channel a release of the lock is announced on.
    pub fn channel(&self, key: &str) -> String {
        let mut out = self.base(key);
        // Writing to a String cannot fail.
        let _ = write!(out, ":rel:{}", self.db);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_injective_and_share_a_hash_tag() -> Result<(), LockError> {
        let scheme = KeyScheme::new("dl:", 0)?;
        let keys = [
            "a", "a}", "a}:lock", "a}:fence", "{a}", "a%7D", "a%", "%7D", "}", "{", "a:lock",
            "a:fence",
        ];
        let mut seen = HashSet::new();
        for key in keys {
            let key = LockKey::new(key)?;
            let lock = scheme.lock_key(&key);
            let fence = scheme.fence_key(&key);
            assert!(seen.insert(lock.clone()), "{lock} repeated");
            assert!(seen.insert(fence.clone()), "{fence} repeated");
            let tag = |name: &str| {
                let open = name.find('{').unwrap_or(0);
                let close = name[open..].find('}').map(|i| open + i).unwrap_or(0);
                name[open..=close].to_owned()
            };
            assert_eq!(tag(&lock), tag(&fence));
            assert_eq!(tag(&lock).matches('{').count(), 1);
        }
        assert!(KeyScheme::new("a{b", 0).is_err());
        Ok(())
    }
}
