//! Executing plans through the agents.
//!
//! A plan runs wave by wave (the waves of its current round, one after the other);
//! within a wave its steps start as the limits allow: migrations out of one host, into
//! one host, and in the whole cluster at once ([`ExecLimits`]). Each step is one
//! [`Migration`], driven by its own task that asks the source agent to migrate and
//! polls it to the end.
//!
//! Why the order of operations is what it is:
//! - A migration record is stored (phase `pending`, no agent id) *before* the agent is
//!   asked, and the step points at it before its task starts. A controller that dies in
//!   between finds the record on restart and looks for the agent's migration of that VM
//!   to that destination (adopting it) before it would ask again: nothing runs twice.
//! - Before a step starts, the VM must still be where the step says; if it is already
//!   at the step's destination (a migration that finished while the controller was
//!   away) the step is done; anywhere else, the plan is re-planned from the actual state.
//! - A failed migration counts against its VM; after [`ExecLimits::max_attempts`] the VM
//!   is given up (pinned where it is) and reported with the reason. Re-plans only happen
//!   once no migration of the plan runs (so the state they start from is settled), and
//!   at most [`ExecLimits::max_replans`] times: no infinite evacuation loop.
//! - A plan never ends silently half-done: it ends `completed` only when every step of
//!   its last round completed and nothing was given up; otherwise `failed`, with each
//!   VM that did not get where the goal wanted and why.

use crate::cluster::{Cluster, HostStatus, Maintenance};
use crate::error::ControllerError;
use crate::events::Subject;
use crate::plans::{case_of, plan_goal, Goal, PlanRecord, PlanStatus, Planned, Problem, StepStatus};
use crate::store::MIGRATIONS;
use crate::{lock, now_ms};
use std::time::Duration;
use tokio::sync::watch;
use walkabout_api::Phase;
use walkabout_api::{ClientError, ClusterVmState, MigrationRecord, MigrationRequest, Progress};

pub use walkabout_api::cluster::CLUSTER_MIGRATION_VERSION as MIGRATION_VERSION;
pub use walkabout_api::{ClusterMigration as Migration, ExecLimits};

/// How often running migrations and plans are looked at.
const TICK: Duration = Duration::from_millis(300);

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

impl Cluster {
    /// All migrations, oldest first.
    pub fn migrations(&self) -> Vec<Migration> {
        let mut v: Vec<_> = lock(&self.inner.migrations).values().cloned().collect();
        v.sort_by_key(|m| (m.started_ms, m.id.clone()));
        v
    }

    /// One migration.
    pub fn migration(&self, id: &str) -> Result<Migration, ControllerError> {
        lock(&self.inner.migrations).get(id).cloned().ok_or_else(|| ControllerError::not_found("migration", id))
    }

    fn save_migration(&self, m: &Migration, message: Option<String>) {
        if let Err(e) = self.inner.store.put(&MIGRATIONS, &m.id, m) {
            tracing::error!(id = %m.id, error = %e, "cannot store migration");
        }
        lock(&self.inner.migrations).insert(m.id.clone(), m.clone());
        if let Some(msg) = message {
            self.inner.events.emit(Subject::Migration, &m.id, msg, serde_json::to_value(m).unwrap_or_default());
        }
    }

