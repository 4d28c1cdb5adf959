//! The planner driver: goals become plans (`plans.rs` turns the view into the planner's
//! case), and a running plan is driven round by round, wave by wave, its steps handed
//! to the executor as the limits allow, re-planned from the actual state when the
//! cluster no longer matches it.
//!
//! Why the order of operations is what it is:
//! - Plans are made from the view *as it will be* once the migrations already under way
//!   land (`plans::project`): a VM leaving a host needs no step off it, a VM on its way
//!   into a host counts as there.
//! - Before a step starts, the VM must still be where the step says. A VM that another
//!   migration (a walk's, an operator's, another plan's) is moving is waited for, not
//!   fought over; if it ends at the step's destination the step is done; if it left the
//!   drained host the step is moot; anywhere else, the plan is re-planned.
//! - A failed migration counts against its VM; after [`ExecLimits::max_attempts`](walkabout_api::ExecLimits::max_attempts) the VM
//!   is given up (pinned where it is) and reported with the reason. A migration
//!   cancelled on request (`POST /v1/migrations/{id}/cancel`, the console's "Cancel
//!   migration") is not retried: its VM is given up at once, where it is. A step the executor
//!   refuses to start (its destination filled up or went into maintenance) is no failed
//!   migration: it is re-planned without counting. Re-plans only happen once no migration
//!   of the plan runs (so the state they start from is settled), and at most
//!   [`ExecLimits::max_replans`](walkabout_api::ExecLimits::max_replans) times: no infinite evacuation loop.
//! - A plan never ends silently half-done: it ends `completed` only when every step of
//!   its last round completed, nothing was given up and (for a drain) the host is empty
//!   with nothing on its way in; otherwise `failed`, with each VM that did not get where
//!   the goal wanted and why. A drain's end sets its host `drained`, or `drain_failed`
//!   with the reason (`drain.rs`).
//! - Several plans may run at once, but not two that would fight: a move (`place`) runs
//!   beside anything that does not move the same VM; drains of different hosts run side
//!   by side (a rolling maintenance takes several hosts out at once); a rebalance or a
//!   consolidation runs alone.
//! - A plan is made from the view as it will be once the *other running plans'* steps
//!   land too, and a drain leaves the VMs of another draining host to that host's own
//!   plan (it only keeps them off it): concurrent drains neither pick the same free
//!   room twice nor move each other's VMs.

use crate::cluster::{ClusterView, HostStatus};
use crate::error::ControllerError;
use crate::events::{Events, Subject};
use crate::execute::{Executor, TICK};
use crate::plans::{case_of, plan_goal, project_owned, Goal, PlanRecord, PlanStatus, Planned, Problem, StepStatus, PLAN_VERSION};
use crate::store::{Store, PLANS};
use crate::{drain, lock, now_ms};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use walkabout_api::{ClusterVmState, Phase};

/// The most dry-run plans (proposed or impossible, never executed) kept; older ones
/// are forgotten.
pub const MAX_PROPOSALS: usize = 100;

/// Plans: their records, and the tasks running them. Shared as `Arc<PlanRunner>`.
pub struct PlanRunner {
    view: Arc<ClusterView>,
    exec: Arc<Executor>,
    store: Arc<Store>,
    events: Arc<Events>,
    /// Plans by id.
    plans: Mutex<BTreeMap<String, PlanRecord>>,
    /// Cancel switches of the plans being executed.
    executing: Mutex<BTreeMap<String, watch::Sender<bool>>>,
    stop: watch::Receiver<bool>,
}

impl PlanRunner {
    /// Loads the plans `store` holds and runs again those a previous run was executing.
    pub fn open(
        view: Arc<ClusterView>,
        exec: Arc<Executor>,
        store: Arc<Store>,
        events: Arc<Events>,
        stop: watch::Receiver<bool>,
    ) -> Result<Arc<PlanRunner>, ControllerError> {
        let plans: BTreeMap<String, PlanRecord> = store.list::<PlanRecord>(&PLANS)?.into_iter().map(|p| (p.id.clone(), p)).collect();
        let r = Arc::new(PlanRunner { view, exec, store, events, plans: Mutex::new(plans), executing: Mutex::new(BTreeMap::new()), stop });
        r.resume();
        Ok(r)
    }

