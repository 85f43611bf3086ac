//! The shared tier across replicas (SPEC 11): generations and the invalidation bus in Redis,
//! and the L2 of stored conversations.
//!
//! The cache talks to it only through [`crate::cache::Store`] (reads on an L1 miss, writes of
//! what admission stored, invalidations, purges); nothing here decides what is cacheable.
//!
//! - **Generations.** Per key there are four counters in Redis (global, account, conversation,
//!   scope). An invalidation increments its counter and publishes on the bus in one script call,
//!   before the response that caused it completes; every replica applies bus messages to its L1
//!   generations. A counter that does not exist is created with a random value (never 0), so a
//!   counter that expired or was evicted never comes back with a value an old L2 value carries.
//! - **L2.** A value carries the generations read before its fetch and is valid only while all
//!   four counters still hold exactly those values. Writes are a script that checks them first,
//!   so a fetch that began before an invalidation never lands after it. See [`codec`].
//! - **Degrade, never fail.** Every call of a request is bounded by what is left of the
//!   request's [`Budget`] (`--redis-timeout` in total). After [`FAILURES_TO_SKIP`] failures in a
//!   row Redis is skipped (no per-request cost) until a background probe answers; one log line
//!   per state change. Invalidations made while Redis was skipped cannot reach the other
//!   replicas: when it is back, one global invalidation is published instead, so no replica
//!   keeps serving from L2 what they changed.
//! - **Missed messages.** When the bus subscription (re)starts, every L1 entry stored before is
//!   invalidated locally, so it is revalidated against Redis's generations (an L2 read) or the
//!   upstream before it is served as `HIT` again. A subscription that goes silent without
//!   breaking (no FIN or RST: a partition, a dropped NAT entry) is found by a keep-alive PING
//!   within [`BUS_PING_INTERVAL`] + max(`--redis-timeout`, [`BUS_PING_TIMEOUT_MIN`]) and
//!   counts as broken.

pub mod bus;
pub mod codec;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;

use crate::cache::CacheKey;
use crate::config::RedisConfig;
use crate::invalidation::{Generations, Target};
use crate::metrics::{L2Result, Metrics, RedisOp, SharedMetrics};
use codec::{Codec, Gens, SharedValue};

/// Consecutive failed Redis calls after which Redis is skipped until a probe succeeds.
pub const FAILURES_TO_SKIP: u32 = 3;
/// How often a skipped Redis is probed, and how long the bus waits before resubscribing.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// How often the bus subscription is PINGed on its own connection (see [`Shared::listen`]).
/// One PING a second per replica costs Redis nothing, and bounds how long a replica can go on
/// serving entries another replica invalidated without knowing it missed the message.
const BUS_PING_INTERVAL: Duration = Duration::from_secs(1);
/// The least time a bus PING may take before the subscription counts as lost (at least
/// `--redis-timeout`): a Redis busy for a moment, or a loaded host, must not cause needless
/// resubscriptions (each one makes every L1 entry revalidate), and a lost bus is noticed
/// within [`BUS_PING_INTERVAL`] + this (3 s) all the same.
const BUS_PING_TIMEOUT_MIN: Duration = Duration::from_secs(2);
/// Expiry of the probe's key: it is only written to prove Redis takes writes.
const PROBE_KEY_MS: u64 = 10_000;
/// Deadline of the admin purge's scan (not on the request path).
const PURGE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many failed invalidations are retried one by one; past it, one global
/// invalidation is retried instead (it covers them all).
const MAX_UNSETTLED: u32 = 64;

/// The first wait before retrying a failed invalidation (doubled up to [`PROBE_INTERVAL`]).
const RETRY_FIRST: Duration = Duration::from_millis(50);

/// Why the shared tier could not be set up (start-up only).
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("--redis-url: {0}")]
    Url(String),
    #[error("--redis-ca-file: cannot read {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("no secure randomness available")]
    Random,
}

/// Checks a value and its generations, then stores it with an expiry. KEYS: value, then the
/// global, account, conversation and scope counters. ARGV 1-4: the counters read before the
/// fetch ('' = did not exist), 5-8: the value to create each missing counter with, 9: the value,
/// 10: the expiry in ms. Returns 1 when stored, 0 when an invalidation came in between, or
/// when a counter's key holds another type (written by something else: not an outage; the next
/// bump replaces it).
const WRITE_SCRIPT: &str = r"
for i = 1, 4 do
  local cur = redis.pcall('GET', KEYS[i + 1])
  if type(cur) == 'table' then return 0 end
  if ARGV[i] == '' then
    if cur then return 0 end
  elseif cur ~= ARGV[i] then
    return 0
  end
end
for i = 1, 4 do
  if ARGV[i] == '' then
    redis.call('SET', KEYS[i + 1], ARGV[i + 4], 'PX', ARGV[10])
  else
    redis.call('PEXPIRE', KEYS[i + 1], ARGV[10])
  end
end
redis.call('SET', KEYS[1], ARGV[9], 'PX', ARGV[10])
return 1
";