    /// Starts migrating `vm` to host `to` if the limits allow (`Ok(None)` when they do
    /// not yet); checks that the VM runs on a host that is up, that `to` is up, and that
    /// `to` has room once the migrations already coming in are counted.
    pub fn try_migrate(&self, vm: &str, to: &str, plan: Option<&str>, why: &str) -> Result<Option<Migration>, ControllerError> {
        let limits = self.limits();
        let m = {
            let view = lock(&self.inner.view);
            let mut migs = lock(&self.inner.migrations);
            let v = view.vms.get(vm).ok_or_else(|| ControllerError::not_found("VM", vm))?;
            let from = v.host.clone().ok_or_else(|| ControllerError::Conflict(format!("cannot move {vm}: it runs nowhere")))?;
            if !v.is_active() {
                return Err(ControllerError::Conflict(format!("cannot move {vm}: it is {} on {from}", v.state)));
            }
            if let Some(m) = migs.values().find(|m| m.vm == vm && !m.phase.is_final()) {
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
            if from == to {
                return Err(ControllerError::Conflict(format!("{vm} already runs on {to}")));
            }
            if !within_limits(&limits, migs.values(), &from, to) {
                return Ok(None);
            }
            let incoming: u64 =
                migs.values().filter(|m| !m.phase.is_final() && m.to == to).filter_map(|m| view.vms.get(&m.vm).map(|v| v.memory_mib)).sum();
            let free = view.free_mib(to).saturating_sub(incoming);
            if free < v.memory_mib {
                return Err(ControllerError::Conflict(format!(
                    "cannot move {vm} to {to}: it needs {} MiB and {to} has {free} MiB free",
                    v.memory_mib
                )));
            }
            let id = format!("m{}", self.inner.store.next("migration")?);
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
                downtime_ms: None,
                total_ms: None,
                started_ms: now_ms(),
                finished_ms: None,
            };
            // Reserve the slot before releasing the locks, so limits hold under races.
            migs.insert(id, m.clone());
            m
        };
        self.save_migration(&m, Some(format!("migration {} of {vm}: {} -> {to} ({why})", m.id, m.from)));
        let c = self.clone();
        let id = m.id.clone();
        tokio::spawn(async move { c.drive(id).await });
        Ok(Some(m))
    }

    /// Asks the source agent to cancel a migration (before its switchover only).
    pub async fn cancel_migration(&self, id: &str) -> Result<Migration, ControllerError> {
        let m = self.migration(id)?;
        if m.phase.is_final() {
            return Ok(m);
        }
        let Some(agent_id) = m.agent_id.clone() else {
            return Err(ControllerError::Conflict(format!("migration {id} has not reached its agent yet; try again")));
        };
        let url = self.host(&m.from)?.url;
        self.inner.api.cancel_migration(url, agent_id).await?;
        self.migration(id)
    }

