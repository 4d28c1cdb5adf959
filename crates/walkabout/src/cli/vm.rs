//! `walkabout vm`: create, inspect and control VMs on an agent.

use super::client::{parse_mib, print_json, runtime, Client, Output};
use super::table::{clean, num, Align, Table};
use anyhow::Context;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Which agent, and how to print.
#[derive(clap::Args)]
pub struct Common {
    /// The agent's URL.
    #[arg(long, env = "WALKABOUT_AGENT", default_value = "http://127.0.0.1:7701")]
    agent: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// A command on one named VM.
#[derive(clap::Args)]
pub struct Named {
    #[command(flatten)]
    common: Common,
    /// The VM's name.
    name: String,
}

/// `walkabout vm ...`
#[derive(clap::Subcommand)]
pub enum VmCommand {
    /// Create and start a VM; waits until its guest is ready unless --no-wait.
    Create(CreateArgs),
    /// List the agent's VMs.
    List(Common),
    /// Show one VM, with what its guest reports.
    Info(Named),
    /// Pause a VM's vCPUs.
    Pause(Named),
    /// Resume a paused VM.
    Resume(Named),
    /// Stop a VM (its QEMU exits; the record stays).
    Stop(Named),
    /// Delete a VM (stopping it first).
    Delete(Named),
    /// Print a VM's serial console.
    Console(ConsoleArgs),
    /// Move a VM to another host of the cluster (through the controller: a plan with
    /// its reason, executed with the cluster's limits), following it to its end.
    Move(MoveArgs),
}

/// Arguments of `walkabout vm move`.
#[derive(clap::Args)]
pub struct MoveArgs {
    #[command(flatten)]
    ctl: super::cluster::CtlArgs,
    /// The VM.
    vm: String,
    /// The host to move it to (`walkabout host list`).
    #[arg(long)]
    to: String,
    /// Return once the move runs instead of following it.
    #[arg(long)]
    no_wait: bool,
}

/// Arguments of `walkabout vm create`.
#[derive(clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    common: Common,
    /// The VM's name, unique on the agent.
    #[arg(long)]
    name: String,
    /// Guest memory (e.g. 512M, 2G).
    #[arg(long, value_parser = parse_mib, default_value = "512M")]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// In-guest workload: `idle` or `dirty:<MiB>:<MiB/s>`.
    #[arg(long, default_value = "idle")]
    workload: String,
    /// QEMU CPU model (default: qemu64, runnable everywhere).
    #[arg(long)]
    cpu_model: Option<String>,
    /// Kernel to boot instead of the agent's default guest image.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs, with --kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments.
    #[arg(long)]
    cmdline: Option<String>,
    /// Return as soon as QEMU runs, without waiting for the guest to be ready.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the guest to be ready.
    #[arg(long, default_value = "180", value_name = "SECONDS")]
    timeout: u64,
}

/// Arguments of `walkabout vm console`.
#[derive(clap::Args)]
pub struct ConsoleArgs {
    #[command(flatten)]
    named: Named,
    /// Keep printing new output until interrupted.
    #[arg(long, short)]
    follow: bool,
}

/// Runs `walkabout vm ...`.
pub fn run(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match cmd {
            VmCommand::Create(a) => create(a).await,
            VmCommand::List(c) => {
                let vms: Vec<Value> = Client::new(&c.agent)?.get("/v1/vms").await?;
                match c.output {
                    Output::Json => print_json(&vms)?,
                    Output::Text => print_table(&vms),
                }
                Ok(ExitCode::SUCCESS)
            }
            VmCommand::Info(n) => one(n, |c, name| async move { c.get(&format!("/v1/vms/{name}")).await }).await,
            VmCommand::Pause(n) => one(n, |c, name| async move { c.post(&format!("/v1/vms/{name}/pause"), None).await }).await,
            VmCommand::Resume(n) => one(n, |c, name| async move { c.post(&format!("/v1/vms/{name}/resume"), None).await }).await,
            VmCommand::Stop(n) => one(n, |c, name| async move { c.post(&format!("/v1/vms/{name}/stop"), None).await }).await,
            VmCommand::Delete(n) => {
                Client::new(&n.common.agent)?.delete(&format!("/v1/vms/{}", n.name)).await?;
                match n.common.output {
                    Output::Json => print_json(&json!({"deleted": n.name}))?,
                    Output::Text => println!("deleted {}", n.name),
                }
                Ok(ExitCode::SUCCESS)
            }
            VmCommand::Console(a) => console(a).await,
            VmCommand::Move(a) => {
                let ctl = super::cluster::Ctl::new(&a.ctl.controller)?;
                match ctl.post(&format!("/v1/vms/{}/move", a.vm), Some(json!({"to": a.to}))).await {
                    Ok(plan) => super::cluster::finish(&ctl, plan, &a.ctl, a.no_wait).await,
                    Err(e) => super::cluster::print_refusal(&e, a.ctl.output),
                }
            }
        }
    })
}

