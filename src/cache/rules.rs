//! What may be stored (SPEC §5) and how entries are built from upstream answers.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::CachePolicy;
use super::decimal::Decimal;
use super::entry::{Entry, strong_etag_text};
use crate::invalidation::Stamp;

/// What the storage check learned from a body.
#[derive(Debug)]
pub struct Probe {
    pub updated_at: Option<Decimal>,
}

/// SPEC §5 storage rule for a 200 body: a JSON object whose `id` is the conversation id and
/// whose `account_id`, when present, is the account id. Parses without allocating the body's
/// values (serde skips what it does not need; `updated_at` is borrowed raw text).
pub fn probe(body: &[u8], account: u64, conversation: u64) -> Option<Probe> {
    #[derive(Deserialize)]
    struct Fields<'a> {
        id: Option<u64>,
        account_id: Option<u64>,
        #[serde(borrow)]
        updated_at: Option<&'a RawValue>,
    }
    // serde would also accept a JSON array for a struct; only an object is a conversation.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let f: Fields<'_> = serde_json::from_slice(body).ok()?;
    if f.id != Some(conversation) || f.account_id.is_some_and(|a| a != account) {
        return None;
    }
    let updated_at = match f.updated_at {
        Some(raw) if raw.get() != "null" => Some(Decimal::parse(raw.get())?),
        _ => None,
    };
    Some(Probe { updated_at })
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
    crate::upstream::is_hop_by_hop(name)
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

/// Names of common non-standard response headers (Rails' defaults, proxies in front of
/// Chatwoot), shared as statics. A custom name taken from an upstream response owns a small
/// allocation of its own (plus a shared-buffer header once cloned); a stored map that uses
/// one of these instead costs nothing for the name.
static SHARED_NAMES: [HeaderName; 8] = [
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-runtime"),
    HeaderName::from_static("x-download-options"),
    HeaderName::from_static("x-permitted-cross-domain-policies"),
    HeaderName::from_static("x-ratelimit-limit"),
    HeaderName::from_static("x-ratelimit-remaining"),
    HeaderName::from_static("x-ratelimit-reset"),
    HeaderName::from_static("cf-ray"),
];

fn stored_name(name: &HeaderName) -> HeaderName {
    SHARED_NAMES
        .iter()
        .find(|n| n.as_str() == name.as_str())
        .unwrap_or(name)
        .clone()
}

/// A header (name, value bytes) on its way into an entry.
type Field<'a> = (HeaderName, Cow<'a, [u8]>);

/// The upstream headers an entry replays, in order, with a `Date` guaranteed. Values still
/// borrow from `upstream`. `Content-Length` is not stored: hyper writes it from the body.
fn replayed_fields(upstream: &HeaderMap) -> Vec<Field<'_>> {
    let mut fields: Vec<Field<'_>> = Vec::with_capacity(upstream.len() + 4);
    let mut has_date = false;
    for (name, value) in upstream {
        if !never_stored(name) {
            has_date |= name == header::DATE;
            fields.push((stored_name(name), Cow::Borrowed(value.as_bytes())));
        }
    }
    if !has_date {
        let now = httpdate::fmt_http_date(std::time::SystemTime::now());
        fields.push((header::DATE, Cow::Owned(now.into_bytes())));
    }
    fields
}

/// What an entry owns of its headers: the replayed map and the upstream validators. Every
/// value is a slice of one exact-size copy made for the entry.
struct OwnedHeaders {
    map: HeaderMap,
    upstream_etag: Option<HeaderValue>,
    upstream_last_modified: Option<HeaderValue>,
}

