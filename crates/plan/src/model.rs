//! The planner's input format: hosts, VMs, current and target placement, limits, groups.
//!
//! Field names match the JSON exactly; optional fields default as the format says.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::InputError;

/// One planning case: the cluster, where every VM is, and where it should be.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    /// The hosts.
    pub hosts: Vec<Host>,
    /// The VMs.
    pub vms: Vec<Vm>,
    /// Where each running VM is now; a VM absent here is started after the last migration.
    #[serde(default)]
    pub current: BTreeMap<String, String>,
    /// Where each VM should end; a VM absent here is shut down before the first migration.
    #[serde(default)]
    pub target: BTreeMap<String, String>,
    /// Limits on parallelism.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Affinity and anti-affinity groups (used by the policies that make targets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Group>,
}

/// A host that can run VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Unique name.
    pub name: String,
    /// Total memory.
    pub memory_mib: u64,
    /// vCPUs it can give to guests; absent: not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    /// Its own architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Guest architectures it runs; absent: just `arch` (absent too: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_archs: Option<Vec<String>>,
    /// CPU features it offers guests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<String>,
    /// Memory kept for the hypervisor; usable memory is `memory_mib - reserved_mib`.
    #[serde(default)]
    pub reserved_mib: u64,
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// Unique name.
    pub name: String,
    /// Guest memory.
    pub memory_mib: u64,
    /// vCPUs; absent: not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    /// Guest architecture; absent: runs anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// CPU features the guest needs from its host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<String>,
}

/// Limits on how much happens at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Migrations (in or out) one host takes part in per wave.
    #[serde(default = "one")]
    pub max_parallel_per_host: u32,
}

fn one() -> u32 {
    1
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_parallel_per_host: 1 }
    }
}

/// A placement constraint over a set of VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Name, for messages.
    pub name: String,
    /// Affinity (all on one host) or anti-affinity (all on different hosts).
    pub kind: GroupKind,
    /// Member VMs.
    pub vms: Vec<String>,
}

/// What a [`Group`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupKind {
    /// All members on the same host.
    Affinity,
    /// No two members on the same host.
    AntiAffinity,
}

impl Case {
    /// Parses a case from JSON text.
    pub fn from_json(text: &str) -> Result<Case, InputError> {
        serde_json::from_str(text).map_err(|e| InputError::Json(e.to_string()))
    }

    /// The parallel limit per host and wave (default 1).
    pub fn max_parallel_per_host(&self) -> u32 {
        self.limits.unwrap_or_default().max_parallel_per_host
    }
}

impl Host {
    /// Memory available to guests.
    pub fn usable_mib(&self) -> u64 {
        self.memory_mib.saturating_sub(self.reserved_mib)
    }

    /// Whether this host can run `vm` (architecture and CPU features).
    pub fn can_run(&self, vm: &Vm) -> bool {
        self.incompatibility(vm).is_none()
    }

    /// Why this host cannot run `vm`, or `None` if it can.
    pub fn incompatibility(&self, vm: &Vm) -> Option<String> {
        if let Some(arch) = &vm.arch {
            let ok = match (&self.guest_archs, &self.arch) {
                (Some(list), _) => list.iter().any(|a| a == arch),
                (None, Some(own)) => own == arch,
                (None, None) => true,
            };
            if !ok {
                return Some(format!("{} does not run {arch} guests", self.name));
            }
        }
        let missing: Vec<&str> = vm.cpu_features.iter().filter(|f| !self.cpu_features.contains(f)).map(String::as_str).collect();
        if !missing.is_empty() {
            return Some(format!("{} lacks CPU features {}", self.name, missing.join(", ")));
        }
        None
    }
}
