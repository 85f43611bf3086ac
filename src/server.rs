//! Accept loops for the public and admin listeners, TLS termination, and graceful shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown future (the mini-redis shape), so tests
//! bind `127.0.0.1:0` and trigger shutdown without signals.
//!
//! Shutdown order (SPEC §10): readiness turns 503 at once; the public listener stops accepting;
//! in-flight requests drain for up to the shutdown timeout; then the admin listener closes. The
//! admin side stays up during the drain so probes see 503 (not a refused connection) and the
//! last metrics can still be scraped.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::proxy::Proxy;
use crate::upstream::ClientInfo;

/// Largest request head (request line + headers) accepted; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn http_builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Slow-header (slowloris) guard; also closes idle keep-alive connections.
        .header_read_timeout(header_timeout)
        // hyper's default limit of 100 header fields applies (more → 431). Raising it makes
        // hyper allocate the header index array on the heap for every request.
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves until `shutdown` resolves, then drains. Returns once everything is closed.
pub async fn run(
    proxy: Arc<Proxy>,
    public: TcpListener,
    admin: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let header_timeout = proxy.config.client_header_timeout;
    let builder = Arc::new(http_builder(header_timeout));
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();

    let admin_task = tokio::spawn(admin_loop(proxy.clone(), admin, builder.clone()));

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = public.accept() => match accepted {
                Ok((stream, peer)) => {
                    let watcher = graceful.watcher();
                    let proxy = proxy.clone();
                    let builder = builder.clone();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let _ = stream.set_nodelay(true);
                        serve_public(proxy, builder, acceptor, stream, peer, header_timeout, watcher).await;
                    });
                }
                Err(e) => accept_backoff(e).await,
            },
            _ = &mut shutdown => break,
        }
    }

    proxy.set_ready(false);
    drop(public);
    let drain = proxy.config.shutdown_timeout;
    tracing::info!(
        in_flight_connections = graceful.count(),
        drain_ms = drain.as_millis() as u64,
        "shutting down: draining in-flight requests"
    );
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
    admin_task.abort();
}

async fn serve_public(
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    acceptor: Option<TlsAcceptor>,
    stream: TcpStream,
    peer: SocketAddr,
    header_timeout: Duration,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let client = ClientInfo {
        addr: peer.ip().to_canonical(),
        tls: acceptor.is_some(),
    };
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req, client).await) }
    });
    match acceptor {
        Some(acceptor) => {
            let tls =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        None => {
            // hyper's header timeout starts after protocol detection; a client that connects
            // and sends nothing would otherwise hold the socket forever.
            let mut probe = [0u8; 1];
            if !matches!(tokio::time::timeout(header_timeout, stream.peek(&mut probe)).await, Ok(Ok(n)) if n > 0)
            {
                return;
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
    }
}

async fn admin_loop(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    builder: Arc<auto::Builder<TokioExecutor>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let proxy = proxy.clone();
                let builder = builder.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let proxy = proxy.clone();
                        async move { Ok::<_, Infallible>(crate::admin::handle(proxy, req).await) }
                    });
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Err(e) => accept_backoff(e).await,
        }
    }
}

/// Accept errors are usually fd exhaustion: log and back off briefly instead of spinning.
async fn accept_backoff(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
