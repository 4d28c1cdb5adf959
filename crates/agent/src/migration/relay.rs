//! Every stream of a migration through the destination agent's one published port.
//!
//! Between sites (another cloud, a NAT that publishes one port per host) the source
//! reaches the destination's agent API and nothing else: not the port its QEMU listens
//! on for memory, nor its NBD server. With `relay` the agents carry those streams
//! themselves:
//!
//! ```text
//! source QEMU ──tcp──> 127.0.0.1:L (source agent)            destination agent
//!                        │  one connection per QEMU connection    │
//!                        └──TLS (agent's mTLS)──> GET /v1/incoming/{vm}/tunnel/{stream}
//!                                                 Upgrade: walkabout-tunnel ── 101
//!                                                  └──tcp──> 127.0.0.1:Q (destination QEMU)
//! ```
//!
//! - Destination: an incoming VM asked with `relay` listens on loopback only; its
//!   [`Tunnel`] (the admitted peer and the loopback addresses) is kept until commit or
//!   abort. The tunnel route admits only the host whose certificate made the
//!   `/v1/incoming` request (the same rule as QEMU's `tls-authz`), connects to the
//!   stream's loopback listener, answers `101` and splices. A tunnel lives as long as
//!   its migration: the listener's idle limit (which closes a quiet API connection) is
//!   lifted for it, since an NBD stream over a quiet disk or a paused post-copy may
//!   carry nothing for minutes, and it ends when the migration's tunnels close.
//! - Source: [`Relays::open`] binds one loopback listener per stream and rewrites the
//!   reply's addresses to them; each connection its QEMU opens (multifd channels,
//!   post-copy's preempt channel, one NBD connection per disk) becomes one upgraded TLS
//!   connection to the destination agent, copied both ways.
//!
//! QEMU's own TLS stays on inside the tunnel: the destination QEMU still checks the
//! source QEMU's certificate and authorization end to end, so the agents relay bytes
//! they cannot read. The cost is a second encryption and two more copies per byte
//! (bench/migrate `--relay` measures it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use walkabout_api::migration::{IncomingReply, TunnelStream, TUNNEL_PROTOCOL};

/// How long a tunnel's connection and upgrade may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response head the source reads from the tunnel route.
const MAX_HEAD: usize = 16 << 10;
/// Buffer of each direction of a relayed connection (the default 8 KiB costs
/// throughput on a memory stream).
const COPY_BUFFER: usize = 256 << 10;

/// Errors of a relayed stream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    /// A local listener or connection failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// The destination's URL cannot be reached as a tunnel.
    #[error("cannot relay through {url}: {why}")]
    Url {
        /// The destination's URL.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The destination refused the tunnel.
    #[error("{url} refused the tunnel {path}: {head}")]
    Refused {
        /// The destination's URL.
        url: String,
        /// The route asked for.
        path: String,
        /// What it answered (its status line and body start).
        head: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RelayError {
    let what = what.into();
    move |source| RelayError::Io { what, source }
}

/// A byte stream either way (TLS or plain TCP).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

// ---- destination ----

/// An incoming VM whose streams come through the tunnel route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tunnel {
    /// The identity (certificate name) of the host admitted: the one that asked for
    /// the incoming migration.
    pub(crate) peer: String,
    /// The destination QEMU's migration listener (loopback).
    pub(crate) memory: SocketAddr,
    /// Its NBD server (loopback), with `storage: copy`.
    pub(crate) nbd: Option<SocketAddr>,
}

/// The tunnels of the incoming VMs of this agent, by VM name, each with the sender
/// whose drop ends its spliced connections.
#[derive(Debug, Default)]
pub(crate) struct Tunnels {
    map: Mutex<BTreeMap<String, (Tunnel, tokio::sync::watch::Sender<()>)>>,
}

/// Resolves when the tunnels of a migration close (commit, abort, the lease ended).
#[derive(Debug)]
pub(crate) struct TunnelEnd(tokio::sync::watch::Receiver<()>);

impl TunnelEnd {
    /// Waits until the migration's tunnels are closed.
    pub(crate) async fn closed(mut self) {
        // Nothing is ever sent: this resolves (Err) when the sender is dropped.
        while self.0.changed().await.is_ok() {}
    }
}

/// Why a tunnel is refused, with the status it answers.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// 404: no relayed incoming migration of that VM here.
    NotFound(String),
    /// 403: another identity than the admitted source.
    Forbidden(String),
    /// 409: that stream is not part of this migration (`nbd` without a disk copy).
    NoStream(String),
}

