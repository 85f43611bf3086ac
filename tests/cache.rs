//! End-to-end: the conversation cache (SPEC §3 `X-Cache`/`Cache-Status`, §4 invalid tokens,
//! §5 storage, freshness, revalidation and coalescing, §7 invalidation, §9 metrics) against the
//! fake Chatwoot. Timings are short (hundreds of milliseconds) and every wait past a TTL is the
//! TTL plus a margin, so the file stays fast on a loaded two-core machine.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chatwoot_cache::Config;
use http::Method;
use proptest::prelude::*;
use support::fake::{Fault, render};
use support::*;

const CONV: &str = "/api/v1/accounts/1/conversations/42";
const ADMIN: &str = "admin-token";
const AGENT: &str = "agent-token";
const RAILS_CACHE_CONTROL: &str = "max-age=0, private, must-revalidate";
const PURGE_TOKEN: &str = "purge-secret-0123456";
const WEBHOOK_SECRET: &str = "webhook-secret-0123456";
const NOT_AUTHORIZED: &str = r#"{"error":"You are not authorized to do this action"}"#;
const NOT_FOUND: &str = r#"{"error":"Resource could not be found"}"#;

// === helpers ===

/// Extra headers for a fault answer.
type Headers = Vec<(String, String)>;
/// One request header.
type Header<'a> = (&'a str, &'a str);

fn conv_path(a: u64, c: u64) -> String {
    format!("/api/v1/accounts/{a}/conversations/{c}")
}

/// A proxy in front of `fake` with SPEC defaults changed by `tweak`.
async fn start(fake: &FakeChatwoot, tweak: impl FnOnce(&mut Config)) -> ProxyHandle {
    let mut c = config(&fake.url());
    tweak(&mut c);
    start_proxy(c).await
}

/// A request on the public listener carrying `token` plus `extra` headers.
async fn call(
    proxy: &ProxyHandle,
    method: Method,
    path: &str,
    token: &str,
    extra: &[(&str, &str)],
) -> Resp {
    let mut h = vec![("api_access_token", token)];
    h.extend_from_slice(extra);
    send(method, &proxy.url(path), &h, b"").await
}

async fn get_conv(proxy: &ProxyHandle, a: u64, c: u64, token: &str) -> Resp {
    call(proxy, Method::GET, &conv_path(a, c), token, &[]).await
}

async fn purge(proxy: &ProxyHandle, path: &str, auth: Option<&str>) -> Resp {
    let h: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    send(Method::DELETE, &proxy.admin_url(path), &h, b"").await
}

fn bearer() -> String {
    format!("Bearer {PURGE_TOKEN}")
}

