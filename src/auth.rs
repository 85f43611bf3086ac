//! Token validation (SPEC §4) and the token *scope* that keys the cache.
//!
//! Header names are matched the way Rack/Puma see them: case-insensitively with `_` and `-`
//! equivalent. Two spellings in one request are refused, otherwise the proxy could scope an entry
//! by one value while Chatwoot authenticates the other.
//!
//! The scope is HMAC-SHA256(random start-up key, token) truncated to 128 bits: a collision would
//! hand one user another user's data, so 64 bits is not enough; the raw token never becomes a key.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use ring::hmac;
use ring::rand::SystemRandom;
use tokio::time::Instant;

/// Longest token value accepted (Chatwoot's are 24 characters).
pub const MAX_TOKEN_LEN: usize = 256;

/// The configured token header, pre-normalised for matching.
#[derive(Debug, Clone)]
pub struct TokenHeader {
    name: HeaderName,
    normalized: Vec<u8>,
}

impl TokenHeader {
    pub fn new(name: HeaderName) -> Self {
        let normalized = normalize(name.as_str().as_bytes());
        TokenHeader { name, normalized }
    }

    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// Whether a header name is this header as Rack sees it.
    pub fn matches(&self, candidate: &HeaderName) -> bool {
        same_rack_header(candidate.as_str().as_bytes(), &self.normalized)
    }
}

fn normalize(name: &[u8]) -> Vec<u8> {
    name.iter()
        .map(|&b| {
            if b == b'-' {
                b'_'
            } else {
                b.to_ascii_lowercase()
            }
        })
        .collect()
}

/// `candidate` equals the already-normalised `target` under Rack's rules.
fn same_rack_name(candidate: &[u8], target: &[u8]) -> bool {
    candidate.len() == target.len()
        && candidate.iter().zip(target).all(|(&c, &t)| {
            let c = if c == b'-' {
                b'_'
            } else {
                c.to_ascii_lowercase()
            };
            c == t
        })
}

/// [`same_rack_name`] for a header name, which the `http` crate keeps lowercase: a plain
/// comparison for the usual spelling, `-` for `_` otherwise (on every request, for every header).
fn same_rack_header(name: &[u8], target: &[u8]) -> bool {
    name.len() == target.len()
        && (name == target
            || name
                .iter()
                .zip(target)
                .all(|(&c, &t)| c == t || (c == b'-' && t == b'_')))
}

/// What a request presents as credentials.
#[derive(Debug, PartialEq, Eq)]
pub enum Credentials<'a> {
    /// Exactly one well-formed token header (alone, or with `Authorization: Bearer <it>`).
    Token(&'a HeaderValue),
    /// devise_token_auth or `Authorization`, alone or mixed with a token: forwarded untouched,
    /// never cached.
    Alternate,
    /// No token header, or an empty one.
    Missing,
    /// More than one token header, too long, or a byte outside 0x21..=0x7E.
    Malformed,
}

