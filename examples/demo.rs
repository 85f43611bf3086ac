//! See chatwoot-cache work without a Chatwoot of your own.
//!
//! ```text
//! cargo run --example demo
//! ```
//!
//! Starts the fake Chatwoot used by the test suite (a conversation 42 in account 1, tokens
//! `admin-token` and `agent-token`), the proxy in front of it on 127.0.0.1:8080 (admin on
//! 127.0.0.1:9090), sends a few requests to show MISS → HIT → write invalidation, then keeps
//! running so you can try it with curl. Ctrl-C stops it (graceful drain, as in production).
//! Ports: `DEMO_LISTEN` / `DEMO_ADMIN_LISTEN` override the defaults.

#[path = "../tests/support/fake.rs"]
mod fake;

use std::time::Duration;

use bytes::Bytes;
use chatwoot_cache::{Config, Proxy, server};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fake = fake::FakeChatwoot::start().await;
    let listen = std::env::var("DEMO_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let admin_listen =
        std::env::var("DEMO_ADMIN_LISTEN").unwrap_or_else(|_| "127.0.0.1:9090".into());
    let config = Config::try_from_args([
        "chatwoot-cache",
        "--upstream",
        &fake.url(),
        "--listen",
        &listen,
        "--admin-listen",
        &admin_listen,
        "--admin-token",
        "demo-admin-secret",
    ])?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .init();
    let public = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen} ({e}); set DEMO_LISTEN=127.0.0.1:18080"))?;
    let admin = tokio::net::TcpListener::bind(&admin_listen)
        .await
        .map_err(|e| {
            format!("cannot listen on {admin_listen} ({e}); set DEMO_ADMIN_LISTEN=127.0.0.1:19090")
        })?;
    let proxy = Proxy::new(config)?;
    let server = tokio::spawn(server::run(proxy, public, admin, None, async {
        let _ = tokio::signal::ctrl_c().await;
    }));

    println!(
        "\nfake Chatwoot on {} — chatwoot-cache on http://{listen} (admin http://{admin_listen})\n",
        fake.url()
    );
    let base = format!("http://{listen}");
    let conv = format!("{base}/api/v1/accounts/1/conversations/42");
    show(Method::GET, &conv, &[("api_access_token", "admin-token")]).await?;
    show(Method::GET, &conv, &[("api_access_token", "admin-token")]).await?;
    show(Method::GET, &conv, &[("api_access_token", "agent-token")]).await?;
    show(Method::GET, &conv, &[]).await?;
    show(
        Method::POST,
        &format!("{conv}/toggle_priority"),
        &[("api_access_token", "admin-token")],
    )
    .await?;
    show(Method::GET, &conv, &[("api_access_token", "admin-token")]).await?;
    println!(
        "\nChatwoot saw {} requests for the 6 above.",
        fake.requests()
    );
    println!(
        "\nTry it:\n  curl -si -H 'api_access_token: admin-token' {conv}\n  \
         curl -s http://{admin_listen}/metrics | grep chatwoot_cache_requests_total\n  \
         curl -si -X DELETE -H 'Authorization: Bearer demo-admin-secret' http://{admin_listen}/cache\n\
         Ctrl-C to stop.\n"
    );
    server.await?;
    Ok(())
}

/// Sends one request and prints the status line, X-Cache and Cache-Status.
async fn show(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(), Box<dyn std::error::Error>> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder().method(method.clone()).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.request(req.body(Full::new(Bytes::new()))?).await?;
    let status = resp.status();
    let h = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    let get = |n: &str| {
        h.get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    let token = headers.first().map(|(_, t)| *t).unwrap_or("(none)");
    let detail = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .map(|v| {
            if let Some(version) = v["custom_attributes"]["version"].as_u64() {
                format!("version {version}")
            } else {
                v["errors"][0]["code"].as_str().unwrap_or("").to_string()
            }
        })
        .unwrap_or_default();
    println!(
        "{:<5} {:<58} token={:<12} → {} X-Cache: {:<7} Cache-Status: {} {}",
        method.as_str(),
        url.trim_start_matches("http://"),
        token,
        status.as_u16(),
        get("x-cache"),
        get("cache-status"),
        detail
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}
