//! Settings a reload replaces while requests keep running (SPEC §13).
//!
//! [`Live<T>`] holds the current value of a component's settings; a reload stores a new
//! value, and each request reads whichever value is current when it starts. Readers on paths
//! that wait for the network anyway (upstream requests, the admin API, new connections) call
//! [`Live::load`]: an uncontended read lock and an `Arc` clone, nothing next to an upstream
//! round trip. The cache hit path reads through a [`Local`] copy kept per connection instead,
//! which costs one atomic load while nothing changed.
//!
//! Built on std's `RwLock` rather than a crate such as `arc-swap`: writes happen a few times a
//! day, every hot reader goes through [`Local`], and so the lock-free load `arc-swap` buys would
//! save nothing measurable while adding a dependency.
//!
//! To make a setting of your component live: keep it in a `Live<YourSettings>` (or read it
//! from `proxy.config.load()`), and store the new value in `Proxy::apply_config` (src/reload.rs).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// A value that reloads replace. Readers never block each other; a writer waits for the
/// readers of the moment (they only clone an `Arc`).
#[derive(Debug)]
pub struct Live<T> {
    current: RwLock<Arc<T>>,
    /// Bumped after every store, so [`Local`] copies know when to refresh.
    version: AtomicU64,
}

impl<T> Live<T> {
    pub fn new(value: T) -> Self {
        Live {
            current: RwLock::new(Arc::new(value)),
            version: AtomicU64::new(0),
        }
    }

    /// The current value.
    pub fn load(&self) -> Arc<T> {
        // A panic while holding this lock cannot leave the Arc half-written: keep going.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the value for every reader that starts afterwards.
    pub fn store(&self, value: T) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
        // After the value: a reader that sees the new version finds the new value.
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Changes whenever the value is replaced.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

/// One reader's copy of a [`Live`] value (a connection's): refreshed only when the `Live`
/// changed, so a read costs one atomic load and no reference count.
#[derive(Debug)]
pub struct Local<T> {
    cached: RefCell<Option<(u64, Arc<T>)>>,
}

impl<T> Default for Local<T> {
    fn default() -> Self {
        Local {
            cached: RefCell::new(None),
        }
    }
}

impl<T> Local<T> {
    /// Runs `f` on the current value.
    pub fn with<R>(&self, live: &Live<T>, f: impl FnOnce(&T) -> R) -> R {
        let version = live.version();
        let mut cached = self.cached.borrow_mut();
        match &*cached {
            Some((seen, value)) if *seen == version => f(value),
            _ => {
                // The value may be newer than `version` (a store in between): then the next
                // read sees a newer version and refreshes once more. Never older.
                let value = live.load();
                let out = f(&value);
                *cached = Some((version, value));
                out
            }
        }
    }

    /// A copy of the current value.
    pub fn get(&self, live: &Live<T>) -> T
    where
        T: Copy,
    {
        self.with(live, |v| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_stores_and_local_copies_refresh() {
        let live = Live::new(1u32);
        let local = Local::default();
        assert_eq!(local.get(&live), 1);
        let before = live.load();
        live.store(2);
        assert_eq!(*before, 1, "a value already read stays as it was");
        assert_eq!(*live.load(), 2);
        assert_eq!(local.get(&live), 2);
        live.store(3);
        live.store(4);
        assert_eq!(local.get(&live), 4);
        assert_eq!(local.get(&live), 4);
    }
}
