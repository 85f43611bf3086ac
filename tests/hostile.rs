//! Hostile input: random request heads, paths, header names and values, methods and bodies sent
//! over raw sockets never crash the proxy, never reach the cache through a non-canonical path,
//! and the proxy keeps serving afterwards.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return Vec::new();
    };
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    out
}

fn request_strategy() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET".to_string()),
        Just("HEAD".to_string()),
        Just("POST".to_string()),
        Just("PATCH".to_string()),
        Just("CONNECT".to_string()),
        "[A-Z]{1,8}",
    ];
    let path = prop_oneof![
        Just("/api/v1/accounts/1/conversations/42".to_string()),
        "/api/v1/accounts/[0-9%+a-f.]{0,6}/conversations/[0-9%+a-f./]{0,8}",
        "/api/v[0-9]/[a-z/%?=&.]{0,30}",
        "[ -~]{0,40}",
    ];
    let header_name = prop_oneof![
        Just("api_access_token".to_string()),
        Just("Api-Access-Token".to_string()),
        Just("Content-Length".to_string()),
        Just("Transfer-Encoding".to_string()),
        Just("Connection".to_string()),
        Just("Upgrade".to_string()),
        Just("If-None-Match".to_string()),
        "[A-Za-z_-]{1,20}",
    ];
    let header_value = prop_oneof![
        "[ -~]{0,40}",
        "[0-9]{1,4}",
        Just("chunked".to_string()),
        Just("admin-token".to_string())
    ];
    let headers = prop::collection::vec((header_name, header_value), 0..8);
    let body = prop::collection::vec(any::<u8>(), 0..64);
    (method, path, headers, body).prop_map(|(m, p, hs, body)| {
        let mut out = format!("{m} {p} HTTP/1.1\r\nHost: x\r\n").into_bytes();
        for (k, v) in hs {
            out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        out
    })
}

/// Name prefix of the runtime threads [`random_requests_never_break_the_proxy`] watches.
const WATCHED_THREADS: &str = "hostile-watched";

/// Panics seen on watched threads (location and message).
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static PANICKED: AtomicBool = AtomicBool::new(false);

/// Installs (once) a panic hook that records panics on threads named [`WATCHED_THREADS`] and
/// then runs the previous hook. tokio catches a panic in a spawned task (a connection task) and
/// only drops the task, so without this a panicking request handler would go unnoticed. Panics
/// on any other thread (other tests in this binary) are not recorded.
fn watch_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let watched = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with(WATCHED_THREADS));
            if watched {
                PANICKED.store(true, Ordering::SeqCst);
                if let Ok(mut v) = PANICS.lock() {
                    v.push(info.to_string());
                }
            }
            previous(info);
        }));
    });
}

/// 200 random requests (and raw random bytes): every answer is HTTP, no proxy (or fake) task
/// panics, and afterwards a normal request still works.
///
/// The proxy and the fake run on a dedicated runtime whose threads are named, so the panic
/// hook can attribute panics to them (a `#[tokio::test]` runtime would share the test thread).
#[test]
fn random_requests_never_break_the_proxy() {
    watch_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(WATCHED_THREADS)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // On a multi-thread runtime every spawned task (accept loops, connections, the
        // upstream client) runs on the watched worker threads.
        let (fake, proxy) = setup().await;
        let mut runner = TestRunner::new(PropConfig {
            cases: 200,
            ..PropConfig::default()
        });
        let mut cases = Vec::new();
        for _ in 0..200 {
            cases.push(request_strategy().new_tree(&mut runner).unwrap().current());
        }
        let junk = prop::collection::vec(any::<u8>(), 1..200);
        for _ in 0..50 {
            cases.push(junk.new_tree(&mut runner).unwrap().current());
        }
        for bytes in &cases {
            let out = raw(proxy.addr, bytes).await;
            if !out.is_empty() {
                let head = String::from_utf8_lossy(&out[..out.len().min(12)]).to_string();
                assert!(
                    head.starts_with("HTTP/1."),
                    "non-HTTP answer {head:?} to {:?}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
        // Still healthy and still correct.
        assert_eq!(get(&proxy.admin_url("/healthz"), None).await.status, 200);
        let r = conv(&proxy, 1, 42, "admin-token").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["id"], 42);
        let _ = fake.requests();
    });
    drop(rt);
    assert!(
        !PANICKED.load(Ordering::SeqCst),
        "a task panicked while handling hostile input: {:?}",
        PANICS.lock().map(|v| v.clone()).unwrap_or_default()
    );
}

/// A non-canonical spelling is never answered from the cache, even once the canonical key is
/// stored for the same token.
#[tokio::test]
async fn non_canonical_spellings_bypass_the_cache() {
    let (fake, proxy) = setup().await;
    assert_eq!(conv(&proxy, 1, 42, "admin-token").await.x_cache(), "MISS");
    for p in [
        "/api/v1/accounts/1/conversations/42.json",
        "/api/v1/accounts/1/conversations/042",
        "/api/v1/accounts/01/conversations/42",
        "/api/v1/accounts/1/conversations/42?x=1",
        "/api/v1/accounts/1/conversations/42/",
        "/api/v1/accounts/1/conversations/%342",
    ] {
        let before = fake.requests();
        let r = get(&proxy.url(p), Some("admin-token")).await;
        assert_eq!(r.x_cache(), "BYPASS", "{p}");
        assert_eq!(fake.requests(), before + 1, "{p} must reach the upstream");
    }
}
