//! Body types for both directions.
//!
//! [`ResponseBody`] is what every public response carries: an in-memory body (cache hits, local
//! errors) or a streamed upstream body. Streamed bodies hold the upstream concurrency permit until
//! their last frame is read from the upstream (tower's limits release at headers, which
//! undercounts long bodies) and fail loudly if the upstream dies or stalls mid-body, so a
//! truncated upstream response never looks complete. On h2, where flow control lets a client
//! stop reading one stream unseen by any socket deadline, a streamed body is also [`Watched`].
//! Both carry the access-log guard, so the log line and request metrics are written when the
//! response is really finished, with the real outcome.
//!
//! [`RequestBody`] streams a client body to the upstream and records progress, so the upstream
//! deadline counts from the last byte uploaded rather than cutting off large uploads; an upload
//! slower than [`MIN_UPLOAD_RATE`] is cut off, so a trickle cannot hold an upstream slot.

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
    /// An in-memory body on an h2 stream, larger than one piece, handed over a piece per poll
    /// (see [`crate::client_io::Activity::piece`]). The request leaves the connection's
    /// in-flight count at the first piece, as a [`Kind::Full`] one does (a zero window never
    /// lets hyper poll again, and the idle deadline must run); every later piece moves the
    /// idle deadline, so a client that keeps reading keeps its connection.
    Paced(Bytes),
    /// Boxed: every response (hits included) is moved several times on its way to hyper,
    /// and the streamed variant is three times the size of the in-memory one.
    Upstream(Box<UpstreamBody>),
    /// A streamed body on an h2 connection, watched for a client that stops reading.
    Watched(Arc<Watched>),
}

/// An upstream body on an h2 stream, shared with the connection's deadline keeper
/// ([`crate::client_io::Stalled`]): when the client leaves a handed-over frame untaken for
/// `--client-header-timeout`, the keeper drops the upstream body (its slot and connection) and
/// finishes the request's log line; hyper, if it ever polls again, gets an error and resets
/// the stream.
pub struct Watched {
    state: std::sync::Mutex<Option<WatchedState>>,
    /// Milliseconds after `base` when the body was last handed to hyper — at the start, or a
    /// frame — with no poll since (hyper polls again once the client's window lets the frame
    /// out); `u64::MAX` while the body waits on the upstream instead (whose own deadline runs).
    handed_ms: AtomicU64,
    base: Instant,
    /// Bytes handed to hyper per poll at most (see [`crate::client_io::Activity::piece`]):
    /// an upstream frame can be hundreds of KiB, and a reader is seen to progress only when
    /// hyper polls for more.
    piece: usize,
}

struct WatchedState {
    body: Box<UpstreamBody>,
    /// The rest of an upstream frame larger than one piece, not yet handed over.
    rest: Bytes,
    guard: Option<AccessGuard>,
}

/// The client stopped reading this response and it was abandoned.
#[derive(Debug, thiserror::Error)]
#[error("response abandoned: the client stopped reading")]
pub struct ResponseAbandoned;

const NOT_HANDED: u64 = u64::MAX;

impl Watched {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<WatchedState>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut slot = self.lock();
        let Some(state) = slot.as_mut() else {
            return Poll::Ready(Some(Err(Box::new(ResponseAbandoned))));
        };
        let res = if state.rest.is_empty() {
            match Pin::new(&mut *state.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(match frame.into_data() {
                    Ok(mut data) => {
                        if data.len() > self.piece {
                            state.rest = data.split_off(self.piece);
                        }
                        Frame::data(data)
                    }
                    Err(frame) => frame,
                }))),
                other => other,
            }
        } else {
            Poll::Ready(Some(Ok(Frame::data(next_piece(
                &mut state.rest,
                self.piece,
            )))))
        };
        let handed = match &res {
            Poll::Ready(Some(Ok(_))) => {
                u64::try_from(self.base.elapsed().as_millis()).unwrap_or(NOT_HANDED - 1)
            }
            _ => NOT_HANDED,
        };
        self.handed_ms.store(handed, Ordering::Release);
        match &res {
            Poll::Ready(None) => {
                if let Some(g) = state.guard.take() {
                    g.finish(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(g) = state.guard.take() {
                    g.finish(false);
                }
            }
            _ => {}
        }
        res
    }

    /// The response body is dropped (hyper is done with it): ends the request.
    fn release(&self) {
        let Some(state) = self.lock().take() else {
            return;
        };
        let complete = state.rest.is_empty() && state.body.is_end_stream();
        drop(state.body);
        if let Some(g) = state.guard {
            g.finish(complete);
        }
    }

    /// Ends the response from outside: drops the upstream body, logs the request incomplete.
    fn abandon(&self) -> bool {
        let taken = match self.state.try_lock() {
            Ok(mut slot) => slot.take(),
            // Being polled right now: the client is taking data.
            Err(_) => return false,
        };
        let Some(state) = taken else {
            return false;
        };
        drop(state.body);
        if let Some(g) = state.guard {
            g.finish(false);
        }
        true
    }
}

