//! Exact comparison of JSON numbers such as `updated_at: 1765182000.482917`.
//!
//! That value has 16 significant digits, past what an `f64` round trip preserves, so two
//! different timestamps could compare equal (or an older one newer). Numbers are compared on
//! their decimal text instead: sign, significant digits and a power of ten.

use std::cmp::Ordering;

/// A JSON number normalised for exact comparison: value = ±0.`digits` × 10^`exp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decimal {
    negative: bool,
    /// Significant digits, no leading or trailing zeros; empty for zero.
    digits: Box<str>,
    exp: i64,
}

impl Decimal {
    /// Parses JSON number text (`-12.50`, `1.7e9`, `0`). `None` for anything else.
    pub fn parse(text: &str) -> Option<Decimal> {
        let t = text.trim();
        let (negative, t) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let (mantissa, exp_part) = match t.find(['e', 'E']) {
            Some(i) => (&t[..i], Some(&t[i + 1..])),
            None => (t, None),
        };
        let (int, frac) = match mantissa.split_once('.') {
            Some((i, f)) => (i, f),
            None => (mantissa, ""),
        };
        if int.is_empty()
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || (mantissa.contains('.') && frac.is_empty())
        {
            return None;
        }
        let mut exp: i64 = match exp_part {
            None => 0,
            Some(e) => {
                let e = e.strip_prefix('+').unwrap_or(e);
                let (neg, digits) = match e.strip_prefix('-') {
                    Some(d) => (true, d),
                    None => (false, e),
                };
                if digits.is_empty()
                    || digits.len() > 6
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return None;
                }
                let v: i64 = digits.parse().ok()?;
                if neg { -v } else { v }
            }
        };
        let mut all = String::with_capacity(int.len() + frac.len());
        all.push_str(int);
        all.push_str(frac);
        exp += int.len() as i64;
        let lead = all.len() - all.trim_start_matches('0').len();
        exp -= lead as i64;
        let digits = all.trim_start_matches('0').trim_end_matches('0');
        if digits.is_empty() {
            return Some(Decimal {
                negative: false,
                digits: "".into(),
                exp: 0,
            });
        }
        Some(Decimal {
            negative,
            digits: digits.into(),
            exp,
        })
    }

    /// Whole seconds, for `Last-Modified` (floor; `None` if negative or absurdly large).
    pub fn whole_seconds(&self) -> Option<u64> {
        if self.negative {
            return None;
        }
        if self.digits.is_empty() || self.exp <= 0 {
            return Some(0);
        }
        if self.exp > 19 {
            return None;
        }
        let n = self.exp as usize;
        let mut s: String = self.digits.chars().take(n).collect();
        while s.len() < n {
            s.push('0');
        }
        s.parse().ok()
    }

    /// Heap bytes this value holds (its digits), for an entry's weight.
    pub fn heap_bytes(&self) -> usize {
        self.digits.len()
    }

    fn cmp_magnitude(&self, other: &Decimal) -> Ordering {
        match (self.digits.is_empty(), other.digits.is_empty()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            _ => {}
        }
        self.exp
            .cmp(&other.exp)
            .then_with(|| self.digits.as_bytes().cmp(other.digits.as_bytes()))
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.negative, other.negative) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => self.cmp_magnitude(other),
            (true, true) => other.cmp_magnitude(self),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> Decimal {
        Decimal::parse(s).unwrap()
    }

    #[test]
    fn exact_where_f64_is_not() {
        // Both round to the same f64.
        let a = "1765182000.4829171";
        let b = "1765182000.48291711";
        assert_eq!(a.parse::<f64>().unwrap(), b.parse::<f64>().unwrap());
        assert!(d(a) < d(b));
        assert_eq!(d("1765182000.482917"), d("1765182000.4829170"));
        assert_eq!(d("1.7e9"), d("1700000000"));
        assert_eq!(d("0.0"), d("-0"));
        assert!(d("-1") < d("0"));
        assert!(d("-2") < d("-1"));
        assert!(d("9.5") < d("10"));
        assert_eq!(d("1765182000.482917").whole_seconds(), Some(1765182000));
        assert_eq!(d("0.5").whole_seconds(), Some(0));
        assert_eq!(d("17e2").whole_seconds(), Some(1700));
    }

    #[test]
    fn rejects_non_numbers() {
        for s in [
            "",
            "-",
            "abc",
            "1.",
            ".5",
            "1e",
            "\"1\"",
            "1.2.3",
            "0x10",
            "1e9999999",
        ] {
            assert!(Decimal::parse(s).is_none(), "{s}");
        }
    }

    proptest! {
        #[test]
        fn order_matches_integers(a in any::<i64>(), b in any::<i64>()) {
            prop_assert_eq!(d(&a.to_string()).cmp(&d(&b.to_string())), a.cmp(&b));
        }

        #[test]
        fn order_matches_microsecond_timestamps(a in 0u64..4_000_000_000_000_000, b in 0u64..4_000_000_000_000_000) {
            let fmt = |v: u64| format!("{}.{:06}", v / 1_000_000, v % 1_000_000);
            prop_assert_eq!(d(&fmt(a)).cmp(&d(&fmt(b))), a.cmp(&b));
        }
    }
}
