//! Typed async clients, one per server: [`AgentClient`] and [`ControllerClient`].
//!
//! Every call has a connect timeout and a whole-request timeout ([`ClientOptions`]), so
//! a server that accepts and never answers gives a [`ClientError::Timeout`] naming it,
//! never a hang. Error replies become [`ClientError::Api`] with the server's
//! [`ErrorBody`]; match on its [`ErrorKind`], not on the sentence.

use crate::checkpoint::{
    Checkpoint, CheckpointFile, CheckpointRequest, CommitCheckpoint, Encoding, FileUpload, ForwardReplica, Protection, ReplicaState,
    RestoreReply, RestoreRequest,
};
use crate::cluster::{AddHost, BalanceConfig, BalanceStatus, ClusterMigration, ClusterSummary, ClusterVm, CreateVm, Host, MoveVm};
use crate::error::{ErrorBody, ErrorKind};
use crate::event::Event;
use crate::host::{CpuCatalog, HostInfo};
use crate::migration::{CommitRequest, IncomingReply, IncomingRequest, MigrationRecord, MigrationRequest, RecoverRequest};
use crate::plan::{Goal, PlanRecord};
use crate::trust::{JoinReply, JoinRequest, JoinToken, JoinTokenRequest};
use crate::vm::{ConsoleChunk, GuestStatus, VmInfo, VmSpec};
use crate::walk::{WalkOptions, WalkRecord};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How long a client keeps an idle connection for its next request: less than the
/// servers' header deadline (`walkabout_trust::serve::HEADER_TIMEOUT`, 20 s), after which
/// a server closes an idle kept-alive connection, so that a request is never sent on a
/// connection the server is closing.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// The TLS side of a client: a rustls configuration trusting the cluster CA and, for
/// every route but the join, presenting this process's certificate (see the
/// `walkabout-trust` crate, which builds it from an identity bundle).
pub type Tls = Arc<rustls::ClientConfig>;

/// The TLS configuration of every client this process makes without one of its own
/// (the agent's host identity, the controller's, the CLI's `--identity`).
static PROCESS_TLS: OnceLock<Tls> = OnceLock::new();

/// Sets the TLS configuration of every `https://` client this process makes with
/// [`AgentClient::new`] / [`ControllerClient::new`]. Set once, before any client is
/// made (later calls are ignored: one process, one identity).
pub fn set_process_tls(tls: Tls) {
    let _ = PROCESS_TLS.set(tls);
}

/// The process's TLS configuration, if one was set.
pub fn process_tls() -> Option<Tls> {
    PROCESS_TLS.get().cloned()
}

/// Timeouts of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// Longest wait for the TCP connection.
    pub connect_timeout: Duration,
    /// Longest wait for a whole request, reply body included (not for event streams).
    pub request_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(30) }
    }
}

/// Errors of a call to a Walkabout server.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server URL is not usable.
    #[error("{url:?} is not a server URL: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server could not be reached (connection refused, no route, reset).
    #[error("cannot reach {url}: {detail}")]
    Unreachable {
        /// The server.
        url: String,
        /// What the transport said.
        detail: String,
    },
    /// The server did not answer in time.
    #[error("{url} did not answer {method} {path} within {timeout_ms} ms")]
    Timeout {
        /// The server.
        url: String,
        /// The method.
        method: String,
        /// The path asked for.
        path: String,
        /// The limit.
        timeout_ms: u64,
    },
    /// The server answered with an error.
    #[error("{}", body.error)]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's error.
        body: ErrorBody,
    },
    /// The server's answer could not be understood.
    #[error("{url} answered {path} with something unexpected: {detail}")]
    Decode {
        /// The server.
        url: String,
        /// The path asked for.
        path: String,
        /// What did not parse.
        detail: String,
    },
}

impl ClientError {
    /// The server's error kind, when it answered with an error.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api { body, .. } => Some(body.kind),
            _ => None,
        }
    }

    /// The HTTP status, when the server answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when the server did not answer at all (unreachable or timed out).
    pub fn is_transport(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. } | ClientError::Timeout { .. })
    }
}

/// Percent-encodes one path segment.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The HTTP plumbing shared by both clients.
#[derive(Clone)]
struct Http {
    base: String,
    http: reqwest::Client,
    timeout: Duration,
    /// Sent as [`EPOCH_HEADER`](crate::EPOCH_HEADER) with every request, when set.
    epoch: Option<u64>,
    /// Sent as [`CONTROLLER_HEADER`](crate::CONTROLLER_HEADER) with every request, when
    /// set (the controller's name: agents fence themselves without it).
    controller: Option<String>,
}

