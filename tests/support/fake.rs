//! An in-process fake Chatwoot (hyper 1, 127.0.0.1, random port), shaped after Chatwoot 4.9:
//! the conversation show endpoint with Rails' weak ETag and 304, the real 401/404 bodies, a
//! per-token access table, writes that bump `updated_at`, plus test endpoints (echo, stream,
//! upload, websocket) and fault injection (delays, forced statuses, garbage, resets, truncation).

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub type FakeBody = BoxBody<Bytes, std::io::Error>;

const SAMPLE: &str = include_str!("conversation-sample.json");

/// Who a token belongs to.
#[derive(Clone, Debug)]
pub enum TokenKind {
    /// A user who may see the listed conversations (`None` = administrator, sees all).
    User {
        name: String,
        allowed: Option<HashSet<(u64, u64)>>,
    },
    /// An AgentBot: refused on show with the "bots" 401.
    Bot,
}

/// A conversation the fake knows.
#[derive(Clone, Debug)]
pub struct Conversation {
    /// Exact decimal text, e.g. `1765182000.482917`.
    pub updated_at: String,
    /// Bumped by every write; shows in the body as `custom_attributes.version`.
    pub version: u64,
    /// Extra bytes of padding in the body (to build large bodies).
    pub padding: usize,
}

/// A forced misbehaviour.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status, body and extra headers.
    Status {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// Accept the connection, then close it without answering.
    Reset,
    /// Answer with bytes that are not HTTP.
    Garbage,
    /// Send headers promising `Content-Length: 5000` and close after a few bytes.
    Truncate,
    /// Never answer.
    Hang,
    /// Send headers promising `Content-Length: 5000` and a few bytes, then neither finish nor
    /// close (until the peer goes away).
    Stall,
    /// Send a chunked body (no `Content-Length`) of two 1 KiB chunks, then break the
    /// connection without the terminating chunk.
    TruncateChunked,
}

/// One request the fake saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
}

/// The fake's mutable state; tests change it while the server runs.
#[derive(Default)]
pub struct State {
    pub requests: AtomicUsize,
    pub show_requests: AtomicUsize,
    /// Requests being handled now (until their response head is returned; a streamed body
    /// is not counted) and the most seen at once: see `max_concurrency()`.
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Answer with `Connection: close`, so every upstream request opens a new connection:
    /// socket-level faults then hit every request, and dropping the fake refuses connects.
    pub close_connections: std::sync::atomic::AtomicBool,
    pub seen: Mutex<Vec<Seen>>,
    pub conversations: Mutex<HashMap<(u64, u64), Conversation>>,
    pub tokens: Mutex<HashMap<String, TokenKind>>,
    pub delay: Mutex<Duration>,
    /// Fault applied to the next N requests (`None` count = until cleared).
    pub fault: Mutex<Option<(Fault, Option<usize>)>>,
    /// Serve show with an older `updated_at` than stored (replica lag), once set.
    pub lag_updated_at: Mutex<Option<String>>,
    /// Disable Rails' ETag/304 (to exercise same-bytes revalidation).
    pub no_etag: std::sync::atomic::AtomicBool,
    /// Extra headers on show `200`s (e.g. `Set-Cookie`, a fixed `Date`), replacing any
    /// header of the same name.
    pub show_headers: Mutex<Vec<(String, String)>>,
    /// Delay *after* a show `200` was rendered (slow network, not slow database): the body
    /// reflects the state when the request arrived.
    pub show_post_delay: Mutex<Duration>,
    /// Stream show `200` bodies in 1 KiB chunks without `Content-Length`.
    pub chunked_show: std::sync::atomic::AtomicBool,
    /// Hold show `200`s (rendered when the request arrived) until cleared: a fetch that stays
    /// in flight as long as a test needs, whatever the machine's load.
    pub hold_shows: std::sync::atomic::AtomicBool,
    /// TCP connections accepted (every one, TLS or not, faulted or not).
    pub connections: AtomicUsize,
    /// Body bytes `/upload` has received so far in the current upload (reset when one starts).
    pub upload_progress: std::sync::atomic::AtomicU64,
    /// devise_token_auth users by access-token: see [`FakeChatwoot::add_devise_user`].
    pub devise_users: Mutex<HashMap<String, DeviseUser>>,
}

