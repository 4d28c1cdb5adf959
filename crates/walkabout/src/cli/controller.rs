//! `walkabout controller`: the cluster controller daemon.

use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;
use walkabout_api::ExecLimits;
use walkabout_controller::ControllerConfig;

/// Arguments of `walkabout controller`.
#[derive(clap::Args)]
pub struct ControllerArgs {
    /// A TOML file whose keys are these options (`listen = "0.0.0.0:7700"`,
    /// `data-dir = "..."`, `ca-dir = "..."`, `agent = ["h1=https://..."]`).
    #[arg(long, value_name = "FILE")]
    #[allow(dead_code)] // read before parsing: `cli::config::expand` turns it into flags
    config: Option<PathBuf>,
    /// Address to serve the API on (port 0 picks one; the URL is printed and written to
    /// DATA_DIR/controller.url).
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: String,
    /// Directory of the controller's database (the cluster view, plans, migrations,
    /// events); a restarted controller resumes from it. With `--store etcd://...` it
    /// holds only controller.url.
    #[arg(long)]
    data_dir: PathBuf,
    /// Where the cluster's records live: `redb` (DATA_DIR/controller.redb, this
    /// controller alone) or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`, shared by several
    /// controllers of which one leads (elected with a lease); the others redirect
    /// clients to it and take over when it dies.
    #[arg(long, default_value = "redb")]
    store: String,
    /// With etcd: the leader's lease in seconds; a dead leader is replaced after about
    /// this long.
    #[arg(long, default_value_t = 3)]
    lease_ttl: u64,
    /// Serve plain HTTP without client certificates (loopback addresses only).
    /// Otherwise the controller serves mutual TLS with a certificate it issues itself
    /// from `--ca-dir` (or `--identity`).
    #[arg(long, env = "WALKABOUT_INSECURE_LOOPBACK")]
    insecure_loopback: bool,
    /// The cluster CA's directory (`walkabout ca init`): the controller issues itself a
    /// certificate, serves mutual TLS and signs hosts' joins.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Addresses (IP or DNS) clients reach the controller at, for its certificate
    /// (default: the --listen address and localhost).
    #[arg(long = "san")]
    sans: Vec<String>,
    /// An agent to register as a host: `URL` (named h1, h2... in order) or `NAME=URL`.
    /// Repeatable; more can be added later with `POST /v1/hosts`.
    #[arg(long = "agent")]
    agents: Vec<String>,
    /// Migrations out of one host at once.
    #[arg(long, default_value_t = 1)]
    per_host_out: u32,
    /// Migrations into one host at once.
    #[arg(long, default_value_t = 1)]
    per_host_in: u32,
    /// Migrations in the whole cluster at once.
    #[arg(long, default_value_t = 2)]
    per_cluster: u32,
    /// Failed migrations of one VM before a plan gives it up and reports it.
    #[arg(long, default_value_t = 2)]
    max_attempts: u32,
    /// Migration mode asked of agents: auto, precopy or postcopy.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Bandwidth cap per migration (e.g. 100M, 1G); default: none.
    #[arg(long, value_parser = super::client::parse_mib)]
    max_bandwidth: Option<u64>,
    /// Also serve the web console on this address (port 0 picks one): the page at `/`
    /// and the same API under `/v1`, for browser sessions only. Its URL with a one-time
    /// operator login token is printed and written to DATA_DIR/web.url (mode 0600);
    /// `walkabout console-url` asks for more (`--role viewer` too).
    #[arg(long)]
    web_listen: Option<String>,
    /// Fence time of protected VMs (e.g. 10s): their agents stop them after this long
    /// without the controller, and the controller restores them elsewhere only after
    /// this long since their host's last contact. Must exceed 4 s (a host is found down
    /// after 4 s of silence).
    #[arg(long, value_parser = super::client::parse_duration_ms, default_value = "10s")]
    fence_time: u64,
    /// The Towers of Hanoi (`POST /v1/games/hanoi`, `walkabout game hanoi`): the bridge
    /// the hypervisor guest's NIC joins on every host; its agent must reach the hosts'
    /// agents at their URLs and they it. Needs --ca-dir (its host certificate).
    #[arg(long)]
    hanoi_bridge: Option<String>,
    /// The Towers of Hanoi: the hypervisor guest's address with its prefix on that
    /// bridge (e.g. 10.77.0.20/24).
    #[arg(long)]
    hanoi_address: Option<String>,
}