impl crate::client_io::Stalled for Watched {
    fn reap(&self, now: Instant, limit: Duration) -> bool {
        let handed = self.handed_ms.load(Ordering::Acquire);
        if handed == NOT_HANDED {
            return false;
        }
        let since = self.base + Duration::from_millis(handed);
        if now.saturating_duration_since(since) >= limit && self.abandon() {
            tracing::info!(
                waited_ms = now.saturating_duration_since(since).as_millis() as u64,
                "response abandoned: the h2 client stopped reading it; closing its connection"
            );
            return true;
        }
        false
    }
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

    /// A body that may be absent (a cache render: `None` for HEAD and 304), moved in as is.
    pub fn optional(bytes: Option<Bytes>) -> Self {
        ResponseBody {
            kind: Kind::Full(bytes.filter(|b| !b.is_empty())),
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

    /// For a response on an h2 stream (called after [`ResponseBody::set_guard`]): a streamed
    /// body is watched for a stalled reader ([`ResponseBody::watch_stalls`]), an in-memory one
    /// larger than a piece is paced ([`Kind::Paced`]). A HIT's body of one piece or less (the
    /// common case) is left as it is.
    pub fn for_h2(&mut self) {
        match &mut self.kind {
            Kind::Full(Some(b))
                if self
                    .guard
                    .as_ref()
                    .is_some_and(|g| b.len() > g.activity().piece()) =>
            {
                self.kind = Kind::Paced(std::mem::take(b));
            }
            Kind::Upstream(_) => self.watch_stalls(),
            _ => {}
        }
    }

    /// A HEAD answer carries no body (hyper drops it on HTTP/1.1, not on h2): empties it and
    /// states the GET body's length instead, unless the answer already did.
    pub fn strip_for_head(response: &mut http::Response<ResponseBody>) {
        let body = response.body_mut();
        let Kind::Full(b) = &mut body.kind else {
            return;
        };
        let Some(len) = b.take().map(|b| b.len()) else {
            return;
        };
        response
            .headers_mut()
            .entry(http::header::CONTENT_LENGTH)
            .or_insert_with(|| http::HeaderValue::from(len));
    }

    /// For a streamed body on an h2 stream (called after [`ResponseBody::set_guard`]): hands
    /// the body and its guard to the connection's deadline keeper (see [`Watched`]). Other
    /// bodies are left as they are; only responses that needed the upstream come here, never a
    /// cache hit.
    pub fn watch_stalls(&mut self) {
        if !matches!(self.kind, Kind::Upstream(_)) {
            return;
        }
        let Some(guard) = self.guard.take() else {
            return;
        };
        let Kind::Upstream(body) = std::mem::replace(&mut self.kind, Kind::Full(None)) else {
            return;
        };
        let activity = guard.activity().clone();
        let base = Instant::now();
        let watched = Arc::new(Watched {
            state: std::sync::Mutex::new(Some(WatchedState {
                body,
                rest: Bytes::new(),
                guard: Some(guard),
            })),
            // Handed over now: hyper polls an h2 body only once the client's window has room,
            // so a client that opened the stream with a zero window never gets a first poll.
            handed_ms: AtomicU64::new(0),
            base,
            piece: activity.piece(),
        });
        let weak: std::sync::Weak<dyn crate::client_io::Stalled> = Arc::downgrade(&watched) as _;
        activity.watch(weak);
        self.kind = Kind::Watched(watched);
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
            Kind::Full(b) => {
                let frame = b.take().map(|b| Ok(Frame::data(b)));
                // Handed over whole: the request is over for the proxy. On h2 the bytes may
                // still wait for the client's window (a zero one: forever), and a request in
                // flight would exempt its connection from the idle deadline. The same single
                // `finish` as at the end of a body (HTTP/1.1 drops the body right after this).
                this.finish(true);
                return Poll::Ready(frame);
            }
            Kind::Paced(rest) => {
                if rest.is_empty() {
                    return Poll::Ready(None);
                }
                let Some(guard) = this.guard.as_mut() else {
                    return Poll::Ready(Some(Ok(Frame::data(std::mem::take(rest)))));
                };
                let piece = next_piece(rest, guard.activity().piece());
                guard.handed_piece(Instant::now());
                if rest.is_empty() {
                    this.finish(true);
                }
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            Kind::Upstream(u) => Pin::new(&mut **u).poll_frame(cx),
            Kind::Watched(w) => return w.poll_frame(cx),
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
            Kind::Paced(rest) => rest.is_empty(),
            Kind::Upstream(u) => u.is_end_stream(),
            Kind::Watched(w) => w
                .lock()
                .as_ref()
                .is_some_and(|s| s.rest.is_empty() && s.body.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Paced(rest) => SizeHint::with_exact(rest.len() as u64),
            Kind::Upstream(u) => u.size_hint(),
            Kind::Watched(w) => w.lock().as_ref().map_or_else(SizeHint::default, |s| {
                add_to_hint(s.body.size_hint(), s.rest.len())
            }),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or hyper discarded a HEAD body).
        let complete = match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Paced(rest) => rest.is_empty(),
            Kind::Upstream(u) => u.is_end_stream(),
            Kind::Watched(w) => {
                w.release();
                return;
            }
        };
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
                if this.inner.is_end_stream() {
                    // The upstream exchange is over once its last frame is read: the slot is
                    // free even if the client never takes this frame (h2 may not poll again).
                    this.permit.take();
                } else if let Some(s) = this.stall.as_mut() {
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
        add_to_hint(
            self.inner.size_hint(),
            self.prefix.as_ref().map_or(0, Bytes::len),
        )
    }
}

/// `hint` plus `n` bytes known to come first.
fn add_to_hint(mut hint: SizeHint, n: usize) -> SizeHint {
    let n = n as u64;
    // Raise the upper bound first: SizeHint panics if lower ever exceeds upper.
    if let Some(u) = hint.upper() {
        hint.set_upper(u.saturating_add(n));
    }
    hint.set_lower(hint.lower().saturating_add(n));
    hint
}

/// The next at most `piece` bytes of `rest`, without copying.
fn next_piece(rest: &mut Bytes, piece: usize) -> Bytes {
    if rest.len() > piece {
        rest.split_to(piece)
    } else {
        std::mem::take(rest)
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
        /// The upload must keep [`MIN_UPLOAD_RATE`] over every window of this much time spent
        /// waiting for the client (`--client-header-timeout`).
        idle: Duration,
        stall: Option<Pin<Box<Sleep>>>,
        window: UploadWindow,
    },
}

/// The least an upload must average, in bytes per second of waiting for the client, over each
/// `--client-header-timeout` window (Apache mod_reqtimeout's default `MinRate`). A stall fails
/// the first window; so does a trickle (one byte every 14 s would otherwise hold an upstream
/// slot for as long as it likes), while any real uplink passes.
pub const MIN_UPLOAD_RATE: u64 = 500;

/// The least an h2 client must read a response at, in bytes per second, to be told from one
/// that stopped: the same as an upload's (see [`crate::client_io::Activity::piece`]).
pub const MIN_READ_RATE: u64 = MIN_UPLOAD_RATE;

/// Time spent waiting on the client, and bytes received, in the current window. Time the
/// upstream spent not reading (backpressure) is not the client's and is not counted.
#[derive(Debug, Default)]
pub struct UploadWindow {
    waited: Duration,
    bytes: u64,
    pending_since: Option<Instant>,
}

impl UploadWindow {
    /// Closes the window if it is complete: `Err` if it fell below the minimum rate.
    fn check(&mut self, idle: Duration, now: Instant) -> Result<(), ()> {
        let waited = self.waited + self.pending_since.map_or(Duration::ZERO, |p| now - p);
        if waited < idle {
            return Ok(());
        }
        if (self.bytes as f64) < MIN_UPLOAD_RATE as f64 * idle.as_secs_f64() {
            return Err(());
        }
        *self = UploadWindow {
            pending_since: self.pending_since.map(|_| now),
            ..UploadWindow::default()
        };
        Ok(())
    }
}

impl RequestBody {
    /// The client's body, streamed, failing if the client stalls or trickles (see
    /// [`MIN_UPLOAD_RATE`]) over a window of `idle`.
    pub fn client(inner: Incoming, progress: Arc<Progress>, idle: Duration) -> Self {
        RequestBody::Client {
            inner,
            progress,
            idle,
            stall: None,
            window: UploadWindow::default(),
        }
    }
}

/// The client stopped sending its request body, or sent it slower than [`MIN_UPLOAD_RATE`].
#[derive(Debug, thiserror::Error)]
#[error("client request body stalled (under {MIN_UPLOAD_RATE} B/s over {0:?})")]
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
                window,
            } => {
                let idle = *idle;
                match Pin::new(&mut *inner).poll_frame(cx) {
                    Poll::Ready(res) => {
                        let now = Instant::now();
                        if let Some(since) = window.pending_since.take() {
                            window.waited += now - since;
                        }
                        match &res {
                            Some(Ok(frame)) => {
                                if let Some(d) = frame.data_ref() {
                                    window.bytes += d.len() as u64;
                                }
                            }
                            Some(Err(_)) => progress.fail(),
                            None => {}
                        }
                        progress.touch();
                        if !inner.is_end_stream() && window.check(idle, now).is_err() {
                            progress.fail();
                            return Poll::Ready(Some(Err(Box::new(ClientBodyStalled(idle)))));
                        }
                        Poll::Ready(res.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
                    }
                    Poll::Pending => loop {
                        let now = Instant::now();
                        let since = *window.pending_since.get_or_insert(now);
                        let deadline = since + idle.saturating_sub(window.waited);
                        let timer = stall
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                        if timer.deadline() != deadline {
                            timer.as_mut().reset(deadline);
                        }
                        ready!(timer.as_mut().poll(cx));
                        if window.check(idle, Instant::now()).is_err() {
                            progress.fail();
                            return Poll::Ready(Some(Err(Box::new(ClientBodyStalled(idle)))));
                        }
                        // A new window began: arm the timer for it.
                    },
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn an_upload_window_needs_the_minimum_rate_once_it_is_full() {
        let idle = secs(2.0);
        let t0 = Instant::now();
        // Not full yet: no verdict, however few bytes.
        let mut w = UploadWindow {
            waited: secs(1.9),
            bytes: 1,
            pending_since: None,
        };
        assert!(w.check(idle, t0).is_ok());
        // A trickle (one byte a second never stalls for 2 s) fails the full window.
        w.waited = secs(2.0);
        w.bytes = 2;
        assert!(w.check(idle, t0).is_err());
        // Enough bytes: the window closes and a new one starts, empty.
        let mut w = UploadWindow {
            waited: secs(2.0),
            bytes: 1000,
            pending_since: Some(t0),
        };
        assert!(w.check(idle, t0).is_ok());
        assert_eq!(
            (w.waited, w.bytes, w.pending_since),
            (Duration::ZERO, 0, Some(t0))
        );
        // The wait in progress counts: a plain stall fails at the window's end.
        let mut w = UploadWindow {
            pending_since: Some(t0),
            ..UploadWindow::default()
        };
        assert!(w.check(idle, t0 + secs(1.0)).is_ok());
        assert!(w.check(idle, t0 + secs(2.0)).is_err());
    }
}
