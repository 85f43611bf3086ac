//! Admission of Chatwoot webhook deliveries on the admin listener (SPEC 7.3): what is checked
//! before the body is read, the body cap, the concurrency cap and the replay window.
//!
//! Whoever can reach Chatwoot's webhook target can reach this endpoint, so a delivery has to
//! prove itself as early and as cheaply as it can: the signature headers (or the opt-in query
//! secret), a fresh timestamp and a secret for the account are checked from the request head
//! alone; a body declared larger than [`MAX_BODY_BYTES`] is refused unread, and no body is read
//! past it. The head proves nothing about the sender (any 64 hex digits pass it), so what a head
//! can hold is bounded too: at most [`MAX_CONCURRENT`] deliveries are handled at once, at most
//! [`MAX_PER_PEER`] of them from one peer address, and a body gets [`BODY_DEADLINE`] to arrive.
//! The signature itself (an HMAC over the body) is verified once the body is in
//! ([`crate::invalidation::verify_signature`]).
//!
//! A verified delivery is remembered for the replay window by its MAC (the decoded bytes, so
//! every hex spelling of one signature is one delivery) and its `X-Chatwoot-Delivery` id, per
//! account. Chatwoot signs the timestamp and the body, not the delivery id, so a replay under a
//! fresh id is caught by the MAC, and only a fresh MAC (which takes the secret to make) may add
//! a delivery id: replays cannot flush the memory. See [`ReplayMemory`] for its bound.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::invalidation::{self, WEBHOOK_MAX_SKEW_SECS, WebhookError};

/// Largest webhook body accepted. Chatwoot's payloads are a few KB; a conversation event with a
/// long last message stays well under this.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Deliveries handled at once. Chatwoot sends from Sidekiq (default concurrency 10 per process,
/// a few processes), each delivery is small and handled in microseconds once its body is in, so
/// 32 leaves room for bursts while bounding the memory of bodies in flight to 8 MiB.
pub const MAX_CONCURRENT: usize = 32;

/// Deliveries one peer address (an IPv6 /64) may have in hand at once: a quarter of the slots,
/// so one host cannot take them all. A Chatwoot behind one address (or an ingress in front of
/// the admin listener) is handled 8 at a time, each in microseconds once its body is in.
pub const MAX_PER_PEER: usize = MAX_CONCURRENT / 4;

/// How long a delivery waits for its slots before a `503`. Short: Chatwoot gives up on a
/// delivery after 5 s (`WEBHOOK_TIMEOUT`).
pub const SLOT_WAIT: Duration = Duration::from_secs(1);

/// How long a body may take once the head is in (at most `--client-header-timeout`). Chatwoot
/// sends the body right behind the head; a head whose body does not follow holds a slot, so
/// this bounds how long a slot can be held without the secret.
pub const BODY_DEADLINE: Duration = Duration::from_secs(5);

/// The body deadline for a `--client-header-timeout` of `client_header_timeout`.
pub fn body_deadline(client_header_timeout: Duration) -> Duration {
    BODY_DEADLINE.min(client_header_timeout)
}

/// Keys (MACs and delivery ids) the replay memory holds, all accounts together: about 150
/// bytes each, so at most ~15 MiB. At two keys per delivery this holds the 10-minute window of
/// 80 deliveries a second.
const REMEMBERED: usize = 100_000;

/// How a delivery authenticates, decided from its head.
#[derive(Debug, PartialEq, Eq)]
pub enum Proof {
    /// `?secret=` matched (only with `--webhook-allow-query-secret`).
    QuerySecret,
    /// Signature headers present and well-formed, timestamp fresh: the HMAC is checked once the
    /// body is in.
    Signed {
        timestamp: String,
        signature: String,
        /// The MAC the signature spells, decoded: what the replay memory keys on.
        mac: [u8; 32],
    },
}

impl Proof {
    fn mac(&self) -> Option<&[u8; 32]> {
        match self {
            Proof::Signed { mac, .. } => Some(mac),
            Proof::QuerySecret => None,
        }
    }
}

