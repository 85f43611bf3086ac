//! A per-thread memo of the header values hits render from entries' own text.
//!
//! An entry keeps its per-entry header values (its ETag, `Date`, `X-Request-Id`, `X-Runtime`,
//! `Last-Modified`) as text in its one buffer ([`super::head`]): a ready `HeaderValue` per value
//! would cost 40 B each in every entry, more than the 768 B per-entry bound leaves (issue 15).
//! But making a `HeaderValue` of text means `http` checks every byte (this crate forbids the
//! `unsafe` unchecked constructor): ~650 instructions per hit for Rails' ~140 B.
//!
//! The memo keeps, per thread, the values of entries that thread renders again: a hit compares
//! the entry's text with the memo's copy (one `memcmp`, two for an identity form) and clones the
//! values made the first time. A line is used only when its text equals the entry's byte for
//! byte, so what it gives is exactly what checking the entry's own text would give, whatever
//! became of the entry it was made from; its text is its own copy, so it pins no entry buffer.
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

use super::head;

/// Sets of the per-thread memo (a power of two), and lines per set.
const SETS: usize = 128;
const WAYS: usize = 4;
/// The most text and values a line keeps; an entry with more is rendered without the memo.
const MAX_TEXT: usize = 512;
const MAX_VALUES: usize = 16;

/// The values of one entry form: its text (the ETag, then the length-prefixed values region)
/// and the `HeaderValue`s made of it once, in render order.
#[derive(Default)]
struct Line {
    /// Where the text was in the entry's buffer (its address): narrows the search, the text
    /// decides.
    tag: usize,
    text: Bytes,
    /// `None`: the form has no ETag (a negative entry).
    etag_len: Option<usize>,
    values: Vec<HeaderValue>,
}

#[derive(Default)]
struct Set {
    lines: [Line; WAYS],
    /// The line to replace next (round robin).
    next: usize,
}

struct Memo {
    /// Per set, the tag and text fingerprint last rendered without a line: seen twice, it
    /// gets one. Thread-local storage, not heap: a thread that renders each form once
    /// allocates nothing here.
    seen: [(usize, u64); SETS],
    /// The sets, allocated when the first line is made.
    sets: Vec<Set>,
}

thread_local! {
    static MEMO: RefCell<Memo> = const {
        RefCell::new(Memo {
            seen: [(0, 0); SETS],
            sets: Vec::new(),
        })
    };
}

/// Writes the rendered values of an entry form into `slots`, in order: the ETag at `etag` in
/// `buf` (when given), then each value of the length-prefixed region at `values`. From this
/// thread's memo when it has them; made from the text otherwise.
pub(crate) fn fill<'m>(
    buf: &Bytes,
    etag: Option<Range<usize>>,
    values: Range<usize>,
    slots: impl Iterator<Item = &'m mut HeaderValue>,
) {
    let tag = etag.as_ref().map_or(values.start, |r| r.start) + buf.as_ptr() as usize;
    fill_tagged(tag, buf, etag, values, slots);
}

