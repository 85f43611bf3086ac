//! SPEC 14: conversations stored compressed, served as gzip to clients that accept it and as
//! identity to the others, from one stored entry and one upstream request.

mod support;

use std::time::Duration;

use http::Method;
use support::*;

const CONV: &str = "/api/v1/accounts/1/conversations/42";
const ADMIN: &str = "admin-token";
const GZIP: (&str, &str) = ("accept-encoding", "gzip, deflate, br");

async fn call(proxy: &ProxyHandle, method: Method, extra: &[(&str, &str)]) -> Resp {
    let mut headers = vec![("api_access_token", ADMIN)];
    headers.extend_from_slice(extra);
    send(method, &proxy.url(CONV), &headers, b"").await
}

/// The proxy's own answer for the conversation, as the fake would send it (identity JSON).
async fn upstream_body(fake: &FakeChatwoot) -> bytes::Bytes {
    let r = send(
        Method::GET,
        &format!("{}{CONV}", fake.url()),
        &[("api_access_token", ADMIN)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    r.body
}

fn stored_bytes(proxy: &ProxyHandle) -> u64 {
    proxy.proxy.store.usage().1
}

/// Gzip and identity clients interleaved on one key: one upstream request (the cold requests
/// coalesce), both bodies byte-exact after decoding, two strong ETags, each revalidating
/// (304) only for its own, HEAD and Content-Length per form, `Vary` on every answer.
#[tokio::test]
async fn gzip_and_identity_clients_share_one_entry() {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(config(&fake.url())).await;
    let expected = upstream_body(&fake).await;
    let before = fake.show_requests();

    // Cold, at once: one upstream request for both.
    fake.set_delay(Duration::from_millis(300));
    let (gz, id) = tokio::join!(
        call(&proxy, Method::GET, &[GZIP]),
        call(&proxy, Method::GET, &[])
    );
    fake.set_delay(Duration::ZERO);
    assert_eq!(fake.show_requests() - before, 1, "one upstream request");
    assert_eq!((gz.status.as_u16(), id.status.as_u16()), (200, 200));
    assert_eq!(gz.header("content-encoding"), "gzip");
    assert_eq!(id.header("content-encoding"), "");
    assert_eq!(id.body, expected, "identity bytes are the upstream's");
    assert_eq!(
        gz.decoded(),
        expected,
        "gzip decodes to the upstream's bytes"
    );
    assert!(gz.body.len() * 2 < expected.len(), "{} B", gz.body.len());
    let (gz_etag, id_etag) = (gz.header("etag").to_string(), id.header("etag").to_string());
    assert_ne!(gz_etag, id_etag, "one strong ETag per form");
    for etag in [&gz_etag, &id_etag] {
        assert!(
            etag.starts_with('"') && etag.ends_with('"'),
            "strong: {etag}"
        );
    }

    // Interleaved hits: each client always gets its own form, byte-exact.
    for round in 0..3 {
        for (accept, want_etag, want_body) in [
            (Some(GZIP), &gz_etag, &gz.body),
            (None, &id_etag, &expected),
        ] {
            let extra: Vec<_> = accept.into_iter().collect();
            let r = call(&proxy, Method::GET, &extra).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.x_cache(), "HIT", "round {round}");
            assert_eq!(&r.header("etag"), want_etag);
            assert_eq!(&r.body, want_body);
            assert_eq!(r.header("content-length"), r.body.len().to_string());
            assert_eq!(r.header("vary"), "Accept-Encoding");
            assert_eq!(r.decoded(), expected);
        }
    }
    for r in [&gz, &id] {
        assert_eq!(r.header("vary"), "Accept-Encoding");
        assert_eq!(r.header("content-length"), r.body.len().to_string());
    }

    // Each form revalidates only against its own ETag.
    for (accept, own, other) in [(Some(GZIP), &gz_etag, &id_etag), (None, &id_etag, &gz_etag)] {
        let mut extra: Vec<(&str, &str)> = accept.into_iter().collect();
        extra.push(("if-none-match", own));
        let r = call(&proxy, Method::GET, &extra).await;
        assert_eq!(r.status, 304, "own ETag {own}");
        assert!(r.body.is_empty());
        assert_eq!(&r.header("etag"), own);
        assert_eq!(r.header("vary"), "Accept-Encoding");
        assert_eq!(
            r.header("content-encoding"),
            "",
            "no representation metadata on a 304"
        );
        extra.pop();
        extra.push(("if-none-match", other));
        let r = call(&proxy, Method::GET, &extra).await;
        assert_eq!(
            r.status, 200,
            "the other form's ETag {other} does not match"
        );
        assert_eq!(&r.header("etag"), own);
    }

    // HEAD for both: the chosen form's headers and length, no body.
    let head_gz = call(&proxy, Method::HEAD, &[GZIP]).await;
    let head_id = call(&proxy, Method::HEAD, &[]).await;
    for (h, full) in [(&head_gz, &gz), (&head_id, &id)] {
        assert_eq!(h.status, 200);
        assert_eq!(h.x_cache(), "HIT");
        assert!(h.body.is_empty());
        assert_eq!(h.header("content-length"), full.body.len().to_string());
        assert_eq!(h.header("etag"), full.header("etag"));
        assert_eq!(
            h.header("content-encoding"),
            full.header("content-encoding")
        );
        assert_eq!(h.header("vary"), "Accept-Encoding");
    }
    assert_eq!(
        fake.show_requests() - before,
        1,
        "everything after was a hit"
    );
}

/// `Accept-Encoding` as RFC 9110 reads it, end to end: which form each header value gets.
#[tokio::test]
async fn accept_encoding_variants() {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(config(&fake.url())).await;
    let expected = upstream_body(&fake).await;
    let cases: &[(&[&str], bool)] = &[
        (&[], false),
        (&[""], false),
        (&["gzip"], true),
        (&["GZip"], true),
        (&["x-gzip"], true),
        (&["*"], true),
        (&["gzip;q=0"], false),
        (&["gzip ; q=0.0, deflate"], false),
        (&["*;q=0"], false),
        (&["identity"], false),
        (&["identity;q=0"], false),
        (&["identity;q=0, gzip;q=0.2"], true),
        (&["gzip;q=0.4, identity;q=0.8"], false),
        (&["br", "gzip"], true),
        (&["deflate, br"], false),
        (&[" gzip;q=1.0 "], true),
        (&["gzip;q=7"], false),
    ];
    for (values, gzip) in cases {
        let extra: Vec<(&str, &str)> = values.iter().map(|v| ("accept-encoding", *v)).collect();
        let r = call(&proxy, Method::GET, &extra).await;
        assert_eq!(r.status, 200, "{values:?}");
        let want = if *gzip { "gzip" } else { "" };
        assert_eq!(r.header("content-encoding"), want, "{values:?}");
        assert_eq!(r.decoded(), expected, "{values:?}");
    }
}

/// Building a form charges the entry for it: an identity copy of a gzip entry is weighed the
/// moment an identity client first reads it (the entry is replaced by its copy with the
/// identity body), once, and stays under the bound.
#[tokio::test]
async fn the_identity_copy_is_weighed_when_built() {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(config(&fake.url())).await;
    let expected = upstream_body(&fake).await;
    let _ = call(&proxy, Method::GET, &[GZIP]).await;
    let gzip_only = stored_bytes(&proxy);
    let _ = call(&proxy, Method::GET, &[GZIP]).await;
    assert_eq!(stored_bytes(&proxy), gzip_only, "a hit adds nothing");
    let id = call(&proxy, Method::GET, &[]).await;
    assert_eq!(id.x_cache(), "HIT");
    let both = stored_bytes(&proxy);
    assert!(
        both >= gzip_only + expected.len() as u64,
        "identity copy weighed: {gzip_only} -> {both}"
    );
    let _ = call(&proxy, Method::GET, &[]).await;
    let _ = call(&proxy, Method::GET, &[GZIP]).await;
    assert_eq!(stored_bytes(&proxy), both, "built once");
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(&m, "chatwoot_cache_evictions_total{cause=\"replaced\"}"),
        0.0,
        "replacing an entry by its identity copy is not an eviction"
    );
}

