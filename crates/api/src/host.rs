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
    /// CPU time each VM's QEMU has used, ms (its load, for balancing), by VM name;
    /// VMs busy in another operation may be missing from one answer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vm_cpu_ms: BTreeMap<String, u64>,
    /// How fast each VM's guest dirties its memory, bytes/s, by VM name, from agents that
    /// measure it (the cost of moving the VM, for balancing); VMs not measured are missing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vm_dirty_bps: BTreeMap<String, u64>,
    /// The host's 1-minute load average, in thousandths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_milli: Option<u64>,
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

/// The CPU model name that stands for the cluster baseline at VM creation (like
/// vMotion's EVC): the controller replaces it with the richest named model every host
/// in service can run.
pub const BASELINE_CPU_MODEL: &str = "baseline";

impl CpuCatalog {
    /// The cluster baseline over `hosts`: the named model with the most features that
    /// every host knows by that name and whose features every host's ceiling includes.
    /// `None` if no model fits (or no host is given).
    pub fn baseline<'a>(hosts: impl IntoIterator<Item = &'a CpuCatalog> + Clone) -> Option<String> {
        let mut it = hosts.clone().into_iter();
        let first = it.next()?;
        let common = it.fold(first.ceiling_features.clone(), |acc, h| acc.intersection(&h.ceiling_features).cloned().collect());
        first
            .models
            .iter()
            .filter(|(name, f)| f.is_subset(&common) && hosts.clone().into_iter().all(|h| h.models.contains_key(*name)))
            .max_by(|(an, af), (bn, bf)| af.len().cmp(&bf.len()).then_with(|| bn.cmp(an)))
            .map(|(name, _)| name.clone())
    }

    /// The features a guest with CPU model `model` uses on this host: a named model's
    /// features, or the ceiling's for `host`/`max` (and for this host's ceiling name).
    /// `None` for a model this host does not know.
    pub fn features_of(&self, model: &str) -> Option<&BTreeSet<String>> {
        if model == self.ceiling || matches!(model, "host" | "max") {
            return Some(&self.ceiling_features);
        }
        self.models.get(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_baseline_is_the_richest_model_every_host_runs() {
        let models: BTreeMap<String, BTreeSet<String>> = [
            ("old".to_string(), set(&["sse2"])),
            ("mid".to_string(), set(&["sse2", "sse4.1"])),
            ("new".to_string(), set(&["sse2", "sse4.1", "avx512f"])),
        ]
        .into();
        let big = CpuCatalog { ceiling: "max".into(), ceiling_features: set(&["sse2", "sse4.1", "avx512f"]), models: models.clone() };
        let small = CpuCatalog { ceiling: "max".into(), ceiling_features: set(&["sse2", "sse4.1"]), models };

        assert_eq!(CpuCatalog::baseline([&big, &small]).as_deref(), Some("mid"));
        assert_eq!(CpuCatalog::baseline([&big]).as_deref(), Some("new"));
    }
}
