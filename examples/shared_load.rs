//! Load client of `benches/shared.sh`: a polling workload spread round-robin over proxy
//! replicas with writes mixed in, and write→read propagation probes across replicas. Not part of
//! the proxy.
//!
//! ```text
//! shared_load --bases http://127.0.0.1:P1,http://127.0.0.1:P2,... --origin http://127.0.0.1:PO
//!             [--account 1] [--tokens 100] [--convs 40] [--rate 2000] [--connections 16]
//!             [--warmup-s 5] [--duration-s 20] [--write-rate 1]
//!             [--probe-account 2] [--probers 32] [--ttl-ms 10000] [--probe-timeout-ms 60000]
//! ```
//!
//! - **Polling**: `--connections` workers, each with one keep-alive connection per replica,
//!   send `GET /api/v1/accounts/{account}/conversations/{c}` for a random (token, conversation)
//!   pair at `--rate` requests per second in all (open loop: the schedule does not wait for slow
//!   answers, up to a second behind), each to the next replica in turn. Only requests that start
//!   in the measurement window (after `--warmup-s`, for `--duration-s`) are counted: `X-Cache`
//!   values, statuses and latency (from the request's start to its whole answer). The origin's `conversation` counter (`GET /__count` of `bench_origin
//!   origin`) is read at both ends of the window: upstream requests per client request.
//! - **Writes**: `POST .../conversations/{c}/messages` (a write-through for the proxy) for a
//!   random conversation of the polled account through the next replica, `--write-rate` per
//!   second during the whole run: each invalidates that conversation's entries of every token.
//! - **Propagation**: `--probers` tasks, each on a conversation of its own in `--probe-account`
//!   (counted apart by the origin). Each reads its conversation through every replica (so each
//!   holds it), waits a random time below the TTL (the entry on the other replicas then has a
//!   random age, as a polled entry has), writes through one replica, and from the moment the
//!   write's response is read, reads through each other replica until the answer carries the
//!   written version (`X-Bench-Version`). A sample is the time from the write's response to the
//!   start of the first read that returned the new version: an upper bound of the propagation
//!   delay. Reads follow each other at once for the first 2 ms, then every tenth of the time
//!   elapsed (at most 250 ms). With one replica there is nothing to probe.
//!
//! Prints one JSON line. Exit code 0 unless no request could be sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

const VERSION_HEADER: &str = "x-bench-version";

fn usage() -> ! {
    eprintln!(
        "usage: shared_load --bases URL,URL,... --origin URL [--account A] [--tokens T] \
         [--convs C] [--rate R] [--connections N] [--warmup-s S] [--duration-s S] \
         [--write-rate W] [--probe-account A] [--probers P] [--ttl-ms MS] [--probe-timeout-ms MS]"
    );
    std::process::exit(2)
}

struct Args(std::collections::HashMap<String, String>);

impl Args {
    fn parse() -> Args {
        let mut it = std::env::args().skip(1);
        let mut opts = std::collections::HashMap::new();
        while let Some(k) = it.next() {
            let Some(name) = k.strip_prefix("--") else {
                usage()
            };
            let v = it.next().unwrap_or_else(|| usage());
            opts.insert(name.to_string(), v);
        }
        Args(opts)
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    fn num(&self, k: &str, default: u64) -> u64 {
        self.get(k)
            .map(|v| v.parse().unwrap_or_else(|_| usage()))
            .unwrap_or(default)
    }
    fn float(&self, k: &str, default: f64) -> f64 {
        self.get(k)
            .map(|v| v.parse().unwrap_or_else(|_| usage()))
            .unwrap_or(default)
    }
}

/// `http://IP:PORT` → socket address.
fn addr_of(url: &str) -> SocketAddr {
    let uri: http::Uri = url.parse().unwrap_or_else(|_| usage());
    let authority = uri.authority().unwrap_or_else(|| usage());
    authority.as_str().parse().unwrap_or_else(|_| {
        eprintln!("shared_load: {url}: use a literal IP:port");
        std::process::exit(2)
    })
}

/// A small xorshift generator: the bench needs spread, not quality.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One keep-alive HTTP/1.1 connection to a replica, reconnected when it breaks.
struct Conn {
    addr: SocketAddr,
    send: Option<SendRequest<Empty<Bytes>>>,
}

/// What one request returned.
struct Reply {
    status: u16,
    x_cache: String,
    version: u64,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn { addr, send: None }
    }