/// Why a delivery is refused before it is acted on.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Unverified(#[from] WebhookError),
    #[error(
        "a secret in the URL is not accepted (--webhook-allow-query-secret is off): sign deliveries"
    )]
    QuerySecretOff,
    #[error("webhook body larger than 256 KiB")]
    TooLarge,
    #[error("webhook body unreadable")]
    Unreadable,
    #[error("webhook body not received in time")]
    Timeout,
    #[error("too many webhook deliveries at once")]
    Busy,
}

impl Refused {
    pub fn status(&self) -> StatusCode {
        match self {
            Refused::Unverified(WebhookError::BadPayload(_)) => StatusCode::BAD_REQUEST,
            Refused::Unverified(_) | Refused::QuerySecretOff => StatusCode::UNAUTHORIZED,
            Refused::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refused::Unreadable => StatusCode::BAD_REQUEST,
            Refused::Timeout => StatusCode::REQUEST_TIMEOUT,
            Refused::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Checks what can be checked from the head: the query secret when allowed, otherwise the
/// signature headers' presence and form, the timestamp's freshness and that the account has a
/// secret to verify them with (`has_secret`). `matches_query_secret` says whether a `?secret=`
/// value is one of the account's secrets.
pub fn check_head(
    headers: &HeaderMap,
    query: Option<&str>,
    matches_query_secret: impl FnOnce(&[u8]) -> bool,
    has_secret: bool,
    allow_query_secret: bool,
    now_unix: u64,
) -> Result<Proof, Refused> {
    let query_secret = query.and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("secret="))
            .map(crate::routing::percent_decode)
    });
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let timestamp = header("x-chatwoot-timestamp");
    let signature = header("x-chatwoot-signature");
    if let Some(presented) = &query_secret {
        if allow_query_secret {
            return if matches_query_secret(presented.as_bytes()) {
                Ok(Proof::QuerySecret)
            } else {
                Err(WebhookError::BadSignature.into())
            };
        }
        if signature.is_none() {
            return Err(Refused::QuerySecretOff);
        }
    }
    invalidation::check_timestamp(timestamp, now_unix)?;
    let (signature, mac) = signature
        .map(str::trim)
        .and_then(|s| Some((s, decode_signature(s)?)))
        .ok_or(WebhookError::BadSignature)?;
    // Nothing could verify it: no reason to wait for its body.
    if !has_secret {
        return Err(WebhookError::BadSignature.into());
    }
    Ok(Proof::Signed {
        timestamp: timestamp.unwrap_or_default().trim().to_owned(),
        signature: signature.to_owned(),
        mac,
    })
}

/// The MAC of `sha256=` and 64 hex digits (either case).
fn decode_signature(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256=")?;
    invalidation::decode_hex(hex)?.try_into().ok()
}

/// Whether the declared `Content-Length` is over the cap (a chunked body is cut off while read).
pub fn declared_too_large(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
}

/// Reads the body, never past [`MAX_BODY_BYTES`], within `deadline` (the head deadline is off
/// while a request is in flight, so a trickling body must not hold the slot for long; see
/// [`body_deadline`]).
pub async fn read_body(body: Incoming, deadline: Duration) -> Result<Bytes, Refused> {
    let collect = Limited::new(body, MAX_BODY_BYTES).collect();
    match tokio::time::timeout(deadline, collect).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Refused::TooLarge),
        Ok(Err(_)) => Err(Refused::Unreadable),
        Err(_) => Err(Refused::Timeout),
    }
}

/// The webhook's shared state: handling slots, per peer and in all, and the replay memory.
pub struct WebhookGate {
    slots: Arc<Semaphore>,
    peers: Arc<Mutex<HashMap<IpAddr, Arc<Semaphore>>>>,
    seen: Mutex<ReplayMemory>,
}

impl Default for WebhookGate {
    fn default() -> Self {
        Self::new()
    }
}

