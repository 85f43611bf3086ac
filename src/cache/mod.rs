//! The conversation cache (SPEC §5): the store, its key, storage rules and single-flight.
//!
//! - [`CacheKey`] is built here: (account, conversation, token scope). Two tokens never share one.
//! - [`Store`] wraps a byte-weighted moka cache (the synchronous flavour: a lookup never
//!   awaits, so the hit path needs no future of its own). Freshness is decided on our own clock
//!   (`tokio::time::Instant` in each [`Entry`]); moka's per-entry expiry only reclaims memory.
//! - Validity against writes/purges/webhooks is the generation stamp
//!   ([`crate::invalidation::Generations`]) checked on every lookup: O(1) per write.
//!   [`Store::invalidate`] is the one call every invalidation goes through.
//! - [`admission`] decides, as a pure function, what an upstream answer does to the store;
//!   [`Store::apply`] carries the decision out. [`rules`] builds the entries it stores.
//! - [`flight`] makes concurrent misses and revalidations of one key share one upstream request.
//!
//! Nothing here speaks HTTP to the upstream: `proxy::conversation` drives the exchange.

pub mod admission;
pub mod coding;
pub mod decimal;
pub mod entry;
pub mod flight;
pub mod head;
mod json;
mod memo;
pub mod rules;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::sync::Cache;
use tokio::time::Instant;

pub use admission::{Admission, admit};
pub use entry::Entry;

use crate::auth::Scope;
use crate::invalidation::{Generations, Source, Stamp, Target};
use crate::live::Live;
use crate::metrics::{EvictionCause, Metrics};
use crate::shared::codec::{Gens, SharedValue};
use crate::shared::{Budget, L2Read, Lease, LeaseOutcome, Shared};

/// The cache key. Holds the token *scope* (a keyed hash), never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKey {
    pub account: u64,
    pub conversation: u64,
    pub scope: Scope,
}

/// All 32 bytes in one `write`: the derived impl makes three, and the map's keyed SipHash pays
/// its short-input handling for each (~140 instructions of every lookup, a hit's included).
/// Still every bit of the key, through the same keyed hasher.
impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&self.account.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.conversation.to_le_bytes());
        bytes[16..].copy_from_slice(&self.scope.0.to_le_bytes());
        state.write(&bytes);
    }
}

/// Freshness and size settings the store and the conversation handler share. Live: a reload
/// replaces them ([`Store::policy`]); `Copy` so a connection can keep its own copy
/// ([`crate::live::Local`]) and read it without touching shared memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CachePolicy {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub negative_ttl: Duration,
    pub max_object_bytes: u64,
    /// `None`: refresh-ahead is off.
    pub refresh_ahead: Option<RefreshAhead>,
}

/// Refresh-ahead (SPEC 12): a hot entry is revalidated in the background once its age passes
/// F × ttl, so that clients polling it go from `HIT` to `HIT`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefreshAhead {
    /// The freshness left at F × ttl: ttl × (1 − F).
    pub window: Duration,
    /// Hits during its freshness that make an entry hot.
    pub min_hits: u32,
}

impl RefreshAhead {
    /// `share` is F (`--refresh-ahead`); 0 turns refresh-ahead off.
    pub fn new(ttl: Duration, share: f64, min_hits: u32) -> Option<RefreshAhead> {
        (share > 0.0 && share < 1.0).then(|| RefreshAhead {
            window: ttl.mul_f64(1.0 - share),
            min_hits,
        })
    }
}

impl CachePolicy {
    /// Counts a fresh hit on `entry` (`remaining`: the rest of its freshness) and says whether
    /// this hit should start the entry's refresh-ahead: true once per entry, for the first hit
    /// that finds it hot past F × ttl. Negative entries are not refreshed ahead.
    #[inline]
    pub fn hit_starts_refresh(&self, entry: &Entry, remaining: Duration) -> bool {
        match &self.refresh_ahead {
            Some(ra) if !entry.is_negative() => entry.heat.hit(ra.min_hits, remaining <= ra.window),
            _ => false,
        }
    }

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
        Some(value.lifetime())
    }

    /// Counted from the entry's own store time: a re-weighed entry ([`Store::recharge`]) keeps
    /// the expiry it had, and a new entry's age is ~0 anyway.
    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.lifetime().saturating_sub(value.age(Instant::now())))
    }
}

