//! Errors on the wire: every error reply is an [`ErrorBody`] with an HTTP status, a
//! sentence naming the thing and the cause, and a machine-readable [`ErrorKind`].

use crate::plan::Blocked;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What kind of error a server answered. Clients match on this, never on the sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No such VM, host, plan, migration or walk.
    NotFound,
    /// A VM of that name already exists.
    Duplicate,
    /// The host lacks the memory.
    InsufficientMemory,
    /// The VM spec is not valid.
    InvalidSpec,
    /// The thing is not in a state that allows the operation.
    InvalidState,
    /// The request is malformed or names something invalid.
    InvalidRequest,
    /// The destination host cannot run the VM's CPU model.
    CpuIncompatible,
    /// No such migration.
    MigrationNotFound,
    /// The VM is already being migrated.
    MigrationInProgress,
    /// The migration is past its switchover: it cannot be cancelled.
    NotCancellable,
    /// QEMU refused or failed.
    Qemu,
    /// The server's database failed.
    Store,
    /// A goal no plan can reach (see `blocked`).
    Impossible,
    /// The operation conflicts with one under way.
    Conflict,
    /// An agent did not answer or refused.
    Agent,
    /// An agent refused a request carrying an older leader epoch than one it has seen
    /// (header `X-Walkabout-Epoch`): it came from a controller that no longer leads.
    StaleEpoch,
    /// This controller is a follower (the sentence names the leader's URL), or no
    /// controller leads yet: ask the leader.
    NotLeader,
    /// No valid client certificate (HTTP 401).
    Unauthenticated,
    /// The caller's role does not allow this (HTTP 403).
    Forbidden,
    /// The request body is larger than the server reads (HTTP 413).
    TooLarge,
    /// A kind this client does not know (a newer server).
    #[serde(other)]
    Other,
}

/// The body of every error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// One sentence naming the thing and the cause.
    pub error: String,
    /// What kind of error.
    pub kind: ErrorKind,
    /// With `impossible`: why each VM cannot go where the goal wants it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<Blocked>,
    /// With `impossible`: the plan recorded for review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

impl ErrorBody {
    /// An error body with no extra detail.
    pub fn new(kind: ErrorKind, error: impl Into<String>) -> ErrorBody {
        ErrorBody { error: error.into(), kind, blocked: vec![], plan: None }
    }
}
