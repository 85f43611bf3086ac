//! Counting what each client address holds, for resources one client must not take whole
//! (`/cable` tunnels, SPEC 10): a global cap alone lets one client take every slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Holdings per client address (IPv6 by /64, see [`super::address_key`]); only addresses
/// holding something are kept.
#[derive(Debug, Default, Clone)]
pub struct PerAddress {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One unit held by one address, given back when dropped.
#[derive(Debug)]
pub struct AddressHold {
    key: IpAddr,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

fn lock(m: &Mutex<HashMap<IpAddr, usize>>) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
    // Every update is a single complete step: a poisoned map is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PerAddress {
    /// One more unit for `addr`, unless it already holds `cap`.
    pub fn try_take(&self, addr: IpAddr, cap: usize) -> Option<AddressHold> {
        let key = super::address_key(addr);
        let mut held = lock(&self.held);
        let n = held.entry(key).or_insert(0);
        if *n >= cap {
            if *n == 0 {
                held.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(AddressHold {
            key,
            held: self.held.clone(),
        })
    }

    /// Addresses holding something now.
    pub fn addresses(&self) -> usize {
        lock(&self.held).len()
    }
}

impl Drop for AddressHold {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_its_cap_and_gives_back() {
        let p = PerAddress::default();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::2".parse().unwrap();
        let other: IpAddr = "192.0.2.7".parse().unwrap();
        let first = p.try_take(a, 2).unwrap();
        let _second = p.try_take(same_64, 2).unwrap();
        assert!(p.try_take(a, 2).is_none(), "a /64 is one client");
        assert!(p.try_take(other, 2).is_some(), "others are not affected");
        drop(first);
        let _again = p.try_take(a, 2).expect("a tunnel closed frees its unit");
        assert!(p.try_take(other, 0).is_none());
        drop(_again);
        drop(_second);
        assert_eq!(p.addresses(), 0, "addresses holding nothing are forgotten");
    }
}
