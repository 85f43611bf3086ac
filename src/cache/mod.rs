//! The conversation cache (SPEC §5): the store, its key, storage rules and single-flight.
//!
//! - [`CacheKey`] is built here: (account, conversation, token scope). Two tokens never share one.
//! - [`Store`] wraps a byte-weighted moka cache (the synchronous flavour: a lookup never
//!   awaits, so the hit path needs no future of its own). Freshness is decided on our own clock
//!   (`tokio::time::Instant` in each [`Entry`]); moka's per-entry expiry only reclaims memory.
//! - Validity against writes/purges/webhooks is the generation stamp
//!   ([`crate::invalidation::Generations`]) checked on every lookup: O(1) per write.
//! - [`flight`] makes concurrent misses and revalidations of one key share one upstream request.
//! - [`rules`] decides what may be stored and builds entries from upstream answers.

pub mod decimal;
pub mod entry;
pub mod flight;
pub mod rules;

use std::sync::Arc;
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::sync::Cache;
use tokio::time::Instant;

pub use entry::Entry;

use crate::auth::Scope;
use crate::invalidation::Generations;
use crate::metrics::{EvictionCause, Metrics};

/// The cache key. Holds the token *scope* (a keyed hash), never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub account: u64,
    pub conversation: u64,
    pub scope: Scope,
}

/// Freshness and size settings the store and the conversation handler share.
#[derive(Debug, Clone)]
pub struct CachePolicy {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub negative_ttl: Duration,
    pub max_object_bytes: u64,
}

impl CachePolicy {
    /// How long a positive entry is worth keeping at all.
    pub fn positive_lifetime(&self) -> Duration {
        self.ttl + self.stale_while_revalidate.max(self.stale_if_error)
    }
}

/// Where an entry stands in its life, for a request arriving now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve as `HIT`; `remaining` is the rest of the TTL.
    Fresh { remaining: Duration },
    /// Serve as `STALE` at once and revalidate in the background.
    StaleWhileRevalidate { stale_for: Duration },
    /// Revalidate before answering (the entry may still serve if that fails).
    MustRevalidate,
}

impl CachePolicy {
    pub fn freshness(&self, entry: &Entry, now: Instant) -> Freshness {
        let age = entry.age(now);
        let ttl = if entry.is_negative() {
            self.negative_ttl
        } else {
            self.ttl
        };
        if age < ttl {
            Freshness::Fresh {
                remaining: ttl - age,
            }
        } else if !entry.is_negative() && age < ttl + self.stale_while_revalidate {
            Freshness::StaleWhileRevalidate {
                stale_for: age - ttl,
            }
        } else {
            Freshness::MustRevalidate
        }
    }

    /// How long a failed revalidation holds off the next one for the same entry.
    pub fn failure_backoff(&self) -> Duration {
        self.ttl.min(entry::FAILURE_BACKOFF)
    }

    /// Whether a positive entry may still be served because the upstream failed.
    pub fn usable_if_error(&self, entry: &Entry, now: Instant) -> bool {
        !entry.is_negative() && entry.age(now) < self.ttl + self.stale_if_error
    }
}

struct EntryExpiry;

impl moka::Expiry<CacheKey, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }
}

/// The bounded conversation store plus the generation counters and in-flight fetches.
pub struct Store {
    entries: Cache<CacheKey, Arc<Entry>>,
    pub generations: Generations,
    pub flights: flight::Flights,
    pub policy: CachePolicy,
}