    /// Drives migration `id` to its end: hands it to the source agent (or adopts the
    /// agent's migration if a previous controller already did), then follows it.
    pub(crate) async fn drive(self, id: String) {
        let mut stop = self.stopping();
        loop {
            if *stop.borrow() {
                return;
            }
            let Ok(m) = self.migration(&id) else { return };
            if m.phase.is_final() {
                return;
            }
            let (from_url, from_up, from_reason) = match self.host(&m.from) {
                Ok(h) => (h.url, h.status != HostStatus::Down, h.down_reason),
                Err(e) => return self.finish_migration(&id, Phase::Failed, Some(e.to_string()), None),
            };
            if !from_up {
                let why =
                    format!("its source host {} went down ({}); {} is unreachable there", m.from, from_reason.unwrap_or_default(), m.vm);
                return self.finish_migration(&id, Phase::Failed, Some(why), None);
            }
            let step = match &m.agent_id {
                None => self.hand_over(&m, &from_url).await,
                Some(agent_id) => self.inner.api.migration(from_url.clone(), agent_id.clone()).await.map(Some),
            };
            match step {
                Ok(Some(rec)) => self.follow(&id, rec),
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
        let to_url = self.host(&m.to).map(|h| h.url).unwrap_or_default();
        let known = self.inner.api.migrations(from_url.to_string()).await?;
        // Only an agent migration no record of ours claims: an earlier, failed attempt
        // of the same hop is not this one.
        let claimed: Vec<String> = lock(&self.inner.migrations).values().filter_map(|x| x.agent_id.clone()).collect();
        let ours = |r: &MigrationRecord| {
            r.vm == m.vm && r.destination == to_url && r.created_at_ms + 2_000 >= m.started_ms && !claimed.contains(&r.id)
        };
        if let Some(rec) = known.into_iter().find(ours) {
            tracing::info!(id = %m.id, agent_id = %rec.id, "adopting the agent's migration");
            return Ok(Some(rec));
        }
        let req = MigrationRequest {
            max_bandwidth_bps: self.inner.config.max_bandwidth_bps,
            ..MigrationRequest::new(m.vm.clone(), to_url, self.inner.config.mode)
        };
        self.inner.api.start_migration(from_url.to_string(), req).await.map(Some)
    }

    fn follow(&self, id: &str, rec: MigrationRecord) {
        let Ok(mut m) = self.migration(id) else { return };
        let first = m.agent_id.is_none();
        m.agent_id = Some(rec.id.clone());
        m.progress = rec.progress.clone();
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
            lock(&self.inner.migrations).insert(id.to_string(), m);
        }
    }

    fn finish_migration(&self, id: &str, phase: Phase, reason: Option<String>, rec: Option<MigrationRecord>) {
        let Ok(mut m) = self.migration(id) else { return };
        m.phase = phase;
        m.reason = reason;
        m.finished_ms = Some(now_ms());
        if let Some(r) = rec {
            m.agent_id = Some(r.id);
            m.progress = r.progress;
            m.downtime_ms = r.downtime_ms;
            m.total_ms = r.total_ms;
        }
        let msg = match phase {
            Phase::Completed => format!(
                "migration {id} of {} to {} completed in {} ms, downtime {} ms",
                m.vm,
                m.to,
                m.total_ms.unwrap_or(0),
                m.downtime_ms.unwrap_or(0)
            ),
            p => {
                format!("migration {id} of {} to {} {}: {}", m.vm, m.to, p, m.reason.as_deref().unwrap_or(""))
            }
        };
        if phase == Phase::Completed {
            self.placed(&m.vm, &m.to);
        }
        self.save_migration(&m, Some(msg));
    }

    /// Starts executing a proposed plan; returns at once (poll the plan).
    pub fn execute(&self, id: &str) -> Result<PlanRecord, ControllerError> {
        let mut rec = self.plan(id)?;
        match rec.status {
            PlanStatus::Proposed => {}
            PlanStatus::Running => return Ok(rec),
            PlanStatus::Impossible => {
                return Err(ControllerError::Impossible {
                    reason: rec.reason.clone().unwrap_or_else(|| "no plan exists".into()),
                    blocked: rec.blocked.clone(),
                    plan: Some(rec.id.clone()),
                })
            }
            s => return Err(ControllerError::Conflict(format!("plan {id} is {s:?}; only a proposed plan can be executed"))),
        }
        {
            let executing = lock(&self.inner.executing);
            if let Some(other) = executing.keys().next() {
                return Err(ControllerError::Conflict(format!("plan {other} is running; wait for it or cancel it first")));
            }
        }
        rec.status = PlanStatus::Running;
        rec.started_ms = Some(now_ms());
        self.save_plan(&rec, Some(format!("plan {id} ({}) is running", rec.goal.describe())))?;
        self.spawn_plan(id.to_string());
        Ok(rec)
    }

    fn spawn_plan(&self, id: String) {
        let (tx, rx) = watch::channel(false);
        lock(&self.inner.executing).insert(id.clone(), tx);
        let c = self.clone();
        tokio::spawn(async move {
            c.run_plan(&id, rx).await;
            lock(&c.inner.executing).remove(&id);
        });
    }

    /// Cancels a plan: a proposed one at once; a running one stops starting steps, asks
    /// the agents to cancel the migrations that run (those past their switchover
    /// finish), and ends `cancelled`.
    pub async fn cancel_plan(&self, id: &str) -> Result<PlanRecord, ControllerError> {
        let mut rec = self.plan(id)?;
        match rec.status {
            PlanStatus::Proposed => {
                rec.status = PlanStatus::Cancelled;
                rec.finished_ms = Some(now_ms());
                rec.reason = Some("cancelled before it ran".into());
                self.save_plan(&rec, Some(format!("plan {id} cancelled")))?;
                Ok(rec)
            }
            PlanStatus::Running => {
                if let Some(tx) = lock(&self.inner.executing).get(id) {
                    let _ = tx.send(true);
                }
                for (_, s) in rec.running() {
                    if let Some(mid) = &s.migration {
                        if let Err(e) = self.cancel_migration(mid).await {
                            tracing::warn!(plan = id, migration = %mid, error = %e, "cannot cancel");
                        }
                    }
                }
                self.plan(id)
            }
            _ => Ok(rec),
        }
    }

    /// At start: follow the migrations and run the plans a previous run left unfinished.
    pub(crate) async fn resume(&self) {
        let unfinished: Vec<String> = self.migrations().into_iter().filter(|m| !m.phase.is_final()).map(|m| m.id).collect();
        for id in unfinished {
            tracing::info!(id, "resuming a migration the previous controller ordered");
            let c = self.clone();
            tokio::spawn(async move { c.drive(id).await });
        }
        for p in self.plans().into_iter().filter(|p| p.status == PlanStatus::Running) {
            self.inner.events.emit(
                Subject::Plan,
                &p.id,
                format!("plan {} resumes after a controller restart", p.id),
                serde_json::Value::Null,
            );
            self.spawn_plan(p.id);
        }
    }

    async fn run_plan(&self, id: &str, mut cancel: watch::Receiver<bool>) {
        let mut stop = self.stopping();
        // Why the plan must be re-planned, kept until nothing of it runs.
        let mut want_replan: Option<String> = None;
        let mut replan_since: Option<std::time::Instant> = None;
        // Hosts of failed steps: a re-plan waits until they answer or are marked down.
        let mut suspects: std::collections::BTreeSet<String> = Default::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = cancel.changed() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            // Act only on a view every host has answered (or been found down) since
            // this controller started.
            if self.hosts().iter().any(|h| h.status == HostStatus::Unknown) {
                continue;
            }
            let Ok(mut rec) = self.plan(id) else { return };
            let before = rec.clone();
            let cancelled = *cancel.borrow();
            let mut messages = vec![];
            let before_steps = rec.steps.clone();
            if let Some(why) = self.settle(&mut rec, cancelled, &mut messages) {
                want_replan = Some(why);
                for (old, new) in before_steps.iter().zip(&rec.steps) {
                    if old.status == StepStatus::Running && new.status == StepStatus::Failed {
                        suspects.extend([new.from.clone(), new.to.clone()]);
                    }
                }
            }
            let running = rec.running().count();
            if cancelled {
                if running == 0 {
                    for s in rec.steps.iter_mut().filter(|s| s.status == StepStatus::Pending) {
                        s.status = StepStatus::Cancelled;
                        s.reason = Some("plan cancelled".into());
                    }
                    self.end_plan(&mut rec, PlanStatus::Cancelled, "cancelled by the operator".into());
                    return;
                }
            } else {
                if let Some(why) = self.host_gone(&rec) {
                    want_replan.get_or_insert(why);
                }
                // A failure often comes just before its cause is known (a host that
                // stopped answering is marked down after a few polls): wait for that
                // before re-planning, so the new round does not pick the dead host.
                let settling = want_replan.is_some() && self.any_silent(&suspects).await;
                let hold = settling && replan_since.get_or_insert_with(std::time::Instant::now).elapsed() < crate::agents::DOWN_AFTER * 2;
                if running == 0 && !hold {
                    replan_since = None;
                    suspects.clear();
                    if let Some(why) = want_replan.take() {
                        tracing::info!(plan = id, why, "re-planning from the actual state");
                        self.replan(&mut rec, &mut messages);
                    }
                }
                if !rec.status.is_final() && !hold && want_replan.is_none() {
                    if let Err(why) = self.start_steps(&mut rec, &mut messages) {
                        want_replan = Some(why);
                    }
                }
                let idle = rec.running().count() == 0 && rec.pending().count() == 0;
                if !rec.status.is_final() && idle && want_replan.is_none() {
                    self.conclude(&mut rec);
                }
            }
            if rec != before || !messages.is_empty() {
                let msg = if messages.is_empty() { None } else { Some(messages.join("; ")) };
                if let Err(e) = self.save_plan(&rec, msg) {
                    tracing::error!(plan = id, error = %e, "cannot store plan");
                }
            }
            if rec.status.is_final() {
                return;
            }
        }
    }