impl ControllerArgs {
    /// The controller's configuration from these arguments.
    pub fn config(&self) -> anyhow::Result<ControllerConfig> {
        let mode = self.mode.parse::<walkabout_api::Mode>().map_err(|e| anyhow::anyhow!(e))?;
        let limits = ExecLimits {
            per_host_out: self.per_host_out.max(1),
            per_host_in: self.per_host_in.max(1),
            per_cluster: self.per_cluster.max(1),
            planner_parallel_per_host: self.per_host_out.max(self.per_host_in).max(1),
            max_attempts: self.max_attempts.max(1),
            ..ExecLimits::default()
        };
        Ok(ControllerConfig {
            limits,
            mode,
            max_bandwidth_bps: self.max_bandwidth.map(|m| m << 20),
            fence_ms: self.fence_time,
            ..ControllerConfig::new(self.data_dir.clone())
        })
    }
}

/// How long servers get to close their connections after a stop: event streams (a
/// browser's, a `walk --follow`) never end by themselves.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The controller's TLS: with `ca_dir`, a certificate it issues itself (role
/// `controller`, valid at `addr`'s IP, localhost and `sans`) and the CA to sign joins;
/// else its `--identity`; else plain HTTP if `insecure` asked for it. The chosen
/// identity also becomes its clients' (toward agents, and the games toward itself).
pub fn controller_tls(
    ca_dir: Option<&std::path::Path>,
    addr: &std::net::SocketAddr,
    sans: &[String],
    insecure: bool,
) -> anyhow::Result<(Option<std::sync::Arc<rustls::ServerConfig>>, std::sync::Arc<walkabout_controller::join::Trust>)> {
    use walkabout_controller::join::Trust;
    if let Some(dir) = ca_dir {
        let ca = walkabout_trust::Ca::load(dir)?;
        let mut names: Vec<String> = vec!["localhost".into()];
        if !addr.ip().is_unspecified() {
            names.push(addr.ip().to_string());
        }
        names.extend(sans.iter().cloned());
        let bundle = ca.issue("controller", walkabout_trust::Role::Controller, &names)?;
        walkabout_api::client::set_process_tls(walkabout_trust::tls::client_config(&bundle)?);
        return Ok((Some(walkabout_trust::tls::server_config(&bundle)?), Trust::with_ca(ca)));
    }
    Ok((super::agent::server_tls(insecure)?, Trust::none()))
}

/// How long the console login printed at start waits to be used.
const FIRST_LOGIN_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// The web console's sessions on listener `web`, and a first operator login's URL to
/// print (`http://ADDR/login?token=...`, one use). Tell the controller's trust with
/// [`walkabout_controller::join::Trust::serve_console`] so that `walkabout console-url`
/// gets more.
pub fn console_sessions(web: &walkabout_trust::Listener) -> anyhow::Result<(std::sync::Arc<walkabout_trust::Sessions>, String)> {
    let sessions = std::sync::Arc::new(walkabout_trust::Sessions::new(web.addr().port()));
    let operator = walkabout_trust::Identity { name: "operator".into(), role: walkabout_trust::Role::Operator };
    let token = sessions.issue(operator, FIRST_LOGIN_TTL)?;
    Ok((sessions, format!("{}{}?token={token}", web.url(), walkabout_trust::session::LOGIN_PATH)))
}

