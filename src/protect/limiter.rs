//! The upstream concurrency limit: at most N upstream requests at once, all routes together;
//! a request waits at most the queue timeout for a slot, then is shed.
//!
//! Hand-rolled rather than tower's `ConcurrencyLimit` because SPEC wants a bounded *wait* (not
//! instant shedding) and because the permit must be held until the upstream body ends, not just
//! until headers arrive: the permit moves into the response body ([`crate::body::UpstreamBody`]).

use std::sync::Arc;
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
    queue_timeout: Duration,
    in_flight: IntGauge,
}

/// One upstream slot; released (and the in-flight gauge lowered) on drop.
#[derive(Debug)]
pub struct UpstreamPermit {
    _permit: OwnedSemaphorePermit,
    in_flight: IntGauge,
}

impl Drop for UpstreamPermit {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

impl Limiter {
    pub fn new(max_in_flight: usize, queue_timeout: Duration, in_flight: IntGauge) -> Self {
        Limiter {
            slots: Arc::new(Semaphore::new(max_in_flight)),
            queue_timeout,
            in_flight,
        }
    }

    /// Waits up to the queue timeout for a slot for a request charged to `charge`.
    pub async fn acquire(&self, _charge: Charge) -> Result<UpstreamPermit, QueueTimeout> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) if self.queue_timeout.is_zero() => return Err(QueueTimeout),
            Err(_) => {
                match tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(p)) => p,
                    // Timed out, or the semaphore was closed (never happens: we never close it).
                    _ => return Err(QueueTimeout),
                }
            }
        };
        self.in_flight.inc();
        Ok(UpstreamPermit {
            _permit: permit,
            in_flight: self.in_flight.clone(),
        })
    }

    /// Slots currently free (tests, diagnostics).
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
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
}
