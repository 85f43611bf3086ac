//! End-to-end: a shared gateway's fairness (SPEC 12) against the fake Chatwoot — fair upstream
//! slots per token scope, per-token rate limits and refresh-ahead.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatwoot_cache::Config;
use support::*;

const SHED_QUOTA: &str = r#"chatwoot_cache_shed_total{reason="token_quota"}"#;
const SHED_QUEUE: &str = r#"chatwoot_cache_shed_total{reason="queue_timeout"}"#;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Polls `cond` every 5 ms for up to 10 s (a loaded CI machine is slow, never this slow).
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(ms(5)).await;
    }
}

/// Adds conversations `first..first + n` of account 1 and administrator tokens.
fn populate(fake: &FakeChatwoot, first: u64, n: u64, tokens: &[&str]) {
    for c in first..first + n {
        fake.add_conversation(1, c, "1765182000.482917");
    }
    for t in tokens {
        fake.add_user(t, t, None);
    }
}

/// One request per token: the upstream accepts each (a 200), so from now on each is charged as
/// a scope of its own rather than as its client address.
async fn accept_tokens(proxy: &ProxyHandle, tokens: &[&str]) {
    for t in tokens {
        let r = conv(proxy, 1, 42, t).await;
        assert_eq!(r.status, 200, "{t}: {r:?}");
    }
}

