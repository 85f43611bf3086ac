//! Real `redis-server` processes for the shared-tier tests (SPEC 11): each test starts its own
//! on a free loopback port, without persistence, and stops it by PID (on drop too).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Serving TLS only (`--tls-port`, `--port 0`): certificate, key and CA files.
    tls: Option<[PathBuf; 3]>,
}

impl RedisServer {
    /// Starts a `redis-server` on a free loopback port.
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// Starts a `redis-server` that serves TLS only, with the PEM `cert` and `key` (clients
    /// are not asked for certificates). [`RedisServer::command`] does not speak TLS.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> RedisServer {
        Self::start_with(Some([cert.to_owned(), key.to_owned(), ca.to_owned()]))
    }

    fn start_with(tls: Option<[PathBuf; 3]>) -> RedisServer {
        for _ in 0..5 {
            let port = super::free_port();
            let mut server = RedisServer {
                port,
                child: None,
                tls: tls.clone(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start (is it installed? .ci/run installs it)");
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Starts the process on `self.port` and waits until it answers `PING`.
    fn spawn(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some([cert, key, ca]) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = cmd
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                // Exited (the port was taken meanwhile).
                self.child = None;
                return false;
            }
            let pid = self.pid();
            let ready = if self.tls.is_some() {
                // Listening; the handshake is the proxy's to make. Our child is still running
                // (checked above), and it exits at once when it cannot bind the port.
                TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).is_ok()
            } else {
                // Some other process on the port answers PING too: only our own PID counts.
                self.command(&["INFO", "server"])
                    .is_some_and(|r| r.contains(&format!("process_id:{pid}\r\n")))
            };
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh (empty) process on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "redis-server did not restart");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGSTOP: the process holds its connections and answers nothing.
    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    /// Sends one command in RESP and returns the raw reply (`None` on I/O errors).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.command_bytes(&bytes)
    }

    /// [`RedisServer::command`] with binary arguments.
    pub fn command_bytes(&self, args: &[&[u8]]) -> Option<String> {
        self.command_raw(args)
            .map(|r| String::from_utf8_lossy(&r).into_owned())
    }

    /// The string value of `key`, byte for byte (`None`: missing, or I/O errors).
    pub fn get_raw(&self, key: &str) -> Option<Vec<u8>> {
        let reply = self.command_raw(&[b"GET", key.as_bytes()])?;
        let (head, rest) = reply.split_at(reply.iter().position(|b| *b == b'\n')? + 1);
        let len: usize = std::str::from_utf8(head.strip_prefix(b"$")?)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        rest.get(..len).map(<[u8]>::to_vec)
    }

    /// [`RedisServer::command_bytes`], the reply as bytes.
    fn command_raw(&self, args: &[&[u8]]) -> Option<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        s.write_all(&req).ok()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = Vec::new();
        // One read is enough for the short replies tests look at; keep reading while a bulk
        // reply is obviously incomplete.
        loop {
            let n = s.read(&mut buf).ok()?;
            got.extend_from_slice(&buf[..n]);
            if n == 0 || complete(&got) {
                break;
            }
        }
        Some(got)
    }

    /// Keys matching `pattern`.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let reply = self.command(&["KEYS", pattern]).unwrap_or_default();
        reply
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.starts_with('$') && !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// Whether a RESP reply looks whole (simple replies end at their CRLF; a bulk string has its
/// announced length).
fn complete(reply: &[u8]) -> bool {
    if reply.first() == Some(&b'$') {
        // Counted in bytes: a binary value is not text.
        let Some(end) = reply.windows(2).position(|w| w == b"\r\n") else {
            return false;
        };
        let len = String::from_utf8_lossy(&reply[1..end]).parse::<i64>();
        let rest = reply.len() - end - 2;
        return match len {
            Ok(n) if n >= 0 => rest >= n as usize + 2,
            _ => true,
        };
    }
    reply.ends_with(b"\r\n")
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused server must be able to die.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// Waits (generously) until `proxy` uses Redis and is subscribed to the bus.
pub async fn wait_ready(proxy: &super::ProxyHandle) {
    let shared = proxy.proxy.store.shared().expect("shared tier configured");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(shared.is_up() && shared.is_subscribed()) {
        assert!(Instant::now() < deadline, "shared tier not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback TCP relay in front of a `redis-server`, for a replica pointed at it: it passes
/// bytes both ways until told to make the bus connections' flows go silent.
pub struct RedisRelay {
    pub port: u16,
    flows: Arc<Mutex<Vec<Arc<Flow>>>>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    gate: Arc<LeaseGate>,
}

/// Lease commands (`SET .. NX`) held at the relay: see [`RedisRelay::hold_leases`].
struct LeaseGate {
    closed: tokio::sync::watch::Sender<bool>,
    held: tokio::sync::watch::Sender<bool>,
    /// `NOSCRIPT` replies held: see [`RedisRelay::hold_noscript`].
    noscript_closed: tokio::sync::watch::Sender<bool>,
    noscript_held: tokio::sync::watch::Sender<bool>,
    /// Shared reads (`GETRANGE`) a client sent while a `NOSCRIPT` reply was held.
    reads_while_held: tokio::sync::watch::Sender<u32>,
}

/// One relayed connection.
#[derive(Default)]
struct Flow {
    /// The client sent `SUBSCRIBE`: the replica's bus connection.
    subscriber: AtomicBool,
    /// Silent for good: bytes are read and dropped both ways, the sockets stay open.
    dead: AtomicBool,
}

impl RedisRelay {
    /// Listens on a free loopback port and relays each connection to `target`.
    pub async fn start(target: SocketAddr) -> RedisRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let flows: Arc<Mutex<Vec<Arc<Flow>>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let gate = Arc::new(LeaseGate {
            closed: tokio::sync::watch::channel(false).0,
            held: tokio::sync::watch::channel(false).0,
            noscript_closed: tokio::sync::watch::channel(false).0,
            noscript_held: tokio::sync::watch::channel(false).0,
            reads_while_held: tokio::sync::watch::channel(0).0,
        });
        let (f, t, g) = (flows.clone(), tasks.clone(), gate.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let flow = Arc::new(Flow::default());
                f.lock().unwrap().push(flow.clone());
                let (client_r, client_w) = client.into_split();
                let (server_r, server_w) = server.into_split();
                let up = tokio::spawn(pump(client_r, server_w, flow.clone(), g.clone(), true));
                let down = tokio::spawn(pump(server_r, client_w, flow, g.clone(), false));
                t.lock()
                    .unwrap()
                    .extend([up.abort_handle(), down.abort_handle()]);
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        RedisRelay {
            port,
            flows,
            tasks,
            gate,
        }
    }

    /// From now on, holds every chunk a client sends with a lease in it (`SET .. NX`) until
    /// [`RedisRelay::release_leases`]: a test can put another replica's whole fetch between a
    /// replica's L2 read and its lease.
    pub fn hold_leases(&self) {
        self.gate.closed.send_replace(true);
    }

    /// Waits (generously) until a lease is held.
    pub async fn wait_lease_held(&self) {
        wait_until(&self.gate.held, |h| *h, "no lease reached the relay").await;
    }

    /// Lets held leases (and later ones) through.
    pub fn release_leases(&self) {
        self.gate.closed.send_replace(false);
    }

    /// From now on, holds every chunk Redis answers with a `NOSCRIPT` error in it (a script
    /// call after `SCRIPT FLUSH` or a restart) until [`RedisRelay::release_noscript`]: what the
    /// client sends meanwhile still reaches Redis and runs before the client can load the script
    /// and call it again, as it does over a real round trip.
    pub fn hold_noscript(&self) {
        self.gate.noscript_closed.send_replace(true);
    }

    /// Waits (generously) until a `NOSCRIPT` reply is held.
    pub async fn wait_noscript_held(&self) {
        let what = "no NOSCRIPT reply reached the relay";
        wait_until(&self.gate.noscript_held, |h| *h, what).await;
    }

    /// Waits (generously) until a shared read passed to Redis while a `NOSCRIPT` reply is held.
    pub async fn wait_read_while_noscript_held(&self) {
        let what = "no read reached Redis while the NOSCRIPT reply was held";
        wait_until(&self.gate.reads_while_held, |n| *n > 0, what).await;
    }

    /// Lets held `NOSCRIPT` replies (and later ones) through.
    pub fn release_noscript(&self) {
        self.gate.noscript_closed.send_replace(false);
    }

    /// `redis://127.0.0.1:PORT` of the relay.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Makes every bus connection relayed so far go silent for good, both ways, its sockets
    /// held open: what a NAT or conntrack entry dropped without a RST (or a partition that
    /// outlives TCP) looks like to a client that only listens. Other and later connections
    /// pass. Returns how many went silent.
    pub fn silence_subscribers(&self) -> usize {
        self.silence(|flow| flow.subscriber.load(Ordering::Acquire))
    }

    /// [`RedisRelay::silence_subscribers`] for every connection relayed so far.
    pub fn silence_all(&self) -> usize {
        self.silence(|_| true)
    }

    fn silence(&self, which: impl Fn(&Flow) -> bool) -> usize {
        let flows = self.flows.lock().unwrap();
        let mut n = 0;
        for flow in flows.iter().filter(|f| which(f)) {
            flow.dead.store(true, Ordering::Release);
            n += 1;
        }
        n
    }
}

/// Waits (generously: 20 s) until `state` satisfies `ready`; panics with `what` otherwise.
async fn wait_until<T>(
    state: &tokio::sync::watch::Sender<T>,
    ready: impl FnMut(&T) -> bool,
    what: &str,
) {
    let mut rx = state.subscribe();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(ready))
        .await
        .expect(what)
        .expect("relay running");
}

impl Drop for RedisRelay {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Copies one direction of a flow (client to server through the relay's lease gate, server to
/// client through its `NOSCRIPT` gate) until EOF, dropping the bytes instead once the flow is
/// dead.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    flow: Arc<Flow>,
    gate: Arc<LeaseGate>,
    from_client: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if flow.dead.load(Ordering::Acquire) {
            continue;
        }
        if from_client
            && buf[..n]
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
        {
            flow.subscriber.store(true, Ordering::Release);
        }
        let chunk = &buf[..n];
        if from_client {
            let lease = chunk.windows(6).any(|w| w == b"\r\nNX\r\n");
            if lease && *gate.closed.borrow() {
                gate.held.send_replace(true);
                let mut closed = gate.closed.subscribe();
                if closed.wait_for(|c| !*c).await.is_err() {
                    break;
                }
            }
            if *gate.noscript_held.borrow()
                && *gate.noscript_closed.borrow()
                && chunk.windows(8).any(|w| w == b"GETRANGE")
            {
                gate.reads_while_held.send_modify(|n| *n += 1);
            }
        } else if *gate.noscript_closed.borrow() && chunk.windows(8).any(|w| w == b"NOSCRIPT") {
            gate.noscript_held.send_replace(true);
            let mut closed = gate.noscript_closed.subscribe();
            if closed.wait_for(|c| !*c).await.is_err() {
                break;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if !flow.dead.load(Ordering::Acquire) {
        let _ = to.shutdown().await;
    } else {
        // A dead flow never tells the other side anything: hold its socket open.
        std::future::pending::<()>().await;
    }
}
