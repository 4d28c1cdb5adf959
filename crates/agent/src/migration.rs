//! Live migration between agents.
//!
//! The source agent drives; the destination agent serves `/v1/incoming`:
//!
//! ```text
//! source agent                         destination agent
//! POST /v1/migrations (202) ──┐
//!   VM -> Migrating           │
//!   measure dirty rate;       │
//!   pick the strategy   ──────┼──────> POST /v1/incoming: check name, memory, CPU
//!                             │        features; QEMU -S -incoming defer; listen
//!   <─────────────────────────┼─────── { uri }   (QEMU armed: run once fully loaded)
//!   migrate uri; watch passes │        GET /v1/incoming/{vm}   (liveness, every 250 ms)
//!   QEMU pauses at pre-switchover; destination answered < 1 s ago?
//!   migrate-continue          │        ... QEMU loads the rest, the guest runs here
//!   completed ────────────────┼──────> POST /v1/incoming/{vm}/commit (VM -> Running)
//!   quit source QEMU, forget the VM
//! ```
//!
//! The destination holds a lease renewed by the source's probes: if they stop (source
//! agent gone, link cut), the destination tears its QEMU down by itself, or adopts the
//! guest if it already runs there.
//!
//! Up to the gate the guest has only ever run on the source, and any failure
//! (destination gone, link cut, cancel, QEMU error) cancels, tears the destination down
//! and resumes the guest on the source. After it the source never resumes on its own.
//! Post-copy is the exception that cannot be undone: once it starts the guest runs on the
//! destination while part of its memory is still on the source, so losing either host
//! before it completes loses the VM.

use crate::error::AgentError;
use crate::spec::{VmSpec, VmState};
use crate::vms::{lock, now_ms, Agent};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::watch;
use walkabout_migrate::progress::Progress;
use walkabout_migrate::run::Peer;
use walkabout_migrate::{Limits, Mode, Phase, Policy, Strategy, Switch};
use walkabout_qemu::{cpu, Qmp};

/// Version of [`MigrationRecord`]'s stored layout.
pub const MIGRATION_VERSION: u32 = 1;

/// A request to migrate a VM of this agent to another agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationRequest {
    /// The VM.
    pub vm: String,
    /// The destination agent's URL.
    pub destination: String,
    /// Strategy mode.
    #[serde(default)]
    pub mode: Mode,
    /// Longest acceptable guest pause, ms (default 300).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth cap, bytes/s (default: none).
    #[serde(default)]
    pub max_bandwidth_bps: Option<u64>,
    /// Time budget per GiB of guest memory, ms (default 30 000).
    #[serde(default)]
    pub budget_per_gib_ms: Option<u64>,
}

/// A migration as the source agent records and reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// Layout version.
    pub version: u32,
    /// Its id.
    pub id: String,
    /// The VM.
    pub vm: String,
    /// The destination agent's URL.
    pub destination: String,
    /// Mode asked for.
    pub mode: Mode,
    /// Limits in force.
    pub limits: Limits,
    /// Where it is.
    pub phase: Phase,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// Dirty rate measured before the start, bytes/s.
    pub dirty_rate_bps: Option<u64>,
    /// The strategy picked.
    pub strategy: Option<Strategy>,
    /// Every change of strategy, with its reason.
    pub switches: Vec<Switch>,
    /// Latest progress.
    pub progress: Progress,
    /// Wall time, ms, once final.
    pub total_ms: Option<u64>,
    /// Guest pause at switchover, ms, once completed.
    pub downtime_ms: Option<u64>,
    /// Start, ms since the epoch.
    pub created_at_ms: u64,
    /// End, ms since the epoch.
    pub finished_at_ms: Option<u64>,
}

/// How a migration that did not complete ended.
struct Ended {
    phase: Phase,
    reason: String,
    /// The source had passed its switchover gate: its copy must never be resumed.
    past_switchover: bool,
}

