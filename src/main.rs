//! The `chatwoot-cache` binary: configuration, logging, listeners, signals. All behaviour lives
//! in the library.

use std::process::ExitCode;

use chatwoot_cache::config::{Config, LogFormat};
use chatwoot_cache::{Proxy, server, tls};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let _log_guard = init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(serve(config))
}

/// Logs to stderr through a non-blocking writer (a stalled log pipe must not stall requests);
/// the returned guard flushes the queue when `main` returns.
fn init_logging(config: &Config) -> tracing_appender::non_blocking::WorkerGuard {
    // RUST_LOG directives win over --log-level when set.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
    guard
}

async fn serve(config: Config) -> ExitCode {
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => match tls::server_config(cert, key) {
            Ok(c) => Some(std::sync::Arc::new(c)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        },
        _ => None,
    };
    let proxy = match Proxy::new(config.clone()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let public = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: --listen {}: {e}", config.listen);
            return ExitCode::from(1);
        }
    };
    let admin = match TcpListener::bind(config.admin_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: --admin-listen {}: {e}", config.admin_listen);
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        listen = %public.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %format!("{}://{}{}", config.upstream.scheme, config.upstream.authority, config.upstream.base_path),
        tls = tls.is_some(),
        "chatwoot-cache listening"
    );
    server::run(proxy, public, admin, tls, shutdown_signal()).await;
    tracing::info!("shut down cleanly");
    ExitCode::SUCCESS
}

/// The first SIGTERM (Kubernetes) or SIGINT (Ctrl-C) starts the graceful drain; a second one
/// ends the process at once (an operator who presses Ctrl-C twice means it).
async fn shutdown_signal() {
    one_signal().await;
    tokio::spawn(async {
        one_signal().await;
        eprintln!("second signal: exiting without waiting for the drain");
        std::process::exit(130);
    });
}

async fn one_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
