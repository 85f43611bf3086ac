//! The invalidation bus: one Redis pub/sub channel on which every replica announces the
//! invalidations it makes, and applies the others' to its L1.
//!
//! A message is text: the sender's instance id (hex), then the target:
//! `c {account} {conversation}`, `a {account}`, `s {scope hex}` or `g`. A replica skips its own
//! messages (it applied them before publishing). Anything that does not parse is ignored:
//! whoever can publish on the channel can at most cause misses.

use crate::auth::Scope;
use crate::invalidation::Target;

/// Formats the bus message for `target` sent by instance `origin`.
pub fn message(origin: u64, target: Target) -> String {
    match target {
        Target::Conversation {
            account,
            conversation,
        } => format!("{origin:016x} c {account} {conversation}"),
        Target::Account(account) => format!("{origin:016x} a {account}"),
        Target::Scope(scope) => format!("{origin:016x} s {:032x}", scope.0),
        Target::All => format!("{origin:016x} g"),
    }
}

/// Parses a bus message into (origin, target).
pub fn parse(payload: &[u8]) -> Option<(u64, Target)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.split(' ');
    let origin = u64::from_str_radix(parts.next()?, 16).ok()?;
    let target = match parts.next()? {
        "c" => Target::Conversation {
            account: parts.next()?.parse().ok()?,
            conversation: parts.next()?.parse().ok()?,
        },
        "a" => Target::Account(parts.next()?.parse().ok()?),
        "s" => Target::Scope(Scope(u128::from_str_radix(parts.next()?, 16).ok()?)),
        "g" => Target::All,
        _ => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((origin, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for target in [
            Target::Conversation {
                account: 1,
                conversation: u64::MAX,
            },
            Target::Account(7),
            Target::Scope(Scope(u128::MAX - 5)),
            Target::All,
        ] {
            let m = message(0xabc, target);
            assert_eq!(parse(m.as_bytes()), Some((0xabc, target)), "{m}");
        }
    }

    #[test]
    fn garbage_is_ignored() {
        for bad in [
            &b""[..],
            b"zz c 1 2",
            b"00 c 1",
            b"00 c 1 2 3",
            b"00 x",
            b"00 a -1",
            b"00 s nothex",
            b"\xff\xfe",
            b"00 a 99999999999999999999999",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
