//! `docs/configuration.md` is the output of `chatwoot-cache --help` under a short header, so the
//! reference cannot drift from the binary: this test fails when they differ, and
//! `UPDATE_DOCS=1 cargo test --test docs` rewrites the file from the binary.

use std::process::Command;

const HEADER: &str = "\
# Configuration reference

<!-- Generated from `chatwoot-cache --help` by tests/docs.rs; do not edit by hand.
     After changing a flag: UPDATE_DOCS=1 cargo test --test docs -->

Every setting is a flag, an environment variable and a key of the optional TOML file given with
`--config` (the flag's name with `_` for `-`: `--cache-ttl` → `cache_ttl`). Precedence: flag >
environment > file > default. Durations: `250ms`, `10s`, `5m`, `1h`; sizes: `512KiB`,
`256MiB`, `1GiB`, `1000B` (a bare number other than `0` is refused for both). Counts and ratios
may be plain TOML numbers, `true`/`false` TOML booleans, everything else is a string.
`chatwoot-cache --print-config` shows the values a given set of flags, variables and file gives,
and where each came from.

";

fn help() -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatwoot-cache"));
    // clap prints the current value of a setting's variable next to it: keep them out.
    for (k, _) in std::env::vars() {
        if k.starts_with("CHATWOOT_CACHE_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.arg("--help").output().expect("run --help");
    assert!(out.status.success());
    // Without trailing blanks, which editors strip from Markdown.
    let help = String::from_utf8(out.stdout).expect("UTF-8 help");
    help.lines()
        .map(|l| format!("{}\n", l.trim_end()))
        .collect()
}

#[test]
fn configuration_reference_is_the_help_output() {
    let expected = format!("{HEADER}```text\n{}```\n", help());
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(path, &expected).expect("write docs/configuration.md");
        return;
    }
    let actual = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        actual == expected,
        "docs/configuration.md differs from `chatwoot-cache --help`: run \
         `UPDATE_DOCS=1 cargo test --test docs` and commit the result"
    );
}