impl Http {
    fn new(base: &str, opts: ClientOptions, tls: Option<Tls>) -> Result<Http, ClientError> {
        let base = base.trim().trim_end_matches('/').to_string();
        const EXPECTED: &str = "expected http://HOST:PORT or https://HOST:PORT (e.g. http://127.0.0.1:7701)";
        let url = reqwest::Url::parse(&base).map_err(|e| ClientError::BadUrl { url: base.clone(), reason: format!("{e}; {EXPECTED}") })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(ClientError::BadUrl { url: base, reason: EXPECTED.into() });
        }
        let mut builder = reqwest::Client::builder().connect_timeout(opts.connect_timeout).pool_idle_timeout(POOL_IDLE_TIMEOUT);
        if url.scheme() == "https" {
            let Some(tls) = tls.or_else(process_tls) else {
                return Err(ClientError::BadUrl {
                    url: base,
                    reason: "https needs the cluster's CA and an identity (--identity FILE, walkabout user add)".into(),
                });
            };
            builder = builder.use_preconfigured_tls(rustls::ClientConfig::clone(&tls)).https_only(true);
        }
        let http =
            builder.build().map_err(|e| ClientError::BadUrl { url: base.clone(), reason: format!("cannot build an HTTP client: {e}") })?;
        Ok(Http { base, http, timeout: opts.request_timeout, epoch: None, controller: None })
    }

    fn transport(&self, e: &reqwest::Error, method: &Method, path: &str, timeout: Option<Duration>) -> ClientError {
        if e.is_timeout() {
            return ClientError::Timeout {
                url: self.base.clone(),
                method: method.to_string(),
                path: path.to_string(),
                timeout_ms: u64::try_from(timeout.unwrap_or(self.timeout).as_millis()).unwrap_or(u64::MAX),
            };
        }
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            detail = format!("{detail}: {s}");
            source = s.source();
        }
        ClientError::Unreachable { url: self.base.clone(), detail }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, ClientError> {
        self.send_req(self.http.request(method.clone(), format!("{}{path}", self.base)), method, path, body, timeout).await
    }

    async fn send_auth(&self, method: Method, path: &str, body: Option<Vec<u8>>, token: &str) -> Result<reqwest::Response, ClientError> {
        let req = self.http.request(method.clone(), format!("{}{path}", self.base)).bearer_auth(token);
        self.send_req(req, method, path, body, None).await
    }

    async fn send_req(
        &self,
        mut req: reqwest::RequestBuilder,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, ClientError> {
        if let Some(t) = timeout.or(Some(self.timeout)) {
            req = req.timeout(t);
        }
        if let Some(epoch) = self.epoch {
            req = req.header(crate::EPOCH_HEADER, epoch.to_string());
        }
        if let Some(name) = &self.controller {
            req = req.header(crate::CONTROLLER_HEADER, name.as_str());
        }
        if let Some(b) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(b);
        }
        let resp = req.send().await.map_err(|e| self.transport(&e, &method, path, timeout))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.map_err(|e| self.transport(&e, &method, path, timeout))?;
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| {
            ErrorBody::new(
                ErrorKind::Other,
                format!("{} answered {method} {path} with HTTP {status}: {}", self.base, String::from_utf8_lossy(&bytes).trim()),
            )
        });
        Err(ClientError::Api { status: status.as_u16(), body })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        timeout: Option<Duration>,
    ) -> Result<T, ClientError> {
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| ClientError::Decode {
                url: self.base.clone(),
                path: path.into(),
                detail: format!("cannot encode the request: {e}"),
            })?),
            None => None,
        };
        let resp = self.send(method.clone(), path, body, timeout).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport(&e, &method, path, timeout))?;
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|e| ClientError::Decode { url: self.base.clone(), path: path.into(), detail: e.to_string() })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>, None).await
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: Option<&(impl Serialize + ?Sized)>) -> Result<T, ClientError> {
        self.call(Method::POST, path, body, None).await
    }

    /// `PUT` of raw bytes (`application/octet-stream`), the JSON reply decoded.
    async fn put_bytes<T: DeserializeOwned>(&self, path: &str, body: Vec<u8>) -> Result<T, ClientError> {
        let method = Method::PUT;
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base)).timeout(self.timeout);
        if let Some(epoch) = self.epoch {
            req = req.header(crate::EPOCH_HEADER, epoch.to_string());
        }
        let req = req.header(reqwest::header::CONTENT_TYPE, "application/octet-stream").body(body);
        let resp = req.send().await.map_err(|e| self.transport(&e, &method, path, None))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.transport(&e, &method, path, None))?;
        if !status.is_success() {
            let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| {
                ErrorBody::new(
                    ErrorKind::Other,
                    format!("{} answered {method} {path} with HTTP {status}: {}", self.base, String::from_utf8_lossy(&bytes).trim()),
                )
            });
            return Err(ClientError::Api { status: status.as_u16(), body });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode { url: self.base.clone(), path: path.into(), detail: e.to_string() })
    }

    async fn put<T: DeserializeOwned>(&self, path: &str, body: &(impl Serialize + ?Sized)) -> Result<T, ClientError> {
        self.call(Method::PUT, path, Some(body), None).await
    }

    async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None::<&()>, None).await
    }

    async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, path, None, None).await.map(|_| ())
    }

    async fn text(&self, path: &str) -> Result<String, ClientError> {
        let resp = self.send(Method::GET, path, None, None).await?;
        resp.text().await.map_err(|e| self.transport(&e, &Method::GET, path, None))
    }

    async fn stream<T: DeserializeOwned>(&self, path: &str) -> Result<SseStream<T>, ClientError> {
        let resp = self.send(Method::GET, path, None, Some(Duration::from_secs(u64::from(u32::MAX)))).await?;
        Ok(SseStream { resp, buf: Vec::new(), base: self.base.clone(), path: path.into(), _t: std::marker::PhantomData })
    }
}