fn version(r: &Resp) -> u64 {
    r.json()["custom_attributes"]["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("no version in {}", r.text()))
}

fn viewer(r: &Resp) -> String {
    r.json()["custom_attributes"]["viewer"]
        .as_str()
        .unwrap_or_else(|| panic!("no viewer in {}", r.text()))
        .to_string()
}

/// Polls `/metrics` until `series` reaches `want` (request metrics are recorded when the
/// response body ends, a moment after the client has read it).
async fn wait_metric(proxy: &ProxyHandle, series: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics_text(proxy).await;
        let v = metric(&text, series);
        if v == want {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} = {v}, waited for {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn metric_now(proxy: &ProxyHandle, series: &str) -> f64 {
    metric(&metrics_text(proxy).await, series)
}

fn revalidations(outcome: &str) -> String {
    format!(r#"chatwoot_cache_revalidations_total{{outcome="{outcome}"}}"#)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hmac_hex(secret: &str, msg: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::sign(&key, msg)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Posts a Chatwoot webhook for account `a`, signed with `secret` at `timestamp`.
async fn webhook(proxy: &ProxyHandle, a: u64, body: &str, secret: &str, timestamp: u64) -> Resp {
    let ts = timestamp.to_string();
    let sig = format!(
        "sha256={}",
        hmac_hex(secret, format!("{ts}.{body}").as_bytes())
    );
    send(
        Method::POST,
        &proxy.admin_url(&format!("/webhooks/chatwoot/accounts/{a}")),
        &[
            ("content-type", "application/json"),
            ("x-chatwoot-timestamp", &ts),
            ("x-chatwoot-signature", &sig),
        ],
        body.as_bytes(),
    )
    .await
}

// === 1. MISS, HIT, HEAD ===

/// MISS then HIT: exact `Cache-Status`, `Age`, a strong quoted ETag, `Last-Modified` from
/// `updated_at`, the upstream `Date` and Rails' `Cache-Control` replayed unchanged, no cookie or
/// devise credential ever replayed; identity is asked of the upstream whatever the client accepts.
#[tokio::test]
async fn miss_then_hit_replays_the_stored_answer() {
    let fake = FakeChatwoot::start().await;
    let upstream_date = "Mon, 08 Dec 2025 08:20:05 GMT";
    *fake.state.show_headers.lock().unwrap() = vec![
        ("date".into(), upstream_date.into()),
        (
            "set-cookie".into(),
            "_chatwoot_session=secret; path=/".into(),
        ),
        ("access-token".into(), "devise-rotating-credential".into()),
    ];
    let proxy = start(&fake, |_| {}).await;

    let miss = call(
        &proxy,
        Method::GET,
        CONV,
        ADMIN,
        &[("accept-encoding", "gzip, deflate, br")],
    )
    .await;
    assert_eq!(miss.status, 200);
    assert_eq!(miss.x_cache(), "MISS");
    assert_eq!(
        miss.header("cache-status"),
        "chatwoot-cache; fwd=miss; stored"
    );
    assert_eq!(
        fake.last_seen().headers["accept-encoding"],
        "identity",
        "the proxy must read identity JSON"
    );
    assert_eq!(fake.show_requests(), 1);

    let hit = call(&proxy, Method::GET, CONV, ADMIN, &[]).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(hit.header("cache-status"), "chatwoot-cache; hit; ttl=10");
    assert_eq!(miss.header("content-encoding"), "gzip");
    assert_eq!(
        hit.header("content-encoding"),
        "",
        "no Accept-Encoding: identity"
    );
    assert_eq!(hit.body, miss.decoded());
    assert!(miss.body.len() * 2 < hit.body.len(), "stored compressed");
    assert_eq!(fake.show_requests(), 1, "a hit never reaches the upstream");

    for r in [&miss, &hit] {
        assert_eq!(r.header("age"), "0");
        let etag = r.header("etag");
        assert!(
            etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'),
            "strong, quoted ETag: {etag:?}"
        );
        assert_eq!(r.header("last-modified"), "Mon, 08 Dec 2025 08:20:00 GMT");
        assert_eq!(r.header("date"), upstream_date, "upstream Date replayed");
        assert_eq!(r.header("cache-control"), RAILS_CACHE_CONTROL);
        assert_eq!(r.header("content-type"), "application/json; charset=utf-8");
        assert_eq!(r.header("content-length"), r.body.len().to_string());
        assert!(r.headers.get("set-cookie").is_none(), "Set-Cookie replayed");
        assert!(
            r.headers.get("access-token").is_none(),
            "devise header replayed"
        );
        assert_eq!(r.header("vary"), "Accept-Encoding");
        assert_eq!(viewer(r), "admin");
    }
    // One strong ETag per form (SPEC 14).
    let identity_etag = hit.header("etag");
    assert_eq!(
        miss.header("etag"),
        format!("{}-gz\"", &identity_etag[..identity_etag.len() - 1])
    );

    // HEAD from the same entry: headers, no body, the real length.
    let head = call(&proxy, Method::HEAD, CONV, ADMIN, &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.x_cache(), "HIT");
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), hit.body.len().to_string());
    assert_eq!(head.header("etag"), hit.header("etag"));
    assert_eq!(fake.show_requests(), 1);

    // Age counts whole seconds; Age + remaining ttl (rounded up) is the ttl.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = call(&proxy, Method::GET, CONV, ADMIN, &[]).await;
    assert_eq!(later.x_cache(), "HIT");
    let age: u64 = later.header("age").parse().unwrap();
    let ttl: u64 = later
        .header("cache-status")
        .strip_prefix("chatwoot-cache; hit; ttl=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(age >= 1, "Age {age}");
    assert_eq!(age + ttl, 10, "Age {age}, ttl {ttl}");
}

/// A cold HEAD fetches with GET upstream, answers without a body but with the real length, and
/// stores the entry a later GET is served from.
#[tokio::test]
async fn cold_head_fills_the_cache() {
    let (fake, proxy) = setup().await;
    let head = call(&proxy, Method::HEAD, CONV, ADMIN, &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.x_cache(), "MISS");
    assert!(head.body.is_empty());
    assert_eq!(fake.last_seen().method, Method::GET);
    let get = call(&proxy, Method::GET, CONV, ADMIN, &[]).await;
    assert_eq!(get.x_cache(), "HIT");
    assert!(!get.body.is_empty());
    assert_eq!(head.header("content-length"), get.body.len().to_string());
    assert_eq!(head.header("etag"), get.header("etag"));
    assert_eq!(fake.show_requests(), 1);
}

// === 2. client conditionals ===

/// A matching `If-None-Match` (exact, `W/` form, in a list) or an `If-Modified-Since` not older
/// than `Last-Modified` gets a bodiless 304 with ETag, Cache-Control and Date and no
/// Content-Type; non-matching validators get the 200. Client validators never reach Chatwoot.
#[tokio::test]
async fn client_conditionals_are_answered_from_the_entry() {
    let (fake, proxy) = setup().await;
    let full = get_conv(&proxy, 1, 42, ADMIN).await;
    let etag = full.header("etag").to_string();
    let lm = full.header("last-modified").to_string();
    let lm_time = httpdate::parse_http_date(&lm).unwrap();
    let earlier = httpdate::fmt_http_date(lm_time - Duration::from_secs(1));
    let later = httpdate::fmt_http_date(lm_time + Duration::from_secs(3600));
    let weak = format!("W/{etag}");
    let list = format!("\"nope\", {etag}");

    let not_modified: Vec<Vec<(&str, &str)>> = vec![
        vec![("if-none-match", etag.as_str())],
        vec![("if-none-match", weak.as_str())],
        vec![("if-none-match", list.as_str())],
        vec![("if-modified-since", lm.as_str())],
        vec![("if-modified-since", later.as_str())],
    ];
    for h in &not_modified {
        for method in [Method::GET, Method::HEAD] {
            let r = call(&proxy, method.clone(), CONV, ADMIN, h).await;
            assert_eq!(r.status, 304, "{method} {h:?}");
            assert_eq!(r.x_cache(), "HIT");
            assert!(r.body.is_empty());
            assert_eq!(r.header("etag"), etag);
            assert_eq!(r.header("cache-control"), RAILS_CACHE_CONTROL);
            assert!(!r.header("date").is_empty(), "304 carries Date");
            assert!(r.headers.get("content-type").is_none(), "{h:?}");
        }
    }
    let modified: Vec<Vec<(&str, &str)>> = vec![
        vec![("if-none-match", "\"nope\"")],
        vec![("if-modified-since", earlier.as_str())],
        // If-None-Match takes precedence over a matching If-Modified-Since.
        vec![
            ("if-none-match", "\"nope\""),
            ("if-modified-since", lm.as_str()),
        ],
    ];
    for h in &modified {
        let r = call(&proxy, Method::GET, CONV, ADMIN, h).await;
        assert_eq!(r.status, 200, "{h:?}");
        assert_eq!(r.x_cache(), "HIT");
        assert_eq!(r.body, full.body);
    }
    assert_eq!(fake.show_requests(), 1);

    // Cold, with validators: they are stripped from the upstream request.
    fake.add_conversation(1, 43, "1765182000.5");
    let r = call(
        &proxy,
        Method::GET,
        &conv_path(1, 43),
        ADMIN,
        &[("if-none-match", "\"x\""), ("if-modified-since", &later)],
    )
    .await;
    // "x" does not match, and If-None-Match wins over If-Modified-Since.
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "MISS");
    let seen = fake.last_seen();
    assert!(seen.headers.get("if-none-match").is_none());
    assert!(seen.headers.get("if-modified-since").is_none());
}

// === 3. coalescing ===

/// 100 concurrent cold requests for one key cause exactly one upstream request; all get the
/// same 200 body and 99 are counted as coalesced.
#[tokio::test]
async fn cold_stampede_is_one_upstream_request() {
    let (fake, proxy) = setup().await;
    fake.set_delay(Duration::from_millis(500));
    let url = proxy.url(CONV);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url, Some(ADMIN)).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.x_cache(), "MISS");
        bodies.push(r.body);
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]));
    assert_eq!(fake.show_requests(), 1);
    let m = metrics_text(&proxy).await;
    assert_eq!(metric(&m, "chatwoot_cache_coalesced_total"), 99.0);
}

/// Concurrent cold requests from different tokens are separate fetches: scopes never share one.
#[tokio::test]
async fn scopes_never_share_a_fetch() {
    let (fake, proxy) = setup().await;
    fake.add_user("admin2-token", "admin2", None);
    fake.set_delay(Duration::from_millis(400));
    let tokens = [ADMIN, AGENT, "admin2-token"];
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        for _ in 0..20 {
            let url = proxy.url(CONV);
            let token = token.to_string();
            tasks.push((
                i,
                tokio::spawn(async move { get(&url, Some(&token)).await }),
            ));
        }
    }
    let names = ["admin", "agent", "admin2"];
    for (i, t) in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(viewer(&r), names[i], "token {i} got another scope's body");
    }
    assert_eq!(fake.show_requests(), 3);
    assert_eq!(
        metric_now(&proxy, "chatwoot_cache_coalesced_total").await,
        57.0
    );
}

// === 4. token isolation ===

/// Each token gets its own body; a token that may not see a conversation gets Chatwoot's 401,
/// remembered per key for --negative-ttl and replayed as HIT, never another token's 200.
#[tokio::test]
async fn tokens_are_isolated_and_refusals_cached_per_key() {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.1");
    let proxy = start(&fake, |c| c.negative_ttl = Duration::from_millis(400)).await;

    let admin = get_conv(&proxy, 1, 42, ADMIN).await;
    let agent = get_conv(&proxy, 1, 42, AGENT).await;
    assert_eq!((admin.x_cache(), agent.x_cache()), ("MISS", "MISS"));
    assert_eq!(viewer(&admin), "admin");
    assert_eq!(viewer(&agent), "agent");
    assert_ne!(admin.body, agent.body);
    assert_ne!(admin.header("etag"), agent.header("etag"));
    // Alternating hits on one thread's header memo: each token keeps its own validators too.
    for _ in 0..3 {
        let a = get_conv(&proxy, 1, 42, ADMIN).await;
        let b = get_conv(&proxy, 1, 42, AGENT).await;
        assert_eq!((a.x_cache(), b.x_cache()), ("HIT", "HIT"));
        assert_eq!(a.body, admin.body);
        assert_eq!(b.body, agent.body);
        for h in ["etag", "last-modified", "content-length"] {
            assert_eq!(a.header(h), admin.header(h), "admin's {h}");
            assert_eq!(b.header(h), agent.header(h), "agent's {h}");
        }
    }
    assert_eq!(fake.show_requests(), 2);

    // The agent may not see (1, 43); the admin may.
    let refused = get_conv(&proxy, 1, 43, AGENT).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.x_cache(), "MISS");
    assert_eq!(refused.text(), NOT_AUTHORIZED);
    let allowed = get_conv(&proxy, 1, 43, ADMIN).await;
    assert_eq!(allowed.status, 200);
    assert_eq!(viewer(&allowed), "admin");
    let again = get_conv(&proxy, 1, 43, AGENT).await;
    assert_eq!(again.status, 401, "never the admin's 200");
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(again.text(), NOT_AUTHORIZED);
    assert_eq!(fake.show_requests(), 4);

    // Bots get Chatwoot's "bots" 401, also remembered.
    let bot = get_conv(&proxy, 1, 42, "bot-token").await;
    assert_eq!(bot.status, 401);
    assert!(bot.text().contains("not authorized for bots"));
    assert_eq!(get_conv(&proxy, 1, 42, "bot-token").await.x_cache(), "HIT");
    assert_eq!(fake.show_requests(), 5);

    // After --negative-ttl the refusal is asked again.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let fresh = get_conv(&proxy, 1, 43, AGENT).await;
    assert_eq!(fresh.status, 401);
    assert_eq!(fresh.x_cache(), "MISS");
    assert_eq!(fake.show_requests(), 6);
}

