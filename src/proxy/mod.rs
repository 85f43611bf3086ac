//! The per-request handler: classify → check the token → cache or forward → log.
//!
//! [`Proxy::handle`] never fails: every problem becomes a response (SPEC error bodies for the
//! proxy's own answers), and every response carries `X-Cache`.

mod conversation;
mod forward;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::access_log::AccessGuard;
use crate::auth::{self, Credentials, InvalidTokens, ScopeMemo, Scoper, TokenHeader};
use crate::body::ResponseBody;
use crate::cache::flight::Flights;
use crate::cache::{CacheKey, CachePolicy, Store};
use crate::config::Config;
use crate::error::LocalError;
use crate::live::{Live, Local};
use crate::metrics::CertListener;
use crate::metrics::{AuthRejection, Metrics, XCache};
use crate::routing::{self, Route};
use crate::tls::{self, CertResolver, TlsError};
use crate::upstream::{ClientInfo, Upstream};

use crate::cache::entry::{CACHE_STATUS, set_render_slots};

/// A start-up failure building the proxy.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("no secure randomness available for the token scope key")]
    Random,
    #[error(transparent)]
    Shared(#[from] crate::shared::SharedError),
}

/// Everything a request needs, shared by all connections.
pub struct Proxy {
    /// The running configuration; a reload replaces it ([`crate::reload`]). Restart-only
    /// settings are the same in every value.
    pub config: Live<Config>,
    /// The public listener's certificate, when it terminates TLS.
    pub(crate) server_tls: Option<Arc<CertResolver>>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    /// Concurrent fetches of one key share one upstream request (SPEC 5 coalescing).
    flights: Flights<conversation::FetchResult>,
    token_header: TokenHeader,
    scoper: Scoper,
    pub(crate) invalid_tokens: InvalidTokens,
    /// `/cable` tunnels open now, at most `--max-tunnels` (SPEC §10).
    tunnels: Arc<tokio::sync::Semaphore>,
    /// `/cable` tunnels open now per client address, at most [`forward::tunnels_per_address`].
    tunnels_by_address: crate::protect::PerAddress,
    ready: AtomicBool,
    /// Webhook handling slots and replay memory (admin listener).
    pub webhooks: crate::webhook::WebhookGate,
}

/// The outcome of [`Proxy::decide`].
// The large variant is the hot one (a cache hit); boxing it would allocate on every hit.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Next {
    /// Answered locally: a refusal or a cache hit.
    Answer(Answer),
    /// Forward to the upstream (`scope` set when a token was validated, or when a well-formed
    /// token came with another credential: `mixed`, charged to it but never vouched for by the
    /// answer, since devise may have authenticated it).
    Forward {
        scope: Option<crate::auth::Scope>,
        mixed: bool,
    },
    /// The conversation route needs the upstream (miss or revalidation).
    Fetch {
        key: CacheKey,
        stored: Option<Arc<crate::cache::Entry>>,
    },
}

/// What the handler keeps per client connection.
pub struct ConnState {
    /// The last token's scope (see [`ScopeMemo`]).
    pub memo: ScopeMemo,
    /// Request starts and ends, for the connection's head deadline.
    pub activity: Arc<crate::client_io::Activity>,
    /// This connection's copy of the live cache policy: the hit path's only read of it.
    pub policy: Local<CachePolicy>,
    /// This connection's view of the live configuration, for per-request reads that must not
    /// cost more than one atomic load.
    pub config: Local<Config>,
}

impl ConnState {
    pub fn new() -> ConnState {
        ConnState {
            memo: ScopeMemo::default(),
            activity: crate::client_io::Activity::new(),
            policy: Local::default(),
            config: Local::default(),
        }
    }
}

impl Default for ConnState {
    fn default() -> Self {
        Self::new()
    }
}

/// The answer to one request: ready at once, or a future that needs the upstream.
// The large variant is the hot one (a hit); boxing it would allocate on every hit.
#[allow(clippy::large_enum_variant)]
pub enum Handled {
    Ready(std::future::Ready<Response<ResponseBody>>),
    Upstream(Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>),
}

impl Future for Handled {
    type Output = Response<ResponseBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Handled::Ready(response) => Pin::new(response).poll(cx),
            Handled::Upstream(future) => future.as_mut().poll(cx),
        }
    }
}

