//! The controller as one handle: its parts, each with its own state, and the few
//! operations that span them. [`Cluster`] holds no state of its own.
//!
//! ```text
//!   api.rs ──> Cluster ──> ClusterView (cluster.rs)   hosts, VMs, one watcher per host
//!                     ├──> Executor (execute.rs)      migrations within the limits
//!                     ├──> PlanRunner (plan_runner.rs) goals -> plans (plans.rs), rounds, re-plans
//!                     ├──  drain.rs                    maintenance + a drain plan, its end
//!                     └──> Games (games/)              walks, musical chairs: clients of the API
//! ```
//! The view knows nothing of the others; the executor reads and updates the view; the
//! plan runner uses both; the games only speak HTTP to the API.

use crate::agents::AgentApi;
use crate::cluster::{ClusterView, ClusterVm, Host, Maintenance, View};
use crate::error::ControllerError;
use crate::events::Events;
use crate::execute::{ExecConfig, ExecLimits, Executor, Migration};
use crate::games::Games;
use crate::plan_runner::PlanRunner;
use crate::plans::{Goal, PlanRecord};
use crate::store::Store;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use walkabout_api::{Mode, VmGroup, VmSpec};

/// How the controller is set up.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Directory of its database.
    pub data_dir: PathBuf,
    /// Execution limits.
    pub limits: ExecLimits,
    /// Migration mode asked of agents (`auto`).
    pub mode: Mode,
    /// Bandwidth cap per migration asked of agents, bytes/s (default: none).
    pub max_bandwidth_bps: Option<u64>,
    /// vCPUs the planner may give guests per host CPU ([`DEFAULT_VCPU_OVERCOMMIT`]); 0:
    /// vCPUs not limited.
    pub vcpu_overcommit: f64,
    /// How often each agent is polled (default [`crate::agents::POLL_INTERVAL`]); a
    /// host is marked down after two failed polls and [`crate::agents::DOWN_AFTER`].
    pub poll_interval: std::time::Duration,
    /// Automatic balancing (default: `manual`, nothing moves by itself).
    pub balance: crate::balance::BalanceConfig,
    /// Fence time of protected VMs, ms ([`crate::failover::DEFAULT_FENCE_MS`]): their
    /// agents stop them after this long without the controller, and the controller
    /// restores them elsewhere only after this long since their host's last contact.
    /// Must exceed the time to find a host down.
    pub fence_ms: u64,
}

/// Default vCPUs per host CPU: generous, as most guests idle, yet a bound.
pub const DEFAULT_VCPU_OVERCOMMIT: f64 = 8.0;

impl ControllerConfig {
    /// Defaults with `data_dir`.
    pub fn new(data_dir: PathBuf) -> ControllerConfig {
        ControllerConfig {
            data_dir,
            limits: ExecLimits::default(),
            mode: Mode::Auto,
            max_bandwidth_bps: None,
            vcpu_overcommit: DEFAULT_VCPU_OVERCOMMIT,
            poll_interval: crate::agents::POLL_INTERVAL,
            balance: crate::balance::BalanceConfig::default(),
            fence_ms: crate::failover::DEFAULT_FENCE_MS,
        }
    }
}

/// The controller: its parts behind one cheap-to-clone handle.
#[derive(Clone)]
pub struct Cluster {
    view: Arc<ClusterView>,
    exec: Arc<Executor>,
    plans: Arc<PlanRunner>,
    games: Arc<Games>,
    events: Arc<Events>,
    shutdown: Arc<watch::Sender<bool>>,
    balance: Arc<crate::balance::BalanceState>,
    failovers: Arc<crate::failover::Failovers>,
}

