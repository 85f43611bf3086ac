//! HTTP/1.1 connections to the one upstream, reused most-recently-idle first.
//!
//! Why not hyper-util's legacy `Client`: it is built for many hosts and protocols, and a
//! forwarded request paid for it on every exchange — a SipHash-keyed pool map and authority
//! comparisons, a pool checkout future racing a connect future, a spawned task per response
//! to put its connection back, and a dozen moves of its large request future (callgrind:
//! about a fifth of the proxy's instructions per pass-through request). The proxy talks to one
//! upstream, over HTTP/1.1 like nginx's `proxy_pass`: a stack of idle senders behind a mutex
//! held for a push or a pop is all the pool it needs.
//!
//! A connection goes back to the pool when its response body has been read to the end (see
//! [`PooledBody`]); a body dropped early takes its connection with it (HTTP/1.1 cannot abandon
//! a response and reuse the connection). A pooled connection idle longer than the idle timeout
//! (below Puma's 20 s keep-alive) is never reused: the app server may be closing it. A request
//! that finds its pooled connection closed before it was written is retried on another one.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::time::Instant;
use tower::Service;

use super::Connector;
use crate::body::{BoxError, RequestBody};

type Sender = http1::SendRequest<RequestBody>;

/// Why no response came back from the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// TCP or TLS connect failed or timed out: nothing was sent. The cause is a `source`, so
    /// logs can walk down to the OS error (hyper's connect errors keep it out of Display).
    #[error("connect")]
    Connect(#[source] BoxError),
    /// The HTTP/1.1 handshake on a fresh connection failed: nothing was sent.
    #[error("handshake")]
    Handshake(#[source] hyper::Error),
    /// The exchange failed after the request may have gone out (reset, garbage, early close).
    #[error(transparent)]
    Exchange(hyper::Error),
}

impl PoolError {
    /// Whether the request certainly never reached the upstream.
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_) | PoolError::Handshake(_))
    }
}

