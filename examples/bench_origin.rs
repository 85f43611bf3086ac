//! Load-benchmark helper for `benches/load.sh`, `benches/coalesce.sh` and `benches/flood.sh`: a
//! fast fake Chatwoot origin, the "bare hyper" floor, and the clients. Not part of the proxy.
//!
//! ```text
//! bench_origin origin --listen 127.0.0.1:PORT [--delay-ms N] [--threads N] [--probe-account A]
//! bench_origin floor  --listen 127.0.0.1:PORT [--threads N] [--encoding gzip]
//! bench_origin burst  --url http://127.0.0.1:PORT/path --token T [--n 2000] [--timeout-ms 30000]
//! bench_origin walk   --base http://127.0.0.1:PORT [--account 1] [--tokens 1] [--convs 100]
//!                     [--concurrency 64]
//! bench_origin flood  --base http://127.0.0.1:PORT [--duration-ms 15000] [--ramp-ms 1000]
//!                     [--flood-connections 200] [--flood-interval-ms 400] [--polite 4]
//!                     [--polite-interval-ms 100] [--first-conv 1000000] [--timeout-ms 10000]
//! ```
//!
//! - `origin`: `GET /api/v1/accounts/{a}/conversations/{c}` answers a ~8 KB conversation shaped
//!   like `tests/support/conversation-sample.json` (more messages, so it is ~8 KB), with `id` /
//!   `account_id` from the path, a float `updated_at`, Chatwoot's
//!   `Cache-Control: max-age=0, private, must-revalidate` and a Rails-style weak ETag
//!   (`W/"<32 hex of SHA-256 of the body>"`, as Rack::ETag makes it), plus the headers Rails
//!   sends on every response (`RAILS_DEFAULT_HEADERS`, a per-response `X-Request-Id` and
//!   `X-Runtime`: 11 headers in all, as a cache stores them); a matching
//!   `If-None-Match` gets `304`. `GET .../conversations/{c}/messages` answers the same bytes (a
//!   forwarded, never cached route for the pass-through workload). Both need the
//!   `api_access_token` header (else Chatwoot's devise `401`). Rendered bodies are memoised per
//!   path, so the origin costs little CPU. A request whose `Accept-Encoding` accepts gzip gets the
//!   body gzip-compressed the way chatwoot-cache stores it (libdeflate level 1, so the bytes are
//!   identical: see [`gzip_like_the_proxy`]), with `Content-Encoding: gzip` and `Vary:
//!   Accept-Encoding` (as Rack::Deflater answers; memoised too): the peer caches of
//!   `benches/load.sh` store and serve these bytes to gzip clients. `GET /__count` returns the request counters as JSON
//!   (the `/__count` requests themselves are not counted); `--delay-ms` delays every counted
//!   answer (to make concurrent requests overlap). `connections` counts accepted connections
//!   (the `/__count` connections included).
//!   Writes (for `benches/shared.sh`): `POST .../conversations/{c}/messages` answers `200` with
//!   the conversation's new version (`X-Bench-Version`, also in the body) and moves that
//!   conversation on: its body's `updated_at` and `X-Bench-Version` follow the version. GETs of
//!   `--probe-account` are counted as `probe`, apart from `conversation`, so a propagation probe
//!   does not count as workload.
//! - `floor`: the same server stack answering every request with one prebuilt conversation
//!   response (the origin's body and header set) from memory, no parsing, no checks: the floor
//!   a caching proxy's hit path is compared with. With `--encoding gzip`, the origin's gzip
//!   answer instead (the same compressed bytes, plus `Content-Encoding` and `Vary`), whatever
//!   the request asks: the floor of a gzip client's hit.
//! - `burst`: opens N keep-alive connections, waits until all are connected, then sends one GET
//!   on each at the same moment and waits for every answer. Prints one JSON line with status and
//!   `X-Cache` counts. Exit code 0 only if every request got a `200`.
//! - `walk`: requests every (token, conversation) pair of the load benchmark once (tokens
//!   `bench` + 19 digits, as `benches/load/wrk.lua` makes them), over `--concurrency`
//!   keep-alive connections, to warm a cache. Prints one JSON line; exit code 0 only if every
//!   request got a `200`.
//! - `flood`: the fairness bench's client (`benches/flood.sh`): one runaway token flooding cold
//!   misses while polite tokens read cold conversations one at a time; see [`flood`].

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const SAMPLE: &str = include_str!("../tests/support/conversation-sample.json");
const TARGET_BODY_BYTES: usize = 8 * 1024;
const CACHE_CONTROL: &str = "max-age=0, private, must-revalidate";
const CONTENT_TYPE: &str = "application/json; charset=utf-8";
const MEMO_LIMIT: usize = 100_000;
/// A written conversation's version (on its GETs once written, and on the write's answer).
const VERSION_HEADER: HeaderName = HeaderName::from_static("x-bench-version");

