//! Test harness: real agents and controllers (the `walkabout` binary), started by the
//! testbed, driven through the real CLI, their state read through the typed clients of
//! `walkabout-api` (each call on a small runtime of its own, inside the agent's network
//! namespace when it has one). Everything started is killed on drop, QEMU included.
#![allow(dead_code)]

use serde::de::DeserializeOwned;
use serde_json::Value;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use walkabout_api::{
    AgentClient, ClientError, ClientOptions, ControllerClient, ErrorKind, Host, HostInfo, MigrationRecord, PlanRecord, PlanStatus, Step,
    StepStatus, VmInfo,
};
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
/// parses stdout as a `T`, whatever the exit status.
fn output_json<T: DeserializeOwned>(mut cmd: Command, args: &[&str]) -> T {
    let out = cmd.args(["--output", "json"]).output().expect("run walkabout");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "walkabout {args:?}: bad JSON for {} ({e}): {} {}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Runs `cmd` with `--output json`, which must succeed; its stdout parsed as a `T`.
fn cli_json<T: DeserializeOwned>(mut cmd: Command, args: &[&str]) -> T {
    let out = cmd.args(["--output", "json"]).output().expect("run walkabout");
    assert!(out.status.success(), "walkabout {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("walkabout {args:?}: bad JSON for {} ({e}): {}", std::any::type_name::<T>(), String::from_utf8_lossy(&out.stdout))
    })
}

/// Runs `walkabout ARGS --output json`, which must succeed; stdout parsed as a `T`.
pub fn json_as<T: DeserializeOwned>(args: &[&str]) -> T {
    cli_json(command(args), args)
}

