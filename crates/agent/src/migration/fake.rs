//! Fakes for unit tests of the migration driver: a scripted QEMU, a destination agent
//! that goes silent at a chosen moment, and an agent's books that record what the
//! driver did to the migration and the VM (and can cancel at a chosen phase).

use super::driver::{request_cancel, AgentSide, PeerAgent};
use crate::error::AgentError;
use crate::vms::lock;
use serde_json::{json, Value};
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, watch};
use walkabout_api::migration::{IncomingReply, IncomingRequest, MigrationRecord, MirrorSync, NbdExport, NbdTarget, RecoverRequest};
use walkabout_api::{ClientError, GuestStatus, Phase, StorageMode};
use walkabout_migrate::MigrationQmp;
use walkabout_qemu::{Event, QmpError};

/// What the fake QEMU does and has been told.
pub(crate) struct QemuState {
    /// The guest's vCPUs run.
    pub running: bool,
    /// The migration status `query-migrate` reports now (`none` before `migrate`).
    pub status: String,
    /// Statuses still to come, one per `query-migrate` after `migrate`; the last one
    /// stays. `pre-switchover` pauses the guest and holds until `migrate-continue`
    /// (which moves on) or `migrate_cancel`; `completed` leaves the guest paused.
    pub script: VecDeque<String>,
    /// Every command received, by name, in order.
    pub commands: Vec<String>,
    /// Every command received with its arguments, in order.
    pub args: Vec<(String, Value)>,
    /// In post-copy, the stream stops moving (a cut link): bytes sent stay put.
    pub postcopy_stalls: bool,
    /// Called once when the migration reaches `pre-switchover`.
    pub at_pre_switchover: Option<Box<dyn FnMut() + Send>>,
    /// `query-migrate` replies so far (the pass counter).
    polls: u64,
    /// MiB sent, as reported.
    sent: u64,
    /// Disk mirror jobs (`blockdev-mirror`) get READY after this many
    /// `query-block-jobs` (never, if `None`).
    pub mirror_ready_after: Option<u64>,
    /// Mirror jobs running: (job id, `query-block-jobs` seen).
    pub jobs: Vec<(String, u64)>,
    /// Block nodes added (`blockdev-add`) and not deleted.
    pub nodes: Vec<String>,
    /// Every `block-job-cancel`, with its `force` flag.
    pub job_cancels: Vec<(String, bool)>,
}

/// A scripted QEMU: a migration that walks through the given statuses.
#[derive(Clone)]
pub(crate) struct FakeQemu {
    state: Arc<Mutex<QemuState>>,
    events: broadcast::Sender<Event>,
}

impl FakeQemu {
    /// A running guest whose migration will report `script`, one status per sample.
    pub fn new(script: &[&str]) -> FakeQemu {
        let state = QemuState {
            running: true,
            status: "none".into(),
            script: script.iter().map(|s| s.to_string()).collect(),
            commands: vec![],
            args: vec![],
            postcopy_stalls: false,
            at_pre_switchover: None,
            polls: 0,
            sent: 0,
            mirror_ready_after: Some(3),
            jobs: vec![],
            nodes: vec![],
            job_cancels: vec![],
        };
        FakeQemu { state: Arc::new(Mutex::new(state)), events: broadcast::channel(16).0 }
    }

    /// A QEMU whose post-copy stream stops moving (its link is cut).
    pub fn stalling_in_postcopy(self) -> FakeQemu {
        lock(&self.state).postcopy_stalls = true;
        self
    }

    /// Calls `f` when the migration reaches `pre-switchover`.
    pub fn at_pre_switchover(self, f: impl FnMut() + Send + 'static) -> FakeQemu {
        lock(&self.state).at_pre_switchover = Some(Box::new(f));
        self
    }

