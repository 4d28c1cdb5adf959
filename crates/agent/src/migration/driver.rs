//! The source side of a migration, as logic over three narrow doors: the VM's QEMU
//! ([`MigrationQmp`]), the destination agent ([`PeerAgent`]) and this agent's books
//! ([`AgentSide`]: the migration's record and the VM's entry). The agent plugs in its
//! QMP session, its typed client of the peer and itself; unit tests plug in fakes.
//!
//! The order of [`Driver::drive`], and why:
//! - Preparing: the CPU features and the guest's dirty rate are read while the
//!   destination starts its QEMU; nothing has left the source, so any failure or
//!   cancel here tears the destination down and leaves the guest where it runs.
//! - Running: [`walkabout_migrate::run`] sends memory and gates the switchover on the
//!   destination's last answer to the probes this driver sends meanwhile (which are
//!   also the destination's lease). Up to the gate the guest has only ever run here:
//!   failure or cancel resumes it here and tears the destination down.
//! - Switchover: past the gate the guest may already run on the destination, so the
//!   source never resumes its copy, whatever happens next; cancel is refused.
//! - Completed only once the destination confirmed (commit, carrying this console's
//!   guest status so its heartbeat accounting continues): then the source QEMU quits and
//!   the VM is forgotten here. A commit that fails leaves the source copy paused for
//!   recovery; the destination adopts the guest when the source goes silent.
//! - Post-copy that loses its stream pauses (at both ends) instead of failing: the run
//!   re-establishes it through [`PeerAgent::recover_incoming`] when the destination
//!   answers again, within the strategy's recovery budget. Out of budget, the migration
//!   ends `failed` past the switchover: neither copy is resumed nor torn down, and the
//!   reason names which host holds what.
//! - Completed only once the destination confirmed (commit, carrying this console's
//!   guest status so its heartbeat accounting continues): then the source QEMU quits and
//!   the VM is forgotten here. A commit that fails leaves the source copy paused for
//!   recovery; the destination adopts the guest when the source goes silent.

use super::storage;
use crate::error::AgentError;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use walkabout_api::migration::{IncomingReply, IncomingRequest, MigrationRecord, RecoverRequest};
use walkabout_api::{ClientError, GuestStatus, VmSpec};
use walkabout_migrate::run::{DirtySample, Peer, CANCELLED_BY_REQUEST};
use walkabout_migrate::{HostFacts, MigrationQmp, Outcome, Phase, Policy, Progress, Switch};

/// How long the destination may take to prepare (start its QEMU), by default.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the source probes the destination during a migration.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a source whose destination did not confirm the switchover (unreachable)
/// keeps asking it again: a destination agent killed at the switchover and restarted
/// adopts the guest running there, then confirms (the fault soak's "destination
/// killed": without this the source kept its copy paused and the controller walked that).
#[cfg(not(test))]
const COMMIT_RETRY_WINDOW: Duration = Duration::from_secs(30);
#[cfg(test)]
const COMMIT_RETRY_WINDOW: Duration = Duration::from_millis(300);
/// How often the confirmation is asked again.
#[cfg(not(test))]
const COMMIT_RETRY_INTERVAL: Duration = Duration::from_secs(1);
#[cfg(test)]
const COMMIT_RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// How long the source measures the guest's dirty rate before choosing a strategy.
const DIRTY_RATE_WINDOW_MS: u64 = 500;
/// How often the disk mirrors are read while memory waits for them.
const MIRROR_POLL: Duration = Duration::from_millis(100);
/// While the disks copy (before any memory moves, the guest running here only) the
/// destination may be silent this many times the migration's patience before the copy
/// is given up: its agent, busy writing the copy on a loaded host, answered probes
/// 1.7-2.3 s late (bench/results/storage-hops.json), and a destination really gone
/// also shows as the mirror's I/O error. The switchover gate keeps the short patience.
const MIRROR_PATIENCE_FACTOR: u32 = 3;

