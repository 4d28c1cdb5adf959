//! The cluster as the controller sees it: hosts, VMs and where they run, the migrations
//! it ordered, and the limits it runs them under.

use crate::migration::{Phase, Progress, Strategy, Switch};
use crate::vm::{GuestStatus, VmSpec, VmState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Version of [`Host`]'s and [`ClusterVm`]'s stored layout.
pub const VIEW_VERSION: u32 = 1;
/// Version of [`ClusterMigration`]'s stored layout.
pub const CLUSTER_MIGRATION_VERSION: u32 = 1;

/// Whether a host answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    /// Not polled yet.
    Unknown,
    /// Its agent answers.
    Up,
    /// Its agent stopped answering (see `down_reason`).
    Down,
}

/// What the operator wants of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Maintenance {
    /// In service: VMs may be placed here.
    Active,
    /// Being emptied: nothing is placed here.
    Draining,
    /// Emptied and out of service.
    Drained,
    /// A drain that could not empty the host: nothing is placed here, and
    /// `maintenance_reason` says which VMs stayed and why. Drain again or undrain.
    DrainFailed,
}

impl Maintenance {
    /// True when VMs may be placed on the host.
    pub fn accepts_vms(self) -> bool {
        self == Maintenance::Active
    }
}

/// A host of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    /// Layout version.
    pub version: u32,
    /// Its name in the cluster (`h1`...).
    pub name: String,
    /// Its agent's URL.
    pub url: String,
    /// Whether it answers.
    pub status: HostStatus,
    /// Since when (ms since the epoch) it has had that status.
    pub status_since_ms: u64,
    /// Why it is down.
    #[serde(default)]
    pub down_reason: Option<String>,
    /// Maintenance mode.
    pub maintenance: Maintenance,
    /// Why it is in that maintenance mode, when that needs saying (a failed drain).
    #[serde(default)]
    pub maintenance_reason: Option<String>,
    /// When its agent last answered.
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
    /// Its machine's host name.
    #[serde(default)]
    pub hostname: String,
    /// CPU model.
    #[serde(default)]
    pub cpu_model: String,
    /// CPUs.
    #[serde(default)]
    pub cpus: u32,
    /// Memory for VMs, MiB.
    #[serde(default)]
    pub capacity_mib: u64,
    /// Memory in use by VMs (incoming included), MiB.
    #[serde(default)]
    pub used_mib: u64,
    /// Free memory, MiB.
    #[serde(default)]
    pub free_mib: u64,
    /// Names of the VMs it runs.
    #[serde(default)]
    pub vms: Vec<String>,
    /// Its most capable CPU model (from its agent's CPU catalog, once fetched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ceiling: Option<String>,
    /// vCPUs it may give guests: its CPUs times the controller's overcommit ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_capacity: Option<u64>,
}

impl Host {
    /// True when plans may send VMs here.
    pub fn accepts_vms(&self) -> bool {
        self.status == HostStatus::Up && self.maintenance.accepts_vms()
    }
}

/// A registration of an agent with the controller (`POST /v1/hosts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AddHost {
    /// The agent's URL.
    pub url: String,
    /// The host's name in the cluster; default `hN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Where a VM of the cluster is, as the controller knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClusterVmState {
    /// QEMU is being started.
    Starting,
    /// The guest runs.
    Running,
    /// The guest's vCPUs are paused.
    Paused,
    /// Being migrated away from its host.
    Migrating,
    /// Only seen as an incoming migration on some host (not yet owned there).
    Incoming,
    /// Its QEMU is not running.
    Stopped,
    /// No host lists it any more.
    Missing,
    /// Its host is down: it may or may not still run.
    Unreachable,
    /// Its host is down and it could not be brought back (not protected, no usable
    /// checkpoint, or no host to run it): see `reason`.
    Lost,
}

impl From<VmState> for ClusterVmState {
    fn from(s: VmState) -> Self {
        match s {
            VmState::Starting => ClusterVmState::Starting,
            VmState::Running => ClusterVmState::Running,
            VmState::Paused => ClusterVmState::Paused,
            VmState::Migrating => ClusterVmState::Migrating,
            VmState::Incoming => ClusterVmState::Incoming,
            VmState::Stopped => ClusterVmState::Stopped,
        }
    }
}