/// One step of the isolation property test.
#[derive(Debug, Clone)]
enum Op {
    Get {
        t: usize,
        c: usize,
    },
    /// Concurrent GETs.
    Burst(Vec<(usize, usize)>),
    /// PATCH through the proxy.
    Write {
        t: usize,
        c: usize,
    },
    /// A change Chatwoot makes by itself, followed by an admin purge of that conversation.
    External {
        c: usize,
    },
    PurgeAll,
    /// Sleep past the short ttl (and sometimes past stale-while-revalidate).
    Sleep {
        long: bool,
    },
}

/// (token, user name, conversations it may see; `None` = administrator).
const PROP_TOKENS: [(&str, &str, Option<&[u64]>); 4] = [
    ("p-admin-token", "padmin", None),
    ("p-agent-a-token", "pagenta", Some(&[42])),
    ("p-agent-b-token", "pagentb", Some(&[43, 44])),
    ("p-nobody-token", "pnobody", Some(&[])),
];
const PROP_CONVS: [u64; 3] = [42, 43, 44];

fn prop_allowed(t: usize, c: u64) -> bool {
    PROP_TOKENS[t].2.is_none_or(|cs| cs.contains(&c))
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let tc = (0..PROP_TOKENS.len(), 0..PROP_CONVS.len());
    prop_oneof![
        6 => tc.clone().prop_map(|(t, c)| Op::Get { t, c }),
        2 => prop::collection::vec(tc.clone(), 2..6).prop_map(Op::Burst),
        2 => tc.prop_map(|(t, c)| Op::Write { t, c }),
        1 => (0..PROP_CONVS.len()).prop_map(|c| Op::External { c }),
        1 => Just(Op::PurgeAll),
        1 => any::<bool>().prop_map(|long| Op::Sleep { long }),
    ]
}

/// Checks one GET answer against the model; returns the version it carried (0 for a refusal).
fn check_get(r: &Resp, t: usize, c: usize, floor: &HashMap<usize, u64>) -> Result<u64, String> {
    let (_, name, _) = PROP_TOKENS[t];
    let conv = PROP_CONVS[c];
    if !prop_allowed(t, conv) {
        if r.status != 401 || r.text() != NOT_AUTHORIZED {
            return Err(format!(
                "token {name} on {conv}: expected the 401, got {} {} ({})",
                r.status,
                r.text(),
                r.x_cache()
            ));
        }
        return Ok(0);
    }
    if r.status != 200 {
        return Err(format!("token {name} on {conv}: {} {}", r.status, r.text()));
    }
    let v = r.json();
    if v["custom_attributes"]["viewer"] != name || v["id"] != conv {
        return Err(format!(
            "token {name} on {conv} got viewer {} id {} ({})",
            v["custom_attributes"]["viewer"],
            v["id"],
            r.x_cache()
        ));
    }
    let version = v["custom_attributes"]["version"].as_u64().unwrap_or(0);
    if version < floor[&c] {
        return Err(format!(
            "token {name} on {conv}: version {version} older than {} already written/seen ({}, {})",
            floor[&c],
            r.x_cache(),
            r.header("cache-status")
        ));
    }
    Ok(version)
}

async fn run_ops(ops: Vec<Op>) -> Result<(), String> {
    let fake = FakeChatwoot::start().await;
    for c in PROP_CONVS {
        fake.add_conversation(1, c, "1765182000.482917");
    }
    for (token, name, allowed) in PROP_TOKENS {
        let allowed: Option<Vec<(u64, u64)>> =
            allowed.map(|cs| cs.iter().map(|&c| (1, c)).collect());
        fake.add_user(token, name, allowed.as_deref());
    }
    let proxy = start(&fake, |c| {
        c.cache_ttl = Duration::from_millis(80);
        c.stale_while_revalidate = Duration::from_millis(80);
        c.negative_ttl = Duration::from_millis(80);
        c.admin_token = Some(PURGE_TOKEN.into());
    })
    .await;
    // The newest version written or observed per conversation: no later read may go below it.
    let mut floor: HashMap<usize, u64> = (0..PROP_CONVS.len()).map(|c| (c, 1)).collect();
    // Start with every key stored, so that writes and purges have entries to invalidate.
    let prime = (0..PROP_TOKENS.len())
        .flat_map(|t| (0..PROP_CONVS.len()).map(move |c| (t, c)))
        .collect();
    for (step, op) in std::iter::once(Op::Burst(prime)).chain(ops).enumerate() {
        let ctx = |e: String| format!("step {step} {op:?}: {e}");
        match &op {
            Op::Get { t, c } => {
                let r = get_conv(&proxy, 1, PROP_CONVS[*c], PROP_TOKENS[*t].0).await;
                let v = check_get(&r, *t, *c, &floor).map_err(ctx)?;
                let f = floor.get_mut(c).unwrap();
                *f = (*f).max(v);
            }
            Op::Burst(list) => {
                let futs = list.iter().map(|&(t, c)| {
                    let proxy = &proxy;
                    async move { get_conv(proxy, 1, PROP_CONVS[c], PROP_TOKENS[t].0).await }
                });
                let answers = futures_util::future::join_all(futs).await;
                let mut seen = Vec::new();
                for (r, &(t, c)) in answers.iter().zip(list) {
                    seen.push((c, check_get(r, t, c, &floor).map_err(ctx)?));
                }
                for (c, v) in seen {
                    let f = floor.get_mut(&c).unwrap();
                    *f = (*f).max(v);
                }
            }
            Op::Write { t, c } => {
                let (token, name, _) = PROP_TOKENS[*t];
                let conv = PROP_CONVS[*c];
                let r = call(&proxy, Method::PATCH, &conv_path(1, conv), token, &[]).await;
                if prop_allowed(*t, conv) {
                    if r.status != 200 || viewer(&r) != name {
                        return Err(ctx(format!("write answered {} {}", r.status, r.text())));
                    }
                    floor.insert(*c, version(&r));
                } else if r.status != 401 {
                    return Err(ctx(format!("refused write answered {}", r.status)));
                }
            }
            Op::External { c } => {
                let conv = PROP_CONVS[*c];
                let next = {
                    let map = fake.state.conversations.lock().unwrap();
                    support::fake::bump_decimal(&map[&(1, conv)].updated_at)
                };
                fake.touch(1, conv, &next);
                let r = purge(
                    &proxy,
                    &format!("/cache/accounts/1/conversations/{conv}"),
                    Some(&bearer()),
                )
                .await;
                if r.status != 200 {
                    return Err(ctx(format!("purge answered {}", r.status)));
                }
                let version = fake.state.conversations.lock().unwrap()[&(1, conv)].version;
                floor.insert(*c, version);
            }
            Op::PurgeAll => {
                let r = purge(&proxy, "/cache", Some(&bearer())).await;
                if r.status != 200 {
                    return Err(ctx(format!("purge answered {}", r.status)));
                }
            }
            Op::Sleep { long } => {
                let ms = if *long { 170 } else { 90 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Over random interleavings of reads by tokens with different access, writes, out-of-band
    /// changes with purges, full purges and sleeps past the TTL: every 200 a token sees is its own
    /// rendering of the conversation it asked for, every refusal stays a refusal, and no read after
    /// a write or purge returns an older version than was written or already seen.
    #[test]
    fn prop_scopes_never_leak_and_versions_never_go_back(
        ops in prop::collection::vec(op_strategy(), 1..20)
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let result = rt.block_on(run_ops(ops));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

// === 5. TTL and stale-while-revalidate ===

/// Past the ttl, within stale-while-revalidate: 20 concurrent requests are all served STALE at
/// once (faster than the upstream), exactly one background revalidation goes out (a 304), and
/// the refreshed entry is a HIT again.
#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, |c| {
        c.cache_ttl = Duration::from_millis(400);
        c.stale_while_revalidate = Duration::from_secs(3);
    })
    .await;
    let first = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(first.x_cache(), "MISS");
    tokio::time::sleep(Duration::from_millis(450)).await;
    let upstream_delay = Duration::from_millis(400);
    fake.set_delay(upstream_delay);

    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = proxy.url(CONV);
            tokio::spawn(async move {
                let t = Instant::now();
                let r = get(&url, Some(ADMIN)).await;
                (r, t.elapsed())
            })
        })
        .collect();
    for t in tasks {
        let (r, took) = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.x_cache(), "STALE");
        assert!(
            r.header("cache-status")
                .contains("detail=stale-while-revalidate"),
            "{}",
            r.header("cache-status")
        );
        assert_eq!(r.body, first.body);
        assert!(
            took < upstream_delay,
            "STALE must not wait for the upstream: {took:?}"
        );
    }
    wait_metric(&proxy, &revalidations("not_modified"), 1.0).await;
    assert_eq!(
        fake.show_requests(),
        2,
        "exactly one background revalidation"
    );
    let seen = fake.last_seen();
    assert_eq!(
        seen.headers["if-none-match"].to_str().unwrap(),
        rails_etag_of(&first),
        "revalidation sends the stored upstream validator"
    );
    let hit = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(fake.show_requests(), 2);
}

