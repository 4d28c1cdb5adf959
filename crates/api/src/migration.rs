//! A live migration between two agents: the request, the phases, the strategy and its
//! switches, progress, and the source-to-destination hand-shake (`/v1/incoming`).
//!
//! ```text
//! Pending -> Preparing -> Running -> Switchover -> Completed
//!    \           \           \            \
//!     +-----------+-----------+-> Failed    +-> Failed (post-copy only: the VM is lost)
//!     +-----------+-----------+-> Cancelled
//! ```
//!
//! Before `Switchover` the source still owns the VM: a failure or a cancel leaves it
//! running there. A post-copy that fails past the switchover has not necessarily lost
//! the VM: a link lost and not restored within the recovery budget leaves the guest's
//! running state at the destination and the rest of its memory at the source, both
//! kept (the reason says which host holds what; see [`PostcopyPause`]). `Switchover` starts when the source's vCPUs stop for the last time
//! (pre-copy's final copy) or when post-copy starts; from then on cancel is refused.

use crate::disk::{DiskFormat, StorageMode};
use crate::vm::{GuestStatus, VmSpec};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Version of [`MigrationRecord`]'s stored layout.
pub const MIGRATION_VERSION: u32 = 1;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accepted, nothing done yet.
    Pending,
    /// Checking the destination and preparing its QEMU.
    Preparing,
    /// Memory is being copied while the VM runs on the source.
    Running,
    /// The VM is switching over to the destination (or runs there in post-copy).
    Switchover,
    /// The VM runs on the destination; the source copy is gone.
    Completed,
    /// The migration failed; see the reason. Before switchover the VM runs on the source.
    Failed,
    /// Cancelled before switchover; the VM runs on the source.
    Cancelled,
}

impl Phase {
    /// True once nothing more will happen.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }

    /// True while a cancel can still return the VM to its source.
    pub fn cancellable(self) -> bool {
        matches!(self, Phase::Pending | Phase::Preparing | Phase::Running)
    }

    /// Whether `self -> next` is a legal transition.
    pub fn can_become(self, next: Phase) -> bool {
        use Phase::*;
        match (self, next) {
            (a, b) if a == b => true,
            (Pending, Preparing) | (Preparing, Running) | (Running, Switchover) | (Switchover, Completed) => true,
            (Pending | Preparing | Running, Cancelled) => true,
            (Pending | Preparing | Running | Switchover, Failed) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Pending => "pending",
            Phase::Preparing => "preparing",
            Phase::Running => "running",
            Phase::Switchover => "switchover",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        })
    }
}

/// The migration mode the operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Walkabout picks and adapts; may switch to post-copy.
    #[default]
    Auto,
    /// Pre-copy only (with throttling if needed); never post-copy.
    Precopy,
    /// Switch to post-copy after the first full pass. The VM depends on both hosts
    /// until post-copy completes: losing either host then loses the VM.
    Postcopy,
}

spelled!(Mode, "unknown migration mode '{}': expected auto, precopy or postcopy", { Auto => "auto", Precopy => "precopy", Postcopy => "postcopy" });

/// The operator's limits for one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    /// Longest acceptable pause of the guest, ms.
    pub max_downtime_ms: u64,
    /// Bandwidth cap in bytes/s, if any.
    pub max_bandwidth_bps: Option<u64>,
    /// Time allowed per GiB of guest memory, ms; never less than one pass of the whole
    /// guest at `max_bandwidth_bps`.
    pub budget_per_gib_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_downtime_ms: 300, max_bandwidth_bps: None, budget_per_gib_ms: 30_000 }
    }
}

