//! A stored answer and how it is rendered to a client.
//!
//! An entry keeps its body once, gzip-compressed when that is smaller (SPEC 14), and is sent in
//! one of two *forms*: gzip (the stored bytes, `Content-Encoding: gzip`) or identity. The
//! identity form of a gzip entry needs the decompressed body: it is made when a client first
//! asks for it (with the entry, when that is the fetching client's form), as a copy of the entry
//! whose one buffer also holds the identity body and its ETag ([`Entry::with_identity_copy`]),
//! which replaces it in the store and is weighed against `--cache-max-bytes`: identity hits
//! never decompress, and the copy costs no allocation or bookkeeping of its own.
//!
//! Everything a hit needs is computed when a form is built (strong ETag, `Last-Modified`, the
//! filtered header block), so a hit clones a header map, overwrites three per-request values
//! in the slots the block starts with and shares the body `Bytes`: no JSON parsing, no hashing,
//! no body copy, no compression.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use tokio::time::Instant;

use super::coding::{self, Coding};
use super::decimal::Decimal;
use super::head::{self, Shape};

/// A positive (stored 200) or negative (remembered 404 / non-token 401) answer.
///
/// Held compactly (issue 15): one allocation `buf` holds the stored body, the per-entry header
/// values ([`head`]), what only revalidation reads (upstream validators, `updated_at`) and,
/// once made, the identity copy of a gzip body; the header names and static values are the
/// interned [`Shape`].
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// How `buf`'s body is kept: gzip of the identity bytes when that was smaller
    /// ([`Coding::Gzip`]), the identity bytes otherwise.
    pub coding: Coding,
    /// Set when the store replaces this entry by its own copy with the identity form
    /// ([`super::Store::with_identity_copy`]): that replacement is not an eviction.
    pub(crate) superseded: AtomicBool,
    /// Length of the identity body (what a gzip body decompresses to).
    pub identity_len: u32,
    /// `buf[..body_len]` is the stored body; `buf[body_len..cold_at]` the per-entry header
    /// values, the stored form's ETag first (positive entries); `buf[cold_at..identity_at]`
    /// the upstream `ETag`, `Last-Modified` and `updated_at` text; `buf[identity_at..]` the
    /// identity copy of a gzip body (`identity_len` bytes, then its ETag), if made (0: not).
    body_len: u32,
    cold_at: u32,
    identity_at: u32,
    /// Bytes counted against `--cache-max-bytes` (see [`Entry::weight`]).
    weight: u32,
    /// How long moka may keep it (freshness + stale windows, or the negative TTL), in
    /// milliseconds, at most ~49 days ([`Entry::lifetime`]).
    lifetime_ms: u32,
    buf: Bytes,
    shape: Arc<Shape>,
    /// This entry's number, unique in the process: an entry never changes once made, so the
    /// number names its header values wherever a thread keeps them rendered ([`super::memo`]).
    serial: u64,
    /// Unix seconds of `Last-Modified` (from `updated_at` whole seconds), for
    /// `If-Modified-Since`; `u64::MAX` for none (`http_date` refuses it anyway).
    last_modified: u64,
    pub stored_at: Instant,
    /// Generations at fetch start (see [`crate::invalidation`]).
    pub stamp: crate::invalidation::Stamp,
    /// Set when revalidating this entry failed: for a short while it is served stale without
    /// asking the upstream again (see [`FailureMark`]).
    pub failure: FailureMark,
    /// Hits while fresh, for refresh-ahead (see [`Heat`]).
    pub heat: Heat,
}

/// What [`super::rules`] assembles an entry from.
pub(crate) struct Parts {
    pub status: StatusCode,
    pub coding: Coding,
    pub identity_len: usize,
    /// The stored body, then the values region, then the cold region, then the identity copy
    /// if any (see [`Entry`]).
    pub buf: Bytes,
    pub body_len: usize,
    pub cold_at: usize,
    /// Where the identity copy starts in `buf`, if it holds one.
    pub identity_at: Option<usize>,
    pub shape: Arc<Shape>,
    /// The shape is not interned: its heap is this entry's.
    pub private_shape: bool,
    pub last_modified_secs: Option<u64>,
    pub stored_at: Instant,
    pub stamp: crate::invalidation::Stamp,
    pub lifetime: Duration,
}

