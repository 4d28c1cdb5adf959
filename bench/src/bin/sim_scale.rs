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

fn main() -> Result<()> {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let hosts = usize::try_from(args.first().copied().unwrap_or(1000))?;
    let vms = usize::try_from(args.get(1).copied().unwrap_or(20_000))?;
    let poll_ms = args.get(2).copied().unwrap_or(5000);
    let drain_hosts = args.get(3).map(|&n| usize::try_from(n)).transpose()?;
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
