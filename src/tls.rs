//! rustls configuration, always with the `ring` provider passed explicitly: relying on a
//! process-default provider panics at runtime if a second provider ever gets compiled in.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::live::Live;

/// A TLS set-up problem; all of them stop start-up (exit 1: a file could not be used).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--{setting}: cannot read {path}: {detail}")]
    File {
        setting: &'static str,
        path: String,
        detail: String,
    },
    #[error("--{setting}: {path} contains no {what}")]
    Empty {
        setting: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("--{setting}: {path}: {detail}")]
    Key {
        setting: &'static str,
        path: String,
        detail: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The one crypto provider of this binary.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client config trusting the webpki roots plus an optional extra CA bundle, presenting
/// `identity` (upstream mTLS) when given.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<&ClientIdentity>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = load_certs("upstream-ca-file", path)?;
        for cert in certs {
            roots.add(cert).map_err(|e| TlsError::File {
                setting: "upstream-ca-file",
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match identity {
        Some(id) => builder.with_client_auth_cert(id.certs.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    })
}

/// The trust roots for `rediss://` with `--redis-ca-file`, as one PEM bundle: `ca_pem` (the
/// file) followed by the system's roots. redis-rs trusts only the bundle it is handed, in place
/// of the system's roots; SPEC 11 says the file *adds* a CA, so the system's roots go into the
/// bundle too. A system root rustls cannot use as a trust anchor is left out (redis-rs would
/// refuse the whole bundle for it), and an unreadable system store leaves just the file.
pub fn redis_root_bundle(ca_pem: &[u8]) -> Vec<u8> {
    let native = rustls_native_certs::load_native_certs();
    if !native.errors.is_empty() {
        tracing::warn!(
            errors = native.errors.len(),
            "some system trust roots could not be read; rediss:// trusts --redis-ca-file and the rest"
        );
    }
    root_bundle(ca_pem, &native.certs)
}

/// `ca_pem`, then each of `system` that rustls accepts as a trust anchor, PEM-encoded.
fn root_bundle(ca_pem: &[u8], system: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut out = ca_pem.to_vec();
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    let mut check = RootCertStore::empty();
    for cert in system {
        if check.add(cert.clone().into_owned()).is_ok() {
            out.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
            for line in base64(cert.as_ref()).as_bytes().chunks(64) {
                out.extend_from_slice(line);
                out.push(b'\n');
            }
            out.extend_from_slice(b"-----END CERTIFICATE-----\n");
        }
    }
    out
}

/// Standard base64 with padding (RFC 4648 §4), for PEM.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The client certificate presented to `https://` upstreams (`--upstream-client-cert-file`,
/// `--upstream-client-key-file`).
#[derive(Debug)]
pub struct ClientIdentity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// When the leaf certificate expires (Unix seconds), if it could be read.
    pub not_after: Option<i64>,
}

/// Reads and checks a client certificate and its key (the key must belong to the certificate).
pub fn client_identity(cert_file: &Path, key_file: &Path) -> Result<ClientIdentity, TlsError> {
    let certs = load_certs("upstream-client-cert-file", cert_file)?;
    let key = load_key("upstream-client-key-file", key_file)?;
    // Checked here, at load time, rather than at the first handshake that uses it.
    CertifiedKey::from_der(certs.clone(), key.clone_key(), &provider())
        .map_err(|e| key_error("upstream-client-key-file", key_file, e))?;
    let not_after = not_after(&certs[0]);
    Ok(ClientIdentity {
        certs,
        key,
        not_after,
    })
}

/// The public listener's certificate and key, ready to serve, and when it expires.
#[derive(Debug)]
pub struct ServerCert {
    key: Arc<CertifiedKey>,
    /// When the leaf certificate expires (Unix seconds), if it could be read.
    pub not_after: Option<i64>,
}

/// Reads and checks a server certificate chain and its key.
pub fn server_cert(cert_file: &Path, key_file: &Path) -> Result<ServerCert, TlsError> {
    let certs = load_certs("tls-cert-file", cert_file)?;
    let key = load_key("tls-key-file", key_file)?;
    let not_after = not_after(&certs[0]);
    let key = CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| key_error("tls-key-file", key_file, e))?;
    Ok(ServerCert {
        key: Arc::new(key),
        not_after,
    })
}

/// Hands every new handshake the current certificate: a reload swaps it, and connections
/// already open keep the one they were established with (rustls resolves once per handshake).
#[derive(Debug)]
pub struct CertResolver {
    current: Live<Arc<CertifiedKey>>,
}

impl CertResolver {
    pub fn new(cert: ServerCert) -> Arc<Self> {
        Arc::new(CertResolver {
            current: Live::new(cert.key),
        })
    }

    /// Serves `cert` to handshakes from now on.
    pub fn set(&self, cert: ServerCert) {
        self.current.store(cert.key);
    }

    /// A server config that resolves through this, offering h2 and HTTP/1.1 via ALPN.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some((*self.current.load()).clone())
    }
}