impl Store {
    pub fn new(max_bytes: u64, policy: CachePolicy, metrics: Arc<Metrics>) -> Store {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, v: &Arc<Entry>| v.weight)
            .expire_after(EntryExpiry)
            .eviction_listener(move |_k, _v, cause| {
                // Runs inline during housekeeping: counters only, never block.
                metrics.eviction(match cause {
                    RemovalCause::Size => EvictionCause::Size,
                    RemovalCause::Expired => EvictionCause::Expired,
                    RemovalCause::Explicit => EvictionCause::Explicit,
                    RemovalCause::Replaced => EvictionCause::Replaced,
                });
            })
            .build();
        Store {
            entries,
            generations: Generations::new(),
            flights: flight::Flights::default(),
            policy,
        }
    }

    /// The current stamp for `key`.
    pub fn stamp(&self, key: &CacheKey) -> u64 {
        self.generations
            .stamp(key.account, key.conversation, key.scope)
    }

    /// A usable entry for `key`: present, not invalidated since its fetch began, and (for a
    /// negative entry) still within the negative TTL.
    ///
    /// An entry found dead is removed here, so it stops holding capacity until moka's expiry
    /// and the `entries`/`stored_bytes` gauges and `evictions_total{cause="explicit"}` show
    /// invalidations. Benign race: a valid entry inserted for `key` between the `get` and the
    /// removal (a fetch finishing concurrently) is removed too; that costs one extra miss,
    /// never a wrong answer.
    pub fn lookup(&self, key: &CacheKey, now: Instant) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key)?;
        if entry.stamp != self.stamp(key)
            || (entry.is_negative() && entry.age(now) >= self.policy.negative_ttl)
        {
            self.entries.invalidate(key);
            return None;
        }
        Some(entry)
    }

    /// Stores `entry` unless it was invalidated while it was being fetched.
    pub fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        if entry.stamp == self.stamp(&key) {
            self.entries.insert(key, entry);
        }
    }

    /// Drops whatever is stored for `key`.
    pub fn remove(&self, key: &CacheKey) {
        self.entries.invalidate(key);
    }

    /// Removes every valid entry matching `pred` and returns how many (purge API: a scan is
    /// fine for rare admin calls). Entries already dead by generation are removed uncounted.
    pub fn purge(&self, pred: impl Fn(&CacheKey) -> bool) -> usize {
        let keys: Vec<(CacheKey, u64)> = self
            .entries
            .iter()
            .filter(|(k, _)| pred(k))
            .map(|(k, v)| (*k, v.stamp))
            .collect();
        let mut removed = 0;
        for (key, _) in keys {
            if let Some(v) = self.entries.remove(&key)
                && v.stamp == self.stamp(&key)
            {
                removed += 1;
            }
        }
        removed
    }

    /// Entry count and weighted bytes, after applying pending housekeeping.
    pub fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.entry_count(), self.entries.weighted_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn policy() -> CachePolicy {
        CachePolicy {
            ttl: Duration::from_secs(10),
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(5),
            max_object_bytes: 1 << 22,
        }
    }

    fn explicit_evictions(metrics: &Metrics) -> String {
        let (text, _) = metrics.render();
        String::from_utf8(text)
            .unwrap()
            .lines()
            .find(|l| l.starts_with("chatwoot_cache_evictions_total{cause=\"explicit\"}"))
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn lookup_removes_dead_entries() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let store = Store::new(1 << 20, policy(), metrics.clone());
        let now = Instant::now();
        let key = CacheKey {
            account: 1,
            conversation: 42,
            scope: Scope(7),
        };
        let body = Bytes::from_static(br#"{"id":42}"#);
        let probe = rules::probe(&body, 1, 42).unwrap();
        let entry = rules::positive_entry(
            &HeaderMap::new(),
            body,
            probe,
            store.stamp(&key),
            &store.policy,
            now,
        );
        store.insert(key, Arc::new(entry));
        assert!(store.lookup(&key, now).is_some());
        assert_eq!(store.usage().0, 1);

        // Invalidated by generation: gone from the store, counted as an explicit removal.
        store.generations.bump_conversation(1, 42);
        assert!(store.lookup(&key, now).is_none());
        assert_eq!(store.usage(), (0, 0));
        assert!(explicit_evictions(&metrics).ends_with(" 1"));

        // A negative entry past the negative TTL: removed as well.
        let entry = rules::negative_entry(
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            Bytes::from_static(b"{}"),
            store.stamp(&key),
            &store.policy,
            now,
        );
        store.insert(key, Arc::new(entry));
        assert!(store.lookup(&key, now).is_some());
        assert!(
            store
                .lookup(&key, now + store.policy.negative_ttl)
                .is_none()
        );
        assert_eq!(store.usage(), (0, 0));
        assert!(explicit_evictions(&metrics).ends_with(" 2"));
    }
}
