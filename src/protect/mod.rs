//! Upstream protection (SPEC 6, 12): a concurrency limit with a queue deadline, shared fairly
//! between token scopes ([`limiter`]), the token scopes the upstream has accepted ([`accepted`]),
//! a per-token rate limit ([`rate`]) and a circuit breaker. They sit in front of every upstream request, all routes together.

mod accepted;
mod breaker;
mod limiter;
mod per_address;
mod rate;

pub use accepted::AcceptedTokens;
pub use breaker::{Admission, Breaker, BreakerConfig, BreakerState, Outcome, Ticket};
pub use limiter::{Key, Limiter, Shed, UpstreamPermit};
pub use per_address::{AddressHold, PerAddress};
pub use rate::{Rate, RateLimiter, parse_rate};

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::RETRY_AFTER;

/// Who an upstream request is charged to (SPEC 12): its token scope, or its client's address
/// when it carries no token. Travels explicitly from the handler to the limiter
/// ([`crate::upstream::SendOptions`]); built by [`crate::upstream::ClientInfo::charge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub token: Option<crate::auth::Scope>,
    pub addr: IpAddr,
}

impl Charge {
    /// The scope this request's fair share and rate are counted in: its token once the
    /// upstream has accepted that token, else its client address, so random tokens cannot
    /// escape the cap or the rate limit.
    pub fn key(&self, accepted: &AcceptedTokens) -> Key {
        match self.token {
            Some(t) if accepted.contains(t) => Key::Token(t),
            _ => Key::Addr(address_key(self.addr)),
        }
    }
}

/// What one client address counts against wherever clients are told apart by address (fair
/// shares, rate limits, webhook and tunnel slots): the address, or its /64 for IPv6 (one
/// host's usual allocation: a client choosing among 2^64 addresses is still one client),
/// IPv4-mapped addresses as IPv4.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(octets.into())
        }
        v4 => v4,
    }
}

/// Reads `Retry-After` as delta-seconds or an HTTP date; absurd values are capped at one hour.
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(v).ok()?;
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    };
    Some(d.min(Duration::from_secs(3600)))
}

/// Whole seconds a client should wait, at least 1 (SPEC §6: `Retry-After` is client latency).
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_told_apart_by_ipv4_address_and_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let key = |token, addr| Charge { token, addr }.key(&AcceptedTokens::default());
        // One /64: one key, however the host picks its interface identifier.
        assert_eq!(
            key(None, ip("2001:db8:1:2::1")),
            key(None, ip("2001:db8:1:2:ffff:1234:5678:9abc"))
        );
        assert_eq!(
            key(None, ip("2001:db8:1:2::1")),
            Key::Addr(ip("2001:db8:1:2::"))
        );
        // Another /64, another key; IPv4 keeps the whole address, mapped or not.
        assert_ne!(
            key(None, ip("2001:db8:1:2::1")),
            key(None, ip("2001:db8:1:3::1"))
        );
        assert_ne!(key(None, ip("192.0.2.1")), key(None, ip("192.0.2.2")));
        assert_eq!(
            key(None, ip("::ffff:192.0.2.1")),
            Key::Addr(ip("192.0.2.1"))
        );
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_retry_after(&h), None);
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, "999999".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(3600)));
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        h.insert(RETRY_AFTER, soon.parse().unwrap());
        let d = parse_retry_after(&h).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1200)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(5)), 5);
    }
}
