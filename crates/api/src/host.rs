//! A host as its agent reports it: resources, CPU models, accelerator, QEMU.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use utoipa::ToSchema;

/// An accelerator QEMU can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Linux KVM: hardware virtualization.
    Kvm,
    /// QEMU's Tiny Code Generator: software emulation.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The accelerator an agent chose, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AccelChoice {
    /// The accelerator VMs will use.
    pub accel: Accel,
    /// A sentence saying why.
    pub reason: String,
    /// Calibration time under TCG in ms, if measured.
    pub tcg_ms: Option<u64>,
    /// Calibration time under KVM in ms, if measured and finished.
    pub kvm_ms: Option<u64>,
}

/// A QEMU version as `qemu-system-* --version` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
    /// The full first line QEMU printed (includes the distribution's package version).
    pub banner: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The host as its agent reports it (`GET /v1/host`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    /// Host name.
    pub hostname: String,
    /// CPU model name from /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs.
    pub cpus: u32,
    /// Physical memory in MiB.
    pub memory_total_mib: u64,
    /// Memory the agent may give to VMs, in MiB.
    pub capacity_mib: u64,
    /// Memory given to active VMs (incoming ones included), in MiB.
    pub used_mib: u64,
    /// `capacity_mib - used_mib`.
    pub free_mib: u64,
    /// Active VMs.
    pub vms: u64,
    /// The accelerator VMs use, and why.
    pub accel: AccelChoice,
    /// The QEMU underneath.
    pub qemu: QemuVersion,
}

/// The CPU models one host's QEMU knows, with their features, and what the host offers
/// (`GET /v1/host/cpu`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CpuCatalog {
    /// The host's most capable model (e.g. `max`, `host`, or an operator's ceiling).
    pub ceiling: String,
    /// Features of the ceiling model: what guests on this host may use.
    pub ceiling_features: BTreeSet<String>,
    /// Every non-deprecated named model and its features.
    pub models: BTreeMap<String, BTreeSet<String>>,
}
