//! Who the client is, and what the upstream is told about it (SPEC §3): `X-Forwarded-For`,
//! `X-Forwarded-Proto`, `X-Forwarded-Host` and `--trusted-proxies`.
//!
//! Rails takes the left-most untrusted address of `X-Forwarded-For` as the client, and
//! rack-attack safelists `127.0.0.1`: a chain the client wrote itself would let it pick the
//! address Chatwoot throttles (or exempts). So an untrusted peer's forwarding headers are
//! replaced, and a loopback peer (a sidecar's own application) is never written — Chatwoot would
//! read it as its own safelisted address — the header is left out instead. A peer inside
//! `--trusted-proxies` (an ingress in front of a gateway) keeps its headers, and the right-most
//! address of its chain that is not itself a trusted proxy counts as the client.

use std::fmt;
use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Uri};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// One `address/prefix` network (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `fd00::/8`, `192.0.2.7` or `::1`. Host bits must be zero, so a
    /// typo such as `10.1.2.3/8` is caught instead of silently trusting all of `10/8`.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("invalid address {addr:?} in {s:?}"))?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("invalid prefix length in {s:?}"))?,
        };
        let cidr = Cidr { net, prefix };
        if cidr.masked(net) != net {
            return Err(format!("{s:?} has host bits set"));
        }
        Ok(cidr)
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.net.is_ipv4() && self.masked(ip) == self.net
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// `--trusted-proxies`: peers whose forwarding headers are kept. Empty by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Comma-separated CIDRs; an empty string means none.
    pub fn parse(s: &str) -> Result<TrustedProxies, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(Cidr::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Who is on the other end of a client connection, and who counts as the client.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    /// The TCP peer.
    pub peer: IpAddr,
    /// The peer is inside `--trusted-proxies`: its `X-Forwarded-*` headers are kept.
    pub trusted_peer: bool,
    /// The client connection is TLS.
    pub tls: bool,
    /// See [`ClientInfo::client_addr`].
    client: IpAddr,
}

impl ClientInfo {
    /// A connection from `peer` (canonicalised: an IPv4-mapped IPv6 peer is its IPv4 address).
    pub fn new(peer: IpAddr, tls: bool, trusted: &TrustedProxies) -> ClientInfo {
        let peer = peer.to_canonical();
        ClientInfo {
            peer,
            trusted_peer: !trusted.is_empty() && trusted.contains(peer),
            tls,
            client: peer,
        }
    }

    /// This connection's info for one request: behind a trusted peer, the client address is
    /// read from the request's `X-Forwarded-For` (untrusted peers: no work at all).
    pub fn for_request(self, headers: &HeaderMap, trusted: &TrustedProxies) -> ClientInfo {
        if !self.trusted_peer {
            return self;
        }
        ClientInfo {
            client: client_from_chain(self.peer, headers, trusted),
            ..self
        }
    }

    /// The address that counts as the client, for per-address limits and logs (SPEC §3): the
    /// peer, or behind a trusted proxy the right-most address of its `X-Forwarded-For` that is
    /// not itself a trusted proxy (all trusted: the left-most; unreadable: the peer).
    pub fn client_addr(&self) -> IpAddr {
        self.client
    }

    /// Who a request is charged to for fair upstream slots and the rate limit (SPEC 12): its
    /// token scope, or the client address for requests without a token.
    pub fn charge(&self, token: Option<crate::auth::Scope>) -> crate::protect::Charge {
        crate::protect::Charge {
            token,
            addr: self.client_addr(),
        }
    }
}

/// Right to left through a trusted peer's chain, skipping trusted proxies.
fn client_from_chain(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let mut values: Vec<&str> = Vec::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        match v.to_str() {
            Ok(s) => values.push(s),
            Err(_) => return peer,
        }
    }
    let mut client = peer;
    for entry in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let Some(ip) = parse_forwarded_ip(entry) else {
            // Whatever wrote this, it was not a trusted proxy we can read: stop at the last
            // address we could.
            return client;
        };
        client = ip;
        if !trusted.contains(ip) {
            return ip;
        }
    }
    client
}

