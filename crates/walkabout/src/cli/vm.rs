//! `walkabout vm`: create, inspect and control VMs on an agent; list and show the
//! cluster's VMs through the controller.

use super::client::{self, parse_mib, print_json, runtime, Output};
use super::cluster::DEFAULT_CONTROLLER;
use super::table::{clean, num, Align, Table};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use walkabout_api::{AgentClient, ClusterVm, ControllerClient, DiskSpec, VmInfo, VmSpec, VmState};

/// The agent asked when none is named.
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:7701";

/// Longest wait for the default controller before asking the default agent instead.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How `vm list` and `vm info` choose whom to ask (shown in their `--help`).
const TARGET_HELP: &str = "Whom it asks: with --agent URL (or $WALKABOUT_AGENT), that agent, about its own VMs; \
else with --controller URL (or $WALKABOUT_CONTROLLER), that controller, about the cluster's VMs and their hosts; \
else the controller at http://127.0.0.1:7700 if it answers; else the agent at http://127.0.0.1:7701 \
(a line on stderr says so).";

/// Which agent, and how to print.
#[derive(clap::Args)]
pub struct Common {
    /// The agent's URL.
    #[arg(long, env = "WALKABOUT_AGENT", default_value = DEFAULT_AGENT)]
    agent: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// An agent or the cluster's controller, and how to print (`vm list`, `vm info`).
#[derive(clap::Args)]
pub struct Target {
    /// Ask this agent only: its own VMs, with their full records.
    #[arg(long, env = "WALKABOUT_AGENT")]
    agent: Option<String>,
    /// Ask this controller: the cluster's VMs and the host each runs on (default: the
    /// controller at http://127.0.0.1:7700 if it answers).
    #[arg(long, env = "WALKABOUT_CONTROLLER")]
    controller: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// `vm info` on an agent or on the cluster.
#[derive(clap::Args)]
pub struct TargetNamed {
    #[command(flatten)]
    target: Target,
    /// The VM's name.
    name: String,
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
    Create(Box<CreateArgs>),
    /// List VMs: the cluster's, with their hosts, or one agent's.
    #[command(after_help = TARGET_HELP)]
    List(Target),
    /// Show one VM, with what its guest reports (and its host, from the controller).
    #[command(after_help = TARGET_HELP)]
    Info(TargetNamed),
    /// Pause a VM's vCPUs.
    Pause(Named),
    /// Resume a paused VM.
    Resume(Named),
    /// Stop a VM (its QEMU exits; the record stays).
    Stop(Named),
    /// Start a stopped VM again from its record (its disks and NICs as created).
    Start(Named),
    /// Delete a VM (stopping it first).
    Delete(Named),
    /// Protect a VM (through the controller): a checkpoint every --every shipped to a
    /// replica host; if its host dies it runs again there. Its agent stops it by itself
    /// when it loses the controller for the fence time.
    Protect(super::failover::ProtectArgs),
    /// Stop protecting a VM.
    Unprotect(super::failover::UnprotectArgs),
    /// Print a VM's serial console.
    Console(ConsoleArgs),
    /// Move a VM to another host of the cluster (through the controller: a plan with
    /// its reason, executed with the cluster's limits), following it to its end.
    Move(MoveArgs),
    /// Checkpoint a running VM: memory, devices and disks at one instant (the VM runs on
    /// in new disk overlays); optionally shipped to another agent.
    Checkpoint(super::checkpoint::CheckpointArgs),
    /// Start a VM from a checkpoint the agent holds (`walkabout checkpoint list`).
    Restore(super::checkpoint::RestoreArgs),
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
    /// In-guest workload: `idle`, `dirty:<MiB>:<MiB/s>` (memory), `disk:<MiB>:<MiB/s>`
    /// (self-verifying blocks on the first disk that is not the root; it is overwritten),
    /// or both: `dirty:64:32,disk:256:16`.
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
    /// A disk (repeatable; in order, the first virtio-blk one is /dev/vda):
    /// `PATH[,format=qcow2|raw][,bus=virtio-blk|virtio-scsi]` for an image on the agent's
    /// host, `size=4G[,bus=...]` for a new qcow2 in the agent's storage directory, or
    /// `image:guest[,bus=...]` for an overlay on the Walkabout root disk (the VM boots
    /// from it).
    #[arg(long = "disk", value_name = "DISK", value_parser = parse_disk)]
    disks: Vec<DiskSpec>,
    /// Create it through this controller instead of on one agent: the planner picks
    /// its host (one that runs its CPU model, with room, keeping its groups), unless
    /// --host names one. Implied by --group (at http://127.0.0.1:7700 if not given).
    #[arg(long)]
    controller: Option<String>,
    /// With --controller: the host to create it on.
    #[arg(long, requires = "controller")]
    host: Option<String>,
    /// A placement group to join: `NAME` or `NAME:anti` (no two members on one host)
    /// or `NAME:affinity` (all members on one host). Repeat for several groups.
    #[arg(long = "group", value_name = "NAME[:affinity|anti]", value_parser = parse_group)]
    groups: Vec<walkabout_api::VmGroup>,
    /// Return as soon as QEMU runs, without waiting for the guest to be ready.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the guest to be ready (at least the global --timeout, so
    /// `vm create --timeout 300` still waits 300 s).
    #[arg(long, default_value = "180", value_name = "SECONDS")]
    ready_timeout: u64,
    /// A NIC: virtio-net on a tap joining the host bridge BR (which every host the VM
    /// may move to has); the MAC is pinned at creation (chosen by the agent unless given)
    /// and the guest sets its own address if one is given. Repeatable.
    #[arg(long, value_parser = parse_nic, value_name = "bridge=BR[,mac=52:54:00:..][,address=10.77.0.12/24]")]
    nic: Vec<walkabout_api::NicSpec>,
    /// Free will: the guest may ask to move (`walk any`, `walk least-loaded`,
    /// `walk HOST` on its virtio-serial port `org.walkabout.0`) and is answered. The
    /// Walkabout guest asks on its own with `--cmdline 'walkabout.will=any,h3'`.
    #[arg(long)]
    free_will: bool,
}

/// Parses `--disk`: `PATH[,format=F][,bus=B]`, `size=SIZE[,bus=B]` or `image:NAME[,bus=B]`.
/// A relative path is made absolute against the current directory (the agent needs
/// a path on its host; it checks the image itself).
fn parse_disk(text: &str) -> Result<DiskSpec, String> {
    let mut parts = text.split(',');
    let first = parts.next().unwrap_or_default();
    let mut disk = DiskSpec { path: None, format: None, size_bytes: None, bus: Default::default() };
    let mut options: Vec<&str> = parts.collect();
    // An absolute path or a catalog image may contain '=' (`/srv/a=b.qcow2`).
    let is_path = first.starts_with('/') || first.starts_with(walkabout_agent::disks::CATALOG_PREFIX);
    if first.contains('=') && !is_path {
        options.insert(0, first);
    } else if first.is_empty() {
        return Err(format!("disk '{text}': give a path, image:NAME or size=SIZE"));
    } else if first.starts_with(walkabout_agent::disks::CATALOG_PREFIX) || Path::new(first).is_absolute() {
        disk.path = Some(PathBuf::from(first));
    } else {
        let cwd = std::env::current_dir().map_err(|e| format!("disk '{text}': cannot make the path absolute: {e}"))?;
        disk.path = Some(cwd.join(first));
    }
    for option in options {
        let (key, value) = option.split_once('=').ok_or_else(|| format!("disk '{text}': '{option}' is not key=value"))?;
        match key {
            "format" => disk.format = Some(value.parse().map_err(|e| format!("disk '{text}': {e}"))?),
            "bus" => disk.bus = value.parse().map_err(|e| format!("disk '{text}': {e}"))?,
            "size" => {
                let mib = parse_mib(value).map_err(|e| format!("disk '{text}': {e}"))?;
                disk.size_bytes = Some(mib.checked_mul(1 << 20).ok_or_else(|| format!("disk '{text}': size too large"))?);
            }
            other => return Err(format!("disk '{text}': unknown option '{other}' (format, bus or size)")),
        }
    }
    match (&disk.path, disk.size_bytes) {
        (Some(_), Some(_)) => Err(format!("disk '{text}': give a path or a size, not both")),
        (None, None) => Err(format!("disk '{text}': give a path, image:NAME or size=SIZE")),
        (None, Some(_)) if disk.format == Some(walkabout_api::DiskFormat::Raw) => {
            Err(format!("disk '{text}': a new disk is a qcow2 (format=raw only for an image you bring)"))
        }
        _ => Ok(disk),
    }
}

/// The disks of a VM, one line each.
fn disks_text(disks: &[DiskSpec]) -> String {
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let path = d.path.as_ref().map_or_else(|| "(new)".to_owned(), |p| clean(&p.display().to_string()).into_owned());
            let format = d.format.map_or_else(|| "?".to_owned(), |f| f.to_string());
            format!("disk {i}:    {path} ({format}, {})\n", d.bus)
        })
        .collect()
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
    let cmd = match cmd {
        VmCommand::Checkpoint(a) => return super::checkpoint::take(a),
        VmCommand::Restore(a) => return super::checkpoint::restore(a),
        other => other,
    };
    runtime()?.block_on(async move {
        match cmd {
            VmCommand::Create(a) => create(*a).await,
            VmCommand::List(t) => list(t).await,
            VmCommand::Info(n) => info(n).await,
            VmCommand::Pause(n) => {
                let vm = client::agent(&n.common.agent)?.pause(&n.name).await?;
                show(&vm, n.common.output)
            }
            VmCommand::Resume(n) => {
                let vm = client::agent(&n.common.agent)?.resume(&n.name).await?;
                show(&vm, n.common.output)
            }
            VmCommand::Stop(n) => {
                let vm = client::agent(&n.common.agent)?.stop(&n.name).await?;
                show(&vm, n.common.output)
            }
            VmCommand::Start(n) => {
                let vm = client::agent(&n.common.agent)?.start_vm(&n.name).await?;
                show(&vm, n.common.output)
            }
            VmCommand::Delete(n) => {
                client::agent(&n.common.agent)?.delete_vm(&n.name).await?;
                match n.common.output {
                    Output::Json => print_json(&serde_json::json!({"deleted": n.name}))?,
                    Output::Text => println!("deleted {}", clean(&n.name)),
                }
                Ok(ExitCode::SUCCESS)
            }
            VmCommand::Console(a) => console(a).await,
            VmCommand::Protect(a) => super::failover::protect(a).await,
            VmCommand::Unprotect(a) => super::failover::unprotect(a).await,
            VmCommand::Move(a) => {
                let ctl = client::controller(&a.ctl.controller)?;
                match ctl.move_vm(&a.vm, &a.to).await {
                    Ok(plan) => super::cluster::finish(&ctl, plan, &a.ctl, a.no_wait).await,
                    Err(e) => super::cluster::print_refusal(&e, a.ctl.output),
                }
            }
            VmCommand::Checkpoint(_) | VmCommand::Restore(_) => unreachable!("handled above"),
        }
    })
}