/// A delivery's handling slots (its peer's and the global one), released on drop.
pub struct Slot {
    _global: OwnedSemaphorePermit,
    _peer: PeerHold,
}

/// A claim on one peer's slot counter: keeps the counter in the map while waiting or holding,
/// and removes it once nobody does, so the map holds only peers with deliveries in hand.
struct PeerHold {
    key: IpAddr,
    permit: Option<OwnedSemaphorePermit>,
    counter: Option<Arc<Semaphore>>,
    peers: Arc<Mutex<HashMap<IpAddr, Arc<Semaphore>>>>,
}

impl Drop for PeerHold {
    fn drop(&mut self) {
        // Every clone of a counter is made under this lock, so a count of one (the map's) means
        // nobody waits on it or holds it.
        let mut peers = lock(&self.peers);
        self.permit.take();
        self.counter.take();
        if peers
            .get(&self.key)
            .is_some_and(|c| Arc::strong_count(c) == 1)
        {
            peers.remove(&self.key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data stays consistent if a holder panicked (every update is complete or not made).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl WebhookGate {
    pub fn new() -> Self {
        // A delivery's timestamp may be up to the skew ahead of now, and is accepted until the
        // skew after it: remembered for both.
        let window = Duration::from_secs(2 * WEBHOOK_MAX_SKEW_SECS);
        WebhookGate {
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            peers: Arc::default(),
            seen: Mutex::new(ReplayMemory::new(REMEMBERED, window)),
        }
    }

    /// A handling slot for a delivery from `peer`, or `None` when the peer's or all slots stay
    /// taken for [`SLOT_WAIT`].
    pub async fn enter(&self, peer: IpAddr) -> Option<Slot> {
        let deadline = tokio::time::Instant::now() + SLOT_WAIT;
        let key = crate::protect::address_key(peer);
        let counter = lock(&self.peers)
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_PER_PEER)))
            .clone();
        let mut hold = PeerHold {
            key,
            permit: None,
            counter: Some(counter.clone()),
            peers: self.peers.clone(),
        };
        // The peer's own slot first: a peer at its cap waits without taking a global slot.
        let permit = tokio::time::timeout_at(deadline, counter.acquire_owned())
            .await
            .ok()?
            .ok()?;
        hold.permit = Some(permit);
        let global = tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        Some(Slot {
            _global: global,
            _peer: hold,
        })
    }

    /// Handling slots taken now (tests, diagnostics).
    pub fn slots_in_use(&self) -> usize {
        MAX_CONCURRENT - self.slots.available_permits()
    }

    /// Records a verified delivery to `account`; false when its MAC or delivery id was seen
    /// within the window (acknowledged, not acted on again).
    pub fn first_time(&self, account: u64, proof: &Proof, delivery: Option<&str>) -> bool {
        let mut seen = lock(&self.seen);
        let now = Instant::now();
        seen.expire(now);
        if let Some(mac) = proof.mac()
            && !seen.insert(account, replay_key(b's', mac), now)
        {
            return false;
        }
        delivery.is_none_or(|d| seen.insert(account, replay_key(b'd', d.as_bytes()), now))
    }
}

/// 128 bits of SHA-256 over a kind byte and the value, so MACs and delivery ids never collide.
fn replay_key(kind: u8, value: &[u8]) -> u128 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&[kind]);
    ctx.update(value);
    let digest = ctx.finish();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest.as_ref()[..16]);
    u128::from_be_bytes(key)
}

/// Keys seen within the window, per account, at most `capacity` in all.
///
/// One account's deliveries must not push another's out (whoever holds one account's secret
/// could otherwise replay another account's deliveries after flooding the memory with its own).
/// When the memory is full, the account holding the most keys gives up its oldest: an account
/// keeps every key of its window as long as it holds no more than `capacity / accounts holding
/// keys`. Memory: `capacity` keys plus one small record per account holding keys.
struct ReplayMemory {
    capacity: usize,
    window: Duration,
    accounts: HashMap<u64, AccountKeys>,
    /// (keys held, account), to find the largest account.
    by_size: BTreeSet<(usize, u64)>,
    /// Every insertion in order (so in expiry order); entries evicted since are skipped.
    order: VecDeque<(Instant, u64, u128)>,
    total: usize,
}

