//! The upstream concurrency limit (SPEC 6), shared fairly between token scopes (SPEC 12).
//!
//! At most `--upstream-max-in-flight` upstream requests at once, all routes together; a request
//! waits at most `--upstream-queue-timeout` for a slot, then is shed. With a per-scope cap
//! (`--upstream-max-in-flight-per-token`), one scope — a token, or a client address for requests
//! without an accepted token ([`Key`]) — holds at most that many slots, and the wait for a slot is
//! fair between scopes:
//!
//! - every scope has its own FIFO queue of waiters;
//! - the scopes that have a waiter allowed to run (below their cap) stand in a ring; a freed slot
//!   goes to the first waiter of the scope at the front of the ring, and that scope goes to the
//!   back of the ring if it still has a runnable waiter.
//!
//! That is deficit round-robin with a quantum of one request, every request costing one slot:
//! with equal costs the deficit counters are always 0 or 1 and DRR reduces to plain round-robin
//! over the backlogged queues, so no counter is kept. A scope at its cap leaves the ring until one
//! of its own slots is released: it cannot take the slots other scopes wait for, and it is shed
//! with reason `token_quota` when its wait ends.
//!
//! With the cap off (0) every request shares one queue: first come, first served, as SPEC 6 alone
//! describes.
//!
//! Hand-rolled rather than tower's `ConcurrencyLimit`: SPEC wants a bounded *wait* (not instant
//! shedding), fairness between scopes, and the permit held until the upstream body ends, not just
//! until headers arrive (the permit moves into the response body, [`crate::body::UpstreamBody`]).
//! The state is one mutex: it is taken once per upstream request (and once per release), never on
//! a cache hit, and holds it for a few map operations.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::oneshot;

use crate::auth::Scope;

/// What a fair share is computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// A token the upstream has accepted.
    Token(Scope),
    /// A client address: requests without a token, or with one the upstream has not accepted.
    Addr(IpAddr),
    /// Everything, when per-scope caps are off.
    All,
}

/// Why no slot was granted in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shed {
    /// The wait ended while slots were taken by other scopes (`queue_timeout`).
    #[error("no upstream slot within the queue timeout")]
    QueueTimeout,
    /// The wait ended while the scope held its whole share (`token_quota`).
    #[error("the scope holds its whole share of upstream slots")]
    TokenQuota,
}

/// Process-wide upstream slot pool.
pub struct Limiter {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// `--upstream-queue-timeout` in nanoseconds (live: a reload changes it).
    queue_timeout_ns: AtomicU64,
    in_flight: IntGauge,
}

struct State {
    capacity: usize,
    /// Slots one scope may hold; `usize::MAX` when caps are off.
    per_scope: usize,
    /// Caps off: every request is [`Key::All`].
    fair: bool,
    in_use: usize,
    /// Scopes with a request in flight or waiting; nothing else (bounded by the requests).
    scopes: HashMap<Key, ScopeState>,
    /// Scopes with a runnable waiter, in round-robin order.
    ring: VecDeque<Key>,
    next_id: u64,
}

#[derive(Default)]
struct ScopeState {
    in_flight: usize,
    waiters: VecDeque<Waiter>,
    /// Standing in the ring (at most once).
    in_ring: bool,
}

struct Waiter {
    id: u64,
    wake: oneshot::Sender<()>,
}

/// One upstream slot; released (and the next waiter served) on drop.
pub struct UpstreamPermit {
    shared: Arc<Shared>,
    key: Key,
}

impl std::fmt::Debug for UpstreamPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamPermit")
    }
}

impl Drop for UpstreamPermit {
    fn drop(&mut self) {
        self.shared.release(self.key);
    }
}

impl Shared {
    fn queue_timeout(&self) -> Duration {
        Duration::from_nanos(self.queue_timeout_ns.load(Ordering::Relaxed))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update keeps the state consistent between statements that cannot panic, so a
        // poisoned lock (a panic elsewhere while holding it) is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, key: Key) {
        let mut st = self.lock();
        st.in_use = st.in_use.saturating_sub(1);
        let per_scope = st.per_scope;
        let mut requeue = false;
        if let Some(s) = st.scopes.get_mut(&key) {
            s.in_flight = s.in_flight.saturating_sub(1);
            if !s.waiters.is_empty() && !s.in_ring && s.in_flight < per_scope {
                s.in_ring = true;
                requeue = true;
            }
        }
        if requeue {
            st.ring.push_back(key);
        }
        st.collect(key);
        st.dispatch();
        self.in_flight.set(st.in_use as i64);
    }
}

