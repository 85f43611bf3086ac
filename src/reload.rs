//! Reloading without a restart (SPEC §13): on SIGHUP, and when a file the configuration names
//! changes, the configuration is read again and applied to the running proxy.
//!
//! A reload first builds everything the new configuration needs (parsing, certificates, keys,
//! CA bundles, secrets): if any of it fails, nothing changes and one log line names the
//! setting. Then it switches over, component by component ([`Proxy::apply_config`]): settings are
//! read through [`crate::live::Live`] holders, so requests that start afterwards see the new
//! values while requests in flight, open connections and the cache carry on. Settings that
//! cannot change live keep their running values ([`Config::keep_restart_only`]).
//!
//! Files are compared by content, not by modification time: Kubernetes updates a mounted
//! Secret or ConfigMap by swapping a symlink to a new directory, which leaves the mtime of the
//! path the proxy opened unchanged (or older).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::metrics::{CertListener, ReloadResult};
use crate::proxy::{Proxy, cache_policy};
use crate::tls::{self, TlsError};

/// Why a reload changed nothing. Every variant names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A new configuration with everything it needs built and checked: switching to it cannot fail.
struct Prepared {
    next: Config,
    kept: Vec<&'static str>,
    server_cert: Option<tls::ServerCert>,
    dial: crate::upstream::Dial,
}

impl Proxy {
    /// Applies a newly loaded configuration. Returns the restart-only settings that asked for a
    /// change and kept their running values. On error nothing has changed.
    pub fn apply_config(&self, next: Config) -> Result<Vec<&'static str>, ReloadError> {
        let prepared = self.prepare_config(next)?;
        let kept = prepared.kept.clone();
        self.switch_config(prepared);
        Ok(kept)
    }

    /// Everything that can fail, before anything changes.
    fn prepare_config(&self, mut next: Config) -> Result<Prepared, ReloadError> {
        let running = self.config.load();
        let kept = next.keep_restart_only(&running);
        // The cache's size stays: a new object limit must still fit the running one.
        if next.max_object_bytes > next.cache_max_bytes {
            return Err(ConfigError::Invalid {
                setting: "max-object-bytes".into(),
                problem: format!(
                    "{} bytes is larger than the running --cache-max-bytes ({} bytes)",
                    next.max_object_bytes, next.cache_max_bytes
                ),
            }
            .into());
        }
        let server_cert = match (&self.server_tls, &next.tls_cert_file, &next.tls_key_file) {
            (Some(_), Some(cert), Some(key)) => Some(tls::server_cert(cert, key)?),
            _ => None,
        };
        let dial = crate::upstream::dial(&next)?;
        Ok(Prepared {
            next,
            kept,
            server_cert,
            dial,
        })
    }

    /// Switches every component over. Infallible by construction, so a reload applies whole
    /// or not at all: every value was bounded when it was parsed to what the components accept
    /// (e.g. `--upstream-max-in-flight` at most `MAX_UPSTREAM_IN_FLIGHT`), and everything read from files was built in [`Proxy::prepare_config`]. Keep it
    /// that way: a check that can fail belongs there.
    ///
    /// Each store is independent; a request may see some components on the old values and
    /// others on the new for the instant this takes.
    fn switch_config(&self, prepared: Prepared) {
        let Prepared {
            next,
            kept: _,
            server_cert,
            dial,
        } = prepared;
        self.metrics
            .set_cert_expiry(CertListener::UpstreamClient, dial.client_cert_not_after);
        self.upstream.reconfigure(&next, dial);
        if let (Some(resolver), Some(cert)) = (&self.server_tls, server_cert) {
            self.metrics
                .set_cert_expiry(CertListener::Public, cert.not_after);
            resolver.set(cert);
        }
        let policy = cache_policy(&next);
        if let Some(shared) = self.store.shared() {
            shared.set_limits(
                policy.positive_lifetime(),
                policy.max_object_bytes,
                next.upstream_timeout,
            );
        }
        self.store.policy.store(policy);
        self.invalid_tokens.set_ttl(next.auth_negative_ttl);
        self.config.store(next);
    }
}

/// Re-reads the configuration from where it came from (argv, environment, `--config` file).
pub type Loader = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Applies a new log level (`--log-level`); the binary owns the subscriber.
pub type LogLevelHook = Box<dyn Fn(&str) + Send + Sync>;

/// Runs reloads: [`Reloader::reload`] on SIGHUP, [`Reloader::watch`] for file changes.
pub struct Reloader {
    proxy: Arc<Proxy>,
    load: Loader,
    on_log_level: Option<LogLevelHook>,
    /// What the last reload saw; also serialises reloads (SIGHUP and the file watcher).
    state: Mutex<WatchState>,
}

