//! `walkabout vm`: VMs on an agent.

use std::process::ExitCode;

/// `walkabout vm ...`
#[derive(clap::Subcommand)]
pub enum VmCommand {
    /// List VMs.
    List,
}

/// Runs `walkabout vm ...`.
pub fn run(_cmd: VmCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