    /// Folds finished migrations into their steps. Returns a reason to re-plan.
    fn settle(&self, rec: &mut PlanRecord, cancelled: bool, messages: &mut Vec<String>) -> Option<String> {
        let max_attempts = self.limits().max_attempts;
        let mut replan = None;
        for i in 0..rec.steps.len() {
            let s = &rec.steps[i];
            if s.status != StepStatus::Running {
                continue;
            }
            let Some(m) = s.migration.as_deref().and_then(|mid| self.migration(mid).ok()) else { continue };
            if !m.phase.is_final() {
                continue;
            }
            let s = &mut rec.steps[i];
            s.finished_ms = m.finished_ms;
            s.downtime_ms = m.downtime_ms;
            match m.phase {
                Phase::Completed => {
                    s.status = StepStatus::Completed;
                    messages.push(format!("{} is on {} (downtime {} ms)", s.vm, s.to, m.downtime_ms.unwrap_or(0)));
                }
                _ if cancelled => {
                    s.status = StepStatus::Cancelled;
                    s.reason = m.reason.clone();
                }
                _ => {
                    s.status = StepStatus::Failed;
                    let reason = m.reason.clone().unwrap_or_else(|| format!("{:?}", m.phase));
                    s.reason = Some(reason.clone());
                    let vm = s.vm.clone();
                    let n = rec.attempts.entry(vm.clone()).or_insert(0);
                    *n += 1;
                    let vm_down = self.vm(&vm).map(|v| v.state == ClusterVmState::Unreachable).unwrap_or(false);
                    if *n >= max_attempts || vm_down {
                        if !rec.gave_up.contains(&vm) {
                            rec.gave_up.push(vm.clone());
                        }
                        let tries = *n;
                        rec.problems.retain(|p| p.vm != vm);
                        rec.problems
                            .push(Problem { vm: vm.clone(), reason: format!("gave up after {tries} failed migration(s): {reason}") });
                        messages.push(format!("gave up on {vm}: {reason}"));
                    } else {
                        messages.push(format!("migration of {vm} failed ({reason}); will re-plan"));
                    }
                    replan = Some(format!("migration of {vm} failed"));
                }
            }
        }
        replan
    }

