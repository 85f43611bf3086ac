//! Holding upstream slots without a token (issue 16, SPEC §10): a client that stops reading
//! (h2 with a zero flow-control window, HTTP/1.1 with a full socket) or uploads a trickle must
//! not keep `--upstream-max-in-flight` slots from everyone else. Each test pins every slot
//! with hostile requests on a route that needs no token, then waits (generously) for a polite
//! client's cache miss to be served.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatwoot_cache::Config;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The `--client-header-timeout` of these tests: the stalled-reader and upload windows.
const LIMIT: Duration = Duration::from_secs(2);
/// A longer one where a hold must be seen from outside (through `/metrics`) before it ends,
/// which a loaded machine can make slow.
const OBSERVED_LIMIT: Duration = Duration::from_secs(4);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A proxy with `slots` upstream slots, a short queue and the short client timeout.
async fn start(fake: &FakeChatwoot, slots: usize, tweak: impl FnOnce(&mut Config)) -> ProxyHandle {
    let mut cfg = config(&fake.url());
    cfg.upstream_max_in_flight = slots;
    cfg.upstream_queue_timeout = ms(300);
    cfg.client_header_timeout = LIMIT;
    // Every client here is 127.0.0.1. Fair shares (on by default) would already hold one
    // hostile address to a quarter of the slots; off, the attack stands for many addresses.
    cfg.upstream_max_in_flight_per_token = Some(0);
    tweak(&mut cfg);
    start_proxy(cfg).await
}

/// Polite cache misses (a new conversation each time, so never a hit) until one is served
/// `200 MISS`; returns how long that took, or `None` after `limit`.
async fn polite_miss_served(
    fake: &FakeChatwoot,
    proxy: &ProxyHandle,
    limit: Duration,
) -> Option<Duration> {
    static NEXT: AtomicU64 = AtomicU64::new(10_000);
    let start = Instant::now();
    let served = poll_until(limit, ms(100), || async {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        fake.add_conversation(1, id, "1765182000.482917");
        let r = conv(proxy, 1, id, "admin-token").await;
        r.status == 200 && r.x_cache() == "MISS"
    })
    .await;
    served.then(|| start.elapsed())
}

/// An h2c connection whose client announces a zero stream window: the proxy may send
/// response headers but not one byte of any body until the client opens the window, which
/// it never does.
/// Returns the sender and the connection's task (finished once the proxy closes it).
async fn zero_window_h2(
    proxy: &ProxyHandle,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    (sender, tokio::spawn(conn))
}

/// 200 streams on two h2 connections with a zero window, on an `other` route (no token),
/// against 4 slots: every slot is held at once (before the fix, forever: hyper never polls a
/// body its client has no window for, so no body deadline ran). Within the stalled-reader
/// deadline (one to two `--client-header-timeout`s) the responses are abandoned, the slots
/// free and a polite client's miss is served; the hostile connections, with nothing left in
/// flight, are closed. An h2 client that reads slowly but steadily is not cut off.
#[tokio::test]
async fn h2_zero_window_streams_release_their_slots() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, 4, |c| c.client_header_timeout = OBSERVED_LIMIT).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (sender, _) = zero_window_h2(&proxy).await;
        for i in 0..100 {
            let mut sender = sender.clone();
            // 64 KiB in 1 KiB frames: hyper takes the first frame, then waits for a window
            // that never opens, so the rest of the upstream body (and its slot) waits too.
            let url = format!("http://{}/stream?chunks=64&delay_ms=0&n={i}", proxy.addr);
            held.push(tokio::spawn(async move {
                sender.ready().await.ok()?;
                let req = http::Request::get(url).body(Empty::<Bytes>::new()).ok()?;
                // Headers arrive; the body is never read (and could not be: window 0).
                sender.send_request(req).await.ok()
            }));
        }
    }
    assert!(
        poll_until(Duration::from_secs(20), ms(100), || async {
            upstream_in_flight(&proxy).await >= 4.0
        })
        .await,
        "the zero-window streams hold every slot"
    );
    let attacked = Instant::now();
    let served = polite_miss_served(&fake, &proxy, Duration::from_secs(40)).await;
    let waited = served.expect("a polite miss is served once the stalled streams are abandoned");
    eprintln!(
        "4 of 4 slots held by zero-window streams; a polite miss served {waited:?} after the \
         hold was seen ({:?} since)",
        attacked.elapsed()
    );
    assert!(
        poll_until(Duration::from_secs(20), ms(100), || async {
            upstream_in_flight(&proxy).await == 0.0
        })
        .await,
        "no slot left held"
    );
    // Every stream got its headers (a 200 holding a slot, or a 503 shed while they were
    // held); none of them got a body, and none of them holds anything any more.
    let mut answered = 0;
    for h in held {
        if let Ok(Some(resp)) = h.await {
            answered += 1;
            assert!(
                [200, 503].contains(&resp.status().as_u16()),
                "{}",
                resp.status()
            );
        }
    }
    assert!(answered > 0, "the hostile streams were answered");

    // A slow but steady h2 reader (16 KiB window, a pause of a third of the deadline after
    // every window) gets its whole 128 KiB.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 * 1024)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender.ready().await.unwrap();
    let url = format!("http://{}/stream?chunks=128&delay_ms=0", proxy.addr);
    let req = http::Request::get(url).body(Empty::<Bytes>::new()).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let (mut got, mut since_pause) = (0usize, 0usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("a steady reader is not cut off");
        if let Ok(d) = frame.into_data() {
            got += d.len();
            since_pause += d.len();
            if since_pause >= 16 * 1024 {
                since_pause = 0;
                tokio::time::sleep(OBSERVED_LIMIT / 3).await;
            }
        }
    }
    assert_eq!(got, 128 * 1024);
}

