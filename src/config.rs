//! Configuration: CLI flag > `CHATWOOT_CACHE_*` environment variable > TOML file > default.
//!
//! clap knows about flags, env vars and defaults; it does not know about the TOML file. So every
//! setting is declared to clap as a plain string (which keeps `--help` showing defaults and env
//! names), then [`Config::from_matches`] asks clap *where* each value came from and lets the file
//! override a default. All parsing happens here, in one place, so every bad value produces the same
//! one-line error naming the setting (`--upstream-timeout: invalid duration "banana"`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, Parser};
use http::uri::{Authority, Scheme};
use http::{HeaderName, Uri};

use crate::invalidation::WebhookSecrets;

mod hints;
pub mod report;

pub use report::{Effective, Loaded};

/// Command-line surface. Every value is a string here; typed parsing is in [`Config`]. No
/// `Debug`: it would print the secrets as given.
#[derive(Parser)]
#[command(
    name = "chatwoot-cache",
    version,
    about = "Caching reverse proxy for the Chatwoot REST API",
    long_about = "Caching reverse proxy for the Chatwoot REST API.\n\n\
        Every setting is a flag, an environment variable (CHATWOOT_CACHE_ + upper snake case) and a \
        key of the optional TOML file given with --config (flag name with '_' for '-'). \
        Precedence: flag > env > file > default. Durations: 250ms, 10s, 5m, 1h. Sizes: 512KiB, 256MiB, 1GiB, 1000B. \
        A bare number other than 0 is refused for both (it lacks its unit)."
)]
pub struct Cli {
    /// TOML file with settings (keys are flag names with `_` for `-`)
    #[arg(long, env = "CHATWOOT_CACHE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration as TOML (each value's source in a comment, secrets as
    /// set/unset) and exit
    #[arg(long)]
    pub print_config: bool,

    /// Chatwoot base URL, http:// or https:// (required)
    #[arg(long, env = "CHATWOOT_CACHE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    /// Public proxy listener
    #[arg(
        long,
        env = "CHATWOOT_CACHE_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: String,

    /// Admin listener: metrics, health, purge, webhook [default: 0.0.0.0:9090, or 0.0.0.0:9091
    /// when --listen takes port 9090]
    #[arg(long, env = "CHATWOOT_CACHE_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,

    /// The auth header validated, forwarded and scoped on
    #[arg(
        long,
        env = "CHATWOOT_CACHE_TOKEN_HEADER",
        value_name = "NAME",
        default_value = "api_access_token"
    )]
    pub token_header: String,

    /// How long a stored conversation is fresh
    #[arg(
        long,
        env = "CHATWOOT_CACHE_CACHE_TTL",
        value_name = "DUR",
        default_value = "10s"
    )]
    pub cache_ttl: String,

    /// After freshness ends: serve stale at once, refresh in background
    #[arg(
        long,
        env = "CHATWOOT_CACHE_STALE_WHILE_REVALIDATE",
        value_name = "DUR",
        default_value = "30s"
    )]
    pub stale_while_revalidate: String,

    /// After freshness ends: serve stale when the upstream fails or is shed
    #[arg(
        long,
        env = "CHATWOOT_CACHE_STALE_IF_ERROR",
        value_name = "DUR",
        default_value = "10m"
    )]
    pub stale_if_error: String,

    /// How long an upstream 404 (or non-token 401) for a key is remembered (0 = off)
    #[arg(
        long,
        env = "CHATWOOT_CACHE_NEGATIVE_TTL",
        value_name = "DUR",
        default_value = "5s"
    )]
    pub negative_ttl: String,

    /// How long a token the upstream answered "Invalid Access Token" is refused locally (0 = off)
    #[arg(
        long,
        env = "CHATWOOT_CACHE_AUTH_NEGATIVE_TTL",
        value_name = "DUR",
        default_value = "10s"
    )]
    pub auth_negative_ttl: String,

    /// Bound on stored bytes (bodies + headers + key)
    #[arg(
        long,
        env = "CHATWOOT_CACHE_CACHE_MAX_BYTES",
        value_name = "SIZE",
        default_value = "256MiB"
    )]
    pub cache_max_bytes: String,

    /// Larger upstream bodies are forwarded, never stored [default: 4MiB, at most 1/16 of
    /// --cache-max-bytes]
    #[arg(long, env = "CHATWOOT_CACHE_MAX_OBJECT_BYTES", value_name = "SIZE")]
    pub max_object_bytes: Option<String>,

    /// Upstream deadline: the whole response on the conversation route; for streamed
    /// pass-through, the longest upstream silence (before headers, after the last uploaded byte,
    /// and between body chunks)
    #[arg(
        long,
        env = "CHATWOOT_CACHE_UPSTREAM_TIMEOUT",
        value_name = "DUR",
        default_value = "15s"
    )]
    pub upstream_timeout: String,

    /// TCP + TLS connect deadline
    #[arg(
        long,
        env = "CHATWOOT_CACHE_UPSTREAM_CONNECT_TIMEOUT",
        value_name = "DUR",
        default_value = "2s"
    )]
    pub upstream_connect_timeout: String,

    /// Concurrent upstream requests, all routes together
    #[arg(
        long,
        env = "CHATWOOT_CACHE_UPSTREAM_MAX_IN_FLIGHT",
        value_name = "N",
        default_value = "256"
    )]
    pub upstream_max_in_flight: String,

    /// How long a request may wait for an upstream slot
    #[arg(
        long,
        env = "CHATWOOT_CACHE_UPSTREAM_QUEUE_TIMEOUT",
        value_name = "DUR",
        default_value = "1s"
    )]
    pub upstream_queue_timeout: String,

    /// Concurrent upstream requests of one token scope (0 = off); requests without a token, or
    /// with one the upstream has not accepted yet, count per client address [default: a quarter
    /// of --upstream-max-in-flight, at least 1]
    #[arg(
        long,
        env = "CHATWOOT_CACHE_UPSTREAM_MAX_IN_FLIGHT_PER_TOKEN",
        value_name = "N"
    )]
    pub upstream_max_in_flight_per_token: Option<String>,

    /// Requests per token scope that need the upstream, e.g. 20/s, 600/m or 3600/h (cache hits
    /// are never limited); requests over it get 429 rate_limited, or a stored conversation
    /// STALE [default: off]
    #[arg(long, env = "CHATWOOT_CACHE_RATE_LIMIT_PER_TOKEN", value_name = "RATE")]
    pub rate_limit_per_token: Option<String>,

    /// Bucket size of --rate-limit-per-token: requests a scope may make at once after being
    /// idle [default: the rate per second, at least 1]
    #[arg(long, env = "CHATWOOT_CACHE_RATE_LIMIT_BURST", value_name = "N")]
    pub rate_limit_burst: Option<String>,

    /// Share of --cache-ttl after which a hot entry is revalidated in the background, so that
    /// clients polling it keep getting HIT (0 = off)
    #[arg(
        long,
        env = "CHATWOOT_CACHE_REFRESH_AHEAD",
        value_name = "F",
        default_value = "0.8"
    )]
    pub refresh_ahead: String,

    /// Hits during its freshness that make an entry hot (worth refreshing ahead)
    #[arg(
        long,
        env = "CHATWOOT_CACHE_REFRESH_AHEAD_MIN_HITS",
        value_name = "N",
        default_value = "2"
    )]
    pub refresh_ahead_min_hits: String,

    /// Circuit breaker observation window
    #[arg(
        long,
        env = "CHATWOOT_CACHE_BREAKER_WINDOW",
        value_name = "DUR",
        default_value = "10s"
    )]
    pub breaker_window: String,

    /// Completions in the window before the breaker may open
    #[arg(
        long,
        env = "CHATWOOT_CACHE_BREAKER_MIN_REQUESTS",
        value_name = "N",
        default_value = "20"
    )]
    pub breaker_min_requests: String,

    /// Failure share that opens the breaker
    #[arg(
        long,
        env = "CHATWOOT_CACHE_BREAKER_FAILURE_RATIO",
        value_name = "F",
        default_value = "0.5"
    )]
    pub breaker_failure_ratio: String,

    /// First open period; doubles while probes fail, up to 60s
    #[arg(
        long,
        env = "CHATWOOT_CACHE_BREAKER_OPEN",
        value_name = "DUR",
        default_value = "5s"
    )]
    pub breaker_open: String,

    /// Extra CA bundle for https:// upstreams (webpki roots always trusted)
    #[arg(long, env = "CHATWOOT_CACHE_UPSTREAM_CA_FILE", value_name = "PEM")]
    pub upstream_ca_file: Option<String>,

    /// Client certificate for https:// upstreams (mTLS; needs --upstream-client-key-file)
    #[arg(
        long,
        env = "CHATWOOT_CACHE_UPSTREAM_CLIENT_CERT_FILE",
        value_name = "PEM"
    )]
    pub upstream_client_cert_file: Option<String>,

    /// Private key for --upstream-client-cert-file
    #[arg(
        long,
        env = "CHATWOOT_CACHE_UPSTREAM_CLIENT_KEY_FILE",
        value_name = "PEM"
    )]
    pub upstream_client_key_file: Option<String>,

    /// Terminate TLS on --listen (needs --tls-key-file)
    #[arg(long, env = "CHATWOOT_CACHE_TLS_CERT_FILE", value_name = "PEM")]
    pub tls_cert_file: Option<String>,

    /// Private key for --tls-cert-file
    #[arg(long, env = "CHATWOOT_CACHE_TLS_KEY_FILE", value_name = "PEM")]
    pub tls_key_file: Option<String>,

    /// Bearer token for the purge API; without it the purge API is off
    #[arg(
        long,
        env = "CHATWOOT_CACHE_ADMIN_TOKEN",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// --admin-token read from a file (a mounted Secret: rotates without a restart)
    #[arg(long, env = "CHATWOOT_CACHE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<String>,

    /// Enables and verifies Chatwoot webhook invalidation; for accounts not in
    /// --webhook-secrets-file
    #[arg(
        long,
        env = "CHATWOOT_CACHE_WEBHOOK_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Option<String>,

    /// --webhook-secret read from a file (a mounted Secret: rotates without a restart)
    #[arg(long, env = "CHATWOOT_CACHE_WEBHOOK_SECRET_FILE", value_name = "FILE")]
    pub webhook_secret_file: Option<String>,

    /// Per-account webhook secrets, TOML: [accounts] 1 = ["secret", "previous"] (any listed
    /// secret verifies, for rotations)
    #[arg(long, env = "CHATWOOT_CACHE_WEBHOOK_SECRETS_FILE", value_name = "FILE")]
    pub webhook_secrets_file: Option<String>,
    /// Also accept the webhook secret as `?secret=` in the URL, for Chatwoot versions that
    /// cannot sign (before 4.11.2); puts the secret in URLs, so off unless needed
    #[arg(
        long,
        env = "CHATWOOT_CACHE_WEBHOOK_ALLOW_QUERY_SECRET",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub webhook_allow_query_secret: String,

    /// How long in-flight requests may drain after SIGTERM
    #[arg(
        long,
        env = "CHATWOOT_CACHE_SHUTDOWN_TIMEOUT",
        value_name = "DUR",
        default_value = "25s"
    )]
    pub shutdown_timeout: String,

    /// Slow-client guard: time to send a request head (also the idle keep-alive limit), and
    /// how long a client may stall sending a body or reading a response
    #[arg(
        long,
        env = "CHATWOOT_CACHE_CLIENT_HEADER_TIMEOUT",
        value_name = "DUR",
        default_value = "20s"
    )]
    pub client_header_timeout: String,

    /// Peers whose X-Forwarded-For/-Proto/-Host are kept (comma-separated CIDRs, e.g. the
    /// ingress in front of a gateway); everyone else's are replaced [default: none]
    #[arg(long, env = "CHATWOOT_CACHE_TRUSTED_PROXIES", value_name = "CIDRS")]
    pub trusted_proxies: Option<String>,
    /// How often the files named by settings (config, certificates, CA, secrets) are checked
    /// for changes, which reload them like SIGHUP does (0 = only on SIGHUP)
    #[arg(
        long,
        env = "CHATWOOT_CACHE_RELOAD_INTERVAL",
        value_name = "DUR",
        default_value = "10s"
    )]
    pub reload_interval: String,

    /// Shared tier: Redis URL, redis://[user:password@]host:port[/db] or rediss://;
    /// needs --scope-secret. Use a Redis of the cache's own (maxmemory, allkeys-lru)
    #[arg(
        long,
        env = "CHATWOOT_CACHE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,

    /// CA bundle that verifies a rediss:// server, trusted in addition to the system roots
    #[arg(long, env = "CHATWOOT_CACHE_REDIS_CA_FILE", value_name = "PEM")]
    pub redis_ca_file: Option<String>,

    /// Budget for all Redis work of one request on the request path
    #[arg(
        long,
        env = "CHATWOOT_CACHE_REDIS_TIMEOUT",
        value_name = "DUR",
        default_value = "50ms"
    )]
    pub redis_timeout: String,

    /// Namespace of every Redis key and channel
    #[arg(
        long,
        env = "CHATWOOT_CACHE_REDIS_KEY_PREFIX",
        value_name = "S",
        default_value = "chatwoot-cache:"
    )]
    pub redis_key_prefix: String,

    /// Key of the token scope hash and of the shared values' integrity check (at least 32
    /// bytes); required with --redis-url so every replica derives the same scopes [default:
    /// random per process]
    #[arg(
        long,
        env = "CHATWOOT_CACHE_SCOPE_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub scope_secret: Option<String>,

    /// Open client connections per listener; past it, new ones wait in the kernel's backlog
    #[arg(
        long,
        env = "CHATWOOT_CACHE_MAX_CONNECTIONS",
        value_name = "N",
        default_value = "10000"
    )]
    pub max_connections: String,

    /// Concurrent /cable (ActionCable websocket) tunnels, outside the upstream request limit; one
    /// client address (IPv6: /64) holds at most a quarter of them
    #[arg(
        long,
        env = "CHATWOOT_CACHE_MAX_TUNNELS",
        value_name = "N",
        default_value = "4096"
    )]
    pub max_tunnels: String,

    /// Log line format on stderr: text or json
    #[arg(
        long,
        env = "CHATWOOT_CACHE_LOG_FORMAT",
        value_name = "text|json",
        default_value = "text"
    )]
    pub log_format: String,

    /// Log level; RUST_LOG directives are honoured too
    #[arg(
        long,
        env = "CHATWOOT_CACHE_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
}