    /// True when one of `hosts` is still up in the view but does not answer now (it is
    /// probably going down; the watcher will say so shortly).
    async fn any_silent(&self, hosts: &std::collections::BTreeSet<String>) -> bool {
        for name in hosts {
            let Ok(h) = self.host(name) else { continue };
            if h.status == HostStatus::Up && self.inner.api.host(h.url).await.is_err() {
                return true;
            }
        }
        false
    }

    /// Why a pending step can no longer run as planned: one of its hosts went down.
    fn host_gone(&self, rec: &PlanRecord) -> Option<String> {
        let view = self.view();
        rec.pending().find_map(|(_, s)| {
            [&s.from, &s.to]
                .into_iter()
                .find(|h| !view.hosts.get(h.as_str()).is_some_and(|h| h.status != HostStatus::Down))
                .map(|h| format!("host {h} went down"))
        })
    }

    /// Starts the steps of the current wave that the limits allow. Returns a reason to
    /// re-plan when a step no longer matches the cluster.
    fn start_steps(&self, rec: &mut PlanRecord, messages: &mut Vec<String>) -> Result<(), String> {
        let Some(wave) = rec.pending().map(|(_, s)| s.wave).min() else { return Ok(()) };
        let round = rec.round;
        let earlier_running = rec.steps.iter().any(|s| s.status == StepStatus::Running && s.round == round && s.wave < wave);
        if earlier_running {
            return Ok(());
        }
        let todo: Vec<usize> = rec.pending().filter(|(_, s)| s.wave == wave).map(|(i, _)| i).collect();
        for i in todo {
            let (vm, from, to, why) = {
                let s = &rec.steps[i];
                (s.vm.clone(), s.from.clone(), s.to.clone(), s.why.clone())
            };
            // A migration of this VM that a previous controller started: adopt it.
            if let Some(m) = self.migrations().into_iter().find(|m| m.vm == vm && m.plan.as_deref() == Some(&rec.id) && !m.phase.is_final())
            {
                rec.steps[i].status = StepStatus::Running;
                rec.steps[i].started_ms = Some(m.started_ms);
                rec.steps[i].migration = Some(m.id);
                continue;
            }
            let at = self.vm(&vm).ok().and_then(|v| v.host);
            if at.as_deref() == Some(to.as_str()) {
                rec.steps[i].status = StepStatus::Completed;
                rec.steps[i].reason = Some(format!("{vm} was already on {to}"));
                continue;
            }
            if at.as_deref() != Some(from.as_str()) {
                return Err(format!("{vm} is on {} instead of {from}", at.unwrap_or_else(|| "no host".into())));
            }
            match self.try_migrate(&vm, &to, Some(&rec.id), &why) {
                Ok(Some(m)) => {
                    rec.steps[i].status = StepStatus::Running;
                    rec.steps[i].migration = Some(m.id.clone());
                    rec.steps[i].started_ms = Some(m.started_ms);
                    messages.push(format!("{vm}: {from} -> {to} started ({})", m.id));
                }
                Ok(None) => {}
                Err(e) => {
                    rec.steps[i].status = StepStatus::Failed;
                    rec.steps[i].reason = Some(e.to_string());
                    *rec.attempts.entry(vm.clone()).or_insert(0) += 1;
                    if rec.attempts[&vm] >= self.limits().max_attempts && !rec.gave_up.contains(&vm) {
                        rec.gave_up.push(vm.clone());
                        rec.problems.push(Problem { vm: vm.clone(), reason: e.to_string() });
                    }
                    return Err(e.to_string());
                }
            }
        }
        Ok(())
    }

