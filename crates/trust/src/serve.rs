//! Serving an axum router over mutual TLS, or over plain HTTP on loopback when asked.
//!
//! [`Listener`] accepts TCP connections in a task of its own, at most
//! [`ListenerOptions::max_connections`] open at once (one more is closed as soon as it is
//! accepted, and logged), completes each TLS handshake within
//! [`ListenerOptions::handshake_timeout`] (a stranger that opens a connection and says
//! nothing holds nothing), reads the client certificate's [`Identity`] once, and hands
//! the connection with its [`Peer`] to HTTP/1.1 (hyper). A request's headers must arrive
//! whole within [`ListenerOptions::header_timeout`] (a slow client sending headers one
//! byte at a time is cut then, however steady its trickle), and every connection is
//! closed after [`ListenerOptions::idle_timeout`] without a byte either way. A route that
//! turns its connection into a stream living as long as something else (the agent's
//! migration tunnels) lifts the idle limit through the request's [`IdleLimit`] and ends
//! the stream itself; its headers came whole before, and the stream keeps its place
//! among the listener's connections until it closes.
//!
//! [`serve`] adds the middleware that enforces [`crate::policy`]: 401 without an
//! identity, 403 for a role that may not, 413 for a body over [`MAX_BODY`]; and it
//! reports every change (any method but GET/HEAD) with who made it to an [`Audit`].

use crate::identity::{Identity, Role};
use crate::policy::{decide, Decision, ServerKind};
use crate::session::{Sessions, LOGIN_PATH};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use walkabout_api::{ErrorBody, ErrorKind};

/// The largest request body either server reads (413 beyond it).
pub const MAX_BODY: usize = 1 << 20;

/// The name plain loopback connections are recorded under.
pub const LOOPBACK_NAME: &str = "loopback";

/// Limits of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerOptions {
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Longest a connection may stay without a byte read or written.
    pub idle_timeout: Duration,
    /// Longest a client may take to send a request's headers, counted from when the
    /// server starts reading them (on a kept-alive connection, from its previous answer:
    /// an idle kept-alive connection is closed after this long too).
    pub header_timeout: Duration,
    /// Most connections open at once, TLS handshakes and upgraded streams included; one
    /// more is closed as soon as it is accepted.
    pub max_connections: usize,
}

/// [`ListenerOptions::header_timeout`] by default. Clients of `walkabout-api` keep idle
/// connections for less ([`walkabout_api::client::POOL_IDLE_TIMEOUT`]), so that a pooled
/// connection is not closed under a request just being sent.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(20);

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            header_timeout: HEADER_TIMEOUT,
            max_connections: 512,
        }
    }
}

/// The other end of a connection: its address and, over TLS with a client certificate
/// the CA signed, its identity. Plain loopback connections are the operator
/// [`LOOPBACK_NAME`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Who it is, if it said.
    pub identity: Option<Identity>,
    /// The connection's idle limit (also in every request's extensions).
    pub idle: IdleLimit,
}

/// The idle limit of one connection ([`ListenerOptions::idle_timeout`]), as its requests
/// see it (an extension of each): a route that upgrades the connection to a stream whose
/// life something else bounds lifts it, and must then end that stream itself.
#[derive(Debug, Clone, Default)]
pub struct IdleLimit(Arc<AtomicBool>);

