//! A VM on one agent: what the user asks for ([`VmSpec`]), what the agent records
//! ([`VmRecord`]), and what the guest says on its console ([`GuestStatus`]).

use crate::disk::DiskSpec;
use crate::host::Accel;
use crate::nic::NicSpec;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use utoipa::ToSchema;

/// Version of [`VmRecord`]'s stored layout.
pub const RECORD_VERSION: u32 = 1;

/// Default CPU model: a baseline every x86-64 host (and TCG) can run, so VMs can move.
pub const DEFAULT_CPU_MODEL: &str = "qemu64";

/// A VM as the user asks for it (`POST /v1/vms` on an agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmSpec {
    /// Unique name on this agent.
    pub name: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    #[schema(default = 1)]
    pub vcpus: u32,
    /// QEMU CPU model; defaults to [`DEFAULT_CPU_MODEL`].
    #[serde(default)]
    pub cpu_model: Option<String>,
    /// Kernel; defaults to the agent's guest image.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub kernel: Option<PathBuf>,
    /// Initramfs; defaults to the agent's guest image when the kernel is defaulted too.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended to the defaults.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// The in-guest workload: `idle`, or comma-separated parts `dirty:<MiB>:<MiB/s>`
    /// (memory in a self-checking pattern) and `disk:<MiB>:<MiB/s>` (self-verifying
    /// blocks written and re-read on the VM's first disk besides its root), e.g.
    /// `dirty:32:8,disk:16:4`.
    #[serde(default = "default_workload")]
    #[schema(default = "idle")]
    pub workload: String,
    /// Machine type. The agent pins it at creation to the versioned type its QEMU's
    /// `q35` stands for (e.g. `pc-q35-10.0`), and it travels with the VM, so every host
    /// it migrates to builds the same virtual hardware.
    #[serde(default)]
    pub machine: Option<String>,
    /// Disks, in order (the first virtio-blk one is `/dev/vda`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    /// Network interfaces, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    /// Free will: the VM gets a virtio-serial port named [`WILL_PORT`] on which its
    /// guest may ask to move (`walk any`, `walk least-loaded`, `walk HOST`) and reads
    /// the answer. Part of the spec, so the port exists identically on every host the
    /// VM migrates to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub free_will: bool,
}

/// The name of the free-will virtio-serial port (`/dev/virtio-ports/org.walkabout.0` in
/// the guest).
pub const WILL_PORT: &str = "org.walkabout.0";

/// Where a guest with free will asks to go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WillAsk {
    /// Any other host with room (`walk any`).
    Any,
    /// The host with the most free memory (`walk least-loaded`).
    LeastLoaded,
    /// That host (`walk HOST`).
    Host(String),
}

impl std::fmt::Display for WillAsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WillAsk::Any => f.write_str("walk any"),
            WillAsk::LeastLoaded => f.write_str("walk least-loaded"),
            WillAsk::Host(h) => write!(f, "walk {h}"),
        }
    }
}

impl std::str::FromStr for WillAsk {
    type Err = String;

    /// Parses one line the guest wrote: `walk any`, `walk least-loaded` or `walk HOST`.
    fn from_str(line: &str) -> Result<WillAsk, String> {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("walk"), Some("any"), None) => Ok(WillAsk::Any),
            (Some("walk"), Some("least-loaded"), None) => Ok(WillAsk::LeastLoaded),
            (Some("walk"), Some(h), None) if h.len() <= 64 && h.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) => {
                Ok(WillAsk::Host(h.to_string()))
            }
            _ => Err(format!("`{}` is not `walk any`, `walk least-loaded` or `walk HOST`", line.chars().take(80).collect::<String>())),
        }
    }
}

/// A request a guest made through its free-will port, as its agent holds it until the
/// controller answers (`GET /v1/will` on an agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WillRequest {
    /// The VM that asks.
    pub vm: String,
    /// The request's number on this agent (answers name it).
    pub id: u64,
    /// Where it asks to go.
    pub ask: WillAsk,
    /// When the agent read it, ms since the epoch.
    pub asked_ms: u64,
}