/// Rack::ETag of a body, the validator Chatwoot gave.
fn rails_etag_of(r: &Resp) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, &r.body);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("W/\"{}\"", &hex[..32])
}

/// Past ttl + stale-while-revalidate the request revalidates synchronously: upstream 304 →
/// REVALIDATED (`not_modified`); 200 with the same bytes → REVALIDATED (`unchanged`); a changed
/// conversation → MISS with the new body (`changed`).
#[tokio::test]
async fn synchronous_revalidation_outcomes() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, |c| {
        c.cache_ttl = Duration::from_millis(250);
        c.stale_while_revalidate = Duration::from_millis(100);
    })
    .await;
    let expire = || tokio::time::sleep(Duration::from_millis(400));
    let first = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(first.x_cache(), "MISS");

    expire().await;
    let r = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "REVALIDATED");
    assert!(r.header("cache-status").contains("fwd-status=304"));
    assert_eq!(r.body, first.body);
    assert_eq!(r.header("etag"), first.header("etag"));
    assert_eq!(r.header("age"), "0", "a revalidated entry is fresh again");
    assert_eq!(fake.show_requests(), 2);
    assert_eq!(
        metric_now(&proxy, &revalidations("not_modified")).await,
        1.0
    );
    assert_eq!(get_conv(&proxy, 1, 42, ADMIN).await.x_cache(), "HIT");

    fake.state
        .no_etag
        .store(true, std::sync::atomic::Ordering::SeqCst);
    expire().await;
    let r = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(r.x_cache(), "REVALIDATED");
    assert_eq!(r.body, first.body);
    assert_eq!(metric_now(&proxy, &revalidations("unchanged")).await, 1.0);
    assert_eq!(fake.show_requests(), 3);

    fake.touch(1, 42, "1765182100.000001");
    expire().await;
    let r = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(version(&r), 2);
    assert_eq!(r.header("last-modified"), "Mon, 08 Dec 2025 08:21:40 GMT");
    assert_ne!(r.header("etag"), first.header("etag"));
    assert_eq!(metric_now(&proxy, &revalidations("changed")).await, 1.0);
    let hit = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(hit.body, r.body);
    assert_eq!(fake.show_requests(), 4);
}

// === 6. updated_at only moves forward ===

/// A revalidation answered with an older `updated_at` (replica lag) never replaces the stored,
/// newer body; the event is counted as `older`.
#[tokio::test]
async fn older_updated_at_never_replaces_the_stored_body() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, |c| {
        c.cache_ttl = Duration::from_millis(250);
        c.stale_while_revalidate = Duration::from_millis(100);
    })
    .await;
    let stored = get_conv(&proxy, 1, 42, ADMIN).await;
    *fake.state.lag_updated_at.lock().unwrap() = Some("1765181999.999999".into());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(r.status, 200);
    assert_eq!(fake.show_requests(), 2, "the revalidation did go upstream");
    assert_eq!(r.body, stored.body, "the older upstream body was served");
    assert_eq!(r.x_cache(), "REVALIDATED");
    assert_eq!(metric_now(&proxy, &revalidations("older")).await, 1.0);
    assert_eq!(metric_now(&proxy, &revalidations("changed")).await, 0.0);
    let hit = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(hit.body, stored.body);
}

/// `updated_at` is compared as an exact decimal: 1765182000.4829171 is older than
/// 1765182000.48291711 although both are the same f64, so it does not replace the stored body.
#[tokio::test]
async fn updated_at_is_compared_as_an_exact_decimal() {
    let newer = "1765182000.48291711";
    let older = "1765182000.4829171";
    assert_eq!(
        newer.parse::<f64>().unwrap(),
        older.parse::<f64>().unwrap(),
        "the premise: f64 cannot tell them apart"
    );
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 50, newer);
    let proxy = start(&fake, |c| {
        c.cache_ttl = Duration::from_millis(250);
        c.stale_while_revalidate = Duration::from_millis(100);
    })
    .await;
    let stored = get_conv(&proxy, 1, 50, ADMIN).await;
    assert!(stored.text().contains(&format!("\"updated_at\":{newer},")));
    *fake.state.lag_updated_at.lock().unwrap() = Some(older.into());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = get_conv(&proxy, 1, 50, ADMIN).await;
    assert_eq!(fake.show_requests(), 2);
    assert!(
        r.text().contains(&format!("\"updated_at\":{newer},")),
        "an f64 comparison would have taken the lagging body ({})",
        r.x_cache()
    );
    assert_eq!(r.body, stored.body);
    assert_eq!(metric_now(&proxy, &revalidations("older")).await, 1.0);

    // And the other way round a decimal-newer body does replace it.
    *fake.state.lag_updated_at.lock().unwrap() = Some("1765182000.482917111".into());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = get_conv(&proxy, 1, 50, ADMIN).await;
    assert_eq!(r.x_cache(), "MISS");
    assert!(r.text().contains("\"updated_at\":1765182000.482917111,"));
}

// === 7. negative cache and invalid tokens ===

