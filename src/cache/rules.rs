//! What may be stored (SPEC §5) and how entries are built from upstream answers.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::CachePolicy;
use super::decimal::Decimal;
use super::entry::{Entry, strong_etag};
use crate::body::UpstreamBody;
use crate::metrics::XCache;
use crate::upstream::UpstreamError;

/// The outcome of one upstream fetch on the conversation route, shared by every waiter.
pub enum FetchResult {
    /// An entry to render: freshly stored, refreshed by revalidation, or kept.
    Entry {
        entry: Arc<Entry>,
        xcache: XCache,
        /// The upstream status of the exchange (200, 304, 404 …).
        fwd_status: u16,
        /// `Cache-Status` detail, e.g. `older-upstream`.
        detail: Option<&'static str>,
        stored: bool,
    },
    /// An upstream answer that is not stored; forwarded as is.
    Forward(Forwarded),
    /// A 200 over `--max-object-bytes`: streamed to the first taker only.
    TooLarge(Mutex<Option<LargeBody>>),
    /// No usable upstream answer.
    Failed(UpstreamError),
}

/// A complete upstream answer held in memory.
pub struct Forwarded {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An oversized upstream answer, already partly read.
pub struct LargeBody {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: UpstreamBody,
}

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
    matches!(
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
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authenticate"
    )
}

/// The header block an entry replays, with `Content-Length` set and a `Date` guaranteed.
pub fn stored_headers(upstream: &HeaderMap, body_len: usize) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len() + 2);
    for (name, value) in upstream {
        if !never_stored(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    if !out.contains_key(header::DATE)
        && let Ok(d) = HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
    {
        out.insert(header::DATE, d);
    }
    out
}

/// Builds a positive entry from a storable 200.
pub fn positive_entry(
    upstream_headers: &HeaderMap,
    body: Bytes,
    probe: Probe,
    stamp: u64,
    policy: &CachePolicy,
    now: Instant,
) -> Entry {
    let mut headers = stored_headers(upstream_headers, body.len());
    let etag = Some(strong_etag(&body));
    let last_modified_secs = probe.updated_at.as_ref().and_then(Decimal::whole_seconds);
    let last_modified = last_modified_secs.and_then(|s| {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
        HeaderValue::from_str(&httpdate::fmt_http_date(t)).ok()
    });
    // The replayed header block carries our validators, so a hit only clones it.
    if let Some(e) = &etag {
        headers.insert(header::ETAG, e.clone());
    }
    if let Some(lm) = &last_modified {
        headers.insert(header::LAST_MODIFIED, lm.clone());
    }
    let weight = Entry::compute_weight(&headers, &body);
    Entry {
        status: StatusCode::OK,
        headers,
        body,
        etag,
        last_modified,
        last_modified_secs,
        updated_at: probe.updated_at,
        upstream_etag: upstream_headers.get(header::ETAG).cloned(),
        upstream_last_modified: upstream_headers.get(header::LAST_MODIFIED).cloned(),
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
    stamp: u64,
    policy: &CachePolicy,
    now: Instant,
) -> Entry {
    let headers = stored_headers(upstream_headers, body.len());
    let weight = Entry::compute_weight(&headers, &body);
    Entry {
        status,
        headers,
        body,
        etag: None,
        last_modified: None,
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
/// `Date` and validators replace the stored ones (RFC 9111 §4.3.4).
pub fn refreshed(
    prior: &Entry,
    not_modified: Option<&HeaderMap>,
    stamp: u64,
    now: Instant,
) -> Entry {
    let mut headers = prior.headers.clone();
    let mut upstream_etag = prior.upstream_etag.clone();
    if let Some(h) = not_modified {
        for name in [header::DATE, header::CACHE_CONTROL, header::EXPIRES] {
            if let Some(v) = h.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        if let Some(e) = h.get(header::ETAG) {
            upstream_etag = Some(e.clone());
        }
    }
    Entry {
        status: prior.status,
        headers,
        body: prior.body.clone(),
        etag: prior.etag.clone(),
        last_modified: prior.last_modified.clone(),
        last_modified_secs: prior.last_modified_secs,
        updated_at: prior.updated_at.clone(),
        upstream_etag,
        upstream_last_modified: prior.upstream_last_modified.clone(),
        stored_at: now,
        stamp,
        lifetime: prior.lifetime,
        weight: prior.weight,
        failure: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let s = stored_headers(&h, 10);
        assert!(!s.contains_key("set-cookie"));
        assert!(!s.contains_key("access-token"));
        assert!(!s.contains_key("etag"));
        assert_eq!(s["content-length"], "10");
        assert_eq!(s["cache-control"], "max-age=0, private, must-revalidate");
        assert!(s.contains_key("date"));
    }
}
