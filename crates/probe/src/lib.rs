//! Downtime as a guest's users see it.
//!
//! A [`Prober`] keeps ONE TCP connection open to a guest's echo service
//! (`walkabout_guest::net`, port [`ECHO_PORT`]) and sends a numbered request line every
//! 10 ms; the guest writes each line back. The longest gap between two replies within a
//! window (a migration, from before it starts to after it ends) is the observed
//! downtime: it covers the guest's pause, the switch of the segment to the destination's
//! port, and the client's TCP retransmission that finds it. The connection must survive
//! every hop: a reset, a close or a reply out of order is a failure ([`ProbeError`]),
//! never a gap.
//!
//! Threads, not async: the tests, the bench, the CLI and the controller all use it, and a
//! blocking socket with one reader and one writer thread measures the same in each.
//!
//! ```no_run
//! # fn main() -> Result<(), walkabout_probe::ProbeError> {
//! let target = walkabout_probe::echo_target("10.77.0.12/24").expect("an address");
//! let probe = walkabout_probe::Prober::connect(target, walkabout_probe::ProbeOptions::default())?;
//! probe.start_window();
//! // ... migrate the guest ...
//! let window = probe.end_window()?;
//! println!("observed downtime {} ms over {} replies", window.max_gap_ms, window.replies);
//! # Ok(()) }
//! ```

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub use walkabout_guest::net::ECHO_PORT;

/// Why probing a guest failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The connection could not be opened.
    #[error("cannot connect to the guest's echo at {addr}: {reason}")]
    Connect {
        /// The echo's address.
        addr: SocketAddr,
        /// The socket error.
        reason: String,
    },
    /// The connection was reset: the guest's TCP state was lost (or the guest refused it).
    #[error("the connection to {addr} was reset after {replies} replies")]
    Reset {
        /// The echo's address.
        addr: SocketAddr,
        /// Replies received before.
        replies: u64,
    },
    /// The guest closed the connection.
    #[error("the guest at {addr} closed the connection after {replies} replies")]
    Closed {
        /// The echo's address.
        addr: SocketAddr,
        /// Replies received before.
        replies: u64,
    },
    /// A reply was not the next request's echo (lost or reordered data).
    #[error("the echo at {addr} answered {got:?} where {expected} was due")]
    OutOfOrder {
        /// The echo's address.
        addr: SocketAddr,
        /// The request number due.
        expected: u64,
        /// What came back.
        got: String,
    },
    /// No reply for longer than the give-up time.
    #[error("no reply from {addr} for {ms} ms")]
    Silent {
        /// The echo's address.
        addr: SocketAddr,
        /// Time since the last reply.
        ms: u64,
    },
    /// Another socket error.
    #[error("the connection to {addr} failed: {reason}")]
    Io {
        /// The echo's address.
        addr: SocketAddr,
        /// The socket error.
        reason: String,
    },
}

/// The echo address of a guest whose NIC has `address` (`10.77.0.12/24`), if it parses.
pub fn echo_target(address: &str) -> Option<SocketAddr> {
    let cidr: walkabout_guest::net::Ipv4Cidr = address.parse().ok()?;
    Some(SocketAddr::V4(SocketAddrV4::new(cidr.addr, ECHO_PORT)))
}

/// How a [`Prober`] probes.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOptions {
    /// Time between two requests (10 ms).
    pub interval: Duration,
    /// How long connecting (and the first reply) may take.
    pub connect_timeout: Duration,
    /// No reply for this long is a failure.
    pub give_up: Duration,
    /// How long [`Prober::end_window`] waits for a reply sent after it was called.
    pub settle: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            interval: Duration::from_millis(10),
            connect_timeout: Duration::from_secs(10),
            give_up: Duration::from_secs(60),
            settle: Duration::from_secs(30),
        }
    }
}

/// What one window saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The longest gap between two replies, ms (the observed downtime).
    pub max_gap_ms: u64,
    /// Replies received in the window.
    pub replies: u64,
    /// The window's length, ms.
    pub length_ms: u64,
}

struct State {
    last_reply: Instant,
    replies: u64,
    window_start: Instant,
    window_replies: u64,
    window_max_gap: Duration,
    failure: Option<ProbeError>,
}

struct Shared {
    addr: SocketAddr,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few assignments; a panic elsewhere leaves them consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the first failure (none once the prober is being stopped).
    fn fail(&self, e: ProbeError) {
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        let mut s = self.lock();
        if s.failure.is_none() {
            tracing::warn!(error = %e, "probe failed");
            s.failure = Some(e);
        }
        drop(s);
        self.changed.notify_all();
    }