impl IdleLimit {
    /// Lifts the limit for the rest of the connection's life: no idle period closes it.
    pub fn lift(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether the limit was lifted.
    pub fn is_lifted(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The same connection's limit.
impl PartialEq for IdleLimit {
    fn eq(&self, other: &IdleLimit) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for IdleLimit {}

/// Errors of binding a listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// Plain HTTP was asked for on an address other than loopback.
    #[error("plain HTTP is only served on loopback (127.0.0.1, ::1), not on {0}; give a TLS identity (--identity) instead")]
    PlainNotLoopback(SocketAddr),
}

/// A listener serving TLS (with a [`rustls::ServerConfig`]) or plain HTTP on loopback.
pub struct Listener {
    rx: tokio::sync::mpsc::Receiver<(Conn, Peer)>,
    local: SocketAddr,
    tls: bool,
    opts: ListenerOptions,
}

impl Listener {
    /// Binds `addr` and serves TLS with `tls`, or plain HTTP when `tls` is `None` (only
    /// on a loopback address).
    pub async fn bind(addr: &str, tls: Option<Arc<rustls::ServerConfig>>, opts: ListenerOptions) -> Result<Listener, ListenError> {
        let tcp = TcpListener::bind(addr).await.map_err(|source| ListenError::Bind { addr: addr.into(), source })?;
        Listener::from_tcp(tcp, tls, opts)
    }

    /// Serves on an already bound `tcp` (see [`Listener::bind`]).
    pub fn from_tcp(tcp: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, opts: ListenerOptions) -> Result<Listener, ListenError> {
        let local = tcp.local_addr().map_err(|source| ListenError::Bind { addr: "listener".into(), source })?;
        if tls.is_none() && !local.ip().is_loopback() {
            return Err(ListenError::PlainNotLoopback(local));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let is_tls = tls.is_some();
        tokio::spawn(accept_loop(tcp, tls.map(tokio_rustls::TlsAcceptor::from), opts, tx));
        Ok(Listener { rx, local, tls: is_tls, opts })
    }

    /// The URL clients use: `https://ADDR` or `http://ADDR`.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.local)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.local
    }
}

/// Refusals of connections over the cap, logged at most every [`Refusals::EVERY`] (a
/// flood of connections must not flood the log too).
struct Refusals {
    count: u64,
    logged: Option<tokio::time::Instant>,
}

impl Refusals {
    const EVERY: Duration = Duration::from_secs(10);

    fn refused(&mut self, addr: SocketAddr, local: Option<SocketAddr>, max: usize) {
        self.count += 1;
        if self.logged.is_some_and(|t| t.elapsed() < Refusals::EVERY) {
            return;
        }
        self.logged = Some(tokio::time::Instant::now());
        let port = local.map(|l| l.to_string()).unwrap_or_default();
        tracing::warn!(peer = %addr, refused = self.count, "closed a connection to {port}: {max} connections are open already (the listener's cap)");
    }
}

async fn accept_loop(
    tcp: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    opts: ListenerOptions,
    tx: tokio::sync::mpsc::Sender<(Conn, Peer)>,
) {
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let mut refusals = Refusals { count: 0, logged: None };
    let local = tcp.local_addr().ok();
    loop {
        let (sock, addr) = tokio::select! {
            _ = tx.closed() => return, // the server stopped: close the port
            r = tcp.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refusals.refused(addr, local, opts.max_connections);
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let tx = tx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let (stream, identity) = match tls {
                None => (Stream::Plain(sock), Some(Identity { name: LOOPBACK_NAME.into(), role: Role::Operator })),
                Some(acceptor) => match tokio::time::timeout(opts.handshake_timeout, acceptor.accept(sock)).await {
                    Ok(Ok(s)) => {
                        let identity = peer_identity(&s);
                        (Stream::Tls(Box::new(s)), identity)
                    }
                    Ok(Err(e)) => {
                        tracing::debug!("TLS handshake with {addr} failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake with {addr} timed out");
                        return;
                    }
                },
            };
            let io = IdleIo::new(stream, opts.idle_timeout);
            let idle = io.limit();
            let _ = tx.send((Conn { io, _slot: slot }, Peer { addr, identity, idle })).await;
        });
    }
}

/// The identity of a TLS client's verified certificate (none if it sent none or its
/// certificate names no valid identity).
fn peer_identity(s: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<Identity> {
    let cert = s.get_ref().1.peer_certificates()?.first()?;
    match Identity::from_der(cert) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!("a client certificate signed by the CA carries no usable identity: {e}");
            None
        }
    }
}

/// A served connection: TLS or plain.
pub enum Stream {
    /// Over TLS.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Plain TCP (loopback only).
    Plain(TcpStream),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An accepted connection: its stream under the idle limit, holding its place among the
/// listener's connections until it is dropped (after an upgrade, by the upgraded stream).
struct Conn {
    io: IdleIo<Stream>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A stream that fails with `TimedOut` once `idle` passes without a byte read or
/// written while the server waits on it, unless its [`IdleLimit`] was lifted.
pub struct IdleIo<S> {
    inner: S,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: IdleLimit,
}

impl<S> IdleIo<S> {
    /// Wraps `inner` with an idle limit of `idle`.
    pub fn new(inner: S, idle: Duration) -> IdleIo<S> {
        IdleIo { inner, idle, deadline: Box::pin(tokio::time::sleep(idle)), limit: IdleLimit::default() }
    }

    /// The handle that lifts this stream's limit.
    pub fn limit(&self) -> IdleLimit {
        self.limit.clone()
    }

