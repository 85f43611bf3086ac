//! The conversation route (SPEC §5): answer from the store when allowed, otherwise fetch or
//! revalidate through a single flight, and fall back to stale data when the upstream fails.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::{Answer, Next, Proxy};
use crate::body::{RequestBody, ResponseBody, UpstreamBody};
use crate::cache::admission::{
    self, Admission, Admit, Confirmed, Pass, admit_oversized, is_encoded, is_upstream_failure,
};
use crate::cache::coding::{self, Coding};
use crate::cache::flight::Role;
use crate::cache::{
    CacheKey, CachePolicy, Entry, Freshness, IdentitySlot, SharedFetch, SharedRead, Store,
};
use crate::invalidation::Stamp;
use crate::metrics::{RevalidationOutcome, XCache};
use crate::protect::Charge;
use crate::routing::RouteLabel;
use crate::upstream::{
    ClientInfo, Reserved, SendOptions, UpstreamError, content_length, strip_response_hop_by_hop,
};

/// The outcome of one upstream fetch on the conversation route, shared by every waiter.
pub enum FetchResult {
    /// An entry to render: freshly stored, refreshed by revalidation, or kept.
    Entry {
        entry: Arc<Entry>,
        xcache: XCache,
        /// The upstream status of the exchange (200, 304, 404 …).
        fwd_status: u16,
        /// `Cache-Status` detail, e.g. `older-upstream`.
        detail: Option<&'static str>,
        /// Whether the store kept it (`Cache-Status: stored`).
        stored: bool,
        /// The identity copy all waiters share (see [`IdentitySlot`]).
        identity: IdentitySlot,
    },
    /// An upstream answer that is not stored; forwarded as is.
    Forward(Forwarded),
    /// A fresh entry another replica stored (the shared tier), now in L1 too.
    Shared {
        entry: Arc<Entry>,
        identity: IdentitySlot,
    },
    /// A 200 over `--max-object-bytes`: streamed to the first taker only.
    TooLarge(std::sync::Mutex<Option<LargeBody>>),
    /// No usable upstream answer.
    Failed(UpstreamError),
}

/// How a fetch reaches the upstream.
enum Via {
    /// Like any client request: rate-limited, queued for a slot, charged to this scope.
    Request(Charge),
    /// Refresh-ahead, on a slot and breaker admission reserved beforehand (never queued).
    RefreshAhead(Reserved),
}

/// What a fetch is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Miss,
    /// `revalidations_total`.
    Revalidation,
    /// `revalidations_total` and `refresh_ahead_total`.
    RefreshAhead,
}

/// A complete upstream answer held in memory.
pub struct Forwarded {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An oversized upstream answer, already partly read.
pub struct LargeBody {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: UpstreamBody,
}

impl Proxy {
    /// The conversation route as far as the store can answer it: a fresh entry (`HIT`), a
    /// stale one within stale-while-revalidate (`STALE`, with one background revalidation), or
    /// one whose revalidation just failed (stale-if-error during the failure backoff).
    /// Anything else needs the upstream: [`Next::Fetch`].
    pub(crate) fn conversation_local(
        self: &Arc<Self>,
        key: CacheKey,
        req: &Request<Incoming>,
        client: ClientInfo,
        now: Instant,
        policy: CachePolicy,
    ) -> Next {
        let head = req.method() == Method::HEAD;
        let stored = self.store.lookup(&key, now);
        let at = (&self.store, &key, None);
        if let Some(entry) = &stored {
            match policy.freshness(entry, now) {
                Freshness::Fresh { remaining } => {
                    // A counter on the hit; the refresh itself starts once per entry.
                    if policy.hit_starts_refresh(entry, remaining) {
                        self.refresh_ahead(key, entry, req, client);
                    }
                    let status = cache_status_hit(remaining);
                    return Next::Answer(render(at, entry, req, now, XCache::Hit, status, head));
                }
                Freshness::StaleWhileRevalidate { stale_for } => {
                    if entry
                        .recent_failure(now, self.upstream.breaker().recoveries())
                        .is_none()
                    {
                        self.revalidate_in_background(key, entry.clone(), req, client);
                    }
                    let status = cache_status_hit_stale(stale_for);
                    return Next::Answer(render(at, entry, req, now, XCache::Stale, status, head));
                }
                Freshness::MustRevalidate => {
                    // Revalidating this entry just failed: answer stale at once rather than
                    // hand the failing upstream another request for the same key.
                    if let Some(fwd_status) =
                        entry.recent_failure(now, self.upstream.breaker().recoveries())
                        && policy.usable_if_error(entry, now)
                    {
                        let mut answer = stale_if_error(at, entry, req, now, fwd_status, head);
                        // Nothing was sent upstream this time: the log must not suggest otherwise.
                        answer.upstream_status = None;
                        return Next::Answer(answer);
                    }
                }
            }
        }
        Next::Fetch { key, stored }
    }

