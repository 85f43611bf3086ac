//! What may be stored (SPEC §5) and how entries are built from upstream answers.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

use std::sync::OnceLock;

use super::CachePolicy;
use super::coding::{self, Coding};
use super::decimal::Decimal;
use super::entry::{ENTRY_OVERHEAD, Entry, Form, body_digest, etag_text};
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

/// The upstream headers an entry replays, in order, with a `Date` guaranteed and `Vary`
/// naming `Accept-Encoding` (SPEC 14: the answer depends on it). Values still borrow from
/// `upstream`. `Content-Length` is not stored: hyper writes it from the body.
fn replayed_fields(upstream: &HeaderMap) -> Vec<Field<'_>> {
    let mut fields: Vec<Field<'_>> = Vec::with_capacity(upstream.len() + 6);
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
            fields.push((stored_name(name), Cow::Borrowed(value.as_bytes())));
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

/// A header map for `fields`: the render slots first, then the fields in order, every value
/// that is not a shared static copied into one exact-size buffer. Why copy: hyper parses a
/// response's header values as slices of the connection's read buffer (~8 KiB), so keeping an
/// upstream `HeaderValue` keeps that whole buffer alive. Measured with a counting allocator:
/// an entry pinned one or two such buffers, ~3.9x the bytes it was weighed as.
fn build_map(fields: &[Field<'_>]) -> HeaderMap {
    // A rebuilt block (a 304 refresh, another form) already carries the slots: added once.
    let fields = || {
        fields
            .iter()
            .filter(|(name, _)| !RENDER_SLOTS.iter().any(|(slot, _)| slot == name))
    };
    let total = fields()
        .filter(|(_, v)| common_value(v).is_none())
        .map(|(_, v)| v.len())
        .sum::<usize>();
    let mut buf = Vec::with_capacity(total);
    for (_, v) in fields() {
        if common_value(v).is_none() {
            buf.extend_from_slice(v);
        }
    }
    let buf = Bytes::from(buf);
    let mut at = 0;
    let mut map = HeaderMap::with_capacity(fields().count() + RENDER_SLOTS.len());
    // The slots go first: `entry::set_render_slots` finds them by position.
    for (name, placeholder) in RENDER_SLOTS {
        map.append(name, placeholder);
    }
    for (name, v) in fields() {
        let value = common_value(v).or_else(|| {
            let range = at..at + v.len();
            at += v.len();
            // Every value was a valid header value (or our own ASCII), so this cannot fail.
            HeaderValue::from_maybe_shared(buf.slice(range)).ok()
        });
        if let Some(value) = value {
            map.append(name.clone(), value);
        }
    }
    exact_size_map(map)
}

/// The upstream validators an entry replays on revalidation, copied into one exact buffer
/// (not kept as slices of the upstream read buffer: see [`build_map`]).
fn copy_validators(
    etag: Option<&[u8]>,
    last_modified: Option<&[u8]>,
) -> (Option<HeaderValue>, Option<HeaderValue>) {
    let mut buf =
        Vec::with_capacity(etag.map_or(0, <[u8]>::len) + last_modified.map_or(0, <[u8]>::len));
    buf.extend_from_slice(etag.unwrap_or_default());
    buf.extend_from_slice(last_modified.unwrap_or_default());
    let buf = Bytes::from(buf);
    let etag_len = etag.map_or(0, <[u8]>::len);
    (
        etag.and_then(|_| HeaderValue::from_maybe_shared(buf.slice(..etag_len)).ok()),
        last_modified.and_then(|_| HeaderValue::from_maybe_shared(buf.slice(etag_len..)).ok()),
    )
}

fn validator_bytes(etag: &Option<HeaderValue>, last_modified: &Option<HeaderValue>) -> usize {
    etag.as_ref().map_or(0, HeaderValue::len) + last_modified.as_ref().map_or(0, HeaderValue::len)
}

/// One form of an entry: `base` (the fields both forms share) plus the form's own strong ETag
/// (positive entries) and, for gzip, `Content-Encoding`. `stored` is the entry's stored body:
/// a form sharing it adds nothing for its body to the weight.
fn make_form(
    base: &[Field<'_>],
    coding: Coding,
    digest: Option<&[u8; 16]>,
    body: Bytes,
    stored: &Bytes,
) -> Form {
    let mut fields: Vec<Field<'_>> = Vec::with_capacity(base.len() + 2);
    fields.extend(
        base.iter()
            .map(|(n, v)| (n.clone(), Cow::Borrowed(v.as_ref()))),
    );
    if let Some(digest) = digest {
        fields.push((header::ETAG, Cow::Owned(etag_text(digest, coding))));
    }
    if coding == Coding::Gzip {
        fields.push((header::CONTENT_ENCODING, Cow::Borrowed(b"gzip")));
    }
    let headers = build_map(&fields);
    let shares_body = body.as_ptr() == stored.as_ptr() && body.len() == stored.len();
    let weight = Entry::header_block_weight(&headers) + if shares_body { 0 } else { body.len() };
    Form {
        headers,
        body,
        weight: u32::try_from(weight).unwrap_or(u32::MAX),
    }
}

/// The fields a built form shares with the other form: everything but the render slots, its
/// ETag and its `Content-Encoding`.
fn shared_fields(form: &Form) -> Vec<Field<'_>> {
    form.headers
        .iter()
        .filter(|(n, _)| {
            **n != header::ETAG
                && **n != header::CONTENT_ENCODING
                && !RENDER_SLOTS.iter().any(|(slot, _)| slot == *n)
        })
        .map(|(n, v)| (n.clone(), Cow::Borrowed(v.as_bytes())))
        .collect()
}

/// Form `want` of an entry, built from its other form `from` (see [`Entry::form`]).
pub(crate) fn convert_form(
    from: &Form,
    want: Coding,
    digest: Option<&[u8; 16]>,
    body: Bytes,
    stored: &Bytes,
) -> Form {
    make_form(&shared_fields(from), want, digest, body, stored)
}

/// Header values Chatwoot (Rails) sends on nearly every response, shared as statics: an entry
/// that replays one of these stores nothing for it, and cloning it for a hit copies two words
/// instead of touching the reference count of the entry's shared header buffer, a cache line
/// that every hit on every worker thread would otherwise write.
static COMMON_VALUES: [HeaderValue; 13] = [
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
    HeaderValue::from_static("gzip"),
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

/// The identity header block an entry with these upstream headers replays (no ETag: that
/// is the body's), owning its values (see `build_map`).
pub fn stored_headers(upstream: &HeaderMap) -> HeaderMap {
    build_map(&replayed_fields(upstream))
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

/// What the entry's constructors have in common.
struct Parts {
    status: StatusCode,
    body: Bytes,
    coding: Coding,
    identity_len: usize,
    digest: Option<[u8; 16]>,
    form: Form,
    form_coding: Coding,
    last_modified_secs: Option<u64>,
    updated_at: Option<Decimal>,
    validators: (Option<HeaderValue>, Option<HeaderValue>),
    stamp: Stamp,
    lifetime: std::time::Duration,
    now: Instant,
}

fn assemble(p: Parts) -> Entry {
    let extra = validator_bytes(&p.validators.0, &p.validators.1)
        + p.updated_at.as_ref().map_or(0, Decimal::heap_bytes);
    let base_weight = p.body.len() + extra + ENTRY_OVERHEAD;
    let (gzip, identity) = match p.form_coding {
        Coding::Gzip => (OnceLock::from(p.form), OnceLock::new()),
        Coding::Identity => (OnceLock::new(), OnceLock::from(p.form)),
    };
    Entry {
        status: p.status,
        body: p.body,
        coding: p.coding,
        identity_len: p.identity_len,
        digest: p.digest,
        gzip,
        identity,
        last_modified_secs: p.last_modified_secs,
        updated_at: p.updated_at,
        upstream_etag: p.validators.0,
        upstream_last_modified: p.validators.1,
        stored_at: p.now,
        stamp: p.stamp,
        lifetime: p.lifetime,
        base_weight: u32::try_from(base_weight).unwrap_or(u32::MAX),
        failure: Default::default(),
        heat: Default::default(),
        recharging: Default::default(),
    }
}

/// Builds a positive entry from a storable 200: the body kept gzip-compressed when that is
/// smaller (SPEC 14), and the form `form` (what the fetching client prefers) built at once.
pub fn positive_entry(
    upstream_headers: &HeaderMap,
    body: Bytes,
    probe: Probe,
    stamp: Stamp,
    policy: &CachePolicy,
    now: Instant,
    form: Coding,
) -> Entry {
    let digest = body_digest(&body);
    let mut base = replayed_fields(upstream_headers);
    let last_modified = probe
        .updated_at
        .as_ref()
        .and_then(Decimal::whole_seconds)
        .and_then(|s| Some((s, http_date(s)?)));
    let last_modified_secs = last_modified.map(|(secs, text)| {
        base.push((header::LAST_MODIFIED, Cow::Owned(text.into_bytes())));
        secs
    });
    let validators = copy_validators(
        upstream_headers
            .get(header::ETAG)
            .map(HeaderValue::as_bytes),
        upstream_headers
            .get(header::LAST_MODIFIED)
            .map(HeaderValue::as_bytes),
    );
    let identity_len = body.len();
    let (stored, coding) = match coding::gzip(&body) {
        Some(gz) => (gz, Coding::Gzip),
        None => (body.clone(), Coding::Identity),
    };
    let (form_coding, form_body) = match (form, coding) {
        (Coding::Gzip, Coding::Gzip) => (Coding::Gzip, stored.clone()),
        _ => (Coding::Identity, body),
    };
    let form = make_form(&base, form_coding, Some(&digest), form_body, &stored);
    assemble(Parts {
        status: StatusCode::OK,
        body: stored,
        coding,
        identity_len,
        digest: Some(digest),
        form,
        form_coding,
        last_modified_secs,
        updated_at: probe.updated_at,
        validators,
        stamp,
        lifetime: policy.positive_lifetime(),
        now,
    })
}

/// The headers `entry` replays as the upstream would send them: its identity form's block
/// less the render slots and this cache's own validators, plus the upstream's `ETag`/
/// `Last-Modified`; and the identity body. [`positive_entry`] on these rebuilds an equal entry
/// (the shared tier stores it this way, so every replica derives validators and forms the same
/// way). The bool: the identity form was built by this call (the caller re-weighs the entry).
pub fn upstream_view(entry: &Entry) -> (HeaderMap, Bytes, bool) {
    let (form, built) = entry.form(false);
    let mut map = HeaderMap::with_capacity(form.headers.len());
    for (name, value) in &form.headers {
        let ours = RENDER_SLOTS.iter().any(|(slot, _)| slot == name)
            || name == header::ETAG
            || name == header::LAST_MODIFIED
            || name == header::CONTENT_ENCODING;
        if !ours {
            map.append(name.clone(), value.clone());
        }
    }
    if let Some(v) = &entry.upstream_etag {
        map.insert(header::ETAG, v.clone());
    }
    if let Some(v) = &entry.upstream_last_modified {
        map.insert(header::LAST_MODIFIED, v.clone());
    }
    (map, form.body.clone(), built)
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
    let base = replayed_fields(upstream_headers);
    let form = make_form(&base, Coding::Identity, None, body.clone(), &body);
    assemble(Parts {
        status,
        identity_len: body.len(),
        body,
        coding: Coding::Identity,
        digest: None,
        form,
        form_coding: Coding::Identity,
        last_modified_secs: None,
        updated_at: None,
        validators: (None, None),
        stamp,
        lifetime: policy.negative_ttl,
        now,
    })
}

/// A copy of `prior` made fresh again (upstream said 304, or sent an older body). A 304's
/// `Date`, `Cache-Control`, `Expires` and `ETag` replace the stored ones (RFC 9111 §4.3.4);
/// they are copied (with the rest of each form's block) into a new exact-size buffer, never
/// kept as slices of the 304's read buffer. The forms the prior had built are kept.
pub fn refreshed(
    prior: &Entry,
    not_modified: Option<&HeaderMap>,
    stamp: Stamp,
    now: Instant,
) -> Entry {
    let built = [Coding::Gzip, Coding::Identity]
        .into_iter()
        .filter_map(|c| prior_form(prior, c).map(|f| (c, f)));
    let (forms, validators): (Vec<(Coding, Form)>, _) = match not_modified {
        // Same content: share the prior's blocks (their clones are exact) and buffers.
        None => (
            built.map(|(c, f)| (c, f.clone())).collect(),
            (
                prior.upstream_etag.clone(),
                prior.upstream_last_modified.clone(),
            ),
        ),
        Some(h) => {
            let any = prior_form(prior, Coding::Identity).or(prior_form(prior, Coding::Gzip));
            let mut base = any.map(shared_fields).unwrap_or_default();
            for name in [header::DATE, header::CACHE_CONTROL, header::EXPIRES] {
                if let Some(v) = h.get(&name) {
                    // `insert` semantics: the 304's value replaces every stored one.
                    base.retain(|(n, _)| *n != name);
                    base.push((name, Cow::Borrowed(v.as_bytes())));
                }
            }
            let etag = h.get(header::ETAG).or(prior.upstream_etag.as_ref());
            let forms = built
                .map(|(c, f)| {
                    let form =
                        make_form(&base, c, prior.digest.as_ref(), f.body.clone(), &prior.body);
                    (c, form)
                })
                .collect();
            let validators = copy_validators(
                etag.map(HeaderValue::as_bytes),
                prior
                    .upstream_last_modified
                    .as_ref()
                    .map(HeaderValue::as_bytes),
            );
            (forms, validators)
        }
    };
    let extra = validator_bytes(&validators.0, &validators.1)
        + prior.updated_at.as_ref().map_or(0, Decimal::heap_bytes);
    let base_weight = prior.body.len() + extra + ENTRY_OVERHEAD;
    let (gzip, identity) = (OnceLock::new(), OnceLock::new());
    for (c, form) in forms {
        let _ = match c {
            Coding::Gzip => gzip.set(form),
            Coding::Identity => identity.set(form),
        };
    }
    Entry {
        status: prior.status,
        body: prior.body.clone(),
        coding: prior.coding,
        identity_len: prior.identity_len,
        digest: prior.digest,
        gzip,
        identity,
        last_modified_secs: prior.last_modified_secs,
        updated_at: prior.updated_at.clone(),
        upstream_etag: validators.0,
        upstream_last_modified: validators.1,
        stored_at: now,
        stamp,
        lifetime: prior.lifetime,
        base_weight: u32::try_from(base_weight).unwrap_or(u32::MAX),
        failure: Default::default(),
        heat: Default::default(),
        recharging: Default::default(),
    }
}

fn prior_form(prior: &Entry, coding: Coding) -> Option<&Form> {
    match coding {
        Coding::Gzip => prior.gzip.get(),
        Coding::Identity => prior.identity.get(),
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

    /// The values of each allocation the entry keeps copies in: each built form's block and
    /// the upstream validators, less the shared statics (common Rails values, render-slot
    /// placeholders).
    fn kept_values(e: &Entry) -> Vec<Vec<&HeaderValue>> {
        let copied = |v: &&HeaderValue| {
            common_value(v.as_bytes()).is_none()
                && !RENDER_SLOTS
                    .iter()
                    .any(|(_, placeholder)| placeholder == *v)
        };
        let mut groups: Vec<Vec<&HeaderValue>> = [e.gzip.get(), e.identity.get()]
            .into_iter()
            .flatten()
            .map(|f| f.headers.values().filter(copied).collect())
            .collect();
        groups.push(
            e.upstream_etag
                .iter()
                .chain(&e.upstream_last_modified)
                .collect(),
        );
        groups
    }

    /// Asserts the entry keeps no slice of `read_buf`, and holds the values of each form's
    /// block (and the validators) in one contiguous copy (one allocation) sized exactly.
    fn assert_owns_values(e: &Entry, read_buf: &Bytes) {
        let buf = read_buf.as_ptr_range();
        for values in kept_values(e) {
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
            if let (Some(start), Some(end)) = (start, end) {
                assert_eq!(
                    end as usize - start as usize,
                    total,
                    "values are not one exact copy"
                );
            }
        }
    }

    fn headers_of(e: &Entry) -> &HeaderMap {
        &e.form(false).0.headers
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
        let e = positive_entry(&head, body, p, stamp(), &policy, now, Coding::Identity);
        let refreshed_entry = refreshed(&e, Some(&HeaderMap::new()), stamp(), now);
        for entry in [&e, &refreshed_entry] {
            let later = now + std::time::Duration::from_secs(7);
            let form = entry.form(false).0;
            let mut resp = entry.render(form, later, HeaderValue::from_static("cs"), false, false);
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

    /// What the shared tier stores rebuilds the same entry on another replica.
    #[test]
    fn the_upstream_view_rebuilds_an_equal_entry() {
        let policy = test_policy();
        let now = Instant::now();
        let (head, _) = parsed_head(HEAD);
        // Long enough to be kept gzip-compressed: the view is still the identity one.
        let body = Bytes::from(format!(
            r#"{{"id":42,"updated_at":1765182000.482917,"pad":"{}"}}"#,
            "ab".repeat(500)
        ));
        let p = || probe(&body, 1, 42).unwrap();
        let e = positive_entry(
            &head,
            body.clone(),
            p(),
            stamp(),
            &policy,
            now,
            Coding::Gzip,
        );
        assert_eq!(e.coding, Coding::Gzip);
        let (view, identity, built) = upstream_view(&e);
        assert!(built, "the identity form was built for the view");
        assert_eq!(identity, body);
        assert!(!view.contains_key("x-cache") && !view.contains_key("cache-status"));
        assert!(!view.contains_key("content-encoding"));
        assert_eq!(
            view["etag"], HEAD[2].1,
            "the upstream's validator, not ours"
        );
        let again = positive_entry(
            &view,
            identity,
            p(),
            stamp(),
            &policy,
            now,
            Coding::Identity,
        );
        assert_eq!(again.form(false).0.headers, e.form(false).0.headers);
        assert_eq!(again.form(true).0.headers, e.form(true).0.headers);
        assert_eq!(again.upstream_etag, e.upstream_etag);
        assert_eq!(again.upstream_last_modified, e.upstream_last_modified);
        assert_eq!(again.identity_body(), e.identity_body());
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
        assert_eq!(e.upstream_etag.as_ref().unwrap(), HEAD[2].1);
        assert_eq!(e.upstream_last_modified.as_ref().unwrap(), HEAD[3].1);
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
        let rh = headers_of(&r);
        assert_eq!(rh["date"], "Tue, 09 Dec 2025 10:00:00 GMT");
        assert_eq!(rh.get_all("cache-control").iter().count(), 1);
        assert_eq!(rh["expires"], "Tue, 09 Dec 2025 10:00:00 GMT");
        assert_eq!(r.upstream_etag.as_ref().unwrap(), nm.get("etag").unwrap());
        assert_eq!(r.upstream_last_modified, e.upstream_last_modified);
        assert_eq!(rh.get("etag"), headers_of(&e).get("etag"));
        assert_eq!(rh.len(), headers_of(&e).len() + 1, "Expires added");
        assert_eq!(
            r.weight() as usize,
            r.body.len()
                + Entry::header_block_weight(rh)
                + HEAD[3].1.len()
                + nm.get("etag").unwrap().len()
                + "1765182000482917".len()
                + super::super::entry::ENTRY_OVERHEAD,
            "weight recomputed for the refreshed headers"
        );
        assert!(r.weight() > e.weight());

        // An older upstream body: the prior's header block is shared as it is.
        let kept = refreshed(&e, None, stamp(), now);
        assert_eq!(kept.weight(), e.weight());
        assert_eq!(
            headers_of(&kept)["date"].as_bytes().as_ptr(),
            headers_of(&e)["date"].as_bytes().as_ptr()
        );
    }

    #[test]
    fn weight_counts_text_slots_validators_and_overhead() {
        let (head, _) = parsed_head(HEAD);
        // Compressible: kept as gzip, and the identity form (built later) holds its own body.
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
        assert!(
            e.body.len() * 5 < body.len(),
            "{} of {}",
            e.body.len(),
            body.len()
        );
        let block = |h: &HeaderMap| {
            let text: usize = h.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
            let n = h.len();
            text + n * super::super::entry::HEADER_SLOT + 4 * (n + n / 3).next_power_of_two()
        };
        let validators = HEAD[2].1.len() + HEAD[3].1.len();
        let gzip_block = block(&e.gzip.get().unwrap().headers);
        let base = e.body.len()
            + validators
            + "1765182000482917".len()
            + super::super::entry::ENTRY_OVERHEAD;
        assert!(e.identity.get().is_none(), "built when first asked for");
        assert_eq!(e.weight() as usize, base + gzip_block);
        let (identity, built) = e.form(false);
        assert!(built);
        assert_eq!(identity.body, body);
        let identity_block = block(&identity.headers);
        assert_eq!(
            e.weight() as usize,
            base + gzip_block + identity_block + body.len(),
            "the identity form's body is counted: it is a copy"
        );
        assert!(!e.form(false).1 && !e.form(true).1, "built once");
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
            assert_eq!(e.last_modified_secs, None, "{updated_at}");
            assert!(headers_of(&e).contains_key("etag"));
            store.insert(key, Arc::new(e));
            let stored = store.lookup(&key, now).expect("stored");
            let resp = stored.render(
                stored.form(false).0,
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
        let e = positive_entry(&head, body, p, stamp(), &policy, now, Coding::Identity);
        assert_eq!(
            headers_of(&e)["last-modified"],
            "Fri, 31 Dec 9999 23:59:59 GMT"
        );
        assert_eq!(e.last_modified_secs, Some(253402300799));
        assert_eq!(http_date(u64::MAX), None);
    }
}