/// A start-up configuration problem. `Invalid` → exit code 2, `Io` → exit code 1 (SPEC §2, §10).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The value of a setting cannot be used.
    #[error("--{setting}: {problem}")]
    Invalid { setting: String, problem: String },
    /// A file named by a setting cannot be read.
    #[error("--{setting}: cannot read {path}: {source}")]
    Io {
        setting: String,
        path: String,
        source: std::io::Error,
    },
}

impl ConfigError {
    /// The process exit code SPEC assigns to this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ConfigError::Invalid { .. } => 2,
            ConfigError::Io { .. } => 1,
        }
    }

    fn invalid(setting: &str, problem: impl Into<String>) -> Self {
        ConfigError::Invalid {
            setting: setting.to_string(),
            problem: problem.into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the upstream lives. Kept pre-split so forwarding never re-parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix without trailing slash ("" for a bare host).
    pub base_path: String,
}

impl UpstreamUrl {
    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }
}

/// The validated settings the library runs on. Built by [`Config::load`] from argv/env/file, or
/// directly by tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--config`: re-read on every reload.
    pub config_file: Option<PathBuf>,
    pub upstream: UpstreamUrl,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub token_header: HeaderName,
    pub cache_ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub negative_ttl: Duration,
    pub auth_negative_ttl: Duration,
    pub cache_max_bytes: u64,
    pub max_object_bytes: u64,
    pub upstream_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_max_in_flight: usize,
    pub upstream_queue_timeout: Duration,
    /// `None`: derived, see [`Config::per_token_in_flight`].
    pub upstream_max_in_flight_per_token: Option<usize>,
    pub rate_limit_per_token: Option<crate::protect::Rate>,
    /// `None`: derived from the rate, see [`Config::rate_limit`].
    pub rate_limit_burst: Option<u32>,
    /// F of refresh-ahead, in [0, 1); 0 = off.
    pub refresh_ahead: f64,
    pub refresh_ahead_min_hits: u32,
    pub breaker_window: Duration,
    pub breaker_min_requests: u32,
    pub breaker_failure_ratio: f64,
    pub breaker_open: Duration,
    pub upstream_ca_file: Option<PathBuf>,
    pub upstream_client_cert_file: Option<PathBuf>,
    pub upstream_client_key_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// The purge API's bearer token, from `--admin-token` or `--admin-token-file`.
    pub admin_token: Option<Secret>,
    pub admin_token_file: Option<PathBuf>,
    /// The fallback webhook secret, from `--webhook-secret` or `--webhook-secret-file`.
    pub webhook_secret: Option<Secret>,
    pub webhook_secret_file: Option<PathBuf>,
    /// Per-account secrets from `--webhook-secrets-file` (no fallback inside: see
    /// [`Config::webhook_verifier`]).
    pub webhook_secrets: WebhookSecrets,
    pub webhook_secrets_file: Option<PathBuf>,
    pub webhook_allow_query_secret: bool,
    pub shutdown_timeout: Duration,
    pub client_header_timeout: Duration,
    pub trusted_proxies: crate::upstream::TrustedProxies,
    pub reload_interval: Duration,
    pub max_connections: usize,
    pub max_tunnels: usize,
    pub log_format: LogFormat,
    pub log_level: String,
    /// The shared tier (SPEC 11), when `--redis-url` is set.
    pub redis: Option<RedisConfig>,
    /// `--scope-secret`: stable token scopes (and, with Redis, the values' HMAC key).
    pub scope_secret: Option<Secret>,
    /// Which derived settings were given explicitly: a reload that keeps a restart-only value
    /// re-derives the defaults that depend on it ([`Config::keep_restart_only`]).
    pub explicit: Explicit,
}