impl Tunnels {
    /// Opens the tunnels of incoming VM `vm` for `tunnel.peer` (ending those of an
    /// earlier migration of the same name).
    pub(crate) fn open(&self, vm: &str, tunnel: Tunnel) {
        crate::vms::lock(&self.map).insert(vm.to_string(), (tunnel, tokio::sync::watch::Sender::new(())));
    }

    /// Whether `vm` has its tunnels open here.
    pub(crate) fn is_open(&self, vm: &str) -> bool {
        crate::vms::lock(&self.map).contains_key(vm)
    }

    /// Points `vm`'s memory tunnel at `addr` (a recovered post-copy listens anew).
    pub(crate) fn retarget_memory(&self, vm: &str, addr: SocketAddr) {
        if let Some((t, _)) = crate::vms::lock(&self.map).get_mut(vm) {
            t.memory = addr;
        }
    }

    /// Closes them (commit, abort, the lease ended): no new tunnel is admitted and
    /// every spliced connection ends.
    pub(crate) fn close(&self, vm: &str) {
        crate::vms::lock(&self.map).remove(vm);
    }

    /// Where a tunnel of `vm`'s `stream` asked by `who` goes and what ends it, or why not.
    pub(crate) fn target(&self, vm: &str, stream: TunnelStream, who: Option<&str>) -> Result<(SocketAddr, TunnelEnd), Refusal> {
        let map = crate::vms::lock(&self.map);
        let (t, end) = map.get(vm).ok_or_else(|| Refusal::NotFound(format!("no relayed incoming migration of {vm} here")))?;
        let end = TunnelEnd(end.subscribe());
        if who != Some(t.peer.as_str()) {
            return Err(Refusal::Forbidden(format!(
                "the tunnel of {vm} admits only {}, the host that asked for its migration, not {}",
                t.peer,
                who.unwrap_or("an anonymous client")
            )));
        }
        match stream {
            TunnelStream::Memory => Ok((t.memory, end)),
            TunnelStream::Nbd => {
                t.nbd.map(|a| (a, end)).ok_or_else(|| Refusal::NoStream(format!("the migration of {vm} copies no disk: no nbd stream")))
            }
        }
    }
}

/// The loopback address of a QEMU URI `tcp:HOST:PORT`.
pub(crate) fn uri_addr(uri: &str) -> Option<SocketAddr> {
    let host = super::tls::uri_host(uri)?;
    let port = uri.rsplit_once(':')?.1.parse().ok()?;
    Some(SocketAddr::new(host.parse().ok()?, port))
}

/// Connects to a tunnel's target (before answering 101, so a QEMU gone is a 502).
pub(crate) async fn connect_target(addr: SocketAddr) -> Result<TcpStream, RelayError> {
    let s = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| RelayError::Io { what: format!("connecting to {addr}"), source: std::io::ErrorKind::TimedOut.into() })?
        .map_err(io(format!("connecting to {addr}")))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Copies both ways until either end closes.
pub(crate) async fn splice(mut a: impl Io, mut b: impl Io, what: &str) {
    match tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUFFER, COPY_BUFFER).await {
        Ok((up, down)) => tracing::debug!(what, up, down, "relayed connection closed"),
        Err(e) => tracing::debug!(what, error = %e, "relayed connection ended"),
    }
}

