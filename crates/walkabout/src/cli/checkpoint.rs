//! `walkabout vm checkpoint|restore`, `walkabout checkpoint list|info|delete` and
//! `walkabout replica list|info|restore`: checkpoints of running VMs on one agent, and
//! what an agent holds as a replica of another host's VMs.

use super::client::{self, print_json, runtime, Output};
use super::table::{clean, Align, Table};
use std::process::ExitCode;
use std::time::Duration;
use walkabout_api::{AgentClient, Checkpoint, CheckpointMethod, CheckpointRequest, ReplicaState, RestoreReply, RestoreRequest};

/// Longest a checkpoint (with its shipment) or a restore may take.
const SLOW: Duration = Duration::from_secs(600);

/// Which agent, and how to print.
#[derive(clap::Args)]
pub struct AgentArg {
    /// The agent's URL.
    #[arg(long, env = "WALKABOUT_AGENT", default_value = super::vm::DEFAULT_AGENT)]
    agent: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Arguments of `walkabout vm checkpoint`.
#[derive(clap::Args)]
pub struct CheckpointArgs {
    #[command(flatten)]
    common: AgentArg,
    /// The VM.
    vm: String,
    /// How its memory is written: live (pre-copy, paused for the last pass), background
    /// (QEMU's background-snapshot) or paused (the whole write).
    #[arg(long, default_value = "live")]
    method: CheckpointMethod,
    /// Ship it to this agent afterwards (only what that agent lacks).
    #[arg(long, value_name = "URL")]
    ship_to: Option<String>,
}

/// Arguments of `walkabout vm restore`.
#[derive(clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    common: AgentArg,
    /// The checkpoint (`walkabout checkpoint list`), held by that agent.
    checkpoint: String,
    /// The restored VM's name (default: the checkpoint's VM).
    #[arg(long)]
    name: Option<String>,
}

/// `walkabout checkpoint ...`
#[derive(clap::Subcommand)]
pub enum CheckpointCommand {
    /// Checkpoints an agent holds: taken there, and received as a replica.
    List(AgentArg),
    /// One checkpoint, with its files.
    Info(Id),
    /// Forget a checkpoint taken on the agent (its memory file goes).
    Delete(Id),
}

/// A checkpoint id on an agent.
#[derive(clap::Args)]
pub struct Id {
    #[command(flatten)]
    common: AgentArg,
    /// The checkpoint id (`VM.N`).
    id: String,
}

/// `walkabout replica ...`
#[derive(clap::Subcommand)]
pub enum ReplicaCommand {
    /// The VMs an agent holds replicas of, with their checkpoints.
    List(AgentArg),
    /// Start a VM on the agent from its newest replica checkpoint that verifies (newer
    /// ones that fail their checksums are passed over, and listed).
    Restore(ReplicaRestoreArgs),
}

/// Arguments of `walkabout replica restore`.
#[derive(clap::Args)]
pub struct ReplicaRestoreArgs {
    #[command(flatten)]
    common: AgentArg,
    /// The VM whose replica to restore.
    vm: String,
    /// The restored VM's name (default: the VM's).
    #[arg(long)]
    name: Option<String>,
}

fn slow(url: &str) -> anyhow::Result<AgentClient> {
    Ok(client::agent(url)?.with_timeout(SLOW))
}