impl OwnedHeaders {
    /// Copies every value of `fields` and the validators into one allocation and builds the
    /// map. Why copy: hyper parses a response's header values as slices of the connection's
    /// read buffer (~8 KiB), so keeping an upstream `HeaderValue` keeps that whole buffer
    /// alive. Measured with a counting allocator: an entry pinned one or two such buffers,
    /// ~3.9x the bytes it was weighed as.
    fn build(
        fields: Vec<Field<'_>>,
        upstream_etag: Option<&[u8]>,
        upstream_last_modified: Option<&[u8]>,
    ) -> OwnedHeaders {
        // A rebuilt block (a 304 refresh) already carries the render slots: added once below.
        let fields: Vec<Field<'_>> = fields
            .into_iter()
            .filter(|(name, _)| !RENDER_SLOTS.iter().any(|(slot, _)| slot == name))
            .collect();
        let total = fields
            .iter()
            .filter(|(_, v)| common_value(v).is_none())
            .map(|(_, v)| v.len())
            .sum::<usize>()
            + upstream_etag.map_or(0, <[u8]>::len)
            + upstream_last_modified.map_or(0, <[u8]>::len);
        let mut buf = Vec::with_capacity(total);
        for (_, v) in &fields {
            if common_value(v).is_none() {
                buf.extend_from_slice(v);
            }
        }
        buf.extend_from_slice(upstream_etag.unwrap_or_default());
        buf.extend_from_slice(upstream_last_modified.unwrap_or_default());
        let buf = Bytes::from(buf);
        let mut at = 0;
        let mut next = |len: usize| {
            let range = at..at + len;
            at += len;
            // Every value was a valid header value (or our own ASCII), so this cannot fail.
            HeaderValue::from_maybe_shared(buf.slice(range)).ok()
        };
        let mut map = HeaderMap::with_capacity(fields.len() + RENDER_SLOTS.len());
        // The slots go first: `entry::set_render_slots` finds them by position.
        for (name, placeholder) in RENDER_SLOTS {
            map.append(name, placeholder);
        }
        for (name, v) in fields {
            if let Some(value) = common_value(&v).or_else(|| next(v.len())) {
                map.append(name, value);
            }
        }
        let map = exact_size_map(map);
        let upstream_etag = upstream_etag.and_then(|v| next(v.len()));
        let upstream_last_modified = upstream_last_modified.and_then(|v| next(v.len()));
        OwnedHeaders {
            map,
            upstream_etag,
            upstream_last_modified,
        }
    }

    /// Bytes held for the entry outside the map (weighed by [`Entry::compute_weight`]).
    fn validator_bytes(&self) -> usize {
        self.upstream_etag.as_ref().map_or(0, HeaderValue::len)
            + self
                .upstream_last_modified
                .as_ref()
                .map_or(0, HeaderValue::len)
    }
}

/// Header values Chatwoot (Rails) sends on nearly every response, shared as statics: an entry
/// that replays one of these stores nothing for it, and cloning it for a hit copies two words
/// instead of touching the reference count of the entry's shared header buffer, a cache line
/// that every hit on every worker thread would otherwise write.
static COMMON_VALUES: [HeaderValue; 12] = [
    HeaderValue::from_static("application/json; charset=utf-8"),
    HeaderValue::from_static("max-age=0, private, must-revalidate"),
    HeaderValue::from_static("nosniff"),
    HeaderValue::from_static("SAMEORIGIN"),
    HeaderValue::from_static("0"),
    HeaderValue::from_static("1; mode=block"),
    HeaderValue::from_static("noopen"),
    HeaderValue::from_static("none"),
    HeaderValue::from_static("strict-origin-when-cross-origin"),
    HeaderValue::from_static("Origin"),
    HeaderValue::from_static("Accept, Origin"),
    HeaderValue::from_static("Accept-Encoding"),
];

/// Headers every rendered entry carries with a per-request value. The stored block holds a
/// slot for each (with a placeholder value), first and in this order, so a hit clones the block
/// and overwrites the three values by position (`entry::set_render_slots`): no name is hashed,
/// and a clone has no spare capacity, so adding three headers would regrow and rehash the map
/// on every hit. Every answer overwrites X-Cache (`proxy::finish`), a rendered entry also Age
/// and Cache-Status (`Entry::render`).
const RENDER_SLOTS: [(HeaderName, HeaderValue); 3] = [
    (
        HeaderName::from_static("x-cache"),
        HeaderValue::from_static("HIT"),
    ),
    (header::AGE, HeaderValue::from_static("0")),
    (
        HeaderName::from_static("cache-status"),
        HeaderValue::from_static("chatwoot-cache; hit"),
    ),
];

