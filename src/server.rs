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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client_io::{Activity, ClientIo, InFlight};
use crate::listener::{Accepted, Listener};

use crate::proxy::Proxy;
use crate::upstream::ClientInfo;

/// Largest request head (request line + headers) accepted; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent h2 streams per client connection (SPEC §10): bounds what one connection can
/// hold (hyper's default is 200).
const MAX_H2_STREAMS: u32 = 100;

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The slow-header (slowloris) and idle keep-alive guard is `ClientIo`'s head deadline:
        // hyper's own arms and cancels a timer per request.
        .header_read_timeout(None)
        // hyper's default limit of 100 header fields applies (more → 431). Raising it makes
        // hyper allocate the header index array on the heap for every request.
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_H2_STREAMS)
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
    let builder = Arc::new(http_builder());
    let acceptor = tls.map(TlsAcceptor::from);
    // Every accepted public connection, until it has closed: what the drain waits for.
    let connections = TaskTracker::new();
    let drain = Arc::new(Drain::default());
    // Cancels connections that have not sent a request yet (handshake, first byte), which
    // hyper's graceful shutdown does not see: they must not hold up the drain.
    let stopping = CancellationToken::new();

    // Not live (SPEC 13): the listeners keep the cap they started with.
    let max_connections = proxy.config.load().max_connections;
    let admin = Listener::new(admin, max_connections, "admin");
    let admin_task = tokio::spawn(admin_loop(proxy.clone(), admin, builder.clone()));

    let mut public = Listener::new(public, max_connections, "public");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Accepted { stream, peer, slot } = public.accept() => {
                let conn = PublicConn {
                    proxy: proxy.clone(),
                    builder: builder.clone(),
                    acceptor: acceptor.clone(),
                    peer,
                    // Live: a reload applies to connections accepted afterwards.
                    header_timeout: proxy.config.load().client_header_timeout,
                    drain: drain.clone(),
                    stopping: stopping.clone(),
                };
                connections.spawn(async move {
                    let _ = stream.set_nodelay(true);
                    conn.serve(stream).await;
                    drop(slot);
                });
            }
            _ = &mut shutdown => break,
        }
    }

    proxy.set_ready(false);
    drop(public);
    stopping.cancel();
    drain.start();
    connections.close();
    let drain_timeout = proxy.config.load().shutdown_timeout;
    tracing::info!(
        in_flight_connections = connections.len(),
        drain_ms = drain_timeout.as_millis() as u64,
        "shutting down: draining in-flight requests"
    );
    if tokio::time::timeout(drain_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
    admin_task.abort();
}

/// The public listener's drain has started (SPEC §10): connections finish the request in
/// flight and close.
#[derive(Default)]
struct Drain {
    started: AtomicBool,
    notify: Notify,
}

