//! `walkabout cpu`: CPU models across hosts.

use super::client::{self, print_json, runtime, Output};
use serde_json::json;
use std::process::ExitCode;
use walkabout_qemu::cpu::{baseline, CpuCatalog};

/// `walkabout cpu ...`
#[derive(clap::Subcommand)]
pub enum CpuCommand {
    /// The cluster baseline (like vMotion's EVC): the most capable named CPU model every
    /// given host can run. VMs created with it can live-migrate to any of them.
    Baseline {
        /// An agent's URL; give one per host.
        #[arg(long = "agent", required = true)]
        agents: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// Runs `walkabout cpu ...`.
pub fn run(cmd: CpuCommand) -> anyhow::Result<ExitCode> {
    let CpuCommand::Baseline { agents, output } = cmd;
    runtime()?.block_on(async move {
        let mut catalogs: Vec<CpuCatalog> = vec![];
        for a in &agents {
            // The client's errors name the agent.
            catalogs.push(client::agent(a)?.cpu().await?);
        }
        let Some((model, common)) = baseline(&catalogs) else {
            anyhow::bail!("no named CPU model runs on all {} hosts", agents.len());
        };
        let features = catalogs[0].models.get(&model).map(|f| f.len()).unwrap_or(0);
        match output {
            Output::Json => print_json(&json!({
                "model": model, "model_features": features, "common_features": common.len(),
                "hosts": agents.iter().zip(&catalogs).map(|(a, c)| json!({"agent": a, "ceiling": c.ceiling, "features": c.ceiling_features.len()})).collect::<Vec<_>>(),
            }))?,
            Output::Text => {
                println!("baseline CPU model: {model} ({features} features; the hosts share {})", common.len());
                for (a, c) in agents.iter().zip(&catalogs) {
                    println!("  {a}: ceiling {} with {} features", c.ceiling, c.ceiling_features.len());
                }
                println!("create VMs with `--cpu-model {model}` to let them move to any of these hosts");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
