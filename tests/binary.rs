//! The built binary, black-box: configuration errors and exit codes (SPEC §2, §10), precedence
//! flag > env > file > default, `--help`, port in use, and SIGTERM drain with a real signal.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chatwoot-cache"));
    // The test environment must not leak settings into the binary.
    for (k, _) in std::env::vars() {
        if k.starts_with("CHATWOOT_CACHE_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Invalid values stop start-up with exit 2 and one line naming the setting.
#[test]
fn invalid_settings_exit_2_with_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--upstream", "http://x", "--upstream-timeout", "banana"],
            "error: --upstream-timeout: invalid duration \"banana\"",
        ),
        (
            &["--upstream", "http://x", "--cache-max-bytes", "lots"],
            "error: --cache-max-bytes:",
        ),
        (
            &["--upstream", "http://x", "--breaker-failure-ratio", "1.5"],
            "error: --breaker-failure-ratio:",
        ),
        (
            &["--upstream", "http://x", "--upstream-max-in-flight", "0"],
            "error: --upstream-max-in-flight:",
        ),
        // Above tokio's semaphore limit it used to panic at start-up instead.
        (
            &[
                "--upstream",
                "http://x",
                "--upstream-max-in-flight",
                "18446744073709551615",
            ],
            "error: --upstream-max-in-flight: 18446744073709551615 is above the maximum of 1000000",
        ),
        (
            &["--upstream", "http://x", "--log-format", "xml"],
            "error: --log-format:",
        ),
        (&["--upstream", "ftp://x"], "error: --upstream:"),
        (
            &["--upstream", "http://x", "--listen", "nowhere"],
            "error: --listen:",
        ),
        (
            &["--upstream", "http://x", "--tls-cert-file", "Cargo.toml"],
            "error: --tls-cert-file: needs --tls-key-file",
        ),
        (&[], "error: --upstream: is required"),
        // Both forms of one secret.
        (
            &[
                "--upstream",
                "http://x",
                "--admin-token",
                "inline-admin-token",
                "--admin-token-file",
                "Cargo.toml",
            ],
            "error: --admin-token-file: --admin-token is set as well; set one of them",
        ),
        // Only two explicit values conflict (a small cache alone derives its object limit).
        (
            &[
                "--upstream",
                "http://x",
                "--cache-max-bytes",
                "1MiB",
                "--max-object-bytes",
                "2MiB",
            ],
            "error: --max-object-bytes: 2097152 bytes is larger than --cache-max-bytes",
        ),
    ];
    for (args, expected) in cases {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{args:?}: one line, got {err:?}");
        assert!(err.starts_with(expected), "{args:?}: {err:?}");
    }
    let o = run(&["--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
}

/// An environment variable names its source in the error.
#[test]
fn env_errors_name_the_variable() {
    let o = bin()
        .args(["--upstream", "http://x"])
        .env("CHATWOOT_CACHE_CACHE_TTL", "soon")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o).trim(),
        "error: --cache-ttl: invalid duration \"soon\" (from CHATWOOT_CACHE_CACHE_TTL)"
    );
    // A switch is read from the environment too.
    let o = bin()
        .args(["--upstream", "http://x"])
        .env("CHATWOOT_CACHE_WEBHOOK_ALLOW_QUERY_SECRET", "maybe")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o).trim(),
        "error: --webhook-allow-query-secret: must be true or false, not \"maybe\" \
         (from CHATWOOT_CACHE_WEBHOOK_ALLOW_QUERY_SECRET)"
    );
}

/// An unreadable file is exit 1, one line.
#[test]
fn unreadable_files_exit_1() {
    for args in [
        vec![
            "--upstream",
            "http://x",
            "--config",
            "/nonexistent/chatwoot-cache.toml",
        ],
        vec![
            "--upstream",
            "https://x",
            "--upstream-ca-file",
            "/nonexistent/ca.pem",
        ],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1);
    }
}

