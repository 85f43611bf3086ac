//! What may be stored (SPEC §5) and how entries are built from upstream answers.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use tokio::time::Instant;

use super::CachePolicy;
use super::coding::{self, Coding};
use super::decimal::Decimal;
use super::entry::{Entry, Parts, body_digest, etag_text, hex_digest};
use super::head::{self, Field};
use super::json;
use crate::invalidation::Stamp;

/// What the storage check learned from a body.
#[derive(Debug)]
pub struct Probe {
    pub updated_at: Option<Decimal>,
    /// `updated_at` as the JSON had it (kept with the entry; compared only on revalidation).
    pub updated_at_text: Option<Box<str>>,
}

/// SPEC §5 storage rule for a 200 body: a JSON object whose `id` is the conversation id and
/// whose `account_id`, when present, is the account id. One pass over the body that validates
/// it all and borrows `updated_at`'s text ([`json`](super::json): serde_json skipping the
/// values it ignores cost ~20% of a stored miss).
pub fn probe(body: &[u8], account: u64, conversation: u64) -> Option<Probe> {
    let f = json::top_fields(body)?;
    if f.id != Some(conversation) || f.account_id.is_some_and(|a| a != account) {
        return None;
    }
    Some(match f.updated_at {
        Some(raw) => Probe {
            updated_at: Some(Decimal::parse(raw)?),
            updated_at_text: Some(raw.into()),
        },
        None => Probe {
            updated_at: None,
            updated_at_text: None,
        },
    })
}

/// Whether a 401 body is Chatwoot's "the token itself is bad" answer.
pub fn is_invalid_token_body(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct E<'a> {
        #[serde(borrow)]
        error: Option<&'a str>,
    }
    serde_json::from_slice::<E<'_>>(body)
        .ok()
        .and_then(|e| e.error)
        .is_some_and(|e| e == "Invalid Access Token")
}

/// Response headers never stored or replayed: hop-by-hop, cookies, devise_token_auth's
/// rotating credentials, validators we replace with our own, and per-exchange framing.
fn never_stored(name: &HeaderName) -> bool {
    crate::hop_by_hop::is_hop_by_hop(name)
        || matches!(
            name.as_str(),
            "set-cookie"
                | "access-token"
                | "client"
                | "uid"
                | "expiry"
                | "token-type"
                | "authorization"
                | "etag"
                | "last-modified"
                | "age"
                | "content-length"
                | "x-cache"
                | "cache-status"
        )
}

/// The upstream headers an entry replays, in order, with a `Date` guaranteed and `Vary`
/// naming `Accept-Encoding` (SPEC 14: the answer depends on it). Values still borrow from
/// `upstream`. `Content-Length` is not stored: hyper writes it from the body.
fn replayed_fields(upstream: &HeaderMap) -> Vec<Field<'_>> {
    let mut fields: Vec<Field<'_>> = Vec::with_capacity(upstream.len() + 3);
    let mut has_date = false;
    let mut varies = false;
    for (name, value) in upstream {
        if !never_stored(name) {
            has_date |= name == header::DATE;
            if name == header::VARY {
                varies |= value.as_bytes().split(|&b| b == b',').any(|t| {
                    let t = t.trim_ascii();
                    t == b"*" || t.eq_ignore_ascii_case(b"accept-encoding")
                });
            }
            fields.push((head::shared_name(name), Cow::Borrowed(value.as_bytes())));
        }
    }
    if !has_date {
        let now = httpdate::fmt_http_date(std::time::SystemTime::now());
        fields.push((header::DATE, Cow::Owned(now.into_bytes())));
    }
    if !varies {
        fields.push((header::VARY, Cow::Borrowed(b"Accept-Encoding")));
    }
    fields
}

/// The identity header block an entry with these upstream headers replays (no ETag: that
/// is the body's), as the identity form's map (render slots first).
pub fn stored_headers(upstream: &HeaderMap) -> HeaderMap {
    let fields = replayed_fields(upstream);
    let entry = build(Build {
        status: StatusCode::OK,
        fields: &fields,
        stored: b"",
        coding: Coding::Identity,
        identity_len: 0,
        digest: None,
        cold: [b"", b"", b""],
        identity: None,
        last_modified_secs: None,
        stamp: &crate::invalidation::Generations::new().stamp(0, 0, crate::auth::Scope(0)),
        lifetime: std::time::Duration::ZERO,
        now: Instant::now(),
    });
    entry.form_headers(entry.form(false), [None, None, None])
}

/// The earliest time `httpdate` cannot format (10000-01-01T00:00:00Z): it panics for years
/// past 9999.
const HTTP_DATE_LIMIT_SECS: u64 = 253_402_300_800;