/// An `X-Forwarded-For` element: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1` or
/// `[2001:db8::1]:4711`.
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return ip.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    }
    let (ip, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The three forwarding headers as the upstream gets them; `None` = header left out.
pub struct Forwarded {
    pub host: Option<HeaderValue>,
    pub proto: HeaderValue,
    pub for_: Option<HeaderValue>,
}

/// Computes what the upstream is told (see the module docs).
pub fn forwarded_values(uri: &Uri, headers: &HeaderMap, client: &ClientInfo) -> Forwarded {
    let own_proto = || HeaderValue::from_static(if client.tls { "https" } else { "http" });
    let own_host = || {
        headers.get(header::HOST).cloned().or_else(|| {
            uri.authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        })
    };
    let peer_written = !client.peer.is_loopback();
    if !client.trusted_peer {
        return Forwarded {
            host: own_host(),
            proto: own_proto(),
            for_: peer_written.then(|| ip_value(client.peer, Vec::new())),
        };
    }
    let mut chain = Vec::with_capacity(64);
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if !chain.is_empty() {
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(v.as_bytes());
    }
    let for_ = match (chain.is_empty(), peer_written) {
        (true, false) => None,
        (false, false) => HeaderValue::from_maybe_shared(Bytes::from(chain)).ok(),
        (empty, true) => {
            if !empty {
                chain.extend_from_slice(b", ");
            }
            Some(ip_value(client.peer, chain))
        }
    };
    Forwarded {
        host: headers.get(&X_FORWARDED_HOST).cloned().or_else(own_host),
        proto: headers
            .get(&X_FORWARDED_PROTO)
            .cloned()
            .unwrap_or_else(own_proto),
        for_,
    }
}

/// `prefix` followed by the textual form of `addr`, as a header value.
fn ip_value(addr: IpAddr, mut prefix: Vec<u8>) -> HeaderValue {
    write_ip(addr, &mut prefix);
    // Digits, dots, colons and the prefix's visible ASCII: always a valid value.
    HeaderValue::from_maybe_shared(Bytes::from(prefix))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Appends the textual form of `addr`. IPv4 by hand: `Display` goes through the formatting
/// machinery, a measurable share of a forwarded request's CPU.
fn write_ip(addr: IpAddr, out: &mut Vec<u8>) {
    match addr {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            // Writing into a Vec cannot fail.
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn fwd(peer: &str, trusted: &str, pairs: &[(&str, &str)]) -> (Forwarded, ClientInfo) {
        let trusted = TrustedProxies::parse(trusted).unwrap();
        let h = headers(pairs);
        let client = ClientInfo::new(ip(peer), false, &trusted).for_request(&h, &trusted);
        let uri: Uri = "/x".parse().unwrap();
        (forwarded_values(&uri, &h, &client), client)
    }

    fn text(v: &Option<HeaderValue>) -> Option<&str> {
        v.as_ref().map(|v| v.to_str().unwrap())
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.200.1.2")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.1.1.1")), "IPv4-mapped");
        assert!(!c.contains(ip("::1")));
        assert!(Cidr::parse("192.0.2.7").unwrap().contains(ip("192.0.2.7")));
        assert!(!Cidr::parse("192.0.2.7").unwrap().contains(ip("192.0.2.8")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains(ip("203.0.113.1"))
        );
        for bad in [
            "10.1.2.3/8",
            "10.0.0.0/33",
            "banana",
            "10.0.0.0/x",
            "/8",
            "fd00::/129",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            TrustedProxies::parse("").unwrap(),
            TrustedProxies::default()
        );
        let t = TrustedProxies::parse(" 10.0.0.0/8, 192.168.0.0/16 ").unwrap();
        assert!(t.contains(ip("192.168.3.4")) && t.contains(ip("10.0.0.1")));
        assert!(TrustedProxies::parse("10.0.0.0/8,nope").is_err());
    }

    #[test]
    fn an_untrusted_peer_replaces_every_forwarding_header() {
        let spoof = [
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "admin.internal"),
            ("host", "dash.example"),
        ];
        let (f, c) = fwd("203.0.113.9", "", &spoof);
        assert_eq!(text(&f.for_), Some("203.0.113.9"));
        assert_eq!(f.proto, "http");
        assert_eq!(text(&f.host), Some("dash.example"));
        assert_eq!(c.client_addr(), ip("203.0.113.9"));
        // A loopback peer (a sidecar's application) is never written: the header is left out.
        let (f, c) = fwd("127.0.0.1", "", &spoof);
        assert_eq!(text(&f.for_), None);
        assert_eq!(c.client_addr(), ip("127.0.0.1"));
        let (f, _) = fwd("::1", "", &spoof);
        assert_eq!(text(&f.for_), None);
        // Even when trusting some other network.
        let (f, _) = fwd("198.51.100.2", "10.0.0.0/8", &spoof);
        assert_eq!(text(&f.for_), Some("198.51.100.2"));
    }

    #[test]
    fn a_trusted_peer_keeps_its_headers_and_names_the_client() {
        let h = [
            ("x-forwarded-for", "127.0.0.1, 203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "dash.example"),
            ("host", "gateway.svc"),
        ];
        let (f, c) = fwd("10.1.2.3", "10.0.0.0/8", &h);
        assert_eq!(text(&f.for_), Some("127.0.0.1, 203.0.113.9, 10.1.2.3"));
        assert_eq!(f.proto, "https");
        assert_eq!(text(&f.host), Some("dash.example"));
        // The right-most untrusted address, not the client-written left-most one.
        assert_eq!(c.client_addr(), ip("203.0.113.9"));
        // A loopback trusted peer (a local ingress) is not appended.
        let (f, c) = fwd("127.0.0.1", "127.0.0.1", &h);
        assert_eq!(text(&f.for_), Some("127.0.0.1, 203.0.113.9"));
        assert_eq!(c.client_addr(), ip("203.0.113.9"));
        // Several trusted hops are skipped; two header lines read as one list.
        let (f, c) = fwd(
            "10.0.0.1",
            "10.0.0.0/8",
            &[
                ("x-forwarded-for", "198.51.100.4"),
                ("x-forwarded-for", "10.9.9.9:4711, 10.0.0.7"),
            ],
        );
        assert_eq!(
            text(&f.for_),
            Some("198.51.100.4, 10.9.9.9:4711, 10.0.0.7, 10.0.0.1")
        );
        assert_eq!(c.client_addr(), ip("198.51.100.4"));
        // No headers of its own: ours are set, as for anyone.
        let (f, c) = fwd("10.0.0.1", "10.0.0.0/8", &[("host", "h")]);
        assert_eq!(text(&f.for_), Some("10.0.0.1"));
        assert_eq!(
            (f.proto.to_str().unwrap(), text(&f.host)),
            ("http", Some("h"))
        );
        assert_eq!(c.client_addr(), ip("10.0.0.1"));
        // Every hop trusted: the left-most; garbage: the last readable address.
        let (_, c) = fwd(
            "10.0.0.1",
            "10.0.0.0/8",
            &[("x-forwarded-for", "10.3.3.3, 10.2.2.2")],
        );
        assert_eq!(c.client_addr(), ip("10.3.3.3"));
        let (_, c) = fwd(
            "10.0.0.1",
            "10.0.0.0/8",
            &[("x-forwarded-for", "evil, 10.2.2.2")],
        );
        assert_eq!(c.client_addr(), ip("10.2.2.2"));
        let (_, c) = fwd(
            "10.0.0.1",
            "10.0.0.0/8",
            &[("x-forwarded-for", "[2001:db8::5]:80")],
        );
        assert_eq!(c.client_addr(), ip("2001:db8::5"));
    }

    #[test]
    fn client_addresses_are_written_like_display() {
        for addr in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.10.100.199",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: IpAddr = addr.parse().unwrap();
            let mut out = Vec::new();
            write_ip(ip, &mut out);
            assert_eq!(out, ip.to_string().as_bytes());
        }
    }
}
