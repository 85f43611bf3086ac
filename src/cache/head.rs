//! The stored header block of an entry, held compactly (issue 15: at most 768 B per entry
//! beyond the body with Rails' header set; a `HeaderMap` per entry cost ~2 KB on its own).
//!
//! The headers an entry replays split into a [`Shape`] — the names in order, and the values
//! that are the same on every response (Rails' defaults: `Content-Type`, `Cache-Control`,
//! `X-Frame-Options` …) — and the values that change per response (`Date`, `X-Request-Id`,
//! `X-Runtime`, `Last-Modified`, the ETag). Shapes are interned: every entry of one upstream
//! shares one, with its response header maps prebuilt. An entry keeps only its own values, as
//! length-prefixed text in the allocation that holds its body ([`put_values`]).
//!
//! A hit clones the shape's map — what it cloned before was the entry's own map of the same
//! size — and writes the entry's values into the slots that follow the render slots, by
//! position: no name is hashed, nothing is parsed, the values are slices of the entry's buffer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

use super::coding::Coding;

/// Headers every rendered entry carries with a per-request value. Every response map starts
/// with a slot for each (with a placeholder value), in this order, so a hit overwrites the
/// three values by position (`entry::set_render_slots`): no name is hashed, and a clone has
/// no spare capacity, so adding three headers would regrow and rehash the map on every hit.
pub(crate) const RENDER_SLOTS: [(HeaderName, HeaderValue); 3] = [
    (
        HeaderName::from_static("x-cache"),
        HeaderValue::from_static("HIT"),
    ),
    (header::AGE, HeaderValue::from_static("0")),
    (
        HeaderName::from_static("cache-status"),
        HeaderValue::from_static("chatwoot-cache; hit"),
    ),
];

/// Header values Chatwoot (Rails) sends on nearly every response: part of a shape, so an
/// entry stores nothing for them, and cloning one for a hit copies two words instead of
/// touching a reference count that every hit on every worker thread would otherwise write.
/// The order is part of the shared tier's value format (`shared::codec`): append only.
pub(crate) static COMMON_VALUES: [HeaderValue; 16] = [
    HeaderValue::from_static("application/json; charset=utf-8"),
    HeaderValue::from_static("max-age=0, private, must-revalidate"),
    HeaderValue::from_static("nosniff"),
    HeaderValue::from_static("SAMEORIGIN"),
    HeaderValue::from_static("0"),
    HeaderValue::from_static("1; mode=block"),
    HeaderValue::from_static("noopen"),
    HeaderValue::from_static("none"),
    HeaderValue::from_static("strict-origin-when-cross-origin"),
    HeaderValue::from_static("Origin"),
    HeaderValue::from_static("Accept, Origin"),
    HeaderValue::from_static("Accept-Encoding"),
    HeaderValue::from_static("gzip"),
    HeaderValue::from_static("no-cache"),
    HeaderValue::from_static("application/json"),
    HeaderValue::from_static("chunked"),
];

/// Names of common non-standard response headers (Rails' defaults, proxies in front of
/// Chatwoot), shared as statics: a custom name taken from an upstream response would own an
/// allocation of its own. The order is part of the shared tier's value format: append only.
pub(crate) static SHARED_NAMES: [HeaderName; 8] = [
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-runtime"),
    HeaderName::from_static("x-download-options"),
    HeaderName::from_static("x-permitted-cross-domain-policies"),
    HeaderName::from_static("x-ratelimit-limit"),
    HeaderName::from_static("x-ratelimit-remaining"),
    HeaderName::from_static("x-ratelimit-reset"),
    HeaderName::from_static("cf-ray"),
];

/// The common static value equal to `value`, if any.
pub(crate) fn common_value(value: &[u8]) -> Option<&'static HeaderValue> {
    COMMON_VALUES.iter().find(|v| v.as_bytes() == value)
}

/// `name`, as a shared static when it is one of [`SHARED_NAMES`].
pub(crate) fn shared_name(name: &HeaderName) -> HeaderName {
    SHARED_NAMES
        .iter()
        .find(|n| n.as_str() == name.as_str())
        .unwrap_or(name)
        .clone()
}

