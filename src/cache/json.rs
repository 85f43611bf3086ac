//! The storage check's JSON reader (SPEC §5): one pass over a conversation body that validates
//! the whole document and picks out the top-level `id`, `account_id` and `updated_at`.
//!
//! Why not serde_json: deserialising a three-field struct still walks every value it ignores
//! through serde's generic visitor machinery, and that was ~20% of a stored miss's instructions
//! (callgrind, ~8 KB conversation). This reader accepts exactly the documents that
//! `serde_json::from_slice` accepts for that struct (`id`/`account_id` as `Option<u64>`,
//! `updated_at` as `Option<&RawValue>`), which the differential test below holds it to,
//! serde_json's particular rules included:
//! - top-level keys are decoded as serde decodes them (so `"\u0069d"` is `id`): valid UTF-8, no
//!   lone surrogate escapes; a repeated `id`, `account_id` or `updated_at` is an error, other
//!   repeated keys are not;
//! - values it ignores (and `updated_at`'s) are checked for JSON grammar, control characters and
//!   escape syntax only: serde_json's `ignore_str` does not check their UTF-8 or surrogate
//!   pairing; `updated_at`'s raw text must be UTF-8 as a whole (`RawValue` is a `str`);
//! - nesting inside those values is unbounded: serde skips them iteratively, without its
//!   recursion limit. Here too nothing recurses: open containers are an explicit bit stack.

/// What the storage check reads from a conversation body.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TopFields<'a> {
    pub id: Option<u64>,
    pub account_id: Option<u64>,
    /// `updated_at`'s JSON text as it stands (a number, for Chatwoot); `None` when absent or
    /// `null`.
    pub updated_at: Option<&'a str>,
}

/// The top-level fields of `body` if it is one valid JSON object (whitespace around it only),
/// with `id` and `account_id` absent, `null` or an integer that fits a `u64`.
pub fn top_fields(body: &[u8]) -> Option<TopFields<'_>> {
    let mut r = Reader { b: body, i: 0 };
    if r.ws() != b'{' {
        return None;
    }
    r.i += 1;
    let mut f = TopFields::default();
    let mut seen = 0u8;
    if r.ws() != b'}' {
        loop {
            if r.ws() != b'"' {
                return None;
            }
            r.i += 1;
            let key = r.key()?;
            if r.ws() != b':' {
                return None;
            }
            r.i += 1;
            if seen & key.bit() != 0 {
                return None; // serde's "duplicate field"
            }
            seen |= key.bit();
            match key {
                Key::Id => f.id = r.option_u64()?,
                Key::AccountId => f.account_id = r.option_u64()?,
                Key::UpdatedAt => {
                    if r.ws() == b'n' {
                        r.literal(b"null")?;
                    } else {
                        let start = r.i;
                        r.skip_value()?;
                        f.updated_at = Some(std::str::from_utf8(body.get(start..r.i)?).ok()?);
                    }
                }
                Key::Other => r.skip_value()?,
            }
            match r.ws() {
                b',' => r.i += 1,
                b'}' => break,
                _ => return None,
            }
        }
    }
    r.i += 1;
    r.ws();
    (r.i == body.len()).then_some(f)
}

/// A top-level key as serde's field matching sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Key {
    Id,
    AccountId,
    UpdatedAt,
    Other,
}

impl Key {
    fn of(name: &[u8]) -> Key {
        match name {
            b"id" => Key::Id,
            b"account_id" => Key::AccountId,
            b"updated_at" => Key::UpdatedAt,
            _ => Key::Other,
        }
    }

    /// The bit that remembers the field was seen (none for other keys: serde ignores their
    /// repeats).
    fn bit(self) -> u8 {
        match self {
            Key::Id => 1,
            Key::AccountId => 2,
            Key::UpdatedAt => 4,
            Key::Other => 0,
        }
    }
}

