//! Talking to agents: the calls the controller makes ([`AgentApi`], over HTTP in
//! production, faked in unit tests) and the watcher that polls each host and marks it
//! down, with the time and the reason, when it stops answering.

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use walkabout_agent::GuestStatus;
use walkabout_migrate::Phase;

/// A boxed future, for the object-safe [`AgentApi`].
pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How often the watcher polls each agent.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long one poll may take before it counts as a failure.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(1);
/// A host that has not answered for this long (and failed at least
/// [`DOWN_AFTER_FAILURES`] polls in a row) is marked down.
pub const DOWN_AFTER: Duration = Duration::from_millis(2000);
/// Consecutive failed polls before a host can be marked down.
pub const DOWN_AFTER_FAILURES: u32 = 2;

/// Errors of calls to an agent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentCallError {
    /// The agent did not answer (connection refused, timeout).
    #[error("agent {url} does not answer: {detail}")]
    Unreachable {
        /// The agent.
        url: String,
        /// What the transport said.
        detail: String,
    },
    /// The agent answered with an error.
    #[error("{message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The agent's error kind (`not_found`, `insufficient_memory`...).
        kind: String,
        /// The agent's sentence.
        message: String,
    },
    /// The agent's answer could not be understood.
    #[error("agent {url} answered something unexpected: {detail}")]
    Decode {
        /// The agent.
        url: String,
        /// The decode error.
        detail: String,
    },
}

/// A host as its agent reports it (the fields the controller uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHost {
    /// The machine's host name.
    pub hostname: String,
    /// CPU model name.
    pub cpu_model: String,
    /// Online CPUs.
    pub cpus: u32,
    /// Memory the agent gives VMs, MiB.
    pub capacity_mib: u64,
    /// Memory given to active VMs (incoming ones included), MiB.
    pub used_mib: u64,
    /// Free memory for VMs, MiB.
    pub free_mib: u64,
}

/// The part of a VM's spec the controller uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentVmSpec {
    /// The VM's name.
    pub name: String,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// The in-guest workload.
    #[serde(default)]
    pub workload: String,
}

fn one() -> u32 {
    1
}

/// A VM as an agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentVm {
    /// Its spec.
    pub spec: AgentVmSpec,
    /// `starting`, `running`, `paused`, `migrating`, `incoming` or `stopped`.
    pub state: String,
    /// Why it is in that state.
    #[serde(default)]
    pub reason: Option<String>,
    /// What its guest reports.
    #[serde(default)]
    pub guest: GuestStatus,
}

impl AgentVm {
    /// True when the VM belongs to this host and holds memory here: an incoming VM
    /// still belongs to its source.
    pub fn owned(&self) -> bool {
        self.state != "incoming"
    }

    /// True when QEMU runs for it (it holds memory).
    pub fn active(&self) -> bool {
        matches!(self.state.as_str(), "starting" | "running" | "paused" | "migrating")
    }
}

/// Progress of an agent's migration (the fields the controller shows).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentProgress {
    /// Pass over memory.
    #[serde(default)]
    pub iteration: u64,
    /// Bytes sent.
    #[serde(default)]
    pub transferred_bytes: u64,
    /// Bytes left.
    #[serde(default)]
    pub remaining_bytes: u64,
    /// Guest memory.
    #[serde(default)]
    pub total_bytes: u64,
}

/// A migration as its source agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMigration {
    /// The agent's id.
    pub id: String,
    /// The VM.
    pub vm: String,
    /// Destination agent URL.
    pub destination: String,
    /// Phase.
    pub phase: Phase,
    /// Why it failed or was cancelled.
    #[serde(default)]
    pub reason: Option<String>,
    /// Progress.
    #[serde(default)]
    pub progress: AgentProgress,
    /// Guest pause at switchover, ms.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Wall time, ms.
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// Start, ms since the epoch.
    #[serde(default)]
    pub created_at_ms: u64,
}

/// A request to migrate (the agent's `POST /v1/migrations` body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The VM.
    pub vm: String,
    /// Destination agent URL.
    pub destination: String,
    /// `auto`, `precopy` or `postcopy`.
    pub mode: String,
    /// Longest acceptable pause, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth cap, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_bps: Option<u64>,
}