/// Increments one generation counter and publishes the invalidation. KEYS: the counter.
/// ARGV: 1 the value to create it with when missing, 2 the created counter's expiry in ms, 3 the
/// channel, 4 the message. Returns 1. A key that INCR refuses (not an integer, another type:
/// written by something else) or leaves below 1 (a negative integer, which a reader takes for
/// no counter, so every write would find it "created in between") is replaced like a missing
/// counter: the invalidation still lands and is published, instead of failing every time and
/// taking Redis for down, or turning off fills for good.
const BUMP_SCRIPT: &str = r"
local n = 0
if redis.call('EXISTS', KEYS[1]) == 1 then n = redis.pcall('INCR', KEYS[1]) end
if type(n) ~= 'number' or n < 1 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

/// Deletes a lease if it is still ours. KEYS: the lease. ARGV: our token.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// How often a replica waiting on another's lease checks it (a bounded poll: one `EXISTS`
/// per interval, only while a key is being fetched elsewhere; the value is read once, when
/// the lease is gone).
const LEASE_POLL: Duration = Duration::from_millis(10);

/// Key and channel names under `--redis-key-prefix`. Keys carry account, conversation and
/// scope (a keyed hash), never a token.
struct Keys {
    prefix: String,
}

impl Keys {
    fn value(&self, k: &CacheKey) -> String {
        format!(
            "{}v:{}:{}:{:032x}",
            self.prefix, k.account, k.conversation, k.scope.0
        )
    }

    /// The counters of `k`, in [`Gens`] order.
    fn gens(&self, k: &CacheKey) -> [String; 4] {
        [
            self.target(Target::All),
            self.target(Target::Account(k.account)),
            self.target(Target::Conversation {
                account: k.account,
                conversation: k.conversation,
            }),
            self.target(Target::Scope(k.scope)),
        ]
    }

    /// The counter an invalidation of `target` increments.
    fn target(&self, target: Target) -> String {
        let p = &self.prefix;
        match target {
            Target::All => format!("{p}g"),
            Target::Account(a) => format!("{p}g:a:{a}"),
            Target::Conversation {
                account,
                conversation,
            } => format!("{p}g:c:{account}:{conversation}"),
            Target::Scope(s) => format!("{p}g:s:{:032x}", s.0),
        }
    }

    /// The cross-replica fetch lease of `k`.
    fn lease(&self, k: &CacheKey) -> String {
        format!(
            "{}l:{}:{}:{:032x}",
            self.prefix, k.account, k.conversation, k.scope.0
        )
    }

    /// The key a skipped Redis is probed by writing (see [`Shared::probe_loop`]).
    fn probe(&self) -> String {
        format!("{}probe", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}bus", self.prefix)
    }

    /// SCAN pattern of the values `target` covers.
    fn values_matching(&self, target: Target) -> String {
        let p = glob_escape(&self.prefix);
        match target {
            Target::All => format!("{p}v:*"),
            Target::Scope(s) => format!("{p}v:*:*:{:032x}", s.0),
            Target::Account(a) => format!("{p}v:{a}:*"),
            Target::Conversation {
                account,
                conversation,
            } => format!("{p}v:{account}:{conversation}:*"),
        }
    }
}

/// Escapes Redis glob characters, so a prefix is matched literally.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What is left of one request's Redis time (`--redis-timeout` in total).
#[derive(Debug)]
pub struct Budget {
    left: Duration,
}

impl Budget {
    pub fn new(total: Duration) -> Budget {
        Budget { left: total }
    }
}

/// Up or skipped, with the failures in a row that lead to skipping.
struct Health {
    up: AtomicBool,
    failures: AtomicU32,
    /// An invalidation could not be sent while Redis was skipped or failing.
    missed_invalidation: AtomicBool,
    /// Invalidations that failed while Redis stayed in use, retried in the background. Until
    /// they land this replica reads no shared values: Redis still holds what they invalidate,
    /// under the old generations, and this replica (the writer) would serve it as a hit.
    unsettled: AtomicU32,
}

/// The value (if any), its key's time to live in ms (`PTTL`: negative for none) and the four
/// counters (each if it exists), as Redis returns them.
type ReadReply = (Option<Vec<u8>>, i64, Vec<Option<Vec<u8>>>);

/// Whether the lease was taken (`SET NX` answers `OK`), and a [`ReadReply`] made after it.
type LeaseReply = (Option<String>, Option<Vec<u8>>, i64, Vec<Option<Vec<u8>>>);

/// A [`ReadReply`] and whether the lease is still held.
type PollReply = (Option<Vec<u8>>, i64, Vec<Option<Vec<u8>>>, i64);

/// An L2 read on an L1 miss.
#[derive(Debug)]
pub enum L2Read {
    /// A valid value (generations current, integrity checked, this key).
    Hit(SharedValue),
    /// No valid value; the generations read (for the conditional write after the fetch), and
    /// whether an unusable value was there.
    Miss { gens: Gens, had_value: bool },
    /// Redis skipped, failing or out of budget: go on as without Redis.
    Unavailable,
}

