//! End-to-end: the Chatwoot webhook on the admin listener (SPEC §7.3). One test per event of
//! Chatwoot's `Webhook::ALLOWED_WEBHOOK_EVENTS`, each with the payload shape Chatwoot 4.9 sends
//! (`app/listeners/webhook_listener.rb`, the presenters' `push_data` / `webhook_data`): every
//! event is acknowledged `200`, and only the events SPEC names invalidate.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::Method;
use serde_json::{Value, json};
use support::*;

const SECRET: &str = "webhook-secret-0123456";
const ADMIN: &str = "admin-token";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut msg = format!("{timestamp}.").into_bytes();
    msg.extend_from_slice(body);
    let hex: String = ring::hmac::sign(&key, &msg)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// Posts `body` to account `a`'s webhook, signed now, with Chatwoot's headers.
async fn deliver(proxy: &ProxyHandle, a: u64, body: &str) -> Resp {
    let ts = unix_now().to_string();
    let sig = signature(SECRET, &ts, body.as_bytes());
    send(
        Method::POST,
        &proxy.admin_url(&format!("/webhooks/chatwoot/accounts/{a}")),
        &[
            ("content-type", "application/json"),
            ("accept", "application/json"),
            ("x-chatwoot-timestamp", &ts),
            ("x-chatwoot-signature", &sig),
        ],
        body.as_bytes(),
    )
    .await
}

// === Chatwoot's payload shapes ===

fn account() -> Value {
    json!({"id": 1, "name": "Acme"})
}

fn inbox() -> Value {
    json!({"id": 3, "name": "Support API"})
}

fn contact() -> Value {
    json!({
        "account": account(),
        "additional_attributes": {"city": "Berlin"},
        "avatar": "",
        "custom_attributes": {},
        "email": "jane@example.com",
        "id": 17,
        "identifier": null,
        "name": "Jane",
        "phone_number": "+4915112345678",
        "thumbnail": "",
        "blocked": false
    })
}

fn agent() -> Value {
    json!({
        "id": 5, "name": "Agent Smith", "available_name": "Agent Smith", "avatar_url": "",
        "type": "user", "availability_status": "online", "thumbnail": "",
        "email": "smith@example.com"
    })
}

/// `Conversations::EventDataPresenter#push_data`: top-level `id` is the display id, no
/// top-level `account_id`.
fn conversation_push_data(display_id: u64) -> Value {
    json!({
        "additional_attributes": {},
        "can_reply": true,
        "channel": "Channel::Api",
        "contact_inbox": {
            "id": 12, "contact_id": 17, "inbox_id": 3, "source_id": "c0ffee",
            "created_at": "2025-12-08T08:00:00.000Z", "updated_at": "2025-12-08T08:00:00.000Z",
            "hmac_verified": false, "pubsub_token": "pubsub-abc"
        },
        "id": display_id,
        "inbox_id": 3,
        "messages": [{
            "id": 900, "content": "hello", "account_id": 1, "inbox_id": 3,
            "conversation_id": display_id, "message_type": 0, "created_at": 1765181999,
            "updated_at": "2025-12-08T08:19:59.412Z", "private": false, "status": "sent",
            "source_id": null, "content_type": "text", "content_attributes": {},
            "sender_type": "Contact", "sender_id": 17, "external_source_ids": {},
            "additional_attributes": {}, "processed_message_content": "hello",
            "sentiment": {}, "conversation": {"assignee_id": 5, "unread_count": 1,
            "last_activity_at": 1765181999, "contact_inbox": {"source_id": "c0ffee"}},
            "sender": {"id": 17, "name": "Jane", "type": "contact"}
        }],
        "labels": [],
        "meta": {
            "sender": {"id": 17, "name": "Jane", "type": "contact"},
            "assignee": agent(),
            "team": null,
            "hmac_verified": false
        },
        "status": "open",
        "custom_attributes": {},
        "snoozed_until": null,
        "unread_count": 1,
        "first_reply_created_at": null,
        "priority": null,
        "waiting_since": 1765181999,
        "agent_last_seen_at": 0,
        "contact_last_seen_at": 0,
        "last_activity_at": 1765181999,
        "timestamp": 1765181999,
        "created_at": 1765180000,
        "updated_at": 1765182000.482917
    })
}

