//! Errors of controller operations, each naming the thing and the cause, and the HTTP
//! status each is served with.

use crate::store::StoreError;
use walkabout_api::{Blocked, ClientError, ErrorBody, ErrorKind};

/// Errors of controller operations.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// No such host, VM, plan or migration.
    #[error("no {what} named `{name}`")]
    NotFound {
        /// `host`, `VM`, `plan`, `migration`, `walk`.
        what: &'static str,
        /// The name or id asked for.
        name: String,
    },
    /// The request conflicts with the cluster's state (a plan already runs, a host is
    /// down, a plan is not in a state to execute...).
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// No plan exists for the goal; `blocked` says why, per VM.
    #[error("{reason}: {}", blocked_text(.blocked))]
    Impossible {
        /// One sentence for the whole goal.
        reason: String,
        /// Each VM that cannot go where the goal needs it, with why.
        blocked: Vec<Blocked>,
        /// The plan recorded for review, if one was.
        plan: Option<String>,
    },
    /// An agent failed or refused.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// etcd (the store and election of several controllers) failed.
    #[error(transparent)]
    Etcd(#[from] walkabout_store_etcd::EtcdError),
}

fn blocked_text(b: &[Blocked]) -> String {
    b.iter()
        .map(|b| if b.why.starts_with(&b.vm) { b.why.clone() } else { format!("{} needs {}: {}", b.vm, b.needs, b.why) })
        .collect::<Vec<_>>()
        .join("; ")
}

impl ControllerError {
    /// The HTTP status this error is served with.
    pub fn http_status(&self) -> u16 {
        match self {
            ControllerError::NotFound { .. } => 404,
            ControllerError::Conflict(_) | ControllerError::Impossible { .. } => 409,
            ControllerError::Invalid(_) => 422,
            ControllerError::Agent(e) => e.status().unwrap_or(502),
            ControllerError::Store(StoreError::Fenced { .. }) => 503,
            ControllerError::Store(_) => 500,
            ControllerError::Etcd(_) => 503,
        }
    }

    /// The machine-readable kind clients match on (an agent's refusal keeps its kind).
    pub fn kind(&self) -> ErrorKind {
        match self {
            ControllerError::NotFound { .. } => ErrorKind::NotFound,
            ControllerError::Conflict(_) => ErrorKind::Conflict,
            ControllerError::Invalid(_) => ErrorKind::InvalidRequest,
            ControllerError::Impossible { .. } => ErrorKind::Impossible,
            ControllerError::Agent(e) => e.kind().unwrap_or(ErrorKind::Agent),
            ControllerError::Store(StoreError::Fenced { .. }) => ErrorKind::NotLeader,
            ControllerError::Store(_) | ControllerError::Etcd(_) => ErrorKind::Store,
        }
    }

    /// The error as served.
    pub fn body(&self) -> ErrorBody {
        let mut body = ErrorBody::new(self.kind(), self.to_string());
        if let ControllerError::Impossible { blocked, plan, .. } = self {
            body.blocked = blocked.clone();
            body.plan = plan.clone();
        }
        body
    }

    pub(crate) fn not_found(what: &'static str, name: &str) -> ControllerError {
        ControllerError::NotFound { what, name: name.to_string() }
    }
}