    /// Plans `goal` against the cluster as it is now and records the plan (a dry run:
    /// nothing moves). An impossible goal is recorded too, with its per-VM reasons.
    pub fn propose(&self, goal: Goal) -> Result<PlanRecord, ControllerError> {
        if let Goal::Place { vm, .. } = &goal {
            self.movable(vm)?;
        }
        let view = self.projected(None);
        let (case, left_out) = case_of(&view, self.exec.limits().planner_parallel_per_host);
        let planned = plan_goal(&view, &case, &goal, &drain::others_own(&view, &goal), 0)?;
        let id = format!("p{}", self.store.next("plan")?);
        let mut rec = PlanRecord {
            version: PLAN_VERSION,
            id: id.clone(),
            goal: goal.clone(),
            status: PlanStatus::Proposed,
            reason: None,
            created_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
            steps: vec![],
            target: BTreeMap::new(),
            blocked: vec![],
            problems: left_out,
            round: 0,
            attempts: BTreeMap::new(),
            gave_up: vec![],
            lower_bound: 0,
            optimal: false,
        };
        match planned {
            Planned::Steps { steps, target, lower_bound, optimal } => {
                rec.steps = steps;
                rec.target = target;
                rec.lower_bound = lower_bound;
                rec.optimal = optimal;
            }
            Planned::Impossible { reason, blocked } => {
                rec.status = PlanStatus::Impossible;
                rec.reason = Some(reason);
                rec.blocked = blocked;
            }
        }
        let msg = match rec.status {
            PlanStatus::Impossible => format!("plan {id} ({}) is impossible: {}", goal.describe(), rec.reason.as_deref().unwrap_or("")),
            _ => format!("plan {id} ({}) proposed: {} migration(s)", goal.describe(), rec.steps.len()),
        };
        self.save_plan(&rec, Some(msg))?;
        self.prune_proposals()?;
        Ok(rec)
    }

    /// The view as it will be once the migrations under way and the pending steps of
    /// the running plans (but `except`) land: what a new plan or a re-plan starts from.
    fn projected(&self, except: Option<&str>) -> crate::cluster::View {
        let mut view = project_owned(self.view.snapshot(), &self.exec.in_flight());
        let plans = lock(&self.plans);
        for p in plans.values().filter(|p| p.status == PlanStatus::Running && Some(p.id.as_str()) != except) {
            for (_, s) in p.pending() {
                if let Some(vm) = view.vms.get_mut(&s.vm) {
                    if vm.host.as_deref() == Some(s.from.as_str()) {
                        vm.host = Some(s.to.clone());
                    }
                }
            }
        }
        view
    }

    /// Forgets the oldest dry runs (proposed or impossible, never executed) beyond
    /// [`MAX_PROPOSALS`]: proposing is cheap for a caller, storing forever is not.
    fn prune_proposals(&self) -> Result<(), ControllerError> {
        let idle: Vec<PlanRecord> =
            self.plans().into_iter().filter(|p| matches!(p.status, PlanStatus::Proposed | PlanStatus::Impossible)).collect();
        for old in idle.iter().take(idle.len().saturating_sub(MAX_PROPOSALS)) {
            self.store.delete(&PLANS, &old.id)?;
            lock(&self.plans).remove(&old.id);
        }
        Ok(())
    }

    /// Refuses to move `vm` while a migration moves it or a running plan means to.
    fn movable(&self, vm: &str) -> Result<(), ControllerError> {
        if let Some(m) = self.exec.in_flight_of(vm) {
            return Err(ControllerError::Conflict(format!("{vm} is already being migrated ({}: {} -> {})", m.id, m.from, m.to)));
        }
        let running = self.plans().into_iter().filter(|p| p.status == PlanStatus::Running);
        if let Some(p) = running.into_iter().find(|p| p.steps.iter().any(|s| s.vm == vm && !s.status.is_final())) {
            return Err(ControllerError::Conflict(format!("{vm} is being moved by plan {} ({})", p.id, p.goal.describe())));
        }
        Ok(())
    }

