//! A stored answer and how it is rendered to a client.
//!
//! Everything a hit needs is computed when the entry is stored (strong ETag, `Last-Modified`,
//! the filtered header block), so a hit clones a header map, overwrites three per-request values
//! in the slots the block starts with and shares the body `Bytes`: no JSON parsing, no hashing,
//! no body copy.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use tokio::time::Instant;

use super::decimal::Decimal;
use crate::body::ResponseBody;

/// A positive (stored 200) or negative (remembered 404 / non-token 401) answer.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// End-to-end upstream headers to replay (includes upstream `Date`, `Content-Type`,
    /// `Cache-Control`, our `Content-Length`; never `Set-Cookie` or auth headers).
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Unix seconds of the `Last-Modified` in `headers` (from `updated_at` whole seconds), for
    /// `If-Modified-Since`. The strong ETag and `Last-Modified` themselves live in `headers`
    /// only (see [`Entry::etag`], [`Entry::last_modified`]).
    pub last_modified_secs: Option<u64>,
    pub updated_at: Option<Decimal>,
    /// Validators the upstream gave, replayed on revalidation. Like every value in `headers`
    /// they are slices of one exact-size copy owned by the entry (see
    /// [`super::rules`]), never of the upstream connection's read buffer.
    pub upstream_etag: Option<HeaderValue>,
    pub upstream_last_modified: Option<HeaderValue>,
    pub stored_at: Instant,
    /// Generations at fetch start (see [`crate::invalidation`]).
    pub stamp: crate::invalidation::Stamp,
    /// How long moka may keep it (freshness + stale windows, or the negative TTL).
    pub lifetime: Duration,
    /// Bytes counted against `--cache-max-bytes`.
    pub weight: u32,
    /// Set when revalidating this entry failed: for a short while it is served stale without
    /// asking the upstream again (see [`FailureMark`]).
    pub failure: FailureMark,
}

/// The longest an entry is served stale-if-error without trying the upstream again after a
/// failed revalidation (the cache TTL, when shorter, is used instead). Coalescing already makes
/// concurrent requests share one attempt; this stops *sequential* requests for a key from each
/// hitting a failing upstream (nginx's `proxy_cache_use_stale` keeps hammering it) before the
/// circuit breaker has seen enough failures to open.
pub const FAILURE_BACKOFF: Duration = Duration::from_secs(1);

/// A failed revalidation remembered on the entry it tried to refresh.
#[derive(Debug, Default)]
pub struct FailureMark {
    /// Milliseconds after `stored_at` until which the entry is not revalidated; 0 = none.
    until_ms: std::sync::atomic::AtomicU64,
    /// The `fwd-status` of that failure.
    status: std::sync::atomic::AtomicU16,
    /// The breaker's recovery count when it failed: a recovery since ends the backoff.
    recoveries: std::sync::atomic::AtomicU64,
}

