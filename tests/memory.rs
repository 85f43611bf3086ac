//! Does `--cache-max-bytes` bound the real heap? Every allocation of this test binary is
//! counted (`#[global_allocator]`, this binary only) and the heap a stored entry really holds
//! is compared with the weight it is counted as.
//!
//! - `heap_per_entry_gzip_clients` / `heap_per_entry_identity_clients`: store thousands of
//!   distinct conversations (several tokens, Rails' header set) through the proxy against the
//!   fake, then assert that everything an entry holds beyond its bodies (the stored gzip body,
//!   and for identity clients the identity copy) is at most [`MAX_BEYOND_BODY`] (issue 15),
//!   weighed and measured, that heap growth per entry ≤ 1.25 × the weight per entry, and that
//!   purging everything gives the heap back.
//! - `stored_entry_is_one_exact_buffer`: an entry is its struct and one exact-size buffer
//!   (stored body, per-entry header values, validators), nothing pointing into the upstream read
//!   buffer, and its header names and static values cost nothing (an interned shape).
//! - `moka_bookkeeping_per_entry`: what moka itself holds per entry, the floor under the
//!   per-entry overhead.
//!
//! The tests run one at a time (`SERIAL`): the global counter sees every thread.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use chatwoot_cache::cache::coding::{self, Coding};
use chatwoot_cache::cache::entry::{BYTES_SHARED, ENTRY_OVERHEAD, Entry, MOKA_PER_UPDATE};
use chatwoot_cache::cache::rules;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use support::*;

/// Live bytes requested from the allocator, all threads.
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// Live allocations, and their estimated footprint in glibc malloc chunks (size + 8-byte
/// header, rounded up to 16, at least 32): reported, not asserted.
static LIVE_ALLOCS: AtomicIsize = AtomicIsize::new(0);
static LIVE_CHUNKS: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Live bytes requested by this thread (allocations minus frees made here).
    static THREAD_LIVE: Cell<isize> = const { Cell::new(0) };
}

struct Counting;

fn chunk(size: usize) -> isize {
    ((size + 8 + 15) & !15).max(32) as isize
}

