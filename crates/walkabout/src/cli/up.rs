//! `walkabout up`: a whole cluster on this machine — a controller and three agents (on
//! loopback, or each in a network namespace of its own with `--netns`), four guests
//! booted and walked about by live migration, the API and metrics printed. Ctrl-C (or
//! SIGTERM) stops the walk, deletes the guests, stops the agents and the controller,
//! and removes what it created: no process is left behind.

use super::client::runtime;
use super::out;
use super::walk::hop_line;
use anyhow::Context;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use walkabout_controller::{Cluster, ControllerConfig};
use walkabout_testbed::{LocalCluster, LocalOptions};

/// Arguments of `walkabout up`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Address of the controller's API.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: String,
    /// Number of hosts (agents).
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Number of guests.
    #[arg(long, default_value_t = 4)]
    guests: usize,
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// In-guest workload (each guest keeps memory in a self-checking pattern).
    #[arg(long, default_value = "dirty:32:8")]
    workload: String,
    /// Put each host in a network namespace of its own (needs root: `ip netns`).
    #[arg(long)]
    netns: bool,
    /// Accelerator for the agents (`auto` measures KVM against TCG).
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Memory each host offers VMs (e.g. 2G); default: the agent's own.
    #[arg(long)]
    capacity: Option<String>,
    /// First loopback port of the agents (host N listens on BASE + N - 1).
    #[arg(long, default_value_t = 7701)]
    base_port: u16,
    /// Rest of each guest between two of its hops.
    #[arg(long, value_parser = super::client::parse_duration_ms, default_value = "3s")]
    pause: u64,
    /// Plain HTTP on loopback, without certificates. By default the cluster gets a CA
    /// of its own and every connection is mutual TLS (an operator identity is written
    /// for the CLI and printed).
    #[arg(long, env = "WALKABOUT_INSECURE_LOOPBACK")]
    insecure_loopback: bool,
    /// Stop by itself after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = super::client::parse_duration_ms)]
    duration: Option<u64>,
}

/// Runs `walkabout up` until Ctrl-C, SIGTERM or `--duration`.
pub fn run(a: UpArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        out::line("walkabout up: building the guest image (cached after the first run)...")?;
        let cache = walkabout_image::default_cache_dir();
        let img = tokio::task::spawn_blocking(move || walkabout_image::build(&cache)).await??;
        out::line(format_args!("  guest: Linux {} + busybox + the Walkabout guest program", img.kernel_version))?;
        let root = walkabout_testbed::session_root("up", std::process::id());
        let tcp = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("cannot listen on {}", a.listen))?;
        let api_addr = tcp.local_addr()?;
        let opts = LocalOptions {
            bin: std::env::current_exe().context("finding the walkabout binary")?,
            hosts: a.hosts,
            base_port: a.base_port,
            accel: a.accel.clone(),
            capacity: a.capacity.clone(),
            netns: a.netns,
            root: root.clone(),
            // Plain HTTP is for loopback only: namespaced hosts always speak TLS.
            tls: !a.insecure_loopback || a.netns,
        };
        out::line(format_args!(
            "starting {} agents{}...",
            a.hosts,
            if a.netns { ", each in its own network namespace" } else { " on loopback" }
        ))?;
        let mut local = tokio::task::spawn_blocking(move || LocalCluster::start(&opts)).await??;
        let ca_dir = local.ca.as_ref().map(|ca| ca.dir().to_path_buf());
        let (tls, trust) = match super::controller::controller_tls(ca_dir.as_deref(), &api_addr, &[], ca_dir.is_none()) {
            Ok(t) => t,
            Err(e) => {
                local.shutdown();
                return Err(e);
            }
        };
        let listener = walkabout_trust::Listener::from_tcp(tcp, tls, walkabout_trust::ListenerOptions::default())?;
        let api_url = listener.url();
        let urls: Vec<String> = local.agents.iter().map(|x| format!("{}={}", x.name, x.url)).collect();
        let started = async {
            let cluster = walkabout_controller::start(ControllerConfig::new(root.join("controller")), &urls).await?;
            Ok::<_, anyhow::Error>(cluster)
        }
        .await;
        let cluster = match started {
            Ok(c) => c,
            Err(e) => {
                super::demo::delete_guests(&local).await;
                local.shutdown();
                return Err(e);
            }
        };
        let server = {
            let stop = cluster.clone();
            // The walk is a client of the controller's API, at the address just bound.
            let serving = walkabout_controller::serve(cluster.clone(), trust, listener, async move { stop.stopped().await });
            tokio::spawn(serving)
        };
        let result = tokio::select! {
            r = show(&cluster, &local, &a, &api_url) => r,
            _ = super::agent::shutdown_signal() => { let _ = out::line("\ninterrupted"); Ok(()) }
        };
        let _ = out::line("stopping: the walk, the guests, the agents, the controller...");
        if let Some(w) = cluster.games().walks().into_iter().find(|w| w.status == walkabout_controller::games::WalkStatus::Running) {
            let _ = cluster.games().stop_walk(&w.id);
        }
        // Let hops under way finish (a cancel would too), briefly.
        let deadline = Instant::now() + Duration::from_secs(20);
        while cluster.migrations().iter().any(|m| !m.phase.is_final()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cluster.stop();
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        super::demo::delete_guests(&local).await;
        local.shutdown();
        let _ = out::line("stopped; nothing left running");
        result.map(|()| ExitCode::SUCCESS)
    })
}

