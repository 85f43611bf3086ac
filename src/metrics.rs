//! Prometheus metrics (SPEC §9). Names and labels are stable API.
//!
//! Every labelled child is resolved once at start-up into arrays indexed by small enums, so the
//! hot path increments a counter without hashing label values. Every series therefore exists
//! from the first scrape (at 0), which also keeps `rate()` in dashboards and alerts well-defined.
//! One registry per [`Metrics`] value: tests and benches run several proxies in one process.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::routing::RouteLabel;

/// The `X-Cache` value of a response; also the `cache` metric label (lower-case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XCache {
    Hit = 0,
    Stale = 1,
    Revalidated = 2,
    Miss = 3,
    Bypass = 4,
    Local = 5,
}

impl XCache {
    pub const ALL: [XCache; 6] = [
        XCache::Hit,
        XCache::Stale,
        XCache::Revalidated,
        XCache::Miss,
        XCache::Bypass,
        XCache::Local,
    ];

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            XCache::Hit => "HIT",
            XCache::Stale => "STALE",
            XCache::Revalidated => "REVALIDATED",
            XCache::Miss => "MISS",
            XCache::Bypass => "BYPASS",
            XCache::Local => "LOCAL",
        }
    }

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            XCache::Hit => "hit",
            XCache::Stale => "stale",
            XCache::Revalidated => "revalidated",
            XCache::Miss => "miss",
            XCache::Bypass => "bypass",
            XCache::Local => "local",
        }
    }

    pub fn header_value(self) -> http::HeaderValue {
        http::HeaderValue::from_static(self.as_str())
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const UPSTREAM_STATUS: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// `evictions_total{cause}`.
#[derive(Debug, Clone, Copy)]
pub enum EvictionCause {
    Size = 0,
    Expired = 1,
    Explicit = 2,
    Replaced = 3,
}
const EVICTION_CAUSES: [&str; 4] = ["size", "expired", "explicit", "replaced"];

/// `revalidations_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevalidationOutcome {
    NotModified = 0,
    Unchanged = 1,
    Changed = 2,
    Older = 3,
    Error = 4,
}
const REVALIDATION_OUTCOMES: [&str; 5] = ["not_modified", "unchanged", "changed", "older", "error"];

/// `invalidations_total{source}`.
#[derive(Debug, Clone, Copy)]
pub enum InvalidationSource {
    Write = 0,
    Purge = 1,
    Webhook = 2,
}
const INVALIDATION_SOURCES: [&str; 3] = ["write", "purge", "webhook"];

/// `shed_total{reason}`.
#[derive(Debug, Clone, Copy)]
pub enum ShedReason {
    QueueTimeout = 0,
    BreakerOpen = 1,
    /// The request's scope held its whole share of upstream slots (SPEC 12).
    TokenQuota = 2,
    /// The request's scope was over `--rate-limit-per-token` (SPEC 12).
    RateLimited = 3,
}
const SHED_REASONS: [&str; 4] = [
    "queue_timeout",
    "breaker_open",
    "token_quota",
    "rate_limited",
];

/// `auth_rejections_total{reason}`.
#[derive(Debug, Clone, Copy)]
pub enum AuthRejection {
    Missing = 0,
    Malformed = 1,
    Invalid = 2,
}
const AUTH_REASONS: [&str; 3] = ["missing", "malformed", "invalid"];

/// `tls_cert_expiry_timestamp_seconds{listener}`.
#[derive(Debug, Clone, Copy)]
pub enum CertListener {
    /// The certificate the public listener serves.
    Public = 0,
    /// The client certificate presented to the upstream.
    UpstreamClient = 1,
}
const CERT_LISTENERS: [&str; 2] = ["public", "upstream_client"];

/// `config_reloads_total{result}`.
#[derive(Debug, Clone, Copy)]
pub enum ReloadResult {
    Ok = 0,
    Error = 1,
}
const RELOAD_RESULTS: [&str; 2] = ["ok", "error"];

/// `redis_errors_total{op}` and `redis_duration_seconds{op}` (SPEC 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOp {
    /// L2 read (value and generations) on an L1 miss.
    Read = 0,
    /// Conditional L2 write after a stored upstream answer.
    Write = 1,
    /// Generation increment and bus publish.
    Invalidate = 2,
    /// Purge API scan and delete.
    Purge = 3,
    /// Cross-replica fetch lease.
    Lease = 4,
    /// Background probe of a skipped Redis.
    Probe = 5,
    /// Bus (re)subscription, and the keep-alive PING on the subscribed connection.
    Subscribe = 6,
}
const REDIS_OPS: [&str; 7] = [
    "read",
    "write",
    "invalidate",
    "purge",
    "lease",
    "probe",
    "subscribe",
];