impl Drain {
    fn start(&self) {
        self.started.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// Serves `conn` to its end; once the drain starts, asks it to finish the request in flight
/// and close (hyper's graceful shutdown).
///
/// hyper-util's `GracefulShutdown` watcher polls its shutdown channel (a mutex shared by the
/// connections of all worker threads) at every wake-up of the connection, i.e. for every
/// request. Here the drain is polled once, which leaves this task's waker with it, and every
/// later wake-up reads one flag.
async fn gracefully<C: GracefulConnection>(conn: C, drain: &Drain) -> C::Output {
    // Made before the flag is read: a drain that starts in between still wakes this task.
    let mut notified = std::pin::pin!(drain.notify.notified());
    let mut conn = std::pin::pin!(conn);
    let mut registered = false;
    let mut asked = false;
    std::future::poll_fn(|cx| {
        if !asked {
            if !registered {
                registered = true;
                // Ready only if the drain has started, which the flag says as well.
                let _ = notified.as_mut().poll(cx);
            }
            if drain.started.load(Ordering::Acquire) {
                asked = true;
                conn.as_mut().graceful_shutdown();
            }
        }
        conn.as_mut().poll(cx)
    })
    .await
}

/// One accepted public connection, before and while it is served.
struct PublicConn {
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    acceptor: Option<TlsAcceptor>,
    peer: SocketAddr,
    header_timeout: Duration,
    drain: Arc<Drain>,
    stopping: CancellationToken,
}

impl PublicConn {
    async fn serve(self, stream: TcpStream) {
        let PublicConn {
            proxy,
            builder,
            acceptor,
            peer,
            header_timeout,
            drain,
            stopping,
        } = self;
        let client = ClientInfo::new(
            peer.ip(),
            acceptor.is_some(),
            &proxy.config.load().trusted_proxies,
        );
        let metrics = proxy.metrics.clone();
        // Writes to the client may stall for as long as a request head may take to arrive.
        let write_limit = header_timeout;
        let conn = crate::proxy::ConnState::new();
        let activity = conn.activity.clone();
        let service =
            service_fn(move |req| proxy.handle(req, client, &conn).map(Ok::<_, Infallible>));
        let result = match acceptor {
            Some(acceptor) => {
                // The handshake counts against the first request head's deadline, which runs
                // from the connection's start (the activity's base) in `ClientIo` below.
                let handshake = tokio::time::timeout(header_timeout, acceptor.accept(stream));
                let tls = tokio::select! {
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    },
                    _ = stopping.cancelled() => return,
                };
                let io = TokioIo::new(ClientIo::new(tls, write_limit, activity, header_timeout));
                let conn = builder.serve_connection_with_upgrades(io, service);
                gracefully(conn.into_owned(), &drain).await
            }
            None => {
                // Wait for the first byte here (bounded by the head timeout) rather than in hyper's
                // protocol detection, so a connection that has sent nothing yet is dropped at once
                // when the drain starts instead of holding it up.
                let mut probe = [0u8; 1];
                let first_byte = tokio::time::timeout(header_timeout, stream.peek(&mut probe));
                tokio::select! {
                    r = first_byte => if !matches!(r, Ok(Ok(n)) if n > 0) {
                        return;
                    },
                    _ = stopping.cancelled() => return,
                }
                let io = TokioIo::new(ClientIo::new(stream, write_limit, activity, header_timeout));
                let conn = builder.serve_connection_with_upgrades(io, service);
                gracefully(conn.into_owned(), &drain).await
            }
        };
        if let Err(e) = result {
            connection_error(&metrics, peer, e.as_ref());
        }
    }
}

/// A connection hyper ended with an error. For requests hyper refused itself (a head too large
/// → 431, a malformed head → 400) nothing reached the proxy's handler, so this is where they
/// are logged and counted; their answers carry no `X-Cache` (hyper writes them).
fn connection_error(
    metrics: &crate::metrics::Metrics,
    peer: SocketAddr,
    e: &(dyn std::error::Error + Send + Sync + 'static),
) {
    let status = e.downcast_ref::<hyper::Error>().and_then(|h| {
        if h.is_parse_too_large() {
            Some(431)
        } else if h.is_parse() {
            Some(400)
        } else {
            None
        }
    });
    match status {
        Some(status) => {
            metrics.observe_request(
                crate::routing::RouteLabel::Other,
                crate::metrics::XCache::Local,
                status,
                0.0,
            );
            tracing::info!(target: "access", %peer, status, cache = "LOCAL", complete = true, "request refused by the HTTP parser");
        }
        None => tracing::debug!(%peer, error = %e, "connection ended with an error"),
    }
}

async fn admin_loop(
    proxy: Arc<Proxy>,
    mut listener: Listener,
    builder: Arc<auto::Builder<TokioExecutor>>,
) {
    loop {
        let Accepted { stream, peer, slot } = listener.accept().await;
        let proxy = proxy.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let limit = proxy.config.load().client_header_timeout;
            let activity = Activity::new();
            let io = ClientIo::new(stream, limit, activity.clone(), limit);
            let service = service_fn(move |req| {
                let proxy = proxy.clone();
                let in_flight = InFlight::start(&activity);
                async move {
                    let response = crate::admin::handle(proxy, req, peer.ip()).await;
                    drop(in_flight);
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = builder.serve_connection(TokioIo::new(io), service).await;
            drop(slot);
        });
    }
}
