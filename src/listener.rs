//! Accepting client connections without letting clients exhaust the process (SPEC §10).
//!
//! - **A cap on open connections** (`--max-connections`, per listener). At the cap the listener
//!   stops calling `accept`: new connections wait in the kernel's backlog (and are served as
//!   soon as others close) instead of being accepted and closed, which would turn a flood into
//!   errors for everyone.
//! - **Back-off on accept errors.** Running out of file descriptors (`EMFILE`, `ENFILE`) or
//!   memory makes `accept` fail at once, again and again, with the connection still queued:
//!   retrying immediately would spin a core. The listener waits 10 ms, doubling up to 1 s while
//!   the errors continue, and logs once per episode instead of once per error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The kernel's queue of connections not yet accepted (capped by `net.core.somaxconn`). Past
/// `--max-connections` new connections wait here; the standard library's 128 would make a
/// modest burst see dropped SYNs and second-long connect retries.
pub const BACKLOG: u32 = 4096;

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Binds a listening socket like the standard library does (`SO_REUSEADDR`), with
/// [`BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// A TCP listener with a connection cap and accept-error back-off.
pub struct Listener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    name: &'static str,
    backoff: Option<Duration>,
    failures: u64,
}

/// One accepted connection; it counts against the cap until `slot` is dropped.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub slot: OwnedSemaphorePermit,
}

impl Listener {
    /// `name` labels log lines (`public`, `admin`).
    pub fn new(inner: TcpListener, max_connections: usize, name: &'static str) -> Listener {
        let max = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Listener {
            inner,
            slots: Arc::new(Semaphore::new(max)),
            max,
            name,
            backoff: None,
            failures: 0,
        }
    }

    /// Waits for a free slot, then for a connection. Cancel-safe: nothing is lost if the
    /// future is dropped (a slot taken but unused is given back).
    pub async fn accept(&mut self) -> Accepted {
        let slot = match self.slots.clone().acquire_owned().await {
            Ok(slot) => slot,
            // The semaphore is never closed; should it ever be, accept nothing more.
            Err(_) => std::future::pending().await,
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    if self.failures > 0 {
                        tracing::info!(
                            listener = self.name,
                            failed_accepts = self.failures,
                            "accepting connections again"
                        );
                    }
                    self.backoff = None;
                    self.failures = 0;
                    return Accepted { stream, peer, slot };
                }
                Err(e) => self.back_off(e).await,
            }
        }
    }

    async fn back_off(&mut self, e: std::io::Error) {
        use std::io::ErrorKind;
        // A connection that died in the queue is that connection's problem, not ours.
        if matches!(
            e.kind(),
            ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
        ) {
            return;
        }
        self.failures += 1;
        let wait = self
            .backoff
            .map_or(FIRST_BACKOFF, |d| (d * 2).min(MAX_BACKOFF));
        if self.backoff.is_none() {
            tracing::warn!(
                listener = self.name,
                error = %e,
                "accept failed (out of file descriptors?); backing off until it succeeds"
            );
        }
        self.backoff = Some(wait);
        tokio::time::sleep(wait).await;
    }

    /// Connections open now (tests, diagnostics).
    pub fn open_connections(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn past_the_cap_connections_wait_in_the_backlog() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let mut l = Listener::new(inner, 2, "test");
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let _c3 = TcpStream::connect(addr).await.unwrap();
        let a1 = l.accept().await;
        let _a2 = l.accept().await;
        assert_eq!(l.open_connections(), 2);
        // The third is queued by the kernel, not accepted.
        let third = tokio::time::timeout(Duration::from_millis(200), l.accept()).await;
        assert!(third.is_err(), "accepted past the cap");
        drop(a1);
        let third = tokio::time::timeout(Duration::from_secs(5), l.accept()).await;
        assert!(third.is_ok(), "accepted once a slot was free");
    }
}
