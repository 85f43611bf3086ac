//! End-to-end: upstream protection during incidents (SPEC §5 stale-if-error, §6, §9) against the
//! fake Chatwoot with injected faults: stale-if-error for every failure kind, the concurrency
//! limit with its queue deadline, the circuit breaker, and the upstream metrics.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chatwoot_cache::Config;
use http_body_util::BodyExt;
use support::*;

const ADMIN: &str = "admin-token";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn status_fault(status: u16, body: &str, headers: &[(&str, &str)]) -> Fault {
    Fault::Status {
        status,
        body: body.to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn http_500() -> Fault {
    status_fault(500, r#"{"error":"Internal Server Error"}"#, &[])
}

/// Chatwoot's rack-attack answer (API-FACTS §8): 429 text/plain, no `Retry-After`.
fn rack_attack_429() -> Fault {
    status_fault(429, "Retry later\n", &[])
}

/// Cache settings that make an entry stale quickly but usable for stale-if-error for long,
/// and a breaker that never opens (tests that want it set their own).
fn stale_config(fake: &FakeChatwoot) -> Config {
    let mut cfg = config(&fake.url());
    cfg.cache_ttl = ms(200);
    cfg.stale_while_revalidate = Duration::ZERO;
    cfg.stale_if_error = Duration::from_secs(60);
    cfg.upstream_timeout = ms(300);
    cfg.breaker_min_requests = 100_000;
    cfg
}

fn retry_after(r: &Resp) -> u64 {
    r.header("retry-after")
        .parse()
        .unwrap_or_else(|_| panic!("no numeric Retry-After: {r:?}"))
}

/// Asserts a local `503 upstream_unavailable` with a `Retry-After` of at least 1; returns it.
fn assert_unavailable(r: &Resp, what: &str) -> u64 {
    assert_eq!(r.status, 503, "{what}: {r:?}");
    assert_eq!(r.x_cache(), "LOCAL", "{what}");
    assert_eq!(
        r.json()["errors"][0]["code"],
        "upstream_unavailable",
        "{what}"
    );
    let ra = retry_after(r);
    assert!(ra >= 1, "{what}: Retry-After {ra}");
    ra
}

async fn echo(proxy: &ProxyHandle) -> Resp {
    get(&proxy.url("/echo"), None).await
}

async fn sample(proxy: &ProxyHandle, series: &str) -> f64 {
    metric(&metrics_text(proxy).await, series)
}

const BREAKER_STATE: &str = "chatwoot_cache_breaker_state";
const IN_FLIGHT: &str = "chatwoot_cache_upstream_in_flight";
const SHED_QUEUE: &str = r#"chatwoot_cache_shed_total{reason="queue_timeout"}"#;
const SHED_BREAKER: &str = r#"chatwoot_cache_shed_total{reason="breaker_open"}"#;

// ---------------------------------------------------------------------------------------------
// 1. Stale-if-error
// ---------------------------------------------------------------------------------------------

/// Past its TTL, a stored conversation is served `STALE` with
/// `fwd=stale; fwd-status=<code>; detail=stale-if-error` and the stored bytes for every kind of
/// upstream failure: timeout, 500/502/503/504, 429 with and without `Retry-After`, a reset
/// connection, a non-HTTP answer, a truncated body, and finally a refused connect. Each case
/// really reached (or tried to reach) the upstream: it is the failure, not a shortcut, that
/// triggers the fallback.
#[tokio::test]
async fn stale_if_error_covers_every_failure_kind() {
    let fake = FakeChatwoot::start().await;
    // A new connection per request: socket-level faults hit every request, and dropping the
    // fake leaves no pooled connection behind, so the last case is a genuine ECONNREFUSED.
    fake.set_close_connections(true);
    let proxy = start_proxy(stale_config(&fake)).await;
    let warm = conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(warm.status, 200);
    assert_eq!(warm.x_cache(), "MISS");
    let stored = warm.body.clone();
    tokio::time::sleep(ms(250)).await;

    let cases: Vec<(&str, Fault, u16)> = vec![
        ("timeout", Fault::Hang, 504),
        ("500", http_500(), 500),
        ("502", status_fault(502, "bad gateway", &[]), 502),
        ("503", status_fault(503, "maintenance", &[]), 503),
        (
            "503 with Retry-After",
            status_fault(503, "maintenance", &[("Retry-After", "120")]),
            503,
        ),
        ("504", status_fault(504, "gateway timeout", &[]), 504),
        ("429 rack-attack (no Retry-After)", rack_attack_429(), 429),
        (
            "429 with Retry-After",
            status_fault(429, "Retry later\n", &[("Retry-After", "30")]),
            429,
        ),
        ("connection reset", Fault::Reset, 502),
        ("garbage", Fault::Garbage, 502),
        ("truncated body", Fault::Truncate, 502),
    ];
    let n_cases = cases.len();
    for (name, fault, code) in cases {
        // A failed revalidation holds off the next one for min(ttl, 1s) = 200ms.
        tokio::time::sleep(ms(220)).await;
        let before = fake.requests();
        fake.set_fault(fault, Some(1));
        let start = Instant::now();
        let r = conv(&proxy, 1, 42, ADMIN).await;
        let took = start.elapsed();
        assert_eq!(r.status, 200, "{name}: {r:?}");
        assert_eq!(r.x_cache(), "STALE", "{name}");
        assert_eq!(
            r.header("cache-status"),
            format!("chatwoot-cache; fwd=stale; fwd-status={code}; detail=stale-if-error"),
            "{name}"
        );
        assert_eq!(r.body, stored, "{name}: the stored body");
        assert_eq!(fake.requests(), before + 1, "{name}: one real upstream try");
        // The upstream deadline (300ms) bounds even the hang.
        assert!(took < ms(1000), "{name} took {took:?}");
    }

    // Connect refused: the upstream is gone.
    drop(fake);
    // Past the previous case's failure backoff, so this is a real connect attempt.
    tokio::time::sleep(ms(220)).await;
    let r = conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(r.status, 200, "refused: {r:?}");
    assert_eq!(r.x_cache(), "STALE");
    assert_eq!(
        r.header("cache-status"),
        "chatwoot-cache; fwd=stale; fwd-status=502; detail=stale-if-error"
    );
    assert_eq!(r.body, stored);

    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_requests_total{cache="stale",route="conversation",status="2xx"}"#
        ),
        (n_cases + 1) as f64
    );
    assert_eq!(
        metric(&m, r#"chatwoot_cache_revalidations_total{outcome="error"}"#),
        (n_cases + 1) as f64
    );
}

/// Authorization answers are never overridden by stale data (SPEC §5): an upstream 404, a 401
/// "not authorized", a 403 and a 401 "Invalid Access Token" for an expired-but-stored entry
/// reach the client as they are; 404 and 401 are then replayed from the negative cache, and
/// the refused token is refused locally, never answered with the old 200.
#[tokio::test]
async fn authorization_answers_are_never_replaced_by_stale_data() {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(stale_config(&fake)).await;
    let tokens = ["t-404", "t-401", "t-403", "t-invalid"];
    for t in tokens {
        fake.add_user(t, t, None);
        let r = conv(&proxy, 1, 42, t).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"), "{t}");
    }
    tokio::time::sleep(ms(250)).await;

    let not_found = r#"{"error":"Resource could not be found"}"#;
    fake.set_fault(status_fault(404, not_found, &[]), Some(1));
    let r = conv(&proxy, 1, 42, "t-404").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (404, "MISS"), "{r:?}");
    assert_eq!(r.text(), not_found);
    let again = conv(&proxy, 1, 42, "t-404").await;
    assert_eq!((again.status.as_u16(), again.x_cache()), (404, "HIT"));
    assert_eq!(again.text(), not_found);

    let forbidden = r#"{"error":"You are not authorized to do this action"}"#;
    fake.set_fault(status_fault(401, forbidden, &[]), Some(1));
    let r = conv(&proxy, 1, 42, "t-401").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (401, "MISS"), "{r:?}");
    assert_eq!(r.text(), forbidden);
    let again = conv(&proxy, 1, 42, "t-401").await;
    assert_eq!((again.status.as_u16(), again.x_cache()), (401, "HIT"));

    fake.set_fault(status_fault(403, r#"{"error":"forbidden"}"#, &[]), Some(1));
    let r = conv(&proxy, 1, 42, "t-403").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (403, "MISS"), "{r:?}");
    assert!(!r.header("cache-status").contains("stale-if-error"));

    fake.set_fault(
        status_fault(401, r#"{"error":"Invalid Access Token"}"#, &[]),
        Some(1),
    );
    let r = conv(&proxy, 1, 42, "t-invalid").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (401, "MISS"), "{r:?}");
    let again = conv(&proxy, 1, 42, "t-invalid").await;
    assert_eq!((again.status.as_u16(), again.x_cache()), (401, "LOCAL"));
    assert_eq!(again.json()["errors"][0]["code"], "invalid_token");

    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_requests_total{cache="stale",route="conversation",status="2xx"}"#
        ),
        0.0,
        "no stale answer at all"
    );
}