/// The destination agent, as the source's driver uses it.
pub(crate) trait PeerAgent: Send + Sync {
    /// `POST /v1/incoming`: start a QEMU waiting for the stream; where to send it.
    /// `timeout`: how long the destination may take to answer (it starts a QEMU).
    fn prepare_incoming(&self, req: &IncomingRequest, timeout: Duration)
        -> impl Future<Output = Result<IncomingReply, ClientError>> + Send;
    /// `GET /v1/incoming/{vm}` with a short timeout: the liveness probe, which also
    /// renews the destination's lease.
    fn probe(&self, vm: &str, timeout: Duration) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// `POST /v1/incoming/{vm}/commit`: the VM runs there now, with the source's last
    /// guest status.
    fn commit_incoming(&self, vm: &str, guest: Option<GuestStatus>) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// `DELETE /v1/incoming/{vm}`: tear down a destination that never ran the guest.
    fn abort_incoming(&self, vm: &str) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// `POST /v1/incoming/{vm}/recover`: a paused post-copy listens again; where to
    /// resume sending.
    fn recover_incoming(&self, vm: &str, req: &RecoverRequest) -> impl Future<Output = Result<IncomingReply, ClientError>> + Send;
}

/// What the driver needs of the agent running it, for one migration and its VM.
pub(crate) trait AgentSide: Send + Sync {
    /// Changes the migration's record (kept, and persisted when its phase changes).
    fn update(&self, f: impl FnOnce(&mut MigrationRecord));
    /// The guest's status as this host's console shows it now.
    fn guest_status(&self) -> impl Future<Output = Option<GuestStatus>> + Send;
    /// The migration completed: stop the source QEMU and forget the VM here.
    fn forget_vm(&self) -> impl Future<Output = ()> + Send;
    /// The migration did not complete: the VM stays here, running or paused, and says why.
    fn keep_vm(&self, running: bool, reason: String) -> impl Future<Output = ()> + Send;
}

/// Asks a migration to cancel: only before its switchover (the ownership rule); a
/// cancelled migration answers again as it is.
pub(crate) fn request_cancel(record: &MigrationRecord, cancel: &watch::Sender<bool>) -> Result<MigrationRecord, AgentError> {
    match record.phase {
        Phase::Cancelled => Ok(record.clone()),
        p if p.cancellable() => {
            // Stored even if the driver has not subscribed yet (or has already ended).
            cancel.send_replace(true);
            Ok(record.clone())
        }
        p => {
            // Live, the progress says since when; at the end, the record's last pause.
            let stuck = record.postcopy_pauses.last().filter(|x| x.resumed_at_ms.is_none()).map(|x| x.paused_at_ms);
            let why = match record.progress.postcopy_paused_since_ms.or(stuck) {
                Some(since) => format!(
                    "post-copy is paused (since {since} ms after the epoch, {} recovery attempts): the guest's running state is at the destination \
                     and part of its memory still at the source, so it cannot be undone, only completed once the link returns",
                    record.progress.recovery_attempts
                ),
                _ if walkabout_migrate::run::is_postcopy(&record.progress.qemu_status) && !p.is_final() => {
                    "post-copy runs: the guest runs at the destination with part of its memory at the source, so it cannot be undone".into()
                }
                _ => "the VM now belongs to the destination".into(),
            };
            Err(AgentError::NotCancellable { id: record.id.clone(), vm: record.vm.clone(), phase: p, why })
        }
    }
}

/// How a migration that did not complete ended.
struct Ended {
    phase: Phase,
    reason: String,
    /// The source had passed its switchover gate: its copy must never be resumed.
    past_switchover: bool,
}

/// When the destination last answered a probe, whether it said it no longer has the
/// VM, and whether the disk mirrors (if any) are still in sync: a broken mirror makes
/// the destination count as gone, so the switchover gate does not pass.
struct Liveness {
    last: Mutex<Instant>,
    lost: Mutex<Option<String>>,
    mirrors: Option<storage::MirrorHealth>,
}

