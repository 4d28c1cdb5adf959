//! `bench/sim_scale`: the controller's own figures at 1,000 simulated hosts and 20,000
//! VMs (`walkabout-sim`: the real controller against in-process simulated agents, in
//! simulated time). Two runs:
//! - keep-up: the controller polling every agent at its default 500 ms while six
//!   hosts are drained in turn: agent polls per real second it keeps up with (against
//!   the polls per simulated second it is asked for), plan latency, CPU and memory;
//! - rolling maintenance of every host, several at once within the rolling limits
//!   (`walkabout_sim::rolling`: 16 hosts out at most, one per rack, 20% of the memory
//!   kept free; each agent polled every `POLL_MS`, default 5,000): time to drain all,
//!   migrations, plan latency, hosts out at once, the controller's CPU per poll.
//!
//! Writes each report (and its SVG) under `bench/results/` and prints one JSON summary.
//!
//! Run: `cargo run --release -p walkabout-bench --bin sim_scale [HOSTS VMS POLL_MS [DRAIN_HOSTS]]`;
//! with DRAIN_HOSTS the keep-up run is skipped and the rolling maintenance stops after
//! that many hosts.

use anyhow::Result;
use serde_json::json;
use walkabout_sim::scenario::scratch_dir;
use walkabout_sim::{run, CostModel, Scenario, SimConfig};

/// The controller's own figures at scale against simulated agents; one JSON summary.
#[derive(clap::Parser)]
#[command(name = "sim_scale")]
struct Args {
    /// Simulated hosts.
    #[arg(default_value_t = 1000)]
    hosts: usize,
    /// Simulated VMs.
    #[arg(default_value_t = 20_000)]
    vms: usize,
    /// Each agent polled every this many ms during the rolling maintenance.
    #[arg(default_value_t = 5000)]
    poll_ms: u64,
    /// Skip the keep-up run and stop the rolling maintenance after this many hosts.
    drain_hosts: Option<usize>,
}

fn main() -> Result<()> {
    let Args { hosts, vms, poll_ms, drain_hosts } = <Args as clap::Parser>::parse();
    let root = walkabout_bench::workspace_root();
    let cost = CostModel::fit(&std::fs::read_to_string(root.join("bench/results/migrate.json"))?)?;
    let mut summary = serde_json::Map::new();

    if drain_hosts.is_none() {
        let mut keep_up = SimConfig::new(Scenario::Rolling, hosts, vms, cost, scratch_dir("keep-up"));
        keep_up.drain_hosts = Some(6);
        keep_up.limits.per_host_out = 4;
        keep_up.limits.per_host_in = 4;
        keep_up.limits.planner_parallel_per_host = 4;
        let r = run(keep_up)?;
        std::fs::write(root.join("bench/results/sim-keep-up.json"), serde_json::to_string_pretty(&r)? + "\n")?;
        summary.insert(
            "keep_up_500ms_polls".into(),
            json!({"simulated_s": r.simulated_s, "wall_s": r.wall_s, "polls_per_simulated_s": r.polls_per_simulated_s,
               "polls_per_wall_s": r.polls_per_wall_s, "keeps_up": r.polls_per_wall_s >= r.polls_per_simulated_s,
               "plan_latency_ms": r.plan_latency_ms, "cpu_s": r.cpu_s, "max_rss_mib": r.max_rss_mib}),
        );
    }

    let mut rolling = SimConfig::new(Scenario::Rolling, hosts, vms, cost, scratch_dir("rolling"));
    rolling.poll_ms = poll_ms;
    rolling.drain_hosts = drain_hosts;
    rolling.limits.per_host_out = 4;
    rolling.limits.per_host_in = 4;
    rolling.limits.planner_parallel_per_host = 4;
    let r = run(rolling)?;
    std::fs::write(root.join("bench/results/sim-rolling.json"), serde_json::to_string_pretty(&r)? + "\n")?;
    std::fs::write(root.join("bench/results/sim-rolling.svg"), walkabout_sim::plot::svg(&r))?;
    summary.insert(
        "rolling_maintenance".into(),
        json!({"hosts": hosts, "vms": vms, "poll_ms": poll_ms, "wall_s": r.wall_s, "setup_wall_s": r.setup_wall_s,
               "simulated_s": r.simulated_s, "drains": r.drains.len(),
               "drained": r.drains.iter().filter(|d| d.outcome == "drained").count(),
               "migrations": r.migrations, "time_to_drain_s": r.time_to_drain_s, "migration_s": r.migration_s,
               "plan_latency_ms": r.plan_latency_ms, "cpu_s": r.cpu_s, "max_rss_mib": r.max_rss_mib,
               "hosts_out_max": r.hosts_out_max, "hosts_out_mean": r.hosts_out_mean, "peak_host_fill": r.peak_host_fill,
               "poll_cost": r.poll_cost, "rolling_limits": r.config.rolling}),
    );
    println!("{}", serde_json::to_string_pretty(&json!({"bench": "sim_scale", "results": summary}))?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::Parser;

    #[test]
    fn the_positional_arguments_keep_the_old_defaults() {
        let d = Args::try_parse_from(["sim_scale"]).expect("defaults");
        let g = Args::try_parse_from(["sim_scale", "10", "200", "500", "3"]).expect("all four");
        assert_eq!((d.hosts, d.vms, d.poll_ms, d.drain_hosts), (1000, 20_000, 5000, None));
        assert_eq!((g.hosts, g.vms, g.poll_ms, g.drain_hosts), (10, 200, 500, Some(3)));
    }
}
