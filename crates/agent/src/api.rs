//! The agent's HTTP/JSON API.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | /v1/host | host resources, accelerator (and why), QEMU version |
//! | GET | /v1/host/cpu | CPU models this host's QEMU knows, their features, and the host's ceiling |
//! | GET, POST | /v1/vms | list; create from a [`VmSpec`](crate::spec::VmSpec) (201) |
//! | GET, DELETE | /v1/vms/{name} | one VM with its guest status; delete |
//! | POST | /v1/vms/{name}/pause, /resume, /stop | lifecycle |
//! | GET | /v1/vms/{name}/console?offset=N | serial console from byte N |
//! | GET | /v1/will | free will: the guests' requests to move awaiting an answer |
//! | POST | /v1/vms/{name}/will/answer | free will: the answer, written on the guest's port |
//! | GET, POST | /v1/migrations | list; start a migration of a VM here (202) |
//! | GET | /v1/migrations/{id} | one migration: phase, progress, strategy, switches |
//! | GET | /v1/migrations/{id}/events | server-sent events: the migration's progress until it ends |
//! | POST | /v1/migrations/{id}/cancel | cancel (before switchover only; idempotent) |
//! | POST, GET, DELETE | /v1/incoming[/{name}] | destination side, agent to agent |
//! | POST | /v1/incoming/{name}/commit | ownership hand-over after switchover |
//! | POST | /v1/incoming/{name}/recover | a paused post-copy listens again |
//! | GET (upgrade) | /v1/incoming/{name}/tunnel/{stream} | a relayed stream (memory, nbd) spliced to the incoming QEMU |
//! | POST | /v1/vms/{name}/checkpoint | take a checkpoint now (201), optionally shipped to a replica |
//! | PUT, DELETE | /v1/vms/{name}/protection | protect (checkpoints every N ms, shipped) / stop |
//! | GET | /v1/checkpoints[/{id}] | checkpoints held here (taken or received); DELETE one |
//! | POST | /v1/checkpoints/{id}/restore | start a VM from a checkpoint held here (201) |
//! | GET, DELETE | /v1/replicas[/{vm}] | replica side, host to host: what is held of a VM |
//! | PUT | /v1/replicas/{vm}/files/{file} | one checkpoint file (octet-stream), checksum verified |
//! | POST | /v1/replicas/{vm}/checkpoints | commit a checkpoint's manifest, keep at most `keep` |
//! | POST | /v1/replicas/{vm}/restore | restore the newest checkpoint that verifies (201) |
//! | POST | /v1/replicas/{vm}/forward | send the newest checkpoint that verifies to another agent (controller, operators) |
//! | GET | /v1/audit | the last changes made here, with who made them (see `audit.rs`) |
//! | GET | /metrics | Prometheus metrics |
//! | POST | /v1/host/power-cut | kill every QEMU and the agent (`--allow-power-cut` only; see `fence.rs`) |
//!
//! Errors are `{"error": "<sentence naming the VM and cause>", "kind": "<kind>"}` with a
//! 4xx/5xx status.
//!
//! Every request may carry the leading controller's epoch (header
//! [`EPOCH_HEADER`](walkabout_api::EPOCH_HEADER)). The agent keeps the highest epoch it
//! has seen in its database and refuses a lower one (409 `stale_epoch`) before the
//! request reaches its handler, so a controller that lost its leadership cannot start,
//! cancel or change anything here once its successor has spoken to this agent.

use crate::error::AgentError;
use crate::spec::VmSpec;
use crate::vms::Agent;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::{Arc, Mutex};
use walkabout_api::{
    CheckpointRequest, CommitCheckpoint, CommitRequest, ErrorBody, ErrorKind, FileUpload, ForwardReplica, IncomingRequest,
    MigrationRequest, Protection, RecoverRequest, RestoreRequest, EPOCH_HEADER,
};

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

