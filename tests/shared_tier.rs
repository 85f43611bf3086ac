//! The shared tier across replicas (SPEC 11) against real `redis-server` processes, with several
//! proxy instances in one test process.

mod support;

use std::time::{Duration, Instant};

use chatwoot_cache::config::RedisConfig;
use chatwoot_cache::shared::FAILURES_TO_SKIP;
use http::Method;
use support::redis::{RedisRelay, RedisServer, wait_ready};
use support::*;

const SECRET: &str = "shared-tier-test-secret-0123456789abcdef";
const CONV: &str = "/api/v1/accounts/1/conversations/42";

/// A replica on `redis`, waiting until its shared tier is up and subscribed to the bus.
async fn replica(fake: &FakeChatwoot, redis: &RedisServer, timeout: Duration) -> ProxyHandle {
    replica_with(fake, redis, timeout, SECRET).await
}

async fn replica_with(
    fake: &FakeChatwoot,
    redis: &RedisServer,
    timeout: Duration,
    secret: &str,
) -> ProxyHandle {
    replica_tuned(fake, redis, timeout, secret, |_| {}).await
}

/// [`replica_with`], with settings changed by `tune` first.
async fn replica_tuned(
    fake: &FakeChatwoot,
    redis: &RedisServer,
    timeout: Duration,
    secret: &str,
    tune: impl FnOnce(&mut chatwoot_cache::config::Config),
) -> ProxyHandle {
    replica_at(fake, redis.url(), timeout, secret, tune).await
}

/// [`replica_tuned`] on the Redis at `url` (a relay in front of one).
async fn replica_at(
    fake: &FakeChatwoot,
    url: String,
    timeout: Duration,
    secret: &str,
    tune: impl FnOnce(&mut chatwoot_cache::config::Config),
) -> ProxyHandle {
    let mut cfg = config(&fake.url());
    tune(&mut cfg);
    cfg.redis = Some(RedisConfig {
        url,
        ca_file: None,
        timeout,
        key_prefix: "test:".into(),
    });
    cfg.scope_secret = Some(secret.into());
    let proxy = start_proxy(cfg).await;
    wait_ready(&proxy).await;
    proxy
}

/// The admin token's scope under [`SECRET`], as every replica derives it.
fn admin_scope() -> chatwoot_cache::auth::Scope {
    chatwoot_cache::auth::Scoper::from_secret(SECRET.as_bytes()).scope(b"admin-token")
}

/// The Redis key of `kind` (`v` value, `l` lease) for the admin token's conversation.
fn admin_key(kind: &str, account: u64, conversation: u64) -> String {
    format!(
        "test:{kind}:{account}:{conversation}:{:032x}",
        admin_scope().0
    )
}

/// Settings for [`replica_tuned`]: `ttl` and stale-while-revalidate (stale-if-error stays at
/// its default, 10 min).
fn windows(ttl: Duration, swr: Duration) -> impl Fn(&mut chatwoot_cache::config::Config) + Copy {
    move |c| {
        c.cache_ttl = ttl;
        c.stale_while_revalidate = swr;
    }
}

/// PATCHes the test conversation's status through `proxy` as the admin.
async fn set_status(proxy: &ProxyHandle, status: &str) -> Resp {
    let body = format!(r#"{{"status":"{status}"}}"#);
    send(
        Method::PATCH,
        &proxy.url(CONV),
        &[
            ("api_access_token", "admin-token"),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}

fn updated_at(r: &Resp) -> String {
    r.json()["updated_at"].to_string()
}

/// An entry stored through one replica is served by the others without an upstream request,
/// as `HIT` with `detail=shared`, its `Age` counted from the original fetch; HEAD too.
#[tokio::test]
async fn an_entry_stored_through_one_replica_is_served_by_the_others() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_millis(500);
    let (a, b, c) = (
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
    );
    let first = conv(&a, 1, 42, "admin-token").await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (200, "MISS"));
    assert_eq!(fake.show_requests(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = conv(&b, 1, 42, "admin-token").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "HIT"));
    assert!(
        r.header("cache-status").ends_with("detail=shared"),
        "{}",
        r.header("cache-status")
    );
    assert!(
        r.header("age").parse::<u64>().unwrap() >= 1,
        "age from the fetch"
    );
    assert_eq!(r.body, first.body);
    assert_eq!(r.header("etag"), first.header("etag"));
    assert_eq!(r.header("last-modified"), first.header("last-modified"));
    let head = send(
        Method::HEAD,
        &c.url(CONV),
        &[("api_access_token", "admin-token")],
        b"",
    )
    .await;
    assert_eq!((head.status.as_u16(), head.x_cache()), (200, "HIT"));
    assert!(head.body.is_empty());
    // Now in B's L1: a plain hit.
    let again = conv(&b, 1, 42, "admin-token").await;
    assert_eq!(again.x_cache(), "HIT");
    assert!(!again.header("cache-status").contains("shared"));
    assert_eq!(
        fake.show_requests(),
        1,
        "one upstream request for three replicas"
    );
    // Another token is another scope: never served another's entry.
    let agent = conv(&c, 1, 42, "agent-token").await;
    assert_eq!(agent.x_cache(), "MISS");
    let text = metrics_text(&b).await;
    assert_eq!(metric(&text, "chatwoot_cache_redis_up"), 1.0);
    assert!(metric(&text, "chatwoot_cache_l2_requests_total{result=\"hit\"}") >= 1.0);
    // Keys name ids and scopes, never a token.
    for key in redis.keys("*") {
        assert!(!key.contains("token"), "{key}");
    }
}

/// The shared tier keeps the compressed form (SPEC 14): the value in Redis is smaller than the
/// identity body, and another replica serves gzip and identity clients from it (the stored gzip
/// bytes, and identity bytes it decompresses once) without asking the upstream.
#[tokio::test]
async fn the_shared_tier_stores_the_compressed_form() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_millis(500);
    let (a, b, c) = (
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
    );
    let first = conv(&a, 1, 42, "admin-token").await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (200, "MISS"));
    let identity = first.body.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    let key = loop {
        if let Some(k) = redis.keys("test:v:1:42:*").into_iter().next() {
            break k;
        }
        assert!(Instant::now() < deadline, "no shared value written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let magic = redis
        .command(&["GETRANGE", &key, "0", "3"])
        .unwrap_or_default();
    assert!(magic.contains("CWC2"), "{magic:?}");
    let len: usize = redis
        .command(&["STRLEN", &key])
        .unwrap_or_default()
        .trim()
        .trim_start_matches(':')
        .parse()
        .expect("STRLEN");
    assert!(
        len < identity.len(),
        "the shared value ({len} B with its headers) holds the compressed body, not the {} B \
         identity body",
        identity.len()
    );
    let url = b.url(CONV);
    let gz = send(
        Method::GET,
        &url,
        &[
            ("api_access_token", "admin-token"),
            ("accept-encoding", "gzip"),
        ],
        b"",
    )
    .await;
    assert_eq!((gz.status.as_u16(), gz.x_cache()), (200, "HIT"));
    assert!(gz.header("cache-status").ends_with("detail=shared"));
    assert_eq!(gz.header("content-encoding"), "gzip");
    assert!(gz.body.len() < identity.len());
    assert_eq!(gz.decoded(), identity);
    let plain = conv(&c, 1, 42, "admin-token").await;
    assert_eq!((plain.status.as_u16(), plain.x_cache()), (200, "HIT"));
    assert_eq!(plain.body, identity);
    assert_eq!(plain.header("etag"), first.header("etag"));
    assert_ne!(plain.header("etag"), gz.header("etag"), "one ETag per form");
    assert_eq!(
        fake.show_requests(),
        1,
        "one upstream request for three replicas"
    );
}

/// 200 write-then-read pairs alternating replicas, each read at least 50 ms after the write's
/// response: every read returns the written body, from L1 and from L2.
#[tokio::test]
async fn writes_through_one_replica_are_read_through_the_others() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_millis(500);
    let replicas = [
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
    ];
    // Every replica holds the conversation in L1 first.
    for r in &replicas {
        assert_eq!(conv(r, 1, 42, "admin-token").await.status, 200);
    }
    let mut shared_hits = 0;
    for i in 0..200 {
        let writer = &replicas[i % 3];
        let reader = &replicas[(i + 1) % 3];
        let third = &replicas[(i + 2) % 3];
        let w = set_status(writer, "open").await;
        assert_eq!(w.status, 200, "write {i}");
        let written = updated_at(&w);
        tokio::time::sleep(Duration::from_millis(50)).await;
        for (who, r) in [("reader", reader), ("third", third)] {
            let got = conv(r, 1, 42, "admin-token").await;
            assert_eq!(got.status, 200);
            assert_eq!(updated_at(&got), written, "pair {i}, {who}: pre-write body");
            shared_hits += usize::from(got.header("cache-status").ends_with("detail=shared"));
        }
        // And the writer itself, from its L1 or L2.
        assert_eq!(
            updated_at(&conv(writer, 1, 42, "admin-token").await),
            written
        );
    }
    assert!(shared_hits >= 150, "reads served from L2: {shared_hits}");
}