    /// The conversation route when the store cannot answer alone: fetch or revalidate through
    /// the single flight, then render, fall back to stale, or forward.
    pub(crate) async fn conversation_upstream(
        self: &Arc<Self>,
        key: CacheKey,
        req: Request<Incoming>,
        client: ClientInfo,
        stored: Option<Arc<Entry>>,
    ) -> Answer {
        let head = req.method() == Method::HEAD;
        // A fetch for this key may have finished between our lookup and now (it left the
        // flight map after storing): answer from what it stored instead of fetching again.
        let now = Instant::now();
        if let Some(entry) = self.store.lookup(&key, now)
            && !stored.as_ref().is_some_and(|s| Arc::ptr_eq(s, &entry))
            && let Freshness::Fresh { remaining } = self.store.policy.load().freshness(&entry, now)
        {
            return render(
                (&self.store, &key, None),
                &entry,
                &req,
                now,
                XCache::Hit,
                cache_status_hit(remaining),
                head,
            );
        }
        let prior = stored.filter(|e| !e.is_negative());
        let (flight, role) = self.start_fetch(key, prior.clone(), &req, client, None);
        if role == Role::Waiter {
            self.metrics.coalesced.inc();
        }
        let result = flight.await;
        let collapsed = role == Role::Waiter;
        let now = Instant::now();
        match &*result {
            FetchResult::Entry {
                entry,
                xcache,
                fwd_status,
                detail,
                stored,
                identity,
            } => {
                // A revalidated entry had a prior: this replica's, or a stale shared copy.
                let status = cache_status_forward(
                    prior.is_some() || *xcache == XCache::Revalidated,
                    Some(*fwd_status),
                    *stored,
                    *detail,
                    collapsed,
                );
                let at = (&self.store, &key, Some(identity));
                let mut answer = render(at, entry, &req, now, *xcache, status, head);
                answer.upstream_status = Some(*fwd_status);
                answer
            }
            FetchResult::Shared { entry, identity } => {
                let (xcache, status) = match self.store.policy.load().freshness(entry, now) {
                    Freshness::Fresh { remaining } => (XCache::Hit, cache_status_shared(remaining)),
                    // Within stale-while-revalidate: the usual rule, STALE at once and one
                    // background revalidation (a fetch with this entry as its prior).
                    Freshness::StaleWhileRevalidate { stale_for } => {
                        if entry
                            .recent_failure(now, self.upstream.breaker().recoveries())
                            .is_none()
                        {
                            self.revalidate_in_background(key, entry.clone(), &req, client);
                        }
                        (XCache::Stale, cache_status_hit_stale(stale_for))
                    }
                    // Read fresh, but this request waited past its freshness: still the
                    // shared tier's answer, no older than a revalidation would allow.
                    Freshness::MustRevalidate => (XCache::Hit, cache_status_shared(Duration::ZERO)),
                };
                let at = (&self.store, &key, Some(identity));
                render(at, entry, &req, now, xcache, status, head)
            }
            FetchResult::Forward(fwd) => {
                if is_upstream_failure(fwd.status)
                    && let Some(stale) = self.fallback(&key, prior.as_ref(), now)
                {
                    return stale_if_error(
                        (&self.store, &key, None),
                        &stale,
                        &req,
                        now,
                        fwd.status.as_u16(),
                        head,
                    );
                }
                forwarded(fwd, prior.is_some(), collapsed, head)
            }
            FetchResult::Failed(err) => {
                if let Some(stale) = self.fallback(&key, prior.as_ref(), now) {
                    return stale_if_error(
                        (&self.store, &key, None),
                        &stale,
                        &req,
                        now,
                        err.fwd_status(),
                        head,
                    );
                }
                let mut answer = Answer::local(err.to_local(), self.token_header_name());
                answer.response.headers_mut().insert(
                    super::CACHE_STATUS.clone(),
                    HeaderValue::from_static("chatwoot-cache; fwd=miss; detail=upstream-failed"),
                );
                answer
            }
            FetchResult::TooLarge(slot) => {
                let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                match taken {
                    Some(large) => too_large(large, head),
                    // Someone else is streaming the only copy; fetch our own, uncached. It is
                    // still the conversation route: labelled so in metrics, and `MISS` with a
                    // `Cache-Status` (SPEC §3: BYPASS is for protected and other routes).
                    None => {
                        let route = crate::routing::Route::Conversation {
                            account: key.account,
                            conversation: key.conversation,
                        };
                        let mut answer = self
                            .forward(req, client, route, Some(key.scope), false)
                            .await;
                        if answer.cache == XCache::Bypass {
                            answer.cache = XCache::Miss;
                            let status = answer.response.status().as_u16();
                            answer.response.headers_mut().insert(
                                super::CACHE_STATUS.clone(),
                                cache_status_forward(
                                    false,
                                    Some(status),
                                    false,
                                    Some("too-large"),
                                    false,
                                ),
                            );
                        }
                        answer
                    }
                }
            }
        }
    }

