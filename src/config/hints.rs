//! Hints that turn a configuration mistake into something a user can act on: the closest
//! setting to a mistyped name, mistyped `CHATWOOT_CACHE_*` variables (which clap cannot see),
//! and where in a TOML file a syntax error is.

use std::ffi::OsString;

use clap::CommandFactory;

use super::Cli;

/// Prefix of every setting's environment variable (SPEC §2).
pub const ENV_PREFIX: &str = "CHATWOOT_CACHE_";

/// The settings' names in snake case (TOML keys), from clap's own list so that flags added
/// later are known here without being listed twice.
pub fn setting_keys() -> Vec<String> {
    Cli::command()
        .get_arguments()
        .filter(|a| a.get_env().is_some())
        .map(|a| a.get_id().as_str().to_string())
        .filter(|id| id != "config")
        .collect()
}

/// The known setting closest to `given` (a TOML key or an environment variable's suffix, both in
/// snake case), if one is close enough to be what was meant.
pub fn closest<'a>(given: &str, known: &'a [String]) -> Option<&'a str> {
    let given = given.to_ascii_lowercase().replace('-', "_");
    if let Some(exact) = known.iter().find(|k| **k == given) {
        return Some(exact);
    }
    // `TTL` for `CACHE_TTL`: the setting the user shortened. Shortest first, so `ttl` suggests
    // `cache_ttl` rather than `auth_negative_ttl`.
    let suffix = format!("_{given}");
    if let Some(shortened) = known
        .iter()
        .filter(|k| k.ends_with(&suffix))
        .min_by_key(|k| k.len())
    {
        return Some(shortened);
    }
    let limit = (given.len() / 3).max(2);
    known
        .iter()
        .map(|k| (levenshtein(&given, k), k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

/// `CHATWOOT_CACHE_*` variables that are no setting, each with a one-line warning (naming the
/// closest setting when there is one). Values are never printed: a mistyped secret stays
/// secret. A value is only looked at to recognise a Kubernetes service link (see
/// [`is_service_link`]).
pub fn unknown_env_vars(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<String> {
    let known = setting_keys();
    let mut out = Vec::new();
    for (name, value) in vars {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if rest == "CONFIG" || is_service_link(rest, value.to_str().unwrap_or("")) {
            continue;
        }
        let key = rest.to_ascii_lowercase();
        if known.contains(&key) {
            continue;
        }
        let hint = match closest(&key, &known) {
            Some(k) => format!("; did you mean {ENV_PREFIX}{}?", k.to_ascii_uppercase()),
            None => String::new(),
        };
        out.push(format!(
            "environment variable {name} is not a setting and is ignored{hint}"
        ));
    }
    out.sort();
    out
}

/// Variables Kubernetes injects for every Service in the namespace (service links), here for
/// a Service named `chatwoot-cache` or `chatwoot-cache-<anything>` (`chatwoot-cache-redis`, a
/// Redis next to the gateway): `<S>_SERVICE_HOST`, `<S>_SERVICE_PORT`, `<S>_SERVICE_PORT_<NAME>`,
/// `<S>_PORT`, `<S>_PORT_<N>_<PROTO>` and its `_PROTO`/`_PORT`/`_ADDR` forms, where `<S>` is
/// the Service name in upper case with `_` for `-`. They share the prefix but are not settings.
///
/// Any name ending like that would do (`REDIS_PORT`), so the value must have the shape
/// Kubernetes gives it too (an address, a port number, `tcp://10.0.0.1:6379`): a variable
/// someone set by hand with another value is still warned about.
fn is_service_link(rest: &str, value: &str) -> bool {
    let value = value.trim();
    let is_port = |v: &str| !v.is_empty() && v.len() <= 5 && v.bytes().all(|b| b.is_ascii_digit());
    let is_ip = |v: &str| v.parse::<std::net::IpAddr>().is_ok();
    let is_proto = |v: &str| matches!(v, "TCP" | "UDP" | "SCTP");
    // `tcp://10.0.0.1:80` (or `tcp://[fd00::1]:80`).
    let is_link_url = |v: &str| {
        let Some((scheme, addr)) = v.split_once("://") else {
            return false;
        };
        matches!(scheme, "tcp" | "udp" | "sctp") && addr.parse::<std::net::SocketAddr>().is_ok()
    };
    // `<S>` is empty (the Service `chatwoot-cache`) or ends with `_`.
    let service = |prefix: &str| prefix.is_empty() || prefix.ends_with('_');
    if let Some(prefix) = rest.strip_suffix("SERVICE_HOST") {
        return service(prefix) && is_ip(value);
    }
    if let Some(prefix) = rest.strip_suffix("SERVICE_PORT") {
        return service(prefix) && is_port(value);
    }
    if let Some((prefix, name)) = rest.rsplit_once("SERVICE_PORT_") {
        return service(prefix)
            && !name.is_empty()
            && !name.contains("SERVICE_PORT")
            && is_port(value);
    }
    if let Some(prefix) = rest.strip_suffix("PORT")
        && service(prefix)
        && is_link_url(value)
    {
        return true;
    }
    // `<S>_PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR]`: find the `PORT_<N>_<PROTO>` part.
    let parts: Vec<&str> = rest.split('_').collect();
    for i in 0..parts.len() {
        if parts[i] != "PORT" || i + 2 >= parts.len() {
            continue;
        }
        let (number, proto) = (parts[i + 1], parts[i + 2]);
        if !is_port(number) || !is_proto(proto) {
            continue;
        }
        let tail = &parts[i + 3..];
        let value_fits = match tail {
            [] => is_link_url(value),
            ["PROTO"] => value.eq_ignore_ascii_case(proto),
            ["PORT"] => value == number,
            ["ADDR"] => is_ip(value),
            _ => false,
        };
        return value_fits;
    }
    false
}

/// "line L, column C" of byte offset `at` in `text` (both 1-based, columns in characters).
pub fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

/// The problem with a bare number where a duration is expected, with the unit it probably
/// lacks (`5` → `5s`).
pub fn duration_hint(s: &str) -> Option<String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        Some(format!(
            "{s:?} has no unit: write e.g. \"{s}s\" (units: ms, s, m, h)"
        ))
    } else {
        None
    }
}

/// The problem with a bare number where a size is expected (always one: sizes need a unit).
pub fn size_hint(s: &str) -> String {
    format!(
        "{s:?} has no unit: write e.g. \"{s}MiB\", or \"{s}B\" for bytes \
         (units: B, KiB, MiB, GiB, KB, MB, GB)"
    )
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(names: &[&str]) -> Vec<(OsString, OsString)> {
        names
            .iter()
            .map(|n| (OsString::from(n), OsString::from("x")))
            .collect()
    }

    fn vars_with(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(n, v)| (OsString::from(n), OsString::from(v)))
            .collect()
    }

    #[test]
    fn mistyped_variables_are_warned_with_the_closest_setting() {
        let w = unknown_env_vars(vars(&[
            "CHATWOOT_CACHE_TTL",
            "CHATWOOT_CACHE_UPSTREAM_TIMOUT",
            "CHATWOOT_CACHE_BANANA",
            "CHATWOOT_CACHE_CACHE_TTL",
            "PATH",
        ]));
        assert_eq!(
            w,
            vec![
                "environment variable CHATWOOT_CACHE_BANANA is not a setting and is ignored"
                    .to_string(),
                "environment variable CHATWOOT_CACHE_TTL is not a setting and is ignored; did you mean CHATWOOT_CACHE_CACHE_TTL?".to_string(),
                "environment variable CHATWOOT_CACHE_UPSTREAM_TIMOUT is not a setting and is ignored; did you mean CHATWOOT_CACHE_UPSTREAM_TIMEOUT?".to_string(),
            ]
        );
    }

    #[test]
    fn kubernetes_service_links_stay_silent() {
        // What the kubelet injects for the Services `chatwoot-cache` (ports 80 and admin 9090)
        // and `chatwoot-cache-redis` (6379) in the same namespace.
        let w = unknown_env_vars(vars_with(&[
            ("CHATWOOT_CACHE_SERVICE_HOST", "10.0.0.1"),
            ("CHATWOOT_CACHE_SERVICE_PORT", "80"),
            ("CHATWOOT_CACHE_SERVICE_PORT_ADMIN", "9090"),
            ("CHATWOOT_CACHE_PORT", "tcp://10.0.0.1:80"),
            ("CHATWOOT_CACHE_PORT_9090_TCP", "tcp://10.0.0.1:9090"),
            ("CHATWOOT_CACHE_PORT_80_TCP_ADDR", "10.0.0.1"),
            ("CHATWOOT_CACHE_PORT_80_TCP_PORT", "80"),
            ("CHATWOOT_CACHE_PORT_80_TCP_PROTO", "tcp"),
            ("CHATWOOT_CACHE_REDIS_SERVICE_HOST", "10.0.0.2"),
            ("CHATWOOT_CACHE_REDIS_SERVICE_PORT", "6379"),
            ("CHATWOOT_CACHE_REDIS_SERVICE_PORT_REDIS", "6379"),
            ("CHATWOOT_CACHE_REDIS_PORT", "tcp://10.0.0.2:6379"),
            ("CHATWOOT_CACHE_REDIS_PORT_6379_TCP", "tcp://10.0.0.2:6379"),
            ("CHATWOOT_CACHE_REDIS_PORT_6379_TCP_ADDR", "10.0.0.2"),
            ("CHATWOOT_CACHE_REDIS_PORT_6379_TCP_PORT", "6379"),
            ("CHATWOOT_CACHE_REDIS_PORT_6379_TCP_PROTO", "tcp"),
            ("CHATWOOT_CACHE_MY_API_SERVICE_HOST", "fd00::1"),
            ("CHATWOOT_CACHE_MY_API_PORT", "tcp://[fd00::1]:8080"),
            ("CHATWOOT_CACHE_CONFIG", "/etc/c.toml"),
        ]));
        assert!(w.is_empty(), "{w:?}");
        // Not service links: no port number, or set by hand with another kind of value (the
        // shapes alone would match any name ending in `_PORT`).
        let w = unknown_env_vars(vars_with(&[
            ("CHATWOOT_CACHE_PORT_X_TCP", "tcp://10.0.0.1:80"),
            ("CHATWOOT_CACHE_REDIS_PORT", "6379"),
            ("CHATWOOT_CACHE_SERVICE_HOST", "chatwoot.example.com"),
            ("CHATWOOT_CACHE_LISTEN_PORT", "8080"),
            ("CHATWOOT_CACHE_PORT_80_TCP_ADDR", "localhost"),
        ]));
        assert_eq!(w.len(), 5, "{w:?}");
        assert!(
            w.iter()
                .any(|l| l.contains("CHATWOOT_CACHE_REDIS_PORT ") && l.contains("REDIS_URL")),
            "{w:?}"
        );
    }

    #[test]
    fn closest_setting() {
        let known = setting_keys();
        assert_eq!(closest("cache-ttl", &known), Some("cache_ttl"));
        assert_eq!(closest("ttl", &known), Some("cache_ttl"));
        assert_eq!(closest("upstream_timout", &known), Some("upstream_timeout"));
        assert_eq!(closest("banana", &known), None);
    }

    #[test]
    fn positions_are_one_based() {
        assert_eq!(line_col("a = 1\nb = ?\n", 10), (2, 5));
        assert_eq!(line_col("x", 0), (1, 1));
        assert_eq!(line_col("é = ?", 4), (1, 4));
    }

    #[test]
    fn bare_numbers_get_a_unit_hint() {
        assert!(duration_hint("5").unwrap().contains("\"5s\""));
        assert_eq!(duration_hint("5x"), None);
    }
}
