//! Every SPEC §9 metric, scraped from `/metrics` and parsed with a real exposition-format parser
//! (prometheus-parse), moves when its event happens; the dashboard and alerts in `deploy/` use
//! only metrics the binary exposes; nothing secret or high-cardinality is in a label.

mod support;

use std::time::Duration;

use http::Method;
use prometheus_parse::{Scrape, Value};
use support::*;

const CONV: &str = "/api/v1/accounts/1/conversations/42";

struct Scraped(Scrape);

impl Scraped {
    async fn of(proxy: &ProxyHandle) -> Scraped {
        let text = metrics_text(proxy).await;
        let lines = text.lines().map(|l| Ok(l.to_string()));
        Scraped(Scrape::parse(lines).expect("valid Prometheus text format"))
    }

    /// Sum of the samples of `name` whose labels include `labels`; for a histogram, its count.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                Value::Histogram(buckets) => buckets
                    .iter()
                    .find(|b| b.less_than.is_infinite())
                    .map_or(0.0, |b| b.count),
                Value::Summary(_) => 0.0,
            })
            .sum()
    }

    fn names(&self) -> std::collections::BTreeSet<String> {
        self.0.samples.iter().map(|s| s.metric.clone()).collect()
    }
}

fn admin_cfg(fake: &FakeChatwoot) -> chatwoot_cache::Config {
    let mut cfg = config(&fake.url());
    cfg.admin_token = Some("admin-secret-123".into());
    cfg.webhook_secret = Some("webhook-secret-123".into());
    cfg.webhook_allow_query_secret = true;
    cfg
}

/// Request, cache, invalidation and auth metrics each move on their event.
#[tokio::test]
async fn request_cache_and_invalidation_metrics_move() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = admin_cfg(&fake);
    cfg.cache_ttl = Duration::from_millis(200);
    cfg.stale_while_revalidate = Duration::ZERO;
    cfg.negative_ttl = Duration::from_millis(100);
    let proxy = start_proxy(cfg).await;
    let before = Scraped::of(&proxy).await;
    assert_eq!(before.value("chatwoot_cache_entries", &[]), 0.0);

    // miss, then hit
    assert_eq!(conv(&proxy, 1, 42, "admin-token").await.x_cache(), "MISS");
    assert_eq!(conv(&proxy, 1, 42, "admin-token").await.x_cache(), "HIT");
    // revalidation (304 from the fake's Rails ETag), replacing the entry
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        conv(&proxy, 1, 42, "admin-token").await.x_cache(),
        "REVALIDATED"
    );
    // auth rejections
    let _ = get(&proxy.url(CONV), None).await;
    let _ = send(
        Method::GET,
        &proxy.url(CONV),
        &[("api_access_token", "a b")],
        b"",
    )
    .await;
    fake.add_user("doomed-token", "doomed", None);
    let _ = conv(&proxy, 1, 42, "doomed-token").await;
    fake.revoke("doomed-token");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let _ = conv(&proxy, 1, 42, "doomed-token").await; // upstream: Invalid Access Token
    let _ = conv(&proxy, 1, 42, "doomed-token").await; // local invalid_token
    // negative entry that expires (evictions{cause="expired"}) before the purge below
    let _ = conv(&proxy, 1, 999, "admin-token").await;
    // moka's expiry timer wheel has ~1 s granularity.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let _ = metrics_text(&proxy).await; // housekeeping runs on scrape
    // write-through, webhook and purge invalidations
    let w = send(
        Method::POST,
        &proxy.url(&format!("{CONV}/messages")),
        &[("api_access_token", "admin-token")],
        b"{}",
    )
    .await;
    assert_eq!(w.status, 200);
    let body = br#"{"event":"conversation_updated","id":42}"#;
    let w = send(
        Method::POST,
        &proxy.admin_url("/webhooks/chatwoot/accounts/1?secret=webhook-secret-123"),
        &[],
        body,
    )
    .await;
    assert_eq!(w.status, 200, "{}", w.text());
    let _ = conv(&proxy, 1, 42, "agent-token").await;
    let p = send(
        Method::DELETE,
        &proxy.admin_url("/cache"),
        &[("authorization", "Bearer admin-secret-123")],
        b"",
    )
    .await;
    assert_eq!(p.status, 200);
    tokio::time::sleep(Duration::from_millis(150)).await;

    let after = Scraped::of(&proxy).await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        let (b, a) = (before.value(name, labels), after.value(name, labels));
        assert!(a > b, "{name}{labels:?} did not move: {b} -> {a}");
    };
    moved(
        "chatwoot_cache_requests_total",
        &[
            ("route", "conversation"),
            ("cache", "miss"),
            ("status", "2xx"),
        ],
    );
    moved(
        "chatwoot_cache_requests_total",
        &[
            ("route", "conversation"),
            ("cache", "hit"),
            ("status", "2xx"),
        ],
    );
    moved(
        "chatwoot_cache_requests_total",
        &[("route", "conversation"), ("cache", "revalidated")],
    );
    moved(
        "chatwoot_cache_requests_total",
        &[
            ("route", "conversation"),
            ("cache", "local"),
            ("status", "4xx"),
        ],
    );
    moved(
        "chatwoot_cache_requests_total",
        &[("route", "protected"), ("cache", "bypass")],
    );
    moved(
        "chatwoot_cache_request_duration_seconds",
        &[("route", "conversation"), ("cache", "hit")],
    );
    moved(
        "chatwoot_cache_upstream_requests_total",
        &[("route", "conversation"), ("status", "2xx")],
    );
    moved(
        "chatwoot_cache_upstream_requests_total",
        &[("route", "conversation"), ("status", "3xx")],
    );
    moved(
        "chatwoot_cache_upstream_request_duration_seconds",
        &[("route", "conversation")],
    );
    moved(
        "chatwoot_cache_revalidations_total",
        &[("outcome", "not_modified")],
    );
    moved("chatwoot_cache_evictions_total", &[("cause", "replaced")]);
    moved("chatwoot_cache_evictions_total", &[("cause", "explicit")]);
    moved("chatwoot_cache_evictions_total", &[("cause", "expired")]);
    moved("chatwoot_cache_invalidations_total", &[("source", "write")]);
    moved(
        "chatwoot_cache_invalidations_total",
        &[("source", "webhook")],
    );
    moved("chatwoot_cache_invalidations_total", &[("source", "purge")]);
    moved(
        "chatwoot_cache_auth_rejections_total",
        &[("reason", "missing")],
    );
    moved(
        "chatwoot_cache_auth_rejections_total",
        &[("reason", "malformed")],
    );
    moved(
        "chatwoot_cache_auth_rejections_total",
        &[("reason", "invalid")],
    );
}