/// Boots the guests, prints where everything is, and walks the guests about.
async fn show(cluster: &Cluster, local: &LocalCluster, a: &UpArgs, api_url: &str) -> anyhow::Result<()> {
    let memory_mib = super::client::parse_mib(&a.memory).map_err(|e| anyhow::anyhow!(e))?;
    for agent in &local.agents {
        out::line(format_args!("  host {} at {} (metrics {}/metrics)", agent.name, agent.url, agent.url))?;
    }
    let hosts: Vec<String> = cluster.hosts().into_iter().map(|h| h.name).collect();
    for g in 0..a.guests {
        let name = format!("g{}", g + 1);
        let host = hosts.get(g % hosts.len().max(1)).cloned();
        let start = Instant::now();
        let spec = walkabout_api::VmSpec { workload: a.workload.clone(), ..walkabout_api::VmSpec::new(&name, memory_mib) };
        cluster.create_vm(spec, host.as_deref()).await?;
        loop {
            let vm = cluster.vm(&name)?;
            if vm.guest.ready {
                break;
            }
            if vm.state == walkabout_api::ClusterVmState::Stopped || start.elapsed() > Duration::from_secs(300) {
                anyhow::bail!("guest {name} did not become ready ({}): see the agent's console", vm.state);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        out::line(format_args!(
            "booted {name} on {} ({}, {}) in {} ms",
            host.as_deref().unwrap_or("?"),
            a.memory,
            a.workload,
            start.elapsed().as_millis()
        ))?;
    }
    out::line("")?;
    out::line(format_args!("controller API   {api_url}/v1/cluster  (hosts, vms, plans, migrations, walks)"))?;
    out::line(format_args!("events (SSE)     {api_url}/v1/events"))?;
    out::line(format_args!("metrics          {api_url}/metrics"))?;
    match &local.operator {
        Some(id) => {
            out::line(format_args!("identity         {} (mutual TLS; an operator's credentials)", id.display()))?;
            out::line(format_args!(
                "try              export WALKABOUT_IDENTITY={} WALKABOUT_CONTROLLER={api_url}; walkabout host list · walkabout host drain h1",
                id.display()
            ))?;
        }
        None => out::line("try              walkabout host list · walkabout host drain h1 · walkabout cluster rebalance --dry-run")?,
    }
    out::line("Ctrl-C stops everything.")?;
    out::line("")?;
    let duration_ms = a.duration.unwrap_or(u64::MAX / 4);
    let walk = cluster.games().start_walk(walkabout_controller::games::WalkOptions { duration_ms, parallel: 1, pause_ms: a.pause })?;
    let mut shown = 0usize;
    loop {
        let w = cluster.games().walk(&walk.id)?;
        for h in w.hops.iter().skip(shown) {
            shown += 1;
            let health = cluster
                .vm(&h.vm)
                .map(|vm| {
                    let seq = vm.guest.last_seq.map_or_else(|| "-".to_string(), |s| s.to_string());
                    format!("  heartbeat seq {seq}, {} breaks, {} corrupt pages", vm.guest.seq_breaks, vm.guest.corrupt_pages)
                })
                .unwrap_or_default();
            out::line(format_args!("{}{health}", hop_line(shown, h)))?;
        }
        if w.finished_ms.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