/// A server-sent event stream of `T`s (each message's `data:` is one JSON `T`).
pub struct SseStream<T> {
    resp: reqwest::Response,
    buf: Vec<u8>,
    base: String,
    path: String,
    _t: std::marker::PhantomData<T>,
}

impl<T: DeserializeOwned> SseStream<T> {
    /// The next message; `None` when the server ends the stream.
    pub async fn next(&mut self) -> Option<Result<T, ClientError>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let msg: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&msg);
                let data: Vec<&str> =
                    text.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some(serde_json::from_str(&data.join("\n")).map_err(|e| ClientError::Decode {
                    url: self.base.clone(),
                    path: self.path.clone(),
                    detail: e.to_string(),
                }));
            }
            match self.resp.chunk().await {
                Ok(Some(c)) => self.buf.extend_from_slice(&c),
                Ok(None) => return None,
                Err(e) => return Some(Err(ClientError::Unreachable { url: self.base.clone(), detail: e.to_string() })),
            }
        }
    }
}

/// A client of one agent's API.
#[derive(Clone)]
pub struct AgentClient {
    http: Http,
}

impl AgentClient {
    /// A client of the agent at `url` (e.g. `http://127.0.0.1:7701`).
    pub fn new(url: &str, opts: ClientOptions) -> Result<AgentClient, ClientError> {
        Ok(AgentClient { http: Http::new(url, opts, None)? })
    }

    /// A client of the agent at `url` with its own TLS configuration (an `https://` URL).
    pub fn with_tls(url: &str, opts: ClientOptions, tls: Tls) -> Result<AgentClient, ClientError> {
        Ok(AgentClient { http: Http::new(url, opts, Some(tls))? })
    }

    /// The same client with another whole-request timeout (a probe, a slow create).
    pub fn with_timeout(&self, timeout: Duration) -> AgentClient {
        AgentClient { http: Http { timeout, ..self.http.clone() } }
    }

    /// The same client sending the leading controller's `epoch` with every request
    /// (header [`EPOCH_HEADER`](crate::EPOCH_HEADER)): the agent refuses it once it has
    /// seen a newer leader.
    pub fn with_epoch(&self, epoch: u64) -> AgentClient {
        AgentClient { http: Http { epoch: Some(epoch), ..self.http.clone() } }
    }

    /// The agent's URL.
    pub fn url(&self) -> &str {
        &self.http.base
    }