/// A fetch that began before a write does not put the pre-write body into Redis (nor into
/// its replica's L1): the write's generation moved while it was in flight.
#[tokio::test]
async fn a_fetch_that_began_before_a_write_does_not_land() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_millis(500);
    let (a, b, c) = (
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
    );
    *fake.state.show_post_delay.lock().unwrap() = Duration::from_millis(600);
    let slow_url = a.url(CONV);
    let slow = tokio::spawn(async move { get(&slow_url, Some("admin-token")).await });
    // The slow fetch has rendered the pre-write body and is on its way back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let w = send(
        Method::PATCH,
        &b.url(CONV),
        &[("api_access_token", "admin-token")],
        br#"{"status":"resolved"}"#,
    )
    .await;
    assert_eq!(w.status, 200);
    let written = updated_at(&w);
    let old = slow.await.unwrap();
    assert_eq!(old.status, 200);
    assert_ne!(
        updated_at(&old),
        written,
        "the slow fetch began before the write"
    );
    *fake.state.show_post_delay.lock().unwrap() = Duration::ZERO;
    tokio::time::sleep(Duration::from_millis(50)).await;
    for r in [&c, &a, &b] {
        let got = conv(r, 1, 42, "admin-token").await;
        assert_eq!(updated_at(&got), written, "the pre-write body came back");
    }
}

/// A garbage value, a value forged with another secret, and a valid value copied under another
/// key are all misses, and are overwritten by the next store.
#[tokio::test]
async fn garbage_forged_and_moved_values_are_misses() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.1");
    let t = Duration::from_millis(500);
    let a = replica(&fake, &redis, t).await;
    let forger = replica_with(&fake, &redis, t, "another-secret-another-secret-0123456789").await;
    assert_eq!(conv(&a, 1, 42, "admin-token").await.x_cache(), "MISS");
    assert_eq!(conv(&a, 1, 43, "admin-token").await.x_cache(), "MISS");
    assert_eq!(conv(&forger, 1, 42, "admin-token").await.x_cache(), "MISS");
    let values = redis.keys("test:v:1:42:*");
    assert_eq!(values.len(), 2, "two scopes: {values:?}");
    let key42 = |k: &&String| redis.command(&["GET", k]).unwrap_or_default().len() > 10;
    assert!(values.iter().all(|k| key42(&k)));
    let ours = redis
        .keys("test:v:1:43:*")
        .pop()
        .expect("conversation 43 stored");
    let scope = ours.rsplit(':').next().unwrap().to_string();
    let our42 = format!("test:v:1:42:{scope}");
    let forged42 = values.iter().find(|k| **k != our42).unwrap().clone();

    // Each case is the Redis command that tampers with the value of (1, 42, our scope).
    let cases = [
        ("garbage", vec!["SET", &our42, "garbage"]),
        (
            "forged with another secret",
            vec!["COPY", &forged42, &our42, "REPLACE"],
        ),
        (
            "moved from another key",
            vec!["COPY", &ours, &our42, "REPLACE"],
        ),
    ];
    for (what, tamper) in cases {
        let reply = redis.command(&tamper).unwrap_or_default();
        assert!(
            reply.starts_with('+') || reply.starts_with(":1"),
            "{what}: {reply}"
        );
        let before = fake.show_requests();
        // A fresh replica: its L1 is empty, so it reads the tampered value.
        let reader = replica(&fake, &redis, t).await;
        let r = conv(&reader, 1, 42, "admin-token").await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"), "{what}");
        assert_eq!(r.json()["id"], 42, "{what}");
        assert_eq!(fake.show_requests(), before + 1, "{what}");
        // Overwritten with a valid value: the next fresh replica gets it from L2.
        let next = replica(&fake, &redis, t).await;
        let r = conv(&next, 1, 42, "admin-token").await;
        assert_eq!(r.x_cache(), "HIT", "{what}: not overwritten");
        assert!(r.header("cache-status").ends_with("detail=shared"));
    }
}