/// A 404 is remembered for --negative-ttl (HIT, no upstream request), then asked again.
#[tokio::test]
async fn not_found_is_negative_cached() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, |c| c.negative_ttl = Duration::from_millis(400)).await;
    let r = get_conv(&proxy, 1, 999, ADMIN).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(r.text(), NOT_FOUND);
    let r = get_conv(&proxy, 1, 999, ADMIN).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.x_cache(), "HIT");
    assert_eq!(r.text(), NOT_FOUND);
    assert_eq!(fake.show_requests(), 1);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let r = get_conv(&proxy, 1, 999, ADMIN).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(fake.show_requests(), 2);
}

/// `--negative-ttl 0` turns negative caching off: every 404 and 401 goes upstream.
#[tokio::test]
async fn negative_ttl_zero_disables_negative_caching() {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.1");
    let proxy = start(&fake, |c| c.negative_ttl = Duration::ZERO).await;
    for _ in 0..3 {
        let r = get_conv(&proxy, 1, 999, ADMIN).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (404, "MISS"));
        let r = get_conv(&proxy, 1, 43, AGENT).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (401, "MISS"));
    }
    assert_eq!(fake.show_requests(), 6);
}

/// An upstream 404 (conversation deleted) or non-token 401 (access withdrawn) on revalidation
/// replaces the stored 200 at once: stale-if-error never applies to authorization answers.
#[tokio::test]
async fn not_found_and_refusal_replace_a_stored_200() {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.1");
    fake.add_user("agent2-token", "agent2", Some(&[(1, 43)]));
    let proxy = start(&fake, |c| {
        c.cache_ttl = Duration::from_millis(250);
        c.stale_while_revalidate = Duration::from_millis(100);
        c.stale_if_error = Duration::from_secs(600);
        c.negative_ttl = Duration::from_secs(5);
    })
    .await;
    assert_eq!(get_conv(&proxy, 1, 42, ADMIN).await.status, 200);
    assert_eq!(get_conv(&proxy, 1, 43, "agent2-token").await.status, 200);
    fake.remove_conversation(1, 42);
    fake.add_user("agent2-token", "agent2", Some(&[]));
    tokio::time::sleep(Duration::from_millis(400)).await;

    let gone = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.x_cache(), "MISS");
    let refused = get_conv(&proxy, 1, 43, "agent2-token").await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.text(), NOT_AUTHORIZED);
    let before = fake.show_requests();
    let gone = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!((gone.status.as_u16(), gone.x_cache()), (404, "HIT"));
    let refused = get_conv(&proxy, 1, 43, "agent2-token").await;
    assert_eq!((refused.status.as_u16(), refused.x_cache()), (401, "HIT"));
    assert_eq!(fake.show_requests(), before);
}

/// "Invalid Access Token" from the upstream (conversation route or a protected route): the
/// token is refused locally with `invalid_token` for --auth-negative-ttl without contacting the
/// upstream, and every entry stored under it is dropped.
#[tokio::test]
async fn invalid_token_is_refused_locally_and_its_entries_dropped() {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.1");
    fake.add_user("temp-token", "temp", None);
    fake.add_user("temp2-token", "temp2", None);
    let proxy = start(&fake, |c| c.auth_negative_ttl = Duration::from_millis(500)).await;
    for t in ["temp-token", "temp2-token"] {
        assert_eq!(get_conv(&proxy, 1, 42, t).await.x_cache(), "MISS");
        assert_eq!(get_conv(&proxy, 1, 42, t).await.x_cache(), "HIT");
    }
    fake.revoke("temp-token");
    fake.revoke("temp2-token");

    // temp learns it on the conversation route (an uncached key), temp2 on a protected route.
    let r = get_conv(&proxy, 1, 43, "temp-token").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(r.text(), r#"{"error":"Invalid Access Token"}"#);
    let r = call(
        &proxy,
        Method::GET,
        "/api/v1/accounts/1/contacts",
        "temp2-token",
        &[],
    )
    .await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (401, "BYPASS"));

    let upstream_before = fake.requests();
    for t in ["temp-token", "temp2-token"] {
        for p in [CONV, "/api/v1/accounts/1/contacts"] {
            let r = call(&proxy, Method::GET, p, t, &[]).await;
            assert_eq!(r.status, 401, "{t} {p}");
            assert_eq!(r.x_cache(), "LOCAL");
            assert_eq!(r.json()["errors"][0]["code"], "invalid_token");
            assert!(!r.header("date").is_empty());
        }
    }
    assert_eq!(
        fake.requests(),
        upstream_before,
        "refused without the upstream"
    );
    assert_eq!(
        metric_now(
            &proxy,
            r#"chatwoot_cache_auth_rejections_total{reason="invalid"}"#
        )
        .await,
        4.0
    );
    // Other tokens are unaffected.
    assert_eq!(get_conv(&proxy, 1, 42, ADMIN).await.status, 200);

    // The token comes back (say, the operator fixed a mistake): after --auth-negative-ttl it is
    // asked again, and its old entry is gone although its ttl (10 s) has not run out.
    fake.add_user("temp-token", "temp", None);
    tokio::time::sleep(Duration::from_millis(550)).await;
    let r = get_conv(&proxy, 1, 42, "temp-token").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.x_cache(),
        "MISS",
        "the scope's stored entry must be dropped"
    );
}

// === 8. storage rules ===

/// Answers that are not a storable conversation (wrong id, wrong account, not JSON, a JSON
/// array, a Content-Encoding) are forwarded as MISS and never stored.
#[tokio::test]
async fn unstorable_answers_are_forwarded_not_stored() {
    let (fake, proxy) = setup().await;
    let conv = fake.state.conversations.lock().unwrap()[&(1, 42)].clone();
    let cases: Vec<(&str, String, Headers)> = vec![
        ("id mismatch", render(1, 43, &conv, "admin"), vec![]),
        ("account mismatch", render(2, 42, &conv, "admin"), vec![]),
        (
            "not JSON",
            "<html>maintenance</html>".into(),
            vec![("content-type".into(), "text/html".into())],
        ),
        ("JSON array", r#"[{"id":42,"account_id":1}]"#.into(), vec![]),
        (
            "content-encoding",
            render(1, 42, &conv, "admin"),
            vec![("content-encoding".into(), "gzip".into())],
        ),
    ];
    for (what, body, headers) in cases {
        fake.set_fault(
            Fault::Status {
                status: 200,
                body: body.clone(),
                headers,
            },
            None,
        );
        let before = fake.requests();
        for _ in 0..2 {
            let r = get_conv(&proxy, 1, 42, ADMIN).await;
            assert_eq!(r.status, 200, "{what}");
            assert_eq!(r.x_cache(), "MISS", "{what}");
            assert_eq!(r.text(), body, "{what}");
            assert!(!r.header("cache-status").contains("stored"), "{what}");
        }
        assert_eq!(fake.requests(), before + 2, "{what}: must not be stored");
    }
    // Control: the real answer is stored.
    fake.clear_fault();
    assert_eq!(get_conv(&proxy, 1, 42, ADMIN).await.x_cache(), "MISS");
    assert_eq!(get_conv(&proxy, 1, 42, ADMIN).await.x_cache(), "HIT");
}

/// A body over --max-object-bytes (with Content-Length, or chunked) arrives complete, as MISS,
/// and is never stored; concurrent requests for it each get the whole body too.
#[tokio::test]
async fn oversized_bodies_stream_through_unstored() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, |c| c.max_object_bytes = 16 * 1024).await;
    let padding = 40_000;
    fake.set_padding(1, 42, padding);
    let expect_len = {
        let conv = fake.state.conversations.lock().unwrap()[&(1, 42)].clone();
        render(1, 42, &conv, "admin").len()
    };
    for chunked in [false, true] {
        fake.state
            .chunked_show
            .store(chunked, std::sync::atomic::Ordering::SeqCst);
        let before = fake.show_requests();
        for _ in 0..2 {
            let r = get_conv(&proxy, 1, 42, ADMIN).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.x_cache(), "MISS");
            assert_eq!(r.body.len(), expect_len, "chunked={chunked}");
            let v = r.json();
            assert_eq!(
                v["additional_attributes"]["padding"]
                    .as_str()
                    .unwrap()
                    .len(),
                padding
            );
            assert!(r.header("cache-status").contains("too-large"));
        }
        assert_eq!(fake.show_requests(), before + 2, "chunked={chunked}");
    }
    fake.set_delay(Duration::from_millis(200));
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let url = proxy.url(CONV);
            tokio::spawn(async move { get(&url, Some(ADMIN)).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.x_cache(),
            "MISS",
            "the conversation route never answers BYPASS"
        );
        assert!(r.header("cache-status").contains("too-large"));
        assert_eq!(r.body.len(), expect_len);
        r.json();
    }
    assert_eq!(
        metric_now(&proxy, "chatwoot_cache_entries").await,
        0.0,
        "nothing stored"
    );
}

