//! The OpenAPI documents of both servers, generated from the types of this crate and the
//! route declarations below (the one place each path, its method, body and replies are
//! written down). `docs/api/agent.json` and `docs/api/controller.json` are these
//! documents, checked in; a test fails when they differ from what is generated here.
//!
//! The route declarations are bodiless functions: utoipa reads their attributes, the
//! servers implement them. Each server's own test checks that it serves exactly these
//! paths.
#![allow(dead_code)]

use utoipa::OpenApi;

/// The agent's API document.
pub fn agent() -> utoipa::openapi::OpenApi {
    AgentDoc::openapi()
}

/// The controller's API document.
pub fn controller() -> utoipa::openapi::OpenApi {
    ControllerDoc::openapi()
}

/// The agent's document as JSON, generated once: what `GET /v1/openapi.json` serves.
pub fn agent_json() -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| serde_json::to_value(agent()).unwrap_or_default())
}

/// The controller's document as JSON, generated once: what `GET /v1/openapi.json` serves.
pub fn controller_json() -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| serde_json::to_value(controller()).unwrap_or_default())
}

/// Compares the `(METHOD, path)` pairs a server's router serves with a document's:
/// the differences, each named, or `Ok` when they are the same set.
pub fn compare_routes(served: &[(&str, &str)], doc: &utoipa::openapi::OpenApi) -> Result<(), String> {
    let mut served: Vec<(String, String)> = served.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    served.sort();
    let documented = routes(doc);
    let undocumented: Vec<_> = served.iter().filter(|r| !documented.contains(r)).collect();
    let unserved: Vec<_> = documented.iter().filter(|r| !served.contains(r)).collect();
    if undocumented.is_empty() && unserved.is_empty() {
        return Ok(());
    }
    Err(format!("served but not documented: {undocumented:?}; documented but not served: {unserved:?}"))
}

