//! Circuit breaker: Closed → Open → HalfOpen (SPEC §6).
//!
//! - **Closed**: completions are counted in a sliding window (`--breaker-window`, in 10 buckets).
//!   Once at least `--breaker-min-requests` completed and the failure share reaches
//!   `--breaker-failure-ratio`, it opens.
//! - **Open** for `--breaker-open` (or an upstream `Retry-After`, whichever is longer): every
//!   request is rejected locally with the time left.
//! - **HalfOpen**: exactly one request (the probe) goes through. Success closes the breaker;
//!   failure reopens it for twice the previous period, up to 60 s. Only the upstream decides a
//!   probe: the caller runs it to completion even when its client goes away (see
//!   [`crate::upstream::Upstream::send`]), and a probe whose outcome never arrives is not
//!   counted, so clients cannot keep the breaker open by abandoning probes.
//!
//! A `429` ([`Outcome::Throttled`]) is Chatwoot throttling one client, not an unhealthy
//! upstream: it is not counted in the window at all (neither a failure that one throttled
//! client could open the breaker with, nor a success that would hide everyone else's
//! failures), and as a probe's answer it closes the breaker — the application answered.
//!
//! Completions that were admitted before the breaker opened are ignored once it has (their
//! [`Ticket`] carries the epoch they were admitted in), so late stragglers cannot close it.
//! Time is `tokio::time::Instant`, so tests run on paused time.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::time::Instant;

use crate::live::Live;

/// The longest open period while probes keep failing.
pub const MAX_OPEN: Duration = Duration::from_secs(60);
const BUCKETS: usize = 10;

/// Breaker settings.
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    pub window: Duration,
    pub min_requests: u32,
    pub failure_ratio: f64,
    pub open: Duration,
}

/// The state, as exported by `chatwoot_cache_breaker_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

/// How an upstream exchange ended, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Connect error, timeout, garbage, 500/502/503/504. `retry_after` from a 503.
    Failure {
        retry_after: Option<Duration>,
    },
    /// A `429`: the upstream is up and throttling one client (SPEC §6).
    Throttled,
}

/// Whether a request may go upstream.
#[derive(Debug)]
pub enum Admission {
    Allowed(Ticket),
    /// Rejected locally; the upstream is open for `retry_after` more.
    Rejected {
        retry_after: Duration,
    },
}

/// Proof of admission; report the outcome with [`Breaker::record`].
///
/// A probe ticket dropped without a result (shed while queueing, or its exchange cancelled)
/// is not counted: it frees the probe slot for the next request. It is never a failure, or a
/// client hanging up could keep the breaker open; the caller runs sent probes to completion
/// so that impatient clients cannot turn every request into a probe either.
#[derive(Debug)]
pub struct Ticket {
    epoch: u64,
    probe: bool,
    recorded: bool,
    breaker: Option<std::sync::Weak<Breaker>>,
}