/// The bounded conversation store plus its generation counters: the cache tier the proxy
/// talks to (lookups, [`Store::apply`] of admission decisions, [`Store::invalidate`]).
pub struct Store {
    entries: Cache<CacheKey, Arc<Entry>>,
    /// Shared with the shared tier's bus task, which applies other replicas' invalidations.
    pub generations: Arc<Generations>,
    /// The current policy: [`Live::load`] where the upstream is involved, a connection's
    /// [`crate::live::Local`] copy on the hit path.
    pub policy: Live<CachePolicy>,
    metrics: Arc<Metrics>,
    /// The Redis tier (SPEC 11), with `--redis-url`.
    shared: Option<Arc<Shared>>,
    /// Identity copies made by decompressing a stored gzip body ([`Store::identity_copies`]).
    identity_copies: AtomicU64,
}

/// What [`Store::apply`] made of an admission decision: the entry to serve, and whether the
/// store kept it (it does not when the key was invalidated during the fetch, or when a full
/// cache refused or evicted it at once): `Cache-Status` says `stored` only then.
pub struct Applied {
    pub entry: Arc<Entry>,
    pub stored: bool,
}

/// A fetch's slot for the identity copy of the entry it serves to every request that waited on
/// it ([`Store::with_identity_copy`]): one copy for all of them even when the store does not
/// hold the entry, where each identity client would otherwise decompress a copy of its own
/// (and a slow reader pin it), uncounted by `--cache-max-bytes`.
pub type IdentitySlot = OnceLock<Arc<Entry>>;

/// What the shared tier answered before a fetch (see [`Store::read_shared`]).
pub enum SharedRead {
    /// A valid shared entry to serve by the usual rules, now also in L1: fresh (`HIT`), or on
    /// an L1 miss within stale-while-revalidate (`STALE`, revalidated in the background).
    Hit(Arc<Entry>),
    /// Fetch from the upstream (what the write after it needs is now in the [`SharedFetch`]),
    /// with a valid shared entry past its freshness, if there was one, to revalidate (its
    /// validators) and to fall back on when the upstream fails (stale-if-error), as a stored
    /// entry would be.
    Fetch { stale: Option<Arc<Entry>> },
}

/// The shared tier's part of one fetch ([`Store::shared_fetch`]), carried from the read before
/// it to the write or invalidation after it.
pub struct SharedFetch {
    /// What is left of the request's Redis time. One budget for all of a request's Redis work
    /// (the read and lease before the fetch, the write or invalidation after it, a refused
    /// token's scope invalidation): together it gives up after `--redis-timeout` (SPEC 11).
    pub budget: Budget,
    /// What the read before the fetch found; `None` when Redis was not read (not configured,
    /// skipped, or it failed).
    read: Option<ReadBefore>,
    /// This replica's fetch lease, released (waking the other replicas) when the fetch is over.
    _lease: Option<Lease>,
}

/// The shared read before a fetch.
struct ReadBefore {
    /// The generations read (the L2 write is conditional on them).
    gens: Gens,
    /// An (unusable or outdated) value was there: a 404 must still drop it everywhere.
    had_value: bool,
}

/// What [`Store::read_shared`] looks for in a shared value.
struct Wanted<'a> {
    /// The local generations read before the read, for the L1 copy.
    stamp: &'a Stamp,
    revalidating: bool,
    fresh_for: Duration,
    policy: &'a CachePolicy,
}

/// What [`Store::read_shared`]'s L2 reads found so far, for the fetch they lead to.
#[derive(Default)]
struct Found {
    gens: Gens,
    had_value: bool,
    /// A valid shared entry past its freshness, to revalidate and to fall back on.
    stale: Option<Arc<Entry>>,
}

impl Found {
    /// Folds in one more L2 read of `key`: `Err` with the entry when it found a value that
    /// answers the request (now also in L1), the updated findings otherwise.
    fn with(
        mut self,
        store: &Store,
        key: &CacheKey,
        want: &Wanted<'_>,
        read: L2Read,
    ) -> Result<Found, Arc<Entry>> {
        match read {
            L2Read::Hit(value) => {
                self.gens = value.gens.map(Some);
                self.had_value = true;
                if let Some(entry) = store.entry_from_shared(want.stamp, value, want.policy) {
                    if store.serves(&entry, want.revalidating, want.fresh_for, want.policy) {
                        store.insert(*key, entry.clone());
                        return Err(entry);
                    }
                    self.stale = Some(entry);
                }
            }
            L2Read::Miss { gens, had_value } => {
                self.gens = gens;
                self.had_value |= had_value;
            }
            L2Read::Unavailable => {}
        }
        Ok(self)
    }
}