/// The per-entry text of one entry form, as [`Shape::render`] fills its slots from it: the
/// form's key in the per-thread memo ([`super::memo`]), whether it has an ETag, and where the
/// ETag and the values region are in the entry's buffer, worked out (reading the buffer) only
/// when the memo does not have the form's values.
pub(crate) struct FormText<'a> {
    pub buf: &'a Bytes,
    pub memo_key: u64,
    pub has_etag: bool,
    pub ranges: &'a dyn Fn() -> (Option<std::ops::Range<usize>>, std::ops::Range<usize>),
}

/// A header on its way into an entry: name and value bytes.
pub(crate) type Field<'a> = (HeaderName, std::borrow::Cow<'a, [u8]>);

/// The interned part of a header block: names in order, the static values, and the response
/// maps built from them.
#[derive(Debug)]
pub struct Shape {
    /// The fields in render order (those with a per-entry value first): the value when it is
    /// static, `None` when each entry has its own.
    fields: Box<[(HeaderName, Option<HeaderValue>)]>,
    /// Whether the first per-entry slot is the form's strong ETag (positive entries).
    etag: bool,
    /// The response maps of the identity and the gzip form: the render slots, the per-entry
    /// slots (placeholders), the static fields, and for gzip `Content-Encoding`.
    maps: [HeaderMap; 2],
    /// Per-entry slots, the ETag included.
    slots: usize,
    /// Heap the shape holds, charged to an entry whose shape is not interned.
    pub(crate) weight: usize,
}

/// At most this many shapes are interned (a few per upstream in practice: one per header set
/// Chatwoot sends); past it, an entry gets a shape of its own, charged to its weight, so an
/// upstream varying its header names cannot grow memory outside `--cache-max-bytes`. Bounded,
/// the interned shapes hold at most ~2 MB.
const MAX_SHAPES: usize = 512;

type ShapeKey = (bool, Vec<(HeaderName, Option<HeaderValue>)>);

fn shapes() -> &'static Mutex<HashMap<ShapeKey, Arc<Shape>>> {
    static SHAPES: OnceLock<Mutex<HashMap<ShapeKey, Arc<Shape>>>> = OnceLock::new();
    SHAPES.get_or_init(Default::default)
}

/// A built header block: its shape, whether the shape is shared (interned) and the per-entry
/// values in slot order (the ETag not included).
pub(crate) struct Block<'a> {
    pub shape: Arc<Shape>,
    pub interned: bool,
    pub values: Vec<&'a [u8]>,
}