/// `--help` documents every SPEC setting with its default.
#[test]
fn help_lists_every_setting_and_default() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for (flag, default) in [
        ("--upstream", ""),
        ("--listen", "0.0.0.0:8080"),
        (
            "--admin-listen",
            "0.0.0.0:9090, or 0.0.0.0:9091 when --listen takes port 9090",
        ),
        ("--token-header", "api_access_token"),
        ("--cache-ttl", "10s"),
        ("--stale-while-revalidate", "30s"),
        ("--stale-if-error", "10m"),
        ("--negative-ttl", "5s"),
        ("--auth-negative-ttl", "10s"),
        ("--cache-max-bytes", "256MiB"),
        (
            "--max-object-bytes",
            "4MiB, at most 1/16 of --cache-max-bytes",
        ),
        ("--upstream-timeout", "15s"),
        ("--upstream-connect-timeout", "2s"),
        ("--upstream-max-in-flight", "256"),
        ("--upstream-queue-timeout", "1s"),
        (
            "--upstream-max-in-flight-per-token",
            "a quarter of --upstream-max-in-flight, at least 1",
        ),
        ("--rate-limit-per-token", "off"),
        ("--rate-limit-burst", "the rate per second, at least 1"),
        ("--refresh-ahead", "0.8"),
        ("--refresh-ahead-min-hits", "2"),
        ("--breaker-window", "10s"),
        ("--breaker-min-requests", "20"),
        ("--breaker-failure-ratio", "0.5"),
        ("--breaker-open", "5s"),
        ("--upstream-ca-file", ""),
        ("--tls-cert-file", ""),
        ("--tls-key-file", ""),
        ("--admin-token", ""),
        ("--webhook-secret", ""),
        ("--admin-token-file", ""),
        ("--webhook-secret-file", ""),
        ("--webhook-secrets-file", ""),
        ("--webhook-allow-query-secret", "false"),
        ("--shutdown-timeout", "25s"),
        ("--trusted-proxies", "none"),
        ("--reload-interval", "10s"),
        ("--upstream-client-cert-file", ""),
        ("--upstream-client-key-file", ""),
        ("--max-connections", "10000"),
        ("--max-tunnels", "4096"),
        ("--log-format", "text"),
        ("--log-level", "info"),
    ] {
        // `--flag VALUE`, or `--flag[=VALUE]` for a switch that also takes a value.
        let at = help
            .find(&format!("{flag} "))
            .or_else(|| help.find(&format!("{flag}[")))
            .unwrap_or_else(|| panic!("{flag} missing from --help"));
        let env = format!(
            "CHATWOOT_CACHE_{}",
            flag.trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase()
        );
        let section = &help[at..];
        let section = &section[..section[2..]
            .find("\n      --")
            .map_or(section.len(), |i| i + 2)];
        assert!(section.contains(&env), "{flag}: env {env} not documented");
        if !default.is_empty() {
            assert!(
                section.contains(&format!("[default: {default}]")),
                "{flag}: default {default} not documented"
            );
        }
    }
}