/// Connections accepted by this server (reported by `/__count`: a proxy that does not reuse
/// upstream connections shows up here).
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

fn usage() -> ! {
    eprintln!(
        "usage:\n  bench_origin origin --listen ADDR [--delay-ms N] [--threads N] [--probe-account A]\n  \
         bench_origin floor --listen ADDR [--threads N] [--encoding gzip]\n  \
         bench_origin burst --url URL --token T [--n N] [--timeout-ms MS]\n  \
         bench_origin walk --base URL [--account A] [--tokens T] [--convs C] [--concurrency N] [--accept-encoding V]\n  \
         bench_origin flood --base URL [--duration-ms D] [--ramp-ms R] [--flood-connections N] [--flood-interval-ms I] [--polite P] [--polite-interval-ms I] [--first-conv C] [--timeout-ms T]"
    );
    std::process::exit(2)
}

struct Args {
    mode: String,
    opts: HashMap<String, String>,
}

impl Args {
    fn parse() -> Args {
        let mut it = std::env::args().skip(1);
        let mode = it.next().unwrap_or_else(|| usage());
        let mut opts = HashMap::new();
        while let Some(k) = it.next() {
            let Some(name) = k.strip_prefix("--") else {
                usage()
            };
            let v = it.next().unwrap_or_else(|| usage());
            opts.insert(name.to_string(), v);
        }
        Args { mode, opts }
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.opts.get(k).map(String::as_str)
    }
    fn num(&self, k: &str, default: u64) -> u64 {
        self.get(k)
            .map(|v| v.parse().unwrap_or_else(|_| usage()))
            .unwrap_or(default)
    }
}

fn main() {
    let args = Args::parse();
    let threads = args.num("threads", 0) as usize;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if threads > 0 {
        rt.worker_threads(threads);
    }
    let rt = rt.build().expect("tokio runtime");
    let code = rt.block_on(async move {
        match args.mode.as_str() {
            "origin" | "floor" => {
                let listen = args.get("listen").unwrap_or_else(|| usage()).to_string();
                let listener = TcpListener::bind(&listen).await.unwrap_or_else(|e| {
                    eprintln!("bench_origin: cannot listen on {listen}: {e}");
                    std::process::exit(1)
                });
                let template = Template::new();
                if args.mode == "floor" {
                    let gzip = match args.get("encoding") {
                        None | Some("identity") => false,
                        Some("gzip") => true,
                        Some(_) => usage(),
                    };
                    serve_floor(listener, template, gzip).await
                } else {
                    let delay = Duration::from_millis(args.num("delay-ms", 0));
                    let probe_account = args
                        .get("probe-account")
                        .map(|_| args.num("probe-account", 0));
                    serve_origin(listener, template, delay, probe_account).await
                }
            }
            "burst" => burst(&args).await,
            "walk" => walk(&args).await,
            "flood" => flood(&args).await,
            _ => usage(),
        }
    });
    std::process::exit(code)
}

// ---------------------------------------------------------------- bodies

/// The sample conversation, padded with more messages to ~8 KB, serialised once with
/// placeholders, so a body for (account, conversation) is a few string replacements.
struct Template {
    json: String,
}

impl Template {
    fn new() -> Template {
        let mut v: serde_json::Value = serde_json::from_str(SAMPLE).expect("sample json");
        let first = v["messages"][0].clone();
        let mut n = 1u64;
        loop {
            let len = serde_json::to_string(&v).unwrap().len();
            if len >= TARGET_BODY_BYTES - 400 {
                break;
            }
            let mut m = first.clone();
            m["id"] = (9021 + n).into();
            m["content"] = format!(
                "Follow-up message {n}: the invoice for order #{} is attached.",
                4000 + n
            )
            .into();
            m["message_type"] = (n % 2).into();
            v["messages"].as_array_mut().unwrap().push(m);
            n += 1;
        }
        v["id"] = "@@ID@@".into();
        v["account_id"] = "@@ACCOUNT@@".into();
        v["updated_at"] = "@@UPDATED_AT@@".into();
        for m in v["messages"].as_array_mut().unwrap() {
            m["conversation_id"] = "@@ID@@".into();
            m["account_id"] = "@@ACCOUNT@@".into();
        }
        if let Some(m) = v
            .get_mut("last_non_activity_message")
            .filter(|m| m.is_object())
        {
            m["conversation_id"] = "@@ID@@".into();
            m["account_id"] = "@@ACCOUNT@@".into();
        }
        Template {
            json: serde_json::to_string(&v).unwrap(),
        }
    }

