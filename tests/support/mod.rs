//! Shared test harness: the fake Chatwoot ([`fake`]), an in-process proxy on random ports,
//! a small HTTP client, and TLS material generated per test.

#![allow(dead_code)]

pub mod fake;
pub mod redis;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatwoot_cache::{Config, Proxy, server};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[allow(unused_imports)]
pub use fake::{FakeChatwoot, Fault};

/// A running proxy.
pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub proxy: Arc<Proxy>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ProxyHandle {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Triggers graceful shutdown; returns the task to await.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("already shut down")
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The config tests start from: SPEC defaults, pointed at `upstream`, on loopback.
pub fn config(upstream: &str) -> Config {
    let mut c = Config::for_upstream(upstream).expect("config");
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.admin_listen = "127.0.0.1:0".parse().unwrap();
    c.shutdown_timeout = Duration::from_secs(5);
    c
}

/// Starts a proxy with `cfg` on random loopback ports.
pub async fn start_proxy(cfg: Config) -> ProxyHandle {
    start_proxy_tls(cfg, None).await
}

pub async fn start_proxy_tls(cfg: Config, tls: Option<Arc<rustls::ServerConfig>>) -> ProxyHandle {
    let public = TcpListener::bind(cfg.listen).await.expect("bind public");
    let admin = TcpListener::bind(cfg.admin_listen)
        .await
        .expect("bind admin");
    let addr = public.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let proxy = Proxy::new(cfg).expect("proxy");
    // Without an explicit TLS config, the one `--tls-cert-file` describes (reloadable).
    let tls = tls.or_else(|| proxy.server_tls_config().expect("server tls"));
    let (tx, rx) = oneshot::channel::<()>();
    let p = proxy.clone();
    let task = tokio::spawn(async move {
        server::run(p, public, admin, tls, async {
            let _ = rx.await;
        })
        .await;
    });
    ProxyHandle {
        addr,
        admin: admin_addr,
        proxy,
        shutdown: Some(tx),
        task: Some(task),
    }
}

/// A fake upstream and a proxy in front of it, with SPEC defaults.
pub async fn setup() -> (FakeChatwoot, ProxyHandle) {
    let fake = FakeChatwoot::start().await;
    let proxy = start_proxy(config(&fake.url())).await;
    (fake, proxy)
}

/// A response read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn x_cache(&self) -> &str {
        self.header("x-cache")
    }

    /// The body with its `Content-Encoding` undone (gzip, decoded by flate2, an implementation
    /// independent of the proxy's libdeflate).
    pub fn decoded(&self) -> Bytes {
        match self.header("content-encoding") {
            "" => self.body.clone(),
            "gzip" => {
                use std::io::Read;
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&self.body[..])
                    .read_to_end(&mut out)
                    .unwrap_or_else(|e| panic!("not gzip ({e}): {:?}", self.body));
                Bytes::from(out)
            }
            other => panic!("unexpected Content-Encoding {other:?}"),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let body = self.decoded();
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&body)))
    }

    /// The body as it came (not decoded).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build(HttpConnector::new())
}

/// Sends a request; panics on transport errors (use `try_send` to observe them).
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    try_send(&client(), method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

pub async fn try_send(
    client: &TestClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp, String> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e:?}"))?
        .to_bytes();
    Ok(Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

pub async fn get(url: &str, token: Option<&str>) -> Resp {
    match token {
        Some(t) => send(Method::GET, url, &[("api_access_token", t)], b"").await,
        None => send(Method::GET, url, &[], b"").await,
    }
}

/// GET the conversation (a, c) through the proxy with `token`.
pub async fn conv(proxy: &ProxyHandle, a: u64, c: u64, token: &str) -> Resp {
    get(
        &proxy.url(&format!("/api/v1/accounts/{a}/conversations/{c}")),
        Some(token),
    )
    .await
}

/// The admin `/metrics` text.
pub async fn metrics_text(proxy: &ProxyHandle) -> String {
    get(&proxy.admin_url("/metrics"), None).await.text()
}

/// The value of one sample line (`name{labels}` exactly as exposed), 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap_or(f64::NAN))
        })
        .unwrap_or(0.0)
}

/// Upstream requests holding a slot now, from the proxy's own gauge.
pub async fn upstream_in_flight(proxy: &ProxyHandle) -> f64 {
    metric(
        &metrics_text(proxy).await,
        "chatwoot_cache_upstream_in_flight",
    )
}

/// Polls `cond` every `every` until it holds; false if `limit` passes first.
pub async fn poll_until<F, Fut>(limit: Duration, every: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A CA and a `localhost`/127.0.0.1 leaf signed by it (PEM strings).
pub struct TestPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "chatwoot-cache test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    }
}

/// A fresh directory under the system temp dir (removed by the OS, not by us).
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "chatwoot-cache-test-{}-{}-{}",
        tag,
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// rustls server config for a PEM cert and key.
pub fn server_tls(pki: &TestPki) -> Arc<rustls::ServerConfig> {
    let dir = temp_dir("tls");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    Arc::new(chatwoot_cache::tls::server_config(&cert, &key).expect("server tls"))
}