/// One form of an entry as it is sent: where its body and ETag are in the entry's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Form<'a> {
    pub coding: Coding,
    entry: &'a Entry,
    body_at: usize,
    body_len: usize,
    etag: FormEtag,
    /// The form's values in the per-thread memo ([`super::memo`]): the entry's serial and which
    /// form this is.
    memo_key: u64,
}

/// Where a form's ETag is. The stored form's is found by reading the entry's values region,
/// which a hit whose values come from the memo otherwise never touches: only when asked.
#[derive(Debug, Clone, Copy)]
enum FormEtag {
    None,
    Stored,
    At(usize, usize),
}

/// The forms of one entry, as memo keys (see [`Form::memo_key`]).
const MEMO_STORED: u64 = 0;
const MEMO_IDENTITY_COPY: u64 = 1;
const MEMO_IDENTITY_BODILESS: u64 = 2;

impl Form<'_> {
    /// The body this form sends.
    pub fn body(&self) -> Bytes {
        self.entry
            .buf
            .slice(self.body_at..self.body_at + self.body_len)
    }

    pub fn body_len(&self) -> usize {
        self.body_len
    }

    fn has_etag(&self) -> bool {
        !matches!(self.etag, FormEtag::None)
    }

    fn etag_range(&self) -> Option<std::ops::Range<usize>> {
        match self.etag {
            FormEtag::None => None,
            FormEtag::Stored => self.entry.stored_etag().map(|(a, b)| a..b),
            FormEtag::At(a, b) => Some(a..b),
        }
    }

    /// The form's strong ETag text (positive entries only).
    pub fn etag_bytes(&self) -> Option<&[u8]> {
        self.etag_range().map(|r| &self.entry.buf[r])
    }

    /// The form's strong ETag (positive entries only).
    pub fn etag(&self) -> Option<HeaderValue> {
        HeaderValue::from_maybe_shared(self.entry.buf.slice(self.etag_range()?)).ok()
    }
}

