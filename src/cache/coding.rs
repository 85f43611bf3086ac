//! The two forms a stored body is sent in (SPEC 14): gzip, kept compressed when that is smaller,
//! and identity. Compression happens once, when an entry is built; a client's
//! `Accept-Encoding` only picks which stored bytes it gets ([`prefers_gzip`]).
//!
//! The compressor is libdeflate at level 1, chosen by measurement (callgrind instructions per
//! body, and output size): on the 3 KB sample conversation 143k instructions for 1,043 B (2.9x
//! smaller), on an 8 KB conversation 226k for 1,231 B (6.5x). flate2 with zlib-rs took
//! 559k/612k and miniz_oxide 486k/515k for larger output at the same level (their stream state
//! set-up dominates at these sizes); libdeflate's level 6 saved another 3-4% of bytes for 65-75%
//! more work. Re-measured with per-thread reused state (benches/results/callgrind-latest.md):
//! zlib-rs level 1 (static Huffman) 346k for 1,600 B, its levels 2-3 529k-602k, miniz_oxide
//! level 1 509k for 1,397 B, against libdeflate's 217k for 1,228 B; it stays. Decompressing
//! 8 KB costs ~55k instructions. Its level 1 is built patched for bodies of a few KB
//! (vendor/libdeflate-sys/PATCHED.md): a 16 KiB match table set up per body instead of 128 KiB,
//! and fewer positions inside each match inserted; 14.6 -> 8 µs per 8 KB conversation for 1,257
//! instead of 1,233 B.

use std::cell::RefCell;

use bytes::Bytes;
use http::HeaderMap;
use http::header::ACCEPT_ENCODING;
use libdeflater::{CompressionLvl, Compressor, Decompressor};

/// How an entry keeps its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// The upstream's identity bytes (compressing did not make them smaller).
    Identity,
    /// gzip (RFC 1952) of the identity bytes, as sent to clients that accept it.
    Gzip,
}

/// The most output scratch a thread keeps between compressions: every body up to ~64 KiB
/// (conversations are a few KB) compresses into it without allocating. A larger body gets an
/// output buffer of its own, freed afterwards: a scratch grown to the largest body would keep
/// up to `gzip_compress_bound(--max-object-bytes)` per worker thread for good, outside
/// `--cache-max-bytes`.
const SCRATCH_KEEP: usize = 64 * 1024;

thread_local! {
    /// Compressor state (~100 KB of tables for level 1) and an output scratch buffer (at most
    /// [`SCRATCH_KEEP`]), reused by every compression on this thread instead of allocated and
    /// zeroed per body.
    static COMPRESSOR: RefCell<(Compressor, Vec<u8>)> = RefCell::new((
        Compressor::new(CompressionLvl::new(1).unwrap_or_default()),
        Vec::new(),
    ));
    static DECOMPRESSOR: RefCell<Decompressor> = RefCell::new(Decompressor::new());
}

/// `body` gzip-compressed in an allocation of exactly its size, if that is smaller than `body`.
pub fn gzip(body: &[u8]) -> Option<Bytes> {
    with_gzip(body, Bytes::copy_from_slice)
}

/// Calls `f` with `body` gzip-compressed (in a per-thread scratch buffer, or for a body over
/// [`SCRATCH_KEEP`] in a buffer of its own), if that is smaller than `body`: the caller copies
/// the bytes where it keeps them, once.
pub fn with_gzip<R>(body: &[u8], f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    COMPRESSOR.with_borrow_mut(|(compressor, scratch)| {
        let bound = compressor.gzip_compress_bound(body.len());
        let mut own;
        let out = if bound <= SCRATCH_KEEP {
            if scratch.len() < bound {
                scratch.resize(bound, 0);
            }
            &mut scratch[..]
        } else {
            // Zeroed pages straight from the allocator (calloc), returned when done.
            own = vec![0u8; bound];
            &mut own[..]
        };
        let n = compressor.gzip_compress(body, out).ok()?;
        (n < body.len()).then(|| f(&out[..n]))
    })
}

/// This thread's compression scratch: its capacity and address (tests).
#[cfg(test)]
fn scratch() -> (usize, usize) {
    COMPRESSOR.with_borrow(|(_, scratch)| (scratch.capacity(), scratch.as_ptr() as usize))
}

/// The identity bytes of a gzip body made by [`gzip`], whose identity length is `len`.
pub fn gunzip(gz: &[u8], len: usize) -> Option<Bytes> {
    let mut out = Vec::with_capacity(len);
    gunzip_into(gz, len, &mut out).then(|| Bytes::from(out))
}

/// Appends the `len` identity bytes of `gz` to `out`; false (and `out` unchanged) if `gz` does
/// not decompress to exactly `len` bytes.
pub fn gunzip_into(gz: &[u8], len: usize, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    out.resize(start + len, 0);
    let n = DECOMPRESSOR.with_borrow_mut(|d| d.gzip_decompress(gz, &mut out[start..]));
    if n.is_ok_and(|n| n == len) {
        return true;
    }
    out.truncate(start);
    false
}

