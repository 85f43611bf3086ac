//! Request classification (SPEC §3) and write-invalidation targets (SPEC §7.1).
//!
//! Classification looks at the *raw* path, before any decoding: only the one canonical spelling
//! of the conversation URL is ever answered from the cache, so no decoding trick can make the
//! proxy serve one conversation's body for another URL. Everything non-canonical is forwarded.
//!
//! Invalidation is the opposite: Rails decodes, squeezes slashes and reads `"02abc"` as `2`, so a
//! write must invalidate what *Rails* will modify, whatever spelling the client used. That side
//! is deliberately lenient ([`write_target`]).

use http::Method;

/// The SPEC §3 route a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Canonical `GET`/`HEAD /api/v1/accounts/{a}/conversations/{c}`, no query string.
    Conversation { account: u64, conversation: u64 },
    /// Any other request under the token-protected prefixes.
    Protected,
    /// Everything else: forwarded without token checks.
    Other,
}

/// Route label values used in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteLabel {
    Conversation = 0,
    Protected = 1,
    Other = 2,
}

impl RouteLabel {
    pub const ALL: [RouteLabel; 3] = [
        RouteLabel::Conversation,
        RouteLabel::Protected,
        RouteLabel::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Conversation => "conversation",
            RouteLabel::Protected => "protected",
            RouteLabel::Other => "other",
        }
    }
}

impl Route {
    pub fn label(&self) -> RouteLabel {
        match self {
            Route::Conversation { .. } => RouteLabel::Conversation,
            Route::Protected => RouteLabel::Protected,
            Route::Other => RouteLabel::Other,
        }
    }
}

const CONVERSATION_PREFIX: &str = "/api/v1/accounts/";
const PROTECTED_PREFIXES: [&str; 3] = ["/api/v1/accounts/", "/api/v2/accounts/", "/api/v1/profile"];

/// Classifies by method, raw path and whether a query string is present.
pub fn classify(method: &Method, path: &str, has_query: bool) -> Route {
    if (method == Method::GET || method == Method::HEAD)
        && !has_query
        && let Some((account, conversation)) = canonical_conversation(path)
    {
        return Route::Conversation {
            account,
            conversation,
        };
    }
    if PROTECTED_PREFIXES.iter().any(|p| path.starts_with(p)) {
        Route::Protected
    } else {
        Route::Other
    }
}

/// `/api/v1/accounts/{a}/conversations/{c}` with canonical ids, exactly.
///
/// Runs on every request (hits included): bytes compared in place, no `memchr` search set up
/// for an id of a few digits.
pub fn canonical_conversation(path: &str) -> Option<(u64, u64)> {
    let rest = path.strip_prefix(CONVERSATION_PREFIX)?.as_bytes();
    let slash = rest.iter().position(|&b| b == b'/')?;
    let conversation = rest[slash + 1..].strip_prefix(b"conversations/")?;
    Some((
        canonical_digits(&rest[..slash])?,
        canonical_digits(conversation)?,
    ))
}

/// A canonical decimal id: 1..=i64::MAX, ASCII digits only, no sign, no leading zero.
pub fn canonical_id(s: &str) -> Option<u64> {
    canonical_digits(s.as_bytes())
}

/// [`canonical_id`] of bytes, read in one pass.
fn canonical_digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || b[0] == b'0' {
        return None;
    }
    // At most 19 digits: below 10^19 < 2^64, no overflow.
    let mut n: u64 = 0;
    for &d in b {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(d - b'0');
    }
    (n <= i64::MAX as u64).then_some(n)
}

/// What a successful write invalidates (SPEC §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteTarget {
    /// Every scope of one conversation.
    Conversation { account: u64, conversation: u64 },
    /// Every entry of one account.
    Account { account: u64 },
}

/// Whether `method` is a write for invalidation purposes. `POST` with `X-HTTP-Method-Override`
/// or a form `_method` is still a `POST` here, so it is covered.
pub fn is_write(method: &Method) -> bool {
    method != Method::GET && method != Method::HEAD && method != Method::OPTIONS
}

/// The entries a 2xx write to `raw_path` invalidates, read the way Rails routes it: percent-
/// decoded, `//` squeezed, trailing `/` dropped, ids read like Ruby's `to_i` (`02`, `+2`, `2abc`
/// and `2.json` are all 2).
pub fn write_target(raw_path: &str) -> Option<WriteTarget> {
    let decoded = percent_decode(raw_path);
    let mut segments = decoded.split('/').filter(|s| !s.is_empty());
    if segments.next()? != "api" || segments.next()? != "v1" || segments.next()? != "accounts" {
        return None;
    }
    let account = rails_to_id(segments.next()?)?;
    match (segments.next(), segments.next()) {
        (Some("conversations"), Some(c)) => match rails_to_id(c) {
            Some(conversation) => Some(WriteTarget::Conversation {
                account,
                conversation,
            }),
            // `conversations/filter`, `conversations/meta` …: account-level actions.
            None => Some(WriteTarget::Account { account }),
        },
        _ => Some(WriteTarget::Account { account }),
    }
}

/// Ruby's lenient integer cast as ActiveModel applies it: `/\A\s*[+-]?\d/` must match, then the
/// leading digits count. Returns ids in 1..=i64::MAX only (anything else is a 404 upstream).
fn rails_to_id(s: &str) -> Option<u64> {
    let s = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let s = s.strip_prefix('+').unwrap_or(s);
    let digits: &str = &s[..s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len())];
    if digits.is_empty() {
        return None;
    }
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() || trimmed.len() > 19 {
        return None;
    }
    let n: u64 = trimmed.parse().ok()?;
    (n <= i64::MAX as u64).then_some(n)
}