async fn one<F, Fut>(n: Named, f: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Client, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Value>>,
{
    let v = f(Client::new(&n.common.agent)?, n.name).await?;
    match n.common.output {
        Output::Json => print_json(&v)?,
        Output::Text => print_vm(&v),
    }
    Ok(ExitCode::SUCCESS)
}

async fn create(a: CreateArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&a.common.agent)?;
    let mut spec = json!({
        "name": a.name, "memory_mib": a.memory, "vcpus": a.vcpus, "workload": a.workload,
    });
    for (k, v) in [("cpu_model", a.cpu_model.map(Value::from)), ("cmdline", a.cmdline.map(Value::from))] {
        if let Some(v) = v {
            spec[k] = v;
        }
    }
    let custom_kernel = a.kernel.is_some();
    for (k, v) in [("kernel", a.kernel), ("initrd", a.initrd)] {
        if let Some(p) = v {
            let abs = std::fs::canonicalize(&p).with_context(|| format!("{k} {}", p.display()))?;
            spec[k] = Value::from(abs.display().to_string());
        }
    }
    let start = Instant::now();
    let mut vm: Value = client.post("/v1/vms", Some(&spec)).await?;
    // Only the Walkabout guest says READY; a custom kernel is done when QEMU runs.
    if !a.no_wait && !custom_kernel {
        vm = wait_ready(&client, &a.name, Duration::from_secs(a.timeout)).await?;
    }
    let elapsed_ms = start.elapsed().as_millis();
    match a.common.output {
        Output::Json => {
            vm["create_ms"] = Value::from(u64::try_from(elapsed_ms).unwrap_or(u64::MAX));
            print_json(&vm)?
        }
        Output::Text => {
            print_vm(&vm);
            println!("ready in {elapsed_ms} ms");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_ready(client: &Client, name: &str, timeout: Duration) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let vm: Value = client.get(&format!("/v1/vms/{name}")).await?;
        if vm["guest"]["ready"] == true {
            return Ok(vm);
        }
        if vm["state"] == "stopped" {
            anyhow::bail!("VM {name} stopped before its guest was ready: {}", vm["reason"].as_str().unwrap_or("no reason"));
        }
        if let Some(alert) = vm["guest"]["alerts"].as_array().and_then(|a| a.first()) {
            if vm["guest"]["kernel_trouble"] == true {
                anyhow::bail!("VM {name}'s kernel failed while booting: {alert}");
            }
        }
        if start.elapsed() > timeout {
            anyhow::bail!("VM {name} runs but its guest was not ready after {} s (see `walkabout vm console {name}`)", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn console(a: ConsoleArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&a.named.common.agent)?;
    let mut offset = 0u64;
    loop {
        let chunk: Value = client.get(&format!("/v1/vms/{}/console?offset={offset}", a.named.name)).await?;
        let text = chunk["text"].as_str().unwrap_or("");
        match a.named.common.output {
            Output::Json if !a.follow => {
                print_json(&chunk)?;
                return Ok(ExitCode::SUCCESS);
            }
            _ => print!("{text}"),
        }
        offset = chunk["next"].as_u64().unwrap_or(offset);
        if !a.follow {
            return Ok(ExitCode::SUCCESS);
        }
        if text.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn print_table(vms: &[Value]) {
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("STATE", Align::Left),
        ("MEMORY", Align::Right),
        ("VCPUS", Align::Right),
        ("WORKLOAD", Align::Left),
        ("HB", Align::Right),
        ("CORRUPT", Align::Right),
    ]);
    for v in vms {
        let text = |x: &Value| x.as_str().unwrap_or("?").to_string();
        t.row([
            text(&v["spec"]["name"]),
            text(&v["state"]),
            format!("{}M", num(&v["spec"]["memory_mib"])),
            num(&v["spec"]["vcpus"]),
            text(&v["spec"]["workload"]),
            num(&v["guest"]["last_seq"]),
            num(&v["guest"]["corrupt_pages"]),
        ]);
    }
    t.print();
}

fn print_vm(v: &Value) {
    let g = &v["guest"];
    println!("name:      {}", clean(v["spec"]["name"].as_str().unwrap_or("?")));
    println!(
        "state:     {}{}",
        clean(v["state"].as_str().unwrap_or("?")),
        v["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default()
    );
    println!(
        "memory:    {} MiB, {} vCPU(s), cpu model {}",
        v["spec"]["memory_mib"],
        v["spec"]["vcpus"],
        clean(v["spec"]["cpu_model"].as_str().unwrap_or("qemu64"))
    );
    println!("accel:     {}   pid: {}", clean(v["accel"].as_str().unwrap_or("?")), v["pid"]);
    println!("workload:  {}", clean(v["spec"]["workload"].as_str().unwrap_or("?")));
    println!(
        "guest:     ready={} cpus={} heartbeats={} last_seq={} corrupt_pages={} kernel_trouble={}",
        g["ready"], g["cpus"], g["heartbeats"], g["last_seq"], g["corrupt_pages"], g["kernel_trouble"]
    );
    if let Some(alerts) = g["alerts"].as_array() {
        for a in alerts {
            println!("alert:     {}", a.as_str().unwrap_or(""));
        }
    }
}
