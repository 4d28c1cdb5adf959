//! The controller's HTTP/JSON API. Operations that take time return `202 Accepted` with
//! a resource to poll (a plan, a walk), as Nova does.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | /v1/cluster | summary: hosts, VMs, running plan, limits |
//! | GET, PUT | /v1/balance | automatic balancing: level (manual, recommend, automatic), threshold, last moves |
//! | GET, POST | /v1/hosts | list; register an agent `{"url", "name"?}` (201) |
//! | GET, DELETE | /v1/hosts/{name} | one host: status (down since when, why), maintenance, capacity, VMs; remove it (none of its VMs running or awaiting failover) |
//! | POST | /v1/hosts/{name}/drain | maintenance + drain plan, executed (202 plan); 409 with per-VM reasons if impossible |
//! | POST | /v1/hosts/{name}/undrain | back in service (cancels its drain) |
//! | GET, POST | /v1/vms | list; create `{"host"?, ...agent VM spec}` (201) |
//! | GET, DELETE | /v1/vms/{name} | one VM (where, guest health); delete |
//! | POST | /v1/vms/{name}/move | `{"to": HOST}`: a place plan, executed (202 plan) |
//! | GET | /v1/migrations[/{id}] | migrations the controller ordered |
//! | POST | /v1/migrations/{id}/cancel | cancel one (before switchover) |
//! | GET, POST | /v1/plans | list; plan a goal, dry run (201): `{"goal":"drain","host":"h1"}`, `{"goal":"rebalance"}`, `{"goal":"consolidate"}`, `{"goal":"place","vm","host"}` |
//! | GET | /v1/plans/{id} | one plan: steps with their migrations, problems |
//! | POST | /v1/plans/{id}/execute | execute a proposed plan (202) |
//! | POST | /v1/plans/{id}/cancel | cancel (202) |
//! | GET, POST | /v1/walks | list; start a walk `{"duration_ms", "parallel"?}` (202) |
//! | POST | /v1/games/musical-chairs | start a game `{"duration_ms" (per round), "parallel"?}` (202) |
//! | GET | /v1/games/hanoi/plan?levels=N | the Towers of Hanoi's planned moves (the planner only) |
//! | GET | /v1/walks/{id} | a walk or game: hops with downtime, rounds, survivors |
//! | POST | /v1/walks/{id}/stop | stop it (a walk or any game) |
//! | GET | /v1/events?since=N | server-sent events: everything that changes |
//! | GET | /metrics | Prometheus metrics |
//! | GET | /v1/openapi.json | this API's OpenAPI document |
//! | POST | /v1/join-tokens | a short-lived join token for one host (201) |
//! | POST, DELETE | /v1/vms/{name}/protect | protect a VM (checkpoints to a replica, self-fencing); stop protecting it |
//! | GET | /v1/failovers | each VM of a down host: restored (RPO, RTO) or lost, and why |
//! | POST | /v1/join | a host's CSR with a join token (`Authorization: Bearer`): its certificate (201) |
//!
//! The walk and game routes are the games' own (`games::router`), merged here.
//!
//! Every body is a type of `walkabout-api`; errors are its `ErrorBody` (`error`, `kind`,
//! and for an impossible goal `blocked` per VM and `plan`).

use crate::cluster::HostStatus;
use crate::controller::Cluster;
use crate::error::ControllerError;
use crate::plans::{Goal, PlanStatus};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use walkabout_api::{AddHost, ClusterSummary, CreateVm, MoveVm};

impl IntoResponse for ControllerError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

/// The API's routes over `cluster` (joins refused: no CA).
pub fn router(cluster: Cluster) -> Router {
    router_with_trust(cluster, crate::join::Trust::none())
}

/// The API's routes over `cluster`, joins signed with `trust`'s CA.
pub fn router_with_trust(cluster: Cluster, trust: std::sync::Arc<crate::join::Trust>) -> Router {
    Router::new()
        .route("/v1/cluster", get(summary))
        .route("/v1/hosts", get(hosts).post(add_host))
        .route("/v1/hosts/{name}", get(host).delete(remove_host))
        .route("/v1/hosts/{name}/drain", post(drain))
        .route("/v1/hosts/{name}/undrain", post(undrain))
        .route("/v1/vms", get(vms).post(create_vm))
        .route("/v1/vms/{name}", get(vm).delete(delete_vm))
        .route("/v1/vms/{name}/move", post(move_vm))
        .route("/v1/vms/{name}/protect", post(protect).delete(unprotect))
        .route("/v1/failovers", get(failovers))
        .route("/v1/migrations", get(migrations))
        .route("/v1/migrations/{id}", get(migration))
        .route("/v1/migrations/{id}/cancel", post(cancel_migration))
        .route("/v1/plans", get(plans).post(propose))
        .route("/v1/plans/{id}", get(plan))
        .route("/v1/plans/{id}/execute", post(execute))
        .route("/v1/plans/{id}/cancel", post(cancel))
        .route("/v1/balance", get(balance).put(set_balance))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .with_state(cluster.clone())
        .merge(crate::games::router(cluster.games().clone()))
        .merge(crate::join::router(cluster, trust))
        .layer(axum::middleware::from_fn(walkabout_trust::serve::error_bodies))
}