/// Redis killed mid-run: no client sees an error, Redis is skipped; restarted (empty): caching
/// through Redis resumes by itself.
#[tokio::test]
async fn redis_killed_and_restarted() {
    let mut redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    for c in 43..=60 {
        fake.add_conversation(1, c, "1765182000.1");
    }
    let t = Duration::from_millis(300);
    let (a, b) = (
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
    );
    assert_eq!(conv(&a, 1, 42, "admin-token").await.x_cache(), "MISS");
    assert_eq!(conv(&b, 1, 42, "admin-token").await.x_cache(), "HIT");
    redis.kill();
    for c in 43..=50 {
        for r in [&a, &b] {
            let got = conv(r, 1, c, "admin-token").await;
            assert_eq!(got.status, 200, "conversation {c} with Redis down");
        }
    }
    let text = metrics_text(&a).await;
    assert_eq!(metric(&text, "chatwoot_cache_redis_up"), 0.0, "skipped");
    assert!(
        metric(
            &text,
            "chatwoot_cache_l2_requests_total{result=\"skipped\"}"
        ) >= 1.0
    );
    redis.restart();
    wait_ready(&a).await;
    wait_ready(&b).await;
    assert_eq!(conv(&a, 1, 55, "admin-token").await.x_cache(), "MISS");
    let r = conv(&b, 1, 55, "admin-token").await;
    assert_eq!(r.x_cache(), "HIT", "caching through Redis resumed");
    assert!(r.header("cache-status").ends_with("detail=shared"));
}

/// Redis paused (SIGSTOP): a request's Redis work gives up after --redis-timeout in total, the
/// request goes on without it, and after a few failures Redis is skipped entirely. Resumed, it
/// is used again.
#[tokio::test]
async fn redis_paused() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    for c in 43..=60 {
        fake.add_conversation(1, c, "1765182000.1");
    }
    // Long enough that a skipped request's bound below (under one budget) holds on a loaded
    // CI, and still fails if a skipped request waited for Redis.
    let t = Duration::from_secs(2);
    let a = replica(&fake, &redis, t).await;
    assert_eq!(conv(&a, 1, 42, "admin-token").await.x_cache(), "MISS");
    redis.pause();
    let mut c = 43;
    let mut slowest = Duration::ZERO;
    while a.proxy.store.shared().unwrap().is_up() {
        assert!(c < 60, "Redis never skipped");
        let start = Instant::now();
        let r = conv(&a, 1, c, "admin-token").await;
        slowest = slowest.max(start.elapsed());
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
        c += 1;
    }
    // One budget of Redis time per request (plus the upstream and a loaded CI's slack), not two.
    assert!(slowest < t + Duration::from_millis(1900), "{slowest:?}");
    assert!(slowest >= t, "the read waited for Redis: {slowest:?}");
    // Skipped: no Redis time at all (waiting for Redis would take a whole budget).
    let start = Instant::now();
    let r = conv(&a, 1, c, "admin-token").await;
    assert_eq!(r.status, 200);
    assert!(start.elapsed() < t, "{:?}", start.elapsed());
    let text = metrics_text(&a).await;
    assert_eq!(metric(&text, "chatwoot_cache_redis_up"), 0.0);
    assert!(metric(&text, "chatwoot_cache_redis_errors_total{op=\"read\"}") >= 1.0);
    redis.resume();
    wait_ready(&a).await;
    let text = metrics_text(&a).await;
    assert_eq!(metric(&text, "chatwoot_cache_redis_up"), 1.0);
}

/// Redis paused: a request answered by a token refusal (the read before its fetch, then the
/// refused scope's invalidation) spends one --redis-timeout on Redis in total, not one per
/// call; the invalidation it could not make in time is retried in the background.
#[tokio::test]
async fn a_token_refusal_spends_one_redis_budget() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 43, "1765182000.1");
    fake.add_user("doomed-token", "doomed", None);
    let t = Duration::from_secs(3);
    let a = replica(&fake, &redis, t).await;
    // An entry stored under the token: its scope has something to drop.
    assert_eq!(conv(&a, 1, 42, "doomed-token").await.x_cache(), "MISS");
    fake.revoke("doomed-token");
    redis.pause();
    let start = Instant::now();
    // An L1 miss: the shared read waits for Redis, the upstream refuses the token.
    let r = conv(&a, 1, 43, "doomed-token").await;
    let took = start.elapsed();
    redis.resume();
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), r#"{"error":"Invalid Access Token"}"#);
    assert!(took >= t, "the read waited for Redis: {took:?}");
    // Two budgets would be 6 s; one and a loaded CI's slack stay under 5.5 s.
    assert!(
        took < t + Duration::from_millis(2500),
        "more than one --redis-timeout: {took:?}"
    );
}

/// A token refused through a replica that has nothing stored under it still drops its entries
/// on every replica, even when Redis has no counter for its scope (evicted under
/// `allkeys-lru`, or never made: an entry kept in L1 only): another replica does not go on
/// serving the refused token what it stored for it.
#[tokio::test]
async fn a_token_refused_through_any_replica_drops_its_entries_everywhere() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    fake.add_user("doomed-token", "doomed", None);
    let t = Duration::from_millis(500);
    // A long TTL: B's entry would not be revalidated on its own while the test runs.
    let long = |c: &mut chatwoot_cache::config::Config| c.cache_ttl = Duration::from_secs(300);
    let a = replica_tuned(&fake, &redis, t, SECRET, long).await;
    let b = replica_tuned(&fake, &redis, t, SECRET, long).await;
    assert_eq!(conv(&b, 1, 42, "doomed-token").await.x_cache(), "MISS");
    assert_eq!(conv(&b, 1, 42, "doomed-token").await.x_cache(), "HIT");
    // The token's scope counter gone from Redis, as an LRU eviction takes it.
    let counters = redis.keys("test:g:s:*");
    assert_eq!(counters.len(), 1, "{counters:?}");
    let del = redis.command(&["DEL", &counters[0]]).unwrap();
    assert!(del.starts_with(":1"), "{del}");
    fake.revoke("doomed-token");
    // Refused through A, which has nothing stored under the token nor a fetch in flight for
    // it: on a route it forwards.
    let r = send(
        Method::GET,
        &a.url("/api/v1/accounts/1/contacts"),
        &[("api_access_token", "doomed-token")],
        b"",
    )
    .await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (401, "BYPASS"));
    // B hears it on the bus (milliseconds) and asks the upstream, which refuses the token.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = conv(&b, 1, 42, "doomed-token").await;
        if r.status == 401 {
            break;
        }
        assert_eq!(r.x_cache(), "HIT");
        assert!(
            Instant::now() < deadline,
            "B still serves the refused token its stored entry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The scope's counter made again, living about twice --upstream-timeout, not a value's
    // lifetime: a flood of random refused tokens leaves Redis little to keep.
    let counters = redis.keys("test:g:s:*");
    assert_eq!(counters.len(), 1, "{counters:?}");
    let ttl = redis.command(&["PTTL", &counters[0]]).unwrap();
    let ttl: i64 = ttl.trim_start_matches(':').trim().parse().unwrap();
    let upstream_timeout = a.proxy.config.load().upstream_timeout;
    assert!(
        ttl > 0 && u128::try_from(ttl).unwrap() <= 2 * upstream_timeout.as_millis(),
        "PTTL {ttl} ms"
    );
}