fn tokens_seen_by_upstream(fake: &FakeChatwoot, since: usize) -> Vec<String> {
    fake.seen()[since..]
        .iter()
        .map(|s| {
            s.headers
                .get("api_access_token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        })
        .collect()
}

const POLITE: [&str; 4] = ["polite-0", "polite-1", "polite-2", "polite-3"];
const FLOOD: &str = "flood-token";

/// A runaway token firing 300 concurrent cold misses at a slow upstream (250 ms a request)
/// holds at most its share (8 slots / 4 = 2) and is shed after the queue timeout (1 s) with
/// `503 upstream_unavailable`, `Retry-After: 1`, counted as `token_quota` — or answered `STALE`
/// for a conversation it has stored. Meanwhile four polite tokens, each reading ten cold
/// conversations one after another, all succeed, every request within 2 s (the upstream's
/// 250 ms, no queueing behind the flood: their slots stay free), and the upstream never sees
/// more than 8 requests at once.
#[tokio::test]
async fn a_flooding_token_cannot_starve_polite_tokens() {
    let fake = FakeChatwoot::start().await;
    let mut tokens = POLITE.to_vec();
    tokens.push(FLOOD);
    populate(&fake, 1000, 400, &tokens);
    let mut cfg = config(&fake.url());
    cfg.upstream_max_in_flight = 8;
    cfg.upstream_queue_timeout = ms(1000);
    cfg.cache_ttl = ms(300);
    cfg.stale_while_revalidate = Duration::ZERO;
    cfg.stale_if_error = Duration::from_secs(60);
    cfg.breaker_min_requests = 100_000;
    assert_eq!(cfg.per_token_in_flight(), 2, "derived: a quarter of 8");
    let proxy = Arc::new(start_proxy(cfg).await);
    accept_tokens(&proxy, &tokens).await;
    // The flooder's stored conversation (1, 42) is stale by the time the flood starts.
    tokio::time::sleep(ms(350)).await;
    fake.set_delay(ms(250));
    fake.reset_max_concurrency();

    let mut flood = Vec::new();
    for i in 0..300u64 {
        let proxy = proxy.clone();
        flood.push(tokio::spawn(async move {
            let c = if i == 150 { 42 } else { 1000 + i };
            conv(&proxy, 1, c, FLOOD).await
        }));
    }
    until("the flood to queue", || {
        proxy.proxy.upstream.limiter().waiting() >= 100
    })
    .await;

    let mut polite = Vec::new();
    for (p, token) in POLITE.iter().enumerate() {
        let proxy = proxy.clone();
        polite.push(tokio::spawn(async move {
            let mut took = Vec::new();
            for i in 0..10u64 {
                let start = Instant::now();
                let r = conv(&proxy, 1, 1300 + p as u64 * 10 + i, token).await;
                took.push(start.elapsed());
                assert_eq!(r.status, 200, "{token}: {r:?}");
                assert_eq!(r.x_cache(), "MISS", "{token}");
            }
            took
        }));
    }
    for p in polite {
        for took in p.await.unwrap() {
            assert!(took < ms(2000), "a polite request took {took:?}");
        }
    }

    let (mut ok, mut shed, mut stale, mut revalidated) = (0, 0, 0, 0);
    for f in flood {
        let r = f.await.unwrap();
        match (r.status.as_u16(), r.x_cache()) {
            (200, "MISS") => ok += 1,
            (200, "STALE") => stale += 1,
            // The stored conversation's request got one of the token's slots (which of the
            // 300 do is up to the scheduler): revalidated, not shed.
            (200, "REVALIDATED") => revalidated += 1,
            (503, "LOCAL") => {
                assert_eq!(r.json()["errors"][0]["code"], "upstream_unavailable");
                assert_eq!(r.header("retry-after"), "1");
                shed += 1;
            }
            other => panic!("flood answer {other:?}: {r:?}"),
        }
    }
    assert_eq!(
        stale + revalidated,
        1,
        "the stored conversation is served stale when shed (never a 503)"
    );
    assert!(shed >= 250, "flood: {ok} ok, {shed} shed");
    // 2 slots × (1 s queue timeout / 250 ms) ≈ 8, more on a slow machine; far from 300.
    assert!(ok + revalidated <= 40, "flood: {ok} ok, {shed} shed");
    let m = metrics_text(&proxy).await;
    assert_eq!(metric(&m, SHED_QUOTA), f64::from(shed + stale));
    assert_eq!(metric(&m, SHED_QUEUE), 0.0);
    assert!(fake.max_concurrency() <= 8, "{}", fake.max_concurrency());
}

/// Freed slots go round-robin over the waiting scopes, first come first served within one, as
/// the upstream's arrival order shows. One slot (cap 1): while the flooder's first request
/// holds it, the flooder queues 4 more, then `a` and `b` queue 2 each. First come first served
/// would send F F F F F a a b b; the proxy sends F a b F a b F F F.
#[tokio::test]
async fn freed_slots_go_round_robin_across_tokens() {
    let fake = FakeChatwoot::start().await;
    populate(&fake, 1000, 50, &[FLOOD, "a", "b"]);
    let mut cfg = config(&fake.url());
    cfg.upstream_max_in_flight = 1;
    cfg.upstream_max_in_flight_per_token = Some(1);
    cfg.upstream_queue_timeout = Duration::from_secs(20);
    let proxy = Arc::new(start_proxy(cfg).await);
    accept_tokens(&proxy, &[FLOOD, "a", "b"]).await;
    // The first request holds the slot for 3 s (the fake reads the delay as a request
    // arrives), long enough to queue the others; they take 50 ms each.
    fake.set_delay(ms(3000));
    let since = fake.seen().len();

    let mut tasks = Vec::new();
    let mut conversation = 1000;
    let mut queue = |token: &'static str, n: usize| {
        for _ in 0..n {
            let proxy = proxy.clone();
            let c = conversation;
            conversation += 1;
            tasks.push(tokio::spawn(async move { conv(&proxy, 1, c, token).await }));
        }
    };
    queue(FLOOD, 1);
    let limiter = || proxy.proxy.upstream.limiter();
    until("the first request in flight", || fake.in_flight() == 1).await;
    fake.set_delay(ms(50));
    // One request at a time, so that each joins its queue in this order.
    for (token, n) in [(FLOOD, 4), ("a", 2), ("b", 2)] {
        for _ in 0..n {
            let before = limiter().waiting();
            queue(token, 1);
            until("the request to queue", || limiter().waiting() == before + 1).await;
        }
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    }
    assert_eq!(
        tokens_seen_by_upstream(&fake, since),
        [FLOOD, "a", "b", FLOOD, "a", "b", FLOOD, FLOOD, FLOOD]
    );
}

/// Tokens the upstream has never accepted count against their client address: fifty requests
/// from one address, each with a new random token, hold at most the per-scope cap (2) of
/// upstream slots and the rest are shed as `token_quota`, while an accepted token from the
/// same address still gets a slot at once.
#[tokio::test]
async fn unaccepted_tokens_count_against_their_address() {
    let fake = FakeChatwoot::start().await;
    populate(&fake, 1000, 10, &["known"]);
    let mut cfg = config(&fake.url());
    cfg.upstream_max_in_flight = 8;
    cfg.upstream_queue_timeout = ms(500);
    cfg.breaker_min_requests = 100_000;
    let proxy = Arc::new(start_proxy(cfg).await);
    accept_tokens(&proxy, &["known"]).await;
    fake.set_delay(ms(300));
    fake.reset_max_concurrency();

    let mut random = Vec::new();
    for i in 0..50 {
        let proxy = proxy.clone();
        random.push(tokio::spawn(async move {
            conv(&proxy, 1, 1000, &format!("random-{i}-{}", i * 7919)).await
        }));
    }
    until("the random tokens to queue", || {
        proxy.proxy.upstream.limiter().waiting() >= 40
    })
    .await;
    let start = Instant::now();
    let r = conv(&proxy, 1, 1001, "known").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    assert!(start.elapsed() < ms(1500), "{:?}", start.elapsed());

    let mut refused = 0;
    let mut shed = 0;
    for t in random {
        let r = t.await.unwrap();
        match r.status.as_u16() {
            401 => refused += 1,
            503 => shed += 1,
            other => panic!("{other}: {r:?}"),
        }
    }
    assert!(shed >= 30, "{refused} refused by the upstream, {shed} shed");
    assert!(
        fake.max_concurrency() <= 3,
        "the address's 2 slots plus the known token's 1: {}",
        fake.max_concurrency()
    );
    assert_eq!(
        metric(&metrics_text(&proxy).await, SHED_QUOTA),
        f64::from(shed)
    );
}

/// With the cap off (0, the sidecar's setting), a token may use every slot.
#[tokio::test]
async fn cap_zero_turns_fair_slots_off() {
    let fake = FakeChatwoot::start().await;
    populate(&fake, 1000, 10, &[]);
    let mut cfg: Config = config(&fake.url());
    cfg.upstream_max_in_flight = 4;
    cfg.upstream_max_in_flight_per_token = Some(0);
    let proxy = Arc::new(start_proxy(cfg).await);
    accept_tokens(&proxy, &["admin-token"]).await;
    fake.set_delay(ms(300));
    fake.reset_max_concurrency();
    let mut tasks = Vec::new();
    for c in 1000..1004 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move {
            conv(&proxy, 1, c, "admin-token").await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(fake.max_concurrency(), 4);
}

const SHED_RATE: &str = r#"chatwoot_cache_shed_total{reason="rate_limited"}"#;

/// One upstream request is charged once (SPEC 12): twenty concurrent requests of one token for
/// one cold conversation, with a share of 1 slot and a rate of 1 a minute (burst 1), are all
/// answered `200` from the one upstream request the first of them started; the others wait on
/// it (coalesced) or hit what it stored, and none is shed for its quota or its rate.
#[tokio::test]
async fn coalesced_requests_are_charged_once() {
    let fake = FakeChatwoot::start().await;
    populate(&fake, 1000, 1, &["t"]);
    let mut cfg = config(&fake.url());
    cfg.upstream_max_in_flight = 4;
    cfg.upstream_max_in_flight_per_token = Some(1);
    cfg.rate_limit_per_token = Some(chatwoot_cache::protect::parse_rate("1/m").unwrap());
    cfg.rate_limit_burst = Some(1);
    let proxy = Arc::new(start_proxy(cfg).await);
    fake.set_delay(ms(500));
    let before = fake.show_requests();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(
            async move { conv(&proxy, 1, 1000, "t").await },
        ));
    }
    let mut xcache = std::collections::BTreeMap::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        *xcache.entry(r.x_cache().to_string()).or_insert(0) += 1;
    }
    assert_eq!(fake.show_requests(), before + 1, "{xcache:?}");
    // MISS (coalesced onto the fetch); a request a loaded machine starts late is a HIT.
    assert!(
        xcache.keys().all(|x| x == "MISS" || x == "HIT"),
        "{xcache:?}"
    );
    let m = metrics_text(&proxy).await;
    assert_eq!(metric(&m, SHED_QUOTA) + metric(&m, SHED_RATE), 0.0);
    assert!(metric(&m, "chatwoot_cache_coalesced_total") >= 1.0);
}

