//! The upstream side: a pool of HTTP/1.1 connections (plain or TLS, [`pool`]), request and
//! response header rewriting (hop-by-hop removal, `X-Forwarded-*`, `Host`), and
//! [`Upstream::send`], which runs every upstream exchange through the breaker, the concurrency
//! limit, deadlines and metrics.

pub mod forwarded;
pub mod pool;

pub use forwarded::{ClientInfo, TrustedProxies};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderName};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{BoxError, Progress, RequestBody};
use crate::config::{Config, UpstreamUrl};
use crate::error::LocalError;
use crate::hop_by_hop::is_hop_by_hop;
use crate::live::Live;
use crate::metrics::{Metrics, ShedReason};
use crate::protect::{
    self, AcceptedTokens, Admission, Breaker, BreakerConfig, Charge, Limiter, Outcome, RateLimiter,
    Shed, Ticket, UpstreamPermit,
};
use crate::routing::RouteLabel;
use crate::tls::{self, TlsError};
use forwarded::{
    Forwarded, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, forwarded_values,
};
use pool::{Pool, PoolError, PooledBody};

/// Why an upstream exchange produced no usable response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(String),
    /// `--upstream-timeout` ran out; the phase says whether the upstream never answered or
    /// stalled in the middle of its body (a connect timeout is a [`UpstreamError::Connect`]).
    #[error("upstream timed out {0} (--upstream-timeout)")]
    Timeout(TimeoutPhase),
    #[error("invalid upstream response: {0}")]
    BadResponse(String),
    #[error("shed: no upstream slot within the queue timeout")]
    Shed,
    /// The request's scope held its whole share of upstream slots for the queue timeout.
    #[error("shed: the token's share of upstream slots stayed taken")]
    TokenQuota,
    /// The request's scope is over `--rate-limit-per-token`.
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    #[error("circuit breaker open")]
    BreakerOpen { retry_after: Duration },
    /// The client's request body stalled or broke off: the client's doing, not the upstream's.
    #[error("the client abandoned its upload")]
    ClientAborted,
}

/// Where in an exchange `--upstream-timeout` ran out (logged, so an operator can tell a hung
/// upstream from a slow download).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// The request went out (or was going out); no response head came back.
    ResponseHead,
    /// The response head came; its body stalled.
    ResponseBody,
}

impl std::fmt::Display for TimeoutPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeoutPhase::ResponseHead => "waiting for the response headers",
            TimeoutPhase::ResponseBody => "reading the response body",
        })
    }
}

impl UpstreamError {
    /// The local answer SPEC §4/§6 assigns.
    pub fn to_local(&self) -> LocalError {
        match self {
            UpstreamError::Connect(_) | UpstreamError::BadResponse(_) => LocalError::BadGateway,
            UpstreamError::Timeout(_) => LocalError::Timeout,
            UpstreamError::ClientAborted => LocalError::RequestTimeout,
            UpstreamError::Shed | UpstreamError::TokenQuota => {
                LocalError::Unavailable { retry_after: 1 }
            }
            UpstreamError::BreakerOpen { retry_after } => LocalError::Unavailable {
                retry_after: protect::retry_after_secs(*retry_after),
            },
            UpstreamError::RateLimited { retry_after } => LocalError::RateLimited {
                retry_after: protect::retry_after_secs(*retry_after),
            },
        }
    }

    /// The `fwd-status` a stale answer reports for this failure.
    pub fn fwd_status(&self) -> u16 {
        self.to_local().status().as_u16()
    }

    /// Whether the request was kept from the upstream (no upstream request was made).
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            UpstreamError::Shed
                | UpstreamError::TokenQuota
                | UpstreamError::RateLimited { .. }
                | UpstreamError::BreakerOpen { .. }
        )
    }
}

