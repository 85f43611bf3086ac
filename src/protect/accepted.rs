//! Token scopes the upstream has accepted: a `2xx` or `304` for a request carrying the token
//! since start (SPEC 12). Only those are charged as a scope of their own; every other token counts
//! against its client address, so minting random tokens cannot escape the per-scope cap or the
//! rate limit.
//!
//! Bounded whatever the number of tokens: a fixed table of [`SLOTS`] fingerprints (128 KiB),
//! four-way set-associative, indexed by the scope's low bits. The scope is already a keyed hash
//! (unknown outside the process), so nobody can aim tokens at one set. Collision behaviour: when
//! the four slots of a set are taken, a newly accepted token displaces one of them, and the
//! displaced token counts against its client address again until its next success puts it back.
//! Only tokens the upstream accepted are ever written, so random tokens cannot flush the table.
//! Lock-free: a lookup is four atomic loads.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::auth::Scope;

/// Table size: comfortably more tokens than one gateway serves dashboards.
pub const SLOTS: usize = 16 * 1024;
const WAYS: usize = 4;

/// See the module docs.
pub struct AcceptedTokens {
    slots: Box<[AtomicU64]>,
}

impl Default for AcceptedTokens {
    fn default() -> Self {
        AcceptedTokens {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl AcceptedTokens {
    /// The set (first slot index) and the non-zero fingerprint of `scope`.
    fn locate(scope: Scope) -> (usize, u64) {
        let set = (scope.0 as usize % (SLOTS / WAYS)) * WAYS;
        // The high half: independent of the bits that chose the set. 0 marks an empty slot.
        let fp = ((scope.0 >> 64) as u64).max(1);
        (set, fp)
    }

    fn set(&self, start: usize) -> &[AtomicU64] {
        &self.slots[start..start + WAYS]
    }

    pub fn contains(&self, scope: Scope) -> bool {
        let (set, fp) = Self::locate(scope);
        self.set(set).iter().any(|s| s.load(Relaxed) == fp)
    }

    /// Records that the upstream accepted `scope`'s token.
    pub fn accept(&self, scope: Scope) {
        let (set, fp) = Self::locate(scope);
        let slots = self.set(set);
        if slots.iter().any(|s| s.load(Relaxed) == fp) {
            return;
        }
        for s in slots {
            if s.compare_exchange(0, fp, Relaxed, Relaxed).is_ok() {
                return;
            }
        }
        // Full set: displace a slot chosen by the fingerprint (spreads the displacements).
        slots[(fp as usize >> 3) % WAYS].store(fp, Relaxed);
    }

    /// The upstream refused `scope`'s token: it counts against its address again.
    pub fn forget(&self, scope: Scope) {
        let (set, fp) = Self::locate(scope);
        for s in self.set(set) {
            let _ = s.compare_exchange(fp, 0, Relaxed, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_contains_forget() {
        let t = AcceptedTokens::default();
        let a = Scope(0x1234_5678_9abc_def0_1111_2222_3333_4444);
        assert!(!t.contains(a));
        t.accept(a);
        t.accept(a);
        assert!(t.contains(a));
        assert_eq!(
            t.slots.iter().filter(|s| s.load(Relaxed) != 0).count(),
            1,
            "accepted twice, stored once"
        );
        t.forget(a);
        assert!(!t.contains(a));
    }

    /// Memory is fixed, and the most recently accepted tokens of a set are always present.
    #[test]
    fn bounded_with_displacement() {
        let t = AcceptedTokens::default();
        let size = std::mem::size_of_val(&*t.slots);
        // Ten tokens in one set (same low bits, different high bits).
        let same_set = |i: u128| Scope((i + 1) << 64 | 7);
        for i in 0..10 {
            t.accept(same_set(i));
            assert!(t.contains(same_set(i)));
        }
        let present = (0..10).filter(|&i| t.contains(same_set(i))).count();
        assert!((1..=WAYS).contains(&present), "{present}");
        for i in 0..200_000u128 {
            t.accept(Scope(
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
            ));
        }
        assert_eq!(std::mem::size_of_val(&*t.slots), size);
    }
}
