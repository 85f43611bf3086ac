//! Hostile clients against the proxy's own resources (SPEC §10): connection floods past
//! `--max-connections` and past the process's file-descriptor limit, idle h2 and TLS
//! connections, TLS handshakes that never finish, h2 stream counts, and upgrades.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const GET_ECHO: &[u8] = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n";

/// Reads until a full response head arrived (or EOF / error); returns what was read.
async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

/// Whether the peer closes `s` within `within` (EOF or reset), reading and discarding.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// `--max-connections 20`: a client with a keep-alive connection and 19 idle flooders fill the
/// cap. A 21st connection is not accepted (it waits in the kernel backlog, unanswered: before
/// the fix it was served at once), while the keep-alive client is still served; once five
/// flooders leave, the waiting request is answered.
#[tokio::test]
async fn a_flood_past_max_connections_waits_in_the_backlog() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.max_connections = 20;
    cfg.client_header_timeout = Duration::from_secs(30);
    let proxy = start_proxy(cfg).await;
    let mut polite = TcpStream::connect(proxy.addr).await.unwrap();
    polite.write_all(GET_ECHO).await.unwrap();
    assert!(read_head(&mut polite).await.starts_with(b"HTTP/1.1 200"));
    let mut flood = Vec::new();
    for _ in 0..19 {
        flood.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // Let the proxy accept them all.
    tokio::time::sleep(ms(300)).await;
    let mut late = TcpStream::connect(proxy.addr).await.unwrap();
    late.write_all(GET_ECHO).await.unwrap();
    let early = tokio::time::timeout(ms(700), read_head(&mut late)).await;
    assert!(
        early.is_err(),
        "a connection past --max-connections was served: {:?}",
        early.map(|h| String::from_utf8_lossy(&h).into_owned())
    );
    // Connections already open are served as usual.
    polite.write_all(GET_ECHO).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut polite))
        .await
        .expect("keep-alive client served at the cap");
    assert!(head.starts_with(b"HTTP/1.1 200"));
    flood.truncate(14);
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut late))
        .await
        .expect("the queued connection is served once others close");
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
}

fn tls_client(pki: &TestPki) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(chatwoot_cache::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(tls))
}

/// A TLS connection that negotiated h2 and then sits idle (its client answering PINGs, as h2
/// clients do) is closed after `--client-header-timeout` with no stream in flight. Before the
/// fix h2 connections had no idle deadline at all. A request that takes longer than the
/// timeout is not cut off.
#[tokio::test]
async fn idle_tls_h2_connections_are_closed() {
    let pki = test_pki();
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.client_header_timeout = ms(500);
    let proxy = start_proxy_tls(cfg, Some(server_tls(&pki))).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tls_client(&pki).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // A slow request (900ms, past the 500ms limit) completes.
    fake.set_delay(ms(900));
    let req = http::Request::get(format!("https://localhost:{}/echo", proxy.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .expect("in-flight request kept");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let idle_from = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        ended.is_ok(),
        "an idle h2 connection must be closed by the proxy"
    );
    let after = idle_from.elapsed();
    assert!(after >= ms(400), "closed too early: {after:?}");
}

/// A TLS handshake that never starts (or an h2c connection that never sends its preface) is
/// closed after `--client-header-timeout` (before: a fixed 10 s for TLS).
#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_at_the_header_timeout() {
    let pki = test_pki();
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.client_header_timeout = ms(500);
    let proxy = start_proxy_tls(cfg, Some(server_tls(&pki))).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(4)).await,
        "a stalled TLS handshake holds its connection"
    );
}

