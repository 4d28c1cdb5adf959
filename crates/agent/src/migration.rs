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
//! before it completes loses the VM. Losing the link between them does not: both ends
//! pause post-copy and keep their halves, and the source re-establishes the stream
//! (`/v1/incoming/{vm}/recover`) when the destination answers again, within a budget.

mod driver;
#[cfg(test)]
mod fake;
pub(crate) mod relay;
pub(crate) mod storage;
mod tls;

use crate::error::AgentError;
use crate::spec::VmState;
use crate::vms::{lock, now_ms, Agent};
use driver::{AgentSide, Driver, PeerAgent};
use std::time::Duration;
use tls::StreamTls;
use tokio::sync::watch;
use walkabout_api::{AgentClient, ClientError, ClientOptions, GuestStatus};
use walkabout_migrate::Phase;
use walkabout_qemu::{cpu, Qmp};

pub use walkabout_api::migration::{IncomingReply, IncomingRequest, MigrationRecord, MigrationRequest, RecoverRequest, MIGRATION_VERSION};

/// A migration the agent is driving, with its cancel switch.
pub(crate) struct Migration {
    pub(crate) record: MigrationRecord,
    cancel: watch::Sender<bool>,
}

/// An incoming VM whose source has not probed for this long is torn down (or adopted,
/// if its guest already runs here): the source's probes are the destination's lease.
pub const INCOMING_LEASE: Duration = Duration::from_secs(4);

/// The destination agent through its typed client.
impl PeerAgent for AgentClient {
    async fn prepare_incoming(&self, req: &IncomingRequest, timeout: Duration) -> Result<IncomingReply, ClientError> {
        AgentClient::prepare_incoming(&self.with_timeout(timeout), req).await
    }

    async fn probe(&self, vm: &str, timeout: Duration) -> Result<(), ClientError> {
        self.with_timeout(timeout).incoming(vm).await.map(drop)
    }

    async fn commit_incoming(&self, vm: &str, guest: Option<GuestStatus>) -> Result<(), ClientError> {
        // The destination waits (up to a minute) for the guest to start there.
        self.with_timeout(Duration::from_secs(90)).commit_incoming(vm, guest).await.map(drop)
    }

    async fn recover_incoming(&self, vm: &str, req: &RecoverRequest) -> Result<IncomingReply, ClientError> {
        self.with_timeout(Duration::from_secs(10)).recover_incoming(vm, req).await
    }

    async fn abort_incoming(&self, vm: &str) -> Result<(), ClientError> {
        AgentClient::abort_incoming(self, vm).await
    }
}

/// A peer whose client could not be made: every call fails with that error.
impl<P: PeerAgent> PeerAgent for Result<P, ClientError> {
    async fn prepare_incoming(&self, req: &IncomingRequest, timeout: Duration) -> Result<IncomingReply, ClientError> {
        self.as_ref().map_err(Clone::clone)?.prepare_incoming(req, timeout).await
    }

    async fn probe(&self, vm: &str, timeout: Duration) -> Result<(), ClientError> {
        self.as_ref().map_err(Clone::clone)?.probe(vm, timeout).await
    }

    async fn commit_incoming(&self, vm: &str, guest: Option<GuestStatus>) -> Result<(), ClientError> {
        self.as_ref().map_err(Clone::clone)?.commit_incoming(vm, guest).await
    }

    async fn recover_incoming(&self, vm: &str, req: &RecoverRequest) -> Result<IncomingReply, ClientError> {
        self.as_ref().map_err(Clone::clone)?.recover_incoming(vm, req).await
    }

    async fn abort_incoming(&self, vm: &str) -> Result<(), ClientError> {
        self.as_ref().map_err(Clone::clone)?.abort_incoming(vm).await
    }
}

/// This agent, as the driver of one migration of one of its VMs sees it.
struct Books {
    agent: Agent,
    id: String,
    vm: String,
}

impl AgentSide for Books {
    fn update(&self, f: impl FnOnce(&mut MigrationRecord)) {
        self.agent.update(&self.id, f);
    }

    async fn guest_status(&self) -> Option<GuestStatus> {
        self.agent.get(&self.vm).await.ok().map(|info| info.guest)
    }