/// The calls the controller makes to agents, each to the agent at `url`.
pub trait AgentApi: Send + Sync + 'static {
    /// `GET /v1/host`.
    fn host(&self, url: String) -> BoxFut<Result<AgentHost, AgentCallError>>;
    /// `GET /v1/vms`.
    fn vms(&self, url: String) -> BoxFut<Result<Vec<AgentVm>, AgentCallError>>;
    /// `POST /v1/vms`.
    fn create_vm(&self, url: String, spec: serde_json::Value) -> BoxFut<Result<AgentVm, AgentCallError>>;
    /// `DELETE /v1/vms/{name}`.
    fn delete_vm(&self, url: String, name: String) -> BoxFut<Result<(), AgentCallError>>;
    /// `POST /v1/migrations`.
    fn start_migration(&self, url: String, req: MigrateRequest) -> BoxFut<Result<AgentMigration, AgentCallError>>;
    /// `GET /v1/migrations/{id}`.
    fn migration(&self, url: String, id: String) -> BoxFut<Result<AgentMigration, AgentCallError>>;
    /// `GET /v1/migrations`.
    fn migrations(&self, url: String) -> BoxFut<Result<Vec<AgentMigration>, AgentCallError>>;
    /// `POST /v1/migrations/{id}/cancel`.
    fn cancel_migration(&self, url: String, id: String) -> BoxFut<Result<(), AgentCallError>>;
}

/// [`AgentApi`] over HTTP.
#[derive(Clone)]
pub struct HttpAgents {
    http: reqwest::Client,
}

impl HttpAgents {
    /// A client with short connect timeouts (a dead host must not stall the controller).
    pub fn new() -> Result<HttpAgents, AgentCallError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| AgentCallError::Unreachable { url: String::new(), detail: e.to_string() })?;
        Ok(HttpAgents { http })
    }

    fn call<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        method: reqwest::Method,
        url: String,
        path: String,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> BoxFut<Result<T, AgentCallError>> {
        let http = self.http.clone();
        Box::pin(async move {
            let mut req = http.request(method, format!("{url}{path}")).timeout(timeout);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.map_err(|e| AgentCallError::Unreachable { url: url.clone(), detail: transport(&e) })?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| AgentCallError::Unreachable { url: url.clone(), detail: transport(&e) })?;
            if !status.is_success() {
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                return Err(AgentCallError::Refused {
                    status: status.as_u16(),
                    kind: v["kind"].as_str().unwrap_or("error").to_string(),
                    message: v["error"]
                        .as_str()
                        .map(String::from)
                        .unwrap_or_else(|| format!("agent {url} answered HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim())),
                });
            }
            let bytes = if bytes.is_empty() { "null".as_bytes().into() } else { bytes };
            serde_json::from_slice(&bytes).map_err(|e| AgentCallError::Decode { url, detail: e.to_string() })
        })
    }
}

fn transport(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection refused".into()
    } else {
        e.to_string()
    }
}

impl AgentApi for HttpAgents {
    fn host(&self, url: String) -> BoxFut<Result<AgentHost, AgentCallError>> {
        self.call(reqwest::Method::GET, url, "/v1/host".into(), None, POLL_TIMEOUT)
    }
    fn vms(&self, url: String) -> BoxFut<Result<Vec<AgentVm>, AgentCallError>> {
        self.call(reqwest::Method::GET, url, "/v1/vms".into(), None, POLL_TIMEOUT * 3)
    }
    fn create_vm(&self, url: String, spec: serde_json::Value) -> BoxFut<Result<AgentVm, AgentCallError>> {
        self.call(reqwest::Method::POST, url, "/v1/vms".into(), Some(spec), Duration::from_secs(60))
    }
    fn delete_vm(&self, url: String, name: String) -> BoxFut<Result<(), AgentCallError>> {
        let f = self.call::<serde_json::Value>(reqwest::Method::DELETE, url, format!("/v1/vms/{name}"), None, Duration::from_secs(30));
        Box::pin(async move { f.await.map(|_| ()) })
    }
    fn start_migration(&self, url: String, req: MigrateRequest) -> BoxFut<Result<AgentMigration, AgentCallError>> {
        let body = serde_json::to_value(&req).unwrap_or_default();
        self.call(reqwest::Method::POST, url, "/v1/migrations".into(), Some(body), Duration::from_secs(10))
    }
    fn migration(&self, url: String, id: String) -> BoxFut<Result<AgentMigration, AgentCallError>> {
        self.call(reqwest::Method::GET, url, format!("/v1/migrations/{id}"), None, POLL_TIMEOUT * 2)
    }
    fn migrations(&self, url: String) -> BoxFut<Result<Vec<AgentMigration>, AgentCallError>> {
        self.call(reqwest::Method::GET, url, "/v1/migrations".into(), None, POLL_TIMEOUT * 3)
    }
    fn cancel_migration(&self, url: String, id: String) -> BoxFut<Result<(), AgentCallError>> {
        let f =
            self.call::<serde_json::Value>(reqwest::Method::POST, url, format!("/v1/migrations/{id}/cancel"), None, Duration::from_secs(5));
        Box::pin(async move { f.await.map(|_| ()) })
    }
}