    /// (body, weak ETag) for one conversation at `version` (0 until it is written). `updated_at`
    /// is a float with microseconds, stable per version so revalidations can get `304`.
    fn render(&self, account: u64, conversation: u64, version: u64) -> (Bytes, HeaderValue) {
        let updated_at = format!(
            "{}.{:06}",
            1_765_182_000u64 + conversation % 1_000_000 + version,
            482_917
        );
        let body = self
            .json
            .replace("\"@@ID@@\"", &conversation.to_string())
            .replace("\"@@ACCOUNT@@\"", &account.to_string())
            .replace("\"@@UPDATED_AT@@\"", &updated_at);
        let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let etag = HeaderValue::from_str(&format!("W/\"{hex}\"")).unwrap();
        (Bytes::from(body), etag)
    }
}

// ---------------------------------------------------------------- servers

async fn serve_loop<F, Fut>(listener: TcpListener, handler: F) -> i32
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The headers a Chatwoot (Rails 7) conversation response carries besides the body's own
/// (`../shared/chatwoot/API-FACTS.md`): the framework's default security headers, constant,
/// and `X-Request-Id` / `X-Runtime`, which change on every request. A cache stores and replays
/// all of them, so they are part of what a hit costs.
const RAILS_DEFAULT_HEADERS: [(&str, &str); 6] = [
    ("x-frame-options", "SAMEORIGIN"),
    ("x-xss-protection", "0"),
    ("x-content-type-options", "nosniff"),
    ("x-download-options", "noopen"),
    ("x-permitted-cross-domain-policies", "none"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
];

/// Per-response `X-Request-Id` (a UUID-shaped counter) and `X-Runtime` (seconds, 6 decimals).
fn request_id_and_runtime(n: u64) -> (HeaderValue, HeaderValue) {
    let id = format!("6f1c2a7e-3b0d-4e5f-9a8b-{n:012x}");
    let runtime = format!("0.{:06}", 4_000 + n % 20_000);
    (
        HeaderValue::from_str(&id).unwrap(),
        HeaderValue::from_str(&runtime).unwrap(),
    )
}

fn conversation_response(
    body: Bytes,
    etag: HeaderValue,
    (request_id, runtime): (HeaderValue, HeaderValue),
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    let h = r.headers_mut();
    for (name, value) in RAILS_DEFAULT_HEADERS {
        h.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    h.insert(header::ETAG, etag);
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    h.insert(HeaderName::from_static("x-request-id"), request_id);
    h.insert(HeaderName::from_static("x-runtime"), runtime);
    r
}

/// `body` as chatwoot-cache stores it for gzip clients (`src/cache/coding.rs`: libdeflate at
/// level 1, one-shot), so a peer cache fed by the origin holds the very bytes the proxy serves
/// (benches/load.sh checks that the sizes agree).
fn gzip_like_the_proxy(body: &[u8]) -> Bytes {
    let level = libdeflater::CompressionLvl::new(1).expect("level 1");
    let mut compressor = libdeflater::Compressor::new(level);
    let mut out = vec![0; compressor.gzip_compress_bound(body.len())];
    let n = compressor.gzip_compress(body, &mut out).expect("gzip");
    out.truncate(n);
    Bytes::from(out)
}

/// The headers that turn a conversation response into its gzip representation (Rack::Deflater's).
fn mark_gzip(headers: &mut http::HeaderMap) {
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
}

/// Whether an `Accept-Encoding` value accepts gzip: a `gzip` element without `q=0` (enough for
/// the benchmark's clients and the peer caches' normalised values).
fn accepts_gzip(headers: &http::HeaderMap) -> bool {
    headers.get_all(header::ACCEPT_ENCODING).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|element| {
            let mut parts = element.split(|&b| b == b';');
            let coding = parts.next().unwrap_or_default().trim_ascii();
            let zero_weight = parts.any(|p| {
                let p = std::str::from_utf8(p.trim_ascii()).unwrap_or_default();
                p.get(..2).is_some_and(|k| k.eq_ignore_ascii_case("q="))
                    && p[2..].parse::<f64>().is_ok_and(|q| q == 0.0)
            });
            coding.eq_ignore_ascii_case(b"gzip") && !zero_weight
        })
    })
}

