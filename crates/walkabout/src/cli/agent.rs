//! `walkabout agent`: the host daemon.

use std::process::ExitCode;

/// Arguments of `walkabout agent`.
#[derive(clap::Args)]
pub struct AgentArgs {}

/// Runs the agent until it is stopped.
pub fn run(_args: AgentArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