/// A response whose headers arrived; the permit must travel with its body.
pub struct Exchange {
    pub response: Response<PooledBody>,
    pub permit: Option<UpstreamPermit>,
    /// When the caller asked to judge the exchange after reading the body (see
    /// [`Upstream::send`]): finish it with [`Completion::finish`]. Dropping it counts the
    /// exchange as its headers said.
    pub completion: Option<Completion>,
}

/// An exchange whose outcome (breaker, metrics) waits until its body has been read, so that a
/// body that breaks or stalls after good headers counts as the failure it is.
pub struct Completion {
    ticket: Option<Ticket>,
    route: RouteLabel,
    start: Instant,
    status: StatusCode,
    header_outcome: Outcome,
    breaker: Arc<Breaker>,
    metrics: Arc<Metrics>,
}

impl Completion {
    /// Records the exchange: `Ok` if the body arrived whole, else the body's failure.
    pub fn finish(mut self, body: Result<(), &UpstreamError>) {
        let outcome = match body {
            Ok(()) => self.header_outcome,
            Err(e) => {
                tracing::warn!(route = self.route.as_str(), error = %e, "upstream body failed");
                Outcome::Failure { retry_after: None }
            }
        };
        self.record(outcome, body.is_ok());
    }

    fn record(&mut self, outcome: Outcome, body_ok: bool) {
        if let Some(ticket) = self.ticket.take() {
            let status = body_ok.then_some(self.status.as_u16());
            self.metrics
                .observe_upstream(self.route, status, self.start.elapsed().as_secs_f64());
            self.breaker.record(ticket, outcome);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let outcome = self.header_outcome;
        self.record(outcome, true);
    }
}

/// How [`Upstream::send`] treats one request.
#[derive(Debug, Clone, Copy)]
pub struct SendOptions<'a> {
    /// The route label of the upstream metrics.
    pub route: RouteLabel,
    /// Who the upstream slot is charged to (SPEC 12).
    pub charge: Charge,
    /// Lets a still-uploading request body extend the deadline (pass-through uploads).
    pub progress: Option<&'a Arc<Progress>>,
    /// An HTTP/1.1 upgrade: the slot is released once the upstream switched protocols.
    pub upgrade: bool,
    /// The breaker and the upstream metrics hear about the exchange only when the returned
    /// [`Completion`] is finished (after the caller read the body).
    pub defer_outcome: bool,
    /// A `2xx`/`304` proves the charged token valid (SPEC 12); false when another credential
    /// came with it (devise may have authenticated the request, not the token).
    pub vouches: bool,
}

impl<'a> SendOptions<'a> {
    /// A plain request: no upload progress, no upgrade, outcome recorded at the headers.
    pub fn new(route: RouteLabel, charge: Charge) -> SendOptions<'a> {
        SendOptions {
            route,
            charge,
            progress: None,
            upgrade: false,
            defer_outcome: false,
            vouches: true,
        }
    }
}

/// The upstream reserved for background work (refresh-ahead): a breaker admission taken
/// while closed and a slot taken at once. Dropped unused, it releases both.
pub struct Reserved {
    ticket: Ticket,
    permit: UpstreamPermit,
    charge: Charge,
}

impl Reserved {
    /// Who the reserved slot is charged to.
    pub fn charge(&self) -> Charge {
        self.charge
    }
}

/// An admitted request on its way to the upstream: what is needed to record its outcome.
struct Sent {
    route: RouteLabel,
    /// Its token, recorded as accepted by a `2xx`/`304` (SPEC 12).
    token: Option<crate::auth::Scope>,
    ticket: Ticket,
    permit: UpstreamPermit,
    start: Instant,
    upgrade: bool,
    defer_outcome: bool,
}

