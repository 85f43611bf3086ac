//! chatwoot-cache: a caching reverse proxy for the Chatwoot REST API.
//!
//! The request path, in the order a request meets the modules:
//!
//! - [`server`]: accept loops (plain or TLS), HTTP/1.1 + h2, graceful shutdown; [`listener`]
//!   caps open connections and backs off on accept errors;
//!   [`client_io`] keeps the head (slowloris, idle keep-alive) and write deadlines of client
//!   connections.
//! - [`proxy`]: the per-request handler that ties everything together.
//! - [`routing`]: classifies a request (conversation / protected / other) on its raw path and
//!   finds what a write invalidates.
//! - [`auth`]: token header validation and the keyed token *scope*.
//! - [`cache`]: the conversation store, freshness, revalidation and single-flight fetches.
//! - [`invalidation`]: O(1) generation counters bumped by writes, purges and webhooks.
//! - [`shared`]: the Redis tier shared by replicas (generations, invalidation bus, L2).
//! - [`upstream`]: the pooled HTTP/HTTPS client and request/response header rewriting.
//! - [`protect`]: the upstream concurrency limit and the circuit breaker.
//! - [`admin`]: health, readiness, metrics, purge API and webhook on the admin listener;
//!   [`webhook`] admits deliveries (head checks, size and concurrency caps, replay window).
//! - [`reload`]: SIGHUP and file-change reloads of certificates, secrets and tunables;
//!   [`live`] is the holder every reloadable setting is read through.
//! - [`metrics`], [`access_log`], [`error`], [`body`], [`config`], [`hop_by_hop`]: supporting
//!   pieces.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod body;
pub mod cache;
pub mod client_io;
pub mod config;
pub mod error;
pub mod hop_by_hop;
pub mod invalidation;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod protect;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod shared;
pub mod tls;
pub mod upstream;
pub mod webhook;

pub use config::Config;
pub use proxy::Proxy;
