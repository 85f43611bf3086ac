//! End-to-end: the transparent proxy (SPEC §3, §4, §8) against the fake Chatwoot.

mod support;

use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt;
use support::*;

const CONV: &str = "/api/v1/accounts/1/conversations/42";

/// Polls `cond` every 10 ms until it holds; false if `limit` passes first.
async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One HTTP/1.1 response parsed off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status_line: String,
    body: Vec<u8>,
}

/// Splits raw bytes into the complete responses they hold (Content-Length or chunked framing;
/// a response without either runs to the end). Panics on a truncated response.
fn parse_responses(mut raw: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("incomplete head: {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        raw = &raw[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if let Some(len) = find("content-length") {
            let len: usize = len.parse().unwrap();
            assert!(raw.len() >= len, "truncated body");
            body.extend_from_slice(&raw[..len]);
            raw = &raw[len..];
        } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let nl = raw
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .expect("chunk size");
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&raw[..nl])
                        .split(';')
                        .next()
                        .unwrap()
                        .trim(),
                    16,
                )
                .unwrap();
                raw = &raw[nl + 2..];
                if size == 0 {
                    let trailer_end = raw
                        .windows(2)
                        .position(|w| w == b"\r\n")
                        .expect("last chunk");
                    raw = &raw[trailer_end + 2..];
                    break;
                }
                body.extend_from_slice(&raw[..size]);
                raw = &raw[size + 2..];
            }
        } else {
            body.extend_from_slice(raw);
            raw = &[];
        }
        out.push(RawResponse { status_line, body });
    }
    out
}

/// A missing token is refused locally with the SPEC error body, and never reaches Chatwoot.
#[tokio::test]
async fn missing_token_is_refused_locally() {
    let (fake, proxy) = setup().await;
    for path in [
        CONV,
        "/api/v1/accounts/1/contacts",
        "/api/v2/accounts/1/reports",
        "/api/v1/profile",
    ] {
        let r = get(&proxy.url(path), None).await;
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.x_cache(), "LOCAL");
        assert!(r.header("content-type").starts_with("application/json"));
        assert!(
            !r.header("date").is_empty(),
            "every local answer carries Date"
        );
        let v = r.json();
        assert_eq!(v["error"], "Missing api_access_token header");
        assert_eq!(v["description"], "Missing api_access_token header");
        assert_eq!(v["errors"][0]["field"], "api_access_token");
        assert_eq!(v["errors"][0]["code"], "missing_token");
    }
    let empty = send(
        Method::GET,
        &proxy.url(CONV),
        &[("api_access_token", "")],
        b"",
    )
    .await;
    assert_eq!(empty.json()["errors"][0]["code"], "missing_token");
    assert_eq!(fake.requests(), 0);
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_auth_rejections_total{reason="missing"}"#
        ),
        5.0
    );
}

/// Two spellings, an over-long value or a non-visible byte are malformed.
#[tokio::test]
async fn malformed_tokens_are_refused() {
    let (fake, proxy) = setup().await;
    let long = "a".repeat(257);
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![
            ("api_access_token", "admin-token"),
            ("Api-Access-Token", "other"),
        ],
        vec![
            ("api_access_token", "admin-token"),
            ("api_access_token", "admin-token"),
        ],
        vec![("api_access_token", long.as_str())],
        vec![("api_access_token", "has space")],
    ];
    for headers in cases {
        let r = send(Method::GET, &proxy.url(CONV), &headers, b"").await;
        assert_eq!(r.status, 401, "{headers:?}");
        assert_eq!(r.x_cache(), "LOCAL");
        assert_eq!(
            r.json()["errors"][0]["code"],
            "malformed_token",
            "{headers:?}"
        );
    }
    assert_eq!(fake.requests(), 0);
}