/// Past ttl + stale-if-error the stored entry is no longer an answer: the upstream's 5xx is
/// forwarded (`MISS`), a timeout is a local 504, a refused connect a local 502.
#[tokio::test]
async fn past_stale_if_error_the_failure_is_answered() {
    let fake = FakeChatwoot::start().await;
    fake.set_close_connections(true);
    let mut cfg = stale_config(&fake);
    cfg.stale_if_error = ms(300);
    let proxy = start_proxy(cfg).await;
    for t in ["e-1", "e-2", "e-3", "e-4"] {
        fake.add_user(t, t, None);
        assert_eq!(conv(&proxy, 1, 42, t).await.status, 200);
    }
    // Still within ttl + stale-if-error (500ms): stale.
    tokio::time::sleep(ms(250)).await;
    fake.set_fault(status_fault(503, "maintenance", &[]), Some(1));
    let r = conv(&proxy, 1, 42, "e-4").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "STALE"));

    tokio::time::sleep(ms(400)).await; // age 650ms > 500ms
    fake.set_fault(status_fault(503, "maintenance", &[]), Some(1));
    let r = conv(&proxy, 1, 42, "e-1").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (503, "MISS"), "{r:?}");
    assert_eq!(r.text(), "maintenance");
    assert!(!r.header("cache-status").contains("stale-if-error"));

    fake.set_fault(Fault::Hang, Some(1));
    let r = conv(&proxy, 1, 42, "e-2").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (504, "LOCAL"), "{r:?}");
    assert_eq!(r.json()["errors"][0]["code"], "upstream_timeout");

    drop(fake);
    tokio::time::sleep(ms(50)).await;
    let r = conv(&proxy, 1, 42, "e-3").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (502, "LOCAL"), "{r:?}");
    assert_eq!(r.json()["errors"][0]["code"], "bad_gateway");
}