/// `--cache-max-bytes` bounds what is really held with both forms in play: ten times the bound
/// in conversations, read by gzip and identity clients in turn (some entries gain an identity
/// copy after they were stored), and the store never holds more than the bound.
#[tokio::test]
async fn byte_bound_holds_at_ten_times_overfill_with_mixed_clients() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.cache_max_bytes = 64 * 1024;
    cfg.max_object_bytes = 16 * 1024;
    cfg.cache_ttl = Duration::from_secs(600);
    let proxy = start_proxy(cfg).await;
    let client = client();
    let mut stored_entries = 0;
    // 180 conversations weigh ~10x the bound once stored (150 weighed 561,004 B: 8.6x).
    let ids = 1000..1000 + 180u64;
    for c in ids.clone() {
        fake.add_conversation(1, c, "1765182000.5");
    }
    let mut held = 0;
    for (i, c) in ids.enumerate() {
        let url = proxy.url(&format!("/api/v1/accounts/1/conversations/{c}"));
        let first: &[(&str, &str)] = if i % 2 == 0 { &[GZIP] } else { &[] };
        let r = try_send(
            &client,
            Method::GET,
            &url,
            &[&[("api_access_token", ADMIN)][..], first].concat(),
            b"",
        )
        .await
        .expect("request");
        assert_eq!(r.status, 200);
        assert_eq!(r.x_cache(), "MISS");
        // Every third one is read by the other kind of client too.
        if i % 3 == 0 {
            let other: &[(&str, &str)] = if i % 2 == 0 { &[] } else { &[GZIP] };
            let r = try_send(
                &client,
                Method::GET,
                &url,
                &[&[("api_access_token", ADMIN)][..], other].concat(),
                b"",
            )
            .await
            .expect("request");
            assert_eq!(r.status, 200);
            let _ = r.decoded();
        }
        let (entries, bytes) = proxy.proxy.store.usage();
        assert!(bytes <= 64 * 1024, "{bytes} B held after {i} conversations");
        held = held.max(bytes);
        stored_entries = entries;
    }
    let m = metrics_text(&proxy).await;
    assert!(metric(&m, "chatwoot_cache_evictions_total{cause=\"size\"}") > 0.0);
    assert!(metric(&m, "chatwoot_cache_stored_bytes") <= 64.0 * 1024.0);
    assert!(
        stored_entries > 0 && held > 32 * 1024,
        "the cache was really filled: {held} B"
    );
}