impl Liveness {
    fn now(mirrors: Option<storage::MirrorHealth>) -> Liveness {
        Liveness { last: Mutex::new(Instant::now()), lost: Mutex::new(None), mirrors }
    }
    fn answered(&self) {
        *crate::vms::lock(&self.last) = Instant::now();
        *crate::vms::lock(&self.lost) = None;
    }
    fn gone(&self, why: String) {
        *crate::vms::lock(&self.lost) = Some(why);
    }
    fn mirror_failure(&self) -> Option<String> {
        self.mirrors.as_ref().and_then(storage::MirrorHealth::failure)
    }

    fn since(&self) -> Duration {
        if self.mirror_failure().is_some() {
            return Duration::MAX;
        }
        crate::vms::lock(&self.last).elapsed()
    }
}

/// The destination as the run sees it: when it last answered, and how to ask it to
/// listen again for a paused post-copy.
struct Link<'a, P> {
    alive: &'a Liveness,
    peer: &'a P,
    vm: &'a str,
    listen_host: &'a str,
    /// The migration's `peer_timeout_ms`, or [`walkabout_migrate::run::PEER_TIMEOUT`].
    patience: Duration,
    /// A relayed migration: where this host's QEMU resumes sending (the relay's loopback
    /// listener, whose tunnel the destination points at its new port).
    relayed_uri: Option<&'a str>,
}

impl<P: PeerAgent> Peer for Link<'_, P> {
    fn since_alive(&self) -> Duration {
        self.alive.since()
    }

    fn patience(&self) -> Duration {
        self.patience
    }

    fn lost(&self) -> Option<String> {
        crate::vms::lock(&self.alive.lost).clone()
    }

    async fn recover(&self) -> Result<String, String> {
        let req = RecoverRequest { listen_host: self.listen_host.to_string() };
        let reply = self.peer.recover_incoming(self.vm, &req).await.map_err(|e| e.to_string())?;
        match (self.relayed_uri, reply.relay) {
            (None, _) => Ok(reply.uri),
            (Some(uri), true) => Ok(uri.to_string()),
            (Some(_), false) => Err(format!("the destination listens again at {} without relaying it", reply.uri)),
        }
    }
}

/// This host's cores and load, for the stream settings (multifd only with spare cores).
fn host_facts() -> HostFacts {
    let cores = std::thread::available_parallelism().map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX)).unwrap_or(1);
    let busy_cores = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse::<f64>().ok()))
        .unwrap_or(f64::from(cores));
    HostFacts { cores, busy_cores, single_stream_bps: walkabout_migrate::policy::SINGLE_STREAM_BPS }
}

