//! `walkabout game hanoi`: the Towers of Hanoi with nested VMs, played by the controller.
//!
//! The command is a client of `POST /v1/games/hanoi`: the controller boots a hypervisor
//! guest (`hanoi0`, the `hyper` image: its own agent and QEMU inside) and a plain guest
//! (`hanoi1`) on the first peg, migrates the latter into the former, and plays the
//! planner's moves to the last peg, each a verified live migration into or out of the
//! nested agent (`walkabout_controller::games`). This prints each move with its downtime
//! as it lands; Ctrl-C stops the game (a move under way finishes).
//!
//! What the controller needs of this machine to make a hypervisor guest is here too
//! ([`ImageNest`]): the image built from this binary and this host's QEMU, an overlay
//! of it, and a seed disk with a host identity issued from the cluster CA.

use super::client::{print_json, runtime, Output};
use super::cluster::CtlArgs;
use super::table::clean;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use walkabout_api::{DiskSpec, HanoiOptions, HanoiStage, WalkRecord, WalkStatus};
use walkabout_controller::games::{hanoi_move_line, HanoiSetup, Nest};

/// Arguments of `walkabout game hanoi`.
#[derive(clap::Args)]
pub struct HanoiArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    /// The three pegs: hosts of the cluster, first to last (the tower starts on the
    /// first and ends on the last); default: the first three hosts by name.
    #[arg(long = "peg")]
    pegs: Vec<String>,
    /// Levels of nesting (VMs in the tower). 2 is what is built today.
    #[arg(long, default_value_t = walkabout_controller::games::HANOI_LEVELS)]
    levels: u32,
    /// The bridge the hypervisor guest's NIC joins on every host (default: the
    /// controller's --hanoi-bridge).
    #[arg(long)]
    bridge: Option<String>,
    /// The hypervisor guest's address with its prefix, e.g. 10.77.0.20/24 (default: the
    /// controller's --hanoi-address).
    #[arg(long)]
    address: Option<String>,
    /// Memory of the hypervisor guest, MiB (it holds the other VM and a QEMU for it).
    #[arg(long, value_parser = super::client::parse_mib, default_value = "768M")]
    hyper_memory: u64,
    /// Memory of the innermost guest, MiB.
    #[arg(long, value_parser = super::client::parse_mib, default_value = "128M")]
    guest_memory: u64,
    /// The innermost guest's workload.
    #[arg(long, default_value = "dirty:8:1")]
    workload: String,
    /// Leave the VMs running at the end (default: delete them).
    #[arg(long)]
    keep: bool,
}