/// A secret setting (`--admin-token`, `--webhook-secret`, `--scope-secret`): reads as the
/// `str` it holds, but its `Debug` never prints it, so a `{:?}` of a [`Config`] (a log line, a
/// panic message) cannot leak one.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

/// Settings whose default is derived from another one, and whether they were set explicitly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Explicit {
    /// `--max-object-bytes` (else derived from `--cache-max-bytes`).
    pub max_object_bytes: bool,
    /// `--admin-listen` (else derived from `--listen`).
    pub admin_listen: bool,
}

/// Settings of the Redis shared tier (SPEC 11).
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL; may carry a password, so never logged.
    pub url: String,
    pub ca_file: Option<PathBuf>,
    /// Budget for one request's Redis work.
    pub timeout: Duration,
    pub key_prefix: String,
}

impl std::fmt::Debug for RedisConfig {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &"..")
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// Shortest `--scope-secret` accepted: 256 bits, as the HMAC-SHA256 key it is.
pub const MIN_SCOPE_SECRET_BYTES: usize = 32;

/// One raw setting value and where it came from (for error messages).
struct Raw {
    value: String,
    origin: &'static str,
}

/// Resolves each setting's raw string by precedence; knows nothing about types.
#[derive(Clone)]
struct Sources<'a> {
    matches: &'a ArgMatches,
    file: BTreeMap<String, toml::Value>,
}

impl<'a> Sources<'a> {
    /// The clap matches plus the `--config` file, if any (read and checked here).
    fn new(matches: &'a ArgMatches) -> Result<Sources<'a>, ConfigError> {
        let file = match matches.get_one::<PathBuf>("config") {
            Some(path) => read_config_file(path)?,
            None => BTreeMap::new(),
        };
        Ok(Sources { matches, file })
    }

    /// flag > env > file > default, for the clap argument `id` (snake_case = TOML key).
    fn get(&self, id: &str) -> Result<Option<Raw>, ConfigError> {
        let source = self.matches.value_source(id);
        let from_clap = || {
            self.matches.get_one::<String>(id).map(|v| Raw {
                value: v.clone(),
                origin: match source {
                    Some(ValueSource::EnvVariable) => "environment",
                    Some(ValueSource::CommandLine) => "command line",
                    _ => "default",
                },
            })
        };
        match source {
            Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable) => Ok(from_clap()),
            _ => match self.file.get(id) {
                Some(v) => Ok(Some(Raw {
                    value: toml_scalar(id, v)?,
                    origin: "config file",
                })),
                None => Ok(from_clap()),
            },
        }
    }

    fn required(&self, id: &str) -> Result<Raw, ConfigError> {
        self.get(id)?.ok_or_else(|| {
            ConfigError::invalid(
                &flag(id),
                format!(
                    "is required (flag, CHATWOOT_CACHE_{} or `{id}` in --config)",
                    id.to_ascii_uppercase()
                ),
            )
        })
    }
}

fn flag(id: &str) -> String {
    id.replace('_', "-")
}

fn toml_scalar(id: &str, v: &toml::Value) -> Result<String, ConfigError> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err(ConfigError::invalid(
            &flag(id),
            "must be a string or number in the config file",
        )),
    }
}

impl Config {
    /// Parses the process arguments and environment. Errors carry their exit code.
    pub fn load() -> Result<Config, ConfigError> {
        let matches = Cli::command().get_matches();
        Config::from_matches(&matches)
    }