/// A document as the pretty JSON checked in under `docs/api/` (ends with a newline).
pub fn to_json(doc: &utoipa::openapi::OpenApi) -> String {
    let mut s = doc.to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

/// Every `(method, path)` of a document, sorted, with methods in upper case: what a
/// server's router is compared with.
pub fn routes(doc: &utoipa::openapi::OpenApi) -> Vec<(String, String)> {
    let mut v = vec![];
    let json = serde_json::to_value(doc).unwrap_or_default();
    if let Some(paths) = json.get("paths").and_then(|p| p.as_object()) {
        for (path, item) in paths {
            if let Some(ops) = item.as_object() {
                for m in ["get", "put", "post", "delete", "patch"] {
                    if ops.contains_key(m) {
                        v.push((m.to_uppercase(), path.clone()));
                    }
                }
            }
        }
    }
    v.sort();
    v
}

mod agent_routes {
    use crate::checkpoint::{
        Checkpoint, CheckpointFile, CheckpointRequest, CommitCheckpoint, Encoding, ForwardReplica, Protection, ReplicaState, RestoreReply,
        RestoreRequest,
    };
    use crate::error::ErrorBody;
    use crate::host::{CpuCatalog, HostInfo};
    use crate::migration::{
        CommitRequest, IncomingReply, IncomingRequest, MigrationRecord, MigrationRequest, RecoverRequest, TunnelStream,
    };
    use crate::vm::{ConsoleChunk, VmInfo, VmSpec, WillAnswer, WillRequest};

    /// The host: resources, accelerator (and why), QEMU version.
    #[utoipa::path(get, path = "/v1/host", tag = "host", responses((status = 200, body = HostInfo)))]
    fn host() {}

    /// CPU models this host's QEMU knows, their features, and the host's ceiling.
    #[utoipa::path(get, path = "/v1/host/cpu", tag = "host", responses((status = 200, body = CpuCatalog), (status = 500, body = ErrorBody)))]
    fn host_cpu() {}

    /// The VMs of this host, incoming ones included.
    #[utoipa::path(get, path = "/v1/vms", tag = "vms", responses((status = 200, body = Vec<VmInfo>)))]
    fn list_vms() {}

    /// Creates and starts a VM; answers once QEMU runs.
    #[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = VmSpec, responses(
        (status = 201, body = VmInfo), (status = 409, description = "duplicate name or not enough memory", body = ErrorBody),
        (status = 422, description = "invalid spec", body = ErrorBody)))]
    fn create_vm() {}

    /// One VM with its guest status.
    #[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path, description = "VM name")),
        responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody)))]
    fn get_vm() {}

    /// Stops and forgets a VM.
    #[utoipa::path(delete, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path, description = "VM name")),
        responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn delete_vm() {}

    /// Pauses the guest's vCPUs.
    #[utoipa::path(post, path = "/v1/vms/{name}/pause", tag = "vms", params(("name" = String, Path, description = "VM name")),
        responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn pause_vm() {}

    /// Resumes a paused guest.
    #[utoipa::path(post, path = "/v1/vms/{name}/resume", tag = "vms", params(("name" = String, Path, description = "VM name")),
        responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn resume_vm() {}

    /// Stops QEMU; the record stays.
    #[utoipa::path(post, path = "/v1/vms/{name}/stop", tag = "vms", params(("name" = String, Path, description = "VM name")),
        responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn stop_vm() {}

    /// Starts a stopped VM again from its record (its disks, checked again, and NICs);
    /// 409 when it is not stopped or its memory does not fit, 422 when a disk is gone.
    #[utoipa::path(post, path = "/v1/vms/{name}/start", tag = "vms", params(("name" = String, Path, description = "VM name")),
        responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn start_vm() {}

    /// The serial console from byte `offset` (at most `max` bytes, 1 MiB by default).
    #[utoipa::path(get, path = "/v1/vms/{name}/console", tag = "vms", params(("name" = String, Path, description = "VM name"),
        ("offset" = Option<u64>, Query, description = "first byte"), ("max" = Option<u64>, Query, description = "most bytes")),
        responses((status = 200, body = ConsoleChunk), (status = 404, body = ErrorBody)))]
    fn console() {}

    /// Free will: the requests this host's guests wrote on their `org.walkabout.0`
    /// port and that await the controller's answer.
    #[utoipa::path(get, path = "/v1/will", tag = "vms", responses((status = 200, body = Vec<WillRequest>)))]
    fn will_requests() {}

    /// Free will: writes the controller's answer on the guest's port (a line), and drops
    /// the request it answers from the queue.
    #[utoipa::path(post, path = "/v1/vms/{name}/will/answer", tag = "vms", params(("name" = String, Path, description = "VM name")),
        request_body = WillAnswer, responses((status = 200, body = WillAnswer), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
    fn will_answer() {}

    /// Migrations this agent drove as their source, oldest first.
    #[utoipa::path(get, path = "/v1/migrations", tag = "migrations", responses((status = 200, body = Vec<MigrationRecord>)))]
    fn list_migrations() {}

    /// Starts migrating a VM of this host; answers at once with the record to poll.
    #[utoipa::path(post, path = "/v1/migrations", tag = "migrations", request_body = MigrationRequest, responses(
        (status = 202, body = MigrationRecord), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
    fn start_migration() {}

    /// One migration: phase, progress, strategy, switches.
    #[utoipa::path(get, path = "/v1/migrations/{id}", tag = "migrations", params(("id" = String, Path, description = "migration id")),
        responses((status = 200, body = MigrationRecord), (status = 404, body = ErrorBody)))]
    fn get_migration() {}

    /// Server-sent events: the migration's record (JSON, event `migration`) each time it
    /// changes, until it is final.
    #[utoipa::path(get, path = "/v1/migrations/{id}/events", tag = "migrations", params(("id" = String, Path, description = "migration id")),
        responses((status = 200, content_type = "text/event-stream", body = MigrationRecord), (status = 404, body = ErrorBody)))]
    fn migration_events() {}

    /// Cancels a migration before its switchover (idempotent); refused after it.
    #[utoipa::path(post, path = "/v1/migrations/{id}/cancel", tag = "migrations", params(("id" = String, Path, description = "migration id")),
        responses((status = 202, body = MigrationRecord), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn cancel_migration() {}

    /// Agent to agent: prepares this host to receive a VM (a paused QEMU waiting for the
    /// stream) and says where to send it.
    #[utoipa::path(post, path = "/v1/incoming", tag = "incoming", request_body = IncomingRequest, responses(
        (status = 201, body = IncomingReply), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn prepare_incoming() {}

    /// Agent to agent: the source's liveness probe; renews the destination's lease.
    #[utoipa::path(get, path = "/v1/incoming/{name}", tag = "incoming", params(("name" = String, Path, description = "VM name")),
        responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn incoming() {}

    /// Agent to agent: tears down an incoming VM that never ran here (idempotent).
    #[utoipa::path(delete, path = "/v1/incoming/{name}", tag = "incoming", params(("name" = String, Path, description = "VM name")),
        responses((status = 204), (status = 409, body = ErrorBody)))]
    fn abort_incoming() {}

    /// Agent to agent: after switchover, makes this host the VM's owner.
    #[utoipa::path(post, path = "/v1/incoming/{name}/commit", tag = "incoming", params(("name" = String, Path, description = "VM name")),
        request_body = CommitRequest, responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn commit_incoming() {}

    /// Agent to agent: a post-copy whose stream was lost listens again (`migrate-pause`
    /// if it had not noticed, then `migrate-recover`); where the source resumes sending.
    #[utoipa::path(post, path = "/v1/incoming/{name}/recover", tag = "incoming", params(("name" = String, Path, description = "VM name")),
        request_body = RecoverRequest, responses((status = 200, body = IncomingReply), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn recover_incoming() {}

    /// Agent to agent, HTTP/1.1 upgrade (`Connection: Upgrade`, `Upgrade: walkabout-tunnel`):
    /// after `101` the connection carries one of QEMU's streams of an incoming relayed
    /// migration (`memory` or `nbd`), spliced to the destination QEMU's loopback
    /// listener. Only the host whose certificate asked for that incoming migration.
    #[utoipa::path(get, path = "/v1/incoming/{name}/tunnel/{stream}", tag = "incoming",
        params(("name" = String, Path, description = "VM name"), ("stream" = TunnelStream, Path, description = "which stream: memory or nbd")),
        responses((status = 101, description = "switching protocols: the connection is the stream"), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody), (status = 502, body = ErrorBody)))]
    fn incoming_tunnel() {}

    /// Takes a checkpoint of a running VM now (memory, devices, disks at one instant);
    /// ships it to `ship_to` (only what that agent lacks) if asked.
    #[utoipa::path(post, path = "/v1/vms/{name}/checkpoint", tag = "checkpoints", params(("name" = String, Path, description = "VM name")),
        request_body = CheckpointRequest, responses((status = 201, body = Checkpoint), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 500, body = ErrorBody), (status = 502, description = "shipping failed", body = ErrorBody)))]
    fn checkpoint_vm() {}

    /// Protects a VM: a checkpoint every `every_ms`, shipped to `replica_url` and
    /// committed there with `keep`. Stored with the VM (survives an agent restart).
    #[utoipa::path(put, path = "/v1/vms/{name}/protection", tag = "checkpoints", params(("name" = String, Path, description = "VM name")),
        request_body = Protection, responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, description = "invalid protection, or toward this agent itself", body = ErrorBody)))]
    fn protect_vm() {}

    /// Stops protecting a VM (its replica keeps what it holds).
    #[utoipa::path(delete, path = "/v1/vms/{name}/protection", tag = "checkpoints", params(("name" = String, Path, description = "VM name")),
        responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody)))]
    fn unprotect_vm() {}

    /// Every checkpoint this agent holds: taken here, and committed here as a replica.
    #[utoipa::path(get, path = "/v1/checkpoints", tag = "checkpoints", responses((status = 200, body = Vec<Checkpoint>)))]
    fn list_checkpoints() {}

    /// One checkpoint.
    #[utoipa::path(get, path = "/v1/checkpoints/{id}", tag = "checkpoints", params(("id" = String, Path, description = "checkpoint id")),
        responses((status = 200, body = Checkpoint), (status = 404, body = ErrorBody)))]
    fn get_checkpoint() {}

    /// Forgets a checkpoint taken here and removes its memory file.
    #[utoipa::path(delete, path = "/v1/checkpoints/{id}", tag = "checkpoints", params(("id" = String, Path, description = "checkpoint id")),
        responses((status = 204), (status = 404, body = ErrorBody)))]
    fn delete_checkpoint() {}

    /// Starts a VM from a checkpoint held here (its files verified first); its disks run
    /// on new overlays, the checkpoint's files stay as they are.
    #[utoipa::path(post, path = "/v1/checkpoints/{id}/restore", tag = "checkpoints", params(("id" = String, Path, description = "checkpoint id")),
        request_body = RestoreRequest, responses((status = 201, body = RestoreReply), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, description = "a file fails its checksum", body = ErrorBody), (status = 500, body = ErrorBody)))]
    fn restore_checkpoint() {}

    /// Host to host: every replica this agent holds.
    #[utoipa::path(get, path = "/v1/replicas", tag = "replicas", responses((status = 200, body = Vec<ReplicaState>)))]
    fn list_replicas() {}

    /// Host to host: what this agent holds of one VM (committed checkpoints, files).
    #[utoipa::path(get, path = "/v1/replicas/{vm}", tag = "replicas", params(("vm" = String, Path, description = "VM name")),
        responses((status = 200, body = ReplicaState), (status = 404, body = ErrorBody)))]
    fn get_replica() {}

    /// Host to host: forgets a replica and removes its files.
    #[utoipa::path(delete, path = "/v1/replicas/{vm}", tag = "replicas", params(("vm" = String, Path, description = "VM name")),
        responses((status = 204), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn delete_replica() {}

    /// Host to host: one checkpoint file (body `application/octet-stream`, encoded as
    /// `encoding` says, larger than the 1 MiB of other routes), its SHA-256 verified on
    /// arrival; a mismatch is refused (422) and the file removed.
    #[utoipa::path(put, path = "/v1/replicas/{vm}/files/{file}", tag = "replicas", params(("vm" = String, Path, description = "VM name"),
        ("file" = String, Path, description = "file name"), ("sha256" = String, Query, description = "the file's SHA-256 once written, hex"),
        ("encoding" = Encoding, Query, description = "how the body is encoded"), ("base" = Option<String>, Query, description = "for a delta: the held file it starts from")),
        request_body(content = Vec<u8>, content_type = "application/octet-stream"),
        responses((status = 200, body = CheckpointFile), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn put_replica_file() {}

    /// Host to host: commits a checkpoint whose files are all held and verified, then
    /// merges older ones away so at most `keep` remain.
    #[utoipa::path(post, path = "/v1/replicas/{vm}/checkpoints", tag = "replicas", params(("vm" = String, Path, description = "VM name")),
        request_body = CommitCheckpoint, responses((status = 200, body = ReplicaState), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 500, body = ErrorBody)))]
    fn commit_replica() {}

    /// Restores the VM from the newest checkpoint whose files still verify (re-hashed
    /// now); newer ones passed over are listed in `skipped` with why.
    #[utoipa::path(post, path = "/v1/replicas/{vm}/restore", tag = "replicas", params(("vm" = String, Path, description = "VM name")),
        request_body = RestoreRequest, responses((status = 201, body = RestoreReply), (status = 404, body = ErrorBody),
        (status = 409, description = "no checkpoint verifies, or the name is taken", body = ErrorBody), (status = 500, body = ErrorBody)))]
    fn restore_replica() {}

    /// Controller and operators only (not host to host): sends the VM's newest
    /// checkpoint whose files still verify (re-hashed now), with the disk layers of the
    /// older checkpoints it stands on, to the agent at `to_url`, which verifies each file
    /// on arrival and commits it as a replica; returns the checkpoint forwarded
    /// (`shipped_bytes`: what was sent). A failover uses it when the replica cannot run
    /// the VM itself.
    #[utoipa::path(post, path = "/v1/replicas/{vm}/forward", tag = "replicas", params(("vm" = String, Path, description = "VM name")),
        request_body = ForwardReplica, responses((status = 200, body = Checkpoint), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, description = "a body that is not a forward request", body = ErrorBody),
        (status = 409, description = "no checkpoint verifies", body = ErrorBody), (status = 502, description = "the other agent refused or failed", body = ErrorBody),
        (status = 500, body = ErrorBody)))]
    fn forward_replica() {}

    /// The last changes callers made on this agent (at most 256 since it started, oldest
    /// first), each with who made it: events of subject `audit` whose `name` is the
    /// caller's and whose `data` holds `who`, `role`, `method`, `path` and `status`.
    #[utoipa::path(get, path = "/v1/audit", tag = "host", responses((status = 200, body = Vec<crate::event::Event>)))]
    fn audit() {}

    /// Prometheus metrics (text exposition format).
    #[utoipa::path(get, path = "/metrics", tag = "metrics", responses((status = 200, content_type = "text/plain", body = String)))]
    fn metrics() {}

    /// This document.
    #[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", responses((status = 200, content_type = "application/json", body = Object)))]
    fn openapi() {}

    /// Pulls the plug (tests and games): every QEMU of this host is killed (SIGKILL) and
    /// the agent exits at once, as in a power cut. Only an agent started with
    /// `--allow-power-cut` does it (else 403 `forbidden`); operators only.
    #[utoipa::path(post, path = "/v1/host/power-cut", tag = "host", responses(
        (status = 202, description = "the agent and its QEMUs are going down"), (status = 403, body = ErrorBody)))]
    fn power_cut() {}
}

