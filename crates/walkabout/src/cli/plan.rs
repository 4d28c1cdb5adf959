//! `walkabout plan`: the offline migration path planner.

use std::process::ExitCode;

/// Arguments of `walkabout plan`.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// The case file (hosts, VMs, current and target placement).
    case: std::path::PathBuf,
}

/// Runs `walkabout plan`.
pub fn run(_args: PlanArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
