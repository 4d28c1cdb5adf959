//! `walkabout vm protect|unprotect` and `walkabout failover list`: protection of VMs
//! (checkpoints shipped to a replica host, self-fencing) and what became of the VMs of
//! hosts that died, through the controller.

use super::client::{self, parse_duration_ms, print_json, runtime, Output};
use super::cluster::CtlArgs;
use super::table::{clean, num, Align, Table};
use std::process::ExitCode;
use walkabout_api::{ClusterVm, Failover, ProtectVm};

/// Arguments of `walkabout vm protect`.
#[derive(clap::Args)]
pub struct ProtectArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    /// The VM.
    vm: String,
    /// The replica host (default: the up host in service with the most free memory,
    /// never the VM's own).
    #[arg(long)]
    replica: Option<String>,
    /// Time between checkpoints (e.g. 30s, 2m).
    #[arg(long, value_parser = parse_duration_ms, default_value = "30s")]
    every: u64,
    /// Checkpoints the replica keeps.
    #[arg(long, default_value_t = 3)]
    keep: u32,
}

/// Arguments of `walkabout vm unprotect`.
#[derive(clap::Args)]
pub struct UnprotectArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    /// The VM.
    vm: String,
}

/// `walkabout failover ...`
#[derive(clap::Subcommand)]
pub enum FailoverCommand {
    /// Each VM of a host that went down: restored where (RPO, RTO), or lost and why.
    List(CtlArgs),
}

/// Runs `walkabout vm protect`.
pub async fn protect(a: ProtectArgs) -> anyhow::Result<ExitCode> {
    let req = ProtectVm { replica: a.replica, every_ms: Some(a.every), keep: Some(a.keep) };
    let vm = client::controller(&a.ctl.controller)?.protect_vm(&a.vm, &req).await?;
    show(&vm, a.ctl.output)
}

/// Runs `walkabout vm unprotect`.
pub async fn unprotect(a: UnprotectArgs) -> anyhow::Result<ExitCode> {
    let vm = client::controller(&a.ctl.controller)?.unprotect_vm(&a.vm).await?;
    show(&vm, a.ctl.output)
}

fn show(vm: &ClusterVm, output: Output) -> anyhow::Result<ExitCode> {
    match output {
        Output::Json => print_json(vm)?,
        Output::Text => match &vm.protection {
            Some(p) => println!(
                "{} on {} is protected: a checkpoint every {} s to {}, {} kept; fenced after {} s without the controller",
                clean(&vm.name),
                clean(vm.host.as_deref().unwrap_or("-")),
                p.every_ms as f64 / 1000.0,
                clean(&p.replica),
                p.keep,
                p.fence_ms as f64 / 1000.0
            ),
            None => println!("{} is not protected", clean(&vm.name)),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `walkabout failover ...`.
pub fn run(cmd: FailoverCommand) -> anyhow::Result<ExitCode> {
    let FailoverCommand::List(ctl) = cmd;
    runtime()?.block_on(async move {
        let list = client::controller(&ctl.controller)?.failovers().await?;
        match ctl.output {
            Output::Json => print_json(&list)?,
            Output::Text => table(&list).print(),
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn table(list: &[Failover]) -> Table {
    let mut t = Table::new(&[
        ("ID", Align::Left),
        ("VM", Align::Left),
        ("FROM", Align::Left),
        ("TO", Align::Left),
        ("RESULT", Align::Left),
        ("CHECKPOINT", Align::Left),
        ("RPO MS", Align::Right),
        ("RTO MS", Align::Right),
        ("REASON", Align::Left),
    ]);
    for f in list {
        let result = serde_json::to_value(f.result).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        t.row([
            clean(&f.id).into_owned(),
            clean(&f.vm).into_owned(),
            clean(&f.from).into_owned(),
            clean(f.to.as_deref().unwrap_or("-")).into_owned(),
            result,
            clean(f.checkpoint.as_deref().unwrap_or("-")).into_owned(),
            num(f.rpo_ms),
            num(f.rto_ms),
            clean(f.reason.as_deref().unwrap_or("")).into_owned(),
        ]);
    }
    t
}