/// The agent's API: one host's VMs, its migrations as their source, and the
/// destination side of migrations (`/v1/incoming`, agent to agent).
#[derive(OpenApi)]
#[openapi(
    info(title = "Walkabout agent API", description = "One host's VMs and live migrations. Errors are `ErrorBody` with a 4xx/5xx status. Every request may carry the leading controller's epoch in `X-Walkabout-Epoch`; an older one than the agent has seen is refused (409 `stale_epoch`)."),
    paths(
        agent_routes::host,
        agent_routes::host_cpu,
        agent_routes::list_vms,
        agent_routes::create_vm,
        agent_routes::get_vm,
        agent_routes::delete_vm,
        agent_routes::pause_vm,
        agent_routes::resume_vm,
        agent_routes::stop_vm,
        agent_routes::start_vm,
        agent_routes::console,
        agent_routes::will_requests,
        agent_routes::will_answer,
        agent_routes::list_migrations,
        agent_routes::start_migration,
        agent_routes::get_migration,
        agent_routes::migration_events,
        agent_routes::cancel_migration,
        agent_routes::prepare_incoming,
        agent_routes::incoming,
        agent_routes::abort_incoming,
        agent_routes::commit_incoming,
        agent_routes::recover_incoming,
        agent_routes::incoming_tunnel,
        agent_routes::checkpoint_vm,
        agent_routes::protect_vm,
        agent_routes::unprotect_vm,
        agent_routes::list_checkpoints,
        agent_routes::get_checkpoint,
        agent_routes::delete_checkpoint,
        agent_routes::restore_checkpoint,
        agent_routes::list_replicas,
        agent_routes::get_replica,
        agent_routes::delete_replica,
        agent_routes::put_replica_file,
        agent_routes::commit_replica,
        agent_routes::restore_replica,
        agent_routes::forward_replica,
        agent_routes::audit,
        agent_routes::metrics,
        agent_routes::openapi,
        agent_routes::power_cut
    ),
    components(schemas(crate::vm::VmState, crate::migration::Phase, crate::migration::TunnelStream, crate::error::ErrorKind)),
    modifiers(&EpochHeader)
)]
struct AgentDoc;

