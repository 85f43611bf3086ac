//! The per-token rate limit (`--rate-limit-per-token`, `--rate-limit-burst`, SPEC 12): token
//! buckets per scope ([`Key`]: a token the upstream accepted, else the client address), for the
//! requests that need the upstream.
//!
//! Each bucket is one GCRA cell (the generic cell rate algorithm: a token bucket kept as one
//! "theoretical arrival time", so no periodic refill): a request conforms when it arrives no
//! earlier than `tat - burst tolerance`, and then pushes `tat` one emission interval (1/rate)
//! further.
//!
//! Memory is fixed whatever the number of tokens: [`SHARDS`] × [`SHARD_SLOTS`] cells (16 bytes
//! each, 256 KiB in all), indexed by a keyed hash of the scope (std's SipHash with a per-process
//! random key), two-way set-associative. Constant work per request: one hash, one uncontended
//! shard lock, two slots. Collision behaviour: a scope not in its two slots takes over the one
//! idler longer (the fuller bucket — an unknown scope's is full anyway); the scope it displaces
//! starts again from a full bucket next time, so with more scopes active at once than cells the
//! limit errs lenient (one extra burst per displacement) and never charges one scope for
//! another's requests. Scopes that made one request and went away are the idle ones displaced
//! first, so a flood of new tokens does not reset a busy scope's bucket.

use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::limiter::Key;

pub const SHARDS: usize = 64;
pub const SHARD_SLOTS: usize = 256;

/// A rate: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

impl Rate {
    /// Requests per second.
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }

    /// The default burst: the rate per second, at least 1.
    pub fn default_burst(&self) -> u32 {
        (self.per_second().ceil() as u32).max(1)
    }
}

/// Parses `20/s`, `600/m`, `3600/h`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("invalid rate {s:?} (e.g. 20/s, 600/m)");
    let (n, unit) = s.split_once('/').ok_or_else(bad)?;
    let count: u64 = n.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!(
            "{s:?}: the rate must be at least 1 (leave it unset for no limit)"
        ));
    }
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    if count > 1_000_000_000 {
        return Err(bad());
    }
    Ok(Rate { count, per })
}

#[derive(Clone, Copy, Default)]
struct Cell {
    /// Keyed hash of the scope; 0 = empty.
    fingerprint: u64,
    /// Theoretical arrival time, nanoseconds since the limiter's origin.
    tat: u64,
}

/// See the module docs.
pub struct RateLimiter {
    rate: Rate,
    burst: u32,
    /// Nanoseconds between two conforming requests at the steady rate.
    interval: u64,
    /// How far ahead of now `tat` may run: (burst - 1) intervals.
    tolerance: u64,
    origin: Instant,
    hasher: std::collections::hash_map::RandomState,
    shards: Box<[Mutex<Box<[Cell]>>]>,
}

impl RateLimiter {
    pub fn new(rate: Rate, burst: u32) -> RateLimiter {
        let interval = (rate.per.as_nanos() / u128::from(rate.count.max(1))).max(1);
        let interval = u64::try_from(interval).unwrap_or(u64::MAX);
        RateLimiter {
            rate,
            burst,
            interval,
            tolerance: interval.saturating_mul(u64::from(burst.max(1) - 1)),
            origin: Instant::now(),
            hasher: Default::default(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(vec![Cell::default(); SHARD_SLOTS].into_boxed_slice()))
                .collect(),
        }
    }

    /// The rate and burst it enforces.
    pub fn settings(&self) -> (Rate, u32) {
        (self.rate, self.burst)
    }

    /// Takes one request from `key`'s bucket, or says how long until one is available.
    pub fn check(&self, key: Key) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// Nanoseconds since `origin`, +1: a tat of 0 is an empty cell's, always in the past.
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// Where `key`'s bucket may sit: its fingerprint (never 0, an empty cell's), its shard and
    /// the first of its two cells there.
    fn slot(&self, key: Key) -> (u64, usize, usize) {
        let hash = self.hasher.hash_one(key);
        let shard = (hash >> 58) as usize % SHARDS;
        (hash.max(1), shard, (hash as usize % SHARD_SLOTS) & !1)
    }