/// A cursor over the body. Every read is bounds-checked: [`Reader::peek`] reads past the end
/// as 0, a byte that is valid nowhere in JSON outside strings and is a control character inside
/// them, so "unexpected end" and "unexpected byte" are the same rejection.
struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    #[inline]
    fn peek(&self) -> u8 {
        self.b.get(self.i).copied().unwrap_or(0)
    }

    /// The next byte, consumed.
    #[inline]
    fn next(&mut self) -> Option<u8> {
        let c = self.b.get(self.i).copied()?;
        self.i += 1;
        Some(c)
    }

    /// Skips JSON whitespace (not form feed) and returns the byte after it (0 at the end).
    #[inline]
    fn ws(&mut self) -> u8 {
        loop {
            let c = self.peek();
            if !matches!(c, b' ' | b'\n' | b'\t' | b'\r') {
                return c;
            }
            self.i += 1;
        }
    }

    fn literal(&mut self, lit: &[u8]) -> Option<()> {
        let end = self.i.checked_add(lit.len())?;
        if self.b.get(self.i..end)? != lit {
            return None;
        }
        self.i = end;
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_ascii_digit() {
            self.i += 1;
        }
    }

    /// A JSON number (RFC 8259 grammar), value not needed.
    fn number(&mut self) -> Option<()> {
        if self.peek() == b'-' {
            self.i += 1;
        }
        match self.next()? {
            b'0' if self.peek().is_ascii_digit() => return None,
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == b'.' {
            self.i += 1;
            if !self.peek().is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        if matches!(self.peek(), b'e' | b'E') {
            self.i += 1;
            if matches!(self.peek(), b'+' | b'-') {
                self.i += 1;
            }
            if !self.peek().is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        Some(())
    }

    /// `null` or an integer serde's `u64` visitor takes: no sign, fraction or exponent (those
    /// are floats or negatives to serde, refused), at most `u64::MAX`.
    fn option_u64(&mut self) -> Option<Option<u64>> {
        match self.ws() {
            b'n' => {
                self.literal(b"null")?;
                Some(None)
            }
            b'0' => {
                self.i += 1;
                if matches!(self.peek(), b'0'..=b'9' | b'.' | b'e' | b'E') {
                    return None;
                }
                Some(Some(0))
            }
            b'1'..=b'9' => {
                let mut v: u64 = 0;
                while let c @ b'0'..=b'9' = self.peek() {
                    v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
                    self.i += 1;
                }
                if matches!(self.peek(), b'.' | b'e' | b'E') {
                    return None;
                }
                Some(Some(v))
            }
            _ => None,
        }
    }

    /// Four hex digits of a `\u` escape.
    fn hex4(&mut self) -> Option<u32> {
        let end = self.i.checked_add(4)?;
        let digits = self.b.get(self.i..end)?;
        let mut n = 0;
        for &d in digits {
            n = n << 4 | char::from(d).to_digit(16)?;
        }
        self.i = end;
        Some(n)
    }

    /// The rest of a string whose value is not needed (after its opening quote): serde's
    /// `ignore_str`, which checks control characters and escape syntax, not UTF-8.
    fn skip_string(&mut self) -> Option<()> {
        loop {
            self.i = special_at(self.b, self.i);
            match self.next()? {
                b'"' => return Some(()),
                b'\\' => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => {
                        self.hex4()?;
                    }
                    _ => return None,
                },
                _ => return None,
            }
        }
    }

    /// A top-level key (after its opening quote), checked as serde's `parse_str` checks it.
    fn key(&mut self) -> Option<Key> {
        let start = self.i;
        self.i = special_at(self.b, self.i);
        if self.peek() != b'"' {
            return self.escaped_key(start);
        }
        let name = self.b.get(start..self.i)?;
        self.i += 1;
        std::str::from_utf8(name).ok()?;
        Some(Key::of(name))
    }

    /// A top-level key with an escape (or a bad byte) at `self.i`, decoded into as much of it
    /// as could match a field name. The raw runs between escapes must each be UTF-8, which is
    /// what serde's check of the decoded string comes to (an escape decodes to whole
    /// characters).
    #[cold]
    fn escaped_key(&mut self, start: usize) -> Option<Key> {
        let mut name = Name::default();
        let mut run = start;
        loop {
            self.i = special_at(self.b, self.i);
            let raw = self.b.get(run..self.i)?;
            name.extend(std::str::from_utf8(raw).ok()?);
            match self.next()? {
                b'"' => return Some(name.key()),
                b'\\' => {
                    let c = self.key_escape()?;
                    name.extend(c.encode_utf8(&mut [0; 4]));
                    run = self.i;
                }
                _ => return None,
            }
        }
    }

    /// One escape of a key (after its backslash): a `\u` high surrogate must be followed by a
    /// `\u` low surrogate, and a low surrogate alone is refused (serde's `parse_str`).
    fn key_escape(&mut self) -> Option<char> {
        Some(match self.next()? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => match self.hex4()? {
                high @ 0xD800..=0xDBFF => {
                    if self.next()? != b'\\' || self.next()? != b'u' {
                        return None;
                    }
                    let low = self.hex4()?;
                    if !(0xDC00..=0xDFFF).contains(&low) {
                        return None;
                    }
                    char::from_u32(0x1_0000 + ((high - 0xD800) << 10 | (low - 0xDC00)))?
                }
                n => char::from_u32(n)?, // None for a lone low surrogate
            },
            _ => return None,
        })
    }

    /// One JSON value whose content is not needed, nested containers included, without
    /// recursion.
    fn skip_value(&mut self) -> Option<()> {
        let mut open = Nesting::default();
        loop {
            // A value (or the first of a container's).
            match self.ws() {
                b'"' => {
                    self.i += 1;
                    self.skip_string()?;
                }
                b'{' => {
                    self.i += 1;
                    if self.ws() == b'}' {
                        self.i += 1;
                    } else {
                        open.push(true);
                        self.member_key()?;
                        continue;
                    }
                }
                b'[' => {
                    self.i += 1;
                    if self.ws() == b']' {
                        self.i += 1;
                    } else {
                        open.push(false);
                        continue;
                    }
                }
                b'-' | b'0'..=b'9' => self.number()?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                _ => return None,
            }
            // After a value: close the containers it completes, or go on to the next element.
            loop {
                let object = open.innermost()?;
                let Some(object) = object else {
                    return Some(());
                };
                match self.ws() {
                    b',' => {
                        self.i += 1;
                        if object {
                            self.member_key()?;
                        }
                        break;
                    }
                    b'}' if object => {
                        self.i += 1;
                        open.pop();
                    }
                    b']' if !object => {
                        self.i += 1;
                        open.pop();
                    }
                    _ => return None,
                }
            }
        }
    }

    /// `"key":` of an object being skipped.
    fn member_key(&mut self) -> Option<()> {
        if self.ws() != b'"' {
            return None;
        }
        self.i += 1;
        self.skip_string()?;
        if self.ws() != b':' {
            return None;
        }
        self.i += 1;
        Some(())
    }
}