    /// The entry stale-if-error serves when the upstream failed: the request's own stored
    /// entry, or else what the fetch found in the shared tier and put in L1 meanwhile.
    fn fallback(
        &self,
        key: &CacheKey,
        prior: Option<&Arc<Entry>>,
        now: Instant,
    ) -> Option<Arc<Entry>> {
        let policy = self.store.policy.load();
        prior
            .cloned()
            .or_else(|| {
                self.store
                    .shared()
                    .and_then(|_| self.store.lookup(key, now))
            })
            .filter(|e| policy.usable_if_error(e, now))
    }

    /// Joins or starts the single flight for `key`.
    fn start_fetch(
        self: &Arc<Self>,
        key: CacheKey,
        prior: Option<Arc<Entry>>,
        req: &Request<Incoming>,
        client: ClientInfo,
        reserved: Option<Reserved>,
    ) -> (crate::cache::flight::FlightFuture<FetchResult>, Role) {
        // A revalidation runs under the stamp its prior entry was valid for (checked at lookup):
        // if a write lands in between, whatever it stores — even a kept "older" body — is
        // rejected by the store instead of pinning pre-write data under the new stamp.
        let stamp = prior
            .as_ref()
            .map_or_else(|| self.store.stamp(&key), |p| p.stamp.clone());
        self.flights.join_or_start(
            key,
            stamp.clone(),
            || {
                let upstream_req = self.fetch_request(req, client);
                // The one upstream request of the flight is charged to the request starting it;
                // coalesced waiters are not charged (SPEC 12).
                let via = match reserved {
                    Some(reserved) => Via::RefreshAhead(reserved),
                    None => Via::Request(client.charge(Some(key.scope))),
                };
                let form = if coding::prefers_gzip(req.headers()) {
                    Coding::Gzip
                } else {
                    Coding::Identity
                };
                let proxy = Arc::clone(self);
                async move {
                    match upstream_req {
                        Ok(r) => proxy.fetch(key, r, via, prior, stamp, form).await,
                        Err(_) => FetchResult::Failed(UpstreamError::BadResponse(
                            "cannot build upstream request".into(),
                        )),
                    }
                }
            },
            || FetchResult::Failed(UpstreamError::BadResponse("fetch task failed".into())),
        )
    }

    /// Starts (at most one) background revalidation for a stale entry.
    fn revalidate_in_background(
        self: &Arc<Self>,
        key: CacheKey,
        entry: Arc<Entry>,
        req: &Request<Incoming>,
        client: ClientInfo,
    ) {
        // Dropping the handle is fine: the flight's task runs to completion on its own.
        let _ = self.start_fetch(key, Some(entry), req, client, None);
    }

    /// Revalidates a hot entry in the background before it goes stale (SPEC 12), with the same
    /// request, token and validators as any revalidation, if the upstream has room to spare:
    /// the breaker closed, a slot outside the last quarter free at once, the scope below its
    /// cap and rate ([`crate::upstream::Upstream::reserve_background`]). Otherwise it is
    /// skipped, never queued: the entry then goes stale and stale-while-revalidate takes over.
    /// One background revalidation per key: a fetch already running for the key (a
    /// revalidation or a miss) is left to do the work, and one started here is the fetch
    /// stale-while-revalidate joins.
    fn refresh_ahead(
        self: &Arc<Self>,
        key: CacheKey,
        entry: &Arc<Entry>,
        req: &Request<Incoming>,
        client: ClientInfo,
    ) {
        if self.flights.in_flight(&key) {
            return;
        }
        let Some(reserved) = self
            .upstream
            .reserve_background(client.charge(Some(key.scope)))
        else {
            return;
        };
        // Should a fetch have started meanwhile, the reservation is dropped (released) unused.
        let _ = self.start_fetch(key, Some(entry.clone()), req, client, Some(reserved));
    }

