//! End-to-end: reloads without a restart (SPEC §13). Certificates are generated per test
//! (rcgen) and replaced the way Kubernetes replaces a mounted Secret: a new directory, then
//! an atomic rename of the `..data` symlink. Reloads are triggered through the same function
//! SIGHUP calls ([`Reloader::reload`]) or the file-change check ([`Reloader::check_files`]);
//! tests/binary.rs sends a real SIGHUP to the binary.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chatwoot_cache::Config;
use chatwoot_cache::reload::Reloader;
use http::Request;
use http_body_util::{BodyExt, Empty};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const TOKEN: &str = "admin-token";

/// A CA that signs leaves (server or client).
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for localhost/127.0.0.1 expiring on `expires` (y, m, d): (cert PEM, key PEM).
    fn leaf(&self, purpose: ExtendedKeyUsagePurpose, expires: (i32, u8, u8)) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.extended_key_usages = vec![purpose];
        params.not_after = rcgen::date_time_ymd(expires.0, expires.1, expires.2);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        roots
    }
}

fn unix(y: i32, m: u8, d: u8) -> f64 {
    rcgen::date_time_ymd(y, m, d).unix_timestamp() as f64
}

/// A directory laid out like a mounted Kubernetes Secret: `tls.crt` and `tls.key` are
/// symlinks into `..data`, itself a symlink to a timestamped directory.
struct SecretMount {
    dir: PathBuf,
    version: usize,
}

