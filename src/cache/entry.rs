//! A stored answer and how it is rendered to a client.
//!
//! An entry keeps its body once, gzip-compressed when that is smaller (SPEC 14), and is sent in
//! one of two *forms*: gzip (the stored bytes, `Content-Encoding: gzip`) or identity. Each form
//! is a header block and a body, built when a client first asks for it (the fetching client's
//! form is built with the entry) and then kept, weighed against `--cache-max-bytes`: an identity
//! form of a gzip entry holds the decompressed body, so identity hits never decompress.
//!
//! Everything a hit needs is computed when a form is built (strong ETag, `Last-Modified`, the
//! filtered header block), so a hit clones a header map, overwrites three per-request values
//! in the slots the block starts with and shares the body `Bytes`: no JSON parsing, no hashing,
//! no body copy, no compression.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use tokio::time::Instant;

use super::coding::{self, Coding};
use super::decimal::Decimal;
use crate::body::ResponseBody;

/// A positive (stored 200) or negative (remembered 404 / non-token 401) answer.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// The body as kept: gzip of the identity bytes when that was smaller ([`Coding::Gzip`]),
    /// the identity bytes otherwise.
    pub body: Bytes,
    pub coding: Coding,
    /// Length of the identity body (what a gzip `body` decompresses to).
    pub identity_len: usize,
    /// The first 128 bits of the identity body's SHA-256 (positive entries): both forms' strong
    /// ETags derive from it, and a revalidation compares it instead of the bytes.
    pub digest: Option<[u8; 16]>,
    /// The forms built so far (see the module doc); at least one is always set.
    pub(crate) gzip: OnceLock<Form>,
    pub(crate) identity: OnceLock<Form>,
    /// Unix seconds of the forms' `Last-Modified` (from `updated_at` whole seconds), for
    /// `If-Modified-Since`.
    pub last_modified_secs: Option<u64>,
    pub updated_at: Option<Decimal>,
    /// Validators the upstream gave, replayed on revalidation. Like every value in a form's
    /// headers they are slices of an exact-size copy owned by the entry (see
    /// [`super::rules`]), never of the upstream connection's read buffer.
    pub upstream_etag: Option<HeaderValue>,
    pub upstream_last_modified: Option<HeaderValue>,
    pub stored_at: Instant,
    /// Generations at fetch start (see [`crate::invalidation`]).
    pub stamp: crate::invalidation::Stamp,
    /// How long moka may keep it (freshness + stale windows, or the negative TTL).
    pub lifetime: Duration,
    /// Bytes counted against `--cache-max-bytes` besides the forms' own (see [`Entry::weight`]).
    pub(crate) base_weight: u32,
    /// Set when revalidating this entry failed: for a short while it is served stale without
    /// asking the upstream again (see [`FailureMark`]).
    pub failure: FailureMark,
    /// Hits while fresh, for refresh-ahead (see [`Heat`]).
    pub heat: Heat,
    /// Set while the store re-inserts this very entry to re-weigh it after a form was added
    /// ([`super::Store::recharge`]): that replacement is not an eviction.
    pub(crate) recharging: AtomicBool,
}

/// One form of an entry as it is sent: its header block (render slots first, see
/// `rules::RENDER_SLOTS`) and its body.
#[derive(Debug, Clone)]
pub struct Form {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Bytes this form adds to the entry's weight: the header block, and the body unless it is
    /// the entry's stored body.
    pub(crate) weight: u32,
}