/// Any Rack spelling of the header is the token; it is forwarded unchanged.
#[tokio::test]
async fn token_spellings_are_accepted_and_forwarded_unchanged() {
    let (fake, proxy) = setup().await;
    let r = send(
        Method::GET,
        &proxy.url("/api/v1/accounts/1/contacts"),
        &[("API-ACCESS-TOKEN", "admin-token")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "BYPASS");
    let seen = fake.last_seen();
    assert_eq!(seen.headers["api-access-token"], "admin-token");
}

/// devise and Authorization requests are forwarded untouched and never cached.
#[tokio::test]
async fn alternate_auth_bypasses_the_cache() {
    let (fake, proxy) = setup().await;
    for headers in [
        vec![
            ("authorization", "Bearer abc"),
            ("api_access_token", "admin-token"),
        ],
        vec![
            ("access-token", "a"),
            ("client", "b"),
            ("uid", "c@example.com"),
            ("api_access_token", "admin-token"),
        ],
    ] {
        let r = send(Method::GET, &proxy.url(CONV), &headers, b"").await;
        assert_eq!(r.x_cache(), "BYPASS", "{headers:?}");
        let r = send(Method::GET, &proxy.url(CONV), &headers, b"").await;
        assert_eq!(r.x_cache(), "BYPASS");
    }
    assert_eq!(
        fake.show_requests(),
        4,
        "every alternate-auth request reaches Chatwoot"
    );
}

/// Other routes (widget, public API, assets) are forwarded without token checks.
#[tokio::test]
async fn other_routes_need_no_token() {
    let (fake, proxy) = setup().await;
    let r = get(&proxy.url("/echo/widget?website_token=x"), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "BYPASS");
    assert_eq!(fake.requests(), 1);
}

/// Forwarding rewrites exactly what SPEC §3 says and nothing else.
#[tokio::test]
async fn forwarding_headers() {
    let (fake, proxy) = setup().await;
    let r = send(
        Method::POST,
        &proxy.url("/echo/path?b=2&a=1&a=3"),
        &[
            ("host", "dashboards.internal:8443"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "spoofed"),
            ("connection", "keep-alive, x-client-hop"),
            ("x-client-hop", "secret"),
            ("keep-alive", "timeout=5"),
            ("x-custom-one", "1"),
            ("x-custom-two", "2"),
        ],
        b"hello",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = fake.last_seen();
    assert_eq!(
        seen.path_and_query, "/echo/path?b=2&a=1&a=3",
        "query preserved byte for byte"
    );
    assert_eq!(seen.method, Method::POST);
    let h = &seen.headers;
    assert_eq!(h["host"], fake.addr.to_string());
    // The client's chain is dropped, and its (loopback) address is not written either.
    assert!(!h.contains_key("x-forwarded-for"), "{h:?}");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "dashboards.internal:8443");
    assert!(
        !h.contains_key("x-client-hop"),
        "headers named in Connection are hop-by-hop"
    );
    assert!(!h.contains_key("keep-alive"));
    assert!(!h.contains_key("connection"));
    assert_eq!(h["x-custom-one"], "1");
    let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    let one = names.iter().position(|n| *n == "x-custom-one").unwrap();
    let two = names.iter().position(|n| *n == "x-custom-two").unwrap();
    assert!(one < two, "header order preserved: {names:?}");
    assert_eq!(r.json()["body_len"], 5);
    // Response side: hop-by-hop named by the upstream's Connection is dropped, cookies pass.
    assert!(r.headers.get("x-upstream-hop").is_none());
    assert_eq!(r.header("set-cookie"), "_chatwoot_session=abc; path=/");
}

/// The first bytes of a slow upstream body reach the client before the upstream finishes.
#[tokio::test]
async fn response_bodies_stream() {
    let (_fake, proxy) = setup().await;
    let client = client();
    let req = http::Request::get(proxy.url("/stream?chunks=6&delay_ms=200"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let start = Instant::now();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.headers()["x-cache"], "BYPASS");
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = start.elapsed();
    assert!(first.starts_with(b"0000"));
    let mut total = first.len();
    while let Some(f) = body.frame().await {
        total += f.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    let all_at = start.elapsed();
    assert_eq!(total, 6 * 1024);
    assert!(
        all_at >= Duration::from_millis(1000),
        "upstream takes >= 1s: {all_at:?}"
    );
    assert!(
        first_at < Duration::from_millis(600),
        "first chunk at {first_at:?}, whole body at {all_at:?}"
    );
}

/// A large upload streams through: the first 1 MiB reaches the upstream while the client still
/// holds back the rest (a proxy that buffers the body first would never get there), then all
/// 64 MiB arrive intact.
#[tokio::test]
async fn uploads_stream_through() {
    let (fake, proxy) = setup().await;
    let (mut tx, body) = http_body_util::channel::Channel::<bytes::Bytes, std::io::Error>::new(4);
    let client: hyper_util::client::legacy::Client<
        _,
        http_body_util::channel::Channel<bytes::Bytes, std::io::Error>,
    > = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let req = http::Request::post(proxy.url("/upload"))
        .body(body)
        .unwrap();
    let response = tokio::spawn(async move { client.request(req).await });
    let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
    tx.send_data(chunk.clone()).await.unwrap();
    let first_arrived =
        wait_until(Duration::from_secs(5), || fake.upload_progress() >= 1 << 20).await;
    assert!(
        first_arrived,
        "the first MiB must reach the upstream before the client sends more; the upstream has \
         {} bytes",
        fake.upload_progress()
    );
    assert_eq!(fake.upload_progress(), 1 << 20, "nothing else was sent yet");
    assert!(!response.is_finished(), "the upload is still open");
    for _ in 1..64 {
        tx.send_data(chunk.clone()).await.unwrap();
    }
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .expect("upload response in time")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["bytes"], 64u64 << 20);
    assert_eq!(fake.upload_progress(), 64 << 20);
}

/// Connect refused → 502 bad_gateway; hang → 504 upstream_timeout; garbage → 502.
#[tokio::test]
async fn upstream_failures_map_to_spec_errors() {
    // Refused: a port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let proxy = start_proxy(config(&format!("http://{dead_addr}"))).await;
    let r = get(&proxy.url("/echo"), None).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.x_cache(), "LOCAL");
    assert_eq!(r.json()["errors"][0]["code"], "bad_gateway");

    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.upstream_timeout = Duration::from_millis(300);
    let proxy = start_proxy(cfg).await;
    fake.set_fault(Fault::Hang, Some(1));
    let start = Instant::now();
    let r = get(&proxy.url("/echo"), None).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["errors"][0]["code"], "upstream_timeout");
    assert!(start.elapsed() < Duration::from_secs(2));

    fake.set_fault(Fault::Garbage, Some(1));
    let r = get(&proxy.url("/echo"), None).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["errors"][0]["code"], "bad_gateway");
}