    /// Why `rec` may not run beside the plans running now, if it may not.
    fn clash(&self, rec: &PlanRecord) -> Option<String> {
        let running: Vec<PlanRecord> = self.plans().into_iter().filter(|p| p.status == PlanStatus::Running && p.id != rec.id).collect();
        match &rec.goal {
            Goal::Place { vm, .. } => running
                .iter()
                .find(|p| p.steps.iter().any(|s| &s.vm == vm && !s.status.is_final()))
                .map(|p| format!("{vm} is being moved by plan {} ({})", p.id, p.goal.describe())),
            Goal::Drain { host } => running
                .iter()
                .find(|p| match &p.goal {
                    Goal::Place { .. } => false,
                    Goal::Drain { host: other } => other == host,
                    Goal::Rebalance | Goal::Consolidate => true,
                })
                .map(|p| format!("plan {} ({}) is running; wait for it or cancel it first", p.id, p.goal.describe())),
            Goal::Rebalance | Goal::Consolidate => running
                .iter()
                .find(|p| !matches!(p.goal, Goal::Place { .. }))
                .map(|p| format!("plan {} ({}) is running; wait for it or cancel it first", p.id, p.goal.describe())),
        }
    }

    /// All plans, oldest first.
    pub fn plans(&self) -> Vec<PlanRecord> {
        let mut v: Vec<_> = lock(&self.plans).values().cloned().collect();
        v.sort_by_key(|p| (p.created_ms, p.id.clone()));
        v
    }

    /// One plan.
    pub fn plan(&self, id: &str) -> Result<PlanRecord, ControllerError> {
        lock(&self.plans).get(id).cloned().ok_or_else(|| ControllerError::not_found("plan", id))
    }

    /// Stores a plan, and publishes `message` about it if given.
    pub(crate) fn save_plan(&self, rec: &PlanRecord, message: Option<String>) -> Result<(), ControllerError> {
        self.store.put(&PLANS, &rec.id, rec)?;
        lock(&self.plans).insert(rec.id.clone(), rec.clone());
        if let Some(m) = message {
            self.events.emit(Subject::Plan, &rec.id, m, serde_json::to_value(rec).unwrap_or_default());
        }
        Ok(())
    }

    /// Starts executing a proposed plan; returns at once (poll the plan).
    pub fn execute(self: &Arc<Self>, id: &str) -> Result<PlanRecord, ControllerError> {
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
        if let Some(why) = self.clash(&rec) {
            return Err(ControllerError::Conflict(why));
        }
        rec.status = PlanStatus::Running;
        rec.started_ms = Some(now_ms());
        self.save_plan(&rec, Some(format!("plan {id} ({}) is running", rec.goal.describe())))?;
        self.spawn_plan(id.to_string());
        Ok(rec)
    }

    fn spawn_plan(self: &Arc<Self>, id: String) {
        let (tx, rx) = watch::channel(false);
        lock(&self.executing).insert(id.clone(), tx);
        let r = self.clone();
        tokio::spawn(async move {
            r.run_plan(&id, rx).await;
            lock(&r.executing).remove(&id);
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
                if let Some(tx) = lock(&self.executing).get(id) {
                    let _ = tx.send(true);
                }
                for (_, s) in rec.running() {
                    if let Some(mid) = &s.migration {
                        if let Err(e) = self.exec.cancel(mid).await {
                            tracing::warn!(plan = id, migration = %mid, error = %e, "cannot cancel");
                        }
                    }
                }
                self.plan(id)
            }
            _ => Ok(rec),
        }
    }

    /// At start: run the plans a previous run left unfinished.
    fn resume(self: &Arc<Self>) {
        for p in self.plans().into_iter().filter(|p| p.status == PlanStatus::Running) {
            self.events.emit(Subject::Plan, &p.id, format!("plan {} resumes after a controller restart", p.id), serde_json::Value::Null);
            self.spawn_plan(p.id);
        }
    }

