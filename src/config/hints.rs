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
/// closest setting when there is one). Values are never read: a mistyped secret stays secret.
pub fn unknown_env_vars(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<String> {
    let known = setting_keys();
    let mut out = Vec::new();
    for (name, _) in vars {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if rest == "CONFIG" || is_service_link(rest) {
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

/// Variables Kubernetes injects for a Service named `chatwoot-cache` (service links):
/// `_SERVICE_HOST`, `_SERVICE_PORT`, `_SERVICE_PORT_<NAME>`, `_PORT`, `_PORT_<N>_<PROTO>` and its
/// `_PROTO`/`_PORT`/`_ADDR` forms. They share the prefix but are not settings.
fn is_service_link(rest: &str) -> bool {
    if rest == "SERVICE_HOST" || rest == "SERVICE_PORT" || rest == "PORT" {
        return true;
    }
    if rest.starts_with("SERVICE_PORT_") {
        return true;
    }
    let Some(port_rest) = rest.strip_prefix("PORT_") else {
        return false;
    };
    let mut parts = port_rest.splitn(3, '_');
    let number = parts.next().unwrap_or("");
    let proto = parts.next().unwrap_or("");
    let tail = parts.next();
    !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && matches!(proto, "TCP" | "UDP" | "SCTP")
        && matches!(tail, None | Some("PROTO" | "PORT" | "ADDR"))
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
        let w = unknown_env_vars(vars(&[
            "CHATWOOT_CACHE_SERVICE_HOST",
            "CHATWOOT_CACHE_SERVICE_PORT",
            "CHATWOOT_CACHE_SERVICE_PORT_ADMIN",
            "CHATWOOT_CACHE_PORT",
            "CHATWOOT_CACHE_PORT_9090_TCP",
            "CHATWOOT_CACHE_PORT_80_TCP_ADDR",
            "CHATWOOT_CACHE_PORT_80_TCP_PORT",
            "CHATWOOT_CACHE_PORT_80_TCP_PROTO",
            "CHATWOOT_CACHE_CONFIG",
        ]));
        assert!(w.is_empty(), "{w:?}");
        // Not a service link: the port has no number.
        assert_eq!(
            unknown_env_vars(vars(&["CHATWOOT_CACHE_PORT_X_TCP"])).len(),
            1
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