impl State {
    /// Hands free slots to waiters, round-robin over the scopes in the ring.
    fn dispatch(&mut self) {
        while self.in_use < self.capacity {
            let Some(key) = self.ring.pop_front() else {
                return;
            };
            let per_scope = self.per_scope;
            let Some(s) = self.scopes.get_mut(&key) else {
                continue;
            };
            s.in_ring = false;
            if s.in_flight >= per_scope {
                continue;
            }
            let Some(w) = s.waiters.pop_front() else {
                self.collect(key);
                continue;
            };
            // Granted whether or not the waiter still listens: a waiter that went away finds
            // itself out of the queue and releases the slot (see `Waiting::drop`).
            let _ = w.wake.send(());
            s.in_flight += 1;
            self.in_use += 1;
            if !s.waiters.is_empty() && s.in_flight < per_scope {
                s.in_ring = true;
                self.ring.push_back(key);
            }
        }
    }

    /// Forgets a scope with nothing in flight or waiting, so the map holds only active scopes.
    fn collect(&mut self, key: Key) {
        if let Some(s) = self.scopes.get(&key)
            && s.in_flight == 0
            && s.waiters.is_empty()
            && !s.in_ring
        {
            self.scopes.remove(&key);
            // After a burst of many scopes, give the memory back.
            if self.scopes.capacity() > 1024 && self.scopes.capacity() > 4 * self.scopes.len() {
                self.scopes.shrink_to(2 * self.scopes.len());
            }
        }
    }

    fn scope_in_flight(&self, key: &Key) -> usize {
        self.scopes.get(key).map_or(0, |s| s.in_flight)
    }

    /// Takes a slot at once if one is free for `key` and nobody of its scope waits before it.
    fn try_take(&mut self, key: Key, keep_free: usize) -> bool {
        if self.in_use + keep_free >= self.capacity || !self.ring.is_empty() {
            return false;
        }
        let per_scope = self.per_scope;
        let s = self.scopes.entry(key).or_default();
        if s.in_flight >= per_scope || !s.waiters.is_empty() {
            self.collect(key);
            return false;
        }
        s.in_flight += 1;
        self.in_use += 1;
        true
    }

    /// Removes a waiter that gave up; false if it had already been granted a slot.
    fn remove_waiter(&mut self, key: Key, id: u64) -> bool {
        let Some(s) = self.scopes.get_mut(&key) else {
            return false;
        };
        let Some(pos) = s.waiters.iter().position(|w| w.id == id) else {
            return false;
        };
        s.waiters.remove(pos);
        // A ring entry without waiters is skipped (and the scope collected) by `dispatch`.
        self.collect(key);
        true
    }

    /// `token_quota` when the scope's own cap held it back; a cap as large as the whole limit
    /// (e.g. 1 of 1) is the global limit, reported as such.
    fn shed_reason(&self, key: &Key) -> Shed {
        if self.fair
            && self.per_scope < self.capacity
            && self.scope_in_flight(key) >= self.per_scope
        {
            Shed::TokenQuota
        } else {
            Shed::QueueTimeout
        }
    }
}

/// A request waiting for a slot. Dropped before it settles (the request was cancelled), it
/// leaves the queue, or releases the slot it was granted meanwhile.
struct Waiting<'a> {
    shared: &'a Arc<Shared>,
    key: Key,
    id: u64,
    settled: bool,
}

impl Waiting<'_> {
    /// Settles the wait under the lock: a grant may race the deadline, so the queue decides.
    fn settle(mut self) -> Result<UpstreamPermit, Shed> {
        self.settled = true;
        let mut st = self.shared.lock();
        if st.remove_waiter(self.key, self.id) {
            return Err(st.shed_reason(&self.key));
        }
        drop(st);
        Ok(UpstreamPermit {
            shared: self.shared.clone(),
            key: self.key,
        })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut st = self.shared.lock();
        if st.remove_waiter(self.key, self.id) {
            return;
        }
        drop(st);
        self.shared.release(self.key);
    }
}