impl Store {
    pub fn new(max_bytes: u64, policy: CachePolicy, metrics: Arc<Metrics>) -> Store {
        let listener_metrics = metrics.clone();
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, v: &Arc<Entry>| v.weight())
            .expire_after(EntryExpiry)
            .eviction_listener(move |_k, v: Arc<Entry>, cause| {
                // Runs inline during housekeeping: counters only, never block.
                if cause == RemovalCause::Replaced && v.take_superseded() {
                    // Replaced by its own copy with the identity form: nothing left the cache.
                    return;
                }
                listener_metrics.eviction(match cause {
                    RemovalCause::Size => EvictionCause::Size,
                    RemovalCause::Expired => EvictionCause::Expired,
                    RemovalCause::Explicit => EvictionCause::Explicit,
                    RemovalCause::Replaced => EvictionCause::Replaced,
                });
            })
            .build();
        Store {
            entries,
            generations: Arc::new(Generations::new()),
            policy: Live::new(policy),
            metrics,
            shared: None,
            identity_copies: AtomicU64::new(0),
        }
    }

    /// How many identity copies were made by decompressing a stored gzip body (tests and
    /// diagnostics: once per entry identity clients read, never per hit or per waiter).
    pub fn identity_copies(&self) -> u64 {
        self.identity_copies.load(Ordering::Relaxed)
    }

    /// Puts the shared tier behind this store and starts its bus and probe tasks.
    pub fn with_shared(mut self, shared: Arc<Shared>) -> Store {
        shared.start(self.generations.clone());
        self.shared = Some(shared);
        self
    }

    /// The shared tier, if configured.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// The current stamp for `key` (the miss path: see [`Generations::stamp`]).
    pub fn stamp(&self, key: &CacheKey) -> Stamp {
        self.generations
            .stamp(key.account, key.conversation, key.scope)
    }

    /// Whether `entry` is still valid for `key`: nothing covering it was invalidated since its
    /// fetch began.
    fn is_current(&self, key: &CacheKey, entry: &Entry) -> bool {
        self.generations
            .is_current(&entry.stamp, key.account, key.conversation)
    }

    /// The one way to invalidate (SPEC 7, and a refused token's scope, SPEC 4): bumps the
    /// generations `target` covers, O(1), and counts `invalidations_total{source}` for the
    /// sources SPEC 9 names. Entries are not scanned: each lookup finds its own stamp outdated.
    ///
    /// With the shared tier, the counter in Redis is incremented and the invalidation published
    /// to every replica before this returns (within `--redis-timeout`), so a response that waits
    /// for it is only sent once other replicas can no longer serve what it changed.
    ///
    /// `budget`: what is left of the request's Redis time ([`Store::budget`] for a request
    /// that has no other Redis work).
    pub async fn invalidate(&self, target: Target, source: Source, budget: &mut Budget) {
        self.invalidate_local(target, source);
        if let Some(shared) = &self.shared {
            shared.invalidate(target, budget).await;
        }
    }

    /// A fresh Redis budget for one request: `--redis-timeout` with the shared tier, none
    /// without (nothing uses it then).
    pub fn budget(&self) -> Budget {
        self.shared
            .as_ref()
            .map_or_else(|| Budget::new(Duration::ZERO), |s| s.budget())
    }

    /// A fetch's shared part before the shared read: the request's one Redis budget.
    pub fn shared_fetch(&self) -> SharedFetch {
        SharedFetch {
            budget: self.budget(),
            read: None,
            _lease: None,
        }
    }

    /// [`Store::invalidate`] for code that cannot wait (a write whose client went away): the
    /// local part now, the shared part in a task of its own.
    pub fn invalidate_detached(&self, target: Target, source: Source) {
        self.invalidate_local(target, source);
        if let Some(shared) = self.shared.clone() {
            tokio::spawn(async move {
                shared.invalidate(target, &mut shared.budget()).await;
            });
        }
    }

    /// The local part: bump and count.
    fn invalidate_local(&self, target: Target, source: Source) {
        self.generations.bump(target);
        if let Some(label) = source.metric() {
            self.metrics.invalidation(label);
        }
    }

    /// On an L1 miss (or before revalidating a stale entry, `revalidating`): the shared tier's
    /// entry for `key` if one is valid (copied into L1, under `stamp`: the local generations
    /// read before this call), served by the usual rules (SPEC 11): fresh, or within
    /// stale-while-revalidate on an L1 miss, it answers; older (or for a revalidation, stale at
    /// all) it is revalidated upstream and served if that fails. Otherwise what the fetch's
    /// shared write needs, in `fetch` (whose budget this spends).
    ///
    /// Cold in Redis too: the first replica takes the key's lease and fetches; the others wait
    /// (at most the lease's length, `--upstream-timeout`) for the value it stores, and fetch
    /// themselves if it releases without one or dies.
    ///
    /// `fresh_for`: how much freshness a shared value must have left to be taken. Zero for a
    /// miss or a revalidation; a refresh-ahead passes its window, so that a shared copy no
    /// fresher than the entry it refreshes (the one this replica copied) is not taken for a
    /// refresh: the fetch goes upstream, under the same lease (SPEC 11, 12).
    pub async fn read_shared(
        &self,
        key: &CacheKey,
        stamp: &Stamp,
        revalidating: bool,
        fresh_for: Duration,
        fetch: &mut SharedFetch,
    ) -> SharedRead {
        let Some(shared) = &self.shared else {
            return SharedRead::Fetch { stale: None };
        };
        let policy = self.policy.load();
        let want = Wanted {
            stamp,
            revalidating,
            fresh_for,
            policy: &policy,
        };
        let budget = &mut fetch.budget;
        let read = shared.read(key, budget).await;
        if matches!(read, L2Read::Unavailable) {
            return SharedRead::Fetch { stale: None };
        }
        let found = match Found::default().with(self, key, &want, read) {
            Ok(found) => found,
            Err(entry) => return SharedRead::Hit(entry),
        };
        let mut lease = None;
        let read = match shared.acquire(key, budget).await {
            // Read with the lease: what a holder that released meanwhile stored.
            LeaseOutcome::Held(held, read) => {
                lease = Some(held);
                *read
            }
            LeaseOutcome::Unavailable => L2Read::Unavailable,
            LeaseOutcome::Busy => {
                // Only a value fetched after this moment's freshness horizon is the holder's.
                let horizon = crate::shared::unix_ms_now().saturating_sub(
                    u64::try_from(policy.ttl.saturating_sub(fresh_for).as_millis())
                        .unwrap_or(u64::MAX),
                );
                shared.wait_for_holder(key, horizon).await
            }
        };
        let Found {
            gens,
            had_value,
            stale,
        } = match found.with(self, key, &want, read) {
            Ok(found) => found,
            Err(entry) => return SharedRead::Hit(entry),
        };
        if !revalidating && let Some(entry) = &stale {
            // Held like any stored entry: requests meanwhile, and stale-if-error, find it.
            self.insert(*key, entry.clone());
        }
        fetch.read = Some(ReadBefore { gens, had_value });
        fetch._lease = lease;
        SharedRead::Fetch { stale }
    }

    /// Whether a shared entry answers without a fetch: fresh for more than `fresh_for`, or (on
    /// an L1 miss, not for a revalidation, which would only start another) within
    /// stale-while-revalidate.
    fn serves(
        &self,
        entry: &Entry,
        revalidating: bool,
        fresh_for: Duration,
        policy: &CachePolicy,
    ) -> bool {
        match policy.freshness(entry, Instant::now()) {
            Freshness::Fresh { remaining } => remaining > fresh_for,
            Freshness::StaleWhileRevalidate { .. } => !revalidating,
            Freshness::MustRevalidate => false,
        }
    }

    /// An L1 entry from a shared value (authenticated, and checked to be this key's by the
    /// codec), if still usable by its original fetch time (fresh, or within a stale window).
    fn entry_from_shared(
        &self,
        stamp: &Stamp,
        value: SharedValue,
        policy: &CachePolicy,
    ) -> Option<Arc<Entry>> {
        let age = Duration::from_millis(
            crate::shared::unix_ms_now().saturating_sub(value.fetched_unix_ms),
        );
        if age >= policy.positive_lifetime() {
            return None;
        }
        let stored_at = Instant::now().checked_sub(age)?;
        // Kept as stored (gzip when it compressed): an identity client's copy is made when
        // one first asks for it.
        let entry = rules::from_image(&value.image, stamp.clone(), policy, stored_at)?;
        Some(Arc::new(entry))
    }

    /// Writes a stored entry to the shared tier, conditional on the generations read before
    /// its fetch.
    async fn write_shared(&self, key: &CacheKey, entry: &Arc<Entry>, fetch: &mut SharedFetch) {
        let (Some(shared), Some(read)) = (&self.shared, &fetch.read) else {
            return;
        };
        let age = u64::try_from(entry.age(Instant::now()).as_millis()).unwrap_or(u64::MAX);
        let Some(image) = rules::image(entry) else {
            return;
        };
        let value = SharedValue {
            gens: [0; 4],
            fetched_unix_ms: crate::shared::unix_ms_now().saturating_sub(age),
            image,
        };
        shared
            .write(key, &read.gens, value, &mut fetch.budget)
            .await;
    }

    /// Carries out an admission decision for `key` (see [`admission`]) and returns the entry
    /// to serve, if it made one. Stores are conditional on the decision's stamp, so what a
    /// fetch that raced an invalidation built is not kept (it is still served to the requests
    /// that were waiting on that fetch, which began before the invalidation).
    ///
    /// With the shared tier (`shared` filled in by [`Store::read_shared`]): a stored positive
    /// entry is written to Redis, and an authorization answer that drops a stored `200` (here
    /// or in Redis) invalidates the conversation on every replica, within what is left of the
    /// request's Redis budget.
    pub async fn apply(
        &self,
        key: CacheKey,
        admission: Admission,
        dropped_stored: bool,
        shared: &mut SharedFetch,
    ) -> Option<Applied> {
        use admission::Pass;
        match admission {
            Admission::Store(entry)
            | Admission::Refresh { entry, .. }
            | Admission::KeepOlder(entry) => {
                let entry = Arc::new(entry);
                let stored = self.insert(key, entry.clone());
                self.write_shared(&key, &entry, shared).await;
                Some(Applied { entry, stored })
            }
            Admission::Negative(_) | Admission::Remove | Admission::Pass(Pass::Supersedes) => {
                // Removed first: the stored 200 goes even if the negative entry is not kept.
                self.remove(&key);
                // A superseded entry had a prior (here or in Redis): the shared copy must go
                // too, or the next L1 miss on any replica serves it again (SPEC 5: not even
                // stale).
                let supersedes = matches!(admission, Admission::Pass(Pass::Supersedes));
                // The negative entry answers the fetch that causes this invalidation; the
                // shared tier's invalidation also bumps this replica's generation (once Redis
                // has it, against reads racing the bump), which must not refuse that entry.
                let was_current =
                    matches!(&admission, Admission::Negative(e) if self.is_current(&key, e));
                let target = Target::Conversation {
                    account: key.account,
                    conversation: key.conversation,
                };
                if let Some(tier) = &self.shared {
                    // A failed read before the fetch (no `read`): Redis may hold a 200 all
                    // the same (a skipped Redis turns this into one global invalidation later).
                    let drop_shared = dropped_stored
                        || supersedes
                        || shared.read.as_ref().is_none_or(|r| r.had_value);
                    if drop_shared {
                        tier.invalidate(target, &mut shared.budget).await;
                    }
                }
                let Admission::Negative(mut entry) = admission else {
                    return None;
                };
                if was_current {
                    entry.stamp = self
                        .generations
                        .stamp(key.account, key.conversation, key.scope);
                }
                let entry = Arc::new(entry);
                let stored = self.insert(key, entry.clone());
                Some(Applied { entry, stored })
            }
            // The token's refusal (proxy) invalidates its scope through `invalidate`.
            Admission::TokenRefused | Admission::Pass(Pass::Failure | Pass::Plain) => None,
        }
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
        if !self.is_current(key, &entry)
            // Its own lifetime (the negative TTL when it was stored, also moka's expiry): no
            // shared read on this path; a reload that shortens the TTL applies through
            // `CachePolicy::freshness`.
            || (entry.is_negative() && entry.age(now) >= entry.lifetime())
        {
            self.entries.invalidate(key);
            return None;
        }
        Some(entry)
    }

    /// Stores `entry` unless it was invalidated while it was being fetched; says whether the
    /// store holds it afterwards (a full cache may refuse or evict it during the insert's own
    /// housekeeping).
    pub fn insert(&self, key: CacheKey, entry: Arc<Entry>) -> bool {
        if !self.is_current(&key, &entry) {
            return false;
        }
        self.entries.insert(key, entry);
        self.entries.contains_key(&key)
    }

    /// `entry` with its identity copy made ([`Entry::with_identity_copy`]), for a client that
    /// needs the identity form of a gzip entry without one. The copy replaces `entry` for `key`
    /// (weighed anew: moka weighs a value only when it is inserted) if `entry` is still the one
    /// stored; if the copy of it already is (another identity client was first), that is
    /// returned and nothing is decompressed. Once per entry, never per hit.
    ///
    /// `slot`: an entry a fetch serves to all its waiters comes with the fetch's
    /// [`IdentitySlot`]: the copy is made once for all of them, also when the store does not
    /// hold the entry. If no copy can be made (cannot happen for bytes this cache compressed),
    /// `entry` itself.
    pub fn with_identity_copy(
        &self,
        key: &CacheKey,
        entry: &Arc<Entry>,
        slot: Option<&IdentitySlot>,
    ) -> Arc<Entry> {
        match slot {
            Some(slot) => slot.get_or_init(|| self.identity_copy(key, entry)).clone(),
            None => self.identity_copy(key, entry),
        }
    }

    /// [`Store::with_identity_copy`] without a fetch's slot.
    fn identity_copy(&self, key: &CacheKey, entry: &Arc<Entry>) -> Arc<Entry> {
        use moka::ops::compute::Op;
        let mut made = None;
        let decompress = || {
            let copy = entry.with_identity_copy().map(Arc::new);
            if copy.is_some() {
                self.identity_copies.fetch_add(1, Ordering::Relaxed);
            }
            copy
        };
        self.entries
            .entry(*key)
            .and_compute_with(|current| match current {
                Some(current) if Arc::ptr_eq(current.value(), entry) => {
                    let Some(copy) = decompress() else {
                        return Op::Nop;
                    };
                    entry.superseded.store(true, Ordering::Relaxed);
                    made = Some(copy.clone());
                    Op::Put(copy)
                }
                Some(current) if current.value().is_identity_copy_of(entry) => {
                    made = Some(current.value().clone());
                    Op::Nop
                }
                _ => Op::Nop,
            });
        made.or_else(decompress).unwrap_or_else(|| entry.clone())
    }

    /// Drops whatever is stored for `key`.
    pub fn remove(&self, key: &CacheKey) {
        self.entries.invalidate(key);
    }

    /// The purge API (SPEC 7.2): removes every valid entry `target` covers and returns how many
    /// (a scan is fine for rare admin calls; entries already dead by generation are removed
    /// uncounted), then invalidates `target` so that fetches in flight store nothing.
    ///
    /// With the shared tier the answer is the number of shared (L2) values removed (SPEC 11),
    /// and every replica drops its L1 copies through the bus; if Redis cannot be used, the
    /// local count.
    pub async fn purge(&self, target: Target) -> usize {
        let keys: Vec<CacheKey> = self
            .entries
            .iter()
            .filter(|(k, _)| target.covers(k))
            .map(|(k, _)| *k)
            .collect();
        let mut removed = 0;
        for key in keys {
            if let Some(v) = self.entries.remove(&key)
                && self.is_current(&key, &v)
            {
                removed += 1;
            }
        }
        self.invalidate_local(target, Source::Purge);
        if let Some(shared) = &self.shared
            && let Some(n) = shared.purge(target).await
        {
            return n;
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

    /// The seam of issue 12: cache semantics know no HTTP-side type (bodies, the upstream
    /// client, the proxy), so the store and its admission rules can be reasoned about and tested
    /// alone. A `use crate::{body, ..}` group counts too.
    #[test]
    fn the_cache_imports_nothing_from_the_http_side() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cache");
        let mut offenders = Vec::new();
        for file in std::fs::read_dir(&dir).expect("src/cache") {
            let path = file.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("source");
            // Code only, whitespace removed, so a `use crate::{\n    body,` group reads as one run.
            let flat: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .flat_map(str::chars)
                .filter(|c| !c.is_whitespace())
                .collect();
            // The first module of each path below `crate::`, of each item of a `{..}` group.
            let modules = flat.split("crate::").skip(1).flat_map(|rest| {
                let items: Vec<&str> = match rest.strip_prefix('{') {
                    Some(group) => group.split('}').next().unwrap_or("").split(',').collect(),
                    None => vec![rest],
                };
                items.into_iter().map(|item| {
                    item.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap_or("")
                })
            });
            for module in modules {
                if matches!(module, "body" | "upstream" | "proxy") {
                    offenders.push(format!("{} uses crate::{module}", path.display()));
                }
            }
        }
        assert!(offenders.is_empty(), "{offenders:#?}");
    }

    fn policy() -> CachePolicy {
        CachePolicy {
            ttl: Duration::from_secs(10),
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(5),
            max_object_bytes: 1 << 22,
            refresh_ahead: RefreshAhead::new(Duration::from_secs(10), 0.8, 2),
        }
    }

    /// Refresh-ahead starts once, for the first hit that finds an entry both hot and past
    /// F × ttl; negative entries and a policy without it never start one.
    #[test]
    fn refresh_ahead_starts_once_for_a_hot_entry_past_its_share() {
        let policy = policy();
        let ra = policy.refresh_ahead.unwrap();
        assert_eq!(ra.window, Duration::from_secs(2));
        let now = Instant::now();
        let key = CacheKey {
            account: 1,
            conversation: 42,
            scope: Scope(7),
        };
        let body = Bytes::from_static(br#"{"id":42}"#);
        let probe = rules::probe(&body, 1, 42).unwrap();
        let store = Store::new(1 << 20, policy, Arc::new(Metrics::new().unwrap()));
        let entry = rules::positive_entry(
            &HeaderMap::new(),
            body,
            probe,
            store.stamp(&key),
            &policy,
            now,
            coding::Coding::Gzip,
        );
        let early = Duration::from_secs(5);
        let late = Duration::from_secs(1);
        assert!(!policy.hit_starts_refresh(&entry, early), "1 hit, early");
        assert!(!policy.hit_starts_refresh(&entry, early), "hot, but early");
        assert!(policy.hit_starts_refresh(&entry, late), "hot and due");
        assert!(!policy.hit_starts_refresh(&entry, late), "once");
        // Due at its first hit, hot at its second.
        let cold = rules::refreshed(&entry, None, store.stamp(&key), now);
        assert!(!policy.hit_starts_refresh(&cold, late));
        assert!(policy.hit_starts_refresh(&cold, late));
        let off = CachePolicy {
            refresh_ahead: RefreshAhead::new(policy.ttl, 0.0, 2),
            ..policy
        };
        let again = rules::refreshed(&entry, None, store.stamp(&key), now);
        for _ in 0..5 {
            assert!(!off.hit_starts_refresh(&again, late));
        }
        let negative = rules::negative_entry(
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            Bytes::from_static(b"{}"),
            store.stamp(&key),
            &policy,
            now,
        );
        for _ in 0..5 {
            assert!(!policy.hit_starts_refresh(&negative, late));
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
            &store.policy.load(),
            now,
            coding::Coding::Gzip,
        );
        store.insert(key, Arc::new(entry));
        assert!(store.lookup(&key, now).is_some());
        assert_eq!(store.usage().0, 1);

        // Invalidated by generation: gone from the store, counted as an explicit removal.
        store.invalidate_local(
            Target::Conversation {
                account: 1,
                conversation: 42,
            },
            Source::Write,
        );
        assert!(store.lookup(&key, now).is_none());
        assert_eq!(store.usage(), (0, 0));
        assert!(explicit_evictions(&metrics).ends_with(" 1"));

        // A negative entry past the negative TTL: removed as well.
        let entry = rules::negative_entry(
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            Bytes::from_static(b"{}"),
            store.stamp(&key),
            &store.policy.load(),
            now,
        );
        store.insert(key, Arc::new(entry));
        assert!(store.lookup(&key, now).is_some());
        assert!(
            store
                .lookup(&key, now + store.policy.load().negative_ttl)
                .is_none()
        );
        assert_eq!(store.usage(), (0, 0));
        assert!(explicit_evictions(&metrics).ends_with(" 2"));
    }
}