    fn check_at(&self, key: Key, at: Instant) -> Result<(), Duration> {
        let now = self.nanos(at);
        let (fingerprint, shard, first) = self.slot(key);
        let mut cells = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        let pair = &mut cells[first..first + 2];
        let idx = if pair[0].fingerprint == fingerprint {
            0
        } else if pair[1].fingerprint == fingerprint {
            1
        } else {
            // Take over the cell idle longest (the lower tat: the fuller bucket).
            let victim = usize::from(pair[1].tat < pair[0].tat);
            pair[victim] = Cell {
                fingerprint,
                tat: 0,
            };
            victim
        };
        let cell = &mut pair[idx];
        let tat = cell.tat.max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            return Err(Duration::from_nanos(ahead - self.tolerance));
        }
        cell.tat = tat.saturating_add(self.interval);
        Ok(())
    }

    /// Whether `key`'s bucket holds a request right now, without taking it: background work
    /// (refresh-ahead, SPEC 12) runs only while its scope is not being limited and never
    /// spends the scope's budget, so a client that only gets hits keeps all of it for its
    /// own misses.
    pub fn has_headroom(&self, key: Key) -> bool {
        let now = self.nanos(Instant::now());
        let (fingerprint, shard, first) = self.slot(key);
        let cells = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        cells[first..first + 2]
            .iter()
            .find(|c| c.fingerprint == fingerprint)
            // Not in the table: a full bucket.
            .is_none_or(|c| c.tat.saturating_sub(now) <= self.tolerance)
    }

    /// Bytes of bucket state: fixed at construction (tests).
    pub fn state_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| std::mem::size_of_val(&**s.lock().unwrap_or_else(|p| p.into_inner())))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;

    fn per_sec(n: u64) -> Rate {
        Rate {
            count: n,
            per: Duration::from_secs(1),
        }
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("20/s"), Ok(per_sec(20)));
        let m = parse_rate("600/m").unwrap();
        assert_eq!(m.per_second(), 10.0);
        assert_eq!(m.default_burst(), 10);
        assert_eq!(parse_rate("1/m").unwrap().default_burst(), 1);
        assert_eq!(parse_rate("3/h").unwrap().per, Duration::from_secs(3600));
        for bad in ["20", "20/d", "/s", "x/s", "0/s", "-1/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_steady_rate_with_retry_after() {
        let l = RateLimiter::new(per_sec(2), 3);
        let k = Key::Token(Scope(1));
        for _ in 0..3 {
            assert!(l.check(k).is_ok());
        }
        let wait = l.check(k).unwrap_err();
        assert_eq!(
            wait,
            Duration::from_millis(500),
            "one interval until the next"
        );
        // Another scope has its own bucket.
        assert!(l.check(Key::Token(Scope(2))).is_ok());
        assert!(l.check(Key::Addr([10, 0, 0, 1].into())).is_ok());
        tokio::time::advance(wait).await;
        assert!(l.check(k).is_ok());
        assert!(l.check(k).is_err());
        // Idle long enough, the whole burst is back (and no more).
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..3 {
            assert!(l.check(k).is_ok());
        }
        assert!(l.check(k).is_err());
    }

    /// A million distinct tokens leave the state exactly as large as before, and a busy scope
    /// stays held to its rate all along: one-off scopes (a new one every millisecond, for 1000
    /// simulated seconds) displace idle cells, not the busy one's, so it gets about one request
    /// a second (plus the rare extra burst a displacement gives), not the 1000 a second it asks.
    #[test]
    fn headroom_is_read_without_taking_a_request() {
        let per_minute = Rate {
            count: 1,
            per: Duration::from_secs(60),
        };
        let rl = RateLimiter::new(per_minute, 2);
        let key = Key::Token(Scope(7));
        for _ in 0..10 {
            assert!(rl.has_headroom(key));
        }
        assert!(rl.check(key).is_ok());
        assert!(rl.has_headroom(key), "one request of the burst left");
        assert!(rl.check(key).is_ok(), "peeking took none of the burst");
        assert!(!rl.has_headroom(key));
        assert!(rl.check(key).is_err());
    }

    #[test]
    fn memory_is_flat_after_a_million_tokens() {
        let l = RateLimiter::new(per_sec(1), 1);
        let before = l.state_bytes();
        assert_eq!(before, SHARDS * SHARD_SLOTS * 16);
        let busy = Key::Token(Scope(u128::MAX / 3));
        let mut allowed = 0u64;
        for i in 0..1_000_000u64 {
            let at = l.origin + Duration::from_millis(i);
            let one_off = Key::Token(Scope(u128::from(i) << 7 | 0x55));
            assert!(
                l.check_at(one_off, at).is_ok(),
                "a new scope has a full bucket"
            );
            allowed += u64::from(l.check_at(busy, at).is_ok());
        }
        assert_eq!(l.state_bytes(), before);
        assert!(
            (1000..=1050).contains(&allowed),
            "busy scope allowed {allowed} times in 1000 s at 1/s"
        );
    }
}