    /// The upstream GET for a fetch: the client's end-to-end headers minus its conditionals
    /// and ranges (the proxy sets its own validators), asking for an identity encoding.
    fn fetch_request(
        &self,
        req: &Request<Incoming>,
        client: ClientInfo,
    ) -> Result<Request<RequestBody>, http::Error> {
        let mut r = self.upstream.request(
            &Method::GET,
            req.uri(),
            req.headers(),
            &client,
            false,
            RequestBody::Empty,
        )?;
        let h = r.headers_mut();
        for name in [
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
            header::IF_RANGE,
            header::RANGE,
            header::CONTENT_LENGTH,
        ] {
            h.remove(name);
        }
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        Ok(r)
    }

    /// One upstream exchange for `key`: sends it, reads the answer within the deadline and
    /// `--max-object-bytes`, and applies what [`admission::admit`] decides through the store.
    async fn fetch(
        self: Arc<Self>,
        key: CacheKey,
        mut req: Request<RequestBody>,
        via: Via,
        prior: Option<Arc<Entry>>,
        stamp: Stamp,
        form: Coding,
    ) -> FetchResult {
        // The shared tier first: another replica may have stored this key (or a fresher copy
        // of a stale prior); otherwise it says what the write after the fetch is conditional on,
        // and a stale shared copy is revalidated like a stored entry (SPEC 11: usual rules). A
        // refresh-ahead takes only a copy fresher than the one it refreshes (SPEC 12).
        let fresh_for = match &via {
            Via::RefreshAhead(_) => self
                .store
                .policy
                .load()
                .refresh_ahead
                .map_or(Duration::ZERO, |ra| ra.window),
            Via::Request(_) => Duration::ZERO,
        };
        // One Redis budget for all of this fetch's Redis work, the token refusal's included.
        let mut shared = self.store.shared_fetch();
        let stale = match self
            .store
            .read_shared(&key, &stamp, prior.is_some(), fresh_for, &mut shared)
            .await
        {
            SharedRead::Hit(entry) => {
                return FetchResult::Shared {
                    entry,
                    identity: IdentitySlot::new(),
                };
            }
            SharedRead::Fetch { stale } => stale,
        };
        let now = Instant::now();
        let prior = match stale {
            Some(s) if prior.as_ref().is_none_or(|p| p.age(now) > s.age(now)) => Some(s),
            _ => prior,
        };
        let purpose = match (&via, &prior) {
            (Via::RefreshAhead(_), _) => Purpose::RefreshAhead,
            (Via::Request(_), Some(_)) => Purpose::Revalidation,
            (Via::Request(_), None) => Purpose::Miss,
        };
        if let Some(p) = &prior {
            if let Some(etag) = p.upstream_etag() {
                req.headers_mut().insert(header::IF_NONE_MATCH, etag);
            }
            if let Some(lm) = p.upstream_last_modified() {
                req.headers_mut().insert(header::IF_MODIFIED_SINCE, lm);
            }
        }
        // A failed revalidation: counted, and remembered on the entry for a short backoff.
        let failed = |fwd_status: u16| {
            if let Some(p) = &prior {
                self.metrics.revalidation(RevalidationOutcome::Error);
                if purpose == Purpose::RefreshAhead {
                    self.metrics.refresh_ahead(RevalidationOutcome::Error);
                }
                p.note_failure(
                    Instant::now(),
                    fwd_status,
                    self.store.policy.load().failure_backoff(),
                    self.upstream.breaker().recoveries(),
                );
            }
        };
        let start = Instant::now();
        let sent = match via {
            Via::Request(charge) => {
                let opts = SendOptions {
                    defer_outcome: true,
                    ..SendOptions::new(RouteLabel::Conversation, charge)
                };
                self.upstream.send(req, opts).await
            }
            Via::RefreshAhead(reserved) => {
                let opts = SendOptions {
                    defer_outcome: true,
                    ..SendOptions::new(RouteLabel::Conversation, reserved.charge())
                };
                self.upstream.send_reserved(req, reserved, opts).await
            }
        };
        let exchange = match sent {
            Ok(x) => x,
            Err(e) => {
                // Refused locally by the client's own rate or share, or a refresh-ahead that met
                // an opened breaker: nothing was sent (counted as shed), so it is no failed
                // revalidation and earns no backoff.
                let refused_locally = matches!(
                    e,
                    UpstreamError::RateLimited { .. } | UpstreamError::TokenQuota
                ) || (purpose == Purpose::RefreshAhead && e.is_local());
                if !refused_locally {
                    failed(e.fwd_status());
                }
                return FetchResult::Failed(e);
            }
        };
        // The exchange counts (breaker, metrics) once its body has been read: a body that breaks
        // or stalls after good headers is an upstream failure too.
        let completion = exchange.completion;
        let (mut parts, incoming) = exchange.response.into_parts();
        let status = parts.status;
        strip_response_hop_by_hop(status, &mut parts.headers);
        let headers = parts.headers;
        let timeout = self.upstream.timeout();
        let body = UpstreamBody::new(incoming, timeout, exchange.permit);
        let deadline = start + timeout;
        let policy = self.store.policy.load();
        let max = policy.max_object_bytes;

        let oversized = |body: UpstreamBody, headers: HeaderMap| {
            FetchResult::TooLarge(std::sync::Mutex::new(Some(LargeBody {
                status,
                headers,
                body,
            })))
        };
        if status == StatusCode::OK
            && !is_encoded(&headers)
            && content_length(&headers).is_some_and(|n| n > max)
        {
            let decision = admit_oversized(prior.is_some(), status);
            self.apply(key, decision, status, purpose, &failed, &mut shared)
                .await;
            return oversized(body, headers);
        }
        let expected = content_length(&headers);
        let bytes = match collect_limited(body, max, deadline, expected).await {
            Ok(b) => b,
            Err(Collect::TooLarge(body)) => {
                let decision = admit_oversized(prior.is_some(), status);
                self.apply(key, decision, status, purpose, &failed, &mut shared)
                    .await;
                return oversized(body, headers);
            }
            Err(Collect::Timeout) => {
                let e = UpstreamError::Timeout(crate::upstream::TimeoutPhase::ResponseBody);
                failed(e.fwd_status());
                if let Some(c) = completion {
                    c.finish(Err(&e));
                }
                return FetchResult::Failed(e);
            }
            Err(Collect::Broken(detail)) => {
                let e = UpstreamError::BadResponse(detail);
                failed(e.fwd_status());
                if let Some(c) = completion {
                    c.finish(Err(&e));
                }
                return FetchResult::Failed(e);
            }
        };
        if let Some(c) = completion {
            c.finish(Ok(()));
        }
        let at = Admit {
            key: &key,
            prior: prior.as_deref(),
            stamp: &stamp,
            policy: &policy,
            now: Instant::now(),
            form,
        };
        let decision = admission::admit(&at, status, &headers, &bytes);
        let applied = self
            .apply(key, decision, status, purpose, &failed, &mut shared)
            .await;
        match applied {
            Some(result) => result,
            None => FetchResult::Forward(Forwarded {
                status,
                headers,
                body: bytes,
            }),
        }
    }