impl Entry {
    pub fn is_negative(&self) -> bool {
        self.status != StatusCode::OK
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored_at)
    }

    /// Our strong ETag of the body (positive entries only).
    pub fn etag(&self) -> Option<&HeaderValue> {
        self.validator(header::ETAG)
    }

    /// Our `Last-Modified` (positive entries with a representable `updated_at` only).
    pub fn last_modified(&self) -> Option<&HeaderValue> {
        self.validator(header::LAST_MODIFIED)
    }

    /// The upstream's own validators are never stored in `headers` (`rules::never_stored`),
    /// so a validator there is always ours.
    fn validator(&self, name: HeaderName) -> Option<&HeaderValue> {
        if self.is_negative() {
            None
        } else {
            self.headers.get(name)
        }
    }

    /// Remembers that revalidating this entry failed with `fwd_status` at `now`; it is not
    /// revalidated again for `backoff`.
    pub fn note_failure(&self, now: Instant, fwd_status: u16, backoff: Duration, recoveries: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let until = self.age(now) + backoff;
        self.failure.status.store(fwd_status, Relaxed);
        self.failure.recoveries.store(recoveries, Relaxed);
        self.failure.until_ms.store(
            u64::try_from(until.as_millis()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    /// The `fwd-status` of a revalidation failure still within its backoff, if any. The
    /// backoff ends early once the circuit breaker has recovered (`recoveries` moved on).
    pub fn recent_failure(&self, now: Instant, recoveries: u64) -> Option<u16> {
        use std::sync::atomic::Ordering::Relaxed;
        let until = self.failure.until_ms.load(Relaxed);
        (until > 0
            && (self.age(now).as_millis() as u64) < until
            && self.failure.recoveries.load(Relaxed) == recoveries)
            .then(|| self.failure.status.load(Relaxed))
    }

    /// Bytes this entry is weighed as against `--cache-max-bytes`: the body, the stored header
    /// map (names, values and the map's own slots: [`header_map_bytes`]), `extra_bytes` held
    /// outside the map (the upstream validators, `updated_at`'s digits), and the fixed
    /// per-entry bookkeeping [`ENTRY_OVERHEAD`].
    pub fn compute_weight(headers: &HeaderMap, body: &Bytes, extra_bytes: usize) -> u32 {
        let header_text: usize = headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        let total = body.len()
            + header_text
            + header_map_bytes(headers.len())
            + extra_bytes
            + ENTRY_OVERHEAD;
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// Whether the client's conditional headers make this a 304 (RFC 9110 §13.1.2, §13.1.3):
    /// `If-None-Match` (weak comparison) takes precedence over `If-Modified-Since`.
    pub fn not_modified_for(&self, req: &HeaderMap) -> bool {
        if self.is_negative() {
            return false;
        }
        if let Some(inm) = req.get(header::IF_NONE_MATCH) {
            let Some(etag) = self.etag() else {
                return false;
            };
            return etag_list_matches(inm.as_bytes(), etag.as_bytes());
        }
        if let (Some(ims), Some(lm)) = (req.get(header::IF_MODIFIED_SINCE), self.last_modified_secs)
            && let Some(ims) = ims
                .to_str()
                .ok()
                .and_then(|s| httpdate::parse_http_date(s).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        {
            return ims.as_secs() >= lm;
        }
        false
    }

    /// Renders the entry. `head` drops the body; `not_modified` renders a 304. `X-Cache` is
    /// left to the caller, which stamps it on every answer (`proxy::finish`), into the stored
    /// block's slot.
    pub fn render(
        &self,
        now: Instant,
        cache_status: HeaderValue,
        head: bool,
        not_modified: bool,
    ) -> Response<ResponseBody> {
        let mut resp = if not_modified {
            let mut r = Response::new(ResponseBody::empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            let h = r.headers_mut();
            // RFC 9110 §15.4.5: the validator and caching headers, no representation metadata.
            if let Some(v) = self.headers.get(header::CACHE_CONTROL) {
                h.insert(header::CACHE_CONTROL, v.clone());
            }
            if let Some(v) = self.headers.get(header::VARY) {
                h.insert(header::VARY, v.clone());
            }
            if let Some(e) = self.etag() {
                h.insert(header::ETAG, e.clone());
            }
            if let Some(lm) = self.last_modified() {
                h.insert(header::LAST_MODIFIED, lm.clone());
            }
            r
        } else {
            let (body, content_length) = if head {
                // hyper derives Content-Length from the body; a HEAD answer has none, so the
                // GET body's length is stated here.
                (
                    ResponseBody::empty(),
                    Some(HeaderValue::from(self.body.len())),
                )
            } else {
                (ResponseBody::full(self.body.clone()), None)
            };
            let mut r = Response::new(body);
            *r.status_mut() = self.status;
            // The stored block has slots for X-Cache, Age and Cache-Status (see
            // `rules::RENDER_SLOTS`), overwritten below by position.
            *r.headers_mut() = self.headers.clone();
            if let Some(len) = content_length {
                r.headers_mut().insert(header::CONTENT_LENGTH, len);
            }
            r
        };
        // `headers` already holds ETag and Last-Modified (see `rules::positive_entry`).
        // `Content-Length` is not stored: hyper writes it from the body's exact size.
        let age = small_number(self.age(now).as_secs());
        let by_position = set_render_slots(resp.headers_mut(), None, Some(age), Some(cache_status));
        // Every stored block starts with the slots (`rules::OwnedHeaders::build`); only the
        // freshly built 304 map has none.
        debug_assert!(
            by_position || not_modified,
            "stored block without render slots"
        );
        resp
    }
}

/// Sets X-Cache, Age and Cache-Status (each when given) and says whether it could do so by
/// position. A block built by `rules::OwnedHeaders` starts with a slot for each, in that order
/// (`rules::RENDER_SLOTS`): those are overwritten without hashing a name. Any other map (a 304,
/// a local error, a forwarded response) gets ordinary inserts, which replace every earlier
/// value of the name.
pub fn set_render_slots(
    headers: &mut HeaderMap,
    xcache: Option<HeaderValue>,
    age: Option<HeaderValue>,
    cache_status: Option<HeaderValue>,
) -> bool {
    let mut slots = headers.iter_mut();
    // `iter_mut` yields every value of a name before the next name, so three leading items
    // named X-Cache, Age, Cache-Status followed by another name are exactly one value each.
    if let (Some((n0, v0)), Some((n1, v1)), Some((n2, v2))) =
        (slots.next(), slots.next(), slots.next())
        && *n0 == X_CACHE
        && *n1 == header::AGE
        && *n2 == CACHE_STATUS
        && slots.next().is_none_or(|(n3, _)| *n3 != CACHE_STATUS)
    {
        for (slot, value) in [(v0, xcache), (v1, age), (v2, cache_status)] {
            if let Some(value) = value {
                *slot = value;
            }
        }
        return true;
    }
    if let Some(v) = xcache {
        headers.insert(X_CACHE.clone(), v);
    }
    if let Some(v) = age {
        headers.insert(header::AGE, v);
    }
    if let Some(v) = cache_status {
        headers.insert(CACHE_STATUS.clone(), v);
    }
    false
}

/// `HeaderValue`s for a table of per-request values (Age seconds, Cache-Status TTLs), built
/// from leaked `'static` text: cloning one copies two words. A value made at run time is a
/// shared buffer whose reference count every hit on every worker thread would increment and
/// decrement (the same cache line bouncing between cores). The tables are bounded and built
/// once, so the leak is a fixed few hundred KiB.
pub fn static_table(len: usize, text: impl Fn(usize) -> String) -> Vec<HeaderValue> {
    (0..len)
        .map(|n| HeaderValue::from_static(Box::leak(text(n).into_boxed_str())))
        .collect()
}

/// Entries of the per-request header tables: one hour of seconds and then some, so Age and
/// Cache-Status TTLs of common configurations never format or allocate.
pub const STATIC_TABLE_LEN: usize = 4096;

/// A header value for a small number without allocating: values below [`STATIC_TABLE_LEN`]
/// come from a static table built once.
pub fn small_number(n: u64) -> HeaderValue {
    static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| static_table(STATIC_TABLE_LEN, |n| n.to_string()));
    match table.get(n as usize) {
        Some(v) => v.clone(),
        None => HeaderValue::from(n),
    }
}

/// Fixed per-entry bookkeeping counted in the weight: the `Arc<Entry>` allocation (344 bytes:
/// the struct holds the header map's and the body's handles inline), the shared-buffer headers
/// of the body and of the one allocation holding the entry's header values (24 bytes each),
/// and moka's per-entry cost (its node with the key, deque and timer-wheel links, hash-table
/// slot, share of table growth and of the frequency sketch: ~300 bytes, measured on its own by
/// `moka_bookkeeping_per_entry` in tests/memory.rs).
///
/// Measured, not estimated, with a counting global allocator (tests/memory.rs, which fails
/// if the heap per entry exceeds 1.25 x the weight): real heap growth per stored entry minus
/// the body, the header names and values, the header map's slots (`header_map_bytes`) and
/// the validators/`updated_at` digits came to ~570 B/entry for 2000 entries stored through
/// the proxy, and ~620-650 B/entry for 2000-16000 entries inserted into a bare `Store` (fewer
/// standard header names, whose text is counted but costs no heap). Rounded up. Not included:
/// malloc's own per-allocation overhead (~15 allocations per entry; the same test estimates
/// it at ~200 B/entry for glibc).
pub const ENTRY_OVERHEAD: usize = 640;

/// The heap of a stored header map holding `values` values, as `rules` builds it (exact-size
/// entries, see `rules::exact_size_map`): one slot per value (http's private
/// `Bucket { hash: u16, key: HeaderName, value: HeaderValue, links: Option<Links> }` — 104
/// bytes on 64-bit; an extra value of a repeated name takes a smaller slot, so this is an upper
/// bound) and a power-of-two index of 4-byte positions. tests/memory.rs checks this against the
/// allocator.
pub fn header_map_bytes(values: usize) -> usize {
    if values == 0 {
        return 0;
    }
    values * HEADER_SLOT + 4 * (values + values / 3).next_power_of_two()
}

/// One header-map slot: `u16` hash, name, value and two `usize` links behind an `Option`.
pub const HEADER_SLOT: usize =
    (2 + size_of::<HeaderName>() + size_of::<HeaderValue>() + size_of::<Option<(usize, usize)>>())
        .next_multiple_of(align_of::<usize>());

pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Strong ETag for a body: the first 128 bits of its SHA-256, quoted.
pub fn strong_etag(body: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(&strong_etag_text(body))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// The text of [`strong_etag`], without allocating.
pub fn strong_etag_text(body: &[u8]) -> [u8; 34] {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let mut out = [b'"'; 34];
    for (i, b) in digest.as_ref()[..16].iter().enumerate() {
        out[1 + 2 * i] = HEX[(b >> 4) as usize];
        out[2 + 2 * i] = HEX[(b & 15) as usize];
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `If-None-Match` list against one ETag, weak comparison (`W/` ignored), `*` matches.
fn etag_list_matches(list: &[u8], etag: &[u8]) -> bool {
    let strip = |t: &[u8]| -> Vec<u8> {
        let t = t.trim_ascii();
        t.strip_prefix(b"W/").unwrap_or(t).to_vec()
    };
    let ours = strip(etag);
    list.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        t == b"*" || strip(t) == ours
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_matching() {
        assert!(etag_list_matches(b"\"abc\"", b"\"abc\""));
        assert!(etag_list_matches(b"W/\"abc\"", b"\"abc\""));
        assert!(etag_list_matches(b"\"x\", \"abc\"", b"\"abc\""));
        assert!(etag_list_matches(b"*", b"\"abc\""));
        assert!(!etag_list_matches(b"\"abd\"", b"\"abc\""));
    }

    #[test]
    fn strong_etag_is_stable_and_quoted() {
        let a = strong_etag(b"hello");
        assert_eq!(a, strong_etag(b"hello"));
        assert_ne!(a, strong_etag(b"hello!"));
        assert_eq!(a.len(), 34);
        assert!(a.to_str().unwrap().starts_with('"'));
    }
}