async fn serve_floor(listener: TcpListener, template: Template, gzip: bool) -> i32 {
    // The response as a cache replays it: the same header set, the values of one fetch, built
    // once; a request clones the header map and shares the body.
    let (mut body, etag) = template.render(1, 1, 0);
    let mut headers = conversation_response(body.clone(), etag, request_id_and_runtime(1))
        .headers()
        .clone();
    if gzip {
        body = gzip_like_the_proxy(&body);
        mark_gzip(&mut headers);
    }
    serve_loop(listener, move |_req| {
        let mut r = Response::new(Full::new(body.clone()));
        *r.headers_mut() = headers.clone();
        async move { r }
    })
    .await
}

#[derive(Default)]
struct Counters {
    total: AtomicU64,
    conversation: AtomicU64,
    messages: AtomicU64,
    not_modified: AtomicU64,
    unauthorized: AtomicU64,
    not_found: AtomicU64,
    probe: AtomicU64,
    writes: AtomicU64,
}

/// A rendered conversation: (version, body, ETag).
type Rendered = (u64, Bytes, HeaderValue);

struct Origin {
    template: Template,
    /// (version, body, ETag) per conversation.
    memo: RwLock<HashMap<(u64, u64), Rendered>>,
    /// (version, gzip body) per conversation, for clients that accept gzip.
    gzip_memo: RwLock<HashMap<(u64, u64), (u64, Bytes)>>,
    /// Versions of the conversations written so far (absent: 0).
    versions: RwLock<HashMap<(u64, u64), u64>>,
    counters: Counters,
    delay: Duration,
    probe_account: Option<u64>,
}

impl Origin {
    fn version(&self, a: u64, c: u64) -> u64 {
        self.versions
            .read()
            .unwrap()
            .get(&(a, c))
            .copied()
            .unwrap_or(0)
    }

    fn body(&self, a: u64, c: u64, version: u64) -> (Bytes, HeaderValue) {
        if let Some((v, body, etag)) = self.memo.read().unwrap().get(&(a, c))
            && *v == version
        {
            return (body.clone(), etag.clone());
        }
        let (body, etag) = self.template.render(a, c, version);
        let mut memo = self.memo.write().unwrap();
        if memo.len() < MEMO_LIMIT || memo.contains_key(&(a, c)) {
            memo.insert((a, c), (version, body.clone(), etag.clone()));
        }
        (body, etag)
    }

    /// The gzip form of `body` (conversation (a, c) at `version`), compressed once.
    fn gzip_body(&self, a: u64, c: u64, version: u64, body: &[u8]) -> Bytes {
        if let Some((v, gz)) = self.gzip_memo.read().unwrap().get(&(a, c))
            && *v == version
        {
            return gz.clone();
        }
        let gz = gzip_like_the_proxy(body);
        let mut memo = self.gzip_memo.write().unwrap();
        if memo.len() < MEMO_LIMIT || memo.contains_key(&(a, c)) {
            memo.insert((a, c), (version, gz.clone()));
        }
        gz
    }

    /// A write to (a, c): its next version.
    fn write(&self, a: u64, c: u64) -> u64 {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        let mut versions = self.versions.write().unwrap();
        let v = versions.entry((a, c)).or_insert(0);
        *v += 1;
        *v
    }