    /// Re-plans from the actual state: the pending steps of the current round are
    /// superseded by a new round toward the same goal, VMs given up stay where they are.
    fn replan(&self, rec: &mut PlanRecord, messages: &mut Vec<String>) {
        for s in rec.steps.iter_mut().filter(|s| s.status == StepStatus::Pending) {
            s.status = StepStatus::Superseded;
            s.reason = Some(format!("superseded by re-plan {}", rec.round + 1));
        }
        if rec.round >= self.limits().max_replans {
            let why = format!("gave up after {} re-plans", rec.round);
            self.unreached(rec, &why);
            self.end_plan(rec, PlanStatus::Failed, why);
            return;
        }
        rec.round += 1;
        let view = self.view();
        let (case, left_out) = case_of(&view, self.limits().planner_parallel_per_host);
        // VMs on hosts that went down concern this plan if the goal wanted them moved.
        for p in left_out {
            let at = view.vms.get(&p.vm).and_then(|v| v.host.as_ref());
            let concerned = match &rec.goal {
                Goal::Drain { host } => at == Some(host),
                _ => rec.target.get(&p.vm).is_some_and(|t| Some(t) != at),
            };
            if concerned && !rec.problems.iter().any(|x| x.vm == p.vm) {
                rec.problems.push(p);
            }
        }
        // Move what still can move: a VM that fits nowhere now is reported with why and
        // pinned, and the rest planned again (at most once per VM).
        for _ in 0..=case.vms.len() {
            match plan_goal(&view, &case, &rec.goal, &rec.gave_up, rec.round) {
                Ok(Planned::Steps { steps, target, .. }) => {
                    messages.push(format!("re-planned (round {}): {} migration(s)", rec.round, steps.len()));
                    rec.steps.extend(steps);
                    rec.target = target;
                    return;
                }
                Ok(Planned::Impossible { reason, blocked }) => {
                    let fresh: Vec<_> = blocked.iter().filter(|b| !rec.gave_up.contains(&b.vm)).cloned().collect();
                    if fresh.is_empty() {
                        self.end_plan(rec, PlanStatus::Failed, format!("re-plan found no way: {reason}"));
                        return;
                    }
                    for b in fresh {
                        messages.push(format!("{} cannot go anywhere now: {}", b.vm, b.why));
                        rec.problems.retain(|p| p.vm != b.vm);
                        rec.problems.push(Problem { vm: b.vm.clone(), reason: format!("needs {}: {}", b.needs, b.why) });
                        rec.gave_up.push(b.vm.clone());
                        rec.blocked.push(b);
                    }
                }
                Err(e) => {
                    self.unreached(rec, &e.to_string());
                    self.end_plan(rec, PlanStatus::Failed, format!("re-plan failed: {e}"));
                    return;
                }
            }
        }
    }

    /// Adds a problem for each VM not where the plan's target wants it.
    fn unreached(&self, rec: &mut PlanRecord, why: &str) {
        let view = self.view();
        for (vm, want) in rec.target.clone() {
            let at = view.vms.get(&vm).and_then(|v| v.host.clone());
            if at.as_deref() != Some(want.as_str()) && !rec.problems.iter().any(|p| p.vm == vm) {
                rec.problems
                    .push(Problem { vm: vm.clone(), reason: format!("{vm} is on {} instead of {want}: {why}", at.unwrap_or_default()) });
            }
        }
    }