/// An upstream that dies mid-body must not look like a complete response.
#[tokio::test]
async fn truncated_upstream_body_is_an_error_for_the_client() {
    let (fake, proxy) = setup().await;
    fake.set_fault(Fault::Truncate, Some(1));
    let result = try_send(&client(), Method::GET, &proxy.url("/echo"), &[], b"").await;
    assert!(
        result.is_err(),
        "client must see a broken body, got {result:?}"
    );
}

/// Sends a websocket upgrade request on a new connection; returns it and the response head.
async fn open_websocket(addr: std::net::SocketAddr) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /cable HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the 101");
        head.extend_from_slice(&buf[..n]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// An HTTP/1.1 upgrade (ActionCable) is tunnelled both ways.
#[tokio::test]
async fn websocket_upgrade_round_trip() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (fake, proxy) = setup().await;
    let (mut s, head) = open_websocket(proxy.addr).await;
    let head = head.to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"));
    s.write_all(b"ping-frame-bytes").await.unwrap();
    let mut echoed = vec![0u8; 16];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping-frame-bytes");
    // The upstream saw a real upgrade request, handshake headers intact.
    let seen = fake.last_seen();
    assert_eq!(seen.path_and_query, "/cable");
    let h = &seen.headers;
    let value = |name: &str| {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("").to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join(", ")
    };
    assert_eq!(value("upgrade"), "websocket", "{h:?}");
    assert!(
        value("connection")
            .split(',')
            .any(|t| t.trim() == "upgrade"),
        "Connection must name upgrade: {h:?}"
    );
    assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(h["sec-websocket-version"], "13");
}

/// A tunnel is not a request head: an upgraded connection quiet for longer than the
/// client header timeout stays open.
#[tokio::test]
async fn an_upgraded_tunnel_outlives_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.client_header_timeout = Duration::from_millis(300);
    let proxy = start_proxy(cfg).await;
    let (mut s, head) = open_websocket(proxy.addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.write_all(b"still-there").await.unwrap();
    let mut echoed = vec![0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echoed))
        .await
        .expect("tunnel answered")
        .expect("tunnel still open after 3x the header timeout");
    assert_eq!(&echoed, b"still-there");
}

