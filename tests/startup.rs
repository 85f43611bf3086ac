//! What an operator sees at start-up, black-box: the effective configuration (text and JSON,
//! `--print-config`), warnings for mistyped `CHATWOOT_CACHE_*` variables, errors that say what
//! to write instead, and upstream failures logged with the host and the OS error.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chatwoot-cache"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CHATWOOT_CACHE_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    bin()
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A running binary whose stderr is read line by line.
struct Running {
    child: Child,
    err: BufReader<std::process::ChildStderr>,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = bin()
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let err = BufReader::new(child.stderr.take().unwrap());
        Running { child, err }
    }

    /// The next stderr line that contains `needle` (lines before it are returned too).
    fn until(&mut self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let mut line = String::new();
            if self.err.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let found = line.contains(needle);
            seen.push(line.trim_end().to_string());
            if found {
                return seen;
            }
        }
        panic!("no line with {needle:?} in {seen:#?}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn first_line_is_the_effective_configuration_with_sources() {
    let dir = temp_dir("startup-effective");
    let file = dir.join("c.toml");
    std::fs::write(&file, "cache_ttl = \"7s\"\n").unwrap();
    let mut p = Running::start(&[
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--config",
        file.to_str().unwrap(),
        "--admin-token",
        "admin-secret-value",
    ]);
    let lines = p.until("listening");
    let first = &lines[0];
    assert!(first.contains("effective configuration:"), "{first}");
    for part in [
        "upstream=http://127.0.0.1:9 [flag]",
        "cache_ttl=7s [file]",
        "stale_if_error=10m [default]",
        "admin_token=set [flag]",
        "webhook_secret=unset",
    ] {
        assert!(first.contains(part), "{part:?} not in {first}");
    }
    assert!(!lines.iter().any(|l| l.contains("admin-secret-value")));
    // The listening line says which TLS it means.
    assert!(lines.last().unwrap().contains("listen_tls=false"));
}

#[test]
fn json_logs_carry_the_configuration_as_one_object() {
    let mut p = Running::start(&[
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--webhook-secret",
        "webhook-secret-value",
    ]);
    let lines = p.until("listening");
    let v: serde_json::Value = serde_json::from_str(&lines[0]).expect("a JSON line");
    assert_eq!(v["message"], "effective configuration");
    assert_eq!(v["level"], "INFO");
    assert_eq!(
        v["config"]["log_format"],
        serde_json::json!({"value": "json", "source": "flag"})
    );
    assert_eq!(v["config"]["cache_ttl"]["source"], "default");
    assert_eq!(v["config"]["webhook_secret"]["value"], "set");
    assert!(!lines[0].contains("webhook-secret-value"));
}

#[test]
fn print_config_prints_toml_with_sources_and_exits() {
    let o = run(
        &["--upstream", "http://127.0.0.1:9", "--print-config"],
        &[
            ("CHATWOOT_CACHE_CACHE_TTL", "3s"),
            ("CHATWOOT_CACHE_ADMIN_TOKEN", "admin-secret-value"),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("upstream = \"http://127.0.0.1:9\" # flag"),
        "{out}"
    );
    assert!(out.contains("cache_ttl = \"3s\" # env"), "{out}");
    assert!(
        out.contains("upstream_max_in_flight = 256 # default"),
        "{out}"
    );
    assert!(
        out.contains("# admin_token set [env], not printed"),
        "{out}"
    );
    assert!(!out.contains("admin-secret-value"));
    toml::from_str::<toml::Table>(&out).expect("valid TOML");
}

/// `--print-config`'s output given back as `--config` prints the same configuration (values
/// and TOML types; only the sources change to `file`), with a boolean, numbers, a rate,
/// durations, sizes and derived values in it.
#[test]
fn print_config_output_is_a_config_file_for_the_same_configuration() {
    let dir = temp_dir("startup-roundtrip");
    let first = run(
        &[
            "--upstream",
            "http://127.0.0.1:9",
            "--cache-max-bytes",
            "64MiB",
            "--webhook-allow-query-secret",
            "--rate-limit-per-token",
            "600/m",
            "--breaker-failure-ratio",
            "0.3",
            "--print-config",
        ],
        &[("CHATWOOT_CACHE_CACHE_TTL", "3s")],
    );
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let printed = text(&first.stdout);
    for line in [
        "webhook_allow_query_secret = true # flag",
        "breaker_failure_ratio = 0.3 # flag",
        "# rate_limit_burst = 10 # default (derived)",
        "# upstream_max_in_flight_per_token = 64 # default (derived)",
        "# max_object_bytes = \"4MiB\" # default (derived)",
    ] {
        assert!(printed.contains(line), "{line:?} not in:\n{printed}");
    }
    let path = dir.join("printed.toml");
    std::fs::write(&path, &printed).unwrap();
    let second = run(&["--config", path.to_str().unwrap(), "--print-config"], &[]);
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    let settings = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.rsplit_once(" # ").map_or(l, |(v, _)| v).to_string())
            .collect()
    };
    assert_eq!(settings(&text(&second.stdout)), settings(&printed));
    assert!(
        text(&second.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .all(|l| l.ends_with("# file")),
        "{}",
        text(&second.stdout)
    );
}