    /// Applies an admission decision: the store's part through [`crate::cache::Store::apply`],
    /// the proxy's (token refusal, revalidation metrics, the failure backoff) here. Returns the
    /// entry to render, or `None` when the answer is forwarded as it is.
    async fn apply(
        &self,
        key: CacheKey,
        decision: Admission,
        status: StatusCode,
        purpose: Purpose,
        failed: &(dyn Fn(u16) + Sync),
        shared: &mut SharedFetch,
    ) -> Option<FetchResult> {
        if matches!(decision, Admission::Pass(Pass::Failure)) {
            failed(status.as_u16());
        } else if purpose != Purpose::Miss {
            let outcome = decision.revalidation();
            self.metrics.revalidation(outcome);
            if purpose == Purpose::RefreshAhead {
                self.metrics.refresh_ahead(outcome);
            }
        }
        let (xcache, detail) = match &decision {
            Admission::Store(_) | Admission::Negative(_) => (XCache::Miss, None),
            Admission::Refresh { .. } => (XCache::Revalidated, None),
            Admission::KeepOlder(_) => {
                tracing::info!(
                    account = key.account,
                    conversation = key.conversation,
                    "upstream sent an older updated_at; kept the stored entry"
                );
                (XCache::Revalidated, Some("older-upstream"))
            }
            Admission::TokenRefused => (XCache::Miss, None),
            Admission::Remove | Admission::Pass(_) => (XCache::Miss, None),
        };
        let fwd_status = match &decision {
            Admission::Refresh {
                how: Confirmed::NotModified,
                ..
            } => 304,
            _ => status.as_u16(),
        };
        if matches!(decision, Admission::TokenRefused) {
            self.token_refused(key.scope, &mut shared.budget).await;
        }
        let applied = self
            .store
            .apply(key, decision, purpose != Purpose::Miss, shared)
            .await?;
        Some(FetchResult::Entry {
            entry: applied.entry,
            xcache,
            fwd_status,
            detail,
            stored: applied.stored,
            identity: IdentitySlot::new(),
        })
    }
}

enum Collect {
    /// Over the limit: the body so far is replayed ahead of the rest.
    TooLarge(UpstreamBody),
    Timeout,
    Broken(String),
}

/// Reads a whole body of at most `limit` bytes before `deadline`; `expected` is the
/// upstream's `Content-Length`, if any (only a hint for the buffer: a length over `limit`
/// is ignored, and one under it is reserved only up to [`RESERVE_AHEAD`] past what arrived).
async fn collect_limited(
    mut body: UpstreamBody,
    limit: u64,
    deadline: Instant,
    expected: Option<u64>,
) -> Result<Bytes, Collect> {
    let mut collected = Collected::new(expected.filter(|&n| n <= limit));
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(Collect::Timeout),
            Ok(None) => return Ok(collected.finish()),
            Ok(Some(Err(e))) => return Err(Collect::Broken(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            collected.push(data);
            if collected.len() as u64 > limit {
                return Err(Collect::TooLarge(body.with_prefix(collected.finish())));
            }
        }
    }
}

/// How far beyond the bytes received a body's buffer is reserved up front: every
/// conversation fits (a few KB); a longer body grows by doubling as its bytes arrive.
const RESERVE_AHEAD: usize = 64 * 1024;

/// A body being read, frame by frame. A body that arrives in one frame (a small one) is kept
/// as that frame, not copied; a longer one is copied into a buffer reserved for the announced
/// length, but at most [`RESERVE_AHEAD`] past the bytes received; past that it grows by
/// doubling (amortised copies). The bytes only live while the answer is handled: an entry
/// copies what it keeps into its own buffer (`rules::build`), so holding a slice of hyper's
/// read buffer meanwhile costs nothing beyond the request.
struct Collected {
    first: Option<Bytes>,
    rest: BytesMut,
    expected: usize,
}

impl Collected {
    fn new(expected: Option<u64>) -> Collected {
        Collected {
            first: None,
            rest: BytesMut::new(),
            expected: expected.and_then(|n| usize::try_from(n).ok()).unwrap_or(0),
        }
    }

    fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.rest.len()
    }

    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(data),
            first => {
                if let Some(first) = first {
                    // The announced length, but never more than RESERVE_AHEAD beyond what
                    // has arrived: an upstream that announces megabytes and trickles bytes
                    // must not get them reserved (rev15).
                    let have = first.len() + data.len();
                    let want = self.expected.min(have + RESERVE_AHEAD).max(have);
                    self.rest.reserve(want);
                    self.rest.extend_from_slice(&first);
                }
                self.rest.extend_from_slice(&data);
            }
        }
    }

    fn finish(self) -> Bytes {
        match self.first {
            Some(first) => first,
            None => self.rest.freeze(),
        }
    }
}

/// Where an entry being rendered belongs, for its identity copy: the store and key, and the
/// fetch's [`IdentitySlot`] when every waiter of a fetch renders it.
type At<'a> = (&'a Store, &'a CacheKey, Option<&'a IdentitySlot>);

/// Renders the form of `entry` the client prefers (SPEC 14). The identity form of a gzip entry
/// without an identity copy is rendered from a copy of the entry that has one, which the store
/// keeps in its place (once per entry; once per fetch for the requests that waited on it).
fn render(
    (store, key, slot): At<'_>,
    entry: &Arc<Entry>,
    req: &Request<Incoming>,
    now: Instant,
    xcache: XCache,
    cache_status: HeaderValue,
    head: bool,
) -> Answer {
    let asks = Asks::of(req.headers());
    let gzip = asks.accept_encoding && coding::prefers_gzip(req.headers());
    let copy;
    let entry = if entry.lacks_form(gzip) {
        // A HEAD or a 304 sends no body: answered without making the identity copy.
        if let Some(response) =
            entry.render_identity_bodiless(req.headers(), now, &cache_status, head)
        {
            return Answer {
                response: response.map(ResponseBody::optional),
                cache: xcache,
                upstream_status: None,
            };
        }
        copy = store.with_identity_copy(key, entry, slot);
        &copy
    } else {
        entry
    };
    let form = entry.form(gzip);
    let not_modified = asks.conditional && entry.not_modified_for(form, req.headers());
    Answer {
        response: entry
            .render(form, now, cache_status, head, not_modified)
            .map(ResponseBody::optional),
        cache: xcache,
        upstream_status: None,
    }
}