/// `Last-Modified` text for `updated_at` whole seconds, if representable. `updated_at` is
/// upstream data: a year past 9999 would panic in `httpdate`, and a huge value would
/// overflow `SystemTime` (a panic with `+`); such an entry is stored without
/// `Last-Modified`.
fn http_date(secs: u64) -> Option<String> {
    if secs >= HTTP_DATE_LIMIT_SECS {
        return None;
    }
    let t = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs))?;
    Some(httpdate::fmt_http_date(t))
}

/// Everything an entry is built from.
struct Build<'a> {
    status: StatusCode,
    /// The replayed headers (ours included: Date, Vary, Last-Modified), not the ETag.
    fields: &'a [Field<'a>],
    /// The body as kept.
    stored: &'a [u8],
    coding: Coding,
    identity_len: usize,
    /// Positive entries: the stored body's digest (the ETags derive from it).
    digest: Option<[u8; 16]>,
    /// Upstream ETag, upstream Last-Modified, `updated_at` text (empty: absent).
    cold: [&'a [u8]; 3],
    /// A gzip entry's identity body, when the entry is to hold its identity copy.
    identity: Option<&'a [u8]>,
    last_modified_secs: Option<u64>,
    stamp: &'a Stamp,
    lifetime: std::time::Duration,
    now: Instant,
}

/// Lays an entry out in one exact-size buffer: the stored body, the per-entry header values
/// (the stored form's ETag first), the cold fields, then a gzip entry's identity copy if it is
/// to have one (see [`Entry`]). Every header value is copied: hyper parses a response's
/// header values as slices of the connection's read buffer (~8 KiB), so keeping an upstream
/// `HeaderValue` would keep that whole buffer alive.
fn build(b: Build<'_>) -> Entry {
    let block = head::block(b.fields, b.digest.is_some());
    let packed = pack_etag(b.cold[0]);
    let cold = [
        packed.as_ref().map_or(b.cold[0], |p| &p[..]),
        b.cold[1],
        b.cold[2],
    ];
    let etag = b.digest.map(|d| etag_text(&d, b.coding));
    let values = || {
        etag.iter()
            .map(Vec::as_slice)
            .chain(block.values.iter().copied())
    };
    // The identity copy: the identity body and its ETag (a gzip entry's only).
    let identity = b
        .identity
        .filter(|_| b.coding == Coding::Gzip)
        .map(|body| (body, b.digest.map(|d| etag_text(&d, Coding::Identity))));
    let identity_len = identity.as_ref().map_or(0, |(body, etag)| {
        body.len() + etag.as_ref().map_or(0, Vec::len)
    });
    let len = b.stored.len() + head::values_len(values()) + head::values_len(cold) + identity_len;
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(b.stored);
    head::put_values(&mut buf, values());
    let cold_at = buf.len();
    head::put_values(&mut buf, cold);
    let identity_at = identity.map(|(body, etag)| {
        let at = buf.len();
        buf.extend_from_slice(body);
        buf.extend_from_slice(etag.as_deref().unwrap_or_default());
        at
    });
    debug_assert_eq!(buf.len(), len, "exact size");
    Entry::assemble(Parts {
        status: b.status,
        coding: b.coding,
        identity_len: b.identity_len,
        buf: Bytes::from(buf),
        body_len: b.stored.len(),
        cold_at,
        identity_at,
        shape: block.shape,
        private_shape: !block.interned,
        last_modified_secs: b.last_modified_secs,
        stored_at: b.now,
        stamp: b.stamp.clone(),
        lifetime: b.lifetime,
    })
}

/// Rails' weak ETag (`W/"` + 32 lowercase hex digits + `"`, 36 bytes), as the cold region keeps
/// it: a zero byte (never part of a header value) and the 16 bytes the digits spell.
fn pack_etag(etag: &[u8]) -> Option<[u8; 17]> {
    let hex = etag.strip_prefix(b"W/\"")?.strip_suffix(b"\"")?;
    let mut out = [0u8; 17];
    out[1..].copy_from_slice(&hex_digest(hex)?);
    Some(out)
}

