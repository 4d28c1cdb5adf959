//! `walkabout agent` and `walkabout controller` processes: started from a given binary,
//! on loopback or inside a network namespace, each announcing its URL in a file of its
//! data directory; restarted, killed, and cleaned up after (QEMUs included) on drop.

use crate::error::{Result, TestbedError};
use crate::files::TempDir;
use crate::process::{kill_qemus, qemu_pids, Daemon};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `BIN ARGS`, run as `ip netns exec NS BIN ARGS` when `netns` is given.
pub fn walkabout_command(bin: &Path, netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// How to start one `walkabout agent`.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// The `walkabout` binary.
    pub bin: PathBuf,
    /// Its name in messages and in a cluster (`h1`...; may be empty).
    pub name: String,
    /// `--listen` (port 0 picks a free one).
    pub listen: String,
    /// Network namespace to run it in.
    pub netns: Option<String>,
    /// `--accel`, unless `args` has one.
    pub accel: String,
    /// Further arguments (`--capacity 1G`, ...).
    pub args: Vec<String>,
    /// Environment variables (e.g. `WALKABOUT_LOG`).
    pub env: Vec<(String, String)>,
    /// How long it may take to write its URL file (the accelerator measurement and a
    /// first guest-image build happen before).
    pub start_limit: Duration,
    /// The agent's identity bundle (a host certificate): it serves TLS with it. Without
    /// one it serves plain HTTP on loopback (`--insecure-loopback`).
    pub identity: Option<PathBuf>,
    /// The identity [`Agent::command`] runs the CLI with (an operator's).
    pub cli_identity: Option<PathBuf>,
}

impl AgentSpec {
    /// An agent of `bin` on a free loopback port under TCG.
    pub fn new(bin: impl Into<PathBuf>) -> AgentSpec {
        AgentSpec {
            bin: bin.into(),
            name: String::new(),
            listen: "127.0.0.1:0".into(),
            netns: None,
            accel: "tcg".into(),
            args: vec![],
            env: vec![],
            start_limit: Duration::from_secs(180),
            identity: None,
            cli_identity: None,
        }
    }

    /// Serving TLS as the host `identity` (a bundle file); the CLI run through
    /// [`Agent::command`] uses `operator`.
    pub fn tls(mut self, identity: &Path, operator: &Path) -> AgentSpec {
        self.identity = Some(identity.to_path_buf());
        self.cli_identity = Some(operator.to_path_buf());
        self
    }

    /// With further arguments.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> AgentSpec {
        self.args.extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// With an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> AgentSpec {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Listening on `listen`, inside `netns` if given.
    pub fn at(mut self, netns: Option<&str>, listen: &str) -> AgentSpec {
        self.netns = netns.map(String::from);
        self.listen = listen.into();
        self
    }