/// Which of the request headers a cached answer depends on the request has, found in one pass
/// over its header names: most requests carry few headers and none of these, and a lookup by
/// name hashes the name and probes for it (~100 instructions per absent name, on every hit).
struct Asks {
    accept_encoding: bool,
    /// `If-None-Match` or `If-Modified-Since`.
    conditional: bool,
}

impl Asks {
    fn of(headers: &HeaderMap) -> Asks {
        let mut asks = Asks {
            accept_encoding: false,
            conditional: false,
        };
        for name in headers.keys() {
            asks.accept_encoding |= name == header::ACCEPT_ENCODING;
            asks.conditional |= name == header::IF_NONE_MATCH || name == header::IF_MODIFIED_SINCE;
        }
        asks
    }
}

fn stale_if_error(
    at: At<'_>,
    entry: &Arc<Entry>,
    req: &Request<Incoming>,
    now: Instant,
    fwd_status: u16,
    head: bool,
) -> Answer {
    let status = header_value(format!(
        "chatwoot-cache; fwd=stale; fwd-status={fwd_status}; detail=stale-if-error"
    ));
    let mut answer = render(at, entry, req, now, XCache::Stale, status, head);
    answer.upstream_status = Some(fwd_status);
    answer
}

fn forwarded(fwd: &Forwarded, had_prior: bool, collapsed: bool, head: bool) -> Answer {
    let mut resp = Response::new(if head {
        ResponseBody::empty()
    } else {
        ResponseBody::full(fwd.body.clone())
    });
    *resp.status_mut() = fwd.status;
    *resp.headers_mut() = fwd.headers.clone();
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(fwd.body.len()));
    resp.headers_mut().insert(
        super::CACHE_STATUS.clone(),
        cache_status_forward(had_prior, Some(fwd.status.as_u16()), false, None, collapsed),
    );
    Answer {
        response: resp,
        cache: XCache::Miss,
        upstream_status: Some(fwd.status.as_u16()),
    }
}

fn too_large(large: LargeBody, head: bool) -> Answer {
    let status = large.status;
    let mut resp = Response::new(if head {
        ResponseBody::empty()
    } else {
        ResponseBody::upstream(large.body)
    });
    *resp.status_mut() = status;
    *resp.headers_mut() = large.headers;
    resp.headers_mut().insert(
        super::CACHE_STATUS.clone(),
        HeaderValue::from_static("chatwoot-cache; fwd=miss; fwd-status=200; detail=too-large"),
    );
    Answer {
        response: resp,
        cache: XCache::Miss,
        upstream_status: Some(status.as_u16()),
    }
}

fn header_value(s: String) -> HeaderValue {
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static("chatwoot-cache"))
}

/// `chatwoot-cache; hit; ttl=7` (RFC 9211). The common values come from a static table built
/// once (see [`crate::cache::entry::static_table`]), so a hit does not format or allocate.
fn cache_status_hit(remaining: Duration) -> HeaderValue {
    use crate::cache::entry::{STATIC_TABLE_LEN, static_table};
    static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let ttl = remaining.as_secs() + u64::from(remaining.subsec_nanos() > 0);
    let table = TABLE.get_or_init(|| {
        static_table(STATIC_TABLE_LEN, |n| {
            format!("chatwoot-cache; hit; ttl={n}")
        })
    });
    match table.get(ttl as usize) {
        Some(v) => v.clone(),
        None => header_value(format!("chatwoot-cache; hit; ttl={ttl}")),
    }
}

/// `chatwoot-cache; hit; ttl=7; detail=shared`: an entry another replica stored (SPEC 11).
fn cache_status_shared(remaining: Duration) -> HeaderValue {
    let ttl = remaining.as_secs() + u64::from(remaining.subsec_nanos() > 0);
    header_value(format!("chatwoot-cache; hit; ttl={ttl}; detail=shared"))
}

