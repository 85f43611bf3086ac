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
//! Ports: `DEMO_LISTEN` / `DEMO_ADMIN_LISTEN` override the defaults. What it prints is checked
//! against README.md by `tests/demo.rs`.

#[path = "../tests/support/fake.rs"]
mod fake;

#[path = "../tests/support/demo_script.rs"]
mod demo_script;

use chatwoot_cache::{Proxy, server};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, reload};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Logs stay off while the walkthrough prints, so they cannot interleave with it; then the
    // access log shows the requests you send yourself.
    let (filter, log_level) = reload::Layer::new(EnvFilter::new("off"));
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();

    let fake = fake::FakeChatwoot::start().await;
    let listen = std::env::var("DEMO_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let admin_listen =
        std::env::var("DEMO_ADMIN_LISTEN").unwrap_or_else(|_| "127.0.0.1:9090".into());
    let config = demo_script::config(&fake.url(), &listen, &admin_listen)?;
    let public = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {listen} ({e}); set DEMO_LISTEN=127.0.0.1:18080"))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| {
            format!("cannot listen on {admin_listen} ({e}); set DEMO_ADMIN_LISTEN=127.0.0.1:19090")
        })?;
    let (listen, admin_listen) = (public.local_addr()?, admin.local_addr()?);
    let proxy = Proxy::new(config)?;
    let server = tokio::spawn(server::run(proxy, public, admin, None, async {
        let _ = tokio::signal::ctrl_c().await;
    }));

    print!(
        "{}",
        demo_script::run(listen, admin_listen, || fake.requests()).await?
    );
    print!("{}", demo_script::try_it(listen, admin_listen));
    log_level.modify(|f| *f = EnvFilter::new("info"))?;
    server.await?;
    Ok(())
}
