//! The agent's HTTP/JSON API.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | /v1/host | host resources, accelerator (and why), QEMU version |
//! | GET, POST | /v1/vms | list; create from a [`VmSpec`](crate::spec::VmSpec) (201) |
//! | GET, DELETE | /v1/vms/{name} | one VM with its guest status; delete |
//! | POST | /v1/vms/{name}/pause, /resume, /stop | lifecycle |
//! | GET | /v1/vms/{name}/console?offset=N | serial console from byte N |
//!
//! Errors are `{"error": "<sentence naming the VM and cause>", "kind": "<kind>"}` with a
//! 4xx/5xx status.

use crate::error::AgentError;
use crate::spec::VmSpec;
use crate::vms::Agent;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "error": self.to_string(), "kind": self.kind() }))).into_response()
    }
}

/// The API's routes over `agent`.
pub fn router(agent: Agent) -> Router {
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(show).delete(delete))
        .route("/v1/vms/{name}/pause", post(pause))
        .route("/v1/vms/{name}/resume", post(resume))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/console", get(console))
        .with_state(agent)
}

async fn host(State(a): State<Agent>) -> Response {
    Json(a.host_info()).into_response()
}

async fn list(State(a): State<Agent>) -> Response {
    Json(a.list().await).into_response()
}

async fn create(State(a): State<Agent>, body: Result<Json<VmSpec>, axum::extract::rejection::JsonRejection>) -> Response {
    let spec = match body {
        Ok(Json(s)) => s,
        Err(e) => {
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "error": format!("invalid VM spec: {}", e.body_text()), "kind": "invalid_spec" })))
                .into_response()
        }
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