/// A migration the agent is driving, with its cancel switch.
pub(crate) struct Migration {
    pub(crate) record: MigrationRecord,
    cancel: watch::Sender<bool>,
}

/// What the source asks of the destination.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingRequest {
    /// The VM's spec (the destination starts an identical QEMU).
    pub spec: VmSpec,
    /// Whether the source may switch to post-copy (a capability both ends must share).
    pub postcopy_ready: bool,
    /// CPU features the VM's CPU model has on the source.
    pub cpu_features: Vec<String>,
    /// The address the destination QEMU listens on (the host the source reaches it by).
    pub listen_host: String,
}

/// The destination's answer: where to send the VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingReply {
    /// QEMU migration URI, e.g. `tcp:10.0.0.2:40123`.
    pub uri: String,
}

fn api_error(status: reqwest::StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| format!("HTTP {status}: {}", String::from_utf8_lossy(body).trim()))
}

/// How often the source probes the destination during a migration.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// An incoming VM whose source has not probed for this long is torn down (or adopted,
/// if its guest already runs here): the source's probes are the destination's lease.
pub const INCOMING_LEASE: Duration = Duration::from_secs(4);

/// The destination agent, reached over HTTP.
struct Destination {
    http: reqwest::Client,
    url: String,
    vm: String,
    /// When the destination last answered a probe.
    alive_at: std::sync::Arc<std::sync::Mutex<std::time::Instant>>,
}

impl Destination {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<serde_json::Value>) -> Result<serde_json::Value, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| format!("destination agent {} unreachable: {e}", self.url))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| format!("destination agent {}: {e}", self.url))?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        Ok(serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    async fn abort(&self) {
        if let Err(e) = self.call(reqwest::Method::DELETE, &format!("/v1/incoming/{}", self.vm), None).await {
            tracing::warn!(vm = %self.vm, error = %e, "could not tear the destination down (it tears itself down when the stream ends)");
        }
    }
}

impl Destination {
    fn new(http: reqwest::Client, url: &str, vm: &str) -> Destination {
        Destination {
            http,
            url: url.to_string(),
            vm: vm.to_string(),
            alive_at: std::sync::Arc::new(std::sync::Mutex::new(std::time::Instant::now())),
        }
    }

    /// Probes the destination in the background until the returned handle is aborted.
    fn probe(&self) -> tokio::task::JoinHandle<()> {
        let (http, url, alive_at) = (self.http.clone(), format!("{}/v1/incoming/{}", self.url, self.vm), self.alive_at.clone());
        tokio::spawn(async move {
            loop {
                let r = http.get(&url).timeout(Duration::from_secs(1)).send().await;
                if matches!(r, Ok(resp) if resp.status().is_success()) {
                    *lock(&alive_at) = std::time::Instant::now();
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        })
    }
}

impl Peer for Destination {
    fn since_alive(&self) -> Duration {
        lock(&self.alive_at).elapsed()
    }
}

fn new_id() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("mig-{:x}-{n}", now_ms())
}

impl Agent {
    /// Starts migrating a VM of this agent; returns at once with the migration's record.
    pub async fn start_migration(&self, req: MigrationRequest) -> Result<MigrationRecord, AgentError> {
        let dest = reqwest::Url::parse(&req.destination)
            .map_err(|e| AgentError::InvalidRequest { reason: format!("destination {:?} is not a URL: {e}", req.destination) })?;
        if dest.host_str().is_none() {
            return Err(AgentError::InvalidRequest { reason: format!("destination {:?} has no host", req.destination) });
        }
        let vm = self.vm(&req.vm)?;
        let mut vm = vm.lock().await;
        if let Some(m) = lock(&self.inner.migrations).values().find(|m| m.record.vm == req.vm && !m.record.phase.is_final()) {
            return Err(AgentError::MigrationInProgress { vm: req.vm.clone(), id: m.record.id.clone() });
        }
        if !matches!(vm.record.state, VmState::Running | VmState::Paused) {
            return Err(AgentError::InvalidState { vm: req.vm.clone(), op: "migrate", state: vm.record.state });
        }
        let defaults = Limits::default();
        let limits = Limits {
            max_downtime_ms: req.max_downtime_ms.unwrap_or(defaults.max_downtime_ms),
            max_bandwidth_bps: req.max_bandwidth_bps,
            budget_per_gib_ms: req.budget_per_gib_ms.unwrap_or(defaults.budget_per_gib_ms),
        };
        let record = MigrationRecord {
            version: MIGRATION_VERSION,
            id: new_id(),
            vm: req.vm.clone(),
            destination: req.destination.trim_end_matches('/').to_string(),
            mode: req.mode,
            limits,
            phase: Phase::Pending,
            reason: None,
            dirty_rate_bps: None,
            strategy: None,
            switches: vec![],
            progress: Progress::default(),
            total_ms: None,
            downtime_ms: None,
            created_at_ms: now_ms(),
            finished_at_ms: None,
        };
        let was_running = vm.record.state == VmState::Running;
        vm.record.state = VmState::Migrating;
        self.inner.store.put(&vm.record)?;
        self.inner.store.put_migration(&record)?;
        let (tx, rx) = watch::channel(false);
        lock(&self.inner.migrations).insert(record.id.clone(), Migration { record: record.clone(), cancel: tx });
        drop(vm);
        let agent = self.clone();
        let id = record.id.clone();
        tokio::spawn(async move { agent.drive(id, was_running, rx).await });
        Ok(record)
    }

