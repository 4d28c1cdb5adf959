//! Hosts joining the cluster: the controller holds the cluster CA (given `--ca-dir`),
//! hands operators short-lived join tokens (`POST /v1/join-tokens`) and signs a joining
//! host's CSR for the token's host name (`POST /v1/join`, the token in
//! `Authorization: Bearer`). The token is the join's only credential: one use, one host,
//! minutes long. Without a CA both routes answer 409.
//!
//! It also hands out the web console's logins (`POST /v1/console/logins`): a console URL
//! with a one-time token for an operator's or a viewer's session (see
//! [`walkabout_trust::session`]); 409 when the controller serves no console.

use crate::controller::Cluster;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use std::sync::Arc;
use std::time::Duration;
use walkabout_api::{
    ConsoleLogin, ConsoleLoginRequest, ConsoleRole, ErrorKind, JoinReply, JoinRequest, JoinToken, JoinTokenRequest, Subject,
};
use walkabout_trust::serve::error_reply;
use walkabout_trust::token::TokenError;
use walkabout_trust::{Ca, JoinTokens, Role};

/// How long a join token lives unless asked otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(600);

/// The controller's part of the cluster's trust: its CA (if it holds one) and the join
/// tokens it handed out.
#[derive(Debug, Default)]
pub struct Trust {
    ca: Option<Ca>,
    tokens: JoinTokens,
    console: std::sync::OnceLock<ConsoleDoor>,
}

/// The web console this controller serves: where, and its sessions.
#[derive(Debug)]
struct ConsoleDoor {
    url: String,
    sessions: Arc<walkabout_trust::Sessions>,
}

/// How long a console login token waits to be used unless asked otherwise.
pub const DEFAULT_CONSOLE_LOGIN_TTL: Duration = Duration::from_secs(600);

impl Trust {
    /// Trust without a CA: joins are refused.
    pub fn none() -> Arc<Trust> {
        Arc::new(Trust::default())
    }

    /// Trust holding `ca`.
    pub fn with_ca(ca: Ca) -> Arc<Trust> {
        Arc::new(Trust { ca: Some(ca), tokens: JoinTokens::default(), console: std::sync::OnceLock::new() })
    }

    /// Records the web console served at `url` (`http://ADDR/`) with `sessions`, so
    /// that [`Trust::console_login`] can hand out its logins. Only the first call counts.
    pub fn serve_console(&self, url: &str, sessions: Arc<walkabout_trust::Sessions>) {
        let _ = self.console.set(ConsoleDoor { url: url.trim_end_matches('/').to_string(), sessions });
    }

    /// A console URL with a one-time login token for `name` in `role`, valid for `ttl`.
    pub fn console_login(&self, name: &str, role: ConsoleRole, ttl: Duration) -> Result<ConsoleLogin, String> {
        let door = self.console.get().ok_or("this controller serves no web console (start it with --web-listen ADDR)")?;
        let who = walkabout_trust::Identity {
            name: name.to_string(),
            role: match role {
                ConsoleRole::Operator => Role::Operator,
                ConsoleRole::Viewer => Role::Viewer,
            },
        };
        let ttl = ttl.min(walkabout_trust::session::MAX_LOGIN_TTL);
        let token = door.sessions.issue(who, ttl).map_err(|e| e.to_string())?;
        let expires_at_ms = crate::now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        Ok(ConsoleLogin { url: format!("{}{}?token={token}", door.url, walkabout_trust::session::LOGIN_PATH), role, expires_at_ms })
    }
}

#[derive(Clone)]
struct JoinState {
    trust: Arc<Trust>,
    cluster: Cluster,
}

/// The join routes.
pub fn router(cluster: Cluster, trust: Arc<Trust>) -> Router {
    Router::new()
        .route("/v1/join-tokens", post(token))
        .route("/v1/join", post(join))
        .route("/v1/console/logins", post(console_login))
        .with_state(JoinState { trust, cluster })
}

