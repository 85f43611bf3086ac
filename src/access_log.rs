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
    /// The request already left the connection's in-flight count (see
    /// [`AccessGuard::handed_piece`]).
    left_flight: bool,
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
            left_flight: false,
            done: false,
        }
    }

    /// The client connection this request came on.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// The answer the client is getting.
    pub fn answered(&mut self, status: u16, cache: XCache, upstream_status: Option<u16>) {
        self.status = status;
        self.cache = cache;
        self.upstream_status = upstream_status;
    }

    /// A piece of an in-memory h2 body was handed over at `now`: the first ends the request for
    /// the connection's idle deadline (nothing upstream is held, and a zero window must not
    /// keep the connection), every one moves that deadline on (the client is reading).
    pub fn handed_piece(&mut self, now: Instant) {
        if self.left_flight {
            self.activity.progressed(now);
        } else {
            self.left_flight = true;
            self.activity.request_ended(now);
        }
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
        if !self.left_flight {
            self.activity.request_ended(self.start + elapsed);
        }
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
            // Whole microseconds: `1.226`, not `1.2258760000000002`.
            duration_ms = elapsed.as_micros() as f64 / 1000.0,
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

/// The path as logged, with the segments that work as secrets masked (SPEC 10). Chatwoot routes
/// that carry one:
/// - `/public/api/v1/inboxes/{inbox_identifier}/contacts/{contact_identifier}/…`: the two
///   identifiers alone authorise reading a contact's conversations;
/// - `/webhooks/telegram/{bot_token}`: the Telegram bot's API token (it can read and send
///   everything the bot can);
/// - `/public/api/v1/csat_survey/{uuid}` and `/survey/responses/{uuid}`: the conversation uuid
///   opens its CSAT survey;
/// - `/rails/active_storage/…/{signed_id or token}/…`: signed blob ids and disk tokens are
///   download and upload capabilities (a blob's signed id does not expire).
///
/// Other inbound channel routes name a public identifier (`/webhooks/line/{channel_id}`, the
/// phone numbers of `/webhooks/sms/…` and `/webhooks/whatsapp/…`) and verify a signature or a
/// token in the query, which is never logged. Rails squeezes repeated slashes and decodes
/// percent-escapes before routing, so segments are matched that way here.
struct LoggedPath<'a>(&'a str);

/// Which segments (counted among the non-empty ones, from the start of the path) to mask.
enum Mask {
    /// These positions.
    At(&'static [usize]),
    /// Every position from this one on, except Active Storage's own route words.
    ActiveStorageFrom(usize),
}

/// (route prefix as non-empty segments, what to mask)
const MASKED: &[(&[&str], Mask)] = &[
    (&["public", "api", "v1", "inboxes"], Mask::At(&[4, 6])),
    (&["public", "api", "v1", "csat_survey"], Mask::At(&[4])),
    (&["survey", "responses"], Mask::At(&[2])),
    (&["webhooks", "telegram"], Mask::At(&[2])),
    (&["rails", "active_storage"], Mask::ActiveStorageFrom(2)),
];

/// Active Storage's literal route segments (kept so the log still shows which route it was).
const ACTIVE_STORAGE_WORDS: &[&str] = &[
    "blobs",
    "representations",
    "redirect",
    "proxy",
    "disk",
    "direct_uploads",
];

impl LoggedPath<'_> {
    /// The rule for this path, if any. Allocation-free unless a segment is percent-encoded
    /// (it runs for every logged request, hits included).
    fn mask(&self) -> Option<&'static Mask> {
        MASKED.iter().find_map(|(prefix, mask)| {
            let mut segments = self.0.split('/').filter(|s| !s.is_empty());
            prefix
                .iter()
                .all(|word| segments.next().is_some_and(|s| segment_is(s, word)))
                .then_some(mask)
        })
    }
}

/// `segment` is `word` once percent-decoded.
fn segment_is(segment: &str, word: &str) -> bool {
    if segment.contains('%') {
        crate::routing::percent_decode(segment) == word
    } else {
        segment == word
    }
}

impl std::fmt::Display for LoggedPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(mask) = self.mask() else {
            return f.write_str(self.0);
        };
        let mut position = 0;
        for (i, seg) in self.0.split('/').enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            if seg.is_empty() {
                continue;
            }
            let masked = match mask {
                Mask::At(at) => at.contains(&position),
                Mask::ActiveStorageFrom(from) => {
                    position >= *from && !ACTIVE_STORAGE_WORDS.iter().any(|w| segment_is(seg, w))
                }
            };
            f.write_str(if masked { "*" } else { seg })?;
            position += 1;
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

    #[test]
    fn secrets_in_channel_and_storage_paths_are_masked() {
        let bot = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";
        for (path, logged) in [
            (format!("/webhooks/telegram/{bot}"), "/webhooks/telegram/*"),
            // Spellings Rails routes the same way.
            (
                format!("//webhooks//telegram/{bot}/"),
                "//webhooks//telegram/*/",
            ),
            (
                format!("/webhooks/%74elegram/{bot}"),
                "/webhooks/%74elegram/*",
            ),
            (
                "/public/api/v1/csat_survey/0b4e9ff0-7d5d-4d2a-9f0e-3c1a2b3c4d5e".into(),
                "/public/api/v1/csat_survey/*",
            ),
            (
                "/survey/responses/0b4e9ff0-7d5d-4d2a-9f0e-3c1a2b3c4d5e".into(),
                "/survey/responses/*",
            ),
            (
                "/rails/active_storage/blobs/redirect/eyJfcmFpbHMiOnsiZGF0YSI6MX19--abc/report.pdf"
                    .into(),
                "/rails/active_storage/blobs/redirect/*/*",
            ),
            (
                "/rails/active_storage/representations/proxy/eyJf--1/eyJf--2/a.png".into(),
                "/rails/active_storage/representations/proxy/*/*/*",
            ),
            (
                "/rails/active_storage/disk/eyJfcmFpbHMi--d1/file.txt".into(),
                "/rails/active_storage/disk/*/*",
            ),
            (
                "/rails/active_storage/direct_uploads".into(),
                "/rails/active_storage/direct_uploads",
            ),
            // Public identifiers, not secrets: left alone.
            (
                "/webhooks/line/1657000000".into(),
                "/webhooks/line/1657000000",
            ),
            (
                "/webhooks/sms/+15550001111".into(),
                "/webhooks/sms/+15550001111",
            ),
            ("/webhooks/telegram".into(), "/webhooks/telegram"),
            ("/".into(), "/"),
            ("".into(), ""),
        ] {
            let shown = LoggedPath(&path).to_string();
            assert_eq!(shown, logged, "{path}");
            assert!(!shown.contains(bot), "{path}");
        }
    }
}
