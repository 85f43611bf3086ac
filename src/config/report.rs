//! The effective configuration: every setting's value and where it came from (flag, env, file,
//! default), so an operator can see which value won and diff what runs against what was meant
//! (`--print-config`). Secrets appear as set or unset only; a password in a URL is masked.
//!
//! Built from clap's own list of arguments, so settings added later are reported without being
//! listed here.

use std::ffi::OsString;
use std::fmt::Write as _;

use clap::CommandFactory;

use super::{Cli, Config, ConfigError, Sources, hints};

/// Where a setting's value came from (SPEC §2 precedence: flag > env > file > default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env,
    File,
    Default,
    /// Not set, and its default follows other settings (`max_object_bytes` from
    /// `cache_max_bytes`): the value shown is the one it runs with.
    Derived,
    /// No value at all: an optional setting left out.
    Unset,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Flag => "flag",
            Origin::Env => "env",
            Origin::File => "file",
            Origin::Default => "default",
            Origin::Derived => "default (derived)",
            Origin::Unset => "unset",
        }
    }

    fn from_raw(origin: &str) -> Origin {
        match origin {
            "command line" => Origin::Flag,
            "environment" => Origin::Env,
            "config file" => Origin::File,
            _ => Origin::Default,
        }
    }
}

/// One setting as it runs.
#[derive(Debug, Clone)]
pub struct Setting {
    /// Snake case: the TOML key (`cache_ttl`).
    pub key: String,
    /// The value as given (masked for secrets and URL passwords); `None` when unset.
    pub value: Option<String>,
    pub origin: Origin,
    /// Secrets are reported as set/unset only.
    pub secret: bool,
    /// How `--print-config` writes the value, so its output loads as the same TOML types a
    /// hand-written file would use.
    kind: Kind,
}

/// The TOML type of a setting's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Counts and ratios (`N`, `F`): TOML numbers.
    Number,
    /// `BOOL`: TOML `true`/`false`.
    Bool,
    /// Everything else (durations, sizes, addresses, rates): TOML strings.
    Text,
}

/// Every setting of a loaded configuration, in `--help` order.
#[derive(Debug, Clone)]
pub struct Effective {
    pub settings: Vec<Setting>,
    /// The `--config` file, if any, and whether it came from the flag or the environment.
    pub config_file: Option<(String, Origin)>,
}

/// What start-up needs: the validated configuration, its report, the warnings to log once
/// logging is up, and whether `--print-config` was asked for.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub effective: Effective,
    pub warnings: Vec<String>,
    pub print_config: bool,
}

impl Config {
    /// [`Config::load`] plus the effective-configuration report and start-up warnings
    /// (unknown `CHATWOOT_CACHE_*` variables). `--help` and `--version` exit here, as with `load`.
    pub fn load_reported() -> Result<Loaded, ConfigError> {
        let matches = Cli::command().get_matches();
        loaded(&matches, std::env::vars_os())
    }

    /// The same for matches already parsed (the binary keeps them for reloads).
    pub fn from_matches_reported(matches: &clap::ArgMatches) -> Result<Loaded, ConfigError> {
        loaded(matches, std::env::vars_os())
    }

    /// The same for an explicit argument list (tests; the environment still applies).
    pub fn try_load_reported<I, T>(args: I) -> Result<Loaded, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = Cli::command()
            .try_get_matches_from(args)
            .map_err(|e| ConfigError::invalid("args", e.to_string()))?;
        loaded(&matches, std::env::vars_os())
    }
}

