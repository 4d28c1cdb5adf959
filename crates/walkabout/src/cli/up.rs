//! `walkabout up`: a whole cluster on this machine — a controller and three agents (on
//! loopback, or each in a network namespace of its own with `--netns`), four guests
//! booted and walked about by live migration, the web console's URL (with a one-time
//! login token) printed first, then the API and metrics. Ctrl-C (or SIGTERM) stops the
//! walk, deletes the guests, stops the agents and the controller, and removes what it
//! created: no process is left behind.
//!
//! The guests boot from a disk: each has an overlay on the Walkabout root disk
//! (`image:guest`) and a small data disk its workload writes and verifies
//! (`disk:<MiB>:<MiB/s>`); every hop moves the disks too (`--storage`: `auto` picks
//! `shared` when both hosts see the image file, as hosts on one machine do; `copy`
//! mirrors them over NBD), and its line shows the storage mode and the disk and memory
//! bytes moved. `--diskless` boots the old way (kernel and initramfs, no disk).
//!
//! The guests have a NIC each on the guests' segment (bridge `wavmK` on every host,
//! joined into one segment the root namespace reaches at 10.77.K.254; needs root; K
//! picked so that several `up`s on one machine never share one) with an address
//! (10.77.K.11, .12...): the controller, in this process, probes each guest's
//! echo through its hops, and every hop line shows QEMU's and the observed downtime.
//!
//! With `--ha`: etcd and three controller processes sharing it (one leads, elected with
//! a lease; the others redirect to it and take over when it dies), the guests and the
//! walk driven through the controllers' API. Kill the leader's pid to watch another
//! take over; the walk carries on.

use super::client::runtime;
use super::out;
use super::walk::hop_line;
use anyhow::Context;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use walkabout_controller::{Cluster, ControllerConfig};
use walkabout_testbed::{GuestNet, LocalCluster, LocalOptions};

/// Time between checkpoints of `up`'s guests, ms.
const UP_CHECKPOINT_EVERY_MS: u64 = 12_000;

/// Segments `up` may pick from: bridge `wavmK`, subnet `10.77.K.0/24`.
const GUEST_SEGMENTS: u32 = 200;

/// The guests' segment of this `up`: bridge `wavmK` on every host and subnet
/// `10.77.K.0/24`, for the first K from this process's id whose bridge does not exist
/// yet, so that several `up`s on one machine (the tests run some at once) neither share
/// a segment nor remove each other's.
fn guest_segment(namespaces: &[&str]) -> Result<GuestNet, walkabout_testbed::TestbedError> {
    let start = std::process::id() % GUEST_SEGMENTS;
    let mut last = None;
    for k in (0..GUEST_SEGMENTS).map(|i| (start + i) % GUEST_SEGMENTS) {
        let bridge = format!("wavm{k}");
        if std::path::Path::new("/sys/class/net").join(&bridge).exists() {
            continue;
        }
        match GuestNet::new(&bridge, &format!("10.77.{k}"), namespaces) {
            Ok(net) => return Ok(net),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| walkabout_testbed::TestbedError::Command {
        command: "ip link add wavmK type bridge".into(),
        stderr: format!("all {GUEST_SEGMENTS} guest segments are in use"),
    }))
}

/// Arguments of `walkabout up`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Address of the controller's API.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: String,
    /// Address of the web console (the page at `/`, the API under `/v1`); printed first.
    #[arg(long, default_value = "127.0.0.1:7780")]
    web_listen: String,
    /// Number of hosts (agents).
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Number of guests.
    #[arg(long, default_value_t = 4)]
    guests: usize,
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// In-guest workload: memory in a self-checking pattern (`dirty:`) and, on its data
    /// disk, self-verifying blocks (`disk:`; dropped with --diskless).
    #[arg(long, default_value = "dirty:32:8,disk:16:4")]
    workload: String,
    /// Boot the guests without disks (kernel and initramfs only), as before disks came.
    #[arg(long)]
    diskless: bool,
    /// Do not protect the guests (no checkpoints shipped to replicas): for runs about
    /// plans and migrations alone, on machines too busy to checkpoint beside them.
    #[arg(long)]
    unprotected: bool,
    /// Size of each guest's data disk (beside its root disk).
    #[arg(long, default_value = "32M")]
    data_disk: String,
    /// How hops move the guests' disks: auto (shared when both hosts see the image
    /// file), shared, or copy (mirrored to the destination over NBD).
    #[arg(long, default_value_t = walkabout_api::StorageMode::Auto)]
    storage: walkabout_api::StorageMode,
    /// Put each host in a network namespace of its own (needs root: `ip netns`).
    #[arg(long)]
    netns: bool,
    /// Plain HTTP on loopback, without certificates. By default the cluster gets a CA
    /// of its own and every connection is mutual TLS (an operator identity is written
    /// for the CLI and printed).
    #[arg(long, env = "WALKABOUT_INSECURE_LOOPBACK")]
    insecure_loopback: bool,
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
    /// Stop by itself after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = super::client::parse_duration_ms)]
    duration: Option<u64>,
    /// Start etcd and three controllers sharing it (one leader, two standing by)
    /// instead of one controller in this process.
    #[arg(long)]
    ha: bool,
}

