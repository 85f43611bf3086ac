//! Deadlines for client connections, kept by the connection's IO wrapper [`ClientIo`].
//!
//! **Write deadline.** hyper stops polling a response body while the client's socket is full,
//! so a client that never reads would otherwise pin its response (and, on pass-through, the
//! upstream slot its body holds) forever: a few hundred such sockets would shed everyone else.
//! A write pending longer than the deadline fails; hyper then closes the connection and drops
//! the body, which releases the upstream slot. It costs nothing while writes complete (the
//! timer is created the first time a write blocks, once per connection).
//!
//! **Head deadline** (slowloris, idle keep-alive). Between requests — from the end of one
//! response (or the connection's start) to the next request head — a connection has
//! `--client-header-timeout` to deliver that head; otherwise a pending read fails and hyper
//! closes it. This replaces hyper's `header_read_timeout`, which allocates, registers and
//! cancels a timer for every request. Here one timer per connection is enough: it may run
//! *earlier* than the current deadline (it was set during an earlier wait or request) and is
//! moved to the real deadline only when it fires, so a busy keep-alive connection touches the
//! timer wheel about once per timeout period instead of twice per request. Requests report their
//! start and end through [`Activity`]; while one is in flight (its body is read by other
//! deadlines) or once the connection is an upgraded tunnel, no head deadline applies. h2
//! connections are timed the same way, by their streams: one with no stream in flight for the
//! limit is closed, whatever PINGs or WINDOW_UPDATEs its client keeps sending.
//!
//! **Stalled h2 readers.** A client can stop reading one h2 stream (a zero flow-control window)
//! while its connection stays busy; no socket write blocks, so no write deadline sees it. The
//! head timer, which fires about once per limit while requests are in flight, also abandons
//! every streamed response of the connection whose client has left it waiting for the limit
//! ([`Stalled`]): within one to two limits, its upstream slot is free, and the connection is
//! closed (hyper would keep the abandoned stream and its buffered bytes). A poll for more body is
//! the only sign that a client is reading a stream, so h2 bodies are handed over in pieces
//! small enough for a reader of [`crate::body::MIN_READ_RATE`] to take within the limit
//! ([`Activity::piece`]); an in-memory body's pieces move the idle deadline on.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What a client connection's requests are doing, shared by the connection's IO wrapper
/// (which enforces the head deadline) and its requests (which report start and end).
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    in_flight: AtomicU32,
    /// Milliseconds after `base` when the connection last became idle (0: its start).
    idle_since_ms: AtomicU64,
    /// An upgraded tunnel: its bytes are not request heads, no head deadline.
    exempt: AtomicBool,
    /// Streamed h2 responses: they wait on the client's flow control, which no write deadline
    /// sees (see [`Stalled`]).
    watched: Mutex<Vec<Weak<dyn Stalled>>>,
    /// The most an h2 response body hands hyper per poll (see [`Activity::piece`]).
    piece: AtomicUsize,
}

/// Largest piece of an h2 response body handed to hyper at once: h2's default frame size.
pub const MAX_PIECE: usize = 16 * 1024;
/// Smallest piece: below this, polls would cost more than the bytes.
const MIN_PIECE: usize = 1024;