/// Documents the optional [`EPOCH_HEADER`](crate::EPOCH_HEADER) on every operation of
/// the agent's API, and the refusal of a stale one.
struct EpochHeader;

impl utoipa::Modify for EpochHeader {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        use utoipa::openapi::{Required, ResponseBuilder};
        let header = ParameterBuilder::new()
            .name("X-Walkabout-Epoch")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(
                "The epoch of the controller that leads the cluster (set by the leading controller on every \
                 request). The agent remembers the highest epoch it has seen, on disk, and refuses a lower one with \
                 409 `stale_epoch`: a deposed leader cannot start a migration. Absent: not fenced (the CLI, a peer \
                 agent, a single controller).",
            ))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                    .minimum(Some(0)),
            ))
            .build();
        let stale = ResponseBuilder::new()
            .description("`stale_epoch`: the request's X-Walkabout-Epoch is older than one this agent has seen")
            .build();
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten() {
                op.parameters.get_or_insert_with(Vec::new).push(header.clone());
                op.responses.responses.entry("409".to_string()).or_insert_with(|| stale.clone().into());
            }
        }
    }
}

mod controller_routes {
    use crate::cluster::{AddHost, BalanceConfig, BalanceStatus, ClusterMigration, ClusterSummary, ClusterVm, CreateVm, Host, MoveVm};
    use crate::error::ErrorBody;
    use crate::event::Event;
    use crate::plan::{Goal, PlanRecord};
    use crate::trust::{JoinReply, JoinRequest, JoinToken, JoinTokenRequest};
    use crate::vm::WillRecord;
    use crate::walk::{HanoiOptions, HanoiPlan, PlayerMove, ScotlandOptions, WalkOptions, WalkRecord};

