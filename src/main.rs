//! The `chatwoot-cache` binary: configuration, logging, listeners, signals. All behaviour lives
//! in the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use std::sync::Arc;

use chatwoot_cache::config::{Cli, Config, Effective, LogFormat};
use chatwoot_cache::reload::Reloader;
use chatwoot_cache::{Proxy, server};
use clap::CommandFactory;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// jemalloc instead of the system allocator, so that `--cache-max-bytes` bounds the resident
/// memory, not only the counted heap, for as long as the cache churns.
///
/// The cache's entries are large blocks (an identity client's ~10 KB: the gzip body and the
/// identity copy in one buffer), allocated beside the upstream body each fill reads and frees,
/// and freed by evictions in random order. glibc malloc serves small allocations from the
/// remainders of those freed blocks, which then no longer fit an entry, and keeps free space
/// per thread arena: benches/rss.sh (identity clients, default 256 MiB) ended at 1.37x the
/// bound after 200k fills and 1.39x after 600k with glibc's default arenas; with one arena
/// 1.17x after 200k but 1.20-1.29x after 600k and 1.29x after 1.2M. jemalloc's size classes
/// keep large blocks apart from small ones: 1.20x after 200k, 600k and 1.2M fills (gzip
/// clients 1.20x), and callgrind counts slightly fewer instructions (hit -2.7%, stored miss
/// -1%).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // Kept for reloads: flags and environment cannot change in a running process, but the
    // --config file and the files settings name can, and are read again from these.
    let matches = Cli::command().get_matches();
    let loaded = match Config::from_matches_reported(&matches) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    if loaded.print_config {
        for warning in &loaded.warnings {
            eprintln!("warning: {warning}");
        }
        print!("{}", loaded.effective.to_toml());
        return ExitCode::SUCCESS;
    }
    let config = loaded.config;
    let startup = Startup {
        effective: loaded.effective,
        warnings: loaded.warnings,
    };
    let threads = match worker_threads() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (_log_guard, log_level) = init_logging(&config);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let load = Box::new(move || Config::from_matches(&matches));
    runtime.block_on(serve(config, startup, load, log_level))
}

/// The runtime's worker threads from `TOKIO_WORKER_THREADS` (tokio's own variable; without it,
/// one per CPU the process may use, a container's CPU limit included), checked here because
/// tokio panics on a value that is not a positive whole number.
fn worker_threads() -> Result<Option<usize>, String> {
    const VAR: &str = "TOKIO_WORKER_THREADS";
    match std::env::var(VAR) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(s) => match s.trim().parse::<usize>() {
            Ok(n @ 1..=1024) => Ok(Some(n)),
            _ => Err(format!(
                "{VAR}: {s:?} is not a number of worker threads: write a whole number from 1 to 1024, or unset it for one per CPU"
            )),
        },
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{VAR}: not valid UTF-8")),
    }
}

/// Logs to stderr through a non-blocking writer (a stalled log pipe must not stall requests);
/// the returned guard flushes the queue when `main` returns. The level is reloadable; the
/// returned hook applies a new `--log-level` (unless `RUST_LOG` is set: it wins, as at start).
fn init_logging(
    config: &Config,
) -> (
    tracing_appender::non_blocking::WorkerGuard,
    chatwoot_cache::reload::LogLevelHook,
) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_wins = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&config.log_level));
    let (filter, handle) = reload::Layer::<EnvFilter, Registry>::new(filter);
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(fmt.with_ansi(false)).init(),
    }
    let hook = Box::new(move |level: &str| {
        if env_wins {
            tracing::warn!("--log-level changed but RUST_LOG is set and keeps deciding");
            return;
        }
        // The level was validated when the configuration was parsed.
        if let Err(e) = handle.reload(EnvFilter::new(level)) {
            tracing::warn!("--log-level: cannot apply the new level: {e}");
        }
    });
    (guard, hook)
}

/// What start-up reports once the listeners are bound.
struct Startup {
    effective: Effective,
    warnings: Vec<String>,
}

/// The first log line: every setting, its value and where it came from (secrets as set/unset),
/// so an operator sees which value won. In JSON, one object under `config`.
fn log_effective_config(config: &Config, effective: &Effective) {
    const MESSAGE: &str = "effective configuration";
    match config.log_format {
        LogFormat::Text => tracing::info!("{MESSAGE}: {}", effective.to_line()),
        LogFormat::Json => {
            // tracing's JSON output writes field values as strings; an object needs its own line.
            let line = serde_json::json!({
                "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
                "level": "INFO",
                "message": MESSAGE,
                "config": effective.to_json(),
                "target": "chatwoot_cache::config",
            });
            eprintln!("{line}");
        }
    }
}

async fn serve(
    config: Config,
    startup: Startup,
    load: chatwoot_cache::reload::Loader,
    log_level: chatwoot_cache::reload::LogLevelHook,
) -> ExitCode {
    let proxy = match Proxy::new(config.clone()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let tls = match proxy.server_tls_config() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let public = match chatwoot_cache::listener::bind(config.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: --listen {}: {e}", config.listen);
            return ExitCode::from(1);
        }
    };
    let admin = match chatwoot_cache::listener::bind(config.admin_listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: --admin-listen {}: {e}", config.admin_listen);
            return ExitCode::from(1);
        }
    };
    // Logged once start-up can no longer fail: a start-up error stays one line on stderr.
    log_effective_config(&config, &startup.effective);
    for warning in &startup.warnings {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        listen = %public.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %format!("{}://{}{}", config.upstream.scheme, config.upstream.authority, config.upstream.base_path),
        listen_tls = tls.is_some(),
        "chatwoot-cache listening"
    );
    let reloader = Arc::new(Reloader::new(proxy.clone(), load).with_log_level(log_level));
    let watcher = tokio::spawn(reloader.clone().watch());
    let hangups = tokio::spawn(reload_on_sighup(reloader));
    server::run(proxy, public, admin, tls, shutdown_signal()).await;
    watcher.abort();
    hangups.abort();
    tracing::info!("shut down cleanly");
    ExitCode::SUCCESS
}

/// SIGHUP re-reads the configuration (the conventional daemon reload signal).
async fn reload_on_sighup(reloader: Arc<Reloader>) {
    let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP; reloads happen on file changes only");
        return;
    };
    while hangup.recv().await.is_some() {
        let r = reloader.clone();
        let _ = tokio::task::spawn_blocking(move || r.reload("SIGHUP")).await;
    }
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
