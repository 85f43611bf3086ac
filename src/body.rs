//! Body types for both directions.
//!
//! [`ResponseBody`] is what every public response carries: an in-memory body (cache hits, local
//! errors) or a streamed upstream body. Streamed bodies hold the upstream concurrency permit until
//! they end (tower's limits release at headers, which undercounts long bodies) and fail loudly if
//! the upstream dies or stalls mid-body, so a truncated upstream response never looks complete.
//! Both carry the access-log guard, so the log line and request metrics are written when the
//! response is really finished, with the real outcome.
//!
//! [`RequestBody`] streams a client body to the upstream and records progress, so the upstream
//! deadline counts from the last byte uploaded rather than cutting off large uploads.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::access_log::AccessGuard;
use crate::protect::UpstreamPermit;
use crate::upstream::pool::PooledBody;

/// Boxed error type at body boundaries (what hyper accepts).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream stopped sending mid-body for longer than the upstream timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream body stalled for {0:?}")]
pub struct BodyStalled(pub Duration);

/// Body of every response on the public listener.
pub struct ResponseBody {
    kind: Kind,
    guard: Option<AccessGuard>,
}

enum Kind {
    Full(Option<Bytes>),
    /// Boxed: every response (hits included) is moved several times on its way to hyper,
    /// and the streamed variant is three times the size of the in-memory one.
    Upstream(Box<UpstreamBody>),
}

impl ResponseBody {
    pub fn empty() -> Self {
        ResponseBody {
            kind: Kind::Full(None),
            guard: None,
        }
    }

    pub fn full(bytes: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            guard: None,
        }
    }

    pub fn upstream(body: UpstreamBody) -> Self {
        ResponseBody {
            kind: Kind::Upstream(Box::new(body)),
            guard: None,
        }
    }

    /// Attaches the access-log guard; it fires when the body ends, fails or is dropped.
    pub fn set_guard(&mut self, guard: AccessGuard) {
        self.guard = Some(guard);
    }

    fn finish(&mut self, complete: bool) {
        if let Some(g) = self.guard.take() {
            g.finish(complete);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let res = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(u) => Pin::new(&mut **u).poll_frame(cx),
        };
        match &res {
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(u) => u.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(u) => u.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or hyper discarded a HEAD body).
        let complete = matches!(self.kind, Kind::Full(None))
            || matches!(&self.kind, Kind::Upstream(u) if u.is_end_stream());
        self.finish(complete);
    }
}

/// A streamed upstream body with an inactivity deadline and the upstream permit.
pub struct UpstreamBody {
    /// Bytes already read from `inner` (an oversized conversation body being handed over).
    prefix: Option<Bytes>,
    inner: PooledBody,
    idle: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    permit: Option<UpstreamPermit>,
}

impl UpstreamBody {
    pub fn new(inner: PooledBody, idle: Duration, permit: Option<UpstreamPermit>) -> Self {
        UpstreamBody {
            prefix: None,
            inner,
            idle,
            stall: None,
            permit,
        }
    }
}

impl UpstreamBody {
    /// Replays `prefix` before the rest of the stream.
    pub fn with_prefix(mut self, prefix: Bytes) -> Self {
        self.prefix = (!prefix.is_empty()).then_some(prefix);
        self
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(p) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(s) = this.stall.as_mut() {
                    s.as_mut().reset(Instant::now() + this.idle);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.permit.take();
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.permit.take();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let idle = this.idle;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(stall.as_mut().poll(cx));
                this.permit.take();
                Poll::Ready(Some(Err(Box::new(BodyStalled(idle)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(p) = &self.prefix {
            let n = p.len() as u64;
            // Raise the upper bound first: SizeHint panics if lower ever exceeds upper.
            if let Some(u) = hint.upper() {
                hint.set_upper(u.saturating_add(n));
            }
            hint.set_lower(hint.lower().saturating_add(n));
        }
        hint
    }
}

/// When a streamed request body last made progress, shared with the upstream deadline, and
/// whether it failed on the client's side (a stalled or cut-off upload is no upstream failure).
#[derive(Debug)]
pub struct Progress {
    base: Instant,
    last_ms: AtomicU64,
    client_failed: AtomicBool,
}

impl Progress {
    pub fn new() -> Arc<Self> {
        Arc::new(Progress {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            client_failed: AtomicBool::new(false),
        })
    }

    /// Whether the client's body stalled or broke off.
    pub fn client_failed(&self) -> bool {
        self.client_failed.load(Ordering::Acquire)
    }

    fn fail(&self) {
        self.client_failed.store(true, Ordering::Release);
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The instant of the last uploaded chunk (or the start).
    pub fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Body of every upstream request: nothing, or the client's body streamed through.
pub enum RequestBody {
    Empty,
    Client {
        inner: Incoming,
        progress: Arc<Progress>,
        /// How long the client may stall mid-body before the upload is abandoned.
        idle: Duration,
        stall: Option<Pin<Box<Sleep>>>,
    },
}

impl RequestBody {
    /// The client's body, streamed, failing if the client stops sending for `idle`.
    pub fn client(inner: Incoming, progress: Arc<Progress>, idle: Duration) -> Self {
        RequestBody::Client {
            inner,
            progress,
            idle,
            stall: None,
        }
    }
}

/// The client stopped sending its request body.
#[derive(Debug, thiserror::Error)]
#[error("client request body stalled for {0:?}")]
pub struct ClientBodyStalled(pub Duration);

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Client {
                inner,
                progress,
                idle,
                stall,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(res) => {
                    if matches!(res, Some(Err(_))) {
                        progress.fail();
                    }
                    progress.touch();
                    if let Some(s) = stall.as_mut() {
                        s.as_mut().reset(Instant::now() + *idle);
                    }
                    Poll::Ready(res.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
                }
                Poll::Pending => {
                    let idle = *idle;
                    let timer = stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    ready!(timer.as_mut().poll(cx));
                    progress.fail();
                    Poll::Ready(Some(Err(Box::new(ClientBodyStalled(idle)))))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Client { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Client { inner, .. } => inner.size_hint(),
        }
    }
}