    /// Parses an explicit argument list (tests; the environment still applies).
    pub fn try_from_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command()
            .try_get_matches_from(args)
            .map_err(|e| ConfigError::invalid("args", e.to_string()))?;
        Config::from_matches(&matches)
    }

    /// Builds a validated config from clap matches plus the optional TOML file.
    pub fn from_matches(matches: &ArgMatches) -> Result<Config, ConfigError> {
        Config::from_sources(Sources::new(matches)?)
    }

    fn from_sources(src: Sources<'_>) -> Result<Config, ConfigError> {
        let upstream = parse_upstream(&src.required("upstream")?)?;
        let listen = parse_with(&src, "listen", parse_addr)?;
        // A default never contradicts a value that was set (SPEC §2): the admin port moves out
        // of the way of a public listener that took it.
        let explicit_admin_listen = parse_optional(&src, "admin_listen", parse_addr)?;
        let admin_listen = explicit_admin_listen.unwrap_or_else(|| default_admin_listen(listen));
        let token_header = parse_with(&src, "token_header", parse_header_name)?;
        let cache_ttl = parse_with(&src, "cache_ttl", parse_duration)?;
        let stale_while_revalidate = parse_with(&src, "stale_while_revalidate", parse_duration)?;
        let stale_if_error = parse_with(&src, "stale_if_error", parse_duration)?;
        let negative_ttl = parse_with(&src, "negative_ttl", parse_duration)?;
        let auth_negative_ttl = parse_with(&src, "auth_negative_ttl", parse_duration)?;
        let cache_max_bytes = parse_with(&src, "cache_max_bytes", parse_size)?;
        // Derived from --cache-max-bytes unless set, so a small cache alone starts (SPEC §2).
        let explicit_max_object_bytes = parse_optional(&src, "max_object_bytes", parse_size)?;
        let max_object_bytes =
            explicit_max_object_bytes.unwrap_or_else(|| default_max_object_bytes(cache_max_bytes));
        let upstream_timeout = parse_with(&src, "upstream_timeout", parse_positive_duration)?;
        let upstream_connect_timeout =
            parse_with(&src, "upstream_connect_timeout", parse_positive_duration)?;
        let upstream_max_in_flight = parse_with(&src, "upstream_max_in_flight", |s| {
            let n = parse_count(s)?;
            if n > MAX_UPSTREAM_IN_FLIGHT {
                return Err(format!(
                    "{n} is above the maximum of {MAX_UPSTREAM_IN_FLIGHT}"
                ));
            }
            usize::try_from(n).map_err(|_| format!("{n} is too large"))
        })?;
        let upstream_queue_timeout = parse_with(&src, "upstream_queue_timeout", parse_duration)?;
        let upstream_max_in_flight_per_token =
            parse_optional(&src, "upstream_max_in_flight_per_token", |s| {
                s.parse::<usize>()
                    .map_err(|_| format!("invalid number {s:?} (0 turns the cap off)"))
            })?;
        let rate_limit_per_token =
            parse_optional(&src, "rate_limit_per_token", crate::protect::parse_rate)?;
        let rate_limit_burst = parse_optional(&src, "rate_limit_burst", |s| {
            parse_count(s).and_then(|n| u32::try_from(n).map_err(|_| "too large".into()))
        })?;
        let refresh_ahead = parse_with(&src, "refresh_ahead", |s| match s.parse::<f64>() {
            Ok(f) if (0.0..1.0).contains(&f) => Ok(f),
            Ok(_) => Err(format!("must be in [0, 1) (0 turns it off), not {s:?}")),
            Err(_) => Err(format!("invalid number {s:?}")),
        })?;
        let refresh_ahead_min_hits = parse_with(&src, "refresh_ahead_min_hits", |s| {
            parse_count(s).and_then(|n| u32::try_from(n).map_err(|_| "too large".into()))
        })?;
        let breaker_window = parse_with(&src, "breaker_window", parse_positive_duration)?;
        let breaker_min_requests = parse_with(&src, "breaker_min_requests", |s| {
            parse_count(s).and_then(|n| u32::try_from(n).map_err(|_| "too large".into()))
        })?;
        let breaker_failure_ratio = parse_with(&src, "breaker_failure_ratio", parse_ratio)?;
        let breaker_open = parse_with(&src, "breaker_open", |s| {
            let d = parse_positive_duration(s)?;
            // Open periods double while probes fail, up to 60 s (SPEC §2): a first period above
            // the cap would make the doubling shrink it.
            if d > Duration::from_secs(60) {
                return Err(format!("{s:?} is above the 60s cap on open periods"));
            }
            Ok(d)
        })?;
        let shutdown_timeout = parse_with(&src, "shutdown_timeout", parse_duration)?;
        let client_header_timeout =
            parse_with(&src, "client_header_timeout", parse_positive_duration)?;
        let trusted_proxies = match src.get("trusted_proxies")? {
            None => crate::upstream::TrustedProxies::default(),
            Some(raw) => crate::upstream::TrustedProxies::parse(raw.value.trim())
                .map_err(|problem| with_origin("trusted_proxies", &raw, problem))?,
        };
        let reload_interval = parse_with(&src, "reload_interval", parse_duration)?;
        let max_connections = parse_with(&src, "max_connections", |s| {
            parse_count(s).map(|n| n as usize)
        })?;
        let max_tunnels = parse_with(&src, "max_tunnels", |s| parse_count(s).map(|n| n as usize))?;
        let log_format = parse_with(&src, "log_format", |s| match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("must be text or json, not {other:?}")),
        })?;
        let log_level = parse_with(&src, "log_level", |s| {
            tracing_subscriber::EnvFilter::try_new(s)
                .map(|_| s.to_string())
                .map_err(|e| format!("invalid log level {s:?}: {e}"))
        })?;

        let upstream_ca_file = optional_file(&src, "upstream_ca_file")?;
        let tls_cert_file = optional_file(&src, "tls_cert_file")?;
        let tls_key_file = optional_file(&src, "tls_key_file")?;
        let upstream_client_cert_file = optional_file(&src, "upstream_client_cert_file")?;
        let upstream_client_key_file = optional_file(&src, "upstream_client_key_file")?;
        let admin_token_file = optional_file(&src, "admin_token_file")?;
        let admin_token = secret_either_form(&src, "admin_token", admin_token_file.as_deref())?;
        let webhook_secret_file = optional_file(&src, "webhook_secret_file")?;
        let webhook_secret =
            secret_either_form(&src, "webhook_secret", webhook_secret_file.as_deref())?;
        let webhook_secrets_file = optional_file(&src, "webhook_secrets_file")?;
        let webhook_secrets = match &webhook_secrets_file {
            Some(path) => read_webhook_secrets(path)?,
            None => WebhookSecrets::default(),
        };
        let webhook_allow_query_secret =
            parse_with(&src, "webhook_allow_query_secret", parse_bool)?;
        let (redis, scope_secret) = parse_shared(&src)?;

        both_or_neither(
            "upstream-client-cert-file",
            &upstream_client_cert_file,
            "upstream-client-key-file",
            &upstream_client_key_file,
        )?;
        match (&tls_cert_file, &tls_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "tls-cert-file",
                    "needs --tls-key-file as well",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "tls-key-file",
                    "needs --tls-cert-file as well",
                ));
            }
            _ => {}
        }
        if listeners_overlap(listen, admin_listen) {
            return Err(ConfigError::invalid(
                "admin-listen",
                format!("must differ from --listen ({listen})"),
            ));
        }
        if max_object_bytes > cache_max_bytes {
            return Err(ConfigError::invalid(
                "max-object-bytes",
                format!(
                    "{max_object_bytes} bytes is larger than --cache-max-bytes ({cache_max_bytes} bytes)"
                ),
            ));
        }

        Ok(Config {
            config_file: src.matches.get_one::<PathBuf>("config").cloned(),
            upstream,
            listen,
            admin_listen,
            token_header,
            cache_ttl,
            stale_while_revalidate,
            stale_if_error,
            negative_ttl,
            auth_negative_ttl,
            cache_max_bytes,
            max_object_bytes,
            upstream_timeout,
            upstream_connect_timeout,
            upstream_max_in_flight,
            upstream_queue_timeout,
            upstream_max_in_flight_per_token,
            rate_limit_per_token,
            rate_limit_burst,
            refresh_ahead,
            refresh_ahead_min_hits,
            breaker_window,
            breaker_min_requests,
            breaker_failure_ratio,
            breaker_open,
            upstream_ca_file,
            upstream_client_cert_file,
            upstream_client_key_file,
            tls_cert_file,
            tls_key_file,
            admin_token: admin_token.map(Secret),
            admin_token_file,
            webhook_secret: webhook_secret.map(Secret),
            webhook_secret_file,
            webhook_secrets,
            webhook_secrets_file,
            webhook_allow_query_secret,
            shutdown_timeout,
            client_header_timeout,
            trusted_proxies,
            reload_interval,
            max_connections,
            max_tunnels,
            log_format,
            log_level,
            redis,
            scope_secret: scope_secret.map(Secret),
            explicit: Explicit {
                max_object_bytes: explicit_max_object_bytes.is_some(),
                admin_listen: explicit_admin_listen.is_some(),
            },
        })
    }

    /// Settings that cannot change in a running process (SPEC §13: sockets, the upstream, the
    /// cache's size and scope key, the log subscriber): takes `running`'s values for them and
    /// names those a reload asked to change. A new restart-only setting gets one line here.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<&'static str> {
        let mut kept = Vec::new();
        // A derived default follows the value it is derived from *as it will run*: derived
        // from the new file's (discarded) listen address or cache size, it would report or
        // refuse a change nobody asked for, or silently shrink the object limit.
        if !self.explicit.admin_listen {
            self.admin_listen = running.admin_listen;
        }
        macro_rules! keep {
            ($($field:ident => $flag:literal),* $(,)?) => {$(
                if self.$field != running.$field {
                    self.$field = running.$field.clone();
                    kept.push($flag);
                }
            )*};
        }
        keep!(
            listen => "--listen",
            admin_listen => "--admin-listen",
            upstream => "--upstream",
            token_header => "--token-header",
            cache_max_bytes => "--cache-max-bytes",
            log_format => "--log-format",
            max_connections => "--max-connections",
            max_tunnels => "--max-tunnels",
            scope_secret => "--scope-secret",
        );
        // The Redis client, its channels and its keys are set up once at start.
        let redis_key = |r: &Option<RedisConfig>| {
            r.as_ref().map(|r| {
                (
                    r.url.clone(),
                    r.ca_file.clone(),
                    r.timeout,
                    r.key_prefix.clone(),
                )
            })
        };
        if redis_key(&self.redis) != redis_key(&running.redis) {
            self.redis = running.redis.clone();
            kept.push("--redis-url, --redis-ca-file, --redis-timeout, --redis-key-prefix");
        }
        // The public listener terminates TLS or not from start to end; its certificate
        // (another file, or new content) is live.
        if self.tls_cert_file.is_some() != running.tls_cert_file.is_some() {
            self.tls_cert_file = running.tls_cert_file.clone();
            self.tls_key_file = running.tls_key_file.clone();
            kept.push("--tls-cert-file (TLS on or off)");
        }
        if !self.explicit.max_object_bytes {
            self.max_object_bytes = default_max_object_bytes(self.cache_max_bytes);
        }
        kept
    }

    /// Every file the configuration names, for the reload's change detection.
    pub fn watched_files(&self) -> Vec<&std::path::Path> {
        [
            &self.config_file,
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.upstream_ca_file,
            &self.upstream_client_cert_file,
            &self.upstream_client_key_file,
            &self.admin_token_file,
            &self.webhook_secret_file,
            &self.webhook_secrets_file,
        ]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .collect()
    }

    /// What verifies webhooks: the per-account secrets, `--webhook-secret` for the others.
    pub fn webhook_verifier(&self) -> WebhookSecrets {
        self.webhook_secrets
            .clone()
            .with_fallback(self.webhook_secret.as_deref().map(str::to_owned))
    }

    /// A config with SPEC defaults for the given upstream; what tests and benches start from.
    pub fn for_upstream(upstream: &str) -> Result<Config, ConfigError> {
        Config::try_from_args(["chatwoot-cache", "--upstream", upstream])
    }
}

/// A certificate needs its key and a key its certificate.
fn both_or_neither(
    a: &str,
    a_value: &Option<PathBuf>,
    b: &str,
    b_value: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    match (a_value, b_value) {
        (Some(_), None) => Err(ConfigError::invalid(a, format!("needs --{b} as well"))),
        (None, Some(_)) => Err(ConfigError::invalid(b, format!("needs --{a} as well"))),
        _ => Ok(()),
    }
}

impl Config {
    /// Upstream slots one token scope (or client address) may hold; 0 = no cap. Unless set, a
    /// quarter of `--upstream-max-in-flight` (at least 1), derived here so that it follows that
    /// setting and never contradicts it (SPEC 2). A cap above the global limit never binds.
    pub fn per_token_in_flight(&self) -> usize {
        self.upstream_max_in_flight_per_token
            .unwrap_or_else(|| default_per_token_in_flight(self.upstream_max_in_flight))
    }

    /// The per-token rate and its burst (unless set, the rate per second, at least 1), or
    /// `None` when no rate limit is set.
    pub fn rate_limit(&self) -> Option<(crate::protect::Rate, u32)> {
        let rate = self.rate_limit_per_token?;
        Some((
            rate,
            self.rate_limit_burst
                .unwrap_or_else(|| rate.default_burst()),
        ))
    }
}

/// `--upstream-max-in-flight-per-token` when not set (SPEC 12).
pub fn default_per_token_in_flight(max_in_flight: usize) -> usize {
    (max_in_flight / 4).max(1)
}