/// A number no other entry of this process has (see [`Entry::serial`]).
fn next_serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The memo key of a stored form no entry has, for tests that render a form's text without
/// an entry.
#[cfg(test)]
pub(crate) fn unused_memo_key() -> u64 {
    next_serial() << 2 | MEMO_STORED
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
    /// Milliseconds after `stored_at` until which the entry is not revalidated; 0 = none
    /// (saturating: an entry ~49 days old is past any backoff).
    until_ms: std::sync::atomic::AtomicU32,
    /// The `fwd-status` of that failure.
    status: std::sync::atomic::AtomicU16,
    /// The breaker's recovery count when it failed (its low 32 bits): a recovery since ends
    /// the backoff.
    recoveries: std::sync::atomic::AtomicU32,
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

impl FailureMark {
    /// The same mark, for a copy of its entry.
    fn copy(&self) -> FailureMark {
        use std::sync::atomic::Ordering::Relaxed;
        FailureMark {
            until_ms: self.until_ms.load(Relaxed).into(),
            status: self.status.load(Relaxed).into(),
            recoveries: self.recoveries.load(Relaxed).into(),
        }
    }
}

impl Heat {
    /// The same heat, for a copy of its entry.
    fn copy(&self) -> Heat {
        use std::sync::atomic::Ordering::Relaxed;
        Heat {
            hits: self.hits.load(Relaxed).into(),
            tried: self.tried.load(Relaxed).into(),
        }
    }

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
    pub(crate) fn assemble(p: Parts) -> Entry {
        let private = if p.private_shape { p.shape.weight } else { 0 };
        let weight = p.buf.len() + ENTRY_OVERHEAD + private;
        Entry {
            status: p.status,
            coding: p.coding,
            superseded: AtomicBool::new(false),
            identity_len: u32::try_from(p.identity_len).unwrap_or(u32::MAX),
            body_len: u32::try_from(p.body_len).unwrap_or(u32::MAX),
            cold_at: u32::try_from(p.cold_at).unwrap_or(u32::MAX),
            identity_at: p.identity_at.map_or(0, |at| u32::try_from(at).unwrap_or(0)),
            weight: u32::try_from(weight).unwrap_or(u32::MAX),
            lifetime_ms: u32::try_from(p.lifetime.as_millis()).unwrap_or(u32::MAX),
            buf: p.buf,
            shape: p.shape,
            serial: next_serial(),
            last_modified: p.last_modified_secs.unwrap_or(u64::MAX),
            stored_at: p.stored_at,
            stamp: p.stamp,
            failure: FailureMark::default(),
            heat: Heat::default(),
        }
    }

    pub fn is_negative(&self) -> bool {
        self.status != StatusCode::OK
    }

    /// How long moka may keep it (freshness + stale windows, or the negative TTL).
    pub fn lifetime(&self) -> Duration {
        Duration::from_millis(u64::from(self.lifetime_ms))
    }

    /// Unix seconds of `Last-Modified`, if it has one.
    pub fn last_modified_secs(&self) -> Option<u64> {
        (self.last_modified != u64::MAX).then_some(self.last_modified)
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored_at)
    }

    /// Bytes counted against `--cache-max-bytes`: the entry's buffer (the identity copy
    /// included, once made), a shape of its own, and the fixed bookkeeping
    /// ([`ENTRY_OVERHEAD`]).
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The stored body (gzip when [`Entry::coding`] says so).
    pub fn stored_body(&self) -> Bytes {
        self.buf.slice(..self.body_len as usize)
    }

    /// The interned shape.
    pub(crate) fn shape(&self) -> &Arc<Shape> {
        &self.shape
    }

    /// The values region less the stored form's ETag (positive entries).
    pub(crate) fn values(&self) -> &[u8] {
        &self.buf[self.values_range()]
    }

    fn values_range(&self) -> std::ops::Range<usize> {
        let end = self.cold_at as usize;
        match self.stored_etag() {
            Some((_, etag_end)) => etag_end..end,
            None => self.body_len as usize..end,
        }
    }

    /// Where the stored form's ETag is in `buf` (positive entries): the first value.
    fn stored_etag(&self) -> Option<(usize, usize)> {
        if self.is_negative() {
            return None;
        }
        let mut at = self.body_len as usize;
        head::next_value(&self.buf[..self.cold_at as usize], &mut at).map(|r| (r.start, r.end))
    }

    /// The end of the cold region: the identity copy, if any, follows it.
    fn cold_end(&self) -> usize {
        match self.identity_at {
            0 => self.buf.len(),
            at => at as usize,
        }
    }

    /// The cold fields: upstream ETag, upstream Last-Modified, `updated_at` text (empty:
    /// absent).
    fn cold(&self) -> [&[u8]; 3] {
        let cold = &self.buf[self.cold_at as usize..self.cold_end()];
        let mut at = 0;
        let mut next = || head::next_value(cold, &mut at).map_or(&[][..], |r| &cold[r]);
        [next(), next(), next()]
    }

    /// The first 128 bits of the stored body's SHA-256 (positive entries; for a gzip entry, of
    /// the gzip bytes, a deterministic function of the identity bytes): both forms' strong ETags
    /// derive from it, and a revalidation compares it instead of the bytes. Read back from the
    /// stored form's ETag, which spells it in hex.
    pub fn digest(&self) -> Option<[u8; 16]> {
        let (start, end) = self.stored_etag()?;
        hex_digest(self.buf.get(start + 1..end.min(start + 33))?)
    }

    /// The upstream's validators, replayed on revalidation.
    pub fn upstream_etag(&self) -> Option<HeaderValue> {
        self.cold_value(0)
    }

    pub fn upstream_last_modified(&self) -> Option<HeaderValue> {
        self.cold_value(1)
    }

    fn cold_value(&self, i: usize) -> Option<HeaderValue> {
        let v = self.cold()[i];
        (!v.is_empty())
            // Only the ETag (field 0) is ever packed; no header value starts with a zero byte.
            .then(|| HeaderValue::from_bytes(&super::rules::unpack_etag(v)).ok())
            .flatten()
    }

    /// `updated_at` of the stored body, if it had one.
    pub fn updated_at(&self) -> Option<Decimal> {
        self.updated_at_text()
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(Decimal::parse)
    }

    /// The JSON text of `updated_at`, if the body had one.
    pub(crate) fn updated_at_text(&self) -> Option<&[u8]> {
        let text = self.cold()[2];
        (!text.is_empty()).then_some(text)
    }

    /// The identity body of a gzip entry, if its identity copy is made.
    pub(crate) fn identity_copy(&self) -> Option<&[u8]> {
        let at = self.identity_at as usize;
        (at != 0).then(|| &self.buf[at..at + self.identity_len as usize])
    }

    /// Whether sending the form for a client that prefers gzip (`gzip`) or not needs the
    /// identity copy, not made yet ([`Entry::with_identity_copy`]).
    pub fn lacks_form(&self, gzip: bool) -> bool {
        !gzip && self.coding == Coding::Gzip && self.identity_at == 0
    }

    /// The form for a client that prefers gzip (`gzip`) or not. A client preferring gzip gets
    /// identity when the body did not compress. The identity form of a gzip entry needs its
    /// identity copy ([`Entry::lacks_form`]); without one (decompression failed, which cannot
    /// happen for bytes this cache compressed) it is the gzip form, which says so.
    pub fn form(&self, gzip: bool) -> Form<'_> {
        let stored = Form {
            coding: self.coding,
            entry: self,
            body_at: 0,
            body_len: self.body_len as usize,
            // Positive entries have one: their values region starts with it.
            etag: if self.is_negative() {
                FormEtag::None
            } else {
                FormEtag::Stored
            },
            memo_key: self.memo_key(MEMO_STORED),
        };
        if gzip || self.coding == Coding::Identity || self.identity_at == 0 {
            return stored;
        }
        let at = self.identity_at as usize;
        let len = self.identity_len as usize;
        let etag_at = at + len;
        Form {
            coding: Coding::Identity,
            entry: self,
            body_at: at,
            body_len: len,
            etag: if self.buf.len() > etag_at {
                FormEtag::At(etag_at, self.buf.len())
            } else {
                FormEtag::None
            },
            memo_key: self.memo_key(MEMO_IDENTITY_COPY),
        }
    }

    fn memo_key(&self, form: u64) -> u64 {
        self.serial << 2 | form
    }

    /// A copy of this gzip entry whose buffer also holds the identity body and its strong ETag,
    /// for the store to put in its place ([`super::Store::with_identity_copy`]). `None` when it
    /// has one already, is not gzip, or (cannot happen for bytes this cache compressed) does
    /// not decompress to its identity length.
    pub fn with_identity_copy(&self) -> Option<Entry> {
        if self.coding != Coding::Gzip || self.identity_at != 0 {
            return None;
        }
        let len = self.identity_len as usize;
        let mut buf = Vec::with_capacity(self.buf.len() + len + IDENTITY_ETAG_LEN);
        buf.extend_from_slice(&self.buf);
        let at = buf.len();
        if !coding::gunzip_into(&self.buf[..self.body_len as usize], len, &mut buf) {
            tracing::error!("stored gzip body does not decompress to its length");
            return None;
        }
        if let Some(digest) = self.digest() {
            buf.extend_from_slice(&etag_text(&digest, Coding::Identity));
        }
        // The copy replaces this entry in moka, which then holds a second copy of the key.
        let grown = buf.len() - self.buf.len() + MOKA_PER_UPDATE;
        Some(Entry {
            status: self.status,
            coding: self.coding,
            superseded: AtomicBool::new(false),
            identity_len: self.identity_len,
            body_len: self.body_len,
            cold_at: self.cold_at,
            identity_at: u32::try_from(at).ok()?,
            weight: self
                .weight
                .saturating_add(u32::try_from(grown).unwrap_or(u32::MAX)),
            lifetime_ms: self.lifetime_ms,
            buf: Bytes::from(buf),
            shape: self.shape.clone(),
            serial: next_serial(),
            last_modified: self.last_modified,
            stored_at: self.stored_at,
            stamp: self.stamp.clone(),
            failure: self.failure.copy(),
            heat: self.heat.copy(),
        })
    }

    /// Whether this entry is `other` with its identity copy made ([`Entry::with_identity_copy`]).
    pub fn is_identity_copy_of(&self, other: &Entry) -> bool {
        self.identity_at != 0
            && self.stored_at == other.stored_at
            && self.buf[..self.cold_at as usize] == other.buf[..other.cold_at as usize]
    }

    /// The identity body (decompressed here if the entry has no identity copy; tests and
    /// diagnostics).
    pub fn identity_body(&self) -> Bytes {
        if !self.lacks_form(false) {
            return self.form(false).body();
        }
        coding::gunzip(
            &self.buf[..self.body_len as usize],
            self.identity_len as usize,
        )
        .unwrap_or_default()
    }

    /// Takes the "replaced by its identity copy" mark (see [`Entry::superseded`]).
    pub(crate) fn take_superseded(&self) -> bool {
        self.superseded.swap(false, Ordering::Relaxed)
    }

    /// Remembers that revalidating this entry failed with `fwd_status` at `now`; it is not
    /// revalidated again for `backoff`.
    pub fn note_failure(&self, now: Instant, fwd_status: u16, backoff: Duration, recoveries: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let until = self.age(now) + backoff;
        self.failure.status.store(fwd_status, Relaxed);
        self.failure.recoveries.store(recoveries as u32, Relaxed);
        self.failure.until_ms.store(
            u32::try_from(until.as_millis()).unwrap_or(u32::MAX),
            Relaxed,
        );
    }

    /// The `fwd-status` of a revalidation failure still within its backoff, if any. The
    /// backoff ends early once the circuit breaker has recovered (`recoveries` moved on).
    pub fn recent_failure(&self, now: Instant, recoveries: u64) -> Option<u16> {
        use std::sync::atomic::Ordering::Relaxed;
        let until = self.failure.until_ms.load(Relaxed);
        (until > 0
            && self.age(now).as_millis() < u128::from(until)
            && self.failure.recoveries.load(Relaxed) == recoveries as u32)
            .then(|| self.failure.status.load(Relaxed))
    }

    /// Whether the client's conditional headers make `form` a 304 (RFC 9110 §13.1.2,
    /// §13.1.3): `If-None-Match` (weak comparison, against this form's own ETag) takes
    /// precedence over `If-Modified-Since`.
    pub fn not_modified_for(&self, form: Form<'_>, req: &HeaderMap) -> bool {
        self.not_modified_by(form.etag_bytes(), req)
    }

    /// [`Entry::not_modified_for`] a form whose ETag is `etag`.
    fn not_modified_by(&self, etag: Option<&[u8]>, req: &HeaderMap) -> bool {
        if self.is_negative() {
            return false;
        }
        // One list however many lines carry it (RFC 9110 §5.3).
        let mut inm = req.get_all(header::IF_NONE_MATCH).iter().peekable();
        if inm.peek().is_some() {
            let Some(etag) = etag else {
                return false;
            };
            return inm.any(|line| etag_list_matches(line.as_bytes(), etag));
        }
        if let (Some(ims), Some(lm)) = (
            req.get(header::IF_MODIFIED_SINCE),
            self.last_modified_secs(),
        ) && let Some(ims) = ims
            .to_str()
            .ok()
            .and_then(|s| httpdate::parse_http_date(s).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        {
            return ims.as_secs() >= lm;
        }
        false
    }

    /// The header map of `form`: the render slots first (their placeholders unless given),
    /// then the entry's headers.
    pub fn form_headers(&self, form: Form<'_>, render: [Option<HeaderValue>; 3]) -> HeaderMap {
        let text = head::FormText {
            buf: &self.buf,
            memo_key: form.memo_key,
            has_etag: form.has_etag(),
            ranges: &|| (form.etag_range(), self.values_range()),
        };
        self.shape.render(form.coding, text, render)
    }

    /// The identity form of a gzip entry whose identity copy is not made, for an answer without
    /// a body: a HEAD (`Content-Length` the identity length) or a 304 (`If-None-Match` against
    /// the identity ETag, which derives from the digest). Neither needs the identity body, so
    /// neither makes the copy: it is for identity clients that read the body. `None` when the
    /// answer needs the body (or the entry has no digest).
    pub fn render_identity_bodiless(
        &self,
        req: &HeaderMap,
        now: Instant,
        cache_status: &HeaderValue,
        head: bool,
    ) -> Option<Response<Option<Bytes>>> {
        let etag = etag_text(&self.digest()?, Coding::Identity);
        let not_modified = self.not_modified_by(Some(&etag), req);
        if !head && !not_modified {
            return None;
        }
        let etag = HeaderValue::from_bytes(&etag).ok()?;
        // Never sends a body: only its coding and length are used.
        let form = Form {
            coding: Coding::Identity,
            entry: self,
            body_at: 0,
            body_len: self.identity_len as usize,
            etag: FormEtag::None,
            memo_key: self.memo_key(MEMO_IDENTITY_BODILESS),
        };
        let mut r = self.render(form, now, cache_status.clone(), true, not_modified);
        r.headers_mut().insert(header::ETAG, etag);
        Some(r)
    }

    /// Renders `form` of the entry. `head` drops the body; `not_modified` renders a 304.
    /// `X-Cache` is left to the caller, which stamps it on every answer (`proxy::finish`), into
    /// the block's slot. The body is `None` for a HEAD or a 304 and the form's shared bytes
    /// otherwise: the cache knows no body type, the caller moves it into its own.
    pub fn render(
        &self,
        form: Form<'_>,
        now: Instant,
        cache_status: HeaderValue,
        head: bool,
        not_modified: bool,
    ) -> Response<Option<Bytes>> {
        let age = small_number(self.age(now).as_secs());
        let headers = self.form_headers(form, [None, Some(age), Some(cache_status)]);
        if not_modified {
            let mut r = Response::new(None);
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            let h = r.headers_mut();
            // RFC 9110 §15.4.5: the validator and caching headers, no representation metadata
            // (Age and Cache-Status too; X-Cache is stamped on every answer by the caller).
            for name in [
                header::AGE,
                CACHE_STATUS.clone(),
                header::CACHE_CONTROL,
                header::VARY,
                header::ETAG,
                header::LAST_MODIFIED,
            ] {
                for v in headers.get_all(&name) {
                    h.append(name.clone(), v.clone());
                }
            }
            return r;
        }
        let (body, content_length) = if head {
            // hyper derives Content-Length from the body; a HEAD answer has none, so the GET
            // body's length is stated here.
            (None, Some(HeaderValue::from(form.body_len)))
        } else {
            (Some(form.body()), None)
        };
        let mut r = Response::new(body);
        *r.status_mut() = self.status;
        *r.headers_mut() = headers;
        if let Some(len) = content_length {
            r.headers_mut().insert(header::CONTENT_LENGTH, len);
        }
        r
    }
}