/// Whom `vm list` and `vm info` ask.
enum Asked {
    /// One agent.
    Agent(AgentClient),
    /// The cluster's controller.
    Controller(ControllerClient),
}

/// Chooses whom to ask (see [`TARGET_HELP`]); `probe` asks the default controller and
/// keeps its answer, so a controller that answers is asked once.
async fn choose<T, F, Fut>(t: &Target, probe: F) -> anyhow::Result<(Asked, Option<T>)>
where
    F: FnOnce(ControllerClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, walkabout_api::ClientError>>,
{
    // An empty variable (`WALKABOUT_AGENT=`) names nothing.
    let named = |v: &Option<String>| v.clone().filter(|u| !u.trim().is_empty());
    if let Some(url) = named(&t.agent) {
        return Ok((Asked::Agent(client::agent(&url)?), None));
    }
    if let Some(url) = named(&t.controller) {
        return Ok((Asked::Controller(client::controller(&url)?), None));
    }
    let ctl = client::controller(DEFAULT_CONTROLLER)?;
    // A silent port 7700 delays the fallback by this much at most.
    let probe_timeout = client::options().request_timeout.min(PROBE_TIMEOUT);
    match probe(ctl.with_timeout(probe_timeout)).await {
        Ok(answer) => Ok((Asked::Controller(ctl), Some(answer))),
        Err(e) if e.is_transport() => {
            tracing::debug!("no controller: {e}");
            eprintln!("walkabout: no controller answered at {DEFAULT_CONTROLLER}; asking the agent at {DEFAULT_AGENT}");
            Ok((Asked::Agent(client::agent(DEFAULT_AGENT)?), None))
        }
        // A controller answered, with an error (no such VM, ...): that is the answer.
        Err(e) => Err(e.into()),
    }
}

async fn list(t: Target) -> anyhow::Result<ExitCode> {
    match choose(&t, |c| async move { c.vms().await }).await? {
        (Asked::Agent(a), _) => {
            let vms = a.vms().await?;
            match t.output {
                Output::Json => print_json(&vms)?,
                Output::Text => agent_table(&vms).print(),
            }
        }
        (Asked::Controller(c), answer) => {
            let vms = match answer {
                Some(v) => v,
                None => c.vms().await?,
            };
            match t.output {
                Output::Json => print_json(&vms)?,
                Output::Text => cluster_table(&vms).print(),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn info(n: TargetNamed) -> anyhow::Result<ExitCode> {
    let name = n.name.clone();
    match choose(&n.target, |c| async move { c.vm(&name).await }).await? {
        (Asked::Agent(a), _) => show(&a.vm(&n.name).await?, n.target.output),
        (Asked::Controller(c), answer) => {
            let vm = match answer {
                Some(v) => v,
                None => c.vm(&n.name).await?,
            };
            match n.target.output {
                Output::Json => print_json(&vm)?,
                Output::Text => print!("{}", cluster_vm_text(&vm)),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints one agent VM as asked.
fn show(vm: &VmInfo, output: Output) -> anyhow::Result<ExitCode> {
    match output {
        Output::Json => print_json(vm)?,
        Output::Text => print!("{}", vm_text(vm)),
    }
    Ok(ExitCode::SUCCESS)
}

/// What `vm create --output json` prints: the VM and how long it took to be ready.
#[derive(serde::Serialize)]
struct Created<'a> {
    #[serde(flatten)]
    vm: &'a VmInfo,
    create_ms: u64,
}

fn parse_group(s: &str) -> Result<walkabout_api::VmGroup, String> {
    s.parse()
}

/// `vm create` through the controller: the planner places the VM (or `--host`).
async fn create_in_cluster(a: CreateArgs, spec: VmSpec) -> anyhow::Result<ExitCode> {
    let url = a.controller.clone().unwrap_or_else(|| DEFAULT_CONTROLLER.to_string());
    let ctl = client::controller(&url)?;
    let vm = ctl.create_vm(&walkabout_api::CreateVm { spec, host: a.host.clone(), groups: a.groups.clone() }).await?;
    match a.common.output {
        Output::Json => print_json(&vm)?,
        Output::Text => print!("{}", cluster_vm_text(&vm)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn create(a: CreateArgs) -> anyhow::Result<ExitCode> {
    let client = client::agent(&a.common.agent)?;
    let mut spec = VmSpec::new(a.name.clone(), a.memory);
    spec.vcpus = a.vcpus;
    spec.workload.clone_from(&a.workload);
    spec.cpu_model.clone_from(&a.cpu_model);
    spec.cmdline.clone_from(&a.cmdline);
    spec.disks.clone_from(&a.disks);
    spec.nics.clone_from(&a.nic);
    spec.free_will = a.free_will;
    let custom_kernel = a.kernel.is_some();
    let absolute = |what: &str, p: PathBuf| std::fs::canonicalize(&p).with_context(|| format!("{what} {}", p.display()));
    spec.kernel = a.kernel.clone().map(|p| absolute("kernel", p)).transpose()?;
    spec.initrd = a.initrd.clone().map(|p| absolute("initrd", p)).transpose()?;
    if a.controller.is_some() || !a.groups.is_empty() {
        return create_in_cluster(a, spec).await;
    }
    let start = Instant::now();
    let mut vm = client.create_vm(&spec).await?;
    // Only the Walkabout guest says READY; a custom kernel is done when QEMU runs.
    if !a.no_wait && !custom_kernel {
        let wait = Duration::from_secs(a.ready_timeout).max(client::options().request_timeout);
        vm = wait_ready(&client, &a.name, wait).await?;
    }
    let elapsed_ms = start.elapsed().as_millis();
    match a.common.output {
        Output::Json => print_json(&Created { vm: &vm, create_ms: u64::try_from(elapsed_ms).unwrap_or(u64::MAX) })?,
        Output::Text => {
            print!("{}", vm_text(&vm));
            println!("ready in {elapsed_ms} ms");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_ready(client: &AgentClient, name: &str, timeout: Duration) -> anyhow::Result<VmInfo> {
    let start = Instant::now();
    loop {
        let vm = client.vm(name).await?;
        if vm.guest.ready {
            return Ok(vm);
        }
        if vm.record.state == VmState::Stopped {
            anyhow::bail!("VM {name} stopped before its guest was ready: {}", vm.record.reason.as_deref().unwrap_or("no reason"));
        }
        if let Some(alert) = vm.guest.alerts.first().filter(|_| vm.guest.kernel_trouble) {
            anyhow::bail!("VM {name}'s kernel failed while booting: {alert}");
        }
        if start.elapsed() > timeout {
            anyhow::bail!("VM {name} runs but its guest was not ready after {} s (see `walkabout vm console {name}`)", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn console(a: ConsoleArgs) -> anyhow::Result<ExitCode> {
    let client = client::agent(&a.named.common.agent)?;
    let mut offset = 0u64;
    loop {
        let chunk = client.console(&a.named.name, offset).await?;
        match a.named.common.output {
            Output::Json if !a.follow => {
                print_json(&chunk)?;
                return Ok(ExitCode::SUCCESS);
            }
            _ => print!("{}", chunk.text),
        }
        offset = chunk.next;
        if !a.follow {
            return Ok(ExitCode::SUCCESS);
        }
        if chunk.text.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// One agent's VMs as a table.
fn agent_table(vms: &[VmInfo]) -> Table {
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("STATE", Align::Left),
        ("MEMORY", Align::Right),
        ("VCPUS", Align::Right),
        ("WORKLOAD", Align::Left),
        ("HB", Align::Right),
        ("CORRUPT", Align::Right),
        ("BAD_BLOCKS", Align::Right),
    ]);
    for v in vms {
        let spec = &v.record.spec;
        t.row([
            spec.name.clone(),
            v.record.state.to_string(),
            format!("{}M", spec.memory_mib),
            spec.vcpus.to_string(),
            spec.workload.clone(),
            num(v.guest.last_seq),
            v.guest.corrupt_pages.to_string(),
            v.guest.corrupt_blocks.to_string(),
        ]);
    }
    t
}

/// The cluster's VMs as a table, each with its host.
fn cluster_table(vms: &[ClusterVm]) -> Table {
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("HOST", Align::Left),
        ("STATE", Align::Left),
        ("MEMORY", Align::Right),
        ("VCPUS", Align::Right),
        ("WORKLOAD", Align::Left),
        ("HB", Align::Right),
        ("CORRUPT", Align::Right),
        ("BAD_BLOCKS", Align::Right),
    ]);
    for v in vms {
        t.row([
            v.name.clone(),
            v.host.clone().unwrap_or_else(|| "-".into()),
            v.state.to_string(),
            format!("{}M", v.memory_mib),
            v.vcpus.to_string(),
            v.workload.clone(),
            num(v.guest.last_seq),
            v.guest.corrupt_pages.to_string(),
            v.guest.corrupt_blocks.to_string(),
        ]);
    }
    t
}

/// The guest's line of a VM's description.
fn guest_text(g: &walkabout_api::GuestStatus) -> String {
    let mut s = format!(
        "guest:     ready={} cpus={} heartbeats={} last_seq={} seq_breaks={} corrupt_pages={} corrupt_blocks={} kernel_trouble={}\n",
        g.ready,
        num(g.cpus),
        g.heartbeats,
        num(g.last_seq),
        g.seq_breaks,
        g.corrupt_pages,
        g.corrupt_blocks,
        g.kernel_trouble
    );
    for a in &g.alerts {
        s.push_str(&format!("alert:     {}\n", clean(a)));
    }
    s
}

/// One agent VM for people.
fn vm_text(v: &VmInfo) -> String {
    let (r, spec) = (&v.record, &v.record.spec);
    let reason = r.reason.as_deref().map(|r| format!(" ({})", clean(r))).unwrap_or_default();
    format!(
        "name:      {}\nstate:     {}{reason}\nmemory:    {} MiB, {} vCPU(s), cpu model {}\naccel:     {}   pid: {}\nworkload:  {}\n{}{}",
        clean(&spec.name),
        r.state,
        spec.memory_mib,
        spec.vcpus,
        clean(spec.cpu_model()),
        r.accel,
        num(r.pid),
        clean(&spec.workload),
        disks_text(&spec.disks),
        guest_text(&v.guest)
    )
}

/// One cluster VM for people: where it runs, its state, its guest.
fn cluster_vm_text(v: &ClusterVm) -> String {
    let reason = v.reason.as_deref().map(|r| format!(" ({})", clean(r))).unwrap_or_default();
    format!(
        "name:      {}\nhost:      {}\nstate:     {}{reason}\nmemory:    {} MiB, {} vCPU(s)\nworkload:  {}\n{}",
        clean(&v.name),
        clean(v.host.as_deref().unwrap_or("-")),
        v.state,
        v.memory_mib,
        v.vcpus,
        clean(&v.workload),
        guest_text(&v.guest)
    )
}

/// Parses `--nic bridge=BR[,mac=..][,address=..]`.
fn parse_nic(text: &str) -> Result<walkabout_api::NicSpec, String> {
    let mut nic = walkabout_api::NicSpec::on("");
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("bridge", v)) => nic.bridge = v.to_string(),
            Some(("mac", v)) => nic.mac = Some(v.to_string()),
            Some(("address", v)) => nic.address = Some(v.to_string()),
            _ => return Err(format!("{part:?}: expected bridge=BR, mac=MAC or address=IP/PREFIX")),
        }
    }
    if nic.bridge.is_empty() {
        return Err("a NIC needs bridge=BR".into());
    }
    Ok(nic)
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use walkabout_api::{ClusterVmState, GuestStatus};

    fn cluster_vm(name: &str, host: Option<&str>) -> ClusterVm {
        ClusterVm {
            version: 1,
            name: name.into(),
            host: host.map(String::from),
            memory_mib: 256,
            vcpus: 1,
            workload: "idle".into(),
            nics: vec![],
            state: ClusterVmState::Running,
            reason: None,
            guest: GuestStatus { last_seq: Some(42), ..Default::default() },
            seen_ms: 0,
            cpu_model: None,
            groups: vec![],
            protection: None,
            protection_status: None,
        }
    }

    #[test]
    fn the_cluster_table_shows_each_vm_with_its_host() {
        let t = cluster_table(&[cluster_vm("g1", Some("h2")), cluster_vm("g2", None)]).render();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0].split_whitespace().take(3).collect::<Vec<_>>(), ["NAME", "HOST", "STATE"]);
        assert_eq!(lines[1].split_whitespace().take(3).collect::<Vec<_>>(), ["g1", "h2", "running"]);
        assert_eq!(lines[2].split_whitespace().take(3).collect::<Vec<_>>(), ["g2", "-", "running"]);
    }

    #[test]
    fn a_cluster_vm_is_shown_with_its_host_and_control_characters_escaped() {
        let text = cluster_vm_text(&cluster_vm("g\u{1b}[2J1", Some("h1")));
        assert!(text.contains("host:      h1\n"), "{text}");
        assert!(text.contains("last_seq=42"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
    }

    #[test]
    fn disks_parse_as_path_size_or_catalog_image_with_options() {
        let brought = parse_disk("/img/a.raw,format=raw,bus=virtio-scsi");
        let new = parse_disk("size=4G");
        let catalog = parse_disk("image:guest");
        assert_eq!(
            brought,
            Ok(DiskSpec {
                path: Some("/img/a.raw".into()),
                format: Some(walkabout_api::DiskFormat::Raw),
                size_bytes: None,
                bus: walkabout_api::DiskBus::VirtioScsi
            })
        );
        assert_eq!(new.map(|d| (d.path, d.size_bytes)), Ok((None, Some(4 << 30))));
        assert_eq!(catalog.map(|d| d.path), Ok(Some(PathBuf::from("image:guest"))));
    }

    #[test]
    fn bad_disks_are_refused_naming_the_text() {
        for bad in ["", "size=4G,format=raw", "/a,size=1G", "/a,speed=9", "/a,bus=ide", "format=qcow2"] {
            let e = parse_disk(bad).expect_err(bad);
            assert!(e.contains(&format!("disk '{bad}'")), "{e}");
        }
    }

    #[test]
    fn vm_list_help_says_whom_it_asks() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            vm: VmCommand,
        }
        let help = Cli::command().find_subcommand_mut("list").map(|c| c.render_help().to_string()).unwrap_or_default();
        assert!(help.contains("127.0.0.1:7700") && help.contains("127.0.0.1:7701") && help.contains("--agent"), "{help}");
    }
}

#[cfg(test)]
mod nic_tests {
    use super::parse_nic;

    #[test]
    fn a_nic_with_every_field_parses() {
        let n = parse_nic("bridge=br0,mac=52:54:00:00:00:01,address=10.77.0.12/24").expect("parses");
        assert_eq!((n.bridge.as_str(), n.mac.as_deref(), n.address.as_deref()), ("br0", Some("52:54:00:00:00:01"), Some("10.77.0.12/24")));
    }

    #[test]
    fn a_nic_without_a_bridge_is_refused() {
        assert!(parse_nic("mac=52:54:00:00:00:01").is_err());
        assert!(parse_nic("bridge=br0,speed=10").is_err());
    }
}
