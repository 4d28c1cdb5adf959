//! Talking to agents: the calls the controller makes ([`AgentApi`], over HTTP in
//! production, faked in unit tests) and the watcher that polls each host and marks it
//! down, with the time and the reason, when it stops answering.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use walkabout_api::{
    AgentClient, Checkpoint, ClientError, ClientOptions, CpuCatalog, ForwardReplica, HostInfo, MigrationRecord, MigrationRequest,
    Protection, ReplicaState, RestoreReply, RestoreRequest, VmInfo, VmSpec,
};

/// A boxed future, for the object-safe [`AgentApi`].
pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How often the watcher polls each agent.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long one poll may take before it counts as a failure. Generous: an agent on a
/// host whose cores are busy with guests (TCG, checkpoints, storage copies) may take
/// over a second to answer, and a false "down" starts fencing and failover.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// A host that has not answered for this long (and failed at least
/// [`DOWN_AFTER_FAILURES`] polls in a row) is marked down.
pub const DOWN_AFTER: Duration = Duration::from_millis(4000);
/// Consecutive failed polls before a host can be marked down.
pub const DOWN_AFTER_FAILURES: u32 = 2;

/// The calls the controller makes to agents, each to the agent at `url`: the agent's
/// API as [`AgentClient`] speaks it, behind a trait so unit tests can fake the agents.
pub trait AgentApi: Send + Sync + 'static {
    /// `GET /v1/host`.
    fn host(&self, url: String) -> BoxFut<Result<HostInfo, ClientError>>;
    /// `GET /v1/vms`.
    fn vms(&self, url: String) -> BoxFut<Result<Vec<VmInfo>, ClientError>>;
    /// `POST /v1/vms`.
    fn create_vm(&self, url: String, spec: VmSpec) -> BoxFut<Result<VmInfo, ClientError>>;
    /// `DELETE /v1/vms/{name}`.
    fn delete_vm(&self, url: String, name: String) -> BoxFut<Result<(), ClientError>>;
    /// `POST /v1/migrations`.
    fn start_migration(&self, url: String, req: MigrationRequest) -> BoxFut<Result<MigrationRecord, ClientError>>;
    /// `GET /v1/migrations/{id}`.
    fn migration(&self, url: String, id: String) -> BoxFut<Result<MigrationRecord, ClientError>>;
    /// `GET /v1/migrations`.
    fn migrations(&self, url: String) -> BoxFut<Result<Vec<MigrationRecord>, ClientError>>;
    /// `POST /v1/migrations/{id}/cancel`.
    fn cancel_migration(&self, url: String, id: String) -> BoxFut<Result<(), ClientError>>;
    /// `GET /v1/host/cpu`: the host's CPU models and what it offers guests. Agents that
    /// cannot say (fakes without CPUs) answer an error, and no CPU rule applies to them.
    fn cpu(&self, url: String) -> BoxFut<Result<CpuCatalog, ClientError>> {
        Box::pin(std::future::ready(Err(ClientError::Unreachable { url, detail: "this agent API reports no CPU catalog".into() })))
    }
    /// `PUT /v1/vms/{name}/protection`.
    fn set_protection(&self, url: String, vm: String, p: Protection) -> BoxFut<Result<VmInfo, ClientError>> {
        let _ = (vm, p);
        unsupported(url, "protection")
    }
    /// `DELETE /v1/vms/{name}/protection`.
    fn clear_protection(&self, url: String, vm: String) -> BoxFut<Result<VmInfo, ClientError>> {
        let _ = vm;
        unsupported(url, "protection")
    }
    /// `GET /v1/replicas/{vm}`: what the agent holds of `vm` as its replica.
    fn replica(&self, url: String, vm: String) -> BoxFut<Result<ReplicaState, ClientError>> {
        let _ = vm;
        unsupported(url, "replicas")
    }
    /// `POST /v1/replicas/{vm}/restore`: runs `vm` from the newest good checkpoint held.
    fn restore_replica(&self, url: String, vm: String, req: RestoreRequest) -> BoxFut<Result<RestoreReply, ClientError>> {
        let _ = (vm, req);
        unsupported(url, "replicas")
    }
    /// `POST /v1/replicas/{vm}/forward`: the replica at `url` sends `vm`'s newest good
    /// checkpoint to the agent at `req.to_url`, which then holds it as a replica.
    fn forward_replica(&self, url: String, vm: String, req: ForwardReplica) -> BoxFut<Result<Checkpoint, ClientError>> {
        let _ = (vm, req);
        unsupported(url, "replicas")
    }
    /// `POST /v1/host/power-cut`: the agent kills its QEMUs and exits at once (musical
    /// chairs, on agents that allow it).
    /// Agent APIs without it (the simulator's) refuse it, not as a transport error: the
    /// game must not take a refused cut for a host gone dark.
    fn power_cut(&self, url: String) -> BoxFut<Result<(), ClientError>> {
        let body = walkabout_api::ErrorBody::new(walkabout_api::ErrorKind::Other, format!("the agent API of {url} cannot cut its power"));
        Box::pin(std::future::ready(Err(ClientError::Api { status: 501, body })))
    }
}