/// An abandoned stream does not keep its connection busy-but-useless: hyper frees a stream
/// (and the bytes buffered for it) only on a reset or a close, and resets it only once the
/// client's window lets it poll again. So a connection whose client left a response unread for
/// the deadline is closed, even while the client keeps it active with a HEAD every 300 ms
/// (before: open indefinitely; 5 such connections x 99 streams held ~18 MB).
#[tokio::test]
async fn a_connection_with_an_abandoned_stream_is_closed_though_busy() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, 4, |_| {}).await;
    let (mut sender, mut conn) = zero_window_h2(&proxy).await;
    sender.ready().await.unwrap();
    let url = format!("http://{}/stream?chunks=64&delay_ms=0", proxy.addr);
    let req = http::Request::get(url).body(Empty::<Bytes>::new()).unwrap();
    let stalled = sender.send_request(req).await.unwrap();
    assert_eq!(stalled.status(), 200);
    let started = Instant::now();
    let mut heads = 0;
    let closed = loop {
        if conn.is_finished() {
            break true;
        }
        if started.elapsed() > Duration::from_secs(20) {
            break false;
        }
        let head = async {
            sender.ready().await.ok()?;
            let req = http::Request::head(format!("http://{}/api/v1/profile", proxy.addr))
                .body(Empty::<Bytes>::new())
                .ok()?;
            sender.send_request(req).await.ok()
        };
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), head).await {
            heads += 1;
        }
        tokio::time::sleep(ms(300)).await;
    };
    eprintln!(
        "connection with an abandoned stream closed: {closed} after {:?} ({heads} HEADs answered)",
        started.elapsed()
    );
    assert!(closed, "closed while busy with HEADs ({heads} answered)");
    assert!(heads > 0, "the HEADs kept it busy");
    let _ = (&mut conn).await;
    drop(stalled);
}

/// A zero window on answers the proxy holds in memory (a cache hit, its own 401) takes no slot,
/// and does not keep the connection either: the request is over once its body is handed to
/// hyper, so the connection, with nothing else in flight, is closed at the idle deadline
/// (before the fix, never: the unsent answers counted as requests in flight, and the client's
/// h2 stack answers the proxy's keep-alive pings).
#[tokio::test]
async fn a_zero_window_on_in_memory_answers_does_not_keep_the_connection() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, 4, |_| {}).await;
    fake.set_padding(1, 42, 6000);
    assert_eq!(conv(&proxy, 1, 42, "admin-token").await.status, 200);
    let (mut sender, mut conn) = zero_window_h2(&proxy).await;
    let url = format!("http://{}/api/v1/accounts/1/conversations/42", proxy.addr);
    let mut answers = Vec::new();
    for token in [Some("admin-token"), None] {
        sender.ready().await.unwrap();
        let mut req = http::Request::get(&url);
        if let Some(t) = token {
            req = req.header("api_access_token", t);
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        answers.push(resp);
    }
    let statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses, [200, 401]);
    assert_eq!(answers[0].headers()["x-cache"], "HIT");
    let closed = tokio::time::timeout(Duration::from_secs(30), &mut conn).await;
    assert!(
        closed.is_ok(),
        "the connection with only unsendable in-memory answers is closed"
    );
    drop((sender, answers));
}

