//! `walkabout host`: what a host offers (from its agent); the cluster's hosts and their
//! maintenance (from the controller).

use super::client::{print_json, runtime, Client, Output};
use super::table::{clean, num, Align, Table};
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
    /// List the cluster's hosts: up or down (since when, why), maintenance, memory, VMs.
    List(super::cluster::CtlArgs),
    /// Put a host in maintenance and move its VMs elsewhere, following the plan; refused
    /// up front, with each VM and why, when they do not fit elsewhere.
    Drain(HostAction),
    /// Take a host out of maintenance (cancels its drain if one runs).
    Undrain(HostAction),
}

/// A command on one host of the cluster.
#[derive(clap::Args)]
pub struct HostAction {
    #[command(flatten)]
    ctl: super::cluster::CtlArgs,
    /// The host's name (`walkabout host list`).
    host: String,
    /// Return once the drain runs instead of following it.
    #[arg(long)]
    no_wait: bool,
}

/// Runs `walkabout host ...`.
pub fn run(cmd: HostCommand) -> anyhow::Result<ExitCode> {
    let (agent, output) = match cmd {
        HostCommand::Info { agent, output } => (agent, output),
        HostCommand::List(c) => return runtime()?.block_on(list(c)),
        HostCommand::Drain(a) => return runtime()?.block_on(drain(a)),
        HostCommand::Undrain(a) => return runtime()?.block_on(undrain(a)),
    };
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

async fn list(c: super::cluster::CtlArgs) -> anyhow::Result<ExitCode> {
    let hosts = super::cluster::Ctl::new(&c.controller)?.get("/v1/hosts").await?;
    match c.output {
        Output::Json => print_json(&hosts)?,
        Output::Text => {
            let mut t = Table::new(&[
                ("NAME", Align::Left),
                ("STATUS", Align::Left),
                ("MAINT", Align::Left),
                ("CAPACITY", Align::Right),
                ("FREE", Align::Right),
                ("URL", Align::Left),
                ("VMS", Align::Left),
            ]);
            let mut down = vec![];
            for h in hosts.as_array().into_iter().flatten() {
                let text = |x: &Value| x.as_str().unwrap_or("?").to_string();
                let vms: Vec<&str> = h["vms"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                t.row([
                    text(&h["name"]),
                    text(&h["status"]),
                    text(&h["maintenance"]),
                    format!("{}M", num(&h["capacity_mib"])),
                    format!("{}M", num(&h["free_mib"])),
                    text(&h["url"]),
                    vms.join(","),
                ]);
                if let Some(r) = h["down_reason"].as_str() {
                    down.push(format!(
                        "{} down since {} ms after the epoch: {}",
                        clean(&text(&h["name"])),
                        num(&h["status_since_ms"]),
                        clean(r)
                    ));
                }
            }
            t.print();
            for d in down {
                println!("{d}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn drain(a: HostAction) -> anyhow::Result<ExitCode> {
    let ctl = super::cluster::Ctl::new(&a.ctl.controller)?;
    match ctl.post(&format!("/v1/hosts/{}/drain", a.host), None).await {
        Ok(plan) => super::cluster::finish(&ctl, plan, &a.ctl, a.no_wait).await,
        Err(e) => super::cluster::print_refusal(&e, a.ctl.output),
    }
}

async fn undrain(a: HostAction) -> anyhow::Result<ExitCode> {
    let h = super::cluster::Ctl::new(&a.ctl.controller)?.post(&format!("/v1/hosts/{}/undrain", a.host), None).await?;
    match a.ctl.output {
        Output::Json => print_json(&h)?,
        Output::Text => println!("host {} is {}", a.host, h["maintenance"].as_str().unwrap_or("?")),
    }
    Ok(ExitCode::SUCCESS)
}