/// The API's routes over `agent`, each behind the epoch fence.
pub fn router(agent: Agent) -> Router {
    let seen = agent.inner.store.epoch().unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read the highest leader epoch seen; starting from 0");
        0
    });
    let fence = Fenced { agent: agent.clone(), fence: Arc::new(EpochFence::new(seen)) };
    crate::fence::spawn_watchdog(agent.clone());
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/host/cpu", get(host_cpu))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(show).delete(delete))
        .route("/v1/vms/{name}/pause", post(pause))
        .route("/v1/vms/{name}/resume", post(resume))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/start", post(start))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/will", get(will_requests))
        .route("/v1/vms/{name}/will/answer", post(will_answer))
        .route("/v1/migrations", get(migrations).post(migrate))
        .route("/v1/migrations/{id}", get(migration))
        .route("/v1/migrations/{id}/events", get(migration_events))
        .route("/v1/migrations/{id}/cancel", post(cancel))
        .route("/v1/incoming", post(incoming_prepare))
        .route("/v1/incoming/{name}", get(incoming).delete(incoming_abort))
        .route("/v1/incoming/{name}/commit", post(incoming_commit))
        .route("/v1/incoming/{name}/recover", post(incoming_recover))
        .route("/v1/incoming/{name}/tunnel/{stream}", get(crate::migration::relay::route))
        .route("/v1/vms/{name}/checkpoint", post(checkpoint))
        .route("/v1/vms/{name}/protection", put(protect).delete(unprotect))
        .route("/v1/checkpoints", get(checkpoints))
        .route("/v1/checkpoints/{id}", get(checkpoint_info).delete(delete_checkpoint))
        .route("/v1/checkpoints/{id}/restore", post(restore_checkpoint))
        .route("/v1/replicas", get(replicas))
        .route("/v1/replicas/{vm}", get(replica).delete(delete_replica))
        .route("/v1/replicas/{vm}/files/{file}", put(replica_file))
        .route("/v1/replicas/{vm}/checkpoints", post(commit_replica))
        .route("/v1/replicas/{vm}/restore", post(restore_replica))
        .route("/v1/replicas/{vm}/forward", post(forward_replica))
        .route("/v1/audit", get(audit))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/host/power-cut", post(crate::fence::power_cut))
        .layer(axum::middleware::from_fn(crate::fence::note_controller))
        .layer(axum::middleware::from_fn_with_state(fence, check_epoch))
        .layer(axum::middleware::from_fn(walkabout_trust::serve::error_bodies))
        .with_state(agent)
}

/// The highest leader epoch this agent has seen; requests with a lower one are refused.
#[derive(Debug)]
pub struct EpochFence {
    seen: Mutex<u64>,
}

impl EpochFence {
    /// A fence that has seen `seen` (0: none yet).
    pub fn new(seen: u64) -> EpochFence {
        EpochFence { seen: Mutex::new(seen) }
    }

    /// The highest epoch seen.
    pub fn seen(&self) -> u64 {
        *crate::vms::lock(&self.seen)
    }

    /// Admits a request carrying `epoch`, or refuses it (409 `stale_epoch`) when a
    /// newer leader has spoken here. A newer epoch is `persist`ed before it is admitted,
    /// so the agent refuses the older leader after a restart too.
    pub fn admit(&self, epoch: u64, persist: impl FnOnce(u64) -> Result<(), String>) -> Result<(), (StatusCode, ErrorBody)> {
        let mut seen = crate::vms::lock(&self.seen);
        if epoch < *seen {
            let why = format!(
                "refused: the request carries leader epoch {epoch} but this agent has seen epoch {}: \
                 it comes from a controller that no longer leads the cluster",
                *seen
            );
            return Err((StatusCode::CONFLICT, ErrorBody::new(ErrorKind::StaleEpoch, why)));
        }
        if epoch > *seen {
            persist(epoch).map_err(|e| {
                let why = format!("cannot record leader epoch {epoch}: {e}");
                (StatusCode::INTERNAL_SERVER_ERROR, ErrorBody::new(ErrorKind::Store, why))
            })?;
            tracing::info!(epoch, previous = *seen, "a newer controller leads");
            *seen = epoch;
        }
        Ok(())
    }
}

/// The fence with the agent whose database records it.
#[derive(Clone)]
struct Fenced {
    agent: Agent,
    fence: Arc<EpochFence>,
}

/// Checks the request's epoch header (if any) against the fence.
async fn check_epoch(State(f): State<Fenced>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let Some(value) = req.headers().get(EPOCH_HEADER) else { return next.run(req).await };
    let Some(epoch) = value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) else {
        let why = format!("header {EPOCH_HEADER} must be a whole number, not {value:?}");
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(ErrorBody::new(ErrorKind::InvalidRequest, why))).into_response();
    };
    let persist = |e: u64| f.agent.inner.store.raise_epoch(e).map(|_| ()).map_err(|e| e.to_string());
    match f.fence.admit(epoch, persist) {
        Ok(()) => next.run(req).await,
        Err((status, body)) => (status, Json(body)).into_response(),
    }
}