/// h2 allows at most 100 concurrent streams per connection (hyper's default was 200): 150
/// requests at once on one h2c connection reach the upstream at most 100 at a time.
#[tokio::test]
async fn h2_allows_at_most_100_streams_per_connection() {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(config(&fake.url())).await;
    fake.set_delay(ms(800));
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..150 {
        let mut sender = sender.clone();
        let url = format!("http://{}/echo/{i}", proxy.addr);
        tasks.push(tokio::spawn(async move {
            sender.ready().await.unwrap();
            let req = http::Request::get(url).body(Empty::<Bytes>::new()).unwrap();
            let resp = sender.send_request(req).await.unwrap();
            resp.into_body().collect().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(fake.requests(), 150);
    let max = fake.max_concurrency();
    assert!(max <= 100, "{max} streams at once on one connection");
    assert!(max >= 50, "the streams did run concurrently ({max})");
}

/// An `Upgrade` outside `/cable` is not honoured: forwarded as a plain request without the
/// upgrade headers (before: passed on, and a 101 would have opened a tunnel anywhere).
#[tokio::test]
async fn upgrades_are_tunnelled_only_on_cable() {
    let (fake, proxy) = setup().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /echo/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    let h = fake.last_seen().headers;
    assert!(!h.contains_key("upgrade"), "{h:?}");
    assert!(
        !h.contains_key("connection") || h["connection"] != "upgrade",
        "{h:?}"
    );
    assert_eq!(
        h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==",
        "end-to-end kept"
    );
}

/// Opens a `/cable` websocket from the loopback address `from` (any of 127.0.0.0/8 is local on
/// Linux); returns the socket and the response head.
async fn open_cable_from(from: [u8; 4], addr: std::net::SocketAddr) -> (TcpStream, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind((std::net::Ipv4Addr::from(from), 0).into())
        .unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(
        b"GET /cable HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// `--max-tunnels 2`: a third `/cable` tunnel is refused with `503` and `Retry-After`, and
/// accepted once one of the two closes. Tunnels hold no upstream request slot. (Each from its
/// own address: one address holds at most a quarter of the tunnels, at least one.)
#[tokio::test]
async fn at_most_max_tunnels_at_once() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.max_tunnels = 2;
    cfg.upstream_max_in_flight = 1;
    let proxy = start_proxy(cfg).await;
    let (a, head) = open_cable_from([127, 0, 0, 2], proxy.addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_b, head) = open_cable_from([127, 0, 0, 3], proxy.addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Two tunnels and a one-slot limit: ordinary requests still get through.
    assert_eq!(get(&proxy.url("/echo"), None).await.status, 200);
    let (_c, head) = open_cable_from([127, 0, 0, 4], proxy.addr).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.to_lowercase().contains("retry-after: 1"), "{head}");
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_d, head) = open_cable_from([127, 0, 0, 4], proxy.addr).await;
        if head.starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "slot not freed: {head}");
        tokio::time::sleep(ms(50)).await;
    }
}

/// One client address holds at most a quarter of `--max-tunnels` (at least one), so one client
/// cannot take every tunnel (before: all of them); other addresses still get theirs, and a
/// closed tunnel gives its address's place back.
#[tokio::test]
async fn one_address_holds_at_most_a_quarter_of_the_tunnels() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.max_tunnels = 8;
    let proxy = start_proxy(cfg).await;
    let mut held = Vec::new();
    for i in 0..2 {
        let (s, head) = open_cable_from([127, 0, 0, 5], proxy.addr).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{i}: {head}");
        held.push(s);
    }
    let (_refused, head) = open_cable_from([127, 0, 0, 5], proxy.addr).await;
    assert!(
        head.starts_with("HTTP/1.1 503"),
        "a third from one address: {head}"
    );
    assert!(head.to_lowercase().contains("retry-after: 1"), "{head}");
    let (_other, head) = open_cable_from([127, 0, 0, 6], proxy.addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "another address: {head}");
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_again, head) = open_cable_from([127, 0, 0, 5], proxy.addr).await;
        if head.starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "place not given back: {head}");
        tokio::time::sleep(ms(50)).await;
    }
}