/// A replica whose bus subscription breaks keeps serving; once resubscribed, entries stored
/// before the break are checked against Redis's generations before they are a `HIT` again (here:
/// an invalidation it missed meanwhile).
#[tokio::test]
async fn a_replica_whose_subscription_drops_revalidates_before_hit() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_millis(500);
    let a = replica(&fake, &redis, t).await;
    let first = conv(&a, 1, 42, "admin-token").await;
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(conv(&a, 1, 42, "admin-token").await.x_cache(), "HIT");
    let shared = a.proxy.store.shared().unwrap();
    let before = shared.subscriptions();
    let killed = redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .unwrap();
    assert!(killed.starts_with(":1"), "{killed}");
    // An invalidation the replica cannot hear: the conversation changed and its counter moved.
    fake.touch(1, 42, "1765182999.5");
    let incr = redis.command(&["INCR", "test:g:c:1:42"]).unwrap();
    assert!(incr.starts_with(':'), "{incr}");
    let deadline = Instant::now() + Duration::from_secs(20);
    // The first answer with the new body, if one came while the resubscription was finishing
    // (the L1 is invalidated just before the subscription counts).
    let mut first_new = None;
    while shared.subscriptions() == before {
        // Serving meanwhile.
        let r = conv(&a, 1, 42, "admin-token").await;
        assert_eq!(r.status, 200);
        if first_new.is_none() && updated_at(&r) == "1765182999.5" {
            first_new = Some(r.x_cache().to_string());
        }
        assert!(Instant::now() < deadline, "never resubscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = conv(&a, 1, 42, "admin-token").await;
    assert_eq!(
        updated_at(&r),
        "1765182999.5",
        "revalidated, not served from L1"
    );
    let first_new = first_new.unwrap_or_else(|| r.x_cache().to_string());
    assert_eq!(first_new, "MISS", "the new body came from the upstream");
}

/// A bus subscription whose connection goes silent without a FIN or RST (a NAT or conntrack
/// entry dropped, a partition) is noticed by its keep-alive PING within seconds: the replica
/// resubscribes and revalidates what it stored before, so a write through another replica that
/// it never heard of is not served from its L1 as `HIT`. Only the bus connection goes silent
/// (the relay recognises it by its `SUBSCRIBE`): the replica's data connection keeps working,
/// so what is tested is the bus alone.
#[tokio::test]
async fn a_silent_bus_connection_is_noticed_and_replaced() {
    let redis = RedisServer::start();
    let relay = RedisRelay::start(redis.addr()).await;
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_millis(500);
    let a = replica(&fake, &redis, t).await;
    let b = replica_at(&fake, relay.url(), t, SECRET, |_| {}).await;
    assert_eq!(conv(&b, 1, 42, "admin-token").await.x_cache(), "MISS");
    assert_eq!(conv(&b, 1, 42, "admin-token").await.x_cache(), "HIT");
    let shared = b.proxy.store.shared().unwrap();
    let before = shared.subscriptions();
    assert_eq!(relay.silence_subscribers(), 1, "B's bus connection");
    let silenced = Instant::now();
    // A write through A: its invalidation is published, and lost on B's silent connection.
    let w = set_status(&a, "open").await;
    assert_eq!(w.status, 200);
    let written = updated_at(&w);
    // Noticed, and replaced by a new subscription (the relay passes new connections). The
    // bound is BUS_PING_INTERVAL + max(--redis-timeout, 2 s) and a resubscription: 3.5 s; the
    // deadline leaves a loaded CI room.
    let deadline = silenced + Duration::from_secs(30);
    while shared.subscriptions() == before {
        assert!(
            Instant::now() < deadline,
            "the silent subscription was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noticed = silenced.elapsed();
    eprintln!("silent bus noticed and replaced after {noticed:?}");
    assert!(noticed < Duration::from_secs(20), "{noticed:?}");
    let text = metrics_text(&b).await;
    assert!(metric(&text, "chatwoot_cache_redis_errors_total{op=\"subscribe\"}") >= 1.0);
    // The L1 entry from before the silence is revalidated, not served as a HIT.
    let r = conv(&b, 1, 42, "admin-token").await;
    assert_eq!(updated_at(&r), written, "pre-write body from L1");
    assert!(shared.is_subscribed());
    let text = metrics_text(&b).await;
    assert_eq!(metric(&text, "chatwoot_cache_bus_subscribed"), 1.0);
}

/// A replica whose Redis connections all go silent (a partition, NAT entries dropped) goes on
/// without Redis, and its probe, finding no answer, connects anew: once new connections get
/// through, Redis is used again, without waiting for TCP to give up on the dead ones.
#[tokio::test]
async fn silent_redis_connections_are_replaced() {
    let redis = RedisServer::start();
    let relay = RedisRelay::start(redis.addr()).await;
    let fake = FakeChatwoot::start().await;
    for c in 43..=80 {
        fake.add_conversation(1, c, "1765182000.1");
    }
    let t = Duration::from_millis(300);
    let b = replica_at(&fake, relay.url(), t, SECRET, |_| {}).await;
    assert_eq!(conv(&b, 1, 42, "admin-token").await.x_cache(), "MISS");
    assert!(relay.silence_all() >= 2, "the data and the bus connections");
    let shared = b.proxy.store.shared().unwrap();
    let mut c = 43;
    while shared.is_up() {
        assert!(c < 80, "Redis never skipped");
        assert_eq!(conv(&b, 1, c, "admin-token").await.status, 200);
        c += 1;
    }
    // Back through new connections (the relay passes them).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(shared.is_up() && shared.is_subscribed()) {
        assert!(Instant::now() < deadline, "Redis never used again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = conv(&b, 1, 80, "admin-token").await;
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(
        redis.keys("test:v:1:80:*").len(),
        1,
        "stored in Redis again"
    );
}

/// Purge answers with the shared entries removed and every replica drops its L1 copies.
#[tokio::test]
async fn purge_removes_shared_entries_everywhere() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_millis(500);
    let mut cfg = config(&fake.url());
    cfg.redis = Some(RedisConfig {
        url: redis.url(),
        ca_file: None,
        timeout: t,
        key_prefix: "test:".into(),
    });
    cfg.scope_secret = Some(SECRET.into());
    cfg.admin_token = Some("purge-secret-token".into());
    let a = start_proxy(cfg).await;
    wait_ready(&a).await;
    let b = replica(&fake, &redis, t).await;
    for token in ["admin-token", "agent-token"] {
        assert_eq!(conv(&a, 1, 42, token).await.x_cache(), "MISS");
        assert_eq!(conv(&b, 1, 42, token).await.x_cache(), "HIT");
    }
    let r = send(
        Method::DELETE,
        &a.admin_url("/cache/accounts/1/conversations/42"),
        &[("authorization", "Bearer purge-secret-token")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["purged"], 2);
    assert!(redis.keys("test:v:*").is_empty());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(conv(&b, 1, 42, "admin-token").await.x_cache(), "MISS");
}

/// 3 replicas x 50 concurrent cold requests for one key make one upstream request: one replica
/// takes the key's lease, the others wait for the value it stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_requests_on_three_replicas_make_one_upstream_request() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    // Generous: a loaded CI must not push Redis calls past the budget.
    let t = Duration::from_secs(2);
    let replicas = [
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
    ];
    fake.set_delay(Duration::from_millis(400));
    let mut tasks = Vec::new();
    for r in &replicas {
        for _ in 0..50 {
            let url = r.url(CONV);
            tasks.push(tokio::spawn(
                async move { get(&url, Some("admin-token")).await },
            ));
        }
    }
    let mut bodies = std::collections::HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        bodies.insert(r.body.clone());
    }
    assert_eq!(bodies.len(), 1);
    assert_eq!(
        fake.show_requests(),
        1,
        "one upstream request across replicas"
    );
}

/// A replica whose L2 read missed, and which takes the lease only after another replica's whole
/// fetch (stored, lease released) happened in between, serves that value instead of fetching
/// again: the L2 value is read again once the lease is won.
#[tokio::test]
async fn a_value_stored_between_the_read_and_the_lease_is_served() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let relay = RedisRelay::start(redis.addr()).await;
    relay.hold_leases();
    let a = replica(&fake, &redis, Duration::from_secs(2)).await;
    // B's Redis calls go through the relay; its budget outlasts A's whole request.
    let b = replica_at(&fake, relay.url(), Duration::from_secs(30), SECRET, |_| {}).await;
    let url = b.url(CONV);
    let pending = tokio::spawn(async move { get(&url, Some("admin-token")).await });
    // B read L2 (a miss) and asks for the lease; A fetches, stores and releases meanwhile.
    relay.wait_lease_held().await;
    let first = conv(&a, 1, 42, "admin-token").await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (200, "MISS"));
    assert_eq!(fake.show_requests(), 1);
    let released = poll_until(
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async { redis.keys("test:l:*").is_empty() },
    )
    .await;
    assert!(released, "A's lease was never released");
    relay.release_leases();
    let r = pending.await.unwrap();
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "HIT"));
    assert!(
        r.header("cache-status").ends_with("detail=shared"),
        "{}",
        r.header("cache-status")
    );
    assert_eq!(r.body, first.body);
    assert_eq!(fake.show_requests(), 1, "B fetched what A had stored");
}

