//! Criterion micro-benchmarks of the hot paths.
//!
//! - `hit_path/proxy`: one GET of a cached conversation through the real server stack (hyper
//!   HTTP/1.1 on a loopback keep-alive connection, token check, scope hash, store lookup,
//!   render), measured next to `hit_path/bare_hyper`: a bare hyper server returning the same
//!   bytes over the same kind of connection. Compare the two from the same run only.
//! - `key/scope_hmac`: deriving the 128-bit token scope.
//! - `store/probe_sample`: the storage check on a realistic body (the main CPU a stored miss
//!   adds to plain forwarding).
//! - `store/updated_at_compare`: the exact decimal comparison used on revalidation.
//! - `revalidation/*`: the decisions a request for a stored entry goes through — freshness of a
//!   fresh, a stale-while-revalidate and an expired entry, a client's `If-None-Match` against
//!   the entry, and refreshing an entry from an upstream `304` (headers merged into a new block).
//! - `scale/lookup_render/N`: a store holding N entries (1k, 100k, 1M: one shared ~3 KB body,
//!   six upstream headers, distinct keys), one hit's store work — lookup of a uniformly random
//!   key, freshness, render — so the cost of a hit can be compared from 1,000 to 1,000,000
//!   cached entries (CPU caches stop holding the working set along the way). Filling 1M
//!   entries takes a few seconds and ~2 GB.
//!
//! Run: `cargo bench --bench hit_path`.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use chatwoot_cache::auth::Scoper;
use chatwoot_cache::cache::coding::Coding;
use chatwoot_cache::cache::decimal::Decimal;
use chatwoot_cache::cache::rules;
use chatwoot_cache::{Config, Proxy, server};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

mod common;

use common::{bench_policy, filled_store, next_index, sample_body, store_hit, upstream_head};

/// A minimal Chatwoot stand-in: answers every request with the sample conversation.
async fn start_origin(body: Bytes) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        let mut r = Response::new(Full::new(body));
                        r.headers_mut().insert(
                            "content-type",
                            "application/json; charset=utf-8".parse().unwrap(),
                        );
                        r.headers_mut().insert(
                            "cache-control",
                            "max-age=0, private, must-revalidate".parse().unwrap(),
                        );
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn connect(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn roundtrip(send: &mut SendRequest<Empty<Bytes>>, uri: &str, token: Option<&str>) -> usize {
    send.ready().await.unwrap();
    let mut b = Request::get(uri).header("host", "bench");
    if let Some(t) = token {
        b = b.header("api_access_token", t);
    }
    let resp = send
        .send_request(b.body(Empty::new()).unwrap())
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap().to_bytes().len()
}

fn hit_path(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let body = sample_body();
    let (proxy_addr, origin_addr) = rt.block_on(async {
        let origin = start_origin(body.clone()).await;
        let mut cfg = Config::for_upstream(&format!("http://{origin}")).unwrap();
        cfg.cache_ttl = Duration::from_secs(3600);
        let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = public.local_addr().unwrap();
        let proxy = Proxy::new(cfg).unwrap();
        tokio::spawn(server::run(
            proxy,
            public,
            admin,
            None,
            std::future::pending::<()>(),
        ));
        (addr, origin)
    });
    let uri = "/api/v1/accounts/1/conversations/42";
    let mut group = c.benchmark_group("hit_path");
    group.throughput(criterion::Throughput::Elements(1));
    let mut proxy_conn = rt.block_on(connect(proxy_addr));
    // Warm the entry.
    rt.block_on(roundtrip(&mut proxy_conn, uri, Some("bench-token")));
    group.bench_function("proxy", |b| {
        b.iter(|| rt.block_on(roundtrip(&mut proxy_conn, uri, Some("bench-token"))))
    });
    let mut origin_conn = rt.block_on(connect(origin_addr));
    group.bench_function("bare_hyper", |b| {
        b.iter(|| rt.block_on(roundtrip(&mut origin_conn, uri, None)))
    });
    group.finish();
}

fn key_derivation(c: &mut Criterion) {
    let scoper = Scoper::random().unwrap();
    let token = b"x9Wq3hZ1nR4kL7pT2mV8cB5d";
    c.bench_function("key/scope_hmac", |b| {
        b.iter(|| scoper.scope(black_box(token)))
    });
}

fn storage_rules(c: &mut Criterion) {
    let body = sample_body();
    c.bench_function("store/probe_sample", |b| {
        b.iter(|| rules::probe(black_box(&body), 1, 42).is_some())
    });
    let a = Decimal::parse("1765182000.482917").unwrap();
    let b_ = Decimal::parse("1765182000.482918").unwrap();
    c.bench_function("store/updated_at_compare", |b| {
        b.iter(|| black_box(&a) < black_box(&b_))
    });
}

fn scale(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let _enter = rt.enter();
    let policy = bench_policy(Duration::from_secs(3600));
    let mut group = c.benchmark_group("scale/lookup_render");
    group.throughput(criterion::Throughput::Elements(1));
    for n in [1_000u64, 100_000, 1_000_000] {
        let store = filled_store(n, &policy);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        group.bench_function(criterion::BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(store_hit(&store, &policy, next_index(&mut x, n))))
        });
    }
    group.finish();
}

fn revalidation(c: &mut Criterion) {
    use http::HeaderMap;
    use http::header::HeaderValue;
    use tokio::time::Instant;

    let rt = Runtime::new().unwrap();
    let _enter = rt.enter();
    let body = sample_body();
    let head = upstream_head();
    let policy = bench_policy(Duration::from_secs(10));
    let now = Instant::now();
    let stamp = chatwoot_cache::invalidation::Generations::new().stamp(
        1,
        42,
        chatwoot_cache::auth::Scope(7),
    );
    let entry = |age: u64| {
        let probe = rules::probe(&body, 1, 42).unwrap();
        rules::positive_entry(
            &head,
            body.clone(),
            probe,
            stamp.clone(),
            &policy,
            now - Duration::from_secs(age),
            Coding::Gzip,
        )
    };
    let mut group = c.benchmark_group("revalidation");
    for (name, age) in [
        ("fresh", 1),
        ("stale_while_revalidate", 15),
        ("expired", 100),
    ] {
        let e = entry(age);
        group.bench_function(format!("freshness_{name}"), |b| {
            b.iter(|| black_box(policy.freshness(black_box(&e), now)))
        });
    }
    let fresh = entry(1);
    let mut conditional = HeaderMap::new();
    conditional.insert(
        "if-none-match",
        fresh
            .form(true)
            .etag()
            .expect("positive entries have an etag")
            .clone(),
    );
    let form = fresh.form(true);
    group.bench_function("if_none_match", |b| {
        b.iter(|| black_box(fresh.not_modified_for(form, black_box(&conditional))))
    });
    let mut not_modified = HeaderMap::new();
    not_modified.insert(
        "date",
        HeaderValue::from_static("Tue, 09 Dec 2025 10:00:00 GMT"),
    );
    not_modified.insert(
        "cache-control",
        HeaderValue::from_static("max-age=0, private"),
    );
    let expired = entry(100);
    group.bench_function("refresh_from_304", |b| {
        b.iter(|| {
            black_box(rules::refreshed(
                &expired,
                Some(&not_modified),
                stamp.clone(),
                now,
            ))
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    hit_path,
    key_derivation,
    storage_rules,
    revalidation,
    scale
);
criterion_main!(benches);