/// Runs `work` on a small tokio runtime of its own; inside network namespace `netns`
/// (on a thread of its own) when given, so that a client reaches a server listening
/// there.
pub fn block_on<T, F, Fut>(netns: Option<&str>, work: F) -> T
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
{
    let run = move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        rt.block_on(work())
    };
    match netns {
        None => run(),
        Some(ns) => std::thread::scope(|s| {
            s.spawn(move || {
                walkabout_testbed::enter_netns(ns).expect("enter the agent's network namespace");
                run()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        }),
    }
}

/// Test-wide client timeouts: generous (TCG guests, 2 cores shared), never a hang.
fn options() -> ClientOptions {
    ClientOptions { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(60) }
}

/// `walkabout migrate VM --to DEST --wait --output json`: the one summary it ends with.
pub use walkabout_api::MigrationSummary as MigrateSummary;

/// A running agent process with its own data directory, optionally inside a network
/// namespace (a host of its own), with the CLI calls the tests make against it and its
/// state read through [`AgentClient`].
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

    /// A typed client of this agent (its URL as of now: a restart may change it).
    pub fn client(&self) -> AgentClient {
        AgentClient::new(&self.url, options()).unwrap_or_else(|e| panic!("a client of {}: {e}", self.url))
    }

    /// Calls the agent through its typed client (from inside its network namespace).
    pub fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        T: Send,
        F: FnOnce(AgentClient) -> Fut + Send,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let client = self.client();
        block_on(self.netns(), move || f(client))
    }

    /// `walkabout ARGS --agent URL` (in the agent's namespace).
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run walkabout")
    }

    /// `walkabout ARGS --agent URL --output json`, which must succeed, as JSON (for
    /// commands whose output is not read).
    pub fn cli(&self, args: &[&str]) -> Value {
        cli_json(self.command(args), args)
    }

    /// `walkabout ARGS --agent URL --output json`, which must succeed, parsed as a `T`
    /// (`VmInfo` for `vm create|pause|resume|stop`, `MigrationRecord` for `migrate`
    /// without `--wait` and `migration cancel`...).
    pub fn cli_as<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        cli_json(self.command(args), args)
    }

    /// `walkabout ARGS --agent URL`, expecting failure; returns stderr.
    pub fn cli_fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "walkabout {args:?} should have failed but printed {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `walkabout vm create ARGS`: the VM as created.
    pub fn create(&self, args: &[&str]) -> VmInfo {
        let mut a = vec!["vm", "create"];
        a.extend(args);
        self.cli_as(&a)
    }

    /// `walkabout migrate VM --to DEST --wait --output json EXTRA...`: the final summary,
    /// whether or not the migration completed.
    pub fn migrate(&self, vm: &str, dest: &AgentProc, extra: &[&str]) -> MigrateSummary {
        let mut a = vec!["migrate", vm, "--to", &dest.url, "--wait"];
        a.extend(extra);
        output_json(self.command(&a), &a)
    }

    /// Starts a migration with the CLI without waiting; returns its id.
    pub fn start_migration(&self, vm: &str, dest: &AgentProc, extra: &[&str]) -> String {
        let mut a = vec!["migrate", vm, "--to", &dest.url];
        a.extend(extra);
        let rec: MigrationRecord = self.cli_as(&a);
        assert_eq!(rec.vm, vm, "{rec:?}");
        rec.id
    }

    /// Migration `id` as the agent reports it (`GET /v1/migrations/{id}`).
    pub fn migration(&self, id: &str) -> MigrationRecord {
        self.call(|c| async move { c.migration(id).await }).unwrap_or_else(|e| panic!("migration {id} on {}: {e}", self.url))
    }

    /// Every migration this agent has run or runs (`GET /v1/migrations`).
    pub fn migrations(&self) -> Vec<MigrationRecord> {
        self.call(|c| async move { c.migrations().await }).unwrap_or_else(|e| panic!("migrations of {}: {e}", self.url))
    }

    /// Waits until migration `id` has sent at least `bytes`.
    pub fn wait_transferred(&self, id: &str, bytes: u64) -> MigrationRecord {
        let start = Instant::now();
        loop {
            let m = self.migration(id);
            if m.progress.transferred_bytes >= bytes {
                return m;
            }
            assert!(!m.phase.is_final(), "migration ended early: {m:?}");
            assert!(start.elapsed() < Duration::from_secs(60), "migration {id} is not moving: {m:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until migration `id` runs in post-copy and `more` bytes have crossed since,
    /// so that the destination surely got the device state and runs the guest (a cut
    /// before that leaves the guest with its source, a case of its own).
    pub fn wait_postcopy(&self, id: &str, more: u64) -> MigrationRecord {
        let start = Instant::now();
        let mut at_switch: Option<u64> = None;
        loop {
            let m = self.migration(id);
            if m.progress.qemu_status == "postcopy-active" {
                let base = *at_switch.get_or_insert(m.progress.transferred_bytes);
                if m.progress.transferred_bytes >= base + more {
                    return m;
                }
            }
            assert!(!m.phase.is_final() && start.elapsed() < Duration::from_secs(120), "never reached post-copy: {m:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until migration `id` is final; returns its record.
    pub fn wait_final(&self, id: &str) -> MigrationRecord {
        let start = Instant::now();
        loop {
            let m = self.migration(id);
            if m.phase.is_final() {
                return m;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "migration {id} never ended: {m:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// VM `name` with its guest status (`GET /v1/vms/{name}`); panics if it is not here.
    pub fn info(&self, name: &str) -> VmInfo {
        self.call(|c| async move { c.vm(name).await }).unwrap_or_else(|e| panic!("VM {name} on {}: {e}", self.url))
    }

    /// VM `name`, or `None` when this agent has no VM of that name (any other error
    /// panics).
    pub fn try_info(&self, name: &str) -> Option<VmInfo> {
        match self.call(|c| async move { c.vm(name).await }) {
            Ok(v) => Some(v),
            Err(e) if e.kind() == Some(ErrorKind::NotFound) => None,
            Err(e) => panic!("VM {name} on {}: {e}", self.url),
        }
    }

    /// The agent's VMs (`GET /v1/vms`).
    pub fn vms(&self) -> Vec<VmInfo> {
        self.call(|c| async move { c.vms().await }).unwrap_or_else(|e| panic!("VMs of {}: {e}", self.url))
    }

    /// The host as the agent reports it (`GET /v1/host`).
    pub fn host_info(&self) -> HostInfo {
        self.call(|c| async move { c.host().await }).unwrap_or_else(|e| panic!("host of {}: {e}", self.url))
    }

    /// Waits until VM `name` has logged at least `n` heartbeats in total.
    pub fn wait_heartbeats(&self, name: &str, n: u64) -> VmInfo {
        let start = Instant::now();
        loop {
            let v = self.info(name);
            if v.guest.heartbeats >= n {
                return v;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "VM {name} has not reached {n} heartbeats: {v:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Asserts a guest has been healthy all along: continuous heartbeats (across hosts),
/// no corrupt page, no kernel trouble, no alert, and ready.
pub fn assert_healthy(vm: &VmInfo) {
    let g = &vm.guest;
    assert_eq!(g.corrupt_pages, 0, "corrupt pages: {vm:?}");
    assert_eq!(g.seq_breaks, 0, "heartbeat sequence broke: {vm:?}");
    assert!(!g.kernel_trouble, "kernel trouble: {vm:?}");
    assert!(g.is_healthy(), "guest alerts: {vm:?}");
    assert!(g.ready, "guest not ready: {vm:?}");
}

/// A running controller process (`walkabout controller`) with its own data directory,
/// killed on drop, with the CLI calls the tests make against it and its state read
/// through [`ControllerClient`].
pub struct ControllerProc(pub Controller);
wraps!(ControllerProc, Controller);

impl ControllerProc {
    /// Starts a controller on a free loopback port with `agents` registered as h1, h2...
    /// in order, and `extra` arguments.
    pub fn start(agents: &[&AgentProc], extra: &[&str]) -> ControllerProc {
        let agents: Vec<&Agent> = agents.iter().map(|a| &a.0).collect();
        ControllerProc(Controller::start(ControllerSpec::new(bin(), &agents).args(extra)).expect("start controller"))
    }

    /// A typed client of this controller.
    pub fn client(&self) -> ControllerClient {
        ControllerClient::new(&self.url, options()).unwrap_or_else(|e| panic!("a client of {}: {e}", self.url))
    }

    /// Calls the controller through its typed client.
    pub fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        T: Send,
        F: FnOnce(ControllerClient) -> Fut + Send,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let client = self.client();
        block_on(None, move || f(client))
    }

    /// `walkabout ARGS --controller URL`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run walkabout")
    }

    /// `walkabout ARGS --controller URL --output json`, whatever the exit status, as
    /// JSON (for output not read).
    pub fn json(&self, args: &[&str]) -> Value {
        output_json(self.command(args), args)
    }

    /// `walkabout ARGS --controller URL --output json`, whatever the exit status, parsed
    /// as a `T` (`PlanRecord` for `host drain --no-wait`, `ErrorBody` for a refusal...).
    pub fn json_as<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        output_json(self.command(args), args)
    }

    /// `walkabout ARGS --controller URL --output json`, which must succeed, as JSON (for
    /// output not read).
    pub fn cli(&self, args: &[&str]) -> Value {
        cli_json(self.command(args), args)
    }

    /// `walkabout ARGS --controller URL --output json`, which must succeed, parsed as a
    /// `T` (`PlanRecord` for `host drain`...).
    pub fn cli_as<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        cli_json(self.command(args), args)
    }

    /// Host `name` as the controller sees it (`GET /v1/hosts/{name}`).
    pub fn host(&self, name: &str) -> Host {
        self.call(|c| async move { c.host(name).await }).unwrap_or_else(|e| panic!("host {name} of {}: {e}", self.url))
    }

    /// Every host of the cluster (`GET /v1/hosts`).
    pub fn hosts(&self) -> Vec<Host> {
        self.call(|c| async move { c.hosts().await }).unwrap_or_else(|e| panic!("hosts of {}: {e}", self.url))
    }

    /// Plan `id` (`GET /v1/plans/{id}`).
    pub fn plan(&self, id: &str) -> PlanRecord {
        self.call(|c| async move { c.plan(id).await }).unwrap_or_else(|e| panic!("plan {id} of {}: {e}", self.url))
    }

    /// Waits until the controller sees `n` VMs on its hosts.
    pub fn wait_vms(&self, n: usize) {
        let start = Instant::now();
        loop {
            let hosts = self.hosts();
            let seen: usize = hosts.iter().map(|h| h.vms.len()).sum();
            if seen >= n {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "controller sees {seen} of {n} VMs: {hosts:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until plan `id` has ended (neither proposed nor running); returns it.
    pub fn wait_plan(&self, id: &str, secs: u64) -> PlanRecord {
        let start = Instant::now();
        loop {
            // A controller of an HA group may be between two leaders (campaigning) for
            // a moment: asked again, it answers from the leader that won.
            let p = match self.call(|c| async move { c.plan(id).await }) {
                Ok(p) => p,
                Err(e) if e.kind() == Some(walkabout_api::ErrorKind::NotLeader) => {
                    assert!(start.elapsed() < Duration::from_secs(secs), "plan {id}: no leader for {secs} s: {e}\n{}", self.log());
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                Err(e) => panic!("plan {id} of {}: {e}", self.url),
            };
            if !matches!(p.status, PlanStatus::Running | PlanStatus::Proposed) {
                return p;
            }
            assert!(start.elapsed() < Duration::from_secs(secs), "plan {id} still {} after {secs} s: {p:?}\n{}", p.status, self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until plan `id` has a running step; returns that step.
    pub fn wait_running_step(&self, id: &str) -> Step {
        let start = Instant::now();
        loop {
            let p = self.plan(id);
            if let Some(s) = p.steps.iter().find(|s| s.status == StepStatus::Running) {
                return s.clone();
            }
            assert_eq!(p.status, PlanStatus::Running, "plan {id} ended before a step ran: {p:?}");
            assert!(start.elapsed() < Duration::from_secs(60), "no step of {id} started: {p:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The controller's last `n` events, one per line (for a failing assertion's message:
/// what the controller saw and did just before).
pub fn last_events(url: &str, n: u64) -> String {
    let got = ControllerClient::new(url, options()).map(|client| block_on(None, || async move { client.recent_events(n).await }));
    match got.and_then(|r| r) {
        Ok(events) => events.iter().map(|e| format!("{} {}", e.at_ms, e.message)).collect::<Vec<_>>().join("\n"),
        Err(e) => format!("(no events: {e})"),
    }
}