    fn conclude(&self, rec: &mut PlanRecord) {
        if rec.problems.is_empty() {
            if let Goal::Drain { host } = &rec.goal {
                let _ = self.set_maintenance(host, Maintenance::Drained);
            }
            let n = rec.steps.iter().filter(|s| s.status == StepStatus::Completed).count();
            self.end_plan(rec, PlanStatus::Completed, format!("{} reached with {n} migration(s)", rec.goal.describe()));
        } else {
            let vms: Vec<&str> = rec.problems.iter().map(|p| p.vm.as_str()).collect();
            let why = format!("{} not reached for {}", rec.goal.describe(), vms.join(", "));
            if let Goal::Drain { host } = &rec.goal {
                let detail: Vec<String> = rec.problems.iter().map(|p| format!("{}: {}", p.vm, p.reason)).collect();
                let reason = format!("plan {}: {} stayed ({})", rec.id, vms.join(", "), detail.join("; "));
                let _ = self.set_maintenance_because(host, Maintenance::DrainFailed, Some(reason));
            }
            self.end_plan(rec, PlanStatus::Failed, why);
        }
    }

    fn end_plan(&self, rec: &mut PlanRecord, status: PlanStatus, reason: String) {
        rec.status = status;
        rec.finished_ms = Some(now_ms());
        rec.reason = Some(reason.clone());
        let msg = format!("plan {} {status}: {reason}", rec.id);
        if let Err(e) = self.save_plan(rec, Some(msg)) {
            tracing::error!(plan = %rec.id, error = %e, "cannot store plan");
        }
    }

    /// Puts `host` in maintenance and drains it: plans, refuses up front (with each VM
    /// and why, and the host left as it was) when no plan exists, else executes.
    pub fn drain(&self, host: &str) -> Result<PlanRecord, ControllerError> {
        let before = self.host(host)?.maintenance;
        let plan = self.propose(Goal::Drain { host: host.to_string() })?;
        if plan.status == PlanStatus::Impossible {
            return Err(ControllerError::Impossible {
                reason: plan.reason.clone().unwrap_or_default(),
                blocked: plan.blocked.clone(),
                plan: Some(plan.id.clone()),
            });
        }
        self.set_maintenance(host, Maintenance::Draining)?;
        match self.execute(&plan.id) {
            Ok(p) => Ok(p),
            Err(e) => {
                let _ = self.set_maintenance(host, before);
                let _ = futures_util::FutureExt::now_or_never(self.cancel_plan(&plan.id));
                Err(e)
            }
        }
    }

