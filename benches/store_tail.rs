//! Tail latency of one hit's store work (lookup, freshness, render) with a small and a large
//! store: two threads (the runtime's worker count on the benchmark machine) look up uniformly
//! random stored keys for a few seconds each, every call timed, and the distribution is printed
//! per store size. Criterion reports means; this is the tail.
//!
//! What it shows: moka records every read and applies the recorded reads in batches (its
//! recency order and frequency sketch), on whichever thread finds ~64 of them pending. With a
//! store larger than the CPU caches each applied read touches cold memory, so about one hit in
//! 64 pays for the batch.
//!
//! Run: `cargo bench --bench store_tail` (`STORE_TAIL_SECS`, default 3, per size).

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bench_policy, filled_store, next_index, store_hit};

/// Power-of-two latency buckets: bucket `b` counts calls taking [2^(b-1), 2^b) ns.
struct Histogram {
    buckets: [u64; 64],
    max_ns: u64,
    count: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: [0; 64],
            max_ns: 0,
            count: 0,
        }
    }

    fn record(&mut self, ns: u64) {
        self.buckets[(64 - ns.max(1).leading_zeros()) as usize] += 1;
        self.max_ns = self.max_ns.max(ns);
        self.count += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.max_ns = self.max_ns.max(other.max_ns);
        self.count += other.count;
    }

    /// Upper bound of the bucket holding quantile `q`.
    fn quantile_below(&self, q: f64) -> u64 {
        let target = (self.count as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return 1u64 << b;
            }
        }
        self.max_ns
    }

    /// Calls that took at least `ns` (bucket-exact for powers of two).
    fn at_least(&self, ns: u64) -> u64 {
        let from = (64 - ns.leading_zeros()) as usize;
        self.buckets[from..].iter().sum()
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported here.
    let secs: u64 = std::env::var("STORE_TAIL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _enter = rt.enter();
    let policy = bench_policy(Duration::from_secs(3600));
    println!(
        "store_tail: lookup + freshness + render of a random stored key, 2 threads, {secs} s per size"
    );
    for n in [100u64, 100_000] {
        let store = Arc::new(filled_store(n, &policy));
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let (store, policy) = (store.clone(), policy);
                let handle = rt.handle().clone();
                std::thread::spawn(move || {
                    let _enter = handle.enter();
                    let mut hist = Histogram::new();
                    let mut x = 0x2545_f491_4f6c_dd1du64 ^ (t + 1);
                    let end = Instant::now() + Duration::from_secs(secs);
                    while Instant::now() < end {
                        for _ in 0..1000 {
                            let started = Instant::now();
                            black_box(store_hit(&store, &policy, next_index(&mut x, n)));
                            hist.record(started.elapsed().as_nanos() as u64);
                        }
                    }
                    hist
                })
            })
            .collect();
        let mut all = Histogram::new();
        for t in threads {
            all.merge(&t.join().expect("bench thread"));
        }
        println!(
            "  {n:>7} entries: {} calls; p50 < {} ns, p99 < {} ns, p99.9 < {} ns, max {} µs; \
             ≥ 16 µs: {:.3}%, ≥ 64 µs: {:.3}%, ≥ 1 ms: {}",
            all.count,
            all.quantile_below(0.5),
            all.quantile_below(0.99),
            all.quantile_below(0.999),
            all.max_ns / 1000,
            100.0 * all.at_least(16_384) as f64 / all.count as f64,
            100.0 * all.at_least(65_536) as f64 / all.count as f64,
            all.at_least(1 << 20),
        );
    }
}