/// The shared tier of one replica.
pub struct Shared {
    /// Replaced when a probe goes unanswered ([`Shared::probe_loop`]).
    conn: std::sync::RwLock<ConnectionManager>,
    manager: ConnectionManagerConfig,
    client: redis::Client,
    keys: Keys,
    channel: String,
    timeout: Duration,
    codec: Codec,
    /// This replica's id on the bus (its own messages are skipped).
    origin: u64,
    health: Health,
    metrics: SharedMetrics,
    /// Expiry of values and counters in ms: ttl + the larger stale window (SPEC 11). Live, like
    /// the other two limits below: a reload changes them ([`Shared::set_limits`]).
    lifetime_ms: AtomicU64,
    max_object_bytes: AtomicU64,
    write_script: redis::Script,
    bump_script: redis::Script,
    release_script: redis::Script,
    /// How long a lease holds in ms (the holder's whole fetch: `--upstream-timeout`), and how
    /// long a waiter waits at most.
    lease_ms: AtomicU64,
    subscribed: AtomicBool,
    /// Bus subscriptions made so far (tests and diagnostics: a resubscription shows here).
    subscriptions: std::sync::atomic::AtomicU64,
    random: SystemRandom,
    /// This replica's L1 generations (set by [`Shared::start`]): bumped again when a bump lands
    /// in Redis ([`Shared::bump`]).
    local: std::sync::OnceLock<Arc<Generations>>,
}

impl Shared {
    /// Sets up the client (connections are made lazily) and registers the SPEC 11 metrics.
    /// Needs a tokio runtime.
    pub fn new(
        cfg: &RedisConfig,
        scope_secret: &[u8],
        lifetime: Duration,
        max_object_bytes: u64,
        lease: Duration,
        metrics: &Metrics,
    ) -> Result<Arc<Shared>, SharedError> {
        let client = match &cfg.ca_file {
            Some(path) => {
                let ca_pem = std::fs::read(path).map_err(|source| SharedError::CaFile {
                    path: path.display().to_string(),
                    source,
                })?;
                let root_cert = crate::tls::redis_root_bundle(&ca_pem);
                redis::Client::build_with_tls(
                    cfg.url.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
            }
            None => redis::Client::open(cfg.url.as_str()),
        }
        .map_err(|e| SharedError::Url(format!("{:?}", e.kind())))?;
        let manager = ConnectionManagerConfig::new()
            // Every call has a deadline of its own (the request's budget, the probe's, the
            // purge's); redis-rs's default of 500 ms per response would cut a longer
            // --redis-timeout short.
            .set_response_timeout(None)
            .set_connection_timeout(Some(cfg.timeout.max(Duration::from_millis(500))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager.clone())
            .map_err(|e| SharedError::Url(format!("{:?}", e.kind())))?;
        let random = SystemRandom::new();
        let mut origin = [0u8; 8];
        random.fill(&mut origin).map_err(|_| SharedError::Random)?;
        let metrics = metrics
            .register_shared()
            .map_err(|e| SharedError::Url(format!("metrics: {e}")))?;
        let keys = Keys {
            prefix: cfg.key_prefix.clone(),
        };
        Ok(Arc::new(Shared {
            conn: std::sync::RwLock::new(conn),
            manager,
            client,
            channel: keys.channel(),
            keys,
            timeout: cfg.timeout,
            codec: Codec::new(scope_secret),
            origin: u64::from_be_bytes(origin),
            health: Health {
                up: AtomicBool::new(false),
                failures: AtomicU32::new(0),
                missed_invalidation: AtomicBool::new(false),
                unsettled: AtomicU32::new(0),
            },
            metrics,
            lifetime_ms: AtomicU64::new(millis(lifetime)),
            max_object_bytes: AtomicU64::new(max_object_bytes),
            write_script: redis::Script::new(WRITE_SCRIPT),
            bump_script: redis::Script::new(BUMP_SCRIPT),
            release_script: redis::Script::new(RELEASE_SCRIPT),
            lease_ms: AtomicU64::new(millis(lease)),
            subscribed: AtomicBool::new(false),
            subscriptions: std::sync::atomic::AtomicU64::new(0),
            random,
            local: std::sync::OnceLock::new(),
        }))
    }

    /// Starts the background tasks: the probe that brings a skipped Redis back, and the bus
    /// subscriber that applies other replicas' invalidations to `generations`.
    pub fn start(self: &Arc<Self>, generations: Arc<Generations>) {
        let _ = self.local.set(generations.clone());
        tokio::spawn(self.clone().probe_loop());
        tokio::spawn(self.clone().bus_loop(generations));
    }

    /// A fresh budget for one request.
    pub fn budget(&self) -> Budget {
        Budget::new(self.timeout)
    }

    /// Whether Redis is in use (not skipped).
    pub fn is_up(&self) -> bool {
        self.health.up.load(Ordering::Acquire)
    }

    /// Whether the bus subscription is established (tests, diagnostics).
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// How many times the bus subscription was established.
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.load(Ordering::Acquire)
    }

    /// Expiry of values (ttl + the larger stale window).
    pub fn lifetime(&self) -> Duration {
        Duration::from_millis(self.lifetime_ms.load(Ordering::Relaxed))
    }

    /// Applies reloaded settings: the values' expiry (ttl + the larger stale window), the largest
    /// body a value may carry, and the lease's length (`--upstream-timeout`).
    pub fn set_limits(&self, lifetime: Duration, max_object_bytes: u64, lease: Duration) {
        self.lifetime_ms.store(millis(lifetime), Ordering::Relaxed);
        self.max_object_bytes
            .store(max_object_bytes, Ordering::Relaxed);
        self.lease_ms.store(millis(lease), Ordering::Relaxed);
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(Ordering::Relaxed))
    }