    fn progress(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        !self.limit.is_lifted() && self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn idle_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "connection idle too long")
}

use std::future::Future;

impl<S: AsyncRead + Unpin> AsyncRead for IdleIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                me.progress();
                Poll::Ready(r)
            }
            Poll::Pending if me.expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        match Pin::new(&mut me.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                me.progress();
                Poll::Ready(r)
            }
            Poll::Pending if me.expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Told of every change a server accepted to do: who, the method, the path, the status.
pub type Audit = Arc<dyn Fn(&Identity, &str, &str, u16) + Send + Sync>;

#[derive(Clone)]
struct Guard {
    server: ServerKind,
    audit: Option<Audit>,
    /// The web console's sessions: there the identity is the session cookie's, never
    /// the connection's (a browser holds no certificate; any local user reaches
    /// loopback).
    sessions: Option<Arc<Sessions>>,
}

/// An error reply in the API's shape.
pub fn error_reply(status: StatusCode, kind: ErrorKind, message: String) -> Response {
    (status, axum::Json(ErrorBody::new(kind, message))).into_response()
}

/// Middleware giving every refusal the API's shape: a 4xx or 5xx reply that is not
/// JSON (one axum wrote itself: a path segment that is not UTF-8, an unknown route, a
/// method the route lacks) becomes an [`ErrorBody`] carrying axum's own sentence, so a
/// client always reads the cause the same way.
pub async fn error_bodies(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 16 * 1024).await.map(|b| String::from_utf8_lossy(&b).trim().to_string());
    let why = match text {
        Ok(t) if !t.is_empty() => t,
        _ => format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("error")),
    };
    let kind = match status {
        StatusCode::NOT_FOUND => ErrorKind::NotFound,
        StatusCode::UNAUTHORIZED => ErrorKind::Unauthenticated,
        StatusCode::FORBIDDEN => ErrorKind::Forbidden,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::TooLarge,
        _ => ErrorKind::InvalidRequest,
    };
    error_reply(status, kind, why)
}

async fn guard(State(g): State<Guard>, ConnectInfo(peer): ConnectInfo<Peer>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let identity = match &g.sessions {
        None => peer.identity.clone(),
        // The login route itself is how a browser gets its session.
        Some(_) if path == LOGIN_PATH => return next.run(req).await,
        Some(s) => match s.identity(req.headers()) {
            Some(id) => Some(id),
            None => {
                let m = format!(
                    "{method} {path} needs a console session: open the console URL with its one-time login token (printed by `walkabout up` or `walkabout controller --web-listen`, or ask `walkabout console-url`)"
                );
                return error_reply(StatusCode::UNAUTHORIZED, ErrorKind::Unauthenticated, m);
            }
        },
    };
    match decide(g.server, identity.as_ref(), &method, &path) {
        Decision::Allow | Decision::JoinToken => {}
        Decision::Unauthenticated(m) => return error_reply(StatusCode::UNAUTHORIZED, ErrorKind::Unauthenticated, m),
        Decision::Forbidden(m) => return error_reply(StatusCode::FORBIDDEN, ErrorKind::Forbidden, m),
    }
    let declared = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        error_reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::TooLarge,
            format!("the body of {method} {path} is larger than {MAX_BODY} bytes"),
        )
    };
    let upload = g.server == ServerKind::Agent && crate::policy::is_file_upload(&method, &path);
    if upload {
        // A checkpoint file: streamed to its handler, bounded by MAX_FILE_BODY.
        if declared.is_some_and(|n| n > crate::policy::MAX_FILE_BODY) {
            return error_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::TooLarge,
                format!("the body of {method} {path} is larger than {} bytes", crate::policy::MAX_FILE_BODY),
            );
        }
    } else if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let (mut parts, body) = req.into_parts();
    let body = if upload {
        body
    } else {
        match axum::body::to_bytes(body, MAX_BODY).await {
            Ok(b) => axum::body::Body::from(b),
            Err(_) => return too_large(),
        }
    };
    if let Some(id) = &identity {
        parts.extensions.insert(id.clone());
    }
    parts.extensions.insert(peer.idle.clone());
    let req = Request::from_parts(parts, body);
    let resp = next.run(req).await;
    if !matches!(method.as_str(), "GET" | "HEAD") {
        if let (Some(audit), Some(id)) = (&g.audit, &identity) {
            audit(id, &method, &path, resp.status().as_u16());
        }
    }
    resp
}