/// Inspects the headers (and query, where devise also reads its credentials).
///
/// Chatwoot authenticates by the token alone only when devise_token_auth finds no user: no
/// devise credential and no `Authorization` it could decode. `Authorization: Bearer <the same
/// token>` is what `@figuro/chatwoot-sdk` sends with every call; devise cannot read a user
/// from it, so it is the one companion a cached token request may have (SPEC §4). Anything
/// else beside a token mixes two identities and is passed through.
pub fn inspect<'a>(
    headers: &'a HeaderMap,
    query: Option<&str>,
    th: &TokenHeader,
) -> Credentials<'a> {
    let mut token: Option<&HeaderValue> = None;
    let mut token_count = 0usize;
    let mut authorization: Option<&HeaderValue> = None;
    let mut authorization_count = 0usize;
    let mut devise = [false; 3];
    for (name, value) in headers.iter() {
        if th.matches(name) {
            token_count += 1;
            token = Some(value);
            continue;
        }
        let n = name.as_str().as_bytes();
        if n == b"authorization" {
            authorization_count += 1;
            authorization = Some(value);
            continue;
        }
        for (i, d) in DEVISE.iter().enumerate() {
            if same_rack_header(n, d) {
                devise[i] = true;
            }
        }
    }
    if let Some(q) = query {
        for pair in q.split('&') {
            let key = pair.split('=').next().unwrap_or("");
            let key = crate::routing::percent_decode(key);
            for (i, d) in DEVISE.iter().enumerate() {
                if same_rack_name(key.as_bytes(), d) {
                    devise[i] = true;
                }
            }
        }
    }
    // Chatwoot's `authenticate_by_access_token?` is `present?`: an empty token header is no
    // token, and the request is devise's to authenticate.
    let value = match token {
        Some(v) if token_count > 1 || !v.is_empty() => v,
        _ => {
            // devise needs `access-token` and `uid`; a missing `client` defaults to "default".
            let devise_credentials = devise[ACCESS_TOKEN] && devise[UID];
            return if authorization.is_some() || devise_credentials {
                Credentials::Alternate
            } else {
                Credentials::Missing
            };
        }
    };
    // More than one token header is malformed whatever comes with it (SPEC §4): which one
    // Chatwoot reads depends on Rack and Puma, not on the proxy.
    if token_count > 1 {
        return Credentials::Malformed;
    }
    if devise.iter().any(|&d| d) {
        return Credentials::Alternate;
    }
    if let Some(auth) = authorization
        && !(authorization_count == 1 && is_bearer_of(auth, value))
    {
        return Credentials::Alternate;
    }
    if is_well_formed(value.as_bytes()) {
        Credentials::Token(value)
    } else {
        Credentials::Malformed
    }
}

/// The one well-formed token header of a request that also carries another credential
/// ([`Credentials::Alternate`]): such a request is never cached, but Chatwoot still reads the
/// token, so its upstream slot and rate are charged to the token's scope (SPEC 12) rather than
/// letting one added header escape them.
pub fn token_beside<'a>(headers: &'a HeaderMap, th: &TokenHeader) -> Option<&'a HeaderValue> {
    let mut found = None;
    for (name, value) in headers.iter() {
        if th.matches(name) {
            if found.is_some() {
                return None;
            }
            found = Some(value);
        }
    }
    found.filter(|v| !v.is_empty() && is_well_formed(v.as_bytes()))
}

/// `authorization` is exactly `Bearer <token>`.
fn is_bearer_of(authorization: &HeaderValue, token: &HeaderValue) -> bool {
    const SCHEME: &[u8] = b"Bearer ";
    let (a, t) = (authorization.as_bytes(), token.as_bytes());
    a.len() == SCHEME.len() + t.len() && a.starts_with(SCHEME) && &a[SCHEME.len()..] == t
}

/// devise_token_auth's credential names, Rack-normalised.
const DEVISE: [&[u8]; 3] = [b"access_token", b"client", b"uid"];
const ACCESS_TOKEN: usize = 0;
const UID: usize = 2;

fn is_well_formed(token: &[u8]) -> bool {
    // Without an early exit, so the check vectorises.
    token.len() <= MAX_TOKEN_LEN
        && token
            .iter()
            .fold(true, |ok, &b| ok & (0x21..=0x7e).contains(&b))
}

/// A token's cache scope: 128 bits of a keyed hash. Never reversible to the token.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(pub u128);

impl std::fmt::Debug for Scope {
    // Even the hash is kept out of logs: it is a stable per-token identifier.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scope(..)")
    }
}

/// Derives scopes with a key drawn at start-up, so scopes mean nothing outside this process.
pub struct Scoper {
    key: hmac::Key,
}

impl Scoper {
    /// A fresh random key. Fails only if the OS has no randomness.
    pub fn random() -> Result<Self, ring::error::Unspecified> {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())?;
        Ok(Scoper { key })
    }

    /// A key derived from `--scope-secret`, so every replica computes the same scopes (SPEC 11).
    /// Derived, not the secret itself: the secret also keys the shared values' HMAC.
    pub fn from_secret(secret: &[u8]) -> Self {
        let derive = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let key = hmac::sign(&derive, b"chatwoot-cache token scope v1");
        Scoper {
            key: hmac::Key::new(hmac::HMAC_SHA256, key.as_ref()),
        }
    }

    pub fn scope(&self, token: &[u8]) -> Scope {
        let tag = hmac::sign(&self.key, token);
        let mut first = [0u8; 16];
        first.copy_from_slice(&tag.as_ref()[..16]);
        Scope(u128::from_be_bytes(first))
    }
}