    /// The state, to look at.
    pub fn state(&self) -> std::sync::MutexGuard<'_, QemuState> {
        lock(&self.state)
    }

    /// Emits a QMP event.
    pub fn emit(&self, event: &str, data: Value) {
        let _ = self.events.send(Event { event: event.into(), data, timestamp: Value::Null });
    }

    /// Where `command` was first received (its index), if it was.
    pub fn position(&self, command: &str) -> Option<usize> {
        self.state().commands.iter().position(|c| c == command)
    }

    /// Whether `command` was received.
    pub fn got(&self, command: &str) -> bool {
        self.state().commands.iter().any(|c| c == command)
    }

    fn answer(&self, command: &str, args: &Value) -> Result<Value, QmpError> {
        let mut s = lock(&self.state);
        s.commands.push(command.to_string());
        s.args.push((command.to_string(), args.clone()));
        match command {
            "query-named-block-nodes" => Ok(json!([{"node-name": "disk0", "image": {"virtual-size": 64u64 << 20}}])),
            "blockdev-add" => {
                let node = args["node-name"].as_str().unwrap_or("").to_string();
                s.nodes.push(node);
                Ok(json!({}))
            }
            "blockdev-del" => {
                let node = args["node-name"].as_str().unwrap_or("");
                s.nodes.retain(|n| n != node);
                Ok(json!({}))
            }
            "blockdev-mirror" => {
                let id = args["job-id"].as_str().unwrap_or("").to_string();
                s.jobs.push((id, 0));
                Ok(json!({}))
            }
            "block-job-cancel" => {
                let id = args["device"].as_str().unwrap_or("").to_string();
                s.job_cancels.push((id.clone(), args["force"].as_bool().unwrap_or(false)));
                s.jobs.retain(|(j, _)| *j != id);
                Ok(json!({}))
            }
            "query-block-jobs" => {
                let after = s.mirror_ready_after;
                let jobs: Vec<Value> = s
                    .jobs
                    .iter_mut()
                    .map(|(id, seen)| {
                        *seen += 1;
                        let ready = after.is_some_and(|a| *seen >= a);
                        let offset = if ready { 64u64 << 20 } else { *seen << 20 };
                        json!({"device": id, "type": "mirror", "len": 64u64 << 20, "offset": offset, "ready": ready,
                               "status": if ready { "ready" } else { "running" }, "io-status": "ok"})
                    })
                    .collect();
                Ok(Value::Array(jobs))
            }
            "query-status" => Ok(json!({"running": s.running, "status": if s.running { "running" } else { "paused" }})),
            "cont" => {
                s.running = true;
                Ok(json!({}))
            }
            "query-dirty-rate" => Ok(json!({"status": "measured", "dirty-rate": 4})),
            "migrate" if s.status == "postcopy-paused" => {
                // `resume: true`: the new stream is being set up.
                s.status = "postcopy-recover".into();
                Ok(json!({}))
            }
            "migrate" => {
                s.status = "setup".into();
                Ok(json!({}))
            }
            "migrate-pause" => {
                if s.status == "postcopy-active" {
                    s.status = "postcopy-paused".into();
                }
                Ok(json!({}))
            }
            "query-migrate" => {
                let holding = matches!(s.status.as_str(), "pre-switchover" | "cancelled" | "none" | "postcopy-paused");
                if !holding {
                    if let Some(next) = s.script.pop_front() {
                        s.status = next;
                        if s.status == "pre-switchover" {
                            s.running = false;
                            if let Some(mut f) = s.at_pre_switchover.take() {
                                drop(s);
                                f();
                                s = lock(&self.state);
                            }
                        }
                        if s.status == "completed" {
                            s.running = false;
                        }
                    }
                }
                s.polls += 1;
                let polls = s.polls;
                if !(s.postcopy_stalls && s.status.starts_with("postcopy-")) {
                    s.sent = polls;
                }
                let sent = s.sent;
                Ok(json!({
                    "status": s.status, "total-time": polls * 100, "expected-downtime": 10, "downtime": 12,
                    "ram": {"total": 64 << 20, "transferred": sent << 20, "remaining": (64u64 << 20).saturating_sub(sent << 20),
                            "dirty-sync-count": polls, "page-size": 4096, "dirty-pages-rate": 0, "mbps": 800.0}
                }))
            }
            "migrate-continue" => {
                if s.status != "pre-switchover" {
                    return Err(QmpError::Refused { command: command.into(), class: "GenericError".into(), desc: "not paused".into() });
                }
                s.status = s.script.pop_front().unwrap_or_else(|| "completed".into());
                Ok(json!({}))
            }
            "migrate_cancel" => {
                if matches!(s.status.as_str(), "setup" | "active" | "pre-switchover") {
                    s.status = "cancelled".into();
                    s.script.clear();
                }
                Ok(json!({}))
            }
            _ => Ok(json!({})),
        }
    }
}

impl MigrationQmp for FakeQemu {
    async fn execute(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.answer(command, &args.unwrap_or(Value::Null))
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn cpu_features(&self, _model: &str) -> Result<BTreeSet<String>, QmpError> {
        Ok(["sse2".to_string(), "lm".to_string()].into())
    }
}

/// The destination agent's calls, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Prepare,
    Probe,
    Commit,
    Abort,
    Recover,
}