/// The index of the first `"`, `\` or control character at or after `i` (`b.len()` if none),
/// eight bytes at a time: most of a conversation's bytes are inside strings.
#[inline]
fn special_at(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES << 7;
    while let Some(chunk) = b.get(i..).and_then(<[u8]>::first_chunk::<8>) {
        let x = u64::from_le_bytes(*chunk);
        // A byte's high bit is set in each term where it is below 0x20, a quote or a backslash;
        // only bytes above a true match can be flagged spuriously, so the lowest is exact.
        let quote = x ^ (ONES * u64::from(b'"'));
        let backslash = x ^ (ONES * u64::from(b'\\'));
        let hits = (x.wrapping_sub(ONES * 0x20) & !x
            | quote.wrapping_sub(ONES) & !quote
            | backslash.wrapping_sub(ONES) & !backslash)
            & HIGH;
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            return i;
        }
        i += 1;
    }
    i
}

/// The containers open inside a skipped value, innermost last, one bit each (set: object).
/// The first 128 levels are inline; deeper ones (serde skips any depth) go to `deeper`.
#[derive(Default)]
struct Nesting {
    depth: usize,
    inline: u128,
    deeper: Vec<u64>,
}

impl Nesting {
    fn push(&mut self, object: bool) {
        let d = self.depth;
        if d < 128 {
            self.inline = self.inline & !(1 << d) | u128::from(object) << d;
        } else {
            let (word, bit) = ((d - 128) / 64, (d - 128) % 64);
            if word == self.deeper.len() {
                self.deeper.push(0);
            }
            if let Some(w) = self.deeper.get_mut(word) {
                *w = *w & !(1 << bit) | u64::from(object) << bit;
            }
        }
        self.depth += 1;
    }