/// `GET /v1/incoming/{name}/tunnel/{stream}` with `Upgrade: walkabout-tunnel`: checks
/// who asks and for what, connects to the stream's loopback listener, answers `101`
/// and splices the upgraded connection to it until either end closes or the
/// migration's tunnels close. The connection's idle limit is lifted: the migration,
/// not a quiet minute, bounds its life.
pub(crate) async fn route(
    axum::extract::State(agent): axum::extract::State<crate::vms::Agent>,
    axum::extract::Path((vm, stream)): axum::extract::Path<(String, String)>,
    who: Option<axum::Extension<walkabout_trust::Identity>>,
    idle: Option<axum::Extension<walkabout_trust::IdleLimit>>,
    mut req: axum::extract::Request,
) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    use walkabout_api::{ErrorBody, ErrorKind};
    let refuse = |status: StatusCode, kind: ErrorKind, why: String| (status, axum::Json(ErrorBody::new(kind, why))).into_response();
    let stream = match stream.parse::<TunnelStream>() {
        Ok(s) => s,
        Err(e) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::InvalidRequest, e),
    };
    let upgrade = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case(TUNNEL_PROTOCOL) {
        let why = format!("the tunnel of {vm} is an HTTP/1.1 upgrade: it needs `Connection: Upgrade` and `Upgrade: {TUNNEL_PROTOCOL}`");
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::InvalidRequest, why);
    }
    let (target, end) = match agent.inner.tunnels.target(&vm, stream, who.as_ref().map(|w| w.0.name.as_str())) {
        Ok(t) => t,
        Err(Refusal::NotFound(why)) => return refuse(StatusCode::NOT_FOUND, ErrorKind::NotFound, why),
        Err(Refusal::Forbidden(why)) => return refuse(StatusCode::FORBIDDEN, ErrorKind::Forbidden, why),
        Err(Refusal::NoStream(why)) => return refuse(StatusCode::CONFLICT, ErrorKind::InvalidState, why),
    };
    let qemu = match connect_target(target).await {
        Ok(q) => q,
        Err(e) => return refuse(StatusCode::BAD_GATEWAY, ErrorKind::Qemu, format!("cannot reach the {stream} stream of {vm}: {e}")),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let what = format!("{vm}/{stream}");
    tokio::spawn(async move {
        let up = match on_upgrade.await {
            Ok(up) => up,
            Err(e) => {
                tracing::warn!(tunnel = %what, error = %e, "the tunnel's upgrade failed");
                return;
            }
        };
        tokio::select! {
            () = splice(hyper_util::rt::TokioIo::new(up), qemu, &what) => {}
            () = end.closed() => tracing::debug!(tunnel = %what, "the migration ended: tunnel closed"),
        }
    });
    if let Some(idle) = idle {
        idle.0.lift();
    }
    tracing::debug!(%vm, %stream, "tunnel opened");
    (StatusCode::SWITCHING_PROTOCOLS, [(header::CONNECTION, "upgrade"), (header::UPGRADE, TUNNEL_PROTOCOL)]).into_response()
}

// ---- source ----

/// How this agent opens tunnels: with its client TLS (its host identity under the
/// cluster CA), or plain for an `http://` destination (loopback clusters).
#[derive(Clone, Default)]
pub(crate) struct Dialer {
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Dialer {
    /// Tunnels over TLS with `config` (plain `http://` destinations stay plain).
    pub(crate) fn new(tls: Option<Arc<rustls::ClientConfig>>) -> Dialer {
        Dialer { tls }
    }

    /// One tunnel: a connection to the agent at `url`, upgraded on `path`.
    async fn dial(&self, url: &Target, path: &str) -> Result<Box<dyn Io>, RelayError> {
        let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect((url.host.as_str(), url.port)))
            .await
            .map_err(|_| RelayError::Io { what: format!("connecting to {}", url.url), source: std::io::ErrorKind::TimedOut.into() })?
            .map_err(io(format!("connecting to {}", url.url)))?;
        let _ = tcp.set_nodelay(true);
        let mut s: Box<dyn Io> = match (url.https, &self.tls) {
            (false, _) => Box::new(tcp),
            (true, None) => {
                return Err(RelayError::Url { url: url.url.clone(), why: "https needs this host's identity under the cluster CA".into() })
            }
            (true, Some(tls)) => {
                let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                    .map_err(|e| RelayError::Url { url: url.url.clone(), why: format!("not a server name: {e}") })?;
                let c = tokio_rustls::TlsConnector::from(tls.clone());
                let s = tokio::time::timeout(DIAL_TIMEOUT, c.connect(name, tcp))
                    .await
                    .map_err(|_| RelayError::Io { what: format!("TLS with {}", url.url), source: std::io::ErrorKind::TimedOut.into() })?
                    .map_err(io(format!("TLS with {}", url.url)))?;
                Box::new(s)
            }
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {TUNNEL_PROTOCOL}\r\nContent-Length: 0\r\n\r\n",
            url.authority
        );
        s.write_all(req.as_bytes()).await.map_err(io(format!("asking {} for {path}", url.url)))?;
        s.flush().await.map_err(io(format!("asking {} for {path}", url.url)))?;
        let head = tokio::time::timeout(DIAL_TIMEOUT, read_head(&mut s))
            .await
            .map_err(|_| RelayError::Io {
                what: format!("waiting for {} to open {path}", url.url),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(io(format!("reading {}'s answer to {path}", url.url)))?;
        if !is_switching(&head) {
            // Its error body, if it sent one promptly, says why.
            let mut body = vec![0u8; 512];
            let n = tokio::time::timeout(Duration::from_millis(200), s.read(&mut body)).await.ok().and_then(Result::ok).unwrap_or(0);
            let status = head.lines().next().unwrap_or_default().to_string();
            let body = String::from_utf8_lossy(&body[..n]).trim().to_string();
            return Err(RelayError::Refused { url: url.url.clone(), path: path.into(), head: format!("{status} {body}").trim().into() });
        }
        Ok(s)
    }
}

/// Reads an HTTP response head, byte by byte: nothing of the stream after it is taken.
async fn read_head(s: &mut (impl AsyncRead + Unpin)) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "response head too long"));
        }
        head.push(s.read_u8().await?);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Whether a response head is `101 Switching Protocols` to the tunnel protocol.
