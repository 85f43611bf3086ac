//! Cache admission (SPEC §5): what one upstream answer on the conversation route does to the
//! store, decided by a pure function.
//!
//! [`admit`] takes the entry being revalidated (if any), the answer's status, headers and whole
//! body, and returns an [`Admission`]; [`super::Store::apply`] carries it out. The HTTP exchange
//! (sending, reading the body within its deadline and size limit, the breaker, metrics of the
//! exchange) stays in `proxy::conversation`, which only speaks HTTP and applies the decision.
//! This is the split pingora makes between pingora-cache (what is cacheable, how a stored object
//! is refreshed) and pingora-proxy's `proxy_cache.rs` (driving the exchange). The shared tier
//! (SPEC 11) writes what `apply` stores, so it sees the same decisions.

use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use tokio::time::Instant;

use super::coding::Coding;
use super::rules::{self, is_invalid_token_body, negative_entry, positive_entry, refreshed};
use super::{CacheKey, CachePolicy, Entry};
use crate::invalidation::Stamp;
use crate::metrics::RevalidationOutcome;

/// What an answer is judged against.
pub struct Admit<'a> {
    pub key: &'a CacheKey,
    /// The stored positive entry this fetch revalidates, if any.
    pub prior: Option<&'a Entry>,
    /// The generations read before the fetch began: what is stored carries them, so a fetch
    /// that raced an invalidation stores nothing ([`super::Store::insert`]).
    pub stamp: &'a Stamp,
    pub policy: &'a CachePolicy,
    /// When the answer arrived: a new entry's age counts from here.
    pub now: Instant,
    /// The form the fetching client prefers (SPEC 14): a new entry is built with it, the other
    /// form when a client first asks for it.
    pub form: Coding,
}

/// The decision for one upstream answer.
#[derive(Debug)]
pub enum Admission {
    /// A storable `200` with a new body: the first store, or a changed body replacing the prior.
    Store(Entry),
    /// The upstream confirmed the prior: a fresh copy of it (or of the identical new answer).
    Refresh { entry: Entry, how: Confirmed },
    /// A `200` whose `updated_at` is older than the prior's: `updated_at` only moves forward, so
    /// the prior is kept, made fresh again.
    KeepOlder(Entry),
    /// A `404`, or a `401` about this conversation rather than the token: remembered for
    /// `--negative-ttl`, replacing anything stored for the key.
    Negative(Entry),
    /// The same with `--negative-ttl 0`: whatever is stored for the key is dropped.
    Remove,
    /// `401 {"error":"Invalid Access Token"}`: the token is dead. Its scope's entries are
    /// dropped by the proxy's token refusal (with the local refusal of the token), not here.
    TokenRefused,
    /// Not stored; forwarded as it is.
    Pass(Pass),
}

/// How the upstream confirmed a stored entry (SPEC §5 revalidation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// `304 Not Modified`.
    NotModified,
    /// A `200` with the same `updated_at` and identical bytes.
    Unchanged,
}

/// What a forwarded, unstored answer means for the stored entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// An upstream failure (5xx, 429): the stored entry stays, for stale-if-error.
    Failure,
    /// An answer that is neither storable nor a failure (403, 3xx, a `200` that is not this
    /// conversation, encoded or too large): the stored entry no longer describes what Chatwoot
    /// says and is dropped, not even served stale.
    Supersedes,
    /// The same, with nothing stored to drop.
    Plain,
}

impl Admission {
    /// The `revalidations_total` outcome, for a fetch that revalidated a stored entry.
    pub fn revalidation(&self) -> RevalidationOutcome {
        match self {
            Admission::Refresh {
                how: Confirmed::NotModified,
                ..
            } => RevalidationOutcome::NotModified,
            Admission::Refresh {
                how: Confirmed::Unchanged,
                ..
            } => RevalidationOutcome::Unchanged,
            Admission::KeepOlder(_) => RevalidationOutcome::Older,
            Admission::Pass(Pass::Failure) => RevalidationOutcome::Error,
            Admission::Store(_)
            | Admission::Negative(_)
            | Admission::Remove
            | Admission::TokenRefused
            | Admission::Pass(Pass::Supersedes | Pass::Plain) => RevalidationOutcome::Changed,
        }
    }
}

