//! The hop-by-hop header names (RFC 9110 §7.6.1): one list, used by `upstream/` (never
//! forwarded in either direction) and by `cache/` (never stored or replayed), so neither imports
//! the other.

use http::HeaderName;
use http::header;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy `Keep-Alive`/`Proxy-Connection`).
/// Headers a `Connection` header names are hop-by-hop too; callers that see the whole map check
/// those themselves.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_covers_rfc_9110_and_the_legacy_names_only() {
        for name in [
            "connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authenticate",
            "proxy-authorization",
            "keep-alive",
            "proxy-connection",
        ] {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "content-type",
            "etag",
            "cache-control",
            "set-cookie",
            "host",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }
}
