//! A flood of random tokens that the upstream refuses costs other tokens' entries nothing
//! (SPEC 4, SPEC 10; issue 16 "Flushing every token's entries").
//!
//! Before: a refused token bumped one of 4096 striped scope generations, so 40,000 random
//! tokens moved every stripe and turned every stored entry of every other token into a miss.
//! Now a refusal bumps only the refused scope's own generation (see `invalidation`).

mod support;

use std::time::{Duration, Instant};

use http::Method;
use support::*;

const STORED_TOKENS: usize = 50;
const WORKERS: usize = 8;

/// 50 tokens with stored entries, then 8,400 requests with random tokens that Chatwoot answers
/// `401 {"error":"Invalid Access Token"}` (one in 21 on the conversation route, whose fetches
/// take scope generations of their own): every one of the 50 entries is still a `HIT`.
///
/// Why 8,400 and not the report's 40,000: a debug build on a loaded 2-core CI machine takes
/// ~50 s for 42,000 (see the ignored test below). Against the old 4096 stripes each stored
/// entry survives n refusals with probability (1 - 1/4096)^n: 0.13 for n = 8,400, so the old
/// code loses ~44 of the 50 entries and keeps all 50 with probability 0.13^50 < 1e-44.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_refused_tokens_flush_nothing() {
    flood(8_000, 400).await;
}

/// The figure: 40,000 random refused tokens on `/api/v1/profile` (and 2,000 on the
/// conversation route). ~50 s in a debug build on a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: the 8,400-request test above proves the same with overwhelming odds"]
async fn forty_thousand_random_refused_tokens_flush_nothing() {
    flood(40_000, 2_000).await;
}

async fn flood(on_profile: usize, on_conversation: usize) {
    let fake = FakeChatwoot::start().await;
    let tokens: Vec<String> = (0..STORED_TOKENS).map(|i| format!("kept-{i}")).collect();
    for t in &tokens {
        fake.add_user(t, t, None);
    }
    let mut cfg = config(&fake.url());
    // Fresh for the whole flood, however slow the machine: a STALE would not prove the point.
    cfg.cache_ttl = Duration::from_secs(3600);
    let proxy = start_proxy(cfg).await;
    for t in &tokens {
        assert_eq!(conv(&proxy, 1, 42, t).await.x_cache(), "MISS");
        assert_eq!(conv(&proxy, 1, 42, t).await.x_cache(), "HIT");
    }
    let shows = fake.show_requests();

    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let profile = proxy.url("/api/v1/profile");
        let conversation = proxy.url("/api/v1/accounts/1/conversations/42");
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
            let n = (on_profile + on_conversation) / WORKERS;
            let every = (on_profile + on_conversation) / on_conversation.max(1);
            for i in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let token = format!("{seed:016x}{w}{i}");
                let url = if i % every == 0 {
                    &conversation
                } else {
                    &profile
                };
                let r = try_send(
                    &client,
                    Method::GET,
                    url,
                    &[("api_access_token", &token)],
                    b"",
                )
                .await
                .unwrap_or_else(|e| panic!("request {i} of worker {w}: {e}"));
                assert_eq!(r.status, 401, "{}", r.text());
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    eprintln!(
        "{} refused random tokens in {:.1}s",
        on_profile + on_conversation,
        started.elapsed().as_secs_f64()
    );

    let text = metrics_text(&proxy).await;
    assert!(
        metric(
            &text,
            "chatwoot_cache_upstream_requests_total{route=\"protected\",status=\"4xx\"}"
        ) >= 0.95 * on_profile as f64,
        "the flood reached the upstream and was refused there"
    );
    for t in &tokens {
        let r = conv(&proxy, 1, 42, t).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "HIT"), "{t}");
    }
    assert_eq!(fake.show_requests(), shows, "no stored entry was refetched");
    // The scope index holds the stored tokens' cells, not the flood's.
    let cells = proxy.proxy.store.generations.scope_cells();
    assert!(cells <= 2 * (1024 + STORED_TOKENS), "{cells} scope cells");
}