/// A devise_token_auth session (a dashboard login).
#[derive(Clone, Debug)]
pub struct DeviseUser {
    pub uid: String,
    pub name: String,
    pub allowed: Option<HashSet<(u64, u64)>>,
}

/// A running fake.
pub struct FakeChatwoot {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeChatwoot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeChatwoot {
    /// Starts with conversation (1, 42) and tokens `admin-token` (admin), `agent-token`
    /// (sees only (1, 42)), `bot-token` (bot).
    pub async fn start() -> FakeChatwoot {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        Self::start_on(listener, None).await
    }

    /// Same, serving TLS with the given rustls config.
    pub async fn start_tls(cfg: Arc<rustls::ServerConfig>) -> FakeChatwoot {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        Self::start_on(listener, Some(cfg)).await
    }

    async fn start_on(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> FakeChatwoot {
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        state.conversations.lock().unwrap().insert(
            (1, 42),
            Conversation {
                updated_at: "1765182000.482917".into(),
                version: 1,
                padding: 0,
            },
        );
        {
            let mut t = state.tokens.lock().unwrap();
            t.insert(
                "admin-token".into(),
                TokenKind::User {
                    name: "admin".into(),
                    allowed: None,
                },
            );
            t.insert(
                "agent-token".into(),
                TokenKind::User {
                    name: "agent".into(),
                    allowed: Some([(1, 42)].into_iter().collect()),
                },
            );
            t.insert("bot-token".into(), TokenKind::Bot);
        }
        let st = state.clone();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    serve_conn(st, stream, acceptor).await;
                });
            }
        });
        FakeChatwoot { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Requests to the conversation show endpoint only.
    pub fn show_requests(&self) -> usize {
        self.state.show_requests.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn last_seen(&self) -> Seen {
        self.seen().pop().expect("the fake saw no request")
    }

    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }

    /// See [`State::hold_shows`].
    pub fn hold_shows(&self, on: bool) {
        self.state.hold_shows.store(on, Ordering::SeqCst);
    }

    pub fn set_fault(&self, fault: Fault, times: Option<usize>) {
        *self.state.fault.lock().unwrap() = Some((fault, times));
    }

    pub fn clear_fault(&self) {
        *self.state.fault.lock().unwrap() = None;
    }

    /// The most requests the fake handled at once (since start or the last reset).
    pub fn max_concurrency(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn reset_max_concurrency(&self) {
        let now = self.state.in_flight.load(Ordering::SeqCst);
        self.state.max_in_flight.store(now, Ordering::SeqCst);
    }

    /// Requests being handled right now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far (see [`State::connections`]).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Bytes the current (or last) `/upload` has received so far.
    pub fn upload_progress(&self) -> u64 {
        self.state.upload_progress.load(Ordering::SeqCst)
    }

    /// See [`State::close_connections`].
    pub fn set_close_connections(&self, on: bool) {
        self.state.close_connections.store(on, Ordering::SeqCst);
    }

    pub fn add_conversation(&self, account: u64, id: u64, updated_at: &str) {
        self.state.conversations.lock().unwrap().insert(
            (account, id),
            Conversation {
                updated_at: updated_at.into(),
                version: 1,
                padding: 0,
            },
        );
    }

    pub fn set_padding(&self, account: u64, id: u64, padding: usize) {
        if let Some(c) = self
            .state
            .conversations
            .lock()
            .unwrap()
            .get_mut(&(account, id))
        {
            c.padding = padding;
        }
    }

    pub fn remove_conversation(&self, account: u64, id: u64) {
        self.state
            .conversations
            .lock()
            .unwrap()
            .remove(&(account, id));
    }

    /// Changes the conversation as a write would (new `updated_at`, new version).
    pub fn touch(&self, account: u64, id: u64, updated_at: &str) {
        if let Some(c) = self
            .state
            .conversations
            .lock()
            .unwrap()
            .get_mut(&(account, id))
        {
            c.updated_at = updated_at.into();
            c.version += 1;
        }
    }

    pub fn add_user(&self, token: &str, name: &str, allowed: Option<&[(u64, u64)]>) {
        self.state.tokens.lock().unwrap().insert(
            token.into(),
            TokenKind::User {
                name: name.into(),
                allowed: allowed.map(|a| a.iter().copied().collect()),
            },
        );
    }

    /// A devise session: `access-token` + `uid` headers (`client` optional), or
    /// `Authorization: Bearer <access_token>` (real devise decodes a base64 JSON of the three
    /// there; the fake keys it by the access-token alone). Like Chatwoot, the fake resolves the
    /// devise user *first*: with a token beside it, membership and the rendered viewer are the
    /// devise user's, not the token owner's.
    pub fn add_devise_user(
        &self,
        access_token: &str,
        uid: &str,
        name: &str,
        allowed: Option<&[(u64, u64)]>,
    ) {
        self.state.devise_users.lock().unwrap().insert(
            access_token.into(),
            DeviseUser {
                uid: uid.into(),
                name: name.into(),
                allowed: allowed.map(|a| a.iter().copied().collect()),
            },
        );
    }

    pub fn revoke(&self, token: &str) {
        self.state.tokens.lock().unwrap().remove(token);
    }
}

async fn serve_conn(
    state: Arc<State>,
    stream: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    // Socket-level faults are decided per connection, before HTTP parsing.
    let fault = take_fault(&state, true);
    match fault {
        Some(Fault::Reset) => {
            state.requests.fetch_add(1, Ordering::SeqCst);
            let mut stream = stream;
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
            drop(stream);
            return;
        }
        Some(Fault::Garbage) => {
            state.requests.fetch_add(1, Ordering::SeqCst);
            let mut stream = stream;
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
            let _ = stream
                .write_all(b"SMTP READY\r\n\x00\x01garbage garbage\r\n\r\n")
                .await;
            let _ = stream.shutdown().await;
            return;
        }
        _ => {}
    }
    let svc = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle_tracked(state, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    match tls {
        Some(acceptor) => {
            if let Ok(s) = acceptor.accept(stream).await {
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            }
        }
        None => {
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        }
    }
}

/// [`handle`] plus the concurrency gauge and the `close_connections` knob.
async fn handle_tracked(state: Arc<State>, req: Request<Incoming>) -> Response<FakeBody> {
    /// Leaves the gauge even when the request future is dropped (a hung request whose
    /// client gave up).
    struct Leave(Arc<State>);
    impl Drop for Leave {
        fn drop(&mut self) {
            self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _leave = Leave(state.clone());
    let mut r = handle(state.clone(), req).await;
    if state.close_connections.load(Ordering::SeqCst) {
        r.headers_mut()
            .insert("connection", "close".parse().unwrap());
    }
    r
}

/// Takes the current fault if it applies at this level (socket-level or HTTP-level).
fn take_fault(state: &State, socket_level: bool) -> Option<Fault> {
    let mut guard = state.fault.lock().unwrap();
    let (fault, times) = guard.as_mut()?;
    let is_socket = matches!(fault, Fault::Reset | Fault::Garbage);
    if is_socket != socket_level {
        return None;
    }
    let f = fault.clone();
    if let Some(n) = times {
        *n -= 1;
        if *n == 0 {
            *guard = None;
        }
    }
    Some(f)
}

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<FakeBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    r.headers_mut()
        .insert("x-request-id", "fake-req-id".parse().unwrap());
    r
}

fn json_error(status: u16, body: &str) -> Response<FakeBody> {
    let mut r = full(status, "application/json; charset=utf-8", body.to_string());
    r.headers_mut()
        .insert("cache-control", "no-cache".parse().unwrap());
    r
}

/// Rack::ETag: `W/"<first 32 hex of SHA-256(body)>"`.
fn rails_etag(body: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, body);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("W/\"{}\"", &hex[..32])
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Rack's view of the token header: `_` and `-` equivalent; Puma prefers the hyphenated form.
fn token_of(h: &HeaderMap) -> Option<String> {
    header_str(h, "api-access-token")
        .or_else(|| header_str(h, "api_access_token"))
        .map(str::to_owned)
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<FakeBody> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    state.seen.lock().unwrap().push(Seen {
        method: req.method().clone(),
        path_and_query: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: req.headers().clone(),
    });
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(fault) = take_fault(&state, false) {
        match fault {
            Fault::Status {
                status,
                body,
                headers,
            } => {
                let ct = if status == 429 {
                    "text/plain"
                } else {
                    "application/json; charset=utf-8"
                };
                let mut r = full(status, ct, body);
                for (k, v) in headers {
                    r.headers_mut().insert(
                        http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        v.parse().unwrap(),
                    );
                }
                return r;
            }
            Fault::Hang => {
                std::future::pending::<()>().await;
            }
            Fault::Truncate => {
                let (tx, rx) =
                    tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
                tokio::spawn(async move {
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::from_static(b"{\"id\":42,\"acc"))))
                        .await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "died",
                        )))
                        .await;
                });
                let body = StreamBody::new(tokio_stream_from(rx));
                let mut r = Response::new(BodyExt::boxed(body));
                r.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                r.headers_mut()
                    .insert("content-length", "5000".parse().unwrap());
                return r;
            }
            Fault::Stall => {
                let (tx, rx) =
                    tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
                tokio::spawn(async move {
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::from_static(b"{\"id\":42,\"acc"))))
                        .await;
                    // Silence, but the body stays open until the receiver is dropped.
                    tx.closed().await;
                });
                let body = StreamBody::new(tokio_stream_from(rx));
                let mut r = Response::new(BodyExt::boxed(body));
                r.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                r.headers_mut()
                    .insert("content-length", "5000".parse().unwrap());
                return r;
            }
            Fault::TruncateChunked => {
                let (tx, rx) =
                    tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
                tokio::spawn(async move {
                    for _ in 0..2 {
                        let chunk = Bytes::from(vec![b'c'; 1024]);
                        if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "died",
                        )))
                        .await;
                });
                let body = StreamBody::new(tokio_stream_from(rx));
                let mut r = Response::new(BodyExt::boxed(body));
                r.headers_mut()
                    .insert("content-type", "text/plain".parse().unwrap());
                return r;
            }
            Fault::Reset | Fault::Garbage => {
                unreachable!("socket-level faults are handled per connection")
            }
        }
    }
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (_, p) if p.starts_with("/echo") => echo(req).await,
        (Method::GET, "/stream") => stream(req.uri().query().unwrap_or("")),
        (_, "/upload") => upload(&state, req).await,
        (Method::GET, "/cable") => cable(req),
        (_, p) if p.starts_with("/api/v1/accounts/") => account_api(state, req).await,
        (Method::GET, "/api/v1/profile") => profile(&state, &req),
        _ => json_error(404, r#"{"error":"Resource could not be found"}"#),
    }
}

