//! `walkabout demo`: three agents on this machine, real guests walking from host to host
//! by live migration, each hop's downtime and the guests' heartbeat continuity printed,
//! then everything cleaned up.

use super::client::{self, runtime, Output};
use super::out;
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use walkabout_api::{AgentClient, MigrationRecord, MigrationRequest, Mode, Phase, VmSpec};
use walkabout_testbed::{LocalCluster, LocalOptions};

/// Arguments of `walkabout demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Hops per guest.
    #[arg(long, default_value_t = 6)]
    hops: usize,
    /// Number of guests.
    #[arg(long, default_value_t = 2)]
    guests: usize,
    /// Guest memory.
    #[arg(long, default_value = "512M")]
    memory: String,
    /// In-guest workload (each guest keeps memory in a self-checking pattern).
    #[arg(long, default_value = "dirty:64:32")]
    workload: String,
    /// Accelerator for the agents (`auto` measures KVM against TCG).
    #[arg(long, default_value = "auto")]
    accel: String,
    /// First loopback port of the three agents.
    #[arg(long, default_value_t = 7711)]
    base_port: u16,
    /// Output format (json: one object with every hop).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Runs the demo; Ctrl-C stops it and cleans up.
pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let text = a.output == Output::Text;
        // A closed stdout stops the demo (cleanly, see `out`) instead of running it unseen.
        let say = |s: String| if text { out::line(s) } else { Ok(()) };
        say("walkabout demo: building the guest image (cached after the first run)...".into())?;
        let cache = walkabout_image::default_cache_dir();
        let img = tokio::task::spawn_blocking(move || walkabout_image::build(&cache)).await??;
        say(format!("  guest: Linux {} + busybox + the Walkabout guest program", img.kernel_version))?;
        let opts = LocalOptions {
            bin: std::env::current_exe().context("finding the walkabout binary")?,
            hosts: 3,
            base_port: a.base_port,
            accel: a.accel.clone(),
            capacity: None,
            netns: false,
            root: walkabout_testbed::session_root("demo", std::process::id()),
            tls: false,
        };
        say("starting three agents on loopback (each measures its accelerator)...".into())?;
        let mut cluster = tokio::task::spawn_blocking(move || LocalCluster::start(&opts)).await??;
        let result = tokio::select! {
            r = walk(&cluster, &a, &say) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        let _ = say("cleaning up: deleting guests, stopping agents...".into());
        delete_guests(&cluster).await;
        cluster.shutdown();
        let report = result?;
        if !text {
            out::line(serde_json::to_string_pretty(&report)?)?;
        }
        Ok(if report["ok"] == true { ExitCode::SUCCESS } else { ExitCode::from(1) })
    })
}

/// Deletes every VM of the local cluster's agents through their API, so the guests end
/// gracefully before the testbed stops the agents (and kills what is left).
pub(super) async fn delete_guests(cluster: &LocalCluster) {
    for a in &cluster.agents {
        let Ok(c) = client::agent(&a.url) else { continue };
        let Ok(vms) = c.vms().await else { continue };
        for v in vms {
            if let Err(e) = c.delete_vm(&v.record.spec.name).await {
                tracing::warn!("cleaning up: {e}");
            }
        }
    }
}

async fn walk(cluster: &LocalCluster, a: &DemoArgs, say: &impl Fn(String) -> std::io::Result<()>) -> anyhow::Result<Value> {
    let first = cluster.agents.first().context("no agents")?;
    let host = client::agent(&first.url)?.host().await?;
    say(format!("  accelerator: {} ({})", host.accel.accel, host.accel.reason))?;
    for agent in &cluster.agents {
        say(format!("  {} at {}", agent.name, agent.url))?;
    }
    let n = cluster.agents.len();
    let memory_mib = super::client::parse_mib(&a.memory).map_err(|e| anyhow::anyhow!(e))?;
    let mut place: Vec<usize> = vec![];
    for g in 0..a.guests {
        let name = format!("g{}", g + 1);
        let at = g % n;
        let agent = &cluster.agents[at];
        let start = Instant::now();
        let spec = VmSpec { workload: a.workload.clone(), ..VmSpec::new(name.clone(), memory_mib) };
        let c = client::agent(&agent.url)?;
        c.create_vm(&spec).await?;
        wait_ready(&c, &name).await?;
        say(format!("booted {name} on {} ({}, {}) in {} ms", agent.name, a.memory, a.workload, start.elapsed().as_millis()))?;
        place.push(at);
    }
    let mut hops = vec![];
    let mut downtimes = vec![];
    let mut ok = true;
    for round in 1..=a.hops {
        for (g, at) in place.iter_mut().enumerate() {
            let name = format!("g{}", g + 1);
            let to = (*at + 1) % n;
            let (src, dst) = (&cluster.agents[*at], &cluster.agents[to]);
            let m = migrate(&src.url, &dst.url, &name).await?;
            let completed = m.phase == Phase::Completed;
            let vm = client::agent(if completed { &dst.url } else { &src.url })?.vm(&name).await?;
            let guest = &vm.guest;
            let continuous = guest.seq_breaks == 0 && guest.corrupt_pages == 0 && !guest.kernel_trouble;
            ok &= completed && continuous;
            let down = m.downtime_ms.unwrap_or(0);
            if completed {
                downtimes.push(down);
                *at = to;
            }
            say(format!(
                "hop {round}: {name} {} -> {}  {}  total {} ms  downtime {} ms  heartbeat seq {} {}  corrupt pages {}",
                src.name,
                dst.name,
                m.phase,
                super::table::num(m.total_ms),
                down,
                super::table::num(guest.last_seq),
                if continuous { "continuous" } else { "BROKEN" },
                guest.corrupt_pages,
            ))?;
            hops.push(json!({"round": round, "vm": name, "from": src.name, "to": dst.name, "result": m.phase,
                "total_ms": m.total_ms, "downtime_ms": m.downtime_ms, "strategy": m.strategy.as_ref().map(|s| &s.name),
                "last_seq": guest.last_seq, "heartbeat_continuous": continuous, "corrupt_pages": guest.corrupt_pages}));
        }
    }
    downtimes.sort_unstable();
    let median = downtimes.get(downtimes.len() / 2).copied();
    say(format!(
        "{} hops, {}; downtime median {} ms, max {} ms",
        hops.len(),
        if ok { "every heartbeat continuous, 0 corrupt pages" } else { "SOMETHING WAS LOST (see above)" },
        median.unwrap_or(0),
        downtimes.last().copied().unwrap_or(0)
    ))?;
    Ok(json!({"ok": ok, "hops": hops, "downtime_median_ms": median, "downtime_max_ms": downtimes.last()}))
}

async fn wait_ready(c: &AgentClient, name: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if c.vm(name).await?.guest.ready {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!("{name} did not boot within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn migrate(src: &str, dst: &str, vm: &str) -> anyhow::Result<MigrationRecord> {
    let c = client::agent(src)?;
    let rec = c.start_migration(&MigrationRequest::new(vm, dst, Mode::Auto)).await?;
    loop {
        let m = c.migration(&rec.id).await?;
        if m.phase.is_final() {
            return Ok(m);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
