//! Semaphores and reader-writer locks (issue #14), in the style of the lock: one lease per
//! holder, holder keys attached to it, every decision one txn whose compares make it atomic.
//!
//! A name `k` owns `<prefix>/%sync/<enc(k)>/` (disjoint from every lock range, see
//! [`sync_range`]):
//!
//! - `s/<lease hex>`: a semaphore holder, value `<owner token> <count> <limit>`. Every holder
//!   records the limit it was admitted under, so "limits must agree while permits are held"
//!   is read from the holders themselves and nothing outlives the last holder.
//! - `r/<lease hex>` readers and `w/<lease hex>` writers, value `<owner token>`.
//! - `i/<lease hex>`: a refused writer's intent, on a lease of its own with TTL
//!   [`WRITER_INTENT`]; while one lives no new reader is admitted.
//!
//! Fences are the create revision of the holder's key, as for locks: etcd's revision is one
//! counter for the whole store, so a writer's fence exceeds every earlier holder's and a
//! reader's every earlier writer's.

use super::*;
use crate::keys::{sub_range, sync_range};
use lock_core::{LeaseKind, Releases, RwMode, WRITER_INTENT};
use std::collections::HashMap;
use tokio::task::JoinHandle;

/// Rounds of "read the holders, then create ours only if none was added since" before an
/// attempt under heavy churn gives up as held (the client tries again at once).
const CONTENDED_TRIES: usize = 8;

/// A refused writer of this backend re-marks its intent only when its last mark is older
/// than this: the client retries a waiting writer at least every WRITER_INTENT / 2, so a mark
/// refreshed after WRITER_INTENT / 4 never lapses while the writer waits, and a stream of
/// refusals (every reader's release wakes the writer) costs one lease per 500 ms, not one per
/// attempt.
const INTENT_REFRESH: Duration = Duration::from_millis(500);

/// How often an idle release follower checks whether anybody still listens.
const FOLLOWER_IDLE_CHECK: Duration = Duration::from_secs(1);

/// The value a holder key carries for `lease`: renew and release compare it, so a forged
/// owner token (or another kind) matches nothing.
pub(super) fn holder_value(owner: OwnerToken, kind: LeaseKind) -> String {
    match kind {
        LeaseKind::Permits { limit, count } => format!("{owner} {count} {limit}"),
        _ => owner.to_string(),
    }
}

/// `(count, limit)` of a semaphore holder key.
fn parse_holder(kv: &KeyValue) -> Result<(u32, u32), LockError> {
    let value = std::str::from_utf8(kv.value()).unwrap_or_default();
    let mut parts = value.split(' ').skip(1).map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(count)), Some(Ok(limit))) => Ok((count, limit)),
        _ => Err(LockError::backend_msg(
            BACKEND,
            format!("malformed semaphore holder value {value:?}"),
            false,
        )),
    }
}

fn empty(range: &[u8]) -> Compare {
    Compare::create_revision(range.to_vec(), CompareOp::Equal, 0).with_prefix()
}

impl EtcdBackend {
    /// See [`LockBackend::try_acquire_permits`].
    ///
    /// Lease grant, then a txn *if no holder exists, put mine, else read the holders*. If the
    /// permits in use + `count` fit, a second txn *if no holder key has a mod revision above
    /// that read's revision, put mine* (new holders are what could break the count; a
    /// deletion only frees permits), repeated with the fresh read it returns on failure.
    pub(super) async fn permits(
        &self,
        key: &LockKey,
        limit: u32,
        count: u32,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        validate_ttl(ttl)?;
        lock_core::check_permits(key, limit, count)?;
        let inner = &self.inner;
        let holders = sub_range(&sync_range(&inner.config.prefix, key), "s");
        let owner = OwnerToken::random();
        let kind = LeaseKind::Permits { limit, count };
        let sent_at = Instant::now();
        let (lease_id, granted, mut revoke) = inner.grant_guarded(ttl).await?;
        let entry = entry_key(&holders, lease_id);
        let put = TxnOp::put(
            entry.clone(),
            holder_value(owner, kind),
            Some(PutOptions::new().with_lease(lease_id)),
        );
        let read = TxnOp::get(holders.clone(), Some(GetOptions::new().with_prefix()));
        // Uncontended: one txn.
        let mut guard = empty(&holders);
        for _ in 0..CONTENDED_TRIES {
            let txn = Txn::new()
                .when([guard.clone()])
                .and_then([put.clone()])
                .or_else([read.clone()]);
            let answer = inner.txn("semaphore txn", txn).await?;
            let created = if answer.succeeded() {
                Some(revision(&answer)?)
            } else {
                let current = range_answer(&answer, 0);
                // A retried txn whose first try had in fact put our key.
                let mine = current.iter().find(|kv| kv.lease() == lease_id);
                match mine {
                    Some(mine) => Some(mine.create_revision()),
                    None => {
                        let mut used = 0_u64;
                        for holder in &current {
                            let (their_count, their_limit) = parse_holder(holder)?;
                            if their_limit != limit {
                                // `revoke` drops: our unused lease goes in the background.
                                return Err(lock_core::limit_mismatch(key, their_limit, limit));
                            }
                            used += u64::from(their_count);
                        }
                        if used + u64::from(count) > u64::from(limit) {
                            return Ok(Attempt::Held { expires_in: None });
                        }
                        guard = Compare::mod_revision(
                            holders.clone(),
                            CompareOp::Less,
                            revision(&answer)? + 1,
                        )
                        .with_prefix();
                        None
                    }
                }
            };
            if let Some(created) = created {
                let lease = lease_for(key, owner, created, entry, lease_id, granted, sent_at)?
                    .with_kind(kind);
                revoke.disarm();
                return Ok(Attempt::Acquired(lease));
            }
        }
        // Holders kept changing under us: not a refusal, so try again at once.
        Ok(Attempt::Held {
            expires_in: Some(Duration::ZERO),
        })
    }

