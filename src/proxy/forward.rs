//! Transparent pass-through (SPEC §3): protected and other routes, non-canonical conversation
//! spellings, alternate-auth requests, and HTTP/1.1 upgrades (ActionCable on `/cable`).
//!
//! Only a websocket upgrade of `/cable` (Chatwoot's only websocket) is tunnelled, at most
//! `--max-tunnels` at once (past it: `503` with `Retry-After: 1`, which ActionCable's client
//! retries). An `Upgrade` anywhere else is not honoured: the request is forwarded as a plain
//! request without its hop-by-hop `Upgrade`/`Connection` headers. Refusing it instead would
//! break clients that offer an upgrade they can do without, such as curl's `Upgrade: h2c` on
//! its first plain-HTTP request; a plain answer is what a server that does not speak the
//! offered protocol gives (RFC 9110 §7.8).
//!
//! Bodies stream both ways. A 2xx write invalidates what it touched *before* its response
//! headers are returned, so a read sent after the write's response cannot see the old body.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{Answer, Proxy};
use crate::auth::Scope;
use crate::body::{Progress, RequestBody, ResponseBody, UpstreamBody};
use crate::cache::rules::is_invalid_token_body;
use crate::error::LocalError;
use crate::invalidation::{Source, Target};
use crate::metrics::XCache;
use crate::routing::{self, Route, WriteTarget};
use crate::shared::Budget;
use crate::upstream::{ClientInfo, SendOptions, UpstreamError, strip_response_hop_by_hop};

/// `POST` here rotates the caller's token (Chatwoot `ProfilesController#reset_access_token`).
const RESET_ACCESS_TOKEN: &str = "/api/v1/profile/reset_access_token";

/// Invalidates what a write touches when dropped armed (see [`Proxy::forward`]).
struct WriteGuard<'a> {
    proxy: &'a Proxy,
    path: &'a str,
    armed: bool,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            // No answer (the client went away, the upstream failed mid-way): locally now, the
            // shared tier in the background.
            if let Some((target, source)) = write_invalidation(self.path) {
                self.proxy.store.invalidate_detached(target, source);
            }
        }
    }
}

/// What a write to `path` invalidates (SPEC §7.1): the conversation (all scopes) or the whole
/// account.
fn write_invalidation(path: &str) -> Option<(Target, Source)> {
    let target = match routing::write_target(path)? {
        WriteTarget::Conversation {
            account,
            conversation,
        } => Target::Conversation {
            account,
            conversation,
        },
        WriteTarget::Account { account } => Target::Account(account),
    };
    Some((target, Source::Write))
}

/// Largest 401 body read to look for "Invalid Access Token" (Chatwoot's is 32 bytes).
const AUTH_BODY_PEEK: u64 = 4096;

/// `/cable` tunnels one client address (IPv6: its /64) may hold at once: a quarter of
/// `--max-tunnels`, at least one, so one client cannot take every tunnel (a browser opens one
/// ActionCable connection per tab).
pub(crate) fn tunnels_per_address(max_tunnels: usize) -> usize {
    (max_tunnels / 4).max(1)
}