/// Runs `walkabout vm checkpoint`.
pub fn take(a: CheckpointArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let req = CheckpointRequest { method: Some(a.method), ship_to: a.ship_to };
        let ck = slow(&a.common.agent)?.checkpoint(&a.vm, &req).await?;
        match a.common.output {
            Output::Json => print_json(&ck)?,
            Output::Text => {
                let shipped = ck.shipped_bytes.map(|b| format!(", shipped {}", mib(b))).unwrap_or_default();
                println!(
                    "checkpoint {} of {}: {} method, guest paused {} ms, {} ms in all, {} files ({} of data){shipped}",
                    clean(&ck.id),
                    clean(&ck.vm),
                    ck.method,
                    ck.pause_ms,
                    ck.total_ms,
                    ck.files.len(),
                    mib(ck.files.iter().map(|f| f.data_bytes).sum())
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs `walkabout vm restore`.
pub fn restore(a: RestoreArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let r = slow(&a.common.agent)?.restore_checkpoint(&a.checkpoint, &RestoreRequest { name: a.name }).await?;
        restored(&r, a.common.output)
    })
}

fn restored(r: &RestoreReply, output: Output) -> anyhow::Result<ExitCode> {
    match output {
        Output::Json => print_json(r)?,
        Output::Text => {
            for s in &r.skipped {
                println!("skipped {}", clean(s));
            }
            println!(
                "restored {} from checkpoint {} in {} ms (heartbeat continues after {})",
                clean(&r.vm.record.spec.name),
                clean(&r.checkpoint.id),
                r.restore_ms,
                r.checkpoint.guest.last_seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn table(cks: &[Checkpoint]) -> Table {
    let mut t = Table::new(&[
        ("ID", Align::Left),
        ("VM", Align::Left),
        ("HOST", Align::Left),
        ("METHOD", Align::Left),
        ("PAUSE_MS", Align::Right),
        ("FILES", Align::Right),
        ("DATA", Align::Right),
        ("SHIPPED", Align::Right),
        ("PROBLEM", Align::Left),
    ]);
    for c in cks {
        t.row([
            clean(&c.id).into_owned(),
            clean(&c.vm).into_owned(),
            clean(&c.host).into_owned(),
            c.method.to_string(),
            c.pause_ms.to_string(),
            c.files.len().to_string(),
            mib(c.files.iter().map(|f| f.data_bytes).sum()),
            c.shipped_bytes.map(mib).unwrap_or_else(|| "-".into()),
            c.problem.as_deref().map(|p| clean(p).into_owned()).unwrap_or_else(|| "-".into()),
        ]);
    }
    t
}

/// Runs `walkabout checkpoint ...`.
pub fn run(cmd: CheckpointCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match cmd {
            CheckpointCommand::List(a) => {
                let cks = client::agent(&a.agent)?.checkpoints().await?;
                match a.output {
                    Output::Json => print_json(&cks)?,
                    Output::Text => table(&cks).print(),
                }
            }
            CheckpointCommand::Info(i) => {
                let ck = client::agent(&i.common.agent)?.checkpoint_info(&i.id).await?;
                match i.common.output {
                    Output::Json => print_json(&ck)?,
                    Output::Text => {
                        table(std::slice::from_ref(&ck)).print();
                        let mut t = Table::new(&[
                            ("FILE", Align::Left),
                            ("KIND", Align::Left),
                            ("BACKING", Align::Left),
                            ("SIZE", Align::Right),
                            ("DATA", Align::Right),
                        ]);
                        for f in &ck.files {
                            let kind = serde_json::to_value(f.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
                            t.row([
                                clean(&f.name).into_owned(),
                                kind,
                                f.backing.clone().unwrap_or_else(|| "-".into()),
                                mib(f.bytes),
                                mib(f.data_bytes),
                            ]);
                        }
                        t.print();
                    }
                }
            }
            CheckpointCommand::Delete(i) => {
                client::agent(&i.common.agent)?.delete_checkpoint(&i.id).await?;
                match i.common.output {
                    Output::Json => print_json(&serde_json::json!({"deleted": i.id}))?,
                    Output::Text => println!("deleted {}", clean(&i.id)),
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn replica_table(rs: &[ReplicaState]) -> Table {
    let mut t = Table::new(&[
        ("VM", Align::Left),
        ("CHECKPOINTS", Align::Left),
        ("NEWEST_MS", Align::Right),
        ("FILES", Align::Right),
        ("DATA", Align::Right),
    ]);
    for r in rs {
        let ids: Vec<&str> = r.checkpoints.iter().map(|c| c.id.as_str()).collect();
        t.row([
            clean(&r.vm).into_owned(),
            clean(&ids.join(" ")).into_owned(),
            r.checkpoints.last().map(|c| c.taken_ms.to_string()).unwrap_or_else(|| "-".into()),
            r.files.len().to_string(),
            mib(r.files.iter().map(|f| f.data_bytes).sum()),
        ]);
    }
    t
}

/// Runs `walkabout replica ...`.
pub fn run_replica(cmd: ReplicaCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match cmd {
            ReplicaCommand::List(a) => {
                let rs = client::agent(&a.agent)?.replicas().await?;
                match a.output {
                    Output::Json => print_json(&rs)?,
                    Output::Text => replica_table(&rs).print(),
                }
                Ok(ExitCode::SUCCESS)
            }
            ReplicaCommand::Restore(a) => {
                let r = slow(&a.common.agent)?.restore_replica(&a.vm, &RestoreRequest { name: a.name }).await?;
                restored(&r, a.common.output)
            }
        }
    })
}