/// The upstream ETag text of a cold-region value ([`pack_etag`] undone).
pub(crate) fn unpack_etag(stored: &[u8]) -> Cow<'_, [u8]> {
    match stored {
        [0, raw @ ..] if raw.len() == 16 => {
            let mut out = Vec::with_capacity(36);
            out.extend_from_slice(b"W/\"");
            for b in raw {
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 15)]);
            }
            out.push(b'"');
            Cow::Owned(out)
        }
        _ => Cow::Borrowed(stored),
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The positive entry's fields from upstream headers, with `Last-Modified` from `updated_at`;
/// and its whole seconds.
fn positive_fields<'a>(
    upstream: &'a HeaderMap,
    updated_at: Option<&Decimal>,
) -> (Vec<Field<'a>>, Option<u64>) {
    let mut fields = replayed_fields(upstream);
    // The body is identity (an encoded answer is not stored); each form says its own coding.
    fields.retain(|(n, _)| *n != header::CONTENT_ENCODING);
    let last_modified = updated_at
        .and_then(Decimal::whole_seconds)
        .and_then(|s| Some((s, http_date(s)?)));
    let secs = last_modified.map(|(secs, text)| {
        fields.push((header::LAST_MODIFIED, Cow::Owned(text.into_bytes())));
        secs
    });
    (fields, secs)
}

fn upstream_validators(upstream: &HeaderMap) -> [&[u8]; 2] {
    [header::ETAG, header::LAST_MODIFIED]
        .map(|n| upstream.get(n).map_or(&[][..], HeaderValue::as_bytes))
}

/// Builds a positive entry from a storable 200: the body kept gzip-compressed when that is
/// smaller (SPEC 14), its digest taken over the bytes kept, and for a fetching client that
/// prefers identity (`form`), the identity copy made at once from the bytes at hand.
pub fn positive_entry(
    upstream_headers: &HeaderMap,
    body: Bytes,
    probe: Probe,
    stamp: Stamp,
    policy: &CachePolicy,
    now: Instant,
    form: Coding,
) -> Entry {
    let (fields, last_modified_secs) = positive_fields(upstream_headers, probe.updated_at.as_ref());
    let [etag, lm] = upstream_validators(upstream_headers);
    let updated_at = probe.updated_at_text.as_deref().unwrap_or("").as_bytes();
    let at = |stored: &[u8], coding: Coding| {
        // The digest of the stored bytes: the gzip bytes are a deterministic function of the
        // identity bytes (one libdeflate build and level) and decompress to them, so they name them as
        // well as the identity bytes' own hash would, for a sixth of the hashing (SHA-256 of
        // the identity body was ~40% of a stored miss's instructions).
        let digest = body_digest(stored);
        let identity = (form == Coding::Identity).then_some(&body[..]);
        build(Build {
            status: StatusCode::OK,
            fields: &fields,
            stored,
            coding,
            identity_len: body.len(),
            digest: Some(digest),
            cold: [etag, lm, updated_at],
            identity,
            last_modified_secs,
            stamp: &stamp,
            lifetime: policy.positive_lifetime(),
            now,
        })
    };
    match coding::with_gzip(&body, |gz| at(gz, Coding::Gzip)) {
        Some(entry) => entry,
        None => at(&body, Coding::Identity),
    }
}

/// What the shared tier keeps of a positive entry (SPEC 11, 14): the headers as the upstream
/// sent them (the replayed ones plus the upstream `ETag`/`Last-Modified`; not this cache's
/// validators or `Content-Encoding`), the stored body (gzip when it compressed), and what a
/// replica needs to rebuild the entry without decompressing, hashing or parsing the body.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedImage {
    pub headers: HeaderMap,
    pub stored: Bytes,
    pub coding: Coding,
    pub identity_len: u32,
    pub digest: [u8; 16],
    pub updated_at: Bytes,
}

/// The shared tier's image of a positive entry ([`from_image`] rebuilds an equal entry).
pub fn image(entry: &Entry) -> Option<SharedImage> {
    let digest = entry.digest()?;
    let mut headers = HeaderMap::new();
    for (name, value) in entry.shape().fields(entry.values()) {
        if name != header::LAST_MODIFIED
            && let Ok(v) = HeaderValue::from_bytes(&value)
        {
            headers.append(name, v);
        }
    }
    if let Some(v) = entry.upstream_etag() {
        headers.insert(header::ETAG, v);
    }
    if let Some(v) = entry.upstream_last_modified() {
        headers.insert(header::LAST_MODIFIED, v);
    }
    Some(SharedImage {
        headers,
        stored: entry.stored_body(),
        coding: entry.coding,
        identity_len: entry.identity_len,
        digest,
        updated_at: Bytes::copy_from_slice(entry.updated_at_text().unwrap_or_default()),
    })
}

