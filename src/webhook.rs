//! Admission of Chatwoot webhook deliveries on the admin listener (SPEC 7.3): what is checked
//! before the body is read, the body cap, the concurrency cap and the replay window.
//!
//! Whoever can reach Chatwoot's webhook target can reach this endpoint, so a delivery has to
//! prove itself as early and as cheaply as it can: the signature headers (or the opt-in query
//! secret) and a fresh timestamp are checked from the request head alone; a body declared larger
//! than [`MAX_BODY_BYTES`] is refused unread, and no body is read past it; at most
//! [`MAX_CONCURRENT`] deliveries are handled at once. The signature itself (an HMAC over the
//! body) is verified once the body is in ([`crate::invalidation::verify_signature`]).
//!
//! A verified delivery is remembered for the replay window by its signature and its
//! `X-Chatwoot-Delivery` id. Chatwoot signs the timestamp and the body, not the delivery id, so
//! a replay under a fresh id is caught by the signature, and only a fresh signature (which takes
//! the secret to make) may add a delivery id: replays cannot flush the memory.

use std::sync::Arc;
use std::time::Duration;

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

/// How long a delivery waits for one of the [`MAX_CONCURRENT`] slots before a `503`. Short:
/// Chatwoot gives up on a delivery after 5 s (`WEBHOOK_TIMEOUT`).
pub const SLOT_WAIT: Duration = Duration::from_secs(1);

/// Signatures and delivery ids remembered (least recently used go first). Only verified
/// deliveries are remembered, so only the secret's holder can fill it; at two keys per delivery
/// this holds the 10-minute window of a Chatwoot sending 80 deliveries a second.
const REMEMBERED: u64 = 100_000;

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
    },
}

impl Proof {
    fn signature(&self) -> Option<&str> {
        match self {
            Proof::Signed { signature, .. } => Some(signature),
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
/// signature headers' presence and form and the timestamp's freshness.
/// `matches_query_secret` says whether a `?secret=` value is one of the account's secrets.
pub fn check_head(
    headers: &HeaderMap,
    query: Option<&str>,
    matches_query_secret: impl FnOnce(&[u8]) -> bool,
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
    let signature = signature
        .map(str::trim)
        .filter(|s| well_formed_signature(s))
        .ok_or(WebhookError::BadSignature)?;
    Ok(Proof::Signed {
        timestamp: timestamp.unwrap_or_default().trim().to_owned(),
        signature: signature.to_owned(),
    })
}

/// `sha256=` and 64 hex digits.
fn well_formed_signature(s: &str) -> bool {
    s.strip_prefix("sha256=")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
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
/// while a request is in flight, so a trickling body must not hold the slot forever).
pub async fn read_body(body: Incoming, deadline: Duration) -> Result<Bytes, Refused> {
    let collect = Limited::new(body, MAX_BODY_BYTES).collect();
    match tokio::time::timeout(deadline, collect).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Refused::TooLarge),
        Ok(Err(_)) => Err(Refused::Unreadable),
        Err(_) => Err(Refused::Timeout),
    }
}

/// The webhook's shared state: handling slots and the replay memory.
pub struct WebhookGate {
    slots: Arc<Semaphore>,
    seen: moka::sync::Cache<u128, ()>,
}

impl Default for WebhookGate {
    fn default() -> Self {
        Self::new()
    }
}

impl WebhookGate {
    pub fn new() -> Self {
        // A delivery's timestamp may be up to the skew ahead of now, and is accepted until the
        // skew after it: remembered for both.
        let window = Duration::from_secs(2 * WEBHOOK_MAX_SKEW_SECS);
        WebhookGate {
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            seen: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED)
                .time_to_live(window)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
        }
    }

    /// A handling slot, or `None` when all are taken for [`SLOT_WAIT`].
    pub async fn enter(&self) -> Option<OwnedSemaphorePermit> {
        tokio::time::timeout(SLOT_WAIT, self.slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Handling slots taken now (tests, diagnostics).
    pub fn slots_in_use(&self) -> usize {
        MAX_CONCURRENT - self.slots.available_permits()
    }

    /// Records a verified delivery; false when its signature or delivery id was seen within
    /// the window (acknowledged, not acted on again).
    pub fn first_time(&self, proof: &Proof, delivery: Option<&str>) -> bool {
        if let Some(signature) = proof.signature()
            && !self.fresh(b's', signature)
        {
            return false;
        }
        delivery.is_none_or(|d| self.fresh(b'd', d))
    }

    fn fresh(&self, kind: u8, value: &str) -> bool {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&[kind]);
        ctx.update(value.as_bytes());
        let digest = ctx.finish();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest.as_ref()[..16]);
        self.seen
            .entry(u128::from_be_bytes(key))
            .or_insert(())
            .is_fresh()
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
            let r = check_head(&signed_headers(ts, sig), None, is_secret, false, now);
            assert_eq!(
                r.unwrap_err().status(),
                StatusCode::UNAUTHORIZED,
                "{ts} {sig}"
            );
        }
        let none = check_head(&HeaderMap::new(), None, is_secret, false, now);
        assert_eq!(none.unwrap_err().status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn the_query_secret_is_opt_in() {
        let now = 1_700_000_000;
        let q = Some("secret=s3cr3t");
        let off = check_head(&HeaderMap::new(), q, is_secret, false, now);
        assert!(matches!(off, Err(Refused::QuerySecretOff)));
        let on = check_head(&HeaderMap::new(), q, is_secret, true, now);
        assert_eq!(on.unwrap(), Proof::QuerySecret);
        let wrong = check_head(&HeaderMap::new(), Some("secret=nope"), is_secret, true, now);
        assert_eq!(wrong.unwrap_err().status(), StatusCode::UNAUTHORIZED);
        // Off, a signed delivery is judged by its signature whatever its URL says.
        let signed = check_head(&signed_headers("1700000000", SIG), q, is_secret, false, now);
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
    fn deliveries_are_acted_on_once() {
        let gate = WebhookGate::new();
        let proof = |sig: &str| Proof::Signed {
            timestamp: "1".into(),
            signature: sig.into(),
        };
        assert!(gate.first_time(&proof("a"), Some("d1")));
        // The same delivery again, and the same signed body under a fresh delivery id.
        assert!(!gate.first_time(&proof("a"), Some("d1")));
        assert!(!gate.first_time(&proof("a"), Some("d2")));
        // A retry: a new timestamp (so signature), the same delivery id.
        assert!(!gate.first_time(&proof("b"), Some("d1")));
        // The replay under d2 did not record d2.
        assert!(gate.first_time(&proof("c"), Some("d2")));
        // Without a delivery id, the signature alone decides.
        assert!(gate.first_time(&proof("e"), None));
        assert!(!gate.first_time(&proof("e"), None));
        // Query-secret deliveries carry no signature: the delivery id decides, if any.
        assert!(gate.first_time(&Proof::QuerySecret, Some("q1")));
        assert!(!gate.first_time(&Proof::QuerySecret, Some("q1")));
        assert!(gate.first_time(&Proof::QuerySecret, None));
    }
}