/// The last token one client connection presented, and its scope. Clients poll over keep-alive
/// connections with one token, so most requests present the token of the request before:
/// this skips the keyed hash for them. A different token is hashed (and remembered) as usual,
/// so a connection carrying many users' tokens (a shared ingress) is still scoped per token.
///
/// Per connection and never shared between threads (`Cell`): the comparison runs against
/// the previous token of the same connection only, without an early exit.
#[derive(Default)]
pub struct ScopeMemo(Cell<MemoSlot>);

#[derive(Default)]
struct MemoSlot {
    token: Vec<u8>,
    scope: Option<Scope>,
}

impl ScopeMemo {
    pub fn scope(&self, scoper: &Scoper, token: &[u8]) -> Scope {
        let mut slot = self.0.take();
        let scope = match slot.scope {
            Some(scope) if same_bytes(&slot.token, token) => scope,
            _ => {
                let scope = scoper.scope(token);
                slot.token.clear();
                slot.token.extend_from_slice(token);
                slot.scope = Some(scope);
                scope
            }
        };
        self.0.set(slot);
        scope
    }
}

/// Byte equality without an early exit on the first difference.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Tokens the upstream called "Invalid Access Token", refused locally for a while.
pub struct InvalidTokens {
    /// `--auth-negative-ttl` in milliseconds; live (a reload sets it), read only on insert.
    ttl_ms: AtomicU64,
    until: moka::sync::Cache<Scope, Refusal>,
    /// Milliseconds after `base` (plus one; 0 = never) at which the latest refusal remembered
    /// ends. With none running (the normal state) a lookup is skipped: one atomic load instead
    /// of a second map lookup on every cache hit.
    base: Instant,
    last_until_ms: AtomicU64,
}

#[derive(Clone, Copy)]
struct Refusal {
    until: Instant,
    ttl: Duration,
}

/// Each refusal leaves the map after its own TTL (the one in force when it was made).
struct RefusalExpiry;