/// `GET /api/v1/profile` (Chatwoot's `ProfilesController#show`): the token's user, or the
/// answer Chatwoot gives a token it does not know.
fn profile(state: &State, req: &Request<Incoming>) -> Response<FakeBody> {
    let Some(token) = token_of(req.headers()) else {
        return json_error(
            401,
            r#"{"errors":["You need to sign in or sign up before continuing."]}"#,
        );
    };
    match state.tokens.lock().unwrap().get(&token) {
        None => json_error(401, r#"{"error":"Invalid Access Token"}"#),
        Some(TokenKind::User { name, .. }) => full(
            200,
            "application/json; charset=utf-8",
            serde_json::json!({ "id": 1, "name": name }).to_string(),
        ),
        Some(TokenKind::Bot) => full(
            200,
            "application/json; charset=utf-8",
            r#"{"id":2,"name":"bot"}"#,
        ),
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn echo(req: Request<Incoming>) -> Response<FakeBody> {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let v = serde_json::json!({
        "method": method,
        "uri": uri,
        "headers": headers,
        "body_len": body.len(),
    });
    let mut r = full(200, "application/json", v.to_string());
    r.headers_mut().insert(
        "set-cookie",
        "_chatwoot_session=abc; path=/".parse().unwrap(),
    );
    r.headers_mut()
        .insert("connection", "x-upstream-hop".parse().unwrap());
    r.headers_mut()
        .insert("x-upstream-hop", "must-not-pass".parse().unwrap());
    r
}

/// `/stream?chunks=N&delay_ms=M`: N chunks of 1 KiB, M ms apart.
fn stream(query: &str) -> Response<FakeBody> {
    let mut chunks = 5usize;
    let mut delay_ms = 100u64;
    let mut size = 1024usize;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("chunks", v)) => chunks = v.parse().unwrap_or(5),
            Some(("delay_ms", v)) => delay_ms = v.parse().unwrap_or(100),
            // Bytes per chunk (at least 4, the chunk's number).
            Some(("size", v)) => size = v.parse::<usize>().unwrap_or(1024).max(4),
            _ => {}
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    tokio::spawn(async move {
        for i in 0..chunks {
            let chunk = Bytes::from(format!("{:04}{}", i, "x".repeat(size - 4)));
            if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))));
    r.headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    r
}

/// Consumes the body chunk by chunk (never buffering it) and reports size and a checksum.
/// Progress is published in [`State::upload_progress`] as each frame arrives.
async fn upload(state: &State, req: Request<Incoming>) -> Response<FakeBody> {
    state.upload_progress.store(0, Ordering::SeqCst);
    let mut body = req.into_body();
    let mut total: u64 = 0;
    let mut sum: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    total += d.len() as u64;
                    state.upload_progress.store(total, Ordering::SeqCst);
                    for b in d.iter() {
                        sum = sum.wrapping_mul(31).wrapping_add(u64::from(*b));
                    }
                }
            }
            Err(_) => return json_error(400, r#"{"error":"body broken"}"#),
        }
    }
    full(
        200,
        "application/json",
        format!(r#"{{"bytes":{total},"checksum":{sum}}}"#),
    )
}