impl Proxy {
    /// Forwards a request unchanged (bar hop-by-hop and `X-Forwarded-*`); `X-Cache: BYPASS`.
    pub(crate) async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        client: ClientInfo,
        route: Route,
        scope: Option<Scope>,
        mixed: bool,
    ) -> Answer {
        let upgrade = is_upgrade_request(&req) && is_cable(&req);
        // Held by the tunnel task for the tunnel's life.
        let tunnel_slot = match upgrade {
            false => None,
            true => match self.tunnels.clone().try_acquire_owned() {
                Ok(slot) => {
                    let max = self.config.load().max_tunnels;
                    let cap = tunnels_per_address(max);
                    let Some(hold) = self.tunnels_by_address.try_take(client.client_addr(), cap)
                    else {
                        tracing::warn!(
                            per_address = cap,
                            "tunnel refused: one client address at its share of --max-tunnels"
                        );
                        return Answer::local(
                            LocalError::Unavailable { retry_after: 1 },
                            self.token_header_name(),
                        );
                    };
                    Some((slot, hold))
                }
                Err(_) => {
                    tracing::warn!(
                        max_tunnels = self.config.load().max_tunnels,
                        "tunnel refused: --max-tunnels reached"
                    );
                    return Answer::local(
                        LocalError::Unavailable { retry_after: 1 },
                        self.token_header_name(),
                    );
                }
            },
        };
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, incoming) = req.into_parts();
        let (body, progress) = if incoming.is_end_stream() {
            (RequestBody::Empty, None)
        } else {
            let progress = Progress::new();
            (
                RequestBody::client(
                    incoming,
                    progress.clone(),
                    self.config.load().client_header_timeout,
                ),
                Some(progress),
            )
        };
        let headers = std::mem::take(&mut parts.headers);
        let upstream_req = match self.upstream.request_owned(
            &parts.method,
            &parts.uri,
            headers,
            &client,
            upgrade,
            body,
        ) {
            Ok(r) => r,
            Err(_) => return Answer::local(LocalError::BadGateway, self.token_header_name()),
        };
        // A write may commit upstream even if its answer never arrives (timeout, reset, the
        // client hanging up first): armed until a definite answer says otherwise.
        let mut write = routing::is_write(&parts.method).then(|| WriteGuard {
            proxy: self,
            path: parts.uri.path(),
            armed: true,
        });
        let opts = SendOptions {
            progress: progress.as_ref(),
            upgrade,
            vouches: !mixed,
            ..SendOptions::new(route.label(), client.charge(scope))
        };
        // What the upstream says about the token below is about it only when it was the
        // request's one credential.
        let scope = scope.filter(|_| !mixed);
        let exchange = match self.upstream.send(upstream_req, opts).await {
            Ok(x) => x,
            Err(e) => {
                // Never sent (shed, breaker, connect failure), or sent without its whole body
                // (Puma reads a body whole before Rails sees it): nothing can have committed.
                if (e.is_local()
                    || matches!(e, UpstreamError::Connect(_) | UpstreamError::ClientAborted))
                    && let Some(w) = write.as_mut()
                {
                    w.armed = false;
                }
                return Answer::local(e.to_local(), self.token_header_name());
            }
        };
        let mut response = exchange.response;
        let status = response.status();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                // A 101 we did not ask for cannot be relayed.
                return Answer::local(LocalError::BadGateway, self.token_header_name());
            };
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                tunnel(client_upgrade, upstream_upgrade).await;
                drop(tunnel_slot);
            });
            let mut headers = std::mem::take(response.headers_mut());
            strip_response_hop_by_hop(status, &mut headers);
            let mut resp = Response::new(ResponseBody::empty());
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            return Answer {
                response: resp,
                cache: XCache::Bypass,
                upstream_status: Some(101),
            };
        }
        let (mut resp_parts, resp_body) = response.into_parts();
        strip_response_hop_by_hop(status, &mut resp_parts.headers);

        // One Redis budget for all of this request's Redis work (SPEC 11).
        let mut budget = self.store.budget();
        if let Some(mut w) = write.take() {
            // A definite answer: invalidate now, before the response is returned, on a 2xx
            // (on every replica, through the shared tier); nothing otherwise.
            w.armed = false;
            if status.is_success() {
                if let Some((target, source)) = write_invalidation(parts.uri.path()) {
                    self.store.invalidate(target, source, &mut budget).await;
                }
                if parts.uri.path() == RESET_ACCESS_TOKEN
                    && let Some(scope) = scope
                {
                    // The token that made this call is dead upstream from now on.
                    self.token_refused(scope, &mut budget).await;
                }
            }
        }
        let body = UpstreamBody::new(resp_body, self.upstream.timeout(), exchange.permit);
        let response_body = match scope {
            Some(scope)
                if status == StatusCode::UNAUTHORIZED && small_body(&resp_parts.headers) =>
            {
                // Read the (tiny) 401 to learn whether the token itself was refused.
                match body.collect().await {
                    Ok(collected) => {
                        let bytes = collected.to_bytes();
                        if is_invalid_token_body(&bytes) {
                            self.token_refused(scope, &mut budget).await;
                        }
                        ResponseBody::full(bytes)
                    }
                    Err(_) => {
                        return Answer::local(LocalError::BadGateway, self.token_header_name());
                    }
                }
            }
            _ => ResponseBody::upstream(body),
        };
        let mut resp = Response::from_parts(resp_parts, response_body);
        *resp.version_mut() = Version::HTTP_11;
        Answer {
            response: resp,
            cache: XCache::Bypass,
            upstream_status: Some(status.as_u16()),
        }
    }

    /// The upstream called this token invalid: refuse it locally for a while and drop every
    /// entry stored under its scope — only those (SPEC 10: random tokens cost other tokens'
    /// entries nothing; see [`crate::invalidation`]). `budget`: what is left of the request's
    /// Redis time.
    pub(crate) async fn token_refused(&self, scope: Scope, budget: &mut Budget) {
        self.invalid_tokens.insert(scope);
        self.upstream.forget_token(scope);
        self.store
            .invalidate(Target::Scope(scope), Source::TokenRefused, budget)
            .await;
    }
}

fn small_body(headers: &http::HeaderMap) -> bool {
    crate::upstream::content_length(headers).is_some_and(|n| n <= AUTH_BODY_PEEK)
}

/// HTTP/1.1 `Connection: upgrade` + `Upgrade: …` (h2 has no upgrades).
fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
}

/// ActionCable's websocket: `/cable` (any query), asking for `websocket`.
fn is_cable<B>(req: &Request<B>) -> bool {
    req.uri().path() == "/cable"
        && req
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .any(|v| has_token(v, "websocket"))
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Copies bytes both ways between the client and upstream once both sides switched protocols.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}