    async fn request(
        &mut self,
        method: http::Method,
        path: &str,
        token: &str,
    ) -> Result<Reply, String> {
        if self.send.is_none() {
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            self.send = Some(send);
        }
        let result = async {
            let send = self.send.as_mut().ok_or("no connection")?;
            send.ready().await.map_err(|e| format!("ready: {e}"))?;
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, self.addr.to_string())
                .header("api_access_token", token)
                .body(Empty::new())
                .map_err(|e| e.to_string())?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = resp.status().as_u16();
            let h = resp.headers();
            let x_cache = h
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            let version = h
                .get(VERSION_HEADER)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0);
            resp.into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            Ok::<_, String>(Reply {
                status,
                x_cache,
                version,
            })
        }
        .await;
        if result.is_err() {
            self.send = None;
        }
        result
    }
}

fn token(t: u64) -> String {
    format!("bench{t:019}")
}

/// The measurement window, shared by every task.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn counts(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }
}

#[derive(Default)]
struct PollStats {
    x_cache: BTreeMap<String, u64>,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    /// Microseconds from a request's scheduled start to its whole answer.
    latencies: Vec<u64>,
}

impl PollStats {
    fn merge(&mut self, o: PollStats) {
        for (k, v) in o.x_cache {
            *self.x_cache.entry(k).or_default() += v;
        }
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.latencies.extend(o.latencies);
    }
}

/// Reads the origin's counter `field` from `/__count`.
async fn origin_count(origin: SocketAddr, field: &str) -> Option<u64> {
    let stream = TcpStream::connect(origin).await.ok()?;
    let (mut send, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(c);
    let req = Request::get("/__count")
        .header(header::HOST, origin.to_string())
        .body(Empty::<Bytes>::new())
        .ok()?;
    let body = send
        .send_request(req)
        .await
        .ok()?
        .into_body()
        .collect()
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body.to_bytes()).ok()?;
    v.get(field)?.as_u64()
}

#[allow(clippy::too_many_arguments)]
async fn poll_worker(
    id: u64,
    replicas: Arc<Vec<SocketAddr>>,
    next_replica: Arc<AtomicU64>,
    account: u64,
    tokens: u64,
    convs: u64,
    interval: Duration,
    window: Window,
) -> PollStats {
    let mut conns: Vec<Conn> = replicas.iter().map(|a| Conn::new(*a)).collect();
    let mut rng = Rng::new(id + 1);
    let mut stats = PollStats::default();
    // Spread the workers' schedules over one interval.
    let mut next_at = Instant::now() + interval.mul_f64(rng.below(1000) as f64 / 1000.0);
    while next_at < window.end {
        tokio::time::sleep_until(next_at).await;
        next_at += interval;
        let now = Instant::now();
        if now > next_at + Duration::from_secs(1) {
            next_at = now;
        }
        let r = (next_replica.fetch_add(1, Ordering::Relaxed) % replicas.len() as u64) as usize;
        let (t, c) = (rng.below(tokens) + 1, rng.below(convs) + 1);
        let path = format!("/api/v1/accounts/{account}/conversations/{c}");
        let reply = conns[r].request(http::Method::GET, &path, &token(t)).await;
        if !window.counts(now) {
            continue;
        }
        let took = u64::try_from(now.elapsed().as_micros()).unwrap_or(u64::MAX);
        stats.latencies.push(took);
        match reply {
            Ok(reply) => {
                *stats.x_cache.entry(reply.x_cache).or_default() += 1;
                *stats.statuses.entry(reply.status).or_default() += 1;
            }
            Err(e) => *stats.errors.entry(e).or_default() += 1,
        }
    }
    stats
}

/// Writes mixed into the polled conversations at `rate` per second until the window ends.
async fn writer(
    replicas: Arc<Vec<SocketAddr>>,
    account: u64,
    tokens: u64,
    convs: u64,
    rate: f64,
    window: Window,
) -> (u64, u64) {
    if rate <= 0.0 {
        return (0, 0);
    }
    let mut conns: Vec<Conn> = replicas.iter().map(|a| Conn::new(*a)).collect();
    let mut rng = Rng::new(0xC0FFEE);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (mut ok, mut failed) = (0, 0);
    let mut next_at = Instant::now() + interval;
    let mut i = 0usize;
    while next_at < window.end {
        tokio::time::sleep_until(next_at).await;
        next_at += interval;
        let (t, c) = (rng.below(tokens) + 1, rng.below(convs) + 1);
        let path = format!("/api/v1/accounts/{account}/conversations/{c}/messages");
        let r = i % conns.len();
        i += 1;
        match conns[r].request(http::Method::POST, &path, &token(t)).await {
            Ok(reply) if reply.status == 200 => ok += 1,
            _ => failed += 1,
        }
    }
    (ok, failed)
}

