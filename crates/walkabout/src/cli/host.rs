//! `walkabout host`: what a host offers.

use super::client::{print_json, runtime, Client, Output};
use serde_json::Value;
use std::process::ExitCode;

/// `walkabout host ...`
#[derive(clap::Subcommand)]
pub enum HostCommand {
    /// Show an agent's host: memory, CPUs, CPU model, accelerator (and why), QEMU.
    Info {
        /// The agent's URL.
        #[arg(long, env = "WALKABOUT_AGENT", default_value = "http://127.0.0.1:7701")]
        agent: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// Runs `walkabout host ...`.
pub fn run(cmd: HostCommand) -> anyhow::Result<ExitCode> {
    let HostCommand::Info { agent, output } = cmd;
    runtime()?.block_on(async move {
        let h: Value = Client::new(&agent)?.get("/v1/host").await?;
        match output {
            Output::Json => print_json(&h)?,
            Output::Text => {
                println!("host:     {}", h["hostname"].as_str().unwrap_or("?"));
                println!("cpu:      {} x {}", h["cpus"], h["cpu_model"].as_str().unwrap_or("?"));
                println!(
                    "memory:   {} MiB total, {} MiB for VMs, {} MiB used, {} MiB free ({} VMs)",
                    h["memory_total_mib"], h["capacity_mib"], h["used_mib"], h["free_mib"], h["vms"]
                );
                println!("accel:    {} ({})", h["accel"]["accel"].as_str().unwrap_or("?"), h["accel"]["reason"].as_str().unwrap_or(""));
                println!("qemu:     {}", h["qemu"]["banner"].as_str().unwrap_or("?"));
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