fn with_event(mut v: Value, event: &str) -> String {
    v["event"] = event.into();
    v.to_string()
}

fn conversation_event(event: &str, display_id: u64) -> String {
    let mut v = conversation_push_data(display_id);
    if event != "conversation_created" {
        v["changed_attributes"] = json!([
            {"status": {"previous_value": "pending", "current_value": "open"}}
        ]);
    }
    with_event(v, event)
}

/// `Message#webhook_data`: `id` is the message id, the conversation sits under `conversation`.
fn message_event(event: &str, display_id: u64) -> String {
    let v = json!({
        "account": account(),
        "additional_attributes": {},
        "content_attributes": {},
        "content_type": "text",
        "content": "Where is my order?",
        "conversation": conversation_push_data(display_id),
        "created_at": "2025-12-08T08:20:00.412Z",
        "id": 9001,
        "inbox": inbox(),
        "message_type": "incoming",
        "private": false,
        "sender": {"id": 17, "name": "Jane", "email": "jane@example.com", "type": "contact",
                   "account": account()},
        "source_id": null
    });
    with_event(v, event)
}

/// `WebhookListener#handle_typing_status`: `conversation` (webhook_data) and `user`, no
/// top-level `id`.
fn typing_event(event: &str, display_id: u64) -> String {
    let v = json!({
        "user": agent(),
        "conversation": conversation_push_data(display_id),
        "is_private": false
    });
    with_event(v, event)
}

// === the check ===

/// What an event must invalidate on account 1.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Conversation42,
    Account,
    Nothing,
}