    /// A short-lived, single-use token for one host to join the cluster with
    /// (`walkabout host token`); operators only.
    #[utoipa::path(post, path = "/v1/join-tokens", tag = "trust", request_body = JoinTokenRequest, responses(
        (status = 201, body = JoinToken), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn join_token() {}

    /// A host joins (`walkabout host join`): its CSR, with a join token in
    /// `Authorization: Bearer`; the answer is its host certificate. The one route that
    /// needs no client certificate (401 without a valid token).
    #[utoipa::path(post, path = "/v1/join", tag = "trust", request_body = JoinRequest, responses(
        (status = 201, body = JoinReply), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn join() {}

    /// A console URL with a one-time login token for `role` (`walkabout console-url`):
    /// opening it once gives a browser a session of that role (a viewer's changes are
    /// 403); operators only. 409 when this controller serves no web console.
    #[utoipa::path(post, path = "/v1/console/logins", tag = "trust", request_body = crate::console::ConsoleLoginRequest, responses(
        (status = 201, body = crate::console::ConsoleLogin), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn console_login() {}

    /// Summary: hosts, VMs, running plans, limits.
    #[utoipa::path(get, path = "/v1/cluster", tag = "cluster", responses((status = 200, body = ClusterSummary)))]
    fn cluster() {}

    /// Automatic balancing: its settings (level, threshold, hysteresis, minimum gain), whether
    /// the load is out of balance, the last round's moves and their reasons.
    #[utoipa::path(get, path = "/v1/balance", tag = "cluster", responses((status = 200, body = BalanceStatus)))]
    fn get_balance() {}

