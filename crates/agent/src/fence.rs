//! Self-fencing, like the watchdog of Proxmox's HA stack: an agent that has not heard
//! from the controller for a protected VM's `fence_ms` kills that VM's QEMU itself
//! (SIGKILL, no guest shutdown), so a host cut off from the controller never runs a VM
//! the controller restores elsewhere. And the power cut of tests and games.
//!
//! ```text
//!  every request carrying X-Walkabout-Controller from a controller certificate
//!  (or over plain loopback)  ──> last contact = now
//!  watchdog, every 200 ms: for each VM with protection (fence_ms > 0):
//!      now - max(last contact, agent start) > fence_ms  ──> kill its QEMU,
//!      record it stopped: "fenced: no word from the controller for N s"
//! ```
//! The controller polls every agent twice a second, so its silence means it is gone or
//! cut off. It restores the VM elsewhere only after `fence_ms` (plus a margin) since
//! *its* last contact with this host, which is no earlier than this agent's last
//! contact with it: this copy is dead first. A restarted agent counts from its start.
//! `fence_ms = 0` disables fencing of that VM.

use crate::vms::{lock, now_ms, Agent};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use walkabout_api::{ErrorBody, ErrorKind, CONTROLLER_HEADER};

/// How often the watchdog looks.
const TICK: Duration = Duration::from_millis(200);
/// How long the watchdog waits for a VM's lock before it kills its QEMU by pid file.
const LOCK_WAIT: Duration = Duration::from_millis(300);

/// The agent's side of fencing: when the controller last spoke, which VMs were fenced.
#[derive(Debug)]
pub struct Fence {
    started: Instant,
    last: Mutex<Option<Instant>>,
    /// VMs fenced, and when (ms since the epoch).
    fenced: Mutex<BTreeMap<String, u64>>,
    /// Fence time of each protected VM, as last read from its record.
    protected: Mutex<BTreeMap<String, u64>>,
}

impl Default for Fence {
    fn default() -> Self {
        Fence { started: Instant::now(), last: Mutex::default(), fenced: Mutex::default(), protected: Mutex::default() }
    }
}

impl Fence {
    /// Records a request from the controller.
    pub fn contact(&self) {
        *lock(&self.last) = Some(Instant::now());
    }

    /// Time since the controller last spoke (or since this agent started).
    pub fn silence(&self) -> Duration {
        lock(&self.last).unwrap_or(self.started).elapsed()
    }

    /// When `vm` was fenced (ms since the epoch), if it was.
    pub fn fenced_ms(&self, vm: &str) -> Option<u64> {
        lock(&self.fenced).get(vm).copied()
    }

    /// The VMs to fence now: protected (fence time > 0), not fenced yet, and the
    /// controller silent for longer than their fence time. Pure, for tests.
    pub fn due(&self, silence: Duration, protected: &BTreeMap<String, u64>) -> Vec<String> {
        let fenced = lock(&self.fenced);
        let silent_ms = u64::try_from(silence.as_millis()).unwrap_or(u64::MAX);
        protected.iter().filter(|(vm, ms)| **ms > 0 && silent_ms > **ms && !fenced.contains_key(*vm)).map(|(vm, _)| vm.clone()).collect()
    }
}

/// The agent's fence: one per process (an agent process serves one agent; tests that
/// run several in one process share it, and each VM's record decides).
pub fn fence() -> &'static Arc<Fence> {
    static FENCE: std::sync::OnceLock<Arc<Fence>> = std::sync::OnceLock::new();
    FENCE.get_or_init(|| Arc::new(Fence::default()))
}

/// Middleware: a request naming the controller, from a controller's certificate (or
/// plain loopback, where every client is trusted as an operator), is the controller's
/// word; anyone else's header is ignored.
pub async fn note_controller(req: Request, next: Next) -> Response {
    if req.headers().contains_key(CONTROLLER_HEADER) {
        let trusted = req
            .extensions()
            .get::<walkabout_trust::Identity>()
            .is_some_and(|id| id.role == walkabout_trust::Role::Controller || id.name == walkabout_trust::serve::LOOPBACK_NAME);
        if trusted {
            fence().contact();
        }
    }
    next.run(req).await
}

/// Starts the watchdog over `agent`'s VMs (once per agent; ends with the runtime).
pub fn spawn_watchdog(agent: Agent) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(TICK).await;
            let f = fence();
            refresh(&agent, f);
            let protected = lock(&f.protected).clone();
            for vm in f.due(f.silence(), &protected) {
                let silent = f.silence().as_secs_f64();
                kill(&agent, f, &vm, &format!("fenced: no word from the controller for {silent:.1} s")).await;
            }
        }
    });
}