fn is_switching(head: &str) -> bool {
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    let code = status.split_whitespace().nth(1);
    let upgrade = lines
        .filter_map(|l| l.split_once(':'))
        .any(|(k, v)| k.trim().eq_ignore_ascii_case("upgrade") && v.trim().eq_ignore_ascii_case(TUNNEL_PROTOCOL));
    code == Some("101") && upgrade
}

/// The destination agent as a tunnel dials it.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    https: bool,
    host: String,
    port: u16,
    authority: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, RelayError> {
        let bad = |why: &str| RelayError::Url { url: url.into(), why: why.into() };
        let u = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let https = match u.scheme() {
            "https" => true,
            "http" => false,
            s => return Err(bad(&format!("scheme {s} is neither https nor http"))),
        };
        // An IPv6 address comes in brackets, which the authority keeps.
        let bracketed = u.host_str().ok_or_else(|| bad("no host"))?.to_string();
        let host = bracketed.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = u.port_or_known_default().ok_or_else(|| bad("no port"))?;
        let authority = format!("{bracketed}:{port}");
        Ok(Target { url: url.into(), https, host, port, authority })
    }
}

/// The host name of a destination URL, which its certificate names (and so which the
/// source QEMU's `tls-hostname` must be when its streams are relayed).
pub(crate) fn url_host(url: &str) -> Option<String> {
    Target::parse(url).ok().map(|t| t.host)
}