    /// All migrations this agent drove, oldest first.
    pub fn migrations(&self) -> Vec<MigrationRecord> {
        let mut v: Vec<_> = lock(&self.inner.migrations).values().map(|m| m.record.clone()).collect();
        v.sort_by_key(|r| r.created_at_ms);
        v
    }

    /// One migration.
    pub fn migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        lock(&self.inner.migrations).get(id).map(|m| m.record.clone()).ok_or_else(|| AgentError::MigrationNotFound { id: id.into() })
    }

    /// Cancels a migration before its switchover; idempotent. Refused after switchover.
    pub fn cancel_migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        let ms = lock(&self.inner.migrations);
        let m = ms.get(id).ok_or_else(|| AgentError::MigrationNotFound { id: id.into() })?;
        match m.record.phase {
            Phase::Cancelled => Ok(m.record.clone()),
            p if p.cancellable() => {
                let _ = m.cancel.send(true);
                Ok(m.record.clone())
            }
            p => Err(AgentError::NotCancellable { id: id.into(), vm: m.record.vm.clone(), phase: p }),
        }
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut MigrationRecord)) {
        let mut ms = lock(&self.inner.migrations);
        if let Some(m) = ms.get_mut(id) {
            let before = m.record.phase;
            f(&mut m.record);
            if !before.can_become(m.record.phase) {
                tracing::error!(id, from = ?before, to = ?m.record.phase, "illegal migration phase transition");
            }
            if m.record.phase != before || m.record.phase.is_final() {
                if let Err(e) = self.inner.store.put_migration(&m.record) {
                    tracing::error!(id, error = %e, "cannot persist migration");
                }
            }
        }
    }

    /// Drives one migration to its end and leaves exactly one running copy of the VM.
    async fn drive(self, id: String, was_running: bool, cancel: watch::Receiver<bool>) {
        let rec = self.migration(&id).ok();
        let Some(rec) = rec else { return };
        let dest = Destination::new(self.inner.http.clone(), &rec.destination, &rec.vm);
        let result = self.drive_inner(&id, &rec, &dest, cancel).await;
        let (phase, reason) = match result {
            Ok(()) => (Phase::Completed, None),
            Err(Ended { phase, reason, past_switchover }) => {
                self.settle_on_source(&rec.vm, phase, was_running, past_switchover, &reason, &dest).await;
                (phase, Some(reason))
            }
        };
        tracing::info!(id, vm = %rec.vm, ?phase, reason = ?reason, "migration finished");
        self.update(&id, |r| {
            r.phase = phase;
            r.reason = reason;
            r.finished_at_ms = Some(now_ms());
            r.total_ms.get_or_insert(now_ms().saturating_sub(r.created_at_ms));
        });
    }

    /// Returns how it ended on anything but completion.
    async fn drive_inner(
        &self,
        id: &str,
        rec: &MigrationRecord,
        dest: &Destination,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<(), Ended> {
        let fail = |reason: String| Ended { phase: Phase::Failed, reason, past_switchover: false };
        self.update(id, |r| r.phase = Phase::Preparing);
        let (qmp, spec) = {
            let vm = self.vm(&rec.vm).map_err(|e| fail(e.to_string()))?;
            let vm = vm.lock().await;
            let qmp = vm.qmp.clone().ok_or_else(|| fail(format!("VM {} has no QMP connection", rec.vm)))?;
            (qmp, vm.record.spec.clone())
        };
        let guest_bytes = spec.memory_mib << 20;
        let features =
            cpu::features(&qmp, spec.cpu_model()).await.map_err(|e| fail(format!("cannot read the CPU features of {}: {e}", rec.vm)))?;
        let listen_host =
            reqwest::Url::parse(&rec.destination).ok().and_then(|u| u.host_str().map(String::from)).unwrap_or_else(|| "127.0.0.1".into());
        // Measure first, then prepare the destination: whether both ends arm post-copy
        // (a capability fixed before the stream starts, whose return path lengthens the
        // guest's pause) depends on the dirty rate.
        let dirty = walkabout_migrate::run::measure_dirty_rate(&qmp, 500).await;
        let policy = Policy::new(rec.mode, rec.limits, guest_bytes, dirty);
        let postcopy_ready = policy.strategy().postcopy_ready;
        let incoming = IncomingRequest { spec: spec.clone(), postcopy_ready, cpu_features: features.into_iter().collect(), listen_host };
        let prepared = dest.call(reqwest::Method::POST, "/v1/incoming", Some(serde_json::to_value(&incoming).unwrap_or_default())).await;
        let prepared = prepared.map_err(|e| fail(format!("cannot migrate {} to {}: {e}", rec.vm, rec.destination)))?;
        let uri = prepared["uri"].as_str().map(String::from).ok_or_else(|| fail(format!("destination gave no URI: {prepared}")))?;
        if *cancel.borrow_and_update() {
            return Err(Ended {
                phase: Phase::Cancelled,
                reason: walkabout_migrate::run::CANCELLED_BY_REQUEST.into(),
                past_switchover: false,
            });
        }
        let strategy = policy.strategy().clone();
        self.update(id, |r| {
            r.phase = Phase::Running;
            r.dirty_rate_bps = dirty;
            r.strategy = Some(strategy);
        });
        let me = self.clone();
        let report = move |p: &Progress, sw: Option<&Switch>| {
            me.update(id, |r| {
                if let Some(ph) = p.phase {
                    if !ph.is_final() && r.phase.can_become(ph) {
                        r.phase = ph;
                    }
                }
                r.progress = p.clone();
                if let Some(s) = sw {
                    r.switches.push(s.clone());
                }
            })
        };
        *lock(&dest.alive_at) = std::time::Instant::now();
        let probe = dest.probe();
        let outcome = walkabout_migrate::run::run(&qmp, &uri, policy, dest, cancel, report).await;
        probe.abort();
        let outcome = outcome.map_err(|e| fail(format!("migration of {} failed: {e}", rec.vm)))?;
        self.update(id, |r| {
            r.total_ms = Some(outcome.total_ms);
            r.downtime_ms = (outcome.phase == Phase::Completed).then_some(outcome.downtime_ms);
            r.switches = outcome.switches.clone();
        });
        if outcome.phase != Phase::Completed {
            let reason = outcome.reason.unwrap_or_else(|| format!("{:?}", outcome.phase));
            return Err(Ended { phase: outcome.phase, reason, past_switchover: false });
        }
        // The guest now runs on the destination; make it the VM's owner, then let go.
        // The source's console is complete (its guest is stopped): hand its status over.
        self.update(id, |r| r.phase = Phase::Switchover);
        let guest = match self.get(&rec.vm).await {
            Ok(info) => serde_json::to_value(&info.guest).unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        let commit = serde_json::json!({ "guest": guest });
        match dest.call(reqwest::Method::POST, &format!("/v1/incoming/{}/commit", rec.vm), Some(commit)).await {
            Ok(_) => {
                self.forget_migrated(&rec.vm).await;
                Ok(())
            }
            Err(e) => Err(Ended {
                phase: Phase::Failed,
                reason: format!(
                    "switchover done but the destination did not confirm the VM runs there ({e}); the source copy of {} is kept paused for recovery",
                    rec.vm
                ),
                past_switchover: true,
            }),
        }
    }

    /// After a successful migration: stop the source QEMU and forget the VM here.
    async fn forget_migrated(&self, name: &str) {
        let Ok(vm) = self.vm(name) else { return };
        let mut vm = vm.lock().await;
        if let Err(e) = self.halt(&mut vm, "migrated away").await {
            tracing::error!(vm = %name, error = %e, "cannot stop the source copy");
        }
        let run_dir = vm.record.run_dir.clone();
        drop(vm);
        self.unreserve(name, &run_dir);
    }

    /// After a migration that did not complete: tear the destination down and make sure
    /// the VM runs (or stays paused, as it was) on this host — unless the switchover
    /// had passed, when the source copy stays paused so that two never run.
    async fn settle_on_source(&self, name: &str, phase: Phase, was_running: bool, past_switchover: bool, reason: &str, dest: &Destination) {
        if !past_switchover {
            dest.abort().await;
        }
        let Ok(vm) = self.vm(name) else { return };
        let mut vm = vm.lock().await;
        let Some(qmp) = vm.qmp.clone() else { return };
        let status = qmp.query_status().await;
        let resume = was_running && !past_switchover && matches!(&status, Ok(s) if !s.running);
        if resume {
            if let Err(e) = qmp.cont().await {
                tracing::error!(vm = %name, error = %e, "cannot resume the VM on its source");
            }
        }
        let running = qmp.query_status().await.map(|s| s.running).unwrap_or(false);
        vm.record.state = if running { VmState::Running } else { VmState::Paused };
        vm.record.reason = Some(format!("migration {}: {reason}", format!("{phase:?}").to_lowercase()));
        if let Err(e) = self.inner.store.put(&vm.record) {
            tracing::error!(vm = %name, error = %e, "cannot record VM state");
        }
    }

    /// At start: migrations a previous run of this agent left unfinished are ended, and
    /// their VMs settled on this host (resumed, unless the switchover had passed).
    pub(crate) async fn recover_migrations(&self) {
        let records = match self.inner.store.list_migrations() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read stored migrations");
                return;
            }
        };
        for mut rec in records {
            if !rec.phase.is_final() {
                let dest = Destination::new(self.inner.http.clone(), &rec.destination, &rec.vm);
                let vm_qmp = match self.vm(&rec.vm) {
                    Ok(vm) => vm.lock().await.qmp.clone(),
                    Err(_) => None,
                };
                let mut reason = "the source agent restarted mid-migration".to_string();
                let mut past = false;
                if let Some(q) = vm_qmp {
                    let status = q.execute_raw("query-migrate", None).await.map(|v| v["status"].as_str().unwrap_or("none").to_string());
                    match status.as_deref() {
                        Ok("completed" | "device" | "postcopy-active") => {
                            past = true;
                            reason = "switchover done but the source agent restarted before the destination confirmed; the source copy is kept paused for recovery".into();
                        }
                        _ => {
                            let _ = q.execute_raw("migrate_cancel", None).await;
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                    }
                }
                self.settle_on_source(&rec.vm, Phase::Failed, !past, past, &reason, &dest).await;
                rec.phase = Phase::Failed;
                rec.reason = Some(reason);
                rec.finished_at_ms = Some(now_ms());
                let _ = self.inner.store.put_migration(&rec);
            }
            let (tx, _) = watch::channel(false);
            lock(&self.inner.migrations).insert(rec.id.clone(), Migration { record: rec, cancel: tx });
        }
    }

    // ---- destination side ----

    /// Prepares this host to receive a VM: checks, starts a paused QEMU waiting for the
    /// stream, and says where to send it. Nothing of the VM runs here yet.
    pub async fn prepare_incoming(&self, req: IncomingRequest) -> Result<IncomingReply, AgentError> {
        self.validate(&req.spec)?;
        let name = req.spec.name.clone();
        let vm = self.reserve(req.spec.clone(), VmState::Incoming)?;
        let mut guard = vm.lock().await;
        let result = async {
            self.boot(&mut guard, true).await?;
            let qmp =
                guard.qmp.clone().ok_or_else(|| AgentError::InvalidState { vm: name.clone(), op: "receive", state: guard.record.state })?;
            self.check_cpu(&name, &qmp, &req.cpu_features).await?;
            let uri = walkabout_migrate::run::listen_incoming(&qmp, req.postcopy_ready, &req.listen_host)
                .await
                .map_err(|e| AgentError::InvalidRequest { reason: format!("cannot receive {name}: {e}") })?;
            // Arm: `cont` on an incoming QEMU means "run the guest once it is fully
            // loaded", which cannot happen before the source passes its switchover gate.
            // Arming now keeps that hand-over out of the guest's downtime.
            qmp.cont().await.map_err(|e| AgentError::Qemu { vm: name.clone(), source: e.into() })?;
            self.inner.store.put(&guard.record)?;
            Ok(IncomingReply { uri })
        }
        .await;
        if result.is_ok() {
            lock(&self.inner.leases).insert(name.clone(), std::time::Instant::now());
            self.spawn_lease_watch(name.clone(), guard.record.pid);
        }
        if result.is_err() {
            if let Some(p) = guard.process.take() {
                p.kill(Duration::from_secs(2)).await;
            }
            guard.record.state = crate::spec::VmState::Stopped;
            let run_dir = guard.record.run_dir.clone();
            drop(guard);
            self.unreserve(&name, &run_dir);
        }
        result
    }

    async fn check_cpu(&self, name: &str, qmp: &Qmp, needed: &[String]) -> Result<(), AgentError> {
        let ceiling = self.cpu_ceiling();
        let offered = cpu::features(qmp, &ceiling)
            .await
            .map_err(|e| AgentError::InvalidRequest { reason: format!("cannot read CPU model {ceiling}: {e}") })?;
        let needed = needed.iter().cloned().collect();
        let missing = cpu::missing(&needed, &offered);
        if missing.is_empty() {
            return Ok(());
        }
        Err(AgentError::CpuIncompatible { vm: name.into(), host: crate::host::hostname(), ceiling, missing: missing.join(", ") })
    }

    fn incoming_vm(&self, name: &str) -> Result<std::sync::Arc<tokio::sync::Mutex<crate::vms::Vm>>, AgentError> {
        self.vm(name)
    }

    /// Confirms the VM runs here and makes this agent its owner; `guest_before` is the
    /// guest's status as the source's console left it.
    pub async fn commit_incoming(
        &self,
        name: &str,
        guest_before: Option<crate::console::GuestStatus>,
    ) -> Result<crate::vms::VmInfo, AgentError> {
        let vm = self.incoming_vm(name)?;
        let mut vm = vm.lock().await;
        if vm.record.state == VmState::Running {
            return Ok(self.info_of(&vm));
        }
        if vm.record.state != VmState::Incoming {
            return Err(AgentError::InvalidState { vm: name.into(), op: "commit", state: vm.record.state });
        }
        let qmp = vm.qmp.clone().ok_or_else(|| AgentError::InvalidState { vm: name.into(), op: "commit", state: vm.record.state })?;
        let start = std::time::Instant::now();
        loop {
            match qmp.query_status().await {
                Ok(s) if s.running => break,
                Ok(_) if start.elapsed() < Duration::from_secs(60) => tokio::time::sleep(Duration::from_millis(20)).await,
                Ok(s) => {
                    return Err(AgentError::InvalidRequest {
                        reason: format!("{name} did not start here after switchover (QEMU state {})", s.status),
                    })
                }
                Err(e) => return Err(AgentError::Qemu { vm: name.into(), source: e.into() }),
            }
        }
        vm.record.state = VmState::Running;
        vm.record.reason = Some("migrated in".into());
        vm.record.guest_before = guest_before;
        self.inner.store.put(&vm.record)?;
        tracing::info!(vm = %name, "VM migrated in and runs here");
        Ok(self.info_of(&vm))
    }

    /// Tears down an incoming VM that never ran here. Idempotent; refused once it runs.
    pub async fn abort_incoming(&self, name: &str) -> Result<(), AgentError> {
        let Ok(vm) = self.incoming_vm(name) else { return Ok(()) };
        let mut vm = vm.lock().await;
        if vm.record.state != VmState::Incoming {
            return Err(AgentError::InvalidState { vm: name.into(), op: "abort the migration of", state: vm.record.state });
        }
        vm.record.state = VmState::Stopped;
        if let Some(p) = vm.process.take() {
            p.kill(Duration::from_secs(2)).await;
        }
        let run_dir = vm.record.run_dir.clone();
        drop(vm);
        self.unreserve(name, &run_dir);
        tracing::info!(vm = %name, "incoming migration aborted");
        Ok(())
    }

    /// The incoming VM, while it is incoming: the source's liveness probe, which also
    /// renews the destination's lease.
    pub async fn incoming(&self, name: &str) -> Result<crate::vms::VmInfo, AgentError> {
        let vm = self.incoming_vm(name)?;
        let vm = vm.lock().await;
        if !matches!(vm.record.state, VmState::Incoming | VmState::Running) || vm.record.reason.as_deref() == Some("migrated in") {
            return Err(AgentError::InvalidState { vm: name.into(), op: "receive", state: vm.record.state });
        }
        lock(&self.inner.leases).insert(name.to_string(), std::time::Instant::now());
        Ok(self.info_of(&vm))
    }

    /// Watches an incoming VM's lease until the migration is committed or aborted.
    fn spawn_lease_watch(&self, name: String, pid: Option<i32>) {
        let agent = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Ok(vm) = agent.vm(&name) else { break };
                let mut vm = vm.lock().await;
                if vm.record.pid != pid || vm.record.state != VmState::Incoming {
                    break;
                }
                let renewed = lock(&agent.inner.leases).get(&name).copied();
                if renewed.is_some_and(|t| t.elapsed() < INCOMING_LEASE) {
                    continue;
                }
                let runs = match &vm.qmp {
                    Some(q) => q.query_status().await.map(|s| s.running).unwrap_or(false),
                    None => false,
                };
                if runs {
                    // Past the switchover: the guest lives here now, whatever the source knows.
                    vm.record.state = VmState::Running;
                    vm.record.reason = Some("migrated in; the source went silent before confirming".into());
                    let _ = agent.inner.store.put(&vm.record);
                    tracing::warn!(vm = %name, "source went silent after switchover; the VM runs here");
                    break;
                }
                tracing::warn!(vm = %name, lease_ms = INCOMING_LEASE.as_millis() as u64, "source went silent; tearing the incoming VM down");
                drop(vm);
                let _ = agent.abort_incoming(&name).await;
                break;
            }
            lock(&agent.inner.leases).remove(&name);
        });
    }
}