// ---------------------------------------------------------------------------------------------
// 2. Concurrency limit and queue deadline
// ---------------------------------------------------------------------------------------------

/// With `upstream_max_in_flight = 2` and a 1s upstream, 10 concurrent pass-through requests
/// put at most 2 on the upstream at once; the other 8 wait the queue timeout (200ms), no
/// longer, and get `503 upstream_unavailable` with `Retry-After: 1`, `X-Cache: LOCAL`. They
/// are counted as `shed_total{reason="queue_timeout"}`, never as upstream requests, and the
/// in-flight gauge reads 2 during and 0 after.
#[tokio::test]
async fn concurrency_limit_sheds_after_the_queue_timeout() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.upstream_max_in_flight = 2;
    // One client: the global limit alone (per-client fairness is tests/fairness.rs).
    cfg.upstream_max_in_flight_per_token = Some(0);
    cfg.upstream_queue_timeout = ms(200);
    let proxy = Arc::new(start_proxy(cfg).await);
    fake.set_delay(ms(1000));

    let mut tasks = Vec::new();
    for _ in 0..10 {
        let url = proxy.url("/echo");
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let r = get(&url, None).await;
            (r, start.elapsed())
        }));
    }
    tokio::time::sleep(ms(500)).await;
    assert_eq!(sample(&proxy, IN_FLIGHT).await, 2.0, "gauge while busy");
    let mut ok = 0;
    let mut shed = 0;
    for t in tasks {
        let (r, took) = t.await.unwrap();
        if r.status == 200 {
            ok += 1;
            assert_eq!(r.x_cache(), "BYPASS");
            assert!(
                took >= ms(1000) && took < ms(1600),
                "admitted request took {took:?}"
            );
        } else {
            shed += 1;
            let ra = assert_unavailable(&r, "shed");
            assert_eq!(ra, 1, "queue-timeout Retry-After");
            assert!(
                took >= ms(190) && took < ms(600),
                "shed after the queue timeout, not later: {took:?}"
            );
        }
    }
    assert_eq!((ok, shed), (2, 8));
    assert_eq!(
        fake.max_concurrency(),
        2,
        "at most 2 at the upstream at once"
    );
    assert_eq!(fake.requests(), 2);
    let m = metrics_text(&proxy).await;
    assert_eq!(metric(&m, SHED_QUEUE), 8.0);
    assert_eq!(metric(&m, SHED_BREAKER), 0.0);
    assert_eq!(metric(&m, IN_FLIGHT), 0.0, "gauge back to 0");
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_upstream_requests_total{route="other",status="2xx"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_upstream_requests_total{route="other",status="error"}"#
        ),
        0.0,
        "a shed request is not an upstream request"
    );
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_requests_total{cache="local",route="other",status="5xx"}"#
        ),
        8.0
    );
}

