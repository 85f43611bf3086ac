//! Single-flight: concurrent requests for one key that need the upstream share one fetch.
//!
//! The fetch runs in its own task, so it survives the first requester hanging up, and every
//! waiter gets the *same* outcome, failures included: a failing fetch does not make each waiter
//! retry the upstream one after another. A flight remembers the generation stamp it started
//! under; a request arriving after an invalidation does not join an older flight (it could
//! return pre-write data) but starts a new one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::CacheKey;

/// A shared handle on one fetch's outcome.
pub type FlightFuture<T> = Shared<BoxFuture<'static, Arc<T>>>;

struct Flight<T, S> {
    id: u64,
    stamp: S,
    outcome: FlightFuture<T>,
}

/// The in-flight map: outcomes of type `T` (the proxy's fetch result), flights told apart by
/// the generation stamp `S` they started under.
pub struct Flights<T, S = crate::invalidation::Stamp> {
    map: Arc<Mutex<HashMap<CacheKey, Flight<T, S>>>>,
    next_id: AtomicU64,
}

impl<T, S> Default for Flights<T, S> {
    fn default() -> Self {
        Flights {
            map: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
        }
    }
}

/// Whether the caller started the fetch or joined one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Waiter,
}

impl<T: Send + Sync + 'static, S: PartialEq + Send + 'static> Flights<T, S> {
    /// Joins the flight for `key` started under `stamp`, or starts `fetch` in a new task.
    /// `on_panic` builds the outcome if the fetch task dies (it never should).
    pub fn join_or_start<F>(
        &self,
        key: CacheKey,
        stamp: S,
        fetch: impl FnOnce() -> F,
        on_panic: fn() -> T,
    ) -> (FlightFuture<T>, Role)
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(&key)
            && f.stamp == stamp
        {
            return (f.outcome.clone(), Role::Waiter);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Boxed: a fetch future is many kilobytes, and the task's cell (and reading its output
        // back) would otherwise copy all of it, several times per miss.
        let fut = Box::pin(fetch());
        let registry = Arc::clone(&self.map);
        let task = tokio::spawn(async move {
            let outcome = Arc::new(fut.await);
            // Leave the map only if this flight is still the registered one for the key.
            let mut map = registry.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&key).is_some_and(|f| f.id == id) {
                map.remove(&key);
            }
            outcome
        });
        let map_on_error = Arc::clone(&self.map);
        let outcome: FlightFuture<T> = async move {
            match task.await {
                Ok(outcome) => outcome,
                Err(_) => {
                    let mut map = map_on_error.lock().unwrap_or_else(|p| p.into_inner());
                    if map.get(&key).is_some_and(|f| f.id == id) {
                        map.remove(&key);
                    }
                    Arc::new(on_panic())
                }
            }
        }
        .boxed()
        .shared();
        map.insert(
            key,
            Flight {
                id,
                stamp,
                outcome: outcome.clone(),
            },
        );
        (outcome, Role::Leader)
    }

    /// Whether a fetch for `key` is running (tests, diagnostics).
    pub fn in_flight(&self, key: &CacheKey) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn key(scope: u128) -> CacheKey {
        CacheKey {
            account: 1,
            conversation: 2,
            scope: Scope(scope),
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let flights: Arc<Flights<usize, u64>> = Arc::new(Flights::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..50 {
            let flights = flights.clone();
            let runs = runs.clone();
            handles.push(tokio::spawn(async move {
                let (f, role) = flights.join_or_start(
                    key(1),
                    0,
                    || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        7usize
                    },
                    || 0,
                );
                (*f.await, role)
            }));
        }
        let mut leaders = 0;
        for h in handles {
            let (v, role) = h.await.unwrap();
            assert_eq!(v, 7);
            leaders += usize::from(role == Role::Leader);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        assert!(!flights.in_flight(&key(1)));
    }

    #[tokio::test]
    async fn scopes_and_stamps_do_not_share() {
        let flights: Flights<u32, u64> = Flights::default();
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            1
        };
        let (_a, ra) = flights.join_or_start(key(1), 0, slow, || 0);
        let (_b, rb) = flights.join_or_start(key(2), 0, slow, || 0);
        let (_c, rc) = flights.join_or_start(key(1), 1, slow, || 0);
        assert_eq!((ra, rb, rc), (Role::Leader, Role::Leader, Role::Leader));
    }

    #[tokio::test]
    async fn fetch_survives_the_leader_going_away() {
        let flights: Flights<u32, u64> = Flights::default();
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let (f, _) = flights.join_or_start(
            key(1),
            0,
            move || async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                d.fetch_add(1, Ordering::SeqCst);
                5
            },
            || 0,
        );
        drop(f);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}