#[derive(Default)]
struct Propagation {
    /// Microseconds from a write's response to the first read showing it, per other replica.
    samples: Vec<u64>,
    timeouts: u64,
    errors: u64,
    reads: u64,
}

#[allow(clippy::too_many_arguments)]
async fn prober(
    id: u64,
    replicas: Arc<Vec<SocketAddr>>,
    account: u64,
    ttl: Duration,
    timeout: Duration,
    window: Window,
    out: Arc<Mutex<Propagation>>,
) {
    let conversation = id + 1;
    let tok = format!("probe{id:019}");
    let path = format!("/api/v1/accounts/{account}/conversations/{conversation}");
    let write_path = format!("{path}/messages");
    let mut conns: Vec<Conn> = replicas.iter().map(|a| Conn::new(*a)).collect();
    let mut rng = Rng::new(1000 + id);
    let mut cycle = 0usize;
    loop {
        // Every replica holds the conversation.
        for c in conns.iter_mut() {
            let _ = c.request(http::Method::GET, &path, &tok).await;
        }
        let pause = ttl.mul_f64(rng.below(1000) as f64 / 1000.0);
        if Instant::now() + pause >= window.end {
            return;
        }
        tokio::time::sleep(pause).await;
        let w = (id as usize + cycle) % conns.len();
        cycle += 1;
        let written = match conns[w]
            .request(http::Method::POST, &write_path, &tok)
            .await
        {
            Ok(r) if r.status == 200 && r.version > 0 => r.version,
            _ => {
                out.lock().unwrap_or_else(|p| p.into_inner()).errors += 1;
                continue;
            }
        };
        let t0 = Instant::now();
        let mut others: Vec<&mut Conn> = conns
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| *i != w)
            .map(|(_, c)| c)
            .collect();
        let probes = others.iter_mut().map(|c| {
            let path = path.as_str();
            let tok = tok.as_str();
            async move {
                let mut reads = 0u64;
                loop {
                    let start = Instant::now();
                    reads += 1;
                    let seen = c.request(http::Method::GET, path, tok).await;
                    if let Ok(r) = &seen
                        && r.status == 200
                        && r.version >= written
                    {
                        return (Some(start.duration_since(t0)), reads, false);
                    }
                    let elapsed = t0.elapsed();
                    if elapsed >= timeout {
                        return (None, reads, seen.is_err());
                    }
                    let wait = if elapsed < Duration::from_millis(2) {
                        Duration::ZERO
                    } else {
                        (elapsed / 10).min(Duration::from_millis(250))
                    };
                    if wait.is_zero() {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
        let results = futures_util::future::join_all(probes).await;
        let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
        for (sample, reads, error) in results {
            out.reads += reads;
            match sample {
                Some(d) => out
                    .samples
                    .push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                None if error => out.errors += 1,
                None => out.timeouts += 1,
            }
        }
    }
}

/// The `q` quantile of sorted samples (nearest rank), in milliseconds.
fn quantile_ms(sorted: &[u64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1] as f64 / 1000.0)
}

fn json_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "null".to_string(), |v| format!("{v:.3}"))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let replicas: Vec<SocketAddr> = args
        .get("bases")
        .unwrap_or_else(|| usage())
        .split(',')
        .map(addr_of)
        .collect();
    let origin = addr_of(args.get("origin").unwrap_or_else(|| usage()));
    let account = args.num("account", 1);
    let tokens = args.num("tokens", 100);
    let convs = args.num("convs", 40);
    let rate = args.float("rate", 2000.0);
    let connections = args.num("connections", 16).max(1);
    let warmup = Duration::from_secs_f64(args.float("warmup-s", 5.0));
    let duration = Duration::from_secs_f64(args.float("duration-s", 20.0));
    let write_rate = args.float("write-rate", 1.0);
    let probe_account = args.num("probe-account", 2);
    let probers = if replicas.len() > 1 {
        args.num("probers", 32)
    } else {
        0
    };
    let ttl = Duration::from_millis(args.num("ttl-ms", 10_000));
    let probe_timeout = Duration::from_millis(args.num("probe-timeout-ms", 60_000));

    let replicas = Arc::new(replicas);
    let start = Instant::now();
    let window = Window {
        start: start + warmup,
        end: start + warmup + duration,
    };
    let interval = Duration::from_secs_f64(connections as f64 / rate.max(1.0));
    let next_replica = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for id in 0..connections {
        workers.push(tokio::spawn(poll_worker(
            id,
            replicas.clone(),
            next_replica.clone(),
            account,
            tokens,
            convs,
            interval,
            window,
        )));
    }
    let writes = tokio::spawn(writer(
        replicas.clone(),
        account,
        tokens,
        convs,
        write_rate,
        window,
    ));
    let propagation = Arc::new(Mutex::new(Propagation::default()));
    let mut probe_tasks = Vec::new();
    for id in 0..probers {
        probe_tasks.push(tokio::spawn(prober(
            id,
            replicas.clone(),
            probe_account,
            ttl,
            probe_timeout,
            window,
            propagation.clone(),
        )));
    }
    tokio::time::sleep_until(window.start).await;
    let upstream_before = origin_count(origin, "conversation").await;
    tokio::time::sleep_until(window.end).await;
    let upstream_after = origin_count(origin, "conversation").await;

    let mut stats = PollStats::default();
    for w in workers {
        if let Ok(s) = w.await {
            stats.merge(s);
        }
    }
    let (writes_ok, writes_failed) = writes.await.unwrap_or((0, 0));
    for p in probe_tasks {
        let _ = p.await;
    }
    stats.latencies.sort_unstable();
    let mut prop = std::mem::take(&mut *propagation.lock().unwrap_or_else(|p| p.into_inner()));
    prop.samples.sort_unstable();

    let requests: u64 = stats.x_cache.values().sum();
    let get = |k: &str| stats.x_cache.get(k).copied().unwrap_or(0);
    let answered_from_cache = get("HIT") + get("STALE") + get("REVALIDATED");
    let upstream = match (upstream_before, upstream_after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    let ratio = |n: u64| {
        if requests == 0 {
            "null".to_string()
        } else {
            format!("{:.4}", n as f64 / requests as f64)
        }
    };
    let map = |m: &BTreeMap<String, u64>| serde_json::to_string(m).unwrap_or_default();
    let statuses: BTreeMap<String, u64> = stats
        .statuses
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    println!(
        "{{\"replicas\":{},\"requests\":{requests},\"rate\":{:.1},\"x_cache\":{},\"statuses\":{},\"errors\":{},\
         \"hit_ratio\":{},\"cache_answered_ratio\":{},\"upstream_requests\":{},\"upstream_per_request\":{},\
         \"latency\":{{\"p50_ms\":{},\"p99_ms\":{},\"max_ms\":{}}},\
         \"writes\":{writes_ok},\"write_errors\":{writes_failed},\
         \"propagation\":{{\"samples\":{},\"p50_ms\":{},\"p99_ms\":{},\"max_ms\":{},\"timeouts\":{},\"errors\":{},\"reads\":{}}}}}",
        replicas.len(),
        requests as f64 / duration.as_secs_f64(),
        map(&stats.x_cache),
        map(&statuses),
        map(&stats.errors),
        ratio(get("HIT")),
        ratio(answered_from_cache),
        upstream.map_or_else(|| "null".to_string(), |u| u.to_string()),
        upstream.map_or_else(|| "null".to_string(), ratio),
        json_ms(quantile_ms(&stats.latencies, 0.5)),
        json_ms(quantile_ms(&stats.latencies, 0.99)),
        json_ms(stats.latencies.last().map(|v| *v as f64 / 1000.0)),
        prop.samples.len(),
        json_ms(quantile_ms(&prop.samples, 0.5)),
        json_ms(quantile_ms(&prop.samples, 0.99)),
        json_ms(prop.samples.last().map(|v| *v as f64 / 1000.0)),
        prop.timeouts,
        prop.errors,
        prop.reads,
    );
    if requests == 0 {
        std::process::exit(1);
    }
}
