//! Setup shared by the benches: the sample body, the upstream head stored entries are built
//! from, the policy, and the keys of a filled store.

use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;
use chatwoot_cache::auth::Scope;
use chatwoot_cache::cache::coding::Coding;
use chatwoot_cache::cache::{CacheKey, CachePolicy, Store, rules};
use chatwoot_cache::metrics::Metrics;

const SAMPLE: &str = include_str!("../../tests/support/conversation-sample.json");

/// The sample conversation (~3.4 KB) as Chatwoot serialises it.
pub fn sample_body() -> Bytes {
    let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    v["id"] = 42.into();
    Bytes::from(v.to_string())
}

/// The upstream head stored entries are built from: six headers, as Chatwoot sends.
pub fn upstream_head() -> http::HeaderMap {
    let mut head = http::HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json; charset=utf-8"),
        ("cache-control", "max-age=0, private, must-revalidate"),
        ("etag", "W/\"0123456789abcdef0123456789abcdef\""),
        ("x-request-id", "5c1b2a7e-3f0e-4f7d-9a6e-0b9f1d2c3e4f"),
        ("x-runtime", "0.041237"),
        ("date", "Mon, 08 Dec 2025 08:20:05 GMT"),
    ] {
        head.insert(k, http::HeaderValue::from_static(v));
    }
    head
}

/// The default policy with the given TTL.
pub fn bench_policy(ttl: Duration) -> CachePolicy {
    CachePolicy {
        ttl,
        stale_while_revalidate: Duration::from_secs(30),
        stale_if_error: Duration::from_secs(600),
        negative_ttl: Duration::from_secs(5),
        max_object_bytes: 4 << 20,
        refresh_ahead: None,
    }
}

/// The `i`-th key of a filled store: distinct conversations over a few accounts and scopes
/// spread over the whole 128 bits.
pub fn stored_key(i: u64) -> CacheKey {
    CacheKey {
        account: 1 + i % 7,
        conversation: i,
        scope: Scope(u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)),
    }
}

/// A store holding `n` entries under `stored_key(0..n)`, moka's bookkeeping settled. Each entry
/// has its own header block (as stored from a real response); the body `Bytes` is shared,
/// which keeps 1M entries within a couple of GB. Needs a tokio runtime context (clock).
pub fn filled_store(n: u64, policy: &CachePolicy) -> Store {
    let store = Store::new(64 << 30, *policy, Arc::new(Metrics::new().unwrap()));
    let (body, head) = (sample_body(), upstream_head());
    let now = tokio::time::Instant::now();
    for i in 0..n {
        let k = stored_key(i);
        let probe = rules::probe(&body, 1, 42).unwrap();
        let entry = rules::positive_entry(
            &head,
            body.clone(),
            probe,
            store.stamp(&k),
            policy,
            now,
            Coding::Gzip,
        );
        store.insert(k, Arc::new(entry));
    }
    // (usage() also settles moka's pending bookkeeping)
    assert_eq!(store.usage().0, n, "every entry stored");
    store
}

/// The next key index of a uniform random walk over `0..n` (xorshift64: no allocation, no
/// shared state, cheap next to what is measured).
pub fn next_index(x: &mut u64, n: u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x % n
}

/// One hit's store work for key `i` of a [`filled_store`]: lookup, freshness, render.
pub fn store_hit(store: &Store, policy: &CachePolicy, i: u64) -> http::Response<impl Sized> {
    let now = tokio::time::Instant::now();
    let entry = store.lookup(&stored_key(i), now).expect("stored");
    std::hint::black_box(policy.freshness(&entry, now));
    let status = http::HeaderValue::from_static("chatwoot-cache; hit; ttl=3600");
    entry.render(entry.form(true), now, status, false, false)
}