/// Whether the stored gzip bytes are the better answer for this request (RFC 9110 §12.5.3).
///
/// gzip (or its alias `x-gzip`, §8.4.1.3) or `*` with a non-zero weight makes gzip acceptable;
/// it is chosen unless `identity` is listed with a higher weight. Without `Accept-Encoding` any
/// coding would be acceptable, but identity is what every client can read, so it is chosen;
/// an empty value means identity only. An element with an invalid weight is ignored. Names
/// and `q` compare case-insensitively, with optional whitespace around every part.
///
/// `identity;q=0` without an acceptable gzip (or for a body kept as identity) still gets
/// identity: RFC 9110 lets a server disregard the preference rather than answer 406.
///
/// Runs on every hit: byte scanning only, no allocation.
pub fn prefers_gzip(headers: &HeaderMap) -> bool {
    let mut gzip: Option<u16> = None;
    let mut star: Option<u16> = None;
    let mut identity: Option<u16> = None;
    for value in headers.get_all(ACCEPT_ENCODING) {
        for element in value.as_bytes().split(|&b| b == b',') {
            let mut parts = element.split(|&b| b == b';');
            let coding = parts.next().unwrap_or_default().trim_ascii();
            if coding.is_empty() {
                continue;
            }
            let Some(q) = weight(parts) else {
                continue;
            };
            let slot =
                if coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip") {
                    &mut gzip
                } else if coding == b"*" {
                    &mut star
                } else if coding.eq_ignore_ascii_case(b"identity") {
                    &mut identity
                } else {
                    continue;
                };
            *slot = Some(q);
        }
    }
    let gzip = gzip.or(star).unwrap_or(0);
    gzip > 0 && identity.is_none_or(|identity| gzip >= identity)
}

/// The weight (`q`, in thousandths) among an element's parameters: 1000 when absent, `None`
/// when invalid. Other parameters are ignored.
fn weight<'a>(params: impl Iterator<Item = &'a [u8]>) -> Option<u16> {
    let mut q = 1000;
    for param in params {
        let mut kv = param.splitn(2, |&b| b == b'=');
        let name = kv.next().unwrap_or_default().trim_ascii();
        if !name.eq_ignore_ascii_case(b"q") {
            continue;
        }
        q = qvalue(kv.next()?.trim_ascii())?;
    }
    Some(q)
}

