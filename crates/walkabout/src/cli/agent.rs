//! `walkabout agent`: the host daemon.

use super::client::parse_mib;
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;
use walkabout_agent::{Agent, AgentConfig};
use walkabout_qemu::accel::AccelRequest;

/// Arguments of `walkabout agent`.
#[derive(clap::Args)]
pub struct AgentArgs {
    /// Address to serve the HTTP API on (port 0 picks one; the URL is printed and
    /// written to DATA_DIR/agent.url).
    #[arg(long, default_value = "127.0.0.1:7701")]
    listen: String,
    /// Directory for the agent's database and its VMs' files.
    #[arg(long)]
    data_dir: PathBuf,
    /// Accelerator: `auto` measures KVM against TCG and picks the faster.
    #[arg(long, default_value = "auto")]
    accel: AccelRequest,
    /// Memory VMs may use on this host (e.g. 8G); default: physical memory minus --reserve.
    #[arg(long, value_parser = parse_mib)]
    capacity: Option<u64>,
    /// Memory kept for the host when the capacity is derived.
    #[arg(long, value_parser = parse_mib, default_value = "1G")]
    reserve: u64,
    /// QEMU binary.
    #[arg(long, env = "WALKABOUT_QEMU", default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Default kernel for VMs (default: the Walkabout guest image, built and cached).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Default initramfs, with --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Cache directory of the guest image.
    #[arg(long, env = "WALKABOUT_CACHE")]
    image_cache: Option<PathBuf>,
    /// Where the agent makes VM images (`vm create --disk size=...`, overlays on catalog
    /// images) [default: <data-dir>/images].
    #[arg(long)]
    storage_dir: Option<PathBuf>,
    /// The most capable CPU model this host offers guests (like an EVC baseline); VMs
    /// needing a feature outside it are refused. Default: max (TCG) or host (KVM).
    #[arg(long)]
    cpu_ceiling: Option<String>,
}

/// Runs the agent until Ctrl-C or SIGTERM. VMs keep running after it stops.
pub fn run(a: AgentArgs) -> anyhow::Result<ExitCode> {
    super::client::runtime()?.block_on(async move {
        let data_dir = a.data_dir.clone();
        let config = AgentConfig {
            qemu_binary: a.qemu,
            accel: a.accel,
            capacity_mib: a.capacity,
            reserve_mib: a.reserve,
            kernel: a.kernel,
            initrd: a.initrd,
            image_cache: a.image_cache,
            storage_dir: a.storage_dir,
            cpu_ceiling: a.cpu_ceiling,
            ..AgentConfig::new(a.data_dir)
        };
        let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("cannot listen on {}", a.listen))?;
        let agent = Agent::start(config).await?;
        let url = format!("http://{}", listener.local_addr()?);
        // Written whole, then renamed: a reader never sees it half-written.
        walkabout_testbed::write_atomic(&data_dir.join("agent.url"), url.as_bytes()).context("writing agent.url")?;
        let host = agent.host_info();
        let _ = super::out::line(format_args!("walkabout agent listening on {url} (accel {}: {})", host.accel.accel, host.accel.reason));
        walkabout_agent::serve(agent, listener, shutdown_signal()).await?;
        tracing::info!("agent stopped; its VMs keep running");
        Ok(ExitCode::SUCCESS)
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