    /// Runs one Redis call within what is left of `budget`, recording its duration, errors and
    /// the health state. `None`: skipped, out of budget, timed out or failed.
    async fn call<T>(
        &self,
        op: RedisOp,
        budget: &mut Budget,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        if !self.is_up() || budget.left.is_zero() {
            return None;
        }
        let start = Instant::now();
        let result = tokio::time::timeout(budget.left, fut).await;
        let spent = start.elapsed();
        budget.left = budget.left.saturating_sub(spent);
        self.metrics.observe(op, spent.as_secs_f64());
        match result {
            Ok(Ok(v)) => {
                self.health.failures.store(0, Ordering::Relaxed);
                Some(v)
            }
            Ok(Err(e)) => {
                self.failed(op, &format!("{:?}", e.kind()));
                None
            }
            Err(_) => {
                self.failed(op, "timeout");
                None
            }
        }
    }

    fn failed(&self, op: RedisOp, what: &str) {
        self.metrics.error(op);
        let n = self.health.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= FAILURES_TO_SKIP && self.health.up.swap(false, Ordering::AcqRel) {
            self.metrics.up.set(0);
            tracing::warn!(
                op = op.label(),
                error = what,
                "Redis failing; skipped until a probe succeeds (serving without the shared tier)"
            );
        }
    }

    /// A random value to create a missing generation counter with: never 0, and below 2^62 so
    /// increments never overflow Redis's 64-bit integers.
    fn fresh_generation(&self) -> u64 {
        let mut b = [0u8; 8];
        if self.random.fill(&mut b).is_err() {
            // No randomness: the clock in nanoseconds is still never a value seen before.
            b = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                .to_be_bytes();
        }
        (u64::from_be_bytes(b) >> 2).max(1)
    }

    /// Reads the L2 value of `key` and its four generation counters.
    pub async fn read(&self, key: &CacheKey, budget: &mut Budget) -> L2Read {
        if !self.is_up() || self.health.unsettled.load(Ordering::Acquire) > 0 {
            self.metrics.l2(L2Result::Skipped);
            return L2Read::Unavailable;
        }
        let value_key = self.keys.value(key);
        let gen_keys = self.keys.gens(key);
        let mut pipe = redis::pipe();
        self.get_value(&mut pipe, &value_key)
            .cmd("MGET")
            .arg(&gen_keys);
        let mut conn = self.conn();
        let reply: Option<ReadReply> = self
            .call(RedisOp::Read, budget, pipe.query_async(&mut conn))
            .await;
        let Some((raw, pttl, gens_raw)) = reply else {
            self.metrics.l2(L2Result::Error);
            return L2Read::Unavailable;
        };
        let read = self.judge(key, &value_key, (raw, pttl), parse_gens(gens_raw));
        self.metrics.l2(match read {
            L2Read::Hit(_) => L2Result::Hit,
            _ => L2Result::Miss,
        });
        read
    }