/// A minimal upgrade endpoint: 101, then echoes every byte back.
fn cable(mut req: Request<Incoming>) -> Response<FakeBody> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut()
        .insert("connection", "upgrade".parse().unwrap());
    r.headers_mut()
        .insert("upgrade", "websocket".parse().unwrap());
    r
}

/// Rails-like parse of `/api/v1/accounts/{a}/conversations/{c}[.json][/rest]`.
fn parse_conversation_path(path: &str) -> Option<(u64, Option<u64>, String)> {
    let rest = path.strip_prefix("/api/v1/accounts/")?;
    let mut segs = rest.split('/');
    let a: u64 = segs.next()?.parse().ok()?;
    if segs.next() != Some("conversations") {
        return Some((a, None, String::new()));
    }
    let c_seg = segs.next()?;
    let c: u64 = c_seg.trim_end_matches(".json").parse().ok()?;
    let tail: Vec<&str> = segs.collect();
    Some((a, Some(c), tail.join("/")))
}

/// The devise user a request's devise credentials name, if any.
fn devise_user_of(state: &State, h: &HeaderMap) -> Option<DeviseUser> {
    let users = state.devise_users.lock().unwrap();
    if let (Some(at), Some(uid)) = (header_str(h, "access-token"), header_str(h, "uid"))
        && let Some(u) = users.get(at)
        && u.uid == uid
    {
        return Some(u.clone());
    }
    let bearer = header_str(h, "authorization")?.strip_prefix("Bearer ")?;
    users.get(bearer).cloned()
}

