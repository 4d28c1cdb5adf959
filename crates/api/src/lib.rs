//! The contract between Walkabout's processes: every request, reply and event of the
//! agent's and the controller's HTTP/JSON APIs, as plain serde types (states are enums
//! with `is_final()` where they end), and one typed async client per server
//! ([`AgentClient`], [`ControllerClient`]) with timeouts on every call.
//!
//! The OpenAPI documents ([`openapi::agent`], [`openapi::controller`]) are generated
//! from these types and the route list in [`openapi`]; the checked-in copies under
//! `docs/api/` are kept equal to them by a test, and each server serves its own at
//! `/v1/openapi.json`.
//!
//! ```text
//!  walkabout CLI ──ControllerClient──> controller ──AgentClient──> agent ──AgentClient──> agent
//!        └────────────AgentClient──────────────────────────────────┘   (peer, /v1/incoming)
//! ```
//!
//! Compatibility: fields are added with `#[serde(default)]`; a field or path is never
//! renamed in place. Stored records carry a `version` and are upgraded when read.

/// `Display` and `FromStr` of a wire enum from one table of its spellings (the same as
/// its serde names), so that the CLI's parsing, its output and the wire never disagree.
macro_rules! spelled {
    ($ty:ident, $unknown:literal, { $($var:ident => $s:literal),+ $(,)? }) => {
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self {
                    $($ty::$var => $s),+
                })
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($ty::$var),)+
                    o => Err(format!($unknown, o)),
                }
            }
        }
    };
}

pub mod checkpoint;
pub mod client;
pub mod cluster;
pub mod console;
pub mod disk;
pub mod error;
pub mod event;
pub mod host;
pub mod migration;
pub mod nic;
pub mod openapi;
pub mod plan;
pub mod trust;
pub mod vm;
pub mod walk;

/// The request header in which the leading controller sends its epoch to agents
/// (decimal). An agent remembers the highest epoch it has seen and refuses a request with
/// a lower one ([`ErrorKind::StaleEpoch`], HTTP 409), so a deposed leader cannot start a
/// migration. Requests without it (the CLI, a peer agent, a single controller on its
/// embedded store) are not fenced.
pub const EPOCH_HEADER: &str = "x-walkabout-epoch";

pub use checkpoint::{
    Checkpoint, CheckpointFile, CheckpointMethod, CheckpointRequest, CommitCheckpoint, Encoding, Failover, FailoverResult, FileKind,
    FileUpload, ForwardReplica, ProtectVm, Protection, ProtectionStatus, ReplicaState, RestoreReply, RestoreRequest, CONTROLLER_HEADER,
};
pub use client::{AgentClient, ClientError, ClientOptions, ControllerClient};
pub use cluster::{
    AddHost, BalanceConfig, BalanceLevel, BalanceMove, BalanceStatus, ClusterMigration, ClusterSummary, ClusterVm, ClusterVmState,
    CreateVm, ExecLimits, GroupRule, Host, HostStatus, Maintenance, MoveVm, VmGroup,
};
pub use console::{ConsoleLogin, ConsoleLoginRequest, ConsoleRole};
pub use disk::{DiskBus, DiskFormat, DiskSpec, StorageMode};
pub use error::{ErrorBody, ErrorKind};
pub use event::{Event, Subject};
pub use host::{Accel, AccelChoice, CpuCatalog, HostInfo, QemuVersion, BASELINE_CPU_MODEL};
pub use migration::{
    BackingImage, CommitRequest, Compression, DiskProgress, IncomingDisk, IncomingReply, IncomingRequest, Limits, MigrationRecord,
    MigrationRequest, MigrationSummary, Mode, Phase, PhaseTimes, PostcopyPause, Progress, RecoverRequest, StorageMarker, Strategy, Switch,
    Tuning, TunnelStream, TUNNEL_PATH, TUNNEL_PROTOCOL,
};
pub use nic::NicSpec;
pub use plan::{Blocked, Goal, PlanRecord, PlanStatus, Problem, Step, StepStatus};
pub use trust::{JoinReply, JoinRequest, JoinToken, JoinTokenRequest};
pub use vm::{ConsoleChunk, GuestStatus, VmInfo, VmRecord, VmSpec, VmState, WillAnswer, WillAsk, WillRecord, WillRequest, WILL_PORT};
pub use walk::{
    HanoiMove, HanoiOptions, HanoiPlan, HanoiPlanQuery, HanoiRecord, HanoiStage, HanoiStep, Hop, Link, LinkKind, MrXBy, PlayerMove, Round,
    ScotlandGame, ScotlandMove, ScotlandOptions, Side, Sighting, Survivor, WalkKind, WalkOptions, WalkRecord, WalkStatus,
    HANOI_PLAN_MAX_LEVELS,
};
