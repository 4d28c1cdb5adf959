//! Test harness: real agents and controllers (the `walkabout` binary), started by the
//! testbed, driven through the real CLI. Everything started is killed on drop, QEMU
//! included.
#![allow(dead_code)]

use serde_json::Value;
use std::ops::{Deref, DerefMut};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use walkabout_testbed::{Agent, AgentSpec, Controller, ControllerSpec};

/// The `walkabout` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_walkabout")
}

/// `walkabout ARGS`, logging warnings only.
fn command(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).env("WALKABOUT_LOG", "warn");
    c
}

/// Runs `walkabout ARGS`, returning its output.
pub fn walkabout(args: &[&str]) -> Output {
    command(args).output().expect("run walkabout")
}

/// Runs `walkabout ARGS --output json` and parses stdout; panics with stderr on failure.
pub fn json(args: &[&str]) -> Value {
    cli_json(command(args), args)
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

/// `$wrapper` (a tuple struct around a testbed `$inner`) reads as its inner value.
macro_rules! wraps {
    ($wrapper:ident, $inner:ty) => {
        impl Deref for $wrapper {
            type Target = $inner;
            fn deref(&self) -> &$inner {
                &self.0
            }
        }

        impl DerefMut for $wrapper {
            fn deref_mut(&mut self) -> &mut $inner {
                &mut self.0
            }
        }
    };
}

/// Runs `cmd` (`walkabout ARGS --output json` toward an agent or a controller) and
/// parses stdout, whatever the exit status.
fn output_json(mut cmd: Command, args: &[&str]) -> Value {
    let out = cmd.args(["--output", "json"]).output().expect("run walkabout");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("walkabout {args:?}: bad JSON ({e}): {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// Runs `cmd` with `--output json`, which must succeed; its parsed stdout.
fn cli_json(mut cmd: Command, args: &[&str]) -> Value {
    let out = cmd.args(["--output", "json"]).output().expect("run walkabout");
    assert!(out.status.success(), "walkabout {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("walkabout {args:?}: bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// A running agent process with its own data directory, optionally inside a network
/// namespace (a host of its own), with the CLI calls the tests make against it.
pub struct AgentProc(pub Agent);
wraps!(AgentProc, Agent);

impl AgentProc {
    /// Starts an agent on a free loopback port under TCG with `extra` arguments.
    pub fn start(extra: &[&str]) -> AgentProc {
        AgentProc::start_at(None, "127.0.0.1:0", extra)
    }

    /// Starts an agent listening on `listen`, inside network namespace `netns` if given.
    pub fn start_at(netns: Option<&str>, listen: &str, extra: &[&str]) -> AgentProc {
        guest_image();
        AgentProc(Agent::start(AgentSpec::new(bin()).at(netns, listen).args(extra)).expect("start agent"))
    }

    /// `walkabout ARGS --agent URL` (in the agent's namespace).
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run walkabout")
    }

    /// `walkabout ARGS --agent URL --output json`.
    pub fn cli(&self, args: &[&str]) -> Value {
        cli_json(self.command(args), args)
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
        let mut a = vec!["migrate", vm, "--to", &dest.url, "--wait"];
        a.extend(extra);
        output_json(self.command(&a), &a)
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

/// Asserts a guest has been healthy all along: continuous heartbeats (across hosts),
/// no corrupt page, no kernel trouble.
pub fn assert_healthy(vm: &Value) {
    let g = &vm["guest"];
    assert_eq!(g["corrupt_pages"], 0, "corrupt pages: {vm}");
    assert_eq!(g["seq_breaks"], 0, "heartbeat sequence broke: {vm}");
    assert_eq!(g["kernel_trouble"], false, "kernel trouble: {vm}");
    assert_eq!(g["ready"], true, "guest not ready: {vm}");
}

/// A running controller process (`walkabout controller`) with its own data directory,
/// killed on drop, with the CLI calls the tests make against it.
pub struct ControllerProc(pub Controller);
wraps!(ControllerProc, Controller);

impl ControllerProc {
    /// Starts a controller on a free loopback port with `agents` registered as h1, h2...
    /// in order, and `extra` arguments.
    pub fn start(agents: &[&AgentProc], extra: &[&str]) -> ControllerProc {
        let agents: Vec<&Agent> = agents.iter().map(|a| &a.0).collect();
        ControllerProc(Controller::start(ControllerSpec::new(bin(), &agents).args(extra)).expect("start controller"))
    }

    /// `walkabout ARGS --controller URL`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run walkabout")
    }

    /// `walkabout ARGS --controller URL --output json`, whatever the exit status.
    pub fn json(&self, args: &[&str]) -> Value {
        output_json(self.command(args), args)
    }

    /// `walkabout ARGS --controller URL --output json`, which must succeed.
    pub fn cli(&self, args: &[&str]) -> Value {
        cli_json(self.command(args), args)
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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
