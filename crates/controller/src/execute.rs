//! The executor: the controller's migrations, each started within the limits
//! ([`ExecLimits`]: out of one host, into one host, in the whole cluster at once) and
//! driven by its own task that asks the source agent to migrate and polls it to the end.
//! Plans (`plan_runner.rs`) and the operator ask it for migrations; it owns their records.
//!
//! Why the order of operations is what it is:
//! - A migration record is stored (phase `pending`, no agent id) *before* the agent is
//!   asked. A controller that dies in between finds the record on restart and looks for
//!   the agent's migration of that VM to that destination (adopting it) before it would
//!   ask again: nothing runs twice.
//! - The checks before a migration starts (the VM is not already moving, both hosts
//!   are up, the destination is in service and has room once the migrations already
//!   coming in are counted) and its reservation happen with the view held still, so a
//!   host put in maintenance is either seen here or sees this migration: nothing new
//!   ever starts into a draining host.
//! - A VM with an address is probed through its migration (one TCP connection to its
//!   echo, from this process: `walkabout up` runs the controller in the root namespace,
//!   which reaches the guests' segment). The connection opens beside the hand-over, so
//!   an unreachable guest never delays a migration, and its window closes before the
//!   migration's final phase is recorded: whoever reads a final migration reads its
//!   observed downtime too. A guest this process cannot reach is simply not probed.

use crate::cluster::{ClusterView, HostStatus};
use crate::error::ControllerError;
use crate::events::{Events, Subject};
use crate::store::{Store, MIGRATIONS};
use crate::{lock, now_ms};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use walkabout_api::{ClientError, MigrationRecord, MigrationRequest, Mode, Phase, Progress};
use walkabout_probe::{ProbeError, ProbeOptions, Prober};

pub use walkabout_api::cluster::CLUSTER_MIGRATION_VERSION as MIGRATION_VERSION;
pub use walkabout_api::{ClusterMigration as Migration, ExecLimits};

/// How often running migrations and plans are looked at.
pub(crate) const TICK: Duration = Duration::from_millis(300);

/// Whether `from -> to` may start now under `limits`, given the migrations running.
pub fn within_limits<'a>(limits: &ExecLimits, running: impl Iterator<Item = &'a Migration>, from: &str, to: &str) -> bool {
    let (mut out, mut inn, mut all) = (0u32, 0u32, 0u32);
    for m in running.filter(|m| !m.phase.is_final()) {
        all += 1;
        out += u32::from(m.from == from);
        inn += u32::from(m.to == to);
    }
    all < limits.per_cluster && out < limits.per_host_out && inn < limits.per_host_in
}

/// What the executor asks of agents.
#[derive(Debug, Clone, Copy)]
pub struct ExecConfig {
    /// The limits migrations start under.
    pub limits: ExecLimits,
    /// Migration mode asked of agents.
    pub mode: Mode,
    /// Bandwidth cap per migration, bytes/s.
    pub max_bandwidth_bps: Option<u64>,
}

/// The executor's migrations: every one by id, and the ids of those not yet final,
/// which are all that the limits and the checks before a start look at (their cost
/// stays that of the migrations under way, not of the cluster's history).
#[derive(Default)]
struct Table {
    all: BTreeMap<String, Migration>,
    active: BTreeSet<String>,
}

impl Table {
    fn insert(&mut self, m: Migration) {
        if m.phase.is_final() {
            self.active.remove(&m.id);
        } else {
            self.active.insert(m.id.clone());
        }
        self.all.insert(m.id.clone(), m);
    }

    /// The migrations not yet final.
    fn active(&self) -> impl Iterator<Item = &Migration> + '_ {
        self.active.iter().filter_map(|id| self.all.get(id))
    }
}

/// The controller's migrations and the tasks driving them. Shared as `Arc<Executor>`.
pub struct Executor {
    view: Arc<ClusterView>,
    store: Arc<Store>,
    events: Arc<Events>,
    config: ExecConfig,
    /// Migrations by id (all of them; final ones too).
    migrations: Mutex<Table>,
    stop: watch::Receiver<bool>,
}