async fn host(State(a): State<Agent>) -> Response {
    Json(a.host_info()).into_response()
}

async fn host_cpu(State(a): State<Agent>) -> Response {
    reply(a.cpu_catalog().await)
}

async fn list(State(a): State<Agent>) -> Response {
    Json(a.list().await).into_response()
}

type Body<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

/// An optional body: absent is `T::default()`; one that is there must be a `T` (an
/// ErrorBody otherwise, as on every route, not axum's plain-text rejection).
type OptionalBody<T> = Result<Option<Json<T>>, axum::extract::rejection::JsonRejection>;

/// The optional body, its default when absent, or an error (422) naming what is wrong.
fn optional_body<T: Default>(b: OptionalBody<T>, what: &str) -> Result<T, AgentError> {
    b.map(|b| b.map(|Json(v)| v).unwrap_or_default())
        .map_err(|e| AgentError::InvalidRequest { reason: format!("invalid {what}: {}", e.body_text()) })
}

/// The body, or an error (422) naming what is wrong with it.
fn body<T>(b: Body<T>, what: &str) -> Result<T, AgentError> {
    b.map(|Json(v)| v).map_err(|e| AgentError::InvalidRequest { reason: format!("invalid {what}: {}", e.body_text()) })
}

async fn create(State(a): State<Agent>, b: Body<VmSpec>) -> Response {
    let spec = match body(b, "VM spec") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    match a.create(spec).await {
        Ok(info) => (StatusCode::CREATED, Json(info)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn reply<T: serde::Serialize>(r: Result<T, AgentError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn show(State(a): State<Agent>, Path(name): Path<String>) -> Response {
    reply(a.get(&name).await)
}

async fn delete(State(a): State<Agent>, Path(name): Path<String>) -> Response {
    match a.delete(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn pause(State(a): State<Agent>, Path(name): Path<String>) -> Response {
    reply(a.pause(&name).await)
}

async fn resume(State(a): State<Agent>, Path(name): Path<String>) -> Response {
    reply(a.resume(&name).await)
}

async fn stop(State(a): State<Agent>, Path(name): Path<String>) -> Response {
    reply(a.stop(&name).await)
}

async fn start(State(a): State<Agent>, Path(name): Path<String>) -> Response {
    reply(a.start_vm(&name).await)
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default = "default_max")]
    max: u64,
}

fn default_max() -> u64 {
    1 << 20
}

async fn console(State(a): State<Agent>, Path(name): Path<String>, Query(q): Query<ConsoleQuery>) -> Response {
    reply(a.console(&name, q.offset, q.max.min(default_max())).await)
}

async fn audit(State(a): State<Agent>) -> Response {
    Json(a.inner.audit.recent()).into_response()
}

async fn will_requests(State(a): State<Agent>) -> Response {
    Json(a.will_requests()).into_response()
}

async fn will_answer(State(a): State<Agent>, Path(name): Path<String>, b: Body<walkabout_api::WillAnswer>) -> Response {
    match b {
        Ok(Json(answer)) => reply(a.will_answer(&name, answer).await),
        Err(e) => AgentError::InvalidRequest { reason: format!("invalid free-will answer: {}", e.body_text()) }.into_response(),
    }
}

async fn migrations(State(a): State<Agent>) -> Response {
    Json(a.migrations()).into_response()
}

async fn migrate(State(a): State<Agent>, b: Body<MigrationRequest>) -> Response {
    let req = match body(b, "migration request") {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match a.start_migration(req).await {
        Ok(rec) => (StatusCode::ACCEPTED, Json(rec)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn migration(State(a): State<Agent>, Path(id): Path<String>) -> Response {
    reply(a.migration(&id))
}

async fn cancel(State(a): State<Agent>, Path(id): Path<String>) -> Response {
    match a.cancel_migration(&id) {
        Ok(rec) => (StatusCode::ACCEPTED, Json(rec)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Server-sent events: the migration's record every time its progress changes, until
/// it is final.
async fn migration_events(State(a): State<Agent>, Path(id): Path<String>) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    if let Err(e) = a.migration(&id) {
        return e.into_response();
    }
    let stream = futures_util::stream::unfold((a, id, None::<String>, false), |(a, id, last, done)| async move {
        if done {
            return None;
        }
        loop {
            let rec = a.migration(&id).ok()?;
            let text = serde_json::to_string(&rec).ok()?;
            if last.as_deref() != Some(text.as_str()) {
                let fin = rec.phase.is_final();
                let ev = Event::default().event("migration").data(text.clone());
                return Some((Ok::<_, std::convert::Infallible>(ev), (a, id, Some(text), fin)));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

async fn incoming_prepare(
    State(a): State<Agent>,
    source: Option<axum::Extension<walkabout_trust::Identity>>,
    b: Body<IncomingRequest>,
) -> Response {
    let req = match body(b, "incoming migration request") {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    // The source QEMU admitted is the authenticated peer of this request.
    match a.prepare_incoming(req, source.as_ref().map(|s| &s.0)).await {
        Ok(r) => (StatusCode::CREATED, Json(r)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn incoming(State(a): State<Agent>, Path(name): Path<String>) -> Response {
    reply(a.incoming(&name).await)
}

async fn incoming_commit(
    State(a): State<Agent>,
    Path(name): Path<String>,
    b: Result<Option<Json<CommitRequest>>, axum::extract::rejection::JsonRejection>,
) -> Response {
    // The body is optional; one that is there must be a commit request (an ErrorBody
    // otherwise, as on every route, not axum's plain-text rejection).
    let guest = match b {
        Ok(b) => b.and_then(|Json(c)| c.guest),
        Err(e) => return AgentError::InvalidRequest { reason: format!("invalid commit request: {}", e.body_text()) }.into_response(),
    };
    reply(a.commit_incoming(&name, guest).await)
}

async fn incoming_recover(State(a): State<Agent>, Path(name): Path<String>, b: Body<RecoverRequest>) -> Response {
    let req = match body(b, "post-copy recovery request") {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    reply(a.recover_incoming(&name, req).await)
}

async fn incoming_abort(State(a): State<Agent>, Path(name): Path<String>) -> Response {
    match a.abort_incoming(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

fn created<T: serde::Serialize>(r: Result<T, AgentError>) -> Response {
    match r {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn no_content(r: Result<(), AgentError>) -> Response {
    match r {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn checkpoint(State(a): State<Agent>, Path(name): Path<String>, b: OptionalBody<CheckpointRequest>) -> Response {
    match optional_body(b, "checkpoint request") {
        Ok(req) => created(a.checkpoint(&name, req).await),
        Err(e) => e.into_response(),
    }
}

async fn protect(State(a): State<Agent>, Path(name): Path<String>, b: Body<Protection>) -> Response {
    match body(b, "protection") {
        Ok(p) => reply(a.protect(&name, p).await),
        Err(e) => e.into_response(),
    }
}

async fn unprotect(State(a): State<Agent>, Path(name): Path<String>) -> Response {
    reply(a.unprotect(&name).await)
}

async fn checkpoints(State(a): State<Agent>) -> Response {
    reply(a.checkpoints())
}

async fn checkpoint_info(State(a): State<Agent>, Path(id): Path<String>) -> Response {
    reply(a.get_checkpoint(&id))
}

async fn delete_checkpoint(State(a): State<Agent>, Path(id): Path<String>) -> Response {
    no_content(a.delete_checkpoint(&id))
}

async fn restore_checkpoint(State(a): State<Agent>, Path(id): Path<String>, b: OptionalBody<RestoreRequest>) -> Response {
    match optional_body(b, "restore request") {
        Ok(req) => created(a.restore_checkpoint(&id, req).await),
        Err(e) => e.into_response(),
    }
}

async fn replicas(State(a): State<Agent>) -> Response {
    reply(a.replicas())
}

async fn replica(State(a): State<Agent>, Path(vm): Path<String>) -> Response {
    reply(a.replica(&vm))
}

async fn delete_replica(State(a): State<Agent>, Path(vm): Path<String>) -> Response {
    no_content(a.delete_replica(&vm).await)
}

async fn replica_file(
    State(a): State<Agent>,
    Path((vm, file)): Path<(String, String)>,
    q: Result<Query<FileUpload>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Body,
) -> Response {
    let upload = match q {
        Ok(Query(u)) => u,
        Err(e) => return AgentError::InvalidRequest { reason: format!("invalid file upload query: {}", e.body_text()) }.into_response(),
    };
    reply(a.receive_file(&vm, &file, upload, body.into_data_stream()).await)
}

async fn commit_replica(State(a): State<Agent>, Path(vm): Path<String>, b: Body<CommitCheckpoint>) -> Response {
    match body(b, "checkpoint commit") {
        Ok(c) => reply(a.commit_replica(&vm, c).await),
        Err(e) => e.into_response(),
    }
}

async fn forward_replica(State(a): State<Agent>, Path(vm): Path<String>, b: Body<ForwardReplica>) -> Response {
    match body(b, "forward request") {
        Ok(req) => reply(a.forward_replica(&vm, req).await),
        Err(e) => e.into_response(),
    }
}

async fn restore_replica(State(a): State<Agent>, Path(vm): Path<String>, b: OptionalBody<RestoreRequest>) -> Response {
    match optional_body(b, "restore request") {
        Ok(req) => created(a.restore_replica(&vm, req).await),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(a): State<Agent>) -> Response {
    let body = crate::metrics::render(&a.host_info(), &a.list().await, &a.migrations());
    ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// The agent's OpenAPI document, generated once from `walkabout-api`.
async fn openapi() -> Response {
    Json(walkabout_api::openapi::agent_json()).into_response()
}

/// Every `(METHOD, path)` the router serves, as the OpenAPI document spells paths.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/host"),
    ("GET", "/v1/host/cpu"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{name}"),
    ("DELETE", "/v1/vms/{name}"),
    ("POST", "/v1/vms/{name}/pause"),
    ("POST", "/v1/vms/{name}/resume"),
    ("POST", "/v1/vms/{name}/stop"),
    ("POST", "/v1/vms/{name}/start"),
    ("GET", "/v1/vms/{name}/console"),
    ("GET", "/v1/will"),
    ("POST", "/v1/vms/{name}/will/answer"),
    ("GET", "/v1/migrations"),
    ("POST", "/v1/migrations"),
    ("GET", "/v1/migrations/{id}"),
    ("GET", "/v1/migrations/{id}/events"),
    ("POST", "/v1/migrations/{id}/cancel"),
    ("POST", "/v1/incoming"),
    ("GET", "/v1/incoming/{name}"),
    ("DELETE", "/v1/incoming/{name}"),
    ("POST", "/v1/incoming/{name}/commit"),
    ("POST", "/v1/incoming/{name}/recover"),
    ("GET", "/v1/incoming/{name}/tunnel/{stream}"),
    ("POST", "/v1/vms/{name}/checkpoint"),
    ("PUT", "/v1/vms/{name}/protection"),
    ("DELETE", "/v1/vms/{name}/protection"),
    ("GET", "/v1/checkpoints"),
    ("GET", "/v1/checkpoints/{id}"),
    ("DELETE", "/v1/checkpoints/{id}"),
    ("POST", "/v1/checkpoints/{id}/restore"),
    ("GET", "/v1/replicas"),
    ("GET", "/v1/replicas/{vm}"),
    ("DELETE", "/v1/replicas/{vm}"),
    ("PUT", "/v1/replicas/{vm}/files/{file}"),
    ("POST", "/v1/replicas/{vm}/checkpoints"),
    ("POST", "/v1/replicas/{vm}/restore"),
    ("POST", "/v1/replicas/{vm}/forward"),
    ("GET", "/v1/audit"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
    ("POST", "/v1/host/power-cut"),
];

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_epoch_is_refused_as_stale_naming_both_epochs() {
        let fence = EpochFence::new(7);
        let (status, body) = fence.admit(6, |_| Ok(())).expect_err("epoch 6 after 7");
        assert_eq!((status, body.kind), (StatusCode::CONFLICT, ErrorKind::StaleEpoch));
        assert!(body.error.contains("epoch 6") && body.error.contains("epoch 7"), "{}", body.error);
    }

    #[test]
    fn a_newer_epoch_is_recorded_before_it_is_admitted_and_then_fences_the_older() {
        let fence = EpochFence::new(3);
        let mut recorded = vec![];
        fence
            .admit(9, |e| {
                recorded.push(e);
                Ok(())
            })
            .expect("newer admitted");
        fence.admit(9, |_| Err("must not write again".into())).expect("same admitted");
        assert_eq!((recorded, fence.seen()), (vec![9], 9));
        assert!(fence.admit(3, |_| Ok(())).is_err());
    }

    #[test]
    fn a_newer_epoch_that_cannot_be_recorded_is_not_admitted() {
        let fence = EpochFence::new(1);
        let (status, body) = fence.admit(2, |_| Err("disk full".into())).expect_err("not recorded");
        assert_eq!((status, body.kind, fence.seen()), (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Store, 1));
    }

    #[test]
    fn the_router_serves_exactly_the_documented_paths() {
        assert_eq!(walkabout_api::openapi::compare_routes(super::ROUTES, &walkabout_api::openapi::agent()), Ok(()));
    }
}
