//! Invalidation (SPEC §7): what an invalidation names ([`Target`]), who asked for it
//! ([`Source`]), the generation counters that make it O(1), and the Chatwoot webhook's
//! verification and event mapping.
//!
//! Every invalidation goes through one call, [`crate::cache::Store::invalidate`], which bumps
//! the generations and counts `chatwoot_cache_invalidations_total{source}`; write-through,
//! purge, webhook and token refusal all use it (and the shared tier hooks in there).
//!
//! A write must invalidate "every entry of (a, c), all scopes" before its response reaches the
//! client, in O(1): scanning the store per write would make writes cost O(entries). So every
//! stored entry carries a [`Stamp`] taken when its upstream fetch started, and lookups compare it
//! with the current generations. The shared part of a stamp is the sum of three monotonic
//! counters (global, account stripe, conversation stripe); because counters only grow, the sum is
//! unchanged exactly when none of them moved. Those counters are striped (fixed arrays indexed by
//! a hash), so memory stays bounded whatever ids clients send; two ids sharing a stripe only ever
//! cause an extra miss, never a stale hit. Taking the stamp *before* the fetch means a write
//! racing a fetch also kills what that fetch stores.
//!
//! The token scope's generation is *not* striped: a token refused upstream must drop only that
//! token's entries (SPEC 10), and random tokens are free to send, so a striped counter would let
//! a client flush everyone's entries by sending refused tokens until every stripe moved. Instead
//! each scope that has an entry or a fetch in flight has its own counter cell, shared by those
//! entries ([`Stamp`] holds it): a lookup reads it through the entry (one atomic load, as the
//! stripe was), and a refusal bumps the cell of that scope if there is one. A scope with nothing
//! stored has no cell and nothing to drop. The index from scope to cell holds weak references and
//! is swept as it doubles, so its size is bounded by the scopes of stored entries and fetches in
//! flight, whatever clients send.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use ring::hmac;

use crate::auth::Scope;
use crate::cache::CacheKey;
use crate::metrics::InvalidationSource;

const CONVERSATION_STRIPES: usize = 1 << 16;
const ACCOUNT_STRIPES: usize = 1 << 12;
/// The scope index is not swept below this many cells.
const SCOPE_SWEEP_MIN: usize = 1024;

/// What an invalidation drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every scope's entry of one conversation.
    Conversation { account: u64, conversation: u64 },
    /// Every entry of one account.
    Account(u64),
    /// Every entry of one token scope (a token the upstream refused).
    Scope(Scope),
    /// Everything.
    All,
}

impl Target {
    /// Whether `key` is one of the entries this target drops (purge's scan).
    pub fn covers(&self, key: &CacheKey) -> bool {
        match *self {
            Target::Conversation {
                account,
                conversation,
            } => key.account == account && key.conversation == conversation,
            Target::Account(account) => key.account == account,
            Target::Scope(scope) => key.scope == scope,
            Target::All => true,
        }
    }
}

/// Who asked for an invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A 2xx write through the proxy (SPEC 7.1).
    Write,
    /// The admin purge API (SPEC 7.2).
    Purge,
    /// A Chatwoot webhook (SPEC 7.3).
    Webhook,
    /// The upstream answered "Invalid Access Token" (SPEC 4): the token's own entries go.
    TokenRefused,
}

impl Source {
    /// The `invalidations_total{source}` label, if this source has one. SPEC 9 names write,
    /// purge and webhook only: a refused token is not an invalidation event operators count
    /// (`auth_rejections_total{reason="invalid"}` shows refused tokens).
    pub fn metric(self) -> Option<InvalidationSource> {
        match self {
            Source::Write => Some(InvalidationSource::Write),
            Source::Purge => Some(InvalidationSource::Purge),
            Source::Webhook => Some(InvalidationSource::Webhook),
            Source::TokenRefused => None,
        }
    }
}

/// The generations an entry (or a fetch) was started under. Equal to the current ones exactly
/// when nothing that covers its key was invalidated since.
#[derive(Clone)]
pub struct Stamp {
    /// Global + account stripe + conversation stripe.
    shared: u64,
    /// The key's scope counter cell, and its value when the stamp was taken.
    scope: Arc<AtomicU64>,
    scope_at: u64,
}

