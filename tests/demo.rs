//! The demo (`cargo run --example demo`) prints exactly the sample in README.md, and the curl
//! commands it suggests give what it says they give.

mod support;

#[path = "support/demo_script.rs"]
mod demo_script;

use http::Method;
use support::*;

/// The fenced block after `<!-- demo output -->` in README.md.
fn readme_sample() -> String {
    let readme = include_str!("../README.md");
    let start = readme
        .find("<!-- demo output -->")
        .expect("README.md has a <!-- demo output --> marker");
    let rest = &readme[start..];
    let open = rest
        .find("```text\n")
        .expect("a ```text block follows the marker")
        + 8;
    let close = rest[open..].find("```").expect("the block is closed");
    rest[open..open + close].to_string()
}

#[tokio::test]
async fn demo_prints_the_readme_sample_and_its_curls_do_what_they_say() {
    let fake = FakeChatwoot::start().await;
    let cfg = demo_script::config(&fake.url(), "127.0.0.1:0", "127.0.0.1:0").unwrap();
    let proxy = start_proxy(cfg).await;
    let printed = demo_script::run(proxy.addr, proxy.admin, || fake.requests())
        .await
        .unwrap()
        + &demo_script::try_it(proxy.addr, proxy.admin);
    // The README shows the default ports.
    let shown = printed
        .replace(&proxy.addr.to_string(), "127.0.0.1:8080")
        .replace(&proxy.admin.to_string(), "127.0.0.1:9090");
    assert_eq!(
        shown.trim_end(),
        readme_sample().trim_end(),
        "the demo's output differs from the README sample; the demo printed:\n{shown}"
    );

    // curl 1: a HIT.
    let conv = proxy.url("/api/v1/accounts/1/conversations/42");
    let r = demo_script::send(Method::GET, &conv, Some("admin-token"))
        .await
        .unwrap();
    assert_eq!((r.status, r.x_cache.as_str()), (200, "HIT"));
    // curl 2: the request counters.
    let m = metrics_text(&proxy).await;
    let moved: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("chatwoot_cache_requests_total") && !l.ends_with(" 0"))
        .collect();
    assert!(
        moved.contains(
            &r#"chatwoot_cache_requests_total{cache="hit",route="conversation",status="2xx"} 2"#
        ),
        "{moved:?}"
    );
    // curl 3: the purge drops the stored copy (the write already dropped agent-token's); the
    // next GET is a MISS.
    let purge = send(
        Method::DELETE,
        &proxy.admin_url("/cache"),
        &[(
            "authorization",
            &format!("Bearer {}", demo_script::ADMIN_TOKEN),
        )],
        b"",
    )
    .await;
    assert_eq!(purge.status, 200);
    assert_eq!(purge.text(), r#"{"purged":1}"#);
    let r = demo_script::send(Method::GET, &conv, Some("admin-token"))
        .await
        .unwrap();
    assert_eq!((r.status, r.x_cache.as_str()), (200, "MISS"));
}
