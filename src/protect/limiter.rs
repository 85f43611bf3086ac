//! The upstream concurrency limit: at most N upstream requests at once, all routes together;
//! a request waits at most the queue timeout for a slot, then is shed.
//!
//! Hand-rolled rather than tower's `ConcurrencyLimit` because SPEC wants a bounded *wait* (not
//! instant shedding) and because the permit must be held until the upstream body ends, not just
//! until headers arrive: the permit moves into the response body ([`crate::body::UpstreamBody`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::IntGauge;

use super::Charge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// No slot freed up within the queue timeout.
#[derive(Debug, thiserror::Error)]
#[error("no upstream slot within the queue timeout")]
pub struct QueueTimeout;

/// Process-wide upstream slot pool.
pub struct Limiter {
    slots: Arc<Semaphore>,
    /// `--upstream-queue-timeout` in nanoseconds (live).
    queue_timeout_ns: AtomicU64,
    /// `--upstream-max-in-flight` as last set; serialises resizes.
    capacity: Mutex<usize>,
    /// Slots a shrink could not take back at once (they were in use): permits dropped while
    /// this is above zero are forgotten instead of returned.
    debt: Arc<AtomicUsize>,
    in_flight: IntGauge,
}

/// One upstream slot; released (and the in-flight gauge lowered) on drop.
#[derive(Debug)]
pub struct UpstreamPermit {
    permit: Option<OwnedSemaphorePermit>,
    debt: Arc<AtomicUsize>,
    in_flight: IntGauge,
}

impl Drop for UpstreamPermit {
    fn drop(&mut self) {
        self.in_flight.dec();
        if self.debt.load(Ordering::Relaxed) > 0
            && self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |d| d.checked_sub(1))
                .is_ok()
            && let Some(permit) = self.permit.take()
        {
            permit.forget();
        }
    }
}

impl Limiter {
    pub fn new(max_in_flight: usize, queue_timeout: Duration, in_flight: IntGauge) -> Self {
        Limiter {
            slots: Arc::new(Semaphore::new(max_in_flight)),
            queue_timeout_ns: AtomicU64::new(nanos(queue_timeout)),
            capacity: Mutex::new(max_in_flight),
            debt: Arc::new(AtomicUsize::new(0)),
            in_flight,
        }
    }

    /// Applies new settings (a reload). A larger limit frees slots at once; a smaller one takes
    /// back free slots at once and the others as the requests holding them finish, so requests
    /// in flight are never cut off.
    pub fn reconfigure(&self, max_in_flight: usize, queue_timeout: Duration) {
        self.queue_timeout_ns
            .store(nanos(queue_timeout), Ordering::Relaxed);
        let mut capacity = self.capacity.lock().unwrap_or_else(PoisonError::into_inner);
        if max_in_flight > *capacity {
            let mut grow = max_in_flight - *capacity;
            // Slots still owed from an earlier shrink are simply no longer owed.
            while grow > 0 {
                let owed = self.debt.load(Ordering::Acquire);
                if owed == 0 {
                    break;
                }
                let pay = owed.min(grow);
                if self
                    .debt
                    .compare_exchange(owed, owed - pay, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    grow -= pay;
                }
            }
            self.slots.add_permits(grow);
        } else if max_in_flight < *capacity {
            let shrink = *capacity - max_in_flight;
            let taken = self.slots.forget_permits(shrink);
            self.debt.fetch_add(shrink - taken, Ordering::AcqRel);
        }
        *capacity = max_in_flight;
    }

    /// Waits up to the queue timeout for a slot for a request charged to `charge`.
    pub async fn acquire(&self, _charge: Charge) -> Result<UpstreamPermit, QueueTimeout> {
        let queue_timeout = Duration::from_nanos(self.queue_timeout_ns.load(Ordering::Relaxed));
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) if queue_timeout.is_zero() => return Err(QueueTimeout),
            Err(_) => {
                match tokio::time::timeout(queue_timeout, self.slots.clone().acquire_owned()).await
                {
                    Ok(Ok(p)) => p,
                    // Timed out, or the semaphore was closed (never happens: we never close it).
                    _ => return Err(QueueTimeout),
                }
            }
        };
        self.in_flight.inc();
        Ok(UpstreamPermit {
            permit: Some(permit),
            debt: self.debt.clone(),
            in_flight: self.in_flight.clone(),
        })
    }

    /// Slots currently free (tests, diagnostics).
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge() -> Charge {
        Charge {
            token: None,
            addr: std::net::Ipv4Addr::LOCALHOST.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_then_sheds() {
        let gauge = IntGauge::new("g", "g").unwrap();
        let l = Limiter::new(1, Duration::from_millis(100), gauge.clone());
        let p = l.acquire(charge()).await.unwrap();
        assert_eq!(gauge.get(), 1);
        let start = tokio::time::Instant::now();
        assert!(l.acquire(charge()).await.is_err());
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        drop(p);
        assert_eq!(gauge.get(), 0);
        let _p = l.acquire(charge()).await.unwrap();
        assert_eq!(l.available(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_freed_in_time_is_taken() {
        let gauge = IntGauge::new("g", "g").unwrap();
        let l = Arc::new(Limiter::new(1, Duration::from_secs(1), gauge));
        let p = l.acquire(charge()).await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(p);
        });
        assert!(l.acquire(charge()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn resizing_keeps_requests_in_flight_and_settles_on_the_new_limit() {
        let gauge = IntGauge::new("g", "g").unwrap();
        let l = Limiter::new(4, Duration::from_millis(10), gauge);
        let mut permits = Vec::new();
        for _ in 0..3 {
            permits.push(l.acquire(charge()).await.unwrap());
        }
        // 4 → 2 with 3 in use: the free one goes now, one more when a holder finishes.
        l.reconfigure(2, Duration::from_millis(10));
        assert_eq!(l.available(), 0);
        permits.pop();
        assert_eq!(l.available(), 0, "the returned slot paid the debt");
        permits.pop();
        assert_eq!(l.available(), 1);
        permits.pop();
        assert_eq!(l.available(), 2);
        // Growing again while in debt pays it first.
        let a = l.acquire(charge()).await.unwrap();
        let b = l.acquire(charge()).await.unwrap();
        l.reconfigure(1, Duration::from_millis(10));
        l.reconfigure(3, Duration::from_millis(10));
        drop(a);
        drop(b);
        assert_eq!(l.available(), 3);
        // The queue timeout is live too: zero sheds at once.
        l.reconfigure(1, Duration::ZERO);
        let _only = l.acquire(charge()).await.unwrap();
        let start = tokio::time::Instant::now();
        assert!(l.acquire(charge()).await.is_err());
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