    fn command(&self, data: &Path) -> Command {
        let mut c = walkabout_command(&self.bin, self.netns.as_deref());
        c.args(["agent", "--listen", &self.listen, "--data-dir"]).arg(data);
        match &self.identity {
            Some(id) => {
                c.arg("--identity").arg(id);
            }
            None => {
                c.arg("--insecure-loopback");
            }
        }
        if !self.args.iter().any(|a| a == "--accel") {
            c.args(["--accel", &self.accel]);
        }
        c.args(&self.args).envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

/// A running `walkabout agent` with its data directory (`agent.url`, `agent.log`, its
/// VMs). On drop the agent is killed, then every QEMU it left, then the data directory
/// if the testbed created it.
#[derive(Debug)]
pub struct Agent {
    /// Its name (`h1`...; empty unless its spec gave one).
    pub name: String,
    /// Its API URL, as it wrote it to `agent.url`.
    pub url: String,
    /// Its data directory.
    pub data: PathBuf,
    spec: AgentSpec,
    daemon: Option<Daemon>,
    _dir: Option<TempDir>,
}

impl Agent {
    /// Starts an agent in a fresh temporary data directory and waits for its URL.
    pub fn start(spec: AgentSpec) -> Result<Agent> {
        let dir = TempDir::new("agent")?;
        let mut a = Agent::launch(spec, dir.path())?;
        a._dir = Some(dir);
        a.wait_url()?;
        Ok(a)
    }

    /// Starts an agent on data directory `data` (created if missing, kept on drop)
    /// without waiting: call [`Agent::wait_url`] next. Several agents start in parallel
    /// this way.
    pub fn launch(mut spec: AgentSpec, data: &Path) -> Result<Agent> {
        std::fs::create_dir_all(data).map_err(|e| TestbedError::io(format!("creating {}", data.display()), e))?;
        if spec.netns.is_some() && spec.identity.is_none() {
            // Off loopback an agent serves TLS only: a host certificate of this
            // process's shared test CA, valid at its listen address.
            let ca = crate::trust::TestCa::shared()?;
            let ip = spec.listen.rsplit_once(':').map(|(ip, _)| ip.to_string()).unwrap_or_default();
            let name = if spec.name.is_empty() { format!("agent-{}", ip.replace(['.', ':'], "-")) } else { spec.name.clone() };
            let id = ca.host(&name, &ip)?;
            spec = spec.tls(&id, &ca.operator());
        }
        let mut a = Agent { name: spec.name.clone(), url: String::new(), data: data.to_path_buf(), spec, daemon: None, _dir: None };
        a.spawn()?;
        Ok(a)
    }

    fn spawn(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(self.data.join("agent.url"));
        self.url.clear();
        let what = format!("agent {}", self.name).trim_end().to_string();
        self.daemon = Some(Daemon::spawn(&what, self.spec.command(&self.data), &self.data.join("agent.log"))?);
        Ok(())
    }

    /// Waits until the agent has written its URL (fails with its log tail if it exits
    /// first or takes longer than its spec allows).
    pub fn wait_url(&mut self) -> Result<&str> {
        let file = self.data.join("agent.url");
        let limit = self.spec.start_limit;
        let daemon =
            self.daemon.as_mut().ok_or_else(|| TestbedError::NotRunning { what: format!("agent {}", self.name).trim_end().to_string() })?;
        self.url = daemon.wait_url(&file, limit)?;
        Ok(&self.url)
    }

    /// Starts the agent process again on the same data directory (after [`Agent::kill`])
    /// and waits for its URL; its VMs, if still running, are re-attached by the agent.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_url().map(|_| ())
    }

    /// Kills the agent process (SIGKILL); its VMs keep running.
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// Stops the agent process (SIGTERM, then SIGKILL after `grace`); VMs keep running.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(grace);
        }
    }

    /// The agent's pid while it runs.
    pub fn pid(&self) -> Option<i64> {
        self.daemon.as_ref().and_then(Daemon::pid)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("agent.log")).unwrap_or_default()
    }

    /// Live QEMUs its data directory holds pid files for.
    pub fn qemu_pids(&self) -> Vec<i64> {
        qemu_pids(&self.data)
    }

    /// Its network namespace, if any.
    pub fn netns(&self) -> Option<&str> {
        self.spec.netns.as_deref()
    }

    /// `walkabout ARGS --agent URL`, in the agent's namespace, logging warnings only.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = walkabout_command(&self.spec.bin, self.netns());
        c.args(args).args(["--agent", &self.url]).env("WALKABOUT_LOG", "warn");
        if let Some(id) = &self.spec.cli_identity {
            c.arg("--identity").arg(id);
        }
        c
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        kill_qemus(&self.data);
    }
}

/// How to start one `walkabout controller`.
#[derive(Clone, Debug)]
pub struct ControllerSpec {
    /// The `walkabout` binary.
    pub bin: PathBuf,
    /// `--listen` (port 0 picks a free one).
    pub listen: String,
    /// `--agent` values (`NAME=URL` or `URL`), in order.
    pub agents: Vec<String>,
    /// Further arguments (`--per-host-out 2`, ...).
    pub args: Vec<String>,
    /// Environment variables; `WALKABOUT_LOG=info` unless given.
    pub env: Vec<(String, String)>,
    /// How long it may take to write its URL file.
    pub start_limit: Duration,
    /// The cluster CA's directory: the controller issues itself a certificate, serves
    /// TLS and signs joins. Without one it serves plain HTTP on loopback.
    pub ca_dir: Option<PathBuf>,
    /// The identity [`Controller::command`] runs the CLI with (an operator's).
    pub cli_identity: Option<PathBuf>,
}