/// The source's loopback listeners for one relayed migration; dropping them closes the
/// listeners and every relayed connection.
pub(crate) struct Relays {
    /// The destination's reply with its addresses replaced by the loopback listeners.
    pub(crate) reply: IncomingReply,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Relays {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Relays {
    /// Opens a loopback listener for each stream of `reply` (memory; NBD with a disk
    /// copy), relaying every connection to `destination`'s tunnel route for `vm`.
    pub(crate) async fn open(dialer: &Dialer, destination: &str, vm: &str, reply: &IncomingReply) -> Result<Relays, RelayError> {
        let target = Target::parse(destination)?;
        let mut relays = Relays { reply: reply.clone(), tasks: vec![] };
        let (addr, task) = listen(dialer.clone(), target.clone(), TunnelStream::Memory.path(vm)).await?;
        relays.tasks.push(task);
        relays.reply.uri = format!("tcp:{}:{}", addr.ip(), addr.port());
        if let Some(nbd) = &mut relays.reply.nbd {
            let (addr, task) = listen(dialer.clone(), target, TunnelStream::Nbd.path(vm)).await?;
            relays.tasks.push(task);
            nbd.host = addr.ip().to_string();
            nbd.port = addr.port();
        }
        Ok(relays)
    }
}

/// A loopback listener whose every connection is relayed through one tunnel each.
async fn listen(dialer: Dialer, target: Target, path: String) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), RelayError> {
    let l = TcpListener::bind("127.0.0.1:0").await.map_err(io("binding a loopback relay listener"))?;
    let addr = l.local_addr().map_err(io("reading the relay listener's address"))?;
    let task = tokio::spawn(async move {
        // Dropped (aborted) with the listener: every relayed connection ends with it.
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (local, _) = match l.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(path, error = %e, "relay listener");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = local.set_nodelay(true);
            let (dialer, target, path) = (dialer.clone(), target.clone(), path.clone());
            conns.spawn(async move {
                match dialer.dial(&target, &path).await {
                    Ok(remote) => splice(local, remote, &path).await,
                    // QEMU sees its connection close and fails the stream.
                    Err(e) => tracing::warn!(error = %e, "cannot open a tunnel"),
                }
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel() -> Tunnel {
        Tunnel { peer: "h1".into(), memory: "127.0.0.1:4000".parse().expect("addr"), nbd: None }
    }

    #[test]
    fn a_tunnel_admits_only_the_host_that_asked_for_the_migration() {
        let t = Tunnels::default();
        t.open("vm1", tunnel());
        assert_eq!(t.target("vm1", TunnelStream::Memory, Some("h1")).map(|(a, _)| a), Ok("127.0.0.1:4000".parse().expect("addr")));
        assert!(matches!(t.target("vm1", TunnelStream::Memory, Some("h3")), Err(Refusal::Forbidden(_))));
        assert!(matches!(t.target("vm1", TunnelStream::Memory, None), Err(Refusal::Forbidden(_))));
        assert!(matches!(t.target("vm1", TunnelStream::Nbd, Some("h1")), Err(Refusal::NoStream(_))));
        t.close("vm1");
        assert!(matches!(t.target("vm1", TunnelStream::Memory, Some("h1")), Err(Refusal::NotFound(_))));
    }

    #[test]
    fn only_a_101_to_the_tunnel_protocol_is_a_tunnel() {
        assert!(is_switching("HTTP/1.1 101 Switching Protocols\r\nupgrade: walkabout-tunnel\r\nconnection: upgrade\r\n\r\n"));
        assert!(!is_switching("HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\n\r\n"));
        assert!(!is_switching("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"));
    }

    #[test]
    fn a_destination_url_gives_the_tunnels_host_and_the_certificates_name() {
        let t = Target::parse("https://10.0.0.254:7702/").expect("url");
        assert_eq!((t.https, t.host.as_str(), t.port, t.authority.as_str()), (true, "10.0.0.254", 7702, "10.0.0.254:7702"));
        assert_eq!(url_host("https://[::1]:7701").as_deref(), Some("::1"));
        assert!(Target::parse("ftp://h:1").is_err());
        assert_eq!(uri_addr("tcp:127.0.0.1:4444"), Some("127.0.0.1:4444".parse().expect("addr")));
    }

    /// A relayed connection carries bytes both ways, the server speaking first (as NBD
    /// does), through a tunnel route that answers 101.
    #[tokio::test]
    async fn a_relayed_connection_carries_bytes_both_ways_after_the_upgrade() {
        let qemu = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let qemu_addr = qemu.local_addr().expect("addr");
        let agent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let agent_url = format!("http://{}", agent.local_addr().expect("addr"));
        // The destination agent: answers 101, then splices to "QEMU".
        tokio::spawn(async move {
            let (mut c, _) = agent.accept().await.expect("accept");
            let head = read_head(&mut c).await.expect("head");
            assert!(head.starts_with("GET /v1/incoming/vm1/tunnel/nbd HTTP/1.1\r\n"), "{head}");
            let q = connect_target(qemu_addr).await.expect("qemu");
            c.write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: walkabout-tunnel\r\n\r\n")
                .await
                .expect("101");
            splice(c, q, "test").await;
        });
        tokio::spawn(async move {
            let (mut q, _) = qemu.accept().await.expect("accept");
            q.write_all(b"NBDMAGIC").await.expect("greet");
            let mut buf = [0u8; 4];
            q.read_exact(&mut buf).await.expect("read");
            q.write_all(&buf).await.expect("echo");
        });
        let reply = IncomingReply {
            uri: "tcp:127.0.0.1:1".into(),
            storage: None,
            nbd: Some(walkabout_api::migration::NbdTarget { host: "127.0.0.1".into(), port: 1, exports: vec![] }),
            tls: false,
            relay: true,
        };
        let relays = Relays::open(&Dialer::default(), &agent_url, "vm1", &reply).await.expect("relays");
        let nbd = relays.reply.nbd.clone().expect("nbd");
        assert_ne!(nbd.port, 1);
        let mut s = TcpStream::connect((nbd.host.as_str(), nbd.port)).await.expect("connect");
        let mut greet = [0u8; 8];
        s.read_exact(&mut greet).await.expect("greeting");
        s.write_all(b"ping").await.expect("write");
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await.expect("echo");
        assert_eq!((&greet, &echo), (b"NBDMAGIC", b"ping"));
    }

    /// A fake QEMU: echoes every connection's bytes back.
    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = c.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// Sends `msg` and reads it back: whether the connection still carries bytes.
    async fn echoes(s: &mut (impl Io + ?Sized), msg: &[u8]) -> bool {
        let mut back = vec![0u8; msg.len()];
        let sent = s.write_all(msg).await.is_ok() && s.flush().await.is_ok();
        sent && matches!(tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await, Ok(Ok(_))) && back == msg
    }

    /// The agent's listener closes a connection idle past its limit (300 ms here, 120 s
    /// in service), but a migration's tunnel outlives it (an NBD stream over a quiet disk,
    /// a paused post-copy) until the migration's tunnels close.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tunnel_outlives_the_idle_limit_that_closes_an_api_connection_and_ends_with_its_migration() {
        let dir = std::env::temp_dir().join(format!("wa-agent-tunnel-idle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = crate::vms::AgentConfig::new(dir.clone());
        config.accel = walkabout_qemu::AccelRequest::Tcg;
        config.capacity_mib = Some(1024);
        config.kernel = Some(dir.join("no-kernel"));
        let agent = crate::vms::Agent::start(config).await.expect("agent");
        let idle = Duration::from_millis(300);
        // The header deadline as short: a tunnel, its headers sent, outlives it too.
        let opts = walkabout_trust::ListenerOptions {
            handshake_timeout: Duration::from_secs(1),
            idle_timeout: idle,
            header_timeout: idle,
            ..walkabout_trust::ListenerOptions::default()
        };
        let listener = walkabout_trust::Listener::bind("127.0.0.1:0", None, opts).await.expect("listener");
        let (url, addr) = (listener.url(), listener.addr());
        tokio::spawn(crate::serve(agent.clone(), listener, std::future::pending()));
        // Plain loopback: the requests' identity is the loopback operator.
        let qemu = echo_server().await;
        agent.inner.tunnels.open("vm1", Tunnel { peer: walkabout_trust::serve::LOOPBACK_NAME.into(), memory: qemu, nbd: None });

        let target = Target::parse(&url).expect("url");
        let mut tunnel = Dialer::default().dial(&target, &TunnelStream::Memory.path("vm1")).await.expect("tunnel");
        let fresh = echoes(&mut tunnel, b"first").await;
        let mut api = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(idle * 4).await;
        let api_closed = matches!(tokio::time::timeout(Duration::from_secs(2), api.read(&mut [0u8; 16])).await, Ok(Ok(0) | Err(_)));
        let survived = echoes(&mut tunnel, b"after a quiet while").await;
        agent.inner.tunnels.close("vm1");
        let ended = matches!(tokio::time::timeout(Duration::from_secs(2), tunnel.read(&mut [0u8; 16])).await, Ok(Ok(0) | Err(_)));
        let _ = std::fs::remove_dir_all(&dir);

        assert!(fresh, "the tunnel carried nothing");
        assert!(api_closed, "an API connection idle for {:?} was kept open", idle * 4);
        assert!(survived, "the tunnel was cut after {:?} idle, its migration still on", idle * 4);
        assert!(ended, "the tunnel outlived its migration");
    }
}