impl Ticket {
    /// Whether this request is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.probe
            && !self.recorded
            && let Some(b) = self.breaker.take().and_then(|w| w.upgrade())
        {
            b.release_probe(self.epoch);
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    start: Option<Instant>,
    total: u32,
    failures: u32,
}

#[derive(Debug)]
enum State {
    Closed,
    Open { until: Instant, period: Duration },
    HalfOpen { probing: bool, period: Duration },
}

#[derive(Debug)]
struct Inner {
    state: State,
    epoch: u64,
    buckets: [Bucket; BUCKETS],
}

/// The breaker. Shared as `Arc<Breaker>`; cheap uncontended mutex on each admission.
#[derive(Debug)]
pub struct Breaker {
    /// Live: a reload replaces it; state and counts are kept.
    cfg: Live<BreakerConfig>,
    /// Incremented each time the breaker closes after having been open: "the upstream
    /// recovered". Lets per-key failure backoffs end at once on recovery.
    recoveries: std::sync::atomic::AtomicU64,
    inner: Mutex<Inner>,
    gauge: IntGauge,
    me: std::sync::Weak<Breaker>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig, gauge: IntGauge) -> std::sync::Arc<Self> {
        gauge.set(BreakerState::Closed as i64);
        std::sync::Arc::new_cyclic(|me| Breaker {
            cfg: Live::new(cfg),
            recoveries: std::sync::atomic::AtomicU64::new(0),
            inner: Mutex::new(Inner {
                state: State::Closed,
                epoch: 0,
                buckets: [Bucket::default(); BUCKETS],
            }),
            gauge,
            me: me.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the state half-written (every update is a
        // single assignment), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        match self.lock().state {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Decides whether one request may go upstream now.
    pub fn admit(&self) -> Admission {
        self.admit_for(true)
    }

    /// [`Breaker::admit`] for a request that may or may not become the half-open probe. A
    /// request whose client is still uploading its body may not: the probe's answer would wait
    /// on the client (a legal 500 B/s upload of 12 KB holds a probe for 24 s, every other
    /// request refused meanwhile), and only the upstream may decide a probe (SPEC 6). Such a
    /// request is refused while a probe is due, as while one is out.
    pub fn admit_for(&self, may_probe: bool) -> Admission {
        let now = Instant::now();
        let mut inner = self.lock();
        let epoch = inner.epoch;
        match inner.state {
            State::Closed => Admission::Allowed(self.ticket(epoch, false)),
            // Open or half-open: only a probe may go, and this request may not be it.
            _ if !may_probe => Admission::Rejected {
                retry_after: match inner.state {
                    State::Open { until, .. } if until > now => until - now,
                    _ => Duration::from_secs(1),
                },
            },
            State::Open { until, period } if now >= until => {
                inner.state = State::HalfOpen {
                    probing: true,
                    period,
                };
                self.gauge.set(BreakerState::HalfOpen as i64);
                Admission::Allowed(self.ticket(epoch, true))
            }
            State::Open { until, .. } => Admission::Rejected {
                retry_after: until - now,
            },
            State::HalfOpen {
                probing: false,
                period,
            } => {
                inner.state = State::HalfOpen {
                    probing: true,
                    period,
                };
                Admission::Allowed(self.ticket(epoch, true))
            }
            // A probe is out; its answer decides, typically within a second.
            State::HalfOpen { probing: true, .. } => Admission::Rejected {
                retry_after: Duration::from_secs(1),
            },
        }
    }

    /// Admits a request only while the breaker is closed: background work (refresh-ahead,
    /// SPEC 12) never probes a recovering upstream nor adds to a failing one.
    pub fn admit_if_closed(&self) -> Option<Ticket> {
        let inner = self.lock();
        matches!(inner.state, State::Closed).then(|| self.ticket(inner.epoch, false))
    }

    /// Re-checks an admission after the request waited for an upstream slot. If the breaker
    /// opened (or closed again) while it waited, the old ticket is void: the request is
    /// admitted afresh under the current state (as the probe, if one is due) or rejected.
    /// Without this, requests queued behind the failures that opened the breaker would reach
    /// the upstream while it is open (SPEC §6: while open, only probes).
    pub fn recheck(&self, ticket: Ticket) -> Admission {
        self.recheck_for(ticket, true)
    }

    /// [`Breaker::recheck`] for a request that may or may not become the probe (see
    /// [`Breaker::admit_for`]).
    pub fn recheck_for(&self, ticket: Ticket, may_probe: bool) -> Admission {
        if self.lock().epoch == ticket.epoch {
            return Admission::Allowed(ticket);
        }
        // A void probe ticket frees nothing on drop: `release_probe` checks the epoch.
        drop(ticket);
        self.admit_for(may_probe)
    }

    /// [`Breaker::recheck`] for background work: the ticket stands only while the breaker is
    /// closed in the state that admitted it (or closed afresh); never turned into a probe.
    pub fn recheck_if_closed(&self, ticket: Ticket) -> Option<Ticket> {
        if self.lock().epoch == ticket.epoch {
            return Some(ticket);
        }
        drop(ticket);
        self.admit_if_closed()
    }

    fn ticket(&self, epoch: u64, probe: bool) -> Ticket {
        Ticket {
            epoch,
            probe,
            recorded: false,
            breaker: probe.then(|| self.me.clone()),
        }
    }

    /// Reports how an admitted request ended.
    pub fn record(&self, mut ticket: Ticket, outcome: Outcome) {
        ticket.recorded = true;
        let now = Instant::now();
        let mut inner = self.lock();
        if ticket.epoch != inner.epoch {
            // Admitted under an earlier state; its news is stale — except an upstream
            // `Retry-After` while open, which is a floor on the open period (SPEC §6).
            if let (
                State::Open { until, period },
                Outcome::Failure {
                    retry_after: Some(ra),
                },
            ) = (&inner.state, outcome)
            {
                let floor = now + ra;
                if floor > *until {
                    inner.state = State::Open {
                        until: floor,
                        period: *period,
                    };
                }
            }
            return;
        }
        match (&inner.state, ticket.probe) {
            (State::HalfOpen { period, .. }, true) => {
                let period = *period;
                match outcome {
                    Outcome::Success | Outcome::Throttled => self.close(&mut inner),
                    Outcome::Failure { retry_after } => {
                        let next = (period * 2).min(MAX_OPEN);
                        self.open(&mut inner, now, next, retry_after);
                    }
                }
            }
            // One client's throttling says nothing about the upstream's health.
            (State::Closed, false) if outcome == Outcome::Throttled => {}
            (State::Closed, false) => {
                let failed = matches!(outcome, Outcome::Failure { .. });
                let bucket = self.bucket(&mut inner, now);
                bucket.total += 1;
                bucket.failures += u32::from(failed);
                if failed {
                    let (total, failures) = self.window_counts(&inner, now);
                    let cfg = self.cfg.load();
                    if total >= cfg.min_requests
                        && f64::from(failures) >= cfg.failure_ratio * f64::from(total)
                    {
                        let retry_after = match outcome {
                            Outcome::Failure { retry_after } => retry_after,
                            Outcome::Success | Outcome::Throttled => None,
                        };
                        self.open(&mut inner, now, cfg.open, retry_after);
                    }
                }
            }
            _ => {}
        }
    }

    fn release_probe(&self, epoch: u64) {
        let mut inner = self.lock();
        if inner.epoch == epoch
            && let State::HalfOpen { period, .. } = inner.state
        {
            inner.state = State::HalfOpen {
                probing: false,
                period,
            };
        }
    }

    fn open(
        &self,
        inner: &mut Inner,
        now: Instant,
        period: Duration,
        retry_after: Option<Duration>,
    ) {
        let hold = retry_after.map_or(period, |r| r.max(period));
        inner.state = State::Open {
            until: now + hold,
            period,
        };
        inner.epoch += 1;
        self.gauge.set(BreakerState::Open as i64);
        tracing::warn!(
            open_for_ms = hold.as_millis() as u64,
            "circuit breaker opened"
        );
    }

    /// New settings (a reload): they apply from the next completion on; the state and the
    /// window's counts are kept.
    pub fn reconfigure(&self, cfg: BreakerConfig) {
        self.cfg.store(cfg);
    }

    /// How many times the breaker has closed after being open.
    pub fn recoveries(&self) -> u64 {
        self.recoveries.load(std::sync::atomic::Ordering::Acquire)
    }

    fn close(&self, inner: &mut Inner) {
        self.recoveries
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        inner.state = State::Closed;
        inner.epoch += 1;
        inner.buckets = [Bucket::default(); BUCKETS];
        self.gauge.set(BreakerState::Closed as i64);
        tracing::info!("circuit breaker closed");
    }

    fn bucket_len(&self) -> Duration {
        (self.cfg.load().window / BUCKETS as u32).max(Duration::from_millis(1))
    }

    /// The bucket for `now`, recycled if it belongs to an older turn of the ring.
    fn bucket<'a>(&self, inner: &'a mut Inner, now: Instant) -> &'a mut Bucket {
        let len = self.bucket_len();
        let slot_start = |t: Instant| -> (usize, u128) {
            // Position in an absolute bucket sequence, measured from a fixed origin.
            let n = t.elapsed_since_origin().as_nanos() / len.as_nanos();
            ((n % BUCKETS as u128) as usize, n)
        };
        let (idx, n) = slot_start(now);
        let b = &mut inner.buckets[idx];
        let current = b.start.map(|s| slot_start(s).1 == n).unwrap_or(false);
        if !current {
            *b = Bucket {
                start: Some(now),
                total: 0,
                failures: 0,
            };
        }
        b
    }

    fn window_counts(&self, inner: &Inner, now: Instant) -> (u32, u32) {
        let window = self.cfg.load().window;
        inner
            .buckets
            .iter()
            .filter(|b| {
                b.start
                    .is_some_and(|s| now.saturating_duration_since(s) < window)
            })
            .fold((0, 0), |(t, f), b| (t + b.total, f + b.failures))
    }
}

/// A fixed origin for bucket arithmetic (tokio's `Instant` has no epoch).
trait SinceOrigin {
    fn elapsed_since_origin(&self) -> Duration;
}

impl SinceOrigin for Instant {
    fn elapsed_since_origin(&self) -> Duration {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let origin = *ORIGIN.get_or_init(|| {
            std::time::Instant::now()
                .checked_sub(Duration::from_secs(3600))
                .unwrap_or_else(std::time::Instant::now)
        });
        self.into_std().saturating_duration_since(origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn breaker(min: u32) -> Arc<Breaker> {
        Breaker::new(
            BreakerConfig {
                window: Duration::from_secs(10),
                min_requests: min,
                failure_ratio: 0.5,
                open: Duration::from_secs(5),
            },
            IntGauge::new("b", "b").unwrap(),
        )
    }

    fn run(b: &Breaker, outcome: Outcome) -> bool {
        match b.admit() {
            Admission::Allowed(t) => {
                b.record(t, outcome);
                true
            }
            Admission::Rejected { .. } => false,
        }
    }

    const FAIL: Outcome = Outcome::Failure { retry_after: None };

    #[tokio::test(start_paused = true)]
    async fn a_request_still_uploading_never_becomes_the_probe() {
        let b = breaker(1);
        assert!(run(&b, FAIL));
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(6)).await;
        // A probe is due, but not for this request; the next one that may probe gets it.
        assert!(matches!(b.admit_for(false), Admission::Rejected { .. }));
        assert_eq!(b.state(), BreakerState::Open);
        let probe = match b.admit() {
            Admission::Allowed(t) => t,
            other => panic!("{other:?}"),
        };
        assert!(probe.is_probe());
        // While it is out, neither kind goes.
        assert!(matches!(b.admit_for(false), Admission::Rejected { .. }));
        assert!(matches!(b.admit(), Admission::Rejected { .. }));
        b.record(probe, Outcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(matches!(b.admit_for(false), Admission::Allowed(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn opens_only_after_min_requests_and_ratio() {
        let b = breaker(4);
        assert!(run(&b, FAIL));
        assert!(run(&b, FAIL));
        assert!(run(&b, FAIL));
        assert_eq!(b.state(), BreakerState::Closed, "below min requests");
        assert!(run(&b, FAIL));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.gauge.get(), 2);
        match b.admit() {
            Admission::Rejected { retry_after } => assert_eq!(retry_after, Duration::from_secs(5)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn successes_keep_it_closed() {
        let b = breaker(4);
        for _ in 0..10 {
            assert!(run(&b, Outcome::Success));
            assert!(run(&b, Outcome::Success));
            assert!(run(&b, FAIL));
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_leave_the_window() {
        let b = breaker(4);
        for _ in 0..3 {
            run(&b, FAIL);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        run(&b, FAIL);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_then_backoff_doubles_to_sixty() {
        let b = breaker(1);
        run(&b, FAIL);
        let mut expected = Duration::from_secs(5);
        for _ in 0..6 {
            assert_eq!(b.state(), BreakerState::Open);
            tokio::time::advance(expected).await;
            let probe = match b.admit() {
                Admission::Allowed(t) => t,
                other => panic!("{other:?}"),
            };
            assert_eq!(b.state(), BreakerState::HalfOpen);
            assert!(
                matches!(b.admit(), Admission::Rejected { .. }),
                "one probe at a time"
            );
            b.record(probe, FAIL);
            expected = (expected * 2).min(MAX_OPEN);
            match b.admit() {
                Admission::Rejected { retry_after } => assert_eq!(retry_after, expected),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(expected, MAX_OPEN);
        tokio::time::advance(expected).await;
        assert!(run(&b, Outcome::Success));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.gauge.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_a_floor() {
        let b = breaker(1);
        run(
            &b,
            Outcome::Failure {
                retry_after: Some(Duration::from_secs(30)),
            },
        );
        match b.admit() {
            Admission::Rejected { retry_after } => assert_eq!(retry_after, Duration::from_secs(30)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn recheck_voids_tickets_issued_before_the_breaker_opened() {
        let b = breaker(1);
        let queued = match b.admit() {
            Admission::Allowed(t) => t,
            other => panic!("{other:?}"),
        };
        let still_valid = match b.admit() {
            Admission::Allowed(t) => t,
            other => panic!("{other:?}"),
        };
        run(&b, FAIL);
        assert!(
            matches!(b.recheck(queued), Admission::Rejected { .. }),
            "opened while it waited"
        );
        // Once the open period is over, a voided ticket may become the probe.
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = match b.recheck(still_valid) {
            Admission::Allowed(t) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // The probe's own ticket survives a recheck.
        let probe = match b.recheck(probe) {
            Admission::Allowed(t) => t,
            other => panic!("{other:?}"),
        };
        b.record(probe, Outcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        let t = match b.admit() {
            Admission::Allowed(t) => t,
            other => panic!("{other:?}"),
        };
        assert!(
            matches!(b.recheck(t), Admission::Allowed(_)),
            "closed: kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn background_work_is_admitted_only_while_closed() {
        let b = breaker(1);
        assert!(b.admit_if_closed().is_some());
        run(&b, FAIL);
        assert!(b.admit_if_closed().is_none(), "open");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            b.admit_if_closed().is_none(),
            "due for a probe: left to clients"
        );
        assert_eq!(b.state(), BreakerState::Open, "and no probe was taken");
        let probe = match b.admit() {
            Admission::Allowed(t) => t,
            other => panic!("{other:?}"),
        };
        assert!(b.admit_if_closed().is_none(), "half-open");
        b.record(probe, Outcome::Success);
        assert!(b.admit_if_closed().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_is_not_counted() {
        let b = breaker(1);
        run(&b, FAIL);
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = match b.admit() {
            Admission::Allowed(t) => t,
            other => panic!("{other:?}"),
        };
        drop(probe);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "neither reopened nor closed"
        );
        // The next request is the probe at once; the open period did not double.
        let probe = match b.admit() {
            Admission::Allowed(t) => t,
            other => panic!("{other:?}"),
        };
        b.record(probe, FAIL);
        match b.admit() {
            Admission::Rejected { retry_after } => {
                assert_eq!(retry_after, Duration::from_secs(10))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_neither_opens_nor_hides_failures() {
        let b = breaker(4);
        for _ in 0..100 {
            assert!(run(&b, Outcome::Throttled));
        }
        assert_eq!(b.state(), BreakerState::Closed, "429s are not failures");
        // Nor do they dilute real failures: 4 failures among 100 429s still open it.
        for _ in 0..4 {
            run(&b, FAIL);
        }
        assert_eq!(b.state(), BreakerState::Open);
        // A probe answered 429 reached a live application: closed.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(run(&b, Outcome::Throttled));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stragglers_retry_after_extends_the_open_period() {
        let b = breaker(1);
        let straggler = match b.admit() {
            Admission::Allowed(t) => t,
            other => panic!("{other:?}"),
        };
        run(&b, FAIL);
        b.record(
            straggler,
            Outcome::Failure {
                retry_after: Some(Duration::from_secs(30)),
            },
        );
        match b.admit() {
            Admission::Rejected { retry_after } => {
                assert_eq!(retry_after, Duration::from_secs(30))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_probe_frees_the_slot_and_stragglers_are_ignored() {
        let b = breaker(1);
        let straggler = match b.admit() {
            Admission::Allowed(t) => t,
            _ => unreachable!(),
        };
        run(&b, FAIL);
        b.record(straggler, Outcome::Success);
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "a pre-open success must not close it"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = match b.admit() {
            Admission::Allowed(t) => t,
            _ => unreachable!(),
        };
        drop(probe);
        assert!(matches!(b.admit(), Admission::Allowed(_)), "slot freed");
    }
}