/// Decodes `%xx` escapes; invalid escapes stay literal, invalid UTF-8 is replaced.
pub fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn get(path: &str) -> Route {
        let (p, q) = match path.split_once('?') {
            Some((p, _)) => (p, true),
            None => (path, false),
        };
        classify(&Method::GET, p, q)
    }

    #[test]
    fn conversation_route_is_exact() {
        assert_eq!(
            get("/api/v1/accounts/1/conversations/42"),
            Route::Conversation {
                account: 1,
                conversation: 42
            }
        );
        assert_eq!(
            get("/api/v1/accounts/9223372036854775807/conversations/1"),
            Route::Conversation {
                account: i64::MAX as u64,
                conversation: 1
            }
        );
        for p in [
            "/api/v1/accounts/1/conversations/42.json",
            "/api/v1/accounts/1/conversations/42/",
            "/api/v1/accounts/1/conversations/042",
            "/api/v1/accounts/01/conversations/42",
            "/api/v1/accounts/1/conversations/%342",
            "/api/v1/accounts/1/conversations/42?x=1",
            "/api/v1/accounts/1/conversations/+42",
            "/api/v1/accounts/1/conversations/0",
            "/api/v1/accounts/1/conversations/9223372036854775808",
            "/api/v1/accounts/1//conversations/42",
            "/api/v1/accounts/1/conversations/42/messages",
            "/api/v1/accounts/1/conversations/",
            "/api/v1/accounts/1/Conversations/42",
        ] {
            assert_eq!(get(p), Route::Protected, "{p}");
        }
        assert_eq!(
            classify(&Method::POST, "/api/v1/accounts/1/conversations/42", false),
            Route::Protected
        );
        assert!(matches!(
            classify(&Method::HEAD, "/api/v1/accounts/1/conversations/42", false),
            Route::Conversation { .. }
        ));
    }

    #[test]
    fn protected_and_other() {
        assert_eq!(get("/api/v2/accounts/1/reports"), Route::Protected);
        assert_eq!(get("/api/v1/profile"), Route::Protected);
        assert_eq!(get("/api/v1/widget/conversations"), Route::Other);
        assert_eq!(get("/cable"), Route::Other);
        assert_eq!(get("/public/api/v1/inboxes/x"), Route::Other);
        assert_eq!(get("/"), Route::Other);
    }

    #[test]
    fn write_targets_follow_rails() {
        let conv = |a, c| {
            Some(WriteTarget::Conversation {
                account: a,
                conversation: c,
            })
        };
        assert_eq!(
            write_target("/api/v1/accounts/1/conversations/2"),
            conv(1, 2)
        );
        assert_eq!(
            write_target("/api/v1/accounts/1/conversations/2/messages"),
            conv(1, 2)
        );
        assert_eq!(
            write_target("/api/v1/accounts/01/conversations/02.json"),
            conv(1, 2)
        );
        assert_eq!(
            write_target("/api//v1/accounts/1/conversations/2abc/"),
            conv(1, 2)
        );
        assert_eq!(
            write_target("/api/v1/accounts/1/conversations/%32"),
            conv(1, 2)
        );
        assert_eq!(
            write_target("/api/v1/accounts/1/conversations"),
            Some(WriteTarget::Account { account: 1 })
        );
        assert_eq!(
            write_target("/api/v1/accounts/1/bulk_actions"),
            Some(WriteTarget::Account { account: 1 })
        );
        assert_eq!(
            write_target("/api/v1/accounts/7"),
            Some(WriteTarget::Account { account: 7 })
        );
        assert_eq!(write_target("/api/v1/accounts/abc/conversations/2"), None);
        assert_eq!(write_target("/api/v1/accounts/-1/conversations/2"), None);
        assert_eq!(write_target("/api/v1/profile"), None);
        assert_eq!(write_target("/api/v1/widget/conversations/1"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("/a%2Fb%zz%4"), "/a/b%zz%4");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
    }

    proptest! {
        /// Only the canonical decimal spelling is ever a conversation route.
        #[test]
        fn canonical_ids_round_trip(n in 1u64..=i64::MAX as u64) {
            prop_assert_eq!(canonical_id(&n.to_string()), Some(n));
            let zero_padded = format!("0{n}");
            prop_assert_eq!(canonical_id(&zero_padded), None);
        }

        /// The one-pass reader accepts exactly what the previous rule did (all ASCII digits,
        /// at most 19, no leading zero, `str::parse`, at most i64::MAX), for spellings near
        /// every edge: signs, percent-escapes, non-ASCII digits, slashes, 19-21 digits.
        #[test]
        fn canonical_ids_as_the_previous_rule(s in "[0-9١+%/ -]{0,3}|[1-9][0-9]{17,20}|9223372036854775[0-9]{3}|[0-9]{0,21}") {
            let b = s.as_bytes();
            let previous = if b.is_empty() || b.len() > 19 || b[0] == b'0' || !b.iter().all(u8::is_ascii_digit) {
                None
            } else {
                s.parse::<u64>().ok().filter(|&n| n <= i64::MAX as u64)
            };
            prop_assert_eq!(canonical_id(&s), previous, "{:?}", s);
        }

        #[test]
        fn classify_never_panics(path in "\\PC*", q in any::<bool>()) {
            let _ = classify(&Method::GET, &path, q);
            let _ = write_target(&path);
        }

        /// A conversation route always re-renders to the exact path it came from.
        #[test]
        fn conversation_route_is_injective(path in "/api/v1/accounts/[0-9+%a-z]{1,4}/conversations/[0-9.%/]{1,5}") {
            if let Route::Conversation { account, conversation } = classify(&Method::GET, &path, false) {
                prop_assert_eq!(format!("/api/v1/accounts/{account}/conversations/{conversation}"), path);
            }
        }
    }
}