    fn pop(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    /// `Some(None)` when nothing is open, `Some(Some(is_object))` for the innermost container;
    /// `None` only if the bit stack were inconsistent (never: a refusal, not a panic).
    fn innermost(&self) -> Option<Option<bool>> {
        let Some(d) = self.depth.checked_sub(1) else {
            return Some(None);
        };
        if d < 128 {
            return Some(Some(self.inline >> d & 1 == 1));
        }
        let w = self.deeper.get((d - 128) / 64)?;
        Some(Some(w >> ((d - 128) % 64) & 1 == 1))
    }
}

/// The start of a decoded key, enough to compare with the longest field name; longer keys
/// are no field.
#[derive(Default)]
struct Name {
    buf: [u8; 10],
    len: usize,
    too_long: bool,
}

impl Name {
    fn extend(&mut self, s: &str) {
        for &b in s.as_bytes() {
            match self.buf.get_mut(self.len) {
                Some(slot) => {
                    *slot = b;
                    self.len += 1;
                }
                None => self.too_long = true,
            }
        }
    }

    fn key(&self) -> Key {
        match self.buf.get(..self.len) {
            Some(name) if !self.too_long => Key::of(name),
            _ => Key::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Differential tests: serde_json, which the storage check used before, is the oracle.

    use serde::Deserialize;
    use serde_json::value::RawValue;

    use super::*;

    /// The storage check as it was written with serde_json (rules.rs before this module).
    fn oracle(body: &[u8]) -> Option<TopFields<'_>> {
        #[derive(Deserialize)]
        struct Fields<'a> {
            id: Option<u64>,
            account_id: Option<u64>,
            #[serde(borrow)]
            updated_at: Option<&'a RawValue>,
        }
        // serde would also accept a JSON array for a struct; only an object is a conversation.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        let f: Fields<'_> = serde_json::from_slice(body).ok()?;
        Some(TopFields {
            id: f.id,
            account_id: f.account_id,
            updated_at: f.updated_at.map(RawValue::get),
        })
    }

    /// The old `rules::probe`, for comparing the whole check (`Decimal` included).
    fn oracle_probe(body: &[u8], account: u64, conversation: u64) -> Option<(String, String)> {
        let f = oracle(body)?;
        if f.id != Some(conversation) || f.account_id.is_some_and(|a| a != account) {
            return None;
        }
        match f.updated_at {
            Some(raw) if raw != "null" => Some((
                format!("{:?}", super::super::decimal::Decimal::parse(raw)?),
                raw.trim().to_owned(),
            )),
            _ => Some((String::new(), String::new())),
        }
    }

    fn probe_now(body: &[u8], account: u64, conversation: u64) -> Option<(String, String)> {
        let p = super::super::rules::probe(body, account, conversation)?;
        Some((
            p.updated_at.map_or(String::new(), |d| format!("{d:?}")),
            p.updated_at_text.map_or(String::new(), String::from),
        ))
    }

    /// Whether the reader and the oracle agree on `body`; `Some(accepted)` when they do.
    fn agree(body: &[u8]) -> Result<bool, String> {
        let want = oracle(body);
        let got = top_fields(body);
        if got != want {
            return Err(format!(
                "fields differ on {:?}: got {got:?}, serde {want:?}",
                String::from_utf8_lossy(body)
            ));
        }
        for (account, conversation) in [(1, 42), (7, 1001)] {
            if probe_now(body, account, conversation) != oracle_probe(body, account, conversation) {
                return Err(format!(
                    "probe differs on {:?}",
                    String::from_utf8_lossy(body)
                ));
            }
        }
        Ok(want.is_some())
    }

    fn check(body: &[u8], accepted: bool) {
        match agree(body) {
            Ok(a) => assert_eq!(
                a,
                accepted,
                "serde's verdict on {:?} is not what this case expects",
                String::from_utf8_lossy(body)
            ),
            Err(e) => panic!("{e}"),
        }
    }

