//! rustls configuration, always with the `ring` provider passed explicitly: relying on a
//! process-default provider panics at runtime if a second provider ever gets compiled in.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

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
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The one crypto provider of this binary.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client config trusting the webpki roots plus an optional extra CA bundle.
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
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
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Server config for `--tls-cert-file`/`--tls-key-file`, offering h2 and HTTP/1.1 via ALPN.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, TlsError> {
    let certs = load_certs("tls-cert-file", cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::File {
        setting: "tls-key-file",
        path: key_file.display().to_string(),
        detail: e.to_string(),
    })?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
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
