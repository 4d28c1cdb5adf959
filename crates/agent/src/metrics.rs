//! Prometheus metrics, in the text exposition format. Migration metrics are named like
//! KubeVirt's (`kubevirt_vmi_migration_data_remaining_bytes` becomes
//! `walkabout_migration_data_remaining_bytes`), so existing dashboards translate.

use crate::host::HostInfo;
use crate::migration::MigrationRecord;
use crate::vms::VmInfo;
use std::fmt::Write;
use walkabout_migrate::Phase;

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))).collect();
        let _ = if l.is_empty() { writeln!(self.0, "{name} {value}") } else { writeln!(self.0, "{name}{{{}}} {value}", l.join(",")) };
    }
}

/// Renders the agent's metrics.
pub fn render(host: &HostInfo, vms: &[VmInfo], migrations: &[MigrationRecord]) -> String {
    let mut o = Out(String::new());
    o.family("walkabout_host_memory_capacity_bytes", "gauge", "Memory VMs may use on this host.");
    o.sample("walkabout_host_memory_capacity_bytes", &[], (host.capacity_mib << 20) as f64);
    o.family("walkabout_host_memory_used_bytes", "gauge", "Memory given to active VMs.");
    o.sample("walkabout_host_memory_used_bytes", &[], (host.used_mib << 20) as f64);
    o.family("walkabout_vm_info", "gauge", "One per VM, with its state.");
    for v in vms {
        let state = serde_json::to_value(v.record.state).ok().and_then(|s| s.as_str().map(String::from)).unwrap_or_default();
        o.sample("walkabout_vm_info", &[("vm", &v.record.spec.name), ("state", &state)], 1.0);
    }
    o.family("walkabout_vm_guest_heartbeats_total", "counter", "Heartbeats the guest printed.");
    for v in vms {
        o.sample("walkabout_vm_guest_heartbeats_total", &[("vm", &v.record.spec.name)], v.guest.heartbeats as f64);
    }
    o.family("walkabout_vm_guest_corrupt_pages", "gauge", "Corrupt pages the in-guest checker found.");
    for v in vms {
        o.sample("walkabout_vm_guest_corrupt_pages", &[("vm", &v.record.spec.name)], v.guest.corrupt_pages as f64);
    }
    let active: Vec<_> = migrations.iter().filter(|m| !m.phase.is_final()).collect();
    type Gauge = (&'static str, &'static str, fn(&MigrationRecord) -> u64);
    let gauges: [Gauge; 5] = [
        ("walkabout_migration_data_remaining_bytes", "Bytes still to send.", |m| m.progress.remaining_bytes),
        ("walkabout_migration_data_processed_bytes", "Bytes sent so far.", |m| m.progress.transferred_bytes),
        ("walkabout_migration_data_total_bytes", "Guest memory to migrate.", |m| m.progress.total_bytes),
        ("walkabout_migration_dirty_memory_rate_bytes", "Guest dirty rate, bytes/s.", |m| m.progress.dirty_rate_bps),
        ("walkabout_migration_memory_transfer_rate_bytes", "Transfer rate, bytes/s.", |m| m.progress.transfer_rate_bps),
    ];
    for (name, help, f) in gauges {
        o.family(name, "gauge", help);
        for m in &active {
            o.sample(name, &[("vm", &m.vm), ("migration", &m.id)], f(m) as f64);
        }
    }
    for (name, phase, help) in [
        ("walkabout_migration_succeeded_total", Phase::Completed, "Migrations that completed."),
        ("walkabout_migration_failed_total", Phase::Failed, "Migrations that failed."),
        ("walkabout_migration_cancelled_total", Phase::Cancelled, "Migrations cancelled before switchover."),
    ] {
        o.family(name, "counter", help);
        o.sample(name, &[], migrations.iter().filter(|m| m.phase == phase).count() as f64);
    }
    o.0
}