type Body<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

fn body<T>(b: Body<T>, what: &str) -> Result<T, ControllerError> {
    b.map(|Json(v)| v).map_err(|e| ControllerError::Invalid(format!("invalid {what}: {}", e.body_text())))
}

fn reply<T: serde::Serialize>(r: Result<T, ControllerError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn with_status<T: serde::Serialize>(status: StatusCode, r: Result<T, ControllerError>) -> Response {
    match r {
        Ok(v) => (status, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn summary(State(c): State<Cluster>) -> Response {
    let running_plans: Vec<String> = c.plans().into_iter().filter(|p| p.status == PlanStatus::Running).map(|p| p.id).collect();
    Json(ClusterSummary { hosts: c.hosts(), vms: c.vms(), running_plans, limits: c.limits() }).into_response()
}

async fn hosts(State(c): State<Cluster>) -> Response {
    Json(c.hosts()).into_response()
}

async fn add_host(State(c): State<Cluster>, b: Body<AddHost>) -> Response {
    let r = async {
        let a = body(b, "host registration")?;
        c.add_host(&a.url, a.name.as_deref()).await
    }
    .await;
    with_status(StatusCode::CREATED, r)
}

async fn host(State(c): State<Cluster>, Path(name): Path<String>) -> Response {
    reply(c.host(&name))
}

async fn remove_host(State(c): State<Cluster>, Path(name): Path<String>) -> Response {
    match c.remove_host(&name) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn drain(State(c): State<Cluster>, Path(name): Path<String>) -> Response {
    with_status(StatusCode::ACCEPTED, c.drain(&name))
}

async fn undrain(State(c): State<Cluster>, Path(name): Path<String>) -> Response {
    reply(c.undrain(&name).await)
}

async fn vms(State(c): State<Cluster>) -> Response {
    Json(c.vms()).into_response()
}

async fn vm(State(c): State<Cluster>, Path(name): Path<String>) -> Response {
    reply(c.vm(&name))
}

async fn balance(State(c): State<Cluster>) -> Response {
    Json(c.balance_status()).into_response()
}

async fn set_balance(State(c): State<Cluster>, b: Body<walkabout_api::BalanceConfig>) -> Response {
    match body(b, "balance settings") {
        Ok(cfg) => {
            c.set_balance_config(cfg);
            Json(c.balance_status()).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn create_vm(State(c): State<Cluster>, b: Body<CreateVm>) -> Response {
    let r = async {
        let req = body(b, "VM spec")?;
        c.create_vm_in(req.spec, req.host.as_deref(), req.groups).await
    }
    .await;
    with_status(StatusCode::CREATED, r)
}

async fn delete_vm(State(c): State<Cluster>, Path(name): Path<String>) -> Response {
    match c.delete_vm(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn move_vm(State(c): State<Cluster>, Path(name): Path<String>, b: Body<MoveVm>) -> Response {
    let r = body(b, "move request").and_then(|m| c.move_vm(&name, &m.to));
    with_status(StatusCode::ACCEPTED, r)
}

async fn protect(State(c): State<Cluster>, Path(name): Path<String>, b: Body<walkabout_api::ProtectVm>) -> Response {
    let r = async {
        let req = body(b, "protection")?;
        c.protect(&name, &req).await
    }
    .await;
    reply(r)
}

async fn unprotect(State(c): State<Cluster>, Path(name): Path<String>) -> Response {
    reply(c.unprotect(&name).await)
}

async fn failovers(State(c): State<Cluster>) -> Response {
    Json(c.failovers()).into_response()
}

async fn migrations(State(c): State<Cluster>) -> Response {
    Json(c.migrations()).into_response()
}

async fn migration(State(c): State<Cluster>, Path(id): Path<String>) -> Response {
    reply(c.migration(&id))
}

async fn cancel_migration(State(c): State<Cluster>, Path(id): Path<String>) -> Response {
    with_status(StatusCode::ACCEPTED, c.cancel_migration(&id).await)
}

async fn plans(State(c): State<Cluster>) -> Response {
    Json(c.plans()).into_response()
}

async fn propose(State(c): State<Cluster>, b: Body<Goal>) -> Response {
    with_status(StatusCode::CREATED, body(b, "goal").and_then(|g| c.propose(g)))
}

async fn plan(State(c): State<Cluster>, Path(id): Path<String>) -> Response {
    reply(c.plan(&id))
}

async fn execute(State(c): State<Cluster>, Path(id): Path<String>) -> Response {
    with_status(StatusCode::ACCEPTED, c.execute(&id))
}

async fn cancel(State(c): State<Cluster>, Path(id): Path<String>) -> Response {
    with_status(StatusCode::ACCEPTED, c.cancel_plan(&id).await)
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: Option<u64>,
    /// The last N events as one JSON array instead of a stream.
    #[serde(default)]
    tail: Option<u64>,
}

async fn events(State(c): State<Cluster>, Query(q): Query<Since>) -> Response {
    if let Some(n) = q.tail {
        return Json(c.events().tail(n)).into_response();
    }
    crate::events::sse(c.events(), q.since)
}

async fn metrics(State(c): State<Cluster>) -> Response {
    let hosts = c.hosts();
    let samples: Vec<_> =
        hosts.iter().map(|h| crate::metrics::HostSample { name: &h.name, up: h.status == HostStatus::Up, free_mib: h.free_mib }).collect();
    let phases: Vec<_> = c.migrations().iter().map(|m| m.phase).collect();
    let mut probed: Vec<(u64, u64)> =
        c.migrations().iter().filter_map(|m| Some((m.finished_ms.unwrap_or(0), m.observed_downtime_ms?))).collect();
    probed.sort_unstable();
    let observed: Vec<u64> = probed.into_iter().map(|(_, ms)| ms).collect();
    let body = crate::metrics::render(&samples, c.vms().len(), &phases, &observed, &c.failovers());
    ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// The controller's OpenAPI document, generated once from `walkabout-api`.
async fn openapi() -> Response {
    Json(walkabout_api::openapi::controller_json()).into_response()
}

/// Every `(METHOD, path)` the router serves, as the OpenAPI document spells paths.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/cluster"),
    ("GET", "/v1/balance"),
    ("PUT", "/v1/balance"),
    ("GET", "/v1/hosts"),
    ("POST", "/v1/hosts"),
    ("GET", "/v1/hosts/{name}"),
    ("DELETE", "/v1/hosts/{name}"),
    ("POST", "/v1/hosts/{name}/drain"),
    ("POST", "/v1/hosts/{name}/undrain"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{name}"),
    ("DELETE", "/v1/vms/{name}"),
    ("POST", "/v1/vms/{name}/move"),
    ("GET", "/v1/migrations"),
    ("GET", "/v1/migrations/{id}"),
    ("POST", "/v1/migrations/{id}/cancel"),
    ("GET", "/v1/plans"),
    ("POST", "/v1/plans"),
    ("GET", "/v1/plans/{id}"),
    ("POST", "/v1/plans/{id}/execute"),
    ("POST", "/v1/plans/{id}/cancel"),
    ("GET", "/v1/walks"),
    ("POST", "/v1/walks"),
    ("POST", "/v1/games/musical-chairs"),
    ("POST", "/v1/games/scotland-yard"),
    ("POST", "/v1/games/{id}/move"),
    ("POST", "/v1/games/hanoi"),
    ("GET", "/v1/games/hanoi/plan"),
    ("GET", "/v1/will"),
    ("GET", "/v1/walks/{id}"),
    ("POST", "/v1/walks/{id}/stop"),
    ("GET", "/v1/events"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
    ("POST", "/v1/join-tokens"),
    ("POST", "/v1/join"),
    ("POST", "/v1/vms/{name}/protect"),
    ("DELETE", "/v1/vms/{name}/protect"),
    ("GET", "/v1/failovers"),
    ("POST", "/v1/console/logins"),
];

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    #[test]
    fn the_router_serves_exactly_the_documented_paths() {
        assert_eq!(walkabout_api::openapi::compare_routes(super::ROUTES, &walkabout_api::openapi::controller()), Ok(()));
    }
}