/// The largest `--upstream-max-in-flight`: far more than any Chatwoot takes. A bound checked at
/// parse time keeps slot arithmetic far from overflow (a semaphore-based limiter panicked on a
/// value above `usize::MAX >> 3`), so a reload's switch-over cannot fail (`Proxy::apply_config`).
pub const MAX_UPSTREAM_IN_FLIGHT: u64 = 1_000_000;

/// The admin listener's port unless `--admin-listen` says otherwise.
pub const DEFAULT_ADMIN_PORT: u16 = 9090;

/// `--admin-listen` when not set: port 9090 on every address, or 9091 if `--listen` took 9090
/// (a default never contradicts a value that was set, SPEC §2).
fn default_admin_listen(listen: SocketAddr) -> SocketAddr {
    let port = if listen.port() == DEFAULT_ADMIN_PORT {
        DEFAULT_ADMIN_PORT + 1
    } else {
        DEFAULT_ADMIN_PORT
    };
    SocketAddr::from(([0, 0, 0, 0], port))
}

/// `--max-object-bytes` when not set: 4MiB, but at most 1/16 of the cache, so one object can
/// never crowd out the rest of a small cache.
pub fn default_max_object_bytes(cache_max_bytes: u64) -> u64 {
    (4 << 20).min(cache_max_bytes / 16)
}

/// Whether two listeners would fight over one port: same port (not 0, which the kernel picks)
/// and the same address, or a wildcard address on either side (it takes the port on every
/// address, so the second bind fails).
fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn read_config_file(path: &std::path::Path) -> Result<BTreeMap<String, toml::Value>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        setting: "config".into(),
        path: path.display().to_string(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let msg = e.message().replace('\n', " ");
        let at = match e.span() {
            Some(span) => {
                let (line, col) = hints::line_col(&text, span.start);
                format!(":{line}:{col}")
            }
            None => String::new(),
        };
        ConfigError::invalid("config", format!("{}{at}: {}", path.display(), msg.trim()))
    })?;
    let known = hints::setting_keys();
    let mut out = BTreeMap::new();
    for (key, value) in table {
        if !known.contains(&key) {
            let hint = match hints::closest(&key, &known) {
                Some(k) if key.contains('-') && k == key.replace('-', "_") => {
                    format!("; did you mean `{k}`? (keys are flag names with `_` for `-`)")
                }
                Some(k) => format!("; did you mean `{k}`?"),
                None => String::new(),
            };
            return Err(ConfigError::invalid(
                "config",
                format!(
                    "{}{}: unknown setting `{key}`{hint}",
                    path.display(),
                    key_position(&text, &key)
                ),
            ));
        }
        out.insert(key, value);
    }
    Ok(out)
}

/// `:line:column` of `key`'s definition in a TOML `text` that parsed, like a syntax error's
/// position, or nothing if it cannot be found. Parses again with spans, on the error path only.
fn key_position(text: &str, key: &str) -> String {
    type Spanned = BTreeMap<toml::Spanned<String>, serde::de::IgnoredAny>;
    let Ok(table) = toml::from_str::<Spanned>(text) else {
        return String::new();
    };
    match table.into_keys().find(|k| k.get_ref() == key) {
        Some(k) => {
            let (line, col) = hints::line_col(text, k.span().start);
            format!(":{line}:{col}")
        }
        None => String::new(),
    }
}

fn parse_with<T>(
    src: &Sources<'_>,
    id: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    let raw = src.required(id)?;
    parse(raw.value.trim()).map_err(|problem| with_origin(id, &raw, problem))
}

/// A setting without a fixed default: `None` when nobody set it (its default is derived).
fn parse_optional<T>(
    src: &Sources<'_>,
    id: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    match src.get(id)? {
        None => Ok(None),
        Some(raw) => parse(raw.value.trim())
            .map(Some)
            .map_err(|problem| with_origin(id, &raw, problem)),
    }
}

fn with_origin(id: &str, raw: &Raw, problem: String) -> ConfigError {
    let problem = match raw.origin {
        "command line" | "default" => problem,
        "environment" => format!(
            "{problem} (from CHATWOOT_CACHE_{})",
            id.to_ascii_uppercase()
        ),
        other => format!("{problem} (from {other})"),
    };
    ConfigError::invalid(&flag(id), problem)
}

/// `--redis-ca-file` must hold at least one PEM certificate: an empty or garbled file is a
/// mistake (it adds nothing to the system's roots), refused rather than silently ignored.
fn check_redis_ca_file(path: &std::path::Path) -> Result<(), ConfigError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let pem = std::fs::read(path).map_err(|source| ConfigError::Io {
        setting: flag("redis_ca_file"),
        path: path.display().to_string(),
        source,
    })?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(()),
        _ => Err(ConfigError::invalid(
            "redis-ca-file",
            "holds no PEM certificate (it should name the CA that signed Redis's certificate)",
        )),
    }
}

fn optional_file(src: &Sources<'_>, id: &str) -> Result<Option<PathBuf>, ConfigError> {
    match src.get(id)? {
        None => Ok(None),
        Some(raw) if raw.value.is_empty() => Ok(None),
        Some(raw) => {
            let path = PathBuf::from(&raw.value);
            // Unreadable files stop start-up with exit 1 (SPEC §10), before any socket is bound.
            std::fs::metadata(&path)
                .and_then(|m| {
                    if m.is_file() {
                        std::fs::File::open(&path).map(|_| ())
                    } else {
                        Err(std::io::Error::other("not a regular file"))
                    }
                })
                .map_err(|source| ConfigError::Io {
                    setting: flag(id),
                    path: raw.value.clone(),
                    source,
                })?;
            Ok(Some(path))
        }
    }
}

/// `--redis-*` and `--scope-secret` (SPEC 11): the secret is required with Redis and at least
/// [`MIN_SCOPE_SECRET_BYTES`] long whenever set.
fn parse_shared(src: &Sources<'_>) -> Result<(Option<RedisConfig>, Option<String>), ConfigError> {
    let scope_secret = match src.get("scope_secret")? {
        Some(raw) if raw.value.is_empty() => None,
        Some(raw) if raw.value.len() < MIN_SCOPE_SECRET_BYTES => {
            return Err(with_origin(
                "scope_secret",
                &raw,
                format!(
                    "must be at least {MIN_SCOPE_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)"
                ),
            ));
        }
        Some(raw) => Some(raw.value),
        None => None,
    };
    let timeout = parse_with(src, "redis_timeout", parse_positive_duration)?;
    let key_prefix = src.required("redis_key_prefix")?.value;
    let ca_file = optional_file(src, "redis_ca_file")?;
    let url = match src.get("redis_url")? {
        Some(raw) if !raw.value.trim().is_empty() => raw,
        _ => {
            if ca_file.is_some() {
                return Err(ConfigError::invalid(
                    "redis-ca-file",
                    "needs --redis-url as well",
                ));
            }
            return Ok((None, scope_secret));
        }
    };
    let value = url.value.trim();
    // The value may carry a password: the problem is named, never the URL.
    if !(value.starts_with("redis://") || value.starts_with("rediss://")) {
        return Err(with_origin(
            "redis_url",
            &url,
            "must start with redis:// or rediss://".into(),
        ));
    }
    if let Err(e) = redis::Client::open(value) {
        return Err(with_origin(
            "redis_url",
            &url,
            format!("not a usable Redis URL ({:?})", e.kind()),
        ));
    }
    if ca_file.is_some() && !value.starts_with("rediss://") {
        return Err(ConfigError::invalid(
            "redis-ca-file",
            "is only used with a rediss:// --redis-url",
        ));
    }
    if let Some(path) = &ca_file {
        check_redis_ca_file(path)?;
    }
    if scope_secret.is_none() {
        return Err(ConfigError::invalid(
            "scope-secret",
            "is required with --redis-url: every replica must derive the same token scopes",
        ));
    }
    Ok((
        Some(RedisConfig {
            url: value.to_string(),
            ca_file,
            timeout,
            key_prefix,
        }),
        scope_secret,
    ))
}

fn optional_secret(src: &Sources<'_>, id: &str) -> Result<Option<String>, ConfigError> {
    match src.get(id)? {
        None => Ok(None),
        Some(raw) if raw.value.is_empty() => Ok(None),
        Some(raw) if raw.value.len() < MIN_SECRET_LEN => Err(with_origin(
            id,
            &raw,
            format!("must be at least {MIN_SECRET_LEN} characters"),
        )),
        Some(raw) => Ok(Some(raw.value)),
    }
}

/// A secret given inline (`--admin-token`) or as a file (`--admin-token-file`), never both:
/// which one would win is exactly the kind of question an operator rotating it should not
/// have to ask.
fn secret_either_form(
    src: &Sources<'_>,
    id: &str,
    file: Option<&std::path::Path>,
) -> Result<Option<String>, ConfigError> {
    let inline = optional_secret(src, id)?;
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            &format!("{}-file", flag(id)),
            format!("--{} is set as well; set one of them", flag(id)),
        )),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => read_secret_file(&format!("{}-file", flag(id)), path).map(Some),
        (None, None) => Ok(None),
    }
}