    /// Sets automatic balancing: `manual` (nothing), `recommend` (proposed plans with
    /// reasons), `automatic` (moves within the limits, each with its reason).
    #[utoipa::path(put, path = "/v1/balance", tag = "cluster", request_body = BalanceConfig, responses(
        (status = 200, body = BalanceStatus), (status = 422, body = ErrorBody)))]
    fn set_balance() {}

    /// Hosts: up or down (since when, why), maintenance, capacity, VMs.
    #[utoipa::path(get, path = "/v1/hosts", tag = "hosts", responses((status = 200, body = Vec<Host>)))]
    fn list_hosts() {}

    /// Registers an agent.
    #[utoipa::path(post, path = "/v1/hosts", tag = "hosts", request_body = AddHost, responses(
        (status = 201, body = Host), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn add_host() {}

    /// One host.
    #[utoipa::path(get, path = "/v1/hosts/{name}", tag = "hosts", params(("name" = String, Path, description = "host name")),
        responses((status = 200, body = Host), (status = 404, body = ErrorBody)))]
    fn get_host() {}

    /// Takes a host out of the cluster: it is no longer polled, planned for or listed.
    /// Refused (409, naming the VMs) while VMs run there, or, for a host that is down,
    /// while its VMs' failovers have not ended; a lost VM keeps its record until deleted.
    #[utoipa::path(delete, path = "/v1/hosts/{name}", tag = "hosts", params(("name" = String, Path, description = "host name")),
        responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, description = "VMs run there, or a down host's VMs are not settled", body = ErrorBody)))]
    fn remove_host() {}

    /// Maintenance: the host takes no new VMs and a drain plan empties it (executed at
    /// once; 409 with per-VM reasons if impossible). Migrations in flight are waited for.
    #[utoipa::path(post, path = "/v1/hosts/{name}/drain", tag = "hosts", params(("name" = String, Path, description = "host name")),
        responses((status = 202, body = PlanRecord), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn drain() {}

    /// Back in service (cancels its drain).
    #[utoipa::path(post, path = "/v1/hosts/{name}/undrain", tag = "hosts", params(("name" = String, Path, description = "host name")),
        responses((status = 200, body = Host), (status = 404, body = ErrorBody)))]
    fn undrain() {}

    /// Every VM of the cluster and its host.
    #[utoipa::path(get, path = "/v1/vms", tag = "vms", responses((status = 200, body = Vec<ClusterVm>)))]
    fn list_vms() {}

    /// Creates a VM on a host (given, or one with room).
    #[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = CreateVm, responses(
        (status = 201, body = ClusterVm), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn create_vm() {}

    /// One VM: where it runs, its guest's health.
    #[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path, description = "VM name")),
        responses((status = 200, body = ClusterVm), (status = 404, body = ErrorBody)))]
    fn get_vm() {}

    /// Deletes a VM on its host.
    #[utoipa::path(delete, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path, description = "VM name")),
        responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn delete_vm() {}

    /// Moves a VM: a `place` plan, executed.
    #[utoipa::path(post, path = "/v1/vms/{name}/move", tag = "vms", params(("name" = String, Path, description = "VM name")),
        request_body = MoveVm, responses((status = 202, body = PlanRecord), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, description = "malformed request", body = ErrorBody)))]
    fn move_vm() {}

    /// Migrations the controller ordered.
    #[utoipa::path(get, path = "/v1/migrations", tag = "migrations", responses((status = 200, body = Vec<ClusterMigration>)))]
    fn list_migrations() {}

    /// One migration.
    #[utoipa::path(get, path = "/v1/migrations/{id}", tag = "migrations", params(("id" = String, Path, description = "migration id")),
        responses((status = 200, body = ClusterMigration), (status = 404, body = ErrorBody)))]
    fn get_migration() {}

    /// Cancels a migration (before switchover).
    #[utoipa::path(post, path = "/v1/migrations/{id}/cancel", tag = "migrations", params(("id" = String, Path, description = "migration id")),
        responses((status = 202, body = ClusterMigration), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn cancel_migration() {}

    /// Plans, newest last.
    #[utoipa::path(get, path = "/v1/plans", tag = "plans", responses((status = 200, body = Vec<PlanRecord>)))]
    fn list_plans() {}

    /// Plans a goal (a dry run): review, then execute or cancel.
    #[utoipa::path(post, path = "/v1/plans", tag = "plans", request_body = Goal, responses(
        (status = 201, body = PlanRecord), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn propose() {}

    /// One plan: its steps with their migrations, its problems.
    #[utoipa::path(get, path = "/v1/plans/{id}", tag = "plans", params(("id" = String, Path, description = "plan id")),
        responses((status = 200, body = PlanRecord), (status = 404, body = ErrorBody)))]
    fn get_plan() {}

    /// Executes a proposed plan.
    #[utoipa::path(post, path = "/v1/plans/{id}/execute", tag = "plans", params(("id" = String, Path, description = "plan id")),
        responses((status = 202, body = PlanRecord), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn execute_plan() {}

    /// Cancels a plan: nothing more starts; running migrations are cancelled.
    #[utoipa::path(post, path = "/v1/plans/{id}/cancel", tag = "plans", params(("id" = String, Path, description = "plan id")),
        responses((status = 202, body = PlanRecord), (status = 404, body = ErrorBody)))]
    fn cancel_plan() {}

    /// Walks and games.
    #[utoipa::path(get, path = "/v1/walks", tag = "walks", responses((status = 200, body = Vec<WalkRecord>)))]
    fn list_walks() {}

    /// Starts a walk: VMs wander by live migration.
    #[utoipa::path(post, path = "/v1/walks", tag = "walks", request_body = WalkOptions, responses(
        (status = 202, body = WalkRecord), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn start_walk() {}

    /// Starts musical chairs: each round a random host's power is cut (its protected VMs
    /// come back from their replicas), or with `gentle` it is drained; either way it is
    /// then taken out of the cluster, until the VMs no longer fit.
    #[utoipa::path(post, path = "/v1/games/musical-chairs", tag = "walks", request_body = WalkOptions, responses(
        (status = 202, body = WalkRecord), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn start_musical_chairs() {}

    /// Starts Scotland Yard: detectives (bots, or players through
    /// `/v1/games/{id}/move`) chase Mr X over a board of host links; every move is a
    /// live migration; Mr X is shown every `reveal_every` rounds and wins if he survives
    /// `rounds` rounds.
    #[utoipa::path(post, path = "/v1/games/scotland-yard", tag = "walks", request_body = ScotlandOptions, responses(
        (status = 202, body = WalkRecord), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn start_scotland_yard() {}

    /// A player's move of a detective in a game of Scotland Yard (played in the round
    /// under way, when the detectives' turn comes).
    #[utoipa::path(post, path = "/v1/games/{id}/move", tag = "walks", params(("id" = String, Path, description = "game id")),
        request_body = PlayerMove, responses((status = 202, body = WalkRecord), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn game_move() {}

    /// Starts the Towers of Hanoi with nested VMs: a hypervisor guest (its own agent and
    /// QEMU) and a plain guest boot on the first peg, the plain guest migrates into the
    /// hypervisor guest, and the planned moves take the tower to the last peg, each a
    /// verified live migration into or out of the nested agent. Progress is the game's
    /// `hanoi` record (stage, tower, every move with its downtime); stop it at
    /// `/v1/walks/{id}/stop`. 409 when the controller is not set up for it (no CA, no
    /// bridge or address) or a game already runs.
    #[utoipa::path(post, path = "/v1/games/hanoi", tag = "walks", request_body = HanoiOptions, responses(
        (status = 202, body = WalkRecord), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
    fn start_hanoi() {}

    /// The Towers of Hanoi with nested VMs, planned: the moves that take a tower of
    /// `levels` VMs from peg 1 to peg 3 (the planner only; `POST /v1/games/hanoi` plays
    /// them with real nested VMs).
    #[utoipa::path(get, path = "/v1/games/hanoi/plan", tag = "walks",
        params(("levels" = u32, Query, description = "levels of nesting, 1 to 10")),
        responses((status = 200, body = HanoiPlan), (status = 422, body = ErrorBody)))]
    fn hanoi_plan() {}

    /// Free will: the guests' requests to move the controller has seen, and its answers.
    #[utoipa::path(get, path = "/v1/will", tag = "vms", responses((status = 200, body = Vec<WillRecord>)))]
    fn will_requests() {}

    /// A walk or game: hops with downtime, rounds, survivors.
    #[utoipa::path(get, path = "/v1/walks/{id}", tag = "walks", params(("id" = String, Path, description = "walk id")),
        responses((status = 200, body = WalkRecord), (status = 404, body = ErrorBody)))]
    fn get_walk() {}

    /// Stops a walk or game.
    #[utoipa::path(post, path = "/v1/walks/{id}/stop", tag = "walks", params(("id" = String, Path, description = "walk id")),
        responses((status = 202, body = WalkRecord), (status = 404, body = ErrorBody)))]
    fn stop_walk() {}

    /// Server-sent events: stored events after `since`, then live ones; each message's
    /// id is the event's `seq` and its event type the subject. With `tail=N` instead:
    /// the last N stored events (at most 1000), oldest first, as one JSON array (the
    /// web console fills its events table with them at page load).
    #[utoipa::path(get, path = "/v1/events", tag = "events", params(("since" = Option<u64>, Query, description = "replay events after this seq"),
        ("tail" = Option<u64>, Query, description = "answer the last N events as a JSON array instead of a stream")),
        responses((status = 200, content((Event = "text/event-stream"), (Vec<Event> = "application/json")))))]
    fn events() {}

    /// Prometheus metrics (text exposition format).
    #[utoipa::path(get, path = "/metrics", tag = "metrics", responses((status = 200, content_type = "text/plain", body = String)))]
    fn metrics() {}

    /// This document.
    #[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", responses((status = 200, content_type = "application/json", body = Object)))]
    fn openapi() {}

    /// Protects a VM: checkpoints every `every_ms` shipped to a replica host (default:
    /// the up host in service with the most free memory, never the VM's own), and
    /// self-fencing of its agent. Stored with the VM; pushed to its agent.
    #[utoipa::path(post, path = "/v1/vms/{name}/protect", tag = "failover", params(("name" = String, Path, description = "VM name")),
        request_body = crate::checkpoint::ProtectVm, responses((status = 200, body = ClusterVm), (status = 404, body = ErrorBody),
        (status = 409, description = "no replica host, or the VM's host is down", body = ErrorBody),
        (status = 422, description = "the replica is the VM's own host, or a bad interval", body = ErrorBody)))]
    fn protect_vm() {}

    /// Stops protecting a VM (its agent stops checkpointing and fencing it).
    #[utoipa::path(delete, path = "/v1/vms/{name}/protect", tag = "failover", params(("name" = String, Path, description = "VM name")),
        responses((status = 200, body = ClusterVm), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn unprotect_vm() {}

    /// Failovers: each VM of a down host, restored from its replica (RPO, RTO) or lost
    /// (with the reason), oldest first.
    #[utoipa::path(get, path = "/v1/failovers", tag = "failover", responses((status = 200, body = Vec<crate::checkpoint::Failover>)))]
    fn list_failovers() {}
}