fn assert_rate_limited(r: &Resp, what: &str) {
    assert_eq!(
        (r.status.as_u16(), r.x_cache()),
        (429, "LOCAL"),
        "{what}: {r:?}"
    );
    assert_eq!(r.json()["errors"][0]["code"], "rate_limited", "{what}");
    let ra: u64 = r.header("retry-after").parse().expect("Retry-After");
    // 1 request a minute: the next one is due within the minute, and never "0".
    assert!((1..=60).contains(&ra), "{what}: Retry-After {ra}");
}

/// `--rate-limit-per-token 1/m` with a burst of 3: a token's first three requests that need
/// the upstream pass, the fourth gets `429 rate_limited` with `Retry-After` (seconds until the
/// next one is due, at least 1), on the conversation route and on pass-through alike, while
/// cache hits are never limited and a stored conversation past its TTL is answered `STALE`
/// (`fwd-status=429`) instead of the 429. Another token has its own bucket. Random tokens
/// share their client address's bucket until the upstream accepts one.
#[tokio::test]
async fn rate_limit_answers_429_or_stale() {
    let fake = FakeChatwoot::start().await;
    populate(&fake, 1000, 10, &["t", "u"]);
    let mut cfg = config(&fake.url());
    cfg.rate_limit_per_token = Some(chatwoot_cache::protect::parse_rate("1/m").unwrap());
    cfg.rate_limit_burst = Some(3);
    cfg.cache_ttl = Duration::from_secs(2);
    cfg.stale_while_revalidate = Duration::ZERO;
    cfg.stale_if_error = Duration::from_secs(60);
    let proxy = start_proxy(cfg).await;
    // Not yet accepted: charged to the address's bucket (1 of 3), then t's own bucket.
    assert_eq!(conv(&proxy, 1, 42, "t").await.x_cache(), "MISS");
    let stored_at = Instant::now();
    assert_eq!(conv(&proxy, 1, 1000, "t").await.x_cache(), "MISS");
    assert_eq!(conv(&proxy, 1, 1001, "t").await.x_cache(), "MISS");
    assert_eq!(conv(&proxy, 1, 1002, "t").await.x_cache(), "MISS");
    let upstream_before = fake.requests();
    assert_rate_limited(&conv(&proxy, 1, 1003, "t").await, "conversation miss");
    let r = get(&proxy.url("/api/v1/accounts/1/contacts"), Some("t")).await;
    assert_rate_limited(&r, "pass-through");
    assert_eq!(
        fake.requests(),
        upstream_before,
        "limited requests stay local"
    );
    // Hits are never limited.
    for _ in 0..5 {
        assert_eq!(conv(&proxy, 1, 1000, "t").await.x_cache(), "HIT");
    }
    // Another token: its own bucket (after its first request, charged to the address).
    assert_eq!(conv(&proxy, 1, 1000, "u").await.x_cache(), "MISS");
    assert_eq!(conv(&proxy, 1, 1001, "u").await.x_cache(), "MISS");
    // Random tokens share the address's bucket: its last request, then 429s.
    assert_eq!(conv(&proxy, 1, 1000, "random-1").await.status, 401);
    assert_rate_limited(&conv(&proxy, 1, 1000, "random-2").await, "random token");

    // (1, 42) past its TTL: stale instead of the 429.
    let ttl_end = stored_at + Duration::from_millis(2100);
    tokio::time::sleep(ttl_end.saturating_duration_since(Instant::now())).await;
    let r = conv(&proxy, 1, 42, "t").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "STALE"), "{r:?}");
    assert_eq!(
        r.header("cache-status"),
        "chatwoot-cache; fwd=stale; fwd-status=429; detail=stale-if-error"
    );
    assert_eq!(metric(&metrics_text(&proxy).await, SHED_RATE), 4.0);
}