/// A keep-alive connection is closed once it has been idle for the client header timeout
/// after its last response, and a request in flight for longer than that is not cut off.
#[tokio::test]
async fn idle_keep_alive_connections_close_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.client_header_timeout = Duration::from_millis(400);
    let proxy = start_proxy(cfg).await;
    fake.set_delay(Duration::from_millis(900));
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /echo/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    // The response arrives although it took longer than the header timeout.
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed while the request was in flight");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let answered = Instant::now();
    // Then nothing more is sent: the proxy closes the idle connection.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the idle connection must be closed")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
    }
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(300) && idle < Duration::from_secs(3),
        "closed after {idle:?}"
    );
}

/// https upstream verified against a CA generated in the test (--upstream-ca-file).
#[tokio::test]
async fn tls_upstream_with_custom_ca() {
    let pki = test_pki();
    let fake = FakeChatwoot::start_tls(server_tls(&pki)).await;
    let dir = temp_dir("ca");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let url = format!("https://localhost:{}", fake.addr.port());
    let mut cfg = config(&url);
    cfg.upstream_ca_file = Some(ca);
    let proxy = start_proxy(cfg).await;
    let r = conv(&proxy, 1, 42, "admin-token").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], 42);
    assert_eq!(
        fake.last_seen().headers["host"],
        format!("localhost:{}", fake.addr.port())
    );

    // Without the CA the certificate is refused: 502, never a silent plaintext fallback.
    let proxy = start_proxy(config(&url)).await;
    let r = get(&proxy.url("/echo"), None).await;
    assert_eq!(r.status, 502);
}

/// The proxy terminates TLS itself when given a certificate.
#[tokio::test]
async fn client_side_tls() {
    let pki = test_pki();
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy_tls(config(&fake.url()), Some(server_tls(&pki))).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(chatwoot_cache::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let req = http::Request::get(format!("https://localhost:{}/echo", proxy.addr.port()))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2, "ALPN offers h2");
    assert_eq!(fake.last_seen().headers["x-forwarded-proto"], "https");
}

/// Health, readiness and metrics on the admin listener.
#[tokio::test]
async fn admin_endpoints() {
    let (_fake, proxy) = setup().await;
    assert_eq!(get(&proxy.admin_url("/healthz"), None).await.status, 200);
    assert_eq!(get(&proxy.admin_url("/readyz"), None).await.status, 200);
    let _ = get(&proxy.url("/echo"), None).await;
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_requests_total{cache="bypass",route="other",status="2xx"}"#
        ),
        1.0
    );
    assert!(m.contains(
        "chatwoot_cache_request_duration_seconds_bucket{cache=\"bypass\",route=\"other\""
    ));
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_upstream_requests_total{route="other",status="2xx"}"#
        ),
        1.0
    );
    assert!(!m.contains("admin-token"), "no token in metrics");
    assert_eq!(get(&proxy.admin_url("/nope"), None).await.status, 404);
}

/// Oversized headers get 431; a proxy never forwards them.
#[tokio::test]
async fn oversized_headers_get_431() {
    let (fake, proxy) = setup().await;
    let big = "x".repeat(70 * 1024);
    let r = try_send(
        &client(),
        Method::GET,
        &proxy.url("/echo"),
        &[("x-big", big.as_str())],
        b"",
    )
    .await;
    match r {
        Ok(r) => assert_eq!(r.status, 431),
        Err(e) => panic!("expected a 431, got {e}"),
    }
    assert_eq!(fake.requests(), 0);
}

/// Content-Length + Transfer-Encoding: Transfer-Encoding wins (RFC 9112 §6.3), so the upstream
/// sees exactly one request to /echo/a with the chunked (empty) body and no Content-Length; the
/// request smuggled after it never runs, and the proxy closes the client connection after the
/// first response instead of parsing the leftover bytes.
#[tokio::test]
async fn conflicting_framing_cannot_smuggle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (fake, proxy) = setup().await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "the proxy must close the connection after the first response: {closed:?}, read {:?}",
        String::from_utf8_lossy(&out)
    );
    let responses = parse_responses(&out);
    assert_eq!(
        responses.len(),
        1,
        "exactly one response on the wire: {responses:?}"
    );
    let r = &responses[0];
    assert!(r.status_line.starts_with("HTTP/1.1 200"), "{r:?}");
    let echoed: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(echoed["body_len"], 0, "the chunked body is empty: {echoed}");
    let seen = fake.seen();
    assert_eq!(
        seen.iter()
            .map(|s| s.path_and_query.as_str())
            .collect::<Vec<_>>(),
        ["/echo/a"],
        "exactly one upstream request, never the smuggled one"
    );
    assert_eq!(seen[0].method, Method::POST);
    assert!(
        !seen[0].headers.contains_key("content-length"),
        "the client's Content-Length is dropped: {:?}",
        seen[0].headers
    );
}