#[derive(Default)]
struct AccountKeys {
    /// Key → when it was inserted.
    keys: HashMap<u128, Instant>,
    /// The account's keys, oldest first.
    order: VecDeque<(Instant, u128)>,
}

impl ReplayMemory {
    fn new(capacity: usize, window: Duration) -> Self {
        ReplayMemory {
            capacity: capacity.max(1),
            window,
            accounts: HashMap::new(),
            by_size: BTreeSet::new(),
            order: VecDeque::new(),
            total: 0,
        }
    }

    /// Forgets keys older than the window.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, account, key)) = self.order.front() {
            if now.saturating_duration_since(at) < self.window {
                break;
            }
            self.order.pop_front();
            let Some(keys) = self.accounts.get_mut(&account) else {
                continue;
            };
            // Still the account's oldest key (not evicted, nor evicted and seen again since).
            if keys.order.front() == Some(&(at, key)) {
                self.pop_oldest(account);
            }
        }
    }

    /// Remembers `key` for `account`; false when it is already remembered.
    fn insert(&mut self, account: u64, key: u128, now: Instant) -> bool {
        if self
            .accounts
            .get(&account)
            .is_some_and(|k| k.keys.contains_key(&key))
        {
            return false;
        }
        while self.total >= self.capacity {
            let Some(&(most, largest)) = self.by_size.last() else {
                break;
            };
            // Among the largest, the account inserting gives up its own key first.
            let own = self.accounts.get(&account).map_or(0, |k| k.keys.len());
            self.pop_oldest(if own == most { account } else { largest });
        }
        let keys = self.accounts.entry(account).or_default();
        let before = keys.keys.len();
        keys.keys.insert(key, now);
        keys.order.push_back((now, key));
        self.by_size.remove(&(before, account));
        self.by_size.insert((before + 1, account));
        self.order.push_back((now, account, key));
        self.total += 1;
        self.compact();
        true
    }

    /// Evictions leave stale records in `order`: dropped before it outgrows the memory.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.capacity {
            let accounts = &self.accounts;
            self.order.retain(|(at, account, key)| {
                accounts
                    .get(account)
                    .is_some_and(|k| k.keys.get(key) == Some(at))
            });
        }
    }

    /// Drops `account`'s oldest key.
    fn pop_oldest(&mut self, account: u64) {
        let Some(keys) = self.accounts.get_mut(&account) else {
            return;
        };
        let before = keys.keys.len();
        let Some((_, key)) = keys.order.pop_front() else {
            return;
        };
        keys.keys.remove(&key);
        self.total -= 1;
        self.by_size.remove(&(before, account));
        if before > 1 {
            self.by_size.insert((before - 1, account));
        } else {
            self.accounts.remove(&account);
        }
    }

    #[cfg(test)]
    fn held(&self, account: u64) -> usize {
        self.accounts.get(&account).map_or(0, |k| k.keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const SECRET: &str = "s3cr3t";

    fn is_secret(presented: &[u8]) -> bool {
        presented == SECRET.as_bytes()
    }
    const SIG: &str = "sha256=00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn signed_headers(ts: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-chatwoot-timestamp", HeaderValue::from_str(ts).unwrap());
        h.insert("x-chatwoot-signature", HeaderValue::from_str(sig).unwrap());
        h
    }

    #[test]
    fn the_head_is_checked_alone() {
        let now = 1_700_000_000;
        let ok = check_head(
            &signed_headers("1700000000", SIG),
            None,
            is_secret,
            true,
            false,
            now,
        );
        assert!(matches!(ok, Ok(Proof::Signed { .. })));
        for (ts, sig) in [
            ("1699999000", SIG),
            ("soon", SIG),
            ("1700000000", "sha256=00"),
            ("1700000000", "sha1=0011"),
            ("1700000000", &SIG.replace('0', "g")),
        ] {
            let r = check_head(&signed_headers(ts, sig), None, is_secret, true, false, now);
            assert_eq!(
                r.unwrap_err().status(),
                StatusCode::UNAUTHORIZED,
                "{ts} {sig}"
            );
        }
        let none = check_head(&HeaderMap::new(), None, is_secret, true, false, now);
        assert_eq!(none.unwrap_err().status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn the_query_secret_is_opt_in() {
        let now = 1_700_000_000;
        let q = Some("secret=s3cr3t");
        let off = check_head(&HeaderMap::new(), q, is_secret, true, false, now);
        assert!(matches!(off, Err(Refused::QuerySecretOff)));
        let on = check_head(&HeaderMap::new(), q, is_secret, true, true, now);
        assert_eq!(on.unwrap(), Proof::QuerySecret);
        let wrong = check_head(
            &HeaderMap::new(),
            Some("secret=nope"),
            is_secret,
            true,
            true,
            now,
        );
        assert_eq!(wrong.unwrap_err().status(), StatusCode::UNAUTHORIZED);
        // Off, a signed delivery is judged by its signature whatever its URL says.
        let signed = check_head(
            &signed_headers("1700000000", SIG),
            q,
            is_secret,
            true,
            false,
            now,
        );
        assert!(matches!(signed, Ok(Proof::Signed { .. })));
    }

    #[test]
    fn declared_lengths() {
        let mut h = HeaderMap::new();
        assert!(!declared_too_large(&h));
        h.insert("content-length", HeaderValue::from(MAX_BODY_BYTES));
        assert!(!declared_too_large(&h));
        h.insert("content-length", HeaderValue::from(MAX_BODY_BYTES + 1));
        assert!(declared_too_large(&h));
    }

    #[test]
    fn an_account_without_a_secret_is_refused_from_its_head() {
        let now = 1_700_000_000;
        let r = check_head(
            &signed_headers("1700000000", SIG),
            None,
            is_secret,
            false,
            false,
            now,
        );
        assert_eq!(r.unwrap_err().status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn the_mac_is_decoded_whatever_the_case() {
        let now = 1_700_000_000;
        let mac = |sig: &str| match check_head(
            &signed_headers("1700000000", sig),
            None,
            is_secret,
            true,
            false,
            now,
        ) {
            Ok(Proof::Signed { mac, .. }) => mac,
            other => panic!("{other:?}"),
        };
        let lower = mac(SIG);
        assert_eq!(lower[..4], [0x00, 0x11, 0x22, 0x33]);
        assert_eq!(
            mac(&SIG.to_ascii_uppercase().replace("SHA256=", "sha256=")),
            lower
        );
        assert_eq!(mac(&format!("  {SIG} ")), lower);
    }

    fn signed(mac: u8) -> Proof {
        Proof::Signed {
            timestamp: "1".into(),
            signature: String::new(),
            mac: [mac; 32],
        }
    }

    #[test]
    fn deliveries_are_acted_on_once() {
        let gate = WebhookGate::new();
        assert!(gate.first_time(1, &signed(1), Some("d1")));
        // The same delivery again, and the same signed body under a fresh delivery id.
        assert!(!gate.first_time(1, &signed(1), Some("d1")));
        assert!(!gate.first_time(1, &signed(1), Some("d2")));
        // A retry: a new timestamp (so MAC), the same delivery id.
        assert!(!gate.first_time(1, &signed(2), Some("d1")));
        // The replay under d2 did not record d2.
        assert!(gate.first_time(1, &signed(3), Some("d2")));
        // Without a delivery id, the MAC alone decides.
        assert!(gate.first_time(1, &signed(4), None));
        assert!(!gate.first_time(1, &signed(4), None));
        // Query-secret deliveries carry no signature: the delivery id decides, if any.
        assert!(gate.first_time(1, &Proof::QuerySecret, Some("q1")));
        assert!(!gate.first_time(1, &Proof::QuerySecret, Some("q1")));
        assert!(gate.first_time(1, &Proof::QuerySecret, None));
        // Another account's memory is its own.
        assert!(gate.first_time(2, &signed(1), Some("d1")));
    }

    #[test]
    fn one_account_cannot_push_another_out_of_the_replay_memory() {
        let window = Duration::from_secs(600);
        let mut mem = ReplayMemory::new(100, window);
        let t0 = Instant::now();
        for k in 0..30 {
            assert!(mem.insert(1, k, t0));
        }
        // Account 2 floods: it only ever takes its own keys once the memory is full.
        for k in 0..10_000 {
            assert!(mem.insert(2, k, t0 + Duration::from_millis(k as u64)));
        }
        assert_eq!(mem.total, 100);
        assert_eq!(mem.held(1), 30);
        assert_eq!(mem.held(2), 70);
        for k in 0..30 {
            assert!(!mem.insert(1, k, t0), "account 1 forgot {k}");
        }
        // Account 1 growing past its fair share takes from the largest only.
        for k in 30..60 {
            assert!(mem.insert(1, k, t0 + Duration::from_secs(1)));
        }
        assert_eq!((mem.held(1), mem.held(2)), (50, 50));
        assert!(mem.accounts.len() <= 2 && mem.order.len() <= 200);
    }

    #[test]
    fn the_replay_memory_forgets_after_the_window() {
        let window = Duration::from_secs(600);
        let mut mem = ReplayMemory::new(10, window);
        let t0 = Instant::now();
        assert!(mem.insert(1, 7, t0));
        assert!(mem.insert(2, 8, t0 + Duration::from_secs(300)));
        mem.expire(t0 + Duration::from_secs(599));
        assert!(!mem.insert(1, 7, t0 + Duration::from_secs(599)));
        mem.expire(t0 + window);
        assert_eq!(mem.held(1), 0);
        assert_eq!(mem.held(2), 1);
        assert!(mem.insert(1, 7, t0 + window));
        mem.expire(t0 + Duration::from_secs(2000));
        assert_eq!(mem.total, 0);
        assert!(mem.accounts.is_empty() && mem.by_size.is_empty() && mem.order.is_empty());
        // Evicted keys' stale records are dropped as the memory turns over.
        for k in 0..1000 {
            mem.insert(3, k, t0 + Duration::from_secs(2000));
        }
        assert_eq!(mem.total, 10);
        assert!(mem.order.len() <= 20, "{}", mem.order.len());
    }

    // Paused time: each refusal's 1 s wait passes at once.
    #[tokio::test(start_paused = true)]
    async fn one_peer_holds_at_most_a_quarter_of_the_slots() {
        let gate = WebhookGate::new();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..MAX_PER_PEER {
            held.push(gate.enter(a).await.expect("a slot"));
        }
        assert!(gate.enter(a).await.is_none());
        // The same host as IPv4-mapped IPv6; and an IPv6 /64 counts as one peer.
        assert!(
            gate.enter("::ffff:192.0.2.1".parse().unwrap())
                .await
                .is_none()
        );
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        for i in 0..MAX_PER_PEER {
            held.push(
                gate.enter(v6(&format!("2001:db8::{i:x}")))
                    .await
                    .expect("v6"),
            );
        }
        assert!(gate.enter(v6("2001:db8::ffff")).await.is_none());
        for p in 2..=3 {
            for _ in 0..MAX_PER_PEER {
                let ip = IpAddr::from([192, 0, 2, p]);
                held.push(gate.enter(ip).await.expect("another peer"));
            }
        }
        assert_eq!(gate.slots_in_use(), MAX_CONCURRENT);
        assert!(gate.enter(IpAddr::from([192, 0, 2, 9])).await.is_none());
        drop(held);
        assert_eq!(gate.slots_in_use(), 0);
        assert!(lock(&gate.peers).is_empty(), "counters of idle peers kept");
        assert!(gate.enter(a).await.is_some());
    }
}