    const SAMPLE: &[u8] = include_bytes!("../../tests/support/conversation-sample.json");

    #[test]
    fn edge_cases_agree_with_serde() {
        let accepted: &[&[u8]] = &[
            br#"{"id":42}"#,
            br#"  {"id":42}  "#,
            b"\r\n\t {\r\n\t\"id\"\r\n:\t42\r\n,\"account_id\" : 1 } \n",
            br#"{"id":42,"account_id":1,"updated_at":1765182000.482917}"#,
            br#"{"id":42,"account_id":null,"updated_at":null}"#,
            br#"{"id":42,"updated_at":-1.5e-3}"#,
            br#"{"id":42,"updated_at":0}"#,
            br#"{"id":42,"updated_at":1E+2}"#,
            // updated_at that Decimal refuses, still valid JSON: the probe refuses, fields agree
            br#"{"id":42,"updated_at":"2025-12-08"}"#,
            br#"{"id":42,"updated_at":{"a":[1,2]}}"#,
            br#"{"id":42,"updated_at":"\ud800"}"#,
            br#"{"id":42,"updated_at":true}"#,
            br#"{}"#,
            br#"{"id":null}"#,
            br#"{"id":0}"#,
            br#"{"id":18446744073709551615}"#,
            // escaped keys are the fields serde decodes them to
            br#"{"\u0069d":42}"#,
            br#"{"\u0069\u0064":42,"acc\u006Funt_id":1}"#,
            br#"{"id":42,"updated\u005fat":5}"#,
            br#"{"i\/d":42}"#,
            br#"{"id":42,"\ud83d\ude00":1}"#,
            "{\"id\":42,\"é\":1,\"\u{1F600}\":\"ü\"}".as_bytes(),
            // nested id/account_id/updated_at are not the top-level ones
            br#"{"id":42,"meta":{"id":1,"account_id":9,"updated_at":"x"},"m":[{"id":-1}]}"#,
            br#"{"x":{"id":42}}"#,
            // repeated keys other than the three fields are fine
            br#"{"id":42,"x":1,"x":2,"y":[],"y":{}}"#,
            // what serde skips it does not check for UTF-8 or surrogate pairing
            b"{\"id\":42,\"x\":\"\xff\xfe\x80\"}",
            b"{\"id\":42,\"x\":{\"\xc3\":1}}",
            br#"{"id":42,"x":"\ud800","y":"\udc00\ud800x","z":{"\udfff":1}}"#,
            br#"{"id":42,"x":"\u00e9\u00E9\/\b\f\n\r\t\"\\"}"#,
            b"{\"id\":42,\"x\":\"\x7f\"}",
            // every number shape in a skipped value
            br#"{"id":42,"x":[0,-0,1,-1,0.5,-0.5e10,1e5,1E-5,1e+5,123456789012345678901234567890,1e400]}"#,
            br#"{"id":42,"x":[true,false,null,"",[],{},[[]],{"a":{}}]}"#,
            br#"{"id":42,"x":[ 1 , 2 ] , "y" : { "a" : 1 , "b" : [ ] } }"#,
        ];
        let refused: &[&[u8]] = &[
            b"",
            b"   ",
            b"[]",
            br#"[{"id":42}]"#,
            br#""id""#,
            b"42",
            b"null",
            // JSON whitespace only: form feed and NUL are not
            b"\x0c{\"id\":42}",
            b"{\"id\":42}\x0c",
            b"{\"id\":42}\x00",
            b"{\"id\":42,\x0c\"x\":1}",
            br#"{"id":42"#,
            br#"{"id":42,}"#,
            br#"{"id":42,,"x":1}"#,
            br#"{,"id":42}"#,
            br#"{"id":42} {}"#,
            br#"{"id":42}}"#,
            br#"{"id":42}x"#,
            br#"{"id" 42}"#,
            br#"{"id":}"#,
            br#"{id:42}"#,
            br#"{'id':42}"#,
            br#"{"id":42 "x":1}"#,
            // id / account_id as serde's Option<u64> refuses them
            br#"{"id":-42}"#,
            br#"{"id":-0}"#,
            br#"{"id":42.0}"#,
            br#"{"id":4.2e1}"#,
            br#"{"id":42e0}"#,
            br#"{"id":42E0}"#,
            br#"{"id":18446744073709551616}"#,
            br#"{"id":99999999999999999999}"#,
            br#"{"id":042}"#,
            br#"{"id":00}"#,
            br#"{"id":"42"}"#,
            br#"{"id":true}"#,
            br#"{"id":[42]}"#,
            br#"{"id":{}}"#,
            br#"{"id":nul}"#,
            br#"{"id":nulll}"#,
            br#"{"id":+42}"#,
            br#"{"id":42,"account_id":-1}"#,
            br#"{"id":42,"account_id":1.0}"#,
            // duplicates of the three fields, however spelt
            br#"{"id":42,"id":42}"#,
            br#"{"id":null,"id":42}"#,
            br#"{"id":42,"\u0069d":42}"#,
            br#"{"id":42,"account_id":1,"account_id":1}"#,
            br#"{"id":42,"updated_at":null,"updated_at":1}"#,
            br#"{"id":42,"updated_at":1,"updated\u005fat":1}"#,
            // top-level keys are checked as serde's parse_str checks them
            b"{\"id\":42,\"\xff\":1}",
            b"{\"id\":42,\"\xc3\":1}",
            b"{\"id\":42,\"\xc3\\u00e9\":1}",
            b"{\"id\":42,\"\xed\xa0\x80\":1}",
            br#"{"id":42,"\ud800":1}"#,
            br#"{"id":42,"\udc00":1}"#,
            br#"{"id":42,"\ud800\u0041":1}"#,
            br#"{"id":42,"\ud800x":1}"#,
            br#"{"id":42,"\ud800\n":1}"#,
            br#"{"id":42,"\ud800\ud800":1}"#,
            br#"{"id":42,"\u00g0":1}"#,
            br#"{"id":42,"\u00e":1}"#,
            br#"{"id":42,"\x":1}"#,
            br#"{"id":42,"\'":1}"#,
            b"{\"id\":42,\"a\x01\":1}",
            b"{\"id\":42,\"a\tb\":1}",
            // updated_at's raw text must be UTF-8
            b"{\"id\":42,\"updated_at\":\"\xff\"}",
            b"{\"id\":42,\"updated_at\":[\"\xc3\"]}",
            // strings anywhere: control characters, escapes, termination
            b"{\"id\":42,\"x\":\"a\nb\"}",
            b"{\"id\":42,\"x\":\"\x00\"}",
            b"{\"id\":42,\"x\":\"\x1f\"}",
            br#"{"id":42,"x":"\u12"}"#,
            br#"{"id":42,"x":"\u12G4"}"#,
            br#"{"id":42,"x":"\a"}"#,
            br#"{"id":42,"x":"\U0041"}"#,
            br#"{"id":42,"x":"abc}"#,
            br#"{"id":42,"x":"abc\"}"#,
            b"{\"id\":42,\"x\":{\"a\nb\":1}}",
            // numbers in skipped values
            br#"{"id":42,"x":01}"#,
            br#"{"id":42,"x":-}"#,
            br#"{"id":42,"x":-a}"#,
            br#"{"id":42,"x":1.}"#,
            br#"{"id":42,"x":.5}"#,
            br#"{"id":42,"x":1e}"#,
            br#"{"id":42,"x":1e+}"#,
            br#"{"id":42,"x":+1}"#,
            br#"{"id":42,"x":1.e5}"#,
            br#"{"id":42,"x":0x10}"#,
            br#"{"id":42,"x":NaN}"#,
            br#"{"id":42,"x":Infinity}"#,
            br#"{"id":42,"updated_at":1.}"#,
            br#"{"id":42,"updated_at":01}"#,
            // literals and containers in skipped values
            br#"{"id":42,"x":tru}"#,
            br#"{"id":42,"x":True}"#,
            br#"{"id":42,"x":nulls}"#,
            br#"{"id":42,"x":[1,]}"#,
            br#"{"id":42,"x":[,1]}"#,
            br#"{"id":42,"x":[1 2]}"#,
            br#"{"id":42,"x":{"a":1,}}"#,
            br#"{"id":42,"x":{"a"}}"#,
            br#"{"id":42,"x":{"a":}}"#,
            br#"{"id":42,"x":{1:1}}"#,
            br#"{"id":42,"x":[}"#,
            br#"{"id":42,"x":{]}"#,
            br#"{"id":42,"x":[[1]}"#,
            br#"{"id":42,"x":[1]]}"#,
            br#"{"id":42,"x":{"a":[}]}"#,
        ];
        for body in accepted {
            check(body, true);
        }
        for body in refused {
            check(body, false);
        }
    }