/// Identity clients that waited on a gzip client's fetch whose entry the store did not keep (a
/// write invalidated the conversation during the fetch) share one identity copy: each gets the
/// identity bytes, the gzip body is decompressed once for all of them (not once per waiter,
/// each copy uncounted by `--cache-max-bytes`), and no answer says the entry was stored.
#[tokio::test]
async fn coalesced_identity_clients_share_one_copy_of_an_unstored_fetch() {
    const WAITERS: usize = 20;
    let fake = FakeChatwoot::start().await;
    fake.set_padding(1, 42, 100_000);
    let proxy = start_proxy(config(&fake.url())).await;
    let expected = upstream_body(&fake).await;
    let get = |gzip: bool| {
        let url = proxy.url(CONV);
        tokio::spawn(async move {
            let mut headers = vec![("api_access_token", ADMIN)];
            if gzip {
                headers.push(GZIP);
            }
            send(Method::GET, &url, &headers, b"").await
        })
    };
    let every = Duration::from_millis(10);
    let limit = Duration::from_secs(30);

    fake.hold_shows(true);
    let leader = get(true);
    assert!(poll_until(limit, every, || async { fake.in_flight() == 1 }).await);
    let waiters: Vec<_> = (0..WAITERS).map(|_| get(false)).collect();
    assert!(
        poll_until(limit, every, || async {
            metric(
                &metrics_text(&proxy).await,
                "chatwoot_cache_coalesced_total",
            ) == WAITERS as f64
        })
        .await,
        "every identity client joined the fetch"
    );
    let write = send(
        Method::POST,
        &proxy.url(&format!("{CONV}/messages")),
        &[("api_access_token", ADMIN)],
        b"{}",
    )
    .await;
    assert_eq!(write.status, 200);
    fake.hold_shows(false);

    let leader = leader.await.expect("leader");
    assert_eq!(leader.status, 200);
    assert_eq!(leader.header("content-encoding"), "gzip");
    assert_eq!(leader.decoded(), expected);
    for waiter in waiters {
        let r = waiter.await.expect("waiter");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), "");
        assert_eq!(r.body, expected, "identity bytes, byte-exact");
        assert_eq!(r.header("content-length"), expected.len().to_string());
        let status = r.header("cache-status");
        assert!(status.contains("collapsed"), "{status}");
        assert!(!status.contains("stored"), "not kept, not said: {status}");
    }
    assert!(!leader.header("cache-status").contains("stored"));
    assert_eq!(
        proxy.proxy.store.identity_copies(),
        1,
        "one decompression for all the waiters"
    );
    assert_eq!(
        fake.show_requests(),
        2,
        "one upstream fetch (and the test's own)"
    );
}