/// A valid token cannot escape its rate by adding a second credential: with a devise header
/// (`client`) beside it the request is passed through uncached (`BYPASS`), but it is still
/// charged to the token's bucket, so the third such request (burst 2) is answered `429`.
#[tokio::test]
async fn a_token_with_another_credential_keeps_its_rate_limit() {
    let fake = FakeChatwoot::start().await;
    populate(&fake, 1000, 10, &["t"]);
    let mut cfg = config(&fake.url());
    cfg.rate_limit_per_token = Some(chatwoot_cache::protect::parse_rate("1/m").unwrap());
    cfg.rate_limit_burst = Some(2);
    let proxy = start_proxy(cfg).await;
    // Accepted by the upstream (charged to the address's bucket), from now on its own bucket.
    assert_eq!(conv(&proxy, 1, 1000, "t").await.x_cache(), "MISS");
    let url = proxy.url("/api/v1/accounts/1/conversations/1001");
    let mixed = [("api_access_token", "t"), ("client", "x")];
    for i in 0..2 {
        let r = send(http::Method::GET, &url, &mixed, b"").await;
        assert_eq!(
            (r.status.as_u16(), r.x_cache()),
            (200, "BYPASS"),
            "{i}: {r:?}"
        );
    }
    let before = fake.requests();
    let r = send(http::Method::GET, &url, &mixed, b"").await;
    assert_rate_limited(&r, "token with a devise header");
    assert_eq!(fake.requests(), before, "the limited request stays local");
}