/// A replica whose clock runs ahead stamps its values' fetch time in the future; readers count
/// the age from the value key's expiry as well, so such a value is not fresh past ttl.
#[tokio::test]
async fn a_writer_clock_ahead_does_not_extend_freshness() {
    use chatwoot_cache::cache::CacheKey;
    use chatwoot_cache::shared::codec::Codec;
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_secs(2);
    let ttl = Duration::from_secs(1);
    let tune = windows(ttl, Duration::from_secs(60));
    let a = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    let first = conv(&a, 1, 42, "admin-token").await;
    assert_eq!(first.x_cache(), "MISS");
    // The value as a writer 1 h ahead would have written it at the same moment, under the
    // same expiry: same bytes, fetch time + 1 h, signed with the shared secret.
    let scope = admin_scope();
    let value_key = admin_key("v", 1, 42);
    let key = CacheKey {
        account: 1,
        conversation: 42,
        scope,
    };
    let codec = Codec::new(SECRET.as_bytes());
    let raw = redis.get_raw(&value_key).expect("stored");
    let mut value = codec
        .decode(value_key.as_bytes(), &key, raw.into(), 1 << 22)
        .expect("a valid value");
    value.fetched_unix_ms += 3_600_000;
    let skewed = codec
        .encode(value_key.as_bytes(), &key, &value)
        .expect("encode");
    let reply = redis
        .command_bytes(&[b"SET", value_key.as_bytes(), &skewed, b"KEEPTTL"])
        .unwrap_or_default();
    assert!(reply.starts_with("+OK"), "{reply}");
    // Past ttl since the write (Redis's clock and ours agree): a new replica must not call it
    // fresh, whatever the stamp says.
    tokio::time::sleep(ttl + Duration::from_millis(500)).await;
    let b = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    let r = conv(&b, 1, 42, "admin-token").await;
    assert_eq!(
        (r.status.as_u16(), r.x_cache()),
        (200, "STALE"),
        "{}",
        r.header("cache-status")
    );
    assert!(
        r.header("age").parse::<u64>().unwrap() >= 1,
        "age {}",
        r.header("age")
    );
}

/// A lease holder whose answer cannot be stored releases at once (the others fetch
/// themselves); a lease whose holder died blocks no one longer than the lease; a waiter waits
/// at most --upstream-timeout.
#[tokio::test]
async fn leases_never_block_longer_than_needed() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_secs(1);
    let (a, b) = (
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
    );
    // Not found (a 404 is never shared): B waits for A only until A releases.
    fake.set_delay(Duration::from_millis(300));
    let (ra, rb) = tokio::join!(conv(&a, 1, 999, "admin-token"), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let start = Instant::now();
        (conv(&b, 1, 999, "admin-token").await, start.elapsed())
    });
    assert_eq!((ra.status.as_u16(), rb.0.status.as_u16()), (404, 404));
    assert!(rb.1 < Duration::from_secs(3), "B waited {:?}", rb.1);
    fake.set_delay(Duration::ZERO);

    // A holder that died: its lease (1.5 s left) is all a request waits.
    let lease = admin_key("l", 1, 42);
    redis.command(&["SET", &lease, "dead-holder", "PX", "1500"]);
    let start = Instant::now();
    let r = conv(&a, 1, 42, "admin-token").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_secs(8),
        "{waited:?}"
    );

    // A lease longer than --upstream-timeout: the waiter fetches after --upstream-timeout.
    let mut cfg = config(&fake.url());
    cfg.redis = Some(RedisConfig {
        url: redis.url(),
        ca_file: None,
        timeout: t,
        key_prefix: "test:".into(),
    });
    cfg.scope_secret = Some(SECRET.into());
    cfg.upstream_timeout = Duration::from_secs(2);
    let c = start_proxy(cfg).await;
    wait_ready(&c).await;
    fake.add_conversation(1, 43, "1765182000.1");
    let lease = admin_key("l", 1, 43);
    redis.command(&["SET", &lease, "stuck-holder", "PX", "60000"]);
    let start = Instant::now();
    let r = conv(&c, 1, 43, "admin-token").await;
    assert_eq!(r.status, 200);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1800) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
}