/// The controller's API: the cluster, plans, migrations, walks and games, events.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Walkabout controller API",
        description = "The cluster: hosts, VMs, plans, migrations, walks, events. Long operations answer 202 with the resource to poll. Errors are `ErrorBody` with a 4xx/5xx status."
    ),
    paths(
        controller_routes::cluster,
        controller_routes::get_balance,
        controller_routes::set_balance,
        controller_routes::list_hosts,
        controller_routes::add_host,
        controller_routes::get_host,
        controller_routes::remove_host,
        controller_routes::drain,
        controller_routes::undrain,
        controller_routes::list_vms,
        controller_routes::create_vm,
        controller_routes::get_vm,
        controller_routes::delete_vm,
        controller_routes::move_vm,
        controller_routes::list_migrations,
        controller_routes::get_migration,
        controller_routes::cancel_migration,
        controller_routes::list_plans,
        controller_routes::propose,
        controller_routes::get_plan,
        controller_routes::execute_plan,
        controller_routes::cancel_plan,
        controller_routes::list_walks,
        controller_routes::start_walk,
        controller_routes::start_musical_chairs,
        controller_routes::start_scotland_yard,
        controller_routes::game_move,
        controller_routes::start_hanoi,
        controller_routes::hanoi_plan,
        controller_routes::will_requests,
        controller_routes::get_walk,
        controller_routes::stop_walk,
        controller_routes::events,
        controller_routes::metrics,
        controller_routes::openapi,
        controller_routes::join_token,
        controller_routes::join,
        controller_routes::protect_vm,
        controller_routes::unprotect_vm,
        controller_routes::list_failovers,
        controller_routes::console_login
    ),
    components(schemas(crate::cluster::ClusterVmState, crate::plan::PlanStatus, crate::error::ErrorKind, crate::event::Subject))
)]
struct ControllerDoc;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn checked_in(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/api").join(name)
    }

    /// Set `WALKABOUT_BLESS=1` to rewrite the checked-in documents.
    fn compare(name: &str, generated: String) {
        let path = checked_in(name);
        if std::env::var_os("WALKABOUT_BLESS").is_some() {
            std::fs::write(&path, &generated).expect("write the document");
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{} differs from the document generated from crates/api; regenerate it with \
             `WALKABOUT_BLESS=1 cargo test -p walkabout-api openapi` and review the diff",
            path.display()
        );
    }

    #[test]
    fn checked_in_agent_openapi_matches_the_types() {
        compare("agent.json", to_json(&agent()));
    }

    #[test]
    fn checked_in_controller_openapi_matches_the_types() {
        compare("controller.json", to_json(&controller()));
    }

    #[test]
    fn every_path_has_one_spelling() {
        for doc in [agent(), controller()] {
            let routes = routes(&doc);
            assert!(routes.iter().all(|(_, p)| !p.contains(':')), "Nova-style ':action' paths are not spelled here: {routes:?}");
            let mut dedup = routes.clone();
            dedup.dedup();
            assert_eq!(dedup, routes);
        }
    }
}