const ADMIN: &str = "admin-token";

fn refresh_ahead(outcome: &str) -> String {
    format!(r#"chatwoot_cache_refresh_ahead_total{{outcome="{outcome}"}}"#)
}

async fn refreshes(proxy: &ProxyHandle) -> f64 {
    let m = metrics_text(proxy).await;
    ["not_modified", "unchanged", "changed", "older", "error"]
        .iter()
        .map(|o| metric(&m, &refresh_ahead(o)))
        .sum()
}

/// Polls (1, 42) every 10 ms until `until` after `from`, asserting every answer is `HIT`.
/// Returns the number of hits and when (after `from`) the last one was sent: `from` is taken
/// after the entry was stored, so the entry was at least that old when the proxy answered it.
async fn poll_hits(proxy: &ProxyHandle, from: Instant, until: Duration) -> (usize, Duration) {
    let mut n = 0;
    let mut last = Duration::ZERO;
    while from.elapsed() < until {
        last = from.elapsed();
        let r = conv(proxy, 1, 42, ADMIN).await;
        assert_eq!(
            (r.status.as_u16(), r.x_cache()),
            (200, "HIT"),
            "at {:?}: {r:?}",
            from.elapsed()
        );
        n += 1;
        tokio::time::sleep(ms(10)).await;
    }
    (n, last)
}

/// The refresh-ahead tests' ttl and share: a refresh is due from `REFRESH_AT` (F × ttl) on, and
/// the entry turns stale at `TTL`. The tests poll from the client's receipt of the MISS, which
/// is after the entry was stored, so the entry is older than the test's clock says: polls stop
/// at `POLL_UNTIL`, well before the ttl, leaving hundreds of milliseconds on both sides for a
/// loaded 2-core CI (hits past `REFRESH_AT`, none at the ttl).
const TTL: Duration = Duration::from_millis(1000);
const REFRESH_AT: Duration = Duration::from_millis(500);
const POLL_UNTIL: Duration = Duration::from_millis(750);

fn refresh_config(fake: &FakeChatwoot) -> Config {
    let mut cfg = config(&fake.url());
    cfg.cache_ttl = TTL;
    cfg.refresh_ahead = REFRESH_AT.as_secs_f64() / TTL.as_secs_f64();
    cfg.refresh_ahead_min_hits = 2;
    cfg
}

/// Polls hits up to `POLL_UNTIL` and asserts at least one was sent past `REFRESH_AT`, so a test
/// that expects no refresh cannot pass because no hit ever made one due.
async fn poll_hits_past_refresh_point(proxy: &ProxyHandle, stored: Instant) {
    let (hits, last) = poll_hits(proxy, stored, POLL_UNTIL).await;
    assert!(
        last >= REFRESH_AT,
        "no hit past F x ttl ({hits} hits, the last sent at {last:?})"
    );
}

/// A conversation polled every 10 ms for five TTLs (ttl 1 s, refresh-ahead 0.7) is answered
/// `HIT` every time — never `STALE`, never a synchronous revalidation (`REVALIDATED`) — and
/// costs the upstream one revalidation per F × ttl = 700 ms (±1), each counted in
/// `refresh_ahead_total{outcome="not_modified"}` (Chatwoot answers them 304).
#[tokio::test]
async fn a_hot_key_goes_from_hit_to_hit() {
    let fake = FakeChatwoot::start().await;
    // F 0.7: the refresh must land within the last (1 - F) × ttl = 300 ms, which a loaded
    // 2-core CI keeps, and five TTLs still hold about seven refreshes.
    let mut cfg = refresh_config(&fake);
    cfg.cache_ttl = ms(1000);
    cfg.refresh_ahead = 0.7;
    let proxy = start_proxy(cfg).await;
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.x_cache(), "MISS");
    let stored = Instant::now();
    let before = fake.show_requests();
    let (hits, _) = poll_hits(&proxy, stored, ms(5000)).await;
    let elapsed = stored.elapsed().as_secs_f64();
    let upstream = (fake.show_requests() - before) as f64;
    // One per F × ttl, plus or minus one: 5 s / 700 ms ≈ 7, so 6 to 8. Each refresh starts at
    // the first poll past 700 ms and takes a round trip, so the period runs a little longer
    // than 700 ms on a loaded machine (never past the ttl: the answers would turn STALE).
    let per_share = (elapsed / 0.7).round();
    eprintln!("hot key: {upstream} upstream requests in {elapsed:.2}s, {hits} hits");
    assert!(
        (upstream - per_share).abs() <= 1.0,
        "{upstream} upstream requests in {elapsed:.2}s ({hits} hits): expected \
         {per_share} ± 1"
    );
    let m = metrics_text(&proxy).await;
    assert_eq!(metric(&m, &refresh_ahead("not_modified")), upstream);
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_requests_total{cache="stale",route="conversation",status="2xx"}"#
        ),
        0.0
    );
}