/// An h2c client whose streams open with a `window`-byte flow-control window: it can take
/// at most that much of a body before it reads (and so releases) some.
async fn h2_client(
    proxy: &ProxyHandle,
    window: u32,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(window)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// GETs `path` on a new h2 connection with a 1 KiB window, reading one frame (so at most
/// 1 KiB) per `pause`: a slow but steady reader. Returns the status, the bytes read and the
/// error that cut the body off, if one did.
async fn read_steadily(
    proxy: &ProxyHandle,
    path: &str,
    token: Option<&str>,
    pause: Duration,
) -> (u16, usize, Option<String>) {
    let mut sender = h2_client(proxy, 1024).await;
    sender.ready().await.unwrap();
    let mut req = http::Request::get(format!("http://{}{path}", proxy.addr));
    if let Some(t) = token {
        req = req.header("api_access_token", t);
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut got = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => got += f.into_data().map_or(0, |d| d.len()),
            Err(e) => return (status, got, Some(e.to_string())),
        }
        tokio::time::sleep(pause).await;
    }
    (status, got, None)
}

/// h2 clients that read slowly but steadily through a 1 KiB window, for twice the stalled-
/// reader deadline and more, get whole bodies: a 9 KB cache HIT (before: its connection was
/// closed at the idle deadline, the request having ended when hyper took the whole body) and
/// a 32 KiB pass-through body the upstream sends in one frame (before: abandoned, hyper polling
/// for more only once the client had taken the whole frame). The proxy hands h2 bodies over
/// in pieces an honest reader takes well within the deadline; zero-window clients are still
/// cut off (the tests above).
#[tokio::test]
async fn steady_h2_readers_with_a_small_window_get_whole_bodies() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, 4, |_| {}).await;
    fake.set_padding(1, 42, 6000);
    assert_eq!(conv(&proxy, 1, 42, "admin-token").await.status, 200);
    let started = Instant::now();
    let (hit, pass) = tokio::join!(
        read_steadily(
            &proxy,
            "/api/v1/accounts/1/conversations/42",
            Some("admin-token"),
            ms(500),
        ),
        read_steadily(
            &proxy,
            "/stream?chunks=1&size=32768&delay_ms=0",
            None,
            ms(250),
        ),
    );
    eprintln!(
        "steady 1 KiB-window readers: HIT {hit:?}, pass-through {pass:?} of 32768 B, {:?}",
        started.elapsed()
    );
    // The identity form (this client asks for no gzip), about 9 KB.
    assert_eq!((hit.0, &hit.2), (200, &None), "the HIT is read whole");
    assert!(hit.1 > 6 * 1024, "a body several windows long: {}", hit.1);
    assert_eq!(
        pass,
        (200, 32768, None),
        "the pass-through body is read whole"
    );
    assert!(
        started.elapsed() > 2 * LIMIT,
        "the reads outlasted the deadline"
    );
}

/// HEAD over h2 gets no body, a local answer included (hyper strips HEAD bodies on HTTP/1.1
/// only; before, the 401's JSON went out as DATA, a protocol error for the client).
#[tokio::test]
async fn head_over_h2_gets_no_body() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, 4, |_| {}).await;
    let get = get(&proxy.url("/api/v1/profile"), None).await;
    assert_eq!(get.status, 401);
    let mut sender = h2_client(&proxy, 65_535).await;
    for path in ["/api/v1/profile", "/api/v1/accounts/1/conversations/42"] {
        sender.ready().await.unwrap();
        let req = http::Request::head(format!("http://{}{path}", proxy.addr))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
        let len = resp.headers().get("content-length").cloned();
        let body = resp.into_body().collect().await;
        let body = body.unwrap_or_else(|e| panic!("{path}: {e}")).to_bytes();
        assert!(body.is_empty(), "{path}: {body:?}");
        if path == "/api/v1/profile" {
            assert_eq!(len.unwrap(), get.body.len().to_string().as_str());
        }
    }
}

/// Sends a request head for an upload of `len` bytes to `/upload` on a new connection.
async fn upload_head(proxy: &ProxyHandle, len: usize) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Reads whatever the proxy answers until it closes (or `within` passes).
async fn answer_within(s: &mut (impl AsyncReadExt + Unpin), within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                return;
            }
        }
    })
    .await;
    read.ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// An HTTP/1.1 upload trickling one byte a second never stalls for the 2 s window, yet it is