/// [`fill`] with the tag (the text's address) given.
fn fill_tagged<'m>(
    tag: usize,
    buf: &Bytes,
    etag: Option<Range<usize>>,
    values: Range<usize>,
    slots: impl Iterator<Item = &'m mut HeaderValue>,
) {
    let text = Text::of(buf, etag.clone(), values.clone());
    let mut slots = Some(slots);
    let memoised = MEMO
        .try_with(|memo| {
            let Ok(mut memo) = memo.try_borrow_mut() else {
                return false;
            };
            let memo = &mut *memo;
            let index = set_of(tag);
            let found = memo.sets.get(index).and_then(|set| {
                set.lines
                    .iter()
                    .position(|l| l.tag == tag && l.matches(&text))
            });
            let at = match found {
                Some(at) => at,
                None => {
                    let seen = (tag, fingerprint(text.etag, text.values));
                    if memo.seen[index] != seen {
                        memo.seen[index] = seen;
                        return false;
                    }
                    let Some(line) = Line::new(tag, &text) else {
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
            let set = &memo.sets[index];
            for (slot, value) in slots
                .take()
                .into_iter()
                .flatten()
                .zip(&set.lines[at].values)
            {
                *slot = value.clone();
            }
            true
        })
        .unwrap_or(false);
    if !memoised && let Some(slots) = slots {
        from_text(buf, etag, values, slots);
    }
}

/// The set a tag belongs to (Fibonacci hashing of the address).
fn set_of(tag: usize) -> usize {
    ((tag as u64 >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SETS.trailing_zeros())) as usize
}

/// A cheap summary of a form's text, so that another entry whose text landed at the same
/// address is not taken for a second sighting.
fn fingerprint(etag: &[u8], values: &[u8]) -> u64 {
    let word = |t: &[u8]| {
        let mut w = [0u8; 8];
        let n = t.len().min(8);
        w[..n].copy_from_slice(&t[t.len() - n..]);
        u64::from_le_bytes(w)
    };
    word(etag) ^ word(values).rotate_left(17) ^ (etag.len() as u64) << 48 ^ values.len() as u64
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
    fn new(tag: usize, text: &Text<'_>) -> Option<Line> {
        let (has_etag, etag, values) = (text.has_etag, text.etag, text.values);
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
            tag,
            text,
            etag_len: has_etag.then_some(etag.len()),
            values: rendered,
        })
    }

    fn matches(&self, text: &Text<'_>) -> bool {
        if self.etag_len != text.has_etag.then_some(text.etag.len()) {
            return false;
        }
        match text.whole {
            Some(whole) => self.text == whole,
            None => {
                self.text.len() == text.etag.len() + text.values.len()
                    && self.text[..text.etag.len()] == *text.etag
                    && self.text[text.etag.len()..] == *text.values
            }
        }
    }
}

/// An entry form's text as a line is looked up by.
struct Text<'a> {
    has_etag: bool,
    etag: &'a [u8],
    values: &'a [u8],
    /// The ETag and the values as one slice, when they are adjacent in the entry's buffer.
    whole: Option<&'a [u8]>,
}