impl Form {
    /// The form's strong ETag (positive entries only).
    pub fn etag(&self) -> Option<&HeaderValue> {
        self.headers.get(header::ETAG)
    }
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

/// How hot an entry is, for refresh-ahead (SPEC 12): its hits while fresh, and whether its
/// refresh-ahead was tried. A hit's whole cost (the hit path is kept lean): one atomic load,
/// plus an increment until the entry is hot — the count stops at the threshold, so a hot
/// entry's counter is only read, never bounced between cores.
#[derive(Debug, Default)]
pub struct Heat {
    hits: std::sync::atomic::AtomicU32,
    tried: std::sync::atomic::AtomicBool,
}

impl Heat {
    /// Counts one fresh hit. True for exactly one hit: the first that finds the entry hot (at
    /// least `min_hits`, this one included) while `due` (its age past F × ttl).
    #[inline]
    pub fn hit(&self, min_hits: u32, due: bool) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let mut hits = self.hits.load(Relaxed);
        if hits < min_hits {
            hits = self.hits.fetch_add(1, Relaxed).saturating_add(1);
        }
        due && hits >= min_hits && !self.tried.load(Relaxed) && !self.tried.swap(true, Relaxed)
    }
}

impl Entry {
    pub fn is_negative(&self) -> bool {
        self.status != StatusCode::OK
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored_at)
    }

    /// Bytes counted against `--cache-max-bytes`: the stored body and bookkeeping, plus every
    /// form built so far.
    pub fn weight(&self) -> u32 {
        let forms = [&self.gzip, &self.identity]
            .into_iter()
            .filter_map(OnceLock::get)
            .map(|f| f.weight);
        forms.fold(self.base_weight, u32::saturating_add)
    }

    /// The form for a client that prefers gzip (`gzip`) or not, and whether it was built by
    /// this call (the entry then weighs more: the caller has the store re-weigh it). A client
    /// preferring gzip gets identity when the body did not compress.
    pub fn form(&self, gzip: bool) -> (&Form, bool) {
        let want = if gzip && self.coding == Coding::Gzip {
            Coding::Gzip
        } else {
            Coding::Identity
        };
        let slot = self.slot(want);
        if let Some(form) = slot.get() {
            return (form, false);
        }
        match self.build_form(want) {
            Some(built) => {
                // Two threads may build it at once: only the one whose form is kept re-weighs.
                let mut kept = false;
                let form = slot.get_or_init(|| {
                    kept = true;
                    built
                });
                (form, kept)
            }
            // Cannot happen for bytes we compressed ourselves; the other form is at least
            // labelled for what it is.
            None => match self.slot(other(want)).get() {
                Some(form) => (form, false),
                None => (slot.get_or_init(|| self.fallback_form()), true),
            },
        }
    }

    fn slot(&self, coding: Coding) -> &OnceLock<Form> {
        match coding {
            Coding::Gzip => &self.gzip,
            Coding::Identity => &self.identity,
        }
    }

    /// Builds form `want` from the form the entry already has.
    fn build_form(&self, want: Coding) -> Option<Form> {
        let from = self.slot(other(want)).get()?;
        let body = match want {
            Coding::Gzip => self.body.clone(),
            Coding::Identity if self.coding == Coding::Gzip => {
                coding::gunzip(&self.body, self.identity_len)?
            }
            Coding::Identity => self.body.clone(),
        };
        Some(super::rules::convert_form(
            from,
            want,
            self.digest.as_ref(),
            body,
            &self.body,
        ))
    }

    /// A form of nothing but the stored block's slots (never expected: see [`Entry::form`]).
    fn fallback_form(&self) -> Form {
        super::rules::convert_form(
            &Form {
                headers: HeaderMap::new(),
                body: Bytes::new(),
                weight: 0,
            },
            self.coding,
            self.digest.as_ref(),
            self.body.clone(),
            &self.body,
        )
    }

    /// The identity body (building the identity form if needed; tests and the shared tier).
    pub fn identity_body(&self) -> Bytes {
        self.form(false).0.body.clone()
    }

    /// Takes the "being re-weighed" mark (see [`Entry::recharging`]).
    pub(crate) fn take_recharging(&self) -> bool {
        self.recharging.swap(false, Ordering::Relaxed)
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

    /// Bytes a header block weighs: names and values and the map's own slots
    /// ([`header_map_bytes`]).
    pub fn header_block_weight(headers: &HeaderMap) -> usize {
        let header_text: usize = headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        header_text + header_map_bytes(headers.len())
    }

    /// Whether the client's conditional headers make `form` a 304 (RFC 9110 §13.1.2,
    /// §13.1.3): `If-None-Match` (weak comparison, against this form's own ETag) takes
    /// precedence over `If-Modified-Since`.
    pub fn not_modified_for(&self, form: &Form, req: &HeaderMap) -> bool {
        if self.is_negative() {
            return false;
        }
        if let Some(inm) = req.get(header::IF_NONE_MATCH) {
            let Some(etag) = form.etag() else {
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

    /// Renders `form` of the entry. `head` drops the body; `not_modified` renders a 304.
    /// `X-Cache` is left to the caller, which stamps it on every answer (`proxy::finish`), into
    /// the stored block's slot.
    pub fn render(
        &self,
        form: &Form,
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
            for name in [
                header::CACHE_CONTROL,
                header::VARY,
                header::ETAG,
                header::LAST_MODIFIED,
            ] {
                for v in form.headers.get_all(&name) {
                    h.append(name.clone(), v.clone());
                }
            }
            r
        } else {
            let (body, content_length) = if head {
                // hyper derives Content-Length from the body; a HEAD answer has none, so the
                // GET body's length is stated here.
                (
                    ResponseBody::empty(),
                    Some(HeaderValue::from(form.body.len())),
                )
            } else {
                (ResponseBody::full(form.body.clone()), None)
            };
            let mut r = Response::new(body);
            *r.status_mut() = self.status;
            // The stored block has slots for X-Cache, Age and Cache-Status (see
            // `rules::RENDER_SLOTS`), overwritten below by position.
            *r.headers_mut() = form.headers.clone();
            if let Some(len) = content_length {
                r.headers_mut().insert(header::CONTENT_LENGTH, len);
            }
            r
        };
        // The form's block already holds ETag, Last-Modified, Vary and Content-Encoding.
        // `Content-Length` is not stored: hyper writes it from the body's exact size.
        let age = small_number(self.age(now).as_secs());
        let by_position = set_render_slots(resp.headers_mut(), None, Some(age), Some(cache_status));
        // Every stored block starts with the slots (`rules::build_map`); only the
        // freshly built 304 map has none.
        debug_assert!(
            by_position || not_modified,
            "stored block without render slots"
        );
        resp
    }
}

fn other(coding: Coding) -> Coding {
    match coding {
        Coding::Gzip => Coding::Identity,
        Coding::Identity => Coding::Gzip,
    }
}

/// Sets X-Cache, Age and Cache-Status (each when given) and says whether it could do so by
/// position. A block built by `rules::build_map` starts with a slot for each, in that order
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

/// Strong ETag of an identity body: the first 128 bits of its SHA-256, quoted.
pub fn strong_etag(body: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(&etag_text(&body_digest(body), Coding::Identity))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// The first 128 bits of the SHA-256 of an identity body.
pub fn body_digest(body: &[u8]) -> [u8; 16] {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let mut out = [0; 16];
    out.copy_from_slice(&digest.as_ref()[..16]);
    out
}

/// The strong ETag text of one form: the digest in hex, quoted, and `-gz` inside the quotes
/// for the gzip form. Each form has its own (RFC 9110 §8.8.3: a strong validator names one
/// sequence of bytes); the gzip bytes are a deterministic function of the identity bytes, so
/// deriving the gzip form's tag from the identity digest keeps it strong without hashing
/// the compressed bytes too.
pub fn etag_text(digest: &[u8; 16], coding: Coding) -> Vec<u8> {
    let mut out = Vec::with_capacity(37);
    out.push(b'"');
    for b in digest {
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 15) as usize]);
    }
    if coding == Coding::Gzip {
        out.extend_from_slice(b"-gz");
    }
    out.push(b'"');
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