    /// Adds the read of a value to `pipe`, at most one byte more than the largest value a
    /// replica stores: whatever else is under the key (a huge string written by anyone who can
    /// reach Redis) never reaches this process whole, and the part that does fails the HMAC.
    /// Then its key's time to live, which bounds its age ([`counted_from`]).
    fn get_value<'p>(
        &self,
        pipe: &'p mut redis::Pipeline,
        value_key: &str,
    ) -> &'p mut redis::Pipeline {
        let max = codec::max_value_len(self.max_object_bytes.load(Ordering::Relaxed));
        pipe.cmd("GETRANGE")
            .arg(value_key)
            .arg(0)
            .arg(max)
            .cmd("PTTL")
            .arg(value_key)
    }

    /// Whether `raw` (the value read under `value_key`, and its key's `PTTL`) is valid for
    /// `key` under `gens`. A valid value's fetch time is the one this replica counts its age
    /// from ([`counted_from`]).
    fn judge(
        &self,
        key: &CacheKey,
        value_key: &str,
        (raw, pttl): (Option<Vec<u8>>, i64),
        gens: Gens,
    ) -> L2Read {
        // GETRANGE answers an empty string for a missing key; a stored value is never empty.
        let Some(raw) = raw.filter(|r| !r.is_empty()) else {
            return L2Read::Miss {
                gens,
                had_value: false,
            };
        };
        match self.codec.decode(
            value_key.as_bytes(),
            key,
            Bytes::from(raw),
            self.max_object_bytes.load(Ordering::Relaxed),
        ) {
            Ok(mut value) if gens.iter().zip(value.gens).all(|(g, v)| *g == Some(v)) => {
                value.fetched_unix_ms = counted_from(
                    value.fetched_unix_ms,
                    unix_ms_now(),
                    self.lifetime_ms.load(Ordering::Relaxed),
                    u64::try_from(pttl).ok(),
                );
                L2Read::Hit(value)
            }
            Ok(_) => L2Read::Miss {
                gens,
                had_value: true,
            },
            Err(e) => {
                tracing::debug!(error = %e, "unusable shared value; treated as a miss");
                L2Read::Miss {
                    gens,
                    had_value: true,
                }
            }
        }
    }

    /// Takes the cross-replica fetch lease of `key` (SPEC 11: concurrent cold requests on
    /// several replicas make one upstream request), and with it reads the value and counters
    /// again, in the same round trip: a previous holder may have stored the value and released
    /// between this replica's read and its lease, and fetching again would be a second upstream
    /// request for the key.
    pub async fn acquire(self: &Arc<Self>, key: &CacheKey, budget: &mut Budget) -> LeaseOutcome {
        let lease_key = self.keys.lease(key);
        let value_key = self.keys.value(key);
        let token = format!("{:016x}{:016x}", self.origin, self.fresh_generation());
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&lease_key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(millis(self.lease()));
        // Pipelined after the SET on one connection, so it sees every write made before the
        // lease was free.
        self.get_value(&mut pipe, &value_key)
            .cmd("MGET")
            .arg(&self.keys.gens(key));
        let mut conn = self.conn();
        let reply: Option<LeaseReply> = self
            .call(RedisOp::Lease, budget, pipe.query_async(&mut conn))
            .await;
        match reply {
            Some((Some(_), raw, pttl, gens)) => {
                let lease = Lease {
                    shared: self.clone(),
                    key: lease_key,
                    token,
                };
                let read = self.judge(key, &value_key, (raw, pttl), parse_gens(gens));
                // Counted like a waiter's read: only when it found a value.
                if matches!(read, L2Read::Hit(_)) {
                    self.metrics.l2(L2Result::Hit);
                }
                LeaseOutcome::Held(lease, Box::new(read))
            }
            Some((None, ..)) => LeaseOutcome::Busy,
            None => LeaseOutcome::Unavailable,
        }
    }

    /// Waits (polling) while another replica holds `key`'s lease: the value it stores (one
    /// fetched at or after `fetched_since`, Unix ms: a stale value that was there before is
    /// what the holder is revalidating), or what is there when it released without storing (or
    /// died, or the wait reached the lease's length). `Unavailable` when Redis fails meanwhile.
    pub async fn wait_for_holder(&self, key: &CacheKey, fetched_since: u64) -> L2Read {
        let value_key = self.keys.value(key);
        let gen_keys = self.keys.gens(key);
        let lease_key = self.keys.lease(key);
        let deadline = Instant::now() + self.lease();
        loop {
            tokio::time::sleep(LEASE_POLL).await;
            if Instant::now() < deadline {
                // While the lease is held only the lease is polled: a value read (up to
                // --max-object-bytes, HMAC checked) every 10 ms for a whole slow fetch would
                // load Redis most during an upstream incident. The holder writes before it
                // releases, so the value is read once, when the lease is gone.
                let mut conn = self.conn();
                let mut budget = self.budget();
                let held: Option<i64> = self
                    .call(
                        RedisOp::Lease,
                        &mut budget,
                        redis::cmd("EXISTS").arg(&lease_key).query_async(&mut conn),
                    )
                    .await;
                match held {
                    None => return L2Read::Unavailable,
                    Some(0) => {}
                    Some(_) => continue,
                }
            }
            let mut pipe = redis::pipe();
            self.get_value(&mut pipe, &value_key)
                .cmd("MGET")
                .arg(&gen_keys)
                .cmd("EXISTS")
                .arg(&lease_key);
            let mut conn = self.conn();
            // Each poll has a budget of its own: the wait is bounded by the lease, not by the
            // request's Redis budget.
            let mut budget = self.budget();
            let reply: Option<PollReply> = self
                .call(RedisOp::Lease, &mut budget, pipe.query_async(&mut conn))
                .await;
            let Some((raw, pttl, gens, held)) = reply else {
                return L2Read::Unavailable;
            };
            let read = self.judge(key, &value_key, (raw, pttl), parse_gens(gens));
            if matches!(&read, L2Read::Hit(v) if v.fetched_unix_ms >= fetched_since) {
                self.metrics.l2(L2Result::Hit);
                return read;
            }
            if held == 0 || Instant::now() >= deadline {
                return read;
            }
        }
    }

    /// Writes `value` (its `gens` are filled in here) for `key`, if the generations are still
    /// the `read` ones: a fetch that raced an invalidation does not land.
    pub async fn write(
        &self,
        key: &CacheKey,
        read: &Gens,
        mut value: SharedValue,
        budget: &mut Budget,
    ) -> bool {
        let inits: [u64; 4] = std::array::from_fn(|_| self.fresh_generation());
        for i in 0..4 {
            value.gens[i] = read[i].unwrap_or(inits[i]);
        }
        let value_key = self.keys.value(key);
        let Ok(encoded) = self.codec.encode(value_key.as_bytes(), key, &value) else {
            return false;
        };
        let mut inv = self.write_script.key(&value_key);
        inv.key(&self.keys.gens(key));
        for g in read {
            inv.arg(g.map_or_else(String::new, |g| g.to_string()));
        }
        for i in inits {
            inv.arg(i);
        }
        inv.arg(encoded).arg(millis(self.lifetime()));
        let mut conn = self.conn();
        let stored: Option<i64> = self
            .call(RedisOp::Write, budget, inv.invoke_async(&mut conn))
            .await;
        stored == Some(1)
    }

    /// Increments `target`'s counter (creating it when missing, see
    /// [`Shared::created_counter_ms`]) and publishes the invalidation on the bus, always: a
    /// refused token's entries may be held by another replica (in its L1 only, or under a
    /// counter Redis evicted) even when this one has none and Redis has no counter for it.
    ///
    /// A bump that fails while Redis stays in use is retried in the background until it lands
    /// (or Redis is skipped, which ends in one global invalidation, or the values it covers
    /// have expired).
    pub async fn invalidate(self: &Arc<Self>, target: Target, budget: &mut Budget) {
        if self.bump(target, budget).await {
            return;
        }
        if !self.is_up() {
            // Not delivered: when Redis is back, everything is invalidated once instead.
            self.health
                .missed_invalidation
                .store(true, Ordering::Release);
            return;
        }
        self.retry_invalidation(target);
    }

    /// Retries a failed bump of `target` in the background; see [`Health::unsettled`].
    fn retry_invalidation(self: &Arc<Self>, target: Target) {
        let n = self.health.unsettled.fetch_add(1, Ordering::AcqRel);
        let target = if n >= MAX_UNSETTLED {
            Target::All
        } else {
            target
        };
        let this = self.clone();
        tokio::spawn(async move {
            // Values written before the failure are gone from Redis after one lifetime.
            let give_up = Instant::now() + this.lifetime();
            let mut wait = RETRY_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                if !this.is_up() {
                    this.health
                        .missed_invalidation
                        .store(true, Ordering::Release);
                    break;
                }
                let mut budget = Budget::new(this.background_timeout());
                if this.bump(target, &mut budget).await || Instant::now() >= give_up {
                    break;
                }
                wait = (wait * 2).min(PROBE_INTERVAL);
            }
            this.health.unsettled.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// How long a counter an invalidation creates lives, in ms. Every value was written while
    /// all its counters existed (the write creates missing ones), so a missing counter means no
    /// value under it is valid any more: the created one only has to make the conditional
    /// writes of fetches in flight fail (they read it missing). A token scope's counter (one
    /// per refused token, and random tokens must cost Redis next to nothing, SPEC 10) lives
    /// twice the longest fetch (`--upstream-timeout`, the lease's length); the others, few,
    /// a value's lifetime like those writes create.
    fn created_counter_ms(&self, target: Target) -> u64 {
        let lifetime = self.lifetime();
        millis(match target {
            Target::Scope(_) => self.lease().saturating_mul(2).min(lifetime),
            _ => lifetime,
        })
    }

    /// One attempt at bumping `target`'s counter (and publishing). `true` when Redis answered.
    ///
    /// Once it has landed, `target` is bumped in this replica's L1 again: the caller bumped it
    /// locally first, and a read on this replica in between (one round trip at least, more
    /// after a `NOSCRIPT` or a retry) may have found the old value under the old counters and
    /// put it in L1 under the new local stamp. This replica skips its own bus messages, so
    /// nothing else would drop it.
    async fn bump(&self, target: Target, budget: &mut Budget) -> bool {
        let message = bus::message(self.origin, target);
        let mut inv = self.bump_script.key(self.keys.target(target));
        inv.arg(self.fresh_generation())
            .arg(self.created_counter_ms(target))
            .arg(&self.channel)
            .arg(&message);
        let mut conn = self.conn();
        let published: Option<i64> = self
            .call(RedisOp::Invalidate, budget, inv.invoke_async(&mut conn))
            .await;
        if published.is_none() {
            return false;
        }
        self.metrics.bus_sent();
        if let Some(local) = self.local.get() {
            local.bump(target);
        }
        true
    }

    /// Deletes the L2 values `target` covers and invalidates it (purge API). Returns how many
    /// values were removed, or `None` if Redis could not be used.
    pub async fn purge(self: &Arc<Self>, target: Target) -> Option<usize> {
        if !self.is_up() {
            self.health
                .missed_invalidation
                .store(true, Ordering::Release);
            return None;
        }
        let pattern = self.keys.values_matching(target);
        let mut conn = self.conn();
        let scan = async {
            let mut cursor: u64 = 0;
            let mut removed = 0usize;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await?;
                if !keys.is_empty() {
                    let n: usize = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
                    removed += n;
                }
                if next == 0 {
                    return Ok(removed);
                }
                cursor = next;
            }
        };
        let mut budget = Budget::new(PURGE_TIMEOUT);
        let removed = self.call(RedisOp::Purge, &mut budget, scan).await;
        self.invalidate(target, &mut budget).await;
        removed
    }

    /// The time a background call (probe, invalidation retry) may take: `--redis-timeout`,
    /// but never so short that a healthy Redis on a loaded host looks down.
    fn background_timeout(&self) -> Duration {
        self.timeout.max(Duration::from_millis(250))
    }

    /// The connection (a multiplexed one redis-rs reconnects when it breaks); a clone is cheap.
    fn conn(&self) -> ConnectionManager {
        self.conn
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the connection with a new one (made on first use).
    fn reconnect(&self) {
        if let Ok(fresh) =
            ConnectionManager::new_lazy_with_config(self.client.clone(), self.manager.clone())
        {
            *self
                .conn
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        }
    }

    /// Probes a skipped Redis until it takes a write, then uses it again. Invalidations that could
    /// not be sent meanwhile become one global invalidation (retried until it lands).
    async fn probe_loop(self: Arc<Self>) {
        let probe_timeout = self.background_timeout();
        loop {
            if !self.is_up() {
                let mut conn = self.conn();
                let start = Instant::now();
                // A write, not a PING: a Redis that answers but refuses writes (a replica
                // after a failover, out of memory, an ACL) would otherwise be taken back at
                // once, fail the next invalidations and be skipped again, over and over, with
                // `chatwoot_cache_redis_up` flapping instead of staying 0.
                let ping = tokio::time::timeout(
                    probe_timeout,
                    redis::cmd("SET")
                        .arg(self.keys.probe())
                        .arg(self.origin)
                        .arg("PX")
                        .arg(PROBE_KEY_MS)
                        .query_async::<String>(&mut conn),
                )
                .await;
                self.metrics
                    .observe(RedisOp::Probe, start.elapsed().as_secs_f64());
                if ping.is_err() {
                    // Unanswered, not refused: the connection may be one whose path went
                    // silent (a partition, a dropped NAT entry), which redis-rs keeps until
                    // TCP gives up (many minutes). The next probe uses a new one.
                    self.reconnect();
                }
                if matches!(ping, Ok(Ok(_))) {
                    self.health.failures.store(0, Ordering::Release);
                    let missed = self
                        .health
                        .missed_invalidation
                        .swap(false, Ordering::AcqRel);
                    if missed {
                        // No shared reads until the global invalidation below lands.
                        self.retry_invalidation(Target::All);
                    }
                    self.health.up.store(true, Ordering::Release);
                    self.metrics.up.set(1);
                    tracing::info!("Redis reachable; shared tier in use");
                    if missed {
                        tracing::info!(
                            "invalidations were made while Redis was unusable: invalidating all shared entries"
                        );
                    }
                } else {
                    self.metrics.error(RedisOp::Probe);
                }
            } else if self
                .health
                .missed_invalidation
                .swap(false, Ordering::AcqRel)
            {
                // Missed while in use (a purge that found Redis skipped an instant ago).
                self.retry_invalidation(Target::All);
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Subscribes to the bus and applies other replicas' invalidations to `generations`. Every
    /// (re)subscription first invalidates the whole L1: messages may have been missed.
    async fn bus_loop(self: Arc<Self>, generations: Arc<Generations>) {
        let mut broken = false;
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let connect_timeout = self.timeout.max(Duration::from_secs(1));
            match tokio::time::timeout(connect_timeout, subscribed).await {
                Ok(Ok(pubsub)) => {
                    generations.bump_all();
                    self.set_subscribed(true);
                    self.subscriptions.fetch_add(1, Ordering::AcqRel);
                    if broken {
                        tracing::info!(
                            "invalidation bus subscribed again; entries stored before are revalidated"
                        );
                    }
                    let lost = self.listen(pubsub, &generations).await;
                    self.set_subscribed(false);
                    self.metrics.error(RedisOp::Subscribe);
                    broken = true;
                    tracing::warn!(
                        reason = lost,
                        "invalidation bus subscription lost; serving from L1, resubscribing"
                    );
                }
                Ok(Err(_)) | Err(_) => {
                    self.metrics.error(RedisOp::Subscribe);
                }
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Applies bus messages until the subscription is lost, and says why. A subscriber only
    /// receives, so a connection whose path went silent without a FIN or RST would look
    /// subscribed forever while every other replica's invalidation is lost: it is PINGed every
    /// [`BUS_PING_INTERVAL`], and one PING unanswered for max(`--redis-timeout`,
    /// [`BUS_PING_TIMEOUT_MIN`]) ends it (a silence is noticed within the sum of the two).
    async fn listen(&self, pubsub: redis::aio::PubSub, generations: &Generations) -> &'static str {
        let (mut sink, mut messages) = pubsub.split();
        let ping_timeout = self.timeout.max(BUS_PING_TIMEOUT_MIN);
        let keepalive = async {
            let mut tick = tokio::time::interval(BUS_PING_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate; the subscription was just confirmed.
            tick.tick().await;
            loop {
                tick.tick().await;
                let start = Instant::now();
                let pong = tokio::time::timeout(ping_timeout, sink.ping::<redis::Value>()).await;
                self.metrics
                    .observe(RedisOp::Subscribe, start.elapsed().as_secs_f64());
                match pong {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return "keep-alive PING failed",
                    Err(_) => return "keep-alive PING unanswered",
                }
            }
        };
        tokio::pin!(keepalive);
        // Both at once: a PING in flight never holds up the messages.
        loop {
            tokio::select! {
                lost = &mut keepalive => return lost,
                msg = messages.next() => {
                    let Some(msg) = msg else {
                        return "connection closed";
                    };
                    if let Some((origin, target)) = bus::parse(msg.get_payload_bytes())
                        && origin != self.origin
                    {
                        self.metrics.bus_received();
                        generations.bump(target);
                    }
                }
            }
        }
    }

    fn set_subscribed(&self, subscribed: bool) {
        self.subscribed.store(subscribed, Ordering::Release);
        self.metrics.bus_subscribed.set(i64::from(subscribed));
    }
}

/// Counters as Redis returns them; one that is not a number counts as missing.
fn parse_gens(raw: Vec<Option<Vec<u8>>>) -> Gens {
    let mut gens: Gens = [None; 4];
    for (slot, raw) in gens.iter_mut().zip(raw) {
        *slot = raw.and_then(|r| std::str::from_utf8(&r).ok()?.parse().ok());
    }
    gens
}

/// The answer to [`Shared::acquire`].
pub enum LeaseOutcome {
    /// This replica fetches (unless the value read with the lease answers); the lease is
    /// released when dropped. Boxed: a value is large, and this is the cold path.
    Held(Lease, Box<L2Read>),
    /// Another replica is fetching: [`Shared::wait_for_holder`].
    Busy,
    /// Redis did not answer: fetch without a lease.
    Unavailable,
}

/// A held fetch lease. Dropped when the fetch is over (its value is written by then, or it
/// cannot be stored): the release wakes the waiters at once.
pub struct Lease {
    shared: Arc<Shared>,
    key: String,
    token: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let shared = self.shared.clone();
        let key = std::mem::take(&mut self.key);
        let token = std::mem::take(&mut self.token);
        // Drop cannot await; a release that fails leaves the lease to expire (its length).
        tokio::spawn(async move {
            let mut budget = shared.budget();
            let mut conn = shared.conn();
            let mut inv = shared.release_script.key(&key);
            inv.arg(&token);
            let _: Option<i64> = shared
                .call(RedisOp::Lease, &mut budget, inv.invoke_async(&mut conn))
                .await;
        });
    }
}

/// The fetch time (Unix ms) a reader counts a shared value's age from: the writer's stamp,
/// `fetched`, but never later than `now` and never later than the value's key allows — the key
/// was written with an expiry of `lifetime` (every replica's ttl + the larger stale window) at
/// or after the fetch, so with `left` of it to go (`PTTL`, Redis's own clock) the fetch was at
/// least `lifetime - left` ago. A writer whose clock runs ahead thus never makes a value look
/// fresher than the time since it was written, measured by Redis and this reader: freshness is
/// never extended past ttl. (Replicas configured with different stale windows bound it less
/// tightly, or make values look older than they are: never fresher.)
fn counted_from(fetched: u64, now: u64, lifetime: u64, left: Option<u64>) -> u64 {
    let written_before = left.map_or(0, |left| lifetime.saturating_sub(left));
    fetched.min(now.saturating_sub(written_before))
}

/// Milliseconds of `d`, at least 1 (Redis refuses `PX 0`).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Unix milliseconds now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;

    /// A writer's clock ahead (or behind) of the reader's: the age a reader counts is at least
    /// the time since the write, as the key's expiry tells it, and never negative.
    #[test]
    fn a_writer_clock_ahead_never_makes_a_value_fresher() {
        let now = 1_765_182_000_000;
        let lifetime = 610_000; // 10 s ttl + 10 min stale-if-error
        let ttl = 10_000;
        // Written 12 s ago by a writer whose clock is 1 h ahead: stamped in the future.
        let ahead = now + 3_600_000 - 12_000;
        let from = counted_from(ahead, now, lifetime, Some(lifetime - 12_000));
        assert_eq!(
            now - from,
            12_000,
            "age from the key's expiry, not the stamp"
        );
        assert!(now - from >= ttl, "past ttl on the reader: not fresh");
        // Stamped in the future but the key's expiry unknown (no PTTL): at most now.
        assert_eq!(counted_from(ahead, now, lifetime, None), now);
        // Same clocks: the writer's stamp (the fetch, a little before the write) stands.
        let fetched = now - 12_050;
        assert_eq!(
            counted_from(fetched, now, lifetime, Some(lifetime - 12_000)),
            fetched
        );
        // A writer behind: its stamp makes the value older, never fresher.
        let behind = now - 60_000;
        assert_eq!(
            counted_from(behind, now, lifetime, Some(lifetime - 1_000)),
            behind
        );
        // A key whose expiry outlasts this replica's lifetime (a writer with longer stale
        // windows): no bound from it, the clamp to now still holds.
        assert_eq!(counted_from(ahead, now, lifetime, Some(lifetime * 2)), now);
    }

    #[test]
    fn keys_carry_ids_and_scope_never_more() {
        let keys = Keys {
            prefix: "cw*[x]:".into(),
        };
        let k = CacheKey {
            account: 1,
            conversation: 42,
            scope: Scope(255),
        };
        assert_eq!(
            keys.value(&k),
            "cw*[x]:v:1:42:000000000000000000000000000000ff"
        );
        assert_eq!(
            keys.gens(&k),
            [
                "cw*[x]:g".to_string(),
                "cw*[x]:g:a:1".to_string(),
                "cw*[x]:g:c:1:42".to_string(),
                "cw*[x]:g:s:000000000000000000000000000000ff".to_string(),
            ]
        );
        assert_eq!(
            keys.values_matching(Target::Conversation {
                account: 1,
                conversation: 42
            }),
            "cw\\*\\[x\\]:v:1:42:*"
        );
        assert_eq!(
            keys.values_matching(Target::Account(1)),
            "cw\\*\\[x\\]:v:1:*"
        );
        assert_eq!(keys.channel(), "cw*[x]:bus");
    }
}