    /// `GET /v1/host`.
    pub async fn host(&self) -> Result<HostInfo, ClientError> {
        self.http.get("/v1/host").await
    }
    /// `GET /v1/host/cpu`.
    pub async fn cpu(&self) -> Result<CpuCatalog, ClientError> {
        self.http.get("/v1/host/cpu").await
    }
    /// `GET /v1/vms`.
    pub async fn vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.http.get("/v1/vms").await
    }
    /// `GET /v1/vms/{name}`.
    pub async fn vm(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.http.get(&format!("/v1/vms/{}", seg(name))).await
    }
    /// `POST /v1/vms`: creates and starts a VM (returns once QEMU runs).
    pub async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo, ClientError> {
        self.http.post("/v1/vms", Some(spec)).await
    }
    /// `DELETE /v1/vms/{name}`.
    pub async fn delete_vm(&self, name: &str) -> Result<(), ClientError> {
        self.http.delete(&format!("/v1/vms/{}", seg(name))).await
    }
    /// `POST /v1/vms/{name}/pause`.
    pub async fn pause(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.http.post(&format!("/v1/vms/{}/pause", seg(name)), None::<&()>).await
    }
    /// `POST /v1/vms/{name}/resume`.
    pub async fn resume(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.http.post(&format!("/v1/vms/{}/resume", seg(name)), None::<&()>).await
    }
    /// `POST /v1/vms/{name}/stop`.
    pub async fn stop(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.http.post(&format!("/v1/vms/{}/stop", seg(name)), None::<&()>).await
    }
    /// `GET /v1/vms/{name}/console?offset=N`.
    pub async fn console(&self, name: &str, offset: u64) -> Result<ConsoleChunk, ClientError> {
        self.http.get(&format!("/v1/vms/{}/console?offset={offset}", seg(name))).await
    }
    /// `GET /v1/will`: the free-will requests of this agent's guests awaiting an answer.
    pub async fn will_requests(&self) -> Result<Vec<crate::WillRequest>, ClientError> {
        self.http.get("/v1/will").await
    }
    /// `GET /v1/audit`: the last changes made on this agent, with who made them.
    pub async fn audit(&self) -> Result<Vec<Event>, ClientError> {
        self.http.get("/v1/audit").await
    }
    /// `POST /v1/vms/{name}/will/answer`: writes the answer on the guest's port.
    pub async fn will_answer(&self, name: &str, answer: &crate::WillAnswer) -> Result<crate::WillAnswer, ClientError> {
        self.http.post(&format!("/v1/vms/{}/will/answer", seg(name)), Some(answer)).await
    }
    /// `GET /v1/migrations`.
    pub async fn migrations(&self) -> Result<Vec<MigrationRecord>, ClientError> {
        self.http.get("/v1/migrations").await
    }
    /// `GET /v1/migrations/{id}`.
    pub async fn migration(&self, id: &str) -> Result<MigrationRecord, ClientError> {
        self.http.get(&format!("/v1/migrations/{}", seg(id))).await
    }
    /// `POST /v1/migrations`: starts migrating a VM of this agent; returns at once.
    pub async fn start_migration(&self, req: &MigrationRequest) -> Result<MigrationRecord, ClientError> {
        self.http.post("/v1/migrations", Some(req)).await
    }
    /// `POST /v1/migrations/{id}/cancel` (before switchover only; idempotent).
    pub async fn cancel_migration(&self, id: &str) -> Result<MigrationRecord, ClientError> {
        self.http.post(&format!("/v1/migrations/{}/cancel", seg(id)), None::<&()>).await
    }
    /// `GET /v1/migrations/{id}/events`: the migration's record at every change, until final.
    pub async fn migration_events(&self, id: &str) -> Result<SseStream<MigrationRecord>, ClientError> {
        self.http.stream(&format!("/v1/migrations/{}/events", seg(id))).await
    }
    /// `POST /v1/vms/{name}/checkpoint`: takes a checkpoint now (and ships it if asked).
    pub async fn checkpoint(&self, name: &str, req: &CheckpointRequest) -> Result<Checkpoint, ClientError> {
        self.http.post(&format!("/v1/vms/{}/checkpoint", seg(name)), Some(req)).await
    }
    /// `GET /v1/checkpoints`: every checkpoint this agent holds (taken or received).
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>, ClientError> {
        self.http.get("/v1/checkpoints").await
    }
    /// `GET /v1/checkpoints/{id}`.
    pub async fn checkpoint_info(&self, id: &str) -> Result<Checkpoint, ClientError> {
        self.http.get(&format!("/v1/checkpoints/{}", seg(id))).await
    }
    /// `DELETE /v1/checkpoints/{id}`.
    pub async fn delete_checkpoint(&self, id: &str) -> Result<(), ClientError> {
        self.http.delete(&format!("/v1/checkpoints/{}", seg(id))).await
    }
    /// `POST /v1/checkpoints/{id}/restore`: starts a VM from a checkpoint held here.
    pub async fn restore_checkpoint(&self, id: &str, req: &RestoreRequest) -> Result<RestoreReply, ClientError> {
        self.http.post(&format!("/v1/checkpoints/{}/restore", seg(id)), Some(req)).await
    }
    /// `PUT /v1/vms/{name}/protection`: checkpoints shipped to a replica, periodically.
    pub async fn protect(&self, name: &str, p: &Protection) -> Result<VmInfo, ClientError> {
        self.http.put(&format!("/v1/vms/{}/protection", seg(name)), p).await
    }
    /// `DELETE /v1/vms/{name}/protection`.
    pub async fn unprotect(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.http.delete_json(&format!("/v1/vms/{}/protection", seg(name))).await
    }
    /// `GET /v1/replicas` (host to host): every replica this agent holds.
    pub async fn replicas(&self) -> Result<Vec<ReplicaState>, ClientError> {
        self.http.get("/v1/replicas").await
    }
    /// `GET /v1/replicas/{vm}`: what this agent holds of `vm`.
    pub async fn replica(&self, vm: &str) -> Result<ReplicaState, ClientError> {
        self.http.get(&format!("/v1/replicas/{}", seg(vm))).await
    }
    /// `DELETE /v1/replicas/{vm}`.
    pub async fn delete_replica(&self, vm: &str) -> Result<(), ClientError> {
        self.http.delete(&format!("/v1/replicas/{}", seg(vm))).await
    }
    /// `PUT /v1/replicas/{vm}/files/{file}`: one checkpoint file, encoded as `upload` says.
    pub async fn put_replica_file(&self, vm: &str, file: &str, upload: &FileUpload, body: Vec<u8>) -> Result<CheckpointFile, ClientError> {
        let mut q = format!(
            "sha256={}&encoding={}",
            seg(&upload.sha256),
            match upload.encoding {
                Encoding::Whole => "whole",
                Encoding::Extents => "extents",
            }
        );
        if let Some(b) = &upload.base {
            q.push_str(&format!("&base={}", seg(b)));
        }
        self.http.put_bytes(&format!("/v1/replicas/{}/files/{}?{q}", seg(vm), seg(file)), body).await
    }
    /// `POST /v1/replicas/{vm}/checkpoints`: commits a checkpoint whose files arrived.
    pub async fn commit_replica(&self, vm: &str, req: &CommitCheckpoint) -> Result<ReplicaState, ClientError> {
        self.http.post(&format!("/v1/replicas/{}/checkpoints", seg(vm)), Some(req)).await
    }
    /// `POST /v1/replicas/{vm}/forward` (controller and operators only): sends `vm`'s
    /// newest checkpoint that verifies to another agent; returns it as forwarded.
    pub async fn forward_replica(&self, vm: &str, req: &ForwardReplica) -> Result<Checkpoint, ClientError> {
        self.http.post(&format!("/v1/replicas/{}/forward", seg(vm)), Some(req)).await
    }
    /// `POST /v1/replicas/{vm}/restore`: starts `vm` from its newest checkpoint that verifies.
    pub async fn restore_replica(&self, vm: &str, req: &RestoreRequest) -> Result<RestoreReply, ClientError> {
        self.http.post(&format!("/v1/replicas/{}/restore", seg(vm)), Some(req)).await
    }

    /// `POST /v1/incoming` (agent to agent): prepares this host to receive a VM.
    pub async fn prepare_incoming(&self, req: &IncomingRequest) -> Result<IncomingReply, ClientError> {
        self.http.post("/v1/incoming", Some(req)).await
    }
    /// `GET /v1/incoming/{name}`: the source's liveness probe (renews the destination's lease).
    pub async fn incoming(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.http.get(&format!("/v1/incoming/{}", seg(name))).await
    }
    /// `POST /v1/incoming/{name}/commit`: the ownership hand-over after switchover.
    pub async fn commit_incoming(&self, name: &str, guest: Option<GuestStatus>) -> Result<VmInfo, ClientError> {
        self.http.post(&format!("/v1/incoming/{}/commit", seg(name)), Some(&CommitRequest { guest })).await
    }
    /// `POST /v1/incoming/{name}/recover`: a paused post-copy listens again; where to
    /// resume sending.
    pub async fn recover_incoming(&self, name: &str, req: &RecoverRequest) -> Result<IncomingReply, ClientError> {
        self.http.post(&format!("/v1/incoming/{}/recover", seg(name)), Some(req)).await
    }
    /// `DELETE /v1/incoming/{name}`: tears down an incoming VM that never ran there.
    pub async fn abort_incoming(&self, name: &str) -> Result<(), ClientError> {
        self.http.delete(&format!("/v1/incoming/{}", seg(name))).await
    }
    /// `GET /metrics` (Prometheus text).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        self.http.text("/metrics").await
    }
    /// `GET /v1/openapi.json`.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.http.get("/v1/openapi.json").await
    }
}