/// A secret file's content without surrounding whitespace (`echo` and editors add a newline).
fn read_secret_file(setting: &str, path: &std::path::Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        setting: setting.to_string(),
        path: path.display().to_string(),
        source,
    })?;
    let secret = text.trim();
    if secret.len() < MIN_SECRET_LEN {
        return Err(ConfigError::invalid(
            setting,
            format!(
                "{}: the secret must be at least {MIN_SECRET_LEN} characters",
                path.display()
            ),
        ));
    }
    Ok(secret.to_string())
}

/// Parses `--webhook-secrets-file`: `[accounts]` with `<account id> = ["secret", ...]` (a
/// single string is taken as a list of one). Nothing else is allowed, so a typo cannot
/// silently leave an account unverified.
fn read_webhook_secrets(path: &std::path::Path) -> Result<WebhookSecrets, ConfigError> {
    const SETTING: &str = "webhook-secrets-file";
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        setting: SETTING.into(),
        path: path.display().to_string(),
        source,
    })?;
    let bad =
        |problem: String| ConfigError::invalid(SETTING, format!("{}: {problem}", path.display()));
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| bad(e.message().replace('\n', " ").trim().to_string()))?;
    let mut accounts = BTreeMap::new();
    for (key, value) in table {
        if key != "accounts" {
            return Err(bad(format!("unknown key `{key}` (expected [accounts])")));
        }
        let toml::Value::Table(list) = value else {
            return Err(bad("`accounts` must be a table: [accounts]".into()));
        };
        for (account, secrets) in list {
            let id = crate::routing::canonical_id(&account)
                .ok_or_else(|| bad(format!("`{account}` is not an account id")))?;
            let secrets: Vec<String> = match secrets {
                toml::Value::String(s) => vec![s],
                toml::Value::Array(items) => items
                    .into_iter()
                    .map(|v| match v {
                        toml::Value::String(s) => Ok(s),
                        _ => Err(bad(format!("account {id}: secrets must be strings"))),
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(bad(format!("account {id}: expected a list of secrets"))),
            };
            if secrets.is_empty() {
                return Err(bad(format!("account {id}: the list of secrets is empty")));
            }
            if secrets.iter().any(|s| s.len() < MIN_SECRET_LEN) {
                return Err(bad(format!(
                    "account {id}: every secret must be at least {MIN_SECRET_LEN} characters"
                )));
            }
            accounts.insert(id, secrets);
        }
    }
    Ok(WebhookSecrets::per_account(accounts))
}

/// The shortest secret accepted (a guessable secret is worse than none: it looks protected).
const MIN_SECRET_LEN: usize = 8;

fn parse_upstream(raw: &Raw) -> Result<UpstreamUrl, ConfigError> {
    let err = |p: String| with_origin("upstream", raw, p);
    let uri: Uri = raw
        .value
        .trim()
        .parse()
        .map_err(|_| err(format!("invalid URL {:?}", raw.value)))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => {
            return Err(err(format!(
                "{:?} must start with http:// or https://",
                raw.value
            )));
        }
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| err(format!("{:?} has no host", raw.value)))?;
    if authority.as_str().contains('@') {
        return Err(err("must not contain credentials".into()));
    }
    if uri.query().is_some() {
        return Err(err("must not contain a query string".into()));
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(UpstreamUrl {
        scheme,
        authority,
        base_path,
    })
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("invalid address {s:?} (expected IP:PORT, e.g. 0.0.0.0:8080)"))
}

fn parse_header_name(s: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(s.as_bytes()).map_err(|_| format!("invalid header name {s:?}"))
}

/// Parses `250ms`, `10s`, `5m`, `1h` (and combinations such as `1m30s`; `0` means zero).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|_| hints::duration_hint(s).unwrap_or_else(|| format!("invalid duration {s:?}")))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("must be greater than zero, not {s:?}"));
    }
    Ok(d)
}

/// Parses `512KiB`, `256MiB`, `1GiB`, bytes (`100B`), and decimal `KB/MB/GB`. A bare number
/// other than `0` is refused with a unit hint, as for durations: `--cache-max-bytes 1000` is far
/// more often a forgotten `MiB` than a 1000-byte cache (nginx would take it as bytes; here
/// bytes are spelled `1000B`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {s:?} (e.g. 512KiB, 256MiB, 1GiB)");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    if unit.is_empty() && n != 0 {
        return Err(hints::size_hint(s));
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