/// Reads the fence time of every protected VM whose lock is free; a VM busy now (a
/// checkpoint, a migration) keeps what was read last. A VM fenced before that is active
/// again (migrated back in, restored, started) is a new run of it: fenced again if the
/// silence lasts, never exempt because an earlier run was.
fn refresh(agent: &Agent, f: &Fence) {
    let names: Vec<String> = agent.names();
    let mut p = lock(&f.protected);
    let mut fenced = lock(&f.fenced);
    p.retain(|vm, _| names.contains(vm));
    fenced.retain(|vm, _| names.contains(vm));
    for name in names {
        let Ok(vm) = agent.vm(&name) else { continue };
        let Ok(vm) = vm.try_lock() else { continue };
        match (&vm.record.protection, vm.record.state.is_active()) {
            (Some(pr), true) => {
                fenced.remove(&name);
                p.insert(name, pr.fence_ms)
            }
            _ => p.remove(&name),
        };
    }
}

/// Kills `name`'s QEMU at once and records it stopped for `reason`. A VM whose lock
/// is held (a long operation) is killed by its pid file first and recorded once the
/// lock is free.
async fn kill(agent: &Agent, f: &Fence, name: &str, reason: &str) {
    let at = now_ms();
    lock(&f.fenced).insert(name.to_string(), at);
    agent.note_fenced(name, at);
    tracing::warn!(vm = name, reason, "fencing: killing the VM");
    let Ok(vm) = agent.vm(name) else { return };
    let mut guard = match tokio::time::timeout(LOCK_WAIT, vm.lock()).await {
        Ok(g) => g,
        Err(_) => {
            let run_dir = agent.inner.config.data_dir.join("vms").join(name);
            if let Some(pid) = crate::boot::pid_file(&run_dir) {
                // SAFETY: kill(2) with a pid read from this VM's own pid file; no memory
                // is touched.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            vm.lock().await
        }
    };
    if let Some(p) = guard.process.take() {
        p.signal(libc::SIGKILL);
        p.wait_exit(Duration::from_secs(5)).await;
    }
    guard.qmp = None;
    guard.record.state = walkabout_api::VmState::Stopped;
    guard.record.reason = Some(reason.to_string());
    guard.record.pid = None;
    crate::nics::delete_taps(&agent.nic_salt(), name);
    agent.set_active(name, None);
    if let Err(e) = agent.inner.store.put(&guard.record) {
        tracing::error!(vm = name, error = %e, "cannot record the fenced VM");
    }
}

/// `POST /v1/host/power-cut`: only on an agent started with `--allow-power-cut`, and
/// only for an operator or the controller (whose musical chairs cuts a host's power on
/// an operator's request to its game route): every QEMU of this host is killed (SIGKILL) and the agent
/// process exits at once, without recording anything, as if the plug were pulled.
pub async fn power_cut(State(agent): State<Agent>, req: Request) -> Response {
    let who = req.extensions().get::<walkabout_trust::Identity>().cloned();
    if !agent.inner.config.allow_power_cut {
        let why = "refused: this agent was not started with --allow-power-cut";
        return (StatusCode::FORBIDDEN, Json(ErrorBody::new(ErrorKind::Forbidden, why))).into_response();
    }
    if !who.as_ref().is_some_and(|id| matches!(id.role, walkabout_trust::Role::Operator | walkabout_trust::Role::Controller)) {
        let why = format!(
            "refused: a power cut is for operators and the controller, not {}",
            who.map_or("an anonymous client".into(), |i| i.to_string())
        );
        return (StatusCode::FORBIDDEN, Json(ErrorBody::new(ErrorKind::Forbidden, why))).into_response();
    }
    let pids: Vec<i32> =
        agent.names().iter().filter_map(|n| crate::boot::pid_file(&agent.inner.config.data_dir.join("vms").join(n))).collect();
    tracing::warn!(qemus = pids.len(), "power cut: killing every QEMU and exiting");
    for pid in pids {
        // SAFETY: kill(2) with pids read from this agent's own VMs' pid files.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    tokio::spawn(async {
        // Time for the 202 to leave; then gone, like the rest of the host.
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::process::exit(137);
    });
    StatusCode::ACCEPTED.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protected(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(n, ms)| (n.to_string(), *ms)).collect()
    }

    #[test]
    fn a_protected_vm_is_fenced_once_the_silence_exceeds_its_fence_time() {
        let f = Fence::default();
        let p = protected(&[("a", 3_000), ("b", 10_000)]);

        assert!(f.due(Duration::from_millis(2_900), &p).is_empty());
        assert_eq!(f.due(Duration::from_millis(3_100), &p), vec!["a".to_string()]);
        assert_eq!(f.due(Duration::from_millis(10_100), &p), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn a_fenced_vm_is_not_fenced_again_and_a_zero_fence_time_never_fences() {
        let f = Fence::default();
        lock(&f.fenced).insert("a".into(), 1);

        assert!(f.due(Duration::from_secs(60), &protected(&[("a", 3_000), ("z", 0)])).is_empty());
    }

    #[test]
    fn a_word_from_the_controller_ends_the_silence() {
        let f = Fence { started: Instant::now() - Duration::from_secs(30), ..Fence::default() };
        assert!(f.silence() >= Duration::from_secs(30));

        f.contact();

        assert!(f.silence() < Duration::from_secs(1));
    }
}