impl ControllerSpec {
    /// A controller of `bin` on a free loopback port, registering `agents` as h1, h2...
    pub fn new(bin: impl Into<PathBuf>, agents: &[&Agent]) -> ControllerSpec {
        ControllerSpec {
            bin: bin.into(),
            listen: "127.0.0.1:0".into(),
            agents: agents.iter().enumerate().map(|(i, a)| format!("h{}={}", i + 1, a.url)).collect(),
            args: vec![],
            env: vec![("WALKABOUT_LOG".into(), "info".into())],
            start_limit: Duration::from_secs(60),
            ca_dir: None,
            cli_identity: None,
        }
    }

    /// Serving TLS with the CA in `ca_dir`; the CLI run through [`Controller::command`]
    /// uses `operator`.
    pub fn tls(mut self, ca_dir: &Path, operator: &Path) -> ControllerSpec {
        self.ca_dir = Some(ca_dir.to_path_buf());
        self.cli_identity = Some(operator.to_path_buf());
        self
    }

    /// With further arguments.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> ControllerSpec {
        self.args.extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    fn command(&self, data: &Path) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(["controller", "--listen", &self.listen, "--data-dir"]).arg(data);
        match &self.ca_dir {
            Some(d) => {
                c.arg("--ca-dir").arg(d);
            }
            None => {
                c.arg("--insecure-loopback");
            }
        }
        for a in &self.agents {
            c.args(["--agent", a]);
        }
        c.args(&self.args).envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

/// A running `walkabout controller` with its own temporary data directory
/// (`controller.url`, `controller.log`, its database), killed on drop; agents and VMs
/// are not its to stop.
#[derive(Debug)]
pub struct Controller {
    /// Its API URL, as it wrote it to `controller.url`.
    pub url: String,
    /// Its data directory.
    pub data: PathBuf,
    spec: ControllerSpec,
    daemon: Option<Daemon>,
    _dir: TempDir,
}

impl Controller {
    /// Starts a controller and waits for its URL.
    pub fn start(spec: ControllerSpec) -> Result<Controller> {
        let dir = TempDir::new("ctl")?;
        let mut c = Controller { url: String::new(), data: dir.path().to_path_buf(), spec, daemon: None, _dir: dir };
        c.restart()?;
        Ok(c)
    }

    /// (Re)starts the controller process on its data directory and waits for its URL.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let file = self.data.join("controller.url");
        let _ = std::fs::remove_file(&file);
        let mut d = Daemon::spawn("controller", self.spec.command(&self.data), &self.data.join("controller.log"))?;
        self.url = d.wait_url(&file, self.spec.start_limit)?;
        self.daemon = Some(d);
        Ok(())
    }

    /// The controller's pid while it runs.
    pub fn pid(&self) -> Option<i64> {
        self.daemon.as_ref().and_then(Daemon::pid)
    }

    /// Kills the controller (SIGKILL); agents and VMs carry on.
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// The controller's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("controller.log")).unwrap_or_default()
    }

    /// The web console's URL with a one-time operator login token
    /// (`http://ADDR/login?token=...`), when it was started with `--web-listen` (written to
    /// `web.url` before `controller.url`).
    pub fn web_url(&self) -> Option<String> {
        crate::files::read_url(&self.data.join("web.url"))
    }

    /// `walkabout ARGS --controller URL`, logging warnings only.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.spec.bin);
        c.args(args).args(["--controller", &self.url]).env("WALKABOUT_LOG", "warn");
        if let Some(id) = &self.spec.cli_identity {
            c.arg("--identity").arg(id);
        }
        c
    }
}