impl ClusterVmState {
    /// True when it holds memory on its host.
    pub fn is_active(self) -> bool {
        matches!(self, ClusterVmState::Starting | ClusterVmState::Running | ClusterVmState::Paused | ClusterVmState::Migrating)
    }
}

impl std::fmt::Display for ClusterVmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClusterVmState::Starting => "starting",
            ClusterVmState::Running => "running",
            ClusterVmState::Paused => "paused",
            ClusterVmState::Migrating => "migrating",
            ClusterVmState::Incoming => "incoming",
            ClusterVmState::Stopped => "stopped",
            ClusterVmState::Missing => "missing",
            ClusterVmState::Unreachable => "unreachable",
            ClusterVmState::Lost => "lost",
        })
    }
}

/// A VM of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterVm {
    /// Layout version.
    pub version: u32,
    /// Its name.
    pub name: String,
    /// The host it runs on (last known, if that host is down).
    pub host: Option<String>,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// In-guest workload.
    pub workload: String,
    /// Its NICs (bridge, pinned MAC, address), as its agent reports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<crate::NicSpec>,
    /// Where it is.
    pub state: ClusterVmState,
    /// Why, when the agent said.
    #[serde(default)]
    pub reason: Option<String>,
    /// What its guest reports (continuity carried across migrations by the agents).
    #[serde(default)]
    pub guest: GuestStatus,
    /// When an agent last listed it.
    #[serde(default)]
    pub seen_ms: u64,
    /// Its QEMU CPU model (absent: the default, `qemu64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// The placement groups it belongs to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<VmGroup>,
    /// Its protection (replica host, interval, depth, fence time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<crate::checkpoint::Protection>,
    /// How its checkpoints are going, as its agent reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection_status: Option<crate::checkpoint::ProtectionStatus>,
}

/// What a placement group asks of its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum GroupRule {
    /// All members on one host.
    Affinity,
    /// No two members on one host.
    AntiAffinity,
}

impl std::fmt::Display for GroupRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GroupRule::Affinity => "affinity",
            GroupRule::AntiAffinity => "anti-affinity",
        })
    }
}

/// A VM's membership of a placement group: VMs naming the same group share its rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
pub struct VmGroup {
    /// The group's name.
    pub name: String,
    /// Its rule.
    pub rule: GroupRule,
}

impl std::str::FromStr for VmGroup {
    type Err = String;

    /// Parses `NAME`, `NAME:affinity` or `NAME:anti` (also `NAME:anti-affinity`);
    /// a bare name is an anti-affinity group (spread, the common wish).
    fn from_str(s: &str) -> Result<VmGroup, String> {
        let (name, rule) = match s.split_once(':') {
            None => (s, GroupRule::AntiAffinity),
            Some((n, "affinity")) => (n, GroupRule::Affinity),
            Some((n, "anti" | "anti-affinity")) => (n, GroupRule::AntiAffinity),
            Some((_, r)) => return Err(format!("group {s:?}: rule {r:?} is neither `affinity` nor `anti`")),
        };
        let ok = !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(format!("group name {name:?} must be 1-63 letters, digits, '-', '_' or '.'"));
        }
        Ok(VmGroup { name: name.to_string(), rule })
    }
}

impl ClusterVm {
    /// True when it holds memory on its host.
    pub fn is_active(&self) -> bool {
        self.state.is_active()
    }
}

/// A VM to create through the controller (`POST /v1/vms`): the agent's spec, and
/// optionally the host (default: the planner's choice of a host with room).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateVm {
    /// The VM.
    #[serde(flatten)]
    pub spec: VmSpec,
    /// Where to create it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Placement groups it joins (affinity or anti-affinity with their other members).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<VmGroup>,
}

/// A request to move one VM (`POST /v1/vms/{name}/move`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MoveVm {
    /// The host it should run on.
    pub to: String,
}

/// Limits on what runs at once, and on retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecLimits {
    /// Migrations out of one host at once.
    pub per_host_out: u32,
    /// Migrations into one host at once.
    pub per_host_in: u32,
    /// Migrations in the whole cluster at once.
    pub per_cluster: u32,
    /// Migrations one host takes part in per wave, as the planner packs waves.
    pub planner_parallel_per_host: u32,
    /// Failed migrations of one VM before a plan gives it up.
    pub max_attempts: u32,
    /// Re-plans of one plan before it gives up.
    pub max_replans: u32,
    /// How the disks of the VMs it moves travel (default `auto`).
    #[serde(default)]
    pub storage: crate::disk::StorageMode,
}