/// The upstream slot is held until a streamed body ends, not just until its headers: while a
/// slow `/stream` body is still arriving (limit 1), another request is shed after the queue
/// timeout; once the body ends the slot is free again. A client that abandons a stream
/// mid-body frees the slot too.
#[tokio::test]
async fn a_streamed_body_keeps_its_upstream_slot() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.upstream_max_in_flight = 1;
    cfg.upstream_queue_timeout = ms(200);
    let proxy = start_proxy(cfg).await;
    let client = client();

    let stream_req = || {
        http::Request::get(proxy.url("/stream?chunks=8&delay_ms=150"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let resp = client.request(stream_req()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"0000"));
    assert_eq!(sample(&proxy, IN_FLIGHT).await, 1.0, "slot held mid-body");

    let start = Instant::now();
    let r = echo(&proxy).await;
    let took = start.elapsed();
    assert_eq!(assert_unavailable(&r, "shed while streaming"), 1);
    assert!(took >= ms(190) && took < ms(600), "{took:?}");
    assert_eq!(
        fake.requests(),
        1,
        "the shed request never reached the fake"
    );

    let mut total = first.len();
    while let Some(f) = body.frame().await {
        total += f.unwrap().into_data().map_or(0, |d| d.len());
    }
    assert_eq!(total, 8 * 1024);
    // The proxy releases the slot when its side of the body ends (just after ours).
    let deadline = Instant::now() + ms(1000);
    while sample(&proxy, IN_FLIGHT).await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "slot not released after the body"
        );
        tokio::time::sleep(ms(10)).await;
    }
    assert_eq!(echo(&proxy).await.status, 200);

    // Abandoned mid-body: the slot comes back without the stream finishing.
    let resp = client.request(stream_req()).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    assert_eq!(sample(&proxy, IN_FLIGHT).await, 1.0);
    let dropped_at = Instant::now();
    drop(body);
    while sample(&proxy, IN_FLIGHT).await != 0.0 {
        assert!(
            dropped_at.elapsed() < ms(1000),
            "slot kept by an abandoned stream"
        );
        tokio::time::sleep(ms(10)).await;
    }
    assert!(
        dropped_at.elapsed() < ms(1000),
        "released before the stream would have ended"
    );
    assert_eq!(echo(&proxy).await.status, 200);
    assert_eq!(sample(&proxy, SHED_QUEUE).await, 1.0);
}

// ---------------------------------------------------------------------------------------------
// 3. Circuit breaker
// ---------------------------------------------------------------------------------------------

fn breaker_config(fake: &FakeChatwoot) -> Config {
    let mut cfg = config(&fake.url());
    cfg.cache_ttl = ms(200);
    cfg.stale_while_revalidate = Duration::ZERO;
    cfg.stale_if_error = Duration::from_secs(60);
    cfg.breaker_min_requests = 4;
    cfg.breaker_window = Duration::from_secs(10);
    cfg.breaker_open = ms(500);
    cfg
}

/// Samples `chatwoot_cache_breaker_state` every 10ms until stopped: (time since `origin`, state).
fn watch_breaker(
    proxy: &Arc<ProxyHandle>,
    origin: Instant,
) -> (
    Arc<AtomicBool>,
    tokio::task::JoinHandle<Vec<(Duration, f64)>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let p = proxy.clone();
    let task = tokio::spawn(async move {
        let mut out = Vec::new();
        while !s.load(Ordering::SeqCst) {
            out.push((origin.elapsed(), sample(&p, BREAKER_STATE).await));
            tokio::time::sleep(ms(10)).await;
        }
        out
    });
    (stop, task)
}