    /// Takes `host` out of maintenance, cancelling its drain if one runs.
    pub async fn undrain(&self, host: &str) -> Result<crate::cluster::Host, ControllerError> {
        self.host(host)?;
        for p in self.plans().into_iter().filter(|p| p.status == PlanStatus::Running) {
            if p.goal == (Goal::Drain { host: host.to_string() }) {
                self.cancel_plan(&p.id).await?;
            }
        }
        self.set_maintenance(host, Maintenance::Active)
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
            downtime_ms: None,
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
    use crate::cluster::ControllerConfig;
    use crate::fake::{url, Fake};
    use std::sync::Arc;

    fn temp(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("wa-ctl-exec-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    async fn open(dir: &std::path::Path, fake: &Fake, hosts: &[&str]) -> Cluster {
        let c = Cluster::open(ControllerConfig::new(dir.to_path_buf()), Arc::new(fake.clone())).await.expect("open");
        for h in hosts {
            c.add_host(&url(h), Some(h)).await.expect("add host");
        }
        c
    }

    async fn wait_final(c: &Cluster, id: &str) -> PlanRecord {
        for _ in 0..200 {
            let p = c.plan(id).expect("plan");
            if p.status.is_final() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("plan {id} never ended: {:?}", c.plan(id));
    }

    /// h1 holds three VMs; h2 and h3 have room for two each: three waves (h1 takes
    /// part in one migration at a time), each VM moved once.
    fn tight() -> Fake {
        Fake::new(&[("h1", 768), ("h2", 512), ("h3", 512)], &[("a", 256, "h1"), ("b", 256, "h1"), ("c", 256, "h1")])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_moves_every_vm_once_one_out_of_the_host_at_a_time() {
        let fake = tight();
        let dir = temp("drain");
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
        let p = c.drain("h1").expect("drain");
        let p = wait_final(&c, &p.id).await;
        assert_eq!(p.status, PlanStatus::Completed, "{p:?}");
        let s = fake.state();
        assert_eq!(s.started.len(), 3, "{:?}", s.started);
        assert_eq!(s.max_out.get(&url("h1")).copied(), Some(1));
        assert!(s.vms.values().all(|(h, _)| *h != url("h1")));
        drop(s);
        assert_eq!(c.host("h1").expect("h1").maintenance, Maintenance::Drained);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vm_whose_migrations_keep_failing_is_retried_then_reported_with_the_reason() {
        let fake = tight();
        fake.state().failing.push("b".into());
        let dir = temp("retry");
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
        let p = c.drain("h1").expect("drain");
        let p = wait_final(&c, &p.id).await;
        assert_eq!(p.status, PlanStatus::Failed, "{p:?}");
        let tries = fake.state().started.iter().filter(|(vm, _, _)| vm == "b").count();
        assert_eq!(tries as u32, ExecLimits::default().max_attempts, "{p:#?}");
        let problem = p.problems.iter().find(|x| x.vm == "b").expect("b reported");
        assert!(problem.reason.contains("destination QEMU exited"), "{problem:?}");
        assert!(p.round >= 1, "the plan was re-planned");
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_that_stops_answering_is_marked_down_with_the_reason_within_seconds() {
        let fake = tight();
        let dir = temp("down");
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
        fake.state().down.push(url("h2"));
        let t = std::time::Instant::now();
        while c.host("h2").expect("h2").status != HostStatus::Down {
            assert!(t.elapsed() < Duration::from_secs(5), "h2 not marked down");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let h = c.host("h2").expect("h2");
        assert!(h.down_reason.as_deref().unwrap_or("").contains("connection refused"), "{h:?}");
        assert!(h.status_since_ms > 0);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_losing_a_destination_what_still_fits_moves_and_the_rest_is_reported() {
        let fake = tight();
        fake.state().polls = 20;
        let dir = temp("fits-nowhere");
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
        let p = c.drain("h1").expect("drain");
        while fake.state().started.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let victim = fake.state().started[0].2.clone();
        fake.state().polls = 3;
        fake.state().down.push(victim.clone());
        let p = wait_final(&c, &p.id).await;
        assert_eq!(p.status, PlanStatus::Failed, "{p:?}");
        assert_eq!(p.problems.len(), 1, "{p:?}");
        let moved = fake.state().vms.values().filter(|(h, _)| *h != url("h1") && *h != victim).count();
        assert_eq!(moved, 2, "{p:?}");
        let dead = if victim == url("h2") { "h2" } else { "h3" };
        assert!(p.steps.iter().filter(|s| s.round > 0).all(|s| s.to != dead), "a re-plan picked the dead host: {p:?}");
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_controller_finishes_the_plan_without_running_a_migration_twice() {
        let fake = tight();
        fake.state().polls = 6;
        let dir = temp("restart");
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
        let id = c.drain("h1").expect("drain").id;
        while fake.state().started.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.stop();
        drop(c);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let c = open(&dir, &fake, &[]).await;
        let p = wait_final(&c, &id).await;
        assert_eq!(p.status, PlanStatus::Completed, "{p:?}");
        let s = fake.state();
        assert_eq!(s.started.len(), 3, "{:?}", s.started);
        drop(s);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_impossible_drain_is_refused_up_front_and_the_host_stays_in_service() {
        let fake = Fake::new(&[("h1", 768), ("h2", 300)], &[("a", 256, "h1"), ("b", 256, "h1")]);
        let dir = temp("impossible");
        let c = open(&dir, &fake, &["h1", "h2"]).await;
        let e = c.drain("h1").expect_err("refused");
        let ControllerError::Impossible { blocked, .. } = &e else { panic!("{e}") };
        assert!(!blocked.is_empty());
        assert_eq!(c.host("h1").expect("h1").maintenance, Maintenance::Active);
        assert!(fake.state().started.is_empty());
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }
}
