//! The simulator without the CLI around it, for profiling and the bench's long runs in a
//! release build of this crate alone: `cargo run --release -p walkabout-sim --example
//! simrun -- SCENARIO HOSTS VMS POLL_MS [DRAIN_HOSTS|HOURS] [PER_HOST] [OUT.json]`.
//! Writes the JSON report (and its SVG beside it) to OUT, or prints the JSON.

use std::path::PathBuf;
use walkabout_sim::scenario::scratch_dir;
use walkabout_sim::{CostModel, DayConfig, Scenario, SimConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Progress lines (and the controller's warnings) on stderr; `RUST_LOG` overrides.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,walkabout_sim=info"));
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let scenario: Scenario = arg(0).unwrap_or("rolling").parse()?;
    let hosts: usize = arg(1).unwrap_or("1000").parse()?;
    let vms: usize = arg(2).unwrap_or("20000").parse()?;
    let poll_ms: u64 = arg(3).unwrap_or("500").parse()?;
    let fifth: Option<u64> = arg(4).filter(|s| *s != "-").map(str::parse).transpose()?;
    let per_host: u32 = arg(5).unwrap_or("4").parse()?;
    let out: Option<PathBuf> = arg(6).map(PathBuf::from);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cost = CostModel::fit(&std::fs::read_to_string(root.join("bench/results/migrate.json"))?)?;
    let (json, svg) = if scenario == Scenario::Day {
        let mut cfg = DayConfig::new(hosts, vms, cost, scratch_dir("day"));
        cfg.cluster.poll_ms = poll_ms;
        cfg.cluster.limits.per_host_out = per_host;
        cfg.cluster.limits.per_host_in = per_host;
        cfg.cluster.limits.planner_parallel_per_host = per_host;
        if let Some(h) = fifth {
            cfg.hours = h;
        }
        let r = walkabout_sim::run_day(cfg)?;
        (serde_json::to_string_pretty(&r)?, walkabout_sim::plot::day_svg(&r))
    } else {
        let mut cfg = SimConfig::new(scenario, hosts, vms, cost, scratch_dir("run"));
        cfg.poll_ms = poll_ms;
        cfg.drain_hosts = fifth.map(usize::try_from).transpose()?;
        cfg.limits.per_host_out = per_host;
        cfg.limits.per_host_in = per_host;
        cfg.limits.planner_parallel_per_host = per_host;
        let r = walkabout_sim::run(cfg)?;
        eprintln!(
            "{} drains ({} drained), {} migrations, {:.0} simulated s in {:.1} s real (setup {:.1} s); plan median {:.1} ms; peak RSS {:.0} MiB; CPU {:.1} s",
            r.drains.len(),
            r.drains.iter().filter(|d| d.outcome == "drained").count(),
            r.migrations.get("completed").copied().unwrap_or(0),
            r.simulated_s,
            r.wall_s,
            r.setup_wall_s,
            r.plan_latency_ms.median,
            r.max_rss_mib,
            r.cpu_s
        );
        (serde_json::to_string_pretty(&r)?, walkabout_sim::plot::svg(&r))
    };
    match out {
        Some(p) => {
            std::fs::write(&p, json + "\n")?;
            std::fs::write(p.with_extension("svg"), svg)?;
        }
        None => println!("{json}"),
    }
    Ok(())
}