impl Sent {
    /// Records the exchange (now, or through a [`Completion`]) and hands out its response.
    fn conclude(
        self,
        breaker: &Arc<Breaker>,
        metrics: &Arc<Metrics>,
        accepted: &AcceptedTokens,
        upstream: &Authority,
        result: Result<Response<PooledBody>, UpstreamError>,
        progress: Option<&Progress>,
    ) -> Result<Exchange, UpstreamError> {
        let Sent {
            route,
            token,
            ticket,
            permit,
            start,
            upgrade,
            defer_outcome,
        } = self;
        let elapsed = start.elapsed().as_secs_f64();
        match result {
            Ok(response) => {
                let status = response.status();
                if let Some(token) = token
                    && (status.is_success() || status == StatusCode::NOT_MODIFIED)
                {
                    accepted.accept(token);
                }
                let outcome = breaker_outcome(status, response.headers());
                // An upgraded tunnel may live for hours; it must not hold a request slot.
                let permit = (!upgrade).then_some(permit);
                let completion = if defer_outcome {
                    Some(Completion {
                        ticket: Some(ticket),
                        route,
                        start,
                        status,
                        header_outcome: outcome,
                        breaker: breaker.clone(),
                        metrics: metrics.clone(),
                    })
                } else {
                    metrics.observe_upstream(route, Some(status.as_u16()), elapsed);
                    breaker.record(ticket, outcome);
                    None
                };
                Ok(Exchange {
                    response,
                    permit,
                    completion,
                })
            }
            Err(e) if progress.is_some_and(|p| p.client_failed()) => {
                // The client's own upload broke (stalled or cut off): says nothing about the
                // upstream, so the breaker does not hear of it (a probe is released).
                metrics.observe_upstream(route, None, elapsed);
                drop(ticket);
                tracing::info!(route = route.as_str(), error = %e, "client upload abandoned");
                Err(UpstreamError::ClientAborted)
            }
            Err(e) => {
                metrics.observe_upstream(route, None, elapsed);
                breaker.record(ticket, Outcome::Failure { retry_after: None });
                // The host and port (never credentials: --upstream refuses them) and the whole
                // cause chain down to the OS error, so "connect failed" says what failed where.
                tracing::warn!(
                    route = route.as_str(),
                    upstream = %upstream,
                    error = %e,
                    "upstream request failed"
                );
                Err(e)
            }
        }
    }
}

/// Sends `req` on the pool and waits for its response head, within the upstream deadline.
async fn await_response(
    pool: &Arc<Pool>,
    timeout: Duration,
    req: Request<RequestBody>,
    upgrade: bool,
    start: Instant,
    progress: Option<&Progress>,
) -> Result<Response<PooledBody>, UpstreamError> {
    // Built here rather than passed in, so the exchange future is not moved once more.
    let fut = pool.send(req, upgrade);
    tokio::pin!(fut);
    let mut deadline = start + timeout;
    loop {
        tokio::select! {
            res = &mut fut => return res.map_err(classify_client_error),
            _ = tokio::time::sleep_until(deadline) => {
                // A request body still uploading (or finished recently) moves the deadline:
                // the timeout measures upstream silence, not the size of the upload.
                match progress {
                    Some(p) if p.last() + timeout > Instant::now() => {
                        deadline = p.last() + timeout;
                    }
                    _ => return Err(UpstreamError::Timeout(TimeoutPhase::ResponseHead)),
                }
            }
        }
    }
}

/// Makes new upstream connections: TCP (+ TLS for `https://`) under one deadline over both
/// (hyper's connect timeout covers TCP only). What it dials with is live: a reload swaps the
/// TLS settings (CA, client certificate) and the deadline for connections made afterwards;
/// pooled connections keep what they were made with.
#[derive(Clone)]
pub struct Connector {
    dial: Arc<Live<Dial>>,
}

impl Connector {
    pub fn new(dial: Dial) -> Connector {
        Connector {
            dial: Arc::new(Live::new(dial)),
        }
    }
}

/// The connector's settings.
pub struct Dial {
    https: HttpsConnector<HttpConnector>,
    timeout: Duration,
    /// The client certificate's expiry (Unix seconds), when one is presented.
    pub client_cert_not_after: Option<i64>,
}