impl Limiter {
    /// `per_scope` 0 turns per-scope caps (and round-robin between scopes) off.
    pub fn new(
        max_in_flight: usize,
        per_scope: usize,
        queue_timeout: Duration,
        in_flight: IntGauge,
    ) -> Self {
        Limiter {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    capacity: max_in_flight,
                    per_scope: cap(per_scope),
                    fair: per_scope != 0,
                    in_use: 0,
                    scopes: HashMap::new(),
                    ring: VecDeque::new(),
                    next_id: 0,
                }),
                queue_timeout_ns: AtomicU64::new(nanos(queue_timeout)),
                in_flight,
            }),
        }
    }

    /// Applies new settings (a reload). A larger limit or cap serves waiting requests at once;
    /// a smaller one takes effect as the requests holding slots finish, so requests in flight
    /// are never cut off. Turning caps on or off applies to requests that arrive afterwards
    /// (requests already queued finish in the queue they are in).
    pub fn reconfigure(&self, max_in_flight: usize, per_scope: usize, queue_timeout: Duration) {
        self.shared
            .queue_timeout_ns
            .store(nanos(queue_timeout), Ordering::Relaxed);
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        st.capacity = max_in_flight;
        st.per_scope = cap(per_scope);
        st.fair = per_scope != 0;
        // Scopes held back by the old cap may run now.
        for (key, s) in st.scopes.iter_mut() {
            if !s.waiters.is_empty() && !s.in_ring && s.in_flight < st.per_scope {
                s.in_ring = true;
                st.ring.push_back(*key);
            }
        }
        st.dispatch();
        self.shared.in_flight.set(st.in_use as i64);
    }

    fn effective(&self, st: &State, key: Key) -> Key {
        if st.fair { key } else { Key::All }
    }

    fn permit(&self, key: Key) -> UpstreamPermit {
        UpstreamPermit {
            shared: self.shared.clone(),
            key,
        }
    }

    /// Waits up to the queue timeout for a slot for `key`'s scope.
    pub async fn acquire(&self, key: Key) -> Result<UpstreamPermit, Shed> {
        let (key, id, rx) = {
            let mut st = self.shared.lock();
            let key = self.effective(&st, key);
            if st.try_take(key, 0) {
                self.shared.in_flight.set(st.in_use as i64);
                return Ok(self.permit(key));
            }
            if self.shared.queue_timeout().is_zero() {
                return Err(st.shed_reason(&key));
            }
            let id = st.next_id;
            st.next_id += 1;
            let (tx, rx) = oneshot::channel();
            let per_scope = st.per_scope;
            let s = st.scopes.entry(key).or_default();
            s.waiters.push_back(Waiter { id, wake: tx });
            let runnable = !s.in_ring && s.in_flight < per_scope;
            if runnable {
                s.in_ring = true;
                st.ring.push_back(key);
            }
            (key, id, rx)
        };
        let waiting = Waiting {
            shared: &self.shared,
            key,
            id,
            settled: false,
        };
        // Woken or not, the queue decides whether this request got its slot.
        let _ = tokio::time::timeout(self.shared.queue_timeout(), rx).await;
        waiting.settle()
    }

    /// A slot for work that must yield to client requests (refresh-ahead, SPEC 12): granted
    /// only at once, only while nobody waits, only below its scope's cap, and never one of the
    /// last quarter of the slots (rounded up, so a limit of 1-4 slots keeps 1 free).
    pub fn try_acquire_background(&self, key: Key) -> Option<UpstreamPermit> {
        let mut st = self.shared.lock();
        let key = self.effective(&st, key);
        let keep_free = st.capacity.div_ceil(4);
        if !st.try_take(key, keep_free) {
            return None;
        }
        self.shared.in_flight.set(st.in_use as i64);
        Some(self.permit(key))
    }

    /// Slots currently free (tests, diagnostics).
    pub fn available(&self) -> usize {
        let st = self.shared.lock();
        st.capacity.saturating_sub(st.in_use)
    }

    /// Requests waiting for a slot (tests, diagnostics).
    pub fn waiting(&self) -> usize {
        self.shared
            .lock()
            .scopes
            .values()
            .map(|s| s.waiters.len())
            .sum()
    }

    /// Scopes with a request in flight or waiting (tests: the state stays bounded).
    pub fn active_scopes(&self) -> usize {
        self.shared.lock().scopes.len()
    }
}