impl Executor {
    /// Loads the migrations `store` holds and resumes following those a previous run
    /// left unfinished.
    pub fn open(
        view: Arc<ClusterView>,
        store: Arc<Store>,
        events: Arc<Events>,
        config: ExecConfig,
        stop: watch::Receiver<bool>,
    ) -> Result<Arc<Executor>, ControllerError> {
        let mut migrations = Table::default();
        for m in store.list::<Migration>(&MIGRATIONS)? {
            migrations.insert(m);
        }
        let exec = Arc::new(Executor { view, store, events, config, migrations: Mutex::new(migrations), stop });
        let unfinished: Vec<String> = exec.in_flight().into_iter().map(|m| m.id).collect();
        for id in unfinished {
            tracing::info!(id, "resuming a migration the previous controller ordered");
            let e = exec.clone();
            tokio::spawn(async move { e.drive(id).await });
        }
        Ok(exec)
    }

    /// The limits migrations start under.
    pub fn limits(&self) -> ExecLimits {
        self.config.limits
    }

    /// Migrations not yet final, oldest first.
    pub fn in_flight(&self) -> Vec<Migration> {
        let mut v: Vec<_> = lock(&self.migrations).active().cloned().collect();
        v.sort_by_key(|m| (m.started_ms, m.id.clone()));
        v
    }

    /// The migration of `vm` under way, if one is.
    pub fn in_flight_of(&self, vm: &str) -> Option<Migration> {
        lock(&self.migrations).active().find(|m| m.vm == vm).cloned()
    }

    /// Why `host` cannot leave the cluster now: a migration under way involves it.
    pub fn involving(&self, host: &str) -> Option<String> {
        lock(&self.migrations)
            .active()
            .find(|m| m.from == host || m.to == host)
            .map(|m| format!("host {host} takes part in migration {} of {}", m.id, m.vm))
    }

    /// All migrations, oldest first.
    pub fn migrations(&self) -> Vec<Migration> {
        let mut v: Vec<_> = lock(&self.migrations).all.values().cloned().collect();
        v.sort_by_key(|m| (m.started_ms, m.id.clone()));
        v
    }

    /// One migration.
    pub fn migration(&self, id: &str) -> Result<Migration, ControllerError> {
        lock(&self.migrations).all.get(id).cloned().ok_or_else(|| ControllerError::not_found("migration", id))
    }

    fn save_migration(&self, m: &Migration, message: Option<String>) {
        if let Err(e) = self.store.put(&MIGRATIONS, &m.id, m) {
            tracing::error!(id = %m.id, error = %e, "cannot store migration");
        }
        lock(&self.migrations).insert(m.clone());
        if let Some(msg) = message {
            self.events.emit(Subject::Migration, &m.id, msg, serde_json::to_value(m).unwrap_or_default());
        }
    }