/// How QEMU is set up at the start of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Strategy {
    /// Short name: `precopy`, `precopy+postcopy-ready`, `precopy+auto-converge`, `postcopy`.
    /// In `auto` mode, `precopy+auto-converge` is plain pre-copy for a guest found quiet
    /// before the start, auto-converge armed in case it starts dirtying.
    pub name: String,
    /// Enable QEMU's `postcopy-ram` capability (both ends) so a switch is possible.
    pub postcopy_ready: bool,
    /// Enable QEMU's `auto-converge` (vCPU throttling).
    pub auto_converge: bool,
    /// `max-bandwidth` given to QEMU, bytes/s.
    pub bandwidth_bps: u64,
    /// `downtime-limit` given to QEMU, ms.
    pub downtime_ms: u64,
    /// Why this strategy.
    pub reason: String,
    /// QEMU's `postcopy-preempt` (both ends): page faults during post-copy travel on a
    /// channel of their own instead of queueing behind the bulk stream.
    #[serde(default)]
    pub postcopy_preempt: bool,
    /// multifd channels (both ends); 0 means one stream, no multifd.
    #[serde(default)]
    pub multifd_channels: u8,
    /// Compression of the stream.
    #[serde(default)]
    pub compression: Compression,
    /// How long a paused post-copy (link lost) may wait for its stream to be
    /// re-established before the migration is declared stuck, ms.
    #[serde(default = "default_recovery_budget_ms")]
    pub recovery_budget_ms: u64,
    /// Why these stream settings (preempt, multifd, compression), beside `reason`.
    #[serde(default)]
    pub stream_reason: String,
}

/// The default budget for re-establishing a paused post-copy, ms.
pub const DEFAULT_RECOVERY_BUDGET_MS: u64 = 120_000;

fn default_recovery_budget_ms() -> u64 {
    DEFAULT_RECOVERY_BUDGET_MS
}

/// Compression of the migration stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// None: pages go as they are (zero pages are always skipped).
    #[default]
    None,
    /// zstd over multifd channels (both ends; not with post-copy, which QEMU 10 cannot
    /// combine with multifd).
    Zstd,
    /// XBZRLE: pages rewritten since they were last sent go as deltas against a cache
    /// (source only; works beside post-copy).
    Xbzrle,
}

spelled!(Compression, "unknown compression '{}': expected none, zstd or xbzrle", { None => "none", Zstd => "zstd", Xbzrle => "xbzrle" });

/// Stream settings an operator may force; whatever is left unset the policy decides
/// (and says why in [`Strategy::stream_reason`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Tuning {
    /// multifd channels (0 or 1: one stream). QEMU 10 cannot combine multifd with
    /// post-copy: forcing channels >= 2 keeps post-copy unarmed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    /// Compression of the stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// Post-copy preempt channel on or off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_preempt: Option<bool>,
    /// Budget for re-establishing a paused post-copy, ms (default 120 000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_budget_ms: Option<u64>,
    /// How long the destination's agent may stay silent before the source takes it for
    /// gone and cancels, ms (default 1 500); longer for a destination known to be slow
    /// to answer, e.g. an agent inside a nested guest under TCG.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_timeout_ms: Option<u64>,
    /// Every stream of the migration (memory, disks) through the destination agent's one
    /// published API port: the source agent relays its QEMU's connections over mutual
    /// TLS to the destination's tunnel route ([`TUNNEL_PATH`]), which splices them to
    /// its QEMU listening on loopback. For a destination behind a NAT that publishes
    /// only that port (another site, another cloud). QEMU's own TLS stays on inside.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
}

/// One interruption of post-copy (its stream lost while the guest ran at the
/// destination with part of its memory still at the source), and its recovery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PostcopyPause {
    /// When post-copy paused, ms since the epoch.
    pub paused_at_ms: u64,
    /// When the stream was re-established and post-copy went on, ms since the epoch;
    /// `None` while paused, or if it never was.
    pub resumed_at_ms: Option<u64>,
    /// Attempts to re-establish the stream (`migrate-recover` at the destination,
    /// `migrate` with `resume` at the source).
    pub attempts: u32,
    /// Why it paused.
    pub cause: String,
    /// The last failed attempt's error, if any.
    pub last_error: Option<String>,
}

/// A recorded change of strategy during a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Switch {
    /// When, ms after the start.
    pub at_ms: u64,
    /// What it switched to.
    pub to: String,
    /// Why.
    pub reason: String,
}

/// A live view of a migration, updated after every sample of QEMU's statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Progress {
    /// Phase, when known.
    pub phase: Option<Phase>,
    /// QEMU's own status string (`active`, `postcopy-active`, `completed`, ...).
    pub qemu_status: String,
    /// Pre-copy passes (dirty-bitmap syncs).
    pub iteration: u64,
    /// Bytes sent.
    pub transferred_bytes: u64,
    /// Bytes still to send.
    pub remaining_bytes: u64,
    /// Guest RAM size.
    pub total_bytes: u64,
    /// Guest dirty rate, bytes/s.
    pub dirty_rate_bps: u64,
    /// Transfer rate, bytes/s.
    pub transfer_rate_bps: u64,
    /// QEMU's expected downtime, ms.
    pub expected_downtime_ms: u64,
    /// Time since start, ms.
    pub elapsed_ms: u64,
    /// vCPU throttle applied by auto-converge, percent.
    pub throttle_pct: u64,
    /// Since when post-copy is paused (stream lost), ms since the epoch; `None` unless
    /// QEMU reports `postcopy-paused` (or is re-establishing the stream).
    pub postcopy_paused_since_ms: Option<u64>,
    /// Attempts to re-establish post-copy's stream, over the whole migration.
    pub recovery_attempts: u32,
}