/// Entries and stored bytes track the store; size evictions happen under pressure.
#[tokio::test]
async fn store_gauges_and_size_evictions() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.cache_max_bytes = 64 * 1024;
    cfg.max_object_bytes = 16 * 1024;
    let proxy = start_proxy(cfg).await;
    let _ = conv(&proxy, 1, 42, "admin-token").await;
    let s = Scraped::of(&proxy).await;
    assert_eq!(s.value("chatwoot_cache_entries", &[]), 1.0);
    let one = s.value("chatwoot_cache_stored_bytes", &[]);
    assert!(
        one > 4000.0 && one < 8000.0,
        "one ~3 KB conversation kept as gzip (~1 KB), the identity copy this client reads, \
         and headers: {one}"
    );
    for c in 100..160 {
        fake.add_conversation(1, c, "1765182000.5");
        let _ = conv(&proxy, 1, c, "admin-token").await;
    }
    let s = Scraped::of(&proxy).await;
    assert!(s.value("chatwoot_cache_stored_bytes", &[]) <= 64.0 * 1024.0);
    assert!(s.value("chatwoot_cache_evictions_total", &[("cause", "size")]) > 0.0);
}

/// Coalescing, in-flight, shedding and breaker metrics move under load and failure.
#[tokio::test]
async fn protection_metrics_move() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.upstream_max_in_flight = 1;
    cfg.upstream_queue_timeout = Duration::from_millis(50);
    cfg.breaker_min_requests = 2;
    cfg.breaker_open = Duration::from_secs(5);
    let proxy = start_proxy(cfg).await;
    fake.set_delay(Duration::from_millis(400));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let url = proxy.url(CONV);
        tasks.push(tokio::spawn(
            async move { get(&url, Some("admin-token")).await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let during = Scraped::of(&proxy).await;
    assert_eq!(during.value("chatwoot_cache_upstream_in_flight", &[]), 1.0);
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    let s = Scraped::of(&proxy).await;
    assert_eq!(s.value("chatwoot_cache_coalesced_total", &[]), 2.0);
    assert_eq!(s.value("chatwoot_cache_upstream_in_flight", &[]), 0.0);

    // Two slow pass-through requests with one slot: one is shed after the queue timeout.
    let a = tokio::spawn({
        let url = proxy.url("/echo/a");
        async move { get(&url, None).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = get(&proxy.url("/echo/b"), None).await;
    assert_eq!(b.status, 503);
    assert_eq!(a.await.unwrap().status, 200);
    let s = Scraped::of(&proxy).await;
    assert_eq!(
        s.value("chatwoot_cache_shed_total", &[("reason", "queue_timeout")]),
        1.0
    );

    // Failures open the breaker; the next request is shed by it.
    fake.set_delay(Duration::ZERO);
    fake.set_fault(
        Fault::Status {
            status: 502,
            body: "{}".into(),
            headers: vec![],
        },
        None,
    );
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("/echo/x"), None).await.status, 502);
    }
    let r = get(&proxy.url("/echo/x"), None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.x_cache(), "LOCAL");
    let s = Scraped::of(&proxy).await;
    assert_eq!(s.value("chatwoot_cache_breaker_state", &[]), 2.0);
    assert_eq!(
        s.value("chatwoot_cache_shed_total", &[("reason", "breaker_open")]),
        1.0
    );
    assert!(
        s.value(
            "chatwoot_cache_upstream_requests_total",
            &[("route", "other"), ("status", "5xx")]
        ) >= 2.0
    );
}

/// The metric set is exactly SPEC §9, labels are bounded, and no token or id leaks into it.
#[tokio::test]
async fn metric_names_and_labels_are_the_contract() {
    let (_fake, proxy) = setup().await;
    let _ = conv(&proxy, 1, 42, "admin-token").await;
    let s = Scraped::of(&proxy).await;
    let expected = [
        "chatwoot_cache_requests_total",
        "chatwoot_cache_request_duration_seconds",
        "chatwoot_cache_upstream_requests_total",
        "chatwoot_cache_upstream_request_duration_seconds",
        "chatwoot_cache_upstream_in_flight",
        "chatwoot_cache_entries",
        "chatwoot_cache_stored_bytes",
        "chatwoot_cache_evictions_total",
        "chatwoot_cache_coalesced_total",
        "chatwoot_cache_revalidations_total",
        "chatwoot_cache_refresh_ahead_total",
        "chatwoot_cache_invalidations_total",
        "chatwoot_cache_shed_total",
        "chatwoot_cache_breaker_state",
        "chatwoot_cache_auth_rejections_total",
        // SPEC §13
        "chatwoot_cache_config_reloads_total",
        "chatwoot_cache_tls_cert_expiry_timestamp_seconds",
    ];
    let names = s.names();
    for e in expected {
        // The expiry gauge has a series only for certificates in use (none here).
        if e != "chatwoot_cache_tls_cert_expiry_timestamp_seconds" {
            assert!(names.contains(e), "{e} missing");
        }
    }
    let allowed_labels = [
        "route", "cache", "status", "cause", "outcome", "source", "reason", "result", "listener",
    ];
    for sample in &s.0.samples {
        let family = sample
            .metric
            .trim_end_matches("_sum")
            .trim_end_matches("_count")
            .trim_end_matches("_bucket");
        assert!(
            expected.contains(&family),
            "unexpected metric {}",
            sample.metric
        );
        for (k, v) in sample.labels.iter() {
            assert!(
                allowed_labels.contains(&k.as_str()),
                "label {k} on {}",
                sample.metric
            );
            // `token_quota` is a SPEC 12 shed reason, not a token.
            assert!(
                (!v.contains("token") || v == "token_quota")
                    && !v.chars().any(|c| c.is_ascii_digit() && k != "status"),
                "{k}={v}"
            );
        }
    }
    let text = metrics_text(&proxy).await;
    assert!(!text.contains("admin-token"));
}

/// Every metric the Grafana dashboard and the alert rules query exists in `/metrics`.
#[tokio::test]
async fn dashboard_and_alerts_use_only_real_metrics() {
    // With certificates on both sides, so the expiry series exist too.
    let fake = FakeChatwoot::start().await;
    let pki = test_pki();
    let dir = temp_dir("metrics-tls");
    for (name, content) in [("cert.pem", &pki.cert_pem), ("key.pem", &pki.key_pem)] {
        std::fs::write(dir.join(name), content).unwrap();
    }
    let mut cfg = config(&fake.url());
    cfg.tls_cert_file = Some(dir.join("cert.pem"));
    cfg.tls_key_file = Some(dir.join("key.pem"));
    cfg.upstream_client_cert_file = Some(dir.join("cert.pem"));
    cfg.upstream_client_key_file = Some(dir.join("key.pem"));
    // And with the shared tier (a real redis-server), so its series (redis_up, l2, bus) exist.
    let redis = support::redis::RedisServer::start();
    cfg.redis = Some(chatwoot_cache::config::RedisConfig {
        url: redis.url(),
        ca_file: None,
        timeout: Duration::from_secs(2),
        key_prefix: "metrics-test:".into(),
    });
    cfg.scope_secret = Some("a-scope-secret-of-at-least-32-bytes!".into());
    let proxy = start_proxy(cfg).await;
    support::redis::wait_ready(&proxy).await;
    let text = metrics_text(&proxy).await;
    let exposed: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(t) => t.split(' ').next(),
            None if l.starts_with('#') || l.is_empty() => None,
            None => l.split(['{', ' ']).next(),
        })
        .map(str::to_string)
        .collect();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(root).join("deploy")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("json" | "yaml" | "yml")
            ) {
                files.push(p);
            }
        }
    }
    let mut checked = 0;
    for f in &files {
        let content = std::fs::read_to_string(f).unwrap();
        let mut rest = content.as_str();
        while let Some(i) = rest.find("chatwoot_cache_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            rest = &tail[end..];
            // Kubernetes object names like chatwoot_cache_... do not exist; only metric names.
            assert!(
                exposed.contains(name),
                "{} uses {name}, which /metrics does not expose",
                f.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked > 20,
        "expected the dashboard and alerts to reference metrics ({checked})"
    );
}