/// The per-scope cap as the state keeps it: 0 (off) is no cap at all.
fn cap(per_scope: usize) -> usize {
    if per_scope == 0 {
        usize::MAX
    } else {
        per_scope
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn gauge() -> IntGauge {
        IntGauge::new("g", "g").unwrap()
    }

    fn token(n: u128) -> Key {
        Key::Token(Scope(n))
    }

    #[tokio::test(start_paused = true)]
    async fn waits_then_sheds() {
        let gauge = gauge();
        let l = Limiter::new(1, 0, Duration::from_millis(100), gauge.clone());
        let p = l.acquire(token(1)).await.unwrap();
        assert_eq!(gauge.get(), 1);
        let start = tokio::time::Instant::now();
        assert_eq!(l.acquire(token(2)).await.unwrap_err(), Shed::QueueTimeout);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        drop(p);
        assert_eq!(gauge.get(), 0);
        let _p = l.acquire(token(1)).await.unwrap();
        assert_eq!(l.available(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_freed_in_time_is_taken() {
        let l = Arc::new(Limiter::new(1, 1, Duration::from_secs(1), gauge()));
        let p = l.acquire(token(1)).await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(p);
        });
        let p = l.acquire(token(2)).await.unwrap();
        assert_eq!(l.active_scopes(), 1, "the first scope, idle, is forgotten");
        drop(p);
        assert_eq!(l.active_scopes(), 0);
    }

    /// A scope at its cap waits (and is shed as `token_quota`) while other scopes still get
    /// free slots at once.
    #[tokio::test(start_paused = true)]
    async fn a_scope_at_its_cap_waits_while_others_pass() {
        let l = Limiter::new(4, 2, Duration::from_millis(100), gauge());
        let _a1 = l.acquire(token(1)).await.unwrap();
        let _a2 = l.acquire(token(1)).await.unwrap();
        assert_eq!(l.acquire(token(1)).await.unwrap_err(), Shed::TokenQuota);
        let _b = l.acquire(token(2)).await.unwrap();
        let _c = l.acquire(Key::Addr([10, 0, 0, 1].into())).await.unwrap();
        assert_eq!(l.available(), 0);
        // Global slots are all taken by scopes below their caps: a plain queue timeout.
        assert_eq!(l.acquire(token(3)).await.unwrap_err(), Shed::QueueTimeout);
    }

    /// Freed slots go round-robin over the waiting scopes, first come first served within one:
    /// a scope with many waiters queued first does not get them all before the others.
    #[tokio::test(start_paused = true)]
    async fn freed_slots_go_round_robin_fifo_within_a_scope() {
        let l = Arc::new(Limiter::new(1, 1, Duration::from_secs(60), gauge()));
        let first = l.acquire(token(9)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Scope 1 queues three requests, then scopes 2 and 3 one each.
        for (scope, n) in [(1u128, 0usize), (1, 1), (1, 2), (2, 0), (3, 0)] {
            let (l, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = l.acquire(token(scope)).await.unwrap();
                order.lock().unwrap().push((scope, n));
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(p);
            }));
            tokio::task::yield_now().await;
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec![(1, 0), (2, 0), (3, 0), (1, 1), (1, 2)]
        );
        assert_eq!(l.active_scopes(), 0, "idle scopes are forgotten");
    }

    /// With caps off, one FIFO queue whatever the scope.
    #[tokio::test(start_paused = true)]
    async fn caps_off_is_one_fifo_queue() {
        let l = Arc::new(Limiter::new(1, 0, Duration::from_secs(60), gauge()));
        let first = l.acquire(token(9)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for scope in [1u128, 1, 1, 2, 3] {
            let (l, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = l.acquire(token(scope)).await.unwrap();
                order.lock().unwrap().push(scope);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            tokio::task::yield_now().await;
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![1, 1, 1, 2, 3]);
    }

    /// A waiter that goes away leaves the queue, and a slot granted to a waiter that went away
    /// is released: nothing leaks however requests are cancelled.
    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_leak_nothing() {
        let gauge = gauge();
        let l = Arc::new(Limiter::new(2, 2, Duration::from_secs(60), gauge.clone()));
        let done = Arc::new(AtomicUsize::new(0));
        let a = l.acquire(token(1)).await.unwrap();
        let b = l.acquire(token(1)).await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..20 {
            let (l, done) = (l.clone(), done.clone());
            waiters.push(tokio::spawn(async move {
                let _p = l.acquire(token(1)).await;
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        tokio::task::yield_now().await;
        // Half the waiters go away while queued; then slots free up with the rest waiting.
        for w in waiters.iter().step_by(2) {
            w.abort();
        }
        drop(a);
        drop(b);
        for w in waiters {
            let _ = w.await;
        }
        assert_eq!(done.load(Ordering::SeqCst), 10);
        assert_eq!(l.available(), 2);
        assert_eq!(gauge.get(), 0);
        assert_eq!(l.active_scopes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn resizing_keeps_requests_in_flight_and_settles_on_the_new_limit() {
        let l = Limiter::new(4, 0, Duration::from_millis(10), gauge());
        let mut permits = Vec::new();
        for _ in 0..3 {
            permits.push(l.acquire(token(1)).await.unwrap());
        }
        // 4 → 2 with 3 in use: nothing is cut off; slots free up as holders finish.
        l.reconfigure(2, 0, Duration::from_millis(10));
        assert_eq!(l.available(), 0);
        permits.pop();
        assert_eq!(l.available(), 0, "still one over the new limit");
        permits.pop();
        assert_eq!(l.available(), 1);
        permits.pop();
        assert_eq!(l.available(), 2);
        // The queue timeout is live too: zero sheds at once.
        l.reconfigure(1, 0, Duration::ZERO);
        let _only = l.acquire(token(1)).await.unwrap();
        let start = tokio::time::Instant::now();
        assert!(l.acquire(token(1)).await.is_err());
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// Raising the per-scope cap lets a scope's queued requests run at once.
    #[tokio::test(start_paused = true)]
    async fn a_raised_cap_serves_the_queue_at_once() {
        let l = Arc::new(Limiter::new(4, 1, Duration::from_secs(60), gauge()));
        let _held = l.acquire(token(1)).await.unwrap();
        let l2 = l.clone();
        let queued = tokio::spawn(async move { l2.acquire(token(1)).await.is_ok() });
        tokio::task::yield_now().await;
        assert_eq!(l.waiting(), 1);
        l.reconfigure(4, 2, Duration::from_secs(60));
        assert!(queued.await.unwrap());
    }

    /// Background work takes a slot only at once, never one of the last quarter, and never
    /// beyond its scope's cap. (Nobody waits while slots are free: waiting requests are served
    /// before any slot counts as free.)
    #[tokio::test(start_paused = true)]
    async fn background_never_takes_the_last_quarter() {
        let l = Limiter::new(8, 8, Duration::from_secs(60), gauge());
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(l.try_acquire_background(token(1)).expect("below 3/4"));
        }
        assert!(
            l.try_acquire_background(token(2)).is_none(),
            "2 of 8 stay free"
        );
        held.push(l.acquire(token(2)).await.unwrap());
        held.push(l.acquire(token(2)).await.unwrap());
        assert_eq!(
            l.available(),
            0,
            "client requests may take the last quarter"
        );
        held.truncate(5);
        held.push(l.try_acquire_background(token(2)).expect("6 of 8"));
        assert!(l.try_acquire_background(token(2)).is_none());
        let l = Limiter::new(4, 1, Duration::from_secs(60), gauge());
        let _p = l.acquire(token(1)).await.unwrap();
        assert!(
            l.try_acquire_background(token(1)).is_none(),
            "scope at its cap"
        );
        assert!(l.try_acquire_background(token(2)).is_some());
        let one = Limiter::new(1, 0, Duration::from_secs(60), gauge());
        assert!(one.try_acquire_background(token(1)).is_none());
    }
}