impl Progress {
    /// Estimated time to the end of the current pass at the current transfer rate, ms
    /// (`None` while the rate is unknown).
    pub fn eta_ms(&self) -> Option<u64> {
        (self.transfer_rate_bps > 0).then(|| self.remaining_bytes.saturating_mul(1000) / self.transfer_rate_bps)
    }
}

/// A request to migrate a VM of an agent to another agent (`POST /v1/migrations`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationRequest {
    /// The VM.
    pub vm: String,
    /// The destination agent's URL.
    pub destination: String,
    /// Strategy mode.
    #[serde(default)]
    pub mode: Mode,
    /// Longest acceptable guest pause, ms (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth cap, bytes/s (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_bps: Option<u64>,
    /// Time budget per GiB of guest memory, ms (default 30 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_per_gib_ms: Option<u64>,
    /// How the VM's disks move (default `auto`; irrelevant for a VM without disks).
    #[serde(default)]
    pub storage: StorageMode,
    /// Stream settings forced by the operator (multifd, compression, preempt, the
    /// post-copy recovery budget); unset ones are the policy's.
    #[serde(flatten)]
    pub tuning: Tuning,
}

impl MigrationRequest {
    /// A request with every limit at its default.
    pub fn new(vm: impl Into<String>, destination: impl Into<String>, mode: Mode) -> MigrationRequest {
        MigrationRequest {
            vm: vm.into(),
            destination: destination.into(),
            mode,
            max_downtime_ms: None,
            max_bandwidth_bps: None,
            budget_per_gib_ms: None,
            storage: StorageMode::Auto,
            tuning: Tuning::default(),
        }
    }
}

/// A migration as the source agent records and reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationRecord {
    /// Layout version.
    pub version: u32,
    /// Its id.
    pub id: String,
    /// The VM.
    pub vm: String,
    /// The destination agent's URL.
    pub destination: String,
    /// Mode asked for.
    pub mode: Mode,
    /// Limits in force.
    pub limits: Limits,
    /// Where it is.
    pub phase: Phase,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// Dirty rate measured before the start, bytes/s.
    pub dirty_rate_bps: Option<u64>,
    /// The strategy picked.
    pub strategy: Option<Strategy>,
    /// Every change of strategy, with its reason.
    pub switches: Vec<Switch>,
    /// Latest progress.
    pub progress: Progress,
    /// Wall time, ms, once final (of the memory stream; with `storage: copy`, from the
    /// request, disk copy included).
    pub total_ms: Option<u64>,
    /// Guest pause at switchover, ms, once completed.
    pub downtime_ms: Option<u64>,
    /// Start, ms since the epoch.
    pub created_at_ms: u64,
    /// End, ms since the epoch.
    pub finished_at_ms: Option<u64>,
    /// Stream settings the operator forced.
    #[serde(default)]
    pub tuning: Tuning,
    /// Every interruption of post-copy and its recovery, in order.
    #[serde(default)]
    pub postcopy_pauses: Vec<PostcopyPause>,
    /// How the disks move: as asked until the destination resolves it (`shared` or
    /// `copy`); `None` for a VM without disks.
    #[serde(default)]
    pub storage: Option<StorageMode>,
    /// The disk copy's counters (QEMU's mirror jobs), with `storage: copy`.
    #[serde(default)]
    pub disk: DiskProgress,
    /// QEMU's streams (memory, and disks with `storage: copy`) went over TLS under the
    /// cluster CA, to a destination that admitted this host alone. False only for a
    /// cluster run without a CA (`--insecure-loopback`): they were plain.
    #[serde(default)]
    pub tls: bool,
    /// Where the wall time went, phase by phase.
    #[serde(default)]
    pub timings: PhaseTimes,
}