impl Default for ExecLimits {
    fn default() -> Self {
        ExecLimits {
            per_host_out: 1,
            per_host_in: 1,
            per_cluster: 2,
            planner_parallel_per_host: 1,
            max_attempts: 2,
            max_replans: 4,
            storage: crate::disk::StorageMode::Auto,
        }
    }
}

/// The cluster at a glance (`GET /v1/cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterSummary {
    /// Every host.
    pub hosts: Vec<Host>,
    /// Every VM.
    pub vms: Vec<ClusterVm>,
    /// Plans being executed.
    pub running_plans: Vec<String>,
    /// The limits migrations run under.
    pub limits: ExecLimits,
}

/// A migration the controller ordered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterMigration {
    /// Layout version.
    pub version: u32,
    /// Its id (`m1`...).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// Source host.
    pub from: String,
    /// Destination host.
    pub to: String,
    /// The plan it belongs to, if any (walks have none).
    #[serde(default)]
    pub plan: Option<String>,
    /// Why.
    pub why: String,
    /// Phase.
    pub phase: Phase,
    /// Why it failed or was cancelled.
    #[serde(default)]
    pub reason: Option<String>,
    /// The source agent's migration id, once the agent took it.
    #[serde(default)]
    pub agent_id: Option<String>,
    /// Progress as the agent last reported it.
    #[serde(default)]
    pub progress: Progress,
    /// The strategy the source agent picked, once it did.
    #[serde(default)]
    pub strategy: Option<Strategy>,
    /// Every change of strategy so far, with its reason (as the agent reports them).
    #[serde(default)]
    pub switches: Vec<Switch>,
    /// Guest pause at switchover, ms.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Downtime as the guest's users saw it: the longest gap between replies of the
    /// guest's TCP echo to the controller's probe during the migration, ms (guests with
    /// an address only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_downtime_ms: Option<u64>,
    /// Why the controller's probe of the guest failed (its connection reset, no reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_error: Option<String>,
    /// Wall time, ms (the agent's).
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// Ordered, ms since the epoch.
    pub started_ms: u64,
    /// Ended.
    #[serde(default)]
    pub finished_ms: Option<u64>,
}

/// How much the balancer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BalanceLevel {
    /// Nothing.
    #[default]
    Manual,
    /// Offer moves with their reasons; move nothing.
    Recommend,
    /// Move VMs, within the executor's limits.
    Automatic,
}

/// The balancer's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BalanceConfig {
    /// What it may do.
    pub level: BalanceLevel,
    /// Spread of CPU use (fraction of the hottest host's CPUs minus the coolest's)
    /// above which balancing starts.
    pub threshold: f64,
    /// Balancing stops once the spread is below `threshold - hysteresis`.
    pub hysteresis: f64,
    /// Least lowering of the sum of squared CPU use a move must bring, net of its cost.
    pub min_gain: f64,
    /// Cost of a move per GiB pre-copy must send (memory plus 10 s of dirtying), in
    /// units of that sum.
    pub cost_per_gib: f64,
    /// Seconds before a moved VM may move again.
    pub cooldown_s: u64,
    /// Moves per round at most.
    pub max_moves: usize,
    /// Seconds between rounds.
    pub interval_s: u64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            level: BalanceLevel::Manual,
            threshold: 0.3,
            hysteresis: 0.1,
            min_gain: 0.02,
            cost_per_gib: 0.005,
            cooldown_s: 1800,
            max_moves: 4,
            interval_s: 60,
        }
    }
}

/// A move the balancer decided, with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BalanceMove {
    /// The VM.
    pub vm: String,
    /// From.
    pub from: String,
    /// To.
    pub to: String,
    /// Net gain (lowering of the sum of squared use, less the move's cost).
    pub gain: f64,
    /// One sentence: the loads, the gain, the cost.
    pub reason: String,
}

/// The balancer as `GET /v1/balance` shows it: its settings, whether the load is out of
/// balance, and the moves its last round decided with their reasons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BalanceStatus {
    /// Its settings.
    pub config: BalanceConfig,
    /// Whether the last round found the spread above the threshold (and not yet back
    /// below threshold - hysteresis).
    pub active: bool,
    /// The moves the last round decided.
    pub last_moves: Vec<BalanceMove>,
}
