//! The controller's Prometheus metrics, in OpenMetrics text (`walkabout-metrics`): hosts
//! up and their free memory, VMs known, migrations by result and under way, and the
//! downtime the guests' users saw (migrations whose guest was probed).

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

/// Failovers by result, and the recovery point and time of the last and the worst
/// restored one (oldest first in `failovers`).
fn render_failovers(s: &mut Scrape, failovers: &[Failover]) {
    let ended = s.counters("walkabout_cluster_failovers", "VMs of down hosts, by how their failover ended");
    for (result, r) in [("restored", FailoverResult::Restored), ("lost", FailoverResult::Lost), ("fencing", FailoverResult::Fencing)] {
        count(&ended, labels([("result", result)]), failovers.iter().filter(|f| f.result == r).count() as u64);
    }
    let rpo: Vec<u64> = failovers.iter().filter_map(|f| f.rpo_ms).collect();
    let rto: Vec<u64> = failovers.iter().filter_map(|f| f.rto_ms).collect();
    s.gauge(
        "walkabout_cluster_failover_rpo_last_ms",
        "Recovery point of the last restored VM: its host's loss minus its checkpoint",
        rpo.last().copied().unwrap_or(0),
    );
    s.gauge("walkabout_cluster_failover_rpo_max_ms", "Worst recovery point of a restored VM", rpo.iter().max().copied().unwrap_or(0));
    s.gauge(
        "walkabout_cluster_failover_rto_last_ms",
        "Recovery time of the last restored VM: its host's loss to the guest running again",
        rto.last().copied().unwrap_or(0),
    );
    s.gauge("walkabout_cluster_failover_rto_max_ms", "Worst recovery time of a restored VM", rto.iter().max().copied().unwrap_or(0));
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
}