/// Failures open the breaker; while open, no request reaches the upstream except one probe
/// per open period (the fake's request count moves only for probes); pass-through requests get
/// `503 LOCAL` with `Retry-After`, a stored conversation is served stale, an unstored one is
/// `503 LOCAL`. The state gauge reads 2 while open, 1 while a (slow) probe is out, 0 once it
/// succeeds. A failed probe doubles the open period: 500ms before the first probe, ~1s
/// between the first and the second. Every breaker rejection counts as
/// `shed_total{reason="breaker_open"}`.
#[tokio::test]
async fn breaker_opens_sheds_and_lets_one_probe_through_per_period() {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.482917");
    let proxy = Arc::new(start_proxy(breaker_config(&fake)).await);
    let warm = conv(&proxy, 1, 42, ADMIN).await; // 1 success in the window
    assert_eq!(warm.status, 200);
    tokio::time::sleep(ms(250)).await; // the entry is now stale

    // 1 success + 3 failures = 4 completions (min requests) at a 75% failure rate: open.
    fake.set_fault(http_500(), None);
    for i in 0..3 {
        assert_eq!(
            sample(&proxy, BREAKER_STATE).await,
            0.0,
            "closed before {i}"
        );
        let r = echo(&proxy).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (500, "BYPASS"));
    }
    let opened = Instant::now();
    assert_eq!(sample(&proxy, BREAKER_STATE).await, 2.0, "open");
    let upstream_at_open = fake.requests();
    assert_eq!(upstream_at_open, 4);
    let (stop, watcher) = watch_breaker(&proxy, opened);

    let mut rejected = 0.0;
    let r = echo(&proxy).await;
    assert_eq!(assert_unavailable(&r, "open, other route"), 1);
    rejected += 1.0;
    let r = get(
        &proxy.url("/api/v1/accounts/1/contacts"),
        Some("admin-token"),
    )
    .await;
    assert_unavailable(&r, "open, protected route");
    rejected += 1.0;
    let r = conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "STALE"), "{r:?}");
    assert_eq!(
        r.header("cache-status"),
        "chatwoot-cache; fwd=stale; fwd-status=503; detail=stale-if-error"
    );
    assert_eq!(r.body, warm.body);
    rejected += 1.0;
    let r = conv(&proxy, 1, 43, ADMIN).await;
    assert_unavailable(&r, "open, conversation with nothing stored");
    rejected += 1.0;
    assert_eq!(
        fake.requests(),
        upstream_at_open,
        "nothing reached the upstream"
    );

    // Keep requests coming every 20ms (each on its own task, so a slow probe does not stall
    // the stream) and note when the fake's request count moves: those are the probes.
    let mut probes: Vec<Duration> = Vec::new();
    let mut tasks = Vec::new();
    let mut count_at_1200 = None;
    let mut last_count = upstream_at_open;
    let mut closed_at = None;
    while opened.elapsed() < ms(3000) {
        let url = proxy.url("/echo");
        tasks.push(tokio::spawn(async move {
            let r = get(&url, None).await;
            (r, opened.elapsed())
        }));
        tokio::time::sleep(ms(20)).await;
        let n = fake.requests();
        if count_at_1200.is_none() && opened.elapsed() >= ms(1200) {
            count_at_1200 = Some(n);
        }
        if closed_at.is_none() && n > last_count {
            probes.push(opened.elapsed());
            if probes.len() == 1 {
                // The second probe will succeed, slowly enough to watch the half-open state.
                fake.clear_fault();
                fake.set_delay(ms(300));
            } else if probes.len() == 2 {
                closed_at = Some(opened.elapsed());
            }
        }
        last_count = n;
        if let Some(c) = closed_at
            && opened.elapsed() > c + ms(600)
        {
            break;
        }
    }
    let closed_at = closed_at.expect("second probe never came");
    stop.store(true, Ordering::SeqCst);
    let states = watcher.await.unwrap();

    assert!(
        probes[0] >= ms(450) && probes[0] < ms(800),
        "first probe after the 500ms open period: {probes:?}"
    );
    assert_eq!(
        count_at_1200,
        Some(upstream_at_open + 1),
        "only the probe reached the upstream in the first 1.2s of open"
    );
    let gap = probes[1] - probes[0];
    assert!(
        gap >= ms(950) && gap < ms(1400),
        "the failed probe doubled the open period to 1s: {probes:?}"
    );

    let mut probe_answers = 0;
    for t in tasks {
        let (r, at) = t.await.unwrap();
        if r.x_cache() == "LOCAL" {
            assert!(at < closed_at + ms(700), "shed after close: {at:?}");
            assert_eq!(assert_unavailable(&r, "open"), 1, "periods are <= 1s");
            rejected += 1.0;
        } else {
            assert_eq!(r.x_cache(), "BYPASS");
            if at < closed_at {
                probe_answers += 1;
            }
        }
    }
    assert!(probe_answers <= 2, "only probes answered while open");

    let open_before_probe = states
        .iter()
        .filter(|(t, _)| *t < probes[0] - ms(30))
        .all(|(_, s)| *s == 2.0);
    assert!(open_before_probe, "state 2 while open: {states:?}");
    assert!(
        states
            .iter()
            .any(|(t, s)| *s == 1.0 && *t >= probes[1] - ms(100)),
        "state 1 while the slow probe was out: {states:?}"
    );
    assert_eq!(states.last().unwrap().1, 0.0, "closed after the probe");
    assert_eq!(sample(&proxy, BREAKER_STATE).await, 0.0);
    let r = echo(&proxy).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "BYPASS"));
    assert_eq!(sample(&proxy, SHED_BREAKER).await, rejected);
}

/// An upstream `503` with `Retry-After: 3` keeps the breaker open for 3s, not the configured
/// 500ms: no probe before 3s, and the `Retry-After` given to clients counts down the whole
/// seconds left. The first request after that is the probe and closes it.
#[tokio::test]
async fn upstream_retry_after_keeps_the_breaker_open() {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(breaker_config(&fake)).await;
    fake.set_fault(
        status_fault(503, "maintenance", &[("Retry-After", "3")]),
        None,
    );
    for _ in 0..4 {
        let r = echo(&proxy).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (503, "BYPASS"));
        assert_eq!(r.header("retry-after"), "3", "the upstream's own answer");
    }
    let opened = Instant::now();
    assert_eq!(sample(&proxy, BREAKER_STATE).await, 2.0);
    let mut seen = Vec::new();
    while opened.elapsed() < ms(2700) {
        let r = echo(&proxy).await;
        let e = opened.elapsed().as_secs_f64();
        let ra = assert_unavailable(&r, "held open by Retry-After");
        seen.push((e, ra));
        let left = 3.0 - e;
        assert!(
            ra as f64 >= left - 0.1 && (ra as f64) < left + 1.1,
            "Retry-After {ra} with {left:.2}s left"
        );
        assert_eq!(fake.requests(), 4, "no probe at {e:.2}s");
        tokio::time::sleep(ms(100)).await;
    }
    assert_eq!(seen.first().unwrap().1, 3, "{seen:?}");
    assert_eq!(seen.last().unwrap().1, 1, "{seen:?}");
    tokio::time::sleep_until((opened + ms(3100)).into()).await;
    fake.clear_fault();
    let r = echo(&proxy).await;
    assert_eq!(
        (r.status.as_u16(), r.x_cache()),
        (200, "BYPASS"),
        "the probe"
    );
    assert_eq!(fake.requests(), 5);
    assert_eq!(sample(&proxy, BREAKER_STATE).await, 0.0);
}

