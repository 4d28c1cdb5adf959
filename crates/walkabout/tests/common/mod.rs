//! Test harness: real agents (the `walkabout` binary) with their own data directories,
//! driven through the real CLI. Everything started is killed on drop, QEMU included.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `walkabout` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_walkabout")
}

/// A fresh temporary directory, removed on drop. Short paths: QMP sockets live in it.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `/tmp/wa-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = PathBuf::from(format!("/tmp/wa-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `walkabout ARGS`, returning its output.
pub fn walkabout(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env("WALKABOUT_LOG", "warn").output().expect("run walkabout")
}

/// Runs `walkabout ARGS --output json` and parses stdout; panics with stderr on failure.
pub fn json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    let out = walkabout(&a);
    assert!(out.status.success(), "walkabout {a:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("walkabout {a:?}: bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Runs `walkabout ARGS` expecting failure; returns stderr.
pub fn fails(args: &[&str]) -> String {
    let out = walkabout(args);
    assert!(!out.status.success(), "walkabout {args:?} should have failed but printed {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Builds (or reuses from the cache) the guest image once per test binary.
pub fn guest_image() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let out = walkabout(&["image", "build"]);
        assert!(out.status.success(), "image build failed: {}", String::from_utf8_lossy(&out.stderr));
    });
}