fn loaded(
    matches: &clap::ArgMatches,
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<Loaded, ConfigError> {
    let src = Sources::new(matches)?;
    let config = Config::from_sources(src.clone())?;
    let effective = Effective::from_sources(&src, &config)?;
    let mut warnings = hints::unknown_env_vars(env);
    if config.rate_limit_burst.is_some() && config.rate_limit_per_token.is_none() {
        // Not an error (SPEC 2: a setting left at its default never contradicts one that was
        // set), but an operator who set it expects a limit.
        warnings
            .push("--rate-limit-burst is ignored: no --rate-limit-per-token is set".to_string());
    }
    Ok(Loaded {
        config,
        effective,
        warnings,
        print_config: matches.get_flag("print_config"),
    })
}

impl Effective {
    fn from_sources(src: &Sources<'_>, config: &Config) -> Result<Effective, ConfigError> {
        let mut settings = Vec::new();
        for arg in Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            if arg.get_env().is_none() || id == "config" {
                continue; // --help, --version, --print-config: not settings
            }
            let secret = arg.is_hide_env_values_set()
                || arg
                    .get_value_names()
                    .is_some_and(|n| n.iter().any(|n| n.as_str() == "SECRET"));
            let kind = match arg
                .get_value_names()
                .and_then(|n| n.first())
                .map(|n| n.as_str())
            {
                Some("N" | "F") => Kind::Number,
                Some("BOOL") => Kind::Bool,
                _ => Kind::Text,
            };
            let (value, origin) = match src.get(id)? {
                Some(raw) if !raw.value.is_empty() => {
                    let value = if secret {
                        "set".to_string()
                    } else {
                        mask_url_password(&raw.value)
                    };
                    (Some(value), Origin::from_raw(raw.origin))
                }
                _ => match derived_default(config, id) {
                    Some(v) => (Some(v), Origin::Derived),
                    None => (None, Origin::Unset),
                },
            };
            settings.push(Setting {
                key: id.to_string(),
                value,
                origin,
                secret,
                kind,
            });
        }
        let config_file = src
            .matches
            .get_one::<std::path::PathBuf>("config")
            .map(|p| {
                let origin = match src.matches.value_source("config") {
                    Some(clap::parser::ValueSource::EnvVariable) => Origin::Env,
                    _ => Origin::Flag,
                };
                (p.display().to_string(), origin)
            });
        Ok(Effective {
            settings,
            config_file,
        })
    }

    /// One log line: `key=value [source]` for every setting.
    pub fn to_line(&self) -> String {
        let mut out = String::new();
        if let Some((path, origin)) = &self.config_file {
            let _ = write!(out, "config={path} [{}] ", origin.as_str());
        }
        for s in &self.settings {
            match (&s.value, s.origin) {
                (Some(v), o) => {
                    let _ = write!(out, "{}={v} [{}] ", s.key, o.as_str());
                }
                (None, _) => {
                    let _ = write!(out, "{}=unset ", s.key);
                }
            }
        }
        out.truncate(out.trim_end().len());
        out
    }

    /// `{"cache_ttl": {"value": "10s", "source": "default"}, ...}` for JSON logs.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        if let Some((path, origin)) = &self.config_file {
            map.insert(
                "config".into(),
                serde_json::json!({"value": path, "source": origin.as_str()}),
            );
        }
        for s in &self.settings {
            map.insert(
                s.key.clone(),
                serde_json::json!({"value": s.value, "source": s.origin.as_str()}),
            );
        }
        serde_json::Value::Object(map)
    }

    /// `--print-config`: a TOML file of the running values, each with its source. Secrets and
    /// unset settings are comments, so the output is itself a valid `--config` file.
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# chatwoot-cache effective configuration. After each value: where it came from\n\
             # (flag, env = CHATWOOT_CACHE_*, file = --config, default).\n\
             # Secrets are shown as set or unset only.\n",
        );
        if let Some((path, origin)) = &self.config_file {
            let _ = writeln!(out, "# --config {path} [{}]", origin.as_str());
        }
        for s in &self.settings {
            match &s.value {
                None => {
                    let _ = writeln!(out, "# {} unset", s.key);
                }
                Some(_) if s.secret => {
                    let _ = writeln!(out, "# {} set [{}], not printed", s.key, s.origin.as_str());
                }
                Some(v) => {
                    let literal = match s.kind {
                        Kind::Number if v.parse::<f64>().is_ok() => v.clone(),
                        Kind::Bool if v == "true" || v == "false" => v.clone(),
                        _ => toml::Value::String(v.clone()).to_string(),
                    };
                    if s.origin == Origin::Derived {
                        // Commented out: a file made from this output keeps deriving it, so
                        // a later edit of what it derives from still rescales it.
                        let _ = writeln!(out, "# {} = {literal} # {}", s.key, s.origin.as_str());
                    } else {
                        let _ = writeln!(out, "{} = {literal} # {}", s.key, s.origin.as_str());
                    }
                }
            }
        }
        out
    }
}

/// Defaults computed from other settings (no fixed default for clap to report): the value the
/// configuration runs with. `None` only where the setting really is off (no rate limit: no
/// burst either).
fn derived_default(config: &Config, id: &str) -> Option<String> {
    match id {
        "admin_listen" => Some(config.admin_listen.to_string()),
        "max_object_bytes" => Some(format_size(config.max_object_bytes)),
        "upstream_max_in_flight_per_token" => Some(config.per_token_in_flight().to_string()),
        "rate_limit_burst" => config.rate_limit().map(|(_, burst)| burst.to_string()),
        _ => None,
    }
}

