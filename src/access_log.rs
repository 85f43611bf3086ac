//! One access-log line and one set of request metrics per request (SPEC §10).
//!
//! The guard travels inside the response body and fires when the body ends, fails or is dropped,
//! so the duration is the real time to the last byte and an aborted stream is visible
//! (`complete=false`). Only the method and the *path* are logged: query strings can carry devise
//! credentials, and no header value is ever logged.

use std::sync::Arc;

use http::{Method, Uri};
use tokio::time::Instant;

use crate::client_io::Activity;
use crate::metrics::{Metrics, XCache};
use crate::routing::RouteLabel;

/// Status logged for a request whose client went away before an answer existed (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

/// Records one request when finished — or when dropped: a request abandoned by its client
/// before the proxy had an answer is still logged and counted (status 499, `complete=false`),
/// so a brown-out where clients give up does not look like a traffic drop.
pub struct AccessGuard {
    /// Method and URI for the log line, kept only while the access log is on: cloning the URI
    /// costs an allocation and shared reference counts on the request's buffer, and the guard
    /// (moved with every response) stays small.
    request: Option<Box<(Method, Uri)>>,
    route: RouteLabel,
    status: u16,
    cache: XCache,
    upstream_status: Option<u16>,
    start: Instant,
    metrics: Arc<Metrics>,
    /// The client connection's request accounting (see [`crate::client_io`]).
    activity: Arc<Activity>,
    done: bool,
}

impl AccessGuard {
    /// Starts the record of a request; until [`AccessGuard::answered`] it reads as abandoned.
    pub fn start<B>(
        req: &http::Request<B>,
        route: RouteLabel,
        start: Instant,
        metrics: Arc<Metrics>,
        activity: Arc<Activity>,
    ) -> Self {
        let logging = tracing::enabled!(target: "access", tracing::Level::INFO);
        // Paired with `request_ended` in `record`, which every guard reaches exactly once.
        activity.request_started();
        AccessGuard {
            request: logging.then(|| Box::new((req.method().clone(), req.uri().clone()))),
            route,
            status: CLIENT_CLOSED,
            cache: XCache::Local,
            upstream_status: None,
            start,
            metrics,
            activity,
            done: false,
        }
    }

    /// The answer the client is getting.
    pub fn answered(&mut self, status: u16, cache: XCache, upstream_status: Option<u16>) {
        self.status = status;
        self.cache = cache;
        self.upstream_status = upstream_status;
    }

    /// Writes the log line and the request metrics (once).
    pub fn finish(mut self, complete: bool) {
        self.record(complete);
    }

    fn record(&mut self, complete: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let elapsed = self.start.elapsed();
        if self.status == 101 {
            // The connection is a tunnel now: its bytes are not request heads.
            self.activity.exempt();
        }
        self.activity.request_ended(self.start + elapsed);
        self.metrics
            .observe_request(self.route, self.cache, self.status, elapsed.as_secs_f64());
        let Some(request) = &self.request else {
            return;
        };
        let (method, uri) = &**request;
        let upstream_status = self.upstream_status.unwrap_or(0);
        tracing::info!(
            target: "access",
            method = %method,
            path = %LoggedPath(uri.path()),
            status = self.status,
            cache = self.cache.as_str(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            upstream_status,
            complete,
        );
    }
}

impl Drop for AccessGuard {
    fn drop(&mut self) {
        self.record(false);
    }
}

/// The path as logged: Chatwoot's public client API puts bearer-like identifiers in the path
/// (`/public/api/v1/inboxes/{inbox_identifier}/contacts/{contact_identifier}/…`, which alone
/// authorise reading a contact's conversations); those segments are masked.
struct LoggedPath<'a>(&'a str);

impl std::fmt::Display for LoggedPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const PUBLIC: &str = "/public/api/v1/inboxes/";
        let Some(rest) = self.0.strip_prefix(PUBLIC) else {
            return f.write_str(self.0);
        };
        f.write_str(PUBLIC)?;
        for (i, seg) in rest.split('/').enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            // 0: inbox identifier, 2: contact identifier (after "contacts").
            f.write_str(if i == 0 || i == 2 { "*" } else { seg })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::LoggedPath;

    #[test]
    fn public_api_identifiers_are_masked() {
        assert_eq!(
            LoggedPath("/public/api/v1/inboxes/AbC123/contacts/xyz/conversations/4").to_string(),
            "/public/api/v1/inboxes/*/contacts/*/conversations/4"
        );
        assert_eq!(
            LoggedPath("/public/api/v1/inboxes/AbC123").to_string(),
            "/public/api/v1/inboxes/*"
        );
        assert_eq!(
            LoggedPath("/api/v1/accounts/1/conversations/4").to_string(),
            "/api/v1/accounts/1/conversations/4"
        );
    }
}