/// An entry from the shared tier's image, stored at `stored_at`: nothing is compressed,
/// hashed or parsed but `updated_at` (the image was checked by the replica that wrote it, and
/// is authenticated: `shared::codec`).
pub fn from_image(
    image: &SharedImage,
    stamp: Stamp,
    policy: &CachePolicy,
    stored_at: Instant,
) -> Option<Entry> {
    let updated_at = match &image.updated_at[..] {
        [] => None,
        text => Some(Decimal::parse(std::str::from_utf8(text).ok()?)?),
    };
    let (fields, last_modified_secs) = positive_fields(&image.headers, updated_at.as_ref());
    let [etag, lm] = upstream_validators(&image.headers);
    Some(build(Build {
        status: StatusCode::OK,
        fields: &fields,
        stored: &image.stored,
        coding: image.coding,
        identity_len: image.identity_len as usize,
        digest: Some(image.digest),
        cold: [etag, lm, &image.updated_at],
        identity: None,
        last_modified_secs,
        stamp: &stamp,
        lifetime: policy.positive_lifetime(),
        now: stored_at,
    }))
}

/// Builds a negative entry (404, or a 401 that is about this conversation, not the token).
/// Kept as it came: these bodies are a few bytes.
pub fn negative_entry(
    status: StatusCode,
    upstream_headers: &HeaderMap,
    body: Bytes,
    stamp: Stamp,
    policy: &CachePolicy,
    now: Instant,
) -> Entry {
    let fields = replayed_fields(upstream_headers);
    build(Build {
        status,
        fields: &fields,
        stored: &body,
        coding: Coding::Identity,
        identity_len: body.len(),
        digest: None,
        cold: [b"", b"", b""],
        identity: None,
        last_modified_secs: None,
        stamp: &stamp,
        lifetime: policy.negative_ttl,
        now,
    })
}