/// Waits until the daemon `child` (an agent or controller) has written a whole URL to
/// `url_file`; panics with its log if it exits first or takes longer than `limit`.
fn wait_url(what: &str, child: &mut Option<Child>, url_file: &Path, log_file: &Path, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        match std::fs::read_to_string(url_file) {
            Ok(url) if url.starts_with("http://") => return url,
            _ => {}
        }
        if let Some(Ok(Some(status))) = child.as_mut().map(|c| c.try_wait()) {
            panic!("{what} exited with {status}: {}", read_log(log_file));
        }
        assert!(start.elapsed() < limit, "{what} did not start: {}", read_log(log_file));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A daemon's log so far.
fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Kills (SIGKILL) and reaps a daemon we started, if it still runs.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A running agent process with its own data directory, optionally inside a network
/// namespace (a host of its own).
pub struct AgentProc {
    pub url: String,
    pub data: PathBuf,
    child: Option<Child>,
    _dir: Option<TempDir>,
    netns: Option<String>,
    listen: String,
}

/// `cmd` prefixed with `ip netns exec NS` when `netns` is set.
fn in_netns(netns: &Option<String>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

impl AgentProc {
    /// Starts an agent on a free loopback port under TCG with `extra` arguments.
    pub fn start(extra: &[&str]) -> AgentProc {
        AgentProc::start_at(None, "127.0.0.1:0", extra)
    }

    /// Starts an agent listening on `listen`, inside network namespace `netns` if given.
    pub fn start_at(netns: Option<&str>, listen: &str, extra: &[&str]) -> AgentProc {
        guest_image();
        let dir = TempDir::new("agent");
        let data = dir.0.clone();
        let mut a = AgentProc {
            url: String::new(),
            data,
            child: None,
            _dir: Some(dir),
            netns: netns.map(String::from),
            listen: listen.to_string(),
        };
        a.spawn(extra);
        a
    }

    /// (Re)starts the agent process on this data directory.
    pub fn spawn(&mut self, extra: &[&str]) {
        let _ = std::fs::remove_file(self.data.join("agent.url"));
        let listen = self.listen.clone();
        let mut args = vec!["agent", "--listen", &listen, "--data-dir"];
        let data = self.data.display().to_string();
        args.push(&data);
        if !extra.iter().any(|a| *a == "--accel") {
            args.extend(["--accel", "tcg"]);
        }
        args.extend(extra);
        let log = std::fs::File::create(self.data.join("agent.log")).expect("agent log");
        let child = in_netns(&self.netns, bin()).args(&args).stdout(Stdio::null()).stderr(log).spawn().expect("spawn agent");
        self.child = Some(child);
        self.url = wait_url("agent", &mut self.child, &self.data.join("agent.url"), &self.data.join("agent.log"), Duration::from_secs(120));
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        read_log(&self.data.join("agent.log"))
    }

    /// Kills the agent process (SIGKILL); its VMs keep running.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// `walkabout ARGS --agent URL` (in the agent's namespace).
    pub fn run(&self, args: &[&str]) -> Output {
        in_netns(&self.netns, bin()).args(args).args(["--agent", &self.url]).env("WALKABOUT_LOG", "warn").output().expect("run walkabout")
    }

    /// `walkabout ARGS --agent URL --output json`.
    pub fn cli(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.run(&a);
        assert!(out.status.success(), "walkabout {a:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("walkabout {a:?}: bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// `walkabout ARGS --agent URL`, expecting failure; returns stderr.
    pub fn cli_fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "walkabout {args:?} should have failed but printed {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `walkabout migrate VM --to DEST --wait --output json EXTRA...`: the final summary,
    /// whether or not the migration completed.
    pub fn migrate(&self, vm: &str, dest: &AgentProc, extra: &[&str]) -> Value {
        let mut a = vec!["migrate", vm, "--to", &dest.url, "--wait", "--output", "json"];
        a.extend(extra);
        let out = self.run(&a);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("migrate {vm}: bad JSON ({e}): {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        })
    }

    /// Starts a migration without waiting; returns its id.
    pub fn start_migration(&self, vm: &str, dest: &AgentProc, extra: &[&str]) -> String {
        let mut a = vec!["migrate", vm, "--to", &dest.url];
        a.extend(extra);
        let rec = self.cli(&a);
        rec["id"].as_str().expect("migration id").to_string()
    }

    /// `walkabout migration show ID`: the migration's record.
    pub fn migration(&self, id: &str) -> Value {
        self.cli(&["migration", "show", id])
    }

    /// Waits until migration `id` has sent at least `bytes`.
    pub fn wait_transferred(&self, id: &str, bytes: u64) -> Value {
        let start = Instant::now();
        loop {
            let m = self.migration(id);
            if m["progress"]["transferred_bytes"].as_u64().unwrap_or(0) >= bytes {
                return m;
            }
            assert!(!matches!(m["phase"].as_str(), Some("completed" | "failed" | "cancelled")), "migration ended early: {m}");
            assert!(start.elapsed() < Duration::from_secs(60), "migration {id} is not moving: {m}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until migration `id` is final; returns its record.
    pub fn wait_final(&self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let m = self.migration(id);
            if matches!(m["phase"].as_str(), Some("completed" | "failed" | "cancelled")) {
                return m;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "migration {id} never ended: {m}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pids of the QEMUs this agent's data directory holds pid files for, still alive.
    pub fn qemu_pids(&self) -> Vec<i64> {
        let Ok(vms) = std::fs::read_dir(self.data.join("vms")) else { return vec![] };
        vms.flatten()
            .filter_map(|vm| std::fs::read_to_string(vm.path().join("qemu.pid")).ok())
            .filter_map(|p| p.trim().parse().ok())
            .filter(|p| alive(*p))
            .collect()
    }

    /// `walkabout vm info NAME`.
    pub fn info(&self, name: &str) -> Value {
        self.cli(&["vm", "info", name])
    }

    /// Waits until VM `name` has logged at least `n` heartbeats in total.
    pub fn wait_heartbeats(&self, name: &str, n: u64) -> Value {
        let start = Instant::now();
        loop {
            let v = self.info(name);
            if v["guest"]["heartbeats"].as_u64().unwrap_or(0) >= n {
                return v;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "VM {name} has not reached {n} heartbeats: {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
        kill_qemus(&self.data);
    }
}

/// Kills every QEMU whose pid file lies under `dir`.
pub fn kill_qemus(dir: &Path) {
    let Ok(vms) = std::fs::read_dir(dir.join("vms")) else { return };
    for vm in vms.flatten() {
        if let Ok(pid) = std::fs::read_to_string(vm.path().join("qemu.pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

/// True while process `pid` exists and is not a zombie.
pub fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')).unwrap_or(false))
        .unwrap_or(false)
}

/// Asserts a guest has been healthy all along: continuous heartbeats (across hosts),
/// no corrupt page, no kernel trouble.
pub fn assert_healthy(vm: &Value) {
    let g = &vm["guest"];
    assert_eq!(g["corrupt_pages"], 0, "corrupt pages: {vm}");
    assert_eq!(g["seq_breaks"], 0, "heartbeat sequence broke: {vm}");
    assert_eq!(g["kernel_trouble"], false, "kernel trouble: {vm}");
    assert_eq!(g["ready"], true, "guest not ready: {vm}");
}

/// Waits until `pid` has exited, up to `secs`.
pub fn wait_gone(pid: i64, secs: u64) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > Duration::from_secs(secs) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Two hosts of their own: network namespaces joined by a veth pair, addresses
/// 10.251.N.1 and 10.251.N.2. Removed on drop.
pub struct NetPair {
    pub a: String,
    pub b: String,
    pub addr_a: String,
    pub addr_b: String,
    pub veth_a: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl NetPair {
    /// Creates the pair; `n` makes names and addresses unique per test.
    pub fn new(n: u8) -> NetPair {
        let id = std::process::id() % 10000;
        let (a, b) = (format!("wa{id}-{n}a"), format!("wa{id}-{n}b"));
        let (va, vb) = (format!("wa{id}v{n}a"), format!("wa{id}v{n}b"));
        let (addr_a, addr_b) = (format!("10.251.{n}.1"), format!("10.251.{n}.2"));
        for ns in [&a, &b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b]);
        ip(&["-n", &a, "addr", "add", &format!("{addr_a}/24"), "dev", &va]);
        ip(&["-n", &b, "addr", "add", &format!("{addr_b}/24"), "dev", &vb]);
        ip(&["-n", &a, "link", "set", &va, "up"]);
        ip(&["-n", &b, "link", "set", &vb, "up"]);
        NetPair { a, b, addr_a, addr_b, veth_a: va }
    }

    /// Rate-limits A's egress (the migration stream's direction) with a token bucket.
    pub fn limit_a(&self, rate: &str) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.a,
                "tc",
                "qdisc",
                "add",
                "dev",
                &self.veth_a,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "100ms",
            ])
            .output()
            .expect("tc");
        assert!(out.status.success(), "tc: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Cuts the link (A's end down).
    pub fn cut(&self) {
        ip(&["-n", &self.a, "link", "set", &self.veth_a, "down"]);
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A running controller process (`walkabout controller`) with its own data directory,
/// killed on drop.
pub struct ControllerProc {
    pub url: String,
    pub data: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    _dir: TempDir,
}

impl ControllerProc {
    /// Starts a controller on a free loopback port with `agents` registered as h1, h2...
    /// in order, and `extra` arguments; waits until every host has been polled.
    pub fn start(agents: &[&AgentProc], extra: &[&str]) -> ControllerProc {
        let dir = TempDir::new("ctl");
        let mut args: Vec<String> = vec![];
        for (i, a) in agents.iter().enumerate() {
            args.push("--agent".into());
            args.push(format!("h{}={}", i + 1, a.url));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut c = ControllerProc { url: String::new(), data: dir.0.clone(), child: None, args, _dir: dir };
        c.spawn();
        c
    }

    /// (Re)starts the controller process on this data directory.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.data.join("controller.url"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.data.join("controller.log")).expect("controller log");
        let child = Command::new(bin())
            .args(["controller", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&self.data)
            .args(&self.args)
            .env("WALKABOUT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn controller");
        self.child = Some(child);
        self.url = wait_url(
            "controller",
            &mut self.child,
            &self.data.join("controller.url"),
            &self.data.join("controller.log"),
            Duration::from_secs(60),
        );
    }

    /// The controller's log so far.
    pub fn log(&self) -> String {
        read_log(&self.data.join("controller.log"))
    }

    /// Kills the controller (SIGKILL); agents and VMs carry on.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// `walkabout ARGS --controller URL`.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin()).args(args).args(["--controller", &self.url]).env("WALKABOUT_LOG", "warn").output().expect("run walkabout")
    }

    /// `walkabout ARGS --controller URL --output json`, whatever the exit status.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.run(&a);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("walkabout {a:?}: bad JSON ({e}): {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        })
    }

    /// `walkabout ARGS --controller URL --output json`, which must succeed.
    pub fn cli(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.run(&a);
        assert!(out.status.success(), "walkabout {a:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("walkabout {a:?}: bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// The cluster's hosts by name.
    pub fn host(&self, name: &str) -> Value {
        let hosts = self.cli(&["host", "list"]);
        hosts.as_array().and_then(|h| h.iter().find(|h| h["name"] == name).cloned()).unwrap_or_else(|| panic!("no host {name}: {hosts}"))
    }

    /// Waits until the controller sees `n` VMs whose guests are ready.
    pub fn wait_vms(&self, n: usize) {
        let start = Instant::now();
        loop {
            let hosts = self.cli(&["host", "list"]);
            let seen: usize = hosts.as_array().into_iter().flatten().map(|h| h["vms"].as_array().map_or(0, Vec::len)).sum();
            if seen >= n {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "controller sees {seen} of {n} VMs: {hosts}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until plan `id` has ended; returns it.
    pub fn wait_plan(&self, id: &str, secs: u64) -> Value {
        let start = Instant::now();
        loop {
            let p = self.cli(&["cluster", "plan-show", id]);
            if !matches!(p["status"].as_str(), Some("running" | "proposed")) {
                return p;
            }
            assert!(start.elapsed() < Duration::from_secs(secs), "plan {id} still {} after {secs} s: {p}\n{}", p["status"], self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until plan `id` has a running step; returns that step.
    pub fn wait_running_step(&self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let p = self.cli(&["cluster", "plan-show", id]);
            if let Some(s) = p["steps"].as_array().and_then(|s| s.iter().find(|s| s["status"] == "running")) {
                return s.clone();
            }
            assert!(p["status"] == "running", "plan {id} ended before a step ran: {p}");
            assert!(start.elapsed() < Duration::from_secs(60), "no step of {id} started: {p}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Pids of live processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i64> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return vec![] };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()))
        .filter(|pid| alive(*pid))
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| String::from_utf8_lossy(&c).contains(needle)).unwrap_or(false))
        .collect()
}
