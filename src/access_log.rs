//! One access-log line and one set of request metrics per request (SPEC §10).
//!
//! The guard travels inside the response body and fires when the body ends, fails or is dropped,
//! so the duration is the real time to the last byte and an aborted stream is visible
//! (`complete=false`). Only the method and the *path* are logged: query strings can carry devise
//! credentials, and no header value is ever logged.

use std::sync::Arc;

use http::{Method, Uri};
use tokio::time::Instant;

use crate::metrics::{Metrics, XCache};
use crate::routing::RouteLabel;

/// Records one request when dropped or finished.
pub struct AccessGuard {
    method: Method,
    uri: Uri,
    route: RouteLabel,
    status: u16,
    cache: XCache,
    upstream_status: Option<u16>,
    start: Instant,
    metrics: Arc<Metrics>,
}

impl AccessGuard {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        method: Method,
        uri: Uri,
        route: RouteLabel,
        status: u16,
        cache: XCache,
        upstream_status: Option<u16>,
        start: Instant,
        metrics: Arc<Metrics>,
    ) -> Self {
        AccessGuard {
            method,
            uri,
            route,
            status,
            cache,
            upstream_status,
            start,
            metrics,
        }
    }

    /// Writes the log line and the request metrics.
    pub fn finish(self, complete: bool) {
        let elapsed = self.start.elapsed();
        self.metrics
            .observe_request(self.route, self.cache, self.status, elapsed.as_secs_f64());
        let upstream_status = self.upstream_status.unwrap_or(0);
        tracing::info!(
            target: "access",
            method = %self.method,
            path = %self.uri.path(),
            status = self.status,
            cache = self.cache.as_str(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            upstream_status,
            complete,
        );
    }
}
