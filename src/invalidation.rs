//! Invalidation (SPEC §7): generation counters, and the Chatwoot webhook's verification and
//! event mapping.
//!
//! A write must invalidate "every entry of (a, c), all scopes" before its response reaches the
//! client, in O(1): scanning the store per write would make writes cost O(entries). So every
//! stored entry carries a *stamp* taken when its upstream fetch started, and lookups compare it
//! with the current one. A stamp is the sum of four monotonic counters (global, account stripe,
//! conversation stripe, token-scope stripe); because counters only grow, the sum is unchanged
//! exactly when none of them moved. Counters are striped (fixed arrays indexed by a hash), so
//! memory stays bounded whatever ids clients send; two ids sharing a stripe only ever cause an
//! extra miss, never a stale hit. Taking the stamp *before* the fetch means a write racing a
//! fetch also kills what that fetch stores.

use std::sync::atomic::{AtomicU64, Ordering};

use ring::hmac;

use crate::auth::Scope;

const CONVERSATION_STRIPES: usize = 1 << 16;
const ACCOUNT_STRIPES: usize = 1 << 12;
const SCOPE_STRIPES: usize = 1 << 12;

/// The generation counters.
pub struct Generations {
    global: AtomicU64,
    accounts: Box<[AtomicU64]>,
    conversations: Box<[AtomicU64]>,
    scopes: Box<[AtomicU64]>,
}

fn counters(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// A 64-bit mix (splitmix64 finaliser) so sequential ids spread over stripes.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Default for Generations {
    fn default() -> Self {
        Self::new()
    }
}

impl Generations {
    pub fn new() -> Self {
        Generations {
            global: AtomicU64::new(0),
            accounts: counters(ACCOUNT_STRIPES),
            conversations: counters(CONVERSATION_STRIPES),
            scopes: counters(SCOPE_STRIPES),
        }
    }

    fn account_slot(&self, account: u64) -> &AtomicU64 {
        &self.accounts[mix(account) as usize % ACCOUNT_STRIPES]
    }

    fn conversation_slot(&self, account: u64, conversation: u64) -> &AtomicU64 {
        let h = mix(account ^ mix(conversation));
        &self.conversations[h as usize % CONVERSATION_STRIPES]
    }

    fn scope_slot(&self, scope: Scope) -> &AtomicU64 {
        let h = mix(scope.0 as u64 ^ (scope.0 >> 64) as u64);
        &self.scopes[h as usize % SCOPE_STRIPES]
    }

    /// The current stamp for a key; equal stamps mean "nothing invalidated in between".
    pub fn stamp(&self, account: u64, conversation: u64, scope: Scope) -> u64 {
        // Acquire pairs with the Release in the bumps: a reader that sees a bump also sees
        // everything the writer did before it.
        self.global
            .load(Ordering::Acquire)
            .wrapping_add(self.account_slot(account).load(Ordering::Acquire))
            .wrapping_add(
                self.conversation_slot(account, conversation)
                    .load(Ordering::Acquire),
            )
            .wrapping_add(self.scope_slot(scope).load(Ordering::Acquire))
    }

    pub fn bump_conversation(&self, account: u64, conversation: u64) {
        self.conversation_slot(account, conversation)
            .fetch_add(1, Ordering::AcqRel);
    }

    pub fn bump_account(&self, account: u64) {
        self.account_slot(account).fetch_add(1, Ordering::AcqRel);
    }

    pub fn bump_scope(&self, scope: Scope) {
        self.scope_slot(scope).fetch_add(1, Ordering::AcqRel);
    }

    pub fn bump_all(&self) {
        self.global.fetch_add(1, Ordering::AcqRel);
    }
}

/// What a webhook event invalidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookTarget {
    Conversation(u64),
    Account,
    Nothing,
}

/// Why a webhook was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("missing or invalid signature")]
    BadSignature,
    #[error("timestamp missing, invalid or older than 5 minutes")]
    StaleTimestamp,
    #[error("body is not a Chatwoot webhook payload: {0}")]
    BadPayload(String),
}