/// `If-None-Match` on two lines is one list (RFC 9110 §5.3): the form's ETag on the second
/// line still makes a 304, as it does on one line.
#[tokio::test]
async fn if_none_match_on_several_lines_is_one_list() {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(config(&fake.url())).await;
    let etag = call(&proxy, Method::GET, &[GZIP])
        .await
        .header("etag")
        .to_string();
    let one_line = format!("\"zzz\", {etag}");
    let one = call(&proxy, Method::GET, &[GZIP, ("if-none-match", &one_line)]).await;
    assert_eq!(one.status, 304, "one line");
    let two = call(
        &proxy,
        Method::GET,
        &[GZIP, ("if-none-match", "\"zzz\""), ("if-none-match", &etag)],
    )
    .await;
    assert_eq!(two.status, 304, "two lines");
    let neither = call(
        &proxy,
        Method::GET,
        &[
            GZIP,
            ("if-none-match", "\"zzz\""),
            ("if-none-match", "\"yyy\""),
        ],
    )
    .await;
    assert_eq!(neither.status, 200, "no line matches");
}

/// HEAD and a matching `If-None-Match` from identity clients send no body, so they do not make
/// the identity copy of a gzip entry: the identity form's exact headers (its own ETag and
/// length, no `Content-Encoding`) come from the gzip entry alone, nothing is decompressed or
/// added to the store. The first identity GET makes the copy; the same answers after it are
/// header for header what they were before.
#[tokio::test]
async fn identity_head_and_304_do_not_make_the_identity_copy() {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(config(&fake.url())).await;
    let expected = upstream_body(&fake).await;
    let gz = call(&proxy, Method::GET, &[GZIP]).await;
    assert_eq!((gz.status.as_u16(), gz.x_cache()), (200, "MISS"));
    assert_eq!(gz.header("content-encoding"), "gzip");
    let gzip_only = stored_bytes(&proxy);

    let head = call(&proxy, Method::HEAD, &[]).await;
    assert_eq!((head.status.as_u16(), head.x_cache()), (200, "HIT"));
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), expected.len().to_string());
    assert_eq!(head.header("content-encoding"), "");
    assert_eq!(head.header("vary"), "Accept-Encoding");
    let etag = head.header("etag").to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"') && etag != gz.header("etag"));
    let not_modified = call(&proxy, Method::GET, &[("if-none-match", &etag)]).await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());
    assert_eq!(not_modified.header("etag"), etag);
    assert_eq!(not_modified.header("content-encoding"), "");
    assert_eq!(not_modified.header("content-type"), "");
    let head_304 = call(&proxy, Method::HEAD, &[("if-none-match", &etag)]).await;
    assert_eq!(head_304.status, 304);
    assert_eq!(
        (proxy.proxy.store.identity_copies(), stored_bytes(&proxy)),
        (0, gzip_only),
        "no identity copy made for answers without a body"
    );

    let id = call(&proxy, Method::GET, &[]).await;
    assert_eq!((id.status.as_u16(), id.x_cache()), (200, "HIT"));
    assert_eq!(id.body, expected);
    assert_eq!(id.header("etag"), etag, "the ETag HEAD and 304 announced");
    assert_eq!(proxy.proxy.store.identity_copies(), 1, "GET makes it");
    assert!(stored_bytes(&proxy) > gzip_only);

    // The same answers from the entry with its copy: identical but for Age, Cache-Status and
    // (on a 304, the proxy's own) Date.
    let same = |a: &Resp, b: &Resp| {
        let strip = |r: &Resp| {
            let mut h = r.headers.clone();
            h.remove("age");
            h.remove("cache-status");
            h.remove("date");
            (r.status, h)
        };
        assert_eq!(strip(a), strip(b));
    };
    same(&head, &call(&proxy, Method::HEAD, &[]).await);
    same(
        &not_modified,
        &call(&proxy, Method::GET, &[("if-none-match", &etag)]).await,
    );
    same(
        &head_304,
        &call(&proxy, Method::HEAD, &[("if-none-match", &etag)]).await,
    );
    assert_eq!(proxy.proxy.store.identity_copies(), 1);
    assert_eq!(
        fake.show_requests(),
        2,
        "one upstream fetch (and the test's own)"
    );
}