/// A 404 that drops a stored 200 (here from Redis) is itself negative-cached: the shared
/// invalidation it causes does not refuse it, so the next polls are HITs, not one upstream
/// request, one Redis bump and one bus message each for as long as the old value lives.
#[tokio::test]
async fn a_404_that_drops_a_shared_200_is_negative_cached() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_secs(2);
    let tune = |c: &mut chatwoot_cache::config::Config| {
        c.cache_ttl = Duration::from_millis(300);
        c.stale_while_revalidate = Duration::ZERO;
        c.negative_ttl = Duration::from_secs(30);
    };
    let a = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    let b = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    assert_eq!(conv(&a, 1, 42, "admin-token").await.status, 200);
    fake.remove_conversation(1, 42);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let gone = conv(&b, 1, 42, "admin-token").await;
    assert_eq!((gone.status.as_u16(), gone.x_cache()), (404, "MISS"));
    let before = fake.show_requests();
    for _ in 0..3 {
        let again = conv(&b, 1, 42, "admin-token").await;
        assert_eq!((again.status.as_u16(), again.x_cache()), (404, "HIT"));
    }
    assert_eq!(fake.show_requests(), before, "negative-cached");
}

/// A waiter polls the lease, not the value: waiting 1.5 s on a holder reads the value (GETRANGE)
/// a handful of times, not once per 10 ms poll (~150 reads of up to --max-object-bytes each,
/// HMAC checked, for every waiter of every hot key during a slow upstream).
#[tokio::test]
async fn a_lease_waiter_reads_the_value_once_the_lease_is_gone() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let a = replica(&fake, &redis, Duration::from_secs(2)).await;
    let getranges = || {
        let info = redis.command(&["INFO", "commandstats"]).unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_getrange:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let lease = admin_key("l", 1, 42);
    redis.command(&["SET", &lease, "slow-holder", "PX", "1500"]);
    let before = getranges();
    let start = Instant::now();
    let r = conv(&a, 1, 42, "admin-token").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    assert!(
        start.elapsed() >= Duration::from_millis(1200),
        "it waited on the lease"
    );
    let reads = getranges() - before;
    assert!(reads <= 5, "{reads} value reads while waiting");
}

/// A shared entry past its freshness follows the usual rules on a replica that never stored it
/// (SPEC 11): within stale-while-revalidate it is `STALE` at once and revalidated once in the
/// background, then a `HIT`.
#[tokio::test]
async fn a_stale_shared_entry_is_stale_while_revalidate() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    // Generous: a shared read past the budget on a loaded CI is a plain miss, not STALE.
    let t = Duration::from_secs(5);
    // A ttl well above any stall of a loaded CI: the entry the revalidation stores must still
    // be fresh when the poller below reads it, or it is revalidated again.
    let ttl = Duration::from_secs(4);
    let tune = windows(ttl, Duration::from_secs(60));
    let a = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    let b = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    let first = conv(&a, 1, 42, "admin-token").await;
    assert_eq!(first.x_cache(), "MISS");
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    let r = conv(&b, 1, 42, "admin-token").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "STALE"));
    assert!(
        r.header("cache-status")
            .contains("detail=stale-while-revalidate"),
        "{}",
        r.header("cache-status")
    );
    assert_eq!(r.body, first.body);
    // One background revalidation, conditional on the shared entry's validators.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.show_requests() < 2 {
        assert!(Instant::now() < deadline, "no background revalidation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fake.last_seen().headers.contains_key("if-none-match"),
        "revalidated with the stored validators"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = conv(&b, 1, 42, "admin-token").await;
        if r.x_cache() == "HIT" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never a HIT again: {}",
            r.x_cache()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.show_requests(), 2, "exactly one revalidation");
}

/// Past stale-while-revalidate, a shared entry on a replica that never stored it is revalidated
/// before it is served: when the upstream fails it is served `STALE` (stale-if-error), when
/// the upstream confirms it, `REVALIDATED`.
#[tokio::test]
async fn a_stale_shared_entry_is_served_if_the_upstream_fails() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    // Generous: a Redis call past the budget on a loaded CI would turn the shared read into a
    // plain miss (a 503, not STALE). Nothing here waits on Redis's budget running out.
    let t = Duration::from_secs(5);
    let ttl = Duration::from_secs(1);
    let tune = windows(ttl, Duration::ZERO);
    let a = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    let b = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    let c = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    let first = conv(&a, 1, 42, "admin-token").await;
    assert_eq!(first.x_cache(), "MISS");
    let upstream = fake.seen().len();
    // Only ever later than this: the shared entry is past its freshness from here on, however
    // slow the machine (a stall makes it staler, never fresh again), and stale-if-error
    // (10 min, the default) is far away.
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    fake.set_fault(
        Fault::Status {
            status: 503,
            body: "down".into(),
            headers: vec![],
        },
        None,
    );
    let r = conv(&b, 1, 42, "admin-token").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "STALE"));
    assert_eq!(
        r.header("cache-status"),
        "chatwoot-cache; fwd=stale; fwd-status=503; detail=stale-if-error"
    );
    assert_eq!(r.body, first.body);
    // B revalidated the shared entry (its validators), once.
    assert_eq!(fake.seen().len(), upstream + 1);
    assert!(fake.last_seen().headers.contains_key("if-none-match"));
    fake.clear_fault();
    let r = conv(&c, 1, 42, "admin-token").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "REVALIDATED"));
    assert!(
        r.header("cache-status")
            .starts_with("chatwoot-cache; fwd=stale; fwd-status=304"),
        "{}",
        r.header("cache-status")
    );
    assert_eq!(r.body, first.body);
    assert_eq!(fake.seen().len(), upstream + 2);
}

/// Replicas revalidating the same stale shared entry make one upstream request: the others
/// wait on the lease for the refreshed value, not the stale one that is already there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_shared_entry_is_revalidated_once_across_replicas() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_secs(2);
    // A ttl well above any stall of a loaded CI: the waiter must find the revalidated entry
    // still fresh, or it revalidates a second time.
    let ttl = Duration::from_secs(4);
    let tune = windows(ttl, Duration::ZERO);
    let replicas = [
        replica_tuned(&fake, &redis, t, SECRET, tune).await,
        replica_tuned(&fake, &redis, t, SECRET, tune).await,
        replica_tuned(&fake, &redis, t, SECRET, tune).await,
    ];
    assert_eq!(
        conv(&replicas[0], 1, 42, "admin-token").await.x_cache(),
        "MISS"
    );
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    fake.set_delay(Duration::from_millis(400));
    let (b, c) = tokio::join!(
        conv(&replicas[1], 1, 42, "admin-token"),
        conv(&replicas[2], 1, 42, "admin-token")
    );
    assert_eq!((b.status.as_u16(), c.status.as_u16()), (200, 200));
    let mut seen = [b.x_cache(), c.x_cache()];
    seen.sort_unstable();
    assert_eq!(
        seen,
        ["HIT", "REVALIDATED"],
        "one revalidated, the other waited for it"
    );
    assert_eq!(fake.show_requests(), 2, "one revalidation across replicas");
}