/// Chatwoot's rack-attack throttle (429 text/plain "Retry later\n", no `Retry-After`) is one
/// client being throttled, not an unhealthy upstream (SPEC §6): a flood of 50 of them is passed
/// through as is, every one reaching the upstream, and the breaker stays closed (before the
/// fix, the 4th opened it and the next 46 got a local 503). Real failures still open it
/// afterwards: the 429s did not dilute them.
#[tokio::test]
async fn a_429_flood_does_not_open_the_breaker() {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(breaker_config(&fake)).await;
    fake.set_fault(rack_attack_429(), None);
    for i in 0..50 {
        let r = echo(&proxy).await;
        assert_eq!(
            (r.status.as_u16(), r.x_cache()),
            (429, "BYPASS"),
            "request {i}"
        );
        assert_eq!(r.header("content-type"), "text/plain");
        assert_eq!(r.text(), "Retry later\n");
        assert!(r.headers.get("retry-after").is_none());
    }
    assert_eq!(
        fake.requests(),
        50,
        "every throttled request reached the upstream"
    );
    assert_eq!(sample(&proxy, BREAKER_STATE).await, 0.0);
    assert_eq!(sample(&proxy, SHED_BREAKER).await, 0.0);
    fake.clear_fault();
    assert_eq!(echo(&proxy).await.status, 200);
    // Real failures after the 429s open it as usual (3 of 4 completions, the 429s not
    // counted either way).
    fake.set_fault(http_500(), Some(3));
    for _ in 0..3 {
        assert_eq!(echo(&proxy).await.status, 500);
    }
    assert_eq!(sample(&proxy, BREAKER_STATE).await, 2.0);
}

/// Sends a pass-through request on a raw connection and hangs up after `after`, before the
/// answer (a client giving up).
async fn abandon_request(proxy: &ProxyHandle, after: Duration) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(after).await;
    drop(s);
}

/// Only the upstream decides a probe (SPEC §6). The breaker is open (500ms) and the upstream
/// has recovered but answers in 300ms; every client gives up after 50ms. The probe is still
/// completed and closes the breaker. Before the fix each abandoned probe counted as a failure
/// and doubled the open period (1s, 2s, 4s...), so clients that never wait kept it open.
#[tokio::test]
async fn abandoned_probes_do_not_keep_the_breaker_open() {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(breaker_config(&fake)).await;
    fake.set_fault(http_500(), Some(4));
    for _ in 0..4 {
        assert_eq!(echo(&proxy).await.status, 500);
    }
    assert_eq!(sample(&proxy, BREAKER_STATE).await, 2.0);
    fake.set_delay(ms(300));
    let start = Instant::now();
    // Impatient clients for 2.5s: the probe goes out at ~500ms and is abandoned at once.
    while start.elapsed() < ms(2500) {
        abandon_request(&proxy, ms(50)).await;
        tokio::time::sleep(ms(50)).await;
    }
    assert_eq!(
        sample(&proxy, BREAKER_STATE).await,
        0.0,
        "the completed probe closed the breaker"
    );
    fake.set_delay(Duration::ZERO);
    let r = echo(&proxy).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "BYPASS"));
}