fn common_value(value: &[u8]) -> Option<HeaderValue> {
    COMMON_VALUES
        .iter()
        .find(|v| v.as_bytes() == value)
        .cloned()
}

/// `map` with no spare slots. `HeaderMap::with_capacity(n)` rounds its table up to a power of
/// two and allocates ~3/4 of that many 104-byte slots: 24 (2.5 KB) for 13 headers. `Clone`
/// allocates the slots for exactly `len()` values (measured: 13 headers → 1480 bytes including
/// the 32-entry index), so a map built with `with_capacity(n)` is cloned once. The index keeps
/// the builder's power-of-two size, which [`super::entry::header_map_bytes`] accounts for.
fn exact_size_map(map: HeaderMap) -> HeaderMap {
    map.clone()
}

/// The header block an entry replays, with a `Date` guaranteed, owning its values (see
/// [`OwnedHeaders::build`]).
pub fn stored_headers(upstream: &HeaderMap) -> HeaderMap {
    OwnedHeaders::build(replayed_fields(upstream), None, None).map
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

/// Builds a positive entry from a storable 200.
pub fn positive_entry(
    upstream_headers: &HeaderMap,
    body: Bytes,
    probe: Probe,
    stamp: Stamp,
    policy: &CachePolicy,
    now: Instant,
) -> Entry {
    let mut fields = replayed_fields(upstream_headers);
    // The replayed header block carries our validators, so a hit only clones it.
    fields.push((header::ETAG, Cow::Owned(strong_etag_text(&body).to_vec())));
    let last_modified = probe
        .updated_at
        .as_ref()
        .and_then(Decimal::whole_seconds)
        .and_then(|s| Some((s, http_date(s)?)));
    let last_modified_secs = last_modified.map(|(secs, text)| {
        fields.push((header::LAST_MODIFIED, Cow::Owned(text.into_bytes())));
        secs
    });
    let owned = OwnedHeaders::build(
        fields,
        upstream_headers
            .get(header::ETAG)
            .map(HeaderValue::as_bytes),
        upstream_headers
            .get(header::LAST_MODIFIED)
            .map(HeaderValue::as_bytes),
    );
    let extra = owned.validator_bytes() + probe.updated_at.as_ref().map_or(0, Decimal::heap_bytes);
    let weight = Entry::compute_weight(&owned.map, &body, extra);
    Entry {
        status: StatusCode::OK,
        headers: owned.map,
        body,
        last_modified_secs,
        updated_at: probe.updated_at,
        upstream_etag: owned.upstream_etag,
        upstream_last_modified: owned.upstream_last_modified,
        stored_at: now,
        stamp,
        lifetime: policy.positive_lifetime(),
        weight,
        failure: Default::default(),
    }
}

/// Builds a negative entry (404, or a 401 that is about this conversation, not the token).
pub fn negative_entry(
    status: StatusCode,
    upstream_headers: &HeaderMap,
    body: Bytes,
    stamp: Stamp,
    policy: &CachePolicy,
    now: Instant,
) -> Entry {
    let headers = stored_headers(upstream_headers);
    let weight = Entry::compute_weight(&headers, &body, 0);
    Entry {
        status,
        headers,
        body,
        last_modified_secs: None,
        updated_at: None,
        upstream_etag: None,
        upstream_last_modified: None,
        stored_at: now,
        stamp,
        lifetime: policy.negative_ttl,
        weight,
        failure: Default::default(),
    }
}

/// A copy of `prior` made fresh again (upstream said 304, or sent an older body). A 304's
/// `Date`, `Cache-Control`, `Expires` and `ETag` replace the stored ones (RFC 9111 §4.3.4);
/// they are copied (with the rest of the block) into a new exact-size buffer, never kept as
/// slices of the 304's read buffer.
pub fn refreshed(
    prior: &Entry,
    not_modified: Option<&HeaderMap>,
    stamp: Stamp,
    now: Instant,
) -> Entry {
    let (headers, upstream_etag, upstream_last_modified, weight) = match not_modified {
        // Same content: share the prior's map (its clone is exact) and buffer.
        None => (
            prior.headers.clone(),
            prior.upstream_etag.clone(),
            prior.upstream_last_modified.clone(),
            prior.weight,
        ),
        Some(h) => {
            let mut fields: Vec<Field<'_>> = prior
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), Cow::Borrowed(v.as_bytes())))
                .collect();
            for name in [header::DATE, header::CACHE_CONTROL, header::EXPIRES] {
                if let Some(v) = h.get(&name) {
                    // `insert` semantics: the 304's value replaces every stored one.
                    fields.retain(|(n, _)| *n != name);
                    fields.push((name, Cow::Borrowed(v.as_bytes())));
                }
            }
            let etag = h.get(header::ETAG).or(prior.upstream_etag.as_ref());
            let owned = OwnedHeaders::build(
                fields,
                etag.map(HeaderValue::as_bytes),
                prior
                    .upstream_last_modified
                    .as_ref()
                    .map(HeaderValue::as_bytes),
            );
            let extra =
                owned.validator_bytes() + prior.updated_at.as_ref().map_or(0, Decimal::heap_bytes);
            let weight = Entry::compute_weight(&owned.map, &prior.body, extra);
            (
                owned.map,
                owned.upstream_etag,
                owned.upstream_last_modified,
                weight,
            )
        }
    };
    Entry {
        status: prior.status,
        headers,
        body: prior.body.clone(),
        last_modified_secs: prior.last_modified_secs,
        updated_at: prior.updated_at.clone(),
        upstream_etag,
        upstream_last_modified,
        stored_at: now,
        stamp,
        lifetime: prior.lifetime,
        weight,
        failure: Default::default(),
    }
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

    /// Every value the entry keeps a copy of: the replayed map and the upstream validators,
    /// less the shared statics (common Rails values, render-slot placeholders).
    fn kept_values(e: &Entry) -> Vec<&HeaderValue> {
        e.headers
            .values()
            .chain(&e.upstream_etag)
            .chain(&e.upstream_last_modified)
            .filter(|v| {
                common_value(v.as_bytes()).is_none()
                    && !RENDER_SLOTS
                        .iter()
                        .any(|(_, placeholder)| placeholder == *v)
            })
            .collect()
    }

    /// Asserts the entry keeps no slice of `read_buf`, and holds its values in one
    /// contiguous copy (one allocation) sized exactly for them.
    fn assert_owns_values(e: &Entry, read_buf: &Bytes) {
        let values = kept_values(e);
        let buf = read_buf.as_ptr_range();
        for v in &values {
            assert!(
                !buf.contains(&v.as_bytes().as_ptr()),
                "{v:?} still points into the upstream read buffer"
            );
        }
        let start = values
            .iter()
            .map(|v| v.as_bytes().as_ptr_range().start)
            .min();
        let end = values.iter().map(|v| v.as_bytes().as_ptr_range().end).max();
        let total: usize = values.iter().map(|v| v.len()).sum();
        assert_eq!(
            end.unwrap() as usize - start.unwrap() as usize,
            total,
            "values are not one exact copy"
        );
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

    /// X-Cache, Age and Cache-Status are written into the stored block's slots by position:
    /// one value each, the per-request one, also after a 304 rebuilt the block (upstream copies
    /// of these headers are never stored: `never_stored`).
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
        let e = positive_entry(&head, body, p, stamp(), &policy, now);
        let refreshed_entry = refreshed(&e, Some(&HeaderMap::new()), stamp(), now);
        for entry in [&e, &refreshed_entry] {
            let later = now + std::time::Duration::from_secs(7);
            let mut resp = entry.render(later, HeaderValue::from_static("cs"), false, false);
            assert!(
                super::super::entry::set_render_slots(
                    resp.headers_mut(),
                    Some(HeaderValue::from_static("STALE")),
                    None,
                    None,
                ),
                "the stored block's slots are found by position"
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

    #[test]
    fn entries_own_their_header_values() {
        let policy = test_policy();
        let now = Instant::now();
        let (head, read_buf) = parsed_head(HEAD);
        let body = Bytes::from_static(br#"{"id":42,"updated_at":1765182000.482917}"#);
        let p = probe(&body, 1, 42).unwrap();
        let e = positive_entry(&head, body, p, stamp(), &policy, now);
        assert_owns_values(&e, &read_buf);
        assert_eq!(e.upstream_etag.as_ref().unwrap(), HEAD[2].1);
        assert_eq!(e.upstream_last_modified.as_ref().unwrap(), HEAD[3].1);
        assert_eq!(e.headers["x-custom-thing"], "kept");
        assert_eq!(e.headers.get_all("vary").iter().count(), 2);
        assert_eq!(e.etag(), Some(&super::super::entry::strong_etag(&e.body)));
        assert_eq!(e.last_modified().unwrap(), "Mon, 08 Dec 2025 08:20:00 GMT");
        assert_eq!(e.last_modified_secs, Some(1765182000));

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
        assert_eq!(r.headers["date"], "Tue, 09 Dec 2025 10:00:00 GMT");
        assert_eq!(r.headers.get_all("cache-control").iter().count(), 1);
        assert_eq!(r.headers["expires"], "Tue, 09 Dec 2025 10:00:00 GMT");
        assert_eq!(r.upstream_etag.as_ref().unwrap(), nm.get("etag").unwrap());
        assert_eq!(r.upstream_last_modified, e.upstream_last_modified);
        assert_eq!(r.etag(), e.etag());
        assert_eq!(r.headers.len(), e.headers.len() + 1, "Expires added");
        assert_eq!(
            r.weight,
            Entry::compute_weight(
                &r.headers,
                &r.body,
                HEAD[2].1.len() + HEAD[3].1.len() + "1765182000482917".len()
            ),
            "weight recomputed for the refreshed headers"
        );
        assert!(r.weight > e.weight);

        // An older upstream body: the prior's header block is shared as it is.
        let kept = refreshed(&e, None, stamp(), now);
        assert_eq!(kept.weight, e.weight);
        assert_eq!(
            kept.headers["date"].as_bytes().as_ptr(),
            e.headers["date"].as_bytes().as_ptr()
        );
    }

    #[test]
    fn weight_counts_text_slots_validators_and_overhead() {
        let (head, _) = parsed_head(HEAD);
        let body = Bytes::from_static(br#"{"id":42,"updated_at":1765182000.482917}"#);
        let p = probe(&body, 1, 42).unwrap();
        let e = positive_entry(
            &head,
            body.clone(),
            p,
            stamp(),
            &test_policy(),
            Instant::now(),
        );
        let text: usize = e
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        let validators = HEAD[2].1.len() + HEAD[3].1.len();
        let n = e.headers.len();
        assert_eq!(
            e.weight as usize,
            body.len()
                + text
                + n * super::super::entry::HEADER_SLOT
                + 4 * (n + n / 3).next_power_of_two()
                + validators
                + "1765182000482917".len()
                + super::super::entry::ENTRY_OVERHEAD
        );
    }

    #[tokio::test]
    async fn unrepresentable_updated_at_is_stored_without_last_modified() {
        use http_body_util::BodyExt;

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
            let e = positive_entry(&head, body.clone(), p, store.stamp(&key), &policy, now);
            assert!(e.last_modified().is_none(), "{updated_at}");
            assert_eq!(e.last_modified_secs, None, "{updated_at}");
            assert!(e.etag().is_some());
            store.insert(key, Arc::new(e));
            let stored = store.lookup(&key, now).expect("stored");
            let resp = stored.render(
                now,
                HeaderValue::from_static("chatwoot-cache; hit"),
                false,
                false,
            );
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(!resp.headers().contains_key(header::LAST_MODIFIED));
            assert!(resp.headers().contains_key(header::ETAG));
            let served = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(served, body, "{updated_at}");
        }
        // The last second httpdate can format still gets its Last-Modified.
        let body = Bytes::from_static(br#"{"id":9,"updated_at":253402300799.9}"#);
        let p = probe(&body, 1, 9).unwrap();
        let e = positive_entry(&head, body, p, stamp(), &policy, now);
        assert_eq!(e.last_modified().unwrap(), "Fri, 31 Dec 9999 23:59:59 GMT");
        assert_eq!(e.last_modified_secs, Some(253402300799));
        assert_eq!(http_date(u64::MAX), None);
    }
}
