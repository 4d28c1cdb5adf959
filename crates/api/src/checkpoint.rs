//! Checkpoints, replicas and failover: a running VM's memory, devices and disks frozen
//! at one instant ([`Checkpoint`]), shipped to a replica host ([`ReplicaState`]) and
//! restored there when its host dies ([`RestoreReply`], [`Failover`]).
//!
//! On disk a checkpoint is a directory of files ([`CheckpointFile`]): the memory and
//! device state in QEMU's own `mapped-ram` file format, and per disk the qcow2 layer the
//! checkpoint froze (an external snapshot: the VM goes on writing into a new overlay on
//! top of it). Successive checkpoints of one VM form an overlay chain; a replica keeps
//! at most `keep` checkpoints and merges older layers into the one below.
//!
//! ```text
//!  primary agent                                     replica agent
//!  POST /v1/vms/{name}/checkpoint ─┐
//!  (or its protection's timer)     ├─ GET  /v1/replicas/{vm}        what do you hold?
//!                                  ├─ PUT  /v1/replicas/{vm}/files/{file}   only what it lacks,
//!                                  │        (sha256 checked on arrival)     memory as a delta
//!                                  └─ POST /v1/replicas/{vm}/checkpoints    the manifest: commit
//!  controller, host down + fence time passed:
//!                                     POST /v1/replicas/{vm}/restore  newest good checkpoint
//! ```

use crate::vm::{GuestStatus, VmInfo, VmSpec};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Version of [`Checkpoint`]'s stored layout.
pub const CHECKPOINT_VERSION: u32 = 1;

/// The request header naming the controller on every request it sends an agent. An
/// agent's fence watchdog counts time since the last such request (see [`Protection`]).
pub const CONTROLLER_HEADER: &str = "x-walkabout-controller";

/// How the memory of a checkpoint is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointMethod {
    /// Live pre-copy into a `mapped-ram` file while the guest runs (dirty pages rewritten
    /// in place), paused only for the last pass, the disk snapshot and the device state
    /// (`pause-before-switchover`).
    Live,
    /// QEMU's `background-snapshot`: the guest runs on, pages written while the snapshot
    /// is taken are copied first (userfaultfd write-protect; refused where the host
    /// kernel lacks it, with that reason).
    Background,
    /// The guest paused for the whole write (what `savevm` does): the reference.
    Paused,
}

spelled!(CheckpointMethod, "unknown checkpoint method {:?} (live, background or paused)", {
    Live => "live", Background => "background", Paused => "paused",
});

/// What one file of a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// Memory and device state (QEMU's migration stream in `mapped-ram` layout).
    Memory,
    /// A disk's frozen qcow2 layer (its backing is the previous layer of that disk).
    Layer,
    /// The bottom of a disk's chain (the image the VM had before its first checkpoint).
    Base,
}

/// One file of a checkpoint, as its checksum proves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointFile {
    /// File name inside the VM's checkpoint store (unique per VM, never reused).
    pub name: String,
    /// What it holds.
    pub kind: FileKind,
    /// For a layer or base: the disk's node name (`disk0`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// For a layer: the file it is backed by (the disk's previous layer or its base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    /// Logical size, bytes.
    pub bytes: u64,
    /// Bytes that hold data (a sparse file's allocated extents).
    pub data_bytes: u64,
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
}

/// A checkpoint of one VM: memory + devices + disks at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    /// Layout version ([`CHECKPOINT_VERSION`]).
    pub version: u32,
    /// Its id, `<vm>.<n>` (unique, ordered by `n`).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// Its number in the VM's chain, from 1.
    pub n: u64,
    /// The previous checkpoint in the chain, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The instant it stands for (the guest paused), ms since the Unix epoch.
    pub taken_ms: u64,
    /// The host it was taken on.
    pub host: String,
    /// The VM's spec (disks as the checkpoint's files, restored with a new overlay).
    pub spec: VmSpec,
    /// How the memory was written.
    pub method: CheckpointMethod,
    /// How long the guest's vCPUs were paused for it, ms.
    pub pause_ms: u64,
    /// Time from start to the files written, ms.
    pub total_ms: u64,
    /// The guest's status at the instant (its last heartbeat's sequence: a restored
    /// guest continues from it).
    #[serde(default)]
    pub guest: GuestStatus,
    /// Its files: the memory image and each disk's layer (and, on the first
    /// checkpoint, each disk's base).
    pub files: Vec<CheckpointFile>,
    /// Bytes shipped to the replica for it (what the replica lacked), if shipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipped_bytes: Option<u64>,
    /// Every file's checksum was verified where it is stored (false: not yet, or
    /// verification found a mismatch, see `problem`).
    #[serde(default)]
    pub verified: bool,
    /// What is wrong with it, if anything (a truncated or altered file, by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// `POST /v1/vms/{name}/checkpoint`: take a checkpoint now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointRequest {
    /// How to write the memory (default: `live`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<CheckpointMethod>,
    /// Ship it to this agent afterwards (only what that agent lacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ship_to: Option<String>,
}