/// The controller's answer to a guest's request (`POST /v1/vms/{name}/will/answer` on
/// the agent where the VM runs now): one line written back on the guest's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WillAnswer {
    /// The request answered, if this agent holds it (it is dropped from its queue).
    #[serde(default)]
    pub id: Option<u64>,
    /// The answer: `went to h2`, `refused: h3 is draining`, ...
    pub answer: String,
}

fn default_vcpus() -> u32 {
    1
}

fn default_workload() -> String {
    "idle".into()
}

impl VmSpec {
    /// A spec with defaults for everything but the name and memory.
    pub fn new(name: impl Into<String>, memory_mib: u64) -> VmSpec {
        VmSpec {
            name: name.into(),
            memory_mib,
            vcpus: default_vcpus(),
            cpu_model: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            workload: default_workload(),
            machine: None,
            disks: vec![],
            nics: vec![],
            free_will: false,
        }
    }

    /// The CPU model this VM runs with.
    pub fn cpu_model(&self) -> &str {
        self.cpu_model.as_deref().unwrap_or(DEFAULT_CPU_MODEL)
    }
}

/// Lifecycle state of a VM on its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// QEMU is being started.
    Starting,
    /// The guest runs.
    Running,
    /// The guest's vCPUs are paused.
    Paused,
    /// The VM runs here and is being migrated away.
    Migrating,
    /// A migration destination: QEMU waits for (or receives) the VM; the guest does
    /// not run here until the migration's switchover, and the VM still belongs to its
    /// source.
    Incoming,
    /// QEMU is not running (stopped by the user, or it exited; see `reason`).
    Stopped,
}

impl VmState {
    /// True when a QEMU process exists for the VM (it holds memory on the host).
    pub fn is_active(self) -> bool {
        !matches!(self, VmState::Stopped)
    }

    /// True when the VM belongs to this host: an incoming VM still belongs to its source.
    pub fn is_owned(self) -> bool {
        self != VmState::Incoming
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Migrating => "migrating",
            VmState::Incoming => "incoming",
            VmState::Stopped => "stopped",
        })
    }
}

/// What the agent stores and reports about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmRecord {
    /// Layout version ([`RECORD_VERSION`]).
    pub version: u32,
    /// The spec it was created from.
    pub spec: VmSpec,
    /// Its state.
    pub state: VmState,
    /// Why it is in that state, when that is not obvious (e.g. QEMU exited on its own).
    #[serde(default)]
    pub reason: Option<String>,
    /// The accelerator it runs under.
    pub accel: Accel,
    /// Pid of its QEMU while active.
    #[serde(default)]
    pub pid: Option<i32>,
    /// Directory of its QMP socket, console log and pid file.
    #[schema(value_type = String)]
    pub run_dir: PathBuf,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// The guest's status as its previous hosts' consoles left it (migrated VMs): this
    /// host's console continues it.
    #[serde(default)]
    pub guest_before: Option<GuestStatus>,
    /// Its protection: checkpoints shipped to a replica, self-fencing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<crate::checkpoint::Protection>,
}

/// A VM as the agent's API reports it: its record and what its guest says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    /// The stored record.
    #[serde(flatten)]
    pub record: VmRecord,
    /// The guest's status from its console.
    pub guest: GuestStatus,
    /// How its protection's checkpoints are going (protected VMs only). Its JSON key is
    /// `protection_status`: the flattened record already has `protection` (the setting).
    #[serde(default, rename = "protection_status", skip_serializing_if = "Option::is_none")]
    pub protection: Option<crate::checkpoint::ProtectionStatus>,
}

/// A slice of a VM's serial console (`GET /v1/vms/{name}/console`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConsoleChunk {
    /// Byte offset the text starts at.
    pub offset: u64,
    /// Offset to ask for next.
    pub next: u64,
    /// The text (lossily decoded).
    pub text: String,
}