/// A response streamed on an h2 connection. h2 flow control lets a client stop reading one
/// stream (a zero window) while the connection stays busy, and hyper then stops polling that
/// response's body: nothing in the body itself can notice. The connection's head timer, which
/// fires about once per `--client-header-timeout` while requests are in flight, asks every
/// registered response whether its client has kept it waiting for that long.
pub trait Stalled: Send + Sync {
    /// Abandons the response (releasing its upstream slot) if its client has not taken what
    /// it was handed for `limit`; true if it did.
    fn reap(&self, now: Instant, limit: Duration) -> bool;
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            exempt: AtomicBool::new(false),
            watched: Mutex::new(Vec::new()),
            piece: AtomicUsize::new(MAX_PIECE),
        })
    }

    /// How much of an h2 response body to hand hyper per poll. hyper polls an h2 body again
    /// only once the client's window has let the previous piece out, and a poll is the only
    /// sign of a stream's progress the proxy gets (the connection may be busy with others).
    /// So each piece must be small enough for an honest reader to take within the stalled-
    /// reader deadline: [`crate::body::MIN_READ_RATE`] times `--client-header-timeout`, at
    /// most [`MAX_PIECE`]. A client reading slower than that is taken for a stalled one.
    pub fn piece(&self) -> usize {
        self.piece.load(Ordering::Relaxed)
    }

    fn set_limit(&self, limit: Duration) {
        let piece = (crate::body::MIN_READ_RATE as f64 * limit.as_secs_f64()) as usize;
        self.piece
            .store(piece.clamp(MIN_PIECE, MAX_PIECE), Ordering::Relaxed);
    }

    /// An h2 body handed the connection another piece at `at`: its client is reading, so the
    /// idle deadline counts from here (an in-memory answer is no request in flight once its
    /// first piece is handed over, see [`crate::body::ResponseBody`]).
    pub fn progressed(&self, at: Instant) {
        let ms =
            u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Registers a streamed h2 response for [`Stalled::reap`].
    pub fn watch(&self, response: Weak<dyn Stalled>) {
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        // Finished responses are dropped whenever the list would grow: amortised O(1).
        if watched.len() == watched.capacity() {
            watched.retain(|w| w.strong_count() > 0);
        }
        watched.push(response);
    }

    /// Abandons the registered responses whose clients stopped reading (see [`Stalled`]);
    /// true if it abandoned any.
    fn reap_stalled(&self, now: Instant, limit: Duration) -> bool {
        let live: Vec<Arc<dyn Stalled>> = {
            let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
            if watched.is_empty() {
                return false;
            }
            watched.retain(|w| w.strong_count() > 0);
            watched.iter().filter_map(Weak::upgrade).collect()
        };
        // Outside the lock: abandoning drops bodies and finishes their requests.
        let mut abandoned = false;
        for response in live {
            abandoned |= response.reap(now, limit);
        }
        abandoned
    }

    /// A request head arrived.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// A request's response ended (or was abandoned) at `at`.
    pub fn request_ended(&self, at: Instant) {
        let ms =
            u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.fetch_max(ms, Ordering::AcqRel);
        // Saturating: an unpaired end must not wrap the count (no head deadline ever again).
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// The connection became a tunnel: heads are not timed any more.
    pub fn exempt(&self) {
        self.exempt.store(true, Ordering::Release);
    }

    fn is_exempt(&self) -> bool {
        self.exempt.load(Ordering::Acquire)
    }

    /// When the current wait for a request head must end; `None` while a request is in
    /// flight.
    fn head_deadline(&self, limit: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let idle = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.base + idle + limit)
    }
}

/// One request in flight on a connection, ended when dropped (for handlers without an
/// access-log guard, e.g. the admin listener's).
pub struct InFlight(Arc<Activity>);

impl InFlight {
    pub fn start(activity: &Arc<Activity>) -> InFlight {
        activity.request_started();
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended(Instant::now());
    }
}

/// Wraps a client stream; see the module docs.
pub struct ClientIo<S> {
    inner: S,
    write_limit: Duration,
    write_timer: Option<Pin<Box<Sleep>>>,
    /// Whether the last write attempt was pending (the timer is armed for it).
    blocked: bool,
    /// When a blocked write last completed: a response still draining to a slow reader is
    /// not "waiting for the next head".
    write_resumed: Option<Instant>,
    activity: Arc<Activity>,
    head_limit: Duration,
    head_timer: Option<Pin<Box<Sleep>>>,
    /// The waker `head_timer` was last polled with: while it is this read's and the timer has
    /// not fired, the timer holds it already and is not polled again (see `head_deadline`).
    head_waker: Option<Waker>,
}

impl<S> ClientIo<S> {
    pub fn new(
        inner: S,
        write_limit: Duration,
        activity: Arc<Activity>,
        head_limit: Duration,
    ) -> Self {
        activity.set_limit(head_limit);
        ClientIo {
            inner,
            write_limit,
            write_timer: None,
            blocked: false,
            write_resumed: None,
            activity,
            head_limit,
            head_timer: None,
            head_waker: None,
        }
    }