/// What one poll of a host found.
#[derive(Debug, Clone)]
pub enum Poll {
    /// The agent answered.
    Answered {
        /// Its host.
        host: AgentHost,
        /// Its VMs.
        vms: Vec<AgentVm>,
    },
    /// It did not.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Polls the agent at `url` once.
pub async fn poll(api: &dyn AgentApi, url: &str) -> Poll {
    let host = match api.host(url.to_string()).await {
        Ok(h) => h,
        Err(e) => return Poll::Failed { reason: e.to_string() },
    };
    match api.vms(url.to_string()).await {
        Ok(vms) => Poll::Answered { host, vms },
        Err(e) => Poll::Failed { reason: e.to_string() },
    }
}

/// Decides when a host is down from the outcomes of its polls: a host is down once it
/// has failed [`DOWN_AFTER_FAILURES`] polls in a row and not answered for
/// [`DOWN_AFTER`]. Pure, so the rule is tested without a clock.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    failures: u32,
    last_ok_ms: Option<u64>,
    first_failure_ms: Option<u64>,
}

impl Liveness {
    /// Records a poll that answered at `now_ms`.
    pub fn ok(&mut self, now_ms: u64) {
        self.failures = 0;
        self.first_failure_ms = None;
        self.last_ok_ms = Some(now_ms);
    }

    /// Records a failed poll at `now_ms`; true when the host is now to be considered down.
    pub fn failed(&mut self, now_ms: u64) -> bool {
        self.failures += 1;
        let since = *self.first_failure_ms.get_or_insert(now_ms);
        let silent_since = self.last_ok_ms.unwrap_or(since);
        self.failures >= DOWN_AFTER_FAILURES && now_ms.saturating_sub(silent_since) >= DOWN_AFTER.as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_down_after_two_seconds_of_failed_polls() {
        let mut l = Liveness::default();
        l.ok(10_000);
        assert!(!l.failed(10_500));
        assert!(!l.failed(11_000));
        assert!(!l.failed(11_500));
        assert!(l.failed(12_100));
    }

    #[test]
    fn one_answer_resets_the_count() {
        let mut l = Liveness::default();
        l.ok(0);
        assert!(!l.failed(500));
        l.ok(1000);
        assert!(!l.failed(2500));
        assert!(l.failed(3100));
    }

    #[test]
    fn a_host_never_seen_is_down_after_its_first_failures() {
        let mut l = Liveness::default();
        assert!(!l.failed(0));
        assert!(l.failed(2000));
    }

    #[test]
    fn vm_records_of_the_agent_decode() {
        let v: AgentVm = serde_json::from_value(serde_json::json!({
            "version": 1, "spec": {"name": "a", "memory_mib": 256, "vcpus": 1, "workload": "idle"},
            "state": "incoming", "accel": "tcg", "run_dir": "/x", "created_at_ms": 1,
            "guest": {"ready": true, "cpus": 1, "heartbeats": 3, "last_seq": 2, "seq_breaks": 0,
                      "corrupt_pages": 0, "kernel_trouble": false, "alerts": []}
        }))
        .expect("decodes");
        assert!(!v.owned());
        assert_eq!(v.guest.heartbeats, 3);
    }
}