    /// Starts migrating `vm` to host `to` if the limits allow (`Ok(None)` when they do
    /// not yet); checks that the VM runs on a host that is up, that `to` is up, and that
    /// `to` has room once the migrations already coming in are counted.
    pub fn try_migrate(self: &Arc<Self>, vm: &str, to: &str, plan: Option<&str>, why: &str) -> Result<Option<Migration>, ControllerError> {
        let limits = self.limits();
        let m = self.view.read(|view| -> Result<Option<Migration>, ControllerError> {
            let mut migs = lock(&self.migrations);
            let v = view.vms.get(vm).ok_or_else(|| ControllerError::not_found("VM", vm))?;
            let from = v.host.clone().ok_or_else(|| ControllerError::Conflict(format!("cannot move {vm}: it runs nowhere")))?;
            if !v.is_active() {
                return Err(ControllerError::Conflict(format!("cannot move {vm}: it is {} on {from}", v.state)));
            }
            if let Some(m) = migs.active().find(|m| m.vm == vm) {
                return Err(ControllerError::Conflict(format!("{vm} is already being migrated ({}: {} -> {})", m.id, m.from, m.to)));
            }
            let src = view.hosts.get(&from).ok_or_else(|| ControllerError::not_found("host", &from))?;
            let dst = view.hosts.get(to).ok_or_else(|| ControllerError::not_found("host", to))?;
            if src.status != HostStatus::Up {
                return Err(ControllerError::Conflict(format!("cannot move {vm}: its host {from} is down")));
            }
            if dst.status != HostStatus::Up {
                return Err(ControllerError::Conflict(format!("cannot move {vm} to {to}: {to} is down")));
            }
            if !dst.maintenance.accepts_vms() {
                let m = format!("{:?}", dst.maintenance).to_lowercase();
                return Err(ControllerError::Conflict(format!("cannot move {vm} to {to}: {to} takes no VMs (it is {m})")));
            }
            if from == to {
                return Err(ControllerError::Conflict(format!("{vm} already runs on {to}")));
            }
            if !within_limits(&limits, migs.active(), &from, to) {
                return Ok(None);
            }
            let incoming: u64 = migs.active().filter(|m| m.to == to).filter_map(|m| view.vms.get(&m.vm).map(|v| v.memory_mib)).sum();
            let free = view.free_mib(to).saturating_sub(incoming);
            if free < v.memory_mib {
                return Err(ControllerError::Conflict(format!(
                    "cannot move {vm} to {to}: it needs {} MiB and {to} has {free} MiB free",
                    v.memory_mib
                )));
            }
            let id = format!("m{}", self.store.next("migration")?);
            let m = Migration {
                version: MIGRATION_VERSION,
                id: id.clone(),
                vm: vm.to_string(),
                from: from.clone(),
                to: to.to_string(),
                plan: plan.map(String::from),
                why: why.to_string(),
                phase: Phase::Pending,
                reason: None,
                agent_id: None,
                progress: Progress::default(),
                strategy: None,
                switches: vec![],
                downtime_ms: None,
                observed_downtime_ms: None,
                probe_error: None,
                total_ms: None,
                started_ms: now_ms(),
                finished_ms: None,
            };
            // Reserve the slot before releasing the locks, so limits hold under races.
            migs.insert(m.clone());
            Ok(Some(m))
        })?;
        let Some(m) = m else { return Ok(None) };
        self.save_migration(&m, Some(format!("migration {} of {vm}: {} -> {to} ({why})", m.id, m.from)));
        let e = self.clone();
        let id = m.id.clone();
        tokio::spawn(async move { e.drive(id).await });
        Ok(Some(m))
    }

    /// Asks the source agent to cancel a migration (before its switchover only).
    pub async fn cancel(&self, id: &str) -> Result<Migration, ControllerError> {
        let m = self.migration(id)?;
        if m.phase.is_final() {
            return Ok(m);
        }
        let Some(agent_id) = m.agent_id.clone() else {
            return Err(ControllerError::Conflict(format!("migration {id} has not reached its agent yet; try again")));
        };
        let url = self.view.host(&m.from)?.url;
        self.view.agents().cancel_migration(url, agent_id).await?;
        self.migration(id)
    }

    /// Opens the probe of migration `id`'s guest, if it has an address (in the
    /// background: the result is awaited when the migration ends).
    fn open_probe(&self, id: &str) -> Option<tokio::task::JoinHandle<Result<Prober, ProbeError>>> {
        let m = self.migration(id).ok().filter(|m| m.agent_id.is_none())?;
        let vm = self.view.read(|view| view.vms.get(&m.vm).cloned())?;
        let target = vm.nics.iter().find_map(|n| n.address.as_deref()).and_then(walkabout_probe::echo_target)?;
        // Connecting runs beside the hand-over, and the migration measures the guest's
        // dirty rate first: a few seconds still open the window before the switchover.
        let options = ProbeOptions { connect_timeout: Duration::from_secs(3), settle: Duration::from_secs(10), ..ProbeOptions::default() };
        Some(tokio::task::spawn_blocking(move || {
            let p = Prober::connect(target, options)?;
            p.start_window();
            Ok(p)
        }))
    }