    /// A read is pending: fails it once the current head wait is over its deadline.
    ///
    /// The timer is kept armed at all times (bar exempt connections), at a time no later than
    /// the deadline of any head wait still to come: when a response ends nobody polls this
    /// connection, so the timer must already be running. Armed during a wait, it is set to that
    /// wait's deadline; during a request, to `now + limit` (the request cannot end before now).
    /// It fires at most about once per `limit` and is then moved to the current bound.
    fn head_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.is_exempt() {
            return Poll::Pending;
        }
        // The common case, once per request: armed for this task and not due. A timer keeps the
        // waker it was polled with until it fires, so polling it again would change nothing.
        if let (Some(timer), Some(waker)) = (&self.head_timer, &self.head_waker)
            && waker.will_wake(cx.waker())
            && !timer.is_elapsed()
        {
            return Poll::Pending;
        }
        let limit = self.head_limit;
        let timer = self
            .head_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(self.activity.base + limit)));
        // Outside tokio's cooperative budget: a poll the budget refused would register no waker,
        // and the check above would then skip this timer for good.
        while Pin::new(&mut tokio::task::unconstrained(timer.as_mut()))
            .poll(cx)
            .is_ready()
        {
            let now = Instant::now();
            if self.activity.reap_stalled(now, limit) {
                // An abandoned stream is not freed by abandoning it: hyper resets it only when
                // it polls the body again, which it does only once the client's window opens,
                // so it and the frames buffered for it stay until the connection closes, while
                // the client keeps the connection busy. A client that left a response unread
                // for the limit gets the idle connection's treatment: closed, all of it.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client stopped reading a response",
                )));
            }
            // hyper counts a response as sent once its last frame is queued; a slow reader may
            // still be draining it from hyper's buffer. While a write is blocked, and for the
            // head timeout after it last moved, that is not a wait for the next head.
            let draining = self.blocked.then_some(now).or(self.write_resumed);
            let deadline = self
                .activity
                .head_deadline(limit)
                .map(|d| draining.map_or(d, |w| d.max(w + limit)));
            match deadline {
                Some(deadline) if now >= deadline => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client did not send a request head in time",
                    )));
                }
                Some(deadline) => timer.as_mut().reset(deadline),
                None => timer.as_mut().reset(now + limit),
            }
        }
        if !self
            .head_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            self.head_waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Called with the inner write's poll result: arms the timer on the first `Pending`,
    /// disarms it on progress, and turns a too-long wait into an error.
    fn track<T>(&mut self, cx: &mut Context<'_>, res: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match res {
            Poll::Ready(r) => {
                if self.blocked {
                    self.blocked = false;
                    self.write_resumed = Some(Instant::now());
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let deadline = Instant::now() + self.write_limit;
                let timer = self
                    .write_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !self.blocked {
                    timer.as_mut().reset(deadline);
                    self.blocked = true;
                }
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client did not read the response in time",
                )))
            }
        }
    }
}