/// The connect deadline elapsed: in the TCP connect, or for `https://` in it or the TLS
/// handshake (one deadline covers both).
#[derive(Debug, thiserror::Error)]
#[error("{phase} timed out after {timeout:?} (--upstream-connect-timeout)")]
pub struct ConnectTimeout {
    phase: &'static str,
    timeout: Duration,
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<MaybeHttpsStream<TokioIo<TcpStream>>, BoxError>> + Send>>;

impl tower::Service<Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // hyper-util's HttpConnector (and the TLS wrapper around it) is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dial = self.dial.load();
        let phase = if uri.scheme_str() == Some("https") {
            "TCP connect or TLS handshake"
        } else {
            "TCP connect"
        };
        let fut = dial.https.clone().call(uri);
        let timeout = dial.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(Box::new(ConnectTimeout { phase, timeout }) as BoxError),
            }
        })
    }
}

/// The upstream: where it is, how to reach it, and what protects it.
pub struct Upstream {
    pool: Arc<Pool>,
    url: UpstreamUrl,
    host: HeaderValue,
    /// Never dropped as hop-by-hop: the proxy validated and scoped on it.
    token_header: crate::auth::TokenHeader,
    dial: Arc<Live<Dial>>,
    timeout: Live<Duration>,
    limiter: Limiter,
    /// Tokens charged as their own scope (see [`Charge::key`]).
    accepted: Arc<AcceptedTokens>,
    /// `--rate-limit-per-token`, when set (live: a reload with other values replaces it).
    rate: Live<Option<RateLimiter>>,
    breaker: Arc<Breaker>,
    metrics: Arc<Metrics>,
}

/// The rate limiter `cfg` asks for, if any.
fn rate_limiter(cfg: &Config) -> Option<RateLimiter> {
    cfg.rate_limit()
        .map(|(rate, burst)| RateLimiter::new(rate, burst))
}

fn breaker_config(cfg: &Config) -> BreakerConfig {
    BreakerConfig {
        window: cfg.breaker_window,
        min_requests: cfg.breaker_min_requests,
        failure_ratio: cfg.breaker_failure_ratio,
        open: cfg.breaker_open,
    }
}

/// Below Puma's 20 s `persistent_timeout`, so the proxy never reuses a connection the app
/// server is about to close (a race that shows up as sporadic 502s).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// TCP (+ TLS for `https://`) to the upstream, HTTP/1.1 only (ALPN offers no h2: the pool
/// speaks HTTP/1.1, like nginx's `proxy_pass`). Reads the CA and client certificate files, so
/// a reload calls it before changing anything.
pub fn dial(cfg: &Config) -> Result<Dial, TlsError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.upstream_connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let identity = match (
        &cfg.upstream_client_cert_file,
        &cfg.upstream_client_key_file,
    ) {
        (Some(cert), Some(key)) => Some(tls::client_identity(cert, key)?),
        _ => None,
    };
    let tls = tls::client_config(cfg.upstream_ca_file.as_deref(), identity.as_ref())?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Dial {
        https,
        timeout: cfg.upstream_connect_timeout,
        client_cert_not_after: identity.and_then(|i| i.not_after),
    })
}