/// Where a migration's wall time went, ms, each part once it has ended: the pieces
/// libvirt's job statistics and QEMU's `setup-time` show, here from the request on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct PhaseTimes {
    /// From the request to the first byte sent: the dirty-rate sample, the checks, and
    /// the destination's preparation (its images, its QEMU, its listeners).
    pub prepare_ms: Option<u64>,
    /// The disk copy, until every mirror was in sync (`storage: copy` only).
    pub disk_ms: Option<u64>,
    /// The memory stream, from QEMU's `migrate` to its end (the switchover included).
    pub memory_ms: Option<u64>,
}

/// The disk copy of a `storage: copy` migration, summed over the VM's mirror jobs as
/// QEMU counts them (`query-block-jobs`: offset and len).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct DiskProgress {
    /// Bytes the mirrors have copied to the destination.
    pub transferred_bytes: u64,
    /// Bytes still to copy (0 once every mirror is in sync).
    pub remaining_bytes: u64,
    /// Bytes the mirrors have to copy in all (grows with the guest's writes).
    pub total_bytes: u64,
}

impl MigrationRecord {
    /// A migration accepted for `req`, nothing done yet: phase `pending`, the request's
    /// limits filled in with the defaults, the destination without a trailing `/`.
    pub fn pending(id: impl Into<String>, req: &MigrationRequest, created_at_ms: u64) -> MigrationRecord {
        let defaults = Limits::default();
        MigrationRecord {
            version: MIGRATION_VERSION,
            id: id.into(),
            vm: req.vm.clone(),
            destination: req.destination.trim_end_matches('/').to_string(),
            mode: req.mode,
            limits: Limits {
                max_downtime_ms: req.max_downtime_ms.unwrap_or(defaults.max_downtime_ms),
                max_bandwidth_bps: req.max_bandwidth_bps,
                budget_per_gib_ms: req.budget_per_gib_ms.unwrap_or(defaults.budget_per_gib_ms),
            },
            phase: Phase::Pending,
            reason: None,
            dirty_rate_bps: None,
            strategy: None,
            switches: vec![],
            progress: Progress::default(),
            total_ms: None,
            downtime_ms: None,
            created_at_ms,
            finished_at_ms: None,
            tuning: req.tuning,
            postcopy_pauses: vec![],
            storage: Some(req.storage),
            disk: DiskProgress::default(),
            tls: false,
            timings: PhaseTimes::default(),
        }
    }
}

/// How a migration ended, in one object: what `walkabout migrate --wait --output json`
/// prints last (read by the benches and tests as it is written here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationSummary {
    /// The migration's id.
    pub id: String,
    /// The VM.
    pub vm: String,
    /// The destination agent's URL.
    pub to: String,
    /// How it ended.
    pub result: Phase,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// Wall time, ms.
    pub total_ms: Option<u64>,
    /// Guest pause, ms, once completed.
    pub downtime_ms: Option<u64>,
    /// Bytes sent.
    pub transferred_bytes: u64,
    /// Pre-copy passes.
    pub iterations: u64,
    /// The guest's dirty rate measured before the start, bytes/s.
    pub dirty_rate_bps: Option<u64>,
    /// The strategy picked.
    pub strategy: Option<Strategy>,
    /// Strategy switches on the way.
    pub switches: Vec<Switch>,
    /// The longest gap between two replies of the guest's TCP echo seen by a client that
    /// kept one connection open to it through the migration (a request every 10 ms), ms:
    /// the downtime as the guest's users see it. Absent when the guest was not probed.
    #[serde(default)]
    pub observed_downtime_ms: Option<u64>,
    /// Why that probe failed (the connection reset or closed, no reply for too long);
    /// absent when it was not probed or the connection held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_error: Option<String>,
    /// Interruptions of post-copy and their recoveries.
    #[serde(default)]
    pub postcopy_pauses: Vec<PostcopyPause>,
    /// How the disks moved (`shared` or `copy`), for a VM with disks.
    #[serde(default)]
    pub storage: Option<StorageMode>,
    /// Disk bytes copied (QEMU's mirror counters), with `storage: copy`.
    #[serde(default)]
    pub disk_transferred_bytes: u64,
    /// Disk bytes the mirrors had to copy in all.
    #[serde(default)]
    pub disk_total_bytes: u64,
    /// Where the wall time went, phase by phase.
    #[serde(default)]
    pub timings: PhaseTimes,
}

