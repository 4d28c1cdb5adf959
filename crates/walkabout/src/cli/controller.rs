//! `walkabout controller`: the cluster controller daemon.

use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;
use walkabout_api::ExecLimits;
use walkabout_controller::ControllerConfig;

/// Arguments of `walkabout controller`.
#[derive(clap::Args)]
pub struct ControllerArgs {
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
    /// and the same API under `/v1`. Its URL is printed and written to DATA_DIR/web.url.
    #[arg(long)]
    web_listen: Option<String>,
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
            ..ControllerConfig::new(self.data_dir.clone())
        })
    }
}

/// How long servers get to close their connections after a stop: event streams (a
/// browser's, a `walk --follow`) never end by themselves.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the controller until Ctrl-C or SIGTERM. Agents and VMs carry on without it.
pub fn run(a: ControllerArgs) -> anyhow::Result<ExitCode> {
    super::client::runtime()?.block_on(async move {
        let config = a.config()?;
        std::fs::create_dir_all(&a.data_dir).with_context(|| format!("creating {}", a.data_dir.display()))?;
        let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("cannot listen on {}", a.listen))?;
        let url = format!("http://{}", listener.local_addr()?);
        if a.store != "redb" {
            return run_ha(a, config, listener, url).await;
        }
        let web = match &a.web_listen {
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (web console)"))?)
            }
            None => None,
        };
        let cluster = walkabout_controller::start(config, &a.agents).await?;
        // The games are clients of this API, at the address just bound.
        cluster.games().serve_at(&url)?;
        let console = match web {
            Some(l) => {
                let web_url = format!("http://{}/", l.local_addr()?);
                walkabout_testbed::write_atomic(&a.data_dir.join("web.url"), web_url.as_bytes()).context("writing web.url")?;
                let _ = super::out::line(format_args!("web console on {web_url}"));
                let app = walkabout_web::console(walkabout_controller::api::router(cluster.clone()));
                let stop = cluster.clone();
                Some(tokio::spawn(async move { axum::serve(l, app).with_graceful_shutdown(async move { stop.stopped().await }).await }))
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
        let api = axum::serve(listener, walkabout_controller::api::router(cluster.clone()))
            .with_graceful_shutdown(async move { stopped.stopped().await });
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
async fn run_ha(a: ControllerArgs, config: ControllerConfig, listener: tokio::net::TcpListener, url: String) -> anyhow::Result<ExitCode> {
    let etcd = walkabout_controller::EtcdConfig::parse(&a.store).map_err(|e| anyhow::anyhow!("--store: {e}; or `redb`"))?;
    let ha = walkabout_controller::HaConfig {
        etcd: etcd.clone(),
        url: url.clone(),
        lease_ttl: std::time::Duration::from_secs(a.lease_ttl.max(1)),
    };
    walkabout_testbed::write_atomic(&a.data_dir.join("controller.url"), url.as_bytes()).context("writing controller.url")?;
    let _ = super::out::line(format_args!("walkabout controller listening on {url}, joining the controllers on {}", etcd.describe()));
    walkabout_controller::serve_ha(config, ha, a.agents, listener, super::agent::shutdown_signal()).await?;
    tracing::info!("controller stopped; agents and VMs carry on");
    Ok(ExitCode::SUCCESS)
}
