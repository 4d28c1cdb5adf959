//! The controller's event stream (`GET /v1/events`, server-sent events): every change it
//! sees or makes, numbered.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Version of [`Event`]'s stored layout.
pub const EVENT_VERSION: u32 = 1;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// A host.
    Host,
    /// A VM.
    Vm,
    /// A plan.
    Plan,
    /// A migration.
    Migration,
    /// A walk or a game.
    Walk,
    /// A checkpoint of a protected VM, or a failover.
    Failover,
    /// A change someone asked for: who (name and role), the method, the path, the
    /// status it got. `name` is the identity's name.
    Audit,
}

/// One change. Sent as an SSE message whose `event:` is the subject and whose `id:` is
/// the sequence number (resume with `?since=N`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Layout version.
    pub version: u32,
    /// Sequence number, from 1, never reused.
    pub seq: u64,
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// What kind of thing changed.
    pub subject: Subject,
    /// Which one (host name, VM name, plan or migration id).
    pub name: String,
    /// What happened, in one sentence.
    pub message: String,
    /// The thing as it is now (a [`crate::cluster::Host`], a
    /// [`crate::cluster::ClusterVm`], a [`crate::plan::PlanRecord`], ...).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}