// === 9. write-through invalidation ===

/// A 2xx write on the conversation or below it, in any spelling Rails accepts (method
/// override, leading zeros, `.json`), invalidates every scope before the response: a GET sent
/// right after sees the new version as MISS.
#[tokio::test]
async fn writes_invalidate_every_scope_before_responding() {
    let (fake, proxy) = setup().await;
    fake.add_user("admin2-token", "admin2", None);
    let tokens = [
        (ADMIN, "admin"),
        (AGENT, "agent"),
        ("admin2-token", "admin2"),
    ];
    let writes: Vec<(Method, &str, Vec<Header>)> = vec![
        (Method::PATCH, CONV, vec![]),
        (Method::PUT, CONV, vec![]),
        (
            Method::POST,
            "/api/v1/accounts/1/conversations/42/messages",
            vec![],
        ),
        (
            Method::POST,
            CONV,
            vec![("x-http-method-override", "PATCH")],
        ),
        (
            Method::POST,
            "/api/v1/accounts/01/conversations/42.json",
            vec![],
        ),
        (
            Method::POST,
            "/api/v1/accounts/1/conversations/42/toggle_status",
            vec![],
        ),
        (
            Method::DELETE,
            "/api/v1/accounts/1/conversations/42/messages/9021",
            vec![],
        ),
        // Alternate (devise/Authorization) credentials bypass the cache but still invalidate.
        (
            Method::PATCH,
            CONV,
            vec![("authorization", "Bearer devise-token")],
        ),
    ];
    for (t, _) in tokens {
        get_conv(&proxy, 1, 42, t).await;
    }
    for (i, (method, path, headers)) in writes.into_iter().enumerate() {
        for (t, _) in tokens {
            assert_eq!(get_conv(&proxy, 1, 42, t).await.x_cache(), "HIT");
        }
        let w = call(&proxy, method.clone(), path, ADMIN, &headers).await;
        assert_eq!(w.status, 200, "{method} {path}");
        assert_eq!(w.x_cache(), "BYPASS");
        let written = version(&w);
        assert_eq!(written, i as u64 + 2);
        for (t, name) in tokens {
            let r = get_conv(&proxy, 1, 42, t).await;
            assert_eq!(r.x_cache(), "MISS", "{method} {path}: {name} still cached");
            assert_eq!(version(&r), written, "{method} {path}: {name}");
            assert_eq!(viewer(&r), name);
        }
        assert_eq!(
            metric_now(
                &proxy,
                r#"chatwoot_cache_invalidations_total{source="write"}"#
            )
            .await,
            i as f64 + 1.0
        );
    }
}

/// A 2xx write elsewhere under `/api/v1/accounts/1/` invalidates all of account 1 (and only
/// account 1); a failed write (4xx) invalidates nothing.
#[tokio::test]
async fn account_writes_and_failed_writes() {
    let (fake, proxy) = setup().await;
    fake.add_conversation(1, 43, "1765182000.1");
    fake.add_conversation(2, 7, "1765182000.1");
    let keys = [(1, 42), (1, 43), (2, 7)];
    for (a, c) in keys {
        assert_eq!(get_conv(&proxy, a, c, ADMIN).await.x_cache(), "MISS");
    }
    let w = call(
        &proxy,
        Method::POST,
        "/api/v1/accounts/1/bulk_actions",
        ADMIN,
        &[],
    )
    .await;
    assert_eq!(w.status, 200);
    assert_eq!(get_conv(&proxy, 1, 42, ADMIN).await.x_cache(), "MISS");
    assert_eq!(get_conv(&proxy, 1, 43, ADMIN).await.x_cache(), "MISS");
    assert_eq!(get_conv(&proxy, 2, 7, ADMIN).await.x_cache(), "HIT");

    // The agent may not write (1, 43): 401, nothing invalidated.
    let w = call(&proxy, Method::PATCH, &conv_path(1, 43), AGENT, &[]).await;
    assert_eq!(w.status, 401);
    // A 422 from Chatwoot: nothing invalidated.
    fake.set_fault(
        Fault::Status {
            status: 422,
            body: r#"{"error":"invalid"}"#.into(),
            headers: vec![],
        },
        Some(1),
    );
    let w = call(&proxy, Method::PATCH, CONV, ADMIN, &[]).await;
    assert_eq!(w.status, 422);
    // A GET is not a write either.
    let r = call(
        &proxy,
        Method::GET,
        "/api/v1/accounts/1/conversations/42/messages",
        ADMIN,
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    for (a, c) in keys {
        assert_eq!(
            get_conv(&proxy, a, c, ADMIN).await.x_cache(),
            "HIT",
            "({a}, {c})"
        );
    }
    assert_eq!(
        metric_now(
            &proxy,
            r#"chatwoot_cache_invalidations_total{source="write"}"#
        )
        .await,
        1.0
    );
}

/// An entry invalidated by a write or a purge is never served later, not even as
/// stale-if-error while the upstream fails.
#[tokio::test]
async fn invalidated_entries_are_not_served_stale_on_error() {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.1");
    let proxy = start(&fake, |c| {
        c.cache_ttl = Duration::from_millis(200);
        c.stale_while_revalidate = Duration::from_millis(50);
        c.stale_if_error = Duration::from_secs(600);
        c.admin_token = Some(PURGE_TOKEN.into());
    })
    .await;
    get_conv(&proxy, 1, 42, ADMIN).await;
    get_conv(&proxy, 1, 43, ADMIN).await;
    let w = call(&proxy, Method::PATCH, CONV, AGENT, &[]).await;
    assert_eq!(w.status, 200);
    let p = purge(
        &proxy,
        "/cache/accounts/1/conversations/43",
        Some(&bearer()),
    )
    .await;
    assert_eq!(p.json(), serde_json::json!({"purged": 1}));
    fake.set_fault(
        Fault::Status {
            status: 503,
            body: r#"{"error":"maintenance"}"#.into(),
            headers: vec![],
        },
        None,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for c in [42, 43] {
        let r = get_conv(&proxy, 1, c, ADMIN).await;
        assert_eq!(r.status, 503, "({c}): {} {}", r.x_cache(), r.text());
        assert_ne!(r.x_cache(), "STALE");
    }
    // Control: a key that was not invalidated is served stale-if-error.
    fake.clear_fault();
    get_conv(&proxy, 1, 42, ADMIN).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.set_fault(
        Fault::Status {
            status: 503,
            body: r#"{"error":"maintenance"}"#.into(),
            headers: vec![],
        },
        None,
    );
    let r = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "STALE"));
    assert!(r.header("cache-status").contains("stale-if-error"));
}