impl moka::Expiry<Scope, Refusal> for RefusalExpiry {
    fn expire_after_create(
        &self,
        _key: &Scope,
        value: &Refusal,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl InvalidTokens {
    pub fn new(ttl: Duration) -> Self {
        let until = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .expire_after(RefusalExpiry)
            .build();
        let tokens = InvalidTokens {
            ttl_ms: AtomicU64::new(0),
            until,
            base: Instant::now(),
            last_until_ms: AtomicU64::new(0),
        };
        tokens.set_ttl(ttl);
        tokens
    }

    /// Changes `--auth-negative-ttl` for refusals remembered from now on.
    pub fn set_ttl(&self, ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.ttl_ms.store(ms, Ordering::Relaxed);
    }

    fn ms_since_base(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }

    /// Remembers `scope` as invalid (no-op when `--auth-negative-ttl` is 0).
    pub fn insert(&self, scope: Scope) {
        let ttl_ms = self.ttl_ms.load(Ordering::Relaxed);
        if ttl_ms == 0 {
            return;
        }
        let ttl = Duration::from_millis(ttl_ms);
        let now = Instant::now();
        let until = now + ttl;
        self.until.insert(scope, Refusal { until, ttl });
        // Rounded up by a millisecond: allow one extra ms rather than skip a live refusal.
        let stamp = self.ms_since_base(until).saturating_add(1);
        self.last_until_ms.fetch_max(stamp, Ordering::Release);
    }

    pub fn contains(&self, scope: Scope) -> bool {
        let last = self.last_until_ms.load(Ordering::Acquire);
        if last == 0 {
            return false;
        }
        let now = Instant::now();
        if self.ms_since_base(now) > last {
            return false;
        }
        match self.until.get(&scope) {
            Some(refusal) => now < refusal.until,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn th() -> TokenHeader {
        TokenHeader::new(HeaderName::from_static("api_access_token"))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn spellings_are_equivalent() {
        for name in [
            "api_access_token",
            "Api-Access-Token",
            "API_ACCESS_TOKEN",
            "api-access_token",
        ] {
            let h = headers(&[(name, "abc")]);
            assert!(
                matches!(inspect(&h, None, &th()), Credentials::Token(_)),
                "{name}"
            );
        }
        assert_eq!(
            inspect(
                &headers(&[("api-access-token", "a"), ("api_access_token", "a")]),
                None,
                &th()
            ),
            Credentials::Malformed
        );
        assert_eq!(
            inspect(
                &headers(&[("api_access_token", "a"), ("api_access_token", "b")]),
                None,
                &th()
            ),
            Credentials::Malformed
        );
    }

    #[test]
    fn missing_and_malformed() {
        assert_eq!(inspect(&headers(&[]), None, &th()), Credentials::Missing);
        assert_eq!(
            inspect(&headers(&[("api_access_token", "")]), None, &th()),
            Credentials::Missing
        );
        let long = "a".repeat(257);
        assert_eq!(
            inspect(&headers(&[("api_access_token", &long)]), None, &th()),
            Credentials::Malformed
        );
        let ok = "a".repeat(256);
        assert!(matches!(
            inspect(&headers(&[("api_access_token", &ok)]), None, &th()),
            Credentials::Token(_)
        ));
        for bad in ["a b", "a\tb", " a", "a\u{80}"] {
            let mut h = HeaderMap::new();
            h.insert(
                "api_access_token",
                HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            );
            assert_eq!(inspect(&h, None, &th()), Credentials::Malformed, "{bad:?}");
        }
        // The printable range's ends are accepted.
        assert!(matches!(
            inspect(&headers(&[("api_access_token", "!~!~")]), None, &th()),
            Credentials::Token(_)
        ));
        let mut h = HeaderMap::new();
        h.insert(
            "api_access_token",
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert_eq!(inspect(&h, None, &th()), Credentials::Malformed);
    }

    #[test]
    fn a_bearer_of_the_same_token_is_a_token_request() {
        let h = headers(&[("api_access_token", "t0k"), ("authorization", "Bearer t0k")]);
        assert_eq!(
            inspect(&h, None, &th()),
            Credentials::Token(&HeaderValue::from_static("t0k"))
        );
        // Order and the token header's spelling do not matter.
        let h = headers(&[("authorization", "Bearer t0k"), ("Api-Access-Token", "t0k")]);
        assert!(matches!(inspect(&h, None, &th()), Credentials::Token(_)));
        // Validated like a token-only request.
        let long = "a".repeat(257);
        let bearer = format!("Bearer {long}");
        let h = headers(&[("api_access_token", &long), ("authorization", &bearer)]);
        assert_eq!(inspect(&h, None, &th()), Credentials::Malformed);
    }

    #[test]
    fn a_token_with_any_other_credential_is_passed_through() {
        for auth in [
            "Bearer other",
            "Bearer t0k ",
            "Bearer  t0k",
            "bearer t0k",
            "Bearer t0",
            "Bearer t0kk",
            "Basic dDBr",
            "t0k",
            "",
        ] {
            let h = headers(&[("api_access_token", "t0k"), ("authorization", auth)]);
            assert_eq!(inspect(&h, None, &th()), Credentials::Alternate, "{auth:?}");
        }
        let h = headers(&[
            ("api_access_token", "t0k"),
            ("authorization", "Bearer t0k"),
            ("authorization", "Bearer t0k"),
        ]);
        assert_eq!(inspect(&h, None, &th()), Credentials::Alternate);
        for devise in ["access-token", "client", "uid", "Access_Token", "UID"] {
            let h = headers(&[("api_access_token", "t0k"), (devise, "x")]);
            assert_eq!(inspect(&h, None, &th()), Credentials::Alternate, "{devise}");
            let h = headers(&[
                ("api_access_token", "t0k"),
                ("authorization", "Bearer t0k"),
                (devise, "x"),
            ]);
            assert_eq!(inspect(&h, None, &th()), Credentials::Alternate, "{devise}");
        }
        for query in ["uid=a%40b", "access-token=x", "a=1&client=c"] {
            let h = headers(&[("api_access_token", "t0k")]);
            assert_eq!(
                inspect(&h, Some(query), &th()),
                Credentials::Alternate,
                "{query}"
            );
        }
        // A query without devise names changes nothing.
        let h = headers(&[("api_access_token", "t0k")]);
        assert!(matches!(
            inspect(&h, Some("locale=fr"), &th()),
            Credentials::Token(_)
        ));
    }

    /// SPEC §4: more than one token header is `malformed_token`, whatever comes with it.
    #[test]
    fn two_token_headers_are_malformed_whatever_comes_with_them() {
        for extra in [
            ("authorization", "Bearer t0k"),
            ("authorization", "Bearer other"),
            ("access-token", "x"),
            ("uid", "u"),
        ] {
            for second in ["api-access-token", "api_access_token"] {
                let h = headers(&[("api_access_token", "t0k"), (second, "t0k"), extra]);
                assert_eq!(
                    inspect(&h, None, &th()),
                    Credentials::Malformed,
                    "{second} {extra:?}"
                );
            }
        }
        let h = headers(&[
            ("authorization", "Bearer t0k"),
            ("api_access_token", ""),
            ("Api-Access-Token", "t0k"),
        ]);
        assert_eq!(inspect(&h, None, &th()), Credentials::Malformed);
    }

    #[test]
    fn alternate_auth_alone() {
        let h = headers(&[("authorization", "Bearer x")]);
        assert_eq!(inspect(&h, None, &th()), Credentials::Alternate);
        // An empty token header is no token (Rails' `present?`): devise decides.
        let h = headers(&[("api_access_token", ""), ("authorization", "Bearer x")]);
        assert_eq!(inspect(&h, None, &th()), Credentials::Alternate);
        let h = headers(&[("access-token", "x"), ("client", "c"), ("uid", "u")]);
        assert_eq!(inspect(&h, None, &th()), Credentials::Alternate);
        // devise's `client` defaults to "default".
        let h = headers(&[("access-token", "x"), ("uid", "u")]);
        assert_eq!(inspect(&h, None, &th()), Credentials::Alternate);
        let h = headers(&[("access-token", "x")]);
        assert_eq!(inspect(&h, None, &th()), Credentials::Missing);
        let h = headers(&[("client", "c"), ("uid", "u")]);
        assert_eq!(inspect(&h, None, &th()), Credentials::Missing);
        let h = headers(&[]);
        assert_eq!(
            inspect(&h, Some("access-token=x&client=c&uid=u%40x"), &th()),
            Credentials::Alternate
        );
    }

    #[test]
    fn custom_header() {
        let th = TokenHeader::new(HeaderName::from_static("x-chatwoot-token"));
        let h = headers(&[("X_Chatwoot_Token", "t")]);
        assert!(matches!(inspect(&h, None, &th), Credentials::Token(_)));
    }

    #[test]
    fn the_memo_reuses_a_scope_only_for_the_same_token() {
        let scoper = Scoper::random().unwrap();
        let memo = ScopeMemo::default();
        let a = memo.scope(&scoper, b"token-a");
        assert_eq!(a, scoper.scope(b"token-a"));
        assert_eq!(memo.scope(&scoper, b"token-a"), a);
        let b = memo.scope(&scoper, b"token-b");
        assert_eq!(b, scoper.scope(b"token-b"));
        assert_ne!(a, b);
        // A prefix, an extension and a same-length sibling are other tokens.
        assert_eq!(memo.scope(&scoper, b"token-"), scoper.scope(b"token-"));
        assert_eq!(memo.scope(&scoper, b"token-bb"), scoper.scope(b"token-bb"));
        assert_eq!(memo.scope(&scoper, b"token-c"), scoper.scope(b"token-c"));
        assert_eq!(memo.scope(&scoper, b"token-a"), a);
    }

    #[test]
    fn a_secret_gives_every_replica_the_same_scopes() {
        let secret = [3u8; 32];
        let a = Scoper::from_secret(&secret);
        let b = Scoper::from_secret(&secret);
        assert_eq!(a.scope(b"tok"), b.scope(b"tok"));
        assert_ne!(
            a.scope(b"tok"),
            Scoper::from_secret(&[4u8; 32]).scope(b"tok")
        );
    }

    #[test]
    fn scopes_are_keyed() {
        let a = Scoper::random().unwrap();
        let b = Scoper::random().unwrap();
        assert_eq!(a.scope(b"tok"), a.scope(b"tok"));
        assert_ne!(a.scope(b"tok"), a.scope(b"tok2"));
        assert_ne!(a.scope(b"tok"), b.scope(b"tok"));
        assert_eq!(format!("{:?}", a.scope(b"tok")), "Scope(..)");
    }
}