impl From<&MigrationRecord> for MigrationSummary {
    fn from(rec: &MigrationRecord) -> Self {
        MigrationSummary {
            id: rec.id.clone(),
            vm: rec.vm.clone(),
            to: rec.destination.clone(),
            result: rec.phase,
            reason: rec.reason.clone(),
            total_ms: rec.total_ms,
            downtime_ms: rec.downtime_ms,
            transferred_bytes: rec.progress.transferred_bytes,
            iterations: rec.progress.iteration,
            dirty_rate_bps: rec.dirty_rate_bps,
            strategy: rec.strategy.clone(),
            switches: rec.switches.clone(),
            observed_downtime_ms: None,
            probe_error: None,
            postcopy_pauses: rec.postcopy_pauses.clone(),
            storage: rec.storage,
            disk_transferred_bytes: rec.disk.transferred_bytes,
            disk_total_bytes: rec.disk.total_bytes,
            timings: rec.timings,
        }
    }
}

/// What the source asks of the destination (`POST /v1/incoming`, agent to agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingRequest {
    /// The VM's spec (the destination starts an identical QEMU).
    pub spec: VmSpec,
    /// Whether the source may switch to post-copy (a capability both ends must share).
    pub postcopy_ready: bool,
    /// CPU features the VM's CPU model has on the source.
    pub cpu_features: Vec<String>,
    /// The address the destination QEMU listens on (the host the source reaches it by).
    pub listen_host: String,
    /// Post-copy preempt channel (both ends must agree).
    #[serde(default)]
    pub postcopy_preempt: bool,
    /// multifd channels (0: one stream; both ends must agree).
    #[serde(default)]
    pub multifd_channels: u8,
    /// Compression (zstd must be set on both ends; xbzrle is the source's alone).
    #[serde(default)]
    pub compression: Compression,
    /// How the disks should move, as the operator asked (`auto` lets the destination
    /// pick `shared` when the marker proves it sees the same files).
    #[serde(default)]
    pub storage: StorageMode,
    /// The VM's disks as the source holds them, in `spec.disks` order.
    #[serde(default)]
    pub disks: Vec<IncomingDisk>,
    /// The marker the source wrote beside each disk image (`auto` and `shared`).
    #[serde(default)]
    pub marker: Option<StorageMarker>,
    /// How long the destination keeps the incoming VM without a probe from the source,
    /// ms (default and minimum 4 000); longer for a slow source (a nested agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// The source reaches this host only through its API port: its QEMU and NBD server
    /// listen on loopback and the source's streams come through the tunnel route
    /// ([`TUNNEL_PATH`]), admitted for the requesting host alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
}

/// One disk of a migrating VM as the source holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingDisk {
    /// QEMU node name (`disk0`), the same on both hosts.
    pub node_name: String,
    /// The image on the source.
    #[schema(value_type = String)]
    pub path: std::path::PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Guest-visible size, bytes.
    pub virtual_size: u64,
    /// The image's backing file, for a qcow2 overlay: the destination that holds the
    /// same content copies only the top layer.
    #[serde(default)]
    pub backing: Option<BackingImage>,
}

/// A backing image by content, as the agents' image catalogs know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackingImage {
    /// SHA-256 of the backing file's bytes, hex.
    pub sha256: String,
    /// Its format.
    pub format: DiskFormat,
}

/// The proof of shared storage: a file the source wrote beside every disk image, which
/// the destination must read back through its own path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StorageMarker {
    /// The marker's file name (in each image's directory).
    pub file_name: String,
    /// Its random content.
    pub token: String,
}

/// The source asks the destination to listen again for a paused post-copy's stream
/// (`POST /v1/incoming/{name}/recover`); answered with an [`IncomingReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RecoverRequest {
    /// The address the destination QEMU listens on.
    pub listen_host: String,
}

/// The destination's answer: where to send the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingReply {
    /// QEMU migration URI, e.g. `tcp:10.0.0.2:40123`.
    pub uri: String,
    /// How the disks move (`shared` or `copy`); `None` for a VM without disks.
    #[serde(default)]
    pub storage: Option<StorageMode>,
    /// With `copy`: the NBD server holding the destination's new images.
    #[serde(default)]
    pub nbd: Option<NbdTarget>,
    /// The destination's QEMU accepts the stream (and its NBD server the disks) only
    /// over TLS under the cluster CA, from the host whose certificate asked for this
    /// incoming migration. False: plain streams (a cluster without a CA).
    #[serde(default)]
    pub tls: bool,
    /// `uri` and `nbd` are the destination's loopback: the source sends each stream
    /// through the tunnel route ([`TUNNEL_PATH`]) of the agent it asked, whatever
    /// address it reached that agent at.
    #[serde(default)]
    pub relay: bool,
}

