//! `walkabout sim SCENARIO`: the real controller against simulated hosts, in simulated
//! time; a JSON report on stdout (or `--out`) and an SVG plot beside it.

use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;
use walkabout_sim::{CostModel, DayConfig, Scenario, SimConfig};

/// The migration measurements the cost model is fitted to, as checked in.
const MIGRATE_RESULTS: &str = include_str!("../../../../bench/results/migrate.json");

/// Arguments of `walkabout sim`.
#[derive(clap::Args)]
pub struct SimArgs {
    /// `rolling` (maintenance of every host in turn), `failures` (random hosts fail
    /// during a rolling maintenance), `rack` (a rack fails during a drain) or `day` (a
    /// day of load changes under automatic balancing).
    scenario: Scenario,
    /// Simulated hosts (default 1,000; 100 for `day`).
    #[arg(long)]
    hosts: Option<usize>,
    /// Simulated VMs (default 20,000; 2,000 for `day`).
    #[arg(long)]
    vms: Option<usize>,
    /// `day`: simulated hours.
    #[arg(long, default_value_t = 24)]
    hours: u64,
    /// `day`: load spikes (a host's VMs all at their full vCPUs for 45 minutes).
    #[arg(long, default_value_t = 6)]
    spikes: usize,
    /// `day`: the balancer's threshold (spread of CPU use that starts balancing).
    #[arg(long)]
    threshold: Option<f64>,
    /// Hosts per rack (racks alternate two CPU generations).
    #[arg(long, default_value_t = 20)]
    rack_size: usize,
    /// Hosts the rolling maintenance drains (default: every host).
    #[arg(long)]
    drain_hosts: Option<usize>,
    /// `rolling`: hosts in maintenance at once.
    #[arg(long, default_value_t = 16)]
    max_out: usize,
    /// `rolling`: hosts of one rack in maintenance at once.
    #[arg(long, default_value_t = 1)]
    per_rack: usize,
    /// `rolling`: fraction of the in-service hosts' memory kept free once the VMs of the
    /// hosts out are placed.
    #[arg(long, default_value_t = 0.2)]
    reserve: f64,
    /// Hosts that fail in the `failures` scenario.
    #[arg(long, default_value_t = 3)]
    failures: usize,
    /// Migrations out of (and into) one host at once.
    #[arg(long, default_value_t = 2)]
    per_host: u32,
    /// Migrations in the whole cluster at once.
    #[arg(long, default_value_t = 64)]
    per_cluster: u32,
    /// How often the controller polls each agent, ms (default 500, the controller's
    /// own; 5,000 for `day`: a long simulation goes faster with less frequent polls).
    #[arg(long)]
    poll_ms: Option<u64>,
    /// Seed of the layout and the failures.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `bench/migrate`'s JSON results to fit the migration cost model to (default: the
    /// checked-in results).
    #[arg(long)]
    migrate_results: Option<PathBuf>,
    /// Write the JSON report here (and the SVG beside it, `.svg`) instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `walkabout sim`.
pub fn run(a: SimArgs) -> anyhow::Result<ExitCode> {
    let text = match &a.migrate_results {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => MIGRATE_RESULTS.to_string(),
    };
    let cost = CostModel::fit(&text)?;
    let tag = format!("{:?}", a.scenario).to_lowercase();
    if a.scenario == Scenario::Day {
        return day(a, cost, walkabout_sim::scenario::scratch_dir(&tag));
    }
    let mut cfg =
        SimConfig::new(a.scenario, a.hosts.unwrap_or(1000), a.vms.unwrap_or(20_000), cost, walkabout_sim::scenario::scratch_dir(&tag));
    cfg.rack_size = a.rack_size;
    cfg.drain_hosts = a.drain_hosts;
    cfg.rolling =
        walkabout_sim::rolling::RollingLimits { max_hosts: a.max_out.max(1), max_per_rack: a.per_rack.max(1), reserve: a.reserve };
    cfg.failures = a.failures;
    cfg.limits.per_host_out = a.per_host;
    cfg.limits.per_host_in = a.per_host;
    cfg.limits.planner_parallel_per_host = a.per_host;
    cfg.limits.per_cluster = a.per_cluster;
    cfg.seed = a.seed;
    cfg.poll_ms = a.poll_ms.unwrap_or(500);
    let report = walkabout_sim::run(cfg)?;
    let json = serde_json::to_string_pretty(&report)?;
    match &a.out {
        Some(p) => {
            std::fs::write(p, json + "\n").with_context(|| format!("writing {}", p.display()))?;
            let svg = p.with_extension("svg");
            std::fs::write(&svg, walkabout_sim::plot::svg(&report)).with_context(|| format!("writing {}", svg.display()))?;
            eprintln!(
                "{} drains, {} migrations in {:.0} simulated s ({:.0} s real); report {}, plot {}",
                report.drains.len(),
                report.migrations.get("completed").copied().unwrap_or(0),
                report.simulated_s,
                report.wall_s,
                p.display(),
                svg.display()
            );
        }
        None => println!("{json}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `walkabout sim day`: a day of load changes under automatic balancing.
fn day(a: SimArgs, cost: CostModel, dir: PathBuf) -> anyhow::Result<ExitCode> {
    let mut cfg = DayConfig::new(a.hosts.unwrap_or(100), a.vms.unwrap_or(2000), cost, dir);
    let cl = &mut cfg.cluster;
    cl.rack_size = a.rack_size;
    cl.limits.per_host_out = a.per_host;
    cl.limits.per_host_in = a.per_host;
    cl.limits.planner_parallel_per_host = a.per_host;
    cl.limits.per_cluster = a.per_cluster;
    cl.seed = a.seed;
    if let Some(p) = a.poll_ms {
        cl.poll_ms = p;
    }
    cfg.hours = a.hours;
    cfg.spikes = a.spikes;
    if let Some(t) = a.threshold {
        cfg.balance.threshold = t;
    }
    let report = walkabout_sim::run_day(cfg)?;
    let json = serde_json::to_string_pretty(&report)?;
    match &a.out {
        Some(p) => {
            std::fs::write(p, json + "\n").with_context(|| format!("writing {}", p.display()))?;
            let svg = p.with_extension("svg");
            std::fs::write(&svg, walkabout_sim::plot::day_svg(&report)).with_context(|| format!("writing {}", svg.display()))?;
            eprintln!(
                "{:.0} simulated h in {:.0} s real: {} moves ({} ping-pong), spread median {:.2} max {:.2}; report {}, plot {}",
                report.simulated_s / 3600.0,
                report.wall_s,
                report.moves.len(),
                report.ping_pong.len(),
                report.spread.median,
                report.spread.max,
                p.display(),
                svg.display()
            );
        }
        None => println!("{json}"),
    }
    Ok(ExitCode::SUCCESS)
}