impl RedisOp {
    pub fn label(self) -> &'static str {
        REDIS_OPS[self as usize]
    }
}

/// `l2_requests_total{result}` (SPEC 11).
#[derive(Debug, Clone, Copy)]
pub enum L2Result {
    Hit = 0,
    Miss = 1,
    Error = 2,
    Skipped = 3,
}
const L2_RESULTS: [&str; 4] = ["hit", "miss", "error", "skipped"];

/// Buckets from 10µs (cache hits take tens of µs) to 30s (slow upstream calls).
const LATENCY_BUCKETS: [f64; 20] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// All metrics of one proxy instance.
pub struct Metrics {
    registry: Registry,
    requests: Vec<IntCounter>,
    request_duration: Vec<Histogram>,
    upstream_requests: Vec<IntCounter>,
    upstream_duration: Vec<Histogram>,
    pub upstream_in_flight: IntGauge,
    pub entries: IntGauge,
    pub stored_bytes: IntGauge,
    evictions: Vec<IntCounter>,
    pub coalesced: IntCounter,
    revalidations: Vec<IntCounter>,
    refresh_ahead: Vec<IntCounter>,
    invalidations: Vec<IntCounter>,
    shed: Vec<IntCounter>,
    pub breaker_state: IntGauge,
    auth_rejections: Vec<IntCounter>,
    config_reloads: Vec<IntCounter>,
    /// Only certificates in use have a series: an expiry of 0 would look like a lapsed one.
    cert_expiry: IntGaugeVec,
}