/// The trigger of the retries [`Reloader::check_files`] makes while the last reload failed.
const RETRY: &str = "retry of a failed reload";

struct WatchState {
    /// The watched files' contents as of the last reload (or start).
    seen: Vec<(PathBuf, Option<u64>)>,
    /// The last reload's error, while it stands. A failed reload may have named files the
    /// running configuration does not watch (a new `webhook_secrets_file` in a ConfigMap
    /// updated before the Secret holding it), so while this is set every check retries.
    failed: Option<String>,
}

impl Reloader {
    pub fn new(proxy: Arc<Proxy>, load: Loader) -> Reloader {
        let seen = fingerprints(&proxy.config.load());
        Reloader {
            proxy,
            load,
            on_log_level: None,
            state: Mutex::new(WatchState { seen, failed: None }),
        }
    }

    /// Calls `hook` with the new `--log-level` when a reload changes it.
    pub fn with_log_level(mut self, hook: LogLevelHook) -> Reloader {
        self.on_log_level = Some(hook);
        self
    }

    /// Reads the configuration again and applies it; what SIGHUP does. `trigger` says why,
    /// for the log line. Returns whether the new configuration was applied.
    pub fn reload(&self, trigger: &str) -> bool {
        let running = self.proxy.config.load();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Taken before reading, so a file that changes while we read is seen again next time.
        let before = fingerprints(&running);
        let result = (self.load)()
            .map_err(ReloadError::from)
            .and_then(|next| self.proxy.apply_config(next));
        match result {
            Ok(kept) => {
                self.proxy.metrics.config_reload(ReloadResult::Ok);
                let now = self.proxy.config.load();
                // The hashes from before the loader read the files, never after applying: a
                // file replaced in between must not be recorded as applied. Files the new
                // configuration names for the first time have no such hash; leaving them out
                // makes the next check reload once more (harmless) rather than miss a change.
                state.seen = now
                    .watched_files()
                    .into_iter()
                    .filter_map(|path| before.iter().find(|(p, _)| p == path).cloned())
                    .collect();
                state.failed = None;
                if now.log_level != running.log_level
                    && let Some(hook) = &self.on_log_level
                {
                    hook(&now.log_level);
                }
                if kept.is_empty() {
                    tracing::info!(trigger, "configuration reloaded");
                } else {
                    tracing::warn!(
                        trigger,
                        restart_only = kept.join(", "),
                        "configuration reloaded; restart-only settings keep their running values: {}",
                        kept.join(", ")
                    );
                }
                true
            }
            Err(e) => {
                let problem = e.to_string();
                // Retries repeat a standing failure every interval: logged and counted once
                // per distinct failure. A SIGHUP always is (an operator asked).
                if trigger == RETRY && state.failed.as_deref() == Some(problem.as_str()) {
                    tracing::debug!(trigger, "configuration reload still failing: {problem}");
                } else {
                    self.proxy.metrics.config_reload(ReloadResult::Error);
                    tracing::error!(
                        trigger,
                        "configuration reload failed, nothing changed: {problem}"
                    );
                }
                state.failed = Some(problem);
                state.seen = before;
                false
            }
        }
    }

    /// Reloads if a watched file's content changed since the last look, or retries while the
    /// last reload failed (what it needs may be a file nobody watches yet).
    pub fn check_files(&self) -> bool {
        let now = fingerprints(&self.proxy.config.load());
        let (changed, failed) = {
            let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            (state.seen != now, state.failed.is_some())
        };
        if failed {
            self.reload(RETRY)
        } else {
            changed && self.reload("file change")
        }
    }

    /// Checks the watched files every `--reload-interval` (live: a reload can change it; 0
    /// pauses the checks) until the task is dropped.
    pub async fn watch(self: Arc<Self>) {
        loop {
            let interval = self.proxy.config.load().reload_interval;
            if interval.is_zero() {
                // Off; look again later in case a SIGHUP reload turns it on.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            tokio::time::sleep(interval).await;
            // File reads are small but blocking: off the request threads.
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.check_files()).await;
        }
    }
}

/// A content hash of each watched file (`None`: unreadable right now). Following symlinks, so
/// a swapped link counts as the change it is.
fn fingerprints(config: &Config) -> Vec<(PathBuf, Option<u64>)> {
    config
        .watched_files()
        .into_iter()
        .map(|path| {
            let hash = std::fs::read(path).ok().map(|bytes| {
                let mut h = DefaultHasher::new();
                bytes.hash(&mut h);
                h.finish()
            });
            (path.to_path_buf(), hash)
        })
        .collect()
}