impl Upstream {
    pub fn new(cfg: &Config, connect: Dial, metrics: Arc<Metrics>) -> Result<Upstream, TlsError> {
        let host = HeaderValue::from_str(cfg.upstream.authority.as_str())
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let dial = Uri::builder()
            .scheme(cfg.upstream.scheme.clone())
            .authority(cfg.upstream.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let connect = Arc::new(Live::new(connect));
        Ok(Upstream {
            pool: Pool::new(
                Connector {
                    dial: connect.clone(),
                },
                dial,
                cfg.upstream_max_in_flight.min(1024),
                POOL_IDLE_TIMEOUT,
            ),
            url: cfg.upstream.clone(),
            host,
            token_header: crate::auth::TokenHeader::new(cfg.token_header.clone()),
            dial: connect,
            timeout: Live::new(cfg.upstream_timeout),
            limiter: Limiter::new(
                cfg.upstream_max_in_flight,
                cfg.per_token_in_flight(),
                cfg.upstream_queue_timeout,
                metrics.upstream_in_flight.clone(),
            ),
            accepted: Arc::new(AcceptedTokens::default()),
            rate: Live::new(rate_limiter(cfg)),
            breaker: Breaker::new(breaker_config(cfg), metrics.breaker_state.clone()),
            metrics,
        })
    }

    /// Applies a reloaded configuration: deadlines, limits and breaker settings for requests
    /// that start afterwards, `dial` for connections made afterwards.
    pub fn reconfigure(&self, cfg: &Config, dial: Dial) {
        self.dial.store(dial);
        self.timeout.store(cfg.upstream_timeout);
        self.limiter.reconfigure(
            cfg.upstream_max_in_flight,
            cfg.per_token_in_flight(),
            cfg.upstream_queue_timeout,
        );
        self.breaker.reconfigure(breaker_config(cfg));
        // Buckets are kept unless the rate or burst changed.
        let rate = self.rate.load();
        if rate.as_ref().as_ref().map(RateLimiter::settings) != cfg.rate_limit() {
            self.rate.store(rate_limiter(cfg));
        }
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub fn timeout(&self) -> Duration {
        *self.timeout.load()
    }

    /// The origin-form upstream request target for a client request's path and query (the
    /// upstream's base path in front).
    pub fn uri_for(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = match (self.url.base_path.is_empty(), pq) {
            (true, Some(pq)) => pq.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, pq) => PathAndQuery::try_from(format!(
                "{}{}",
                self.url.base_path,
                pq.map_or("/", |p| p.as_str())
            ))?,
        };
        Ok(Uri::from(pq))
    }

    /// Sends one request through breaker → limiter → breaker re-check → client, with the
    /// upstream deadline; [`SendOptions`] says how (and who is charged for the slot).
    ///
    /// The half-open probe runs in a task of its own: only the upstream decides a probe
    /// (SPEC §6), so a client that hangs up does not cancel it, and its outcome is recorded
    /// whether or not anyone still waits for it.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        opts: SendOptions<'_>,
    ) -> Result<Exchange, UpstreamError> {
        let charge = opts.charge;
        let key = charge.key(&self.accepted);
        // A request with a token is held to its scope's rate (SPEC 12) before anything else,
        // so a limited request never becomes the breaker's probe nor waits for a slot.
        if charge.token.is_some()
            && let Some(rate) = &*self.rate.load()
            && let Err(retry_after) = rate.check(key)
        {
            self.metrics.shed(ShedReason::RateLimited);
            return Err(UpstreamError::RateLimited { retry_after });
        }
        // A request whose client is still uploading is never the probe (see
        // `Breaker::admit_for`): the probe's answer must depend on the upstream alone.
        let may_probe = http_body::Body::is_end_stream(req.body());
        let ticket = match self.breaker.admit_for(may_probe) {
            Admission::Allowed(t) => t,
            Admission::Rejected { retry_after } => {
                self.metrics.shed(ShedReason::BreakerOpen);
                return Err(UpstreamError::BreakerOpen { retry_after });
            }
        };
        let permit = match self.limiter.acquire(key).await {
            Ok(p) => p,
            Err(Shed::QueueTimeout) => {
                self.metrics.shed(ShedReason::QueueTimeout);
                return Err(UpstreamError::Shed);
            }
            Err(Shed::TokenQuota) => {
                self.metrics.shed(ShedReason::TokenQuota);
                return Err(UpstreamError::TokenQuota);
            }
        };
        // The breaker may have opened while this request waited for a slot (behind the very
        // failures that opened it): then it must not go out now, except as the probe.
        let ticket = match self.breaker.recheck_for(ticket, may_probe) {
            Admission::Allowed(t) => t,
            Admission::Rejected { retry_after } => {
                self.metrics.shed(ShedReason::BreakerOpen);
                return Err(UpstreamError::BreakerOpen { retry_after });
            }
        };
        self.exchange(req, ticket, permit, opts).await
    }