async fn account_api(state: Arc<State>, req: Request<Incoming>) -> Response<FakeBody> {
    let devise = devise_user_of(&state, req.headers());
    // Chatwoot's `authenticate_by_access_token?` is `present?`.
    let token = token_of(req.headers()).filter(|t| !t.is_empty());
    let kind = match (token, &devise) {
        (None, None) => {
            return json_error(
                401,
                r#"{"errors":["You need to sign in or sign up before continuing."]}"#,
            );
        }
        (None, Some(d)) => TokenKind::User {
            name: d.name.clone(),
            allowed: d.allowed.clone(),
        },
        (Some(token), _) => {
            let kind = state.tokens.lock().unwrap().get(&token).cloned();
            let Some(kind) = kind else {
                return json_error(401, r#"{"error":"Invalid Access Token"}"#);
            };
            match &devise {
                // `set_current_user` ran first: the account check is the devise user's.
                Some(d) => TokenKind::User {
                    name: d.name.clone(),
                    allowed: d.allowed.clone(),
                },
                None => kind,
            }
        }
    };
    let path = req.uri().path().to_string();
    let Some((account, conversation, tail)) = parse_conversation_path(&path) else {
        return json_error(404, r#"{"error":"Resource could not be found"}"#);
    };
    let method = req.method().clone();
    let is_show = (method == Method::GET || method == Method::HEAD)
        && tail.is_empty()
        && conversation.is_some();
    if is_show {
        state.show_requests.fetch_add(1, Ordering::SeqCst);
    }
    let (name, allowed) = match kind {
        TokenKind::Bot if is_show => {
            return json_error(
                401,
                r#"{"error":"Access to this endpoint is not authorized for bots"}"#,
            );
        }
        TokenKind::Bot => ("bot".to_string(), None),
        TokenKind::User { name, allowed } => (name, allowed),
    };
    let Some(conversation) = conversation else {
        // Account-level endpoints: writes answer 200, reads echo a list.
        let _ = req.into_body().collect().await;
        return full(200, "application/json; charset=utf-8", r#"{"payload":[]}"#);
    };
    let conv = state
        .conversations
        .lock()
        .unwrap()
        .get(&(account, conversation))
        .cloned();
    let Some(conv) = conv else {
        return json_error(404, r#"{"error":"Resource could not be found"}"#);
    };
    if let Some(allowed) = &allowed
        && !allowed.contains(&(account, conversation))
    {
        return json_error(
            401,
            r#"{"error":"You are not authorized to do this action"}"#,
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let _ = req.into_body().collect().await;
        let next = {
            let mut map = state.conversations.lock().unwrap();
            let c = map.get_mut(&(account, conversation)).expect("present");
            c.version += 1;
            c.updated_at = bump_decimal(&c.updated_at);
            c.clone()
        };
        let body = render(account, conversation, &next, &name);
        return full(200, "application/json; charset=utf-8", body);
    }
    if !tail.is_empty() {
        return full(200, "application/json; charset=utf-8", r#"{"payload":[]}"#);
    }
    let mut conv = conv;
    if let Some(lag) = state.lag_updated_at.lock().unwrap().clone() {
        conv.updated_at = lag;
    }
    let body = render(account, conversation, &conv, &name);
    let no_etag = state.no_etag.load(Ordering::SeqCst);
    let etag = rails_etag(body.as_bytes());
    if !no_etag && header_str(req.headers(), "if-none-match") == Some(etag.as_str()) {
        let mut r = full(304, "application/json; charset=utf-8", Bytes::new());
        r.headers_mut().remove("content-type");
        r.headers_mut().insert("etag", etag.parse().unwrap());
        r.headers_mut().insert(
            "cache-control",
            "max-age=0, private, must-revalidate".parse().unwrap(),
        );
        return r;
    }
    let mut r = full(200, "application/json; charset=utf-8", body);
    if !no_etag {
        r.headers_mut().insert("etag", etag.parse().unwrap());
    }
    r.headers_mut().insert(
        "cache-control",
        "max-age=0, private, must-revalidate".parse().unwrap(),
    );
    r.headers_mut()
        .insert("x-runtime", "0.012345".parse().unwrap());
    show_knobs(&state, r).await
}

/// Applies `show_headers`, `show_post_delay`, `hold_shows` and `chunked_show` to a show `200`.
async fn show_knobs(state: &State, r: Response<FakeBody>) -> Response<FakeBody> {
    let extra = state.show_headers.lock().unwrap().clone();
    let post_delay = *state.show_post_delay.lock().unwrap();
    let chunked = state.chunked_show.load(Ordering::SeqCst);
    if !post_delay.is_zero() {
        tokio::time::sleep(post_delay).await;
    }
    while state.hold_shows.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut parts, body) = r.into_parts();
    for (k, v) in extra {
        parts.headers.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    if !chunked {
        return Response::from_parts(parts, body);
    }
    let bytes = body.collect().await.expect("full body").to_bytes();
    parts.headers.remove("content-length");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        for chunk in bytes.chunks(1024) {
            let frame = Frame::data(Bytes::copy_from_slice(chunk));
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    });
    let body = BodyExt::boxed(StreamBody::new(tokio_stream_from(rx)));
    Response::from_parts(parts, body)
}

/// Adds one second and one microsecond to a decimal timestamp text.
pub fn bump_decimal(s: &str) -> String {
    let (int, frac) = s.split_once('.').unwrap_or((s, "0"));
    let int: u64 = int.parse().unwrap_or(0);
    let frac: u64 = format!("{frac:0<6}")[..6].parse().unwrap_or(0);
    let total = int * 1_000_000 + frac + 1_000_001;
    format!("{}.{:06}", total / 1_000_000, total % 1_000_000)
}

/// The sample conversation with this id, account, `updated_at` and the viewer's marks.
pub fn render(account: u64, id: u64, conv: &Conversation, viewer: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(SAMPLE).expect("sample parses");
    v["id"] = id.into();
    v["account_id"] = account.into();
    v["updated_at"] = "__UPDATED_AT__".into();
    v["custom_attributes"]["version"] = conv.version.into();
    v["custom_attributes"]["viewer"] = viewer.into();
    v["meta"]["team"]["is_member"] = (viewer == "admin").into();
    if conv.padding > 0 {
        v["additional_attributes"]["padding"] = "p".repeat(conv.padding).into();
    }
    v.to_string()
        .replace("\"__UPDATED_AT__\"", &conv.updated_at)
}