impl SecretMount {
    fn new(files: &[(&str, &str)]) -> SecretMount {
        let mut m = SecretMount {
            dir: temp_dir("mount"),
            version: 0,
        };
        m.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), m.dir.join(name)).unwrap();
        }
        m
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes a new version and swaps `..data` to it atomically (what the kubelet does).
    fn update(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let versioned = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&versioned)).unwrap();
        for (name, content) in files {
            std::fs::write(self.dir.join(&versioned).join(name), content).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&versioned, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

/// The config a reload reads: argv-like settings (files are read again every time), on
/// loopback ports.
fn load(args: Vec<String>) -> Result<Config, chatwoot_cache::config::ConfigError> {
    let mut argv = vec!["chatwoot-cache".to_string()];
    argv.extend(args);
    let mut c = Config::try_from_args(argv)?;
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.admin_listen = "127.0.0.1:0".parse().unwrap();
    c.shutdown_timeout = Duration::from_secs(5);
    Ok(c)
}

fn reloader(proxy: &ProxyHandle, args: Vec<String>) -> Reloader {
    Reloader::new(proxy.proxy.clone(), Box::new(move || load(args.clone())))
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// An HTTP/1.1 connection over TLS that trusts `roots`.
struct TlsConn {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    roots: rustls::RootCertStore,
) -> Result<TlsConn, String> {
    let cfg = rustls::ClientConfig::builder_with_provider(chatwoot_cache::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(TlsConn { sender })
}

impl TlsConn {
    async fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let req = Request::get(path)
            .header("host", "localhost")
            .header("api_access_token", TOKEN)
            .body(Empty::new())
            .unwrap();
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let x_cache = resp
            .headers()
            .get("x-cache")
            .map(|v| v.to_str().unwrap_or("").to_string())
            .unwrap_or_default();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok((status, x_cache))
    }
}

const CONV: &str = "/api/v1/accounts/1/conversations/42";

/// A renewed certificate, swapped in through the `..data` symlink, is served to new TLS
/// clients once the file check sees it; a connection opened before keeps working; the expiry
/// gauge follows the certificate in use.
#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_clients_and_old_connections_continue() {
    let fake = FakeChatwoot::start().await;
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("renewed CA"));
    let (cert1, key1) = old_ca.leaf(ExtendedKeyUsagePurpose::ServerAuth, (2031, 1, 1));
    let (cert2, key2) = new_ca.leaf(ExtendedKeyUsagePurpose::ServerAuth, (2032, 6, 30));
    let mut mount = SecretMount::new(&[("tls.crt", &cert1), ("tls.key", &key1)]);
    let args = s(&[
        "--upstream",
        &fake.url(),
        "--tls-cert-file",
        mount.path("tls.crt").to_str().unwrap(),
        "--tls-key-file",
        mount.path("tls.key").to_str().unwrap(),
    ]);
    let proxy = start_proxy(load(args.clone()).unwrap()).await;
    let reloader = reloader(&proxy, args);
    let expiry = r#"chatwoot_cache_tls_cert_expiry_timestamp_seconds{listener="public"}"#;
    assert_eq!(
        metric(&metrics_text(&proxy).await, expiry),
        unix(2031, 1, 1)
    );

    let mut before = tls_connect(proxy.addr, old_ca.roots())
        .await
        .expect("old cert");
    assert_eq!(before.get(CONV).await.unwrap().0, 200);
    assert!(
        tls_connect(proxy.addr, new_ca.roots()).await.is_err(),
        "the renewed certificate is not served yet"
    );
    assert!(!reloader.check_files(), "nothing changed yet");

    mount.update(&[("tls.crt", &cert2), ("tls.key", &key2)]);
    assert!(
        reloader.check_files(),
        "the symlink swap is seen as a change"
    );

    let mut after = tls_connect(proxy.addr, new_ca.roots())
        .await
        .expect("a new client gets the renewed certificate");
    assert_eq!(after.get(CONV).await.unwrap(), (200, "HIT".to_string()));
    assert!(tls_connect(proxy.addr, old_ca.roots()).await.is_err());
    // The connection opened before the swap carries on, and so does the cache.
    assert_eq!(before.get(CONV).await.unwrap(), (200, "HIT".to_string()));
    let m = metrics_text(&proxy).await;
    assert_eq!(metric(&m, expiry), unix(2032, 6, 30));
    assert_eq!(
        metric(&m, r#"chatwoot_cache_config_reloads_total{result="ok"}"#),
        1.0
    );
    assert!(!reloader.check_files(), "seen once, reloaded once");
}

/// A configuration that does not hold together changes nothing: a key that does not belong to
/// the certificate, or a bad value in the config file. One error is counted per change.
#[tokio::test]
async fn an_invalid_reload_changes_nothing() {
    let fake = FakeChatwoot::start().await;
    let ca = Ca::new("CA");
    let (cert1, key1) = ca.leaf(ExtendedKeyUsagePurpose::ServerAuth, (2031, 1, 1));
    let (cert2, _) = ca.leaf(ExtendedKeyUsagePurpose::ServerAuth, (2033, 1, 1));
    let mut mount = SecretMount::new(&[("tls.crt", &cert1), ("tls.key", &key1)]);
    let dir = temp_dir("config");
    let file = dir.join("config.toml");
    std::fs::write(&file, "cache_ttl = \"1h\"\n").unwrap();
    let args = s(&[
        "--upstream",
        &fake.url(),
        "--config",
        file.to_str().unwrap(),
        "--tls-cert-file",
        mount.path("tls.crt").to_str().unwrap(),
        "--tls-key-file",
        mount.path("tls.key").to_str().unwrap(),
    ]);
    let proxy = start_proxy(load(args.clone()).unwrap()).await;
    let reloader = reloader(&proxy, args);
    let mut conn = tls_connect(proxy.addr, ca.roots()).await.unwrap();
    assert_eq!(conn.get(CONV).await.unwrap(), (200, "MISS".into()));

    // A certificate whose key is the old one's: refused as a whole.
    mount.update(&[("tls.crt", &cert2), ("tls.key", &key1)]);
    assert!(!reloader.check_files());
    // A bad value in the config file (and a good one next to it): nothing applies.
    std::fs::write(&file, "cache_ttl = \"0s\"\nstale_if_error = \"banana\"\n").unwrap();
    assert!(!reloader.reload("test"));

    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(&m, r#"chatwoot_cache_config_reloads_total{result="error"}"#),
        2.0
    );
    assert_eq!(
        metric(&m, r#"chatwoot_cache_config_reloads_total{result="ok"}"#),
        0.0
    );
    let expiry = r#"chatwoot_cache_tls_cert_expiry_timestamp_seconds{listener="public"}"#;
    assert_eq!(metric(&m, expiry), unix(2031, 1, 1), "the old certificate");
    assert_eq!(
        proxy.proxy.config.load().cache_ttl,
        Duration::from_secs(3600)
    );
    assert_eq!(
        conn.get(CONV).await.unwrap(),
        (200, "HIT".into()),
        "TTL kept"
    );
    let mut fresh = tls_connect(proxy.addr, ca.roots()).await.unwrap();
    assert_eq!(fresh.get(CONV).await.unwrap(), (200, "HIT".into()));
    assert!(!reloader.check_files(), "a refused change is reported once");
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(&m, r#"chatwoot_cache_config_reloads_total{result="error"}"#),
        2.0,
        "a retry of the same failure is not counted again"
    );
}

/// A TTL lowered by a reload takes effect for the next request: the entry stored under the old
/// TTL survives (STALE, not MISS) and nothing was fetched again. Restart-only settings in the
/// file keep their running values.
#[tokio::test]
async fn a_reloaded_ttl_applies_to_the_next_request_and_entries_survive() {
    let fake = FakeChatwoot::start().await;
    let dir = temp_dir("config");
    let file = dir.join("config.toml");
    std::fs::write(&file, "cache_ttl = \"1h\"\n").unwrap();
    let args = s(&[
        "--upstream",
        &fake.url(),
        "--config",
        file.to_str().unwrap(),
    ]);
    let proxy = start_proxy(load(args.clone()).unwrap()).await;
    let reloader = reloader(&proxy, args);
    assert_eq!(conv(&proxy, 1, 42, TOKEN).await.x_cache(), "MISS");
    assert_eq!(conv(&proxy, 1, 42, TOKEN).await.x_cache(), "HIT");
    let upstream_before = fake.show_requests();

    std::fs::write(
        &file,
        "cache_ttl = \"50ms\"\nstale_while_revalidate = \"1h\"\ncache_max_bytes = \"1GiB\"\n",
    )
    .unwrap();
    assert!(reloader.reload("SIGHUP"));
    tokio::time::sleep(Duration::from_millis(120)).await;
    let r = conv(&proxy, 1, 42, TOKEN).await;
    assert_eq!(r.x_cache(), "STALE", "the stored entry, past the new TTL");
    assert_eq!(proxy.proxy.store.usage().0, 1);
    let config = proxy.proxy.config.load();
    assert_eq!(config.cache_ttl, Duration::from_millis(50));
    assert_eq!(config.cache_max_bytes, 256 << 20, "restart-only: kept");
    // The stale answer revalidated in the background: a fresh HIT follows.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fake.show_requests() == upstream_before {
        assert!(std::time::Instant::now() < deadline, "no revalidation");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A small cache started with only `cache_max_bytes` (derived object limit 64KiB); the file
/// then asks for 1GiB (restart-only) and a new TTL: the TTL applies, the object limit stays
/// derived from the running size (before: the reload failed naming --max-object-bytes).
#[tokio::test]
async fn a_kept_cache_size_keeps_its_derived_object_limit() {
    let fake = FakeChatwoot::start().await;
    let dir = temp_dir("config");
    let file = dir.join("config.toml");
    std::fs::write(&file, "cache_max_bytes = \"1MiB\"\n").unwrap();
    let args = s(&[
        "--upstream",
        &fake.url(),
        "--config",
        file.to_str().unwrap(),
    ]);
    let proxy = start_proxy(load(args.clone()).unwrap()).await;
    let reloader = reloader(&proxy, args);
    std::fs::write(&file, "cache_max_bytes = \"1GiB\"\ncache_ttl = \"7m\"\n").unwrap();
    assert!(reloader.reload("SIGHUP"));
    let config = proxy.proxy.config.load();
    assert_eq!(config.cache_ttl, Duration::from_secs(420));
    assert_eq!(config.cache_max_bytes, 1 << 20);
    assert_eq!(config.max_object_bytes, 64 << 10);
}

/// The kubelet updates a ConfigMap and a Secret independently: the config may name a new
/// secrets file before the Secret holding it arrives. That reload fails; the next checks
/// retry (the failure is counted once) and apply as soon as the file is there, although the
/// running configuration never watched it.
#[tokio::test]
async fn a_failed_reload_is_retried_until_the_file_it_named_arrives() {
    let fake = FakeChatwoot::start().await;
    let dir = temp_dir("config");
    let file = dir.join("config.toml");
    let secrets = temp_dir("secrets").join("webhooks.toml");
    std::fs::write(&file, "cache_ttl = \"1h\"\n").unwrap();
    let args = s(&[
        "--upstream",
        &fake.url(),
        "--config",
        file.to_str().unwrap(),
    ]);
    let proxy = start_proxy(load(args.clone()).unwrap()).await;
    let reloader = reloader(&proxy, args);
    assert_ne!(
        deliver_signed(&proxy, 1, "account-one").await,
        200,
        "no secret yet"
    );

    std::fs::write(
        &file,
        format!("webhook_secrets_file = {:?}\n", secrets.to_str().unwrap()),
    )
    .unwrap();
    assert!(!reloader.check_files(), "the Secret has not arrived");
    assert!(!reloader.check_files(), "still not");
    let m = metrics_text(&proxy).await;
    let errors = r#"chatwoot_cache_config_reloads_total{result="error"}"#;
    assert_eq!(metric(&m, errors), 1.0, "one failure, counted once");

    std::fs::write(&secrets, "[accounts]\n1 = [\"account-one\"]\n").unwrap();
    assert!(reloader.check_files(), "retried once the file is there");
    assert_eq!(deliver_signed(&proxy, 1, "account-one").await, 200);
    // A file named for the first time is read once more (its content before the reload read
    // it is unknown), then the checks are quiet: no retries after a success.
    assert!(reloader.check_files());
    assert!(!reloader.check_files(), "no retry after success");
}

/// A file replaced after the loader read it but before the reload finished is not recorded
/// as applied: the next check reloads again.
#[tokio::test]
async fn a_file_replaced_during_a_reload_is_reloaded_again() {
    let fake = FakeChatwoot::start().await;
    let dir = temp_dir("config");
    let file = dir.join("config.toml");
    std::fs::write(&file, "cache_ttl = \"1h\"\n").unwrap();
    let args = s(&[
        "--upstream",
        &fake.url(),
        "--config",
        file.to_str().unwrap(),
    ]);
    let proxy = start_proxy(load(args.clone()).unwrap()).await;
    let swap = file.clone();
    let reloader = Reloader::new(
        proxy.proxy.clone(),
        Box::new(move || {
            let c = load(args.clone());
            // The kubelet swaps the file right after it was read.
            if std::fs::read_to_string(&swap).unwrap().contains("2m") {
                std::fs::write(&swap, "cache_ttl = \"3m\"\n").unwrap();
            }
            c
        }),
    );
    std::fs::write(&file, "cache_ttl = \"2m\"\n").unwrap();
    assert!(reloader.check_files());
    assert_eq!(
        proxy.proxy.config.load().cache_ttl,
        Duration::from_secs(120)
    );
    assert!(
        reloader.check_files(),
        "the swapped-in file is seen as a change"
    );
    assert_eq!(
        proxy.proxy.config.load().cache_ttl,
        Duration::from_secs(180)
    );
    assert!(!reloader.check_files());
}

/// Upstream mTLS: an upstream that requires a client certificate refuses the proxy without
/// one (502); once the certificate files appear and a reload reads them, new upstream
/// connections present it. The expiry gauge shows the client certificate.
#[tokio::test]
async fn upstream_mtls_presents_the_reloaded_client_certificate() {
    let server_ca = Ca::new("upstream server CA");
    let client_ca = Ca::new("upstream client CA");
    let (server_cert, server_key) =
        server_ca.leaf(ExtendedKeyUsagePurpose::ServerAuth, (2031, 1, 1));
    let (client_cert, client_key) =
        client_ca.leaf(ExtendedKeyUsagePurpose::ClientAuth, (2030, 5, 17));
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_ca.roots()),
        chatwoot_cache::tls::provider(),
    )
    .build()
    .unwrap();
    let server_tls = rustls::ServerConfig::builder_with_provider(chatwoot_cache::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            CertificateDer::pem_slice_iter(server_cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
            rustls::pki_types::PrivateKeyDer::from_pem_slice(server_key.as_bytes()).unwrap(),
        )
        .unwrap();
    let fake = FakeChatwoot::start_tls(Arc::new(server_tls)).await;
    let upstream = fake.url().replace("http://127.0.0.1", "https://localhost");
    assert!(upstream.starts_with("https://localhost:"), "{upstream}");

    let dir = temp_dir("mtls");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &server_ca.pem).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(&config, "").unwrap();
    let args = s(&[
        "--upstream",
        &upstream,
        "--upstream-ca-file",
        ca_file.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    let proxy = start_proxy(load(args.clone()).unwrap()).await;
    let reloader = reloader(&proxy, args);
    let expiry = r#"chatwoot_cache_tls_cert_expiry_timestamp_seconds{listener="upstream_client"}"#;
    assert!(
        !metrics_text(&proxy).await.contains(expiry),
        "no client cert"
    );
    let r = conv(&proxy, 1, 42, TOKEN).await;
    assert_eq!(r.status, 502, "refused without a client certificate");

    let mount = SecretMount::new(&[("tls.crt", &client_cert), ("tls.key", &client_key)]);
    std::fs::write(
        &config,
        format!(
            "upstream_client_cert_file = {:?}\nupstream_client_key_file = {:?}\n",
            mount.path("tls.crt"),
            mount.path("tls.key")
        ),
    )
    .unwrap();
    assert!(reloader.check_files(), "the config file changed");
    let r = conv(&proxy, 1, 42, TOKEN).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        metric(&metrics_text(&proxy).await, expiry),
        unix(2030, 5, 17)
    );
}

/// Secrets rotate through their files: a new admin token and a webhook secrets file with the
/// new and the previous secret of an account apply on reload.
#[tokio::test]
async fn rotated_secret_files_apply_on_reload() {
    let fake = FakeChatwoot::start().await;
    let mut mount = SecretMount::new(&[
        ("admin-token", "first-admin-token"),
        ("webhooks.toml", "[accounts]\n1 = [\"account-one-old\"]\n"),
    ]);
    let args = s(&[
        "--upstream",
        &fake.url(),
        "--admin-token-file",
        mount.path("admin-token").to_str().unwrap(),
        "--webhook-secrets-file",
        mount.path("webhooks.toml").to_str().unwrap(),
    ]);
    let proxy = start_proxy(load(args.clone()).unwrap()).await;
    let reloader = reloader(&proxy, args);
    let purge = |token: &str| {
        let url = proxy.admin_url("/cache");
        let auth = format!("Bearer {token}");
        async move {
            send(http::Method::DELETE, &url, &[("authorization", &auth)], b"")
                .await
                .status
        }
    };
    assert_eq!(purge("first-admin-token").await, 200);
    let verifies = |secret: &'static str| deliver_signed(&proxy, 1, secret);
    assert_eq!(verifies("account-one-old").await, 200);
    assert_eq!(verifies("account-one-new").await, 401);

    mount.update(&[
        ("admin-token", "second-admin-token\n"),
        (
            "webhooks.toml",
            "[accounts]\n1 = [\"account-one-new\", \"account-one-old\"]\n",
        ),
    ]);
    assert!(reloader.check_files());
    assert_eq!(purge("second-admin-token").await, 200);
    assert_eq!(purge("first-admin-token").await, 401);
    assert_eq!(verifies("account-one-new").await, 200, "the new secret");
    assert_eq!(
        verifies("account-one-old").await,
        200,
        "the previous one, in rotation"
    );
}

/// Delivers a signed `conversation_updated` for account `a`; returns the status.
async fn deliver_signed(proxy: &ProxyHandle, a: u64, secret: &str) -> u16 {
    let body = br#"{"event":"conversation_updated","id":42}"#;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut msg = format!("{ts}.").into_bytes();
    msg.extend_from_slice(body);
    let sig: String = ring::hmac::sign(&key, &msg)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    send(
        http::Method::POST,
        &proxy.admin_url(&format!("/webhooks/chatwoot/accounts/{a}")),
        &[
            ("content-type", "application/json"),
            ("x-chatwoot-timestamp", &ts),
            ("x-chatwoot-signature", &format!("sha256={sig}")),
        ],
        body,
    )
    .await
    .status
    .as_u16()
}

/// Measurement: requests under load across certificate swaps. Several clients keep opening
/// new TLS connections (each trusting both CAs) and sending requests while the certificate is
/// swapped back and forth; every request must succeed. Prints the counts.
#[tokio::test]
async fn no_request_fails_during_certificate_swaps_under_load() {
    let fake = FakeChatwoot::start().await;
    let (ca1, ca2) = (Ca::new("CA one"), Ca::new("CA two"));
    let pairs = [
        ca1.leaf(ExtendedKeyUsagePurpose::ServerAuth, (2031, 1, 1)),
        ca2.leaf(ExtendedKeyUsagePurpose::ServerAuth, (2032, 1, 1)),
    ];
    let mut mount = SecretMount::new(&[("tls.crt", &pairs[0].0), ("tls.key", &pairs[0].1)]);
    let args = s(&[
        "--upstream",
        &fake.url(),
        "--tls-cert-file",
        mount.path("tls.crt").to_str().unwrap(),
        "--tls-key-file",
        mount.path("tls.key").to_str().unwrap(),
    ]);
    let proxy = start_proxy(load(args.clone()).unwrap()).await;
    let reloader = Arc::new(reloader(&proxy, args));
    let mut roots = ca1.roots();
    roots.add_parsable_certificates(
        CertificateDer::pem_slice_iter(ca2.pem.as_bytes()).map(|c| c.unwrap()),
    );
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (addr, roots) = (proxy.addr, roots.clone());
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                // A new connection (new handshake) every few requests.
                match tls_connect(addr, roots.clone()).await {
                    Ok(mut conn) => {
                        for _ in 0..5 {
                            match conn.get(CONV).await {
                                Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                                _ => failed.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let swaps = 10;
    for i in 1..=swaps {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (cert, key) = &pairs[i % 2];
        mount.update(&[("tls.crt", cert), ("tls.key", key)]);
        let r = reloader.clone();
        assert!(
            tokio::task::spawn_blocking(move || r.check_files())
                .await
                .unwrap()
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("certificate swaps: {swaps}, requests ok: {ok}, failed: {failed}");
    assert!(ok > 0);
    assert_eq!(failed, 0, "requests failed during certificate swaps");
}
