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
    /// A TOML file whose keys are these options (`listen = "0.0.0.0:7701"`,
    /// `data-dir = "..."`, `boot-dir = ["..."]`, `identity = "..."`).
    #[arg(long, value_name = "FILE")]
    #[allow(dead_code)] // read before parsing: `cli::config::expand` turns it into flags
    config: Option<PathBuf>,
    /// Address to serve the HTTP API on (port 0 picks one; the URL is printed and
    /// written to DATA_DIR/agent.url).
    #[arg(long, default_value = "127.0.0.1:7701")]
    listen: String,
    /// Directory for the agent's database and its VMs' files.
    #[arg(long)]
    data_dir: PathBuf,
    /// Serve plain HTTP without client certificates (loopback addresses only): for
    /// tests and a single machine. Otherwise the agent needs `--identity` (a host
    /// certificate from `walkabout host join`) and serves mutual TLS.
    #[arg(long, env = "WALKABOUT_INSECURE_LOOPBACK")]
    insecure_loopback: bool,
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
    /// The address incoming migrations listen on (this host's address toward its
    /// peers). Default: the --listen address, or 127.0.0.1 when that is unspecified.
    #[arg(long)]
    migration_address: Option<String>,
    /// A directory VM specs may take kernels and initramfs from (repeatable), besides
    /// the guest image's; any other path is refused.
    #[arg(long = "boot-dir")]
    boot_dirs: Vec<PathBuf>,
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
    /// How a VM migrated in is announced on its NICs' segments (gratuitous RARPs):
    /// `rounds=5,initial=50,max=550,step=100` (ms; any subset).
    #[arg(long, default_value = "rounds=5,initial=50,max=550,step=100")]
    announce: walkabout_agent::nics::Announce,
    /// Let an operator pull the plug: `POST /v1/host/power-cut` kills every QEMU of this
    /// host and the agent at once (tests, musical chairs). Refused (403) without it.
    #[arg(long)]
    allow_power_cut: bool,
}

/// Worker threads of the agent's runtime.
const AGENT_WORKERS: usize = 8;

/// Runs the agent until Ctrl-C or SIGTERM. VMs keep running after it stops.
pub fn run(a: AgentArgs) -> anyhow::Result<ExitCode> {
    // More workers than cores: work that blocks a worker for a while (hashing a
    // checkpoint's files) must not leave the API unanswered, or the controller finds the
    // host down and the agent's fence watchdog stops its protected VMs.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(AGENT_WORKERS).enable_all().build()?;
    rt.block_on(async move {
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
            announce: a.announce,
            boot_dirs: a.boot_dirs,
            migration_address: Some(migration_address(a.migration_address.as_deref(), &a.listen)),
            allow_power_cut: a.allow_power_cut,
            identity: super::ca::identity().cloned(),
            ..AgentConfig::new(a.data_dir)
        };
        let agent = Agent::start(config).await?;
        let tls = server_tls(a.insecure_loopback)?;
        let listener = walkabout_trust::Listener::bind(&a.listen, tls, walkabout_trust::ListenerOptions::default()).await?;
        let url = listener.url();
        // Written whole, then renamed: a reader never sees it half-written.
        walkabout_testbed::write_atomic(&data_dir.join("agent.url"), url.as_bytes()).context("writing agent.url")?;
        let host = agent.host_info();
        let _ = super::out::line(format_args!("walkabout agent listening on {url} (accel {}: {})", host.accel.accel, host.accel.reason));
        walkabout_agent::serve(agent, listener, shutdown_signal()).await?;
        tracing::info!("agent stopped; its VMs keep running");
        Ok(ExitCode::SUCCESS)
    })
}

/// The address incoming migrations listen on: `given`, else the IP of `listen` unless
/// it is unspecified (0.0.0.0, ::), else 127.0.0.1.
fn migration_address(given: Option<&str>, listen: &str) -> String {
    if let Some(g) = given {
        return g.to_string();
    }
    match listen.parse::<std::net::SocketAddr>() {
        Ok(a) if !a.ip().is_unspecified() => a.ip().to_string(),
        _ => "127.0.0.1".into(),
    }
}

/// The TLS configuration a daemon serves with: its `--identity`, or none when
/// `--insecure-loopback` asked for plain HTTP; refused when given neither.
pub fn server_tls(insecure_loopback: bool) -> anyhow::Result<Option<std::sync::Arc<rustls::ServerConfig>>> {
    match (super::ca::identity(), insecure_loopback) {
        (Some(b), _) => Ok(Some(walkabout_trust::tls::server_config(b)?)),
        (None, true) => Ok(None),
        (None, false) => anyhow::bail!(
            "no identity: give --identity FILE (a host certificate: walkabout host join) to serve mutual TLS, \
             or --insecure-loopback for plain HTTP on a loopback address"
        ),
    }
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