/// A client of the controller's API.
#[derive(Clone)]
pub struct ControllerClient {
    http: Http,
}

impl ControllerClient {
    /// A client of the controller at `url` (e.g. `http://127.0.0.1:7700`).
    pub fn new(url: &str, opts: ClientOptions) -> Result<ControllerClient, ClientError> {
        Ok(ControllerClient { http: Http::new(url, opts, None)? })
    }

    /// A client of the controller at `url` with its own TLS configuration.
    pub fn with_tls(url: &str, opts: ClientOptions, tls: Tls) -> Result<ControllerClient, ClientError> {
        Ok(ControllerClient { http: Http::new(url, opts, Some(tls))? })
    }

    /// The same client with another whole-request timeout.
    pub fn with_timeout(&self, timeout: Duration) -> ControllerClient {
        ControllerClient { http: Http { timeout, ..self.http.clone() } }
    }

    /// The controller's URL.
    pub fn url(&self) -> &str {
        &self.http.base
    }

    /// `POST /v1/join-tokens`: a short-lived token for one host to join with.
    pub async fn join_token(&self, req: &JoinTokenRequest) -> Result<JoinToken, ClientError> {
        self.http.post("/v1/join-tokens", Some(req)).await
    }
    /// `POST /v1/join` with the token: the host's certificate for its CSR. Needs no
    /// client certificate (the client may be [`crate::client::Tls`] without one).
    pub async fn join(&self, token: &str, req: &JoinRequest) -> Result<JoinReply, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode {
            url: self.http.base.clone(),
            path: "/v1/join".into(),
            detail: format!("cannot encode the request: {e}"),
        })?;
        let resp = self.http.send_auth(Method::POST, "/v1/join", Some(body), token).await?;
        let bytes = resp.bytes().await.map_err(|e| self.http.transport(&e, &Method::POST, "/v1/join", None))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            url: self.http.base.clone(),
            path: "/v1/join".into(),
            detail: e.to_string(),
        })
    }

    /// `GET /v1/cluster`.
    pub async fn cluster(&self) -> Result<ClusterSummary, ClientError> {
        self.http.get("/v1/cluster").await
    }
    /// `GET /v1/hosts`.
    pub async fn hosts(&self) -> Result<Vec<Host>, ClientError> {
        self.http.get("/v1/hosts").await
    }
    /// `POST /v1/hosts`: registers an agent.
    pub async fn add_host(&self, req: &AddHost) -> Result<Host, ClientError> {
        self.http.post("/v1/hosts", Some(req)).await
    }
    /// `GET /v1/hosts/{name}`.
    pub async fn host(&self, name: &str) -> Result<Host, ClientError> {
        self.http.get(&format!("/v1/hosts/{}", seg(name))).await
    }
    /// `DELETE /v1/hosts/{name}`: takes a host without VMs out of the cluster.
    pub async fn remove_host(&self, name: &str) -> Result<(), ClientError> {
        self.http.delete(&format!("/v1/hosts/{}", seg(name))).await
    }
    /// `POST /v1/hosts/{name}/drain`: maintenance and a drain plan, executed.
    pub async fn drain(&self, name: &str) -> Result<PlanRecord, ClientError> {
        self.http.post(&format!("/v1/hosts/{}/drain", seg(name)), None::<&()>).await
    }
    /// `POST /v1/hosts/{name}/undrain`: back in service.
    pub async fn undrain(&self, name: &str) -> Result<Host, ClientError> {
        self.http.post(&format!("/v1/hosts/{}/undrain", seg(name)), None::<&()>).await
    }
    /// `GET /v1/vms`.
    pub async fn vms(&self) -> Result<Vec<ClusterVm>, ClientError> {
        self.http.get("/v1/vms").await
    }
    /// `GET /v1/vms/{name}`.
    pub async fn vm(&self, name: &str) -> Result<ClusterVm, ClientError> {
        self.http.get(&format!("/v1/vms/{}", seg(name))).await
    }
    /// `POST /v1/vms`.
    pub async fn create_vm(&self, req: &CreateVm) -> Result<ClusterVm, ClientError> {
        self.http.post("/v1/vms", Some(req)).await
    }
    /// `DELETE /v1/vms/{name}`.
    pub async fn delete_vm(&self, name: &str) -> Result<(), ClientError> {
        self.http.delete(&format!("/v1/vms/{}", seg(name))).await
    }
    /// `POST /v1/vms/{name}/move`: a place plan, executed.
    pub async fn move_vm(&self, name: &str, to: &str) -> Result<PlanRecord, ClientError> {
        self.http.post(&format!("/v1/vms/{}/move", seg(name)), Some(&MoveVm { to: to.into() })).await
    }
    /// `GET /v1/migrations`.
    pub async fn migrations(&self) -> Result<Vec<ClusterMigration>, ClientError> {
        self.http.get("/v1/migrations").await
    }
    /// `GET /v1/migrations/{id}`.
    pub async fn migration(&self, id: &str) -> Result<ClusterMigration, ClientError> {
        self.http.get(&format!("/v1/migrations/{}", seg(id))).await
    }
    /// `POST /v1/migrations/{id}/cancel`.
    pub async fn cancel_migration(&self, id: &str) -> Result<ClusterMigration, ClientError> {
        self.http.post(&format!("/v1/migrations/{}/cancel", seg(id)), None::<&()>).await
    }
    /// `GET /v1/plans`.
    pub async fn plans(&self) -> Result<Vec<PlanRecord>, ClientError> {
        self.http.get("/v1/plans").await
    }
    /// `POST /v1/plans`: plans a goal (a dry run).
    pub async fn propose(&self, goal: &Goal) -> Result<PlanRecord, ClientError> {
        self.http.post("/v1/plans", Some(goal)).await
    }
    /// `GET /v1/plans/{id}`.
    pub async fn plan(&self, id: &str) -> Result<PlanRecord, ClientError> {
        self.http.get(&format!("/v1/plans/{}", seg(id))).await
    }
    /// `POST /v1/plans/{id}/execute`.
    pub async fn execute_plan(&self, id: &str) -> Result<PlanRecord, ClientError> {
        self.http.post(&format!("/v1/plans/{}/execute", seg(id)), None::<&()>).await
    }
    /// `POST /v1/plans/{id}/cancel`.
    pub async fn cancel_plan(&self, id: &str) -> Result<PlanRecord, ClientError> {
        self.http.post(&format!("/v1/plans/{}/cancel", seg(id)), None::<&()>).await
    }
    /// `GET /v1/balance`: the balancer's settings, state and last moves.
    pub async fn balance(&self) -> Result<BalanceStatus, ClientError> {
        self.http.get("/v1/balance").await
    }
    /// `PUT /v1/balance`: changes the balancer's settings.
    pub async fn set_balance(&self, config: &BalanceConfig) -> Result<BalanceStatus, ClientError> {
        self.http.call(Method::PUT, "/v1/balance", Some(config), None).await
    }
    /// `GET /v1/walks`.
    pub async fn walks(&self) -> Result<Vec<WalkRecord>, ClientError> {
        self.http.get("/v1/walks").await
    }
    /// `POST /v1/walks`.
    pub async fn start_walk(&self, opts: &WalkOptions) -> Result<WalkRecord, ClientError> {
        self.http.post("/v1/walks", Some(opts)).await
    }
    /// `POST /v1/games/musical-chairs`.
    pub async fn start_musical_chairs(&self, opts: &WalkOptions) -> Result<WalkRecord, ClientError> {
        self.http.post("/v1/games/musical-chairs", Some(opts)).await
    }
    /// `POST /v1/games/scotland-yard`.
    pub async fn start_scotland_yard(&self, opts: &crate::ScotlandOptions) -> Result<WalkRecord, ClientError> {
        self.http.post("/v1/games/scotland-yard", Some(opts)).await
    }
    /// `POST /v1/games/{id}/move`: a player's detective move.
    pub async fn game_move(&self, id: &str, mv: &crate::PlayerMove) -> Result<WalkRecord, ClientError> {
        self.http.post(&format!("/v1/games/{}/move", seg(id)), Some(mv)).await
    }
    /// `POST /v1/games/hanoi`: starts the Towers of Hanoi with nested VMs.
    pub async fn start_hanoi(&self, opts: &crate::HanoiOptions) -> Result<WalkRecord, ClientError> {
        self.http.post("/v1/games/hanoi", Some(opts)).await
    }
    /// `GET /v1/games/hanoi/plan?levels=N`: the Towers of Hanoi's planned moves.
    pub async fn hanoi_plan(&self, levels: u32) -> Result<crate::HanoiPlan, ClientError> {
        self.http.get(&format!("/v1/games/hanoi/plan?levels={levels}")).await
    }
    /// `GET /v1/will`: the free-will requests the controller has seen, latest last.
    pub async fn will_requests(&self) -> Result<Vec<crate::WillRecord>, ClientError> {
        self.http.get("/v1/will").await
    }
    /// `GET /v1/walks/{id}`.
    pub async fn walk(&self, id: &str) -> Result<WalkRecord, ClientError> {
        self.http.get(&format!("/v1/walks/{}", seg(id))).await
    }
    /// `POST /v1/walks/{id}/stop`.
    pub async fn stop_walk(&self, id: &str) -> Result<WalkRecord, ClientError> {
        self.http.post(&format!("/v1/walks/{}/stop", seg(id)), None::<&()>).await
    }
    /// `GET /v1/events?since=N`: stored events after N, then live ones.
    pub async fn events(&self, since: Option<u64>) -> Result<SseStream<Event>, ClientError> {
        let q = since.map(|s| format!("?since={s}")).unwrap_or_default();
        self.http.stream(&format!("/v1/events{q}")).await
    }
    /// `GET /metrics` (Prometheus text).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        self.http.text("/metrics").await
    }
    /// `GET /v1/openapi.json`.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.http.get("/v1/openapi.json").await
    }
}