impl Cluster {
    /// Opens the controller's database in `config.data_dir`, loads what it knew, starts
    /// watching its hosts, and resumes the migrations and plans a previous run left
    /// unfinished.
    pub async fn open(config: ControllerConfig, api: Arc<dyn AgentApi>) -> Result<Cluster, ControllerError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| ControllerError::Invalid(format!("cannot create data directory {}: {e}", config.data_dir.display())))?;
        let store = Arc::new(Store::open(&config.data_dir.join("controller.redb"))?);
        Cluster::open_on(config, store, api).await
    }

    /// Opens the controller over `store` (the embedded file, or etcd for the leader of
    /// several controllers): loads what it holds, starts watching its hosts, and resumes
    /// the migrations and plans left unfinished by the previous controller.
    pub async fn open_on(config: ControllerConfig, store: Arc<Store>, api: Arc<dyn AgentApi>) -> Result<Cluster, ControllerError> {
        let events = Arc::new(Events::new(store.clone()));
        let (shutdown, stop) = watch::channel(false);
        let view =
            ClusterView::open_with(store.clone(), api.clone(), events.clone(), stop.clone(), config.vcpu_overcommit, config.poll_interval)?;
        let exec_config = ExecConfig { limits: config.limits, mode: config.mode, max_bandwidth_bps: config.max_bandwidth_bps };
        let exec = Executor::open(view.clone(), store.clone(), events.clone(), exec_config, stop.clone())?;
        let plans = PlanRunner::open(view.clone(), exec.clone(), store.clone(), events.clone(), stop.clone())?;
        let failovers = crate::failover::Failovers::open(view.clone(), exec.clone(), store, events.clone(), config.fence_ms, stop.clone())?;
        let games = Games::new(events.clone(), stop, api);
        let balance = Arc::new(crate::balance::BalanceState::new(config.balance));
        let c = Cluster { view, exec, plans, games, events, shutdown: Arc::new(shutdown), balance, failovers };
        crate::balance::spawn(c.clone());
        Ok(c)
    }

    /// Stops the watchers, plans and walks of this controller (agents and their VMs
    /// carry on; a restarted controller picks up where this one stopped).
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Resolves once [`Cluster::stop`] has been called.
    pub async fn stopped(&self) {
        let mut rx = self.shutdown.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn view_part(&self) -> &Arc<ClusterView> {
        &self.view
    }

    /// The walks and games.
    pub fn games(&self) -> &Arc<Games> {
        &self.games
    }

    /// The event log.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// The execution limits.
    pub fn limits(&self) -> ExecLimits {
        self.exec.limits()
    }

    /// A copy of the view.
    pub fn view(&self) -> View {
        self.view.snapshot()
    }

    /// All hosts.
    pub fn hosts(&self) -> Vec<Host> {
        self.view.hosts()
    }

    /// One host.
    pub fn host(&self, name: &str) -> Result<Host, ControllerError> {
        self.view.host(name)
    }

    /// All VMs.
    pub fn vms(&self) -> Vec<ClusterVm> {
        self.view.vms()
    }

    /// One VM.
    pub fn vm(&self, name: &str) -> Result<ClusterVm, ControllerError> {
        self.view.vm(name)
    }

    /// Registers the agent at `url` as a host (see [`ClusterView::add_host`]).
    pub async fn add_host(&self, url: &str, name: Option<&str>) -> Result<Host, ControllerError> {
        self.view.add_host(url, name).await
    }

    /// Takes a host out of the cluster; refused while a VM runs there or a migration
    /// involves it.
    pub fn remove_host(&self, name: &str) -> Result<(), ControllerError> {
        self.view.remove_host(name, self.exec.involving(name))
    }

    /// Sets a host's maintenance mode.
    pub fn set_maintenance(&self, name: &str, m: Maintenance) -> Result<Host, ControllerError> {
        self.view.set_maintenance(name, m)
    }

    /// Creates a VM from an agent spec on `host`, or where the planner places it.
    pub async fn create_vm(&self, spec: VmSpec, host: Option<&str>) -> Result<ClusterVm, ControllerError> {
        self.create_vm_in(spec, host, vec![]).await
    }

    /// Creates a VM as a member of `groups`: on `host` if given (refused if that host
    /// cannot run its CPU or breaks a group), else on the host the planner picks (one
    /// that runs its CPU, has the memory and vCPUs, keeps anti-affinity groups apart
    /// and affinity groups together). CPU model `baseline` becomes the richest named
    /// model every host in service runs (like EVC), so the VM can move anywhere.
    pub async fn create_vm_in(&self, mut spec: VmSpec, host: Option<&str>, groups: Vec<VmGroup>) -> Result<ClusterVm, ControllerError> {
        if spec.cpu_model.as_deref() == Some(walkabout_api::BASELINE_CPU_MODEL) {
            spec.cpu_model = Some(self.view.baseline_model()?);
        }
        if let Some(h) = host {
            self.view.host(h)?;
        }
        if self.view.read(|v| v.vms.get(&spec.name).is_some_and(|x| x.state != walkabout_api::ClusterVmState::Missing)) {
            return Err(ControllerError::Conflict(format!("a VM named {} already exists", spec.name)));
        }
        let chosen = crate::plans::place_new(&self.view.snapshot(), &spec, &groups, host)?;
        self.view.create_vm(spec, Some(&chosen), groups).await
    }

    /// Deletes a VM on its host.
    pub async fn delete_vm(&self, name: &str) -> Result<(), ControllerError> {
        self.view.delete_vm(name).await
    }

    /// All migrations, oldest first.
    pub fn migrations(&self) -> Vec<Migration> {
        self.exec.migrations()
    }

    /// One migration.
    pub fn migration(&self, id: &str) -> Result<Migration, ControllerError> {
        self.exec.migration(id)
    }

    /// Starts migrating `vm` to `to` now if the limits allow (`Ok(None)` when not yet),
    /// outside any plan.
    pub fn try_migrate(&self, vm: &str, to: &str, why: &str) -> Result<Option<Migration>, ControllerError> {
        self.exec.try_migrate(vm, to, None, why)
    }

    /// Asks the source agent to cancel a migration (before its switchover only).
    pub async fn cancel_migration(&self, id: &str) -> Result<Migration, ControllerError> {
        self.exec.cancel(id).await
    }

    /// The balancer's settings.
    pub fn balance_config(&self) -> crate::balance::BalanceConfig {
        self.balance.config()
    }

    /// Changes the balancer's settings (its level among them); takes effect at its
    /// next round.
    pub fn set_balance_config(&self, config: crate::balance::BalanceConfig) {
        self.balance.set_config(config);
    }

    /// The balancer's settings, state and last moves.
    pub fn balance_status(&self) -> crate::balance::BalanceStatus {
        self.balance.status()
    }

    /// The moves the balancer's last round decided, each with its reason.
    pub fn balance_moves(&self) -> Vec<crate::balance::BalanceMove> {
        self.balance.last()
    }

    /// One balancing round now: decides the moves the load calls for and, by level,
    /// does nothing (`manual`), proposes each as a plan (`recommend`) or runs it
    /// (`automatic`), every one with its reason in the event log. Skipped while a
    /// drain, rebalance or consolidation runs.
    pub fn balance_round(&self) -> Vec<crate::balance::BalanceMove> {
        let cfg = self.balance.config();
        if cfg.level == crate::balance::BalanceLevel::Manual {
            return vec![];
        }
        let busy = self.plans().iter().any(|p| p.status == crate::plans::PlanStatus::Running && !matches!(p.goal, Goal::Place { .. }));
        if busy {
            return vec![];
        }
        let view = crate::plans::project(&self.view.snapshot(), &self.exec.in_flight());
        let (case, _) = crate::plans::case_of(&view, 1);
        let in_case = |h: &str| case.hosts.iter().any(|x| x.name == h);
        let hosts: Vec<crate::balance::HostLoad> = view
            .hosts
            .values()
            .filter(|h| in_case(&h.name) && h.accepts_vms() && h.cpus > 0)
            .map(|h| crate::balance::HostLoad { name: h.name.clone(), cpus: f64::from(h.cpus) })
            .collect();
        let vms: Vec<crate::balance::VmLoad> = view
            .vms
            .values()
            .filter(|v| v.is_active())
            .filter_map(|v| {
                let host = v.host.clone().filter(|h| in_case(h))?;
                let cpu = view.vm_cpu.get(&v.name).map(|x| x.2).filter(|r| *r >= 0.0)?;
                // Precision: a rate in MiB/s needs no more than f64 gives.
                #[allow(clippy::cast_precision_loss)]
                let dirty_mib_s = view.vm_dirty_bps.get(&v.name).map_or(0.0, |&b| b as f64 / 1_048_576.0);
                Some(crate::balance::VmLoad { name: v.name.clone(), host, cpu, memory_mib: v.memory_mib, dirty_mib_s })
            })
            .collect();
        let now_s = crate::now_ms() / 1000;
        let moves = self.balance.decide(&cfg, &case, &hosts, &vms, now_s);
        for m in &moves {
            let (what, r) = match cfg.level {
                crate::balance::BalanceLevel::Automatic => ("moves", self.move_vm(&m.vm, &m.to)),
                _ => ("recommends moving", self.propose(Goal::Place { vm: m.vm.clone(), host: m.to.clone() })),
            };
            let msg = match &r {
                Ok(p) => format!("balancer {what} {} from {} to {} (plan {}): {}", m.vm, m.from, m.to, p.id, m.reason),
                Err(e) => format!("balancer could not move {} to {}: {e} ({})", m.vm, m.to, m.reason),
            };
            self.events.emit(crate::events::Subject::Vm, &m.vm, msg, serde_json::to_value(m).unwrap_or_default());
        }
        moves
    }

    /// Protects a VM (see [`crate::failover::Failovers::protect`]).
    pub async fn protect(&self, vm: &str, req: &walkabout_api::ProtectVm) -> Result<ClusterVm, ControllerError> {
        self.failovers.protect(vm, req).await
    }

    /// Stops protecting a VM.
    pub async fn unprotect(&self, vm: &str) -> Result<ClusterVm, ControllerError> {
        self.failovers.unprotect(vm).await
    }

    /// Every failover, oldest first.
    pub fn failovers(&self) -> Vec<walkabout_api::Failover> {
        self.failovers.list()
    }

    /// Plans `goal` (a dry run, recorded).
    pub fn propose(&self, goal: Goal) -> Result<PlanRecord, ControllerError> {
        self.plans.propose(goal)
    }

    /// Moves `vm` to `to`: a `place` plan, executed.
    pub fn move_vm(&self, vm: &str, to: &str) -> Result<PlanRecord, ControllerError> {
        let plan = self.plans.propose(Goal::Place { vm: vm.to_string(), host: to.to_string() })?;
        self.plans.execute(&plan.id)
    }

    /// All plans, oldest first.
    pub fn plans(&self) -> Vec<PlanRecord> {
        self.plans.plans()
    }

    /// One plan.
    pub fn plan(&self, id: &str) -> Result<PlanRecord, ControllerError> {
        self.plans.plan(id)
    }

    /// Starts executing a proposed plan; returns at once (poll the plan).
    pub fn execute(&self, id: &str) -> Result<PlanRecord, ControllerError> {
        self.plans.execute(id)
    }

    /// Cancels a plan.
    pub async fn cancel_plan(&self, id: &str) -> Result<PlanRecord, ControllerError> {
        self.plans.cancel_plan(id).await
    }
}