fn bin() -> Command {
    let mut c = Command::new("prlimit");
    // The test environment must not leak settings into the binary.
    for (k, _) in std::env::vars() {
        if k.starts_with("CHATWOOT_CACHE_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

/// Spawns the binary with at most `nofile` open files; returns it once it listens. Its stderr
/// is drained on a thread (and collected) so logging never blocks it.
fn spawn_limited(nofile: u32, args: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = bin()
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_chatwoot-cache"))
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) runs the binary");
    let err = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(ms(100))
            && line.contains("listening")
        {
            return (child, rx);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("binary did not start");
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Past the process's file-descriptor limit (the binary runs with 128 open files, connections
/// uncapped by `--max-connections`): 300 flooding connections make `accept` fail with EMFILE.
/// The proxy backs off instead of spinning (well under half a core while the flood lasts), and
/// answers again as soon as the flood goes. With `--max-connections 48`, below the fd limit,
/// a client connected before the flood is still served during it, through a new upstream
/// connection each time (the fd headroom the cap leaves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_fd_limit_leaves_the_proxy_answering() {
    let fake = FakeChatwoot::start().await;
    fake.set_close_connections(true);
    for cap in [None, Some(48)] {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let admin = format!("127.0.0.1:{}", free_port());
        let upstream = fake.url();
        let mut args = vec![
            "--upstream",
            &upstream,
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--client-header-timeout",
            "60s",
        ];
        let cap_text = cap.map(|c: usize| c.to_string());
        if let Some(c) = &cap_text {
            args.extend(["--max-connections", c.as_str()]);
        }
        let (mut child, logs) = spawn_limited(128, &args);
        let addr: std::net::SocketAddr = listen.parse().unwrap();
        let mut polite = TcpStream::connect(addr).await.unwrap();
        polite.write_all(GET_ECHO).await.unwrap();
        assert!(read_head(&mut polite).await.starts_with(b"HTTP/1.1 200"));
        let mut flood = Vec::new();
        for _ in 0..300 {
            if let Ok(s) = TcpStream::connect(addr).await {
                flood.push(s);
            }
        }
        tokio::time::sleep(ms(300)).await;
        let cpu_before = cpu_seconds(child.id());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu = cpu_seconds(child.id()) - cpu_before;
        assert!(
            cpu < 1.0,
            "{cap:?}: {cpu:.2}s of CPU in 2s at EMFILE: spinning"
        );
        if cap.is_some() {
            for _ in 0..3 {
                polite.write_all(GET_ECHO).await.unwrap();
                let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut polite))
                    .await
                    .expect("served during the flood");
                if !head.starts_with(b"HTTP/1.1 200") {
                    let _ = child.kill();
                    tokio::time::sleep(ms(200)).await;
                    let logs: Vec<String> = logs.try_iter().collect();
                    panic!("{:?}: {logs:#?}", String::from_utf8_lossy(&head));
                }
            }
        }
        drop(flood);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = async {
                let mut s = TcpStream::connect(addr).await.ok()?;
                s.write_all(GET_ECHO).await.ok()?;
                let head = tokio::time::timeout(Duration::from_secs(2), read_head(&mut s))
                    .await
                    .ok()?;
                head.starts_with(b"HTTP/1.1 200").then_some(())
            }
            .await;
            if ok.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{cap:?}: not answering after the flood"
            );
            tokio::time::sleep(ms(100)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        let logs: Vec<String> = logs.try_iter().collect();
        if cap.is_none() {
            assert!(
                logs.iter().any(|l| l.contains("accept failed")),
                "EMFILE was reached and logged: {logs:?}"
            );
            let lines = logs.iter().filter(|l| l.contains("accept failed")).count();
            assert!(
                lines <= 3,
                "logged once per episode, not per error: {lines}"
            );
        }
    }
}

/// Graceful shutdown (SPEC §10) closes keep-alive connections that have served a request and
/// sit idle, HTTP/1.1 and h2c alike, at once: nothing but the drain itself wakes such a
/// connection, so if the drain's wake-up were lost each would hold the shutdown until its
/// header timeout (20 s here) or `--shutdown-timeout` (5 s in the tests).
#[tokio::test]
async fn graceful_shutdown_closes_idle_keep_alive_connections() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.client_header_timeout = Duration::from_secs(20);
    let mut proxy = start_proxy(cfg).await;
    let url = format!("http://{}/echo/idle", proxy.addr);
    let req = || {
        http::Request::get(&url)
            .header("host", "x")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };

    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h1, h1_conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let h1_conn = tokio::spawn(h1_conn);
    let resp = h1.send_request(req()).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();

    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, h2_conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let h2_conn = tokio::spawn(h2_conn);
    let resp = h2.send_request(req()).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    assert!(
        !h1_conn.is_finished() && !h2_conn.is_finished(),
        "both kept alive"
    );
    // Both connections are now idle in the proxy, waiting for a next request.
    tokio::time::sleep(ms(100)).await;

    let start = Instant::now();
    let done = proxy.shutdown();
    // Well under the 5 s a lost wake-up would take, with room for a loaded CI machine.
    let finished = tokio::time::timeout(ms(3500), done).await;
    assert!(
        matches!(finished, Ok(Ok(()))),
        "shutdown still waiting after {:?} for idle keep-alive connections",
        start.elapsed()
    );
    for (name, conn) in [("HTTP/1.1", h1_conn), ("h2c", h2_conn)] {
        let closed = tokio::time::timeout(ms(1000), conn).await;
        assert!(closed.is_ok(), "{name}: the idle connection is closed");
    }
}