fn status_class(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let v = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(v.clone()))?;
                Ok(v)
            };
        let histogram_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<HistogramVec, prometheus::Error> {
                let v = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )?;
                registry.register(Box::new(v.clone()))?;
                Ok(v)
            };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let single = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let children = |v: &IntCounterVec, values: &[&str]| -> Vec<IntCounter> {
            values.iter().map(|l| v.with_label_values(&[l])).collect()
        };

        let requests_vec = counter_vec(
            "chatwoot_cache_requests_total",
            "Requests answered on the public listener",
            &["route", "cache", "status"],
        )?;
        let duration_vec = histogram_vec(
            "chatwoot_cache_request_duration_seconds",
            "Time from request to the end of the response body",
            &["route", "cache"],
        )?;
        let mut requests = Vec::new();
        let mut request_duration = Vec::new();
        for route in RouteLabel::ALL {
            for cache in XCache::ALL {
                for status in STATUS_CLASSES {
                    requests.push(requests_vec.with_label_values(&[
                        route.as_str(),
                        cache.label(),
                        status,
                    ]));
                }
                request_duration
                    .push(duration_vec.with_label_values(&[route.as_str(), cache.label()]));
            }
        }

        let upstream_vec = counter_vec(
            "chatwoot_cache_upstream_requests_total",
            "Requests sent to the upstream, by response status class or error",
            &["route", "status"],
        )?;
        let upstream_duration_vec = histogram_vec(
            "chatwoot_cache_upstream_request_duration_seconds",
            "Upstream time until response headers (or failure)",
            &["route"],
        )?;
        let mut upstream_requests = Vec::new();
        let mut upstream_duration = Vec::new();
        for route in RouteLabel::ALL {
            for status in UPSTREAM_STATUS {
                upstream_requests.push(upstream_vec.with_label_values(&[route.as_str(), status]));
            }
            upstream_duration.push(upstream_duration_vec.with_label_values(&[route.as_str()]));
        }

        let evictions = counter_vec(
            "chatwoot_cache_evictions_total",
            "Entries removed from the store, by cause",
            &["cause"],
        )?;
        let revalidations = counter_vec(
            "chatwoot_cache_revalidations_total",
            "Revalidations of stored entries with the upstream, by outcome",
            &["outcome"],
        )?;
        let refresh_ahead = counter_vec(
            "chatwoot_cache_refresh_ahead_total",
            "Background refreshes of hot entries before they went stale, by outcome",
            &["outcome"],
        )?;
        let invalidations = counter_vec(
            "chatwoot_cache_invalidations_total",
            "Invalidation events, by source",
            &["source"],
        )?;
        let shed = counter_vec(
            "chatwoot_cache_shed_total",
            "Requests not sent upstream to protect it, by reason",
            &["reason"],
        )?;
        let auth = counter_vec(
            "chatwoot_cache_auth_rejections_total",
            "Requests refused locally for their token, by reason",
            &["reason"],
        )?;

        let config_reloads = counter_vec(
            "chatwoot_cache_config_reloads_total",
            "Configuration reloads (SIGHUP or a changed file), by result",
            &["result"],
        )?;
        let cert_expiry = IntGaugeVec::new(
            Opts::new(
                "chatwoot_cache_tls_cert_expiry_timestamp_seconds",
                "When the certificate in use expires (Unix time), by listener",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(cert_expiry.clone()))?;

        Ok(Metrics {
            config_reloads: children(&config_reloads, &RELOAD_RESULTS),
            cert_expiry,
            requests,
            request_duration,
            upstream_requests,
            upstream_duration,
            upstream_in_flight: gauge(
                "chatwoot_cache_upstream_in_flight",
                "Upstream requests in flight",
            )?,
            entries: gauge(
                "chatwoot_cache_entries",
                "Entries in the conversation store",
            )?,
            stored_bytes: gauge(
                "chatwoot_cache_stored_bytes",
                "Bytes held by the conversation store (bodies, headers, keys)",
            )?,
            evictions: children(&evictions, &EVICTION_CAUSES),
            coalesced: single(
                "chatwoot_cache_coalesced_total",
                "Requests that waited on another request's upstream fetch",
            )?,
            revalidations: children(&revalidations, &REVALIDATION_OUTCOMES),
            refresh_ahead: children(&refresh_ahead, &REVALIDATION_OUTCOMES),
            invalidations: children(&invalidations, &INVALIDATION_SOURCES),
            shed: children(&shed, &SHED_REASONS),
            breaker_state: gauge(
                "chatwoot_cache_breaker_state",
                "Circuit breaker: 0 closed, 1 half-open, 2 open",
            )?,
            auth_rejections: children(&auth, &AUTH_REASONS),
            registry,
        })
    }

    /// One finished request on the public listener.
    pub fn observe_request(&self, route: RouteLabel, cache: XCache, status: u16, seconds: f64) {
        let rc = route as usize * XCache::ALL.len() + cache as usize;
        self.requests[rc * STATUS_CLASSES.len() + status_class(status)].inc();
        self.request_duration[rc].observe(seconds);
    }

    /// One upstream exchange: `status` is `None` when it failed before a response.
    pub fn observe_upstream(&self, route: RouteLabel, status: Option<u16>, seconds: f64) {
        let idx = status.map_or(5, status_class);
        self.upstream_requests[route as usize * UPSTREAM_STATUS.len() + idx].inc();
        self.upstream_duration[route as usize].observe(seconds);
    }

    pub fn eviction(&self, cause: EvictionCause) {
        self.evictions[cause as usize].inc();
    }

    pub fn revalidation(&self, outcome: RevalidationOutcome) {
        self.revalidations[outcome as usize].inc();
    }

    /// A refresh-ahead (SPEC 12); also counted in `revalidations_total`, of which these are a
    /// part.
    pub fn refresh_ahead(&self, outcome: RevalidationOutcome) {
        self.refresh_ahead[outcome as usize].inc();
    }

    pub fn invalidation(&self, source: InvalidationSource) {
        self.invalidations[source as usize].inc();
    }

    pub fn shed(&self, reason: ShedReason) {
        self.shed[reason as usize].inc();
    }

    pub fn auth_rejection(&self, reason: AuthRejection) {
        self.auth_rejections[reason as usize].inc();
    }

    pub fn config_reload(&self, result: ReloadResult) {
        self.config_reloads[result as usize].inc();
    }

    /// The expiry of the certificate now in use for `listener`; `None` (none configured, or
    /// unreadable) removes the series.
    pub fn set_cert_expiry(&self, listener: CertListener, not_after: Option<i64>) {
        let label = [CERT_LISTENERS[listener as usize]];
        match not_after {
            Some(t) => self.cert_expiry.with_label_values(&label).set(t),
            None => {
                let _ = self.cert_expiry.remove_label_values(&label);
            }
        }
    }

    /// Registers the shared tier's metrics (SPEC 11). Only a proxy with `--redis-url` has
    /// them: `chatwoot_cache_redis_up == 0` is an alert, which a replica without Redis must not
    /// fire.
    pub fn register_shared(&self) -> Result<SharedMetrics, prometheus::Error> {
        let up = IntGauge::new(
            "chatwoot_cache_redis_up",
            "1 while Redis is in use, 0 while it is skipped after failures",
        )?;
        self.registry.register(Box::new(up.clone()))?;
        let errors = IntCounterVec::new(
            Opts::new(
                "chatwoot_cache_redis_errors_total",
                "Failed or timed-out Redis calls, by operation",
            ),
            &["op"],
        )?;
        self.registry.register(Box::new(errors.clone()))?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "chatwoot_cache_redis_duration_seconds",
                "Time of Redis calls, by operation",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )?;
        self.registry.register(Box::new(duration.clone()))?;
        let l2 = IntCounterVec::new(
            Opts::new(
                "chatwoot_cache_l2_requests_total",
                "Shared (L2) lookups on an L1 miss, by result",
            ),
            &["result"],
        )?;
        self.registry.register(Box::new(l2.clone()))?;
        let bus = IntCounterVec::new(
            Opts::new(
                "chatwoot_cache_bus_messages_total",
                "Invalidation bus messages, by direction",
            ),
            &["direction"],
        )?;
        self.registry.register(Box::new(bus.clone()))?;
        let bus_subscribed = IntGauge::new(
            "chatwoot_cache_bus_subscribed",
            "1 while this replica hears the invalidation bus (its subscription answers a \
             keep-alive PING every second; one silent for max(--redis-timeout, 2s) counts as \
             lost), 0 while it resubscribes",
        )?;
        self.registry.register(Box::new(bus_subscribed.clone()))?;
        Ok(SharedMetrics {
            up,
            bus_subscribed,
            errors: REDIS_OPS
                .iter()
                .map(|op| errors.with_label_values(&[op]))
                .collect(),
            duration: REDIS_OPS
                .iter()
                .map(|op| duration.with_label_values(&[op]))
                .collect(),
            l2: L2_RESULTS
                .iter()
                .map(|r| l2.with_label_values(&[r]))
                .collect(),
            bus_sent: bus.with_label_values(&["sent"]),
            bus_received: bus.with_label_values(&["received"]),
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> (Vec<u8>, String) {
        let encoder = TextEncoder::new();
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for I/O reasons; a metric family error would be a bug.
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        (buf, encoder.format_type().to_string())
    }
}

/// The shared tier's metrics (SPEC 11), from [`Metrics::register_shared`].
pub struct SharedMetrics {
    pub up: IntGauge,
    /// Not in SPEC 11's list: the one way to see from outside that a replica is not hearing
    /// the other replicas' invalidations.
    pub bus_subscribed: IntGauge,
    errors: Vec<IntCounter>,
    duration: Vec<Histogram>,
    l2: Vec<IntCounter>,
    bus_sent: IntCounter,
    bus_received: IntCounter,
}

impl SharedMetrics {
    pub fn error(&self, op: RedisOp) {
        self.errors[op as usize].inc();
    }

    pub fn observe(&self, op: RedisOp, seconds: f64) {
        self.duration[op as usize].observe(seconds);
    }

    pub fn l2(&self, result: L2Result) {
        self.l2[result as usize].inc();
    }

    pub fn bus_sent(&self) {
        self.bus_sent.inc();
    }

    pub fn bus_received(&self) {
        self.bus_received.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_metric_is_exposed() {
        let m = Metrics::new().unwrap();
        m.observe_request(RouteLabel::Conversation, XCache::Hit, 200, 0.001);
        m.observe_upstream(RouteLabel::Other, None, 0.5);
        let (text, ctype) = m.render();
        let text = String::from_utf8(text).unwrap();
        assert!(ctype.starts_with("text/plain"));
        for name in [
            "chatwoot_cache_requests_total{cache=\"hit\",route=\"conversation\",status=\"2xx\"} 1",
            "chatwoot_cache_request_duration_seconds_bucket",
            "chatwoot_cache_upstream_requests_total{route=\"other\",status=\"error\"} 1",
            "chatwoot_cache_upstream_request_duration_seconds_bucket",
            "chatwoot_cache_upstream_in_flight 0",
            "chatwoot_cache_entries 0",
            "chatwoot_cache_stored_bytes 0",
            "chatwoot_cache_evictions_total{cause=\"size\"} 0",
            "chatwoot_cache_coalesced_total 0",
            "chatwoot_cache_revalidations_total{outcome=\"not_modified\"} 0",
            "chatwoot_cache_refresh_ahead_total{outcome=\"error\"} 0",
            "chatwoot_cache_invalidations_total{source=\"webhook\"} 0",
            "chatwoot_cache_shed_total{reason=\"breaker_open\"} 0",
            "chatwoot_cache_shed_total{reason=\"token_quota\"} 0",
            "chatwoot_cache_shed_total{reason=\"rate_limited\"} 0",
            "chatwoot_cache_breaker_state 0",
            "chatwoot_cache_auth_rejections_total{reason=\"invalid\"} 0",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