    /// Reserves the upstream for background work that must yield to client requests (SPEC 12
    /// refresh-ahead): only while the breaker is closed (never a probe), only a slot free at
    /// once outside the last quarter of the slots, within the scope's cap, and only while the
    /// scope's rate has headroom (not charged to it: a refresh is no client request). `None`:
    /// skip the work.
    pub fn reserve_background(&self, charge: Charge) -> Option<Reserved> {
        let key = charge.key(&self.accepted);
        let ticket = self.breaker.admit_if_closed()?;
        let permit = self.limiter.try_acquire_background(key)?;
        if charge.token.is_some()
            && let Some(rate) = &*self.rate.load()
            && !rate.has_headroom(key)
        {
            return None;
        }
        Some(Reserved {
            ticket,
            permit,
            charge,
        })
    }

    /// Sends a request on an upstream reserved with [`Upstream::reserve_background`].
    pub async fn send_reserved(
        &self,
        req: Request<RequestBody>,
        reserved: Reserved,
        opts: SendOptions<'_>,
    ) -> Result<Exchange, UpstreamError> {
        let Reserved { ticket, permit, .. } = reserved;
        // The breaker may have opened since the reservation (a shared-tier read lies between):
        // background work never goes out while it is not closed (SPEC 12).
        // Skipped like a reservation refused (no client request was shed).
        let Some(ticket) = self.breaker.recheck_if_closed(ticket) else {
            return Err(UpstreamError::BreakerOpen {
                retry_after: Duration::ZERO,
            });
        };
        self.exchange(req, ticket, permit, opts).await
    }

    /// The exchange of an admitted request holding its slot.
    async fn exchange(
        &self,
        req: Request<RequestBody>,
        ticket: Ticket,
        permit: UpstreamPermit,
        opts: SendOptions<'_>,
    ) -> Result<Exchange, UpstreamError> {
        let SendOptions {
            route,
            charge,
            progress,
            upgrade,
            defer_outcome,
            vouches,
        } = opts;
        let sent = Sent {
            route,
            token: charge.token.filter(|_| vouches),
            ticket,
            permit,
            start: Instant::now(),
            upgrade,
            defer_outcome,
        };
        if sent.ticket.is_probe() {
            let pool = self.pool.clone();
            let timeout = self.timeout();
            let progress = progress.cloned();
            let breaker = self.breaker.clone();
            let metrics = self.metrics.clone();
            let accepted = self.accepted.clone();
            let authority = self.url.authority.clone();
            let probe = tokio::spawn(async move {
                let result = await_response(
                    &pool,
                    timeout,
                    req,
                    upgrade,
                    sent.start,
                    progress.as_deref(),
                )
                .await;
                sent.conclude(
                    &breaker,
                    &metrics,
                    &accepted,
                    &authority,
                    result,
                    progress.as_deref(),
                )
            });
            return probe
                .await
                .unwrap_or_else(|e| Err(UpstreamError::BadResponse(format!("probe task: {e}"))));
        }
        let progress = progress.map(|p| &**p);
        let result = await_response(
            &self.pool,
            self.timeout(),
            req,
            upgrade,
            sent.start,
            progress,
        )
        .await;
        sent.conclude(
            &self.breaker,
            &self.metrics,
            &self.accepted,
            &self.url.authority,
            result,
            progress,
        )
    }

    /// The upstream refused this token: it is charged to its client address again.
    pub fn forget_token(&self, scope: crate::auth::Scope) {
        self.accepted.forget(scope);
    }

