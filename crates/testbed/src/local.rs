//! A local cluster for `walkabout up` and `walkabout demo`: agents on consecutive
//! loopback ports, or each in a network namespace of its own behind a bridge, removed
//! cleanly (agents stopped, leftover QEMUs killed, namespaces, bridge and data gone) on
//! shutdown or drop.

use crate::daemons::{Agent, AgentSpec};
use crate::error::{Result, TestbedError};
use crate::net::BridgeNet;
use crate::trust::TestCa;
use std::path::PathBuf;
use std::time::Duration;

/// The port agents listen on inside their namespaces.
const NETNS_PORT: u16 = 7701;

/// How to start a local cluster.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The `walkabout` binary.
    pub bin: PathBuf,
    /// Number of hosts (agents `h1`..).
    pub hosts: usize,
    /// First loopback port (host N listens on base + N - 1); unused with `netns`.
    pub base_port: u16,
    /// Accelerator for the agents (`auto`, `kvm`, `tcg`).
    pub accel: String,
    /// Memory each host offers VMs (e.g. `2G`); default: the agent's own.
    pub capacity: Option<String>,
    /// Put each host in a network namespace of its own (needs root).
    pub netns: bool,
    /// Directory for the agents' data (`ROOT/hN`); removed at shutdown.
    pub root: PathBuf,
    /// Mutual TLS: a CA of its own in `ROOT/trust`, a host certificate per agent and
    /// an operator identity (`ROOT/trust/operator.pem`). Otherwise plain HTTP on
    /// loopback.
    pub tls: bool,
}

/// The running local cluster.
#[derive(Debug)]
pub struct LocalCluster {
    /// Its agents, `h1` first.
    pub agents: Vec<Agent>,
    /// Its CA, with TLS.
    pub ca: Option<TestCa>,
    /// The operator identity the CLI and the controller's clients use, with TLS.
    pub operator: Option<PathBuf>,
    net: Option<BridgeNet>,
    root: PathBuf,
    down: bool,
}

impl LocalCluster {
    /// Starts the agents together and waits until each has written its URL.
    pub fn start(opts: &LocalOptions) -> Result<LocalCluster> {
        std::fs::create_dir_all(&opts.root).map_err(|e| TestbedError::io(format!("creating {}", opts.root.display()), e))?;
        let mut cluster = LocalCluster { agents: vec![], ca: None, operator: None, net: None, root: opts.root.clone(), down: false };
        if opts.netns {
            cluster.net = Some(BridgeNet::local_cluster(opts.hosts)?);
        }
        if opts.tls {
            let ca = TestCa::in_dir(&opts.root.join("trust"))?;
            cluster.operator = Some(ca.user("operator", walkabout_trust::Role::Operator)?);
            cluster.ca = Some(ca);
        }
        for n in 1..=opts.hosts {
            let (netns, listen) = match &cluster.net {
                Some(net) => (net.namespace(n).map(String::from), format!("{}:{NETNS_PORT}", net.addr(n))),
                None => (None, format!("127.0.0.1:{}", usize::from(opts.base_port) + n - 1)),
            };
            let mut spec = AgentSpec::new(&opts.bin).at(netns.as_deref(), &listen);
            spec.name = format!("h{n}");
            spec.accel = opts.accel.clone();
            // Musical chairs and the failover tests pull the plug on hosts.
            spec = spec.args(&["--allow-power-cut"]);
            if let Some(c) = &opts.capacity {
                spec = spec.args(&["--capacity", c]);
            }
            if let (Some(ca), Some(op)) = (&cluster.ca, &cluster.operator) {
                let ip = listen.rsplit_once(':').map(|(ip, _)| ip).unwrap_or("127.0.0.1");
                let id = ca.host(&spec.name, ip)?;
                spec = spec.tls(&id, op);
            }
            let data = opts.root.join(&spec.name);
            cluster.agents.push(Agent::launch(spec, &data)?);
        }
        for a in &mut cluster.agents {
            a.wait_url()?;
        }
        Ok(cluster)
    }

    /// Cuts host `n`'s network link (see [`BridgeNet::cut`]); for clusters started with
    /// `netns` only.
    pub fn cut(&self, n: usize) -> Result<()> {
        self.bridge(n)?.cut(n)
    }

    /// Restores host `n`'s link after [`LocalCluster::cut`].
    pub fn restore(&self, n: usize) -> Result<()> {
        self.bridge(n)?.restore(n)
    }

    fn bridge(&self, n: usize) -> Result<&BridgeNet> {
        self.net.as_ref().ok_or(TestbedError::NoSuchHost { host: n, what: "cluster without namespaces" })
    }

    /// Stops the agents (SIGTERM, then SIGKILL), kills the QEMUs they leave, removes
    /// the namespaces, the bridge and the data. Delete the VMs through the API first for
    /// a graceful end of the guests. Idempotent.
    pub fn shutdown(&mut self) {
        if self.down {
            return;
        }
        self.down = true;
        for a in &mut self.agents {
            a.stop(Duration::from_secs(5));
        }
        // Dropping an agent kills the QEMUs it left.
        self.agents.clear();
        self.net = None;
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}
