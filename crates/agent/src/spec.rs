//! What a VM is (its spec) and what it is doing (its record), as plain versioned structs
//! that the agent stores and serves.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use walkabout_qemu::Accel;

/// Version of [`VmRecord`]'s stored layout.
pub const RECORD_VERSION: u32 = 1;

/// Default CPU model: a baseline every x86-64 host (and TCG) can run, so VMs can move.
pub const DEFAULT_CPU_MODEL: &str = "qemu64";

/// A VM as the user asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique name on this agent.
    pub name: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// QEMU CPU model; defaults to [`DEFAULT_CPU_MODEL`].
    #[serde(default)]
    pub cpu_model: Option<String>,
    /// Kernel; defaults to the agent's guest image.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initramfs; defaults to the agent's guest image when the kernel is defaulted too.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended to the defaults.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// The in-guest workload: `idle` or `dirty:<MiB>:<MiB/s>`.
    #[serde(default = "default_workload")]
    pub workload: String,
    /// Machine type. The agent pins it at creation to the versioned type its QEMU's
    /// `q35` stands for (e.g. `pc-q35-10.0`), and it travels with the VM, so every host
    /// it migrates to builds the same virtual hardware.
    #[serde(default)]
    pub machine: Option<String>,
}

fn default_vcpus() -> u32 {
    1
}

fn default_workload() -> String {
    "idle".into()
}

impl VmSpec {
    /// The CPU model this VM runs with.
    pub fn cpu_model(&self) -> &str {
        self.cpu_model.as_deref().unwrap_or(DEFAULT_CPU_MODEL)
    }
}

/// Lifecycle state of a VM on this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// not run here until the migration's switchover.
    Incoming,
    /// QEMU is not running (stopped by the user, or it exited; see `reason`).
    Stopped,
}

impl VmState {
    /// True when a QEMU process exists for the VM.
    pub fn is_active(self) -> bool {
        matches!(self, VmState::Starting | VmState::Running | VmState::Paused | VmState::Migrating | VmState::Incoming)
    }
}

/// What the agent stores and reports about one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub run_dir: PathBuf,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// The guest's status as its previous hosts' consoles left it (migrated VMs): this
    /// host's console continues it.
    #[serde(default)]
    pub guest_before: Option<crate::console::GuestStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_spec_gets_defaults() {
        let s: VmSpec = serde_json::from_str(r#"{"name":"a","memory_mib":256}"#).expect("parses");
        assert_eq!(s.vcpus, 1);
        assert_eq!(s.workload, "idle");
        assert_eq!(s.cpu_model(), DEFAULT_CPU_MODEL);
    }
}