/// Serves `router` on `listener` for `server` until `shutdown`: the policy enforced,
/// bodies limited, changes reported to `audit`.
pub async fn serve(
    listener: Listener,
    router: axum::Router,
    server: ServerKind,
    audit: Option<Audit>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router.layer(axum::middleware::from_fn_with_state(Guard { server, audit, sessions: None }, guard));
    serve_router(listener, app, shutdown).await
}

/// Serves `app` on `listener`'s connections until `shutdown`, then lets the connections
/// finish what they are answering and waits for them.
async fn serve_router(listener: Listener, app: axum::Router, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let Listener { mut rx, opts, .. } = listener;
    // `stopping` tells the connections to finish; `open` is held by each until it ends.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let (open_tx, open) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (conn, peer) = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => c,
                // The accept task ended (it does not while `rx` lives).
                None => break,
            },
            () = &mut shutdown => break,
        };
        tokio::spawn(serve_connection(conn, peer, app.clone(), opts.header_timeout, stopping.clone(), open.clone()));
    }
    // Dropping the receiver closes the port (the accept task ends).
    drop(rx);
    let _ = stopping_tx.send(true);
    drop(open);
    open_tx.closed().await;
    Ok(())
}

/// Serves one connection over HTTP/1.1 (upgrades allowed), each request carrying its
/// [`Peer`] as axum's `ConnectInfo`; its request headers must come whole within
/// `header_timeout`.
async fn serve_connection(
    conn: Conn,
    peer: Peer,
    app: axum::Router,
    header_timeout: Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    _open: tokio::sync::watch::Receiver<()>,
) {
    use tower::ServiceExt;
    let addr = peer.addr;
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer.clone()));
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout);
    let mut conn = std::pin::pin!(http.serve_connection(hyper_util::rt::TokioIo::new(conn), service).with_upgrades());
    let stop = async move {
        // An error means the server is gone: stop too.
        let _ = stopping.wait_for(|s| *s).await;
    };
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = stop => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    match ended {
        Ok(()) => {}
        Err(e) if e.is_timeout() => {
            tracing::debug!(peer = %addr, "closed a connection whose request headers took longer than {header_timeout:?}")
        }
        Err(e) => tracing::debug!(peer = %addr, "connection ended: {e}"),
    }
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    #[serde(default)]
    token: String,
}

/// `GET /login?token=...`: uses the token up and answers the session cookie, sending
/// the browser on to the console (`/`, so the token leaves the address bar); 401 for a
/// token unknown, used or expired.
async fn login(State(sessions): State<Arc<Sessions>>, axum::extract::Query(q): axum::extract::Query<LoginQuery>) -> Response {
    match sessions.log_in(&q.token) {
        Ok((id, who)) => {
            tracing::info!(identity = %who, "console login");
            let cookie = sessions.set_cookie(&id);
            (StatusCode::SEE_OTHER, [(axum::http::header::LOCATION, "/".to_string()), (axum::http::header::SET_COOKIE, cookie)])
                .into_response()
        }
        Err(e) => {
            tracing::info!("console login refused: {e}");
            error_reply(StatusCode::UNAUTHORIZED, ErrorKind::Unauthenticated, e.to_string())
        }
    }
}