/// What the fake destination does and has been asked.
#[derive(Default)]
pub(crate) struct PeerState {
    /// Every call, in order (a silent peer's included).
    pub calls: Vec<Call>,
    /// From the first call of this kind on, the peer answers nothing.
    pub silent_from: Option<Call>,
    /// The answer to a commit, when not the default success.
    pub commit_error: Option<ClientError>,
    /// The first this many commits find the destination unreachable (its agent
    /// restarting).
    pub commit_unreachable: usize,
    /// The guest status the source handed over at commit.
    pub committed: Option<Option<GuestStatus>>,
    /// After this many probes answered, the destination answers that it has no such VM.
    pub forgot_after: Option<usize>,
    /// An outage: after this many probes answered, silent for this long (forever if `None`).
    pub outage: Option<(usize, Option<std::time::Duration>)>,
    outage_began: Option<std::time::Instant>,
    /// The storage hand-shake: the destination answers `copy` with an NBD target.
    pub copy: bool,
    /// The destination expects QEMU's streams over TLS.
    pub tls: bool,
    /// The request the source prepared the destination with.
    pub prepared: Option<IncomingRequest>,
    silent: bool,
}

/// A destination agent that answers until told to go silent.
#[derive(Clone, Default)]
pub(crate) struct FakePeer(Arc<Mutex<PeerState>>);

impl FakePeer {
    /// A destination that goes silent from its first `call` on.
    pub fn silent_from(call: Call) -> FakePeer {
        let p = FakePeer::default();
        p.state().silent_from = Some(call);
        p
    }

    /// A destination that answers `probes` probes, then nothing for `length` (a cut
    /// link; never back if `None`), then answers again.
    pub fn outage(probes: usize, length: Option<std::time::Duration>) -> FakePeer {
        let p = FakePeer::default();
        p.state().outage = Some((probes, length));
        p
    }

    /// A destination silent from its 4th probe for `outage`, then answering that it
    /// has no such VM (it tore its half down meanwhile).
    pub fn forgetting(outage: std::time::Duration) -> FakePeer {
        let p = FakePeer::outage(3, Some(outage));
        p.state().forgot_after = Some(3);
        p
    }

    /// A destination whose commit answers `e`.
    pub fn refusing_commit(e: ClientError) -> FakePeer {
        let p = FakePeer::default();
        p.state().commit_error = Some(e);
        p
    }

    /// A destination unreachable for its first `n` commits, then confirming.
    pub fn restarting_at_commit(n: usize) -> FakePeer {
        let p = FakePeer::default();
        p.state().commit_unreachable = n;
        p
    }

    /// A destination that takes the disks by copy.
    pub fn copying() -> FakePeer {
        let p = FakePeer::default();
        p.state().copy = true;
        p
    }

    /// The state, to look at.
    pub fn state(&self) -> std::sync::MutexGuard<'_, PeerState> {
        lock(&self.0)
    }

    /// Whether the driver made a call of this kind.
    pub fn got(&self, call: Call) -> bool {
        self.state().calls.contains(&call)
    }

    fn call(&self, call: Call) -> Result<(), ClientError> {
        let mut s = self.state();
        s.calls.push(call);
        s.silent |= s.silent_from == Some(call);
        let probes = s.calls.iter().filter(|c| **c == Call::Probe).count();
        let in_outage = match (s.outage, s.outage_began) {
            (Some((after, _)), None) if probes > after => {
                s.outage_began = Some(std::time::Instant::now());
                true
            }
            (Some((_, length)), Some(began)) => length.is_none_or(|l| began.elapsed() < l),
            _ => false,
        };
        if s.silent || in_outage {
            return Err(refused());
        }
        Ok(())
    }
}

impl PeerAgent for FakePeer {
    async fn prepare_incoming(&self, req: &IncomingRequest, _timeout: std::time::Duration) -> Result<IncomingReply, ClientError> {
        self.call(Call::Prepare)?;
        let mut s = self.state();
        s.prepared = Some(req.clone());
        let nbd = s.copy.then(|| NbdTarget {
            host: "127.0.0.1".into(),
            port: 10809,
            exports: vec![NbdExport { node_name: "disk0".into(), export: "disk0".into(), sync: MirrorSync::Full }],
        });
        let storage = s.copy.then_some(StorageMode::Copy);
        Ok(IncomingReply { uri: "tcp:127.0.0.1:4444".into(), storage, nbd, tls: s.tls, relay: false })
    }

    async fn probe(&self, _vm: &str, _timeout: std::time::Duration) -> Result<(), ClientError> {
        self.call(Call::Probe)?;
        let forgot = {
            let s = self.state();
            s.forgot_after.is_some_and(|n| s.calls.iter().filter(|c| **c == Call::Probe).count() > n)
        };
        if forgot {
            let body = walkabout_api::ErrorBody {
                error: "VM `vm1` not found".into(),
                kind: walkabout_api::ErrorKind::NotFound,
                blocked: vec![],
                plan: None,
            };
            return Err(ClientError::Api { status: 404, body });
        }
        Ok(())
    }