    /// The upstream slots (tests, diagnostics).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Builds the upstream request: same method, path, query and end-to-end headers in order;
    /// hop-by-hop headers dropped; `X-Forwarded-*` set; `Host` = upstream authority. Copies the
    /// client's headers (see [`Upstream::request_owned`] for the pass-through fast path).
    pub fn request(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        client: &ClientInfo,
        upgrade: bool,
        body: RequestBody,
    ) -> Result<Request<RequestBody>, http::Error> {
        let forwarded = forwarded_values(uri, headers, client);
        let mut h = HeaderMap::with_capacity(headers.len() + 4);
        copy_end_to_end(headers, &mut h, upgrade, &self.token_header);
        self.finish_request(method, uri, h, forwarded, upgrade, body)
    }

    /// As [`Upstream::request`], taking the client's headers by value: when they hold nothing
    /// hop-by-hop (the usual case) they are rewritten in place — `Host` and `X-Forwarded-*`
    /// replaced where they stand, order kept — instead of copied into a new map.
    pub fn request_owned(
        &self,
        method: &Method,
        uri: &Uri,
        headers: HeaderMap,
        client: &ClientInfo,
        upgrade: bool,
        body: RequestBody,
    ) -> Result<Request<RequestBody>, http::Error> {
        if upgrade || headers.keys().any(is_hop_by_hop) {
            return self.request(method, uri, &headers, client, upgrade, body);
        }
        let forwarded = forwarded_values(uri, &headers, client);
        self.finish_request(method, uri, headers, forwarded, upgrade, body)
    }

    fn finish_request(
        &self,
        method: &Method,
        uri: &Uri,
        mut h: HeaderMap,
        forwarded: Forwarded,
        upgrade: bool,
        body: RequestBody,
    ) -> Result<Request<RequestBody>, http::Error> {
        let target = self.uri_for(uri.path_and_query())?;
        h.insert(header::HOST, self.host.clone());
        match forwarded.for_ {
            Some(v) => h.insert(X_FORWARDED_FOR.clone(), v),
            None => h.remove(&X_FORWARDED_FOR),
        };
        h.insert(X_FORWARDED_PROTO.clone(), forwarded.proto);
        match forwarded.host {
            Some(v) => h.insert(X_FORWARDED_HOST.clone(), v),
            None => h.remove(&X_FORWARDED_HOST),
        };
        if upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let mut out = Request::builder()
            .method(method.clone())
            .uri(target)
            .version(Version::HTTP_11)
            .body(body)?;
        *out.headers_mut() = h;
        Ok(out)
    }
}

/// Whether `name` is listed in any `Connection` header of `headers`.
fn named_in_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(name.as_str()))
        })
    })
}

