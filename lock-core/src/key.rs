//! Validated lock names.

use crate::LockError;
use std::fmt;
use std::sync::Arc;

/// Longest accepted key, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 512;

/// A validated lock name: 1..=512 bytes of UTF-8 with no NUL.
///
/// Backends map a key to their own namespace (a Redis key, an etcd range, a Postgres hash) and
/// must keep every key independent: a key that is a prefix of another, or contains `/`, `{`,
/// `}`, `:` or any backend suffix, is just another key.
///
/// Cheap to clone (shared): leases, guards and backend books all keep a copy.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockKey(Arc<str>);

impl LockKey {
    /// Validates `name` as a lock key.
    pub fn new(name: impl Into<String>) -> Result<Self, LockError> {
        let name = name.into();
        if name.is_empty() {
            return Err(LockError::InvalidKey("key is empty".into()));
        }
        if name.len() > MAX_KEY_LEN {
            return Err(LockError::InvalidKey(format!(
                "key is {} bytes long; the limit is {MAX_KEY_LEN}",
                name.len()
            )));
        }
        if name.contains('\0') {
            return Err(LockError::InvalidKey("key contains a NUL byte".into()));
        }
        Ok(LockKey(Arc::from(name)))
    }

    /// The key as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for LockKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for LockKey {
    type Error = LockError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        LockKey::new(value)
    }
}

impl TryFrom<String> for LockKey {
    type Error = LockError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        LockKey::new(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates() {
        assert!(LockKey::new("").is_err());
        assert!(LockKey::new("a\0b").is_err());
        assert!(LockKey::new("x".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(LockKey::new("x".repeat(MAX_KEY_LEN)).is_ok());
        assert_eq!(LockKey::new("a/b{c}:d").unwrap().as_str(), "a/b{c}:d");
        // Multi-byte characters count in bytes.
        assert!(LockKey::new("é".repeat(257)).is_err());
    }
}