    fn counts_json(&self) -> String {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{{\"total\":{},\"conversation\":{},\"messages\":{},\"not_modified\":{},\"unauthorized\":{},\"not_found\":{},\"probe\":{},\"writes\":{},\"connections\":{}}}",
            l(&c.total),
            l(&c.conversation),
            l(&c.messages),
            l(&c.not_modified),
            l(&c.unauthorized),
            l(&c.not_found),
            l(&c.probe),
            l(&c.writes),
            CONNECTIONS.load(Ordering::Relaxed)
        )
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if path == "/__count" {
            let mut r = Response::new(Full::new(Bytes::from(self.counts_json())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return r;
        }
        self.counters.total.fetch_add(1, Ordering::Relaxed);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let route = parse_route(path);
        if let Some((a, c, true)) = route
            && req.method() == http::Method::POST
        {
            let v = self.write(a, c);
            let mut r = Response::new(Full::new(Bytes::from(format!(
                "{{\"conversation_id\":{c},\"version\":{v}}}"
            ))));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
            r.headers_mut().insert(VERSION_HEADER, HeaderValue::from(v));
            return r;
        }
        let Some((a, c, messages)) = route.filter(|_| req.method() == http::Method::GET) else {
            self.counters.not_found.fetch_add(1, Ordering::Relaxed);
            return json_error(
                StatusCode::NOT_FOUND,
                r#"{"error":"Resource could not be found"}"#,
            );
        };
        let token_ok = req
            .headers()
            .get("api_access_token")
            .is_some_and(|v| !v.is_empty());
        if !token_ok {
            self.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            return json_error(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":["You need to sign in or sign up before continuing."]}"#,
            );
        }
        if messages {
            self.counters.messages.fetch_add(1, Ordering::Relaxed);
        } else if self.probe_account == Some(a) {
            self.counters.probe.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.conversation.fetch_add(1, Ordering::Relaxed);
        }
        let version = self.version(a, c);
        let (body, etag) = self.body(a, c, version);
        if req.headers().get(header::IF_NONE_MATCH) == Some(&etag) {
            self.counters.not_modified.fetch_add(1, Ordering::Relaxed);
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static(CACHE_CONTROL),
            );
            r.headers_mut().insert(header::ETAG, etag);
            return r;
        }
        let n = self.counters.total.load(Ordering::Relaxed);
        let gzip = accepts_gzip(req.headers());
        let body = if gzip {
            self.gzip_body(a, c, version, &body)
        } else {
            body
        };
        let mut r = conversation_response(body, etag, request_id_and_runtime(n));
        if gzip {
            mark_gzip(r.headers_mut());
        }
        if version > 0 {
            r.headers_mut()
                .insert(VERSION_HEADER, HeaderValue::from(version));
        }
        r
    }
}

fn json_error(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `/api/v1/accounts/{a}/conversations/{c}` → (a, c, false);
/// `/api/v1/accounts/{a}/conversations/{c}/messages` → (a, c, true).
fn parse_route(path: &str) -> Option<(u64, u64, bool)> {
    let rest = path.strip_prefix("/api/v1/accounts/")?;
    let (a, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("conversations/")?;
    let (c, messages) = match rest.split_once('/') {
        None => (rest, false),
        Some((c, "messages")) => (c, true),
        Some(_) => return None,
    };
    Some((a.parse().ok()?, c.parse().ok()?, messages))
}

async fn serve_origin(
    listener: TcpListener,
    template: Template,
    delay: Duration,
    probe_account: Option<u64>,
) -> i32 {
    let origin = Arc::new(Origin {
        template,
        memo: RwLock::new(HashMap::new()),
        gzip_memo: RwLock::new(HashMap::new()),
        versions: RwLock::new(HashMap::new()),
        counters: Counters::default(),
        delay,
        probe_account,
    });
    serve_loop(listener, move |req| origin.clone().handle(req)).await
}

// ---------------------------------------------------------------- burst client

async fn burst(args: &Args) -> i32 {
    let url: http::Uri = args
        .get("url")
        .unwrap_or_else(|| usage())
        .parse()
        .unwrap_or_else(|_| usage());
    let token = args.get("token").unwrap_or_else(|| usage()).to_string();
    let n = args.num("n", 2000) as usize;
    let timeout = Duration::from_millis(args.num("timeout-ms", 30_000));
    let authority = url.authority().unwrap_or_else(|| usage()).clone();
    let addr: SocketAddr = authority.as_str().parse().unwrap_or_else(|_| {
        eprintln!("burst: --url must use a literal IP:port");
        std::process::exit(2)
    });
    let path = url
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or("/".into());

    let connected = Arc::new(tokio::sync::Barrier::new(n + 1));
    let (go_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let connected = connected.clone();
        let mut go_rx = go_tx.subscribe();
        let path = path.clone();
        let token = token.clone();
        let host = authority.to_string();
        tasks.push(tokio::spawn(async move {
            let conn = async {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
                    .map_err(std::io::Error::other)
            };
            let conn = tokio::time::timeout(Duration::from_secs(20), conn).await;
            connected.wait().await;
            let (mut send, conn) = match conn {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(format!("connect: {e}")),
                Err(_) => return Err("connect: timeout".to_string()),
            };
            tokio::spawn(conn);
            let _ = go_rx.recv().await;
            let start = Instant::now();
            let req = Request::get(path.as_str())
                .header(header::HOST, host)
                .header("api_access_token", token)
                .body(Empty::new())
                .unwrap();
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = resp.status().as_u16();
            let x_cache = resp
                .headers()
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .or_else(|| {
                    resp.headers()
                        .get("x-cache-status")
                        .and_then(|v| v.to_str().ok())
                })
                .unwrap_or("-")
                .to_string();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            Ok((status, x_cache, body.to_bytes().len(), start.elapsed()))
        }));
    }
    connected.wait().await;
    let start = Instant::now();
    let _ = go_tx.send(());
    let all = futures_util::future::join_all(tasks);
    let results = match tokio::time::timeout(timeout, all).await {
        Ok(r) => r,
        Err(_) => {
            println!(
                "{{\"n\":{n},\"error\":\"timeout after {} ms\"}}",
                timeout.as_millis()
            );
            return 1;
        }
    };
    let elapsed = start.elapsed();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut x_cache: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut ok = 0u64;
    let mut max_latency = Duration::ZERO;
    let mut min_body = usize::MAX;
    for r in results {
        match r {
            Ok(Ok((status, xc, len, lat))) => {
                *statuses.entry(status.to_string()).or_default() += 1;
                *x_cache.entry(xc).or_default() += 1;
                if status == 200 && len > 0 {
                    ok += 1;
                }
                max_latency = max_latency.max(lat);
                min_body = min_body.min(len);
            }
            Ok(Err(e)) => *errors.entry(e).or_default() += 1,
            Err(e) => *errors.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    let map = |m: &BTreeMap<String, u64>| serde_json::to_string(m).unwrap();
    println!(
        "{{\"n\":{n},\"ok_200\":{ok},\"statuses\":{},\"x_cache\":{},\"errors\":{},\"elapsed_ms\":{:.1},\"max_latency_ms\":{:.1},\"min_body_bytes\":{}}}",
        map(&statuses),
        map(&x_cache),
        map(&errors),
        elapsed.as_secs_f64() * 1e3,
        max_latency.as_secs_f64() * 1e3,
        if min_body == usize::MAX { 0 } else { min_body }
    );
    if ok as usize == n { 0 } else { 1 }
}

// ---------------------------------------------------------------- walk (cache warmer)

async fn walk(args: &Args) -> i32 {
    let base: http::Uri = args
        .get("base")
        .unwrap_or_else(|| usage())
        .parse()
        .unwrap_or_else(|_| usage());
    let authority = base.authority().unwrap_or_else(|| usage()).clone();
    let addr: SocketAddr = authority.as_str().parse().unwrap_or_else(|_| {
        eprintln!("walk: --base must use a literal IP:port");
        std::process::exit(2)
    });
    let account = args.num("account", 1);
    let tokens = args.num("tokens", 1);
    let convs = args.num("convs", 100);
    let concurrency = args.num("concurrency", 64).max(1);
    // e.g. `gzip`: the cache then fills as gzip clients (browsers, the SDKs) fill it.
    let accept_encoding = args.get("accept-encoding").map(str::to_string);
    let total = tokens * convs;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        let host = authority.to_string();
        let accept_encoding = accept_encoding.clone();
        workers.push(tokio::spawn(async move {
            let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
            let mut x_cache: BTreeMap<String, u64> = BTreeMap::new();
            let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            let (mut send, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                // same numbering as wrk.lua: token 1..=T, conversation 1..=C
                let (t, c) = (i % tokens + 1, i / tokens + 1);
                send.ready().await.map_err(|e| e.to_string())?;
                let mut req = Request::get(format!("/api/v1/accounts/{account}/conversations/{c}"))
                    .header(header::HOST, host.as_str())
                    .header("api_access_token", format!("bench{t:019}"));
                if let Some(v) = &accept_encoding {
                    req = req.header(header::ACCEPT_ENCODING, v.as_str());
                }
                let req = req.body(Empty::new()).unwrap();
                let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
                *statuses
                    .entry(resp.status().as_u16().to_string())
                    .or_default() += 1;
                let xc = resp
                    .headers()
                    .get("x-cache")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string();
                *x_cache.entry(xc).or_default() += 1;
                resp.into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>((statuses, x_cache))
        }));
    }
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut x_cache: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for w in workers {
        match w.await {
            Ok(Ok((s, x))) => {
                for (k, v) in s {
                    *statuses.entry(k).or_default() += v;
                }
                for (k, v) in x {
                    *x_cache.entry(k).or_default() += v;
                }
            }
            Ok(Err(e)) => *errors.entry(e).or_default() += 1,
            Err(e) => *errors.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    let ok = statuses.get("200").copied().unwrap_or(0);
    let map = |m: &BTreeMap<String, u64>| serde_json::to_string(m).unwrap();
    println!(
        "{{\"requests\":{total},\"ok_200\":{ok},\"statuses\":{},\"x_cache\":{},\"errors\":{},\"elapsed_ms\":{:.1}}}",
        map(&statuses),
        map(&x_cache),
        map(&errors),
        start.elapsed().as_secs_f64() * 1e3
    );
    if ok == total && errors.is_empty() {
        0
    } else {
        1
    }
}

// ---------------------------------------------------------------- flood (fairness bench)

/// One keep-alive HTTP/1.1 client connection of the flood bench; reconnects after an error.
struct Client {
    addr: SocketAddr,
    host: String,
    send: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
}

impl Client {
    fn new(addr: SocketAddr, host: &str) -> Client {
        Client {
            addr,
            host: host.to_string(),
            send: None,
        }
    }

    /// GETs `path` with `token`, reading the whole body; (status, X-Cache).
    async fn get(&mut self, path: &str, token: &str) -> Result<(u16, String), String> {
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
            let req = Request::get(path)
                .header(header::HOST, self.host.as_str())
                .header("api_access_token", token)
                .body(Empty::new())
                .map_err(|e| format!("request: {e}"))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = resp.status().as_u16();
            let x_cache = resp
                .headers()
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            resp.into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            Ok::<_, String>((status, x_cache))
        }
        .await;
        if result.is_err() {
            self.send = None;
        }
        result
    }
}

/// Status, X-Cache and error counts of one group of clients.
#[derive(Default)]
struct Tally {
    requests: u64,
    statuses: BTreeMap<String, u64>,
    x_cache: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    latencies: Vec<Duration>,
}

impl Tally {
    fn record(&mut self, r: &Result<(u16, String), String>, took: Duration) {
        self.requests += 1;
        match r {
            Ok((status, xc)) => {
                *self.statuses.entry(status.to_string()).or_default() += 1;
                *self.x_cache.entry(xc.clone()).or_default() += 1;
            }
            Err(e) => *self.errors.entry(e.clone()).or_default() += 1,
        }
        self.latencies.push(took);
    }

    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in other.x_cache {
            *self.x_cache.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.latencies.extend(other.latencies);
    }

    fn status(&self, s: &str) -> u64 {
        self.statuses.get(s).copied().unwrap_or(0)
    }

    /// The q-quantile of the latencies in ms (nearest rank), 0 without any.
    fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        self.latencies.sort_unstable();
        let rank =
            ((q * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1].as_secs_f64() * 1e3
    }

    fn json(&mut self) -> String {
        let map = |m: &BTreeMap<String, u64>| serde_json::to_string(m).unwrap();
        let ok = self.status("200");
        let shed = self.status("503") + self.status("429");
        let share = |n: u64| {
            if self.requests == 0 {
                0.0
            } else {
                n as f64 / self.requests as f64
            }
        };
        let (ok_share, shed_share) = (share(ok), share(shed));
        let (p50, p99, max) = (
            self.quantile_ms(0.5),
            self.quantile_ms(0.99),
            self.quantile_ms(1.0),
        );
        format!(
            "{{\"requests\":{},\"ok_200\":{ok},\"ok_share\":{ok_share:.4},\"shed_share\":{shed_share:.4},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"max_ms\":{:.1},\"statuses\":{},\"x_cache\":{},\"errors\":{}}}",
            self.requests,
            p50,
            p99,
            max,
            map(&self.statuses),
            map(&self.x_cache),
            map(&self.errors),
        )
    }
}

/// The fairness bench's client (`benches/flood.sh`): one runaway token sends cold misses over
/// `--flood-connections` connections, each at most one request per `--flood-interval-ms`,
/// while `--polite` tokens each read cold conversations one at a time with
/// `--polite-interval-ms` between them. Every token first makes one request on its own (so the
/// upstream has accepted it and it counts as its own scope, not its client address). Polite
/// clients start `--ramp-ms` after the flood and stop at `--duration-ms`; then the flood stops.
/// Prints one JSON line: the polite and the flood requests' status and X-Cache counts, their
/// 200 and shed (503 + 429) shares, and latency percentiles.
async fn flood(args: &Args) -> i32 {
    let base: http::Uri = args
        .get("base")
        .unwrap_or_else(|| usage())
        .parse()
        .unwrap_or_else(|_| usage());
    let authority = base.authority().unwrap_or_else(|| usage()).to_string();
    let addr: SocketAddr = authority.parse().unwrap_or_else(|_| {
        eprintln!("flood: --base must use a literal IP:port");
        std::process::exit(2)
    });
    let account = args.num("account", 1);
    let duration = Duration::from_millis(args.num("duration-ms", 15_000));
    let ramp = Duration::from_millis(args.num("ramp-ms", 1_000));
    let flood_conns = args.num("flood-connections", 200);
    let flood_interval = Duration::from_millis(args.num("flood-interval-ms", 400));
    let polite = args.num("polite", 4);
    let polite_interval = Duration::from_millis(args.num("polite-interval-ms", 100));
    let timeout = Duration::from_millis(args.num("timeout-ms", 10_000));
    // Conversation numbers: every request is a cold miss (a new number each time).
    let first = args.num("first-conv", 1_000_000);
    let flood_token = format!("flood{:019}", 0);
    let polite_tokens: Vec<String> = (0..polite).map(|p| format!("polite{p:018}")).collect();
    let path = move |c: u64| format!("/api/v1/accounts/{account}/conversations/{c}");

    // Warm-up: one request per token, so that each is a scope of its own.
    let mut warm = Client::new(addr, &authority);
    for (i, token) in std::iter::once(&flood_token)
        .chain(&polite_tokens)
        .enumerate()
    {
        match warm.get(&path(first - 1 - i as u64), token).await {
            Ok((200, _)) => {}
            other => {
                eprintln!("flood: warm-up request for token {i} answered {other:?}");
                return 1;
            }
        }
    }

    let next_conv = Arc::new(AtomicU64::new(first));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = Instant::now();
    let mut flooders = Vec::new();
    for k in 0..flood_conns {
        let (next_conv, stop, token) = (next_conv.clone(), stop.clone(), flood_token.clone());
        let mut client = Client::new(addr, &authority);
        // Spread over one interval, so the flood is steady rather than in lockstep.
        let offset = flood_interval.mul_f64(k as f64 / flood_conns as f64);
        flooders.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            tokio::time::sleep(offset).await;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let c = next_conv.fetch_add(1, Ordering::Relaxed);
                let r = tokio::time::timeout(timeout, client.get(&path(c), &token))
                    .await
                    .unwrap_or_else(|_| Err("timeout".into()));
                if r.is_err() {
                    client.send = None;
                }
                tally.record(&r, sent.elapsed());
                tokio::time::sleep_until((sent + flood_interval).into()).await;
            }
            tally
        }));
    }
    tokio::time::sleep(ramp).await;
    let mut polites = Vec::new();
    for token in polite_tokens {
        let next_conv = next_conv.clone();
        let mut client = Client::new(addr, &authority);
        polites.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while start.elapsed() < duration {
                let sent = Instant::now();
                let c = next_conv.fetch_add(1, Ordering::Relaxed);
                let r = tokio::time::timeout(timeout, client.get(&path(c), &token))
                    .await
                    .unwrap_or_else(|_| Err("timeout".into()));
                if r.is_err() {
                    client.send = None;
                }
                tally.record(&r, sent.elapsed());
                tokio::time::sleep(polite_interval).await;
            }
            tally
        }));
    }
    let mut polite_tally = Tally::default();
    for p in polites {
        match p.await {
            Ok(t) => polite_tally.merge(t),
            Err(e) => eprintln!("flood: polite task: {e}"),
        }
    }
    let polite_secs = start.elapsed().saturating_sub(ramp).as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut flood_tally = Tally::default();
    for f in flooders {
        match f.await {
            Ok(t) => flood_tally.merge(t),
            Err(e) => eprintln!("flood: flood task: {e}"),
        }
    }
    println!(
        "{{\"polite_seconds\":{polite_secs:.2},\"flood_seconds\":{:.2},\"polite\":{},\"flood\":{}}}",
        start.elapsed().as_secs_f64(),
        polite_tally.json(),
        flood_tally.json()
    );
    0
}