fn no_ca() -> Response {
    error_reply(
        StatusCode::CONFLICT,
        ErrorKind::Conflict,
        "this controller holds no cluster CA (start it with --ca-dir DIR; walkabout ca init)".into(),
    )
}

fn invalid(message: String) -> Response {
    error_reply(StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::InvalidRequest, message)
}

type Body<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

async fn token(State(s): State<JoinState>, b: Body<JoinTokenRequest>) -> Response {
    let req = match b {
        Ok(Json(r)) => r,
        Err(e) => return invalid(format!("invalid join token request: {}", e.body_text())),
    };
    if s.trust.ca.is_none() {
        return no_ca();
    }
    if !walkabout_trust::valid_name(&req.host) {
        return invalid(format!("invalid host name {:?}: use 1-63 letters, digits, '-', '_' or '.'", req.host));
    }
    let ttl = req.ttl_s.map(Duration::from_secs).unwrap_or(DEFAULT_TOKEN_TTL).min(walkabout_trust::token::MAX_TTL);
    match s.trust.tokens.issue(&req.host, ttl) {
        Ok(token) => {
            let expires_ms = crate::now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
            (StatusCode::CREATED, Json(JoinToken { token, host: req.host, expires_ms })).into_response()
        }
        Err(e) => error_reply(StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Other, e.to_string()),
    }
}

async fn join(State(s): State<JoinState>, headers: HeaderMap, b: Body<JoinRequest>) -> Response {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = bearer else {
        return error_reply(
            StatusCode::UNAUTHORIZED,
            ErrorKind::Unauthenticated,
            "POST /v1/join needs a join token in Authorization: Bearer (walkabout host token)".into(),
        );
    };
    let req = match b {
        Ok(Json(r)) => r,
        Err(e) => return invalid(format!("invalid join request: {}", e.body_text())),
    };
    let Some(ca) = &s.trust.ca else {
        return no_ca();
    };
    if let Err(e) = s.trust.tokens.redeem(token, &req.host) {
        let status = if matches!(e, TokenError::NoRandom) { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::UNAUTHORIZED };
        return error_reply(status, ErrorKind::Unauthenticated, e.to_string());
    }
    match ca.sign_csr(&req.csr_pem, &req.host, Role::Host) {
        Ok(cert_pem) => {
            s.cluster.events().emit(
                Subject::Audit,
                &req.host,
                format!("host {} joined with a join token and got a host certificate", req.host),
                serde_json::json!({"who": req.host, "role": "host", "method": "POST", "path": "/v1/join", "status": 201}),
            );
            (StatusCode::CREATED, Json(JoinReply { cert_pem, ca_pem: ca.cert_pem().to_string() })).into_response()
        }
        Err(e) => invalid(format!("cannot sign the CSR of {}: {e}", req.host)),
    }
}

async fn console_login(
    State(s): State<JoinState>,
    who: Option<axum::Extension<walkabout_trust::Identity>>,
    b: Body<ConsoleLoginRequest>,
) -> Response {
    let req = match b {
        Ok(Json(r)) => r,
        Err(e) => return invalid(format!("invalid console login request: {}", e.body_text())),
    };
    let name = who.map_or_else(|| walkabout_trust::serve::LOOPBACK_NAME.to_string(), |w| w.0.name);
    let ttl = req.ttl_s.map(Duration::from_secs).unwrap_or(DEFAULT_CONSOLE_LOGIN_TTL);
    match s.trust.console_login(&name, req.role, ttl) {
        Ok(login) => (StatusCode::CREATED, Json(login)).into_response(),
        Err(e) => error_reply(StatusCode::CONFLICT, ErrorKind::Conflict, e),
    }
}

/// The audit hook of the controller's server: every change, with who asked, in the
/// event log.
pub fn audit(cluster: Cluster) -> walkabout_trust::serve::Audit {
    Arc::new(move |who, method, path, status| {
        cluster.events().emit(
            Subject::Audit,
            &who.name,
            format!("{who}: {method} {path} -> {status}"),
            serde_json::json!({"who": who.name, "role": who.role.as_str(), "method": method, "path": path, "status": status}),
        );
    })
}