use std::future::Future;

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => this.head_deadline(cx),
            ready => ready,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.track(cx, res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.track(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_flush(cx);
        this.track(cx, res)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.track(cx, res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An activity with a request in flight (no head deadline).
    fn busy() -> Arc<Activity> {
        let a = Activity::new();
        a.request_started();
        a
    }

    async fn read_outcome(io: &mut ClientIo<tokio::io::DuplexStream>) -> io::Result<usize> {
        let mut buf = [0u8; 16];
        io.read(&mut buf).await
    }

    #[tokio::test]
    async fn a_head_that_never_comes_fails_the_read() {
        let (server_end, _client) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = ClientIo::new(
            server_end,
            Duration::from_secs(60),
            activity,
            Duration::from_millis(100),
        );
        let start = std::time::Instant::now();
        let err = read_outcome(&mut io).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(90));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    /// Slowloris: a head trickled a byte at a time, each byte well within the limit, still has
    /// the limit in all. Bytes are not a request; only a request's end moves the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_trickled_head_still_has_only_the_limit() {
        let (server_end, mut client) = tokio::io::duplex(64);
        let limit = Duration::from_millis(1000);
        let mut io = ClientIo::new(server_end, Duration::from_secs(60), Activity::new(), limit);
        let start = Instant::now();
        let trickle = tokio::spawn(async move {
            for _ in 0..50 {
                tokio::time::sleep(limit / 5).await;
                if client.write_all(b"G").await.is_err() {
                    break;
                }
            }
        });
        let mut got = 0;
        let err = loop {
            match read_outcome(&mut io).await {
                Ok(0) => panic!("the client does not close"),
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        trickle.abort();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = Instant::now() - start;
        assert!(
            waited >= limit && waited < limit + Duration::from_millis(50),
            "timed out after {waited:?} and {got} bytes"
        );
        assert!(got >= 4, "the trickled bytes were read ({got})");
    }

    /// The head timer first polled by a task that has spent tokio's cooperative budget (a
    /// busy connection task) must still register: it is polled outside the budget. A refused
    /// poll would register no waker, and the fast path that skips a timer already holding
    /// this task's waker would then leave the connection without a head deadline for good.
    #[tokio::test(start_paused = true)]
    async fn a_head_deadline_first_polled_without_budget_still_fires() {
        let (server_end, _client) = tokio::io::duplex(64);
        let limit = Duration::from_millis(100);
        let mut io = ClientIo::new(server_end, Duration::from_secs(60), Activity::new(), limit);
        let mut buf = [0u8; 16];
        let first = std::future::poll_fn(|cx| {
            while tokio::task::coop::has_budget_remaining() {
                match tokio::task::coop::poll_proceed(cx) {
                    Poll::Ready(coop) => coop.made_progress(),
                    Poll::Pending => break,
                }
            }
            let mut rb = ReadBuf::new(&mut buf);
            Poll::Ready(Pin::new(&mut io).poll_read(cx, &mut rb).is_pending())
        })
        .await;
        assert!(first, "nothing to read yet");
        let outcome = tokio::time::timeout(limit * 10, read_outcome(&mut io)).await;
        let err = outcome.expect("the head deadline fired").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_deadline_counts_from_the_end_of_the_last_response() {
        let (server_end, mut client) = tokio::io::duplex(64);
        let activity = Activity::new();
        let limit = Duration::from_millis(1000);
        let mut io = ClientIo::new(server_end, Duration::from_secs(60), activity.clone(), limit);
        // A request is in flight for longer than the limit: no deadline while it runs.
        activity.request_started();
        let waiting = tokio::time::timeout(Duration::from_millis(2500), read_outcome(&mut io));
        assert!(
            waiting.await.is_err(),
            "no head deadline while a request is in flight"
        );
        // It ends; the next head has `limit` from now, and the early-armed timer is moved.
        let ended = Instant::now();
        activity.request_ended(ended);
        let err = read_outcome(&mut io).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = Instant::now() - ended;
        assert!(
            waited >= limit && waited < limit + Duration::from_millis(50),
            "{waited:?}"
        );
        // Bytes that arrive in time are read as usual.
        client.write_all(b"GET").await.unwrap();
        assert_eq!(read_outcome(&mut io).await.unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_draining_to_a_slow_reader_is_not_cut_off() {
        // 64-byte pipe: the "response" below can only leave as fast as the client reads.
        let (server_end, mut client) = tokio::io::duplex(64);
        let activity = Activity::new();
        let limit = Duration::from_millis(500);
        let io = ClientIo::new(server_end, Duration::from_secs(60), activity.clone(), limit);
        let (mut reader, mut writer) = tokio::io::split(io);
        // hyper has taken the whole body: the request counts as ended.
        activity.request_started();
        activity.request_ended(Instant::now());
        let write = tokio::spawn(async move {
            writer.write_all(&[7u8; 2048]).await.unwrap();
            writer
        });
        // Meanwhile the connection waits for the next head (a pending read).
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            reader.read(&mut buf).await.map(|_| ())
        });
        // The client drains 64 bytes every 100 ms: 3.2 s, far past the 500 ms limit.
        let mut got = 0;
        let mut buf = [0u8; 64];
        while got < 2048 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            got += client.read(&mut buf).await.unwrap();
            assert!(
                !read.is_finished(),
                "head deadline fired while the response drained"
            );
        }
        let _writer = write.await.unwrap();
        // Once drained, the next head has the usual limit.
        let finished = Instant::now();
        let err = read.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(Instant::now() - finished <= limit + Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn an_exempt_connection_has_no_head_deadline() {
        let (server_end, _client) = tokio::io::duplex(64);
        let activity = Activity::new();
        activity.exempt();
        let mut io = ClientIo::new(
            server_end,
            Duration::from_secs(60),
            activity,
            Duration::from_millis(100),
        );
        let waiting = tokio::time::timeout(Duration::from_secs(10), read_outcome(&mut io));
        assert!(waiting.await.is_err(), "still waiting, no error");
    }

    #[tokio::test]
    async fn a_reader_that_never_reads_fails_the_write() {
        // A tiny duplex buffer stands in for a full socket.
        let (client, _server_end_never_read) = tokio::io::duplex(64);
        let mut w = ClientIo::new(
            client,
            Duration::from_millis(100),
            busy(),
            Duration::from_secs(60),
        );
        let start = std::time::Instant::now();
        let err = w.write_all(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_slow_but_steady_reader_is_fine() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut w = ClientIo::new(
            client,
            Duration::from_millis(200),
            busy(),
            Duration::from_secs(60),
        );
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 64];
            let mut total = 0;
            while total < 1024 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                total += server.read(&mut buf).await.unwrap();
            }
            total
        });
        w.write_all(&[1u8; 1024]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