#[test]
fn mistyped_variables_are_warned_and_service_links_are_not() {
    let o = run(
        &["--upstream", "http://127.0.0.1:9", "--print-config"],
        &[
            ("CHATWOOT_CACHE_TTL", "5s"),
            ("CHATWOOT_CACHE_SERVICE_HOST", "10.0.0.1"),
            ("CHATWOOT_CACHE_SERVICE_PORT", "80"),
            ("CHATWOOT_CACHE_PORT", "tcp://10.0.0.1:80"),
            ("CHATWOOT_CACHE_PORT_9090_TCP", "tcp://10.0.0.1:9090"),
            ("CHATWOOT_CACHE_PORT_9090_TCP_ADDR", "10.0.0.1"),
            // A Service `chatwoot-cache-redis` in the same namespace.
            ("CHATWOOT_CACHE_REDIS_SERVICE_HOST", "10.0.0.2"),
            ("CHATWOOT_CACHE_REDIS_SERVICE_PORT", "6379"),
            ("CHATWOOT_CACHE_REDIS_PORT", "tcp://10.0.0.2:6379"),
            ("CHATWOOT_CACHE_REDIS_PORT_6379_TCP", "tcp://10.0.0.2:6379"),
            ("CHATWOOT_CACHE_REDIS_PORT_6379_TCP_PORT", "6379"),
        ],
    );
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        text(&o.stderr).trim_end(),
        "warning: environment variable CHATWOOT_CACHE_TTL is not a setting and is ignored; \
         did you mean CHATWOOT_CACHE_CACHE_TTL?"
    );
}

#[test]
fn errors_say_what_to_write_instead() {
    let dir = temp_dir("startup-errors");
    let dashed = dir.join("dashed.toml");
    std::fs::write(&dashed, "upstream = \"http://x\"\ncache-ttl = \"5s\"\n").unwrap();
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "upstream = \"http://x\"\ncache_ttl = 5s\n").unwrap();
    let cases: [(&[&str], String); 4] = [
        (
            &["--upstream", "http://x", "--cache-ttl", "5"],
            "error: --cache-ttl: \"5\" has no unit: write e.g. \"5s\" (units: ms, s, m, h)"
                .to_string(),
        ),
        (
            &["--config", dashed.to_str().unwrap()],
            format!(
                "error: --config: {}:2:1: unknown setting `cache-ttl`; did you mean `cache_ttl`? \
                 (keys are flag names with `_` for `-`)",
                dashed.display()
            ),
        ),
        (
            &["--config", broken.to_str().unwrap()],
            format!("error: --config: {}:2:13: ", broken.display()),
        ),
        (
            &["--upstream", "http://x", "--cache-max-bytes", "1000"],
            "error: --cache-max-bytes: \"1000\" has no unit: write e.g. \"1000MiB\", or \
             \"1000B\" for bytes (units: B, KiB, MiB, GiB, KB, MB, GB)"
                .to_string(),
        ),
    ];
    for (args, expected) in cases {
        let o = run(args, &[]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(
            err.starts_with(&expected),
            "{args:?}:\n{err}\nexpected:\n{expected}"
        );
    }
}

/// `TOKIO_WORKER_THREADS` sizes the runtime (README, Deployment); a value tokio would panic on
/// is a one-line configuration error instead.
#[test]
fn an_invalid_worker_thread_count_is_an_error_not_a_panic() {
    for value in ["0", "two", "-1", "", "99999"] {
        let o = run(
            &["--upstream", "http://127.0.0.1:9"],
            &[("TOKIO_WORKER_THREADS", value)],
        );
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{value:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{value:?}: one line: {err}");
        assert!(
            err.starts_with(&format!(
                "error: TOKIO_WORKER_THREADS: {value:?} is not a number of worker threads"
            )),
            "{value:?}: {err}"
        );
    }
}

#[tokio::test]
async fn upstream_failures_name_the_host_and_the_os_error() {
    // A port nothing listens on: connections are refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = closed.local_addr().unwrap();
    drop(closed);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = listener.local_addr().unwrap();
    drop(listener);
    let mut p = Running::start(&[
        "--upstream",
        &format!("http://{upstream}"),
        "--listen",
        &listen.to_string(),
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    p.until("listening");
    let r = send(
        http::Method::GET,
        &format!("http://{listen}/api/v1/accounts/1/conversations/1"),
        &[("api_access_token", "token-value-never-logged")],
        b"",
    )
    .await;
    assert_eq!(r.status, 502);
    let lines = p.until("upstream request failed");
    let line = lines.last().unwrap();
    assert!(line.contains(&format!("upstream={upstream}")), "{line}");
    assert!(
        line.contains("(os error"),
        "the OS error is missing: {line}"
    );
    assert!(!lines.iter().any(|l| l.contains("token-value-never-logged")));
}
