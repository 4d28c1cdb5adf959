//! `walkabout game hanoi`: the Towers of Hanoi with nested VMs.
//!
//! Three host agents are the pegs. The tower is built on the first: a hypervisor guest
//! (`hanoi0`, the `hyper` image: its own agent and QEMU inside) boots there, and a plain
//! guest (`hanoi1`) boots on the same host and is live-migrated into it. The planner
//! (`walkabout_controller::games::hanoi`) then moves the tower to the third peg, one VM
//! that holds no other at a time, each move a live migration through the agents' API
//! into or out of the nested agent; each is verified at its destination (the moved
//! guest's heartbeat unbroken, no corrupt page, no kernel trouble) and reported with
//! its downtime.
//!
//! The CLI drives the agents directly, not through a controller: the nested agent is a
//! host that exists only while its VM runs, at an address on the guests' bridge, and
//! it stands on different hosts over the game. Every agent speaks mutual TLS; the
//! nested agent's host identity is issued from the cluster CA (`--ca-dir`) for its
//! address and handed to it on a seed disk.
//!
//! Levels: 2 (one hypervisor guest holding one plain guest). A hypervisor guest nested
//! in another would need a bridge inside its holder for its own agent's address; not
//! built (docs/nesting.md).

use super::client::{agent, print_json, runtime, Output};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use walkabout_api::{AgentClient, DiskSpec, HanoiMove, HanoiRecord, MigrationRequest, Mode, NicSpec, Phase, VmInfo, VmSpec, VmState};
use walkabout_controller::games::hanoi::{plan, Move, State};

/// The levels this command plays.
const LEVELS: usize = 2;

/// How long the hypervisor guest may take to boot and start its agent.
const HYPER_BOOT_LIMIT: Duration = Duration::from_secs(900);

/// How long a plain guest may take to boot (its guest program ready).
const GUEST_BOOT_LIMIT: Duration = Duration::from_secs(300);

/// Kernel parameters of the game's guests: the kernel's lockup and stall detectors off.
/// A guest run by a QEMU inside a TCG guest on a busy host has its vCPU starved for
/// longer than their 20 s thresholds (seen: "soft lockup - CPU#0 stuck for 29s" after a
/// move out of the nested hypervisor, heartbeats continuous, 0 corrupt pages); they
/// would report scheduling, not damage. An oops, a panic or a protection fault still
/// fails the move.
const NESTED_CMDLINE: &str = "nosoftlockup nowatchdog rcupdate.rcu_cpu_stall_suppress=1 sysctl.kernel.hung_task_timeout_secs=0";

/// How long an agent may stay silent during a move before its peer gives up, ms.
const PEER_TIMEOUT_MS: u64 = 20_000;

/// How long one move may take.
const MOVE_LIMIT: Duration = Duration::from_secs(900);

