//! The shared tier's value encoding: compact, versioned, and authenticated.
//!
//! A value is `CWC2` (magic and format version), a 32-byte HMAC-SHA256 tag, then the payload:
//! the four generations the fetch began under, the original fetch time (Unix ms, for `Age` and
//! freshness on every replica), the key it belongs to, then the entry as L1 keeps it (SPEC 14):
//! the body's coding, identity length and digest, `updated_at`, the upstream headers (common
//! names and values as one-byte codes) and the stored body, gzip when it compressed. A replica
//! rebuilds the entry without decompressing, hashing or parsing the body
//! ([`crate::cache::rules::from_image`]).
//!
//! The tag covers the Redis key and the payload, under a key derived from `--scope-secret`: a
//! value that was not written by a replica holding the secret, or that was copied under another
//! key, is a miss. Lengths are checked before anything is allocated; nothing in a value can panic
//! the decoder (Redis is trusted to be available, not to be right). `CWC1` values (identity
//! bodies, before SPEC 14) are a miss, overwritten by the next store.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use ring::hmac;

use crate::auth::Scope;
use crate::cache::CacheKey;
use crate::cache::coding::Coding;
use crate::cache::head::COMMON_VALUES;
use crate::cache::rules::SharedImage;

const MAGIC: &[u8; 4] = b"CWC2";
const TAG_LEN: usize = 32;
/// Fixed part of the payload: 4 generations, fetch time, account, conversation, scope, coding,
/// identity length, digest.
const FIXED: usize = 4 * 8 + 8 + 8 + 8 + 16 + 1 + 4 + 16;

/// Room for everything in a value besides the body: the fixed part, the key, `updated_at` and
/// the upstream headers (whose total hyper caps far below this).
const VALUE_OVERHEAD: u64 = 1 << 20;

/// The longest value a replica stores for bodies of at most `max_body` bytes (a gzip body is
/// kept only when it is smaller than the identity one).
pub fn max_value_len(max_body: u64) -> u64 {
    max_body.saturating_add(VALUE_OVERHEAD)
}

/// Header names sent as a one-byte code (index + 1; 0: the name follows). Part of the format:
/// append only.
const NAMES: [&str; 16] = [
    "content-type",
    "cache-control",
    "date",
    "vary",
    "x-frame-options",
    "x-xss-protection",
    "x-content-type-options",
    "x-download-options",
    "x-permitted-cross-domain-policies",
    "referrer-policy",
    "x-request-id",
    "x-runtime",
    "etag",
    "last-modified",
    "expires",
    "link",
];

/// The generation counters of one key in Redis, in key order: global, account, conversation,
/// scope. `None`: the counter does not exist (nothing stored under it can be valid).
pub type Gens = [Option<u64>; 4];

/// A decoded shared value.
#[derive(Debug)]
pub struct SharedValue {
    /// The generations the value's fetch began under.
    pub gens: [u64; 4],
    /// When the upstream answered (Unix milliseconds).
    pub fetched_unix_ms: u64,
    /// The entry as stored.
    pub image: SharedImage,
}

/// Why a value is not usable (each is a miss; the value is overwritten by the next store).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a value of this format version")]
    Format,
    #[error("integrity check failed")]
    Integrity,
    #[error("value of another key")]
    OtherKey,
    #[error("truncated or malformed")]
    Malformed,
    #[error("body larger than --max-object-bytes")]
    TooLarge,
}

/// Encodes and checks values under the key derived from `--scope-secret`.
pub struct Codec {
    key: hmac::Key,
}