    async fn commit_incoming(&self, _vm: &str, guest: Option<GuestStatus>) -> Result<(), ClientError> {
        self.call(Call::Commit)?;
        let mut s = self.state();
        if s.calls.iter().filter(|c| **c == Call::Commit).count() <= s.commit_unreachable {
            return Err(refused());
        }
        match s.commit_error.clone() {
            Some(e) => Err(e),
            None => {
                s.committed = Some(guest);
                Ok(())
            }
        }
    }

    async fn recover_incoming(&self, _vm: &str, _req: &RecoverRequest) -> Result<IncomingReply, ClientError> {
        self.call(Call::Recover)?;
        let n = self.state().calls.iter().filter(|c| **c == Call::Recover).count();
        Ok(IncomingReply { uri: format!("tcp:127.0.0.1:{}", 5000 + n), storage: None, nbd: None, tls: false, relay: false })
    }

    async fn abort_incoming(&self, _vm: &str) -> Result<(), ClientError> {
        self.call(Call::Abort)
    }
}

/// What the fake agent's books hold.
pub(crate) struct Books {
    /// The migration's record.
    pub record: MigrationRecord,
    /// Every phase the record took, in order.
    pub phases: Vec<Phase>,
    /// Transitions `Phase::can_become` forbids, if the driver made any.
    pub illegal: Vec<(Phase, Phase)>,
    /// The VM stayed here: (running, reason).
    pub kept: Option<(bool, String)>,
    /// The VM was forgotten here (the source QEMU told to quit).
    pub forgotten: bool,
    /// The console's guest status.
    pub guest: GuestStatus,
    /// An operator's cancel arrives when the record reaches this phase...
    pub cancel_at: Option<Phase>,
    /// ... and the agent answers this.
    pub cancel_answer: Option<Result<MigrationRecord, AgentError>>,
}

/// An agent's books for one migration, with its cancel switch.
#[derive(Clone)]
pub(crate) struct FakeAgent {
    books: Arc<Mutex<Books>>,
    cancel: Arc<watch::Sender<bool>>,
}

impl FakeAgent {
    /// Books for `record`, its guest's console saying `guest`.
    pub fn new(record: MigrationRecord, guest: GuestStatus) -> FakeAgent {
        let books = Books {
            phases: vec![record.phase],
            record,
            illegal: vec![],
            kept: None,
            forgotten: false,
            guest,
            cancel_at: None,
            cancel_answer: None,
        };
        FakeAgent { books: Arc::new(Mutex::new(books)), cancel: Arc::new(watch::channel(false).0) }
    }

    /// The operator cancels when the record reaches `phase`.
    pub fn cancelling_at(self, phase: Phase) -> FakeAgent {
        lock(&self.books).cancel_at = Some(phase);
        self
    }

    /// The driver's end of the cancel switch.
    pub fn cancel_switch(&self) -> watch::Receiver<bool> {
        self.cancel.subscribe()
    }

    /// The operator cancels now, by the agent's rule.
    pub fn cancel(&self) -> Result<MigrationRecord, AgentError> {
        let record = lock(&self.books).record.clone();
        request_cancel(&record, &self.cancel)
    }

    /// The books, to look at.
    pub fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        lock(&self.books)
    }
}

impl AgentSide for FakeAgent {
    fn update(&self, f: impl FnOnce(&mut MigrationRecord)) {
        let mut b = lock(&self.books);
        let before = b.record.phase;
        f(&mut b.record);
        let after = b.record.phase;
        if after == before {
            return;
        }
        if !before.can_become(after) {
            b.illegal.push((before, after));
        }
        b.phases.push(after);
        if b.cancel_at == Some(after) {
            let answer = request_cancel(&b.record, &self.cancel);
            b.cancel_answer = Some(answer);
        }
    }

    async fn guest_status(&self) -> Option<GuestStatus> {
        Some(lock(&self.books).guest.clone())
    }

    async fn forget_vm(&self) {
        lock(&self.books).forgotten = true;
    }

    async fn keep_vm(&self, running: bool, reason: String) {
        lock(&self.books).kept = Some((running, reason));
    }
}

/// What a destination whose agent is down answers: nothing (connection refused).
fn refused() -> ClientError {
    ClientError::Unreachable { url: "http://dest".into(), detail: "connection refused".into() }
}