/// A client that sends nothing (or a head too slowly) is disconnected.
#[tokio::test]
async fn slow_header_clients_time_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.client_header_timeout = Duration::from_millis(500);
    let proxy = start_proxy(cfg).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "connection must be closed by the proxy");
    let mut idle = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "a silent connection must be closed too");
    assert_eq!(fake.requests(), 0);
    // The admin listener too, after a request on the same keep-alive connection.
    let mut admin = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
    admin
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), admin.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "a slow admin head must be cut off too");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
}

/// A webhook body trickling in is cut off after the client header timeout (408), so it
/// cannot hold an admin connection while the head deadline is off.
#[tokio::test]
async fn a_trickling_webhook_body_times_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.client_header_timeout = Duration::from_millis(400);
    cfg.webhook_secret = Some("webhook-secret-value".into());
    let proxy = start_proxy(cfg).await;
    let mut s = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
    // A head that passes the checks made before the body (fresh timestamp, well-formed
    // signature): only the body is slow.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let head = format!(
        "POST /webhooks/chatwoot/accounts/1 HTTP/1.1\r\nHost: x\r\n\
         X-Chatwoot-Timestamp: {now}\r\nX-Chatwoot-Signature: sha256={}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"event\"",
        "0".repeat(64)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the admin connection must not be held");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(start.elapsed() >= Duration::from_millis(350));
}

/// SIGTERM-equivalent: readiness drops at once, in-flight requests finish, then exit.
#[tokio::test]
async fn graceful_shutdown_drains_in_flight() {
    let fake = FakeChatwoot::start().await;
    let mut proxy = start_proxy(config(&fake.url())).await;
    fake.set_delay(Duration::from_millis(800));
    let url = proxy.url("/echo/slow");
    let slow = tokio::spawn(async move { get(&url, None).await });
    assert!(
        wait_until(Duration::from_secs(5), || fake.in_flight() == 1).await,
        "the slow request reached the upstream"
    );
    let done = proxy.shutdown();
    let mut ready = 0;
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        ready = get(&proxy.admin_url("/readyz"), None).await.status.as_u16();
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready, 503, "readiness drops at once");
    assert_eq!(fake.in_flight(), 1, "…while the request is still in flight");
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
        "listener closed"
    );
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "in-flight request completed");
    tokio::time::timeout(Duration::from_secs(3), done)
        .await
        .unwrap()
        .unwrap();
}