/// The upstream's idle connections and how to make new ones.
pub struct Pool {
    connector: Connector,
    /// `scheme://authority/` of the upstream, what the connector dials.
    dial: Uri,
    /// Oldest at the front; checked out from the back.
    idle: Mutex<VecDeque<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

impl Pool {
    pub fn new(
        connector: Connector,
        dial: Uri,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            dial,
            idle: Mutex::new(VecDeque::new()),
            max_idle,
            idle_timeout,
        })
    }

    /// Sends `req` (origin-form URI, `Host` set) on a pooled or new connection. With `upgrade`
    /// the request gets a connection of its own that can switch protocols and is never pooled.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
        upgrade: bool,
    ) -> Result<Response<PooledBody>, PoolError> {
        loop {
            let pooled = if upgrade { None } else { self.checkout() };
            let reused = pooled.is_some();
            let mut sender = match pooled {
                Some(sender) => sender,
                // Boxed: connecting is rare and its future large; kept out of this one, which
                // every forwarded request builds and moves.
                None => Box::pin(self.connect(upgrade)).await?,
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let pool = (!upgrade).then(|| self.clone());
                    return Ok(response.map(|body| PooledBody::new(body, sender, pool)));
                }
                Err(mut e) => match e.take_message() {
                    // The pooled connection closed before the request was written (the app
                    // server timed it out just now): nothing was sent, try another.
                    Some(unsent) if reused => req = unsent,
                    // A fresh connection that closed before the request went out: nothing
                    // was sent either (a write must not be treated as possibly committed).
                    Some(_) => return Err(PoolError::Connect(Box::new(e.into_error()))),
                    None => return Err(PoolError::Exchange(e.into_error())),
                },
            }
        }
    }

    /// The most recently idle connection that is ready for a request, if any. Closed and
    /// timed-out ones are dropped; one still finishing its previous exchange stays pooled.
    fn checkout(&self) -> Option<Sender> {
        let mut busy = Vec::new();
        let mut found = None;
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            while let Some(entry) = idle.pop_back() {
                if entry.sender.is_closed() || entry.since.elapsed() >= self.idle_timeout {
                    continue;
                }
                if entry.sender.is_ready() {
                    found = Some(entry.sender);
                    break;
                }
                busy.push(entry);
                // A few busy ones are a race with their last body; more is not worth a scan.
                if busy.len() >= 4 {
                    break;
                }
            }
            idle.extend(busy.drain(..).rev());
        }
        found
    }

    /// Returns a connection whose exchange ended cleanly, and closes connections idle past
    /// the timeout (LIFO reuse leaves the oldest untouched; an upstream that keeps idle
    /// connections open longer than Puma would otherwise hold them forever).
    fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while idle
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.since) >= self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < self.max_idle {
            idle.push_back(Idle { sender, since: now });
        }
    }

    async fn connect(&self, upgrade: bool) -> Result<Sender, PoolError> {
        let io = self
            .connector
            .clone()
            .call(self.dial.clone())
            .await
            .map_err(PoolError::Connect)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        if upgrade {
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            });
        } else {
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            });
        }
        Ok(sender)
    }

    /// Waits (up to 2 s) until every idle connection has finished its last exchange (ready) or
    /// closed: connection tasks run on their own, and a test must not race them.
    #[cfg(test)]
    async fn settle(&self) {
        for _ in 0..400 {
            let settled = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .all(|e| e.sender.is_ready() || e.sender.is_closed());
            if settled {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Idle connections right now (for tests).
    #[cfg(test)]
    fn idle_len(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// An upstream response body that hands its connection back to the pool once read to the end.
pub struct PooledBody {
    inner: Incoming,
    /// Present until the body ends; dropped with the body if it never does.
    conn: Option<(Sender, Option<Arc<Pool>>)>,
}

impl PooledBody {
    fn new(inner: Incoming, sender: Sender, pool: Option<Arc<Pool>>) -> Self {
        let mut body = PooledBody {
            inner,
            conn: Some((sender, pool)),
        };
        // A body that is empty from the start (HEAD, 204, 304) may never be polled.
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some((sender, Some(pool))) = self.conn.take() {
            pool.checkin(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            // The last data frame of a sized body: its reader may not poll again.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(None) => this.release(),
            // A failed body leaves its connection unusable: dropped, not pooled.
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A keep-alive HTTP/1.1 server that counts accepted connections. With `close_first`, the
    /// first response of the first connection says `Connection: close`.
    async fn server(close_first: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let conn_index = count.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let served = Arc::new(AtomicUsize::new(0));
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            let mut r = Response::new(http_body_util::Full::new(Bytes::from(
                                "x".repeat(1000),
                            )));
                            if close_first && conn_index == 1 && n == 1 {
                                r.headers_mut()
                                    .insert("connection", "close".parse().unwrap());
                            }
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn pool_for(addr: std::net::SocketAddr, idle_timeout: Duration) -> Arc<Pool> {
        let cfg = crate::config::Config::for_upstream(&format!("http://{addr}")).unwrap();
        let connector = super::super::Connector::new(super::super::dial(&cfg).unwrap());
        Pool::new(
            connector,
            format!("http://{addr}/").parse().unwrap(),
            8,
            idle_timeout,
        )
    }

    /// One GET through the pool, its body read to the end.
    async fn exchange(pool: &Arc<Pool>, addr: std::net::SocketAddr) {
        let resp = pool.send(get(addr), false).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }

    fn get(addr: std::net::SocketAddr) -> Request<RequestBody> {
        Request::builder()
            .uri("/x")
            .header("host", addr.to_string())
            .body(RequestBody::Empty)
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_was_read() {
        let (addr, accepted) = server(false).await;
        let pool = pool_for(addr, Duration::from_secs(15));
        for _ in 0..5 {
            let resp = pool.send(get(addr), false).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 1000);
            // Let the connection task finish the exchange.
            pool.settle().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_len(), 1);
    }

    #[tokio::test]
    async fn an_unread_body_takes_its_connection_with_it() {
        let (addr, accepted) = server(false).await;
        let pool = pool_for(addr, Duration::from_secs(15));
        let resp = pool.send(get(addr), false).await.unwrap();
        drop(resp);
        assert_eq!(
            pool.idle_len(),
            0,
            "a connection with an unread body is not pooled"
        );
        let resp = pool.send(get(addr), false).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_bodiless_response_returns_its_connection_unread() {
        let (addr, accepted) = server(false).await;
        let pool = pool_for(addr, Duration::from_secs(15));
        for _ in 0..3 {
            let mut req = get(addr);
            *req.method_mut() = http::Method::HEAD;
            let resp = pool.send(req, false).await.unwrap();
            assert_eq!(resp.status(), 200);
            // Never polled: a HEAD (or 204/304) body is empty from the start.
            drop(resp);
            assert_eq!(pool.idle_len(), 1);
            pool.settle().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_are_closed_at_the_next_checkin() {
        let (addr, _) = server(false).await;
        let pool = pool_for(addr, Duration::from_millis(100));
        // Two connections at once, both pooled.
        let (a, b) = tokio::join!(pool.send(get(addr), false), pool.send(get(addr), false));
        let (a, b) = (a.unwrap(), b.unwrap());
        a.into_body().collect().await.unwrap();
        b.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_len(), 2);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // A new exchange checks in: the two expired ones are let go.
        exchange(&pool, addr).await;
        assert_eq!(pool.idle_len(), 1);
    }

    #[tokio::test]
    async fn a_request_the_upstream_may_have_seen_is_not_sent_again() {
        use tokio::io::AsyncReadExt;
        // Reads one request head and hangs up without answering, every time.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        let pool = pool_for(addr, Duration::from_secs(15));
        let mut req = get(addr);
        *req.method_mut() = http::Method::POST;
        let Err(err) = pool.send(req, false).await else {
            panic!("an answer from a server that hung up");
        };
        assert!(!err.is_connect(), "the request went out: {err}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(seen.load(Ordering::SeqCst), 1, "sent exactly once");
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_timeout_is_not_reused() {
        let (addr, accepted) = server(false).await;
        let pool = pool_for(addr, Duration::from_millis(50));
        exchange(&pool, addr).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        exchange(&pool, addr).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_server_closes_is_not_reused() {
        // The server answers the first request with `Connection: close`.
        let (addr, accepted) = server(true).await;
        let pool = pool_for(addr, Duration::from_secs(15));
        for _ in 0..3 {
            let resp = pool.send(get(addr), false).await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap();
            pool.settle().await;
        }
        // First connection closed after one exchange; the second serves the rest.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = pool_for(addr, Duration::from_secs(15));
        let Err(err) = pool.send(get(addr), false).await else {
            panic!("a closed port answered");
        };
        assert!(err.is_connect(), "{err}");
    }
}