/// Writes `text` to `path` readable by its owner only (it holds a login token), whole
/// or not at all.
fn write_secret(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Runs the controller until Ctrl-C or SIGTERM. Agents and VMs carry on without it.
pub fn run(a: ControllerArgs) -> anyhow::Result<ExitCode> {
    super::client::runtime()?.block_on(async move {
        let config = a.config()?;
        std::fs::create_dir_all(&a.data_dir).with_context(|| format!("creating {}", a.data_dir.display()))?;
        let tcp = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("cannot listen on {}", a.listen))?;
        let (tls, trust) = controller_tls(a.ca_dir.as_deref(), &tcp.local_addr()?, &a.sans, a.insecure_loopback)?;
        let listener = walkabout_trust::Listener::from_tcp(tcp, tls, walkabout_trust::ListenerOptions::default())?;
        let url = listener.url();
        if a.store != "redb" {
            return run_ha(a, config, listener, trust, url).await;
        }
        // The console is plain HTTP, which the listener allows on loopback only; its
        // callers are whoever holds a session (a one-time login token, exchanged for a
        // cookie), never the connection.
        let web = match &a.web_listen {
            Some(addr) => Some(
                walkabout_trust::Listener::bind(addr, None, walkabout_trust::ListenerOptions::default())
                    .await
                    .with_context(|| format!("web console on {addr}"))?,
            ),
            None => None,
        };
        let cluster = walkabout_controller::start(config, &a.agents).await?;
        cluster.games().enable_hanoi(super::hanoi::setup(
            a.ca_dir.as_deref(),
            a.data_dir.join("hanoi"),
            a.hanoi_bridge.clone(),
            a.hanoi_address.clone(),
        ));
        let console = match web {
            Some(l) => {
                let (sessions, login_url) = console_sessions(&l)?;
                trust.serve_console(&l.url(), sessions.clone());
                write_secret(&a.data_dir.join("web.url"), &login_url).context("writing web.url")?;
                let _ = super::out::line(format_args!("web console on {login_url}"));
                let app = walkabout_web::console(walkabout_controller::api::router_with_trust(cluster.clone(), trust.clone()));
                let audit = walkabout_controller::join::audit(cluster.clone());
                let stop = cluster.clone();
                let stopped = async move { stop.stopped().await };
                Some(tokio::spawn(walkabout_trust::serve::serve_console(l, app, sessions, Some(audit), stopped)))
            }
            None => None,
        };
        // Written whole, then renamed: a reader never sees it half-written.
        walkabout_testbed::write_atomic(&a.data_dir.join("controller.url"), url.as_bytes()).context("writing controller.url")?;
        let _ = super::out::line(format_args!("walkabout controller listening on {url} ({} host(s))", cluster.hosts().len()));
        let stop = cluster.clone();
        tokio::spawn(async move {
            super::agent::shutdown_signal().await;
            stop.stop();
        });
        let stopped = cluster.clone();
        let api = walkabout_controller::serve(cluster.clone(), trust, listener, async move { stopped.stopped().await });
        let grace = async {
            cluster.stopped().await;
            tokio::time::sleep(CLOSE_GRACE).await;
        };
        let servers = async {
            let console = async {
                if let Some(c) = console {
                    match c.await {
                        Ok(Err(e)) => tracing::warn!(error = %e, "the web console stopped serving"),
                        Err(e) => tracing::warn!(error = %e, "the web console's task ended"),
                        Ok(Ok(())) => {}
                    }
                }
            };
            tokio::join!(api, console).0
        };
        tokio::select! {
            r = servers => r.context("serving the API")?,
            () = grace => tracing::info!("connections still open after the stop (event streams); closing them"),
        }
        cluster.stop();
        tracing::info!("controller stopped; agents and VMs carry on");
        Ok(ExitCode::SUCCESS)
    })
}

/// One of several controllers sharing etcd: leads or follows until Ctrl-C or SIGTERM.
async fn run_ha(
    a: ControllerArgs,
    config: ControllerConfig,
    listener: walkabout_trust::Listener,
    trust: std::sync::Arc<walkabout_controller::join::Trust>,
    url: String,
) -> anyhow::Result<ExitCode> {
    let etcd = walkabout_controller::EtcdConfig::parse(&a.store).map_err(|e| anyhow::anyhow!("--store: {e}; or `redb`"))?;
    let ha = walkabout_controller::HaConfig {
        etcd: etcd.clone(),
        url: url.clone(),
        lease_ttl: std::time::Duration::from_secs(a.lease_ttl.max(1)),
    };
    walkabout_testbed::write_atomic(&a.data_dir.join("controller.url"), url.as_bytes()).context("writing controller.url")?;
    let _ = super::out::line(format_args!("walkabout controller listening on {url}, joining the controllers on {}", etcd.describe()));
    walkabout_controller::serve_ha(config, ha, a.agents, listener, trust, super::agent::shutdown_signal()).await?;
    tracing::info!("controller stopped; agents and VMs carry on");
    Ok(ExitCode::SUCCESS)
}