/// Stamps `X-Cache` on the answer and hands the access-log guard to its body, which fires it
/// when the response has really ended.
fn finish(answer: Answer, mut guard: AccessGuard, how: Delivery) -> Response<ResponseBody> {
    let Answer {
        mut response,
        cache,
        upstream_status,
    } = answer;
    // By position into a rendered entry's slot, by insert into anything else.
    set_render_slots(
        response.headers_mut(),
        Some(cache.header_value()),
        None,
        None,
    );
    guard.answered(response.status().as_u16(), cache, upstream_status);
    if how.head {
        ResponseBody::strip_for_head(&mut response);
    }
    response.body_mut().set_guard(guard);
    if how.h2 {
        response.body_mut().for_h2();
    }
    response
}

/// How an answer travels to its client.
#[derive(Clone, Copy)]
struct Delivery {
    /// On h2, a streamed body is watched for a client that stops reading it and an in-memory
    /// one is handed over in pieces (see [`ResponseBody::for_h2`]); HTTP/1.1's write deadline
    /// covers a reader that stops.
    h2: bool,
    /// A HEAD request: no body, whatever the answer (hyper strips it only on HTTP/1.1).
    head: bool,
}

impl Delivery {
    fn of<B>(req: &Request<B>) -> Delivery {
        Delivery {
            h2: req.version() == http::Version::HTTP_2,
            head: req.method() == http::Method::HEAD,
        }
    }
}

/// What a handler produced, before the access-log guard is attached.
pub(crate) struct Answer {
    pub response: Response<ResponseBody>,
    pub cache: XCache,
    pub upstream_status: Option<u16>,
}

impl Answer {
    pub fn local(err: LocalError, token_header: &str) -> Answer {
        Answer {
            response: err.response(token_header),
            cache: XCache::Local,
            upstream_status: None,
        }
    }
}

/// The cache policy a configuration asks for.
pub(crate) fn cache_policy(config: &Config) -> CachePolicy {
    CachePolicy {
        ttl: config.cache_ttl,
        stale_while_revalidate: config.stale_while_revalidate,
        stale_if_error: config.stale_if_error,
        negative_ttl: config.negative_ttl,
        max_object_bytes: config.max_object_bytes,
        refresh_ahead: crate::cache::RefreshAhead::new(
            config.cache_ttl,
            config.refresh_ahead,
            config.refresh_ahead_min_hits,
        ),
    }
}

impl Proxy {
    pub fn new(config: Config) -> Result<Arc<Proxy>, StartupError> {
        let metrics = Arc::new(Metrics::new()?);
        let dial = crate::upstream::dial(&config)?;
        metrics.set_cert_expiry(CertListener::UpstreamClient, dial.client_cert_not_after);
        let upstream = Upstream::new(&config, dial, metrics.clone())?;
        let server_tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => {
                let cert = tls::server_cert(cert, key)?;
                metrics.set_cert_expiry(CertListener::Public, cert.not_after);
                Some(CertResolver::new(cert))
            }
            _ => None,
        };
        let policy = cache_policy(&config);
        let lifetime = policy.positive_lifetime();
        let mut store = Store::new(config.cache_max_bytes, policy, metrics.clone());
        let scoper = match &config.scope_secret {
            Some(secret) => Scoper::from_secret(secret.as_bytes()),
            None => Scoper::random().map_err(|_| StartupError::Random)?,
        };
        if let (Some(redis), Some(secret)) = (&config.redis, &config.scope_secret) {
            let shared = crate::shared::Shared::new(
                redis,
                secret.as_bytes(),
                lifetime,
                config.max_object_bytes,
                config.upstream_timeout,
                &metrics,
            )?;
            store = store.with_shared(shared);
        }
        Ok(Arc::new(Proxy {
            token_header: TokenHeader::new(config.token_header.clone()),
            scoper,
            invalid_tokens: InvalidTokens::new(config.auth_negative_ttl),
            tunnels: Arc::new(tokio::sync::Semaphore::new(
                config
                    .max_tunnels
                    .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
            tunnels_by_address: crate::protect::PerAddress::default(),
            ready: AtomicBool::new(true),
            webhooks: crate::webhook::WebhookGate::new(),
            config: Live::new(config),
            server_tls,
            upstream,
            metrics,
            store,
            flights: Flights::default(),
        }))
    }

    /// The public listener's TLS config when `--tls-cert-file` is set: it serves whatever
    /// certificate the last reload loaded.
    pub fn server_tls_config(&self) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
        match &self.server_tls {
            Some(resolver) => Ok(Some(Arc::new(resolver.server_config()?))),
            None => Ok(None),
        }
    }