/// Runs `walkabout game hanoi`.
pub fn run(a: HanoiArgs) -> anyhow::Result<ExitCode> {
    let opts = HanoiOptions {
        pegs: a.pegs,
        levels: a.levels,
        hyper_memory_mib: a.hyper_memory,
        guest_memory_mib: a.guest_memory,
        workload: a.workload,
        bridge: a.bridge,
        address: a.address,
        keep: a.keep,
    };
    let ctl = a.ctl;
    runtime()?.block_on(async move {
        let client = super::client::controller(&ctl.controller)?;
        let w = client.start_hanoi(&opts).await?;
        let text = ctl.output == Output::Text;
        if text {
            println!("game {}: the Towers of Hanoi; follow with `walkabout events`, stop with Ctrl-C", w.id);
        }
        let w = follow(&client, &w.id, text).await?;
        let solved = w.hanoi.as_ref().is_some_and(|h| h.solved);
        match ctl.output {
            Output::Json => print_json(&w)?,
            Output::Text => println!("{}", clean(w.result.as_deref().unwrap_or("ended"))),
        }
        Ok(if solved { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    })
}

/// Polls game `id` to its end, printing its stages and moves as they land when `text`;
/// Ctrl-C stops it.
async fn follow(ctl: &walkabout_api::ControllerClient, id: &str, text: bool) -> anyhow::Result<WalkRecord> {
    let (mut stage, mut setup, mut moves) = (None, 0usize, 0usize);
    let mut stopping = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let w = ctl.walk(id).await?;
        if let (true, Some(h)) = (text, &w.hanoi) {
            if stage != Some(h.stage) {
                stage = Some(h.stage);
                println!("{}", stage_line(h.stage, &h.vms, &h.pegs));
            }
            for m in h.setup.iter().skip(setup) {
                setup += 1;
                println!("setup: {}", clean(&hanoi_move_line(m)));
            }
            for m in h.moves.iter().skip(moves) {
                moves += 1;
                println!("move {}: {}", m.number, clean(&hanoi_move_line(m)));
            }
        }
        if w.status != WalkStatus::Running && w.finished_ms.is_some() {
            return Ok(w);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = &mut ctrl_c, if !stopping => {
                stopping = true;
                if text {
                    println!("stopping: a move under way finishes first...");
                }
                ctl.stop_walk(id).await?;
            }
        }
    }
}

/// What a stage means, for people.
fn stage_line(stage: HanoiStage, vms: &[String], pegs: &[String]) -> String {
    let first = pegs.first().map_or("?", String::as_str);
    match stage {
        HanoiStage::Booting => format!("booting {} on {first} (the agent inside it takes about a minute)", vms.join(" and ")),
        HanoiStage::Building => format!("building the tower on {first}"),
        HanoiStage::Playing => "playing the planned moves".into(),
        HanoiStage::Over => "over".into(),
    }
}

/// The controller's Hanoi setup from its flags: with the cluster CA (`ca_dir`) the
/// hypervisor guest's disks are made under `work_dir` from the image cache.
pub fn setup(ca_dir: Option<&Path>, work_dir: PathBuf, bridge: Option<String>, address: Option<String>) -> HanoiSetup {
    let nest = ca_dir.map(|ca| {
        let n: std::sync::Arc<dyn Nest> =
            std::sync::Arc::new(ImageNest { ca_dir: ca.to_path_buf(), work_dir, cache: walkabout_image::default_cache_dir() });
        n
    });
    HanoiSetup { bridge, address, nest, ..HanoiSetup::default() }
}

/// Makes hypervisor guests' disks on this machine: the hyper image (built from this
/// binary and this host's QEMU, cached), an overlay of it and a seed disk with a host
/// identity from the CA, both in `work_dir`.
pub struct ImageNest {
    ca_dir: PathBuf,
    work_dir: PathBuf,
    cache: PathBuf,
}

impl Nest for ImageNest {
    fn hyper_disks(&self, vm: &str, ip: &str) -> Result<Vec<DiskSpec>, String> {
        self.disks(vm, ip).map_err(|e| format!("{e:#}"))
    }

    fn agent_port(&self) -> u16 {
        walkabout_image::HYPER_AGENT_PORT
    }
}

impl ImageNest {
    fn disks(&self, vm: &str, ip: &str) -> anyhow::Result<Vec<DiskSpec>> {
        use anyhow::Context;
        let exe = std::env::current_exe().context("finding this walkabout binary")?;
        let hyper =
            walkabout_image::build_hyper(&self.cache, &exe, "qemu-system-x86_64").context("building the hypervisor guest's image")?;
        std::fs::create_dir_all(&self.work_dir).with_context(|| format!("creating {}", self.work_dir.display()))?;
        let root = self.work_dir.join(format!("{vm}-root.qcow2"));
        let seed = self.work_dir.join(format!("{vm}-seed.img"));
        let _ = std::fs::remove_file(&root);
        overlay(&hyper.rootfs, &root)?;
        let ca = walkabout_trust::Ca::load(&self.ca_dir).with_context(|| format!("loading the CA in {}", self.ca_dir.display()))?;
        let id = ca.issue(vm, walkabout_trust::Role::Host, &[ip.to_string()]).with_context(|| format!("issuing {vm}'s identity"))?;
        walkabout_image::seed_disk(&seed, &[(walkabout_image::SEED_IDENTITY, id.to_pem().as_bytes())]).context("making the seed disk")?;
        Ok(vec![DiskSpec::image(&root), DiskSpec::image(&seed)])
    }
}

/// A qcow2 overlay at `path` on the read-only `base`.
fn overlay(base: &Path, path: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(path)
        .output()
        .context("running qemu-img create")?;
    if !out.status.success() {
        anyhow::bail!("qemu-img create {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stage_names_the_vms_and_the_first_peg() {
        let s = stage_line(HanoiStage::Booting, &["hanoi0".into(), "hanoi1".into()], &["h1".into(), "h2".into(), "h3".into()]);
        assert_eq!(s, "booting hanoi0 and hanoi1 on h1 (the agent inside it takes about a minute)");
    }
}
