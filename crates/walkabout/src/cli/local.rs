//! A local cluster on one machine: agent processes on loopback ports, or each in a
//! network namespace of its own behind a bridge, and their clean removal (VMs deleted,
//! agents stopped, namespaces and bridge gone) on shutdown or drop.

use super::client::Client;
use anyhow::{bail, Context};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bridge joining the hosts' namespaces in `--netns` mode.
const BRIDGE: &str = "wabr0";
/// The hosts' subnet in `--netns` mode: host N is .N, the bridge (this machine) is .254.
const SUBNET: &str = "10.252.0";

/// One agent process of the local cluster.
pub struct LocalAgent {
    /// Host name (`h1`, `h2`, ...).
    pub name: String,
    /// Its API URL.
    pub url: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    child: Option<Child>,
}

/// How to start the local cluster.
pub struct LocalOptions {
    /// Number of hosts.
    pub hosts: usize,
    /// First loopback port (host N listens on base + N - 1); unused with netns.
    pub base_port: u16,
    /// Accelerator for the agents (`auto`, `kvm`, `tcg`).
    pub accel: String,
    /// Memory each host offers VMs (e.g. `2G`); default: the agent's own.
    pub capacity: Option<String>,
    /// Put each host in a network namespace of its own.
    pub netns: bool,
    /// Directory for the agents' data; removed at shutdown.
    pub root: PathBuf,
}

/// The running local cluster.
pub struct LocalCluster {
    /// Its agents.
    pub agents: Vec<LocalAgent>,
    namespaces: Vec<String>,
    root: PathBuf,
    down: bool,
}

fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl LocalCluster {
    /// Starts the agents and waits until each serves its API.
    pub fn start(opts: &LocalOptions) -> anyhow::Result<LocalCluster> {
        let exe = std::env::current_exe().context("finding the walkabout binary")?;
        std::fs::create_dir_all(&opts.root).with_context(|| format!("creating {}", opts.root.display()))?;
        let mut cluster = LocalCluster { agents: vec![], namespaces: vec![], root: opts.root.clone(), down: false };
        if opts.netns {
            cluster.make_network(opts.hosts)?;
        }
        for n in 1..=opts.hosts {
            let name = format!("h{n}");
            let data_dir = opts.root.join(&name);
            std::fs::create_dir_all(&data_dir)?;
            let listen = if opts.netns {
                format!("{SUBNET}.{n}:7701")
            } else {
                let port = usize::from(opts.base_port) + n - 1;
                format!("127.0.0.1:{port}")
            };
            let mut cmd = if opts.netns {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &cluster.namespaces[n - 1]]).arg(&exe);
                c
            } else {
                Command::new(&exe)
            };
            cmd.args(["agent", "--listen", &listen, "--accel", &opts.accel, "--data-dir"]).arg(&data_dir);
            if let Some(c) = &opts.capacity {
                cmd.args(["--capacity", c]);
            }
            let log = std::fs::File::create(data_dir.join("agent.log"))?;
            let child = cmd.stdout(Stdio::null()).stderr(log).spawn().context("starting an agent")?;
            cluster.agents.push(LocalAgent { name, url: String::new(), data_dir, child: Some(child) });
        }
        for a in &mut cluster.agents {
            a.url = wait_url(a)?;
        }
        Ok(cluster)
    }

    /// Namespaces `wa-hN`, each with `eth0` at 10.252.0.N, all on one bridge.
    fn make_network(&mut self, hosts: usize) -> anyhow::Result<()> {
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
        sh("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        sh("ip", &["addr", "add", &format!("{SUBNET}.254/24"), "dev", BRIDGE])?;
        sh("ip", &["link", "set", BRIDGE, "up"])?;
        for n in 1..=hosts {
            let ns = format!("wa-h{n}");
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            sh("ip", &["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let host_end = format!("wa-h{n}");
            sh("ip", &["link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            sh("ip", &["link", "set", &host_end, "master", BRIDGE, "up"])?;
            sh("ip", &["-n", &ns, "addr", "add", &format!("{SUBNET}.{n}/24"), "dev", "eth0"])?;
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Deletes every VM, stops the agents, removes namespaces and data. Idempotent.
    pub async fn shutdown(&mut self) {
        if self.down {
            return;
        }
        self.down = true;
        for a in &self.agents {
            if let Ok(c) = Client::new(&a.url) {
                if let Ok(vms) = c.get::<Vec<Value>>("/v1/vms").await {
                    for v in vms {
                        if let Some(n) = v["spec"]["name"].as_str() {
                            let _ = c.delete(&format!("/v1/vms/{n}")).await;
                        }
                    }
                }
            }
        }
        self.stop_processes();
    }

    fn stop_processes(&mut self) {
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                if let Ok(pid) = i32::try_from(c.id()) {
                    // SAFETY: kill(2) with the pid of a child we spawned and have not yet
                    // waited on, so it still names that child; SIGTERM lets the agent exit
                    // cleanly.
                    unsafe {
                        libc::kill(pid, libc::SIGTERM);
                    }
                }
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            kill_leftover_qemus(&a.data_dir);
        }
        for ns in self.namespaces.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        if !self.agents.is_empty() {
            let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if !self.down {
            self.down = true;
            self.stop_processes();
        }
    }
}

/// Kills any QEMU whose pid file is still under `data_dir` (a backstop: the agents'
/// VMs were deleted through the API first).
fn kill_leftover_qemus(data_dir: &Path) {
    let Ok(vms) = std::fs::read_dir(data_dir.join("vms")) else { return };
    for vm in vms.flatten() {
        if let Ok(pid) = std::fs::read_to_string(vm.path().join("qemu.pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).output();
        }
    }
}

fn wait_url(a: &mut LocalAgent) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        if let Ok(url) = std::fs::read_to_string(a.data_dir.join("agent.url")) {
            return Ok(url);
        }
        if let Some(Ok(Some(status))) = a.child.as_mut().map(|c| c.try_wait()) {
            let log = std::fs::read_to_string(a.data_dir.join("agent.log")).unwrap_or_default();
            bail!("agent {} exited ({status}): {}", a.name, log.lines().last().unwrap_or(""));
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("agent {} did not start within 300 s (see {})", a.name, a.data_dir.join("agent.log").display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