    /// Readiness for `/readyz`: false from SIGTERM on.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn token_header_name(&self) -> &str {
        self.token_header.name().as_str()
    }

    /// Handles one request on the public listener.
    ///
    /// Everything the proxy can answer without the upstream (token refusals, cache hits,
    /// stale-while-revalidate) is decided synchronously by [`Proxy::decide`] and comes back as
    /// a ready [`Handled`]: no future is built, moved or boxed and the proxy's `Arc` is not
    /// cloned for a hit.
    /// Only requests that need the upstream get a (boxed) future.
    pub fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        client: ClientInfo,
        conn: &ConnState,
    ) -> Handled {
        let start = Instant::now();
        // Behind a trusted proxy the client address is the request's, not the connection's.
        let client = if client.trusted_peer {
            conn.config.with(&self.config, |config| {
                client.for_request(req.headers(), &config.trusted_proxies)
            })
        } else {
            client
        };
        let route = routing::classify(req.method(), req.uri().path(), req.uri().query().is_some());
        // Created first, so a request dropped mid-way (client gone) is still logged (and its
        // connection's head deadline resumes).
        let guard = AccessGuard::start(
            &req,
            route.label(),
            start,
            self.metrics.clone(),
            conn.activity.clone(),
        );
        match self.decide(route, &req, client, conn, start) {
            Next::Answer(answer) => Handled::Ready(std::future::ready(finish(
                answer,
                guard,
                Delivery::of(&req),
            ))),
            Next::Forward { scope, mixed } => {
                let proxy = self.clone();
                let how = Delivery::of(&req);
                Handled::Upstream(Box::pin(async move {
                    let answer = proxy.forward(req, client, route, scope, mixed).await;
                    finish(answer, guard, how)
                }))
            }
            Next::Fetch { key, stored } => {
                let proxy = self.clone();
                let how = Delivery::of(&req);
                Handled::Upstream(Box::pin(async move {
                    let answer = proxy.conversation_upstream(key, req, client, stored).await;
                    finish(answer, guard, how)
                }))
            }
        }
    }

    /// What to do with a request, decided without awaiting anything.
    fn decide(
        self: &Arc<Self>,
        route: Route,
        req: &Request<Incoming>,
        client: ClientInfo,
        conn: &ConnState,
        now: Instant,
    ) -> Next {
        if req.method() == Method::CONNECT {
            return Next::Answer(Answer::local(
                LocalError::MethodNotAllowed,
                self.token_header_name(),
            ));
        }
        if route == Route::Other {
            return Next::Forward {
                scope: None,
                mixed: false,
            };
        }
        let scope = match auth::inspect(req.headers(), req.uri().query(), &self.token_header) {
            Credentials::Alternate => {
                let scope = auth::token_beside(req.headers(), &self.token_header)
                    .map(|v| conn.memo.scope(&self.scoper, v.as_bytes()));
                return Next::Forward { scope, mixed: true };
            }
            Credentials::Missing => {
                return Next::Answer(self.reject(LocalError::MissingToken, AuthRejection::Missing));
            }
            Credentials::Malformed => {
                return Next::Answer(
                    self.reject(LocalError::MalformedToken, AuthRejection::Malformed),
                );
            }
            Credentials::Token(value) => conn.memo.scope(&self.scoper, value.as_bytes()),
        };
        if self.invalid_tokens.contains(scope) {
            return Next::Answer(self.reject(LocalError::InvalidToken, AuthRejection::Invalid));
        }
        match route {
            Route::Conversation {
                account,
                conversation,
            } => {
                let key = CacheKey {
                    account,
                    conversation,
                    scope,
                };
                let policy = conn.policy.get(&self.store.policy);
                self.conversation_local(key, req, client, now, policy)
            }
            _ => Next::Forward {
                scope: Some(scope),
                mixed: false,
            },
        }
    }

    fn reject(&self, err: LocalError, reason: AuthRejection) -> Answer {
        self.metrics.auth_rejection(reason);
        Answer::local(err, self.token_header_name())
    }
}