/// Copies end-to-end headers in order. For an upgrade, `Upgrade` itself is kept.
/// `Host` and the `X-Forwarded-*` trio are left to the caller. The token header is never
/// dropped, even when a `Connection` header names it: the proxy validated and scoped the
/// request on it, so Chatwoot must authenticate the same value.
pub fn copy_end_to_end(
    from: &HeaderMap,
    to: &mut HeaderMap,
    keep_upgrade: bool,
    token: &crate::auth::TokenHeader,
) {
    let has_connection = from.contains_key(header::CONNECTION);
    to.reserve(from.len() + 4);
    for (name, value) in from {
        if name == header::HOST
            || name == X_FORWARDED_FOR
            || name == X_FORWARDED_PROTO
            || name == X_FORWARDED_HOST
        {
            continue;
        }
        let kept_upgrade = keep_upgrade && name == header::UPGRADE;
        if kept_upgrade {
            to.append(name.clone(), value.clone());
            continue;
        }
        if is_hop_by_hop(name)
            || (has_connection && named_in_connection(from, name) && !token.matches(name))
        {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// Removes hop-by-hop headers from an upstream response in place (keeping `Upgrade` and
/// `Connection` on a 101, which the client needs to complete the switch).
pub fn strip_response_hop_by_hop(status: StatusCode, headers: &mut HeaderMap) {
    // Most responses carry none: one pass over the names beats eight hashed removals.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let named: Vec<HeaderName> = if headers.contains_key(header::CONNECTION) && !switching {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    // The listed names come from the one list (`crate::hop_by_hop`); a 101 keeps the two
    // the switch needs.
    let listed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            is_hop_by_hop(n) && !(switching && (*n == header::CONNECTION || *n == header::UPGRADE))
        })
        .cloned()
        .collect();
    for n in named.iter().chain(&listed) {
        headers.remove(n);
    }
}

/// A message's `Content-Length`, if present and valid.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Whether an upstream answer counts against the breaker.
fn breaker_outcome(status: StatusCode, headers: &HeaderMap) -> Outcome {
    match status.as_u16() {
        // Rack-attack throttling one client (SPEC §6): never a failure.
        429 => Outcome::Throttled,
        503 => Outcome::Failure {
            retry_after: protect::parse_retry_after(headers),
        },
        500 | 502 | 504 => Outcome::Failure { retry_after: None },
        _ => Outcome::Success,
    }
}

/// Whether an upstream status is a failure for stale-if-error purposes (5xx, 429).
pub fn is_failure_status(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

fn classify_client_error(e: PoolError) -> UpstreamError {
    let detail = error_chain(&e);
    if e.is_connect() {
        UpstreamError::Connect(detail)
    } else {
        UpstreamError::BadResponse(detail)
    }
}

/// hyper's errors keep their cause out of Display; walk the chain for logs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> crate::auth::TokenHeader {
        crate::auth::TokenHeader::new(HeaderName::from_static("api_access_token"))
    }

    #[test]
    fn the_token_header_survives_being_named_in_connection() {
        let mut from = HeaderMap::new();
        from.insert("connection", "api_access_token".parse().unwrap());
        from.insert("api_access_token", "t".parse().unwrap());
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to, false, &tok());
        assert_eq!(to["api_access_token"], "t");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let mut from = HeaderMap::new();
        from.insert("connection", "keep-alive, x-secret-hop".parse().unwrap());
        from.insert("x-secret-hop", "1".parse().unwrap());
        from.insert("keep-alive", "timeout=5".parse().unwrap());
        from.insert("te", "trailers".parse().unwrap());
        from.insert("x-forwarded-proto", "spoofed".parse().unwrap());
        from.insert("accept", "application/json".parse().unwrap());
        from.insert("upgrade", "websocket".parse().unwrap());
        from.append("connection", "upgrade".parse().unwrap());
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to, false, &tok());
        assert_eq!(to.len(), 1);
        assert_eq!(to["accept"], "application/json");
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to, true, &tok());
        assert_eq!(to["upgrade"], "websocket");
    }

    #[test]
    fn response_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("etag", "W/\"x\"".parse().unwrap());
        strip_response_hop_by_hop(StatusCode::OK, &mut h);
        assert_eq!(h.len(), 1);
        let mut h = HeaderMap::new();
        h.insert("connection", "upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        strip_response_hop_by_hop(StatusCode::SWITCHING_PROTOCOLS, &mut h);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn breaker_classification() {
        let h = HeaderMap::new();
        assert_eq!(breaker_outcome(StatusCode::OK, &h), Outcome::Success);
        assert_eq!(breaker_outcome(StatusCode::NOT_FOUND, &h), Outcome::Success);
        assert_eq!(
            breaker_outcome(StatusCode::UNAUTHORIZED, &h),
            Outcome::Success
        );
        assert!(matches!(
            breaker_outcome(StatusCode::BAD_GATEWAY, &h),
            Outcome::Failure { .. }
        ));
        assert_eq!(
            breaker_outcome(StatusCode::TOO_MANY_REQUESTS, &h),
            Outcome::Throttled
        );
        assert_eq!(
            breaker_outcome(StatusCode::NOT_IMPLEMENTED, &h),
            Outcome::Success
        );
    }
}