fn parse_count(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("invalid number {s:?}")),
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("must be true or false, not {other:?}")),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        Ok(_) => Err(format!("must be in (0, 1], not {s:?}")),
        Err(_) => Err(format!("invalid number {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("banana"),
            Err("invalid duration \"banana\"".to_string())
        );
        assert!(parse_duration("-1s").is_err());
    }

    /// SPEC 11: --scope-secret is required with --redis-url and at least 32 bytes; neither the
    /// URL (it may carry a password) nor the secret appears in an error.
    #[test]
    fn shared_tier_settings() {
        let secret = "s".repeat(32);
        let args = |extra: &[&str]| {
            let mut v = vec!["chatwoot-cache", "--upstream", "http://127.0.0.1:3000"];
            v.extend_from_slice(extra);
            Config::try_from_args(v)
        };
        let c = args(&[]).unwrap();
        assert!(c.redis.is_none() && c.scope_secret.is_none());
        let c = args(&[
            "--redis-url",
            "redis://:pw@127.0.0.1:6379/2",
            "--scope-secret",
            &secret,
        ])
        .unwrap();
        let r = c.redis.expect("redis");
        assert_eq!(r.timeout, Duration::from_millis(50));
        assert_eq!(r.key_prefix, "chatwoot-cache:");
        assert!(!format!("{r:?}").contains("pw"));
        // A scope secret alone is fine: stable scopes across restarts.
        assert!(args(&["--scope-secret", &secret]).unwrap().redis.is_none());

        let problem = |extra: &[&str]| args(extra).unwrap_err().to_string();
        let e = problem(&["--redis-url", "redis://:hunter2@127.0.0.1:6379"]);
        assert!(
            e.starts_with("--scope-secret: is required with --redis-url"),
            "{e}"
        );
        assert!(!e.contains("hunter2"));
        let e = problem(&["--scope-secret", "short-secret-of-31-bytes-xxxxxx"]);
        assert!(
            e.starts_with("--scope-secret: must be at least 32 bytes"),
            "{e}"
        );
        assert!(!e.contains("short-secret"));
        let e = problem(&[
            "--redis-url",
            "http://:hunter2@x",
            "--scope-secret",
            &secret,
        ]);
        assert!(
            e.starts_with("--redis-url: must start with redis://"),
            "{e}"
        );
        assert!(!e.contains("hunter2"));
        let e = problem(&[
            "--redis-url",
            "redis://x",
            "--scope-secret",
            &secret,
            "--redis-timeout",
            "0",
        ]);
        assert!(e.starts_with("--redis-timeout:"), "{e}");
        let e = problem(&["--redis-ca-file", "Cargo.toml"]);
        assert!(e.starts_with("--redis-ca-file: needs --redis-url"), "{e}");
        // A file without a certificate would leave no trusted root: refused, not ignored.
        let e = problem(&[
            "--redis-url",
            "rediss://x",
            "--scope-secret",
            &secret,
            "--redis-ca-file",
            "Cargo.toml",
        ]);
        assert!(
            e.starts_with("--redis-ca-file: holds no PEM certificate"),
            "{e}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(
            parse_size("1000"),
            Err(
                "\"1000\" has no unit: write e.g. \"1000MiB\", or \"1000B\" for bytes \
                 (units: B, KiB, MiB, GiB, KB, MB, GB)"
                    .to_string()
            )
        );
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert!(parse_size("18446744073709551615GiB").is_err());
    }

    fn err_of(args: &[&str]) -> String {
        let mut v = vec!["chatwoot-cache"];
        v.extend_from_slice(args);
        Config::try_from_args(v).unwrap_err().to_string()
    }

    #[test]
    fn trusted_proxies_are_cidrs() {
        let c = Config::for_upstream("http://x").unwrap();
        assert!(c.trusted_proxies.is_empty(), "none by default");
        let c = Config::try_from_args([
            "chatwoot-cache",
            "--upstream",
            "http://x",
            "--trusted-proxies",
            "10.0.0.0/8, 192.168.1.1",
        ])
        .unwrap();
        assert!(c.trusted_proxies.contains("192.168.1.1".parse().unwrap()));
        assert!(
            err_of(&["--upstream", "http://x", "--trusted-proxies", "10.1.0.0/8"])
                .starts_with("--trusted-proxies: \"10.1.0.0/8\" has host bits set")
        );
    }

    #[test]
    fn invalid_values_name_the_setting() {
        assert_eq!(
            err_of(&["--upstream", "http://x", "--upstream-timeout", "banana"]),
            "--upstream-timeout: invalid duration \"banana\""
        );
        assert!(err_of(&["--upstream", "ftp://x"]).starts_with("--upstream:"));
        assert!(
            err_of(&["--upstream", "http://x", "--breaker-failure-ratio", "2"])
                .starts_with("--breaker-failure-ratio:")
        );
        assert!(
            err_of(&["--upstream", "http://x", "--tls-cert-file", "Cargo.toml"])
                .starts_with("--tls-cert-file:")
        );
        assert!(
            err_of(&[
                "--upstream",
                "http://x",
                "--cache-max-bytes",
                "1KiB",
                "--max-object-bytes",
                "2KiB"
            ])
            .starts_with("--max-object-bytes:")
        );
    }

    fn ok_of(args: &[&str]) -> Config {
        let mut v = vec!["chatwoot-cache", "--upstream", "http://x"];
        v.extend_from_slice(args);
        Config::try_from_args(v).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// A `{:?}` of a config (a log line, a panic message) never carries a secret.
    #[test]
    fn debug_never_prints_a_secret() {
        let secrets = [
            "admin-token-5f0e2c9a41",
            "webhook-secret-8b1d7e3f62",
            "scope-secret-0123456789abcdef0123456789abcdef",
        ];
        let c = ok_of(&[
            "--admin-token",
            secrets[0],
            "--webhook-secret",
            secrets[1],
            "--scope-secret",
            secrets[2],
        ]);
        assert_eq!(c.admin_token.as_deref(), Some(secrets[0]));
        assert_eq!(c.webhook_secret.as_deref(), Some(secrets[1]));
        assert_eq!(c.scope_secret.as_deref(), Some(secrets[2]));
        for text in [format!("{c:?}"), format!("{c:#?}")] {
            for secret in secrets {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert_eq!(text.matches("<redacted>").count(), 3, "{text}");
        }
    }

    /// SPEC §2: a setting left at its default never contradicts one that was set.
    #[test]
    fn max_object_bytes_is_derived_from_the_cache_size() {
        assert_eq!(
            ok_of(&["--cache-max-bytes", "1MiB"]).max_object_bytes,
            64 << 10
        );
        assert_eq!(ok_of(&["--cache-max-bytes", "1KiB"]).max_object_bytes, 64);
        assert_eq!(
            ok_of(&["--cache-max-bytes", "64MiB"]).max_object_bytes,
            4 << 20
        );
        assert_eq!(
            ok_of(&["--cache-max-bytes", "1GiB"]).max_object_bytes,
            4 << 20
        );
        // Set explicitly, it is taken as given, up to the whole cache.
        let c = ok_of(&["--cache-max-bytes", "1MiB", "--max-object-bytes", "1MiB"]);
        assert_eq!(c.max_object_bytes, 1 << 20);
        assert_eq!(
            ok_of(&["--max-object-bytes", "8MiB"]).max_object_bytes,
            8 << 20
        );
        // Only two explicit values conflict.
        assert!(
            err_of(&[
                "--upstream",
                "http://x",
                "--cache-max-bytes",
                "1MiB",
                "--max-object-bytes",
                "4MiB"
            ])
            .starts_with("--max-object-bytes: 4194304 bytes is larger than --cache-max-bytes")
        );
    }

    /// SPEC 12: a quarter of the global limit unless set; 0 turns it off.
    #[test]
    fn per_token_cap_is_derived_from_the_global_limit() {
        assert_eq!(ok_of(&[]).per_token_in_flight(), 64);
        assert_eq!(
            ok_of(&["--upstream-max-in-flight", "10"]).per_token_in_flight(),
            2
        );
        assert_eq!(
            ok_of(&["--upstream-max-in-flight", "3"]).per_token_in_flight(),
            1
        );
        let c = ok_of(&["--upstream-max-in-flight-per-token", "0"]);
        assert_eq!(c.per_token_in_flight(), 0);
        let c = ok_of(&[
            "--upstream-max-in-flight",
            "8",
            "--upstream-max-in-flight-per-token",
            "5",
        ]);
        assert_eq!(c.per_token_in_flight(), 5);
        assert!(
            err_of(&[
                "--upstream",
                "http://x",
                "--upstream-max-in-flight-per-token",
                "many"
            ])
            .starts_with("--upstream-max-in-flight-per-token: invalid number")
        );
    }

    /// SPEC 12: off by default; the burst follows the rate unless set.
    #[test]
    fn rate_limit_and_its_burst() {
        assert!(ok_of(&[]).rate_limit().is_none());
        let (rate, burst) = ok_of(&["--rate-limit-per-token", "20/s"])
            .rate_limit()
            .unwrap();
        assert_eq!(
            (rate.count, rate.per, burst),
            (20, Duration::from_secs(1), 20)
        );
        let (_, burst) = ok_of(&["--rate-limit-per-token", "600/m"])
            .rate_limit()
            .unwrap();
        assert_eq!(burst, 10);
        let (_, burst) = ok_of(&["--rate-limit-per-token", "30/h"])
            .rate_limit()
            .unwrap();
        assert_eq!(burst, 1, "at least 1");
        let (_, burst) = ok_of(&[
            "--rate-limit-per-token",
            "600/m",
            "--rate-limit-burst",
            "50",
        ])
        .rate_limit()
        .unwrap();
        assert_eq!(burst, 50);
        assert!(
            err_of(&["--upstream", "http://x", "--rate-limit-per-token", "20"])
                .starts_with("--rate-limit-per-token: invalid rate \"20\"")
        );
        // SPEC 2: the rate left at its default (off) does not contradict a burst; the burst
        // is ignored (start-up warns, see config::report).
        assert_eq!(ok_of(&["--rate-limit-burst", "5"]).rate_limit(), None);
        assert!(
            err_of(&[
                "--upstream",
                "http://x",
                "--rate-limit-per-token",
                "1/s",
                "--rate-limit-burst",
                "0"
            ])
            .starts_with("--rate-limit-burst: must be at least 1")
        );
    }

    #[test]
    fn upstream_max_in_flight_is_bounded() {
        assert_eq!(
            ok_of(&["--upstream-max-in-flight", "1000000"]).upstream_max_in_flight,
            1_000_000
        );
        for huge in ["1000001", "2305843009213693952", "18446744073709551615"] {
            let e = err_of(&["--upstream", "http://x", "--upstream-max-in-flight", huge]);
            assert!(
                e.starts_with("--upstream-max-in-flight:") && e.contains("maximum of 1000000"),
                "{e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    /// A reload keeps the running cache size and listen address; the defaults derived from them
    /// follow the running values, not the discarded new ones.
    #[test]
    fn a_reload_re_derives_defaults_from_the_kept_restart_only_values() {
        // 1MiB running (object limit 64KiB), the file now says 1GiB: 64KiB stays, and only
        // --cache-max-bytes is reported kept (before: the reload failed on a 4MiB limit).
        let running = ok_of(&["--cache-max-bytes", "1MiB"]);
        let mut next = ok_of(&["--cache-max-bytes", "1GiB", "--cache-ttl", "1m"]);
        assert_eq!(next.keep_restart_only(&running), vec!["--cache-max-bytes"]);
        assert_eq!(next.cache_max_bytes, 1 << 20);
        assert_eq!(next.max_object_bytes, 64 << 10);
        // The reverse: 1GiB running (4MiB), the file says 1MiB: the limit is not silently cut.
        let running = ok_of(&["--cache-max-bytes", "1GiB"]);
        let mut next = ok_of(&["--cache-max-bytes", "1MiB"]);
        next.keep_restart_only(&running);
        assert_eq!(next.max_object_bytes, 4 << 20);
        // An explicit limit is taken as given.
        let mut next = ok_of(&["--cache-max-bytes", "1MiB", "--max-object-bytes", "8KiB"]);
        next.keep_restart_only(&running);
        assert_eq!(next.max_object_bytes, 8 << 10);
        // A listen address moved onto 9090 would move the derived admin port: only --listen
        // is reported.
        let running = ok_of(&[]);
        let mut next = ok_of(&["--listen", "0.0.0.0:9090"]);
        assert_eq!(next.keep_restart_only(&running), vec!["--listen"]);
        assert_eq!(next.admin_listen, running.admin_listen);
    }

    #[test]
    fn refresh_ahead_settings() {
        let c = ok_of(&[]);
        assert_eq!((c.refresh_ahead, c.refresh_ahead_min_hits), (0.8, 2));
        assert_eq!(ok_of(&["--refresh-ahead", "0"]).refresh_ahead, 0.0);
        for bad in ["1", "1.5", "x"] {
            assert!(
                err_of(&["--upstream", "http://x", "--refresh-ahead", bad])
                    .starts_with("--refresh-ahead:"),
                "{bad}"
            );
        }
        assert!(
            err_of(&["--upstream", "http://x", "--refresh-ahead-min-hits", "0"])
                .starts_with("--refresh-ahead-min-hits: must be at least 1")
        );
    }

    #[test]
    fn the_admin_port_makes_way_for_a_public_listener_on_it() {
        let c = ok_of(&["--listen", "0.0.0.0:9090"]);
        assert_eq!(c.admin_listen, "0.0.0.0:9091".parse().unwrap());
        let c = ok_of(&["--listen", "127.0.0.1:9090"]);
        assert_eq!(c.admin_listen, "0.0.0.0:9091".parse().unwrap());
        assert_eq!(ok_of(&[]).admin_listen, "0.0.0.0:9090".parse().unwrap());
        // Two explicit values that would fight over a port: refused, wildcard included.
        for (listen, admin) in [
            ("0.0.0.0:7000", "0.0.0.0:7000"),
            ("127.0.0.1:7000", "0.0.0.0:7000"),
            ("0.0.0.0:7000", "127.0.0.1:7000"),
            ("[::]:7000", "127.0.0.1:7000"),
        ] {
            let e = err_of(&[
                "--upstream",
                "http://x",
                "--listen",
                listen,
                "--admin-listen",
                admin,
            ]);
            assert!(
                e.starts_with("--admin-listen: must differ"),
                "{listen} {admin}: {e}"
            );
        }
        ok_of(&[
            "--listen",
            "127.0.0.1:7000",
            "--admin-listen",
            "127.0.0.2:7000",
        ]);
        ok_of(&["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
    }

    fn temp_file(name: &str, content: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "chatwoot-cache-config-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn secrets_come_from_files_without_their_newline() {
        let token = temp_file("token", "admin-token-from-file\n");
        let secret = temp_file("secret", "  webhook-secret-file\n");
        let c = ok_of(&[
            "--admin-token-file",
            token.to_str().unwrap(),
            "--webhook-secret-file",
            secret.to_str().unwrap(),
        ]);
        assert_eq!(c.admin_token.as_deref(), Some("admin-token-from-file"));
        assert_eq!(c.webhook_secret.as_deref(), Some("webhook-secret-file"));
        assert_eq!(c.admin_token_file.as_deref(), Some(token.as_path()));
        assert!(c.webhook_verifier().is_enabled());
        // Both forms of one secret: refused, naming both.
        let e = err_of(&[
            "--upstream",
            "http://x",
            "--admin-token",
            "inline-admin-token",
            "--admin-token-file",
            token.to_str().unwrap(),
        ]);
        assert_eq!(
            e,
            "--admin-token-file: --admin-token is set as well; set one of them"
        );
        let e = err_of(&[
            "--upstream",
            "http://x",
            "--webhook-secret",
            "inline-webhook",
            "--webhook-secret-file",
            secret.to_str().unwrap(),
        ]);
        assert!(
            e.starts_with("--webhook-secret-file: --webhook-secret is set"),
            "{e}"
        );
        // Too short (or empty) after trimming.
        let short = temp_file("short", "abc\n");
        let e = err_of(&[
            "--upstream",
            "http://x",
            "--admin-token-file",
            short.to_str().unwrap(),
        ]);
        assert!(
            e.starts_with("--admin-token-file:") && e.ends_with("at least 8 characters"),
            "{e}"
        );
        // Missing: an unreadable file (exit 1).
        let e = Config::try_from_args([
            "chatwoot-cache",
            "--upstream",
            "http://x",
            "--webhook-secret-file",
            "/nonexistent/secret",
        ])
        .unwrap_err();
        assert_eq!(e.exit_code(), 1);
    }

    #[test]
    fn webhook_secrets_file_lists_secrets_per_account() {
        let file = temp_file(
            "secrets.toml",
            "[accounts]\n1 = [\"account-one-new\", \"account-one-old\"]\n7 = \"account-seven\"\n",
        );
        let c = ok_of(&[
            "--webhook-secrets-file",
            file.to_str().unwrap(),
            "--webhook-secret",
            "fallback-secret",
        ]);
        let v = c.webhook_verifier();
        assert_eq!(v.for_account(1), ["account-one-new", "account-one-old"]);
        assert_eq!(v.for_account(7), ["account-seven"]);
        assert_eq!(v.for_account(2), ["fallback-secret"]);
        // Without a fallback, an unlisted account has no secret; the webhook is still on.
        let c = ok_of(&["--webhook-secrets-file", file.to_str().unwrap()]);
        assert!(c.webhook_verifier().for_account(2).is_empty());
        assert!(c.webhook_verifier().is_enabled());
        // Secrets never show in Debug output.
        assert!(!format!("{:?}", c.webhook_secrets).contains("account-one"));

        for (content, problem) in [
            (
                "[accounts]\n01 = [\"long-enough-1\"]\n",
                "`01` is not an account id",
            ),
            (
                "[accounts]\n1 = []\n",
                "account 1: the list of secrets is empty",
            ),
            ("[accounts]\n1 = [\"short\"]\n", "at least 8 characters"),
            (
                "[accounts]\n1 = [1234567890]\n",
                "account 1: secrets must be strings",
            ),
            (
                "[acounts]\n1 = [\"long-enough-1\"]\n",
                "unknown key `acounts`",
            ),
            ("accounts = 3\n", "`accounts` must be a table"),
            ("[accounts\n", ""),
        ] {
            let f = temp_file("bad.toml", content);
            let e = err_of(&[
                "--upstream",
                "http://x",
                "--webhook-secrets-file",
                f.to_str().unwrap(),
            ]);
            assert!(e.starts_with("--webhook-secrets-file: "), "{content}: {e}");
            assert!(
                e.ends_with(problem) || e.contains(problem),
                "{content}: {e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn query_secret_mode_is_opt_in() {
        let parse = |extra: &[&str]| {
            let mut v = vec!["chatwoot-cache", "--upstream", "http://x"];
            v.extend_from_slice(extra);
            Config::try_from_args(v).map(|c| c.webhook_allow_query_secret)
        };
        assert_eq!(parse(&[]).ok(), Some(false));
        assert_eq!(parse(&["--webhook-allow-query-secret"]).ok(), Some(true));
        assert_eq!(
            parse(&["--webhook-allow-query-secret=true"]).ok(),
            Some(true)
        );
        assert_eq!(
            parse(&["--webhook-allow-query-secret=false"]).ok(),
            Some(false)
        );
        assert!(
            err_of(&["--upstream", "http://x", "--webhook-allow-query-secret=yes"])
                .starts_with("--webhook-allow-query-secret:")
        );
        let dir = std::env::temp_dir().join(format!("chatwoot-cache-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("query-secret.toml");
        std::fs::write(&file, "webhook_allow_query_secret = true\n").unwrap();
        let path = file.to_str().unwrap();
        assert_eq!(parse(&["--config", path]).ok(), Some(true));
        // The flag wins over the file.
        assert_eq!(
            parse(&["--config", path, "--webhook-allow-query-secret=false"]).ok(),
            Some(false)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn defaults_match_spec() {
        let c = Config::for_upstream("https://app.chatwoot.com/").unwrap();
        assert_eq!(c.cache_ttl, Duration::from_secs(10));
        assert_eq!(c.stale_while_revalidate, Duration::from_secs(30));
        assert_eq!(c.stale_if_error, Duration::from_secs(600));
        assert_eq!(c.cache_max_bytes, 256 << 20);
        assert_eq!(c.max_object_bytes, 4 << 20);
        assert_eq!(c.upstream_max_in_flight, 256);
        assert_eq!(c.breaker_min_requests, 20);
        assert_eq!((c.max_connections, c.max_tunnels), (10_000, 4096));
        assert_eq!(c.token_header, "api_access_token");
        assert!(c.upstream.is_https());
        assert_eq!(c.upstream.base_path, "");
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
    }

    #[test]
    fn connection_caps_redis_and_scope_secret_are_restart_only() {
        let running = Config::for_upstream("http://x").unwrap();
        let mut next = Config::for_upstream("http://x").unwrap();
        next.max_connections = 5;
        next.max_tunnels = 6;
        next.scope_secret = Some("s".repeat(40).into());
        next.redis = Some(RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            ca_file: None,
            timeout: Duration::from_millis(50),
            key_prefix: "p:".into(),
        });
        let kept = next.keep_restart_only(&running);
        assert_eq!(
            (next.max_connections, next.max_tunnels),
            (running.max_connections, running.max_tunnels)
        );
        assert!(next.scope_secret.is_none() && next.redis.is_none());
        assert_eq!(kept.len(), 4, "{kept:?}");
        // Nothing changed: nothing named.
        assert!(running.clone().keep_restart_only(&running).is_empty());
    }
}
