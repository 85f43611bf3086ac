//! A per-thread memo of the header values hits render from entries' own text.
//!
//! An entry keeps its per-entry header values (its ETag, `Date`, `X-Request-Id`, `X-Runtime`,
//! `Last-Modified`) as text in its one buffer ([`super::head`]): a ready `HeaderValue` per value
//! would cost 40 B each in every entry, more than the 768 B per-entry bound leaves (issue 15).
//! But making a `HeaderValue` of text means `http` checks every byte (this crate forbids the
//! `unsafe` unchecked constructor): ~650 instructions per hit for Rails' ~140 B.
//!
//! The memo keeps, per thread, the values of entry forms that thread renders again, under the
//! form's key: the entry's serial, a number no other entry of the process has, and which form
//! it is (`entry::Form`). An entry never changes once made, so a line holds exactly what its
//! form's text gives, and a hit whose values come from the memo reads none of the entry's text
//! (its values region and ETag lie apart from everything else a hit reads, in memory the last
//! hit on this entry left cold). The values are the line's own, made of its own copy of the
//! text, so a line pins no entry buffer.
//!
//! Bounded and lazy: [`SETS`] x [`WAYS`] lines per thread, each of at most [`MAX_TEXT`] bytes and
//! [`MAX_VALUES`] values (full with Rails' header set, ~240 KB per worker thread; a fixed cost
//! outside `--cache-max-bytes`, like the static header tables, not a cost per entry). A line is
//! made the second time a thread renders an entry's form (the first only marks it), so entries
//! rendered once (misses, a cold scan) cost no allocation here.

use std::cell::RefCell;
use std::ops::Range;

use bytes::Bytes;
use http::HeaderValue;

use super::head::{self, FormText};

/// Sets of the per-thread memo (a power of two), and lines per set.
const SETS: usize = 128;
const WAYS: usize = 4;
/// The most text and values a line keeps; an entry with more is rendered without the memo.
const MAX_TEXT: usize = 512;
const MAX_VALUES: usize = 16;

/// The values of one entry form, made once from its text, in render order.
#[derive(Default)]
struct Line {
    /// The form's memo key (0: an empty line; keys start at 4).
    key: u64,
    values: Vec<HeaderValue>,
}

#[derive(Default)]
struct Set {
    lines: [Line; WAYS],
    /// The line to replace next (round robin).
    next: usize,
}

struct Memo {
    /// Per set, the key last rendered without a line: seen twice, it gets one. Thread-local
    /// storage, not heap: a thread that renders each form once allocates nothing here.
    seen: [u64; SETS],
    /// The sets, allocated when the first line is made.
    sets: Vec<Set>,
}

thread_local! {
    static MEMO: RefCell<Memo> = const {
        RefCell::new(Memo {
            seen: [0; SETS],
            sets: Vec::new(),
        })
    };
}

/// Writes the rendered values of an entry form into `slots`, in order: its ETag (when it has
/// one and `keep_etag`), then each value of its length-prefixed values region. From this
/// thread's memo when it has them; made from the text otherwise.
pub(crate) fn fill<'m>(
    text: &FormText<'_>,
    keep_etag: bool,
    mut slots: impl Iterator<Item = &'m mut HeaderValue>,
) {
    let key = text.memo_key;
    let has_etag = text.has_etag && keep_etag;
    // Reads the entry's buffer: only when the memo cannot answer.
    let read = || {
        let (etag, values) = (text.ranges)();
        (etag.filter(|_| keep_etag), values)
    };
    let memoised = MEMO
        .try_with(|memo| {
            let Ok(mut memo) = memo.try_borrow_mut() else {
                return false;
            };
            let memo = &mut *memo;
            let index = set_of(key);
            let found = memo
                .sets
                .get(index)
                .and_then(|set| set.lines.iter().position(|l| l.key == key));
            let at = match found {
                Some(at) => at,
                None => {
                    if memo.seen[index] != key {
                        memo.seen[index] = key;
                        return false;
                    }
                    let (etag, values) = read();
                    // (A positive form whose region holds no ETag cannot be built; rendered
                    // from the text if it ever were, like any form a line cannot hold.)
                    if etag.is_some() != has_etag {
                        return false;
                    }
                    let Some(line) = Line::new(key, text.buf, etag, values) else {
                        return false;
                    };
                    if memo.sets.is_empty() {
                        memo.sets.resize_with(SETS, Set::default);
                    }
                    let set = &mut memo.sets[index];
                    let at = set.next;
                    set.lines[at] = line;
                    set.next = (at + 1) % WAYS;
                    at
                }
            };
            for (slot, value) in slots.by_ref().zip(&memo.sets[index].lines[at].values) {
                *slot = value.clone();
            }
            true
        })
        .unwrap_or(false);
    if !memoised {
        let (etag, values) = read();
        if has_etag && etag.is_none() {
            // Its slot keeps the placeholder, as for any form without an ETag.
            slots.next();
        }
        from_text(text.buf, etag, values, slots);
    }
}