/// `4194304` → `4MiB`: sizes as an operator writes them, exact (`1000B` when no binary unit
/// divides it: a bare number is not a size).
fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    if bytes == 0 {
        return "0".into();
    }
    format!("{bytes}B")
}

/// `redis://user:secret@host` → `redis://user:***@host`: URLs may carry a password.
fn mask_url_password(value: &str) -> String {
    let Some(scheme_end) = value.find("://") else {
        return value.to_string();
    };
    let rest = &value[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return value.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    format!(
        "{}{user}:***{}",
        &value[..scheme_end + 3],
        &value[scheme_end + 3 + at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Loaded {
        let mut v = vec!["chatwoot-cache"];
        v.extend_from_slice(args);
        let matches = Cli::command().try_get_matches_from(v).unwrap();
        loaded(&matches, Vec::new()).unwrap()
    }

    fn setting<'a>(e: &'a Effective, key: &str) -> &'a Setting {
        e.settings.iter().find(|s| s.key == key).unwrap()
    }

    #[test]
    fn a_burst_without_a_rate_starts_with_one_warning() {
        let l = load(&["--upstream", "http://x", "--rate-limit-burst", "5"]);
        assert_eq!(l.config.rate_limit(), None);
        assert_eq!(
            l.warnings,
            ["--rate-limit-burst is ignored: no --rate-limit-per-token is set"]
        );
        let l = load(&["--upstream", "http://x", "--rate-limit-per-token", "5/s"]);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    }

    #[test]
    fn every_setting_with_its_source() {
        let l = load(&[
            "--upstream",
            "http://127.0.0.1:1",
            "--admin-token",
            "very-secret-admin",
        ]);
        let e = &l.effective;
        assert_eq!(setting(e, "upstream").origin, Origin::Flag);
        assert_eq!(setting(e, "cache_ttl").value.as_deref(), Some("10s"));
        assert_eq!(setting(e, "cache_ttl").origin, Origin::Default);
        assert_eq!(setting(e, "webhook_secret").origin, Origin::Unset);
        let line = e.to_line();
        assert!(
            line.contains("upstream=http://127.0.0.1:1 [flag]"),
            "{line}"
        );
        assert!(line.contains("admin_token=set [flag]"), "{line}");
        assert!(line.contains("webhook_secret=unset"), "{line}");
        assert!(!line.contains("very-secret-admin"), "{line}");
        assert!(!e.to_json().to_string().contains("very-secret-admin"));
        assert!(!e.to_toml().contains("very-secret-admin"));
        assert!(!l.print_config);
    }

    #[test]
    fn file_values_say_so_and_print_config_round_trips() {
        let dir = std::env::temp_dir().join(format!("cwc-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "cache_ttl = \"5s\"\nupstream_max_in_flight = 64\n").unwrap();
        let l = load(&[
            "--upstream",
            "http://127.0.0.1:1",
            "--config",
            path.to_str().unwrap(),
            "--print-config",
        ]);
        assert!(l.print_config);
        assert_eq!(setting(&l.effective, "cache_ttl").origin, Origin::File);
        let toml_text = l.effective.to_toml();
        assert!(
            toml_text.contains("cache_ttl = \"5s\" # file"),
            "{toml_text}"
        );
        assert!(
            toml_text.contains("upstream_max_in_flight = 64 # file"),
            "{toml_text}"
        );
        // The printed file is a valid --config file that gives the same configuration.
        let printed = dir.join("printed.toml");
        std::fs::write(&printed, &toml_text).unwrap();
        let again = load(&["--config", printed.to_str().unwrap()]);
        assert_eq!(again.config.cache_ttl, l.config.cache_ttl);
        assert_eq!(again.config.upstream_max_in_flight, 64);
        assert_eq!(
            setting(&again.effective, "upstream").value.as_deref(),
            Some("http://127.0.0.1:1")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn derived_defaults_show_the_value_in_use() {
        let l = load(&[
            "--upstream",
            "http://127.0.0.1:1",
            "--cache-max-bytes",
            "16MiB",
        ]);
        let s = setting(&l.effective, "max_object_bytes");
        assert_eq!(
            (s.value.as_deref(), s.origin),
            (Some("1MiB"), Origin::Derived)
        );
        assert!(
            l.effective
                .to_line()
                .contains("max_object_bytes=1MiB [default (derived)]"),
            "{}",
            l.effective.to_line()
        );
        // The per-token share follows --upstream-max-in-flight (a quarter); the burst follows
        // the rate (its per-second value) and is unset only when there is no rate limit.
        let s = setting(&l.effective, "upstream_max_in_flight_per_token");
        assert_eq!(
            (s.value.as_deref(), s.origin),
            (Some("64"), Origin::Derived)
        );
        let s = setting(&l.effective, "rate_limit_burst");
        assert_eq!((s.value.as_deref(), s.origin), (None, Origin::Unset));
        let l = load(&[
            "--upstream",
            "http://127.0.0.1:1",
            "--upstream-max-in-flight",
            "40",
            "--rate-limit-per-token",
            "600/m",
        ]);
        let s = setting(&l.effective, "upstream_max_in_flight_per_token");
        assert_eq!(
            (s.value.as_deref(), s.origin),
            (Some("10"), Origin::Derived)
        );
        let s = setting(&l.effective, "rate_limit_burst");
        assert_eq!(
            (s.value.as_deref(), s.origin),
            (Some("10"), Origin::Derived)
        );
        assert_eq!(
            l.config.rate_limit().map(|(_, b)| b),
            Some(10),
            "the value shown is the one in use"
        );
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(3 << 30), "3GiB");
    }

    /// `--print-config`'s output, fed back as `--config`, runs the same configuration, with
    /// TOML types a person would write (booleans and numbers unquoted).
    #[test]
    fn print_config_output_loads_as_the_same_configuration() {
        let dir = std::env::temp_dir().join(format!("cwc-roundtrip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = load(&[
            "--upstream",
            "http://127.0.0.1:1",
            "--cache-ttl",
            "5s",
            "--cache-max-bytes",
            "3000B",
            "--webhook-allow-query-secret",
            "--rate-limit-per-token",
            "20/s",
            "--breaker-failure-ratio",
            "0.25",
            "--refresh-ahead",
            "0",
            "--trusted-proxies",
            "10.0.0.0/8",
            "--log-format",
            "json",
        ]);
        let printed = first.effective.to_toml();
        for line in [
            "webhook_allow_query_secret = true # flag",
            "breaker_failure_ratio = 0.25 # flag",
            "upstream_max_in_flight = 256 # default",
            "# upstream_max_in_flight_per_token = 64 # default (derived)",
            "# rate_limit_burst = 20 # default (derived)",
            "cache_max_bytes = \"3000B\" # flag",
            "# max_object_bytes = \"187B\" # default (derived)",
        ] {
            assert!(printed.contains(line), "{line:?} not in\n{printed}");
        }
        let path = dir.join("printed.toml");
        std::fs::write(&path, &printed).unwrap();
        let second = load(&["--config", path.to_str().unwrap()]);
        // Same values, setting by setting (the sources differ: now all from the file).
        let values = |e: &Effective| -> Vec<(String, Option<String>)> {
            e.settings
                .iter()
                .map(|s| (s.key.clone(), s.value.clone()))
                .collect()
        };
        assert_eq!(values(&second.effective), values(&first.effective));
        assert!(second.config.webhook_allow_query_secret);
        assert_eq!(
            second.config.max_object_bytes,
            first.config.max_object_bytes
        );
        assert_eq!(second.config.rate_limit().map(|(_, b)| b), Some(20));
        // And printing it again gives the same file but for the sources.
        let strip = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.rsplit_once(" # ").map_or(l, |(v, _)| v).to_string())
                .collect()
        };
        assert_eq!(strip(&second.effective.to_toml()), strip(&printed));
        // A derived value is not pinned by the printed file: editing what it derives from
        // still rescales it.
        let edited = printed.replace(
            "cache_max_bytes = \"3000B\" # flag",
            "cache_max_bytes = \"1600B\"",
        );
        std::fs::write(&path, &edited).unwrap();
        let third = load(&["--config", path.to_str().unwrap()]);
        assert_eq!(third.config.max_object_bytes, 100);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            mask_url_password("redis://user:pw@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(mask_url_password("rediss://:pw@h"), "rediss://:***@h");
        assert_eq!(mask_url_password("http://h/a@b"), "http://h/a@b");
        assert_eq!(mask_url_password("0.0.0.0:8080"), "0.0.0.0:8080");
    }
}