    async fn run_plan(&self, id: &str, mut cancel: watch::Receiver<bool>) {
        let mut stop = self.stop.clone();
        // Why the plan must be re-planned, kept until nothing of it runs.
        let mut want_replan: Option<String> = None;
        let mut replan_since: Option<tokio::time::Instant> = None;
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
            // (Read in place: a copy of every host each tick costs a large cluster dearly.)
            if self.view.read(|v| v.hosts.values().any(|h| h.status == HostStatus::Unknown)) {
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
                let hold = settling && replan_since.get_or_insert_with(tokio::time::Instant::now).elapsed() < crate::agents::DOWN_AFTER * 2;
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
                    let in_flight = self.exec.in_flight();
                    match self.view.read(|v| drain::remaining(v, &in_flight, &rec)) {
                        drain::Remaining::Nothing => self.conclude(&mut rec),
                        drain::Remaining::InFlight => {}
                        drain::Remaining::Arrived(why) => want_replan = Some(why),
                    }
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
        let max_attempts = self.exec.limits().max_attempts;
        let mut replan = None;
        for i in 0..rec.steps.len() {
            let s = &rec.steps[i];
            if s.status != StepStatus::Running {
                continue;
            }
            let Some(m) = s.migration.as_deref().and_then(|mid| self.exec.migration(mid).ok()) else { continue };
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
                // Cancelled on request, not by this plan (an operator's cancel of this
                // one migration): the VM stays where it is, given up, not retried.
                Phase::Cancelled => {
                    s.status = StepStatus::Cancelled;
                    let reason = m.reason.clone().unwrap_or_else(|| "cancelled".into());
                    s.reason = Some(reason.clone());
                    let (vm, from) = (s.vm.clone(), s.from.clone());
                    if !rec.gave_up.contains(&vm) {
                        rec.gave_up.push(vm.clone());
                    }
                    rec.problems.retain(|p| p.vm != vm);
                    rec.problems.push(Problem { vm: vm.clone(), reason: format!("its migration was cancelled ({reason}); not retried") });
                    messages.push(format!("migration of {vm} cancelled ({reason}); {vm} stays on {from}"));
                    // The rest of the plan may have counted on this move: plan it again.
                    if rec.pending().next().is_some() {
                        replan = Some(format!("migration of {vm} cancelled"));
                    }
                }
                _ => {
                    s.status = StepStatus::Failed;
                    let reason = m.reason.clone().unwrap_or_else(|| format!("{:?}", m.phase));
                    s.reason = Some(reason.clone());
                    let vm = s.vm.clone();
                    let n = rec.attempts.entry(vm.clone()).or_insert(0);
                    *n += 1;
                    let vm_down = self.view.vm(&vm).map(|v| v.state == ClusterVmState::Unreachable).unwrap_or(false);
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
            let Ok(h) = self.view.host(name) else { continue };
            if h.status == HostStatus::Up && self.view.agents().host(h.url).await.is_err() {
                return true;
            }
        }
        false
    }

    /// Why a pending step can no longer run as planned: one of its hosts went down.
    fn host_gone(&self, rec: &PlanRecord) -> Option<String> {
        self.view.read(|view| {
            rec.pending().find_map(|(_, s)| {
                [&s.from, &s.to]
                    .into_iter()
                    .find(|h| !view.hosts.get(h.as_str()).is_some_and(|h| h.status != HostStatus::Down))
                    .map(|h| format!("host {h} went down"))
            })
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
            if let Some(m) = self.exec.in_flight_of(&vm) {
                if m.plan.as_deref() == Some(rec.id.as_str()) {
                    // This plan's migration, which a previous controller started: adopt it.
                    rec.steps[i].status = StepStatus::Running;
                    rec.steps[i].started_ms = Some(m.started_ms);
                    rec.steps[i].migration = Some(m.id);
                }
                // Otherwise another migration moves the VM (a walk's, an operator's):
                // wait for it to land, then see where the VM is.
                continue;
            }
            let at = self.view.vm(&vm).ok().and_then(|v| v.host);
            if at.as_deref() == Some(to.as_str()) {
                rec.steps[i].status = StepStatus::Completed;
                rec.steps[i].reason = Some(format!("{vm} was already on {to}"));
                continue;
            }
            if at.as_deref() != Some(from.as_str()) {
                if let Some(why) = drain::moot(&rec.goal, &from, at.as_deref()) {
                    rec.steps[i].status = StepStatus::Superseded;
                    rec.steps[i].reason = Some(format!("{vm} {why}"));
                    messages.push(format!("{vm} {why}"));
                    continue;
                }
                return Err(format!("{vm} is on {} instead of {from}", at.unwrap_or_else(|| "no host".into())));
            }
            match self.exec.try_migrate(&vm, &to, Some(&rec.id), &why) {
                Ok(Some(m)) => {
                    rec.steps[i].status = StepStatus::Running;
                    rec.steps[i].migration = Some(m.id.clone());
                    rec.steps[i].started_ms = Some(m.started_ms);
                    messages.push(format!("{vm}: {from} -> {to} started ({})", m.id));
                }
                Ok(None) => {}
                Err(e) => {
                    // Refused before anything moved (the destination filled up, or went
                    // into maintenance): no attempt of the VM, but the plan no longer fits.
                    rec.steps[i].status = StepStatus::Failed;
                    rec.steps[i].reason = Some(e.to_string());
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
        if rec.round >= self.exec.limits().max_replans {
            let why = format!("gave up after {} re-plans", rec.round);
            self.unreached(rec, &why);
            self.end_plan(rec, PlanStatus::Failed, why);
            return;
        }
        rec.round += 1;
        let view = self.projected(Some(&rec.id));
        let (case, left_out) = case_of(&view, self.exec.limits().planner_parallel_per_host);
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
        let others = drain::others_own(&view, &rec.goal);
        for _ in 0..=case.vms.len() {
            let pinned: Vec<String> = rec.gave_up.iter().chain(&others).cloned().collect();
            match plan_goal(&view, &case, &rec.goal, &pinned, rec.round) {
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
        let view = self.view.snapshot();
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
            let n = rec.steps.iter().filter(|s| s.status == StepStatus::Completed).count();
            self.end_plan(rec, PlanStatus::Completed, format!("{} reached with {n} migration(s)", rec.goal.describe()));
        } else {
            let vms: Vec<&str> = rec.problems.iter().map(|p| p.vm.as_str()).collect();
            let why = format!("{} not reached for {}", rec.goal.describe(), vms.join(", "));
            self.end_plan(rec, PlanStatus::Failed, why);
        }
    }

    /// Ends a plan: records it and (for a drain) states what became of its host.
    fn end_plan(&self, rec: &mut PlanRecord, status: PlanStatus, reason: String) {
        rec.status = status;
        rec.finished_ms = Some(now_ms());
        rec.reason = Some(reason.clone());
        let msg = format!("plan {} {status}: {reason}", rec.id);
        // The host's end first: whoever sees the plan final sees its host's end too.
        drain::ended(&self.view, rec);
        if let Err(e) = self.save_plan(rec, Some(msg)) {
            tracing::error!(plan = %rec.id, error = %e, "cannot store plan");
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cluster::{HostStatus, Maintenance};
    use crate::error::ControllerError;
    use crate::fake::{open, temp, url, wait_final, Fake};
    use crate::plans::PlanStatus;
    use std::time::Duration;
    use walkabout_api::ExecLimits;

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
    async fn a_migration_cancelled_on_request_is_not_retried_and_its_vm_stays() {
        let fake = tight();
        fake.state().polls = 1000;
        let dir = temp("cancel-one");
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
        let p = c.move_vm("a", "h2").expect("move");
        let mid = loop {
            let m = c.migrations().into_iter().find(|m| m.vm == "a" && m.agent_id.is_some());
            if let Some(m) = m {
                break m.id;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(c.cancel_migration(&mid).await.expect("cancel").id, mid);
        let p = wait_final(&c, &p.id).await;
        assert_eq!(p.status, PlanStatus::Failed, "{p:?}");
        let problem = p.problems.iter().find(|x| x.vm == "a").expect("a reported");
        assert!(problem.reason.contains("cancelled") && problem.reason.contains("not retried"), "{problem:?}");
        assert_eq!(fake.state().started.len(), 1, "the cancelled migration was retried: {:?}", fake.state().started);
        assert_eq!(c.vm("a").expect("a").host.as_deref(), Some("h1"));
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

#[cfg(test)]
mod proposal_tests {
    use crate::fake::{open, temp, Fake};
    use crate::plans::{Goal, PlanStatus};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_name_with_a_newline_is_refused() {
        let fake = Fake::new(&[("h1", 1024)], &[]);
        let dir = temp("badname");
        let c = open(&dir, &fake, &["h1"]).await;
        let e = c.add_host("http://127.0.0.1:9", Some("h2\nwalkabout_hosts 99")).await.expect_err("refused");
        assert!(e.to_string().contains("invalid host name"), "{e}");
        assert!(c.hosts().iter().all(|h| !h.name.contains('\n')));
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dry_runs_are_bounded_and_the_newest_kept() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024)], &[("a", 256, "h1")]);
        let dir = temp("proposals");
        let c = open(&dir, &fake, &["h1", "h2"]).await;
        let mut last = String::new();
        for _ in 0..super::MAX_PROPOSALS + 5 {
            last = c.propose(Goal::Rebalance).expect("a dry run").id;
        }
        let kept: Vec<_> = c.plans().into_iter().filter(|p| p.status == PlanStatus::Proposed).collect();
        assert_eq!(kept.len(), super::MAX_PROPOSALS);
        assert_eq!(kept.last().map(|p| p.id.as_str()), Some(last.as_str()));
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }
}