    fn io_error(&self, e: &std::io::Error) -> ProbeError {
        let replies = self.lock().replies;
        match e.kind() {
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                ProbeError::Reset { addr: self.addr, replies }
            }
            _ => ProbeError::Io { addr: self.addr, reason: e.to_string() },
        }
    }
}

/// One TCP connection to a guest's echo, probed until dropped.
pub struct Prober {
    shared: Arc<Shared>,
    stream: TcpStream,
    settle: Duration,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober").field("addr", &self.shared.addr).finish_non_exhaustive()
    }
}

impl Prober {
    /// Connects to the echo at `addr`, checks that it answers, and starts probing.
    pub fn connect(addr: SocketAddr, options: ProbeOptions) -> Result<Prober, ProbeError> {
        let connect_err = |e: std::io::Error| ProbeError::Connect { addr, reason: e.to_string() };
        let stream = TcpStream::connect_timeout(&addr, options.connect_timeout).map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        // The reader wakes this often to notice a stop or a silence.
        stream.set_read_timeout(Some(Duration::from_millis(200))).map_err(connect_err)?;
        let mut reader = BufReader::new(stream.try_clone().map_err(connect_err)?);
        let mut writer = stream.try_clone().map_err(connect_err)?;
        // Request 0, answered before anything is measured.
        writer.write_all(b"0\n").map_err(connect_err)?;
        let start = Instant::now();
        let mut line = String::new();
        loop {
            match reader.read_line(&mut line) {
                Ok(0) => return Err(ProbeError::Closed { addr, replies: 0 }),
                Ok(_) if line.ends_with('\n') => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(connect_err(e)),
            }
            if start.elapsed() > options.connect_timeout {
                return Err(ProbeError::Silent { addr, ms: millis(start.elapsed()) });
            }
        }
        if line != "0\n" {
            return Err(ProbeError::OutOfOrder { addr, expected: 0, got: line.trim_end().to_string() });
        }
        let now = Instant::now();
        let shared = Arc::new(Shared {
            addr,
            state: Mutex::new(State {
                last_reply: now,
                replies: 1,
                window_start: now,
                window_replies: 0,
                window_max_gap: Duration::ZERO,
                failure: None,
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let read = thread::Builder::new()
            .name("probe-read".into())
            .spawn(move || read_replies(&s, reader, options.give_up))
            .map_err(connect_err)?;
        let s = Arc::clone(&shared);
        let write = thread::Builder::new()
            .name("probe-write".into())
            .spawn(move || send_requests(&s, writer, options.interval))
            .map_err(connect_err)?;
        Ok(Prober { shared, stream, settle: options.settle, threads: vec![read, write] })
    }

    /// The echo's address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Starts a new window: its longest gap is measured from now on.
    pub fn start_window(&self) {
        let mut s = self.shared.lock();
        s.window_start = Instant::now();
        s.window_replies = 0;
        s.window_max_gap = Duration::ZERO;
    }

    /// Ends the window: waits for a reply to a request sent after this call (so a gap
    /// still open is closed and counted), then reports the window. Fails if the
    /// connection failed at any time, or no such reply came within the settle time.
    pub fn end_window(&self) -> Result<Window, ProbeError> {
        let called = Instant::now();
        let mut s = self.shared.lock();
        loop {
            if let Some(e) = &s.failure {
                return Err(e.clone());
            }
            // A reply received at least two intervals after the call answers a request
            // sent after it.
            if s.last_reply > called + Duration::from_millis(20) {
                return Ok(Window {
                    max_gap_ms: millis(s.window_max_gap),
                    replies: s.window_replies,
                    length_ms: millis(s.last_reply.saturating_duration_since(s.window_start)),
                });
            }
            let waited = called.elapsed();
            if waited > self.settle {
                return Err(ProbeError::Silent { addr: self.shared.addr, ms: millis(s.last_reply.elapsed()) });
            }
            s = self.shared.changed.wait_timeout(s, self.settle - waited).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// The connection's failure, if it failed.
    pub fn failure(&self) -> Option<ProbeError> {
        self.shared.lock().failure.clone()
    }

    /// Replies received since connecting.
    pub fn replies(&self) -> u64 {
        self.shared.lock().replies
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The reader: every reply must be the next request's number; records gaps.
fn read_replies(shared: &Shared, mut reader: BufReader<TcpStream>, give_up: Duration) {
    let mut expected = 1u64;
    let mut line = String::new();
    while !shared.stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => {
                let replies = shared.lock().replies;
                return shared.fail(ProbeError::Closed { addr: shared.addr, replies });
            }
            Ok(_) if line.ends_with('\n') => {
                if line.trim_end().parse::<u64>().ok() != Some(expected) {
                    let got = line.trim_end().to_string();
                    return shared.fail(ProbeError::OutOfOrder { addr: shared.addr, expected, got });
                }
                expected += 1;
                line.clear();
                let now = Instant::now();
                let mut s = shared.lock();
                let gap = now.saturating_duration_since(s.last_reply);
                if now > s.window_start {
                    s.window_max_gap = s.window_max_gap.max(gap);
                    s.window_replies += 1;
                }
                s.last_reply = now;
                s.replies += 1;
                drop(s);
                shared.changed.notify_all();
            }
            // A partial line stays in `line`; the rest follows.
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let silent = shared.lock().last_reply.elapsed();
                if silent > give_up {
                    return shared.fail(ProbeError::Silent { addr: shared.addr, ms: millis(silent) });
                }
            }
            Err(e) => return shared.fail(shared.io_error(&e)),
        }
    }
}

/// The writer: request `n` every `interval`, numbered from 1.
fn send_requests(shared: &Shared, mut writer: TcpStream, interval: Duration) {
    let mut next = Instant::now();
    let mut n = 1u64;
    while !shared.stop.load(Ordering::Relaxed) {
        if shared.lock().failure.is_some() {
            return;
        }
        if let Err(e) = writer.write_all(format!("{n}\n").as_bytes()) {
            return shared.fail(shared.io_error(&e));
        }
        n += 1;
        next += interval;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        thread::spawn(move || walkabout_guest::net::serve_echo(listener));
        addr
    }

    fn quick() -> ProbeOptions {
        ProbeOptions { settle: Duration::from_secs(5), ..ProbeOptions::default() }
    }

    #[test]
    fn echo_target_is_the_address_on_the_echo_port() {
        assert_eq!(echo_target("10.77.0.12/24"), Some("10.77.0.12:7007".parse().expect("addr")));
        assert_eq!(echo_target("10.77.0.12"), None);
    }

    #[test]
    fn a_window_over_a_live_echo_reports_its_replies_and_gaps_within_it() {
        let probe = Prober::connect(echo_server(), quick()).expect("connect");
        probe.start_window();
        thread::sleep(Duration::from_millis(300));
        let w = probe.end_window().expect("window");
        assert!(w.replies >= 10, "{w:?}");
        assert!(w.max_gap_ms <= w.length_ms, "{w:?}");
    }

    #[test]
    fn a_pause_of_the_server_shows_as_the_longest_gap() {
        // A proxy that stops forwarding replies for 400 ms: the gap must cover it.
        let target = echo_server();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let paused = Arc::new(AtomicBool::new(false));
        let p = Arc::clone(&paused);
        thread::spawn(move || {
            let (client, _) = listener.accept().expect("accept");
            let upstream = TcpStream::connect(target).expect("upstream");
            let (mut up_w, up_r) = (upstream.try_clone().expect("clone"), upstream);
            let mut client_w = client.try_clone().expect("clone");
            thread::spawn(move || {
                let _ = std::io::copy(&mut &client, &mut up_w);
            });
            let mut r = BufReader::new(up_r);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                while p.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(5));
                }
                if client_w.write_all(line.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
        });
        let probe = Prober::connect(addr, quick()).expect("connect");
        probe.start_window();
        thread::sleep(Duration::from_millis(100));
        paused.store(true, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(400));
        paused.store(false, Ordering::Relaxed);
        let w = probe.end_window().expect("window");
        assert!(w.max_gap_ms >= 380, "{w:?}");
    }

    #[test]
    fn a_closed_connection_is_a_failure_not_a_gap() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            r.read_line(&mut line).expect("request 0");
            (&s).write_all(line.as_bytes()).expect("reply 0");
            thread::sleep(Duration::from_millis(100));
            // Closing with unread data makes the kernel send a reset.
            drop(r);
            drop(s);
        });
        let probe = Prober::connect(addr, quick()).expect("connect");
        probe.start_window();
        let e = probe.end_window().expect_err("the connection went away");
        assert!(matches!(e, ProbeError::Reset { .. } | ProbeError::Closed { .. }), "{e:?}");
    }

    #[test]
    fn nothing_listening_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let e = Prober::connect(addr, quick()).expect_err("refused");
        assert!(matches!(e, ProbeError::Connect { .. }), "{e:?}");
    }
}