/// Requests that were waiting for an upstream slot when the breaker opened do not reach the
/// upstream once they get a slot (SPEC §6: while open, nothing but probes). Limit 2, a slow
/// failing upstream, 6 concurrent requests: the first 4 fail and open the breaker, the 2 still
/// queued are answered `503 LOCAL` instead of hitting the upstream.
#[tokio::test]
async fn requests_queued_before_the_breaker_opened_are_not_sent() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = breaker_config(&fake);
    cfg.upstream_max_in_flight = 2;
    cfg.upstream_max_in_flight_per_token = Some(0);
    cfg.upstream_queue_timeout = Duration::from_secs(2);
    cfg.breaker_open = Duration::from_secs(5);
    let proxy = start_proxy(cfg).await;
    fake.set_delay(ms(300));
    fake.set_fault(http_500(), None);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = proxy.url("/echo");
        tasks.push(tokio::spawn(async move { get(&url, None).await }));
    }
    let mut failed = 0;
    let mut rejected = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status.as_u16() {
            500 => failed += 1,
            _ => {
                assert_unavailable(&r, "queued behind the opening");
                rejected += 1;
            }
        }
    }
    // The 4th failure opens the breaker. A queued request can still legitimately go out
    // before that 4th answer arrives (a slot frees as soon as an earlier failure's body ends,
    // and the breaker cannot know the 4th will fail), so 5 sent is possible under load; what
    // must never happen is a queued request going out after the breaker opened, which is
    // what let all 6 through before the recheck existed.
    let sent = fake.requests();
    assert!(
        (4..=5).contains(&sent),
        "{sent} sent; queued requests went out after opening"
    );
    assert_eq!((failed, rejected), (sent, 6 - sent));
    assert!(rejected >= 1);
    assert_eq!(sample(&proxy, SHED_BREAKER).await, rejected as f64);
    assert_eq!(sample(&proxy, BREAKER_STATE).await, 2.0);
    assert_eq!(sample(&proxy, IN_FLIGHT).await, 0.0);
}

/// A conversation request shed by the concurrency limit is served from a stale entry
/// (`fwd-status=503; detail=stale-if-error`) after the queue timeout, and without one it is a
/// `503 LOCAL` with `Retry-After: 1`.
#[tokio::test]
async fn shed_conversation_requests_are_served_stale() {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.482917");
    let mut cfg = stale_config(&fake);
    cfg.upstream_max_in_flight = 1;
    cfg.upstream_queue_timeout = ms(200);
    let proxy = start_proxy(cfg).await;
    let warm = conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(warm.status, 200);
    tokio::time::sleep(ms(250)).await;
    // Hold the only slot with a slow streamed body.
    let client = client();
    let req = http::Request::get(proxy.url("/stream?chunks=10&delay_ms=100"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();

    let start = Instant::now();
    let r = conv(&proxy, 1, 42, ADMIN).await;
    let took = start.elapsed();
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "STALE"), "{r:?}");
    assert_eq!(
        r.header("cache-status"),
        "chatwoot-cache; fwd=stale; fwd-status=503; detail=stale-if-error"
    );
    assert_eq!(r.body, warm.body);
    assert!(took >= ms(190) && took < ms(600), "{took:?}");

    let r = conv(&proxy, 1, 43, ADMIN).await;
    assert_eq!(assert_unavailable(&r, "shed, nothing stored"), 1);
    assert_eq!(fake.requests(), 2, "warm-up and the stream only");
    assert_eq!(sample(&proxy, SHED_QUEUE).await, 2.0);
    drop(body);
}

// ---------------------------------------------------------------------------------------------
// 4. Upstream metrics
// ---------------------------------------------------------------------------------------------

