//! The admin listener (SPEC §7.2, §7.3, §8): health, readiness, metrics, purge API, webhook.
//!
//! Kept off the public listener so that a Service exposing the proxy never exposes purges,
//! and so probes and scrapes keep working while the public side drains.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::ResponseBody;
use crate::invalidation::{self, Source, Target, WebhookTarget};
use crate::proxy::Proxy;
use crate::routing::canonical_id;
use crate::webhook;

/// Handles one admin request from `peer` (the connection's address: webhook slots are capped
/// per peer).
pub async fn handle(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Response<ResponseBody> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if proxy.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            }
        }
        (&Method::GET, "/metrics") => metrics(&proxy).await,
        (&Method::DELETE, p) if p == "/cache" || p.starts_with("/cache/") => {
            purge(&proxy, &req, p).await
        }
        (&Method::POST, p) if p.starts_with("/webhooks/chatwoot/accounts/") => {
            webhook(&proxy, req, peer).await
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        ),
    }
}

async fn metrics(proxy: &Proxy) -> Response<ResponseBody> {
    let (entries, bytes) = proxy.store.usage();
    proxy
        .metrics
        .entries
        .set(i64::try_from(entries).unwrap_or(i64::MAX));
    proxy
        .metrics
        .stored_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    let (body, content_type) = proxy.metrics.render();
    let mut resp = Response::new(ResponseBody::full(Bytes::from(body)));
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

/// What a purge path names.
enum PurgeScope {
    All,
    Account(u64),
    Conversation(u64, u64),
}

fn parse_purge_path(path: &str) -> Option<PurgeScope> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        ["cache"] => Some(PurgeScope::All),
        ["cache", "accounts", a] => Some(PurgeScope::Account(canonical_id(a)?)),
        ["cache", "accounts", a, "conversations", c] => {
            Some(PurgeScope::Conversation(canonical_id(a)?, canonical_id(c)?))
        }
        _ => None,
    }
}

async fn purge(proxy: &Proxy, req: &Request<Incoming>, path: &str) -> Response<ResponseBody> {
    let config = proxy.config.load();
    let Some(admin_token) = config.admin_token.as_deref() else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "purge API disabled (no --admin-token)"}),
        );
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The auth scheme is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .map(str::trim);
    if !presented.is_some_and(|p| invalidation::secrets_equal(p.as_bytes(), admin_token.as_bytes()))
    {
        let mut resp = json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "missing or wrong admin bearer token"}),
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    let Some(scope) = parse_purge_path(path) else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        );
    };
    let purged = proxy
        .store
        .purge(match scope {
            PurgeScope::All => Target::All,
            PurgeScope::Account(a) => Target::Account(a),
            PurgeScope::Conversation(a, c) => Target::Conversation {
                account: a,
                conversation: c,
            },
        })
        .await;
    tracing::info!(purged, path, "cache purge");
    json(StatusCode::OK, serde_json::json!({ "purged": purged }))
}

async fn webhook(proxy: &Proxy, req: Request<Incoming>, peer: IpAddr) -> Response<ResponseBody> {
    let config = proxy.config.load();
    let secrets = config.webhook_verifier();
    if !secrets.is_enabled() {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "webhook disabled (no --webhook-secret)"}),
        );
    }
    let path = req.uri().path().to_string();
    let Some(account) = path
        .strip_prefix("/webhooks/chatwoot/accounts/")
        .and_then(canonical_id)
    else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        );
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Everything the head can prove or refute, before a byte of the body is read.
    let proof = match webhook::check_head(
        req.headers(),
        req.uri().query(),
        |presented| secrets.matches_secret(account, presented),
        !secrets.for_account(account).is_empty(),
        config.webhook_allow_query_secret,
        now,
    ) {
        Ok(p) => p,
        Err(e) => return webhook_refused(account, &e),
    };
    if webhook::declared_too_large(req.headers()) {
        return webhook_refused(account, &webhook::Refused::TooLarge);
    }
    let Some(_slot) = proxy.webhooks.enter(peer).await else {
        let mut resp = webhook_refused(account, &webhook::Refused::Busy);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    };
    let delivery = req
        .headers()
        .get("x-chatwoot-delivery")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let deadline = webhook::body_deadline(config.client_header_timeout);
    let body = match webhook::read_body(req.into_body(), deadline).await {
        Ok(b) => b,
        Err(e) => return webhook_refused(account, &e),
    };
    if let webhook::Proof::Signed {
        timestamp,
        signature,
        ..
    } = &proof
        && let Err(e) = secrets.verify(account, Some(timestamp), Some(signature), &body, now)
    {
        return webhook_refused(account, &e.into());
    }
    if !proxy
        .webhooks
        .first_time(account, &proof, delivery.as_deref())
    {
        tracing::info!(
            account,
            "webhook delivery seen before; acknowledged, not acted on"
        );
        return json(
            StatusCode::OK,
            serde_json::json!({"invalidated": "nothing", "duplicate": true}),
        );
    }
    let target = match invalidation::webhook_target(&body) {
        Ok(t) => t,
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": e.to_string()}),
            );
        }
    };
    let (target, invalidated) = match target {
        WebhookTarget::Conversation(c) => (
            Some(Target::Conversation {
                account,
                conversation: c,
            }),
            "conversation",
        ),
        WebhookTarget::Account => (Some(Target::Account(account)), "account"),
        WebhookTarget::Nothing => (None, "nothing"),
    };
    if let Some(target) = target {
        let mut budget = proxy.store.budget();
        proxy
            .store
            .invalidate(target, Source::Webhook, &mut budget)
            .await;
    }
    json(
        StatusCode::OK,
        serde_json::json!({ "invalidated": invalidated }),
    )
}

/// A refused delivery: logged (never with the secret or the body) and answered as JSON.
fn webhook_refused(account: u64, e: &webhook::Refused) -> Response<ResponseBody> {
    tracing::warn!(account, error = %e, "webhook refused");
    json(e.status(), serde_json::json!({"error": e.to_string()}))
}

fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