/// Server config for `--tls-cert-file`/`--tls-key-file`, offering h2 and HTTP/1.1 via ALPN.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, TlsError> {
    let certs = load_certs("tls-cert-file", cert_file)?;
    let key = load_key("tls-key-file", key_file)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

fn key_error(setting: &'static str, path: &Path, e: rustls::Error) -> TlsError {
    let detail = match e {
        rustls::Error::InconsistentKeys(_) => "does not belong to the certificate".to_string(),
        other => other.to_string(),
    };
    TlsError::Key {
        setting,
        path: path.display().to_string(),
        detail,
    }
}

fn load_key(setting: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        setting,
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

fn load_certs(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |detail: String| TlsError::File {
        setting,
        path: path.display().to_string(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            setting,
            path: path.display().to_string(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

/// The `notAfter` of an X.509 certificate, in Unix seconds (for the expiry gauge). A small DER
/// walk (Certificate → TBSCertificate → Validity) instead of a full X.509 parser: rustls has
/// already validated the structure it needs, and this is the one field we read. `None` if
/// anything is not where RFC 5280 puts it.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (tag, certificate, _) = der_tlv(cert.as_ref())?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = der_tlv(certificate)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = tbs;
    // [0] EXPLICIT version, optional.
    let (tag, _, after) = der_tlv(rest)?;
    if tag == 0xA0 {
        rest = after;
    }
    // serialNumber, signature, issuer: skipped.
    for expected in [0x02, 0x30, 0x30] {
        let (tag, _, after) = der_tlv(rest)?;
        if tag != expected {
            return None;
        }
        rest = after;
    }
    let (tag, validity, _) = der_tlv(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, after_not_before) = der_tlv(validity)?;
    let (tag, time, _) = der_tlv(after_not_before)?;
    parse_der_time(tag, time)
}

/// One DER tag-length-value: (tag, content, what follows).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn parse_der_time(tag: u8, t: &[u8]) -> Option<i64> {
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (year, rest) = match (tag, t.len()) {
        (0x17, 13) => {
            let yy = digits(&t[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &t[2..])
        }
        (0x18, 15) => (digits(&t[..4])?, &t[4..]),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), proleptic Gregorian.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input}");
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    /// The bundle keeps the file's CA and adds every usable system root, each parsing back to
    /// the same DER; a system certificate rustls cannot anchor on is left out.
    #[test]
    fn redis_root_bundle_adds_the_file_to_the_system_roots() {
        let ca = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.self_signed(&key).unwrap()
        };
        let (file_ca, sys1, sys2) = (ca("file"), ca("system 1"), ca("system 2"));
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let system = [sys1.der().clone(), garbage, sys2.der().clone()];
        let bundle = root_bundle(file_ca.pem().as_bytes(), &system);
        let parsed: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bundle)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            parsed,
            vec![
                file_ca.der().clone(),
                sys1.der().clone(),
                sys2.der().clone()
            ]
        );
        let mut store = RootCertStore::empty();
        for cert in parsed {
            store.add(cert).unwrap();
        }
        assert_eq!(store.len(), 3);
        // A file without a final newline still yields separate PEM blocks.
        let trimmed = file_ca.pem().trim_end().to_owned();
        let bundle = root_bundle(trimmed.as_bytes(), &system[..1]);
        assert_eq!(CertificateDer::pem_slice_iter(&bundle).count(), 2);
    }

    #[test]
    fn der_times() {
        assert_eq!(parse_der_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(parse_der_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_der_time(0x18, b"20000229120000Z"), Some(951_825_600));
        assert_eq!(
            parse_der_time(0x18, b"99991231235959Z"),
            Some(253_402_300_799)
        );
        assert_eq!(parse_der_time(0x17, b"700101000000"), None);
        assert_eq!(parse_der_time(0x17, b"701301000000Z"), None);
        assert_eq!(parse_der_time(0x18, b"2000022912000Z"), None);
        assert_eq!(parse_der_time(0x04, b"700101000000Z"), None);
    }

    #[test]
    fn not_after_of_generated_certificates() {
        for expiry in [
            rcgen::date_time_ymd(2027, 3, 1),
            rcgen::date_time_ymd(2049, 12, 31),
            rcgen::date_time_ymd(2051, 1, 2),
        ] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
            params.not_after = expiry;
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(
                not_after(cert.der()),
                Some(expiry.unix_timestamp()),
                "{expiry}"
            );
        }
        assert_eq!(
            not_after(&CertificateDer::from(vec![0x30, 0x03, 0x02])),
            None
        );
        assert_eq!(not_after(&CertificateDer::from(Vec::new())), None);
    }
}