    async fn forget_vm(&self) {
        let copied = self.agent.migration(&self.id).map(|r| r.storage == Some(walkabout_api::StorageMode::Copy)).unwrap_or(false);
        let disks = match self.agent.vm(&self.vm) {
            Ok(vm) => vm.lock().await.record.spec.disks.clone(),
            Err(_) => vec![],
        };
        self.agent.forget_migrated(&self.vm).await;
        if copied {
            // An image this agent made for the VM (by an earlier copy, or at creation) is
            // stale now that the VM left with a copy of it.
            let dir = self.agent.copy_dir();
            let made = |i: usize, p: &std::path::Path| storage::is_copy_image(&dir, p) || p == crate::disks::owned_path(&dir, &self.vm, i);
            let stale = disks.iter().enumerate().filter_map(|(i, d)| d.path.as_deref().filter(|p| made(i, p)));
            for p in stale {
                if let Err(e) = std::fs::remove_file(p) {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove the image the VM left behind");
                }
            }
        }
    }

    async fn keep_vm(&self, running: bool, reason: String) {
        let Ok(vm) = self.agent.vm(&self.vm) else { return };
        let mut vm = vm.lock().await;
        if vm.record.state != VmState::Migrating {
            // Stopped or deleted meanwhile (its QEMU gone): nothing left to settle.
            return;
        }
        vm.record.state = if running { VmState::Running } else { VmState::Paused };
        vm.record.reason = Some(reason);
        if let Err(e) = self.agent.inner.store.put(&vm.record) {
            tracing::error!(vm = %self.vm, error = %e, "cannot record VM state");
        }
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
        let peer = self.peer(&req.destination).map_err(|e| AgentError::InvalidRequest { reason: format!("destination: {e}") })?;
        let vm = self.vm(&req.vm)?;
        let mut vm = vm.lock().await;
        if let Some(m) = lock(&self.inner.migrations).values().find(|m| m.record.vm == req.vm && !m.record.phase.is_final()) {
            return Err(AgentError::MigrationInProgress { vm: req.vm.clone(), id: m.record.id.clone() });
        }
        if !matches!(vm.record.state, VmState::Running | VmState::Paused) {
            return Err(AgentError::InvalidState { vm: req.vm.clone(), op: "migrate", state: vm.record.state });
        }
        let qmp = vm.qmp.clone().ok_or_else(|| AgentError::InvalidState { vm: req.vm.clone(), op: "migrate", state: vm.record.state })?;
        let tls = self.stream_tls()?;
        let dialer = self.dialer()?;
        let record = MigrationRecord::pending(new_id(), &req, now_ms());
        let was_running = vm.record.state == VmState::Running;
        vm.record.state = VmState::Migrating;
        self.inner.store.put(&vm.record)?;
        self.inner.store.put_migration(&record)?;
        let (tx, rx) = watch::channel(false);
        lock(&self.inner.migrations).insert(record.id.clone(), Migration { record: record.clone(), cancel: tx });
        let spec = vm.record.spec.clone();
        drop(vm);
        let agent = Books { agent: self.clone(), id: record.id.clone(), vm: record.vm.clone() };
        let driver = Driver { qmp, peer, agent, record: record.clone(), spec, was_running, tls, dialer };
        tokio::spawn(async move { driver.drive(rx).await });
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
        driver::request_cancel(&m.record, &m.cancel)
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

    /// How this host's QEMUs secure their migration streams: TLS with this host's
    /// identity under the cluster CA (its credentials written for QEMU in
    /// `DATA/qemu-tls`, 0700), or plain in a cluster without a CA.
    fn stream_tls(&self) -> Result<StreamTls, AgentError> {
        let Some(bundle) = &self.inner.config.identity else { return Ok(StreamTls::Plain) };
        let dir = self.inner.config.data_dir.join("qemu-tls");
        walkabout_trust::qemu::write_qemu_creds(bundle, &dir)
            .map_err(|e| AgentError::InvalidRequest { reason: format!("cannot write QEMU's TLS credentials: {e}") })?;
        Ok(StreamTls::Tls(dir))
    }

    /// How this agent opens tunnels to a destination's agent (a relayed migration): with
    /// its host identity's client TLS, or plain in a cluster without a CA.
    fn dialer(&self) -> Result<relay::Dialer, AgentError> {
        let Some(bundle) = &self.inner.config.identity else { return Ok(relay::Dialer::default()) };
        let tls = walkabout_trust::tls::client_config(bundle)
            .map_err(|e| AgentError::InvalidRequest { reason: format!("cannot relay: this host's client TLS: {e}") })?;
        Ok(relay::Dialer::new(Some(tls)))
    }

    /// The typed client of a peer agent.
    fn peer(&self, url: &str) -> Result<AgentClient, ClientError> {
        AgentClient::new(url, ClientOptions { connect_timeout: Duration::from_secs(2), request_timeout: Duration::from_secs(30) })
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

    /// At start: migrations a previous run of this agent left unfinished are ended, and
    /// their VMs settled on this host (resumed, unless the switchover had passed).
    pub(crate) async fn recover_migrations(&self) {
        // Images of copies into this host that never completed (this agent was killed
        // mid-copy): no VM uses them.
        let in_use = self.list().await.iter().flat_map(|v| v.record.spec.disks.iter().filter_map(|d| d.path.clone())).collect();
        storage::sweep(&self.copy_dir(), &in_use);
        let records = match self.inner.store.list_migrations() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read stored migrations");
                return;
            }
        };
        for mut rec in records {
            if !rec.phase.is_final() {
                let peer = self.peer(&rec.destination);
                let vm = match self.vm(&rec.vm) {
                    Ok(vm) => {
                        let vm = vm.lock().await;
                        vm.qmp.clone().map(|q| (q, vm.record.spec.clone()))
                    }
                    Err(_) => None,
                };
                let reason = match vm {
                    Some((qmp, spec)) => {
                        let agent = Books { agent: self.clone(), id: rec.id.clone(), vm: rec.vm.clone() };
                        // Settling after a restart moves nothing: no stream to secure.
                        Driver {
                            qmp,
                            peer,
                            agent,
                            record: rec.clone(),
                            spec,
                            was_running: true,
                            tls: StreamTls::Plain,
                            dialer: relay::Dialer::default(),
                        }
                        .recover()
                        .await
                    }
                    None => {
                        // No QEMU here to settle; the destination also lets go when its lease ends.
                        if let Err(e) = peer.abort_incoming(&rec.vm).await {
                            tracing::warn!(vm = %rec.vm, error = %e, "could not tear the destination down");
                        }
                        "the source agent restarted mid-migration".to_string()
                    }
                };
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
    /// stream, and says where to send it. Nothing of the VM runs here yet. Under the
    /// cluster CA the stream and the disk copy are TLS, and only `source` (the
    /// authenticated peer of the request) is admitted to them.
    pub async fn prepare_incoming(
        &self,
        req: IncomingRequest,
        source: Option<&walkabout_trust::Identity>,
    ) -> Result<IncomingReply, AgentError> {
        let name = req.spec.name.clone();
        let stream_tls = self.stream_tls()?;
        let admit = match (&stream_tls, source) {
            (StreamTls::Plain, _) => None,
            (StreamTls::Tls(dir), Some(peer)) => Some((dir.clone(), walkabout_trust::qemu::qemu_dn(&peer.name))),
            (StreamTls::Tls(_), None) => return Err(AgentError::InvalidRequest { reason: tls::TlsError::NoPeer.to_string() }),
        };
        let lease = req.lease_ms.map_or(INCOMING_LEASE, Duration::from_millis).max(INCOMING_LEASE);
        // Relayed: QEMU listens on loopback, reached only through the tunnel route, by
        // the host that asks now.
        let listen = if req.relay { "127.0.0.1".to_string() } else { self.incoming_host() };
        let relay_peer = match (req.relay, source) {
            (false, _) => None,
            (true, Some(id)) => Some(id.name.clone()),
            (true, None) => {
                return Err(AgentError::InvalidRequest {
                    reason: format!("refused to relay the migration of {name}: the request carries no identity to admit to its tunnel"),
                })
            }
        };
        // Shared or copy first: a copy's spec names the images made here.
        let img = walkabout_qemu::QemuImg::beside(&self.inner.config.qemu_binary);
        let plan = storage::plan(&req, &self.copy_dir(), &self.catalog_bases(), &img)
            .await
            .map_err(|e| AgentError::InvalidRequest { reason: e.to_string() })?;
        let reserved = self.validate(&plan.spec).and_then(|()| self.reserve(plan.spec.clone(), VmState::Incoming));
        let vm = match reserved {
            Ok(vm) => vm,
            Err(e) => {
                plan.remove_created();
                return Err(e);
            }
        };
        let mut guard = vm.lock().await;
        plan.remember(&guard.record.run_dir);
        let copy = plan.mode == Some(walkabout_api::StorageMode::Copy);
        let result = async {
            self.boot(&mut guard, true).await?;
            let qmp =
                guard.qmp.clone().ok_or_else(|| AgentError::InvalidState { vm: name.clone(), op: "receive", state: guard.record.state })?;
            self.check_cpu(&name, &qmp, &req.cpu_features).await?;
            match &admit {
                Some((dir, dn)) => {
                    tls::arm_incoming(&qmp, dir, dn)
                        .await
                        .map_err(|e| AgentError::InvalidRequest { reason: format!("cannot receive {name}: {e}") })?;
                    tracing::info!(vm = %name, source = %dn, "QEMU's streams over TLS, admitting the requesting host alone");
                }
                None => tracing::warn!(vm = %name, "QEMU's streams are plain: this agent runs without a CA (--insecure-loopback)"),
            }
            let nbd = match copy {
                true => Some(
                    storage::export(&qmp, &listen, &plan, admit.is_some())
                        .await
                        .map_err(|e| AgentError::InvalidRequest { reason: format!("cannot receive the disks of {name}: {e}") })?,
                ),
                false => None,
            };
            let stream = walkabout_migrate::Stream {
                postcopy_ready: req.postcopy_ready,
                postcopy_preempt: req.postcopy_preempt,
                multifd_channels: req.multifd_channels,
                compression: req.compression,
            };
            let uri = walkabout_migrate::run::listen_incoming(&qmp, &stream, &listen)
                .await
                .map_err(|e| AgentError::InvalidRequest { reason: format!("cannot receive {name}: {e}") })?;
            if !req.spec.nics.is_empty() {
                // QEMU announces the guest the moment it starts here, with these.
                crate::nics::arm_announce(&qmp, &self.inner.config.announce)
                    .await
                    .map_err(|e| AgentError::Qemu { vm: name.clone(), source: e.into() })?;
            }
            // Arm: `cont` on an incoming QEMU means "run the guest once it is fully
            // loaded", which cannot happen before the source passes its switchover gate.
            // Arming now keeps that hand-over out of the guest's downtime. A copy is not
            // armed: its NBD server stops before the guest runs (at commit).
            if !copy {
                qmp.cont().await.map_err(|e| AgentError::Qemu { vm: name.clone(), source: e.into() })?;
            }
            self.inner.store.put(&guard.record)?;
            if let Some(peer) = &relay_peer {
                let memory = relay::uri_addr(&uri)
                    .ok_or_else(|| AgentError::InvalidRequest { reason: format!("cannot relay {name}: QEMU listens at {uri}") })?;
                let nbd = nbd.as_ref().and_then(|n| n.host.parse().ok().map(|ip| std::net::SocketAddr::new(ip, n.port)));
                self.inner.tunnels.open(&name, relay::Tunnel { peer: peer.clone(), memory, nbd });
                tracing::info!(vm = %name, source = %peer, "streams relayed through this agent's port");
            }
            Ok(IncomingReply { uri, storage: plan.mode, nbd, tls: admit.is_some(), relay: relay_peer.is_some() })
        }
        .await;
        if result.is_ok() {
            lock(&self.inner.leases).insert(name.clone(), std::time::Instant::now());
            let events = guard.qmp.as_ref().map(Qmp::events);
            self.spawn_lease_watch(name.clone(), guard.record.pid, events, lease);
        }
        if result.is_err() {
            if let Some(p) = guard.process.take() {
                p.kill(Duration::from_secs(2)).await;
            }
            guard.record.state = crate::spec::VmState::Stopped;
            let run_dir = guard.record.run_dir.clone();
            drop(guard);
            plan.remove_created();
            self.unreserve(&name, &run_dir);
        }
        result
    }

    /// Where this agent makes the images of disks copied in by migration: its storage
    /// directory (`--storage-dir`).
    pub(crate) fn copy_dir(&self) -> std::path::PathBuf {
        self.storage_dir()
    }

    /// Base images this agent's catalog holds besides its storage directory: the guest
    /// root disk that `image:guest` overlays sit on.
    fn catalog_bases(&self) -> Vec<std::path::PathBuf> {
        let cache = self.inner.config.image_cache.clone().unwrap_or_else(walkabout_image::default_cache_dir);
        walkabout_image::cached(&cache).ok().flatten().map(|i| i.rootfs).into_iter().collect()
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
            // A copied VM runs once its stream is complete and its NBD server stopped.
            if let Err(e) = storage::release_and_run(&qmp).await {
                tracing::warn!(vm = %name, error = %e, "cannot start the copied VM");
            }
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
        if !vm.record.spec.nics.is_empty() {
            // Once more now that the source is gone: the segment learns the new port even
            // if the announcements at the start were lost.
            if let Err(e) = crate::nics::announce(&qmp, &self.inner.config.announce).await {
                tracing::warn!(vm = %name, error = %e, "cannot announce the guest's NICs");
            }
        }
        self.inner.tunnels.close(name);
        vm.record.state = VmState::Running;
        vm.record.reason = Some("migrated in".into());
        vm.record.guest_before = guest_before;
        storage::keep_created(&vm.record.run_dir);
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
        self.inner.tunnels.close(name);
        if let Some(p) = vm.process.take() {
            p.kill(Duration::from_secs(2)).await;
        }
        let run_dir = vm.record.run_dir.clone();
        drop(vm);
        storage::remove_created(&run_dir);
        self.unreserve(name, &run_dir);
        tracing::info!(vm = %name, "incoming migration aborted");
        Ok(())
    }

    /// A paused post-copy of an incoming VM listens again for its stream (paused first
    /// if its QEMU has not noticed the old one is gone); returns where the source
    /// resumes sending. Renews the lease.
    pub async fn recover_incoming(&self, name: &str, req: RecoverRequest) -> Result<IncomingReply, AgentError> {
        let vm = self.incoming_vm(name)?;
        let vm = vm.lock().await;
        if vm.record.state != VmState::Incoming {
            return Err(AgentError::InvalidState { vm: name.into(), op: "recover the post-copy of", state: vm.record.state });
        }
        let qmp = vm.qmp.clone().ok_or_else(|| AgentError::InvalidState { vm: name.into(), op: "recover", state: vm.record.state })?;
        lock(&self.inner.leases).insert(name.to_string(), std::time::Instant::now());
        // A relayed migration listens on loopback again, its tunnel pointed at the new port.
        let relayed = self.inner.tunnels.is_open(name);
        let listen = if relayed { "127.0.0.1" } else { req.listen_host.as_str() };
        let uri = walkabout_migrate::run::recover_incoming(&qmp, listen)
            .await
            .map_err(|e| AgentError::InvalidRequest { reason: format!("cannot recover the post-copy of {name}: {e}") })?;
        if relayed {
            let addr = relay::uri_addr(&uri)
                .ok_or_else(|| AgentError::InvalidRequest { reason: format!("cannot relay {name}: QEMU listens at {uri}") })?;
            self.inner.tunnels.retarget_memory(name, addr);
        }
        tracing::info!(vm = %name, %uri, relayed, "post-copy listening again");
        // Post-copy never runs with a disk copy (the driver refuses it), so no NBD here.
        // The new stream is under the parameters set at prepare (TLS, the same source).
        Ok(IncomingReply { uri, storage: None, nbd: None, tls: self.inner.config.identity.is_some(), relay: relayed })
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
    /// The incoming migration's status is followed by QEMU's events (`query-migrate`
    /// would wait on a main loop that a post-copy page fault may hold).
    fn spawn_lease_watch(
        &self,
        name: String,
        pid: Option<i32>,
        mut events: Option<tokio::sync::broadcast::Receiver<walkabout_qemu::Event>>,
        lease: Duration,
    ) {
        let agent = self.clone();
        tokio::spawn(async move {
            let mut status = String::from("setup");
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                while let Some(Ok(ev)) = events.as_mut().map(|e| e.try_recv()) {
                    if let Some(s) = walkabout_migrate::run::migration_event_status(&ev) {
                        status = s.to_string();
                    }
                }
                let Ok(vm) = agent.vm(&name) else { break };
                let mut vm = vm.lock().await;
                if vm.record.pid != pid || vm.record.state != VmState::Incoming {
                    break;
                }
                let renewed = lock(&agent.inner.leases).get(&name).copied();
                if renewed.is_some_and(|t| t.elapsed() < lease) {
                    continue;
                }
                // Post-copy not finished: the guest runs here but needs pages still at the
                // source. Kept, neither torn down nor adopted. Not paused here either: a
                // silent source agent is not a lost stream (QEMU's stream may well flow);
                // the source pauses a stream that stalled, and its recovery request
                // pauses this end before listening again.
                if walkabout_migrate::run::is_postcopy(&status) {
                    let reason = "post-copy under way with its source silent: kept here, waiting for the source to complete or re-establish the stream";
                    if vm.record.reason.as_deref() != Some(reason) {
                        tracing::warn!(vm = %name, status, "source silent during post-copy: the VM is kept here");
                        vm.record.reason = Some(reason.into());
                        let _ = agent.inner.store.put(&vm.record);
                    }
                    continue;
                }
                let runs = match &vm.qmp {
                    // A copied VM whose stream completed is past the switchover too.
                    Some(q) => storage::release_and_run(q).await.unwrap_or(false),
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
                tracing::warn!(vm = %name, lease_ms = lease.as_millis() as u64, "source went silent; tearing the incoming VM down");
                drop(vm);
                let _ = agent.abort_incoming(&name).await;
                break;
            }
            lock(&agent.inner.leases).remove(&name);
            agent.inner.tunnels.close(&name);
        });
    }
}