/// Sets X-Cache, Age and Cache-Status (each when given) and says whether it could do so by
/// position. A map rendered from a [`Shape`] starts with a slot for each, in that order
/// (`head::RENDER_SLOTS`): those are overwritten without hashing a name. Any other map (a 304,
/// a local error, a forwarded response) gets ordinary inserts, which replace every earlier
/// value of the name.
pub fn set_render_slots(
    headers: &mut HeaderMap,
    xcache: Option<HeaderValue>,
    age: Option<HeaderValue>,
    cache_status: Option<HeaderValue>,
) -> bool {
    if let (Some(xcache), None, None) = (&xcache, &age, &cache_status) {
        // Only X-Cache (every answer, `proxy::finish`): its slot leads a rendered entry's map,
        // so one or two steps decide, instead of checking the whole slot layout.
        let mut items = headers.iter_mut();
        if let Some((n0, v0)) = items.next()
            && *n0 == X_CACHE
            && items.next().is_none_or(|(n1, _)| *n1 != X_CACHE)
        {
            *v0 = xcache.clone();
            return true;
        }
        headers.insert(X_CACHE.clone(), xcache.clone());
        return false;
    }
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

/// Fixed per-entry bookkeeping counted in the weight besides the entry's buffer: the
/// `Arc<Entry>` allocation (the struct and the two reference counts), the shared-buffer header
/// `bytes` allocates for the buffer once a hit shares it ([`BYTES_SHARED`]), and moka's
/// per-entry cost (its node with the key, deque and timer-wheel links, hash-table slot, share
/// of table growth and of the frequency sketch: ~300 bytes, measured on its own by
/// `moka_bookkeeping_per_entry` in tests/memory.rs).
///
/// tests/memory.rs checks it with a counting global allocator: the real heap per entry beyond
/// the bodies must stay within 768 B (issue 15) and within 1.25 x what the weight says. Not
/// included: malloc's own per-allocation overhead (~10 allocations per entry with moka's,
/// ~16 B each for glibc).
pub const ENTRY_OVERHEAD: usize = size_of::<Entry>() + 16 + BYTES_SHARED + MOKA_PER_ENTRY;

/// moka's own heap per entry (see [`ENTRY_OVERHEAD`]), rounded up.
pub const MOKA_PER_ENTRY: usize = 300;

/// What moka holds more for an entry it updated in place (an entry replaced by its identity
/// copy, [`Entry::with_identity_copy`]): the new hash-table bucket has its own `Arc` of the
/// key, and the entry's bookkeeping keeps the first one (tests/memory.rs measures it).
pub const MOKA_PER_UPDATE: usize = size_of::<super::CacheKey>() + 16;

/// The header `bytes` allocates for a buffer the first time a `Bytes` of it is cloned.
pub const BYTES_SHARED: usize = 24;

/// Length of an identity form's strong ETag (quotes and 32 hex digits).
const IDENTITY_ETAG_LEN: usize = 34;

/// The heap of a stored header map holding `values` values, as `rules` builds it (exact-size
/// entries, see `head::Shape`): one slot per value (http's private
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

/// The 16 bytes 32 lowercase hex digits spell, if they are that.
pub(crate) fn hex_digest(hex: &[u8]) -> Option<[u8; 16]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

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
