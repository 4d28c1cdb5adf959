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
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("walkabout {a:?}: bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
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

/// A running agent process with its own data directory.
pub struct AgentProc {
    pub url: String,
    pub data: PathBuf,
    child: Option<Child>,
    _dir: Option<TempDir>,
}

impl AgentProc {
    /// Starts an agent on a free loopback port under TCG with `extra` arguments.
    pub fn start(extra: &[&str]) -> AgentProc {
        guest_image();
        let dir = TempDir::new("agent");
        let data = dir.0.clone();
        let mut a = AgentProc { url: String::new(), data, child: None, _dir: Some(dir) };
        a.spawn(extra);
        a
    }

    /// (Re)starts the agent process on this data directory.
    pub fn spawn(&mut self, extra: &[&str]) {
        let _ = std::fs::remove_file(self.data.join("agent.url"));
        let mut args = vec!["agent", "--listen", "127.0.0.1:0", "--data-dir"];
        let data = self.data.display().to_string();
        args.push(&data);
        if !extra.iter().any(|a| *a == "--accel") {
            args.extend(["--accel", "tcg"]);
        }
        args.extend(extra);
        let log = std::fs::File::create(self.data.join("agent.log")).expect("agent log");
        let child = Command::new(bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(url) = std::fs::read_to_string(self.data.join("agent.url")) {
                self.url = url;
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("agent exited with {status}: {}", self.log());
            }
            assert!(start.elapsed() < Duration::from_secs(120), "agent did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("agent.log")).unwrap_or_default()
    }

    /// Kills the agent process (SIGKILL); its VMs keep running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `walkabout ARGS --agent URL --output json`.
    pub fn cli(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--agent", &self.url]);
        json(&a)
    }

    /// `walkabout ARGS --agent URL`, expecting failure; returns stderr.
    pub fn cli_fails(&self, args: &[&str]) -> String {
        let mut a = args.to_vec();
        a.extend(["--agent", &self.url]);
        fails(&a)
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
