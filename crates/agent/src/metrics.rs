//! Prometheus metrics of one agent, in OpenMetrics text (`walkabout-metrics`).
//! Migration metrics are named like KubeVirt's (`kubevirt_vmi_migration_data_remaining_bytes`
//! becomes `walkabout_migration_data_remaining_bytes`), so existing dashboards translate.

use crate::host::HostInfo;
use crate::migration::MigrationRecord;
use crate::vms::VmInfo;
use walkabout_metrics::{count, labels, set, Scrape};
use walkabout_migrate::Phase;

pub use walkabout_metrics::CONTENT_TYPE;

/// Renders the agent's metrics.
pub fn render(host: &HostInfo, vms: &[VmInfo], migrations: &[MigrationRecord]) -> String {
    let mut s = Scrape::new();
    s.gauge("walkabout_host_memory_capacity_bytes", "Memory VMs may use on this host", host.capacity_mib << 20);
    s.gauge("walkabout_host_memory_used_bytes", "Memory given to active VMs", host.used_mib << 20);
    let info = s.gauges("walkabout_vm_info", "One per VM, with its state");
    let heartbeats = s.counters("walkabout_vm_guest_heartbeats", "Heartbeats the guest printed");
    let corrupt = s.gauges("walkabout_vm_guest_corrupt_pages", "Corrupt pages the in-guest checker found");
    let corrupt_blocks = s.gauges("walkabout_vm_guest_corrupt_blocks", "Corrupt disk blocks the in-guest disk workload found");
    for v in vms {
        let name = v.record.spec.name.as_str();
        let state = serde_json::to_value(v.record.state).ok().and_then(|s| s.as_str().map(String::from)).unwrap_or_default();
        set(&info, labels([("vm", name), ("state", &state)]), 1);
        count(&heartbeats, labels([("vm", name)]), v.guest.heartbeats);
        set(&corrupt, labels([("vm", name)]), v.guest.corrupt_pages);
        set(&corrupt_blocks, labels([("vm", name)]), v.guest.corrupt_blocks);
    }
    type Measure = (&'static str, &'static str, fn(&MigrationRecord) -> u64);
    let measures: [Measure; 5] = [
        ("walkabout_migration_data_remaining_bytes", "Bytes still to send", |m| m.progress.remaining_bytes),
        ("walkabout_migration_data_processed_bytes", "Bytes sent so far", |m| m.progress.transferred_bytes),
        ("walkabout_migration_data_total_bytes", "Guest memory to migrate", |m| m.progress.total_bytes),
        ("walkabout_migration_dirty_memory_rate_bytes", "Guest dirty rate, bytes/s", |m| m.progress.dirty_rate_bps),
        ("walkabout_migration_memory_transfer_rate_bytes", "Transfer rate, bytes/s", |m| m.progress.transfer_rate_bps),
    ];
    let active: Vec<&MigrationRecord> = migrations.iter().filter(|m| !m.phase.is_final()).collect();
    for (name, help, measure) in measures {
        let family = s.gauges(name, help);
        for m in &active {
            set(&family, labels([("vm", &m.vm), ("migration", &m.id)]), measure(m));
        }
    }
    // Counters are named without `_total`; the encoder adds it.
    for (name, phase, help) in [
        ("walkabout_migration_succeeded", Phase::Completed, "Migrations that completed"),
        ("walkabout_migration_failed", Phase::Failed, "Migrations that failed"),
        ("walkabout_migration_cancelled", Phase::Cancelled, "Migrations cancelled before switchover"),
    ] {
        s.counter(name, help, migrations.iter().filter(|m| m.phase == phase).count() as u64);
    }
    s.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn host() -> HostInfo {
        let accel = json!({"accel": "tcg", "reason": "test", "tcg_ms": null, "kvm_ms": null});
        let qemu = json!({"major": 10, "minor": 0, "micro": 2, "banner": "QEMU 10.0.2"});
        serde_json::from_value(json!({"hostname": "h1", "cpu_model": "x", "cpus": 2, "memory_total_mib": 4096, "capacity_mib": 2048,
            "used_mib": 512, "free_mib": 1536, "vms": 1, "accel": accel, "qemu": qemu}))
        .expect("a host")
    }

    fn vm(name: &str, heartbeats: u64) -> VmInfo {
        let mut guest = serde_json::to_value(crate::console::GuestStatus::default()).expect("a guest status");
        guest["heartbeats"] = json!(heartbeats);
        serde_json::from_value(json!({"version": 1, "spec": {"name": name, "memory_mib": 256}, "state": "running", "accel": "tcg",
            "run_dir": "/tmp/x", "created_at_ms": 0, "guest": guest}))
        .expect("a VM")
    }

    fn migration(id: &str, phase: &str, sent: u64) -> MigrationRecord {
        let mut progress = serde_json::to_value(walkabout_migrate::progress::Progress::default()).expect("progress");
        progress["transferred_bytes"] = json!(sent);
        serde_json::from_value(json!({"version": 1, "id": id, "vm": "g1", "destination": "http://h2", "mode": "auto",
            "limits": {"max_downtime_ms": 300, "max_bandwidth_bps": null, "budget_per_gib_ms": 30000}, "phase": phase,
            "reason": null, "dirty_rate_bps": null, "strategy": null, "switches": [], "progress": progress,
            "total_ms": null, "downtime_ms": null, "created_at_ms": 0, "finished_at_ms": null}))
        .expect("a migration")
    }

    #[test]
    fn the_agent_keeps_its_metric_names() {
        let text = render(&host(), &[vm("g1", 42)], &[migration("m1", "running", 1 << 20), migration("m0", "completed", 9)]);
        for line in [
            "walkabout_host_memory_capacity_bytes 2147483648",
            "walkabout_host_memory_used_bytes 536870912",
            "walkabout_vm_info{vm=\"g1\",state=\"running\"} 1",
            "walkabout_vm_guest_heartbeats_total{vm=\"g1\"} 42",
            "walkabout_vm_guest_corrupt_pages{vm=\"g1\"} 0",
            "walkabout_vm_guest_corrupt_blocks{vm=\"g1\"} 0",
            "walkabout_migration_data_processed_bytes{vm=\"g1\",migration=\"m1\"} 1048576",
            "walkabout_migration_succeeded_total 1",
            "walkabout_migration_failed_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
        // Only migrations under way have progress gauges.
        assert!(!text.contains("migration=\"m0\""), "{text}");
    }

    #[test]
    fn a_vm_name_with_a_newline_cannot_inject_a_line() {
        let text = render(&host(), &[vm("g1\nwalkabout_migration_failed_total 99", 1)], &[]);
        assert!(!text.lines().any(|l| l.starts_with("walkabout_migration_failed_total 99")), "{text}");
        assert!(text.lines().any(|l| l == "walkabout_migration_failed_total 0"), "{text}");
    }
}