/// How far a signed timestamp may be from now.
pub const WEBHOOK_MAX_SKEW_SECS: u64 = 300;

/// Checks a Chatwoot ≥ 4.11 signature: `sha256=<hex HMAC-SHA256(secret, "{ts}.{body}")>`,
/// with the timestamp within 5 minutes of `now_unix`. Constant-time.
pub fn verify_signature(
    secret: &str,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_unix: u64,
) -> Result<(), WebhookError> {
    let ts = timestamp.ok_or(WebhookError::StaleTimestamp)?.trim();
    let ts_num: u64 = ts.parse().map_err(|_| WebhookError::StaleTimestamp)?;
    if now_unix.abs_diff(ts_num) > WEBHOOK_MAX_SKEW_SECS {
        return Err(WebhookError::StaleTimestamp);
    }
    let sig = signature
        .and_then(|s| s.trim().strip_prefix("sha256="))
        .and_then(decode_hex)
        .ok_or(WebhookError::BadSignature)?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut msg = Vec::with_capacity(ts.len() + 1 + body.len());
    msg.extend_from_slice(ts.as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(body);
    hmac::verify(&key, &msg, &sig).map_err(|_| WebhookError::BadSignature)
}

/// Constant-time comparison for the legacy `?secret=` form and the admin bearer token.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    // Comparing HMACs of both sides under a throwaway key hides length and content timing.
    let key = hmac::Key::new(hmac::HMAC_SHA256, b"chatwoot-cache secret comparison");
    let ta = hmac::sign(&key, a);
    hmac::verify(&key, b, ta.as_ref()).is_ok()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// Maps a webhook payload to what it invalidates (SPEC §7.3): `conversation_created`,
/// `conversation_updated` and `conversation_status_changed` → the payload's `id` (the display
/// id); `message_created` and `message_updated` → `conversation.id`; `contact_updated` → the
/// whole account. Every other event (typing, inbox, contact_created, webwidget, and events
/// newer Chatwoot versions add) invalidates nothing: Chatwoot logs any non-2xx answer as a
/// failed delivery, so an event this proxy does not act on is still acknowledged.
///
/// A named event whose conversation id is missing or unusable invalidates the whole account
/// rather than nothing: serving a possibly changed conversation until its TTL is the worse
/// mistake. Only a body that is not a Chatwoot event at all (not JSON, no `event`) is refused.
pub fn webhook_target(body: &[u8]) -> Result<WebhookTarget, WebhookError> {
    #[derive(serde::Deserialize)]
    struct Payload {
        event: Option<String>,
        id: Option<serde_json::Value>,
        conversation: Option<serde_json::Value>,
    }
    let p: Payload =
        serde_json::from_slice(body).map_err(|e| WebhookError::BadPayload(e.to_string()))?;
    let event = p
        .event
        .ok_or_else(|| WebhookError::BadPayload("no `event` field".into()))?;
    let id_of = |v: Option<&serde_json::Value>| {
        v.and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
        .filter(|&n| (1..=i64::MAX as u64).contains(&n))
        .map_or(WebhookTarget::Account, WebhookTarget::Conversation)
    };
    Ok(match event.as_str() {
        "conversation_created" | "conversation_updated" | "conversation_status_changed" => {
            id_of(p.id.as_ref())
        }
        "message_created" | "message_updated" => {
            id_of(p.conversation.as_ref().and_then(|c| c.get("id")))
        }
        "contact_updated" => WebhookTarget::Account,
        _ => WebhookTarget::Nothing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(n: u128) -> Scope {
        Scope(n)
    }

    #[test]
    fn stamps_move_only_for_what_was_bumped() {
        let g = Generations::new();
        let s = g.stamp(1, 2, scope(7));
        let other = g.stamp(1, 3, scope(7));
        g.bump_conversation(1, 2);
        assert_ne!(g.stamp(1, 2, scope(7)), s);
        assert_ne!(g.stamp(1, 2, scope(8)), s, "all scopes");
        // (1,3) only moves if it shares a stripe with (1,2), which these ids do not.
        assert_eq!(g.stamp(1, 3, scope(7)), other);
        let s = g.stamp(1, 3, scope(7));
        g.bump_account(1);
        assert_ne!(g.stamp(1, 3, scope(7)), s);
        let s = g.stamp(5, 5, scope(9));
        g.bump_scope(scope(9));
        assert_ne!(g.stamp(5, 5, scope(9)), s);
        let s = g.stamp(5, 5, scope(9));
        g.bump_all();
        assert_ne!(g.stamp(5, 5, scope(9)), s);
    }

    #[test]
    fn signature() {
        let secret = "s3cr3t-webhook";
        let body = br#"{"event":"conversation_updated","id":5}"#;
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let tag = hmac::sign(
            &key,
            b"1700000000.{\"event\":\"conversation_updated\",\"id\":5}",
        );
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let sig = format!("sha256={hex}");
        assert_eq!(
            verify_signature(secret, Some("1700000000"), Some(&sig), body, 1700000100),
            Ok(())
        );
        assert_eq!(
            verify_signature(secret, Some("1700000000"), Some(&sig), body, 1700000301),
            Err(WebhookError::StaleTimestamp)
        );
        assert_eq!(
            verify_signature(secret, Some("1700000000"), Some(&sig), b"{}", 1700000000),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature("other", Some("1700000000"), Some(&sig), body, 1700000000),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature(secret, None, Some(&sig), body, 1700000000),
            Err(WebhookError::StaleTimestamp)
        );
        assert_eq!(
            verify_signature(
                secret,
                Some("1700000000"),
                Some("sha256=zz"),
                body,
                1700000000
            ),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn events_map_to_targets() {
        assert_eq!(
            webhook_target(br#"{"event":"conversation_status_changed","id":42}"#),
            Ok(WebhookTarget::Conversation(42))
        );
        assert_eq!(
            webhook_target(br#"{"event":"message_created","id":900,"conversation":{"id":42}}"#),
            Ok(WebhookTarget::Conversation(42))
        );
        assert_eq!(
            webhook_target(br#"{"event":"contact_updated","id":3}"#),
            Ok(WebhookTarget::Account)
        );
        assert_eq!(
            webhook_target(br#"{"event":"inbox_created","id":3}"#),
            Ok(WebhookTarget::Nothing)
        );
        // Typing events carry the conversation under `conversation`, no top-level id.
        for typing in ["conversation_typing_on", "conversation_typing_off"] {
            let body = format!(r#"{{"event":"{typing}","conversation":{{"id":42}}}}"#);
            assert_eq!(
                webhook_target(body.as_bytes()),
                Ok(WebhookTarget::Nothing),
                "{typing}"
            );
        }
        // Events this version does not know are acknowledged too.
        assert_eq!(
            webhook_target(br#"{"event":"conversation_something_new","id":42}"#),
            Ok(WebhookTarget::Nothing)
        );
        // A named event without a usable conversation id: the account, not nothing.
        for body in [
            &br#"{"event":"message_created","id":900}"#[..],
            br#"{"event":"message_updated","id":900,"conversation":{"id":"x"}}"#,
            br#"{"event":"conversation_updated"}"#,
            br#"{"event":"conversation_created","id":0}"#,
            br#"{"event":"conversation_status_changed","id":-4}"#,
            br#"{"event":"conversation_updated","id":9223372036854775808}"#,
        ] {
            assert_eq!(
                webhook_target(body),
                Ok(WebhookTarget::Account),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            webhook_target(br#"{"event":"conversation_updated","id":"42"}"#),
            Ok(WebhookTarget::Conversation(42))
        );
        assert!(webhook_target(b"garbage").is_err());
        assert!(webhook_target(br#"{"id":42}"#).is_err());
    }

    #[test]
    fn constant_time_equality() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"abcd"));
    }
}