/// Arguments of `walkabout game hanoi`.
#[derive(clap::Args)]
pub struct HanoiArgs {
    /// The three pegs: host agents' URLs, first to last (the tower starts on the first
    /// and ends on the last).
    #[arg(long = "peg", num_args = 1, required = true)]
    pegs: Vec<String>,
    /// Levels of nesting (VMs in the tower). 2 is what is built today.
    #[arg(long, default_value_t = 2)]
    levels: usize,
    /// The bridge the hypervisor guest's NIC joins on every host (its agent's address
    /// must reach the host agents and they it).
    #[arg(long)]
    bridge: String,
    /// The hypervisor guest's address with its prefix (e.g. 10.77.0.20/24).
    #[arg(long)]
    address: String,
    /// The cluster CA's directory: the nested agent's host certificate is issued from it.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Memory of the hypervisor guest, MiB (it holds the other VM and a QEMU for it).
    #[arg(long, value_parser = super::client::parse_mib, default_value = "768M")]
    hyper_memory: u64,
    /// Memory of the innermost guest, MiB.
    #[arg(long, value_parser = super::client::parse_mib, default_value = "128M")]
    guest_memory: u64,
    /// The innermost guest's workload.
    #[arg(long, default_value = "dirty:8:1")]
    workload: String,
    /// Where the game keeps the hypervisor guest's disks (its root overlay and seed).
    #[arg(long)]
    work_dir: PathBuf,
    /// The image cache (the hyper image is built there).
    #[arg(long, env = "WALKABOUT_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Leave the VMs running at the end (default: delete them).
    #[arg(long)]
    keep: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Runs `walkabout game hanoi`.
pub fn run(a: HanoiArgs) -> anyhow::Result<ExitCode> {
    if a.pegs.len() != 3 {
        bail!("the game needs three pegs (--peg URL three times), got {}", a.pegs.len());
    }
    if a.levels != LEVELS {
        bail!(
            "{} levels: this build plays {LEVELS} (a hypervisor guest holding a plain guest); a hypervisor guest nested in another \
             needs a bridge inside its holder, which is not built (see docs/nesting.md)",
            a.levels
        );
    }
    let record = runtime()?.block_on(play(&a))?;
    match a.output {
        Output::Json => print_json(&record)?,
        Output::Text => print_summary(&record),
    }
    Ok(if record.solved { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The VMs and where their agents are.
struct Board {
    /// Peg agents.
    pegs: Vec<AgentClient>,
    /// The nested agent inside `hanoi0`.
    inner: AgentClient,
    /// VM names, outermost first.
    vms: Vec<String>,
    state: State,
}

impl Board {
    /// The agent `vm` runs on: its holder's (the agent inside it) or its peg's host's.
    fn agent_of(&self, vm: usize) -> anyhow::Result<&AgentClient> {
        match self.state.holder_of(vm) {
            Some(_) => Ok(&self.inner),
            None => {
                let peg = self.state.peg_of(vm).with_context(|| format!("{} is on no peg", self.vms[vm]))?;
                Ok(&self.pegs[peg])
            }
        }
    }

    /// The agent an arrival on `peg` runs on.
    fn agent_on(&self, peg: usize) -> &AgentClient {
        match self.state.top(peg) {
            Some(_) => &self.inner,
            None => &self.pegs[peg],
        }
    }

    /// `peg2` or `hanoi0@peg2`: where `vm` runs now.
    fn place_of(&self, vm: usize) -> String {
        let peg = self.state.peg_of(vm).map_or_else(|| "?".into(), |p| format!("peg{}", p + 1));
        match self.state.holder_of(vm) {
            Some(h) => format!("{}@{peg}", self.vms[h]),
            None => peg,
        }
    }
}

async fn play(a: &HanoiArgs) -> anyhow::Result<HanoiRecord> {
    let names: Vec<String> = (0..LEVELS).map(|i| format!("hanoi{i}")).collect();
    let pegs = a.pegs.iter().map(|u| agent(u)).collect::<anyhow::Result<Vec<_>>>()?;
    let ip = a.address.split('/').next().unwrap_or_default().to_string();
    let inner = agent(&format!("https://{ip}:{}", walkabout_image::HYPER_AGENT_PORT))?;
    let mut record = HanoiRecord {
        levels: u32::try_from(LEVELS).unwrap_or(u32::MAX),
        vms: names.clone(),
        pegs: a.pegs.clone(),
        setup: vec![],
        moves: vec![],
        solved: false,
        hyper_boot_ms: None,
    };

    // Until the tower is built the board knows only hanoi0 (hanoi1 runs beside it on
    // peg1's host). Whatever fails from here on, the game's VMs are deleted (unless --keep).
    let mut board = Board { pegs, inner, vms: names.clone(), state: State { pegs: [vec![0], vec![], vec![]] } };
    match boot(a, &board, &ip).await {
        Ok(ms) => record.hyper_boot_ms = Some(ms),
        Err(e) => {
            finish(a, &board, &names).await;
            return Err(e);
        }
    }

    // The tower: the plain guest into the hypervisor guest.
    let m = migrate(&board.pegs[0], &board.inner, &names[1], "peg1".into(), format!("{}@peg1", names[0])).await;
    say(a, format_args!("setup: {}", line(&m)));
    let ok = m.result == Phase::Completed && m.reason.is_none();
    record.setup.push(m);
    if !ok {
        finish(a, &board, &names).await;
        return Ok(record);
    }
    board.state = State::start(LEVELS, 0);

    let moves = plan(&board.state, LEVELS, 2).context("planning the game")?;
    say(a, format_args!("planned {} moves from {}", moves.len(), board.state));
    for (i, mv) in moves.iter().enumerate() {
        let m = play_move(&mut board, *mv, i).await?;
        say(a, format_args!("move {}: {}", m.number, line(&m)));
        let ok = m.result == Phase::Completed && m.reason.is_none();
        record.moves.push(m);
        if !ok {
            break;
        }
    }
    record.solved = board.state == State::start(LEVELS, 2) && record.moves.len() == moves.len();
    finish(a, &board, &names).await;
    Ok(record)
}

/// Boots the hypervisor guest and the plain guest on peg 1 and waits for the agent
/// inside the former; how long that agent took to answer, ms.
async fn boot(a: &HanoiArgs, board: &Board, ip: &str) -> anyhow::Result<u64> {
    let names = &board.vms;
    let spec = hyper_spec(a, &names[0], ip)?;
    board.pegs[0].create_vm(&spec).await.with_context(|| format!("creating {} on {}", names[0], a.pegs[0]))?;
    let mut leaf = VmSpec::new(names[1].clone(), a.guest_memory);
    leaf.workload = a.workload.clone();
    leaf.cmdline = Some(NESTED_CMDLINE.into());
    board.pegs[0].create_vm(&leaf).await.with_context(|| format!("creating {} on {}", names[1], a.pegs[0]))?;
    say(
        a,
        format_args!("{} (hypervisor guest, {} MiB) and {} ({} MiB) booting on peg1", names[0], a.hyper_memory, names[1], a.guest_memory),
    );
    let started = Instant::now();
    wait_ready(&board.pegs[0], &names[1], GUEST_BOOT_LIMIT).await?;
    wait_agent(&board.inner, &board.pegs[0], &names[0]).await?;
    // The nested agent measures its QEMU's CPU models once, on first use: minutes under
    // nested TCG. Done now, so that the first migration's request does not wait for it.
    board.inner.with_timeout(HYPER_BOOT_LIMIT).cpu().await.with_context(|| format!("the CPU models of the agent inside {}", names[0]))?;
    say(a, format_args!("{}'s agent answers at {} after {:.0} s", names[0], board.inner.url(), started.elapsed().as_secs_f64()));
    Ok(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// Plays `mv` (number `i` from 0) and applies it to the board once it completed.
async fn play_move(board: &mut Board, mv: Move, i: usize) -> anyhow::Result<HanoiMove> {
    let vm = board.vms[mv.vm].clone();
    let from_place = board.place_of(mv.vm);
    let src = board.agent_of(mv.vm)?.clone();
    let dst = board.agent_on(mv.to).clone();
    let mut after = board.state.clone();
    after.apply(mv)?;
    let to_place = {
        let peg = format!("peg{}", mv.to + 1);
        match after.holder_of(mv.vm) {
            Some(h) => format!("{}@{peg}", board.vms[h]),
            None => peg,
        }
    };
    let mut m = migrate(&src, &dst, &vm, from_place, to_place).await;
    m.number = u32::try_from(i + 1).unwrap_or(u32::MAX);
    if m.result == Phase::Completed {
        board.state = after;
    }
    Ok(m)
}

/// Migrates `vm` from `src` to `dst` and checks the guest at the destination; a
/// migration that failed (the VM then still runs at the source: the ownership rule) is
/// tried once more, since a nested agent under TCG may miss a deadline on a busy host.
async fn migrate(src: &AgentClient, dst: &AgentClient, vm: &str, from: String, to: String) -> HanoiMove {
    let first = migrate_once(src, dst, vm, from.clone(), to.clone()).await;
    // Only a VM still running at its source is tried again; whatever the destination
    // prepared late (after the source gave up) goes first.
    let stayed = src.vm(vm).await.is_ok_and(|v| v.record.state == VmState::Running);
    if first.result != Phase::Failed || !stayed {
        return first;
    }
    let _ = dst.with_timeout(Duration::from_secs(120)).abort_incoming(vm).await;
    tracing::warn!(vm, reason = ?first.reason, "move failed; trying it once more");
    let mut second = migrate_once(src, dst, vm, from, to).await;
    second.attempts = 2;
    if let (Some(r), Some(earlier)) = (second.reason.as_mut(), first.reason) {
        r.push_str(&format!(" (first attempt: {earlier})"));
    }
    second
}

/// One attempt of [`migrate`].
async fn migrate_once(src: &AgentClient, dst: &AgentClient, vm: &str, from: String, to: String) -> HanoiMove {
    let mut m = HanoiMove {
        number: 0,
        vm: vm.to_string(),
        from,
        to,
        migration: String::new(),
        result: Phase::Failed,
        downtime_ms: None,
        total_ms: None,
        heartbeats: 0,
        seq_breaks: 0,
        corrupt_pages: 0,
        reason: None,
        attempts: 1,
    };
    let mut req = MigrationRequest::new(vm, dst.url(), Mode::Precopy);
    // Nested TCG moves memory slowly: a generous budget, a pause the policy may stretch.
    req.budget_per_gib_ms = Some(3_600_000);
    req.max_downtime_ms = Some(1_000);
    // An agent inside a TCG guest answers in seconds, not milliseconds.
    req.tuning.peer_timeout_ms = Some(PEER_TIMEOUT_MS);
    let rec = match src.start_migration(&req).await {
        Ok(r) => r,
        Err(e) => {
            m.reason = Some(format!("cannot start the migration of {vm} at {}: {e}", src.url()));
            return m;
        }
    };
    m.migration = rec.id.clone();
    let deadline = Instant::now() + MOVE_LIMIT;
    let rec = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match src.migration(&rec.id).await {
            Ok(r) if r.phase.is_final() => break Some(r),
            Ok(_) | Err(_) if Instant::now() > deadline => break None,
            Ok(_) | Err(_) => {}
        }
    };
    let Some(rec) = rec else {
        m.reason = Some(format!("the migration of {vm} did not end within {} s", MOVE_LIMIT.as_secs()));
        return m;
    };
    m.result = rec.phase;
    m.downtime_ms = rec.downtime_ms;
    m.total_ms = rec.total_ms;
    if rec.phase != Phase::Completed {
        m.reason = rec.reason.or_else(|| Some(format!("the migration {}", rec.phase)));
        return m;
    }
    // A few heartbeats at the destination before judging.
    tokio::time::sleep(Duration::from_secs(3)).await;
    match dst.vm(vm).await {
        Ok(info) => check(&mut m, &info),
        Err(e) => m.reason = Some(format!("{vm} is not at {} after its migration: {e}", dst.url())),
    }
    m
}

/// Records the guest's health in `m`; a reason when it is not healthy.
fn check(m: &mut HanoiMove, info: &VmInfo) {
    let g = &info.guest;
    m.heartbeats = g.heartbeats;
    m.seq_breaks = g.seq_breaks;
    m.corrupt_pages = g.corrupt_pages;
    if g.seq_breaks > 0 || g.corrupt_pages > 0 || g.kernel_trouble || !g.is_healthy() {
        m.reason = Some(format!(
            "{} unhealthy after the move: {} heartbeat breaks, {} corrupt pages, kernel trouble {}, alerts {:?}",
            m.vm, g.seq_breaks, g.corrupt_pages, g.kernel_trouble, g.alerts
        ));
    }
}

/// The hypervisor guest's spec: the hyper root disk (an overlay in the work directory),
/// its seed disk with a host identity for `ip`, a NIC on the bridge.
fn hyper_spec(a: &HanoiArgs, name: &str, ip: &str) -> anyhow::Result<VmSpec> {
    let cache = a.cache_dir.clone().unwrap_or_else(walkabout_image::default_cache_dir);
    let exe = std::env::current_exe().context("finding this walkabout binary")?;
    let hyper = walkabout_image::build_hyper(&cache, &exe, "qemu-system-x86_64").context("building the hypervisor guest's image")?;
    std::fs::create_dir_all(&a.work_dir).with_context(|| format!("creating {}", a.work_dir.display()))?;
    let root = a.work_dir.join(format!("{name}-root.qcow2"));
    let seed = a.work_dir.join(format!("{name}-seed.img"));
    let _ = std::fs::remove_file(&root);
    overlay(&hyper.rootfs, &root)?;
    let ca = walkabout_trust::Ca::load(&a.ca_dir).with_context(|| format!("loading the CA in {}", a.ca_dir.display()))?;
    let id = ca.issue(name, walkabout_trust::Role::Host, &[ip.to_string()]).with_context(|| format!("issuing {name}'s identity"))?;
    walkabout_image::seed_disk(&seed, &[(walkabout_image::SEED_IDENTITY, id.to_pem().as_bytes())]).context("making the seed disk")?;
    let mut spec = VmSpec::new(name, a.hyper_memory);
    spec.cmdline = Some(format!("root=/dev/vda {NESTED_CMDLINE}"));
    spec.workload = "dirty:8:1".into();
    spec.disks = vec![DiskSpec::image(&root), DiskSpec::image(&seed)];
    let mut nic = NicSpec::on(a.bridge.clone());
    nic.address = Some(a.address.clone());
    spec.nics = vec![nic];
    Ok(spec)
}

/// A qcow2 overlay at `path` on the read-only `base`.
fn overlay(base: &Path, path: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(path)
        .output()
        .context("running qemu-img create")?;
    if !out.status.success() {
        bail!("qemu-img create {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Waits until `vm` on `at` has its guest program ready.
async fn wait_ready(at: &AgentClient, vm: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(info) = at.vm(vm).await {
            if info.guest.ready {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{vm} on {} was not ready within {} s", at.url(), limit.as_secs());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until the agent inside `vm` (running on `host`) answers.
async fn wait_agent(inner: &AgentClient, host: &AgentClient, vm: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + HYPER_BOOT_LIMIT;
    loop {
        if inner.host().await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let tail = host.console(vm, 0).await.map(|c| c.text).unwrap_or_default();
            let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
            bail!(
                "the agent inside {vm} ({}) did not answer within {} s; its console ends: {tail}",
                inner.url(),
                HYPER_BOOT_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Deletes the game's VMs (innermost first) unless `--keep`.
async fn finish(a: &HanoiArgs, board: &Board, names: &[String]) {
    if a.keep {
        return;
    }
    for vm in (0..names.len()).rev() {
        if let Ok(at) = board.agent_of(vm) {
            let _ = at.delete_vm(&names[vm]).await;
        }
        // A VM the state lost track of (a failed setup): try every peg.
        for p in &board.pegs {
            let _ = p.delete_vm(&names[vm]).await;
        }
    }
}

fn say(a: &HanoiArgs, what: std::fmt::Arguments<'_>) {
    if a.output == Output::Text {
        let _ = super::out::line(what);
    }
}

/// One move, for people.
fn line(m: &HanoiMove) -> String {
    let down = m.downtime_ms.map_or_else(|| "-".into(), |d| format!("{d} ms"));
    let total = m.total_ms.map_or_else(|| "-".into(), |t| format!("{:.1} s", t as f64 / 1000.0));
    let mut s = format!(
        "{} {} -> {}: {} (downtime {down}, took {total}, heartbeats {}, breaks {}, corrupt pages {})",
        m.vm, m.from, m.to, m.result, m.heartbeats, m.seq_breaks, m.corrupt_pages
    );
    if let Some(r) = &m.reason {
        s.push_str(&format!(": {r}"));
    }
    s
}

fn print_summary(r: &HanoiRecord) {
    let downs: Vec<String> = r.moves.iter().map(|m| m.downtime_ms.map_or_else(|| "-".into(), |d| d.to_string())).collect();
    println!(
        "hanoi, {} levels: {} in {} moves (downtimes ms: {})",
        r.levels,
        if r.solved { "solved" } else { "NOT solved" },
        r.moves.len(),
        downs.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn move_with(result: Phase, reason: Option<&str>) -> HanoiMove {
        HanoiMove {
            number: 2,
            vm: "hanoi0".into(),
            from: "peg1".into(),
            to: "peg3".into(),
            migration: "m1".into(),
            result,
            downtime_ms: Some(42),
            total_ms: Some(12_500),
            heartbeats: 9,
            seq_breaks: 0,
            corrupt_pages: 0,
            reason: reason.map(String::from),
            attempts: 1,
        }
    }

    #[test]
    fn a_move_line_names_the_vm_its_places_and_its_downtime() {
        let s = line(&move_with(Phase::Completed, None));
        assert_eq!(s, "hanoi0 peg1 -> peg3: completed (downtime 42 ms, took 12.5 s, heartbeats 9, breaks 0, corrupt pages 0)");
        assert!(line(&move_with(Phase::Failed, Some("refused"))).ends_with(": refused"));
    }
}