/// The destination agent's tunnel route (`GET`, HTTP/1.1 `Upgrade:` [`TUNNEL_PROTOCOL`]):
/// after `101 Switching Protocols` the connection carries one of QEMU's streams of an
/// incoming VM, spliced to the destination QEMU's loopback listener. Only the host
/// whose certificate asked for that incoming migration is admitted.
pub const TUNNEL_PATH: &str = "/v1/incoming/{name}/tunnel/{stream}";

/// The protocol name of the tunnel's `Upgrade:` header.
pub const TUNNEL_PROTOCOL: &str = "walkabout-tunnel";

/// Which of QEMU's streams a tunnel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TunnelStream {
    /// The migration stream (every connection QEMU opens for it: multifd channels,
    /// post-copy's preempt channel).
    Memory,
    /// The NBD disk copy (`storage: copy`).
    Nbd,
}

spelled!(TunnelStream, "unknown tunnel stream '{}': expected memory or nbd", { Memory => "memory", Nbd => "nbd" });

impl TunnelStream {
    /// The tunnel's path for VM `name`.
    pub fn path(self, name: &str) -> String {
        TUNNEL_PATH.replace("{name}", name).replace("{stream}", &self.to_string())
    }
}

/// The destination's NBD server and one writable export per disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NbdTarget {
    /// Host the source connects to.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// One export per disk, in disk order.
    pub exports: Vec<NbdExport>,
}

/// One disk's target on the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NbdExport {
    /// The disk's node name (`disk0`).
    pub node_name: String,
    /// The NBD export name.
    pub export: String,
    /// What the source must copy into it.
    pub sync: MirrorSync,
}

/// What a disk mirror copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MirrorSync {
    /// The whole disk (the destination's image is new and empty).
    Full,
    /// Only the top layer: the destination's image is an overlay on its own copy of
    /// the same base.
    Top,
}

impl MirrorSync {
    /// QEMU's spelling (`blockdev-mirror`'s `sync`).
    pub fn as_str(self) -> &'static str {
        match self {
            MirrorSync::Full => "full",
            MirrorSync::Top => "top",
        }
    }
}

/// The ownership hand-over after switchover (`POST /v1/incoming/{name}/commit`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommitRequest {
    /// The guest's status as the source's (complete) console left it.
    #[serde(default)]
    pub guest: Option<GuestStatus>,
}

#[cfg(test)]
mod tests {
    use super::Phase::*;

    #[test]
    fn cancel_is_possible_only_before_switchover() {
        assert!(Running.cancellable());
        assert!(!Switchover.cancellable());
        assert!(!Completed.cancellable());
        assert!(Running.can_become(Cancelled));
        assert!(!Switchover.can_become(Cancelled));
    }

    #[test]
    fn final_phases_do_not_move() {
        for p in [Completed, Failed, Cancelled] {
            assert!(p.is_final());
            assert!(!p.can_become(Running));
        }
        assert!(!Completed.can_become(Failed));
    }

    #[test]
    fn modes_and_compressions_parse_their_wire_spelling() {
        use super::{Compression, Mode};
        for m in [Mode::Auto, Mode::Precopy, Mode::Postcopy] {
            assert_eq!(serde_json::to_value(m).ok(), Some(serde_json::Value::String(m.to_string())));
            assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
        }
        for c in [Compression::None, Compression::Zstd, Compression::Xbzrle] {
            assert_eq!(serde_json::to_value(c).ok(), Some(serde_json::Value::String(c.to_string())));
            assert_eq!(c.to_string().parse::<Compression>(), Ok(c));
        }
        assert_eq!("fast".parse::<Mode>(), Err("unknown migration mode 'fast': expected auto, precopy or postcopy".to_string()));
    }

    #[test]
    fn phase_display_is_its_wire_spelling() {
        for p in [Pending, Preparing, Running, Switchover, Completed, Failed, Cancelled] {
            assert_eq!(serde_json::to_value(p).ok(), Some(serde_json::Value::String(p.to_string())));
        }
    }
}