/// RFC 9110 §12.4.2: `0[.ddd]` or `1[.000]`, in thousandths.
fn qvalue(v: &[u8]) -> Option<u16> {
    let (int, frac) = match v {
        [d] => (*d, &[][..]),
        [d, b'.', frac @ ..] if frac.len() <= 3 => (*d, frac),
        _ => return None,
    };
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths = 0u16;
    for i in 0..3 {
        thousandths = thousandths * 10 + frac.get(i).map_or(0, |d| u16::from(d - b'0'));
    }
    match int {
        b'0' => Some(thousandths),
        b'1' if thousandths == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefers(values: &[&str]) -> bool {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ACCEPT_ENCODING, v.parse().unwrap());
        }
        prefers_gzip(&h)
    }

    #[test]
    fn accept_encoding_per_rfc_9110() {
        for gz in [
            &["gzip"][..],
            &["gzip, deflate, br"],
            &["br;q=1.0, gzip;q=0.8, *;q=0.1"],
            &["GZIP"],
            &["x-gzip"],
            &["  deflate ,\tgzip ; q = 0.5 "],
            &["*"],
            &["deflate", "gzip"],
            &["gzip;Q=1.000"],
            &["identity;q=0, gzip"],
            &["gzip;q=0.5, identity;q=0.5"],
            &["gzip;level=9;q=0.001"],
            &["deflate, *;q=0.3"],
        ] {
            assert!(prefers(gz), "{gz:?}");
        }
        for id in [
            &[][..],
            &[""],
            &["identity"],
            &["gzip;q=0"],
            &["gzip;q=0.000"],
            &["gzip;q=0, *"],
            &["*;q=0"],
            &["deflate, br"],
            &["gzip;q=2"],
            &["gzip;q=1.5"],
            &["gzip;q=0.0001"],
            &["gzip;q="],
            &["gzip;q"],
            &["gzip;q=0.5, identity"],
            &["gzipx"],
            &["identity;q=0"],
            &[","],
        ] {
            assert!(!prefers(id), "{id:?}");
        }
    }

    /// The per-thread scratch serves small bodies without allocating and never grows past
    /// [`SCRATCH_KEEP`]: a large body compresses in a buffer of its own.
    #[test]
    fn the_compression_scratch_stays_small() {
        let small = br#"{"id":42,"content":"hello hello hello hello"}"#.repeat(40);
        let gz = gzip(&small).expect("compressible");
        assert_eq!(gunzip(&gz, small.len()).unwrap(), small);
        let (kept, at) = scratch();
        assert!(kept > 0 && kept <= SCRATCH_KEEP, "{kept}");
        // 2 MiB that compress (a counter in text): well past the scratch.
        let large: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{i:09},").into_bytes())
            .collect();
        assert!(large.len() > 2 * SCRATCH_KEEP);
        let gz = gzip(&large).expect("compressible");
        assert_eq!(gunzip(&gz, large.len()).unwrap(), large);
        let (after, _) = scratch();
        assert!(after <= SCRATCH_KEEP, "scratch grew to {after} B");
        assert!(gzip(&small).is_some());
        assert_eq!(scratch(), (kept, at), "small bodies reuse the scratch");
    }

    /// The compressor is a patched libdeflate (vendor/libdeflate-sys/PATCHED.md: a smaller
    /// match-finder table, fewer positions inserted per match). Its output must still be plain
    /// gzip: read back by an independent decoder (flate2's miniz_oxide), for bodies with long
    /// matches (258 B, the longest DEFLATE has), matches across the 32 KiB window slide, lengths
    /// just past what level 1 stores uncompressed (51 B) and around 258 B and 4 KiB, and
    /// incompressible stretches.
    #[test]
    fn the_patched_compressor_writes_gzip_any_decoder_reads() {
        use std::io::Read;
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 24) as u8
                })
                .collect()
        };
        let sample = include_bytes!("../../tests/support/conversation-sample.json");
        let mut bodies: Vec<Vec<u8>> = vec![
            sample.to_vec(),
            sample.repeat(30),
            vec![b'a'; 100_000],
            br#"{"k":"v"},"#.repeat(9_000),
        ];
        let mut mixed = Vec::new();
        for i in 0..400 {
            mixed.extend_from_slice(&noise(50 + i % 200));
            mixed.extend_from_slice(&sample[i % 1000..i % 1000 + 300]);
        }
        bodies.push(mixed);
        // The same 32,760 noisy bytes again at distance 32,760: matches near the window's end.
        let block = noise(32_760);
        bodies.push(block.repeat(3));
        for n in (52..=70).chain(255..=263).chain(4094..=4098) {
            bodies.push(sample.iter().copied().cycle().take(n).collect());
            bodies.push(b"abcdefgh".iter().copied().cycle().take(n).collect());
        }
        let mut compressor = Compressor::new(CompressionLvl::new(1).expect("level 1"));
        let mut shrunk = 0;
        for body in &bodies {
            let mut gz = vec![0; compressor.gzip_compress_bound(body.len())];
            let n = compressor
                .gzip_compress(body, &mut gz)
                .expect("fits its bound");
            let mut decoded = Vec::new();
            flate2::read::GzDecoder::new(&gz[..n])
                .read_to_end(&mut decoded)
                .expect("gzip an independent decoder reads");
            assert!(decoded == *body, "a {} B body changed", body.len());
            assert_eq!(gunzip(&gz[..n], body.len()).as_deref(), Some(&body[..]));
            shrunk += usize::from(n < body.len());
        }
        // Every body but the sample's prefixes of 52-70 B (too short to shrink) came out
        // smaller: they went through the match finder, not level 1's stored blocks.
        assert_eq!(shrunk, bodies.len() - 19, "{shrunk} of {}", bodies.len());
    }

    /// The patched build is the one linked (a libdeflater that needs another libdeflate-sys
    /// would make Cargo build the stock library, with only a warning), and its output is fixed:
    /// both strong ETags derive from the gzip bytes, so a change here changes every ETag
    /// (one round of 200s for revalidating clients after a deploy). Stock libdeflate 1.26 level
    /// 1 gives 1,231 B for the sample.
    #[test]
    fn the_sample_compresses_as_the_patched_build_does() {
        let sample = include_bytes!("../../tests/support/conversation-sample.json");
        let gz = gzip(sample).expect("compressible");
        assert_eq!(gz.len(), 1_252, "not the patched libdeflate's output");
    }

    #[test]
    fn gzip_round_trips_and_only_when_smaller() {
        let body =
            br#"{"id":42,"messages":[{"content":"hello hello hello hello hello"}]}"#.repeat(20);
        let gz = gzip(&body).expect("compressible");
        assert!(gz.len() < body.len());
        assert_eq!(&gz[..2], b"\x1f\x8b", "gzip magic");
        assert_eq!(gz.len(), gz.as_ref().len());
        assert_eq!(gunzip(&gz, body.len()).unwrap(), body);
        assert_eq!(gunzip(&gz, body.len() + 1), None, "length checked");
        assert_eq!(gzip(&gz), None, "already compressed: not smaller");
        assert_eq!(gzip(b"{}"), None);
        assert_eq!(
            gzip(&body),
            Some(gz),
            "deterministic: one strong ETag per form"
        );
    }
}
