//! The controller's Prometheus metrics, in OpenMetrics text (`walkabout-metrics`): hosts
//! up and their free memory, VMs known, migrations by result and under way.

use walkabout_api::Phase;
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

/// Renders the controller's metrics from its hosts, the number of VMs it knows and the
/// phase of each migration it ordered.
pub fn render(hosts: &[HostSample<'_>], vms: usize, migrations: &[Phase]) -> String {
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
    s.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_name_with_a_newline_cannot_inject_a_line() {
        let hosts = [HostSample { name: "h1\nwalkabout_cluster_vms 999", up: true, free_mib: 512 }];
        let text = render(&hosts, 2, &[]);
        assert!(!text.lines().any(|l| l.starts_with("walkabout_cluster_vms 999")), "{text}");
        assert!(text.contains("walkabout_cluster_host_up{host=\"h1\\nwalkabout_cluster_vms 999\"} 1\n"), "{text}");
        assert!(text.contains("walkabout_cluster_vms 2\n"), "{text}");
    }

    #[test]
    fn migrations_are_counted_by_result_and_running_ones_gauged() {
        let text = render(&[], 0, &[Phase::Completed, Phase::Completed, Phase::Failed, Phase::Running]);
        assert!(text.contains("walkabout_cluster_migrations_total{result=\"completed\"} 2\n"), "{text}");
        assert!(text.contains("walkabout_cluster_migrations_total{result=\"failed\"} 1\n"), "{text}");
        assert!(text.contains("walkabout_cluster_migrations_total{result=\"cancelled\"} 0\n"), "{text}");
        assert!(text.contains("walkabout_cluster_migrations_running 1\n"), "{text}");
    }
}