/// Serves the web console `router` on `listener` until `shutdown`: its requests judged
/// by [`crate::policy`] as the identity of their session cookie (none: 401), a session
/// opened at [`LOGIN_PATH`] with a one-time token of `sessions`, bodies limited, changes
/// reported to `audit`.
pub async fn serve_console(
    listener: Listener,
    router: axum::Router,
    sessions: Arc<Sessions>,
    audit: Option<Audit>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let guard_state = Guard { server: ServerKind::Controller, audit, sessions: Some(sessions.clone()) };
    let app = router
        .route(LOGIN_PATH, axum::routing::get(login).with_state(sessions))
        .layer(axum::middleware::from_fn_with_state(guard_state, guard));
    serve_router(listener, app, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let opts = ListenerOptions {
            handshake_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(300),
            ..ListenerOptions::default()
        };
        let l = Listener::bind("127.0.0.1:0", None, opts).await.expect("bind");
        let addr = l.addr();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        let _srv = tokio::spawn(serve(l, router, ServerKind::Agent, None, std::future::pending()));
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 16];
        // Say nothing: the server hangs up after the idle limit.
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("closed in time");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }

    /// A plain server of `GET /` ("hi") with `opts`.
    async fn hello(opts: ListenerOptions) -> SocketAddr {
        let l = Listener::bind("127.0.0.1:0", None, opts).await.expect("bind");
        let addr = l.addr();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        tokio::spawn(serve(l, router, ServerKind::Agent, None, std::future::pending()));
        addr
    }

    /// `GET /` on `s`, a kept-alive connection: the answer's first bytes (empty when
    /// the server closed the connection instead).
    async fn get_on(s: &mut TcpStream) -> String {
        use tokio::io::AsyncWriteExt;
        if s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.is_err() {
            return String::new();
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            _ => String::new(),
        }
    }

    #[tokio::test]
    async fn a_client_trickling_its_headers_is_cut_at_the_header_deadline() {
        use tokio::io::AsyncWriteExt;
        let header_timeout = Duration::from_millis(500);
        let addr = hello(ListenerOptions { header_timeout, idle_timeout: Duration::from_secs(30), ..ListenerOptions::default() }).await;
        let s = TcpStream::connect(addr).await.expect("connect");
        let (mut rd, mut wr) = s.into_split();
        let started = tokio::time::Instant::now();
        // One byte every 50 ms: never idle, never done.
        let trickle = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ".iter().chain(std::iter::repeat(&b'a')) {
                if wr.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut out = vec![];
        let closed = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out)).await;
        let took = started.elapsed();
        trickle.abort();

        assert!(closed.is_ok(), "a trickling client held its connection for 10 s");
        assert!(took >= header_timeout, "closed after {took:?}, before the deadline");
        assert!(!String::from_utf8_lossy(&out).contains(" 200 "), "{}", String::from_utf8_lossy(&out));
    }

    #[tokio::test]
    async fn a_connection_over_the_cap_is_closed_while_the_others_are_served() {
        let addr = hello(ListenerOptions { max_connections: 2, ..ListenerOptions::default() }).await;
        let mut first = TcpStream::connect(addr).await.expect("connect");
        let mut second = TcpStream::connect(addr).await.expect("connect");
        let first_served = get_on(&mut first).await;
        let second_served = get_on(&mut second).await;
        let mut third = TcpStream::connect(addr).await.expect("connect");
        let third_served = get_on(&mut third).await;
        let mut buf = [0u8; 16];
        let third_closed = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf)).await;
        let first_again = get_on(&mut first).await;
        drop(second);
        // Its place frees once the server has seen it close.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let later = loop {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let answer = get_on(&mut s).await;
            if !answer.is_empty() || tokio::time::Instant::now() > deadline {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };

        assert!(first_served.starts_with("HTTP/1.1 200") && second_served.starts_with("HTTP/1.1 200"), "{first_served} {second_served}");
        assert_eq!(third_served, "", "the connection over the cap was served");
        assert!(matches!(third_closed, Ok(Ok(0) | Err(_))), "the connection over the cap stayed open: {third_closed:?}");
        assert!(first_again.starts_with("HTTP/1.1 200"), "{first_again}");
        assert!(later.starts_with("HTTP/1.1 200"), "a closed connection kept its place: {later}");
    }

    #[tokio::test]
    async fn a_stream_whose_idle_limit_was_lifted_waits_past_it() {
        let (a, mut b) = tokio::io::duplex(64);
        let idle = Duration::from_millis(100);
        let mut kept = IdleIo::new(a, idle);
        kept.limit().lift();
        let mut buf = [0u8; 4];
        let quiet = tokio::time::timeout(idle * 5, kept.read(&mut buf)).await;
        tokio::io::AsyncWriteExt::write_all(&mut b, b"late").await.expect("write");
        let late = kept.read(&mut buf).await;

        assert!(quiet.is_err(), "a lifted limit still closed the stream: {quiet:?}");
        assert_eq!(late.ok(), Some(4));
    }

    #[tokio::test]
    async fn a_checkpoint_file_upload_streams_past_the_limit_to_its_handler() {
        use tokio::io::AsyncWriteExt;
        let l = Listener::bind("127.0.0.1:0", None, ListenerOptions::default()).await.expect("bind");
        let addr = l.addr();
        let count = |body: axum::body::Body| async move {
            axum::body::to_bytes(body, usize::MAX).await.map(|b| b.len().to_string()).unwrap_or_default()
        };
        let router = axum::Router::new().route("/v1/replicas/{vm}/files/{file}", axum::routing::put(count));
        let _srv = tokio::spawn(serve(l, router, ServerKind::Agent, None, std::future::pending()));
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let len = 3 * MAX_BODY;
        let head = format!("PUT /v1/replicas/vm1/files/vm1.1.mem HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
        s.write_all(head.as_bytes()).await.expect("write");
        s.write_all(&vec![7u8; len]).await.expect("body");
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("an answer").expect("read");
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with(&len.to_string()), "{text}");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_before_the_handler() {
        use tokio::io::AsyncWriteExt;
        let l = Listener::bind("127.0.0.1:0", None, ListenerOptions::default()).await.expect("bind");
        let addr = l.addr();
        let router = axum::Router::new().route("/v1/vms", axum::routing::post(|| async { "created" }));
        let _srv = tokio::spawn(serve(l, router, ServerKind::Agent, None, std::future::pending()));
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let head =
            format!("POST /v1/vms HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", MAX_BODY + 1);
        s.write_all(head.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("an answer").expect("read");
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    }

    /// One HTTP/1.1 request on a new connection; the whole answer.
    async fn http(addr: SocketAddr, method: &str, path: &str, cookie: Option<&str>) -> String {
        use tokio::io::AsyncWriteExt;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let cookie = cookie.map(|c| format!("cookie: {c}\r\n")).unwrap_or_default();
        let req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\n{cookie}content-length: 0\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = vec![];
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.expect("an answer").expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The `name=value` part of the answer's `Set-Cookie`, and the whole header.
    fn set_cookie(answer: &str) -> (String, String) {
        let line = answer.lines().find_map(|l| l.strip_prefix("set-cookie: ")).unwrap_or_default().to_string();
        (line.split(';').next().unwrap_or_default().to_string(), line)
    }

    #[tokio::test]
    async fn the_console_needs_a_session_its_token_works_once_and_a_viewer_changes_nothing() {
        let l = Listener::bind("127.0.0.1:0", None, ListenerOptions::default()).await.expect("bind");
        let addr = l.addr();
        let sessions = Arc::new(Sessions::new(addr.port()));
        let op = sessions.issue(Identity { name: "operator".into(), role: Role::Operator }, Duration::from_secs(60)).expect("token");
        let viewer = sessions.issue(Identity { name: "eve".into(), role: Role::Viewer }, Duration::from_secs(60)).expect("token");
        let router = axum::Router::new().route("/v1/plans", axum::routing::get(|| async { "plans" }).post(|| async { "planned" }));
        let _srv = tokio::spawn(serve_console(l, router, sessions, None, std::future::pending()));

        let anonymous = http(addr, "GET", "/v1/plans", None).await;
        let first = http(addr, "GET", &format!("/login?token={op}"), None).await;
        let second = http(addr, "GET", &format!("/login?token={op}"), None).await;
        let (op_cookie, header) = set_cookie(&first);
        let op_reads = http(addr, "GET", "/v1/plans", Some(&op_cookie)).await;
        let op_changes = http(addr, "POST", "/v1/plans", Some(&op_cookie)).await;
        let (viewer_cookie, _) = set_cookie(&http(addr, "GET", &format!("/login?token={viewer}"), None).await);
        let viewer_reads = http(addr, "GET", "/v1/plans", Some(&viewer_cookie)).await;
        let viewer_changes = http(addr, "POST", "/v1/plans", Some(&viewer_cookie)).await;

        assert!(anonymous.starts_with("HTTP/1.1 401") && anonymous.contains("console session"), "{anonymous}");
        assert!(first.starts_with("HTTP/1.1 303") && first.contains("location: /\r\n"), "{first}");
        assert!(header.contains("HttpOnly") && header.contains("SameSite=Strict"), "{header}");
        assert!(second.starts_with("HTTP/1.1 401") && second.contains("already used"), "{second}");
        assert!(op_reads.starts_with("HTTP/1.1 200") && op_reads.ends_with("plans"), "{op_reads}");
        assert!(op_changes.starts_with("HTTP/1.1 200") && op_changes.ends_with("planned"), "{op_changes}");
        assert!(viewer_reads.starts_with("HTTP/1.1 200"), "{viewer_reads}");
        assert!(viewer_changes.starts_with("HTTP/1.1 403") && viewer_changes.contains("eve (viewer) may only read"), "{viewer_changes}");
    }

    #[tokio::test]
    async fn plain_http_is_refused_off_loopback() {
        let tcp = TcpListener::bind("0.0.0.0:0").await.expect("bind");
        assert!(matches!(Listener::from_tcp(tcp, None, ListenerOptions::default()), Err(ListenError::PlainNotLoopback(_))));
    }
}
