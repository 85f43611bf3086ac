//! End-to-end: secrets per account and from files (SPEC §13). Each account's webhooks verify
//! with that account's own secrets (two of them during a rotation), unlisted accounts with the
//! fallback `--webhook-secret`, and a signature made with one account's secret never acts on
//! another account.

mod support;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use chatwoot_cache::invalidation::WebhookSecrets;
use http::Method;
use support::*;

const ADMIN: &str = "admin-token";
const ONE_NEW: &str = "account-one-new-secret";
const ONE_OLD: &str = "account-one-old-secret";
const TWO: &str = "account-two-secret";
const FALLBACK: &str = "fallback-webhook-secret";

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

/// Delivers `conversation_updated` for (a, c), signed with `secret`.
pub async fn deliver_signed(proxy: &ProxyHandle, a: u64, c: u64, secret: &str) -> Resp {
    let body = serde_json::json!({"event": "conversation_updated", "id": c}).to_string();
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let sig = signature(secret, &ts, body.as_bytes());
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

fn per_account() -> WebhookSecrets {
    WebhookSecrets::per_account(BTreeMap::from([
        (1, vec![ONE_NEW.to_string(), ONE_OLD.to_string()]),
        (2, vec![TWO.to_string()]),
    ]))
}

/// Two accounts with their own secrets, one of them in a rotation, and an unlisted account on
/// the fallback: each verifies only with its own; a wrong one is 401 and invalidates nothing.
#[tokio::test]
async fn each_account_verifies_with_its_own_secrets() {
    let fake = FakeChatwoot::start().await;
    fake.add_conversation(2, 42, "1765182000.000002");
    fake.add_conversation(3, 42, "1765182000.000003");
    let mut cfg = config(&fake.url());
    cfg.webhook_secrets = per_account();
    cfg.webhook_secret = Some(FALLBACK.into());
    let proxy = start_proxy(cfg).await;
    for a in [1, 2, 3] {
        assert_eq!(conv(&proxy, a, 42, ADMIN).await.x_cache(), "MISS");
        assert_eq!(conv(&proxy, a, 42, ADMIN).await.x_cache(), "HIT");
    }

    // Refused: another account's secret, the fallback for a listed account, a listed
    // account's secret for an unlisted one. Nothing is invalidated by any of them.
    for (a, secret) in [
        (2, ONE_NEW),
        (2, ONE_OLD),
        (1, TWO),
        (1, FALLBACK),
        (2, FALLBACK),
        (3, ONE_NEW),
        (3, TWO),
    ] {
        let r = deliver_signed(&proxy, a, 42, secret).await;
        assert_eq!(r.status, 401, "account {a} signed with another's secret");
    }
    for a in [1, 2, 3] {
        assert_eq!(
            conv(&proxy, a, 42, ADMIN).await.x_cache(),
            "HIT",
            "account {a}"
        );
    }

    // Accepted: each account with its own; both secrets of the account in rotation.
    for (a, secret) in [(1, ONE_NEW), (1, ONE_OLD), (2, TWO), (3, FALLBACK)] {
        assert_eq!(conv(&proxy, a, 42, ADMIN).await.x_cache(), "HIT");
        let r = deliver_signed(&proxy, a, 42, secret).await;
        assert_eq!(r.status, 200, "account {a}: {}", r.text());
        assert_eq!(r.json()["invalidated"], "conversation");
        assert_eq!(
            conv(&proxy, a, 42, ADMIN).await.x_cache(),
            "MISS",
            "account {a}"
        );
    }
}

/// Without `--webhook-secret`, an account missing from the secrets file has no secret at all:
/// its webhooks are refused, while listed accounts keep working.
#[tokio::test]
async fn an_unlisted_account_without_fallback_is_refused() {
    let fake = FakeChatwoot::start().await;
    let mut cfg = config(&fake.url());
    cfg.webhook_secrets = per_account();
    let proxy = start_proxy(cfg).await;
    assert_eq!(deliver_signed(&proxy, 5, 42, ONE_NEW).await.status, 401);
    assert_eq!(deliver_signed(&proxy, 5, 42, TWO).await.status, 401);
    assert_eq!(deliver_signed(&proxy, 1, 42, ONE_OLD).await.status, 200);
}

/// `--admin-token-file` and `--webhook-secret-file` set the same secrets as the inline forms.
#[tokio::test]
async fn secrets_read_from_files_protect_purge_and_webhook() {
    let fake = FakeChatwoot::start().await;
    let dir = temp_dir("secrets");
    let token = dir.join("admin-token");
    let secret = dir.join("webhook-secret");
    std::fs::write(&token, "purge-token-from-file\n").unwrap();
    std::fs::write(&secret, FALLBACK).unwrap();
    let mut cfg = chatwoot_cache::Config::try_from_args([
        "chatwoot-cache",
        "--upstream",
        &fake.url(),
        "--admin-token-file",
        token.to_str().unwrap(),
        "--webhook-secret-file",
        secret.to_str().unwrap(),
    ])
    .expect("config");
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin_listen = "127.0.0.1:0".parse().unwrap();
    let proxy = start_proxy(cfg).await;
    let purge = |auth: &'static str| {
        let url = proxy.admin_url("/cache");
        async move { send(Method::DELETE, &url, &[("authorization", auth)], b"").await }
    };
    assert_eq!(purge("Bearer purge-token-from-file").await.status, 200);
    assert_eq!(purge("Bearer wrong-token-value").await.status, 401);
    assert_eq!(deliver_signed(&proxy, 1, 42, FALLBACK).await.status, 200);
    assert_eq!(deliver_signed(&proxy, 1, 42, TWO).await.status, 401);
}