/// A reload's TTLs reach the shared tier: values stored afterwards expire in Redis after the new
/// ttl + the larger stale window.
#[tokio::test]
async fn a_reload_changes_the_shared_expiry() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_millis(500);
    let a = replica(&fake, &redis, t).await;
    let mut next = config(&fake.url());
    next.redis = Some(RedisConfig {
        url: redis.url(),
        ca_file: None,
        timeout: t,
        key_prefix: "test:".into(),
    });
    next.scope_secret = Some(SECRET.into());
    next.stale_if_error = Duration::from_secs(7200);
    a.proxy.apply_config(next).expect("reload");
    assert_eq!(conv(&a, 1, 42, "admin-token").await.x_cache(), "MISS");
    let keys = redis.keys("test:v:*");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let pttl = redis.command(&["PTTL", &keys[0]]).unwrap();
    let ms: u64 = pttl.trim().trim_start_matches(':').parse().unwrap();
    // 10 s ttl + 2 h stale-if-error (was 10 s + 10 min before the reload).
    assert!(ms > 7_000_000, "{pttl}");
}

/// `rediss://` through rustls (ring) with `--redis-ca-file`: replicas share over TLS. A
/// replica that does not trust the server's CA never uses Redis and serves as without it.
#[tokio::test]
async fn rediss_with_a_ca_file() {
    let pki = test_pki();
    let dir = temp_dir("redis-tls");
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let redis = RedisServer::start_tls(&cert, &key, &ca);
    assert!(redis.url().starts_with("rediss://"));
    let fake = FakeChatwoot::start().await;
    let cfg = |ca_file: Option<std::path::PathBuf>| {
        let mut cfg = config(&fake.url());
        cfg.redis = Some(RedisConfig {
            url: redis.url(),
            ca_file,
            timeout: Duration::from_secs(2),
            key_prefix: "test:".into(),
        });
        cfg.scope_secret = Some(SECRET.into());
        cfg
    };
    let a = start_proxy(cfg(Some(ca.clone()))).await;
    wait_ready(&a).await;
    let b = start_proxy(cfg(Some(ca.clone()))).await;
    wait_ready(&b).await;
    assert_eq!(conv(&a, 1, 42, "admin-token").await.x_cache(), "MISS");
    let r = conv(&b, 1, 42, "admin-token").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "HIT"));
    assert!(r.header("cache-status").ends_with("detail=shared"));
    assert_eq!(fake.show_requests(), 1, "shared over TLS");

    // Without the CA file the server is not trusted: Redis stays unused, requests are served.
    let c = start_proxy(cfg(None)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics_text(&c).await;
        if metric(&text, "chatwoot_cache_redis_errors_total{op=\"probe\"}") >= 1.0 {
            assert_eq!(metric(&text, "chatwoot_cache_redis_up"), 0.0);
            break;
        }
        assert!(Instant::now() < deadline, "no failed probe: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!c.proxy.store.shared().unwrap().is_up());
    let r = conv(&c, 1, 42, "admin-token").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
}

/// A 403 that supersedes a stored 200 drops the shared copy too: no replica serves the old
/// 200 afterwards, not even stale (SPEC 5), though stale-while-revalidate would allow it for
/// an entry that was merely stale.
#[tokio::test]
async fn a_superseded_entry_leaves_the_shared_tier() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_secs(2);
    let ttl = Duration::from_secs(1);
    let tune = windows(ttl, Duration::from_secs(600));
    let a = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    let b = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    assert_eq!(conv(&a, 1, 42, "admin-token").await.x_cache(), "MISS");
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    fake.set_fault(
        Fault::Status {
            status: 403,
            body: "{\"error\":\"forbidden\"}".into(),
            headers: vec![],
        },
        None,
    );
    // Stale within stale-while-revalidate: served once, revalidated in the background; the
    // 403 supersedes it. Afterwards replica a forwards the 403.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = conv(&a, 1, 42, "admin-token").await;
        if r.status.as_u16() == 403 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica a keeps serving the superseded 200: {} {}",
            r.status,
            r.x_cache()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Replica b never held it in L1: the shared copy is gone, so it asks upstream.
    let r = conv(&b, 1, 42, "admin-token").await;
    assert_eq!(
        (r.status.as_u16(), r.x_cache()),
        (403, "MISS"),
        "{}",
        r.header("cache-status")
    );
}