/// Runs `walkabout up` until Ctrl-C, SIGTERM or `--duration`.
pub fn run(a: UpArgs) -> anyhow::Result<ExitCode> {
    if a.ha {
        return ha::run(a);
    }
    runtime()?.block_on(async move {
        // The console's address comes first: open it now, it shows the cluster as it
        // comes up (the browser waits on the bound port until the console serves).
        let web = tokio::net::TcpListener::bind(&a.web_listen)
            .await
            .with_context(|| format!("cannot listen on {} (web console)", a.web_listen))?;
        // The console is plain HTTP, which the listener allows on loopback only; a browser
        // logs in once with the token in this URL (more: `walkabout console-url`).
        let web = walkabout_trust::Listener::from_tcp(web, None, walkabout_trust::ListenerOptions::default())?;
        let (sessions, web_url) = super::controller::console_sessions(&web)?;
        out::line(format_args!("web console      {web_url}"))?;
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
        let namespaces: Vec<String> = local.agents.iter().filter_map(|x| x.netns().map(String::from)).collect();
        let guest_net = match guest_segment(&namespaces.iter().map(String::as_str).collect::<Vec<_>>()) {
            Ok(n) => {
                out::line(format_args!(
                    "  guests' segment: bridge {} on every host, {}.0/24, this host at {}.254",
                    n.bridge(),
                    n.subnet(),
                    n.subnet()
                ))?;
                Some(n)
            }
            Err(e) => {
                out::line(format_args!("  guests without NICs (cannot make their segment: {e})"))?;
                None
            }
        };
        let urls: Vec<String> = local.agents.iter().map(|x| format!("{}={}", x.name, x.url)).collect();
        let started = async {
            let mut config = ControllerConfig::new(root.join("controller"));
            config.limits.storage = a.storage;
            let cluster = walkabout_controller::start(config, &urls).await?;
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
        let console = {
            let app = walkabout_web::console(walkabout_controller::api::router_with_trust(cluster.clone(), trust.clone()));
            let audit = walkabout_controller::join::audit(cluster.clone());
            let stop = cluster.clone();
            let stopped = async move { stop.stopped().await };
            trust.serve_console(&web.url(), sessions.clone());
            tokio::spawn(walkabout_trust::serve::serve_console(web, app, sessions, Some(audit), stopped))
        };
        let server = {
            let stop = cluster.clone();
            // The walk is a client of the controller's API, at the address just bound.
            let serving = walkabout_controller::serve(cluster.clone(), trust, listener, async move { stop.stopped().await });
            tokio::spawn(serving)
        };
        let result = tokio::select! {
            r = show(&cluster, &local, &a, &api_url, &web_url, guest_net.as_ref()) => r,
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
        // Event streams (an open console) never end by themselves: a short grace, then go.
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), console).await;
        super::demo::delete_guests(&local).await;
        local.shutdown();
        drop(guest_net);
        let _ = out::line("stopped; nothing left running");
        result.map(|()| ExitCode::SUCCESS)
    })
}