    /// See [`LockBackend::try_acquire_rw`].
    ///
    /// Lease grant, then one txn: a reader *if no writer and no writer intent exists, put
    /// mine*; a writer *if no reader and no writer exists, put mine and delete the intents*.
    /// A refused writer then puts an intent key on a [`WRITER_INTENT`] lease of its own.
    pub(super) async fn rw(
        &self,
        key: &LockKey,
        mode: RwMode,
        ttl: Duration,
    ) -> Result<Attempt, LockError> {
        validate_ttl(ttl)?;
        let inner = &self.inner;
        let sync = sync_range(&inner.config.prefix, key);
        let (readers, writers, intents) = (
            sub_range(&sync, "r"),
            sub_range(&sync, "w"),
            sub_range(&sync, "i"),
        );
        let owner = OwnerToken::random();
        let sent_at = Instant::now();
        let (lease_id, granted, mut revoke) = inner.grant_guarded(ttl).await?;
        let (kind, entry, admit) = match mode {
            RwMode::Read => (
                LeaseKind::Read,
                entry_key(&readers, lease_id),
                vec![empty(&writers), empty(&intents)],
            ),
            RwMode::Write => (
                LeaseKind::Write,
                entry_key(&writers, lease_id),
                vec![empty(&readers), empty(&writers)],
            ),
        };
        let mut ops = vec![TxnOp::put(
            entry.clone(),
            holder_value(owner, kind),
            Some(PutOptions::new().with_lease(lease_id)),
        )];
        if mode == RwMode::Write {
            // The writer got in: the marks that kept readers out have done their job.
            ops.push(TxnOp::delete(
                intents.clone(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ));
        }
        let txn = Txn::new().when(admit).and_then(ops).or_else([
            TxnOp::get(entry.clone(), Some(GetOptions::new().with_keys_only())),
            TxnOp::get(
                intents.clone(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        ]);
        let answer = inner.txn("rwlock txn", txn).await?;
        let created = if answer.succeeded() {
            Some(revision(&answer)?)
        } else {
            // A retried txn whose first try had in fact put our key.
            range_answer(&answer, 0)
                .first()
                .filter(|kv| kv.lease() == lease_id)
                .map(KeyValue::create_revision)
        };
        if let Some(created) = created {
            if mode == RwMode::Write {
                lock(&inner.intents).remove(&intents);
            }
            let lease =
                lease_for(key, owner, created, entry, lease_id, granted, sent_at)?.with_kind(kind);
            revoke.disarm();
            return Ok(Attempt::Acquired(lease));
        }
        // Our unused lease is revoked in the background.
        drop(revoke);
        let marks = range_answer(&answer, 1);
        let fresh_mark = lock(&inner.intents).get(&intents).is_some_and(|(id, at)| {
            at.elapsed() < INTENT_REFRESH
                && marks.iter().any(|kv| kv.key() == entry_key(&intents, *id))
        });
        if mode == RwMode::Write
            && !fresh_mark
            && let Err(error) = self.mark_writer_intent(&intents).await
        {
            // The next attempt (within WRITER_INTENT / 2) marks again.
            tracing::debug!(%error, "could not mark a waiting writer's intent");
        }
        Ok(Attempt::Held { expires_in: None })
    }

    /// Puts an intent key under `intents` on a fresh lease of [`WRITER_INTENT`]: it keeps new
    /// readers out until it expires (or a writer gets in and deletes it).
    async fn mark_writer_intent(&self, intents: &[u8]) -> Result<(), LockError> {
        let inner = &self.inner;
        // Taken before the grant: the mark lives at least WRITER_INTENT from here.
        let at = Instant::now();
        let (lease_id, _, mut revoke) = inner.grant_guarded(WRITER_INTENT).await?;
        let mark = Txn::new().and_then([TxnOp::put(
            entry_key(intents, lease_id),
            "",
            Some(PutOptions::new().with_lease(lease_id)),
        )]);
        inner.txn("writer intent put", mark).await?;
        revoke.disarm();
        let mut marks = lock(&inner.intents);
        // Marks of writers that gave up are forgotten (their leases expire on their own).
        marks.retain(|_, (_, marked)| marked.elapsed() < WRITER_INTENT);
        marks.insert(intents.to_vec(), (lease_id, at));
        Ok(())
    }

    /// See [`LockBackend::subscribe`]: the first subscription of a name starts a follower
    /// that watches the lock range and the sync range of that name for deletes (a release,
    /// a revoke, an expiry) and wakes every subscriber of the name on each.
    pub(super) async fn subscribe_releases(&self, key: &LockKey) -> Result<Releases, LockError> {
        let inner = &self.inner;
        let name = key.as_str();
        let releases = inner.hub.subscribe(name);
        // One follower per name, restarted if it ended (its runtime shut down).
        let running = |followers: &HashMap<String, JoinHandle<()>>| {
            followers
                .get(name)
                .is_some_and(|follower| !follower.is_finished())
        };
        if running(&lock(&inner.followers)) {
            return Ok(releases);
        }
        // Deletes after this revision are seen; the caller tries again after subscribing, so
        // it sees everything before. Without it (etcd unreachable) the follower reads it
        // itself and wakes the subscribers once, as a release may have been missed.
        let from = match inner.current_revision().await {
            Ok(from) => Some(from),
            Err(error) => {
                tracing::debug!(%error, "subscribe: revision read failed");
                None
            }
        };
        let mut followers = lock(&inner.followers);
        if !running(&followers)
            && let Some(follower) =
                lock_core::spawn_background(follow_releases(inner.clone(), key.clone(), from))
        {
            followers.insert(name.to_owned(), follower);
        }
        Ok(releases)
    }
}

impl Inner {
    /// The store's current revision (a linearizable read). It reads one key no holder uses
    /// (the header carries the store's revision): a prefix read would make etcd count every
    /// sync key of every name on each first subscription.
    pub(super) async fn current_revision(&self) -> Result<i64, LockError> {
        let client = self.connection.client();
        let key = format!("{}/%sync/", self.config.prefix);
        let answer = self
            .call("revision read", || {
                let mut kv = client.kv_client();
                let key = key.clone();
                async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await?;
        answer
            .header()
            .map(|header| header.revision())
            .ok_or_else(|| LockError::backend_msg(BACKEND, "get answer without a header", false))
    }
}

/// Wakes the subscribers of `key` on every delete in its lock range or sync range after
/// revision `from`, until nobody subscribes to it any more. Each wake-up re-arms both watches
/// from the waking delete's revision + 1: a subscriber woken at revision R reads a state that
/// includes every delete up to R, so nothing in between is missed. An interrupted watch
/// (broken stream, compacted revision) wakes everybody and re-arms from the current revision.
async fn follow_releases(inner: Arc<Inner>, key: LockKey, from: Option<i64>) {
    let name = key.as_str();
    let ranges = [
        key_range(&inner.config.prefix, &key),
        sync_range(&inner.config.prefix, &key),
    ];
    // Ends the follower if nobody listens any more. Checked under the followers' lock, which
    // `subscribe` takes after subscribing: a new subscriber either is seen here or finds no
    // running follower and starts one.
    let idle = || {
        let mut followers = lock(&inner.followers);
        let idle = !inner.hub.has_waiters(name);
        if idle {
            followers.remove(name);
        }
        idle
    };
    let mut from = match from {
        Some(from) => from,
        None => loop {
            if idle() {
                return;
            }
            match inner.current_revision().await {
                Ok(now) => {
                    inner.hub.notify(name);
                    break now;
                }
                Err(_) => sleep(Duration::from_millis(200)).await,
            }
        },
    };
    loop {
        let mut lock_deletes = inner
            .watcher
            .on_delete_in(ranges[0].clone(), from + 1)
            .await;
        let mut sync_deletes = inner
            .watcher
            .on_delete_in(ranges[1].clone(), from + 1)
            .await;
        let woken = loop {
            tokio::select! {
                at = lock_deletes.deleted_at() => break at,
                at = sync_deletes.deleted_at() => break at,
                () = sleep(FOLLOWER_IDLE_CHECK) => {
                    if idle() {
                        return;
                    }
                }
            }
        };
        if idle() {
            return;
        }
        match woken {
            Some(at) => from = from.max(at),
            None => {
                sleep(Duration::from_millis(20)).await;
                match inner.current_revision().await {
                    Ok(now) => from = now,
                    Err(error) => {
                        tracing::debug!(%error, "release follower cannot read the revision");
                        sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
        }
        inner.hub.notify(name);
    }
}