/// `chatwoot-cache; hit; ttl=-3; detail=stale-while-revalidate`: negative ttl = stale for.
fn cache_status_hit_stale(stale_for: Duration) -> HeaderValue {
    // Rounded up: a response past its TTL reports at least `ttl=-1`, never `ttl=-0`.
    let secs = (stale_for.as_secs() + u64::from(stale_for.subsec_nanos() > 0)).max(1);
    header_value(format!(
        "chatwoot-cache; hit; ttl=-{secs}; detail=stale-while-revalidate"
    ))
}

/// `chatwoot-cache; fwd=miss; stored`, `chatwoot-cache; fwd=stale; fwd-status=304`, ….
fn cache_status_forward(
    had_prior: bool,
    fwd_status: Option<u16>,
    stored: bool,
    detail: Option<&str>,
    collapsed: bool,
) -> HeaderValue {
    let mut s = String::from(if had_prior {
        "chatwoot-cache; fwd=stale"
    } else {
        "chatwoot-cache; fwd=miss"
    });
    // SPEC's canonical first-store form is `fwd=miss; stored` without a status.
    if let Some(code) = fwd_status
        && (had_prior || code != 200 || !stored)
    {
        s.push_str("; fwd-status=");
        s.push_str(&code.to_string());
    }
    if stored {
        s.push_str("; stored");
    }
    if collapsed {
        s.push_str("; collapsed");
    }
    if let Some(d) = detail {
        s.push_str("; detail=");
        s.push_str(d);
    }
    header_value(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that announces `Content-Length: 4 MiB` (the default --max-object-bytes)
    /// and trickles bytes got all of it reserved until the body ended or the upstream timed
    /// out (found by review after 14266ec).
    #[test]
    fn an_announced_length_is_not_reserved_before_the_bytes_arrive() {
        let mut c = Collected::new(Some(4 << 20));
        c.push(Bytes::from_static(b"{"));
        c.push(Bytes::from_static(b"\""));
        assert_eq!(c.len(), 2);
        assert!(
            c.rest.capacity() <= 2 + RESERVE_AHEAD,
            "reserved {} bytes for 2 received",
            c.rest.capacity()
        );
    }

    #[test]
    fn a_body_is_copied_at_most_once() {
        // One frame: kept as it came.
        let one = Bytes::from(vec![7u8; 5023]);
        let mut c = Collected::new(Some(5023));
        c.push(Bytes::new());
        c.push(one.clone());
        assert_eq!(c.len(), 5023);
        let out = c.finish();
        assert_eq!(out.as_ptr(), one.as_ptr(), "a single frame is not copied");
        assert_eq!(out, one);
        // Several frames: one buffer of the announced length, filled in order.
        let mut c = Collected::new(Some(9000));
        for chunk in [&[1u8; 4000][..], &[2u8; 4000], &[3u8; 1000]] {
            c.push(Bytes::copy_from_slice(chunk));
        }
        assert_eq!(
            c.rest.capacity(),
            9000,
            "allocated once, for the announced length"
        );
        let out = c.finish();
        assert_eq!(out.len(), 9000);
        assert!(out[..4000].iter().all(|&b| b == 1));
        assert!(out[4000..8000].iter().all(|&b| b == 2));
        assert!(out[8000..].iter().all(|&b| b == 3));
        // No length announced (chunked), or a wrong one: still the whole body.
        for expected in [None, Some(10)] {
            let mut c = Collected::new(expected);
            c.push(Bytes::from_static(b"{\"id\":"));
            c.push(Bytes::from_static(b"42}"));
            assert_eq!(c.finish(), Bytes::from_static(b"{\"id\":42}"));
        }
        assert!(Collected::new(None).finish().is_empty());
    }

    #[test]
    fn cache_status_strings() {
        assert_eq!(
            cache_status_hit(Duration::from_millis(6200)),
            "chatwoot-cache; hit; ttl=7"
        );
        assert_eq!(
            cache_status_forward(false, Some(200), true, None, false),
            "chatwoot-cache; fwd=miss; stored"
        );
        assert_eq!(
            cache_status_forward(true, Some(304), true, None, true),
            "chatwoot-cache; fwd=stale; fwd-status=304; stored; collapsed"
        );
        assert_eq!(
            cache_status_forward(false, Some(500), false, None, false),
            "chatwoot-cache; fwd=miss; fwd-status=500"
        );
        assert_eq!(
            cache_status_hit_stale(Duration::from_secs(3)),
            "chatwoot-cache; hit; ttl=-3; detail=stale-while-revalidate"
        );
    }
}