/// cut off (408) within a couple of windows for going under 500 B/s, and its slot is freed
/// (before the fix it held the slot as long as it kept trickling). A slow but honest upload
/// (16 KiB/s) beside it completes.
#[tokio::test]
async fn a_trickling_upload_is_cut_off_and_an_honest_one_is_not() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, 2, |_| {}).await;
    let mut trickle = upload_head(&proxy, 100).await;
    let (mut trickle_read, mut trickle_write) = trickle.split();
    let trickling = async {
        for _ in 0..100 {
            if trickle_write.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let answer = async { answer_within(&mut trickle_read, Duration::from_secs(30)).await };
    let honest = async {
        let mut s = upload_head(&proxy, 64 * 1024).await;
        for _ in 0..16 {
            s.write_all(&[b'h'; 4096]).await.unwrap();
            tokio::time::sleep(ms(250)).await;
        }
        answer_within(&mut s, Duration::from_secs(30)).await
    };
    let started = Instant::now();
    let cut_off = async {
        let answer = tokio::select! {
            a = answer => a,
            _ = trickling => None,
        };
        (answer, started.elapsed())
    };
    fake.reset_max_concurrency();
    let ((trickle_answer, cut), honest_answer) = tokio::join!(cut_off, honest);
    // Counted at the fake upstream, where both uploads were in flight at once (the trickle
    // for a whole window, the honest one for 4 s): a scrape of /metrics could miss it.
    assert!(fake.max_concurrency() >= 2, "both uploads held a slot");
    let trickle_answer = trickle_answer.expect("the trickling upload is answered");
    assert!(
        trickle_answer.starts_with("HTTP/1.1 408"),
        "{trickle_answer}"
    );
    assert!(cut >= LIMIT, "not cut before a whole window: {cut:?}");
    eprintln!("a 1 B/s upload cut off with 408 after {cut:?} (window {LIMIT:?})");
    let honest_answer = honest_answer.expect("the honest upload is answered");
    assert!(honest_answer.starts_with("HTTP/1.1 200"), "{honest_answer}");
    assert!(
        honest_answer.contains(r#""bytes":65536"#),
        "{honest_answer}"
    );
    assert!(
        poll_until(Duration::from_secs(10), ms(100), || async {
            upstream_in_flight(&proxy).await == 0.0
        })
        .await,
        "the trickle's slot is freed"
    );
    assert!(
        polite_miss_served(&fake, &proxy, Duration::from_secs(10))
            .await
            .is_some()
    );
}

/// A GET on a new connection with a small receive buffer; returns once the response head
/// arrived, after which the client reads nothing more.
async fn stop_reading_after_head(proxy: &ProxyHandle, path: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(proxy.addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte, so nothing past the head is read.
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("response head")
            .unwrap();
        assert!(n > 0, "closed before the head");
        got.push(byte[0]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    s
}

/// HTTP/1.1 clients that stop reading a response body. One whose (8 KiB) body the proxy has
/// read whole from the upstream holds no slot although it keeps its connection open and the
/// client header timeout is a minute. One whose (8 MiB) body cannot be handed over is
/// abandoned at the write deadline (`--client-header-timeout`): the slot frees and the
/// connection is closed before the body could end.
#[tokio::test]
async fn a_client_that_stops_reading_http1_holds_no_slot() {
    let fake = FakeChatwoot::start().await;
    {
        let proxy = start(&fake, 1, |c| {
            c.client_header_timeout = Duration::from_secs(60)
        })
        .await;
        let _unread = stop_reading_after_head(&proxy, "/stream?chunks=8&delay_ms=0").await;
        assert!(
            poll_until(Duration::from_secs(10), ms(100), || async {
                upstream_in_flight(&proxy).await == 0.0
            })
            .await,
            "a body read whole from the upstream holds no slot"
        );
        assert!(
            polite_miss_served(&fake, &proxy, Duration::from_secs(10))
                .await
                .is_some()
        );
    }
    let proxy = start(&fake, 1, |c| c.client_header_timeout = OBSERVED_LIMIT).await;
    let mut unread = stop_reading_after_head(&proxy, "/stream?chunks=8192&delay_ms=0").await;
    assert!(
        upstream_in_flight(&proxy).await >= 1.0,
        "the unread 8 MiB body holds the only slot"
    );
    let waited = polite_miss_served(&fake, &proxy, Duration::from_secs(30)).await;
    let waited = waited.expect("the slot is freed at the write deadline");
    eprintln!("an unread HTTP/1.1 body's slot freed; a polite miss served after {waited:?}");
    // The proxy gave up on the response: the connection ends before the chunked body's
    // terminator.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), unread.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the abandoned connection is closed");
    assert!(
        rest.len() < 8192 * 1024,
        "the whole body could not have been sent: {} bytes",
        rest.len()
    );
    assert!(
        !rest.ends_with(b"0\r\n\r\n"),
        "the body must not end cleanly"
    );
}