/// The set a key belongs to (Fibonacci hashing).
fn set_of(key: u64) -> usize {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SETS.trailing_zeros())) as usize
}

/// The values made from the text itself: every byte checked by `http`.
fn from_text<'m>(
    buf: &Bytes,
    etag: Option<Range<usize>>,
    values: Range<usize>,
    mut slots: impl Iterator<Item = &'m mut HeaderValue>,
) {
    if let Some(r) = etag {
        let Some(slot) = slots.next() else {
            return;
        };
        // Validated when stored (they were header values), so this cannot fail.
        if let Ok(v) = HeaderValue::from_maybe_shared(buf.slice(r)) {
            *slot = v;
        }
    }
    let region = &buf[..values.end];
    let mut at = values.start;
    for slot in slots {
        let Some(r) = head::next_value(region, &mut at) else {
            break;
        };
        if let Ok(v) = HeaderValue::from_maybe_shared(buf.slice(r)) {
            *slot = v;
        }
    }
}

impl Line {
    /// A line for this text, if it is small enough and every value is one.
    fn new(
        key: u64,
        buf: &Bytes,
        etag: Option<Range<usize>>,
        values: Range<usize>,
    ) -> Option<Line> {
        let has_etag = etag.is_some();
        let etag = etag.map_or(&[][..], |r| &buf[r]);
        let values = &buf[values];
        if etag.len() + values.len() > MAX_TEXT {
            return None;
        }
        let mut text = Vec::with_capacity(etag.len() + values.len());
        text.extend_from_slice(etag);
        text.extend_from_slice(values);
        let text = Bytes::from(text);
        let mut rendered = Vec::new();
        if has_etag {
            rendered.push(HeaderValue::from_maybe_shared(text.slice(..etag.len())).ok()?);
        }
        let mut at = etag.len();
        while at < text.len() {
            let r = head::next_value(&text, &mut at)?;
            if rendered.len() == MAX_VALUES {
                return None;
            }
            rendered.push(HeaderValue::from_maybe_shared(text.slice(r)).ok()?);
        }
        rendered.shrink_to_fit();
        Some(Line {
            key,
            values: rendered,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::cache::entry::unused_memo_key;

    /// An entry buffer, where its ETag is, where its values are.
    type EntryText = (Bytes, Range<usize>, Range<usize>);

    /// An entry form's text as an entry buffer holds it: a body, the ETag, the values.
    fn entry_buf(etag: &str, values: &[&str]) -> EntryText {
        let mut buf = b"{\"id\":1}".to_vec();
        let etag_at = buf.len();
        buf.extend_from_slice(etag.as_bytes());
        let values_at = buf.len();
        head::put_values(&mut buf, values.iter().map(|v| v.as_bytes()));
        let end = buf.len();
        (Bytes::from(buf), etag_at..values_at, values_at..end)
    }

    /// The values `fill` writes for this form, whether each is a slice of `buf`, and whether
    /// the buffer's text was read.
    fn render(
        key: u64,
        buf: &Bytes,
        etag: Option<Range<usize>>,
        values: Range<usize>,
        slots: usize,
    ) -> (Vec<(String, bool)>, bool) {
        let read = Cell::new(false);
        let ranges = || {
            read.set(true);
            (etag.clone(), values.clone())
        };
        let text = FormText {
            buf,
            memo_key: key,
            has_etag: etag.is_some(),
            ranges: &ranges,
        };
        let mut slots = vec![HeaderValue::from_static(""); slots];
        fill(&text, true, slots.iter_mut());
        let within = buf.as_ptr_range();
        let got = slots
            .iter()
            .map(|v| {
                let inside = within.contains(&v.as_bytes().as_ptr());
                (v.to_str().unwrap().to_string(), inside)
            })
            .collect();
        (got, read.get())
    }

    fn texts(got: &[(String, bool)]) -> Vec<&str> {
        got.iter().map(|(v, _)| v.as_str()).collect()
    }

    /// The first renders of a form read its text; from the second, this thread's memo gives
    /// the same values without reading the entry's buffer at all (they are the memo's own
    /// copy, not slices of the entry), and the memo pins no entry buffer.
    #[test]
    fn a_form_rendered_again_comes_from_the_memo() {
        let (buf, etag, values) = entry_buf("\"abc-gz\"", &["Mon, 08 Dec 2025", "req-1", "0.04"]);
        let want = ["\"abc-gz\"", "Mon, 08 Dec 2025", "req-1", "0.04"];
        let k = unused_memo_key();
        let (first, read) = render(k, &buf, Some(etag.clone()), values.clone(), 4);
        assert_eq!(texts(&first), want);
        assert!(read);
        assert!(
            first.iter().all(|(_, inside)| *inside),
            "made from the entry's text"
        );
        // The second render makes the line (from the text), the later ones use it.
        let (second, read) = render(k, &buf, Some(etag.clone()), values.clone(), 4);
        assert_eq!(texts(&second), want);
        assert!(read);
        for _ in 0..3 {
            let (again, read) = render(k, &buf, Some(etag.clone()), values.clone(), 4);
            assert_eq!(texts(&again), want);
            assert!(!read, "the entry's text is not read again");
            assert!(
                again.iter().all(|(_, inside)| !*inside),
                "the memo's values"
            );
        }
        assert!(
            buf.is_unique(),
            "the memo holds no reference to the entry buffer"
        );
    }

    /// A line serves only its own key: forms of other entries (other serials), even with
    /// keys that share its set and text that shares its address, get their own values.
    #[test]
    fn a_line_serves_only_its_own_key() {
        let a = entry_buf("\"aaa\"", &["x", "first"]);
        let b = entry_buf("\"bbb\"", &["y", "second"]);
        let (ka, kb) = (unused_memo_key(), unused_memo_key());
        for _ in 0..3 {
            for (k, (buf, etag, values), want) in [
                (ka, &a, ["\"aaa\"", "x", "first"]),
                (kb, &b, ["\"bbb\"", "y", "second"]),
            ] {
                for _ in 0..2 {
                    let (got, _) = render(k, buf, Some(etag.clone()), values.clone(), 3);
                    assert_eq!(texts(&got), want);
                }
            }
        }
        // Keys that land in one set, more of them than it has ways, taking turns.
        let mut crowd: Vec<(u64, EntryText, String)> = vec![];
        while crowd.len() < WAYS + 2 {
            let k = unused_memo_key();
            if crowd
                .first()
                .is_none_or(|(first, _, _)| set_of(*first) == set_of(k))
            {
                let id = format!("req-{k}");
                crowd.push((k, entry_buf("\"e\"", &[&id]), id));
            }
        }
        for _ in 0..3 {
            for (k, (buf, etag, values), id) in &crowd {
                let (got, _) = render(*k, buf, Some(etag.clone()), values.clone(), 2);
                assert_eq!(texts(&got), ["\"e\"", id.as_str()]);
            }
        }
    }

    /// Text too long for a line, and a form without an ETag (a negative entry), still render.
    #[test]
    fn long_text_and_forms_without_etag_render_from_the_text() {
        let long = "v".repeat(MAX_TEXT);
        let (buf, _, values) = entry_buf("", &[&long, "b"]);
        let k = unused_memo_key();
        for _ in 0..3 {
            let (got, read) = render(k, &buf, None, values.clone(), 2);
            assert_eq!(texts(&got), [long.as_str(), "b"]);
            assert!(read, "no line: read every time");
        }
        let (buf, _, values) = entry_buf("", &["a", "b"]);
        let k = unused_memo_key();
        for _ in 0..3 {
            let (got, _) = render(k, &buf, None, values.clone(), 2);
            assert_eq!(texts(&got), ["a", "b"]);
        }
    }
}