/// Returns when QEMU announces a block job in sync (`BLOCK_JOB_READY`); never if its
/// event stream has ended.
async fn job_ready(events: &mut tokio::sync::broadcast::Receiver<walkabout_qemu::Event>) {
    loop {
        match events.recv().await {
            Ok(ev) if ev.event == "BLOCK_JOB_READY" => return,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// The policy a migration starts with, and the dirty-rate sample it still waits on
/// (a disk copy's, read once its mirrors are in sync).
struct Chosen {
    policy: Policy,
    late_sample: Option<DirtySample>,
}

/// One outgoing migration: the VM's QEMU, the destination, this agent's books, and
/// what the migration was asked to do.
pub(crate) struct Driver<Q, P, A> {
    /// The VM's QEMU on this host.
    pub(crate) qmp: Q,
    /// The destination agent.
    pub(crate) peer: P,
    /// This agent, for this migration and its VM.
    pub(crate) agent: A,
    /// The migration as started (id, VM, destination, mode, limits).
    pub(crate) record: MigrationRecord,
    /// The VM's spec, which the destination reproduces.
    pub(crate) spec: VmSpec,
    /// The guest ran when the migration started (so a failure resumes it).
    pub(crate) was_running: bool,
    /// How this host's QEMU secures the streams (TLS under the cluster CA, or plain).
    pub(crate) tls: super::tls::StreamTls,
    /// How this agent opens tunnels to the destination's agent, when the migration
    /// relays its streams (`relay`).
    pub(crate) dialer: super::relay::Dialer,
}

impl<Q: MigrationQmp, P: PeerAgent, A: AgentSide> Driver<Q, P, A> {
    /// Drives the migration to its end and leaves exactly one running copy of the VM;
    /// returns the final phase.
    pub(crate) async fn drive(self, cancel: watch::Receiver<bool>) -> Phase {
        let (phase, reason) = match self.migrate(cancel).await {
            Ok(()) => (Phase::Completed, None),
            Err(Ended { phase, reason, past_switchover }) => {
                self.settle_on_source(phase, past_switchover, &reason).await;
                (phase, Some(reason))
            }
        };
        tracing::info!(id = %self.record.id, vm = %self.record.vm, ?phase, reason = ?reason, "migration finished");
        self.agent.update(|r| {
            r.phase = phase;
            r.reason = reason;
            r.finished_at_ms = Some(crate::vms::now_ms());
            r.total_ms.get_or_insert(crate::vms::now_ms().saturating_sub(r.created_at_ms));
        });
        phase
    }

    /// Returns how it ended on anything but completion.
    async fn migrate(&self, mut cancel: watch::Receiver<bool>) -> Result<(), Ended> {
        let rec = &self.record;
        let fail = |reason: String| Ended { phase: Phase::Failed, reason, past_switchover: false };
        self.agent.update(|r| r.phase = Phase::Preparing);
        let spec = &self.spec;
        // Storage: whether the destination may copy the disks (it picks `shared` or
        // `copy` from what it sees).
        let asked = rec.storage.unwrap_or_default();
        // Post-copy would run the guest at the destination while its NBD server still
        // serves the copy (and the source's mirror is its only writer until then): a VM
        // whose disks may be copied migrates its memory by pre-copy.
        let may_copy = !spec.disks.is_empty() && asked != walkabout_api::StorageMode::Shared;
        if may_copy && rec.mode == walkabout_api::Mode::Postcopy {
            return Err(fail(format!(
                "cannot migrate {} with --mode postcopy and --storage {asked}: post-copy needs --storage shared (a disk copy switches over with pre-copy)",
                rec.vm
            )));
        }
        // QEMU samples the dirty rate on a thread of its own while this goes on. Whether
        // both ends arm post-copy (a capability fixed before the stream starts, whose
        // return path lengthens the guest's pause) depends on it, so a memory-only
        // migration reads it before preparing the destination. A disk copy migrates its
        // memory by pre-copy once its mirrors are in sync, seconds later: it reads the
        // figure then, off the copy's critical path.
        let sample = DirtySample::start(&self.qmp, DIRTY_RATE_WINDOW_MS).await;
        let features =
            self.qmp.cpu_features(spec.cpu_model()).await.map_err(|e| fail(format!("cannot read the CPU features of {}: {e}", rec.vm)))?;
        let listen_host =
            reqwest::Url::parse(&rec.destination).ok().and_then(|u| u.host_str().map(String::from)).unwrap_or_else(|| "127.0.0.1".into());
        let (dirty, late_sample) = match (sample, may_copy) {
            (Some(s), false) => (s.read(&self.qmp).await, None),
            (s, _) => (None, s),
        };
        let policy = self.policy(dirty, may_copy);
        let stream = walkabout_migrate::Stream::of(policy.strategy());
        let offer = match spec.disks.is_empty() {
            true => None,
            false => Some(
                storage::offer(&self.qmp, spec, asked).await.map_err(|e| fail(format!("cannot migrate the disks of {}: {e}", rec.vm)))?,
            ),
        };
        let incoming = IncomingRequest {
            spec: spec.clone(),
            postcopy_ready: stream.postcopy_ready,
            cpu_features: features.into_iter().collect(),
            listen_host: listen_host.clone(),
            postcopy_preempt: stream.postcopy_preempt,
            multifd_channels: stream.multifd_channels,
            compression: stream.compression,
            storage: asked,
            disks: offer.as_ref().map(|o| o.disks.clone()).unwrap_or_default(),
            marker: offer.as_ref().and_then(|o| o.marker.clone()),
            // A source slow to answer is slow to probe: the lease lasts twice its patience.
            lease_ms: rec.tuning.peer_timeout_ms.map(|p| p.saturating_mul(2)),
            relay: rec.tuning.relay,
        };
        // 30 s, or more for a migration that said its destination is slow (a nested agent).
        let patience = rec.tuning.peer_timeout_ms.map_or(Duration::ZERO, Duration::from_millis);
        let prepared = self.peer.prepare_incoming(&incoming, (patience * 6).max(PREPARE_TIMEOUT)).await;
        if let Some(o) = &offer {
            o.remove_markers();
        }
        let reply = prepared.map_err(|e| fail(format!("cannot migrate {} to {}: {e}", rec.vm, rec.destination)))?;
        self.agent.update(|r| r.storage = reply.storage);
        // Relayed: QEMU sends to loopback listeners of this agent, which carry each
        // connection through the destination agent's port; the destination's
        // certificate names the address that port was reached at.
        if rec.tuning.relay != reply.relay {
            return Err(fail(format!(
                "cannot migrate {} to {}: asked to relay the streams: {}, and the destination answered: {}",
                rec.vm, rec.destination, rec.tuning.relay, reply.relay
            )));
        }
        let relays = match reply.relay {
            true => Some(
                super::relay::Relays::open(&self.dialer, &rec.destination, &rec.vm, &reply)
                    .await
                    .map_err(|e| fail(format!("cannot relay the streams of {}: {e}", rec.vm)))?,
            ),
            false => None,
        };
        let tls_host = match &relays {
            Some(_) => super::relay::url_host(&rec.destination).unwrap_or_default(),
            None => super::tls::uri_host(&reply.uri).unwrap_or(&reply.uri).to_string(),
        };
        let reply = relays.as_ref().map_or(reply.clone(), |r| r.reply.clone());
        self.secure_streams(&reply, &tls_host).await.map_err(|e| fail(e.to_string()))?;
        if *cancel.borrow_and_update() {
            return Err(Ended { phase: Phase::Cancelled, reason: CANCELLED_BY_REQUEST.into(), past_switchover: false });
        }
        let strategy = policy.strategy().clone();
        self.agent.update(|r| {
            r.phase = Phase::Running;
            r.dirty_rate_bps = dirty;
            r.strategy = Some(strategy);
            r.timings.prepare_ms = Some(crate::vms::now_ms().saturating_sub(r.created_at_ms));
        });
        // Subscribed before the mirrors start, so none of their events is missed.
        let job_events = self.qmp.events();
        let mirrors = match &reply.nbd {
            Some(nbd) => Some(
                storage::Mirrors::start(
                    &self.qmp,
                    nbd,
                    self.tls.on().then(|| if relays.is_some() { tls_host.as_str() } else { nbd.host.as_str() }),
                )
                .await
                .map_err(|e| fail(format!("cannot copy the disks of {}: {e}", rec.vm)))?,
            ),
            None => None,
        };
        let alive = Liveness::now(mirrors.as_ref().map(|m| storage::MirrorHealth::new(m.ids(), job_events)));
        let chosen = Chosen { policy, late_sample };
        let result = self.move_data(&reply.uri, &listen_host, chosen, mirrors.as_ref(), &alive, cancel).await;
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                // A mirror that broke is the cause, whatever the memory stream saw (read
                // before the abandon, whose cancel ends the jobs as well).
                let broken = alive.mirror_failure();
                if let Some(m) = &mirrors {
                    m.abandon(&self.qmp).await;
                }
                return Err(match broken {
                    Some(b) if e.phase == Phase::Failed => fail(format!("migration of {} failed: {b}", rec.vm)),
                    _ => e,
                });
            }
        };
        let copied = mirrors.is_some();
        self.agent.update(|r| {
            // A copy's wall time includes the disk copy before memory moved.
            let whole = crate::vms::now_ms().saturating_sub(r.created_at_ms);
            r.total_ms = Some(if copied { whole } else { outcome.total_ms });
            r.timings.memory_ms = Some(outcome.total_ms);
            r.downtime_ms = (outcome.phase == Phase::Completed).then_some(outcome.downtime_ms);
            r.switches = outcome.switches.clone();
            r.postcopy_pauses = outcome.postcopy_pauses.clone();
        });
        if outcome.phase != Phase::Completed {
            // Read before the abandon: its own cancel ends the jobs too, and the policy's
            // give-up (a cancel) tears down the destination's exports; neither is the cause.
            let gave_up = outcome.switches.last().is_some_and(|sw| sw.to == "cancel");
            let broken = alive.mirror_failure().filter(|_| !gave_up);
            if let Some(m) = &mirrors {
                m.abandon(&self.qmp).await;
            }
            let mut reason = match (outcome.phase, broken) {
                (Phase::Failed, Some(b)) => format!("migration of {} failed: {b}", rec.vm),
                _ => outcome.reason.unwrap_or_else(|| format!("{:?}", outcome.phase)),
            };
            if outcome.past_switchover {
                // Name the hosts: the pieces of the VM are on both.
                reason = format!("{}: destination {}, source {} (this agent): {reason}", rec.vm, rec.destination, crate::host::hostname());
            }
            return Err(Ended { phase: outcome.phase, reason, past_switchover: outcome.past_switchover });
        }
        if let Some(m) = &mirrors {
            if let Ok((d, _)) = m.poll(&self.qmp).await {
                self.agent.update(|r| r.disk = d);
            }
            // The jobs are in sync (the gate saw no failure) and the guest is stopped here.
            m.finish(&self.qmp).await;
        }
        // The guest now runs on the destination; make it the VM's owner, then let go.
        // The source's console is complete (its guest is stopped): hand its status over.
        self.agent.update(|r| r.phase = Phase::Switchover);
        let guest = self.agent.guest_status().await;
        match self.confirm(guest).await {
            Ok(()) => {
                self.agent.forget_vm().await;
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

    /// The policy for this migration given the dirty rate measured (if any): a VM
    /// whose disks may be copied never arms post-copy (see [`Driver::migrate`]).
    fn policy(&self, dirty: Option<u64>, may_copy: bool) -> Policy {
        let rec = &self.record;
        let guest_bytes = self.spec.memory_mib << 20;
        let host = host_facts();
        let policy = Policy::new(rec.mode, rec.limits, guest_bytes, dirty).tuned(&rec.tuning, &host);
        match may_copy && policy.strategy().postcopy_ready {
            true => Policy::new(walkabout_api::Mode::Precopy, rec.limits, guest_bytes, dirty).tuned(&rec.tuning, &host),
            false => policy,
        }
    }

    /// Asks the destination to confirm that the VM runs there; while it cannot be
    /// reached, again every [`COMMIT_RETRY_INTERVAL`] for [`COMMIT_RETRY_WINDOW`]. An
    /// answer (a refusal included) ends it: only a restarting destination is waited for.
    async fn confirm(&self, guest: Option<GuestStatus>) -> Result<(), ClientError> {
        let deadline = Instant::now() + COMMIT_RETRY_WINDOW;
        let mut attempt = 1u32;
        loop {
            match self.peer.commit_incoming(&self.record.vm, guest.clone()).await {
                Err(e) if e.status().is_none() && Instant::now() < deadline => {
                    tracing::warn!(vm = %self.record.vm, attempt, error = %e, "the destination did not confirm the switchover; asking again");
                }
                r => return r,
            }
            attempt += 1;
            tokio::time::sleep(COMMIT_RETRY_INTERVAL).await;
        }
    }

    /// Arms this QEMU's side of the streams the destination's `reply` expects: TLS
    /// credentials checking the destination's certificate against `host` (the address
    /// its reply named, or its agent's for a relayed migration) and recorded, or plain
    /// in a cluster without a CA (said in the log). A destination that disagrees is
    /// refused before anything moves.
    async fn secure_streams(&self, reply: &IncomingReply, host: &str) -> Result<(), super::tls::TlsError> {
        let rec = &self.record;
        super::tls::agree(&rec.vm, &rec.destination, &self.tls, reply.tls)?;
        let super::tls::StreamTls::Tls(dir) = &self.tls else {
            tracing::warn!(vm = %rec.vm, "QEMU's streams are plain: this agent runs without a CA (--insecure-loopback)");
            return Ok(());
        };
        super::tls::arm_outgoing(&self.qmp, dir, host).await?;
        tracing::info!(vm = %rec.vm, destination = %host, "QEMU's streams over TLS under the cluster CA");
        self.agent.update(|r| r.tls = true);
        Ok(())
    }

    /// Copies the disks (when `mirrors`) until they are in sync, then memory, probing
    /// the destination all along (the probes are also its lease).
    async fn move_data(
        &self,
        uri: &str,
        listen_host: &str,
        chosen: Chosen,
        mirrors: Option<&storage::Mirrors>,
        alive: &Liveness,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<Outcome, Ended> {
        let rec = &self.record;
        let report = |p: &Progress, sw: Option<&Switch>| {
            self.agent.update(|r| {
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
        let patience = rec.tuning.peer_timeout_ms.map_or(walkabout_migrate::run::PEER_TIMEOUT, Duration::from_millis);
        let link = Link { alive, peer: &self.peer, vm: &rec.vm, listen_host, patience, relayed_uri: rec.tuning.relay.then_some(uri) };
        // A probe may take two thirds of the patience (1 s by default).
        let probe_timeout = (patience * 2 / 3).max(Duration::from_secs(1));
        let probing = async {
            loop {
                match self.peer.probe(&rec.vm, probe_timeout).await {
                    Ok(()) => alive.answered(),
                    // The destination's agent answers that the VM is not (or no longer)
                    // incoming there: it holds nothing of it.
                    Err(e) if e.status() == Some(404) => alive.gone(e.to_string()),
                    Err(_) => {}
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        };
        // The mirrors' counters, on a loop of their own: a source QEMU busy with a
        // write-blocking mirror may take seconds to answer, and that must not delay the
        // probes (its silence would read as the destination's).
        let counting = async {
            loop {
                if let Some(m) = mirrors {
                    if let Ok((d, _)) = m.poll(&self.qmp).await {
                        self.agent.update(|r| r.disk = d);
                    }
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        };
        let work = async {
            if let Some(m) = mirrors {
                let copying = Instant::now();
                self.mirror_until_ready(m, alive, &mut cancel).await?;
                let disk_ms = u64::try_from(copying.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.agent.update(|r| r.timings.disk_ms = Some(disk_ms));
            }
            let Chosen { policy, late_sample } = chosen;
            let policy = match late_sample {
                // The sample a disk copy took while its mirrors ran: the policy sees it
                // now, within the stream the destination was prepared for.
                Some(sample) => {
                    let dirty = sample.read(&self.qmp).await;
                    let settled = self.policy(dirty, true).within(&walkabout_migrate::Stream::of(policy.strategy()));
                    let strategy = settled.strategy().clone();
                    self.agent.update(|r| {
                        r.dirty_rate_bps = dirty;
                        r.strategy = Some(strategy);
                    });
                    settled
                }
                None => policy,
            };
            walkabout_migrate::run::run(&self.qmp, uri, policy, &link, cancel, report).await.map_err(|e| Ended {
                phase: Phase::Failed,
                reason: format!("migration of {} failed: {e}", rec.vm),
                past_switchover: false,
            })
        };
        tokio::select! {
            outcome = work => outcome,
            () = probing => unreachable!("probing never ends"),
            () = counting => unreachable!("counting never ends"),
        }
    }

    /// Waits for every disk mirror to be READY (in sync, and kept in sync by its
    /// write-blocking mode); memory moves only then. Cancel, a silent destination or a
    /// failing mirror end the wait.
    async fn mirror_until_ready(&self, m: &storage::Mirrors, alive: &Liveness, cancel: &mut watch::Receiver<bool>) -> Result<(), Ended> {
        let rec = &self.record;
        let fail = |reason: String| Ended { phase: Phase::Failed, reason, past_switchover: false };
        let mut events = self.qmp.events();
        loop {
            if *cancel.borrow_and_update() {
                return Err(Ended { phase: Phase::Cancelled, reason: CANCELLED_BY_REQUEST.into(), past_switchover: false });
            }
            let silent = alive.since();
            let patience = rec.tuning.peer_timeout_ms.map_or(walkabout_migrate::run::PEER_TIMEOUT, Duration::from_millis);
            if silent > patience * MIRROR_PATIENCE_FACTOR {
                return Err(fail(format!(
                    "cannot copy the disks of {}: the destination stopped answering ({} ms)",
                    rec.vm,
                    silent.as_millis().min(u128::from(u64::MAX))
                )));
            }
            let (d, ready) = m.poll(&self.qmp).await.map_err(|e| fail(format!("cannot copy the disks of {}: {e}", rec.vm)))?;
            self.agent.update(|r| r.disk = d);
            if ready {
                tracing::info!(vm = %rec.vm, bytes = d.transferred_bytes, "disks in sync; memory follows");
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(MIRROR_POLL) => {}
                // QEMU said a job is in sync: look at once, not at the next poll.
                () = job_ready(&mut events) => {}
                r = cancel.changed() => if r.is_err() { tokio::time::sleep(MIRROR_POLL).await },
            }
        }
    }

    /// After a migration that did not complete: tear the destination down and make sure
    /// the VM runs (or stays paused, as it was) on this host — unless the switchover
    /// had passed, when the source copy stays paused so that two never run.
    async fn settle_on_source(&self, phase: Phase, past_switchover: bool, reason: &str) {
        let vm = &self.record.vm;
        if !past_switchover {
            if let Err(e) = self.peer.abort_incoming(vm).await {
                tracing::warn!(%vm, error = %e, "could not tear the destination down (it tears itself down when the stream ends)");
            }
        }
        let status = self.qmp.query_status().await;
        let resume = self.was_running && !past_switchover && matches!(&status, Ok(s) if !s.running);
        if resume {
            if let Err(e) = self.qmp.cont().await {
                tracing::error!(%vm, error = %e, "cannot resume the VM on its source");
            }
        }
        let running = self.qmp.query_status().await.map(|s| s.running).unwrap_or(false);
        self.agent.keep_vm(running, format!("migration {}: {reason}", format!("{phase:?}").to_lowercase())).await;
    }

    /// After this agent restarted in the middle of the migration: ends it and settles
    /// the VM here — resumed, unless QEMU says the switchover had passed. Returns the
    /// reason to record.
    pub(crate) async fn recover(&self) -> String {
        let status = self.qmp.execute("query-migrate", None).await.map(|v| v["status"].as_str().unwrap_or("none").to_string());
        let past =
            matches!(status.as_deref(), Ok("completed" | "device")) || status.as_deref().is_ok_and(walkabout_migrate::run::is_postcopy);
        if self.record.storage == Some(walkabout_api::StorageMode::Copy) {
            storage::settle_leftover_mirrors(&self.qmp, self.spec.disks.len(), past).await;
        }
        let reason = if past {
            "switchover done but the source agent restarted before the destination confirmed; the source copy is kept paused for recovery"
        } else {
            if let Err(e) = self.qmp.execute("migrate_cancel", None).await {
                tracing::debug!(vm = %self.record.vm, error = %e, "migrate_cancel after restart");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            "the source agent restarted mid-migration"
        };
        self.settle_on_source(Phase::Failed, past, reason).await;
        reason.to_string()
    }
}

#[cfg(test)]
mod tests;
