//! The admin listener (SPEC §7.2, §7.3, §8): health, readiness, metrics, purge API, webhook.
//!
//! Kept off the public listener so that a Service exposing the proxy never exposes purges,
//! and so probes and scrapes keep working while the public side drains.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::body::ResponseBody;
use crate::invalidation::{self, Source, Target, WebhookTarget};
use crate::proxy::Proxy;
use crate::routing::canonical_id;

/// Largest webhook body accepted (Chatwoot's payloads are a few KB).
const WEBHOOK_MAX_BYTES: usize = 1 << 20;

/// Handles one admin request.
pub async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<ResponseBody> {
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
            webhook(&proxy, req).await
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
    let Some(admin_token) = proxy.config.admin_token.as_deref() else {
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
    let purged = proxy.store.purge(match scope {
        PurgeScope::All => Target::All,
        PurgeScope::Account(a) => Target::Account(a),
        PurgeScope::Conversation(a, c) => Target::Conversation {
            account: a,
            conversation: c,
        },
    });
    tracing::info!(purged, path, "cache purge");
    json(StatusCode::OK, serde_json::json!({ "purged": purged }))
}

async fn webhook(proxy: &Proxy, req: Request<Incoming>) -> Response<ResponseBody> {
    let secrets = proxy.config.webhook_verifier();
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
    let query_secret_ok = req.uri().query().is_some_and(|q| {
        q.split('&').any(|pair| {
            pair.strip_prefix("secret=").is_some_and(|v| {
                let v = crate::routing::percent_decode(v);
                secrets.matches_secret(account, v.as_bytes())
            })
        })
    });
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let timestamp = header("x-chatwoot-timestamp");
    let signature = header("x-chatwoot-signature");
    // A body trickling in must not hold the admin connection forever (the head deadline
    // is off while a request is in flight).
    let collect = Limited::new(req.into_body(), WEBHOOK_MAX_BYTES).collect();
    let body = match tokio::time::timeout(proxy.config.client_header_timeout, collect).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({"error": "webhook body too large or unreadable"}),
            );
        }
        Err(_) => {
            tracing::warn!(
                account,
                "webhook body not received within the client header timeout"
            );
            return json(
                StatusCode::REQUEST_TIMEOUT,
                serde_json::json!({"error": "webhook body not received in time"}),
            );
        }
    };
    if !query_secret_ok {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Err(e) = secrets.verify(
            account,
            timestamp.as_deref(),
            signature.as_deref(),
            &body,
            now,
        ) {
            tracing::warn!(account, error = %e, "webhook refused");
            return json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": e.to_string()}),
            );
        }
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
    let invalidated = match target {
        WebhookTarget::Conversation(c) => {
            let target = Target::Conversation {
                account,
                conversation: c,
            };
            proxy.store.invalidate(target, Source::Webhook);
            "conversation"
        }
        WebhookTarget::Account => {
            proxy
                .store
                .invalidate(Target::Account(account), Source::Webhook);
            "account"
        }
        WebhookTarget::Nothing => "nothing",
    };
    json(
        StatusCode::OK,
        serde_json::json!({ "invalidated": invalidated }),
    )
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