/// Refresh-ahead and stale-while-revalidate share one background revalidation per key: with a
/// slow upstream (3 s), the refresh started past F × ttl is still running when the entry goes
/// stale; the `STALE` answers then join it instead of sending their own, so the upstream sees
/// one request, and the answer it brings turns the key back to `HIT`.
#[tokio::test]
async fn refresh_ahead_and_stale_while_revalidate_share_one_revalidation() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = refresh_config(&fake);
    cfg.stale_while_revalidate = Duration::from_secs(10);
    let proxy = start_proxy(cfg).await;
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.x_cache(), "MISS");
    let stored = Instant::now();
    let before = fake.show_requests();
    fake.set_delay(ms(3000));
    // Hot, then past F × ttl: the refresh starts (in the background: still a HIT).
    poll_hits_past_refresh_point(&proxy, stored).await;
    // (The fake counts a show request when it answers; `in_flight` from its arrival.)
    until("the refresh to reach the upstream", || {
        fake.in_flight() == 1
    })
    .await;
    // Past the ttl while it runs: STALE, and no second revalidation.
    tokio::time::sleep((TTL + ms(50)).saturating_sub(stored.elapsed())).await;
    let mut stale = 0;
    while fake.in_flight() == 1 {
        let r = conv(&proxy, 1, 42, ADMIN).await;
        if r.x_cache() == "STALE" {
            stale += 1;
        } else {
            assert_eq!(r.x_cache(), "HIT", "{r:?}");
        }
        tokio::time::sleep(ms(20)).await;
    }
    assert!(stale > 0, "the entry went stale while the refresh ran");
    let deadline = Instant::now() + Duration::from_secs(10);
    while conv(&proxy, 1, 42, ADMIN).await.x_cache() != "HIT" {
        assert!(Instant::now() < deadline, "never HIT again");
        tokio::time::sleep(ms(20)).await;
    }
    assert_eq!(
        fake.show_requests(),
        before + 1,
        "one background revalidation"
    );
    let m = metrics_text(&proxy).await;
    assert_eq!(metric(&m, &refresh_ahead("not_modified")), 1.0);
    assert_eq!(
        metric(
            &m,
            r#"chatwoot_cache_revalidations_total{outcome="not_modified"}"#
        ),
        1.0
    );
}