/// `POST /v1/checkpoints/{id}/restore`: start a VM from a checkpoint this agent holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RestoreRequest {
    /// Name of the restored VM (default: the checkpoint's VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RestoreReply {
    /// The VM, running.
    pub vm: VmInfo,
    /// The checkpoint it continued from.
    pub checkpoint: Checkpoint,
    /// Newer checkpoints passed over, each with why (a checksum mismatch, a missing file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// From the request to the guest running, ms.
    pub restore_ms: u64,
}

/// A VM's protection: checkpoints every `every_ms` shipped to `replica`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Protection {
    /// The replica host's name in the cluster.
    pub replica: String,
    /// The replica agent's URL.
    pub replica_url: String,
    /// Time between checkpoints, ms.
    pub every_ms: u64,
    /// Checkpoints the replica keeps (its chain is never deeper).
    pub keep: u32,
    /// The agent stops the VM itself after this long without hearing from the
    /// controller (self-fencing); the controller restores it elsewhere only after
    /// this long since its host's last contact, ms.
    pub fence_ms: u64,
    /// The instant the VM's checkpoint clock counts from, ms since the Unix epoch: when
    /// its newest checkpoint on the replica was taken (wherever the VM ran then), or when
    /// its protection began if none was yet. The next checkpoint is due `every_ms` after
    /// it (at once if that has passed), so a VM that moves more often than `every_ms` is
    /// checkpointed all the same. Set by the controller; absent, the first checkpoint
    /// comes `every_ms` after this agent starts the protection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_from_ms: Option<u64>,
}

/// How a protected VM's checkpoints are going (in [`VmInfo`] on its agent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProtectionStatus {
    /// Checkpoints taken and shipped.
    pub checkpoints: u64,
    /// The last one shipped and committed on the replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Checkpoint>,
    /// Consecutive failures, and the last one's reason.
    #[serde(default)]
    pub failures: u64,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The agent stopped the VM because it lost the controller (when, ms since epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_ms: Option<u64>,
}

/// What a replica agent holds of one VM (`GET /v1/replicas/{vm}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaState {
    /// The VM.
    pub vm: String,
    /// Committed checkpoints, oldest first (at most the protection's `keep`).
    pub checkpoints: Vec<Checkpoint>,
    /// Every file held (committed or received for the next commit), verified.
    pub files: Vec<CheckpointFile>,
}

/// How a received file's body is to be read (`PUT /v1/replicas/{vm}/files/{file}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// The whole file.
    Whole,
    /// Extents: the data of a sparse file (holes skipped), or a delta against a file the
    /// replica holds (`base`): frames of `[offset u64 LE][length u32 LE][bytes]`,
    /// ending with a frame of length 0 whose offset is the file's size.
    Extents,
}

/// Query of `PUT /v1/replicas/{vm}/files/{file}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileUpload {
    /// The file's SHA-256 once written (checked; a mismatch is refused and the file
    /// removed).
    pub sha256: String,
    /// How the body is encoded.
    pub encoding: Encoding,
    /// For a delta: the file it starts from (a copy of it is patched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

/// `POST /v1/replicas/{vm}/checkpoints`: commit a checkpoint whose files have arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommitCheckpoint {
    /// The checkpoint (its files must all be held and verified).
    pub checkpoint: Checkpoint,
    /// Checkpoints to keep; older ones are merged away.
    pub keep: u32,
}

/// `POST /v1/replicas/{vm}/forward`: the replica sends the VM's newest checkpoint that
/// verifies (its files and the disk layers below them) to another agent, which commits
/// it as a replica of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForwardReplica {
    /// The agent to send it to (never this one).
    pub to_url: String,
    /// Checkpoints that agent keeps of the VM (0: all).
    #[serde(default)]
    pub keep: u32,
}

/// `POST /v1/vms/{name}/protect` on the controller: protect a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProtectVm {
    /// The replica host (default: the host with the most room, never the VM's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Time between checkpoints, ms (default 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// Checkpoints the replica keeps (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
}

/// How a failover of one VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailoverResult {
    /// Waiting for the fence time to pass since the host's last contact.
    Fencing,
    /// Running again from a checkpoint.
    Restored,
    /// Not protected (or no usable checkpoint, or nowhere to run): lost.
    Lost,
}

/// One VM of a down host, brought back (or not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Failover {
    /// Its id (`f1`...).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// The host that was lost.
    pub from: String,
    /// Where it runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// How it ended (or where it is).
    pub result: FailoverResult,
    /// The checkpoint used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Newer checkpoints passed over, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// Recovery point: the host's loss minus the checkpoint's instant, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_ms: Option<u64>,
    /// Recovery time: the host's loss (its last contact) to the guest running again, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto_ms: Option<u64>,
    /// The host's last contact, ms since the epoch.
    pub lost_ms: u64,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Why it was lost, or what was noteworthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