/// A fetch that started before a write and answers after it is neither joined by a request
/// sent after the write's response (that request gets the written version) nor stored over
/// the newer entry that request stored.
#[tokio::test]
async fn a_fetch_racing_a_write_is_neither_stored_nor_joined() {
    let (fake, proxy) = setup().await;
    *fake.state.show_post_delay.lock().unwrap() = Duration::from_millis(500);
    let url = proxy.url(CONV);
    let early = tokio::spawn(async move { get(&url, Some(ADMIN)).await });
    // Let the early fetch reach the fake and render version 1; later fetches answer at once.
    tokio::time::sleep(Duration::from_millis(150)).await;
    *fake.state.show_post_delay.lock().unwrap() = Duration::ZERO;
    let w = call(&proxy, Method::PATCH, CONV, AGENT, &[]).await;
    assert_eq!(w.status, 200);
    let written = version(&w);
    let after = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(version(&after), written, "joined a pre-write fetch");
    assert_eq!(after.x_cache(), "MISS");
    let early = early.await.unwrap();
    assert_eq!(
        version(&early),
        1,
        "the early request legitimately saw version 1"
    );
    // The early fetch finished last: had it been stored, it would have replaced the entry the
    // post-write fetch stored (and, being invalidated, turned this into a MISS).
    let r = get_conv(&proxy, 1, 42, ADMIN).await;
    assert_eq!(version(&r), written, "a pre-write body was served");
    assert_eq!(
        r.x_cache(),
        "HIT",
        "the pre-write fetch overwrote the entry"
    );
    assert_eq!(fake.show_requests(), 2);
}

// === 10. purge API and webhook ===

/// The purge API removes exactly the named entries across scopes (negative entries included,
/// entries already dead by write-through not counted) and reports how many; it needs the bearer
/// token.
#[tokio::test]
async fn purge_api_counts_exactly() {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.1");
    fake.add_conversation(2, 7, "1765182000.1");
    let proxy = start(&fake, |c| c.admin_token = Some(PURGE_TOKEN.into())).await;
    let fill = async || {
        get_conv(&proxy, 1, 42, ADMIN).await;
        get_conv(&proxy, 1, 42, AGENT).await;
        get_conv(&proxy, 1, 43, ADMIN).await;
        assert_eq!(get_conv(&proxy, 1, 43, AGENT).await.status, 401);
        get_conv(&proxy, 2, 7, ADMIN).await;
    };
    fill().await;

    for auth in [
        None,
        Some("Bearer wrong-token-xyz"),
        Some("Basic cHVyZ2U6eA=="),
        Some(PURGE_TOKEN),
    ] {
        let r = purge(&proxy, "/cache", auth).await;
        assert_eq!(r.status, 401, "{auth:?}");
    }
    assert_eq!(get_conv(&proxy, 1, 42, ADMIN).await.x_cache(), "HIT");

    let r = purge(
        &proxy,
        "/cache/accounts/1/conversations/42",
        Some(&bearer()),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"purged": 2}));
    let r = purge(&proxy, "/cache/accounts/1", Some(&bearer())).await;
    assert_eq!(r.json(), serde_json::json!({"purged": 2}));
    let r = purge(&proxy, "/cache/accounts/1", Some(&bearer())).await;
    assert_eq!(r.json(), serde_json::json!({"purged": 0}));
    let r = purge(&proxy, "/cache", Some(&bearer())).await;
    assert_eq!(r.json(), serde_json::json!({"purged": 1}));
    for (a, c, t) in [
        (1, 42, ADMIN),
        (1, 42, AGENT),
        (1, 43, ADMIN),
        (2, 7, ADMIN),
    ] {
        assert_eq!(
            get_conv(&proxy, a, c, t).await.x_cache(),
            "MISS",
            "({a}, {c})"
        );
    }
    assert_eq!(get_conv(&proxy, 1, 43, AGENT).await.x_cache(), "MISS");
    let r = purge(&proxy, "/cache", Some(&bearer())).await;
    assert_eq!(r.json(), serde_json::json!({"purged": 5}));

    // An entry already invalidated by a write is not counted again.
    fill().await;
    let w = call(&proxy, Method::PATCH, CONV, ADMIN, &[]).await;
    assert_eq!(w.status, 200);
    let r = purge(
        &proxy,
        "/cache/accounts/1/conversations/42",
        Some(&bearer()),
    )
    .await;
    assert_eq!(r.json(), serde_json::json!({"purged": 0}));
    let r = purge(
        &proxy,
        "/cache/accounts/1/conversations/0042",
        Some(&bearer()),
    )
    .await;
    assert_eq!(r.status, 404, "non-canonical purge path");
    assert_eq!(
        metric_now(
            &proxy,
            r#"chatwoot_cache_invalidations_total{source="purge"}"#
        )
        .await,
        6.0
    );
}

/// Without --admin-token the purge API does not exist (404).
#[tokio::test]
async fn purge_api_is_off_without_admin_token() {
    let (_fake, proxy) = setup().await;
    get_conv(&proxy, 1, 42, ADMIN).await;
    for auth in [None, Some("Bearer anything-at-all")] {
        let r = purge(&proxy, "/cache", auth).await;
        assert_eq!(r.status, 404);
    }
    assert_eq!(get_conv(&proxy, 1, 42, ADMIN).await.x_cache(), "HIT");
}