fn count(delta: isize) {
    LIVE.fetch_add(delta, Relaxed);
    // `try_with`: the slot may be gone while a thread exits.
    let _ = THREAD_LIVE.try_with(|c| c.set(c.get() + delta));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size() as isize);
        LIVE_ALLOCS.fetch_add(1, Relaxed);
        LIVE_CHUNKS.fetch_add(chunk(l.size()), Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l.size() as isize);
        LIVE_ALLOCS.fetch_add(1, Relaxed);
        LIVE_CHUNKS.fetch_add(chunk(l.size()), Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(-(l.size() as isize));
        LIVE_ALLOCS.fetch_sub(1, Relaxed);
        LIVE_CHUNKS.fetch_sub(chunk(l.size()), Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - l.size() as isize);
        LIVE_CHUNKS.fetch_add(chunk(new_size) - chunk(l.size()), Relaxed);
        unsafe { System.realloc(p, l, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn live() -> isize {
    LIVE.load(Relaxed)
}

/// (allocations, malloc-chunk bytes) live now.
fn footprint() -> (isize, isize) {
    (LIVE_ALLOCS.load(Relaxed), LIVE_CHUNKS.load(Relaxed))
}

fn thread_live() -> isize {
    THREAD_LIVE.with(Cell::get)
}

/// Tokens, each its own cache scope: every conversation is stored once per token.
const TOKENS: [&str; 4] = ["admin-token", "mem-token-1", "mem-token-2", "mem-token-3"];
/// Conversations per token for warming up and for the measurement.
const WARM: u64 = 50;
const MEASURED: u64 = 500;
const FIRST_ID: u64 = 10_000;

/// Everything a stored entry may hold beyond its bodies, with Rails' header set (issue 15's
/// target), for gzip and identity clients alike: weighed 665 B and 699 B (the identity copy
/// adds only its ETag: it shares the entry's buffer), measured ~45 B less. An identity copy
/// made on a later hit is weighed 48 B more (moka's second key: `MOKA_PER_UPDATE`), 747 B;
/// `stored_entry_is_one_exact_buffer` checks that it adds nothing else.
const MAX_BEYOND_BODY: f64 = 768.0;

/// The headers Rails sends on every response besides the fake's own (`Content-Type`,
/// `Cache-Control`, `ETag`, `X-Runtime`; hyper adds `Date`), with a UUID request id as Rails
/// makes it.
const RAILS_HEADERS: [(&str, &str); 7] = [
    ("x-frame-options", "SAMEORIGIN"),
    ("x-xss-protection", "0"),
    ("x-content-type-options", "nosniff"),
    ("x-download-options", "noopen"),
    ("x-permitted-cross-domain-policies", "none"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
    ("x-request-id", "6f1c2a7e-3b0d-4e5f-9a8b-00000000002a"),
];

/// GETs conversation `id` through the proxy with every token at once (each a miss); returns
/// the bytes of the bodies the entries hold: the stored gzip body, and for identity clients
/// the identity copy too.
async fn fetch_misses(client: &TestClient, proxy: &ProxyHandle, id: u64, gzip: bool) -> u64 {
    let url = proxy.url(&format!("/api/v1/accounts/1/conversations/{id}"));
    let get = |token: &'static str| {
        let url = url.clone();
        async move {
            let mut headers = vec![("api_access_token", token)];
            if gzip {
                headers.push(("accept-encoding", "gzip"));
            }
            let r = try_send(client, Method::GET, &url, &headers, b"")
                .await
                .unwrap_or_else(|e| panic!("conversation {id}: {e}"));
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.x_cache(), "MISS", "conversation {id} with {token}");
            let identity = r.decoded();
            let stored = coding::gzip(&identity).map_or(identity.len(), |g| g.len());
            assert_eq!(
                r.header("content-encoding") == "gzip",
                gzip,
                "the form the client asked for"
            );
            (stored + if gzip { 0 } else { identity.len() }) as u64
        }
    };
    let [a, b, c, d] = TOKENS;
    let (a, b, c, d) = tokio::join!(get(a), get(b), get(c), get(d));
    a + b + c + d
}

/// Drops what the fake remembers per request, so its log is not counted as the proxy's.
fn forget_requests(fake: &FakeChatwoot) {
    let mut seen = fake.state.seen.lock().unwrap();
    seen.clear();
    seen.shrink_to_fit();
}

/// Housekeeping done and the heap settled: lets background tasks (connection handlers,
/// moka's deferred frees) finish, then reads the live bytes.
/// On a loaded machine connection tasks and moka's maintenance may still be running after
/// 150 ms, and their transient buffers are tens of bytes per entry: wait until three readings
/// in a row agree within 4 KiB (or 5 s pass), and take the smallest of them.
///
/// moka frees what it replaced or removed (its hash-table bucket, and with it the replaced
/// value: an entry replaced by its identity copy, ~1.5 KB) through crossbeam-epoch, deferred
/// in a per-thread bag of up to 64 items that is only handed on when full. Those are bytes the
/// cache no longer holds, a constant of up to ~100 KB per worker thread, not a cost per
/// entry: every reading first has the worker threads and this one flush their bags.
async fn settled_live(proxy: &ProxyHandle, fake: &FakeChatwoot) -> isize {
    let mut readings: Vec<isize> = Vec::new();
    for _ in 0..100 {
        forget_requests(fake);
        flush_deferred_frees().await;
        proxy.proxy.store.usage();
        tokio::time::sleep(Duration::from_millis(50)).await;
        readings.push(live());
        if let [.., a, b, c] = readings[..]
            && a.max(b).max(c) - a.min(b).min(c) <= 4096
        {
            return a.min(b).min(c);
        }
    }
    let last = &readings[readings.len() - 3..];
    last.iter().copied().min().unwrap_or_else(live)
}

/// Runs crossbeam-epoch's deferred frees of every runtime worker thread and this one (see
/// [`settled_live`]): tasks that each flush and then hold their worker for a moment, so that
/// the others land on the other workers.
async fn flush_deferred_frees() {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async {
                crossbeam_epoch::pin().flush();
                std::thread::sleep(Duration::from_millis(3));
                crossbeam_epoch::pin().flush();
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("flush task");
    }
    for _ in 0..4 {
        crossbeam_epoch::pin().flush();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_per_entry_gzip_clients() {
    heap_per_entry(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_per_entry_identity_clients() {
    heap_per_entry(false).await;
}

async fn heap_per_entry(gzip: bool) {
    let _serial = SERIAL.lock().await;
    let started = std::time::Instant::now();
    let fake = FakeChatwoot::start().await;
    *fake.state.show_headers.lock().unwrap() = RAILS_HEADERS
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    for t in &TOKENS[1..] {
        fake.add_user(t, "admin", None);
    }
    for c in 0..WARM + MEASURED {
        fake.add_conversation(1, FIRST_ID + c, "1765182000.482917");
    }
    let mut cfg = config(&fake.url());
    // Nothing may expire while measuring.
    cfg.cache_ttl = Duration::from_secs(600);
    let proxy = start_proxy(cfg).await;
    let client = client();

    // Warm up the runtime, both connection pools, the fake's and the proxy's tables, and
    // moka (its node pools and first table sizes) with entries of their own.
    for c in 0..WARM {
        fetch_misses(&client, &proxy, FIRST_ID + c, gzip).await;
    }
    assert_eq!(proxy.proxy.store.usage().0, WARM * TOKENS.len() as u64);

    // Drop the warm-up entries: the measured entries grow moka's tables from a small size, so
    // that growth is counted in their cost.
    proxy
        .proxy
        .store
        .purge(chatwoot_cache::invalidation::Target::All)
        .await;
    let base = settled_live(&proxy, &fake).await;
    let base_footprint = footprint();
    let mut body_bytes = 0;
    for c in WARM..WARM + MEASURED {
        body_bytes += fetch_misses(&client, &proxy, FIRST_ID + c, gzip).await;
    }
    let stored = settled_live(&proxy, &fake).await;
    let stored_footprint = footprint();
    let (n, weight) = proxy.proxy.store.usage();
    assert_eq!(n, MEASURED * TOKENS.len() as u64, "every fetch was stored");
    let heap = (stored - base) as f64 / n as f64;
    let weighed = weight as f64 / n as f64;
    let body = body_bytes as f64 / n as f64;
    let allocs = (stored_footprint.0 - base_footprint.0) as f64 / n as f64;
    let chunks = (stored_footprint.1 - base_footprint.1) as f64 / n as f64;
    let clients = if gzip { "gzip" } else { "identity" };
    eprintln!(
        "memory ({clients} clients): {n} entries: weight {weighed:.0} B/entry, real heap {heap:.0} B/entry \
         (heap/weight {:.3}), body {body:.0} B/entry; beyond the body: weighed {:.0} B, \
         real {:.0} B; ENTRY_OVERHEAD {ENTRY_OVERHEAD}; {allocs:.1} allocations/entry, \
         ~{chunks:.0} B/entry in glibc malloc chunks ({:.3} x weight)",
        heap / weighed,
        weighed - body,
        heap - body,
        chunks / weighed,
    );
    assert!(
        weighed - body <= MAX_BEYOND_BODY,
        "an entry is weighed {:.0} B beyond its bodies ({clients} clients), more than \
         {MAX_BEYOND_BODY} B",
        weighed - body
    );
    assert!(
        heap - body <= MAX_BEYOND_BODY,
        "an entry holds {:.0} B beyond its bodies ({clients} clients), more than \
         {MAX_BEYOND_BODY} B",
        heap - body
    );
    assert!(
        heap <= 1.25 * weighed,
        "an entry holds {heap:.0} B of heap but is weighed as {weighed:.0} B: \
         --cache-max-bytes would not bound memory"
    );

    // Purging everything gives the memory back: nothing else holds the entries or parts of
    // them (read buffers, header blocks). What may stay is moka's table growth, a few
    // bytes per entry.
    let purged = proxy
        .proxy
        .store
        .purge(chatwoot_cache::invalidation::Target::All)
        .await;
    assert_eq!(purged as u64, n);
    assert_eq!(proxy.proxy.store.usage(), (0, 0));
    let after = settled_live(&proxy, &fake).await;
    eprintln!(
        "memory: after purging all {purged}: heap {:+} B vs the baseline ({:.1} B per entry \
         stored); {:.1}s",
        after - base,
        (after - base) as f64 / n as f64,
        started.elapsed().as_secs_f64()
    );
    let margin = 64 * n as isize;
    assert!(
        after - base <= margin,
        "after purging everything the heap is {} B above the baseline (allowed {margin} B)",
        after - base
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_entry_is_one_exact_buffer() {
    let _serial = SERIAL.lock().await;
    // An upstream head parsed the way hyper does it: every value a slice of one read buffer.
    let head = |request_id: &'static str| -> (HeaderMap, Bytes) {
        let fields: &[(&str, &str)] = &[
            ("content-type", "application/json; charset=utf-8"),
            ("cache-control", "max-age=0, private, must-revalidate"),
            ("etag", "W/\"0123456789abcdef0123456789abcdef\""),
            ("x-request-id", request_id),
            ("x-runtime", "0.041237"),
            ("date", "Mon, 08 Dec 2025 08:20:05 GMT"),
            ("x-frame-options", "SAMEORIGIN"),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "strict-origin-when-cross-origin"),
            ("set-cookie", "_chatwoot_session=secret"),
        ];
        let mut read_buf = vec![0u8; 8192];
        let mut at = 0;
        let mut ranges = vec![];
        for (_, v) in fields {
            read_buf[at..at + v.len()].copy_from_slice(v.as_bytes());
            ranges.push(at..at + v.len());
            at += v.len();
        }
        let read_buf = Bytes::from(read_buf);
        let mut upstream = HeaderMap::new();
        for ((name, _), r) in fields.iter().zip(ranges) {
            upstream.append(
                HeaderName::from_static(name),
                HeaderValue::from_maybe_shared(read_buf.slice(r)).unwrap(),
            );
        }
        (upstream, read_buf)
    };
    let body = Bytes::from(
        format!(
            r#"{{"id":42,"updated_at":1765182000.482917,"messages":[{}]}}"#,
            vec![r#"{"content":"hello, how can I help?"}"#; 60].join(",")
        )
        .into_bytes(),
    );
    let policy = chatwoot_cache::cache::CachePolicy {
        ttl: Duration::from_secs(10),
        stale_while_revalidate: Duration::from_secs(30),
        stale_if_error: Duration::from_secs(600),
        negative_ttl: Duration::from_secs(5),
        max_object_bytes: 1 << 22,
        refresh_ahead: None,
    };
    let stamp = chatwoot_cache::invalidation::Generations::new().stamp(
        1,
        42,
        chatwoot_cache::auth::Scope(7),
    );
    let entry = |request_id| {
        let (upstream, read_buf) = head(request_id);
        let probe = rules::probe(&body, 1, 42).unwrap();
        let now = tokio::time::Instant::now();
        let e = rules::positive_entry(
            &upstream,
            body.clone(),
            probe,
            stamp.clone(),
            &policy,
            now,
            Coding::Gzip,
        );
        (std::sync::Arc::new(e), read_buf)
    };
    // The first entry of this header set interns its shape (and warms the compressor).
    let (first, _) = entry("5c1b2a7e-3f0e-4f7d-9a6e-0b9f1d2c3e4f");

    let before = thread_live();
    let (e, read_buf) = entry("9d0e1f2a-3b4c-4d5e-8f90-a1b2c3d4e5f6");
    drop(read_buf);
    let kept = thread_live() - before;
    let buffer = e.weight() as usize - ENTRY_OVERHEAD;
    let expected = size_of::<Entry>() + 16 + buffer;
    // Rendered once: the buffer gets the shared header `bytes` adds when it is first shared,
    // and nothing else stays.
    let now = tokio::time::Instant::now();
    let resp = e.render(
        e.form(true),
        now,
        HeaderValue::from_static("chatwoot-cache; hit"),
        false,
        false,
    );
    let h: Vec<(String, String)> = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    drop(resp);
    let get = |name: &str| {
        h.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let after_hit = thread_live() - before;
    eprintln!(
        "stored entry: struct {} B, buffer {buffer} B (stored body {} B of {} B identity): \
         kept {kept} B, expected {expected} B; after a hit {after_hit} B",
        size_of::<Entry>() + 16,
        e.stored_body().len(),
        body.len()
    );
    assert_eq!(
        kept as usize, expected,
        "an entry holds more than its struct and one exact buffer (a pinned upstream read \
         buffer, a header map of its own, a shape not shared)"
    );
    // (Less what this test itself holds: the rendered headers as strings.)
    let rendered: usize = h
        .iter()
        .map(|(n, v)| n.capacity() + v.capacity())
        .sum::<usize>()
        + h.capacity() * size_of::<(String, String)>();
    assert_eq!(
        after_hit as usize - rendered,
        expected + BYTES_SHARED,
        "a hit leaves nothing behind but the buffer's shared header"
    );
    assert_eq!(get("x-request-id"), "9d0e1f2a-3b4c-4d5e-8f90-a1b2c3d4e5f6");
    assert_eq!(get("x-runtime"), "0.041237");
    assert_eq!(get("content-encoding"), "gzip");
    assert_eq!(
        get("etag").as_bytes(),
        first.form(true).etag_bytes().unwrap(),
        "the same body: the same gzip ETag"
    );
    assert!(
        !h.iter()
            .any(|(n, _)| n == "set-cookie" || n == "content-length")
    );
    drop(first);
    assert_eq!(
        e.upstream_etag().unwrap(),
        "W/\"0123456789abcdef0123456789abcdef\""
    );

    // The identity copy made for an identity client's hit is again a struct and one exact
    // buffer (the gzip entry's bytes, then the identity body and its ETag), weighed as such
    // plus the second key moka keeps for an entry it replaced.
    let before = thread_live();
    let copy = std::sync::Arc::new(e.with_identity_copy().expect("a gzip entry"));
    let kept = thread_live() - before;
    let copy_buffer = copy.weight() as usize - ENTRY_OVERHEAD - MOKA_PER_UPDATE;
    assert_eq!(
        copy_buffer,
        buffer + body.len() + 34,
        "identity body and ETag"
    );
    assert_eq!(
        kept as usize,
        size_of::<Entry>() + 16 + copy_buffer,
        "an identity copy holds more than its struct and one exact buffer"
    );
    assert_eq!(copy.identity_body(), body);
}

/// The part of the per-entry overhead that is moka's own: its bookkeeping for an entry (hash
/// table bucket, key copy, entry info, access and write order nodes, timer-wheel node and its
/// share of the frequency sketch), with the store's configuration (weigher, per-entry expiry,
/// eviction listener, a capacity past half full so the sketch is on) and a value of one
/// pointer. The issue-5 goal of ≤ 256 B per entry beyond the body is below it: the README says
/// the goal is out of reach with moka on the strength of this figure, so this fails if a moka
/// release gets under the goal and the claim needs revisiting.
#[test]
fn moka_bookkeeping_per_entry() {
    use chatwoot_cache::auth::Scope;
    use chatwoot_cache::cache::CacheKey;
    use std::sync::Arc;

    struct Hour;
    impl moka::Expiry<CacheKey, Arc<()>> for Hour {
        fn expire_after_create(
            &self,
            _: &CacheKey,
            _: &Arc<()>,
            _: std::time::Instant,
        ) -> Option<Duration> {
            Some(Duration::from_secs(3600))
        }
    }

    let _serial = SERIAL.blocking_lock();
    const N: u64 = 50_000;
    const WEIGHT: u32 = 1000;
    // moka's synchronous cache does its housekeeping on the calling thread: this thread's own
    // allocations are the cache's, whatever other tests' threads are still freeing.
    let before = thread_live();
    let cache = moka::sync::Cache::builder()
        .max_capacity(N * u64::from(WEIGHT) * 5 / 4)
        .weigher(|_: &CacheKey, _: &Arc<()>| WEIGHT)
        .expire_after(Hour)
        .eviction_listener(|_, _, _| {})
        .build();
    let value = Arc::new(());
    let key = |i: u64| CacheKey {
        account: 1,
        conversation: i,
        scope: Scope(u128::from(i) << 64 | 7),
    };
    for i in 0..N {
        cache.insert(key(i), value.clone());
    }
    cache.run_pending_tasks();
    for i in 0..N {
        assert!(cache.get(&key(i)).is_some());
    }
    cache.run_pending_tasks();
    let per_entry = (thread_live() - before) as f64 / N as f64;
    println!("memory: moka's bookkeeping {per_entry:.0} B per entry (value: one shared Arc)");
    assert_eq!(cache.entry_count(), N, "nothing evicted");
    assert!(
        per_entry > 256.0,
        "moka now costs {per_entry:.0} B per entry: the README's claim that its bookkeeping alone \
         exceeds the 256 B goal (Performance, Memory) is out of date"
    );
    drop(cache);
}