/// The answer of an agent API that lacks `what` (the simulator's agents).
fn unsupported<T: Send + 'static>(url: String, what: &str) -> BoxFut<Result<T, ClientError>> {
    Box::pin(std::future::ready(Err(ClientError::Unreachable { url, detail: format!("this agent API has no {what}") })))
}

/// The name the controller gives itself in [`walkabout_api::CONTROLLER_HEADER`].
pub const CONTROLLER_NAME: &str = "walkabout-controller";

/// [`AgentApi`] over HTTP: one [`AgentClient`] per agent, with short connect timeouts
/// (a dead host must not stall the controller).
#[derive(Default)]
pub struct HttpAgents {
    clients: std::sync::Mutex<BTreeMap<String, AgentClient>>,
    /// The leader's epoch every request carries, when controllers share etcd.
    epoch: Option<u64>,
}

impl HttpAgents {
    /// No clients yet; one is made for each agent on first use.
    pub fn new() -> HttpAgents {
        HttpAgents::default()
    }

    /// Agents told the leading controller's `epoch` with every request (header
    /// `X-Walkabout-Epoch`): once a newer leader has spoken to an agent, it refuses these.
    pub fn with_epoch(epoch: u64) -> HttpAgents {
        HttpAgents { epoch: Some(epoch), ..HttpAgents::default() }
    }

    fn client(&self, url: &str, timeout: Duration) -> Result<AgentClient, ClientError> {
        let mut clients = crate::lock(&self.clients);
        let c = match clients.get(url) {
            Some(c) => c.clone(),
            None => {
                let opts = ClientOptions { connect_timeout: POLL_TIMEOUT, request_timeout: Duration::from_secs(30) };
                let c = AgentClient::new(url, opts)?.with_controller(CONTROLLER_NAME);
                let c = match self.epoch {
                    Some(e) => c.with_epoch(e),
                    None => c,
                };
                clients.insert(url.to_string(), c.clone());
                c
            }
        };
        Ok(c.with_timeout(timeout))
    }