/// Signed webhooks invalidate the conversation named by the event (`id` for conversation
/// events, `conversation.id` for message events) or the account (`contact_updated`); a bad
/// signature or a stale timestamp is refused and invalidates nothing; `?secret=` also works
/// when `--webhook-allow-query-secret` is on.
#[tokio::test]
async fn webhooks_invalidate_when_signed() {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.1");
    fake.add_conversation(2, 7, "1765182000.1");
    let proxy = start(&fake, |c| {
        c.webhook_secret = Some(WEBHOOK_SECRET.into());
        c.webhook_allow_query_secret = true;
    })
    .await;
    let prime = async || {
        for (a, c) in [(1, 42), (1, 43), (2, 7)] {
            get_conv(&proxy, a, c, ADMIN).await;
        }
    };
    let state = async || {
        let mut v = Vec::new();
        for (a, c) in [(1, 42), (1, 43), (2, 7)] {
            v.push(get_conv(&proxy, a, c, ADMIN).await.x_cache().to_string());
        }
        v
    };
    prime().await;
    let now = unix_now();

    let conv_updated = r#"{"event":"conversation_updated","id":42,"inbox_id":3}"#;
    let r = webhook(&proxy, 1, conv_updated, WEBHOOK_SECRET, now).await;
    assert_eq!(r.status, 200);
    assert_eq!(state().await, ["MISS", "HIT", "HIT"]);

    let msg = r#"{"event":"message_created","id":9100,"conversation":{"id":43}}"#;
    let r = webhook(&proxy, 1, msg, WEBHOOK_SECRET, now).await;
    assert_eq!(r.status, 200);
    assert_eq!(state().await, ["HIT", "MISS", "HIT"]);

    // Refused: wrong secret, timestamp 6 minutes old (correctly signed), no signature at all.
    let r = webhook(&proxy, 1, conv_updated, "not-the-secret", now).await;
    assert_eq!(r.status, 401);
    let r = webhook(&proxy, 1, conv_updated, WEBHOOK_SECRET, now - 360).await;
    assert_eq!(r.status, 401);
    let r = send(
        Method::POST,
        &proxy.admin_url("/webhooks/chatwoot/accounts/1"),
        &[("content-type", "application/json")],
        conv_updated.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = send(
        Method::POST,
        &proxy.admin_url("/webhooks/chatwoot/accounts/1?secret=wrong-secret"),
        &[("content-type", "application/json")],
        conv_updated.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(state().await, ["HIT", "HIT", "HIT"]);

    // Legacy Chatwoot (< 4.11): the secret in the URL.
    let r = send(
        Method::POST,
        &proxy.admin_url(&format!(
            "/webhooks/chatwoot/accounts/1?secret={WEBHOOK_SECRET}"
        )),
        &[("content-type", "application/json")],
        conv_updated.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(state().await, ["MISS", "HIT", "HIT"]);

    let contact = r#"{"event":"contact_updated","id":17}"#;
    let r = webhook(&proxy, 1, contact, WEBHOOK_SECRET, now).await;
    assert_eq!(r.status, 200);
    assert_eq!(state().await, ["MISS", "MISS", "HIT"]);
    assert_eq!(
        metric_now(
            &proxy,
            r#"chatwoot_cache_invalidations_total{source="webhook"}"#
        )
        .await,
        4.0
    );
}

// === 11. byte bound ===

/// Filling the cache with ten times --cache-max-bytes of distinct entries keeps stored bytes
/// under the bound (evicting by size) while keeping entries. Prints the per-entry overhead
/// (stored bytes minus body bytes).
#[tokio::test]
async fn stored_bytes_stay_under_the_bound() {
    let fake = FakeChatwoot::start().await;
    let max: u64 = 256 * 1024;
    let proxy = start(&fake, |c| {
        c.cache_max_bytes = max;
        c.max_object_bytes = 64 * 1024;
    })
    .await;

    // One entry alone: its exact weight minus its body.
    let one = get_conv(&proxy, 1, 42, ADMIN).await;
    let m = metrics_text(&proxy).await;
    assert_eq!(metric(&m, "chatwoot_cache_entries"), 1.0);
    let single = metric(&m, "chatwoot_cache_stored_bytes") as u64;
    let single_overhead = single - one.body.len() as u64;
    eprintln!(
        "single entry: {single} stored bytes, body {} bytes, overhead {single_overhead} bytes",
        one.body.len()
    );
    assert!(single > one.body.len() as u64);

    let tokens = ["admin-token", "fill-a-token", "fill-b-token"];
    fake.add_user("fill-a-token", "fill-a", None);
    fake.add_user("fill-b-token", "fill-b", None);
    let convs: Vec<u64> = (1000..1200).collect();
    for &c in &convs {
        fake.add_conversation(1, c, "1765182000.482917");
        fake.set_padding(1, c, 2000);
    }
    let mut jobs = Vec::new();
    for &c in &convs {
        for t in tokens {
            jobs.push((c, t));
        }
    }
    let mut fetched: u64 = 0;
    for chunk in jobs.chunks(16) {
        let futs = chunk.iter().map(|&(c, t)| {
            let proxy = &proxy;
            async move { get_conv(proxy, 1, c, t).await }
        });
        for r in futures_util::future::join_all(futs).await {
            assert_eq!(r.status, 200);
            assert_eq!(r.x_cache(), "MISS");
            fetched += r.body.len() as u64;
        }
    }
    assert!(fetched >= 10 * max, "filled only {fetched} bytes");
    let m = metrics_text(&proxy).await;
    let stored = metric(&m, "chatwoot_cache_stored_bytes");
    let entries = metric(&m, "chatwoot_cache_entries");
    eprintln!(
        "after {fetched} bytes of bodies: {entries} entries, {stored} stored bytes (max {max}), evictions(size) {}",
        metric(&m, r#"chatwoot_cache_evictions_total{cause="size"}"#)
    );
    assert!(stored <= max as f64, "stored {stored} > {max}");
    assert!(entries > 0.0);
    assert!(metric(&m, r#"chatwoot_cache_evictions_total{cause="size"}"#) > 0.0);
    let avg_body = fetched as f64 / jobs.len() as f64;
    eprintln!(
        "average per entry: {:.0} stored bytes, {avg_body:.0} body bytes, overhead {:.0} bytes",
        stored / entries,
        stored / entries - avg_body
    );
}

// === 12. metrics ===

/// Request and upstream counters move per route, X-Cache value and status class, and no token
/// ever appears in /metrics.
#[tokio::test]
async fn metrics_count_and_never_show_tokens() {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.1");
    let secret_token = "tok-SECRETVALUE-8f3a9c";
    fake.add_user(secret_token, "secret-user", None);
    let proxy = start(&fake, |_| {}).await;
    get_conv(&proxy, 1, 42, secret_token).await;
    get_conv(&proxy, 1, 42, secret_token).await;
    get_conv(&proxy, 1, 42, secret_token).await;
    get_conv(&proxy, 1, 43, AGENT).await;
    get_conv(&proxy, 1, 43, AGENT).await;
    call(
        &proxy,
        Method::GET,
        "/api/v1/accounts/1/contacts",
        secret_token,
        &[],
    )
    .await;

    let conv = |cache: &str, status: &str| {
        format!(
            r#"chatwoot_cache_requests_total{{cache="{cache}",route="conversation",status="{status}"}}"#
        )
    };
    let m = wait_metric(
        &proxy,
        r#"chatwoot_cache_requests_total{cache="bypass",route="protected",status="2xx"}"#,
        1.0,
    )
    .await;
    let m = if metric(&m, &conv("hit", "4xx")) == 1.0 {
        m
    } else {
        wait_metric(&proxy, &conv("hit", "4xx"), 1.0).await
    };
    assert_eq!(metric(&m, &conv("miss", "2xx")), 1.0, "{m}");
    assert_eq!(metric(&m, &conv("hit", "2xx")), 2.0);
    assert_eq!(metric(&m, &conv("miss", "4xx")), 1.0);
    assert_eq!(metric(&m, &conv("hit", "4xx")), 1.0);
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_upstream_requests_total{route="conversation",status="2xx"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_upstream_requests_total{route="conversation",status="4xx"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_upstream_requests_total{route="protected",status="2xx"}"#
        ),
        1.0
    );
    assert_eq!(metric(&m, "chatwoot_cache_entries"), 2.0);
    assert!(
        metric(
            &m,
            r#"chatwoot_cache_request_duration_seconds_count{cache="hit",route="conversation"}"#
        ) >= 3.0
    );
    for token in [secret_token, "SECRETVALUE", AGENT, ADMIN] {
        assert!(!m.contains(token), "{token} leaked into /metrics");
    }
    assert!(!m.contains("/api/v1"), "raw paths in /metrics");
}

// === 13. hostile values ===

/// An `updated_at` too large for an HTTP date (year 10000 and later, or past what
/// `SystemTime` can hold) is upstream data: the conversation is still stored and served,
/// only without `Last-Modified` (before, formatting it panicked the fetch).
#[tokio::test]
async fn huge_updated_at_is_stored_without_last_modified() {
    let fake = FakeChatwoot::start().await;
    let proxy = start(&fake, |_| {}).await;
    for (c, updated_at) in [
        (70, "253402300800"),
        (71, "9900000000000000000"),
        (72, "18446744073709551615.5"),
    ] {
        fake.add_conversation(1, c, updated_at);
        let miss = get_conv(&proxy, 1, c, ADMIN).await;
        assert_eq!(miss.status, 200, "{updated_at}: {}", miss.text());
        assert_eq!(miss.x_cache(), "MISS");
        assert!(miss.text().contains(updated_at));
        let hit = get_conv(&proxy, 1, c, ADMIN).await;
        assert_eq!(hit.x_cache(), "HIT", "{updated_at}: stored");
        assert_eq!(hit.body, miss.body);
        for r in [&miss, &hit] {
            assert!(r.headers.get("last-modified").is_none(), "{updated_at}");
            assert!(r.headers.get("etag").is_some());
        }
    }
}