// failover: the calls the controller makes for protection and failover, and the power cut.
impl AgentClient {
    /// The same client naming the controller `name` with every request (header
    /// [`CONTROLLER_HEADER`](crate::CONTROLLER_HEADER)): each such request tells the
    /// agent's fence watchdog that the controller is still there.
    pub fn with_controller(&self, name: &str) -> AgentClient {
        AgentClient { http: Http { controller: Some(name.to_string()), ..self.http.clone() } }
    }
    /// `PUT /v1/vms/{name}/protection`: checkpoints of the VM shipped to a replica, and
    /// self-fencing.
    pub async fn set_protection(&self, vm: &str, p: &crate::checkpoint::Protection) -> Result<VmInfo, ClientError> {
        self.http.call(Method::PUT, &format!("/v1/vms/{}/protection", seg(vm)), Some(p), None).await
    }
    /// `DELETE /v1/vms/{name}/protection`: no more checkpoints, no self-fencing.
    pub async fn clear_protection(&self, vm: &str) -> Result<VmInfo, ClientError> {
        self.http.call(Method::DELETE, &format!("/v1/vms/{}/protection", seg(vm)), None::<&()>, None).await
    }
    /// `POST /v1/host/power-cut`: the agent kills its QEMUs and exits at once (only an
    /// agent started with `--allow-power-cut`).
    pub async fn power_cut(&self) -> Result<(), ClientError> {
        self.http.send(Method::POST, "/v1/host/power-cut", None, None).await.map(|_| ())
    }
}