/// A token header that the client also names in `Connection` is still forwarded unchanged:
/// the proxy validated and scoped that token, so Chatwoot must authenticate the same one
/// (dropping it as hop-by-hop would make the two disagree, and turn every such request into
/// Chatwoot's 401).
#[tokio::test]
async fn token_named_in_connection_is_still_forwarded() {
    let (fake, proxy) = setup().await;
    for (path, name, connection) in [
        (
            "/api/v1/accounts/1/contacts",
            "api_access_token",
            "api_access_token",
        ),
        (
            "/api/v1/accounts/1/contacts",
            "Api-Access-Token",
            "keep-alive, Api-Access-Token",
        ),
        (CONV, "api_access_token", "api_access_token"),
    ] {
        let before = fake.requests();
        let r = send(
            Method::GET,
            &proxy.url(path),
            &[(name, "admin-token"), ("connection", connection)],
            b"",
        )
        .await;
        assert_eq!(fake.requests(), before + 1, "{path}: reached the upstream");
        let seen = fake.last_seen();
        let forwarded: Vec<_> = seen
            .headers
            .iter()
            .filter(|(k, _)| k.as_str().replace('-', "_") == "api_access_token")
            .map(|(_, v)| v.to_str().unwrap_or(""))
            .collect();
        assert_eq!(
            forwarded,
            ["admin-token"],
            "{path} (Connection: {connection}): token forwarded once, unchanged: {:?}",
            seen.headers
        );
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
}

/// Graceful shutdown does not wait for a client that connected and never sent a byte: with a
/// 20 s header timeout and nothing in flight, the server finishes well under 1.5 s.
#[tokio::test]
async fn graceful_shutdown_does_not_wait_for_idle_connections() {
    use tokio::io::AsyncReadExt;
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.client_header_timeout = Duration::from_secs(20);
    let mut proxy = start_proxy(cfg).await;
    let mut idle = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // Accepts happen in order: once a later connection is answered, the idle one has been
    // accepted by the proxy (not just queued in the kernel).
    let r = send(
        Method::GET,
        &proxy.url("/echo/after-idle"),
        &[("connection", "close")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    let start = Instant::now();
    let done = proxy.shutdown();
    let finished = tokio::time::timeout(Duration::from_millis(1500), done).await;
    assert!(
        matches!(finished, Ok(Ok(()))),
        "shutdown still waiting after {:?} for a connection that never sent a request",
        start.elapsed()
    );
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(1), idle.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the idle connection is closed");
    assert!(buf.is_empty(), "nothing is sent to it: {buf:?}");
}

/// `X-Forwarded-For: 127.0.0.1` from an untrusted client must not reach Chatwoot, where it would
/// land on rack-attack's safelist and switch off its throttles (SPEC §3). Before the fix the
/// upstream saw `127.0.0.1, 127.0.0.1`; now the client's chain is replaced, and since this
/// client's own address is loopback (a sidecar's application) the header is left out entirely.
/// The spoofed `X-Forwarded-Proto`/`-Host` are replaced too. Both request paths (in-place
/// rewrite, and the copy made when hop-by-hop headers are present) behave alike.
#[tokio::test]
async fn x_forwarded_for_is_never_taken_from_an_untrusted_client() {
    let (fake, proxy) = setup().await;
    for extra in [None, Some(("connection", "x-hop"))] {
        let mut headers = vec![
            ("host", "dash.internal"),
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "admin.internal"),
        ];
        headers.extend(extra);
        let r = send(Method::POST, &proxy.url("/echo/login"), &headers, b"x").await;
        assert_eq!(r.status, 200);
        let h = fake.last_seen().headers;
        assert!(!h.contains_key("x-forwarded-for"), "{extra:?}: {h:?}");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "dash.internal");
    }
}

/// A peer inside `--trusted-proxies` (an ingress) keeps its forwarding headers; a loopback
/// trusted peer is not appended to the chain.
#[tokio::test]
async fn a_trusted_proxy_keeps_its_forwarding_headers() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.trusted_proxies = chatwoot_cache::upstream::TrustedProxies::parse("127.0.0.1/32").unwrap();
    let proxy = start_proxy(cfg).await;
    let r = send(
        Method::GET,
        &proxy.url("/echo/x"),
        &[
            ("host", "gateway.svc"),
            ("x-forwarded-for", "203.0.113.9, 10.0.0.5"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "dash.example"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    let h = fake.last_seen().headers;
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.0.5");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "dash.example");
    // Without headers of its own, a trusted peer gets ours (and loopback is still not written).
    send(Method::GET, &proxy.url("/echo/y"), &[("host", "g")], b"").await;
    let h = fake.last_seen().headers;
    assert!(!h.contains_key("x-forwarded-for"));
    assert_eq!(
        (&h["x-forwarded-proto"], &h["x-forwarded-host"]),
        (&"http".parse().unwrap(), &"g".parse().unwrap())
    );
}

/// The common case (no hop-by-hop headers) rewrites the client's headers in place: the same
/// rewriting as the copying path, order kept, spoofed forwarding headers replaced.
#[tokio::test]
async fn forwarding_headers_without_hop_by_hop() {
    let (fake, proxy) = setup().await;
    let r = send(
        Method::GET,
        &proxy.url("/echo/plain?q=1"),
        &[
            ("host", "dash.internal"),
            ("x-first", "1"),
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "spoofed"),
            ("x-last", "2"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = fake.last_seen();
    let h = &seen.headers;
    assert_eq!(h["host"], fake.addr.to_string());
    assert!(!h.contains_key("x-forwarded-for"), "{h:?}");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "dash.internal");
    let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    let first = names.iter().position(|n| *n == "x-first").unwrap();
    let last = names.iter().position(|n| *n == "x-last").unwrap();
    assert!(first < last, "order kept: {names:?}");
    assert_eq!(seen.path_and_query, "/echo/plain?q=1");
}