/// A copy of `prior` made fresh again (upstream said 304, or sent an older body). A 304's
/// `Date`, `Cache-Control`, `Expires` and `ETag` replace the stored ones (RFC 9111 §4.3.4),
/// copied into the new entry's own buffer, never kept as slices of the 304's read buffer. An
/// identity copy the prior had made is kept.
pub fn refreshed(
    prior: &Entry,
    not_modified: Option<&HeaderMap>,
    stamp: Stamp,
    now: Instant,
) -> Entry {
    let mut fields = prior.shape().fields(prior.values());
    let mut upstream_etag = prior.upstream_etag();
    if let Some(h) = not_modified {
        for name in [header::DATE, header::CACHE_CONTROL, header::EXPIRES] {
            if let Some(v) = h.get(&name) {
                // `insert` semantics: the 304's value replaces every stored one.
                fields.retain(|(n, _)| *n != name);
                fields.push((name, Cow::Borrowed(v.as_bytes())));
            }
        }
        if let Some(etag) = h.get(header::ETAG) {
            upstream_etag = Some(etag.clone());
        }
    }
    let lm = prior.upstream_last_modified();
    let stored = prior.stored_body();
    build(Build {
        status: prior.status,
        fields: &fields,
        stored: &stored,
        coding: prior.coding,
        identity_len: prior.identity_len as usize,
        digest: prior.digest(),
        cold: [
            upstream_etag
                .as_ref()
                .map_or(&[][..], HeaderValue::as_bytes),
            lm.as_ref().map_or(&[][..], HeaderValue::as_bytes),
            prior.updated_at_text().unwrap_or_default(),
        ],
        identity: prior.identity_copy(),
        last_modified_secs: prior.last_modified_secs(),
        stamp: &stamp,
        lifetime: prior.lifetime(),
        now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn stamp() -> Stamp {
        crate::invalidation::Generations::new().stamp(1, 42, crate::auth::Scope(7))
    }

    #[test]
    fn only_matching_objects_are_storable() {
        let ok = br#"{"meta":{"x":[1,2,{"id":9}]},"id":42,"account_id":1,"updated_at":1765182000.482917}"#;
        let p = probe(ok, 1, 42).unwrap();
        assert_eq!(p.updated_at, Decimal::parse("1765182000.482917"));
        assert!(probe(ok, 1, 43).is_none(), "id must match");
        assert!(
            probe(ok, 2, 42).is_none(),
            "account_id must match when present"
        );
        assert!(
            probe(br#"{"id":42}"#, 1, 42).is_some(),
            "account_id optional"
        );
        assert!(
            probe(br#"[42, 1, null]"#, 1, 42).is_none(),
            "arrays are not objects"
        );
        assert!(probe(br#"{"id":"42"}"#, 1, 42).is_none());
        assert!(
            probe(br#"{"id":42,"id":42}"#, 1, 42).is_none(),
            "duplicate keys"
        );
        assert!(probe(br#"{"id":42} trailing"#, 1, 42).is_none());
        assert!(probe(br#"{"id":42,"updated_at":"yesterday"}"#, 1, 42).is_none());
        assert!(probe(b"", 1, 42).is_none());
        assert!(probe(b"<html>", 1, 42).is_none());
    }

    #[test]
    fn rails_etags_are_packed() {
        let rails = b"W/\"0123456789abcdef0123456789abcdef\"";
        let packed = pack_etag(rails).expect("Rails' shape");
        assert_eq!(unpack_etag(&packed).as_ref(), rails);
        for other in [
            &b"\"abc\""[..],
            b"W/\"0123456789ABCDEF0123456789abcdef\"",
            b"W/\"0123\"",
        ] {
            assert!(pack_etag(other).is_none());
            assert_eq!(unpack_etag(other).as_ref(), other);
        }
    }

    #[test]
    fn invalid_token_detection() {
        assert!(is_invalid_token_body(
            br#"{"error":"Invalid Access Token"}"#
        ));
        assert!(!is_invalid_token_body(
            br#"{"error":"You are not authorized to do this action"}"#
        ));
        assert!(!is_invalid_token_body(b"Retry later\n"));
    }

    #[test]
    fn secrets_are_never_stored() {
        let mut h = HeaderMap::new();
        h.insert("set-cookie", "_chatwoot_session=x".parse().unwrap());
        h.insert("access-token", "x".parse().unwrap());
        h.insert("etag", "W/\"abc\"".parse().unwrap());
        h.insert(
            "content-type",
            "application/json; charset=utf-8".parse().unwrap(),
        );
        h.insert(
            "cache-control",
            "max-age=0, private, must-revalidate".parse().unwrap(),
        );
        let s = stored_headers(&h);
        assert!(!s.contains_key("set-cookie"));
        assert!(!s.contains_key("access-token"));
        assert!(!s.contains_key("etag"));
        assert!(
            !s.contains_key("content-length"),
            "hyper writes it from the body"
        );
        assert_eq!(s["cache-control"], "max-age=0, private, must-revalidate");
        assert!(s.contains_key("date"));
    }

    fn test_policy() -> CachePolicy {
        CachePolicy {
            ttl: std::time::Duration::from_secs(10),
            stale_while_revalidate: std::time::Duration::from_secs(30),
            stale_if_error: std::time::Duration::from_secs(600),
            negative_ttl: std::time::Duration::from_secs(5),
            max_object_bytes: 1 << 22,
            refresh_ahead: None,
        }
    }

    /// A response head as hyper hands it over: every value a slice of the connection's read
    /// buffer (returned too, to check nothing kept points into it).
    fn parsed_head(fields: &[(&'static str, &str)]) -> (HeaderMap, Bytes) {
        let mut buf = vec![b' '; 8192];
        let mut ranges = vec![];
        let mut at = 0;
        for (_, v) in fields {
            buf[at..at + v.len()].copy_from_slice(v.as_bytes());
            ranges.push(at..at + v.len());
            at += v.len();
        }
        let buf = Bytes::from(buf);
        let mut map = HeaderMap::new();
        for ((name, _), r) in fields.iter().zip(ranges) {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_maybe_shared(buf.slice(r)).unwrap(),
            );
        }
        (map, buf)
    }

    /// Asserts nothing the entry renders or replays points into `read_buf` (the upstream
    /// connection's read buffer), and that its values live in the entry's own buffer.
    fn assert_owns_values(e: &Entry, read_buf: &Bytes) {
        let buf = read_buf.as_ptr_range();
        for gzip in [false, true] {
            let h = headers_of_form(e, gzip);
            for v in h.values() {
                assert!(
                    !buf.contains(&v.as_bytes().as_ptr()),
                    "{v:?} still points into the upstream read buffer"
                );
            }
        }
        for v in [e.upstream_etag(), e.upstream_last_modified()]
            .into_iter()
            .flatten()
        {
            assert!(!buf.contains(&v.as_bytes().as_ptr()));
        }
    }

    /// The headers of `e`'s form for a client preferring gzip or not (the identity form of a
    /// gzip entry from its identity copy, as the proxy renders it).
    fn headers_of_form(e: &Entry, gzip: bool) -> HeaderMap {
        match e.lacks_form(gzip).then(|| e.with_identity_copy()).flatten() {
            Some(copy) => copy.form_headers(copy.form(gzip), [None, None, None]),
            None => e.form_headers(e.form(gzip), [None, None, None]),
        }
    }

    fn headers_of(e: &Entry) -> HeaderMap {
        headers_of_form(e, false)
    }

    const HEAD: &[(&str, &str)] = &[
        ("content-type", "application/json; charset=utf-8"),
        ("cache-control", "max-age=0, private, must-revalidate"),
        ("etag", "W/\"0123456789abcdef0123456789abcdef\""),
        ("last-modified", "Mon, 08 Dec 2025 08:20:00 GMT"),
        ("x-request-id", "5c1b2a7e-3f0e-4f7d-9a6e-0b9f1d2c3e4f"),
        ("x-custom-thing", "kept"),
        ("date", "Mon, 08 Dec 2025 08:20:05 GMT"),
        ("vary", "Origin"),
        ("vary", "Accept-Encoding"),
    ];

    /// X-Cache, Age and Cache-Status are written into the block's slots by position: one value
    /// each, the per-request one, also after a 304 rebuilt the block (upstream copies of these
    /// headers are never stored: `never_stored`).
    #[test]
    fn render_fills_the_slots_once() {
        let policy = test_policy();
        let now = Instant::now();
        let mut fields = HEAD.to_vec();
        fields.extend([
            ("age", "99"),
            ("x-cache", "MISS"),
            ("cache-status", "other"),
        ]);
        let (head, _buf) = parsed_head(&fields);
        let body = Bytes::from_static(br#"{"id":42,"updated_at":1765182000.482917}"#);
        let p = probe(&body, 1, 42).unwrap();
        let e = positive_entry(&head, body, p, stamp(), &policy, now, Coding::Identity);
        let refreshed_entry = refreshed(&e, Some(&HeaderMap::new()), stamp(), now);
        for entry in [&e, &refreshed_entry] {
            let later = now + std::time::Duration::from_secs(7);
            let form = entry.form(false);
            let mut resp = entry.render(form, later, HeaderValue::from_static("cs"), false, false);
            assert!(
                super::super::entry::set_render_slots(
                    resp.headers_mut(),
                    Some(HeaderValue::from_static("STALE")),
                    None,
                    None,
                ),
                "the block's slots are found by position"
            );
            let h = resp.headers();
            for (name, want) in [("x-cache", "STALE"), ("age", "7"), ("cache-status", "cs")] {
                let got: Vec<_> = h.get_all(name).iter().collect();
                assert_eq!(got, [want], "{name}");
            }
            assert_eq!(h["x-custom-thing"], "kept");
            // The slots lead the block, which is what lets them be found by position.
            let first: Vec<_> = h.keys().take(3).map(HeaderName::as_str).collect();
            assert_eq!(first, ["x-cache", "age", "cache-status"]);
        }
        // A map without slots (a 304, a local answer) gets plain inserts, replacing any value.
        let mut plain = HeaderMap::new();
        plain.insert("age", HeaderValue::from_static("99"));
        plain.insert("content-type", HeaderValue::from_static("text/plain"));
        assert!(!super::super::entry::set_render_slots(
            &mut plain,
            Some(HeaderValue::from_static("HIT")),
            Some(HeaderValue::from_static("1")),
            None,
        ));
        assert_eq!(plain.get_all("age").iter().collect::<Vec<_>>(), ["1"]);
        assert_eq!(plain["x-cache"], "HIT");
        assert!(!plain.contains_key("cache-status"));
        assert_eq!(plain.len(), 3);
    }

    /// What the shared tier stores (the compressed form, SPEC 14) rebuilds the same entry on
    /// another replica, without compressing or hashing again.
    #[test]
    fn the_shared_image_rebuilds_an_equal_entry() {
        let policy = test_policy();
        let now = Instant::now();
        let (head, _) = parsed_head(HEAD);
        // Long enough to be kept gzip-compressed.
        let body = Bytes::from(format!(
            r#"{{"id":42,"updated_at":1765182000.482917,"pad":"{}"}}"#,
            "ab".repeat(500)
        ));
        let p = probe(&body, 1, 42).unwrap();
        let e = positive_entry(&head, body.clone(), p, stamp(), &policy, now, Coding::Gzip);
        assert_eq!(e.coding, Coding::Gzip);
        let image = image(&e).expect("positive");
        assert_eq!(image.coding, Coding::Gzip);
        assert_eq!(
            image.stored,
            e.stored_body(),
            "the gzip bytes, not identity"
        );
        assert!(image.stored.len() < body.len());
        let view = &image.headers;
        assert!(!view.contains_key("x-cache") && !view.contains_key("cache-status"));
        assert!(!view.contains_key("content-encoding"));
        assert_eq!(
            view["etag"], HEAD[2].1,
            "the upstream's validator, not ours"
        );
        assert_eq!(view["last-modified"], HEAD[3].1);
        let again = from_image(&image, stamp(), &policy, now).expect("rebuilt");
        for gzip in [false, true] {
            assert_eq!(headers_of_form(&again, gzip), headers_of_form(&e, gzip));
        }
        assert_eq!(again.upstream_etag(), e.upstream_etag());
        assert_eq!(again.upstream_last_modified(), e.upstream_last_modified());
        assert_eq!(again.updated_at(), e.updated_at());
        assert_eq!(again.digest(), e.digest());
        assert_eq!(again.identity_body(), body);
        assert_eq!(again.weight(), e.weight());
    }

    #[test]
    fn entries_own_their_header_values() {
        let policy = test_policy();
        let now = Instant::now();
        let (head, read_buf) = parsed_head(HEAD);
        let body = Bytes::from_static(br#"{"id":42,"updated_at":1765182000.482917}"#);
        let p = probe(&body, 1, 42).unwrap();
        let e = positive_entry(&head, body, p, stamp(), &policy, now, Coding::Identity);
        assert_owns_values(&e, &read_buf);
        assert_eq!(e.upstream_etag().unwrap(), HEAD[2].1);
        assert_eq!(e.upstream_last_modified().unwrap(), HEAD[3].1);
        let h = headers_of(&e);
        assert_eq!(h["x-custom-thing"], "kept");
        assert_eq!(
            h.get_all("vary").iter().count(),
            2,
            "the upstream's Vary names Accept-Encoding already"
        );
        assert_eq!(
            h.get("etag"),
            Some(&super::super::entry::strong_etag(&e.identity_body()))
        );
        assert_eq!(h["last-modified"], "Mon, 08 Dec 2025 08:20:00 GMT");
        assert_eq!(e.last_modified_secs(), Some(1765182000));

        // A 304 refreshes Date, Cache-Control, Expires and the upstream ETag: copied too.
        let (nm, nm_buf) = parsed_head(&[
            ("date", "Tue, 09 Dec 2025 10:00:00 GMT"),
            ("cache-control", "max-age=0, private"),
            ("expires", "Tue, 09 Dec 2025 10:00:00 GMT"),
            ("etag", "W/\"fedcba9876543210fedcba9876543210\""),
        ]);
        let r = refreshed(&e, Some(&nm), stamp(), now);
        assert_owns_values(&r, &nm_buf);
        assert_owns_values(&r, &read_buf);
        let rh = headers_of(&r);
        assert_eq!(rh["date"], "Tue, 09 Dec 2025 10:00:00 GMT");
        assert_eq!(rh.get_all("cache-control").iter().count(), 1);
        assert_eq!(rh["expires"], "Tue, 09 Dec 2025 10:00:00 GMT");
        assert_eq!(r.upstream_etag().unwrap(), nm.get("etag").unwrap());
        assert_eq!(r.upstream_last_modified(), e.upstream_last_modified());
        assert_eq!(rh.get("etag"), headers_of(&e).get("etag"));
        assert_eq!(rh.len(), headers_of(&e).len() + 1, "Expires added");
        assert_eq!(r.updated_at(), e.updated_at());
        assert!(r.weight() > e.weight(), "a longer Cache-Control, Expires");

        // An older upstream body: the prior's blocks are kept as they are.
        let kept = refreshed(&e, None, stamp(), now);
        assert_eq!(kept.weight(), e.weight());
        assert_eq!(headers_of(&kept), headers_of(&e));
    }

    /// The weight is the entry's one buffer (stored body, per-entry header values, cold
    /// fields, and the identity copy once made) plus the fixed overhead.
    #[test]
    fn weight_counts_the_buffer_the_identity_copy_and_overhead() {
        let (head, _) = parsed_head(HEAD);
        // Compressible: kept as gzip, and the identity copy (made later) holds its own body.
        let body = Bytes::from(format!(
            r#"{{"id":42,"updated_at":1765182000.482917,"messages":[{}]}}"#,
            vec![r#"{"content":"the same words again"}"#; 40].join(",")
        ));
        let p = probe(&body, 1, 42).unwrap();
        let e = positive_entry(
            &head,
            body.clone(),
            p,
            stamp(),
            &test_policy(),
            Instant::now(),
            Coding::Gzip,
        );
        assert_eq!(e.coding, Coding::Gzip);
        let stored = e.stored_body();
        assert!(
            stored.len() * 5 < body.len(),
            "{} of {}",
            stored.len(),
            body.len()
        );
        // Per entry: the ETag, the request id, the date and Last-Modified (Content-Type,
        // Cache-Control and Vary are common values, in the shape), each with a length byte;
        // the two upstream validators and `updated_at`, each with a length byte (the digest
        // is the ETag's hex digits).
        let values = [
            "\"0123456789abcdef0123456789abcdef-gz\"".len(),
            HEAD[4].1.len(),
        ]
        .iter()
        .chain(&[HEAD[5].1.len(), HEAD[6].1.len(), HEAD[3].1.len()])
        .map(|n| n + 1)
        .sum::<usize>();
        // (The upstream ETag is Rails' shape: packed to 17 bytes.)
        let cold = 17 + HEAD[3].1.len() + "1765182000.482917".len() + 3;
        let overhead = super::super::entry::ENTRY_OVERHEAD;
        assert!(e.identity_copy().is_none(), "made when first asked for");
        assert!(e.lacks_form(false) && !e.lacks_form(true));
        assert_eq!(e.weight() as usize, stored.len() + values + cold + overhead);
        assert_eq!(
            e.digest(),
            Some(body_digest(&stored)),
            "read back from the ETag"
        );
        let copy = e.with_identity_copy().expect("a gzip entry without one");
        assert!(copy.is_identity_copy_of(&e) && !e.is_identity_copy_of(&copy));
        assert!(!copy.lacks_form(false));
        assert!(copy.with_identity_copy().is_none(), "made once");
        let identity = copy.form(false);
        assert_eq!(identity.coding, Coding::Identity);
        assert_eq!(identity.body(), body);
        assert_eq!(
            identity.etag_bytes(),
            Some(&etag_text(&body_digest(&stored), Coding::Identity)[..])
        );
        assert_eq!(copy.form(true).body(), stored);
        assert_eq!(copy.digest(), e.digest());
        assert_eq!(
            copy.weight() as usize,
            stored.len()
                + values
                + cold
                + overhead
                + body.len()
                + 34
                + super::super::entry::MOKA_PER_UPDATE,
            "the identity copy and its ETag are counted, in the same buffer, and the key moka \
             keeps again for the replacement"
        );
        // An identity client's fill makes the same entry at once.
        let p = probe(&body, 1, 42).unwrap();
        let filled = positive_entry(
            &head,
            body.clone(),
            p,
            stamp(),
            &test_policy(),
            e.stored_at,
            Coding::Identity,
        );
        assert!(filled.is_identity_copy_of(&e));
        assert_eq!(
            filled.weight() as usize,
            copy.weight() as usize - super::super::entry::MOKA_PER_UPDATE
        );
        assert_eq!(headers_of_form(&filled, false), headers_of_form(&e, false));
        // A refresh keeps it.
        let kept = refreshed(&filled, None, stamp(), Instant::now());
        assert_eq!(kept.identity_copy(), Some(&body[..]));
        assert_eq!(kept.weight(), filled.weight());
    }

    #[tokio::test]
    async fn unrepresentable_updated_at_is_stored_without_last_modified() {
        let policy = test_policy();
        let metrics = Arc::new(crate::metrics::Metrics::new().unwrap());
        let store = super::super::Store::new(1 << 20, policy, metrics);
        let now = Instant::now();
        let (head, _) = parsed_head(&HEAD[..2]);
        // Year 10000 (httpdate panics), past `SystemTime` (adding overflows), past u64.
        for (id, updated_at) in [
            (1, "253402300800"),
            (2, "253402300800.000001"),
            (3, "9.9e18"),
            (4, "9900000000000000000"),
            (5, "18446744073709551615"),
            (6, "1e19"),
        ] {
            let key = super::super::CacheKey {
                account: 1,
                conversation: id,
                scope: crate::auth::Scope(7),
            };
            let body = Bytes::from(format!(r#"{{"id":{id},"updated_at":{updated_at}}}"#));
            let p = probe(&body, 1, id).expect("storable");
            let e = positive_entry(
                &head,
                body.clone(),
                p,
                store.stamp(&key),
                &policy,
                now,
                Coding::Identity,
            );
            assert!(
                !headers_of(&e).contains_key("last-modified"),
                "{updated_at}"
            );
            assert_eq!(e.last_modified_secs(), None, "{updated_at}");
            assert!(headers_of(&e).contains_key("etag"));
            store.insert(key, Arc::new(e));
            let stored = store.lookup(&key, now).expect("stored");
            let resp = stored.render(
                stored.form(false),
                now,
                HeaderValue::from_static("chatwoot-cache; hit"),
                false,
                false,
            );
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(!resp.headers().contains_key(header::LAST_MODIFIED));
            assert!(resp.headers().contains_key(header::ETAG));
            assert_eq!(resp.into_body(), Some(body.clone()), "{updated_at}");
        }
        // The last second httpdate can format still gets its Last-Modified.
        let body = Bytes::from_static(br#"{"id":9,"updated_at":253402300799.9}"#);
        let p = probe(&body, 1, 9).unwrap();
        let e = positive_entry(&head, body, p, stamp(), &policy, now, Coding::Identity);
        assert_eq!(
            headers_of(&e)["last-modified"],
            "Fri, 31 Dec 9999 23:59:59 GMT"
        );
        assert_eq!(e.last_modified_secs(), Some(253402300799));
        assert_eq!(http_date(u64::MAX), None);
    }
}