/// Stores (1, 42), (1, 7) and (2, 42), delivers `body` to account 1's webhook and checks that
/// it is acknowledged `200` and invalidated exactly `expect`.
async fn check(body: String, expect: Expect) {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(1, 7, "1765182000.000001");
    fake.add_conversation(2, 42, "1765182000.000002");
    let mut cfg = config(&fake.url());
    cfg.webhook_secret = Some(SECRET.into());
    let proxy = start_proxy(cfg).await;
    let keys = [(1, 42), (1, 7), (2, 42)];
    for (a, c) in keys {
        assert_eq!(conv(&proxy, a, c, ADMIN).await.x_cache(), "MISS");
        assert_eq!(conv(&proxy, a, c, ADMIN).await.x_cache(), "HIT");
    }
    let r = deliver(&proxy, 1, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let invalidated = match expect {
        Expect::Conversation42 => "conversation",
        Expect::Account => "account",
        Expect::Nothing => "nothing",
    };
    assert_eq!(r.json()["invalidated"], invalidated);
    let want = |a: u64, c: u64| match (expect, a, c) {
        (Expect::Conversation42, 1, 42) | (Expect::Account, 1, _) => "MISS",
        _ => "HIT",
    };
    for (a, c) in keys {
        assert_eq!(
            conv(&proxy, a, c, ADMIN).await.x_cache(),
            want(a, c),
            "({a}, {c}) after {expect:?}"
        );
    }
    let series = r#"chatwoot_cache_invalidations_total{source="webhook"}"#;
    let want = if expect == Expect::Nothing { 0.0 } else { 1.0 };
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&metrics_text(&proxy).await, series) != want {
        assert!(Instant::now() < deadline, "{series} never reached {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// === one test per event of Webhook::ALLOWED_WEBHOOK_EVENTS ===

#[tokio::test]
async fn conversation_status_changed_invalidates_its_conversation() {
    check(
        conversation_event("conversation_status_changed", 42),
        Expect::Conversation42,
    )
    .await;
}

#[tokio::test]
async fn conversation_updated_invalidates_its_conversation() {
    check(
        conversation_event("conversation_updated", 42),
        Expect::Conversation42,
    )
    .await;
}

#[tokio::test]
async fn conversation_created_invalidates_its_conversation() {
    check(
        conversation_event("conversation_created", 42),
        Expect::Conversation42,
    )
    .await;
}

#[tokio::test]
async fn contact_created_is_acknowledged_without_invalidating() {
    check(with_event(contact(), "contact_created"), Expect::Nothing).await;
}

#[tokio::test]
async fn contact_updated_invalidates_the_account() {
    let mut v = contact();
    v["changed_attributes"] = json!([{"name": {"previous_value": "J.", "current_value": "Jane"}}]);
    check(with_event(v, "contact_updated"), Expect::Account).await;
}

#[tokio::test]
async fn message_created_invalidates_its_conversation() {
    check(message_event("message_created", 42), Expect::Conversation42).await;
}

#[tokio::test]
async fn message_updated_invalidates_its_conversation() {
    check(message_event("message_updated", 42), Expect::Conversation42).await;
}

#[tokio::test]
async fn webwidget_triggered_is_acknowledged_without_invalidating() {
    // `ContactInbox#webhook_data` plus `event_info`.
    let v = json!({
        "id": 12,
        "contact": contact(),
        "inbox": inbox(),
        "account": account(),
        "current_conversation": null,
        "source_id": "c0ffee",
        "event_info": {"initiated_at": {"timestamp": "Mon Dec 08 2025"},
                       "referer": "https://example.com/", "widget_language": "en",
                       "browser_language": "en", "browser": {"browser_name": "Firefox"}}
    });
    check(with_event(v, "webwidget_triggered"), Expect::Nothing).await;
}

#[tokio::test]
async fn inbox_created_is_acknowledged_without_invalidating() {
    check(with_event(inbox(), "inbox_created"), Expect::Nothing).await;
}

#[tokio::test]
async fn inbox_updated_is_acknowledged_without_invalidating() {
    let mut v = inbox();
    v["changed_attributes"] =
        json!([{"name": {"previous_value": "Support", "current_value": "Support API"}}]);
    check(with_event(v, "inbox_updated"), Expect::Nothing).await;
}

#[tokio::test]
async fn conversation_typing_on_is_acknowledged_without_invalidating() {
    check(typing_event("conversation_typing_on", 42), Expect::Nothing).await;
}

#[tokio::test]
async fn conversation_typing_off_is_acknowledged_without_invalidating() {
    check(typing_event("conversation_typing_off", 42), Expect::Nothing).await;
}

/// An event a newer Chatwoot adds is acknowledged too; a named event without a usable
/// conversation id falls back to the account.
#[tokio::test]
async fn unknown_events_are_acknowledged_and_unmappable_ones_invalidate_the_account() {
    check(
        with_event(json!({"id": 42}), "conversation_some_future_event"),
        Expect::Nothing,
    )
    .await;
    let mut v: Value = serde_json::from_str(&message_event("message_created", 42)).unwrap();
    v["conversation"].as_object_mut().unwrap().remove("id");
    check(v.to_string(), Expect::Account).await;
}

// === hostile deliveries (SPEC 7.3, issue 16) ===

/// A proxy with the webhook on and a long body deadline, so that only the checks made before
/// the body can answer the requests below in time.
async fn hostile_setup() -> (FakeChatwoot, ProxyHandle) {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.webhook_secret = Some(SECRET.into());
    cfg.client_header_timeout = Duration::from_secs(60);
    let proxy = start_proxy(cfg).await;
    (fake, proxy)
}

/// A raw admin connection that sends `head` and then nothing.
async fn send_head(proxy: &ProxyHandle, head: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// The status line of the answer on `s`, which must come within 10 s.
async fn status_line(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no answer within 10 s (the body is being waited for)"),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    text.lines().next().unwrap_or("").to_string()
}

/// A head with a fresh timestamp and a well-formed (not necessarily right) signature.
fn signed_looking_head(extra: &str) -> String {
    format!(
        "POST /webhooks/chatwoot/accounts/1 HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/json\r\nX-Chatwoot-Timestamp: {}\r\n\
         X-Chatwoot-Signature: sha256={}\r\n{extra}\r\n",
        unix_now(),
        "ab".repeat(32)
    )
}

/// Unsigned, stale or malformed heads are refused at once, while their declared body has not
/// been sent: the body is never waited for.
#[tokio::test]
async fn the_head_is_checked_before_the_body_is_read() {
    let (_fake, proxy) = hostile_setup().await;
    let path = "POST /webhooks/chatwoot/accounts/1 HTTP/1.1\r\nHost: x\r\n";
    for head in [
        format!("{path}Content-Length: 1000\r\n\r\n"),
        format!(
            "{path}X-Chatwoot-Timestamp: {}\r\nX-Chatwoot-Signature: sha256={}\r\n\
             Content-Length: 1000\r\n\r\n",
            unix_now() - 600,
            "ab".repeat(32)
        ),
        format!(
            "{path}X-Chatwoot-Timestamp: {}\r\nX-Chatwoot-Signature: md5=abc\r\n\
             Content-Length: 1000\r\n\r\n",
            unix_now()
        ),
    ] {
        let mut s = send_head(&proxy, &head).await;
        assert_eq!(
            status_line(&mut s).await,
            "HTTP/1.1 401 Unauthorized",
            "{head}"
        );
    }
}

/// A body declared over 256 KiB is refused unread; a chunked one is cut off at the cap without
/// waiting for its end; a signed body just under the cap is accepted.
#[tokio::test]
async fn bodies_over_256_kib_are_refused_without_reading_them_whole() {
    use tokio::io::AsyncWriteExt;
    let (_fake, proxy) = hostile_setup().await;
    let mut s = send_head(&proxy, &signed_looking_head("Content-Length: 10485760\r\n")).await;
    assert_eq!(status_line(&mut s).await, "HTTP/1.1 413 Payload Too Large");

    let mut s = send_head(
        &proxy,
        &signed_looking_head("Transfer-Encoding: chunked\r\n"),
    )
    .await;
    // 4 KiB past the cap: little enough that the proxy reads all of it before answering (unread
    // bytes at close would make the kernel reset the connection instead of a clean close).
    let chunk = |n: usize| format!("{n:x}\r\n{}\r\n", "x".repeat(n));
    for n in [64 * 1024, 64 * 1024, 64 * 1024, 64 * 1024, 4 * 1024] {
        if s.write_all(chunk(n).as_bytes()).await.is_err() {
            break;
        }
    }
    // No terminating chunk: the connection stays open, the answer must not wait for it.
    assert_eq!(status_line(&mut s).await, "HTTP/1.1 413 Payload Too Large");

    let mut v: Value = serde_json::from_str(&message_event("message_created", 42)).unwrap();
    v["content"] = "y".repeat(250 * 1024).into();
    let r = deliver(&proxy, 1, &v.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["invalidated"], "conversation");
}

/// A raw admin connection from `from` (any 127.0.0.0/8 address: Linux routes all of it to lo)
/// that sends `head` and then nothing.
async fn send_head_from(
    proxy: &ProxyHandle,
    from: std::net::Ipv4Addr,
    head: &str,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let mut s = socket.connect(proxy.admin).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Sends `head` from `from` on each of `n` connections; each connection's task answers
/// whether the proxy answered it (before its body, which never comes) within 10 s. The
/// connections stay open until the returned tasks are aborted.
async fn hold_from(
    proxy: &ProxyHandle,
    from: std::net::Ipv4Addr,
    n: usize,
    answered: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut s =
            send_head_from(proxy, from, &signed_looking_head("Content-Length: 100\r\n")).await;
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            let line = status_line(&mut s).await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Keep the connection open, as an attacker would.
            let _line = line;
            std::future::pending::<()>().await;
        }));
    }
    tasks
}

/// At most 32 deliveries are handled at once: with every slot held by heads whose bodies never
/// come (8 per peer address, from 4 addresses), a genuine delivery is answered 503 with
/// Retry-After (quickly, not after the body deadline); once they are gone, deliveries are
/// handled again.
#[tokio::test]
async fn webhook_handling_is_capped() {
    use chatwoot_cache::webhook::{MAX_CONCURRENT, MAX_PER_PEER};
    let (_fake, proxy) = hostile_setup().await;
    let gate = &proxy.proxy.webhooks;
    let peers = MAX_CONCURRENT / MAX_PER_PEER;
    // The holders lose their slots after the body deadline (5 s): if that happened before the
    // genuine delivery was decided, fill the slots again and retry.
    let mut refused = false;
    for _attempt in 0..5 {
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut held = Vec::new();
        for p in 0..peers {
            let from = std::net::Ipv4Addr::new(127, 0, 0, 2 + p as u8);
            held.extend(hold_from(&proxy, from, MAX_PER_PEER, &answered).await);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.slots_in_use() < MAX_CONCURRENT {
            assert!(
                Instant::now() < deadline,
                "{} slots held",
                gate.slots_in_use()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = deliver(&proxy, 1, &conversation_event("conversation_updated", 42)).await;
        let holders_answered = answered.load(std::sync::atomic::Ordering::SeqCst);
        for t in &held {
            t.abort();
        }
        if r.status == 503 {
            assert_eq!(r.header("retry-after"), "1");
            refused = true;
            break;
        }
        assert!(
            holders_answered > 0,
            "a delivery was handled while every slot was held: {} {}",
            r.status,
            r.text()
        );
    }
    assert!(refused, "never answered 503 with every slot held");

    let deadline = Instant::now() + Duration::from_secs(10);
    while gate.slots_in_use() > 0 {
        assert!(Instant::now() < deadline, "slots not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = deliver(&proxy, 1, &conversation_event("conversation_updated", 42)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// One peer address cannot stop webhook invalidation for everyone: 32 heads whose bodies never
/// come, from one address, hold at most a quarter of the slots, and a signed delivery from
/// another address is acted on while they are held.
#[tokio::test]
async fn one_peer_cannot_take_every_slot() {
    use chatwoot_cache::webhook::{MAX_CONCURRENT, MAX_PER_PEER};
    let (_fake, proxy) = hostile_setup().await;
    let gate = &proxy.proxy.webhooks;
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.x_cache(), "MISS");
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.x_cache(), "HIT");
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hostile = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let held = hold_from(&proxy, hostile, MAX_CONCURRENT, &answered).await;
    // Every hostile head has either a slot or its answer (503 once it waited its turn).
    let deadline = Instant::now() + Duration::from_secs(10);
    while gate.slots_in_use() + answered.load(std::sync::atomic::Ordering::SeqCst) < MAX_CONCURRENT
    {
        assert!(
            Instant::now() < deadline,
            "{} slots held, {} answered",
            gate.slots_in_use(),
            answered.load(std::sync::atomic::Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        gate.slots_in_use() <= MAX_PER_PEER,
        "{}",
        gate.slots_in_use()
    );
    let r = deliver(&proxy, 1, &conversation_event("conversation_updated", 42)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["invalidated"], "conversation");
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.x_cache(), "MISS");
    for t in held {
        t.abort();
    }
}

/// A head whose body never comes holds its slot for a few seconds at most, not for the whole
/// `--client-header-timeout` (60 s here): Chatwoot sends the body right after the head.
#[tokio::test]
async fn a_body_that_never_comes_is_given_up_quickly() {
    let (_fake, proxy) = hostile_setup().await;
    let mut s = send_head(&proxy, &signed_looking_head("Content-Length: 100\r\n")).await;
    assert_eq!(status_line(&mut s).await, "HTTP/1.1 408 Request Timeout");
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.proxy.webhooks.slots_in_use() > 0 {
        assert!(Instant::now() < deadline, "slot not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With per-account secrets and no fallback, a delivery for an account that has no secret is
/// refused from its head: its body is never waited for.
#[tokio::test]
async fn an_account_without_a_secret_is_refused_before_its_body() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.webhook_secrets = chatwoot_cache::invalidation::WebhookSecrets::per_account(
        std::collections::BTreeMap::from([(1, vec![SECRET.to_string()])]),
    );
    cfg.client_header_timeout = Duration::from_secs(60);
    let proxy = start_proxy(cfg).await;
    let head =
        signed_looking_head("Content-Length: 100\r\n").replace("/accounts/1 ", "/accounts/9 ");
    let mut s = send_head(&proxy, &head).await;
    assert_eq!(status_line(&mut s).await, "HTTP/1.1 401 Unauthorized");
    assert_eq!(proxy.proxy.webhooks.slots_in_use(), 0);
    // Account 1 has its secret: still served.
    let r = deliver(&proxy, 1, &conversation_event("conversation_updated", 42)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A delivery seen within the window (same `X-Chatwoot-Delivery`, or the same signed body
/// under a new id or none, its signature spelt in either case) is acknowledged 200 and not acted on again; a new delivery still is.
#[tokio::test]
async fn replayed_deliveries_are_acknowledged_without_acting() {
    let (_fake, proxy) = hostile_setup().await;
    let post_as = |body: String, ts: String, delivery: Option<&'static str>, upper: bool| {
        let sig = signature(SECRET, &ts, body.as_bytes());
        // The same MAC in upper-case hex (which verifies just as well).
        let sig = if upper {
            format!("sha256={}", sig["sha256=".len()..].to_ascii_uppercase())
        } else {
            sig
        };
        let url = proxy.admin_url("/webhooks/chatwoot/accounts/1");
        async move {
            let mut headers = vec![
                ("content-type", "application/json"),
                ("x-chatwoot-timestamp", ts.as_str()),
                ("x-chatwoot-signature", sig.as_str()),
            ];
            if let Some(d) = delivery {
                headers.push(("x-chatwoot-delivery", d));
            }
            send(Method::POST, &url, &headers, body.as_bytes()).await
        }
    };
    let post =
        |body: String, ts: String, delivery: &'static str| post_as(body, ts, Some(delivery), false);
    let cached = async || conv(&proxy, 1, 42, ADMIN).await.x_cache().to_string();
    assert_eq!(cached().await, "MISS");
    let ts = unix_now().to_string();
    let event = conversation_event("conversation_updated", 42);
    let d1 = "4f1b7c3e-0000-4000-8000-000000000001";
    let r = post(event.clone(), ts.clone(), d1).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["invalidated"].clone()),
        (200, json!("conversation"))
    );
    assert_eq!(cached().await, "MISS");
    assert_eq!(cached().await, "HIT");

    // The same delivery again; the same signed body under a new id; a retry of d1 (Chatwoot
    // keeps the id across retries) signed at a later second.
    let later = (unix_now() + 1).to_string();
    for (body, ts, delivery) in [
        (event.clone(), ts.clone(), d1),
        (
            event.clone(),
            ts.clone(),
            "4f1b7c3e-0000-4000-8000-000000000002",
        ),
        (event.clone(), later, d1),
    ] {
        let r = post(body, ts, delivery).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["duplicate"], true);
        assert_eq!(cached().await, "HIT", "a replay invalidated again");
    }
    // The same signature spelt in upper case, without a delivery id and under a new one.
    for delivery in [None, Some("4f1b7c3e-0000-4000-8000-000000000004")] {
        let r = post_as(event.clone(), ts.clone(), delivery, true).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["duplicate"], true, "{delivery:?}: {}", r.text());
        assert_eq!(
            cached().await,
            "HIT",
            "an upper-case replay invalidated again"
        );
    }

    let r = post(
        message_event("message_created", 42),
        unix_now().to_string(),
        "4f1b7c3e-0000-4000-8000-000000000003",
    )
    .await;
    assert_eq!(r.json()["invalidated"], "conversation");
    assert_eq!(cached().await, "MISS");
    let text = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &text,
            r#"chatwoot_cache_invalidations_total{source="webhook"}"#
        ),
        2.0
    );
}

/// The legacy `?secret=` mode is off unless `--webhook-allow-query-secret`: the right secret
/// in the URL alone is refused, and invalidates nothing.
#[tokio::test]
async fn the_query_secret_is_off_by_default() {
    let (_fake, proxy) = hostile_setup().await;
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.x_cache(), "MISS");
    let r = send(
        Method::POST,
        &proxy.admin_url(&format!("/webhooks/chatwoot/accounts/1?secret={SECRET}")),
        &[("content-type", "application/json")],
        conversation_event("conversation_updated", 42).as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("--webhook-allow-query-secret"),
        "{}",
        r.text()
    );
    assert!(!r.text().contains(SECRET));
    assert_eq!(conv(&proxy, 1, 42, ADMIN).await.x_cache(), "HIT");
}