    /// serde_json's recursion limit (128) does not apply to what it skips: any depth passes,
    /// and a bracket mismatch at any depth is caught.
    #[test]
    fn nesting_depth_agrees_with_serde() {
        for depth in [
            1, 2, 63, 64, 65, 126, 127, 128, 129, 130, 191, 192, 193, 255, 256, 257, 1000, 5000,
        ] {
            for (open, close) in [("[", "]"), ("{\"a\":", "}"), ("[{\"b\":", "}]")] {
                let inner = format!("{}1{}", open.repeat(depth), close.repeat(depth));
                for body in [
                    format!(r#"{{"id":42,"x":{inner}}}"#),
                    format!(r#"{{"x":{inner},"id":42,"updated_at":{inner}}}"#),
                ] {
                    check(body.as_bytes(), true);
                    // One closing bracket swapped for the other kind at each of a few depths.
                    for at in [0, depth / 2, depth.saturating_sub(1)] {
                        let mut bad = body.clone().into_bytes();
                        let closers: Vec<usize> = bad
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| matches!(c, b']' | b'}'))
                            .map(|(i, _)| i)
                            .collect();
                        if let Some(&i) = closers.get(at) {
                            bad[i] = if bad[i] == b']' { b'}' } else { b']' };
                            check(&bad, false);
                        }
                        // and one closer too few
                        let short = format!(
                            r#"{{"id":42,"x":{}1{}}}"#,
                            open.repeat(depth),
                            close.repeat(depth - 1)
                        );
                        check(short.as_bytes(), false);
                    }
                }
            }
        }
    }

    #[test]
    fn the_sample_conversation_is_read() {
        let f = top_fields(SAMPLE).expect("the sample is a conversation");
        assert_eq!(f, oracle(SAMPLE).expect("serde reads it"));
        assert_eq!(f.id, Some(42));
        assert_eq!(f.account_id, Some(1));
        assert!(f.updated_at.is_some());
        // Every truncation of it is refused by both.
        for len in 0..SAMPLE.trim_ascii_end().len() {
            check(&SAMPLE[..len], false);
        }
    }

    /// Deterministic xorshift64* generator.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Bytes that change a JSON document's meaning most often.
    const INTERESTING: &[u8] =
        b"{}[]:,\"\\/ \t\r\n\x0c\x00\x01\x1f\x7f\x80\xbf\xc3\xa9\xe2\xed\xf0\xf4\xff\
        0123456789-+.eEabcdfnrtulsxiIdDuU_";

    /// Fragments a splice may insert: tokens and whole values, including tricky ones.
    const FRAGMENTS: &[&[u8]] = &[
        b"\"id\":42,",
        b"\"id\":",
        b",\"id\":42",
        b"\"account_id\":1,",
        b"\"account_id\":2,",
        b"\"updated_at\":",
        b"\"updated_at\":1765182000.5,",
        b"\"\\u0069d\":42,",
        b"\\ud800",
        b"\\udc00",
        b"\\ud83d\\ude00",
        b"\\u00e9",
        b"\\u",
        b"\\",
        b"null",
        b"true",
        b"false",
        b"-0",
        b"1e5",
        b"1.5",
        b"18446744073709551616",
        b"18446744073709551615",
        b"[[[[",
        b"]]]]",
        b"{\"a\":{\"b\":",
        b"}}",
        b"\xc3\xa9",
        b"\xf0\x9f\x98\x80",
        b"\xed\xa0\x80",
    ];

    /// Small documents to mutate besides the sample: short enough that a few mutations often
    /// leave them valid, so acceptance is exercised as much as refusal.
    const SMALL: &[&[u8]] = &[
        br#"{"id":42,"account_id":1,"updated_at":1765182000.482917}"#,
        br#"{"account_id":1,"id":42,"x":[1,-2.5e3,true,null,"s\u00e9\n"],"updated_at":12.5}"#,
        br#"{"meta":{"id":1,"a":[{"b":{}}]},"id":42,"updated_at":null,"z":"\ud800"}"#,
        br#"{"id":42,"\u0069d2":1,"m":[[],[{}],[[1]]],"s":"\"\\\/\b\f\n\r\t"}"#,
        b"{ \"id\" : 42 , \"k\" : \"\xc3\xa9\xe2\x82\xac\" , \"account_id\" : null }",
        br#"{"id":42,"updated_at":"2025-12-08T08:20:00Z","deep":[[[[{"a":[[]]}]]]]}"#,
    ];

    fn mutate(rng: &mut Rng, doc: &mut Vec<u8>, seeds: &[&[u8]]) {
        let pos = |rng: &mut Rng, doc: &Vec<u8>| rng.below(doc.len() + 1);
        match rng.below(8) {
            0 | 1 => {
                // replace one byte
                if !doc.is_empty() {
                    let i = rng.below(doc.len());
                    doc[i] = if rng.below(4) == 0 {
                        rng.next() as u8
                    } else {
                        INTERESTING[rng.below(INTERESTING.len())]
                    };
                }
            }
            2 => {
                // flip one bit
                if !doc.is_empty() {
                    let i = rng.below(doc.len());
                    doc[i] ^= 1 << rng.below(8);
                }
            }
            3 => {
                let i = pos(rng, doc);
                doc.insert(i, INTERESTING[rng.below(INTERESTING.len())]);
            }
            4 => {
                // delete a short run
                if !doc.is_empty() {
                    let i = rng.below(doc.len());
                    let n = (1 + rng.below(4)).min(doc.len() - i);
                    doc.drain(i..i + n);
                }
            }
            5 => {
                let i = pos(rng, doc);
                doc.truncate(i);
            }
            6 => {
                let i = pos(rng, doc);
                let f = FRAGMENTS[rng.below(FRAGMENTS.len())];
                doc.splice(i..i, f.iter().copied());
            }
            _ => {
                // splice a range of some seed (or of the document itself) in place of another
                let src: Vec<u8> = if rng.below(2) == 0 {
                    doc.clone()
                } else {
                    seeds[rng.below(seeds.len())].to_vec()
                };
                let a = rng.below(src.len() + 1);
                let b = (a + rng.below(24)).min(src.len());
                let i = pos(rng, doc);
                let j = (i + rng.below(8)).min(doc.len());
                doc.splice(i..j, src[a..b].iter().copied());
            }
        }
    }

    #[test]
    fn mutations_agree_with_serde() {
        let mut seeds: Vec<&[u8]> = SMALL.to_vec();
        seeds.push(SAMPLE);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut cases, mut accepted) = (0u64, 0u64);
        let mut run = |rounds: usize, seed_of: &dyn Fn(&mut Rng) -> &'static [u8]| {
            for _ in 0..rounds {
                let mut doc = seed_of(&mut rng).to_vec();
                for _ in 0..1 + rng.below(3) {
                    mutate(&mut rng, &mut doc, &seeds);
                }
                match agree(&doc) {
                    Ok(a) => accepted += u64::from(a),
                    Err(e) => panic!("case {cases}: {e}"),
                }
                cases += 1;
            }
        };
        run(200_000, &|rng| SMALL[rng.below(SMALL.len())]);
        run(10_000, &|_| SAMPLE);
        // Both verdicts are exercised often (a test that only ever sees refusals would pass a
        // reader that refuses everything).
        assert!(accepted * 20 > cases, "{accepted} of {cases} accepted");
        assert!(accepted * 10 < cases * 9, "{accepted} of {cases} accepted");
    }
}