    fn call<T: Send + 'static, F>(&self, url: &str, timeout: Duration, f: impl FnOnce(AgentClient) -> F) -> BoxFut<Result<T, ClientError>>
    where
        F: Future<Output = Result<T, ClientError>> + Send + 'static,
    {
        match self.client(url, timeout) {
            Ok(c) => Box::pin(f(c)),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

impl AgentApi for HttpAgents {
    fn host(&self, url: String) -> BoxFut<Result<HostInfo, ClientError>> {
        self.call(&url, POLL_TIMEOUT, |c| async move { c.host().await })
    }
    fn vms(&self, url: String) -> BoxFut<Result<Vec<VmInfo>, ClientError>> {
        self.call(&url, POLL_TIMEOUT * 3, |c| async move { c.vms().await })
    }
    fn create_vm(&self, url: String, spec: VmSpec) -> BoxFut<Result<VmInfo, ClientError>> {
        self.call(&url, Duration::from_secs(60), |c| async move { c.create_vm(&spec).await })
    }
    fn delete_vm(&self, url: String, name: String) -> BoxFut<Result<(), ClientError>> {
        self.call(&url, Duration::from_secs(30), |c| async move { c.delete_vm(&name).await })
    }
    fn start_migration(&self, url: String, req: MigrationRequest) -> BoxFut<Result<MigrationRecord, ClientError>> {
        self.call(&url, Duration::from_secs(10), |c| async move { c.start_migration(&req).await })
    }
    fn migration(&self, url: String, id: String) -> BoxFut<Result<MigrationRecord, ClientError>> {
        self.call(&url, POLL_TIMEOUT * 2, |c| async move { c.migration(&id).await })
    }
    fn migrations(&self, url: String) -> BoxFut<Result<Vec<MigrationRecord>, ClientError>> {
        self.call(&url, POLL_TIMEOUT * 3, |c| async move { c.migrations().await })
    }
    fn cancel_migration(&self, url: String, id: String) -> BoxFut<Result<(), ClientError>> {
        self.call(&url, Duration::from_secs(5), |c| async move { c.cancel_migration(&id).await.map(|_| ()) })
    }
    fn cpu(&self, url: String) -> BoxFut<Result<CpuCatalog, ClientError>> {
        // The agent probes its QEMU on the first request: give it time.
        self.call(&url, Duration::from_secs(60), |c| async move { c.cpu().await })
    }
    fn set_protection(&self, url: String, vm: String, p: Protection) -> BoxFut<Result<VmInfo, ClientError>> {
        self.call(&url, Duration::from_secs(10), |c| async move { c.set_protection(&vm, &p).await })
    }
    fn clear_protection(&self, url: String, vm: String) -> BoxFut<Result<VmInfo, ClientError>> {
        self.call(&url, Duration::from_secs(10), |c| async move { c.clear_protection(&vm).await })
    }
    fn replica(&self, url: String, vm: String) -> BoxFut<Result<ReplicaState, ClientError>> {
        self.call(&url, Duration::from_secs(5), |c| async move { c.replica(&vm).await })
    }
    fn restore_replica(&self, url: String, vm: String, req: RestoreRequest) -> BoxFut<Result<RestoreReply, ClientError>> {
        // Verifying the checkpoint's files and starting QEMU from its memory image.
        self.call(&url, Duration::from_secs(120), |c| async move { c.restore_replica(&vm, &req).await })
    }
    fn forward_replica(&self, url: String, vm: String, req: ForwardReplica) -> BoxFut<Result<Checkpoint, ClientError>> {
        // Re-hashing the chain, then sending a memory image and disk layers host to host.
        self.call(&url, Duration::from_secs(600), |c| async move { c.forward_replica(&vm, &req).await })
    }
    fn power_cut(&self, url: String) -> BoxFut<Result<(), ClientError>> {
        self.call(&url, Duration::from_secs(10), |c| async move { c.power_cut().await })
    }
}

/// What one poll of a host found.
// One poll at a time per host, consumed at once: the size of the answer does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Poll {
    /// The agent answered.
    Answered {
        /// Its host.
        host: HostInfo,
        /// Its VMs.
        vms: Vec<VmInfo>,
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
        Err(e) => return Poll::Failed { reason: down_reason(url, &e) },
    };
    match api.vms(url.to_string()).await {
        Ok(vms) => Poll::Answered { host, vms },
        Err(e) => Poll::Failed { reason: down_reason(url, &e) },
    }
}

/// Why a host is down, in a few fixed words: what was at its URL (a banner, an error
/// page, a TLS alert) goes to the log, not to the API, so that registering URLs does
/// not make the controller a port scanner.
pub fn down_reason(url: &str, e: &ClientError) -> String {
    tracing::debug!(url, error = %e, "agent poll failed");
    match e {
        ClientError::Unreachable { detail, .. } if detail.contains("Connection refused") || detail.contains("connection refused") => {
            "connection refused".into()
        }
        ClientError::Unreachable { .. } => "unreachable".into(),
        ClientError::Timeout { .. } => "did not answer in time".into(),
        ClientError::Api { status, .. } => format!("answered with an error (HTTP {status})"),
        ClientError::Decode { .. } | ClientError::BadUrl { .. } => "did not answer as a Walkabout agent".into(),
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
    fn a_down_reason_never_repeats_what_answered_at_the_url() {
        let banner = ClientError::Api {
            status: 404,
            body: walkabout_api::ErrorBody::new(walkabout_api::ErrorKind::Other, "nginx/1.2 secret-admin-panel"),
        };
        assert_eq!(down_reason("http://10.0.0.9:80", &banner), "answered with an error (HTTP 404)");
        let tls = ClientError::Unreachable { url: "u".into(), detail: "invalid peer certificate: UnknownIssuer (ssh-2.0-openssh)".into() };
        assert_eq!(down_reason("u", &tls), "unreachable");
        let refused = ClientError::Unreachable { url: "u".into(), detail: "tcp connect error: Connection refused (os error 111)".into() };
        assert_eq!(down_reason("u", &refused), "connection refused");
    }

    #[test]
    fn a_host_is_down_after_four_seconds_of_failed_polls() {
        let mut l = Liveness::default();
        l.ok(10_000);
        assert!(!l.failed(11_000));
        assert!(!l.failed(12_000));
        assert!(!l.failed(13_900));
        assert!(l.failed(14_100));
    }

    #[test]
    fn one_answer_resets_the_count() {
        let mut l = Liveness::default();
        l.ok(0);
        assert!(!l.failed(3_900));
        l.ok(4_000);
        assert!(!l.failed(7_900));
        assert!(l.failed(8_100));
    }

    #[test]
    fn a_host_never_seen_is_down_after_its_first_failures() {
        let mut l = Liveness::default();
        assert!(!l.failed(0));
        assert!(l.failed(4_000));
    }
}