/// Boots the guests, prints where everything is, and walks the guests about.
async fn show(
    cluster: &Cluster,
    local: &LocalCluster,
    a: &UpArgs,
    api_url: &str,
    web_url: &str,
    net: Option<&GuestNet>,
) -> anyhow::Result<()> {
    let memory_mib = super::client::parse_mib(&a.memory).map_err(|e| anyhow::anyhow!(e))?;
    for agent in &local.agents {
        out::line(format_args!("  host {} at {} (metrics {}/metrics)", agent.name, agent.url, agent.url))?;
    }
    let hosts: Vec<String> = cluster.hosts().into_iter().map(|h| h.name).collect();
    let (workload, disks) = guest_disks(a)?;
    // All guests boot at once (each host's QEMUs share its CPUs; a busy machine gives
    // each process its share), then each is awaited in order.
    let start = Instant::now();
    let mut booting = vec![];
    for g in 0..a.guests {
        let name = format!("g{}", g + 1);
        let host = hosts.get(g % hosts.len().max(1)).cloned();
        let address = net.map(|n| n.guest_address(u8::try_from(11 + g).unwrap_or(240).min(240)));
        let nics: Vec<_> = net
            .map(|n| walkabout_api::NicSpec { address: address.clone(), ..walkabout_api::NicSpec::on(n.bridge()) })
            .into_iter()
            .collect();
        let spec = walkabout_api::VmSpec {
            workload: workload.clone(),
            nics,
            disks: disks.clone(),
            ..walkabout_api::VmSpec::new(&name, memory_mib)
        };
        cluster.create_vm(spec, host.as_deref()).await?;
        booting.push((name, host, address));
    }
    for (name, host, address) in booting {
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
            "booted {name} on {} ({}, {}{}{}) in {} ms",
            host.as_deref().unwrap_or("?"),
            a.memory,
            workload,
            if disks.is_empty() { String::new() } else { format!(", root disk image:guest + {} data disk", a.data_disk) },
            address.map(|x| format!(", {x}")).unwrap_or_default(),
            start.elapsed().as_millis()
        ))?;
        // Protected: a checkpoint every 12 s shipped to another host, so that a host
        // that dies (`walkabout game musical-chairs`, a kill -9) loses no guest.
        if a.unprotected {
            continue;
        }
        let protect = walkabout_api::ProtectVm { replica: None, every_ms: Some(UP_CHECKPOINT_EVERY_MS), keep: Some(3) };
        match cluster.protect(&name, &protect).await {
            Ok(vm) => out::line(format_args!(
                "protected {name}: a checkpoint every {} s to {}",
                UP_CHECKPOINT_EVERY_MS / 1000,
                vm.protection.map(|p| p.replica).unwrap_or_default()
            ))?,
            Err(e) => out::line(format_args!("{name} is not protected: {e}"))?,
        }
    }
    out::line("")?;
    out::line(format_args!("web console      {web_url}  (one-time login; more with `walkabout console-url [--role viewer]`)"))?;
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
    let walk = cluster.games().start_walk(walkabout_controller::games::WalkOptions {
        duration_ms,
        parallel: 1,
        pause_ms: a.pause,
        gentle: false,
    })?;
    let mut shown = 0usize;
    let mut events = cluster.events().subscribe();
    loop {
        // Each checkpoint shipped, each failover: the controller's failover events.
        while let Ok(e) = events.try_recv() {
            if e.subject == walkabout_api::Subject::Failover {
                out::line(super::table::clean(&e.message))?;
            }
        }
        let w = cluster.games().walk(&walk.id)?;
        for h in w.hops.iter().skip(shown) {
            shown += 1;
            let health = cluster
                .vm(&h.vm)
                .map(|vm| {
                    let seq = vm.guest.last_seq.map_or_else(|| "-".to_string(), |s| s.to_string());
                    format!(
                        "  heartbeat seq {seq}, {} breaks, {} corrupt pages, {} corrupt blocks",
                        vm.guest.seq_breaks, vm.guest.corrupt_pages, vm.guest.corrupt_blocks
                    )
                })
                .unwrap_or_default();
            let observed = match (&h.probe_error, h.observed_downtime_ms) {
                (Some(e), _) => format!("  probe FAILED: {}", super::table::clean(e)),
                (None, Some(ms)) => format!("  observed {ms} ms"),
                (None, None) => String::new(),
            };
            let moved = moved_text(cluster, local, h).await;
            out::line(format_args!("{}{observed}{moved}{health}", hop_line(shown, h)))?;
        }
        if w.finished_ms.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The guests' workload and disks: an overlay on the Walkabout root disk and a data
/// disk of `--data-disk` (the workload's `disk:` part writes it); with `--diskless`
/// none, and the workload without its `disk:` part.
fn guest_disks(a: &UpArgs) -> anyhow::Result<(String, Vec<walkabout_api::DiskSpec>)> {
    if a.diskless {
        let parts: Vec<&str> = a.workload.split(',').filter(|p| !p.trim().starts_with("disk:")).collect();
        let workload = if parts.is_empty() { "idle".to_string() } else { parts.join(",") };
        return Ok((workload, vec![]));
    }
    let size_mib = super::client::parse_mib(&a.data_disk).map_err(|e| anyhow::anyhow!("--data-disk: {e}"))?;
    Ok((a.workload.clone(), vec![walkabout_api::DiskSpec::image("image:guest"), walkabout_api::DiskSpec::new_qcow2(size_mib << 20)]))
}

/// What hop `h` moved, from its source agent's record: the storage mode, the disk
/// bytes copied and the memory bytes sent (empty when the agent does not say).
async fn moved_text(cluster: &Cluster, local: &LocalCluster, h: &walkabout_api::Hop) -> String {
    let Some(agent_id) = cluster.migration(&h.migration).ok().and_then(|m| m.agent_id) else { return String::new() };
    let Some(agent) = local.agents.iter().find(|x| x.name == h.from) else { return String::new() };
    let Ok(client) = super::client::agent(&agent.url) else { return String::new() };
    let Ok(r) = client.migration(&agent_id).await else { return String::new() };
    let memory = super::progress::mib(r.progress.transferred_bytes);
    match r.storage {
        Some(mode) => format!("  storage {mode}, disk {} MiB, memory {memory} MiB", super::progress::mib(r.disk.transferred_bytes)),
        None => format!("  memory {memory} MiB"),
    }
}

mod ha {
    //! `walkabout up --ha`: etcd, three controllers, the agents; everything through the
    //! controllers' API (any controller: followers redirect to the leader).

    use super::{out, runtime, UpArgs};
    use crate::cli::walk::hop_line;
    use anyhow::Context;
    use std::process::ExitCode;
    use std::time::{Duration, Instant};
    use walkabout_api::{ClientOptions, ControllerClient, CreateVm, VmSpec, WalkOptions, WalkStatus};
    use walkabout_testbed::{Controller, ControllerSpec, Etcd, LocalCluster, LocalOptions};

    /// Controllers started by `up --ha`.
    const CONTROLLERS: usize = 3;

    pub(super) fn run(a: UpArgs) -> anyhow::Result<ExitCode> {
        runtime()?.block_on(async move {
            out::line("walkabout up --ha: building the guest image (cached after the first run)...")?;
            let cache = walkabout_image::default_cache_dir();
            tokio::task::spawn_blocking(move || walkabout_image::build(&cache)).await??;
            let root = walkabout_testbed::session_root("up", std::process::id());
            let bin = std::env::current_exe().context("finding the walkabout binary")?;
            let etcd_dir = root.join("etcd");
            let mut etcd = tokio::task::spawn_blocking(move || Etcd::start(&etcd_dir, Duration::from_secs(60))).await??;
            out::line(format_args!("  etcd at {} (pid {})", etcd.endpoint(), etcd.pid().unwrap_or(0)))?;
            let opts = LocalOptions {
                bin: bin.clone(),
                hosts: a.hosts,
                base_port: a.base_port,
                accel: a.accel.clone(),
                capacity: a.capacity.clone(),
                netns: a.netns,
                root: root.clone(),
                // The controllers sharing etcd serve plain HTTP on loopback for now.
                tls: a.netns,
            };
            let mut local = tokio::task::spawn_blocking(move || LocalCluster::start(&opts)).await??;
            let store = etcd.store_url();
            let started = {
                let agents: Vec<&walkabout_testbed::Agent> = local.agents.iter().collect();
                let spec = ControllerSpec::new(&bin, &agents).args(&["--store", store.as_str()]);
                (0..CONTROLLERS).map(|_| Controller::start(spec.clone())).collect::<Result<Vec<_>, _>>()
            };
            let mut controllers = match started {
                Ok(c) => c,
                Err(e) => {
                    local.shutdown();
                    etcd.stop(Duration::from_secs(5));
                    return Err(e.into());
                }
            };
            let urls: Vec<String> = controllers.iter().map(|c| c.url.clone()).collect();
            let etcd_config = walkabout_store_etcd::EtcdConfig::parse(&store).map_err(|e| anyhow::anyhow!(e))?;
            let watch = tokio::task::spawn_blocking(move || walkabout_store_etcd::Etcd::connect(etcd_config)).await??;
            let result = tokio::select! {
                r = show(&local, &a, &urls, &watch) => r,
                _ = crate::cli::agent::shutdown_signal() => { let _ = out::line("\ninterrupted"); Ok(()) }
            };
            let _ = out::line("stopping: the walk, the guests, the agents, the controllers, etcd...");
            if let Some(c) = any_client(&urls).await {
                if let Ok(walks) = c.walks().await {
                    for w in walks.iter().filter(|w| w.status == WalkStatus::Running) {
                        let _ = c.stop_walk(&w.id).await;
                    }
                }
            }
            crate::cli::demo::delete_guests(&local).await;
            for c in &mut controllers {
                c.kill();
            }
            local.shutdown();
            etcd.stop(Duration::from_secs(5));
            let _ = out::line("stopped; nothing left running");
            result.map(|()| ExitCode::SUCCESS)
        })
    }

    /// A client of the first controller that answers (a follower redirects to the leader).
    async fn any_client(urls: &[String]) -> Option<ControllerClient> {
        for u in urls {
            let Ok(c) = ControllerClient::new(u, ClientOptions::default()) else { continue };
            if c.cluster().await.is_ok() {
                return Some(c);
            }
        }
        None
    }

    async fn client(urls: &[String]) -> anyhow::Result<ControllerClient> {
        let start = Instant::now();
        loop {
            if let Some(c) = any_client(urls).await {
                return Ok(c);
            }
            if start.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("no controller of {urls:?} leads after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn show(local: &LocalCluster, a: &UpArgs, urls: &[String], etcd: &walkabout_store_etcd::Etcd) -> anyhow::Result<()> {
        let memory_mib = crate::cli::client::parse_mib(&a.memory).map_err(|e| anyhow::anyhow!(e))?;
        for agent in &local.agents {
            out::line(format_args!("  host {} at {}", agent.name, agent.url))?;
        }
        for u in urls {
            out::line(format_args!("  controller at {u}"))?;
        }
        let c = client(urls).await?;
        let hosts: Vec<String> = c.hosts().await?.into_iter().map(|h| h.name).collect();
        let (workload, disks) = super::guest_disks(a)?;
        for g in 0..a.guests {
            let name = format!("g{}", g + 1);
            let host = hosts.get(g % hosts.len().max(1)).cloned();
            let spec = VmSpec { workload: workload.clone(), disks: disks.clone(), ..VmSpec::new(&name, memory_mib) };
            let start = Instant::now();
            client(urls).await?.create_vm(&CreateVm { spec, host: host.clone(), groups: vec![] }).await?;
            while !client(urls).await?.vm(&name).await.is_ok_and(|v| v.guest.ready) {
                if start.elapsed() > Duration::from_secs(300) {
                    anyhow::bail!("guest {name} did not become ready: see the agent's console");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            out::line(format_args!("booted {name} on {} in {} ms", host.as_deref().unwrap_or("?"), start.elapsed().as_millis()))?;
        }
        out::line("kill the leading controller and another takes over within seconds; Ctrl-C stops everything.")?;
        let duration_ms = a.duration.unwrap_or(u64::MAX / 4);
        let walk = client(urls).await?.start_walk(&WalkOptions { duration_ms, parallel: 1, pause_ms: a.pause, gentle: false }).await?;
        let (mut shown, mut serving) = (0usize, String::new());
        loop {
            let c = client(urls).await?;
            let leader = match etcd.leader().await {
                Ok(Some(l)) => format!("{} (epoch {})", l.url, l.epoch),
                Ok(None) => "none (an election is under way)".to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            if leader != serving {
                out::line(format_args!("leader: {leader}"))?;
                serving = leader;
            }
            let Ok(w) = c.walk(&walk.id).await else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            for h in w.hops.iter().skip(shown) {
                shown += 1;
                out::line(hop_line(shown, h))?;
            }
            if w.finished_ms.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}