/// The guest's state as read from its serial console.
///
/// The Walkabout guest prints `WALKABOUT READY cpus=N ...` once, then
/// `hb <seq> <monotonic_ns> <corrupt_pages>` every 100 ms; any guest works, it simply
/// never becomes `ready`. Continuity is judged across hosts: a migrated VM's status
/// starts from the one its source left ([`VmRecord::guest_before`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestStatus {
    /// The guest program printed READY.
    pub ready: bool,
    /// CPUs the guest reported online.
    pub cpus: Option<u32>,
    /// Heartbeat lines seen.
    pub heartbeats: u64,
    /// Sequence number of the last heartbeat.
    pub last_seq: Option<u64>,
    /// Heartbeats whose sequence did not follow the previous one (a gap or a restart).
    pub seq_breaks: u64,
    /// Corrupt pages the guest's checker has counted (from the last heartbeat).
    pub corrupt_pages: u64,
    /// Corrupt disk blocks the guest's disk checker has counted (from the last heartbeat).
    #[serde(default)]
    pub corrupt_blocks: u64,
    /// The kernel printed an oops, a BUG or a panic.
    pub kernel_trouble: bool,
    /// Lines the guest program flagged (`WALKABOUT ERROR`, `CORRUPT`), at most 20.
    pub alerts: Vec<String>,
    /// The console's last line while it is still arriving (no newline yet). A guest
    /// stopped for a migration's switchover may be half-way through a line, and the rest
    /// of it appears on the destination's console: the destination continues this text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub partial_line: String,
}

impl GuestStatus {
    /// True when nothing the guest said is wrong: heartbeats continuous, no corrupt
    /// page or block, no kernel trouble, no alert.
    pub fn is_healthy(&self) -> bool {
        self.seq_breaks == 0 && self.corrupt_pages == 0 && self.corrupt_blocks == 0 && !self.kernel_trouble && self.alerts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_protected_vms_setting_and_status_round_trip_under_their_own_keys() {
        let rec = VmRecord {
            version: RECORD_VERSION,
            spec: VmSpec::new("p", 256),
            state: VmState::Running,
            reason: None,
            accel: Accel::Tcg,
            pid: None,
            run_dir: "/x".into(),
            created_at_ms: 0,
            guest_before: None,
            protection: Some(crate::checkpoint::Protection {
                replica: "h2".into(),
                replica_url: "http://h2".into(),
                every_ms: 1000,
                keep: 2,
                fence_ms: 5000,
                clock_from_ms: None,
            }),
        };
        let status = crate::checkpoint::ProtectionStatus { checkpoints: 3, ..Default::default() };
        let info = VmInfo { record: rec, guest: GuestStatus::default(), protection: Some(status) };
        let text = serde_json::to_string(&info).expect("json");
        assert_eq!(serde_json::from_str::<VmInfo>(&text).expect("parses"), info, "{text}");
    }
}

/// A free-will request as the controller handles it (`GET /v1/will` on the controller).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WillRecord {
    /// The VM that asked.
    pub vm: String,
    /// The request's number on the agent that read it.
    pub id: u64,
    /// Where it asked to go.
    pub ask: WillAsk,
    /// The host it asked from.
    pub from: String,
    /// When its agent read it, ms since the epoch.
    pub asked_ms: u64,
    /// The move's plan, if one was made.
    #[serde(default)]
    pub plan: Option<String>,
    /// The answer given to the guest (absent while the move is under way).
    #[serde(default)]
    pub answer: Option<String>,
    /// When it was answered.
    #[serde(default)]
    pub answered_ms: Option<u64>,
}

#[cfg(test)]
mod will_tests {
    use super::WillAsk;

    #[test]
    fn will_requests_parse_and_print_back() {
        for line in ["walk any", "walk least-loaded", "walk h3"] {
            let ask: WillAsk = line.parse().expect("parses");
            assert_eq!(ask.to_string(), line);
        }
        assert_eq!("  walk   h2 ".parse::<WillAsk>(), Ok(WillAsk::Host("h2".into())));
        assert!("run away".parse::<WillAsk>().is_err());
        assert!("walk h2 now".parse::<WillAsk>().is_err());
        assert!("walk h2;rm".parse::<WillAsk>().is_err());
    }
}