/// Whether an upstream status is a failure that stale-if-error covers (SPEC §5: 5xx and 429;
/// authorization answers never are).
pub fn is_upstream_failure(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// Whether the answer carries a `Content-Encoding` other than identity (never stored: SPEC §5).
pub fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// Decides what a complete upstream answer does to the store (SPEC §4, §5).
pub fn admit(at: &Admit<'_>, status: StatusCode, headers: &HeaderMap, body: &Bytes) -> Admission {
    let Admit {
        key,
        prior,
        stamp,
        policy,
        now,
        form,
    } = *at;
    if status == StatusCode::NOT_MODIFIED
        && let Some(prior) = prior
    {
        let entry = refreshed(prior, Some(headers), stamp.clone(), now);
        return Admission::Refresh {
            entry,
            how: Confirmed::NotModified,
        };
    }
    match status {
        StatusCode::OK if !is_encoded(headers) && body.len() as u64 <= policy.max_object_bytes => {
            let Some(probe) = rules::probe(body, key.account, key.conversation) else {
                return not_storable(prior.is_some());
            };
            if let Some(prior) = prior
                && let (Some(old), Some(new)) = (&prior.updated_at(), &probe.updated_at)
                && new < old
            {
                return Admission::KeepOlder(refreshed(prior, None, stamp.clone(), now));
            }
            let updated_at_same = prior.is_some_and(|p| p.updated_at() == probe.updated_at);
            // Identity clients read this key (the prior has its identity copy): the new entry
            // gets one too, from the bytes at hand, whoever fetched. Otherwise a gzip client's
            // unchanged revalidation would drop the copy, and the next identity hit decompress
            // and replace the entry again, every TTL.
            let form = if prior.is_some_and(|p| p.identity_copy().is_some()) {
                Coding::Identity
            } else {
                form
            };
            let entry = positive_entry(
                headers,
                body.clone(),
                probe,
                stamp.clone(),
                policy,
                now,
                form,
            );
            // Identical bytes: the same length and SHA-256 (the stored body may be compressed).
            if let Some(prior) = prior
                && updated_at_same
                && prior.identity_len == entry.identity_len
                && prior.digest() == entry.digest()
            {
                return Admission::Refresh {
                    entry,
                    how: Confirmed::Unchanged,
                };
            }
            Admission::Store(entry)
        }
        StatusCode::UNAUTHORIZED if is_invalid_token_body(body) => Admission::TokenRefused,
        StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED => {
            // This user may not see this conversation (or it is gone): remember that for
            // --negative-ttl, and never keep serving an older 200 for the key.
            if policy.negative_ttl.is_zero() {
                Admission::Remove
            } else {
                Admission::Negative(negative_entry(
                    status,
                    headers,
                    body.clone(),
                    stamp.clone(),
                    policy,
                    now,
                ))
            }
        }
        _ if is_upstream_failure(status) => Admission::Pass(Pass::Failure),
        _ => not_storable(prior.is_some()),
    }
}

/// The decision for an answer whose body exceeds `--max-object-bytes` (not read whole, so not
/// given to [`admit`]): forwarded; a failure keeps the stored entry, anything else supersedes it.
pub fn admit_oversized(had_prior: bool, status: StatusCode) -> Admission {
    if is_upstream_failure(status) {
        Admission::Pass(Pass::Failure)
    } else {
        not_storable(had_prior)
    }
}

fn not_storable(had_prior: bool) -> Admission {
    Admission::Pass(if had_prior {
        Pass::Supersedes
    } else {
        Pass::Plain
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;
    use crate::invalidation::Generations;
    use http::HeaderValue;
    use std::time::Duration;

    const KEY: CacheKey = CacheKey {
        account: 1,
        conversation: 42,
        scope: Scope(7),
    };

    fn policy(negative_ttl: u64) -> CachePolicy {
        CachePolicy {
            ttl: Duration::from_secs(10),
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(negative_ttl),
            max_object_bytes: 200,
            refresh_ahead: None,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    http::HeaderName::from_static(n),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    fn body(updated_at: &str, extra: &str) -> Bytes {
        Bytes::from(format!(
            r#"{{"id":42,"account_id":1,"updated_at":{updated_at}{extra}}}"#
        ))
    }

    /// Runs [`admit`] with a stored entry of body `prior` (if any).
    fn decide(
        prior: Option<&Bytes>,
        negative_ttl: u64,
        status: u16,
        head: &HeaderMap,
        answer: &Bytes,
    ) -> Admission {
        let generations = Generations::new();
        let stamp = generations.stamp(1, 42, KEY.scope);
        let policy = policy(negative_ttl);
        let now = Instant::now();
        let prior = prior.map(|b| {
            let probe = rules::probe(b, 1, 42).expect("a storable prior");
            positive_entry(
                &HeaderMap::new(),
                b.clone(),
                probe,
                stamp.clone(),
                &policy,
                now,
                Coding::Gzip,
            )
        });
        let at = Admit {
            key: &KEY,
            prior: prior.as_ref(),
            stamp: &stamp,
            policy: &policy,
            now,
            form: Coding::Gzip,
        };
        admit(&at, StatusCode::from_u16(status).unwrap(), head, answer)
    }

    fn kind(a: &Admission) -> String {
        match a {
            Admission::Store(_) => "store".into(),
            Admission::Refresh {
                how: Confirmed::NotModified,
                ..
            } => "refresh-304".into(),
            Admission::Refresh {
                how: Confirmed::Unchanged,
                ..
            } => "refresh-same".into(),
            Admission::KeepOlder(_) => "keep-older".into(),
            Admission::Negative(e) => format!("negative-{}", e.status.as_u16()),
            Admission::Remove => "remove".into(),
            Admission::TokenRefused => "token-refused".into(),
            Admission::Pass(p) => format!("pass-{p:?}").to_lowercase(),
        }
    }

    /// The whole decision table: every status class and body case, with and without a stored
    /// entry, with negative caching on and off.
    #[test]
    fn decision_table() {
        let none = HeaderMap::new();
        let gzip = headers(&[("content-encoding", "gzip")]);
        let identity = headers(&[("content-encoding", "identity")]);
        let old = body("1765182000.482917", "");
        let same = old.clone();
        let newer = body("1765182000.482918", "");
        let older = body("1765182000.482916", "");
        let same_time_other_bytes = body("1765182000.482917", r#","status":"open""#);
        let no_updated_at = Bytes::from_static(br#"{"id":42}"#);
        let other_id = Bytes::from_static(br#"{"id":43,"updated_at":1}"#);
        let other_account = Bytes::from_static(br#"{"id":42,"account_id":2}"#);
        let not_json = Bytes::from_static(b"<html>maintenance</html>");
        let too_large = body("1765182001", &format!(r#","x":"{}""#, "a".repeat(200)));
        let invalid_token = Bytes::from_static(br#"{"error":"Invalid Access Token"}"#);
        let forbidden_401 =
            Bytes::from_static(br#"{"error":"You are not authorized to do this action"}"#);
        let empty = Bytes::new();

        /// (stored body, --negative-ttl, status, headers, body, decision)
        type Row<'a> = (
            Option<&'a Bytes>,
            u64,
            u16,
            &'a HeaderMap,
            &'a Bytes,
            &'a str,
        );
        #[rustfmt::skip]
        let table: Vec<Row<'_>> = vec![
            // Storable 200s.
            (None,        5, 200, &none,     &old,                   "store"),
            (None,        5, 200, &identity, &old,                   "store"),
            (None,        5, 200, &none,     &no_updated_at,         "store"),
            (Some(&old),  5, 200, &none,     &newer,                 "store"),
            (Some(&old),  5, 200, &none,     &same_time_other_bytes, "store"),
            (Some(&old),  5, 200, &none,     &same,                  "refresh-same"),
            (Some(&old),  5, 200, &none,     &older,                 "keep-older"),
            (Some(&old),  5, 200, &none,     &no_updated_at,         "store"),
            // 200s that cannot be stored.
            (None,        5, 200, &gzip,     &old,                   "pass-plain"),
            (Some(&old),  5, 200, &gzip,     &old,                   "pass-supersedes"),
            (Some(&old),  5, 200, &none,     &other_id,              "pass-supersedes"),
            (None,        5, 200, &none,     &other_account,         "pass-plain"),
            (Some(&old),  5, 200, &none,     &not_json,              "pass-supersedes"),
            (Some(&old),  5, 200, &none,     &too_large,             "pass-supersedes"),
            (None,        5, 200, &none,     &too_large,             "pass-plain"),
            // Revalidation answers.
            (Some(&old),  5, 304, &none,     &empty,                 "refresh-304"),
            (None,        5, 304, &none,     &empty,                 "pass-plain"),
            // Authorization answers: never overridden by stale data.
            (None,        5, 404, &none,     &empty,                 "negative-404"),
            (Some(&old),  5, 404, &none,     &empty,                 "negative-404"),
            (Some(&old),  0, 404, &none,     &empty,                 "remove"),
            (None,        0, 404, &none,     &empty,                 "remove"),
            (Some(&old),  5, 401, &none,     &forbidden_401,         "negative-401"),
            (None,        0, 401, &none,     &forbidden_401,         "remove"),
            (Some(&old),  5, 401, &none,     &invalid_token,         "token-refused"),
            (None,        0, 401, &none,     &invalid_token,         "token-refused"),
            (Some(&old),  5, 403, &none,     &empty,                 "pass-supersedes"),
            (None,        5, 403, &none,     &empty,                 "pass-plain"),
            // Failures keep the stored entry for stale-if-error.
            (Some(&old),  5, 500, &none,     &empty,                 "pass-failure"),
            (Some(&old),  5, 502, &none,     &not_json,              "pass-failure"),
            (Some(&old),  5, 503, &none,     &empty,                 "pass-failure"),
            (None,        5, 504, &none,     &empty,                 "pass-failure"),
            (Some(&old),  5, 429, &none,     &empty,                 "pass-failure"),
            // Anything else supersedes.
            (Some(&old),  5, 301, &none,     &empty,                 "pass-supersedes"),
            (Some(&old),  5, 204, &none,     &empty,                 "pass-supersedes"),
            (Some(&old),  5, 400, &none,     &empty,                 "pass-supersedes"),
        ];
        for (i, (prior, neg, status, head, answer, want)) in table.into_iter().enumerate() {
            let got = decide(prior, neg, status, head, answer);
            assert_eq!(
                kind(&got),
                want,
                "row {i}: {status} prior={}",
                prior.is_some()
            );
        }
    }

    #[test]
    fn what_each_decision_stores() {
        let none = HeaderMap::new();
        let old = body("1765182000.482917", "");
        let newer = body("1765182000.482918", "");
        let Admission::Store(e) = decide(Some(&old), 5, 200, &none, &newer) else {
            panic!("a newer body is stored");
        };
        assert_eq!(e.identity_body(), newer);
        assert_eq!(e.status, StatusCode::OK);
        let older = body("1765182000.482916", "");
        let Admission::KeepOlder(e) = decide(Some(&old), 5, 200, &none, &older) else {
            panic!("an older body is not stored");
        };
        assert_eq!(e.identity_body(), old, "the newer stored body is kept");
        let nm = headers(&[("etag", "W/\"v2\"")]);
        let Admission::Refresh { entry, .. } = decide(Some(&old), 5, 304, &nm, &Bytes::new())
        else {
            panic!("a 304 refreshes");
        };
        assert_eq!(entry.identity_body(), old);
        assert_eq!(entry.upstream_etag().unwrap(), "W/\"v2\"");
        let not_found = Bytes::from_static(br#"{"error":"not found"}"#);
        let Admission::Negative(e) = decide(None, 5, 404, &none, &not_found) else {
            panic!("a 404 is remembered");
        };
        assert_eq!(
            (e.status, e.stored_body()),
            (StatusCode::NOT_FOUND, not_found)
        );
        assert_eq!(e.lifetime(), Duration::from_secs(5));
    }

    /// A gzip client's revalidation that finds the body unchanged keeps the identity copy an
    /// identity client had made: the next identity hit does not decompress again. A key no
    /// identity client read stays without one.
    #[test]
    fn an_unchanged_revalidation_keeps_the_identity_copy() {
        let answer = body(
            "1765182000.482917",
            &format!(r#","x":"{}""#, "a".repeat(100)),
        );
        let stamp = Generations::new().stamp(1, 42, KEY.scope);
        let policy = policy(5);
        let now = Instant::now();
        let probe = rules::probe(&answer, 1, 42).expect("storable");
        let gz = positive_entry(
            &HeaderMap::new(),
            answer.clone(),
            probe,
            stamp.clone(),
            &policy,
            now,
            Coding::Gzip,
        );
        assert_eq!(gz.coding, Coding::Gzip);
        let with_copy = gz.with_identity_copy().expect("a gzip entry");
        for (prior, keeps) in [(&with_copy, true), (&gz, false)] {
            let at = Admit {
                key: &KEY,
                prior: Some(prior),
                stamp: &stamp,
                policy: &policy,
                now,
                form: Coding::Gzip,
            };
            let Admission::Refresh {
                entry,
                how: Confirmed::Unchanged,
            } = admit(&at, StatusCode::OK, &HeaderMap::new(), &answer)
            else {
                panic!("identical bytes refresh");
            };
            assert_eq!(!entry.lacks_form(false), keeps);
            assert_eq!(entry.identity_copy().is_some(), keeps);
            if keeps {
                assert_eq!(entry.form(false).body(), answer);
                assert_eq!(entry.form(false).etag(), with_copy.form(false).etag());
                assert_eq!(entry.form(true).etag(), with_copy.form(true).etag());
            }
        }
    }

    #[test]
    fn revalidation_outcomes() {
        let none = HeaderMap::new();
        let old = body("1765182000.482917", "");
        let cases: [(u16, Bytes, RevalidationOutcome); 6] = [
            (304, Bytes::new(), RevalidationOutcome::NotModified),
            (200, old.clone(), RevalidationOutcome::Unchanged),
            (200, body("1", ""), RevalidationOutcome::Older),
            (200, body("1765182001", ""), RevalidationOutcome::Changed),
            (404, Bytes::new(), RevalidationOutcome::Changed),
            (503, Bytes::new(), RevalidationOutcome::Error),
        ];
        for (status, answer, want) in cases {
            let got = decide(Some(&old), 5, status, &none, &answer).revalidation();
            assert_eq!(got, want, "{status}");
        }
    }

    #[test]
    fn oversized_answers() {
        let k = |a: Admission| kind(&a);
        assert_eq!(k(admit_oversized(true, StatusCode::OK)), "pass-supersedes");
        assert_eq!(k(admit_oversized(false, StatusCode::OK)), "pass-plain");
        assert_eq!(
            k(admit_oversized(true, StatusCode::BAD_GATEWAY)),
            "pass-failure"
        );
    }
}
