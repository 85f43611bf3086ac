//! What `cargo run --example demo` does and prints, shared with `tests/demo.rs`, which checks
//! that the output is exactly the sample in README.md and that the printed curl commands give
//! what they say.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The purge API's bearer token in the demo.
pub const ADMIN_TOKEN: &str = "demo-admin-secret";
/// Long enough that the printed curl still gets a HIT minutes later.
pub const CACHE_TTL: &str = "5m";

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Sends the demo's requests through the proxy on `listen` and returns what the demo prints
/// (everything up to the curl suggestions). `upstream_requests` counts what the fake Chatwoot saw.
pub async fn run(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream_requests: impl Fn() -> usize,
) -> Result<String, Error> {
    let mut out = format!(
        "chatwoot-cache on http://{listen} (admin http://{admin}), in front of a fake Chatwoot\n\
         (conversation 42 in account 1; tokens admin-token and agent-token; cache ttl {CACHE_TTL}).\n\
         Requests to http://{listen}/api/v1/accounts/1/...:\n\n"
    );
    out.push_str(&format!(
        "{:<4} {:<33} {:<11}  {:<6} {:<7}  {:<34}  {}\n",
        "", "path", "token", "status", "X-Cache", "Cache-Status or error code", "what it shows"
    ));
    let steps: [(Method, &str, Option<&str>, &str); 6] = [
        (
            Method::GET,
            "conversations/42",
            Some("admin-token"),
            "fetched and stored",
        ),
        (
            Method::GET,
            "conversations/42",
            Some("admin-token"),
            "answered from memory",
        ),
        (
            Method::GET,
            "conversations/42",
            Some("agent-token"),
            "another token never shares an entry",
        ),
        (
            Method::GET,
            "conversations/42",
            None,
            "refused without asking Chatwoot",
        ),
        (
            Method::POST,
            "conversations/42/toggle_priority",
            Some("admin-token"),
            "a write: drops 42 for every token",
        ),
        (
            Method::GET,
            "conversations/42",
            Some("admin-token"),
            "fetched again: the new version",
        ),
    ];
    let before = upstream_requests();
    for (method, path, token, note) in steps {
        let url = format!("http://{listen}/api/v1/accounts/1/{path}");
        let r = send(method.clone(), &url, token).await?;
        out.push_str(&format!(
            "{:<4} {:<33} {:<11}  {:<6} {:<7}  {:<34}  {note}\n",
            method.as_str(),
            path,
            token.unwrap_or("(none)"),
            r.status,
            r.x_cache,
            r.detail,
        ));
    }
    out.push_str(&format!(
        "\nChatwoot saw {} of these 6 requests: the HIT and the 401 never reached it.\n",
        upstream_requests() - before
    ));
    Ok(out)
}

/// The curl commands the demo suggests, each with what it gives.
pub fn try_it(listen: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "\nTry it while the demo runs (Ctrl-C stops it; the access log of your requests shows below):\n\n\
         \x20 curl -si -H 'api_access_token: admin-token' http://{listen}/api/v1/accounts/1/conversations/42\n\
         \x20     → 200 with X-Cache: HIT\n\
         \x20 curl -s http://{admin}/metrics | grep '^chatwoot_cache_requests_total' | grep -v ' 0$'\n\
         \x20     → the request counters that moved, by X-Cache value, route and status class\n\
         \x20 curl -s -X DELETE -H 'Authorization: Bearer {ADMIN_TOKEN}' http://{admin}/cache\n\
         \x20     → {{\"purged\":1}}: the stored copy is dropped; the next GET is a MISS\n\n"
    )
}

/// One response as the demo shows it.
pub struct Shown {
    pub status: u16,
    pub x_cache: String,
    /// `Cache-Status` on the cache route, else the error code.
    pub detail: String,
}

pub async fn send(method: Method, url: &str, token: Option<&str>) -> Result<Shown, Error> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("api_access_token", t);
    }
    let resp = client.request(req.body(Full::new(Bytes::new()))?).await?;
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let x_cache = header("x-cache");
    let cache_status = header("cache-status");
    let body = resp.into_body().collect().await?.to_bytes();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string));
    let detail = match code {
        Some(code) => code,
        None if cache_status.is_empty() => "-".to_string(),
        None => cache_status,
    };
    // Requests are a few milliseconds apart, like a client polling; keeps the order readable.
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(Shown {
        status,
        x_cache,
        detail,
    })
}

/// The demo's configuration: defaults, except a long ttl (see [`CACHE_TTL`]) and a purge token.
pub fn config(
    upstream: &str,
    listen: &str,
    admin: &str,
) -> Result<chatwoot_cache::Config, chatwoot_cache::config::ConfigError> {
    chatwoot_cache::Config::try_from_args([
        "chatwoot-cache",
        "--upstream",
        upstream,
        "--listen",
        listen,
        "--admin-listen",
        admin,
        "--cache-ttl",
        CACHE_TTL,
        "--admin-token",
        ADMIN_TOKEN,
    ])
}