/// An invalidation whose bump fails while Redis stays in use (here: scripts refused by an ACL
/// for the length of the write) is retried, and until it lands the writer does not take the
/// pre-write value from Redis: it reads what it wrote.
#[tokio::test]
async fn a_lost_invalidation_does_not_serve_the_pre_write_value() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let a = replica(&fake, &redis, Duration::from_millis(500)).await;
    let first = conv(&a, 1, 42, "admin-token").await;
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(redis.keys("test:v:*").len(), 1, "stored in Redis");
    let deny = redis.command(&["ACL", "SETUSER", "default", "-eval", "-evalsha"]);
    assert_eq!(deny.as_deref(), Some("+OK\r\n"));
    let w = set_status(&a, "pending").await;
    assert_eq!(w.status, 200);
    let written = updated_at(&w);
    assert_ne!(written, updated_at(&first));
    let allow = redis.command(&["ACL", "SETUSER", "default", "+@all"]);
    assert_eq!(allow.as_deref(), Some("+OK\r\n"));
    for _ in 0..5 {
        let r = conv(&a, 1, 42, "admin-token").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            updated_at(&r),
            written,
            "pre-write body: {}",
            r.header("cache-status")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A value in Redis longer than any replica stores (here 6 MiB against 64 KiB
/// `--max-object-bytes`) is never read whole: the proxy takes at most the largest storable
/// length from Redis, the truncated value fails its check, and the request is a miss.
#[tokio::test]
async fn a_huge_shared_value_is_not_read_whole() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_secs(2);
    let tune = |c: &mut chatwoot_cache::config::Config| c.max_object_bytes = 64 * 1024;
    let a = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    let b = replica_tuned(&fake, &redis, t, SECRET, tune).await;
    assert_eq!(conv(&a, 1, 42, "admin-token").await.x_cache(), "MISS");
    let keys = redis.keys("test:v:*");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let huge = 6usize << 20;
    let mut value = b"CWC2".to_vec();
    value.resize(huge, b'x');
    let set = redis.command_bytes(&[b"SET", keys[0].as_bytes(), &value]);
    assert_eq!(set.as_deref(), Some("+OK\r\n"));
    let sent = || -> u64 {
        let info = redis.command(&["INFO", "stats"]).unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("total_net_output_bytes in INFO stats")
    };
    let before = sent();
    let r = conv(&b, 1, 42, "admin-token").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    let out = sent() - before;
    assert!(
        out < (huge as u64) / 2,
        "Redis sent {out} bytes for one request"
    );
}

/// The writer itself does not keep its pre-write body: a read on the writing replica that
/// reaches Redis after the write's local invalidation but before its Redis bump lands (here: the
/// bump's first call answered `NOSCRIPT` after `SCRIPT FLUSH`, so it loads the script and calls
/// again a round trip later) finds the old value under still-valid counters and puts it in L1;
/// once the bump lands the writer invalidates locally again, so the next read is the new body.
#[tokio::test]
async fn a_read_racing_the_writers_redis_bump_is_not_kept() {
    let redis = RedisServer::start();
    let relay = RedisRelay::start(redis.addr()).await;
    let fake = FakeChatwoot::start().await;
    let a = replica_at(&fake, relay.url(), Duration::from_secs(5), SECRET, |_| {}).await;
    let first = conv(&a, 1, 42, "admin-token").await;
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(redis.keys("test:v:*").len(), 1, "stored in Redis");
    // The fetch's lease is released after its response: the bump is the next script call.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !redis.keys("test:l:*").is_empty() {
        assert!(Instant::now() < deadline, "the lease was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        redis.command(&["SCRIPT", "FLUSH"]).as_deref(),
        Some("+OK\r\n")
    );
    relay.hold_noscript();
    let url = a.url(CONV);
    let write = tokio::spawn(async move {
        send(
            Method::PATCH,
            &url,
            &[
                ("api_access_token", "admin-token"),
                ("content-type", "application/json"),
            ],
            br#"{"status":"snoozed"}"#,
        )
        .await
    });
    // The write's local invalidation is made and its bump refused: a read now misses L1 and
    // reads Redis before the bump is retried.
    relay.wait_noscript_held().await;
    let url = a.url(CONV);
    let racing = tokio::spawn(async move { get(&url, Some("admin-token")).await });
    relay.wait_read_while_noscript_held().await;
    relay.release_noscript();
    let w = write.await.unwrap();
    assert_eq!(w.status, 200);
    let written = updated_at(&w);
    assert_ne!(written, updated_at(&first));
    // Concurrent with the write: either body is right for it.
    assert_eq!(racing.await.unwrap().status, 200);
    let r = conv(&a, 1, 42, "admin-token").await;
    assert_eq!(
        updated_at(&r),
        written,
        "the writer kept its pre-write body: {}",
        r.header("cache-status")
    );
}

/// A generation counter's key holding something else (another type, a string that is not an
/// integer, or a negative one: written into the cache's Redis by anyone who can reach it) is
/// not an outage:
/// fills under it are not written (no failure counted), and the next invalidation replaces it
/// and is heard by every replica.
#[tokio::test]
async fn a_counter_that_is_not_one_neither_fails_redis_nor_loses_invalidations() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let t = Duration::from_millis(500);
    let (a, b) = (
        replica(&fake, &redis, t).await,
        replica(&fake, &redis, t).await,
    );
    let counter = "test:g:c:1:42";
    // Another type: every fill's conditional write meets it.
    assert!(redis.command(&["RPUSH", counter, "x"]).is_some());
    for i in 0..(FAILURES_TO_SKIP + 2) {
        let token = format!("listed-{i}");
        fake.add_user(&token, &format!("listed{i}"), None);
        let r = conv(&b, 1, 42, &token).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    }
    let text = metrics_text(&b).await;
    let errors = metric(&text, r#"chatwoot_cache_redis_errors_total{op="write"}"#);
    assert_eq!(errors, 0.0, "a WRONGTYPE is no Redis error");
    assert!(b.proxy.store.shared().unwrap().is_up());
    // A string that is not a number, another type, then a negative number (INCR takes it,
    // but readers see no counter): each time a write through A is heard by B, which held the
    // pre-write body, and the bump leaves a counter.
    for (poison, status) in [
        (&["SET", counter, "x"][..], "pending"),
        (&["RPUSH", counter, "x"][..], "open"),
        (&["SET", counter, "-1000"][..], "resolved"),
    ] {
        let before = conv(&b, 1, 42, "admin-token").await;
        assert_eq!(before.status, 200);
        assert_eq!(conv(&b, 1, 42, "admin-token").await.x_cache(), "HIT");
        redis.command(&["DEL", counter]);
        assert!(redis.command(poison).is_some());
        let w = set_status(&a, status).await;
        assert_eq!(w.status, 200);
        let written = updated_at(&w);
        assert_ne!(written, updated_at(&before));
        // The bus takes milliseconds; B's ttl (before the fix: the pre-write body until then)
        // is far longer than this wait.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = conv(&b, 1, 42, "admin-token").await;
            if updated_at(&r) == written {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "B serves the pre-write body: {}",
                r.x_cache()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let now = redis.command(&["GET", counter]).unwrap_or_default();
        let value = now.split("\r\n").nth(1).unwrap_or_default();
        assert!(
            value.parse::<u64>().is_ok(),
            "the bump made it a counter again: {now:?}"
        );
    }
    for p in [&a, &b] {
        assert!(p.proxy.store.shared().unwrap().is_up());
    }
    let text = metrics_text(&a).await;
    let errors = metric(
        &text,
        r#"chatwoot_cache_redis_errors_total{op="invalidate"}"#,
    );
    assert_eq!(errors, 0.0, "every bump landed the first time");
}

/// A Redis that answers but refuses writes (here: made a replica of an unreachable primary, as
/// after a failover, so every write answers `READONLY`) stays skipped: the probe writes, so it
/// is not taken back at each PING only to fail the next invalidations (`chatwoot_cache_redis_up`
/// would flap instead of staying 0). Writable again, it is used again.
#[tokio::test]
async fn a_redis_that_refuses_writes_stays_skipped() {
    let redis = RedisServer::start();
    let fake = FakeChatwoot::start().await;
    let a = replica(&fake, &redis, Duration::from_millis(500)).await;
    let shared = a.proxy.store.shared().unwrap().clone();
    assert_eq!(conv(&a, 1, 42, "admin-token").await.x_cache(), "MISS");
    let demoted = redis.command(&["REPLICAOF", "127.0.0.1", "1"]);
    assert_eq!(demoted.as_deref(), Some("+OK\r\n"));
    // A write: its invalidation fails, and so do its background retries, until skipped.
    let w = set_status(&a, "open").await;
    assert_eq!(w.status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while shared.is_up() {
        assert!(
            Instant::now() < deadline,
            "a read-only Redis was never skipped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Several probe intervals (500 ms each): never taken back while it refuses writes.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        assert!(!shared.is_up(), "a read-only Redis was taken back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = metrics_text(&a).await;
    assert_eq!(metric(&text, "chatwoot_cache_redis_up"), 0.0);
    let promoted = redis.command(&["REPLICAOF", "NO", "ONE"]);
    assert_eq!(promoted.as_deref(), Some("+OK\r\n"));
    wait_ready(&a).await;
    let r = conv(&a, 1, 42, "admin-token").await;
    assert_eq!(updated_at(&r), updated_at(&w), "pre-write body");
}