impl PartialEq for Stamp {
    fn eq(&self, other: &Stamp) -> bool {
        self.shared == other.shared
            && Arc::ptr_eq(&self.scope, &other.scope)
            && self.scope_at == other.scope_at
    }
}

impl Eq for Stamp {}

impl std::fmt::Debug for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stamp({}, scope {})", self.shared, self.scope_at)
    }
}

impl Stamp {
    /// Whether the token scope was invalidated since this stamp was taken.
    fn scope_moved(&self) -> bool {
        self.scope.load(Ordering::Acquire) != self.scope_at
    }
}

/// The generation counters.
pub struct Generations {
    global: AtomicU64,
    accounts: Box<[AtomicU64]>,
    conversations: Box<[AtomicU64]>,
    scopes: ScopeCells,
}

/// Per-scope counter cells, indexed weakly (see the module docs).
struct ScopeCells {
    inner: Mutex<ScopeIndex>,
}

struct ScopeIndex {
    cells: HashMap<Scope, Weak<AtomicU64>>,
    /// Sweep dead cells when the index reaches this size.
    sweep_at: usize,
}

impl ScopeCells {
    fn new() -> Self {
        ScopeCells {
            inner: Mutex::new(ScopeIndex {
                cells: HashMap::new(),
                sweep_at: SCOPE_SWEEP_MIN,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ScopeIndex> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live cell of `scope`, created if it has none.
    fn cell(&self, scope: Scope) -> Arc<AtomicU64> {
        let mut index = self.lock();
        if let Some(cell) = index.cells.get(&scope).and_then(Weak::upgrade) {
            return cell;
        }
        if index.cells.len() >= index.sweep_at {
            index.cells.retain(|_, w| w.strong_count() > 0);
            index.sweep_at = (2 * index.cells.len()).max(SCOPE_SWEEP_MIN);
        }
        let cell = Arc::new(AtomicU64::new(0));
        index.cells.insert(scope, Arc::downgrade(&cell));
        cell
    }

    /// Bumps `scope`'s cell if it has one; returns whether it had (a scope with no stored entry
    /// and no fetch in flight has nothing to drop).
    fn bump(&self, scope: Scope) -> bool {
        let index = self.lock();
        match index.cells.get(&scope).and_then(Weak::upgrade) {
            Some(cell) => {
                cell.fetch_add(1, Ordering::AcqRel);
                true
            }
            None => false,
        }
    }

    /// Cells in the index, dead ones not yet swept included (tests).
    fn indexed(&self) -> usize {
        self.lock().cells.len()
    }
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
            scopes: ScopeCells::new(),
        }
    }

    fn account_slot(&self, account: u64) -> &AtomicU64 {
        &self.accounts[mix(account) as usize % ACCOUNT_STRIPES]
    }

    fn conversation_slot(&self, account: u64, conversation: u64) -> &AtomicU64 {
        let h = mix(account ^ mix(conversation));
        &self.conversations[h as usize % CONVERSATION_STRIPES]
    }

    /// Global + account + conversation: the part of a stamp every scope shares.
    fn shared(&self, account: u64, conversation: u64) -> u64 {
        // Acquire pairs with the Release in the bumps: a reader that sees a bump also sees
        // everything the writer did before it.
        self.global
            .load(Ordering::Acquire)
            .wrapping_add(self.account_slot(account).load(Ordering::Acquire))
            .wrapping_add(
                self.conversation_slot(account, conversation)
                    .load(Ordering::Acquire),
            )
    }

    /// The current stamp for a key (miss path: takes the scope index's lock).
    pub fn stamp(&self, account: u64, conversation: u64, scope: Scope) -> Stamp {
        // The cell first: a refusal between the two reads then moves the cell we hold.
        let cell = self.scopes.cell(scope);
        let scope_at = cell.load(Ordering::Acquire);
        Stamp {
            shared: self.shared(account, conversation),
            scope: cell,
            scope_at,
        }
    }

    /// Whether `stamp`, taken for (account, conversation, its scope), is still current. The hit
    /// path: three array loads and one load through the stamp, no lock.
    pub fn is_current(&self, stamp: &Stamp, account: u64, conversation: u64) -> bool {
        stamp.shared == self.shared(account, conversation) && !stamp.scope_moved()
    }

    pub fn bump_conversation(&self, account: u64, conversation: u64) {
        self.conversation_slot(account, conversation)
            .fetch_add(1, Ordering::AcqRel);
    }

    pub fn bump_account(&self, account: u64) {
        self.account_slot(account).fetch_add(1, Ordering::AcqRel);
    }

    /// Drops every entry of `scope`, exactly; returns whether it had any entry or fetch.
    pub fn bump_scope(&self, scope: Scope) -> bool {
        self.scopes.bump(scope)
    }

    pub fn bump_all(&self) {
        self.global.fetch_add(1, Ordering::AcqRel);
    }

    /// Bumps what `target` names. False only for a scope with nothing stored or in flight.
    pub fn bump(&self, target: Target) -> bool {
        match target {
            Target::Conversation {
                account,
                conversation,
            } => self.bump_conversation(account, conversation),
            Target::Account(account) => self.bump_account(account),
            Target::Scope(scope) => return self.bump_scope(scope),
            Target::All => self.bump_all(),
        }
        true
    }

    /// Scope cells in the index (dead ones not yet swept included): bounded by the scopes of
    /// stored entries and fetches in flight, at most doubled.
    pub fn scope_cells(&self) -> usize {
        self.scopes.indexed()
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
    check_timestamp(timestamp, now_unix)?;
    let ts = timestamp.unwrap_or_default().trim();
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

/// The secrets that verify Chatwoot webhooks, by account (SPEC §7.3, §13).
///
/// Chatwoot generates one secret per webhook, so each account signs with its own: a listed
/// account is verified with its own secrets only (several during a rotation: the new one and
/// the previous one), an account not listed with the fallback `--webhook-secret`. One
/// account's secrets never decide another account's webhooks.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WebhookSecrets {
    accounts: std::collections::BTreeMap<u64, Vec<String>>,
    fallback: Option<String>,
}

impl std::fmt::Debug for WebhookSecrets {
    /// Never prints a secret: only how many accounts are listed and whether a fallback exists.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSecrets")
            .field("accounts", &self.accounts.len())
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl WebhookSecrets {
    /// Per-account secrets (each list non-empty), without a fallback.
    pub fn per_account(accounts: std::collections::BTreeMap<u64, Vec<String>>) -> Self {
        WebhookSecrets {
            accounts,
            fallback: None,
        }
    }

    /// The same, with `fallback` for accounts not listed.
    pub fn with_fallback(mut self, fallback: Option<String>) -> Self {
        self.fallback = fallback;
        self
    }

    /// Whether the webhook is on at all (some secret is configured).
    pub fn is_enabled(&self) -> bool {
        self.fallback.is_some() || !self.accounts.is_empty()
    }

    /// The secrets that may sign webhooks for `account`: its own when listed, else the
    /// fallback (possibly none).
    pub fn for_account(&self, account: u64) -> &[String] {
        match self.accounts.get(&account) {
            Some(own) => own,
            None => self.fallback.as_slice(),
        }
    }

    /// Verifies a signed delivery for `account`: the timestamp first, then the signature
    /// against each of the account's secrets (any one verifies, for rotations).
    pub fn verify(
        &self,
        account: u64,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now_unix: u64,
    ) -> Result<(), WebhookError> {
        let secrets = self.for_account(account);
        let mut result = Err(WebhookError::BadSignature);
        for secret in secrets {
            match verify_signature(secret, timestamp, signature, body, now_unix) {
                Ok(()) => return Ok(()),
                // A stale timestamp is stale for every secret: say so rather than "bad signature".
                Err(WebhookError::StaleTimestamp) => return Err(WebhookError::StaleTimestamp),
                Err(e) => result = Err(e),
            }
        }
        result
    }

    /// Whether `presented` (the legacy `?secret=` value) is one of `account`'s secrets.
    pub fn matches_secret(&self, account: u64, presented: &[u8]) -> bool {
        // Every secret is compared (no early exit), so timing says nothing about which matched.
        self.for_account(account)
            .iter()
            .fold(false, |hit, s| secrets_equal(presented, s.as_bytes()) | hit)
    }
}

/// A timestamp within 5 minutes of `now_unix` (checked from the head, before the body is read).
pub fn check_timestamp(timestamp: Option<&str>, now_unix: u64) -> Result<(), WebhookError> {
    let ts = timestamp.ok_or(WebhookError::StaleTimestamp)?.trim();
    let ts_num: u64 = ts.parse().map_err(|_| WebhookError::StaleTimestamp)?;
    if now_unix.abs_diff(ts_num) > WEBHOOK_MAX_SKEW_SECS {
        return Err(WebhookError::StaleTimestamp);
    }
    Ok(())
}

/// Constant-time comparison for the legacy `?secret=` form and the admin bearer token.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    // Comparing HMACs of both sides under a throwaway key hides length and content timing.
    let key = hmac::Key::new(hmac::HMAC_SHA256, b"chatwoot-cache secret comparison");
    let ta = hmac::sign(&key, a);
    hmac::verify(&key, b, ta.as_ref()).is_ok()
}

pub(crate) fn decode_hex(s: &str) -> Option<Vec<u8>> {
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
        let current = |s: &Stamp, a, c| g.is_current(s, a, c);
        let s = g.stamp(1, 2, scope(7));
        let s8 = g.stamp(1, 2, scope(8));
        let other = g.stamp(1, 3, scope(7));
        assert_eq!(s, g.stamp(1, 2, scope(7)), "same generations, same stamp");
        g.bump_conversation(1, 2);
        assert!(!current(&s, 1, 2));
        assert!(!current(&s8, 1, 2), "all scopes");
        // (1,3) only moves if it shares a stripe with (1,2), which these ids do not.
        assert!(current(&other, 1, 3));
        g.bump_account(1);
        assert!(!current(&other, 1, 3));
        let s9 = g.stamp(5, 5, scope(9));
        let s10 = g.stamp(5, 5, scope(10));
        assert!(g.bump_scope(scope(9)));
        assert!(!current(&s9, 5, 5));
        assert!(current(&s10, 5, 5), "another scope keeps its entries");
        let s10 = g.stamp(5, 5, scope(10));
        g.bump_all();
        assert!(!current(&s10, 5, 5));
    }

    /// A refused token drops exactly its own scope's entries, however many other scopes are
    /// refused: no stripe is shared. Scopes with nothing stored leave no trace.
    #[test]
    fn refused_scopes_drop_only_their_own_entries() {
        let g = Generations::new();
        let held: Vec<Stamp> = (0..50).map(|i| g.stamp(1, i, scope(i as u128))).collect();
        for i in 1000..200_000u128 {
            assert!(!g.bump_scope(scope(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))));
        }
        for (i, s) in held.iter().enumerate() {
            assert!(g.is_current(s, 1, i as u64), "entry {i} was dropped");
        }
        assert_eq!(g.scope_cells(), 50);
        assert!(g.bump_scope(scope(3)));
        assert!(!g.is_current(&held[3], 1, 3));
        assert!(g.is_current(&held[4], 1, 4));
    }

    /// The index never grows past twice the live cells (plus the sweep floor), whatever scopes
    /// come and go.
    #[test]
    fn the_scope_index_is_bounded_by_live_cells() {
        let g = Generations::new();
        let live: Vec<Stamp> = (0..100).map(|i| g.stamp(1, 1, scope(i))).collect();
        for i in 0..100_000u128 {
            drop(g.stamp(1, 1, scope(1_000_000 + i)));
            assert!(g.scope_cells() <= 2 * (SCOPE_SWEEP_MIN + live.len()));
        }
        assert!(live.iter().all(|s| g.is_current(s, 1, 1)));
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