/// Refresh-ahead is not charged to its token's rate: with `1/m` and a burst of 2, a token whose
/// hot entry was refreshed in the background still gets its two misses, and only the third is
/// `429`.
#[tokio::test]
async fn refresh_ahead_leaves_the_rate_budget_to_the_client() {
    let fake = FakeChatwoot::start().await;
    populate(&fake, 1000, 10, &[ADMIN]);
    let mut cfg = refresh_config(&fake);
    cfg.rate_limit_per_token = Some(chatwoot_cache::protect::parse_rate("1/m").unwrap());
    cfg.rate_limit_burst = Some(2);
    let proxy = start_proxy(cfg).await;
    // Charged to the address (the token is not accepted yet); from now on its own bucket.
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.x_cache(), "MISS");
    let stored = Instant::now();
    poll_hits_past_refresh_point(&proxy, stored).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while refreshes(&proxy).await < 1.0 {
        assert!(Instant::now() < deadline, "no refresh-ahead");
        tokio::time::sleep(ms(20)).await;
    }
    assert_eq!(conv(&proxy, 1, 1000, ADMIN).await.x_cache(), "MISS");
    assert_eq!(conv(&proxy, 1, 1001, ADMIN).await.x_cache(), "MISS");
    assert_rate_limited(&conv(&proxy, 1, 1002, ADMIN).await, "third miss");
}

/// While the breaker is open, a hot entry past F × ttl is not refreshed ahead: nothing
/// reaches the upstream and no probe is spent on it.
#[tokio::test]
async fn refresh_ahead_stops_while_the_breaker_is_open() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = refresh_config(&fake);
    cfg.breaker_min_requests = 2;
    cfg.breaker_failure_ratio = 0.5;
    cfg.breaker_open = Duration::from_secs(10);
    let proxy = start_proxy(cfg).await;
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.x_cache(), "MISS");
    let stored = Instant::now();
    fake.set_fault(
        Fault::Status {
            status: 500,
            body: "{}".into(),
            headers: vec![],
        },
        Some(2),
    );
    // The warm-up's success and one or two 500s open it (min 2 requests, ratio 0.5).
    for _ in 0..2 {
        let _ = get(&proxy.url("/echo"), None).await;
    }
    let m = metrics_text(&proxy).await;
    assert_eq!(metric(&m, "chatwoot_cache_breaker_state"), 2.0, "open");
    fake.clear_fault();
    let before = fake.requests();
    poll_hits_past_refresh_point(&proxy, stored).await;
    assert_eq!(fake.requests(), before, "nothing went upstream");
    assert_eq!(refreshes(&proxy).await, 0.0);
}

/// Refresh-ahead never takes one of the last quarter of the upstream slots: with 3 of 4 slots
/// held by hung requests, a hot entry past F × ttl is not refreshed (the upstream sees no
/// request for it), and its clients still get `HIT`.
#[tokio::test]
async fn refresh_ahead_never_takes_the_last_quarter_of_slots() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = refresh_config(&fake);
    cfg.upstream_max_in_flight = 4;
    cfg.upstream_max_in_flight_per_token = Some(0);
    cfg.upstream_timeout = Duration::from_secs(5);
    let proxy = Arc::new(start_proxy(cfg).await);
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.x_cache(), "MISS");
    let stored = Instant::now();
    fake.set_fault(Fault::Hang, Some(3));
    let mut hung = Vec::new();
    for _ in 0..3 {
        let url = proxy.url("/echo");
        hung.push(tokio::spawn(async move { get(&url, None).await }));
    }
    until("3 slots held", || {
        proxy.proxy.upstream.limiter().available() == 1
    })
    .await;
    let before = fake.show_requests();
    poll_hits_past_refresh_point(&proxy, stored).await;
    assert_eq!(
        fake.show_requests(),
        before,
        "no refresh on the last free slot"
    );
    assert_eq!(refreshes(&proxy).await, 0.0);
    for h in hung {
        h.abort();
    }
}