/// failover: the controller's protection and failover routes.
impl ControllerClient {
    /// `POST /v1/vms/{name}/protect`.
    pub async fn protect_vm(&self, vm: &str, req: &crate::checkpoint::ProtectVm) -> Result<ClusterVm, ClientError> {
        self.http.post(&format!("/v1/vms/{}/protect", seg(vm)), Some(req)).await
    }
    /// `DELETE /v1/vms/{name}/protect`.
    pub async fn unprotect_vm(&self, vm: &str) -> Result<ClusterVm, ClientError> {
        self.http.call(Method::DELETE, &format!("/v1/vms/{}/protect", seg(vm)), None::<&()>, None).await
    }
    /// `GET /v1/failovers`.
    pub async fn failovers(&self) -> Result<Vec<crate::checkpoint::Failover>, ClientError> {
        self.http.get("/v1/failovers").await
    }
}

/// Starting a stopped VM again (issue 9).
impl AgentClient {
    /// `POST /v1/vms/{name}/start`: starts a stopped VM again from its record.
    pub async fn start_vm(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.http.post(&format!("/v1/vms/{}/start", seg(name)), None::<&()>).await
    }
}

/// The recent events, for a view that starts with some history (issue 12).
impl ControllerClient {
    /// `GET /v1/events?tail=N`: the last `n` events (at most 1000), oldest first.
    pub async fn recent_events(&self, n: u64) -> Result<Vec<Event>, ClientError> {
        self.http.get(&format!("/v1/events?tail={n}")).await
    }
}

/// The web console's logins (issue 12).
impl ControllerClient {
    /// `POST /v1/console/logins`: a console URL with a one-time login token.
    pub async fn console_login(&self, req: &crate::console::ConsoleLoginRequest) -> Result<crate::console::ConsoleLogin, ClientError> {
        self.http.post("/v1/console/logins", Some(req)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("g1.a-b_c"), "g1.a-b_c");
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn a_url_without_scheme_is_refused_with_an_example() {
        let e = AgentClient::new("127.0.0.1:7701", ClientOptions::default()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("http://"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_naming_itself() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let _keep = tokio::spawn(async move {
            let mut held = vec![];
            while let Ok((s, _)) = listener.accept().await {
                held.push(s); // accept, never answer
            }
        });
        let opts = ClientOptions { connect_timeout: Duration::from_secs(1), request_timeout: Duration::from_millis(300) };
        let c = AgentClient::new(&url, opts).expect("client");
        let started = std::time::Instant::now();
        let e = c.host().await.expect_err("must time out");
        assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
        assert!(e.to_string().contains(&url) && e.to_string().contains("/v1/host"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