/// Spawns the binary and waits until it logs that it listens.
fn spawn(args: &[&str], envs: &[(&str, &str)]) -> (Child, BufReader<std::process::ChildStderr>) {
    let mut child = bin()
        .args(args)
        .envs(envs.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.contains("listening") {
            return (child, err);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("binary did not start: {line}");
}

/// A port already in use is exit 1 with one clear line.
#[test]
fn port_in_use_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{}", free_port());
    let o = run(&[
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        &listen,
        "--admin-listen",
        &admin,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("error: --listen {listen}:")),
        "{err}"
    );
}

/// Precedence flag > env > file > default, checked on the running binary's behaviour
/// (the token header it validates).
#[tokio::test]
async fn precedence_flag_env_file_default() {
    let fake = FakeChatwoot::start().await;
    let dir = temp_dir("precedence");
    let file = dir.join("config.toml");
    std::fs::write(
        &file,
        format!(
            "upstream = \"{}\"\ntoken_header = \"x-from-file\"\ncache_ttl = \"1m\"\n",
            fake.url()
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap().to_string();
    let check = |header: &'static str, port: u16| async move {
        let url = format!("http://127.0.0.1:{port}/api/v1/accounts/1/contacts");
        let r = send(http::Method::GET, &url, &[(header, "admin-token")], b"").await;
        // Forwarded (the proxy accepted it as the token header) or refused locally.
        r.x_cache().to_string()
    };
    // file beats default
    let p = free_port();
    let (mut child, _e) = spawn(
        &[
            "--config",
            &file,
            "--listen",
            &format!("127.0.0.1:{p}"),
            "--admin-listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
        &[],
    );
    assert_eq!(check("x-from-file", p).await, "BYPASS");
    assert_eq!(check("api_access_token", p).await, "LOCAL");
    child.kill().unwrap();
    let _ = child.wait();
    // env beats file
    let p = free_port();
    let (mut child, _e) = spawn(
        &[
            "--config",
            &file,
            "--listen",
            &format!("127.0.0.1:{p}"),
            "--admin-listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
        &[("CHATWOOT_CACHE_TOKEN_HEADER", "x-from-env")],
    );
    assert_eq!(check("x-from-env", p).await, "BYPASS");
    assert_eq!(check("x-from-file", p).await, "LOCAL");
    child.kill().unwrap();
    let _ = child.wait();
    // flag beats env
    let p = free_port();
    let (mut child, _e) = spawn(
        &[
            "--config",
            &file,
            "--token-header",
            "x-from-flag",
            "--listen",
            &format!("127.0.0.1:{p}"),
            "--admin-listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
        &[("CHATWOOT_CACHE_TOKEN_HEADER", "x-from-env")],
    );
    assert_eq!(check("x-from-flag", p).await, "BYPASS");
    assert_eq!(check("x-from-env", p).await, "LOCAL");
    child.kill().unwrap();
    let _ = child.wait();
}

/// SIGTERM: /readyz 503 at once, the slow in-flight request completes, exit 0; the access log
/// never contains the token.
#[tokio::test]
async fn sigterm_drains_and_exits_0() {
    let fake = FakeChatwoot::start().await;
    fake.set_delay(Duration::from_millis(1500));
    let p = free_port();
    let a = free_port();
    let (mut child, mut err) = spawn(
        &[
            "--upstream",
            &fake.url(),
            "--listen",
            &format!("127.0.0.1:{p}"),
            "--admin-listen",
            &format!("127.0.0.1:{a}"),
            "--log-format",
            "json",
        ],
        &[],
    );
    let url = format!("http://127.0.0.1:{p}/api/v1/accounts/1/conversations/42");
    let slow = tokio::spawn(async move { get(&url, Some("admin-token")).await });
    // SIGTERM only once the slow request is really in flight (start-up time varies).
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.in_flight() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.in_flight(), 1, "the slow request reached the upstream");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut ready = None;
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        ready = try_send(
            &client(),
            http::Method::GET,
            &format!("http://127.0.0.1:{a}/readyz"),
            &[],
            b"",
        )
        .await
        .map(|r| r.status.as_u16())
        .ok();
        if ready == Some(503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready, Some(503), "readiness drops at once");
    assert_eq!(
        fake.in_flight(),
        1,
        "…while the request is still in flight (draining)"
    );
    let r = slow.await.unwrap();
    assert_eq!(
        r.status, 200,
        "in-flight request completed during the drain"
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut err, &mut logs).unwrap();
    let access: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"target\":\"access\""))
        .collect();
    assert_eq!(access.len(), 1, "one access line per request: {logs}");
    let line: serde_json::Value = serde_json::from_str(access[0]).unwrap();
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/api/v1/accounts/1/conversations/42");
    assert_eq!(line["status"], 200);
    assert_eq!(line["cache"], "MISS");
    assert_eq!(line["upstream_status"], 200);
    assert!(line["duration_ms"].as_f64().unwrap() >= 1000.0);
    assert!(
        !logs.contains("admin-token"),
        "the token never reaches a log"
    );
}

/// Secrets Chatwoot's channel routes carry in the path (a Telegram bot token, an Active Storage
/// signed id) never reach the access log: the segments are masked (SPEC 10).
#[tokio::test]
async fn path_secrets_are_masked_in_the_access_log() {
    let fake = FakeChatwoot::start().await;
    let p = free_port();
    let (child, err) = spawn(
        &[
            "--upstream",
            &fake.url(),
            "--listen",
            &format!("127.0.0.1:{p}"),
            "--admin-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--log-format",
            "json",
        ],
        &[],
    );
    let bot = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";
    let blob = "eyJfcmFpbHMiOnsiZGF0YSI6NDIsInB1ciI6ImJsb2JfaWQifX0=--5a0d6b1c";
    for path in [
        format!("/webhooks/telegram/{bot}"),
        format!("/rails/active_storage/blobs/redirect/{blob}/invoice.pdf"),
    ] {
        let url = format!("http://127.0.0.1:{p}{path}");
        let r = send(http::Method::POST, &url, &[], b"{}").await;
        assert_eq!(r.x_cache(), "BYPASS");
    }
    assert!(
        fake.seen()
            .iter()
            .any(|s| s.path_and_query == format!("/webhooks/telegram/{bot}")),
        "forwarded unchanged"
    );
    let logs = stop_and_read_logs(child, err).await;
    let paths: Vec<String> = logs
        .lines()
        .filter(|l| l.contains("\"target\":\"access\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["path"].to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "\"/webhooks/telegram/*\"",
            "\"/rails/active_storage/blobs/redirect/*/*\""
        ]
    );
    assert!(!logs.contains(bot), "{logs}");
    assert!(!logs.contains(blob), "{logs}");
}

/// SIGTERM, wait for the exit, and everything the process logged.
async fn stop_and_read_logs(
    mut child: Child,
    mut err: BufReader<std::process::ChildStderr>,
) -> String {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut err, &mut logs).unwrap();
    logs
}

/// SIGHUP, really sent to the binary: the config file is read again, a lowered TTL applies to
/// the next request while the stored entry survives (`STALE`, not `MISS`), a restart-only
/// setting in the file keeps its running value with one log line naming it, the log level
/// changes, and the reload is counted. An invalid file on the next SIGHUP changes nothing and is counted as an error.
#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let fake = FakeChatwoot::start().await;
    let dir = temp_dir("sighup");
    let file = dir.join("config.toml");
    std::fs::write(&file, "cache_ttl = \"1h\"\n").unwrap();
    let p = free_port();
    let a = free_port();
    let (mut child, mut err) = spawn(
        &[
            "--upstream",
            &fake.url(),
            "--listen",
            &format!("127.0.0.1:{p}"),
            "--admin-listen",
            &format!("127.0.0.1:{a}"),
            "--config",
            file.to_str().unwrap(),
            "--reload-interval",
            "0",
            "--log-format",
            "json",
        ],
        &[],
    );
    let url = format!("http://127.0.0.1:{p}/api/v1/accounts/1/conversations/42");
    assert_eq!(get(&url, Some("admin-token")).await.x_cache(), "MISS");
    assert_eq!(get(&url, Some("admin-token")).await.x_cache(), "HIT");
    let reloads = |result: &'static str| {
        let metrics = format!("http://127.0.0.1:{a}/metrics");
        async move {
            let text = get(&metrics, None).await.text();
            metric(
                &text,
                &format!("chatwoot_cache_config_reloads_total{{result=\"{result}\"}}"),
            )
        }
    };
    let hup = |child: &Child| {
        let kill = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
    };

    std::fs::write(
        &file,
        "cache_ttl = \"50ms\"\nstale_while_revalidate = \"1h\"\ncache_max_bytes = \"1GiB\"\n\
         log_level = \"warn\"\n",
    )
    .unwrap();
    hup(&child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads("ok").await != 1.0 {
        assert!(Instant::now() < deadline, "SIGHUP never reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        get(&url, Some("admin-token")).await.x_cache(),
        "STALE",
        "the new TTL applies; the stored entry survived"
    );

    std::fs::write(&file, "cache_ttl = \"banana\"\n").unwrap();
    hup(&child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads("error").await != 1.0 {
        assert!(Instant::now() < deadline, "the bad reload was not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reloads("ok").await, 1.0);

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut err, &mut logs).unwrap();
    let kept: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("restart-only settings keep their running values"))
        .collect();
    assert_eq!(kept.len(), 1, "{logs}");
    assert!(kept[0].contains("--cache-max-bytes"), "{}", kept[0]);
    // The log level reloaded too: the access lines (info) stop after the reload.
    let access = logs
        .lines()
        .filter(|l| l.contains("\"target\":\"access\""))
        .count();
    assert_eq!(access, 2, "only the two requests before the reload: {logs}");
    let failed: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("configuration reload failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{logs}");
    assert!(
        failed[0].contains("--cache-ttl: invalid duration"),
        "{}",
        failed[0]
    );
}

/// `--redis-ca-file` adds a CA to the system's trusted roots (SPEC 11), it does not replace
/// them: Redis's certificate is signed by a CA only the system store holds (`SSL_CERT_FILE`,
/// which the system store reads), the file names an unrelated CA, and Redis is used. The
/// control run, with the signing CA nowhere, never gets Redis up.
#[tokio::test]
async fn redis_ca_file_adds_to_the_system_roots() {
    let pki = test_pki();
    let other = test_pki();
    let dir = temp_dir("redis-ca-adds");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (cert, key, ca) = (
        write("cert.pem", &pki.cert_pem),
        write("key.pem", &pki.key_pem),
        write("ca.pem", &pki.ca_pem),
    );
    let unrelated = write("unrelated-ca.pem", &other.ca_pem);
    let empty_dir = dir.join("no-certs");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let redis = support::redis::RedisServer::start_tls(cert.as_ref(), key.as_ref(), ca.as_ref());
    let fake = FakeChatwoot::start().await;
    // Waits for the first probe's verdict; 1.0 when Redis came up.
    let redis_up = |system_roots: &str| {
        let a = free_port();
        let (mut child, _err) = spawn(
            &[
                "--upstream",
                &fake.url(),
                "--listen",
                &format!("127.0.0.1:{}", free_port()),
                "--admin-listen",
                &format!("127.0.0.1:{a}"),
                "--redis-url",
                &redis.url(),
                "--redis-ca-file",
                &unrelated,
                "--redis-timeout",
                "2s",
                "--scope-secret",
                "0123456789abcdef0123456789abcdef-test",
            ],
            &[
                ("SSL_CERT_FILE", system_roots),
                ("SSL_CERT_DIR", empty_dir.to_str().unwrap()),
            ],
        );
        async move {
            let metrics = format!("http://127.0.0.1:{a}/metrics");
            let deadline = Instant::now() + Duration::from_secs(30);
            let verdict = loop {
                let text = get(&metrics, None).await.text();
                if metric(&text, "chatwoot_cache_redis_up") == 1.0 {
                    break 1.0;
                }
                if metric(&text, "chatwoot_cache_redis_errors_total{op=\"probe\"}") >= 1.0 {
                    break 0.0;
                }
                assert!(Instant::now() < deadline, "no probe verdict: {text}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let _ = child.kill();
            let _ = child.wait();
            verdict
        }
    };
    assert_eq!(redis_up(&ca).await, 1.0, "the system's CA is still trusted");
    assert_eq!(
        redis_up(&unrelated).await,
        0.0,
        "control: no CA signs Redis"
    );
}