/// Splits `fields` into a shape (interned when possible) and the per-entry values. A name with
/// any value that is not common keeps all its values per entry (the map keeps every value of a
/// name together, so its slots must be contiguous).
pub(crate) fn block<'a>(fields: &'a [Field<'_>], etag: bool) -> Block<'a> {
    // Each value's common static, looked up once; the names in order of first appearance,
    // with whether any of their values is per-entry.
    let common: Vec<Option<&'static HeaderValue>> =
        fields.iter().map(|(_, v)| common_value(v)).collect();
    let mut names: Vec<(&HeaderName, bool)> = Vec::with_capacity(fields.len());
    for ((name, _), common) in fields.iter().zip(&common) {
        match names.iter_mut().find(|(n, _)| *n == name) {
            Some((_, per_entry)) => *per_entry |= common.is_none(),
            None => names.push((name, common.is_none())),
        }
    }
    let mut key_fields = Vec::with_capacity(fields.len());
    let mut values = Vec::new();
    // Per-entry names first (their slots follow the ETag's), then the static ones.
    for pass in [true, false] {
        for (name, _) in names.iter().filter(|(_, per_entry)| *per_entry == pass) {
            for ((n, v), common) in fields.iter().zip(&common) {
                if n != *name {
                    continue;
                }
                if pass {
                    key_fields.push((n.clone(), None));
                    values.push(v.as_ref());
                } else {
                    key_fields.push((n.clone(), common.cloned()));
                }
            }
        }
    }
    let key: ShapeKey = (etag, key_fields);
    if let Some(shape) = recent_shape(&key) {
        return Block {
            shape,
            interned: true,
            values,
        };
    }
    let mut table = shapes().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(shape) = table.get(&key) {
        let shape = shape.clone();
        drop(table);
        remember_shape(key, &shape);
        return Block {
            shape,
            interned: true,
            values,
        };
    }
    let shape = Arc::new(Shape::new(&key.1, etag));
    let interned = table.len() < MAX_SHAPES;
    if interned {
        table.insert(key.clone(), shape.clone());
        drop(table);
        remember_shape(key, &shape);
    }
    Block {
        shape,
        interned,
        values,
    }
}

/// How many interned shapes each thread remembers ([`recent_shape`]).
const RECENT_SHAPES: usize = 4;

thread_local! {
    /// The interned shapes this thread used last, most recent first: an upstream sends one or
    /// a few header sets, so nearly every entry finds its shape here by comparing the key,
    /// without hashing it (SipHash over every name and static value) under the global
    /// table's lock, which every worker's stored miss took.
    static RECENT: std::cell::RefCell<Vec<(ShapeKey, Arc<Shape>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The interned shape for `key` if this thread used it recently.
fn recent_shape(key: &ShapeKey) -> Option<Arc<Shape>> {
    RECENT.with_borrow_mut(|recent| {
        let i = recent.iter().position(|(k, _)| k == key)?;
        recent[..=i].rotate_right(1);
        Some(recent[0].1.clone())
    })
}

/// Notes an interned shape as this thread's most recent one.
fn remember_shape(key: ShapeKey, shape: &Arc<Shape>) {
    RECENT.with_borrow_mut(|recent| {
        if recent.len() == RECENT_SHAPES {
            recent.pop();
        }
        recent.insert(0, (key, shape.clone()));
    });
}

impl Shape {
    fn new(fields: &[(HeaderName, Option<HeaderValue>)], etag: bool) -> Shape {
        let slots = usize::from(etag) + fields.iter().filter(|(_, v)| v.is_none()).count();
        let map = |coding: Coding| {
            let mut map = HeaderMap::with_capacity(RENDER_SLOTS.len() + fields.len() + 2);
            for (name, placeholder) in RENDER_SLOTS {
                map.append(name, placeholder);
            }
            if etag {
                map.append(header::ETAG, HeaderValue::from_static("\"\""));
            }
            for (name, value) in fields {
                let value = value.clone().unwrap_or(HeaderValue::from_static(""));
                map.append(name.clone(), value);
            }
            if coding == Coding::Gzip {
                map.append(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            // `with_capacity` rounds up to spare slots; a clone has exactly `len()`.
            map.clone()
        };
        let maps = [map(Coding::Identity), map(Coding::Gzip)];
        let weight = fields
            .iter()
            .map(|(n, v)| n.as_str().len() + v.as_ref().map_or(0, HeaderValue::len) + 40)
            .sum::<usize>()
            + maps
                .iter()
                .map(|m| super::entry::header_map_bytes(m.len()))
                .sum::<usize>()
            + size_of::<Shape>();
        Shape {
            fields: fields.into(),
            etag,
            maps,
            slots,
            weight,
        }
    }

    /// The response map of `coding`'s form with its slots filled: the form's ETag (when the
    /// shape has one), then each value of its values region (what [`put_values`] wrote), in
    /// order, made by this thread's [`super::memo`]. The render
    /// slots get `render`'s values where given, their placeholders otherwise
    /// (`entry::set_render_slots` fills them later).
    pub(crate) fn render(
        &self,
        coding: Coding,
        text: FormText<'_>,
        render: [Option<HeaderValue>; 3],
    ) -> HeaderMap {
        let mut map = self.maps[coding as usize].clone();
        let mut slots = map.iter_mut().map(|(_, v)| v);
        for value in render {
            if let (Some(slot), Some(value)) = (slots.next(), value) {
                *slot = value;
            }
        }
        let mut per_entry = self.slots;
        if self.etag && !text.has_etag {
            // No ETag for a shape with its slot: the placeholder stays.
            slots.next();
            per_entry -= 1;
        }
        // Never past the per-entry slots: a region with a value too many must not overwrite
        // the first static field.
        super::memo::fill(&text, self.etag, slots.take(per_entry));
        map
    }

    /// The fields with this entry's `values` (the ETag not included), in render order.
    pub(crate) fn fields<'a>(&'a self, values: &'a [u8]) -> Vec<Field<'a>> {
        let mut at = 0;
        self.fields
            .iter()
            .map(|(name, value)| {
                let bytes = match value {
                    Some(v) => v.as_bytes(),
                    None => next_value(values, &mut at).map_or(&[][..], |r| &values[r]),
                };
                (name.clone(), std::borrow::Cow::Borrowed(bytes))
            })
            .collect()
    }
}

/// Appends `values` to `out`, each prefixed with its length (LEB128).
pub(crate) fn put_values<'v>(out: &mut Vec<u8>, values: impl IntoIterator<Item = &'v [u8]>) {
    for v in values {
        put_len(out, v.len());
        out.extend_from_slice(v);
    }
}

/// Bytes [`put_values`] writes for `values`.
pub(crate) fn values_len<'v>(values: impl IntoIterator<Item = &'v [u8]>) -> usize {
    values.into_iter().map(|v| len_len(v.len()) + v.len()).sum()
}

pub(crate) fn put_len(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn len_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// The range of the next length-prefixed value in `buf` from `*at`, advancing `*at`.
pub(crate) fn next_value(buf: &[u8], at: &mut usize) -> Option<std::ops::Range<usize>> {
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = *buf.get(*at)?;
        *at += 1;
        len |= usize::from(b & 0x7f) << shift;
        if b < 0x80 {
            break;
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
    let range = *at..at.checked_add(len)?;
    if range.end > buf.len() {
        return None;
    }
    *at = range.end;
    Some(range)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn fields(pairs: &[(&'static str, &'static str)]) -> Vec<Field<'static>> {
        pairs
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), Cow::Borrowed(v.as_bytes())))
            .collect()
    }

    #[test]
    fn values_round_trip() {
        let long = vec![b'a'; 300];
        let mut out = vec![];
        put_values(&mut out, [&b"x"[..], b"", &long]);
        assert_eq!(out.len(), values_len([&b"x"[..], b"", &long]));
        let mut at = 0;
        assert_eq!(&out[next_value(&out, &mut at).unwrap()], b"x");
        assert_eq!(&out[next_value(&out, &mut at).unwrap()], b"");
        assert_eq!(&out[next_value(&out, &mut at).unwrap()], &long[..]);
        assert_eq!(next_value(&out, &mut at), None);
        // A length running past the end is refused, not read.
        assert_eq!(next_value(&[5, b'a'], &mut 0), None);
        assert_eq!(next_value(&[0xff; 8], &mut 0), None);
    }

    /// The per-thread recent shapes answer with the interned shape of exactly that key: more
    /// header sets than it holds, revisited, on this thread and another, with and without
    /// the ETag slot, and with a static value changed.
    #[test]
    fn recent_shapes_are_the_interned_ones() {
        let sets: Vec<Vec<Field<'static>>> = (0..RECENT_SHAPES + 2)
            .map(|i| {
                let mut f = fields(&[("content-type", "application/json"), ("x-request-id", "r")]);
                let name = HeaderName::from_bytes(format!("x-recent-shape-{i}").as_bytes());
                f.push((name.unwrap(), Cow::Borrowed(&b"nosniff"[..])));
                f
            })
            .collect();
        let first: Vec<Arc<Shape>> = sets.iter().map(|f| block(f, true).shape).collect();
        for _ in 0..2 {
            for (f, shape) in sets.iter().zip(&first).rev() {
                assert!(Arc::ptr_eq(&block(f, true).shape, shape));
                assert!(
                    !Arc::ptr_eq(&block(f, false).shape, shape),
                    "ETag slot differs"
                );
            }
        }
        let other = std::thread::spawn({
            let sets = sets.clone();
            move || {
                sets.iter()
                    .map(|f| block(f, true).shape)
                    .collect::<Vec<_>>()
            }
        })
        .join()
        .unwrap();
        assert!(other.iter().zip(&first).all(|(a, b)| Arc::ptr_eq(a, b)));
        let mut changed = sets[0].clone();
        changed[0].1 = Cow::Borrowed(&b"application/json; charset=utf-8"[..]);
        let changed = block(&changed, true);
        assert!(
            !Arc::ptr_eq(&changed.shape, &first[0]),
            "another static value"
        );
        assert!(changed.shape.fields.iter().any(|(_, v)| {
            v.as_ref()
                .is_some_and(|v| v.as_bytes() == b"application/json; charset=utf-8")
        }));
    }

    #[test]
    fn shapes_are_shared_and_render_in_order() {
        let a = fields(&[
            ("content-type", "application/json; charset=utf-8"),
            ("x-request-id", "one"),
            ("vary", "Origin"),
            ("x-custom", "k"),
            ("vary", "Accept-Encoding"),
        ]);
        let b = fields(&[
            ("content-type", "application/json; charset=utf-8"),
            ("x-request-id", "two"),
            ("vary", "Origin"),
            ("x-custom", "other"),
            ("vary", "Accept-Encoding"),
        ]);
        let (ba, bb) = (block(&a, true), block(&b, true));
        assert!(Arc::ptr_eq(&ba.shape, &bb.shape), "same names and statics");
        assert!(ba.interned);
        assert_eq!(ba.values, [&b"one"[..], b"k"]);
        let mut buf = b"\"e-gz\"".to_vec();
        put_values(&mut buf, ba.values.iter().copied());
        let buf = Bytes::from(buf);
        let map = ba.shape.render(
            Coding::Gzip,
            FormText {
                buf: &buf,
                memo_key: super::super::entry::unused_memo_key(),
                has_etag: true,
                ranges: &|| (Some(0..6), 6..buf.len()),
            },
            [None, Some(HeaderValue::from_static("5")), None],
        );
        let got: Vec<(&str, &str)> = map
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("x-cache", "HIT"),
                ("age", "5"),
                ("cache-status", "chatwoot-cache; hit"),
                ("etag", "\"e-gz\""),
                ("x-request-id", "one"),
                ("x-custom", "k"),
                ("content-type", "application/json; charset=utf-8"),
                ("vary", "Origin"),
                ("vary", "Accept-Encoding"),
                ("content-encoding", "gzip"),
            ]
        );
        let back: Vec<(String, Vec<u8>)> = ba
            .shape
            .fields(&buf[6..])
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.into_owned()))
            .collect();
        assert_eq!(back.len(), 5);
        assert_eq!(back[0], ("x-request-id".into(), b"one".to_vec()));
        assert_eq!(back[4], ("vary".into(), b"Accept-Encoding".to_vec()));

        // Without its ETag, a region holding a value too many fills the per-entry slots only:
        // the static fields after them stay as they are.
        let mut extra = vec![];
        put_values(&mut extra, [&b"one"[..], b"k", b"intruder"]);
        let extra = Bytes::from(extra);
        let map = ba.shape.render(
            Coding::Gzip,
            FormText {
                buf: &extra,
                memo_key: super::super::entry::unused_memo_key(),
                has_etag: false,
                ranges: &|| (None, 0..extra.len()),
            },
            [None, None, None],
        );
        assert_eq!(map["content-type"], "application/json; charset=utf-8");
        assert_eq!(map["x-request-id"], "one");
        assert_eq!(map["x-custom"], "k");
        assert!(map.iter().all(|(_, v)| v != "intruder"), "{map:?}");

        // A per-entry value among a name's statics makes all of that name's values per entry.
        let c = fields(&[("vary", "Origin"), ("vary", "X-Thing")]);
        let bc = block(&c, false);
        assert_eq!(bc.values, [&b"Origin"[..], b"X-Thing"]);
    }
}