/// `chatwoot_cache_upstream_requests_total{route,status}` counts each upstream exchange by
/// status class, and as `status="error"` for a timeout, a non-HTTP answer, a reset and a
/// refused connect; `chatwoot_cache_upstream_request_duration_seconds` observes every one of
/// them, including the 300ms the hang took.
#[tokio::test]
async fn upstream_requests_and_durations_are_counted() {
    let fake = FakeChatwoot::start().await;
    fake.set_close_connections(true);
    let mut cfg = config(&fake.url());
    cfg.upstream_timeout = ms(300);
    cfg.breaker_min_requests = 100_000;
    let proxy = start_proxy(cfg).await;

    assert_eq!(echo(&proxy).await.status, 200);
    assert_eq!(echo(&proxy).await.status, 200);
    fake.set_fault(http_500(), Some(1));
    assert_eq!(echo(&proxy).await.status, 500);
    fake.set_fault(status_fault(404, "{}", &[]), Some(1));
    assert_eq!(echo(&proxy).await.status, 404);
    fake.set_fault(Fault::Hang, Some(1));
    assert_eq!(echo(&proxy).await.status, 504);
    fake.set_fault(Fault::Garbage, Some(1));
    assert_eq!(echo(&proxy).await.status, 502);
    fake.set_fault(Fault::Reset, Some(1));
    assert_eq!(echo(&proxy).await.status, 502);
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.status, 200);
    let contacts = get(
        &proxy.url("/api/v1/accounts/1/contacts"),
        Some("admin-token"),
    )
    .await;
    assert_eq!(contacts.status, 200);

    let m = metrics_text(&proxy).await;
    let up = |route: &str, status: &str| {
        metric(
            &m,
            &format!(
                r#"chatwoot_cache_upstream_requests_total{{route="{route}",status="{status}"}}"#
            ),
        )
    };
    assert_eq!(up("other", "2xx"), 2.0);
    assert_eq!(up("other", "4xx"), 1.0);
    assert_eq!(up("other", "5xx"), 1.0);
    assert_eq!(up("other", "error"), 3.0, "timeout, garbage, reset");
    assert_eq!(up("conversation", "2xx"), 1.0);
    assert_eq!(up("protected", "2xx"), 1.0);
    assert_eq!(up("conversation", "error") + up("protected", "error"), 0.0);
    let dur = |suffix: &str, labels: &str| {
        metric(
            &m,
            &format!("chatwoot_cache_upstream_request_duration_seconds_{suffix}{{{labels}}}"),
        )
    };
    assert_eq!(dur("count", r#"route="other""#), 7.0);
    assert_eq!(dur("count", r#"route="conversation""#), 1.0);
    assert_eq!(dur("count", r#"route="protected""#), 1.0);
    assert!(dur("sum", r#"route="other""#) >= 0.3, "the hang took 300ms");
    assert_eq!(
        dur("bucket", r#"route="other",le="0.25""#),
        6.0,
        "all but the hang under 250ms"
    );

    // Refused: nobody listens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let proxy = start_proxy(config(&format!("http://{dead_addr}"))).await;
    assert_eq!(echo(&proxy).await.status, 502);
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_upstream_requests_total{route="other",status="error"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_upstream_request_duration_seconds_count{route="other"}"#
        ),
        1.0
    );
}

/// After a failed revalidation the key is served stale without new upstream attempts for
/// min(ttl, 1s): sequential requests do not each hit a failing upstream (nginx's
/// `proxy_cache_use_stale` does), then the next attempt goes out, and recovery is seen.
#[tokio::test]
async fn a_failed_revalidation_backs_off_per_key() {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(stale_config(&fake)).await;
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.x_cache(), "MISS");
    tokio::time::sleep(ms(250)).await;
    fake.set_fault(http_500(), None);
    let before = fake.requests();
    let start = Instant::now();
    let mut answers = 0;
    while start.elapsed() < ms(150) {
        let r = conv(&proxy, 1, 42, ADMIN).await;
        assert_eq!(r.x_cache(), "STALE");
        assert_eq!(
            r.header("cache-status"),
            "chatwoot-cache; fwd=stale; fwd-status=500; detail=stale-if-error"
        );
        answers += 1;
    }
    assert!(answers > 5, "{answers}");
    assert_eq!(
        fake.requests() - before,
        1,
        "{answers} sequential stale answers, one upstream attempt"
    );
    // The backoff (200ms here) is over: one more attempt, still failing.
    tokio::time::sleep(ms(250)).await;
    let r = conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(r.x_cache(), "STALE");
    assert_eq!(fake.requests() - before, 2);
    // Healthy again: the next attempt after the backoff refreshes the entry.
    fake.clear_fault();
    tokio::time::sleep(ms(250)).await;
    let r = conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(r.status, 200);
    assert!(
        matches!(r.x_cache(), "REVALIDATED" | "MISS"),
        "{}",
        r.x_cache()
    );
}

/// A request whose client is still uploading never becomes the half-open probe (SPEC 6: only
/// the upstream decides a probe). An upload of 12,000 bytes at ~650 B/s (a legal rate) that
/// arrives once the open period is over is refused like any non-probe, and a polite GET
/// probes and closes the breaker (before: the upload was the probe, and GETs got 503 until
/// it ended, ~18 s).
#[tokio::test]
async fn a_slow_upload_does_not_hold_the_probe() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(breaker_config(&fake)).await;
    fake.set_fault(http_500(), None);
    for _ in 0..4 {
        assert_eq!(echo(&proxy).await.status, 500);
    }
    assert_eq!(sample(&proxy, BREAKER_STATE).await, 2.0, "open");
    fake.clear_fault();
    // Past the 500 ms open period: a probe is due.
    tokio::time::sleep(ms(800)).await;
    let mut upload = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 12000\r\n\r\n";
    upload.write_all(head.as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..120 {
            if upload.write_all(&[b'u'; 100]).await.is_err() {
                break;
            }
            tokio::time::sleep(ms(150)).await;
        }
        let mut answer = vec![0u8; 512];
        let n = upload.read(&mut answer).await.unwrap_or(0);
        String::from_utf8_lossy(&answer[..n]).into_owned()
    });
    // Let the upload's head be admitted first.
    tokio::time::sleep(ms(300)).await;
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < Duration::from_secs(10) {
        let r = echo(&proxy).await;
        if r.status == 200 {
            last = None;
            break;
        }
        last = Some(r.status);
        tokio::time::sleep(ms(100)).await;
    }
    eprintln!(
        "polite GET served {:?} after a slow upload arrived in an open breaker",
        started.elapsed()
    );
    assert_eq!(
        last, None,
        "a polite GET probes and gets through within 10 s"
    );
    assert_eq!(sample(&proxy, BREAKER_STATE).await, 0.0, "closed");
    // The upload itself was refused with a 503 at its head, not sent upstream.
    let answer = trickle.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
}
