//! End-to-end: how upstream transport faults reach the client (SPEC §3, §4, §6): a TLS
//! handshake that never completes, a body that stalls or is cut off mid-way, and upstream
//! connection reuse.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use support::*;

/// An https upstream that accepts TCP but never answers the TLS handshake is a connect failure:
/// `502 bad_gateway` (LOCAL) once `--upstream-connect-timeout` (300 ms) passes — not a wait for
/// the much longer `--upstream-timeout`.
#[tokio::test]
async fn tls_handshake_that_never_completes_is_a_connect_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts and holds every connection, never writing a byte.
    let black_hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mut cfg = config(&format!("https://{addr}"));
    cfg.upstream_connect_timeout = Duration::from_millis(300);
    cfg.upstream_timeout = Duration::from_secs(10);
    let proxy = start_proxy(cfg).await;
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), get(&proxy.url("/echo"), None))
        .await
        .expect("answered within 5 s");
    let took = start.elapsed();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.x_cache(), "LOCAL");
    assert_eq!(r.json()["errors"][0]["code"], "bad_gateway");
    assert!(
        took >= Duration::from_millis(250),
        "the connect timeout is what ended it: {took:?}"
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(upstream_in_flight(&proxy).await, 0.0);
    black_hole.abort();
}

/// An upstream that sends headers and a few body bytes, then goes silent (connection open) is
/// cut off after `--upstream-timeout` of silence: the client's body read fails (never a clean,
/// short end) within ~1 s, and the upstream slot is released.
#[tokio::test]
async fn upstream_stalling_mid_body_errors_the_client_body() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.upstream_timeout = Duration::from_millis(300);
    let proxy = start_proxy(cfg).await;
    fake.set_fault(Fault::Stall, Some(1));
    let start = Instant::now();
    let req = http::Request::get(proxy.url("/echo/stall"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), client().request(req))
        .await
        .expect("headers within 5 s")
        .expect("the head is forwarded");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "5000");
    assert_eq!(upstream_in_flight(&proxy).await, 1.0, "slot held mid-body");
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => got.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
                Err(e) => return Err(format!("{e:?}")),
            }
        }
        Ok(())
    })
    .await
    .expect("the stalled body must end (with an error) within 5 s");
    let took = start.elapsed();
    assert!(
        outcome.is_err(),
        "a stalled body must fail, not end cleanly after {} bytes",
        got.len()
    );
    assert!(
        took < Duration::from_secs(2),
        "cut off after {took:?}, want ~300 ms of silence"
    );
    assert!(
        got.starts_with(b"{\"id\":42"),
        "partial bytes were streamed"
    );
    assert!(
        poll_until(
            Duration::from_secs(2),
            Duration::from_millis(10),
            || async { upstream_in_flight(&proxy).await == 0.0 }
        )
        .await,
        "the upstream slot is released after the stall"
    );
    // The proxy still works.
    assert_eq!(get(&proxy.url("/echo/after"), None).await.status, 200);
}

/// A chunked upstream body (no Content-Length) that breaks off before its last chunk must reach
/// the client as a broken body, never as a complete (shorter) response.
#[tokio::test]
async fn chunked_upstream_body_cut_off_is_an_error_for_the_client() {
    let (fake, proxy) = setup().await;
    fake.set_fault(Fault::TruncateChunked, Some(1));
    let req = http::Request::get(proxy.url("/echo/chunked"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), client().request(req))
        .await
        .expect("headers within 5 s")
        .expect("the head is forwarded");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-length").is_none());
    let result = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("the body ends within 5 s");
    assert!(
        result.is_err(),
        "client must see a broken body, got {} complete bytes",
        result.map(|b| b.to_bytes().len()).unwrap_or(0)
    );
    assert!(
        poll_until(
            Duration::from_secs(2),
            Duration::from_millis(10),
            || async { upstream_in_flight(&proxy).await == 0.0 }
        )
        .await,
        "the upstream slot is released"
    );
}

/// Upstream connections are pooled: 20 sequential requests (forwarded routes and conversation
/// misses) open at most 2 TCP connections to the upstream.
#[tokio::test]
async fn upstream_connections_are_reused() {
    let (fake, proxy) = setup().await;
    for i in 0..20u64 {
        let r = if i % 2 == 0 {
            send(
                Method::POST,
                &proxy.url(&format!("/echo/{i}")),
                &[],
                b"some body",
            )
            .await
        } else {
            // A conversation the fake does not have: a MISS that the upstream answers 404.
            get(
                &proxy.url(&format!("/api/v1/accounts/1/conversations/{}", 1000 + i)),
                Some("admin-token"),
            )
            .await
        };
        assert!(r.status == 200 || r.status == 404, "{i}: {}", r.status);
        assert_ne!(r.x_cache(), "LOCAL", "{i}");
    }
    assert_eq!(fake.requests(), 20);
    assert!(
        fake.connections() <= 2,
        "20 sequential requests opened {} upstream connections",
        fake.connections()
    );
}