impl Text<'_> {
    fn of(buf: &Bytes, etag: Option<Range<usize>>, values: Range<usize>) -> Text<'_> {
        let values_text = &buf[values.clone()];
        Text {
            has_etag: etag.is_some(),
            etag: etag.clone().map_or(&[][..], |r| &buf[r]),
            values: values_text,
            // The stored form's ETag leads its values region: one comparison for both.
            whole: match etag {
                Some(r) if r.end == values.start => Some(&buf[r.start..values.end]),
                Some(_) => None,
                None => Some(values_text),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry form's text as an entry buffer holds it: a body, the ETag, the values.
    fn entry_buf(etag: &str, values: &[&str]) -> (Bytes, Range<usize>, Range<usize>) {
        let mut buf = b"{\"id\":1}".to_vec();
        let etag_at = buf.len();
        buf.extend_from_slice(etag.as_bytes());
        let values_at = buf.len();
        head::put_values(&mut buf, values.iter().map(|v| v.as_bytes()));
        let end = buf.len();
        (Bytes::from(buf), etag_at..values_at, values_at..end)
    }

    /// The values `fill` writes for this text, and whether each is a slice of `buf`.
    fn render(buf: &Bytes, etag: Range<usize>, values: Range<usize>) -> Vec<(String, bool)> {
        let mut slots = vec![HeaderValue::from_static(""); 4];
        fill(buf, Some(etag), values, slots.iter_mut());
        let within = buf.as_ptr_range();
        slots
            .iter()
            .map(|v| {
                let inside = within.contains(&v.as_bytes().as_ptr());
                (v.to_str().unwrap().to_string(), inside)
            })
            .collect()
    }

    /// The first render of a form checks its text; from the second, this thread's memo gives
    /// the same values without checking them again (they are the memo's own copy, not slices
    /// of the entry), and the memo pins no entry buffer.
    #[test]
    fn a_form_rendered_again_comes_from_the_memo() {
        let (buf, etag, values) = entry_buf("\"abc-gz\"", &["Mon, 08 Dec 2025", "req-1", "0.04"]);
        let want = ["\"abc-gz\"", "Mon, 08 Dec 2025", "req-1", "0.04"];
        let first = render(&buf, etag.clone(), values.clone());
        assert_eq!(
            first.iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>(),
            want
        );
        assert!(
            first.iter().all(|(_, inside)| *inside),
            "made from the entry's text"
        );
        for _ in 0..3 {
            let again = render(&buf, etag.clone(), values.clone());
            assert_eq!(
                again.iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>(),
                want
            );
            assert!(
                again.iter().all(|(_, inside)| !*inside),
                "not checked again: the memo's values"
            );
        }
        assert!(
            buf.is_unique(),
            "the memo holds no reference to the entry buffer"
        );
    }

    /// A line serves only its own text: other text under the same tag (another entry whose
    /// buffer took the address of a freed one) gets its own values, never the line's.
    #[test]
    fn a_line_serves_only_text_equal_to_its_own() {
        let (buf, etag, values) = entry_buf("\"abc\"", &["one", "req-1"]);
        let line = Line::new(7, &Text::of(&buf, Some(etag.clone()), values.clone())).unwrap();
        assert!(line.matches(&Text::of(&buf, Some(etag.clone()), values.clone())));
        // The same text with the ETag elsewhere in the buffer (an identity form).
        let mut apart = buf.to_vec();
        apart.extend_from_slice(&buf[etag.clone()]);
        let apart = Bytes::from(apart);
        let moved = buf.len()..buf.len() + etag.len();
        assert!(line.matches(&Text::of(&apart, Some(moved.clone()), values.clone())));
        let (other, o_etag, o_values) = entry_buf("\"abd\"", &["one", "req-1"]);
        assert!(!line.matches(&Text::of(&other, Some(o_etag), o_values)));
        let (third, t_etag, t_values) = entry_buf("\"abc\"", &["one", "req-2"]);
        assert!(!line.matches(&Text::of(&third, Some(t_etag), t_values)));
        let mut changed = apart.to_vec();
        changed[moved.end - 2] = b'd';
        let changed = Bytes::from(changed);
        assert!(!line.matches(&Text::of(&changed, Some(moved), values.clone())));
        let no_etag = Text::of(&buf, None, etag.start..values.end);
        assert!(!line.matches(&no_etag), "a form without an ETag");

        // Through `fill`, with two texts taking turns at one address (each rendered twice,
        // so each gets a line under that tag): each gets its own values.
        let a = entry_buf("\"aaa\"", &["x", "first"]);
        let b = entry_buf("\"bbb\"", &["y", "second"]);
        for _ in 0..3 {
            for (buf, etag, values, want) in [
                (&a.0, &a.1, &a.2, ["\"aaa\"", "x", "first"]),
                (&b.0, &b.1, &b.2, ["\"bbb\"", "y", "second"]),
            ] {
                for _ in 0..2 {
                    let mut slots = vec![HeaderValue::from_static(""); 3];
                    fill_tagged(
                        42,
                        buf,
                        Some(etag.clone()),
                        values.clone(),
                        slots.iter_mut(),
                    );
                    assert_eq!(slots, want);
                }
            }
        }
    }

    /// Text too long for a line, and a form without an ETag (a negative entry), still render.
    #[test]
    fn long_text_and_forms_without_etag_render_from_the_text() {
        let long = "v".repeat(MAX_TEXT);
        let (buf, _, values) = entry_buf("", &[&long, "b"]);
        for _ in 0..3 {
            let mut slots = vec![HeaderValue::from_static(""); 2];
            fill(&buf, None, values.clone(), slots.iter_mut());
            assert_eq!(slots, [long.as_str(), "b"]);
        }
    }
}