impl Codec {
    pub fn new(scope_secret: &[u8]) -> Codec {
        // A key of its own (not the scope key itself), so the two uses never mix.
        let derive = hmac::Key::new(hmac::HMAC_SHA256, scope_secret);
        let derived = hmac::sign(&derive, b"chatwoot-cache shared value hmac v1");
        Codec {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    fn tag(&self, redis_key: &[u8], payload: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&(redis_key.len() as u64).to_be_bytes());
        ctx.update(redis_key);
        ctx.update(payload);
        ctx.sign()
    }

    /// Encodes a value stored under `redis_key` for `key`.
    pub fn encode(
        &self,
        redis_key: &[u8],
        key: &CacheKey,
        value: &SharedValue,
    ) -> Result<Vec<u8>, DecodeError> {
        let image = &value.image;
        let header_bytes: usize = image
            .headers
            .iter()
            .map(|(n, v)| 6 + n.as_str().len() + v.len())
            .sum();
        let mut payload = BytesMut::with_capacity(
            FIXED + 2 + image.updated_at.len() + 2 + header_bytes + 4 + image.stored.len(),
        );
        for g in value.gens {
            payload.put_u64(g);
        }
        payload.put_u64(value.fetched_unix_ms);
        payload.put_u64(key.account);
        payload.put_u64(key.conversation);
        payload.put_u128(key.scope.0);
        payload.put_u8(match image.coding {
            Coding::Identity => 0,
            Coding::Gzip => 1,
        });
        payload.put_u32(image.identity_len);
        payload.put_slice(&image.digest);
        put_field(&mut payload, &image.updated_at)?;
        let count = u16::try_from(image.headers.len()).map_err(|_| DecodeError::TooLarge)?;
        payload.put_u16(count);
        for (name, v) in &image.headers {
            match NAMES.iter().position(|n| *n == name.as_str()) {
                Some(i) => payload.put_u8(i as u8 + 1),
                None => {
                    payload.put_u8(0);
                    put_field(&mut payload, name.as_str().as_bytes())?;
                }
            }
            match COMMON_VALUES.iter().position(|c| c == v) {
                Some(i) => payload.put_u8(i as u8 + 1),
                None => {
                    payload.put_u8(0);
                    put_field(&mut payload, v.as_bytes())?;
                }
            }
        }
        let body_len = u32::try_from(image.stored.len()).map_err(|_| DecodeError::TooLarge)?;
        payload.put_u32(body_len);
        payload.put_slice(&image.stored);
        let tag = self.tag(redis_key, &payload);
        let mut out = Vec::with_capacity(MAGIC.len() + TAG_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(tag.as_ref());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decodes a value read under `redis_key`, which must belong to `key` and carry a body of
    /// at most `max_body` bytes (identity).
    pub fn decode(
        &self,
        redis_key: &[u8],
        key: &CacheKey,
        raw: Bytes,
        max_body: u64,
    ) -> Result<SharedValue, DecodeError> {
        if raw.len() < MAGIC.len() + TAG_LEN || &raw[..MAGIC.len()] != MAGIC {
            return Err(DecodeError::Format);
        }
        let tag = &raw[MAGIC.len()..MAGIC.len() + TAG_LEN];
        let mut payload = raw.slice(MAGIC.len() + TAG_LEN..);
        // Over the payload in place (no copy of a value that may be large); compared without
        // an early exit.
        let expected = self.tag(redis_key, &payload);
        let diff = expected
            .as_ref()
            .iter()
            .zip(tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(DecodeError::Integrity);
        }
        if payload.remaining() < FIXED {
            return Err(DecodeError::Malformed);
        }
        let mut gens = [0u64; 4];
        for g in &mut gens {
            *g = payload.get_u64();
        }
        let fetched_unix_ms = payload.get_u64();
        let stored_for = CacheKey {
            account: payload.get_u64(),
            conversation: payload.get_u64(),
            scope: Scope(payload.get_u128()),
        };
        if stored_for != *key {
            return Err(DecodeError::OtherKey);
        }
        let coding = match payload.get_u8() {
            0 => Coding::Identity,
            1 => Coding::Gzip,
            _ => return Err(DecodeError::Malformed),
        };
        let identity_len = payload.get_u32();
        if u64::from(identity_len) > max_body {
            return Err(DecodeError::TooLarge);
        }
        let mut digest = [0u8; 16];
        payload.copy_to_slice(&mut digest);
        let updated_at = take(&mut payload)?;
        if payload.remaining() < 2 {
            return Err(DecodeError::Malformed);
        }
        let count = payload.get_u16();
        let mut headers = HeaderMap::with_capacity(usize::from(count).min(64));
        for _ in 0..count {
            let name = match code(&mut payload)? {
                0 => HeaderName::from_bytes(&take(&mut payload)?)
                    .map_err(|_| DecodeError::Malformed)?,
                i => HeaderName::from_static(NAMES.get(i - 1).ok_or(DecodeError::Malformed)?),
            };
            let value = match code(&mut payload)? {
                0 => HeaderValue::from_maybe_shared(take(&mut payload)?)
                    .map_err(|_| DecodeError::Malformed)?,
                i => COMMON_VALUES
                    .get(i - 1)
                    .ok_or(DecodeError::Malformed)?
                    .clone(),
            };
            headers.append(name, value);
        }
        if payload.remaining() < 4 {
            return Err(DecodeError::Malformed);
        }
        let body_len = payload.get_u32() as usize;
        let consistent = match coding {
            Coding::Identity => body_len == identity_len as usize,
            Coding::Gzip => body_len < identity_len as usize,
        };
        if payload.remaining() != body_len || !consistent {
            return Err(DecodeError::Malformed);
        }
        Ok(SharedValue {
            gens,
            fetched_unix_ms,
            image: SharedImage {
                headers,
                stored: payload,
                coding,
                identity_len,
                digest,
                updated_at,
            },
        })
    }
}

fn put_field(payload: &mut BytesMut, bytes: &[u8]) -> Result<(), DecodeError> {
    let len = u16::try_from(bytes.len()).map_err(|_| DecodeError::TooLarge)?;
    payload.put_u16(len);
    payload.put_slice(bytes);
    Ok(())
}

fn code(buf: &mut Bytes) -> Result<usize, DecodeError> {
    if buf.remaining() < 1 {
        return Err(DecodeError::Malformed);
    }
    Ok(usize::from(buf.get_u8()))
}

/// A `u16`-length-prefixed field.
fn take(buf: &mut Bytes) -> Result<Bytes, DecodeError> {
    if buf.remaining() < 2 {
        return Err(DecodeError::Malformed);
    }
    let len = usize::from(buf.get_u16());
    if buf.remaining() < len {
        return Err(DecodeError::Malformed);
    }
    Ok(buf.split_to(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: CacheKey = CacheKey {
        account: 1,
        conversation: 42,
        scope: Scope(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
    };
    const REDIS_KEY: &[u8] = b"chatwoot-cache:v:1:42:0123456789abcdef0123456789abcdef";

    fn value() -> SharedValue {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("vary", HeaderValue::from_static("Origin"));
        headers.append("vary", HeaderValue::from_static("Accept-Encoding"));
        headers.insert("etag", HeaderValue::from_static("W/\"abc\""));
        let body = br#"{"id":42,"pad":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#;
        SharedValue {
            gens: [1, 2, 3, u64::MAX],
            fetched_unix_ms: 1_765_182_000_123,
            image: SharedImage {
                headers,
                stored: crate::cache::coding::gzip(body).expect("compressible"),
                coding: Coding::Gzip,
                identity_len: body.len() as u32,
                digest: [9; 16],
                updated_at: Bytes::from_static(b"1765182000.482917"),
            },
        }
    }

    fn codec() -> Codec {
        Codec::new(&[7u8; 32])
    }

    #[test]
    fn round_trip() {
        let raw = codec().encode(REDIS_KEY, &KEY, &value()).unwrap();
        let back = codec()
            .decode(REDIS_KEY, &KEY, Bytes::from(raw), 1 << 20)
            .unwrap();
        let want = value();
        assert_eq!(back.gens, want.gens);
        assert_eq!(back.fetched_unix_ms, want.fetched_unix_ms);
        assert_eq!(back.image, want.image);
    }

    #[test]
    fn forged_moved_truncated_and_garbage_values_are_refused() {
        let c = codec();
        let raw = c.encode(REDIS_KEY, &KEY, &value()).unwrap();
        let decode = |raw: &[u8], redis_key: &[u8], key: &CacheKey| {
            c.decode(redis_key, key, Bytes::copy_from_slice(raw), 1 << 20)
                .map(|_| ())
        };
        assert_eq!(decode(&raw, REDIS_KEY, &KEY), Ok(()));
        // Another secret.
        let other = Codec::new(&[8u8; 32]);
        let forged = other.encode(REDIS_KEY, &KEY, &value()).unwrap();
        assert_eq!(
            decode(&forged, REDIS_KEY, &KEY),
            Err(DecodeError::Integrity)
        );
        // Copied under another key: the tag covers the key.
        assert_eq!(
            decode(&raw, b"chatwoot-cache:v:1:43:00", &KEY),
            Err(DecodeError::Integrity)
        );
        // Signed for another key (a replica's bug): refused after the tag.
        let other_key = CacheKey {
            conversation: 43,
            ..KEY
        };
        assert_eq!(
            decode(&raw, REDIS_KEY, &other_key),
            Err(DecodeError::OtherKey)
        );
        // Every single-byte change after the magic fails the tag.
        for i in [4, 20, 36, 40, raw.len() - 1] {
            let mut bad = raw.clone();
            bad[i] ^= 1;
            assert_eq!(decode(&bad, REDIS_KEY, &KEY), Err(DecodeError::Integrity));
        }
        for cut in [0, 3, 4, 35, 36, 50, raw.len() - 1] {
            assert!(
                decode(&raw[..cut], REDIS_KEY, &KEY).is_err(),
                "cut at {cut}"
            );
        }
        assert_eq!(
            decode(b"garbage", REDIS_KEY, &KEY),
            Err(DecodeError::Format)
        );
        assert_eq!(
            c.decode(REDIS_KEY, &KEY, Bytes::from(raw), 4).map(|_| ()),
            Err(DecodeError::TooLarge)
        );
    }

    /// A well-signed payload whose lengths lie is refused without panicking or over-reading.
    #[test]
    fn lying_lengths_are_malformed() {
        let c = codec();
        let mut payload = BytesMut::new();
        for g in [1u64, 2, 3, 4] {
            payload.put_u64(g);
        }
        payload.put_u64(0);
        payload.put_u64(KEY.account);
        payload.put_u64(KEY.conversation);
        payload.put_u128(KEY.scope.0);
        payload.put_u8(1);
        payload.put_u32(100);
        payload.put_slice(&[0; 16]);
        payload.put_u16(60000);
        payload.put_slice(b"x");
        let tag = c.tag(REDIS_KEY, &payload);
        let mut raw = MAGIC.to_vec();
        raw.extend_from_slice(tag.as_ref());
        raw.extend_from_slice(&payload);
        assert_eq!(
            c.decode(REDIS_KEY, &KEY, Bytes::from(raw), 1 << 20)
                .map(|_| ()),
            Err(DecodeError::Malformed)
        );
    }
}
