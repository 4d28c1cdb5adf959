//! `walkabout sim SCENARIO`: the real controller against simulated hosts, in simulated
//! time; a JSON report on stdout (or `--out`) and an SVG plot beside it.

use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;
use walkabout_sim::{CostModel, Scenario, SimConfig};

/// The migration measurements the cost model is fitted to, as checked in.
const MIGRATE_RESULTS: &str = include_str!("../../../../bench/results/migrate.json");

/// Arguments of `walkabout sim`.
#[derive(clap::Args)]
pub struct SimArgs {
    /// `rolling` (maintenance of every host in turn), `failures` (random hosts fail
    /// during a rolling maintenance) or `rack` (a rack fails during a drain).
    scenario: Scenario,
    /// Simulated hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Simulated VMs.
    #[arg(long, default_value_t = 20_000)]
    vms: usize,
    /// Hosts per rack (racks alternate two CPU generations).
    #[arg(long, default_value_t = 20)]
    rack_size: usize,
    /// Hosts the rolling maintenance drains (default: every host).
    #[arg(long)]
    drain_hosts: Option<usize>,
    /// Hosts that fail in the `failures` scenario.
    #[arg(long, default_value_t = 3)]
    failures: usize,
    /// Migrations out of (and into) one host at once.
    #[arg(long, default_value_t = 2)]
    per_host: u32,
    /// Migrations in the whole cluster at once.
    #[arg(long, default_value_t = 64)]
    per_cluster: u32,
    /// How often the controller polls each agent, ms (its default is 500; a large
    /// cluster's long simulations go faster with less frequent polls).
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
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
    let mut cfg = SimConfig::new(a.scenario, a.hosts, a.vms, cost, walkabout_sim::scenario::scratch_dir(&tag));
    cfg.rack_size = a.rack_size;
    cfg.drain_hosts = a.drain_hosts;
    cfg.failures = a.failures;
    cfg.limits.per_host_out = a.per_host;
    cfg.limits.per_host_in = a.per_host;
    cfg.limits.planner_parallel_per_host = a.per_host;
    cfg.limits.per_cluster = a.per_cluster;
    cfg.seed = a.seed;
    cfg.poll_ms = a.poll_ms;
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