    /// Closes the probe's window now that the agent reports the migration final, and
    /// notes what it saw on the migration (recorded with its final phase).
    async fn close_probe(&self, id: &str, probe: tokio::task::JoinHandle<Result<Prober, ProbeError>>) {
        let seen = match probe.await {
            Ok(Ok(p)) => tokio::task::spawn_blocking(move || p.end_window()).await.ok(),
            Ok(Err(e)) => {
                tracing::debug!(id, error = %e, "guest not probed");
                None
            }
            Err(_) => None,
        };
        let Some(seen) = seen else { return };
        if let Some(m) = lock(&self.migrations).all.get_mut(id) {
            match seen {
                Ok(w) => m.observed_downtime_ms = Some(w.max_gap_ms),
                Err(e) => m.probe_error = Some(e.to_string()),
            }
        }
    }

    /// Drives migration `id` to its end: hands it to the source agent (or adopts the
    /// agent's migration if a previous controller already did), then follows it.
    async fn drive(self: Arc<Self>, id: String) {
        let mut probe = self.open_probe(&id);
        let mut stop = self.stop.clone();
        loop {
            if *stop.borrow() {
                return;
            }
            let Ok(m) = self.migration(&id) else { return };
            if m.phase.is_final() {
                return;
            }
            let (from_url, from_up, from_reason) = match self.view.host(&m.from) {
                Ok(h) => (h.url, h.status != HostStatus::Down, h.down_reason),
                Err(e) => return self.finish_migration(&id, Phase::Failed, Some(e.to_string()), None),
            };
            // Past the switchover (post-copy perhaps paused on a lost link) nothing can be
            // undone and the source agent alone ends the migration: keep following it.
            if !from_up && m.phase != Phase::Switchover {
                let why =
                    format!("its source host {} went down ({}); {} is unreachable there", m.from, from_reason.unwrap_or_default(), m.vm);
                return self.finish_migration(&id, Phase::Failed, Some(why), None);
            }
            let step = match &m.agent_id {
                None => self.hand_over(&m, &from_url).await,
                Some(agent_id) => self.view.agents().migration(from_url.clone(), agent_id.clone()).await.map(Some),
            };
            match step {
                Ok(Some(rec)) => {
                    if rec.phase.is_final() {
                        if let Some(p) = probe.take() {
                            self.close_probe(&id, p).await;
                        }
                    }
                    self.follow(&id, rec)
                }
                Ok(None) => {}
                Err(e @ ClientError::Api { .. }) if m.agent_id.is_none() || e.status() == Some(404) => {
                    return self.finish_migration(&id, Phase::Failed, Some(e.to_string()), None);
                }
                Err(e) => tracing::debug!(id, error = %e, "source agent did not answer; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Gives the migration to its source agent, unless the agent already has it.
    async fn hand_over(&self, m: &Migration, from_url: &str) -> Result<Option<MigrationRecord>, ClientError> {
        let to_url = self.view.host(&m.to).map(|h| h.url).unwrap_or_default();
        let known = self.view.agents().migrations(from_url.to_string()).await?;
        // Only an agent migration no record of ours claims: an earlier, failed attempt
        // of the same hop is not this one.
        // (The claims are looked up only for a candidate: they span the whole history.)
        let candidate = |r: &MigrationRecord| r.vm == m.vm && r.destination == to_url && r.created_at_ms + 2_000 >= m.started_ms;
        let claimed = |r: &MigrationRecord| lock(&self.migrations).all.values().any(|x| x.agent_id.as_deref() == Some(r.id.as_str()));
        if let Some(rec) = known.into_iter().find(|r| candidate(r) && !claimed(r)) {
            tracing::info!(id = %m.id, agent_id = %rec.id, "adopting the agent's migration");
            return Ok(Some(rec));
        }
        let req = MigrationRequest {
            max_bandwidth_bps: self.config.max_bandwidth_bps,
            storage: self.config.limits.storage,
            ..MigrationRequest::new(m.vm.clone(), to_url, self.config.mode)
        };
        self.view.agents().start_migration(from_url.to_string(), req).await.map(Some)
    }

    fn follow(&self, id: &str, rec: MigrationRecord) {
        let Ok(mut m) = self.migration(id) else { return };
        let first = m.agent_id.is_none();
        m.agent_id = Some(rec.id.clone());
        m.progress = rec.progress.clone();
        m.strategy = rec.strategy.clone();
        m.switches = rec.switches.clone();
        if rec.phase.is_final() {
            return self.finish_migration(id, rec.phase, rec.reason.clone(), Some(rec));
        }
        // The source agent is the authority on its migration's phase.
        let moved = m.phase != rec.phase;
        m.phase = rec.phase;
        if first || moved {
            let msg = format!("migration {id} of {} is {}", m.vm, m.phase);
            self.save_migration(&m, Some(msg));
        } else {
            lock(&self.migrations).insert(m);
        }
    }

    fn finish_migration(&self, id: &str, phase: Phase, reason: Option<String>, rec: Option<MigrationRecord>) {
        let Ok(mut m) = self.migration(id) else { return };
        m.phase = phase;
        m.reason = reason;
        m.finished_ms = Some(now_ms());
        if let Some(r) = rec {
            if let Some(bps) = r.dirty_rate_bps {
                self.view.note_dirty(&m.vm, bps);
            }
            m.agent_id = Some(r.id);
            m.progress = r.progress;
            m.strategy = r.strategy;
            m.switches = r.switches;
            m.downtime_ms = r.downtime_ms;
            m.total_ms = r.total_ms;
        }
        let msg = match phase {
            Phase::Completed => format!(
                "migration {id} of {} to {} completed in {} ms, downtime {} ms{}",
                m.vm,
                m.to,
                m.total_ms.unwrap_or(0),
                m.downtime_ms.unwrap_or(0),
                observed_text(&m)
            ),
            p => {
                format!("migration {id} of {} to {} {}: {}", m.vm, m.to, p, m.reason.as_deref().unwrap_or(""))
            }
        };
        if phase == Phase::Completed {
            self.view.placed(&m.vm, &m.to);
        }
        self.save_migration(&m, Some(msg));
    }
}

/// What the probe of a migration's guest saw, for its event (empty if not probed).
fn observed_text(m: &Migration) -> String {
    match (m.observed_downtime_ms, &m.probe_error) {
        (_, Some(e)) => format!(", probe of the guest FAILED: {e}"),
        (Some(ms), None) => format!(", observed downtime {ms} ms"),
        (None, None) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mig(from: &str, to: &str, phase: Phase) -> Migration {
        Migration {
            version: 1,
            id: format!("{from}-{to}"),
            vm: "v".into(),
            from: from.into(),
            to: to.into(),
            plan: None,
            why: String::new(),
            phase,
            reason: None,
            agent_id: None,
            progress: Progress::default(),
            strategy: None,
            switches: vec![],
            downtime_ms: None,
            observed_downtime_ms: None,
            probe_error: None,
            total_ms: None,
            started_ms: 0,
            finished_ms: None,
        }
    }

    #[test]
    fn one_migration_out_of_a_host_at_a_time() {
        let l = ExecLimits::default();
        let running = [mig("h1", "h2", Phase::Running)];
        assert!(!within_limits(&l, running.iter(), "h1", "h3"));
    }

    #[test]
    fn one_migration_into_a_host_at_a_time() {
        let l = ExecLimits::default();
        let running = [mig("h1", "h2", Phase::Running)];
        assert!(!within_limits(&l, running.iter(), "h3", "h2"));
    }

    #[test]
    fn the_cluster_limit_caps_disjoint_migrations() {
        let l = ExecLimits { per_cluster: 2, ..ExecLimits::default() };
        let running = [mig("h1", "h2", Phase::Running), mig("h3", "h4", Phase::Preparing)];
        assert!(!within_limits(&l, running.iter(), "h5", "h6"));
    }

    #[test]
    fn finished_migrations_do_not_count() {
        let l = ExecLimits::default();
        let done = [mig("h1", "h2", Phase::Completed), mig("h1", "h2", Phase::Failed)];
        assert!(within_limits(&l, done.iter(), "h1", "h2"));
    }
}
