//! The controller's Prometheus metrics, in OpenMetrics text (`walkabout-metrics`): hosts
//! up and their free memory, VMs known, migrations by result and under way, the
//! downtime the guests' users saw (migrations whose guest was probed), and failovers:
//! by result, and each restored VM's RPO and RTO.

use walkabout_api::{Failover, FailoverResult, Phase};
use walkabout_metrics::{count, labels, set, Scrape};

pub use walkabout_metrics::CONTENT_TYPE;

/// A host as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct HostSample<'a> {
    /// Its name in the cluster.
    pub name: &'a str,
    /// Whether its agent answers.
    pub up: bool,
    /// Memory free for VMs, MiB.
    pub free_mib: u64,
}

/// Renders the controller's metrics from its hosts, the number of VMs it knows, the
/// phase of each migration it ordered and the observed downtimes (ms, oldest first) of
/// those whose guest was probed.
pub fn render(hosts: &[HostSample<'_>], vms: usize, migrations: &[Phase], observed_ms: &[u64], failovers: &[Failover]) -> String {
    let mut s = Scrape::new();
    let up = s.gauges("walkabout_cluster_host_up", "Whether the host's agent answers");
    let free = s.gauges("walkabout_cluster_host_free_mib", "Memory free for VMs");
    for h in hosts {
        set(&up, labels([("host", h.name)]), u64::from(h.up));
        set(&free, labels([("host", h.name)]), h.free_mib);
    }
    s.gauge("walkabout_cluster_vms", "VMs known to the controller", vms as u64);
    // Named without `_total`; the encoder adds it.
    let ended = s.counters("walkabout_cluster_migrations", "Migrations ordered, by result");
    for (result, phase) in [("completed", Phase::Completed), ("failed", Phase::Failed), ("cancelled", Phase::Cancelled)] {
        count(&ended, labels([("result", result)]), migrations.iter().filter(|p| **p == phase).count() as u64);
    }
    let running = migrations.iter().filter(|p| !p.is_final()).count();
    s.gauge("walkabout_cluster_migrations_running", "Migrations under way", running as u64);
    s.counter("walkabout_cluster_migrations_probed", "Migrations whose guest was probed", observed_ms.len() as u64);
    let last = observed_ms.last().copied().unwrap_or(0);
    s.gauge("walkabout_cluster_observed_downtime_last_ms", "Observed downtime of the last probed migration", last);
    let max = observed_ms.iter().max().copied().unwrap_or(0);
    s.gauge("walkabout_cluster_observed_downtime_max_ms", "Longest observed downtime of a probed migration", max);
    render_failovers(&mut s, failovers);
    s.render()
}

/// Failovers by result; per VM, the recovery point and time of its last restore; and
/// the worst of each over all restores (`failovers` oldest first).
fn render_failovers(s: &mut Scrape, failovers: &[Failover]) {
    let ended = s.counters("walkabout_cluster_failovers", "VMs of down hosts, by how their failover ended");
    for (result, r) in [("restored", FailoverResult::Restored), ("lost", FailoverResult::Lost), ("fencing", FailoverResult::Fencing)] {
        count(&ended, labels([("result", result)]), failovers.iter().filter(|f| f.result == r).count() as u64);
    }
    let rpo =
        s.gauges("walkabout_cluster_failover_rpo_ms", "Recovery point of the VM's last restore: its host's loss minus its checkpoint");
    let rto =
        s.gauges("walkabout_cluster_failover_rto_ms", "Recovery time of the VM's last restore: its host's loss to the guest running again");
    // Oldest first: a VM's later restore overwrites its earlier one.
    for f in failovers.iter().filter(|f| f.result == FailoverResult::Restored) {
        if let (Some(p), Some(t)) = (f.rpo_ms, f.rto_ms) {
            set(&rpo, labels([("vm", &f.vm)]), p);
            set(&rto, labels([("vm", &f.vm)]), t);
        }
    }
    let worst = |v: fn(&Failover) -> Option<u64>| failovers.iter().filter_map(v).max().unwrap_or(0);
    s.gauge("walkabout_cluster_failover_rpo_max_ms", "Worst recovery point of a restored VM", worst(|f| f.rpo_ms));
    s.gauge("walkabout_cluster_failover_rto_max_ms", "Worst recovery time of a restored VM", worst(|f| f.rto_ms));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_name_with_a_newline_cannot_inject_a_line() {
        let hosts = [HostSample { name: "h1\nwalkabout_cluster_vms 999", up: true, free_mib: 512 }];
        let text = render(&hosts, 2, &[], &[], &[]);
        assert!(!text.lines().any(|l| l.starts_with("walkabout_cluster_vms 999")), "{text}");
        assert!(text.contains("walkabout_cluster_host_up{host=\"h1\\nwalkabout_cluster_vms 999\"} 1\n"), "{text}");
        assert!(text.contains("walkabout_cluster_vms 2\n"), "{text}");
    }

    #[test]
    fn migrations_are_counted_by_result_and_running_ones_gauged() {
        let text = render(&[], 0, &[Phase::Completed, Phase::Completed, Phase::Failed, Phase::Running], &[], &[]);
        assert!(text.contains("walkabout_cluster_migrations_total{result=\"completed\"} 2\n"), "{text}");
        assert!(text.contains("walkabout_cluster_migrations_total{result=\"failed\"} 1\n"), "{text}");
        assert!(text.contains("walkabout_cluster_migrations_total{result=\"cancelled\"} 0\n"), "{text}");
        assert!(text.contains("walkabout_cluster_migrations_running 1\n"), "{text}");
    }

    #[test]
    fn observed_downtimes_are_counted_with_their_last_and_longest() {
        let text = render(&[], 0, &[Phase::Completed, Phase::Completed], &[420, 180], &[]);
        assert!(text.contains("walkabout_cluster_migrations_probed_total 2\n"), "{text}");
        assert!(text.contains("walkabout_cluster_observed_downtime_last_ms 180\n"), "{text}");
        assert!(text.contains("walkabout_cluster_observed_downtime_max_ms 420\n"), "{text}");
    }

    fn failover(vm: &str, result: FailoverResult, rpo_rto: Option<(u64, u64)>) -> Failover {
        Failover {
            id: format!("f-{vm}"),
            vm: vm.into(),
            from: "h1".into(),
            to: rpo_rto.map(|_| "h2".into()),
            result,
            checkpoint: None,
            skipped: vec![],
            rpo_ms: rpo_rto.map(|r| r.0),
            rto_ms: rpo_rto.map(|r| r.1),
            lost_ms: 1,
            finished_ms: Some(2),
            reason: None,
        }
    }

    #[test]
    fn each_restored_vm_has_the_rpo_and_rto_of_its_last_restore_and_the_worst_are_kept() {
        let f = [
            failover("a", FailoverResult::Restored, Some((3_000, 14_000))),
            failover("b", FailoverResult::Restored, Some((1_200, 12_500))),
            failover("c", FailoverResult::Lost, None),
            failover("a", FailoverResult::Restored, Some((900, 11_000))),
        ];
        let text = render(&[], 0, &[], &[], &f);
        assert!(text.contains("walkabout_cluster_failover_rpo_ms{vm=\"a\"} 900\n"), "{text}");
        assert!(text.contains("walkabout_cluster_failover_rto_ms{vm=\"a\"} 11000\n"), "{text}");
        assert!(text.contains("walkabout_cluster_failover_rpo_ms{vm=\"b\"} 1200\n"), "{text}");
        assert!(text.contains("walkabout_cluster_failover_rto_ms{vm=\"b\"} 12500\n"), "{text}");
        assert!(!text.contains("vm=\"c\""), "a lost VM has no RPO: {text}");
        assert!(text.contains("walkabout_cluster_failover_rpo_max_ms 3000\n"), "{text}");
        assert!(text.contains("walkabout_cluster_failover_rto_max_ms 14000\n"), "{text}");
        assert!(text.contains("walkabout_cluster_failovers_total{result=\"restored\"} 3\n"), "{text}");
    }
}
