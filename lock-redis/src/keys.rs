//! From a lock key to Redis names: the lock key, the fence counter and the release channel.

use lock_core::{LockError, LockKey};
use std::fmt::Write;

/// Builds the Redis names for a lock key.
///
/// For key `k` and prefix `p` the names are `p{e}:lock` and `p{e}:rel:<db>`, where `e` is `k`
/// with `%`, `{` and `}` percent-encoded (`%25`, `%7B`, `%7D`). The encoding is injective and
/// `e` contains no brace, so the hash tag `{e}` is exactly the encoded key: no key can end its
/// hash tag early or forge another key's suffix. Pub/sub channels are global across databases,
/// so the channel also names the database.
///
/// Fence counters are kept per Redis Cluster hash slot, not per key: `p{t}:fence`, where `t`
/// is a short tag that hashes to the lock key's slot (see [`KeyScheme::fence_key`]). A lock and
/// its counter therefore always share one slot (one script may touch both, on a cluster too),
/// fences still strictly increase for every key (each key has exactly one counter, which only
/// goes up), and the counters are bounded: at most 16384 per prefix and database, however many
/// lock names are ever used. A counter per key would leave one key behind for every lock name
/// forever (a lock per order id grows the keyspace without end), and creating it made each
/// fresh-key acquire markedly more expensive on the server.
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

    /// The database number (part of every channel name).
    pub fn db(&self) -> i64 {
        self.db
    }

    /// [`KeyScheme::lock_key`] and [`KeyScheme::fence_key`] at once, encoding the key once.
    pub fn lock_and_fence_keys(&self, key: &LockKey) -> (String, String) {
        let base = self.base(key.as_str());
        let fence = self.fence_key_for_base(&base);
        let mut lock = base;
        lock.push_str(":lock");
        (lock, fence)
    }

    /// The Redis keys of the lock `key`, for its scripts: the lock key, the fence counter of
    /// its slot, and the lock's fair queue: a sorted set of waiting owner tokens scored by
    /// arrival (`<base>:q`) and a hash of each entry's liveness deadline and TTL with the
    /// arrival counter (`<base>:qd`). All in the lock key's hash slot.
    pub fn lock_keys(&self, key: &LockKey) -> [String; 4] {
        let base = self.base(key.as_str());
        let fence = self.fence_key_for_base(&base);
        let with = |suffix: &str| {
            let mut name = String::with_capacity(base.len() + suffix.len());
            name.push_str(&base);
            name.push_str(suffix);
            name
        };
        [with(":lock"), fence, with(":q"), with(":qd")]
    }

    /// The Redis keys of the semaphore `key`: the holders (a sorted set of `<count>:<token>`
    /// scored by expiry in server milliseconds), its meta hash (`limit`, `used`, the waiter
    /// `mark`) and the fence counter of its slot. All in the lock key's hash slot; the names
    /// end in `:sem` / `:sem:meta`, never `:lock`, so a semaphore and a lock of one name are
    /// unrelated.
    pub fn semaphore_keys(&self, key: &LockKey) -> [String; 3] {
        let base = self.base(key.as_str());
        let fence = self.fence_key_for_base(&base);
        [format!("{base}:sem"), format!("{base}:sem:meta"), fence]
    }

    /// The Redis keys of the reader-writer lock `key`: readers (a sorted set of tokens scored
    /// by expiry in server milliseconds), the writer (its token, with `PX`), the writer-intent
    /// mark (`PX` = [`lock_core::WRITER_INTENT`]), the waiter mark, and the fence counter of
    /// its slot. All in the lock key's hash slot.
    pub fn rw_keys(&self, key: &LockKey) -> [String; 5] {
        let base = self.base(key.as_str());
        let fence = self.fence_key_for_base(&base);
        [
            format!("{base}:rw:r"),
            format!("{base}:rw:w"),
            format!("{base}:rw:i"),
            format!("{base}:rw:m"),
            fence,
        ]
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

    /// The Redis key of the fencing counter of the lock's hash slot (never expires; shared by
    /// every lock key in that slot).
    pub fn fence_key(&self, key: &LockKey) -> String {
        self.fence_key_for_base(&self.base(key.as_str()))
    }

    fn fence_key_for_base(&self, base: &str) -> String {
        let slot = hash_slot(base.as_bytes());
        let tag = slot_tags()[usize::from(slot)];
        let mut out = String::with_capacity(self.prefix.len() + 16);
        out.push_str(&self.prefix);
        // Writing to a String cannot fail.
        let _ = write!(out, "{{{tag}}}:fence");
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

/// Number of Redis Cluster hash slots.
const SLOTS: u16 = 16384;

/// The Redis Cluster hash slot of `name` (CRC16/XMODEM of the hash tag, or of the whole name
/// when it has none, modulo 16384), as the cluster computes it.
pub(crate) fn hash_slot(name: &[u8]) -> u16 {
    static CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);
    let tagged = name.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &name[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    CRC16.checksum(tagged.unwrap_or(name)) % SLOTS
}

/// For every slot, the smallest number whose decimal form hashes to it: the hash tag of that
/// slot's fence counter. Built once (about 170 000 CRCs, a few milliseconds).
fn slot_tags() -> &'static [u32] {
    static TAGS: std::sync::LazyLock<Vec<u32>> = std::sync::LazyLock::new(|| {
        let mut tags = vec![u32::MAX; usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut candidate = 0u32;
        let mut text = String::new();
        while missing > 0 {
            text.clear();
            let _ = write!(text, "{candidate}");
            let slot = usize::from(hash_slot(text.as_bytes()));
            if tags[slot] == u32::MAX {
                tags[slot] = candidate;
                missing -= 1;
            }
            candidate += 1;
        }
        tags
    });
    &TAGS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The hash tag of a name: what Redis Cluster hashes.
    fn tag(name: &str) -> &str {
        let open = name.find('{').unwrap_or(0);
        let close = name[open..].find('}').map_or(0, |i| open + i);
        &name[open..=close]
    }

    #[test]
    fn names_are_injective_and_fences_share_the_lock_slot() -> Result<(), LockError> {
        let scheme = KeyScheme::new("dl:", 0)?;
        let keys = [
            "a", "a}", "a}:lock", "a}:fence", "{a}", "a%7D", "a%", "%7D", "}", "{", "a:lock",
            "a:fence", "123", "0",
        ];
        let mut locks = HashSet::new();
        for key in keys {
            let key = LockKey::new(key)?;
            let lock = scheme.lock_key(&key);
            let fence = scheme.fence_key(&key);
            assert_eq!(
                scheme.lock_and_fence_keys(&key),
                (lock.clone(), fence.clone())
            );
            let channel = scheme.channel(key.as_str());
            // The release script derives the channel from the lock key this way.
            assert_eq!(
                channel,
                format!("{}rel:{}", &lock[..lock.len() - 4], scheme.db())
            );
            assert!(locks.insert(lock.clone()), "{lock} repeated");
            assert_ne!(lock, fence);
            assert_eq!(tag(&lock).matches('{').count(), 1);
            assert_eq!(tag(&channel), tag(&lock));
            assert_eq!(
                hash_slot(lock.as_bytes()),
                hash_slot(fence.as_bytes()),
                "{lock} and {fence} are in different slots"
            );
            // Semaphore and rwlock keys share the slot; the scripts derive the channel from
            // the first of them by cutting its suffix.
            let queue = scheme.lock_keys(&key);
            assert_eq!(queue[0], lock);
            assert_eq!(queue[1], fence);
            for name in &queue {
                assert_eq!(hash_slot(name.as_bytes()), hash_slot(lock.as_bytes()));
            }
            assert!(locks.insert(queue[2].clone()) && locks.insert(queue[3].clone()));
            let sem = scheme.semaphore_keys(&key);
            let rw = scheme.rw_keys(&key);
            assert_eq!(sem[2], fence);
            assert_eq!(rw[4], fence);
            assert_eq!(
                format!("{}rel:{}", &sem[0][..sem[0].len() - 3], scheme.db()),
                channel
            );
            assert_eq!(
                format!("{}rel:{}", &rw[0][..rw[0].len() - 4], scheme.db()),
                channel
            );
            for name in sem.iter().chain(rw.iter()) {
                assert_eq!(hash_slot(name.as_bytes()), hash_slot(lock.as_bytes()));
                assert!(
                    locks.insert(name.clone()) || name == &fence,
                    "{name} repeated"
                );
            }
            // A fence counter is never a lock key (lock keys end in `:lock`).
            assert!(fence.ends_with(":fence") && !fence.ends_with(":lock"));
        }
        assert!(KeyScheme::new("a{b", 0).is_err());
        Ok(())
    }

    #[test]
    fn hash_slots_match_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(
            crc::Crc::<u16>::new(&crc::CRC_16_XMODEM).checksum(b"123456789"),
            0x31C3
        );
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"somekey"), 11058);
        assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"user1000"));
        // An empty tag does not count: the whole name is hashed.
        let whole = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM).checksum(b"foo{}{bar}") % SLOTS;
        assert_eq!(hash_slot(b"foo{}{bar}"), whole);
        assert_eq!(hash_slot(b"foo{{bar}}zap"), hash_slot(b"{bar"));
        assert_eq!(hash_slot(b"foo{bar}{zap}"), hash_slot(b"bar"));
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        let tags = slot_tags();
        assert_eq!(tags.len(), usize::from(SLOTS));
        for (slot, tag) in tags.iter().enumerate() {
            assert_eq!(usize::from(hash_slot(tag.to_string().as_bytes())), slot);
        }
    }

    #[test]
    fn fence_counters_are_bounded_by_the_slot_count() -> Result<(), LockError> {
        let scheme = KeyScheme::new("dl:", 0)?;
        let counters: HashSet<String> = (0..100_000)
            .map(|i| LockKey::new(format!("order:{i}")).map(|key| scheme.fence_key(&key)))
            .collect::<Result<_, _>>()?;
        assert!(
            counters.len() <= usize::from(SLOTS),
            "{} counters",
            counters.len()
        );
        Ok(())
    }
}
